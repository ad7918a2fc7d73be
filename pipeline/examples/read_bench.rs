//! The history reader alone: JSONL files read and parsed through `replay`'s merge
//! ([`pipeline::replay::Merge`]) with 1, 2, … parse threads, nothing downstream. Prints records
//! per second (best of `--runs`) and the process's CPU seconds per run, to show how one file's
//! parsing spreads over cores.
//!
//! `cargo run --release -p pipeline --example read_bench -- --prices FILE [--rules FILE]
//! [--threads 1,2] [--runs 3]`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use pipeline::replay::{Merge, Source};
use schemas::Kind;
use sources::Input;

// The allocator of the `llamaflow` binary, so that allocation costs as it does there.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// CPU seconds (user + system) this process has used so far.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> Result<()> {
    let mut files: Vec<(Kind, PathBuf)> = Vec::new();
    let (mut threads, mut runs) = (vec![1usize, 2], 3usize);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--threads" => {
                threads = value
                    .split(',')
                    .map(|t| t.parse().with_context(|| format!("--threads: `{t}` is not a number")))
                    .collect::<Result<_>>()?
            }
            "--runs" => runs = value.parse().context("--runs: not a number")?,
            _ => match flag.strip_prefix("--").and_then(Kind::parse) {
                Some(kind) => files.push((kind, value.into())),
                None => bail!("unknown flag {flag}: use --prices/--tvl/… FILE, --threads 1,2, --runs 3"),
            },
        }
    }
    if files.is_empty() {
        bail!("no input: give --prices FILE (or another kind)");
    }
    println!("parse threads | records | best wall s | records/s | CPU s per run");
    for &n in &threads {
        let (mut best, mut records, mut cpu) = (f64::MAX, 0u64, 0.0);
        for _ in 0..runs {
            let sources = files
                .iter()
                .map(|(kind, path)| {
                    sources::files::open(path, *kind, sources::DEFAULT_MAX_LINE_BYTES).map(Source::File)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let (start, cpu0) = (Instant::now(), cpu_seconds());
            records = Merge::new(sources, n)
                .filter(|i| matches!(i, Input::Record(..)))
                .count() as u64;
            best = best.min(start.elapsed().as_secs_f64());
            cpu += cpu_seconds() - cpu0;
        }
        println!(
            "{n:>13} | {records} | {best:.3} | {:.0} | {:.2}",
            records as f64 / best,
            cpu / runs as f64
        );
    }
    Ok(())
}
