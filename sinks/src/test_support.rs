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

/// An ETH price alert with the given id and channels (webhook channel → a webhook URL).
pub(crate) fn eth_alert(id: &str, channels: &[&str]) -> schemas::Alert {
    schemas::Alert {
        alert_id: id.into(),
        rule_id: format!("rule-{id}"),
        user_id: "u1".into(),
        alert_type: "price_threshold".into(),
        subject: "coingecko:ethereum".into(),
        triggered_at: 1_717_430_400,
        value: 3500.0,
        threshold: 3000.0,
        message: "ETH above 3000".into(),
        channels: channels.iter().map(|c| c.to_string()).collect(),
        webhook_url: channels.contains(&"webhook").then(|| "https://example.com/hook".into()),
    }
}
