//! Consistent snapshots of the dataflow's state at epoch boundaries, and restoring from them.
//!
//! The ingest side [requests](Snapshots::request) a snapshot at epoch `e` before it sends
//! `e`. Each stateful operator of each worker encodes its state once it has processed every
//! epoch `≤ e` and none after (its input frontier has passed `e`), and deposits it here; the
//! snapshot is [complete](Snapshots::take) when every worker's operators have. Together with
//! the source positions of epochs `≤ e` it is a checkpoint: restoring it and re-reading the
//! sources from those positions continues exactly where the run left off.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::aggregate::Aggregates;
use crate::candidate::Throttle;
use crate::config::OpConfig;
use crate::state::KeyedState;

/// A checkpoint that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// State could not be encoded or decoded.
    #[error("checkpoint state encoding: {0}")]
    Encoding(#[from] bincode::Error),
    /// An incremental snapshot was restored without its base ([`WorkerState::rebase`]).
    #[error(
        "the state holds the rules changed since the snapshot of epoch {0}, not every rule: restore it with that base"
    )]
    NeedsBase(u64),
    /// [`WorkerState::rebase`] was given a base that is itself incremental.
    #[error("the base snapshot for epoch {0} is incremental itself (relative to epoch {1})")]
    BaseNotWhole(u64, u64),
}

/// A snapshot part captured at a cut: finishing it produces the part's bytes. Capturing is
/// cheap (what is large and immutable, like the shared rules, is only referenced), so the
/// costly encoding runs on the thread that [takes](Snapshots::take) the snapshot, not in
/// the dataflow.
pub(crate) type Captured = Box<dyn FnOnce() -> Result<Vec<u8>, CheckpointError> + Send>;

/// Operator state that can be captured into a snapshot.
pub(crate) trait Encode {
    /// The state as it is now (the snapshot of `epoch`), to be encoded later.
    fn capture(&mut self, epoch: u64) -> Result<Captured, CheckpointError>;
}

impl Encode for KeyedState {
    fn capture(&mut self, epoch: u64) -> Result<Captured, CheckpointError> {
        self.capture(epoch)
    }
}

impl Encode for Throttle {
    fn capture(&mut self, _epoch: u64) -> Result<Captured, CheckpointError> {
        let bytes = bincode::serialize(self)?;
        Ok(Box::new(move || Ok(bytes)))
    }
}

impl Encode for Aggregates {
    fn capture(&mut self, _epoch: u64) -> Result<Captured, CheckpointError> {
        let bytes = bincode::serialize(self)?;
        Ok(Box::new(move || Ok(bytes)))
    }
}

impl Encode for () {
    fn capture(&mut self, _epoch: u64) -> Result<Captured, CheckpointError> {
        Ok(Box::new(|| Ok(Vec::new())))
    }
}

/// The stateful operators of a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Per-key state (histories, last values, rules).
    Keyed,
    /// Per-rule throttle state.
    Throttle,
    /// The live aggregates' history (for `change_1d` / `change_7d`) and clock.
    Aggregates,
}

/// One worker's encoded operator state at an epoch boundary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerState {
    /// [`KeyedState::capture`], encoded.
    #[serde(with = "serde_bytes")]
    pub keyed: Vec<u8>,
    /// The encoded [`Throttle`].
    #[serde(with = "serde_bytes")]
    pub throttle: Vec<u8>,
    /// The encoded [`Aggregates`] stage (its collections are rebuilt from the keyed state).
    #[serde(with = "serde_bytes")]
    pub aggregates: Vec<u8>,
}

impl WorkerState {
    /// The epoch of the snapshot whose rules this one's are relative to (an incremental
    /// snapshot: only the rules changed since then), or `None` when it holds every rule.
    pub fn rule_base(&self) -> Result<Option<u64>, CheckpointError> {
        crate::state::rule_base(&self.keyed)
    }

    /// This incremental snapshot made whole: the rules of `base` (the same worker's snapshot
    /// at [`WorkerState::rule_base`], which holds every rule) with this one's changes.
    pub fn rebase(&self, base: &WorkerState) -> Result<WorkerState, CheckpointError> {
        Ok(WorkerState {
            keyed: crate::state::rebase_keyed(&self.keyed, &base.keyed)?,
            throttle: self.throttle.clone(),
            aggregates: self.aggregates.clone(),
        })
    }

    /// Decodes the state for a worker that runs with `cfg`.
    pub fn decode(&self, cfg: OpConfig) -> Result<Restored, CheckpointError> {
        Ok(Restored {
            keyed: KeyedState::restore(cfg, &self.keyed)?,
            throttle: bincode::deserialize(&self.throttle)?,
            aggregates: if self.aggregates.is_empty() {
                Aggregates::default()
            } else {
                bincode::deserialize(&self.aggregates)?
            },
        })
    }
}

/// The operator state of a checkpoint's workers (every worker of every process, in global
/// order) re-split over `workers` workers (of every process, in global order), as the
/// dataflow would have spread it: keyed state by key, throttles by rule, the live aggregates
/// (a singleton on worker 0) to worker 0. A restore into another shape starts from this.
pub fn rescale_states(states: &[WorkerState], workers: usize) -> Result<Vec<WorkerState>, CheckpointError> {
    let images: Vec<&[u8]> = states.iter().map(|s| s.keyed.as_slice()).collect();
    let keyed = crate::state::split_keyed(&images, workers)?;
    let throttles = states
        .iter()
        .map(|s| bincode::deserialize(&s.throttle))
        .collect::<Result<Vec<Throttle>, _>>()?;
    let throttles = Throttle::split(throttles, workers);
    let aggregates = states.first().map(|s| s.aggregates.clone()).unwrap_or_default();
    keyed
        .into_iter()
        .zip(throttles)
        .enumerate()
        .map(|(w, (keyed, throttle))| {
            Ok(WorkerState {
                keyed,
                throttle: bincode::serialize(&throttle)?,
                aggregates: if w == 0 { aggregates.clone() } else { Vec::new() },
            })
        })
        .collect()
}

/// Decoded state a worker starts from.
#[derive(Debug)]
pub struct Restored {
    pub(crate) keyed: KeyedState,
    pub(crate) throttle: Throttle,
    pub(crate) aggregates: Aggregates,
}

/// How a worker's dataflow takes part in checkpoints.
#[derive(Default)]
pub struct Checkpointing {
    /// Where snapshots are requested and deposited (`None`: never snapshot).
    pub snapshots: Option<Snapshots>,
    /// State to start from instead of empty state.
    pub restore: Option<Restored>,
}

/// A worker's deposited parts of one snapshot: (keyed, throttle, aggregates).
type Slot = (Option<Captured>, Option<Captured>, Option<Captured>);

#[derive(Default)]
struct Inner {
    requested: BTreeSet<u64>,
    parts: BTreeMap<u64, Vec<Slot>>,
}

/// Snapshot requests and the parts workers deposit; shared by the workers of a process.
#[derive(Clone)]
pub struct Snapshots {
    workers: usize,
    /// Index of the process's first worker (timely numbers the workers of a cluster
    /// `process × threads + local index`).
    first_worker: usize,
    inner: Arc<Mutex<Inner>>,
}

impl Snapshots {
    /// Snapshots of a dataflow with `workers` workers.
    pub fn new(workers: usize) -> Self {
        Self::for_process(workers, 0)
    }

    /// Snapshots of one process's `workers` workers of a cluster, the first of which has the
    /// worker index `first_worker`; a snapshot then holds this process's workers only.
    pub fn for_process(workers: usize, first_worker: usize) -> Self {
        Snapshots {
            workers: workers.max(1),
            first_worker,
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks for the state after epoch `epoch`; call before sending that epoch.
    pub fn request(&self, epoch: u64) {
        self.lock().requested.insert(epoch);
    }

    /// Requested epochs in `(after, before)`, oldest first.
    pub(crate) fn due(&self, after: Option<u64>, before: u64) -> Vec<u64> {
        let start = after.map_or(0, |a| a.saturating_add(1));
        if start >= before {
            return Vec::new();
        }
        self.lock().requested.range(start..before).copied().collect()
    }

    /// A worker's operator deposits its captured state for `epoch`.
    pub(crate) fn deposit(&self, epoch: u64, worker: usize, part: Part, captured: Captured) {
        let workers = self.workers;
        let Some(worker) = worker.checked_sub(self.first_worker) else {
            return;
        };
        let mut inner = self.lock();
        let slots = inner
            .parts
            .entry(epoch)
            .or_insert_with(|| (0..workers).map(|_| (None, None, None)).collect());
        if let Some(slot) = slots.get_mut(worker) {
            match part {
                Part::Keyed => slot.0 = Some(captured),
                Part::Throttle => slot.1 = Some(captured),
                Part::Aggregates => slot.2 = Some(captured),
            }
        }
    }

    /// The complete snapshot of `epoch` (one state per worker), once every part is in; it is
    /// removed with its request and encoded on the calling thread.
    pub fn take(&self, epoch: u64) -> Option<Result<Vec<WorkerState>, CheckpointError>> {
        let slots = {
            let mut inner = self.lock();
            let complete = inner
                .parts
                .get(&epoch)
                .is_some_and(|slots| slots.iter().all(|(k, t, a)| k.is_some() && t.is_some() && a.is_some()));
            if !complete {
                return None;
            }
            inner.requested.remove(&epoch);
            inner.parts.remove(&epoch)?
        };
        let finish = |part: Option<Captured>| part.map_or(Ok(Vec::new()), |f| f());
        Some(
            slots
                .into_iter()
                .map(|(k, t, a)| {
                    Ok(WorkerState {
                        keyed: finish(k)?,
                        throttle: finish(t)?,
                        aggregates: finish(a)?,
                    })
                })
                .collect(),
        )
    }
}
