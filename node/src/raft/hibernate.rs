//! Hibernation: a shard group nobody uses stops on every replica (no task, timer or
//! message) and wakes on the next request or raft message.
//!
//! Owns: the leader-side loop that finds idle groups, the pure readiness rule, and the
//! protocol: the leader asks every follower to stop at its exact position (`Hibernate`), and
//! stops itself only when all did. Waking is the host's: any request or raft message for a
//! dormant replica starts it again from disk (`RaftHost::wake`); a leader whose vote is
//! committed resumes as leader at once, and its first message wakes its followers.
//!
//! Invariants:
//! - hibernation only stops timers and tasks; it changes no raft state, so it cannot break
//!   safety. A replica woken alone campaigns after its election timeout, which wakes the rest;
//! - the meta group never hibernates; a group with learners or a joint configuration does not
//!   either (they need the leader), nor one the catalog does not know as it is (a sleeping
//!   group reports nothing);
//! - a leader stops only after every follower stopped at its last index with everything
//!   applied, and after no request touched it while it asked.

use super::host::{ForwardRequest, ForwardResponse, RaftHost};
use super::types::NodeId;
use crate::keys;
use openraft::{RaftMetrics, ServerState};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// A group's followers: id and address.
pub type Followers = Vec<(NodeId, String)>;

/// Where a leader would ask its followers to stop: `(term, last log index, followers)`, when
/// the group is at rest (pure).
pub fn ready_to_hibernate(m: &RaftMetrics<NodeId, openraft::BasicNode>, me: NodeId) -> Option<(u64, u64, Followers)> {
    if m.state != ServerState::Leader {
        return None;
    }
    let membership = m.membership_config.membership();
    if !super::types::is_settled(membership) {
        return None;
    }
    let last = m.last_log_index?;
    if m.last_applied.map(|l| l.index) != Some(last) {
        return None;
    }
    let replication = m.replication.as_ref()?;
    let mut followers = Vec::new();
    for voter in membership.voter_ids().filter(|v| *v != me) {
        let matched = replication.get(&voter).copied().flatten().map(|l| l.index);
        if matched != Some(last) {
            return None;
        }
        let addr = membership.get_node(&voter).map(|n| n.addr.clone())?;
        followers.push((voter, addr));
    }
    Some((m.current_term, last, followers))
}

/// How often the leader-side check runs for a given `hibernate_after`.
pub fn check_interval(hibernate_after: Duration) -> Duration {
    (hibernate_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Hibernates the groups this node leads once they have been idle for `hibernate_after`.
pub async fn run(host: Weak<RaftHost>) {
    let Some(after) = host.upgrade().and_then(|h| h.config.tuning.hibernate_after) else { return };
    let after_ms = after.as_millis() as u64;
    loop {
        tokio::time::sleep(check_interval(after)).await;
        let Some(host) = host.upgrade() else { return };
        for group in host.group_ids() {
            if group == keys::META_GROUP {
                continue;
            }
            let Some(h) = host.group(group) else { continue };
            if host.now_ms().saturating_sub(h.last_request_ms()) < after_ms {
                continue;
            }
            let metrics = h.raft.metrics().borrow().clone();
            let Some((term, last, followers)) = ready_to_hibernate(&metrics, host.config.node_id) else { continue };
            if host.catalog_behind(group) {
                // Report the shard first (the report loop does): a sleeping group reports nothing.
                continue;
            }
            let asked_at = h.last_request_ms();
            drop(h);
            if ask_followers(&host, group, term, last, &followers).await {
                let stopped = host
                    .hibernate_group(group, |h| {
                        let m = h.raft.metrics().borrow().clone();
                        h.last_request_ms() == asked_at
                            && ready_to_hibernate(&m, host.config.node_id)
                                .is_some_and(|(t, l, _)| (t, l) == (term, last))
                    })
                    .await;
                if stopped {
                    tracing::debug!(group, term, last, "group hibernated");
                }
            }
        }
    }
}

/// Asks every follower to stop at `(term, last)`; true when all did.
async fn ask_followers(host: &Arc<RaftHost>, group: u64, term: u64, last: u64, followers: &[(NodeId, String)]) -> bool {
    let request = ForwardRequest::Hibernate { term, last_log_index: last };
    let timeout = Duration::from_millis(host.config.tuning.heartbeat_interval_ms.max(100) * 2);
    for (node, addr) in followers {
        let reply = host.ask_node(group, *node, addr, &request, timeout).await;
        if !matches!(reply, Ok(ForwardResponse::Hibernated(true))) {
            return false;
        }
    }
    true
}
