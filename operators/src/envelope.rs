//! What enters the dataflow: records stamped with a global ingest sequence number and a
//! route, produced by the single-threaded [`Sequencer`] in front of the workers.

use schemas::{AlertRule, Conditions, Millis, Record, SourcePos};
use serde::{Deserialize, Serialize};

use crate::keys::{Interner, KeyHash, KeyId};

/// One item on its way into the dataflow.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// Global ingest order: each key's items are processed in `seq` order.
    pub seq: u64,
    /// Exchange route (`route % workers` picks the worker).
    pub route: u64,
    /// The number of the key the item is about, when the sequencer gave it one (see
    /// [`crate::keys`]): the worker's shortcut to the key's state.
    pub key: KeyId,
    /// Source position, for dead letters.
    pub pos: SourcePos,
    /// The payload.
    pub item: Item,
}

/// Payload of an [`Envelope`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Item {
    /// A record; rules and protocols are upserts.
    Record(Record),
    /// Removes a rule.
    DeleteRule(String),
    /// Removes a protocol's metadata and TVL from the live state.
    DeleteProtocol(String),
    /// Comes with a rule arriving from another route (a key change) or re-created after a
    /// delete: it may have fired before, elsewhere, so only the throttle stage may throttle it.
    ForeignRule(String),
    /// A deleted rule's throttle can no longer matter (SPEC §2 as docs/ARCHITECTURE.md
    /// decides it): the throttle stage forgets the rule's last firing.
    ForgetRule(String),
    /// Closes a protocol's TVL update (its records at one timestamp, SPEC §2): its total is
    /// evaluated now. Updates also close when a newer record of the protocol arrives.
    CloseUpdate {
        /// The protocol.
        protocol: String,
        /// The update's timestamp.
        timestamp: schemas::Millis,
    },
}

/// The key a record or rule is partitioned by: all state of one key lives on one worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key<'a> {
    /// A coin: prices, transfers, coin rules.
    Coin(&'a str),
    /// A protocol: TVL, liquidations, protocol metadata, protocol rules.
    Protocol(&'a str),
    /// A chain: gas.
    Chain(&'a str),
}

impl Key<'_> {
    /// Stable 64-bit hash (FNV-1a with a final mix), identical in every process and run.
    pub fn hash(self) -> u64 {
        let (tag, s) = match self {
            Key::Coin(s) => (1u8, s),
            Key::Protocol(s) => (2, s),
            Key::Chain(s) => (3, s),
        };
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in std::iter::once(tag).chain(s.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        mix(h)
    }
}

/// splitmix64's finalizer: spreads FNV's bits so low bits pick workers evenly.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The route of a rule's throttle state (the throttle stage's exchange).
pub fn throttle_route(rule_id: &str) -> u64 {
    mix(Key::Chain(rule_id).hash())
}

/// The worker (of `workers` in all) a route goes to: timely's exchange takes the route
/// modulo the number of workers.
pub fn worker_of(route: u64, workers: usize) -> usize {
    (route % workers.max(1) as u64) as usize
}

/// The partition key of a data record (`None` for rules, which route by their conditions).
pub fn record_key(r: &Record) -> Option<Key<'_>> {
    Some(match r {
        Record::Price(p) => Key::Coin(&p.coin),
        Record::Transfer(t) => Key::Coin(&t.coin),
        Record::Tvl(t) => Key::Protocol(&t.protocol_id),
        Record::Liquidation(l) => Key::Protocol(&l.protocol_id),
        Record::Protocol(p) => Key::Protocol(&p.id),
        Record::Gas(g) => Key::Chain(&g.chain),
        Record::Rule(_) => return None,
    })
}

/// The key a rule lives under; `None` for filter-less whale / liquidation rules, which every
/// worker holds.
pub fn rule_key(rule: &AlertRule) -> Option<Key<'_>> {
    match &rule.conditions {
        Conditions::PriceChange { coin, .. }
        | Conditions::PriceThreshold { coin, .. }
        | Conditions::Depeg { coin, .. } => Some(Key::Coin(coin)),
        Conditions::WhaleMovement { coin, .. } => coin.as_deref().map(Key::Coin),
        Conditions::TvlChange { protocol_id, .. } => Some(Key::Protocol(protocol_id)),
        Conditions::Liquidation { protocol_id, .. } => protocol_id.as_deref().map(Key::Protocol),
        Conditions::GasPrice { chain, .. } => Some(Key::Chain(chain)),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Route {
    One(u64),
    All,
}

/// Where a [`Sequencer`] puts the envelopes it stamps: a `Vec` in stamp order, or
/// [`ByWorker`].
pub trait Envelopes {
    /// Takes one envelope.
    fn put(&mut self, envelope: Envelope);
}

impl Envelopes for Vec<Envelope> {
    fn put(&mut self, envelope: Envelope) {
        self.push(envelope);
    }
}

/// Envelopes split by worker as they are stamped, each into its worker's batch ([`worker_of`]
/// of its route), so one process's engine hands them over without another copy.
#[derive(Debug)]
pub struct ByWorker {
    parts: Vec<Vec<Envelope>>,
    len: usize,
}

impl ByWorker {
    /// Empty batches for `workers` workers, room for about `capacity` envelopes in all.
    pub fn new(workers: usize, capacity: usize) -> ByWorker {
        let workers = workers.max(1);
        ByWorker {
            parts: (0..workers)
                .map(|_| Vec::with_capacity(capacity / workers + 16))
                .collect(),
            len: 0,
        }
    }

    /// Envelopes held, in all batches.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no envelope is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The batches, worker by worker (each in stamp order).
    pub fn into_parts(self) -> Vec<Vec<Envelope>> {
        self.parts
    }
}

impl Envelopes for ByWorker {
    fn put(&mut self, envelope: Envelope) {
        let w = match self.parts.len() {
            1 => 0,
            n => worker_of(envelope.route, n),
        };
        self.parts[w].push(envelope);
        self.len += 1;
    }
}

/// Stamps records with sequence numbers and routes, and keeps rules routed consistently:
/// a rule whose key changes is deleted where it lived before being inserted where it goes.
///
/// Its maps are persistent (structurally shared), so the copy a checkpoint cut takes costs
/// O(1) however many rules there are, not a stall of the ingest front.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sequencer {
    workers: u64,
    next_seq: u64,
    /// Each live rule's route and throttle.
    rule_routes: imbl::HashMap<String, (Route, Millis)>,
    /// Deleted rules whose throttle may still matter, until their deadline: the newest event
    /// time at the delete plus the deleted version's throttle. A rule re-created before then
    /// keeps its throttle; once a record reaches the deadline, it is forgotten.
    retired: imbl::HashMap<String, Millis>,
    /// `retired` ordered by deadline.
    deadlines: imbl::OrdSet<(Millis, String)>,
    /// The newest event time of any record so far.
    newest: Millis,
    /// The open TVL update of each protocol (its newest timestamp), until closed.
    open_updates: imbl::HashMap<String, schemas::Millis>,
    /// Incremental images: the epoch of the last whole image and the rule ids whose route
    /// changed since (`None` before the first whole image). Not part of an image.
    #[serde(skip)]
    tracked: Option<(u64, imbl::HashSet<String>)>,
    /// The keys routed so far, numbered (see [`crate::keys`]); a shortcut, not state: not
    /// part of an image.
    #[serde(skip)]
    keys: Interner,
}

/// A [`Sequencer`] as a checkpoint holds it: whole, or — when few rule routes changed since
/// the last whole image — without its rule routes, plus the routes changed since that image
/// (the routes are most of it: 1M rules ≈ 35 MB).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SequencerImage {
    /// `None`: whole. `Some(e)`: the changes since the image of epoch `e`.
    base: Option<u64>,
    sequencer: Sequencer,
    routes: Vec<(String, (Route, Millis))>,
    removed: Vec<String>,
}

/// At most this many routes changed since the last whole image (or a quarter of them, if
/// more) make an incremental image.
const MIN_DELTA_ROUTES: usize = 64;

impl SequencerImage {
    /// The epoch of the whole image this one's changes are relative to (`None`: whole).
    pub fn base(&self) -> Option<u64> {
        self.base
    }

    /// The sequencer of a whole image.
    pub fn whole(&self) -> Result<&Sequencer, String> {
        match self.base {
            None => Ok(&self.sequencer),
            Some(e) => Err(format!(
                "the sequencer holds the rule routes changed since the image of epoch {e}: restore it with that base"
            )),
        }
    }

    /// This incremental image made whole with `base`'s rule routes (the whole image at
    /// [`SequencerImage::base`]).
    pub fn rebase(&self, base: &SequencerImage) -> Result<SequencerImage, String> {
        if self.base.is_none() {
            return Ok(self.clone());
        }
        let mut routes = base.whole()?.rule_routes.clone();
        for id in &self.removed {
            routes.remove(id);
        }
        for (id, route) in &self.routes {
            routes.insert(id.clone(), *route);
        }
        Ok(SequencerImage {
            base: None,
            sequencer: Sequencer {
                rule_routes: routes,
                ..self.sequencer.clone()
            },
            routes: Vec::new(),
            removed: Vec::new(),
        })
    }
}

impl Sequencer {
    /// A sequencer for `workers` workers, starting at sequence number `first_seq`.
    pub fn new(workers: usize, first_seq: u64) -> Self {
        Sequencer {
            workers: workers.max(1) as u64,
            next_seq: first_seq,
            rule_routes: imbl::HashMap::new(),
            retired: imbl::HashMap::new(),
            deadlines: imbl::OrdSet::new(),
            newest: Millis::MIN,
            open_updates: imbl::HashMap::new(),
            tracked: None,
            keys: Interner::default(),
        }
    }

    /// The sequencer's image for a checkpoint at `epoch`: incremental when few rule routes
    /// changed since the last whole image, else whole (and the base of the next ones).
    pub fn image(&mut self, epoch: u64) -> SequencerImage {
        let limit = (self.rule_routes.len() / 4).max(MIN_DELTA_ROUTES);
        match &self.tracked {
            Some((base, changed)) if changed.len() <= limit => SequencerImage {
                base: Some(*base),
                routes: changed
                    .iter()
                    .filter_map(|id| self.rule_routes.get(id).map(|r| (id.clone(), *r)))
                    .collect(),
                removed: changed
                    .iter()
                    .filter(|id| !self.rule_routes.contains_key(*id))
                    .cloned()
                    .collect(),
                sequencer: Sequencer {
                    rule_routes: imbl::HashMap::new(),
                    tracked: None,
                    ..self.clone()
                },
            },
            _ => {
                self.tracked = Some((epoch, imbl::HashSet::new()));
                self.whole_image()
            }
        }
    }

    /// Records that rule `id`'s route changed (for incremental images).
    fn route_changed(&mut self, id: &str) {
        if let Some((_, changed)) = &mut self.tracked
            && !changed.contains(id)
        {
            changed.insert(id.to_string());
        }
    }

    /// A whole image of the sequencer as it is (a restore re-split for another shape).
    pub fn whole_image(&self) -> SequencerImage {
        SequencerImage {
            base: None,
            sequencer: Sequencer {
                tracked: None,
                ..self.clone()
            },
            routes: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// The number of workers routes are spread over (every worker of every process).
    pub fn workers(&self) -> usize {
        self.workers as usize
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The sequencers of a checkpoint taken by `parts.len()` processes (in process order),
    /// re-targeted to `processes` processes with `workers` workers in all. With the same
    /// process count each keeps its own state. Otherwise every process gets every rule's
    /// route and sequence numbers above all stamped so far; the deleted rules' deadlines and
    /// the open TVL updates go to process 0, which is refused when another process holds
    /// some (they came from its Kafka partitions, and their new owner is not known).
    pub fn rescale(parts: &[Sequencer], workers: usize, processes: usize) -> Result<Vec<Sequencer>, String> {
        let old = parts.len();
        if old == 0 || processes == 0 {
            return Err("a checkpoint without processes".to_string());
        }
        let workers = workers.max(1) as u64;
        if processes == old {
            return Ok(parts
                .iter()
                .map(|s| Sequencer {
                    workers,
                    tracked: None,
                    ..s.clone()
                })
                .collect());
        }
        if let Some(p) = parts
            .iter()
            .skip(1)
            .position(|s| !s.retired.is_empty() || !s.open_updates.is_empty())
        {
            return Err(format!(
                "process {} of the checkpoint holds deleted rules' throttle deadlines or open TVL updates read \
                 from its Kafka partitions; they cannot move to {processes} processes: restore with {old} processes \
                 (a later checkpoint, once they are settled, may have none)",
                p + 1
            ));
        }
        // Stamped sequence numbers were s × old + p: the new ones start above all of them.
        let most = parts.iter().map(|s| s.next_seq).max().unwrap_or(0);
        let next_seq = (most.saturating_mul(old as u64)).div_ceil(processes as u64) + 1;
        let rule_routes = parts
            .iter()
            .fold(imbl::HashMap::new(), |all, s| all.union(s.rule_routes.clone()));
        let newest = parts.iter().map(|s| s.newest).max().unwrap_or(Millis::MIN);
        Ok((0..processes)
            .map(|p| {
                let first = (p == 0).then(|| &parts[0]);
                Sequencer {
                    workers,
                    next_seq,
                    rule_routes: rule_routes.clone(),
                    retired: first.map(|s| s.retired.clone()).unwrap_or_default(),
                    deadlines: first.map(|s| s.deadlines.clone()).unwrap_or_default(),
                    newest,
                    open_updates: first.map(|s| s.open_updates.clone()).unwrap_or_default(),
                    tracked: None,
                    keys: Interner::default(),
                }
            })
            .collect())
    }

    fn emit(&self, route: Route, seq: u64, pos: &SourcePos, item: Item, out: &mut impl Envelopes) {
        match route {
            Route::One(r) => out.put(Envelope {
                seq,
                route: r,
                key: KeyId::NONE,
                pos: pos.clone(),
                item,
            }),
            Route::All => {
                for w in 0..self.workers {
                    out.put(Envelope {
                        seq,
                        route: w,
                        key: KeyId::NONE,
                        pos: pos.clone(),
                        item: item.clone(),
                    });
                }
            }
        }
    }

    /// Stamps one record and appends its envelope(s) to `out`.
    pub fn push(&mut self, pos: SourcePos, record: Record, out: &mut impl Envelopes) {
        self.push_hinted(pos, record, None, out);
    }

    /// [`Sequencer::push`] of a record whose key was hashed before ([`Sequencer::hint`]).
    pub fn push_hinted(&mut self, pos: SourcePos, record: Record, hint: Option<KeyHash>, out: &mut impl Envelopes) {
        let ts = record.timestamp();
        if ts > self.newest {
            self.newest = ts;
            self.forget_expired(&pos, out);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Record::Rule(rule) = &record {
            let route = rule_key(rule).map_or(Route::All, |k| Route::One(k.hash()));
            self.route_changed(&rule.id);
            // Whether the rule may have fired under another route, or before a delete.
            let foreign = match self.rule_routes.insert(rule.id.clone(), (route, rule.throttle_ms())) {
                Some((old, _)) if old != route => {
                    self.emit(old, seq, &pos, Item::DeleteRule(rule.id.clone()), out);
                    true
                }
                Some(_) => false,
                None => match self.retired.remove(&rule.id) {
                    Some(deadline) => {
                        self.deadlines.remove(&(deadline, rule.id.clone()));
                        true
                    }
                    None => false,
                },
            };
            if foreign && matches!(route, Route::One(_)) {
                self.emit(route, seq, &pos, Item::ForeignRule(rule.id.clone()), out);
            }
            self.emit(route, seq, &pos, Item::Record(record), out);
            return;
        }
        if let Record::Tvl(u) = &record {
            let open = self.open_updates.entry(u.protocol_id.clone()).or_insert(u.timestamp);
            *open = (*open).max(u.timestamp);
        }
        let (key, route) = match (record_key(&record), hint) {
            (Some(k), Some(hash)) => self.keys.intern_hashed(k, hash),
            (Some(k), None) => self.keys.intern(k),
            (None, _) => (KeyId::NONE, 0),
        };
        out.put(Envelope {
            seq,
            route,
            key,
            pos,
            item: Item::Record(record),
        });
    }

    /// The hash of `record`'s key, for [`Sequencer::prefetch`] and [`Sequencer::push_hinted`],
    /// and starts loading what its push will look up first (its key's slot) without waiting:
    /// call some records ahead of its push. A hint: changes nothing.
    pub fn hint(&self, record: &Record) -> Option<KeyHash> {
        let hash = Interner::hash(record_key(record)?);
        self.keys.prefetch(hash, true);
        Some(hash)
    }

    /// Starts loading the entry of the key hashed `hint` (whose slot [`Sequencer::hint`]
    /// loaded): call a few records before its push (see [`Interner::prefetch`]).
    pub fn prefetch(&self, hint: KeyHash) {
        self.keys.prefetch(hint, false);
    }

    /// Stamps a protocol deletion (routed to the protocol's worker).
    pub fn delete_protocol(&mut self, pos: SourcePos, id: &str, out: &mut impl Envelopes) {
        // A deleted protocol's open update is dropped with its state.
        self.open_updates.remove(id);
        let seq = self.next_seq;
        self.next_seq += 1;
        let (key, route) = self.keys.intern(Key::Protocol(id));
        out.put(Envelope {
            seq,
            route,
            key,
            pos,
            item: Item::DeleteProtocol(id.to_string()),
        });
    }

    /// Entries of each kind of state the ingest front holds, for the `llamaflow_state_entries`
    /// gauges: `rule_routes` (live rules), `retired_rules` (deleted rules whose throttle may
    /// still matter), `open_tvl_updates` and `interned_keys` (distinct keys routed, see
    /// [`crate::keys`]).
    pub fn sizes(&self) -> [(&'static str, usize); 4] {
        [
            ("rule_routes", self.rule_routes.len()),
            ("retired_rules", self.retired.len()),
            ("open_tvl_updates", self.open_updates.len()),
            ("interned_keys", self.keys.len()),
        ]
    }

    /// The protocols with an open TVL update.
    pub fn open_updates(&self) -> impl Iterator<Item = &str> {
        self.open_updates.keys().map(String::as_str)
    }

    /// Closes `protocol`'s open TVL update, if any: its total is evaluated in this epoch.
    pub fn close_update(&mut self, pos: SourcePos, protocol: &str, out: &mut impl Envelopes) {
        let Some(timestamp) = self.open_updates.remove(protocol) else {
            return;
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let (key, route) = self.keys.intern(Key::Protocol(protocol));
        out.put(Envelope {
            seq,
            route,
            key,
            pos,
            item: Item::CloseUpdate {
                protocol: protocol.to_string(),
                timestamp,
            },
        });
    }

    /// Closes every open TVL update, in protocol order (the end of an input or of history).
    pub fn close_updates(&mut self, pos: SourcePos, out: &mut impl Envelopes) {
        let mut open: Vec<String> = self.open_updates.keys().cloned().collect();
        open.sort_unstable();
        for p in open {
            self.close_update(pos.clone(), &p, out);
        }
    }

    /// Stamps a rule deletion; unknown rule ids are ignored.
    pub fn delete_rule(&mut self, pos: SourcePos, rule_id: &str, out: &mut impl Envelopes) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some((route, throttle)) = self.rule_routes.remove(rule_id) {
            self.route_changed(rule_id);
            self.emit(route, seq, &pos, Item::DeleteRule(rule_id.to_string()), out);
            let deadline = self.newest.saturating_add(throttle);
            self.retired.insert(rule_id.to_string(), deadline);
            self.deadlines.insert((deadline, rule_id.to_string()));
        }
    }

    /// Forgets the deleted rules whose deadline the newest event time has reached: every
    /// firing of theirs was at or before the newest event time at their delete, so no record
    /// from here on is within their throttle. Each gets its own `seq`, before the record that
    /// reached the deadline (one envelope: only the throttle stage holds anything).
    fn forget_expired(&mut self, pos: &SourcePos, out: &mut impl Envelopes) {
        while let Some((deadline, id)) = self.deadlines.get_min().cloned() {
            if deadline > self.newest {
                break;
            }
            self.deadlines.remove(&(deadline, id.clone()));
            self.retired.remove(&id);
            let seq = self.next_seq;
            self.next_seq += 1;
            out.put(Envelope {
                seq,
                route: 0,
                key: KeyId::NONE,
                pos: pos.clone(),
                item: Item::ForgetRule(id),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(v: serde_json::Value) -> Record {
        Record::Rule(Box::new(AlertRule::from_json(&v).unwrap()))
    }

    proptest::proptest! {
        /// Split as they are stamped, each worker's batch holds exactly the envelopes a split
        /// of the whole batch by route gives it, in stamp order.
        #[test]
        fn envelopes_split_by_worker_as_a_whole_batch_would(
            routes in proptest::collection::vec(proptest::num::u64::ANY, 0..200),
            workers in 1usize..5,
        ) {
            let envelope = |seq: usize, route: u64| Envelope {
                seq: seq as u64,
                route,
                key: KeyId::NONE,
                pos: SourcePos::new("t:".into(), seq as u64),
                item: Item::DeleteRule(format!("r{seq}")),
            };
            let mut split = ByWorker::new(workers, 8);
            for (seq, r) in routes.iter().enumerate() {
                split.put(envelope(seq, *r));
            }
            proptest::prop_assert_eq!(split.len(), routes.len());
            let parts = split.into_parts();
            proptest::prop_assert_eq!(parts.len(), workers);
            for (w, part) in parts.iter().enumerate() {
                let want: Vec<u64> = (0..routes.len() as u64).filter(|&s| routes[s as usize] % workers as u64 == w as u64).collect();
                let got: Vec<u64> = part.iter().map(|e| e.seq).collect();
                proptest::prop_assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn rules_move_between_keys_and_broadcast() {
        let mut s = Sequencer::new(4, 0);
        let pos = SourcePos::new("t:".into(), 1);
        let mut out = Vec::new();
        s.push(
            pos.clone(),
            rule(json!({"id":"r","user_id":"u","alert_type":"whale_movement",
            "conditions":{"min_usd":1}})),
            &mut out,
        );
        assert_eq!(out.len(), 4, "filter-less whale rule goes to every worker");
        assert_eq!(out.iter().map(|e| e.route).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        out.clear();
        s.push(
            pos.clone(),
            rule(json!({"id":"r","user_id":"u","alert_type":"whale_movement",
            "conditions":{"coin":"coingecko:bitcoin","min_usd":1}})),
            &mut out,
        );
        assert_eq!(
            out.len(),
            6,
            "deleted everywhere, then inserted under its coin, marked as foreign"
        );
        assert!(out[..4].iter().all(|e| matches!(e.item, Item::DeleteRule(_))));
        assert!(matches!(out[4].item, Item::ForeignRule(_)));
        assert!(matches!(out[5].item, Item::Record(_)));
        assert!(
            out[4..]
                .iter()
                .all(|e| e.route == Key::Coin("coingecko:bitcoin").hash())
        );
        assert!(out.iter().all(|e| e.seq == 1));
        out.clear();
        s.delete_rule(pos.clone(), "r", &mut out);
        assert_eq!(out.len(), 1);
        out.clear();
        s.delete_rule(pos.clone(), "r", &mut out);
        assert!(out.is_empty());
        // Re-created (under the same key or another) before its throttle deadline: foreign,
        // as it may have fired before.
        let bitcoin = json!({"id":"r","user_id":"u","alert_type":"whale_movement",
            "conditions":{"coin":"coingecko:bitcoin","min_usd":1}});
        s.push(pos.clone(), rule(bitcoin.clone()), &mut out);
        assert_eq!(out.len(), 2);
        assert!(matches!(out[0].item, Item::ForeignRule(_)));
        out.clear();
        s.delete_rule(pos.clone(), "r", &mut out);
        out.clear();
        let mut eth = bitcoin;
        eth["conditions"]["coin"] = json!("coingecko:ethereum");
        s.push(pos, rule(eth), &mut out);
        assert_eq!(out.len(), 2);
        assert!(matches!(out[0].item, Item::ForeignRule(_)));
    }

    fn gas(t: Millis) -> Record {
        Record::Gas(schemas::GasTick {
            chain: "ethereum".into(),
            gwei: 1.0,
            timestamp: t,
        })
    }

    #[test]
    fn a_deleted_rules_throttle_is_forgotten_once_event_time_reaches_its_deadline() {
        let mut s = Sequencer::new(2, 0);
        let pos = SourcePos::new("t:".into(), 1);
        let mut out = Vec::new();
        let r = |id: &str| {
            rule(
                json!({"id":id,"user_id":"u","alert_type":"gas_price","throttle_minutes":1,
                "conditions":{"chain":"ethereum","operator":">","gwei":5}}),
            )
        };
        s.push(pos.clone(), r("a"), &mut out);
        s.push(pos.clone(), r("b"), &mut out);
        s.push(pos.clone(), gas(10_000), &mut out);
        s.delete_rule(pos.clone(), "a", &mut out);
        s.delete_rule(pos.clone(), "b", &mut out);
        // Both deadlines are 10 s + 1 min; "b" comes back before it and is not forgotten.
        s.push(pos.clone(), r("b"), &mut out);
        assert_eq!(s.sizes()[1], ("retired_rules", 1));
        out.clear();
        s.push(pos.clone(), gas(69_999), &mut out);
        assert_eq!(out.len(), 1, "before the deadline nothing is forgotten");
        out.clear();
        s.push(pos.clone(), gas(70_000), &mut out);
        assert_eq!(out.len(), 2);
        assert!(matches!(&out[0].item, Item::ForgetRule(id) if id == "a"));
        assert!(out[0].seq < out[1].seq, "the forget comes before the record");
        assert_eq!(s.sizes()[1], ("retired_rules", 0));
        // Re-created after its deadline: a new rule, nothing foreign.
        out.clear();
        s.push(pos, r("a"), &mut out);
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0].item, Item::Record(_)));
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(
            Key::Coin("coingecko:ethereum").hash(),
            Key::Coin("coingecko:ethereum").hash()
        );
        assert_ne!(Key::Coin("x").hash(), Key::Chain("x").hash());
    }
}
