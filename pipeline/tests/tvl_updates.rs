//! SPEC §2's TVL update in the live job: a protocol's records with one timestamp that arrive in
//! different epochs are still one update (the total is evaluated once, with all of them, when
//! the update settles), and a record of an update that has closed is late — never a second
//! alert with the same `alert_id`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

mod common;

use common::{Job, records_in, wait_until};

const T0: i64 = 1_717_430_400;

fn tvl(chain: &str, v: f64, t: i64) -> String {
    json!({"protocol_id": "2269", "chain": chain, "tvl": v, "timestamp": t}).to_string() + "\n"
}

#[test]
fn an_update_split_over_epochs_is_evaluated_once_and_a_late_chain_is_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (rules, tvl_file, alerts, dead) = (p("rules.jsonl"), p("tvl.jsonl"), p("alerts.jsonl"), p("dead.jsonl"));
    std::fs::write(
        &rules,
        json!({"id": "tot", "user_id": "u", "alert_type": "tvl_change", "throttle_minutes": 0,
            "conditions": {"protocol_id": "2269", "window": "1h", "threshold_pct": 10, "direction": "any"}})
        .to_string()
            + "\n",
    )
    .unwrap();
    std::fs::write(&tvl_file, "").unwrap();
    let port = testkit::free_port();
    let config = p("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{port}\"\nbatch_ms = 1\ntvl_settle_ms = 1500\ncheckpoint_dir = \"\"\n\
             dead_letter_out = \"{dead}\"\n\n\
             [[sources.files]]\nkind = \"rules\"\npath = \"{rules}\"\n\n\
             [[sources.files]]\nkind = \"tvl\"\npath = \"{tvl}\"\nfollow = true\n\n[sinks]\nstdout = false\n\n\
             [sinks.jsonl]\nalerts = \"{alerts}\"\n",
            dead = dead.display(),
            rules = rules.display(),
            tvl = tvl_file.display(),
            alerts = alerts.display()
        ),
    )
    .unwrap();
    let mut job = Job(Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap());
    assert!(
        testkit::wait_for_port(port, Duration::from_secs(30)),
        "llamaflow listens"
    );
    let mut f = std::fs::OpenOptions::new().append(true).open(&tvl_file).unwrap();
    let mut append = |s: &str| {
        f.write_all(s.as_bytes()).unwrap();
        f.flush().unwrap();
    };
    let within = Duration::from_secs(20);
    // The reference hour: 100 + 100.
    append(&(tvl("ethereum", 100.0, T0) + &tvl("arbitrum", 100.0, T0)));
    wait_until("the first hour at the ingest front", within, || {
        records_in(port, "tvl") == 2
    });
    // The next hour arrives in two parts, in different epochs: ethereum first, then (once the
    // front has taken it in) arbitrum.
    append(&tvl("ethereum", 150.0, T0 + 3600));
    wait_until("the first part at the ingest front", within, || {
        records_in(port, "tvl") == 3
    });
    append(&tvl("arbitrum", 150.0, T0 + 3600));
    wait_until("the total alert", within, || !common::json_lines(&alerts).is_empty());
    // The update has closed: a chain it did not have is late; a repeated chain is a duplicate.
    append(&(tvl("base", 7.0, T0 + 3600) + &tvl("ethereum", 150.0, T0 + 3600)));
    wait_until("the late chain's dead letter", within, || {
        !common::json_lines(&dead).is_empty()
    });
    wait_until("the repeated chain at the ingest front", within, || {
        records_in(port, "tvl") == 6
    });
    let status = job.terminate();
    assert!(status.success(), "{status:?}");

    let got = common::json_lines(&alerts);
    assert_eq!(got.len(), 1, "one alert for the update, with all its chains: {got:?}");
    assert_eq!(got[0]["rule_id"], "tot");
    assert_eq!(got[0]["triggered_at"], T0 + 3600);
    // 200 → 300 is +50 %; the ethereum part alone (250) would have been +25 %.
    assert_eq!(got[0]["value"], 50.0, "{got:?}");
    let dead = common::json_lines(&dead);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["reason"], "late");
    assert!(
        dead[0]["raw"].as_str().unwrap().contains("\"chain\":\"base\""),
        "{dead:?}"
    );
    assert!(dead[0]["source"].as_str().unwrap().contains("tvl.jsonl"), "{dead:?}");
}
