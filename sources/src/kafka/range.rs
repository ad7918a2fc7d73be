//! Bounded reads of Kafka topics over a time range (`llamaflow export` / `replay` with
//! `--kafka-brokers --kafka-from --kafka-to`): history, not a live stream.
//!
//! For every partition of the configured topics, the range `[from, to)` of message timestamps
//! becomes an offset range: the start is the first offset whose timestamp is ≥ `from`
//! (`offsetsForTimes`), the end the first offset whose timestamp is ≥ `to`, or the high
//! watermark at open time (so a read always ends, even while producers keep writing). Each
//! partition is one [`RangeSource`] — an iterator of [`Input`]s in partition order — so the
//! caller can merge partitions by event time like files. Messages inside the offset range whose
//! own timestamp falls outside `[from, to)` (producers setting CreateTime out of order) are
//! skipped and counted. Values are decoded like the live source's (SPEC JSON or DynamoDB JSON,
//! dead letters at `topic/partition@offset`); tombstones are skipped. Nothing is committed.
//!
//! A broker that cannot look offsets up by time (it answers "end" for a timestamp although the
//! partition's last message is at or after it, as librdkafka's mock cluster does) is read from
//! the partition's start, filtering by timestamp.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use schemas::{Kind, Millis, SourceName, SourcePos};

use super::KafkaSourceError;
use super::consumer::log_librdkafka;
use super::decode::decode;
use crate::Input;
use crate::live::Change;

/// Timeout of metadata, watermark and offset look-ups.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// One poll of a partition queue.
const POLL: Duration = Duration::from_millis(100);

/// What to read.
#[derive(Clone, Debug)]
pub struct KafkaRangeConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Topic of each record kind (see [`super::default_topics`]); missing topics are skipped
    /// with a warning.
    pub topics: BTreeMap<Kind, String>,
    /// First message timestamp included (unix ms); `None`: each partition's start.
    pub from_ms: Option<Millis>,
    /// First message timestamp excluded (unix ms); `None`: up to the high watermark at open.
    pub to_ms: Option<Millis>,
    /// A partition that delivers nothing for this long before its end fails the read.
    pub idle_timeout: Duration,
    /// Further librdkafka settings (e.g. `security.protocol`).
    pub extra: BTreeMap<String, String>,
}

impl KafkaRangeConfig {
    /// A range over the default topics of `brokers`.
    pub fn new(brokers: impl Into<String>, from_ms: Option<Millis>, to_ms: Option<Millis>) -> Self {
        KafkaRangeConfig {
            brokers: brokers.into(),
            topics: super::default_topics(),
            from_ms,
            to_ms,
            idle_timeout: Duration::from_secs(60),
            extra: BTreeMap::new(),
        }
    }
}

/// The offsets one partition is read between.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionRange {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// First offset read.
    pub start: i64,
    /// First offset not read.
    pub end: i64,
}

/// Shared state of a range read: the first error and counters.
#[derive(Debug, Default)]
pub struct RangeStatus {
    error: Mutex<Option<String>>,
    skipped: AtomicU64,
    messages: AtomicU64,
}

impl RangeStatus {
    fn fail(&self, e: String) {
        tracing::error!("kafka range: {e}");
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(e);
    }

    /// `Err` when a partition could not be read to its end (its iterator stopped early).
    pub fn result(&self) -> Result<(), KafkaSourceError> {
        match self.error.lock().unwrap_or_else(PoisonError::into_inner).clone() {
            Some(e) => Err(KafkaSourceError::Range(e)),
            None => Ok(()),
        }
    }

    /// Messages skipped: timestamp outside the range, tombstones, DynamoDB items of no use.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Messages read (in the offset ranges).
    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
}

/// librdkafka callbacks: logs to `tracing`.
pub struct RangeContext;

impl ClientContext for RangeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_librdkafka("kafka range", level, fac, log_message);
    }
}

impl ConsumerContext for RangeContext {}

type RangeConsumer = BaseConsumer<RangeContext>;

/// An opened range read: one source per non-empty partition.
pub struct KafkaRange {
    /// The partitions and offsets read (empty ones included, with `start == end`).
    pub partitions: Vec<PartitionRange>,
    /// One iterator per non-empty partition.
    pub sources: Vec<RangeSource>,
    /// Errors and counters; check [`RangeStatus::result`] once the sources are drained.
    pub status: Arc<RangeStatus>,
}

fn consumer(cfg: &KafkaRangeConfig) -> Result<Arc<RangeConsumer>, KafkaSourceError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", "llamaflow-export")
        .set("client.id", "llamaflow-export")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .set("queued.max.messages.kbytes", "16384");
    for (k, v) in &cfg.extra {
        c.set(k, v);
    }
    c.create_with_context(RangeContext)
        .map(Arc::new)
        .map_err(|e| KafkaSourceError::kafka("create the consumer", e))
}

/// Looks up every partition's offset range and opens a source per non-empty one. Blocking.
pub fn open_range(cfg: &KafkaRangeConfig) -> Result<KafkaRange, KafkaSourceError> {
    if cfg.brokers.trim().is_empty() {
        return Err(KafkaSourceError::Config("`brokers` is empty".into()));
    }
    if let (Some(f), Some(t)) = (cfg.from_ms, cfg.to_ms)
        && f >= t
    {
        return Err(KafkaSourceError::Config(format!(
            "the time range is empty: from {f} ms is not before to {t} ms"
        )));
    }
    let consumer = consumer(cfg)?;
    let mut kinds: BTreeMap<String, Kind> = BTreeMap::new();
    // (topic, partition) → (low, high)
    let mut parts: Vec<(String, i32, i64, i64)> = Vec::new();
    for (kind, topic) in &cfg.topics {
        let md = consumer
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .map_err(|e| KafkaSourceError::kafka(format!("read the metadata of topic {topic}"), e))?;
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            continue;
        };
        if t.error().is_some() || t.partitions().is_empty() {
            tracing::warn!("kafka range: topic {topic} ({}) not found; skipped", kind.name());
            continue;
        }
        kinds.insert(topic.clone(), *kind);
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), REQUEST_TIMEOUT)
                .map_err(|e| KafkaSourceError::kafka(format!("read the watermarks of {topic}/{}", p.id()), e))?;
            parts.push((topic.clone(), p.id(), low, high));
        }
    }
    if kinds.is_empty() {
        let names: Vec<&str> = cfg.topics.values().map(String::as_str).collect();
        return Err(KafkaSourceError::Config(format!(
            "none of the topics exists: {}",
            names.join(", ")
        )));
    }
    parts.sort();
    let starts = lookup(&consumer, &parts, cfg.from_ms)?;
    let ends = lookup(&consumer, &parts, cfg.to_ms)?;
    let mut ranges = Vec::with_capacity(parts.len());
    let mut probe = Vec::new();
    for (i, (topic, partition, low, high)) in parts.iter().enumerate() {
        let start = match (cfg.from_ms, starts[i]) {
            (None, _) => *low,
            (Some(_), Some(o)) => o.max(*low),
            // "No message at or after `from`" — unless the broker cannot look up by time.
            (Some(_), None) => {
                if high > low {
                    probe.push(i);
                }
                *high
            }
        };
        let end = match ends[i] {
            Some(o) if cfg.to_ms.is_some() => o.clamp(*low, *high),
            _ => *high,
        };
        ranges.push(PartitionRange {
            topic: topic.clone(),
            partition: *partition,
            start,
            end,
        });
    }
    if let Some(from) = cfg.from_ms
        && !probe.is_empty()
    {
        let last = last_timestamps(cfg, &parts, &probe)?;
        for (i, ts) in probe.into_iter().zip(last) {
            if ts.is_some_and(|t| t >= from) {
                let r = &mut ranges[i];
                tracing::warn!(
                    "kafka range: the broker found no offset for {from} ms in {}/{} although its last message is \
                     later; reading the partition from its start",
                    r.topic,
                    r.partition
                );
                r.start = parts[i].2;
            }
        }
    }
    let status = Arc::new(RangeStatus::default());
    let mut tpl = TopicPartitionList::new();
    for r in ranges.iter().filter(|r| r.start < r.end) {
        tpl.add_partition_offset(&r.topic, r.partition, Offset::Offset(r.start))
            .map_err(|e| KafkaSourceError::kafka(format!("assign {}/{}", r.topic, r.partition), e))?;
    }
    let mut sources = Vec::new();
    if tpl.count() > 0 {
        consumer
            .assign(&tpl)
            .map_err(|e| KafkaSourceError::kafka("assign the partitions", e))?;
        let mut queues = Vec::new();
        for r in ranges.iter().filter(|r| r.start < r.end) {
            let queue = consumer.split_partition_queue(&r.topic, r.partition).ok_or_else(|| {
                KafkaSourceError::Range(format!("cannot read {}/{} on its own queue", r.topic, r.partition))
            })?;
            queues.push((r, queue));
        }
        // Messages fetched between the assignment and the split wait on the main queue; they
        // precede everything on the partition's own queue.
        let early: Stash = Arc::default();
        {
            let mut stash = early.lock().unwrap_or_else(PoisonError::into_inner);
            while let Some(m) = consumer.poll(Duration::ZERO) {
                match m {
                    Ok(m) => stash
                        .entry((m.topic().to_string(), m.partition()))
                        .or_default()
                        .push_back(m.detach()),
                    Err(e) => tracing::debug!("kafka range: {e}"),
                }
            }
        }
        for (r, queue) in queues {
            let kind = kinds.get(&r.topic).copied().unwrap_or(Kind::Price);
            sources.push(RangeSource {
                consumer: consumer.clone(),
                queue,
                early: early.clone(),
                key: (r.topic.clone(), r.partition),
                last: r.start - 1,
                kind,
                name: SourceName::from(format!("{}/{}@", r.topic, r.partition)),
                end: r.end,
                from: cfg.from_ms,
                to: cfg.to_ms,
                idle_timeout: cfg.idle_timeout,
                done: false,
                status: status.clone(),
            });
        }
    }
    Ok(KafkaRange {
        partitions: ranges,
        sources,
        status,
    })
}

/// `offsetsForTimes` of `ts` for every partition: `Some(offset)`, or `None` when the broker
/// answers "end" (no message at or after `ts`) or `ts` is `None`.
fn lookup(
    consumer: &RangeConsumer,
    parts: &[(String, i32, i64, i64)],
    ts: Option<Millis>,
) -> Result<Vec<Option<i64>>, KafkaSourceError> {
    let Some(ts) = ts else {
        return Ok(vec![None; parts.len()]);
    };
    let mut q = TopicPartitionList::with_capacity(parts.len());
    for (topic, p, _, _) in parts {
        q.add_partition_offset(topic, *p, Offset::Offset(ts))
            .map_err(|e| KafkaSourceError::kafka(format!("look up {topic}/{p} at {ts} ms"), e))?;
    }
    let found = consumer
        .offsets_for_times(q, REQUEST_TIMEOUT)
        .map_err(|e| KafkaSourceError::kafka(format!("look up offsets for {ts} ms"), e))?;
    Ok(parts
        .iter()
        .map(|(topic, p, _, _)| {
            found.find_partition(topic, *p).and_then(|e| match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            })
        })
        .collect())
}

/// The timestamps of the last messages of `parts[probe]` (a separate consumer reads offset
/// `high - 1` of each).
fn last_timestamps(
    cfg: &KafkaRangeConfig,
    parts: &[(String, i32, i64, i64)],
    probe: &[usize],
) -> Result<Vec<Option<Millis>>, KafkaSourceError> {
    let consumer = consumer(cfg)?;
    let mut tpl = TopicPartitionList::new();
    for &i in probe {
        let (topic, p, _, high) = &parts[i];
        tpl.add_partition_offset(topic, *p, Offset::Offset(high - 1))
            .map_err(|e| KafkaSourceError::kafka(format!("assign {topic}/{p}"), e))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| KafkaSourceError::kafka("assign the partitions to probe", e))?;
    let mut found: BTreeMap<(String, i32), Option<Millis>> = BTreeMap::new();
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    while found.len() < probe.len() {
        if Instant::now() > deadline {
            return Err(KafkaSourceError::Range(format!(
                "timed out reading the last message of {} partition(s)",
                probe.len() - found.len()
            )));
        }
        match consumer.poll(POLL) {
            Some(Ok(m)) => {
                let high = parts
                    .iter()
                    .find(|(t, p, _, _)| t == m.topic() && *p == m.partition())
                    .map_or(i64::MAX, |x| x.3);
                if m.offset() >= high - 1 {
                    found.insert((m.topic().to_string(), m.partition()), m.timestamp().to_millis());
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => tracing::debug!("kafka range: probe EOF on partition {p}"),
            Some(Err(e)) => tracing::warn!("kafka range: probe: {e}"),
            None => {}
        }
    }
    Ok(probe
        .iter()
        .map(|&i| found.get(&(parts[i].0.clone(), parts[i].1)).copied().flatten())
        .collect())
}

/// The messages of one partition's range, as inputs, in offset order.
pub struct RangeSource {
    consumer: Arc<RangeConsumer>,
    queue: rdkafka::consumer::base_consumer::PartitionQueue<RangeContext>,
    /// Messages that reached the main queue (before the partitions' queues were split off).
    early: Stash,
    key: (String, i32),
    /// Offset of the last message taken.
    last: i64,
    kind: Kind,
    name: SourceName,
    end: i64,
    from: Option<Millis>,
    to: Option<Millis>,
    idle_timeout: Duration,
    done: bool,
    status: Arc<RangeStatus>,
}

/// Messages per partition that arrived on the consumer's main queue.
type Stash = Arc<Mutex<BTreeMap<(String, i32), VecDeque<OwnedMessage>>>>;

/// What one message gives.
#[allow(
    clippy::large_enum_variant,
    reason = "short-lived return value; boxing would allocate per message"
)]
enum Step {
    Emit(Input),
    Skip,
    End,
}

impl RangeSource {
    fn stop(&mut self, error: Option<String>) -> Option<Input> {
        self.done = true;
        if let Some(e) = error {
            self.status.fail(format!("{}: {e}", self.name.trim_end_matches('@')));
        }
        None
    }

    /// Decodes one message of the partition (see the module docs for what is skipped).
    fn take(&mut self, msg: &impl Message) -> Step {
        let offset = msg.offset();
        if offset <= self.last {
            self.status.fail(format!(
                "{}: offset {offset} arrived after {} (out of order)",
                self.name.trim_end_matches('@'),
                self.last
            ));
            return Step::End;
        }
        self.last = offset;
        if offset >= self.end {
            return Step::End;
        }
        if offset + 1 >= self.end {
            self.done = true;
        }
        self.status.messages.fetch_add(1, Ordering::Relaxed);
        let ts = msg.timestamp().to_millis();
        let inside = ts.is_none_or(|t| self.from.is_none_or(|f| t >= f) && self.to.is_none_or(|to| t < to));
        if !inside {
            self.status.skipped.fetch_add(1, Ordering::Relaxed);
            return Step::Skip;
        }
        let pos = SourcePos::new(self.name, u64::try_from(offset).unwrap_or_default());
        match decode(self.kind, &pos, msg.key(), msg.payload()) {
            Ok(Change::Record(r)) => Step::Emit(Input::Record(pos, r)),
            Ok(Change::Dead(d)) => Step::Emit(Input::Dead(d)),
            Ok(_) | Err(_) => {
                self.status.skipped.fetch_add(1, Ordering::Relaxed);
                Step::Skip
            }
        }
    }
}

impl Iterator for RangeSource {
    type Item = Input;

    fn next(&mut self) -> Option<Input> {
        let mut idle_since = Instant::now();
        while !self.done {
            let early = {
                let mut stash = self.early.lock().unwrap_or_else(PoisonError::into_inner);
                stash.get_mut(&self.key).and_then(VecDeque::pop_front)
            };
            if let Some(m) = early {
                match self.take(&m) {
                    Step::Emit(i) => return Some(i),
                    Step::Skip => continue,
                    Step::End => return self.stop(None),
                }
            }
            // Serve the main queue (errors, logs); a message still found there goes to the
            // stash of its partition.
            match self.consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => {
                    let m = m.detach();
                    let mut stash = self.early.lock().unwrap_or_else(PoisonError::into_inner);
                    stash
                        .entry((m.topic().to_string(), m.partition()))
                        .or_default()
                        .push_back(m);
                    continue;
                }
                Some(Err(e)) => tracing::warn!("kafka range: {e}"),
                None => {}
            }
            let step = match self.queue.poll(POLL) {
                None => {
                    if idle_since.elapsed() > self.idle_timeout {
                        let e = format!("no message for {:?} before offset {}", self.idle_timeout, self.end);
                        return self.stop(Some(e));
                    }
                    continue;
                }
                // The end of the log: everything before `end` (≤ the high watermark) was read.
                Some(Err(KafkaError::PartitionEOF(_))) => Step::End,
                Some(Err(e)) => {
                    tracing::warn!("kafka range: {}: {e}", self.name.trim_end_matches('@'));
                    continue;
                }
                Some(Ok(m)) => {
                    let m = m.detach();
                    self.take(&m)
                }
            };
            idle_since = Instant::now();
            match step {
                Step::Emit(i) => return Some(i),
                Step::Skip => {}
                Step::End => return self.stop(None),
            }
        }
        None
    }
}
