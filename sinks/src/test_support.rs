//! Helpers shared by the sinks' tests.

use std::collections::HashMap;

use metrics_util::debugging::{DebugValue, Snapshotter};

/// Counters (`name[labels]` → value) and histogram sample counts of a local recorder.
pub(crate) fn metrics_of(snap: &Snapshotter) -> (HashMap<String, u64>, HashMap<String, usize>) {
    let mut counters = HashMap::new();
    let mut histograms = HashMap::new();
    for (key, _, _, value) in snap.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        let name = format!("{}{labels:?}", key.name());
        match value {
            DebugValue::Counter(n) => *counters.entry(name).or_insert(0) += n,
            DebugValue::Histogram(v) => *histograms.entry(name).or_insert(0) += v.len(),
            DebugValue::Gauge(_) => {}
        }
    }
    (counters, histograms)
}
