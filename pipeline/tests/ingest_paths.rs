//! Issue 14 #7, per ingest path: a protocol's TVL records with one timestamp are one update
//! (SPEC §2) wherever the input is cut into epochs. Random TVL streams — updates of several
//! protocols interleaved, late and duplicate records among them — go through `replay` with
//! epochs of 1, 2, 3, 5, 8 and 8192 records and 1 or 2 workers, and through `llamaflow run`
//! reading the same file as history (batches of 1 and 8192): every run gives the same alerts
//! and the same dead letters.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

mod common;

use common::Lcg;

const T0: i64 = 1_717_430_400;

/// A TVL stream: per hour, each protocol's chains in random order, interleaved with the other
/// protocols' records; now and then a late record (an earlier hour) or a repeated one.
fn stream(rng: &mut Lcg) -> Vec<Value> {
    let chains = ["ethereum", "arbitrum", "base"];
    let mut out = Vec::new();
    for hour in 0..12i64 {
        let mut hour_records = Vec::new();
        for p in 0..3 {
            for c in chains {
                let tvl = 1.0e9 * (1.0 + rng.below(40) as f64 / 100.0);
                hour_records.push(json!({"protocol_id": format!("p{p}"), "chain": c, "tvl": tvl,
                    "timestamp": T0 + hour * 3600}));
            }
        }
        // Shuffle (the protocols interleave; a protocol's chains come in any order).
        for i in (1..hour_records.len()).rev() {
            hour_records.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for r in hour_records {
            out.push(r.clone());
            match rng.below(10) {
                0 if hour > 0 => {
                    let mut late = r.clone();
                    late["timestamp"] = json!(T0 + (hour - 1) * 3600);
                    late["chain"] = json!("late-chain");
                    out.push(late);
                }
                1 => out.push(r),
                _ => {}
            }
        }
    }
    out
}

fn rules() -> Vec<Value> {
    let mut rules: Vec<Value> = (0..3)
        .map(|p| {
            json!({"id": format!("tot{p}"), "user_id": "u", "alert_type": "tvl_change", "throttle_minutes": 0,
                "conditions": {"protocol_id": format!("p{p}"), "window": "1h", "threshold_pct": 8, "direction": "any"}})
        })
        .collect();
    rules.push(json!({"id": "eth0", "user_id": "u", "alert_type": "tvl_change", "throttle_minutes": 0,
        "conditions": {"protocol_id": "p0", "chain": "ethereum", "window": "1h", "threshold_pct": 8, "direction": "any"}}));
    rules
}

fn write(path: &Path, rows: &[Value]) {
    std::fs::write(path, rows.iter().map(|r| r.to_string() + "\n").collect::<String>()).unwrap();
}

/// The lines of a JSONL file, sorted (dead letters of several workers come in any order).
fn sorted_lines(path: &Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    lines
}

fn replay(dir: &Path, batch: usize, workers: u32) -> (Vec<String>, Vec<String>) {
    let (alerts, dead) = (dir.join("r-alerts.jsonl"), dir.join("r-dead.jsonl"));
    let out = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args([
            "replay",
            "--quiet",
            "--batch-size",
            &batch.to_string(),
            "--workers",
            &workers.to_string(),
        ])
        .arg("--rules")
        .arg(dir.join("rules.jsonl"))
        .arg("--tvl")
        .arg(dir.join("tvl.jsonl"))
        .arg("--alerts-out")
        .arg(&alerts)
        .arg("--dead-letter-out")
        .arg(&dead)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (sorted_lines(&alerts), sorted_lines(&dead))
}

/// `llamaflow run` with the files as history (no live source), stopped once it has written
/// what replay wrote.
fn run_history(dir: &Path, batch: usize, want: usize) -> (Vec<String>, Vec<String>) {
    let (alerts, dead) = (dir.join("h-alerts.jsonl"), dir.join("h-dead.jsonl"));
    let _ = std::fs::remove_file(&alerts);
    let _ = std::fs::remove_file(&dead);
    let config = dir.join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{port}\"\nbatch_max = {batch}\ncheckpoint_dir = \"\"\n\
             dead_letter_out = \"{dead}\"\n\n\
             [[sources.files]]\nkind = \"rules\"\npath = \"{rules}\"\n\n\
             [[sources.files]]\nkind = \"tvl\"\npath = \"{tvl}\"\n\n[sinks]\nstdout = false\n\n\
             [sinks.jsonl]\nalerts = \"{alerts}\"\n",
            port = testkit::free_port(),
            dead = dead.display(),
            rules = dir.join("rules.jsonl").display(),
            tvl = dir.join("tvl.jsonl").display(),
            alerts = alerts.display()
        ),
    )
    .unwrap();
    let mut job = common::Job(
        Command::new(env!("CARGO_BIN_EXE_llamaflow"))
            .args(["run", "--config", config.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::wait_until("history's alerts written", Duration::from_secs(30), || {
        common::json_lines(&alerts).len() >= want
    });
    let status = job.terminate();
    assert!(status.success(), "{status:?}");
    (sorted_lines(&alerts), sorted_lines(&dead))
}

#[test]
fn every_ingest_path_and_every_cut_gives_the_same_tvl_alerts() {
    let seed = common::crash_seed("ingest paths");
    let mut rng = Lcg(seed);
    for case in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("rules.jsonl"), &rules());
        write(&dir.path().join("tvl.jsonl"), &stream(&mut rng));
        let (alerts, dead) = replay(dir.path(), 8192, 1);
        eprintln!("case {case}: {} alerts, {} dead letters", alerts.len(), dead.len());
        assert!(alerts.len() >= 3, "case {case}: the stream alerts: {alerts:?}");
        assert!(
            dead.iter().any(|d| d.contains("\"reason\":\"late\"")),
            "case {case}: late records among the input: {dead:?}"
        );
        for batch in [1, 2, 3, 5, 8] {
            for workers in [1, 2] {
                let got = replay(dir.path(), batch, workers);
                assert_eq!(
                    got.0, alerts,
                    "case {case}: replay, epochs of {batch}, {workers} worker(s)"
                );
                assert_eq!(
                    got.1, dead,
                    "case {case}: replay dead letters, epochs of {batch}, {workers} worker(s)"
                );
            }
        }
        for batch in [1, 8192] {
            let (got_alerts, got_dead) = run_history(dir.path(), batch, alerts.len());
            assert_eq!(got_alerts, alerts, "case {case}: run history, batches of {batch}");
            assert_eq!(
                got_dead, dead,
                "case {case}: run history dead letters, batches of {batch}"
            );
        }
    }
}
