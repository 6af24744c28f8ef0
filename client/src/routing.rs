//! Which node the next attempt goes to: the leader cache and endpoint rotation.
//!
//! Owns: the cached leader address (learned from `ResponseMeta.leader_grpc_addr`), the
//! "current" endpoint used for leader-bound requests when no leader is known, and the
//! round-robin cursor for requests that any replica may serve.
//!
//! Invariants: endpoints are normalized and non-empty; the cached leader is dropped after any
//! retryable failure against it, so a dead leader is never retried twice in a row by choice.
//!
//! Pure and synchronous (the client wraps it in a mutex); no I/O, no clock, no randomness.

use crate::endpoint::normalize_endpoint;

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
}

impl Router {
    /// `endpoints` must be normalized and non-empty (see `normalize_endpoints`).
    pub fn new(endpoints: Vec<String>) -> Self {
        assert!(!endpoints.is_empty(), "router needs at least one endpoint");
        Router { endpoints, leader: None, current: 0, next_any: 0 }
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

    /// Records that an attempt against `address` failed with a retryable error: forget it as
    /// leader and move the current endpoint past it, so the next attempt tries another node.
    pub fn report_failure(&mut self, address: &str) {
        if self.leader.as_deref() == Some(address) {
            self.leader = None;
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
    fn any_target_round_robins_over_endpoints_only() {
        let mut router = router();
        router.observe_leader("http://d:9");
        let picks: Vec<String> = (0..4).map(|_| router.pick(Target::Any)).collect();
        assert_eq!(picks, vec!["http://a:1", "http://b:1", "http://c:1", "http://a:1"]);
    }
}
