//! `llamaflow run` (embedded default) end to end: the real binary, a real WebSocket client,
//! HTTP for the dashboard and metrics, and a clean stop on SIGTERM.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

mod common;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "llamaflow run did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_run_serves_live_data_and_stops_cleanly() {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--speed",
            "120",
            "--warmup-minutes",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    wait_for_port(port);

    let page = http_get(port, "/");
    assert!(page.starts_with("HTTP/1.1 200"), "{}", &page[..page.len().min(200)]);
    assert!(page.contains("<html") && page.contains("/ws"), "dashboard page");

    // Unknown keys are refused; the demo key maps to the demo user, who owns the demo rules.
    let refused = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws?api_key=nope")).await;
    assert!(refused.is_err(), "unknown API key must get 401");
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws?api_key=demo"))
        .await
        .unwrap();
    ws.send(Message::text(
        json!({"type":"subscribe","channels":["prices:coingecko:ethereum","tvl","gas","alerts"]}).to_string(),
    ))
    .await
    .unwrap();
    let mut seen = std::collections::BTreeMap::<String, Value>::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(seen.contains_key("price_update") && seen.contains_key("alert") && seen.contains_key("tvl_update")) {
        assert!(Instant::now() < deadline, "frames seen so far: {:?}", seen.keys());
        let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await else {
            panic!("WebSocket closed or silent; seen {:?}", seen.keys());
        };
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            seen.entry(v["type"].as_str().unwrap_or("?").to_string()).or_insert(v);
        }
    }
    assert_eq!(seen["subscribed"]["channels"].as_array().map(Vec::len), Some(4));
    let price = &seen["price_update"];
    assert_eq!(price["channel"], "prices:coingecko:ethereum");
    assert_eq!(price["data"]["coin"], "coingecko:ethereum");
    assert!(price["data"]["price"].as_f64().unwrap() > 0.0);
    let alert = &seen["alert"]["data"];
    assert_eq!(alert["user_id"], "demo");
    assert_eq!(alert["alert_id"].as_str().map(str::len), Some(32));
    assert!(!seen.contains_key("depeg"), "not subscribed to depeg");

    let metrics = http_get(port, "/metrics");
    assert!(
        metrics.contains("llamaflow_records_in_total{kind=\"price\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("llamaflow_alerts_total"), "{metrics}");
    // State sizes: the front routes every demo rule; the workers hold the demo's keys.
    let state = |operator: &str, kind: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("llamaflow_state_entries{")
                    && l.contains(&format!("operator=\"{operator}\""))
                    && l.contains(&format!("kind=\"{kind}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        state("sequencer", "rule_routes"),
        sources::demo::demo_rules().len() as f64,
        "{metrics}"
    );
    assert!(
        state("keyed", "rules") >= sources::demo::demo_rules().len() as f64,
        "{metrics}"
    );
    assert!(state("keyed", "coins") > 0.0, "{metrics}");

    let pid = running.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = running.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "llamaflow did not stop within 15 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
    let mut stdout = String::new();
    running.0.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    let first: Value = serde_json::from_str(stdout.lines().next().expect("alerts on stdout")).unwrap();
    assert_eq!(first["user_id"], "demo");
}

/// Issue 15 #7: a Kafka source that cannot reach its broker is visible — `/readyz` 503 and
/// `/healthz` degraded naming the source and the error — and librdkafka's stream of errors is
/// logged at most once per 10 s per kind, with a count.
#[test]
fn an_unreachable_kafka_source_is_degraded_and_its_warnings_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{port}\"\ncheckpoint_dir = \"\"\n\n\
             [sources.kafka]\nbrokers = \"127.0.0.1:1\"\ngroup_id = \"g\"\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut job = Running(
        Command::new(env!("CARGO_BIN_EXE_llamaflow"))
            .args(["run", "--config", config.to_str().unwrap()])
            .env("LLAMAFLOW_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for_port(port);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let health = loop {
        let ready = http_get(port, "/readyz");
        let health = http_get(port, "/healthz");
        let body = health.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        if ready.starts_with("HTTP/1.1 503") && body.contains("\"kafka\"") && body.contains("failing") {
            break body;
        }
        assert!(Instant::now() < deadline, "never degraded: {ready}\n{health}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let v: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(v["status"], "degraded", "{v}");
    assert_eq!(v["sources"]["kafka"]["status"], "failing", "{v}");
    assert!(!v["sources"]["kafka"]["error"].as_str().unwrap_or("").is_empty(), "{v}");
    // Keep it failing for a while: librdkafka reports the broker many times a second.
    while started.elapsed() < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = job.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = job.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    let kafka_warnings = text.lines().filter(|l| l.contains("kafka source")).count();
    // Two kinds (client errors, librdkafka log lines), once per 10 s each: a handful at most.
    assert!(kafka_warnings <= 6, "{kafka_warnings} kafka warnings in ~6 s:\n{text}");
    assert!(kafka_warnings >= 1, "the failure is logged:\n{text}");
}

/// The value of the first `/metrics` line starting with `prefix` (0 when absent).
fn metric(port: u16, prefix: &str) -> f64 {
    let body = http_get(port, "/metrics");
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Issue 15 #1 against the real binary under a low open-file limit (512, soft and hard): 600
/// idle connections used to take every descriptor, so `/metrics`, `/healthz` and `/ws` went
/// silently unreachable and the job could no longer open files. Now the connection cap (the
/// limit less 256) answers the excess with 503 (counted), the header timeout closes the idle
/// ones, and the job keeps serving, writing and stops cleanly.
#[test]
fn under_a_low_open_file_limit_idle_connections_are_capped_then_closed() {
    use std::os::unix::process::CommandExt;
    const LIMIT: u64 = 512;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("llamaflow.toml");
    let events = dir.path().join("events.jsonl");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{port}\"\ncheckpoint_dir = \"\"\nhttp_header_timeout_ms = 2000\n\n\
             [sources.demo]\nspeed = 60.0\nwarmup_minutes = 1\n\n\
             [sinks.jsonl]\nevents = \"{}\"\n",
            events.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llamaflow"));
    cmd.args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut job = Running(cmd.spawn().unwrap());
    wait_for_port(port);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", job.0.id())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 512 ")),
        "{limits}"
    );
    let written = || std::fs::metadata(&events).map(|m| m.len()).unwrap_or(0);
    common::wait_until("first events written", Duration::from_secs(20), || written() > 0);

    // More idle connections than the process has descriptors: none sends a byte. They arrive
    // faster than the server accepts them: with a listen backlog of 128 the kernel dropped
    // SYNs, connecting took seconds, held connections timed out meanwhile and freed slots
    // for later ones (`sinks::websocket::LISTEN_BACKLOG`).
    let idle: Vec<TcpStream> = (0..600)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // Those beyond the cap (512 - 256) are answered 503 and closed at once.
    let mut refused = 0;
    for mut s in idle.iter().skip(300) {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut head = [0u8; 12];
        if s.read_exact(&mut head).is_ok() && &head == b"HTTP/1.1 503" {
            refused += 1;
        }
    }
    assert_eq!(refused, 300, "every connection past the cap is refused with 503");
    // The held ones are closed by the header timeout (the client sees EOF), the job keeps
    // writing meanwhile, and the endpoints answer again.
    let before = written();
    for mut s in idle.iter().take(200) {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(usize::MAX);
        assert!(
            n == 0 || std::str::from_utf8(&buf[..n]).is_ok_and(|t| t.starts_with("HTTP/1.1 408")),
            "closed: {n}"
        );
    }
    common::wait_until("/healthz answers", Duration::from_secs(10), || {
        http_get(port, "/healthz").starts_with("HTTP/1.1 200")
    });
    assert!(
        metric(port, "llamaflow_http_refused_total{reason=\"connections\"}") >= 300.0,
        "{}",
        http_get(port, "/metrics")
    );
    common::wait_until("more events written", Duration::from_secs(20), || written() > before);
    drop(idle);
    let pid = job.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = common::wait_exit(&mut job.0, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("Too many open files"), "{text}");
}
