//! Tests against a real moto server (testkit), read back with boto3 from moto's venv — a client
//! independent of the sink's SDK.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};

use metrics_util::debugging::DebuggingRecorder;

use crate::test_support::metrics_of;
use serde_json::{Value, json};
use testkit::Moto;

use schemas::{Alert, Event, EventData, Millis};

use super::sink::entry;
use super::{SqsSink, SqsSinkConfig, SqsSinkError};
use crate::OutputBatch;
use crate::retry::jittered;

const T0: Millis = 1_717_430_400_000;

/// Creates queues and drains them with boto3: `<endpoint> create <name>` prints the queue URL;
/// `<endpoint> drain <url>` receives (and deletes) every message and prints them as JSON.
const BOTO3: &str = r#"
import boto3, json, sys
endpoint, action, arg = sys.argv[1], sys.argv[2], sys.argv[3]
sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
if action == "create":
    attrs = {"FifoQueue": "true"} if arg.endswith(".fifo") else {}
    print(sqs.create_queue(QueueName=arg, Attributes=attrs)["QueueUrl"])
elif action == "drain":
    out, empty = [], 0
    while empty < 2:
        r = sqs.receive_message(QueueUrl=arg, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                AttributeNames=["All"], VisibilityTimeout=120)
        msgs = r.get("Messages", [])
        if not msgs:
            empty += 1
            continue
        empty = 0
        for m in msgs:
            a = m.get("Attributes", {})
            out.append({"body": m["Body"], "group": a.get("MessageGroupId"),
                        "dedup": a.get("MessageDeduplicationId")})
            sqs.delete_message(QueueUrl=arg, ReceiptHandle=m["ReceiptHandle"])
    print(json.dumps(out))
"#;

/// The venv's python (with boto3), or `python3` on PATH.
fn python() -> PathBuf {
    match std::env::var("LLAMAFLOW_MOTO_VENV") {
        Ok(venv) => PathBuf::from(venv).join("bin/python"),
        Err(_) => PathBuf::from("python3"),
    }
}

/// Runs the boto3 script; its stdout.
fn boto3(moto: &Moto, action: &str, arg: &str) -> String {
    let out = Command::new(python())
        .args(["-c", BOTO3, &moto.endpoint(), action, arg])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .output()
        .expect("python with boto3 (LLAMAFLOW_MOTO_VENV)");
    assert!(
        out.status.success(),
        "boto3 {action} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A message read back: body, MessageGroupId, MessageDeduplicationId.
#[derive(Debug, PartialEq)]
struct Received {
    body: String,
    group: Option<String>,
    dedup: Option<String>,
}

fn drain(moto: &Moto, url: &str) -> Vec<Received> {
    let v: Vec<Value> = serde_json::from_str(&boto3(moto, "drain", url)).unwrap();
    v.into_iter()
        .map(|m| Received {
            body: m["body"].as_str().unwrap().to_string(),
            group: m["group"].as_str().map(String::from),
            dedup: m["dedup"].as_str().map(String::from),
        })
        .collect()
}

fn alert(n: usize, user: &str) -> Alert {
    Alert {
        alert_id: format!("{n:032x}"),
        rule_id: format!("rule-{n}"),
        user_id: user.to_string(),
        alert_type: "price_change".to_string(),
        subject: "coingecko:ethereum".to_string(),
        triggered_at: T0 + n as Millis * 1000,
        value: -5.31 - n as f64,
        threshold: 5.0,
        message: format!("ETH -{n}% in 1h (3791.12 → 3589.80) \"quoted\""),
        channels: vec!["websocket".to_string(), "webhook".to_string()],
        webhook_url: n.is_multiple_of(2).then(|| format!("https://example.invalid/hook/{n}")),
    }
}

fn gas(ts: Millis) -> Event {
    Event {
        subject: "ethereum".to_string(),
        timestamp: ts,
        data: EventData::GasUpdate {
            chain: "ethereum".to_string(),
            gwei: 21.5,
            timestamp: ts,
        },
    }
}

fn cfg(moto: &Moto, queue_url: &str) -> SqsSinkConfig {
    SqsSinkConfig {
        queue_url: queue_url.to_string(),
        endpoint_url: Some(moto.endpoint()),
        access_key_id: Some("testing".to_string()),
        secret_access_key: Some("testing".to_string()),
        ..SqsSinkConfig::default()
    }
}

/// Current-thread runtime, so the thread-local recorder sees every metric of the sink.
#[tokio::test]
async fn sqs_standard_queue_gets_every_alert_as_its_json() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let moto = Moto::start();
    let url = boto3(&moto, "create", "alerts");
    let alerts: Vec<Alert> = (0..23).map(|n| alert(n, &format!("u{}", n % 4))).collect();
    let batch = OutputBatch {
        epoch: 7,
        alerts: alerts.clone(),
        events: vec![gas(T0), gas(T0 + 1000)],
        ..Default::default()
    };
    let mut sink = SqsSink::connect(cfg(&moto, &url)).await.unwrap();
    let outcome = sink.write(&batch).await.unwrap();
    assert_eq!(outcome.sent, 23);
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);

    let mut got = drain(&moto, &url);
    // A standard queue does not promise order: compare as sorted bodies.
    got.sort_by(|a, b| a.body.cmp(&b.body));
    let mut expected: Vec<String> = alerts.iter().map(|a| serde_json::to_string(a).unwrap()).collect();
    expected.sort();
    let bodies: Vec<&str> = got.iter().map(|r| r.body.as_str()).collect();
    assert_eq!(bodies, expected, "exactly the 23 alert records, each once; no events");
    assert!(got.iter().all(|r| r.group.is_none() && r.dedup.is_none()), "{got:?}");
    // The body is the SPEC §2 record (unix seconds, null webhook_url kept).
    let one: Value = serde_json::from_str(&serde_json::to_string(&alerts[1]).unwrap()).unwrap();
    assert_eq!(one["triggered_at"], serde_json::json!(1_717_430_401));
    assert_eq!(one["webhook_url"], Value::Null);

    let (counters, histograms) = metrics_of(&snap);
    assert_eq!(
        counters.get(r#"llamaflow_sink_written_total["sink=sqs"]"#),
        Some(&23),
        "{counters:?}"
    );
    assert_eq!(
        counters.get(r#"llamaflow_sink_retries_total["sink=sqs"]"#),
        None,
        "{counters:?}"
    );
    assert_eq!(
        counters.get(r#"llamaflow_sink_failures_total["sink=sqs"]"#),
        None,
        "{counters:?}"
    );
    assert_eq!(
        histograms.get(r#"llamaflow_sink_latency_seconds["sink=sqs"]"#),
        Some(&1)
    );

    // A batch without alerts sends nothing and records nothing.
    let empty = sink
        .write(&OutputBatch {
            epoch: 8,
            alerts: vec![],
            events: vec![gas(T0 + 2000)],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(empty, super::SqsOutcome::default());
    assert!(drain(&moto, &url).is_empty());
    let (_, histograms) = metrics_of(&snap);
    let samples = histograms.get(r#"llamaflow_sink_latency_seconds["sink=sqs"]"#);
    assert!(matches!(samples, None | Some(0)), "{samples:?}");
}

#[tokio::test]
async fn sqs_fifo_queue_groups_by_user_and_deduplicates_by_alert_id() {
    let moto = Moto::start();
    let url = boto3(&moto, "create", "alerts.fifo");
    assert!(url.ends_with(".fifo"), "{url}");
    let alerts: Vec<Alert> = (0..14).map(|n| alert(n, &format!("user-{}", n % 3))).collect();
    let batch = OutputBatch {
        epoch: 1,
        alerts: alerts.clone(),
        events: vec![],
        ..Default::default()
    };
    let mut sink = SqsSink::connect(cfg(&moto, &url)).await.unwrap();
    assert_eq!(sink.write(&batch).await.unwrap().sent, 14);
    // Written again (a replayed epoch) within the deduplication window.
    let again = sink.write(&batch).await.unwrap();
    assert!(again.failed.is_empty(), "{:?}", again.failed);

    let got = drain(&moto, &url);
    assert_eq!(got.len(), 14, "each alert exactly once: {got:?}");
    for r in &got {
        let a: Alert = serde_json::from_str(&r.body).unwrap();
        let original = alerts.iter().find(|x| x.alert_id == a.alert_id).unwrap();
        assert_eq!(&r.body, &serde_json::to_string(original).unwrap());
        assert_eq!(r.group.as_deref(), Some(original.user_id.as_str()), "{r:?}");
        assert_eq!(r.dedup.as_deref(), Some(original.alert_id.as_str()), "{r:?}");
    }
    // Within a group, FIFO order = batch order.
    for user in ["user-0", "user-1", "user-2"] {
        let order: Vec<String> = got
            .iter()
            .filter(|r| r.group.as_deref() == Some(user))
            .map(|r| serde_json::from_str::<Alert>(&r.body).unwrap().alert_id)
            .collect();
        let expected: Vec<String> = alerts
            .iter()
            .filter(|a| a.user_id == user)
            .map(|a| a.alert_id.clone())
            .collect();
        assert_eq!(order, expected, "{user}");
    }
}

#[tokio::test]
async fn sqs_unreachable_endpoint_fails_the_write_without_dead_lettering() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    // A loopback port nobody listens on: connections are refused.
    let port = testkit::free_port();
    let alerts: Vec<Alert> = (0..12).map(|n| alert(n, "u1")).collect();
    let mut sink = SqsSink::connect(SqsSinkConfig {
        queue_url: format!("http://127.0.0.1:{port}/123456789012/alerts"),
        endpoint_url: Some(format!("http://127.0.0.1:{port}")),
        access_key_id: Some("testing".to_string()),
        secret_access_key: Some("testing".to_string()),
        max_attempts: 3,
        initial_backoff_ms: 10,
        max_backoff_ms: 20,
        connect_timeout_ms: 500,
        attempt_timeout_ms: 1000,
        ..SqsSinkConfig::default()
    })
    .await
    .unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        sink.write(&OutputBatch {
            epoch: 3,
            alerts: alerts.clone(),
            events: vec![],
            ..Default::default()
        }),
    )
    .await
    .expect("write must not hang")
    .expect_err("an unreachable SQS fails the write: the pipeline retries the batch, nothing is dead-lettered");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    let msg = err.to_string();
    assert!(
        matches!(err, SqsSinkError::Unavailable { epoch: 3, .. }) && msg.contains("after 3 attempt(s)"),
        "{msg}"
    );
    let (counters, _) = metrics_of(&snap);
    // 2 chunks (10 + 2), each retried twice, then the write gives up.
    assert_eq!(
        counters.get(r#"llamaflow_sink_retries_total["sink=sqs"]"#),
        Some(&4),
        "{counters:?}"
    );
    let written = counters.get(r#"llamaflow_sink_written_total["sink=sqs"]"#);
    assert!(matches!(written, None | Some(0)), "{written:?}");
}

#[tokio::test]
async fn sqs_missing_queue_fails_the_write_without_dead_lettering() {
    let moto = Moto::start();
    let url = format!("{}/123456789012/no-such-queue", moto.endpoint());
    let mut sink = SqsSink::connect(cfg(&moto, &url)).await.unwrap();
    let started = Instant::now();
    let result = sink
        .write(&OutputBatch {
            epoch: 5,
            alerts: vec![alert(1, "u1")],
            events: vec![],
            ..Default::default()
        })
        .await;
    match result {
        Err(SqsSinkError::Send {
            epoch: 5, queue_url, ..
        }) => assert_eq!(queue_url, url),
        other => panic!("expected a send error, got {other:?}"),
    }
    // At once: not retried.
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[test]
fn sqs_fifo_entries_carry_group_and_deduplication_ids() {
    let a = alert(3, "user-9");
    let fifo = entry(&a, "{}", 4, true).unwrap();
    assert_eq!(fifo.id(), "4");
    assert_eq!(fifo.message_body(), "{}");
    assert_eq!(fifo.message_group_id(), Some("user-9"));
    assert_eq!(fifo.message_deduplication_id(), Some(a.alert_id.as_str()));
    let standard = entry(&a, "{}", 0, false).unwrap();
    assert_eq!(standard.message_group_id(), None);
    assert_eq!(standard.message_deduplication_id(), None);
}

#[test]
fn sqs_config_defaults_validation_and_redaction() {
    let d = SqsSinkConfig::default();
    assert_eq!(
        (
            d.region.as_str(),
            d.max_attempts,
            d.initial_backoff_ms,
            d.max_backoff_ms
        ),
        ("us-east-1", 8, 100, 5000)
    );
    let parsed: SqsSinkConfig =
        serde_json::from_str(r#"{"queue_url": "https://sqs.eu-west-1.amazonaws.com/1/a.fifo", "region": "eu-west-1"}"#)
            .unwrap();
    assert!(parsed.is_fifo());
    assert_eq!(parsed.max_attempts, 8);
    assert!(parsed.validate().is_ok());
    assert!(
        serde_json::from_str::<SqsSinkConfig>(r#"{"queue_urll": "x"}"#).is_err(),
        "unknown fields are errors"
    );
    assert!(
        !SqsSinkConfig {
            queue_url: "https://sqs/1/fifo".to_string(),
            ..d.clone()
        }
        .is_fifo()
    );

    for bad in [
        d.clone(),
        SqsSinkConfig {
            queue_url: "q".to_string(),
            max_attempts: 0,
            ..d.clone()
        },
        SqsSinkConfig {
            queue_url: "q".to_string(),
            access_key_id: Some("AKIA".to_string()),
            ..d.clone()
        },
    ] {
        assert!(matches!(bad.validate(), Err(SqsSinkError::Config(_))), "{bad:?}");
    }

    let secret = SqsSinkConfig {
        secret_access_key: Some("hunter2".to_string()),
        session_token: Some("tok3n".to_string()),
        ..d.clone()
    };
    let shown = format!("{secret:?}");
    assert!(!shown.contains("hunter2") && !shown.contains("tok3n"), "{shown}");

    let ms: Vec<u128> = (1..=9).map(|n| d.backoff(n).as_millis()).collect();
    assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    assert_eq!(d.backoff(300).as_millis(), 5000);
    let waits: Vec<Duration> = (0..200).map(|_| jittered(Duration::from_millis(1000))).collect();
    assert!(
        waits.iter().all(|w| w.as_millis() >= 500 && w.as_millis() <= 1000),
        "{waits:?}"
    );
}

/// A fault-injecting proxy in front of moto (moto itself never fails single entries of a
/// batch): `SendMessageBatch` entries of the listed alerts are taken out of the request and
/// reported back in `Failed` — once and retryable, or always as the sender's fault — while
/// everything else reaches moto unchanged.
struct FaultProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    upstream: String,
    client: reqwest::Client,
    /// Alert ids failed (SenderFault=false) the first time they are sent.
    fail_once: Mutex<HashSet<String>>,
    /// Alert ids failed (SenderFault=true) every time.
    fail_always: HashSet<String>,
    /// Alert ids of each `SendMessageBatch` call, as sent by the sink.
    calls: Mutex<Vec<Vec<String>>>,
    /// How long each `SendMessageBatch` call is held before it goes on to moto.
    delay: Duration,
    /// `SendMessageBatch` calls in the proxy now, and the most at once.
    in_flight: std::sync::atomic::AtomicUsize,
    max_in_flight: std::sync::atomic::AtomicUsize,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy(
    State(s): State<Arc<ProxyState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mut body = body.to_vec();
    let mut injected = Vec::new();
    // Counted as in flight until the answer is built (every return path).
    let _in_flight = (target == "AmazonSQS.SendMessageBatch").then(|| InFlight::enter(&s));
    if _in_flight.is_some() {
        tokio::time::sleep(s.delay).await;
        let mut v: Value = serde_json::from_slice(&body).unwrap();
        let mut keep = Vec::new();
        let mut ids = Vec::new();
        for e in v["Entries"].as_array().unwrap().clone() {
            let alert: Alert = serde_json::from_str(e["MessageBody"].as_str().unwrap()).unwrap();
            ids.push(alert.alert_id.clone());
            if s.fail_always.contains(&alert.alert_id) {
                injected.push(
                    json!({"Id": e["Id"], "SenderFault": true, "Code": "InvalidParameterValue",
                    "Message": "injected permanent failure"}),
                );
            } else if s.fail_once.lock().unwrap().remove(&alert.alert_id) {
                injected.push(json!({"Id": e["Id"], "SenderFault": false, "Code": "InternalError",
                    "Message": "injected transient failure"}));
            } else {
                keep.push(e);
            }
        }
        s.calls.lock().unwrap().push(ids);
        if keep.is_empty() {
            let out = json!({"Successful": [], "Failed": injected}).to_string();
            return ([(CONTENT_TYPE, "application/x-amz-json-1.0")], out).into_response();
        }
        v["Entries"] = Value::Array(keep);
        body = serde_json::to_vec(&v).unwrap();
    }
    let mut req = s.client.request(method, format!("{}{uri}", s.upstream)).body(body);
    for (name, value) in &headers {
        if name != HOST && name != CONTENT_LENGTH {
            req = req.header(name, value);
        }
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let content_type = resp.headers().get(CONTENT_TYPE).cloned();
    let mut out = resp.bytes().await.unwrap().to_vec();
    if !injected.is_empty() {
        let mut v: Value = serde_json::from_slice(&out).unwrap();
        if !v["Failed"].is_array() {
            v["Failed"] = json!([]);
        }
        v["Failed"].as_array_mut().unwrap().extend(injected);
        out = serde_json::to_vec(&v).unwrap();
    }
    let mut response = (status, out).into_response();
    if let Some(ct) = content_type {
        response.headers_mut().insert(CONTENT_TYPE, ct);
    }
    response
}

/// One `SendMessageBatch` call in the proxy: counted in `in_flight` (and `max_in_flight`)
/// while it lives.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(s: &'a ProxyState) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let now = s.in_flight.fetch_add(1, SeqCst) + 1;
        s.max_in_flight.fetch_max(now, SeqCst);
        InFlight(&s.in_flight)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl FaultProxy {
    async fn start(moto: &Moto, fail_once: &[&Alert], fail_always: &[&Alert]) -> FaultProxy {
        Self::start_with(moto, fail_once, fail_always, Duration::ZERO).await
    }

    /// [`FaultProxy::start`] holding each `SendMessageBatch` call for `delay`.
    async fn start_with(moto: &Moto, fail_once: &[&Alert], fail_always: &[&Alert], delay: Duration) -> FaultProxy {
        let state = Arc::new(ProxyState {
            delay,
            in_flight: Default::default(),
            max_in_flight: Default::default(),
            upstream: moto.endpoint(),
            client: reqwest::Client::new(),
            fail_once: Mutex::new(fail_once.iter().map(|a| a.alert_id.clone()).collect()),
            fail_always: fail_always.iter().map(|a| a.alert_id.clone()).collect(),
            calls: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new().fallback(proxy).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultProxy { addr, state, task }
    }
}

#[tokio::test]
async fn sqs_retries_only_the_entries_that_failed_and_returns_sender_faults() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let moto = Moto::start();
    let url = boto3(&moto, "create", "partial");
    let alerts: Vec<Alert> = (0..13).map(|n| alert(n, "u1")).collect();
    let (flaky, bad) = (&alerts[4], &alerts[11]);
    let proxy = FaultProxy::start(&moto, &[flaky], &[bad]).await;
    let mut sink = SqsSink::connect(SqsSinkConfig {
        endpoint_url: Some(format!("http://{}", proxy.addr)),
        initial_backoff_ms: 10,
        max_backoff_ms: 20,
        ..cfg(&moto, &url)
    })
    .await
    .unwrap();
    let outcome = sink
        .write(&OutputBatch {
            epoch: 2,
            alerts: alerts.clone(),
            events: vec![],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(outcome.sent, 12);
    assert_eq!(outcome.failed.len(), 1, "{:?}", outcome.failed);
    assert_eq!(&outcome.failed[0].0, bad);
    assert!(
        outcome.failed[0].1.contains("InvalidParameterValue"),
        "{}",
        outcome.failed[0].1
    );

    // Calls: 10 + 3 entries (at once), then only the entry that failed transiently.
    let calls = proxy.state.calls.lock().unwrap().clone();
    let mut sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
    sizes[..2].sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(sizes, [10, 3, 1], "{calls:?}");
    assert_eq!(calls[2], std::slice::from_ref(&flaky.alert_id));

    // The queue holds every other alert exactly once (a standard queue keeps duplicates).
    let mut got: Vec<String> = drain(&moto, &url).into_iter().map(|r| r.body).collect();
    got.sort();
    let mut expected: Vec<String> = alerts
        .iter()
        .filter(|a| a.alert_id != bad.alert_id)
        .map(|a| serde_json::to_string(a).unwrap())
        .collect();
    expected.sort();
    assert_eq!(got, expected);

    let (counters, _) = metrics_of(&snap);
    assert_eq!(
        counters.get(r#"llamaflow_sink_written_total["sink=sqs"]"#),
        Some(&12),
        "{counters:?}"
    );
    assert_eq!(
        counters.get(r#"llamaflow_sink_retries_total["sink=sqs"]"#),
        Some(&1),
        "{counters:?}"
    );
    assert_eq!(
        counters.get(r#"llamaflow_sink_failures_total["sink=sqs"]"#),
        Some(&1),
        "{counters:?}"
    );
}

/// Calls go out concurrently (up to `max_concurrent_calls`), and on a FIFO queue each user's
/// alerts still arrive in batch order; with one call at a time nothing overlaps.
#[tokio::test]
async fn sqs_sends_calls_concurrently_keeping_each_groups_order() {
    let moto = Moto::start();
    let url = boto3(&moto, "create", "lanes.fifo");
    let alerts: Vec<Alert> = (0..120).map(|n| alert(n, &format!("user-{}", n % 9))).collect();
    for (limit, want_overlap) in [(1, false), (4, true)] {
        let proxy = FaultProxy::start_with(&moto, &[], &[], Duration::from_millis(40)).await;
        let mut sink = SqsSink::connect(SqsSinkConfig {
            endpoint_url: Some(format!("http://{}", proxy.addr)),
            max_concurrent_calls: limit,
            ..cfg(&moto, &url)
        })
        .await
        .unwrap();
        let batch = OutputBatch {
            epoch: limit as u64,
            alerts: alerts
                .iter()
                .map(|a| Alert {
                    alert_id: format!("{}-{limit}", a.alert_id),
                    ..a.clone()
                })
                .collect(),
            ..Default::default()
        };
        let outcome = sink.write(&batch).await.unwrap();
        assert_eq!((outcome.sent, outcome.failed.len()), (120, 0));
        let most = proxy.state.max_in_flight.load(std::sync::atomic::Ordering::SeqCst);
        assert!(most <= limit, "{most} calls at once, limit {limit}");
        assert_eq!(most > 1, want_overlap, "{most} calls at once, limit {limit}");
        let got = drain(&moto, &url);
        assert_eq!(got.len(), 120);
        for user in (0..9).map(|u| format!("user-{u}")) {
            let order: Vec<String> = got
                .iter()
                .filter(|r| r.group.as_deref() == Some(user.as_str()))
                .map(|r| serde_json::from_str::<Alert>(&r.body).unwrap().alert_id)
                .collect();
            let expected: Vec<String> = batch
                .alerts
                .iter()
                .filter(|a| a.user_id == user)
                .map(|a| a.alert_id.clone())
                .collect();
            assert_eq!(order, expected, "{user}, limit {limit}");
        }
    }
}
