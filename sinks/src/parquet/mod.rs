//! Parquet datasets (SPEC §7): `<dir>/<kind>/date=YYYY-MM-DD/part-*.parquet` for the kinds
//! `prices`, `tvl`, `events` and `alerts`, zstd-compressed, typed columns, readable by DuckDB
//! and pyarrow (`read_parquet('<dir>/prices/*/*.parquet', hive_partitioning = true)`).
//!
//! Two users share one writer ([`PartitionedWriter`]):
//!
//! - `llamaflow export --parquet DIR` (batch): one part file per kind and UTC date.
//! - [`ParquetSink`], the `[sinks.parquet]` sink of the continuous job: one part file per kind
//!   and rollover period (hourly by default), closed when event time moves past the period and
//!   at shutdown.
//!
//! # Files appear atomically
//!
//! A part is written as `.part-<name>.parquet.tmp` (hidden from `*.parquet` globs), and on
//! close the footer is written, the file fsynced, renamed to `part-<name>.parquet` and the
//! directory fsynced. Readers never see a half-written file.
//!
//! # Columns ([`Table::schema`])
//!
//! | kind | columns |
//! |---|---|
//! | prices | `coin` string, `price` double, `timestamp` timestamp(ms, UTC), `symbol` string?, `confidence` double?, `decimals` int32? |
//! | tvl | `protocol_id` string, `chain` string, `tvl` double, `timestamp` timestamp(ms, UTC), `extra` bool |
//! | events | `type` string, `subject` string, `timestamp` timestamp(ms, UTC), `value` double?, `chain_tvls` map<string, double>?, `data` string (JSON) |
//! | alerts | `alert_id`, `rule_id`, `user_id`, `alert_type`, `subject` string, `triggered_at` timestamp(ms, UTC), `value`, `threshold` double, `message` string, `channels` list<string>, `webhook_url` string? |
//!
//! TVL is long-format: one row per (protocol, chain, time); DynamoDB sub-buckets
//! (`ethereum-staking`, `pool2`, …) are rows with `extra = true` (not counted in TVL, SPEC §1),
//! so `SUM(tvl) WHERE NOT extra` is a protocol's total. An event's `value` is its headline
//! number (price for `price_update`/`depeg`, total TVL for `tvl_update`, USD value for
//! `whale_transfer`/`liquidation`, gwei for `gas_update`); `chain_tvls` is the `tvl_update`'s
//! per-chain map as a Parquet MAP; `data` is the full SPEC §3 `data` object as JSON.
//!
//! # Durability of the sink
//!
//! A Parquet file cannot be appended to once its footer is written, and rows in an unclosed
//! file are unreadable after a crash. So [`ParquetSink::write_blocking`] appends every batch's rows to
//! a spool beside the open part (`.part-<name>.spool.arrows`, Arrow IPC stream) and fsyncs it
//! before returning: the pipeline acknowledges an epoch (and commits source positions) only
//! when its rows are on disk. Closing a part writes the Parquet file from its row groups,
//! renames it, then deletes the spool. [`ParquetSink::open`] recovers spools left by a crash:
//! it writes their rows as the part file they were meant for (or just deletes the spool when
//! that file already exists, i.e. the crash came between rename and delete). Epochs written
//! after the last commit are delivered again after a restart, so rows can repeat
//! (at-least-once, like the JSONL sink; alerts carry `alert_id`).

mod config;
mod sink;
mod table;
mod writer;

#[cfg(test)]
mod tests;

pub use config::{ParquetSinkConfig, Rollover};
pub use sink::ParquetSink;
pub use table::Table;
pub use writer::{DAY_MS, DEFAULT_ROW_GROUP_ROWS, PartitionedWriter, WriteStats, WriterOptions, recover};

/// Why a Parquet dataset could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ParquetError {
    /// The configuration is unusable (names the field).
    #[error("parquet sink config: {0}")]
    Config(String),
    /// A file or directory operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Encoding rows failed (Parquet or Arrow).
    #[error("cannot encode {}: {reason}", path.display())]
    Encode {
        /// The file being written.
        path: std::path::PathBuf,
        /// The encoder's message.
        reason: String,
    },
}

impl ParquetError {
    pub(crate) fn io(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        ParquetError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn encode(path: &std::path::Path, reason: impl std::fmt::Display) -> Self {
        ParquetError::Encode {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}
