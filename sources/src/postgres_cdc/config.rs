//! Configuration of the Postgres CDC source.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

pub use schemas::env::{URL_VARS, redact_url, url_from_env};

use super::CdcError;

/// A table the CDC source can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CdcTable {
    /// `alert_rules` → [`schemas::Record::Rule`] / `DeleteRule`.
    AlertRules,
    /// `protocols` → [`schemas::Record::Protocol`] / `DeleteProtocol`.
    Protocols,
    /// `api_keys` → `Change::ApiKey`.
    ApiKeys,
    /// `users` → `Change::User` / `DeleteUser` (alert channel addresses).
    Users,
    /// `user_devices` → `Change::Device` / `DeleteDevice` (push tokens).
    UserDevices,
}

impl CdcTable {
    /// Every readable table.
    pub const ALL: [CdcTable; 5] = [
        CdcTable::AlertRules,
        CdcTable::Protocols,
        CdcTable::ApiKeys,
        CdcTable::Users,
        CdcTable::UserDevices,
    ];

    /// Table name (in schema `public`).
    pub fn name(self) -> &'static str {
        match self {
            CdcTable::AlertRules => "alert_rules",
            CdcTable::Protocols => "protocols",
            CdcTable::ApiKeys => "api_keys",
            CdcTable::Users => "users",
            CdcTable::UserDevices => "user_devices",
        }
    }

    /// The primary-key column.
    pub fn key_column(self) -> &'static str {
        match self {
            CdcTable::AlertRules | CdcTable::Protocols | CdcTable::Users | CdcTable::UserDevices => "id",
            CdcTable::ApiKeys => "key",
        }
    }

    /// The columns the decoder reads (an update lacking one of them had it unchanged and
    /// TOASTed; the source then reads it from the table).
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            CdcTable::AlertRules => &[
                "id",
                "user_id",
                "name",
                "alert_type",
                "conditions",
                "channels",
                "webhook_url",
                "enabled",
                "throttle_minutes",
            ],
            CdcTable::Protocols => &["id", "name", "symbol", "slug", "category", "chains"],
            CdcTable::ApiKeys => &["key", "user_id", "revoked"],
            CdcTable::Users => &["id", "email", "telegram_chat_id", "discord_webhook_url"],
            CdcTable::UserDevices => &["id", "user_id", "device_token", "platform"],
        }
    }

    /// Parses `alert_rules` or `public.alert_rules` (likewise for the others).
    pub fn parse(s: &str) -> Option<CdcTable> {
        let name = s.strip_prefix("public.").unwrap_or(s);
        CdcTable::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Where and how the CDC source reads.
///
/// Deserializing (a config-file section) fills missing fields from [`Default`]; unknown fields
/// are an error. A missing `url` is taken from the environment ([`url_from_env`]) at start.
/// Its `Debug` output never shows the password inside `url`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CdcConfig {
    /// `postgres://user:password@host:port/db` (default: env `PREMIUM_DB`, then `ALERTS_DB`,
    /// then `DATABASE_URL`). The user needs the REPLICATION attribute (or superuser).
    pub url: Option<String>,
    /// Logical replication slot (wal2json), created when absent (default `llamaflow`).
    pub slot: String,
    /// Tables to read, of `alert_rules`, `protocols`, `api_keys`, `users`, `user_devices`
    /// (default all five).
    pub tables: Vec<String>,
    /// Pause between polls of the slot when nothing is pending, in ms (default 100).
    pub poll_interval_ms: u64,
    /// Heartbeat period, in seconds (default 10): emits a WAL message and advances an idle slot.
    pub heartbeat_secs: u64,
    /// Rows asked of one poll of the slot beyond those already delivered (default 10000).
    pub max_changes_per_poll: u32,
    /// Deliver every current row of the tables before streaming changes (default true).
    pub snapshot: bool,
}

impl Default for CdcConfig {
    fn default() -> Self {
        CdcConfig {
            url: None,
            slot: "llamaflow".to_string(),
            tables: CdcTable::ALL.iter().map(|t| t.name().to_string()).collect(),
            poll_interval_ms: 100,
            heartbeat_secs: 10,
            max_changes_per_poll: 10_000,
            snapshot: true,
        }
    }
}

impl fmt::Debug for CdcConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CdcConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("slot", &self.slot)
            .field("tables", &self.tables)
            .field("poll_interval_ms", &self.poll_interval_ms)
            .field("heartbeat_secs", &self.heartbeat_secs)
            .field("max_changes_per_poll", &self.max_changes_per_poll)
            .field("snapshot", &self.snapshot)
            .finish()
    }
}

impl CdcConfig {
    /// The defaults with `url` from `PREMIUM_DB`, `ALERTS_DB` or `DATABASE_URL`.
    pub fn from_env() -> Self {
        CdcConfig {
            url: url_from_env(),
            ..CdcConfig::default()
        }
    }

    /// Checks the fields; returns the URL to use and the tables.
    pub(crate) fn validate(&self) -> Result<(String, Vec<CdcTable>), CdcError> {
        let url = self
            .url
            .clone()
            .filter(|u| !u.trim().is_empty())
            .or_else(url_from_env)
            .ok_or_else(|| {
                CdcError::Config("no database URL: set `url` or PREMIUM_DB / ALERTS_DB / DATABASE_URL".to_string())
            })?;
        let slot_ok = !self.slot.is_empty()
            && self.slot.len() <= 63
            && self
                .slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !slot_ok {
            return Err(CdcError::Config(format!(
                "`slot` must be 1-63 characters of a-z, 0-9 and _, got {:?}",
                self.slot
            )));
        }
        let mut tables = Vec::new();
        for t in &self.tables {
            let table = CdcTable::parse(t).ok_or_else(|| {
                CdcError::Config(format!(
                    "`tables`: unknown table {t:?} (expected alert_rules, protocols, api_keys, users, user_devices)"
                ))
            })?;
            if !tables.contains(&table) {
                tables.push(table);
            }
        }
        if tables.is_empty() {
            return Err(CdcError::Config("`tables` is empty".to_string()));
        }
        for (field, v) in [
            ("poll_interval_ms", self.poll_interval_ms),
            ("heartbeat_secs", self.heartbeat_secs),
            ("max_changes_per_poll", u64::from(self.max_changes_per_poll)),
        ] {
            if v == 0 {
                return Err(CdcError::Config(format!("`{field}` must be at least 1")));
            }
        }
        Ok((url, tables))
    }

    /// The poll interval as a [`Duration`].
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    /// The heartbeat period as a [`Duration`].
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }
}
