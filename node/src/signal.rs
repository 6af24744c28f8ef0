//! Deterministic wake-up primitives for values many tasks wait on.
//!
//! `tokio::sync::watch` picks a random internal slot per waiter from the runtime's RNG, so
//! the order in which many waiters wake differs from run to run and the simulator could not
//! replay a seed. These wrap an atomic value and a `Notify`, whose waiter list wakes in a
//! fixed order.
//!
//! Invariant: `Progress` only moves forward; a waiter re-checks the value after every wake,
//! so a missed or spurious wake-up can delay it but never make it return early.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::Notify;

/// A monotonically increasing position (e.g. a group's applied index).
#[derive(Debug, Default)]
pub struct Progress {
    value: AtomicU64,
    changed: Notify,
}

impl Progress {
    pub fn new(value: u64) -> Self {
        Self { value: AtomicU64::new(value), changed: Notify::new() }
    }

    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Acquire)
    }

    /// Raises the value to `value` (never lowers it) and wakes every waiter.
    pub fn advance(&self, value: u64) {
        self.value.fetch_max(value, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Returns once the value is at least `target`.
    pub async fn wait_at_least(&self, target: u64) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.get() >= target {
                return;
            }
            notified.await;
        }
    }
}

/// A one-way flag (e.g. "this node incarnation was killed").
#[derive(Debug, Default)]
pub struct Flag {
    raised: AtomicBool,
    changed: Notify,
}

impl Flag {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// Returns once the flag is raised.
    pub async fn wait(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_raised() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn progress_wakes_waiters_at_their_target_only() {
        let p = Arc::new(Progress::new(1));
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait_at_least(5).await })
        };
        p.advance(3);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        p.advance(2);
        assert_eq!(p.get(), 3, "progress never moves back");
        p.advance(5);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn flag_wakes_all_waiters() {
        let f = Arc::new(Flag::new());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let f = f.clone();
                tokio::spawn(async move { f.wait().await })
            })
            .collect();
        tokio::task::yield_now().await;
        f.raise();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(1), w).await.unwrap().unwrap();
        }
        f.wait().await; // already raised: returns at once
    }
}
