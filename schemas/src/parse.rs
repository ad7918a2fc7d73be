//! Parsing and validation of SPEC §1 JSON records. Errors name the bad field.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::records::{GasTick, Kind, Liquidation, PriceTick, Protocol, Record, Transfer, TvlUpdate};
use crate::rule::AlertRule;
use crate::time::{Millis, seconds_to_millis};

/// Why an input record was rejected: the dead-letter `reason`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRecord(pub String);

fn bad(msg: impl Into<String>) -> InvalidRecord {
    InvalidRecord(msg.into())
}

/// Normalizes a DeFiLlama coin id: `coingecko:<id>` or `<chain>:<address>` with the address
/// lowercased (except on solana). `None` for any other form.
pub fn normalize_coin(raw: &str) -> Option<String> {
    // One pass: printable ASCII without quotes, one `:` with text on both sides.
    let (mut colon, mut upper) = (None, false);
    for (i, &c) in raw.as_bytes().iter().enumerate() {
        if !c.is_ascii_graphic() || c == b'"' || (c == b':' && colon.replace(i).is_some()) {
            return None;
        }
        upper |= c.is_ascii_uppercase();
    }
    let colon = colon.filter(|&i| i > 0 && i + 1 < raw.len())?;
    if !upper {
        return Some(raw.to_string());
    }
    let (prefix, rest) = (&raw[..colon], &raw[colon + 1..]);
    if prefix.eq_ignore_ascii_case("coingecko") || prefix.eq_ignore_ascii_case("solana") {
        return Some(format!("{}:{rest}", prefix.to_ascii_lowercase()));
    }
    Some(raw.to_ascii_lowercase())
}

/// A JSON field read leniently so validation can say which field is wrong.
#[derive(Debug, Default)]
enum F<'a> {
    #[default]
    Missing,
    Null,
    Num(f64),
    Str(Cow<'a, str>),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for F<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = F<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_f64<E>(self, v: f64) -> Result<F<'a>, E> {
                Ok(F::Num(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<F<'a>, E> {
                Ok(F::Num(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<F<'a>, E> {
                Ok(F::Num(v as f64))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<F<'a>, E> {
                Ok(F::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<F<'a>, E> {
                Ok(F::Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<F<'a>, E> {
                Ok(F::Str(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<F<'a>, E> {
                Ok(F::Other)
            }
            fn visit_unit<E>(self) -> Result<F<'a>, E> {
                Ok(F::Null)
            }
            fn visit_none<E>(self) -> Result<F<'a>, E> {
                Ok(F::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<F<'a>, D::Error> {
                d.deserialize_any(V(std::marker::PhantomData))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<F<'a>, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(F::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<F<'a>, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(F::Other)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

impl<'a> F<'a> {
    fn string(self, field: &str) -> Result<String, InvalidRecord> {
        match self {
            F::Str(s) if !s.is_empty() => Ok(s.into_owned()),
            F::Missing | F::Null => Err(bad(format!("missing field `{field}`"))),
            F::Str(_) => Err(bad(format!("field `{field}` is empty"))),
            _ => Err(bad(format!("field `{field}` must be a string"))),
        }
    }
    /// Ids may be numbers in DeFiLlama data (`"2269"` or `2269`).
    fn id(self, field: &str) -> Result<String, InvalidRecord> {
        match self {
            F::Num(n) if n.fract() == 0.0 && n >= 0.0 => Ok(format!("{}", n as u64)),
            other => other.string(field),
        }
    }
    fn opt_string(self, field: &str) -> Result<Option<String>, InvalidRecord> {
        match self {
            F::Missing | F::Null => Ok(None),
            other => other.string(field).map(Some),
        }
    }
    fn num(self, field: &str) -> Result<f64, InvalidRecord> {
        match self {
            F::Num(x) if x.is_finite() => Ok(x),
            F::Num(_) => Err(bad(format!("field `{field}` is not a finite number"))),
            F::Missing | F::Null => Err(bad(format!("missing field `{field}`"))),
            _ => Err(bad(format!("field `{field}` must be a number"))),
        }
    }
    fn opt_num(self, field: &str) -> Result<Option<f64>, InvalidRecord> {
        match self {
            F::Missing | F::Null => Ok(None),
            other => other.num(field).map(Some),
        }
    }
    fn time(self) -> Result<Millis, InvalidRecord> {
        let s = self.num("timestamp")?;
        seconds_to_millis(s).ok_or_else(|| bad(format!("field `timestamp` out of range: {s}")))
    }
    fn coin(self, field: &str) -> Result<String, InvalidRecord> {
        let raw = self.string(field)?;
        normalize_coin(&raw).ok_or_else(|| {
            bad(format!(
                "field `{field}`: unknown coin form `{raw}` (expected coingecko:<id> or <chain>:<address>)"
            ))
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRecord<'a> {
    #[serde(borrow)]
    coin: F<'a>,
    #[serde(borrow)]
    price: F<'a>,
    #[serde(borrow)]
    timestamp: F<'a>,
    #[serde(borrow)]
    symbol: F<'a>,
    #[serde(borrow)]
    confidence: F<'a>,
    #[serde(borrow)]
    decimals: F<'a>,
    #[serde(borrow)]
    protocol_id: F<'a>,
    #[serde(borrow)]
    chain: F<'a>,
    #[serde(borrow)]
    tvl: F<'a>,
    #[serde(borrow)]
    tx_hash: F<'a>,
    #[serde(borrow)]
    from: F<'a>,
    #[serde(borrow)]
    to: F<'a>,
    #[serde(borrow)]
    amount: F<'a>,
    #[serde(borrow)]
    gwei: F<'a>,
    #[serde(borrow)]
    account: F<'a>,
    #[serde(borrow)]
    amount_usd: F<'a>,
}

/// A value of a flat JSON object as [`plain_fields`] reads it.
enum Plain<'a> {
    Str(&'a str),
    Num(f64),
    Null,
}

/// Reads a flat JSON object of the plain form that files hold (no whitespace, no escapes or
/// control characters in strings, numbers without a sign), calling `each` with every key and
/// value in order. `None` for any other form, or when `each` says `None`: serde_json then
/// reads the line (and words its error).
fn plain_fields<'a>(line: &'a str, mut each: impl FnMut(&'a str, Plain<'a>) -> Option<()>) -> Option<()> {
    let mut rest = after_byte(line, b'{')?;
    rest = rest.strip_suffix('}')?;
    while !rest.is_empty() {
        let quoted = after_byte(rest, b'"')?;
        let end = plain_string_end(quoted)?;
        let (key, after) = (&quoted[..end], after_byte(&quoted[end + 1..], b':')?);
        let value;
        (value, rest) = match after_byte(after, b'"') {
            Some(s) => {
                let end = plain_string_end(s)?;
                (Plain::Str(&s[..end]), &s[end + 1..])
            }
            None => {
                let end = find_byte(after, b',').unwrap_or(after.len());
                let value = match &after[..end] {
                    "null" => Plain::Null,
                    number => Plain::Num(json_number(number)?),
                };
                (value, &after[end..])
            }
        };
        each(key, value)?;
        if !rest.is_empty() {
            rest = after_byte(rest, b',')?;
            if rest.is_empty() {
                return None;
            }
        }
    }
    Some(())
}

/// The index of the closing quote of a string's text `s` (after its opening quote), when no
/// escape or control character comes before it.
fn plain_string_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let i = b.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
    (b[i] == b'"').then_some(i)
}

/// The common shape of a price tick, read directly (the replay's reader spent most of its time
/// in the general parser): a plain flat object ([`plain_fields`]) holding only price fields,
/// each once, every value valid. `None` for anything else, which the general parser then reads
/// (and words the error for); where this returns a tick, serde_json's path returns the same one
/// (`plain_price_agrees_with_serde`).
fn plain_price(line: &str) -> Option<PriceTick> {
    let (mut coin, mut price, mut timestamp) = (None, None, None);
    let (mut symbol, mut confidence, mut decimals) = (None, None, None);
    fn once<T>(slot: &mut Option<T>, v: T) -> Option<()> {
        slot.is_none().then(|| *slot = Some(v))
    }
    plain_fields(line, |key, value| match (key, value) {
        ("coin", Plain::Str(v)) if !v.is_empty() => once(&mut coin, v),
        ("symbol", Plain::Str(v)) if !v.is_empty() => once(&mut symbol, v),
        ("price", Plain::Num(x)) => once(&mut price, x),
        ("timestamp", Plain::Num(x)) => once(&mut timestamp, x),
        ("confidence", Plain::Num(x)) => once(&mut confidence, x),
        ("decimals", Plain::Num(x)) => once(&mut decimals, x),
        _ => None,
    })?;
    let price = price.filter(|p| *p > 0.0)?;
    let decimals = match decimals {
        None => None,
        Some(d) if d.fract() == 0.0 && d <= 255.0 => Some(d as u32),
        Some(_) => return None,
    };
    Some(PriceTick {
        coin: normalize_coin(coin?)?,
        price,
        timestamp: seconds_to_millis(timestamp?)?,
        symbol: symbol.map(str::to_string),
        confidence,
        decimals,
    })
}

/// The fields of a plain flat object ([`plain_fields`]) as serde_json reads them into a
/// [`RawRecord`] (unknown keys ignored); `None` for another form or a key given twice, which
/// serde_json then reads (and words the error for).
fn plain_raw(line: &str) -> Option<RawRecord<'_>> {
    let mut r = RawRecord::default();
    plain_fields(line, |key, value| {
        let field = match key {
            "coin" => &mut r.coin,
            "price" => &mut r.price,
            "timestamp" => &mut r.timestamp,
            "symbol" => &mut r.symbol,
            "confidence" => &mut r.confidence,
            "decimals" => &mut r.decimals,
            "protocol_id" => &mut r.protocol_id,
            "chain" => &mut r.chain,
            "tvl" => &mut r.tvl,
            "tx_hash" => &mut r.tx_hash,
            "from" => &mut r.from,
            "to" => &mut r.to,
            "amount" => &mut r.amount,
            "gwei" => &mut r.gwei,
            "account" => &mut r.account,
            "amount_usd" => &mut r.amount_usd,
            _ => return Some(()),
        };
        if !matches!(field, F::Missing) {
            return None;
        }
        *field = match value {
            Plain::Str(s) => F::Str(Cow::Borrowed(s)),
            Plain::Num(x) => F::Num(x),
            Plain::Null => F::Null,
        };
        Some(())
    })?;
    Some(r)
}

/// `s` after its first byte, when that is `b` (an ASCII byte): `strip_prefix` with a `char`
/// compares through `memcmp`, a call per field.
fn after_byte(s: &str, b: u8) -> Option<&str> {
    // An ASCII byte is a whole char, so the rest starts on a char boundary.
    (s.as_bytes().first() == Some(&b)).then(|| &s[1..])
}

/// The index of the first `b` (an ASCII byte, so the index is a char boundary) in `s`: a
/// plain loop, cheaper than `str::find`'s searcher over the few bytes of a key or value.
fn find_byte(s: &str, b: u8) -> Option<usize> {
    s.as_bytes().iter().position(|&c| c == b)
}

/// Powers of ten that an f64 holds exactly.
const EXACT_POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

/// A non-negative JSON number (`0`, `12`, `1.5`, `2e-3`, …) as a finite f64; `None` for any
/// other text (signs, `01`, `1.`, `.5`, …) or an overflow. Rounded correctly, as serde_json
/// does with `float_roundtrip`: a decimal of at most 15 digits without an exponent (unix
/// seconds, most prices) is its digits, an exact integer, divided by an exact power of ten,
/// one correctly rounded division (Clinger's fast path); anything else goes to Rust's parser.
fn json_number(t: &str) -> Option<f64> {
    let b = t.as_bytes();
    // Digits from `i` on, accumulated into `m` (exact while there are at most 15 in all).
    let digits = |mut i: usize, m: &mut u64| {
        let from = i;
        while let Some(d) = b.get(i).filter(|c| c.is_ascii_digit()) {
            *m = m.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
            i += 1;
        }
        i - from
    };
    let mut m = 0u64;
    let int = digits(0, &mut m);
    if int == 0 || (int > 1 && b[0] == b'0') {
        return None;
    }
    let mut i = int;
    let mut frac = 0;
    if b.get(i) == Some(&b'.') {
        frac = digits(i + 1, &mut m);
        if frac == 0 {
            return None;
        }
        i += 1 + frac;
    }
    if i == b.len() && int + frac <= 15 {
        // m < 10^15 < 2^53 and 10^frac are exact: the quotient is the correctly rounded value.
        return Some(m as f64 / EXACT_POW10[frac]);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp = digits(i, &mut 0);
        if exp == 0 {
            return None;
        }
        i += exp;
    }
    if i != b.len() {
        return None;
    }
    t.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// Parses and validates one JSON record of the given kind.
///
/// A price with `confidence` ≤ 0.3 parses fine; the dataflow ignores it (SPEC §1).
pub fn parse_record(kind: Kind, line: &str) -> Result<Record, InvalidRecord> {
    match kind {
        Kind::Rule => parse_rule(line).map(|r| Record::Rule(Box::new(r))),
        Kind::Protocol => parse_protocol(line).map(|p| Record::Protocol(Box::new(p))),
        Kind::Price => match plain_price(line) {
            Some(tick) => Ok(Record::Price(tick)),
            None => parse_general(kind, line),
        },
        _ => parse_general(kind, line),
    }
}

/// [`parse_record`] of any record but rules and protocols, by serde_json.
fn parse_general(kind: Kind, line: &str) -> Result<Record, InvalidRecord> {
    match plain_raw(line) {
        Some(r) => build_record(kind, r),
        None => build_record(kind, raw_serde(line)?),
    }
}

/// [`parse_general`] by serde_json alone (the reference of the plain paths' tests).
#[cfg(test)]
fn parse_serde(kind: Kind, line: &str) -> Result<Record, InvalidRecord> {
    build_record(kind, raw_serde(line)?)
}

/// The fields of a JSON object by serde_json: any form of JSON, errors worded.
fn raw_serde(line: &str) -> Result<RawRecord<'_>, InvalidRecord> {
    if !line.trim_start().starts_with('{') {
        return Err(if serde_json::from_str::<serde::de::IgnoredAny>(line).is_ok() {
            bad("not a JSON object")
        } else {
            bad(format!("bad JSON: {}", line.chars().take(40).collect::<String>()))
        });
    }
    serde_json::from_str(line).map_err(|e| {
        if e.is_data() {
            // An object serde could not take, e.g. a key given twice.
            bad(format!("invalid JSON object: {e}"))
        } else {
            bad(format!("bad JSON: {e}"))
        }
    })
}

/// Validates the fields of a record of `kind` and builds it.
fn build_record(kind: Kind, r: RawRecord<'_>) -> Result<Record, InvalidRecord> {
    Ok(match kind {
        Kind::Price => {
            let coin = r.coin.coin("coin")?;
            let price = r.price.num("price")?;
            if price <= 0.0 {
                return Err(bad(format!("field `price` must be > 0, got {price}")));
            }
            let decimals = match r.decimals.opt_num("decimals")? {
                None => None,
                Some(d) if d >= 0.0 && d.fract() == 0.0 && d <= 255.0 => Some(d as u32),
                Some(d) => return Err(bad(format!("field `decimals` must be an integer 0..=255, got {d}"))),
            };
            Record::Price(PriceTick {
                coin,
                price,
                timestamp: r.timestamp.time()?,
                symbol: r.symbol.opt_string("symbol")?,
                confidence: r.confidence.opt_num("confidence")?,
                decimals,
            })
        }
        Kind::Tvl => {
            let protocol_id = r.protocol_id.id("protocol_id")?;
            let chain = r.chain.string("chain")?;
            let tvl = r.tvl.num("tvl")?;
            if tvl < 0.0 {
                return Err(bad(format!("field `tvl` must be ≥ 0, got {tvl}")));
            }
            // A sub-bucket (`ethereum-staking`) is kept as extra data, as in DynamoDB items.
            let (chains, extra) = if crate::records::is_sub_bucket(&chain) {
                (Vec::new(), vec![(chain, tvl)])
            } else {
                (vec![(chain, tvl)], Vec::new())
            };
            Record::Tvl(TvlUpdate {
                protocol_id,
                timestamp: r.timestamp.time()?,
                chains,
                extra,
            })
        }
        Kind::Transfer => {
            let amount = r.amount.num("amount")?;
            if amount <= 0.0 {
                return Err(bad(format!("field `amount` must be > 0, got {amount}")));
            }
            Record::Transfer(Box::new(Transfer {
                chain: r.chain.string("chain")?,
                tx_hash: r.tx_hash.string("tx_hash")?,
                coin: r.coin.coin("coin")?,
                from: r.from.opt_string("from")?,
                to: r.to.opt_string("to")?,
                amount,
                timestamp: r.timestamp.time()?,
            }))
        }
        Kind::Gas => {
            let gwei = r.gwei.num("gwei")?;
            if gwei < 0.0 {
                return Err(bad(format!("field `gwei` must be ≥ 0, got {gwei}")));
            }
            Record::Gas(GasTick {
                chain: r.chain.string("chain")?,
                gwei,
                timestamp: r.timestamp.time()?,
            })
        }
        Kind::Liquidation => {
            let amount_usd = r.amount_usd.num("amount_usd")?;
            if amount_usd < 0.0 {
                return Err(bad(format!("field `amount_usd` must be ≥ 0, got {amount_usd}")));
            }
            Record::Liquidation(Liquidation {
                protocol_id: r.protocol_id.id("protocol_id")?,
                chain: r.chain.string("chain")?,
                account: r.account.opt_string("account")?,
                amount_usd,
                timestamp: r.timestamp.time()?,
            })
        }
        Kind::Protocol | Kind::Rule => unreachable!("handled above"),
    })
}

/// Parses and validates an alert rule from one JSON line.
pub fn parse_rule(line: &str) -> Result<AlertRule, InvalidRecord> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("bad JSON: {e}")))?;
    parse_rule_value(&v)
}

/// Validates an alert rule from a JSON value.
pub fn parse_rule_value(v: &serde_json::Value) -> Result<AlertRule, InvalidRecord> {
    AlertRule::from_json(v).map_err(|e| bad(format!("invalid rule: {e}")))
}

fn parse_protocol(line: &str) -> Result<Protocol, InvalidRecord> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("bad JSON: {e}")))?;
    parse_protocol_value(&v)
}

/// Validates a protocol row from a JSON value.
pub fn parse_protocol_value(v: &serde_json::Value) -> Result<Protocol, InvalidRecord> {
    let o = v.as_object().ok_or_else(|| bad("not a JSON object"))?;
    let id = match o.get("id") {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => return Err(bad("missing field `id`")),
    };
    let s = |k: &str| -> Result<Option<String>, InvalidRecord> {
        match o.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(format!("field `{k}` must be a string"))),
        }
    };
    let name = s("name")?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad("missing field `name`"))?;
    let chains = match o.get("chains") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|c| c.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("field `chains` must be an array of strings"))?,
        Some(_) => return Err(bad("field `chains` must be an array of strings")),
    };
    Ok(Protocol {
        id,
        name,
        symbol: s("symbol")?,
        slug: s("slug")?,
        category: s("category")?,
        chains,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A JSON value text for a price field: valid and invalid numbers, strings, other values.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (0.0..1e6f64).prop_map(|x| format!("{x}")),
            2 => (0u64..=2_000_000_000).prop_map(|x| x.to_string()),
            1 => (0u64..300).prop_map(|x| format!("{x}.0")),
            1 => (1u32..9, -30i32..30).prop_map(|(m, e)| format!("{m}e{e}")),
            1 => (1u32..9, 0i32..400).prop_map(|(m, e)| format!("{m}.5E+{e}")),
            1 => Just("18446744073709551617".to_string()),
            1 => Just("9007199254740993".to_string()),
            1 => prop::sample::select(vec![
                "-1", "-0", "0", "01", "1.", ".5", "+1", "1e", "1e999", "-1e-999", "1e-400", "null", "true",
                "[1]", "{}", "0.30000000000000004", "255", "256", "18.5",
            ])
            .prop_map(str::to_string),
            3 => prop::sample::select(vec![
                "coingecko:eth", "ethereum:0xAbC", "Solana:So1", "eth", "", "x:y:z", "ETH", "a\\\"b", "é",
                "coingecko:ethereum", "tab\there",
            ])
            .prop_map(|s| format!("\"{s}\"")),
        ]
    }

    /// A flat object of price fields (and sometimes others), in any order, sometimes repeated,
    /// sometimes with whitespace or a trailing comma.
    fn line() -> impl Strategy<Value = String> {
        // The price fields (the first six of all), the required ones twice as likely.
        let mut keys = ALL_KEYS[..6].to_vec();
        keys.extend(["coin", "price", "timestamp", "extra"]);
        let key = prop::sample::select(keys);
        object(key, value(), 8)
    }

    /// A flat object of up to `most` fields of `key` and `value`, sometimes with whitespace or
    /// a trailing comma.
    fn object(
        key: impl Strategy<Value = &'static str>,
        value: impl Strategy<Value = String>,
        most: usize,
    ) -> impl Strategy<Value = String> {
        (prop::collection::vec((key, value), 0..most), 0..8u8).prop_map(|(fields, quirk)| {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            let mut l = format!("{{{}}}", body.join(","));
            match quirk {
                0 => l = l.replacen(':', ": ", 1),
                1 => l.insert(l.len() - 1, ','),
                2 => l.push(' '),
                _ => {}
            }
            l
        })
    }

    /// A number field: mostly valid forms, sometimes any value.
    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => (0.0..1e4f64).prop_map(|x| format!("{x}")),
            2 => (0u64..=1_800_000_000).prop_map(|x| x.to_string()),
            1 => (1u32..9, -5i32..12).prop_map(|(m, e)| format!("{m}e{e}")),
            1 => value(),
        ]
    }

    /// A string field: mostly one of `valid`, sometimes any value.
    fn string(valid: Vec<&'static str>) -> impl Strategy<Value = String> {
        prop_oneof![4 => prop::sample::select(valid).prop_map(|s| format!("\"{s}\"")), 1 => value()]
    }

    /// The price fields a tick has, in a random order, three to six of them, values mostly valid.
    fn tick_line() -> impl Strategy<Value = String> {
        let coins = vec![
            "coingecko:eth",
            "ethereum:0xAbC",
            "Solana:So1",
            "bsc:0x1",
            "coingecko:coin-1",
        ];
        let fields = (
            string(coins),
            number(),
            number(),
            string(vec!["ETH", "é", "C1"]),
            number(),
            prop_oneof![3 => (0u32..300).prop_map(|d| d.to_string()), 1 => number()],
        );
        (fields, any::<u64>()).prop_map(|((c, p, t, s, conf, d), seed)| {
            let mut fields = vec![
                format!("\"coin\":{c}"),
                format!("\"price\":{p}"),
                format!("\"timestamp\":{t}"),
                format!("\"symbol\":{s}"),
                format!("\"confidence\":{conf}"),
                format!("\"decimals\":{d}"),
            ];
            let n = fields.len() as u64;
            fields.swap(0, (seed % n) as usize);
            fields.swap(1, (seed / n % n) as usize);
            fields.truncate(3 + (seed / 97 % 4) as usize);
            format!("{{{}}}", fields.join(","))
        })
    }

    /// Every field any record has, and one no record has.
    const ALL_KEYS: [&str; 17] = [
        "coin",
        "price",
        "timestamp",
        "symbol",
        "confidence",
        "decimals",
        "protocol_id",
        "chain",
        "tvl",
        "tx_hash",
        "from",
        "to",
        "amount",
        "gwei",
        "account",
        "amount_usd",
        "extra",
    ];

    /// The record kinds read by [`parse_general`].
    fn general_kind() -> impl Strategy<Value = Kind> {
        prop::sample::select(vec![
            Kind::Price,
            Kind::Tvl,
            Kind::Transfer,
            Kind::Gas,
            Kind::Liquidation,
        ])
    }

    /// Any fields of any record, any values, sometimes repeated, sometimes with a quirk.
    fn kind_line() -> impl Strategy<Value = (Kind, String)> {
        let key = prop::sample::select(ALL_KEYS.to_vec());
        (general_kind(), object(key, prop_oneof![value(), number()], 9))
    }

    /// A record's own fields in a random order, values mostly valid.
    fn typical_line() -> impl Strategy<Value = (Kind, String)> {
        let text = || string(vec!["ethereum", "bsc", "ethereum-staking", "0xabc", "é", "u1"]);
        let id = || prop_oneof![string(vec!["2269", "aave"]), number()];
        let coin = || string(vec!["coingecko:eth", "ethereum:0xAbC", "Solana:So1", "eth"]);
        let fields = (
            general_kind(),
            text(),
            text(),
            text(),
            id(),
            coin(),
            number(),
            number(),
            any::<u64>(),
        );
        fields.prop_map(|(kind, t1, t2, t3, id, coin, n1, n2, seed)| {
            let mut fields: Vec<String> = match kind {
                Kind::Tvl => vec![
                    format!("\"protocol_id\":{id}"),
                    format!("\"chain\":{t1}"),
                    format!("\"tvl\":{n1}"),
                ],
                Kind::Transfer => vec![
                    format!("\"chain\":{t1}"),
                    format!("\"tx_hash\":{t2}"),
                    format!("\"coin\":{coin}"),
                    format!("\"from\":{t3}"),
                    format!("\"to\":{t2}"),
                    format!("\"amount\":{n1}"),
                ],
                Kind::Gas => vec![format!("\"chain\":{t1}"), format!("\"gwei\":{n1}")],
                Kind::Liquidation => vec![
                    format!("\"protocol_id\":{id}"),
                    format!("\"chain\":{t1}"),
                    format!("\"account\":{t3}"),
                    format!("\"amount_usd\":{n1}"),
                ],
                _ => vec![
                    format!("\"coin\":{coin}"),
                    format!("\"price\":{n1}"),
                    format!("\"symbol\":{t3}"),
                ],
            };
            fields.push(format!("\"timestamp\":{n2}"));
            let n = fields.len() as u64;
            fields.swap(0, (seed % n) as usize);
            fields.swap(1, (seed / n % n) as usize);
            // Sometimes an optional or required field is left out.
            if seed / 97 % 5 == 0 {
                fields.remove((seed / 7 % n) as usize);
            }
            // Sometimes valid JSON of another form than the plain one.
            let sep = if seed / 11 % 4 == 0 { ", " } else { "," };
            (kind, format!("{{{}}}", fields.join(sep)))
        })
    }

    #[test]
    fn the_generated_records_exercise_both_paths() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = prop_oneof![kind_line(), typical_line()];
        let lines: Vec<(Kind, String)> = (0..4000)
            .map(|_| strategy.new_tree(&mut runner).unwrap().current())
            .collect();
        let plain_ok = lines
            .iter()
            .filter(|(k, l)| plain_raw(l).is_some() && parse_general(*k, l).is_ok())
            .count();
        let plain_bad = lines
            .iter()
            .filter(|(k, l)| plain_raw(l).is_some() && parse_general(*k, l).is_err())
            .count();
        let serde_ok = lines
            .iter()
            .filter(|(k, l)| plain_raw(l).is_none() && parse_general(*k, l).is_ok())
            .count();
        assert!(plain_ok > 400, "plain records: {plain_ok} of 4000");
        assert!(plain_bad > 400, "plain lines with invalid values: {plain_bad}");
        assert!(serde_ok > 100, "records only serde_json reads: {serde_ok}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

        /// Where the direct price reader returns a tick, serde_json's path returns the same one,
        /// bit for bit.
        #[test]
        fn plain_price_agrees_with_serde(l in prop_oneof![line(), tick_line()]) {
            if let Some(tick) = plain_price(&l) {
                let general = parse_serde(Kind::Price, &l);
                prop_assert_eq!(format!("{:?}", general), format!("{:?}", Ok::<_, InvalidRecord>(Record::Price(tick))), "{}", l);
            }
        }

        /// Records of every kind read by the plain path where they can be equal serde_json's,
        /// record for record and error for error.
        #[test]
        fn general_records_agree_with_serde((kind, l) in prop_oneof![kind_line(), typical_line()]) {
            prop_assert_eq!(format!("{:?}", parse_general(kind, &l)), format!("{:?}", parse_serde(kind, &l)), "{}", l);
        }
    }

    /// The coin rule of SPEC §1 written out plainly: split at the first `:`, both sides
    /// non-empty printable ASCII without `:` or `"`; the address lowercased unless the chain
    /// is coingecko or solana (any case), whose prefix alone is lowercased.
    fn coin_model(raw: &str) -> Option<String> {
        let (prefix, rest) = raw.split_once(':')?;
        let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic() && c != ':' && c != '"');
        if !ok(prefix) || !ok(rest) {
            return None;
        }
        let lower = prefix.to_ascii_lowercase();
        if lower == "coingecko" || lower == "solana" {
            Some(format!("{lower}:{rest}"))
        } else {
            Some(format!("{lower}:{}", rest.to_ascii_lowercase()))
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 5_000, ..ProptestConfig::default() })]

        #[test]
        fn coins_normalize_as_the_plain_rule_says(
            raw in prop_oneof![
                "[a-zA-Z]{0,10}:[a-zA-Z0-9]{0,12}",
                "(coingecko|CoinGecko|solana|SOLANA|ethereum|Bsc):[a-zA-Z0-9:\" é-]{0,10}",
                "[ -~é]{0,16}",
            ]
        ) {
            prop_assert_eq!(normalize_coin(&raw), coin_model(&raw), "{:?}", raw);
        }

        /// Numbers read by the short path equal Rust's correctly rounded parse, bit for bit.
        #[test]
        fn json_numbers_equal_rusts_parse(
            int in "0|[1-9][0-9]{0,17}",
            frac in prop::option::of("[0-9]{1,18}"),
            exp in prop::option::of(-30i32..30),
        ) {
            let mut t = int.clone();
            if let Some(f) = &frac {
                t = format!("{t}.{f}");
            }
            if let Some(e) = exp {
                t = format!("{t}e{e}");
            }
            let want = t.parse::<f64>().ok().filter(|x| x.is_finite());
            prop_assert_eq!(json_number(&t).map(f64::to_bits), want.map(f64::to_bits), "{}", t);
        }
    }

    #[test]
    fn the_generated_lines_exercise_both_paths() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = prop_oneof![line(), tick_line()];
        let lines: Vec<String> = (0..4000)
            .map(|_| strategy.new_tree(&mut runner).unwrap().current())
            .collect();
        let plain = lines.iter().filter(|l| plain_price(l).is_some()).count();
        let general_ok = lines.iter().filter(|l| parse_general(Kind::Price, l).is_ok()).count();
        assert!(plain > 400, "direct reads: {plain} of 4000");
        assert!(
            general_ok > plain,
            "lines only the general parser reads: {}",
            general_ok - plain
        );
        assert!(
            lines.len() - general_ok > 400,
            "invalid lines: {}",
            lines.len() - general_ok
        );
    }

    #[test]
    fn plain_price_reads_the_common_shape_and_leaves_the_rest() {
        let l = r#"{"coin":"coingecko:coin-15205","confidence":0.99,"price":130.03195549430862,"symbol":"C15205","timestamp":1717000000.086}"#;
        let t = plain_price(l).expect("the common shape");
        assert_eq!(
            (t.price, t.timestamp, t.decimals),
            (130.031_955_494_308_62, 1_717_000_000_086, None)
        );
        for other in [
            r#"{"coin":"coingecko:x", "price":1,"timestamp":1}"#,
            r#"{"coin":"coingecko:x","price":1,"timestamp":1,"symbol":null}"#,
            r#"{"coin":"coingecko:x","price":-1,"timestamp":1}"#,
            r#"{"coin":"coingecko:x","price":1,"price":2,"timestamp":1}"#,
            r#"{"coin":"coingecko:x","price":1,"timestamp":1,"extra":1}"#,
            r#"{"coin":"coingecko:\u0078","price":1,"timestamp":1}"#,
        ] {
            assert!(plain_price(other).is_none(), "{other}");
        }
    }

    #[test]
    fn price_ok_and_extra_fields_ignored() {
        let r = parse_record(
            Kind::Price,
            r#"{"coin":"coingecko:ethereum","price":3791.12,"timestamp":1717430350,"symbol":"ETH","confidence":0.99,"decimals":18,"extra":{"a":[1]}}"#,
        )
        .unwrap();
        let Record::Price(p) = r else { panic!() };
        assert_eq!(p.coin, "coingecko:ethereum");
        assert_eq!(p.timestamp, 1_717_430_350_000);
        assert_eq!(p.decimals, Some(18));
    }

    #[test]
    fn doubles_are_parsed_exactly() {
        // Without serde_json's `float_roundtrip` this reads as 147.17139364252645.
        let r = parse_record(
            Kind::Price,
            r#"{"coin":"coingecko:coin-0","price":147.17139364252643,"timestamp":1717000562.698}"#,
        )
        .unwrap();
        let Record::Price(p) = r else { panic!() };
        assert_eq!(p.price.to_bits(), 147.171_393_642_526_43_f64.to_bits());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                Kind::Price,
                r#"{"coin":"coingecko:eth","price":"x","timestamp":1}"#,
                "`price` must be a number",
            ),
            (
                Kind::Price,
                r#"{"coin":"coingecko:eth","price":-1,"timestamp":1}"#,
                "`price` must be > 0",
            ),
            (
                Kind::Price,
                r#"{"coin":"eth","price":1,"timestamp":1}"#,
                "unknown coin form",
            ),
            (
                Kind::Price,
                r#"{"coin":"coingecko:eth","price":1}"#,
                "missing field `timestamp`",
            ),
            (
                Kind::Price,
                r#"{"coin":"coingecko:eth","price":1e999,"timestamp":1}"#,
                "bad JSON",
            ),
            (
                Kind::Tvl,
                r#"{"protocol_id":"1","chain":"ethereum","timestamp":1}"#,
                "missing field `tvl`",
            ),
            (
                Kind::Transfer,
                r#"{"chain":"ethereum","coin":"ethereum:0xa","amount":1,"timestamp":1}"#,
                "missing field `tx_hash`",
            ),
            (Kind::Gas, r#"[1,2]"#, "not a JSON object"),
            // A key given twice is named as such (it used to read "not a JSON object").
            (
                Kind::Price,
                r#"{"coin":"coingecko:eth","price":1,"price":2,"timestamp":1}"#,
                "invalid JSON object: duplicate field `price`",
            ),
            (
                Kind::Gas,
                r#"{"chain":"ethereum","gwei":1,"gwei":2,"timestamp":1}"#,
                "invalid JSON object: duplicate field `gwei`",
            ),
            (Kind::Gas, r#"{"chain":"ethereum","gwei":1,"timestamp":1"#, "bad JSON"),
            (
                Kind::Liquidation,
                r#"{"protocol_id":"1","chain":"x","amount_usd":null,"timestamp":1}"#,
                "missing field `amount_usd`",
            ),
            (Kind::Protocol, r#"{"id":"1"}"#, "missing field `name`"),
            (
                Kind::Rule,
                r#"{"id":"r","user_id":"u","alert_type":"price_change","conditions":{"coin":"coingecko:x","window":"1h"}}"#,
                "conditions.threshold_pct",
            ),
        ];
        for (kind, line, want) in cases {
            let e = parse_record(kind, line).unwrap_err();
            assert!(e.0.contains(want), "{line}: got `{e}`, want `{want}`");
        }
    }

    #[test]
    fn coin_forms() {
        assert_eq!(normalize_coin("ethereum:0xAbC").as_deref(), Some("ethereum:0xabc"));
        assert_eq!(normalize_coin("solana:AbC").as_deref(), Some("solana:AbC"));
        assert_eq!(
            normalize_coin("coingecko:usd-coin").as_deref(),
            Some("coingecko:usd-coin")
        );
        assert_eq!(normalize_coin("usd-coin"), None);
        assert_eq!(normalize_coin(":x"), None);
        assert_eq!(normalize_coin("a b:c"), None);
    }

    #[test]
    fn numeric_protocol_id() {
        let Record::Tvl(t) = parse_record(
            Kind::Tvl,
            r#"{"protocol_id":2269,"chain":"ethereum","tvl":5,"timestamp":1.5}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(t.protocol_id, "2269");
        assert_eq!(t.timestamp, 1500);
    }
}
