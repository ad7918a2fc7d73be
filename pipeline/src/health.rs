//! Pipeline health: which sinks are failing, whether start-up (snapshot, history) is done.
//! Served as `/healthz` (liveness: always 200, with the state) and `/readyz` (503 while
//! starting or while a sink is down).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sources::live::Reach;

use serde_json::{Value, json};

#[derive(Debug)]
struct SinkState {
    failing_since: Option<Instant>,
    last_error: Option<String>,
}

/// How recent a source's error must be to count as failing (librdkafka reports an
/// unreachable broker again at least every 10 s).
const SOURCE_ERROR_RECENT: Duration = Duration::from_secs(15);

/// Shared health state, updated by the sink tasks and the ingest front.
#[derive(Debug, Default)]
pub struct Health {
    sinks: Mutex<BTreeMap<&'static str, SinkState>>,
    /// Live sources that report whether they reach their broker or database.
    sources: Mutex<BTreeMap<&'static str, Arc<Reach>>>,
    started: AtomicBool,
}

impl Health {
    /// Registers a sink as healthy.
    pub fn register(&self, sink: &'static str) {
        if let Ok(mut s) = self.sinks.lock() {
            s.insert(
                sink,
                SinkState {
                    failing_since: None,
                    last_error: None,
                },
            );
        }
        metrics::gauge!("llamaflow_sink_up", "sink" => sink).set(1.0);
    }

    /// A write to `sink` failed (it is being retried).
    pub fn failing(&self, sink: &'static str, error: String) {
        if let Ok(mut s) = self.sinks.lock() {
            let st = s.entry(sink).or_insert(SinkState {
                failing_since: None,
                last_error: None,
            });
            st.failing_since.get_or_insert_with(Instant::now);
            st.last_error = Some(error);
        }
        metrics::gauge!("llamaflow_sink_up", "sink" => sink).set(0.0);
    }

    /// A write to `sink` succeeded.
    pub fn ok(&self, sink: &'static str) {
        if let Ok(mut s) = self.sinks.lock()
            && let Some(st) = s.get_mut(sink)
            && st.failing_since.is_some()
        {
            st.failing_since = None;
            st.last_error = None;
            metrics::gauge!("llamaflow_sink_up", "sink" => sink).set(1.0);
        }
    }

    /// Watches whether the live source `name` reaches its broker or database.
    pub fn register_source(&self, name: &'static str, reach: Arc<Reach>) {
        if let Ok(mut s) = self.sources.lock() {
            s.insert(name, reach);
        }
    }

    /// Start-up (CDC snapshot and history) is done; live sources are starting.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    /// `(ready, state as JSON)`: ready once started and while no sink or source is failing.
    pub fn report(&self) -> (bool, Value) {
        let started = self.started.load(Ordering::Relaxed);
        let mut sinks = serde_json::Map::new();
        let mut degraded = false;
        if let Ok(s) = self.sinks.lock() {
            for (name, st) in s.iter() {
                let v = match st.failing_since {
                    Some(t) => {
                        degraded = true;
                        json!({"status": "failing", "for_secs": t.elapsed().as_secs(), "error": st.last_error})
                    }
                    None => json!({"status": "ok"}),
                };
                sinks.insert((*name).to_string(), v);
            }
        }
        let mut sources = serde_json::Map::new();
        if let Ok(s) = self.sources.lock() {
            for (name, reach) in s.iter() {
                let v = match reach.failing(SOURCE_ERROR_RECENT) {
                    Some(e) => {
                        degraded = true;
                        metrics::gauge!("llamaflow_source_up", "source" => *name).set(0.0);
                        json!({"status": "failing", "error": e})
                    }
                    None => {
                        metrics::gauge!("llamaflow_source_up", "source" => *name).set(1.0);
                        json!({"status": "ok"})
                    }
                };
                sources.insert((*name).to_string(), v);
            }
        }
        let status = if degraded {
            "degraded"
        } else if started {
            "ok"
        } else {
            "starting"
        };
        let mut v = json!({"status": status, "sinks": sinks});
        if !sources.is_empty() {
            v["sources"] = Value::Object(sources);
        }
        (started && !degraded, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degraded_while_a_sink_fails_and_ready_after() {
        let h = Health::default();
        h.register("redis");
        assert!(!h.report().0, "not started yet");
        assert_eq!(h.report().1["status"], "starting");
        h.set_started();
        assert!(h.report().0);
        h.failing("redis", "connection refused".into());
        let (ready, v) = h.report();
        assert!(!ready);
        assert_eq!(v["status"], "degraded");
        assert_eq!(v["sinks"]["redis"]["status"], "failing");
        assert_eq!(v["sinks"]["redis"]["error"], "connection refused");
        h.ok("redis");
        assert_eq!(
            h.report(),
            (true, json!({"status": "ok", "sinks": {"redis": {"status": "ok"}}}))
        );
        // A source that cannot reach its broker makes the job degraded, named.
        let kafka = Arc::new(Reach::default());
        h.register_source("kafka", kafka.clone());
        assert!(h.report().0);
        kafka.error("BrokerTransportFailure: Connection refused".into());
        let (ready, v) = h.report();
        assert!(!ready);
        assert_eq!(v["status"], "degraded");
        assert_eq!(v["sources"]["kafka"]["status"], "failing");
        assert!(
            v["sources"]["kafka"]["error"]
                .as_str()
                .unwrap()
                .contains("Connection refused")
        );
        std::thread::sleep(Duration::from_millis(2));
        kafka.ok();
        assert!(h.report().0);
    }
}
