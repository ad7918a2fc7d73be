//! Number formatting for alert messages.

/// `+5.31%` / `-5.31%`.
pub fn fmt_pct(pct: f64) -> String {
    format!("{pct:+.2}%")
}

/// A price: 2 decimals from 1 up, 6 significant digits below.
pub fn fmt_price(x: f64) -> String {
    if x.abs() >= 1.0 || x == 0.0 {
        format!("{x:.2}")
    } else {
        let digits = (-x.abs().log10().floor()) as usize + 4;
        format!("{x:.digits$}")
    }
}

/// USD with a magnitude suffix: `$1.25B`, `$10.62M`, `$12.30K`, `$950.00`.
pub fn fmt_usd(x: f64) -> String {
    let a = x.abs();
    if a >= 1e9 {
        format!("${:.2}B", x / 1e9)
    } else if a >= 1e6 {
        format!("${:.2}M", x / 1e6)
    } else if a >= 1e3 {
        format!("${:.2}K", x / 1e3)
    } else {
        format!("${x:.2}")
    }
}

/// A token amount: thousands separators and at most 4 decimals.
pub fn fmt_amount(x: f64) -> String {
    let s = format!("{x:.4}");
    let (int, frac) = s.split_once('.').unwrap_or((&s, ""));
    let (sign, digits) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(fmt_pct(-5.3125), "-5.31%");
        assert_eq!(fmt_pct(2.0), "+2.00%");
        assert_eq!(fmt_price(3791.123), "3791.12");
        assert_eq!(fmt_price(0.000123456), "0.00012346");
        assert_eq!(fmt_usd(1_250_000.0), "$1.25M");
        assert_eq!(fmt_usd(11_873_349_211.52), "$11.87B");
        assert_eq!(fmt_amount(1_250_000.5), "1,250,000.5");
        assert_eq!(fmt_amount(12.0), "12");
    }
}
