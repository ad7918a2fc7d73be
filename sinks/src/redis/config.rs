//! Configuration of the Redis sink: SPEC §6 environment variables, or a config-file section.

use std::fmt;
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};
use serde::Deserialize;

use super::RedisSinkError;

/// Where and how the Redis sink writes.
///
/// [`Default`] is the built-in defaults (no environment); [`RedisSinkConfig::from_env`] reads
/// `REDIS_HOST`, `REDIS_PORT`, `REDIS_PASSWORD` and `REDIS_DB` over them. Deserializing (a
/// config-file section) fills missing fields from [`Default`]; unknown fields are an error.
///
/// When [`url`](Self::url) is set it is used as is and `host`, `port`, `password` and `db` are
/// ignored: the URL carries them (`redis://[user][:password@]host[:port][/db]`; a URL without a
/// `/db` path selects DB 0, as every Redis client does).
///
/// Its `Debug` output never shows the password (nor the password inside `url`).
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSinkConfig {
    /// Server host (default `127.0.0.1`; env `REDIS_HOST`).
    pub host: String,
    /// Server port (default 6379; env `REDIS_PORT`).
    pub port: u16,
    /// Password for `AUTH` (default none; env `REDIS_PASSWORD`, an empty value means none).
    pub password: Option<String>,
    /// Database index selected on every connection (default 1; env `REDIS_DB`).
    pub db: i64,
    /// A `redis://` URL overriding `host`, `port`, `password` and `db`.
    pub url: Option<String>,
    /// Expiry of the `price:`, `tvl:` and `gas:` keys, in seconds (default 3600, at least 1).
    pub ttl_secs: u64,
    /// Attempts per batch (and per connect) before giving up on connection errors (default 8,
    /// at least 1).
    pub max_attempts: u32,
    /// Backoff after the first failed attempt, in ms (default 100); doubles after each further
    /// failure.
    pub initial_backoff_ms: u64,
    /// Cap of the backoff, in ms (default 5000).
    pub max_backoff_ms: u64,
    /// Timeout of one connection attempt (TCP connect, `AUTH`, `SELECT`), in ms (default 2000).
    pub connect_timeout_ms: u64,
    /// Timeout of one batch's pipeline round trip, in ms (default 10000).
    pub response_timeout_ms: u64,
    /// Publish market events and alerts on pub/sub channels (default true).
    pub publish: bool,
}

impl Default for RedisSinkConfig {
    fn default() -> Self {
        RedisSinkConfig {
            host: "127.0.0.1".to_string(),
            port: 6379,
            password: None,
            db: 1,
            url: None,
            ttl_secs: 3600,
            max_attempts: 8,
            initial_backoff_ms: 100,
            max_backoff_ms: 5000,
            connect_timeout_ms: 2000,
            response_timeout_ms: 10_000,
            publish: true,
        }
    }
}

impl fmt::Debug for RedisSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSinkConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .field("url", &self.url.as_deref().map(redact_url))
            .field("ttl_secs", &self.ttl_secs)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff_ms", &self.initial_backoff_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("response_timeout_ms", &self.response_timeout_ms)
            .field("publish", &self.publish)
            .finish()
    }
}

/// A URL with its userinfo (user and password) replaced by `<redacted>`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<redacted>".to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

impl RedisSinkConfig {
    /// The defaults overlaid with `REDIS_HOST`, `REDIS_PORT`, `REDIS_PASSWORD` and `REDIS_DB`
    /// (unset or empty variables keep the default). A malformed port or DB index is an error.
    pub fn from_env() -> Result<Self, RedisSinkError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`from_env`](Self::from_env), reading variables through `var` (for tests and for
    /// callers with their own environment).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, RedisSinkError> {
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        let mut cfg = RedisSinkConfig::default();
        if let Some(host) = get("REDIS_HOST") {
            cfg.host = host;
        }
        if let Some(port) = get("REDIS_PORT") {
            cfg.port = port
                .trim()
                .parse()
                .map_err(|_| RedisSinkError::Config(format!("REDIS_PORT is not a port number: {port:?}")))?;
        }
        if let Some(password) = get("REDIS_PASSWORD") {
            cfg.password = Some(password);
        }
        if let Some(db) = get("REDIS_DB") {
            cfg.db = db
                .trim()
                .parse()
                .ok()
                .filter(|d: &i64| *d >= 0)
                .ok_or_else(|| RedisSinkError::Config(format!("REDIS_DB is not a database index: {db:?}")))?;
        }
        Ok(cfg)
    }

    /// Checks the limits and builds the connection info (`url`, or host/port/password/db).
    pub(crate) fn connection_info(&self) -> Result<ConnectionInfo, RedisSinkError> {
        if self.ttl_secs == 0 {
            return Err(RedisSinkError::Config("ttl_secs must be at least 1".into()));
        }
        if self.max_attempts == 0 {
            return Err(RedisSinkError::Config("max_attempts must be at least 1".into()));
        }
        if let Some(url) = &self.url {
            // The parse error names no part of the URL, which may hold a password.
            return url
                .as_str()
                .into_connection_info()
                .map_err(|e| RedisSinkError::Config(format!("bad Redis url {}: {e}", redact_url(url))));
        }
        if self.db < 0 {
            return Err(RedisSinkError::Config(format!("db must not be negative: {}", self.db)));
        }
        let mut redis = RedisConnectionInfo::default().set_db(self.db);
        if let Some(p) = self.password.as_deref().filter(|p| !p.is_empty()) {
            redis = redis.set_password(p);
        }
        let info = ConnectionAddr::Tcp(self.host.clone(), self.port)
            .into_connection_info()
            .map_err(|e| RedisSinkError::Config(format!("bad Redis address: {e}")))?;
        Ok(info.set_redis_settings(redis))
    }

    /// The backoff after `failures` failed attempts (≥ 1), before jitter:
    /// `initial · 2^(failures−1)`, capped at `max`.
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u64.checked_shl(failures.saturating_sub(1)).unwrap_or(u64::MAX);
        let ms = self.initial_backoff_ms.saturating_mul(factor).min(self.max_backoff_ms);
        Duration::from_millis(ms)
    }
}
