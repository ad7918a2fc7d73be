//! Time-range reads against librdkafka's mock cluster. The mock cannot look offsets up by
//! time, so these also exercise the fallback (read from the start, filter by timestamp).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use schemas::{Kind, Record};

use super::range::{KafkaRangeConfig, open_range};
use crate::Input;

type Cluster = MockCluster<'static, DefaultProducerContext>;

const BASE: i64 = 1_717_430_400_000;

fn cluster(topics: &[(&str, i32)]) -> Cluster {
    let c = MockCluster::new(1).expect("mock cluster");
    for (t, n) in topics {
        c.create_topic(t, *n, 1).expect("create topic");
    }
    c
}

async fn produce(p: &FutureProducer, topic: &str, partition: i32, ts_ms: i64, value: &str) {
    let rec: FutureRecord<'_, str, str> = FutureRecord::to(topic)
        .partition(partition)
        .timestamp(ts_ms)
        .payload(value);
    p.send(rec, Duration::from_secs(10)).await.expect("delivered");
}

fn producer(c: &Cluster) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", c.bootstrap_servers())
        .set("message.timeout.ms", "10000")
        .create()
        .expect("producer")
}

fn config(c: &Cluster, from: Option<i64>, to: Option<i64>) -> KafkaRangeConfig {
    KafkaRangeConfig {
        topics: [(Kind::Price, "prices"), (Kind::Gas, "gas"), (Kind::Tvl, "tvl-missing")]
            .into_iter()
            .map(|(k, t)| (k, t.to_string()))
            .collect(),
        idle_timeout: Duration::from_secs(20),
        ..KafkaRangeConfig::new(c.bootstrap_servers(), from, to)
    }
}

/// Reads every source to its end (on a blocking thread); `(source position, record)` per input.
async fn read_all(cfg: KafkaRangeConfig) -> (Vec<Vec<Input>>, u64) {
    tokio::task::spawn_blocking(move || {
        let range = open_range(&cfg).expect("open");
        let mut out = Vec::new();
        for s in range.sources {
            out.push(s.collect::<Vec<Input>>());
        }
        range.status.result().expect("read to the end");
        (out, range.status.skipped())
    })
    .await
    .unwrap()
}

fn price_ts(i: &Input) -> i64 {
    match i {
        Input::Record(_, Record::Price(p)) => p.timestamp,
        other => panic!("not a price: {other:?}"),
    }
}

#[tokio::test]
async fn reads_only_messages_inside_the_range_per_partition_in_order() {
    let c = cluster(&[("prices", 3), ("gas", 2)]);
    let p = producer(&c);
    for part in 0..3 {
        for i in 0..10i64 {
            let ts = BASE + i * 1000;
            let v = format!(
                r#"{{"coin":"coingecko:c{part}","price":{},"timestamp":{}}}"#,
                1 + i,
                ts / 1000
            );
            produce(&p, "prices", part, ts, &v).await;
        }
    }
    // Gas only before the range: its partitions are found empty without reading them.
    produce(
        &p,
        "gas",
        0,
        BASE - 60_000,
        r#"{"chain":"ethereum","gwei":1,"timestamp":1}"#,
    )
    .await;
    // A bad value inside the range is a dead letter at its position.
    produce(&p, "prices", 1, BASE + 5500, "{not json").await;

    let (sources, skipped) = read_all(config(&c, Some(BASE + 3000), Some(BASE + 7000))).await;
    assert_eq!(sources.len(), 3, "one source per non-empty prices partition");
    for (part, inputs) in sources.iter().enumerate() {
        let records: Vec<&Input> = inputs.iter().filter(|i| matches!(i, Input::Record(..))).collect();
        let ts: Vec<i64> = records.iter().map(|i| price_ts(i)).collect();
        assert_eq!(
            ts,
            vec![BASE + 3000, BASE + 4000, BASE + 5000, BASE + 6000],
            "partition {part}"
        );
        if let Input::Record(pos, _) = records[0] {
            assert_eq!(pos.to_string(), format!("prices/{part}@3"));
        }
    }
    let dead: Vec<&Input> = sources
        .iter()
        .flatten()
        .filter(|i| matches!(i, Input::Dead(_)))
        .collect();
    assert_eq!(dead.len(), 1);
    if let Input::Dead(d) = dead[0] {
        assert_eq!(d.source, "prices/1@10");
    }
    // Outside the range: 6 per partition.
    assert_eq!(skipped, 18);
}

#[tokio::test]
async fn an_open_range_reads_every_partition_to_its_end() {
    let c = cluster(&[("prices", 2), ("gas", 1)]);
    let p = producer(&c);
    for i in 0..5i64 {
        produce(
            &p,
            "prices",
            (i % 2) as i32,
            BASE + i,
            &format!(
                r#"{{"coin":"coingecko:x","price":1,"timestamp":{}}}"#,
                1_717_430_400 + i
            ),
        )
        .await;
    }
    produce(
        &p,
        "gas",
        0,
        BASE,
        r#"{"chain":"ethereum","gwei":2.5,"timestamp":1717430400}"#,
    )
    .await;
    let (sources, skipped) = read_all(config(&c, None, None)).await;
    let counts: BTreeMap<usize, usize> = sources.iter().map(Vec::len).enumerate().collect();
    assert_eq!(counts.values().sum::<usize>(), 6, "{counts:?}");
    assert_eq!(skipped, 0);
    let gas = sources
        .iter()
        .flatten()
        .filter(|i| matches!(i, Input::Record(_, Record::Gas(g)) if g.gwei == 2.5))
        .count();
    assert_eq!(gas, 1);
}

#[test]
fn empty_ranges_and_missing_topics_are_errors() {
    let c = cluster(&[("prices", 1)]);
    let e = open_range(&config(&c, Some(BASE), Some(BASE))).err().unwrap();
    assert!(e.to_string().contains("empty"), "{e}");
    let mut cfg = config(&c, None, None);
    cfg.topics = [(Kind::Price, "nope".to_string())].into_iter().collect();
    let e = open_range(&cfg).err().unwrap();
    assert!(e.to_string().contains("nope"), "{e}");
}
