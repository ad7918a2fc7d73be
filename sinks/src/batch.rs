//! The unit every sink writes: the results of one ingest epoch.

use schemas::{Alert, Event};

/// The alerts and market events of one epoch. A sink's `write` returns only once the batch is
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
}
