//! The unit every sink writes: the results of one ingest epoch.

use std::sync::Arc;

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

impl OutputBatch {
    /// Consecutive epochs' batches as one, in order, under the last one's epoch: what a sink
    /// that [merges](crate::Sink::merges) writes when several epochs wait for it.
    pub fn merge(batches: &[Arc<OutputBatch>]) -> OutputBatch {
        let mut out = OutputBatch {
            epoch: batches.last().map_or(0, |b| b.epoch),
            alerts: Vec::with_capacity(batches.iter().map(|b| b.alerts.len()).sum()),
            events: Vec::with_capacity(batches.iter().map(|b| b.events.len()).sum()),
            dead: Vec::with_capacity(batches.iter().map(|b| b.dead.len()).sum()),
        };
        for b in batches {
            out.alerts.extend_from_slice(&b.alerts);
            out.events.extend_from_slice(&b.events);
            out.dead.extend_from_slice(&b.dead);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_batches_keep_their_order_under_the_last_epoch() {
        let alert = |id: &str| crate::test_support::eth_alert(id, &["websocket"]);
        let dead = |r: &str| DeadLetter::new("t:1", r, "{}");
        let b = |epoch, ids: &[&str], d: &[&str]| {
            Arc::new(OutputBatch {
                epoch,
                alerts: ids.iter().map(|i| alert(i)).collect(),
                events: Vec::new(),
                dead: d.iter().map(|r| dead(r)).collect(),
            })
        };
        let merged = OutputBatch::merge(&[b(3, &["a", "b"], &["x"]), b(4, &[], &[]), b(5, &["c"], &["y"])]);
        assert_eq!(merged.epoch, 5);
        let ids: Vec<&str> = merged.alerts.iter().map(|a| a.alert_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        let reasons: Vec<&str> = merged.dead.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(reasons, ["x", "y"]);
        assert_eq!(OutputBatch::merge(&[]), OutputBatch::default());
    }
}
