//! Alert delivery to people (SPEC §2 rule `channels`): `email` (SMTP), `telegram` (Bot API),
//! `discord` (webhooks) and `push` (FCM HTTP v1), beside the `websocket` and `webhook`
//! channels that other sinks serve.
//!
//! # How a delivery goes
//!
//! 1. **Recipients.** A [`Directory`] holds every user's addresses (`users.email`,
//!    `telegram_chat_id`, `discord_webhook_url`) and push devices (`user_devices`). It is
//!    loaded from Postgres at start and kept current by the CDC source, so a changed address
//!    serves the next alert without a restart.
//! 2. **The log first.** [`NotifySink`] is a durable sink: for each alert and each of its
//!    personal channels it inserts a `pending` row per recipient into `alert_deliveries`
//!    (key: alert_id, channel, recipient; the rule's name joined from `alert_rules`) and
//!    acknowledges the epoch once the rows are committed. A row already there, in any state,
//!    is left alone: a replayed epoch or a restarted job never logs, and so never sends, a
//!    delivery twice. A channel without a config section, or a user without the address, is
//!    rejected with the reason: the pipeline dead-letters the alert.
//! 3. **The dispatcher** ([`Dispatcher`]) claims due rows (`sending`, leased for `lease_ms`,
//!    `FOR UPDATE SKIP LOCKED`: processes of a cluster share the work), renders each alert
//!    once ([`Rendered`]: message, value with its unit, rule name, link), holds it to the
//!    channel's `per_second` and the user's `per_user_per_minute` (a delivery over a limit
//!    waits; it is not dropped), sends, and logs the outcome: `delivered`; `pending` again after
//!    a backoff with jitter (connection errors, timeouts, 5xx, 429 — a 429 waits what the
//!    service asks, Telegram's `parameters.retry_after` and Discord's `retry_after`, and a
//!    bot-wide or global limit holds the whole channel); or `failed` after `max_attempts` or a
//!    permanent error, with a dead letter (`sink:notify:<channel>`). An FCM token reported
//!    unregistered is deleted from `user_devices`.
//!
//! # Once each, and the window left
//!
//! A delivery is sent again only when its dispatcher died (or lost the database) after the
//! service accepted it and before its `delivered` row committed: once the lease expires, a
//! dispatcher sends it again. So a `kill -9` duplicates at most the deliveries in flight at
//! that moment (at most `concurrency`), and none is lost: a row stays `pending` or `sending`
//! until it is `delivered` or `failed`. E-mails carry `Message-ID: <alert_id@llamaflow>`, which
//! lets mail systems fold such a repeat.
//!
//! # Metrics
//!
//! Per `channel`: counters `llamaflow_notify_sent_total`, `llamaflow_notify_retries_total`,
//! `llamaflow_notify_failed_total`, `llamaflow_notify_deferred_total` (held by a rate limit);
//! histograms `llamaflow_notify_latency_seconds` (logged → delivered) and
//! `llamaflow_notify_request_seconds` (one attempt). Also `llamaflow_notify_tokens_removed_total`
//! and gauge `llamaflow_notify_recipients{kind=users|devices}`; the sink itself reports as
//! `sink="notify"` like every sink.

mod config;
mod directory;
mod discord;
mod dispatch;
mod email;
mod outbox;
mod push;
mod render;
mod send;
mod sink;
mod telegram;

#[cfg(test)]
mod tests;

pub use config::{DiscordConfig, EmailConfig, NotifyConfig, PushConfig, SmtpTls, TelegramConfig};
pub use directory::Directory;
pub use dispatch::Dispatcher;
pub use outbox::{Delivery, Outbox, Recorded};
pub use render::{Rendered, format_time, html_escape, with_unit};
pub use send::Failure;
pub use sink::NotifySink;

/// A personal alert channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// `email`.
    Email,
    /// `telegram`.
    Telegram,
    /// `discord`.
    Discord,
    /// `push`.
    Push,
}

impl Channel {
    /// Every personal channel.
    pub const ALL: [Channel; 4] = [Channel::Email, Channel::Telegram, Channel::Discord, Channel::Push];

    /// The name in rules' `channels` and in `alert_deliveries.channel`.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Telegram => "telegram",
            Channel::Discord => "discord",
            Channel::Push => "push",
        }
    }

    /// The channel named `s`, when it is a personal one.
    pub fn parse(s: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.name() == s)
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the notify sink could not start or write.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The configuration is unusable (names the section and field).
    #[error("sinks.notify: {0}")]
    Config(String),
    /// The database could not be reached.
    #[error("sinks.notify: cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// A query failed.
    #[error("sinks.notify: {0}")]
    Sql(#[source] sqlx::Error),
}
