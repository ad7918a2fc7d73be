//! Helpers shared by the integration tests that run the real `llamaflow` binary against real
//! services (each test file uses a subset).
#![allow(dead_code)]

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// A running `llamaflow` process, killed when dropped (a failing test leaves nothing behind).
pub struct Job(pub Child);

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Job {
    /// Sends SIGTERM and waits (≤ 30 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        sigterm(&mut self.0)
    }
}

/// Sends SIGTERM to `child` and waits (≤ 30 s) for its exit status.
pub fn sigterm(child: &mut Child) -> ExitStatus {
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait_exit(child, Duration::from_secs(30))
}

/// Waits (≤ `within`) for `child` to exit, failing the test after that.
pub fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "llamaflow still running after {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `ok` until it holds, failing the test after `within`.
pub fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The JSON values of a JSON-lines file (none while it does not exist).
pub fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// Records of `kind` the job on `port` took in (`llamaflow_records_in_total{kind=…}` of its
/// `/metrics`); 0 while nothing answers.
pub fn records_in(port: u16, kind: &str) -> u64 {
    let (_, body) = http_get(port, "/metrics");
    let label = format!("kind=\"{kind}\"");
    body.lines()
        .filter(|l| l.starts_with("llamaflow_records_in_total") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

/// (status code, body) of a GET on loopback; `(0, "")` when nothing listens.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let r = testkit::http_get(port, path);
    (r.status, r.body)
}

/// A private PostgreSQL (wal2json allowed for CDC) with llamaflow's tables migrated.
pub fn migrated_postgres() -> testkit::Postgres {
    let pg = testkit::Postgres::start();
    pg.allow_wal2json();
    let out = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["migrate", "--database-url", &pg.url()])
        .output()
        .expect("llamaflow migrate runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    pg
}

/// Runs SQL through `psql` on the test's Postgres; returns the unaligned output.
pub fn psql(pg: &testkit::Postgres, sql: &str) -> String {
    let out = Command::new(testkit::pg_bin_dir().join("psql"))
        .args([&pg.url(), "-v", "ON_ERROR_STOP=1", "-tAc", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs a boto3 snippet (with `sqs` bound to a client of the moto server); returns its stdout.
pub fn boto3(moto: &testkit::Moto, code: &str) -> String {
    let python = std::env::var("LLAMAFLOW_MOTO_VENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or_else(|_| "python3".into());
    let script = format!(
        "import boto3, json\nsqs = boto3.client('sqs', endpoint_url='{}', region_name='us-east-1', \
         aws_access_key_id='testing', aws_secret_access_key='testing')\n{code}",
        moto.endpoint()
    );
    let out = Command::new(python)
        .args(["-c", &script])
        .output()
        .expect("python runs");
    assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every message in the queue as (alert_id, MessageGroupId, MessageDeduplicationId), each
/// received and deleted as a consumer would (a FIFO group hands out its next message only
/// once the previous one is deleted).
pub fn sqs_alerts(moto: &testkit::Moto, queue_url: &str) -> Vec<(String, String, String)> {
    let out = boto3(
        moto,
        &format!(
            "out = []\nempty = 0\nwhile empty < 3:\n    r = sqs.receive_message(QueueUrl='{queue_url}', \
             MaxNumberOfMessages=10, AttributeNames=['All'], VisibilityTimeout=60)\n    ms = r.get('Messages', [])\n    \
             empty = empty + 1 if not ms else 0\n    for m in ms:\n        out.append([json.loads(m['Body'])['alert_id'], \
             m['Attributes'].get('MessageGroupId', ''), m['Attributes'].get('MessageDeduplicationId', '')])\n        \
             sqs.delete_message(QueueUrl='{queue_url}', ReceiptHandle=m['ReceiptHandle'])\nprint(json.dumps(out))"
        ),
    );
    serde_json::from_str(&out).expect("receiver output")
}

/// The `alert_id` of every line of a JSONL alerts file, in file order.
pub fn alert_ids_in_file(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            v["alert_id"].as_str().expect("alert_id").to_string()
        })
        .collect()
}

/// Just the alert ids of [`sqs_alerts`].
pub fn sqs_alert_ids(moto: &testkit::Moto, queue_url: &str) -> Vec<String> {
    sqs_alerts(moto, queue_url).into_iter().map(|(id, _, _)| id).collect()
}

/// Every alert_id on the 1-partition `defi-alerts` topic, duplicates included; checks that each
/// message's key is its alert's user_id and that the whole topic was read.
pub fn alert_ids_in_topic(brokers: &str) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("defi-alerts", 0, Offset::Beginning).unwrap();
    c.assign(&tpl).unwrap();
    let (_, high) = c.fetch_watermarks("defi-alerts", 0, Duration::from_secs(5)).unwrap();
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (ids.len() as i64) < high && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            assert_eq!(
                m.key(),
                Some(v["user_id"].as_str().unwrap().as_bytes()),
                "defi-alerts key = user_id"
            );
            ids.push(v["alert_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(ids.len() as i64, high, "read all of defi-alerts");
    ids
}

/// A small deterministic generator for the crash tests (which print their seed).
pub struct Lcg(pub u64);

impl Lcg {
    /// The next value (31 bits).
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The seed of a crash test: `LLAMAFLOW_CRASH_SEED`, else the clock; printed so a failing run
/// can be repeated.
pub fn crash_seed(test: &str) -> u64 {
    let seed = std::env::var("LLAMAFLOW_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test} seed {seed} (LLAMAFLOW_CRASH_SEED={seed} repeats it)");
    seed
}

/// SIGKILLs a job that must still be running (its log, `log`, says why if it is not) and
/// reaps it.
pub fn sigkill(job: &mut Child, log: &std::path::Path) {
    assert!(
        job.try_wait().unwrap().is_none(),
        "llamaflow exited early; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    job.kill().unwrap();
    job.wait().unwrap();
}

/// Starts `llamaflow run --config <config>` with warnings only, its stderr appended to `log`.
pub fn start_run(config: &std::path::Path, log: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("LLAMAFLOW_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
        .spawn()
        .expect("llamaflow starts")
}

/// Runs `llamaflow replay --quiet` with `args` (inputs and outputs), failing the test unless
/// it succeeds.
pub fn replay<S: AsRef<std::ffi::OsStr>>(args: &[S]) {
    let out = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["replay", "--quiet"])
        .args(args)
        .output()
        .expect("llamaflow replay runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
