//! The live aggregates (TVL per chain and per category, SPEC §3/§8) against a plain model that
//! recomputes every sum from scratch after each epoch: random TVL updates (late and duplicate
//! ones included), protocol inserts, updates (category and chain changes) and deletes, cut
//! into random epochs, on 1, 2 and 3 workers, and across a checkpoint cut and restore.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use operators::{Checkpointing, OpConfig, Sequencer, Snapshots, StateOut, WorkerState};
use proptest::prelude::*;
use schemas::{EventData, Protocol, Record, SourcePos, TvlUpdate};
use timely::dataflow::InputHandle;
use timely::dataflow::operators::{Input, Inspect, Probe};

/// One input operation.
#[derive(Clone, Debug)]
enum Op {
    /// TVL of a protocol on one chain (whole dollars and cents) at a time (seconds).
    Tvl(usize, &'static str, u64, i64),
    /// A protocol record: (protocol, category index — 2 is none).
    Meta(usize, usize),
    /// The protocol is deleted.
    Delete(usize),
}

const CHAINS: [&str; 4] = ["ethereum", "bsc", "arbitrum", "ethereum-staking"];
const CATEGORIES: [&str; 2] = ["Lending", "Dexes"];

fn pid(p: usize) -> String {
    format!("p{p}")
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..5usize, 0..CHAINS.len(), 0..2_000_000u64, 0..12i64).prop_map(|(p, c, v, t)| Op::Tvl(p, CHAINS[c], v, t)),
        2 => (0..5usize, 0..3usize).prop_map(|(p, c)| Op::Meta(p, c)),
        1 => (0..5usize).prop_map(Op::Delete),
    ]
}

/// `(operations, epoch of each operation)`: epochs are non-decreasing.
fn stream() -> impl Strategy<Value = Vec<Vec<Op>>> {
    prop::collection::vec((op(), prop::bool::weighted(0.3)), 1..60).prop_map(|ops| {
        let mut batches = vec![Vec::new()];
        for (op, cut) in ops {
            if cut {
                batches.push(Vec::new());
            }
            if let Some(last) = batches.last_mut() {
                last.push(op);
            }
        }
        batches
    })
}

/// The value of an aggregate: (micro-USD sum, protocols).
type Agg = (i128, u64);

/// Aggregates after an epoch, keyed `chain:<c>` / `category:<c>` / `total`.
type Aggs = BTreeMap<String, Agg>;

/// A protocol's latest value per chain: chain → (time, cents).
type ChainValues = BTreeMap<&'static str, (i64, u64)>;

/// The model: the latest TVL per (protocol, chain) and each protocol's category, by its own
/// reading of SPEC §2 (late, duplicate) and §8 (sums, sub-buckets, deletes).
#[derive(Default)]
struct Model {
    /// protocol → (newest accepted time, chain → (time, cents)).
    tvl: BTreeMap<usize, (i64, ChainValues)>,
    /// protocol → category (None: no category); absent: no metadata.
    meta: BTreeMap<usize, Option<usize>>,
}

impl Model {
    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Tvl(p, chain, v, t) => {
                let entry = self.tvl.entry(p).or_insert((i64::MIN, BTreeMap::new()));
                if t < entry.0 {
                    return; // late
                }
                if entry.1.get(chain).is_some_and(|(ct, _)| *ct == t) {
                    return; // duplicate
                }
                entry.0 = t;
                entry.1.insert(chain, (t, v));
            }
            Op::Meta(p, c) => {
                self.meta.insert(p, (c < CATEGORIES.len()).then_some(c));
            }
            Op::Delete(p) => {
                self.tvl.remove(&p);
                self.meta.remove(&p);
            }
        }
    }

    fn aggregates(&self) -> Aggs {
        let mut out: Aggs = BTreeMap::new();
        let mut total: i128 = 0;
        let mut any = false;
        for (p, (_, chains)) in &self.tvl {
            let mut sum: i128 = 0;
            let mut counted = false;
            for (chain, (_, v)) in chains {
                if chain.ends_with("-staking") {
                    continue;
                }
                // Cents → micro-USD, exactly.
                let micro = i128::from(*v) * 10_000;
                let e = out.entry(format!("chain:{chain}")).or_insert((0, 0));
                e.0 += micro;
                e.1 += 1;
                sum += micro;
                counted = true;
            }
            if !counted {
                continue;
            }
            any = true;
            total += sum;
            let cat = match self.meta.get(p) {
                Some(Some(c)) => CATEGORIES[*c].to_string(),
                _ => "null".to_string(),
            };
            let e = out.entry(format!("category:{cat}")).or_insert((0, 0));
            e.0 += sum;
            e.1 += 1;
        }
        // A total of 0 and no total read alike (the stage reports 0 when nothing is left).
        if any && total != 0 {
            out.insert("total".into(), (total, 0));
        }
        out
    }
}

fn record(op: &Op) -> Option<Record> {
    Some(match *op {
        Op::Tvl(p, chain, v, t) => Record::Tvl(TvlUpdate {
            protocol_id: pid(p),
            timestamp: t * 1000,
            chains: vec![(chain.to_string(), v as f64 / 100.0)],
            extra: Vec::new(),
        }),
        Op::Meta(p, c) => Record::Protocol(Box::new(Protocol {
            id: pid(p),
            name: format!("Protocol {p}"),
            symbol: None,
            slug: Some(format!("protocol-{p}")),
            category: CATEGORIES.get(c).map(|s| s.to_string()),
            chains: vec!["ethereum".into()],
        })),
        Op::Delete(_) => return None,
    })
}

/// Per epoch: the aggregate changes reported (key → new value, `None` when it left).
type Reported = BTreeMap<u64, BTreeMap<String, Option<Agg>>>;

fn micro_of(usd: f64) -> i128 {
    (usd * 1e6).round() as i128
}

/// Runs the dataflow over `batches` on `workers` threads from `resume`; returns the reported
/// changes per epoch and, with `snapshot`, the state after the last batch.
fn run(
    workers: usize,
    batches: &[Vec<Op>],
    resume: Option<(Vec<WorkerState>, Sequencer)>,
    snapshot: bool,
) -> (Reported, Option<(Vec<WorkerState>, Sequencer)>) {
    let batches = Arc::new(batches.to_vec());
    let reported: Arc<Mutex<Reported>> = Arc::default();
    let snapshots = Snapshots::new(workers);
    let last_epoch = batches.len() as u64 - 1;
    if snapshot {
        snapshots.request(last_epoch);
    }
    let (states, start_seq) = match resume {
        Some((s, q)) => (Some(s), Some(q)),
        None => (None, None),
    };
    let last_seq: Arc<Mutex<Option<Sequencer>>> = Arc::default();
    let (rep, snaps, last_seq2) = (reported.clone(), snapshots.clone(), last_seq.clone());
    timely::execute(timely::Config::process(workers), move |worker| {
        let cfg = OpConfig::default();
        let mut input = InputHandle::new();
        let ckpt = Checkpointing {
            snapshots: Some(snaps.clone()),
            restore: states
                .as_ref()
                .map(|s| s[worker.index()].decode(cfg.clone()).expect("decodes")),
        };
        let (r1, r2) = (rep.clone(), rep.clone());
        let probe = worker.dataflow::<u64, _, _>(|scope| {
            let outs = operators::build(scope.input_from(&mut input), operators::Arrival::Anywhere, cfg, ckpt);
            outs.events.inspect_core(move |ev| {
                let Ok((stamp, batch)) = ev else { return };
                let t = stamp.least().copied().expect("a stamp has a time");
                for e in batch {
                    let (key, v) = match &e.data {
                        EventData::ChainTvlUpdate {
                            chain, tvl, protocols, ..
                        } => (format!("chain:{chain}"), (micro_of(*tvl), *protocols)),
                        EventData::CategoryTvlUpdate {
                            category,
                            tvl,
                            protocols,
                            ..
                        } => (
                            format!("category:{}", category.as_deref().unwrap_or("null")),
                            (micro_of(*tvl), *protocols),
                        ),
                        _ => continue,
                    };
                    let v = (v.1 > 0).then_some(v);
                    let mut r = r1.lock().unwrap();
                    let epoch = r.entry(t).or_default();
                    assert!(
                        epoch.insert(key.clone(), v).is_none(),
                        "two events for {key} in epoch {t}"
                    );
                }
            });
            outs.state
                .inspect_core(move |ev| {
                    let Ok((stamp, batch)) = ev else { return };
                    let t = stamp.least().copied().expect("a stamp has a time");
                    for s in batch {
                        if let StateOut::Total { tvl, .. } = s {
                            let mut r = r2.lock().unwrap();
                            let epoch = r.entry(t).or_default();
                            let v = Some((micro_of(*tvl), 0)).filter(|v| v.0 != 0);
                            assert!(epoch.insert("total".into(), v).is_none(), "two totals in epoch {t}");
                        }
                    }
                })
                .probe()
                .0
        });
        let mut seq = start_seq.clone().unwrap_or_else(|| Sequencer::new(worker.peers(), 0));
        let src = schemas::SourceName::from("test:");
        for (i, batch) in batches.iter().enumerate() {
            let mut envs = Vec::new();
            for (j, op) in batch.iter().enumerate() {
                let pos = SourcePos::new(src, (i * 1000 + j) as u64);
                match (op, record(op)) {
                    (_, Some(r)) => seq.push(pos, r, &mut envs),
                    (Op::Delete(p), None) => seq.delete_protocol(pos, &pid(*p), &mut envs),
                    _ => {}
                }
            }
            if worker.index() == 0 {
                for env in envs {
                    input.send(env);
                }
            }
            // Several epochs in flight, as in the engine: differential may then send an
            // update under an earlier epoch's capability.
            input.advance_to(i as u64 + 1);
            if i % 3 == 2 {
                while probe.less_than(input.time()) {
                    worker.step();
                }
            } else {
                worker.step();
            }
        }
        input.close();
        while !probe.done() {
            worker.step();
        }
        if worker.index() == 0 {
            *last_seq2.lock().unwrap() = Some(seq);
        }
    })
    .expect("timely runs");
    let resume = snapshot.then(|| {
        let states = snapshots
            .take(last_epoch)
            .expect("every worker deposited")
            .expect("encodes");
        (states, last_seq.lock().unwrap().take().expect("worker 0 ran"))
    });
    let reported = reported.lock().unwrap().clone();
    (reported, resume)
}

/// Checks the reported changes against the model epoch by epoch: after each epoch the
/// accumulated aggregates equal the model's, and exactly the aggregates whose value changed
/// were reported. `model`/`state` carry over from earlier batches.
fn check(batches: &[Vec<Op>], reported: &Reported, model: &mut Model, state: &mut Aggs, restored: bool) {
    let mut before = model.aggregates();
    for (i, batch) in batches.iter().enumerate() {
        for op in batch {
            model.apply(op);
        }
        let expect = model.aggregates();
        let changes = reported.get(&(i as u64)).cloned().unwrap_or_default();
        for (k, v) in &changes {
            match v {
                Some(v) => state.insert(k.clone(), *v),
                None => state.remove(k),
            };
        }
        assert_eq!(*state, expect, "aggregates after epoch {i} (batch {batch:?})");
        // After a restore, the first epoch re-reports every aggregate (the seeds).
        if !(restored && i == 0) {
            // (The total is checked by value above: a total moving between 0 and nothing is
            // reported but reads as no change.)
            let changed: BTreeSet<&String> = expect
                .keys()
                .chain(before.keys())
                .filter(|k| *k != "total" && expect.get(*k) != before.get(*k))
                .collect();
            let reported: BTreeSet<&String> = changes.keys().filter(|k| *k != "total").collect();
            assert_eq!(reported, changed, "reported changes in epoch {i}");
        }
        before = expect;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn aggregates_match_the_model(batches in stream(), workers in 1..=3usize) {
        let (reported, _) = run(workers, &batches, None, false);
        check(&batches, &reported, &mut Model::default(), &mut Aggs::new(), false);
    }

    #[test]
    fn aggregates_survive_a_checkpoint_and_restore(batches in stream(), cut in 0..100usize, workers in 1..=3usize) {
        let cut = 1 + cut % batches.len();
        let (first, second) = batches.split_at(cut);
        let (reported, resume) = run(workers, first, None, true);
        let mut model = Model::default();
        let mut state = Aggs::new();
        check(first, &reported, &mut model, &mut state, false);
        if second.is_empty() {
            return Ok(());
        }
        let (reported, _) = run(workers, second, resume, false);
        check(second, &reported, &mut model, &mut Aggs::new(), true);
    }
}

/// A protocol moving category, and a deleted protocol, move every aggregate in one epoch.
#[test]
fn category_change_and_delete_move_every_aggregate_at_once() {
    let batches = vec![
        vec![
            Op::Meta(0, 0),
            Op::Meta(1, 0),
            Op::Tvl(0, "ethereum", 10_000, 1),
            Op::Tvl(0, "bsc", 5_000, 1),
            Op::Tvl(1, "ethereum", 1_000, 1),
        ],
        vec![Op::Meta(0, 1)],
        vec![Op::Delete(0)],
    ];
    for workers in 1..=3 {
        let (reported, _) = run(workers, &batches, None, false);
        let m = |usd: i128| usd * 1_000_000;
        let e0 = &reported[&0];
        assert_eq!(e0["chain:ethereum"], Some((m(110), 2)));
        assert_eq!(e0["category:Lending"], Some((m(160), 2)));
        let e1 = &reported[&1];
        assert_eq!(e1.len(), 2, "only the two categories move: {e1:?}");
        assert_eq!(e1["category:Lending"], Some((m(10), 1)));
        assert_eq!(e1["category:Dexes"], Some((m(150), 1)));
        let e2 = &reported[&2];
        assert_eq!(e2["chain:ethereum"], Some((m(10), 1)));
        assert_eq!(e2["chain:bsc"], None, "bsc has no protocol left");
        assert_eq!(e2["category:Dexes"], None);
        assert_eq!(e2["total"], Some((m(10), 0)));
    }
}
