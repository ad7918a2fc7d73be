use std::collections::{BTreeSet, HashMap};

use schemas::{AlertType, Conditions, Kind, parse_record};

use super::*;

const START: i64 = 1_717_430_400;
const T0: Millis = START * SEC;

/// The feed's records with timestamps before `start + minutes`.
fn until(seed: u64, minutes: i64) -> Vec<Record> {
    DemoFeed::new(START, seed)
        .map(|(_, r)| r)
        .take_while(|r| r.timestamp() < T0 + minutes * 60 * SEC)
        .collect()
}

#[test]
fn deterministic_per_seed() {
    let a: Vec<_> = DemoFeed::new(START, 7).take(10_000).collect();
    let b: Vec<_> = DemoFeed::new(START, 7).take(10_000).collect();
    assert_eq!(a, b);
    let c: Vec<_> = DemoFeed::new(START, 8).take(10_000).collect();
    assert_ne!(a, c);
    assert!(
        a.iter()
            .enumerate()
            .all(|(i, (pos, _))| &*pos.source == "demo:" && pos.offset == i as u64)
    );
}

#[test]
fn timestamps_non_decreasing_and_tvl_history_first() {
    let recs: Vec<Record> = DemoFeed::new(START, 1).take(20_000).map(|(_, r)| r).collect();
    assert!(recs.windows(2).all(|w| w[0].timestamp() <= w[1].timestamp()));
    // One snapshot per protocol an hour before the start, then live data from the start on.
    let history = recs.iter().take_while(|r| r.timestamp() < T0).count();
    assert_eq!(history, PROTOCOLS.len());
    assert!(
        recs[..history]
            .iter()
            .all(|r| matches!(r, Record::Tvl(t) if t.timestamp == T0 - HOUR))
    );
}

#[test]
fn every_kind_in_the_first_hour_and_records_validate() {
    let recs = until(42, 60);
    let kinds: BTreeSet<Kind> = recs.iter().map(Record::kind).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([Kind::Price, Kind::Tvl, Kind::Transfer, Kind::Gas, Kind::Liquidation])
    );
    let coins: BTreeSet<&str> = recs
        .iter()
        .filter_map(|r| {
            if let Record::Price(p) = r {
                Some(p.coin.as_str())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(coins.len(), COINS.len());
    for r in &recs {
        match r {
            Record::Tvl(t) => {
                assert!(
                    !t.chains.is_empty() && t.chains.windows(2).all(|w| w[0].0 < w[1].0),
                    "{t:?}"
                );
                for (chain, tvl) in &t.chains {
                    let one = Record::Tvl(TvlUpdate {
                        protocol_id: t.protocol_id.clone(),
                        timestamp: t.timestamp,
                        chains: vec![(chain.clone(), *tvl)],
                        extra: Vec::new(),
                    });
                    assert_eq!(parse_record(Kind::Tvl, &one.to_json()).as_ref(), Ok(&one));
                }
            }
            r => assert_eq!(parse_record(r.kind(), &r.to_json()).as_ref(), Ok(r), "{}", r.to_json()),
        }
    }
    let protocols = demo_protocols();
    assert_eq!(protocols.len(), PROTOCOLS.len());
    for p in &protocols {
        let line = Record::Protocol(Box::new(p.clone())).to_json();
        assert_eq!(
            parse_record(Kind::Protocol, &line),
            Ok(Record::Protocol(Box::new(p.clone())))
        );
    }
}

#[test]
fn usdc_depegs_and_recovers_every_hour() {
    let recs = until(3, 120);
    for coin in [USDC, USDC_ETH] {
        for hour in 0..2 {
            let from = T0 + hour * HOUR;
            let ticks: Vec<(Millis, f64)> = recs
                .iter()
                .filter_map(|r| match r {
                    Record::Price(p) if p.coin == coin && p.timestamp >= from && p.timestamp < from + HOUR => {
                        Some((p.timestamp, p.price))
                    }
                    _ => None,
                })
                .collect();
            assert!(
                ticks
                    .iter()
                    .filter(|(t, _)| *t < from + 20 * 60 * SEC)
                    .all(|(_, p)| (p - 1.0).abs() < 0.005)
            );
            let low = ticks.iter().position(|(_, p)| *p < 0.98).expect("depeg below 0.98");
            assert!(ticks[low..].iter().any(|(_, p)| *p > 0.995), "{coin} recovers");
            let min = ticks.iter().map(|(_, p)| *p).fold(f64::MAX, f64::min);
            assert!((0.87..0.9).contains(&min), "{coin} bottom {min}");
        }
    }
}

/// When each demo rule first fires (event time), by a minimal reading of SPEC §2
/// (no throttle, no duplicates handling needed for a first firing).
fn first_firings(recs: &[Record]) -> HashMap<String, Millis> {
    let rules = demo_rules();
    let mut prices: HashMap<&str, Vec<(Millis, f64)>> = HashMap::new();
    let mut tvl: HashMap<&str, Vec<(Millis, f64)>> = HashMap::new();
    let mut gas: HashMap<&str, f64> = HashMap::new();
    let mut fired = HashMap::new();
    let before = |s: &[(Millis, f64)], t: Millis| s.iter().rev().find(|(ts, _)| *ts <= t).map(|(_, v)| *v);
    for r in recs {
        let t = r.timestamp();
        for rule in &rules {
            let hit = match (&rule.conditions, r) {
                (
                    Conditions::PriceChange {
                        coin,
                        window,
                        threshold_pct,
                        direction,
                    },
                    Record::Price(p),
                ) if &p.coin == coin => before(prices.get(coin.as_str()).map_or(&[][..], |v| v), t - window)
                    .is_some_and(|reference| {
                        direction.matches((p.price - reference) / reference * 100.0, *threshold_pct)
                    }),
                (Conditions::PriceThreshold { coin, operator, value }, Record::Price(p)) if &p.coin == coin => {
                    let prev = prices.get(coin.as_str()).and_then(|v| v.last()).map(|(_, x)| *x);
                    operator.holds(p.price, *value) && prev.is_some_and(|x| !operator.holds(x, *value))
                }
                (
                    Conditions::Depeg {
                        coin,
                        peg,
                        deviation_pct,
                    },
                    Record::Price(p),
                ) if &p.coin == coin => {
                    let out = |x: f64| (x / peg - 1.0).abs() * 100.0 >= *deviation_pct;
                    let prev = prices.get(coin.as_str()).and_then(|v| v.last()).map(|(_, x)| *x);
                    out(p.price) && prev.is_some_and(|x| !out(x))
                }
                (
                    Conditions::TvlChange {
                        protocol_id,
                        window,
                        threshold_pct,
                        direction,
                        ..
                    },
                    Record::Tvl(u),
                ) if &u.protocol_id == protocol_id => {
                    let total: f64 = u.chains.iter().map(|(_, v)| v).sum();
                    before(tvl.get(protocol_id.as_str()).map_or(&[][..], |v| v), t - window).is_some_and(|reference| {
                        direction.matches((total - reference) / reference * 100.0, *threshold_pct)
                    })
                }
                (Conditions::WhaleMovement { min_usd, .. }, Record::Transfer(x)) => prices
                    .get(x.coin.as_str())
                    .and_then(|v| before(v, t))
                    .is_some_and(|p| p * x.amount >= *min_usd),
                (Conditions::GasPrice { chain, operator, gwei }, Record::Gas(g)) if &g.chain == chain => {
                    operator.holds(g.gwei, *gwei) && gas.get(chain.as_str()).is_some_and(|x| !operator.holds(*x, *gwei))
                }
                (Conditions::Liquidation { min_usd, .. }, Record::Liquidation(l)) => l.amount_usd >= *min_usd,
                _ => false,
            };
            if hit {
                fired.entry(rule.id.clone()).or_insert(t);
            }
        }
        match r {
            Record::Price(p) => prices.entry(&p.coin).or_default().push((t, p.price)),
            Record::Tvl(u) => tvl
                .entry(&u.protocol_id)
                .or_default()
                .push((t, u.chains.iter().map(|(_, v)| v).sum())),
            Record::Gas(g) => {
                gas.insert(&g.chain, g.gwei);
            }
            _ => {}
        }
    }
    fired
}

#[test]
fn demo_rules_cover_every_type_and_fire_early() {
    let rules = demo_rules();
    assert_eq!(rules.len(), 8);
    let types: BTreeSet<&str> = rules.iter().map(|r| r.conditions.alert_type().name()).collect();
    assert_eq!(types.len(), 7);
    assert!(rules.iter().all(|r| r.user_id == "demo" && r.enabled));
    assert!(rules.iter().any(|r| r.conditions.alert_type() == AlertType::Depeg));
    for seed in [0, 1, 2, 3, 42, 0xdead_beef] {
        let fired = first_firings(&until(seed, 30));
        for rule in &rules {
            let limit = match rule.id.as_str() {
                "demo-usdc-depeg" => 25,
                "demo-sol-15m" => 17,
                _ => 15,
            };
            let at = fired.get(&rule.id).map(|t| (t - T0) / SEC);
            assert!(
                at.is_some_and(|s| s <= limit * 60),
                "seed {seed}: {} fired at {at:?}s",
                rule.id
            );
        }
    }
}

#[test]
fn aave_tvl_drop_is_seen_by_a_1h_window_every_time() {
    let totals: Vec<(Millis, f64)> = until(5, 190)
        .iter()
        .filter_map(|r| match r {
            Record::Tvl(u) if u.protocol_id == "1599" => Some((u.timestamp, u.chains.iter().map(|(_, v)| v).sum())),
            _ => None,
        })
        .collect();
    for k in 0..3 {
        let drop = T0 + (600 + k * 3540) * SEC;
        let now = totals
            .iter()
            .find(|(t, _)| *t == drop)
            .map(|(_, v)| *v)
            .expect("drop update");
        let reference = totals
            .iter()
            .rev()
            .find(|(t, _)| *t <= drop - HOUR)
            .map(|(_, v)| *v)
            .expect("reference");
        assert!((now - reference) / reference < -0.08, "drop {k}: {now} vs {reference}");
    }
}
