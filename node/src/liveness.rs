//! Node liveness as the meta leader sees it, from the load reports every node sends it each
//! `PLACEMENT_INTERVAL` (`api::elastic`): a member silent for `down_after` is down; one silent
//! for `dead_after` (much longer) is dead.
//!
//! What it is for: a hibernated shard whose leader's node fails has no running replica to
//! notice; the meta leader tells the other nodes, which wake the shards that node led so they
//! elect a new leader before the next request needs one (`RaftHost::wake_groups_led_by`).
//! Down nodes get no new replicas. A dead node's replicas are re-created on other nodes by
//! the placement driver (`placement::plan`): the bound is long so a restart or a short
//! partition does not copy shards around.
//!
//! Owns: the pure down and dead rules and which nodes were already announced. No I/O, no
//! clock (the caller passes `now`).
//!
//! Invariants:
//! - a node is never declared down sooner than `down_after` after this node started watching
//!   (a new meta leader has no reports yet: silence before it led proves nothing);
//! - each failure is announced once: a node is announced again only after it reported in
//!   between (it came back and failed again);
//! - the watching node itself is never down;
//! - a dead node is down (`dead_after` is at least `down_after`).

use crate::raft::types::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::time::Instant;

/// A member silent this long is down (several report intervals: one lost report is not a
/// failure).
pub const DOWN_AFTER: Duration = Duration::from_secs(4);

/// The meta leader's view of which members stopped reporting.
#[derive(Debug)]
pub struct Liveness {
    down_after: Duration,
    /// `None`: no node is ever declared dead.
    dead_after: Option<Duration>,
    /// Since when this node watches (it became meta leader); `None` while it does not.
    watching_since: Option<Instant>,
    /// Members announced down and silent since.
    down: BTreeSet<NodeId>,
    /// Members silent for `dead_after`.
    dead: BTreeSet<NodeId>,
}

impl Liveness {
    /// `dead_after` below `down_after` counts as `down_after`.
    pub fn new(down_after: Duration, dead_after: Option<Duration>) -> Self {
        let dead_after = dead_after.map(|d| d.max(down_after));
        Self { down_after, dead_after, watching_since: None, down: BTreeSet::new(), dead: BTreeSet::new() }
    }

    /// One round on the meta leader `me`: the members that went down since the last round
    /// (to announce), given when each last reported.
    pub fn observe(
        &mut self,
        now: Instant,
        me: NodeId,
        members: &[NodeId],
        last_report: &BTreeMap<NodeId, Instant>,
    ) -> Vec<NodeId> {
        let since = *self.watching_since.get_or_insert(now);
        let mut newly_down = Vec::new();
        let (mut down, mut dead) = (BTreeSet::new(), BTreeSet::new());
        for &id in members.iter().filter(|id| **id != me) {
            let heard = last_report.get(&id).copied().map_or(since, |at| at.max(since));
            let silent = now.saturating_duration_since(heard);
            if silent >= self.down_after {
                down.insert(id);
                if !self.down.contains(&id) {
                    newly_down.push(id);
                }
            }
            if self.dead_after.is_some_and(|after| silent >= after) {
                dead.insert(id);
            }
        }
        self.down = down;
        self.dead = dead;
        newly_down
    }

    /// This node stopped leading the meta group: forget everything (a later term starts
    /// watching afresh).
    pub fn stop_watching(&mut self) {
        self.watching_since = None;
        self.down.clear();
        self.dead.clear();
    }

    /// True for a member announced down and still silent.
    pub fn is_down(&self, id: NodeId) -> bool {
        self.down.contains(&id)
    }

    /// The members silent for `dead_after` as of the last round.
    pub fn dead(&self) -> &BTreeSet<NodeId> {
        &self.dead
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_past_the_bound_is_announced_once() {
        let mut l = Liveness::new(Duration::from_secs(4), None);
        let t0 = Instant::now();
        let members = [1, 2, 3];
        let reports = |at2: Instant, at3: Instant| BTreeMap::from([(2, at2), (3, at3)]);
        // A new watcher waits the full bound even for nodes it never heard from.
        assert!(l.observe(t0, 1, &members, &BTreeMap::new()).is_empty());
        assert!(l.observe(t0 + Duration::from_secs(3), 1, &members, &BTreeMap::new()).is_empty());
        // Node 2 reports, node 3 stays silent: only 3 goes down, announced once.
        let t4 = t0 + Duration::from_secs(4);
        assert_eq!(l.observe(t4, 1, &members, &reports(t0 + Duration::from_secs(3), t0)), vec![3]);
        assert!(l.is_down(3) && !l.is_down(2) && !l.is_down(1));
        assert!(l.observe(t4 + Duration::from_secs(1), 1, &members, &reports(t4, t0)).is_empty());
        // Node 3 comes back, then fails again: announced again.
        let t6 = t0 + Duration::from_secs(6);
        assert!(l.observe(t6, 1, &members, &reports(t6, t6)).is_empty());
        assert!(!l.is_down(3));
        let t11 = t0 + Duration::from_secs(11);
        assert_eq!(l.observe(t11, 1, &members, &reports(t0 + Duration::from_secs(10), t6)), vec![3]);
    }

    #[test]
    fn a_new_term_starts_watching_afresh() {
        let mut l = Liveness::new(Duration::from_secs(4), None);
        let t0 = Instant::now();
        assert!(l.observe(t0, 1, &[1, 2], &BTreeMap::new()).is_empty());
        assert_eq!(l.observe(t0 + Duration::from_secs(5), 1, &[1, 2], &BTreeMap::new()), vec![2]);
        l.stop_watching();
        // Leading again later: old silence does not count at once.
        let t9 = t0 + Duration::from_secs(9);
        assert!(l.observe(t9, 1, &[1, 2], &BTreeMap::new()).is_empty());
        assert_eq!(l.observe(t9 + Duration::from_secs(4), 1, &[1, 2], &BTreeMap::new()), vec![2]);
    }

    #[test]
    fn a_node_silent_past_the_longer_bound_is_dead_until_it_reports() {
        let mut l = Liveness::new(Duration::from_secs(4), Some(Duration::from_secs(60)));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(l.observe(t0, 1, &[1, 2, 3], &BTreeMap::new()).is_empty());
        let reports = |at3: Instant| BTreeMap::from([(2, t0), (3, at3)]);
        assert_eq!(l.observe(at(5), 1, &[1, 2, 3], &reports(at(5))), vec![2]);
        assert!(l.dead().is_empty(), "down is not dead");
        l.observe(at(60), 1, &[1, 2, 3], &reports(at(60)));
        assert_eq!(l.dead().iter().copied().collect::<Vec<_>>(), vec![2]);
        assert!(l.is_down(2));
        // It reports again: neither down nor dead.
        l.observe(at(61), 1, &[1, 2, 3], &BTreeMap::from([(2, at(61)), (3, at(61))]));
        assert!(l.dead().is_empty() && !l.is_down(2));
        // A new meta leader waits the whole bound; off means never dead.
        l.stop_watching();
        l.observe(at(100), 1, &[1, 2, 3], &BTreeMap::new());
        assert!(l.dead().is_empty());
        let mut never = Liveness::new(Duration::from_secs(4), None);
        never.observe(t0, 1, &[1, 2], &BTreeMap::new());
        never.observe(at(10_000), 1, &[1, 2], &BTreeMap::new());
        assert!(never.is_down(2) && never.dead().is_empty());
        // A dead bound below the down bound is the down bound.
        let mut short = Liveness::new(Duration::from_secs(4), Some(Duration::from_secs(1)));
        short.observe(t0, 1, &[1, 2], &BTreeMap::new());
        short.observe(at(2), 1, &[1, 2], &BTreeMap::new());
        assert!(short.dead().is_empty());
        short.observe(at(4), 1, &[1, 2], &BTreeMap::new());
        assert!(short.dead().contains(&2));
    }
}
