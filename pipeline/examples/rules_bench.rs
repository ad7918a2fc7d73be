//! Rules at scale (performance issue, benchmark 4): with 1,000,000 active alert rules in
//! Postgres, how long after a rule change's COMMIT does its effect reach the user?
//!
//! Starts a private PostgreSQL (`testkit`), runs `llamaflow migrate`, loads the rules with one
//! `INSERT … SELECT … FROM generate_series` (after `setseed`, so the rule set is fixed: 55 %
//! `price_change`, 30 % `price_threshold`, the rest depeg / tvl_change / whale / gas /
//! liquidation, over 20,000 coins with a popularity skew, 100,000 users; 1,000 of them watch
//! the probe coin and never fire), vacuums it, and starts a Kafka mock cluster in this
//! process. A producer thread sends the probe coin's price every millisecond, alternating
//! 100.00 / 100.01 (so a `price_threshold` rule `> 100.005` crosses on every second tick), on
//! a partition of its own, plus `--background` ticks/s over the other coins.
//!
//! Then, per CDC poll interval (`--poll-ms 100,10`): `llamaflow run` reads the rules through
//! `[sources.postgres_cdc]` (snapshot of every row, then the slot); the bench times the load
//! (snapshot read = until llamaflow's start-up banner, rules sequenced = `/metrics`, first
//! alert of a snapshot rule = the dataflow holds them and live ticks flow) and reads the
//! process's peak RSS (`VmHWM`, and `VmRSS` sampled per phase). Then it makes `--changes`
//! rule changes, one at a time after a random 150–450 ms pause: inserts of new rules,
//! threshold updates and enables (effect: the rule's first alert), and deletes / disables of
//! a rule firing on every up-tick (effect: its alerts stop; timed to the last alert received,
//! which is within one up-tick, 2 ms, of the change taking effect). Latency = the instant a
//! WebSocket client (API key of the rules' user, subscribed to `alerts`) receives the effect
//! − the instant the statement's COMMIT returned, both on this process's monotonic clock; the
//! same at llamaflow's stdout is printed beside it. The changes run with
//! `synchronous_commit = on` (testkit's server default is off, which delays the WAL flush and
//! so logical decoding by up to `wal_writer_delay`; `--async-commit` shows that).
//!
//! Where the time goes, without instrumenting llamaflow: the alert's `triggered_at` is the
//! event time of the first tick the new rule matched, stamped by the producer with the wall
//! clock, so `triggered_at − commit` is how long the change took to enter the ingest front
//! (CDC poll + decode) and `received − triggered_at` the tick's own way (producer linger,
//! Kafka, the ingest batch, the dataflow, the WebSocket). A second WebSocket connection takes
//! the probe's `price_update` frames: their latency is the tick path alone, and pauses of more
//! than 100 ms in that steady stream are stalls of the pipeline. Each change also records
//! `llamaflow_checkpoint_age_seconds` before its commit, to tie slow ones to checkpoints.
//!
//! Kafka mock caveats, handled here: its broker answers an empty fetch only after
//! `fetch.wait.max.ms` (a real one answers when data arrives), so the job's consumer gets
//! `fetch.wait.max.ms = 1`; and it hands out one producer batch per partition and fetch, so
//! the producer lingers `--linger-ms` (5) to batch ticks. A consumer that fell behind on a
//! loaded machine still catches up slowly; ticks then arrive late but steadily, which leaves
//! the change latencies valid but not their split (it is then not printed).
//!
//! ```sh
//! benches/rules.sh                                  # builds, then runs this with the defaults
//! target/release/examples/rules_bench --rules 1000000 --changes 100 --poll-ms 100,10
//! target/release/examples/rules_bench --poll-ms 10 --checkpoint-ms 0    # without checkpoints
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tokio_tungstenite::tungstenite::Message;

/// The probe coin: its ticks alternate between `PROBE_LOW` and `PROBE_HIGH`.
const PROBE: &str = "coingecko:bench-probe";
const PROBE_LOW: f64 = 100.0;
const PROBE_HIGH: f64 = 100.01;
/// Its WebSocket channel.
const PROBE_PRICES: &str = "prices:coingecko:bench-probe";
/// Owner of every rule the bench watches, and its API key.
const USER: &str = "bench";
const API_KEY: &str = "bench-key";
/// A rule of the snapshot that fires on the first up-tick once the rules are loaded.
const LOAD_MARKER: &str = "probe-load";
/// Conditions of a rule that fires on every up-tick of the probe coin.
const FIRING: &str = r#"{"coin":"coingecko:bench-probe","operator":">","value":100.005}"#;
/// Conditions of a rule that never fires (until its threshold is updated).
const SILENT: &str = r#"{"coin":"coingecko:bench-probe","operator":">","value":1000000000}"#;
/// `prices` partitions of the background feed; the probe has partition 0 to itself (the mock
/// broker returns one producer batch per partition and fetch, so the probe's ticks never
/// wait behind background ones).
const BG_PARTITIONS: u64 = 3;
/// Owners of the generated rules.
const USERS: u64 = 100_000;
/// A change's effect must show within this.
const EFFECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A pause this long in the probe's price stream counts as a stall.
const GAP: Duration = Duration::from_millis(100);
/// A stop counts as effective once its rule has been quiet this long.
const QUIET: Duration = Duration::from_millis(400);

/// Command-line settings.
struct Args {
    rules: u64,
    coins: u64,
    probe_rules: u64,
    changes: usize,
    polls: Vec<u64>,
    workers: u32,
    batch_ms: Option<u64>,
    /// `Some(0)`: no checkpoints; `None`: llamaflow's default.
    checkpoint_ms: Option<u64>,
    background: u64,
    linger_ms: u64,
    seed: u64,
    async_commit: bool,
    /// Seconds without rule changes, before the changes, over which the checkpoints' CPU is
    /// measured.
    idle_secs: u64,
    llamaflow: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: rules_bench [--rules 1000000] [--coins 20000] [--probe-rules 1000] [--changes 100] \
         [--poll-ms 100,10] [--workers 2] [--batch-ms N] [--checkpoint-ms N (0: none)] \
         [--background 1000 (ticks/s)] [--linger-ms 5] [--seed 42] [--async-commit] [--idle-secs 20] \
         [--llamaflow PATH]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        rules: 1_000_000,
        coins: 20_000,
        probe_rules: 1_000,
        changes: 100,
        polls: vec![100, 10],
        workers: 2,
        batch_ms: None,
        checkpoint_ms: None,
        background: 1_000,
        linger_ms: 5,
        seed: 42,
        async_commit: false,
        idle_secs: 20,
        llamaflow: testkit::llamaflow_beside_example(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--async-commit" {
            a.async_commit = true;
            continue;
        }
        let val = it.next().unwrap_or_else(|| usage());
        let num = |v: &str| v.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--rules" => a.rules = num(&val),
            "--coins" => a.coins = num(&val),
            "--probe-rules" => a.probe_rules = num(&val),
            "--changes" => a.changes = num(&val) as usize,
            "--poll-ms" => a.polls = val.split(',').map(num).collect(),
            "--workers" => a.workers = num(&val) as u32,
            "--batch-ms" => a.batch_ms = Some(num(&val)),
            "--checkpoint-ms" => a.checkpoint_ms = Some(num(&val)),
            "--background" => a.background = num(&val),
            "--linger-ms" => a.linger_ms = num(&val),
            "--seed" => a.seed = num(&val),
            "--idle-secs" => a.idle_secs = num(&val),
            "--llamaflow" => a.llamaflow = PathBuf::from(val),
            _ => usage(),
        }
    }
    let fixed = 1 + a.polls.len() as u64 * a.changes as u64;
    if a.polls.is_empty() || a.polls.contains(&0) || a.coins == 0 || a.rules < a.probe_rules + fixed {
        usage()
    }
    a
}

/// Wall clock in ms (event times and commit times are compared on it).
fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A small deterministic generator (pauses, background coins).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.next() as f64 / (1u64 << 31) as f64
    }
}

/// What a rule change does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// INSERT of a new rule that fires.
    Insert,
    /// UPDATE of a silent rule's threshold so that it fires.
    Threshold,
    /// UPDATE enabled false → true of a rule that fires on every up-tick (throttle 0).
    Enable,
    /// DELETE of the rule enabled two changes before.
    Delete,
    /// UPDATE enabled true → false of the rule enabled two changes before.
    Disable,
}

impl Change {
    /// The change number `i` of a run makes: per 10, 4 inserts, 2 threshold updates, 2
    /// enables and 2 stops (one delete, one disable) of the rule enabled two changes before.
    fn nth(i: usize) -> Change {
        match i % 10 {
            0 | 3 | 5 | 8 => Change::Insert,
            1 | 6 => Change::Threshold,
            2 | 7 => Change::Enable,
            4 => Change::Delete,
            _ => Change::Disable,
        }
    }

    fn starts(self) -> bool {
        matches!(self, Change::Insert | Change::Threshold | Change::Enable)
    }

    fn name(self) -> &'static str {
        match self {
            Change::Insert => "insert",
            Change::Threshold => "threshold",
            Change::Enable => "enable",
            Change::Delete => "delete",
            Change::Disable => "disable",
        }
    }
}

/// Id of the rule change `i` of run `run` acts on.
fn target(run: usize, i: usize) -> String {
    match Change::nth(i) {
        Change::Delete | Change::Disable => format!("b{run}-{}", i - 2),
        _ => format!("b{run}-{i}"),
    }
}

/// The rules: `n` generated ones (`probe` of them on the probe coin, never firing), then the
/// load marker and the rules each run's changes update.
fn rules_sql(a: &Args) -> (String, String) {
    let fixed = 1 + a.polls.len() * a.changes;
    let n = a.rules - fixed as u64;
    // setseed takes [-1, 1].
    let seed = (a.seed % 1_000_000) as f64 / 1_000_000.0;
    let generated = format!(
        r#"SELECT setseed({seed});
INSERT INTO alert_rules (id, user_id, name, alert_type, conditions, throttle_minutes)
SELECT 'r' || i, 'u' || (1 + floor(a * {USERS})::int), 'rule ' || i, kind,
  CASE kind
    WHEN 'price_change' THEN jsonb_build_object('coin', coin, 'window', win,
      'threshold_pct', round((1 + d * 19)::numeric, 1), 'direction', dir)
    WHEN 'price_threshold' THEN jsonb_build_object('coin', coin, 'operator', op, 'value',
      round((base * CASE WHEN op IN ('>', '>=') THEN 1.05 + d * 0.5 ELSE 0.95 - d * 0.45 END)::numeric, 6))
    WHEN 'depeg' THEN jsonb_build_object('coin', (ARRAY['coingecko:tether', 'coingecko:usd-coin',
      'coingecko:dai', 'coingecko:frax', 'coingecko:true-usd', 'coingecko:paypal-usd'])[1 + floor(c * 6)::int],
      'peg', 1.0, 'deviation_pct', round((0.5 + d * 4.5)::numeric, 2))
    WHEN 'tvl_change' THEN jsonb_build_object('protocol_id', protocol, 'window', win,
      'threshold_pct', round((2 + d * 28)::numeric, 1), 'direction', dir)
      || CASE WHEN e < 0.2 THEN jsonb_build_object('chain', chain) ELSE '{{}}'::jsonb END
    WHEN 'whale_movement' THEN jsonb_build_object('coin', coin, 'min_usd', round((100000 + d * 9900000)::numeric))
      || CASE WHEN e < 0.3 THEN jsonb_build_object('chain', chain) ELSE '{{}}'::jsonb END
    WHEN 'gas_price' THEN jsonb_build_object('chain', chain, 'operator', op, 'gwei', round((5 + d * 195)::numeric, 1))
    ELSE jsonb_build_object('protocol_id', protocol, 'min_usd', round((50000 + d * 4950000)::numeric))
  END,
  (ARRAY[5, 15, 30, 60])[1 + floor(f * 4)::int]
FROM (
  SELECT i, a, c, d, e, f,
    CASE WHEN i <= {probe} THEN CASE WHEN k < 0.6 THEN 'price_change' ELSE 'price_threshold' END
      WHEN k < 0.55 THEN 'price_change' WHEN k < 0.85 THEN 'price_threshold' WHEN k < 0.89 THEN 'depeg'
      WHEN k < 0.94 THEN 'tvl_change' WHEN k < 0.97 THEN 'whale_movement' WHEN k < 0.99 THEN 'gas_price'
      ELSE 'liquidation' END AS kind,
    CASE WHEN i <= {probe} THEN '{PROBE}' ELSE 'coingecko:coin' || floor(b * b * {coins})::int END AS coin,
    CASE WHEN i <= {probe} THEN {PROBE_LOW:.1} ELSE 1 + (floor(b * b * {coins})::int * 7919 % 10000) / 10.0 END AS base,
    (1 + floor(b * b * 3000)::int)::text AS protocol,
    (ARRAY['ethereum', 'arbitrum', 'optimism', 'polygon', 'bsc', 'avalanche', 'base', 'fantom', 'gnosis',
      'linea'])[1 + floor(c * 10)::int] AS chain,
    (ARRAY['5m', '15m', '1h', '4h', '24h', '7d'])[1 + floor(c * 6)::int] AS win,
    (ARRAY['up', 'down', 'any'])[1 + floor(e * 3)::int] AS dir,
    (ARRAY['>', '>=', '<', '<='])[1 + floor(e * 4)::int] AS op
  FROM (SELECT i, random() AS a, random() AS b, random() AS c, random() AS d, random() AS e, random() AS f,
      random() AS k FROM generate_series(1, {n}) AS i) r
) s"#,
        probe = a.probe_rules,
        coins = a.coins,
    );
    let row = |id: &str, user: &str, cond: &str, enabled: bool, throttle: u32| {
        format!("('{id}', '{user}', '{id}', 'price_threshold', '{cond}', {enabled}, {throttle})")
    };
    let mut rows = vec![row(LOAD_MARKER, USER, FIRING, true, 1440)];
    for run in 0..a.polls.len() {
        for i in 0..a.changes {
            match Change::nth(i) {
                Change::Threshold => rows.push(row(&target(run, i), USER, SILENT, true, 60)),
                Change::Enable => rows.push(row(&target(run, i), USER, FIRING, false, 0)),
                _ => {}
            }
        }
    }
    // The inserted rules are not there yet: in their place, silent rules of other users on the
    // probe coin, so that the table holds exactly `rules` rows.
    for p in rows.len()..fixed {
        rows.push(row(&format!("pad-{p}"), &format!("u{p}"), SILENT, true, 60));
    }
    let fixed_sql = format!(
        "INSERT INTO alert_rules (id, user_id, name, alert_type, conditions, enabled, throttle_minutes) VALUES {}",
        rows.join(", ")
    );
    (generated, fixed_sql)
}

/// Base price of background coin `k` (the same formula as the rules' thresholds).
fn base_price(k: u64) -> f64 {
    1.0 + ((k * 7919) % 10_000) as f64 / 10.0
}

/// Sends the probe tick every millisecond and `background` ticks/s over the other coins,
/// each stamped with the wall clock, until `stop`.
fn produce(producer: BaseProducer, coins: u64, background: u64, seed: u64, stop: Arc<AtomicBool>) {
    let mut rng = Lcg(seed ^ 0x5eed);
    let mut prices: Vec<f64> = (0..coins).map(base_price).collect();
    let mut last_ts = vec![0i64; coins as usize];
    let mut probe_ts = 0i64;
    let mut up = false;
    let started = Instant::now();
    let mut sent_bg = 0u64;
    let mut payload = String::with_capacity(128);
    let send = |producer: &BaseProducer, partition: i32, key: &str, payload: &str| {
        let mut record = BaseRecord::to("prices").partition(partition).key(key).payload(payload);
        loop {
            match producer.send(record) {
                Ok(()) => return,
                Err((e, r)) => {
                    assert!(
                        matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ),
                        "producing a tick: {e}"
                    );
                    producer.poll(Duration::from_millis(1));
                    record = r;
                }
            }
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let now = wall_ms() as i64;
        if now > probe_ts {
            probe_ts = now;
            up = !up;
            let price = if up { PROBE_HIGH } else { PROBE_LOW };
            payload.clear();
            payload.push_str(&format!(
                r#"{{"coin":"{PROBE}","price":{price},"timestamp":{}.{:03},"symbol":"PROBE"}}"#,
                now / 1000,
                now % 1000
            ));
            send(&producer, 0, PROBE, &payload);
        }
        let due = (started.elapsed().as_secs_f64() * background as f64) as u64;
        while sent_bg < due {
            sent_bg += 1;
            let k = rng.next() % coins;
            let p = &mut prices[k as usize];
            *p *= 1.0 + (rng.unit() - 0.5) * 0.004;
            let ts = now.max(last_ts[k as usize] + 1);
            last_ts[k as usize] = ts;
            let coin = format!("coingecko:coin{k}");
            payload.clear();
            payload.push_str(&format!(
                r#"{{"coin":"{coin}","price":{:.6},"timestamp":{}.{:03}}}"#,
                *p,
                ts / 1000,
                ts % 1000
            ));
            send(&producer, 1 + (k % BG_PARTITIONS) as i32, &coin, &payload);
        }
        producer.poll(Duration::ZERO);
        std::thread::sleep(Duration::from_micros(400));
    }
    let _ = producer.flush(Duration::from_secs(2));
}

/// When one observer first and last saw each rule's alerts.
#[derive(Default)]
struct Seen {
    /// Rule id → (first receipt, its `triggered_at` in ms).
    first: HashMap<String, (Instant, f64)>,
    last: HashMap<String, Instant>,
    alerts: u64,
}

impl Seen {
    fn record(&mut self, alert: &Value, at: Instant) {
        let Some(rule) = alert.get("rule_id").and_then(Value::as_str) else {
            return;
        };
        let trig = alert.get("triggered_at").and_then(Value::as_f64).unwrap_or(f64::NAN) * 1000.0;
        self.first.entry(rule.to_string()).or_insert((at, trig));
        self.last.insert(rule.to_string(), at);
        self.alerts += 1;
    }
}

/// What the WebSocket client and the stdout reader saw.
#[derive(Default)]
struct Observed {
    ws: Mutex<Seen>,
    stdout: Mutex<Seen>,
    ws_ready: AtomicBool,
    /// Probe `price_update` latencies (receipt − event time, ms) while `record_ticks`.
    ticks: Mutex<Vec<f64>>,
    /// Gaps > `GAP` between consecutive probe `price_update` frames while `record_ticks`, ms:
    /// the tick stream is steady, so a gap is a stall of the pipeline.
    gaps: Mutex<Vec<f64>>,
    record_ticks: AtomicBool,
}

/// A WebSocket client of the bench user on one channel: `alerts` (the effects) or the probe's
/// prices (the tick path), on separate connections so that the busy price stream can never
/// get the alerts connection closed as too slow (1013). Reconnects when closed.
async fn ws_client(port: u16, channel: &'static str, obs: Arc<Observed>, stop: Arc<AtomicBool>) {
    let url = format!("ws://127.0.0.1:{port}/ws?api_key={API_KEY}");
    while !stop.load(Ordering::Relaxed) {
        let mut ws = match tokio_tungstenite::connect_async(&url).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                eprintln!("WebSocket ({channel}): cannot connect: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let sub = format!(r#"{{"type":"subscribe","channels":["{channel}"]}}"#);
        if ws.send(Message::text(sub)).await.is_err() {
            continue;
        }
        let mut last_tick: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            let msg = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(m))) => m,
                Ok(other) => {
                    eprintln!("WebSocket ({channel}): connection ended ({other:?}); reconnecting");
                    break;
                }
            };
            let at = Instant::now();
            let text = match msg {
                Message::Text(t) => t,
                Message::Close(frame) => {
                    if !stop.load(Ordering::Relaxed) {
                        eprintln!("WebSocket ({channel}): closed by the server: {frame:?}");
                    }
                    continue;
                }
                _ => continue,
            };
            let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) else {
                continue;
            };
            match frame.get("type").and_then(Value::as_str) {
                Some("alert") => {
                    if let Some(data) = frame.get("data") {
                        lock(&obs.ws).record(data, at);
                    }
                }
                Some("price_update") => {
                    if obs.record_ticks.load(Ordering::Relaxed)
                        && let Some(ts) = frame.get("timestamp").and_then(Value::as_f64)
                    {
                        lock(&obs.ticks).push(wall_ms() - ts);
                        if let Some(gap) = last_tick.map(|l| at.duration_since(l)).filter(|g| *g > GAP) {
                            lock(&obs.gaps).push(gap.as_secs_f64() * 1000.0);
                        }
                    }
                    last_tick = Some(at);
                }
                Some("subscribed") if channel == "alerts" => obs.ws_ready.store(true, Ordering::Relaxed),
                _ => {}
            }
        }
    }
}

/// `VmHWM` and `VmRSS` of a process, in MiB.
fn rss_mib(pid: u32) -> (u64, u64) {
    (
        testkit::status_kib(pid, "VmHWM:") / 1024,
        testkit::status_kib(pid, "VmRSS:") / 1024,
    )
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// How long llamaflow's snapshot SELECT of `alert_rules` took, from sqlx's slow-statement
/// warning (logged for statements over 1 s).
fn snapshot_query_secs(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .find(|l| l.contains("slow statement") && l.contains("FROM public.alert_rules"))?;
    // Drop ANSI colour codes, then read `elapsed_secs=<n>`.
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            plain.push(c);
        }
    }
    let at = plain.find("elapsed_secs=")? + "elapsed_secs=".len();
    plain[at..].split_whitespace().next()?.parse().ok()
}

/// The 1-minute load average (the machine is shared: a loaded one shows in the tails).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// User + system CPU seconds of a process.
/// CPU seconds (user + system) of `pid`'s threads named `name`.
fn thread_cpu_secs(pid: u32, name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter_map(|t| t.file_name().to_str()?.parse::<u32>().ok())
        .map(|tid| {
            let (user, system) = testkit::cpu_secs_of(&format!("/proc/{pid}/task/{tid}/stat"));
            user + system
        })
        .sum()
}

fn cpu_secs(pid: u32) -> f64 {
    let (user, system) = testkit::cpu_secs(pid);
    user + system
}

/// A sample of llamaflow's `/metrics` (the first line starting with `series`), if the server
/// answers.
fn metric(port: u16, series: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn summary(values: &[f64]) -> String {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    format!(
        "n {:>3}  p50 {:>6.1} ms  p99 {:>6.1}  max {:>6.1}",
        v.len(),
        pct(&v, 0.5),
        pct(&v, 0.99),
        v.last().copied().unwrap_or(f64::NAN)
    )
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    pct(&v, 0.5)
}

/// One measured change.
struct Sample {
    change: Change,
    /// COMMIT returned → effect at the WebSocket client, ms (`NAN`: timed out).
    ws_ms: f64,
    /// The same at llamaflow's stdout.
    stdout_ms: f64,
    /// COMMIT returned → event time of the first tick the rule matched (start changes), ms.
    to_tick_ms: f64,
    /// The statement's round trip, ms.
    rtt_ms: f64,
    /// When it was made, s after the first change.
    at_s: f64,
    /// `llamaflow_checkpoint_age_seconds` just before (time since the last checkpoint completed).
    ckpt_age_s: f64,
}

/// Everything one run needs.
struct Bench<'a> {
    args: &'a Args,
    pg: &'a testkit::Postgres,
    brokers: &'a str,
    dir: &'a Path,
    rt: &'a tokio::runtime::Runtime,
    rng: Lcg,
    /// Some change had no visible effect (the bench directory is then kept).
    failed: bool,
}

impl Bench<'_> {
    fn config(&self, run: usize, poll: u64, port: u16) -> PathBuf {
        let mut pipeline = format!(
            "workers = {}\nlisten = \"127.0.0.1:{port}\"\ndead_letter_out = \"{}\"\n",
            self.args.workers,
            self.dir.join(format!("dead-{run}.jsonl")).display()
        );
        match self.args.checkpoint_ms {
            Some(0) => pipeline.push_str("checkpoint_dir = \"\"\n"),
            other => {
                pipeline.push_str(&format!(
                    "checkpoint_dir = \"{}\"\n",
                    self.dir.join(format!("checkpoints-{run}")).display()
                ));
                if let Some(ms) = other {
                    pipeline.push_str(&format!("checkpoint_interval_ms = {ms}\n"));
                }
            }
        }
        if let Some(b) = self.args.batch_ms {
            pipeline.push_str(&format!("batch_ms = {b}\n"));
        }
        let text = format!(
            r#"[pipeline]
{pipeline}
[sources.kafka]
brokers = "{brokers}"
group_id = "rules-bench-{run}"
topics = {{ tvl = "", transfers = "", gas = "", liquidations = "" }}
assignment = [0, 1]
auto_offset_reset = "latest"
# librdkafka's mock broker answers a fetch that finds no data only after fetch.wait.max.ms
# (a real broker answers as soon as data arrives): keep that wait out of the figures.
extra = {{ "fetch.wait.max.ms" = "1" }}

[sources.postgres_cdc]
url = "{url}"
slot = "rules_bench_{run}"
poll_interval_ms = {poll}

[sinks]
stdout = true

[sinks.websocket]
api_keys = {{ "{API_KEY}" = "{USER}" }}
# The bench's price client takes 1,000 frames/s; after a stall it must not be dropped as slow.
send_queue = 100000
"#,
            brokers = self.brokers,
            url = self.pg.url(),
        );
        let path = self.dir.join(format!("llamaflow-{run}.toml"));
        std::fs::write(&path, text).expect("config written");
        path
    }

    /// `llamaflow run --config config`, its standard output and error piped or discarded.
    fn llamaflow(&self, config: &Path, piped: bool) -> testkit::KillOnDrop {
        let io = || if piped { Stdio::piped() } else { Stdio::null() };
        testkit::KillOnDrop(
            Command::new(&self.args.llamaflow)
                .args(["run", "--config"])
                .arg(config)
                .env("LLAMAFLOW_LOG", "warn")
                .stdout(io())
                .stderr(io())
                .spawn()
                .expect("llamaflow starts"),
        )
    }

    /// One `llamaflow run` with CDC polling every `poll` ms: load, then the changes.
    fn run(&mut self, run: usize, poll: u64) {
        let port = testkit::free_port();
        let config = self.config(run, poll, port);
        let log_path = self.dir.join(format!("llamaflow-{run}.log"));
        let obs = Arc::new(Observed::default());
        let stop = Arc::new(AtomicBool::new(false));
        println!(
            "\n== poll_interval_ms {poll} (run {run}; log {}; load average {})",
            log_path.display(),
            loadavg()
        );

        let spawned = Instant::now();
        let mut job = self.llamaflow(&config, true);
        let pid = job.0.id();
        let stdout = job.0.stdout.take().expect("piped stdout");
        let obs2 = obs.clone();
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                if let Ok(alert) = serde_json::from_str::<Value>(&line) {
                    lock(&obs2.stdout).record(&alert, at);
                }
            }
        });
        let stderr = job.0.stderr.take().expect("piped stderr");
        let banner: Arc<Mutex<Option<Instant>>> = Arc::default();
        let banner2 = banner.clone();
        let mut log = std::fs::File::create(&log_path).expect("log file");
        let err_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("dashboard http://") {
                    lock(&banner2).get_or_insert_with(Instant::now);
                }
                let _ = writeln!(log, "{line}");
            }
        });

        // Load: snapshot read (banner), rules sequenced (/metrics), first alert of a snapshot rule.
        let mut ws_tasks = Vec::new();
        let mut sequenced: Option<Instant> = None;
        // Highest RSS seen while reading the snapshot, sequencing it, and loading the dataflow.
        let mut phase_rss = [0u64; 3];
        let loaded = loop {
            if let Some(status) = job.0.try_wait().expect("child status") {
                panic!("llamaflow exited during the load ({status}):\n{}", tail(&log_path));
            }
            assert!(
                spawned.elapsed() < Duration::from_secs(600),
                "rules not loaded within 600 s; see {}",
                log_path.display()
            );
            let phase = if sequenced.is_some() {
                2
            } else if lock(&banner).is_some() {
                1
            } else {
                0
            };
            phase_rss[phase] = phase_rss[phase].max(rss_mib(pid).1);
            if ws_tasks.is_empty() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                for channel in ["alerts", PROBE_PRICES] {
                    ws_tasks.push(self.rt.spawn(ws_client(port, channel, obs.clone(), stop.clone())));
                }
            }
            if !ws_tasks.is_empty()
                && sequenced.is_none()
                && metric(port, "llamaflow_records_in_total{kind=\"rule\"}")
                    .is_some_and(|n| n >= self.args.rules as f64)
            {
                sequenced = Some(Instant::now());
            }
            if let Some((at, _)) = lock(&obs.stdout).first.get(LOAD_MARKER) {
                break *at;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let since = |t: Option<Instant>| t.map_or(f64::NAN, |t| t.duration_since(spawned).as_secs_f64());
        let (hwm, rss) = rss_mib(pid);
        println!(
            "load: {} rules — snapshot read {:.1} s{}, sequenced {:.1} s, first alert {:.1} s after start; \
             llamaflow CPU {:.1} s, peak RSS {hwm} MiB (RSS now {rss} MiB; highest sampled while reading \
             {} MiB, sequencing {} MiB, loading the dataflow {} MiB)",
            self.args.rules,
            since(*lock(&banner)),
            snapshot_query_secs(&log_path).map_or(String::new(), |q| format!(" (its SELECT {q:.1} s)")),
            since(sequenced),
            since(Some(loaded)),
            cpu_secs(pid),
            phase_rss[0],
            phase_rss[1],
            phase_rss[2],
        );
        let ready = Instant::now();
        while !obs.ws_ready.load(Ordering::Relaxed) {
            assert!(ready.elapsed() < Duration::from_secs(10), "WebSocket subscription");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Let the first checkpoint of the loaded state pass before measuring.
        std::thread::sleep(Duration::from_secs(2));
        // Rules idle (ticks flowing): what checkpoints cost.
        if self.args.checkpoint_ms != Some(0) && self.args.idle_secs > 0 {
            // From the first incremental checkpoint on: the base (every rule) is written.
            let waited = Instant::now();
            while metric(port, "llamaflow_checkpoint_incremental_workers").unwrap_or(0.0) < self.args.workers as f64 {
                assert!(
                    waited.elapsed() < Duration::from_secs(120),
                    "no incremental checkpoint within 120 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            let count = || metric(port, "llamaflow_checkpoints_total").unwrap_or(0.0);
            let (n0, c0, p0, t0) = (
                count(),
                thread_cpu_secs(pid, "checkpoint"),
                cpu_secs(pid),
                Instant::now(),
            );
            std::thread::sleep(Duration::from_secs(self.args.idle_secs));
            let secs = t0.elapsed().as_secs_f64();
            let (n, c, p) = (
                count() - n0,
                thread_cpu_secs(pid, "checkpoint") - c0,
                cpu_secs(pid) - p0,
            );
            println!(
                "rules idle for {secs:.0} s (ticks flowing): {n:.0} checkpoints, the last {:.1} MB with {:.0} of {} \
                 workers incremental; checkpoint thread {c:.2} CPU-s = {:.1} % of a core; llamaflow {:.0} % of a core",
                metric(port, "llamaflow_checkpoint_bytes").unwrap_or(f64::NAN) / 1e6,
                metric(port, "llamaflow_checkpoint_incremental_workers").unwrap_or(f64::NAN),
                self.args.workers,
                c / secs * 100.0,
                p / secs * 100.0,
            );
        }

        // The changes.
        let url = self.pg.url();
        let mut conn = self
            .rt
            .block_on(PgConnection::connect(&url))
            .expect("bench connects to Postgres");
        if !self.args.async_commit {
            self.rt
                .block_on(sqlx::query("SET synchronous_commit = on").execute(&mut conn))
                .expect("SET synchronous_commit");
        }
        let cpu0 = cpu_secs(pid);
        let t0 = Instant::now();
        obs.record_ticks.store(true, Ordering::Relaxed);
        let mut samples = Vec::new();
        for i in 0..self.args.changes {
            let change = Change::nth(i);
            let id = target(run, i);
            std::thread::sleep(Duration::from_millis(150 + (self.rng.unit() * 300.0) as u64));
            let sql = match change {
                Change::Insert => {
                    "INSERT INTO alert_rules (id, user_id, name, alert_type, conditions, throttle_minutes) VALUES \
                     ($1, 'bench', $1, 'price_threshold', \
                     '{\"coin\":\"coingecko:bench-probe\",\"operator\":\">\",\"value\":100.005}', 60)"
                }
                Change::Threshold => {
                    "UPDATE alert_rules SET conditions = jsonb_set(conditions, '{value}', '100.005'), \
                     updated_at = now() WHERE id = $1"
                }
                Change::Enable => "UPDATE alert_rules SET enabled = true, updated_at = now() WHERE id = $1",
                Change::Delete => "DELETE FROM alert_rules WHERE id = $1",
                Change::Disable => "UPDATE alert_rules SET enabled = false, updated_at = now() WHERE id = $1",
            };
            if !change.starts() && !lock(&obs.ws).last.contains_key(&id) {
                eprintln!("change {i}: rule {id} is not firing, so stopping it cannot be timed; skipped");
                continue;
            }
            let ckpt_age_s = metric(port, "llamaflow_checkpoint_age_seconds").unwrap_or(f64::NAN);
            let sent = Instant::now();
            let done = self
                .rt
                .block_on(sqlx::query(sql).bind(&id).execute(&mut conn))
                .expect("rule change");
            let committed = Instant::now();
            let committed_wall = wall_ms();
            assert_eq!(done.rows_affected(), 1, "{} of {id}", change.name());
            let ms = |t: Instant| t.duration_since(committed).as_secs_f64() * 1000.0;
            let mut s = Sample {
                change,
                ws_ms: f64::NAN,
                stdout_ms: f64::NAN,
                to_tick_ms: f64::NAN,
                rtt_ms: committed.duration_since(sent).as_secs_f64() * 1000.0,
                at_s: committed.duration_since(t0).as_secs_f64(),
                ckpt_age_s,
            };
            if change.starts() {
                while committed.elapsed() < EFFECT_TIMEOUT {
                    let ws = lock(&obs.ws).first.get(&id).copied();
                    let out = lock(&obs.stdout).first.get(&id).copied();
                    if let (Some((w, trig)), Some((o, _))) = (ws, out) {
                        (s.ws_ms, s.stdout_ms, s.to_tick_ms) = (ms(w), ms(o), trig - committed_wall);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            } else {
                // Alerts stop: wait until the rule has been quiet for a while.
                loop {
                    let ws = lock(&obs.ws).last.get(&id).copied();
                    let out = lock(&obs.stdout).last.get(&id).copied();
                    let latest = ws.into_iter().chain(out).max().unwrap_or(committed).max(committed);
                    if latest.elapsed() >= QUIET {
                        s.ws_ms = ws.map_or(0.0, |w| ms(w).max(0.0));
                        s.stdout_ms = out.map_or(0.0, |o| ms(o).max(0.0));
                        break;
                    }
                    if committed.elapsed() > EFFECT_TIMEOUT {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            if s.ws_ms.is_nan() {
                self.failed = true;
                eprintln!(
                    "change {i} ({} of {id}): no effect within {EFFECT_TIMEOUT:?}",
                    change.name()
                );
            }
            samples.push(s);
        }
        obs.record_ticks.store(false, Ordering::Relaxed);
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cpu_secs(pid) - cpu0;
        let (hwm, rss) = rss_mib(pid);
        let ticks = std::mem::take(&mut *lock(&obs.ticks));
        let gaps = std::mem::take(&mut *lock(&obs.gaps));

        let pick = |f: &dyn Fn(&Sample) -> bool, v: &dyn Fn(&Sample) -> f64| -> Vec<f64> {
            samples.iter().filter(|s| f(s)).map(v).collect()
        };
        let timeouts = samples.iter().filter(|s| s.ws_ms.is_nan()).count();
        let starts = |s: &Sample| s.change.starts();
        let stops = |s: &Sample| !s.change.starts();
        println!(
            "changes: {} in {secs:.0} s ({timeouts} without effect), COMMIT round trip p50 {:.2} ms",
            samples.len(),
            median(&pick(&|_| true, &|s| s.rtt_ms))
        );
        println!(
            "  start (insert/threshold/enable) → first alert  {}",
            summary(&pick(&starts, &|s| s.ws_ms))
        );
        for c in [Change::Insert, Change::Threshold, Change::Enable] {
            println!(
                "      {:<9}                                {}",
                c.name(),
                summary(&pick(&|s| s.change == c, &|s| s.ws_ms))
            );
        }
        println!(
            "  stop (delete/disable) → last alert             {}",
            summary(&pick(&stops, &|s| s.ws_ms))
        );
        println!(
            "  all changes                                    {}",
            summary(&pick(&|_| true, &|s| s.ws_ms))
        );
        println!(
            "  at llamaflow's stdout instead of the WebSocket {}",
            summary(&pick(&|_| true, &|s| s.stdout_ms))
        );
        println!(
            "  probe ticks, event time → price_update at the client: {}",
            summary(&ticks)
        );
        println!(
            "  stalls (the probe's price stream paused > {} ms): {}, {:.1} s in all, longest {:.0} ms",
            GAP.as_millis(),
            gaps.len(),
            gaps.iter().sum::<f64>() / 1000.0,
            gaps.iter().copied().fold(0.0, f64::max),
        );
        if median(&ticks) < 100.0 {
            println!(
                "  split of start changes (medians): COMMIT → first matching tick's event time {:.1} ms \
                 (CDC poll + decode + ingest), tick → alert at the client {:.1} ms",
                median(&pick(&starts, &|s| s.to_tick_ms)),
                median(&pick(&starts, &|s| s.ws_ms - s.to_tick_ms)),
            );
        } else {
            // Ticks still arrive steadily, so the change latencies above hold; only the split
            // by event time does not.
            println!(
                "  split n/a: ticks reach llamaflow late (the mock broker hands out one batch per \
                 partition and fetch, so a consumer that fell behind on a loaded machine catches up slowly)"
            );
        }
        let mut slow: Vec<&Sample> = samples.iter().filter(|s| s.ws_ms.is_finite()).collect();
        slow.sort_by(|a, b| b.ws_ms.total_cmp(&a.ws_ms));
        println!(
            "  slowest: {}",
            slow.iter()
                .take(5)
                .map(|s| format!(
                    "{} {:.0} ms (at {:.1} s, {:.1} s after a checkpoint)",
                    s.change.name(),
                    s.ws_ms,
                    s.at_s,
                    s.ckpt_age_s
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        println!(
            "  llamaflow: CPU {:.0}% of one core during the changes, peak RSS {hwm} MiB, RSS {rss} MiB; \
             alerts seen: WebSocket {}, stdout {}; load average {}",
            cpu / secs * 100.0,
            lock(&obs.ws).alerts,
            lock(&obs.stdout).alerts,
            loadavg(),
        );

        // Stop llamaflow (SIGTERM: final checkpoint, commit), then free its slot.
        stop.store(true, Ordering::Relaxed);
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
        let stopping = Instant::now();
        while job.0.try_wait().expect("child status").is_none() {
            if stopping.elapsed() > Duration::from_secs(60) {
                eprintln!("llamaflow did not stop within 60 s of SIGTERM; killing it");
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("stopped in {:.1} s", stopping.elapsed().as_secs_f64());
        drop(job);
        if self.args.checkpoint_ms != Some(0) {
            // The restore: the same job again, from its checkpoint (a base and, after it,
            // the rules changed since), until it answers /readyz.
            let restarted = Instant::now();
            let again = self.llamaflow(&config, false);
            let ready = loop {
                if testkit::http_get(port, "/readyz").status == 200 {
                    break Some(restarted.elapsed().as_secs_f64());
                }
                if restarted.elapsed() > Duration::from_secs(300) {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            match ready {
                Some(s) => println!("restore from the checkpoint: ready (/readyz 200) {s:.1} s after start"),
                None => println!("restore from the checkpoint: not ready within 300 s"),
            }
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(again.0.id() as i32, libc::SIGTERM);
            }
            drop(again);
        }
        let _ = out_reader.join();
        let _ = err_reader.join();
        for t in ws_tasks {
            let _ = self.rt.block_on(t);
        }
        let dead = std::fs::read_to_string(self.dir.join(format!("dead-{run}.jsonl")))
            .map(|d| d.lines().count())
            .unwrap_or(0);
        if dead > 0 {
            println!("dead letters: {dead} (see {})", self.dir.display());
        }
        self.pg
            .psql(&format!("SELECT pg_drop_replication_slot('rules_bench_{run}')"));
        let _ = std::fs::remove_dir_all(self.dir.join(format!("checkpoints-{run}")));
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
    let dir = tempfile::Builder::new()
        .prefix("llamaflow-rules-bench")
        .tempdir()
        .expect("temp dir");
    let pg = testkit::Postgres::start();
    pg.allow_wal2json();
    let out = Command::new(&args.llamaflow)
        .args(["migrate", "--database-url", &pg.url()])
        .output()
        .expect("llamaflow migrate runs");
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let t = Instant::now();
    let (generated, fixed) = rules_sql(&args);
    pg.psql(&generated);
    pg.psql(&fixed);
    let insert_secs = t.elapsed().as_secs_f64();
    pg.psql("VACUUM (ANALYZE) alert_rules");
    pg.psql("CHECKPOINT");
    let count = pg.psql("SELECT count(*) FROM alert_rules WHERE enabled");
    let size = pg.psql("SELECT pg_size_pretty(pg_total_relation_size('alert_rules'))");
    let mix = pg.psql(
        "SELECT string_agg(alert_type || ' ' || n, ', ' ORDER BY n DESC) FROM \
         (SELECT alert_type, count(*) AS n FROM alert_rules GROUP BY 1) t",
    );
    let top = pg.psql(
        "SELECT max(n) || ' rules on the most watched coin, ' || count(*) || ' coins' FROM \
         (SELECT conditions->>'coin' AS c, count(*) AS n FROM alert_rules WHERE conditions ? 'coin' GROUP BY 1) t",
    );
    println!(
        "Postgres: {} rules ({count} enabled; {mix}; {top}) inserted in {insert_secs:.1} s, \
         vacuumed in {:.1} s; table + indexes {size}",
        args.rules,
        t.elapsed().as_secs_f64() - insert_secs
    );

    let cluster = MockCluster::new(1).expect("mock cluster starts");
    cluster
        .create_topic("prices", 1 + BG_PARTITIONS as i32, 1)
        .expect("topic prices");
    let brokers = cluster.bootstrap_servers();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", args.linger_ms.to_string())
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (coins, bg, seed, stop) = (args.coins, args.background, args.seed, stop.clone());
        std::thread::spawn(move || produce(producer, coins, bg, seed, stop))
    };
    println!(
        "feed: probe {PROBE} every 1 ms ({PROBE_LOW} / {PROBE_HIGH}), {} background ticks/s over {} coins, \
         producer linger.ms {}; {} workers, batch_ms {}, checkpoints {}, synchronous_commit {}",
        args.background,
        args.coins,
        args.linger_ms,
        args.workers,
        args.batch_ms.map_or("default (10)".to_string(), |b| b.to_string()),
        match args.checkpoint_ms {
            Some(0) => "off".to_string(),
            Some(ms) => format!("every {ms} ms"),
            None => "default (every 5000 ms)".to_string(),
        },
        if args.async_commit { "off" } else { "on" },
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut bench = Bench {
        args: &args,
        pg: &pg,
        brokers: &brokers,
        dir: dir.path(),
        rt: &rt,
        rng: Lcg(args.seed),
        failed: false,
    };
    for (run, &poll) in args.polls.iter().enumerate() {
        bench.run(run, poll);
    }
    let failed = bench.failed;
    stop.store(true, Ordering::Relaxed);
    let _ = feeder.join();
    if failed {
        println!("some changes had no effect: logs kept in {}", dir.keep().display());
    }
}
