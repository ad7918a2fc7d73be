//! `llamaflow run`: the continuous job, from `--config llamaflow.toml` or, without one, the
//! embedded default (SPEC §4): the bundled DeFiLlama-shaped feed replayed at live pace,
//! alerts on stdout, WebSocket + dashboard + `/metrics` on `--listen`, no external services.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use schemas::Kind;

use crate::config::{Config, DemoSection, FileEntry, WsSection};

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
    /// Scale-out over several processes (override the config).
    #[command(flatten)]
    pub cluster: ClusterFlags,
    /// Sources given on the command line (added to the config's).
    #[command(flatten)]
    pub sources: SourceFlags,
}

/// Scale-out flags of `run` and `backfill` (timely's cluster mode): start the same command
/// with `--process-id 0..N` on every host.
#[derive(Args, Debug, Clone, Default)]
pub struct ClusterFlags {
    /// Number of llamaflow processes forming one dataflow (overrides `pipeline.processes`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub processes: Option<u32>,
    /// This process's index, 0..processes (overrides `pipeline.process_id`).
    #[arg(long)]
    pub process_id: Option<u32>,
    /// A file with one `host:port` per line, process 0 first, where the processes connect to
    /// each other (overrides `pipeline.hosts`; blank lines and `#` comments are skipped).
    #[arg(long, value_name = "FILE")]
    pub hosts: Option<PathBuf>,
}

impl ClusterFlags {
    /// Applies the flags to `cfg` and checks the resulting cluster.
    pub fn apply(&self, cfg: &mut Config) -> Result<(), crate::UsageError> {
        if let Some(n) = self.processes {
            cfg.pipeline.processes = n;
        }
        if let Some(i) = self.process_id {
            cfg.pipeline.process_id = i;
        }
        if let Some(path) = &self.hosts {
            let text = std::fs::read_to_string(path)
                .map_err(|e| crate::UsageError(format!("--hosts {}: {e}", path.display())))?;
            cfg.pipeline.hosts = parse_hosts(&text);
        }
        cfg.cluster()
            .validate()
            .map_err(|e| crate::UsageError(format!("--processes/--process-id/--hosts: {e}")))
    }
}

/// The `host:port` lines of a hosts file.
pub fn parse_hosts(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Source flags of `run` and `backfill`, added to (or, for Kafka and CDC, overriding) the
/// config's `[sources]`. With any of them and no `--config`, the job runs just these.
#[derive(Args, Debug, Clone, Default)]
pub struct SourceFlags {
    /// Price ticks (JSONL/.gz) read as history before the live sources; repeatable.
    #[arg(long, value_name = "FILE")]
    pub prices: Vec<PathBuf>,
    /// TVL updates read as history; repeatable.
    #[arg(long, value_name = "FILE")]
    pub tvl: Vec<PathBuf>,
    /// Transfers read as history; repeatable.
    #[arg(long, value_name = "FILE")]
    pub transfers: Vec<PathBuf>,
    /// Gas ticks read as history; repeatable.
    #[arg(long, value_name = "FILE")]
    pub gas: Vec<PathBuf>,
    /// Liquidations read as history; repeatable.
    #[arg(long, value_name = "FILE")]
    pub liquidations: Vec<PathBuf>,
    /// Protocols read first; repeatable.
    #[arg(long, value_name = "FILE")]
    pub protocols: Vec<PathBuf>,
    /// Alert rules read first; repeatable.
    #[arg(long, value_name = "FILE")]
    pub rules: Vec<PathBuf>,
    /// A file tailed as a live feed, `KIND=PATH` (e.g. `prices=/feeds/prices.jsonl`); repeatable.
    #[arg(long, value_name = "KIND=PATH")]
    pub follow: Vec<String>,
    /// A DynamoDB export read as history (local dir or `s3://bucket/prefix`); repeatable.
    #[arg(long, value_name = "DIR")]
    pub dynamodb_export: Vec<PathBuf>,
    /// Kafka bootstrap servers: consume the record topics (default topic names unless the
    /// config's `[sources.kafka]` names them).
    #[arg(long, value_name = "HOST:PORT,..")]
    pub kafka_brokers: Option<String>,
    /// Kafka consumer group [default: llamaflow].
    #[arg(long)]
    pub kafka_group: Option<String>,
    /// Postgres CDC of alert_rules, protocols and api_keys from this database.
    #[arg(long, value_name = "URL")]
    pub cdc_url: Option<String>,
}

impl SourceFlags {
    /// Whether any source was given.
    pub fn any(&self) -> bool {
        !(self.prices.is_empty()
            && self.tvl.is_empty()
            && self.transfers.is_empty()
            && self.gas.is_empty()
            && self.liquidations.is_empty()
            && self.protocols.is_empty()
            && self.rules.is_empty()
            && self.follow.is_empty()
            && self.dynamodb_export.is_empty()
            && self.kafka_brokers.is_none()
            && self.kafka_group.is_none()
            && self.cdc_url.is_none())
    }

    /// Adds these sources to `cfg`.
    pub fn apply(&self, cfg: &mut Config) -> Result<(), crate::UsageError> {
        let history = [
            ("prices", &self.prices),
            ("tvl", &self.tvl),
            ("transfers", &self.transfers),
            ("gas", &self.gas),
            ("liquidations", &self.liquidations),
            ("protocols", &self.protocols),
            ("rules", &self.rules),
        ];
        for (kind, paths) in history {
            for path in paths {
                cfg.sources.files.push(FileEntry {
                    kind: kind.into(),
                    path: path.clone(),
                    follow: false,
                    start_offset: 0,
                });
            }
        }
        for f in &self.follow {
            let (kind, path) = f
                .split_once('=')
                .filter(|(k, p)| Kind::parse(k).is_some() && !p.is_empty())
                .ok_or_else(|| {
                    crate::UsageError(format!(
                        "--follow {f}: expected KIND=PATH with KIND one of prices, tvl, transfers, gas, \
                         liquidations, protocols, rules"
                    ))
                })?;
            cfg.sources.files.push(FileEntry {
                kind: kind.into(),
                path: path.into(),
                follow: true,
                start_offset: 0,
            });
        }
        cfg.sources.dynamodb_export.extend(self.dynamodb_export.iter().cloned());
        if self.kafka_brokers.is_some() || self.kafka_group.is_some() {
            let k = cfg.sources.kafka.get_or_insert_with(Default::default);
            if let Some(b) = &self.kafka_brokers {
                k.brokers = b.clone();
            }
            if let Some(g) = &self.kafka_group {
                k.group_id = g.clone();
            }
        }
        if let Some(url) = &self.cdc_url {
            cfg.sources.postgres_cdc.get_or_insert_with(Default::default).url = Some(url.clone());
        }
        Ok(())
    }
}

/// The embedded default configuration.
pub fn embedded(args: &RunArgs) -> Config {
    let mut cfg = Config::default();
    // The bundled feed has no positions to resume from: nothing to checkpoint.
    cfg.pipeline.checkpoint_dir = None;
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
        None if args.sources.any() => Config::default(),
        None => embedded(&args),
    };
    args.sources.apply(&mut cfg)?;
    if let Some(l) = args.listen {
        cfg.pipeline.listen = Some(l);
    }
    if let Some(w) = args.workers {
        cfg.pipeline.workers = w;
    }
    args.cluster.apply(&mut cfg)?;
    crate::live::run(cfg, args.duration_secs.map(Duration::from_secs))
}

/// Flags of `llamaflow backfill`.
#[derive(Args, Debug, Clone)]
pub struct BackfillArgs {
    /// Configuration file: sinks, live sources, checkpoints.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// History and live sources (added to the config's).
    #[command(flatten)]
    pub sources: SourceFlags,
    /// Also replay Kafka from this time (unix ms or RFC 3339, e.g. 2024-06-01T00:00:00Z): each
    /// partition starts at its first message at or after it, then goes on live.
    #[arg(long, value_name = "TIME")]
    pub kafka_from: Option<String>,
    /// Dataflow worker threads (overrides the config).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: Option<u32>,
    /// Stop after this many seconds (default: keep running live until Ctrl-C / SIGTERM).
    #[arg(long)]
    pub duration_secs: Option<u64>,
    /// Scale-out over several processes (override the config).
    #[command(flatten)]
    pub cluster: ClusterFlags,
}

/// `llamaflow backfill`: history through the dataflow into the configured sinks as fast as it
/// reads (progress on stderr), then the live sources from exactly where history ends.
pub fn backfill(args: BackfillArgs) -> Result<()> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    args.sources.apply(&mut cfg)?;
    if let Some(w) = args.workers {
        cfg.pipeline.workers = w;
    }
    args.cluster.apply(&mut cfg)?;
    if let Some(t) = &args.kafka_from {
        let ms = schemas::time::parse_time_ms(t)
            .ok_or_else(|| crate::UsageError(format!("--kafka-from {t}: expected unix ms or RFC 3339")))?;
        cfg.sources
            .kafka
            .as_mut()
            .ok_or_else(|| {
                crate::UsageError("--kafka-from needs a Kafka source (--kafka-brokers or [sources.kafka])".into())
            })?
            .start_from_timestamp_ms = Some(ms);
    }
    // Only process 0 reads history; the others take part with their Kafka partitions.
    if cfg.pipeline.process_id == 0
        && cfg.sources.files.iter().all(|f| f.follow)
        && cfg.sources.dynamodb_export.is_empty()
        && args.kafka_from.is_none()
    {
        return Err(crate::UsageError(
            "backfill needs history: --prices/--tvl/... files, --dynamodb-export, or --kafka-from".into(),
        )
        .into());
    }
    crate::live::run(cfg, args.duration_secs.map(Duration::from_secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_files_skip_blanks_and_comments() {
        let hosts = parse_hosts("# cluster\n10.0.0.1:2101\n\n  10.0.0.2:2101  # second\n");
        assert_eq!(hosts, vec!["10.0.0.1:2101", "10.0.0.2:2101"]);
    }
}
