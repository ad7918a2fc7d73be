//! The crash test: a Kafka + CDC workload into Postgres, Redis, SQS (FIFO) and Kafka while the
//! job is killed with SIGKILL at random moments and restarted each time. At the end every alert
//! of an uninterrupted run (`llamaflow replay` over the same input) is present exactly once by
//! `alert_id` in `alert_history` and in the SQS queue, every one is on `defi-alerts` (which
//! consumers dedupe by `alert_id`: a record re-processed after a crash is re-published), and
//! no other alert exists anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, TopicPartitionList};
use serde_json::{Value, json};

mod common;

use common::{alert_ids_in_file, alert_ids_in_topic, boto3, psql, sigterm, sqs_alert_ids};

const T0: i64 = 1_717_430_400;
const COINS: usize = 8;
const TICKS: usize = 400;
const KILLS: usize = 10;

/// A small deterministic generator (the test prints its seed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn watermarks_and_commits(brokers: &str) -> (BTreeMap<i32, i64>, BTreeMap<i32, i64>) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "crash")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut high = BTreeMap::new();
    for p in 0..3 {
        tpl.add_partition("prices", p);
        let (_, h) = c.fetch_watermarks("prices", p, Duration::from_secs(5)).unwrap();
        if h > 0 {
            high.insert(p, h);
        }
    }
    let committed = c
        .committed_offsets(tpl, Duration::from_secs(5))
        .unwrap()
        .elements()
        .iter()
        .filter_map(|e| e.offset().to_raw().filter(|o| *o >= 0).map(|o| (e.partition(), o)))
        .collect();
    (high, committed)
}

fn start(config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("LLAMAFLOW_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
        .spawn()
        .expect("llamaflow starts")
}

/// The workload: per coin a random walk of prices, every 10 s of event time; rules that
/// cross thresholds and detect 5-minute changes on each coin.
fn workload(rng: &mut Lcg) -> (Vec<Value>, Vec<Value>) {
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
    let mut prices = [100.0f64; COINS];
    let mut ticks = Vec::new();
    for i in 0..TICKS {
        for (c, p) in prices.iter_mut().enumerate() {
            *p *= 1.0 + (rng.below(2001) as f64 - 1000.0) / 100_000.0;
            *p = (*p * 10_000.0).round() / 10_000.0;
            ticks.push(json!({"coin": format!("coingecko:coin{c}"), "price": *p, "timestamp": T0 + 10 * i as i64}));
        }
    }
    (rules, ticks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_moments_every_alert_exactly_once() {
    let seed = std::env::var("LLAMAFLOW_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash test seed {seed} (LLAMAFLOW_CRASH_SEED={seed} repeats it)");
    let mut rng = Lcg(seed);
    let dir = tempfile::tempdir().unwrap();
    let (rules, ticks) = workload(&mut Lcg(7));

    // The uninterrupted run: a replay over the same input.
    let write_jsonl = |name: &str, rows: &[Value]| {
        let path = dir.path().join(name);
        std::fs::write(&path, rows.iter().map(|r| r.to_string() + "\n").collect::<String>()).unwrap();
        path
    };
    let (prices_file, rules_file) = (write_jsonl("prices.jsonl", &ticks), write_jsonl("rules.jsonl", &rules));
    let expected_file = dir.path().join("expected.jsonl");
    let replay = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["replay", "--quiet", "--prices"])
        .arg(&prices_file)
        .arg("--rules")
        .arg(&rules_file)
        .arg("--alerts-out")
        .arg(&expected_file)
        .output()
        .unwrap();
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stderr));
    let expected: BTreeSet<String> = alert_ids_in_file(&expected_file).into_iter().collect();
    assert!(expected.len() > 50, "the workload alerts often: {}", expected.len());

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
    for t in ["defi-events", "defi-alerts"] {
        cluster.create_topic(t, 1, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    let config = dir.path().join("llamaflow.toml");
    let dead_file = dir.path().join("dead.jsonl");
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
topics = {{ tvl = "", transfers = "", gas = "", liquidations = "" }}

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

[sinks.sqs]
queue_url = "{queue_url}"
endpoint_url = "{moto}"
access_key_id = "testing"
secret_access_key = "testing"
"#,
            port = testkit::free_port(),
            dead = dead_file.display(),
            pg = pg.url(),
            redis = redis.url(),
            moto = moto.endpoint(),
        ),
    )
    .unwrap();

    // Produce the ticks paced over ~12 s, keyed by coin (one coin → one partition, in order).
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let feed = tokio::spawn(async move {
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
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
    });

    let log = dir.path().join("llamaflow.log");
    let mut job = start(&config, &log);
    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(400 + rng.below(1400))).await;
        assert!(
            job.try_wait().unwrap().is_none(),
            "llamaflow exited early; log:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        job.kill().unwrap(); // SIGKILL
        job.wait().unwrap();
        eprintln!(
            "kill {} of {KILLS}: {} alerts in Postgres so far",
            kill + 1,
            psql(&pg, "SELECT count(*) FROM alert_history")
        );
        job = start(&config, &log);
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

    let pg_ids: Vec<String> = psql(&pg, "SELECT alert_id FROM alert_history ORDER BY alert_id")
        .lines()
        .map(str::to_string)
        .collect();
    let pg_set: BTreeSet<String> = pg_ids.iter().cloned().collect();
    let missing: Vec<_> = expected.difference(&pg_set).collect();
    let extra: Vec<_> = pg_set.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "alert_history = the uninterrupted run's alerts: {} missing {missing:?}, {} extra {extra:?}",
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
    assert_eq!(
        sqs_set, expected,
        "the SQS queue holds exactly the uninterrupted run's alerts"
    );

    let topic = alert_ids_in_topic(&brokers);
    let topic_set: BTreeSet<String> = topic.iter().cloned().collect();
    assert_eq!(
        topic_set, expected,
        "defi-alerts holds exactly the uninterrupted run's alert ids"
    );
    eprintln!(
        "{} alerts; defi-alerts has {} messages ({} re-published after kills, deduped by alert_id)",
        expected.len(),
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
    let (_, ticks) = workload(&mut Lcg(7));
    let want = ticks.iter().rev().find(|t| t["coin"] == "coingecko:coin0").unwrap()["price"].clone();
    assert_eq!(last["price"], want);
}
