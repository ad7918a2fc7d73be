//! A sink outage in the running job: Redis stops mid-run; the job keeps retrying, reports
//! itself degraded (`/readyz` 503, `/healthz` names the failing sink), and recovers by itself
//! when Redis is back, writing what it held back.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;

use common::{Job, alert_ids_in_file, boto3, http_get, wait_until};

fn redis_get(port: u16, key: &str) -> Option<String> {
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/1"))
        .ok()?
        .get_connection()
        .ok()?;
    redis::cmd("GET")
        .arg(key)
        .query::<Option<String>>(&mut c)
        .ok()
        .flatten()
}

#[test]
fn redis_outage_degrades_then_recovers_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = testkit::Redis::start(None);
    let redis_port = redis.port;
    let port = testkit::free_port();
    let config = dir.path().join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{port}\"\ncheckpoint_interval_ms = 500\n\n[sources.demo]\nspeed = 60.0\nwarmup_minutes = 0\n\n\
             [sinks]\nstdout = false\n\n[sinks.redis]\nurl = \"redis://127.0.0.1:{redis_port}/1\"\n\
             max_attempts = 2\ninitial_backoff_ms = 50\nmax_backoff_ms = 100\n"
        ),
    )
    .unwrap();
    let _job = Job(Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    wait_until("ready", Duration::from_secs(30), || http_get(port, "/readyz").0 == 200);
    wait_until("gas values in Redis", Duration::from_secs(30), || {
        redis_get(redis_port, "gas:ethereum").is_some()
    });

    redis.stop();
    wait_until("degraded", Duration::from_secs(30), || {
        http_get(port, "/readyz").0 == 503
    });
    let (code, body) = http_get(port, "/healthz");
    assert_eq!(code, 200, "liveness stays up");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "degraded");
    assert_eq!(v["sinks"]["redis"]["status"], "failing");
    let metrics = http_get(port, "/metrics").1;
    assert!(metrics.contains("llamaflow_sink_up{sink=\"redis\"} 0"), "{metrics}");
    std::thread::sleep(Duration::from_secs(2)); // the feed keeps producing meanwhile

    let _redis = testkit::Redis::start_on(redis_port, None);
    wait_until("ready again", Duration::from_secs(30), || {
        http_get(port, "/readyz").0 == 200
    });
    // What was held back during the outage is written: the latest ETH price lands again.
    wait_until("values after recovery", Duration::from_secs(30), || {
        redis_get(redis_port, "price:coingecko:ethereum").is_some() && redis_get(redis_port, "gas:ethereum").is_some()
    });
    let metrics = http_get(port, "/metrics").1;
    assert!(metrics.contains("llamaflow_sink_up{sink=\"redis\"} 1"), "{metrics}");
    // End-to-end latency (ingest → every sink wrote) and checkpoint metrics are exported. The
    // first checkpoint may still be completing (it waits for the held-back writes): give it
    // a checkpoint interval or two.
    let names = [
        "llamaflow_e2e_latency_seconds_count",
        "llamaflow_checkpoints_total",
        "llamaflow_checkpoint_age_seconds",
        "llamaflow_checkpoint_duration_seconds_count",
    ];
    let mut metrics = String::new();
    let all_there = |m: &str| names.iter().all(|n| m.contains(n));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        metrics = http_get(port, "/metrics").1;
        if all_there(&metrics) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for name in names {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
}

#[test]
fn postgres_outage_holds_back_then_writes_every_alert_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut pg = testkit::Postgres::start();
    for (_, sql) in schemas::migrations::ALL {
        pg.psql(sql);
    }
    let port = testkit::free_port();
    let alerts = dir.path().join("alerts.jsonl");
    let config = dir.path().join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{port}\"\n\n[sources.demo]\nspeed = 120.0\nwarmup_minutes = 30\n\n\
             [sinks]\nstdout = false\n\n[sinks.jsonl]\nalerts = \"{alerts}\"\n\n[sinks.postgres]\nurl = \"{url}\"\n\
             acquire_timeout_ms = 500\n\n[sinks.postgres.retry]\nmax_attempts = 2\ninitial_backoff_ms = 50\nmax_backoff_ms = 100\n",
            alerts = alerts.display(),
            url = pg.url()
        ),
    )
    .unwrap();
    let mut job = Job(Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    let count = |pg: &testkit::Postgres| {
        pg.psql("SELECT count(*) FROM alert_history")
            .parse::<usize>()
            .unwrap_or(0)
    };
    wait_until("alerts in Postgres", Duration::from_secs(60), || count(&pg) > 0);
    pg.stop();
    wait_until("degraded", Duration::from_secs(30), || {
        http_get(port, "/readyz").0 == 503
    });
    std::thread::sleep(Duration::from_secs(3)); // the feed goes on: alerts fire meanwhile
    pg.restart();
    wait_until("ready again", Duration::from_secs(60), || {
        http_get(port, "/readyz").0 == 200
    });
    std::thread::sleep(Duration::from_secs(1));
    job.terminate();
    // The jsonl sink and Postgres were fed the same epochs: every alert is in both, once.
    let mut from_file: Vec<String> = alert_ids_in_file(&alerts);
    from_file.sort();
    let in_pg: Vec<String> = pg
        .psql("SELECT alert_id FROM alert_history ORDER BY alert_id")
        .lines()
        .map(str::to_string)
        .collect();
    assert!(from_file.len() > 3, "alerts fired: {}", from_file.len());
    assert_eq!(in_pg, from_file, "nothing lost or doubled across the outage");
}

#[test]
fn sqs_unreachable_for_30_s_then_every_alert_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let moto = testkit::Moto::start();
    let queue_url = boto3(
        &moto,
        "print(sqs.create_queue(QueueName='outage.fifo', Attributes={'FifoQueue': 'true'})['QueueUrl'])",
    );
    let moto_port: u16 = moto.endpoint().rsplit(':').next().unwrap().parse().unwrap();
    let proxy = testkit::TcpProxy::start(moto_port);
    let via_proxy = format!("http://127.0.0.1:{}", proxy.port());
    let port = testkit::free_port();
    let alerts = dir.path().join("alerts.jsonl");
    let config = dir.path().join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{port}\"\n\n[sources.demo]\nspeed = 120.0\nwarmup_minutes = 30\n\n\
             [sinks]\nstdout = false\n\n[sinks.jsonl]\nalerts = \"{alerts}\"\n\n[sinks.sqs]\n\
             queue_url = \"{queue}\"\nendpoint_url = \"{via_proxy}\"\naccess_key_id = \"testing\"\n\
             secret_access_key = \"testing\"\nmax_attempts = 2\ninitial_backoff_ms = 50\nmax_backoff_ms = 100\n\
             connect_timeout_ms = 300\nattempt_timeout_ms = 1000\n",
            alerts = alerts.display(),
            queue = queue_url.replace(&moto.endpoint(), &via_proxy),
        ),
    )
    .unwrap();
    let mut job = Job(Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    let written = || std::fs::read_to_string(&alerts).map(|s| s.lines().count()).unwrap_or(0);
    wait_until("alerts written", Duration::from_secs(60), || written() > 0);
    proxy.set_down(true);
    wait_until("degraded", Duration::from_secs(30), || {
        http_get(port, "/readyz").0 == 503
    });
    let (_, health) = http_get(port, "/healthz");
    assert!(health.contains("sqs"), "health names the failing sink: {health}");
    let before = written();
    std::thread::sleep(Duration::from_secs(30)); // SQS unreachable for 30 s; the feed goes on
    // Backpressure: the jsonl sink is fed the same epochs, so it cannot run ahead by more
    // than the bounded queues.
    let during = written();
    proxy.set_down(false);
    wait_until("ready again", Duration::from_secs(60), || {
        http_get(port, "/readyz").0 == 200
    });
    wait_until("alerts flowing again", Duration::from_secs(60), || written() > during);
    job.terminate();
    let from_file: Vec<String> = alert_ids_in_file(&alerts);
    let in_sqs: Vec<String> = serde_json::from_str(&boto3(
        &moto,
        &format!(
            "out = []\nempty = 0\nwhile empty < 3:\n    r = sqs.receive_message(QueueUrl='{queue_url}', \
             MaxNumberOfMessages=10, VisibilityTimeout=60)\n    ms = r.get('Messages', [])\n    \
             empty = empty + 1 if not ms else 0\n    out += [json.loads(m['Body'])['alert_id'] for m in ms]\n    \
             for m in ms:\n        sqs.delete_message(QueueUrl='{queue_url}', ReceiptHandle=m['ReceiptHandle'])\n\
             print(json.dumps(out))"
        ),
    ))
    .unwrap();
    let mut a = from_file.clone();
    let mut b = in_sqs.clone();
    a.sort();
    b.sort();
    assert!(
        a.len() > before,
        "alerts fired across the outage: {before} → {}",
        a.len()
    );
    assert_eq!(b, a, "every alert in SQS exactly once, none dead-lettered or doubled");
}
