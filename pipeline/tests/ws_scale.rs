//! Bounded loopback load test: 10,000 concurrent WebSocket clients on the real `llamaflow run`
//! (its own process, so each side needs ~10k file descriptors), all receiving live events.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const CLIENTS: usize = 10_000;
const FRAMES_EACH: usize = 3;

struct Job(Child);

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_clients_receive_live_events() {
    let limit = testkit::raise_nofile();
    assert!(
        limit >= (CLIENTS + 1000) as u64,
        "needs {} open files per process, the hard limit is {limit}: raise it (ulimit -Hn)",
        CLIENTS + 1000
    );
    let port = testkit::free_port();
    // The embedded demo, with every client anonymous from 127.0.0.1: no per-address cap.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{port}\"\ncheckpoint_dir = \"\"\n\n             [sources.demo]\nspeed = 30.0\nwarmup_minutes = 0\nrules = true\n\n             [sinks.websocket]\nallow_anonymous = true\nmax_anonymous_per_ip = 0\n"
        ),
    )
    .unwrap();
    let _job = Job(Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("llamaflow starts"));
    assert!(
        testkit::wait_for_port(port, Duration::from_secs(30)),
        "llamaflow listens"
    );

    let url = format!("ws://127.0.0.1:{port}/ws");
    let connected = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let (url, connected, done, gate, mut go) = (
            url.clone(),
            connected.clone(),
            done.clone(),
            gate.clone(),
            go_rx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = {
                let _permit = gate.acquire().await.expect("semaphore open");
                let (mut ws, resp) = tokio_tungstenite::connect_async(&url).await.expect("connects");
                ws.send(Message::text(
                    json!({"type": "subscribe", "channels": ["gas"]}).to_string(),
                ))
                .await
                .expect("subscribes");
                (ws, resp)
            };
            connected.fetch_add(1, Ordering::Relaxed);
            // Count frames only once every client is connected.
            let _ = go.wait_for(|g| *g).await;
            let mut seen = 0;
            while seen < FRAMES_EACH {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).expect("JSON frame");
                        if v["type"] == "gas_update" {
                            assert_eq!(v["channel"], "gas");
                            seen += 1;
                        }
                    }
                    Some(Ok(_)) => {}
                    other => panic!("connection ended early: {other:?}"),
                }
            }
            done.fetch_add(1, Ordering::Relaxed);
            let _ = ws.close(None).await;
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while connected.load(Ordering::Relaxed) < CLIENTS {
        assert!(
            Instant::now() < deadline,
            "only {} of {CLIENTS} connected",
            connected.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let _ = go_tx.send(true);
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::Relaxed) < CLIENTS {
        assert!(
            Instant::now() < deadline,
            "only {} of {CLIENTS} clients got {FRAMES_EACH} gas updates",
            done.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in tasks {
        t.await.expect("client task");
    }
    eprintln!("{CLIENTS} clients connected in {connect_secs:.1} s; all got {FRAMES_EACH} live frames");
}
