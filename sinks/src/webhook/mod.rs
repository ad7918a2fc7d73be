//! The webhook sink (SPEC §2 `channels` / `webhook_url`): every alert whose `channels` contains
//! `"webhook"` and whose `webhook_url` is set is POSTed to that URL, signed with a shared secret.
//!
//! ```no_run
//! use sinks::webhook::{WebhookConfig, WebhookSink};
//!
//! # async fn run(batch: sinks::OutputBatch) -> Result<(), sinks::webhook::WebhookError> {
//! let mut sink = WebhookSink::new(WebhookConfig {
//!     secret: "s3cret".to_string(),
//!     ..WebhookConfig::default()
//! })?;
//! let outcome = sink.write(&batch).await?; // every delivery done or given up on
//! for (alert, reason) in outcome.failed {
//!     // dead-letter `alert` with `reason`
//!     # let _ = (alert, reason);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # The request
//!
//! `POST <webhook_url>` with body = `serde_json` of the [`Alert`](schemas::Alert) (the SPEC §2
//! alert record, byte for byte that of every other sink) and headers:
//!
//! - `content-type: application/json`
//! - `x-llamaflow-signature: sha256=<hex>`: the lowercase hex HMAC-SHA256 of the exact body bytes
//!   keyed with [`WebhookConfig::secret`] (see [`sign`]); receivers recompute it over the raw
//!   body and compare in constant time;
//! - `x-llamaflow-alert-id: <alert_id>`: deterministic (SPEC §2), the receiver's idempotency key
//!   — a retried or replayed delivery carries the same id.
//!
//! Alerts without the `webhook` channel, or without a (non-empty) `webhook_url`, are not sent.
//! Redirects are not followed (a 3xx is a permanent failure): a signed alert goes only to the
//! URL its rule names.
//!
//! # Failures and delivery
//!
//! Deliveries run concurrently, at most [`WebhookConfig::concurrency`] at a time. Each is tried
//! up to [`WebhookConfig::max_attempts`] times: connection errors, timeouts (each attempt is
//! bounded by [`WebhookConfig::timeout_ms`], connect included), HTTP 5xx and 429 are retried
//! after a backoff; any other non-2xx status (400, 401, 404, 410, …), a 3xx and an unusable URL
//! fail at once. [`WebhookSink::write`] returns when every delivery succeeded or was given up
//! on; given-up alerts are in [`WebhookOutcome::failed`] with the reason of their last failure,
//! for the pipeline to dead-letter. Nothing is dropped silently and nothing panics.
//!
//! The wait after the n-th failed attempt of a delivery is `initial_backoff_ms · 2^(n−1)`,
//! capped at `max_backoff_ms`, with "equal jitter" (uniformly random in [d/2, d]). With the
//! defaults (5 attempts, 200 ms, 10 s) a failing endpoint is retried for 1.5–3 s plus the
//! attempts themselves (at most 5 × 5 s of timeouts).
//!
//! Delivery is at-least-once: a receiver that answered too late (after the timeout) gets the
//! alert again; it deduplicates by `x-llamaflow-alert-id`.
//!
//! # Metrics
//!
//! All with label `sink="webhook"`: counters `llamaflow_sink_written_total` (alerts delivered,
//! i.e. answered with a 2xx), `llamaflow_sink_retries_total` (attempts that failed and were
//! retried), `llamaflow_sink_failures_total` (alerts given up on), and histogram
//! `llamaflow_sink_latency_seconds` (duration of a `write` with at least one webhook alert,
//! retries included, whatever its outcome).

mod config;
mod sink;

#[cfg(test)]
mod tests;

pub use config::WebhookConfig;
pub use sink::{WEBHOOK_CHANNEL, WebhookOutcome, WebhookSink, sign, webhook_target};

/// Why the webhook sink could not be set up or could not write a batch at all.
///
/// Deliveries that failed are not errors: they come back in [`WebhookOutcome::failed`].
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The configuration is unusable (no secret, a zero limit).
    #[error("invalid webhook sink config: {0}")]
    Config(String),
    /// The HTTP client could not be built (e.g. no TLS root certificates).
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// An alert could not be serialized to JSON.
    #[error("cannot serialize an alert for a webhook: {0}")]
    Serialize(#[source] serde_json::Error),
}
