//! `llamaflow run` with no config: the embedded default (SPEC §4).
//!
//! The bundled DeFiLlama-shaped demo feed is replayed at live pace (`--speed` to accelerate)
//! through the dataflow; alerts go to stdout as JSONL, events and alerts to the WebSocket
//! fanout, and the dashboard, `/metrics` and `/healthz` are served on `--listen`.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use metrics_exporter_prometheus::PrometheusBuilder;
use operators::OpConfig;
use schemas::{Alert, DeadLetter, Event, Record, SourcePos};
use sinks::websocket::{Hub, WsConfig};
use sources::demo::{DemoFeed, demo_protocols, demo_rules};

use crate::engine::{Engine, Output};

/// Flags of `llamaflow run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Address of the dashboard, WebSocket (`/ws`) and `/metrics`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Feed speed: feed seconds per wall-clock second.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Minutes of feed history replayed at once on start (fills the 1h windows and the dashboard).
    #[arg(long, default_value_t = 75)]
    pub warmup_minutes: u32,
    /// Seed of the demo feed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Dataflow worker threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
    /// Stop after this many seconds of wall time (default: until Ctrl-C / SIGTERM).
    #[arg(long)]
    pub duration_secs: Option<u64>,
}

/// Sends results to stdout, the WebSocket hub and metrics.
struct LiveOutput {
    hub: Hub,
}

impl Output for LiveOutput {
    fn alerts(&self, _epoch: u64, alerts: &[Alert]) {
        let mut out = std::io::stdout().lock();
        for a in alerts {
            metrics::counter!("llamaflow_alerts_total", "type" => a.alert_type.clone()).increment(1);
            self.hub.publish_alert(a);
            if let Ok(line) = serde_json::to_string(a) {
                // A closed stdout (e.g. `| head`) must not stop the pipeline.
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = out.flush();
    }

    fn events(&self, _epoch: u64, events: &[Event]) {
        for e in events {
            metrics::counter!("llamaflow_events_total", "type" => e.data.type_name()).increment(1);
            self.hub.publish_event(e);
        }
    }

    fn dead(&self, _epoch: u64, dead: &[DeadLetter]) {
        let mut err = std::io::stderr().lock();
        for d in dead {
            metrics::counter!("llamaflow_dead_letters_total", "reason" => d.reason_label().to_string()).increment(1);
            if let Ok(line) = serde_json::to_string(d) {
                let _ = writeln!(err, "dead-letter {line}");
            }
        }
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Feeds the demo records into the engine at `speed` until `stop` is set.
fn feed_loop(mut engine: Engine, args: &RunArgs, stop: &AtomicBool) -> Result<()> {
    let start = now_secs() - i64::from(args.warmup_minutes) * 60;
    let origin: Arc<str> = "demo-setup:".into();
    let mut batch = Vec::new();
    for (i, p) in demo_protocols().into_iter().enumerate() {
        engine.sequencer().push(
            SourcePos::new(origin.clone(), i as u64),
            Record::Protocol(p),
            &mut batch,
        );
    }
    for (i, r) in demo_rules().into_iter().enumerate() {
        engine.sequencer().push(
            SourcePos::new(origin.clone(), 1000 + i as u64),
            Record::Rule(r),
            &mut batch,
        );
    }
    let mut feed = DemoFeed::new(start, args.seed).peekable();
    let wall0 = Instant::now();
    let warmup_ms = i64::from(args.warmup_minutes) * 60_000;
    while !stop.load(Ordering::Relaxed) {
        let sim_now = start * 1000 + warmup_ms + (wall0.elapsed().as_secs_f64() * args.speed * 1000.0) as i64;
        while batch.len() < 20_000 {
            match feed.peek() {
                Some((_, r)) if r.timestamp() <= sim_now => {}
                _ => break,
            }
            let Some((pos, rec)) = feed.next() else { break };
            metrics::counter!("llamaflow_records_in_total", "kind" => rec.kind().name()).increment(1);
            engine.sequencer().push(pos, rec, &mut batch);
        }
        if !batch.is_empty() {
            engine.send(std::mem::take(&mut batch))?;
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    engine.finish()
}

/// Runs the embedded default until Ctrl-C / SIGTERM (or `--duration-secs`).
pub fn run(args: RunArgs) -> Result<()> {
    if !(args.speed.is_finite() && args.speed > 0.0) {
        return Err(crate::UsageError(format!("--speed must be a positive number, got {}", args.speed)).into());
    }
    let recorder = PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the Prometheus metrics recorder")?;
    let mut ws = WsConfig {
        allow_anonymous: true,
        ..WsConfig::default()
    };
    ws.api_keys.insert("demo".to_string(), "demo".to_string());
    let hub = Hub::new(ws);
    let engine = Engine::start(
        args.workers as usize,
        OpConfig::default(),
        Arc::new(LiveOutput { hub: hub.clone() }),
    )?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(args.listen))
        .with_context(|| format!("cannot listen on {} (pick another address with --listen)", args.listen))?;
    eprintln!(
        "llamaflow: embedded demo feed at {}x; dashboard http://{}/ · WebSocket ws://{}/ws · metrics http://{}/metrics · Ctrl-C to stop",
        args.speed, args.listen, args.listen, args.listen
    );

    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        let args = args.clone();
        std::thread::Builder::new()
            .name("demo-feed".into())
            .spawn(move || feed_loop(engine, &args, &stop))
            .context("cannot start the feed thread")?
    };

    let render = Arc::new(move || recorder.render());
    let app = crate::http::app(hub.clone(), render);
    let duration = args.duration_secs;
    let stop2 = stop.clone();
    let served = rt.block_on(async move {
        let shutdown = async move {
            let limit = async {
                match duration {
                    Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = crate::shutdown_signal() => eprintln!("llamaflow: stopping"),
                _ = limit => {}
            }
            stop2.store(true, Ordering::Relaxed);
        };
        sinks::websocket::serve(listener, app, hub, shutdown).await
    });
    stop.store(true, Ordering::Relaxed);
    let fed = feeder.join().map_err(|_| anyhow::anyhow!("the feed thread panicked"))?;
    served.context("HTTP server failed")?;
    fed
}
