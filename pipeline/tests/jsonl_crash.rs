//! Issue 20, whole lines: a JSONL-only job (a tailed prices file with bad lines among the
//! ticks, rules as history; alerts and dead letters to JSONL files) is killed with SIGKILL 25
//! times at random moments and restarted each time. Killed mid-write, a job used to leave a
//! fragment that the next run appended to, and the records written after the last checkpoint
//! were written again. Now every line parses, the alerts file holds exactly the alerts of an
//! uninterrupted run (`llamaflow replay` over the same input), each once, and the dead-letter
//! file each bad line once.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

mod common;

use common::Lcg;

const T0: i64 = 1_717_430_400;
const COINS: usize = 8;
const TICKS: usize = 500;
const KILLS: usize = 25;
/// One bad line every this many ticks.
const BAD_EVERY: usize = 50;

/// Rules that fire often (threshold crossings, 5-minute changes with a throttle) and the
/// ticks of a random walk per coin, every 10 s of event time.
fn workload(rng: &mut Lcg) -> (Vec<Value>, Vec<Value>) {
    let mut rules = Vec::new();
    for c in 0..COINS {
        let coin = format!("coingecko:coin{c}");
        rules.push(
            json!({"id": format!("up{c}"), "user_id": "u1", "alert_type": "price_threshold",
            "conditions": {"coin": coin, "operator": ">", "value": 100.5}, "throttle_minutes": 0}),
        );
        rules.push(
            json!({"id": format!("down{c}"), "user_id": "u2", "alert_type": "price_threshold",
            "conditions": {"coin": coin, "operator": "<", "value": 99.5}, "throttle_minutes": 0}),
        );
        rules.push(
            json!({"id": format!("chg{c}"), "user_id": "u3", "alert_type": "price_change",
            "conditions": {"coin": coin, "window": "5m", "threshold_pct": 1.0, "direction": "any"},
            "throttle_minutes": 1}),
        );
    }
    let mut prices = [100.0f64; COINS];
    let mut ticks = Vec::new();
    for i in 0..TICKS {
        for (c, p) in prices.iter_mut().enumerate() {
            *p *= 1.0 + (rng.below(2001) as f64 - 1000.0) / 100_000.0;
            *p = (*p * 10_000.0).round() / 10_000.0;
            ticks.push(json!({"coin": format!("coingecko:coin{c}"), "price": *p, "timestamp": T0 + 10 * i as i64}));
        }
    }
    (rules, ticks)
}

/// The prices file's lines: the ticks with a bad line before every [`BAD_EVERY`]th.
fn price_lines(ticks: &[Value]) -> Vec<String> {
    let mut lines = Vec::new();
    for (i, t) in ticks.iter().enumerate() {
        if i % BAD_EVERY == 0 {
            lines.push(format!("not json #{}", i / BAD_EVERY));
        }
        lines.push(t.to_string());
    }
    lines
}

/// Every line of `path` parsed (failing the test on a fragment), counted by `key`.
fn counts(path: &Path, key: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (i, line) in std::fs::read_to_string(path).unwrap_or_default().lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{}:{}: not a whole JSON line ({e}): {line}", path.display(), i + 1));
        *out.entry(v[key].as_str().unwrap().to_string()).or_default() += 1;
    }
    out
}

#[test]
fn a_jsonl_job_killed_25_times_keeps_whole_lines_and_each_record_once() {
    let seed = common::crash_seed("JSONL crash test");
    let mut rng = Lcg(seed);
    let dir = tempfile::tempdir().unwrap();
    let (rules, ticks) = workload(&mut Lcg(11));
    let lines = price_lines(&ticks);

    // The uninterrupted run.
    let rules_file = dir.path().join("rules.jsonl");
    std::fs::write(
        &rules_file,
        rules.iter().map(|r| r.to_string() + "\n").collect::<String>(),
    )
    .unwrap();
    let all_prices = dir.path().join("all-prices.jsonl");
    std::fs::write(&all_prices, lines.iter().map(|l| l.clone() + "\n").collect::<String>()).unwrap();
    let expected_file = dir.path().join("expected.jsonl");
    let expected_dead = dir.path().join("expected-dead.jsonl");
    common::replay(&[
        "--prices".as_ref(),
        all_prices.as_os_str(),
        "--rules".as_ref(),
        rules_file.as_os_str(),
        "--alerts-out".as_ref(),
        expected_file.as_os_str(),
        "--dead-letter-out".as_ref(),
        expected_dead.as_os_str(),
    ]);
    let expected = counts(&expected_file, "alert_id");
    assert!(expected.len() > 300, "the workload alerts often: {}", expected.len());
    assert!(expected.values().all(|&n| n == 1));

    let (prices, alerts, dead) = (
        dir.path().join("prices.jsonl"),
        dir.path().join("alerts.jsonl"),
        dir.path().join("dead.jsonl"),
    );
    let config = dir.path().join("llamaflow.toml");
    let port = testkit::free_port();
    std::fs::write(
        &config,
        format!(
            r#"
[pipeline]
listen = "127.0.0.1:{port}"
checkpoint_interval_ms = 150
dead_letter_out = "{dead}"

[[sources.files]]
kind = "rules"
path = "{rules}"

[[sources.files]]
kind = "prices"
path = "{prices}"
follow = true

[sinks]
stdout = false

[sinks.jsonl]
alerts = "{alerts}"
"#,
            dead = dead.display(),
            rules = rules_file.display(),
            prices = prices.display(),
            alerts = alerts.display(),
        ),
    )
    .unwrap();

    // The feed: the prices file grows by 4 ticks per coin every 60 ms (~8 s in all).
    let feed = {
        let (prices, lines) = (prices.clone(), lines.clone());
        std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&prices)
                .unwrap();
            for chunk in lines.chunks(COINS * 4) {
                let text: String = chunk.iter().map(|l| l.clone() + "\n").collect();
                f.write_all(text.as_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(60));
            }
        })
    };

    let log = dir.path().join("llamaflow.log");
    let mut job = common::start_run(&config, &log);
    for kill in 0..KILLS {
        std::thread::sleep(Duration::from_millis(60 + rng.below(400)));
        common::sigkill(&mut job, &log);
        let written = std::fs::read_to_string(&alerts).unwrap_or_default();
        eprintln!(
            "kill {} of {KILLS}: {} alert lines, ends with a newline: {}",
            kill + 1,
            written.lines().count(),
            written.is_empty() || written.ends_with('\n')
        );
        job = common::start_run(&config, &log);
    }
    feed.join().unwrap();

    // The last run catches up with the whole file; then a graceful stop.
    common::wait_until("the last run serves", Duration::from_secs(30), || {
        common::http_get(port, "/healthz").0 == 200
    });
    common::wait_until("every alert written", Duration::from_secs(60), || {
        counts(&alerts, "alert_id").len() >= expected.len()
    });
    let status = common::sigterm(&mut job);
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "graceful stop exits 0: {status:?}\n{log_text}");
    assert!(
        log_text.contains("resuming from checkpoint"),
        "restarts resumed from checkpoints:\n{log_text}"
    );
    assert!(
        log_text.contains("logged epochs again (reclocking)") && !log_text.contains("could not be followed"),
        "restarts formed the logged epochs again, to the end of the log:\n{log_text}"
    );

    let got = counts(&alerts, "alert_id");
    let twice: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "alerts written more than once: {twice:?}");
    let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the uninterrupted run's alerts: {} missing {missing:?}, {} extra {extra:?}",
        missing.len(),
        extra.len()
    );
    let bad = counts(&dead, "raw");
    let want: BTreeMap<String, usize> = (0..ticks.len().div_ceil(BAD_EVERY))
        .map(|n| (format!("not json #{n}"), 1))
        .collect();
    assert_eq!(bad, want, "each bad line dead-lettered once");
}
