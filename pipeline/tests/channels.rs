//! Alert channels end to end: `llamaflow run` with rules and recipients over CDC from a private
//! PostgreSQL, prices from a followed file, and real peers: an SMTP server (aiosmtpd) and one
//! local HTTP server speaking Telegram's `sendMessage`, Discord webhooks and FCM's token and
//! `messages:send` endpoints.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use serde_json::{Value, json};

mod common;

use common::{Lcg, crash_seed, migrated_postgres, psql, sigkill, start_run, wait_until};

const T0: i64 = 1_717_430_400;

/// What the HTTP peers were sent: (channel and recipient, alert id), in arrival order.
type Log = Arc<Mutex<Vec<(String, String)>>>;

/// The alert id in a link `https://llama.test/a/<id>`.
fn linked_id(s: &str) -> String {
    s.split("/a/")
        .nth(1)
        .map(|rest| rest.chars().take(32).collect())
        .unwrap_or_default()
}

struct Peers {
    log: Log,
    base: String,
    _task: tokio::task::JoinHandle<()>,
}

async fn peer(State((log, delay)): State<(Log, Duration)>, uri: Uri, body: Bytes) -> (StatusCode, String) {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = uri.path();
    if path == "/token" {
        return (
            StatusCode::OK,
            json!({"access_token": "ya29.t", "expires_in": 3600}).to_string(),
        );
    }
    tokio::time::sleep(delay).await;
    let entry = if path.ends_with("/sendMessage") {
        (
            format!("telegram:{}", body["chat_id"].as_str().unwrap_or("")),
            linked_id(body["text"].as_str().unwrap_or("")),
        )
    } else if let Some(user) = path.strip_prefix("/discord/") {
        (
            format!("discord:{user}"),
            linked_id(body["embeds"][0]["url"].as_str().unwrap_or("")),
        )
    } else if path.ends_with("messages:send") {
        (
            format!("push:{}", body["message"]["token"].as_str().unwrap_or("")),
            body["message"]["data"]["alert_id"].as_str().unwrap_or("").to_string(),
        )
    } else {
        return (StatusCode::NOT_FOUND, String::new());
    };
    log.lock().unwrap().push(entry);
    (StatusCode::OK, json!({"ok": true}).to_string())
}

impl Peers {
    /// Starts the HTTP peers; each answers after `delay` (deliveries stay in flight a while).
    async fn start(delay: Duration) -> Peers {
        let log: Log = Arc::default();
        let app = axum::Router::new().fallback(peer).with_state((log.clone(), delay));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Peers { log, base, _task: task }
    }

    fn got(&self) -> Vec<(String, String)> {
        self.log.lock().unwrap().clone()
    }
}

/// The (recipient, alert id) of each mail the SMTP server accepted.
fn mails(smtp: &testkit::Smtp) -> Vec<(String, String)> {
    smtp.mails()
        .iter()
        .map(|l| {
            let m: Value = serde_json::from_str(l).unwrap();
            let id = m["message_id"].as_str().unwrap_or("").trim_matches(['<', '>']);
            (
                format!("email:{}", m["to"][0].as_str().unwrap_or("")),
                id.split('@').next().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// A service-account key file whose token endpoint is the peers'.
fn service_account(dir: &Path, peers: &Peers) -> PathBuf {
    let pem = testkit::rsa_key_pem(&dir.join("key.pem"));
    let path = dir.join("service-account.json");
    let key = json!({
        "type": "service_account",
        "project_id": "llama-test",
        "private_key": pem,
        "client_email": "fcm@llama-test.iam.gserviceaccount.com",
        "token_uri": format!("{}/token", peers.base),
    });
    std::fs::write(&path, key.to_string()).unwrap();
    path
}

fn config(dir: &Path, pg: &testkit::Postgres, smtp: &testkit::Smtp, peers: &Peers, prices: &Path) -> PathBuf {
    let path = dir.join("llamaflow.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[pipeline]
workers = 1
listen = "127.0.0.1:{port}"
dead_letter_out = "{dead}"
checkpoint_dir = "{ckpt}"
checkpoint_interval_ms = 300
batch_ms = 20

[[sources.files]]
kind = "prices"
path = "{prices}"
follow = true

[sources.postgres_cdc]
url = "{pg}"
slot = "channels"
poll_interval_ms = 50

[sinks]
stdout = false

[sinks.notify]
url = "{pg}"
link_template = "https://llama.test/a/{{alert_id}}"
concurrency = 4
per_user_per_minute = 0
timeout_ms = 2000
lease_ms = 3000
poll_ms = 100
initial_backoff_ms = 100

[sinks.notify.email]
host = "127.0.0.1"
port = {smtp}
tls = "none"
from = "alerts@llamaflow.test"
per_second = 1000

[sinks.notify.telegram]
bot_token = "42:test"
api_base = "{base}"
per_second = 1000

[sinks.notify.discord]
per_second = 1000

[sinks.notify.push]
service_account_key = "{key}"
api_base = "{base}"
per_second = 1000
"#,
            port = testkit::free_port(),
            dead = dir.join("dead.jsonl").display(),
            ckpt = dir.join("ckpt").display(),
            prices = prices.display(),
            pg = pg.url(),
            smtp = smtp.port,
            base = peers.base,
            key = service_account(dir, peers).display(),
        ),
    )
    .unwrap();
    path
}

/// Appends ETH ticks that cross 3000 upwards `crossings` times, from minute `from` on (one
/// alert each, for a rule `price > 3000` with no throttle).
fn crossings(prices: &Path, from: i64, crossings: i64) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(prices)
        .unwrap();
    for k in 0..crossings {
        for (i, px) in [2900.0, 3100.0].into_iter().enumerate() {
            let t = T0 + (from + 2 * k + i as i64) * 60;
            writeln!(
                f,
                "{}",
                json!({"coin": "coingecko:ethereum", "price": px, "timestamp": t})
            )
            .unwrap();
        }
    }
    f.sync_all().unwrap();
}

fn rule(pg: &testkit::Postgres, channels: &str) {
    psql(
        pg,
        &format!(
            "INSERT INTO alert_rules (id, user_id, name, alert_type, conditions, channels, throttle_minutes) VALUES \
             ('eth', 'u1', 'ETH over 3k', 'price_threshold', \
              '{{\"coin\":\"coingecko:ethereum\",\"operator\":\">\",\"value\":3000}}', '{channels}', 0)"
        ),
    );
}

/// Waits (≤ 60 s) until `n` deliveries are done; on a timeout, shows the log and the rows.
fn wait_deliveries(pg: &testkit::Postgres, log: &Path, n: usize) {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while delivered(pg) < n {
        assert!(
            std::time::Instant::now() < until,
            "{} of {n} deliveries; states: {}\njob log:\n{}",
            delivered(pg),
            psql(pg, "SELECT status, count(*) FROM alert_deliveries GROUP BY 1"),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn delivered(pg: &testkit::Postgres) -> usize {
    psql(pg, "SELECT count(*) FROM alert_deliveries WHERE status = 'delivered'")
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_changed_while_the_job_runs_take_effect_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let pg = migrated_postgres();
    let smtp = testkit::Smtp::start(None);
    let peers = Peers::start(Duration::ZERO).await;
    rule(&pg, r#"["email","push"]"#);
    let prices = dir.path().join("prices.jsonl");
    crossings(&prices, 0, 1);
    let config = config(dir.path(), &pg, &smtp, &peers, &prices);
    let log = dir.path().join("job.log");
    let mut job = common::Job(start_run(&config, &log));
    let dead = dir.path().join("dead.jsonl");

    // Nobody to send to yet: both channels are dead-lettered with the reason.
    wait_until("two dead letters", Duration::from_secs(30), || {
        common::json_lines(&dead).len() >= 2
    });
    let reasons: Vec<String> = common::json_lines(&dead)
        .iter()
        .map(|d| d["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("\"u1\" is not in the users table")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("no device in user_devices")),
        "{reasons:?}"
    );

    // Each change, then one second, then an alert: it must be served by the change.
    let steps: [(&str, &str); 4] = [
        (
            "a user is added",
            "INSERT INTO users (id, email) VALUES ('u1', 'alice@example.com')",
        ),
        (
            "a device is added",
            "INSERT INTO user_devices (id, user_id, device_token) VALUES ('d1', 'u1', 'tok-1')",
        ),
        (
            "a device is revoked and another added",
            "BEGIN; DELETE FROM user_devices WHERE id = 'd1'; \
             INSERT INTO user_devices (id, user_id, device_token) VALUES ('d2', 'u1', 'tok-2'); COMMIT",
        ),
        (
            "an e-mail is changed",
            "UPDATE users SET email = 'alice@new.example' WHERE id = 'u1'",
        ),
    ];
    let want: [&[&str]; 4] = [
        &["email:alice@example.com"],
        &["email:alice@example.com", "push:tok-1"],
        &["email:alice@example.com", "push:tok-2"],
        &["email:alice@new.example", "push:tok-2"],
    ];
    for (step, ((what, sql), want)) in steps.iter().zip(want).enumerate() {
        psql(&pg, sql);
        // The contract under test ("in effect within a second"), not a synchronisation: the
        // alert is produced one second after the change and must already see it.
        std::thread::sleep(Duration::from_secs(1));
        crossings(&prices, 2 + 2 * step as i64, 1);
        let id = wait_for_alert(&pg, step + 2);
        wait_until(
            &format!("the deliveries after \"{what}\""),
            Duration::from_secs(30),
            || {
                let n: usize = psql(
                &pg,
                &format!("SELECT count(*) FROM alert_deliveries WHERE alert_id = '{id}' AND status IN ('delivered', 'failed')"),
            )
            .parse()
            .unwrap();
                n >= want.len()
            },
        );
        let mut got: Vec<String> = mails(&smtp)
            .into_iter()
            .chain(peers.got())
            .filter(|(_, a)| *a == id)
            .map(|(to, _)| to)
            .collect();
        got.sort();
        assert_eq!(got, *want, "after \"{what}\"");
    }
    sigkill(&mut job.0, &log);
}

/// Waits for the `n`-th alert of the rule (in triggered_at order) to be logged; its id.
fn wait_for_alert(pg: &testkit::Postgres, n: usize) -> String {
    let mut id = String::new();
    wait_until(&format!("alert {n}"), Duration::from_secs(30), || {
        let ids = psql(
            pg,
            "SELECT DISTINCT alert_id, (alert->>'triggered_at')::float8 AS t FROM alert_deliveries ORDER BY t",
        );
        // Alerts without any recipient (the first) are not logged: count from the second.
        match ids.lines().nth(n - 2) {
            Some(line) => {
                id = line.split('|').next().unwrap().to_string();
                true
            }
            None => false,
        }
    });
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_while_delivering_reaches_every_channel_with_counted_duplicates() {
    let seed = crash_seed("channels");
    let mut rng = Lcg(seed);
    let dir = tempfile::tempdir().unwrap();
    let pg = migrated_postgres();
    let smtp = testkit::Smtp::start(None);
    // Slow peers: deliveries are in flight when the job is killed.
    let peers = Peers::start(Duration::from_millis(150)).await;
    psql(
        &pg,
        &format!(
            "INSERT INTO users (id, email, telegram_chat_id, discord_webhook_url) VALUES \
             ('u1', 'alice@example.com', '1001', '{}/discord/u1')",
            peers.base
        ),
    );
    psql(
        &pg,
        "INSERT INTO user_devices (id, user_id, device_token) VALUES ('d1', 'u1', 'tok-1')",
    );
    rule(&pg, r#"["email","telegram","discord","push","websocket"]"#);
    const ALERTS: usize = 40;
    let prices = dir.path().join("prices.jsonl");
    crossings(&prices, 0, ALERTS as i64);
    let config = config(dir.path(), &pg, &smtp, &peers, &prices);
    let log = dir.path().join("job.log");
    let total = ALERTS * 4;

    for round in 0..2 {
        let kill_at = (10 + rng.below((total / 2) as u64) as usize + round * total / 4).max(delivered(&pg) + 10);
        let mut job = start_run(&config, &log);
        wait_deliveries(&pg, &log, kill_at);
        eprintln!("round {round}: kill -9 after {} of {total} deliveries", delivered(&pg));
        sigkill(&mut job, &log);
    }
    let job = common::Job(start_run(&config, &log));
    wait_deliveries(&pg, &log, total);

    let ids: Vec<String> = psql(&pg, "SELECT DISTINCT alert_id FROM alert_deliveries ORDER BY 1")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(ids.len(), ALERTS, "one alert per crossing");
    let mut received: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (to, id) in mails(&smtp).into_iter().chain(peers.got()) {
        *received.entry((to, id)).or_default() += 1;
    }
    let recipients = ["email:alice@example.com", "telegram:1001", "discord:u1", "push:tok-1"];
    let mut duplicates = 0;
    for id in &ids {
        for to in recipients {
            let n = received.get(&(to.to_string(), id.clone())).copied().unwrap_or(0);
            assert!(n >= 1, "{to} never got {id}");
            duplicates += n - 1;
        }
    }
    assert_eq!(received.len(), total, "nothing else was sent: {received:?}");
    eprintln!("duplicates after two kills: {duplicates} of {total} deliveries");
    // The docs allow the deliveries in flight at each kill: at most `concurrency` (4) each.
    assert!(duplicates <= 2 * 4, "{duplicates} duplicates");
    let dead = common::json_lines(&dir.path().join("dead.jsonl"));
    assert!(dead.is_empty(), "{dead:?}");
    drop(job);
}
