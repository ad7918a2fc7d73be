//! The live dashboard in a real browser: the real `llamaflow run` binary on the demo feed (sped
//! up, with a JSONL sink so `/readyz` reports a sink) and headless Chromium driven through
//! chromedriver's W3C WebDriver HTTP API (a few JSON requests over a plain TCP socket; no
//! WebDriver crate). The test reads the page's DOM through the hooks documented at the top of
//! `pipeline/assets/dashboard.html` and checks that it is full within 2 s of opening (the
//! server's snapshot frames: prices, TVL, the TVL-by-chain chart), fills the category table and
//! the price sparklines, keeps updating, shows pipeline health (records/s, readiness, sinks) and
//! shows an alert.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`/usr/bin/chromium`, `/usr/bin/chromedriver`;
//! `LLAMAFLOW_CHROMIUM` / `LLAMAFLOW_CHROMEDRIVER` override the paths). Without them the test
//! fails, saying how to install them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const INSTALL: &str = "install them with `apt-get install chromium chromium-driver` (scripts/test.sh does)";

/// Feed seconds per wall-clock second: one feed hour, whose script (minutes 3–12: ETH, BTC and SOL
/// moves, a gas spike, a liquidation cascade) fires the demo rules, plays in a minute.
const SPEED: u32 = 60;

/// Feed minutes replayed at once on start: live data starts at minute 58, so the script's alerts
/// come 5–14 s after start (and again a minute later).
const WARMUP_MINUTES: u32 = 58;

/// How soon after navigation the page must show prices, TVL rows and chain bars: the job has
/// state by then (the warmup), and the WebSocket snapshots carry it, so no waiting for events.
const FULL_WITHIN_MS: f64 = 2000.0;

/// A process this test started, killed with its whole process group when dropped (chromedriver
/// starts Chromium and its helpers in the same group).
struct Proc {
    child: Child,
    group: bool,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.group {
            // SAFETY: kill(2) on the process group of a child this test spawned as group leader.
            unsafe {
                libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
            }
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn binary(var: &str, default: &str, what: &str) -> PathBuf {
    let path = std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.is_file(),
        "{what} not found at {} (set {var} to override): the dashboard test drives headless Chromium; {INSTALL}",
        path.display()
    );
    path
}

/// One HTTP/1.1 request to chromedriver; returns (status, JSON body).
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to chromedriver");
    s.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let (head_len, content_length) = loop {
        let n = s.read(&mut buf).expect("read from chromedriver");
        assert!(n > 0, "chromedriver closed the connection during {method} {path}");
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..i]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            break (i + 4, len);
        }
    };
    match content_length {
        Some(len) => {
            while raw.len() < head_len + len {
                let n = s.read(&mut buf).expect("read from chromedriver");
                assert!(n > 0, "chromedriver closed the connection during {method} {path}");
                raw.extend_from_slice(&buf[..n]);
            }
            raw.truncate(head_len + len);
        }
        None => {
            s.read_to_end(&mut raw).expect("read from chromedriver");
        }
    }
    let head = String::from_utf8_lossy(&raw[..head_len]);
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let value = serde_json::from_slice(&raw[head_len..]).unwrap_or(Value::Null);
    (status, value)
}

/// A WebDriver session on headless Chromium; deleted (Chromium closed) when dropped, before
/// chromedriver's process group is killed.
struct Browser {
    port: u16,
    session: String,
    _driver: Proc,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let chromium = binary("LLAMAFLOW_CHROMIUM", "/usr/bin/chromium", "Chromium");
        let chromedriver = binary("LLAMAFLOW_CHROMEDRIVER", "/usr/bin/chromedriver", "chromedriver");
        let port = testkit::free_port();
        let driver = Proc {
            child: Command::new(&chromedriver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}; {INSTALL}", chromedriver.display())),
            group: true,
        };
        assert!(
            testkit::wait_for_port(port, Duration::from_secs(20)),
            "chromedriver did not listen on {port}"
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while http(port, "GET", "/status", None).1["value"]["ready"] != json!(true) {
            assert!(Instant::now() < deadline, "chromedriver not ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,1000".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": {"binary": chromium.to_str().unwrap(), "args": args},
        }}});
        let (status, v) = http(port, "POST", "/session", Some(&caps));
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("WebDriver new session failed (HTTP {status}): {v}"))
            .to_string();
        let browser = Browser {
            port,
            session,
            _driver: driver,
            _profile: profile,
        };
        // A loaded machine (CI runs other tests' builds beside this) can starve the renderer
        // for a while: wait up to 2 minutes for a script or a page, not WebDriver's 30 s.
        browser.cmd(
            "POST",
            "/timeouts",
            Some(json!({"script": 120_000, "pageLoad": 120_000})),
        );
        browser
    }

    /// A WebDriver command of this session; panics on a WebDriver error.
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("/session/{}{path}", self.session);
        let (status, v) = http(self.port, method, &url, body.as_ref());
        assert!(status == 200, "WebDriver {method} {path} failed (HTTP {status}): {v}");
        v["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page and returns its result.
    fn eval(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({"script": script, "args": []})))
    }

    /// The rendered (visible) text of the first element matching a CSS selector.
    fn text(&self, css: &str) -> String {
        let el = self.cmd("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        let id = el["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {el}"))
            .to_string();
        self.cmd("GET", &format!("/element/{id}/text"), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let path = format!("/session/{}", self.session);
        let _ = std::panic::catch_unwind(|| http(self.port, "DELETE", &path, None));
    }
}

/// Everything the test looks at, read from the DOM in one go.
const SNAPSHOT: &str = r##"
const q = (s) => document.querySelector(s);
const num = (el) => el && el.dataset.value !== undefined ? Number(el.dataset.value) : null;
const text = (el, s) => { const e = el.querySelector(s); return e ? e.textContent : null; };
return {
  since_navigation_ms: performance.now(),
  status: q("#status").dataset.state,
  status_text: q("#status").textContent,
  events_total: num(q("#events-total")),
  prices: [...document.querySelectorAll("#prices tbody tr[data-coin]")].map((tr) => ({
    coin: tr.dataset.coin, symbol: text(tr, ".symbol"), text: text(tr, ".price"),
    price: tr.dataset.price === undefined ? null : Number(tr.dataset.price),
  })),
  tvl_rows: document.querySelectorAll("#tvl tbody tr[data-protocol]").length,
  chain_bars: [...document.querySelectorAll("#chain-chart .chain-bar")].map((g) => ({
    chain: g.dataset.chain, name: g.dataset.name, label: text(g, ".label"), value: text(g, ".value"),
    tvl: g.dataset.tvl === undefined ? null : Number(g.dataset.tvl),
  })),
  categories: [...document.querySelectorAll("#category-table tbody tr.category-row")].map((tr) => ({
    category: tr.dataset.category === undefined ? null : tr.dataset.category, name: text(tr, ".category"),
    text: text(tr, ".tvl"), tvl: tr.dataset.tvl === undefined ? null : Number(tr.dataset.tvl),
  })),
  sparklines: [...document.querySelectorAll("#prices .sparkline")].map((s) => ({
    coin: s.dataset.coin, points: Number(s.dataset.points),
  })),
  alerts: [...document.querySelectorAll("#alerts li[data-alert-id]")].map((li) => ({
    id: li.dataset.alertId, msg: text(li, ".msg"), type: text(li, ".type"),
  })),
  health_state: q("#health-panel").dataset.state,
  health: Object.fromEntries([...document.querySelectorAll("#health [data-metric]")].map((e) => [
    e.dataset.metric, { text: e.textContent, value: num(e), hidden: e.closest("[data-cell]").hidden },
  ])),
  readiness: q("#readiness").dataset.state,
  ready_text: q("#ready-status").textContent,
  sinks: [...document.querySelectorAll("#sinks li[data-sink]")].map((li) => ({
    name: li.dataset.sink, status: li.dataset.status, text: li.textContent,
  })),
};
"##;

/// Polls the page until `ok` holds for a snapshot; fails with the last snapshot.
fn wait_for(browser: &Browser, what: &str, within: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    poll(
        browser,
        what,
        &format!("{within:?}"),
        Duration::from_millis(250),
        |_| Instant::now() >= deadline,
        ok,
    )
}

/// Polls the page every `every` until `ok` holds for a snapshot; fails with the last snapshot
/// (which did not satisfy `ok`) once `expired` holds for it.
fn poll(
    browser: &Browser,
    what: &str,
    within: &str,
    every: Duration,
    expired: impl Fn(&Value) -> bool,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    loop {
        let snap = browser.eval(SNAPSHOT);
        if ok(&snap) {
            return snap;
        }
        assert!(
            !expired(&snap),
            "dashboard: no {what} within {within}; page state: {snap:#}"
        );
        std::thread::sleep(every);
    }
}

/// Milliseconds since the page's navigation started (its `performance.now()`) when the snapshot
/// was read.
fn since_navigation_ms(snap: &Value) -> f64 {
    snap["since_navigation_ms"].as_f64().unwrap_or(f64::INFINITY)
}

fn rows(snap: &Value, key: &str) -> usize {
    snap[key].as_array().map_or(0, Vec::len)
}

/// A short USD amount as the page shows TVL: `$12.3B`, `$12.34B`, `$456M`, `$1.2T`, `$980`.
fn is_short_usd(text: &str) -> bool {
    let Some(rest) = text.strip_prefix('$') else {
        return false;
    };
    let digits = rest.strip_suffix(['K', 'M', 'B', 'T']).unwrap_or(rest);
    !digits.is_empty() && digits.parse::<f64>().is_ok_and(f64::is_finite)
}

/// `$1,234.56` / `$0.9981` → the number.
fn shown_number(text: &str) -> Option<f64> {
    text.trim().trim_start_matches('$').replace(',', "").parse().ok()
}

fn numeric_prices(snap: &Value) -> Vec<(String, f64)> {
    snap["prices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let shown = shown_number(p["text"].as_str()?)?;
            let price = p["price"].as_f64()?;
            (shown > 0.0 && price > 0.0).then(|| (p["coin"].as_str().unwrap_or("").to_string(), price))
        })
        .collect()
}

fn metric(snap: &Value, key: &str) -> Option<f64> {
    snap["health"][key]["value"].as_f64()
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    let r = testkit::http_get(port, path);
    (r.status, r.body)
}

/// Waits until the job is ready (`/readyz` 200) and its live state (SPEC §8, what the WebSocket
/// snapshots carry) holds the warmup's chains, categories, protocols and prices; panics with what
/// was missing.
fn wait_for_live_state(port: u16, within: Duration, log: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    let non_empty = |path: &str| {
        let (code, body) = http_get(port, path);
        code == 200 && serde_json::from_str::<Value>(&body).is_ok_and(|v| v.as_array().is_some_and(|a| !a.is_empty()))
    };
    loop {
        let missing: Vec<&str> = [
            ("/readyz", http_get(port, "/readyz").0 == 200),
            ("/v2/chains", non_empty("/v2/chains")),
            ("/categories", non_empty("/categories")),
            ("/protocols", non_empty("/protocols")),
            ("/prices/current/coingecko:ethereum", {
                let (code, body) = http_get(port, "/prices/current/coingecko:ethereum");
                code == 200
                    && serde_json::from_str::<Value>(&body)
                        .is_ok_and(|v| v["coins"]["coingecko:ethereum"]["price"].as_f64().is_some())
            }),
        ]
        .into_iter()
        .filter_map(|(path, ok)| (!ok).then_some(path))
        .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "llamaflow run: no live state within {within:?} (not ready or empty: {missing:?}); log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_llamaflow(dir: &Path, port: u16) -> Proc {
    let config = dir.join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [sources.demo]\nspeed = {SPEED}.0\nwarmup_minutes = {WARMUP_MINUTES}\nseed = 42\nrules = true\n\n\
             [sinks]\nstdout = false\n\n\
             [sinks.websocket]\nallow_anonymous = true\n\n[sinks.websocket.api_keys]\ndemo = \"demo\"\n\n\
             [sinks.jsonl]\nalerts = \"{}\"\nevents = \"{}\"\n",
            dir.join("alerts.jsonl").display(),
            dir.join("events.jsonl").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("llamaflow.log")).unwrap();
    Proc {
        child: Command::new(env!("CARGO_BIN_EXE_llamaflow"))
            .args(["run", "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
        group: false,
    }
}

#[test]
fn dashboard_shows_live_data_and_pipeline_health_in_headless_chromium() {
    // Fail first, and clearly, when the browser is missing.
    binary("LLAMAFLOW_CHROMIUM", "/usr/bin/chromium", "Chromium");
    binary("LLAMAFLOW_CHROMEDRIVER", "/usr/bin/chromedriver", "chromedriver");

    // The browser first (a few seconds), so the page is there as soon as the job listens.
    let t0 = Instant::now();
    let browser = Browser::start();
    eprintln!("Chromium session up after {:?}", t0.elapsed());

    let dir = tempfile::tempdir().unwrap();
    let port = testkit::free_port();
    let _llamaflow = start_llamaflow(dir.path(), port);
    let started = Instant::now();
    let log = || std::fs::read_to_string(dir.path().join("llamaflow.log")).unwrap_or_default();
    assert!(
        testkit::wait_for_port(port, Duration::from_secs(30)),
        "llamaflow run did not listen on {port}; log:\n{}",
        log()
    );
    // The server up and the warmup ingested before the page opens: the 2 s below are the page's.
    wait_for_live_state(port, Duration::from_secs(30), log);
    eprintln!("live state served {:?} after the job started", started.elapsed());
    browser.goto(&format!("http://127.0.0.1:{port}/"));

    // 0. Full the moment it opens: within 2 s of navigation (the page's own clock), the snapshot
    // frames have filled the prices and TVL tables and drawn the TVL-by-chain chart.
    let full = poll(
        &browser,
        "price rows, TVL rows and chain bars",
        &format!("{FULL_WITHIN_MS} ms of navigation"),
        Duration::from_millis(25),
        |s| since_navigation_ms(s) > FULL_WITHIN_MS,
        |s| rows(s, "prices") > 0 && s["tvl_rows"].as_u64() > Some(0) && rows(s, "chain_bars") > 0,
    );
    assert!(
        since_navigation_ms(&full) <= FULL_WITHIN_MS,
        "dashboard full only {} ms after navigation (want ≤ {FULL_WITHIN_MS}); page state: {full:#}",
        since_navigation_ms(&full)
    );
    eprintln!(
        "page full {:.0} ms after navigation: {} prices, {} TVL rows, {} chain bars, {} categories, {} sparklines",
        since_navigation_ms(&full),
        rows(&full, "prices"),
        full["tvl_rows"],
        rows(&full, "chain_bars"),
        rows(&full, "categories"),
        rows(&full, "sparklines")
    );
    // The chart: the top chains (at most 12), largest first, each with its name and a short USD value.
    let bars = full["chain_bars"].as_array().unwrap();
    assert!(bars.len() <= 12, "more than 12 chain bars: {full:#}");
    for bar in bars {
        assert!(
            !bar["chain"].as_str().unwrap_or("").is_empty(),
            "bar without data-chain: {bar}"
        );
        assert!(
            !bar["label"].as_str().unwrap_or("").trim().is_empty(),
            "bar without a name: {bar}"
        );
        assert!(
            is_short_usd(bar["value"].as_str().unwrap_or("")),
            "bar value not like $12.3B: {bar}"
        );
        assert!(
            bar["tvl"].as_f64().is_some_and(|t| t >= 0.0),
            "bar without data-tvl: {bar}"
        );
    }
    let tvls: Vec<f64> = bars.iter().filter_map(|b| b["tvl"].as_f64()).collect();
    assert!(
        tvls.windows(2).all(|w| w[0] >= w[1]),
        "chain bars not by TVL descending: {tvls:?}"
    );

    // The category table and the sparklines (one per priced coin, from the snapshot point on).
    let filled = wait_for(
        &browser,
        "category rows and price sparklines",
        Duration::from_secs(10),
        |s| rows(s, "categories") > 0 && rows(s, "sparklines") > 0,
    );
    for cat in filled["categories"].as_array().unwrap() {
        let name = cat["name"].as_str().unwrap_or("").trim();
        assert!(!name.is_empty(), "category row without a name: {cat}");
        if cat["category"] == "" {
            assert_eq!(name, "Uncategorised", "{cat}");
        }
        assert!(is_short_usd(cat["text"].as_str().unwrap_or("")), "category TVL: {cat}");
    }
    let cat_tvls: Vec<f64> = filled["categories"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["tvl"].as_f64())
        .collect();
    assert!(
        cat_tvls.windows(2).all(|w| w[0] >= w[1]),
        "categories not by TVL descending: {cat_tvls:?}"
    );
    assert!(
        filled["sparklines"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["points"].as_u64().is_some_and(|n| (1..=60).contains(&n))),
        "sparklines hold 1..=60 points each: {filled:#}"
    );

    // 1. Connected, and the price table shows coins with numeric prices.
    let first = wait_for(
        &browser,
        "connection and numeric prices",
        Duration::from_secs(30),
        |s| s["status"] == "connected" && numeric_prices(s).len() >= 5,
    );
    let status = browser.text("#status");
    assert!(status.starts_with("connected"), "visible status: {status:?}");
    eprintln!(
        "page connected with {} priced coins {:?} after the job started",
        numeric_prices(&first).len(),
        started.elapsed()
    );

    // 2. It keeps updating: read again a few seconds later.
    std::thread::sleep(Duration::from_secs(4));
    let second = browser.eval(SNAPSHOT);
    let before: std::collections::BTreeMap<_, _> = numeric_prices(&first).into_iter().collect();
    let changed = numeric_prices(&second)
        .iter()
        .filter(|(coin, p)| before.get(coin).is_some_and(|b| b != p))
        .count();
    let (e1, e2) = (first["events_total"].as_f64(), second["events_total"].as_f64());
    assert!(
        changed > 0 || e2 > e1,
        "the page did not change in 4 s: events {e1:?} -> {e2:?}, no price changed; page: {second:#}"
    );
    assert!(second["tvl_rows"].as_u64() > Some(0), "TVL table empty: {second:#}");
    // A changed price came as a price_update event, which the coin's sparkline took as a point.
    let most_points = second["sparklines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["points"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(
        changed == 0 || most_points >= 2,
        "{changed} prices changed but no sparkline has 2 points: {second:#}"
    );
    eprintln!("after 4 s: {changed} prices changed, events {e1:?} -> {e2:?}, sparklines up to {most_points} points");

    // 3. Pipeline health: records/s > 0 from /metrics, readiness and the sink from /readyz.
    let health = wait_for(&browser, "pipeline health", Duration::from_secs(30), |s| {
        metric(s, "records_in_rate").is_some_and(|r| r > 0.0)
            && metric(s, "records_in_total").is_some_and(|r| r > 0.0)
            && s["health_state"] == "ok"
            && s["readiness"] == "ok"
            && s["sinks"].as_array().is_some_and(|v| !v.is_empty())
    });
    assert!(
        shown_number(health["health"]["records_in_rate"]["text"].as_str().unwrap_or("")).is_some_and(|r| r > 0.0),
        "records/s as shown: {:#}",
        health["health"]["records_in_rate"]
    );
    assert_eq!(metric(&health, "dead_letters_total"), Some(0.0), "{health:#}");
    assert_eq!(metric(&health, "sink_failures_total"), Some(0.0), "{health:#}");
    assert!(
        health["ready_text"].as_str().unwrap_or("").contains("ready"),
        "{health:#}"
    );
    let sinks: Vec<(&str, &str)> = health["sinks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| (s["name"].as_str().unwrap_or(""), s["status"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        sinks,
        [("dead_letters", "ok"), ("jsonl", "ok")],
        "sinks as /readyz reports them (the dead-letter output is one): {health:#}"
    );
    for lag in ["kafka_lag", "cdc_lag_bytes"] {
        assert_eq!(
            health["health"][lag]["hidden"], true,
            "no {lag} without that source: {health:#}"
        );
    }
    let (code, readyz) = http_get(port, "/readyz");
    assert_eq!(code, 200, "{readyz}");

    // 4. An alert of user `demo` appears in the alerts panel, and the alert counters follow.
    // The feed's hourly script fires the demo rules once a minute at this speed.
    let alerted = wait_for(&browser, "alert in the alerts panel", Duration::from_secs(150), |s| {
        s["alerts"].as_array().is_some_and(|a| !a.is_empty())
    });
    let alert = &alerted["alerts"][0];
    assert_eq!(alert["id"].as_str().map(str::len), Some(32), "{alert}");
    assert!(!alert["msg"].as_str().unwrap_or("").is_empty(), "{alert}");
    eprintln!(
        "alert shown {:?} after the job started: {}",
        started.elapsed(),
        alert["msg"]
    );
    let counted = wait_for(&browser, "alerts counted in health", Duration::from_secs(10), |s| {
        metric(s, "alerts_total").is_some_and(|n| n > 0.0)
    });
    assert!(metric(&counted, "alerts_rate").is_some(), "{counted:#}");
    assert_eq!(browser.eval("return document.title;"), json!("llamaflow · live"));
}
