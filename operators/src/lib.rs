//! llamaflow's dataflow operators (SPEC §2–§3), pure computation with no I/O.
//!
//! Inputs are [`Envelope`]s stamped by the single-threaded [`Sequencer`]; [`build`] wires the
//! timely dataflow that turns them into alerts, market events and dead letters. The per-key
//! logic lives in [`KeyedState`] and the per-rule throttle in [`Throttle`], both plain
//! sequential code the dataflow runs epoch by epoch.

pub mod aggregate;
mod candidate;
pub mod checkpoint;
mod config;
mod dataflow;
mod envelope;
mod format;
mod keys;
mod state;

pub use aggregate::{StateDelta, StateOut};
pub use candidate::{Candidate, Detail, RecordInfo, Throttle, Throttled};
pub use checkpoint::{Checkpointing, Snapshots, WorkerState, rescale_states};
pub use config::OpConfig;
pub use dataflow::{Arrival, Outputs, build};
pub use envelope::{
    ByWorker, Envelope, Envelopes, Item, Key, Sequencer, SequencerImage, record_key, rule_key, throttle_route,
    worker_of,
};
pub use keys::{KeyHash, KeyId, prefetch, prefetch_value};
pub use state::{KeyedOut, KeyedState};
