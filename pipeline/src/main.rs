//! `llamaflow`: the DeFi stream-processing pipeline (see README.md and SPEC §4).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pipeline::{UsageError, export, replay, run};

/// jemalloc: the dataflow allocates and frees small objects per record, where glibc's malloc
/// cost ≈20 % of a worker's time (BENCHMARKS.md).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "llamaflow", version, about = "Real-time DeFi analytics: prices, TVL, alerts")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The continuous job; with no config, the embedded demo (dashboard on http://127.0.0.1:8080).
    Run(Box<run::RunArgs>),
    /// History (files, DynamoDB exports, Kafka from a time) into the configured sinks as fast as
    /// possible, then the live sources from exactly where history ends.
    Backfill(Box<run::BackfillArgs>),
    /// Deterministic batch run over files and DynamoDB exports; writes alerts as JSONL.
    Replay(Box<replay::ReplayArgs>),
    /// Writes the inputs of a replay, and its events and alerts, as a Parquet dataset (SPEC §7).
    Export(Box<export::ExportArgs>),
    /// Checks a configuration file and prints what it would run.
    CheckConfig {
        /// The file.
        #[arg(long, default_value = "llamaflow.toml")]
        config: std::path::PathBuf,
    },
    /// Creates or updates the Postgres tables (SPEC §6).
    Migrate {
        /// Database URL [default: PREMIUM_DB, then ALERTS_DB, then DATABASE_URL].
        #[arg(long)]
        database_url: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr: human-readable, or one JSON object per line with LLAMAFLOW_LOG_FORMAT=json.
    let filter = tracing_subscriber::EnvFilter::try_from_env("LLAMAFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if std::env::var("LLAMAFLOW_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.init();
    }
    let result = match cli.cmd {
        Cmd::Run(args) => run::run(*args),
        Cmd::Backfill(args) => run::backfill(*args),
        Cmd::Replay(args) => replay::replay(&args).map(|s| eprintln!("{}", s.line())),
        Cmd::Export(args) => export::export(&args).map(|s| eprintln!("{}", s.line())),
        Cmd::CheckConfig { config } => pipeline::config::Config::load(&config)
            .map(|c| println!("{}: ok — {}", config.display(), c.summary()))
            .map_err(Into::into),
        Cmd::Migrate { database_url } => pipeline::migrate(database_url),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let usage = e.downcast_ref::<UsageError>().is_some();
            eprintln!("llamaflow: {e:#}");
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}
