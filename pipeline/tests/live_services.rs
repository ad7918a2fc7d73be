//! `llamaflow run --config` end to end against real services: Kafka (librdkafka's mock
//! cluster, real wire protocol), a private PostgreSQL (CDC of alert_rules + the sink tables),
//! a private Redis, and a DynamoDB export on disk. Every alert must land exactly once in
//! Postgres and on the `defi-alerts` topic, Kafka offsets must be committed only for what was
//! written, and a restart must neither lose nor repeat anything.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, TopicPartitionList};
use serde_json::{Value, json};

mod common;

use common::{Job, alert_ids_in_file, alert_ids_in_topic, boto3, psql, sqs_alerts, wait_until};

const T0: i64 = 1_717_430_400;

fn insert_rule(pg: &testkit::Postgres, id: &str, alert_type: &str, conditions: Value, webhook: Option<&str>) {
    let (channels, url) = match webhook {
        Some(u) => ("[\"websocket\",\"webhook\"]", format!("'{u}'")),
        None => ("[\"websocket\"]", "NULL".to_string()),
    };
    psql(
        pg,
        &format!(
            "INSERT INTO alert_rules (id, user_id, alert_type, conditions, channels, webhook_url, throttle_minutes) \
             VALUES ('{id}', 'u1', '{alert_type}', '{conditions}', '{channels}', {url}, 0)"
        ),
    );
}

fn write_export(dir: &Path) {
    let exp = dir.join("AWSDynamoDB/01717000000000-e2e");
    std::fs::create_dir_all(exp.join("data")).unwrap();
    let item = |t: i64, tvl: f64| json!({"Item": {"PK": {"S": "hourlyTvl#182"}, "SK": {"N": t.to_string()}, "ethereum": {"N": tvl.to_string()}}});
    let mut gz = GzEncoder::new(
        std::fs::File::create(exp.join("data/a.json.gz")).unwrap(),
        Compression::default(),
    );
    for l in [item(T0 - 86_400, 1.0e10), item(T0, 5.0e9)] {
        writeln!(gz, "{l}").unwrap();
    }
    gz.finish().unwrap();
    std::fs::write(
        exp.join("manifest-files.json"),
        json!({"itemCount": 2, "dataFileS3Key": "AWSDynamoDB/01717000000000-e2e/data/a.json.gz"}).to_string() + "\n",
    )
    .unwrap();
    std::fs::write(
        exp.join("manifest-summary.json"),
        json!({"exportType": "FULL_EXPORT", "itemCount": 2, "exportTime": "2024-06-03T00:00:00Z"}).to_string(),
    )
    .unwrap();
}

async fn produce(p: &FutureProducer, key: &str, value: &str) {
    p.send(
        FutureRecord::to("prices").key(key).payload(value),
        Duration::from_secs(10),
    )
    .await
    .expect("produced");
}

async fn price(p: &FutureProducer, coin: &str, px: f64, t: i64) {
    produce(p, coin, &json!({"coin": coin, "price": px, "timestamp": t}).to_string()).await;
}

/// A local webhook receiver: the bodies it was sent, with their signature headers.
async fn webhook_server() -> (String, std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>) {
    use axum::routing::post;
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |headers: axum::http::HeaderMap, body: String| {
            let store = store.clone();
            async move {
                let sig = headers
                    .get("x-llamaflow-signature")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                store.lock().unwrap().push((body, sig));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

fn start_job(config: &Path, stdout: &Path) -> Job {
    let child = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("LLAMAFLOW_LOG", "warn")
        .stdout(std::fs::File::create(stdout).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("llamaflow starts");
    Job(child)
}

fn stop_job(mut job: Job) {
    let s = job.terminate();
    assert!(s.success(), "llamaflow exit status {s:?}");
}

fn committed_offsets(brokers: &str) -> BTreeMap<i32, i64> {
    committed_offsets_of(brokers, "e2e")
}

/// Offsets the consumer group `group` committed on the 3 `prices` partitions.
fn committed_offsets_of(brokers: &str, group: &str) -> BTreeMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition("prices", p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
    got.elements()
        .iter()
        .filter_map(|e| e.offset().to_raw().filter(|o| *o >= 0).map(|o| (e.partition(), o)))
        .collect()
}

fn high_watermarks(brokers: &str) -> BTreeMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    (0..3)
        .map(|p| (p, c.fetch_watermarks("prices", p, Duration::from_secs(5)).unwrap().1))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_cdc_export_to_postgres_redis_kafka_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let pg = testkit::Postgres::start();
    pg.allow_wal2json();
    let migrate = |expect: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
            .args(["migrate", "--database-url", &pg.url()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(expect),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    migrate("applied 0001_init");
    migrate("up to date");
    let (hook_url, hooks) = webhook_server().await;
    insert_rule(
        &pg,
        "tvl",
        "tvl_change",
        json!({"protocol_id": "182", "window": "24h", "threshold_pct": 20, "direction": "any"}),
        None,
    );
    insert_rule(
        &pg,
        "eth",
        "price_threshold",
        json!({"coin": "coingecko:ethereum", "operator": ">", "value": 3000}),
        Some(&hook_url),
    );
    psql(&pg, "INSERT INTO api_keys (key, user_id) VALUES ('k1', 'u1')");
    let moto = testkit::Moto::start();
    let queue_url = boto3(
        &moto,
        "print(sqs.create_queue(QueueName='alerts.fifo', Attributes={'FifoQueue': 'true'})['QueueUrl'])",
    );
    let redis = testkit::Redis::start(None);

    let cluster = MockCluster::new(1).unwrap();
    for t in ["prices", "tvl", "transfers", "gas", "liquidations"] {
        cluster.create_topic(t, 3, 1).unwrap();
    }
    for t in ["defi-events", "defi-alerts"] {
        cluster.create_topic(t, 1, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let eth = "coingecko:ethereum";
    price(&producer, eth, 2900.0, T0).await;
    price(&producer, eth, 3100.0, T0 + 60).await; // crossing: alert 2 (alert 1: TVL from the export)
    produce(&producer, "junk", "{not json").await; // dead letter with its topic/partition@offset

    write_export(&dir.path().join("export"));
    let port = testkit::free_port();
    let dead = dir.path().join("dead.jsonl");
    let config = dir.path().join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[pipeline]
workers = 2
listen = "127.0.0.1:{port}"
dead_letter_out = "{dead}"
checkpoint_interval_ms = 300

[sources]
dynamodb_export = ["{export}"]

[sources.kafka]
brokers = "{brokers}"
group_id = "e2e"
session_timeout_ms = 6000

[sources.postgres_cdc]
url = "{pg}"
slot = "e2e"
poll_interval_ms = 50

[sinks]
stdout = true

[sinks.redis]
url = "{redis}/2"

[sinks.postgres]
url = "{pg}"

[sinks.kafka]
brokers = "{brokers}"

[sinks.sqs]
queue_url = "{queue_url}"
endpoint_url = "{moto}"
access_key_id = "testing"
secret_access_key = "testing"

[sinks.webhook]
secret = "s3cret"

[sinks.websocket]
allow_anonymous = false
"#,
            dead = dead.display(),
            export = dir.path().join("export").display(),
            pg = pg.url(),
            redis = redis.url(),
            moto = moto.endpoint(),
        ),
    )
    .unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    let stdout1 = dir.path().join("stdout1.jsonl");
    let job = start_job(&config, &stdout1);
    // A WebSocket client with a key that exists only in the api_keys table (CDC).
    assert!(
        testkit::wait_for_port(port, Duration::from_secs(30)),
        "llamaflow listens"
    );
    let ws_alerts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message as Ws;
        let url = format!("ws://127.0.0.1:{port}/ws?api_key=k1");
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut ws, _) = loop {
            match tokio_tungstenite::connect_async(&url).await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "k1 from api_keys accepted: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        ws.send(Ws::text(
            json!({"type": "subscribe", "channels": ["alerts"]}).to_string(),
        ))
        .await
        .unwrap();
        let store = ws_alerts.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = ws.next().await {
                if let Ws::Text(t) = m {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "alert" {
                        store
                            .lock()
                            .unwrap()
                            .push(v["data"]["alert_id"].as_str().unwrap().to_string());
                    }
                }
            }
        });
    }
    let count = || {
        psql(&pg, "SELECT count(*) FROM alert_history")
            .parse::<usize>()
            .unwrap()
    };
    wait_until(
        "the export and Kafka alerts in Postgres",
        Duration::from_secs(60),
        || count() == 2,
    );

    // A rule created in Postgres while the job runs takes effect (CDC).
    let rules_before = common::records_in(port, "rule");
    insert_rule(
        &pg,
        "btc",
        "price_threshold",
        json!({"coin": "coingecko:bitcoin", "operator": "<", "value": 50000}),
        None,
    );
    wait_until("the new rule at the ingest front", Duration::from_secs(30), || {
        common::records_in(port, "rule") > rules_before
    });
    price(&producer, "coingecko:bitcoin", 51000.0, T0 + 120).await;
    price(&producer, "coingecko:bitcoin", 49000.0, T0 + 180).await; // alert 3
    price(&producer, eth, 2900.0, T0 + 240).await;
    price(&producer, eth, 3200.0, T0 + 300).await; // alert 4
    wait_until("four alerts in Postgres", Duration::from_secs(30), || count() == 4);
    let hw = high_watermarks(&brokers);
    wait_until(
        "Kafka offsets committed after the sinks wrote",
        Duration::from_secs(20),
        || committed_offsets(&brokers) == hw,
    );
    stop_job(job);

    let rules: Vec<String> = psql(&pg, "SELECT rule_id FROM alert_history ORDER BY triggered_at, rule_id")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(rules, vec!["tvl", "eth", "btc", "eth"]);
    let pg_ids: Vec<String> = psql(&pg, "SELECT alert_id FROM alert_history ORDER BY alert_id")
        .lines()
        .map(str::to_string)
        .collect();
    let mut out_ids: Vec<String> = alert_ids_in_file(&stdout1);
    out_ids.sort();
    assert_eq!(out_ids, pg_ids, "stdout and Postgres hold the same alerts");
    let mut topic_ids = alert_ids_in_topic(&brokers);
    topic_ids.sort();
    assert_eq!(topic_ids, pg_ids, "defi-alerts holds every alert exactly once");
    assert_eq!(
        psql(
            &pg,
            "SELECT price FROM token_prices WHERE coin = 'coingecko:ethereum' ORDER BY timestamp DESC LIMIT 1"
        ),
        "3200"
    );
    assert_eq!(
        psql(
            &pg,
            "SELECT tvl FROM protocol_tvl WHERE protocol_id = '182' AND chain = 'total' ORDER BY timestamp DESC LIMIT 1"
        ),
        "5000000000"
    );

    let mut r = redis::Client::open(format!("{}/2", redis.url()))
        .unwrap()
        .get_connection()
        .unwrap();
    let v: String = redis::cmd("GET").arg("price:coingecko:ethereum").query(&mut r).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&v).unwrap()["price"], 3200.0);

    let mut sqs = sqs_alerts(&moto, &queue_url);
    sqs.sort();
    assert_eq!(
        sqs.iter().map(|(id, _, _)| id.clone()).collect::<Vec<_>>(),
        pg_ids,
        "SQS holds every alert once"
    );
    for (id, group, dedup) in &sqs {
        assert_eq!(
            (group.as_str(), dedup),
            ("u1", id),
            "FIFO group = user_id, dedup id = alert_id"
        );
    }
    let hooks = hooks.lock().unwrap().clone();
    let eth_ids: Vec<String> = psql(
        &pg,
        "SELECT alert_id FROM alert_history WHERE rule_id = 'eth' ORDER BY alert_id",
    )
    .lines()
    .map(str::to_string)
    .collect();
    let mut hook_ids: Vec<String> = hooks
        .iter()
        .map(|(body, sig)| {
            assert_eq!(*sig, sinks::webhook::sign(b"s3cret", body.as_bytes()), "signed body");
            serde_json::from_str::<Value>(body).unwrap()["alert_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    hook_ids.sort();
    assert_eq!(
        hook_ids, eth_ids,
        "each webhook alert delivered once, only for the webhook rule"
    );
    let ws = ws_alerts.lock().unwrap().clone();
    let btc_id = psql(&pg, "SELECT alert_id FROM alert_history WHERE rule_id = 'btc'");
    assert!(
        ws.contains(&btc_id),
        "the WebSocket client got the alert that fired while connected: {ws:?}"
    );
    let mut ws_sorted = ws.clone();
    ws_sorted.sort();
    ws_sorted.dedup();
    assert_eq!(ws_sorted.len(), ws.len(), "no alert twice on the WebSocket");
    assert!(ws.iter().all(|id| pg_ids.contains(id)));

    let dead_letters = std::fs::read_to_string(&dead).unwrap();
    assert!(
        dead_letters.contains("\"source\":\"prices/") && dead_letters.contains("{not json"),
        "{dead_letters}"
    );

    // Restart from the checkpoint (state + offsets + slot position): a rule created while the
    // job was down arrives through the slot (no re-snapshot), and the crossing it watches spans
    // the restart (ETH was last 3200 before it, 3300 after), so it fires once; nothing else is
    // read or alerted again.
    insert_rule(
        &pg,
        "eth2",
        "price_threshold",
        json!({"coin": "coingecko:ethereum", "operator": ">", "value": 3250}),
        None,
    );
    price(&producer, eth, 3300.0, T0 + 360).await; // crosses 3250 only (3200 → 3300)
    price(&producer, "coingecko:bitcoin", 48000.0, T0 + 420).await; // no crossing
    let stdout2 = dir.path().join("stdout2.jsonl");
    let job = start_job(&config, &stdout2);
    let hw = high_watermarks(&brokers);
    wait_until(
        "the restarted job to commit the new messages",
        Duration::from_secs(60),
        || committed_offsets(&brokers) == hw,
    );
    wait_until("the new rule's alert", Duration::from_secs(30), || count() == 5);
    stop_job(job);
    let after: Vec<(String, String)> = psql(
        &pg,
        "SELECT rule_id, alert_id FROM alert_history ORDER BY triggered_at, rule_id",
    )
    .lines()
    .map(|l| {
        let (r, id) = l.split_once('|').unwrap();
        (r.to_string(), id.to_string())
    })
    .collect();
    let rules_after: Vec<&str> = after.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        rules_after,
        vec!["tvl", "eth", "btc", "eth", "eth2"],
        "only the new rule fired after the restart"
    );
    let new_id = after.last().unwrap().1.clone();
    let out2: Vec<String> = alert_ids_in_file(&stdout2);
    assert_eq!(
        out2,
        vec![new_id.clone()],
        "the history is not read again; nothing old is alerted again"
    );
    let mut all_ids = pg_ids.clone();
    all_ids.push(new_id.clone());
    all_ids.sort();
    let mut again = alert_ids_in_topic(&brokers);
    again.sort();
    assert_eq!(again, all_ids, "defi-alerts: each alert once");
    let sqs_new: Vec<String> = sqs_alerts(&moto, &queue_url).into_iter().map(|(id, _, _)| id).collect();
    assert_eq!(sqs_new, vec![new_id], "SQS: only the new alert");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_outage_resumes_from_the_right_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = MockCluster::new(1).unwrap();
    for t in ["prices", "tvl", "transfers", "gas", "liquidations"] {
        cluster.create_topic(t, 3, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let rules = dir.path().join("rules.jsonl");
    std::fs::write(
        &rules,
        json!({"id": "x", "user_id": "u", "alert_type": "price_threshold", "throttle_minutes": 0,
            "conditions": {"coin": "coingecko:ethereum", "operator": ">", "value": 3000}})
        .to_string()
            + "\n",
    )
    .unwrap();
    let alerts = dir.path().join("alerts.jsonl");
    let config = dir.path().join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{port}\"\n\n[[sources.files]]\nkind = \"rules\"\npath = \"{rules}\"\n\n\
             [sources.kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"outage\"\nextra = {{ \"reconnect.backoff.max.ms\" = \"200\" }}\n\n\
             [sinks]\nstdout = false\n\n[sinks.jsonl]\nalerts = \"{alerts}\"\n",
            port = testkit::free_port(),
            rules = rules.display(),
            alerts = alerts.display()
        ),
    )
    .unwrap();
    let eth = "coingecko:ethereum";
    let stdout = dir.path().join("stdout");
    let job = start_job(&config, &stdout);
    let fired = || std::fs::read_to_string(&alerts).unwrap_or_default().lines().count();
    // Crossings alternate: every second tick crosses 3000 upwards.
    let mut t = T0;
    for _ in 0..3 {
        price(&producer, eth, 2900.0, t).await;
        price(&producer, eth, 3100.0, t + 60).await;
        t += 120;
    }
    wait_until("alerts before the outage", Duration::from_secs(60), || fired() == 3);
    cluster.broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.broker_up(1).unwrap();
    for _ in 0..3 {
        price(&producer, eth, 2900.0, t).await;
        price(&producer, eth, 3100.0, t + 60).await;
        t += 120;
    }
    wait_until("alerts after the outage", Duration::from_secs(60), || fired() == 6);
    let mut hw = high_watermarks(&brokers);
    hw.retain(|_, end| *end > 0); // empty partitions have nothing to commit
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = committed_offsets_of(&brokers, "outage");
        if got == hw {
            break;
        }
        assert!(Instant::now() < deadline, "committed {got:?}, end {hw:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    stop_job(job);
    let times: Vec<i64> = std::fs::read_to_string(&alerts)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["triggered_at"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        times,
        (0..6).map(|i| T0 + 60 + 120 * i).collect::<Vec<_>>(),
        "each crossing exactly once, in order"
    );
}
