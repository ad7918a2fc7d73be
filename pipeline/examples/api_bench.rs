//! Read API bench (SPEC §8): latency and throughput of the read API while the job ingests,
//! freshness of the aggregates, memory of the live state, and the same `/v2/chains` answered
//! by PostgreSQL from `protocol_tvl`.
//!
//! 1. `llamaflow run` (a child process) loads a history of `--protocols` protocols ×
//!    `--chains` chains (one TVL value each, with metadata in 20 categories); its RSS once
//!    loaded is the memory of the live state.
//! 2. A producer sends `--ticks` price ticks per second (20,000 coins) and 200 TVL updates per
//!    second through a Kafka mock cluster (librdkafka's, in this process) while an open-loop
//!    load generator here (`--conns` keep-alive HTTP/1.1 connections, requests scheduled at a
//!    fixed rate, latency measured from the scheduled instant, so a stalled server is not
//!    hidden) asks `/v2/chains`, `/prices/current/<3 coins>` and `/categories` in turn, at each
//!    rate of `--rates` for `--secs` seconds.
//! 3. Freshness: a TVL value for one protocol on its own chain is produced every 20 ms and
//!    `/v2/historicalChainTvl/<chain>` polled until it shows (the time from handing the record
//!    to the producer to the first answer that has it).
//! 4. PostgreSQL (a private server): `protocol_tvl` holds `--pg-points` hourly values of the
//!    same protocols × chains; the query a user would write for `/v2/chains` today (latest value
//!    per protocol and chain, summed per chain) is timed 10 times.
//!
//! ```sh
//! benches/api.sh                      # builds, then runs this with the defaults
//! target/release/examples/api_bench --protocols 10000 --chains 100 --rates 1000,20000 --secs 10
//! ```

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Event time of the history (2024-06-03T00:00:00Z), seconds.
const T0: i64 = 1_717_372_800;
/// Coins of the price firehose.
const COINS: u64 = 20_000;

struct Args {
    protocols: usize,
    chains: usize,
    ticks: u64,
    rates: Vec<u64>,
    secs: u64,
    conns: usize,
    workers: u32,
    pg_points: usize,
    batch_ms: u64,
    probes: usize,
    llamaflow: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: api_bench [--protocols 10000] [--chains 100] [--ticks 50000] [--rates 1000,20000] [--secs 10] \
         [--conns 32] [--workers 1] [--batch-ms 1] [--probes 200] [--pg-points 4 (0: skip PostgreSQL)] [--llamaflow PATH]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        protocols: 10_000,
        chains: 100,
        ticks: 50_000,
        rates: vec![1_000, 20_000],
        secs: 10,
        conns: 32,
        workers: 1,
        pg_points: 4,
        batch_ms: 1,
        probes: 200,
        llamaflow: testkit::llamaflow_beside_example(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().unwrap_or_else(|| usage());
        let num = |v: &str| v.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--protocols" => a.protocols = num(&val) as usize,
            "--chains" => a.chains = num(&val) as usize,
            "--ticks" => a.ticks = num(&val),
            "--rates" => a.rates = val.split(',').map(num).collect(),
            "--secs" => a.secs = num(&val),
            "--conns" => a.conns = num(&val) as usize,
            "--workers" => a.workers = num(&val) as u32,
            "--pg-points" => a.pg_points = num(&val) as usize,
            "--batch-ms" => a.batch_ms = num(&val),
            "--probes" => a.probes = num(&val) as usize,
            "--llamaflow" => a.llamaflow = PathBuf::from(val),
            _ => usage(),
        }
    }
    if a.protocols == 0 || a.chains == 0 || a.conns == 0 || a.rates.is_empty() {
        usage()
    }
    a
}

/// Chain keys: the shipped table's first, then made-up ones.
fn chain_keys(n: usize) -> Vec<String> {
    schemas::chains::CHAINS
        .iter()
        .map(|c| c.key.to_string())
        .chain((0..).map(|i| format!("chain{i}")))
        .take(n)
        .collect()
}

/// The TVL of protocol `p` on chain `c` at point `h`.
fn tvl_of(p: usize, c: usize, h: usize) -> f64 {
    ((p * 7919 + c * 104_729 + h * 31) % 10_000_000) as f64 * 10.0 + 0.25
}

/// One GET on a keep-alive connection; returns the status and body length.
async fn get(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, path: &str) -> std::io::Result<(u16, usize)> {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    buf.clear();
    let mut chunk = [0u8; 65536];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= head_end + 4 + len {
            let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            return Ok((code, len));
        }
    }
}

/// The body and as-of of a GET (a fresh connection), for setup and polling.
fn get_body(port: u16, path: &str) -> (String, i64) {
    let r = testkit::http_get(port, path);
    let as_of = r.header("x-llamaflow-as-of").and_then(|v| v.parse().ok()).unwrap_or(-1);
    (r.body, as_of)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1e3
}

/// What one load phase measured.
struct Phase {
    /// Request written → answer read, µs, sorted.
    latency: Vec<u64>,
    /// Scheduled instant → request written, µs, sorted: how late the generator itself was
    /// (tokio's timer has 1 ms resolution; a server that stalls makes this grow too).
    lag: Vec<u64>,
    errors: u64,
    secs: f64,
}

/// Runs the open-loop load at `rate` requests/s for `secs`.
fn load(rt: &tokio::runtime::Runtime, port: u16, conns: usize, rate: u64, secs: u64) -> Phase {
    let total = rate * secs;
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(50);
    let paths = [
        "/v2/chains".to_string(),
        "/prices/current/coingecko:bench-1,coingecko:bench-2,coingecko:bench-3".to_string(),
        "/categories".to_string(),
    ];
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (next, errors, paths) = (next.clone(), errors.clone(), paths.clone());
            rt.spawn(async move {
                let (mut lat, mut lag) = (Vec::new(), Vec::new());
                let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .expect("connects");
                stream.set_nodelay(true).ok();
                let mut buf = Vec::with_capacity(1 << 16);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    let sent = Instant::now();
                    lag.push(sent.saturating_duration_since(due).as_micros() as u64);
                    match get(&mut stream, &mut buf, &paths[(i % 3) as usize]).await {
                        Ok((200, _)) => lat.push(sent.elapsed().as_micros() as u64),
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                                stream = s;
                            }
                        }
                    }
                }
                (lat, lag)
            })
        })
        .collect();
    let (mut latency, mut lag) = (Vec::with_capacity(total as usize), Vec::with_capacity(total as usize));
    for t in tasks {
        let (a, b) = rt.block_on(t).expect("load task");
        latency.extend(a);
        lag.extend(b);
    }
    let secs = start.elapsed().as_secs_f64();
    latency.sort_unstable();
    lag.sort_unstable();
    Phase {
        latency,
        lag,
        errors: errors.load(Ordering::Relaxed),
        secs,
    }
}

fn main() {
    let args = parse_args();
    if !args.llamaflow.exists() {
        eprintln!(
            "{} not found: build it first or pass --llamaflow",
            args.llamaflow.display()
        );
        std::process::exit(2);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let chains = chain_keys(args.chains);
    let categories: Vec<String> = (0..20).map(|i| format!("Category {i}")).collect();
    // History: metadata and one TVL value per protocol and chain.
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.path().join("protocols.jsonl")).unwrap());
        for p in 0..args.protocols {
            writeln!(
                f,
                r#"{{"id":"{p}","name":"Protocol {p}","slug":"protocol-{p}","category":"{}","chains":[]}}"#,
                categories[p % categories.len()]
            )
            .unwrap();
        }
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.path().join("tvl.jsonl")).unwrap());
        for p in 0..args.protocols {
            for (c, chain) in chains.iter().enumerate() {
                writeln!(
                    f,
                    r#"{{"protocol_id":"{p}","chain":"{chain}","tvl":{},"timestamp":{T0}}}"#,
                    tvl_of(p, c, 0)
                )
                .unwrap();
            }
        }
    }
    let cluster = MockCluster::new(1).expect("mock cluster starts");
    cluster.create_topic("prices", 4, 1).expect("topic");
    cluster.create_topic("tvl", 1, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();
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
checkpoint_dir = ""

[[sources.files]]
kind = "protocols"
path = "{d}/protocols.jsonl"

[[sources.files]]
kind = "tvl"
path = "{d}/tvl.jsonl"

[sources.kafka]
brokers = "{brokers}"
group_id = "api-bench"
topics = {{ prices = "prices", tvl = "tvl", transfers = "", gas = "", liquidations = "" }}
extra = {{ "fetch.wait.max.ms" = "5" }}

[sinks]
stdout = false
"#,
            workers = args.workers,
            batch_ms = args.batch_ms,
            d = dir.path().display(),
        ),
    )
    .unwrap();
    let log = dir.path().join("llamaflow.log");
    let loading = Instant::now();
    let job = testkit::KillOnDrop(
        Command::new(&args.llamaflow)
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("llamaflow starts"),
    );
    let pid = job.0.id();
    assert!(
        testkit::wait_for_port(port, Duration::from_secs(120)),
        "no listener; see {}",
        log.display()
    );
    while get_body(port, "/v2/chains").1 != T0 * 1000 {
        assert!(
            loading.elapsed() < Duration::from_secs(600),
            "history not loaded; see {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss = testkit::status_kib(pid, "VmRSS:");
    println!(
        "live state: {} protocols × {} chains = {} values, loaded in {:.1} s; llamaflow RSS {:.0} MiB",
        args.protocols,
        args.chains,
        args.protocols * args.chains,
        loading.elapsed().as_secs_f64(),
        rss as f64 / 1024.0
    );

    // The firehose: ticks/s of prices and 200 TVL updates/s, on their own thread.
    let stop = Arc::new(AtomicBool::new(false));
    let fresh_sent: Arc<Vec<AtomicU64>> = Arc::new((0..args.probes).map(|_| AtomicU64::new(0)).collect());
    let clock = Instant::now();
    let producer_thread = {
        let (stop, brokers, ticks, fresh_sent) = (stop.clone(), brokers.clone(), args.ticks, fresh_sent.clone());
        let (protocols, chains) = (args.protocols, chains.clone());
        std::thread::spawn(move || {
            let producer: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("linger.ms", "1")
                .set("queue.buffering.max.messages", "1000000")
                .create()
                .expect("producer");
            let started = Instant::now();
            let (mut seq, mut tvl_seq, mut fresh) = (0u64, 0u64, 0usize);
            let mut payload = String::with_capacity(160);
            let send = |topic: &str, key: &str, payload: &str| {
                let mut record = BaseRecord::to(topic).key(key).payload(payload);
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((_, r)) => {
                            producer.poll(Duration::from_millis(1));
                            record = r;
                        }
                    }
                }
            };
            while !stop.load(Ordering::Relaxed) {
                let secs = started.elapsed().as_secs_f64();
                let ts_ms = T0 * 1000 + 1000 + started.elapsed().as_millis() as i64;
                while seq < (secs * ticks as f64) as u64 {
                    let coin = format!("coingecko:bench-{}", seq % COINS);
                    payload.clear();
                    payload.push_str(&format!(
                        r#"{{"coin":"{coin}","price":{},"timestamp":{}.{:03}}}"#,
                        100.0 + (seq % 1000) as f64 / 100.0,
                        ts_ms / 1000,
                        ts_ms % 1000
                    ));
                    send("prices", &coin, &payload);
                    seq += 1;
                }
                while tvl_seq < (secs * 200.0) as u64 {
                    let (p, c) = (
                        (tvl_seq as usize * 37) % protocols,
                        (tvl_seq as usize * 11) % chains.len(),
                    );
                    payload.clear();
                    payload.push_str(&format!(
                        r#"{{"protocol_id":"{p}","chain":"{}","tvl":{},"timestamp":{}.{:03}}}"#,
                        chains[c],
                        tvl_of(p, c, tvl_seq as usize),
                        ts_ms / 1000,
                        ts_ms % 1000
                    ));
                    send("tvl", &p.to_string(), &payload);
                    tvl_seq += 1;
                }
                // Freshness probes, one every 20 ms once asked for.
                if fresh < fresh_sent.len() && fresh_sent[fresh].load(Ordering::Relaxed) == u64::MAX {
                    payload.clear();
                    payload.push_str(&format!(
                        r#"{{"protocol_id":"fresh","chain":"freshchain","tvl":{},"timestamp":{}.{:03}}}"#,
                        1000 + fresh,
                        ts_ms / 1000,
                        ts_ms % 1000
                    ));
                    let at = clock.elapsed().as_micros() as u64;
                    send("tvl", "fresh", &payload);
                    producer.poll(Duration::ZERO);
                    fresh_sent[fresh].store(at, Ordering::Relaxed);
                    fresh += 1;
                }
                producer.poll(Duration::ZERO);
                std::thread::sleep(Duration::from_micros(500));
            }
            let _ = producer.flush(Duration::from_secs(5));
        })
    };
    // Let the consumer group form and the firehose settle.
    let settle = Instant::now();
    while !get_body(port, "/prices/current/coingecko:bench-1").0.contains("price") {
        assert!(
            settle.elapsed() < Duration::from_secs(60),
            "no prices through Kafka; see {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut chains_p50 = f64::NAN;
    for &rate in &args.rates {
        let (cpu0, _) = testkit::cpu_secs(pid);
        let ph = load(&rt, port, args.conns, rate, args.secs);
        let (cpu1, _) = testkit::cpu_secs(pid);
        let lat = &ph.latency;
        println!(
            "read API at {rate:>6} req/s offered (ingesting {} ticks/s): {:>7.0} req/s answered, p50 {:.3} ms, p99 {:.3} ms, \
             p99.9 {:.3} ms, max {:.3} ms, {} errors; generator lag p50 {:.3} ms, p99 {:.3} ms; llamaflow CPU {:.0}% (user)",
            args.ticks,
            lat.len() as f64 / ph.secs,
            pct(lat, 0.5),
            pct(lat, 0.99),
            pct(lat, 0.999),
            lat.last().map_or(f64::NAN, |v| *v as f64 / 1e3),
            ph.errors,
            pct(&ph.lag, 0.5),
            pct(&ph.lag, 0.99),
            (cpu1 - cpu0) / ph.secs * 100.0,
        );
        if chains_p50.is_nan() {
            // /v2/chains alone, at the lowest rate's pace, for the PostgreSQL comparison.
            let mut one = Vec::new();
            rt.block_on(async {
                let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .expect("connects");
                let mut buf = Vec::new();
                for _ in 0..200 {
                    let t = Instant::now();
                    get(&mut s, &mut buf, "/v2/chains").await.expect("answers");
                    one.push(t.elapsed().as_micros() as u64);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            });
            one.sort_unstable();
            chains_p50 = pct(&one, 0.5);
            println!(
                "/v2/chains alone (200 requests, one connection): p50 {:.3} ms, p99 {:.3} ms",
                chains_p50,
                pct(&one, 0.99)
            );
        }
    }

    // Freshness: a TVL record handed to the producer → its value in the API.
    let mut fresh_lat = Vec::new();
    for (i, sent) in fresh_sent.iter().enumerate() {
        // Arm probe i: the producer sends it and notes when.
        sent.store(u64::MAX, Ordering::Relaxed);
        let want = format!(r#""tvl":{}"#, 1000 + i);
        let deadline = Instant::now() + Duration::from_secs(2);
        while sent.load(Ordering::Relaxed) == u64::MAX && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
        let mut seen = None;
        while Instant::now() < deadline {
            let (body, _) = get_body(port, "/v2/historicalChainTvl/freshchain");
            if body.contains(&want) {
                seen = Some(clock.elapsed().as_micros() as u64);
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if let Some(seen) = seen {
            fresh_lat.push(seen.saturating_sub(sent.load(Ordering::Relaxed)));
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    fresh_lat.sort_unstable();
    println!(
        "freshness (TVL record produced → visible in the API), {} of {} probes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        fresh_lat.len(),
        fresh_sent.len(),
        pct(&fresh_lat, 0.5),
        pct(&fresh_lat, 0.99),
        fresh_lat.last().map_or(f64::NAN, |v| *v as f64 / 1e3)
    );
    stop.store(true, Ordering::Relaxed);
    let _ = producer_thread.join();
    drop(job);

    if args.pg_points == 0 {
        return;
    }
    // PostgreSQL: the same state as rows of protocol_tvl, the query a user would write.
    let pg = testkit::Postgres::start();
    let out = Command::new(&args.llamaflow)
        .args(["migrate", "--database-url", &pg.url()])
        .output()
        .expect("migrate runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = dir.path().join("protocol_tvl.csv");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&csv).unwrap());
        for p in 0..args.protocols {
            for (c, chain) in chains.iter().enumerate() {
                for h in 0..args.pg_points {
                    let t = T0 - ((args.pg_points - 1 - h) as i64) * 3600;
                    let v = if h + 1 == args.pg_points {
                        tvl_of(p, c, 0)
                    } else {
                        tvl_of(p, c, h + 1)
                    };
                    writeln!(f, "{p},{chain},{t},{v}").unwrap();
                }
            }
        }
    }
    let psql = |sql: &str| {
        let out = Command::new(testkit::pg_bin_dir().join("psql"))
            .args([&pg.url(), "-v", "ON_ERROR_STOP=1", "-tAc", sql])
            .output()
            .expect("psql runs");
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let copy = Instant::now();
    psql("CREATE UNLOGGED TABLE staging (p text, c text, t bigint, v float8)");
    psql(&format!("\\copy staging FROM '{}' WITH (FORMAT csv)", csv.display()));
    psql(
        "INSERT INTO protocol_tvl (protocol_id, chain, timestamp, tvl) SELECT p, c, to_timestamp(t), v FROM staging; \
         DROP TABLE staging; ANALYZE protocol_tvl",
    );
    let rows = psql("SELECT count(*) FROM protocol_tvl");
    println!(
        "PostgreSQL: {rows} rows of protocol_tvl loaded in {:.1} s",
        copy.elapsed().as_secs_f64()
    );
    let query = "SELECT chain, sum(tvl) AS tvl FROM (SELECT DISTINCT ON (protocol_id, chain) protocol_id, chain, tvl \
                 FROM protocol_tvl ORDER BY protocol_id, chain, timestamp DESC) latest GROUP BY chain ORDER BY tvl DESC";
    // Server-side execution time of each run (psql's \\timing), not the client's start-up.
    let mut cmd = Command::new(testkit::pg_bin_dir().join("psql"));
    cmd.args([&pg.url(), "-v", "ON_ERROR_STOP=1", "-tA", "-c", "\\timing on"]);
    for _ in 0..10 {
        cmd.args(["-c", &format!("SELECT count(*) FROM ({query}) q")]);
    }
    let out = cmd.output().expect("psql runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut pg_ms: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("Time: "))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| (ms * 1000.0) as u64)
        .collect();
    pg_ms.sort_unstable();
    println!(
        "PostgreSQL /v2/chains query ({} protocols × {} chains × {} points): p50 {:.1} ms, max {:.1} ms (psql \\timing); \
         llamaflow /v2/chains p50 {:.3} ms → {:.0}× faster",
        args.protocols,
        args.chains,
        args.pg_points,
        pct(&pg_ms, 0.5),
        pg_ms.last().map_or(f64::NAN, |v| *v as f64 / 1e3),
        chains_p50,
        pct(&pg_ms, 0.5) / chains_p50
    );
}
