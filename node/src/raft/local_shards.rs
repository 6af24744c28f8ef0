//! The applied state of every group replica on this node (range, epoch, status) and the
//! events a group's apply raises for the host.
//!
//! Owns: one `GroupState` per group replica known on this node, kept current by the state
//! machines as they apply (open, split, snapshot install), the range map built from them
//! (what this node's own replicas say about key ownership, often newer than its copy of the
//! catalog), and the channel that tells the host to start a split's children.
//!
//! Invariant: a state here is exactly what its group's state machine last applied; only state
//! machines write it.

use super::types::GroupId;
use crate::shard::{GroupState, RangeMap};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Something a group's apply asks the host to do once it is durable in the apply batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupEvent {
    /// `parent` applied a split that created `children` on this node: start them.
    ChildrenBorn { parent: GroupId, children: Vec<GroupId> },
    /// `group` retired into merged group `into`: start it once both parts retired here.
    Retired { group: GroupId, into: GroupId },
}

/// See the module doc.
pub struct LocalShards {
    states: Mutex<BTreeMap<GroupId, GroupState>>,
    /// Groups that have been started on this node (a split must not seed raft state under
    /// a replica that runs, even one still empty).
    opened: Mutex<std::collections::BTreeSet<GroupId>>,
    /// Bumped on every change; the cached map is rebuilt when it is stale.
    generation: AtomicU64,
    map: Mutex<(u64, Arc<RangeMap>)>,
    events: mpsc::UnboundedSender<GroupEvent>,
}

impl LocalShards {
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<GroupEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let shards = Self {
            states: Mutex::new(BTreeMap::new()),
            opened: Mutex::new(std::collections::BTreeSet::new()),
            generation: AtomicU64::new(1),
            map: Mutex::new((0, Arc::new(RangeMap::default()))),
            events,
        };
        (Arc::new(shards), rx)
    }

    /// Records `state` as the group's applied state. The range map is rebuilt only when a
    /// state changed: a replica waking from hibernation records the state it already had
    /// (rebuilding a 10,000-shard map on every wake cost ~8 ms of each wake's latency).
    pub fn set(&self, state: GroupState) {
        let changed = match self.states.lock() {
            Ok(mut states) => states.insert(state.id, state.clone()).is_none_or(|old| old != state),
            Err(_) => true,
        };
        if changed {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Records that `group` was started on this node.
    pub fn mark_open(&self, group: GroupId) {
        if let Ok(mut opened) = self.opened.lock() {
            opened.insert(group);
        }
    }

    /// True when `group` was started on this node (it has a raft core, or had one).
    pub fn is_open(&self, group: GroupId) -> bool {
        self.opened.lock().is_ok_and(|o| o.contains(&group))
    }

    pub fn get(&self, group: GroupId) -> Option<GroupState> {
        self.states.lock().ok()?.get(&group).cloned()
    }

    /// Every known group state, by id.
    pub fn all(&self) -> Vec<GroupState> {
        self.states.lock().map(|s| s.values().cloned().collect()).unwrap_or_default()
    }

    /// Forgets a group whose replica was destroyed here (merged away).
    pub fn remove(&self, group: GroupId) {
        if let Ok(mut states) = self.states.lock() {
            states.remove(&group);
        }
        if let Ok(mut opened) = self.opened.lock() {
            opened.remove(&group);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Groups other than `group` that own a key of `[start, end)`, except the parts of a merge
    /// into `group` (their data is final; `group` replaces them). A retired group owns
    /// nothing.
    pub fn overlapping(&self, start: &[u8], end: &[u8], group: GroupId) -> Vec<GroupState> {
        self.states
            .lock()
            .map(|s| {
                s.values()
                    .filter(|g| g.id != group && !g.is_retired() && g.merging_into() != Some(group))
                    .filter(|g| g.overlaps(start, end))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The local parts of a merge into `into` (frozen or retired for it).
    pub fn merge_parts(&self, into: GroupId) -> Vec<GroupState> {
        self.states
            .lock()
            .map(|s| s.values().filter(|g| g.merging_into() == Some(into)).cloned().collect())
            .unwrap_or_default()
    }

    /// Which local group owns each key, by the replicas' own applied states.
    pub fn range_map(&self) -> Arc<RangeMap> {
        let generation = self.generation.load(Ordering::Acquire);
        let Ok(mut cached) = self.map.lock() else { return Arc::default() };
        if cached.0 != generation {
            let states = self.all();
            let owning = states.iter().filter(|g| !g.is_retired());
            let map = RangeMap::build(owning.map(|g| (g.id, g.start.as_slice(), g.end.as_slice(), g.epoch)));
            *cached = (generation, Arc::new(map));
        }
        cached.1.clone()
    }

    /// Hands `event` to the host (dropped when the host is gone: a crashed node).
    pub fn raise(&self, event: GroupEvent) {
        let _ = self.events.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_map_is_rebuilt_only_when_a_state_changes() {
        let (shards, _events) = LocalShards::new();
        shards.set(GroupState::initial(1, (b"a".to_vec(), b"m".to_vec())));
        let first = shards.range_map();
        assert_eq!(first.lookup(b"c").map(|(g, _)| g), Some(1));
        // A waking replica records the state it already had: same map.
        shards.set(GroupState::initial(1, (b"a".to_vec(), b"m".to_vec())));
        assert!(Arc::ptr_eq(&first, &shards.range_map()));
        // A changed range: a new map.
        shards.set(GroupState::initial(1, (b"a".to_vec(), b"f".to_vec())));
        let second = shards.range_map();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.lookup(b"g"), None);
    }
}
