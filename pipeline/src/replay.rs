//! `llamaflow replay`: a deterministic batch run over files and DynamoDB exports (SPEC §4).
//!
//! Inputs are merged by event time (ties: rules, protocols, prices, tvl, gas, liquidations,
//! transfers, then flag order), the way live feeds interleave; within one input the file
//! order is kept, so a record older than its key's newest is `late`. Batches (epochs) are
//! never cut between records with equal timestamps.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use operators::OpConfig;
use schemas::{Alert, DeadLetter, Event, Kind, Millis};
use sinks::jsonl::JsonlWriter;
use sources::Input;

use crate::UsageError;
use crate::engine::{Engine, Output};

/// Flags of `llamaflow replay`.
#[derive(Args, Debug, Clone)]
pub struct ReplayArgs {
    /// Price ticks (JSONL or JSONL.gz); repeatable.
    #[arg(long = "prices", value_name = "F")]
    pub prices: Vec<PathBuf>,
    /// TVL records; repeatable.
    #[arg(long = "tvl", value_name = "F")]
    pub tvl: Vec<PathBuf>,
    /// Transfers; repeatable.
    #[arg(long = "transfers", value_name = "F")]
    pub transfers: Vec<PathBuf>,
    /// Gas ticks; repeatable.
    #[arg(long = "gas", value_name = "F")]
    pub gas: Vec<PathBuf>,
    /// Liquidations; repeatable.
    #[arg(long = "liquidations", value_name = "F")]
    pub liquidations: Vec<PathBuf>,
    /// Protocol metadata; repeatable.
    #[arg(long = "protocols", value_name = "F")]
    pub protocols: Vec<PathBuf>,
    /// Alert rules: the rule set from the start; repeatable.
    #[arg(long = "rules", value_name = "F")]
    pub rules: Vec<PathBuf>,
    /// A DynamoDB export: a prefix directory holding AWSDynamoDB/, one export's directory, or
    /// `s3://bucket/prefix`.
    #[arg(long = "dynamodb-export", value_name = "DIR")]
    pub dynamodb_export: Vec<PathBuf>,
    /// Endpoint of an S3-compatible service for `s3://` exports (default: AWS).
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Where to write alerts (JSONL).
    #[arg(long = "alerts-out", value_name = "F")]
    pub alerts_out: PathBuf,
    /// Where to write market events (JSONL); without it no events are computed.
    #[arg(long = "events-out", value_name = "F")]
    pub events_out: Option<PathBuf>,
    /// Where to write dead letters (JSONL); default: standard error.
    #[arg(long = "dead-letter-out", value_name = "F")]
    pub dead_letter_out: Option<PathBuf>,
    /// Dataflow worker threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
    /// Records per ingest batch (epoch).
    #[arg(long, default_value_t = 8192, hide = true)]
    pub batch_size: usize,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub quiet: bool,
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Valid records read.
    pub records_in: u64,
    /// Alerts written.
    pub alerts_out: u64,
    /// Events written.
    pub events_out: u64,
    /// Dead letters written (invalid and late).
    pub dead_letters: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Peak resident memory in KiB (Linux), when known.
    pub peak_rss_kib: Option<u64>,
}

impl Summary {
    /// The one-line summary printed at the end.
    pub fn line(&self) -> String {
        let rate = if self.seconds > 0.0 {
            self.records_in as f64 / self.seconds
        } else {
            0.0
        };
        let rss = self
            .peak_rss_kib
            .map(|k| format!(", peak RSS {:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_default();
        format!(
            "replay: {} records in, {} alerts out, {} events out, {} dead letters, {:.0} records/s ({:.2} s{rss})",
            self.records_in, self.alerts_out, self.events_out, self.dead_letters, rate, self.seconds
        )
    }
}

/// Writes the dataflow's outputs to JSONL files.
struct FileOutput {
    alerts: Mutex<JsonlWriter>,
    events: Option<Mutex<JsonlWriter>>,
    dead: Mutex<JsonlWriter>,
    counts: [AtomicU64; 3],
    error: Mutex<Option<String>>,
}

impl FileOutput {
    fn write_all<T: serde::Serialize>(&self, w: &Mutex<JsonlWriter>, items: &[T], counter: usize) {
        let Ok(mut w) = w.lock() else { return };
        for item in items {
            if let Err(e) = w.write(item) {
                if let Ok(mut slot) = self.error.lock() {
                    slot.get_or_insert(e.to_string());
                }
                return;
            }
        }
        self.counts[counter].fetch_add(items.len() as u64, Ordering::Relaxed);
    }
}

impl Output for FileOutput {
    fn alerts(&self, _epoch: u64, alerts: &[Alert]) {
        self.write_all(&self.alerts, alerts, 0);
    }
    fn events(&self, _epoch: u64, events: &[Event]) {
        if let Some(w) = &self.events {
            self.write_all(w, events, 1);
        }
    }
    fn dead(&self, _epoch: u64, dead: &[DeadLetter]) {
        self.write_all(&self.dead, dead, 2);
    }
}

/// Order of record kinds among equal timestamps.
fn rank(kind: Kind) -> u8 {
    Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0) as u8
}

/// A history input: records (or dead letters) in file order.
pub type Source = Box<dyn Iterator<Item = Input> + Send>;

/// K-way merge of sources by (event time, kind rank, source index).
pub struct Merge {
    sources: Vec<Source>,
    heads: Vec<Option<Input>>,
    heap: BinaryHeap<Reverse<(Millis, u8, usize)>>,
}

impl Merge {
    /// Merges `sources`; equal keys keep source order.
    pub fn new(sources: Vec<Source>) -> Self {
        let mut m = Merge {
            heads: (0..sources.len()).map(|_| None).collect(),
            sources,
            heap: BinaryHeap::new(),
        };
        for i in 0..m.sources.len() {
            m.refill(i);
        }
        m
    }

    fn refill(&mut self, i: usize) {
        if let Some(item) = self.sources[i].next() {
            let key = match &item {
                Input::Record(_, r) => (r.timestamp(), rank(r.kind())),
                Input::Dead(_) => (Millis::MIN, 0),
            };
            self.heads[i] = Some(item);
            self.heap.push(Reverse((key.0, key.1, i)));
        }
    }
}

impl Iterator for Merge {
    type Item = Input;
    fn next(&mut self) -> Option<Input> {
        let Reverse((_, _, i)) = self.heap.pop()?;
        let item = self.heads[i].take();
        self.refill(i);
        item
    }
}

fn open_sources(args: &ReplayArgs) -> Result<Vec<Source>, UsageError> {
    let mut out: Vec<Source> = Vec::new();
    let groups = [
        (Kind::Rule, &args.rules),
        (Kind::Protocol, &args.protocols),
        (Kind::Price, &args.prices),
        (Kind::Tvl, &args.tvl),
        (Kind::Gas, &args.gas),
        (Kind::Liquidation, &args.liquidations),
        (Kind::Transfer, &args.transfers),
    ];
    for (kind, paths) in groups {
        for p in paths {
            let src = sources::files::open(p, kind).map_err(|e| UsageError(format!("--{}: {e}", flag_name(kind))))?;
            out.push(Box::new(src));
        }
    }
    if !args.dynamodb_export.is_empty() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| UsageError(format!("cannot start the runtime: {e}")))?;
        let s3 = sources::dynamodb_export::s3::S3Config {
            endpoint_url: args.s3_endpoint.clone(),
            ..Default::default()
        };
        for dir in &args.dynamodb_export {
            let src = rt
                .block_on(open_export(dir, &s3))
                .map_err(|e| UsageError(format!("--dynamodb-export: {e:#}")))?;
            out.push(src);
        }
    }
    if out.is_empty() {
        return Err(UsageError(
            "no inputs: give at least one of --prices, --tvl, --transfers, --gas, --liquidations, --protocols, --rules, --dynamodb-export".into(),
        ));
    }
    Ok(out)
}

/// Opens a DynamoDB export: a local directory, or `s3://bucket/prefix` (downloaded, then read
/// like a local one).
pub async fn open_export(dir: &std::path::Path, s3: &sources::dynamodb_export::s3::S3Config) -> Result<Source> {
    if let Some(url) = dir.to_str().filter(|d| d.starts_with("s3://")) {
        let loc = sources::dynamodb_export::s3::S3Location::parse(url).map_err(|e| UsageError(e.to_string()))?;
        let src = sources::dynamodb_export::s3::open_s3(&loc, s3).await?;
        return Ok(Box::new(src));
    }
    Ok(Box::new(
        sources::dynamodb_export::open(dir).map_err(|e| UsageError(e.to_string()))?,
    ))
}

fn flag_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Price => "prices",
        Kind::Tvl => "tvl",
        Kind::Transfer => "transfers",
        Kind::Gas => "gas",
        Kind::Liquidation => "liquidations",
        Kind::Protocol => "protocols",
        Kind::Rule => "rules",
    }
}

/// Peak resident set size of this process in KiB (Linux `VmHWM`).
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs a replay to completion.
pub fn replay(args: &ReplayArgs) -> Result<Summary> {
    let started = Instant::now();
    let sources = open_sources(args)?;
    let create = |p: &PathBuf, flag: &str| JsonlWriter::create(p).map_err(|e| UsageError(format!("--{flag}: {e}")));
    let output = Arc::new(FileOutput {
        alerts: Mutex::new(create(&args.alerts_out, "alerts-out")?),
        events: match &args.events_out {
            Some(p) => Some(Mutex::new(create(p, "events-out")?)),
            None => None,
        },
        dead: Mutex::new(match &args.dead_letter_out {
            Some(p) => create(p, "dead-letter-out")?,
            None => JsonlWriter::stderr(),
        }),
        counts: Default::default(),
        error: Mutex::new(None),
    });
    let cfg = OpConfig {
        emit_events: args.events_out.is_some(),
        ..OpConfig::default()
    };
    let mut engine = Engine::start(args.workers as usize, cfg, output.clone(), Default::default())?;

    let progress = if !args.quiet && std::io::stderr().is_terminal() {
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        Some(pb)
    } else {
        None
    };

    let mut records_in = 0u64;
    let mut batch = Vec::with_capacity(args.batch_size + 16);
    let mut source_dead = Vec::new();
    let mut last_ts = Millis::MIN;
    for item in Merge::new(sources) {
        match item {
            Input::Dead(d) => {
                source_dead.push(d);
                if source_dead.len() >= 1024 {
                    output.dead(0, &source_dead);
                    source_dead.clear();
                }
            }
            Input::Record(pos, rec) => {
                let ts = rec.timestamp();
                if batch.len() >= args.batch_size && ts != last_ts {
                    engine.send(std::mem::take(&mut batch))?;
                    if let Some(pb) = &progress {
                        let rate = records_in as f64 / started.elapsed().as_secs_f64().max(1e-9);
                        pb.set_message(format!(
                            "{records_in} records · {rate:.0} records/s · {} alerts",
                            output.counts[0].load(Ordering::Relaxed)
                        ));
                        pb.tick();
                    }
                }
                last_ts = ts;
                records_in += 1;
                engine.sequencer().push(pos, rec, &mut batch);
            }
        }
    }
    output.dead(0, &source_dead);
    if !batch.is_empty() {
        engine.send(batch)?;
    }
    engine.finish()?;
    if let Some(pb) = progress {
        pb.finish_and_clear();
    }
    let output =
        Arc::try_unwrap(output).map_err(|_| anyhow::anyhow!("outputs still in use after the dataflow stopped"))?;
    if let Some(e) = output.error.lock().ok().and_then(|mut e| e.take()) {
        anyhow::bail!(e);
    }
    output
        .alerts
        .into_inner()
        .map_err(|_| anyhow::anyhow!("alert writer poisoned"))?
        .finish()?;
    if let Some(w) = output.events {
        w.into_inner()
            .map_err(|_| anyhow::anyhow!("event writer poisoned"))?
            .finish()?;
    }
    output
        .dead
        .into_inner()
        .map_err(|_| anyhow::anyhow!("dead-letter writer poisoned"))?
        .finish()?;
    Ok(Summary {
        records_in,
        alerts_out: output.counts[0].load(Ordering::Relaxed),
        events_out: output.counts[1].load(Ordering::Relaxed),
        dead_letters: output.counts[2].load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_kib: peak_rss_kib(),
    })
}
