//! Configuration of the SQS sink (a config-file section).

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::SqsSinkError;

/// Where and how the SQS sink sends alerts.
///
/// Deserializing (a config-file section) fills missing fields from [`Default`]; unknown fields
/// are an error. [`Default`] has no queue URL, which [`SqsSink::connect`](super::SqsSink::connect)
/// rejects: `queue_url` must be set.
///
/// Its `Debug` output never shows the secret key or the session token.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqsSinkConfig {
    /// The queue's URL; one ending in `.fifo` is a FIFO queue.
    pub queue_url: String,
    /// Endpoint override (e.g. `http://127.0.0.1:5000` for a moto server); default: AWS's.
    pub endpoint_url: Option<String>,
    /// AWS region (default `us-east-1`).
    pub region: String,
    /// Static access key id; with [`secret_access_key`](Self::secret_access_key) it replaces the
    /// standard credential provider chain (default none: use the chain).
    pub access_key_id: Option<String>,
    /// Static secret access key, paired with [`access_key_id`](Self::access_key_id).
    pub secret_access_key: Option<String>,
    /// Session token of temporary static credentials (default none).
    pub session_token: Option<String>,
    /// Sending rounds per batch before the still-pending alerts are given up (default 8, at
    /// least 1).
    pub max_attempts: u32,
    /// Backoff after the first failed round, in ms (default 100); doubles after each further
    /// failed round.
    pub initial_backoff_ms: u64,
    /// Cap of the backoff, in ms (default 5000).
    pub max_backoff_ms: u64,
    /// Timeout of one TCP (and TLS) connect, in ms (default 2000; 0 = none).
    pub connect_timeout_ms: u64,
    /// Timeout of one `SendMessageBatch` call, connect included, in ms (default 10000;
    /// 0 = none).
    pub attempt_timeout_ms: u64,
    /// `SendMessageBatch` calls in flight at once (default 8, at least 1). On a FIFO queue
    /// the alerts of one message group (user) go through one lane of calls, in order.
    pub max_concurrent_calls: usize,
}

impl Default for SqsSinkConfig {
    fn default() -> Self {
        SqsSinkConfig {
            queue_url: String::new(),
            endpoint_url: None,
            region: "us-east-1".to_string(),
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            max_attempts: 8,
            initial_backoff_ms: 100,
            max_backoff_ms: 5000,
            connect_timeout_ms: 2000,
            attempt_timeout_ms: 10_000,
            max_concurrent_calls: 8,
        }
    }
}

impl fmt::Debug for SqsSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("SqsSinkConfig")
            .field("queue_url", &self.queue_url)
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redacted(&self.secret_access_key))
            .field("session_token", &redacted(&self.session_token))
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff_ms", &self.initial_backoff_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("attempt_timeout_ms", &self.attempt_timeout_ms)
            .field("max_concurrent_calls", &self.max_concurrent_calls)
            .finish()
    }
}

impl SqsSinkConfig {
    /// Whether the queue is a FIFO queue (its URL ends in `.fifo`).
    pub fn is_fifo(&self) -> bool {
        self.queue_url.trim_end_matches('/').ends_with(".fifo")
    }

    /// Checks the fields that [`SqsSink::connect`](super::SqsSink::connect) cannot do without.
    pub(crate) fn validate(&self) -> Result<(), SqsSinkError> {
        if self.queue_url.trim().is_empty() {
            return Err(SqsSinkError::Config("queue_url must be set".into()));
        }
        if self.region.trim().is_empty() {
            return Err(SqsSinkError::Config("region must not be empty".into()));
        }
        if self.max_attempts == 0 {
            return Err(SqsSinkError::Config("max_attempts must be at least 1".into()));
        }
        if self.max_concurrent_calls == 0 {
            return Err(SqsSinkError::Config("max_concurrent_calls must be at least 1".into()));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(SqsSinkError::Config(
                "access_key_id and secret_access_key must be set together".into(),
            ));
        }
        Ok(())
    }

    /// The backoff after `failures` failed rounds (≥ 1), before jitter:
    /// `initial · 2^(failures−1)`, capped at `max`.
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u64.checked_shl(failures.saturating_sub(1)).unwrap_or(u64::MAX);
        let ms = self.initial_backoff_ms.saturating_mul(factor).min(self.max_backoff_ms);
        Duration::from_millis(ms)
    }
}
