//! Postgres change data capture (SPEC §6): `alert_rules`, `protocols`, `api_keys`, `users` and
//! `user_devices` through a logical replication slot with the wal2json output plugin.
//!
//! ```no_run
//! use sources::postgres_cdc::{CdcConfig, start};
//! use sources::live::Ack;
//!
//! # async fn run() -> Result<(), sources::postgres_cdc::CdcError> {
//! let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
//! let cdc = start(CdcConfig::from_env(), tx).await?;
//! while let Some(item) = rx.recv().await {
//!     // ... apply item.change; once everything up to it is durable downstream:
//!     if let Ack::Lsn(lsn) = item.ack {
//!         cdc.confirm(lsn).await?;
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # What is delivered
//!
//! - With `snapshot = true`, once the slot exists: every current row of the configured tables,
//!   read in one REPEATABLE READ transaction, with [`Ack::None`](crate::live::Ack::None) and
//!   position `<table>@0`. Then the stream from the slot's confirmed position. Changes that
//!   committed between that position and the snapshot are delivered again after it; they are
//!   upserts and deletes applied in commit order, so the state ends up right.
//! - `alert_rules` insert/update → `Record::Rule` (the `jsonb` columns parsed, then
//!   [`schemas::parse_rule_value`]); delete → `DeleteRule(id)`. `protocols` → `Record::Protocol`
//!   / `DeleteProtocol(id)`. `api_keys` → `ApiKey { key, user_id }` with `user_id: None` when
//!   the key is revoked or deleted. `users` → `User(Contact)` / `DeleteUser(id)` and
//!   `user_devices` → `Device` / `DeleteDevice(id)` (the alert channels' recipients). An update that changes the primary key first deletes the
//!   old key.
//! - A row that fails validation becomes `Change::Dead` (source `<table>@<X/Y lsn>`, or
//!   `<table>@snapshot`; raw = the row as JSON) and the stream goes on. A TRUNCATE is
//!   dead-lettered too (its rows cannot be named): restart with `snapshot = true` after one.
//! - Columns missing from an update (unchanged values stored out of line, which wal2json
//!   leaves out) are taken from the old row image when the table has REPLICA IDENTITY FULL,
//!   else read from the table.
//!
//! # Positions and acknowledgement
//!
//! Every item's `pos` is `<table>@` + the change's own LSN. wal2json emits whole transactions
//! in commit order, but changes of overlapping transactions have interleaved LSNs, so the
//! commit position is the only safe resume point: the *last* item of each transaction carries
//! [`Ack::Lsn`](crate::live::Ack::Lsn) with the end LSN of its commit record, the others
//! `Ack::None`. [`CdcHandle::confirm`] advances the slot there (`pg_replication_slot_advance`),
//! never backwards and never past what was delivered. A restart resumes from the slot: every
//! transaction not confirmed is delivered again (whole), nothing confirmed is. Polling uses
//! `pg_logical_slot_peek_changes`, which does not consume; the source skips transactions it
//! already delivered.
//!
//! # Heartbeats and lag
//!
//! Every `heartbeat_secs` the source writes a WAL message (`pg_logical_emit_message`) and, when
//! everything it delivered is confirmed, advances the slot to the furthest position it has
//! decoded (the last heartbeat or unrelated transaction seen) — not to `pg_current_wal_lsn()`,
//! which could skip a change committed after the last poll. So an idle database does not pin
//! WAL. Metrics: gauge `llamaflow_cdc_lag_bytes` (current WAL position − the slot's confirmed
//! position, updated on heartbeats), counters `llamaflow_cdc_changes_total{table}` (items
//! delivered, snapshot rows included) and `llamaflow_cdc_errors_total` (failed polls; the
//! source keeps retrying with backoff).
//!
//! # Server setup
//!
//! `wal_level = logical`, the wal2json plugin installed (Debian `postgresql-NN-wal2json`), a
//! user with the REPLICATION attribute. Servers that restrict output plugins with
//! `output_plugin_libraries` must list `wal2json` there.

mod config;
mod decode;
mod stream;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::mpsc::Sender;
use tokio::task::JoinHandle;

pub use config::{CdcConfig, CdcTable, URL_VARS, url_from_env};
pub use decode::{format_lsn, parse_lsn};

use crate::live::LiveItem;
use stream::{Shared, Streamer};

/// Why the CDC source could not start, or a confirmation failed.
#[derive(Debug, thiserror::Error)]
pub enum CdcError {
    /// The configuration is unusable (names the field).
    #[error("postgres CDC config: {0}")]
    Config(String),
    /// The database could not be reached.
    #[error("postgres CDC: cannot connect: {0}")]
    Connect(#[source] sqlx::Error),
    /// The replication slot could not be created or is unusable.
    #[error("postgres CDC: replication slot `{slot}`: {reason}")]
    Slot {
        /// Slot name.
        slot: String,
        /// What was wrong (the server's message and hint).
        reason: String,
    },
    /// The snapshot could not be read.
    #[error("postgres CDC: snapshot of {table}: {source}")]
    Snapshot {
        /// The table being read.
        table: &'static str,
        /// The error.
        #[source]
        source: sqlx::Error,
    },
    /// A query failed (e.g. advancing the slot).
    #[error("postgres CDC: {0}")]
    Sql(#[from] sqlx::Error),
}

/// The running source: confirm progress, stop it. Dropping it stops the source too.
pub struct CdcHandle {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
    snapshot_len: usize,
}

impl std::fmt::Debug for CdcHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CdcHandle")
            .field("slot", &self.shared.slot)
            .field("confirmed", &format_lsn(self.confirmed()))
            .finish_non_exhaustive()
    }
}

impl CdcHandle {
    /// Everything up to `lsn` (an [`Ack::Lsn`](crate::live::Ack::Lsn) value) has been applied
    /// and is durable downstream: advance the slot to it. Ignores an `lsn` at or below the
    /// confirmed position, and never advances past the last acknowledgement delivered.
    pub async fn confirm(&self, lsn: u64) -> Result<(), CdcError> {
        let target = lsn.min(self.shared.delivered_ack());
        self.shared.advance(target).await.map(|_| ()).map_err(CdcError::Sql)
    }

    /// How many snapshot items the source sends first, before any streamed change.
    pub fn snapshot_len(&self) -> usize {
        self.snapshot_len
    }

    /// The slot's confirmed position as this source last set or read it.
    pub fn confirmed(&self) -> u64 {
        self.shared.confirmed()
    }

    /// The slot name.
    pub fn slot(&self) -> &str {
        &self.shared.slot
    }

    /// Whether the source task has ended (its channel's receiver was dropped).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the source task and closes its connections.
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.shared.pool.close().await;
    }
}

impl Drop for CdcHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts the source: connects, creates the slot (wal2json) when absent, reads the snapshot
/// when `cfg.snapshot`, then spawns the task that delivers the snapshot and streams changes
/// into `tx` (see the [module docs](self)). Errors here are fatal configuration or server
/// problems; once started, the source retries failed polls by itself.
pub async fn start(cfg: CdcConfig, tx: Sender<LiveItem>) -> Result<CdcHandle, CdcError> {
    let (url, tables) = cfg.validate()?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
        .map_err(CdcError::Connect)?;
    let confirmed = ensure_slot(&pool, &cfg.slot).await?;
    let snapshot = if cfg.snapshot {
        stream::read_snapshot(&pool, &tables).await?
    } else {
        Vec::new()
    };
    let shared = Arc::new(Shared::new(pool, cfg.slot.clone(), confirmed));
    let streamer = Streamer::new(shared.clone(), &cfg, tables, tx, confirmed);
    let snapshot_len = snapshot.len();
    let task = tokio::spawn(streamer.run(snapshot));
    Ok(CdcHandle {
        shared,
        task: Some(task),
        snapshot_len,
    })
}

/// `pg_replication_slots` columns: plugin, slot_type, in this database, confirmed_flush_lsn.
type SlotRow = (Option<String>, Option<String>, bool, Option<String>);

/// Creates the slot when absent; checks an existing one. Returns its confirmed position.
async fn ensure_slot(pool: &PgPool, slot: &str) -> Result<u64, CdcError> {
    let slot_err = |reason: String| CdcError::Slot {
        slot: slot.to_string(),
        reason,
    };
    for _ in 0..2 {
        let existing: Option<SlotRow> = sqlx::query_as(
            "SELECT plugin::text, slot_type, database = current_database(), confirmed_flush_lsn::text \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(slot)
        .fetch_optional(pool)
        .await
        .map_err(|e| slot_err(describe(&e)))?;
        if let Some((plugin, kind, same_db, confirmed)) = existing {
            if kind.as_deref() != Some("logical") || plugin.as_deref() != Some("wal2json") {
                return Err(slot_err(format!(
                    "exists as a {} slot with plugin {}; expected a logical wal2json slot",
                    kind.as_deref().unwrap_or("?"),
                    plugin.as_deref().unwrap_or("none")
                )));
            }
            if !same_db {
                return Err(slot_err("belongs to another database".to_string()));
            }
            return confirmed
                .as_deref()
                .and_then(parse_lsn)
                .ok_or_else(|| slot_err("has no confirmed position".to_string()));
        }
        match sqlx::query("SELECT pg_create_logical_replication_slot($1, 'wal2json')")
            .bind(slot)
            .execute(pool)
            .await
        {
            Ok(_) => tracing::info!(slot, "created logical replication slot (wal2json)"),
            // Created concurrently by another process: read it again.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42710") => {}
            Err(e) => return Err(slot_err(describe(&e))),
        }
    }
    Err(slot_err("could not be created".to_string()))
}

/// A database error's message with its hint, when the server gave one.
fn describe(e: &sqlx::Error) -> String {
    if let sqlx::Error::Database(db) = e
        && let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        && let Some(hint) = pg.hint()
    {
        return format!("{} (hint: {hint})", pg.message());
    }
    e.to_string()
}

impl crate::live::LiveSource for CdcHandle {
    fn name(&self) -> &'static str {
        "postgres_cdc"
    }

    /// Confirms `positions.lsn` to the slot (never past what was delivered).
    fn commit<'a>(
        &'a self,
        positions: &'a crate::live::Positions,
    ) -> futures_util::future::BoxFuture<'a, Result<(), crate::live::CommitError>> {
        Box::pin(async move {
            match positions.lsn {
                Some(lsn) => Ok(self.confirm(lsn).await?),
                None => Ok(()),
            }
        })
    }

    fn stop(self: Box<Self>) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(CdcHandle::stop(*self))
    }
}

impl CdcConfig {
    /// Resumes after a checkpoint: the rules, protocols and keys are in the restored state,
    /// so no snapshot is read; the slot streams from its confirmed position.
    pub fn resume_from(&mut self, _positions: &crate::live::Positions) {
        self.snapshot = false;
    }
}
