//! Rule matches on their way to becoming alerts, and the per-rule throttle.

use std::sync::Arc;

use schemas::{Alert, AlertRule, Conditions, Millis, alert_id};

use crate::format::{fmt_amount, fmt_pct, fmt_price, fmt_usd};
use serde::{Deserialize, Serialize};

/// The hash map of the operators' state: foldhash (seeded per process) instead of SipHash,
/// which showed up in profiles of rule matching; hashbrown's, for `entry_ref` (a record's key
/// is cloned into the map only when it is new).
pub type FastMap<K, V> = hashbrown::HashMap<K, V, foldhash::fast::RandomState>;

/// Facts about the triggering record shared by every rule it matches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordInfo {
    /// Coin, protocol or chain the alert is about.
    pub subject: String,
    /// Identity of the record (input of `alert_id`).
    pub identity: String,
    /// Display name of the subject (symbol, protocol name, …).
    pub label: String,
    /// Chain, where the record has one.
    pub chain: Option<String>,
}

/// Numbers behind an alert's message, beyond its value.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Detail {
    /// A *_change: the reference and the new level.
    Change {
        /// Level at `t − window`.
        from: f64,
        /// Level at `t`.
        to: f64,
    },
    /// A transfer: token units moved.
    Whale {
        /// Token units.
        amount: f64,
    },
    /// Nothing more (thresholds, depeg, liquidations).
    Plain,
}

/// A rule match before throttling. Cheap to make: the rule and the record facts are shared,
/// and the message is only formatted for matches that fire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// `seq` of the triggering record (orders matches of one rule).
    pub seq: u64,
    /// The rule as it was when it matched.
    pub rule: Arc<AlertRule>,
    /// The triggering record.
    pub info: Arc<RecordInfo>,
    /// Event time of the triggering record.
    pub triggered_at: Millis,
    /// Alert value.
    pub value: f64,
    /// Message numbers.
    pub detail: Detail,
}

impl Candidate {
    /// Order of matches: by triggering record, then rule.
    pub fn order_key(&self) -> (u64, &str) {
        (self.seq, &self.rule.id)
    }

    /// The human-readable message.
    pub fn message(&self) -> String {
        let (rule, info, v) = (&self.rule, &self.info, self.value);
        let label = &info.label;
        let chain = info.chain.as_deref().unwrap_or("");
        let window = rule.window_label().unwrap_or_default();
        match (&rule.conditions, self.detail) {
            (Conditions::PriceChange { .. }, Detail::Change { from, to }) => {
                format!(
                    "{label} {} in {window} ({} → {})",
                    fmt_pct(v),
                    fmt_price(from),
                    fmt_price(to)
                )
            }
            (Conditions::TvlChange { chain: Some(c), .. }, Detail::Change { from, to }) => format!(
                "{label} TVL on {c} {} in {window} ({} → {})",
                fmt_pct(v),
                fmt_usd(from),
                fmt_usd(to)
            ),
            (Conditions::TvlChange { .. }, Detail::Change { from, to }) => {
                format!(
                    "{label} TVL {} in {window} ({} → {})",
                    fmt_pct(v),
                    fmt_usd(from),
                    fmt_usd(to)
                )
            }
            (Conditions::PriceThreshold { operator, value, .. }, _) => {
                format!("{label} {} {} ({})", operator.symbol(), fmt_price(*value), fmt_price(v))
            }
            (Conditions::Depeg { peg, .. }, _) => format!(
                "{label} depegged: {} ({:.2}% from {} peg)",
                fmt_price(v),
                (v / peg - 1.0).abs() * 100.0,
                fmt_price(*peg)
            ),
            (Conditions::WhaleMovement { .. }, Detail::Whale { amount }) => {
                format!(
                    "Whale transfer: {} {label} ({}) on {chain}",
                    fmt_amount(amount),
                    fmt_usd(v)
                )
            }
            (Conditions::GasPrice { operator, gwei, .. }, _) => {
                format!(
                    "{chain} gas {} gwei {} {}",
                    fmt_price(v),
                    operator.symbol(),
                    fmt_price(*gwei)
                )
            }
            (Conditions::Liquidation { .. }, _) => format!("Liquidation of {} on {label} ({chain})", fmt_usd(v)),
            _ => format!("{} {label}: {v}", rule.conditions.alert_type().name()),
        }
    }

    /// The alert record, with its deterministic id.
    pub fn into_alert(self) -> Alert {
        let message = self.message();
        let rule = &self.rule;
        Alert {
            alert_id: alert_id(&rule.id, &self.info.subject, self.triggered_at, &self.info.identity),
            rule_id: rule.id.clone(),
            user_id: rule.user_id.clone(),
            alert_type: rule.conditions.alert_type().name().to_string(),
            subject: self.info.subject.clone(),
            triggered_at: self.triggered_at,
            value: self.value,
            threshold: rule.conditions.threshold(),
            message,
            channels: rule.channels.clone(),
            webhook_url: rule.webhook_url.clone(),
        }
    }
}

/// What the throttle stage takes: rule matches, and deleted rules to forget.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Throttled {
    /// A rule match.
    Match(Candidate),
    /// A deleted rule whose throttle can no longer matter (its own `seq`).
    Forget {
        /// The forget's sequence number.
        seq: u64,
        /// The rule.
        rule_id: String,
    },
}

impl Throttled {
    /// The order the throttle stage takes them in: by sequence number, then rule.
    pub fn order_key(&self) -> (u64, &str) {
        match self {
            Throttled::Match(c) => c.order_key(),
            Throttled::Forget { seq, rule_id } => (*seq, rule_id),
        }
    }

    /// The rule it is about (the throttle stage is partitioned by rule).
    pub fn rule_id(&self) -> &str {
        match self {
            Throttled::Match(c) => &c.rule.id,
            Throttled::Forget { rule_id, .. } => rule_id,
        }
    }
}

/// Per-rule throttle: after a rule fires at event time t it does not fire again for records
/// with timestamp < t + throttle. Feed matches of one rule in `seq` order.
#[derive(Default, Debug, Serialize, Deserialize)]
pub struct Throttle {
    last_fired: FastMap<String, Millis>,
}

impl Throttle {
    /// The throttle state of every worker of a checkpoint re-split over `workers` workers by
    /// the throttle stage's route ([`crate::envelope::throttle_route`]).
    pub(crate) fn split(all: Vec<Throttle>, workers: usize) -> Vec<Throttle> {
        let mut out: Vec<Throttle> = (0..workers.max(1)).map(|_| Throttle::default()).collect();
        for t in all {
            for (id, at) in t.last_fired {
                let w = crate::envelope::worker_of(crate::envelope::throttle_route(&id), out.len());
                let last = out[w].last_fired.entry(id).or_insert(at);
                *last = (*last).max(at);
            }
        }
        out
    }

    /// Takes one item (in [`Throttled::order_key`] order): a match that fires is returned,
    /// and recorded; a forget drops the rule's last firing.
    pub fn take(&mut self, item: Throttled) -> Option<Candidate> {
        match item {
            Throttled::Match(c) => self.admit(&c).then_some(c),
            Throttled::Forget { rule_id, .. } => {
                self.last_fired.remove(&rule_id);
                None
            }
        }
    }

    /// Whether the match fires; records the firing.
    fn admit(&mut self, c: &Candidate) -> bool {
        if let Some(&last) = self.last_fired.get(&c.rule.id)
            && c.triggered_at < last.saturating_add(c.rule.throttle_ms())
        {
            return false;
        }
        self.last_fired.insert(c.rule.id.clone(), c.triggered_at);
        true
    }

    /// Number of rules with throttle state.
    pub fn len(&self) -> usize {
        self.last_fired.len()
    }

    /// Whether no rule has fired yet.
    pub fn is_empty(&self) -> bool {
        self.last_fired.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_forget_drops_the_rules_last_firing() {
        let rule = Arc::new(
            AlertRule::from_json(&json!({"id":"r","user_id":"u","alert_type":"gas_price",
                "throttle_minutes":1,"conditions":{"chain":"c","operator":">","gwei":1}}))
            .expect("valid rule"),
        );
        let info = Arc::new(RecordInfo {
            subject: "c".into(),
            identity: "i".into(),
            label: "c".into(),
            chain: None,
        });
        let at = |seq, t| {
            Throttled::Match(Candidate {
                seq,
                rule: rule.clone(),
                info: info.clone(),
                triggered_at: t,
                value: 2.0,
                detail: Detail::Plain,
            })
        };
        let mut throttle = Throttle::default();
        assert!(throttle.take(at(1, 1_000)).is_some());
        assert!(throttle.take(at(2, 2_000)).is_none(), "within the minute");
        assert_eq!(throttle.len(), 1);
        let forget = Throttled::Forget {
            seq: 3,
            rule_id: "r".into(),
        };
        assert!(throttle.take(forget).is_none());
        assert!(throttle.is_empty());
        assert!(throttle.take(at(4, 3_000)).is_some(), "a new rule");
    }
}
