//! Fixed-seed benchmark workloads for `llamaflow replay` (see BENCHMARKS.md).
//!
//! `llamaflow-bench gen --workload prices --out DIR` writes `prices.jsonl` + `rules.jsonl`:
//! 1M price ticks over 20k coins and 10k `price_change` rules. `--workload mixed` writes every
//! record kind and rules of every alert type. Rules throttle 5–60 minutes, like real users'.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::json;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Workload {
    /// 1M price ticks over 20k coins, 10k price_change rules.
    Prices,
    /// 1M records of every kind, 10k rules of every type.
    Mixed,
}

#[derive(Parser)]
#[command(
    name = "llamaflow-bench",
    about = "Generate fixed-seed benchmark inputs for llamaflow replay"
)]
struct Cli {
    /// Which workload.
    #[arg(long, value_enum)]
    workload: Workload,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
    /// Number of records.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Number of coins.
    #[arg(long, default_value_t = 20_000)]
    coins: u64,
    /// Number of rules.
    #[arg(long, default_value_t = 10_000)]
    rules: u64,
    /// Seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// splitmix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn writer(dir: &Path, name: &str) -> Result<BufWriter<File>> {
    let p = dir.join(name);
    Ok(BufWriter::with_capacity(
        1 << 20,
        File::create(&p).with_context(|| format!("cannot create {}", p.display()))?,
    ))
}

const CHAINS: [&str; 5] = ["ethereum", "arbitrum", "base", "bsc", "polygon"];
const WINDOWS: [&str; 5] = ["5m", "15m", "1h", "4h", "24h"];
const START: u64 = 1_717_000_000;

fn gen_rules(cli: &Cli, rng: &mut Rng, protocols: u64, w: &mut impl Write) -> Result<()> {
    for i in 0..cli.rules {
        let coin = format!("coingecko:coin-{}", rng.below(cli.coins));
        let dir = ["up", "down", "any"][rng.below(3) as usize];
        let window = WINDOWS[rng.below(WINDOWS.len() as u64) as usize];
        let op = [">", "<"][rng.below(2) as usize];
        let chain = CHAINS[rng.below(5) as usize];
        let kind = match cli.workload {
            Workload::Prices => 0,
            Workload::Mixed => rng.below(7),
        };
        let (t, cond) = match kind {
            0 => (
                "price_change",
                json!({"coin": coin, "window": window, "threshold_pct": 1 + rng.below(10), "direction": dir}),
            ),
            1 => (
                "price_threshold",
                json!({"coin": coin, "operator": op, "value": 50 + rng.below(100)}),
            ),
            2 => (
                "depeg",
                json!({"coin": coin, "peg": 100.0, "deviation_pct": 2 + rng.below(8)}),
            ),
            3 => (
                "tvl_change",
                json!({"protocol_id": format!("{}", rng.below(protocols)), "window": "1h", "threshold_pct": 2 + rng.below(8), "direction": dir}),
            ),
            4 => (
                "whale_movement",
                json!({"coin": coin, "min_usd": 250_000 + rng.below(1_750_000)}),
            ),
            5 => (
                "gas_price",
                json!({"chain": chain, "operator": ">", "gwei": 20 + rng.below(60)}),
            ),
            _ => (
                "liquidation",
                json!({"protocol_id": format!("{}", rng.below(protocols)), "min_usd": 250_000 + rng.below(750_000)}),
            ),
        };
        let rule = json!({"id": format!("r{i}"), "user_id": format!("u{}", i % 1000), "alert_type": t,
            "conditions": cond, "throttle_minutes": 5 + rng.below(56)});
        writeln!(w, "{rule}")?;
    }
    Ok(())
}

fn main() -> ExitCode {
    match generate(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llamaflow-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn generate(cli: &Cli) -> Result<()> {
    std::fs::create_dir_all(&cli.out).with_context(|| format!("cannot create {}", cli.out.display()))?;
    let mut rng = Rng(cli.seed);
    let protocols = 500;
    let mut rules = writer(&cli.out, "rules.jsonl")?;
    gen_rules(cli, &mut rng, protocols, &mut rules)?;
    rules.flush()?;
    let mut prices = writer(&cli.out, "prices.jsonl")?;
    let mut mixed = match cli.workload {
        Workload::Prices => None,
        Workload::Mixed => Some([
            writer(&cli.out, "tvl.jsonl")?,
            writer(&cli.out, "transfers.jsonl")?,
            writer(&cli.out, "gas.jsonl")?,
            writer(&cli.out, "liquidations.jsonl")?,
        ]),
    };
    let mut level: Vec<f64> = (0..cli.coins).map(|_| 50.0 + 100.0 * rng.unit()).collect();
    // Records spread over ~24h of event time, in order.
    let step_ms = (86_400_000 / cli.records.max(1)).max(1);
    for i in 0..cli.records {
        let ts = (START * 1000 + i * step_ms) as f64 / 1000.0;
        let pick = if mixed.is_some() { rng.below(10) } else { 0 };
        match (pick, mixed.as_mut()) {
            (0..=5, _) | (_, None) => {
                let c = rng.below(cli.coins) as usize;
                level[c] = (level[c] * (1.0 + (rng.unit() - 0.5) * 0.04)).max(0.01);
                writeln!(
                    prices,
                    "{}",
                    json!({"coin": format!("coingecko:coin-{c}"), "price": level[c],
                    "timestamp": ts, "symbol": format!("C{c}"), "confidence": 0.99})
                )?;
            }
            (6, Some(w)) => writeln!(
                w[0],
                "{}",
                json!({"protocol_id": format!("{}", rng.below(protocols)),
                "chain": CHAINS[rng.below(5) as usize], "tvl": 1e6 + 1e8 * rng.unit(), "timestamp": ts})
            )?,
            (7, Some(w)) => writeln!(
                w[1],
                "{}",
                json!({"chain": CHAINS[rng.below(5) as usize],
                "tx_hash": format!("0x{:x}", rng.next()), "coin": format!("coingecko:coin-{}", rng.below(cli.coins)),
                "from": "0x1", "to": "0x2", "amount": 10.0 + 5000.0 * rng.unit(), "timestamp": ts})
            )?,
            (8, Some(w)) => writeln!(
                w[2],
                "{}",
                json!({"chain": CHAINS[rng.below(5) as usize],
                "gwei": 5.0 + 80.0 * rng.unit(), "timestamp": ts})
            )?,
            (_, Some(w)) => writeln!(
                w[3],
                "{}",
                json!({"protocol_id": format!("{}", rng.below(protocols)),
                "chain": CHAINS[rng.below(5) as usize], "account": "0xabc", "amount_usd": 1e6 * rng.unit(), "timestamp": ts})
            )?,
        }
    }
    prices.flush()?;
    for mut w in mixed.into_iter().flatten() {
        w.flush()?;
    }
    eprintln!(
        "llamaflow-bench: wrote {:?} workload ({} records, {} rules) to {}",
        cli.workload,
        cli.records,
        cli.rules,
        cli.out.display()
    );
    Ok(())
}
