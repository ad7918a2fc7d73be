//! wal2json (format version 2) messages and table rows → [`Change`]s.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::config::CdcTable;
use crate::live::Change;
use schemas::Record;

/// A row as a JSON object: column name → value (`jsonb` columns as JSON values).
pub type Row = Map<String, Value>;

/// Parses a `pg_lsn` text form `"X/Y"` (hex halves) into `(X << 32) | Y`.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// Formats an LSN as `pg_lsn` text (`"0/16B3748"`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// What a wal2json message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// `B`: a transaction begins.
    Begin,
    /// `C`: it commits.
    Commit,
    /// `I`.
    Insert,
    /// `U`.
    Update,
    /// `D`.
    Delete,
    /// `T`: TRUNCATE.
    Truncate,
    /// `M`: a logical message (heartbeats).
    Message,
    /// Anything else.
    Other,
}

/// One decoded wal2json message.
#[derive(Debug)]
pub(crate) struct Message {
    pub action: Action,
    /// The table, when it is one the source reads.
    pub table: Option<CdcTable>,
    /// New row (insert, update).
    pub columns: Row,
    /// Old key (update, delete), or the whole old row under REPLICA IDENTITY FULL.
    pub identity: Row,
    /// For `M`: whether the message belongs to a transaction.
    pub transactional: bool,
}

#[derive(Deserialize)]
struct RawMessage {
    action: String,
    #[serde(default)]
    schema: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    columns: Vec<RawColumn>,
    #[serde(default)]
    identity: Vec<RawColumn>,
    #[serde(default)]
    transactional: Option<bool>,
}

#[derive(Deserialize)]
struct RawColumn {
    name: String,
    #[serde(rename = "type", default)]
    ty: Option<String>,
    #[serde(default)]
    value: Value,
}

fn to_row(cols: Vec<RawColumn>) -> Row {
    cols.into_iter()
        .map(|c| {
            let value = match (c.ty.as_deref(), c.value) {
                // json/jsonb arrive as their text; a value that is not JSON stays a string and
                // fails validation with the field's name.
                (Some("json" | "jsonb"), Value::String(s)) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
                (_, v) => v,
            };
            (c.name, value)
        })
        .collect()
}

/// Decodes one wal2json format-version-2 message.
pub(crate) fn parse_message(data: &str) -> Result<Message, String> {
    let raw: RawMessage = serde_json::from_str(data).map_err(|e| format!("bad wal2json message: {e}"))?;
    let action = match raw.action.as_str() {
        "B" => Action::Begin,
        "C" => Action::Commit,
        "I" => Action::Insert,
        "U" => Action::Update,
        "D" => Action::Delete,
        "T" => Action::Truncate,
        "M" => Action::Message,
        _ => Action::Other,
    };
    let schema = raw.schema.unwrap_or_default();
    let name = raw.table.unwrap_or_default();
    let table = if schema == "public" {
        CdcTable::parse(&name)
    } else {
        None
    };
    Ok(Message {
        action,
        table,
        columns: to_row(raw.columns),
        identity: to_row(raw.identity),
        transactional: raw.transactional.unwrap_or(false),
    })
}

/// The primary key of a row (a string, or a number as its text).
pub(crate) fn key_of(table: CdcTable, row: &Row) -> Option<String> {
    match row.get(table.key_column()) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// The change for an inserted or updated (or snapshot) row; `Err` is the dead-letter reason.
pub(crate) fn upsert_change(table: CdcTable, row: &Row) -> Result<Change, String> {
    let value = Value::Object(row.clone());
    match table {
        CdcTable::AlertRules => schemas::parse_rule_value(&value)
            .map(|r| Change::Record(Record::Rule(Box::new(r))))
            .map_err(|e| e.0),
        CdcTable::Protocols => schemas::parse::parse_protocol_value(&value)
            .map(|p| Change::Record(Record::Protocol(Box::new(p))))
            .map_err(|e| e.0),
        CdcTable::ApiKeys => {
            let key = key_of(table, row).ok_or("missing field `key`")?;
            let user_id = match row.get("user_id") {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                _ => return Err("missing field `user_id`".to_string()),
            };
            let revoked = match row.get("revoked") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err("field `revoked` must be a boolean".to_string()),
            };
            Ok(Change::ApiKey {
                key,
                user_id: (!revoked).then_some(user_id),
            })
        }
        CdcTable::Users => Ok(Change::User(schemas::Contact {
            user_id: key_of(table, row).ok_or("missing field `id`")?,
            email: text(row, "email")?,
            telegram_chat_id: match row.get("telegram_chat_id") {
                // A numeric column holds a chat id too.
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => text(row, "telegram_chat_id")?,
            },
            discord_webhook_url: text(row, "discord_webhook_url")?,
        })),
        CdcTable::UserDevices => Ok(Change::Device(schemas::Device {
            id: key_of(table, row).ok_or("missing field `id`")?,
            user_id: text(row, "user_id")?.ok_or("missing field `user_id`")?,
            token: text(row, "device_token")?.ok_or("missing field `device_token`")?,
            platform: text(row, "platform")?.unwrap_or_else(|| "android".to_string()),
        })),
    }
}

/// An optional text column: `None` when null, absent or blank.
fn text(row: &Row, column: &str) -> Result<Option<String>, String> {
    match row.get(column) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(_) => Err(format!("field `{column}` must be text")),
    }
}

/// The change for a deleted row, from its key; `Err` is the dead-letter reason.
pub(crate) fn delete_change(table: CdcTable, identity: &Row) -> Result<Change, String> {
    let key =
        key_of(table, identity).ok_or_else(|| format!("delete without `{}` in its identity", table.key_column()))?;
    Ok(match table {
        CdcTable::AlertRules => Change::DeleteRule(key),
        CdcTable::Protocols => Change::DeleteProtocol(key),
        CdcTable::ApiKeys => Change::ApiKey { key, user_id: None },
        CdcTable::Users => Change::DeleteUser(key),
        CdcTable::UserDevices => Change::DeleteDevice(key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B_3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("FFFFFFFF/FFFFFFFF"), Some(u64::MAX));
        assert_eq!(format_lsn(0x16B_3748), "0/16B3748");
        assert_eq!(format_lsn((5 << 32) | 0xAB), "5/AB");
        for bad in ["", "16B3748", "0/", "x/1", "1/2/3", "100000000/0"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
        for lsn in [0, 1, 0xFFFF_FFFF, 1 << 32, 0x1234_5678_9ABC_DEF0] {
            assert_eq!(parse_lsn(&format_lsn(lsn)), Some(lsn));
        }
    }

    #[test]
    fn insert_update_delete_of_a_rule() {
        let ins = parse_message(
            r#"{"action":"I","lsn":"0/1","schema":"public","table":"alert_rules","columns":[
            {"name":"id","type":"text","value":"r1"},{"name":"user_id","type":"text","value":"u1"},
            {"name":"name","type":"text","value":null},{"name":"alert_type","type":"text","value":"price_threshold"},
            {"name":"conditions","type":"jsonb","value":"{\"coin\": \"coingecko:ethereum\", \"operator\": \">\", \"value\": 4000}"},
            {"name":"channels","type":"jsonb","value":"[\"websocket\", \"webhook\"]"},
            {"name":"enabled","type":"boolean","value":true},{"name":"throttle_minutes","type":"double precision","value":2.5}]}"#,
        )
        .unwrap();
        assert_eq!(ins.action, Action::Insert);
        assert_eq!(ins.table, Some(CdcTable::AlertRules));
        let Change::Record(Record::Rule(rule)) = upsert_change(CdcTable::AlertRules, &ins.columns).unwrap() else {
            panic!("not a rule")
        };
        assert_eq!(rule.id, "r1");
        assert_eq!(rule.channels, vec!["websocket", "webhook"]);
        assert_eq!(rule.throttle_minutes, 2.5);
        assert!(rule.enabled);

        let del = parse_message(
            r#"{"action":"D","schema":"public","table":"alert_rules","identity":[{"name":"id","type":"text","value":"r1"}]}"#,
        )
        .unwrap();
        assert_eq!(del.action, Action::Delete);
        assert_eq!(
            delete_change(CdcTable::AlertRules, &del.identity),
            Ok(Change::DeleteRule("r1".into()))
        );
        assert!(delete_change(CdcTable::AlertRules, &Row::new()).is_err());
    }

    #[test]
    fn api_keys_and_protocols() {
        let row = |revoked: bool| -> Row {
            serde_json::from_value(serde_json::json!({"key": "k1", "user_id": "u1", "revoked": revoked})).unwrap()
        };
        assert_eq!(
            upsert_change(CdcTable::ApiKeys, &row(false)),
            Ok(Change::ApiKey {
                key: "k1".into(),
                user_id: Some("u1".into())
            })
        );
        assert_eq!(
            upsert_change(CdcTable::ApiKeys, &row(true)),
            Ok(Change::ApiKey {
                key: "k1".into(),
                user_id: None
            })
        );
        let p: Row =
            serde_json::from_value(serde_json::json!({"id": "2269", "name": "Aave V3", "chains": ["ethereum"]}))
                .unwrap();
        let Ok(Change::Record(Record::Protocol(p))) = upsert_change(CdcTable::Protocols, &p) else {
            panic!("not a protocol")
        };
        assert_eq!((p.id.as_str(), p.chains.len()), ("2269", 1));
        let bad: Row = serde_json::from_value(serde_json::json!({"id": "1"})).unwrap();
        assert_eq!(
            upsert_change(CdcTable::Protocols, &bad),
            Err("missing field `name`".to_string())
        );
    }

    #[test]
    fn users_and_devices() {
        let row = |v: serde_json::Value| -> Row { serde_json::from_value(v).unwrap() };
        assert_eq!(
            upsert_change(
                CdcTable::Users,
                &row(
                    serde_json::json!({"id": "u1", "email": " a@example.com ", "telegram_chat_id": "",
                    "discord_webhook_url": null, "created_at": "2026-12-06"})
                )
            ),
            Ok(Change::User(schemas::Contact {
                user_id: "u1".into(),
                email: Some("a@example.com".into()),
                telegram_chat_id: None,
                discord_webhook_url: None,
            }))
        );
        let Ok(Change::User(c)) = upsert_change(
            CdcTable::Users,
            &row(serde_json::json!({"id": 7, "telegram_chat_id": -1001})),
        ) else {
            panic!("not a user")
        };
        assert_eq!(
            (c.user_id.as_str(), c.telegram_chat_id.as_deref()),
            ("7", Some("-1001"))
        );
        assert_eq!(
            upsert_change(CdcTable::Users, &row(serde_json::json!({"id": "u1", "email": 5}))),
            Err("field `email` must be text".to_string())
        );
        assert_eq!(
            upsert_change(
                CdcTable::UserDevices,
                &row(serde_json::json!({"id": "d1", "user_id": "u1", "device_token": "tok", "platform": "ios"}))
            ),
            Ok(Change::Device(schemas::Device {
                id: "d1".into(),
                user_id: "u1".into(),
                token: "tok".into(),
                platform: "ios".into(),
            }))
        );
        assert_eq!(
            upsert_change(
                CdcTable::UserDevices,
                &row(serde_json::json!({"id": "d1", "user_id": "u1"}))
            ),
            Err("missing field `device_token`".to_string())
        );
        let key = row(serde_json::json!({"id": "d1"}));
        assert_eq!(
            delete_change(CdcTable::UserDevices, &key),
            Ok(Change::DeleteDevice("d1".into()))
        );
        assert_eq!(
            delete_change(CdcTable::Users, &key),
            Ok(Change::DeleteUser("d1".into()))
        );
    }

    #[test]
    fn other_schemas_and_messages() {
        let m = parse_message(r#"{"action":"I","schema":"audit","table":"alert_rules","columns":[]}"#).unwrap();
        assert_eq!(m.table, None);
        let m = parse_message(r#"{"action":"M","lsn":"0/5","transactional":false,"prefix":"p","content":""}"#).unwrap();
        assert_eq!((m.action, m.transactional), (Action::Message, false));
        assert!(parse_message("{").is_err());
    }
}

/// Fuzzing wal2json messages (outside bytes from the replication slot): no panic; a message
/// either decodes, and its row then gives a change or a dead-letter reason, or is refused
/// with a reason. Cases: `LLAMAFLOW_FUZZ_CASES` (see testkit::fuzz).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;
    use testkit::fuzz::{Count, config, text};

    use super::*;

    const MESSAGES: &[&str] = &[
        r#"{"action":"B"}"#,
        r#"{"action":"C"}"#,
        r#"{"action":"I","schema":"public","table":"alert_rules","columns":[{"name":"id","type":"text","value":"r1"},{"name":"user_id","type":"text","value":"u1"},{"name":"alert_type","type":"text","value":"price_threshold"},{"name":"conditions","type":"jsonb","value":"{\"coin\":\"coingecko:ethereum\",\"operator\":\">\",\"value\":3000}"},{"name":"channels","type":"jsonb","value":"[\"websocket\"]"},{"name":"enabled","type":"boolean","value":true},{"name":"throttle_minutes","type":"integer","value":5}]}"#,
        r#"{"action":"U","schema":"public","table":"protocols","columns":[{"name":"id","type":"text","value":"2269"},{"name":"name","type":"text","value":"Aave V3"},{"name":"category","type":"text","value":"Lending"},{"name":"chains","type":"jsonb","value":"[\"Ethereum\"]"}],"identity":[{"name":"id","type":"text","value":"2269"}]}"#,
        r#"{"action":"D","schema":"public","table":"api_keys","identity":[{"name":"key","type":"text","value":"k1"}]}"#,
        r#"{"action":"I","schema":"public","table":"api_keys","columns":[{"name":"key","type":"text","value":"k1"},{"name":"user_id","type":"text","value":"u1"},{"name":"revoked","type":"boolean","value":false}]}"#,
        r#"{"action":"M","transactional":false,"prefix":"p","content":"x"}"#,
    ];

    static CASES: Count = Count::new("wal2json messages");

    proptest! {
        #![proptest_config(config(3_000))]

        #[test]
        fn fuzz_wal2json_messages(data in text(MESSAGES)) {
            CASES.add();
            match parse_message(&data) {
                Ok(m) => {
                    if let Some(table) = m.table {
                        let change = match m.action {
                            Action::Delete => delete_change(table, &m.identity),
                            _ => upsert_change(table, &m.columns),
                        };
                        if let Err(reason) = change {
                            prop_assert!(!reason.is_empty(), "{:?}", data);
                        }
                    }
                }
                Err(reason) => prop_assert!(reason.starts_with("bad wal2json message"), "{:?}", data),
            }
        }
    }

    /// Prints the count (after the fuzz test with `--test-threads 1`).
    #[test]
    fn zz_report_fuzz_count() {
        CASES.report();
    }
}
