//! `llamaflow backfill`: history from files, then Kafka live from exactly where history ends.
//! The Kafka topic holds the whole stream (the history's part too); the result must be exactly
//! the alerts of one replay over all of it — nothing missing at the seam, nothing twice.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::TopicPartitionList;
use serde_json::{Value, json};

const T0: i64 = 1_717_430_400;

fn alerts_by_id(path: &std::path::Path) -> BTreeMap<String, Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["alert_id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

fn committed_is_high(brokers: &str) -> bool {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bf")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition("prices", p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
    committed.elements().iter().all(|e| {
        let (_, high) = c.fetch_watermarks("prices", e.partition(), Duration::from_secs(5)).unwrap();
        high == 0 || e.offset().to_raw() == Some(high)
    })
}

fn metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return "unreachable".into();
    };
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines().filter(|l| l.starts_with("llamaflow")).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_then_live_equals_one_replay() {
    let dir = tempfile::tempdir().unwrap();
    // Six coins, a tick every 30 s each for 2 h; rules with 5m/15m windows and crossings, so
    // alerts straddle the seam in the middle.
    let mut rules = Vec::new();
    for c in 0..6 {
        let coin = format!("coingecko:c{c}");
        rules.push(json!({"id": format!("chg{c}"), "user_id": "u1", "alert_type": "price_change",
            "conditions": {"coin": coin, "window": if c % 2 == 0 { "5m" } else { "15m" }, "threshold_pct": 1.0,
            "direction": "any"}, "throttle_minutes": 3}));
        rules.push(json!({"id": format!("x{c}"), "user_id": "u2", "alert_type": "price_threshold",
            "conditions": {"coin": coin, "operator": ">", "value": 100.0}}));
    }
    let mut ticks = Vec::new();
    let mut state = 12345u64;
    let mut px = [100.0f64; 6];
    for i in 0..240 {
        for (c, p) in px.iter_mut().enumerate() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *p = ((*p * (1.0 + ((state >> 33) % 1001) as f64 / 50_000.0 - 0.01)) * 1e4).round() / 1e4;
            ticks.push(json!({"coin": format!("coingecko:c{c}"), "price": *p, "timestamp": T0 + 30 * i}));
        }
    }
    let seam = T0 + 30 * 120 + 7; // inside the stream, not on a tick
    let write = |name: &str, rows: &mut dyn Iterator<Item = &Value>| {
        let path = dir.path().join(name);
        std::fs::write(&path, rows.map(|r| r.to_string() + "\n").collect::<String>()).unwrap();
        path
    };
    let all = write("all.jsonl", &mut ticks.iter());
    let part1 = write(
        "part1.jsonl",
        &mut ticks.iter().filter(|t| t["timestamp"].as_i64().unwrap() <= seam),
    );
    let rules_file = write("rules.jsonl", &mut rules.iter());

    let expected_file = dir.path().join("expected.jsonl");
    let replay = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["replay", "--quiet", "--prices"])
        .arg(&all)
        .arg("--rules")
        .arg(&rules_file)
        .arg("--alerts-out")
        .arg(&expected_file)
        .output()
        .unwrap();
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stderr));
    let expected = alerts_by_id(&expected_file);
    let before_seam = expected
        .values()
        .filter(|a| a["triggered_at"].as_i64().unwrap() <= seam)
        .count();
    assert!(
        before_seam > 5 && expected.len() - before_seam > 5,
        "alerts on both sides of the seam: {before_seam} / {}",
        expected.len()
    );

    // Kafka holds the whole stream; half the coins carry event-time message timestamps, the
    // others the producer's clock (then only the front's event-time check finds the seam).
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("prices", 3, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    for t in &ticks {
        let coin = t["coin"].as_str().unwrap();
        let payload = t.to_string();
        let mut rec = FutureRecord::to("prices").key(coin).payload(&payload);
        if coin.ends_with(['0', '2', '4']) {
            rec = rec.timestamp(t["timestamp"].as_i64().unwrap() * 1000);
        }
        producer.send(rec, Duration::from_secs(10)).await.expect("produced");
    }

    let alerts_out = dir.path().join("alerts.jsonl");
    let port = testkit::free_port();
    let config = dir.path().join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[pipeline]
workers = 2
checkpoint_interval_ms = 300
listen = "127.0.0.1:{port}"

[sources.kafka]
brokers = "{brokers}"
group_id = "bf"
assignment = [0, 1]
topics = {{ tvl = "", transfers = "", gas = "", liquidations = "" }}

[sinks.jsonl]
alerts = "{alerts}"
"#,
            alerts = alerts_out.display(),
            port = port,
        ),
    )
    .unwrap();

    // Without history, backfill is a usage error.
    let bad = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["backfill", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{}", String::from_utf8_lossy(&bad.stderr));

    let log = dir.path().join("backfill.log");
    let mut job = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .env("LLAMAFLOW_LOG", "info")
        .args(["backfill", "--config"])
        .arg(&config)
        .arg("--prices")
        .arg(&part1)
        .arg("--rules")
        .arg(&rules_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !committed_is_high(&brokers) {
        assert!(
            job.try_wait().unwrap().is_none(),
            "backfill exited early:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(
            Instant::now() < deadline,
            "Kafka consumed and committed to the end; log:\n{}\nmetrics:\n{}",
            std::fs::read_to_string(&log).unwrap(),
            metrics(port)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(Command::new("kill").args(["-TERM", &job.id().to_string()]).status().unwrap().success());
    let status = job.wait().unwrap();
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status:?}\n{log_text}");
    let history_records = ticks.iter().filter(|t| t["timestamp"].as_i64().unwrap() <= seam).count() + rules.len();
    assert!(
        log_text.contains(&format!("history: {history_records} records")),
        "progress summary on stderr:\n{log_text}"
    );

    let got = alerts_by_id(&alerts_out);
    let lines = std::fs::read_to_string(&alerts_out).unwrap().lines().count();
    assert_eq!(lines, got.len(), "no alert written twice");
    let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, extra {extra:?}");
    assert_eq!(got, expected, "the same alerts, field for field");
}
