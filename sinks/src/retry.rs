//! Shared retry timing of the sinks: exponential backoff with "equal jitter".

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A uniformly random number in [0, 1) from std's per-instance random hasher keys (no RNG
/// crate); a counter keeps successive calls apart.
pub fn random_unit() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// "Equal jitter": uniformly random in [d/2, d], so writers that failed together do not
/// retry together.
pub fn jittered(d: Duration) -> Duration {
    d / 2 + d.mul_f64(random_unit() / 2.0)
}

/// Backoff after the `failed`-th failure (1-based): `initial · 2^(failed−1)`, capped at `max`.
pub fn backoff(initial_ms: u64, max_ms: u64, failed: u32) -> Duration {
    let exp = failed.saturating_sub(1).min(30);
    Duration::from_millis(initial_ms.saturating_mul(1u64 << exp).min(max_ms))
}

/// `Some(ms)` for a positive timeout, `None` (no timeout) for 0.
pub fn timeout(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps_and_jitter_stays_in_range() {
        assert_eq!(backoff(100, 5000, 1), Duration::from_millis(100));
        assert_eq!(backoff(100, 5000, 3), Duration::from_millis(400));
        assert_eq!(backoff(100, 5000, 40), Duration::from_millis(5000));
        let d = Duration::from_millis(1000);
        let samples: Vec<Duration> = (0..200).map(|_| jittered(d)).collect();
        assert!(samples.iter().all(|j| *j >= d / 2 && *j <= d));
        assert!(samples.iter().any(|j| *j != samples[0]), "jitter varies");
        assert_eq!(timeout(0), None);
        assert_eq!(timeout(5), Some(Duration::from_millis(5)));
    }
}
