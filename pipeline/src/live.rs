//! The continuous job (`llamaflow run`): sources → ingest front → dataflow → sinks, with
//! source positions committed only after every durable sink has written the results.
//!
//! ```text
//! live sources ──► channel ──► front (batches of ≤ batch_ms) ──► Engine ──► LiveOutput
//!  (demo, …)                   records positions per epoch                   ├─ hub, stdout (at once)
//!                                                                            └─ per-epoch batches ──► sink tasks
//!                                       commit positions of epoch e  ◄── all sinks acked e ◄──┘
//! ```

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use metrics_exporter_prometheus::PrometheusBuilder;
use schemas::{Alert, DeadLetter, Event, Kind, Record, SourcePos};
use sinks::OutputBatch;
use sinks::jsonl::JsonlWriter;
use sinks::websocket::{Hub, WsConfig};
use sources::demo;
use sources::live::{Ack, Change, LiveItem};
use tokio::sync::mpsc;

use crate::checkpoint::{Checkpoint, Checkpointer, Completer, Positions};
use crate::config::{Config, DemoSection};
use crate::engine::{ClusterBus, Engine, EngineCheckpoint, Output};
use crate::replay::Source;
use operators::Snapshots;

/// A sink that must acknowledge durable writes before positions are committed.
enum DurableSink {
    /// JSONL files, flushed and synced per batch.
    Jsonl {
        alerts: Option<JsonlWriter>,
        events: Option<JsonlWriter>,
    },
    /// Redis latest values + pub/sub.
    Redis(Box<sinks::redis::RedisSink>),
    /// Postgres upserts.
    Postgres(Box<sinks::postgres::PgSink>),
    /// Kafka topics.
    Kafka(Box<sinks::kafka::KafkaSink>),
    /// SQS queue of alerts.
    Sqs(Box<sinks::sqs::SqsSink>),
    /// Webhook deliveries of alerts with the `webhook` channel.
    Webhook(Box<sinks::webhook::WebhookSink>),
    /// Parquet dataset: rows spooled (fsynced) per batch, part files closed per rollover.
    Parquet(Box<sinks::parquet::ParquetSink>),
}

impl DurableSink {
    fn name(&self) -> &'static str {
        match self {
            DurableSink::Jsonl { .. } => "jsonl",
            DurableSink::Redis(_) => "redis",
            DurableSink::Postgres(_) => "postgres",
            DurableSink::Kafka(_) => "kafka",
            DurableSink::Sqs(_) => "sqs",
            DurableSink::Webhook(_) => "webhook",
            DurableSink::Parquet(_) => "parquet",
        }
    }

    /// Writes a batch durably; returns the alerts the sink gave up on, with the reason.
    async fn write(&mut self, batch: &OutputBatch) -> Result<Vec<(Alert, String)>> {
        match self {
            DurableSink::Redis(s) => s.write(batch).await.map(|()| Vec::new()).map_err(Into::into),
            DurableSink::Postgres(s) => s.write(batch).await.map(|()| Vec::new()).map_err(Into::into),
            DurableSink::Kafka(s) => s.write(batch).await.map(|()| Vec::new()).map_err(Into::into),
            DurableSink::Sqs(s) => Ok(s.write(batch).await?.failed),
            DurableSink::Webhook(s) => Ok(s.write(batch).await?.failed),
            DurableSink::Parquet(s) => s.write(batch).await.map(|()| Vec::new()).map_err(Into::into),
            DurableSink::Jsonl { alerts, events } => {
                if let Some(w) = alerts {
                    for a in &batch.alerts {
                        w.write(a)?;
                    }
                    w.sync()?;
                }
                if let Some(w) = events {
                    for e in &batch.events {
                        w.write(e)?;
                    }
                    w.sync()?;
                }
                Ok(Vec::new())
            }
        }
    }
}

/// Tracks which epochs every sink has written.
struct Coordinator {
    sinks: usize,
    acked: BTreeMap<u64, usize>,
    /// When the first live item of each epoch in flight reached the ingest front.
    ingested: BTreeMap<u64, Instant>,
    /// Every epoch below this is written by every sink.
    durable_upto: u64,
}

impl Coordinator {
    fn new(sinks: usize) -> Self {
        Coordinator {
            sinks: sinks.max(1),
            acked: BTreeMap::new(),
            ingested: BTreeMap::new(),
            durable_upto: 0,
        }
    }

    /// Records that one sink wrote `epoch`; returns how many epochs are now durable.
    fn ack(&mut self, epoch: u64) -> u64 {
        *self.acked.entry(epoch).or_default() += 1;
        while self.acked.get(&self.durable_upto).is_some_and(|n| *n >= self.sinks) {
            self.acked.remove(&self.durable_upto);
            // End-to-end latency: ingest of the epoch's first live item → every sink wrote it.
            if let Some(t) = self.ingested.remove(&self.durable_upto) {
                metrics::histogram!("llamaflow_e2e_latency_seconds").record(t.elapsed().as_secs_f64());
            }
            self.durable_upto += 1;
        }
        self.durable_upto
    }
}

/// Receives dataflow results on the worker threads and gathers them per epoch; completed
/// epochs go, in order, to the [`OutputStage`] thread. Workers only hand data over: no
/// socket, file or blocking channel I/O happens on them (dead letters aside).
struct LiveOutput {
    epochs: Mutex<BTreeMap<u64, view::Epoch>>,
    done: Mutex<u64>,
    to_stage: std::sync::mpsc::Sender<(u64, view::Epoch)>,
    dead: Arc<Mutex<JsonlWriter>>,
}

impl LiveOutput {
    fn with_epoch(&self, epoch: u64, f: impl FnOnce(&mut view::Epoch)) {
        if let Ok(mut e) = self.epochs.lock() {
            f(e.entry(epoch).or_default());
        }
    }
}

impl Output for LiveOutput {
    fn alerts(&self, epoch: u64, alerts: &[Alert]) {
        self.with_epoch(epoch, |e| e.alerts.extend_from_slice(alerts));
    }

    fn events(&self, epoch: u64, events: &[Event]) {
        self.with_epoch(epoch, |e| e.events.extend_from_slice(events));
    }

    fn state(&self, epoch: u64, state: &[operators::StateOut]) {
        self.with_epoch(epoch, |e| e.state.extend_from_slice(state));
    }

    fn dead(&self, _epoch: u64, dead: &[DeadLetter]) {
        write_dead(&self.dead, dead);
    }

    fn epochs_done(&self, upto: u64) {
        let Ok(mut done) = self.done.lock() else { return };
        let mut ready = match self.epochs.lock() {
            Ok(mut b) => {
                let rest = b.split_off(&upto);
                std::mem::replace(&mut *b, rest)
            }
            Err(_) => return,
        };
        // Epochs without output still have to be acknowledged: send an empty batch for them.
        for epoch in *done..upto {
            let out = ready.remove(&epoch).unwrap_or_default();
            let _ = self.to_stage.send((epoch, out));
        }
        *done = upto;
    }
}

/// The output stage: one thread that takes completed epochs in order, updates the live view
/// and publishes to WebSocket subscribers (together, under the hub's gate), writes stdout, and
/// hands each epoch to the durable sinks (blocking there is backpressure on the dataflow).
struct OutputStage {
    hub: Option<Hub>,
    view: Option<Arc<view::LiveView>>,
    /// Takes the view version of a checkpoint's epoch.
    checkpointer: Arc<Checkpointer>,
    stdout: bool,
    to_sinks: Vec<mpsc::Sender<Arc<OutputBatch>>>,
    /// With no durable sink, completed epochs are acknowledged here directly.
    self_ack: Option<mpsc::UnboundedSender<u64>>,
    /// When the first live item of each epoch in flight reached the ingest front (for the
    /// publish latency).
    arrivals: Arc<Mutex<BTreeMap<u64, Instant>>>,
}

impl OutputStage {
    fn start(self, rx: std::sync::mpsc::Receiver<(u64, view::Epoch)>) -> Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("output".into())
            .spawn(move || {
                while let Ok((epoch, out)) = rx.recv() {
                    self.epoch(epoch, out);
                }
            })
            .context("cannot start the output thread")
    }

    fn epoch(&self, epoch: u64, out: view::Epoch) {
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
        if let Some(ack) = &self.self_ack {
            let _ = ack.send(epoch);
            return;
        }
        let batch = Arc::new(OutputBatch {
            epoch,
            alerts: out.alerts,
            events: out.events,
        });
        for tx in &self.to_sinks {
            let _ = tx.blocking_send(batch.clone());
        }
    }
}

/// The live view as the hub's snapshot source.
struct ViewSnapshots(Arc<view::LiveView>);

impl sinks::websocket::SnapshotSource for ViewSnapshots {
    fn snapshot(&self, channel: &str, user_id: Option<&str>) -> Option<(Vec<serde_json::Value>, i64)> {
        let state = self.0.current();
        state.snapshot(channel, user_id).map(|d| (d, state.as_of))
    }
}

fn write_dead(w: &Mutex<JsonlWriter>, dead: &[DeadLetter]) {
    let Ok(mut w) = w.lock() else { return };
    for d in dead {
        metrics::counter!("llamaflow_dead_letters_total", "reason" => d.reason_label().to_string()).increment(1);
        if let Err(e) = w.write(d) {
            tracing::error!("cannot write dead letter: {e}");
        }
    }
    let _ = w.flush();
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The bundled feed as a live source, paced at `speed`.
async fn demo_source(d: DemoSection, tx: mpsc::Sender<LiveItem>, stop: Arc<AtomicBool>) {
    let item = |pos: SourcePos, record: Record| LiveItem {
        pos,
        ack: Ack::None,
        change: Change::Record(record),
    };
    if d.rules {
        let origin: Arc<str> = "demo-setup:".into();
        for (i, p) in demo::demo_protocols().into_iter().enumerate() {
            if tx
                .send(item(SourcePos::new(origin.clone(), i as u64), Record::Protocol(p)))
                .await
                .is_err()
            {
                return;
            }
        }
        for (i, r) in demo::demo_rules().into_iter().enumerate() {
            if tx
                .send(item(SourcePos::new(origin.clone(), 1000 + i as u64), Record::Rule(r)))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    let start = now_secs() - i64::from(d.warmup_minutes) * 60;
    let mut feed = demo::DemoFeed::new(start, d.seed).peekable();
    let wall0 = Instant::now();
    let warmup_ms = i64::from(d.warmup_minutes) * 60_000;
    while !stop.load(Ordering::Relaxed) {
        let sim_now = start * 1000 + warmup_ms + (wall0.elapsed().as_secs_f64() * d.speed * 1000.0) as i64;
        while feed.peek().is_some_and(|(_, r)| r.timestamp() <= sim_now) {
            let Some((pos, rec)) = feed.next() else { break };
            if tx.send(item(pos, rec)).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The hand-over from history to the live streams: on each Kafka partition (and tailed
/// file), the records up to the end of history (event time) are already covered by history and
/// skipped, up to the first one after it; from there on everything passes. Live streams start
/// where they are configured to (committed offsets, `start_from_timestamp_ms`, byte offsets),
/// so nothing after the hand-over point can be missed; seeking by time first only saves reading.
struct Handoff {
    /// The newest event time of each record kind in the history (kinds history did not have
    /// are not covered).
    ends: std::collections::HashMap<Kind, schemas::Millis>,
    /// Partitions / files past the hand-over point.
    passed: std::collections::HashSet<String>,
}

impl Handoff {
    /// Whether the live item is covered by history.
    fn covered(&mut self, item: &LiveItem) -> bool {
        let Change::Record(rec) = &item.change else {
            return false;
        };
        let Some(&end) = self.ends.get(&rec.kind()) else {
            return false;
        };
        let stream = match &item.ack {
            Ack::Kafka { topic, partition, .. } => format!("{topic}/{partition}"),
            Ack::File { path, .. } => path.clone(),
            Ack::Lsn(_) | Ack::None => return false,
        };
        if self.passed.contains(&stream) {
            return false;
        }
        if rec.timestamp() <= end {
            return true;
        }
        self.passed.insert(stream);
        false
    }
}

/// The history's callbacks of [`crate::replay::feed`]: metrics, the hand-over points, dead
/// letters and progress.
struct HistoryFeed<'a> {
    ends: &'a mut std::collections::HashMap<Kind, schemas::Millis>,
    output: &'a LiveOutput,
    progress: Option<&'a indicatif::ProgressBar>,
    started: Instant,
}

impl crate::replay::Feed for HistoryFeed<'_> {
    fn record(&mut self, rec: &Record) -> Result<()> {
        metrics::counter!("llamaflow_records_in_total", "kind" => rec.kind().name()).increment(1);
        if !matches!(rec, Record::Rule(_) | Record::Protocol(_)) {
            let e = self.ends.entry(rec.kind()).or_insert(schemas::Millis::MIN);
            *e = (*e).max(rec.timestamp());
        }
        Ok(())
    }

    fn dead(&mut self, dead: &[DeadLetter]) {
        self.output.dead(0, dead);
    }

    fn progress(&mut self, n: u64) {
        if let Some(pb) = self.progress {
            let rate = n as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            pb.set_message(format!("{n} records · {rate:.0} records/s"));
        }
    }
}

/// Applies live items at the ingest front.
struct Front {
    hub: Option<Hub>,
    output: Arc<LiveOutput>,
    handoff: Option<Handoff>,
}

impl Front {
    /// Stamps a record (or rule deletion) into `batch`, applies API-key changes to the hub,
    /// dead-letters invalid input, and remembers the item's commit position.
    fn apply(
        &mut self,
        item: LiveItem,
        engine: &mut Engine,
        batch: &mut Vec<operators::Envelope>,
        positions: &mut Positions,
    ) {
        positions.add(&item.ack);
        if self.handoff.as_mut().is_some_and(|h| h.covered(&item)) {
            metrics::counter!("llamaflow_handoff_skipped_total").increment(1);
            return;
        }
        match item.change {
            Change::Record(rec) => {
                metrics::counter!("llamaflow_records_in_total", "kind" => rec.kind().name()).increment(1);
                engine.sequencer().push(item.pos, rec, batch);
            }
            Change::DeleteRule(id) => engine.sequencer().delete_rule(item.pos, &id, batch),
            Change::DeleteProtocol(id) => engine.sequencer().delete_protocol(item.pos, &id, batch),
            Change::ApiKey { key, user_id } => {
                if let Some(h) = &self.hub {
                    match user_id {
                        Some(u) => h.set_api_key(key, u),
                        None => {
                            h.remove_api_key(&key);
                        }
                    }
                }
            }
            Change::Dead(d) => self.output.dead(0, std::slice::from_ref(&d)),
        }
    }
}

/// History inputs of the config (files, exports), merged by event time.
async fn history(cfg: &Config) -> Result<Vec<Source>> {
    let mut out: Vec<Source> = Vec::new();
    for f in cfg.sources.files.iter().filter(|f| !f.follow) {
        let kind = Kind::parse(&f.kind).unwrap_or(Kind::Price);
        out.push(Box::new(
            sources::files::open(&f.path, kind).map_err(|e| crate::UsageError(e.to_string()))?,
        ));
    }
    for d in &cfg.sources.dynamodb_export {
        out.push(crate::replay::open_export(d, &cfg.sources.s3).await?);
    }
    Ok(out)
}

/// Connects the `[sinks]` that acknowledge durable writes.
async fn durable_sinks(cfg: &Config) -> Result<Vec<DurableSink>> {
    let mut out = Vec::new();
    if let Some(c) = &cfg.sinks.redis {
        let s = sinks::redis::RedisSink::connect(c.clone())
            .await
            .context("sinks.redis")?;
        out.push(DurableSink::Redis(Box::new(s)));
    }
    if let Some(c) = &cfg.sinks.postgres {
        let s = sinks::postgres::PgSink::connect(c.clone())
            .await
            .context("sinks.postgres")?;
        out.push(DurableSink::Postgres(Box::new(s)));
    }
    if let Some(c) = &cfg.sinks.kafka {
        let s = sinks::kafka::KafkaSink::connect(c.clone())
            .await
            .context("sinks.kafka")?;
        out.push(DurableSink::Kafka(Box::new(s)));
    }
    if let Some(c) = &cfg.sinks.sqs {
        let s = sinks::sqs::SqsSink::connect(c.clone()).await.context("sinks.sqs")?;
        out.push(DurableSink::Sqs(Box::new(s)));
    }
    if let Some(c) = &cfg.sinks.webhook {
        let s = sinks::webhook::WebhookSink::new(c.clone()).context("sinks.webhook")?;
        out.push(DurableSink::Webhook(Box::new(s)));
    }
    if let Some(c) = &cfg.sinks.parquet {
        let s = sinks::parquet::ParquetSink::open(c.clone()).context("sinks.parquet")?;
        out.push(DurableSink::Parquet(Box::new(s)));
    }
    if let Some(j) = &cfg.sinks.jsonl {
        let open = |p: &Option<PathBuf>| -> Result<Option<JsonlWriter>> {
            p.as_ref()
                .map(|p| JsonlWriter::append(p).map_err(|e| crate::UsageError(e.to_string()).into()))
                .transpose()
        };
        out.push(DurableSink::Jsonl {
            alerts: open(&j.alerts)?,
            events: open(&j.events)?,
        });
    }
    Ok(out)
}

/// Runs the continuous job until SIGTERM / Ctrl-C (or `stop_after`), then drains: stops the
/// sources, finishes the dataflow, waits for every sink, commits, and returns.
pub fn run(cfg: Config, stop_after: Option<Duration>) -> Result<()> {
    let cluster = cfg.cluster();
    cluster
        .validate()
        .map_err(|e| crate::UsageError(format!("pipeline.processes: {e}")))?;
    let mut cfg = cfg;
    if cluster.is_multi() {
        scale_out(&mut cfg)?;
    }
    let cfg = cfg;
    let bus = ClusterBus::new(&cluster);
    let recorder = PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the Prometheus metrics recorder")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;

    let ws_cfg = cfg.sinks.websocket.as_ref().map(|w| w.ws_config());
    let hub = match (&cfg.pipeline.listen, ws_cfg) {
        (Some(_), Some(w)) => Some(Hub::new(w)),
        (Some(_), None) => Some(Hub::new(WsConfig {
            allow_anonymous: true,
            ..WsConfig::default()
        })),
        (None, _) => None,
    };
    let dead = Arc::new(Mutex::new(match &cfg.pipeline.dead_letter_out {
        Some(p) => JsonlWriter::append(p).map_err(|e| crate::UsageError(format!("pipeline.dead_letter_out: {e}")))?,
        None => JsonlWriter::stderr(),
    }));

    // Durable sinks run as tasks; each acknowledges epochs to the coordinator.
    let mut sinks = rt.block_on(durable_sinks(&cfg))?;
    let health = Arc::new(crate::health::Health::default());
    let coordinator = Arc::new(Mutex::new(Coordinator::new(sinks.len())));
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<u64>();
    let mut to_sinks = Vec::new();
    let mut sink_tasks = Vec::new();
    for mut sink in sinks.drain(..) {
        let (tx, mut rx) = mpsc::channel::<Arc<OutputBatch>>(64);
        to_sinks.push(tx);
        let ack_tx = ack_tx.clone();
        let dead = dead.clone();
        let health = health.clone();
        health.register(sink.name());
        sink_tasks.push(rt.spawn(async move {
            let name = sink.name();
            while let Some(batch) = rx.recv().await {
                let mut backoff = Duration::from_millis(100);
                loop {
                    match sink.write(&batch).await {
                        Ok(failed) => {
                            // Alerts a sink gave up on (SQS, webhooks) go to the dead-letter output.
                            let letters: Vec<DeadLetter> = failed
                                .into_iter()
                                .map(|(a, reason)| {
                                    let raw = serde_json::to_string(&a).unwrap_or_default();
                                    DeadLetter::new(format!("sink:{name}"), reason, &raw)
                                })
                                .collect();
                            write_dead(&dead, &letters);
                            health.ok(name);
                            break;
                        }
                        Err(e) => {
                            health.failing(name, format!("{e:#}"));
                            // Never drop: keep retrying the batch (each sink counts its failures).
                            tracing::error!("sink {name}: epoch {}: {e:#}; retrying in {backoff:?}", batch.epoch);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                        }
                    }
                }
                let _ = ack_tx.send(batch.epoch);
            }
        }));
    }
    let self_ack = sink_tasks.is_empty().then(|| ack_tx.clone());
    drop(ack_tx);

    // Checkpoints: resume from the newest one, if any.
    let workers = cfg.pipeline.workers.max(1) as usize;
    let first_worker = cluster.process * workers;
    let restored = match &cfg.pipeline.checkpoint_dir {
        Some(dir) => Checkpoint::load_latest(dir)?,
        None => None,
    };
    let mut cfg = cfg;
    let mut engine_ckpt = EngineCheckpoint {
        snapshots: cfg
            .pipeline
            .checkpoint_dir
            .as_ref()
            .map(|_| Snapshots::for_process(workers, first_worker)),
        ..Default::default()
    };
    let (resume_positions, last_id, restored_view) = match restored {
        Some(ck) => {
            eprintln!(
                "llamaflow: resuming from checkpoint {} ({} workers, Kafka {} partition(s), CDC LSN {:?}, {} file(s))",
                ck.id,
                ck.state.len(),
                ck.positions.kafka.len(),
                ck.positions.lsn,
                ck.positions.files.len()
            );
            // The rules and protocols are in the restored state: stream from the slot only.
            if let Some(c) = cfg.sources.postgres_cdc.as_mut() {
                c.snapshot = false;
            }
            if let Some(k) = cfg.sources.kafka.as_mut() {
                k.resume_offsets = ck.positions.kafka.iter().map(|(tp, o)| (tp.clone(), o + 1)).collect();
            }
            engine_ckpt.restore = Some(ck.state);
            engine_ckpt.sequencer = Some(ck.sequencer);
            (Some(ck.positions), ck.id, ck.view)
        }
        None => (None, 0, None),
    };
    let checkpointer = Checkpointer::new(
        cfg.pipeline.checkpoint_dir.clone().zip(engine_ckpt.snapshots.clone()),
        last_id,
    );
    // The read view (SPEC §8) is served where the WebSocket is; its history is checkpointed.
    let live_view = hub
        .as_ref()
        .map(|_| Arc::new(view::LiveView::new(cfg.operators.view_config())));
    let checkpointer = Arc::new(match live_view {
        Some(_) => checkpointer.with_view(),
        None => checkpointer,
    });
    if let (Some(v), Some(bytes)) = (&live_view, &restored_view) {
        let image: view::HistoryImage =
            bincode::deserialize(bytes).context("cannot decode the checkpoint's read view")?;
        v.restore_history(image);
    }
    let cfg = cfg;

    // Live sources feed one bounded channel. Order: the CDC snapshot (rules, protocols, keys)
    // first, then the history inputs, then the live streams (Kafka, demo) are started.
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (live_tx, live_rx) = mpsc::channel::<LiveItem>(65_536);
    let handles = Arc::new(tokio::sync::Mutex::new(SourceHandles::default()));
    let mut snapshot_len = 0;
    if let Some(c) = &cfg.sources.postgres_cdc {
        let h = rt
            .block_on(sources::postgres_cdc::start(c.clone(), live_tx.clone()))
            .context("sources.postgres_cdc")?;
        snapshot_len = h.snapshot_len();
        rt.block_on(handles.lock()).cdc = Some(h);
    }
    let (history_done, history_done_rx) = tokio::sync::oneshot::channel::<()>();
    // A live source that cannot start stops the job (exit 1) with its error.
    let fatal = Arc::new(Fatal::default());
    {
        let (demo, kafka) = (cfg.sources.demo.clone(), cfg.sources.kafka.clone());
        let follows: Vec<(PathBuf, Kind, u64)> = cfg
            .sources
            .files
            .iter()
            .filter(|f| f.follow)
            .map(|f| {
                (
                    f.path.clone(),
                    Kind::parse(&f.kind).unwrap_or(Kind::Price),
                    resume_positions
                        .as_ref()
                        .and_then(|p| p.files.get(&f.path.display().to_string()).copied())
                        .unwrap_or(f.start_offset),
                )
            })
            .collect();
        let (handles, stop, fatal) = (handles.clone(), stop.clone(), fatal.clone());
        let stop_rx = stop_rx.clone();
        rt.spawn(async move {
            if history_done_rx.await.is_err() {
                return;
            }
            for (path, kind, offset) in follows {
                let (tx, stop_rx, fatal) = (live_tx.clone(), stop_rx.clone(), fatal.clone());
                tokio::spawn(async move {
                    let name = path.display().to_string();
                    if let Err(e) =
                        sources::files::follow::follow(path, kind, offset, Duration::from_millis(50), tx, stop_rx).await
                    {
                        fatal.fail(format!("sources.files ({name}, follow): {e}"));
                    }
                });
            }
            if let Some(d) = demo {
                tokio::spawn(demo_source(d, live_tx.clone(), stop));
            }
            if let Some(c) = kafka {
                match sources::kafka::start(&c, live_tx.clone()).await {
                    Ok(k) => handles.lock().await.kafka = Some(k),
                    Err(e) => fatal.fail(format!("sources.kafka: {e}")),
                }
            }
        });
    }

    // Commits: once every sink has written the epochs up to a prepared checkpoint and its
    // snapshot is in, the checkpoint is written and its positions committed to the sources.
    let committer = {
        let completer = Completer::start(checkpointer.clone())?;
        let coordinator = coordinator.clone();
        let handles = handles.clone();
        let checkpointer = checkpointer.clone();
        let fatal = fatal.clone();
        let bus = bus.clone();
        rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut durable;
            loop {
                tokio::select! {
                    epoch = ack_rx.recv() => match epoch {
                        Some(e) => {
                            if let Ok(mut c) = coordinator.lock() {
                                bus.set_durable(c.ack(e));
                            }
                        }
                        None => break,
                    },
                    _ = tick.tick() => {}
                }
                // In a cluster an epoch counts as durable once every process's sinks wrote it:
                // this process's records cause outputs in the others.
                durable = bus.durable();
                metrics::gauge!("llamaflow_checkpoint_age_seconds").set(checkpointer.age_secs());
                match completer.complete(durable).await {
                    Ok(Some(positions)) => handles.lock().await.commit(&positions).await,
                    Ok(None) => {}
                    Err(e) => fatal.fail(format!("checkpoint failed: {e:#}")),
                }
            }
            // The final checkpoint (prepared at shutdown) completes once its snapshot is in
            // (and, in a cluster, once the other processes reported the epoch written).
            for _ in 0..100 {
                let durable = bus.durable();
                match completer.complete(durable).await {
                    Ok(Some(positions)) => {
                        handles.lock().await.commit(&positions).await;
                        break;
                    }
                    Ok(None) if checkpointer.has_pending() => tokio::time::sleep(Duration::from_millis(20)).await,
                    Ok(None) => break,
                    Err(e) => {
                        fatal.fail(format!("final checkpoint failed: {e:#}"));
                        break;
                    }
                }
            }
            std::mem::take(&mut *handles.lock().await).stop().await;
        })
    };

    if let (Some(h), Some(v)) = (&hub, &live_view) {
        h.set_snapshots(Arc::new(ViewSnapshots(v.clone())));
    }
    let arrivals = Arc::new(Mutex::new(BTreeMap::new()));
    let (stage_tx, stage_rx) = std::sync::mpsc::channel();
    let stage = OutputStage {
        hub: hub.clone(),
        view: live_view.clone(),
        checkpointer: checkpointer.clone(),
        stdout: cfg.sinks.stdout,
        to_sinks,
        self_ack,
        arrivals: arrivals.clone(),
    }
    .start(stage_rx)?;
    let output = Arc::new(LiveOutput {
        epochs: Mutex::new(BTreeMap::new()),
        done: Mutex::new(0),
        to_stage: stage_tx,
        dead,
    });
    if cluster.is_multi() {
        eprintln!(
            "llamaflow: process {} of {}: connecting to {}",
            cluster.process,
            cluster.processes,
            cluster.hosts.join(", ")
        );
    }
    let mut engine = Engine::start_cluster(
        workers,
        &cluster,
        bus.clone(),
        cfg.operators.op_config(),
        output.clone(),
        engine_ckpt,
    )?;

    let listener = match cfg.pipeline.listen {
        Some(addr) => Some(
            rt.block_on(tokio::net::TcpListener::bind(addr))
                .with_context(|| format!("cannot listen on {addr} (set pipeline.listen or --listen)"))?,
        ),
        None => None,
    };
    if let Some(addr) = cfg.pipeline.listen {
        eprintln!(
            "llamaflow: {}; dashboard http://{addr}/ · WebSocket ws://{addr}/ws · metrics http://{addr}/metrics",
            cfg.summary()
        );
    }

    // The ingest front: history first, then live items in batches of ≤ batch_ms.
    let front = {
        // A restored job does not re-read history: its effects are in the checkpoint.
        let history = match resume_positions {
            Some(_) => Vec::new(),
            None => rt.block_on(history(&cfg))?,
        };
        let resumed = resume_positions.is_some();
        let mut positions = resume_positions.clone().unwrap_or_default();
        let checkpointer = checkpointer.clone();
        let interval = Duration::from_millis(cfg.pipeline.checkpoint_interval_ms.max(1));
        let (batch_ms, batch_max) = (cfg.pipeline.batch_ms, cfg.pipeline.batch_max);
        let idle_epoch = Duration::from_millis(batch_ms.max(1));
        let multi = cluster.is_multi();
        let process = cluster.process;
        let hub = hub.clone();
        let output = output.clone();
        let stop = stop.clone();
        let rt_handle = rt.handle().clone();
        let coordinator = coordinator.clone();
        let health_front = health.clone();
        let fatal_front = fatal.clone();
        std::thread::Builder::new()
            .name("ingest".into())
            .spawn(move || -> Result<()> {
                // The job stops (exit 1) when the ingest thread fails, rather than serving on
                // without input.
                let _guard = PanicIsFatal(fatal_front.clone());
                let ingest = move || -> Result<()> {
                    let mut batch = Vec::new();
                    let mut live_rx = live_rx;
                    // Whether anything was sent since the last checkpoint, and when that was.
                    let mut dirty = false;
                    let mut last_ckpt = Instant::now();
                    let mut live = Front {
                        hub: hub.clone(),
                        output: output.clone(),
                        handoff: None,
                    };
                    for _ in 0..snapshot_len {
                        match live_rx.blocking_recv() {
                            Some(item) => live.apply(item, &mut engine, &mut batch, &mut positions),
                            None => break,
                        }
                    }
                    let read_history = !history.is_empty();
                    let started = Instant::now();
                    let progress = (read_history && std::io::stderr().is_terminal()).then(|| {
                        let pb = indicatif::ProgressBar::new_spinner();
                        pb.set_style(
                            indicatif::ProgressStyle::with_template("{spinner} history {elapsed_precise} {msg}")
                                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                        );
                        pb
                    });
                    // The CDC snapshot (rules, protocols) goes in before the history; a restored
                    // job sends its first epoch at once, so the restored state is served without
                    // waiting for new input.
                    if !batch.is_empty() || resumed {
                        dirty = true;
                        engine.send(std::mem::take(&mut batch))?;
                    }
                    let mut ends = std::collections::HashMap::<Kind, schemas::Millis>::new();
                    let mut history_feed = HistoryFeed {
                        ends: &mut ends,
                        output: &output,
                        progress: progress.as_ref(),
                        started,
                    };
                    let inputs = crate::replay::Inputs::from_sources(history);
                    let n = crate::replay::feed(inputs, Some(&mut engine), batch_max, &mut history_feed)?;
                    dirty |= n > 0;
                    if let Some(pb) = progress {
                        pb.finish_and_clear();
                    }
                    if read_history {
                        let secs = started.elapsed().as_secs_f64();
                        eprintln!(
                            "llamaflow: history: {n} records in {secs:.1} s ({:.0} records/s){}",
                            n as f64 / secs.max(1e-9),
                            ends.iter()
                                .map(|(k, e)| format!("; live {} from after event time {e} ms", k.name()))
                                .collect::<String>()
                        );
                    }
                    if multi && process == 0 {
                        // Everything read so far goes out before the epoch announced as the end of
                        // history: the other processes' live records come after it.
                        if !batch.is_empty() {
                            dirty = true;
                            engine.send(std::mem::take(&mut batch))?;
                        }
                        let named = ends.iter().map(|(k, e)| (k.name().to_string(), *e)).collect();
                        engine.bus().announce_history(engine.epochs(), named);
                    } else if multi {
                        // Wait for process 0's history, sending empty epochs meanwhile (the
                        // dataflow's epochs only complete once every process has sent them).
                        loop {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            match engine.bus().history() {
                                Some((epoch, _)) if engine.epochs() < epoch => engine.send(Vec::new())?,
                                Some((_, named)) => {
                                    ends = named
                                        .into_iter()
                                        .filter_map(|(k, e)| Kind::parse(&k).map(|k| (k, e)))
                                        .collect();
                                    break;
                                }
                                None => {
                                    engine.send(Vec::new())?;
                                    std::thread::sleep(idle_epoch);
                                }
                            }
                        }
                    }
                    let _ = history_done.send(());
                    live.handoff = (!ends.is_empty()).then(|| Handoff {
                        ends,
                        passed: Default::default(),
                    });
                    health_front.set_started();
                    let mut sent_positions = positions.clone();
                    let mut first_arrival: Option<Instant> = None;
                    let mut last_send = Instant::now();
                    loop {
                        let stopping = stop.load(Ordering::Relaxed);
                        let moved = positions != sent_positions;
                        dirty |= !batch.is_empty() || moved;
                        // A checkpoint every `interval` while records flow, and a final one on stop.
                        let checkpoint = dirty && (stopping || last_ckpt.elapsed() >= interval);
                        if !batch.is_empty() || moved || checkpoint {
                            if checkpoint {
                                checkpointer.prepare(engine.epochs(), engine.sequencer().clone(), positions.clone());
                                dirty = false;
                                last_ckpt = Instant::now();
                            }
                            if let Some(t) = first_arrival.take() {
                                if let Ok(mut a) = arrivals.lock() {
                                    a.insert(engine.epochs(), t);
                                }
                                if let Ok(mut c) = coordinator.lock() {
                                    c.ingested.insert(engine.epochs(), t);
                                }
                            }
                            engine.send(std::mem::take(&mut batch))?;
                            sent_positions = positions.clone();
                            last_send = Instant::now();
                        } else if multi && last_send.elapsed() >= idle_epoch {
                            // An idle process still advances its epochs, or the cluster stalls.
                            engine.send(Vec::new())?;
                            last_send = Instant::now();
                        }
                        // On stop, items still queued are not processed and so never committed: the
                        // sources deliver them again after a restart.
                        if stopping {
                            break;
                        }
                        // Wait for the first item, then gather for at most batch_ms.
                        // Idle, it blocks on the channel (for ≤ 1 ms, to notice stops and checkpoints),
                        // so the first item of a quiet stream goes in at once.
                        let first = match live_rx.try_recv() {
                            Ok(i) => i,
                            Err(mpsc::error::TryRecvError::Empty) => {
                                let wait =
                                    async { tokio::time::timeout(Duration::from_millis(1), live_rx.recv()).await };
                                match rt_handle.block_on(wait) {
                                    Ok(Some(i)) => i,
                                    Ok(None) => break,
                                    Err(_) => continue,
                                }
                            }
                            Err(mpsc::error::TryRecvError::Disconnected) => break,
                        };
                        first_arrival.get_or_insert_with(Instant::now);
                        let deadline = Instant::now() + Duration::from_millis(batch_ms);
                        let mut next = Some(first);
                        while let Some(item) = next.take() {
                            live.apply(item, &mut engine, &mut batch, &mut positions);
                            if batch.len() >= batch_max {
                                break;
                            }
                            while next.is_none() && Instant::now() < deadline {
                                match live_rx.try_recv() {
                                    Ok(i) => next = Some(i),
                                    Err(mpsc::error::TryRecvError::Empty) => {
                                        std::thread::sleep(Duration::from_micros(200))
                                    }
                                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                                }
                            }
                        }
                    }
                    engine.finish()
                };
                let result = ingest();
                if let Err(e) = &result {
                    fatal_front.fail(format!("ingest: {e:#}"));
                }
                result
            })?
    };

    if let (Some(listener), Some(hub)) = (listener, hub.clone()) {
        let render = Arc::new(move || recorder.render());
        let h = health.clone();
        let app = crate::http::app(hub.clone(), render, Arc::new(move || h.report()));
        let app = match &live_view {
            Some(v) => {
                let keys = hub.clone();
                app.merge(view::api::router(
                    v.clone(),
                    Arc::new(move |k: &str| keys.user_for_key(k)),
                ))
            }
            None => app,
        };
        let stop2 = stop.clone();
        let fatal2 = fatal.clone();
        let served = rt.block_on(async move {
            let shutdown = async move {
                wait_for_stop(stop_after, &fatal2).await;
                stop2.store(true, Ordering::Relaxed);
            };
            sinks::websocket::serve(listener, app, hub, shutdown).await
        });
        served.context("HTTP server failed")?;
    } else {
        rt.block_on(wait_for_stop(stop_after, &fatal));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    front
        .join()
        .map_err(|_| anyhow::anyhow!("the ingest thread panicked"))??;
    // The dataflow has finished: every epoch is with the output stage, which queues it to
    // the sinks; wait until written.
    drop(output);
    stage
        .join()
        .map_err(|_| anyhow::anyhow!("the output thread panicked"))?;
    rt.block_on(async {
        for t in sink_tasks {
            let _ = t.await;
        }
        let _ = committer.await;
    });
    match fatal.take() {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => Ok(()),
    }
}

/// Prepares the config of one process of a cluster: process 0 alone reads history, the CDC
/// source, tailed files and the demo feed; every process reads its share of the Kafka
/// partitions (`assignment = [process_id, processes]` unless configured).
fn scale_out(cfg: &mut Config) -> Result<()> {
    let (process, processes) = (cfg.pipeline.process_id, cfg.pipeline.processes);
    if cfg.pipeline.checkpoint_dir.is_some() {
        return Err(crate::UsageError(format!(
            "pipeline.checkpoint_dir: operator-state checkpoints are not supported with {processes} processes yet; \
             set `checkpoint_dir = \"\"` (positions are still committed once every process has written an epoch)"
        ))
        .into());
    }
    if let Some(k) = cfg.sources.kafka.as_mut()
        && k.assignment.is_none()
    {
        k.assignment = Some((process, processes));
    }
    if process != 0 {
        let s = &mut cfg.sources;
        let skipped =
            !s.files.is_empty() || !s.dynamodb_export.is_empty() || s.demo.is_some() || s.postgres_cdc.is_some();
        s.files.clear();
        s.dynamodb_export.clear();
        s.demo = None;
        s.postgres_cdc = None;
        if skipped {
            eprintln!(
                "llamaflow: process {process}: files, DynamoDB exports, the demo feed and CDC are read by process 0"
            );
        }
    }
    Ok(())
}

/// Raises a fatal error when the thread holding it panics.
struct PanicIsFatal(Arc<Fatal>);

impl Drop for PanicIsFatal {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail(format!(
                "the {} thread panicked (see above)",
                std::thread::current().name().unwrap_or("unnamed")
            ));
        }
    }
}

/// A fatal error raised by a background task.
#[derive(Default)]
struct Fatal {
    error: Mutex<Option<String>>,
    notify: tokio::sync::Notify,
}

impl Fatal {
    fn fail(&self, e: String) {
        tracing::error!("{e}");
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
        self.notify.notify_one();
    }

    fn take(&self) -> Option<String> {
        self.error.lock().ok().and_then(|mut e| e.take())
    }
}

async fn wait_for_stop(limit: Option<Duration>, fatal: &Fatal) {
    let limit = async {
        match limit {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = crate::shutdown_signal() => eprintln!("llamaflow: stopping"),
        _ = limit => {}
        _ = fatal.notify.notified() => {}
    }
}

/// Live sources that take commits.
#[derive(Default)]
struct SourceHandles {
    kafka: Option<sources::kafka::KafkaSourceHandle>,
    cdc: Option<sources::postgres_cdc::CdcHandle>,
}

impl SourceHandles {
    /// Commits the positions of one fully written epoch to their sources. A failed commit
    /// only means re-delivery after a restart (sinks are idempotent); it is logged and counted.
    async fn commit(&self, acks: &Positions) {
        metrics::counter!("llamaflow_epochs_committed_total").increment(1);
        if let (Some(k), false) = (&self.kafka, acks.kafka.is_empty()) {
            let offsets: Vec<(String, i32, i64)> =
                acks.kafka.iter().map(|((t, p), o)| (t.clone(), *p, o + 1)).collect();
            if let Err(e) = k.commit(&offsets).await {
                metrics::counter!("llamaflow_commit_errors_total", "source" => "kafka").increment(1);
                tracing::warn!("kafka commit failed: {e}");
            }
        }
        if let (Some(c), Some(lsn)) = (&self.cdc, acks.lsn)
            && let Err(e) = c.confirm(lsn).await
        {
            metrics::counter!("llamaflow_commit_errors_total", "source" => "postgres_cdc").increment(1);
            tracing::warn!("cdc confirm failed: {e}");
        }
    }

    async fn stop(self) {
        if let Some(k) = self.kafka {
            let _ = k.stop().await;
        }
        if let Some(c) = self.cdc {
            c.stop().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_counts_epochs_every_sink_wrote() {
        let mut c = Coordinator::new(2);
        assert_eq!(c.ack(1), 0);
        assert_eq!(c.ack(1), 0, "epoch 0 not written yet");
        assert_eq!(c.ack(0), 0, "one sink of two");
        assert_eq!(c.ack(0), 2, "epochs 0 and 1 written by both");
        assert_eq!(c.ack(2), 2);
        assert_eq!(c.ack(2), 3);
    }
}
