//! Channel names (SPEC §5): validation and normalisation.

use schemas::parse::normalize_coin;

/// The channel alerts are delivered on.
pub(crate) const ALERTS: &str = "alerts";

/// Longest channel name accepted, in bytes.
const MAX_CHANNEL_LEN: usize = 256;

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChannelError {
    /// Not a channel this server publishes.
    #[error("unknown channel `{0}`")]
    Unknown(String),
    /// A channel this connection may not subscribe to.
    #[error("channel `{0}` requires an API key")]
    Forbidden(String),
}

/// A suffix such as a protocol id or a chain: non-empty printable ASCII without quotes.
fn valid_part(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// Validates `raw` and returns its normalised form (coin ids as the input normalises them).
pub(crate) fn normalize(raw: &str) -> Result<String, ChannelError> {
    let unknown = || ChannelError::Unknown(shorten(raw));
    if raw.len() > MAX_CHANNEL_LEN {
        return Err(unknown());
    }
    match raw {
        "prices" | "tvl" | "depeg" | "whales" | "liquidations" | "gas" | "chains" | "categories" | ALERTS => {
            return Ok(raw.to_string());
        }
        _ => {}
    }
    let (prefix, rest) = raw.split_once(':').ok_or_else(unknown)?;
    match prefix {
        "prices" => normalize_coin(rest)
            .map(|coin| format!("prices:{coin}"))
            .ok_or_else(unknown),
        "tvl" | "chain" | "gas" if valid_part(rest) => Ok(raw.to_string()),
        _ => Err(unknown()),
    }
}

/// Validates a channel for a subscription: as [`normalize`], and `alerts` needs an API key.
pub(crate) fn for_subscription(raw: &str, authenticated: bool) -> Result<String, ChannelError> {
    let ch = normalize(raw)?;
    if ch == ALERTS && !authenticated {
        return Err(ChannelError::Forbidden(ch));
    }
    Ok(ch)
}

/// A channel name cut for error messages.
fn shorten(raw: &str) -> String {
    const MAX: usize = 80;
    if raw.len() <= MAX {
        return raw.to_string();
    }
    let mut end = MAX;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &raw[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_spec_channel() {
        for ch in [
            "prices",
            "prices:coingecko:ethereum",
            "prices:ethereum:0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48",
            "prices:solana:EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
            "tvl",
            "tvl:2269",
            "chain:ethereum",
            "depeg",
            "whales",
            "liquidations",
            "gas",
            "gas:arbitrum",
            "chains",
            "categories",
            "alerts",
        ] {
            assert_eq!(normalize(ch).as_deref(), Ok(ch), "{ch}");
        }
    }

    #[test]
    fn normalises_coin_ids() {
        assert_eq!(
            normalize("prices:Ethereum:0xABC").as_deref(),
            Ok("prices:ethereum:0xabc")
        );
        assert_eq!(
            normalize("prices:CoinGecko:ethereum").as_deref(),
            Ok("prices:coingecko:ethereum")
        );
    }

    #[test]
    fn rejects_unknown_channels() {
        for ch in [
            "",
            "price",
            "prices:",
            "prices:ethereum",
            "tvl:",
            "chain:",
            "gas:a b",
            "chain:x\"y",
            "foo:bar",
            "alerts:u1",
            "PRICES",
        ] {
            assert!(matches!(normalize(ch), Err(ChannelError::Unknown(_))), "{ch:?}");
        }
        let long = format!("chain:{}", "x".repeat(300));
        match normalize(&long) {
            Err(ChannelError::Unknown(s)) => assert!(s.len() < 100),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn alerts_need_a_key() {
        assert_eq!(for_subscription("alerts", true).as_deref(), Ok("alerts"));
        assert_eq!(
            for_subscription("alerts", false),
            Err(ChannelError::Forbidden("alerts".into()))
        );
        assert_eq!(for_subscription("prices", false).as_deref(), Ok("prices"));
    }
}
