//! The Redis sink (SPEC §6): latest values under `price:`, `tvl:` and `gas:` keys, and pub/sub
//! of market events and alerts.
//!
//! ```no_run
//! use sinks::redis::{RedisSink, RedisSinkConfig};
//!
//! # async fn run(batch: sinks::OutputBatch) -> Result<(), sinks::redis::RedisSinkError> {
//! let mut sink = RedisSink::connect(RedisSinkConfig::from_env()?).await?;
//! sink.write(&batch).await?; // returns once Redis has replied to every command of the batch
//! # Ok(())
//! # }
//! ```
//!
//! # What one batch writes
//!
//! All commands of an [`OutputBatch`](crate::OutputBatch) go to Redis as one pipeline (one
//! round trip, not a transaction), in this order:
//!
//! 1. Latest values, each `SET <key> <json> EX <ttl_secs>`:
//!    - `price:<coin>` = `{"price","symbol","timestamp","confidence","decimals"}` (a DeFiLlama
//!      `/prices/current` entry) from `price_update` events;
//!    - `tvl:<protocol_id>` = `{"tvl","chainTvls","change_1h","change_1d","change_7d","timestamp"}`
//!      from `tvl_update` events;
//!    - `gas:<chain>` = `{"gwei","timestamp"}` from `gas_update` events.
//!
//!    `timestamp` is unix seconds; unknown optional fields are `null`. When a batch holds several
//!    values for one key only the newest is written (largest event time; on a tie the later one
//!    in the batch).
//! 2. Unless [`RedisSinkConfig::publish`] is off: `PUBLISH events:<channel> <data>` for every
//!    market event on every WebSocket channel of [`Event::channels`](schemas::Event::channels)
//!    (`events:prices`, `events:prices:<coin>`, `events:chain:<chain>`, …), where `<data>` is
//!    the event's serialized `data` — byte for byte the `data` of the WebSocket frame — and
//!    `PUBLISH events:alerts:<user_id> <alert JSON>` for every alert (the `data` of the
//!    WebSocket alert frame). The keys are set before the publications, so a subscriber that
//!    reads a key on a message sees at least that value.
//!
//! # Failures and delivery
//!
//! [`RedisSink::write`] returns only after Redis replied to the whole pipeline. On a connection
//! error (refused, reset, timeout) or a transient server state (`LOADING`, `READONLY`,
//! `TRYAGAIN`, `MASTERDOWN`, `CLUSTERDOWN`) it drops the connection, waits, reconnects and
//! sends the *whole* batch again, up to [`RedisSinkConfig::max_attempts`] attempts; then it
//! returns [`RedisSinkError::Write`]. It never drops a batch silently and never panics. Other
//! errors (authentication, a bad DB index, a rejected command) are returned at once.
//!
//! The wait after the n-th failed attempt is `initial_backoff_ms · 2^(n−1)`, capped at
//! `max_backoff_ms`, with "equal jitter": a uniformly random duration in [d/2, d]. With the
//! defaults (8 attempts, 100 ms, 5 s) a batch is retried for at least 5.6 s and at most 11.3 s
//! (plus the attempts themselves).
//!
//! A retried batch is written again in full: `SET` is idempotent, but publications are
//! **at-least-once** — a subscriber may see a message twice when a connection broke after Redis
//! executed part of the pipeline. Alert consumers deduplicate by `alert_id` (deterministic,
//! SPEC §2); event consumers treat events as latest-value updates.
//!
//! Writing the keys across batches is last-writer-wins: the pipeline writes epochs in order, and
//! accepted records of one key arrive in event-time order, so a later batch never carries an
//! older value of a key than an earlier batch.
//!
//! # Metrics
//!
//! All with label `sink="redis"`: counters `llamaflow_sink_written_total` (commands — `SET`s and
//! `PUBLISH`es — of batches Redis acknowledged), `llamaflow_sink_retries_total` (attempts that
//! failed and were retried, connects included) and `llamaflow_sink_failures_total` (batches
//! given up on), and histogram `llamaflow_sink_latency_seconds` (duration of a non-empty
//! `write`, retries included, whatever its outcome).

mod config;
mod sink;

#[cfg(test)]
mod tests;

pub use config::RedisSinkConfig;
pub use sink::RedisSink;

/// Why the Redis sink could not connect or write.
#[derive(Debug, thiserror::Error)]
pub enum RedisSinkError {
    /// The configuration is unusable (a bad URL, port or limit).
    #[error("invalid Redis sink config: {0}")]
    Config(String),
    /// A value could not be serialized to JSON.
    #[error("cannot serialize {what} for Redis: {source}")]
    Serialize {
        /// What was being serialized.
        what: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// Connecting failed: for good (authentication, DB index), or on every attempt.
    #[error("cannot connect to Redis at {addr} ({attempts} attempt(s)): {source}")]
    Connect {
        /// `host:port` (never the password).
        addr: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        #[source]
        source: redis::RedisError,
    },
    /// A batch was not written: a permanent error, or connection errors on every attempt.
    #[error("cannot write epoch {epoch} to Redis ({attempts} attempt(s)): {source}")]
    Write {
        /// The batch's epoch.
        epoch: u64,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        #[source]
        source: redis::RedisError,
    },
}
