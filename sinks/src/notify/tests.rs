//! Tests against real servers: a private PostgreSQL (testkit), an SMTP server (aiosmtpd), and
//! local HTTP servers that speak Telegram's `sendMessage`, Discord's webhooks and FCM's token
//! and `messages:send` endpoints, with their 429 / 5xx / unregistered answers.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use metrics_util::debugging::DebuggingRecorder;
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, RsaKeyPair, UnparsedPublicKey};
use schemas::{Alert, Contact, Millis};
use serde_json::Value;

use super::*;
use crate::OutputBatch;
use crate::jsonl::{DeadLetters, FileMarks};
use crate::test_support::metrics_of;

const T0: Millis = 1_717_430_400_000;

/// One request a test server received.
#[derive(Clone, Debug)]
struct Req {
    path: String,
    query: String,
    headers: HeaderMap,
    body: String,
    at: Instant,
}

impl Req {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// An answer: status, headers, body.
type Answer = (StatusCode, Vec<(&'static str, String)>, String);
/// Answers a request, given the requests before it.
type Script = Arc<dyn Fn(&Req, &[Req]) -> Answer + Send + Sync>;

struct ServerState {
    script: Script,
    received: Mutex<Vec<Req>>,
}

/// A local HTTP server recording every request and answering per its script.
struct Server {
    addr: std::net::SocketAddr,
    state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(state): State<Arc<ServerState>>, uri: Uri, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let req = Req {
        path: uri.path().to_string(),
        query: uri.query().unwrap_or("").to_string(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        at: Instant::now(),
    };
    let (status, headers, body) = {
        let mut received = state.received.lock().unwrap();
        let answer = (state.script)(&req, &received);
        received.push(req);
        answer
    };
    let mut response = (status, body).into_response();
    for (k, v) in headers {
        response.headers_mut().insert(k, v.parse().unwrap());
    }
    response
}

impl Server {
    async fn start(script: impl Fn(&Req, &[Req]) -> Answer + Send + Sync + 'static) -> Server {
        let state = Arc::new(ServerState {
            script: Arc::new(script),
            received: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Server { addr, state, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn received(&self) -> Vec<Req> {
        self.state.received.lock().unwrap().clone()
    }
}

fn ok_json(body: Value) -> Answer {
    (
        StatusCode::OK,
        vec![("content-type", "application/json".into())],
        body.to_string(),
    )
}

fn status_json(status: StatusCode, body: Value) -> Answer {
    (
        status,
        vec![("content-type", "application/json".into())],
        body.to_string(),
    )
}

/// A private Postgres with the migrations, a directory and a dead-letter file.
struct Env {
    pg: testkit::Postgres,
    dir: tempfile::TempDir,
    directory: Directory,
}

impl Env {
    async fn start() -> Env {
        let pg = testkit::Postgres::start();
        let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
        crate::postgres::migrate(&pool).await.unwrap();
        pg.psql(
            "INSERT INTO alert_rules (id, user_id, name, alert_type, conditions) VALUES \
             ('rule-1', 'u1', 'ETH above 3k', 'price_threshold', '{}')",
        );
        Env {
            pg,
            dir: tempfile::tempdir().unwrap(),
            directory: Directory::default(),
        }
    }

    fn dead_path(&self) -> PathBuf {
        self.dir.path().join("dead.jsonl")
    }

    /// The sink of `cfg` (with this database) and its running dispatcher.
    async fn sink(&self, cfg: NotifyConfig) -> (NotifySink, tokio::task::JoinHandle<()>) {
        let dead = DeadLetters::open(Some(&self.dead_path()), &FileMarks::default()).unwrap();
        let cfg = NotifyConfig {
            url: Some(self.pg.url()),
            ..cfg
        };
        let (sink, dispatcher) = NotifySink::connect(cfg, self.directory.clone(), dead).await.unwrap();
        (sink, tokio::spawn(dispatcher.run()))
    }

    /// `channel|recipient|status|attempts|last_error` of every logged delivery, in key order.
    fn rows(&self) -> Vec<String> {
        self.pg
            .psql(
                "SELECT channel, recipient, status, attempts, coalesce(last_error, '') FROM alert_deliveries \
                 ORDER BY alert_id, channel, recipient",
            )
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn count(&self, filter: &str) -> usize {
        self.pg
            .psql(&format!("SELECT count(*) FROM alert_deliveries WHERE {filter}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits until `n` deliveries are final (delivered or failed).
    async fn settled(&self, n: usize, within: Duration) {
        let until = Instant::now() + within;
        while self.count("status IN ('delivered', 'failed')") < n {
            assert!(
                Instant::now() < until,
                "deliveries not settled in {within:?}: {:#?}",
                self.rows()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(self.count("true"), n, "{:#?}", self.rows());
    }

    fn dead(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dead_path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn user(&self, id: &str, column: &str, value: &str) {
        self.pg.psql(&format!(
            "INSERT INTO users (id, {column}) VALUES ('{id}', '{value}') \
             ON CONFLICT (id) DO UPDATE SET {column} = EXCLUDED.{column}"
        ));
    }
}

/// Quick retries for tests.
fn fast(cfg: NotifyConfig) -> NotifyConfig {
    NotifyConfig {
        initial_backoff_ms: 50,
        max_backoff_ms: 200,
        timeout_ms: 2000,
        lease_ms: 5000,
        poll_ms: 50,
        ..cfg
    }
}

fn alert(n: usize, user: &str, channels: &[&str]) -> Alert {
    Alert {
        alert_id: format!("{n:032x}"),
        rule_id: format!("rule-{n}"),
        user_id: user.to_string(),
        alert_type: "price_threshold".to_string(),
        subject: "coingecko:ethereum".to_string(),
        triggered_at: T0 + n as Millis * 1000,
        value: 3500.25,
        threshold: 3000.0,
        message: format!("ETH above 3000 <{n}> & \"é\""),
        channels: channels.iter().map(|c| c.to_string()).collect(),
        webhook_url: None,
    }
}

fn batch(alerts: Vec<Alert>) -> OutputBatch {
    OutputBatch {
        epoch: 1,
        alerts,
        ..Default::default()
    }
}

fn telegram_cfg(base: String) -> TelegramConfig {
    TelegramConfig {
        bot_token: "123456:TEST-token".into(),
        api_base: base,
        per_second: 100.0,
    }
}

#[tokio::test]
async fn email_goes_out_over_smtp_as_text_and_html_once_each() {
    let env = Env::start().await;
    let smtp = testkit::Smtp::start(Some(("llama", "s3cret")));
    env.user("u1", "email", "alice@example.com");
    env.user("u2", "email", "bob@flaky.example");
    env.user("u3", "email", "carol@bounce.example");
    let cfg = fast(NotifyConfig {
        link_template: "https://llama.test/alerts/{alert_id}".into(),
        email: Some(EmailConfig {
            host: "127.0.0.1".into(),
            port: Some(smtp.port),
            tls: SmtpTls::None,
            ca_file: None,
            username: Some("llama".into()),
            password: Some("s3cret".into()),
            from: "DeFi alerts <alerts@llamaflow.test>".into(),
            per_second: 100.0,
        }),
        ..NotifyConfig::default()
    });
    let (mut sink, task) = env.sink(cfg).await;
    let alerts = vec![
        alert(1, "u1", &["websocket", "email"]),
        alert(2, "u2", &["email"]),
        alert(3, "u3", &["email"]),
    ];
    let written = sink.write(&batch(alerts.clone())).await.unwrap();
    assert!(written.rejected.is_empty(), "{:?}", written.rejected);
    env.settled(3, Duration::from_secs(20)).await;

    let mails: Vec<Value> = smtp.mails().iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(mails.len(), 2, "{mails:#?}");
    let alice = mails
        .iter()
        .find(|m| m["to"][0] == "alice@example.com")
        .expect("alice's mail");
    assert_eq!(alice["from"], "alerts@llamaflow.test");
    assert!(alice["header_from"].as_str().unwrap().contains("DeFi alerts"));
    assert_eq!(alice["authenticated"], true);
    assert_eq!(
        alice["subject"], "ETH above 3k: coingecko:ethereum",
        "the rule's name from alert_rules"
    );
    assert_eq!(alice["message_id"], format!("<{}@llamaflow>", alerts[0].alert_id));
    let text = alice["text"].as_str().unwrap();
    assert!(text.starts_with("ETH above 3000 <1> & \"é\"\n"), "{text}");
    assert!(text.contains("Value: $3,500.25 (threshold $3,000.00)"), "{text}");
    assert!(
        text.contains(&format!("https://llama.test/alerts/{}", alerts[0].alert_id)),
        "{text}"
    );
    let html = alice["html"].as_str().unwrap();
    assert!(html.contains("ETH above 3000 &lt;1&gt; &amp; &quot;é&quot;"), "{html}");
    // No name in alert_rules: the rule id.
    let bob = mails
        .iter()
        .find(|m| m["to"][0] == "bob@flaky.example")
        .expect("bob's mail after a 451");
    assert_eq!(bob["subject"], "rule-2: coingecko:ethereum");

    let rows = env.rows();
    assert_eq!(rows[0], "email|alice@example.com|delivered|1|");
    assert_eq!(rows[1], "email|bob@flaky.example|delivered|2|");
    assert!(rows[2].starts_with("email|carol@bounce.example|failed|1|"), "{rows:?}");
    assert!(rows[2].contains("550"), "{rows:?}");
    let dead = env.dead();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["source"], "sink:notify:email");
    assert!(dead[0]["raw"].as_str().unwrap().contains(&alerts[2].alert_id));

    // The same epoch again (a replay, a restart): nothing new is logged, so nothing is sent.
    let written = sink.write(&batch(alerts)).await.unwrap();
    assert!(written.rejected.is_empty());
    assert_eq!(env.count("status IN ('pending', 'sending')"), 0, "{:#?}", env.rows());
    assert_eq!(env.count("true"), 3);
    task.abort();
}

/// A private CA and a `localhost` server certificate it signed (`openssl`): (CA, cert, key).
fn localhost_cert(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n);
    let ext = p("ext.cnf");
    std::fs::write(&ext, "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n").unwrap();
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=llamaflow test CA",
        ],
        &["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost"],
        &["x509", "-req", "-days", "2", "-CAcreateserial"],
    ];
    let files: [Vec<std::ffi::OsString>; 3] = [
        vec!["-keyout".into(), p("ca.key").into(), "-out".into(), p("ca.crt").into()],
        vec![
            "-keyout".into(),
            p("srv.key").into(),
            "-out".into(),
            p("srv.csr").into(),
        ],
        vec![
            "-in".into(),
            p("srv.csr").into(),
            "-CA".into(),
            p("ca.crt").into(),
            "-CAkey".into(),
            p("ca.key").into(),
            "-extfile".into(),
            ext.into(),
            "-out".into(),
            p("srv.crt").into(),
        ],
    ];
    for (args, files) in steps.iter().zip(files) {
        let out = std::process::Command::new("openssl")
            .args(*args)
            .args(files)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    (p("ca.crt"), p("srv.crt"), p("srv.key"))
}

#[tokio::test]
async fn email_uses_starttls_with_a_private_ca_and_refuses_an_untrusted_relay() {
    let env = Env::start().await;
    let (ca, cert, key) = localhost_cert(env.dir.path());
    let smtp = testkit::Smtp::start_with(Some(("llama", "s3cret")), Some((&cert, &key)));
    env.user("u1", "email", "alice@example.com");
    let email = |ca_file: Option<String>| EmailConfig {
        host: "localhost".into(),
        port: Some(smtp.port),
        tls: SmtpTls::Starttls,
        ca_file,
        username: Some("llama".into()),
        password: Some("s3cret".into()),
        from: "alerts@llamaflow.test".into(),
        per_second: 100.0,
    };
    // Without the CA, the certificate is not trusted: nothing is sent, the alert is dead-lettered.
    let (mut sink, task) = env
        .sink(fast(NotifyConfig {
            max_attempts: 2,
            email: Some(email(None)),
            ..NotifyConfig::default()
        }))
        .await;
    sink.write(&batch(vec![alert(1, "u1", &["email"])])).await.unwrap();
    env.settled(1, Duration::from_secs(20)).await;
    assert!(
        env.rows()[0].starts_with("email|alice@example.com|failed|"),
        "{:?}",
        env.rows()
    );
    assert!(smtp.mails().is_empty());
    task.abort();
    // With it: STARTTLS, then AUTH over TLS.
    let (mut sink, task) = env
        .sink(fast(NotifyConfig {
            email: Some(email(Some(ca.display().to_string()))),
            ..NotifyConfig::default()
        }))
        .await;
    sink.write(&batch(vec![alert(2, "u1", &["email"])])).await.unwrap();
    env.settled(2, Duration::from_secs(20)).await;
    assert_eq!(env.rows()[1], "email|alice@example.com|delivered|1|");
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1);
    let mail: Value = serde_json::from_str(&mails[0]).unwrap();
    assert_eq!(
        (mail["authenticated"].clone(), mail["tls"].clone()),
        (Value::Bool(true), Value::Bool(true))
    );
    task.abort();
}

#[tokio::test]
async fn telegram_waits_what_a_429_asks_and_dead_letters_an_unknown_chat() {
    let env = Env::start().await;
    let server = Server::start(|req, before| {
        let chat = req.json()["chat_id"].as_str().unwrap_or("").to_string();
        let earlier = before.iter().filter(|r| r.json()["chat_id"] == chat.as_str()).count();
        match chat.as_str() {
            "404" => status_json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"ok": false, "error_code": 400, "description": "Bad Request: chat not found"}),
            ),
            _ if earlier == 0 => status_json(
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry after 1",
                    "parameters": {"retry_after": 1}}),
            ),
            _ => ok_json(serde_json::json!({"ok": true, "result": {"message_id": 7}})),
        }
    })
    .await;
    env.user("u1", "telegram_chat_id", "1001");
    env.user("u2", "telegram_chat_id", "404");
    let cfg = fast(NotifyConfig {
        link_template: "https://llama.test/a/{alert_id}?s={subject}".into(),
        telegram: Some(telegram_cfg(server.url(""))),
        ..NotifyConfig::default()
    });
    let (mut sink, task) = env.sink(cfg).await;
    let alerts = vec![alert(1, "u1", &["telegram"]), alert(2, "u2", &["telegram"])];
    sink.write(&batch(alerts.clone())).await.unwrap();
    env.settled(2, Duration::from_secs(20)).await;

    let got = server.received();
    assert!(
        got.iter().all(|r| r.path == "/bot123456:TEST-token/sendMessage"),
        "{got:?}"
    );
    let to_1001: Vec<&Req> = got.iter().filter(|r| r.json()["chat_id"] == "1001").collect();
    assert_eq!(to_1001.len(), 2, "a 429, then the message");
    let waited = to_1001[1].at - to_1001[0].at;
    assert!(
        waited >= Duration::from_millis(950),
        "retry_after 1 s honoured, waited {waited:?}"
    );
    let body = to_1001[1].json();
    assert_eq!(body["parse_mode"], "HTML");
    let text = body["text"].as_str().unwrap();
    assert!(
        text.starts_with("<b>ETH above 3k: coingecko:ethereum</b>\nETH above 3000 &lt;1&gt; &amp; &quot;é&quot;"),
        "{text}"
    );
    assert!(
        text.ends_with(&format!(
            "<a href=\"https://llama.test/a/{}?s=coingecko%3Aethereum\">Open</a>",
            alerts[0].alert_id
        )),
        "{text}"
    );
    let rows = env.rows();
    assert_eq!(rows[0], "telegram|1001|delivered|2|");
    assert!(
        rows[1].starts_with("telegram|404|failed|1|") && rows[1].contains("chat not found"),
        "{rows:?}"
    );
    let dead = env.dead();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["source"], "sink:notify:telegram");
    assert!(
        dead[0]["reason"].as_str().unwrap().contains("chat not found"),
        "{dead:?}"
    );
    task.abort();
}

#[tokio::test]
async fn discord_posts_an_embed_honours_retry_after_and_gives_up_after_the_last_attempt() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let env = Env::start().await;
    let server = Server::start(|req, before| {
        let earlier = before.iter().filter(|r| r.path == req.path).count();
        match req.path.as_str() {
            "/api/webhooks/2/gone" => status_json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"message": "Unknown Webhook", "code": 10015}),
            ),
            "/api/webhooks/3/busy" => (StatusCode::SERVICE_UNAVAILABLE, vec![], "upstream busy".into()),
            _ if earlier == 0 => (
                StatusCode::TOO_MANY_REQUESTS,
                vec![("content-type", "application/json".into()), ("retry-after", "5".into())],
                serde_json::json!({"message": "You are being rate limited.", "retry_after": 0.6, "global": false})
                    .to_string(),
            ),
            _ => ok_json(serde_json::json!({"id": "1", "type": 0})),
        }
    })
    .await;
    env.user("u1", "discord_webhook_url", &server.url("/api/webhooks/1/tok"));
    env.user("u2", "discord_webhook_url", &server.url("/api/webhooks/2/gone"));
    env.user("u3", "discord_webhook_url", &server.url("/api/webhooks/3/busy"));
    let cfg = fast(NotifyConfig {
        max_attempts: 3,
        discord: Some(DiscordConfig {
            username: Some("DeFi alerts".into()),
            per_second: 100.0,
        }),
        ..NotifyConfig::default()
    });
    let (mut sink, task) = env.sink(cfg).await;
    let alerts = vec![
        alert(1, "u1", &["discord"]),
        alert(2, "u2", &["discord"]),
        alert(3, "u3", &["discord"]),
    ];
    sink.write(&batch(alerts)).await.unwrap();
    env.settled(3, Duration::from_secs(20)).await;

    let got = server.received();
    let ok: Vec<&Req> = got.iter().filter(|r| r.path == "/api/webhooks/1/tok").collect();
    assert_eq!(ok.len(), 2);
    assert_eq!(ok[1].query, "wait=true");
    let waited = ok[1].at - ok[0].at;
    assert!(
        waited >= Duration::from_millis(550) && waited < Duration::from_millis(4500),
        "the body's retry_after (0.6 s) is used: {waited:?}"
    );
    let body = ok[1].json();
    assert_eq!(body["username"], "DeFi alerts");
    assert_eq!(body["allowed_mentions"]["parse"], serde_json::json!([]));
    let embed = &body["embeds"][0];
    assert_eq!(embed["title"], "ETH above 3k: coingecko:ethereum");
    assert_eq!(embed["description"], "ETH above 3000 <1> & \"é\"");
    assert_eq!(embed["fields"][0]["value"], "$3,500.25");
    assert_eq!(embed["fields"][2]["value"], "coingecko:ethereum");
    assert_eq!(
        got.iter().filter(|r| r.path == "/api/webhooks/3/busy").count(),
        3,
        "max_attempts = 3"
    );
    assert_eq!(
        got.iter().filter(|r| r.path == "/api/webhooks/2/gone").count(),
        1,
        "a 404 is not retried"
    );

    let rows = env.rows();
    assert!(
        rows[0].starts_with("discord|http://") && rows[0].ends_with("|delivered|2|"),
        "{rows:?}"
    );
    assert!(rows[1].contains("|failed|1|discord answered HTTP 404"), "{rows:?}");
    assert!(
        rows[2].contains("|failed|3|") && rows[2].contains("gave up after 3 attempt(s)"),
        "{rows:?}"
    );
    let dead = env.dead();
    assert_eq!(dead.len(), 2, "{dead:?}");
    for d in &dead {
        assert!(
            !d["reason"].as_str().unwrap().contains("/api/webhooks"),
            "no webhook URL in reasons: {d}"
        );
    }
    let (counters, histograms) = metrics_of(&snap);
    assert_eq!(counters["llamaflow_notify_sent_total[\"channel=discord\"]"], 1);
    assert_eq!(counters["llamaflow_notify_failed_total[\"channel=discord\"]"], 2);
    assert_eq!(
        counters["llamaflow_notify_retries_total[\"channel=discord\"]"], 3,
        "one 429 + two 503"
    );
    assert_eq!(histograms["llamaflow_notify_request_seconds[\"channel=discord\"]"], 6);
    assert_eq!(histograms["llamaflow_notify_latency_seconds[\"channel=discord\"]"], 1);
    task.abort();
}

fn b64url(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).unwrap()
}

#[tokio::test]
async fn push_signs_in_with_the_service_account_and_removes_unregistered_tokens() {
    let env = Env::start().await;
    let pem = testkit::rsa_key_pem(&env.dir.path().join("key.pem"));
    // The server checks the assertion with the key's public half, as Google does.
    let der = {
        use base64::Engine as _;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).unwrap()
    };
    let public = RsaKeyPair::from_pkcs8(&der).unwrap().public().as_ref().to_vec();
    let token_uri = Arc::new(Mutex::new(String::new()));
    let uri = token_uri.clone();
    let server = Server::start(move |req, before| match req.path.as_str() {
        "/token" => {
            let form: std::collections::HashMap<&str, &str> =
                req.body.split('&').filter_map(|kv| kv.split_once('=')).collect();
            assert_eq!(form["grant_type"], "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer");
            let parts: Vec<&str> = form["assertion"].split('.').collect();
            let signed = format!("{}.{}", parts[0], parts[1]);
            let valid = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &public)
                .verify(signed.as_bytes(), &b64url(parts[2]))
                .is_ok();
            let claims: Value = serde_json::from_slice(&b64url(parts[1])).unwrap();
            let header: Value = serde_json::from_slice(&b64url(parts[0])).unwrap();
            let good = valid
                && header["alg"] == "RS256"
                && claims["iss"] == "fcm@llama-test.iam.gserviceaccount.com"
                && claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
                && claims["aud"] == uri.lock().unwrap().as_str()
                && claims["exp"].as_u64() == claims["iat"].as_u64().map(|t| t + 3600);
            if good {
                ok_json(serde_json::json!({"access_token": "ya29.test", "expires_in": 3599, "token_type": "Bearer"}))
            } else {
                status_json(StatusCode::BAD_REQUEST, serde_json::json!({"error": "invalid_grant"}))
            }
        }
        "/v1/projects/llama-test/messages:send" => {
            if req.headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer ya29.test") {
                return status_json(StatusCode::UNAUTHORIZED, serde_json::json!({"error": {"code": 401}}));
            }
            let token = req.json()["message"]["token"].as_str().unwrap_or("").to_string();
            let earlier = before.iter().filter(|r| r.json()["message"]["token"] == token.as_str()).count();
            match token.as_str() {
                "tok-dead" => status_json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": {"code": 404, "message": "Requested entity was not found.",
                        "status": "NOT_FOUND", "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                        "errorCode": "UNREGISTERED"}]}}),
                ),
                "tok-flaky" if earlier == 0 => (StatusCode::INTERNAL_SERVER_ERROR, vec![], "oops".into()),
                "tok-busy" if earlier == 0 => (
                    StatusCode::TOO_MANY_REQUESTS,
                    vec![("retry-after", "1".into())],
                    serde_json::json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}).to_string(),
                ),
                _ => ok_json(serde_json::json!({"name": "projects/llama-test/messages/0:1"})),
            }
        }
        _ => (StatusCode::NOT_FOUND, vec![], String::new()),
    })
    .await;
    *token_uri.lock().unwrap() = server.url("/token");
    let key = serde_json::json!({
        "type": "service_account",
        "project_id": "llama-test",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "fcm@llama-test.iam.gserviceaccount.com",
        "token_uri": server.url("/token"),
    });
    let key_path = env.dir.path().join("service-account.json");
    std::fs::write(&key_path, key.to_string()).unwrap();
    env.pg.psql(
        "INSERT INTO user_devices (id, user_id, device_token, platform) VALUES \
         ('d1', 'u1', 'tok-ok', 'android'), ('d2', 'u1', 'tok-dead', 'ios'), ('d3', 'u2', 'tok-flaky', 'web'), \
         ('d4', 'u2', 'tok-busy', 'android')",
    );
    let cfg = fast(NotifyConfig {
        push: Some(PushConfig {
            service_account_key: key_path.display().to_string(),
            project_id: None,
            api_base: server.url(""),
            token_uri: None,
            per_second: 100.0,
        }),
        ..NotifyConfig::default()
    });
    let (mut sink, task) = env.sink(cfg).await;
    sink.write(&batch(vec![alert(1, "u1", &["push"]), alert(2, "u2", &["push"])]))
        .await
        .unwrap();
    env.settled(4, Duration::from_secs(20)).await;
    let rows = env.rows();
    assert_eq!(
        rows[0],
        "push|tok-dead|failed|1|fcm: the device token is unregistered (HTTP 404 Not Found); the device was removed from user_devices"
    );
    assert_eq!(rows[1], "push|tok-ok|delivered|1|");
    assert_eq!(rows[2], "push|tok-busy|delivered|2|");
    assert_eq!(rows[3], "push|tok-flaky|delivered|2|");
    assert_eq!(
        env.pg.psql("SELECT string_agg(id, ',' ORDER BY id) FROM user_devices"),
        "d1,d3,d4"
    );
    assert_eq!(env.directory.recipients("u1", Channel::Push).unwrap(), vec!["tok-ok"]);
    let busy: Vec<Instant> = server
        .received()
        .iter()
        .filter(|r| r.json()["message"]["token"] == "tok-busy")
        .map(|r| r.at)
        .collect();
    assert!(
        busy[1] - busy[0] >= Duration::from_millis(950),
        "Retry-After: 1 honoured"
    );
    let sent = server
        .received()
        .into_iter()
        .find(|r| r.json()["message"]["token"] == "tok-ok")
        .unwrap()
        .json();
    assert_eq!(
        sent["message"]["notification"]["title"],
        "ETH above 3k: coingecko:ethereum"
    );
    assert_eq!(sent["message"]["notification"]["body"], "ETH above 3000 <1> & \"é\"");
    assert_eq!(sent["message"]["data"]["alert_id"], format!("{:032x}", 1));
    let dead = env.dead();
    assert_eq!(dead.len(), 1);
    assert!(dead[0]["reason"].as_str().unwrap().contains("unregistered"));

    // A later alert goes to the remaining device only, with the cached access token.
    sink.write(&batch(vec![alert(3, "u1", &["push"])])).await.unwrap();
    env.settled(5, Duration::from_secs(20)).await;
    let got = server.received();
    assert_eq!(
        got.iter().filter(|r| r.path == "/token").count(),
        1,
        "the access token is cached"
    );
    assert_eq!(got.iter().filter(|r| r.path.ends_with("messages:send")).count(), 7);
    task.abort();
}

#[tokio::test]
async fn missing_addresses_and_unconfigured_channels_are_rejected_with_reasons() {
    let env = Env::start().await;
    let server = Server::start(|_, _| ok_json(serde_json::json!({"ok": true}))).await;
    env.user("u1", "telegram_chat_id", "1001");
    let cfg = fast(NotifyConfig {
        telegram: Some(telegram_cfg(server.url(""))),
        ..NotifyConfig::default()
    });
    let (mut sink, task) = env.sink(cfg).await;
    let alerts = vec![
        alert(1, "u1", &["telegram", "websocket", "webhook"]),
        alert(2, "u1", &["email"]),
        alert(3, "u9", &["telegram"]),
        alert(4, "u1", &["push"]),
    ];
    let written = sink.write(&batch(alerts)).await.unwrap();
    let reasons: Vec<&str> = written.rejected.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].contains("email channel, which is not configured"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("\"u9\" is not in the users table"), "{reasons:?}");
    assert!(
        reasons[2].contains("push channel, which is not configured"),
        "{reasons:?}"
    );
    env.settled(1, Duration::from_secs(10)).await;

    // An address that arrives later (the CDC source's job) serves the next alert.
    env.directory.set_user(Contact {
        user_id: "u9".into(),
        telegram_chat_id: Some("9009".into()),
        ..Contact::default()
    });
    let written = sink.write(&batch(vec![alert(5, "u9", &["telegram"])])).await.unwrap();
    assert!(written.rejected.is_empty());
    env.settled(2, Duration::from_secs(10)).await;
    assert_eq!(env.rows()[1], "telegram|9009|delivered|1|");
    task.abort();
}

#[tokio::test]
async fn a_channel_rate_limit_spaces_deliveries_without_dropping_any() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let env = Env::start().await;
    let server = Server::start(|_, _| ok_json(serde_json::json!({"ok": true}))).await;
    for i in 0..8 {
        env.user(&format!("u{i}"), "telegram_chat_id", &format!("{}", 100 + i));
    }
    let cfg = fast(NotifyConfig {
        telegram: Some(TelegramConfig {
            per_second: 4.0,
            ..telegram_cfg(server.url(""))
        }),
        ..NotifyConfig::default()
    });
    let (mut sink, task) = env.sink(cfg).await;
    let alerts = (0..8).map(|i| alert(i, &format!("u{i}"), &["telegram"])).collect();
    sink.write(&batch(alerts)).await.unwrap();
    env.settled(8, Duration::from_secs(20)).await;
    assert_eq!(
        env.count("status = 'delivered' AND attempts = 1"),
        8,
        "{:#?}",
        env.rows()
    );
    let got = server.received();
    assert_eq!(got.len(), 8);
    // A burst of 4, then 4 per second: the last is at least ~1 s after the first.
    let span = got[7].at - got[0].at;
    assert!(span >= Duration::from_millis(900), "{span:?}");
    let (counters, _) = metrics_of(&snap);
    assert!(counters["llamaflow_notify_deferred_total[\"channel=telegram\"]"] >= 4);
    task.abort();
}

#[test]
fn configs_are_checked_with_clear_messages() {
    let ok = NotifyConfig {
        discord: Some(DiscordConfig {
            username: None,
            per_second: 5.0,
        }),
        ..NotifyConfig::default()
    };
    assert!(ok.validate().is_ok());
    let cases: Vec<(NotifyConfig, &str)> = vec![
        (NotifyConfig::default(), "no channel configured"),
        (
            NotifyConfig {
                lease_ms: 1000,
                timeout_ms: 1000,
                ..ok.clone()
            },
            "`lease_ms` (1000) must be more than `timeout_ms`",
        ),
        (
            NotifyConfig {
                telegram: Some(TelegramConfig {
                    bot_token: "".into(),
                    api_base: "https://api.telegram.org".into(),
                    per_second: 1.0,
                }),
                ..ok.clone()
            },
            "[sinks.notify.telegram] `bot_token`",
        ),
        (
            NotifyConfig {
                email: Some(EmailConfig {
                    host: "smtp.example.com".into(),
                    port: None,
                    tls: SmtpTls::Starttls,
                    ca_file: None,
                    username: Some("u".into()),
                    password: None,
                    from: "alerts@example.com".into(),
                    per_second: 1.0,
                }),
                ..ok.clone()
            },
            "set both `username` and `password`",
        ),
        (
            NotifyConfig {
                push: Some(PushConfig {
                    service_account_key: "k.json".into(),
                    project_id: None,
                    api_base: "ftp://x".into(),
                    token_uri: None,
                    per_second: 1.0,
                }),
                ..ok.clone()
            },
            "[sinks.notify.push] `api_base` must be an http(s) URL",
        ),
        (
            NotifyConfig {
                discord: Some(DiscordConfig {
                    username: None,
                    per_second: 0.0,
                }),
                ..NotifyConfig::default()
            },
            "[sinks.notify.discord] `per_second` must be a positive number",
        ),
    ];
    for (cfg, want) in cases {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(want), "{err} (wanted {want})");
    }
    let toml_cfg: NotifyConfig = toml::from_str(
        "link_template = \"https://x/{alert_id}\"\n[email]\nhost = \"smtp.example.com\"\nfrom = \"a@example.com\"\n",
    )
    .unwrap();
    assert_eq!(toml_cfg.email.as_ref().map(|e| e.port()), Some(587));
    assert!(toml_cfg.validate().is_ok());
    assert!(toml::from_str::<NotifyConfig>("[email]\nhost = \"h\"\nfrom = \"a@b.c\"\nsmtp_port = 1\n").is_err());
}
