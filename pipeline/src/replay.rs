//! `llamaflow replay`: a deterministic batch run over files and DynamoDB exports (SPEC §4).
//!
//! Inputs are merged by event time (ties: rules, protocols, prices, tvl, gas, liquidations,
//! transfers, then flag order), the way live feeds interleave; within one input the file
//! order is kept, so a record older than its key's newest is `late`. Batches (epochs) are
//! never cut between records with equal timestamps.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use operators::{Key, KeyHash, OpConfig};
use schemas::{DeadLetter, Kind, Millis, SourcePos};
use sinks::jsonl::JsonlWriter;
use sources::Input;

use crate::UsageError;
use crate::engine::{Engine, Output};
use crate::stage::{EpochGather, EpochOut, EpochWriter, STAGE_LAG, Stage};

/// The input flags shared by `llamaflow replay` and `llamaflow export`.
#[derive(Args, Debug, Clone, Default)]
pub struct InputArgs {
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
    /// Kafka brokers to read a time range of the record topics from (history, nothing committed).
    #[arg(long, value_name = "HOSTS")]
    pub kafka_brokers: Option<String>,
    /// Start of the Kafka range (message timestamps, inclusive): RFC 3339 or unix ms.
    #[arg(long, value_name = "TIME", value_parser = parse_time, requires = "kafka_brokers")]
    pub kafka_from: Option<i64>,
    /// End of the Kafka range (exclusive): RFC 3339 or unix ms [default: the end of each partition].
    #[arg(long, value_name = "TIME", value_parser = parse_time, requires = "kafka_brokers")]
    pub kafka_to: Option<i64>,
    /// Topic of a record kind, `KIND=TOPIC` (repeatable; defaults: prices, tvl, transfers, gas,
    /// liquidations; an empty topic drops the kind).
    #[arg(long = "kafka-topic", value_name = "KIND=TOPIC", requires = "kafka_brokers")]
    pub kafka_topic: Vec<String>,
    /// Longest input line (JSONL/.gz, DynamoDB export data files), in bytes: a longer line is
    /// a dead letter, never held in memory.
    #[arg(long, value_name = "BYTES", default_value_t = sources::DEFAULT_MAX_LINE_BYTES,
          value_parser = parse_max_line_bytes)]
    pub max_line_bytes: usize,
    /// Threads parsing the lines of the JSONL files (shared by all of them: one large file's
    /// parsing is spread over them) [default: one per core].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub parse_threads: Option<u32>,
}

fn parse_max_line_bytes(s: &str) -> Result<usize, String> {
    let max = crate::config::MAX_LINE_BYTES_LIMIT;
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("`{s}` is not a line length in bytes from 1 to {max}")),
    }
}

fn parse_time(s: &str) -> Result<i64, String> {
    schemas::parse_time_ms(s).ok_or_else(|| format!("`{s}` is neither RFC 3339 (2024-06-03T16:00:00Z) nor unix ms"))
}

/// Flags of `llamaflow replay`.
#[derive(Args, Debug, Clone)]
pub struct ReplayArgs {
    /// Inputs.
    #[command(flatten)]
    pub inputs: InputArgs,
    /// Where to write alerts (JSONL).
    #[arg(long = "alerts-out", value_name = "F")]
    pub alerts_out: PathBuf,
    /// Where to write market events (JSONL); without it no events are computed.
    #[arg(long = "events-out", value_name = "F")]
    pub events_out: Option<PathBuf>,
    /// Where to write dead letters (JSONL); default: standard error.
    #[arg(long = "dead-letter-out", value_name = "F")]
    pub dead_letter_out: Option<PathBuf>,
    /// Write the final live state (SPEC §8: protocols, chains, categories, prices) here as one
    /// JSON document; byte-identical for any `--workers`.
    #[arg(long = "state-out", value_name = "F")]
    pub state_out: Option<PathBuf>,
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

/// The replay's output stage, on its own thread: writes each completed epoch's alerts,
/// events and dead letters to their JSONL files and, with `--state-out`, applies the epoch
/// to a live view as the running job does (so the state file is what the read API would
/// answer).
struct ReplayFiles {
    alerts: JsonlWriter,
    events: Option<JsonlWriter>,
    dead: JsonlWriter,
    /// Alerts, events and dead letters written (read by the progress line).
    counts: Arc<[AtomicU64; 3]>,
    view: Option<view::LiveView>,
}

/// Writes `items` to `w` and counts them.
fn write_all<T: serde::Serialize>(w: &mut JsonlWriter, items: &[T], count: &AtomicU64) -> Result<(), String> {
    for item in items {
        w.write(item).map_err(|e| e.to_string())?;
    }
    count.fetch_add(items.len() as u64, Ordering::Relaxed);
    Ok(())
}

impl EpochWriter for ReplayFiles {
    type Done = Option<view::LiveView>;

    fn epoch(&mut self, epoch: u64, out: EpochOut) -> Result<(), String> {
        let EpochOut { view: out, dead } = out;
        write_all(&mut self.alerts, &out.alerts, &self.counts[0])?;
        if let Some(w) = &mut self.events {
            write_all(w, &out.events, &self.counts[1])?;
        }
        write_all(&mut self.dead, &dead, &self.counts[2])?;
        if let Some(v) = &self.view {
            v.apply(epoch + 1, &out);
        }
        Ok(())
    }

    fn finish(self) -> Result<Self::Done, String> {
        let finish = |w: JsonlWriter| w.finish().map(|_| ()).map_err(|e| e.to_string());
        finish(self.alerts)?;
        if let Some(w) = self.events {
            finish(w)?;
        }
        finish(self.dead)?;
        Ok(self.view)
    }
}

/// Order of record kinds among equal timestamps.
fn rank(kind: Kind) -> u8 {
    Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0) as u8
}

/// A history input: records (or dead letters) in file order.
pub enum Source {
    /// A JSONL file: its lines are read on one thread and parsed on the shared parse threads
    /// ([`Merge`]), so one large file's parsing is spread over the cores.
    File(sources::files::FileSource),
    /// Any other input (a DynamoDB export, a Kafka range): read and parsed on one thread.
    Other(Box<dyn Iterator<Item = Input> + Send>),
}

/// An input being read: items in file order.
type Stream = Box<dyn Iterator<Item = Input> + Send>;

/// K-way merge of sources by (event time, kind rank, source index).
pub struct Merge {
    sources: Vec<Stream>,
    heads: Vec<Option<Input>>,
    heap: BinaryHeap<Reverse<(Millis, u8, usize)>>,
}

/// Items a prefetching source hands over at once.
const PREFETCH_CHUNK: usize = 1024;

/// Blocks of lines a file's reader runs ahead of its consumer (read, being parsed, parsed).
const READ_AHEAD: usize = 8;

/// Reads and parses `src` on its own thread, a few chunks ahead of the consumer: with several
/// sources (and the dataflow's workers) the parsing runs in parallel. Order is kept.
fn prefetch(mut src: Stream) -> Stream {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Input>>(4);
    // Failing to start a thread is a broken machine, not bad input: fail loudly.
    std::thread::Builder::new()
        .name("read".into())
        .spawn(move || {
            loop {
                let chunk: Vec<Input> = src.by_ref().take(PREFETCH_CHUNK).collect();
                let last = chunk.len() < PREFETCH_CHUNK;
                if tx.send(chunk).is_err() || last {
                    break;
                }
            }
        })
        .expect("cannot start a reader thread");
    Box::new(rx.into_iter().flatten())
}

/// A block of lines to parse, and where its records go.
type ParseJob = (sources::files::Lines, std::sync::mpsc::SyncSender<Vec<Input>>);

/// Threads that parse blocks of lines for every file of a [`Merge`] (one per core): the
/// parsing of one file is spread over them.
struct ParsePool {
    jobs: std::sync::mpsc::Sender<ParseJob>,
}

impl ParsePool {
    /// Starts `threads` parse threads; they end when every file's reader has ended.
    fn start(threads: usize) -> ParsePool {
        let (jobs, rx) = std::sync::mpsc::channel::<ParseJob>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name("parse".into())
                .spawn(move || {
                    loop {
                        // The lock is held only to take a job (one per block of lines).
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok((lines, done)) = job else { return };
                        // The consumer may have stopped early: nothing to hand over then.
                        let _ = done.send(lines.parse());
                    }
                })
                .expect("cannot start a parse thread");
        }
        ParsePool { jobs }
    }

    /// Reads `file` on its own thread, a few blocks ahead; its blocks are parsed on the pool
    /// and handed out in file order.
    fn read(&self, mut file: sources::files::FileSource) -> Stream {
        let jobs = self.jobs.clone();
        // In file order: each block's own channel, on which its records arrive once parsed.
        let (order, blocks) = std::sync::mpsc::sync_channel::<std::sync::mpsc::Receiver<Vec<Input>>>(READ_AHEAD);
        std::thread::Builder::new()
            .name("read".into())
            .spawn(move || {
                while let Some(lines) = file.read_lines() {
                    let (done, parsed) = std::sync::mpsc::sync_channel(1);
                    if order.send(parsed).is_err() || jobs.send((lines, done)).is_err() {
                        break;
                    }
                }
            })
            .expect("cannot start a reader thread");
        Box::new(Parsed {
            blocks,
            current: Vec::new().into_iter(),
        })
    }
}

/// Items a [`Parsed`] loads into the cache before they are taken.
const PARSED_AHEAD: usize = 8;

/// The items of a file's parsed blocks, in file order. They were written on a parse thread's
/// core: each is loaded into this core's cache a few items before it is taken.
struct Parsed {
    blocks: std::sync::mpsc::Receiver<std::sync::mpsc::Receiver<Vec<Input>>>,
    current: std::vec::IntoIter<Input>,
}

impl Iterator for Parsed {
    type Item = Input;
    fn next(&mut self) -> Option<Input> {
        loop {
            if let Some(item) = self.current.next() {
                let ahead = self.current.as_slice();
                if let Some(far) = ahead.get(PARSED_AHEAD) {
                    operators::prefetch_value(far);
                }
                // Then, once it has arrived, the name of its key, which the merge hashes first.
                if let Some(Input::Record(_, r)) = ahead.get(PARSED_AHEAD / 2)
                    && let Some(Key::Coin(name) | Key::Protocol(name) | Key::Chain(name)) = operators::record_key(r)
                {
                    operators::prefetch(name.as_ptr());
                }
                return Some(item);
            }
            // A parse thread sends every block it takes; none arriving means one died.
            let parsed = self.blocks.recv().ok()?;
            self.current = parsed
                .recv()
                .expect("a parse thread stopped: its block of lines was not parsed")
                .into_iter();
        }
    }
}

/// Parse threads for the files of a merge by default: one per core.
fn default_parse_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Merge {
    /// Merges `sources`, each read ahead on its own thread (files parsed on `parse_threads`
    /// threads shared by them); equal keys keep source order.
    pub fn new(sources: Vec<Source>, parse_threads: usize) -> Self {
        // Started with the first file; its threads end with the last file's reader.
        let mut pool: Option<ParsePool> = None;
        let sources: Vec<Stream> = sources
            .into_iter()
            .map(|s| match s {
                Source::File(f) => pool
                    .get_or_insert_with(|| ParsePool::start(parse_threads.max(1)))
                    .read(f),
                Source::Other(s) => prefetch(s),
            })
            .collect();
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
            self.heap.push(Reverse(order(&item, i)));
            self.heads[i] = Some(item);
        }
    }
}

/// Where an item of source `i` goes in a [`Merge`]: dead letters first, records by (event
/// time, kind rank), then source.
fn order(item: &Input, i: usize) -> (Millis, u8, usize) {
    match item {
        Input::Record(_, r) => (r.timestamp(), rank(r.kind()), i),
        Input::Dead(_) => (Millis::MIN, 0, i),
    }
}

impl Iterator for Merge {
    type Item = Input;
    fn next(&mut self) -> Option<Input> {
        let mut top = self.heap.peek_mut()?;
        let i = top.0.2;
        let item = self.heads[i].take();
        match self.sources[i].next() {
            // The source's next item takes its place at the top, then sinks to its rank: one
            // pass down the heap rather than a pop and a push.
            Some(next) => {
                *top = Reverse(order(&next, i));
                self.heads[i] = Some(next);
            }
            None => {
                std::collections::binary_heap::PeekMut::pop(top);
            }
        }
        item
    }
}

/// The opened inputs of a batch run: history sources, and the status of a Kafka range read.
pub struct Inputs {
    /// Sources to merge by event time.
    pub sources: Vec<Source>,
    /// Threads parsing the files' lines.
    pub parse_threads: usize,
    kafka: Option<Arc<sources::kafka::range::RangeStatus>>,
}

impl Inputs {
    /// Inputs made of already opened sources (files parsed on one thread per core).
    pub fn from_sources(sources: Vec<Source>) -> Inputs {
        Inputs {
            sources,
            parse_threads: default_parse_threads(),
            kafka: None,
        }
    }

    /// `Err` when a Kafka range could not be read to its end (call after draining).
    pub fn check(&self) -> Result<()> {
        if let Some(k) = &self.kafka {
            k.result()?;
        }
        Ok(())
    }
}

/// Opens every input of `args`: files, DynamoDB exports and a Kafka time range.
pub fn open_inputs(args: &InputArgs) -> Result<Inputs> {
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
            let src = sources::files::open(p, kind, args.max_line_bytes)
                .map_err(|e| UsageError(format!("--{}: {e}", flag_name(kind))))?;
            out.push(Source::File(src));
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
                .block_on(open_export(dir, &s3, args.max_line_bytes))
                .map_err(|e| UsageError(format!("--dynamodb-export: {e:#}")))?;
            out.push(src);
        }
    }
    let mut kafka = None;
    if let Some(brokers) = &args.kafka_brokers {
        let mut cfg = sources::kafka::range::KafkaRangeConfig::new(brokers.clone(), args.kafka_from, args.kafka_to);
        for t in &args.kafka_topic {
            let (kind, topic) = t
                .split_once('=')
                .and_then(|(k, v)| Some((Kind::parse(k.trim())?, v.trim())))
                .ok_or_else(|| {
                    UsageError(format!(
                        "--kafka-topic `{t}`: expected KIND=TOPIC, e.g. prices=defillama-prices"
                    ))
                })?;
            if topic.is_empty() {
                cfg.topics.remove(&kind);
            } else {
                cfg.topics.insert(kind, topic.to_string());
            }
        }
        if let (Some(f), Some(t)) = (args.kafka_from, args.kafka_to)
            && f >= t
        {
            return Err(UsageError(format!("--kafka-from ({f} ms) must be before --kafka-to ({t} ms)")).into());
        }
        let range = sources::kafka::range::open_range(&cfg)?;
        tracing::info!(
            "kafka range: {} partitions, {} messages in range",
            range.partitions.len(),
            range.partitions.iter().map(|p| p.end - p.start).sum::<i64>()
        );
        out.extend(range.sources.into_iter().map(|s| Source::Other(Box::new(s))));
        kafka = Some(range.status);
    }
    if out.is_empty() && kafka.is_none() {
        return Err(UsageError(
            "no inputs: give at least one of --prices, --tvl, --transfers, --gas, --liquidations, --protocols, --rules, --dynamodb-export, --kafka-brokers".into(),
        )
        .into());
    }
    Ok(Inputs {
        sources: out,
        parse_threads: args.parse_threads.map_or_else(default_parse_threads, |n| n as usize),
        kafka,
    })
}

/// What [`feed`] hands to its callbacks.
pub trait Feed {
    /// Every valid record, before it enters the dataflow.
    fn record(&mut self, _rec: &schemas::Record) -> Result<()> {
        Ok(())
    }
    /// Dead letters of the sources (bad input), in batches, with the epoch they belong to
    /// (the one being filled; 0 without an engine).
    fn dead(&mut self, epoch: u64, dead: Vec<DeadLetter>);
    /// After each epoch sent, with the records read so far. A feed may wait here for its
    /// output stage (backpressure); `Err` stops the run.
    fn progress(&mut self, _records_in: u64) -> Result<()> {
        Ok(())
    }
}

/// One hour of event time, in ms: epochs of history never span an hour boundary.
const EPOCH_SPAN: Millis = 3_600_000;

/// Items [`feed`] holds ahead of the sequencer (see there).
const LOOKAHEAD: usize = 16;
/// How many items before its push a record's key entry is loaded (its slot was loaded
/// `LOOKAHEAD` items before).
const HINT_NEAR: usize = 8;

/// Merges `inputs` by event time and feeds them to `engine` in epochs of at most about
/// `batch_size` records that never span a UTC hour of event time (so the live aggregates have
/// hourly resolution over history) and are never cut between equal timestamps (the records of
/// one protocol with one timestamp are one update, SPEC §2); without an engine only `feed`
/// sees them. Returns the valid records read. `replay`, `export` and the history of `run` /
/// `backfill` all go through here.
pub fn feed(
    mut inputs: Inputs,
    mut engine: Option<&mut Engine>,
    batch_size: usize,
    feed: &mut dyn Feed,
) -> Result<u64> {
    let mut records_in = 0u64;
    // Envelopes are put in their worker's batch as they are stamped.
    let mut batch = engine
        .as_deref()
        .map_or_else(|| operators::ByWorker::new(1, 0), |e| e.batch(batch_size));
    let mut source_dead = Vec::new();
    let mut last_ts = Millis::MIN;
    let mut since_progress = 0usize;
    let mut merge = Merge::new(std::mem::take(&mut inputs.sources), inputs.parse_threads);
    // Items held between the merge and the sequencer, so that each record's key is in the
    // cache by its push: its key is hashed once and its slot loaded as it enters, its entry
    // `HINT_NEAR` items before its push.
    let mut ahead: VecDeque<(Input, Option<KeyHash>)> = VecDeque::with_capacity(LOOKAHEAD);
    loop {
        while ahead.len() < LOOKAHEAD
            && let Some(item) = merge.next()
        {
            let hint = match (engine.as_deref_mut(), &item) {
                (Some(engine), Input::Record(_, rec)) => engine.sequencer().hint(rec),
                _ => None,
            };
            ahead.push_back((item, hint));
        }
        if let (Some(engine), Some((_, Some(hint)))) = (engine.as_deref_mut(), ahead.get(HINT_NEAR)) {
            engine.sequencer().prefetch(*hint);
        }
        let Some((item, hint)) = ahead.pop_front() else { break };
        match item {
            Input::Dead(d) => {
                source_dead.push(d);
                if source_dead.len() >= 1024 {
                    let dead = std::mem::take(&mut source_dead);
                    feed.dead(engine.as_deref().map_or(0, Engine::epochs), dead);
                }
            }
            Input::Record(pos, rec) => {
                let ts = rec.timestamp();
                feed.record(&rec)?;
                records_in += 1;
                match engine.as_deref_mut() {
                    Some(engine) => {
                        let new_hour = ts.div_euclid(EPOCH_SPAN) != last_ts.div_euclid(EPOCH_SPAN);
                        if !batch.is_empty() && ts != last_ts && (batch.len() >= batch_size || new_hour) {
                            // Full-size buffers for the next epoch: no regrowing per epoch.
                            let next = engine.batch(batch_size);
                            engine.send_batch(std::mem::replace(&mut batch, next))?;
                            feed.progress(records_in)?;
                        }
                        engine.sequencer().push_hinted(pos, rec, hint, &mut batch);
                    }
                    None => {
                        since_progress += 1;
                        if since_progress >= batch_size {
                            since_progress = 0;
                            feed.progress(records_in)?;
                        }
                    }
                }
                last_ts = ts;
            }
        }
    }
    if !source_dead.is_empty() {
        feed.dead(engine.as_deref().map_or(0, Engine::epochs), source_dead);
    }
    if let Some(engine) = engine {
        // The end of the input closes the TVL updates it opened (SPEC §2: the total once,
        // after all of an update's records).
        if records_in > 0 {
            engine
                .sequencer()
                .close_updates(SourcePos::new("end of input".into(), 0), &mut batch);
        }
        if !batch.is_empty() {
            engine.send_batch(batch)?;
        }
    }
    inputs.check()?;
    Ok(records_in)
}

/// Opens a DynamoDB export: a local directory, or `s3://bucket/prefix` (downloaded, then read
/// like a local one).
pub async fn open_export(
    dir: &std::path::Path,
    s3: &sources::dynamodb_export::s3::S3Config,
    max_line_bytes: usize,
) -> Result<Source> {
    use sources::dynamodb_export::{self as export, ExportOptions};
    let opts = ExportOptions {
        max_line_bytes,
        ..ExportOptions::default()
    };
    if let Some(url) = dir.to_str().filter(|d| d.starts_with("s3://")) {
        let loc = export::s3::S3Location::parse(url).map_err(|e| UsageError(e.to_string()))?;
        let src = export::s3::open_s3(&loc, s3, &opts).await?;
        return Ok(Source::Other(Box::new(src)));
    }
    Ok(Source::Other(Box::new(
        export::open_with(dir, &opts).map_err(|e| UsageError(e.to_string()))?,
    )))
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

/// The progress bar of a batch run: a spinner on a terminal, hidden otherwise or with `quiet`.
pub fn progress_bar(quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb
}

/// Replay's view of the ingest loop: the input's dead letters (they go with their epoch), the
/// progress line, and backpressure from the output stage.
struct ReplayFeed<'a> {
    output: &'a EpochGather,
    counts: &'a [AtomicU64; 3],
    progress: ProgressBar,
    started: Instant,
}

impl Feed for ReplayFeed<'_> {
    fn dead(&mut self, epoch: u64, dead: Vec<DeadLetter>) {
        self.output.dead(epoch, dead);
    }
    fn progress(&mut self, records_in: u64) -> Result<()> {
        self.output.wait_for_stage(STAGE_LAG).map_err(anyhow::Error::msg)?;
        if self.progress.is_hidden() {
            return Ok(());
        }
        let rate = records_in as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        self.progress.set_message(format!(
            "{records_in} records · {rate:.0} records/s · {} alerts",
            self.counts[0].load(Ordering::Relaxed)
        ));
        self.progress.tick();
        Ok(())
    }
}

/// Runs a replay to completion.
pub fn replay(args: &ReplayArgs) -> Result<Summary> {
    let started = Instant::now();
    let inputs = open_inputs(&args.inputs)?;
    let create = |p: &PathBuf, flag: &str| JsonlWriter::create(p).map_err(|e| UsageError(format!("--{flag}: {e}")));
    let counts: Arc<[AtomicU64; 3]> = Arc::default();
    let (output, stage) = Stage::start(ReplayFiles {
        alerts: create(&args.alerts_out, "alerts-out")?,
        events: match &args.events_out {
            Some(p) => Some(create(p, "events-out")?),
            None => None,
        },
        dead: match &args.dead_letter_out {
            Some(p) => create(p, "dead-letter-out")?,
            None => JsonlWriter::stderr(),
        },
        counts: counts.clone(),
        view: args.state_out.as_ref().map(|_| view::LiveView::default()),
    })
    .context("cannot start the output thread")?;
    // `--state-out` needs the market events (the view is built from them), not their file.
    let events = args.events_out.is_some() || args.state_out.is_some();
    let cfg = OpConfig {
        emit_events: events,
        live_state: events,
        ..OpConfig::default()
    };
    let mut engine = Engine::start(args.workers as usize, cfg, output.clone(), Default::default())?;
    let mut f = ReplayFeed {
        output: &output,
        counts: &counts,
        progress: progress_bar(args.quiet),
        started,
    };
    let records_in = feed(inputs, Some(&mut engine), args.batch_size, &mut f)?;
    engine.finish()?;
    f.progress.finish_and_clear();
    drop(f);
    // The input's last dead letters may belong to an epoch that was never sent.
    output.flush();
    drop(output);
    let view = stage.join()?;
    if let (Some(path), Some(view)) = (&args.state_out, view) {
        let doc = view.current().document();
        let mut text = serde_json::to_string(&doc).context("cannot encode the live state")?;
        text.push('\n');
        std::fs::write(path, text).map_err(|e| UsageError(format!("--state-out {}: {e}", path.display())))?;
    }
    Ok(Summary {
        records_in,
        alerts_out: counts[0].load(Ordering::Relaxed),
        events_out: counts[1].load(Ordering::Relaxed),
        dead_letters: counts[2].load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_kib: peak_rss_kib(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Files parsed on several threads come out of the merge exactly as parsed on one: the
    /// same items in the same order, each file in its line order, records by event time.
    #[test]
    fn parse_threads_keep_every_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for f in 0..3u64 {
            let mut body = String::new();
            for n in 0..5_000u64 {
                if n % 777 == f {
                    body.push_str("not json\n");
                }
                // Timestamps that tie across files, so the merge's tie-break shows.
                let ts = 1_717_000_000 + n / 3;
                body.push_str(&format!(
                    "{{\"coin\":\"coingecko:c{f}-{}\",\"price\":{},\"timestamp\":{ts}}}\n",
                    n % 50,
                    n + 1
                ));
            }
            let path = dir.path().join(format!("prices{f}.jsonl"));
            std::fs::write(&path, body).unwrap();
            paths.push(path);
        }
        let merged = |threads: usize| -> Vec<Input> {
            let sources = paths
                .iter()
                .map(|p| Source::File(sources::files::open(p, Kind::Price, sources::DEFAULT_MAX_LINE_BYTES).unwrap()))
                .collect();
            Merge::new(sources, threads).collect()
        };
        let one = merged(1);
        assert_eq!(one.len(), 3 * 5_000 + 3 * 7);
        for threads in [2, 3, 8] {
            assert!(merged(threads) == one, "{threads} parse threads merge like one");
        }
        // Each file's lines in order, records by event time.
        let mut last_line: BTreeMap<String, u64> = BTreeMap::new();
        let mut last_ts = Millis::MIN;
        for item in &one {
            let (source, line) = match item {
                Input::Record(pos, r) => {
                    assert!(r.timestamp() >= last_ts, "by event time");
                    last_ts = r.timestamp();
                    (pos.source.to_string(), pos.offset)
                }
                Input::Dead(d) => {
                    let (s, n) = d.source.rsplit_once(':').unwrap();
                    (format!("{s}:"), n.parse().unwrap())
                }
            };
            let prev = last_line.insert(source, line).unwrap_or(0);
            assert!(line > prev, "line {line} after {prev}");
        }
    }
}
