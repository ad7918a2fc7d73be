//! The ingest front: the CDC snapshot, then history through [`crate::replay::feed`] (the same
//! feed as `replay`), then live items in epochs of at most `batch_ms`; it records the source
//! positions each epoch covers and prepares checkpoints.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use schemas::{DeadLetter, Kind, Record, SourcePos};
use sinks::websocket::Hub;
use sources::demo;
use sources::live::{Ack, Change, LiveItem};
use tokio::sync::mpsc;

use super::commit::Coordinator;
use super::reclock::{EpochInput, EpochLog, Formed, Pending};
use super::{Fatal, PanicIsFatal};
use crate::checkpoint::{Checkpointer, Positions};
use crate::config::{Config, DemoSection};
use crate::engine::{Engine, Output};
use crate::replay::Source;
use crate::stage::EpochGather;

/// The ingest thread's inputs and the engine it feeds.
pub(super) struct Ingest {
    /// History inputs (files, exports), merged by event time.
    pub history: Vec<Source>,
    /// Whether the job resumed from a checkpoint (its first epoch goes out at once).
    pub resumed: bool,
    /// Source positions covered by what was sent so far.
    pub positions: Positions,
    pub checkpointer: Arc<Checkpointer>,
    /// Checkpoint interval while records flow.
    pub interval: Duration,
    pub batch_ms: u64,
    pub batch_max: usize,
    /// How long after its last record a live TVL update closes.
    pub tvl_settle: Duration,
    /// One process of a cluster.
    pub multi: bool,
    pub process: usize,
    /// API-key changes go to the hub.
    pub hub: Option<Hub>,
    /// `users` / `user_devices` changes go to the alert channels' recipients.
    pub recipients: Option<sinks::notify::Directory>,
    /// In a cluster with checkpoints: the epochs every process checkpoints at.
    pub cluster_checkpoints: Option<ClusterCheckpoints>,
    pub output: Arc<EpochGather>,
    pub stop: Arc<AtomicBool>,
    pub rt: tokio::runtime::Handle,
    pub coordinator: Arc<Mutex<Coordinator>>,
    /// When the first live item of each epoch reached the front.
    pub arrivals: Arc<Mutex<BTreeMap<u64, Instant>>>,
    pub health: Arc<crate::health::Health>,
    pub live_rx: mpsc::Receiver<LiveItem>,
    /// Items of the CDC snapshot, applied before history.
    pub snapshot_len: usize,
    /// Fired once history is in: the live streams start then.
    pub history_done: tokio::sync::oneshot::Sender<()>,
    pub engine: Engine,
    /// The epoch log (with checkpoints, one process, no demo feed) and the epochs logged
    /// after the restored checkpoint, formed again before going live.
    pub reclock: Option<(EpochLog, Vec<EpochInput>)>,
}

/// Where a cluster's processes checkpoint: at the same epochs, chosen by a rule every process
/// applies alike (a message from process 0 could come after a peer had sent the epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterCheckpoints {
    /// Every this many epochs after the history's end (checkpoint interval ÷ batch_ms).
    pub every: u64,
    /// The restored checkpoint's id (0: none); the next ones count on from it.
    pub base: u64,
}

impl ClusterCheckpoints {
    /// The id of the checkpoint to take before sending `epoch`, when one is due there;
    /// `history` is the first epoch after the history.
    pub fn due(&self, epoch: u64, history: u64) -> Option<u64> {
        let since = epoch.checked_sub(history).filter(|n| *n > 0)?;
        (since % self.every == 0).then(|| self.base + since / self.every)
    }
}

/// How long re-forming a logged epoch waits for an item of its stream before it gives up
/// (the stream no longer delivers what was logged: the job goes on live).
const REFORM_PATIENCE: Duration = Duration::from_secs(10);

impl Ingest {
    /// Runs the front on its own thread until stop (or the end of every input); then finishes
    /// the dataflow. A failure or panic stops the job with its error.
    pub fn start(self, fatal: Arc<Fatal>) -> Result<std::thread::JoinHandle<Result<()>>> {
        std::thread::Builder::new()
            .name("ingest".into())
            .spawn(move || -> Result<()> {
                let _guard = PanicIsFatal(fatal.clone());
                let result = self.run();
                if let Err(e) = &result {
                    fatal.fail(format!("ingest: {e:#}"));
                }
                result
            })
            .context("cannot start the ingest thread")
    }

    fn run(self) -> Result<()> {
        let Ingest {
            history,
            resumed,
            mut positions,
            checkpointer,
            interval,
            batch_ms,
            batch_max,
            tvl_settle,
            multi,
            process,
            hub,
            recipients,
            cluster_checkpoints,
            output,
            stop,
            rt: rt_handle,
            coordinator,
            arrivals,
            health: health_front,
            live_rx,
            snapshot_len,
            history_done,
            mut engine,
            reclock,
        } = self;
        let (mut log, replay) = match reclock {
            Some((log, replay)) => (Some(log), replay),
            None => (None, Vec::new()),
        };
        let mut pending = Pending::default();
        // What the epoch being gathered holds, for the log.
        let mut current = EpochInput::default();
        let idle_epoch = Duration::from_millis(batch_ms.max(1));
        let mut batch = Vec::new();
        let mut live_rx = live_rx;
        // Whether anything was sent since the last checkpoint, and when that was.
        let mut dirty = false;
        let mut last_ckpt = Instant::now();
        let mut live = Front {
            hub: hub.clone(),
            recipients,
            output: output.clone(),
            handoff: None,
            settling: Settling::new(tvl_settle),
        };
        // Updates open in a restored checkpoint settle from now (their records after the
        // checkpoint are delivered again).
        let open: Vec<String> = engine.sequencer().open_updates().map(String::from).collect();
        for p in open {
            live.settling.seen(&p);
        }
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
        if !replay.is_empty() {
            let logged = replay.len();
            let mut reform = Reform {
                live: &mut live,
                engine: &mut engine,
                batch: &mut batch,
                positions: &mut positions,
                current: &mut current,
                pending: &mut pending,
                live_rx: &mut live_rx,
                rt: &rt_handle,
                stop: &stop,
                log: log.as_mut(),
            };
            let formed = reform.all(&replay)?;
            dirty = true;
            metrics::counter!("llamaflow_reclocked_epochs_total").increment(formed as u64);
            eprintln!("llamaflow: formed {formed} of {logged} logged epochs again (reclocking)");
        }
        health_front.set_started();
        // The first epoch after the history, the same in every process of a cluster.
        let history_epoch = engine.bus().history().map_or(u64::MAX, |(e, _)| e);
        let mut sent_positions = positions.clone();
        let mut first_arrival: Option<Instant> = None;
        let mut last_send = Instant::now();
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            live.settling.close_due(&mut engine, &mut batch, &mut current);
            let moved = positions != sent_positions;
            // Dead letters alone make an epoch too: they are written (durably) with it.
            let refused = output.holds(engine.epochs());
            dirty |= !batch.is_empty() || moved || refused;
            // A checkpoint every `interval` while records flow, and a final one on stop; a
            // cluster checkpoints at the epochs its rule names (idle or not, no final one).
            let cluster_id = cluster_checkpoints.and_then(|c| c.due(engine.epochs(), history_epoch));
            let checkpoint = match cluster_checkpoints {
                Some(_) => cluster_id.is_some(),
                None => dirty && (stopping || last_ckpt.elapsed() >= interval),
            };
            if !batch.is_empty() || moved || refused || checkpoint {
                // The epoch's input is on disk before the epoch goes in; a checkpoint starts
                // a new log segment, which holds the epochs after it.
                let mut mark = None;
                if let Some(log) = log.as_mut() {
                    log.append(&std::mem::take(&mut current))?;
                    if checkpoint {
                        mark = Some(log.rotate()?);
                    }
                }
                if checkpoint {
                    let epoch = engine.epochs();
                    let sequencer = engine.sequencer().image(epoch);
                    checkpointer.prepare(epoch, cluster_id, sequencer, positions.clone(), mark);
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
            let first = match pending.next(&mut live_rx) {
                Ok(i) => i,
                Err(mpsc::error::TryRecvError::Empty) => {
                    let wait = async { tokio::time::timeout(Duration::from_millis(1), live_rx.recv()).await };
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
                if log.is_some() {
                    current.item(&item);
                }
                live.apply(item, &mut engine, &mut batch, &mut positions);
                if batch.len() >= batch_max {
                    break;
                }
                while next.is_none() && Instant::now() < deadline {
                    match pending.next(&mut live_rx) {
                        Ok(i) => next = Some(i),
                        Err(mpsc::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_micros(200)),
                        Err(mpsc::error::TryRecvError::Disconnected) => break,
                    }
                }
            }
        }
        engine.finish()
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
        let Some(stream) = item.ack.stream() else {
            return false;
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
    output: &'a EpochGather,
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

    fn dead(&mut self, epoch: u64, dead: Vec<DeadLetter>) {
        self.output.dead(epoch, dead);
    }

    fn progress(&mut self, n: u64) -> Result<()> {
        if let Some(pb) = self.progress {
            let rate = n as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            pb.set_message(format!("{n} records · {rate:.0} records/s"));
        }
        Ok(())
    }
}

/// Applies live items at the ingest front.
struct Front {
    hub: Option<Hub>,
    recipients: Option<sinks::notify::Directory>,
    output: Arc<EpochGather>,
    handoff: Option<Handoff>,
    settling: Settling,
}

/// Live TVL updates waiting to close: a protocol's update (its records at one timestamp)
/// closes `settle` after its last record arrived, and its total is evaluated then (SPEC §2).
struct Settling {
    settle: Duration,
    /// When each protocol's last TVL record arrived.
    last: HashMap<String, Instant>,
    /// Arrivals in order; an entry superseded by a later arrival is skipped.
    queue: VecDeque<(Instant, String)>,
}

impl Settling {
    fn new(settle: Duration) -> Self {
        Settling {
            settle,
            last: HashMap::new(),
            queue: VecDeque::new(),
        }
    }

    fn seen(&mut self, protocol: &str) {
        let now = Instant::now();
        self.last.insert(protocol.to_string(), now);
        self.queue.push_back((now, protocol.to_string()));
    }

    /// Closes the updates that have settled, into `batch` (and notes them in `input`).
    fn close_due(&mut self, engine: &mut Engine, batch: &mut Vec<operators::Envelope>, input: &mut EpochInput) {
        let now = Instant::now();
        while self
            .queue
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= self.settle)
        {
            let Some((t, protocol)) = self.queue.pop_front() else {
                break;
            };
            if self.last.get(&protocol) == Some(&t) {
                self.last.remove(&protocol);
                let pos = SourcePos::new("tvl settle".into(), 0);
                engine.sequencer().close_update(pos, &protocol, batch);
                input.close(&protocol);
            }
        }
    }
}

impl Front {
    /// Stamps a record (or rule deletion) into `batch`, applies API-key changes to the hub and
    /// user and device changes to the recipients, dead-letters invalid input, and remembers the item's commit position.
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
                if let Record::Tvl(u) = &rec {
                    self.settling.seen(&u.protocol_id);
                }
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
            Change::User(contact) => self.recipients.iter().for_each(|r| r.set_user(contact.clone())),
            Change::DeleteUser(id) => self.recipients.iter().for_each(|r| r.remove_user(&id)),
            Change::Device(device) => self.recipients.iter().for_each(|r| r.set_device(device.clone())),
            Change::DeleteDevice(id) => self.recipients.iter().for_each(|r| r.remove_device(&id)),
            Change::Dead(d) => self.output.dead(engine.epochs(), vec![d]),
        }
    }
}

/// Forms logged epochs again from the live streams (see [`super::reclock`]).
struct Reform<'a> {
    live: &'a mut Front,
    engine: &'a mut Engine,
    batch: &'a mut Vec<operators::Envelope>,
    positions: &'a mut Positions,
    current: &'a mut EpochInput,
    pending: &'a mut Pending,
    live_rx: &'a mut mpsc::Receiver<LiveItem>,
    rt: &'a tokio::runtime::Handle,
    stop: &'a AtomicBool,
    log: Option<&'a mut EpochLog>,
}

impl Reform<'_> {
    /// Forms the logged epochs again, in order, and sends each (logged again in this run's
    /// log); stops early, with a warning, where the streams no longer match the log. Returns
    /// how many were formed.
    fn all(&mut self, replay: &[EpochInput]) -> Result<usize> {
        for (formed, input) in replay.iter().enumerate() {
            if let Err(why) = self.epoch(input) {
                tracing::warn!(
                    "the epoch log could not be followed after {formed} of {} epochs ({why}); going on live",
                    replay.len()
                );
                return Ok(formed);
            }
            if let Some(log) = self.log.as_mut() {
                log.append(self.current)?;
            }
            *self.current = EpochInput::default();
            self.engine.send(std::mem::take(self.batch))?;
        }
        Ok(replay.len())
    }

    /// Applies one logged epoch's input into the batch; `Err` (why) when the streams no
    /// longer deliver what was logged (what was applied stays in the batch).
    fn epoch(&mut self, input: &EpochInput) -> Result<(), String> {
        let (rx, rt, stop) = (&mut *self.live_rx, self.rt, self.stop);
        let recv = || {
            if stop.load(Ordering::Relaxed) {
                return Err("stopping".to_string());
            }
            match rt.block_on(async { tokio::time::timeout(Duration::from_millis(100), rx.recv()).await }) {
                Ok(Some(item)) => Ok(Some(item)),
                Ok(None) => Err("the live sources ended".to_string()),
                Err(_) => Ok(None),
            }
        };
        let (live, engine, batch, positions, current) = (
            &mut *self.live,
            &mut *self.engine,
            &mut *self.batch,
            &mut *self.positions,
            &mut *self.current,
        );
        self.pending.form(input, REFORM_PATIENCE, recv, |step| match step {
            Formed::Item(item) => {
                current.item(&item);
                live.apply(item, engine, batch, positions);
            }
            Formed::Close(protocol) => {
                let pos = SourcePos::new("tvl settle".into(), 0);
                engine.sequencer().close_update(pos, &protocol, batch);
                current.close(&protocol);
            }
        })
    }
}

/// History inputs of the config (files, exports), merged by event time.
pub(super) async fn history(cfg: &Config) -> Result<Vec<Source>> {
    let mut out: Vec<Source> = Vec::new();
    for f in cfg.sources.files.iter().filter(|f| !f.follow) {
        let kind = Kind::parse(&f.kind).unwrap_or(Kind::Price);
        out.push(Source::File(
            sources::files::open(&f.path, kind, cfg.sources.max_line_bytes)
                .map_err(|e| crate::UsageError(e.to_string()))?,
        ));
    }
    for d in &cfg.sources.dynamodb_export {
        out.push(crate::replay::open_export(d, &cfg.sources.s3, cfg.sources.max_line_bytes).await?);
    }
    Ok(out)
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The bundled feed as a live source, paced at `speed`.
pub(super) async fn demo_source(d: DemoSection, tx: mpsc::Sender<LiveItem>, stop: Arc<AtomicBool>) {
    let item = |pos: SourcePos, record: Record| LiveItem {
        pos,
        ack: Ack::None,
        change: Change::Record(record),
    };
    if d.rules {
        let origin = schemas::SourceName::from("demo-setup:");
        for (i, p) in demo::demo_protocols().into_iter().enumerate() {
            if tx
                .send(item(SourcePos::new(origin, i as u64), Record::Protocol(Box::new(p))))
                .await
                .is_err()
            {
                return;
            }
        }
        for (i, r) in demo::demo_rules().into_iter().enumerate() {
            if tx
                .send(item(SourcePos::new(origin, 1000 + i as u64), Record::Rule(Box::new(r))))
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

#[cfg(test)]
mod tests {
    use super::ClusterCheckpoints;

    #[test]
    fn every_process_names_the_same_checkpoint_epochs() {
        let c = ClusterCheckpoints { every: 3, base: 10 };
        let due: Vec<(u64, u64)> = (0..12).filter_map(|e| c.due(e, 2).map(|id| (e, id))).collect();
        assert_eq!(
            due,
            [(5, 11), (8, 12), (11, 13)],
            "after the history (epoch 2), every 3rd"
        );
        assert_eq!(c.due(7, u64::MAX), None, "no history end known: none");
    }
}
