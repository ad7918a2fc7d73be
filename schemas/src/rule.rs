//! Alert rules (SPEC §2): typed conditions parsed and validated from the JSON row.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::time::{Millis, parse_window, window_label};

/// Why a rule is invalid; names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct RuleError(pub String);

/// Move direction for *_change rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// pct ≥ X.
    Up,
    /// pct ≤ −X.
    Down,
    /// |pct| ≥ X.
    Any,
}

impl Direction {
    /// Whether a change of `pct` percent meets `threshold` in this direction.
    pub fn matches(self, pct: f64, threshold: f64) -> bool {
        match self {
            Direction::Up => pct >= threshold,
            Direction::Down => pct <= -threshold,
            Direction::Any => pct.abs() >= threshold,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::Any => "any",
        }
    }
}

/// Comparison operator for threshold rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `<`
    Lt,
    /// `<=`
    Le,
}

impl Operator {
    /// Evaluates `x <op> value`.
    pub fn holds(self, x: f64, value: f64) -> bool {
        match self {
            Operator::Gt => x > value,
            Operator::Ge => x >= value,
            Operator::Lt => x < value,
            Operator::Le => x <= value,
        }
    }
    /// The operator as written in rules.
    pub fn symbol(self) -> &'static str {
        match self {
            Operator::Gt => ">",
            Operator::Ge => ">=",
            Operator::Lt => "<",
            Operator::Le => "<=",
        }
    }
}

/// The seven alert types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AlertType {
    /// Price moved by a percentage within a window.
    PriceChange,
    /// Price crossed a threshold.
    PriceThreshold,
    /// Stablecoin left its peg band.
    Depeg,
    /// TVL moved by a percentage within a window.
    TvlChange,
    /// Large transfer by USD value.
    WhaleMovement,
    /// Gas crossed a threshold.
    GasPrice,
    /// Large liquidation.
    Liquidation,
}

impl AlertType {
    /// Wire name (`price_change`, …).
    pub fn name(self) -> &'static str {
        match self {
            AlertType::PriceChange => "price_change",
            AlertType::PriceThreshold => "price_threshold",
            AlertType::Depeg => "depeg",
            AlertType::TvlChange => "tvl_change",
            AlertType::WhaleMovement => "whale_movement",
            AlertType::GasPrice => "gas_price",
            AlertType::Liquidation => "liquidation",
        }
    }
    /// Parses a wire name.
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "price_change" => AlertType::PriceChange,
            "price_threshold" => AlertType::PriceThreshold,
            "depeg" => AlertType::Depeg,
            "tvl_change" => AlertType::TvlChange,
            "whale_movement" => AlertType::WhaleMovement,
            "gas_price" => AlertType::GasPrice,
            "liquidation" => AlertType::Liquidation,
            _ => return None,
        })
    }
}

/// Typed rule conditions, one variant per alert type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Conditions {
    /// `price_change`.
    PriceChange {
        /// Coin id.
        coin: String,
        /// Window in ms.
        window: Millis,
        /// Percent threshold (> 0).
        threshold_pct: f64,
        /// Direction.
        direction: Direction,
    },
    /// `price_threshold`.
    PriceThreshold {
        /// Coin id.
        coin: String,
        /// Operator.
        operator: Operator,
        /// Price level.
        value: f64,
    },
    /// `depeg`.
    Depeg {
        /// Coin id.
        coin: String,
        /// Peg (default 1.0).
        peg: f64,
        /// Band half-width in percent.
        deviation_pct: f64,
    },
    /// `tvl_change`.
    TvlChange {
        /// Protocol id.
        protocol_id: String,
        /// One chain, or the protocol total when absent.
        chain: Option<String>,
        /// Window in ms.
        window: Millis,
        /// Percent threshold.
        threshold_pct: f64,
        /// Direction.
        direction: Direction,
    },
    /// `whale_movement`.
    WhaleMovement {
        /// Coin filter.
        coin: Option<String>,
        /// Chain filter.
        chain: Option<String>,
        /// Minimum USD value.
        min_usd: f64,
    },
    /// `gas_price`.
    GasPrice {
        /// Chain.
        chain: String,
        /// Operator.
        operator: Operator,
        /// Gwei level.
        gwei: f64,
    },
    /// `liquidation`.
    Liquidation {
        /// Protocol filter.
        protocol_id: Option<String>,
        /// Chain filter.
        chain: Option<String>,
        /// Minimum USD amount.
        min_usd: f64,
    },
}

impl Conditions {
    /// The alert type of these conditions.
    pub fn alert_type(&self) -> AlertType {
        match self {
            Conditions::PriceChange { .. } => AlertType::PriceChange,
            Conditions::PriceThreshold { .. } => AlertType::PriceThreshold,
            Conditions::Depeg { .. } => AlertType::Depeg,
            Conditions::TvlChange { .. } => AlertType::TvlChange,
            Conditions::WhaleMovement { .. } => AlertType::WhaleMovement,
            Conditions::GasPrice { .. } => AlertType::GasPrice,
            Conditions::Liquidation { .. } => AlertType::Liquidation,
        }
    }

    /// The threshold reported in alerts (`threshold` field).
    pub fn threshold(&self) -> f64 {
        match self {
            Conditions::PriceChange { threshold_pct, .. } | Conditions::TvlChange { threshold_pct, .. } => {
                *threshold_pct
            }
            Conditions::PriceThreshold { value, .. } => *value,
            Conditions::Depeg { deviation_pct, .. } => *deviation_pct,
            Conditions::WhaleMovement { min_usd, .. } | Conditions::Liquidation { min_usd, .. } => *min_usd,
            Conditions::GasPrice { gwei, .. } => *gwei,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Conditions::PriceChange {
                coin,
                window,
                threshold_pct,
                direction,
            } => json!({
                "coin": coin, "window": window / 1000, "threshold_pct": threshold_pct,
                "direction": direction.name()}),
            Conditions::PriceThreshold { coin, operator, value } => {
                json!({"coin": coin, "operator": operator.symbol(), "value": value})
            }
            Conditions::Depeg {
                coin,
                peg,
                deviation_pct,
            } => {
                json!({"coin": coin, "peg": peg, "deviation_pct": deviation_pct})
            }
            Conditions::TvlChange {
                protocol_id,
                chain,
                window,
                threshold_pct,
                direction,
            } => json!({
                "protocol_id": protocol_id, "chain": chain, "window": window / 1000,
                "threshold_pct": threshold_pct, "direction": direction.name()}),
            Conditions::WhaleMovement { coin, chain, min_usd } => {
                json!({"coin": coin, "chain": chain, "min_usd": min_usd})
            }
            Conditions::GasPrice { chain, operator, gwei } => {
                json!({"chain": chain, "operator": operator.symbol(), "gwei": gwei})
            }
            Conditions::Liquidation {
                protocol_id,
                chain,
                min_usd,
            } => {
                json!({"protocol_id": protocol_id, "chain": chain, "min_usd": min_usd})
            }
        }
    }
}

/// A validated alert rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AlertRule {
    /// Rule id.
    pub id: String,
    /// Owner.
    pub user_id: String,
    /// Display name.
    pub name: Option<String>,
    /// Typed conditions.
    pub conditions: Conditions,
    /// Delivery channels (default `["websocket"]`).
    pub channels: Vec<String>,
    /// Webhook target for the `webhook` channel.
    pub webhook_url: Option<String>,
    /// Disabled rules never fire.
    pub enabled: bool,
    /// Minimum spacing between firings, in minutes (default 5).
    pub throttle_minutes: f64,
}

impl AlertRule {
    /// Throttle as milliseconds.
    pub fn throttle_ms(&self) -> Millis {
        (self.throttle_minutes * 60_000.0).round() as Millis
    }

    /// The rule as a SPEC §2 JSON row.
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "user_id": self.user_id, "name": self.name,
            "alert_type": self.conditions.alert_type().name(), "conditions": self.conditions.to_json(),
            "channels": self.channels, "webhook_url": self.webhook_url, "enabled": self.enabled,
            "throttle_minutes": self.throttle_minutes})
    }

    /// Validates a rule from its JSON row.
    pub fn from_json(v: &Value) -> Result<AlertRule, RuleError> {
        let obj = v
            .as_object()
            .ok_or_else(|| RuleError("rule is not a JSON object".into()))?;
        let id = req_id(obj.get("id"), "id")?;
        let user_id = req_id(obj.get("user_id"), "user_id")?;
        let name = opt_str(obj.get("name"), "name")?;
        let type_name = obj
            .get("alert_type")
            .and_then(Value::as_str)
            .ok_or_else(|| RuleError("missing or non-string field `alert_type`".into()))?;
        let alert_type =
            AlertType::from_name(type_name).ok_or_else(|| RuleError(format!("unknown alert_type `{type_name}`")))?;
        let cond = match obj.get("conditions") {
            Some(Value::Object(c)) => c,
            // Postgres rows may carry conditions as a JSON string.
            Some(Value::String(s)) => {
                return AlertRule::from_json(&{
                    let mut o = obj.clone();
                    let parsed: Value =
                        serde_json::from_str(s).map_err(|e| RuleError(format!("`conditions` is not JSON: {e}")))?;
                    if !parsed.is_object() {
                        return Err(RuleError("`conditions` must be an object".into()));
                    }
                    o.insert("conditions".into(), parsed);
                    Value::Object(o)
                });
            }
            _ => return Err(RuleError("missing or non-object field `conditions`".into())),
        };
        let conditions = parse_conditions(alert_type, cond)?;
        let channels = match obj.get("channels") {
            None | Some(Value::Null) => vec!["websocket".to_string()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|c| c.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| RuleError("`channels` must be an array of strings".into()))?,
            Some(_) => return Err(RuleError("`channels` must be an array of strings".into())),
        };
        let webhook_url = opt_str(obj.get("webhook_url"), "webhook_url")?;
        let enabled = match obj.get("enabled") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(RuleError("`enabled` must be a boolean".into())),
        };
        let throttle_minutes = match obj.get("throttle_minutes") {
            None | Some(Value::Null) => 5.0,
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x >= 0.0 => x,
                _ => {
                    return Err(RuleError("`throttle_minutes` must be a number ≥ 0".into()));
                }
            },
        };
        Ok(AlertRule {
            id,
            user_id,
            name,
            conditions,
            channels,
            webhook_url,
            enabled,
            throttle_minutes,
        })
    }

    /// A short human label for the rule's subject (used in messages).
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.id.clone())
    }

    /// Window label of *_change rules, for messages.
    pub fn window_label(&self) -> Option<String> {
        match &self.conditions {
            Conditions::PriceChange { window, .. } | Conditions::TvlChange { window, .. } => {
                Some(window_label(*window))
            }
            _ => None,
        }
    }
}

type Obj = serde_json::Map<String, Value>;

fn req_id(v: Option<&Value>, field: &str) -> Result<String, RuleError> {
    match v {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err(RuleError(format!("missing or empty field `{field}`"))),
    }
}

fn opt_str(v: Option<&Value>, field: &str) -> Result<Option<String>, RuleError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(RuleError(format!("`{field}` must be a string"))),
    }
}

fn cond_str(c: &Obj, field: &str) -> Result<String, RuleError> {
    match c.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) if field == "protocol_id" => Ok(n.to_string()),
        _ => Err(RuleError(format!(
            "conditions.{field}: missing or not a non-empty string"
        ))),
    }
}

fn cond_opt_str(c: &Obj, field: &str) -> Result<Option<String>, RuleError> {
    match c.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => cond_str(c, field).map(Some),
    }
}

fn cond_num(c: &Obj, field: &str, min_exclusive: Option<f64>) -> Result<f64, RuleError> {
    let x = c
        .get(field)
        .and_then(Value::as_f64)
        .filter(|x| x.is_finite())
        .ok_or_else(|| RuleError(format!("conditions.{field}: missing or not a finite number")))?;
    if let Some(min) = min_exclusive
        && x <= min
    {
        return Err(RuleError(format!("conditions.{field}: must be > {min}, got {x}")));
    }
    Ok(x)
}

fn cond_coin(c: &Obj) -> Result<String, RuleError> {
    let raw = cond_str(c, "coin")?;
    crate::parse::normalize_coin(&raw).ok_or_else(|| RuleError(format!("conditions.coin: unknown coin form `{raw}`")))
}

fn cond_opt_coin(c: &Obj) -> Result<Option<String>, RuleError> {
    match c.get("coin") {
        None | Some(Value::Null) => Ok(None),
        Some(_) => cond_coin(c).map(Some),
    }
}

fn cond_window(c: &Obj) -> Result<Millis, RuleError> {
    c.get("window").and_then(parse_window).ok_or_else(|| {
        RuleError("conditions.window: expected one of 5m,15m,1h,4h,24h,7d or a positive integer of seconds".into())
    })
}

fn cond_direction(c: &Obj) -> Result<Direction, RuleError> {
    match c.get("direction").and_then(Value::as_str) {
        Some("up") => Ok(Direction::Up),
        Some("down") => Ok(Direction::Down),
        Some("any") | None => Ok(Direction::Any),
        Some(other) => Err(RuleError(format!(
            "conditions.direction: expected up, down or any, got `{other}`"
        ))),
    }
}

fn cond_operator(c: &Obj) -> Result<Operator, RuleError> {
    match c.get("operator").and_then(Value::as_str) {
        Some(">") => Ok(Operator::Gt),
        Some(">=") => Ok(Operator::Ge),
        Some("<") => Ok(Operator::Lt),
        Some("<=") => Ok(Operator::Le),
        _ => Err(RuleError("conditions.operator: expected one of >, >=, <, <=".into())),
    }
}

fn parse_conditions(t: AlertType, c: &Obj) -> Result<Conditions, RuleError> {
    Ok(match t {
        AlertType::PriceChange => Conditions::PriceChange {
            coin: cond_coin(c)?,
            window: cond_window(c)?,
            threshold_pct: cond_num(c, "threshold_pct", Some(0.0))?,
            direction: cond_direction(c)?,
        },
        AlertType::PriceThreshold => Conditions::PriceThreshold {
            coin: cond_coin(c)?,
            operator: cond_operator(c)?,
            value: cond_num(c, "value", None)?,
        },
        AlertType::Depeg => Conditions::Depeg {
            coin: cond_coin(c)?,
            peg: match c.get("peg") {
                None | Some(Value::Null) => 1.0,
                Some(_) => cond_num(c, "peg", Some(0.0))?,
            },
            deviation_pct: cond_num(c, "deviation_pct", Some(0.0))?,
        },
        AlertType::TvlChange => Conditions::TvlChange {
            protocol_id: cond_str(c, "protocol_id")?,
            chain: cond_opt_str(c, "chain")?,
            window: cond_window(c)?,
            threshold_pct: cond_num(c, "threshold_pct", Some(0.0))?,
            direction: cond_direction(c)?,
        },
        AlertType::WhaleMovement => Conditions::WhaleMovement {
            coin: cond_opt_coin(c)?,
            chain: cond_opt_str(c, "chain")?,
            min_usd: cond_num(c, "min_usd", None)?,
        },
        AlertType::GasPrice => Conditions::GasPrice {
            chain: cond_str(c, "chain")?,
            operator: cond_operator(c)?,
            gwei: cond_num(c, "gwei", None)?,
        },
        AlertType::Liquidation => Conditions::Liquidation {
            protocol_id: cond_opt_str(c, "protocol_id")?,
            chain: cond_opt_str(c, "chain")?,
            min_usd: cond_num(c, "min_usd", None)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_defaults_and_types() {
        let r = AlertRule::from_json(&json!({"id":"r1","user_id":"u1","alert_type":"price_change",
            "conditions":{"coin":"coingecko:ethereum","window":"1h","threshold_pct":5,"direction":"down"}}))
        .unwrap();
        assert_eq!(r.channels, vec!["websocket"]);
        assert!(r.enabled);
        assert_eq!(r.throttle_ms(), 300_000);
        assert_eq!(
            r.conditions,
            Conditions::PriceChange {
                coin: "coingecko:ethereum".into(),
                window: 3_600_000,
                threshold_pct: 5.0,
                direction: Direction::Down
            }
        );
        let back = AlertRule::from_json(&r.to_json()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn names_the_bad_field() {
        let e = AlertRule::from_json(&json!({"id":"r1","user_id":"u1","alert_type":"price_change",
            "conditions":{"coin":"coingecko:ethereum","window":"2w","threshold_pct":5}}))
        .unwrap_err();
        assert!(e.0.contains("conditions.window"), "{e}");
        let e = AlertRule::from_json(&json!({"id":"r1","user_id":"u1","alert_type":"moon",
            "conditions":{}}))
        .unwrap_err();
        assert!(e.0.contains("unknown alert_type `moon`"), "{e}");
        let e = AlertRule::from_json(&json!({"id":"r1","user_id":"u1","alert_type":"gas_price",
            "conditions":{"chain":"ethereum","operator":"=>","gwei":3}}))
        .unwrap_err();
        assert!(e.0.contains("conditions.operator"), "{e}");
        let e = AlertRule::from_json(&json!({"user_id":"u1","alert_type":"gas_price","conditions":{}})).unwrap_err();
        assert!(e.0.contains("`id`"), "{e}");
    }

    #[test]
    fn conditions_as_string() {
        let r = AlertRule::from_json(&json!({"id":"r2","user_id":"u1","alert_type":"gas_price",
            "conditions":"{\"chain\":\"ethereum\",\"operator\":\">\",\"gwei\":50}"}))
        .unwrap();
        assert_eq!(r.conditions.threshold(), 50.0);
    }
}
