//! The timely dataflow: keyed state → throttle → ordered alerts.
//!
//! ```text
//! envelopes ─exchange(route)¹─► Keyed ─┬─ candidates, forgets ─exchange(rule)─► Throttle ─exchange(0)─► Order ─► alerts
//!                                     ├─ events (per worker)
//!                                     └─ dead letters (per worker)
//! ```
//! ¹ Only where envelopes arrive at any worker ([`Arrival`]); one process's engine sends each
//! to its worker already.
//!
//! Timestamps are ingest epochs (`u64`); each operator works an epoch at a time, once its
//! input frontier has passed it, in `seq` order, so results do not depend on the number of
//! workers or on how the exchange interleaves their messages.

use std::collections::BTreeMap;

use schemas::{Alert, DeadLetter, Event};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::{Exchange, ParallelizationContract, Pipeline};
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::Concat;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::{Map, Partition};

use crate::aggregate::{self, AggIn, AggOut, Aggregates, StateOut};
use crate::candidate::{Throttle, Throttled};
use crate::checkpoint::{Checkpointing, Encode, Part, Snapshots};
use crate::config::OpConfig;
use crate::envelope::{Envelope, Item, throttle_route, worker_of};
use crate::state::{KeyedOut, KeyedState};

/// The streams the dataflow produces.
pub struct Outputs<'scope> {
    /// Fired alerts, all on worker 0, ordered within each epoch by (record seq, rule id).
    pub alerts: StreamVec<'scope, u64, Alert>,
    /// Market events, on the worker that owns their key.
    pub events: StreamVec<'scope, u64, Event>,
    /// Records rejected inside the dataflow (e.g. `late`).
    pub dead: StreamVec<'scope, u64, DeadLetter>,
    /// Live-state changes besides the events (protocol metadata, deletions, total TVL) on
    /// worker 0, in a deterministic order within each epoch; after a restore, each worker's
    /// restored latest events (view-only).
    pub state: StreamVec<'scope, u64, StateOut>,
}

/// Where the envelopes given to [`build`] arrive, which decides whether the dataflow moves
/// them to their workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// At any worker: the dataflow exchanges each to the worker its route picks
    /// ([`worker_of`]). A cluster's processes split their envelopes evenly.
    Anywhere,
    /// Each at the worker its route picks already, as one process's engine sends them: no
    /// exchange, which would copy every record into small buffers and back.
    AtItsWorker,
}

/// Snapshot duty of a stateful operator: where to deposit, as which part of which worker.
struct SnapDuty {
    snapshots: Snapshots,
    worker: usize,
    part: Part,
    /// The last epoch snapshotted.
    last: Option<u64>,
}

impl SnapDuty {
    /// Deposits `state` for every requested epoch before `before` not yet snapshotted: the
    /// caller has processed every epoch before `before` and none after.
    fn take_due<S: Encode>(&mut self, before: u64, state: &mut S) {
        for epoch in self.snapshots.due(self.last, before) {
            match state.capture(epoch) {
                Ok(captured) => self.snapshots.deposit(epoch, self.worker, self.part, captured),
                // Never happens for these plain structs; the checkpoint then stays incomplete
                // (and the pipeline reports its growing checkpoint age).
                Err(_) => metrics::counter!("llamaflow_checkpoint_errors_total", "stage" => "encode").increment(1),
            }
            self.last = Some(epoch);
        }
    }
}

/// Output produced from the state before any input, at the first epoch (restored state's
/// seeds).
type Init<S, O> = Box<dyn FnOnce(&S, &mut Vec<O>)>;

/// Runs `logic` on `state` once per epoch with all of that epoch's data, after the input
/// frontier has passed the epoch; epochs are handled in increasing order, and each epoch's
/// output is sent as one batch. With a snapshot
/// duty, the state is captured at every requested epoch boundary; `init` runs once, first.
fn per_epoch<'scope, D, O, P, S, F>(
    stream: StreamVec<'scope, u64, D>,
    pact: P,
    name: &str,
    mut state: S,
    mut duty: Option<SnapDuty>,
    init: Option<Init<S, O>>,
    mut logic: F,
) -> StreamVec<'scope, u64, O>
where
    D: 'static,
    O: 'static,
    P: ParallelizationContract<u64, Vec<D>>,
    S: Encode + 'static,
    F: FnMut(&mut S, Vec<D>, &mut Vec<O>) + 'static,
{
    stream.unary_frontier::<CapacityContainerBuilder<Vec<O>>, _, _, _>(pact, name, move |cap, _info| {
        let mut stash: BTreeMap<u64, (Capability<u64>, Vec<D>)> = BTreeMap::new();
        let mut out = Vec::new();
        let mut init = init.map(|f| (cap, f));
        move |(input, frontier), output| {
            if let Some((cap, f)) = init.take() {
                f(&state, &mut out);
                if !out.is_empty() {
                    output.session(&cap).give_container(&mut out);
                    out.clear();
                }
            }
            let port = output.output_index();
            input.for_each_stamp(|cap, data| {
                let Some(&time) = cap.least() else { return };
                let entry = match stash.get_mut(&time) {
                    Some(e) => e,
                    None => match cap.retain_least(port) {
                        Some(c) => stash.entry(time).or_insert((c, Vec::new())),
                        None => return,
                    },
                };
                for batch in data {
                    // The first batch of an epoch is taken as it is (no copy).
                    if entry.1.is_empty() {
                        std::mem::swap(&mut entry.1, batch);
                    } else {
                        entry.1.append(batch);
                    }
                }
            });
            while let Some(first) = stash.first_entry() {
                if frontier.less_equal(first.key()) {
                    break;
                }
                if let Some(d) = duty.as_mut() {
                    d.take_due(*first.key(), &mut state);
                }
                let (cap, data) = first.remove();
                logic(&mut state, data, &mut out);
                if !out.is_empty() {
                    // The epoch's output as one batch: the next operator cannot reorder it
                    // (timely may deliver an epoch's batches in any order).
                    output.session(&cap).give_container(&mut out);
                    out.clear();
                }
            }
            if let Some(d) = duty.as_mut() {
                // Every epoch before the frontier is processed (an empty frontier: all of them).
                let passed = frontier.frontier().iter().min().copied().unwrap_or(u64::MAX);
                d.take_due(passed, &mut state);
            }
        }
    })
}

/// How many records ahead the keyed operator loads a key's entry, and then (from that entry)
/// its state.
const PREFETCH_FAR: usize = 8;
const PREFETCH_NEAR: usize = 4;

/// Builds the dataflow on a stream of envelopes (from [`crate::Sequencer`]), which arrive as
/// `arrival` says.
///
/// With `ckpt.restore` the operators start from restored state; with `ckpt.snapshots` they
/// deposit their state at every requested epoch (see [`crate::checkpoint`]).
pub fn build<'scope>(
    input: StreamVec<'scope, u64, Envelope>,
    arrival: Arrival,
    cfg: OpConfig,
    ckpt: Checkpointing,
) -> Outputs<'scope> {
    let worker = input.scope().index();
    let duty = |part| {
        ckpt.snapshots.clone().map(|snapshots| SnapDuty {
            snapshots,
            worker,
            part,
            last: None,
        })
    };
    let emit_events = cfg.emit_events;
    // State size per operator and worker (handles made once: no label lookups per epoch).
    let gauge = |operator: &'static str, kind: &'static str| metrics::gauge!("llamaflow_state_entries", "operator" => operator, "kind" => kind, "worker" => worker.to_string());
    let (keyed_state, throttle, aggregates, seed): (_, _, _, Option<Init<KeyedState, KeyedOut>>) = match ckpt.restore {
        Some(r) => (
            r.keyed,
            r.throttle,
            r.aggregates,
            Some(Box::new(|s: &KeyedState, out: &mut Vec<KeyedOut>| s.seed(out))),
        ),
        None => (KeyedState::new(cfg), Throttle::default(), Aggregates::default(), None),
    };
    let keyed_gauges: Vec<metrics::Gauge> = keyed_state.sizes().iter().map(|(k, _)| gauge("keyed", k)).collect();
    let throttle_gauge = gauge("throttle", "rules");
    let peers = input.scope().peers();
    let logic = move |state: &mut KeyedState, mut batch: Vec<Envelope>, out: &mut Vec<KeyedOut>| {
        if arrival == Arrival::AtItsWorker
            && let Some(e) = batch.first()
        {
            // A wrong split would put a key's state on two workers: fail loudly instead.
            assert_eq!(
                worker_of(e.route, peers),
                worker,
                "an envelope arrived at another worker than its own"
            );
        }
        // A rule moving between keys is deleted (same seq) before it is re-inserted. A
        // batch nearly always arrives in this order: checked first, as sorting would copy it
        // into a scratch buffer of its size.
        let order = |e: &Envelope| (e.seq, !matches!(e.item, Item::DeleteRule(_)));
        if !batch.is_sorted_by_key(order) {
            batch.sort_by_key(order);
        }
        // Keys' entries are loaded a few records ahead (`KeyedState::prefetch_entry`).
        let mut envs = batch.drain(..);
        while let Some(env) = envs.next() {
            let ahead = envs.as_slice();
            if let Some(far) = ahead.get(PREFETCH_FAR) {
                state.prefetch_entry(far);
            }
            if let Some(near) = ahead.get(PREFETCH_NEAR) {
                state.prefetch_state(near);
            }
            state.process(env, out);
        }
        state.end_of_batch(out);
        for ((_, n), g) in state.sizes().iter().zip(&keyed_gauges) {
            g.set(*n as f64);
        }
    };
    let (snap, name) = (duty(Part::Keyed), "Keyed");
    let keyed = match arrival {
        Arrival::Anywhere => per_epoch(
            input,
            Exchange::new(|e: &Envelope| e.route),
            name,
            keyed_state,
            snap,
            seed,
            logic,
        ),
        Arrival::AtItsWorker => per_epoch(input, Pipeline, name, keyed_state, snap, seed, logic),
    };
    let mut parts = keyed.partition(5, |o| match o {
        KeyedOut::Candidate(_) | KeyedOut::Forget { .. } => (0, o),
        KeyedOut::Event(_) => (1, o),
        KeyedOut::Dead(_) => (2, o),
        KeyedOut::State(_) => (3, o),
        KeyedOut::Restored(_) => (4, o),
    });
    let (restored, deltas, dead, events, candidates) =
        match (parts.pop(), parts.pop(), parts.pop(), parts.pop(), parts.pop()) {
            (Some(r), Some(s), Some(d), Some(e), Some(c)) => (r, s, d, e, c),
            _ => unreachable!("partition(5) returns five streams"),
        };
    // Restored events stay on their worker: the view applies them, nobody else sees them.
    let restored = restored.flat_map(|o| match o {
        KeyedOut::Restored(e) => Some(StateOut::Restored(Box::new(e))),
        _ => None,
    });
    let deltas = deltas.flat_map(|o| match o {
        KeyedOut::State(d) => Some(d),
        _ => None,
    });
    let aggregated = per_epoch(
        aggregate::aggregate(deltas),
        Exchange::new(|_: &AggIn| 0),
        "Aggregates",
        aggregates,
        duty(Part::Aggregates),
        None,
        move |aggs, batch, out| aggs.epoch(batch, emit_events, out),
    );
    let mut agg_parts = aggregated.partition(2, |o| match o {
        AggOut::Event(_) => (0, o),
        AggOut::State(_) => (1, o),
    });
    let (state, agg_events) = match (agg_parts.pop(), agg_parts.pop()) {
        (Some(s), Some(e)) => (s, e),
        _ => unreachable!("partition(2) returns two streams"),
    };
    let state = state
        .flat_map(|o| match o {
            AggOut::State(s) => Some(s),
            AggOut::Event(_) => None,
        })
        .concat(restored);
    let agg_events = agg_events.flat_map(|o| match o {
        AggOut::Event(e) => Some(e),
        AggOut::State(_) => None,
    });
    let candidates = candidates.flat_map(|o| match o {
        KeyedOut::Candidate(c) => Some(Throttled::Match(c)),
        KeyedOut::Forget { seq, rule_id } => Some(Throttled::Forget { seq, rule_id }),
        _ => None,
    });
    let events = events
        .flat_map(|o| match o {
            KeyedOut::Event(e) => Some(e),
            _ => None,
        })
        .concat(agg_events);
    let dead = dead.flat_map(|o| match o {
        KeyedOut::Dead(d) => Some(d),
        _ => None,
    });
    let rule_route = |t: &Throttled| throttle_route(t.rule_id());
    let fired = per_epoch(
        candidates,
        Exchange::new(rule_route),
        "Throttle",
        throttle,
        duty(Part::Throttle),
        None,
        move |throttle, mut batch, out| {
            batch.sort_by(|a: &Throttled, b: &Throttled| a.order_key().cmp(&b.order_key()));
            // Alerts are made here, on the rule's worker (messages, ids): the stage that
            // orders them, on one worker, only sorts.
            out.extend(
                batch
                    .into_iter()
                    .filter_map(|t| throttle.take(t))
                    .map(|c| (c.seq, c.into_alert())),
            );
            throttle_gauge.set(throttle.len() as f64);
        },
    );
    let alerts = per_epoch(
        fired,
        Exchange::new(|_: &(u64, Alert)| 0),
        "OrderAlerts",
        (),
        None,
        None,
        |_, mut batch, out| {
            // By triggering record, then rule (`Candidate::order_key`).
            batch.sort_by(|(a_seq, a), (b_seq, b)| (a_seq, &a.rule_id).cmp(&(b_seq, &b.rule_id)));
            out.extend(batch.into_iter().map(|(_, alert)| alert));
        },
    );
    Outputs {
        alerts,
        events,
        dead,
        state,
    }
}
