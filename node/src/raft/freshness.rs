//! Bounded-staleness proofs: when a replica may answer a read from local state while
//! promising it is no older than a bound.
//!
//! Owns: per group replica, the newest *freshness proof*, and the pure decision of whether a
//! bounded read can be served locally, must wait for apply, or needs a new proof.
//!
//! A proof `(index, as_of)` says: "the group's state at log index `index` contains every write
//! that was committed before local instant `as_of`". It is taken by asking the leader for a
//! read index (the leader confirms its leadership with a quorum *after* the request was sent,
//! so every write committed before the send is at or below the index) with `as_of` = the local
//! time just before the request left. Serving a read at local time `now` from applied state
//! `>= index` therefore misses at most writes committed in `(as_of, now]`: the staleness is
//! at most `now - as_of`. Both instants are read from this node's own monotonic clock, so no
//! clock synchronisation between nodes is assumed (only that the local clock does not run
//! backwards) — unlike the push design with a leader timestamp and a `max_skew` margin
//! (RAFT-NOTES §4), which needs bounded skew between machines.
//!
//! Every strong read on this node also yields a proof for free (it performs the same read
//! index round), so a node serving strong reads keeps bounded reads local.
//!
//! A proof stays true across leader changes: it is a fact about committed entries, which no
//! term can undo.
//!
//! Invariants:
//! - a proof never moves backwards: a new proof replaces the old one only if both its index
//!   and its instant are at least as new;
//! - `decide` serves locally only when `now - as_of <= bound` and the replica applied `index`.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// "State at `index` contains every write committed before `as_of` (local clock)".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proof {
    pub index: u64,
    pub as_of: Instant,
}

/// What a bounded read with this replica's state should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Applied state is within the bound now.
    Serve,
    /// The proof is within the bound but this replica has not applied its index yet: wait
    /// for `index` until `deadline` (after which the proof is too old anyway).
    WaitApplied { index: u64, deadline: Instant },
    /// No proof within the bound: take a new one (one read-index round).
    Refresh,
}

/// The pure rule. `applied` is this replica's applied index.
pub fn decide(proof: Option<Proof>, applied: u64, now: Instant, bound: Duration) -> Decision {
    let Some(p) = proof else { return Decision::Refresh };
    let deadline = p.as_of + bound;
    if now > deadline {
        return Decision::Refresh;
    }
    if applied >= p.index {
        Decision::Serve
    } else {
        Decision::WaitApplied { index: p.index, deadline }
    }
}

/// The newest proof of one group replica.
#[derive(Debug, Default)]
pub struct Freshness {
    newest: Mutex<Option<Proof>>,
}

impl Freshness {
    pub fn newest(&self) -> Option<Proof> {
        self.newest.lock().ok().and_then(|p| *p)
    }

    /// Records a proof; keeps the newer one (see the module invariant).
    pub fn record(&self, proof: Proof) {
        if let Ok(mut slot) = self.newest.lock() {
            let replace = match *slot {
                None => true,
                Some(old) => proof.as_of >= old.as_of && proof.index >= old.index,
            };
            if replace {
                *slot = Some(proof);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn without_a_proof_a_bounded_read_refreshes() {
        let t = Instant::now();
        assert_eq!(decide(None, 100, t, Duration::from_secs(10)), Decision::Refresh);
    }

    #[test]
    fn a_proof_within_the_bound_serves_once_applied() {
        let t = Instant::now();
        let p = Proof { index: 50, as_of: t };
        let bound = Duration::from_millis(200);
        assert_eq!(decide(Some(p), 50, at(t, 200), bound), Decision::Serve);
        assert_eq!(decide(Some(p), 60, at(t, 10), bound), Decision::Serve);
        assert_eq!(decide(Some(p), 49, at(t, 10), bound), Decision::WaitApplied { index: 50, deadline: at(t, 200) });
    }

    #[test]
    fn a_proof_older_than_the_bound_never_serves() {
        let t = Instant::now();
        let p = Proof { index: 50, as_of: t };
        assert_eq!(decide(Some(p), 1_000, at(t, 201), Duration::from_millis(200)), Decision::Refresh);
        assert_eq!(decide(Some(p), 1_000, at(t, 1), Duration::ZERO), Decision::Refresh);
    }

    #[test]
    fn proofs_only_move_forward() {
        let t = Instant::now();
        let f = Freshness::default();
        f.record(Proof { index: 10, as_of: at(t, 100) });
        // Older instant: ignored even with a higher index.
        f.record(Proof { index: 20, as_of: at(t, 50) });
        assert_eq!(f.newest(), Some(Proof { index: 10, as_of: at(t, 100) }));
        // Newer instant and index: taken.
        f.record(Proof { index: 12, as_of: at(t, 150) });
        assert_eq!(f.newest(), Some(Proof { index: 12, as_of: at(t, 150) }));
        // A newer instant with a lower index (concurrent proofs answered out of order) would
        // only weaken the proof: ignored.
        f.record(Proof { index: 11, as_of: at(t, 160) });
        assert_eq!(f.newest(), Some(Proof { index: 12, as_of: at(t, 150) }));
    }
}
