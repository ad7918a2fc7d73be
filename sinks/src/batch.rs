//! The unit every sink writes: the results of one ingest epoch.

use schemas::{Alert, DeadLetter, Event};

/// The alerts, market events and dead letters of one epoch. A sink's `write` returns only once the batch is
/// durable (or has failed for good); the pipeline then acknowledges the epoch's source
/// positions. Sinks are idempotent: writing a batch twice leaves the same state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutputBatch {
    /// Ingest epoch.
    pub epoch: u64,
    /// Alerts, in their deterministic order.
    pub alerts: Vec<Alert>,
    /// Market events.
    pub events: Vec<Event>,
    /// Input the epoch refused, with reasons and source positions: durable before the
    /// epoch's positions are committed, like everything else.
    pub dead: Vec<DeadLetter>,
}
