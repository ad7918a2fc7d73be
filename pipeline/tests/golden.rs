//! `alert_id` is a contract (SPEC §2: the sinks' idempotency key, the same in every run,
//! restart and replay): the ids a replay produces must equal the golden ids computed
//! independently by `tests/golden/alert_ids.py` (Python's hashlib over the fields as
//! docs/ARCHITECTURE.md defines them), checked in as `tests/golden/alert_ids.json`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

const T0: i64 = 1_717_430_400;

fn write(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn alert_ids_equal_the_independently_computed_golden_ids() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let eth = "coingecko:ethereum";
    let rule = |id: &str, t: &str, c: Value| json!({"id": id, "user_id": "u1", "alert_type": t, "conditions": c, "throttle_minutes": 0});
    write(
        &d.join("rules.jsonl"),
        &[
            rule(
                "r-thr",
                "price_threshold",
                json!({"coin": eth, "operator": ">", "value": 3000}),
            ),
            rule(
                "r-chg",
                "price_change",
                json!({"coin": eth, "window": "1h", "threshold_pct": 1, "direction": "any"}),
            ),
            rule(
                "r-tvl",
                "tvl_change",
                json!({"protocol_id": "2269", "window": "1h", "threshold_pct": 5, "direction": "any"}),
            ),
            rule(
                "r-tvlc",
                "tvl_change",
                json!({"protocol_id": "2269", "chain": "ethereum", "window": "1h", "threshold_pct": 5, "direction": "any"}),
            ),
            rule(
                "r-gas",
                "gas_price",
                json!({"chain": "ethereum", "operator": ">", "gwei": 50}),
            ),
            rule("r-whale", "whale_movement", json!({"min_usd": 1_000_000})),
            rule("r-liq", "liquidation", json!({"min_usd": 1_000_000})),
        ],
    );
    write(
        &d.join("prices.jsonl"),
        &[
            json!({"coin": eth, "price": 2900.0, "timestamp": T0}),
            json!({"coin": eth, "price": 3100.0, "timestamp": T0 + 3600}),
        ],
    );
    write(
        &d.join("tvl.jsonl"),
        &[
            json!({"protocol_id": "2269", "chain": "ethereum", "tvl": 100.0e6, "timestamp": T0}),
            json!({"protocol_id": "2269", "chain": "ethereum", "tvl": 120.0e6, "timestamp": T0 + 3600}),
        ],
    );
    write(
        &d.join("gas.jsonl"),
        &[
            json!({"chain": "ethereum", "gwei": 40.0, "timestamp": T0}),
            json!({"chain": "ethereum", "gwei": 60.0, "timestamp": T0 + 60}),
        ],
    );
    write(
        &d.join("transfers.jsonl"),
        &[
            json!({"chain": "ethereum", "tx_hash": "0xab", "coin": eth, "from": "0x1", "to": "0x2", "amount": 1250.5, "timestamp": T0 + 3700}),
        ],
    );
    write(
        &d.join("liquidations.jsonl"),
        &[
            json!({"protocol_id": "2269", "chain": "ethereum", "account": "0xdead", "amount_usd": 1500000.25, "timestamp": T0 + 10}),
        ],
    );
    let alerts = d.join("alerts.jsonl");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llamaflow"));
    cmd.args(["replay", "--quiet"]);
    for kind in ["rules", "prices", "tvl", "gas", "transfers", "liquidations"] {
        cmd.arg(format!("--{kind}")).arg(d.join(format!("{kind}.jsonl")));
    }
    let status = cmd.arg("--alerts-out").arg(&alerts).status().unwrap();
    assert!(status.success());
    let got: BTreeSet<(String, String, String, i64)> = std::fs::read_to_string(&alerts)
        .unwrap()
        .lines()
        .map(|l| {
            let a: Value = serde_json::from_str(l).unwrap();
            (
                a["rule_id"].as_str().unwrap().to_string(),
                a["alert_id"].as_str().unwrap().to_string(),
                a["subject"].as_str().unwrap().to_string(),
                a["triggered_at"].as_i64().unwrap(),
            )
        })
        .collect();
    let golden: Vec<Value> = serde_json::from_str(include_str!("golden/alert_ids.json")).unwrap();
    let want: BTreeSet<(String, String, String, i64)> = golden
        .iter()
        .map(|g| {
            (
                g["rule_id"].as_str().unwrap().to_string(),
                g["alert_id"].as_str().unwrap().to_string(),
                g["subject"].as_str().unwrap().to_string(),
                g["triggered_at"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got, want,
        "alert ids of the replay vs the golden ids (tests/golden/alert_ids.py)"
    );
}
