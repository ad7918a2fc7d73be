//! Configuration of the webhook sink (a config-file section).

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::WebhookError;

/// How the webhook sink signs, times out and retries deliveries.
///
/// Deserializing (a config-file section) fills missing fields from [`Default`]; unknown fields
/// are an error. [`Default`] has an empty secret, which [`WebhookSink::new`](super::WebhookSink::new)
/// rejects: `secret` must be set.
///
/// Its `Debug` output never shows the secret.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// The HMAC-SHA256 key of the `x-llamaflow-signature` header (non-empty).
    pub secret: String,
    /// Timeout of one delivery attempt, connect included, in ms (default 5000, at least 1).
    pub timeout_ms: u64,
    /// Attempts per delivery before it is given up (default 5, at least 1).
    pub max_attempts: u32,
    /// Backoff after the first failed attempt, in ms (default 200); doubles after each further
    /// failure.
    pub initial_backoff_ms: u64,
    /// Cap of the backoff, in ms (default 10000).
    pub max_backoff_ms: u64,
    /// Deliveries in flight at once (default 16, at least 1).
    pub concurrency: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            secret: String::new(),
            timeout_ms: 5000,
            max_attempts: 5,
            initial_backoff_ms: 200,
            max_backoff_ms: 10_000,
            concurrency: 16,
        }
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("secret", &"<redacted>")
            .field("timeout_ms", &self.timeout_ms)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff_ms", &self.initial_backoff_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl WebhookConfig {
    /// Checks the limits and the secret.
    pub(crate) fn validate(&self) -> Result<(), WebhookError> {
        if self.secret.is_empty() {
            return Err(WebhookError::Config("secret must be set".into()));
        }
        if self.timeout_ms == 0 {
            return Err(WebhookError::Config("timeout_ms must be at least 1".into()));
        }
        if self.max_attempts == 0 {
            return Err(WebhookError::Config("max_attempts must be at least 1".into()));
        }
        if self.concurrency == 0 {
            return Err(WebhookError::Config("concurrency must be at least 1".into()));
        }
        Ok(())
    }

    /// The timeout of one attempt.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The backoff after `failures` failed attempts (≥ 1), before jitter:
    /// `initial · 2^(failures−1)`, capped at `max`.
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u64.checked_shl(failures.saturating_sub(1)).unwrap_or(u64::MAX);
        let ms = self.initial_backoff_ms.saturating_mul(factor).min(self.max_backoff_ms);
        Duration::from_millis(ms)
    }
}
