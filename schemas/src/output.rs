//! Output shapes: alerts (SPEC §2), market events (SPEC §3), dead letters (SPEC §1).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use sha2::{Digest, Sha256};

use crate::time::{Millis, ser_seconds};

/// Where a record came from: `file:line`, `topic/partition@offset` or `table@lsn`.
///
/// `source` carries everything up to and including the separator (`prices.jsonl:`,
/// `prices/3@`), so a position is a source's name plus a number.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
pub struct SourcePos {
    /// Source name with its separator.
    pub source: SourceName,
    /// Line number, offset or LSN.
    pub offset: u64,
}

impl SourcePos {
    /// A position in a named source.
    pub fn new(source: SourceName, offset: u64) -> Self {
        SourcePos { source, offset }
    }
}

/// The name of a source with its separator ([`SourcePos::source`]), held once per process:
/// a copyable reference, not a counted one. Every record carries its position from the
/// thread that read it to the worker that drops it, and a shared count would bounce between
/// their cores on every record. Names are never freed: a process names a few sources (one
/// per file, partition or table it reads), each once.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceName(&'static str);

impl SourceName {
    /// The name `name`, stored the first time it is seen. Each thread remembers the last name
    /// it asked for, so a run of positions of one source (read back from a checkpoint or
    /// another process) takes no lock.
    pub fn new(name: &str) -> SourceName {
        static NAMES: std::sync::Mutex<BTreeSet<&'static str>> = std::sync::Mutex::new(BTreeSet::new());
        thread_local! {
            static LAST: std::cell::Cell<Option<SourceName>> = const { std::cell::Cell::new(None) };
        }
        if let Some(last) = LAST.get()
            && last.0 == name
        {
            return last;
        }
        // A poisoned lock only means another thread panicked while holding it: the set is
        // still whole (an insert is the only change).
        let mut names = NAMES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let found = match names.get(name) {
            Some(known) => SourceName(known),
            None => {
                let leaked: &'static str = Box::leak(name.into());
                names.insert(leaked);
                SourceName(leaked)
            }
        };
        LAST.set(Some(found));
        found
    }

    /// The name.
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl std::ops::Deref for SourceName {
    type Target = str;
    fn deref(&self) -> &str {
        self.0
    }
}

impl From<&str> for SourceName {
    fn from(name: &str) -> Self {
        SourceName::new(name)
    }
}

impl From<String> for SourceName {
    fn from(name: String) -> Self {
        SourceName::new(&name)
    }
}

impl fmt::Display for SourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for SourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

impl Serialize for SourceName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

impl<'de> serde::Deserialize<'de> for SourceName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(SourceName::new(&name))
    }
}

impl fmt::Display for SourcePos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.source, self.offset)
    }
}

/// A rejected input: written to the dead-letter output, never dropped silently.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// `file:line`, `topic/partition@offset` or `table@lsn`.
    pub source: String,
    /// What was wrong.
    pub reason: String,
    /// The input, truncated to 4 KiB.
    pub raw: String,
}

impl DeadLetter {
    /// Builds a dead letter, truncating `raw` to 4 KiB and `reason` to 1 KiB (a reason may
    /// quote the input).
    pub fn new(source: impl fmt::Display, reason: impl Into<String>, raw: &str) -> Self {
        let mut reason = reason.into();
        if reason.len() > MAX_REASON {
            let mut end = MAX_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
            reason.push('…');
        }
        DeadLetter {
            source: source.to_string(),
            reason,
            raw: truncate_raw(raw).to_string(),
        }
    }

    /// The metric label for this reason (`late`, `invalid`, …): the reason up to its first colon.
    pub fn reason_label(&self) -> &str {
        if self.reason == "late" {
            "late"
        } else if self.reason.starts_with("invalid rule") {
            "invalid_rule"
        } else if self.reason.starts_with("bad JSON") || self.reason.starts_with("not a JSON") {
            "bad_json"
        } else {
            "invalid"
        }
    }
}

/// Longest dead-letter reason kept, in bytes (then `…`).
const MAX_REASON: usize = 1024;

/// Truncates to at most 4 KiB on a char boundary.
pub fn truncate_raw(raw: &str) -> &str {
    const MAX: usize = 4096;
    if raw.len() <= MAX {
        return raw;
    }
    let mut end = MAX;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    &raw[..end]
}

/// A fired alert: the record every sink carries.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Alert {
    /// Deterministic id (32 hex chars), the sinks' idempotency key.
    pub alert_id: String,
    /// Rule that fired.
    pub rule_id: String,
    /// Owner of the rule.
    pub user_id: String,
    /// Alert type name.
    pub alert_type: String,
    /// Coin, protocol or chain the alert is about.
    pub subject: String,
    /// Event time of the triggering record (unix seconds).
    #[serde(serialize_with = "ser_seconds", deserialize_with = "de_seconds")]
    pub triggered_at: Millis,
    /// pct for *_change, price/gwei for threshold/depeg/gas, USD for whale/liquidation.
    pub value: f64,
    /// The rule's threshold.
    pub threshold: f64,
    /// Human-readable summary.
    pub message: String,
    /// Delivery channels of the rule.
    pub channels: Vec<String>,
    /// Webhook target, when any.
    pub webhook_url: Option<String>,
}

fn de_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Millis, D::Error> {
    // As `ser_seconds` writes it: milliseconds in binary forms, seconds in JSON.
    if !d.is_human_readable() {
        return <Millis as serde::Deserialize>::deserialize(d);
    }
    let s = <f64 as serde::Deserialize>::deserialize(d)?;
    crate::time::seconds_to_millis(s).ok_or_else(|| serde::de::Error::custom("bad timestamp"))
}

/// Computes the deterministic `alert_id`: the first 128 bits of
/// SHA-256(rule_id, subject, triggered_at in ms, the triggering record's identity), as hex.
pub fn alert_id(rule_id: &str, subject: &str, triggered_at: Millis, record_identity: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        rule_id.as_bytes(),
        subject.as_bytes(),
        &triggered_at.to_be_bytes(),
        record_identity.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    hex::encode(&h.finalize()[..16])
}

/// Payload of a market event.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EventData {
    /// Every accepted price tick.
    PriceUpdate {
        /// Coin id.
        coin: String,
        /// USD price.
        price: f64,
        /// Symbol, when known.
        symbol: Option<String>,
        /// Confidence, when known.
        confidence: Option<f64>,
        /// Decimals, when known.
        decimals: Option<u32>,
        /// Event time.
        #[serde(serialize_with = "ser_seconds")]
        timestamp: Millis,
        /// Percent change over 1h, when a reference tick exists.
        change_1h: Option<f64>,
        /// Percent change over 24h, when a reference tick exists.
        change_24h: Option<f64>,
    },
    /// A protocol's TVL after an update (like DeFiLlama's /protocols entry).
    TvlUpdate {
        /// Protocol id.
        protocol_id: String,
        /// Protocol name, when known.
        name: Option<String>,
        /// Total TVL over chains.
        tvl: f64,
        /// Latest TVL per chain.
        #[serde(rename = "chainTvls")]
        chain_tvls: BTreeMap<String, f64>,
        /// Sub-buckets (staking, pool2, borrowed, …) not counted in TVL.
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        extra: BTreeMap<String, f64>,
        /// Percent change of the total over 1h.
        change_1h: Option<f64>,
        /// Over 1 day.
        change_1d: Option<f64>,
        /// Over 7 days.
        change_7d: Option<f64>,
        /// Event time.
        #[serde(serialize_with = "ser_seconds")]
        timestamp: Millis,
    },
    /// A stablecoin entered or left its depeg band.
    Depeg {
        /// Coin id.
        coin: String,
        /// Symbol, when known.
        symbol: Option<String>,
        /// Price at the crossing.
        price: f64,
        /// Peg.
        peg: f64,
        /// |p/peg − 1|·100.
        deviation_pct: f64,
        /// `enter` or `exit`.
        state: &'static str,
        /// Event time.
        #[serde(serialize_with = "ser_seconds")]
        timestamp: Millis,
    },
    /// A transfer worth at least the whale threshold.
    WhaleTransfer {
        /// Chain.
        chain: String,
        /// Transaction hash.
        tx_hash: String,
        /// Coin id.
        coin: String,
        /// Symbol, when known.
        symbol: Option<String>,
        /// Sender.
        from: Option<String>,
        /// Recipient.
        to: Option<String>,
        /// Token units.
        amount: f64,
        /// USD value at the latest earlier price.
        value_usd: f64,
        /// Event time.
        #[serde(serialize_with = "ser_seconds")]
        timestamp: Millis,
    },
    /// A liquidation.
    Liquidation {
        /// Protocol id.
        protocol_id: String,
        /// Chain.
        chain: String,
        /// Account.
        account: Option<String>,
        /// USD amount.
        amount_usd: f64,
        /// Event time.
        #[serde(serialize_with = "ser_seconds")]
        timestamp: Millis,
    },
    /// A chain's TVL summed over protocols changed in an epoch (SPEC §3, §8).
    ChainTvlUpdate {
        /// Chain key (`ethereum`).
        chain: String,
        /// Display name (`Ethereum`), or the key when not in the shipped table.
        name: String,
        /// Sum over protocols of their latest TVL on the chain.
        tvl: f64,
        /// Percent change over 1 day, null without a reference.
        change_1d: Option<f64>,
        /// Percent change over 7 days, null without a reference.
        change_7d: Option<f64>,
        /// How many protocols have TVL on the chain (0: the chain left the aggregate).
        protocols: u64,
    },
    /// A category's TVL summed over its protocols changed in an epoch (SPEC §3, §8).
    CategoryTvlUpdate {
        /// Category; null for protocols without metadata.
        category: Option<String>,
        /// Sum over the category's protocols of their total TVL.
        tvl: f64,
        /// Percent change over 1 day, null without a reference.
        change_1d: Option<f64>,
        /// Percent change over 7 days, null without a reference.
        change_7d: Option<f64>,
        /// How many protocols with TVL the category has (0: it left the aggregate).
        protocols: u64,
    },
    /// A gas tick.
    GasUpdate {
        /// Chain.
        chain: String,
        /// Gwei.
        gwei: f64,
        /// Event time.
        #[serde(serialize_with = "ser_seconds")]
        timestamp: Millis,
    },
}

impl EventData {
    /// The event `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventData::PriceUpdate { .. } => "price_update",
            EventData::TvlUpdate { .. } => "tvl_update",
            EventData::Depeg { .. } => "depeg",
            EventData::WhaleTransfer { .. } => "whale_transfer",
            EventData::Liquidation { .. } => "liquidation",
            EventData::GasUpdate { .. } => "gas_update",
            EventData::ChainTvlUpdate { .. } => "chain_tvl_update",
            EventData::CategoryTvlUpdate { .. } => "category_tvl_update",
        }
    }
}

/// A market event for subscribers, Redis and Kafka.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Coin, protocol or chain.
    pub subject: String,
    /// Event time.
    pub timestamp: Millis,
    /// Payload.
    pub data: EventData,
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("type", self.data.type_name())?;
        m.serialize_entry("subject", &self.subject)?;
        m.serialize_entry("timestamp", &crate::time::format_seconds(self.timestamp))?;
        m.serialize_entry("data", &self.data)?;
        m.end()
    }
}

/// The chain part of a `<chain>:<address>` coin id (`None` for `coingecko:` ids).
pub fn coin_chain(coin: &str) -> Option<&str> {
    match coin.split_once(':') {
        Some(("coingecko", _)) | None => None,
        Some((chain, _)) => Some(chain),
    }
}

impl Event {
    /// The WebSocket channels (SPEC §5) this event is published on.
    pub fn channels(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(3);
        match &self.data {
            EventData::PriceUpdate { coin, .. } => {
                out.push("prices".to_string());
                out.push(format!("prices:{coin}"));
                if let Some(c) = coin_chain(coin) {
                    out.push(format!("chain:{c}"));
                }
            }
            EventData::TvlUpdate {
                protocol_id,
                chain_tvls,
                ..
            } => {
                out.push("tvl".to_string());
                out.push(format!("tvl:{protocol_id}"));
                out.extend(chain_tvls.keys().map(|c| format!("chain:{c}")));
            }
            EventData::Depeg { .. } => out.push("depeg".to_string()),
            EventData::WhaleTransfer { chain, .. } => {
                out.push("whales".to_string());
                out.push(format!("chain:{chain}"));
            }
            EventData::Liquidation { chain, .. } => {
                out.push("liquidations".to_string());
                out.push(format!("chain:{chain}"));
            }
            EventData::GasUpdate { chain, .. } => {
                out.push("gas".to_string());
                out.push(format!("gas:{chain}"));
                out.push(format!("chain:{chain}"));
            }
            EventData::ChainTvlUpdate { chain, .. } => {
                out.push("chains".to_string());
                out.push(format!("chain:{chain}"));
            }
            EventData::CategoryTvlUpdate { .. } => out.push("categories".to_string()),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An alert crosses processes (the dataflow's exchange) and checkpoints (the read view's
    /// recent alerts) in bincode: it reads back as it was, to the millisecond, while its JSON
    /// says unix seconds.
    #[test]
    fn an_alert_reads_back_from_bincode_exactly_and_writes_seconds_in_json() {
        for triggered_at in [1_717_430_400_000, 1_717_430_400_123, 0, 7] {
            let alert = Alert {
                alert_id: "a".repeat(32),
                rule_id: "r1".into(),
                user_id: "u1".into(),
                alert_type: "price_change".into(),
                subject: "coingecko:eth".into(),
                triggered_at,
                value: -5.5,
                threshold: 5.0,
                message: "ETH -5.50% in 1h".into(),
                channels: vec!["websocket".into()],
                webhook_url: None,
            };
            let bytes = bincode::serialize(&alert).unwrap();
            assert_eq!(bincode::deserialize::<Alert>(&bytes).unwrap(), alert);
            let json = serde_json::to_value(&alert).unwrap();
            assert_eq!(json["triggered_at"].as_f64(), Some(triggered_at as f64 / 1000.0));
            assert_eq!(serde_json::from_value::<Alert>(json).unwrap(), alert);
        }
    }

    #[test]
    fn a_source_name_is_stored_once_and_reads_and_serialises_as_its_text() {
        let a = SourceName::from(format!("prices-{}.jsonl:", line!()));
        let b = SourceName::new(&a.to_string());
        assert!(std::ptr::eq(a.as_str(), b.as_str()), "the same name is one stored text");
        assert_ne!(a, SourceName::from("other.jsonl:"));
        let pos = SourcePos::new(a, 7);
        assert_eq!(pos.to_string(), format!("{a}7"));
        let json = serde_json::to_string(&pos).unwrap();
        assert_eq!(json, format!(r#"{{"source":"{a}","offset":7}}"#));
        let back: SourcePos = serde_json::from_str(&json).unwrap();
        assert_eq!(back, pos);
        assert!(
            std::ptr::eq(back.source.as_str(), a.as_str()),
            "read back, it is the stored text"
        );
    }

    #[test]
    fn dead_letter_reasons_are_bounded_like_raw() {
        let huge = "é".repeat(10 * 1024 * 1024);
        let d = DeadLetter::new("f:1", format!("unknown alert_type `{huge}`"), &huge);
        assert!(d.reason.len() <= MAX_REASON + '…'.len_utf8(), "{}", d.reason.len());
        assert!(d.reason.starts_with("unknown alert_type `é") && d.reason.ends_with('…'));
        assert!(d.raw.len() <= 4096);
        let short = DeadLetter::new("f:1", "late", "{}");
        assert_eq!(short.reason, "late", "short reasons are kept as they are");
    }

    #[test]
    fn alert_id_is_stable_and_sensitive() {
        let a = alert_id(
            "r1",
            "coingecko:ethereum",
            1_717_430_400_000,
            "price|coingecko:ethereum|1717430400000",
        );
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            a,
            alert_id(
                "r1",
                "coingecko:ethereum",
                1_717_430_400_000,
                "price|coingecko:ethereum|1717430400000"
            )
        );
        assert_ne!(
            a,
            alert_id(
                "r2",
                "coingecko:ethereum",
                1_717_430_400_000,
                "price|coingecko:ethereum|1717430400000"
            )
        );
        // Length-prefixing keeps field boundaries apart.
        assert_ne!(alert_id("ab", "c", 0, ""), alert_id("a", "bc", 0, ""));
    }

    #[test]
    fn event_shape() {
        let e = Event {
            subject: "ethereum".into(),
            timestamp: 1_500,
            data: EventData::GasUpdate {
                chain: "ethereum".into(),
                gwei: 21.5,
                timestamp: 1_500,
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"gas_update","subject":"ethereum","timestamp":1.5,
                "data":{"chain":"ethereum","gwei":21.5,"timestamp":1.5}})
        );
        assert_eq!(e.channels(), vec!["gas", "gas:ethereum", "chain:ethereum"]);
    }

    #[test]
    fn raw_truncation_respects_chars() {
        let s = "é".repeat(3000);
        let t = truncate_raw(&s);
        assert!(t.len() <= 4096 && t.len() >= 4094);
        let d = DeadLetter::new(SourcePos::new("f.jsonl:".into(), 3), "late", "x");
        assert_eq!(d.source, "f.jsonl:3");
    }
}
