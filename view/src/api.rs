//! The read API (SPEC §8): DeFiLlama's response shapes, answered from one version of the
//! [`LiveView`], with the version's `x-llamaflow-as-of` header.
//!
//! Unknown slugs and chains answer 404 `{"error":..}`, malformed parameters 400; nothing the
//! client sends can make it answer 500.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use schemas::{EventData, format_seconds};
use serde_json::{Map, Value, json};

use crate::{LiveView, RECENT_ALERTS, State};

/// Most coins one `/prices/current` request may name.
pub const MAX_COINS: usize = 500;

/// Resolves an API key to its user (`None`: unknown key).
pub type KeyResolver = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

#[derive(Clone)]
struct Ctx {
    view: Arc<LiveView>,
    keys: KeyResolver,
}

/// Slots of the whole-state answers cached per view version.
pub(crate) const CACHED: usize = 5;
const PROTOCOLS: usize = 0;
const CHAINS: usize = 1;
const CATEGORIES: usize = 2;
const TOTAL_DAILY: usize = 3;
const CHARTS: usize = 4;

/// Empties the cached answers of `next` whose inputs differ from `prev`'s (compared by
/// identity: a map touched at all counts as changed).
pub(crate) fn refresh(prev: &State, next: &mut State) {
    let changed = [
        (PROTOCOLS, !prev.protocols.ptr_eq(&next.protocols)),
        (CHAINS, !prev.chains.ptr_eq(&next.chains)),
        (CATEGORIES, !prev.categories.ptr_eq(&next.categories)),
        (TOTAL_DAILY, !Arc::ptr_eq(&prev.total_daily, &next.total_daily)),
        (CHARTS, !Arc::ptr_eq(&prev.total_daily, &next.total_daily)),
    ];
    for (slot, changed) in changed {
        if changed {
            next.cache.clear(slot);
        }
    }
}

/// The read API's routes, to merge into the job's router.
pub fn router(view: Arc<LiveView>, keys: KeyResolver) -> Router {
    Router::new()
        .route("/prices/current/{coins}", get(prices_current))
        .route("/protocols", get(|c: AxState<Ctx>| answer(c, PROTOCOLS, protocols)))
        .route("/protocol/{slug}", get(protocol))
        .route("/tvl/{slug}", get(tvl))
        .route("/v2/chains", get(|c: AxState<Ctx>| answer(c, CHAINS, chains)))
        .route("/chains", get(|c: AxState<Ctx>| answer(c, CHAINS, chains)))
        .route(
            "/v2/historicalChainTvl",
            get(|c: AxState<Ctx>| answer(c, TOTAL_DAILY, |s| daily(&s.total_daily, "tvl"))),
        )
        .route("/v2/historicalChainTvl/{chain}", get(|c, p| chain_history(c, p, "tvl")))
        .route(
            "/charts",
            get(|c: AxState<Ctx>| answer(c, CHARTS, |s| daily(&s.total_daily, "totalLiquidityUSD"))),
        )
        .route("/charts/{chain}", get(|c, p| chain_history(c, p, "totalLiquidityUSD")))
        .route("/categories", get(|c: AxState<Ctx>| answer(c, CATEGORIES, categories)))
        .route("/alerts/recent", get(alerts_recent))
        .with_state(Ctx { view, keys })
}

/// A JSON answer with the version's as-of header.
fn reply(state: &State, code: StatusCode, body: &Value) -> Response {
    reply_text(state, code, body.to_string())
}

fn reply_text(state: &State, code: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("x-llamaflow-as-of", HeaderValue::from(state.as_of));
    (code, headers, body.into()).into_response()
}

fn error(state: &State, code: StatusCode, msg: &str) -> Response {
    metrics::counter!("llamaflow_api_errors_total", "code" => code.as_str().to_string()).increment(1);
    reply(state, code, &json!({ "error": msg }))
}

/// A whole-state answer, computed once per view version.
async fn answer(AxState(c): AxState<Ctx>, slot: usize, body: impl Fn(&State) -> Value) -> Response {
    let s = c.view.current();
    let text = s.cache.get(slot, || body(&s).to_string());
    reply_text(&s, StatusCode::OK, text)
}

fn num(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// The `/prices/current` body for `coins` (unknown coins absent).
pub fn prices<'a>(s: &State, coins: impl Iterator<Item = &'a str>) -> Value {
    let mut out = Map::new();
    for coin in coins {
        let Some(e) = s.prices.get(coin) else { continue };
        if let EventData::PriceUpdate {
            price,
            symbol,
            confidence,
            decimals,
            timestamp,
            ..
        } = &e.data
        {
            let mut m = Map::new();
            m.insert("price".into(), num(*price));
            m.insert("symbol".into(), json!(symbol));
            m.insert("timestamp".into(), format_seconds(*timestamp));
            m.insert("confidence".into(), json!(confidence));
            if let Some(d) = decimals {
                m.insert("decimals".into(), json!(d));
            }
            out.insert(coin.to_string(), Value::Object(m));
        }
    }
    json!({ "coins": out })
}

async fn prices_current(c: AxState<Ctx>, Path(coins): Path<String>) -> Response {
    let s = c.view.current();
    let list: Vec<&str> = coins.split(',').map(str::trim).collect();
    if list.len() > MAX_COINS {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            &format!("at most {MAX_COINS} coins per request"),
        );
    }
    // Coin ids as the input normalises them (addresses lowercased, except on solana).
    let Some(norm) = list
        .iter()
        .map(|c| schemas::parse::normalize_coin(c))
        .collect::<Option<Vec<String>>>()
    else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "coins must be comma-separated ids such as coingecko:ethereum or ethereum:0xa0b8…",
        );
    };
    let mut body = prices(&s, norm.iter().map(String::as_str));
    // Answer under the names the client asked for.
    if let Some(Value::Object(m)) = body.get_mut("coins") {
        for (asked, stored) in list.iter().zip(&norm) {
            if *asked != stored
                && let Some(v) = m.remove(stored)
            {
                m.insert((*asked).to_string(), v);
            }
        }
    }
    reply(&s, StatusCode::OK, &body)
}

fn change_fields(e: Option<&schemas::Event>) -> (f64, Value, Value, Value, Value) {
    match e.map(|e| &e.data) {
        Some(EventData::TvlUpdate {
            tvl,
            chain_tvls,
            change_1h,
            change_1d,
            change_7d,
            ..
        }) => (
            *tvl,
            json!(chain_tvls),
            json!(change_1h),
            json!(change_1d),
            json!(change_7d),
        ),
        _ => (0.0, json!({}), Value::Null, Value::Null, Value::Null),
    }
}

/// The `/protocols` body: every protocol with metadata or TVL, by TVL descending.
pub fn protocols(s: &State) -> Value {
    let mut rows: Vec<(f64, &str, Value)> = s
        .protocols
        .iter()
        .map(|(id, p)| {
            let (tvl, chain_tvls, c1h, c1d, c7d) = change_fields(p.tvl.as_ref());
            let m = p.meta.as_ref();
            let chains = m.map_or_else(
                || {
                    p.tvl.as_ref().map_or(json!([]), |_| {
                        json!(chain_tvls.as_object().map(|o| o.keys().collect::<Vec<_>>()))
                    })
                },
                |m| json!(m.chains),
            );
            let id: &str = id;
            let row = json!({
                "id": id,
                "name": m.map_or(id, |m| m.name.as_str()),
                "symbol": m.and_then(|m| m.symbol.as_deref()),
                "slug": m.and_then(|m| m.slug.as_deref()),
                "category": m.and_then(|m| m.category.as_deref()),
                "chains": chains,
                "tvl": num(tvl),
                "chainTvls": chain_tvls,
                "change_1h": c1h,
                "change_1d": c1d,
                "change_7d": c7d,
            });
            (tvl, id, row)
        })
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    Value::Array(rows.into_iter().map(|r| r.2).collect())
}

/// The protocol a slug names: by its slug, else by its id.
fn find_protocol<'a>(s: &'a State, slug: &str) -> Option<(&'a str, &'a crate::ProtocolEntry)> {
    s.protocols
        .iter()
        .find(|(_, p)| p.meta.as_ref().and_then(|m| m.slug.as_deref()) == Some(slug))
        .or_else(|| s.protocols.get_key_value(slug))
        .map(|(k, v)| (&**k, &**v))
}

fn valid_param(p: &str) -> bool {
    !p.is_empty() && p.len() <= 200 && p.bytes().all(|b| b.is_ascii_graphic())
}

async fn protocol(c: AxState<Ctx>, Path(slug): Path<String>) -> Response {
    let s = c.view.current();
    if !valid_param(&slug) {
        return error(&s, StatusCode::BAD_REQUEST, "malformed protocol slug");
    }
    let Some((id, p)) = find_protocol(&s, &slug) else {
        return error(&s, StatusCode::NOT_FOUND, &format!("unknown protocol `{slug}`"));
    };
    let m = p.meta.as_ref();
    let (_, current, ..) = change_fields(p.tvl.as_ref());
    let point = |t: i64, v: f64| json!({ "date": format_seconds(t), "totalLiquidityUSD": num(v) });
    let tvl: Vec<Value> = p.hourly.iter().map(|(t, v, _)| point(*t, *v)).collect();
    let mut per_chain: Map<String, Value> = Map::new();
    for (t, _, chains) in p.hourly.iter() {
        for (chain, v) in chains.iter() {
            let entry = per_chain.entry(chain.clone()).or_insert_with(|| json!({ "tvl": [] }));
            if let Some(Value::Array(a)) = entry.get_mut("tvl") {
                a.push(point(*t, *v));
            }
        }
    }
    let body = json!({
        "id": id,
        "name": m.map_or(id, |m| m.name.as_str()),
        "symbol": m.and_then(|m| m.symbol.as_deref()),
        "category": m.and_then(|m| m.category.as_deref()),
        "chains": m.map_or(json!([]), |m| json!(m.chains)),
        "currentChainTvls": current,
        "tvl": tvl,
        "chainTvls": per_chain,
    });
    reply(&s, StatusCode::OK, &body)
}

async fn tvl(c: AxState<Ctx>, Path(slug): Path<String>) -> Response {
    let s = c.view.current();
    if !valid_param(&slug) {
        return error(&s, StatusCode::BAD_REQUEST, "malformed protocol slug");
    }
    match find_protocol(&s, &slug) {
        Some((_, p)) => reply(&s, StatusCode::OK, &num(change_fields(p.tvl.as_ref()).0)),
        None => error(&s, StatusCode::NOT_FOUND, &format!("unknown protocol `{slug}`")),
    }
}

/// The `/v2/chains` body: every chain with TVL, by TVL descending.
pub fn chains(s: &State) -> Value {
    let rows = crate::by_tvl(s.chains.values());
    Value::Array(
        rows.into_iter()
            .map(|d| {
                let key = d.get("chain").and_then(Value::as_str).unwrap_or_default();
                let info = schemas::chains::chain_info(key);
                json!({
                    "name": d.get("name").cloned().unwrap_or(Value::Null),
                    "tvl": d.get("tvl").cloned().unwrap_or(Value::Null),
                    "gecko_id": info.and_then(|i| i.gecko_id),
                    "tokenSymbol": info.and_then(|i| i.token_symbol),
                    "chainId": info.and_then(|i| i.chain_id),
                })
            })
            .collect(),
    )
}

/// The `/categories` body, by TVL descending.
pub fn categories(s: &State) -> Value {
    Value::Array(crate::by_tvl(s.categories.values()))
}

/// A daily series as `[{"date", <field>}]`.
fn daily(points: &std::collections::VecDeque<(i64, f64)>, field: &str) -> Value {
    Value::Array(
        points
            .iter()
            .map(|(t, v)| {
                let mut m = Map::new();
                m.insert("date".into(), format_seconds(*t));
                m.insert(field.into(), num(*v));
                Value::Object(m)
            })
            .collect(),
    )
}

async fn chain_history(c: AxState<Ctx>, Path(chain): Path<String>, field: &'static str) -> Response {
    let s = c.view.current();
    if !valid_param(&chain) {
        return error(&s, StatusCode::BAD_REQUEST, "malformed chain");
    }
    // The chain's key, its display name (`OP Mainnet`), or the key in any case.
    let by_name = schemas::chains::key_for_name(&chain).map(str::to_string);
    let points = [Some(chain.clone()), by_name, Some(chain.to_ascii_lowercase())]
        .into_iter()
        .flatten()
        .find_map(|k| s.chain_daily.get(k.as_str()));
    match points {
        Some(points) => reply(&s, StatusCode::OK, &daily(points, field)),
        None => error(&s, StatusCode::NOT_FOUND, &format!("unknown chain `{chain}`")),
    }
}

/// `?api_key=` of `/alerts/recent`.
#[derive(serde::Deserialize)]
struct KeyQuery {
    api_key: Option<String>,
}

async fn alerts_recent(c: AxState<Ctx>, Query(q): Query<KeyQuery>, headers: HeaderMap) -> Response {
    let s = c.view.current();
    let key = q.api_key.or_else(|| {
        headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    let Some(key) = key else {
        return error(
            &s,
            StatusCode::UNAUTHORIZED,
            "an API key is required (?api_key= or the x-api-key header)",
        );
    };
    let Some(user) = (c.keys)(&key) else {
        return error(&s, StatusCode::UNAUTHORIZED, "unknown API key");
    };
    let list: Vec<Value> = s
        .alerts
        .get(user.as_str())
        .map(|l| {
            l.iter()
                .take(RECENT_ALERTS)
                .filter_map(|a| serde_json::to_value(&**a).ok())
                .collect()
        })
        .unwrap_or_default();
    reply(&s, StatusCode::OK, &Value::Array(list))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Epoch, LiveView, ViewConfig};
    use schemas::Event;

    fn chain_tvl(tvl: f64, t: i64) -> Event {
        Event {
            subject: "ethereum".into(),
            timestamp: t,
            data: EventData::ChainTvlUpdate {
                chain: "ethereum".into(),
                name: "Ethereum".into(),
                tvl,
                change_1d: None,
                change_7d: None,
                protocols: 1,
            },
        }
    }

    fn price(t: i64) -> Event {
        Event {
            subject: "coingecko:x".into(),
            timestamp: t,
            data: EventData::PriceUpdate {
                coin: "coingecko:x".into(),
                price: 1.0,
                symbol: None,
                confidence: None,
                decimals: None,
                timestamp: t,
                change_1h: None,
                change_24h: None,
            },
        }
    }

    fn epoch(events: Vec<Event>) -> Epoch {
        Epoch {
            events,
            ..Epoch::default()
        }
    }

    #[test]
    fn a_cached_answer_lives_until_its_inputs_change() {
        let view = LiveView::new(ViewConfig::default());
        let chains_of = |view: &LiveView, make: &dyn Fn(&State) -> String| {
            let s = view.current();
            s.cache.get(CHAINS, || make(&s))
        };
        let computed = |s: &State| chains(s).to_string();
        view.apply(1, &epoch(vec![chain_tvl(100.0, 1_000)]));
        let first = chains_of(&view, &computed);
        assert!(
            std::str::from_utf8(&first).is_ok_and(|b| b.contains("\"tvl\":100.0")),
            "{first:?}"
        );
        // A price tick leaves the chains alone: the answer is shared, not recomputed.
        view.apply(2, &epoch(vec![price(2_000)]));
        let again = chains_of(&view, &|_| panic!("recomputed though no chain changed"));
        assert_eq!(again, first);
        assert_eq!(view.current().epochs, 2);
        // A chain's new TVL empties the slot.
        view.apply(3, &epoch(vec![chain_tvl(250.0, 3_000)]));
        let changed = chains_of(&view, &computed);
        assert!(
            std::str::from_utf8(&changed).is_ok_and(|b| b.contains("\"tvl\":250.0")),
            "{changed:?}"
        );
    }
}
