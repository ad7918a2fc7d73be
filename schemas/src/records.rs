//! Validated input records (SPEC §1). Times are unix milliseconds.

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::rule::AlertRule;
use crate::time::{Millis, format_seconds};

/// The kinds of input record, one per input file flag / Kafka topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Token price ticks.
    Price,
    /// Protocol TVL per chain.
    Tvl,
    /// Token transfers.
    Transfer,
    /// Gas price ticks.
    Gas,
    /// Liquidations.
    Liquidation,
    /// Protocol metadata.
    Protocol,
    /// Alert rules.
    Rule,
}

impl Kind {
    /// Every kind, in the order replay takes equal-timestamp records.
    pub const ALL: [Kind; 7] = [
        Kind::Rule,
        Kind::Protocol,
        Kind::Price,
        Kind::Tvl,
        Kind::Gas,
        Kind::Liquidation,
        Kind::Transfer,
    ];

    /// Parses a kind as written in configs and topic maps: `prices`/`price`, `tvl`,
    /// `transfers`/`transfer`, `gas`, `liquidations`/`liquidation`, `protocols`/`protocol`,
    /// `rules`/`rule`.
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "prices" | "price" => Kind::Price,
            "tvl" => Kind::Tvl,
            "transfers" | "transfer" => Kind::Transfer,
            "gas" => Kind::Gas,
            "liquidations" | "liquidation" => Kind::Liquidation,
            "protocols" | "protocol" => Kind::Protocol,
            "rules" | "rule" => Kind::Rule,
            _ => return None,
        })
    }

    /// Lower-case name used in metrics, CLI flags and messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Price => "price",
            Kind::Tvl => "tvl",
            Kind::Transfer => "transfer",
            Kind::Gas => "gas",
            Kind::Liquidation => "liquidation",
            Kind::Protocol => "protocol",
            Kind::Rule => "rule",
        }
    }
}

/// A token price tick.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PriceTick {
    /// DeFiLlama coin id: `coingecko:<id>` or `<chain>:<address>`.
    pub coin: String,
    /// USD price, finite and > 0.
    pub price: f64,
    /// Event time.
    pub timestamp: Millis,
    /// Ticker symbol, when known.
    pub symbol: Option<String>,
    /// Price confidence in [0, 1], when known.
    pub confidence: Option<f64>,
    /// Token decimals, when known.
    pub decimals: Option<u32>,
}

/// One TVL update of a protocol at one time: one or more chains (a JSONL record carries one,
/// a DynamoDB `hourlyTvl#` item all of them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TvlUpdate {
    /// DeFiLlama protocol id.
    pub protocol_id: String,
    /// Event time.
    pub timestamp: Millis,
    /// `(chain, tvl)` pairs; tvl finite and ≥ 0.
    pub chains: Vec<(String, f64)>,
    /// Sub-buckets not counted in TVL (`ethereum-staking`, `pool2`, …), kept as extra data.
    pub extra: Vec<(String, f64)>,
}

/// A token transfer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    /// Chain name.
    pub chain: String,
    /// Transaction hash.
    pub tx_hash: String,
    /// Coin id of the token moved.
    pub coin: String,
    /// Sender, when known.
    pub from: Option<String>,
    /// Recipient, when known.
    pub to: Option<String>,
    /// Amount in token units, > 0.
    pub amount: f64,
    /// Event time.
    pub timestamp: Millis,
}

/// A gas price tick.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GasTick {
    /// Chain name.
    pub chain: String,
    /// Gas price in gwei.
    pub gwei: f64,
    /// Event time.
    pub timestamp: Millis,
}

/// A liquidation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Liquidation {
    /// Protocol id.
    pub protocol_id: String,
    /// Chain name.
    pub chain: String,
    /// Liquidated account, when known.
    pub account: Option<String>,
    /// USD amount liquidated.
    pub amount_usd: f64,
    /// Event time.
    pub timestamp: Millis,
}

/// TVL types kept apart from chain TVL (`staking`, `ethereum-staking`, …).
const TVL_TYPES: [&str; 9] = [
    "staking",
    "pool2",
    "borrowed",
    "doublecounted",
    "liquidstaking",
    "vesting",
    "dcandlsoverlap",
    "offers",
    "treasury",
];

/// Whether a TVL key names a sub-bucket (`staking`, `ethereum-staking`, `pool2`, …) rather
/// than a chain: kept as extra data, never counted in TVL (SPEC §1, §8).
pub fn is_sub_bucket(name: &str) -> bool {
    let kind = name.rsplit_once('-').map_or(name, |(_, t)| t);
    TVL_TYPES.iter().any(|t| t.eq_ignore_ascii_case(kind))
}

/// Protocol metadata (a row of `protocols`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Protocol {
    /// Protocol id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Token symbol, when the protocol has one.
    pub symbol: Option<String>,
    /// URL slug.
    pub slug: Option<String>,
    /// Category (Lending, Dexes, …).
    pub category: Option<String>,
    /// Chains the protocol is deployed on.
    pub chains: Vec<String>,
}

/// Any validated input record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// A price tick.
    Price(PriceTick),
    /// A TVL update.
    Tvl(TvlUpdate),
    /// A transfer (boxed, like the other large records: a record is moved several times on
    /// its way to its worker, so the common ones stay small).
    Transfer(Box<Transfer>),
    /// A gas tick.
    Gas(GasTick),
    /// A liquidation.
    Liquidation(Liquidation),
    /// Protocol metadata.
    Protocol(Box<Protocol>),
    /// An alert rule (insert or replace).
    Rule(Box<AlertRule>),
}

impl Record {
    /// The record's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Record::Price(_) => Kind::Price,
            Record::Tvl(_) => Kind::Tvl,
            Record::Transfer(_) => Kind::Transfer,
            Record::Gas(_) => Kind::Gas,
            Record::Liquidation(_) => Kind::Liquidation,
            Record::Protocol(_) => Kind::Protocol,
            Record::Rule(_) => Kind::Rule,
        }
    }

    /// Event time; metadata (protocols, rules) has none and sorts first.
    pub fn timestamp(&self) -> Millis {
        match self {
            Record::Price(p) => p.timestamp,
            Record::Tvl(t) => t.timestamp,
            Record::Transfer(t) => t.timestamp,
            Record::Gas(g) => g.timestamp,
            Record::Liquidation(l) => l.timestamp,
            Record::Protocol(_) | Record::Rule(_) => Millis::MIN,
        }
    }

    /// The record re-encoded as SPEC §1 JSON (used as `raw` when a parsed record is
    /// dead-lettered later, e.g. as `late`). The serde derive is the internal form.
    pub fn to_json(&self) -> String {
        let v = match self {
            Record::Price(p) => json!({"coin": p.coin, "price": p.price,
                "timestamp": format_seconds(p.timestamp), "symbol": p.symbol,
                "confidence": p.confidence, "decimals": p.decimals}),
            Record::Tvl(t) => match t.chains.as_slice() {
                [(chain, tvl)] => json!({"protocol_id": t.protocol_id, "chain": chain, "tvl": tvl,
                    "timestamp": format_seconds(t.timestamp)}),
                chains => json!({"protocol_id": t.protocol_id,
                    "timestamp": format_seconds(t.timestamp),
                    "chainTvls": pairs(chains), "extra": pairs(&t.extra)}),
            },
            Record::Transfer(t) => json!({"chain": t.chain, "tx_hash": t.tx_hash, "coin": t.coin,
                "from": t.from, "to": t.to, "amount": t.amount, "timestamp": format_seconds(t.timestamp)}),
            Record::Gas(g) => json!({"chain": g.chain, "gwei": g.gwei, "timestamp": format_seconds(g.timestamp)}),
            Record::Liquidation(l) => json!({"protocol_id": l.protocol_id, "chain": l.chain,
                "account": l.account, "amount_usd": l.amount_usd, "timestamp": format_seconds(l.timestamp)}),
            Record::Protocol(p) => json!({"id": p.id, "name": p.name, "symbol": p.symbol, "slug": p.slug,
                "category": p.category, "chains": p.chains}),
            Record::Rule(r) => r.to_json(),
        };
        v.to_string()
    }
}

fn pairs(p: &[(String, f64)]) -> serde_json::Map<String, serde_json::Value> {
    p.iter().map(|(k, v)| (k.clone(), json!(v))).collect()
}
