//! The Kafka sink (SPEC §6): market events to `defi-events` keyed by subject, alerts to
//! `defi-alerts` keyed by user id, JSON values, idempotent producer.
//!
//! ```no_run
//! use sinks::kafka::{KafkaSink, KafkaSinkConfig};
//!
//! # async fn run(batch: sinks::OutputBatch) -> Result<(), sinks::kafka::KafkaSinkError> {
//! let mut sink = KafkaSink::connect(KafkaSinkConfig::default()).await?;
//! sink.write(&batch).await?; // returns once every message of the batch is acknowledged
//! # Ok(())
//! # }
//! ```
//!
//! # What one batch writes
//!
//! For an [`OutputBatch`](crate::OutputBatch): every market event (unless
//! [`KafkaSinkConfig::publish_events`] is off) to [`KafkaSinkConfig::events_topic`] with key =
//! the event's `subject` and value = the event JSON (`{"type","subject","timestamp","data"}`,
//! SPEC §3), then every alert to [`KafkaSinkConfig::alerts_topic`] with key = `user_id` and
//! value = the alert record (SPEC §2). Keys are hashed like the Java client (`murmur2_random`),
//! so all messages of one key land in one partition, in batch order.
//!
//! # Delivery
//!
//! The producer is idempotent (`enable.idempotence=true`, `acks=all`): librdkafka retries
//! internally without duplicating or reordering within a partition. [`KafkaSink::write`]
//! enqueues the whole batch, then waits for *every* delivery report; it returns `Ok` only if
//! all messages were acknowledged by all in-sync replicas. A message that could not be
//! delivered within [`KafkaSinkConfig::message_timeout_ms`] fails the write with
//! [`KafkaSinkError::Delivery`], naming its topic and key — nothing is dropped silently.
//!
//! The pipeline then retries the batch (or restarts from its last checkpoint), so messages of a
//! batch can be written more than once — **at-least-once**. Alert consumers deduplicate by
//! `alert_id` (deterministic, SPEC §2: the same alert has the same id in every run, restart and
//! replay); event consumers treat events as latest-value updates per subject.
//!
//! A producer that hit a fatal error (possible with idempotence, e.g. on a broker-side
//! sequence loss) is replaced by a fresh one on the next write.
//!
//! # Metrics
//!
//! All with label `sink="kafka"`: counters `llamaflow_sink_written_total` (messages of batches
//! fully delivered) and `llamaflow_sink_failures_total` (batches that failed), histogram
//! `llamaflow_sink_latency_seconds` (duration of a non-empty `write`, whatever its outcome).

use rdkafka::error::KafkaError;

mod config;
mod sink;

#[cfg(test)]
mod tests;

pub use config::KafkaSinkConfig;
pub use sink::KafkaSink;

/// Why the Kafka sink could not connect or write.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    /// The configuration is unusable (names the field).
    #[error("kafka sink config: {0}")]
    Config(String),
    /// The producer could not be created or no broker answered.
    #[error("kafka sink: cannot connect to {brokers}: {source}")]
    Connect {
        /// The configured brokers.
        brokers: String,
        /// The librdkafka error.
        source: KafkaError,
    },
    /// A message could not be serialized.
    #[error("kafka sink: cannot encode a message for {topic} (key {key}): {source}")]
    Encode {
        /// Topic.
        topic: String,
        /// Message key.
        key: String,
        /// The serialization error.
        source: serde_json::Error,
    },
    /// Messages of the batch were not delivered (the first failure is named).
    #[error("kafka sink: {failed} of {total} messages not delivered; first: topic {topic}, key {key}: {source}")]
    Delivery {
        /// Topic of the first failed message.
        topic: String,
        /// Key of the first failed message.
        key: String,
        /// Messages that failed.
        failed: usize,
        /// Messages in the batch.
        total: usize,
        /// The librdkafka error of the first failed message.
        source: Box<KafkaError>,
    },
}
