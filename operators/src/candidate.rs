//! Rule matches on their way to becoming alerts, and the per-rule throttle.

use std::collections::HashMap;

use schemas::{Alert, AlertRule, Millis, alert_id};
use serde::{Deserialize, Serialize};

/// A rule match before throttling: everything the alert needs, plus ordering data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// `seq` of the triggering record (orders matches of one rule).
    pub seq: u64,
    /// Rule id.
    pub rule_id: String,
    /// Rule owner.
    pub user_id: String,
    /// Alert type name.
    pub alert_type: String,
    /// Coin, protocol or chain.
    pub subject: String,
    /// Event time of the triggering record.
    pub triggered_at: Millis,
    /// Alert value.
    pub value: f64,
    /// Rule threshold.
    pub threshold: f64,
    /// Human message.
    pub message: String,
    /// Delivery channels.
    pub channels: Vec<String>,
    /// Webhook target.
    pub webhook_url: Option<String>,
    /// The rule's throttle.
    pub throttle_ms: Millis,
    /// Identity of the triggering record (input of `alert_id`).
    pub identity: String,
}

impl Candidate {
    /// A match of `rule` on a record.
    pub fn new(
        seq: u64,
        rule: &AlertRule,
        subject: String,
        triggered_at: Millis,
        value: f64,
        message: String,
        identity: String,
    ) -> Self {
        Candidate {
            seq,
            rule_id: rule.id.clone(),
            user_id: rule.user_id.clone(),
            alert_type: rule.conditions.alert_type().name().to_string(),
            subject,
            triggered_at,
            value,
            threshold: rule.conditions.threshold(),
            message,
            channels: rule.channels.clone(),
            webhook_url: rule.webhook_url.clone(),
            throttle_ms: rule.throttle_ms(),
            identity,
        }
    }

    /// Order of matches: by triggering record, then rule.
    pub fn order_key(&self) -> (u64, &str) {
        (self.seq, &self.rule_id)
    }

    /// The alert record, with its deterministic id.
    pub fn into_alert(self) -> Alert {
        Alert {
            alert_id: alert_id(&self.rule_id, &self.subject, self.triggered_at, &self.identity),
            rule_id: self.rule_id,
            user_id: self.user_id,
            alert_type: self.alert_type,
            subject: self.subject,
            triggered_at: self.triggered_at,
            value: self.value,
            threshold: self.threshold,
            message: self.message,
            channels: self.channels,
            webhook_url: self.webhook_url,
        }
    }
}

/// Per-rule throttle: after a rule fires at event time t it does not fire again for records
/// with timestamp < t + throttle. Feed matches of one rule in `seq` order.
#[derive(Default, Debug)]
pub struct Throttle {
    last_fired: HashMap<String, Millis>,
}

impl Throttle {
    /// Whether the match fires; records the firing.
    pub fn admit(&mut self, c: &Candidate) -> bool {
        if let Some(&last) = self.last_fired.get(&c.rule_id) {
            if c.triggered_at < last.saturating_add(c.throttle_ms) {
                return false;
            }
        }
        self.last_fired.insert(c.rule_id.clone(), c.triggered_at);
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
