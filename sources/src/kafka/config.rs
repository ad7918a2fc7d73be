//! Configuration of the Kafka source (`[kafka]` / `[sources.kafka]` in `llamaflow.toml`).

use std::collections::{BTreeMap, HashMap};

use rdkafka::ClientConfig;
use schemas::Kind;
use serde::{Deserialize, Deserializer};

use super::KafkaSourceError;

/// Settings of the Kafka source.
///
/// ```toml
/// brokers = "kafka-1:9092,kafka-2:9092"
/// group_id = "llamaflow"
/// topics = { prices = "defillama-prices", protocols = "protocols" }  # merged over the defaults
/// assignment = [0, 2]          # this process reads partitions p with p % 2 == 0
/// start_from_timestamp_ms = 1717430400000
/// extra = { "security.protocol" = "ssl" }
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list. Default `localhost:9092`.
    pub brokers: String,
    /// Consumer group whose committed offsets are the source's checkpoint. Default `llamaflow`.
    pub group_id: String,
    /// Topic of each record kind. Defaults: prices→`prices`, tvl→`tvl`, transfers→`transfers`,
    /// gas→`gas`, liquidations→`liquidations`; protocols and rules have no topic unless set.
    /// Keys are kind names (`prices`/`price`, `tvl`, `transfers`/`transfer`, `gas`,
    /// `liquidations`/`liquidation`, `protocols`/`protocol`, `rules`/`rule`); entries given in
    /// the config replace the default of their kind, and an empty topic name disables a kind.
    #[serde(deserialize_with = "deserialize_topics")]
    pub topics: BTreeMap<Kind, String>,
    /// `(index, count)`: consume only partitions `p` with `p % count == index`, by manual
    /// assignment (multi-process scale-out; every process uses the same `count`, `group_id` is
    /// then only where offsets are committed and must not be shared with subscribing
    /// consumers). `None` (default): subscribe with group management.
    pub assignment: Option<(u32, u32)>,
    /// `session.timeout.ms` of the group membership. Default 6000.
    pub session_timeout_ms: u32,
    /// Where a partition without a committed offset starts: `earliest` (default: nothing
    /// already in the topic is skipped on first deployment) or `latest`.
    pub auto_offset_reset: String,
    /// Backfill: the first time this process is assigned a partition, start at the first
    /// message with a timestamp ≥ this (unix ms, Kafka `offsetsForTimes`) instead of the
    /// committed offset. Remove it once the backfill is done, or every restart seeks again.
    pub start_from_timestamp_ms: Option<i64>,
    /// Further librdkafka settings, passed through (e.g. `security.protocol`, `fetch.max.bytes`).
    /// `enable.auto.commit` and `enable.auto.offset.store` cannot be turned on: only what the
    /// pipeline reports as durable is ever committed.
    pub extra: BTreeMap<String, String>,
    /// Set by the pipeline from its checkpoint (not configurable): the next offset to read per
    /// (topic, partition). On first assignment these partitions start there, whatever the
    /// committed offset or `start_from_timestamp_ms` say.
    #[serde(skip)]
    pub resume_offsets: BTreeMap<(String, i32), i64>,
}

impl Default for KafkaSourceConfig {
    fn default() -> Self {
        KafkaSourceConfig {
            brokers: "localhost:9092".into(),
            group_id: "llamaflow".into(),
            topics: default_topics(),
            assignment: None,
            session_timeout_ms: 6000,
            auto_offset_reset: "earliest".into(),
            start_from_timestamp_ms: None,
            extra: BTreeMap::new(),
            resume_offsets: BTreeMap::new(),
        }
    }
}

/// The default topic of each kind that has one.
pub fn default_topics() -> BTreeMap<Kind, String> {
    [
        (Kind::Price, "prices"),
        (Kind::Tvl, "tvl"),
        (Kind::Transfer, "transfers"),
        (Kind::Gas, "gas"),
        (Kind::Liquidation, "liquidations"),
    ]
    .into_iter()
    .map(|(k, t)| (k, t.to_string()))
    .collect()
}

fn deserialize_topics<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<Kind, String>, D::Error> {
    let given = BTreeMap::<String, String>::deserialize(d)?;
    let mut topics = default_topics();
    for (name, topic) in given {
        let kind = Kind::parse(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown record kind `{name}` in `topics` (expected prices, tvl, transfers, gas, liquidations, \
                 protocols or rules)"
            ))
        })?;
        let topic = topic.trim();
        if topic.is_empty() {
            topics.remove(&kind);
        } else {
            topics.insert(kind, topic.to_string());
        }
    }
    Ok(topics)
}

/// Settings the source relies on; `extra` may not change them.
const FIXED: [(&str, &str); 2] = [("enable.auto.commit", "false"), ("enable.auto.offset.store", "false")];

impl KafkaSourceConfig {
    /// Checks the settings and returns topic → kind.
    pub(crate) fn validate(&self) -> Result<HashMap<String, Kind>, KafkaSourceError> {
        let bad = |m: String| Err(KafkaSourceError::Config(m));
        if self.brokers.trim().is_empty() {
            return bad("`brokers` is empty".into());
        }
        if self.group_id.trim().is_empty() {
            return bad("`group_id` is empty".into());
        }
        if let Some((index, count)) = self.assignment
            && (count == 0 || index >= count)
        {
            return bad(format!(
                "`assignment` = [{index}, {count}]: need count > 0 and index < count"
            ));
        }
        if !matches!(self.auto_offset_reset.as_str(), "earliest" | "latest") {
            return bad(format!(
                "`auto_offset_reset` = `{}`: expected `earliest` or `latest`",
                self.auto_offset_reset
            ));
        }
        if self.session_timeout_ms == 0 {
            return bad("`session_timeout_ms` must be > 0".into());
        }
        if let Some(ts) = self.start_from_timestamp_ms
            && ts < 0
        {
            return bad(format!("`start_from_timestamp_ms` = {ts}: must be ≥ 0"));
        }
        for (key, value) in FIXED {
            if let Some(v) = self.extra.get(key)
                && v != value
            {
                return bad(format!(
                    "`extra.{key}` = `{v}`: the source commits only what the pipeline made durable; leave it unset"
                ));
            }
        }
        let mut by_topic = HashMap::new();
        for (kind, topic) in &self.topics {
            if topic.trim().is_empty() {
                return bad(format!("`topics.{}` is empty", kind.name()));
            }
            if let Some(other) = by_topic.insert(topic.clone(), *kind) {
                return bad(format!(
                    "topic `{topic}` is configured for both {} and {}",
                    other.name(),
                    kind.name()
                ));
            }
        }
        if by_topic.is_empty() {
            return bad("no topics configured".into());
        }
        Ok(by_topic)
    }

    /// The librdkafka consumer configuration.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (self.session_timeout_ms / 3).max(1).to_string(),
            )
            .set("auto.offset.reset", &self.auto_offset_reset)
            // Resuming a partition paused by backpressure waits for the in-flight fetch of the
            // others; librdkafka's default 500 ms would be a stall each time.
            .set("fetch.wait.max.ms", "100")
            .set("client.id", format!("llamaflow-source-{}", self.group_id));
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        for (k, v) in FIXED {
            c.set(k, v);
        }
        c
    }
}
