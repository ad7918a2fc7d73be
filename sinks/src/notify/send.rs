//! The channel senders behind one call, and how an attempt can fail.

use std::time::Duration;

use reqwest::StatusCode;

use super::email::Email;
use super::push::Push;
use super::render::Rendered;
use super::telegram::Telegram;
use super::{Channel, NotifyConfig, NotifyError, discord::Discord};

/// Why an attempt failed, and what to do about it.
#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// Worth another attempt (connection error, timeout, 5xx, 429).
    Retry {
        /// Why.
        reason: String,
        /// The wait the service asked for (`retry_after`), instead of the backoff.
        after: Option<Duration>,
        /// The service limits the whole channel (Telegram's bot limit, Discord's global one):
        /// hold every delivery of the channel for `after`.
        pause_channel: bool,
    },
    /// Sending again cannot help (4xx, a bad address).
    Permanent(String),
    /// The push token is no longer valid: its device is removed.
    Unregistered(String),
}

impl Failure {
    /// A retryable failure without a requested wait.
    pub fn retry(reason: impl Into<String>) -> Failure {
        Failure::Retry {
            reason: reason.into(),
            after: None,
            pause_channel: false,
        }
    }

    /// The reason, for logs and the delivery log.
    pub fn reason(&self) -> &str {
        match self {
            Failure::Retry { reason, .. } | Failure::Permanent(reason) | Failure::Unregistered(reason) => reason,
        }
    }

    /// The usual classification of an HTTP answer that is not a success: 5xx and 429 retry
    /// (429 after `after`), the rest is permanent.
    pub fn of_status(service: &str, status: StatusCode, body: &str, after: Option<Duration>) -> Failure {
        let reason = format!("{service} answered HTTP {status}: {}", snippet(body));
        if status == StatusCode::TOO_MANY_REQUESTS {
            Failure::Retry {
                reason,
                after,
                pause_channel: false,
            }
        } else if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
            Failure::retry(reason)
        } else {
            Failure::Permanent(reason)
        }
    }

    /// A failed request (no answer).
    pub fn of_request(service: &str, e: &reqwest::Error) -> Failure {
        if e.is_builder() {
            Failure::Permanent(format!("{service}: invalid request: {}", chain(e)))
        } else if e.is_timeout() {
            Failure::retry(format!("{service}: timed out"))
        } else {
            Failure::retry(format!("{service}: request failed: {}", chain(e)))
        }
    }
}

/// The first 200 characters of an answer body, on one line.
pub fn snippet(body: &str) -> String {
    body.chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

pub(crate) use crate::error_chain as chain;

/// The `Retry-After` header in seconds, when present.
pub fn retry_after_header(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    seconds(v.trim().parse::<f64>().ok()?)
}

/// A wait of `s` seconds, when it is a sane number (at most an hour).
pub fn seconds(s: f64) -> Option<Duration> {
    (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(3600.0)))
}

/// Every configured channel's sender.
pub struct Senders {
    email: Option<Email>,
    telegram: Option<Telegram>,
    discord: Option<Discord>,
    push: Option<Push>,
}

impl Senders {
    /// Builds the senders of the configured channels (reads the push key; contacts nothing).
    pub fn new(cfg: &NotifyConfig) -> Result<Senders, NotifyError> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout())
            .connect_timeout(cfg.timeout())
            .redirect(reqwest::redirect::Policy::none())
            .user_agent("llamaflow-notify")
            .build()
            .map_err(|e| NotifyError::Config(format!("cannot build the HTTP client: {}", chain(&e))))?;
        Ok(Senders {
            email: cfg.email.as_ref().map(|c| Email::new(c, cfg.timeout())).transpose()?,
            telegram: cfg.telegram.as_ref().map(|c| Telegram::new(c, http.clone())),
            discord: cfg.discord.as_ref().map(|c| Discord::new(c, http.clone())),
            push: cfg.push.as_ref().map(|c| Push::new(c, http.clone())).transpose()?,
        })
    }

    /// Whether `channel` is configured.
    pub fn has(&self, channel: Channel) -> bool {
        match channel {
            Channel::Email => self.email.is_some(),
            Channel::Telegram => self.telegram.is_some(),
            Channel::Discord => self.discord.is_some(),
            Channel::Push => self.push.is_some(),
        }
    }

    /// One attempt to send `msg` (about `alert_id`) to `recipient` on `channel`.
    pub async fn send(&self, channel: Channel, recipient: &str, alert_id: &str, msg: &Rendered) -> Result<(), Failure> {
        let missing = || Failure::Permanent(format!("the {channel} channel is not configured"));
        match channel {
            Channel::Email => {
                self.email
                    .as_ref()
                    .ok_or_else(missing)?
                    .send(recipient, alert_id, msg)
                    .await
            }
            Channel::Telegram => self.telegram.as_ref().ok_or_else(missing)?.send(recipient, msg).await,
            Channel::Discord => self.discord.as_ref().ok_or_else(missing)?.send(recipient, msg).await,
            Channel::Push => {
                self.push
                    .as_ref()
                    .ok_or_else(missing)?
                    .send(recipient, alert_id, msg)
                    .await
            }
        }
    }
}
