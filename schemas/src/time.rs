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

/// Serde helper: serialize a `Millis` field as unix seconds.
pub fn ser_seconds<S: Serializer>(ms: &Millis, s: S) -> Result<S::Ok, S::Error> {
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
}

/// Days from 1970-01-01 to the civil date `y-m-d` (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A point in time given on a command line: unix milliseconds, or UTC RFC 3339
/// (`2024-06-01T00:00:00Z`, fractional seconds and `+00:00` accepted, also a bare date).
pub fn parse_time(s: &str) -> Option<Millis> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    let (date, time) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, t.strip_suffix('Z').or_else(|| t.strip_suffix("+00:00"))?),
        None => (s, "00:00:00"),
    };
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, mo, day) = (d.next()??, d.next()??, d.next()??);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) {
        return None;
    }
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, mi, sec) = (t.next()??, t.next()??, t.next()??);
    if h > 23 || mi > 59 || sec > 60 || !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let ms_frac = format!("{frac:0<3}").get(..3)?.parse::<i64>().ok()?;
    Some(((days_from_civil(y, mo, day) * 86_400 + h * 3600 + mi * 60 + sec) * 1000) + ms_frac)
}

#[cfg(test)]
mod parse_time_tests {
    use super::parse_time;

    #[test]
    fn unix_ms_and_rfc3339() {
        assert_eq!(parse_time("1717430400000"), Some(1_717_430_400_000));
        assert_eq!(parse_time("2024-06-03T16:00:00Z"), Some(1_717_430_400_000));
        assert_eq!(parse_time("2024-06-03T16:00:00.25+00:00"), Some(1_717_430_400_250));
        assert_eq!(parse_time("2024-06-03"), Some(1_717_372_800_000));
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_time("2024-13-01"), None);
        assert_eq!(parse_time("2024-06-03T16:00:00+02:00"), None, "only UTC");
        assert_eq!(parse_time("yesterday"), None);
    }
}
