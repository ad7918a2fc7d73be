//! Configuration of the alert channels (`[sinks.notify]` and its channel sections).

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::NotifyError;
use crate::retry;

/// How alerts reach people: where the delivery log lives, how deliveries are retried and
/// rate-limited, and one optional section per channel. A rule channel whose section is absent
/// is dead-lettered ("not configured").
///
/// Deserializing (a config-file section) fills missing fields from [`Default`]; unknown fields
/// are an error. Secrets (`password`, `bot_token`, the service-account key) come from
/// `${VAR}` references in the file; `Debug` never shows them.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Postgres with `users`, `user_devices`, `alert_rules` and `alert_deliveries` (default:
    /// env `PREMIUM_DB`, then `ALERTS_DB`, then `DATABASE_URL`).
    pub url: Option<String>,
    /// The link in every message; `{alert_id}`, `{rule_id}`, `{user_id}`, `{subject}` and
    /// `{alert_type}` are replaced (URL-encoded). Empty (the default): messages carry no link.
    pub link_template: String,
    /// Attempts per delivery before it is dead-lettered (default 6, at least 1).
    pub max_attempts: u32,
    /// Wait after the first failed attempt, in ms (default 1000); doubles after each further
    /// failure, with jitter. A `429` waits what the service asks instead.
    pub initial_backoff_ms: u64,
    /// Cap of that wait, in ms (default 300000).
    pub max_backoff_ms: u64,
    /// Timeout of one attempt, connect included, in ms (default 10000).
    pub timeout_ms: u64,
    /// How long a dispatcher owns a delivery it is sending, in ms (default 60000, more than
    /// `timeout_ms`): a process killed mid-send leaves the delivery to be retried after it.
    pub lease_ms: u64,
    /// How often the dispatcher looks for due deliveries when not woken by new ones, in ms
    /// (default 500).
    pub poll_ms: u64,
    /// Deliveries in flight at once (default 16, at least 1).
    pub concurrency: usize,
    /// Messages per user and channel per minute (default 20; 0 for no limit). Deliveries over
    /// the limit wait, they are not dropped.
    pub per_user_per_minute: u32,
    /// E-mail over SMTP.
    pub email: Option<EmailConfig>,
    /// Telegram Bot API `sendMessage`.
    pub telegram: Option<TelegramConfig>,
    /// Discord webhooks (each user's `discord_webhook_url`).
    pub discord: Option<DiscordConfig>,
    /// Mobile push through FCM HTTP v1.
    pub push: Option<PushConfig>,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            url: None,
            link_template: String::new(),
            max_attempts: 6,
            initial_backoff_ms: 1000,
            max_backoff_ms: 300_000,
            timeout_ms: 10_000,
            lease_ms: 60_000,
            poll_ms: 500,
            concurrency: 16,
            per_user_per_minute: 20,
            email: None,
            telegram: None,
            discord: None,
            push: None,
        }
    }
}

impl fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifyConfig")
            .field("url", &self.url.as_deref().map(schemas::env::redact_url))
            .field("link_template", &self.link_template)
            .field("max_attempts", &self.max_attempts)
            .field("timeout_ms", &self.timeout_ms)
            .field("lease_ms", &self.lease_ms)
            .field("concurrency", &self.concurrency)
            .field("per_user_per_minute", &self.per_user_per_minute)
            .field("email", &self.email)
            .field("telegram", &self.telegram.as_ref().map(|t| &t.api_base))
            .field("discord", &self.discord)
            .field("push", &self.push.as_ref().map(|p| &p.api_base))
            .finish_non_exhaustive()
    }
}

/// How the SMTP connection is secured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection, then `STARTTLS` (required; default port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS, default port 465).
    Tls,
    /// No encryption (a local relay only; default port 25).
    None,
}

/// `[sinks.notify.email]`: the SMTP relay and the sender.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// Relay host name (also the name its TLS certificate is checked against).
    pub host: String,
    /// Port (default by `tls`: 587, 465 or 25).
    #[serde(default)]
    pub port: Option<u16>,
    /// `starttls` (default), `tls` or `none`.
    #[serde(default)]
    pub tls: SmtpTls,
    /// A PEM file of extra trusted root certificates (a relay with a private CA); the system's
    /// roots are trusted too.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// SMTP AUTH user (none: no authentication).
    #[serde(default)]
    pub username: Option<String>,
    /// SMTP AUTH password.
    #[serde(default)]
    pub password: Option<String>,
    /// The `From:` address, e.g. `"DeFi alerts <alerts@example.com>"`.
    pub from: String,
    /// Messages per second through this relay (default 10).
    #[serde(default = "EmailConfig::default_rate")]
    pub per_second: f64,
}

impl EmailConfig {
    fn default_rate() -> f64 {
        10.0
    }

    /// The port to connect to.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        })
    }
}

impl fmt::Debug for EmailConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailConfig")
            .field("host", &self.host)
            .field("port", &self.port())
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("from", &self.from)
            .field("per_second", &self.per_second)
            .finish()
    }
}

/// `[sinks.notify.telegram]`: the bot.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramConfig {
    /// The bot token from @BotFather (`123456:ABC…`).
    pub bot_token: String,
    /// API base URL (default `https://api.telegram.org`).
    #[serde(default = "TelegramConfig::default_base")]
    pub api_base: String,
    /// Messages per second (default 25; Telegram allows about 30 per bot).
    #[serde(default = "TelegramConfig::default_rate")]
    pub per_second: f64,
}

impl TelegramConfig {
    fn default_base() -> String {
        "https://api.telegram.org".to_string()
    }

    fn default_rate() -> f64 {
        25.0
    }
}

/// `[sinks.notify.discord]`: how webhook messages look and how fast they go.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscordConfig {
    /// The name the messages are posted under (default: the webhook's own).
    #[serde(default)]
    pub username: Option<String>,
    /// Messages per second over all webhooks (default 5).
    #[serde(default = "DiscordConfig::default_rate")]
    pub per_second: f64,
}

impl DiscordConfig {
    fn default_rate() -> f64 {
        5.0
    }
}

/// `[sinks.notify.push]`: Firebase Cloud Messaging (HTTP v1) with a service account.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// The service-account key: a path to its JSON file, or the JSON itself (a value starting
    /// with `{`, e.g. `"${FCM_SERVICE_ACCOUNT}"`). It needs `client_email`, `private_key` and
    /// `project_id` (unless set below); its `token_uri` is used unless set below.
    pub service_account_key: String,
    /// The Firebase project (default: the key's `project_id`).
    #[serde(default)]
    pub project_id: Option<String>,
    /// FCM base URL (default `https://fcm.googleapis.com`).
    #[serde(default = "PushConfig::default_base")]
    pub api_base: String,
    /// OAuth2 token endpoint (default: the key's `token_uri`, else Google's).
    #[serde(default)]
    pub token_uri: Option<String>,
    /// Messages per second (default 100).
    #[serde(default = "PushConfig::default_rate")]
    pub per_second: f64,
}

impl PushConfig {
    fn default_base() -> String {
        "https://fcm.googleapis.com".to_string()
    }

    fn default_rate() -> f64 {
        100.0
    }
}

impl fmt::Debug for PushConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PushConfig")
            .field("project_id", &self.project_id)
            .field("api_base", &self.api_base)
            .field("token_uri", &self.token_uri)
            .field("per_second", &self.per_second)
            .finish_non_exhaustive()
    }
}

impl NotifyConfig {
    /// The database URL: `url`, else the environment.
    pub fn effective_url(&self) -> Option<String> {
        self.url
            .clone()
            .filter(|u| !u.trim().is_empty())
            .or_else(schemas::env::url_from_env)
    }

    /// Checks every limit and channel section (what `check-config` reports); reads nothing.
    pub fn validate(&self) -> Result<(), NotifyError> {
        let bad = |m: String| Err(NotifyError::Config(m));
        for (field, v) in [
            ("max_attempts", u64::from(self.max_attempts)),
            ("timeout_ms", self.timeout_ms),
            ("lease_ms", self.lease_ms),
            ("poll_ms", self.poll_ms),
            ("concurrency", self.concurrency as u64),
        ] {
            if v == 0 {
                return bad(format!("`{field}` must be at least 1"));
            }
        }
        if self.lease_ms <= self.timeout_ms {
            return bad(format!(
                "`lease_ms` ({}) must be more than `timeout_ms` ({}): a delivery must end within its lease",
                self.lease_ms, self.timeout_ms
            ));
        }
        if self.email.is_none() && self.telegram.is_none() && self.discord.is_none() && self.push.is_none() {
            return bad(
                "no channel configured: add at least one of [sinks.notify.email], .telegram, .discord, .push".into(),
            );
        }
        let rate = |section: &str, r: f64| {
            if r.is_finite() && r > 0.0 {
                Ok(())
            } else {
                Err(NotifyError::Config(format!(
                    "[sinks.notify.{section}] `per_second` must be a positive number, got {r}"
                )))
            }
        };
        if let Some(e) = &self.email {
            rate("email", e.per_second)?;
            if e.host.trim().is_empty() {
                return bad("[sinks.notify.email] `host` is empty".into());
            }
            if e.from.parse::<lettre::message::Mailbox>().is_err() {
                return bad(format!(
                    "[sinks.notify.email] `from` is not an e-mail address: {:?}",
                    e.from
                ));
            }
            if e.username.is_some() != e.password.is_some() {
                return bad("[sinks.notify.email] set both `username` and `password`, or neither".into());
            }
        }
        if let Some(t) = &self.telegram {
            rate("telegram", t.per_second)?;
            if t.bot_token.trim().is_empty() || t.bot_token.contains('/') {
                return bad("[sinks.notify.telegram] `bot_token` must be the token from @BotFather (no `/`)".into());
            }
            check_base("telegram", "api_base", &t.api_base)?;
        }
        if let Some(d) = &self.discord {
            rate("discord", d.per_second)?;
        }
        if let Some(p) = &self.push {
            rate("push", p.per_second)?;
            check_base("push", "api_base", &p.api_base)?;
            if let Some(u) = &p.token_uri {
                check_base("push", "token_uri", u)?;
            }
            if p.service_account_key.trim().is_empty() {
                return bad("[sinks.notify.push] `service_account_key` is empty".into());
            }
        }
        Ok(())
    }

    /// The timeout of one attempt.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The wait after `failed` failed attempts (≥ 1), jittered.
    pub(crate) fn backoff(&self, failed: u32) -> Duration {
        retry::jittered(retry::backoff(self.initial_backoff_ms, self.max_backoff_ms, failed))
    }
}

fn check_base(section: &str, field: &str, url: &str) -> Result<(), NotifyError> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        _ => Err(NotifyError::Config(format!(
            "[sinks.notify.{section}] `{field}` must be an http(s) URL, got {url:?}"
        ))),
    }
}
