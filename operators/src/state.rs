//! The per-key state machine behind the keyed dataflow operator: lateness and duplicates,
//! windowed change detection, crossings, TVL totals, whale valuation and market events.
//!
//! Pure and sequential: a worker feeds it the envelopes of one epoch in `seq` order, then
//! calls [`KeyedState::end_of_batch`]. All state of a key lives on the worker its key routes
//! to, so every worker count computes the same results.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use schemas::{
    AlertRule, Conditions, DeadLetter, Event, EventData, GasTick, Liquidation, Millis, PriceTick, Protocol, Record,
    SourcePos, Transfer, TvlUpdate,
};

use serde::{Deserialize, Serialize};

use crate::aggregate::{StateDelta, is_sub_bucket};
use crate::candidate::{Candidate, Detail, FastMap, RecordInfo};
use crate::checkpoint::{Captured, CheckpointError};
use crate::config::OpConfig;
use crate::envelope::{Envelope, Item};
use crate::keys::{KeyId, KeyTable};

/// What the keyed operator emits.
#[derive(Clone, Debug)]
pub enum KeyedOut {
    /// A market event.
    Event(Event),
    /// A rule match, before throttling.
    Candidate(Candidate),
    /// A deleted rule whose throttle the throttle stage forgets ([`Item::ForgetRule`]).
    Forget {
        /// The forget's own sequence number.
        seq: u64,
        /// The rule.
        rule_id: String,
    },
    /// A record rejected by the dataflow (e.g. `late`).
    Dead(DeadLetter),
    /// A change to the inputs of the live aggregates.
    State(StateDelta),
    /// A key's latest market event from restored state, for the read view only.
    Restored(Event),
}

/// The record facts shared by all of a record's matches, made on the first match.
fn shared(slot: &mut Option<Arc<RecordInfo>>, make: impl FnOnce() -> RecordInfo) -> Arc<RecordInfo> {
    slot.get_or_insert_with(|| Arc::new(make())).clone()
}

/// The window of a windowed rule (`price_change`, `tvl_change`).
fn rule_window(rule: &AlertRule) -> Option<Millis> {
    match &rule.conditions {
        Conditions::PriceChange { window, .. } | Conditions::TvlChange { window, .. } => Some(*window),
        _ => None,
    }
}

/// Time-ordered `(time, value)` history.
type History = VecDeque<(Millis, f64)>;

/// Latest value with time ≤ `t`. Searched from the newest point back in growing steps, then
/// by halves: a window's reference point is usually a few points back, in the cache lines the
/// newest point shares (a search by halves from the middle would wait on memory each step).
fn as_of(h: &History, t: Millis) -> Option<f64> {
    // Points before `lo` are at or before `t`, points from `hi` on after it.
    let (mut lo, mut hi, mut step) = (0, h.len(), 1);
    while hi >= step {
        let j = hi - step;
        if h[j].0 <= t {
            lo = j + 1;
            break;
        }
        hi = j;
        step *= 2;
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if h[mid].0 <= t {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo.checked_sub(1).map(|i| h[i].1)
}

/// Percent change from the value as of `t - window` to `now`.
fn change(h: &History, t: Millis, window: Millis, now: f64) -> Option<f64> {
    let r = as_of(h, t - window)?;
    if r == 0.0 {
        return None;
    }
    // Finite inputs can still overflow (5e-324 → 1.8e308): no change rather than ±inf.
    Some((now - r) / r * 100.0).filter(|p| p.is_finite())
}

/// Drops history older than `retention` before `newest`, keeping the one entry at or before
/// the cut (it is the reference for the longest window).
fn prune(h: &mut History, newest: Millis, retention: Millis) {
    let cut = newest - retention;
    while h.len() >= 2 && h[1].0 <= cut {
        h.pop_front();
    }
}

/// Pushes a point, replacing the last one when it has the same time.
fn push_point(h: &mut History, t: Millis, v: f64) {
    match h.back_mut() {
        Some(last) if last.0 == t => last.1 = v,
        _ => h.push_back((t, v)),
    }
}

/// Arrival-order gate of a series whose records are identified by content (transfers,
/// liquidations): older than the newest accepted is late; identical to one accepted at the
/// newest timestamp is a duplicate.
#[derive(Default, Debug, Serialize, Deserialize)]
struct SeriesGate {
    last_ts: Option<Millis>,
    ids_at_last_ts: Vec<String>,
}

/// What a [`SeriesGate`] says of a record.
enum Gate {
    Accept,
    Late,
    Duplicate,
}

impl SeriesGate {
    fn admit(&mut self, ts: Millis, identity: &str) -> Gate {
        match self.last_ts {
            Some(last) if ts < last => return Gate::Late,
            Some(last) if ts == last => {
                if self.ids_at_last_ts.iter().any(|i| i == identity) {
                    return Gate::Duplicate;
                }
            }
            _ => self.ids_at_last_ts.clear(),
        }
        self.ids_at_last_ts.push(identity.to_string());
        self.last_ts = Some(ts);
        Gate::Accept
    }
}

#[derive(Default, Debug, Serialize, Deserialize)]
struct CoinState {
    last_price_ts: Option<Millis>,
    history: History,
    symbol: Option<String>,
    /// Confidence and decimals of the latest tick (for the read view after a restore).
    confidence: Option<f64>,
    decimals: Option<u32>,
    transfers: SeriesGate,
}

impl CoinState {
    /// The `price_update` of the coin's latest tick (`px` at `t`), with its symbol, confidence
    /// and decimals and the changes against its history as of `t − window`.
    fn price_event(&self, coin: String, t: Millis, px: f64) -> Event {
        Event {
            subject: coin.clone(),
            timestamp: t,
            data: EventData::PriceUpdate {
                change_1h: change(&self.history, t, 3_600_000, px),
                change_24h: change(&self.history, t, 86_400_000, px),
                coin,
                price: px,
                symbol: self.symbol.clone(),
                confidence: self.confidence,
                decimals: self.decimals,
                timestamp: t,
            },
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct PendingTotal {
    ts: Millis,
    seq: u64,
}

#[derive(Default, Debug, Serialize, Deserialize)]
struct ProtocolState {
    /// Metadata from `protocol` records / the `protocols` table.
    meta: Option<Protocol>,
    last_tvl_ts: Option<Millis>,
    chain_latest: BTreeMap<String, f64>,
    chain_hist: FastMap<String, History>,
    total_hist: History,
    extra: BTreeMap<String, f64>,
    pending: Option<PendingTotal>,
    liquidations: SeriesGate,
}

impl ProtocolState {
    /// The `tvl_update` of the protocol's total `total` at `t` (changes against the total's
    /// history as of `t − window`).
    fn tvl_event(&self, id: &str, t: Millis, total: f64) -> Event {
        Event {
            subject: id.to_string(),
            timestamp: t,
            data: EventData::TvlUpdate {
                protocol_id: id.to_string(),
                name: self.meta.as_ref().map(|m| m.name.clone()),
                tvl: total,
                chain_tvls: self.chain_latest.clone(),
                extra: self.extra.clone(),
                change_1h: change(&self.total_hist, t, 3_600_000, total),
                change_1d: change(&self.total_hist, t, 86_400_000, total),
                change_7d: change(&self.total_hist, t, 604_800_000, total),
                timestamp: t,
            },
        }
    }

    /// The name alerts show: the protocol's name, else its id.
    fn label(&self, id: &str) -> String {
        self.meta.as_ref().map_or_else(|| id.to_string(), |m| m.name.clone())
    }
}

#[derive(Default, Debug, Serialize, Deserialize)]
struct ChainState {
    last: Option<(Millis, f64)>,
}

/// Early-throttle state of a rule: the throttle applied where rules match, before their
/// matches leave the worker.
///
/// A keyed rule's matches all come from the worker of its key, in `seq` order, so applying
/// the throttle here gives exactly the decisions of the dataflow's throttle stage (which still
/// runs, and passes every match admitted here) while most matches of a busy rule never cross
/// the exchange. Rules that arrived from another route may have fired there
/// ([`Item::ForeignRule`]); those, and filter-less rules (on every worker), are left to the
/// throttle stage.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum Early {
    /// May have fired on another worker: not throttled here.
    Foreign,
    /// Fired last at this event time.
    Fired(Millis),
}

/// A rule in the index, with its early-throttle state beside it (no lookup per match).
#[derive(Debug)]
struct Watched {
    rule: Arc<AlertRule>,
    /// Whether the rule watches one key; filter-less rules are left to the throttle stage.
    keyed: bool,
    /// `None`: not fired yet.
    early: Option<Early>,
}

impl Watched {
    /// A match at `t` as a candidate, unless the early throttle drops it; `info` (the
    /// triggering record, shared by its matches) is made only when one passes.
    fn propose(
        &mut self,
        seq: u64,
        t: Millis,
        value: f64,
        detail: Detail,
        info: impl FnOnce() -> Arc<RecordInfo>,
        out: &mut Vec<KeyedOut>,
    ) {
        if self.admit(t) {
            out.push(KeyedOut::Candidate(Candidate {
                seq,
                rule: self.rule.clone(),
                info: info(),
                triggered_at: t,
                value,
                detail,
            }));
        }
    }

    /// Whether a match at `t` is passed on; records the firing.
    fn admit(&mut self, t: Millis) -> bool {
        if !self.keyed {
            return true;
        }
        match self.early {
            Some(Early::Foreign) => true,
            Some(Early::Fired(last)) if t < last.saturating_add(self.rule.throttle_ms()) => false,
            _ => {
                self.early = Some(Early::Fired(t));
                true
            }
        }
    }
}

/// A key's entry on its worker: its state, once a record of the key arrived, and the rules
/// that watch the key (beside the state: one lookup per record finds both).
#[derive(Debug)]
struct KeyEntry<S> {
    state: Option<S>,
    rules: Vec<Watched>,
}

impl<S> Default for KeyEntry<S> {
    fn default() -> Self {
        KeyEntry {
            state: None,
            rules: Vec::new(),
        }
    }
}

/// One kind of key's entries on this worker (a dense [`KeyTable`]), with the number of keys
/// that hold state (for the `llamaflow_state_entries` gauge, read every epoch). A checkpoint
/// holds it as a map from key to state.
#[derive(Debug)]
struct Keys<S> {
    table: KeyTable<KeyEntry<S>>,
    with_state: usize,
}

impl<S> Default for Keys<S> {
    fn default() -> Self {
        Keys {
            table: KeyTable::default(),
            with_state: 0,
        }
    }
}

impl<S: Default> Keys<S> {
    /// The state (made if new) and the rules of key `name`, numbered `id`.
    fn entry(&mut self, id: KeyId, name: &str) -> (&mut S, &mut Vec<Watched>) {
        let e = self.table.entry(id, name);
        if e.state.is_none() {
            self.with_state += 1;
        }
        (e.state.get_or_insert_default(), &mut e.rules)
    }

    /// The state and the rules of key `name`, numbered `id`, if it holds state.
    fn find(&mut self, id: KeyId, name: &str) -> Option<(&mut S, &mut Vec<Watched>)> {
        let e = self.table.find(id, name)?;
        Some((e.state.as_mut()?, &mut e.rules))
    }

    /// Takes the state of key `name` (its rules stay).
    fn remove(&mut self, id: KeyId, name: &str) -> Option<S> {
        let taken = self.table.find(id, name)?.state.take();
        self.with_state -= usize::from(taken.is_some());
        taken
    }

    /// The rules watching key `name` (its entry made if new).
    fn rules(&mut self, name: &str) -> &mut Vec<Watched> {
        &mut self.table.entry(KeyId::NONE, name).rules
    }

    /// The keys from a checkpoint's map of key to state.
    fn from_states(states: FastMap<String, S>) -> Self {
        let mut keys = Keys::default();
        for (name, st) in states {
            *keys.entry(KeyId::NONE, &name).0 = st;
        }
        keys
    }
}

impl<S> Keys<S> {
    /// Every key holding state, with its state.
    fn states(&self) -> impl Iterator<Item = (&str, &S)> {
        self.table.iter().filter_map(|(n, e)| Some((n, e.state.as_ref()?)))
    }

    /// Every key's rules.
    fn rule_lists(&self) -> impl Iterator<Item = &Vec<Watched>> {
        self.table.iter().map(|(_, e)| &e.rules)
    }

    /// The states in name order (for deterministic output).
    fn sorted(&self) -> Vec<(&str, &S)> {
        let mut v: Vec<(&str, &S)> = self.states().collect();
        v.sort_unstable_by_key(|(n, _)| *n);
        v
    }
}

/// Written as a map from key to state (what [`KeyedImage`] reads).
impl<S: Serialize> Serialize for Keys<S> {
    fn serialize<Ser: serde::Serializer>(&self, serializer: Ser) -> Result<Ser::Ok, Ser::Error> {
        use serde::ser::SerializeMap;
        // Counted here rather than trusting the gauge's count: a checkpoint is rare, and its
        // length must be exact.
        let mut map = serializer.serialize_map(Some(self.states().count()))?;
        for (name, st) in self.states() {
            map.serialize_entry(name, st)?;
        }
        map.end()
    }
}

/// The keyed state of one worker: coins, protocols and chains.
#[derive(Default, Debug)]
struct KeySpace {
    coins: Keys<CoinState>,
    protocols: Keys<ProtocolState>,
    chains: Keys<ChainState>,
}

impl KeySpace {
    /// Every key's rules.
    fn rule_lists(&self) -> impl Iterator<Item = &Vec<Watched>> {
        let coins = self.coins.rule_lists();
        coins.chain(self.protocols.rule_lists()).chain(self.chains.rule_lists())
    }
}

/// Rules held by this worker, by id; each keyed rule is listed with its key's entry
/// ([`KeySpace`]), the others in `any_key`.
#[derive(Default, Debug)]
struct RuleIndex {
    by_id: FastMap<String, Arc<AlertRule>>,
    any_key: Vec<Watched>,
    /// Early-throttle state announced for rules not in the index: `Foreign` from the
    /// [`Item::ForeignRule`] just before the rule's record (or kept for a rule whose version
    /// was refused). A deleted rule leaves nothing here: a re-created one arrives as foreign.
    parked: FastMap<String, Early>,
    /// Incremental snapshots: the epoch of the last snapshot that held every rule (the
    /// base) and the ids of the rules added, changed or removed since; `None` before the
    /// first such snapshot.
    tracked: Option<(u64, FastSet<String>)>,
}

/// A set with the operators' fast hasher.
type FastSet<K> = hashbrown::HashSet<K, foldhash::fast::RandomState>;

impl RuleIndex {
    /// The list a rule is held in: its key's, or `any_key`.
    fn slot<'a>(&'a mut self, keys: &'a mut KeySpace, rule: &AlertRule) -> &'a mut Vec<Watched> {
        match &rule.conditions {
            Conditions::PriceChange { coin, .. }
            | Conditions::PriceThreshold { coin, .. }
            | Conditions::Depeg { coin, .. }
            | Conditions::WhaleMovement { coin: Some(coin), .. } => keys.coins.rules(coin),
            Conditions::TvlChange { protocol_id, .. }
            | Conditions::Liquidation {
                protocol_id: Some(protocol_id),
                ..
            } => keys.protocols.rules(protocol_id),
            Conditions::GasPrice { chain, .. } => keys.chains.rules(chain),
            Conditions::WhaleMovement { coin: None, .. } | Conditions::Liquidation { protocol_id: None, .. } => {
                &mut self.any_key
            }
        }
    }

    fn find<'a>(&'a mut self, keys: &'a mut KeySpace, id: &str) -> Option<(&'a mut Vec<Watched>, usize)> {
        let rule = self.by_id.get(id)?.clone();
        let list = self.slot(keys, &rule);
        let i = list.iter().position(|w| w.rule.id == id)?;
        Some((list, i))
    }

    /// Takes a rule out of the index; returns its early-throttle state.
    fn take(&mut self, keys: &mut KeySpace, id: &str) -> Option<Early> {
        let early = self.find(keys, id).and_then(|(list, i)| list.remove(i).early);
        if self.by_id.remove(id).is_some() {
            self.changed(id);
        }
        early
    }

    /// Records that rule `id` changed since the base (while tracking).
    fn changed(&mut self, id: &str) {
        if let Some((_, changed)) = &mut self.tracked {
            changed.get_or_insert_with(id, str::to_string);
        }
    }

    /// Deletes a rule (or it moved to another worker), with anything announced for it.
    fn remove(&mut self, keys: &mut KeySpace, id: &str) {
        self.take(keys, id);
        self.parked.remove(id);
    }

    /// A version of the rule was refused: the older one goes, but a rule that may have fired
    /// elsewhere stays announced as such for a later version.
    fn refuse(&mut self, keys: &mut KeySpace, id: &str) {
        if let Some(Early::Foreign) = self.take(keys, id) {
            self.parked.insert(id.to_string(), Early::Foreign);
        }
    }

    fn upsert(&mut self, keys: &mut KeySpace, rule: AlertRule) {
        // An update in place keeps its early state; an announcement takes precedence.
        let kept = self.take(keys, &rule.id);
        let early = self.parked.remove(&rule.id).or(kept);
        let rule = Arc::new(rule);
        let keyed = crate::envelope::rule_key(&rule).is_some();
        self.slot(keys, &rule).push(Watched {
            rule: rule.clone(),
            keyed,
            early,
        });
        self.changed(&rule.id);
        self.by_id.insert(rule.id.clone(), rule);
    }

    /// The rule may have fired on another worker ([`Item::ForeignRule`]).
    fn foreign(&mut self, keys: &mut KeySpace, id: String) {
        match self.find(keys, &id) {
            Some((list, i)) => list[i].early = Some(Early::Foreign),
            None => {
                self.parked.insert(id, Early::Foreign);
            }
        }
    }

    /// Every rule's early-throttle state (rules that never fired have none).
    fn early_states<'a>(&'a self, keys: &'a KeySpace) -> FastMap<&'a str, Early> {
        let watched = keys.rule_lists().flatten().chain(&self.any_key);
        let held = watched.filter_map(|w| w.early.map(|e| (w.rule.id.as_str(), e)));
        let parked = self.parked.iter().map(|(id, e)| (id.as_str(), *e));
        held.chain(parked).collect()
    }
}

/// A worker's keyed state as [`KeyedState::capture`] writes it and [`KeyedState::restore`] reads it.
#[derive(Default, Serialize, Deserialize)]
struct KeyedImage {
    /// `None`: `rules` holds every rule. `Some(e)`: an incremental image, whose `rules` and
    /// `removed` are the changes since the worker's snapshot of epoch `e` ([`rebase_keyed`]).
    /// First, so that it is read without decoding the rest ([`rule_base`]).
    base: Option<u64>,
    coins: FastMap<String, CoinState>,
    protocols: FastMap<String, ProtocolState>,
    chains: FastMap<String, ChainState>,
    rules: Vec<AlertRule>,
    /// Early-throttle state by rule id (always all of it).
    early: FastMap<String, Early>,
    /// An incremental image: the rules removed since the base.
    removed: Vec<String>,
}

/// Incremental snapshots: at most this many rules changed since the base (or a quarter of
/// the rules, if more) are written as changes; beyond, every rule is written again and
/// becomes the new base.
const MIN_DELTA_RULES: usize = 64;

/// The base epoch of an encoded [`KeyedImage`] (see [`KeyedImage::base`]).
pub(crate) fn rule_base(bytes: &[u8]) -> Result<Option<u64>, CheckpointError> {
    Ok(bincode::deserialize(bytes)?)
}

/// An incremental image (`delta`) made whole with the rules of `base`, the same worker's
/// image at the delta's base epoch (which holds every rule); a whole `delta` is returned as
/// it is.
pub(crate) fn rebase_keyed(image: &[u8], base: &[u8]) -> Result<Vec<u8>, CheckpointError> {
    let Some(at) = rule_base(image)? else {
        return Ok(image.to_vec());
    };
    let delta: KeyedImage = bincode::deserialize(image)?;
    let base: KeyedImage = bincode::deserialize(base)?;
    if let Some(older) = base.base {
        return Err(CheckpointError::BaseNotWhole(at, older));
    }
    let mut rules: FastMap<String, AlertRule> = base.rules.into_iter().map(|r| (r.id.clone(), r)).collect();
    for id in &delta.removed {
        rules.remove(id);
    }
    for rule in delta.rules {
        rules.insert(rule.id.clone(), rule);
    }
    let whole = KeyedImage {
        base: None,
        coins: delta.coins,
        protocols: delta.protocols,
        chains: delta.chains,
        rules: rules.into_values().collect(),
        early: delta.early,
        removed: Vec::new(),
    };
    Ok(bincode::serialize(&whole)?)
}

/// The keyed state of every worker of a checkpoint (encoded images, in any number) re-split
/// over `workers` workers as the dataflow routes it: each coin, protocol and chain to
/// [`crate::envelope::worker_of`] its key's hash; each keyed rule, with its early-throttle
/// state, beside its key; filter-less rules to every worker. Other early states (parked
/// rules) become `Foreign` on every worker, which only leaves those rules' throttling to the
/// throttle stage.
pub(crate) fn split_keyed(images: &[&[u8]], workers: usize) -> Result<Vec<Vec<u8>>, CheckpointError> {
    use crate::envelope::{Key, rule_key, worker_of};
    let workers = workers.max(1);
    let mut out: Vec<KeyedImage> = (0..workers).map(|_| KeyedImage::default()).collect();
    let mut any_key: BTreeMap<String, AlertRule> = BTreeMap::new();
    let mut owner: FastMap<String, usize> = FastMap::default();
    let mut early = Vec::new();
    for bytes in images {
        let image: KeyedImage = bincode::deserialize(bytes)?;
        if let Some(base) = image.base {
            return Err(CheckpointError::NeedsBase(base));
        }
        for (coin, s) in image.coins {
            out[worker_of(Key::Coin(&coin).hash(), workers)].coins.insert(coin, s);
        }
        for (id, s) in image.protocols {
            out[worker_of(Key::Protocol(&id).hash(), workers)]
                .protocols
                .insert(id, s);
        }
        for (chain, s) in image.chains {
            out[worker_of(Key::Chain(&chain).hash(), workers)]
                .chains
                .insert(chain, s);
        }
        for rule in image.rules {
            match rule_key(&rule).map(|k| worker_of(k.hash(), workers)) {
                Some(w) => {
                    if owner.insert(rule.id.clone(), w).is_none() {
                        out[w].rules.push(rule);
                    }
                }
                None => {
                    any_key.insert(rule.id.clone(), rule);
                }
            }
        }
        early.extend(image.early);
    }
    for rule in any_key.into_values() {
        for image in &mut out {
            image.rules.push(rule.clone());
        }
    }
    for (id, state) in early {
        match owner.get(&id) {
            Some(&w) => {
                out[w].early.insert(id, state);
            }
            None => {
                for image in &mut out {
                    image.early.entry(id.clone()).or_insert(Early::Foreign);
                }
            }
        }
    }
    out.iter().map(|image| Ok(bincode::serialize(image)?)).collect()
}

/// All keyed state of one worker.
#[derive(Debug)]
pub struct KeyedState {
    cfg: OpConfig,
    keys: KeySpace,
    rules: RuleIndex,
    /// Newest event time of the batch's records, for the live state's clock.
    clock: Option<Millis>,
}

fn count_ignored(reason: &'static str) {
    metrics::counter!("llamaflow_ignored_total", "reason" => reason).increment(1);
}

impl KeyedState {
    /// Empty state.
    pub fn new(cfg: OpConfig) -> Self {
        KeyedState {
            cfg,
            keys: KeySpace::default(),
            rules: RuleIndex::default(),
            clock: None,
        }
    }

    /// The state as of the snapshot of `epoch`, to be encoded later. Incremental: when few
    /// rules changed since the last snapshot that held every rule (the base), only those
    /// changes are written ([`KeyedImage::base`]); otherwise every rule, and this snapshot
    /// becomes the base. The keys' state and the early-throttle states are written whole.
    /// Only references are taken here (the rules are shared); the costly encoding runs
    /// off the dataflow's thread, into a [`KeyedImage`].
    pub(crate) fn capture(&mut self, epoch: u64) -> Result<Captured, CheckpointError> {
        let rules = &mut self.rules;
        let limit = (rules.by_id.len() / 4).max(MIN_DELTA_RULES);
        let delta = match &rules.tracked {
            Some((base, changed)) if changed.len() <= limit => Some(*base),
            _ => None,
        };
        // bincode writes a struct as its fields one after another, so the image is the
        // concatenation of its fields' encodings.
        let keys = &self.keys;
        let mut bytes = bincode::serialize(&(delta, &keys.coins, &keys.protocols, &keys.chains))?;
        let (changed, removed): (Vec<Arc<AlertRule>>, Vec<String>) = match (delta, &rules.tracked) {
            (Some(_), Some((_, ids))) => (
                ids.iter().filter_map(|id| rules.by_id.get(id).cloned()).collect(),
                ids.iter()
                    .filter(|id| !rules.by_id.contains_key(*id))
                    .cloned()
                    .collect(),
            ),
            _ => {
                rules.tracked = Some((epoch, FastSet::default()));
                (rules.by_id.values().cloned().collect(), Vec::new())
            }
        };
        let early = bincode::serialize(&rules.early_states(keys))?;
        Ok(Box::new(move || {
            let size = bincode::serialized_size(&changed)? + early.len() as u64 + bincode::serialized_size(&removed)?;
            bytes.reserve(usize::try_from(size).unwrap_or(0));
            bincode::serialize_into(&mut bytes, &changed)?;
            bytes.extend_from_slice(&early);
            bincode::serialize_into(&mut bytes, &removed)?;
            Ok(bytes)
        }))
    }

    /// State captured by [`KeyedState::capture`], run with `cfg`.
    pub fn restore(cfg: OpConfig, bytes: &[u8]) -> Result<Self, CheckpointError> {
        let image: KeyedImage = bincode::deserialize(bytes)?;
        if let Some(base) = image.base {
            return Err(CheckpointError::NeedsBase(base));
        }
        let mut state = KeyedState::new(cfg);
        state.keys = KeySpace {
            coins: Keys::from_states(image.coins),
            protocols: Keys::from_states(image.protocols),
            chains: Keys::from_states(image.chains),
        };
        state.rules.parked = image.early;
        for rule in image.rules {
            state.rules.upsert(&mut state.keys, rule);
        }
        Ok(state)
    }

    /// Number of rules this worker holds (a broadcast rule counts on every worker).
    pub fn rule_count(&self) -> usize {
        self.rules.by_id.len()
    }

    /// Entries of each kind of state this worker holds, for the `llamaflow_state_entries`
    /// gauges: keys (`coins`, `protocols`, `chains`), `rules`, and `parked_rules` (rules
    /// announced as foreign whose version was refused; nothing between batches otherwise).
    pub fn sizes(&self) -> [(&'static str, usize); 5] {
        [
            ("coins", self.keys.coins.with_state),
            ("protocols", self.keys.protocols.with_state),
            ("chains", self.keys.chains.with_state),
            ("rules", self.rules.by_id.len()),
            ("parked_rules", self.rules.parked.len()),
        ]
    }

    /// Total number of history points held (for memory accounting and tests).
    pub fn history_len(&self) -> usize {
        let keys = &self.keys;
        keys.coins.states().map(|(_, c)| c.history.len()).sum::<usize>()
            + keys
                .protocols
                .states()
                .map(|(_, p)| p.total_hist.len() + p.chain_hist.values().map(VecDeque::len).sum::<usize>())
                .sum::<usize>()
    }

    /// Starts loading, from memory into the cache, the entry of the key of `env`, an envelope
    /// some records ahead of the one being processed (the first of two steps, see
    /// [`KeyedState::prefetch_state`]). On prices most of a worker's time is the wait for each
    /// coin's entry and price history from memory: loading a few records ahead overlaps the
    /// waits. Changes nothing else.
    pub fn prefetch_entry(&self, env: &Envelope) {
        use crate::envelope::{Key, record_key};
        let Item::Record(r) = &env.item else { return };
        let keys = &self.keys;
        match record_key(r) {
            Some(Key::Coin(_)) => keys.coins.table.prefetch(env.key),
            Some(Key::Protocol(_)) => keys.protocols.table.prefetch(env.key),
            Some(Key::Chain(_)) => keys.chains.table.prefetch(env.key),
            None => {}
        }
    }

    /// The second step of [`KeyedState::prefetch_entry`], for an envelope nearer the one being
    /// processed, whose entry the first step loaded: starts loading the coin's newest price
    /// point and its rule list.
    pub fn prefetch_state(&self, env: &Envelope) {
        if let Item::Record(Record::Price(_)) = &env.item
            && let Some(e) = self.keys.coins.table.peek(env.key)
        {
            if let Some(point) = e.state.as_ref().and_then(|st| st.history.back()) {
                crate::keys::prefetch(point);
            }
            crate::keys::prefetch(e.rules.as_ptr());
        }
    }

    /// Processes one envelope; call in `seq` order.
    pub fn process(&mut self, env: Envelope, out: &mut Vec<KeyedOut>) {
        let Envelope {
            seq, key, pos, item, ..
        } = env;
        if let Item::Record(r) = &item {
            let ts = r.timestamp();
            if ts > Millis::MIN {
                self.clock = self.clock.max(Some(ts));
            }
        }
        match item {
            Item::DeleteRule(id) => self.rules.remove(&mut self.keys, &id),
            Item::ForeignRule(id) => self.rules.foreign(&mut self.keys, id),
            Item::ForgetRule(rule_id) => out.push(KeyedOut::Forget { seq, rule_id }),
            Item::Record(Record::Rule(rule)) => match rule_window(&rule).filter(|w| *w > self.cfg.max_rule_window) {
                // A window longer than the bound would keep unbounded history for its key: the
                // rule is refused (and an earlier version of it removed).
                Some(w) => {
                    self.rules.refuse(&mut self.keys, &rule.id);
                    metrics::counter!("llamaflow_rules_refused_total", "reason" => "window").increment(1);
                    let reason = format!(
                        "invalid rule: window {} is longer than the maximum of {} (operators.max_rule_window_days)",
                        schemas::time::window_label(w),
                        schemas::time::window_label(self.cfg.max_rule_window)
                    );
                    out.push(KeyedOut::Dead(DeadLetter::new(
                        &pos,
                        reason,
                        &rule.to_json().to_string(),
                    )));
                }
                None => self.rules.upsert(&mut self.keys, *rule),
            },
            Item::Record(Record::Protocol(p)) => self.protocol(key, seq, p, out),
            Item::DeleteProtocol(id) => self.delete_protocol(key, seq, &id, out),
            Item::CloseUpdate { protocol, timestamp } => {
                if self
                    .keys
                    .protocols
                    .find(key, &protocol)
                    .and_then(|(st, _)| st.pending.as_ref())
                    .is_some_and(|p| p.ts == timestamp)
                {
                    self.flush_total(key, &protocol, out);
                }
            }
            Item::Record(Record::Price(p)) => self.price(seq, key, &pos, p, out),
            Item::Record(Record::Transfer(t)) => self.transfer(seq, key, &pos, t, out),
            Item::Record(Record::Tvl(t)) => self.tvl(seq, key, &pos, t, out),
            Item::Record(Record::Liquidation(l)) => self.liquidation(seq, key, &pos, l, out),
            Item::Record(Record::Gas(g)) => self.gas(seq, key, &pos, g, out),
        }
    }

    /// Closes the batch: the live state's clock. (TVL updates do not close with a batch: a
    /// batch may end between their records; see [`Item::CloseUpdate`].)
    pub fn end_of_batch(&mut self, out: &mut Vec<KeyedOut>) {
        if let Some(t) = self.clock.take()
            && self.cfg.live_state
        {
            out.push(KeyedOut::State(StateDelta::Clock(t)));
        }
    }

    fn late(pos: &SourcePos, record: Record, out: &mut Vec<KeyedOut>) {
        out.push(KeyedOut::Dead(DeadLetter::new(pos, "late", &record.to_json())));
    }

    fn protocol(&mut self, key: KeyId, seq: u64, p: Box<Protocol>, out: &mut Vec<KeyedOut>) {
        let (st, _) = self.keys.protocols.entry(key, &p.id);
        if st.meta.as_ref() == Some(&*p) {
            return;
        }
        let id = p.id.clone();
        let old = st.meta.replace((*p).clone());
        if self.cfg.live_state {
            out.push(KeyedOut::State(StateDelta::Meta {
                id,
                old: old.map(Box::new),
                new: Some(p),
                seq,
            }));
        }
    }

    /// Deletes a protocol: its metadata and TVL leave the live state (its rules stay).
    fn delete_protocol(&mut self, key: KeyId, seq: u64, id: &str, out: &mut Vec<KeyedOut>) {
        let Some(st) = self.keys.protocols.remove(key, id) else {
            return;
        };
        if !self.cfg.live_state {
            return;
        }
        for (chain, v) in st.chain_latest {
            if !is_sub_bucket(&chain) {
                out.push(KeyedOut::State(StateDelta::Tvl {
                    protocol: id.to_string(),
                    chain,
                    old: Some(v),
                    new: None,
                }));
            }
        }
        if st.meta.is_some() {
            out.push(KeyedOut::State(StateDelta::Meta {
                id: id.to_string(),
                old: st.meta.map(Box::new),
                new: None,
                seq,
            }));
        }
        out.push(KeyedOut::State(StateDelta::Deleted {
            id: id.to_string(),
            seq,
        }));
    }

    /// The live state this worker holds, after a restore: the aggregates' inputs as
    /// insertions (their arrangements are not in the checkpoint), and the latest price, TVL
    /// and gas of every key as view-only events (they refill the read view; sinks and
    /// subscribers do not see them again).
    pub fn seed(&self, out: &mut Vec<KeyedOut>) {
        if !self.cfg.live_state {
            return;
        }
        let view = KeyedOut::Restored;
        for (id, st) in self.keys.protocols.sorted() {
            if st.meta.is_some() {
                out.push(KeyedOut::State(StateDelta::Meta {
                    id: id.to_string(),
                    old: None,
                    new: st.meta.clone().map(Box::new),
                    // Restored: before every record.
                    seq: 0,
                }));
            }
            for (chain, v) in &st.chain_latest {
                if !is_sub_bucket(chain) {
                    out.push(KeyedOut::State(StateDelta::Tvl {
                        protocol: id.to_string(),
                        chain: chain.clone(),
                        old: None,
                        new: Some(*v),
                    }));
                }
            }
            if let Some(t) = st.last_tvl_ts {
                out.push(KeyedOut::State(StateDelta::Clock(t)));
                let total: f64 = st.chain_latest.values().sum();
                out.push(view(st.tvl_event(id, t, total)));
            }
        }
        for (coin, st) in self.keys.coins.sorted() {
            let Some(&(t, px)) = st.history.back() else { continue };
            out.push(view(st.price_event(coin.to_string(), t, px)));
        }
        for (chain, st) in self.keys.chains.sorted() {
            if let Some((t, gwei)) = st.last {
                out.push(view(Event {
                    subject: chain.to_string(),
                    timestamp: t,
                    data: EventData::GasUpdate {
                        chain: chain.to_string(),
                        gwei,
                        timestamp: t,
                    },
                }));
            }
        }
    }

    fn price(&mut self, seq: u64, key: KeyId, pos: &SourcePos, p: PriceTick, out: &mut Vec<KeyedOut>) {
        if p.confidence.is_some_and(|c| c <= 0.3) {
            count_ignored("low_confidence");
            return;
        }
        let (st, rules) = self.keys.coins.entry(key, &p.coin);
        match st.last_price_ts {
            Some(last) if p.timestamp < last => return Self::late(pos, Record::Price(p), out),
            Some(last) if p.timestamp == last => return count_ignored("duplicate"),
            _ => {}
        }
        if p.symbol.is_some() {
            // Moved, not copied: the tick's text was written on another core.
            st.symbol = p.symbol;
        }
        st.confidence = p.confidence;
        st.decimals = p.decimals;
        let (t, px) = (p.timestamp, p.price);
        let prev = st.history.back().map(|x| x.1);
        let mut info = None;
        let mut retention = self.cfg.price_retention;
        for w in rules {
            let rule = &w.rule;
            if let Conditions::PriceChange { window, .. } = rule.conditions {
                retention = retention.max(window);
            }
            if !rule.enabled {
                continue;
            }
            let (value, detail) = match &rule.conditions {
                Conditions::PriceChange {
                    window,
                    threshold_pct,
                    direction,
                    ..
                } => {
                    let Some(r) = as_of(&st.history, t - window) else {
                        continue;
                    };
                    let pct = (px - r) / r * 100.0;
                    if !pct.is_finite() {
                        count_ignored("non_finite");
                        continue;
                    }
                    if !direction.matches(pct, *threshold_pct) {
                        continue;
                    }
                    (pct, Detail::Change { from: r, to: px })
                }
                Conditions::PriceThreshold { operator, value, .. } => match prev {
                    Some(prev) if operator.holds(px, *value) && !operator.holds(prev, *value) => (px, Detail::Plain),
                    _ => continue,
                },
                Conditions::Depeg { peg, deviation_pct, .. } => {
                    let dev = |x: f64| (x / peg - 1.0).abs() * 100.0;
                    match prev {
                        Some(prev) if dev(px) >= *deviation_pct && dev(prev) < *deviation_pct => (px, Detail::Plain),
                        _ => continue,
                    }
                }
                _ => continue,
            };
            w.propose(
                seq,
                t,
                value,
                detail,
                || {
                    shared(&mut info, || RecordInfo {
                        subject: p.coin.clone(),
                        identity: format!("price|{}|{t}", p.coin),
                        label: st.symbol.clone().unwrap_or_else(|| p.coin.clone()),
                        chain: None,
                    })
                },
                out,
            );
        }
        if self.cfg.emit_events {
            let stable = self.cfg.is_stablecoin(&p.coin, st.symbol.as_deref());
            if let (true, Some(prev)) = (stable, prev) {
                let band = self.cfg.depeg_band_pct;
                let dev = |x: f64| (x - 1.0).abs() * 100.0;
                let state = match (dev(prev) >= band, dev(px) >= band) {
                    (false, true) => Some("enter"),
                    (true, false) => Some("exit"),
                    _ => None,
                };
                if let Some(state) = state {
                    out.push(KeyedOut::Event(Event {
                        subject: p.coin.clone(),
                        timestamp: t,
                        data: EventData::Depeg {
                            coin: p.coin.clone(),
                            symbol: st.symbol.clone(),
                            price: px,
                            peg: 1.0,
                            deviation_pct: dev(px),
                            state,
                            timestamp: t,
                        },
                    }));
                }
            }
            out.push(KeyedOut::Event(st.price_event(p.coin, t, px)));
        }
        st.history.push_back((t, px));
        prune(&mut st.history, t, retention);
        st.last_price_ts = Some(t);
    }

    fn transfer(&mut self, seq: u64, key: KeyId, pos: &SourcePos, tr: Box<Transfer>, out: &mut Vec<KeyedOut>) {
        let (st, rules) = self.keys.coins.entry(key, &tr.coin);
        let identity = format!(
            "transfer|{}|{}|{}|{}|{}|{}",
            tr.chain,
            tr.tx_hash,
            tr.coin,
            tr.from.as_deref().unwrap_or(""),
            tr.to.as_deref().unwrap_or(""),
            tr.amount
        );
        match st.transfers.admit(tr.timestamp, &identity) {
            Gate::Late => return Self::late(pos, Record::Transfer(tr), out),
            Gate::Duplicate => return count_ignored("duplicate"),
            Gate::Accept => {}
        }
        let Some(px) = as_of(&st.history, tr.timestamp) else {
            return;
        };
        let value = tr.amount * px;
        if !value.is_finite() {
            let reason = format!(
                "value out of range: {:e} × {px:e} (amount × price) overflows",
                tr.amount
            );
            return out.push(KeyedOut::Dead(DeadLetter::new(
                pos,
                reason,
                &Record::Transfer(tr).to_json(),
            )));
        }
        let mut info = None;
        let rules = rules.iter_mut().chain(self.rules.any_key.iter_mut());
        for w in rules {
            let rule = &w.rule;
            let Conditions::WhaleMovement { chain, min_usd, .. } = &rule.conditions else {
                continue;
            };
            if !rule.enabled || chain.as_ref().is_some_and(|c| *c != tr.chain) || value < *min_usd {
                continue;
            }
            w.propose(
                seq,
                tr.timestamp,
                value,
                Detail::Whale { amount: tr.amount },
                || {
                    shared(&mut info, || RecordInfo {
                        subject: tr.coin.clone(),
                        identity: identity.clone(),
                        label: st.symbol.clone().unwrap_or_else(|| tr.coin.clone()),
                        chain: Some(tr.chain.clone()),
                    })
                },
                out,
            );
        }
        if self.cfg.emit_events && value >= self.cfg.whale_event_usd {
            out.push(KeyedOut::Event(Event {
                subject: tr.coin.clone(),
                timestamp: tr.timestamp,
                data: EventData::WhaleTransfer {
                    chain: tr.chain,
                    tx_hash: tr.tx_hash,
                    coin: tr.coin,
                    symbol: st.symbol.clone(),
                    from: tr.from,
                    to: tr.to,
                    amount: tr.amount,
                    value_usd: value,
                    timestamp: tr.timestamp,
                },
            }));
        }
    }

    fn tvl(&mut self, seq: u64, key: KeyId, pos: &SourcePos, u: TvlUpdate, out: &mut Vec<KeyedOut>) {
        let pending_older = {
            let (st, _) = self.keys.protocols.entry(key, &u.protocol_id);
            if st.last_tvl_ts.is_some_and(|last| u.timestamp < last) {
                return Self::late(pos, Record::Tvl(u), out);
            }
            // The update at this timestamp was closed (its total evaluated): a record of it
            // that brings a new chain is late; one that repeats only known chains is a
            // duplicate. Either way the total is never evaluated twice for one timestamp.
            if st.last_tvl_ts == Some(u.timestamp) && st.pending.is_none() {
                let t = u.timestamp;
                let known = |c: &String| {
                    st.chain_hist
                        .get(c)
                        .and_then(|h| h.back())
                        .is_some_and(|(ts, _)| *ts == t)
                };
                if u.chains.iter().all(|(c, _)| known(c)) {
                    return count_ignored("duplicate");
                }
                return Self::late(pos, Record::Tvl(u), out);
            }
            st.pending.as_ref().is_some_and(|p| p.ts < u.timestamp)
        };
        if pending_older {
            self.flush_total(key, &u.protocol_id, out);
        }
        let (st, rules) = self.keys.protocols.entry(key, &u.protocol_id);
        // The total after this update must be a number: finite values can add up to +inf.
        let total: f64 = st
            .chain_latest
            .iter()
            .filter(|(c, _)| !u.chains.iter().any(|(uc, _)| uc == *c))
            .map(|(_, v)| *v)
            .chain(u.chains.iter().map(|(_, v)| *v))
            .sum();
        if !total.is_finite() {
            let reason = format!(
                "value out of range: the total TVL of protocol {} would overflow",
                u.protocol_id
            );
            return out.push(KeyedOut::Dead(DeadLetter::new(pos, reason, &Record::Tvl(u).to_json())));
        }
        let label = st.label(&u.protocol_id);
        let t = u.timestamp;
        let mut accepted = false;
        for (chain, tvl) in &u.chains {
            let hist = st.chain_hist.entry_ref(chain.as_str()).or_default();
            if hist.back().is_some_and(|(ts, _)| *ts == t) {
                count_ignored("duplicate");
                continue;
            }
            let mut retention = self.cfg.tvl_retention;
            let mut info = None;
            for w in rules.iter_mut() {
                let rule = &w.rule;
                let Conditions::TvlChange {
                    chain: Some(c),
                    window,
                    threshold_pct,
                    direction,
                    ..
                } = &rule.conditions
                else {
                    continue;
                };
                if c != chain {
                    continue;
                }
                retention = retention.max(*window);
                if !rule.enabled {
                    continue;
                }
                let Some(pct) = change(hist, t, *window, *tvl) else {
                    continue;
                };
                if !direction.matches(pct, *threshold_pct) {
                    continue;
                }
                let r = as_of(hist, t - window).unwrap_or_default();
                w.propose(
                    seq,
                    t,
                    pct,
                    Detail::Change { from: r, to: *tvl },
                    || {
                        shared(&mut info, || RecordInfo {
                            subject: u.protocol_id.clone(),
                            identity: format!("tvl|{}|{chain}|{t}", u.protocol_id),
                            label: label.clone(),
                            chain: Some(chain.clone()),
                        })
                    },
                    out,
                );
            }
            hist.push_back((t, *tvl));
            prune(hist, t, retention);
            let old = st.chain_latest.insert(chain.clone(), *tvl);
            if self.cfg.live_state && old != Some(*tvl) && !is_sub_bucket(chain) {
                out.push(KeyedOut::State(StateDelta::Tvl {
                    protocol: u.protocol_id.clone(),
                    chain: chain.clone(),
                    old,
                    new: Some(*tvl),
                }));
            }
            accepted = true;
        }
        for (k, v) in u.extra {
            st.extra.insert(k, v);
        }
        if accepted {
            st.last_tvl_ts = Some(t);
            st.pending = Some(PendingTotal { ts: t, seq });
        }
    }

    fn flush_total(&mut self, key: KeyId, id: &str, out: &mut Vec<KeyedOut>) {
        let Some((st, rules)) = self.keys.protocols.find(key, id) else {
            return;
        };
        let Some(PendingTotal { ts: t, seq }) = st.pending.take() else {
            return;
        };
        let total: f64 = st.chain_latest.values().sum();
        let label = st.label(id);
        let mut retention = self.cfg.tvl_retention;
        let mut info = None;
        for w in rules {
            let rule = &w.rule;
            let Conditions::TvlChange {
                chain: None,
                window,
                threshold_pct,
                direction,
                ..
            } = &rule.conditions
            else {
                continue;
            };
            retention = retention.max(*window);
            if !rule.enabled {
                continue;
            }
            let Some(pct) = change(&st.total_hist, t, *window, total) else {
                continue;
            };
            if !direction.matches(pct, *threshold_pct) {
                continue;
            }
            let r = as_of(&st.total_hist, t - window).unwrap_or_default();
            w.propose(
                seq,
                t,
                pct,
                Detail::Change { from: r, to: total },
                || {
                    shared(&mut info, || RecordInfo {
                        subject: id.to_string(),
                        identity: format!("tvl|{id}|{t}"),
                        label: label.clone(),
                        chain: None,
                    })
                },
                out,
            );
        }
        if self.cfg.emit_events {
            out.push(KeyedOut::Event(st.tvl_event(id, t, total)));
        }
        push_point(&mut st.total_hist, t, total);
        prune(&mut st.total_hist, t, retention);
    }

    fn liquidation(&mut self, seq: u64, key: KeyId, pos: &SourcePos, l: Liquidation, out: &mut Vec<KeyedOut>) {
        let (st, rules) = self.keys.protocols.entry(key, &l.protocol_id);
        let identity = format!(
            "liquidation|{}|{}|{}|{}|{}",
            l.protocol_id,
            l.chain,
            l.account.as_deref().unwrap_or(""),
            l.amount_usd,
            l.timestamp
        );
        match st.liquidations.admit(l.timestamp, &identity) {
            Gate::Late => return Self::late(pos, Record::Liquidation(l), out),
            Gate::Duplicate => return count_ignored("duplicate"),
            Gate::Accept => {}
        }
        let label = st.label(&l.protocol_id);
        let mut info = None;
        let rules = rules.iter_mut().chain(self.rules.any_key.iter_mut());
        for w in rules {
            let rule = &w.rule;
            let Conditions::Liquidation { chain, min_usd, .. } = &rule.conditions else {
                continue;
            };
            if !rule.enabled || chain.as_ref().is_some_and(|c| *c != l.chain) || l.amount_usd < *min_usd {
                continue;
            }
            w.propose(
                seq,
                l.timestamp,
                l.amount_usd,
                Detail::Plain,
                || {
                    shared(&mut info, || RecordInfo {
                        subject: l.protocol_id.clone(),
                        identity: identity.clone(),
                        label: label.clone(),
                        chain: Some(l.chain.clone()),
                    })
                },
                out,
            );
        }
        if self.cfg.emit_events {
            out.push(KeyedOut::Event(Event {
                subject: l.protocol_id.clone(),
                timestamp: l.timestamp,
                data: EventData::Liquidation {
                    protocol_id: l.protocol_id,
                    chain: l.chain,
                    account: l.account,
                    amount_usd: l.amount_usd,
                    timestamp: l.timestamp,
                },
            }));
        }
    }

    fn gas(&mut self, seq: u64, key: KeyId, pos: &SourcePos, g: GasTick, out: &mut Vec<KeyedOut>) {
        let (st, rules) = self.keys.chains.entry(key, &g.chain);
        let prev = match st.last {
            Some((last, _)) if g.timestamp < last => return Self::late(pos, Record::Gas(g), out),
            Some((last, _)) if g.timestamp == last => return count_ignored("duplicate"),
            Some((_, prev)) => Some(prev),
            None => None,
        };
        let mut info = None;
        for w in rules {
            let rule = &w.rule;
            let Conditions::GasPrice { operator, gwei, .. } = &rule.conditions else {
                continue;
            };
            match prev {
                Some(prev) if rule.enabled && operator.holds(g.gwei, *gwei) && !operator.holds(prev, *gwei) => {}
                _ => continue,
            }
            w.propose(
                seq,
                g.timestamp,
                g.gwei,
                Detail::Plain,
                || {
                    shared(&mut info, || RecordInfo {
                        subject: g.chain.clone(),
                        identity: format!("gas|{}|{}", g.chain, g.timestamp),
                        label: g.chain.clone(),
                        chain: Some(g.chain.clone()),
                    })
                },
                out,
            );
        }
        st.last = Some((g.timestamp, g.gwei));
        if self.cfg.emit_events {
            out.push(KeyedOut::Event(Event {
                subject: g.chain.clone(),
                timestamp: g.timestamp,
                data: EventData::GasUpdate {
                    chain: g.chain,
                    gwei: g.gwei,
                    timestamp: g.timestamp,
                },
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a test does to one kind of keys.
    #[derive(Clone, Debug)]
    enum Op {
        /// A record of key `k` (numbered, or found by name).
        Record(u8, bool),
        /// A rule on key `k` (its entry made, no state).
        Rule(u8),
        /// The key's state removed (a deleted protocol).
        Remove(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..16, any::<bool>()).prop_map(|(k, n)| Op::Record(k, n)),
            (0u8..16).prop_map(Op::Rule),
            (0u8..16).prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// The search from the newest point finds what a scan of every point finds: the value
        /// of the last point at or before `t`, for histories that wrap around their buffer.
        #[test]
        fn as_of_finds_the_last_point_at_or_before_a_time(
            gaps in prop::collection::vec(1i64..50, 0..80),
            popped in 0usize..40,
            free in -10i64..3000,
            pick in prop::option::of((0usize..80, -1i64..=1)),
        ) {
            let mut h = History::new();
            let mut ts = 0;
            for (i, g) in gaps.iter().enumerate() {
                ts += g;
                h.push_back((ts, i as f64));
                // Pops from the front make the points wrap around the ring buffer.
                if i < popped && h.len() > 1 {
                    h.pop_front();
                }
            }
            // A time anywhere, or at a point's time or next to it.
            let t = match pick {
                Some((i, d)) if !h.is_empty() => h[i % h.len()].0 + d,
                _ => free,
            };
            let scan = h.iter().rfind(|(ts, _)| *ts <= t).map(|p| p.1);
            prop_assert_eq!(as_of(&h, t), scan);
        }

        /// Keys numbered or not, with rules or not, removed or not: the gauge's count is the
        /// number of keys holding state, and a checkpoint reads back as the map from key to
        /// state that the same operations give on a plain map (the format before interning).
        #[test]
        fn keys_count_their_states_and_checkpoint_as_a_map(ops in prop::collection::vec(op(), 1..300)) {
            let mut keys: Keys<ChainState> = Keys::default();
            let mut model: BTreeMap<String, ChainState> = BTreeMap::new();
            let mut numbers = crate::keys::Interner::default();
            for (t, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Record(k, numbered) => {
                        let name = format!("chain-{k}");
                        let id = if numbered { numbers.intern(crate::envelope::Key::Chain(&name)).0 } else { KeyId::NONE };
                        keys.entry(id, &name).0.last = Some((t as Millis, k as f64));
                        model.entry(name).or_default().last = Some((t as Millis, k as f64));
                    }
                    Op::Rule(k) => {
                        keys.rules(&format!("chain-{k}"));
                    }
                    Op::Remove(k) => {
                        let name = format!("chain-{k}");
                        prop_assert_eq!(keys.remove(KeyId::NONE, &name).map(|s| s.last), model.remove(&name).map(|s| s.last));
                    }
                }
                prop_assert_eq!(keys.with_state, model.len());
            }
            let bytes = bincode::serialize(&keys).expect("encodes");
            let read: FastMap<String, ChainState> = bincode::deserialize(&bytes).expect("decodes as a map");
            let read: BTreeMap<String, Option<(Millis, f64)>> = read.into_iter().map(|(k, s)| (k, s.last)).collect();
            let want: BTreeMap<String, Option<(Millis, f64)>> = model.into_iter().map(|(k, s)| (k, s.last)).collect();
            prop_assert_eq!(read, want);
        }
    }
}
