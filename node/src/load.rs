//! Request-rate meters per shard, for load reports and `ClusterStatus` (later: load splits).
//!
//! A ring of one-second buckets over `WINDOW_S` seconds; time comes from the caller (tokio's
//! clock), so the simulator drives it deterministically.

use tokio::time::Instant;

/// Seconds of history kept.
pub const WINDOW_S: usize = 10;

/// Requests per second over the last `WINDOW_S` seconds.
#[derive(Debug, Default)]
pub struct RateMeter {
    start: Option<Instant>,
    /// (second number since `start`, count) per slot.
    buckets: [(u64, u64); WINDOW_S],
}

impl RateMeter {
    fn second(&mut self, now: Instant) -> u64 {
        let start = *self.start.get_or_insert(now);
        now.saturating_duration_since(start).as_secs()
    }

    pub fn record(&mut self, now: Instant) {
        let s = self.second(now);
        let slot = &mut self.buckets[(s % WINDOW_S as u64) as usize];
        if slot.0 != s {
            *slot = (s, 0);
        }
        slot.1 += 1;
    }

    pub fn rate_per_s(&mut self, now: Instant) -> f64 {
        let s = self.second(now);
        let oldest = s.saturating_sub(WINDOW_S as u64 - 1);
        let total: u64 = self.buckets.iter().filter(|(sec, _)| *sec >= oldest && *sec <= s).map(|(_, c)| c).sum();
        let span = (s - oldest + 1) as f64;
        total as f64 / span
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_over_window() {
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        for i in 0..100 {
            m.record(t0 + Duration::from_millis(i * 100)); // 10/s for 10 s
        }
        let r = m.rate_per_s(t0 + Duration::from_millis(9_950));
        assert!((r - 10.0).abs() < 0.01, "{r}");
        let later = m.rate_per_s(t0 + Duration::from_secs(60));
        assert_eq!(later, 0.0);
    }
}
