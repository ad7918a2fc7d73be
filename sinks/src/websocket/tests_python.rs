//! An independent client: Python's `websockets` library (`py_client.py`) against a real server.
//!
//! The interpreter is `$LLAMAFLOW_VENV/bin/python` when that is set, else `python3`; it needs
//! `websockets` (`python3 -m venv "$LLAMAFLOW_VENV" && "$LLAMAFLOW_VENV/bin/pip" install websockets`).

use super::tests::alert;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

use schemas::{Event, EventData};

use super::{HttpLimits, Hub, WsConfig, router, serve};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/websocket/py_client.py");
/// Bound on the whole exchange (the script's own timeout is lower).
const LIMIT: Duration = Duration::from_secs(30);
const SCRIPT_TIMEOUT_SECS: &str = "20";

/// Kills the script if the test ends early.
struct Script(Child);

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The ETH tick every frame assertion below refers to.
fn price() -> Event {
    super::tests::price("coingecko:ethereum", 3791.12, 1_717_430_350_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_client_gets_prices_and_only_its_own_alerts() {
    let hub = Hub::new(WsConfig {
        api_keys: [("k1", "u1"), ("k2", "u2")]
            .into_iter()
            .map(|(k, u)| (k.to_string(), u.to_string()))
            .collect(),
        ..WsConfig::default()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        router(hub.clone()),
        hub.clone(),
        HttpLimits::default(),
        std::future::pending(),
    ));

    let python = testkit::python();
    let channels = ["prices:coingecko:ethereum", "alerts"];
    // The `subscribed` ack, the price update, u1's alert, and a last price update.
    let frames = 4;
    let child = Command::new(&python)
        .arg(SCRIPT)
        .args(["--url", &format!("ws://{addr}/ws"), "--key", "k1", "--bad-key", "nope"])
        .arg("--channels")
        .args(channels)
        .args(["--frames", &frames.to_string(), "--timeout", SCRIPT_TIMEOUT_SECS])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; set LLAMAFLOW_VENV to a virtualenv with `websockets` installed",
                python.display()
            )
        });
    let mut script = Script(child);
    let stdout = script.0.stdout.take().unwrap();
    let mut stderr = script.0.stderr.take().unwrap();
    let (line_tx, mut lines) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let deadline = Instant::now() + LIMIT;
    let mut got: Vec<Value> = Vec::new();
    let mut published = false;
    loop {
        let line = match timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) => line.expect("reading the script's stdout"),
            Ok(None) => break,
            Err(_) => panic!("the script did not finish within {LIMIT:?}; output so far: {got:#?}"),
        };
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if !published && v["type"] == "subscribed" {
            // The subscription is in place: publish. Frames of one connection keep their order,
            // so u2's alerts, had they been delivered, would come before the frames after them.
            hub.publish_alert(&alert("u2", "a-u2-1"));
            hub.publish_event(&price());
            hub.publish_alert(&alert("u1", "a-u1-1"));
            hub.publish_alert(&alert("u2", "a-u2-2"));
            let mut last = price();
            if let EventData::PriceUpdate { price, .. } = &mut last.data {
                *price = 3800.0;
            }
            hub.publish_event(&last);
            published = true;
        }
        got.push(v);
    }
    let status = tokio::task::spawn_blocking(move || script.0.wait())
        .await
        .unwrap()
        .unwrap();
    let stderr = stderr.join().unwrap();
    assert!(
        status.success(),
        "the script failed ({status}): {got:#?}\nstderr:\n{stderr}"
    );

    let (reports, received): (Vec<&Value>, Vec<&Value>) = got.iter().partition(|v| v.get("py_client").is_some());
    assert_eq!(reports[0]["py_client"], "start", "{reports:?}");
    assert_eq!(
        reports[1],
        &json!({"py_client": "unknown_key", "status": 401}),
        "an unknown key must be refused with HTTP 401; stderr:\n{stderr}"
    );
    assert_eq!(
        reports[2],
        &json!({"py_client": "done", "reason": "count", "frames": frames}),
        "{got:#?}"
    );
    assert_eq!(reports.len(), 3, "{reports:?}");

    assert!(
        !received
            .iter()
            .any(|v| v["data"]["user_id"] == "u2" || v["data"]["alert_id"].as_str().is_some_and(|id| id.contains("u2"))),
        "u2's alert reached u1's connection: {received:#?}"
    );
    assert_eq!(received.len(), frames, "{received:#?}");
    assert_eq!(received[0], &json!({"type": "subscribed", "channels": channels}));
    // The exact price frame: event type, channel, the event data, and the event time in ms.
    let e = price();
    assert_eq!(
        received[1],
        &json!({
            "type": "price_update",
            "channel": "prices:coingecko:ethereum",
            "data": serde_json::to_value(&e.data).unwrap(),
            "timestamp": 1_717_430_350_000_i64,
        })
    );
    assert!(received[1]["timestamp"].is_i64(), "timestamp must be integer ms");
    assert_eq!(received[1]["data"]["coin"], "coingecko:ethereum");
    assert_eq!(received[1]["data"]["price"], json!(3791.12));
    assert_eq!(
        received[2],
        &json!({
            "type": "alert",
            "channel": "alerts",
            "data": serde_json::to_value(alert("u1", "a-u1-1")).unwrap(),
        })
    );
    assert_eq!(received[2]["data"]["user_id"], "u1");
    assert_eq!(
        (received[3]["type"].as_str(), received[3]["data"]["price"].as_f64()),
        (Some("price_update"), Some(3800.0)),
        "{received:#?}"
    );
}
