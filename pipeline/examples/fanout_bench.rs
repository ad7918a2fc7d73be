//! Benchmark 3 of the performance issue — WebSocket fanout: delivered frames/s and delivery
//! delay with tens of thousands of concurrent clients of real `llamaflow run` processes on
//! loopback. Target: ≥ 500,000 frames/s delivered to 50,000 clients.
//!
//! Run it with `benches/fanout.sh` (builds `llamaflow` and this example in release mode).
//!
//! # What runs
//!
//! * **Feed.** An in-process Kafka mock cluster (`rdkafka::mocking::MockCluster`, topic
//!   `prices`, one partition) and a producer thread writing SPEC §1 price ticks at a fixed
//!   rate (`--rate`, ticks/s; `--batch` coins per round, 1 = evenly spaced single ticks). A
//!   tick's `timestamp` is its produce time (unix seconds with milliseconds), so every frame
//!   carries the moment its tick was produced. Prices are a random walk from a fixed seed.
//! * **Servers.** `llamaflow run --config` processes, each with `[sources.kafka]` on that
//!   cluster in its own consumer group (`auto_offset_reset = "latest"`), so every server gets
//!   every tick — how a WebSocket tier scales out behind a load balancer. No checkpoints, no
//!   stdout alerts, anonymous WebSocket clients, default fanout limits (`send_queue`
//!   1,024 frames, ping every 20 s). The consumers' `fetch.wait.max.ms` is 5
//!   (`--fetch-wait-ms`): the mock broker answers a fetch only when that wait expires (a real
//!   broker answers as soon as data arrives), so the default 100 ms would dominate the delay.
//! * **Clients.** This binary re-executes itself as `fanout_bench client` child processes (at
//!   most `--clients-per-process` connections each, a current-thread tokio runtime). Each
//!   connection does the HTTP upgrade, subscribes to `prices`, waits for the ack, then reads
//!   frames with a minimal RFC 6455 reader (answers pings and closes; no per-frame allocation,
//!   no UTF-8 check, no JSON parsing: of a `price_update` it only reads the trailing
//!   `"timestamp":<ms>`) — the clients share the machine with the servers, so they are kept
//!   cheap. Each client process binds its own source address 127.0.0.x, so ephemeral ports
//!   (32768–60999 per source/destination pair) never run out. Children report as JSON over
//!   stdout and die with the bench (`PR_SET_PDEATHSIG`).
//! * **Measurement.** The feed is paused while clients connect (the connect time is the
//!   connections' alone). Once every client is connected and subscribed, a warm-up
//!   (`--warmup-secs`), then a fixed window (`--window-secs`). Counted: frames received in the
//!   window (frames/s delivered), their delivery delay = receive time − produce time (same
//!   machine clock; 0.1 ms histogram buckets, the produce time is truncated to the ms so delays
//!   read up to 1 ms high), 1013 closes (slow consumer) and other disconnects, the time to
//!   connect and subscribe every client, CPU time of servers and clients in the window
//!   (`/proc/<pid>/stat`; also per frame, which depends less on what else runs on the machine
//!   than frames/s do), how busy the machine was and how much the hypervisor stole (`/proc/stat`),
//!   frames the servers report sent (`llamaflow_ws_frames_sent_total`),
//!   and each server's peak RSS (`VmHWM`). Offered frames/s = ticks produced in the window ×
//!   connected clients.
//!
//! # The file-descriptor limit
//!
//! Each connection is one file descriptor in the server and one in the client. Where the hard
//! `RLIMIT_NOFILE` is below ~50,000 (the development sandbox: 20,000, not raisable without
//! `CAP_SYS_RESOURCE`), one process cannot hold 50,000 connections, so the default
//! configurations (`--configs 1x1000,1x19000,3x50000`, `SERVERSxCLIENTS`) are: a latency
//! baseline; one server with as many clients as it can hold; and 50,000 clients spread over
//! three servers (≈16,667 each) fed the same stream. Clients are spread over enough client
//! processes to stay below the limit. The bench refuses configurations that need more
//! descriptors per process than the limit allows.
//!
//! ```text
//! fanout_bench [--llamaflow PATH] [--configs 1x1000,1x19000,3x50000] [--rate 10] [--batch 1]
//!              [--warmup-secs 5] [--window-secs 20] [--clients-per-process 12500]
//!              [--fetch-wait-ms 5] [--json FILE]
//! ```
//!
//! At `--rate 10` the 50,000-client configuration is offered exactly the target, 500,000
//! frames/s: either the tier keeps up (delivered ≈ offered, the delay stays bounded) or it does
//! not (delivered < offered, the delay grows through the window). A higher `--rate` probes the
//! capacity. Delivered can exceed offered by a little when a backlog built during the warm-up
//! drains inside the window.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::{Value, json};

/// Kafka topic of the feed.
const TOPIC: &str = "prices";
/// Width of a delay histogram bucket, µs.
const BUCKET_US: u64 = 100;
/// Histogram buckets (the last one collects everything ≥ 60 s).
const BUCKETS: usize = 600_000;
/// File descriptors a process keeps for everything but connections.
const FD_RESERVE: u64 = 300;
/// Seed of the price random walk.
const SEED: u64 = 7;

#[derive(Parser)]
#[command(about = "WebSocket fanout benchmark: delivered frames/s and delivery delay of `llamaflow run`")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Internal: one client process (started by the bench itself).
    Client(ClientArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// The `llamaflow` binary [default: `llamaflow` in the directory above this example's].
    #[arg(long)]
    llamaflow: Option<PathBuf>,
    /// Configurations to run, `SERVERSxCLIENTS`, comma-separated.
    #[arg(long, default_value = "1x1000,1x19000,3x50000")]
    configs: String,
    /// Price ticks produced per second (every client receives every tick).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Ticks per round: rounds of this many coins, `batch / rate` seconds apart (1 = evenly
    /// spaced single ticks).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Seconds between "all clients connected" and the start of the window.
    #[arg(long, default_value_t = 5)]
    warmup_secs: u64,
    /// Length of the measurement window in seconds.
    #[arg(long, default_value_t = 20)]
    window_secs: u64,
    /// Most connections per client process.
    #[arg(long, default_value_t = 12_500)]
    clients_per_process: usize,
    /// Connects in flight per client process.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// `fetch.wait.max.ms` of the servers' Kafka consumers. The mock broker answers a fetch
    /// only when it expires, so it bounds the feed's latency (a real broker answers at once).
    #[arg(long, default_value_t = 5)]
    fetch_wait_ms: u32,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct ClientArgs {
    /// Server addresses; client `first + i` connects to `servers[(first + i) % len]`.
    #[arg(long, value_delimiter = ',', required = true)]
    servers: Vec<SocketAddr>,
    /// Connections of this process.
    #[arg(long)]
    clients: usize,
    /// Global index of this process's first client.
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Local source address of the connections.
    #[arg(long, default_value = "127.0.0.1")]
    source_ip: Ipv4Addr,
    /// Connects in flight.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Client(a)) => client_main(a),
        None => bench(cli.bench),
    }
}

fn now_us() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_micros(),
    )
    .expect("time fits u64")
}

// ---------------------------------------------------------------------------------------
// The bench (parent process)
// ---------------------------------------------------------------------------------------

/// A small deterministic generator.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// The producer thread: price ticks to Kafka at a fixed rate.
struct Feed {
    stop: Arc<AtomicBool>,
    /// Ticks are produced only while this is set (off while clients connect).
    on: Arc<AtomicBool>,
    /// Produce time (unix ms) of every tick so far.
    produced: Arc<Mutex<Vec<u64>>>,
    thread: JoinHandle<()>,
}

impl Feed {
    fn start(brokers: &str, rate: f64, batch: usize) -> Feed {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "0")
            .create()
            .expect("Kafka producer");
        let stop = Arc::new(AtomicBool::new(false));
        let on = Arc::new(AtomicBool::new(false));
        let produced = Arc::new(Mutex::new(Vec::new()));
        let (stop2, on2, produced2) = (Arc::clone(&stop), Arc::clone(&on), Arc::clone(&produced));
        let interval = Duration::from_secs_f64(batch as f64 / rate);
        let thread = std::thread::spawn(move || {
            // (coin id, price, last timestamp in ms)
            let mut coins: Vec<(String, f64, u64)> = (0..batch)
                .map(|c| (format!("coingecko:fanout-bench-{c}"), 100.0, 0))
                .collect();
            let mut rng = Lcg(SEED);
            let mut next = Instant::now();
            while !stop2.load(Ordering::Relaxed) {
                let on = on2.load(Ordering::Relaxed);
                for (coin, price, last_ms) in coins.iter_mut().filter(|_| on) {
                    // Strictly increasing per coin (SPEC §1), = produce time in ms.
                    let ms = (now_us() / 1000).max(*last_ms + 1);
                    *last_ms = ms;
                    *price *= 1.0 + (rng.below(2001) as f64 - 1000.0) / 100_000.0;
                    let p = (*price * 10_000.0).round() / 10_000.0;
                    let payload = json!({"coin": coin, "price": p, "timestamp": ms as f64 / 1000.0}).to_string();
                    while let Err((e, _)) =
                        producer.send(BaseRecord::to(TOPIC).key(coin.as_str()).payload(payload.as_str()))
                    {
                        assert!(
                            matches!(
                                e.rdkafka_error_code(),
                                Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                            ),
                            "produce failed: {e}"
                        );
                        producer.poll(Duration::from_millis(5));
                    }
                    produced2.lock().expect("feed log").push(ms);
                }
                producer.poll(Duration::ZERO);
                next += interval;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else if now - next > Duration::from_secs(1) {
                    next = now; // far behind (machine stalled): do not burst to catch up
                }
            }
            let _ = producer.flush(Duration::from_secs(5));
        });
        Feed {
            stop,
            on,
            produced,
            thread,
        }
    }

    fn set_on(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// Ticks produced in `[start_ms, end_ms)`.
    fn ticks_between(&self, start_ms: u64, end_ms: u64) -> usize {
        let p = self.produced.lock().expect("feed log");
        p.iter().filter(|&&t| t >= start_ms && t < end_ms).count()
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("feed thread");
    }
}

/// Makes a child get `signal` when the bench dies, so nothing outlives an interrupted run.
fn die_with_parent(cmd: &mut Command, signal: libc::c_int) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Server {
    proc: Proc,
    port: u16,
    log: PathBuf,
}

struct ClientProc {
    proc: Proc,
    stdin: ChildStdin,
}

/// Jiffies of the whole machine: [busy, steal, total].
fn machine_cpu() -> [u64; 3] {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let total: u64 = (0..8).map(at).sum();
    let steal = at(7);
    [total - at(3) - at(4) - steal, steal, total]
}

/// Sum of the Prometheus samples of `/metrics` whose line starts with `prefix` (0 when there
/// is none); NaN when the server did not answer.
fn scrape(port: u16, prefix: &str) -> f64 {
    let mut body = String::new();
    let answered = TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .is_ok()
            && s.read_to_string(&mut body).is_ok()
    });
    if !answered || !body.starts_with("HTTP/1.1 200") {
        return f64::NAN;
    }
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0
}

fn sleep_until_us(t: u64) {
    let now = now_us();
    if t > now {
        std::thread::sleep(Duration::from_micros(t - now));
    }
}

fn server_config(port: u16, brokers: &str, group: &str, fetch_wait_ms: u32) -> String {
    format!(
        r#"[pipeline]
listen = "127.0.0.1:{port}"
checkpoint_dir = ""

[sources.kafka]
brokers = "{brokers}"
group_id = "{group}"
auto_offset_reset = "latest"
topics = {{ tvl = "", transfers = "", gas = "", liquidations = "" }}
# The mock broker answers a fetch only when fetch.wait.max.ms expires (a real one answers
# as soon as data is there): keep that wait short so it does not dominate the delay.
extra = {{ "fetch.wait.max.ms" = "{fetch_wait_ms}" }}

[sinks]
stdout = false

[sinks.websocket]
allow_anonymous = true
max_anonymous_per_ip = 0
"#
    )
}

fn start_server(llamaflow: &Path, dir: &Path, name: &str, brokers: &str, fetch_wait_ms: u32) -> Server {
    let port = testkit::free_port();
    let config = dir.join(format!("{name}.toml"));
    fs::write(
        &config,
        server_config(port, brokers, &format!("fanout-{name}"), fetch_wait_ms),
    )
    .expect("write server config");
    let log = dir.join(format!("{name}.log"));
    let child = die_with_parent(&mut Command::new(llamaflow), libc::SIGTERM)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("LLAMAFLOW_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("server log"))
        .spawn()
        .expect("start llamaflow run");
    Server {
        proc: Proc(child),
        port,
        log,
    }
}

/// One configuration's figures.
#[derive(Debug, Default)]
struct Outcome {
    servers: usize,
    clients: usize,
    client_procs: usize,
    connected: u64,
    connect_failed: u64,
    connect_secs: f64,
    window_secs: f64,
    offered_per_s: f64,
    delivered_per_s: f64,
    server_sent_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    closed_1013: u64,
    closed_other: u64,
    lost: u64,
    /// Socket reads of all clients in the window.
    reads: u64,
    server_slow_consumer: f64,
    server_cpu: (f64, f64),
    client_cpu: (f64, f64),
    machine_busy: f64,
    machine_steal: f64,
    /// Cores busy with anything but the servers, the clients and the bench (other jobs).
    other_cpu: f64,
    server_hwm_mib: Vec<f64>,
}

impl Outcome {
    fn json(&self) -> Value {
        json!({
            "servers": self.servers, "clients": self.clients, "client_processes": self.client_procs,
            "connected": self.connected, "connect_failed": self.connect_failed,
            "connect_secs": self.connect_secs, "window_secs": self.window_secs,
            "offered_frames_per_s": self.offered_per_s, "delivered_frames_per_s": self.delivered_per_s,
            "server_sent_frames_per_s": self.server_sent_per_s,
            "delay_ms": {"p50": self.p50_ms, "p99": self.p99_ms, "p99.9": self.p999_ms, "max": self.max_ms},
            "closed_1013": self.closed_1013, "closed_other": self.closed_other, "lost": self.lost,
            "client_reads_per_s": self.reads as f64 / self.window_secs,
            "server_slow_consumer_disconnects": self.server_slow_consumer,
            "server_cpu_cores": {"user": self.server_cpu.0, "system": self.server_cpu.1},
            "client_cpu_cores": {"user": self.client_cpu.0, "system": self.client_cpu.1},
            "machine_busy": self.machine_busy, "machine_steal": self.machine_steal,
            "other_processes_cpu_cores": self.other_cpu,
            "server_vmhwm_mib": self.server_hwm_mib,
        })
    }
}

/// Percentile of a merged histogram, as the upper edge of its bucket in ms.
fn percentile(hist: &BTreeMap<usize, u64>, total: u64, q: f64) -> f64 {
    if total == 0 {
        return f64::NAN;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (&b, &n) in hist {
        seen += n;
        if seen >= rank {
            return ((b as u64 + 1) * BUCKET_US) as f64 / 1000.0;
        }
    }
    f64::NAN
}

fn fmt_int(n: f64) -> String {
    if !n.is_finite() {
        return "n/a".into();
    }
    let s = format!("{:.0}", n);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    format!("{sign}{out}")
}

#[allow(clippy::too_many_arguments)]
fn run_config(
    idx: usize,
    servers_n: usize,
    clients: usize,
    args: &BenchArgs,
    llamaflow: &Path,
    brokers: &str,
    dir: &Path,
    feed: &Feed,
) -> Outcome {
    let procs_n = clients.div_ceil(args.clients_per_process).max(1);
    println!(
        "\n== {servers_n} server(s), {} clients in {procs_n} client process(es) ==",
        fmt_int(clients as f64)
    );
    // No ticks while clients connect: the connect time is the connections' alone.
    feed.set_on(false);
    let servers: Vec<Server> = (0..servers_n)
        .map(|s| start_server(llamaflow, dir, &format!("c{idx}-s{s}"), brokers, args.fetch_wait_ms))
        .collect();
    for s in &servers {
        if !testkit::wait_for_port(s.port, Duration::from_secs(60)) {
            panic!(
                "llamaflow on port {} does not listen; log:\n{}",
                s.port,
                fs::read_to_string(&s.log).unwrap_or_default()
            );
        }
    }
    let addrs: Vec<String> = servers.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();

    // Client processes, each on its own source address.
    let exe = std::env::current_exe().expect("own path");
    let (tx, rx) = mpsc::channel::<(usize, Value)>();
    let started = Instant::now();
    let mut children = Vec::new();
    let mut first = 0;
    for p in 0..procs_n {
        let n = clients / procs_n + usize::from(p < clients % procs_n);
        let source_ip = Ipv4Addr::new(127, 0, (1 + idx) as u8, (2 + p) as u8);
        let mut child = die_with_parent(&mut Command::new(&exe), libc::SIGKILL)
            .args(["client", "--servers", &addrs.join(",")])
            .args(["--clients", &n.to_string(), "--first", &first.to_string()])
            .args(["--source-ip", &source_ip.to_string()])
            .args(["--concurrency", &args.connect_concurrency.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start client process");
        first += n;
        let stdout = child.stdout.take().expect("client stdout");
        let stdin = child.stdin.take().expect("client stdin");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send((p, v));
                }
            }
        });
        children.push(ClientProc {
            proc: Proc(child),
            stdin,
        });
    }
    let recv = |what: &str, within: Duration| -> (usize, Value) {
        rx.recv_timeout(within)
            .unwrap_or_else(|_| panic!("no {what} from a client process within {within:?}"))
    };
    let mut out = Outcome {
        servers: servers_n,
        clients,
        client_procs: procs_n,
        ..Outcome::default()
    };
    let mut first_error = None;
    for _ in 0..procs_n {
        let (_, v) = recv("ready report", Duration::from_secs(180));
        out.connected += v["connected"].as_u64().unwrap_or(0);
        out.connect_failed += v["failed"].as_u64().unwrap_or(0);
        if let Some(e) = v["first_error"].as_str() {
            first_error.get_or_insert(e.to_string());
        }
    }
    out.connect_secs = started.elapsed().as_secs_f64();
    println!(
        "connected and subscribed: {} of {} in {:.1} s{}",
        fmt_int(out.connected as f64),
        fmt_int(clients as f64),
        out.connect_secs,
        first_error.map_or(String::new(), |e| format!(" (first error: {e})"))
    );

    // The window, after a warm-up with the feed on.
    feed.set_on(true);
    let start_us = now_us() + args.warmup_secs * 1_000_000;
    let end_us = start_us + args.window_secs * 1_000_000;
    for c in &mut children {
        writeln!(c.stdin, "{start_us} {end_us}").expect("tell a client process the window");
        c.stdin.flush().expect("flush client stdin");
    }
    let sample = |servers: &[Server], children: &[ClientProc]| {
        let sum = |pids: Vec<u32>| {
            pids.into_iter()
                .map(testkit::cpu_secs)
                .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        let (srv, cli, own, machine, at) = (
            sum(servers.iter().map(|s| s.proc.0.id()).collect()),
            sum(children.iter().map(|c| c.proc.0.id()).collect()),
            testkit::cpu_secs(std::process::id()),
            machine_cpu(),
            Instant::now(),
        );
        // Each server's counter with the moment it was read (a loaded server answers late).
        let sent: Vec<(f64, Instant)> = servers
            .iter()
            .map(|s| (scrape(s.port, "llamaflow_ws_frames_sent_total"), Instant::now()))
            .collect();
        (srv, cli, machine, sent, at, own)
    };
    sleep_until_us(start_us);
    let a = sample(&servers, &children);
    sleep_until_us(end_us);
    let b = sample(&servers, &children);
    let secs = (b.4 - a.4).as_secs_f64();
    out.window_secs = args.window_secs as f64;
    out.server_cpu = ((b.0.0 - a.0.0) / secs, (b.0.1 - a.0.1) / secs);
    out.client_cpu = ((b.1.0 - a.1.0) / secs, (b.1.1 - a.1.1) / secs);
    let jiffies = (b.2[2] - a.2[2]).max(1) as f64;
    out.machine_busy = (b.2[0] - a.2[0]) as f64 / jiffies;
    out.machine_steal = (b.2[1] - a.2[1]) as f64 / jiffies;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let bench_cpu = (b.5.0 + b.5.1 - a.5.0 - a.5.1) / secs;
    out.other_cpu = out.machine_busy * cores
        - (out.server_cpu.0 + out.server_cpu.1 + out.client_cpu.0 + out.client_cpu.1 + bench_cpu);
    out.server_sent_per_s =
        a.3.iter()
            .zip(&b.3)
            .map(|((n0, t0), (n1, t1))| (n1 - n0) / (*t1 - *t0).as_secs_f64())
            .sum();
    let ticks = feed.ticks_between(start_us / 1000, end_us / 1000);
    out.offered_per_s = ticks as f64 * out.connected as f64 / out.window_secs;

    // Results.
    let mut hist: BTreeMap<usize, u64> = BTreeMap::new();
    let mut frames = 0u64;
    let mut max_us = 0u64;
    for _ in 0..procs_n {
        let (_, v) = recv("result", Duration::from_secs(60));
        frames += v["frames"].as_u64().unwrap_or(0);
        max_us = max_us.max(v["max_us"].as_u64().unwrap_or(0));
        out.closed_1013 += v["closed_1013"].as_u64().unwrap_or(0);
        out.closed_other += v["closed_other"].as_u64().unwrap_or(0);
        out.lost += v["lost"].as_u64().unwrap_or(0);
        out.reads += v["reads"].as_u64().unwrap_or(0);
        for pair in v["hist"].as_array().into_iter().flatten() {
            let (Some(b), Some(n)) = (pair[0].as_u64(), pair[1].as_u64()) else {
                continue;
            };
            *hist.entry(b as usize).or_default() += n;
        }
    }
    out.delivered_per_s = frames as f64 / out.window_secs;
    out.p50_ms = percentile(&hist, frames, 0.50);
    out.p99_ms = percentile(&hist, frames, 0.99);
    out.p999_ms = percentile(&hist, frames, 0.999);
    out.max_ms = max_us as f64 / 1000.0;
    out.server_slow_consumer = servers
        .iter()
        .map(|s| scrape(s.port, "llamaflow_ws_disconnects_total{reason=\"slow_consumer\"}"))
        .sum::<f64>();
    out.server_hwm_mib = servers
        .iter()
        .map(|s| testkit::status_kib(s.proc.0.id(), "VmHWM:") as f64 / 1024.0)
        .collect();

    println!(
        "window {:.0} s: offered {} frames/s ({ticks} ticks × {} clients), delivered {} frames/s ({:.1} %), \
         servers sent {} frames/s",
        out.window_secs,
        fmt_int(out.offered_per_s),
        fmt_int(out.connected as f64),
        fmt_int(out.delivered_per_s),
        100.0 * out.delivered_per_s / out.offered_per_s.max(1.0),
        fmt_int(out.server_sent_per_s),
    );
    println!(
        "delivery delay: p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms; {:.1} frames per client socket read",
        out.p50_ms,
        out.p99_ms,
        out.p999_ms,
        out.max_ms,
        frames as f64 / out.reads.max(1) as f64
    );
    println!(
        "disconnects: {} closed 1013 (servers counted {}), {} other closes, {} lost",
        out.closed_1013, out.server_slow_consumer, out.closed_other, out.lost
    );
    let per_frame = |cpu: (f64, f64), rate: f64| 1e6 * (cpu.0 + cpu.1) / rate.max(1.0);
    println!(
        "CPU in the window (cores): servers {:.2} user + {:.2} sys ({:.1} µs per frame sent), clients {:.2} user + \
         {:.2} sys ({:.1} µs per frame received); machine {:.0} % busy, {:.0} % stolen by the hypervisor, \
         {:.2} cores used by other processes",
        out.server_cpu.0,
        out.server_cpu.1,
        per_frame(out.server_cpu, out.server_sent_per_s),
        out.client_cpu.0,
        out.client_cpu.1,
        per_frame(out.client_cpu, out.delivered_per_s),
        100.0 * out.machine_busy,
        100.0 * out.machine_steal,
        out.other_cpu
    );
    println!(
        "server peak RSS (VmHWM): {}",
        out.server_hwm_mib
            .iter()
            .map(|m| format!("{m:.0} MiB"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Tear down: client processes exit after reporting; servers get SIGTERM.
    for c in &mut children {
        let _ = c.proc.0.wait();
    }
    for s in &servers {
        // SAFETY: signalling a child process we own.
        unsafe {
            libc::kill(s.proc.0.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for mut s in servers {
        while Instant::now() < deadline && matches!(s.proc.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(s.proc); // SIGKILL if still running
    }
    out
}

fn bench(args: BenchArgs) {
    let nofile = testkit::raise_nofile();
    let llamaflow = args.llamaflow.clone().unwrap_or_else(testkit::llamaflow_beside_example);
    assert!(
        llamaflow.is_file(),
        "{} not found: build it (cargo build --release -p pipeline --bin llamaflow) or pass --llamaflow",
        llamaflow.display()
    );
    assert!(args.rate > 0.0 && args.batch > 0, "--rate and --batch must be positive");
    let configs: Vec<(usize, usize)> = args
        .configs
        .split(',')
        .map(|c| {
            let (s, n) = c
                .trim()
                .split_once('x')
                .unwrap_or_else(|| panic!("--configs: `{c}` is not SERVERSxCLIENTS"));
            let parse = |v: &str| v.trim().replace('_', "").parse::<usize>().ok().filter(|&x| x > 0);
            (
                parse(s).unwrap_or_else(|| panic!("--configs: bad server count in `{c}`")),
                parse(n).unwrap_or_else(|| panic!("--configs: bad client count in `{c}`")),
            )
        })
        .collect();
    let room = nofile.saturating_sub(FD_RESERVE) as usize;
    assert!(
        args.clients_per_process <= room,
        "--clients-per-process {} needs more file descriptors than RLIMIT_NOFILE {nofile} allows",
        args.clients_per_process
    );
    for &(s, n) in &configs {
        assert!(
            n.div_ceil(s) <= room,
            "{n} clients on {s} server(s) is {} connections per server: RLIMIT_NOFILE is {nofile} (hard); \
             use more servers",
            n.div_ceil(s)
        );
    }
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "fanout bench: {} cores, RLIMIT_NOFILE {nofile}, load average {}; feed {} ticks/s in rounds of {}; \
         warm-up {} s, window {} s",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        args.rate,
        args.batch,
        args.warmup_secs,
        args.window_secs
    );

    let cluster = MockCluster::new(1).expect("Kafka mock cluster");
    cluster.create_topic(TOPIC, 1, 1).expect("create topic");
    let brokers = cluster.bootstrap_servers();
    let feed = Feed::start(&brokers, args.rate, args.batch);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut outcomes = Vec::new();
    for (i, &(s, n)) in configs.iter().enumerate() {
        outcomes.push(run_config(i, s, n, &args, &llamaflow, &brokers, dir.path(), &feed));
    }
    feed.stop();

    println!(
        "\n| servers | clients | offered frames/s | delivered frames/s | p50 | p99 | max | 1013 closes | connect | server CPU | client CPU | other processes' CPU | server VmHWM |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for o in &outcomes {
        println!(
            "| {} | {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {} | {:.1} s | {:.2} cores | {:.2} cores | {:.2} cores | {} |",
            o.servers,
            fmt_int(o.connected as f64),
            fmt_int(o.offered_per_s),
            fmt_int(o.delivered_per_s),
            o.p50_ms,
            o.p99_ms,
            o.max_ms,
            o.closed_1013,
            o.connect_secs,
            o.server_cpu.0 + o.server_cpu.1,
            o.client_cpu.0 + o.client_cpu.1,
            o.other_cpu,
            o.server_hwm_mib
                .iter()
                .map(|m| format!("{m:.0}"))
                .collect::<Vec<_>>()
                .join(" + ")
                + " MiB"
        );
    }
    if let Some(path) = &args.json {
        let v = json!({
            "rate": args.rate, "batch": args.batch, "warmup_secs": args.warmup_secs,
            "window_secs": args.window_secs, "nofile": nofile,
            "configs": outcomes.iter().map(Outcome::json).collect::<Vec<_>>(),
        });
        fs::write(path, serde_json::to_string_pretty(&v).expect("JSON")).expect("write --json file");
    }
}

// ---------------------------------------------------------------------------------------
// A client process
// ---------------------------------------------------------------------------------------

/// Counters shared by the connections of one client process.
struct Stats {
    start_us: AtomicU64,
    end_us: AtomicU64,
    frames: AtomicU64,
    max_us: AtomicU64,
    hist: Vec<AtomicU64>,
    closed_1013: AtomicU64,
    closed_other: AtomicU64,
    lost: AtomicU64,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            start_us: AtomicU64::new(u64::MAX),
            end_us: AtomicU64::new(u64::MAX),
            frames: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
            hist: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            closed_1013: AtomicU64::new(0),
            closed_other: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    /// Counts a `price_update` frame stamped `ts_ms` received at `now` (if in the window).
    fn record(&self, now: u64, ts_ms: u64) {
        if now < self.start_us.load(Ordering::Relaxed) || now >= self.end_us.load(Ordering::Relaxed) {
            return;
        }
        let delay = now.saturating_sub(ts_ms * 1000);
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(delay, Ordering::Relaxed);
        let b = usize::try_from(delay / BUCKET_US).map_or(BUCKETS - 1, |b| b.min(BUCKETS - 1));
        self.hist[b].fetch_add(1, Ordering::Relaxed);
    }

    fn report(&self) -> Value {
        let hist: Vec<[u64; 2]> = self
            .hist
            .iter()
            .enumerate()
            .filter_map(|(b, n)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then_some([b as u64, n])
            })
            .collect();
        json!({
            "frames": self.frames.load(Ordering::Relaxed),
            "max_us": self.max_us.load(Ordering::Relaxed),
            "closed_1013": self.closed_1013.load(Ordering::Relaxed),
            "closed_other": self.closed_other.load(Ordering::Relaxed),
            "lost": self.lost.load(Ordering::Relaxed),
            "hist": hist,
        })
    }
}

/// The event time (ms) of a `price_update` frame: its trailing `"timestamp":<ms>}`.
fn price_frame_ms(frame: &[u8]) -> Option<u64> {
    const TS: &[u8] = br#""timestamp":"#;
    let body = frame.strip_prefix(br#"{"type":"price_update""#)?.strip_suffix(b"}")?;
    let digits = body.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let (head, num) = body.split_at(body.len() - digits);
    if digits == 0 || !head.ends_with(TS) {
        return None;
    }
    num.iter()
        .try_fold(0u64, |acc, &d| acc.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// Successful socket reads of this client process (frames per read = how much the server
/// batched per connection).
static READS: AtomicU64 = AtomicU64::new(0);

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A minimal WebSocket client connection — just enough of RFC 6455 for this bench (server
/// frames are unfragmented and unmasked, as axum sends them), so the clients cost as little
/// CPU as possible: no per-message allocation, no UTF-8 validation, no JSON parsing.
struct RawWs {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RawWs {
    /// Reads more bytes into the buffer.
    async fn fill(&mut self) -> Result<(), String> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        loop {
            self.stream.readable().await.map_err(|e| e.to_string())?;
            match self.stream.try_read(&mut self.buf[self.end..]) {
                Ok(0) => return Err("connection closed".into()),
                Ok(n) => {
                    self.end += n;
                    READS.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// The next complete frame in the buffer, if any: (opcode, payload range in `buf`).
    fn parse(&mut self) -> Option<(u8, std::ops::Range<usize>)> {
        let b = &self.buf[self.start..self.end];
        if b.len() < 2 {
            return None;
        }
        let (len, header) = match b[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?])), 4),
            127 => (
                usize::try_from(u64::from_be_bytes(b.get(2..10)?.try_into().ok()?)).ok()?,
                10,
            ),
            n => (usize::from(n), 2),
        };
        if b.len() < header + len {
            return None;
        }
        let payload = self.start + header..self.start + header + len;
        self.start += header + len;
        Some((b[0] & 0x0f, payload))
    }

    async fn next_frame(&mut self) -> Result<(u8, std::ops::Range<usize>), String> {
        loop {
            if let Some(f) = self.parse() {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Sends one masked frame (client frames must be masked; a fixed key is fine here).
    async fn send(&self, op: u8, payload: &[u8]) -> Result<(), String> {
        const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];
        let mut f = Vec::with_capacity(payload.len() + 8);
        f.push(0x80 | op);
        match u8::try_from(payload.len()) {
            Ok(n) if n < 126 => f.push(0x80 | n),
            _ => {
                f.push(0x80 | 126);
                f.extend_from_slice(
                    &u16::try_from(payload.len())
                        .map_err(|_| "frame too long")?
                        .to_be_bytes(),
                );
            }
        }
        f.extend_from_slice(&MASK);
        f.extend(payload.iter().zip(MASK.iter().cycle()).map(|(b, m)| b ^ m));
        let mut data = &f[..];
        while !data.is_empty() {
            self.stream.writable().await.map_err(|e| e.to_string())?;
            match self.stream.try_write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Connects, upgrades, subscribes to `prices` and waits for the ack.
async fn connect_once(server: SocketAddr, source_ip: Ipv4Addr) -> Result<RawWs, String> {
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    sock.bind(SocketAddr::from((source_ip, 0)))
        .map_err(|e| format!("bind {source_ip}: {e}"))?;
    let stream = tokio::time::timeout(Duration::from_secs(15), sock.connect(server))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect {server}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    let mut ws = RawWs {
        stream,
        buf: vec![0; 4096],
        start: 0,
        end: 0,
    };
    let handshake = async {
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let mut data = request.as_bytes();
        while !data.is_empty() {
            ws.stream.writable().await.map_err(|e| e.to_string())?;
            match ws.stream.try_write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        let head_end = loop {
            ws.fill().await?;
            if let Some(i) = ws.buf[..ws.end].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        if !ws.buf.starts_with(b"HTTP/1.1 101") {
            return Err(format!(
                "upgrade refused: {}",
                String::from_utf8_lossy(&ws.buf[..head_end])
                    .lines()
                    .next()
                    .unwrap_or("")
            ));
        }
        ws.start = head_end;
        ws.send(OP_TEXT, br#"{"type":"subscribe","channels":["prices"]}"#)
            .await?;
        loop {
            let (op, r) = ws.next_frame().await?;
            let payload = &ws.buf[r];
            match op {
                // Acks and errors are serde_json objects: keys in alphabetical order.
                OP_TEXT if contains(payload, br#""type":"subscribed""#) => return Ok(()),
                OP_TEXT if contains(payload, br#""type":"error""#) => {
                    return Err(format!("subscribe refused: {}", String::from_utf8_lossy(payload)));
                }
                OP_CLOSE => return Err("closed before the ack".into()),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), handshake)
        .await
        .map_err(|_| "no upgrade or subscribe ack in time".to_string())??;
    Ok(ws)
}

async fn client_conn(
    server: SocketAddr,
    source_ip: Ipv4Addr,
    gate: Arc<tokio::sync::Semaphore>,
    stats: Arc<Stats>,
    ready: tokio::sync::mpsc::UnboundedSender<Result<(), String>>,
) {
    let permit = gate.acquire_owned().await.expect("gate open");
    let mut result = Err(String::new());
    for attempt in 0..3u64 {
        result = connect_once(server, source_ip).await;
        if result.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
    }
    drop(permit);
    let mut ws = match result {
        Ok(ws) => {
            let _ = ready.send(Ok(()));
            ws
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    loop {
        let Ok((op, r)) = ws.next_frame().await else { break };
        let payload = &ws.buf[r];
        match op {
            OP_TEXT => {
                if let Some(ts) = price_frame_ms(payload) {
                    stats.record(now_us(), ts);
                }
            }
            OP_PING => {
                let p = payload.to_vec();
                if ws.send(OP_PONG, &p).await.is_err() {
                    break;
                }
            }
            OP_CLOSE => {
                let code = (payload.len() >= 2).then(|| [payload[0], payload[1]]);
                let counter = match code.map(u16::from_be_bytes) {
                    Some(1013) => &stats.closed_1013,
                    _ => &stats.closed_other,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let _ = ws.send(OP_CLOSE, code.as_ref().map_or(&[][..], |c| &c[..])).await;
                return;
            }
            _ => {}
        }
    }
    stats.lost.fetch_add(1, Ordering::Relaxed);
}

fn client_main(a: ClientArgs) {
    let nofile = testkit::raise_nofile();
    assert!(
        (a.clients as u64) + FD_RESERVE <= nofile,
        "{} connections need more file descriptors than RLIMIT_NOFILE {nofile}",
        a.clients
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    rt.block_on(async move {
        let stats = Arc::new(Stats::new());
        let gate = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
        let started = Instant::now();
        for i in 0..a.clients {
            let server = a.servers[(a.first + i) % a.servers.len()];
            tokio::spawn(client_conn(
                server,
                a.source_ip,
                Arc::clone(&gate),
                Arc::clone(&stats),
                ready_tx.clone(),
            ));
        }
        drop(ready_tx);
        let (mut connected, mut failed, mut first_error) = (0u64, 0u64, None);
        for _ in 0..a.clients {
            match ready_rx.recv().await {
                Some(Ok(())) => connected += 1,
                Some(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
                None => break,
            }
        }
        let ready = json!({"connected": connected, "failed": failed, "first_error": first_error,
            "connect_secs": started.elapsed().as_secs_f64()});
        println!("{ready}");
        std::io::stdout().flush().expect("stdout");

        // The window, as "<start_us> <end_us>" on stdin.
        let line = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            std::io::stdin().read_line(&mut s).expect("read the window");
            s
        })
        .await
        .expect("stdin reader");
        let mut it = line.split_whitespace().map(|v| v.parse::<u64>().expect("window times"));
        let (start, end) = (it.next().expect("window start"), it.next().expect("window end"));
        stats.end_us.store(end, Ordering::Relaxed);
        stats.start_us.store(start, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_micros(start.saturating_sub(now_us()))).await;
        let reads0 = READS.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_micros(end.saturating_sub(now_us()))).await;
        let reads = READS.load(Ordering::Relaxed) - reads0;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut report = stats.report();
        report["reads"] = json!(reads);
        println!("{report}");
        std::io::stdout().flush().expect("stdout");
        // Exit without closing 10,000s of connections one by one.
        std::process::exit(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_timestamp() {
        let f = r#"{"type":"price_update","channel":"prices","data":{"coin":"coingecko:x","price":1.0,"timestamp":1717430350.123},"timestamp":1717430350123}"#;
        assert_eq!(price_frame_ms(f.as_bytes()), Some(1_717_430_350_123));
        assert_eq!(price_frame_ms(br#"{"type":"pong","timestamp":5}"#), None);
    }
}
