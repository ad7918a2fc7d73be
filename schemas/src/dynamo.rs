//! DynamoDB-JSON items of DeFiLlama's `prod-table` (TVL) and `prod-coins-table` (prices).

use serde_json::{Map, Value};

use crate::parse::{InvalidRecord, normalize_coin};
use crate::records::TvlUpdate;
use crate::records::is_sub_bucket;
use crate::time::{Millis, seconds_to_millis};

/// A decoded price item; `price` is `None` for a pure redirect, which the export reader
/// resolves against the redirect target's price history.
#[derive(Clone, Debug, PartialEq)]
pub struct PriceItem {
    /// Coin id in API form (`coingecko:<id>`, `<chain>:<address>`).
    pub coin: String,
    /// Price, when the item has one.
    pub price: Option<f64>,
    /// Event time.
    pub timestamp: Millis,
    /// Symbol.
    pub symbol: Option<String>,
    /// Confidence.
    pub confidence: Option<f64>,
    /// Decimals.
    pub decimals: Option<u32>,
    /// Redirect target coin id (API form), when the item redirects.
    pub redirect: Option<String>,
    /// `SK 0`: the current row rather than a history row.
    pub current: bool,
}

/// What one DynamoDB item decodes to.
#[derive(Clone, Debug, PartialEq)]
pub enum DynamoRecord {
    /// A `hourlyTvl#` / `dailyTvl#` item: one update with every chain.
    Tvl(TvlUpdate),
    /// A `coingecko#` / `asset#` item.
    Price(PriceItem),
}

/// Attributes of a TVL item that are neither chains nor sub-buckets.
const TVL_NOT_CHAINS: [&str; 7] = [
    "PK",
    "SK",
    "tvl",
    "tvlPrev1Hour",
    "tvlPrev1Day",
    "tvlPrev1Week",
    "totalCirculating",
];

/// Reads a DynamoDB attribute value as a string (`S`, or `N` as its text).
fn attr_str(v: &Value) -> Option<&str> {
    v.get("S").or_else(|| v.get("N")).and_then(Value::as_str)
}

/// Reads a DynamoDB attribute value as a number (`N`, or a numeric `S`).
fn attr_num(v: &Value) -> Option<f64> {
    v.get("N")
        .or_else(|| v.get("S"))
        .and_then(Value::as_str)
        .and_then(|s| s.trim().parse().ok())
}

fn is_null(v: &Value) -> bool {
    v.get("NULL").is_some()
}

/// Decodes one item (the map of attribute name → typed value).
///
/// `Ok(None)`: an item of another kind (neither TVL nor price), which readers count as skipped.
pub fn decode_item(item: &Map<String, Value>) -> Result<Option<DynamoRecord>, InvalidRecord> {
    let pk = item
        .get("PK")
        .and_then(attr_str)
        .ok_or_else(|| InvalidRecord("DynamoDB item without a string `PK`".into()))?;
    let sk = || -> Result<f64, InvalidRecord> {
        item.get("SK")
            .and_then(attr_num)
            .filter(|x| x.is_finite())
            .ok_or_else(|| InvalidRecord(format!("item `{pk}`: missing or non-numeric `SK`")))
    };
    if let Some(id) = pk.strip_prefix("hourlyTvl#").or_else(|| pk.strip_prefix("dailyTvl#")) {
        if id.is_empty() {
            return Err(InvalidRecord(format!("item `{pk}`: empty protocol id")));
        }
        let sk = sk()?;
        let timestamp =
            seconds_to_millis(sk).ok_or_else(|| InvalidRecord(format!("item `{pk}`: SK {sk} is not a unix time")))?;
        let mut chains = Vec::new();
        let mut extra = Vec::new();
        for (name, v) in item {
            if TVL_NOT_CHAINS.contains(&name.as_str()) || v.get("N").is_none() {
                continue;
            }
            let x = attr_num(v)
                .filter(|x| x.is_finite())
                .ok_or_else(|| InvalidRecord(format!("item `{pk}`: attribute `{name}` is not a finite number")))?;
            if is_sub_bucket(name) {
                extra.push((name.clone(), x));
            } else {
                if x < 0.0 {
                    return Err(InvalidRecord(format!(
                        "item `{pk}`: chain `{name}` has negative tvl {x}"
                    )));
                }
                chains.push((name.clone(), x));
            }
        }
        chains.sort_by(|a, b| a.0.cmp(&b.0));
        extra.sort_by(|a, b| a.0.cmp(&b.0));
        if chains.is_empty() {
            return Err(InvalidRecord(format!("item `{pk}`: no chain TVL attributes")));
        }
        return Ok(Some(DynamoRecord::Tvl(TvlUpdate {
            protocol_id: id.to_string(),
            timestamp,
            chains,
            extra,
        })));
    }
    let coin_raw = if let Some(id) = pk.strip_prefix("coingecko#") {
        format!("coingecko:{id}")
    } else if let Some(a) = pk.strip_prefix("asset#") {
        a.to_string()
    } else {
        return Ok(None);
    };
    let coin = normalize_coin(&coin_raw)
        .ok_or_else(|| InvalidRecord(format!("item `{pk}`: unknown coin form `{coin_raw}`")))?;
    let sk = sk()?;
    let current = sk == 0.0;
    let ts_secs = if current {
        item.get("timestamp")
            .and_then(attr_num)
            .ok_or_else(|| InvalidRecord(format!("item `{pk}` SK 0: missing numeric `timestamp`")))?
    } else {
        sk
    };
    let timestamp = seconds_to_millis(ts_secs)
        .ok_or_else(|| InvalidRecord(format!("item `{pk}`: timestamp {ts_secs} out of range")))?;
    let num = |k: &str| -> Result<Option<f64>, InvalidRecord> {
        match item.get(k) {
            None => Ok(None),
            Some(v) if is_null(v) => Ok(None),
            Some(v) => attr_num(v)
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| InvalidRecord(format!("item `{pk}`: `{k}` is not a finite number"))),
        }
    };
    let price = num("price")?;
    if let Some(p) = price
        && p <= 0.0
    {
        return Err(InvalidRecord(format!("item `{pk}`: `price` must be > 0, got {p}")));
    }
    let redirect = match item.get("redirect").and_then(attr_str) {
        None => None,
        Some(r) => {
            let api = r.replacen('#', ":", 1);
            let api = api.strip_prefix("asset:").map(str::to_string).unwrap_or(api);
            Some(
                normalize_coin(&api)
                    .ok_or_else(|| InvalidRecord(format!("item `{pk}`: unknown redirect form `{r}`")))?,
            )
        }
    };
    if price.is_none() && redirect.is_none() {
        return Err(InvalidRecord(format!("item `{pk}`: neither `price` nor `redirect`")));
    }
    let decimals = num("decimals")?
        .filter(|d| *d >= 0.0 && d.fract() == 0.0)
        .map(|d| d as u32);
    Ok(Some(DynamoRecord::Price(PriceItem {
        coin,
        price,
        timestamp,
        symbol: item.get("symbol").and_then(attr_str).map(str::to_string),
        confidence: num("confidence")?,
        decimals,
        redirect,
        current,
    })))
}

/// One line of an export data file, decoded.
#[derive(Clone, Debug, PartialEq)]
pub enum ExportLine {
    /// A full-export `Item`, or an incremental `NewImage` (insert or update).
    Upsert(Map<String, Value>),
    /// An incremental deletion (`Keys`/`OldImage` without `NewImage`).
    Delete(Map<String, Value>),
}

/// Parses one line of an export data file (`{"Item":…}` or incremental
/// `{"Metadata":…,"Keys":…,"NewImage":…,"OldImage":…}`).
pub fn parse_export_line(line: &str) -> Result<ExportLine, InvalidRecord> {
    let v: Value = serde_json::from_str(line).map_err(|e| InvalidRecord(format!("bad JSON: {e}")))?;
    let Value::Object(mut o) = v else {
        return Err(InvalidRecord("export line is not a JSON object".into()));
    };
    if let Some(Value::Object(item)) = o.remove("Item") {
        return Ok(ExportLine::Upsert(item));
    }
    if let Some(Value::Object(img)) = o.remove("NewImage") {
        return Ok(ExportLine::Upsert(img));
    }
    if let Some(Value::Object(keys)) = o.remove("OldImage").or_else(|| o.remove("Keys")) {
        return Ok(ExportLine::Delete(keys));
    }
    Err(InvalidRecord(
        "export line has none of `Item`, `NewImage`, `Keys`".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn tvl_item_flattens_chains_and_keeps_sub_buckets() {
        let item = obj(json!({"PK":{"S":"hourlyTvl#2269"},"SK":{"N":"1717430400"},
            "ethereum":{"N":"100.5"},"arbitrum":{"N":"20"},"ethereum-staking":{"N":"7"},
            "staking":{"N":"7"},"tvl":{"N":"120.5"},"tvlPrev1Day":{"N":"99"},"tokens":{"M":{}}}));
        let Some(DynamoRecord::Tvl(t)) = decode_item(&item).unwrap() else {
            panic!()
        };
        assert_eq!(t.protocol_id, "2269");
        assert_eq!(t.timestamp, 1_717_430_400_000);
        assert_eq!(t.chains, vec![("arbitrum".into(), 20.0), ("ethereum".into(), 100.5)]);
        assert_eq!(t.extra, vec![("ethereum-staking".into(), 7.0), ("staking".into(), 7.0)]);
    }

    #[test]
    fn price_items_current_history_redirect() {
        let cur = obj(
            json!({"PK":{"S":"coingecko#ethereum"},"SK":{"N":"0"},"price":{"N":"3791.12"},
            "timestamp":{"N":"1717430350"},"symbol":{"S":"ETH"},"confidence":{"N":"0.99"}}),
        );
        let Some(DynamoRecord::Price(p)) = decode_item(&cur).unwrap() else {
            panic!()
        };
        assert!(p.current);
        assert_eq!(
            (p.coin.as_str(), p.price, p.timestamp),
            ("coingecko:ethereum", Some(3791.12), 1_717_430_350_000)
        );
        let hist = obj(json!({"PK":{"S":"asset#ethereum:0xA0B8"},"SK":{"N":"1717430000"},
            "redirect":{"S":"coingecko#usd-coin"}}));
        let Some(DynamoRecord::Price(p)) = decode_item(&hist).unwrap() else {
            panic!()
        };
        assert_eq!(p.coin, "ethereum:0xa0b8");
        assert!(!p.current);
        assert_eq!(p.redirect.as_deref(), Some("coingecko:usd-coin"));
        assert_eq!(p.price, None);
    }

    #[test]
    fn other_items_and_errors() {
        assert_eq!(
            decode_item(&obj(json!({"PK":{"S":"config#x"},"SK":{"N":"0"}}))).unwrap(),
            None
        );
        let e = decode_item(&obj(json!({"PK":{"S":"coingecko#x"},"SK":{"N":"0"},"price":{"N":"1"}}))).unwrap_err();
        assert!(e.0.contains("timestamp"), "{e}");
        let e = decode_item(&obj(json!({"SK":{"N":"0"}}))).unwrap_err();
        assert!(e.0.contains("PK"), "{e}");
    }

    #[test]
    fn export_lines() {
        assert!(matches!(
            parse_export_line(r#"{"Item":{"PK":{"S":"x"}}}"#).unwrap(),
            ExportLine::Upsert(_)
        ));
        assert!(matches!(
            parse_export_line(r#"{"Metadata":{},"Keys":{"PK":{"S":"x"}},"NewImage":{"PK":{"S":"x"}}}"#).unwrap(),
            ExportLine::Upsert(_)
        ));
        assert!(matches!(
            parse_export_line(r#"{"Metadata":{},"Keys":{"PK":{"S":"x"}},"OldImage":{"PK":{"S":"x"}}}"#).unwrap(),
            ExportLine::Delete(_)
        ));
        assert!(parse_export_line("nope").is_err());
    }
}
