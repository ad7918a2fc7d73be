//! A plain sequential reference model of SPEC §2, written independently of the dataflow:
//! full histories, linear scans, every rule checked against every record.

use std::collections::{BTreeMap, HashMap};

use schemas::{AlertRule, Conditions, Direction, Millis, Operator, Record};
use sha2::{Digest, Sha256};

/// One step of a test stream.
#[derive(Clone, Debug)]
pub enum Op {
    /// A record (rules and protocols are upserts).
    Rec(Record),
    /// Delete a rule by id.
    Del(String),
    /// Close every open TVL update (the end of an input, or updates settling in the live
    /// job): `Sequencer::close_updates`.
    Close,
}

/// What the model says the alerts are: (alert_id, rule_id, subject, triggered_at, value).
pub type ModelAlert = (String, String, String, Millis, f64);

#[derive(Default)]
struct Proto {
    last_ts: Option<Millis>,
    chain_hist: HashMap<String, Vec<(Millis, f64)>>,
    latest: BTreeMap<String, f64>,
    total_hist: Vec<(Millis, f64)>,
    pending: Option<(Millis, u64)>,
    liq_last: Option<(Millis, Vec<String>)>,
}

#[derive(Default)]
pub struct Model {
    rules: BTreeMap<String, AlertRule>,
    prices: HashMap<String, Vec<(Millis, f64)>>,
    transfers_last: HashMap<String, (Millis, Vec<String>)>,
    protos: HashMap<String, Proto>,
    gas: HashMap<String, Vec<(Millis, f64)>>,
    throttle: HashMap<String, Millis>,
    /// (seq, rule_id, subject, t, value, identity, throttle_ms) of the current batch.
    matches: Vec<(u64, String, String, Millis, f64, String, Millis)>,
    /// (seq, rule_id) of the current batch's forgotten throttles.
    forgets: Vec<(u64, String)>,
    /// The newest record timestamp so far.
    newest: Option<Millis>,
    /// Deleted rules and the event time from which their throttle is forgotten: the newest
    /// timestamp at the delete plus the deleted rule's throttle (docs/ARCHITECTURE.md,
    /// "Deleted rules"). A re-created rule before then keeps its throttle.
    deadlines: BTreeMap<String, Millis>,
    /// Alerts so far.
    pub alerts: Vec<ModelAlert>,
    /// Positions (op indexes) of records rejected as late.
    pub late: Vec<u64>,
    /// The open TVL update of each protocol: its newest timestamp (as the sequencer keeps it).
    open: BTreeMap<String, Millis>,
    /// The next sequence number (one per op; a close takes one per protocol it closes).
    next_seq: u64,
    /// The next op's position.
    next_pos: u64,
}

/// SPEC §2's direction test, written here rather than taken from the code under test.
fn meets(direction: &Direction, pct: f64, threshold: f64) -> bool {
    match direction {
        Direction::Up => pct >= threshold,
        Direction::Down => -pct >= threshold,
        Direction::Any => pct >= threshold || -pct >= threshold,
    }
}

/// `x <op> value`, written here.
fn compare(op: &Operator, x: f64, value: f64) -> bool {
    match op {
        Operator::Gt => x > value,
        Operator::Ge => x >= value,
        Operator::Lt => x < value,
        Operator::Le => x <= value,
    }
}

/// A crossing (SPEC §2): true for this value and false for the previous one.
fn crossing(op: &Operator, prev: f64, x: f64, value: f64) -> bool {
    compare(op, x, value) && !compare(op, prev, value)
}

/// The alert id as docs/ARCHITECTURE.md defines it (SHA-256 over length-prefixed fields,
/// first 16 bytes as hex), computed here; `pipeline/tests/golden.rs` checks the binary's ids
/// against Python's hashlib.
fn model_alert_id(rule_id: &str, subject: &str, t: Millis, identity: &str) -> String {
    let mut h = Sha256::new();
    let t = t.to_be_bytes();
    for part in [rule_id.as_bytes(), subject.as_bytes(), &t[..], identity.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A data record's event time (rules and protocols have none).
fn event_time(r: &Record) -> Option<Millis> {
    match r {
        Record::Price(p) => Some(p.timestamp),
        Record::Tvl(t) => Some(t.timestamp),
        Record::Transfer(t) => Some(t.timestamp),
        Record::Gas(g) => Some(g.timestamp),
        Record::Liquidation(l) => Some(l.timestamp),
        Record::Protocol(_) | Record::Rule(_) => None,
    }
}

/// Value as of `t`: the last point with time ≤ t (linear scan).
fn as_of(h: &[(Millis, f64)], t: Millis) -> Option<f64> {
    h.iter().rev().find(|(ts, _)| *ts <= t).map(|x| x.1)
}

impl Model {
    fn active(&self) -> impl Iterator<Item = &AlertRule> {
        self.rules.values().filter(|r| r.enabled)
    }

    fn matched(&mut self, seq: u64, rule: &AlertRule, subject: &str, t: Millis, value: f64, identity: String) {
        self.matches.push((
            seq,
            rule.id.clone(),
            subject.to_string(),
            t,
            value,
            identity,
            // throttle_minutes → ms, rounded to the nearest ms.
            (rule.throttle_minutes * 60_000.0).round() as Millis,
        ));
    }

    /// Runs one batch (an ingest epoch) of ops. A batch does not close TVL updates: a
    /// protocol's records at one timestamp are one update wherever batches are cut (SPEC §2);
    /// it closes at a newer record of the protocol or at [`Op::Close`].
    pub fn batch(&mut self, ops: &[Op]) {
        for op in ops {
            let pos = self.next_pos;
            self.next_pos += 1;
            if let Op::Close = op {
                for (pid, t) in std::mem::take(&mut self.open) {
                    // The sequencer stamps each close.
                    self.next_seq += 1;
                    if self
                        .protos
                        .get(&pid)
                        .and_then(|p| p.pending)
                        .is_some_and(|(ts, _)| ts == t)
                    {
                        self.flush(&pid);
                    }
                }
                continue;
            }
            if let Op::Rec(r) = op
                && let Some(t) = event_time(r)
                && self.newest.is_none_or(|n| t > n)
            {
                self.newest = Some(t);
                let due: Vec<String> = self
                    .deadlines
                    .iter()
                    .filter(|(_, d)| **d <= t)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in due {
                    // Each forget takes a sequence number of its own, before the record.
                    self.deadlines.remove(&id);
                    self.forgets.push((self.next_seq, id));
                    self.next_seq += 1;
                }
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.step(seq, pos, op);
        }
        let mut ms = std::mem::take(&mut self.matches);
        ms.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut forgets = std::mem::take(&mut self.forgets).into_iter().peekable();
        for (seq, rule_id, subject, t, value, identity, throttle) in ms {
            while let Some((_, id)) = forgets.next_if(|(s, _)| *s < seq) {
                self.throttle.remove(&id);
            }
            if let Some(&last) = self.throttle.get(&rule_id)
                && t < last + throttle
            {
                continue;
            }
            self.throttle.insert(rule_id.clone(), t);
            self.alerts.push((
                model_alert_id(&rule_id, &subject, t, &identity),
                rule_id,
                subject,
                t,
                value,
            ));
        }
        for (_, id) in forgets {
            self.throttle.remove(&id);
        }
    }

    fn step(&mut self, seq: u64, pos: u64, op: &Op) {
        let rec = match op {
            Op::Del(id) => {
                if let Some(rule) = self.rules.remove(id) {
                    let throttle = (rule.throttle_minutes * 60_000.0).round() as Millis;
                    let deadline = self.newest.unwrap_or(Millis::MIN).saturating_add(throttle);
                    self.deadlines.insert(id.clone(), deadline);
                }
                return;
            }
            Op::Close => return,
            Op::Rec(r) => r,
        };
        match rec {
            Record::Rule(r) => {
                self.deadlines.remove(&r.id);
                self.rules.insert(r.id.clone(), (**r).clone());
            }
            Record::Protocol(_) => {}
            Record::Price(p) => {
                if p.confidence.is_some_and(|c| c <= 0.3) {
                    return;
                }
                let hist = self.prices.entry(p.coin.clone()).or_default().clone();
                if let Some(&(last, _)) = hist.last() {
                    if p.timestamp < last {
                        self.late.push(pos);
                        return;
                    }
                    if p.timestamp == last {
                        return;
                    }
                }
                let (t, px) = (p.timestamp, p.price);
                let prev = hist.last().map(|x| x.1);
                let rules: Vec<AlertRule> = self.active().cloned().collect();
                for rule in &rules {
                    let value = match &rule.conditions {
                        Conditions::PriceChange {
                            coin,
                            window,
                            threshold_pct,
                            direction,
                        } if *coin == p.coin => {
                            let Some(r) = as_of(&hist, t - window) else { continue };
                            let pct = (px - r) / r * 100.0;
                            if !meets(direction, pct, *threshold_pct) {
                                continue;
                            }
                            pct
                        }
                        Conditions::PriceThreshold { coin, operator, value } if *coin == p.coin => match prev {
                            Some(prev) if crossing(operator, prev, px, *value) => px,
                            _ => continue,
                        },
                        Conditions::Depeg {
                            coin,
                            peg,
                            deviation_pct,
                        } if *coin == p.coin => {
                            let dev = |x: f64| (x / peg - 1.0).abs() * 100.0;
                            match prev {
                                Some(prev) if dev(px) >= *deviation_pct && dev(prev) < *deviation_pct => px,
                                _ => continue,
                            }
                        }
                        _ => continue,
                    };
                    self.matched(seq, rule, &p.coin, t, value, format!("price|{}|{t}", p.coin));
                }
                self.prices.entry(p.coin.clone()).or_default().push((t, px));
            }
            Record::Transfer(tr) => {
                let identity = format!(
                    "transfer|{}|{}|{}|{}|{}|{}",
                    tr.chain,
                    tr.tx_hash,
                    tr.coin,
                    tr.from.as_deref().unwrap_or(""),
                    tr.to.as_deref().unwrap_or(""),
                    tr.amount
                );
                let last = self
                    .transfers_last
                    .entry(tr.coin.clone())
                    .or_insert((Millis::MIN, Vec::new()));
                if tr.timestamp < last.0 {
                    self.late.push(pos);
                    return;
                }
                if tr.timestamp == last.0 {
                    if last.1.contains(&identity) {
                        return;
                    }
                } else {
                    *last = (tr.timestamp, Vec::new());
                }
                last.1.push(identity.clone());
                let Some(px) = self.prices.get(&tr.coin).and_then(|h| as_of(h, tr.timestamp)) else {
                    return;
                };
                let value = tr.amount * px;
                let rules: Vec<AlertRule> = self.active().cloned().collect();
                for rule in &rules {
                    let Conditions::WhaleMovement { coin, chain, min_usd } = &rule.conditions else {
                        continue;
                    };
                    if coin.as_ref().is_some_and(|c| *c != tr.coin)
                        || chain.as_ref().is_some_and(|c| *c != tr.chain)
                        || value < *min_usd
                    {
                        continue;
                    }
                    self.matched(seq, rule, &tr.coin, tr.timestamp, value, identity.clone());
                }
            }
            Record::Tvl(u) => {
                let open = self.open.entry(u.protocol_id.clone()).or_insert(u.timestamp);
                *open = (*open).max(u.timestamp);
                let p = self.protos.entry(u.protocol_id.clone()).or_default();
                if p.last_ts.is_some_and(|l| u.timestamp < l) {
                    self.late.push(pos);
                    return;
                }
                // Its update was closed already: known chains are duplicates, a new one is late.
                if p.last_ts == Some(u.timestamp) && p.pending.is_none() {
                    let t = u.timestamp;
                    let seen = |c: &String| {
                        p.chain_hist
                            .get(c)
                            .and_then(|h| h.last())
                            .is_some_and(|(ts, _)| *ts == t)
                    };
                    if !u.chains.iter().all(|(c, _)| seen(c)) {
                        self.late.push(pos);
                    }
                    return;
                }
                if p.pending.is_some_and(|(ts, _)| ts < u.timestamp) {
                    self.flush(&u.protocol_id);
                }
                let t = u.timestamp;
                let rules: Vec<AlertRule> = self.active().cloned().collect();
                let mut accepted = false;
                for (chain, tvl) in &u.chains {
                    let p = self.protos.entry(u.protocol_id.clone()).or_default();
                    let hist = p.chain_hist.entry(chain.clone()).or_default().clone();
                    if hist.last().is_some_and(|(ts, _)| *ts == t) {
                        continue;
                    }
                    for rule in &rules {
                        let Conditions::TvlChange {
                            protocol_id,
                            chain: Some(c),
                            window,
                            threshold_pct,
                            direction,
                        } = &rule.conditions
                        else {
                            continue;
                        };
                        if *protocol_id != u.protocol_id || c != chain {
                            continue;
                        }
                        let Some(r) = as_of(&hist, t - window) else { continue };
                        if r == 0.0 {
                            continue;
                        }
                        let pct = (tvl - r) / r * 100.0;
                        if meets(direction, pct, *threshold_pct) {
                            self.matched(
                                seq,
                                rule,
                                &u.protocol_id,
                                t,
                                pct,
                                format!("tvl|{}|{chain}|{t}", u.protocol_id),
                            );
                        }
                    }
                    let p = self.protos.entry(u.protocol_id.clone()).or_default();
                    p.chain_hist.entry(chain.clone()).or_default().push((t, *tvl));
                    p.latest.insert(chain.clone(), *tvl);
                    accepted = true;
                }
                if accepted {
                    let p = self.protos.entry(u.protocol_id.clone()).or_default();
                    p.last_ts = Some(t);
                    p.pending = Some((t, seq));
                }
            }
            Record::Gas(g) => {
                let hist = self.gas.entry(g.chain.clone()).or_default().clone();
                if let Some(&(last, _)) = hist.last() {
                    if g.timestamp < last {
                        self.late.push(pos);
                        return;
                    }
                    if g.timestamp == last {
                        return;
                    }
                }
                let prev = hist.last().map(|x| x.1);
                let rules: Vec<AlertRule> = self.active().cloned().collect();
                for rule in &rules {
                    let Conditions::GasPrice { chain, operator, gwei } = &rule.conditions else {
                        continue;
                    };
                    if *chain != g.chain {
                        continue;
                    }
                    if let Some(prev) = prev
                        && crossing(operator, prev, g.gwei, *gwei)
                    {
                        self.matched(
                            seq,
                            rule,
                            &g.chain,
                            g.timestamp,
                            g.gwei,
                            format!("gas|{}|{}", g.chain, g.timestamp),
                        );
                    }
                }
                self.gas.entry(g.chain.clone()).or_default().push((g.timestamp, g.gwei));
            }
            Record::Liquidation(l) => {
                let identity = format!(
                    "liquidation|{}|{}|{}|{}|{}",
                    l.protocol_id,
                    l.chain,
                    l.account.as_deref().unwrap_or(""),
                    l.amount_usd,
                    l.timestamp
                );
                let p = self.protos.entry(l.protocol_id.clone()).or_default();
                let last = p.liq_last.get_or_insert((Millis::MIN, Vec::new()));
                if l.timestamp < last.0 {
                    self.late.push(pos);
                    return;
                }
                if l.timestamp == last.0 {
                    if last.1.contains(&identity) {
                        return;
                    }
                } else {
                    *last = (l.timestamp, Vec::new());
                }
                last.1.push(identity.clone());
                let rules: Vec<AlertRule> = self.active().cloned().collect();
                for rule in &rules {
                    let Conditions::Liquidation {
                        protocol_id,
                        chain,
                        min_usd,
                    } = &rule.conditions
                    else {
                        continue;
                    };
                    if protocol_id.as_ref().is_some_and(|p| *p != l.protocol_id)
                        || chain.as_ref().is_some_and(|c| *c != l.chain)
                        || l.amount_usd < *min_usd
                    {
                        continue;
                    }
                    self.matched(seq, rule, &l.protocol_id, l.timestamp, l.amount_usd, identity.clone());
                }
            }
        }
    }

    fn flush(&mut self, pid: &str) {
        let Some(p) = self.protos.get_mut(pid) else { return };
        let Some((t, seq)) = p.pending.take() else { return };
        let total: f64 = p.latest.values().sum();
        let hist = p.total_hist.clone();
        let rules: Vec<AlertRule> = self.active().cloned().collect();
        for rule in &rules {
            let Conditions::TvlChange {
                protocol_id,
                chain: None,
                window,
                threshold_pct,
                direction,
            } = &rule.conditions
            else {
                continue;
            };
            if protocol_id != pid {
                continue;
            }
            let Some(r) = as_of(&hist, t - window) else { continue };
            if r == 0.0 {
                continue;
            }
            let pct = (total - r) / r * 100.0;
            if meets(direction, pct, *threshold_pct) {
                self.matched(seq, rule, pid, t, pct, format!("tvl|{pid}|{t}"));
            }
        }
        let p = self.protos.get_mut(pid).expect("exists");
        p.total_hist.push((t, total));
    }
}
