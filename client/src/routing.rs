//! Which node the next attempt goes to: the shard routing cache, the leader cache and
//! endpoint rotation.
//!
//! Owns: per key range, the shard and its leader's address (learned from each response's
//! `ResponseMeta`: shard id, epoch, range, leader); the last leader seen (for requests whose
//! key's shard is not cached); the "current" endpoint used for leader-bound requests when no
//! leader is known; and the round-robin cursor for requests that any replica may serve.
//!
//! Invariants: endpoints are normalized and non-empty; a cached leader is dropped after any
//! retryable failure against it, so a dead leader is never retried twice in a row by choice;
//! of two cached shards that overlap, the higher epoch wins (an older one is evicted); the
//! cache is a hint only (any node serves any key, forwarding or re-routing stale routes), and
//! holds at most `SHARDS_CACHED_MAX` ranges.
//!
//! Pure and synchronous (the client wraps it in a mutex); no I/O, no clock, no randomness.

use crate::endpoint::normalize_endpoint;
use std::collections::BTreeMap;

/// Bound on cached shard ranges.
pub const SHARDS_CACHED_MAX: usize = 65_536;

/// A cached shard: its range end, epoch, id and leader.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CachedShard {
    end: Vec<u8>,
    epoch: u64,
    id: u64,
    leader: Option<String>,
}

fn contains(start: &[u8], end: &[u8], key: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}

/// Where a request wants to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Writes and strong reads: the leader when known, else the current endpoint.
    Leader,
    /// Reads any replica may serve: the next endpoint in round-robin order.
    Any,
}

/// Endpoint selection state. See the module doc.
#[derive(Debug, Clone)]
pub struct Router {
    endpoints: Vec<String>,
    leader: Option<String>,
    /// Index of the endpoint used for `Target::Leader` while no leader is cached.
    current: usize,
    /// Round-robin cursor for `Target::Any`.
    next_any: usize,
    /// Shards by range start.
    shards: BTreeMap<Vec<u8>, CachedShard>,
}

impl Router {
    /// `endpoints` must be normalized and non-empty (see `normalize_endpoints`).
    pub fn new(endpoints: Vec<String>) -> Self {
        assert!(!endpoints.is_empty(), "router needs at least one endpoint");
        Router { endpoints, leader: None, current: 0, next_any: 0, shards: BTreeMap::new() }
    }

    /// The cached leader address, if any.
    pub fn leader(&self) -> Option<&str> {
        self.leader.as_deref()
    }

    /// Picks the address for the next attempt.
    pub fn pick(&mut self, target: Target) -> String {
        match target {
            Target::Leader => match &self.leader {
                Some(leader) => leader.clone(),
                None => self.endpoints[self.current % self.endpoints.len()].clone(),
            },
            Target::Any => {
                let index = self.next_any % self.endpoints.len();
                self.next_any = self.next_any.wrapping_add(1);
                self.endpoints[index].clone()
            }
        }
    }

    /// Records the leader a successful response named. Empty or unparsable addresses are
    /// ignored (the server sends an empty string when it does not know the leader).
    pub fn observe_leader(&mut self, leader_grpc_addr: &str) {
        if leader_grpc_addr.trim().is_empty() {
            return;
        }
        if let Ok(leader) = normalize_endpoint(leader_grpc_addr) {
            self.leader = Some(leader);
        }
    }

    /// The cached shard whose range holds `key`: its id and leader.
    pub fn shard_for(&self, key: &[u8]) -> Option<(u64, Option<&str>)> {
        let (start, shard) = self.shards.range(..=key.to_vec()).next_back()?;
        contains(start, &shard.end, key).then_some((shard.id, shard.leader.as_deref()))
    }

    /// Picks the address for the next attempt on `key`: the leader of its cached shard for
    /// leader-bound requests, else as `pick`.
    pub fn pick_for(&mut self, target: Target, key: Option<&[u8]>) -> String {
        if target == Target::Leader {
            if let Some((_, Some(leader))) = key.and_then(|k| self.shard_for(k)) {
                return leader.to_string();
            }
        }
        self.pick(target)
    }

    /// Records a shard a response named (`end` empty: unbounded) and its leader (empty when
    /// unknown). An overlapping cached shard with a higher epoch wins over it.
    pub fn observe_shard(&mut self, id: u64, epoch: u64, start: &[u8], end: &[u8], leader: &str) {
        if id == 0 {
            return;
        }
        let overlapping: Vec<Vec<u8>> = self
            .shards
            .iter()
            .filter(|(s, c)| (end.is_empty() || s.as_slice() < end) && (c.end.is_empty() || c.end.as_slice() > start))
            .map(|(s, _)| s.clone())
            .collect();
        if overlapping.iter().any(|s| self.shards[s].epoch > epoch) {
            return;
        }
        for s in overlapping {
            self.shards.remove(&s);
        }
        if self.shards.len() >= SHARDS_CACHED_MAX {
            self.shards.pop_first();
        }
        let leader = normalize_endpoint(leader).ok().filter(|_| !leader.trim().is_empty());
        self.shards.insert(start.to_vec(), CachedShard { end: end.to_vec(), epoch, id, leader });
    }

    /// Records that an attempt against `address` failed with a retryable error: forget it as
    /// leader and move the current endpoint past it, so the next attempt tries another node.
    pub fn report_failure(&mut self, address: &str) {
        if self.leader.as_deref() == Some(address) {
            self.leader = None;
        }
        for shard in self.shards.values_mut() {
            if shard.leader.as_deref() == Some(address) {
                shard.leader = None;
            }
        }
        let count = self.endpoints.len();
        if self.endpoints[self.current % count] == address {
            self.current = (self.current + 1) % count;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new(vec!["http://a:1".into(), "http://b:1".into(), "http://c:1".into()])
    }

    #[test]
    fn leader_target_is_sticky_until_failure() {
        let mut router = router();
        assert_eq!(router.pick(Target::Leader), "http://a:1");
        assert_eq!(router.pick(Target::Leader), "http://a:1");
        router.report_failure("http://a:1");
        assert_eq!(router.pick(Target::Leader), "http://b:1");
        router.report_failure("http://b:1");
        router.report_failure("http://c:1");
        assert_eq!(router.pick(Target::Leader), "http://a:1", "wraps around");
    }

    #[test]
    fn cached_leader_wins_and_is_dropped_on_failure() {
        let mut router = router();
        router.observe_leader("c:1");
        assert_eq!(router.leader(), Some("http://c:1"));
        assert_eq!(router.pick(Target::Leader), "http://c:1");
        router.report_failure("http://c:1");
        assert_eq!(router.leader(), None);
        assert_eq!(router.pick(Target::Leader), "http://a:1");
    }

    #[test]
    fn leader_outside_endpoint_list_is_used() {
        let mut router = router();
        router.observe_leader("http://d:9/");
        assert_eq!(router.pick(Target::Leader), "http://d:9");
        // A failure of an unrelated endpoint keeps the leader.
        router.report_failure("http://b:1");
        assert_eq!(router.pick(Target::Leader), "http://d:9");
    }

    #[test]
    fn empty_or_bad_leader_hint_is_ignored() {
        let mut router = router();
        router.observe_leader("b:1");
        router.observe_leader("");
        router.observe_leader("https://x:1");
        assert_eq!(router.leader(), Some("http://b:1"));
    }

    #[test]
    fn each_shard_has_its_own_leader_and_newer_epochs_replace_older_ranges() {
        let mut router = router();
        router.observe_shard(1, 1, b"a", b"", "b:1");
        assert_eq!(router.pick_for(Target::Leader, Some(b"q")), "http://b:1");
        // A split: shard 1 keeps [a, m) and shard 2 takes [m, +inf), led elsewhere.
        router.observe_shard(2, 2, b"m", b"", "c:1");
        assert_eq!(router.pick_for(Target::Leader, Some(b"q")), "http://c:1");
        assert_eq!(router.shard_for(b"c"), None, "the old range was evicted");
        router.observe_shard(1, 2, b"a", b"m", "b:1");
        assert_eq!(router.pick_for(Target::Leader, Some(b"c")), "http://b:1");
        // A late answer from before the split does not bring the old range back.
        router.observe_shard(1, 1, b"a", b"", "a:1");
        assert_eq!(router.shard_for(b"q").map(|s| s.0), Some(2));
        // A failed leader is forgotten; the request goes to the current endpoint instead.
        router.report_failure("http://c:1");
        assert_eq!(router.pick_for(Target::Leader, Some(b"q")), "http://a:1");
        assert_eq!(router.pick_for(Target::Leader, None), "http://a:1");
    }

    #[test]
    fn any_target_round_robins_over_endpoints_only() {
        let mut router = router();
        router.observe_leader("http://d:9");
        let picks: Vec<String> = (0..4).map(|_| router.pick(Target::Any)).collect();
        assert_eq!(picks, vec!["http://a:1", "http://b:1", "http://c:1", "http://a:1"]);
    }
}
