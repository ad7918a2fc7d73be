//! The sink: logs each alert's deliveries on the personal channels, durably, and wakes the
//! dispatcher.

use std::sync::Arc;
use std::time::Instant;

use sqlx::postgres::PgPoolOptions;
use tokio::sync::Notify;

use super::dispatch::Dispatcher;
use super::outbox::Outbox;
use super::send::Senders;
use super::{Channel, Directory, NotifyConfig, NotifyError};
use crate::jsonl::DeadLetters;
use crate::{OutputBatch, Written};

/// Logs alert deliveries for the dispatcher (see the [module docs](super)).
pub struct NotifySink {
    outbox: Outbox,
    directory: Directory,
    senders: Arc<Senders>,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for NotifySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifySink")
            .field("directory", &self.directory)
            .finish_non_exhaustive()
    }
}

impl NotifySink {
    /// Checks `cfg`, connects to the database, loads the recipients into `directory` and
    /// builds the channel senders; returns the sink and its dispatcher (to be run). Deliveries
    /// the dispatcher gives up on are written to `dead`.
    pub async fn connect(
        cfg: NotifyConfig,
        directory: Directory,
        dead: DeadLetters,
    ) -> Result<(NotifySink, Dispatcher), NotifyError> {
        cfg.validate()?;
        let url = cfg.effective_url().ok_or_else(|| {
            NotifyError::Config("no database URL: set `url` or PREMIUM_DB / ALERTS_DB / DATABASE_URL".into())
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(cfg.timeout())
            .connect(&url)
            .await
            .map_err(NotifyError::Connect)?;
        let (users, devices) = directory.load(&pool).await.map_err(NotifyError::Sql)?;
        tracing::info!(users, devices, "notify: recipients loaded");
        let senders = Arc::new(Senders::new(&cfg)?);
        let outbox = Outbox::new(pool);
        let wake = Arc::new(Notify::new());
        let sink = NotifySink {
            outbox: outbox.clone(),
            directory: directory.clone(),
            senders: senders.clone(),
            wake: wake.clone(),
        };
        let dispatcher = Dispatcher {
            cfg,
            outbox,
            senders,
            directory,
            dead,
            wake,
        };
        Ok((sink, dispatcher))
    }

    /// Reloads the recipients every `every`, for a process that does not follow `users` and
    /// `user_devices` over CDC; run it as a task. A failed reload keeps what is held.
    pub fn refresher(&self, every: std::time::Duration) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (directory, pool) = (self.directory.clone(), self.outbox.pool().clone());
        async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = directory.load(&pool).await {
                    tracing::warn!("notify: cannot reload the recipients: {e}");
                }
            }
        }
    }

    /// Logs a `pending` delivery for every alert of `batch` on each of its personal channels
    /// and recipients (already-logged ones are left alone), then wakes the dispatcher. An
    /// alert whose channel is not configured or whose user lacks the address is rejected
    /// with the reason (the pipeline dead-letters it).
    pub async fn write(&mut self, batch: &OutputBatch) -> Result<Written, NotifyError> {
        let mut rows = Vec::new();
        let mut written = Written::default();
        for alert in &batch.alerts {
            for name in &alert.channels {
                let Some(channel) = Channel::parse(name) else {
                    continue;
                };
                if !self.senders.has(channel) {
                    written.rejected.push((
                        alert.clone(),
                        format!("rule {:?} asks for the {channel} channel, which is not configured ([sinks.notify.{channel}])", alert.rule_id),
                    ));
                    continue;
                }
                match self.directory.recipients(&alert.user_id, channel) {
                    Ok(to) => rows.extend(to.into_iter().map(|r| (alert, channel, r))),
                    Err(reason) => written.rejected.push((alert.clone(), reason)),
                }
            }
        }
        if !rows.is_empty() {
            let started = Instant::now();
            let new = self.outbox.enqueue(&rows).await.map_err(NotifyError::Sql)?;
            metrics::histogram!("llamaflow_sink_latency_seconds", "sink" => "notify")
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("llamaflow_sink_written_total", "sink" => "notify").increment(new);
            self.wake.notify_one();
        }
        if !written.rejected.is_empty() {
            metrics::counter!("llamaflow_sink_failures_total", "sink" => "notify")
                .increment(written.rejected.len() as u64);
        }
        Ok(written)
    }
}

crate::sink::plain_sink!(NotifySink, "notify");
