//! The live aggregates (SPEC §3, §8) on differential dataflow: TVL per chain, per category
//! and in total, summed over protocols.
//!
//! ```text
//! Keyed ─► StateDelta ─┬─ chain, diff (µUSD, 1) ──────────────────────► count_total ─┐
//!          (upserts as  ├─ (), diff (µUSD, 1) ────────────────────────► count_total ─┼─► Aggregates (worker 0)
//!           −old, +new) ├─ (protocol, chain) ↦ µUSD ─► reduce Σ per protocol ┐       │    change_1d/7d, events
//!                       └─ protocol ↦ category ──────► ⋈ (∪ antijoin → null) ┴► reduce┘
//! ```
//! The keyed stage owns each protocol's latest TVL per chain and its metadata; it emits every
//! change as a retraction of the old value and an insertion of the new one. Amounts are
//! integers (micro-USD), so sums cancel exactly whatever order updates come in and however
//! they are spread over workers; a protocol that changes category or is deleted moves every
//! aggregate in the same epoch. Sums over many protocols carry the amount in the diff
//! (`count_total`), so a change costs O(1) whatever the number of protocols on a chain. The reductions' arrangements are private to them, so
//! differential compacts them as epochs complete: they hold the current state, not history.

use std::collections::BTreeMap;

use differential_dataflow::operators::CountTotal;
use differential_dataflow::{AsCollection, VecCollection};
use schemas::{Event, EventData, Millis, Protocol};
use serde::{Deserialize, Serialize};
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Concat;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map;

/// One day in milliseconds.
const DAY: Millis = 86_400_000;

/// A change to what the aggregates are computed from, emitted by the keyed stage in the order
/// it processes records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StateDelta {
    /// A protocol's latest TVL on a chain changed (`None`: no value).
    Tvl {
        /// Protocol id.
        protocol: String,
        /// Chain key (never a sub-bucket such as `ethereum-staking`).
        chain: String,
        /// The value before.
        old: Option<f64>,
        /// The value after.
        new: Option<f64>,
    },
    /// A protocol's metadata changed (`None`: none known, or deleted).
    Meta {
        /// Protocol id.
        id: String,
        /// The metadata before.
        old: Option<Box<Protocol>>,
        /// The metadata after.
        new: Option<Box<Protocol>>,
        /// The changing record's sequence number: a protocol's changes within an epoch are
        /// applied in this order (timely may deliver them in another).
        seq: u64,
    },
    /// A protocol was deleted: its TVL left every aggregate (as `Tvl` retractions).
    Deleted {
        /// Protocol id.
        id: String,
        /// The deletion's sequence number (see `Meta`).
        seq: u64,
    },
    /// The newest event time of a worker's epoch (records of every kind).
    Clock(Millis),
}

/// Live-state changes for the read view, besides the market events.
#[derive(Clone, Debug, PartialEq)]
pub enum StateOut {
    /// A protocol's metadata is now `meta` (`None`: removed).
    Protocol {
        /// Protocol id.
        id: String,
        /// The new metadata.
        meta: Option<Protocol>,
    },
    /// A protocol was deleted: it leaves the protocol list with its TVL history.
    Deleted(String),
    /// TVL over every protocol and chain, as of `timestamp` (the newest event time).
    Total {
        /// Sum in USD.
        tvl: f64,
        /// Newest event time so far.
        timestamp: Millis,
    },
    /// The newest event time ingested so far (once per epoch in which it advanced).
    AsOf(Millis),
    /// A key's latest market event from restored state: the view applies it like an event;
    /// it is not published again.
    Restored(Box<Event>),
}

pub use schemas::records::is_sub_bucket;

/// USD as integer micro-USD (saturating: values beyond ±9.2e12 USD are clamped).
pub fn micro(usd: f64) -> i64 {
    // `as` saturates and maps NaN to 0.
    (usd * 1e6).round() as i64
}

/// Integer micro-USD back to USD.
pub fn usd(micro: i128) -> f64 {
    micro as f64 / 1e6
}

/// A protocol's latest TVL on a chain: `((protocol, chain), micro-USD)`.
type TvlRow = ((String, String), i64);

/// A sum and a count of protocols, as the reductions produce them.
type Agg = (i128, i64);

/// What reaches the [`Aggregates`] stage on worker 0: the reductions' changes with their
/// diffs, and the keyed stage's deltas other than TVL.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum AggIn {
    Chain(String, Agg, isize),
    Category(Option<String>, Agg, isize),
    Total(i128, isize),
    Delta(StateDelta),
}

/// A value series with the history needed for `change_1d` / `change_7d`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Series {
    /// (time, value) after each change, oldest first, pruned past 7 days.
    hist: Vec<(Millis, f64)>,
}

impl Series {
    fn as_of(&self, t: Millis) -> Option<f64> {
        let i = self.hist.partition_point(|(ts, _)| *ts <= t);
        i.checked_sub(1).map(|i| self.hist[i].1)
    }

    fn change(&self, now: Millis, window: Millis, v: f64) -> Option<f64> {
        let r = self.as_of(now - window)?;
        let pct = (v - r) / r * 100.0;
        (r != 0.0 && pct.is_finite()).then_some(pct)
    }

    fn push(&mut self, t: Millis, v: f64) {
        match self.hist.last_mut() {
            Some(last) if last.0 == t => last.1 = v,
            _ => self.hist.push((t, v)),
        }
        // Keep one point at or before the 7-day reference.
        let cut = t - 7 * DAY;
        let keep_from = self.hist.partition_point(|(ts, _)| *ts <= cut).saturating_sub(1);
        self.hist.drain(..keep_from);
    }
}

/// The state of the [`Aggregates`] stage: the newest event time and each aggregate's
/// history.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Aggregates {
    clock: Millis,
    chains: BTreeMap<String, Series>,
    categories: BTreeMap<Option<String>, Series>,
}

/// The new value of an aggregate in an epoch: `None` when it left (no protocol any more).
fn latest<K: Ord>(changes: Vec<(K, Agg, isize)>) -> BTreeMap<K, Option<Agg>> {
    let mut out: BTreeMap<K, Option<Agg>> = BTreeMap::new();
    for (k, v, r) in changes {
        let slot = out.entry(k).or_insert(None);
        if r > 0 {
            *slot = Some(v);
        }
    }
    out
}

impl Aggregates {
    /// Turns one epoch's aggregate changes into events (when `events`) and view changes.
    pub(crate) fn epoch(&mut self, batch: Vec<AggIn>, events: bool, out: &mut Vec<AggOut>) {
        let before = self.clock;
        let (mut chains, mut cats, mut totals) = (Vec::new(), Vec::new(), Vec::new());
        let mut views = Vec::new();
        for item in batch {
            match item {
                AggIn::Chain(k, v, r) => chains.push((k, v, r)),
                AggIn::Category(k, v, r) => cats.push((k, v, r)),
                AggIn::Total(v, r) => totals.push(((), (v, 0), r)),
                AggIn::Delta(StateDelta::Clock(t)) => self.clock = self.clock.max(t),
                AggIn::Delta(StateDelta::Meta { id, new, seq, .. }) => views.push((id, seq, Some(new.map(|p| *p)))),
                AggIn::Delta(StateDelta::Deleted { id, seq }) => views.push((id, seq, None)),
                AggIn::Delta(StateDelta::Tvl { .. }) => {}
            }
        }
        // Metadata changes of different protocols come from different workers: order by id;
        // a protocol's own changes by record (timely may deliver an epoch's batches in any
        // order). Only the last record's changes matter to the view: one per protocol, so
        // their order further on cannot matter either.
        views.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        let mut keep = vec![false; views.len()];
        let mut newest: Option<(&str, u64)> = None;
        for (i, (id, seq, _)) in views.iter().enumerate().rev() {
            if newest.is_none_or(|(n, _)| n != id) {
                newest = Some((id, *seq));
            }
            keep[i] = newest.is_some_and(|(_, s)| s == *seq);
        }
        for ((id, _, v), keep) in views.into_iter().zip(keep) {
            if !keep {
                continue;
            }
            out.push(AggOut::State(match v {
                Some(meta) => StateOut::Protocol { id, meta },
                None => StateOut::Deleted(id),
            }));
        }
        let now = self.clock;
        if now > before {
            out.push(AggOut::State(StateOut::AsOf(now)));
        }
        for (chain, v) in latest(chains) {
            let (tvl, protocols) = v.map_or((0.0, 0), |(s, n)| (usd(s), n.max(0) as u64));
            let data = |s: &Series| EventData::ChainTvlUpdate {
                name: schemas::chains::display_name(&chain).to_string(),
                chain: chain.clone(),
                tvl,
                change_1d: s.change(now, DAY, tvl),
                change_7d: s.change(now, 7 * DAY, tvl),
                protocols,
            };
            let series = self.chains.entry(chain.clone()).or_default();
            let data = data(series);
            if protocols == 0 {
                self.chains.remove(&chain);
            } else {
                series.push(now, tvl);
            }
            if events {
                out.push(AggOut::Event(Event {
                    subject: chain.clone(),
                    timestamp: now,
                    data,
                }));
            }
        }
        for (category, v) in latest(cats) {
            let (tvl, protocols) = v.map_or((0.0, 0), |(s, n)| (usd(s), n.max(0) as u64));
            let series = self.categories.entry(category.clone()).or_default();
            let data = EventData::CategoryTvlUpdate {
                category: category.clone(),
                tvl,
                change_1d: series.change(now, DAY, tvl),
                change_7d: series.change(now, 7 * DAY, tvl),
                protocols,
            };
            if protocols == 0 {
                self.categories.remove(&category);
            } else {
                series.push(now, tvl);
            }
            if events {
                out.push(AggOut::Event(Event {
                    subject: category.clone().unwrap_or_else(|| "null".to_string()),
                    timestamp: now,
                    data,
                }));
            }
        }
        if let Some(v) = latest(totals).remove(&()) {
            out.push(AggOut::State(StateOut::Total {
                tvl: v.map_or(0.0, |(s, _)| usd(s)),
                timestamp: now,
            }));
        }
    }
}

/// What the [`Aggregates`] stage produces.
#[derive(Clone, Debug)]
pub(crate) enum AggOut {
    Event(Event),
    State(StateOut),
}

/// Attaches each record's epoch and a diff: `logic` turns a record into `(data, diff)` pairs.
fn updates<'scope, D, D2, R, I, F>(
    stream: StreamVec<'scope, u64, D>,
    name: &str,
    mut logic: F,
) -> VecCollection<'scope, u64, D2, R>
where
    D: 'static,
    D2: Clone + 'static,
    R: Clone + 'static,
    I: IntoIterator<Item = (D2, R)>,
    F: FnMut(&D) -> I + 'static,
{
    stream
        .unary::<timely::container::CapacityContainerBuilder<Vec<(D2, u64, R)>>, _, _, _>(
            Pipeline,
            name,
            move |_, _| {
                move |input, output| {
                    input.for_each_stamp(|cap, data| {
                        let Some(&t) = cap.least() else { return };
                        let mut session = output.session(&cap);
                        for batch in data {
                            for d in batch.iter() {
                                session.give_iterator(logic(d).into_iter().map(|(x, r)| (x, t, r)));
                            }
                        }
                    })
                }
            },
        )
        .as_collection()
}

/// A collection's updates as a stream stamped with each update's own time: differential may
/// send an update under a capability earlier than its time, and the stages after this one
/// group data by the time of their message.
fn at_own_time<'scope, D, T2, F>(
    c: VecCollection<'scope, u64, D, isize>,
    name: &str,
    mut f: F,
) -> StreamVec<'scope, u64, T2>
where
    D: Clone + 'static,
    T2: 'static,
    F: FnMut(D, isize) -> T2 + 'static,
{
    c.inner
        .unary::<timely::container::CapacityContainerBuilder<Vec<T2>>, _, _, _>(Pipeline, name, move |_, _| {
            move |input, output| {
                let port = output.output_index();
                input.for_each_stamp(|cap, data| {
                    let mut by_time: BTreeMap<u64, Vec<T2>> = BTreeMap::new();
                    for batch in data {
                        for (d, t, r) in batch.drain(..) {
                            by_time.entry(t).or_default().push(f(d, r));
                        }
                    }
                    for (t, items) in by_time {
                        output.session(&cap.delayed(&t, port)).give_iterator(items.into_iter());
                    }
                })
            }
        })
}

/// The differential part: from the keyed stage's deltas to the [`Aggregates`] stage's input,
/// every item of an epoch on worker 0 at that epoch.
pub(crate) fn aggregate<'scope>(deltas: StreamVec<'scope, u64, StateDelta>) -> StreamVec<'scope, u64, AggIn> {
    let signed = |v: &Option<f64>, r: isize| v.map(|v| (micro(v), r));
    let tvl = updates(deltas.clone(), "TvlUpdates", move |d| match d {
        StateDelta::Tvl {
            protocol,
            chain,
            old,
            new,
        } => {
            let key = (protocol.clone(), chain.clone());
            let out: Vec<(TvlRow, isize)> = signed(old, -1)
                .into_iter()
                .chain(signed(new, 1))
                .map(|(m, r)| ((key.clone(), m), r))
                .collect();
            out
        }
        _ => Vec::new(),
    });
    let category = updates(deltas.clone(), "Categories", |d| match d {
        StateDelta::Meta { id, old, new, .. } => {
            let cat = |p: &Option<Box<Protocol>>, r: isize| p.as_ref().map(|p| ((id.clone(), p.category.clone()), r));
            cat(old, -1).into_iter().chain(cat(new, 1)).collect()
        }
        _ => Vec::new(),
    });
    // Sums over many protocols (a chain's, the total) carry the amount in the diff, so a change
    // costs O(1) whatever the number of protocols: records `chain` with diff (µUSD, protocols).
    let amounts = |d: &StateDelta| -> Vec<(String, (i128, i128))> {
        let StateDelta::Tvl { chain, old, new, .. } = d else {
            return Vec::new();
        };
        let old = old.map(|v| (chain.clone(), (-i128::from(micro(v)), -1)));
        let new = new.map(|v| (chain.clone(), (i128::from(micro(v)), 1)));
        old.into_iter().chain(new).collect()
    };
    let chains = updates(deltas.clone(), "ChainAmounts", amounts).count_total();
    let chains = at_own_time(chains, "ChainChanges", |(c, (s, n)), r| {
        AggIn::Chain(c, (s, n as i64), r)
    });
    let total = updates(deltas.clone(), "TotalAmounts", move |d| {
        amounts(d).into_iter().map(|(_, a)| ((), a)).collect::<Vec<_>>()
    })
    .count_total();
    let total = at_own_time(total, "TotalChanges", |((), (s, _)), r| AggIn::Total(s, r));
    let totals = tvl.map(|((p, _), m)| (p, m)).reduce_named(
        "ProtocolTvl",
        |_p: &String, input: &[(&i64, isize)], out: &mut Vec<(i128, isize)>| {
            let s: i128 = input.iter().map(|(m, r)| i128::from(**m) * *r as i128).sum();
            out.push((s, 1));
        },
    );
    let with_cat = totals.clone().join(category.clone()).map(|(p, (s, c))| (c, (p, s)));
    let without_cat = totals
        .clone()
        .antijoin(category.map(|(p, _)| p).distinct())
        .map(|(p, s)| (None, (p, s)));
    let cats = with_cat.concat(without_cat).reduce_named(
        "CategoryTvl",
        |_c: &Option<String>, input: &[(&(String, i128), isize)], out: &mut Vec<(Agg, isize)>| {
            let (mut s, mut n) = (0i128, 0i64);
            for ((_, m), r) in input {
                s += *m * *r as i128;
                n += *r as i64;
            }
            if n > 0 {
                out.push(((s, n), 1));
            }
        },
    );
    let cats = at_own_time(cats, "CategoryChanges", |(c, v), r| AggIn::Category(c, v, r));
    let deltas = deltas.flat_map(|d| match d {
        StateDelta::Tvl { .. } => None,
        other => Some(AggIn::Delta(other)),
    });
    chains.concat(cats).concat(total).concat(deltas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A protocol's metadata set to a name, or the protocol deleted.
    fn change(id: &str, name: Option<&str>, seq: u64) -> Vec<AggIn> {
        let meta = name.map(|n| {
            Box::new(Protocol {
                id: id.to_string(),
                name: n.to_string(),
                symbol: None,
                slug: None,
                category: None,
                chains: Vec::new(),
            })
        });
        let mut out = vec![AggIn::Delta(StateDelta::Meta {
            id: id.to_string(),
            old: None,
            new: meta,
            seq,
        })];
        if name.is_none() {
            out.push(AggIn::Delta(StateDelta::Deleted {
                id: id.to_string(),
                seq,
            }));
        }
        out
    }

    proptest! {
        /// However an epoch's metadata changes arrive, the view gets each protocol's last
        /// change (by record): the reference keeps the last change per protocol in record
        /// order and writes out what the view must see for it.
        #[test]
        fn the_view_gets_each_protocols_last_change_in_any_arrival_order(
            changes in proptest::collection::vec((0..3usize, proptest::option::of(0..4u8)), 1..12)
                .prop_flat_map(|c| {
                    let n = c.len();
                    (Just(c), Just((0..n).collect::<Vec<usize>>()).prop_shuffle())
                })
        ) {
            let (changes, order) = changes;
            let ids = ["p0", "p1", "p2"];
            let names = ["A", "B", "C", "D"];
            // Records in seq order; arrival in a shuffled order.
            let deltas: Vec<Vec<AggIn>> = changes
                .iter()
                .enumerate()
                .map(|(i, (p, n))| change(ids[*p], n.map(|n| names[n as usize]), 10 + i as u64))
                .collect();
            let batch: Vec<AggIn> = order.iter().flat_map(|&i| deltas[i].clone()).collect();
            let mut out = Vec::new();
            Aggregates::default().epoch(batch, false, &mut out);
            let mut got: Vec<String> = out
                .iter()
                .filter_map(|o| match o {
                    AggOut::State(s @ (StateOut::Protocol { .. } | StateOut::Deleted(_))) => Some(format!("{s:?}")),
                    _ => None,
                })
                .collect();
            got.sort();
            let mut last: BTreeMap<&str, Option<&str>> = BTreeMap::new();
            for (p, n) in &changes {
                last.insert(ids[*p], n.map(|n| names[n as usize]));
            }
            let mut want: Vec<String> = Vec::new();
            for (id, name) in last {
                match name {
                    Some(n) => {
                        let meta = match &change(id, Some(n), 0)[0] {
                            AggIn::Delta(StateDelta::Meta { new, .. }) => new.clone().map(|m| *m),
                            _ => None,
                        };
                        want.push(format!("{:?}", StateOut::Protocol { id: id.to_string(), meta }));
                    }
                    None => {
                        want.push(format!("{:?}", StateOut::Protocol { id: id.to_string(), meta: None }));
                        want.push(format!("{:?}", StateOut::Deleted(id.to_string())));
                    }
                }
            }
            want.sort();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn sub_buckets_are_recognised() {
        for c in [
            "ethereum-staking",
            "pool2",
            "bsc-borrowed",
            "staking",
            "arbitrum-pool2",
            "Ethereum-Staking",
        ] {
            assert!(is_sub_bucket(c), "{c}");
        }
        for c in ["ethereum", "op-mainnet", "bsc", "polygon_zkevm"] {
            assert!(!is_sub_bucket(c), "{c}");
        }
    }

    #[test]
    fn micro_usd_round_trips_and_saturates() {
        assert_eq!(micro(1.5), 1_500_000);
        assert_eq!(usd(i128::from(micro(11_873_349_211.52))), 11_873_349_211.52);
        assert_eq!(micro(1e308), i64::MAX);
        assert_eq!(micro(f64::NAN), 0);
    }

    #[test]
    fn series_change_uses_the_value_as_of_the_window_start() {
        let mut s = Series::default();
        s.push(0, 100.0);
        s.push(DAY / 2, 150.0);
        assert_eq!(
            s.change(DAY, DAY, 200.0),
            Some(100.0),
            "reference at t−1d is the t=0 value"
        );
        assert_eq!(s.change(DAY - 1, DAY, 200.0), None, "no value at or before t−1d");
        s.push(9 * DAY, 10.0);
        assert_eq!(s.hist.len(), 2, "pruned to one point at or before t−7d: {:?}", s.hist);
    }
}
