//! Kafka live source (SPEC §1: one JSON record per message value).
//!
//! [`start`] runs a librdkafka consumer on the tokio runtime and sends every message to the
//! pipeline as a [`LiveItem`]:
//!
//! - **Decoding.** Each topic carries one record kind ([`KafkaSourceConfig::topics`]); values
//!   are parsed with [`schemas::parse_record`]. A value that is a DynamoDB-JSON item of
//!   DeFiLlama's tables (an object whose `PK` is a typed attribute such as `{"S":"hourlyTvl#1"}`,
//!   or such an item wrapped as `{"Item":…}` / `{"NewImage":…}`) is decoded with
//!   [`schemas::dynamo::decode_item`] whatever the topic: `hourlyTvl#` / `dailyTvl#` items become
//!   one TVL record, `coingecko#` / `asset#` items with a `price` a price record. A redirect-only
//!   price item is dead-lettered ("redirect needs a price history; not supported on Kafka": the
//!   target's history lives in another key, possibly another partition or process). As in
//!   DynamoDB exports, items of other PK kinds and deletions are skipped and counted
//!   (`llamaflow_kafka_skipped_total{topic,reason}`) rather than dead-lettered.
//! - **Dead letters.** Bad JSON, validation errors, invalid UTF-8, empty and null values become
//!   [`Change::Dead`](crate::live::Change::Dead) at `topic/partition@offset`; consumption goes on.
//!   On the rules / protocols topics a null value (tombstone) whose key is the id deletes that
//!   rule / protocol ([`Change::DeleteRule`](crate::live::Change::DeleteRule),
//!   [`Change::DeleteProtocol`](crate::live::Change::DeleteProtocol)), as on log-compacted topics.
//! - **Positions.** `pos` = `<topic>/<partition>@<offset>`, `ack` = [`Ack::Kafka`] with the
//!   message's offset. Nothing is committed by the consumer itself (`enable.auto.commit` and
//!   `enable.auto.offset.store` are off): [`KafkaSourceHandle::commit`] commits what the pipeline
//!   reports as durable, and a restart resumes right after it (at-least-once; sinks dedupe).
//! - **Backpressure.** While the pipeline's channel is full, every assigned partition is paused
//!   and the consumer keeps being polled (rebalances are served, the group membership never
//!   expires); fetching resumes right after the last message handed out.
//! - **Scale-out.** Without [`KafkaSourceConfig::assignment`] the consumer subscribes with group
//!   management. With `assignment = [index, count]` it assigns itself the partitions `p` with
//!   `p % count == index` of every topic (partitions added later are picked up within 10 s)
//!   and starts each from the group's committed offset.
//! - **History.** [`range::open_range`] reads a time range of the same topics as bounded
//!   history (one source per partition, nothing committed): `export` / `replay --kafka-*`.
//! - **Metrics.** `llamaflow_records_in_total{source="kafka",topic}` per message;
//!   `llamaflow_kafka_lag{topic,partition}` = high watermark − position, every second.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::live::{Ack, LiveItem};

mod config;
mod consumer;
mod decode;
pub mod range;
#[cfg(test)]
mod range_tests;
#[cfg(test)]
mod tests;

pub use config::{KafkaSourceConfig, default_topics};

use consumer::{Decoder, KafkaConsumer, Manual, SourceContext};

/// Why the Kafka source could not start, commit or keep consuming.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSourceError {
    /// The configuration is invalid (names the field).
    #[error("kafka source config: {0}")]
    Config(String),
    /// A librdkafka operation failed.
    #[error("kafka source: cannot {action}: {source}")]
    Kafka {
        /// What was being done.
        action: String,
        /// The librdkafka error.
        source: KafkaError,
    },
    /// A background task of the source panicked or was cancelled.
    #[error("kafka source: {0}")]
    Task(String),
    /// A bounded read of a time range could not be completed.
    #[error("kafka range read: {0}")]
    Range(String),
}

impl KafkaSourceError {
    pub(crate) fn kafka(action: impl Into<String>, source: KafkaError) -> Self {
        KafkaSourceError::Kafka {
            action: action.into(),
            source,
        }
    }
}

/// Starts consuming: every message of the configured topics is sent to `tx` as a
/// [`LiveItem`] (see the module docs). Returns once the consumer is created and subscribed
/// (or, under manual assignment, once partitions were looked up; missing topics are retried).
/// Must be called within a tokio runtime. A fatal consumer error ends the source: its sender
/// is dropped and [`KafkaSourceHandle::stop`] returns the error.
pub async fn start(cfg: &KafkaSourceConfig, tx: mpsc::Sender<LiveItem>) -> Result<KafkaSourceHandle, KafkaSourceError> {
    let by_topic = cfg.validate()?;
    let consumer: KafkaConsumer = cfg
        .client_config()
        .create_with_context(SourceContext::new(
            cfg.start_from_timestamp_ms,
            cfg.resume_offsets.clone(),
        ))
        .map_err(|e| KafkaSourceError::kafka("create the consumer", e))?;
    let consumer = Arc::new(consumer);
    let mut topics: Vec<String> = by_topic.keys().cloned().collect();
    topics.sort();
    let manual = match cfg.assignment {
        None => {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            consumer
                .subscribe(&names)
                .map_err(|e| KafkaSourceError::kafka(format!("subscribe to {}", topics.join(", ")), e))?;
            tracing::info!(
                "kafka source: subscribed to {} as group {}",
                topics.join(", "),
                cfg.group_id
            );
            None
        }
        Some((index, count)) => {
            let manual = Arc::new(Mutex::new(Manual::new(index, count, topics.clone())));
            let (c, m) = (consumer.clone(), manual.clone());
            let first = tokio::task::spawn_blocking(move || {
                let mut m = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                m.refresh(&c)
            })
            .await
            .map_err(|e| KafkaSourceError::Task(format!("partition lookup: {e}")))?;
            if let Err(e) = first {
                tracing::warn!("kafka source: {e}; retrying every second");
            }
            Some(manual)
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let consume = tokio::spawn(consumer::consume(
        consumer.clone(),
        Decoder::new(&by_topic),
        tx,
        stop_rx.clone(),
    ));
    let monitor = tokio::spawn(consumer::monitor(
        consumer.clone(),
        manual,
        cfg.auto_offset_reset == "earliest",
        stop_rx,
    ));
    Ok(KafkaSourceHandle {
        consumer: Some(consumer),
        stop: stop_tx,
        consume: Some(consume),
        monitor: Some(monitor),
    })
}

/// A running Kafka source: commits offsets, stops consuming (also on drop).
pub struct KafkaSourceHandle {
    consumer: Option<Arc<KafkaConsumer>>,
    stop: watch::Sender<bool>,
    consume: Option<JoinHandle<Result<(), KafkaSourceError>>>,
    monitor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for KafkaSourceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSourceHandle").finish_non_exhaustive()
    }
}

/// The `(topic, partition, next offset)` entries of `acks`: for each partition, the highest
/// acknowledged offset + 1 — what [`KafkaSourceHandle::commit`] takes.
pub fn commit_offsets<'a>(acks: impl IntoIterator<Item = &'a Ack>) -> Vec<(String, i32, i64)> {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for ack in acks {
        if let Ack::Kafka {
            topic,
            partition,
            offset,
        } = ack
        {
            let e = next.entry((topic.as_str(), *partition)).or_insert(i64::MIN);
            *e = (*e).max(offset.saturating_add(1));
        }
    }
    next.into_iter().map(|((t, p), o)| (t.to_string(), p, o)).collect()
}

impl KafkaSourceHandle {
    fn consumer(&self) -> Result<&Arc<KafkaConsumer>, KafkaSourceError> {
        self.consumer
            .as_ref()
            .ok_or_else(|| KafkaSourceError::Task("the source is stopped".into()))
    }

    /// Commits `(topic, partition, next offset to read)` — the last durable offset + 1 — to the
    /// consumer group, synchronously (returns once the group coordinator has stored them).
    /// Partitions not assigned to this consumer any more (revoked in a rebalance) are left
    /// alone: their new owner re-reads from the last commit. For one partition the highest
    /// offset given wins. Blocks: from async code use [`KafkaSourceHandle::commit`].
    pub fn commit_blocking(&self, offsets: &[(String, i32, i64)]) -> Result<(), KafkaSourceError> {
        commit_sync(self.consumer()?, offsets)
    }

    /// [`KafkaSourceHandle::commit_blocking`] on a blocking thread.
    pub async fn commit(&self, offsets: &[(String, i32, i64)]) -> Result<(), KafkaSourceError> {
        let consumer = self.consumer()?.clone();
        let offsets = offsets.to_vec();
        tokio::task::spawn_blocking(move || commit_sync(&consumer, &offsets))
            .await
            .map_err(|e| KafkaSourceError::Task(format!("commit: {e}")))?
    }

    /// The `(topic, partition)`s currently assigned to this consumer.
    pub fn assignment(&self) -> Result<Vec<(String, i32)>, KafkaSourceError> {
        let tpl = self
            .consumer()?
            .assignment()
            .map_err(|e| KafkaSourceError::kafka("read the assignment", e))?;
        let mut out: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Stops consuming, closes the consumer (leaving the group, without committing anything)
    /// and returns the error that ended the source, if any.
    pub async fn stop(mut self) -> Result<(), KafkaSourceError> {
        let _ = self.stop.send(true);
        let consume = self.consume.take();
        let monitor = self.monitor.take();
        let consumer = self.consumer.take();
        let mut result = Ok(());
        if let Some(task) = consume {
            result = task
                .await
                .map_err(|e| KafkaSourceError::Task(format!("consume task: {e}")))
                .and_then(|r| r);
        }
        if let Some(task) = monitor {
            let _ = task.await;
        }
        if let Some(consumer) = consumer {
            // The tasks have released theirs: this closes the consumer.
            let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
        }
        result
    }
}

impl Drop for KafkaSourceHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(consumer) = self.consumer.take() {
            consumer::release(consumer);
        }
    }
}

fn commit_sync(consumer: &KafkaConsumer, offsets: &[(String, i32, i64)]) -> Result<(), KafkaSourceError> {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for (topic, partition, offset) in offsets {
        if *offset < 0 {
            return Err(KafkaSourceError::Config(format!(
                "cannot commit {topic}/{partition} at negative offset {offset}"
            )));
        }
        let e = next.entry((topic.as_str(), *partition)).or_insert(*offset);
        *e = (*e).max(*offset);
    }
    if next.is_empty() {
        return Ok(());
    }
    let assigned: HashSet<(String, i32)> = consumer
        .assignment()
        .map_err(|e| KafkaSourceError::kafka("read the assignment", e))?
        .elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect();
    let mut tpl = TopicPartitionList::with_capacity(next.len());
    for ((topic, partition), offset) in next {
        if !assigned.contains(&(topic.to_string(), partition)) {
            tracing::info!("kafka source: not committing {topic}/{partition}@{offset}: no longer assigned here");
            continue;
        }
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(|e| KafkaSourceError::kafka(format!("commit {topic}/{partition}@{offset}"), e))?;
    }
    if tpl.count() == 0 {
        return Ok(());
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| KafkaSourceError::kafka(format!("commit offsets to group ({} partitions)", tpl.count()), e))
}

impl crate::live::LiveSource for KafkaSourceHandle {
    fn name(&self) -> &'static str {
        "kafka"
    }

    /// Commits `positions.kafka`, each partition's last durable offset + 1.
    fn commit<'a>(
        &'a self,
        positions: &'a crate::live::Positions,
    ) -> futures_util::future::BoxFuture<'a, Result<(), crate::live::CommitError>> {
        Box::pin(async move {
            if positions.kafka.is_empty() {
                return Ok(());
            }
            let offsets: Vec<(String, i32, i64)> = positions
                .kafka
                .iter()
                .map(|((t, p), o)| (t.clone(), *p, o + 1))
                .collect();
            Ok(KafkaSourceHandle::commit(self, &offsets).await?)
        })
    }

    fn reach(&self) -> Option<Arc<crate::live::Reach>> {
        self.consumer.as_ref().map(|c| c.context().reach.clone())
    }

    fn stop(self: Box<Self>) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Err(e) = KafkaSourceHandle::stop(*self).await {
                tracing::warn!("kafka source: {e}");
            }
        })
    }
}

impl KafkaSourceConfig {
    /// Resumes after a checkpoint's positions: each partition just past its last durable
    /// offset (partitions it does not name start as configured).
    pub fn resume_from(&mut self, positions: &crate::live::Positions) {
        self.resume_offsets = positions.kafka.iter().map(|(tp, o)| (tp.clone(), o + 1)).collect();
    }
}
