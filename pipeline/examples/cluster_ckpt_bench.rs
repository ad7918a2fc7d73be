//! Cluster checkpoints (issue 16): what a checkpoint costs each process of 1 and 2 processes,
//! and what a restore into another shape costs.
//!
//! Fixed workload: `--rules` price_threshold rules (default 200,000) over `--coins` coins
//! (default 20,000) read as history by process 0, and one price tick per coin on a Kafka topic
//! (librdkafka's mock cluster in this process, 4 partitions). Shapes, with the same total of
//! 2 workers: 1 process × 2 workers and 2 processes × 1 worker, each with
//! `checkpoint_interval_ms = 1000`. Once every tick is committed and `--checkpoints` more
//! checkpoints completed, each process's `/metrics` give the checkpoint's bytes
//! (`llamaflow_checkpoint_bytes`) and duration (`llamaflow_checkpoint_duration_seconds`,
//! median: request → written, waiting for the sinks included).
//!
//! Restore: each shape's checkpoint directory is restored by a 2-process cluster: as taken
//! (2 × 1 → 2 × 1, each process reads its part) and re-split (1 × 2 → 2 × 1, each process
//! reads every part). Time = process start → every process answers `/readyz` 200 (the state
//! is loaded and the dataflow runs), the median of `--restores` runs each.
//!
//! With `--shared s3`, every process also copies its files to an S3 prefix (a moto server on
//! loopback, `checkpoint_shared`), so a checkpoint's duration includes the upload, and each
//! restore starts from an empty checkpoint directory (every host replaced): each process
//! reads what it needs from S3.
//!
//! `cargo run --release -p pipeline --example cluster_ckpt_bench -- [--rules N] [--coins N]
//! [--shared s3]` (build `llamaflow` first, or pass `--llamaflow PATH`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::json;

struct Args {
    rules: usize,
    coins: usize,
    checkpoints: u64,
    restores: usize,
    llamaflow: PathBuf,
    /// `--shared s3`: checkpoints are also copied to S3 (moto).
    s3: bool,
}

fn args() -> Args {
    let mut a = Args {
        rules: 200_000,
        coins: 20_000,
        checkpoints: 3,
        restores: 3,
        llamaflow: testkit::llamaflow_beside_example(),
        s3: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--rules" => a.rules = value.parse().expect("--rules N"),
            "--coins" => a.coins = value.parse().expect("--coins N"),
            "--checkpoints" => a.checkpoints = value.parse().expect("--checkpoints N"),
            "--restores" => a.restores = value.parse().expect("--restores N"),
            "--llamaflow" => a.llamaflow = PathBuf::from(value),
            "--shared" if value == "s3" => a.s3 = true,
            _ => panic!("unknown flag {flag}; see the doc comment of cluster_ckpt_bench.rs"),
        }
    }
    a
}

/// A metric's value (summed over label sets) from a process's `/metrics`.
fn metric(port: u16, name: &str) -> f64 {
    testkit::http_get(port, "/metrics")
        .body
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Proc {
    child: Child,
    port: u16,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where checkpoints are shared: (S3 endpoint, `s3://` location).
type SharedAt<'a> = Option<(&'a str, &'a str)>;

/// Starts `processes` processes of `workers` workers on `ckpt` (and `shared`), group `group`.
#[allow(clippy::too_many_arguments)]
fn start(
    a: &Args,
    dir: &Path,
    brokers: &str,
    group: &str,
    ckpt: &Path,
    shared: SharedAt,
    processes: usize,
    workers: usize,
) -> Vec<Proc> {
    let shared = match shared {
        Some((endpoint, location)) => {
            format!("checkpoint_shared = \"{location}\"\n[pipeline.checkpoint_s3]\nendpoint_url = \"{endpoint}\"\n")
        }
        None => String::new(),
    };
    let hosts = dir.join(format!("{group}-hosts.txt"));
    let list: String = (0..processes)
        .map(|_| format!("127.0.0.1:{}\n", testkit::free_port()))
        .collect();
    std::fs::write(&hosts, list).unwrap();
    (0..processes)
        .map(|p| {
            let port = testkit::free_port();
            let cfg = dir.join(format!("{group}-{p}.toml"));
            std::fs::write(
                &cfg,
                format!(
                    "[pipeline]\nworkers = {workers}\nlisten = \"127.0.0.1:{port}\"\ncheckpoint_dir = \"{}\"\n\
                     checkpoint_interval_ms = 1000\n{shared}\n[[sources.files]]\nkind = \"rules\"\npath = \"{}\"\n\n\
                     [sources.kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{group}\"\n\n[sinks]\nstdout = false\n",
                    ckpt.display(),
                    dir.join("rules.jsonl").display()
                ),
            )
            .unwrap();
            let mut cmd = Command::new(&a.llamaflow);
            cmd.args(["run", "--config", cfg.to_str().unwrap()]);
            if processes > 1 {
                cmd.args(["--processes", &processes.to_string(), "--process-id", &p.to_string()]);
                cmd.args(["--hosts", hosts.to_str().unwrap()]);
            }
            let child = cmd
                .env("LLAMAFLOW_LOG", "warn")
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("llamaflow starts");
            Proc { child, port }
        })
        .collect()
}

fn stop(procs: Vec<Proc>) {
    for p in &procs {
        let _ = Command::new("kill").args(["-TERM", &p.child.id().to_string()]).status();
    }
    for mut p in procs {
        let _ = p.child.wait();
    }
}

fn wait(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < until, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn main() {
    let a = args();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rules = String::new();
    for i in 0..a.rules {
        let coin = format!("coingecko:c{}", i % a.coins);
        rules.push_str(
            &json!({"id": format!("r{i}"), "user_id": format!("u{}", i % 1000), "alert_type": "price_threshold",
                    "conditions": {"coin": coin, "operator": ">", "value": 1000.0 + (i % 7) as f64}, "throttle_minutes": 5})
            .to_string(),
        );
        rules.push('\n');
    }
    std::fs::write(d.join("rules.jsonl"), rules).unwrap();
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("prices", 4, 1).unwrap();
    for t in ["tvl", "transfers", "gas", "liquidations"] {
        cluster.create_topic(t, 1, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    let producer: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    for c in 0..a.coins {
        let coin = format!("coingecko:c{c}");
        let v = json!({"coin": coin, "price": 1.0 + c as f64 / 1000.0, "timestamp": 1_717_430_400}).to_string();
        while producer.send(BaseRecord::to("prices").key(&coin).payload(&v)).is_err() {
            producer.poll(Duration::from_millis(10));
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    println!(
        "workload: {} rules over {} coins (history of process 0), {} ticks on 4 partitions",
        a.rules, a.coins, a.coins
    );

    let moto = a.s3.then(|| {
        let moto = testkit::Moto::start();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let cfg = sources::dynamodb_export::s3::S3Config {
            endpoint_url: Some(moto.endpoint()),
            ..Default::default()
        };
        rt.block_on(async {
            let sdk = cfg
                .loader()
                .credentials_provider(aws_sdk_s3::config::Credentials::new(
                    "testing", "testing", None, None, "bench",
                ))
                .load()
                .await;
            cfg.client(&sdk).create_bucket().bucket("bench").send().await.unwrap();
        });
        println!("checkpoints also copied to S3 (moto on loopback); restores start from empty directories");
        moto
    });
    let endpoint = moto.as_ref().map(|m| m.endpoint()).unwrap_or_default();
    let location = |shape: &str| format!("s3://bench/{shape}");

    let mut taken = Vec::new();
    for (processes, workers) in [(1usize, 2usize), (2, 1)] {
        let shape = format!("{processes}x{workers}");
        let ckpt = d.join(format!("ckpt-{shape}"));
        let at = location(&shape);
        let shared = a.s3.then_some((endpoint.as_str(), at.as_str()));
        let procs = start(&a, d, &brokers, &format!("g{shape}"), &ckpt, shared, processes, workers);
        let ticks = a.coins as f64;
        wait("every tick in", Duration::from_secs(600), || {
            procs
                .iter()
                .map(|p| metric(p.port, "llamaflow_records_in_total{kind=\"price\"}"))
                .sum::<f64>()
                >= ticks
        });
        // A single process checkpoints while records flow (then once more); a cluster every
        // K-th epoch, idle or not.
        let base: Vec<f64> = procs
            .iter()
            .map(|p| metric(p.port, "llamaflow_checkpoints_total"))
            .collect();
        let target = |b: f64| if processes == 1 { 1.0 } else { b + a.checkpoints as f64 };
        wait("more checkpoints", Duration::from_secs(600), || {
            procs
                .iter()
                .zip(&base)
                .all(|(p, b)| metric(p.port, "llamaflow_checkpoints_total") >= target(*b))
        });
        if processes == 1 {
            // The checkpoint that follows the last records (one interval later).
            std::thread::sleep(Duration::from_millis(1500));
        }
        for (i, p) in procs.iter().enumerate() {
            println!(
                "{shape} (processes x workers): process {i}: latest checkpoint {:.1} MB ({:.0} of {workers} workers \
                 incremental), duration p50 {:.3} s",
                metric(p.port, "llamaflow_checkpoint_bytes") / 1e6,
                metric(p.port, "llamaflow_checkpoint_incremental_workers"),
                metric(p.port, "llamaflow_checkpoint_duration_seconds{quantile=\"0.5\"}")
            );
        }
        stop(procs);
        // What a restore reads: the checkpoint files kept (the newest, the one before, and
        // the bases they refer to, which hold every rule).
        let state: f64 = std::fs::read_dir(&ckpt)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".bin"))
            .map(|e| e.metadata().map(|m| m.len() as f64).unwrap_or(0.0))
            .sum();
        println!(
            "{shape}: checkpoint files kept {:.1} MB (newest two and their bases)",
            state / 1e6
        );
        taken.push((shape, ckpt, state));
    }

    // Restores into 2 processes × 1 worker: as taken, and re-split from 1 × 2.
    for (shape, ckpt, state) in taken.iter().rev() {
        let mut times = Vec::new();
        for r in 0..a.restores {
            let copy = d.join(format!("restore-{shape}-{r}"));
            let at = location(shape);
            let shared = a.s3.then_some((endpoint.as_str(), at.as_str()));
            match shared {
                // Every host replaced: the processes read from S3.
                Some(_) => std::fs::create_dir_all(&copy).unwrap(),
                None => copy_dir(ckpt, &copy),
            }
            let started = Instant::now();
            let procs = start(&a, d, &brokers, &format!("r{shape}{r}"), &copy, shared, 2, 1);
            wait("every process ready", Duration::from_secs(600), || {
                procs.iter().all(|p| testkit::http_get(p.port, "/readyz").status == 200)
            });
            times.push(started.elapsed().as_secs_f64());
            stop(procs);
        }
        times.sort_by(f64::total_cmp);
        let secs = times[times.len() / 2];
        let how = if shape == "2x1" { "as taken" } else { "re-split" };
        println!(
            "restore of {shape}'s checkpoint ({:.1} MB of files kept) into 2 x 1, {how}: {secs:.2} s to ready \
             (median of {}); {:.1} s per GB",
            state / 1e6,
            a.restores,
            secs / (state / 1e9)
        );
    }
}
