//! Kafka sink tests against librdkafka's in-process mock cluster (real Kafka wire protocol),
//! read back with an independent consumer.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use schemas::{Alert, Event, EventData};
use serde_json::Value;

use super::*;
use crate::OutputBatch;

type Cluster = MockCluster<'static, DefaultProducerContext>;

const BROKERS: i32 = 3;
const PARTITIONS: i32 = 3;

fn cluster() -> Cluster {
    let cluster = MockCluster::new(BROKERS).expect("mock cluster");
    for t in ["defi-events", "defi-alerts"] {
        cluster.create_topic(t, PARTITIONS, 1).expect("create topic");
    }
    cluster
}

fn config(cluster: &Cluster) -> KafkaSinkConfig {
    KafkaSinkConfig {
        brokers: cluster.bootstrap_servers(),
        ..KafkaSinkConfig::default()
    }
}

fn price_event(coin: &str, price: f64, ts: i64) -> Event {
    Event {
        subject: coin.into(),
        timestamp: ts,
        data: EventData::PriceUpdate {
            coin: coin.into(),
            price,
            symbol: None,
            confidence: Some(0.99),
            decimals: None,
            timestamp: ts,
            change_1h: None,
            change_24h: Some(-1.5),
        },
    }
}

fn gas_event(chain: &str, gwei: f64, ts: i64) -> Event {
    Event {
        subject: chain.into(),
        timestamp: ts,
        data: EventData::GasUpdate {
            chain: chain.into(),
            gwei,
            timestamp: ts,
        },
    }
}

fn alert(id: &str, user: &str, ts: i64) -> Alert {
    Alert {
        alert_id: format!("{id:0>32}"),
        rule_id: format!("r-{id}"),
        user_id: user.into(),
        alert_type: "price_change".into(),
        subject: "coingecko:ethereum".into(),
        triggered_at: ts,
        value: -5.31,
        threshold: 5.0,
        message: "ETH -5.31% in 1h (3791.12 → 3589.80)".into(),
        channels: vec!["websocket".into(), "webhook".into()],
        webhook_url: Some("https://example.test/hook".into()),
    }
}

/// Reads every message of `topic` from the beginning with a separate consumer, until `n` are
/// in: `(partition, key, value)` in partition order.
fn read_back(cluster: &Cluster, topic: &str, n: usize) -> Vec<(i32, String, Value)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", format!("reader-{topic}-{n}"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning).expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages in {topic}: {out:?}",
            out.len()
        );
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.expect("message");
        let key = String::from_utf8(m.key().expect("key").to_vec()).expect("utf-8 key");
        let value: Value = serde_json::from_slice(m.payload().expect("payload")).expect("JSON value");
        out.push((m.partition(), key, value));
    }
    // Nothing beyond what was expected.
    let extra = consumer.poll(Duration::from_millis(1000));
    assert!(extra.is_none(), "unexpected message in {topic}");
    out
}

#[tokio::test]
async fn writes_events_and_alerts_with_keys_json_and_per_key_order() {
    let cluster = cluster();
    let mut sink = KafkaSink::connect(config(&cluster)).await.expect("connect");
    let mut events = Vec::new();
    for i in 0..5 {
        events.push(price_event(
            "coingecko:ethereum",
            3000.0 + f64::from(i),
            1_717_430_400_000 + i64::from(i) * 1000,
        ));
        events.push(gas_event(
            "ethereum",
            20.0 + f64::from(i),
            1_717_430_400_000 + i64::from(i) * 1000,
        ));
    }
    events.push(price_event("coingecko:bitcoin", 68000.0, 1_717_430_400_500));
    let alerts = vec![
        alert("a1", "u1", 1_717_430_400_000),
        alert("a2", "u2", 1_717_430_401_000),
        alert("a3", "u1", 1_717_430_402_000),
    ];
    let batch = OutputBatch {
        epoch: 7,
        alerts: alerts.clone(),
        events: events.clone(),
        ..Default::default()
    };
    sink.write(&batch).await.expect("write");

    let got = read_back(&cluster, "defi-events", events.len());
    // Every event, with its subject as key and the SPEC §3 JSON as value.
    let mut want: Vec<(String, Value)> = events
        .iter()
        .map(|e| (e.subject.clone(), serde_json::to_value(e).expect("json")))
        .collect();
    let mut have: Vec<(String, Value)> = got.iter().map(|(_, k, v)| (k.clone(), v.clone())).collect();
    want.sort_by_key(|(k, v)| (k.clone(), v.to_string()));
    have.sort_by_key(|(k, v)| (k.clone(), v.to_string()));
    assert_eq!(have, want);
    let first = &got
        .iter()
        .find(|(_, k, _)| k == "coingecko:bitcoin")
        .expect("bitcoin")
        .2;
    assert_eq!(first["type"], "price_update");
    assert_eq!(first["subject"], "coingecko:bitcoin");
    assert_eq!(first["data"]["price"], 68000.0);
    // One key, one partition, batch order.
    let mut partitions: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    let mut times: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (p, k, v) in &got {
        partitions.entry(k.as_str()).or_default().push(*p);
        times
            .entry(k.as_str())
            .or_default()
            .push(v["timestamp"].as_f64().expect("timestamp"));
    }
    for (k, ps) in &partitions {
        assert!(ps.iter().all(|p| *p == ps[0]), "{k} spread over {ps:?}");
    }
    let sent: Vec<f64> = (0..5).map(|i| 1_717_430_400.0 + f64::from(i)).collect();
    assert_eq!(times["coingecko:ethereum"], sent);
    assert_eq!(times["ethereum"], sent);

    let got = read_back(&cluster, "defi-alerts", alerts.len());
    let mut have: Vec<(String, Value)> = got.iter().map(|(_, k, v)| (k.clone(), v.clone())).collect();
    have.sort_by_key(|(_, v)| v["alert_id"].as_str().unwrap_or_default().to_string());
    let want: Vec<(String, Value)> = alerts
        .iter()
        .map(|a| (a.user_id.clone(), serde_json::to_value(a).expect("json")))
        .collect();
    assert_eq!(have, want);
    assert_eq!(have[0].1["triggered_at"], 1_717_430_400);
    let u1: Vec<&str> = got
        .iter()
        .filter(|(_, k, _)| k == "u1")
        .map(|(_, _, v)| v["alert_id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(u1, [alerts[0].alert_id.as_str(), alerts[2].alert_id.as_str()]);
}

#[tokio::test]
async fn events_can_be_turned_off_and_empty_batches_write_nothing() {
    let cluster = cluster();
    let cfg = KafkaSinkConfig {
        publish_events: false,
        ..config(&cluster)
    };
    let mut sink = KafkaSink::connect(cfg).await.expect("connect");
    sink.write(&OutputBatch::default()).await.expect("empty");
    let batch = OutputBatch {
        epoch: 1,
        alerts: vec![alert("a1", "u1", 1_000)],
        events: vec![gas_event("ethereum", 1.0, 1_000)],
        ..Default::default()
    };
    sink.write(&batch).await.expect("write");
    assert_eq!(read_back(&cluster, "defi-alerts", 1)[0].1, "u1");
    assert!(read_back(&cluster, "defi-events", 0).is_empty());
}

/// Current-thread runtime: the local recorder sees the sink's metrics. The debugging recorder
/// zeroes counters on every snapshot, so each snapshot shows what happened since the last one.
#[tokio::test]
async fn brokers_down_fails_the_write_and_recovery_succeeds() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let counters = || {
        let mut out = BTreeMap::new();
        for (key, _, _, value) in snap.snapshot().into_vec() {
            let key = key.key();
            assert!(
                key.labels().any(|l| l.key() == "sink" && l.value() == "kafka"),
                "{key:?}"
            );
            match value {
                DebugValue::Counter(n) => *out.entry(key.name().to_string()).or_insert(0) += n,
                DebugValue::Histogram(v) => *out.entry(key.name().to_string()).or_insert(0) += v.len() as u64,
                DebugValue::Gauge(_) => {}
            }
        }
        out
    };

    let cluster = cluster();
    // Reconnect quickly once the brokers are back (librdkafka backs off up to 10 s by default,
    // longer than this short message timeout).
    let cfg = KafkaSinkConfig {
        message_timeout_ms: 2000,
        extra: [("reconnect.backoff.max.ms".to_string(), "200".to_string())].into(),
        ..config(&cluster)
    };
    let mut sink = KafkaSink::connect(cfg).await.expect("connect");
    let batch = |epoch: u64, user: &str| OutputBatch {
        epoch,
        alerts: vec![alert(&format!("e{epoch}"), user, 1_000)],
        events: vec![gas_event("ethereum", 1.0, 1_000)],
        ..Default::default()
    };
    sink.write(&batch(1, "u1")).await.expect("healthy write");
    let c = counters();
    assert_eq!(c.get("llamaflow_sink_written_total"), Some(&2));
    assert_eq!(c.get("llamaflow_sink_latency_seconds"), Some(&1));

    for id in 1..=BROKERS {
        cluster.broker_down(id).expect("broker down");
    }
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), sink.write(&batch(2, "u2")))
        .await
        .expect("write must fail, not hang")
        .expect_err("nothing can be delivered");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let KafkaSinkError::Delivery {
        topic,
        key,
        failed,
        total,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(
        (topic.as_str(), key.as_str(), *failed, *total),
        ("defi-events", "ethereum", 2, 2)
    );
    assert!(
        err.to_string().contains("defi-events") && err.to_string().contains("ethereum"),
        "{err}"
    );
    let c = counters();
    assert_eq!(c.get("llamaflow_sink_failures_total"), Some(&1));
    assert_eq!(c.get("llamaflow_sink_written_total").copied().unwrap_or(0), 0);

    for id in 1..=BROKERS {
        cluster.broker_up(id).expect("broker up");
    }
    tokio::time::timeout(Duration::from_secs(30), sink.write(&batch(3, "u3")))
        .await
        .expect("no hang")
        .expect("write after recovery");
    assert_eq!(counters().get("llamaflow_sink_written_total"), Some(&2));
    let alerts = read_back(&cluster, "defi-alerts", 2);
    let users: Vec<&str> = alerts.iter().map(|(_, k, _)| k.as_str()).collect();
    assert!(users.contains(&"u1") && users.contains(&"u3"), "{users:?}");
}

#[test]
fn config_defaults_and_guards() {
    let cfg = KafkaSinkConfig::default();
    assert_eq!(
        (cfg.events_topic.as_str(), cfg.alerts_topic.as_str()),
        ("defi-events", "defi-alerts")
    );
    assert!(cfg.publish_events);
    assert_eq!(cfg.message_timeout_ms, 30_000);
    let cc = cfg.client_config();
    assert_eq!(cc.get("enable.idempotence"), Some("true"));
    assert_eq!(cc.get("acks"), Some("all"));
    let cfg: KafkaSinkConfig =
        serde_json::from_value(serde_json::json!({"brokers": "k:9092", "extra": {"enable.idempotence": "false"}}))
            .expect("parses");
    assert!(matches!(cfg.validate(), Err(KafkaSinkError::Config(m)) if m.contains("enable.idempotence")));
    assert!(serde_json::from_value::<KafkaSinkConfig>(serde_json::json!({"topic": "x"})).is_err());
}
