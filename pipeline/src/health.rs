//! Pipeline health: which sinks are failing, whether start-up (snapshot, history) is done.
//! Served as `/healthz` (liveness: always 200, with the state) and `/readyz` (503 while
//! starting or while a sink is down).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::{Value, json};

#[derive(Debug)]
struct SinkState {
    failing_since: Option<Instant>,
    last_error: Option<String>,
}

/// Shared health state, updated by the sink tasks and the ingest front.
#[derive(Debug, Default)]
pub struct Health {
    sinks: Mutex<BTreeMap<&'static str, SinkState>>,
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

    /// Start-up (CDC snapshot and history) is done; live sources are starting.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    /// `(ready, state as JSON)`: ready once started and while no sink is failing.
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
        let status = if degraded {
            "degraded"
        } else if started {
            "ok"
        } else {
            "starting"
        };
        (started && !degraded, json!({"status": status, "sinks": sinks}))
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
    }
}
