//! The consumer machinery: librdkafka context (rebalances, backfill offsets, logging), the
//! consume task (messages → [`LiveItem`]s with backpressure) and the monitor task (lag gauges,
//! partition discovery under manual assignment).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use schemas::{Kind, SourceName, SourcePos};
use tokio::sync::{mpsc, watch};

use super::KafkaSourceError;
use super::decode::decode;
use crate::live::{Ack, LiveItem};

/// The consumer type of the source.
pub(crate) type KafkaConsumer = StreamConsumer<SourceContext>;

/// Timeout of the blocking metadata / offset requests made off the consume path.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of one watermark request of the lag gauges.
const LAG_TIMEOUT: Duration = Duration::from_secs(2);
/// Most items buffered in the source beyond the pipeline's channel before partitions pause.
pub(crate) const MAX_PENDING: usize = 10_000;
/// How often lag gauges are refreshed.
const LAG_INTERVAL: Duration = Duration::from_secs(1);
/// Under manual assignment, topic metadata is re-read every this many lag ticks.
const REFRESH_EVERY_TICKS: u64 = 10;

/// librdkafka callbacks of the source's consumer.
pub(crate) struct SourceContext {
    /// Backfill start (unix ms), applied to each partition's first assignment.
    start_from_ms: Option<i64>,
    /// Checkpoint positions (next offset), applied to each partition's first assignment.
    resume: BTreeMap<(String, i32), i64>,
    /// Partitions this process has been assigned at least once.
    seen: Mutex<HashSet<(String, i32)>>,
    /// Whether the brokers answer (errors here, messages and assignments in the consumer).
    pub(crate) reach: Arc<crate::live::Reach>,
    /// librdkafka repeats a broker error many times a second: one warning per 10 s.
    warn: crate::live::RateLimitedWarning,
}

impl SourceContext {
    pub(crate) fn new(start_from_ms: Option<i64>, resume: BTreeMap<(String, i32), i64>) -> Self {
        SourceContext {
            start_from_ms,
            resume,
            seen: Mutex::new(HashSet::new()),
            reach: Arc::default(),
            warn: crate::live::RateLimitedWarning::new(std::time::Duration::from_secs(10)),
        }
    }

    /// For partitions assigned to this process for the first time, replaces the start offset by
    /// the backfill offset (when configured). Other partitions keep what `tpl` says (committed).
    pub(crate) fn apply_start_offsets<C: Consumer<SourceContext>>(&self, consumer: &C, tpl: &mut TopicPartitionList) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let first: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .filter(|tp| seen.insert(tp.clone()))
            .collect();
        let mut first = first;
        first.retain(|(topic, partition)| {
            let Some(&next) = self.resume.get(&(topic.clone(), *partition)) else {
                return true;
            };
            match tpl.set_partition_offset(topic, *partition, Offset::Offset(next)) {
                Ok(()) => tracing::info!("kafka source: {topic}/{partition} resumes at offset {next} (checkpoint)"),
                Err(e) => tracing::error!("kafka source: cannot resume {topic}/{partition} at {next}: {e}"),
            }
            false
        });
        let Some(ts) = self.start_from_ms else { return };
        if first.is_empty() {
            return;
        }
        let mut query = TopicPartitionList::with_capacity(first.len());
        for (topic, partition) in &first {
            if let Err(e) = query.add_partition_offset(topic, *partition, Offset::Offset(ts)) {
                tracing::error!("kafka source: cannot query the offset of {topic}/{partition} at {ts} ms: {e}");
            }
        }
        match consumer.offsets_for_times(query, REQUEST_TIMEOUT) {
            Ok(found) => {
                for e in found.elements() {
                    // No message at or after `ts` yet: librdkafka answers `End`.
                    let offset = match e.offset() {
                        Offset::Offset(o) => Offset::Offset(o),
                        _ => Offset::End,
                    };
                    if let Err(err) = tpl.set_partition_offset(e.topic(), e.partition(), offset) {
                        tracing::error!(
                            "kafka source: cannot start {}/{} at {ts} ms: {err}",
                            e.topic(),
                            e.partition()
                        );
                    } else {
                        tracing::info!(
                            "kafka source: backfill: {}/{} starts at {offset:?} (first message at or after {ts} ms)",
                            e.topic(),
                            e.partition()
                        );
                    }
                }
            }
            Err(e) => tracing::error!(
                "kafka source: offsets for timestamp {ts} ms failed ({e}); {} partition(s) start from their \
                 committed offsets instead",
                first.len()
            ),
        }
    }
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info | RDKafkaLogLevel::Debug => {
                log_librdkafka("kafka source", level, fac, log_message)
            }
            _ => {
                self.warn
                    .warn(format_args!("kafka source: librdkafka {fac}: {log_message}"));
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.reach.error(format!("{error}: {reason}"));
        self.warn.warn(format_args!("kafka source: {error}: {reason}"));
    }
}

impl ConsumerContext for SourceContext {
    /// The default rebalance, plus backfill start offsets for first assignments.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.reach.ok();
                self.apply_start_offsets(consumer, tpl);
                tracing::info!("kafka source: assigned {}", describe(tpl));
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            other => {
                if other == RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    tracing::info!("kafka source: revoked {}", describe(tpl));
                } else {
                    tracing::error!("kafka source: rebalance error {:?}", RDKafkaErrorCode::from(other));
                }
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
        };
        if let Err(e) = result {
            tracing::error!("kafka source: applying a rebalance failed: {e}");
        }
    }
}

/// Forwards a librdkafka log line to `tracing`.
pub(crate) fn log_librdkafka(who: &str, level: RDKafkaLogLevel, fac: &str, msg: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::error!("{who}: librdkafka {fac}: {msg}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!("{who}: librdkafka {fac}: {msg}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!("{who}: librdkafka {fac}: {msg}"),
        RDKafkaLogLevel::Debug => tracing::debug!("{who}: librdkafka {fac}: {msg}"),
    }
}

/// `topic/partition` list for logs.
fn describe(tpl: &TopicPartitionList) -> String {
    let parts: Vec<String> = tpl
        .elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect();
    if parts.is_empty() {
        "no partitions".into()
    } else {
        parts.join(", ")
    }
}

/// Per-topic state of the consume task.
struct TopicState {
    kind: Kind,
    records_in: metrics::Counter,
    /// `"<topic>/<partition>@"` per partition, shared by every position of the partition.
    sources: HashMap<i32, SourceName>,
}

/// Turns messages into live items.
pub(crate) struct Decoder {
    topics: HashMap<String, TopicState>,
}

impl Decoder {
    pub(crate) fn new(by_topic: &HashMap<String, Kind>) -> Self {
        let topics = by_topic
            .iter()
            .map(|(topic, kind)| {
                let state = TopicState {
                    kind: *kind,
                    records_in: metrics::counter!("llamaflow_records_in_total", "source" => "kafka", "topic" => topic.clone()),
                    sources: HashMap::new(),
                };
                (topic.clone(), state)
            })
            .collect();
        Decoder { topics }
    }

    /// The item of one message; `None` for DynamoDB items that are skipped (counted).
    fn item(&mut self, m: &BorrowedMessage<'_>) -> Option<LiveItem> {
        let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
        let state = match self.topics.get_mut(topic) {
            Some(s) => s,
            None => {
                // Only subscribed / assigned topics are read; keep going if one ever shows up.
                tracing::warn!("kafka source: message from unconfigured topic {topic}/{partition}@{offset}");
                return None;
            }
        };
        state.records_in.increment(1);
        let source = *state
            .sources
            .entry(partition)
            .or_insert_with(|| SourceName::from(format!("{topic}/{partition}@")));
        let pos = SourcePos::new(source, u64::try_from(offset).unwrap_or_default());
        match decode(state.kind, &pos, m.key(), m.payload()) {
            Ok(change) => Some(LiveItem {
                pos,
                ack: Ack::Kafka {
                    topic: topic.to_string(),
                    partition,
                    offset,
                },
                change,
            }),
            Err(skip) => {
                metrics::counter!("llamaflow_kafka_skipped_total", "topic" => topic.to_string(), "reason" => skip.label())
                    .increment(1);
                tracing::debug!("kafka source: {pos} skipped ({})", skip.label());
                None
            }
        }
    }
}

/// Pauses (or resumes) every partition currently assigned.
fn set_paused(consumer: &KafkaConsumer, pause: bool) {
    let assignment = match consumer.assignment() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!("kafka source: cannot read the assignment to pause/resume: {e}");
            return;
        }
    };
    if assignment.count() == 0 {
        return;
    }
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    if let Err(e) = result {
        tracing::warn!("kafka source: pause/resume failed: {e}");
    }
}

/// The consume loop. Items go to `tx` in partition order. When `tx` is full, items wait in a
/// local queue; once that holds as many items as `tx` can (at most [`MAX_PENDING`]), every
/// assigned partition is paused (librdkafka resumes fetching right after the last message
/// handed out) until the queue is down to half. The consumer keeps being polled meanwhile, so
/// rebalances are served and `max.poll.interval.ms` never expires. Ends on stop, when the
/// receiver is gone, or on a fatal consumer error.
pub(crate) async fn consume(
    consumer: Arc<KafkaConsumer>,
    mut decoder: Decoder,
    tx: mpsc::Sender<LiveItem>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), KafkaSourceError> {
    let high = tx.max_capacity().clamp(1, MAX_PENDING);
    let low = high / 2;
    let mut pending: VecDeque<LiveItem> = VecDeque::new();
    let mut paused = false;
    let result = loop {
        if paused && pending.len() <= low {
            set_paused(&consumer, false);
            paused = false;
        }
        tokio::select! {
            biased;
            _ = stop.changed() => break Ok(()),
            permit = tx.reserve(), if !pending.is_empty() => match permit {
                Ok(permit) => {
                    if let Some(item) = pending.pop_front() {
                        permit.send(item);
                    }
                }
                Err(_) => break Ok(()),
            },
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    consumer.context().reach.ok();
                    if let Some(item) = decoder.item(&m) {
                        if pending.is_empty() {
                            match tx.try_send(item) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Full(item)) => pending.push_back(item),
                                Err(mpsc::error::TrySendError::Closed(_)) => break Ok(()),
                            }
                        } else {
                            pending.push_back(item);
                        }
                    }
                    if pending.len() >= high {
                        // Again when already paused: covers partitions assigned since.
                        set_paused(&consumer, true);
                        paused = true;
                    }
                }
                Err(KafkaError::PartitionEOF(_)) => {}
                Err(KafkaError::MessageConsumptionFatal(code)) => {
                    tracing::error!("kafka source: fatal consumer error: {code}");
                    break Err(KafkaSourceError::Kafka {
                        action: "consume".into(),
                        source: KafkaError::MessageConsumptionFatal(code),
                    });
                }
                Err(e) => {
                    let context = consumer.context();
                    context.reach.error(e.to_string());
                    context.warn.warn(format_args!("kafka source: {e}"));
                }
            },
        }
    };
    release(consumer);
    result
}

/// Drops a consumer reference. Dropping the last one closes the consumer (leaving the group),
/// which blocks, so that happens on a blocking thread when a runtime is at hand.
pub(crate) fn release(consumer: Arc<KafkaConsumer>) {
    if Arc::strong_count(&consumer) > 1 {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn_blocking(move || drop(consumer));
        }
        Err(_) => drop(consumer),
    }
}

/// Manual assignment: which partitions this process reads.
pub(crate) struct Manual {
    index: u32,
    count: u32,
    topics: Vec<String>,
    assigned: HashSet<(String, i32)>,
    /// Topics already reported missing (logged once).
    missing: HashSet<String>,
}

impl Manual {
    pub(crate) fn new(index: u32, count: u32, topics: Vec<String>) -> Self {
        Manual {
            index,
            count,
            topics,
            assigned: HashSet::new(),
            missing: HashSet::new(),
        }
    }

    /// Whether partition `p` is this process's.
    pub(crate) fn owns(&self, partition: i32) -> bool {
        u32::try_from(partition).is_ok_and(|p| p % self.count == self.index)
    }

    /// Reads topic metadata and assigns partitions of this process not assigned yet (at start,
    /// and later for partitions added to a topic). Blocking.
    pub(crate) fn refresh(&mut self, consumer: &KafkaConsumer) -> Result<usize, KafkaSourceError> {
        let mut add = TopicPartitionList::new();
        for topic in &self.topics {
            let md = consumer
                .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
                .map_err(|e| KafkaSourceError::kafka(format!("read the metadata of topic {topic}"), e))?;
            let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
                continue;
            };
            if let Some(err) = t.error() {
                if self.missing.insert(topic.clone()) {
                    tracing::warn!(
                        "kafka source: topic {topic} unavailable ({:?}); retrying every {}s",
                        RDKafkaErrorCode::from(err),
                        REFRESH_EVERY_TICKS * LAG_INTERVAL.as_secs()
                    );
                }
                continue;
            }
            self.missing.remove(topic);
            for p in t.partitions() {
                let tp = (topic.clone(), p.id());
                if self.owns(p.id()) && !self.assigned.contains(&tp) {
                    add.add_partition_offset(topic, p.id(), Offset::Stored)
                        .map_err(|e| KafkaSourceError::kafka(format!("assign {topic}/{}", p.id()), e))?;
                }
            }
        }
        if add.count() == 0 {
            return Ok(0);
        }
        consumer.context().apply_start_offsets(consumer, &mut add);
        consumer
            .incremental_assign(&add)
            .map_err(|e| KafkaSourceError::kafka(format!("assign {}", describe(&add)), e))?;
        tracing::info!(
            "kafka source: assigned {} (partitions p % {} == {})",
            describe(&add),
            self.count,
            self.index
        );
        for e in add.elements() {
            self.assigned.insert((e.topic().to_string(), e.partition()));
        }
        Ok(add.count())
    }
}

/// The assigned partitions, and `(topic, partition, lag)` of those whose watermarks could be
/// read: high watermark − position. A partition nothing was read from yet counts from its
/// committed offset, or else from where `auto.offset.reset` starts it. Blocking.
type LagSnapshot = (Vec<(String, i32)>, Vec<(String, i32, i64)>);

fn lag_snapshot(consumer: &KafkaConsumer, reset_earliest: bool, stop: &watch::Receiver<bool>) -> Option<LagSnapshot> {
    let position = match consumer.position() {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!("kafka source: no position for lag: {e}");
            return None;
        }
    };
    let assigned = position
        .elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect();
    let mut known: Vec<(String, i32, Option<i64>)> = Vec::new();
    let mut unknown = TopicPartitionList::new();
    for e in position.elements() {
        match e.offset() {
            Offset::Offset(o) => known.push((e.topic().to_string(), e.partition(), Some(o))),
            _ => {
                unknown.add_partition(e.topic(), e.partition());
            }
        }
    }
    if unknown.count() > 0 {
        let committed = consumer
            .committed_offsets(unknown.clone(), LAG_TIMEOUT)
            .unwrap_or(unknown);
        for e in committed.elements() {
            let at = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            known.push((e.topic().to_string(), e.partition(), at));
        }
    }
    let mut out = Vec::with_capacity(known.len());
    for (topic, partition, at) in known {
        if *stop.borrow() {
            return None;
        }
        match consumer.fetch_watermarks(&topic, partition, LAG_TIMEOUT) {
            Ok((low, high)) => {
                let from = at.unwrap_or(if reset_earliest { low } else { high });
                out.push((topic, partition, (high - from.max(low)).max(0)));
            }
            Err(e) => tracing::debug!("kafka source: no watermarks of {topic}/{partition}: {e}"),
        }
    }
    Some((assigned, out))
}

/// Every second: lag gauges `llamaflow_kafka_lag{topic,partition}`; under manual assignment,
/// every ten seconds (and every second while nothing is assigned), partition discovery.
pub(crate) async fn monitor(
    consumer: Arc<KafkaConsumer>,
    manual: Option<Arc<Mutex<Manual>>>,
    reset_earliest: bool,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(LAG_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported: HashSet<(String, i32)> = HashSet::new();
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        n += 1;
        let c = consumer.clone();
        let m = manual.clone();
        let stopping = stop.clone();
        let work = tokio::task::spawn_blocking(move || {
            if let Some(m) = m {
                let mut m = m.lock().unwrap_or_else(PoisonError::into_inner);
                if (n.is_multiple_of(REFRESH_EVERY_TICKS) || m.assigned.is_empty())
                    && let Err(e) = m.refresh(&c)
                {
                    tracing::warn!("kafka source: partition discovery failed: {e}");
                }
            }
            lag_snapshot(&c, reset_earliest, &stopping)
        });
        // Awaited even when stopping (it checks the flag between requests): the consumer is
        // closed only once nothing uses it.
        let snapshot = work.await.ok().flatten();
        if *stop.borrow() {
            break;
        }
        let Some((assigned, lags)) = snapshot else { continue };
        for (topic, partition, lag) in lags {
            metrics::gauge!("llamaflow_kafka_lag", "topic" => topic, "partition" => partition.to_string())
                .set(lag as f64);
        }
        let now: HashSet<(String, i32)> = assigned.into_iter().collect();
        // Partitions no longer assigned here: their lag is reported by their new owner.
        for (topic, partition) in reported.difference(&now) {
            metrics::gauge!("llamaflow_kafka_lag", "topic" => topic.clone(), "partition" => partition.to_string())
                .set(0.0);
        }
        reported = now;
    }
    release(consumer);
}
