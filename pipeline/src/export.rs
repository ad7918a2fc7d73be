//! `llamaflow export --parquet DIR` (SPEC §7): the inputs of a replay as a Parquet dataset.
//!
//! `prices` and `tvl` are the valid input records (files, DynamoDB exports, a Kafka time
//! range), written from the ingest loop; `events` and `alerts` come from running the same
//! dataflow as `replay` over them. Layout, columns and atomic file creation are
//! `sinks::parquet`'s: `<dir>/<kind>/date=YYYY-MM-DD/part-<run>-<n>.parquet`, one part per
//! kind and UTC date (event time; alerts by `triggered_at`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::ProgressBar;
use operators::OpConfig;
use schemas::{DeadLetter, Record};
use sinks::jsonl::JsonlWriter;
use sinks::parquet::{PartitionedWriter, Table, WriteStats, WriterOptions};

use crate::UsageError;
use crate::engine::{Engine, Output};
use crate::replay::{Feed, InputArgs, feed, open_inputs, peak_rss_kib, progress_bar};
use crate::stage::{EpochGather, EpochOut, EpochWriter, STAGE_LAG, Stage};

/// Flags of `llamaflow export`.
#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// Dataset directory: `<DIR>/<kind>/date=YYYY-MM-DD/part-*.parquet`.
    #[arg(long = "parquet", value_name = "DIR")]
    pub parquet: PathBuf,
    /// Inputs (the same flags as `replay`, plus a Kafka time range).
    #[command(flatten)]
    pub inputs: InputArgs,
    /// Kinds to write.
    #[arg(long, value_delimiter = ',', default_value = "prices,tvl,events,alerts", value_parser = parse_table)]
    pub kinds: Vec<Table>,
    /// Add part files to a directory that already holds an export (default: refuse, so a
    /// second run cannot silently double the rows).
    #[arg(long)]
    pub append: bool,
    /// Most rows per row group.
    #[arg(long, default_value_t = sinks::parquet::DEFAULT_ROW_GROUP_ROWS)]
    pub row_group_rows: usize,
    /// Where to write dead letters (JSONL); default: standard error.
    #[arg(long = "dead-letter-out", value_name = "F")]
    pub dead_letter_out: Option<PathBuf>,
    /// Dataflow worker threads (events and alerts).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
    /// Records per ingest batch (epoch).
    #[arg(long, default_value_t = 8192, hide = true)]
    pub batch_size: usize,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_table(s: &str) -> Result<Table, String> {
    Table::parse(s).ok_or_else(|| format!("unknown kind `{s}` (prices, tvl, events, alerts)"))
}

/// What an export did.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSummary {
    /// Valid records read.
    pub records_in: u64,
    /// Rows, files and bytes written.
    pub written: WriteStats,
    /// Dead letters (invalid input, and late records when the dataflow ran).
    pub dead_letters: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Peak resident memory in KiB (Linux), when known.
    pub peak_rss_kib: Option<u64>,
}

impl ExportSummary {
    /// The one-line summary printed at the end.
    pub fn line(&self) -> String {
        let w = &self.written;
        let mb = w.bytes as f64 / 1e6;
        let rate = if self.seconds > 0.0 { mb / self.seconds } else { 0.0 };
        let rss = self
            .peak_rss_kib
            .map(|k| format!(", peak RSS {:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_default();
        format!(
            "export: {} records in; rows: {} prices, {} tvl, {} events, {} alerts; {} files, {mb:.2} MB written in {:.2} s ({rate:.1} MB/s{rss}); {} dead letters",
            self.records_in,
            w.rows_of(Table::Prices),
            w.rows_of(Table::Tvl),
            w.rows_of(Table::Events),
            w.rows_of(Table::Alerts),
            w.files,
            self.seconds,
            self.dead_letters
        )
    }
}

/// The export's output stage, on its own thread: the dataflow's events and alerts into
/// Parquet, dead letters into JSONL.
struct ExportFiles {
    writer: PartitionedWriter,
    events: bool,
    alerts: bool,
    dead: JsonlWriter,
    dead_count: Arc<AtomicU64>,
    /// The writer's files and rows so far (read by the progress line).
    stats: Arc<Mutex<WriteStats>>,
}

impl EpochWriter for ExportFiles {
    type Done = WriteStats;

    fn epoch(&mut self, _epoch: u64, out: EpochOut) -> Result<(), String> {
        let err = |e: sinks::parquet::ParquetError| e.to_string();
        if self.alerts {
            for a in &out.view.alerts {
                self.writer.alert(a).map_err(err)?;
            }
        }
        if self.events {
            for e in &out.view.events {
                self.writer.event(e).map_err(err)?;
            }
        }
        for d in &out.dead {
            self.dead.write(d).map_err(|e| e.to_string())?;
        }
        self.dead_count.fetch_add(out.dead.len() as u64, Ordering::Relaxed);
        if let Ok(mut s) = self.stats.lock() {
            s.clone_from(self.writer.stats());
        }
        Ok(())
    }

    fn finish(mut self) -> Result<WriteStats, String> {
        self.writer
            .close_all()
            .map_err(|e| format!("writing events/alerts: {e}"))?;
        self.dead.finish().map_err(|e| e.to_string())?;
        Ok(self.writer.stats().clone())
    }
}

/// The ingest side: input prices and TVL into Parquet, dead letters of the input, progress.
struct ExportFeed<'a> {
    records: PartitionedWriter,
    prices: bool,
    tvl: bool,
    output: &'a EpochGather,
    /// Whether the dataflow runs (without it no epoch completes: dead letters go at once).
    dataflow: bool,
    stats: &'a Mutex<WriteStats>,
    progress: ProgressBar,
    started: Instant,
}

impl Feed for ExportFeed<'_> {
    fn record(&mut self, rec: &Record) -> Result<()> {
        match rec {
            Record::Price(p) if self.prices => self.records.price(p)?,
            Record::Tvl(t) if self.tvl => self.records.tvl(t)?,
            _ => {}
        }
        Ok(())
    }

    fn dead(&mut self, epoch: u64, dead: Vec<DeadLetter>) {
        self.output.dead(epoch, dead);
        if !self.dataflow {
            self.output.flush();
        }
    }

    fn progress(&mut self, records_in: u64) -> Result<()> {
        self.output.wait_for_stage(STAGE_LAG).map_err(anyhow::Error::msg)?;
        if self.progress.is_hidden() {
            return Ok(());
        }
        let mut stats = self.records.stats().clone();
        if let Ok(w) = self.stats.lock() {
            stats.add(&w);
        }
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        self.progress.set_message(format!(
            "{records_in} records ({:.0}/s) · {} rows · {} files, {:.1} MB",
            records_in as f64 / secs,
            stats.total_rows(),
            stats.files,
            stats.bytes as f64 / 1e6
        ));
        self.progress.tick();
        Ok(())
    }
}

/// Whether `dir/<kind>/` of any of `tables` already holds part files.
fn existing_export(dir: &Path, tables: &[Table]) -> Option<PathBuf> {
    for t in tables {
        let Ok(dates) = std::fs::read_dir(dir.join(t.name())) else {
            continue;
        };
        for d in dates.flatten() {
            let Ok(files) = std::fs::read_dir(d.path()) else {
                continue;
            };
            if files.flatten().any(|f| {
                f.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with("part-") && n.ends_with(".parquet"))
            }) {
                return Some(d.path());
            }
        }
    }
    None
}

/// Runs an export to completion.
pub fn export(args: &ExportArgs) -> Result<ExportSummary> {
    let started = Instant::now();
    let on = |t: Table| args.kinds.contains(&t);
    if args.row_group_rows == 0 {
        return Err(UsageError("--row-group-rows must be at least 1".into()).into());
    }
    if !args.append
        && let Some(found) = existing_export(&args.parquet, &args.kinds)
    {
        return Err(UsageError(format!(
            "--parquet: {} already holds an export ({}); choose a new directory or pass --append",
            args.parquet.display(),
            found.display()
        ))
        .into());
    }
    let inputs = open_inputs(&args.inputs)?;
    let opts = WriterOptions {
        row_group_rows: args.row_group_rows,
        ..WriterOptions::export(&args.parquet)
    };
    let new_writer =
        || PartitionedWriter::new(opts.clone()).map_err(|e| anyhow::Error::new(UsageError(format!("--parquet: {e}"))));
    let dead_count = Arc::new(AtomicU64::new(0));
    let stats = Arc::new(Mutex::new(WriteStats::default()));
    let (output, stage) = Stage::start(ExportFiles {
        writer: new_writer()?,
        events: on(Table::Events),
        alerts: on(Table::Alerts),
        dead: match &args.dead_letter_out {
            Some(p) => JsonlWriter::create(p).map_err(|e| UsageError(format!("--dead-letter-out: {e}")))?,
            None => JsonlWriter::stderr(),
        },
        dead_count: dead_count.clone(),
        stats: stats.clone(),
    })
    .context("cannot start the output thread")?;
    // The dataflow runs only when its outputs are wanted.
    let mut engine = if on(Table::Events) || on(Table::Alerts) {
        let cfg = OpConfig {
            emit_events: on(Table::Events),
            live_state: on(Table::Events),
            ..OpConfig::default()
        };
        Some(Engine::start(
            args.workers as usize,
            cfg,
            output.clone(),
            Default::default(),
        )?)
    } else {
        None
    };
    let mut f = ExportFeed {
        records: new_writer()?,
        prices: on(Table::Prices),
        tvl: on(Table::Tvl),
        output: &output,
        dataflow: engine.is_some(),
        stats: &stats,
        progress: progress_bar(args.quiet),
        started,
    };
    let records_in = feed(inputs, engine.as_mut(), args.batch_size, &mut f)?;
    if let Some(engine) = engine {
        engine.finish()?;
    }
    f.records.close_all().context("writing prices/tvl")?;
    let mut written = f.records.stats().clone();
    f.progress.finish_and_clear();
    drop(f);
    // The input's last dead letters may belong to an epoch that was never sent.
    output.flush();
    drop(output);
    written.add(&stage.join()?);
    Ok(ExportSummary {
        records_in,
        written,
        dead_letters: dead_count.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_kib: peak_rss_kib(),
    })
}
