//! Scale-out: two `llamaflow run` processes on loopback, one timely cluster, consuming the same
//! Kafka topics (librdkafka's mock cluster, real wire protocol) produce exactly the alerts and
//! market events of one process — same `alert_id`s, nothing twice — both read partitions,
//! each commits its own partitions only once the cluster has written them, and both stop
//! cleanly on SIGTERM.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

const T0: i64 = 1_717_430_400;
const PARTITIONS: i32 = 4;
const COINS: usize = 8;
const TICKS: usize = 150;

struct Job(Child);

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(config: &Path, extra: &[&str], log: &Path) -> Job {
    let child = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["run", "--config", config.to_str().unwrap()])
        .args(extra)
        .env("LLAMAFLOW_LOG", "warn")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("llamaflow starts");
    Job(child)
}

fn terminate(job: &Job) {
    let pid = job.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
}

fn wait_exit(mut job: Job, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(s) = job.0.try_wait().unwrap() {
            assert!(
                s.success(),
                "llamaflow exit status {s:?}; stderr:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "llamaflow did not stop within 40 s of SIGTERM; stderr:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn high_watermarks(brokers: &str) -> BTreeMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    (0..PARTITIONS)
        .map(|p| (p, c.fetch_watermarks("prices", p, Duration::from_secs(5)).unwrap().1))
        .collect()
}

fn committed(brokers: &str, group: &str) -> BTreeMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition("prices", p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
    got.elements()
        .iter()
        .filter_map(|e| e.offset().to_raw().filter(|o| *o >= 0).map(|o| (e.partition(), o)))
        .collect()
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn coin(i: usize) -> String {
    format!("coingecko:coin-{i}")
}

/// Two rules per coin (a throttled 5-minute change, an unthrottled crossing), plus a depeg
/// rule on one coin: every rule watches one key, so its alerts do not depend on how records
/// of different partitions interleave.
fn write_rules(path: &Path) {
    let mut out = String::new();
    for i in 0..COINS {
        let c = coin(i);
        for r in [
            json!({"id": format!("chg-{i}"), "user_id": format!("u{}", i % 3), "alert_type": "price_change",
                   "conditions": {"coin": c, "window": "5m", "threshold_pct": 1.5, "direction": "any"},
                   "throttle_minutes": 5}),
            json!({"id": format!("thr-{i}"), "user_id": "u9", "alert_type": "price_threshold",
                   "conditions": {"coin": c, "operator": ">", "value": 100.0}, "throttle_minutes": 0}),
        ] {
            out.push_str(&r.to_string());
            out.push('\n');
        }
    }
    out.push_str(
        &json!({"id": "peg", "user_id": "u1", "alert_type": "depeg",
                "conditions": {"coin": coin(0), "peg": 100.0, "deviation_pct": 2.0}, "throttle_minutes": 0})
        .to_string(),
    );
    out.push('\n');
    std::fs::write(path, out).unwrap();
}

/// A deterministic random walk around 100 per coin, one tick a minute: (key, value) in
/// production order.
fn workload() -> Vec<(String, String)> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut prices = [100.0f64; COINS];
    let mut out = Vec::new();
    for t in 0..TICKS {
        for (i, p) in prices.iter_mut().enumerate() {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let step = ((state >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 2.4;
            *p = (*p * (1.0 + step / 100.0)).max(1.0);
            let c = coin(i);
            let v = json!({"coin": c, "price": *p, "timestamp": T0 + 60 * t as i64}).to_string();
            out.push((c, v));
        }
    }
    out
}

/// Produces `records` to `prices`, keyed by coin.
async fn produce(brokers: &str, records: &[(String, String)]) {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    for (k, v) in records {
        producer
            .send(FutureRecord::to("prices").key(k).payload(v), Duration::from_secs(10))
            .await
            .expect("produced");
    }
}

/// Produces the whole workload; returns how many records.
async fn produce_workload(brokers: &str) -> usize {
    let records = workload();
    produce(brokers, &records).await;
    records.len()
}

struct Run {
    alerts: PathBuf,
    events: PathBuf,
    log: PathBuf,
    port: u16,
}

/// A process's configuration; `extra` goes into its `[pipeline]` section.
fn config(
    dir: &Path,
    name: &str,
    brokers: &str,
    group: &str,
    workers: u32,
    rules: &Path,
    extra: &str,
) -> (PathBuf, Run) {
    let port = testkit::free_port();
    let run = Run {
        alerts: dir.join(format!("{name}-alerts.jsonl")),
        events: dir.join(format!("{name}-events.jsonl")),
        log: dir.join(format!("{name}.log")),
        port,
    };
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[pipeline]
workers = {workers}
listen = "127.0.0.1:{port}"
{checkpoint_dir}
checkpoint_interval_ms = 200
dead_letter_out = "{dead}"
{extra}

[[sources.files]]
kind = "rules"
path = "{rules}"

[sources.kafka]
brokers = "{brokers}"
group_id = "{group}"

[sinks]
stdout = false

[sinks.jsonl]
alerts = "{alerts}"
events = "{events}"
"#,
            checkpoint_dir = if extra.contains("checkpoint_dir") {
                ""
            } else {
                "checkpoint_dir = \"\""
            },
            dead = dir.join(format!("{name}-dead.jsonl")).display(),
            rules = rules.display(),
            alerts = run.alerts.display(),
            events = run.events.display(),
        ),
    )
    .unwrap();
    (path, run)
}

/// A Kafka mock cluster with the topics (`prices` on `PARTITIONS` partitions) and its brokers.
fn mock_cluster() -> (MockCluster<'static, rdkafka::producer::DefaultProducerContext>, String) {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("prices", PARTITIONS, 1).unwrap();
    for t in ["tvl", "transfers", "gas", "liquidations"] {
        cluster.create_topic(t, 1, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    (cluster, brokers)
}

/// A temporary directory with the rules file, a mock cluster with the topics (nothing
/// produced yet) and the workload to produce: (the directory, the cluster, its brokers, the
/// rules file, the records).
fn empty_topics() -> (
    tempfile::TempDir,
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
    PathBuf,
    Vec<(String, String)>,
) {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, brokers) = mock_cluster();
    let rules = dir.path().join("rules.jsonl");
    write_rules(&rules);
    (dir, cluster, brokers, rules, workload())
}

/// A mock cluster with the topics, the rules file in `dir` and the workload produced: (the
/// cluster, its brokers, the rules file, records produced, high watermarks of `prices`).
async fn setup(
    dir: &Path,
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
    PathBuf,
    usize,
    BTreeMap<i32, i64>,
) {
    let (cluster, brokers) = mock_cluster();
    let rules = dir.join("rules.jsonl");
    write_rules(&rules);
    let total = produce_workload(&brokers).await;
    let hw = high_watermarks(&brokers);
    assert_eq!(hw.values().sum::<i64>() as usize, total);
    (cluster, brokers, rules, total, hw)
}

/// Starts `n` processes of `workers` workers each as one cluster on loopback, consuming with
/// group `group`; `{process}` in `extra` becomes each process's id.
fn start_cluster(
    dir: &Path,
    n: usize,
    brokers: &str,
    group: &str,
    workers: u32,
    rules: &Path,
    extra: &str,
) -> (Vec<Job>, Vec<Run>) {
    let hosts = dir.join(format!("{group}-hosts.txt"));
    let list: String = (0..n)
        .map(|_| format!("127.0.0.1:{}\n", testkit::free_port()))
        .collect();
    std::fs::write(&hosts, format!("# process 0 first\n{list}")).unwrap();
    let hosts = hosts.to_str().unwrap().to_string();
    let (mut jobs, mut runs) = (Vec::new(), Vec::new());
    for p in 0..n {
        let extra = extra.replace("{process}", &p.to_string());
        let (cfg, run) = config(dir, &format!("{group}-p{p}"), brokers, group, workers, rules, &extra);
        let (id, count) = (p.to_string(), n.to_string());
        jobs.push(start(
            &cfg,
            &["--processes", &count, "--process-id", &id, "--hosts", &hosts],
            &run.log,
        ));
        runs.push(run);
    }
    (jobs, runs)
}

/// The alert ids of `alerts`, sorted.
fn alert_ids(alerts: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = alerts
        .iter()
        .map(|a| a["alert_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// SIGTERMs every process of a cluster, then waits for each to exit 0.
fn stop_all(jobs: Vec<Job>, runs: &[Run]) {
    for j in &jobs {
        terminate(j);
    }
    for (j, r) in jobs.into_iter().zip(runs) {
        wait_exit(j, &r.log);
    }
}

/// `got` (alerts gathered over runs) holds each alert once and exactly the alerts of one
/// uninterrupted process (`expected`): the same ids, field for field.
fn assert_alerts_of_one_process(got: &[Value], expected: &[Value], label: &str) {
    let mut unique = alert_ids(got);
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "{label}: no alert written twice");
    assert_eq!(
        alert_ids(got),
        alert_ids(expected),
        "{label}: the same alert ids as one uninterrupted process"
    );
    assert_eq!(
        sorted_strings(got.iter().cloned()),
        sorted_strings(expected.iter().cloned()),
        "{label}: field for field"
    );
}

fn sorted_strings(values: impl IntoIterator<Item = Value>) -> Vec<String> {
    let mut v: Vec<String> = values.into_iter().map(|v| v.to_string()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_produce_exactly_the_alerts_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_cluster, brokers, rules, total, hw) = setup(dir.path()).await;
    assert!(
        hw.values().filter(|n| **n > 0).count() >= 2,
        "the coins spread over several partitions: {hw:?}"
    );

    // One process, two workers.
    let (cfg, one) = config(dir.path(), "one", &brokers, "single", 2, &rules, "");
    let job = start(&cfg, &[], &one.log);
    wait_until(
        "the single process to commit every partition",
        Duration::from_secs(90),
        || committed(&brokers, "single") == hw,
    );
    assert_eq!(common::records_in(one.port, "price") as usize, total);
    terminate(&job);
    wait_exit(job, &one.log);
    let expected = common::json_lines(&one.alerts);
    let expected_events = common::json_lines(&one.events);
    assert!(expected.len() >= 50, "a meaningful workload: {} alerts", expected.len());
    assert_eq!(expected_events.len(), total, "a price_update per tick");

    // Two processes of two workers each, a fresh consumer group, the same topics.
    let (jobs, runs) = start_cluster(dir.path(), 2, &brokers, "cluster", 2, &rules, "");
    wait_until("the cluster to commit every partition", Duration::from_secs(90), || {
        committed(&brokers, "cluster") == hw
    });
    let ins: Vec<u64> = runs.iter().map(|r| common::records_in(r.port, "price")).collect();
    assert_eq!(
        ins.iter().sum::<u64>() as usize,
        total,
        "every record read once: {ins:?}"
    );
    assert!(
        ins.iter().all(|n| *n > 0),
        "both processes consumed partitions: {ins:?}"
    );
    stop_all(jobs, &runs);

    let got: Vec<Value> = runs.iter().flat_map(|r| common::json_lines(&r.alerts)).collect();
    assert_alerts_of_one_process(&got, &expected, "two processes");
    let events: Vec<Value> = runs.iter().flat_map(|r| common::json_lines(&r.events)).collect();
    assert_eq!(
        sorted_strings(events),
        sorted_strings(expected_events),
        "the same market events"
    );
    for r in &runs {
        let log = std::fs::read_to_string(&r.log).unwrap();
        assert!(!log.contains("ERROR"), "{log}");
    }
}

/// Issue 16 #3: when one process of a cluster dies (SIGKILL, the process chosen at random,
/// the seed printed), the other notices within a bounded time, commits nothing more, and
/// exits non-zero with a message naming the lost peer, so that a supervisor restarts the
/// cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_stops_the_cluster_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_cluster, brokers, rules, _, hw) = setup(dir.path()).await;
    let (jobs, runs) = start_cluster(dir.path(), 2, &brokers, "cluster", 1, &rules, "");
    wait_until("the cluster to commit every partition", Duration::from_secs(90), || {
        committed(&brokers, "cluster") == hw
    });
    let victim = (common::crash_seed("dead peer") % 2) as usize;
    eprintln!("killing process {victim}");
    let survivor = 1 - victim;
    let mut jobs: Vec<Option<Job>> = jobs.into_iter().map(Some).collect();
    let mut dead = jobs[victim].take().unwrap();
    dead.0.kill().unwrap();
    dead.0.wait().unwrap();
    let committed_before = committed(&brokers, "cluster");
    // More input arrives: the survivor must not commit it (no cluster-wide durable epoch).
    produce_workload(&brokers).await;
    let mut job = jobs[survivor].take().unwrap();
    let log = &runs[survivor].log;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = job.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "process {survivor} still runs 30 s after its peer died; stderr:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = std::fs::read_to_string(log).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "exit status {status:?}; stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("lost the connection to process {victim}")),
        "the message names the lost peer; stderr:\n{stderr}"
    );
    assert_eq!(
        committed(&brokers, "cluster"),
        committed_before,
        "nothing committed after the peer died"
    );
}

/// Issue 16 #3: a peer that is frozen (SIGSTOP: its sockets stay open, as when the network
/// drops its packets) leaves every epoch incomplete; the other process gives up after
/// `peer_timeout_ms` with status 1 and a message saying so, committing nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_peer_stops_the_cluster_after_the_peer_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (_cluster, brokers, rules, _, hw) = setup(dir.path()).await;
    let (mut jobs, runs) = start_cluster(dir.path(), 2, &brokers, "frozen", 1, &rules, "peer_timeout_ms = 3000");
    wait_until("the cluster to commit every partition", Duration::from_secs(90), || {
        committed(&brokers, "frozen") == hw
    });
    let victim = (common::crash_seed("frozen peer") % 2) as usize;
    eprintln!("freezing process {victim}");
    let survivor = 1 - victim;
    let pid = jobs[victim].0.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let frozen_at = Instant::now();
    let committed_before = committed(&brokers, "frozen");
    produce_workload(&brokers).await;
    let job = &mut jobs[survivor];
    let log = &runs[survivor].log;
    let status = loop {
        if let Some(s) = job.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            frozen_at.elapsed() < Duration::from_secs(30),
            "process {survivor} still runs 30 s after its peer froze; stderr:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let waited = frozen_at.elapsed();
    let stderr = std::fs::read_to_string(log).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "exit status {status:?}; stderr:\n{stderr}");
    assert!(
        waited >= Duration::from_secs(3),
        "gave up after {waited:?}, before the timeout"
    );
    assert!(
        stderr.contains("a peer process is frozen or cut off"),
        "the message says why; stderr:\n{stderr}"
    );
    assert_eq!(
        committed(&brokers, "frozen"),
        committed_before,
        "nothing committed after the freeze"
    );
}

/// The alerts one process of `workers` workers, never interrupted, makes of the topics (up
/// to `hw`), with a consumer group of its own.
fn uninterrupted(d: &Path, brokers: &str, rules: &Path, hw: &BTreeMap<i32, i64>, workers: u32) -> Vec<Value> {
    let (cfg, one) = config(d, "one", brokers, "single", workers, rules, "");
    let job = start(&cfg, &[], &one.log);
    wait_until(
        "the single process to commit every partition",
        Duration::from_secs(90),
        || committed(brokers, "single") == *hw,
    );
    terminate(&job);
    wait_exit(job, &one.log);
    common::json_lines(&one.alerts)
}

/// Produces `records` in the background, 8 every 15 ms.
fn produce_slowly(brokers: &str, records: &[(String, String)]) -> tokio::task::JoinHandle<()> {
    let (b, part) = (brokers.to_string(), records.to_vec());
    tokio::spawn(async move {
        for r in part.chunks(8) {
            produce(&b, r).await;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    })
}

/// After a random pause (< 300 ms), SIGKILLs a random process of a 2-process cluster and
/// waits for the other to exit on its own with status 1 (its peer is gone); returns the
/// victim. `what` says when, for the printed line.
fn kill_a_random_process(rng: &mut common::Lcg, jobs: Vec<Job>, runs: &[Run], what: &str) -> usize {
    std::thread::sleep(Duration::from_millis(rng.below(300)));
    let victim = rng.below(2) as usize;
    eprintln!("{what}: SIGKILL process {victim}");
    let mut jobs: Vec<Option<Job>> = jobs.into_iter().map(Some).collect();
    let mut dead = jobs[victim].take().unwrap();
    common::sigkill(&mut dead.0, &runs[victim].log);
    let mut other = jobs[1 - victim].take().unwrap();
    let status = common::wait_exit(&mut other.0, Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(1),
        "{}",
        std::fs::read_to_string(&runs[1 - victim].log).unwrap_or_default()
    );
    victim
}

/// The ids of the manifests in a cluster's checkpoint directory.
fn manifests(dir: &Path) -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().into_owned();
                name.strip_prefix("manifest-")?.strip_suffix(".json")?.parse().ok()
            })
            .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Issue 16 #1: a 2-process cluster checkpoints into a shared directory (each process its
/// part, process 0 the manifest once both are in). SIGKILLed five times — a random process at
/// a random moment after a new checkpoint counted, the seed printed — while the input arrives,
/// and restarted each time, it produces exactly the alerts of one uninterrupted process: the
/// same ids, none missing, none written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_killed_five_times_resumes_from_its_checkpoints_and_loses_and_repeats_nothing() {
    let seed = common::crash_seed("cluster checkpoints");
    let mut rng = common::Lcg(seed);
    let (dir, _cluster, brokers, rules, records) = empty_topics();
    let d = dir.path();
    const KILLS: usize = 5;
    let chunk = records.len() / (KILLS + 1);
    let ckpt = d.join("ckpt");
    // Alerts also go to Postgres and a FIFO SQS queue, as in production.
    let pg = common::migrated_postgres();
    let moto = testkit::Moto::start();
    let queue_url = common::boto3(
        &moto,
        "print(sqs.create_queue(QueueName='alerts.fifo', Attributes={'FifoQueue': 'true'})['QueueUrl'])",
    );
    // (The sink tables follow `[pipeline]`'s settings in each process's file.)
    let extra = format!(
        "checkpoint_dir = \"{}\"\n[sinks.postgres]\nurl = \"{}\"\n[sinks.sqs]\nqueue_url = \"{queue_url}\"\n\
         endpoint_url = \"{}\"\naccess_key_id = \"testing\"\nsecret_access_key = \"testing\"\n",
        ckpt.display(),
        pg.url(),
        moto.endpoint()
    );

    for round in 0..KILLS {
        let before = manifests(&ckpt).last().copied().unwrap_or(0);
        let (jobs, runs) = start_cluster(d, 2, &brokers, "ck", 1, &rules, &extra);
        // This round's input arrives while the cluster runs, a record every few ms.
        let producing = produce_slowly(&brokers, &records[round * chunk..(round + 1) * chunk]);
        wait_until("a new cluster checkpoint", Duration::from_secs(60), || {
            manifests(&ckpt).last().copied().unwrap_or(0) > before
        });
        kill_a_random_process(
            &mut rng,
            jobs,
            &runs,
            &format!("round {round}, checkpoint {:?}", manifests(&ckpt).last()),
        );
        producing.await.unwrap();
    }
    produce(&brokers, &records[KILLS * chunk..]).await;
    let hw = high_watermarks(&brokers);
    let (jobs, runs) = start_cluster(d, 2, &brokers, "ck", 1, &rules, &extra);
    let deadline = Instant::now() + Duration::from_secs(90);
    while committed(&brokers, "ck") != hw {
        assert!(
            Instant::now() < deadline,
            "the restarted cluster did not commit every partition: {:?} of {hw:?}; logs:\n{}",
            committed(&brokers, "ck"),
            runs.iter()
                .map(|r| format!(
                    "{}\n{}",
                    std::fs::read_to_string(&r.log).unwrap_or_default(),
                    common::http_get(r.port, "/metrics")
                        .1
                        .lines()
                        .filter(|l| l.contains("checkpoint")
                            || l.contains("epoch")
                            || l.contains("sink_behind")
                            || l.contains("records_in"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ))
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop_all(jobs, &runs);
    for r in &runs {
        let log = std::fs::read_to_string(&r.log).unwrap();
        assert!(log.contains("resuming from checkpoint"), "{log}");
    }
    let got: Vec<Value> = runs.iter().flat_map(|r| common::json_lines(&r.alerts)).collect();

    // The same input through one process that is never interrupted.
    let expected = uninterrupted(d, &brokers, &rules, &hw, 2);
    assert!(expected.len() >= 50, "a meaningful workload: {} alerts", expected.len());

    assert_alerts_of_one_process(&got, &expected, "five kills");
    let expected_ids = alert_ids(&expected);
    let in_pg: Vec<String> = common::psql(&pg, "SELECT alert_id FROM alert_history ORDER BY alert_id")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        in_pg, expected_ids,
        "alert_history holds each alert of the uninterrupted run"
    );
    let mut in_sqs = common::sqs_alert_ids(&moto, &queue_url);
    in_sqs.sort();
    assert_eq!(in_sqs, expected_ids, "the FIFO queue holds each alert once");
}

/// Issue 16 #1: processes with checkpoint directories of their own (local disks), then also a
/// shared S3 location (moto). SIGKILLed three times (a random process, seed printed):
/// - restarted without a shared location, the processes agree on the newest checkpoint
///   process 0's manifest names (process 1's own directory holds parts but no manifest);
/// - the killed process's directory is then deleted (its host replaced): restarted, it
///   restores its part from S3;
/// - finally the cluster's last checkpoint restores from S3 alone into one process of two
///   workers with an empty directory.
///
/// Together the runs give exactly the alerts of one uninterrupted process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_checkpoint_directories_and_a_shared_s3_location_survive_replaced_hosts_and_rescaling() {
    let seed = common::crash_seed("local checkpoint directories");
    let mut rng = common::Lcg(seed);
    let (dir, _cluster, brokers, rules, records) = empty_topics();
    let d = dir.path();
    let chunk = records.len() / 4;
    let moto = testkit::Moto::start();
    common::boto3(
        &moto,
        "s3 = boto3.client('s3', endpoint_url=sqs.meta.endpoint_url, region_name='us-east-1', \
         aws_access_key_id='testing', aws_secret_access_key='testing')\ns3.create_bucket(Bucket='ckpt')",
    );
    let s3 = format!(
        "checkpoint_shared = \"s3://ckpt/job\"\n[pipeline.checkpoint_s3]\nendpoint_url = \"{}\"\n",
        moto.endpoint()
    );
    let local = |p: usize| d.join(format!("local-{p}"));
    let own_dirs = format!("checkpoint_dir = \"{}/local-{{process}}\"\n", d.display());
    let mut replaced: Option<usize> = None;
    for round in 0..3 {
        let extra = match round {
            0 => own_dirs.clone(),
            _ => format!("{own_dirs}{s3}"),
        };
        let before = manifests(&local(0)).last().copied().unwrap_or(0);
        let (jobs, runs) = start_cluster(d, 2, &brokers, "own", 1, &rules, &extra);
        let producing = produce_slowly(&brokers, &records[round * chunk..(round + 1) * chunk]);
        wait_until("a new cluster checkpoint", Duration::from_secs(60), || {
            manifests(&local(0)).last().copied().unwrap_or(0) > before
        });
        for r in &runs[..round.min(1)] {
            let log = std::fs::read_to_string(&r.log).unwrap();
            assert!(log.contains("resuming from checkpoint"), "round {round}: {log}");
        }
        if let Some(p) = replaced {
            let log = std::fs::read_to_string(&runs[p].log).unwrap();
            assert!(
                log.contains("is not in") && log.contains("reading it from s3://ckpt/job"),
                "round {round}: process {p} with an empty directory restores from S3: {log}"
            );
        }
        let what = format!("round {round}, checkpoint {:?}", manifests(&local(0)).last());
        let victim = kill_a_random_process(&mut rng, jobs, &runs, &what);
        producing.await.unwrap();
        if round >= 1 {
            // The victim's host is replaced: its directory is gone.
            std::fs::remove_dir_all(local(victim)).unwrap();
            replaced = Some(victim);
        }
    }
    // The rest through one process of two workers, from S3 alone.
    produce(&brokers, &records[3 * chunk..]).await;
    let hw = high_watermarks(&brokers);
    let extra = format!("checkpoint_dir = \"{}\"\n{s3}", d.join("single").display());
    let (cfg, one) = config(d, "single", &brokers, "single-from-s3", 2, &rules, &extra);
    let job = start(&cfg, &[], &one.log);
    wait_until("one process to commit every partition", Duration::from_secs(90), || {
        committed(&brokers, "single-from-s3") == hw
    });
    terminate(&job);
    wait_exit(job, &one.log);
    let log = std::fs::read_to_string(&one.log).unwrap();
    assert!(
        log.contains("resuming from checkpoint") && log.contains("reading it from s3://ckpt/job"),
        "{log}"
    );
    let mut got: Vec<Value> = (0..2)
        .flat_map(|p| common::json_lines(&d.join(format!("own-p{p}-alerts.jsonl"))))
        .collect();
    got.extend(common::json_lines(&one.alerts));

    let expected = uninterrupted(d, &brokers, &rules, &hw, 2);
    assert!(expected.len() >= 50, "a meaningful workload: {} alerts", expected.len());
    assert_alerts_of_one_process(&got, &expected, "replaced hosts, then one process");
}

/// Issue 16 #2: one checkpoint, taken by a single process of one worker, restores as 1×1,
/// 2×1, 1×2 and 2×2 (workers × processes; the state re-split for the new shape, every
/// process resuming its Kafka partitions from the checkpoint), and each continuation gives
/// exactly the alerts of one uninterrupted process: the same ids, nothing missing or twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_checkpoint_restores_into_any_shape_with_the_alerts_of_one_process() {
    let (dir, _cluster, brokers, rules, records) = empty_topics();
    let d = dir.path();
    let half = records.len() / 2;

    // The first half through 1 process × 1 worker; SIGTERM writes its last checkpoint.
    produce(&brokers, &records[..half]).await;
    let hw_half = high_watermarks(&brokers);
    let taken = d.join("ckpt-taken");
    let (cfg, first) = config(
        d,
        "first",
        &brokers,
        "first",
        1,
        &rules,
        &format!("checkpoint_dir = \"{}\"", taken.display()),
    );
    let job = start(&cfg, &[], &first.log);
    wait_until("the first half committed", Duration::from_secs(90), || {
        committed(&brokers, "first") == hw_half
    });
    terminate(&job);
    wait_exit(job, &first.log);
    let before = common::json_lines(&first.alerts);
    produce(&brokers, &records[half..]).await;
    let hw = high_watermarks(&brokers);

    // What one uninterrupted process makes of all of it.
    let expected = uninterrupted(d, &brokers, &rules, &hw, 1);
    assert!(
        expected.len() > before.len() + 20,
        "alerts on both sides of the checkpoint"
    );

    for (workers, processes) in [(1u32, 1usize), (2, 1), (1, 2), (2, 2)] {
        let shape = format!("{workers}x{processes}");
        let ckpt = d.join(format!("ckpt-{shape}"));
        std::fs::create_dir_all(&ckpt).unwrap();
        for f in std::fs::read_dir(&taken).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), ckpt.join(f.file_name())).unwrap();
        }
        let extra = format!("checkpoint_dir = \"{}\"", ckpt.display());
        let group = format!("g{shape}");
        let (jobs, runs) = if processes == 1 {
            let (cfg, run) = config(d, &group, &brokers, &group, workers, &rules, &extra);
            (vec![start(&cfg, &[], &run.log)], vec![run])
        } else {
            start_cluster(d, processes, &brokers, &group, workers, &rules, &extra)
        };
        wait_until(
            &format!("{shape} to commit every partition"),
            Duration::from_secs(90),
            || committed(&brokers, &group) == hw,
        );
        stop_all(jobs, &runs);
        for r in &runs {
            let log = std::fs::read_to_string(&r.log).unwrap();
            assert!(log.contains("resuming from checkpoint"), "{shape}: {log}");
        }
        let mut got = before.clone();
        got.extend(runs.iter().flat_map(|r| common::json_lines(&r.alerts)));
        assert_alerts_of_one_process(&got, &expected, &shape);
    }
}

/// Issue 16: a 2-process cluster with checkpoints and CDC (read by process 0), restarted
/// after a rule was created while it was down: the rule arrives through the slot (no
/// re-snapshot), the crossing it watches spans the restart (ETH was 3200 before, 3300
/// after), so it fires once, and nothing else is alerted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_cluster_takes_a_rule_created_while_it_was_down_from_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pg = common::migrated_postgres();
    let rule = |id: &str, value: f64| {
        common::psql(
            &pg,
            &format!(
                "INSERT INTO alert_rules (id, user_id, alert_type, conditions, throttle_minutes) VALUES ('{id}', 'u1', \
                 'price_threshold', '{{\"coin\":\"coingecko:ethereum\",\"operator\":\">\",\"value\":{value}}}', 0)"
            ),
        );
    };
    rule("eth", 3000.0);
    let (_cluster, brokers) = mock_cluster();
    let eth = |px: f64, minute: i64| {
        (
            "coingecko:ethereum".to_string(),
            json!({"coin": "coingecko:ethereum", "price": px, "timestamp": T0 + 60 * minute}).to_string(),
        )
    };
    produce(&brokers, &[eth(2900.0, 0), eth(3100.0, 1), eth(3200.0, 2)]).await;
    let rules = d.join("no-rules.jsonl");
    std::fs::write(&rules, "").unwrap();
    let extra = format!(
        "checkpoint_dir = \"{}\"\n[sources.postgres_cdc]\nurl = \"{pg}\"\nslot = \"cluster\"\npoll_interval_ms = 50\n\
         [sinks.postgres]\nurl = \"{pg}\"\n",
        d.join("ckpt").display(),
        pg = pg.url()
    );
    let alerts = || -> Vec<String> {
        common::psql(&pg, "SELECT rule_id FROM alert_history ORDER BY triggered_at, rule_id")
            .lines()
            .map(str::to_string)
            .collect()
    };

    // Only ETH's partition has records (the others have no offset to commit).
    let written = || -> BTreeMap<i32, i64> { high_watermarks(&brokers).into_iter().filter(|(_, n)| *n > 0).collect() };
    let hw = written();
    let (jobs, runs) = start_cluster(d, 2, &brokers, "cdc", 1, &rules, &extra);
    wait_until("the cluster to commit every partition", Duration::from_secs(90), || {
        committed(&brokers, "cdc") == hw
    });
    wait_until("the crossing of 3000", Duration::from_secs(30), || alerts() == ["eth"]);
    stop_all(jobs, &runs);
    let first: Vec<Value> = runs.iter().flat_map(|r| common::json_lines(&r.alerts)).collect();
    assert_eq!(first.len(), 1);

    // Down: a rule is created. Up again: it comes through the slot, then ETH crosses 3250.
    rule("eth2", 3250.0);
    let (jobs, runs) = start_cluster(d, 2, &brokers, "cdc", 1, &rules, &extra);
    wait_until("the new rule through the slot", Duration::from_secs(30), || {
        common::records_in(runs[0].port, "rule") >= 1
    });
    produce(&brokers, &[eth(3300.0, 3)]).await;
    let hw = written();
    wait_until("the restarted cluster to commit", Duration::from_secs(90), || {
        committed(&brokers, "cdc") == hw
    });
    wait_until("the new rule's alert", Duration::from_secs(30), || alerts().len() == 2);
    stop_all(jobs, &runs);
    for r in &runs {
        let log = std::fs::read_to_string(&r.log).unwrap();
        assert!(log.contains("resuming from checkpoint"), "{log}");
    }
    assert_eq!(alerts(), ["eth", "eth2"], "only the new rule fired after the restart");
    let all: Vec<Value> = runs.iter().flat_map(|r| common::json_lines(&r.alerts)).collect();
    let rules_fired: Vec<&str> = all.iter().map(|a| a["rule_id"].as_str().unwrap()).collect();
    assert_eq!(rules_fired, ["eth", "eth2"], "each alert once in the alerts files");
}
