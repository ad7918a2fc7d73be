//! The bundled DeFiLlama-shaped sample feed of `llamaflow run` with no config.
//!
//! Deterministic for a given start time and seed (own SplitMix64 generator). Every hour of
//! feed time (minutes counted from the start) plays the same script on top of
//! mean-reverting noise, so the [`demo_rules`] fire in every run:
//!
//! | minute | what happens |
//! |---|---|
//! | 3–8 | ETH sells off 2.5% (recovers at 40–50) |
//! | 4–9 | BTC dips 3% to ~92.2k (recovers at 35–45) |
//! | 5–9 | Ethereum gas spikes to ~90 gwei |
//! | 5–12 | liquidation cascade: frequent, often > $1M |
//! | 6–12 | SOL drops 4% (recovers at 45–55) |
//! | 20–30 | USDC (and its token addresses) depegs to ~0.88 and recovers, DAI and FRAX follow |
//!
//! Aave V3's TVL drops 12% at minute 10 and then every 59 minutes (so a 1h window sees it
//! every time), recovering over the following hour. The feed opens with one TVL snapshot
//! per protocol an hour before the start (DeFiLlama's previous hourly point) so 1h TVL
//! windows have a reference from the start. Transfers have heavy-tailed USD values (some
//! whale transfers above $5M).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::f64::consts::{PI, TAU};

use schemas::{
    AlertRule, GasTick, Liquidation, Millis, PriceTick, Protocol, Record, SourceName, SourcePos, Transfer, TvlUpdate,
};
use serde_json::json;

#[cfg(test)]
mod tests;

const SEC: Millis = 1000;
const HOUR: Millis = 3600 * SEC;

/// An hourly price move: `pct` (log) reached over minutes `out`, undone over minutes `back`.
#[derive(Clone, Copy)]
enum Script {
    None,
    Move {
        pct: f64,
        out: (f64, f64),
        back: (f64, f64),
    },
    /// Depeg to `1 - depth` between minutes 20 and 30.
    Depeg(f64),
}

impl Script {
    /// Log-price offset at `minute` of the hour.
    fn offset(self, minute: f64) -> f64 {
        match self {
            Script::None => 0.0,
            Script::Move { pct, out, back } => pct * (ramp(minute, out) - ramp(minute, back)),
            Script::Depeg(depth) => (1.0 - depth * bump(minute, (20.0, 30.0))).ln(),
        }
    }
}

/// Smoothstep from 0 (before `a`) to 1 (after `b`).
fn ramp(m: f64, (a, b): (f64, f64)) -> f64 {
    let x = ((m - a) / (b - a)).clamp(0.0, 1.0);
    x * x * (3.0 - 2.0 * x)
}

/// sin² bump: 0 outside `[a, b]`, 1 in the middle.
fn bump(m: f64, (a, b): (f64, f64)) -> f64 {
    if m <= a || m >= b {
        0.0
    } else {
        (PI * (m - a) / (b - a)).sin().powi(2)
    }
}

/// A priced coin. A coin that `follows` another is priced as the leader's price × `price`.
struct Coin {
    id: &'static str,
    symbol: &'static str,
    price: f64,
    /// Stationary standard deviation of the log-price noise (about the hourly volatility).
    vol: f64,
    decimals: u32,
    follows: Option<&'static str>,
    script: Script,
}

const fn coin(id: &'static str, symbol: &'static str, price: f64, vol: f64, decimals: u32) -> Coin {
    Coin {
        id,
        symbol,
        price,
        vol,
        decimals,
        follows: None,
        script: Script::None,
    }
}

const fn tracks(id: &'static str, symbol: &'static str, leader: &'static str, ratio: f64, decimals: u32) -> Coin {
    Coin {
        id,
        symbol,
        price: ratio,
        vol: 0.0005,
        decimals,
        follows: Some(leader),
        script: Script::None,
    }
}

const fn scripted(c: Coin, script: Script) -> Coin {
    Coin { script, ..c }
}

const USDC: &str = "coingecko:usd-coin";
const USDC_ETH: &str = "ethereum:0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48";
const USDT_ETH: &str = "ethereum:0xdac17f958d2ee523a2206206994597c13d831ec7";

/// The demo's coins: leaders before the coins that follow them.
const COINS: &[Coin] = &[
    scripted(
        coin("coingecko:bitcoin", "BTC", 95_000.0, 0.006, 8),
        Script::Move {
            pct: -0.03,
            out: (4.0, 9.0),
            back: (35.0, 45.0),
        },
    ),
    scripted(
        coin("coingecko:ethereum", "ETH", 3_500.0, 0.008, 18),
        Script::Move {
            pct: -0.025,
            out: (3.0, 8.0),
            back: (40.0, 50.0),
        },
    ),
    scripted(
        coin("coingecko:solana", "SOL", 180.0, 0.012, 9),
        Script::Move {
            pct: -0.04,
            out: (6.0, 12.0),
            back: (45.0, 55.0),
        },
    ),
    coin("coingecko:binancecoin", "BNB", 650.0, 0.007, 18),
    coin("coingecko:ripple", "XRP", 2.3, 0.012, 6),
    coin("coingecko:cardano", "ADA", 0.75, 0.012, 6),
    coin("coingecko:dogecoin", "DOGE", 0.32, 0.015, 8),
    coin("coingecko:tron", "TRX", 0.24, 0.008, 6),
    coin("coingecko:polkadot", "DOT", 7.0, 0.012, 10),
    coin("coingecko:litecoin", "LTC", 100.0, 0.010, 8),
    coin("coingecko:near", "NEAR", 5.0, 0.014, 24),
    coin("coingecko:chainlink", "LINK", 19.0, 0.012, 18),
    coin("coingecko:avalanche-2", "AVAX", 35.0, 0.013, 18),
    coin("coingecko:uniswap", "UNI", 11.0, 0.013, 18),
    coin("coingecko:aave", "AAVE", 280.0, 0.013, 18),
    coin("coingecko:maker", "MKR", 1_500.0, 0.012, 18),
    coin("coingecko:lido-dao", "LDO", 1.8, 0.015, 18),
    coin("coingecko:arbitrum", "ARB", 0.75, 0.015, 18),
    coin("coingecko:optimism", "OP", 1.9, 0.015, 18),
    coin("coingecko:matic-network", "POL", 0.45, 0.014, 18),
    coin("coingecko:curve-dao-token", "CRV", 0.9, 0.016, 18),
    coin("coingecko:pendle", "PENDLE", 5.0, 0.016, 18),
    coin("coingecko:ethena", "ENA", 0.8, 0.018, 18),
    coin("coingecko:eigenlayer", "EIGEN", 3.5, 0.018, 18),
    coin("coingecko:rocket-pool", "RPL", 12.0, 0.014, 18),
    coin("coingecko:convex-finance", "CVX", 3.5, 0.015, 18),
    coin("coingecko:gmx", "GMX", 30.0, 0.014, 18),
    coin("coingecko:tether", "USDT", 1.0, 0.0003, 6),
    scripted(coin(USDC, "USDC", 1.0, 0.0004, 6), Script::Depeg(0.12)),
    scripted(coin("coingecko:dai", "DAI", 1.0, 0.0004, 18), Script::Depeg(0.05)),
    scripted(coin("coingecko:frax", "FRAX", 1.0, 0.0006, 18), Script::Depeg(0.06)),
    coin("coingecko:ethena-usde", "USDe", 1.0, 0.0005, 18),
    tracks("coingecko:wrapped-bitcoin", "WBTC", "coingecko:bitcoin", 0.9995, 8),
    tracks("coingecko:weth", "WETH", "coingecko:ethereum", 1.0, 18),
    tracks("coingecko:staked-ether", "STETH", "coingecko:ethereum", 0.9992, 18),
    tracks(USDC_ETH, "USDC", USDC, 1.0, 6),
    tracks(USDT_ETH, "USDT", "coingecko:tether", 1.0, 6),
    tracks(
        "ethereum:0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2",
        "WETH",
        "coingecko:ethereum",
        1.0,
        18,
    ),
    tracks(
        "ethereum:0x2260fac5e5542a773aa44fbcfedf7c193bc2c599",
        "WBTC",
        "coingecko:bitcoin",
        0.9995,
        8,
    ),
    tracks(
        "ethereum:0x7f39c581f595b53c5cb19bd0b3f8da6c935e2ca0",
        "wstETH",
        "coingecko:ethereum",
        1.19,
        18,
    ),
    tracks(
        "ethereum:0x6b175474e89094c44da98b954eedeac495271d0f",
        "DAI",
        "coingecko:dai",
        1.0,
        18,
    ),
    tracks(
        "ethereum:0x514910771af9ca656af840dff83e8264ecf986ca",
        "LINK",
        "coingecko:chainlink",
        1.0,
        18,
    ),
    tracks(
        "ethereum:0x1f9840a85d5af5bf1d1762f925bdaddc4201f984",
        "UNI",
        "coingecko:uniswap",
        1.0,
        18,
    ),
    tracks(
        "ethereum:0x7fc66500c84a76ad7e9c93437bfc5ac33e2ddae9",
        "AAVE",
        "coingecko:aave",
        1.0,
        18,
    ),
    tracks(
        "arbitrum:0xaf88d065e77c8cc2239327c5edb3a432268e5831",
        "USDC",
        USDC,
        1.0,
        6,
    ),
    tracks(
        "solana:EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
        "USDC",
        USDC,
        1.0,
        6,
    ),
];

/// `(coin, chain)` pairs that transfers move.
const TRANSFER_ASSETS: &[(&str, &str)] = &[
    (USDC_ETH, "ethereum"),
    (USDT_ETH, "ethereum"),
    ("coingecko:ethereum", "ethereum"),
    ("ethereum:0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2", "ethereum"),
    ("ethereum:0x2260fac5e5542a773aa44fbcfedf7c193bc2c599", "ethereum"),
    ("ethereum:0x7f39c581f595b53c5cb19bd0b3f8da6c935e2ca0", "ethereum"),
    ("arbitrum:0xaf88d065e77c8cc2239327c5edb3a432268e5831", "arbitrum"),
    ("solana:EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v", "solana"),
    ("coingecko:solana", "solana"),
    ("coingecko:bitcoin", "bitcoin"),
    ("coingecko:tether", "tron"),
];

/// A protocol with its chains and their base TVL in $M (chains sorted by name).
struct ProtocolDef {
    id: &'static str,
    name: &'static str,
    slug: &'static str,
    category: &'static str,
    chains: &'static [(&'static str, f64)],
}

/// The protocol whose TVL drops 12% every 59 minutes.
const DROPPING_PROTOCOL: usize = 1;

const PROTOCOLS: &[ProtocolDef] = &[
    ProtocolDef {
        id: "182",
        name: "Lido",
        slug: "lido",
        category: "Liquid Staking",
        chains: &[("ethereum", 25_000.0)],
    },
    ProtocolDef {
        id: "1599",
        name: "Aave V3",
        slug: "aave-v3",
        category: "Lending",
        chains: &[
            ("arbitrum", 1_500.0),
            ("avax", 600.0),
            ("base", 1_200.0),
            ("bsc", 300.0),
            ("ethereum", 22_000.0),
            ("optimism", 150.0),
            ("polygon", 400.0),
        ],
    },
    ProtocolDef {
        id: "3107",
        name: "EigenLayer",
        slug: "eigenlayer",
        category: "Restaking",
        chains: &[("ethereum", 12_000.0)],
    },
    ProtocolDef {
        id: "2198",
        name: "Uniswap V3",
        slug: "uniswap-v3",
        category: "Dexs",
        chains: &[
            ("arbitrum", 400.0),
            ("base", 350.0),
            ("bsc", 100.0),
            ("ethereum", 2_500.0),
            ("optimism", 50.0),
            ("polygon", 100.0),
        ],
    },
    ProtocolDef {
        id: "118",
        name: "MakerDAO",
        slug: "makerdao",
        category: "CDP",
        chains: &[("ethereum", 6_000.0)],
    },
    ProtocolDef {
        id: "3",
        name: "Curve DEX",
        slug: "curve-dex",
        category: "Dexs",
        chains: &[
            ("arbitrum", 50.0),
            ("ethereum", 1_800.0),
            ("optimism", 20.0),
            ("polygon", 30.0),
        ],
    },
    ProtocolDef {
        id: "2088",
        name: "Compound V3",
        slug: "compound-v3",
        category: "Lending",
        chains: &[
            ("arbitrum", 200.0),
            ("base", 150.0),
            ("ethereum", 2_200.0),
            ("optimism", 30.0),
            ("polygon", 50.0),
        ],
    },
    ProtocolDef {
        id: "900",
        name: "Rocket Pool",
        slug: "rocket-pool",
        category: "Liquid Staking",
        chains: &[("ethereum", 2_500.0)],
    },
    ProtocolDef {
        id: "382",
        name: "Pendle",
        slug: "pendle",
        category: "Yield",
        chains: &[("arbitrum", 200.0), ("bsc", 100.0), ("ethereum", 3_500.0)],
    },
    ProtocolDef {
        id: "4133",
        name: "Ethena USDe",
        slug: "ethena-usde",
        category: "Basis Trading",
        chains: &[("ethereum", 5_500.0)],
    },
    ProtocolDef {
        id: "4025",
        name: "Morpho Blue",
        slug: "morpho-blue",
        category: "Lending",
        chains: &[("base", 1_200.0), ("ethereum", 3_000.0)],
    },
    ProtocolDef {
        id: "319",
        name: "Convex Finance",
        slug: "convex-finance",
        category: "Yield",
        chains: &[("arbitrum", 10.0), ("ethereum", 1_200.0)],
    },
    ProtocolDef {
        id: "111",
        name: "AAVE V2",
        slug: "aave-v2",
        category: "Lending",
        chains: &[("avax", 20.0), ("ethereum", 300.0), ("polygon", 30.0)],
    },
    ProtocolDef {
        id: "337",
        name: "GMX",
        slug: "gmx",
        category: "Derivatives",
        chains: &[("arbitrum", 350.0), ("avax", 20.0)],
    },
    ProtocolDef {
        id: "2308",
        name: "Jito",
        slug: "jito",
        category: "Liquid Staking",
        chains: &[("solana", 2_800.0)],
    },
];

/// Gas chains: `(chain, typical gwei, noise)`. Ethereum spikes at minutes 5–9.
const GAS: &[(&str, f64, f64)] = &[
    ("ethereum", 18.0, 0.15),
    ("arbitrum", 0.012, 0.10),
    ("base", 0.006, 0.15),
    ("polygon", 35.0, 0.20),
    ("bsc", 1.0, 0.05),
];

/// The demo's protocols (`protocols` rows).
pub fn demo_protocols() -> Vec<Protocol> {
    PROTOCOLS
        .iter()
        .map(|p| Protocol {
            id: p.id.into(),
            name: p.name.into(),
            symbol: None,
            slug: Some(p.slug.into()),
            category: Some(p.category.into()),
            chains: p.chains.iter().map(|(c, _)| c.to_string()).collect(),
        })
        .collect()
}

/// The demo's alert rules (user `demo`): at least one per alert type, each firing within
/// about 15 minutes of feed time (the USDC depeg at about minute 22).
pub fn demo_rules() -> Vec<AlertRule> {
    let rules = [
        json!({"id":"demo-eth-5m","name":"ETH ±1% in 5m","alert_type":"price_change",
            "conditions":{"coin":"coingecko:ethereum","window":"5m","threshold_pct":1,"direction":"any"}}),
        json!({"id":"demo-sol-15m","name":"SOL ±2% in 15m","alert_type":"price_change",
            "conditions":{"coin":"coingecko:solana","window":"15m","threshold_pct":2,"direction":"any"}}),
        json!({"id":"demo-btc-below","name":"BTC below $93,500","alert_type":"price_threshold",
            "conditions":{"coin":"coingecko:bitcoin","operator":"<","value":93_500}}),
        json!({"id":"demo-usdc-depeg","name":"USDC off peg by 2%","alert_type":"depeg",
            "conditions":{"coin":USDC,"peg":1.0,"deviation_pct":2}}),
        json!({"id":"demo-aave-tvl","name":"Aave V3 TVL -5% in 1h","alert_type":"tvl_change",
            "conditions":{"protocol_id":"1599","window":"1h","threshold_pct":5,"direction":"down"}}),
        json!({"id":"demo-whales","name":"Whale transfer ≥ $5M","alert_type":"whale_movement",
            "conditions":{"min_usd":5_000_000}}),
        json!({"id":"demo-gas","name":"Ethereum gas > 60 gwei","alert_type":"gas_price",
            "conditions":{"chain":"ethereum","operator":">","gwei":60}}),
        json!({"id":"demo-liquidations","name":"Liquidation ≥ $1M","alert_type":"liquidation",
            "conditions":{"min_usd":1_000_000}}),
    ];
    rules
        .into_iter()
        .map(|mut r| {
            r["user_id"] = json!("demo");
            r["channels"] = json!(["websocket"]);
            AlertRule::from_json(&r).expect("demo rules are valid")
        })
        .collect()
}

/// SplitMix64: small, fast, good enough for a demo, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as i64
    }
    fn index(&mut self, len: usize) -> usize {
        (self.next_u64() % len as u64) as usize
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit();
        (-2.0 * u.ln()).sqrt() * (TAU * self.unit()).cos()
    }
    /// Log-uniform in `[lo, hi)`.
    fn log_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo * (hi / lo).powf(self.unit())
    }
    fn chars(&mut self, alphabet: &[u8], n: usize) -> String {
        (0..n).map(|_| alphabet[self.index(alphabet.len())] as char).collect()
    }
}

const HEX: &[u8] = b"0123456789abcdef";
const BASE58: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
const BECH32: &[u8] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";

/// Rounds to `digits` significant digits (keeps the JSON short).
fn round_sig(x: f64, digits: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(digits - 1 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// One mean-reverting (Ornstein–Uhlenbeck) log-noise process.
#[derive(Clone, Copy, Default)]
struct Noise {
    x: f64,
    last: Millis,
}

impl Noise {
    /// Advances to `t`: reversion rate `theta` per hour, stationary std `vol`.
    fn step(&mut self, rng: &mut Rng, t: Millis, theta: f64, vol: f64) -> f64 {
        let dt = (t - self.last).max(0) as f64 / HOUR as f64;
        let decay = (-theta * dt).exp();
        self.x = self.x * decay + vol * (1.0 - decay * decay).sqrt() * rng.normal();
        self.last = t;
        self.x
    }
}

/// What produces the next record; the order breaks timestamp ties.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stream {
    Tvl(usize),
    TvlDrop,
    Price(usize),
    Gas(usize),
    Liquidation,
    Transfer,
}

/// The demo feed: an infinite, deterministic stream of price, TVL, gas, transfer and
/// liquidation records with non-decreasing timestamps; positions are `demo:<seq>` from 0.
pub struct DemoFeed {
    rng: Rng,
    start: Millis,
    seq: u64,
    source: SourceName,
    queue: BinaryHeap<Reverse<(Millis, Stream)>>,
    coins: Vec<Noise>,
    leaders: Vec<Option<usize>>,
    transfer_assets: Vec<(usize, &'static str)>,
    lenders: Vec<(usize, &'static str)>,
    tvl: Vec<Noise>,
    /// Recovering multiplier of the dropping protocol's TVL.
    drop_level: f64,
    gas: Vec<Noise>,
}

impl DemoFeed {
    /// A feed starting at `start_ts_secs` (unix seconds, the first price tick's time) with a
    /// PRNG seed; the same arguments give the same records.
    pub fn new(start_ts_secs: i64, seed: u64) -> Self {
        let index = |id: &str| {
            COINS
                .iter()
                .position(|c| c.id == id)
                .expect("demo coin table is consistent")
        };
        let start = start_ts_secs.max(0).saturating_mul(SEC);
        let mut rng = Rng(seed ^ 0x6c6c_616d_6166_6c6f);
        let mut queue = BinaryHeap::new();
        let mut at = |t: Millis, s: Stream| queue.push(Reverse((t, s)));
        for i in 0..COINS.len() {
            at(start + rng.range(0, 19) * SEC, Stream::Price(i));
        }
        for p in 0..PROTOCOLS.len() {
            at((start - HOUR).max(0), Stream::Tvl(p));
        }
        at(start + 600 * SEC, Stream::TvlDrop);
        for g in 0..GAS.len() {
            at(start + rng.range(0, 14) * SEC, Stream::Gas(g));
        }
        at(start + rng.range(1, 3) * SEC, Stream::Transfer);
        at(start + rng.range(10, 40) * SEC, Stream::Liquidation);
        let lenders = PROTOCOLS
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p.category, "Lending" | "CDP"))
            .flat_map(|(i, p)| p.chains.iter().map(move |(c, _)| (i, *c)))
            .collect();
        let fresh = |n: usize, last: Millis| vec![Noise { x: 0.0, last }; n];
        DemoFeed {
            rng,
            start,
            seq: 0,
            source: SourceName::from("demo:"),
            queue,
            coins: fresh(COINS.len(), start),
            leaders: COINS.iter().map(|c| c.follows.map(index)).collect(),
            transfer_assets: TRANSFER_ASSETS.iter().map(|(c, chain)| (index(c), *chain)).collect(),
            lenders,
            tvl: fresh(PROTOCOLS.len(), (start - HOUR).max(0)),
            drop_level: 1.0,
            gas: fresh(GAS.len(), start),
        }
    }

    /// Minute of the feed hour (from the start) at `t`.
    fn minute(&self, t: Millis) -> f64 {
        (t - self.start).rem_euclid(HOUR) as f64 / 60_000.0
    }

    /// Coin `i`'s price at `t`, from its noise at its last tick and the hour's script.
    fn price_at(&self, i: usize, t: Millis) -> f64 {
        let c = &COINS[i];
        let own = c.price * (self.coins[i].x + c.script.offset(self.minute(t))).exp();
        match self.leaders[i] {
            Some(l) if l != i => self.price_at(l, t) * own,
            _ => own,
        }
    }

    fn price(&mut self, i: usize, t: Millis) -> (Record, Millis) {
        let c = &COINS[i];
        self.coins[i].step(&mut self.rng, t, 1.0, c.vol);
        let tick = PriceTick {
            coin: c.id.into(),
            price: round_sig(self.price_at(i, t), 6),
            timestamp: t,
            symbol: Some(c.symbol.into()),
            confidence: Some(0.99),
            decimals: Some(c.decimals),
        };
        (Record::Price(tick), t + self.rng.range(15, 25) * SEC)
    }

    fn tvl(&mut self, p: usize, t: Millis) -> Record {
        let x = self.tvl[p].step(&mut self.rng, t, 0.5, 0.01);
        let level = if p == DROPPING_PROTOCOL { self.drop_level } else { 1.0 };
        let chains = PROTOCOLS[p]
            .chains
            .iter()
            .map(|(chain, base)| {
                let jitter = 0.001 * self.rng.normal();
                (chain.to_string(), round2(base * 1e6 * (x + jitter).exp() * level))
            })
            .collect();
        Record::Tvl(TvlUpdate {
            protocol_id: PROTOCOLS[p].id.into(),
            timestamp: t,
            chains,
            extra: Vec::new(),
        })
    }

    fn gas(&mut self, g: usize, t: Millis) -> (Record, Millis) {
        let (chain, typical, vol) = GAS[g];
        let x = self.gas[g].step(&mut self.rng, t, 6.0, vol);
        let spike = if chain == "ethereum" {
            1.0 + 4.0 * bump(self.minute(t), (5.0, 9.0))
        } else {
            1.0
        };
        let tick = GasTick {
            chain: chain.into(),
            gwei: round_sig(typical * x.exp() * spike, 6),
            timestamp: t,
        };
        (Record::Gas(tick), t + self.rng.range(13, 17) * SEC)
    }

    /// `(tx hash, address)` generators in the chain's style.
    fn tx_and_address(&mut self, chain: &str) -> (String, String) {
        let addr = |rng: &mut Rng| match chain {
            "solana" => rng.chars(BASE58, 44),
            "bitcoin" => format!("bc1q{}", rng.chars(BECH32, 38)),
            "tron" => format!("T{}", rng.chars(BASE58, 33)),
            _ => format!("0x{}", rng.chars(HEX, 40)),
        };
        let tx = match chain {
            "solana" => self.rng.chars(BASE58, 88),
            "bitcoin" | "tron" => self.rng.chars(HEX, 64),
            _ => format!("0x{}", self.rng.chars(HEX, 64)),
        };
        (tx, addr(&mut self.rng))
    }

    fn transfer(&mut self, t: Millis) -> (Record, Millis) {
        let (coin, chain) = self.transfer_assets[self.rng.index(self.transfer_assets.len())];
        let usd = if self.rng.unit() < 0.03 {
            self.rng.log_uniform(1e6, 5e7)
        } else {
            (100.0 / (1.0 - self.rng.unit()).powf(1.0 / 1.1)).min(2e6)
        };
        let (tx_hash, from) = self.tx_and_address(chain);
        let (_, to) = self.tx_and_address(chain);
        let transfer = Transfer {
            chain: chain.into(),
            tx_hash,
            coin: COINS[coin].id.into(),
            from: Some(from),
            to: Some(to),
            amount: round_sig(usd / self.price_at(coin, t), 6),
            timestamp: t,
        };
        (Record::Transfer(Box::new(transfer)), t + self.rng.range(1, 5) * SEC)
    }

    fn liquidation(&mut self, t: Millis) -> (Record, Millis) {
        let m = self.minute(t);
        let stress = (5.0..12.0).contains(&m);
        let (p, chain) = self.lenders[self.rng.index(self.lenders.len())];
        let big = self.rng.unit() < if stress { 0.5 } else { 0.06 };
        let amount_usd = if big {
            self.rng.log_uniform(5e5, 8e6)
        } else {
            self.rng.log_uniform(2e3, 3e5)
        };
        let (_, account) = self.tx_and_address(chain);
        let liq = Liquidation {
            protocol_id: PROTOCOLS[p].id.into(),
            chain: chain.into(),
            account: Some(account),
            amount_usd: round2(amount_usd),
            timestamp: t,
        };
        let next = if stress {
            self.rng.range(3, 10)
        } else {
            self.rng.range(15, 60)
        };
        (Record::Liquidation(liq), t + next * SEC)
    }
}

impl Iterator for DemoFeed {
    type Item = (SourcePos, Record);

    fn next(&mut self) -> Option<(SourcePos, Record)> {
        let Reverse((t, stream)) = self.queue.pop()?;
        let (record, next) = match stream {
            Stream::Price(i) => self.price(i, t),
            Stream::Tvl(p) => {
                if p == DROPPING_PROTOCOL && t >= self.start {
                    self.drop_level += (1.0 - self.drop_level) * 0.2;
                }
                let next = if t < self.start {
                    self.start + self.rng.range(0, 299) * SEC
                } else {
                    t + self.rng.range(285, 315) * SEC
                };
                (self.tvl(p, t), next)
            }
            Stream::TvlDrop => {
                self.drop_level *= 0.88;
                (self.tvl(DROPPING_PROTOCOL, t), t + 3540 * SEC)
            }
            Stream::Gas(g) => self.gas(g, t),
            Stream::Transfer => self.transfer(t),
            Stream::Liquidation => self.liquidation(t),
        };
        self.queue.push(Reverse((next, stream)));
        let pos = SourcePos::new(self.source, self.seq);
        self.seq += 1;
        Some((pos, record))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::MAX, None)
    }
}
