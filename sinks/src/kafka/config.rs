//! Configuration of the Kafka sink (`[sinks.kafka]` in `llamaflow.toml`).

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use serde::Deserialize;

use super::KafkaSinkError;

/// Settings of the Kafka sink.
///
/// ```toml
/// brokers = "kafka-1:9092,kafka-2:9092"
/// events_topic = "defi-events"
/// alerts_topic = "defi-alerts"
/// publish_events = true
/// message_timeout_ms = 30000
/// extra = { "compression.type" = "lz4" }
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list. Default `localhost:9092`.
    pub brokers: String,
    /// Topic of market events, keyed by subject. Default `defi-events`.
    pub events_topic: String,
    /// Topic of alerts, keyed by user id. Default `defi-alerts`.
    pub alerts_topic: String,
    /// Whether market events are published (alerts always are). Default true.
    pub publish_events: bool,
    /// `message.timeout.ms`: how long librdkafka keeps retrying one message before its delivery
    /// fails (and with it the batch). Default 30000.
    pub message_timeout_ms: u32,
    /// Further librdkafka producer settings, passed through (e.g. `compression.type`,
    /// `security.protocol`). `enable.idempotence` and `acks` cannot be weakened.
    pub extra: BTreeMap<String, String>,
}

impl Default for KafkaSinkConfig {
    fn default() -> Self {
        KafkaSinkConfig {
            brokers: "localhost:9092".into(),
            events_topic: "defi-events".into(),
            alerts_topic: "defi-alerts".into(),
            publish_events: true,
            message_timeout_ms: 30_000,
            extra: BTreeMap::new(),
        }
    }
}

/// Settings the sink relies on; `extra` may not change them.
const FIXED: [(&str, &str); 2] = [("enable.idempotence", "true"), ("acks", "all")];

impl KafkaSinkConfig {
    /// Checks the settings (names the field).
    pub(crate) fn validate(&self) -> Result<(), KafkaSinkError> {
        let bad = |m: String| Err(KafkaSinkError::Config(m));
        if self.brokers.trim().is_empty() {
            return bad("`brokers` is empty".into());
        }
        if self.events_topic.trim().is_empty() {
            return bad("`events_topic` is empty".into());
        }
        if self.alerts_topic.trim().is_empty() {
            return bad("`alerts_topic` is empty".into());
        }
        if self.message_timeout_ms == 0 {
            return bad("`message_timeout_ms` must be > 0".into());
        }
        for (key, value) in FIXED {
            if let Some(v) = self.extra.get(key)
                && !(v == value || (key == "acks" && v == "-1"))
            {
                return bad(format!(
                    "`extra.{key}` = `{v}`: the sink needs `{value}` (idempotent, fully acknowledged writes)"
                ));
            }
        }
        Ok(())
    }

    /// The librdkafka producer configuration.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("message.timeout.ms", self.message_timeout_ms.to_string())
            // The Java client's key hashing: JVM producers and Kafka Streams agree on partitions.
            .set("partitioner", "murmur2_random")
            .set("client.id", "llamaflow-sink");
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        for (k, v) in FIXED {
            c.set(k, v);
        }
        c
    }
}
