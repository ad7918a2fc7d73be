//! The Postgres sink (SPEC §6): alerts into `alert_history`, `price_update` events into
//! `token_prices` and `tvl_update` events into `protocol_tvl`, as idempotent batch upserts.
//!
//! ```no_run
//! use sinks::postgres::{PgSink, PgSinkConfig, migrate};
//!
//! # async fn run(batch: sinks::OutputBatch) -> Result<(), sinks::postgres::PgError> {
//! let mut sink = PgSink::connect(PgSinkConfig::from_env()).await?;
//! migrate(sink.pool()).await?;
//! sink.write(&batch).await?; // durable once this returns
//! # Ok(())
//! # }
//! ```
//!
//! # Writes
//!
//! - One statement per table per batch (`INSERT … SELECT … FROM UNNEST($1::text[], …)`), all
//!   tables of a batch in one transaction: a batch is durable as a whole or not at all, and
//!   [`PgSink::write`] returns only after the commit.
//! - `alert_history`: `ON CONFLICT (alert_id) DO NOTHING` (an alert is immutable).
//!   `token_prices` (coin, timestamp) and `protocol_tvl` (protocol_id, chain, timestamp):
//!   `ON CONFLICT … DO UPDATE` when a value differs. `protocol_tvl` gets one row per chain of
//!   `chainTvls` plus `chain = 'total'` for the protocol total.
//! - Rows with the same key within a batch are merged before the statement (the last one wins;
//!   for alerts the first), and rows are sorted by key, so concurrent writers lock in one order.
//! - Transient failures (connection refused or reset, pool timeout, serialization failure,
//!   deadlock, server shutting down) are retried with exponential backoff and jitter up to
//!   [`RetryConfig::max_attempts`]; the pool reconnects by itself once the server is back.
//!
//! # Metrics
//!
//! `llamaflow_sink_written_total{sink="postgres"}` (rows submitted, after merging),
//! `llamaflow_sink_retries_total{sink="postgres"}`, `llamaflow_sink_failures_total{sink="postgres"}`
//! (batches given up on) and the histogram `llamaflow_sink_latency_seconds{sink="postgres"}`
//! (one [`PgSink::write`] call, retries included).

mod config;
mod sink;
#[cfg(test)]
mod tests;

pub use config::{PgSinkConfig, RetryConfig, URL_VARS, redact_url, url_from_env, url_from_vars};
pub use sink::PgSink;

use schemas::migrations::{ALL, BOOKKEEPING};

/// Why the Postgres sink failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The configuration is unusable (names the field).
    #[error("postgres sink config: {0}")]
    Config(String),
    /// The database could not be reached.
    #[error("cannot connect to postgres after {attempts} attempt(s): {source}")]
    Connect {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        #[source]
        source: sqlx::Error,
    },
    /// A migration failed (it was rolled back).
    #[error("migration {name} failed: {source}")]
    Migrate {
        /// Migration name (or `llamaflow_migrations` for the bookkeeping table).
        name: String,
        /// The error.
        #[source]
        source: sqlx::Error,
    },
    /// A batch could not be written (nothing of it was committed).
    #[error("postgres write failed after {attempts} attempt(s): {source}")]
    Write {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        #[source]
        source: sqlx::Error,
    },
}

/// Advisory lock key serializing migrations across processes ("llamaflw").
const MIGRATION_LOCK: i64 = 0x6c6c_616d_6166_6c77;

/// Applies every migration of [`schemas::migrations::ALL`] not yet recorded in
/// `llamaflow_migrations`, oldest first, each in its own transaction together with its record.
/// Returns the names applied (empty when the schema is current).
///
/// Safe to call concurrently: every step holds a transaction-scoped advisory lock, so a second
/// caller waits and then finds the migrations recorded.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<Vec<String>, PgError> {
    let bookkeeping = |source| PgError::Migrate {
        name: "llamaflow_migrations".to_string(),
        source,
    };
    let mut tx = pool.begin().await.map_err(bookkeeping)?;
    lock(&mut tx).await.map_err(bookkeeping)?;
    sqlx::raw_sql(BOOKKEEPING)
        .execute(&mut *tx)
        .await
        .map_err(bookkeeping)?;
    tx.commit().await.map_err(bookkeeping)?;

    let mut applied = Vec::new();
    for (name, sql) in ALL {
        let failed = |source| PgError::Migrate {
            name: name.to_string(),
            source,
        };
        let mut tx = pool.begin().await.map_err(failed)?;
        lock(&mut tx).await.map_err(failed)?;
        let done: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM llamaflow_migrations WHERE name = $1)")
            .bind(*name)
            .fetch_one(&mut *tx)
            .await
            .map_err(failed)?;
        if done {
            continue;
        }
        sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(failed)?;
        sqlx::query("INSERT INTO llamaflow_migrations (name) VALUES ($1)")
            .bind(*name)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        tracing::info!(migration = name, "applied migration");
        applied.push(name.to_string());
    }
    Ok(applied)
}

async fn lock(tx: &mut sqlx::PgTransaction<'_>) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut **tx)
        .await
        .map(|_| ())
}
