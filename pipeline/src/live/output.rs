//! The output side of the continuous job: the output stage that publishes completed epochs
//! (gathered on the worker threads by [`crate::stage::EpochGather`]) to the live view,
//! WebSocket and stdout, and the durable sinks that write them and acknowledge each epoch.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sinks::jsonl::DeadLetters;
use sinks::websocket::Hub;
use sinks::{OffRuntime, OutputBatch, Sink};
use tokio::sync::mpsc;

use crate::checkpoint::Checkpointer;
use crate::config::Config;
use crate::health::Health;
use crate::stage::EpochOut;

/// The output stage: one thread that takes completed epochs in order, updates the live view
/// and publishes to WebSocket subscribers (together, under the hub's gate), writes stdout, and
/// hands each epoch to the durable sinks (blocking there is backpressure on the dataflow).
pub(super) struct OutputStage {
    pub hub: Option<Hub>,
    pub view: Option<Arc<view::LiveView>>,
    /// Takes the view version of a checkpoint's epoch.
    pub checkpointer: Arc<Checkpointer>,
    pub stdout: bool,
    pub sinks: SinkTasks,
    /// When the first live item of each epoch in flight reached the ingest front (for the
    /// publish latency).
    pub arrivals: Arc<Mutex<BTreeMap<u64, Instant>>>,
}

impl OutputStage {
    /// Starts the stage's thread, which ends once every sender of `rx` is gone.
    pub fn start(self, rx: std::sync::mpsc::Receiver<(u64, EpochOut)>) -> Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("output".into())
            .spawn(move || {
                while let Ok((epoch, out)) = rx.recv() {
                    self.epoch(epoch, out);
                }
            })
            .context("cannot start the output thread")
    }

    fn epoch(&self, epoch: u64, mut out: EpochOut) {
        out.order();
        let EpochOut { view: out, dead } = out;
        let arrived = self.arrivals.lock().ok().and_then(|mut a| {
            let t = a.remove(&epoch);
            // Epochs without events.
            *a = a.split_off(&epoch);
            t
        });
        for a in &out.alerts {
            metrics::counter!("llamaflow_alerts_total", "type" => a.alert_type.clone()).increment(1);
        }
        for e in &out.events {
            metrics::counter!("llamaflow_events_total", "type" => e.data.type_name()).increment(1);
        }
        let publish = || {
            if let Some(v) = &self.view {
                v.apply(epoch + 1, &out);
                if self.checkpointer.wants_view(epoch) {
                    self.checkpointer.deposit_view(epoch, v.current());
                }
            }
            if let Some(h) = &self.hub {
                for e in &out.events {
                    h.publish_event(e);
                }
                for a in &out.alerts {
                    h.publish_alert(a);
                }
            }
        };
        match &self.hub {
            Some(h) => h.publish_epoch(publish),
            None => publish(),
        }
        // Publish latency: the epoch's first live item reached the ingest front → its
        // events went out to WebSocket subscribers.
        if let Some(t) = arrived
            && !out.events.is_empty()
        {
            metrics::histogram!("llamaflow_publish_latency_seconds").record(t.elapsed().as_secs_f64());
        }
        if self.stdout && !out.alerts.is_empty() {
            let mut w = std::io::stdout().lock();
            for a in &out.alerts {
                if let Ok(line) = serde_json::to_string(a) {
                    // A closed stdout (e.g. `| head`) must not stop the pipeline.
                    let _ = writeln!(w, "{line}");
                }
            }
            let _ = w.flush();
        }
        self.sinks.send(OutputBatch {
            epoch,
            alerts: out.alerts,
            events: out.events,
            dead,
        });
    }
}

/// The live view as the hub's snapshot source.
pub(super) struct ViewSnapshots(pub Arc<view::LiveView>);

impl sinks::websocket::SnapshotSource for ViewSnapshots {
    fn snapshot(&self, channel: &str, user_id: Option<&str>) -> Option<(Vec<serde_json::Value>, i64)> {
        let state = self.0.current();
        state.snapshot(channel, user_id).map(|d| (d, state.as_of))
    }
}

/// Connects the configured `[sinks]` that acknowledge durable writes, and the dead-letter
/// output, which is always one of them. The alert channels' dispatcher starts here, on the
/// current runtime, with `recipients` as its directory.
pub(super) async fn connect_sinks(
    cfg: &Config,
    dead: DeadLetters,
    marks: &sinks::jsonl::FileMarks,
    recipients: Option<&sinks::notify::Directory>,
) -> Result<Vec<Box<dyn Sink>>> {
    let usage = |e: sinks::jsonl::JsonlError| crate::UsageError(e.to_string());
    let s = &cfg.sinks;
    let mut out: Vec<Box<dyn Sink>> = vec![Box::new(OffRuntime::new(dead.clone()))];
    if let Some(c) = &s.redis {
        out.push(Box::new(
            sinks::redis::RedisSink::connect(c.clone())
                .await
                .context("sinks.redis")?,
        ));
    }
    if let Some(c) = &s.postgres {
        out.push(Box::new(
            sinks::postgres::PgSink::connect(c.clone())
                .await
                .context("sinks.postgres")?,
        ));
    }
    if let Some(c) = &s.kafka {
        out.push(Box::new(
            sinks::kafka::KafkaSink::connect(c.clone())
                .await
                .context("sinks.kafka")?,
        ));
    }
    if let Some(c) = &s.sqs {
        out.push(Box::new(
            sinks::sqs::SqsSink::connect(c.clone()).await.context("sinks.sqs")?,
        ));
    }
    if let Some(c) = &s.webhook {
        out.push(Box::new(
            sinks::webhook::WebhookSink::new(c.clone()).context("sinks.webhook")?,
        ));
    }
    if let (Some(c), Some(directory)) = (&s.notify, recipients) {
        let (sink, dispatcher) = sinks::notify::NotifySink::connect(c.clone(), directory.clone(), dead.clone())
            .await
            .context("sinks.notify")?;
        tokio::spawn(dispatcher.run());
        // Without CDC of `users` / `user_devices` here (none configured, or another process
        // of a cluster reads it), the recipients are read again every 10 s.
        let followed = cfg.sources.postgres_cdc.as_ref().is_some_and(|c| {
            ["users", "user_devices"]
                .iter()
                .all(|t| c.tables.iter().any(|x| x.strip_prefix("public.").unwrap_or(x) == *t))
        });
        if !followed {
            tokio::spawn(sink.refresher(Duration::from_secs(10)));
        }
        out.push(Box::new(sink));
    }
    if let Some(c) = &s.parquet {
        let p = sinks::parquet::ParquetSink::open(c.clone()).context("sinks.parquet")?;
        out.push(Box::new(OffRuntime::new(p)));
    }
    if let Some(c) = &s.jsonl {
        out.push(Box::new(OffRuntime::new(
            sinks::jsonl::JsonlSink::open(c, marks).map_err(usage)?,
        )));
    }
    Ok(out)
}

/// Epochs queued for a sink (and most merged into one write).
const QUEUED: usize = 64;
/// Most epochs one write of a merging sink takes ([`Sink::merges`]).
const MAX_MERGED: usize = QUEUED;

/// The durable sinks, each a task writing the epochs queued to it in order; every written
/// epoch is acknowledged on one channel.
pub(super) struct SinkTasks {
    queues: Vec<mpsc::Sender<(Arc<OutputBatch>, Instant)>>,
}

impl SinkTasks {
    /// Starts one task per sink on `rt`. A failed write is retried with backoff until it
    /// succeeds (a batch is never dropped); alerts a sink gave up on are written to `dead`
    /// (fsynced, off the runtime's threads) before the epoch is acknowledged on `acks`.
    pub fn start(
        rt: &tokio::runtime::Runtime,
        sinks: Vec<Box<dyn Sink>>,
        dead: DeadLetters,
        health: Arc<Health>,
        acks: mpsc::UnboundedSender<u64>,
    ) -> (Self, Vec<tokio::task::JoinHandle<()>>) {
        let mut queues = Vec::new();
        let mut tasks = Vec::new();
        for mut sink in sinks {
            let (tx, mut rx) = mpsc::channel::<(Arc<OutputBatch>, Instant)>(QUEUED);
            queues.push(tx);
            let (acks, dead, health) = (acks.clone(), dead.clone(), health.clone());
            health.register(sink.name());
            tasks.push(rt.spawn(async move {
                let name = sink.name();
                while let Some((first, queued)) = rx.recv().await {
                    // A sink that merges takes every epoch waiting for it in one write.
                    let mut epochs = vec![first];
                    while sink.merges() && epochs.len() < MAX_MERGED {
                        match rx.try_recv() {
                            Ok((next, _)) => epochs.push(next),
                            Err(_) => break,
                        }
                    }
                    let batch = match epochs.as_slice() {
                        [one] => one.clone(),
                        many => {
                            metrics::counter!("llamaflow_sink_epochs_merged_total", "sink" => name)
                                .increment(many.len() as u64);
                            Arc::new(OutputBatch::merge(many))
                        }
                    };
                    let epoch = batch.epoch;
                    let mut backoff = Backoff::new(name, epoch);
                    let written = loop {
                        match sink.write(batch.clone()).await {
                            Ok(w) => break w,
                            Err(e) => backoff.wait(&health, &*e).await,
                        }
                    };
                    health.ok(name);
                    let rejected = Arc::new(written.dead_letters(name));
                    let mut backoff = Backoff::new("dead_letters", epoch);
                    while !rejected.is_empty() {
                        let (d, r) = (dead.clone(), rejected.clone());
                        match tokio::task::spawn_blocking(move || d.write(epoch, &r)).await {
                            Ok(Ok(())) => break,
                            Ok(Err(e)) => backoff.wait(&health, &e).await,
                            Err(e) => backoff.wait(&health, &e).await,
                        }
                    }
                    // How far behind the sink is: its queue wait plus the write.
                    metrics::gauge!("llamaflow_sink_behind_seconds", "sink" => name)
                        .set(queued.elapsed().as_secs_f64());
                    for b in &epochs {
                        let _ = acks.send(b.epoch);
                    }
                }
            }));
        }
        (SinkTasks { queues }, tasks)
    }

    /// Queues one epoch's batch to every sink (blocking while a sink is 64 epochs behind).
    fn send(&self, batch: OutputBatch) {
        let (batch, now) = (Arc::new(batch), Instant::now());
        for tx in &self.queues {
            let _ = tx.blocking_send((batch.clone(), now));
        }
    }

    /// How many sinks acknowledge each epoch.
    pub fn len(&self) -> usize {
        self.queues.len()
    }
}

/// Retries of one sink's write of one epoch: logged, shown in `/healthz`, 100 ms doubling
/// to 10 s.
struct Backoff {
    name: &'static str,
    epoch: u64,
    delay: Duration,
}

impl Backoff {
    fn new(name: &'static str, epoch: u64) -> Self {
        Backoff {
            name,
            epoch,
            delay: Duration::from_millis(100),
        }
    }

    /// Reports the failure `e`, then waits before the next attempt.
    async fn wait(&mut self, health: &Health, e: &(dyn std::error::Error + Send + Sync + 'static)) {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        let (name, epoch, delay) = (self.name, self.epoch, self.delay);
        health.failing(name, text.clone());
        tracing::error!("sink {name}: epoch {epoch}: {text}; retrying in {delay:?}");
        tokio::time::sleep(delay).await;
        self.delay = (delay * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::future::BoxFuture;
    use schemas::Alert;
    use sinks::{SinkError, Written};

    /// Records the epochs of each write; the first write waits until released, so that the
    /// epochs after it queue up meanwhile.
    struct Recording {
        merges: bool,
        writes: Arc<Mutex<Vec<Vec<String>>>>,
        started: Option<tokio::sync::oneshot::Sender<()>>,
        release: Option<tokio::sync::oneshot::Receiver<()>>,
    }

    impl Sink for Recording {
        fn name(&self) -> &'static str {
            "recording"
        }

        fn merges(&self) -> bool {
            self.merges
        }

        fn write(&mut self, batch: Arc<OutputBatch>) -> BoxFuture<'_, Result<Written, SinkError>> {
            Box::pin(async move {
                if let Some(started) = self.started.take() {
                    let _ = started.send(());
                }
                if let Some(release) = self.release.take() {
                    let _ = release.await;
                }
                let ids = batch.alerts.iter().map(|a| a.alert_id.clone()).collect();
                self.writes.lock().map_err(|e| e.to_string())?.push(ids);
                Ok(Written::default())
            })
        }
    }

    fn batch(epoch: u64) -> OutputBatch {
        let alert = Alert {
            alert_id: format!("a{epoch}"),
            rule_id: "r".into(),
            user_id: "u".into(),
            alert_type: "gas_price".into(),
            subject: "ethereum".into(),
            triggered_at: 0,
            value: 1.0,
            threshold: 0.0,
            message: String::new(),
            channels: vec!["websocket".into()],
            webhook_url: None,
        };
        OutputBatch {
            epoch,
            alerts: vec![alert],
            ..Default::default()
        }
    }

    /// Sends epoch 0 to one sink and, while its write is held, epochs 1..5; returns its writes
    /// and the acknowledgements.
    fn run(merges: bool) -> (Vec<Vec<String>>, Vec<u64>) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let marks = sinks::jsonl::FileMarks::default();
        let dead = DeadLetters::open(Some(&dir.path().join("dead.jsonl")), &marks).expect("dead letters");
        let (release_tx, release) = tokio::sync::oneshot::channel();
        let (started, started_rx) = tokio::sync::oneshot::channel();
        let writes = Arc::new(Mutex::new(Vec::new()));
        let sink = Recording {
            merges,
            writes: writes.clone(),
            started: Some(started),
            release: Some(release),
        };
        let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
        let (tasks, handles) = SinkTasks::start(&rt, vec![Box::new(sink)], dead, Arc::default(), acks_tx);
        tasks.send(batch(0));
        rt.block_on(started_rx).expect("the first write starts");
        for e in 1..5 {
            tasks.send(batch(e));
        }
        let _ = release_tx.send(());
        drop(tasks);
        let acks = rt.block_on(async move {
            for h in handles {
                h.await.expect("sink task");
            }
            let mut acks = Vec::new();
            while let Some(e) = acks_rx.recv().await {
                acks.push(e);
            }
            acks
        });
        let writes = writes.lock().expect("writes").clone();
        (writes, acks)
    }

    #[test]
    fn a_merging_sink_takes_the_waiting_epochs_in_one_write_and_acknowledges_each() {
        let ids = |r: std::ops::Range<u64>| r.map(|e| format!("a{e}")).collect::<Vec<_>>();
        let (writes, acks) = run(true);
        assert_eq!(writes, vec![ids(0..1), ids(1..5)]);
        assert_eq!(acks, vec![0, 1, 2, 3, 4]);
        let (writes, acks) = run(false);
        assert_eq!(writes, (0..5).map(|e| ids(e..e + 1)).collect::<Vec<_>>());
        assert_eq!(acks, vec![0, 1, 2, 3, 4]);
    }
}
