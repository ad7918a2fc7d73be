//! The live state (SPEC §8) end to end with the real binary: the read API checked over HTTP by
//! an independent Python client against sums computed here from the input, CDC metadata
//! changes and deletes seen live, WebSocket snapshots that — with the events after them —
//! rebuild exactly what the API answers, and `replay --state-out` identical for 1, 2 and 3
//! workers.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Job, psql, wait_until};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const T0: i64 = 1_717_372_800; // 2024-06-03T00:00:00Z

/// (status, x-llamaflow-as-of, JSON body) of a GET on loopback.
fn get(port: u16, path: &str) -> (u16, i64, Value) {
    let r = testkit::http_get(port, path);
    let as_of = r.header("x-llamaflow-as-of").and_then(|v| v.parse().ok()).unwrap_or(-1);
    (r.status, as_of, serde_json::from_str(&r.body).unwrap_or(Value::Null))
}

fn write_lines(path: &Path, lines: &[Value]) {
    let mut f = std::fs::File::create(path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

fn tvl(p: &str, chain: &str, v: f64, t: i64) -> Value {
    json!({"protocol_id": p, "chain": chain, "tvl": v, "timestamp": t})
}

fn start(config: &Path) -> Job {
    Job(Command::new(env!("CARGO_BIN_EXE_llamaflow"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("LLAMAFLOW_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("llamaflow starts"))
}

/// Σ of USD amounts as the contract defines them: exact in micro-USD.
fn sum(values: &[f64]) -> f64 {
    values.iter().map(|v| (v * 1e6).round() as i128).sum::<i128>() as f64 / 1e6
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(1.0)
}

fn python() -> String {
    "python3".into()
}

/// The Python client's reading of every read-API path.
fn python_check(port: u16, key: &str) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/read_api_check.py");
    let out = Command::new(python())
        .arg(&script)
        .args([&port.to_string(), key])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "read_api_check.py: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).expect("checker output is JSON")
}

#[test]
fn read_api_over_http_follows_history_and_cdc_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let pg = common::migrated_postgres();
    psql(
        &pg,
        r#"INSERT INTO protocols (id, name, symbol, slug, category, chains) VALUES
           ('1', 'Aave V3', 'AAVE', 'aave-v3', 'Lending', '["ethereum", "arbitrum"]'),
           ('2', 'Uniswap V3', 'UNI', 'uniswap-v3', 'Dexes', '["ethereum", "arbitrum"]'),
           ('3', 'Lido', 'LDO', 'lido', 'Liquid Staking', '["ethereum"]');
           INSERT INTO api_keys (key, user_id) VALUES ('k1', 'u1'), ('k2', 'u2');"#,
    );
    // Three days of hourly TVL: protocols 1–3 with metadata, 4 without; a sub-bucket that
    // never counts; one rule per user.
    let hours = 72;
    let series = |p: &str, chain: &str, base: f64, h: i64| {
        base * (1.0 + 0.01 * ((h * 7 + p.len() as i64 + chain.len() as i64) % 11) as f64)
    };
    let plan: [(&str, &str, f64); 7] = [
        ("1", "ethereum", 20.0e9),
        ("1", "arbitrum", 1.5e9),
        ("1", "ethereum-staking", 9.9e9),
        ("2", "ethereum", 3.0e9),
        ("2", "arbitrum", 0.5e9),
        ("3", "ethereum", 25.0e9),
        ("4", "bsc", 0.25e9),
    ];
    let mut lines = Vec::new();
    let mut latest: BTreeMap<(&str, &str), f64> = BTreeMap::new();
    for h in 0..hours {
        for (p, chain, base) in plan {
            let v = (series(p, chain, base, h) * 100.0).round() / 100.0;
            lines.push(tvl(p, chain, v, T0 + h * 3600));
            latest.insert((p, chain), v);
        }
    }
    let last_ts = T0 + (hours - 1) * 3600;
    write_lines(&dir.path().join("tvl.jsonl"), &lines);
    write_lines(
        &dir.path().join("prices.jsonl"),
        &[
            json!({"coin": "coingecko:ethereum", "price": 3500.5, "timestamp": last_ts, "symbol": "ETH", "confidence": 0.99, "decimals": 18}),
        ],
    );
    write_lines(
        &dir.path().join("rules.jsonl"),
        &[
            json!({"id": "r1", "user_id": "u1", "alert_type": "tvl_change", "throttle_minutes": 0,
                "conditions": {"protocol_id": "1", "window": "1h", "threshold_pct": 1, "direction": "any"}}),
            json!({"id": "r2", "user_id": "u2", "alert_type": "tvl_change", "throttle_minutes": 0,
                "conditions": {"protocol_id": "3", "window": "1h", "threshold_pct": 1, "direction": "any"}}),
        ],
    );
    let port = testkit::free_port();
    let config = dir.path().join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[pipeline]
listen = "127.0.0.1:{port}"
checkpoint_dir = ""

[[sources.files]]
kind = "rules"
path = "{d}/rules.jsonl"

[[sources.files]]
kind = "tvl"
path = "{d}/tvl.jsonl"

[[sources.files]]
kind = "prices"
path = "{d}/prices.jsonl"

[sources.postgres_cdc]
url = "{pg}"
slot = "readapi"
poll_interval_ms = 50
tables = ["protocols", "api_keys"]

[sinks]
stdout = false
"#,
            d = dir.path().display(),
            pg = pg.url(),
        ),
    )
    .unwrap();
    let _job = start(&config);
    wait_until("the history in the read view", Duration::from_secs(60), || {
        get(port, "/v2/chains").1 == last_ts * 1000
    });

    // Independent sums from the input.
    let chain_sum = |chain: &str| {
        sum(&latest
            .iter()
            .filter(|((_, c), _)| *c == chain)
            .map(|(_, v)| *v)
            .collect::<Vec<_>>())
    };
    let total = |p: &str| {
        let values: Vec<f64> = latest
            .iter()
            .filter(|((q, c), _)| *q == p && !c.ends_with("-staking"))
            .map(|(_, v)| *v)
            .collect();
        sum(&values)
    };
    let seen = python_check(port, "k1");
    let chains = &seen["chains"];
    assert_eq!(chains.as_object().unwrap().len(), 3, "{chains}");
    for (name, key) in [("Ethereum", "ethereum"), ("Arbitrum", "arbitrum"), ("BSC", "bsc")] {
        let got = chains[name].as_f64().unwrap_or_else(|| panic!("{name} in {chains}"));
        assert!(close(got, chain_sum(key)), "{name}: {got} vs {}", chain_sum(key));
    }
    assert_eq!(seen["chain_meta"]["Ethereum"], json!(["ethereum", "ETH", 1]));
    let cats = &seen["categories"];
    for (cat, ids) in [
        ("Lending", ["1"]),
        ("Dexes", ["2"]),
        ("Liquid Staking", ["3"]),
        ("None", ["4"]),
    ] {
        let want = sum(&ids.iter().map(|p| total(p)).collect::<Vec<_>>());
        assert!(
            close(cats[cat][0].as_f64().unwrap(), want),
            "{cat}: {} vs {want}",
            cats[cat]
        );
        assert_eq!(cats[cat][1], 1, "{cat}");
    }
    assert_eq!(seen["protocols"]["1"]["symbol"], "AAVE");
    assert_eq!(seen["protocols"]["1"]["slug"], "aave-v3");
    assert_eq!(
        seen["protocols"]["4"]["category"],
        Value::Null,
        "no metadata, no category"
    );
    assert!(
        seen["protocols"]["1"]["chainTvls"].get("ethereum-staking").is_none(),
        "sub-buckets are not chains: {}",
        seen["protocols"]["1"]
    );
    assert_eq!(seen["protocol_pages"]["aave-v3"]["points"], hours, "one point per hour");
    assert_eq!(
        seen["chain_history"]["Ethereum"].as_array().unwrap().len(),
        3,
        "one point per UTC day"
    );
    assert_eq!(seen["total_history"].as_array().unwrap().len(), 3);
    assert_eq!(seen["prices"]["coingecko:ethereum"]["price"], 3500.5);
    let alerts = seen["alerts"].as_array().unwrap();
    assert!(!alerts.is_empty(), "user u1 has tvl_change alerts");
    assert!(
        alerts.iter().all(|a| a[1] == "u1"),
        "only the key's user's alerts: {alerts:?}"
    );

    // A category change through CDC moves every aggregate at once, live, within a second.
    let before = get(port, "/categories").2;
    let lending = before
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["category"] == "Lending")
        .cloned();
    assert!(lending.is_some(), "{before}");
    let changed = Instant::now();
    psql(&pg, "UPDATE protocols SET category = 'Dexes' WHERE id = '1'");
    wait_until("the category change", Duration::from_secs(10), || {
        let cats = get(port, "/categories").2;
        let cats = cats.as_array().cloned().unwrap_or_default();
        cats.iter().all(|c| c["category"] != "Lending")
            && cats.iter().any(|c| {
                c["category"] == "Dexes"
                    && c["protocols"] == 2
                    && close(c["tvl"].as_f64().unwrap(), total("1") + total("2"))
            })
    });
    let took = changed.elapsed();
    assert!(
        took <= Duration::from_secs(1),
        "CDC category change visible after {took:?}"
    );
    let protocols = get(port, "/protocols").2;
    let p1 = protocols.as_array().unwrap().iter().find(|p| p["id"] == "1").unwrap();
    assert_eq!(p1["category"], "Dexes");

    // A deleted protocol leaves every aggregate and the protocol list.
    let deleted = Instant::now();
    psql(&pg, "DELETE FROM protocols WHERE id = '2'");
    wait_until("the protocol delete", Duration::from_secs(10), || {
        let (_, _, chains) = get(port, "/v2/chains");
        let eth = chains
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "Ethereum").cloned())
            .and_then(|c| c["tvl"].as_f64())
            .unwrap_or(0.0);
        close(eth, chain_sum("ethereum") - latest[&("2", "ethereum")])
    });
    let took = deleted.elapsed();
    assert!(took <= Duration::from_secs(1), "CDC delete visible after {took:?}");
    let (_, _, protocols) = get(port, "/protocols");
    assert!(
        protocols.as_array().unwrap().iter().all(|p| p["id"] != "2"),
        "{protocols}"
    );
    let (_, _, cats) = get(port, "/categories");
    let dexes = cats
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["category"] == "Dexes")
        .unwrap();
    assert_eq!(dexes["protocols"], 1, "{cats}");
    assert!(close(dexes["tvl"].as_f64().unwrap(), total("1")));
    let (_, _, arb) = get(port, "/v2/historicalChainTvl/arbitrum");
    let last = arb.as_array().unwrap().last().unwrap()["tvl"].as_f64().unwrap();
    assert!(
        close(last, latest[&("1", "arbitrum")]),
        "arbitrum is protocol 1 alone now: {last}"
    );
    assert_eq!(get(port, "/protocol/uniswap-v3").0, 404);
    // The answers stay well-formed after the changes.
    python_check(port, "k2");
}

/// Client-side state rebuilt from snapshot + events, per channel: key → `data`.
#[derive(Default, Debug)]
struct ClientState {
    chains: BTreeMap<String, Value>,
    categories: BTreeMap<String, Value>,
    prices: BTreeMap<String, Value>,
    tvl: BTreeMap<String, Value>,
    /// Price timestamps per coin in the order they arrived (snapshot first).
    price_times: BTreeMap<String, Vec<i64>>,
    snapshots: usize,
}

impl ClientState {
    fn apply(&mut self, channel: &str, d: &Value) {
        let s = |k: &str| d[k].as_str().map(str::to_string).unwrap_or_else(|| "null".into());
        match channel {
            "chains" => {
                if d["protocols"] == 0 {
                    self.chains.remove(&s("chain"));
                } else {
                    self.chains.insert(s("chain"), d.clone());
                }
            }
            "categories" => {
                if d["protocols"] == 0 {
                    self.categories.remove(&s("category"));
                } else {
                    self.categories.insert(s("category"), d.clone());
                }
            }
            "prices" => {
                self.price_times
                    .entry(s("coin"))
                    .or_default()
                    .push(d["timestamp"].as_i64().unwrap());
                self.prices.insert(s("coin"), d.clone());
            }
            "tvl" => {
                self.tvl.insert(s("protocol_id"), d.clone());
            }
            _ => {}
        }
    }

    fn frame(&mut self, f: &Value) {
        let channel = f["channel"].as_str().unwrap_or_default().to_string();
        match f["type"].as_str() {
            Some("snapshot") => {
                self.snapshots += 1;
                for d in f["data"].as_array().unwrap() {
                    self.apply(&channel, d);
                }
            }
            Some("subscribed" | "pong") | None => {}
            Some(_) => self.apply(&channel, &f["data"]),
        }
    }

    /// Whether this state is what the API answers now.
    fn matches_api(&self, port: u16) -> Result<(), String> {
        let (_, _, chains) = get(port, "/v2/chains");
        let api: BTreeMap<String, f64> = chains
            .as_array()
            .ok_or("no /v2/chains")?
            .iter()
            .map(|c| (c["name"].as_str().unwrap().to_string(), c["tvl"].as_f64().unwrap()))
            .collect();
        let mine: BTreeMap<String, f64> = self
            .chains
            .values()
            .map(|d| (d["name"].as_str().unwrap().to_string(), d["tvl"].as_f64().unwrap()))
            .collect();
        if api != mine {
            return Err(format!("chains: api {api:?} vs client {mine:?}"));
        }
        let (_, _, cats) = get(port, "/categories");
        let api: BTreeMap<String, Value> = cats
            .as_array()
            .ok_or("no /categories")?
            .iter()
            .map(|c| (c["category"].as_str().unwrap_or("null").to_string(), c.clone()))
            .collect();
        if api != self.categories {
            return Err(format!("categories: api {api:?} vs client {:?}", self.categories));
        }
        let coins: Vec<&str> = self.prices.keys().map(String::as_str).collect();
        let (_, _, prices) = get(port, &format!("/prices/current/{}", coins.join(",")));
        for (coin, d) in &self.prices {
            if prices["coins"][coin]["price"] != d["price"] {
                return Err(format!("{coin}: api {} vs client {}", prices["coins"][coin], d));
            }
        }
        let (_, _, protocols) = get(port, "/protocols");
        let api: BTreeMap<String, Value> = protocols
            .as_array()
            .ok_or("no /protocols")?
            .iter()
            .map(|p| (p["id"].as_str().unwrap().to_string(), p["tvl"].clone()))
            .collect();
        let mine: BTreeMap<String, Value> = self.tvl.iter().map(|(k, d)| (k.clone(), d["tvl"].clone())).collect();
        if api != mine {
            return Err(format!("protocols: api {api:?} vs client {mine:?}"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_plus_later_events_rebuild_the_read_state() {
    let dir = tempfile::tempdir().unwrap();
    let (tvl_path, prices_path) = (dir.path().join("tvl.jsonl"), dir.path().join("prices.jsonl"));
    std::fs::write(&tvl_path, "").unwrap();
    std::fs::write(&prices_path, "").unwrap();
    write_lines(
        &dir.path().join("protocols.jsonl"),
        &(0..6)
            .map(|p| json!({"id": p.to_string(), "name": format!("P{p}"), "category": (["Lending", "Dexes", "Yield"][p % 3])}))
            .collect::<Vec<_>>(),
    );
    let port = testkit::free_port();
    let config = dir.path().join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{port}\"\ncheckpoint_dir = \"\"\nbatch_ms = 5\n\n\
             [[sources.files]]\nkind = \"protocols\"\npath = \"{d}/protocols.jsonl\"\n\n\
             [[sources.files]]\nkind = \"tvl\"\npath = \"{d}/tvl.jsonl\"\nfollow = true\n\n\
             [[sources.files]]\nkind = \"prices\"\npath = \"{d}/prices.jsonl\"\nfollow = true\n\n\
             [sinks]\nstdout = false\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let _job = start(&config);
    let chains = ["ethereum", "arbitrum", "bsc", "base"];
    // Record i: a TVL of protocol i % 6 on a chain, and a price of coin i % 5, at T0 + i.
    let record = move |i: i64| {
        let v = 1.0e6 + ((i * 7919) % 1000) as f64 * 1000.0 + if i % 13 == 0 { 0.0 } else { 0.25 };
        (
            tvl(&(i % 6).to_string(), chains[(i % 4) as usize], v, T0 + i),
            json!({"coin": format!("coingecko:c{}", i % 5), "price": 1.0 + i as f64 / 100.0, "timestamp": T0 + i}),
        )
    };
    let append = |from: i64, to: i64| {
        let mut t = std::fs::OpenOptions::new().append(true).open(&tvl_path).unwrap();
        let mut p = std::fs::OpenOptions::new().append(true).open(&prices_path).unwrap();
        for i in from..to {
            let (a, b) = record(i);
            writeln!(t, "{a}").unwrap();
            writeln!(p, "{b}").unwrap();
        }
    };
    append(0, 200);
    wait_until("the first records", Duration::from_secs(30), || {
        get(port, "/v2/chains").1 == (T0 + 199) * 1000
    });
    // A writer keeps appending while the client subscribes mid-stream.
    let writer = {
        let (tvl_path, prices_path) = (tvl_path.clone(), prices_path.clone());
        std::thread::spawn(move || {
            for chunk in 0..40 {
                let mut t = std::fs::OpenOptions::new().append(true).open(&tvl_path).unwrap();
                let mut p = std::fs::OpenOptions::new().append(true).open(&prices_path).unwrap();
                for i in 200 + chunk * 10..210 + chunk * 10 {
                    let (a, b) = record(i);
                    writeln!(t, "{a}").unwrap();
                    writeln!(p, "{b}").unwrap();
                }
                drop((t, p));
                std::thread::sleep(Duration::from_millis(15));
            }
        })
    };
    // Subscribe once the writer's records are arriving: mid-stream.
    wait_until("the writer's first records", Duration::from_secs(30), || {
        get(port, "/v2/chains").1 > (T0 + 199) * 1000
    });
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
        .await
        .unwrap();
    ws.send(Message::text(
        json!({"type": "subscribe", "channels": ["chains", "categories", "prices", "tvl"]}).to_string(),
    ))
    .await
    .unwrap();
    let mut state = ClientState::default();
    let mut first: Vec<String> = Vec::new();
    // subscribed, then the four snapshots, before any event.
    while first.len() < 5 {
        let t = match ws.next().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            other => panic!("connection closed: {other:?}"),
        };
        let f: Value = serde_json::from_str(&t).unwrap();
        first.push(f["type"].as_str().unwrap().to_string());
        state.frame(&f);
    }
    assert_eq!(first, ["subscribed", "snapshot", "snapshot", "snapshot", "snapshot"]);
    writer.join().unwrap();
    let end = (T0 + 599) * 1000;
    wait_until("the last records", Duration::from_secs(30), || {
        get(port, "/v2/chains").1 == end
    });
    // Read frames until the client state equals the API's (it must, once the client has every
    // event up to the API's as_of).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match state.matches_api(port) {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "client state never matched the API: {e}"),
        }
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            if let Message::Text(t) = m {
                state.frame(&serde_json::from_str(&t).unwrap());
            }
        }
    }
    assert_eq!(state.snapshots, 4);
    assert_eq!(state.chains.len(), 4, "{:?}", state.chains);
    // No duplicate and no stale frame: each coin's ticks arrive once, newest last.
    for (coin, times) in &state.price_times {
        assert!(times.windows(2).all(|w| w[0] < w[1]), "{coin}: {times:?}");
    }
    // Nothing more comes: the input has ended and every epoch was delivered once.
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(300), ws.next()).await {
        assert!(!m.is_text(), "no frame after the last epoch: {m:?}");
    }
}

#[test]
fn replay_state_out_is_identical_for_any_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let chains = ["ethereum", "arbitrum", "bsc", "optimism", "ethereum-staking"];
    let mut tvl_lines = Vec::new();
    let mut latest: BTreeMap<(i64, &str), f64> = BTreeMap::new();
    for i in 0..3000i64 {
        let (p, c) = (i % 17, chains[(i % 5) as usize]);
        let v = ((i * 104_729) % 10_000_000) as f64 / 100.0;
        tvl_lines.push(tvl(&p.to_string(), c, v, T0 + i * 60));
        latest.insert((p, c), v);
    }
    write_lines(&dir.path().join("tvl.jsonl"), &tvl_lines);
    write_lines(
        &dir.path().join("protocols.jsonl"),
        &(0..12)
            .map(|p| json!({"id": p.to_string(), "name": format!("P{p}"), "slug": format!("p-{p}"), "category": (["Lending", "Dexes", "CDP"][p % 3])}))
            .collect::<Vec<_>>(),
    );
    write_lines(
        &dir.path().join("prices.jsonl"),
        &(0..500)
            .map(|i| json!({"coin": format!("coingecko:c{}", i % 7), "price": 1.0 + i as f64, "timestamp": T0 + i}))
            .collect::<Vec<_>>(),
    );
    let mut outputs = Vec::new();
    for workers in 1..=3 {
        let out = dir.path().join(format!("state-{workers}.json"));
        let status = Command::new(env!("CARGO_BIN_EXE_llamaflow"))
            .args(["replay", "--quiet", "--workers", &workers.to_string()])
            .args(["--tvl", dir.path().join("tvl.jsonl").to_str().unwrap()])
            .args(["--protocols", dir.path().join("protocols.jsonl").to_str().unwrap()])
            .args(["--prices", dir.path().join("prices.jsonl").to_str().unwrap()])
            .args(["--alerts-out", dir.path().join("alerts.jsonl").to_str().unwrap()])
            .args(["--state-out", out.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success());
        outputs.push(std::fs::read_to_string(&out).unwrap());
    }
    assert_eq!(outputs[0], outputs[1], "1 vs 2 workers");
    assert_eq!(outputs[0], outputs[2], "1 vs 3 workers");
    let doc: Value = serde_json::from_str(&outputs[0]).unwrap();
    assert_eq!(doc["as_of"], (T0 + 2999 * 60) * 1000);
    for chain in ["ethereum", "arbitrum", "bsc", "optimism"] {
        let want = sum(&latest
            .iter()
            .filter(|((_, c), _)| *c == chain)
            .map(|(_, v)| *v)
            .collect::<Vec<_>>());
        let name = schemas::chains::display_name(chain);
        let got = doc["chains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {}", doc["chains"]));
        assert!(close(got["tvl"].as_f64().unwrap(), want), "{chain}: {got} vs {want}");
    }
    let uncategorised = doc["categories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["category"].is_null())
        .expect("protocols 12–16 have no metadata");
    assert_eq!(uncategorised["protocols"], 5);
    assert_eq!(doc["prices"]["coins"].as_object().unwrap().len(), 7);
    assert_eq!(doc["protocols"].as_array().unwrap().len(), 17);
}

/// Under load (the bench's mixed workload: every kind, many epochs in flight) each coin's
/// price events come out in event-time order, and the view ends on each coin's last tick, for
/// 1 and 2 workers. Timely may deliver an epoch's batches in any order; before the output
/// stage put them back in order, thousands of price events came out behind a newer one and
/// the view kept stale prices.
#[test]
fn price_events_and_the_view_keep_each_coins_order_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mixed");
    let status = Command::new(env!("CARGO_BIN_EXE_llamaflow-bench"))
        .args([
            "--workload",
            "mixed",
            "--records",
            "200000",
            "--coins",
            "2000",
            "--rules",
            "1000",
        ])
        .arg("--out")
        .arg(&data)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    // The reference: each coin's last tick in the input (sorted by time; every tick is valid).
    let mut last: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in std::fs::read_to_string(data.join("prices.jsonl")).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let t = v["timestamp"].as_f64().unwrap();
        let entry = last.entry(v["coin"].as_str().unwrap().to_string()).or_insert((t, 0.0));
        assert!(t >= entry.0, "the input is in time order");
        *entry = (t, v["price"].as_f64().unwrap());
    }
    let mut states = Vec::new();
    for workers in [1, 2] {
        let (events, state) = (dir.path().join("events.jsonl"), dir.path().join("state.json"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llamaflow"));
        cmd.args(["replay", "--quiet", "--workers", &workers.to_string()]);
        for kind in ["prices", "tvl", "transfers", "gas", "liquidations", "rules"] {
            cmd.arg(format!("--{kind}")).arg(data.join(format!("{kind}.jsonl")));
        }
        let status = cmd
            .arg("--alerts-out")
            .arg(dir.path().join("alerts.jsonl"))
            .arg("--events-out")
            .arg(&events)
            .arg("--state-out")
            .arg(&state)
            .status()
            .unwrap();
        assert!(status.success());
        let mut seen: BTreeMap<String, f64> = BTreeMap::new();
        let mut behind = 0;
        for line in std::fs::read_to_string(&events).unwrap().lines() {
            let e: Value = serde_json::from_str(line).unwrap();
            if e["type"] != "price_update" {
                continue;
            }
            let t = e["timestamp"].as_f64().unwrap();
            if let Some(before) = seen.insert(e["subject"].as_str().unwrap().to_string(), t)
                && before >= t
            {
                behind += 1;
            }
        }
        assert_eq!(
            behind, 0,
            "{workers} workers: price events behind an earlier one of their coin"
        );
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
        let coins = doc["prices"]["coins"].as_object().unwrap();
        assert_eq!(coins.len(), last.len());
        let stale: Vec<&String> = coins
            .iter()
            .filter(|(c, v)| {
                let (t, px) = last[c.as_str()];
                v["timestamp"].as_f64() != Some(t) || v["price"].as_f64() != Some(px)
            })
            .map(|(c, _)| c)
            .collect();
        assert!(
            stale.is_empty(),
            "{workers} workers: {} stale prices, e.g. {:?}",
            stale.len(),
            &stale[..stale.len().min(3)]
        );
        states.push(std::fs::read_to_string(&state).unwrap());
    }
    assert_eq!(states[0], states[1], "1 vs 2 workers");
}

#[test]
fn a_restart_from_the_checkpoint_answers_as_before() {
    let dir = tempfile::tempdir().unwrap();
    write_lines(
        &dir.path().join("protocols.jsonl"),
        &(0..5)
            .map(|p| json!({"id": p.to_string(), "name": format!("P{p}"), "slug": format!("p{p}"), "category": (["Lending", "Dexes"][p % 2])}))
            .collect::<Vec<_>>(),
    );
    // Two days of hourly TVL (so change_1d exists) and prices, as history: a restarted job
    // does not read it again, its state comes from the checkpoint.
    let mut tvl_lines = Vec::new();
    let mut price_lines = Vec::new();
    for h in 0..50i64 {
        for p in 0..6i64 {
            let chain = ["ethereum", "arbitrum", "bsc"][(p % 3) as usize];
            tvl_lines.push(tvl(
                &p.to_string(),
                chain,
                1.0e6 * (1.0 + ((h * 13 + p) % 7) as f64 / 10.0),
                T0 + h * 3600,
            ));
        }
        price_lines.push(json!({"coin": "coingecko:ethereum", "price": 3000.0 + h as f64, "timestamp": T0 + h * 3600, "symbol": "ETH", "confidence": 0.9, "decimals": 18}));
    }
    write_lines(&dir.path().join("tvl.jsonl"), &tvl_lines);
    write_lines(&dir.path().join("prices.jsonl"), &price_lines);
    let port = testkit::free_port();
    let config = dir.path().join("llamaflow.toml");
    std::fs::write(
        &config,
        format!(
            "[pipeline]\nlisten = \"127.0.0.1:{port}\"\ncheckpoint_dir = \"{d}/ckpt\"\ncheckpoint_interval_ms = 200\n\n\
             [[sources.files]]\nkind = \"protocols\"\npath = \"{d}/protocols.jsonl\"\n\n\
             [[sources.files]]\nkind = \"tvl\"\npath = \"{d}/tvl.jsonl\"\n\n\
             [[sources.files]]\nkind = \"prices\"\npath = \"{d}/prices.jsonl\"\n\n\
             [[sources.files]]\nkind = \"gas\"\npath = \"{d}/gas.jsonl\"\nfollow = true\n\n\
             [sinks]\nstdout = false\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    // A live source (an idle tailed file) keeps the job ingesting, and checkpointing.
    std::fs::write(dir.path().join("gas.jsonl"), "").unwrap();
    let end = (T0 + 49 * 3600) * 1000;
    let paths = [
        "/v2/chains",
        "/categories",
        "/protocols",
        "/prices/current/coingecko:ethereum",
        "/tvl/p1",
        // The history series come back from the checkpoint too.
        "/protocol/p1",
        "/v2/historicalChainTvl",
        "/v2/historicalChainTvl/ethereum",
        "/charts/bsc",
    ];
    let answers = |port: u16| -> Vec<Value> { paths.iter().map(|p| get(port, p).2).collect() };
    let mut job = start(&config);
    wait_until("the input", Duration::from_secs(30), || {
        get(port, "/v2/chains").1 == end
    });
    let before = answers(port);
    assert_eq!(before[5]["tvl"].as_array().unwrap().len(), 50, "50 hourly points");
    assert_eq!(before[6].as_array().unwrap().len(), 3, "3 days");
    assert!(
        before[1].as_array().unwrap().iter().any(|c| c["change_1d"].is_number()),
        "categories have a 1-day change: {}",
        before[1]
    );
    let ckpt = dir.path().join("ckpt");
    wait_until("a checkpoint", Duration::from_secs(30), || {
        std::fs::read_dir(&ckpt).is_ok_and(|d| d.count() > 0)
    });
    let status = job.terminate();
    assert!(status.success(), "{status:?}");
    let _job = start(&config);
    wait_until("the restored state", Duration::from_secs(30), || {
        get(port, "/v2/chains").1 == end
    });
    let after = answers(port);
    for ((path, a), b) in paths.iter().zip(&after).zip(&before) {
        assert_eq!(a, b, "{path} after the restart");
    }
}
