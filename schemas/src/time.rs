//! Event time: unix seconds on the wire, integer milliseconds inside.

use serde::Serializer;

/// Event time in unix milliseconds (exact for integer and millisecond-fractional seconds).
pub type Millis = i64;

/// Converts unix seconds (integer or fractional) to milliseconds; `None` when not finite
/// or out of range.
pub fn seconds_to_millis(secs: f64) -> Option<Millis> {
    if !secs.is_finite() {
        return None;
    }
    let ms = (secs * 1000.0).round();
    if !(0.0..=9.0e15).contains(&ms) {
        return None;
    }
    Some(ms as Millis)
}

/// Writes milliseconds as unix seconds: an integer when whole, otherwise a fraction.
pub fn format_seconds(ms: Millis) -> serde_json::Value {
    if ms % 1000 == 0 {
        serde_json::Value::from(ms / 1000)
    } else {
        serde_json::Value::from(ms as f64 / 1000.0)
    }
}

/// Serde helper: serialize a `Millis` field as unix seconds (in JSON; as milliseconds in binary
/// forms).
pub fn ser_seconds<S: Serializer>(ms: &Millis, s: S) -> Result<S::Ok, S::Error> {
    // Binary forms (bincode: checkpoints, the dataflow's exchange between processes) keep the
    // milliseconds as they are; seconds are for people and JSON readers.
    if !s.is_human_readable() {
        return s.serialize_i64(*ms);
    }
    if ms % 1000 == 0 {
        s.serialize_i64(ms / 1000)
    } else {
        s.serialize_f64(*ms as f64 / 1000.0)
    }
}

/// Parses a window: `"5m","15m","1h","4h","24h","7d"` or an integer number of seconds
/// (as a JSON number or a digit string). Returns milliseconds.
pub fn parse_window(v: &serde_json::Value) -> Option<Millis> {
    let secs: i64 = match v {
        serde_json::Value::Number(n) => {
            let s = n.as_i64()?;
            if s <= 0 {
                return None;
            }
            s
        }
        serde_json::Value::String(s) => match s.as_str() {
            "5m" => 300,
            "15m" => 900,
            "1h" => 3600,
            "4h" => 14_400,
            "24h" => 86_400,
            "7d" => 604_800,
            other => {
                let n: i64 = other.parse().ok()?;
                if n <= 0 {
                    return None;
                }
                n
            }
        },
        _ => return None,
    };
    secs.checked_mul(1000)
}

/// Human label for a window in messages ("1h", "7d", "90s").
pub fn window_label(ms: Millis) -> String {
    let s = ms / 1000;
    if s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The UTC calendar date `(year, month, day)` of a time in unix milliseconds.
pub fn utc_date(ms: Millis) -> (i64, u32, u32) {
    let z = ms.div_euclid(86_400_000) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Parses a time given as unix milliseconds (`1717430400000`) or RFC 3339
/// (`2024-06-03T16:00:00Z`, `2024-06-03T18:00:00.250+02:00`, `2024-06-03` for midnight UTC).
pub fn parse_time_ms(s: &str) -> Option<Millis> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok();
    }
    let num = |t: &str| -> Option<u32> {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (date, rest) = match s.find(['T', 't', ' ']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut d = date.split('-');
    let (year, month, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    if d.next().is_some() || !(1..=12).contains(&month) || !(1..=31).contains(&day) || date.len() != 10 {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    if utc_date(days * 86_400_000) != (i64::from(year), month, day) {
        return None; // e.g. 2023-02-30
    }
    let Some(rest) = rest else {
        return Some(days * 86_400_000);
    };
    let (clock, offset_ms) = if let Some(c) = rest.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else {
        let i = rest.rfind(['+', '-'])?;
        let (c, off) = rest.split_at(i);
        let (h, m) = off[1..].split_once(':')?;
        let (h, m) = (num(h)?, num(m)?);
        if h > 23 || m > 59 {
            return None;
        }
        let ms = (i64::from(h) * 60 + i64::from(m)) * 60_000;
        (c, if off.starts_with('-') { -ms } else { ms })
    };
    let (hms, frac) = match clock.split_once('.') {
        Some((a, f)) => (a, Some(f)),
        None => (clock, None),
    };
    let mut t = hms.split(':');
    let (h, m, sec) = (num(t.next()?)?, num(t.next()?)?, num(t.next()?)?);
    if t.next().is_some() || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let frac_ms = match frac {
        None => 0,
        Some(f) => {
            num(f)?;
            let digits: String = f.chars().chain("000".chars()).take(3).collect();
            i64::from(num(&digits)?)
        }
    };
    let local = days * 86_400_000 + ((i64::from(h) * 60 + i64::from(m)) * 60 + i64::from(sec)) * 1000 + frac_ms;
    Some(local - offset_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn windows() {
        assert_eq!(parse_window(&json!("1h")), Some(3_600_000));
        assert_eq!(parse_window(&json!("7d")), Some(604_800_000));
        assert_eq!(parse_window(&json!(90)), Some(90_000));
        assert_eq!(parse_window(&json!("120")), Some(120_000));
        assert_eq!(parse_window(&json!("2w")), None);
        assert_eq!(parse_window(&json!(-5)), None);
        assert_eq!(parse_window(&json!(1.5)), None);
        assert_eq!(window_label(3_600_000), "1h");
        assert_eq!(window_label(86_400_000), "1d");
        assert_eq!(window_label(90_000), "90s");
    }

    #[test]
    fn seconds() {
        assert_eq!(seconds_to_millis(1717430350.0), Some(1_717_430_350_000));
        assert_eq!(seconds_to_millis(1.5), Some(1500));
        assert_eq!(seconds_to_millis(f64::NAN), None);
        assert_eq!(seconds_to_millis(-1.0), None);
        assert_eq!(format_seconds(1500), serde_json::json!(1.5));
        assert_eq!(format_seconds(2000), serde_json::json!(2));
    }

    #[test]
    fn calendar_and_rfc3339() {
        assert_eq!(utc_date(0), (1970, 1, 1));
        assert_eq!(utc_date(1_717_430_350_000), (2024, 6, 3));
        assert_eq!(utc_date(951_782_400_000), (2000, 2, 29));
        assert_eq!(utc_date(-1), (1969, 12, 31));
        for days in [-800_000i64, -1, 0, 59, 11_016, 19_877, 2_932_896] {
            let (y, m, d) = utc_date(days * 86_400_000 + 5);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(parse_time_ms("1717430400000"), Some(1_717_430_400_000));
        assert_eq!(parse_time_ms("2024-06-03T16:00:00Z"), Some(1_717_430_400_000));
        assert_eq!(parse_time_ms("2024-06-03T18:00:00.25+02:00"), Some(1_717_430_400_250));
        assert_eq!(parse_time_ms("2024-06-03T15:30:00-00:30"), Some(1_717_430_400_000));
        assert_eq!(parse_time_ms("2024-06-03"), Some(1_717_372_800_000));
        for bad in [
            "",
            "yesterday",
            "2024-13-01T00:00:00Z",
            "2023-02-30",
            "2024-06-03T16:00:00",
            "2024-06-03T25:00:00Z",
            "-5",
        ] {
            assert_eq!(parse_time_ms(bad), None, "{bad}");
        }
    }
}
