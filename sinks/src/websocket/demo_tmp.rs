use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use schemas::{Alert, Event, EventData};

use crate::websocket::{Hub, WsConfig, serve};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn demo_server() {
    let hub = Hub::new(WsConfig { allow_anonymous: true, ..WsConfig::default() });
    if std::env::var_os("DEMO_NOKEY").is_none() { hub.set_api_key("demo", "u1"); }
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    let metrics: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
        let v = n2.load(Ordering::Relaxed);
        format!("# TYPE llamaflow_records_in_total counter\nllamaflow_records_in_total{{kind=\"price\"}} {}\nllamaflow_records_in_total{{kind=\"tvl\"}} {}\nllamaflow_dead_letters_total{{reason=\"late\"}} 3\nllamaflow_alerts_total{{alert_type=\"price_change\"}} {}\n", v * 7, v, v / 10)
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:18080").await.unwrap();
    let app = crate::pipeline_http::app(hub.clone(), metrics);
    let h2 = hub.clone();
    let server = tokio::spawn(serve(listener, app, h2, tokio::time::sleep(Duration::from_secs(60))));
    let coins = [("coingecko:ethereum", "ETH", 3791.12), ("coingecko:bitcoin", "BTC", 67123.4), ("coingecko:solana", "SOL", 171.3), ("ethereum:0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48", "USDC", 1.0), ("coingecko:dai", "DAI", 0.9998), ("arbitrum:0x912ce59144191c1204e64559fe8253a0e49e6548", "ARB", 1.12), ("coingecko:pepe", "PEPE", 0.00001234)];
    let protos = [("2269", "Aave V3", 11.87e9), ("1599", "Lido", 32.1e9), ("111", "Uniswap V3", 4.4e9), ("182", "MakerDAO", 7.9e9), ("3139", "EigenLayer", 15.2e9)];
    let mut prices: Vec<f64> = coins.iter().map(|c| c.2).collect();
    let mut t: i64 = 1_717_430_400_000;
    let mut seed: u64 = 42;
    let mut rnd = move || { seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17; (seed % 10_000) as f64 / 10_000.0 };
    for i in 0..280u64 {
        n.fetch_add(1, Ordering::Relaxed);
        t += 5_000;
        for (j, (coin, sym, _)) in coins.iter().enumerate() {
            prices[j] *= 1.0 + (rnd() - 0.5) * 0.004;
            hub.publish_event(&Event { subject: coin.to_string(), timestamp: t, data: EventData::PriceUpdate { coin: coin.to_string(), price: prices[j], symbol: Some(sym.to_string()), confidence: Some(0.99), decimals: None, timestamp: t, change_1h: Some((rnd() - 0.5) * 6.0), change_24h: if j % 3 == 0 { None } else { Some((rnd() - 0.5) * 12.0) } } });
        }
        if i % 5 == 0 {
            for (id, name, tvl) in protos.iter() {
                let mut chains = BTreeMap::new();
                chains.insert("ethereum".to_string(), tvl * 0.7 * (1.0 + (rnd() - 0.5) * 0.01));
                chains.insert("arbitrum".to_string(), tvl * 0.3);
                let total: f64 = chains.values().sum();
                hub.publish_event(&Event { subject: id.to_string(), timestamp: t, data: EventData::TvlUpdate { protocol_id: id.to_string(), name: Some(name.to_string()), tvl: total, chain_tvls: chains, extra: BTreeMap::new(), change_1h: Some(0.1), change_1d: Some((rnd() - 0.5) * 8.0), change_7d: if *id == "3139" { None } else { Some((rnd() - 0.5) * 20.0) }, timestamp: t } });
            }
            for (chain, g) in [("ethereum", 23.4), ("arbitrum", 0.012), ("base", 0.31)] {
                hub.publish_event(&Event { subject: chain.into(), timestamp: t, data: EventData::GasUpdate { chain: chain.into(), gwei: g * (1.0 + (rnd() - 0.5) * 0.3), timestamp: t } });
            }
        }
        if i % 17 == 3 {
            hub.publish_event(&Event { subject: "coingecko:dai".into(), timestamp: t, data: EventData::Depeg { coin: "coingecko:dai".into(), symbol: Some("DAI".into()), price: 0.9712, peg: 1.0, deviation_pct: 2.88, state: if i % 2 == 0 { "enter" } else { "exit" }, timestamp: t } });
        }
        if i % 11 == 5 {
            hub.publish_event(&Event { subject: "ethereum:0xa0b8".into(), timestamp: t, data: EventData::WhaleTransfer { chain: "ethereum".into(), tx_hash: "0xabc".into(), coin: "ethereum:0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48".into(), symbol: Some("USDC".into()), from: Some("0x1234567890abcdef1234".into()), to: Some("0xfedcba0987654321".into()), amount: 12_500_000.0, value_usd: 12_498_000.0, timestamp: t } });
        }
        if i % 13 == 7 {
            hub.publish_event(&Event { subject: "2269".into(), timestamp: t, data: EventData::Liquidation { protocol_id: "2269".into(), chain: "arbitrum".into(), account: Some("0xdeadbeef00112233".into()), amount_usd: 1_234_567.0, timestamp: t } });
        }
        if i % 15 == 9 {
            hub.publish_alert(&Alert { alert_id: format!("{i:032x}"), rule_id: "r1".into(), user_id: "u1".into(), alert_type: "price_change".into(), subject: "coingecko:ethereum".into(), triggered_at: t, value: -5.31, threshold: 5.0, message: format!("ETH -5.31% in 1h (3791.12 → 3589.80) #{i} <b>not bold</b>"), channels: vec!["websocket".into()], webhook_url: None });
            hub.publish_alert(&Alert { alert_id: format!("x{i:031x}"), rule_id: "r2".into(), user_id: "u2".into(), alert_type: "price_change".into(), subject: "x".into(), triggered_at: t, value: 0.0, threshold: 0.0, message: "OTHER USER".into(), channels: vec![], webhook_url: None });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    hub.shutdown();
    let _ = server.await;
}
