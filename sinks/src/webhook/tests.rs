//! Tests against a real HTTP server (axum on 127.0.0.1:0) started by each test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use hmac::{Hmac, Mac};
use metrics_util::debugging::DebuggingRecorder;

use crate::test_support::metrics_of;
use sha2::Sha256;

use schemas::{Alert, Millis};

use super::{WebhookConfig, WebhookError, WebhookSink, sign, webhook_target};
use crate::OutputBatch;
use crate::retry::jittered;

const T0: Millis = 1_717_430_400_000;
const SECRET: &str = "whsec_test_0123456789";

/// What the server answers to the n-th request (1-based) on a path.
type Script = Arc<dyn Fn(&str, usize) -> Answer + Send + Sync>;

/// An answer: a status, after an optional delay.
#[derive(Clone, Copy)]
struct Answer {
    status: StatusCode,
    delay: Duration,
}

fn answer(status: StatusCode) -> Answer {
    Answer {
        status,
        delay: Duration::ZERO,
    }
}

/// One request the server received.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

struct ServerState {
    script: Script,
    received: Mutex<Vec<Received>>,
    per_path: Mutex<HashMap<String, usize>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A local HTTP server recording every request and answering per its script.
struct Server {
    addr: SocketAddr,
    state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(state): State<Arc<ServerState>>, uri: Uri, headers: HeaderMap, body: Bytes) -> StatusCode {
    let path = uri.path().to_string();
    let n = {
        let mut per_path = state.per_path.lock().unwrap();
        let n = per_path.entry(path.clone()).or_insert(0);
        *n += 1;
        *n
    };
    state.received.lock().unwrap().push(Received {
        path: path.clone(),
        headers,
        body,
    });
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let a = (state.script)(&path, n);
    tokio::time::sleep(a.delay).await;
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    a.status
}

impl Server {
    async fn start(script: impl Fn(&str, usize) -> Answer + Send + Sync + 'static) -> Server {
        let state = Arc::new(ServerState {
            script: Arc::new(script),
            received: Mutex::new(Vec::new()),
            per_path: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let app = Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Server { addr, state, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    fn hits(&self, path: &str) -> usize {
        self.state.per_path.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn alert(n: usize, channels: &[&str], url: Option<String>) -> Alert {
    Alert {
        alert_id: format!("{n:032x}"),
        rule_id: format!("rule-{n}"),
        user_id: "u1".to_string(),
        alert_type: "price_threshold".to_string(),
        subject: "coingecko:ethereum".to_string(),
        triggered_at: T0 + n as Millis * 1000,
        value: 3500.25,
        threshold: 3000.0,
        message: format!("ETH above 3000 → {n} \"é\""),
        channels: channels.iter().map(|c| c.to_string()).collect(),
        webhook_url: url,
    }
}

fn batch(alerts: Vec<Alert>) -> OutputBatch {
    OutputBatch {
        epoch: 1,
        alerts,
        ..Default::default()
    }
}

/// Fast retries for tests.
fn cfg() -> WebhookConfig {
    WebhookConfig {
        secret: SECRET.to_string(),
        initial_backoff_ms: 10,
        max_backoff_ms: 40,
        timeout_ms: 2000,
        ..WebhookConfig::default()
    }
}

fn header<'a>(r: &'a Received, name: &str) -> &'a str {
    r.headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

/// Current-thread runtime, so the thread-local recorder sees every metric of the sink.
#[tokio::test]
async fn webhook_posts_signed_alert_json_only_for_webhook_alerts_with_a_url() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let server = Server::start(|_, _| answer(StatusCode::OK)).await;
    let wanted_a = alert(1, &["websocket", "webhook"], Some(server.url("/hooks/a")));
    let wanted_b = alert(4, &["webhook"], Some(server.url("/hooks/b?token=x")));
    let alerts = vec![
        wanted_a.clone(),
        alert(2, &["websocket"], Some(server.url("/hooks/no-channel"))),
        alert(3, &["webhook"], None),
        wanted_b.clone(),
        alert(5, &["webhook"], Some("  ".to_string())),
    ];
    let mut sink = WebhookSink::new(cfg()).unwrap();
    let outcome = sink.write(&batch(alerts)).await.unwrap();
    assert_eq!(outcome.delivered, 2);
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);

    let mut got = server.received();
    got.sort_by(|a, b| a.path.cmp(&b.path));
    let paths: Vec<&str> = got.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/hooks/a", "/hooks/b"],
        "only webhook alerts with a URL are posted"
    );
    for (r, a) in got.iter().zip([&wanted_a, &wanted_b]) {
        let expected = serde_json::to_string(a).unwrap();
        assert_eq!(
            std::str::from_utf8(&r.body).unwrap(),
            expected,
            "body = the alert record"
        );
        assert_eq!(header(r, "content-type"), "application/json");
        assert_eq!(header(r, "x-llamaflow-alert-id"), a.alert_id);
        // The receiver's check: HMAC-SHA256 of the raw body with the shared secret.
        let hex_sig = header(r, "x-llamaflow-signature").strip_prefix("sha256=").unwrap();
        let sig = hex::decode(hex_sig).unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(&r.body);
        assert!(mac.verify_slice(&sig).is_ok(), "signature verifies with the secret");
        let mut wrong = Hmac::<Sha256>::new_from_slice(b"another secret").unwrap();
        wrong.update(&r.body);
        assert!(wrong.verify_slice(&sig).is_err(), "and not with another one");
    }

    let (counters, histograms) = metrics_of(&snap);
    assert_eq!(
        counters.get(r#"llamaflow_sink_written_total["sink=webhook"]"#),
        Some(&2),
        "{counters:?}"
    );
    assert_eq!(
        counters.get(r#"llamaflow_sink_retries_total["sink=webhook"]"#),
        None,
        "{counters:?}"
    );
    assert_eq!(
        counters.get(r#"llamaflow_sink_failures_total["sink=webhook"]"#),
        None,
        "{counters:?}"
    );
    assert_eq!(
        histograms.get(r#"llamaflow_sink_latency_seconds["sink=webhook"]"#),
        Some(&1)
    );

    // A batch without webhook alerts posts nothing and records nothing.
    let outcome = sink
        .write(&batch(vec![alert(9, &["websocket"], Some(server.url("/x")))]))
        .await
        .unwrap();
    assert_eq!(outcome, super::WebhookOutcome::default());
    assert_eq!(server.received().len(), 2);
    let (_, histograms) = metrics_of(&snap);
    let samples = histograms.get(r#"llamaflow_sink_latency_seconds["sink=webhook"]"#);
    assert!(matches!(samples, None | Some(0)), "{samples:?}");
}

#[tokio::test]
async fn webhook_retries_5xx_and_429_until_success() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let server = Server::start(|path, n| match (path, n) {
        ("/flaky", 1 | 2) => answer(StatusCode::INTERNAL_SERVER_ERROR),
        ("/busy", 1) => answer(StatusCode::TOO_MANY_REQUESTS),
        _ => answer(StatusCode::OK),
    })
    .await;
    let flaky = alert(1, &["webhook"], Some(server.url("/flaky")));
    let busy = alert(2, &["webhook"], Some(server.url("/busy")));
    let mut sink = WebhookSink::new(cfg()).unwrap();
    let outcome = sink.write(&batch(vec![flaky.clone(), busy])).await.unwrap();
    assert_eq!(outcome.delivered, 2);
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    assert_eq!(server.hits("/flaky"), 3, "500, 500, then 200");
    assert_eq!(server.hits("/busy"), 2, "429, then 200");
    // Every attempt is the same signed request.
    let flaky_bodies: Vec<Received> = server.received().into_iter().filter(|r| r.path == "/flaky").collect();
    let expected = serde_json::to_string(&flaky).unwrap();
    for r in &flaky_bodies {
        assert_eq!(r.body, expected.as_bytes());
        assert_eq!(
            header(r, "x-llamaflow-signature"),
            sign(SECRET.as_bytes(), expected.as_bytes())
        );
    }
    let (counters, _) = metrics_of(&snap);
    assert_eq!(
        counters.get(r#"llamaflow_sink_retries_total["sink=webhook"]"#),
        Some(&3),
        "{counters:?}"
    );
    assert_eq!(
        counters.get(r#"llamaflow_sink_written_total["sink=webhook"]"#),
        Some(&2),
        "{counters:?}"
    );
    assert_eq!(
        counters.get(r#"llamaflow_sink_failures_total["sink=webhook"]"#),
        None,
        "{counters:?}"
    );
}

#[tokio::test]
async fn webhook_gives_up_after_the_budget_and_on_permanent_4xx() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let server = Server::start(|path, _| match path {
        "/down" => answer(StatusCode::INTERNAL_SERVER_ERROR),
        "/gone" => answer(StatusCode::NOT_FOUND),
        "/moved" => answer(StatusCode::MOVED_PERMANENTLY),
        _ => answer(StatusCode::OK),
    })
    .await;
    let down = alert(1, &["webhook"], Some(server.url("/down")));
    let ok = alert(2, &["webhook"], Some(server.url("/ok")));
    let gone = alert(3, &["webhook"], Some(server.url("/gone")));
    let moved = alert(4, &["webhook"], Some(server.url("/moved")));
    let bad_url = alert(5, &["webhook"], Some("not a url".to_string()));
    let bad_scheme = alert(6, &["webhook"], Some("ftp://127.0.0.1/x".to_string()));
    let mut sink = WebhookSink::new(WebhookConfig {
        max_attempts: 3,
        ..cfg()
    })
    .unwrap();
    let outcome = sink
        .write(&batch(vec![
            down.clone(),
            ok,
            gone.clone(),
            moved.clone(),
            bad_url.clone(),
            bad_scheme.clone(),
        ]))
        .await
        .unwrap();
    assert_eq!(outcome.delivered, 1);
    let failed: Vec<&Alert> = outcome.failed.iter().map(|(a, _)| a).collect();
    assert_eq!(failed, [&down, &gone, &moved, &bad_url, &bad_scheme], "in batch order");
    let reasons: Vec<&str> = outcome.failed.iter().map(|(_, r)| r.as_str()).collect();
    assert!(
        reasons[0].contains("HTTP 500") && reasons[0].contains("gave up after 3 attempt(s)"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("HTTP 404") && !reasons[1].contains("gave up"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("HTTP 301"), "{reasons:?}");
    assert!(reasons[3].contains("invalid webhook_url"), "{reasons:?}");
    assert!(reasons[4].contains("scheme"), "{reasons:?}");
    assert_eq!(server.hits("/down"), 3, "the whole budget");
    assert_eq!(server.hits("/gone"), 1, "a 404 is not retried");
    assert_eq!(server.hits("/moved"), 1, "a redirect is not followed nor retried");
    let (counters, _) = metrics_of(&snap);
    assert_eq!(
        counters.get(r#"llamaflow_sink_retries_total["sink=webhook"]"#),
        Some(&2),
        "{counters:?}"
    );
    assert_eq!(
        counters.get(r#"llamaflow_sink_failures_total["sink=webhook"]"#),
        Some(&5),
        "{counters:?}"
    );
    assert_eq!(
        counters.get(r#"llamaflow_sink_written_total["sink=webhook"]"#),
        Some(&1),
        "{counters:?}"
    );
}

#[tokio::test]
async fn webhook_hanging_or_unreachable_server_fails_after_timeouts() {
    let server = Server::start(|_, _| Answer {
        status: StatusCode::OK,
        delay: Duration::from_secs(60),
    })
    .await;
    let hanging = alert(1, &["webhook"], Some(server.url("/slow")));
    // A loopback port nobody listens on: connections are refused.
    let refused = alert(
        2,
        &["webhook"],
        Some(format!("http://127.0.0.1:{}/x", testkit::free_port())),
    );
    let mut sink = WebhookSink::new(WebhookConfig {
        timeout_ms: 300,
        max_attempts: 2,
        ..cfg()
    })
    .unwrap();
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        sink.write(&batch(vec![hanging.clone(), refused.clone()])),
    )
    .await
    .expect("write must not hang")
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(outcome.delivered, 0);
    assert_eq!(outcome.failed.len(), 2, "{:?}", outcome.failed);
    assert_eq!(outcome.failed[0].0, hanging);
    assert!(
        outcome.failed[0].1.contains("timed out after 300 ms") && outcome.failed[0].1.contains("2 attempt(s)"),
        "{}",
        outcome.failed[0].1
    );
    assert_eq!(server.hits("/slow"), 2, "each timeout is retried within the budget");
    assert_eq!(outcome.failed[1].0, refused);
    assert!(outcome.failed[1].1.contains("2 attempt(s)"), "{}", outcome.failed[1].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_deliveries_run_concurrently_up_to_the_bound() {
    let server = Server::start(|_, _| Answer {
        status: StatusCode::OK,
        delay: Duration::from_millis(150),
    })
    .await;
    let alerts: Vec<Alert> = (0..20)
        .map(|n| alert(n, &["webhook"], Some(server.url(&format!("/c/{n}")))))
        .collect();
    let mut sink = WebhookSink::new(WebhookConfig {
        concurrency: 4,
        ..cfg()
    })
    .unwrap();
    let started = Instant::now();
    let outcome = sink.write(&batch(alerts)).await.unwrap();
    assert_eq!(outcome.delivered, 20);
    assert_eq!(server.received().len(), 20);
    let max = server.state.max_in_flight.load(Ordering::SeqCst);
    assert_eq!(max, 4, "at most `concurrency` in flight, and that many used");
    // 20 × 150 ms one at a time would be 3 s; 4 at a time about 0.75 s.
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn webhook_signature_is_hmac_sha256_hex() {
    // RFC 4231, test case 2.
    assert_eq!(
        sign(b"Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[test]
fn webhook_target_needs_the_channel_and_a_url() {
    let url = Some("https://example.invalid/h".to_string());
    assert_eq!(
        webhook_target(&alert(1, &["websocket", "webhook"], url.clone())),
        Some("https://example.invalid/h")
    );
    assert_eq!(webhook_target(&alert(1, &["websocket"], url.clone())), None);
    assert_eq!(webhook_target(&alert(1, &["Webhook"], url)), None);
    assert_eq!(webhook_target(&alert(1, &["webhook"], None)), None);
    assert_eq!(webhook_target(&alert(1, &["webhook"], Some(String::new()))), None);
}

#[test]
fn webhook_config_defaults_validation_and_redaction() {
    let d = WebhookConfig::default();
    assert_eq!(
        (
            d.timeout_ms,
            d.max_attempts,
            d.initial_backoff_ms,
            d.max_backoff_ms,
            d.concurrency
        ),
        (5000, 5, 200, 10_000, 16)
    );
    let parsed: WebhookConfig = serde_json::from_str(r#"{"secret": "hunter2", "concurrency": 4}"#).unwrap();
    assert_eq!((parsed.concurrency, parsed.max_attempts), (4, 5));
    assert!(!format!("{parsed:?}").contains("hunter2"));
    assert!(serde_json::from_str::<WebhookConfig>(r#"{"secrett": "x"}"#).is_err());
    for bad in [
        d.clone(),
        WebhookConfig {
            max_attempts: 0,
            ..parsed.clone()
        },
        WebhookConfig {
            concurrency: 0,
            ..parsed.clone()
        },
        WebhookConfig {
            timeout_ms: 0,
            ..parsed.clone()
        },
    ] {
        assert!(matches!(WebhookSink::new(bad), Err(WebhookError::Config(_))));
    }
    let ms: Vec<u128> = (1..=8).map(|n| d.backoff(n).as_millis()).collect();
    assert_eq!(ms, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
    let waits: Vec<Duration> = (0..200).map(|_| jittered(Duration::from_millis(1000))).collect();
    assert!(
        waits.iter().all(|w| w.as_millis() >= 500 && w.as_millis() <= 1000),
        "{waits:?}"
    );
}
