//! One place that turns an alert into what a person reads, for every channel.

use schemas::{Alert, Millis};

/// An alert as a person reads it: the same content on every channel.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    /// Short title: the rule's name (its id when it has none) and the subject.
    pub title: String,
    /// The alert's message (SPEC §2).
    pub message: String,
    /// The value with its unit (`-5.31 %`, `$3,589.80`, `42.5 gwei`).
    pub value: String,
    /// The threshold with its unit.
    pub threshold: String,
    /// The rule's name, or its id.
    pub rule: String,
    /// Coin, protocol or chain.
    pub subject: String,
    /// When it happened, `2024-06-03 16:00:00 UTC`.
    pub time: String,
    /// The deployment's link for this alert, when one is configured.
    pub link: Option<String>,
}

impl Rendered {
    /// Renders `alert` of the rule named `rule_name` with the deployment's `link_template`
    /// (see [`super::NotifyConfig::link_template`]).
    pub fn new(alert: &Alert, rule_name: Option<&str>, link_template: &str) -> Rendered {
        let rule = rule_name
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .unwrap_or(alert.rule_id.as_str())
            .to_string();
        let link = (!link_template.trim().is_empty()).then(|| {
            [
                ("{alert_id}", &alert.alert_id),
                ("{rule_id}", &alert.rule_id),
                ("{user_id}", &alert.user_id),
                ("{subject}", &alert.subject),
                ("{alert_type}", &alert.alert_type),
            ]
            .into_iter()
            .fold(link_template.trim().to_string(), |s, (k, v)| {
                s.replace(k, &url_encode(v))
            })
        });
        Rendered {
            title: format!("{rule}: {}", alert.subject),
            message: alert.message.clone(),
            value: with_unit(&alert.alert_type, alert.value),
            threshold: with_unit(&alert.alert_type, alert.threshold),
            rule,
            subject: alert.subject.clone(),
            time: format_time(alert.triggered_at),
            link,
        }
    }

    /// The plain-text body (e-mail).
    pub fn text(&self) -> String {
        let mut s = format!(
            "{}\n\nRule: {}\nValue: {} (threshold {})\nSubject: {}\nTime: {}\n",
            self.message, self.rule, self.value, self.threshold, self.subject, self.time
        );
        if let Some(l) = &self.link {
            s.push('\n');
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// The HTML body (e-mail); every value escaped.
    pub fn html(&self) -> String {
        let mut s = format!(
            "<p><strong>{}</strong></p>\n<table>\n<tr><td>Rule</td><td>{}</td></tr>\n<tr><td>Value</td><td>{} (threshold {})</td></tr>\n<tr><td>Subject</td><td>{}</td></tr>\n<tr><td>Time</td><td>{}</td></tr>\n</table>\n",
            html_escape(&self.message),
            html_escape(&self.rule),
            html_escape(&self.value),
            html_escape(&self.threshold),
            html_escape(&self.subject),
            html_escape(&self.time)
        );
        if let Some(l) = &self.link {
            s.push_str(&format!("<p><a href=\"{0}\">{0}</a></p>\n", html_escape(l)));
        }
        s
    }

    /// A Telegram message in its `HTML` parse mode (only `<b>`, `<a>`; `&<>"` escaped).
    pub fn telegram_html(&self) -> String {
        let mut s = format!(
            "<b>{}</b>\n{}\nValue: {} (threshold {})\n{}",
            html_escape(&self.title),
            html_escape(&self.message),
            html_escape(&self.value),
            html_escape(&self.threshold),
            html_escape(&self.time)
        );
        if let Some(l) = &self.link {
            s.push_str(&format!("\n<a href=\"{}\">Open</a>", html_escape(l)));
        }
        s
    }
}

/// `value` with the unit of its alert type (SPEC §2: pct for *_change, price for
/// threshold/depeg, gwei for gas, USD for whale/liquidation).
pub fn with_unit(alert_type: &str, value: f64) -> String {
    match alert_type {
        "price_change" | "tvl_change" => format!("{value:+.2} %"),
        "gas_price" => format!("{} gwei", trim_zeros(&format!("{value:.4}"))),
        "price_threshold" | "depeg" if value.abs() < 1.0 => format!("${}", trim_zeros(&format!("{value:.6}"))),
        _ => dollars(value),
    }
}

/// `$1,234.56` (negative: `-$1,234.56`).
fn dollars(v: f64) -> String {
    if !v.is_finite() {
        return format!("${v}");
    }
    let cents = format!("{:.2}", v.abs());
    let (int, frac) = cents.split_once('.').unwrap_or((&cents, "00"));
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{}${grouped}.{frac}", if v < 0.0 { "-" } else { "" })
}

fn trim_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// `2024-06-03 16:00:00 UTC`.
pub fn format_time(ms: Millis) -> String {
    let (y, m, d) = schemas::utc_date(ms);
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Escapes `&`, `<`, `>` and `"` for HTML text and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(alert_type: &str, value: f64, threshold: f64) -> Alert {
        Alert {
            alert_id: "0123456789abcdef0123456789abcdef".into(),
            rule_id: "r1".into(),
            user_id: "u 1".into(),
            alert_type: alert_type.into(),
            subject: "coingecko:ethereum".into(),
            triggered_at: 1_717_430_400_000 + 3_723_000,
            value,
            threshold,
            message: "ETH <down> 5.31% & more".into(),
            channels: vec!["email".into()],
            webhook_url: None,
        }
    }

    #[test]
    fn units_per_alert_type() {
        assert_eq!(with_unit("price_change", -5.3123), "-5.31 %");
        assert_eq!(with_unit("tvl_change", 12.0), "+12.00 %");
        assert_eq!(with_unit("gas_price", 42.5), "42.5 gwei");
        assert_eq!(with_unit("price_threshold", 3589.8), "$3,589.80");
        assert_eq!(with_unit("depeg", 0.9871), "$0.9871");
        assert_eq!(with_unit("whale_movement", 12_345_678.9), "$12,345,678.90");
        assert_eq!(with_unit("liquidation", 999.999), "$1,000.00");
        assert_eq!(dollars(-1234.5), "-$1,234.50");
    }

    #[test]
    fn a_rendered_alert_names_its_rule_escapes_and_links() {
        let a = alert("price_change", -5.31, 5.0);
        let r = Rendered::new(
            &a,
            Some("ETH -5% 1h"),
            "https://llama.example/a/{alert_id}?s={subject}&u={user_id}",
        );
        assert_eq!(r.title, "ETH -5% 1h: coingecko:ethereum");
        assert_eq!(r.time, "2024-06-03 17:02:03 UTC");
        assert_eq!(
            r.link.as_deref(),
            Some("https://llama.example/a/0123456789abcdef0123456789abcdef?s=coingecko%3Aethereum&u=u%201")
        );
        let text = r.text();
        assert!(text.starts_with("ETH <down> 5.31% & more\n"), "{text}");
        assert!(text.contains("Value: -5.31 % (threshold +5.00 %)"), "{text}");
        let html = r.html();
        assert!(html.contains("ETH &lt;down&gt; 5.31% &amp; more"), "{html}");
        assert!(!html.contains("<down>"));
        let tg = r.telegram_html();
        assert!(
            tg.starts_with("<b>ETH -5% 1h: coingecko:ethereum</b>\nETH &lt;down&gt;"),
            "{tg}"
        );
        assert!(tg.contains("&amp;u=u%201\">Open</a>"), "{tg}");
        // Without a name or a template: the rule id, no link.
        let r = Rendered::new(&a, None, "");
        assert_eq!((r.rule.as_str(), r.link), ("r1", None));
    }
}
