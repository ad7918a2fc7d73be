//! The dataflow against the reference model (property tests, 1 and 2 workers), plus
//! scenario tests of each SPEC §2 rule on hand-written streams.

mod model;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use model::{Model, ModelAlert, Op};
use operators::{Arrival, Checkpointing, OpConfig, Sequencer, Snapshots, WorkerState};
use proptest::prelude::*;
use schemas::{
    Alert, AlertRule, DeadLetter, Event, GasTick, Liquidation, Millis, PriceTick, Record, SourcePos, Transfer,
    TvlUpdate,
};
use serde_json::json;
use timely::dataflow::InputHandle;
use timely::dataflow::operators::{Input, Inspect, Probe};

/// Everything the dataflow produced.
#[derive(Default, Clone)]
struct Run {
    alerts: Vec<Alert>,
    events: Vec<Event>,
    dead: Vec<DeadLetter>,
}

/// Runs the dataflow over batches (one epoch each) with `workers` threads.
fn run(workers: usize, batches: &[Vec<Op>], cfg: OpConfig) -> Run {
    run_arriving(workers, batches, cfg, Arrival::Anywhere)
}

/// [`run`] with envelopes given to the dataflow as `arrival` says: all at worker 0, or each
/// at the worker its route picks (as one process's engine sends them).
fn run_arriving(workers: usize, batches: &[Vec<Op>], cfg: OpConfig, arrival: Arrival) -> Run {
    run_resumable(workers, batches, cfg, None, 0, &[], arrival).0
}

/// Raised when its worker thread panics, so the other workers stop waiting for it: the
/// panic then fails the test instead of leaving them stepping forever.
struct FailFlag(Arc<AtomicBool>);

impl Drop for FailFlag {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// Where a run left off: each worker's operator state and the sequencer.
type Resume = (Vec<WorkerState>, Sequencer);

/// Runs `batches` from `resume` (or empty state), numbering positions after `first_pos`;
/// returns the run, the states snapshotted after the epochs (batch indices) in `snap`, and the
/// sequencer after the last batch.
fn run_resumable(
    workers: usize,
    batches: &[Vec<Op>],
    cfg: OpConfig,
    resume: Option<Resume>,
    first_pos: u64,
    snap: &[u64],
    arrival: Arrival,
) -> (Run, Vec<Vec<WorkerState>>, Sequencer) {
    let batches = Arc::new(batches.to_vec());
    let out = Arc::new(Mutex::new(Run::default()));
    let out2 = out.clone();
    let snapshots = Snapshots::new(workers);
    let snaps = snapshots.clone();
    let (states, start_seq) = match resume {
        Some((states, seq)) => (Some(states), Some(seq)),
        None => (None, None),
    };
    let last_seq = Arc::new(Mutex::new(None));
    let last_seq2 = last_seq.clone();
    for epoch in snap {
        snapshots.request(*epoch);
    }
    let failed = Arc::new(AtomicBool::new(false));
    timely::execute(timely::Config::process(workers), move |worker| {
        let _flag = FailFlag(failed.clone());
        let mut input = InputHandle::new();
        let (a, e, d) = (out2.clone(), out2.clone(), out2.clone());
        let cfg = cfg.clone();
        let ckpt = Checkpointing {
            snapshots: Some(snaps.clone()),
            restore: states
                .as_ref()
                .map(|s| s[worker.index()].decode(cfg.clone()).expect("decodes")),
        };
        let probe = worker.dataflow::<u64, _, _>(|scope| {
            let outs = operators::build(scope.input_from(&mut input), arrival, cfg, ckpt);
            outs.events.inspect(move |x| e.lock().unwrap().events.push(x.clone()));
            outs.dead.inspect(move |x| d.lock().unwrap().dead.push(x.clone()));
            outs.alerts
                .inspect(move |x| a.lock().unwrap().alerts.push(x.clone()))
                .probe()
                .0
        });
        let mut seq = start_seq.clone().unwrap_or_else(|| Sequencer::new(worker.peers(), 0));
        let src = schemas::SourceName::from("test:");
        let mut n = first_pos;
        for (i, batch) in batches.iter().enumerate() {
            let mut envs = Vec::new();
            for op in batch {
                n += 1;
                let pos = SourcePos::new(src, n);
                match op {
                    Op::Rec(r) => seq.push(pos, r.clone(), &mut envs),
                    Op::Del(id) => seq.delete_rule(pos, id, &mut envs),
                    Op::Close => seq.close_updates(pos, &mut envs),
                }
            }
            for env in envs {
                let mine = match arrival {
                    Arrival::Anywhere => worker.index() == 0,
                    Arrival::AtItsWorker => operators::worker_of(env.route, worker.peers()) == worker.index(),
                };
                if mine {
                    input.send(env);
                }
            }
            input.advance_to(i as u64 + 1);
            while probe.less_than(input.time()) {
                assert!(!failed.load(Ordering::SeqCst), "another worker panicked");
                worker.step();
            }
        }
        if worker.index() == 0 {
            *last_seq2.lock().unwrap() = Some(seq);
        }
    })
    .expect("timely runs");
    let states = snap
        .iter()
        .map(|epoch| {
            snapshots
                .take(*epoch)
                .expect("every worker deposited its state")
                .expect("the state encodes")
        })
        .collect();
    let seq = last_seq.lock().unwrap().take().expect("worker 0 ran");
    let run = out.lock().unwrap().clone();
    (run, states, seq)
}

/// A run cut in two (`first`, then `rest` from its snapshot) gives the uninterrupted run's
/// alerts and dead letters.
fn same_outputs(first: Run, rest: Option<Run>, whole: &Run, label: &str) -> Result<(), TestCaseError> {
    let (mut alerts, mut dead) = (first.alerts, first.dead);
    if let Some(r) = rest {
        alerts.extend(r.alerts);
        dead.extend(r.dead);
    }
    prop_assert_eq!(as_model(&alerts), as_model(&whole.alerts), "{}", label);
    let key = |d: &DeadLetter| d.source.clone();
    let mut a: Vec<String> = dead.iter().map(key).collect();
    let mut b: Vec<String> = whole.dead.iter().map(key).collect();
    a.sort();
    b.sort();
    prop_assert_eq!(a, b, "dead letters, {}", label);
    Ok(())
}

fn model(batches: &[Vec<Op>]) -> Model {
    let mut m = Model::default();
    for batch in batches {
        m.batch(batch);
    }
    m
}

fn as_model(alerts: &[Alert]) -> Vec<ModelAlert> {
    alerts
        .iter()
        .map(|a| {
            (
                a.alert_id.clone(),
                a.rule_id.clone(),
                a.subject.clone(),
                a.triggered_at,
                a.value,
            )
        })
        .collect()
}

// ---------- generators ----------

const COINS: [&str; 3] = ["coingecko:aaa", "coingecko:bbb", "ethereum:0xccc"];
const PROTOCOLS: [&str; 2] = ["1", "2"];
const CHAINS: [&str; 2] = ["ethereum", "arbitrum"];
const WINDOWS: [i64; 3] = [300, 900, 3600];

fn rule_strategy() -> impl Strategy<Value = Record> {
    (0..8usize, 0..7usize, 0..3usize, 0..3usize, 0..2usize, 1u32..12, any::<bool>(), 0..4usize, 0..3usize)
        .prop_map(|(id, kind, coin, window, chain, level, enabled, throttle, dir)| {
            let coin = COINS[coin];
            let chain = CHAINS[chain];
            let protocol = PROTOCOLS[id % 2];
            let window = WINDOWS[window];
            let direction = ["up", "down", "any"][dir];
            let op = [">", ">=", "<", "<="][(level as usize) % 4];
            let conditions = match kind {
                0 => json!({"coin": coin, "window": window, "threshold_pct": level, "direction": direction}),
                1 => json!({"coin": coin, "operator": op, "value": 90 + level * 2}),
                2 => json!({"coin": coin, "peg": 100.0, "deviation_pct": level}),
                3 if id % 3 == 0 => json!({"protocol_id": protocol, "window": window, "threshold_pct": level, "direction": direction}),
                3 => json!({"protocol_id": protocol, "chain": chain, "window": window, "threshold_pct": level, "direction": direction}),
                4 if id % 2 == 0 => json!({"min_usd": level as f64 * 1000.0}),
                4 => json!({"coin": coin, "chain": chain, "min_usd": level as f64 * 500.0}),
                5 => json!({"chain": chain, "operator": op, "gwei": level * 3}),
                _ if id % 2 == 0 => json!({"min_usd": level as f64 * 1000.0}),
                _ => json!({"protocol_id": protocol, "chain": chain, "min_usd": level as f64 * 1000.0}),
            };
            let types =
                ["price_change", "price_threshold", "depeg", "tvl_change", "whale_movement", "gas_price", "liquidation"];
            let throttle = [0.0, 1.0, 5.0, 30.0][throttle];
            Record::Rule(Box::new(
                AlertRule::from_json(&json!({"id": format!("r{id}"), "user_id": format!("u{}", id % 3),
                    "alert_type": types[kind], "conditions": conditions, "enabled": enabled || id % 4 != 0,
                    "throttle_minutes": throttle}))
                .expect("generated rules are valid"),
            ))
        })
}

/// Raw generated step: kind selector, key index, level, time step, lag.
type RawStep = (u8, usize, u32, u32, u32);

fn steps_to_batches(steps: Vec<RawStep>, rules: Vec<(usize, Record)>, deletes: Vec<usize>) -> Vec<Vec<Op>> {
    let base: Millis = 1_717_000_000_000;
    let mut clock: Millis = base;
    let mut batches = vec![Vec::new()];
    let mut rules = rules.into_iter().peekable();
    for (i, (kind, key, level, step, lag)) in steps.into_iter().enumerate() {
        while let Some((at, _)) = rules.peek() {
            if *at > i {
                break;
            }
            let (_, r) = rules.next().expect("peeked");
            batches.last_mut().expect("non-empty").push(Op::Rec(r));
        }
        if deletes.contains(&i) {
            batches
                .last_mut()
                .expect("non-empty")
                .push(Op::Del(format!("r{}", key % 8)));
        }
        clock += i64::from(step % 8) * 30_000;
        // One record in ten is older than the clock: late for its key unless nothing newer came.
        let t = if lag % 10 == 0 {
            clock - i64::from(lag % 1200) * 1000
        } else {
            clock
        };
        let level = f64::from(level);
        let rec = match kind % 6 {
            0 | 1 => Record::Price(PriceTick {
                coin: COINS[key % 3].to_string(),
                price: 80.0 + level * 2.0,
                timestamp: t,
                symbol: Some(format!("S{}", key % 3)),
                confidence: if lag % 17 == 0 { Some(0.2) } else { Some(0.9) },
                decimals: None,
            }),
            2 => Record::Tvl(TvlUpdate {
                protocol_id: PROTOCOLS[key % 2].to_string(),
                timestamp: t,
                chains: if key % 5 == 0 {
                    vec![("arbitrum".into(), level * 1e6), ("ethereum".into(), level * 3e6)]
                } else {
                    vec![(CHAINS[key % 2].to_string(), level * 1e6)]
                },
                extra: Vec::new(),
            }),
            3 => Record::Transfer(Box::new(Transfer {
                chain: CHAINS[key % 2].to_string(),
                tx_hash: format!("0x{}", lag % 7),
                coin: COINS[key % 3].to_string(),
                from: Some("0xa".into()),
                to: None,
                amount: level * 10.0,
                timestamp: t,
            })),
            4 => Record::Gas(GasTick {
                chain: CHAINS[key % 2].to_string(),
                gwei: level * 2.0,
                timestamp: t,
            }),
            _ => Record::Liquidation(Liquidation {
                protocol_id: PROTOCOLS[key % 2].to_string(),
                chain: CHAINS[key % 2].to_string(),
                account: Some(format!("0x{}", lag % 3)),
                amount_usd: level * 1000.0,
                timestamp: t,
            }),
        };
        batches.last_mut().expect("non-empty").push(Op::Rec(rec));
        // Updates settle (the live job) at arbitrary points, in or at the end of a batch.
        if lag % 11 == 3 {
            batches.last_mut().expect("non-empty").push(Op::Close);
        }
        // Batches are cut anywhere, also between TVL records with one timestamp.
        if lag % 7 == 0 {
            batches.push(Vec::new());
        }
    }
    // The end of the input closes what is open.
    batches.last_mut().expect("non-empty").push(Op::Close);
    batches
}

fn stream_strategy() -> impl Strategy<Value = Vec<Vec<Op>>> {
    (
        prop::collection::vec((any::<u8>(), 0..15usize, 0u32..25, any::<u32>(), any::<u32>()), 1..250),
        prop::collection::vec((0..250usize, rule_strategy()), 0..30),
        prop::collection::vec(0..250usize, 0..5),
    )
        .prop_map(|(steps, mut rules, deletes)| {
            rules.sort_by_key(|(at, _)| *at);
            steps_to_batches(steps, rules, deletes)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn dataflow_equals_model(batches in stream_strategy()) {
        let m = model(&batches);
        for (workers, arrival) in [(1, Arrival::Anywhere), (2, Arrival::Anywhere), (3, Arrival::Anywhere), (2, Arrival::AtItsWorker), (3, Arrival::AtItsWorker)] {
            let r = run_arriving(workers, &batches, OpConfig::default(), arrival);
            prop_assert_eq!(as_model(&r.alerts), m.alerts.clone(), "workers={} {:?}", workers, arrival);
            let mut late: Vec<u64> = r.dead.iter().map(|d| {
                assert_eq!(d.reason, "late");
                d.source.trim_start_matches("test:").parse::<u64>().expect("position") - 1
            }).collect();
            late.sort_unstable();
            prop_assert_eq!(late, m.late.clone(), "late records, workers={} {:?}", workers, arrival);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Stopping after any epoch, snapshotting, and going on from the snapshot in a new
    /// dataflow gives exactly the uninterrupted run's alerts and dead letters. The run after
    /// the restore gets each envelope at its worker (no exchange), so the restored state must
    /// be where the routes say.
    #[test]
    fn checkpoint_restore_equals_uninterrupted(batches in stream_strategy(), cut in 0.0..1.0f64) {
        let k = ((batches.len() as f64 * cut) as usize).clamp(1, batches.len());
        let (head, tail) = batches.split_at(k);
        let first_pos_tail = head.iter().map(Vec::len).sum::<usize>() as u64;
        // (workers before the cut, workers after it): a restore into another worker count
        // re-splits the state (`rescale_states`, `Sequencer::rescale`).
        for (workers, resumed) in [(1, 1), (2, 2), (1, 3), (2, 1)] {
            let whole = run(workers, &batches, OpConfig::default());
            let (first, mut states, seq) =
                run_resumable(workers, head, OpConfig::default(), None, 0, &[k as u64 - 1], Arrival::Anywhere);
            let resume = Some((states.remove(0), seq)).map(|(states, seq)| match resumed == workers {
                true => (states, seq),
                false => (
                    operators::rescale_states(&states, resumed).expect("rescales"),
                    Sequencer::rescale(&[seq], resumed, 1).expect("rescales").remove(0),
                ),
            });
            let rest = (!tail.is_empty()).then(|| {
                run_resumable(resumed, tail, OpConfig::default(), resume, first_pos_tail, &[], Arrival::AtItsWorker).0
            });
            let label = format!("workers={workers} then {resumed} cut after {k}");
            same_outputs(first, rest, &whole, &label)?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Incremental snapshots: a snapshot taken after an earlier one holds only the rules
    /// changed since (the earlier one holds every rule and is its base); made whole with
    /// its base (`WorkerState::rebase`) it restores exactly like a whole snapshot — the
    /// continuation gives the uninterrupted run's alerts and dead letters.
    #[test]
    fn incremental_snapshot_rebased_restores_like_a_whole_one(
        batches in stream_strategy(),
        cut in 0.0..1.0f64,
        base_cut in 0.0..1.0f64,
    ) {
        let k = ((batches.len() as f64 * cut) as usize).clamp(1, batches.len());
        let b = ((k - 1) as f64 * base_cut) as u64;
        let last = k as u64 - 1;
        let (head, tail) = batches.split_at(k);
        let first_pos_tail = head.iter().map(Vec::len).sum::<usize>() as u64;
        for workers in [1, 2] {
            let whole = run(workers, &batches, OpConfig::default());
            let epochs: Vec<u64> = if b < last { vec![b, last] } else { vec![last] };
            let (first, snaps, seq) = run_resumable(workers, head, OpConfig::default(), None, 0, &epochs, Arrival::Anywhere);
            let (base, newest) = (&snaps[0], &snaps[snaps.len() - 1]);
            prop_assert!(base.iter().all(|s| s.rule_base().expect("reads") .is_none()), "the first snapshot holds every rule");
            let states: Vec<WorkerState> = if b < last {
                // A generated stream changes fewer rules than the incremental limit.
                for s in newest {
                    prop_assert_eq!(s.rule_base().expect("reads"), Some(b), "incremental");
                    prop_assert!(matches!(
                        s.decode(OpConfig::default()),
                        Err(operators::checkpoint::CheckpointError::NeedsBase(e)) if e == b
                    ), "an incremental state is not restored without its base");
                }
                newest.iter().zip(base).map(|(n, w)| n.rebase(w).expect("rebases")).collect()
            } else {
                newest.clone()
            };
            let rest = (!tail.is_empty()).then(|| {
                run_resumable(workers, tail, OpConfig::default(), Some((states, seq)), first_pos_tail, &[], Arrival::AtItsWorker).0
            });
            let label = format!("workers={workers} base after {b} snapshot after {last}");
            same_outputs(first, rest, &whole, &label)?;
        }
    }
}

/// The generator is not vacuous: over fixed-seed streams, every alert type fires and records
/// are rejected as late.
#[test]
fn generated_streams_exercise_every_alert_type() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut types = std::collections::BTreeMap::<String, usize>::new();
    let mut late = 0;
    for _ in 0..24 {
        let batches = stream_strategy().new_tree(&mut runner).expect("generates").current();
        let r = run(2, &batches, OpConfig::default());
        for a in &r.alerts {
            *types.entry(a.alert_type.clone()).or_default() += 1;
        }
        late += r.dead.len();
    }
    assert_eq!(types.len(), 7, "alert types seen: {types:?}");
    assert!(late > 0);
}

// ---------- scenarios ----------

fn price(coin: &str, p: f64, t: i64) -> Op {
    Op::Rec(Record::Price(PriceTick {
        coin: coin.into(),
        price: p,
        timestamp: t * 1000,
        symbol: Some("ETH".into()),
        confidence: None,
        decimals: None,
    }))
}

/// A gas tick at `t` seconds.
fn gas(chain: &str, gwei: f64, t: i64) -> Op {
    Op::Rec(Record::Gas(GasTick {
        chain: chain.into(),
        gwei,
        timestamp: t * 1000,
    }))
}

fn rule(v: serde_json::Value) -> Op {
    Op::Rec(Record::Rule(Box::new(AlertRule::from_json(&v).expect("valid rule"))))
}

fn tvl(pid: &str, chain: &str, v: f64, t: i64) -> Op {
    Op::Rec(Record::Tvl(TvlUpdate {
        protocol_id: pid.into(),
        timestamp: t * 1000,
        chains: vec![(chain.into(), v)],
        extra: vec![],
    }))
}

#[test]
fn price_change_spec_example_and_throttle() {
    let eth = "coingecko:ethereum";
    let batches = vec![
        vec![
            rule(
                json!({"id":"r1","user_id":"u1","name":"ETH -5% 1h","alert_type":"price_change",
                "conditions":{"coin":eth,"window":"1h","threshold_pct":5,"direction":"down"}}),
            ),
            price(eth, 3791.12, 1_717_426_800),
            price(eth, 3700.0, 1_717_428_000),
        ],
        vec![
            // t − 1h = 1_717_426_800 → ref 3791.12; -5.31%.
            price(eth, 3589.80, 1_717_430_400),
            // Within the 5-minute throttle: suppressed.
            price(eth, 3500.0, 1_717_430_500),
            // After the throttle: fires again (ref = 3700 at t-1h... = 1_717_428_000 ≤ t-3600).
            price(eth, 3400.0, 1_717_431_700),
        ],
    ];
    for workers in [1, 2] {
        let r = run(workers, &batches, OpConfig::default());
        assert_eq!(r.alerts.len(), 2, "{:?}", r.alerts);
        let a = &r.alerts[0];
        assert_eq!(a.message, "ETH -5.31% in 1h (3791.12 → 3589.80)");
        assert_eq!(a.triggered_at, 1_717_430_400_000);
        assert!((a.value - -5.31).abs() < 0.01);
        assert_eq!(a.threshold, 5.0);
        assert_eq!(a.alert_id.len(), 32);
        assert_eq!(r.alerts[1].triggered_at, 1_717_431_700_000);
        let v = serde_json::to_value(a).expect("serializes");
        assert_eq!(v["triggered_at"], json!(1_717_430_400));
        assert_eq!(v["channels"], json!(["websocket"]));
    }
}

#[test]
fn late_duplicate_low_confidence() {
    let c = "coingecko:x";
    let batches = vec![vec![
        rule(json!({"id":"t","user_id":"u","alert_type":"price_threshold",
            "conditions":{"coin":c,"operator":">","value":10},"throttle_minutes":0})),
        price(c, 5.0, 100),
        price(c, 20.0, 90),  // late
        price(c, 20.0, 100), // duplicate of t=100
        Op::Rec(Record::Price(PriceTick {
            coin: c.into(),
            price: 20.0,
            timestamp: 110_000,
            symbol: None,
            confidence: Some(0.3),
            decimals: None,
        })), // ignored: confidence ≤ 0.3
        price(c, 20.0, 120), // crossing: fires
        price(c, 30.0, 130), // still above: no crossing
    ]];
    let r = run(2, &batches, OpConfig::default());
    assert_eq!(r.alerts.len(), 1);
    assert_eq!(r.alerts[0].triggered_at, 120_000);
    assert_eq!(r.dead.len(), 1);
    assert_eq!(r.dead[0].reason, "late");
    assert_eq!(r.dead[0].source, "test:3");
    assert!(r.dead[0].raw.contains("\"timestamp\":90"), "{}", r.dead[0].raw);
    let updates = r.events.iter().filter(|e| e.data.type_name() == "price_update").count();
    assert_eq!(updates, 3, "accepted ticks only");
}

/// The issue-14 case: one update's records split by epoch cuts, with a late record and another
/// protocol between them, is still one update: one total, one alert, the value of the whole
/// update; a record of it after it closed is late (new chain) or a duplicate, never a second
/// alert with the same id.
#[test]
fn a_tvl_update_split_by_cuts_and_late_records_is_evaluated_once() {
    let total_rule = rule(
        json!({"id":"tot","user_id":"u","alert_type":"tvl_change","throttle_minutes":0,
        "conditions":{"protocol_id":"1","window":3600,"threshold_pct":10,"direction":"any"}}),
    );
    let head = vec![
        total_rule,
        tvl("1", "ethereum", 100.0, 0),
        tvl("1", "arbitrum", 100.0, 0),
        Op::Close,
    ];
    let update = [
        tvl("1", "ethereum", 150.0, 3600),
        tvl("1", "arbitrum", 90.0, 1800), // late: older than the protocol's newest
        tvl("2", "ethereum", 5.0, 3600),  // another protocol
        tvl("1", "arbitrum", 150.0, 3600),
    ];
    let after_close = vec![
        tvl("1", "ethereum", 150.0, 3600), // a duplicate of a known chain: ignored
        tvl("1", "base", 7.0, 3600),       // a new chain of a closed update: late
        Op::Close,
    ];
    let whole = vec![head.clone(), update.to_vec(), vec![Op::Close], after_close.clone()];
    let cut = vec![
        head,
        update[..1].to_vec(),
        update[1..3].to_vec(),
        update[3..].to_vec(),
        vec![Op::Close],
        after_close,
    ];
    for batches in [&whole, &cut] {
        for workers in [1, 2] {
            let r = run(workers, batches, OpConfig::default());
            let got: Vec<(&str, i64, f64)> = r
                .alerts
                .iter()
                .map(|a| (a.rule_id.as_str(), a.triggered_at / 1000, a.value))
                .collect();
            // 200 → 300: +50 %, once, with both chains of the update.
            assert_eq!(
                got,
                vec![("tot", 3600, 50.0)],
                "{} epochs, {workers} workers",
                batches.len()
            );
            let late: Vec<&str> = r.dead.iter().map(|d| d.raw.as_str()).collect();
            assert_eq!(late.len(), 2, "{late:?}");
            assert!(late[0].contains("\"timestamp\":1800") || late[1].contains("\"timestamp\":1800"));
            assert!(late.iter().any(|l| l.contains("\"chain\":\"base\"")), "{late:?}");
            assert!(r.dead.iter().all(|d| d.reason == "late"));
            let totals: Vec<f64> = r
                .events
                .iter()
                .filter_map(|e| match &e.data {
                    schemas::EventData::TvlUpdate { protocol_id, tvl, .. } if protocol_id == "1" => Some(*tvl),
                    _ => None,
                })
                .collect();
            assert_eq!(totals, vec![200.0, 300.0], "one tvl_update per closed update");
            assert_eq!(as_model(&r.alerts), model(batches).alerts, "the reference model agrees");
        }
    }
}

#[test]
fn tvl_total_is_evaluated_once_per_timestamp() {
    let batches = vec![
        vec![
            rule(
                json!({"id":"tot","user_id":"u","alert_type":"tvl_change","throttle_minutes":0,
                "conditions":{"protocol_id":"2269","window":3600,"threshold_pct":10,"direction":"any"}}),
            ),
            rule(
                json!({"id":"eth","user_id":"u","alert_type":"tvl_change","throttle_minutes":0,
                "conditions":{"protocol_id":"2269","chain":"ethereum","window":3600,"threshold_pct":10,"direction":"any"}}),
            ),
            Op::Rec(Record::Protocol(Box::new(schemas::Protocol {
                id: "2269".into(),
                name: "Aave V3".into(),
                symbol: None,
                slug: None,
                category: None,
                chains: vec![],
            }))),
            tvl("2269", "ethereum", 100.0, 0),
            tvl("2269", "arbitrum", 100.0, 0),
        ],
        vec![
            // ethereum +50% (chain rule fires), arbitrum -50%: total unchanged → no total alert.
            tvl("2269", "ethereum", 150.0, 3600),
            tvl("2269", "arbitrum", 50.0, 3600),
        ],
        vec![tvl("2269", "arbitrum", 100.0, 7200), Op::Close],
    ];
    let r = run(2, &batches, OpConfig::default());
    let ids: Vec<(&str, i64)> = r
        .alerts
        .iter()
        .map(|a| (a.rule_id.as_str(), a.triggered_at / 1000))
        .collect();
    // At 7200 the total is 250 vs 200 at 3600... but the reference is the total at ≤ 3600 (200): +25%.
    assert_eq!(ids, vec![("eth", 3600), ("tot", 7200)]);
    assert_eq!(r.alerts[1].message, "Aave V3 TVL +25.00% in 1h ($200.00 → $250.00)");
    let totals: Vec<f64> = r
        .events
        .iter()
        .filter_map(|e| match &e.data {
            schemas::EventData::TvlUpdate { tvl, .. } => Some(*tvl),
            _ => None,
        })
        .collect();
    assert_eq!(
        totals,
        vec![200.0, 200.0, 250.0],
        "one tvl_update per protocol timestamp"
    );
}

#[test]
fn whale_uses_latest_earlier_price_and_rules_change_live() {
    let usdc = "ethereum:0xa0b8";
    let transfer = |amount: f64, t: i64, tx: &str| {
        Op::Rec(Record::Transfer(Box::new(Transfer {
            chain: "ethereum".into(),
            tx_hash: tx.into(),
            coin: usdc.into(),
            from: None,
            to: None,
            amount,
            timestamp: t * 1000,
        })))
    };
    let batches = vec![
        vec![
            transfer(2_000_000.0, 5, "0x0"), // no price yet → no alert
            price(usdc, 1.0, 10),
            price(usdc, 0.5, 30),
            rule(
                json!({"id":"w","user_id":"u","alert_type":"whale_movement","throttle_minutes":0,
                "conditions":{"min_usd":1_500_000}}),
            ),
            transfer(2_000_000.0, 20, "0x1"), // valued at the t=10 price: $2M → fires
            transfer(2_000_000.0, 30, "0x2"), // valued at 0.5: $1M → no
        ],
        vec![
            rule(
                json!({"id":"w","user_id":"u","alert_type":"whale_movement","throttle_minutes":0,
                "conditions":{"min_usd":1_500_000},"enabled":false}),
            ),
            transfer(9_000_000.0, 40, "0x3"), // disabled
            rule(
                json!({"id":"w","user_id":"u","alert_type":"whale_movement","throttle_minutes":0,
                "conditions":{"coin":usdc,"min_usd":500_000}}),
            ),
            transfer(2_000_000.0, 50, "0x4"), // re-enabled under its coin: fires
            Op::Del("w".into()),
            transfer(9_000_000.0, 60, "0x5"), // deleted
        ],
    ];
    for workers in [1, 3] {
        let r = run(workers, &batches, OpConfig::default());
        let got: Vec<(i64, f64)> = r.alerts.iter().map(|a| (a.triggered_at / 1000, a.value)).collect();
        assert_eq!(got, vec![(20, 2_000_000.0), (50, 1_000_000.0)], "workers={workers}");
        assert_eq!(
            r.events
                .iter()
                .filter(|e| e.data.type_name() == "whale_transfer")
                .count(),
            5
        );
    }
}

#[test]
fn depeg_and_gas_crossings_and_market_depeg_events() {
    let usdc = "coingecko:usd-coin";
    let gas = |g: f64, t: i64| {
        Op::Rec(Record::Gas(GasTick {
            chain: "ethereum".into(),
            gwei: g,
            timestamp: t * 1000,
        }))
    };
    let batches = vec![vec![
        rule(json!({"id":"d","user_id":"u","alert_type":"depeg","throttle_minutes":0,
            "conditions":{"coin":usdc,"peg":1.0,"deviation_pct":2}})),
        rule(
            json!({"id":"g","user_id":"u","alert_type":"gas_price","throttle_minutes":0,
            "conditions":{"chain":"ethereum","operator":">","gwei":50}}),
        ),
        price(usdc, 1.0, 1),
        price(usdc, 0.97, 2),  // enters 2% band (and the 1% market band)
        price(usdc, 0.96, 3),  // still out: no new alert
        price(usdc, 0.999, 4), // back (exit event)
        price(usdc, 1.03, 5),  // out again: alert
        gas(40.0, 1),
        gas(60.0, 2),
        gas(70.0, 3),
        gas(30.0, 4),
        gas(51.0, 5),
    ]];
    let r = run(2, &batches, OpConfig::default());
    let got: Vec<(&str, i64)> = r
        .alerts
        .iter()
        .map(|a| (a.rule_id.as_str(), a.triggered_at / 1000))
        .collect();
    let mut got = got;
    got.sort();
    assert_eq!(got, vec![("d", 2), ("d", 5), ("g", 2), ("g", 5)]);
    let depeg: Vec<(&str, i64)> = r
        .events
        .iter()
        .filter_map(|e| match &e.data {
            schemas::EventData::Depeg { state, timestamp, .. } => Some((*state, timestamp / 1000)),
            _ => None,
        })
        .collect();
    assert_eq!(depeg, vec![("enter", 2), ("exit", 4), ("enter", 5)]);
}

#[test]
fn history_is_bounded_by_the_largest_window() {
    // 10 days of 10-minute ticks for one coin: only ~24h of history (plus one) is kept.
    let c = "coingecko:x";
    let ops: Vec<Op> = (0..1440).map(|i| price(c, 1.0 + (i % 7) as f64, i * 600)).collect();
    let mut state = operators::KeyedState::new(OpConfig::default());
    let mut seq = Sequencer::new(1, 0);
    let mut envs = Vec::new();
    for op in ops {
        if let Op::Rec(r) = op {
            seq.push(SourcePos::new("t:".into(), 0), r, &mut envs);
        }
    }
    let mut out = Vec::new();
    for e in envs {
        state.process(e, &mut out);
    }
    assert!(state.history_len() <= 24 * 6 + 2, "kept {}", state.history_len());
}

#[test]
fn throttle_holds_when_a_rule_moves_between_workers() {
    // A gas rule fires on ethereum, moves to arbitrum, is deleted and re-created on ethereum.
    // Its throttle (1 min) spans the moves: matches at 4 s and 65 s are throttled by the
    // firings at 2 s and 63 s made under the other chain, and 63 s and 124 s fire.
    let g = |chain: &str| {
        rule(
            json!({"id":"g","user_id":"u","alert_type":"gas_price","throttle_minutes":1,
            "conditions":{"chain":chain,"operator":">","gwei":50}}),
        )
    };
    let batches = vec![
        vec![g("ethereum"), gas("ethereum", 40.0, 1), gas("ethereum", 60.0, 2)],
        vec![g("arbitrum"), gas("arbitrum", 40.0, 3), gas("arbitrum", 60.0, 4)],
        vec![gas("arbitrum", 40.0, 30), gas("arbitrum", 60.0, 63)],
        vec![Op::Del("g".into()), g("ethereum"), gas("ethereum", 40.0, 64)],
        vec![
            gas("ethereum", 60.0, 65),
            gas("ethereum", 40.0, 100),
            gas("ethereum", 60.0, 124),
        ],
    ];
    let expected = model(&batches).alerts;
    assert_eq!(
        expected.iter().map(|a| a.3 / 1000).collect::<Vec<_>>(),
        vec![2, 63, 124]
    );
    let worker = |chain: &str, w: u64| operators::Key::Chain(chain).hash() % w;
    assert!(
        (2..=4).any(|w| worker("ethereum", w) != worker("arbitrum", w)),
        "the chains must land on different workers for some worker count"
    );
    for workers in 1..=4 {
        let got = as_model(&run(workers, &batches, OpConfig::default()).alerts);
        assert_eq!(got, expected, "{workers} workers");
    }
}

#[test]
fn a_deleted_rules_throttle_lasts_its_throttle_period_in_event_time() {
    // "g" fires at 2 s with a 1-minute throttle and is deleted: its deadline is 62 s. It is
    // re-created with a 10-minute throttle and matches at 6 s on ethereum (whose own clock is
    // at 2 s). Re-created before any record reached 62 s it keeps its throttle (6 s < 2 s +
    // 10 min: held); once an arbitrum record at 62 s has passed the deadline, it is a new rule
    // and fires.
    let g = |minutes: f64| {
        rule(
            json!({"id":"g","user_id":"u","alert_type":"gas_price","throttle_minutes":minutes,
            "conditions":{"chain":"ethereum","operator":">","gwei":50}}),
        )
    };
    for (passed, expected) in [(61, vec![2]), (62, vec![2, 6])] {
        let batches = vec![
            vec![g(1.0), gas("ethereum", 40.0, 1), gas("ethereum", 60.0, 2)],
            vec![Op::Del("g".into()), gas("arbitrum", 1.0, passed)],
            vec![g(10.0), gas("ethereum", 40.0, 5), gas("ethereum", 60.0, 6)],
        ];
        let m = model(&batches).alerts;
        assert_eq!(
            m.iter().map(|a| a.3 / 1000).collect::<Vec<_>>(),
            expected,
            "model, {passed} s"
        );
        for workers in 1..=4 {
            let got = as_model(&run(workers, &batches, OpConfig::default()).alerts);
            assert_eq!(got, m, "{workers} workers, {passed} s");
        }
    }
}

#[test]
fn a_rule_window_past_the_bound_is_dead_lettered_and_replaces_nothing_silently() {
    let c = "coingecko:x";
    let window_rule = |days: i64| {
        rule(
            json!({"id":"w","user_id":"u","alert_type":"price_change","throttle_minutes":0,
            "conditions":{"coin":c,"window":days * 86_400,"threshold_pct":1,"direction":"any"}}),
        )
    };
    let batches = vec![
        // 30 days is the bound: accepted, and it fires.
        vec![window_rule(30), price(c, 10.0, 0), price(c, 20.0, 30 * 86_400)],
        // 31 days: refused with a reason; the accepted version is gone too.
        vec![window_rule(31), price(c, 40.0, 31 * 86_400)],
    ];
    let cfg = OpConfig::default();
    assert_eq!(cfg.max_rule_window, 30 * 86_400_000, "the default bound is 30 days");
    for workers in [1, 2] {
        let r = run(workers, &batches, cfg.clone());
        assert_eq!(r.alerts.len(), 1, "{:?}", r.alerts);
        assert_eq!(r.alerts[0].triggered_at, 30 * 86_400_000);
        assert_eq!(r.dead.len(), 1, "{:?}", r.dead);
        assert_eq!(
            r.dead[0].reason,
            "invalid rule: window 31d is longer than the maximum of 30d (operators.max_rule_window_days)"
        );
        assert_eq!(r.dead[0].reason_label(), "invalid_rule");
        assert!(r.dead[0].raw.contains("\"id\":\"w\""), "{}", r.dead[0].raw);
    }
    let short = OpConfig {
        max_rule_window: 86_400_000,
        ..OpConfig::default()
    };
    let r = run(1, &batches[..1], short);
    assert!(r.alerts.is_empty(), "a 30-day rule past a 1-day bound never fires");
    assert!(
        r.dead[0].reason.contains("window 30d is longer than the maximum of 1d"),
        "{}",
        r.dead[0].reason
    );
}

#[test]
fn finite_input_never_gives_infinite_output() {
    let c = "coingecko:x";
    let batches = vec![vec![
        rule(
            json!({"id":"chg","user_id":"u","alert_type":"price_change","throttle_minutes":0,
            "conditions":{"coin":c,"window":"5m","threshold_pct":1,"direction":"any"}}),
        ),
        rule(
            json!({"id":"tvl","user_id":"u","alert_type":"tvl_change","throttle_minutes":0,
            "conditions":{"protocol_id":"p","window":"5m","threshold_pct":1,"direction":"any"}}),
        ),
        rule(
            json!({"id":"whale","user_id":"u","alert_type":"whale_movement","throttle_minutes":0,
            "conditions":{"min_usd":1}}),
        ),
        // 5e-324 → 1.7e308 is a finite price each time, but an infinite change.
        price(c, 5e-324, 0),
        price(c, 1.7e308, 600),
        // Two finite chain values whose total overflows: the second is refused.
        tvl("p", "ethereum", 1e308, 0),
        tvl("p", "arbitrum", 1e308, 0),
        // amount × price overflows.
        Op::Rec(Record::Transfer(Box::new(Transfer {
            chain: "ethereum".into(),
            tx_hash: "0x1".into(),
            coin: c.into(),
            from: None,
            to: None,
            amount: 1e300,
            timestamp: 700_000,
        }))),
    ]];
    for workers in [1, 2] {
        let r = run(workers, &batches, OpConfig::default());
        for a in &r.alerts {
            assert!(a.value.is_finite() && !a.message.contains("inf"), "{a:?}");
        }
        assert!(
            r.alerts.iter().all(|a| a.rule_id != "chg"),
            "no alert from an infinite change"
        );
        for e in &r.events {
            let text = serde_json::to_string(e).unwrap();
            assert!(!text.contains("null,\"chainTvls\"") && !text.contains("inf"), "{text}");
            if let schemas::EventData::TvlUpdate { tvl, .. } = &e.data {
                assert!(tvl.is_finite(), "{text}");
            }
        }
        let reasons: Vec<&str> = r.dead.iter().map(|d| d.reason.as_str()).collect();
        assert!(
            reasons.contains(&"value out of range: the total TVL of protocol p would overflow"),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.starts_with("value out of range: 1e300 × ")),
            "{reasons:?}"
        );
        assert_eq!(r.dead.len(), 2, "{reasons:?}");
    }
}

#[test]
fn nothing_of_deleted_rules_outlives_their_throttle() {
    // 1,000 gas rules fire, move to another chain, and are deleted; once event time has
    // passed their throttle (1 min), no stage holds anything for them.
    let mut seq = Sequencer::new(2, 0);
    let mut states = [
        operators::KeyedState::new(OpConfig::default()),
        operators::KeyedState::new(OpConfig::default()),
    ];
    let mut throttle = operators::Throttle::default();
    let pos = || SourcePos::new("t:".into(), 0);
    let g = |i: usize, chain: &str| {
        Record::Rule(Box::new(
            AlertRule::from_json(&json!({"id": format!("g{i}"),"user_id":"u","alert_type":"gas_price",
                "throttle_minutes":1,"conditions":{"chain":chain,"operator":">","gwei":50}}))
            .expect("valid rule"),
        ))
    };
    let gas = |chain: &str, gwei: f64, t: Millis| {
        Record::Gas(GasTick {
            chain: chain.into(),
            gwei,
            timestamp: t,
        })
    };
    let mut envs = Vec::new();
    for i in 0..1000 {
        seq.push(pos(), g(i, "ethereum"), &mut envs);
    }
    seq.push(pos(), gas("ethereum", 40.0, 1_000), &mut envs);
    seq.push(pos(), gas("ethereum", 60.0, 2_000), &mut envs);
    for i in 0..1000 {
        seq.push(pos(), g(i, "arbitrum"), &mut envs);
        seq.delete_rule(pos(), &format!("g{i}"), &mut envs);
    }
    // One record reaches the deadlines (2 s + 1 min).
    seq.push(pos(), gas("base", 1.0, 62_000), &mut envs);
    let mut fired = 0;
    let mut out = Vec::new();
    for e in envs {
        states[(e.route % 2) as usize].process(e, &mut out);
        for o in out.drain(..) {
            let item = match o {
                operators::KeyedOut::Candidate(c) => operators::Throttled::Match(c),
                operators::KeyedOut::Forget { seq, rule_id } => operators::Throttled::Forget { seq, rule_id },
                _ => continue,
            };
            fired += usize::from(throttle.take(item).is_some());
        }
    }
    assert_eq!(fired, 1000, "every rule fired once");
    assert!(throttle.is_empty(), "throttle holds {}", throttle.len());
    // Only the numbers of the keys that had records stay (ethereum and base; rules are not
    // numbered): they are never forgotten.
    assert!(
        seq.sizes()
            .iter()
            .all(|(k, n)| *n == if *k == "interned_keys" { 2 } else { 0 }),
        "{:?}",
        seq.sizes()
    );
    for s in &states {
        assert!(
            s.sizes().iter().filter(|(k, _)| *k != "chains").all(|(_, n)| *n == 0),
            "{:?}",
            s.sizes()
        );
    }
}
