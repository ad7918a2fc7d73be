//! Chain metadata in DeFiLlama's terms: the lowercase chain key its data is written in
//! (`ethereum`, `bsc`, `avax`, `xdai`, `era`, …), the display name that `/v2/chains` and
//! `chain_tvl_update` events carry (`Ethereum`, `BSC`, `Avalanche`, `Gnosis`, `ZKsync Era`, …),
//! and the `gecko_id` / `tokenSymbol` / `chainId` fields of `/v2/chains`.
//!
//! Values follow DeFiLlama's `chainCoingeckoIds` and its chain label maps
//! (`defi/src/utils/normalizeChain.ts` in `defillama-server`, 2026 revision), including its
//! quirks (e.g. `tokenSymbol` `TRON` for Tron, no `chainId` for Tron or Hyperliquid L1).
//! DeFiLlama's `"-"` placeholder symbol is `None` here.

use std::cmp::Ordering;

/// One chain: DeFiLlama key, display name and the `/v2/chains` metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainInfo {
    /// DeFiLlama's chain key, lowercase (`ethereum`, `bsc`, `op_bnb`).
    pub key: &'static str,
    /// Display name (`/v2/chains` `name`, `chain_tvl_update` `name`).
    pub name: &'static str,
    /// CoinGecko id of the chain's token (`gecko_id`), if DeFiLlama lists one.
    pub gecko_id: Option<&'static str>,
    /// The chain's token symbol (`tokenSymbol`), if DeFiLlama lists one.
    pub token_symbol: Option<&'static str>,
    /// EVM chain id (`chainId`), if DeFiLlama lists one.
    pub chain_id: Option<u64>,
}

const fn chain(
    key: &'static str,
    name: &'static str,
    gecko_id: Option<&'static str>,
    token_symbol: Option<&'static str>,
    chain_id: Option<u64>,
) -> ChainInfo {
    ChainInfo {
        key,
        name,
        gecko_id,
        token_symbol,
        chain_id,
    }
}

/// The known chains, sorted by `key` (byte order, no duplicates) for binary search.
pub static CHAINS: &[ChainInfo] = &[
    chain("abstract", "Abstract", None, None, Some(2741)),
    chain("algorand", "Algorand", Some("algorand"), Some("ALGO"), None),
    chain("apechain", "ApeChain", Some("apecoin"), Some("APE"), Some(33_139)),
    chain("aptos", "Aptos", Some("aptos"), Some("APT"), None),
    chain("arbitrum", "Arbitrum", Some("arbitrum"), Some("ARB"), Some(42_161)),
    chain("arbitrum_nova", "Arbitrum Nova", None, None, Some(42_170)),
    chain("astar", "Astar", Some("astar"), Some("ASTR"), Some(592)),
    chain(
        "aurora",
        "Aurora",
        Some("aurora-near"),
        Some("AURORA"),
        Some(1_313_161_554),
    ),
    chain("avax", "Avalanche", Some("avalanche-2"), Some("AVAX"), Some(43_114)),
    chain("babylon", "Babylon Genesis", Some("babylon"), Some("BABY"), None),
    chain("base", "Base", None, None, Some(8453)),
    chain(
        "berachain",
        "Berachain",
        Some("berachain-bera"),
        Some("BERA"),
        Some(80_094),
    ),
    chain("bitcoin", "Bitcoin", Some("bitcoin"), Some("BTC"), None),
    chain("bitcoincash", "Bitcoincash", Some("bitcoin-cash"), Some("BCH"), None),
    chain("bittensor", "Bittensor", Some("bittensor"), Some("TAO"), None),
    chain("blast", "Blast", Some("blast"), Some("BLAST"), Some(81_457)),
    chain("bob", "BOB", Some("bob-build-on-bitcoin"), Some("BOB"), Some(60_808)),
    chain("boba", "Boba", Some("boba-network"), Some("BOBA"), Some(288)),
    chain("bouncebit", "BounceBit", Some("bouncebit"), Some("BB"), Some(6001)),
    chain("bsc", "BSC", Some("binancecoin"), Some("BNB"), Some(56)),
    chain("bsquared", "BSquared", Some("bsquared-network"), Some("B2"), None),
    chain("btr", "Bitlayer", Some("bitlayer-bitvm"), Some("BTR"), Some(200_901)),
    chain("cardano", "Cardano", Some("cardano"), Some("ADA"), None),
    chain("celo", "Celo", Some("celo"), Some("CELO"), Some(42_220)),
    chain("chz", "Chiliz", Some("chiliz"), Some("CHZ"), Some(88_888)),
    chain("conflux", "Conflux", Some("conflux-token"), Some("CFX"), None),
    chain("core", "CORE", Some("coredaoorg"), Some("CORE"), None),
    chain("corn", "Corn", Some("corn-3"), Some("CORN"), Some(21_000_000)),
    chain("cosmos", "CosmosHub", Some("cosmos"), Some("ATOM"), None),
    chain("cronos", "Cronos", Some("crypto-com-chain"), Some("CRO"), Some(25)),
    chain("doge", "Doge", Some("dogecoin"), Some("DOGE"), None),
    chain("dydx", "dYdX", Some("dydx-chain"), Some("dYdX"), None),
    chain("eclipse", "Eclipse", Some("eclipse-3"), Some("ES"), None),
    chain("elrond", "MultiversX", Some("elrond-erd-2"), Some("EGLD"), None),
    chain("eos", "Vaulta", Some("eos"), Some("EOS"), None),
    chain("era", "ZKsync Era", Some("zksync"), Some("ZK"), Some(324)),
    chain("ethereum", "Ethereum", Some("ethereum"), Some("ETH"), Some(1)),
    chain(
        "ethereumclassic",
        "EthereumClassic",
        Some("ethereum-classic"),
        Some("ETC"),
        Some(61),
    ),
    chain("etlk", "Etherlink", None, None, Some(42_793)),
    chain("fantom", "Fantom", Some("fantom"), Some("FTM"), Some(250)),
    chain("filecoin", "Filecoin", Some("filecoin"), Some("FIL"), Some(314)),
    chain("flare", "Flare", Some("flare-networks"), Some("FLR"), None),
    chain("flow", "Flow", Some("flow"), Some("FLOW"), Some(747)),
    chain("fraxtal", "Fraxtal", Some("fraxtal"), Some("FXTL"), Some(252)),
    chain("goat", "GOAT", Some("goat-network"), Some("GOATED"), Some(2345)),
    chain("hedera", "Hedera", Some("hedera-hashgraph"), Some("HBAR"), Some(295)),
    chain("hemi", "Hemi", Some("hemi"), Some("HEMI"), Some(43_111)),
    chain("hydradx", "Hydration", Some("hydradx"), Some("HDX"), None),
    chain("hyperliquid", "Hyperliquid L1", Some("hyperliquid"), Some("HYPE"), None),
    chain("icp", "ICP", Some("internet-computer"), Some("ICP"), None),
    chain("imx", "Immutable zkEVM", Some("immutable-x"), Some("IMX"), Some(13_371)),
    chain("injective", "Injective", Some("injective-protocol"), Some("INJ"), None),
    chain("ink", "Ink", None, None, Some(57_073)),
    chain("iota", "IOTA", Some("iota"), Some("IOTA"), None),
    chain("iotaevm", "IOTA EVM", Some("iota"), Some("IOTA"), Some(8822)),
    chain("iotex", "IoTeX", Some("iotex"), Some("IOTX"), Some(4689)),
    chain(
        "katana",
        "Katana",
        Some("katana-network-token"),
        Some("KAT"),
        Some(747_474),
    ),
    chain("kava", "Kava", Some("kava"), Some("KAVA"), None),
    chain("klaytn", "Kaia", Some("klay-token"), Some("KLAY"), Some(8217)),
    chain("linea", "Linea", Some("linea"), Some("LINEA"), Some(59_144)),
    chain("lisk", "Lisk", Some("lisk"), Some("LSK"), Some(1135)),
    chain("litecoin", "Litecoin", Some("litecoin"), Some("LTC"), None),
    chain("manta", "Manta", Some("manta-network"), Some("MANTA"), Some(169)),
    chain("mantle", "Mantle", Some("mantle"), Some("MNT"), Some(5000)),
    chain("mantra", "MANTRA", Some("mantra"), Some("MANTRA"), Some(5887)),
    chain("megaeth", "MegaETH", Some("megaeth"), Some("MEGA"), Some(4326)),
    chain("merlin", "Merlin", Some("merlin-chain"), Some("MERL"), None),
    chain("metis", "Metis", Some("metis-token"), Some("METIS"), Some(1088)),
    chain("mode", "Mode", Some("mode"), Some("MODE"), Some(34_443)),
    chain("monad", "Monad", Some("monad"), Some("MON"), Some(143)),
    chain("moonbeam", "Moonbeam", Some("moonbeam"), Some("GLMR"), Some(1284)),
    chain("move", "Movement", Some("movement"), Some("MOVE"), Some(3073)),
    chain("near", "Near", Some("near"), Some("NEAR"), None),
    chain("neutron", "Neutron", Some("neutron-3"), Some("NTRN"), None),
    chain("op_bnb", "opBNB", None, None, Some(204)),
    chain("optimism", "OP Mainnet", Some("optimism"), Some("OP"), Some(10)),
    chain("osmosis", "Osmosis", Some("osmosis"), Some("OSMO"), None),
    chain("plasma", "Plasma", Some("plasma"), Some("XPL"), Some(9745)),
    chain(
        "plume_mainnet",
        "Plume Mainnet",
        Some("plume"),
        Some("PLUME"),
        Some(98_866),
    ),
    chain("polkadot", "Polkadot", Some("polkadot"), Some("DOT"), None),
    chain(
        "polygon",
        "Polygon",
        Some("polygon-ecosystem-token"),
        Some("POL"),
        Some(137),
    ),
    chain("polygon_zkevm", "Polygon zkEVM", None, None, Some(1101)),
    chain("pulse", "PulseChain", Some("pulsechain"), Some("PLS"), None),
    chain("radixdlt", "Radix", Some("radix"), Some("XRD"), None),
    chain("ripple", "XRPL", Some("ripple"), Some("XRP"), None),
    chain("ronin", "Ronin", Some("ronin"), Some("RON"), Some(2020)),
    chain("rsk", "Rootstock", Some("rootstock"), Some("RBTC"), Some(30)),
    chain("scroll", "Scroll", Some("scroll"), Some("SCR"), Some(534_352)),
    chain("sei", "Sei", Some("sei-network"), Some("SEI"), None),
    chain("solana", "Solana", Some("solana"), Some("SOL"), None),
    chain("soneium", "Soneium", None, None, Some(1868)),
    chain("sonic", "Sonic", Some("sonic-3"), Some("S"), Some(146)),
    chain("sophon", "Sophon", Some("sophon"), Some("SOPH"), Some(50_104)),
    chain("stacks", "Stacks", Some("blockstack"), Some("STX"), None),
    chain("starknet", "Starknet", Some("starknet"), Some("STRK"), None),
    chain("stellar", "Stellar", Some("stellar"), Some("XLM"), None),
    chain("sui", "Sui", Some("sui"), Some("SUI"), None),
    chain("swellchain", "Swellchain", None, None, Some(1923)),
    chain("tac", "TAC", Some("tac"), Some("TAC"), Some(239)),
    chain("taiko", "Taiko", Some("taiko"), Some("TAIKO"), Some(167_000)),
    chain("terra", "Terra Classic", Some("terra-luna"), Some("LUNC"), None),
    chain("terra2", "Terra2", Some("terra-luna-2"), Some("LUNA"), None),
    chain("tezos", "Tezos", Some("tezos"), Some("XTZ"), None),
    chain("thorchain", "Thorchain", Some("thorchain"), Some("RUNE"), None),
    chain("ton", "TON", Some("the-open-network"), Some("GRAM"), None),
    chain("tron", "Tron", Some("tron"), Some("TRON"), None),
    chain("unichain", "Unichain", None, None, Some(130)),
    chain("vechain", "VeChain", Some("vechain"), Some("VET"), None),
    chain("waves", "Waves", Some("waves"), Some("WAVES"), None),
    chain("wc", "World Chain", Some("worldcoin-wld"), Some("WLD"), Some(480)),
    chain("xdai", "Gnosis", Some("gnosis"), Some("GNO"), Some(100)),
    chain("xdc", "XDC", Some("xdce-crowd-sale"), Some("XDC"), None),
    chain("xlayer", "X Layer", Some("x-layer"), None, None),
    chain("zeta", "ZetaChain", Some("zetachain"), Some("ZETA"), Some(7000)),
    chain("zircuit", "Zircuit", Some("zircuit"), Some("ZRC"), Some(48_900)),
    chain("zora", "Zora", None, None, Some(7_777_777)),
];

/// Former DeFiLlama display names that match neither the current name nor the key.
const LEGACY_NAMES: &[(&str, &str)] = &[("Binance", "bsc")];

/// Compares a (lowercase) table key with `query` lowercased, without allocating.
fn cmp_key(table_key: &str, query: &str) -> Ordering {
    table_key.bytes().cmp(query.bytes().map(|b| b.to_ascii_lowercase()))
}

/// Looks a chain up by its DeFiLlama key, ASCII case-insensitively (`"ethereum"`, `"BSC"`).
pub fn chain_info(key: &str) -> Option<&'static ChainInfo> {
    CHAINS
        .binary_search_by(|c| cmp_key(c.key, key))
        .ok()
        .map(|i| &CHAINS[i])
}

/// The display name for a chain key; the key itself when the chain is unknown.
pub fn display_name(key: &str) -> &str {
    chain_info(key).map_or(key, |c| c.name)
}

/// The chain key for a display name or a key, ASCII case-insensitively
/// (`"OP Mainnet"`, `"op mainnet"` and `"optimism"` all give `"optimism"`).
pub fn key_for_name(name: &str) -> Option<&'static str> {
    if let Some(c) = chain_info(name) {
        return Some(c.key);
    }
    if let Some(c) = CHAINS.iter().find(|c| c.name.eq_ignore_ascii_case(name)) {
        return Some(c.key);
    }
    LEGACY_NAMES
        .iter()
        .find(|(old, _)| old.eq_ignore_ascii_case(name))
        .map(|&(_, key)| key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_unique_and_lowercase() {
        assert!(CHAINS.len() >= 70, "only {} chains", CHAINS.len());
        for w in CHAINS.windows(2) {
            assert!(
                w[0].key < w[1].key,
                "not strictly sorted: {:?} then {:?}",
                w[0].key,
                w[1].key
            );
        }
        for c in CHAINS {
            assert!(!c.key.is_empty() && c.key.is_ascii(), "{:?}", c.key);
            assert_eq!(c.key, c.key.to_ascii_lowercase(), "key not lowercase");
            assert!(!c.name.is_empty());
            assert!(
                c.gecko_id.is_none_or(|g| !g.is_empty() && g == g.to_ascii_lowercase()),
                "{}",
                c.key
            );
            assert!(c.token_symbol.is_none_or(|s| !s.is_empty() && s != "-"), "{}", c.key);
            assert_eq!(chain_info(c.key), Some(c));
        }
    }

    #[test]
    fn names_are_unique_and_map_back_to_their_key() {
        for c in CHAINS {
            assert_eq!(key_for_name(c.name), Some(c.key), "{}", c.name);
            assert_eq!(key_for_name(&c.name.to_ascii_uppercase()), Some(c.key), "{}", c.name);
            assert_eq!(key_for_name(c.key), Some(c.key));
        }
    }

    #[test]
    fn known_values() {
        let eth = chain_info("ethereum").unwrap();
        assert_eq!(
            *eth,
            ChainInfo {
                key: "ethereum",
                name: "Ethereum",
                gecko_id: Some("ethereum"),
                token_symbol: Some("ETH"),
                chain_id: Some(1),
            }
        );
        let bsc = chain_info("bsc").unwrap();
        assert_eq!(
            (bsc.name, bsc.gecko_id, bsc.token_symbol, bsc.chain_id),
            ("BSC", Some("binancecoin"), Some("BNB"), Some(56))
        );
        let op = chain_info("optimism").unwrap();
        assert_eq!(
            (op.name, op.gecko_id, op.token_symbol, op.chain_id),
            ("OP Mainnet", Some("optimism"), Some("OP"), Some(10))
        );
        let arb = chain_info("arbitrum").unwrap();
        assert_eq!(
            (arb.name, arb.gecko_id, arb.token_symbol, arb.chain_id),
            ("Arbitrum", Some("arbitrum"), Some("ARB"), Some(42_161))
        );
        let sol = chain_info("solana").unwrap();
        assert_eq!(
            (sol.name, sol.gecko_id, sol.token_symbol, sol.chain_id),
            ("Solana", Some("solana"), Some("SOL"), None)
        );
        let base = chain_info("base").unwrap();
        assert_eq!(
            (base.name, base.gecko_id, base.token_symbol, base.chain_id),
            ("Base", None, None, Some(8453))
        );
        assert_eq!(display_name("avax"), "Avalanche");
        assert_eq!(display_name("xdai"), "Gnosis");
        assert_eq!(display_name("polygon_zkevm"), "Polygon zkEVM");
    }

    #[test]
    fn lookups_are_case_insensitive() {
        assert_eq!(chain_info("ETHEREUM").map(|c| c.key), Some("ethereum"));
        assert_eq!(chain_info("Op_Bnb").map(|c| c.name), Some("opBNB"));
        assert_eq!(display_name("BSC"), "BSC");
        assert_eq!(key_for_name("OP Mainnet"), Some("optimism"));
        assert_eq!(key_for_name("op mainnet"), Some("optimism"));
        assert_eq!(key_for_name("Ethereum"), Some("ethereum"));
        assert_eq!(key_for_name("ethereum"), Some("ethereum"));
        assert_eq!(key_for_name("Avalanche"), Some("avax"));
        assert_eq!(key_for_name("Binance"), Some("bsc"));
        assert_eq!(key_for_name("zkSync Era"), Some("era"));
    }

    #[test]
    fn unknown_chains() {
        assert_eq!(chain_info("no-such-chain"), None);
        assert_eq!(chain_info(""), None);
        assert_eq!(display_name("no-such-chain"), "no-such-chain");
        assert_eq!(display_name("NoSuchChain"), "NoSuchChain");
        assert_eq!(key_for_name("No Such Chain"), None);
    }
}
