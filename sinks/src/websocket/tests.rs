//! End-to-end tests: real tokio-tungstenite clients against a real server on 127.0.0.1:0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use schemas::{Alert, Event, EventData};

use super::{HttpLimits, Hub, WsConfig, router, serve};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);

fn keys(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, u)| (k.to_string(), u.to_string())).collect()
}

/// Starts a server for a hub with `cfg` on an ephemeral port.
async fn start(cfg: WsConfig) -> (Hub, SocketAddr) {
    let hub = Hub::new(cfg);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(hub.clone());
    let server = hub.clone();
    tokio::spawn(serve(
        listener,
        app,
        server,
        HttpLimits::default(),
        std::future::pending(),
    ));
    (hub, addr)
}

fn url(addr: SocketAddr, key: Option<&str>) -> String {
    match key {
        Some(k) => format!("ws://{addr}/ws?api_key={k}"),
        None => format!("ws://{addr}/ws"),
    }
}

async fn connect(addr: SocketAddr, key: Option<&str>) -> Client {
    let (c, resp) = timeout(WAIT, connect_async(url(addr, key))).await.unwrap().unwrap();
    assert_eq!(resp.status(), 101);
    c
}

/// The HTTP status a refused handshake got.
async fn refused_status(req: tungstenite::handshake::client::Request) -> u16 {
    match timeout(WAIT, connect_async(req)).await.unwrap() {
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("handshake unexpectedly accepted"),
    }
}

async fn send(c: &mut Client, v: Value) {
    c.send(Message::text(v.to_string())).await.unwrap();
}

/// The next text frame as JSON (skipping pings and pongs).
async fn recv(c: &mut Client) -> Value {
    loop {
        let msg = timeout(WAIT, c.next())
            .await
            .expect("timed out")
            .expect("stream ended")
            .expect("ws error");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected message {other:?}"),
        }
    }
}

/// Reads until the close frame; returns its code and the number of text frames before it.
async fn recv_close(c: &mut Client) -> (u16, usize) {
    let mut texts = 0;
    loop {
        let msg = timeout(WAIT, c.next())
            .await
            .expect("timed out")
            .expect("stream ended")
            .expect("ws error");
        match msg {
            Message::Text(_) => texts += 1,
            Message::Close(Some(f)) => return (u16::from(f.code), texts),
            Message::Close(None) => panic!("close without a code"),
            _ => {}
        }
    }
}

async fn subscribe(c: &mut Client, channels: &[&str]) {
    send(c, json!({"type": "subscribe", "channels": channels})).await;
    assert_eq!(recv(c).await, json!({"type": "subscribed", "channels": channels}));
}

pub(super) fn price(coin: &str, p: f64, ts: i64) -> Event {
    Event {
        subject: coin.to_string(),
        timestamp: ts,
        data: EventData::PriceUpdate {
            coin: coin.to_string(),
            price: p,
            symbol: Some("ETH".into()),
            confidence: Some(0.99),
            decimals: Some(18),
            timestamp: ts,
            change_1h: Some(-1.25),
            change_24h: None,
        },
    }
}

pub(super) fn alert(user: &str, id: &str) -> Alert {
    Alert {
        alert_id: id.to_string(),
        rule_id: format!("rule-{user}"),
        user_id: user.to_string(),
        alert_type: "price_change".into(),
        subject: "coingecko:ethereum".into(),
        triggered_at: 1_717_430_400_000,
        value: -5.31,
        threshold: 5.0,
        message: "ETH -5.31% in 1h".into(),
        channels: vec!["websocket".into()],
        webhook_url: None,
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn price_updates_reach_subscribers_of_their_channels_only() {
    let (hub, addr) = start(WsConfig {
        allow_anonymous: true,
        ..WsConfig::default()
    })
    .await;
    let mut eth = connect(addr, None).await;
    let mut all = connect(addr, None).await;
    let mut btc = connect(addr, None).await;
    subscribe(&mut eth, &["prices:coingecko:ethereum", "prices:coingecko:bitcoin"]).await;
    subscribe(&mut all, &["prices"]).await;
    subscribe(&mut btc, &["prices:coingecko:bitcoin"]).await;

    let e = price("coingecko:ethereum", 3791.12, 1_717_430_350_000);
    hub.publish_event(&e);
    let data = serde_json::to_value(&e.data).unwrap();
    assert_eq!(data["timestamp"], json!(1_717_430_350));
    assert_eq!(
        recv(&mut eth).await,
        json!({"type":"price_update","channel":"prices:coingecko:ethereum","data":data,"timestamp":1_717_430_350_000i64})
    );
    assert_eq!(
        recv(&mut all).await,
        json!({"type":"price_update","channel":"prices","data":data,"timestamp":1_717_430_350_000i64})
    );

    // The bitcoin-only client never saw the ETH tick: its first frame is the BTC one.
    hub.publish_event(&price("coingecko:bitcoin", 67000.0, 1_717_430_351_000));
    let first = recv(&mut btc).await;
    assert_eq!(first["channel"], "prices:coingecko:bitcoin");
    assert_eq!(first["data"]["price"], json!(67000.0));
    assert_eq!(recv(&mut eth).await["channel"], "prices:coingecko:bitcoin");
    assert_eq!(recv(&mut all).await["data"]["coin"], "coingecko:bitcoin");

    // After unsubscribing, ETH ticks stop; the other subscription goes on.
    send(
        &mut eth,
        json!({"type":"unsubscribe","channels":["prices:coingecko:ethereum"]}),
    )
    .await;
    assert_eq!(
        recv(&mut eth).await,
        json!({"type":"unsubscribed","channels":["prices:coingecko:ethereum"]})
    );
    hub.publish_event(&price("coingecko:ethereum", 3800.0, 1_717_430_352_000));
    hub.publish_event(&price("coingecko:bitcoin", 67001.0, 1_717_430_353_000));
    let next = recv(&mut eth).await;
    assert_eq!(
        (next["channel"].as_str(), next["data"]["price"].as_f64()),
        (Some("prices:coingecko:bitcoin"), Some(67001.0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coin_channels_are_normalised_and_chain_channels_work() {
    let (hub, addr) = start(WsConfig {
        allow_anonymous: true,
        ..WsConfig::default()
    })
    .await;
    let mut c = connect(addr, None).await;
    send(
        &mut c,
        json!({"type":"subscribe","channels":["prices:Ethereum:0xABC", "chain:ethereum", "gas"]}),
    )
    .await;
    assert_eq!(
        recv(&mut c).await,
        json!({"type":"subscribed","channels":["prices:ethereum:0xabc","chain:ethereum","gas"]})
    );
    hub.publish_event(&price("ethereum:0xabc", 1.0, 5_000));
    let got = [recv(&mut c).await, recv(&mut c).await];
    let mut channels: Vec<&str> = got.iter().filter_map(|v| v["channel"].as_str()).collect();
    channels.sort_unstable();
    assert_eq!(channels, ["chain:ethereum", "prices:ethereum:0xabc"]);
    let gas = Event {
        subject: "arbitrum".into(),
        timestamp: 6_500,
        data: EventData::GasUpdate {
            chain: "arbitrum".into(),
            gwei: 0.1,
            timestamp: 6_500,
        },
    };
    hub.publish_event(&gas);
    assert_eq!(
        recv(&mut c).await,
        json!({"type":"gas_update","channel":"gas","data":{"chain":"arbitrum","gwei":0.1,"timestamp":6.5},"timestamp":6500})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_missing_keys_get_401() {
    let (_hub, addr) = start(WsConfig {
        api_keys: keys(&[("k1", "u1")]),
        ..WsConfig::default()
    })
    .await;
    let req = url(addr, Some("nope")).into_client_request().unwrap();
    assert_eq!(refused_status(req).await, 401);
    let mut req = url(addr, None).into_client_request().unwrap();
    req.headers_mut().insert("x-api-key", HeaderValue::from_static("nope"));
    assert_eq!(refused_status(req).await, 401);
    // No key and anonymous not allowed.
    assert_eq!(
        refused_status(url(addr, None).into_client_request().unwrap()).await,
        401
    );
    // A known key works in the query and in the header.
    let mut c = connect(addr, Some("k1")).await;
    subscribe(&mut c, &["alerts"]).await;
    let mut req = url(addr, None).into_client_request().unwrap();
    req.headers_mut().insert("x-api-key", HeaderValue::from_static("k1"));
    let (mut c, _) = connect_async(req).await.unwrap();
    subscribe(&mut c, &["alerts"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_added_at_run_time_are_accepted() {
    let (hub, addr) = start(WsConfig::default()).await;
    assert_eq!(
        refused_status(url(addr, Some("late")).into_client_request().unwrap()).await,
        401
    );
    hub.set_api_key("late", "u9");
    let mut c = connect(addr, Some("late")).await;
    subscribe(&mut c, &["alerts"]).await;
    hub.publish_alert(&alert("u9", "a9"));
    assert_eq!(recv(&mut c).await["data"]["alert_id"], "a9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_only_their_users_connections() {
    let (hub, addr) = start(WsConfig {
        api_keys: keys(&[("ka", "ua"), ("kb", "ub"), ("ka2", "ua")]),
        ..WsConfig::default()
    })
    .await;
    let mut a = connect(addr, Some("ka")).await;
    let mut a2 = connect(addr, Some("ka2")).await;
    let mut b = connect(addr, Some("kb")).await;
    subscribe(&mut a, &["alerts"]).await;
    subscribe(&mut a2, &["alerts"]).await;
    subscribe(&mut b, &["alerts", "prices"]).await;

    for al in [
        alert("ub", "b1"),
        alert("ua", "a1"),
        alert("ub", "b2"),
        alert("ua", "a2"),
    ] {
        hub.publish_alert(&al);
    }
    let expected = |al: Alert| json!({"type":"alert","channel":"alerts","data":serde_json::to_value(&al).unwrap()});
    assert_eq!(recv(&mut a).await, expected(alert("ua", "a1")));
    assert_eq!(recv(&mut a).await["data"]["alert_id"], "a2");
    // Another key of the same user gets them too.
    assert_eq!(recv(&mut a2).await["data"]["alert_id"], "a1");
    assert_eq!(recv(&mut a2).await["data"]["alert_id"], "a2");
    assert_eq!(recv(&mut b).await, expected(alert("ub", "b1")));
    assert_eq!(recv(&mut b).await["data"]["alert_id"], "b2");
    // Nothing of ua's was queued for b: the next frame is a market event published last.
    hub.publish_event(&price("coingecko:ethereum", 1.0, 1_000));
    assert_eq!(recv(&mut b).await["type"], "price_update");

    // A user's connection that did not subscribe to alerts gets none.
    let mut a3 = connect(addr, Some("ka")).await;
    subscribe(&mut a3, &["gas"]).await;
    hub.publish_alert(&alert("ua", "a3"));
    hub.publish_event(&Event {
        subject: "ethereum".into(),
        timestamp: 2_000,
        data: EventData::GasUpdate {
            chain: "ethereum".into(),
            gwei: 9.0,
            timestamp: 2_000,
        },
    });
    assert_eq!(recv(&mut a3).await["type"], "gas_update");
    assert_eq!(recv(&mut a).await["data"]["alert_id"], "a3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_channels_and_bad_requests_get_error_frames() {
    let (_hub, addr) = start(WsConfig {
        allow_anonymous: true,
        ..WsConfig::default()
    })
    .await;
    let mut c = connect(addr, None).await;
    send(&mut c, json!({"type":"subscribe","channels":["bogus"]})).await;
    let err = recv(&mut c).await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("unknown_channel"))
    );
    assert!(err["message"].as_str().unwrap().contains("`bogus`"), "{err}");

    // Valid channels of a mixed request are subscribed, the rest reported.
    send(
        &mut c,
        json!({"type":"subscribe","channels":["tvl", "prices:ethereum", "tvl:2269"]}),
    )
    .await;
    assert_eq!(
        recv(&mut c).await,
        json!({"type":"subscribed","channels":["tvl","tvl:2269"]})
    );
    let err = recv(&mut c).await;
    assert_eq!(err["code"], "unknown_channel");
    assert!(err["message"].as_str().unwrap().contains("`prices:ethereum`"), "{err}");

    for bad in [
        Message::text("not json"),
        Message::text(r#"{"type":"subscribe"}"#),
        Message::text(r#"{"type":"subscribe","channels":[]}"#),
        Message::text(r#"{"type":"dance"}"#),
        Message::binary(b"{}".to_vec()),
    ] {
        c.send(bad).await.unwrap();
        let err = recv(&mut c).await;
        assert_eq!(err["code"], "bad_request", "{err}");
        assert!(!err["message"].as_str().unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_connections_are_forbidden_from_alerts() {
    let (hub, addr) = start(WsConfig {
        allow_anonymous: true,
        ..WsConfig::default()
    })
    .await;
    let mut c = connect(addr, None).await;
    send(&mut c, json!({"type":"subscribe","channels":["alerts"]})).await;
    let err = recv(&mut c).await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    send(&mut c, json!({"type":"subscribe","channels":["prices", "alerts"]})).await;
    assert_eq!(recv(&mut c).await, json!({"type":"subscribed","channels":["prices"]}));
    assert_eq!(recv(&mut c).await["code"], "forbidden");
    hub.publish_alert(&alert("anyone", "x"));
    hub.publish_event(&price("coingecko:ethereum", 2.0, 3_000));
    assert_eq!(recv(&mut c).await["type"], "price_update");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_limit_is_enforced() {
    let (_hub, addr) = start(WsConfig {
        allow_anonymous: true,
        max_subscriptions: 3,
        ..WsConfig::default()
    })
    .await;
    let mut c = connect(addr, None).await;
    send(
        &mut c,
        json!({"type":"subscribe","channels":["prices","tvl","gas","depeg","whales"]}),
    )
    .await;
    assert_eq!(
        recv(&mut c).await,
        json!({"type":"subscribed","channels":["prices","tvl","gas"]})
    );
    let err = recv(&mut c).await;
    assert_eq!(err["code"], "forbidden");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("at most 3") && msg.contains("`depeg`") && msg.contains("`whales`"),
        "{msg}"
    );
    // Re-subscribing is not counted twice; freeing a slot makes room.
    subscribe(&mut c, &["prices"]).await;
    send(&mut c, json!({"type":"unsubscribe","channels":["tvl"]})).await;
    recv(&mut c).await;
    subscribe(&mut c, &["depeg"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_answered_and_the_server_pings() {
    let (_hub, addr) = start(WsConfig {
        allow_anonymous: true,
        ping_interval: Duration::from_millis(200),
        ..WsConfig::default()
    })
    .await;
    let mut c = connect(addr, None).await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    send(&mut c, json!({"type":"ping"})).await;
    let pong = recv(&mut c).await;
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert_eq!(pong["type"], "pong");
    let ts = pong["timestamp"].as_i64().unwrap();
    assert!((before..=after).contains(&ts), "{before} <= {ts} <= {after}");

    // WebSocket-level: our ping gets a pong, and the server pings on its own.
    c.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
    let (mut got_pong, mut got_ping) = (false, false);
    while !(got_pong && got_ping) {
        match timeout(WAIT, c.next()).await.unwrap().unwrap().unwrap() {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"hi");
                got_pong = true;
            }
            Message::Ping(_) => got_ping = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    // A client that answers pings (tungstenite does while reading) stays connected for well
    // over the three silent intervals after which a connection is dropped.
    let until = Instant::now() + Duration::from_millis(1200);
    let mut pings = 0;
    while let Ok(msg) = tokio::time::timeout_at(until, c.next()).await {
        assert!(matches!(msg, Some(Ok(Message::Ping(_)))), "{msg:?}");
        pings += 1;
    }
    assert!(pings >= 3, "{pings}");
    send(&mut c, json!({"type":"ping"})).await;
    assert_eq!(recv(&mut c).await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_dropped_after_missed_pings() {
    let (hub, addr) = start(WsConfig {
        allow_anonymous: true,
        ping_interval: Duration::from_millis(50),
        ..WsConfig::default()
    })
    .await;
    // Never reads, so never answers the server's pings.
    let _c = connect(addr, None).await;
    wait_until("the connection to register", || hub.connections() == 1).await;
    wait_until("the silent connection to be dropped", || hub.connections() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_rate_limited_per_api_key() {
    let (_hub, addr) = start(WsConfig {
        api_keys: keys(&[("k", "u")]),
        max_msgs_per_sec: 3,
        ..WsConfig::default()
    })
    .await;
    let mut c1 = connect(addr, Some("k")).await;
    let mut c2 = connect(addr, Some("k")).await;
    let started = Instant::now();
    for _ in 0..3 {
        send(&mut c1, json!({"type":"ping"})).await;
    }
    for _ in 0..3 {
        send(&mut c2, json!({"type":"ping"})).await;
    }
    let mut kinds = Vec::new();
    for _ in 0..3 {
        kinds.push(recv(&mut c1).await);
    }
    for _ in 0..3 {
        kinds.push(recv(&mut c2).await);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let pongs = kinds.iter().filter(|v| v["type"] == "pong").count();
    let limited: Vec<&Value> = kinds.iter().filter(|v| v["code"] == "rate_limited").collect();
    assert_eq!(pongs + limited.len(), 6, "{kinds:?}");
    // The key's bucket holds 3 and refills 3/s, shared by both connections.
    assert!(
        pongs as f64 <= 3.0 + (elapsed * 3.0).ceil(),
        "{pongs} pongs in {elapsed}s"
    );
    assert!(!limited.is_empty(), "{kinds:?}");
    assert_eq!(limited[0]["type"], "error");
    assert!(
        limited[0]["message"]
            .as_str()
            .unwrap()
            .contains("3 messages per second")
    );
    // Tokens come back.
    sleep(Duration::from_millis(1100)).await;
    send(&mut c2, json!({"type":"ping"})).await;
    assert_eq!(recv(&mut c2).await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_close_with_1009() {
    let (hub, addr) = start(WsConfig {
        allow_anonymous: true,
        max_frame_bytes: 1024,
        ..WsConfig::default()
    })
    .await;
    let mut c = connect(addr, None).await;
    // At the limit is fine.
    let channels: Vec<String> = (0..60).map(|i| format!("tvl:{i:04}")).collect();
    let ok = json!({"type":"subscribe","channels":channels}).to_string();
    assert!(ok.len() <= 1024);
    c.send(Message::text(ok)).await.unwrap();
    assert_eq!(recv(&mut c).await["type"], "subscribed");
    let big = json!({"type":"subscribe","channels":["x".repeat(4096)]}).to_string();
    c.send(Message::text(big)).await.unwrap();
    let (code, _) = recv_close(&mut c).await;
    assert_eq!(code, 1009);
    wait_until("the connection to go", || hub.connections() == 0).await;
}

/// A frame of about 32 KB, numbered.
fn big_price(seq: u64) -> Event {
    let mut e = price("coingecko:ethereum", seq as f64 + 1.0, 1_717_430_400_000 + seq as i64);
    if let EventData::PriceUpdate { symbol, .. } = &mut e.data {
        *symbol = Some("S".repeat(32 * 1024));
    }
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_closed_with_1013_and_never_slows_a_fast_one() {
    const QUEUE: u64 = 8;
    let (hub, addr) = start(WsConfig {
        allow_anonymous: true,
        send_queue: QUEUE as usize,
        ..WsConfig::default()
    })
    .await;
    let mut fast = connect(addr, None).await;
    let mut slow = connect(addr, None).await;
    subscribe(&mut fast, &["prices"]).await;
    subscribe(&mut slow, &["prices"]).await;

    // From here on `slow` does not read: once the socket buffers are full its queue fills.
    let mut seq = 0u64;
    let mut batches_after_kick = 0;
    for _ in 0..5_000 {
        for _ in 0..QUEUE {
            hub.publish_event(&big_price(seq));
            seq += 1;
        }
        // The fast client reads every frame, in order.
        for expect in seq - QUEUE..seq {
            let v = recv(&mut fast).await;
            assert_eq!(v["data"]["price"].as_f64(), Some(expect as f64 + 1.0));
        }
        if hub.connections() == 1 {
            batches_after_kick += 1;
            if batches_after_kick == 5 {
                break;
            }
        }
    }
    assert_eq!(
        hub.connections(),
        1,
        "the slow client was never disconnected after {seq} frames"
    );
    assert!(seq > 5 * QUEUE);

    // The slow client finds, after what the socket had buffered, a 1013 close.
    let (code, frames) = recv_close(&mut slow).await;
    assert_eq!(code, 1013);
    assert!((frames as u64) < seq, "{frames} of {seq}");

    // The fast client goes on receiving.
    hub.publish_event(&price("coingecko:ethereum", 42.0, 1));
    assert_eq!(recv(&mut fast).await["data"]["price"], json!(42.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_connections_all_receive_a_broadcast() {
    const N: usize = 500;
    const EVENTS: usize = 20;
    let (hub, addr) = start(WsConfig {
        allow_anonymous: true,
        // All from 127.0.0.1.
        max_anonymous_per_ip: 0,
        ..WsConfig::default()
    })
    .await;
    let mut clients = Vec::with_capacity(N);
    for chunk in 0..N / 50 {
        let batch = futures_util::future::join_all((0..50).map(|_| connect(addr, None))).await;
        clients.extend(batch);
        assert_eq!(clients.len(), (chunk + 1) * 50);
    }
    futures_util::future::join_all(clients.iter_mut().map(|c| subscribe(c, &["prices"]))).await;
    assert_eq!(hub.connections(), N);

    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut prices = Vec::with_capacity(EVENTS);
                for _ in 0..EVENTS {
                    prices.push(recv(&mut c).await["data"]["price"].as_f64().unwrap());
                }
                c.close(None).await.unwrap();
                prices
            })
        })
        .collect();
    for i in 0..EVENTS {
        hub.publish_event(&price("coingecko:ethereum", i as f64 + 1.0, i as i64 * 1000));
    }
    let expected: Vec<f64> = (0..EVENTS).map(|i| i as f64 + 1.0).collect();
    for r in readers {
        assert_eq!(r.await.unwrap(), expected);
    }
    wait_until("all connections to close", || hub.connections() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_with_1001() {
    let hub = Hub::new(WsConfig {
        allow_anonymous: true,
        ..WsConfig::default()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        router(hub.clone()),
        hub.clone(),
        HttpLimits::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let mut a = connect(addr, None).await;
    let mut b = connect(addr, None).await;
    subscribe(&mut a, &["prices"]).await;
    stop_tx.send(()).unwrap();
    let stopped = Instant::now();
    let (ca, cb) = tokio::join!(recv_close(&mut a), recv_close(&mut b));
    assert_eq!((ca.0, cb.0), (1001, 1001));
    // Reading on sends the clients' close replies; then the server drops the sockets.
    for c in [&mut a, &mut b] {
        assert!(timeout(WAIT, c.next()).await.unwrap().is_none());
    }
    timeout(WAIT, server).await.unwrap().unwrap().unwrap();
    // Completed handshakes end the server without waiting out the closing timeout (5 s).
    assert!(
        stopped.elapsed() < Duration::from_millis(4500),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(hub.connections(), 0);
    assert!(connect_async(url(addr, None)).await.is_err());
}

fn recorder() -> &'static metrics_util::debugging::Snapshotter {
    static SNAP: OnceLock<metrics_util::debugging::Snapshotter> = OnceLock::new();
    SNAP.get_or_init(|| {
        let r = metrics_util::debugging::DebuggingRecorder::new();
        let s = r.snapshotter();
        r.install().unwrap();
        s
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_connections_frames_and_disconnect_reasons() {
    use metrics_util::debugging::DebugValue;
    let snap = recorder();
    let (hub, addr) = start(WsConfig {
        allow_anonymous: true,
        send_queue: 1,
        ..WsConfig::default()
    })
    .await;
    let mut quiet = connect(addr, None).await;
    let mut slow = connect(addr, None).await;
    subscribe(&mut slow, &["prices"]).await;
    // `slow` reads nothing until its socket buffers are full and it falls behind the
    // one-frame ring.
    let mut seq = 0;
    while hub.connections() == 2 {
        assert!(seq < 100_000, "never disconnected");
        hub.publish_event(&big_price(seq));
        seq += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (code, frames) = recv_close(&mut slow).await;
    assert_eq!(code, 1013);
    assert!((frames as u64) < seq, "{frames} of {seq}");
    quiet.close(None).await.unwrap();
    wait_until("both connections to go", || hub.connections() == 0).await;

    let mut counters = HashMap::new();
    let mut gauges = Vec::new();
    for (key, _, _, value) in snap.snapshot().into_vec() {
        let key = key.key();
        let name = key.name().to_string();
        let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        match value {
            DebugValue::Counter(n) => {
                *counters.entry(format!("{name}{labels:?}")).or_insert(0) += n;
            }
            DebugValue::Gauge(_) => gauges.push(name),
            DebugValue::Histogram(_) => {}
        }
    }
    assert!(
        counters
            .get(r#"llamaflow_ws_disconnects_total["reason=slow_consumer"]"#)
            .is_some_and(|n| *n >= 1),
        "{counters:?}"
    );
    assert!(
        counters
            .get(r#"llamaflow_ws_disconnects_total["reason=client_closed"]"#)
            .is_some_and(|n| *n >= 1),
        "{counters:?}"
    );
    // The subscribe ack, at least.
    assert!(
        counters
            .get("llamaflow_ws_frames_sent_total[]")
            .is_some_and(|n| *n >= 1),
        "{counters:?}"
    );
    assert!(gauges.iter().any(|g| g == "llamaflow_ws_connections"), "{gauges:?}");
}

#[test]
fn config_debug_hides_api_keys() {
    let cfg = WsConfig {
        api_keys: keys(&[("secret-key-1", "u1")]),
        ..WsConfig::default()
    };
    let shown = format!("{cfg:?} {:?}", Hub::new(cfg.clone()));
    assert!(!shown.contains("secret-key-1"), "{shown}");
    assert!(shown.contains("<1 keys>"), "{shown}");
}

// ---------- the HTTP server's bounds ----------

/// Starts [`serve`] with `limits`; the returned sender stops it.
async fn start_limited(
    cfg: WsConfig,
    limits: HttpLimits,
) -> (
    Hub,
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let hub = Hub::new(cfg);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, router(hub.clone()), hub.clone(), limits, async move {
        let _ = stop_rx.await;
    }));
    (hub, addr, stop_tx, server)
}

/// Reads until the server closes the connection; what it sent.
async fn read_to_close(s: &mut TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let _ = timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("the server closes the connection");
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn half_sent_headers_and_idle_connections_time_out_and_do_not_hold_up_shutdown() {
    use tokio::io::AsyncWriteExt;
    let limits = HttpLimits {
        header_timeout: Duration::from_millis(300),
        shutdown_grace: Duration::from_secs(1),
        ..HttpLimits::default()
    };
    let (_hub, addr, stop, server) = start_limited(WsConfig::default(), limits).await;
    // Half a request: closed once the header timeout passes.
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let t = Instant::now();
    let _ = read_to_close(&mut half).await;
    assert!(t.elapsed() < Duration::from_secs(3), "closed after {:?}", t.elapsed());
    // Connected and silent: closed too.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let _ = read_to_close(&mut idle).await;
    // A half request pending at shutdown does not keep the server from returning.
    let mut pending = TcpStream::connect(addr).await.unwrap();
    pending.write_all(b"GET /ws HTTP/1.1\r\nHost").await.unwrap();
    let t = Instant::now();
    stop.send(()).unwrap();
    timeout(Duration::from_secs(10), server)
        .await
        .expect("serve returns")
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "shutdown took {:?}", t.elapsed());
}

#[tokio::test]
async fn connections_beyond_the_cap_get_503_and_a_freed_slot_is_reused() {
    use tokio::io::AsyncWriteExt;
    let limits = HttpLimits {
        max_connections: 2,
        ..HttpLimits::default()
    };
    let cfg = WsConfig {
        allow_anonymous: true,
        ..WsConfig::default()
    };
    let (_hub, addr, _stop, _server) = start_limited(cfg, limits).await;
    // A WebSocket and an idle connection take both slots.
    let ws = connect(addr, None).await;
    let idle = TcpStream::connect(addr).await.unwrap();
    let mut third = TcpStream::connect(addr).await.unwrap();
    let answer = read_to_close(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    // Closing the WebSocket frees its slot (held for the socket's life, not the handshake's).
    drop(ws);
    drop(idle);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut s).await;
        if !answer.starts_with("HTTP/1.1 503") {
            // A plain GET of /ws is not an upgrade: refused by the handler, not by the cap.
            assert!(answer.starts_with("HTTP/1.1 4"), "{answer:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the slots were never freed");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn anonymous_connections_are_capped_per_address_and_share_one_rate_bucket() {
    let cfg = WsConfig {
        allow_anonymous: true,
        max_anonymous_per_ip: 2,
        max_msgs_per_sec: 3,
        api_keys: keys(&[("k", "u")]),
        ..WsConfig::default()
    };
    let (_hub, addr, _stop, _server) = start_limited(cfg, HttpLimits::default()).await;
    let mut a = connect(addr, None).await;
    let mut b = connect(addr, None).await;
    let req = url(addr, None).into_client_request().unwrap();
    assert_eq!(
        refused_status(req).await,
        429,
        "a third anonymous connection from 127.0.0.1"
    );
    // Keys are not anonymous: not counted.
    let _keyed = connect(addr, Some("k")).await;
    // The two share 3 messages per second: six pings at once cannot all be answered.
    for c in [&mut a, &mut b] {
        for _ in 0..3 {
            send(c, json!({"type":"ping"})).await;
        }
    }
    let mut limited = 0;
    for c in [&mut a, &mut b] {
        for _ in 0..3 {
            if recv(c).await["code"] == "rate_limited" {
                limited += 1;
            }
        }
    }
    assert!(limited >= 2, "{limited} of 6 rate-limited");
    // A closed anonymous connection frees its place.
    drop(a);
    let deadline = Instant::now() + WAIT;
    loop {
        match timeout(WAIT, connect_async(url(addr, None))).await.unwrap() {
            Ok(_) => break,
            Err(tungstenite::Error::Http(r)) if r.status() == 429 => {
                assert!(Instant::now() < deadline, "the place was never freed");
                sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// A masked client text frame, encoded here byte by byte (RFC 6455 §5.2).
fn masked_text(text: &str) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let len = text.len();
    assert!(len < 126);
    let mut f = vec![0x81, 0x80 | len as u8];
    f.extend_from_slice(&mask);
    f.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_upgrade_with_a_pipelined_frame_then_a_protocol_error_closes_with_1002() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (hub, addr) = start(WsConfig {
        allow_anonymous: true,
        ..WsConfig::default()
    })
    .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The RFC's sample key; the subscribe frame follows the request in the same write.
    let mut req = format!(
        "GET /ws HTTP/1.1\r\nhost: {addr}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    )
    .into_bytes();
    req.extend(masked_text(r#"{"type":"subscribe","channels":["gas"]}"#));
    s.write_all(&req).await.unwrap();
    // Reads the 101 response and the ack frame after it.
    let mut got = Vec::new();
    let ack = loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let body = &got[end + 4..];
            if body.len() >= 2 && body.len() >= 2 + usize::from(body[1]) {
                // One unmasked final text frame right after the headers.
                assert_eq!(body[0], 0x81);
                assert!(body[1] < 126);
                break serde_json::from_slice::<Value>(&body[2..2 + usize::from(body[1])]).unwrap();
            }
        }
        let mut buf = [0u8; 1024];
        let n = timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    };
    assert_eq!(ack, json!({"type": "subscribed", "channels": ["gas"]}));
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 101"), "{text}");
    assert!(
        text.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{text}"
    );

    // An unmasked client frame is a protocol error: close 1002, then the server hangs up.
    s.write_all(&[0x81, 0x01, b'x']).await.unwrap();
    let mut rest = Vec::new();
    timeout(WAIT, s.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert_eq!(&rest[..4], &[0x88, rest[1], 0x03, 0xEA], "{rest:?}");
    wait_until("the connection to go", || hub.connections() == 0).await;
}
