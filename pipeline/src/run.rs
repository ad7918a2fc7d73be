//! `llamaflow run`: the continuous job, from `--config llamaflow.toml` or, without one, the
//! embedded default (SPEC §4): the bundled DeFiLlama-shaped feed replayed at live pace,
//! alerts on stdout, WebSocket + dashboard + `/metrics` on `--listen`, no external services.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use crate::config::{Config, DemoSection, WsSection};

/// Flags of `llamaflow run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Configuration file; without it, the embedded default runs.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the dashboard, WebSocket (`/ws`) and `/metrics` [default: 127.0.0.1:8080].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Embedded default: feed seconds per wall-clock second.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Embedded default: minutes of feed history replayed at once on start (fills 1h windows).
    #[arg(long, default_value_t = 75)]
    pub warmup_minutes: u32,
    /// Embedded default: seed of the demo feed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Dataflow worker threads (overrides the config).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: Option<u32>,
    /// Stop after this many seconds (default: until Ctrl-C / SIGTERM).
    #[arg(long)]
    pub duration_secs: Option<u64>,
}

/// The embedded default configuration.
pub fn embedded(args: &RunArgs) -> Config {
    let mut cfg = Config::default();
    cfg.sources.demo = Some(DemoSection {
        speed: args.speed,
        warmup_minutes: args.warmup_minutes,
        seed: args.seed,
        rules: true,
    });
    let mut ws = WsSection {
        allow_anonymous: true,
        ..WsSection::default()
    };
    ws.api_keys.insert("demo".into(), "demo".into());
    cfg.sinks.websocket = Some(ws);
    cfg
}

/// Runs until Ctrl-C / SIGTERM (or `--duration-secs`), then drains and exits.
pub fn run(args: RunArgs) -> Result<()> {
    if !(args.speed.is_finite() && args.speed > 0.0) {
        return Err(crate::UsageError(format!("--speed must be a positive number, got {}", args.speed)).into());
    }
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => embedded(&args),
    };
    if let Some(l) = args.listen {
        cfg.pipeline.listen = Some(l);
    }
    if let Some(w) = args.workers {
        cfg.pipeline.workers = w;
    }
    crate::live::run(cfg, args.duration_secs.map(Duration::from_secs))
}
