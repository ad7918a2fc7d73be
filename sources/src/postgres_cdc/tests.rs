//! Integration tests against a private PostgreSQL (testkit) with wal2json. Changes are made
//! with `psql` or a separate connection; slot state is read from `pg_replication_slots`.

use std::time::{Duration, Instant};

use schemas::Record;
use tokio::sync::mpsc::{Receiver, channel};

use super::*;
use crate::live::{Ack, Change, LiveItem};

const WAIT: Duration = Duration::from_secs(10);

/// A private server with the llamaflow tables, where wal2json may be used.
struct Pg {
    pg: testkit::Postgres,
}

impl Pg {
    /// A server with the llamaflow tables, where wal2json may be used as an output plugin.
    fn start() -> Pg {
        let pg = testkit::Postgres::start();
        pg.allow_wal2json();
        for (_, sql) in schemas::migrations::ALL {
            pg.psql(sql);
        }
        Pg { pg }
    }

    fn url(&self) -> String {
        self.pg.url()
    }

    fn sql(&self, sql: &str) -> String {
        self.pg.psql(sql)
    }

    fn slot_confirmed(&self, slot: &str) -> u64 {
        let s = self.sql(&format!(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ));
        parse_lsn(&s).expect("slot exists")
    }
}

fn cfg(pg: &Pg, snapshot: bool) -> CdcConfig {
    CdcConfig {
        url: Some(pg.url()),
        snapshot,
        poll_interval_ms: 50,
        ..CdcConfig::default()
    }
}

async fn next(rx: &mut Receiver<LiveItem>) -> LiveItem {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an item within 10 s")
        .expect("source running")
}

async fn assert_quiet(rx: &mut Receiver<LiveItem>, for_: Duration) {
    if let Ok(Some(item)) = tokio::time::timeout(for_, rx.recv()).await {
        panic!("unexpected item {item:?}");
    }
}

fn rule_sql(id: &str, window: &str, enabled: bool) -> String {
    format!(
        "INSERT INTO alert_rules (id, user_id, name, alert_type, conditions, enabled) VALUES ('{id}', 'u1', \
         'ETH {window}', 'price_change', '{{\"coin\": \"coingecko:ethereum\", \"window\": \"{window}\", \
         \"threshold_pct\": 5, \"direction\": \"down\"}}', {enabled})"
    )
}

fn rule(item: &LiveItem) -> &schemas::AlertRule {
    match &item.change {
        Change::Record(Record::Rule(r)) => r,
        other => panic!("not a rule: {other:?}"),
    }
}

fn ack(item: &LiveItem) -> u64 {
    match item.ack {
        Ack::Lsn(lsn) => lsn,
        ref other => panic!("no LSN ack: {other:?}"),
    }
}

#[tokio::test]
async fn the_snapshot_delivers_the_current_rows() {
    let pg = Pg::start();
    pg.sql(&rule_sql("r1", "1h", true));
    pg.sql(&rule_sql("r2", "2w", true));
    pg.sql(r#"INSERT INTO protocols (id, name, slug, category, chains) VALUES ('2269', 'Aave V3', 'aave-v3', 'Lending', '["ethereum", "arbitrum"]')"#);
    pg.sql("INSERT INTO api_keys (key, user_id, revoked) VALUES ('k1', 'u1', false), ('k2', 'u2', true)");
    let (tx, mut rx) = channel(64);
    let cdc = start(cfg(&pg, true), tx).await.unwrap();

    let items = [
        next(&mut rx).await,
        next(&mut rx).await,
        next(&mut rx).await,
        next(&mut rx).await,
        next(&mut rx).await,
    ];
    assert!(items.iter().all(|i| i.ack == Ack::None && i.pos.offset == 0));
    let sources: Vec<&str> = items.iter().map(|i| &*i.pos.source).collect();
    assert_eq!(
        sources,
        ["alert_rules@", "alert_rules@", "protocols@", "api_keys@", "api_keys@"]
    );
    let r1 = rule(&items[0]);
    assert_eq!(
        (r1.id.as_str(), r1.name.as_deref(), r1.enabled),
        ("r1", Some("ETH 1h"), true)
    );
    assert_eq!(r1.conditions.threshold(), 5.0);
    match &items[1].change {
        Change::Dead(d) => {
            assert_eq!(d.source, "alert_rules@snapshot");
            assert!(d.reason.contains("window"), "{}", d.reason);
            assert!(d.raw.contains("\"2w\"") && d.raw.contains("\"r2\""), "{}", d.raw);
        }
        other => panic!("not a dead letter: {other:?}"),
    }
    match &items[2].change {
        Change::Record(Record::Protocol(p)) => {
            assert_eq!(
                (p.id.as_str(), p.name.as_str(), p.slug.as_deref(), p.chains.clone()),
                (
                    "2269",
                    "Aave V3",
                    Some("aave-v3"),
                    vec!["ethereum".to_string(), "arbitrum".to_string()]
                )
            );
        }
        other => panic!("not a protocol: {other:?}"),
    }
    assert_eq!(
        items[3].change,
        Change::ApiKey {
            key: "k1".into(),
            user_id: Some("u1".into())
        }
    );
    assert_eq!(
        items[4].change,
        Change::ApiKey {
            key: "k2".into(),
            user_id: None
        }
    );
    // The snapshot rows are not streamed again: they committed before the slot existed.
    assert_quiet(&mut rx, Duration::from_millis(500)).await;
    cdc.stop().await;
}

#[tokio::test]
async fn rule_changes_stream_in_order_within_a_second_of_commit() {
    let pg = Pg::start();
    let writer = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let (tx, mut rx) = channel(64);
    let cdc = start(cfg(&pg, true), tx).await.unwrap();
    assert_quiet(&mut rx, Duration::from_millis(200)).await;

    let steps: [String; 5] = [
        rule_sql("r1", "1h", true),
        "UPDATE alert_rules SET name = 'renamed', throttle_minutes = 30 WHERE id = 'r1'".into(),
        "UPDATE alert_rules SET enabled = false WHERE id = 'r1'".into(),
        "DELETE FROM alert_rules WHERE id = 'r1'".into(),
        rule_sql("r1", "4h", true),
    ];
    let mut got = Vec::new();
    for sql in &steps {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&writer)
            .await
            .unwrap();
        let committed = Instant::now();
        let item = next(&mut rx).await;
        let latency = committed.elapsed();
        assert!(latency < Duration::from_secs(1), "{sql}: {latency:?}");
        got.push(item);
    }
    let r = rule(&got[0]);
    assert_eq!(
        (r.id.as_str(), r.enabled, r.name.as_deref()),
        ("r1", true, Some("ETH 1h"))
    );
    let r = rule(&got[1]);
    assert_eq!((r.name.as_deref(), r.throttle_minutes), (Some("renamed"), 30.0));
    let r = rule(&got[2]);
    assert!(!r.enabled);
    assert_eq!(got[3].change, Change::DeleteRule("r1".into()));
    assert_eq!(rule(&got[4]).window_label().as_deref(), Some("4h"));
    for w in got.windows(2) {
        assert!(w[0].pos.offset < w[1].pos.offset, "positions increase");
        assert!(ack(&w[0]) < ack(&w[1]), "acks increase");
    }
    assert!(got.iter().all(|i| &*i.pos.source == "alert_rules@"));
    assert_quiet(&mut rx, Duration::from_millis(300)).await;
    cdc.stop().await;
}

#[tokio::test]
async fn an_invalid_row_is_dead_lettered_and_the_stream_goes_on() {
    let pg = Pg::start();
    let (tx, mut rx) = channel(64);
    let cdc = start(cfg(&pg, false), tx).await.unwrap();
    pg.sql(&rule_sql("bad", "2w", true));
    pg.sql(&rule_sql("good", "1h", true));
    pg.sql(r#"INSERT INTO protocols (id, name) VALUES ('1', '')"#);
    let dead = next(&mut rx).await;
    match &dead.change {
        Change::Dead(d) => {
            assert!(d.source.starts_with("alert_rules@"), "{}", d.source);
            assert_eq!(parse_lsn(&d.source["alert_rules@".len()..]), Some(dead.pos.offset));
            assert!(d.reason.contains("window"), "{}", d.reason);
            assert!(d.raw.contains("\"bad\"") && d.raw.contains("\"2w\""), "{}", d.raw);
        }
        other => panic!("not a dead letter: {other:?}"),
    }
    assert!(
        matches!(dead.ack, Ack::Lsn(_)),
        "a dead letter is acknowledged like any change"
    );
    assert_eq!(rule(&next(&mut rx).await).id, "good");
    match next(&mut rx).await.change {
        Change::Dead(d) => {
            assert!(d.source.starts_with("protocols@"), "{}", d.source);
            assert_eq!(d.reason, "missing field `name`");
        }
        other => panic!("not a dead letter: {other:?}"),
    }
    cdc.stop().await;
}

#[tokio::test]
async fn a_transaction_is_acknowledged_by_its_last_item() {
    let pg = Pg::start();
    pg.sql("INSERT INTO api_keys (key, user_id) VALUES ('old', 'u9')");
    let (tx, mut rx) = channel(64);
    let cdc = start(cfg(&pg, false), tx).await.unwrap();
    pg.sql(&format!(
        "BEGIN; {}; INSERT INTO protocols (id, name) VALUES ('7', 'P'); \
         INSERT INTO api_keys (key, user_id) VALUES ('k1', 'u1'); COMMIT",
        rule_sql("r1", "5m", true)
    ));
    let items = [next(&mut rx).await, next(&mut rx).await, next(&mut rx).await];
    assert_eq!(rule(&items[0]).id, "r1");
    assert!(matches!(&items[1].change, Change::Record(Record::Protocol(p)) if p.id == "7"));
    assert_eq!(
        items[2].change,
        Change::ApiKey {
            key: "k1".into(),
            user_id: Some("u1".into())
        }
    );
    assert_eq!((&items[0].ack, &items[1].ack), (&Ack::None, &Ack::None));
    let commit = ack(&items[2]);
    assert!(
        items.iter().all(|i| i.pos.offset < commit),
        "the ack is past every change"
    );

    // Revoking, re-keying and deleting keys.
    pg.sql("UPDATE api_keys SET revoked = true WHERE key = 'k1'");
    pg.sql("UPDATE api_keys SET key = 'new' WHERE key = 'old'");
    pg.sql("DELETE FROM protocols WHERE id = '7'");
    let revoked = next(&mut rx).await;
    assert_eq!(
        revoked.change,
        Change::ApiKey {
            key: "k1".into(),
            user_id: None
        }
    );
    assert!(ack(&revoked) > commit);
    let (gone, renamed) = (next(&mut rx).await, next(&mut rx).await);
    assert_eq!(
        (gone.change, gone.ack),
        (
            Change::ApiKey {
                key: "old".into(),
                user_id: None
            },
            Ack::None
        )
    );
    assert_eq!(
        renamed.change,
        Change::ApiKey {
            key: "new".into(),
            user_id: Some("u9".into())
        }
    );
    assert_eq!(next(&mut rx).await.change, Change::DeleteProtocol("7".into()));
    cdc.stop().await;
}

#[tokio::test]
async fn a_restart_resumes_after_the_confirmed_changes() {
    let pg = Pg::start();
    let (tx, mut rx) = channel(64);
    let cdc = start(cfg(&pg, true), tx).await.unwrap();
    for id in ["r1", "r2", "r3", "r4"] {
        pg.sql(&rule_sql(id, "1h", true));
    }
    let first: Vec<LiveItem> = vec![
        next(&mut rx).await,
        next(&mut rx).await,
        next(&mut rx).await,
        next(&mut rx).await,
    ];
    let ids: Vec<&str> = first.iter().map(|i| rule(i).id.as_str()).collect();
    assert_eq!(ids, ["r1", "r2", "r3", "r4"]);
    cdc.confirm(ack(&first[1])).await.unwrap();
    cdc.confirm(ack(&first[0])).await.unwrap(); // behind the confirmed position: ignored
    assert_eq!(cdc.confirmed(), ack(&first[1]));
    assert_eq!(pg.slot_confirmed("llamaflow"), ack(&first[1]));
    cdc.stop().await;
    drop(rx);

    // While nothing runs.
    pg.sql(&rule_sql("r5", "1h", true));
    pg.sql("UPDATE alert_rules SET enabled = false WHERE id = 'r1'");

    let (tx, mut rx) = channel(64);
    let cdc = start(cfg(&pg, false), tx).await.unwrap();
    let mut again = Vec::new();
    for _ in 0..4 {
        again.push(next(&mut rx).await);
    }
    let got: Vec<(&str, bool)> = again.iter().map(|i| (rule(i).id.as_str(), rule(i).enabled)).collect();
    assert_eq!(got, [("r3", true), ("r4", true), ("r5", true), ("r1", false)]);
    assert_eq!(again[0].pos, first[2].pos, "the same change at the same position");
    assert_eq!(ack(&again[1]), ack(&first[3]));
    assert_quiet(&mut rx, Duration::from_millis(500)).await;
    cdc.stop().await;
}

/// Changes of overlapping transactions have interleaved LSNs: a transaction that began first
/// but commits last has the lower change LSN. Positions by commit keep it.
#[tokio::test]
async fn overlapping_transactions_arrive_in_commit_order_and_none_is_skipped() {
    let pg = Pg::start();
    let (tx, mut rx) = channel(64);
    let cdc = start(cfg(&pg, false), tx).await.unwrap();
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let mut early = pool.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(rule_sql("early", "1h", true)))
        .execute(&mut *early)
        .await
        .unwrap();
    pg.sql(&rule_sql("late", "1h", true));
    let late = next(&mut rx).await;
    assert_eq!(rule(&late).id, "late");
    early.commit().await.unwrap();
    let early = next(&mut rx).await;
    assert_eq!(rule(&early).id, "early");
    assert!(
        early.pos.offset < late.pos.offset,
        "the earlier change has the lower LSN"
    );
    assert!(ack(&early) > ack(&late), "but the later commit");

    // Confirming the first commit keeps the second for a restart.
    cdc.confirm(ack(&late)).await.unwrap();
    cdc.stop().await;
    let (tx, mut rx) = channel(64);
    let cdc = start(cfg(&pg, false), tx).await.unwrap();
    assert_eq!(next(&mut rx).await, early);
    assert_quiet(&mut rx, Duration::from_millis(300)).await;
    cdc.stop().await;
}

#[tokio::test]
async fn an_unconfirmed_backlog_larger_than_a_poll_does_not_hide_new_changes() {
    let pg = Pg::start();
    let small = CdcConfig {
        max_changes_per_poll: 2,
        ..cfg(&pg, false)
    };
    let (tx, _rx) = channel(64);
    start(small.clone(), tx).await.unwrap().stop().await;
    for i in 0..6 {
        pg.sql(&rule_sql(&format!("r{i}"), "1h", true));
    }
    let (tx, mut rx) = channel(64);
    let cdc = start(small, tx).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(rule(&next(&mut rx).await).id.clone());
    }
    pg.sql(&rule_sql("r6", "1h", true));
    ids.push(rule(&next(&mut rx).await).id.clone());
    assert_eq!(ids, ["r0", "r1", "r2", "r3", "r4", "r5", "r6"]);
    assert_quiet(&mut rx, Duration::from_millis(300)).await;
    cdc.stop().await;
}

/// A plain `#[test]` on a current-thread runtime, so a thread-local metrics recorder sees
/// what the source task records.
#[test]
fn the_slot_advances_on_confirm_and_when_idle_but_never_past_unconfirmed_changes() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pg = Pg::start();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let (tx, mut rx) = channel(64);
            let cdc = start(
                CdcConfig {
                    heartbeat_secs: 1,
                    ..cfg(&pg, false)
                },
                tx,
            )
            .await
            .unwrap();
            let created = pg.slot_confirmed("llamaflow");
            pg.sql(&rule_sql("r1", "1h", true));
            let a = ack(&next(&mut rx).await);
            // Delivered but not confirmed: heartbeats do not move the slot past it.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert!(pg.slot_confirmed("llamaflow") < a);
            assert!(pg.slot_confirmed("llamaflow") >= created);

            cdc.confirm(a).await.unwrap();
            assert_eq!(pg.slot_confirmed("llamaflow"), a);
            // Confirming beyond what was delivered stops at the last delivered ack.
            cdc.confirm(u64::MAX).await.unwrap();
            assert_eq!(pg.slot_confirmed("llamaflow"), a);

            // Idle for the source (only other tables change): the slot keeps moving.
            pg.sql("INSERT INTO token_prices (coin, timestamp, price) VALUES ('coingecko:x', now(), 1)");
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let idle = pg.slot_confirmed("llamaflow");
            assert!(idle > a, "{} > {}", format_lsn(idle), format_lsn(a));
            tokio::time::sleep(Duration::from_millis(2000)).await;
            assert!(pg.slot_confirmed("llamaflow") > idle, "heartbeats alone advance it");

            // Nothing was skipped on the way.
            pg.sql("UPDATE alert_rules SET enabled = false WHERE id = 'r1'");
            assert!(!rule(&next(&mut rx).await).enabled);
            cdc.stop().await;
        })
    });
    let mut changes = None;
    let mut lag = None;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        match (key.name(), value) {
            ("llamaflow_cdc_changes_total", DebugValue::Counter(n)) => {
                let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
                assert_eq!(labels, ["table=alert_rules"]);
                changes = Some(n);
            }
            ("llamaflow_cdc_lag_bytes", DebugValue::Gauge(g)) => lag = Some(g.into_inner()),
            _ => {}
        }
    }
    assert_eq!(changes, Some(2));
    assert!(lag.is_some_and(|l| l >= 0.0), "{lag:?}");
}

#[tokio::test]
async fn an_update_missing_an_out_of_line_column_reads_it_from_the_table() {
    let pg = Pg::start();
    // Uncompressed and out of line: an update that does not touch `channels` leaves it out of
    // the WAL, and wal2json leaves it out of the change.
    pg.sql("ALTER TABLE alert_rules ALTER COLUMN channels SET STORAGE EXTERNAL");
    pg.sql("SELECT pg_create_logical_replication_slot('probe', 'wal2json')");
    let (tx, mut rx) = channel(64);
    let cdc = start(cfg(&pg, false), tx).await.unwrap();
    let channels: Vec<String> = (0..400).map(|i| format!("channel-{i:05}-{:x}", i * 7919)).collect();
    let channels_json = serde_json::to_string(&channels).unwrap();
    pg.sql(&format!(
        "{}; UPDATE alert_rules SET channels = '{channels_json}' WHERE id = 'r1'",
        rule_sql("r1", "1h", true)
    ));
    assert_eq!(rule(&next(&mut rx).await).channels, vec!["websocket".to_string()]);
    assert_eq!(rule(&next(&mut rx).await).channels, channels);
    pg.sql("UPDATE alert_rules SET enabled = false WHERE id = 'r1'");
    let r = next(&mut rx).await;
    assert!(!rule(&r).enabled);
    assert_eq!(rule(&r).channels, channels);
    // The precondition: the change itself lacked the column.
    let last = pg.sql(
        "SELECT data FROM pg_logical_slot_peek_changes('probe', NULL, NULL, 'format-version', '2') \
         WHERE data LIKE '{\"action\":\"U\"%' ORDER BY lsn DESC LIMIT 1",
    );
    assert!(last.contains("\"enabled\"") && !last.contains("\"channels\""), "{last}");
    pg.sql("SELECT pg_drop_replication_slot('probe')");
    cdc.stop().await;
}

#[tokio::test]
async fn start_rejects_bad_config_and_foreign_slots() {
    let pg = Pg::start();
    let (tx, _rx) = channel(1);
    let err = start(
        CdcConfig {
            tables: vec!["alert_rules".into(), "trades".into()],
            ..cfg(&pg, true)
        },
        tx.clone(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("unknown table \"trades\""), "{err}");
    let err = start(
        CdcConfig {
            slot: "Bad-Slot".into(),
            ..cfg(&pg, true)
        },
        tx.clone(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("`slot`"), "{err}");
    pg.sql("SELECT pg_create_logical_replication_slot('other', 'test_decoding')");
    let err = start(
        CdcConfig {
            slot: "other".into(),
            ..cfg(&pg, true)
        },
        tx,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, CdcError::Slot { slot, reason } if slot == "other" && reason.contains("test_decoding")),
        "{err}"
    );
}

#[test]
fn config_defaults_and_tables() {
    let c: CdcConfig = serde_json::from_str(r#"{"slot": "s1", "tables": ["public.alert_rules"]}"#).unwrap();
    assert_eq!(c.slot, "s1");
    assert_eq!(
        (c.poll_interval_ms, c.heartbeat_secs, c.max_changes_per_poll, c.snapshot),
        (100, 10, 10_000, true)
    );
    assert_eq!(
        CdcConfig::default().tables,
        vec![
            "alert_rules".to_string(),
            "protocols".to_string(),
            "api_keys".to_string(),
            "users".to_string(),
            "user_devices".to_string()
        ]
    );
    let (_, tables) = CdcConfig {
        url: Some("postgres://x".into()),
        ..c
    }
    .validate()
    .unwrap();
    assert_eq!(tables, vec![CdcTable::AlertRules]);
    assert!(serde_json::from_str::<CdcConfig>(r#"{"slots": "x"}"#).is_err());
    let shown = format!(
        "{:?}",
        CdcConfig {
            url: Some("postgres://u:hunter2@db/x".into()),
            ..CdcConfig::default()
        }
    );
    assert!(!shown.contains("hunter2"), "{shown}");
}

/// A commit that changes a streamed table wakes the source (the `0004_cdc_notify` triggers):
/// with a 30 s poll interval, each change still arrives within a second of its commit.
/// Without the triggers the same source waits for its poll.
#[tokio::test]
async fn a_commit_wakes_the_source_long_before_its_poll() {
    let pg = Pg::start();
    let (tx, mut rx) = channel(64);
    let slow = CdcConfig {
        poll_interval_ms: 30_000,
        ..cfg(&pg, false)
    };
    let _cdc = start(slow.clone(), tx).await.unwrap();
    // Wait until the source listens (its session's last statement is the LISTEN).
    let listening = Instant::now();
    while pg.sql("SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%llamaflow_cdc%'") != "1" {
        assert!(listening.elapsed() < WAIT, "the source never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        pg.sql("SELECT count(*) FROM pg_trigger WHERE tgname LIKE '%cdc_notify'"),
        "5",
        "the migration's triggers"
    );
    for i in 0..3 {
        let committed = Instant::now();
        pg.sql(&rule_sql(&format!("w{i}"), "1h", true));
        let item = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the change within 5 s, not 30 s")
            .expect("source running");
        assert_eq!(rule(&item).id, format!("w{i}"));
        let took = committed.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "change {i} took {took:?} after its commit"
        );
    }
    // Without the triggers: only the poll reads the change.
    pg.sql("DROP TRIGGER alert_rules_cdc_notify ON alert_rules");
    pg.sql(&rule_sql("quiet", "1h", true));
    assert_quiet(&mut rx, Duration::from_secs(2)).await;
}
