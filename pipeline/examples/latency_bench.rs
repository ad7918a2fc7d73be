//! End-to-end latency bench: Kafka → dataflow → WebSocket client.
//!
//! Starts a Kafka mock cluster (librdkafka's, speaking the wire protocol) in this process,
//! `llamaflow run` as a child process reading its `prices` topic and serving `/ws`, and one
//! or more WebSocket clients here subscribed to `prices`. A producer thread sends price ticks
//! at a fixed rate per phase (e.g. 10,000 then 50,000 ticks/s), each tick's timestamp being
//! `T0 + seq` milliseconds, and records the instant it handed tick `seq` to the producer.
//! Every `price_update` frame carries the tick's event time (`"timestamp":<ms>`), so the
//! client recovers `seq` and the latency is `received − produced`, both on this process's
//! monotonic clock. The first `--warmup` seconds of each phase are not counted; ticks never
//! received within 3 s of the phase's end count as lost.
//!
//! ```sh
//! benches/latency.sh                       # builds, then runs this with the defaults
//! target/release/examples/latency_bench --rates 10000,50000 --secs 20 --batch-ms 1
//! ```
//!
//! Prints, per phase: ticks/s offered and delivered, p50/p90/p99/p99.9/max latency, lost
//! frames, and the CPU share and peak RSS of the `llamaflow` process.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tokio_tungstenite::tungstenite::Message;

/// Event time of tick 0, in ms (2024-06-03T16:00:00Z).
const T0_MS: u64 = 1_717_430_400_000;
/// Not yet received.
const PENDING: u64 = u64::MAX;
/// Ticks reserved for priming (one every 20 ms until the first comes through).
const PRIME: u64 = 1_000;

/// Command-line settings.
struct Args {
    rates: Vec<u64>,
    secs: u64,
    warmup: u64,
    coins: usize,
    partitions: i32,
    batch_ms: u64,
    workers: u32,
    clients: usize,
    linger_ms: u64,
    fetch_wait_ms: u64,
    /// Checkpoints (every 5 s) and the epoch log on, as a production job runs.
    checkpoints: bool,
    /// Durable sinks besides the WebSocket: `all` adds Postgres, Redis, Kafka and a JSONL
    /// events file (and turns checkpoints on: their lag is what a slow sink shows in).
    all_sinks: bool,
    /// A Kafka-protocol broker to use instead of the in-process mock cluster (`host:port`).
    brokers: Option<String>,
    llamaflow: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: latency_bench [--rates 10000,50000] [--secs 20] [--warmup 5] [--coins 20000] \
         [--partitions 4] [--batch-ms 1] [--workers 1] [--clients 1] [--linger-ms 1] [--fetch-wait-ms 5] [--checkpoints on|off] [--sinks ws|all] [--brokers HOST:PORT (default: an in-process mock cluster)] [--llamaflow PATH]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        rates: vec![10_000, 50_000],
        secs: 20,
        warmup: 5,
        coins: 20_000,
        partitions: 4,
        batch_ms: 1,
        workers: 1,
        clients: 1,
        linger_ms: 1,
        fetch_wait_ms: 5,
        checkpoints: false,
        all_sinks: false,
        brokers: None,
        llamaflow: testkit::llamaflow_beside_example(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().unwrap_or_else(|| usage());
        let num = |v: &str| v.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--rates" => a.rates = val.split(',').map(num).collect(),
            "--secs" => a.secs = num(&val),
            "--warmup" => a.warmup = num(&val),
            "--coins" => a.coins = num(&val) as usize,
            "--partitions" => a.partitions = num(&val) as i32,
            "--batch-ms" => a.batch_ms = num(&val),
            "--workers" => a.workers = num(&val) as u32,
            "--clients" => a.clients = num(&val) as usize,
            "--linger-ms" => a.linger_ms = num(&val),
            "--fetch-wait-ms" => a.fetch_wait_ms = num(&val),
            "--llamaflow" => a.llamaflow = PathBuf::from(val),
            "--checkpoints" => a.checkpoints = val == "on",
            "--sinks" => a.all_sinks = val == "all",
            "--brokers" => a.brokers = Some(val),
            _ => usage(),
        }
    }
    if a.rates.is_empty() || a.secs <= a.warmup || a.coins == 0 || a.clients == 0 {
        usage()
    }
    a
}

/// Per-tick produce and receive instants (ns since the bench started).
struct Clock {
    start: Instant,
    sent: Vec<AtomicU64>,
    recv: Vec<AtomicU64>,
}

impl Clock {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// The event time (ms) of a `price_update` frame: its last `"timestamp":` field.
fn frame_time(frame: &str) -> Option<u64> {
    if !frame.starts_with(r#"{"type":"price_update""#) {
        return None;
    }
    let at = frame.rfind(r#""timestamp":"#)? + r#""timestamp":"#.len();
    let digits: &str = &frame[at..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Sends ticks `from..to` at `rate` per second, recording when each was handed over.
fn produce(producer: &BaseProducer, topic: &str, clock: &Clock, coins: usize, rate: u64, from: u64, to: u64) {
    let started = Instant::now();
    let mut seq = from;
    let mut payload = String::with_capacity(128);
    while seq < to {
        let due = from + (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while seq < due.min(to) {
            let coin = format!("coingecko:bench-{}", seq as usize % coins);
            let ts = T0_MS + seq;
            // A price that moves a little, deterministically.
            let price = 100.0 + ((seq.wrapping_mul(2_654_435_761) % 1000) as f64) / 100.0;
            payload.clear();
            payload.push_str(&format!(
                r#"{{"coin":"{coin}","price":{price},"timestamp":{}.{:03},"symbol":"B"}}"#,
                ts / 1000,
                ts % 1000
            ));
            clock.sent[seq as usize].store(clock.now(), Ordering::Relaxed);
            let mut record = BaseRecord::to(topic).key(&coin).payload(&payload);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((e, r)) => {
                        // Queue full: serve delivery reports, then retry.
                        if !matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ) {
                            panic!("producing tick {seq}: {e}");
                        }
                        producer.poll(Duration::from_millis(1));
                        record = r;
                    }
                }
            }
            seq += 1;
        }
        producer.poll(Duration::ZERO);
        std::thread::sleep(Duration::from_micros(200));
    }
    producer.poll(Duration::ZERO);
}

/// The pipeline's own figures from /metrics: frames sent, disconnects, and the publish latency
/// (a tick reaching the ingest front → its frame handed to the subscribers' queues).
fn metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = c.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    let _ = c.read_to_string(&mut body);
    body.lines()
        .filter(|l| {
            [
                "llamaflow_publish_latency_seconds{",
                "llamaflow_ws_frames_sent_total",
                "llamaflow_ws_disconnects_total",
                "llamaflow_epoch_log_syncs_total",
                "llamaflow_checkpoints_total",
                "llamaflow_checkpoint_duration_seconds{",
                "llamaflow_sink_behind_seconds{",
            ]
            .iter()
            .any(|m| l.starts_with(m))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Latency percentiles of one phase, in ms.
fn report(rate: u64, clock: &Clock, measured: std::ops::Range<u64>, secs: f64, cpu: f64, hwm_kib: u64) {
    let mut lat: Vec<u64> = Vec::with_capacity((measured.end - measured.start) as usize);
    let mut lost = 0u64;
    for seq in measured.clone() {
        let r = clock.recv[seq as usize].load(Ordering::Relaxed);
        if r == PENDING {
            lost += 1;
        } else {
            lat.push(r.saturating_sub(clock.sent[seq as usize].load(Ordering::Relaxed)));
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1e6
    };
    println!(
        "rate {rate:>6}/s  delivered {:>8.0}/s  p50 {:>6.2} ms  p90 {:>6.2}  p99 {:>6.2}  p99.9 {:>6.2}  max {:>7.2}  \
         lost {lost}  llamaflow CPU {:.0}%  peak RSS {} MiB",
        lat.len() as f64 / secs,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        lat.last().map_or(f64::NAN, |v| *v as f64 / 1e6),
        cpu / secs * 100.0,
        hwm_kib / 1024,
    );
}

/// Where the ticks go: librdkafka's in-process mock cluster, or a real broker.
enum Broker {
    Mock(MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
    External(String),
}

impl Broker {
    fn bootstrap_servers(&self) -> String {
        match self {
            Broker::Mock(c) => c.bootstrap_servers(),
            Broker::External(b) => b.clone(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Broker::Mock(_) => "librdkafka mock cluster (in this process)".into(),
            Broker::External(b) => format!("external, {b}"),
        }
    }

    /// Creates `topic` (an existing one is kept).
    fn create_topic(&self, rt: &tokio::runtime::Runtime, topic: &str, partitions: i32) {
        match self {
            Broker::Mock(c) => c.create_topic(topic, partitions, 1).expect("topic"),
            Broker::External(b) => {
                use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
                let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", b)
                    .create()
                    .expect("admin client");
                let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
                let res = rt
                    .block_on(admin.create_topics([&new], &AdminOptions::new()))
                    .expect("create topics");
                for r in res {
                    if let Err((t, e)) = r
                        && e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
                    {
                        panic!("cannot create topic {t} on {b}: {e}");
                    }
                }
            }
        }
    }
}

fn main() {
    let args = parse_args();
    if !args.llamaflow.exists() {
        eprintln!(
            "{} not found: build it first (cargo build --release -p pipeline --bin llamaflow) or pass --llamaflow",
            args.llamaflow.display()
        );
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = match &args.brokers {
        Some(b) => Broker::External(b.clone()),
        None => Broker::Mock(MockCluster::new(1).expect("mock cluster starts")),
    };
    let brokers = cluster.bootstrap_servers();
    println!("broker: {}", cluster.describe());
    println!(
        "{} worker(s), batch_ms {}, {} partitions, {} coins, {} client(s), producer linger.ms {}, consumer fetch.wait.max.ms {}",
        args.workers, args.batch_ms, args.partitions, args.coins, args.clients, args.linger_ms, args.fetch_wait_ms
    );
    // The other durable sinks, when asked for: real servers, as the tests use.
    let services = args.all_sinks.then(|| {
        for t in ["defi-events", "defi-alerts"] {
            cluster.create_topic(&rt, t, 1);
        }
        let pg = testkit::Postgres::start();
        let out = Command::new(&args.llamaflow)
            .args(["migrate", "--database-url", &pg.url()])
            .output()
            .expect("llamaflow migrate runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (pg, testkit::Redis::start(None))
    });
    let sinks = match &services {
        Some((pg, redis)) => format!(
            "\n[sinks.postgres]\nurl = \"{}\"\n\n[sinks.redis]\nurl = \"{}\"\n\n[sinks.kafka]\nbrokers = \"{brokers}\"\n",
            pg.url(),
            redis.url()
        ),
        None => String::new(),
    };
    for &rate in &args.rates {
        phase(&args, &cluster, &brokers, &rt, rate, &sinks);
    }
}

/// One rate on a fresh `llamaflow run` and topic.
fn phase(args: &Args, cluster: &Broker, brokers: &str, rt: &tokio::runtime::Runtime, rate: u64, sinks: &str) {
    // A fresh topic per phase (and per run, on a broker that outlives the bench).
    let topic = format!("prices-{rate}-{}", std::process::id());
    cluster.create_topic(rt, &topic, args.partitions);
    let total = PRIME + rate * args.secs;
    let clock = Arc::new(Clock {
        start: Instant::now(),
        sent: (0..total).map(|_| AtomicU64::new(0)).collect(),
        recv: (0..total).map(|_| AtomicU64::new(PENDING)).collect(),
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let port = testkit::free_port();
    let config = dir.path().join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[pipeline]
workers = {workers}
batch_ms = {batch_ms}
listen = "127.0.0.1:{port}"
checkpoint_dir = "{checkpoint_dir}"

[sources.kafka]
brokers = "{brokers}"
group_id = "latency-bench"
topics = {{ prices = "{topic}", tvl = "", transfers = "", gas = "", liquidations = "" }}
extra = {{ "fetch.wait.max.ms" = "{fetch_wait}" }}

[sinks]
stdout = false

# One client takes the whole firehose (every tick): let it queue up to 2 s of it.
[sinks.websocket]
allow_anonymous = true
max_anonymous_per_ip = 0
send_queue = 100000
{sinks}{jsonl}
"#,
            workers = args.workers,
            batch_ms = args.batch_ms,
            fetch_wait = args.fetch_wait_ms,
            jsonl = if args.all_sinks {
                format!(
                    "\n[sinks.jsonl]\nevents = \"{}\"\n",
                    dir.path().join("events.jsonl").display()
                )
            } else {
                String::new()
            },
            checkpoint_dir = if args.checkpoints || args.all_sinks {
                dir.path().join("checkpoints").display().to_string()
            } else {
                String::new()
            },
        ),
    )
    .expect("config written");
    let log = dir.path().join("llamaflow.log");
    let job = testkit::KillOnDrop(
        Command::new(&args.llamaflow)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("llamaflow starts"),
    );
    let pid = job.0.id();
    assert!(
        testkit::wait_for_port(port, Duration::from_secs(60)),
        "llamaflow did not listen on {port}; see {}",
        log.display()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("ws://127.0.0.1:{port}/ws");
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        let (clock, stop, url) = (clock.clone(), stop.clone(), url.clone());
        let mut ws = rt.block_on(async {
            let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.expect("client connects");
            ws.send(Message::text(r#"{"type":"subscribe","channels":["prices"]}"#))
                .await
                .expect("subscribes");
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.contains("subscribed") => ws,
                other => panic!("expected the subscription's confirmation, got {other:?}"),
            }
        });
        clients.push(rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let msg = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                    Err(_) => continue,
                    Ok(Some(Ok(m))) => m,
                    Ok(other) => panic!("connection ended: {other:?}"),
                };
                let now = clock.now();
                if let Message::Text(t) = msg
                    && let Some(ts) = frame_time(&t)
                    && let Some(slot) = ts.checked_sub(T0_MS).and_then(|s| clock.recv.get(s as usize))
                {
                    // With several clients the first delivery counts.
                    let _ = slot.compare_exchange(PENDING, now, Ordering::Relaxed, Ordering::Relaxed);
                }
            }
        }));
    }

    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", args.linger_ms.to_string())
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");

    // Prime: one tick every 20 ms until the first comes through (the consumer group forms).
    let primed = Instant::now();
    let mut seq = 0u64;
    while clock
        .recv
        .iter()
        .take(seq as usize)
        .all(|r| r.load(Ordering::Relaxed) == PENDING)
    {
        if primed.elapsed() > Duration::from_secs(60) || seq >= PRIME {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            eprintln!("no price_update within 60 s; llamaflow's log:\n{text}");
            std::process::exit(1);
        }
        produce(&producer, &topic, &clock, args.coins, 1_000, seq, seq + 1);
        let _ = producer.flush(Duration::from_secs(1));
        seq += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    let seq = PRIME;

    let n = rate * args.secs;
    let warm = rate * args.warmup;
    produce(&producer, &topic, &clock, args.coins, rate, seq, seq + warm);
    let cpu = |pid| {
        let (user, system) = testkit::cpu_secs(pid);
        user + system
    };
    let cpu1 = cpu(pid);
    let t1 = Instant::now();
    produce(&producer, &topic, &clock, args.coins, rate, seq + warm, seq + n);
    let measured_secs = t1.elapsed().as_secs_f64();
    let (cpu2, hwm) = (cpu(pid), testkit::status_kib(pid, "VmHWM:"));
    let _ = producer.flush(Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(3));
    print!("offered {:>6.0}/s  ", (n - warm) as f64 / measured_secs);
    report(rate, &clock, seq + warm..seq + n, measured_secs, cpu2 - cpu1, hwm);
    println!("  llamaflow: {}", metrics(port));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = rt.block_on(c);
    }
    drop(job);
}
