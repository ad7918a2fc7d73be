//! The crash test: a Kafka + CDC workload (prices and transfers on separate topics) into
//! Postgres, Redis, SQS (FIFO), Kafka and JSONL while the job is killed with SIGKILL at random
//! moments and restarted each time. At the end every sink holds the same alerts: each once by
//! `alert_id` in `alert_history`, the SQS queue and the JSONL file (every line whole), every one
//! on `defi-alerts` (which consumers dedupe by `alert_id`: a record re-processed after a crash
//! is re-published), and no rule fired twice inside its throttle. The per-coin alerts are
//! exactly those of an uninterrupted run (`llamaflow replay`); whale alerts value a transfer at
//! the newest price read from the other topic, so they depend on how the topics interleave:
//! reclocking forms the epochs after a checkpoint again exactly, so the sinks still agree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, TopicPartitionList};
use serde_json::{Value, json};

mod common;

use common::{Lcg, alert_ids_in_topic, boto3, psql, sigterm, sqs_alert_ids};

const T0: i64 = 1_717_430_400;
const COINS: usize = 8;
const TICKS: usize = 400;
const KILLS: usize = 10;

/// Per (topic, partition): the end of the partition and the group's committed offset.
type Offsets = BTreeMap<(String, i32), i64>;

fn watermarks_and_commits(brokers: &str) -> (Offsets, Offsets) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "crash")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut high = BTreeMap::new();
    for (topic, partitions) in [("prices", 3), ("transfers", 1)] {
        for p in 0..partitions {
            tpl.add_partition(topic, p);
            let (_, h) = c.fetch_watermarks(topic, p, Duration::from_secs(5)).unwrap();
            if h > 0 {
                high.insert((topic.to_string(), p), h);
            }
        }
    }
    let committed = c
        .committed_offsets(tpl, Duration::from_secs(5))
        .unwrap()
        .elements()
        .iter()
        .filter_map(|e| {
            e.offset()
                .to_raw()
                .filter(|o| *o >= 0)
                .map(|o| ((e.topic().to_string(), e.partition()), o))
        })
        .collect();
    (high, committed)
}

/// The workload: per coin a random walk of prices, every 10 s of event time; rules that
/// cross thresholds and detect 5-minute changes on each coin; whale rules (half of them
/// throttled) on transfers worth about their threshold.
fn workload(rng: &mut Lcg) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let mut rules = Vec::new();
    for c in 0..COINS {
        let coin = format!("coingecko:coin{c}");
        rules.push(
            json!({"id": format!("up{c}"), "user_id": format!("u{}", c % 3), "alert_type": "price_threshold",
            "conditions": {"coin": coin, "operator": ">", "value": 101.0}, "throttle_minutes": 0}),
        );
        rules.push(
            json!({"id": format!("down{c}"), "user_id": format!("u{}", c % 3), "alert_type": "price_threshold",
            "conditions": {"coin": coin, "operator": "<", "value": 99.0}, "throttle_minutes": 0}),
        );
        rules.push(
            json!({"id": format!("chg{c}"), "user_id": format!("u{}", c % 3), "alert_type": "price_change",
            "conditions": {"coin": coin, "window": "5m", "threshold_pct": 1.5, "direction": "any"},
            "throttle_minutes": 2}),
        );
    }
    for c in 0..COINS {
        rules.push(
            json!({"id": format!("whale{c}"), "user_id": format!("u{}", c % 3), "alert_type": "whale_movement",
            "conditions": {"coin": format!("coingecko:coin{c}"), "min_usd": 5_000_000.0},
            "throttle_minutes": if c % 2 == 0 { 0 } else { 3 }}),
        );
    }
    let mut prices = [100.0f64; COINS];
    let mut ticks = Vec::new();
    let mut transfers = Vec::new();
    for i in 0..TICKS {
        for (c, p) in prices.iter_mut().enumerate() {
            *p *= 1.0 + (rng.below(2001) as f64 - 1000.0) / 100_000.0;
            *p = (*p * 10_000.0).round() / 10_000.0;
            ticks.push(json!({"coin": format!("coingecko:coin{c}"), "price": *p, "timestamp": T0 + 10 * i as i64}));
        }
        // A transfer of 50,000 coins (≈ $5M at ≈ $100) 5 s after every round.
        {
            let c = i % COINS;
            transfers.push(json!({"chain": "ethereum", "tx_hash": format!("0x{i:x}"),
                "coin": format!("coingecko:coin{c}"), "from": "0x1", "to": "0x2", "amount": 50_000.0,
                "timestamp": T0 + 10 * i as i64 + 5}));
        }
    }
    (rules, ticks, transfers)
}

/// Alert type of each alert id in a JSONL alerts file.
fn types_in_file(path: &Path) -> BTreeMap<String, String> {
    common::json_lines(path)
        .into_iter()
        .map(|a| {
            (
                a["alert_id"].as_str().unwrap().to_string(),
                a["alert_type"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_moments_every_alert_exactly_once() {
    let seed = common::crash_seed("crash test");
    let mut rng = Lcg(seed);
    let dir = tempfile::tempdir().unwrap();
    let (rules, ticks, transfers) = workload(&mut Lcg(7));

    // The uninterrupted run: a replay over the same input.
    let write_jsonl = |name: &str, rows: &[Value]| {
        let path = dir.path().join(name);
        std::fs::write(&path, rows.iter().map(|r| r.to_string() + "\n").collect::<String>()).unwrap();
        path
    };
    let (prices_file, rules_file) = (write_jsonl("prices.jsonl", &ticks), write_jsonl("rules.jsonl", &rules));
    let transfers_file = write_jsonl("transfers.jsonl", &transfers);
    let expected_file = dir.path().join("expected.jsonl");
    common::replay(&[
        "--prices".as_ref(),
        prices_file.as_os_str(),
        "--transfers".as_ref(),
        transfers_file.as_os_str(),
        "--rules".as_ref(),
        rules_file.as_os_str(),
        "--alerts-out".as_ref(),
        expected_file.as_os_str(),
    ]);
    // The per-coin alerts of the uninterrupted run (whale alerts depend on the interleaving).
    let expected_types = types_in_file(&expected_file);
    let expected: BTreeSet<String> = expected_types
        .iter()
        .filter(|(_, t)| *t != "whale_movement")
        .map(|(id, _)| id.clone())
        .collect();
    assert!(expected.len() > 50, "the workload alerts often: {}", expected.len());
    assert!(
        expected_types.values().filter(|t| *t == "whale_movement").count() > 5,
        "whale rules fire: {expected_types:?}"
    );

    // Services.
    let pg = common::migrated_postgres();
    for r in &rules {
        psql(
            &pg,
            &format!(
                "INSERT INTO alert_rules (id, user_id, alert_type, conditions, channels, throttle_minutes) \
                 VALUES ('{}', '{}', '{}', '{}', '[\"websocket\"]', {})",
                r["id"].as_str().unwrap(),
                r["user_id"].as_str().unwrap(),
                r["alert_type"].as_str().unwrap(),
                r["conditions"],
                r["throttle_minutes"]
            ),
        );
    }
    let moto = testkit::Moto::start();
    let queue_url = boto3(
        &moto,
        "print(sqs.create_queue(QueueName='crash.fifo', Attributes={'FifoQueue': 'true'})['QueueUrl'])",
    );
    let redis = testkit::Redis::start(None);
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("prices", 3, 1).unwrap();
    cluster.create_topic("transfers", 1, 1).unwrap();
    for t in ["defi-events", "defi-alerts"] {
        cluster.create_topic(t, 1, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    let config = dir.path().join("llamaflow.toml");
    let dead_file = dir.path().join("dead.jsonl");
    let alerts_file = dir.path().join("alerts.jsonl");
    let bad_sent = ticks.chunks(COINS * 4).count();
    std::fs::write(
        &config,
        format!(
            r#"
[pipeline]
workers = 2
listen = "127.0.0.1:{port}"
checkpoint_interval_ms = 300
dead_letter_out = "{dead}"

[sources.kafka]
brokers = "{brokers}"
group_id = "crash"
assignment = [0, 1]
topics = {{ tvl = "", transfers = "transfers", gas = "", liquidations = "" }}

[sources.postgres_cdc]
url = "{pg}"
slot = "crash"
poll_interval_ms = 50

[sinks.redis]
url = "{redis}/3"

[sinks.postgres]
url = "{pg}"

[sinks.kafka]
brokers = "{brokers}"

[sinks.jsonl]
alerts = "{alerts}"

[sinks.sqs]
queue_url = "{queue_url}"
endpoint_url = "{moto}"
access_key_id = "testing"
secret_access_key = "testing"
"#,
            port = testkit::free_port(),
            dead = dead_file.display(),
            alerts = alerts_file.display(),
            pg = pg.url(),
            redis = redis.url(),
            moto = moto.endpoint(),
        ),
    )
    .unwrap();

    // Produce the ticks paced over ~12 s, keyed by coin (one coin → one partition, in order).
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let feed = tokio::spawn(async move {
        let mut transfers = transfers.into_iter().peekable();
        for (n, chunk) in ticks.chunks(COINS * 4).enumerate() {
            // Bad input between the ticks: each must reach the dead-letter file, kills or not.
            let bad = format!("not json #{n}");
            producer
                .send(
                    FutureRecord::to("prices")
                        .key(&format!("coin{}", n % COINS))
                        .payload(&bad),
                    Duration::from_secs(10),
                )
                .await
                .expect("produced");
            for t in chunk {
                producer
                    .send(
                        FutureRecord::to("prices")
                            .key(t["coin"].as_str().unwrap())
                            .payload(&t.to_string()),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("produced");
            }
            // The transfers of these rounds, on their own topic.
            let end = chunk
                .last()
                .map(|t| t["timestamp"].as_i64().unwrap())
                .unwrap_or_default();
            while let Some(t) = transfers.next_if(|t| t["timestamp"].as_i64().unwrap() < end + 10) {
                producer
                    .send(
                        FutureRecord::to("transfers")
                            .key(t["tx_hash"].as_str().unwrap())
                            .payload(&t.to_string()),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("produced");
            }
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
    });

    let log = dir.path().join("llamaflow.log");
    let mut job = common::start_run(&config, &log);
    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(400 + rng.below(1400))).await;
        common::sigkill(&mut job, &log);
        eprintln!(
            "kill {} of {KILLS}: {} alerts in Postgres so far",
            kill + 1,
            psql(&pg, "SELECT count(*) FROM alert_history")
        );
        job = common::start_run(&config, &log);
    }
    feed.await.unwrap();

    // Let the last run catch up and commit everything, then stop it gracefully.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (high, committed) = watermarks_and_commits(&brokers);
        if committed == high {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "offsets committed up to {high:?}: {committed:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let status = sigterm(&mut job);
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "graceful stop exits 0: {status:?}\n{log_text}");
    assert!(
        log_text.contains("resuming from checkpoint"),
        "restarts resumed from checkpoints:\n{log_text}"
    );

    assert!(
        log_text.contains("logged epochs again (reclocking)"),
        "restarts formed the logged epochs again:\n{log_text}"
    );
    assert!(
        !log_text.contains("could not be followed"),
        "the epoch log was followed to its end every time:\n{log_text}"
    );

    // The JSONL file: every line whole, each alert once; it is the reference the other sinks
    // must agree with.
    let jsonl = common::json_lines(&alerts_file);
    let mut all = BTreeSet::new();
    for a in &jsonl {
        assert!(
            all.insert(a["alert_id"].as_str().unwrap().to_string()),
            "twice in the JSONL file: {a}"
        );
    }
    let whales: BTreeSet<String> = jsonl
        .iter()
        .filter(|a| a["alert_type"] == "whale_movement")
        .map(|a| a["alert_id"].as_str().unwrap().to_string())
        .collect();
    assert!(whales.len() > 5, "whale alerts fired: {}", whales.len());
    let per_coin: BTreeSet<String> = all.difference(&whales).cloned().collect();
    let missing: Vec<_> = expected.difference(&per_coin).collect();
    let extra: Vec<_> = per_coin.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "per-coin alerts = the uninterrupted run's: {} missing {missing:?}, {} extra {extra:?}",
        missing.len(),
        extra.len()
    );
    // No rule fired twice inside its throttle (`triggered_at` is in unix seconds).
    let throttle: BTreeMap<String, i64> = rules
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["throttle_minutes"].as_i64().unwrap() * 60,
            )
        })
        .collect();
    let mut fired: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for a in &jsonl {
        fired
            .entry(a["rule_id"].as_str().unwrap().to_string())
            .or_default()
            .push(a["triggered_at"].as_i64().unwrap());
    }
    for (rule, mut times) in fired {
        times.sort_unstable();
        let gap = throttle[&rule];
        for w in times.windows(2) {
            assert!(
                gap == 0 || w[1] - w[0] >= gap,
                "{rule} fired at {} and {} (throttle {gap} s)",
                w[0],
                w[1]
            );
        }
    }

    let pg_ids: Vec<String> = psql(&pg, "SELECT alert_id FROM alert_history ORDER BY alert_id")
        .lines()
        .map(str::to_string)
        .collect();
    let pg_set: BTreeSet<String> = pg_ids.iter().cloned().collect();
    let missing: Vec<_> = all.difference(&pg_set).collect();
    let extra: Vec<_> = pg_set.difference(&all).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "alert_history = the JSONL file's alerts: {} missing {missing:?}, {} extra {extra:?}",
        missing.len(),
        extra.len()
    );

    // Every bad message is in the dead-letter file (at least once: a message re-delivered
    // after a kill is dead-lettered again), with its Kafka position.
    let mut bad_seen = BTreeSet::new();
    for line in std::fs::read_to_string(&dead_file).unwrap().lines() {
        let d: Value = serde_json::from_str(line).unwrap();
        let raw = d["raw"].as_str().unwrap();
        let source = d["source"].as_str().unwrap();
        assert!(source.starts_with("prices/") && source.contains('@'), "{line}");
        assert!(
            raw.starts_with("not json #"),
            "only the bad messages are dead letters: {line}"
        );
        bad_seen.insert(raw.to_string());
    }
    let bad_expected: BTreeSet<String> = (0..bad_sent).map(|n| format!("not json #{n}")).collect();
    assert_eq!(bad_seen, bad_expected, "every bad message is dead-lettered");

    let sqs = sqs_alert_ids(&moto, &queue_url);
    let sqs_set: BTreeSet<String> = sqs.iter().cloned().collect();
    assert_eq!(
        sqs.len(),
        sqs_set.len(),
        "no alert twice in the FIFO queue (dedup id = alert_id)"
    );
    assert_eq!(sqs_set, all, "the SQS queue holds exactly the JSONL file's alerts");

    let topic = alert_ids_in_topic(&brokers);
    let topic_set: BTreeSet<String> = topic.iter().cloned().collect();
    assert_eq!(topic_set, all, "defi-alerts holds exactly the JSONL file's alert ids");
    eprintln!(
        "{} alerts ({} whale); defi-alerts has {} messages ({} re-published after kills, deduped by alert_id)",
        all.len(),
        whales.len(),
        topic.len(),
        topic.len() - topic_set.len()
    );

    // Redis holds each coin's last price.
    let mut r = redis::Client::open(format!("{}/3", redis.url()))
        .unwrap()
        .get_connection()
        .unwrap();
    let last: Value = serde_json::from_str(
        &redis::cmd("GET")
            .arg("price:coingecko:coin0")
            .query::<String>(&mut r)
            .unwrap(),
    )
    .unwrap();
    let (_, ticks, _) = workload(&mut Lcg(7));
    let want = ticks.iter().rev().find(|t| t["coin"] == "coingecko:coin0").unwrap()["price"].clone();
    assert_eq!(last["price"], want);
}
