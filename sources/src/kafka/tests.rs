//! Kafka source tests: unit tests of decoding and configuration, and end-to-end tests against
//! librdkafka's in-process mock cluster (real Kafka wire protocol, real consumer groups).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use schemas::{Kind, Record, SourcePos};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::decode::{Skip, decode};
use super::*;
use crate::live::{Ack, Change, LiveItem};

type Cluster = MockCluster<'static, DefaultProducerContext>;

const PARTITIONS: i32 = 3;
/// Long enough for a group join on the mock cluster (its initial rebalance delay is 3 s).
const WAIT: Duration = Duration::from_secs(30);

fn price(coin: &str, price: f64, ts: i64) -> String {
    format!(r#"{{"coin":"{coin}","price":{price},"timestamp":{ts}}}"#)
}

fn gas(chain: &str, gwei: f64, ts: i64) -> String {
    format!(r#"{{"chain":"{chain}","gwei":{gwei},"timestamp":{ts}}}"#)
}

fn cluster(topics: &[&str]) -> Cluster {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for t in topics {
        cluster.create_topic(t, PARTITIONS, 1).expect("create topic");
    }
    cluster
}

fn producer(cluster: &Cluster) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer")
}

/// Produces one message to an explicit partition; returns its offset.
async fn produce(p: &FutureProducer, topic: &str, partition: i32, key: Option<&str>, value: Option<&str>) -> i64 {
    let mut rec: FutureRecord<'_, str, str> = FutureRecord::to(topic).partition(partition);
    if let Some(k) = key {
        rec = rec.key(k);
    }
    if let Some(v) = value {
        rec = rec.payload(v);
    }
    let d = p.send(rec, Duration::from_secs(10)).await.expect("delivered");
    assert_eq!(d.partition, partition);
    d.offset
}

fn config(cluster: &Cluster, group: &str, topics: &[(Kind, &str)]) -> KafkaSourceConfig {
    KafkaSourceConfig {
        brokers: cluster.bootstrap_servers(),
        group_id: group.into(),
        topics: topics.iter().map(|(k, t)| (*k, t.to_string())).collect(),
        session_timeout_ms: 3000,
        ..KafkaSourceConfig::default()
    }
}

/// Receives exactly `n` items (panics after [`WAIT`]).
async fn recv_n(rx: &mut mpsc::Receiver<LiveItem>, n: usize) -> Vec<LiveItem> {
    let mut out = Vec::with_capacity(n);
    let deadline = Instant::now() + WAIT;
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, rx.recv()).await {
            Ok(Some(item)) => out.push(item),
            Ok(None) => panic!("source ended after {} of {n} items: {out:#?}", out.len()),
            Err(_) => panic!("timed out after {} of {n} items: {out:#?}", out.len()),
        }
    }
    out
}

/// Asserts nothing more arrives for a while.
async fn assert_quiet(rx: &mut mpsc::Receiver<LiveItem>) {
    if let Ok(Some(item)) = timeout(Duration::from_millis(1500), rx.recv()).await {
        panic!("unexpected item {item:#?}");
    }
}

/// `(topic, partition, offset)` of an item, checking `pos` and `ack` agree.
fn tpo(item: &LiveItem) -> (String, i32, i64) {
    let Ack::Kafka {
        topic,
        partition,
        offset,
    } = &item.ack
    else {
        panic!("not a Kafka ack: {item:?}")
    };
    assert_eq!(item.pos.to_string(), format!("{topic}/{partition}@{offset}"));
    (topic.clone(), *partition, *offset)
}

// ---- decoding (no broker) ----

fn pos() -> SourcePos {
    SourcePos::new("prices/2@".into(), 7)
}

#[test]
fn decode_spec_json_and_dead_letters() {
    let ok = decode(
        Kind::Price,
        &pos(),
        None,
        Some(price("coingecko:ethereum", 3791.12, 1717430350).as_bytes()),
    );
    let Ok(Change::Record(Record::Price(p))) = ok else {
        panic!("{ok:?}")
    };
    assert_eq!(
        (p.coin.as_str(), p.price, p.timestamp),
        ("coingecko:ethereum", 3791.12, 1_717_430_350_000)
    );

    for (value, reason) in [
        (Some(&b"{not json"[..]), "bad JSON"),
        (
            Some(br#"{"coin":"coingecko:ethereum","price":-1,"timestamp":1}"#),
            "price",
        ),
        (Some(b"[1,2]"), "not a JSON object"),
        (Some(b"\xff\xfe"), "invalid UTF-8"),
        (Some(b"  "), "empty message"),
        (None, "null payload"),
    ] {
        let r = decode(Kind::Price, &pos(), Some(b"k"), value);
        let Ok(Change::Dead(d)) = r else {
            panic!("{value:?}: {r:?}")
        };
        assert_eq!(d.source, "prices/2@7");
        assert!(d.reason.contains(reason), "{value:?}: {}", d.reason);
    }
    // A SPEC record with an extra string `PK` field is still a SPEC record.
    let v = r#"{"chain":"ethereum","gwei":21.5,"timestamp":1717430402,"PK":"x"}"#;
    assert!(matches!(
        decode(Kind::Gas, &pos(), None, Some(v.as_bytes())),
        Ok(Change::Record(Record::Gas(_)))
    ));
}

#[test]
fn decode_dynamodb_items() {
    let tvl = r#"{"PK":{"S":"hourlyTvl#2269"},"SK":{"N":"1717430400"},"ethereum":{"N":"100.5"},
        "arbitrum":{"N":"20"},"ethereum-staking":{"N":"7"},"tvl":{"N":"120.5"}}"#;
    let r = decode(Kind::Tvl, &pos(), None, Some(tvl.as_bytes()));
    let Ok(Change::Record(Record::Tvl(t))) = r else {
        panic!("{r:?}")
    };
    assert_eq!(t.protocol_id, "2269");
    assert_eq!(t.timestamp, 1_717_430_400_000);
    assert_eq!(t.chains, vec![("arbitrum".into(), 20.0), ("ethereum".into(), 100.5)]);
    assert_eq!(t.extra, vec![("ethereum-staking".into(), 7.0)]);

    let wrapped = r#"{"Item":{"PK":{"S":"coingecko#ethereum"},"SK":{"N":"0"},"price":{"N":"3791.12"},
        "timestamp":{"N":"1717430350"},"symbol":{"S":"ETH"}}}"#;
    let r = decode(Kind::Price, &pos(), None, Some(wrapped.as_bytes()));
    let Ok(Change::Record(Record::Price(p))) = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        (p.coin.as_str(), p.price, p.symbol.as_deref()),
        ("coingecko:ethereum", 3791.12, Some("ETH"))
    );

    let redirect =
        r#"{"PK":{"S":"asset#ethereum:0xA0B8"},"SK":{"N":"1717430000"},"redirect":{"S":"coingecko#usd-coin"}}"#;
    let r = decode(Kind::Price, &pos(), None, Some(redirect.as_bytes()));
    let Ok(Change::Dead(d)) = r else { panic!("{r:?}") };
    assert_eq!(d.reason, "redirect needs a price history; not supported on Kafka");
    assert_eq!(d.raw, redirect);

    let broken = r#"{"PK":{"S":"hourlyTvl#2269"},"SK":{"N":"soon"},"ethereum":{"N":"1"}}"#;
    let r = decode(Kind::Tvl, &pos(), None, Some(broken.as_bytes()));
    assert!(matches!(&r, Ok(Change::Dead(d)) if d.reason.contains("SK")), "{r:?}");

    let other = r#"{"PK":{"S":"config#x"},"SK":{"N":"0"}}"#;
    assert_eq!(
        decode(Kind::Tvl, &pos(), None, Some(other.as_bytes())),
        Err(Skip::OtherItem)
    );
    let deletion = r#"{"Metadata":{},"Keys":{"PK":{"S":"hourlyTvl#1"},"SK":{"N":"1"}}}"#;
    assert_eq!(
        decode(Kind::Tvl, &pos(), None, Some(deletion.as_bytes())),
        Err(Skip::Deletion)
    );
}

#[test]
fn tombstones_delete_rules_and_protocols() {
    assert_eq!(
        decode(Kind::Rule, &pos(), Some(b"r1"), None),
        Ok(Change::DeleteRule("r1".into()))
    );
    assert_eq!(
        decode(Kind::Protocol, &pos(), Some(b"2269"), None),
        Ok(Change::DeleteProtocol("2269".into()))
    );
    // Without a key there is nothing to delete.
    assert!(matches!(decode(Kind::Rule, &pos(), None, None), Ok(Change::Dead(_))));
}

#[test]
fn config_defaults_merging_and_validation() {
    let cfg = KafkaSourceConfig::default();
    assert_eq!(cfg.group_id, "llamaflow");
    assert_eq!(cfg.session_timeout_ms, 6000);
    assert_eq!(cfg.topics.get(&Kind::Price).map(String::as_str), Some("prices"));
    assert_eq!(
        cfg.topics.get(&Kind::Liquidation).map(String::as_str),
        Some("liquidations")
    );
    assert!(!cfg.topics.contains_key(&Kind::Rule));
    assert_eq!(cfg.validate().map(|m| m.len()).ok(), Some(5));

    let cfg: KafkaSourceConfig = serde_json::from_value(serde_json::json!({
        "brokers": "k:9092", "topics": {"prices": "p2", "rules": "alert-rules", "gas": ""},
        "assignment": [1, 2], "extra": {"fetch.max.bytes": "1048576"}
    }))
    .expect("config");
    assert_eq!(cfg.topics.get(&Kind::Price).map(String::as_str), Some("p2"));
    assert_eq!(cfg.topics.get(&Kind::Rule).map(String::as_str), Some("alert-rules"));
    assert_eq!(cfg.topics.get(&Kind::Tvl).map(String::as_str), Some("tvl"));
    assert!(!cfg.topics.contains_key(&Kind::Gas));
    assert_eq!(cfg.assignment, Some((1, 2)));
    let cc = cfg.client_config();
    assert_eq!(cc.get("enable.auto.commit"), Some("false"));
    assert_eq!(cc.get("enable.auto.offset.store"), Some("false"));
    assert_eq!(cc.get("fetch.max.bytes"), Some("1048576"));

    let e = serde_json::from_value::<KafkaSourceConfig>(serde_json::json!({"topics": {"candles": "c"}}));
    assert!(e.is_err_and(|e| e.to_string().contains("candles")));
    for bad in [
        serde_json::json!({"assignment": [2, 2]}),
        serde_json::json!({"topics": {"gas": "prices"}}),
        serde_json::json!({"extra": {"enable.auto.commit": "true"}}),
        serde_json::json!({"auto_offset_reset": "smallest"}),
    ] {
        let cfg: KafkaSourceConfig = serde_json::from_value(bad.clone()).expect("parses");
        assert!(matches!(cfg.validate(), Err(KafkaSourceError::Config(_))), "{bad}");
    }
}

#[test]
fn commit_offsets_take_the_highest_ack_plus_one() {
    let ack = |t: &str, p, o| Ack::Kafka {
        topic: t.into(),
        partition: p,
        offset: o,
    };
    let acks = [
        ack("prices", 0, 4),
        ack("prices", 0, 2),
        ack("gas", 1, 0),
        Ack::None,
        ack("prices", 1, 9),
    ];
    assert_eq!(
        commit_offsets(&acks),
        vec![("gas".into(), 1, 1), ("prices".into(), 0, 5), ("prices".into(), 1, 10)]
    );
}

// ---- against the mock cluster ----

#[tokio::test]
async fn delivers_every_partition_with_positions_and_kinds() {
    let cluster = cluster(&["prices", "gas"]);
    let p = producer(&cluster);
    let mut sent = BTreeMap::new();
    for part in 0..PARTITIONS {
        for i in 0..3 {
            let ts = 1_717_430_000 + i64::from(part) * 10 + i;
            let o = produce(
                &p,
                "prices",
                part,
                None,
                Some(&price("coingecko:ethereum", 3000.0 + ts as f64, ts)),
            )
            .await;
            sent.insert(("prices".to_string(), part, o), ts);
            let o = produce(&p, "gas", part, None, Some(&gas("ethereum", 20.0, ts))).await;
            sent.insert(("gas".to_string(), part, o), ts);
        }
    }
    let (tx, mut rx) = mpsc::channel(64);
    let cfg = config(&cluster, "g-deliver", &[(Kind::Price, "prices"), (Kind::Gas, "gas")]);
    let handle = start(&cfg, tx).await.expect("start");
    let items = recv_n(&mut rx, sent.len()).await;
    let mut last: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for item in &items {
        let (topic, partition, offset) = tpo(item);
        let ts = sent
            .remove(&(topic.clone(), partition, offset))
            .unwrap_or_else(|| panic!("unexpected or repeated {item:?}"));
        match (&item.change, topic.as_str()) {
            (Change::Record(Record::Price(r)), "prices") => assert_eq!(r.timestamp, ts * 1000),
            (Change::Record(Record::Gas(r)), "gas") => assert_eq!(r.timestamp, ts * 1000),
            other => panic!("wrong kind for {topic}: {other:?}"),
        }
        // Partition order is kept.
        let prev = last.insert((topic, partition), offset);
        assert!(prev.is_none_or(|p| p < offset), "{item:?} after {prev:?}");
    }
    assert!(sent.is_empty(), "not delivered: {sent:?}");
    assert_eq!(last.len(), 2 * PARTITIONS as usize);
    assert_quiet(&mut rx).await;
    handle.stop().await.expect("stop");
}

#[tokio::test]
async fn malformed_messages_are_dead_lettered_and_consumption_goes_on() {
    let cluster = cluster(&["prices"]);
    let p = producer(&cluster);
    produce(&p, "prices", 0, None, Some(&price("coingecko:bitcoin", 1.0, 1))).await;
    let bad_json = produce(&p, "prices", 0, None, Some("{\"coin\": oops")).await;
    produce(&p, "prices", 0, None, Some(&price("coingecko:bitcoin", 2.0, 2))).await;
    let null = produce(&p, "prices", 1, Some("k"), None).await;
    let invalid = produce(&p, "prices", 2, None, Some(r#"{"coin":"ETH","price":1,"timestamp":1}"#)).await;
    let after = produce(&p, "prices", 2, None, Some(&price("coingecko:bitcoin", 3.0, 3))).await;

    let (tx, mut rx) = mpsc::channel(64);
    let handle = start(&config(&cluster, "g-bad", &[(Kind::Price, "prices")]), tx)
        .await
        .expect("start");
    let items = recv_n(&mut rx, 6).await;
    let by_pos: BTreeMap<String, &LiveItem> = items.iter().map(|i| (i.pos.to_string(), i)).collect();
    let dead = |pos: &str| match by_pos.get(pos).map(|i| &i.change) {
        Some(Change::Dead(d)) => d.clone(),
        other => panic!("{pos}: {other:?}"),
    };
    let d = dead(&format!("prices/0@{bad_json}"));
    assert!(d.reason.starts_with("bad JSON"), "{}", d.reason);
    assert_eq!(
        (d.source.as_str(), d.raw.as_str()),
        (format!("prices/0@{bad_json}").as_str(), "{\"coin\": oops")
    );
    assert!(dead(&format!("prices/1@{null}")).reason.contains("null payload"));
    assert!(
        dead(&format!("prices/2@{invalid}"))
            .reason
            .contains("unknown coin form")
    );
    // Later messages of the same partitions still arrive.
    let later = by_pos.get(&format!("prices/2@{after}")).map(|i| &i.change);
    assert!(
        matches!(later, Some(Change::Record(Record::Price(p))) if p.price == 3.0),
        "{later:?}"
    );
    assert!(matches!(
        by_pos.get(&format!("prices/0@{}", bad_json + 1)).map(|i| &i.change),
        Some(Change::Record(Record::Price(_)))
    ));
    handle.stop().await.expect("stop");
}

#[tokio::test]
async fn resumes_after_the_committed_offsets_only() {
    let cluster = cluster(&["prices"]);
    let p = producer(&cluster);
    for part in 0..PARTITIONS {
        for i in 0..4 {
            produce(
                &p,
                "prices",
                part,
                None,
                Some(&price("coingecko:ethereum", 1.0 + i as f64, i)),
            )
            .await;
        }
    }
    let cfg = config(&cluster, "g-commit", &[(Kind::Price, "prices")]);

    let (tx, mut rx) = mpsc::channel(64);
    let a = start(&cfg, tx).await.expect("start a");
    let items = recv_n(&mut rx, 12).await;
    assert_quiet(&mut rx).await;
    // The pipeline made the first two messages of each partition durable.
    let done: Vec<Ack> = items.iter().filter(|i| tpo(i).2 < 2).map(|i| i.ack.clone()).collect();
    assert_eq!(done.len(), 6);
    let offsets = commit_offsets(&done);
    assert_eq!(
        offsets,
        (0..PARTITIONS)
            .map(|p| ("prices".to_string(), p, 2))
            .collect::<Vec<_>>()
    );
    a.commit(&offsets).await.expect("commit");
    a.stop().await.expect("stop a");

    // Twice: a source that commits nothing leaves the group's offsets where they were.
    for run in ["b", "c"] {
        let (tx, mut rx) = mpsc::channel(64);
        let h = start(&cfg, tx).await.expect("start");
        let items = recv_n(&mut rx, 6).await;
        let got: BTreeSet<(String, i32, i64)> = items.iter().map(tpo).collect();
        let want: BTreeSet<(String, i32, i64)> = (0..PARTITIONS)
            .flat_map(|p| [("prices".to_string(), p, 2), ("prices".to_string(), p, 3)])
            .collect();
        assert_eq!(got, want, "run {run}");
        assert_quiet(&mut rx).await;
        h.stop().await.expect("stop");
    }
}

#[tokio::test]
async fn manual_assignment_splits_partitions_and_commits() {
    let cluster = cluster(&["prices", "gas"]);
    let p = producer(&cluster);
    for part in 0..PARTITIONS {
        produce(&p, "prices", part, None, Some(&price("coingecko:ethereum", 1.0, 1))).await;
        produce(&p, "gas", part, None, Some(&gas("ethereum", 1.0, 1))).await;
    }
    let topics = [(Kind::Price, "prices"), (Kind::Gas, "gas")];
    let mut seen: Vec<BTreeSet<(String, i32)>> = Vec::new();
    let mut handles = Vec::new();
    let mut receivers = Vec::new();
    for index in 0..2 {
        let cfg = KafkaSourceConfig {
            assignment: Some((index, 2)),
            ..config(&cluster, "g-manual", &topics)
        };
        let (tx, rx) = mpsc::channel(64);
        handles.push(start(&cfg, tx).await.expect("start"));
        receivers.push(rx);
    }
    let expected = [
        vec![0, 2], // p % 2 == 0
        vec![1],    // p % 2 == 1
    ];
    for (index, rx) in receivers.iter_mut().enumerate() {
        let n = 2 * expected[index].len();
        let items = recv_n(rx, n).await;
        let parts: BTreeSet<(String, i32)> = items.iter().map(|i| (tpo(i).0, tpo(i).1)).collect();
        let want: BTreeSet<(String, i32)> = ["gas", "prices"]
            .iter()
            .flat_map(|t| expected[index].iter().map(|p| (t.to_string(), *p)))
            .collect();
        assert_eq!(parts, want, "process {index}");
        assert_eq!(
            handles[index].assignment().expect("assignment"),
            want.iter().cloned().collect::<Vec<_>>()
        );
        assert_quiet(rx).await;
        seen.push(parts);
    }
    assert!(seen[0].is_disjoint(&seen[1]));
    assert_eq!(seen[0].len() + seen[1].len(), 2 * PARTITIONS as usize);

    // Offsets committed under manual assignment are where a restarted process resumes.
    let mut handles = handles.into_iter();
    let first = handles.next().expect("process 0");
    first
        .commit(&[("prices".into(), 0, 1), ("prices".into(), 2, 1)])
        .await
        .expect("commit");
    // Partition 1 is not this process's: not committed.
    first
        .commit(&[("prices".into(), 1, 1)])
        .await
        .expect("commit of a foreign partition is a no-op");
    first.stop().await.expect("stop");
    for h in handles {
        h.stop().await.expect("stop");
    }
    produce(&p, "prices", 0, None, Some(&price("coingecko:ethereum", 2.0, 2))).await;
    let (tx, mut rx) = mpsc::channel(64);
    let cfg = KafkaSourceConfig {
        assignment: Some((0, 2)),
        ..config(&cluster, "g-manual", &topics)
    };
    let again = start(&cfg, tx).await.expect("restart");
    let items = recv_n(&mut rx, 3).await;
    let got: BTreeSet<(String, i32, i64)> = items.iter().map(tpo).collect();
    let want: BTreeSet<(String, i32, i64)> = [("prices".into(), 0, 1), ("gas".into(), 0, 0), ("gas".into(), 2, 0)]
        .into_iter()
        .collect();
    assert_eq!(got, want);
    assert_quiet(&mut rx).await;
    again.stop().await.expect("stop");
}

#[tokio::test]
async fn dynamodb_items_decode_to_records() {
    let cluster = cluster(&["tvl", "prices"]);
    let p = producer(&cluster);
    let item = r#"{"PK":{"S":"hourlyTvl#2269"},"SK":{"N":"1717430400"},"ethereum":{"N":"11873349211.52"},
        "arbitrum":{"N":"250000000"},"ethereum-borrowed":{"N":"5"},"tvl":{"N":"12123349211.52"}}"#;
    let tvl_at = produce(&p, "tvl", 1, Some("hourlyTvl#2269"), Some(item)).await;
    let skipped = produce(
        &p,
        "tvl",
        1,
        None,
        Some(r#"{"PK":{"S":"tokenTvl#2269"},"SK":{"N":"1"}}"#),
    )
    .await;
    let spec = produce(
        &p,
        "tvl",
        1,
        None,
        Some(r#"{"protocol_id":"1","chain":"base","tvl":5,"timestamp":9}"#),
    )
    .await;
    let wrapped = r#"{"Item":{"PK":{"S":"asset#ethereum:0xA0B8"},"SK":{"N":"1717430000"},"price":{"N":"0.9998"}}}"#;
    let price_at = produce(&p, "prices", 0, None, Some(wrapped)).await;

    let (tx, mut rx) = mpsc::channel(64);
    let cfg = config(&cluster, "g-dynamo", &[(Kind::Tvl, "tvl"), (Kind::Price, "prices")]);
    let handle = start(&cfg, tx).await.expect("start");
    let items = recv_n(&mut rx, 3).await;
    let by_pos: BTreeMap<String, &Change> = items.iter().map(|i| (i.pos.to_string(), &i.change)).collect();
    let Some(Change::Record(Record::Tvl(t))) = by_pos.get(&format!("tvl/1@{tvl_at}")) else {
        panic!("{by_pos:#?}")
    };
    assert_eq!((t.protocol_id.as_str(), t.timestamp), ("2269", 1_717_430_400_000));
    assert_eq!(
        t.chains,
        vec![
            ("arbitrum".into(), 250_000_000.0),
            ("ethereum".into(), 11_873_349_211.52)
        ]
    );
    assert_eq!(t.extra, vec![("ethereum-borrowed".into(), 5.0)]);
    assert!(!by_pos.contains_key(&format!("tvl/1@{skipped}")));
    assert!(
        matches!(by_pos.get(&format!("tvl/1@{spec}")), Some(Change::Record(Record::Tvl(t))) if t.protocol_id == "1")
    );
    let Some(Change::Record(Record::Price(pt))) = by_pos.get(&format!("prices/0@{price_at}")) else {
        panic!("{by_pos:#?}")
    };
    assert_eq!(
        (pt.coin.as_str(), pt.price, pt.timestamp),
        ("ethereum:0xa0b8", 0.9998, 1_717_430_000_000)
    );
    assert_quiet(&mut rx).await;
    handle.stop().await.expect("stop");
}

#[tokio::test]
async fn rules_topic_upserts_and_tombstones() {
    let cluster = cluster(&["rules"]);
    let p = producer(&cluster);
    let rule = r#"{"id":"r1","user_id":"u1","alert_type":"gas_price",
        "conditions":{"chain":"ethereum","operator":">","gwei":100}}"#;
    produce(&p, "rules", 0, Some("r1"), Some(rule)).await;
    produce(&p, "rules", 0, Some("r1"), None).await;
    let (tx, mut rx) = mpsc::channel(64);
    let handle = start(&config(&cluster, "g-rules", &[(Kind::Rule, "rules")]), tx)
        .await
        .expect("start");
    let items = recv_n(&mut rx, 2).await;
    assert!(
        matches!(&items[0].change, Change::Record(Record::Rule(r)) if r.id == "r1"),
        "{items:?}"
    );
    assert_eq!(items[1].change, Change::DeleteRule("r1".into()));
    handle.stop().await.expect("stop");
}

/// Small channels read slowly: partitions are paused and resumed many times (after every item
/// with one slot; with hysteresis with seven), and every message still arrives exactly once,
/// in partition order.
#[tokio::test]
async fn backpressure_loses_and_repeats_nothing() {
    let cluster = cluster(&["gas"]);
    let p = producer(&cluster);
    let per_partition = 40;
    for part in 0..PARTITIONS {
        for i in 0..per_partition {
            produce(&p, "gas", part, None, Some(&gas("ethereum", 1.0, i))).await;
        }
    }
    for capacity in [1, 7] {
        let (tx, mut rx) = mpsc::channel(capacity);
        let group = format!("g-slow-{capacity}");
        let handle = start(&config(&cluster, &group, &[(Kind::Gas, "gas")]), tx)
            .await
            .expect("start");
        let mut next = [0i64; PARTITIONS as usize];
        for n in 0..(per_partition as usize * PARTITIONS as usize) {
            let item = recv_n(&mut rx, 1).await.remove(0);
            let (_, partition, offset) = tpo(&item);
            let slot = &mut next[usize::try_from(partition).expect("partition")];
            assert_eq!(
                offset, *slot,
                "capacity {capacity}, partition {partition}: gap or repeat"
            );
            *slot += 1;
            if n % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        assert_eq!(next, [per_partition; PARTITIONS as usize]);
        assert_quiet(&mut rx).await;
        handle.stop().await.expect("stop");
    }
}

/// The mock cluster cannot look offsets up by time (it answers "end" for any timestamp), so
/// this checks the wiring: with a backfill start the committed / earliest offset is overridden
/// on first assignment, and messages produced after it are delivered.
#[tokio::test]
async fn start_from_timestamp_overrides_the_start_offset() {
    let cluster = cluster(&["gas"]);
    let p = producer(&cluster);
    for part in 0..PARTITIONS {
        produce(&p, "gas", part, None, Some(&gas("ethereum", 1.0, 1))).await;
    }
    let cfg = KafkaSourceConfig {
        start_from_timestamp_ms: Some(4_102_444_800_000), // 2100-01-01
        ..config(&cluster, "g-backfill", &[(Kind::Gas, "gas")])
    };
    let (tx, mut rx) = mpsc::channel(64);
    let handle = start(&cfg, tx).await.expect("start");
    let deadline = Instant::now() + WAIT;
    while handle.assignment().expect("assignment").len() < PARTITIONS as usize {
        assert!(Instant::now() < deadline, "no assignment");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give the fetchers time to settle on their start offsets.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let new = produce(&p, "gas", 1, None, Some(&gas("ethereum", 2.0, 2))).await;
    let items = recv_n(&mut rx, 1).await;
    assert_eq!(tpo(&items[0]), ("gas".into(), 1, new));
    assert_quiet(&mut rx).await;
    handle.stop().await.expect("stop");
}

/// Current-thread runtime: the source's tasks run on this thread, so the local recorder sees
/// their metrics. The debugging recorder zeroes values on every snapshot: counters are summed
/// over snapshots, and snapshots are taken more than a lag period apart so every gauge read was
/// set since the previous one.
#[tokio::test]
async fn metrics_count_records_and_report_lag() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let mut records = 0;
    let mut read = || {
        let mut lag = BTreeMap::new();
        for (key, _, _, value) in snap.snapshot().into_vec() {
            let key = key.key();
            let labels: BTreeMap<String, String> = key
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            match (key.name(), value) {
                ("llamaflow_kafka_lag", DebugValue::Gauge(v)) => {
                    assert_eq!(labels.get("topic").map(String::as_str), Some("lagging"));
                    lag.insert(labels["partition"].clone(), v.into_inner());
                }
                ("llamaflow_records_in_total", DebugValue::Counter(n)) => {
                    assert_eq!(
                        (labels["source"].as_str(), labels["topic"].as_str()),
                        ("kafka", "lagging")
                    );
                    records += n;
                }
                _ => {}
            }
        }
        (lag, records)
    };
    let period = Duration::from_millis(1300);

    let cluster = cluster(&["lagging"]);
    let p = producer(&cluster);
    for i in 0..10 {
        produce(&p, "lagging", 0, None, Some(&gas("ethereum", 1.0, i))).await;
    }
    // One slot, nothing read: the source pauses after two messages, 8 behind on partition 0.
    let (tx, mut rx) = mpsc::channel(1);
    let handle = start(&config(&cluster, "g-lag", &[(Kind::Gas, "lagging")]), tx)
        .await
        .expect("start");
    let deadline = Instant::now() + WAIT;
    loop {
        tokio::time::sleep(period).await;
        let (lag, _) = read();
        if lag.get("0") == Some(&8.0) && lag.len() == PARTITIONS as usize {
            assert_eq!((lag["1"], lag["2"]), (0.0, 0.0));
            break;
        }
        assert!(Instant::now() < deadline, "lag never reported: {lag:?}");
    }
    // Paused: still 8 behind a period later.
    tokio::time::sleep(period).await;
    assert_eq!(read().0.get("0"), Some(&8.0));
    recv_n(&mut rx, 10).await;
    loop {
        tokio::time::sleep(period).await;
        let (lag, records) = read();
        if lag.get("0") == Some(&0.0) {
            assert_eq!(records, 10);
            break;
        }
        assert!(Instant::now() < deadline, "lag never went to 0: {lag:?}");
    }
    handle.stop().await.expect("stop");
}
