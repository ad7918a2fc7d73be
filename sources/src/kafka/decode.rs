//! One Kafka message value → one [`Change`] (or nothing, for DynamoDB items the pipeline has no
//! use for).

use schemas::dynamo::{DynamoRecord, PriceItem, decode_item};
use schemas::{DeadLetter, Kind, PriceTick, Record, SourcePos, parse_record};
use serde_json::{Map, Value};

use crate::live::Change;

/// Why a message produced no change (counted in `llamaflow_kafka_skipped_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Skip {
    /// A DynamoDB item of another kind (neither TVL nor price), as in exports.
    OtherItem,
    /// A DynamoDB deletion (`Keys`/`OldImage` without `NewImage`): history is not retracted.
    Deletion,
}

impl Skip {
    /// Metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Skip::OtherItem => "other_dynamodb_item",
            Skip::Deletion => "dynamodb_deletion",
        }
    }
}

/// The shape of a DynamoDB-JSON value.
enum Dynamo {
    /// An item to decode (bare, `{"Item":…}` or `{"NewImage":…}`).
    Upsert(Map<String, Value>),
    /// `{"Keys":…}` / `{"OldImage":…}` without a `NewImage`.
    Delete,
}

/// Is `v` a DynamoDB attribute value (`{"S":…}`, `{"N":…}`, …)?
fn is_typed(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Object(m)) => {
            m.len() == 1
                && m.keys()
                    .all(|k| matches!(k.as_str(), "S" | "N" | "B" | "BOOL" | "NULL" | "M" | "L"))
        }
        _ => false,
    }
}

/// Recognises DynamoDB JSON: an item whose `PK` is a typed attribute, such an item wrapped as
/// `{"Item":…}` or `{"NewImage":…}` (export / stream images), or a deletion.
fn dynamo_shape(text: &str) -> Option<Dynamo> {
    // SPEC records never name a `PK`; skip the second parse for them.
    if !text.contains("\"PK\"") {
        return None;
    }
    let Ok(Value::Object(mut o)) = serde_json::from_str::<Value>(text) else {
        return None;
    };
    if is_typed(o.get("PK")) {
        return Some(Dynamo::Upsert(o));
    }
    let wrapped = ["Item", "NewImage"]
        .into_iter()
        .find(|w| matches!(o.get(*w), Some(Value::Object(item)) if is_typed(item.get("PK"))));
    if let Some(Value::Object(item)) = wrapped.and_then(|w| o.remove(w)) {
        return Some(Dynamo::Upsert(item));
    }
    for wrapper in ["Keys", "OldImage"] {
        if let Some(Value::Object(item)) = o.get(wrapper)
            && is_typed(item.get("PK"))
        {
            return Some(Dynamo::Delete);
        }
    }
    None
}

/// Decodes a message value of a topic of `kind`.
///
/// `payload` `None` is a tombstone: on the rules / protocols topics, a tombstone whose key is
/// the id deletes that rule / protocol (log-compacted topics); elsewhere it is a dead letter.
pub(crate) fn decode(kind: Kind, pos: &SourcePos, key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<Change, Skip> {
    let dead = |reason: String, raw: &str| Ok(Change::Dead(DeadLetter::new(pos, reason, raw)));
    let Some(payload) = payload else {
        let id = key.and_then(|k| std::str::from_utf8(k).ok()).map(str::trim);
        return match (kind, id) {
            (Kind::Rule, Some(id)) if !id.is_empty() => Ok(Change::DeleteRule(id.to_string())),
            (Kind::Protocol, Some(id)) if !id.is_empty() => Ok(Change::DeleteProtocol(id.to_string())),
            _ => dead("empty message (null payload)".into(), ""),
        };
    };
    let text = match std::str::from_utf8(payload) {
        Ok(t) => t.strip_prefix('\u{feff}').unwrap_or(t),
        Err(e) => return dead(format!("invalid UTF-8: {e}"), &String::from_utf8_lossy(payload)),
    };
    if text.trim().is_empty() {
        return dead("empty message".into(), text);
    }
    match dynamo_shape(text) {
        None => match parse_record(kind, text) {
            Ok(record) => Ok(Change::Record(record)),
            Err(e) => dead(e.0, text),
        },
        Some(Dynamo::Delete) => Err(Skip::Deletion),
        Some(Dynamo::Upsert(item)) => match decode_item(&item) {
            Err(e) => dead(e.0, text),
            Ok(None) => Err(Skip::OtherItem),
            Ok(Some(DynamoRecord::Tvl(t))) => Ok(Change::Record(Record::Tvl(t))),
            Ok(Some(DynamoRecord::Price(p))) => price(p).map_or_else(|reason| dead(reason, text), Ok),
        },
    }
}

/// A price item with a price → a tick; a redirect-only item needs the target's price history,
/// which a partition of one topic does not have.
fn price(p: PriceItem) -> Result<Change, String> {
    let PriceItem {
        coin,
        price,
        timestamp,
        symbol,
        confidence,
        decimals,
        ..
    } = p;
    let Some(price) = price else {
        return Err("redirect needs a price history; not supported on Kafka".into());
    };
    Ok(Change::Record(Record::Price(PriceTick {
        coin,
        price,
        timestamp,
        symbol,
        confidence,
        decimals,
    })))
}
