//! Settings of the dataflow operators.

use std::collections::HashSet;

use schemas::Millis;

/// Operator settings; [`OpConfig::default`] is what `llamaflow` runs with unless configured.
#[derive(Clone, Debug)]
pub struct OpConfig {
    /// Produce market events (off for alert-only replays: saves work).
    pub emit_events: bool,
    /// Maintain the live aggregates (TVL per chain / category / in total, SPEC §8); off for
    /// alert-only replays.
    pub live_state: bool,
    /// Coin ids watched for `depeg` market events (peg 1.0).
    pub stablecoins: HashSet<String>,
    /// Symbols watched for `depeg` market events, for coins not listed by id.
    pub stable_symbols: HashSet<String>,
    /// Band of the `depeg` market event, in percent from 1.0.
    pub depeg_band_pct: f64,
    /// Minimum USD value of a `whale_transfer` market event.
    pub whale_event_usd: f64,
    /// Minimum price history kept per coin (24h: `change_24h`); longer when a rule needs it.
    pub price_retention: Millis,
    /// Minimum TVL history kept per protocol and chain (7d: `change_7d`).
    pub tvl_retention: Millis,
    /// Longest rule window accepted: a rule's window sets how much history its key keeps, so
    /// it is bounded (a longer one is a dead-lettered rule).
    pub max_rule_window: Millis,
}

impl Default for OpConfig {
    fn default() -> Self {
        let ids = [
            "coingecko:tether",
            "coingecko:usd-coin",
            "coingecko:dai",
            "coingecko:frax",
            "coingecko:ethena-usde",
            "coingecko:true-usd",
            "coingecko:paypal-usd",
            "coingecko:first-digital-usd",
            "coingecko:liquity-usd",
            "coingecko:gho",
            "coingecko:crvusd",
            "coingecko:usdd",
        ];
        let symbols = [
            "USDT", "USDC", "DAI", "FRAX", "USDe", "TUSD", "PYUSD", "FDUSD", "LUSD", "GHO", "crvUSD", "USDD",
        ];
        OpConfig {
            emit_events: true,
            live_state: true,
            stablecoins: ids.iter().map(|s| s.to_string()).collect(),
            stable_symbols: symbols.iter().map(|s| s.to_string()).collect(),
            depeg_band_pct: 1.0,
            whale_event_usd: 1_000_000.0,
            price_retention: 86_400_000,
            tvl_retention: 604_800_000,
            max_rule_window: 30 * 86_400_000,
        }
    }
}

impl OpConfig {
    /// Whether depeg market events are tracked for this coin.
    pub fn is_stablecoin(&self, coin: &str, symbol: Option<&str>) -> bool {
        self.stablecoins.contains(coin) || symbol.is_some_and(|s| self.stable_symbols.contains(s))
    }
}
