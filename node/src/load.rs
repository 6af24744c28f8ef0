//! Request-rate meters per shard, with sampled request keys, for load reports, load-based
//! splits and `ClusterStatus`.
//!
//! A ring of one-second buckets over `WINDOW_S` seconds; time comes from the caller (tokio's
//! clock), so the simulator drives it deterministically. The key sample is the last
//! `KEY_SAMPLE_MAX` keys requested: its median splits the recent load in half.

use std::collections::VecDeque;
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

/// Bound on the keys one group's meter remembers.
pub const KEY_SAMPLE_MAX: usize = 256;
/// Bound on the sampled keys one load report carries per group.
pub const REPORTED_KEYS_MAX: usize = 32;

/// One group's request rate and its recent keys.
#[derive(Debug, Default)]
pub struct GroupLoad {
    meter: RateMeter,
    keys: VecDeque<Vec<u8>>,
}

impl GroupLoad {
    pub fn record(&mut self, now: Instant, key: &[u8]) {
        self.meter.record(now);
        if self.keys.len() >= KEY_SAMPLE_MAX {
            self.keys.pop_front();
        }
        self.keys.push_back(key.to_vec());
    }

    pub fn rate_per_s(&mut self, now: Instant) -> f64 {
        self.meter.rate_per_s(now)
    }

    /// Up to `REPORTED_KEYS_MAX` of the recent keys, spread evenly over the sample.
    pub fn sampled_keys(&self) -> Vec<Vec<u8>> {
        let step = self.keys.len().div_ceil(REPORTED_KEYS_MAX).max(1);
        self.keys.iter().step_by(step).cloned().collect()
    }
}

/// The key that splits `keys` into halves (the median of the sorted sample), if any.
pub fn median_key(mut keys: Vec<Vec<u8>>) -> Option<Vec<u8>> {
    keys.sort();
    keys.dedup();
    keys.get(keys.len() / 2).cloned()
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

    #[test]
    fn key_sample_is_bounded_and_its_median_halves_it() {
        let t0 = Instant::now();
        let mut g = GroupLoad::default();
        for i in 0..1_000u32 {
            g.record(t0, format!("k{:04}", i % 100).as_bytes());
        }
        let sample = g.sampled_keys();
        assert!(sample.len() <= REPORTED_KEYS_MAX, "{}", sample.len());
        let median = median_key(sample).unwrap();
        assert!(
            median.as_slice() > &b"k0030"[..] && median.as_slice() < &b"k0070"[..],
            "{:?}",
            String::from_utf8_lossy(&median)
        );
        assert_eq!(median_key(Vec::new()), None);
    }
}
