//! The bounded-staleness checker: a BOUNDED_STALENESS read with bound S, invoked at t, must
//! reflect every write of its key that was acknowledged before t - S.
//!
//! Owns: the pure check over acknowledged writes and bounded reads (simulated instants).
//! Versions of one key strictly increase with each write (a version is the log index of the
//! write), so "reflects" is "returned a version at least the acknowledged one". A write is
//! committed no later than its acknowledgement, so this is weaker than the node's promise
//! (committed before t - S) and never blames a correct node.

use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// An acknowledged write (or compare-and-set) of `key` that created `version`.
#[derive(Clone, Debug)]
pub struct AckedWrite {
    pub key: String,
    pub version: u64,
    pub acked_at: Instant,
}

/// A successful bounded read: the version it returned (0 when the document was absent).
#[derive(Clone, Debug)]
pub struct BoundedRead {
    pub process: i64,
    pub key: String,
    pub bound: Duration,
    pub invoked_at: Instant,
    pub version: u64,
}

/// Every bounded read that missed a write acknowledged more than its bound before it started.
pub fn check_bounded_reads(writes: &[AckedWrite], reads: &[BoundedRead]) -> Vec<String> {
    let mut by_key: BTreeMap<&str, Vec<&AckedWrite>> = BTreeMap::new();
    for w in writes {
        by_key.entry(w.key.as_str()).or_default().push(w);
    }
    let mut violations = Vec::new();
    for r in reads {
        let Some(cutoff) = r.invoked_at.checked_sub(r.bound) else { continue };
        let missed = by_key
            .get(r.key.as_str())
            .into_iter()
            .flatten()
            .filter(|w| w.acked_at < cutoff && w.version > r.version)
            .max_by_key(|w| w.version);
        if let Some(w) = missed {
            violations.push(format!(
                "bounded read of {} by client {} (max staleness {} ms) returned version {}, but version {} was acknowledged {} ms before the read started",
                r.key,
                r.process,
                r.bound.as_millis(),
                r.version,
                w.version,
                r.invoked_at.duration_since(w.acked_at).as_millis()
            ));
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(key: &str, version: u64, t0: Instant, ms: u64) -> AckedWrite {
        AckedWrite { key: key.into(), version, acked_at: t0 + Duration::from_millis(ms) }
    }

    fn read(key: &str, bound_ms: u64, t0: Instant, ms: u64, version: u64) -> BoundedRead {
        BoundedRead {
            process: 1,
            key: key.into(),
            bound: Duration::from_millis(bound_ms),
            invoked_at: t0 + Duration::from_millis(ms),
            version,
        }
    }

    #[test]
    fn reads_within_the_bound_pass() {
        let t0 = Instant::now();
        let writes = vec![write("a", 5, t0, 100), write("a", 9, t0, 400), write("b", 7, t0, 100)];
        let reads = vec![
            // Version 9 was acknowledged 100 ms before the read, within its 200 ms bound.
            read("a", 200, t0, 500, 5),
            read("a", 50, t0, 500, 9),
            read("a", 1_000, t0, 500, 0),
            // Other keys' writes do not matter.
            read("c", 10, t0, 5_000, 0),
        ];
        assert!(check_bounded_reads(&writes, &reads).is_empty());
    }

    #[test]
    fn a_read_behind_an_old_acknowledged_write_fails() {
        let t0 = Instant::now();
        let writes = vec![write("a", 5, t0, 100), write("a", 9, t0, 400)];
        let v = check_bounded_reads(&writes, &[read("a", 50, t0, 500, 5)]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("returned version 5, but version 9"), "{v:?}");
        // Absent although written long before.
        assert_eq!(check_bounded_reads(&writes, &[read("a", 10, t0, 200, 0)]).len(), 1);
    }
}
