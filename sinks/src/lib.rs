//! llamaflow sinks: where the pipeline's outputs go.
//!
//! - [`websocket`]: the live WebSocket fanout (SPEC §5) — a [`websocket::Hub`] that the
//!   dataflow workers publish market events and alerts into, and an axum router serving
//!   `GET /ws` to subscribers.
//! - [`Sink`]: the contract of every durable sink (write an epoch's batch durably, then
//!   acknowledge it); [`BlockingSink`] + [`OffRuntime`] for the ones that write files.
//! - [`jsonl`]: JSON-lines files: alerts, events and the dead-letter output.
//! - [`redis`]: latest values (`price:`, `tvl:`, `gas:` keys) and pub/sub of events and alerts
//!   (SPEC §6), one pipelined round trip per [`OutputBatch`], retried on connection errors.
//! - [`postgres`]: `alert_history`, `token_prices` and `protocol_tvl` (SPEC §6) as idempotent
//!   batch upserts, one transaction per [`OutputBatch`]; and [`postgres::migrate`].
//! - [`sqs`]: every alert as an SQS message (SPEC §6; FIFO group = user, deduplication id =
//!   alert id), retried with backoff; alerts given up on come back for dead-lettering.
//! - [`webhook`]: signed HTTP POSTs of alerts to their rule's `webhook_url` (SPEC §2), bounded
//!   concurrency, retried with backoff; failed deliveries come back for dead-lettering.
//! - [`parquet`]: Parquet datasets (SPEC §7) — the partitioned writer of `llamaflow export`
//!   and the hourly-rolling, spooled sink of the continuous job.
//!
//! Every sink consumes the shapes defined in the `schemas` crate (`schemas::Event`,
//! `schemas::Alert`); none of them defines a wire format of its own.

pub mod batch;
pub use batch::OutputBatch;
pub mod jsonl;
pub mod kafka;
pub mod notify;
pub mod parquet;
pub mod postgres;
pub mod redis;
pub mod retry;
mod sink;
pub use sink::{BlockingSink, OffRuntime, Sink, SinkError, Written};
pub mod sqs;
#[cfg(test)]
mod test_support;
pub mod webhook;
pub mod websocket;

/// An error and its sources, `: `-separated (an HTTP client's own message alone says little).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(src) = next {
        let msg = src.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        next = src.source();
    }
    s
}
