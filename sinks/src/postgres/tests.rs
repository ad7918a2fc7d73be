//! Integration tests against a private PostgreSQL (testkit); rows are read back with `psql`,
//! an independent client.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Duration;

use schemas::{Alert, Event, EventData};

use super::*;
use crate::OutputBatch;

const T0: i64 = 1_717_430_400_000;

fn psql(pg: &Pg, sql: &str) -> String {
    psql_url(&pg.url(), sql)
}

fn psql_url(url: &str, sql: &str) -> String {
    let out = Command::new(testkit::pg_bin_dir().join("psql"))
        .args([url, "-X", "-v", "ON_ERROR_STOP=1", "-tA", "-F", "|", "-c", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

/// A [`testkit::Postgres`] whose `stop` (and drop) really stops the server: when the tests run
/// as root, testkit starts the server under `runuser` and kills only `runuser`, which leaves
/// the postmaster running. This guard signals the postmaster itself (fast shutdown).
struct Pg {
    pg: testkit::Postgres,
    postmaster: Option<u32>,
}

impl Pg {
    fn start() -> Pg {
        let pg = testkit::Postgres::start();
        let dir = psql_url(&pg.url(), "SHOW data_directory");
        let postmaster = std::fs::read_to_string(std::path::Path::new(&dir).join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse().ok());
        assert!(postmaster.is_some(), "postmaster.pid in {dir}");
        Pg { pg, postmaster }
    }

    fn url(&self) -> String {
        self.pg.url()
    }

    fn stop(&mut self) {
        if let Some(pid) = self.postmaster.take() {
            let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                    Ok(stat) if !stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')) => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => break,
                }
            }
        }
        self.pg.stop();
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
    }
}

fn cfg(pg: &Pg) -> PgSinkConfig {
    PgSinkConfig {
        url: Some(pg.url()),
        ..PgSinkConfig::default()
    }
}

async fn setup() -> (Pg, PgSink) {
    let pg = Pg::start();
    let sink = PgSink::connect(cfg(&pg)).await.expect("connect");
    migrate(sink.pool()).await.expect("migrate");
    (pg, sink)
}

fn alert(id: &str, rule: &str, ts_ms: i64, value: f64, webhook: Option<&str>) -> Alert {
    Alert {
        alert_id: id.to_string(),
        rule_id: rule.to_string(),
        user_id: "u1".to_string(),
        alert_type: "price_change".to_string(),
        subject: "coingecko:ethereum".to_string(),
        triggered_at: ts_ms,
        value,
        threshold: 5.0,
        message: format!("ETH {value}% in 1h"),
        channels: vec!["websocket".to_string(), "webhook".to_string()],
        webhook_url: webhook.map(str::to_string),
    }
}

fn price(coin: &str, p: f64, ts_ms: i64, symbol: Option<&str>, decimals: Option<u32>) -> Event {
    Event {
        subject: coin.to_string(),
        timestamp: ts_ms,
        data: EventData::PriceUpdate {
            coin: coin.to_string(),
            price: p,
            symbol: symbol.map(str::to_string),
            confidence: symbol.map(|_| 0.99),
            decimals,
            timestamp: ts_ms,
            change_1h: None,
            change_24h: None,
        },
    }
}

fn tvl(protocol: &str, chains: &[(&str, f64)], ts_ms: i64) -> Event {
    let chain_tvls: BTreeMap<String, f64> = chains.iter().map(|(c, v)| (c.to_string(), *v)).collect();
    Event {
        subject: protocol.to_string(),
        timestamp: ts_ms,
        data: EventData::TvlUpdate {
            protocol_id: protocol.to_string(),
            name: Some("Aave V3".to_string()),
            tvl: chain_tvls.values().sum(),
            chain_tvls,
            extra: BTreeMap::from([("ethereum-staking".to_string(), 7.0)]),
            change_1h: None,
            change_1d: None,
            change_7d: None,
            timestamp: ts_ms,
        },
    }
}

fn gas(ts_ms: i64) -> Event {
    Event {
        subject: "ethereum".to_string(),
        timestamp: ts_ms,
        data: EventData::GasUpdate {
            chain: "ethereum".to_string(),
            gwei: 21.5,
            timestamp: ts_ms,
        },
    }
}

fn sample_batch() -> OutputBatch {
    OutputBatch {
        epoch: 7,
        alerts: vec![
            alert("a1", "r1", T0, -5.31, None),
            alert("a2", "r2", T0 + 1_500, 6.25, Some("https://example.com/hook")),
        ],
        events: vec![
            price("coingecko:ethereum", 3791.12, T0, Some("ETH"), Some(18)),
            price("coingecko:bitcoin", 67000.5, T0 + 250, None, None),
            tvl("2269", &[("ethereum", 100.0), ("arbitrum", 25.5)], T0),
            gas(T0),
        ],
        ..Default::default()
    }
}

const ALERT_ROWS: &str = "SELECT alert_id, rule_id, user_id, alert_type, subject, \
    extract(epoch FROM triggered_at)::float8, value, threshold, message, channels::text, \
    coalesce(webhook_url, '<null>') FROM alert_history ORDER BY alert_id";
const PRICE_ROWS: &str = "SELECT coin, extract(epoch FROM timestamp)::float8, price, coalesce(symbol, '<null>'), \
    coalesce(confidence::text, '<null>'), coalesce(decimals::text, '<null>') FROM token_prices ORDER BY coin, timestamp";
const TVL_ROWS: &str = "SELECT protocol_id, chain, extract(epoch FROM timestamp)::float8, tvl \
    FROM protocol_tvl ORDER BY protocol_id, chain, timestamp";

const SAMPLE_ALERTS: &str = "a1|r1|u1|price_change|coingecko:ethereum|1717430400|-5.31|5|ETH -5.31% in 1h|\
[\"websocket\", \"webhook\"]|<null>
a2|r2|u1|price_change|coingecko:ethereum|1717430401.5|6.25|5|ETH 6.25% in 1h|[\"websocket\", \"webhook\"]|\
https://example.com/hook";
const SAMPLE_PRICES: &str = "coingecko:bitcoin|1717430400.25|67000.5|<null>|<null>|<null>
coingecko:ethereum|1717430400|3791.12|ETH|0.99|18";
const SAMPLE_TVL: &str = "2269|arbitrum|1717430400|25.5
2269|ethereum|1717430400|100
2269|total|1717430400|125.5";

#[tokio::test]
async fn migrate_applies_once_concurrently_and_creates_the_tables() {
    let pg = Pg::start();
    let a = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let b = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let (ra, rb) = tokio::join!(migrate(&a), migrate(&b));
    let mut applied: Vec<String> = ra.unwrap().into_iter().chain(rb.unwrap()).collect();
    applied.sort();
    assert_eq!(
        applied,
        vec![
            "0001_init".to_string(),
            "0002_protocol_symbol".to_string(),
            "0003_alert_channels".to_string(),
            "0004_cdc_notify".to_string()
        ],
        "exactly one caller applies each"
    );
    assert_eq!(migrate(&a).await.unwrap(), Vec::<String>::new());
    assert_eq!(
        psql(
            &pg,
            "SELECT string_agg(name, ',' ORDER BY name) FROM llamaflow_migrations"
        ),
        "0001_init,0002_protocol_symbol,0003_alert_channels,0004_cdc_notify"
    );
    assert_eq!(
        psql(
            &pg,
            "SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_name <> 'llamaflow_migrations'"
        ),
        "alert_deliveries,alert_history,alert_rules,api_keys,protocol_tvl,protocols,token_prices,user_devices,users"
    );
}

#[tokio::test]
async fn a_batch_is_read_back_exactly_and_rewriting_it_changes_nothing() {
    let (pg, mut sink) = setup().await;
    let batch = sample_batch();
    sink.write(&batch).await.unwrap();
    assert_eq!(psql(&pg, ALERT_ROWS), SAMPLE_ALERTS);
    assert_eq!(psql(&pg, PRICE_ROWS), SAMPLE_PRICES);
    assert_eq!(psql(&pg, TVL_ROWS), SAMPLE_TVL);

    // Idempotent: the same batch again leaves one row each, and rewrites no row (xmin unchanged).
    let xmins = "SELECT string_agg(xmin::text, ',') FROM (SELECT xmin FROM alert_history UNION ALL \
        SELECT xmin FROM token_prices UNION ALL SELECT xmin FROM protocol_tvl) t";
    let before = psql(&pg, xmins);
    sink.write(&batch).await.unwrap();
    assert_eq!(psql(&pg, ALERT_ROWS), SAMPLE_ALERTS);
    assert_eq!(psql(&pg, PRICE_ROWS), SAMPLE_PRICES);
    assert_eq!(psql(&pg, TVL_ROWS), SAMPLE_TVL);
    assert_eq!(psql(&pg, xmins), before);

    // A corrected value for an existing key is an update, not a second row.
    let fix = OutputBatch {
        epoch: 8,
        alerts: vec![alert("a1", "r1", T0, -99.0, None)],
        events: vec![price("coingecko:ethereum", 3800.0, T0, Some("ETH"), Some(18))],
        ..Default::default()
    };
    sink.write(&fix).await.unwrap();
    assert_eq!(psql(&pg, ALERT_ROWS), SAMPLE_ALERTS, "alerts are immutable");
    assert_eq!(
        psql(&pg, PRICE_ROWS),
        "coingecko:bitcoin|1717430400.25|67000.5|<null>|<null>|<null>
coingecko:ethereum|1717430400|3800|ETH|0.99|18"
    );
}

#[tokio::test]
async fn duplicate_keys_within_a_batch_are_merged() {
    let (pg, mut sink) = setup().await;
    let batch = OutputBatch {
        epoch: 1,
        alerts: vec![alert("a1", "r1", T0, 1.0, None), alert("a1", "r1", T0, 1.0, None)],
        events: vec![
            price("coingecko:ethereum", 1.0, T0, Some("ETH"), None),
            price("coingecko:ethereum", 2.0, T0, Some("ETH"), None),
            price("coingecko:ethereum", 3.0, T0 + 1, Some("ETH"), None),
            tvl("1", &[("ethereum", 1.0)], T0),
            tvl("1", &[("ethereum", 2.0), ("base", 3.0)], T0),
            // A chain literally named "total" loses to the protocol total.
            tvl("2", &[("total", 4.0), ("base", 1.0)], T0),
        ],
        ..Default::default()
    };
    sink.write(&batch).await.unwrap();
    assert_eq!(psql(&pg, "SELECT alert_id, value FROM alert_history"), "a1|1");
    assert_eq!(
        psql(&pg, PRICE_ROWS),
        "coingecko:ethereum|1717430400|2|ETH|0.99|<null>
coingecko:ethereum|1717430400.001|3|ETH|0.99|<null>"
    );
    assert_eq!(
        psql(&pg, TVL_ROWS),
        "1|base|1717430400|3
1|ethereum|1717430400|2
1|total|1717430400|5
2|base|1717430400|1
2|total|1717430400|5"
    );
}

#[tokio::test]
async fn disabled_tables_are_not_written() {
    let pg = Pg::start();
    let mut sink = PgSink::connect(PgSinkConfig {
        write_prices: false,
        write_tvl: false,
        ..cfg(&pg)
    })
    .await
    .unwrap();
    migrate(sink.pool()).await.unwrap();
    sink.write(&sample_batch()).await.unwrap();
    assert_eq!(
        psql(
            &pg,
            "SELECT (SELECT count(*) FROM alert_history), (SELECT count(*) FROM token_prices), \
             (SELECT count(*) FROM protocol_tvl)"
        ),
        "2|0|0"
    );
}

#[tokio::test]
async fn a_failing_statement_commits_nothing_of_the_batch_and_is_not_retried() {
    let (pg, mut sink) = setup().await;
    psql(
        &pg,
        "ALTER TABLE protocol_tvl ADD CONSTRAINT tvl_nonneg CHECK (tvl >= 0)",
    );
    let mut batch = sample_batch();
    batch.events.push(tvl("9", &[("ethereum", -1.0)], T0));
    let started = std::time::Instant::now();
    let err = sink.write(&batch).await.unwrap_err();
    assert!(
        matches!(err, PgError::Write { attempts: 1, .. }),
        "a constraint violation is not transient: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        psql(
            &pg,
            "SELECT (SELECT count(*) FROM alert_history), (SELECT count(*) FROM token_prices), \
             (SELECT count(*) FROM protocol_tvl)"
        ),
        "0|0|0",
        "the alerts and prices of the batch were rolled back with it"
    );
}

#[tokio::test]
async fn the_pool_reconnects_after_its_connections_are_killed() {
    let (pg, mut sink) = setup().await;
    sink.write(&sample_batch()).await.unwrap();
    let killed = psql(
        &pg,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = 'postgres' AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
    );
    assert_ne!(killed, "0", "the sink held a connection");
    let mut next = sample_batch();
    next.events = vec![price("coingecko:ethereum", 1.0, T0 + 60_000, None, None)];
    next.alerts.clear();
    sink.write(&next).await.unwrap();
    assert_eq!(psql(&pg, "SELECT count(*) FROM token_prices"), "3");
}

/// Server down: `write` retries with backoff, counts the retries, then returns the error.
/// A plain `#[test]` on a current-thread runtime, so a thread-local metrics recorder sees
/// everything `write` records.
#[test]
fn with_the_server_stopped_write_retries_then_fails() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut pg = Pg::start();
    let (err, elapsed) = metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let mut sink = PgSink::connect(PgSinkConfig {
                acquire_timeout_ms: 300,
                retry: RetryConfig {
                    max_attempts: 3,
                    initial_backoff_ms: 20,
                    max_backoff_ms: 40,
                },
                ..cfg(&pg)
            })
            .await
            .unwrap();
            migrate(sink.pool()).await.unwrap();
            sink.write(&sample_batch()).await.unwrap();
            pg.stop();
            let started = std::time::Instant::now();
            let err = sink.write(&sample_batch()).await.unwrap_err();
            (err, started.elapsed())
        })
    });
    match &err {
        PgError::Write { attempts: 3, source } => assert!(
            matches!(source, sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)),
            "{source:?}"
        ),
        other => panic!("unexpected error {other:?}"),
    }
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    let mut counters = HashMap::new();
    let mut latencies = 0;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        assert_eq!(labels, vec!["sink=postgres".to_string()], "{}", key.name());
        match value {
            DebugValue::Counter(n) => {
                counters.insert(key.name().to_string(), n);
            }
            DebugValue::Histogram(h) => latencies += h.len(),
            DebugValue::Gauge(_) => {}
        }
    }
    assert_eq!(counters.get("llamaflow_sink_retries_total"), Some(&2));
    assert_eq!(counters.get("llamaflow_sink_failures_total"), Some(&1));
    // 2 alerts + 2 prices + 3 TVL rows from the first, successful write only.
    assert_eq!(counters.get("llamaflow_sink_written_total"), Some(&7));
    assert_eq!(latencies, 2);
}

#[tokio::test]
async fn connect_needs_a_url_and_gives_up_on_a_dead_server() {
    let err = PgSink::connect(PgSinkConfig {
        url: Some(String::new()),
        ..PgSinkConfig::default()
    })
    .await;
    // An empty URL falls back to the environment; only assert the error when that is unset.
    if url_from_env().is_none() {
        assert!(matches!(err, Err(PgError::Config(ref m)) if m.contains("PREMIUM_DB")));
    }
    let port = testkit::free_port();
    let err = PgSink::connect(PgSinkConfig {
        url: Some(format!("postgres://postgres@127.0.0.1:{port}/postgres")),
        acquire_timeout_ms: 100,
        retry: RetryConfig {
            max_attempts: 2,
            initial_backoff_ms: 1,
            max_backoff_ms: 1,
        },
        ..PgSinkConfig::default()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, PgError::Connect { attempts: 2, .. }), "{err}");
}

#[test]
fn config_defaults_env_and_redaction() {
    let c: PgSinkConfig = serde_json::from_str(r#"{"write_tvl": false, "retry": {"max_attempts": 3}}"#).unwrap();
    assert_eq!(c.url, None);
    assert_eq!(c.max_connections, 4);
    assert!(c.write_prices && !c.write_tvl);
    assert_eq!(
        c.retry,
        RetryConfig {
            max_attempts: 3,
            initial_backoff_ms: 100,
            max_backoff_ms: 5000
        }
    );
    assert!(serde_json::from_str::<PgSinkConfig>(r#"{"urll": "x"}"#).is_err());

    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    };
    assert_eq!(
        url_from_vars(env(&[("DATABASE_URL", "d"), ("ALERTS_DB", "a")])).as_deref(),
        Some("a")
    );
    assert_eq!(
        url_from_vars(env(&[("PREMIUM_DB", "p"), ("ALERTS_DB", "a")])).as_deref(),
        Some("p")
    );
    assert_eq!(
        url_from_vars(env(&[("PREMIUM_DB", ""), ("DATABASE_URL", "d")])).as_deref(),
        Some("d")
    );
    assert_eq!(url_from_vars(env(&[])), None);

    let c = PgSinkConfig {
        url: Some("postgres://app:s3cret@db:5432/llama".to_string()),
        ..PgSinkConfig::default()
    };
    let shown = format!("{c:?}");
    assert!(!shown.contains("s3cret") && shown.contains("db:5432/llama"), "{shown}");
}

#[test]
fn backoff_doubles_up_to_the_cap_with_jitter_below_it() {
    let r = RetryConfig::default();
    let ms: Vec<u128> = (1..=8).map(|n| r.backoff(n).as_millis()).collect();
    assert_eq!(ms, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    let jittered: Vec<Duration> = (0..50).map(|_| r.backoff_with_jitter(3)).collect();
    assert!(
        jittered
            .iter()
            .all(|d| *d >= Duration::from_millis(200) && *d < Duration::from_millis(400))
    );
    assert!(jittered.iter().any(|d| *d != jittered[0]), "jitter varies");
}
