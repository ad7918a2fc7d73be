//! Configuration of the Postgres sink: SPEC §6 environment variables, or a config-file section.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

pub use schemas::env::{URL_VARS, redact_url, url_from_env, url_from_vars};

/// Where and how the Postgres sink writes.
///
/// Deserializing (a config-file section) fills missing fields from [`Default`]; unknown fields
/// are an error. A missing `url` is taken from the environment when connecting
/// ([`url_from_env`]); [`PgSinkConfig::from_env`] fills it in up front.
///
/// Its `Debug` output never shows the password inside `url`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PgSinkConfig {
    /// `postgres://user:password@host:port/db` (default: env `PREMIUM_DB`, then `ALERTS_DB`,
    /// then `DATABASE_URL`).
    pub url: Option<String>,
    /// Pool size (default 4, at least 1).
    pub max_connections: u32,
    /// How long one attempt may wait for a pooled connection (including connecting), in ms
    /// (default 5000).
    pub acquire_timeout_ms: u64,
    /// Upsert `price_update` events into `token_prices` (default true).
    pub write_prices: bool,
    /// Upsert `tvl_update` events into `protocol_tvl` (default true).
    pub write_tvl: bool,
    /// Retries of transient failures.
    pub retry: RetryConfig,
}

/// Exponential backoff with jitter for transient failures (connection refused or reset, pool
/// timeout, serialization failure, deadlock).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per batch before the error is returned (default 8, at least 1).
    pub max_attempts: u32,
    /// Backoff after the first failed attempt, in ms (default 100); doubles after each further
    /// failure.
    pub initial_backoff_ms: u64,
    /// Cap of the backoff, in ms (default 5000).
    pub max_backoff_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 8,
            initial_backoff_ms: 100,
            max_backoff_ms: 5000,
        }
    }
}

impl RetryConfig {
    /// The backoff before attempt `failed + 1`, after `failed` (≥ 1) failed attempts, without
    /// jitter: `initial · 2^(failed−1)`, capped at `max`.
    pub fn backoff(&self, failed: u32) -> Duration {
        crate::retry::backoff(self.initial_backoff_ms, self.max_backoff_ms, failed)
    }

    /// [`backoff`](Self::backoff) scaled by a random factor in [0.5, 1) ("equal jitter"), so
    /// writers that failed together do not retry together.
    pub fn backoff_with_jitter(&self, failed: u32) -> Duration {
        crate::retry::jittered(self.backoff(failed))
    }
}

impl Default for PgSinkConfig {
    fn default() -> Self {
        PgSinkConfig {
            url: None,
            max_connections: 4,
            acquire_timeout_ms: 5000,
            write_prices: true,
            write_tvl: true,
            retry: RetryConfig::default(),
        }
    }
}

impl fmt::Debug for PgSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSinkConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout_ms", &self.acquire_timeout_ms)
            .field("write_prices", &self.write_prices)
            .field("write_tvl", &self.write_tvl)
            .field("retry", &self.retry)
            .finish()
    }
}

impl PgSinkConfig {
    /// The defaults with `url` from `PREMIUM_DB`, `ALERTS_DB` or `DATABASE_URL`.
    pub fn from_env() -> Self {
        PgSinkConfig {
            url: url_from_env(),
            ..PgSinkConfig::default()
        }
    }

    /// The URL to connect to: `url`, else the environment.
    pub fn effective_url(&self) -> Option<String> {
        self.url.clone().filter(|u| !u.trim().is_empty()).or_else(url_from_env)
    }

    /// The acquire timeout as a [`Duration`].
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.acquire_timeout_ms)
    }
}
