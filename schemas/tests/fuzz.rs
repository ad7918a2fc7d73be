//! Fuzzing the decoders of outside bytes in this crate: JSON records of every kind (SPEC §1),
//! alert rules, and DynamoDB JSON items. None may panic; every rejection is an error with a
//! reason (what the readers turn into a dead letter); every accepted record is valid and
//! reads back from its own JSON form. Cases: `LLAMAFLOW_FUZZ_CASES` (see testkit::fuzz).

use proptest::prelude::*;
use schemas::dynamo::decode_item;
use schemas::{Kind, Record, parse_record, parse_rule};
use testkit::fuzz::{Count, config, text};

const RECORDS: &[&str] = &[
    r#"{"coin":"coingecko:ethereum","price":3500.12,"timestamp":1717430400,"symbol":"ETH","confidence":0.99,"decimals":18}"#,
    r#"{"coin":"ethereum:0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48","price":1.0001,"timestamp":1717430400123}"#,
    r#"{"protocol_id":"2269","chain":"ethereum","tvl":11873349211.52,"timestamp":1717430400}"#,
    r#"{"chain":"ethereum","tx_hash":"0xabc","coin":"coingecko:ethereum","from":"0x1","to":"0x2","amount":12.5,"timestamp":1717430400}"#,
    r#"{"chain":"ethereum","gwei":21.5,"timestamp":1717430400}"#,
    r#"{"protocol_id":"2269","chain":"arbitrum","account":"0x9","amount_usd":150000,"timestamp":1717430400}"#,
    r#"{"id":"2269","name":"Aave V3","symbol":"AAVE","slug":"aave-v3","category":"Lending","chains":["Ethereum","Arbitrum"]}"#,
];

const RULES: &[&str] = &[
    r#"{"id":"r1","user_id":"u1","alert_type":"price_change","conditions":{"coin":"coingecko:ethereum","window":"1h","threshold_pct":5,"direction":"any"},"channels":["websocket","webhook"],"webhook_url":null,"enabled":true,"throttle_minutes":5}"#,
    r#"{"id":"r2","user_id":"u1","alert_type":"price_threshold","conditions":{"coin":"coingecko:bitcoin","operator":">=","value":70000}}"#,
    r#"{"id":"r3","user_id":"u2","alert_type":"tvl_change","conditions":{"protocol_id":"2269","chain":"ethereum","window":86400,"threshold_pct":10,"direction":"down"}}"#,
    r#"{"id":"r4","user_id":"u2","alert_type":"depeg","conditions":{"coin":"coingecko:usd-coin","peg":1.0,"deviation_pct":0.5}}"#,
    r#"{"id":"r5","user_id":"u3","alert_type":"whale_movement","conditions":{"coin":"coingecko:ethereum","chain":"ethereum","min_usd":1000000}}"#,
    r#"{"id":"r6","user_id":"u3","alert_type":"gas_price","conditions":{"chain":"ethereum","operator":">","gwei":50},"throttle_minutes":0.5}"#,
    r#"{"id":"r7","user_id":"u3","alert_type":"liquidation","conditions":{"protocol_id":"2269","min_usd":100000}}"#,
];

const ITEMS: &[&str] = &[
    r#"{"PK":{"S":"hourlyTvl#2269"},"SK":{"N":"1717430400"},"tvl":{"N":"1000"},"ethereum":{"N":"600"},"arbitrum":{"N":"400"},"ethereum-staking":{"N":"5"},"tvlPrev1Hour":{"N":"990"}}"#,
    r#"{"PK":{"S":"coingecko#ethereum"},"SK":{"N":"0"},"price":{"N":"3500.5"},"symbol":{"S":"ETH"},"confidence":{"N":"0.99"},"timestamp":{"N":"1717430400"}}"#,
    r#"{"PK":{"S":"asset#ethereum:0xa0b8"},"SK":{"N":"1717430400"},"redirect":{"S":"coingecko#usd-coin"},"decimals":{"N":"6"}}"#,
    r#"{"PK":{"S":"dailyTvl#1"},"SK":{"N":"1717372800"},"tvl":{"N":"5"},"Ethereum":{"N":"5"},"borrowed":{"NULL":true}}"#,
];

const KINDS: [Kind; 7] = [
    Kind::Price,
    Kind::Tvl,
    Kind::Transfer,
    Kind::Gas,
    Kind::Liquidation,
    Kind::Protocol,
    Kind::Rule,
];

static RECORD_CASES: Count = Count::new("JSON records");
static RULE_CASES: Count = Count::new("alert rules");
static ITEM_CASES: Count = Count::new("DynamoDB items");

proptest! {
    #![proptest_config(config(3_000))]

    #[test]
    fn fuzz_json_records(line in text(RECORDS), kind in 0..KINDS.len()) {
        RECORD_CASES.add();
        match parse_record(KINDS[kind], &line) {
            Ok(rec) => {
                prop_assert_eq!(rec.kind(), KINDS[kind]);
                // An accepted record reads back from its own JSON form as the same record.
                if !matches!(rec, Record::Rule(_)) {
                    let again = parse_record(rec.kind(), &rec.to_json());
                    prop_assert_eq!(again.as_ref().ok(), Some(&rec), "{} → {}", line, rec.to_json());
                }
            }
            Err(e) => prop_assert!(!e.0.is_empty(), "a rejection says why: {:?}", line),
        }
    }

    #[test]
    fn fuzz_alert_rules(line in text(RULES)) {
        RULE_CASES.add();
        match parse_rule(&line) {
            Ok(rule) => prop_assert!(!rule.id.is_empty() && !rule.user_id.is_empty(), "{:?}", line),
            Err(e) => prop_assert!(!e.0.is_empty(), "a rejection says why: {:?}", line),
        }
    }

    #[test]
    fn fuzz_dynamodb_items(line in text(ITEMS)) {
        ITEM_CASES.add();
        // The reader's path: JSON first, then the item (non-objects are its own dead letter).
        if let Ok(serde_json::Value::Object(item)) = serde_json::from_str::<serde_json::Value>(&line)
            && let Err(e) = decode_item(&item)
        {
            prop_assert!(!e.0.is_empty(), "a rejection says why: {:?}", line);
        }
    }
}

/// With `--test-threads 1` (the documented command) this runs after the fuzz tests and
/// prints how many cases each decoder took.
#[test]
fn zz_report_fuzz_counts() {
    for c in [&RECORD_CASES, &RULE_CASES, &ITEM_CASES] {
        c.report();
    }
}
