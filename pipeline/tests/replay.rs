//! `llamaflow replay` end to end: the real binary over files and a DynamoDB export.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llamaflow"))
}

fn write_lines(path: &Path, lines: &[Value]) {
    let mut f = std::fs::File::create(path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

fn write_gz(path: &Path, lines: &[Value]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut gz = GzEncoder::new(std::fs::File::create(path).unwrap(), Compression::default());
    for l in lines {
        writeln!(gz, "{l}").unwrap();
    }
    gz.finish().unwrap();
}

/// A small DeFiLlama-shaped dataset exercising every alert type, plus a DynamoDB export.
fn dataset(dir: &Path) -> Vec<String> {
    let eth = "coingecko:ethereum";
    let usdc = "coingecko:usd-coin";
    let t0 = 1_717_426_800i64;
    let mut prices = vec![
        json!({"coin": eth, "price": 3791.12, "timestamp": t0, "symbol": "ETH"}),
        json!({"coin": usdc, "price": 1.0, "timestamp": t0, "symbol": "USDC"}),
        json!({"coin": eth, "price": 3589.80, "timestamp": t0 + 3600, "symbol": "ETH"}),
        json!({"coin": usdc, "price": 0.95, "timestamp": t0 + 3600, "symbol": "USDC"}),
        json!({"coin": eth, "price": 3800.0, "timestamp": t0 + 1800, "symbol": "ETH"}), // late
    ];
    for i in 0..50 {
        prices.push(
            json!({"coin": "coingecko:bitcoin", "price": 60000.0 + f64::from(i) * 100.0,
            "timestamp": t0 + 60 * i64::from(i), "symbol": "BTC"}),
        );
    }
    write_lines(&dir.join("prices.jsonl"), &prices);
    let mut bad = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("prices.jsonl"))
        .unwrap();
    writeln!(
        bad,
        "{{\"coin\":\"coingecko:bad\",\"price\":\"high\",\"timestamp\":{t0}}}"
    )
    .unwrap();
    write_lines(
        &dir.join("tvl.jsonl"),
        &[
            json!({"protocol_id": "2269", "chain": "ethereum", "tvl": 1.0e10, "timestamp": t0}),
            json!({"protocol_id": "2269", "chain": "arbitrum", "tvl": 2.0e9, "timestamp": t0}),
            json!({"protocol_id": "2269", "chain": "ethereum", "tvl": 8.0e9, "timestamp": t0 + 3600}),
        ],
    );
    write_lines(
        &dir.join("transfers.jsonl"),
        &[
            json!({"chain": "ethereum", "tx_hash": "0xabc", "coin": eth, "from": "0x1", "to": "0x2",
            "amount": 1000.0, "timestamp": t0 + 60}),
        ],
    );
    write_lines(
        &dir.join("gas.jsonl"),
        &[
            json!({"chain": "ethereum", "gwei": 20.0, "timestamp": t0}),
            json!({"chain": "ethereum", "gwei": 80.0, "timestamp": t0 + 12}),
        ],
    );
    write_lines(
        &dir.join("liquidations.jsonl"),
        &[
            json!({"protocol_id": "2269", "chain": "ethereum", "account": "0x9", "amount_usd": 2.5e6, "timestamp": t0 + 30}),
        ],
    );
    write_lines(
        &dir.join("protocols.jsonl"),
        &[json!({"id": "2269", "name": "Aave V3", "chains": ["ethereum", "arbitrum"]})],
    );
    write_lines(
        &dir.join("rules.jsonl"),
        &[
            json!({"id":"r1","user_id":"u1","name":"ETH -5% 1h","alert_type":"price_change",
                "conditions":{"coin":eth,"window":"1h","threshold_pct":5,"direction":"down"}}),
            json!({"id":"r2","user_id":"u1","alert_type":"price_threshold","conditions":{"coin":"coingecko:bitcoin","operator":">=","value":63000}}),
            json!({"id":"r3","user_id":"u2","alert_type":"depeg","conditions":{"coin":usdc,"peg":1,"deviation_pct":2}}),
            json!({"id":"r4","user_id":"u2","alert_type":"tvl_change","conditions":{"protocol_id":"2269","window":"1h","threshold_pct":10,"direction":"down"}}),
            json!({"id":"r5","user_id":"u3","alert_type":"whale_movement","conditions":{"min_usd":1000000}}),
            json!({"id":"r6","user_id":"u3","alert_type":"gas_price","conditions":{"chain":"ethereum","operator":">","gwei":50}}),
            json!({"id":"r7","user_id":"u3","alert_type":"liquidation","conditions":{"protocol_id":"2269","min_usd":1000000}}),
            json!({"id":"r8","user_id":"u3","alert_type":"tvl_change","conditions":{"protocol_id":"182","window":"24h","threshold_pct":20,"direction":"any"}}),
            json!({"id":"bad","user_id":"u3","alert_type":"price_change","conditions":{"coin":eth,"window":"2w","threshold_pct":5}}),
        ],
    );
    // A DynamoDB export with Lido (182) TVL items, out of order across files, and a price redirect.
    let exp = dir.join("export/AWSDynamoDB/01717000000000-abcd");
    let tvl_item = |t: i64, eth_tvl: f64| {
        json!({"Item": {"PK": {"S": "hourlyTvl#182"}, "SK": {"N": t.to_string()},
            "ethereum": {"N": eth_tvl.to_string()}, "ethereum-staking": {"N": "5"}, "tvl": {"N": "0"}}})
    };
    write_gz(&exp.join("data/b.json.gz"), &[tvl_item(t0 + 86_400, 5.0e9)]);
    write_gz(
        &exp.join("data/a.json.gz"),
        &[
            tvl_item(t0, 1.0e10),
            json!({"Item": {"PK": {"S": "coingecko#usd-coin"}, "SK": {"N": t0.to_string()}, "price": {"N": "1"}}}),
            json!({"Item": {"PK": {"S": "asset#ethereum:0xA0B8"}, "SK": {"N": (t0 + 10).to_string()},
                "redirect": {"S": "coingecko#usd-coin"}}}),
        ],
    );
    std::fs::write(
        exp.join("manifest-files.json"),
        format!(
            "{}\n{}\n",
            json!({"itemCount": 3, "dataFileS3Key": "AWSDynamoDB/01717000000000-abcd/data/a.json.gz"}),
            json!({"itemCount": 1, "dataFileS3Key": "AWSDynamoDB/01717000000000-abcd/data/b.json.gz"})
        ),
    )
    .unwrap();
    std::fs::write(
        exp.join("manifest-summary.json"),
        json!({"exportType": "FULL_EXPORT", "itemCount": 4, "exportTime": "2024-06-03T00:00:00Z",
            "manifestFilesS3Key": "AWSDynamoDB/01717000000000-abcd/manifest-files.json"})
        .to_string(),
    )
    .unwrap();
    let mut args = Vec::new();
    for (flag, file) in [
        ("--prices", "prices.jsonl"),
        ("--tvl", "tvl.jsonl"),
        ("--transfers", "transfers.jsonl"),
        ("--gas", "gas.jsonl"),
        ("--liquidations", "liquidations.jsonl"),
        ("--protocols", "protocols.jsonl"),
        ("--rules", "rules.jsonl"),
    ] {
        args.push(flag.to_string());
        args.push(dir.join(file).display().to_string());
    }
    args.push("--dynamodb-export".into());
    args.push(dir.join("export").display().to_string());
    args
}

fn replay(dir: &Path, inputs: &[String], workers: u32, tag: &str) -> (Output, PathBuf, PathBuf, PathBuf) {
    let (alerts, events, dead) = (
        dir.join(format!("alerts-{tag}.jsonl")),
        dir.join(format!("events-{tag}.jsonl")),
        dir.join(format!("dead-{tag}.jsonl")),
    );
    let out = bin()
        .arg("replay")
        .args(inputs)
        .args([
            "--alerts-out",
            alerts.to_str().unwrap(),
            "--events-out",
            events.to_str().unwrap(),
        ])
        .args([
            "--dead-letter-out",
            dead.to_str().unwrap(),
            "--workers",
            &workers.to_string(),
        ])
        .output()
        .unwrap();
    (out, alerts, events, dead)
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn replay_produces_every_alert_type_identically_for_1_and_2_workers() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dataset(dir.path());
    let (o1, a1, e1, d1) = replay(dir.path(), &inputs, 1, "w1");
    assert!(o1.status.success(), "{}", String::from_utf8_lossy(&o1.stderr));
    let summary = String::from_utf8_lossy(&o1.stderr);
    assert!(
        summary.contains("records in") && summary.contains("records/s"),
        "{summary}"
    );
    let (o2, a2, e2, _) = replay(dir.path(), &inputs, 2, "w2");
    assert!(o2.status.success());
    let text1 = std::fs::read_to_string(&a1).unwrap();
    assert_eq!(
        text1,
        std::fs::read_to_string(&a2).unwrap(),
        "alerts differ between 1 and 2 workers"
    );
    let sorted = |p: &Path| {
        let mut l: Vec<String> = std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        l.sort();
        l
    };
    assert_eq!(sorted(&e1), sorted(&e2), "events differ between 1 and 2 workers");

    let alerts = read_jsonl(&a1);
    let by_rule = |id: &str| alerts.iter().filter(|a| a["rule_id"] == id).collect::<Vec<_>>();
    let r1 = by_rule("r1");
    assert_eq!(r1.len(), 1);
    assert_eq!(r1[0]["message"], "ETH -5.31% in 1h (3791.12 → 3589.80)");
    assert_eq!(r1[0]["triggered_at"], 1_717_430_400);
    assert_eq!(r1[0]["alert_id"].as_str().unwrap().len(), 32);
    for key in [
        "alert_id",
        "rule_id",
        "user_id",
        "alert_type",
        "subject",
        "triggered_at",
        "value",
        "threshold",
        "message",
        "channels",
        "webhook_url",
    ] {
        assert!(r1[0].get(key).is_some(), "alert lacks {key}");
    }
    assert_eq!(by_rule("r2")[0]["value"], 63000.0);
    assert_eq!(by_rule("r3")[0]["value"], 0.95);
    let r4 = by_rule("r4");
    assert_eq!(r4[0]["message"], "Aave V3 TVL -16.67% in 1h ($12.00B → $10.00B)");
    let whale = by_rule("r5")[0]["value"].as_f64().unwrap();
    assert!(
        (whale - 3_791_120.0).abs() < 1e-3,
        "whale valued at the latest earlier ETH price: {whale}"
    );
    assert_eq!(by_rule("r6")[0]["value"], 80.0);
    assert_eq!(by_rule("r7")[0]["value"], 2.5e6);
    let r8 = by_rule("r8");
    assert_eq!(
        r8.len(),
        1,
        "Lido TVL from the export: -50% in 1d; dead: {}; events: {}",
        std::fs::read_to_string(&d1).unwrap(),
        std::fs::read_to_string(&e1)
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"182\""))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(r8[0]["value"], -50.0);

    let dead = read_jsonl(&d1);
    let reasons: Vec<(&str, &str)> = dead
        .iter()
        .map(|d| (d["source"].as_str().unwrap(), d["reason"].as_str().unwrap()))
        .collect();
    assert!(
        reasons
            .iter()
            .any(|(s, r)| s.ends_with("prices.jsonl:5") && *r == "late"),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(s, r)| s.ends_with("prices.jsonl:56") && r.contains("`price` must be a number")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(s, r)| s.ends_with("rules.jsonl:9") && r.contains("conditions.window")),
        "{reasons:?}"
    );

    let events = read_jsonl(&e1);
    let redirected = events
        .iter()
        .find(|e| e["subject"] == "ethereum:0xa0b8")
        .expect("redirected price event");
    assert_eq!(
        redirected["data"]["price"], 1.0,
        "redirect takes the target's earlier price"
    );
    let tvl = events
        .iter()
        .find(|e| e["type"] == "tvl_update" && e["subject"] == "182")
        .expect("tvl_update");
    assert_eq!(tvl["data"]["chainTvls"]["ethereum"], 1.0e10);
    assert_eq!(tvl["data"]["extra"]["ethereum-staking"], 5.0);

    // Same input, same ids: a third run reproduces the file byte for byte.
    let (_, a3, _, _) = replay(dir.path(), &inputs, 1, "w1-again");
    assert_eq!(text1, std::fs::read_to_string(a3).unwrap());
}

fn usage_error(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "args {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_usage_exits_2_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.jsonl");
    std::fs::write(&a, "").unwrap();
    let a = a.to_str().unwrap();
    let e = usage_error(&["replay", "--prices", "/nonexistent/p.jsonl", "--alerts-out", a]);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains("--prices") && e.contains("/nonexistent/p.jsonl"), "{e}");
    let e = usage_error(&["replay", "--dynamodb-export", "/nonexistent", "--alerts-out", a]);
    assert!(e.contains("--dynamodb-export"), "{e}");
    let e = usage_error(&["replay", "--alerts-out", a]);
    assert!(e.contains("no inputs"), "{e}");
    usage_error(&["replay", "--prices", a, "--alerts-out", a, "--workers", "0"]);
    usage_error(&["replay", "--frobnicate"]);
    let e = usage_error(&["replay", "--rules", a, "--alerts-out", "/nonexistent/dir/out.jsonl"]);
    assert!(e.contains("--alerts-out"), "{e}");
}

/// A gzip bomb: a 1 MB `.gz` holding a 256 MiB line, then a valid tick. The line is skipped as
/// a dead letter with its size, memory stays bounded, and the tick after it is read.
#[test]
fn a_line_past_the_limit_is_dead_lettered_without_holding_it() {
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.jsonl.gz");
    let mut gz = GzEncoder::new(std::fs::File::create(&prices).unwrap(), Compression::best());
    let chunk = vec![b'x'; 1 << 20];
    gz.write_all(b"{\"coin\":\"coingecko:x\",\"price\":1,\"timestamp\":1,\"pad\":\"")
        .unwrap();
    for _ in 0..256 {
        gz.write_all(&chunk).unwrap();
    }
    gz.write_all(b"\"}\n").unwrap();
    writeln!(gz, "{}", json!({"coin": "coingecko:y", "price": 2.0, "timestamp": 2})).unwrap();
    gz.finish().unwrap();
    assert!(std::fs::metadata(&prices).unwrap().len() < 2 << 20, "a small file");
    let (dead, events) = (dir.path().join("dead.jsonl"), dir.path().join("events.jsonl"));
    let out = bin()
        .args(["replay", "--quiet", "--prices"])
        .arg(&prices)
        .arg("--alerts-out")
        .arg(dir.path().join("alerts.jsonl"))
        .arg("--events-out")
        .arg(&events)
        .arg("--dead-letter-out")
        .arg(&dead)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let letters: Vec<Value> = std::fs::read_to_string(&dead)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let reason = letters[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("line of 268435511 bytes is longer than the limit of 1048576 bytes"),
        "{reason}"
    );
    assert!(letters[0]["source"].as_str().unwrap().ends_with("prices.jsonl.gz:1"));
    assert!(letters[0]["raw"].as_str().unwrap().len() <= 4096);
    let text = std::fs::read_to_string(&events).unwrap();
    assert!(
        text.contains("coingecko:y"),
        "the line after the long one is read: {text}"
    );
    // The summary line reports the peak RSS: far below the 256 MiB line.
    let summary = String::from_utf8_lossy(&out.stderr);
    let rss: f64 = summary
        .split("peak RSS ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {summary}"));
    assert!(rss < 100.0, "peak RSS {rss} MiB");

    // `--max-line-bytes` sets the limit: at 40 bytes the tick after the bomb is too long too.
    let out = bin()
        .args(["replay", "--quiet", "--max-line-bytes", "40", "--prices"])
        .arg(&prices)
        .arg("--alerts-out")
        .arg(dir.path().join("alerts.jsonl"))
        .arg("--dead-letter-out")
        .arg(&dead)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let letters = std::fs::read_to_string(&dead).unwrap();
    let reasons: Vec<String> = letters
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["reason"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].starts_with("line of 268435511 bytes is longer than the limit of 40 bytes"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("longer than the limit of 40 bytes"), "{reasons:?}");
}
