//! The dispatcher: claims due deliveries from the outbox, holds them to the rate limits,
//! sends them, and logs each outcome.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use schemas::DeadLetter;
use tokio::sync::Notify;

use super::outbox::{Delivery, Outbox, Recorded};
use super::render::Rendered;
use super::send::{Failure, Senders};
use super::{Channel, Directory, NotifyConfig};
use crate::jsonl::DeadLetters;

/// Delivers what the notify sink logged (see the [module docs](super)). Run it with
/// [`Dispatcher::run`] on the job's runtime; it runs until its task is dropped.
pub struct Dispatcher {
    pub(super) cfg: NotifyConfig,
    pub(super) outbox: Outbox,
    pub(super) senders: Arc<Senders>,
    pub(super) directory: Directory,
    pub(super) dead: DeadLetters,
    pub(super) wake: Arc<Notify>,
}

/// One finished attempt.
type Attempt = (Delivery, Result<(), Failure>, Duration);

impl Dispatcher {
    /// Claims and sends due deliveries, at most `concurrency` at once, until dropped.
    pub async fn run(self) {
        let lease = Duration::from_millis(self.cfg.lease_ms);
        let poll = Duration::from_millis(self.cfg.poll_ms);
        let mut limits = Limits::new(&self.cfg);
        let mut in_flight: FuturesUnordered<BoxFuture<'static, Attempt>> = FuturesUnordered::new();
        let mut db_failures = 0u32;
        loop {
            let free = self.cfg.concurrency.saturating_sub(in_flight.len());
            if free > 0 {
                match self.outbox.claim(free, lease).await {
                    Ok(due) => {
                        db_failures = 0;
                        for d in due {
                            match limits.take(d.channel, &d.alert.user_id, Instant::now()) {
                                Ok(()) => in_flight.push(self.attempt(d)),
                                Err(wait) => {
                                    metrics::counter!("llamaflow_notify_deferred_total", "channel" => d.channel.name())
                                        .increment(1);
                                    self.record(&d, Recorded::Deferred { after: wait }).await;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        db_failures += 1;
                        let wait = crate::retry::jittered(crate::retry::backoff(200, 10_000, db_failures));
                        tracing::error!("notify: cannot read alert_deliveries: {e}; retrying in {wait:?}");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            }
            tokio::select! {
                Some(done) = in_flight.next(), if !in_flight.is_empty() => self.finish(done, &mut limits).await,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// One attempt of `d`, as a future that owns what it needs.
    fn attempt(&self, d: Delivery) -> BoxFuture<'static, Attempt> {
        let senders = self.senders.clone();
        let msg = Rendered::new(&d.alert, d.rule_name.as_deref(), &self.cfg.link_template);
        Box::pin(async move {
            let started = Instant::now();
            let result = senders.send(d.channel, &d.recipient, &d.alert.alert_id, &msg).await;
            let took = started.elapsed();
            metrics::histogram!("llamaflow_notify_request_seconds", "channel" => d.channel.name())
                .record(took.as_secs_f64());
            (d, result, took)
        })
    }

    /// Logs the outcome of an attempt: delivered, retried later, or given up on (then
    /// dead-lettered; an unregistered push token is also removed).
    async fn finish(&self, (d, result, took): Attempt, limits: &mut Limits) {
        let channel = d.channel.name();
        let attempts = d.attempts + 1;
        let give_up = |reason: &str| format!("{reason} (gave up after {attempts} attempt(s))");
        let outcome = match result {
            Ok(()) => {
                metrics::counter!("llamaflow_notify_sent_total", "channel" => channel).increment(1);
                metrics::histogram!("llamaflow_notify_latency_seconds", "channel" => channel)
                    .record(d.age_secs + took.as_secs_f64());
                Recorded::Delivered
            }
            Err(Failure::Retry {
                reason,
                after,
                pause_channel,
            }) => {
                if pause_channel {
                    limits.pause(d.channel, after.unwrap_or(Duration::from_secs(1)), Instant::now());
                }
                if attempts >= self.cfg.max_attempts {
                    Recorded::Failed {
                        error: give_up(&reason),
                    }
                } else {
                    metrics::counter!("llamaflow_notify_retries_total", "channel" => channel).increment(1);
                    let after = after.unwrap_or_else(|| self.cfg.backoff(attempts));
                    tracing::warn!(channel, alert_id = %d.alert.alert_id, attempt = attempts, %reason, "notify: retrying in {after:?}");
                    Recorded::Retry { after, error: reason }
                }
            }
            Err(Failure::Permanent(reason)) => Recorded::Failed { error: reason },
            Err(Failure::Unregistered(reason)) => {
                match self.outbox.remove_token(&d.recipient).await {
                    Ok(n) => metrics::counter!("llamaflow_notify_tokens_removed_total").increment(n),
                    Err(e) => tracing::error!("notify: cannot delete an unregistered device token: {e}"),
                }
                self.directory.remove_token(&d.recipient);
                Recorded::Failed {
                    error: format!("{reason}; the device was removed from user_devices"),
                }
            }
        };
        if let Recorded::Failed { error } = &outcome {
            metrics::counter!("llamaflow_notify_failed_total", "channel" => channel).increment(1);
            tracing::error!(channel, alert_id = %d.alert.alert_id, %error, "notify: delivery given up, dead-lettered");
            self.dead_letter(&d, error).await;
        }
        self.record(&d, outcome).await;
    }

    /// Writes the dead letter of a delivery given up on (durable before the log says
    /// `failed`).
    async fn dead_letter(&self, d: &Delivery, error: &str) {
        let raw = serde_json::to_string(&d.alert).unwrap_or_default();
        let letter = DeadLetter::new(format!("sink:notify:{}", d.channel), error.to_string(), &raw);
        let dead = self.dead.clone();
        let mut failures = 0;
        loop {
            let (dead, letter) = (dead.clone(), letter.clone());
            match tokio::task::spawn_blocking(move || dead.write(0, std::slice::from_ref(&letter))).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => tracing::error!("notify: cannot write a dead letter: {e}"),
                Err(e) => tracing::error!("notify: cannot write a dead letter: {e}"),
            }
            failures += 1;
            tokio::time::sleep(crate::retry::backoff(100, 10_000, failures)).await;
        }
    }

    /// Logs `outcome`, retrying while the lease lasts (after it another dispatcher may send
    /// the delivery again: the window the docs state).
    async fn record(&self, d: &Delivery, outcome: Recorded) {
        let until = Instant::now() + Duration::from_millis(self.cfg.lease_ms);
        let mut failures = 0;
        loop {
            match self.outbox.record(d, &outcome).await {
                Ok(()) => return,
                Err(e) if Instant::now() < until => {
                    failures += 1;
                    tracing::error!(alert_id = %d.alert.alert_id, "notify: cannot log a delivery: {e}; retrying");
                    tokio::time::sleep(crate::retry::backoff(100, 5_000, failures)).await;
                }
                Err(e) => {
                    tracing::error!(alert_id = %d.alert.alert_id, "notify: cannot log a delivery within its lease: {e}; it will be tried again");
                    return;
                }
            }
        }
    }
}

/// A token bucket.
#[derive(Clone, Debug)]
struct Bucket {
    /// Tokens per second.
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    paused_until: Option<Instant>,
}

impl Bucket {
    fn new(rate: f64, burst: f64, now: Instant) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: now,
            paused_until: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + secs * self.rate).min(self.burst);
        self.last = now;
    }

    /// `None` when a token is there, else how long until one is.
    fn wait(&mut self, now: Instant) -> Option<Duration> {
        if let Some(p) = self.paused_until.filter(|p| *p > now) {
            return Some(p - now);
        }
        self.refill(now);
        (self.tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }
}

/// Users whose buckets are kept at most (full buckets are forgotten beyond it).
const MAX_USER_BUCKETS: usize = 10_000;

/// Per-channel and per-user-and-channel rate limits of one dispatcher.
struct Limits {
    channels: HashMap<Channel, Bucket>,
    users: HashMap<(Channel, String), Bucket>,
    per_user_per_minute: u32,
}

impl Limits {
    fn new(cfg: &NotifyConfig) -> Limits {
        let now = Instant::now();
        let mut channels = HashMap::new();
        for (channel, rate) in [
            (Channel::Email, cfg.email.as_ref().map(|c| c.per_second)),
            (Channel::Telegram, cfg.telegram.as_ref().map(|c| c.per_second)),
            (Channel::Discord, cfg.discord.as_ref().map(|c| c.per_second)),
            (Channel::Push, cfg.push.as_ref().map(|c| c.per_second)),
        ] {
            if let Some(rate) = rate {
                channels.insert(channel, Bucket::new(rate, rate.max(1.0), now));
            }
        }
        Limits {
            channels,
            users: HashMap::new(),
            per_user_per_minute: cfg.per_user_per_minute,
        }
    }

    /// Takes a token of `channel` and of `user` on it, or says how long to wait (taking none).
    fn take(&mut self, channel: Channel, user: &str, now: Instant) -> Result<(), Duration> {
        let mut wait = self.channels.get_mut(&channel).and_then(|b| b.wait(now));
        if self.per_user_per_minute > 0 {
            if self.users.len() >= MAX_USER_BUCKETS {
                self.users.retain(|_, b| {
                    b.refill(now);
                    b.tokens < b.burst
                });
            }
            let n = f64::from(self.per_user_per_minute);
            let bucket = self
                .users
                .entry((channel, user.to_string()))
                .or_insert_with(|| Bucket::new(n / 60.0, n, now));
            wait = wait.max(bucket.wait(now));
        }
        if let Some(w) = wait {
            return Err(w);
        }
        if let Some(b) = self.channels.get_mut(&channel) {
            b.tokens -= 1.0;
        }
        if let Some(b) = self.users.get_mut(&(channel, user.to_string())) {
            b.tokens -= 1.0;
        }
        Ok(())
    }

    /// Holds every delivery of `channel` for `d` (the service said so).
    fn pause(&mut self, channel: Channel, d: Duration, now: Instant) {
        if let Some(b) = self.channels.get_mut(&channel) {
            b.paused_until = Some(now + d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_a_channel_and_a_user_to_their_rates() {
        let cfg = NotifyConfig {
            per_user_per_minute: 2,
            telegram: Some(super::super::TelegramConfig {
                bot_token: "1:x".into(),
                api_base: "http://127.0.0.1:1".into(),
                per_second: 10.0,
            }),
            ..NotifyConfig::default()
        };
        let mut l = Limits::new(&cfg);
        let t0 = Instant::now();
        // A user gets 2 per minute; then waits 30 s for the next.
        assert!(l.take(Channel::Telegram, "u1", t0).is_ok());
        assert!(l.take(Channel::Telegram, "u1", t0).is_ok());
        let w = l.take(Channel::Telegram, "u1", t0).unwrap_err();
        assert!((w.as_secs_f64() - 30.0).abs() < 0.01, "{w:?}");
        // Others are not held by u1; the channel has 10 per second (burst 10: 2 used).
        for i in 0..8 {
            assert!(l.take(Channel::Telegram, &format!("v{i}"), t0).is_ok(), "{i}");
        }
        let w = l.take(Channel::Telegram, "w", t0).unwrap_err();
        assert!((w.as_secs_f64() - 0.1).abs() < 0.01, "{w:?}");
        assert!(l.take(Channel::Telegram, "w", t0 + Duration::from_millis(100)).is_ok());
        // A pause holds everyone on the channel.
        let t1 = t0 + Duration::from_secs(5);
        l.pause(Channel::Telegram, Duration::from_secs(3), t1);
        assert_eq!(l.take(Channel::Telegram, "x", t1).unwrap_err(), Duration::from_secs(3));
        assert!(l.take(Channel::Telegram, "x", t1 + Duration::from_secs(3)).is_ok());
        // A channel without a section has no channel bucket; users are still limited.
        assert!(l.take(Channel::Email, "u1", t0).is_ok());
    }
}
