//! llamaflow's domain types and their wire formats (SPEC §1–§3).
//!
//! Everything that crosses a crate boundary lives here: the input records with their
//! validation, alert rules, the alert / market-event / dead-letter output shapes, the
//! deterministic `alert_id`, and the decoding of DynamoDB-JSON items from DeFiLlama's
//! `prod-table` and `prod-coins-table`.

pub mod chains;
pub mod dynamo;
pub mod env;
pub mod migrations;
pub mod output;
pub mod parse;
pub mod recipients;
pub mod records;
pub mod rule;
pub mod time;

pub use output::{Alert, DeadLetter, Event, EventData, SourceName, SourcePos, alert_id, truncate_raw};
pub use parse::{InvalidRecord, parse_record, parse_rule, parse_rule_value};
pub use recipients::{Contact, Device};
pub use records::{GasTick, Kind, Liquidation, PriceTick, Protocol, Record, Transfer, TvlUpdate};
pub use rule::{AlertRule, AlertType, Conditions, Direction, Operator, RuleError};
pub use time::{Millis, format_seconds, parse_time_ms, parse_window, utc_date};
