//! Tests against real `redis-server`s (testkit), read back through separate connections.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use metrics_util::debugging::DebuggingRecorder;

use crate::test_support::metrics_of;
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use serde_json::{Value, json};
use testkit::Redis;

use schemas::{Alert, Event, EventData, Millis};

use super::sink::{build_pipeline, newest_per_key};
use super::{RedisSink, RedisSinkConfig, RedisSinkError};
use crate::OutputBatch;
use crate::retry::jittered;

const T0: Millis = 1_717_430_400_000;
const WAIT: Duration = Duration::from_secs(10);

fn price(coin: &str, price: f64, ts: Millis) -> Event {
    Event {
        subject: coin.to_string(),
        timestamp: ts,
        data: EventData::PriceUpdate {
            coin: coin.to_string(),
            price,
            symbol: Some("ETH".to_string()),
            confidence: Some(0.99),
            decimals: None,
            timestamp: ts,
            change_1h: Some(1.25),
            change_24h: None,
        },
    }
}

fn tvl(protocol: &str, chains: &[(&str, f64)], ts: Millis) -> Event {
    let chain_tvls: BTreeMap<String, f64> = chains.iter().map(|(c, v)| (c.to_string(), *v)).collect();
    Event {
        subject: protocol.to_string(),
        timestamp: ts,
        data: EventData::TvlUpdate {
            protocol_id: protocol.to_string(),
            name: Some("Aave".to_string()),
            tvl: chain_tvls.values().sum(),
            chain_tvls,
            extra: BTreeMap::from([("borrowed".to_string(), 7.0)]),
            change_1h: Some(1.5),
            change_1d: None,
            change_7d: Some(-2.0),
            timestamp: ts,
        },
    }
}

fn gas(chain: &str, gwei: f64, ts: Millis) -> Event {
    Event {
        subject: chain.to_string(),
        timestamp: ts,
        data: EventData::GasUpdate {
            chain: chain.to_string(),
            gwei,
            timestamp: ts,
        },
    }
}

fn depeg(ts: Millis) -> Event {
    Event {
        subject: "coingecko:usd-coin".to_string(),
        timestamp: ts,
        data: EventData::Depeg {
            coin: "coingecko:usd-coin".to_string(),
            symbol: Some("USDC".to_string()),
            price: 0.97,
            peg: 1.0,
            deviation_pct: 3.0,
            state: "enter",
            timestamp: ts,
        },
    }
}

fn alert(id: &str, user: &str) -> Alert {
    Alert {
        alert_id: id.to_string(),
        rule_id: format!("rule-{id}"),
        user_id: user.to_string(),
        alert_type: "price_threshold".to_string(),
        subject: "coingecko:ethereum".to_string(),
        triggered_at: T0,
        value: 3500.0,
        threshold: 3000.0,
        message: format!("alert {id}"),
        channels: vec!["websocket".to_string()],
        webhook_url: None,
    }
}

fn cfg(server: &Redis) -> RedisSinkConfig {
    RedisSinkConfig {
        port: server.port,
        ..RedisSinkConfig::default()
    }
}

/// A plain (synchronous) client connection, separate from the sink's.
fn reader(port: u16, password: Option<&str>, db: i64) -> redis::Connection {
    let mut settings = RedisConnectionInfo::default().set_db(db);
    if let Some(p) = password {
        settings = settings.set_password(p);
    }
    let info = ConnectionAddr::Tcp("127.0.0.1".to_string(), port)
        .into_connection_info()
        .unwrap()
        .set_redis_settings(settings);
    redis::Client::open(info).unwrap().get_connection().unwrap()
}

/// The JSON under `key` and its TTL in seconds.
fn get(con: &mut redis::Connection, key: &str) -> (Value, i64) {
    let raw: Option<String> = redis::cmd("GET").arg(key).query(con).unwrap();
    let raw = raw.unwrap_or_else(|| panic!("{key} is not set"));
    let ttl: i64 = redis::cmd("TTL").arg(key).query(con).unwrap();
    (serde_json::from_str(&raw).unwrap(), ttl)
}

fn keys(con: &mut redis::Connection) -> BTreeSet<String> {
    redis::cmd("KEYS").arg("*").query(con).unwrap()
}

fn assert_ttl(key: &str, ttl: i64, max: i64) {
    assert!(ttl > 0 && ttl <= max, "{key}: TTL {ttl} not in (0, {max}]");
}

/// Starts `redis-server` again on `port` without blocking the runtime.
async fn restart(port: u16, password: Option<&'static str>) -> Redis {
    tokio::task::spawn_blocking(move || Redis::start_on(port, password))
        .await
        .unwrap()
}

/// Current-thread runtime, so the thread-local recorder sees every metric of the sink.
#[tokio::test]
async fn redis_values_have_the_spec_json_and_ttl() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let server = Redis::start(None);
    let mut sink = RedisSink::connect(RedisSinkConfig {
        ttl_secs: 120,
        ..cfg(&server)
    })
    .await
    .unwrap();
    let batch = OutputBatch {
        epoch: 1,
        alerts: vec![alert("a1", "u1")],
        events: vec![
            price("coingecko:ethereum", 3500.5, T0),
            tvl("aave", &[("ethereum", 100.0), ("arbitrum", 50.0)], T0 + 500),
            gas("ethereum", 21.5, T0),
            depeg(T0),
        ],
        ..Default::default()
    };
    sink.write(&batch).await.unwrap();

    let mut con = reader(server.port, None, 1);
    let (v, ttl) = get(&mut con, "price:coingecko:ethereum");
    assert_eq!(
        v,
        json!({"price": 3500.5, "symbol": "ETH", "timestamp": 1_717_430_400, "confidence": 0.99, "decimals": null})
    );
    assert_ttl("price", ttl, 120);
    let (v, ttl) = get(&mut con, "tvl:aave");
    assert_eq!(
        v,
        json!({"tvl": 150.0, "chainTvls": {"arbitrum": 50.0, "ethereum": 100.0}, "change_1h": 1.5,
            "change_1d": null, "change_7d": -2.0, "timestamp": 1_717_430_400.5})
    );
    assert_ttl("tvl", ttl, 120);
    let (v, ttl) = get(&mut con, "gas:ethereum");
    assert_eq!(v, json!({"gwei": 21.5, "timestamp": 1_717_430_400}));
    assert_ttl("gas", ttl, 120);
    // Depeg events and alerts are published, never stored.
    let expected: BTreeSet<String> = ["price:coingecko:ethereum", "tvl:aave", "gas:ethereum"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(keys(&mut con), expected);
    assert!(
        keys(&mut reader(server.port, None, 0)).is_empty(),
        "DB 0 must stay empty"
    );

    // 3 SETs; PUBLISHes: price 2 channels, tvl 4 (tvl, tvl:aave, 2 chains), gas 3, depeg 1, alert 1.
    let (counters, histograms) = metrics_of(&snap);
    assert_eq!(
        counters.get(r#"llamaflow_sink_written_total["sink=redis"]"#),
        Some(&14),
        "{counters:?}"
    );
    assert_eq!(
        counters.get(r#"llamaflow_sink_retries_total["sink=redis"]"#),
        None,
        "{counters:?}"
    );
    assert_eq!(
        counters.get(r#"llamaflow_sink_failures_total["sink=redis"]"#),
        None,
        "{counters:?}"
    );
    assert_eq!(
        histograms.get(r#"llamaflow_sink_latency_seconds["sink=redis"]"#),
        Some(&1)
    );

    // An empty batch sends nothing and records nothing (a snapshot drains what it reports).
    sink.write(&OutputBatch::default()).await.unwrap();
    let (counters, histograms) = metrics_of(&snap);
    let written = counters.get(r#"llamaflow_sink_written_total["sink=redis"]"#);
    assert!(matches!(written, None | Some(0)), "{written:?}");
    let samples = histograms.get(r#"llamaflow_sink_latency_seconds["sink=redis"]"#);
    assert!(matches!(samples, None | Some(0)), "{samples:?}");
}

#[tokio::test]
async fn redis_newest_value_wins_within_a_batch() {
    let server = Redis::start(None);
    let mut sink = RedisSink::connect(cfg(&server)).await.unwrap();
    let coin = "coingecko:ethereum";
    let batch = OutputBatch {
        epoch: 1,
        alerts: vec![],
        events: vec![
            price(coin, 3.0, T0 + 3000),
            price(coin, 1.0, T0 + 1000),
            gas("ethereum", 50.0, T0 + 5000),
            price(coin, 3.3, T0 + 3000), // same time, later in the batch: wins
            price(coin, 2.0, T0 + 2000),
            gas("ethereum", 40.0, T0 + 4000),
        ],
        ..Default::default()
    };
    // One SET per key, whatever the number of values.
    let (pipe, _) = build_pipeline(&RedisSinkConfig::default(), &batch).unwrap();
    let sets = pipe
        .cmd_iter()
        .filter(|c| matches!(c.args_iter().next(), Some(redis::Arg::Simple(b"SET"))))
        .count();
    assert_eq!(sets, 2);
    assert_eq!(newest_per_key(&batch.events).len(), 2);

    sink.write(&batch).await.unwrap();
    let mut con = reader(server.port, None, 1);
    let (v, _) = get(&mut con, "price:coingecko:ethereum");
    assert_eq!(
        (v["price"].clone(), v["timestamp"].clone()),
        (json!(3.3), json!(1_717_430_403))
    );
    let (v, _) = get(&mut con, "gas:ethereum");
    assert_eq!(v, json!({"gwei": 50.0, "timestamp": 1_717_430_405}));

    // The next batch overwrites.
    sink.write(&OutputBatch {
        epoch: 2,
        alerts: vec![],
        events: vec![price(coin, 4.0, T0 + 6000)],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(get(&mut con, "price:coingecko:ethereum").0["price"], json!(4.0));
}

#[tokio::test]
async fn redis_respects_db_index_and_password() {
    // Characters that would need escaping in a URL: the host/port config must not care.
    let password = "p@ss:w/rd #1";
    let server = Redis::start(Some(password));
    let batch = OutputBatch {
        epoch: 1,
        alerts: vec![],
        events: vec![gas("ethereum", 21.5, T0)],
        ..Default::default()
    };
    let mut sink = RedisSink::connect(RedisSinkConfig {
        password: Some(password.to_string()),
        db: 3,
        ..cfg(&server)
    })
    .await
    .unwrap();
    sink.write(&batch).await.unwrap();
    let (v, ttl) = get(&mut reader(server.port, Some(password), 3), "gas:ethereum");
    assert_eq!(v, json!({"gwei": 21.5, "timestamp": 1_717_430_400}));
    assert_ttl("gas", ttl, 3600);
    for db in [0, 1] {
        assert!(keys(&mut reader(server.port, Some(password), db)).is_empty(), "DB {db}");
    }

    // A wrong or missing password, or a DB index the server lacks, fails at once (no retries).
    for bad in [
        RedisSinkConfig {
            password: Some("wrong".to_string()),
            ..cfg(&server)
        },
        cfg(&server),
        RedisSinkConfig {
            password: Some(password.to_string()),
            db: 99,
            ..cfg(&server)
        },
    ] {
        let started = Instant::now();
        match RedisSink::connect(bad).await {
            Err(RedisSinkError::Connect { attempts: 1, .. }) => {}
            other => panic!("expected a connect error after 1 attempt, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    // `url` overrides host, port, password and db.
    let mut sink = RedisSink::connect(RedisSinkConfig {
        url: Some(format!("redis://:p%40ss%3Aw%2Frd%20%231@127.0.0.1:{}/5", server.port)),
        host: "192.0.2.1".to_string(),
        port: 1,
        password: None,
        db: 3,
        ..RedisSinkConfig::default()
    })
    .await
    .unwrap();
    sink.write(&OutputBatch {
        epoch: 2,
        alerts: vec![],
        events: vec![gas("arbitrum", 0.1, T0)],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut db5 = reader(server.port, Some(password), 5);
    assert_eq!(get(&mut db5, "gas:arbitrum").0["gwei"], json!(0.1));
    assert_eq!(keys(&mut db5).len(), 1);
}

#[tokio::test]
async fn redis_publishes_event_data_and_alerts_per_user() {
    let server = Redis::start(None);
    let client = redis::Client::open(server.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    for ch in [
        "events:prices",
        "events:prices:coingecko:ethereum",
        "events:chain:ethereum",
        "events:alerts:u1",
        "events:alerts:u2",
    ] {
        pubsub.subscribe(ch).await.unwrap();
    }
    let mut msgs = std::pin::pin!(pubsub.into_on_message());

    let eth = price("coingecko:ethereum", 3500.5, T0);
    let usdc = price("ethereum:0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48", 1.0, T0 + 1500);
    let arb_gas = gas("arbitrum", 0.1, T0); // on gas, gas:arbitrum, chain:arbitrum: none subscribed
    let (a1, a2) = (alert("a1", "u1"), alert("a2", "u2"));
    let mut sink = RedisSink::connect(cfg(&server)).await.unwrap();
    sink.write(&OutputBatch {
        epoch: 1,
        alerts: vec![a1.clone(), a2.clone()],
        events: vec![eth.clone(), usdc.clone(), arb_gas],
        ..Default::default()
    })
    .await
    .unwrap();

    let data = |e: &Event| serde_json::to_string(&e.data).unwrap();
    let expected = vec![
        ("events:prices".to_string(), data(&eth)),
        ("events:prices:coingecko:ethereum".to_string(), data(&eth)),
        ("events:prices".to_string(), data(&usdc)),
        ("events:chain:ethereum".to_string(), data(&usdc)),
        ("events:alerts:u1".to_string(), serde_json::to_string(&a1).unwrap()),
        ("events:alerts:u2".to_string(), serde_json::to_string(&a2).unwrap()),
    ];
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let msg = tokio::time::timeout(WAIT, msgs.next())
            .await
            .unwrap_or_else(|_| panic!("only {got:?} arrived"))
            .unwrap();
        got.push((msg.get_channel_name().to_string(), msg.get_payload::<String>().unwrap()));
    }
    // One connection, one pipeline: Redis delivers in publish order.
    assert_eq!(got, expected);
    // The payload is the WebSocket `data` (no envelope), timestamps in unix seconds.
    let v: Value = serde_json::from_str(&got[0].1).unwrap();
    assert_eq!(
        v,
        json!({"coin": "coingecko:ethereum", "price": 3500.5, "symbol": "ETH", "confidence": 0.99,
            "decimals": null, "timestamp": 1_717_430_400, "change_1h": 1.25, "change_24h": null})
    );
    let v: Value = serde_json::from_str(&got[4].1).unwrap();
    assert_eq!(
        (v["alert_id"].as_str(), v["user_id"].as_str()),
        (Some("a1"), Some("u1"))
    );
    // u2's alert went to u2 only.
    assert!(
        got.iter()
            .filter(|(ch, _)| ch == "events:alerts:u1")
            .all(|(_, p)| !p.contains(r#""alert_id":"a2""#)),
        "{got:?}"
    );

    // `publish: false` stores values and publishes nothing.
    let mut quiet = RedisSink::connect(RedisSinkConfig {
        publish: false,
        ..cfg(&server)
    })
    .await
    .unwrap();
    quiet
        .write(&OutputBatch {
            epoch: 2,
            alerts: vec![alert("a3", "u1")],
            events: vec![price("coingecko:ethereum", 3600.0, T0 + 60_000)],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        get(&mut reader(server.port, None, 1), "price:coingecko:ethereum").0["price"],
        json!(3600.0)
    );
    // Nothing more arrives: the first sink's next message must be the next one received.
    sink.write(&OutputBatch {
        epoch: 3,
        alerts: vec![alert("a4", "u1")],
        events: vec![],
        ..Default::default()
    })
    .await
    .unwrap();
    let next = tokio::time::timeout(WAIT, msgs.next()).await.unwrap().unwrap();
    let v: Value = serde_json::from_str(&next.get_payload::<String>().unwrap()).unwrap();
    assert_eq!(v["alert_id"], json!("a4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_write_survives_a_short_outage() {
    let mut server = Redis::start(Some("pw"));
    let port = server.port;
    let mut sink = RedisSink::connect(RedisSinkConfig {
        password: Some("pw".to_string()),
        ..cfg(&server)
    })
    .await
    .unwrap();
    sink.write(&OutputBatch {
        epoch: 1,
        alerts: vec![],
        events: vec![gas("ethereum", 10.0, T0)],
        ..Default::default()
    })
    .await
    .unwrap();

    server.stop();
    let batch = OutputBatch {
        epoch: 2,
        alerts: vec![alert("a1", "u1")],
        events: vec![
            price("coingecko:ethereum", 3500.5, T0 + 1000),
            gas("ethereum", 20.0, T0 + 1000),
        ],
        ..Default::default()
    };
    let writer = tokio::spawn(async move {
        let result = sink.write(&batch).await;
        (sink, result)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!writer.is_finished(), "write gave up or returned while Redis was down");
    let _server = restart(port, Some("pw")).await;
    let (mut sink, result) = tokio::time::timeout(Duration::from_secs(20), writer)
        .await
        .expect("write finishes after the restart")
        .unwrap();
    result.expect("the batch is written once Redis is back");

    // The restarted server (no persistence) holds exactly the retried batch.
    let mut con = reader(port, Some("pw"), 1);
    let (v, ttl) = get(&mut con, "price:coingecko:ethereum");
    assert_eq!(v["price"], json!(3500.5));
    assert_ttl("price", ttl, 3600);
    assert_eq!(get(&mut con, "gas:ethereum").0["gwei"], json!(20.0));
    // And the sink keeps working on its new connection.
    sink.write(&OutputBatch {
        epoch: 3,
        alerts: vec![],
        events: vec![gas("ethereum", 30.0, T0 + 2000)],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(get(&mut con, "gas:ethereum").0["gwei"], json!(30.0));
}

/// Current-thread runtime, so the thread-local recorder sees every metric of the sink.
#[tokio::test]
async fn redis_write_fails_after_the_retry_budget() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let mut server = Redis::start(None);
    let port = server.port;
    let small = RedisSinkConfig {
        max_attempts: 3,
        initial_backoff_ms: 20,
        max_backoff_ms: 40,
        ..cfg(&server)
    };
    let mut sink = RedisSink::connect(small.clone()).await.unwrap();
    server.stop();

    let batch = OutputBatch {
        epoch: 7,
        alerts: vec![],
        events: vec![gas("ethereum", 20.0, T0)],
        ..Default::default()
    };
    let started = Instant::now();
    match sink.write(&batch).await {
        Err(
            e @ RedisSinkError::Write {
                epoch: 7, attempts: 3, ..
            },
        ) => assert!(e.to_string().contains("epoch 7"), "{e}"),
        other => panic!("expected a write error after 3 attempts, got {other:?}"),
    }
    let took = started.elapsed();
    // Backoffs of [10, 20] and [20, 40] ms.
    assert!(
        took >= Duration::from_millis(30) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let (counters, histograms) = metrics_of(&snap);
    assert_eq!(
        counters.get(r#"llamaflow_sink_retries_total["sink=redis"]"#),
        Some(&2),
        "{counters:?}"
    );
    assert_eq!(
        counters.get(r#"llamaflow_sink_failures_total["sink=redis"]"#),
        Some(&1),
        "{counters:?}"
    );
    assert_eq!(
        counters.get(r#"llamaflow_sink_written_total["sink=redis"]"#),
        None,
        "{counters:?}"
    );
    assert_eq!(
        histograms.get(r#"llamaflow_sink_latency_seconds["sink=redis"]"#),
        Some(&1)
    );

    // Connecting while the server is down fails the same way.
    match RedisSink::connect(small).await {
        Err(RedisSinkError::Connect { attempts: 3, .. }) => {}
        other => panic!("expected a connect error after 3 attempts, got {other:?}"),
    }

    // Once Redis is back the same sink writes again (the failed batch is the caller's to redo).
    let _server = restart(port, None).await;
    sink.write(&batch).await.unwrap();
    assert_eq!(get(&mut reader(port, None, 1), "gas:ethereum").0["gwei"], json!(20.0));
}

#[test]
fn redis_config_from_vars_and_defaults() {
    let d = RedisSinkConfig::default();
    assert_eq!(
        (d.host.as_str(), d.port, d.db, d.password.as_deref()),
        ("127.0.0.1", 6379, 1, None)
    );
    assert_eq!(
        (d.ttl_secs, d.max_attempts, d.initial_backoff_ms, d.max_backoff_ms),
        (3600, 8, 100, 5000)
    );
    assert!(d.publish && d.url.is_none());

    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    };
    assert_eq!(RedisSinkConfig::from_vars(vars(&[])).unwrap(), d);
    let c = RedisSinkConfig::from_vars(vars(&[
        ("REDIS_HOST", "redis.internal"),
        ("REDIS_PORT", "6380"),
        ("REDIS_PASSWORD", "s3cret"),
        ("REDIS_DB", "4"),
    ]))
    .unwrap();
    assert_eq!(
        (c.host.as_str(), c.port, c.password.as_deref(), c.db),
        ("redis.internal", 6380, Some("s3cret"), 4)
    );
    // Empty means unset.
    let c = RedisSinkConfig::from_vars(vars(&[("REDIS_PASSWORD", ""), ("REDIS_HOST", "")])).unwrap();
    assert_eq!((c.host.as_str(), c.password), ("127.0.0.1", None));
    for bad in [
        &[("REDIS_PORT", "70000")][..],
        &[("REDIS_PORT", "x")][..],
        &[("REDIS_DB", "-1")][..],
        &[("REDIS_DB", "one")][..],
    ] {
        assert!(
            matches!(RedisSinkConfig::from_vars(vars(bad)), Err(RedisSinkError::Config(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn redis_config_deserializes_over_defaults_and_hides_secrets() {
    let c: RedisSinkConfig =
        serde_json::from_value(json!({"port": 7000, "ttl_secs": 60, "publish": false, "password": "hunter2"})).unwrap();
    assert_eq!(
        (c.port, c.ttl_secs, c.publish, c.db, c.max_attempts),
        (7000, 60, false, 1, 8)
    );
    assert!(serde_json::from_value::<RedisSinkConfig>(json!({"ttl": 60})).is_err());

    let c = RedisSinkConfig {
        url: Some("redis://user:hunter3@cache:6379/2".to_string()),
        ..c
    };
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("hunter2") && !dbg.contains("hunter3"), "{dbg}");
    assert!(dbg.contains("cache:6379/2"), "{dbg}");

    // Limits are checked before connecting.
    for bad in [
        RedisSinkConfig {
            ttl_secs: 0,
            ..RedisSinkConfig::default()
        },
        RedisSinkConfig {
            max_attempts: 0,
            ..RedisSinkConfig::default()
        },
        RedisSinkConfig {
            url: Some("http://:hunter4@x".to_string()),
            ..RedisSinkConfig::default()
        },
    ] {
        match bad.connection_info() {
            Err(RedisSinkError::Config(msg)) => assert!(!msg.contains("hunter4"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn redis_backoff_doubles_up_to_the_cap() {
    let c = RedisSinkConfig::default();
    let ms: Vec<u128> = (1..=9).map(|n| c.backoff(n).as_millis()).collect();
    assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    assert_eq!(c.backoff(200).as_millis(), 5000);
}

#[test]
fn redis_jitter_stays_within_half_to_full_backoff() {
    let d = Duration::from_millis(1000);
    let waits: Vec<Duration> = (0..200).map(|_| jittered(d)).collect();
    assert!(waits.iter().all(|w| *w >= d / 2 && *w <= d), "{waits:?}");
    // Actually random: not all equal, and spread over the range.
    let (lo, hi) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
    assert!(*hi - *lo > Duration::from_millis(200), "{lo:?}..{hi:?}");
}
