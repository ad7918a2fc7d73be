//! The live read view (SPEC §8): what `llamaflow` has ingested, as of the last completed
//! epoch, for the read API, WebSocket snapshots and `replay --state-out`.
//!
//! The dataflow computes (prices, protocol TVL, the aggregates on differential); the view only
//! keeps the newest of each, plus the bounded history the history endpoints answer from. It
//! is updated once per completed epoch ([`LiveView::apply`]) into a new version made of
//! persistent maps (`imbl`: a version shares everything it did not change with the one
//! before, so a copy is O(1)); readers take the current version ([`LiveView::current`]) and
//! answer from it alone, without locks held, so every answer is consistent with one epoch.

pub mod api;

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};

use imbl::OrdMap;
use operators::StateOut;
use schemas::{Alert, Event, EventData, Millis, Protocol};
use serde_json::{Value, json};

/// Alerts kept per user for `/alerts/recent` and the `alerts` snapshot.
pub const RECENT_ALERTS: usize = 100;
/// One hour and one day in milliseconds.
const HOUR: Millis = 3_600_000;
const DAY: Millis = 86_400_000;

/// Settings of the view.
#[derive(Clone, Debug)]
pub struct ViewConfig {
    /// Days of hourly protocol points and daily chain points kept (SPEC §8 `history_days`).
    pub history_days: u32,
}

impl Default for ViewConfig {
    fn default() -> Self {
        ViewConfig { history_days: 30 }
    }
}

/// Daily points `(day start, value)`, oldest first, shared between versions.
pub type DailySeries = Arc<VecDeque<(Millis, f64)>>;

/// A protocol's TVL in one UTC hour: `(hour start, total, per chain)`, the hour's last value.
pub type HourPoint = (Millis, f64, Arc<Vec<(String, f64)>>);

/// A protocol as the view holds it: its metadata and its latest `tvl_update`.
#[derive(Clone, Debug, Default)]
pub struct ProtocolEntry {
    /// Metadata, when known.
    pub meta: Option<Protocol>,
    /// The latest `tvl_update` event.
    pub tvl: Option<Event>,
    /// Hourly points, oldest first.
    pub hourly: Arc<VecDeque<HourPoint>>,
}

/// A map key: shared, so that copying a map node (a new version) copies no strings.
pub type Key = Arc<str>;

/// One version of the live state: everything ingested up to one epoch.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// Epochs below this are in the state.
    pub epochs: u64,
    /// Newest event time seen (ms); the `x-llamaflow-as-of` of answers from this version.
    pub as_of: Millis,
    /// Latest `price_update` per coin.
    pub prices: OrdMap<Key, Arc<Event>>,
    /// Protocols with metadata or TVL.
    pub protocols: OrdMap<Key, Arc<ProtocolEntry>>,
    /// Latest `chain_tvl_update` per chain with TVL.
    pub chains: OrdMap<Key, Arc<Event>>,
    /// Latest `category_tvl_update` per category with TVL (`None`: no category).
    pub categories: OrdMap<Option<String>, Arc<Event>>,
    /// Latest `gas_update` per chain.
    pub gas: OrdMap<Key, Arc<Event>>,
    /// TVL over every protocol and chain.
    pub total_tvl: f64,
    /// Daily points per chain `(day start, tvl)`, oldest first.
    pub chain_daily: OrdMap<Key, DailySeries>,
    /// Daily points of the total TVL.
    pub total_daily: DailySeries,
    /// Latest alerts per user, newest first.
    pub alerts: OrdMap<Key, Arc<VecDeque<Arc<Alert>>>>,
    /// Recent depeg / whale / liquidation events (newest first, bounded), for their channels'
    /// snapshots.
    pub recent: OrdMap<&'static str, Arc<VecDeque<Arc<Event>>>>,
    /// Whole-state answers computed from this version, shared by every request that reads it.
    pub(crate) cache: Cache,
}

/// Answers of one [`State`] version that do not depend on the request, computed on first use.
/// A new version shares the previous one's answers whose inputs it did not change (a price
/// tick does not recompute `/v2/chains`); see [`api::refresh`].
#[derive(Clone, Debug, Default)]
pub(crate) struct Cache {
    answers: [Arc<std::sync::OnceLock<axum::body::Bytes>>; api::CACHED],
}

impl Cache {
    /// The answer in slot `slot`, computing it with `make` the first time.
    pub(crate) fn get(&self, slot: usize, make: impl FnOnce() -> String) -> axum::body::Bytes {
        match self.answers.get(slot) {
            Some(cell) => cell.get_or_init(|| make().into()).clone(),
            None => make().into(),
        }
    }

    /// Empties slot `slot` (its inputs changed).
    pub(crate) fn clear(&mut self, slot: usize) {
        if let Some(cell) = self.answers.get_mut(slot) {
            *cell = Arc::default();
        }
    }
}

/// Recent events kept per ticker channel (`depeg`, `whales`, `liquidations`).
const RECENT_EVENTS: usize = 50;

/// Appends `(bucket, value)` to a point series: the same bucket is overwritten (the value at
/// the bucket's last update), points older than `keep_from` dropped.
fn push_point<V: Clone>(series: &mut Arc<VecDeque<(Millis, V)>>, bucket: Millis, v: V, keep_from: Millis) {
    let s = Arc::make_mut(series);
    match s.back_mut() {
        Some(last) if last.0 == bucket => last.1 = v,
        Some(last) if last.0 > bucket => {}
        _ => s.push_back((bucket, v)),
    }
    while s.front().is_some_and(|p| p.0 < keep_from) {
        s.pop_front();
    }
}

impl State {
    fn keep_from(&self, cfg: &ViewConfig, t: Millis) -> Millis {
        t - Millis::from(cfg.history_days) * DAY
    }

    fn event(&mut self, cfg: &ViewConfig, e: &Event) {
        self.as_of = self.as_of.max(e.timestamp);
        let e = Arc::new(e.clone());
        match &e.data {
            EventData::PriceUpdate { coin, .. } => {
                self.prices.insert(Key::from(coin.as_str()), e.clone());
            }
            EventData::TvlUpdate {
                protocol_id,
                tvl,
                chain_tvls,
                timestamp,
                ..
            } => {
                let keep_from = self.keep_from(cfg, *timestamp);
                let p = Arc::make_mut(self.protocols.entry(Key::from(protocol_id.as_str())).or_default());
                let hour = timestamp.div_euclid(HOUR) * HOUR;
                let chains: Vec<(String, f64)> = chain_tvls.iter().map(|(c, v)| (c.clone(), *v)).collect();
                let hourly = Arc::make_mut(&mut p.hourly);
                match hourly.back_mut() {
                    Some(last) if last.0 == hour => *last = (hour, *tvl, Arc::new(chains)),
                    Some(last) if last.0 > hour => {}
                    _ => hourly.push_back((hour, *tvl, Arc::new(chains))),
                }
                while hourly.front().is_some_and(|p| p.0 < keep_from) {
                    hourly.pop_front();
                }
                p.tvl = Some((*e).clone());
            }
            EventData::GasUpdate { chain, .. } => {
                self.gas.insert(Key::from(chain.as_str()), e.clone());
            }
            EventData::ChainTvlUpdate {
                chain, tvl, protocols, ..
            } => {
                if *protocols == 0 {
                    self.chains.remove(chain.as_str());
                } else {
                    self.chains.insert(Key::from(chain.as_str()), e.clone());
                }
                let day = e.timestamp.div_euclid(DAY) * DAY;
                let keep_from = self.keep_from(cfg, e.timestamp);
                let series = self.chain_daily.entry(Key::from(chain.as_str())).or_default();
                push_point(series, day, *tvl, keep_from);
            }
            EventData::CategoryTvlUpdate {
                category, protocols, ..
            } => {
                if *protocols == 0 {
                    self.categories.remove(category);
                } else {
                    self.categories.insert(category.clone(), e.clone());
                }
            }
            EventData::Depeg { .. } | EventData::WhaleTransfer { .. } | EventData::Liquidation { .. } => {
                let channel = match &e.data {
                    EventData::Depeg { .. } => "depeg",
                    EventData::WhaleTransfer { .. } => "whales",
                    _ => "liquidations",
                };
                let list = Arc::make_mut(self.recent.entry(channel).or_default());
                list.push_front(e.clone());
                list.truncate(RECENT_EVENTS);
            }
        }
    }

    fn state(&mut self, cfg: &ViewConfig, s: &StateOut) {
        match s {
            StateOut::Protocol { id, meta } => {
                let p = Arc::make_mut(self.protocols.entry(Key::from(id.as_str())).or_default());
                p.meta.clone_from(meta);
                if p.meta.is_none() && p.tvl.is_none() {
                    self.protocols.remove(id.as_str());
                }
            }
            StateOut::Deleted(id) => {
                self.protocols.remove(id.as_str());
            }
            StateOut::AsOf(t) => self.as_of = self.as_of.max(*t),
            StateOut::Restored(e) => self.event(cfg, e),
            StateOut::Total { tvl, timestamp } => {
                self.as_of = self.as_of.max(*timestamp);
                self.total_tvl = *tvl;
                let day = timestamp.div_euclid(DAY) * DAY;
                let keep_from = self.keep_from(cfg, *timestamp);
                push_point(&mut self.total_daily, day, *tvl, keep_from);
            }
        }
    }

    fn alert(&mut self, a: &Alert) {
        self.as_of = self.as_of.max(a.triggered_at);
        let list = Arc::make_mut(self.alerts.entry(Key::from(a.user_id.as_str())).or_default());
        list.push_front(Arc::new(a.clone()));
        list.truncate(RECENT_ALERTS);
    }
}

/// The parts of a view version that the dataflow's restored state cannot rebuild: the
/// history series and the recent alerts. Checkpoints hold it (the latest prices, TVL, gas and
/// aggregates come back from the operators' restored state).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct HistoryImage {
    /// The version's as-of.
    pub as_of: Millis,
    /// Hourly points per protocol.
    pub hourly: Vec<(Key, Arc<VecDeque<HourPoint>>)>,
    /// Daily points per chain.
    pub chain_daily: Vec<(Key, DailySeries)>,
    /// Daily points of the total.
    pub total_daily: DailySeries,
    /// Recent alerts per user, newest first.
    pub alerts: Vec<(Key, Arc<VecDeque<Arc<Alert>>>)>,
}

impl State {
    /// This version's [`HistoryImage`] (shares the series; copying is for the encoder).
    pub fn history_image(&self) -> HistoryImage {
        HistoryImage {
            as_of: self.as_of,
            hourly: self
                .protocols
                .iter()
                .filter(|(_, p)| !p.hourly.is_empty())
                .map(|(k, p)| (k.clone(), p.hourly.clone()))
                .collect(),
            chain_daily: self.chain_daily.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            total_daily: self.total_daily.clone(),
            alerts: self.alerts.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }
}

/// The dataflow's outputs of one epoch, gathered from the workers: what it changes in the
/// view (and what the output stage hands to the sinks).
#[derive(Debug, Default)]
pub struct Epoch {
    /// The epoch's market events (any order across keys, in order per key).
    pub events: Vec<Event>,
    /// The epoch's alerts, in order.
    pub alerts: Vec<Alert>,
    /// The epoch's other live-state changes, in order.
    pub state: Vec<StateOut>,
}

/// The live read view, shared by the output stage (one writer) and any number of readers.
#[derive(Debug, Default)]
pub struct LiveView {
    cfg: ViewConfig,
    current: RwLock<Arc<State>>,
}

impl LiveView {
    /// An empty view.
    pub fn new(cfg: ViewConfig) -> Self {
        LiveView {
            cfg,
            current: RwLock::new(Arc::new(State::default())),
        }
    }

    /// Starts from a checkpoint's [`HistoryImage`] (call before any epoch is applied).
    pub fn restore_history(&self, image: HistoryImage) {
        let mut next = (*self.current()).clone();
        next.as_of = next.as_of.max(image.as_of);
        for (k, hourly) in image.hourly {
            Arc::make_mut(next.protocols.entry(k).or_default()).hourly = hourly;
        }
        next.chain_daily = image.chain_daily.into_iter().collect();
        next.total_daily = image.total_daily;
        next.alerts = image.alerts.into_iter().collect();
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
    }

    /// The current version: consistent with one epoch, unaffected by later updates.
    pub fn current(&self) -> Arc<State> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Applies the completed epochs below `upto`: the metadata first (a protocol's name is
    /// known before its TVL event of the same epoch is shown), then events, then alerts.
    /// Protocol deletions apply after the epoch's events: a protocol deleted in an epoch is
    /// gone at its end.
    pub fn apply(&self, upto: u64, changes: &Epoch) {
        let prev = self.current();
        let mut next = (*prev).clone();
        let (deletions, others): (Vec<&StateOut>, Vec<&StateOut>) =
            changes.state.iter().partition(|s| matches!(s, StateOut::Deleted(_)));
        for s in others {
            next.state(&self.cfg, s);
        }
        for e in &changes.events {
            next.event(&self.cfg, e);
        }
        for s in deletions {
            next.state(&self.cfg, s);
        }
        for a in &changes.alerts {
            next.alert(a);
        }
        next.epochs = next.epochs.max(upto);
        api::refresh(&prev, &mut next);
        metrics::gauge!("llamaflow_view_entries", "kind" => "prices").set(next.prices.len() as f64);
        metrics::gauge!("llamaflow_view_entries", "kind" => "protocols").set(next.protocols.len() as f64);
        metrics::gauge!("llamaflow_view_entries", "kind" => "chains").set(next.chains.len() as f64);
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
    }
}

/// Serialises an event's `data` (the WebSocket `data` object).
fn data(e: &Event) -> Value {
    serde_json::to_value(&e.data).unwrap_or(Value::Null)
}

/// `data` objects of events, by descending `tvl` then key, for aggregates.
fn by_tvl<'a>(events: impl Iterator<Item = &'a Arc<Event>>) -> Vec<Value> {
    let mut v: Vec<&Arc<Event>> = events.collect();
    v.sort_by(|a, b| tvl_of(b).total_cmp(&tvl_of(a)).then_with(|| a.subject.cmp(&b.subject)));
    v.into_iter().map(|e| data(e)).collect()
}

fn tvl_of(e: &Event) -> f64 {
    match &e.data {
        EventData::ChainTvlUpdate { tvl, .. } | EventData::CategoryTvlUpdate { tvl, .. } => *tvl,
        EventData::TvlUpdate { tvl, .. } => *tvl,
        _ => 0.0,
    }
}

impl State {
    /// The `snapshot` frame data of a WebSocket channel (SPEC §8): the current state of what
    /// the channel carries, as an array of event `data` objects (alerts: the user's recent
    /// alerts, newest first). `None` for a channel this view does not know.
    pub fn snapshot(&self, channel: &str, user_id: Option<&str>) -> Option<Vec<Value>> {
        let one = |e: Option<&Arc<Event>>| e.map(|e| data(e)).into_iter().collect::<Vec<_>>();
        Some(match channel {
            "prices" => self.prices.values().map(|e| data(e)).collect(),
            "tvl" => {
                let mut v: Vec<&Event> = self.protocols.values().filter_map(|p| p.tvl.as_ref()).collect();
                v.sort_by(|a, b| tvl_of(b).total_cmp(&tvl_of(a)).then_with(|| a.subject.cmp(&b.subject)));
                v.into_iter().map(data).collect()
            }
            "chains" => by_tvl(self.chains.values()),
            "categories" => by_tvl(self.categories.values()),
            "gas" => self.gas.values().map(|e| data(e)).collect(),
            "depeg" | "whales" | "liquidations" => self
                .recent
                .get(channel)
                .map(|l| l.iter().map(|e| data(e)).collect())
                .unwrap_or_default(),
            "alerts" => match user_id.and_then(|u| self.alerts.get(u)) {
                Some(list) => list.iter().filter_map(|a| serde_json::to_value(&**a).ok()).collect(),
                None => Vec::new(),
            },
            _ => match channel.split_once(':') {
                Some(("prices", coin)) => one(self.prices.get(coin)),
                Some(("tvl", id)) => self
                    .protocols
                    .get(id)
                    .and_then(|p| p.tvl.as_ref())
                    .map(data)
                    .into_iter()
                    .collect(),
                Some(("gas", chain)) => one(self.gas.get(chain)),
                Some(("chain", chain)) => one(self.chains.get(chain)),
                _ => return None,
            },
        })
    }

    /// The whole state as `replay --state-out` writes it (SPEC §8).
    pub fn document(&self) -> Value {
        json!({
            "as_of": self.as_of,
            "protocols": api::protocols(self),
            "chains": api::chains(self),
            "categories": api::categories(self),
            "prices": api::prices(self, self.prices.keys().map(|k| &**k)),
        })
    }
}
