//! Parquet end to end (SPEC §7) with the real binary, checked by an independent reader:
//! `parquet_check.py` reads every dataset with pyarrow and DuckDB from the venv at
//! `$LLAMAFLOW_VENV` (default `~/.cache/llamaflow-venv`; `scripts/test.sh` installs pyarrow and
//! duckdb there).
//!
//! - `llamaflow export` over files and a DynamoDB export: row counts, exact doubles and
//!   timestamps, column types, zstd, date partitions; events and alerts equal to what
//!   `llamaflow replay` writes as JSONL for the same inputs.
//! - `llamaflow export` over a Kafka time range (librdkafka's mock cluster).
//! - `llamaflow run` with `[sinks.parquet]`: hourly part files with the same alerts and events.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};

/// 2024-06-03T22:00:00Z: four hours of data cross midnight into 2024-06-04.
const T0: i64 = 1_717_452_000;
const MS: i64 = 1000;
const ETH: &str = "coingecko:ethereum";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llamaflow"))
}

/// The venv's interpreter; fails clearly when the venv is missing.
fn python() -> PathBuf {
    let venv = std::env::var_os("LLAMAFLOW_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/llamaflow-venv"));
    let py = venv.join("bin/python");
    assert!(
        py.exists(),
        "no Python venv at {} (set LLAMAFLOW_VENV to a venv with pyarrow and duckdb, e.g. run scripts/test.sh, \
         or `python3 -m venv {0} && {0}/bin/pip install pyarrow duckdb`)",
        venv.display()
    );
    py
}

/// Runs the independent checker on `dataset` with `expect`.
fn check(dataset: &Path, expect: &Value) {
    let spec = dataset.with_extension("expect.json");
    std::fs::write(&spec, serde_json::to_string_pretty(expect).unwrap()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/parquet_check.py");
    let out = Command::new(python())
        .arg(script)
        .arg(dataset)
        .arg(&spec)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("parquet_check: ok"),
        "independent check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", stdout.trim());
}

fn write_lines(path: &Path, lines: &[Value]) {
    let mut f = std::fs::File::create(path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "exit {:?}: {err}", out.status.code());
    err
}

/// Prices (ETH every 10 min for 4 h, drifting down; a fractional-second BTC tick; a late and
/// a low-confidence tick; a bad line), TVL, gas, rules and a DynamoDB export with a staking
/// sub-bucket. Returns the input flags and the number of valid price records.
fn dataset(dir: &Path) -> (Vec<String>, usize) {
    let mut prices = Vec::new();
    for i in 0..25i64 {
        prices.push(
            json!({"coin": ETH, "price": 3800.0 - 20.0 * i as f64, "timestamp": T0 + 600 * i,
            "symbol": "ETH", "confidence": 0.99, "decimals": 18}),
        );
    }
    prices.push(json!({"coin": "coingecko:bitcoin", "price": 67000.5, "timestamp": 1_717_452_000.25, "symbol": "BTC"}));
    prices.push(json!({"coin": ETH, "price": 1.0, "timestamp": T0 + 30, "symbol": "ETH"})); // late
    prices.push(json!({"coin": "coingecko:tether", "price": 0.5, "timestamp": T0 + 60, "confidence": 0.2}));
    // A double a non-roundtrip JSON parser reads 1 ulp off.
    prices.push(json!({"coin": "coingecko:coin-0", "price": 147.171_393_642_526_43, "timestamp": T0 + 90}));
    write_lines(&dir.join("prices.jsonl"), &prices);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("prices.jsonl"))
        .unwrap();
    writeln!(
        f,
        "{{\"coin\":\"coingecko:bad\",\"price\":\"high\",\"timestamp\":{T0}}}"
    )
    .unwrap();
    write_lines(
        &dir.join("tvl.jsonl"),
        &[
            json!({"protocol_id": "2269", "chain": "ethereum", "tvl": 11_873_349_211.52, "timestamp": T0}),
            json!({"protocol_id": "2269", "chain": "arbitrum", "tvl": 2.0e9, "timestamp": T0}),
            json!({"protocol_id": "2269", "chain": "ethereum", "tvl": 9.0e9, "timestamp": T0 + 3600}),
            json!({"protocol_id": "2269", "chain": "arbitrum", "tvl": 2.5e9, "timestamp": T0 + 7200}),
        ],
    );
    write_lines(
        &dir.join("gas.jsonl"),
        &[
            json!({"chain": "ethereum", "gwei": 20.0, "timestamp": T0}),
            json!({"chain": "ethereum", "gwei": 80.5, "timestamp": T0 + 12}),
        ],
    );
    write_lines(
        &dir.join("rules.jsonl"),
        &[
            json!({"id": "r1", "user_id": "u1", "name": "ETH -1% 1h", "alert_type": "price_change", "throttle_minutes": 0,
                "channels": ["websocket", "webhook"], "webhook_url": "https://example.invalid/h",
                "conditions": {"coin": ETH, "window": "1h", "threshold_pct": 1, "direction": "down"}}),
            json!({"id": "r2", "user_id": "u2", "alert_type": "gas_price",
                "conditions": {"chain": "ethereum", "operator": ">", "gwei": 50}}),
            json!({"id": "r3", "user_id": "u2", "alert_type": "tvl_change", "throttle_minutes": 0,
                "conditions": {"protocol_id": "2269", "window": "1h", "threshold_pct": 5, "direction": "any"}}),
        ],
    );
    let exp = dir.join("export/AWSDynamoDB/01717000000000-abcd");
    std::fs::create_dir_all(exp.join("data")).unwrap();
    let item = |t: i64, eth: f64| {
        json!({"Item": {"PK": {"S": "hourlyTvl#182"}, "SK": {"N": t.to_string()},
            "ethereum": {"N": eth.to_string()}, "ethereum-staking": {"N": "5"}, "tvl": {"N": "0"}}})
    };
    let mut gz = GzEncoder::new(
        std::fs::File::create(exp.join("data/a.json.gz")).unwrap(),
        Compression::default(),
    );
    for (t, v) in [(T0, 1.0e10), (T0 + 86_400, 1.2e10)] {
        writeln!(gz, "{}", item(t, v)).unwrap();
    }
    gz.finish().unwrap();
    std::fs::write(
        exp.join("manifest-files.json"),
        json!({"itemCount": 2, "dataFileS3Key": "AWSDynamoDB/01717000000000-abcd/data/a.json.gz"}).to_string() + "\n",
    )
    .unwrap();
    std::fs::write(
        exp.join("manifest-summary.json"),
        json!({"exportType": "FULL_EXPORT", "itemCount": 2}).to_string(),
    )
    .unwrap();
    let p = |name: &str| dir.join(name).display().to_string();
    let flags = vec![
        "--prices".into(),
        p("prices.jsonl"),
        "--tvl".into(),
        p("tvl.jsonl"),
        "--gas".into(),
        p("gas.jsonl"),
        "--rules".into(),
        p("rules.jsonl"),
        "--dynamodb-export".into(),
        p("export"),
    ];
    (flags, prices.len())
}

/// Types every reader must see.
fn types() -> Value {
    json!({
        "prices": {"types": {"coin": "string", "price": "double", "timestamp": "timestamp[ms, tz=UTC]",
                             "symbol": "string", "confidence": "double", "decimals": "int32"},
                   "duckdb_types": {"price": "DOUBLE", "timestamp": "TIMESTAMP WITH TIME ZONE", "decimals": "INTEGER"}},
        "tvl": {"types": {"tvl": "double", "timestamp": "timestamp[ms, tz=UTC]", "extra": "bool"},
                "duckdb_types": {"tvl": "DOUBLE", "extra": "BOOLEAN"}},
        "events": {"types": {"type": "string", "timestamp": "timestamp[ms, tz=UTC]", "value": "double",
                             "chain_tvls": "map<string, double>", "data": "string"},
                   "duckdb_types": {"chain_tvls": "MAP(VARCHAR, DOUBLE)"}},
        "alerts": {"types": {"triggered_at": "timestamp[ms, tz=UTC]", "value": "double", "threshold": "double",
                             "channels": "list<item: string>", "webhook_url": "string"},
                   "duckdb_types": {"triggered_at": "TIMESTAMP WITH TIME ZONE", "channels": "VARCHAR[]"}}
    })
}

fn with_types(mut tables: Value) -> Value {
    let t = types();
    for (name, spec) in tables.as_object_mut().unwrap() {
        for k in ["types", "duckdb_types"] {
            spec[k] = t[name][k].clone();
        }
    }
    tables
}

/// Runs `replay` over the same inputs: the reference alerts and events.
fn reference(dir: &Path, flags: &[String]) -> (PathBuf, PathBuf) {
    let (alerts, events) = (dir.join("ref-alerts.jsonl"), dir.join("ref-events.jsonl"));
    ok(&bin()
        .arg("replay")
        .args(flags)
        .arg("--alerts-out")
        .arg(&alerts)
        .arg("--events-out")
        .arg(&events)
        .arg("--dead-letter-out")
        .arg(dir.join("ref-dead.jsonl"))
        .output()
        .unwrap());
    (alerts, events)
}

fn part_names(root: &Path, table: &str) -> Vec<String> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(root.join(table)).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            out.push(format!(
                "{}/{}",
                d.file_name().to_string_lossy(),
                f.file_name().to_string_lossy()
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn export_is_read_back_by_pyarrow_and_duckdb() {
    let dir = tempfile::tempdir().unwrap();
    let (flags, n_prices) = dataset(dir.path());
    let (ref_alerts, ref_events) = reference(dir.path(), &flags);
    let alerts = read_jsonl(&ref_alerts);
    let events = read_jsonl(&ref_events);
    assert!(
        alerts.len() >= 3 && events.len() > 25,
        "{} alerts, {} events",
        alerts.len(),
        events.len()
    );

    let out = dir.path().join("dataset");
    let err = ok(&bin()
        .arg("export")
        .arg("--parquet")
        .arg(&out)
        .args(&flags)
        .args(["--workers", "2", "--dead-letter-out"])
        .arg(dir.path().join("dead.jsonl"))
        .output()
        .unwrap());
    let summary = err.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with(&format!(
            "export: {} records in; rows: {n_prices} prices, 8 tvl, {} events, {} alerts;",
            n_prices + 4 + 2 + 3 + 2,
            events.len(),
            alerts.len()
        )) && summary.contains("MB written in")
            && summary.contains("MB/s"),
        "{err}"
    );
    // The bad line and the late tick.
    assert_eq!(read_jsonl(&dir.path().join("dead.jsonl")).len(), 2);
    // Parts per kind and date; both dates are there. (The BTC and late ticks come after the
    // midnight ticks in file order: 2024-06-03 was closed by then and gets a second part.)
    let prices = part_names(&out, "prices");
    assert!(
        prices.iter().any(|p| p.starts_with("date=2024-06-03/part-"))
            && prices.iter().any(|p| p.starts_with("date=2024-06-04/part-"))
            && prices.iter().all(|p| p.ends_with(".parquet")),
        "{prices:?}"
    );
    let n_parts = prices.len();

    let expect = json!({
        "tables": with_types(json!({
            "prices": {"rows": n_prices, "values": [
                {"where": {"coin": "coingecko:bitcoin", "timestamp": T0 * MS + 250},
                 "expect": {"price": 67000.5, "symbol": "BTC", "confidence": null, "decimals": null}},
                {"where": {"coin": ETH, "timestamp": (T0 + 600) * MS},
                 "expect": {"price": 3780.0, "confidence": 0.99, "decimals": 18}},
                {"where": {"coin": ETH, "timestamp": (T0 + 30) * MS}, "expect": {"price": 1.0}},
                {"where": {"coin": "coingecko:tether"}, "expect": {"confidence": 0.2}},
                {"where": {"coin": "coingecko:coin-0"}, "expect": {"price": 147.171_393_642_526_43}}
            ]},
            "tvl": {"rows": 8, "values": [
                {"where": {"protocol_id": "2269", "chain": "ethereum", "timestamp": T0 * MS},
                 "expect": {"tvl": 11_873_349_211.52, "extra": false}},
                {"where": {"protocol_id": "182", "chain": "ethereum-staking", "timestamp": (T0 + 86_400) * MS},
                 "expect": {"tvl": 5.0, "extra": true}},
                {"where": {"protocol_id": "182", "chain": "ethereum"}, "count": 2}
            ]},
            "events": {"rows": events.len(), "values": [
                {"where": {"type": "tvl_update", "subject": "182", "timestamp": T0 * MS},
                 "expect": {"value": 1.0e10, "chain_tvls": {"ethereum": 1.0e10}}},
                {"where": {"type": "gas_update", "timestamp": (T0 + 12) * MS}, "expect": {"value": 80.5}}
            ]},
            "alerts": {"rows": alerts.len(), "values": [
                {"where": {"rule_id": "r2"}, "expect": {"triggered_at": (T0 + 12) * MS, "value": 80.5, "threshold": 50.0}}
            ]}
        })),
        "alerts_jsonl": ref_alerts,
        "events_jsonl": ref_events,
    });
    check(&out, &expect);

    // A second run into the same directory is refused (exit 2) unless --append.
    let again = bin()
        .arg("export")
        .arg("--parquet")
        .arg(&out)
        .args(&flags)
        .args(["--kinds", "prices", "--quiet"])
        .output()
        .unwrap();
    assert_eq!(
        again.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("--append"));
    ok(&bin()
        .arg("export")
        .arg("--parquet")
        .arg(&out)
        .args(&flags)
        .args(["--kinds", "prices", "--append"])
        .output()
        .unwrap());
    assert_eq!(part_names(&out, "prices").len(), 2 * n_parts);
}

#[test]
fn export_reads_a_kafka_time_range() {
    use rdkafka::ClientConfig;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("px", 2, 1).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .create()
        .unwrap();
    // 20 ticks a minute apart over two partitions; the message timestamp is the tick's.
    for i in 0..20i64 {
        let ts = T0 + 60 * i;
        let v = json!({"coin": format!("coingecko:c{}", i % 2), "price": 100.0 + i as f64 + 0.125, "timestamp": ts})
            .to_string();
        let key = format!("k{i}");
        producer
            .send(
                BaseRecord::to("px")
                    .partition((i % 2) as i32)
                    .key(&key)
                    .payload(&v)
                    .timestamp(ts * MS),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dataset");
    let err = ok(&bin()
        .arg("export")
        .arg("--parquet")
        .arg(&out)
        .args(["--kafka-brokers", &cluster.bootstrap_servers()])
        .args(["--kafka-from", "2024-06-03T22:05:00Z"])
        .args(["--kafka-to", &((T0 + 15 * 60) * MS).to_string()])
        .args(["--kafka-topic", "prices=px", "--kinds", "prices,events"])
        .output()
        .unwrap());
    // [22:05, 22:15): ticks 5..=14.
    assert!(
        err.contains("export: 10 records in; rows: 10 prices, 0 tvl, 10 events"),
        "{err}"
    );
    let expect = json!({"tables": with_types(json!({
        "prices": {"rows": 10, "values": [
            {"where": {"coin": "coingecko:c1", "timestamp": (T0 + 300) * MS}, "expect": {"price": 105.125}},
            {"where": {"timestamp": (T0 + 240) * MS}, "count": 0},
            {"where": {"timestamp": (T0 + 900) * MS}, "count": 0}
        ]},
        "events": {"rows": 10}
    }))});
    check(&out, &expect);

    let bad = bin()
        .arg("export")
        .arg("--parquet")
        .arg(dir.path().join("x"))
        .args([
            "--kafka-brokers",
            &cluster.bootstrap_servers(),
            "--kafka-from",
            "yesterday",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"));
}

#[test]
fn the_running_job_writes_hourly_parts_through_the_parquet_sink() {
    let dir = tempfile::tempdir().unwrap();
    let (flags, _) = dataset(dir.path());
    let (ref_alerts, ref_events) = reference(dir.path(), &flags);
    let events = read_jsonl(&ref_events);
    let count = |t: &str| events.iter().filter(|e| e["type"] == t).count();
    let tvl_rows: usize = events
        .iter()
        .filter(|e| e["type"] == "tvl_update")
        .map(|e| {
            e["data"]["chainTvls"].as_object().map_or(0, |m| m.len())
                + e["data"]["extra"].as_object().map_or(0, |m| m.len())
        })
        .sum();
    let out = dir.path().join("live");
    let config = dir.path().join("llamaflow.toml");
    let p = |n: &str| dir.path().join(n).display().to_string();
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{port}\"\nworkers = 2\ndead_letter_out = \"{dead}\"\n\n\
             [[sources.files]]\nkind = \"rules\"\npath = \"{rules}\"\n\n[[sources.files]]\nkind = \"prices\"\npath = \"{prices}\"\n\n\
             [[sources.files]]\nkind = \"tvl\"\npath = \"{tvl}\"\n\n[[sources.files]]\nkind = \"gas\"\npath = \"{gas}\"\n\n\
             [sources]\ndynamodb_export = [\"{export}\"]\n\n[sinks]\nstdout = false\n\n\
             [sinks.parquet]\ndir = \"{out}\"\nrollover = \"1h\"\n",
            port = testkit::free_port(),
            dead = p("live-dead.jsonl"),
            rules = p("rules.jsonl"),
            prices = p("prices.jsonl"),
            tvl = p("tvl.jsonl"),
            gas = p("gas.jsonl"),
            export = p("export"),
            out = out.display()
        ),
    )
    .unwrap();
    let check_cfg = bin().args(["check-config", "--config"]).arg(&config).output().unwrap();
    assert!(
        String::from_utf8_lossy(&check_cfg.stdout).contains("parquet"),
        "{check_cfg:?}"
    );
    ok(&bin()
        .args(["run", "--duration-secs", "4", "--config"])
        .arg(&config)
        .output()
        .unwrap());
    // Hourly parts, named by their hour: ETH ticks span 22:00–02:00 (5 hours over 2 dates).
    let prices = part_names(&out, "prices");
    assert!(
        prices.iter().any(|p| p.starts_with("date=2024-06-03/part-2200-"))
            && prices.iter().any(|p| p.starts_with("date=2024-06-04/part-0200-"))
            && prices.len() >= 5,
        "{prices:?}"
    );
    let expect = json!({
        "tables": with_types(json!({
            "prices": {"rows": count("price_update"), "values": [
                {"where": {"coin": ETH, "timestamp": (T0 + 1200) * MS}, "expect": {"price": 3760.0, "decimals": 18}}
            ]},
            "tvl": {"rows": tvl_rows},
            "events": {"rows": events.len()},
            "alerts": {"rows": read_jsonl(&ref_alerts).len()}
        })),
        "alerts_jsonl": ref_alerts,
        "events_jsonl": ref_events,
    });
    check(&out, &expect);
}
