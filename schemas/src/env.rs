//! SPEC §6 environment: where the database URL comes from, and how URLs are shown in logs.

/// The environment variables holding the database URL, in order of preference (SPEC §6).
pub const URL_VARS: [&str; 3] = ["PREMIUM_DB", "ALERTS_DB", "DATABASE_URL"];

/// The first of `PREMIUM_DB`, `ALERTS_DB`, `DATABASE_URL` that is set and not empty.
pub fn url_from_env() -> Option<String> {
    url_from_vars(|name| std::env::var(name).ok())
}

/// As [`url_from_env`], reading variables through `var`.
pub fn url_from_vars(var: impl Fn(&str) -> Option<String>) -> Option<String> {
    URL_VARS
        .iter()
        .find_map(|name| var(name).filter(|v| !v.trim().is_empty()))
}

/// A URL with its userinfo (user and password) replaced by `<redacted>`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<redacted>".to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_and_redaction() {
        let vars = |set: &'static [(&'static str, &'static str)]| {
            move |k: &str| set.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(
            url_from_vars(vars(&[("DATABASE_URL", "c"), ("ALERTS_DB", "b")])).as_deref(),
            Some("b")
        );
        assert_eq!(
            url_from_vars(vars(&[("PREMIUM_DB", " "), ("DATABASE_URL", "c")])).as_deref(),
            Some("c")
        );
        assert_eq!(url_from_vars(vars(&[])), None);
        assert_eq!(
            redact_url("postgres://u:p@h:5432/db?x=1"),
            "postgres://<redacted>@h:5432/db?x=1"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact_url("nonsense"), "<redacted>");
    }
}
