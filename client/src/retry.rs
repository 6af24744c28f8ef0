//! Retry policy: how many attempts, how long to wait between them, and which errors allow
//! another attempt for which kind of operation.
//!
//! Owns: [`RetryPolicy`], the full-jitter exponential backoff
//! (`sleep = uniform(0, min(backoff_max, backoff_base * 2^retry))`), and [`should_retry`].
//!
//! Invariants: attempts are bounded by `attempts_max`; every sleep is at most `backoff_max`;
//! a write is retried only when the error is retry safe (the request provably did not run).
//!
//! Pure; the random draw is passed in so tests can pin it.

use std::time::Duration;

use crate::error::Error;

/// Bounded retries with full-jitter exponential backoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts per operation, including the first (at least 1).
    pub attempts_max: u32,
    /// Backoff ceiling before the first retry; doubles with every retry.
    pub backoff_base: Duration,
    /// Upper bound of any single backoff sleep.
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts_max: 5, backoff_base: Duration::from_millis(50), backoff_max: Duration::from_secs(2) }
    }
}

impl RetryPolicy {
    /// No retries at all: one attempt per operation.
    pub fn none() -> Self {
        RetryPolicy { attempts_max: 1, ..RetryPolicy::default() }
    }

    /// Upper bound of the sleep before retry number `retry` (0 for the first retry):
    /// `min(backoff_max, backoff_base * 2^retry)`, saturating.
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.backoff_base.checked_mul(factor).unwrap_or(Duration::MAX).min(self.backoff_max)
    }

    /// The full-jitter sleep before retry number `retry`, given a uniform draw in `[0, 1)`.
    pub fn backoff(&self, retry: u32, uniform_draw: f64) -> Duration {
        let draw = if uniform_draw.is_finite() { uniform_draw.clamp(0.0, 1.0) } else { 0.0 };
        self.backoff_ceiling(retry).mul_f64(draw)
    }
}

/// What an operation is, for routing and retry decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationKind {
    /// Any mutation (documents, batches, collection create/drop).
    Write,
    /// A read that must see the latest committed state (goes to the leader).
    ReadStrong,
    /// A read any replica may answer (eventual, bounded staleness, session).
    ReadAny,
}

/// Whether another attempt may follow `error` for an operation of `kind`.
///
/// Reads are idempotent, so any transient error allows a retry (unavailable, connect failure,
/// broken connection, timeout). Writes retry only when the request provably did not execute.
pub fn should_retry(kind: OperationKind, error: &Error) -> bool {
    match kind {
        OperationKind::Write => error.is_retry_safe(),
        OperationKind::ReadStrong | OperationKind::ReadAny => error.is_retryable(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let policy = RetryPolicy {
            attempts_max: 10,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
        };
        let ceilings: Vec<u128> = (0..6).map(|r| policy.backoff_ceiling(r).as_millis()).collect();
        assert_eq!(ceilings, vec![10, 20, 40, 80, 100, 100]);
        assert_eq!(policy.backoff_ceiling(u32::MAX), Duration::from_millis(100));
    }

    #[test]
    fn backoff_stays_within_bounds() {
        let policy = RetryPolicy {
            attempts_max: 10,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        };
        for retry in 0..40 {
            for draw in [0.0, 0.25, 0.5, 0.999_999, 1.0, -3.0, 7.0, f64::NAN] {
                let sleep = policy.backoff(retry, draw);
                assert!(sleep <= policy.backoff_ceiling(retry), "{retry} {draw} {sleep:?}");
                assert!(sleep <= policy.backoff_max);
            }
        }
        assert_eq!(policy.backoff(0, 0.0), Duration::ZERO);
        assert_eq!(policy.backoff(3, 0.5), Duration::from_millis(200));
    }

    #[test]
    fn huge_base_saturates() {
        let policy = RetryPolicy { attempts_max: 3, backoff_base: Duration::MAX, backoff_max: Duration::from_secs(1) };
        assert_eq!(policy.backoff_ceiling(5), Duration::from_secs(1));
    }

    #[test]
    fn writes_retry_only_when_safe() {
        let safe = Error::Unavailable { code: "not_leader".into(), message: String::new(), retry_safe: true };
        let unknown = Error::Unavailable { code: "unavailable".into(), message: String::new(), retry_safe: false };
        let timeout = Error::Timeout { message: String::new() };
        let broken = Error::Transport("connection reset".into());
        let bad = Error::InvalidArgument { code: "invalid_json".into(), message: String::new() };

        assert!(should_retry(OperationKind::Write, &safe));
        for error in [&unknown, &timeout, &broken, &bad] {
            assert!(!should_retry(OperationKind::Write, error), "{error:?}");
        }
        for kind in [OperationKind::ReadStrong, OperationKind::ReadAny] {
            for error in [&safe, &unknown, &timeout, &broken] {
                assert!(should_retry(kind, error), "{kind:?} {error:?}");
            }
            assert!(!should_retry(kind, &bad));
        }
    }
}
