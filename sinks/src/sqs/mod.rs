//! The SQS sink (SPEC §6): every alert of an [`OutputBatch`](crate::OutputBatch) as one SQS
//! message whose body is the alert record (SPEC §2). Market events are not sent to SQS.
//!
//! ```no_run
//! use sinks::sqs::{SqsSink, SqsSinkConfig};
//!
//! # async fn run(batch: sinks::OutputBatch) -> Result<(), sinks::sqs::SqsSinkError> {
//! let mut sink = SqsSink::connect(SqsSinkConfig {
//!     queue_url: "https://sqs.us-east-1.amazonaws.com/123456789012/alerts.fifo".to_string(),
//!     ..SqsSinkConfig::default()
//! })
//! .await?;
//! let outcome = sink.write(&batch).await?; // returns once SQS acknowledged or rejected each alert
//! for (alert, reason) in outcome.failed {
//!     // dead-letter `alert` with `reason`
//!     # let _ = (alert, reason);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # What one batch sends
//!
//! The alerts go out as `SendMessageBatch` calls of at most 10 entries, up to
//! [`SqsSinkConfig::max_concurrent_calls`] (default 8) calls in flight: the alerts are split
//! into that many lanes, each sent call after call in batch order — on a FIFO queue by
//! message group (a user's alerts share a lane, so SQS receives them in order), otherwise ten
//! by ten in turn. Each
//! message body is `serde_json` of the [`Alert`](schemas::Alert), byte for byte the alert
//! record of every other sink. On a FIFO queue (a `queue_url` ending in `.fifo`) each entry
//! also carries `MessageGroupId` = `user_id` (alerts of one user keep their order) and
//! `MessageDeduplicationId` = `alert_id` (deterministic, SPEC §2), so writing a batch again
//! within SQS's 5-minute deduplication window delivers each alert once. On a standard queue
//! delivery is at-least-once: consumers deduplicate by `alert_id`.
//!
//! # Failures and delivery
//!
//! [`SqsSink::write`] returns only when every alert was either acknowledged by SQS or given up
//! on; given-up alerts are returned in [`SqsOutcome::failed`] with a reason, for the pipeline to
//! dead-letter. Nothing is dropped silently and nothing panics.
//!
//! Sending goes in rounds, up to [`SqsSinkConfig::max_attempts`]: a round sends every pending
//! alert; what is still pending afterwards is retried in the next round, after a backoff.
//!
//! - An entry that SQS rejects inside a batch response is retried alone (the entries of the same
//!   call that succeeded are not sent again) — unless SQS flags it as the sender's fault
//!   (`SenderFault`, e.g. an invalid `MessageGroupId`): then it fails at once, since sending it
//!   again cannot succeed.
//! - A whole call that fails transiently (connection refused or reset, timeout, HTTP 5xx,
//!   throttling) retries all of that call's entries.
//! - A whole call rejected for a reason that concerns its content (e.g. `BatchRequestTooLong`,
//!   `InvalidParameterValue`) fails that call's alerts at once.
//! - A whole call rejected because the sink itself cannot work — the queue does not exist,
//!   access is denied, the credentials are missing or invalid — ends the write with
//!   [`SqsSinkError::Send`]: the batch is not durable and must not be acknowledged (alerts of
//!   earlier calls may already be in the queue; FIFO deduplication or the consumers'
//!   deduplication by `alert_id` absorbs the repeat when the batch is written again).
//!
//! The SDK's own retries are disabled: this loop is the only one. The wait after the n-th failed
//! round is `initial_backoff_ms · 2^(n−1)`, capped at `max_backoff_ms`, with "equal jitter" (a
//! uniformly random duration in [d/2, d]) — as in the Redis sink. Each call is bounded by
//! [`SqsSinkConfig::attempt_timeout_ms`], so an unreachable endpoint cannot hang a write.
//!
//! A retried entry may be delivered after later alerts of the same batch; on FIFO queues this
//! can reorder a user's alerts in that (rare) case.
//!
//! # Credentials and region
//!
//! Static credentials in the config ([`SqsSinkConfig::access_key_id`] and
//! [`SqsSinkConfig::secret_access_key`]) win; otherwise the standard AWS provider chain is used
//! (environment, shared profile files, web identity, ECS, EC2 instance metadata). The region is
//! [`SqsSinkConfig::region`]; [`SqsSinkConfig::endpoint_url`] overrides the endpoint (e.g. a
//! local moto server). TLS uses rustls with the *ring* provider and the system's root
//! certificates; plain `http://` endpoints work as well.
//!
//! # Metrics
//!
//! All with label `sink="sqs"`: counters `llamaflow_sink_written_total` (messages SQS
//! acknowledged), `llamaflow_sink_retries_total` (calls or entries sent again: one per retried
//! `SendMessageBatch` call), `llamaflow_sink_failures_total` (alerts given up on, i.e. returned
//! in [`SqsOutcome::failed`]), and histogram `llamaflow_sink_latency_seconds` (duration of a
//! `write` with at least one alert, retries included, whatever its outcome).

mod config;
mod sink;

#[cfg(test)]
mod tests;

pub use config::SqsSinkConfig;
pub use sink::{SqsOutcome, SqsSink};

/// Why the SQS sink could not be set up or could not write a batch at all.
///
/// Alerts that could not be delivered are not errors: they come back in
/// [`SqsOutcome::failed`].
#[derive(Debug, thiserror::Error)]
pub enum SqsSinkError {
    /// The configuration is unusable (no queue URL, a zero limit, half of a key pair).
    #[error("invalid SQS sink config: {0}")]
    Config(String),
    /// An alert could not be serialized to JSON.
    #[error("cannot serialize an alert for SQS: {0}")]
    Serialize(#[source] serde_json::Error),
    /// SQS refused a call for a reason no retry or dead-lettering can fix (the queue does not
    /// exist, access denied, missing or invalid credentials); the batch was not fully sent.
    #[error("cannot send epoch {epoch} to SQS queue {queue_url}: {reason}")]
    Send {
        /// The batch's epoch.
        epoch: u64,
        /// The queue.
        queue_url: String,
        /// The error, as SQS or the SDK reported it.
        reason: String,
    },
    /// SQS could not be reached (connection refused, timeouts, 5xx) for every attempt; the
    /// batch is retried as a whole later (FIFO dedup ids make the resend safe).
    #[error("SQS queue {queue_url} unavailable for epoch {epoch}: {reason}")]
    Unavailable {
        /// The batch's epoch.
        epoch: u64,
        /// The queue.
        queue_url: String,
        /// The last error.
        reason: String,
    },
}
