//! Runs the timely dataflow on its own threads and feeds it from the ingest side.
//!
//! The ingest side (a replay reader or live sources) stamps records with a [`Sequencer`] and
//! hands the engine one batch per epoch; the engine spreads each batch over the workers'
//! bounded channels. Workers drain their channel, advance their input to the next epoch and
//! step the dataflow, keeping at most [`MAX_EPOCHS_IN_FLIGHT`] epochs unfinished, so a slow
//! dataflow slows the ingest side instead of growing memory.
//!
//! **Scale-out.** With a [`Cluster`] of several processes (timely's cluster mode, TCP between
//! the processes) every process runs its own ingest front and `threads` workers; the dataflow
//! spans all `threads × processes` workers, so keys, rules and their state are spread over
//! all of them. Epochs are the same timely timestamps in every process: epoch `e` is complete
//! once every process has sent its `e`-th batch. The processes talk through a small control
//! stream (see [`ClusterBus`]): where the history of process 0 ends, and how far each
//! process's sinks have written.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::checkpoint::Newest;
use operators::checkpoint::Restored;
use operators::{ByWorker, Checkpointing, Envelope, Envelopes, OpConfig, Sequencer, Snapshots, StateOut, WorkerState};
use schemas::{Alert, DeadLetter, Event};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Input, Inspect, Probe};
use timely::dataflow::{InputHandle, ProbeHandle, StreamVec};

/// Epochs a worker may have sent but not yet completed.
pub const MAX_EPOCHS_IN_FLIGHT: u64 = 8;

/// Where the dataflow's results go, handed over by value. Called from worker threads: an
/// output only takes the data (see [`crate::stage::EpochGather`]).
pub trait Output: Send + Sync + 'static {
    /// Alerts of an epoch, in order (worker 0 only — in a cluster, the first worker of
    /// process 0; an epoch may come in several calls).
    fn alerts(&self, epoch: u64, alerts: Vec<Alert>);
    /// Market events of an epoch from one worker.
    fn events(&self, epoch: u64, events: Vec<Event>);
    /// Dead letters from inside the dataflow.
    fn dead(&self, epoch: u64, dead: Vec<DeadLetter>);
    /// Live-state changes other than events (worker 0 only; see [`operators::Outputs::state`]).
    fn state(&self, _epoch: u64, _state: Vec<StateOut>) {}
    /// Every output of all epochs `< upto` has been delivered to this process's [`Output`]
    /// (called by the process's first worker, in increasing order).
    fn epochs_done(&self, _upto: u64) {}
}

/// Where an engine runs: one process alone, or one process of a timely cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// Number of processes (1: no cluster).
    pub processes: usize,
    /// This process's index, `0..processes`.
    pub process: usize,
    /// `host:port` of every process, in process order (timely's TCP mesh); empty for one
    /// process.
    pub hosts: Vec<String>,
    /// How long epochs this process sent may stay incomplete before it gives up on its
    /// peers (`None`: wait forever).
    pub peer_timeout: Option<Duration>,
}

impl Cluster {
    /// One process, no networking.
    pub fn single() -> Self {
        Cluster {
            processes: 1,
            process: 0,
            hosts: Vec::new(),
            peer_timeout: None,
        }
    }

    /// Whether several processes take part.
    pub fn is_multi(&self) -> bool {
        self.processes > 1
    }

    /// Checks the process index and the host list.
    pub fn validate(&self) -> Result<(), String> {
        if self.processes == 0 {
            return Err("processes must be at least 1".into());
        }
        if self.process >= self.processes {
            return Err(format!(
                "process id {} is out of range for {} processes (0..{})",
                self.process, self.processes, self.processes
            ));
        }
        if self.is_multi() && self.hosts.len() != self.processes {
            return Err(format!(
                "{} processes need {} host:port addresses, {} given",
                self.processes,
                self.processes,
                self.hosts.len()
            ));
        }
        Ok(())
    }
}

/// A message between the processes of a cluster, broadcast to every worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Control {
    /// Process 0 has sent its history (and CDC snapshot) in the epochs before `epoch`; the
    /// other processes start their live sources from that epoch on. `ends` is the newest
    /// event time (ms) of each record kind in the history (the hand-over point of live
    /// streams), by kind name.
    HistoryDone {
        /// First epoch after the history.
        epoch: u64,
        /// (kind name, newest event time in ms).
        ends: Vec<(String, i64)>,
    },
    /// Every sink of `process` has durably written every epoch below `upto`.
    Durable {
        /// The process.
        process: usize,
        /// Epochs below this are durable there.
        upto: u64,
    },
    /// `process` has made its part of cluster checkpoint `id` durable.
    PartWritten {
        /// The process.
        process: usize,
        /// The checkpoint.
        id: u64,
    },
    /// Process 0 has written the manifest of cluster checkpoint `id`: it counts, and every
    /// process may commit its positions.
    Manifest {
        /// The checkpoint.
        id: u64,
    },
    /// `process` started from cluster checkpoint `id` (0: none); every process must have.
    Restored {
        /// The process.
        process: usize,
        /// The checkpoint.
        id: u64,
    },
}

#[derive(Default)]
struct BusState {
    outbox: Vec<Control>,
    history: Option<(u64, Vec<(String, i64)>)>,
    durable: Vec<u64>,
    local_durable: u64,
    /// The processes whose part of each cluster checkpoint is durable.
    parts: BTreeMap<u64, BTreeSet<usize>>,
    /// The newest cluster checkpoint with a manifest.
    manifest: u64,
    /// The checkpoint each process started from, once it said.
    restored: BTreeMap<usize, u64>,
}

/// The processes' shared knowledge, exchanged through the dataflow's control stream: the
/// front and the committer of a process post messages here, the process's first worker sends
/// them into the stream, and every worker records what arrives.
pub struct ClusterBus {
    processes: usize,
    process: usize,
    state: Mutex<BusState>,
    /// The largest epoch + 1 any output of this process has carried.
    seen: AtomicU64,
    /// How long epochs may stay incomplete before the process gives up on its peers, with
    /// the cluster for the message (`None`: one process, or no timeout).
    stall: Option<(Duration, Cluster)>,
}

impl ClusterBus {
    /// The bus of one process of `cluster`.
    pub fn new(cluster: &Cluster) -> Arc<Self> {
        Arc::new(ClusterBus {
            processes: cluster.processes.max(1),
            process: cluster.process,
            state: Mutex::new(BusState {
                durable: vec![0; cluster.processes.max(1)],
                ..Default::default()
            }),
            seen: AtomicU64::new(0),
            stall: cluster
                .peer_timeout
                .filter(|_| cluster.is_multi())
                .map(|t| (t, cluster.clone())),
        })
    }

    /// This process.
    pub fn process(&self) -> usize {
        self.process
    }

    /// How many processes form the cluster.
    pub fn processes(&self) -> usize {
        self.processes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BusState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Process 0: its history ends before `epoch` (see [`Control::HistoryDone`]).
    pub fn announce_history(&self, epoch: u64, ends: Vec<(String, i64)>) {
        let mut s = self.lock();
        s.history = Some((epoch, ends.clone()));
        if self.processes > 1 {
            s.outbox.push(Control::HistoryDone { epoch, ends });
        }
    }

    /// Where process 0's history ends, once known.
    pub fn history(&self) -> Option<(u64, Vec<(String, i64)>)> {
        self.lock().history.clone()
    }

    /// This process's sinks have written every epoch below `upto`; returns the epochs
    /// durable in every process (see [`ClusterBus::durable`]).
    pub fn set_durable(&self, upto: u64) -> u64 {
        let mut s = self.lock();
        if upto > s.local_durable {
            s.local_durable = upto;
            if self.processes > 1 {
                s.outbox.push(Control::Durable {
                    process: self.process,
                    upto,
                });
            }
        }
        drop(s);
        self.durable()
    }

    /// Every epoch below this is durably written by every sink of every process: what a
    /// process may commit (its own sinks alone are not enough, since its records cause
    /// outputs in other processes).
    pub fn durable(&self) -> u64 {
        let s = self.lock();
        s.durable
            .iter()
            .enumerate()
            .map(|(p, d)| if p == self.process { s.local_durable } else { *d })
            .min()
            .unwrap_or(s.local_durable)
    }

    /// This process's part of cluster checkpoint `id` is durable.
    pub fn part_written(&self, id: u64) {
        let mut s = self.lock();
        s.parts.entry(id).or_default().insert(self.process);
        if self.processes > 1 {
            s.outbox.push(Control::PartWritten {
                process: self.process,
                id,
            });
        }
    }

    /// Whether every process's part of cluster checkpoint `id` is durable.
    pub fn parts_complete(&self, id: u64) -> bool {
        self.lock().parts.get(&id).is_some_and(|p| p.len() >= self.processes)
    }

    /// Process 0: the manifest of cluster checkpoint `id` is written.
    pub fn announce_manifest(&self, id: u64) {
        let mut s = self.lock();
        s.manifest = s.manifest.max(id);
        s.parts.retain(|k, _| *k > id);
        if self.processes > 1 {
            s.outbox.push(Control::Manifest { id });
        }
    }

    /// The newest cluster checkpoint with a manifest (0: none yet in this run).
    pub fn manifest(&self) -> u64 {
        self.lock().manifest
    }

    /// This process started from cluster checkpoint `id` (0: none); see
    /// [`ClusterBus::restored_mismatch`].
    pub fn announce_restored(&self, id: u64) {
        let mut s = self.lock();
        s.restored.insert(self.process, id);
        if self.processes > 1 {
            s.outbox.push(Control::Restored {
                process: self.process,
                id,
            });
        }
    }

    /// A process that started from another checkpoint than this one, with that checkpoint:
    /// the cluster's state would not be one cut (a peer restarted while another still wrote
    /// a manifest), so the processes must all restart.
    pub fn restored_mismatch(&self) -> Option<(usize, u64, u64)> {
        let s = self.lock();
        let own = *s.restored.get(&self.process)?;
        s.restored
            .iter()
            .find(|(_, id)| **id != own)
            .map(|(p, id)| (*p, *id, own))
    }

    fn take_outbox(&self) -> Vec<Control> {
        std::mem::take(&mut self.lock().outbox)
    }

    fn receive(&self, msg: &Control) {
        let mut s = self.lock();
        match msg {
            Control::HistoryDone { epoch, ends } => {
                s.history.get_or_insert_with(|| (*epoch, ends.clone()));
            }
            Control::Durable { process, upto } => {
                if let Some(d) = s.durable.get_mut(*process) {
                    *d = (*d).max(*upto);
                }
            }
            Control::PartWritten { process, id } => {
                if *id > s.manifest {
                    s.parts.entry(*id).or_default().insert(*process);
                }
            }
            Control::Restored { process, id } => {
                s.restored.insert(*process, *id);
            }
            Control::Manifest { id } => {
                s.manifest = s.manifest.max(*id);
                let m = s.manifest;
                s.parts.retain(|k, _| *k > m);
            }
        }
    }

    fn saw(&self, epoch: u64) {
        self.seen.fetch_max(epoch.saturating_add(1), Ordering::Relaxed);
    }
}

/// How an engine takes part in checkpoints.
#[derive(Default)]
pub struct EngineCheckpoint {
    /// Where snapshots are requested and collected.
    pub snapshots: Option<Snapshots>,
    /// Operator state to start from, one per worker.
    pub restore: Option<Vec<WorkerState>>,
    /// The ingest front's sequencer to continue with.
    pub sequencer: Option<Sequencer>,
}

/// A running dataflow.
pub struct Engine {
    inputs: Vec<SyncSender<Vec<Envelope>>>,
    guards: timely::communication::WorkerGuards<()>,
    sequencer: Sequencer,
    /// `llamaflow_state_entries{operator="sequencer"}`, one per [`Sequencer::sizes`] kind.
    gauges: Vec<metrics::Gauge>,
    epochs: u64,
    cluster: Cluster,
    bus: Arc<ClusterBus>,
}

impl Engine {
    /// Starts `workers` timely worker threads running the operators with `cfg`, from empty
    /// state or from `ckpt.restore`, taking the snapshots `ckpt.snapshots` is asked for.
    pub fn start(workers: usize, cfg: OpConfig, output: Arc<dyn Output>, ckpt: EngineCheckpoint) -> Result<Engine> {
        let cluster = Cluster::single();
        let bus = ClusterBus::new(&cluster);
        Self::start_cluster(workers, &cluster, bus, cfg, output, ckpt)
    }

    /// Like [`Engine::start`], as process `cluster.process` of a cluster: `workers` threads
    /// here, `workers × cluster.processes` in the dataflow. Blocks until every process of the
    /// cluster is connected. `ckpt.restore` holds this process's workers' state.
    pub fn start_cluster(
        workers: usize,
        cluster: &Cluster,
        bus: Arc<ClusterBus>,
        cfg: OpConfig,
        output: Arc<dyn Output>,
        ckpt: EngineCheckpoint,
    ) -> Result<Engine> {
        let (connected, _) = Engine::connect(workers, cluster, bus, None)?;
        connected.start(cfg, output, ckpt)
    }

    /// Starts `workers` timely worker threads as process `cluster.process` of `cluster`
    /// (blocks until every process is connected) and agrees with the other processes on the
    /// checkpoint to restore: each offers the newest it can see, and all take the newest
    /// offered (returned). The workers then wait for [`Connected::start`].
    pub fn connect(
        workers: usize,
        cluster: &Cluster,
        bus: Arc<ClusterBus>,
        offer: Option<Newest>,
    ) -> Result<(Connected, Option<Newest>)> {
        cluster.validate().map_err(|e| anyhow::anyhow!(e))?;
        let workers = workers.max(1);
        let first_worker = cluster.process * workers;
        let mut starts = Vec::with_capacity(workers);
        let mut receivers = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = sync_channel::<WorkerStart>(1);
            starts.push(tx);
            receivers.push(Mutex::new(Some(rx)));
        }
        let receivers = Arc::new(receivers);
        let (agreed_tx, agreed_rx) = sync_channel::<Option<Newest>>(1);
        let multi = cluster.is_multi();
        let config = if multi {
            exit_when_a_peer_is_lost(cluster);
            timely::Config {
                communication: timely::CommunicationConfig::Cluster {
                    threads: workers,
                    process: cluster.process,
                    addresses: cluster.hosts.clone(),
                    report: false,
                    zerocopy: false,
                },
                worker: timely::WorkerConfig::default(),
            }
        } else {
            timely::Config::process(workers)
        };
        let worker_bus = bus.clone();
        let guards = timely::execute(config, move |worker| {
            let local = worker.index().wrapping_sub(first_worker);
            let agreed = match multi {
                true => agree(worker, local == 0, offer),
                false => offer,
            };
            if local == 0 {
                let _ = agreed_tx.send(agreed);
            }
            let start = receivers
                .get(local)
                .and_then(|r| r.lock().ok().and_then(|mut r| r.take()))
                .and_then(|r| r.recv().ok());
            // No start: the process stopped before its dataflow was built.
            let Some(start) = start else { return };
            run_worker(worker, local == 0, multi, start, worker_bus.clone());
        })
        .map_err(|e| anyhow::anyhow!("cannot start timely workers: {e}"))?;
        let agreed = agreed_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the dataflow workers stopped while connecting"))?;
        Ok((
            Connected {
                workers,
                cluster: cluster.clone(),
                bus,
                guards,
                starts,
            },
            agreed,
        ))
    }
}

/// Every process offers the newest checkpoint it can see; returns the newest offered. Runs
/// as a small dataflow of its own before the job's dataflow is built (the processes connect
/// once and then agree over timely's own connections).
fn agree(worker: &mut timely::worker::Worker, first_local: bool, offer: Option<Newest>) -> Option<Newest> {
    let mut input = InputHandle::<u64, CapacityContainerBuilder<Vec<Option<Newest>>>>::new();
    let offers = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let probe = ProbeHandle::new();
    let seen = offers.clone();
    worker.dataflow::<u64, _, _>(|scope| {
        scope
            .input_from(&mut input)
            .broadcast()
            .inspect(move |o| seen.borrow_mut().push(*o))
            .probe_with(&probe);
    });
    if first_local {
        input.send(offer);
    }
    drop(input);
    while !probe.done() {
        worker.step_or_park(Some(Duration::from_millis(1)));
    }
    offers.take().into_iter().flatten().max_by_key(|n| n.id)
}

/// What a connected worker needs to build and run the job's dataflow.
struct WorkerStart {
    rx: Receiver<Vec<Envelope>>,
    cfg: OpConfig,
    output: Arc<dyn Output>,
    ckpt: Checkpointing,
}

/// A process's timely workers, connected to the cluster, before the job's dataflow is built.
pub struct Connected {
    workers: usize,
    cluster: Cluster,
    bus: Arc<ClusterBus>,
    /// Dropped before `guards` (which join the workers): a process that stops before
    /// starting its dataflow lets its waiting workers end.
    starts: Vec<SyncSender<WorkerStart>>,
    guards: timely::communication::WorkerGuards<()>,
}

impl Connected {
    /// Builds the job's dataflow in every worker, running the operators with `cfg`, from
    /// empty state or from `ckpt.restore` (this process's workers' state), taking the
    /// snapshots `ckpt.snapshots` is asked for.
    pub fn start(self, cfg: OpConfig, output: Arc<dyn Output>, ckpt: EngineCheckpoint) -> Result<Engine> {
        let Connected {
            workers,
            cluster,
            bus,
            guards,
            starts,
        } = self;
        let total = workers * cluster.processes;
        if let Some(seq) = &ckpt.sequencer
            && seq.workers() != total
        {
            anyhow::bail!(
                "the checkpoint was taken with {} workers in all but {total} are configured ({workers} × {} \
                 processes): run with the same workers and processes (or delete the checkpoint directory to \
                 start over)",
                seq.workers(),
                cluster.processes
            );
        }
        let mut restored: Vec<Option<Restored>> = match &ckpt.restore {
            None => (0..workers).map(|_| None).collect(),
            Some(states) if states.len() != workers => anyhow::bail!(
                "the checkpoint holds the state of {} workers but {workers} are configured: run with \
                 `--workers {}` (or delete the checkpoint directory to start over)",
                states.len(),
                states.len()
            ),
            Some(states) => states
                .iter()
                .map(|s| s.decode(cfg.clone()).map(Some))
                .collect::<Result<_, _>>()
                .context("cannot decode the checkpoint's operator state")?,
        };
        let mut inputs = Vec::with_capacity(workers);
        for (start, restore) in starts.iter().zip(restored.drain(..)) {
            let (tx, rx) = sync_channel::<Vec<Envelope>>(MAX_EPOCHS_IN_FLIGHT as usize);
            inputs.push(tx);
            let ckpt = Checkpointing {
                snapshots: ckpt.snapshots.clone(),
                restore,
            };
            start
                .send(WorkerStart {
                    rx,
                    cfg: cfg.clone(),
                    output: output.clone(),
                    ckpt,
                })
                .map_err(|_| anyhow::anyhow!("a dataflow worker stopped unexpectedly"))?;
        }
        let sequencer = ckpt.sequencer.unwrap_or_else(|| Sequencer::new(total, 0));
        let gauges = sequencer
            .sizes()
            .iter()
            .map(|(kind, _)| metrics::gauge!("llamaflow_state_entries", "operator" => "sequencer", "kind" => *kind))
            .collect();
        Ok(Engine {
            inputs,
            guards,
            gauges,
            sequencer,
            epochs: 0,
            cluster,
            bus,
        })
    }
}

impl Engine {
    /// The cluster this engine is part of.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// What the processes of the cluster tell each other.
    pub fn bus(&self) -> &Arc<ClusterBus> {
        &self.bus
    }

    /// The stamping front: push records and rule deletions here, then [`Engine::send`].
    pub fn sequencer(&mut self) -> &mut Sequencer {
        &mut self.sequencer
    }

    /// Epochs sent so far.
    pub fn epochs(&self) -> u64 {
        self.epochs
    }

    /// Sends one epoch. In one process each envelope goes straight to the worker that owns
    /// its key, and the dataflow has no exchange in front of its keyed stage
    /// ([`operators::Arrival::AtItsWorker`]); in a cluster, where a key's worker may be in
    /// another process, the envelopes are split evenly and the dataflow's exchange moves them.
    /// Blocks while the dataflow is [`MAX_EPOCHS_IN_FLIGHT`] epochs behind.
    ///
    /// In a cluster, sequence numbers are made unique across processes: the sequencer's
    /// number `s` becomes `s × processes + process` (order within a process is kept, and a
    /// key's records all come from one process); so do key numbers ([`operators::KeyId`]).
    pub fn send(&mut self, mut envelopes: Vec<Envelope>) -> Result<()> {
        let n = self.inputs.len();
        let parts: Vec<Vec<Envelope>> = if self.cluster.is_multi() {
            let (procs, p) = (self.cluster.processes as u64, self.cluster.process as u64);
            for e in &mut envelopes {
                e.seq = e.seq.wrapping_mul(procs).wrapping_add(p);
                e.key = e.key.scoped(procs as u32, p as u32);
            }
            let chunk = envelopes.len().div_ceil(n).max(1);
            let mut parts = Vec::with_capacity(n);
            for _ in 1..n {
                let rest = envelopes.split_off(chunk.min(envelopes.len()));
                parts.push(std::mem::replace(&mut envelopes, rest));
            }
            parts.push(envelopes);
            parts
        } else if n == 1 {
            vec![envelopes]
        } else {
            let mut parts = ByWorker::new(n, envelopes.len());
            for e in envelopes {
                parts.put(e);
            }
            parts.into_parts()
        };
        self.send_parts(parts)
    }

    /// Empty batches for the next epoch, one per worker of this process (one in a cluster,
    /// whose processes split their envelopes evenly), for [`Engine::send_batch`].
    pub fn batch(&self, capacity: usize) -> ByWorker {
        ByWorker::new(if self.cluster.is_multi() { 1 } else { self.inputs.len() }, capacity)
    }

    /// [`Engine::send`] of envelopes split by worker as they were stamped (from
    /// [`Engine::batch`]): handed to the workers without another copy.
    pub fn send_batch(&mut self, batch: ByWorker) -> Result<()> {
        let mut parts = batch.into_parts();
        if self.cluster.is_multi() || parts.len() != self.inputs.len() {
            // A cluster's batch (one part), or one made for another engine: split as `send`
            // splits.
            let all = match parts.len() {
                1 => parts.pop().unwrap_or_default(),
                _ => parts.into_iter().flatten().collect(),
            };
            return self.send(all);
        }
        self.send_parts(parts)
    }

    /// Hands each worker its part of the next epoch.
    fn send_parts(&mut self, parts: Vec<Vec<Envelope>>) -> Result<()> {
        for (tx, part) in self.inputs.iter().zip(parts) {
            tx.send(part).context("a dataflow worker stopped unexpectedly")?;
        }
        // An idle worker is parked (for up to 1 ms): wake it now rather than when it times out.
        for g in self.guards.guards() {
            g.thread().unpark();
        }
        self.epochs += 1;
        for ((_, n), g) in self.sequencer.sizes().iter().zip(&self.gauges) {
            g.set(*n as f64);
        }
        Ok(())
    }

    /// Closes the inputs and waits until every epoch is processed and output (in a cluster:
    /// until every process has closed its inputs).
    pub fn finish(self) -> Result<()> {
        drop(self.inputs);
        for r in self.guards.join() {
            r.map_err(|e| anyhow::anyhow!("dataflow worker failed: {e}"))?;
        }
        Ok(())
    }
}

/// The message when the connection to `peer` breaks.
fn lost_peer_message(cluster: &Cluster, peer: Option<usize>) -> String {
    let who = match peer {
        Some(p) => format!(
            "process {p} ({})",
            cluster.hosts.get(p).map_or("unknown host", String::as_str)
        ),
        None => "a peer process".into(),
    };
    format!(
        "llamaflow: process {} lost the connection to {who}: it stopped or the network failed. \
         Stopping at once: nothing more is committed (the sources keep the positions of the last \
         epoch every process wrote). Restart every process of the cluster.",
        cluster.process
    )
}

/// The message when the cluster completed no epoch for `timeout` although this process sent
/// epochs up to `sent` (only those below `upto` are complete).
fn stalled_message(cluster: &Cluster, timeout: Duration, upto: u64, sent: u64, bus: &ClusterBus) -> String {
    let reports = {
        let s = bus.lock();
        (0..cluster.processes)
            .filter(|p| *p != cluster.process)
            .map(|p| format!("process {p}: {}", s.durable.get(p).copied().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "llamaflow: process {} has waited {timeout:?} for the cluster to complete epoch {upto} (it sent \
         up to {sent}): a peer process is frozen or cut off by the network (epochs the peers reported \
         written: {reports}). Stopping at once: nothing more is committed. Restart every process of the \
         cluster ([pipeline] peer_timeout_ms sets the wait).",
        cluster.process
    )
}

/// The remote process a timely networking thread serves (`timely:send-1`, `timely:recv-1`).
fn peer_of_thread(name: &str) -> Option<usize> {
    let rest = name
        .strip_prefix("timely:send-")
        .or_else(|| name.strip_prefix("timely:recv-"))?;
    rest.parse().ok()
}

/// In a cluster, a peer that dies closes its sockets, and timely's networking threads panic
/// ("timely communication error"), which would poison every worker and abort the process
/// with a pile of backtraces. This hook turns the first such panic into one clear message and
/// exit status 1 (a supervisor restarts the cluster), before anything else is committed.
fn exit_when_a_peer_is_lost(cluster: &Cluster) {
    let cluster = cluster.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or_default();
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        let peer = peer_of_thread(name);
        if peer.is_some() || text.contains("timely communication error") || text.contains("MergeQueue poisoned") {
            eprintln!("{}", lost_peer_message(&cluster, peer));
            eprintln!("llamaflow: ({name}: {text})");
            metrics::counter!("llamaflow_cluster_peer_lost_total").increment(1);
            std::process::exit(1);
        }
        previous(info);
    }));
}

/// Hands every batch of `stream` to `output` by value, with its epoch (`give` says which of
/// its methods takes it; no copy), and notes the epoch on the cluster bus. `probe` passes an
/// epoch once all of the epoch's data has been handed over.
fn deliver<'scope, D: 'static>(
    stream: StreamVec<'scope, u64, D>,
    name: &str,
    (output, bus, probe): (&Arc<dyn Output>, &Arc<ClusterBus>, &ProbeHandle<u64>),
    give: fn(&dyn Output, u64, Vec<D>),
) {
    let (output, bus) = (output.clone(), bus.clone());
    stream
        .unary::<CapacityContainerBuilder<Vec<()>>, _, _, _>(Pipeline, name, |_cap, _info| {
            move |input, _output| {
                input.for_each_stamp(|stamp, data| {
                    let epoch = stamp.least().copied().unwrap_or_default();
                    bus.saw(epoch);
                    for batch in data {
                        give(&*output, epoch, std::mem::take(batch));
                    }
                });
            }
        })
        .probe_with(probe);
}

fn run_worker(
    worker: &mut timely::worker::Worker,
    first_local: bool,
    multi: bool,
    start: WorkerStart,
    bus: Arc<ClusterBus>,
) {
    let WorkerStart { rx, cfg, output, ckpt } = start;
    let mut input = InputHandle::<u64, CapacityContainerBuilder<Vec<Envelope>>>::new();
    let mut control = InputHandle::<u64, CapacityContainerBuilder<Vec<Control>>>::new();
    let control_bus = bus.clone();
    let probe = ProbeHandle::new();
    worker.dataflow::<u64, _, _>(|scope| {
        // One process's engine sends each envelope to its worker (`Engine::send`); a
        // cluster's processes split theirs evenly, and the dataflow exchanges them.
        let arrival = match multi {
            true => operators::Arrival::Anywhere,
            false => operators::Arrival::AtItsWorker,
        };
        let outs = operators::build(scope.input_from(&mut input), arrival, cfg, ckpt);
        let to = (&output, &bus, &probe);
        deliver(outs.events, "DeliverEvents", to, |o, epoch, d| o.events(epoch, d));
        deliver(outs.dead, "DeliverDead", to, |o, epoch, d| o.dead(epoch, d));
        deliver(outs.alerts, "DeliverAlerts", to, |o, epoch, d| o.alerts(epoch, d));
        deliver(outs.state, "DeliverState", to, |o, epoch, d| o.state(epoch, d));
        // The control stream: not probed, so it never holds outputs back.
        scope
            .input_from(&mut control)
            .broadcast()
            .inspect(move |m| control_bus.receive(m));
    });
    // The first worker of each process reports completed epochs and sends the process's
    // control messages: the probe covers every output stream of every worker.
    let mut done = 0u64;
    let mut progressed = std::time::Instant::now();
    let mut report = |probe: &ProbeHandle<u64>, sent: u64| {
        if !first_local {
            return;
        }
        // An empty frontier (every input closed, all done) means every epoch is complete: the
        // ones this process sent and any later one another process sent and this one output.
        let upto = probe.with_frontier(|f| {
            f.first()
                .copied()
                .unwrap_or_else(|| sent.max(bus.seen.load(Ordering::Relaxed)))
        });
        if upto > done {
            done = upto;
            progressed = std::time::Instant::now();
            output.epochs_done(upto);
        } else if upto >= sent {
            // Nothing in flight: nothing to wait for.
            progressed = std::time::Instant::now();
        } else if let Some((timeout, cluster)) = &bus.stall
            && progressed.elapsed() > *timeout
        {
            // A peer that dies closes its sockets (see `exit_when_a_peer_is_lost`); one that
            // is frozen or cut off by the network leaves every epoch incomplete.
            eprintln!("{}", stalled_message(cluster, *timeout, upto, sent, &bus));
            metrics::counter!("llamaflow_cluster_peer_lost_total").increment(1);
            std::process::exit(1);
        }
    };
    let forward = |control: &mut InputHandle<u64, CapacityContainerBuilder<Vec<Control>>>| {
        if !first_local {
            return;
        }
        let msgs = bus.take_outbox();
        if !msgs.is_empty() {
            for m in msgs {
                control.send(m);
            }
            control.flush();
        }
    };
    loop {
        match rx.try_recv() {
            Ok(mut batch) => {
                input.send_batch(&mut batch);
                let next = *input.time() + 1;
                input.advance_to(next);
                while probe.less_than(&input.time().saturating_sub(MAX_EPOCHS_IN_FLIGHT)) {
                    // Waiting for the other workers: parked (woken by their messages), not
                    // spinning on a core they need.
                    worker.step_or_park(Some(Duration::from_millis(1)));
                    report(&probe, *input.time());
                    forward(&mut control);
                }
                worker.step();
            }
            Err(TryRecvError::Empty) => {
                worker.step_or_park(Some(Duration::from_millis(1)));
            }
            Err(TryRecvError::Disconnected) => break,
        }
        report(&probe, *input.time());
        forward(&mut control);
    }
    let sent = *input.time();
    drop(input);
    // Other processes may still be sending: keep stepping (and talking) until every output
    // is complete, then close the control stream too.
    while !probe.done() {
        worker.step_or_park(Some(Duration::from_millis(1)));
        report(&probe, sent);
        forward(&mut control);
    }
    report(&probe, sent);
    forward(&mut control);
    drop(control);
    while worker.step_or_park(Some(Duration::from_millis(1))) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_peer_is_named_by_its_networking_thread() {
        assert_eq!(peer_of_thread("timely:recv-1"), Some(1));
        assert_eq!(peer_of_thread("timely:send-12"), Some(12));
        assert_eq!(peer_of_thread("timely:work-0"), None);
        let msg = lost_peer_message(&two(0), Some(1));
        assert!(
            msg.contains("process 0 lost the connection to process 1 (127.0.0.1:2102)"),
            "{msg}"
        );
        assert!(lost_peer_message(&two(1), None).contains("to a peer process"));
    }

    fn two(process: usize) -> Cluster {
        Cluster {
            processes: 2,
            process,
            hosts: vec!["127.0.0.1:2101".into(), "127.0.0.1:2102".into()],
            peer_timeout: None,
        }
    }

    #[test]
    fn durable_is_the_minimum_over_processes() {
        let bus = ClusterBus::new(&two(1));
        assert_eq!(bus.set_durable(5), 0, "process 0 has reported nothing yet");
        assert_eq!(bus.take_outbox(), vec![Control::Durable { process: 1, upto: 5 }]);
        bus.receive(&Control::Durable { process: 0, upto: 3 });
        assert_eq!(bus.durable(), 3);
        bus.receive(&Control::Durable { process: 0, upto: 9 });
        bus.receive(&Control::Durable { process: 0, upto: 4 });
        assert_eq!(bus.durable(), 5, "reports only move forward");
        assert_eq!(bus.set_durable(5), 5);
        assert!(bus.take_outbox().is_empty(), "nothing new, nothing sent");
        assert_eq!(bus.history(), None);
        let ends = vec![("price".to_string(), 7)];
        bus.receive(&Control::HistoryDone {
            epoch: 4,
            ends: ends.clone(),
        });
        assert_eq!(bus.history(), Some((4, ends)));
    }

    #[test]
    fn a_cluster_checkpoint_counts_once_every_part_is_in_and_its_manifest_is_announced() {
        let bus = ClusterBus::new(&two(0));
        bus.part_written(3);
        assert_eq!(bus.take_outbox(), vec![Control::PartWritten { process: 0, id: 3 }]);
        assert!(!bus.parts_complete(3), "process 1's part is missing");
        bus.receive(&Control::PartWritten { process: 1, id: 3 });
        bus.receive(&Control::PartWritten { process: 1, id: 4 });
        assert!(bus.parts_complete(3));
        assert!(!bus.parts_complete(4));
        assert_eq!(bus.manifest(), 0);
        bus.announce_manifest(3);
        assert_eq!(bus.take_outbox(), vec![Control::Manifest { id: 3 }]);
        assert_eq!(bus.manifest(), 3);
        // Another process learns it from the stream; old news never moves it back.
        let other = ClusterBus::new(&two(1));
        other.receive(&Control::Manifest { id: 3 });
        other.receive(&Control::Manifest { id: 2 });
        other.receive(&Control::PartWritten { process: 0, id: 3 });
        assert_eq!(other.manifest(), 3);
        assert!(!other.parts_complete(3), "parts of a counted checkpoint are forgotten");
        // Every process must have started from the same checkpoint.
        other.announce_restored(3);
        other.receive(&Control::Restored { process: 0, id: 3 });
        assert_eq!(other.restored_mismatch(), None);
        other.receive(&Control::Restored { process: 0, id: 4 });
        assert_eq!(other.restored_mismatch(), Some((0, 4, 3)));
    }

    #[test]
    fn one_process_sends_nothing() {
        let bus = ClusterBus::new(&Cluster::single());
        assert_eq!(bus.set_durable(3), 3);
        bus.announce_history(2, Vec::new());
        assert!(bus.take_outbox().is_empty());
        assert_eq!(bus.history(), Some((2, Vec::new())));
    }

    #[test]
    fn cluster_is_checked() {
        assert!(two(1).validate().is_ok());
        assert!(two(2).validate().unwrap_err().contains("out of range"));
        let mut c = two(0);
        c.hosts.pop();
        assert!(c.validate().unwrap_err().contains("2 host:port"));
        assert!(Cluster::single().validate().is_ok());
    }
}
