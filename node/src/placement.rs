//! The placement driver's decisions: a pure function from a cluster snapshot to operations.
//!
//! Owns: the split rules (by load: a shard whose request rate stays above `split_qps`, split
//! at the median of its sampled request keys so the load halves; by size: above
//! `split_bytes`, split at its middle key), the merge rule (two adjacent shards, both cold
//! and small, on the same replicas) and their bounds per round. It runs on the meta leader
//! (`api::elastic`), which gathers the snapshot and carries the operations out.
//!
//! Invariants: no I/O, no clock (time comes in the snapshot), no randomness; a shard gets at
//! most one operation per round; a shard whose range changed less than `cooldown` ago is
//! left alone (its load window still counts requests from before the change).

use crate::catalog::ShardDesc;
use crate::raft::types::{GroupId, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Thresholds of the elastic behaviour (config keys `split_qps`, `split_bytes`, `merge_qps`,
/// `merge_bytes`; `hibernate_after` lives in the raft tuning).
#[derive(Clone, Debug, PartialEq)]
pub struct PlacementConfig {
    /// Split a shard whose request rate (requests/s over the load window) exceeds this.
    /// 0 disables load splits.
    pub split_qps: f64,
    /// Split a shard whose data exceeds this many bytes. 0 disables size splits.
    pub split_bytes: u64,
    /// Merge two adjacent shards when each is below this rate (0 disables merges)...
    pub merge_qps: f64,
    /// ...and together they hold less than this many bytes.
    pub merge_bytes: u64,
    /// A shard is left alone this long after its range changed.
    pub cooldown: Duration,
    /// Bound on operations started per round.
    pub operations_per_round_max: usize,
    /// Replicas per shard (the replication factor) that joins and removals keep.
    pub replicas: usize,
    /// Balance: replicas (and, separately, leaders) per node may differ by this many
    /// between the fullest and the emptiest node before one moves. 0 disables balancing.
    pub balance_band: usize,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            split_qps: 2_500.0,
            split_bytes: 256 << 20,
            merge_qps: 50.0,
            merge_bytes: 64 << 20,
            cooldown: Duration::from_secs(30),
            operations_per_round_max: 4,
            replicas: 3,
            balance_band: 2,
        }
    }
}

/// One shard as the driver sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardView {
    pub desc: ShardDesc,
    /// Requests per second over the load window, summed over every node.
    pub qps: f64,
    /// Approximate bytes of its data.
    pub bytes: u64,
    /// Sampled request keys (from every node).
    pub sample: Vec<Vec<u8>>,
    /// Its middle key by size, when the snapshot computed one (large shards only).
    pub middle_key: Option<Vec<u8>>,
    /// How long ago its range last changed (as far as the driver knows).
    pub since_change: Duration,
}

/// The nodes as the driver sees them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodesView {
    /// Live member nodes (removed ones are not listed).
    pub nodes: Vec<NodeId>,
    /// Each active shard's leader, as the nodes reported it (hibernated shards have none).
    pub leaders: BTreeMap<GroupId, NodeId>,
}

/// What the driver wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Split {
        shard: GroupId,
        expected_epoch: u64,
        key: Vec<u8>,
        reason: &'static str,
    },
    Merge {
        left: GroupId,
        right: GroupId,
        reason: &'static str,
    },
    /// Move `shard`'s replica from node `from` to node `to` (add `to`, then remove `from`).
    Move {
        shard: GroupId,
        from: NodeId,
        to: NodeId,
        reason: &'static str,
    },
    /// Hand `shard`'s leadership from `from` to voter `to`.
    TransferLeader {
        shard: GroupId,
        from: NodeId,
        to: NodeId,
    },
}

fn strictly_inside(desc: &ShardDesc, key: &[u8]) -> bool {
    key > desc.start.as_slice() && (desc.end.is_empty() || key < desc.end.as_slice())
}

/// The median of `sample` that lies strictly inside the shard (so both halves get load).
fn load_split_key(view: &ShardView) -> Option<Vec<u8>> {
    let mut keys: Vec<&Vec<u8>> = view.sample.iter().filter(|k| view.desc.start.as_slice() <= k.as_slice()).collect();
    keys.retain(|k| view.desc.end.is_empty() || k.as_slice() < view.desc.end.as_slice());
    keys.sort();
    keys.dedup();
    let median = keys.get(keys.len() / 2)?;
    strictly_inside(&view.desc, median).then(|| (*median).clone())
}

/// Plans this round's operations for `shards` (any order) on `nodes`. Pure.
pub fn plan(shards: &[ShardView], nodes: &NodesView, config: &PlacementConfig) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut busy = BTreeSet::new();
    plan_splits_and_merges(shards, config, &mut actions, &mut busy);
    if actions.len() < config.operations_per_round_max {
        actions.extend(plan_replica_balance(shards, nodes, config, &busy));
    }
    if actions.len() < config.operations_per_round_max {
        actions.extend(plan_leader_balance(shards, nodes, config, &busy));
    }
    actions
}

/// How often each live node of `nodes` appears in `ids` (others are not counted).
fn tally(nodes: &NodesView, ids: impl Iterator<Item = NodeId>) -> BTreeMap<NodeId, usize> {
    let mut counts: BTreeMap<NodeId, usize> = nodes.nodes.iter().map(|n| (*n, 0)).collect();
    for id in ids {
        if let Some(c) = counts.get_mut(&id) {
            *c += 1;
        }
    }
    counts
}

/// The fullest and the emptiest node of `counts` (ties: the lower id), when they differ by
/// more than `band`.
fn out_of_band(counts: &BTreeMap<NodeId, usize>, band: usize) -> Option<(NodeId, NodeId)> {
    let (&full, &most) = counts.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))?;
    let (&empty, &least) = counts.iter().min_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(b.0)))?;
    (band > 0 && most > least + band).then_some((full, empty))
}

/// The cheapest shard to act on among `candidates`: coldest, then smallest, then lowest id.
fn cheapest<'a>(candidates: impl Iterator<Item = &'a ShardView>) -> Option<&'a ShardView> {
    candidates.min_by(|a, b| a.qps.total_cmp(&b.qps).then(a.bytes.cmp(&b.bytes)).then(a.desc.id.cmp(&b.desc.id)))
}

/// At most one replica move per round (a move copies a shard): from the node with the most
/// replicas to the one with the fewest, when they differ by more than the band. A node that
/// joined empty fills up this way; the shard moved is the cheapest one that can go.
fn plan_replica_balance(
    shards: &[ShardView],
    nodes: &NodesView,
    config: &PlacementConfig,
    busy: &BTreeSet<GroupId>,
) -> Option<Action> {
    let (from, to) =
        out_of_band(&tally(nodes, shards.iter().flat_map(|s| s.desc.replicas.iter().copied())), config.balance_band)?;
    let movable = shards.iter().filter(|s| {
        s.desc.replicas.contains(&from)
            && !s.desc.replicas.contains(&to)
            && !busy.contains(&s.desc.id)
            && s.since_change >= config.cooldown
    });
    let shard = cheapest(movable)?;
    Some(Action::Move { shard: shard.desc.id, from, to, reason: "balance" })
}

/// At most one leader transfer per round: from the node leading the most active shards to a
/// voter of one of them that leads the fewest, when they differ by more than the band.
fn plan_leader_balance(
    shards: &[ShardView],
    nodes: &NodesView,
    config: &PlacementConfig,
    busy: &BTreeSet<GroupId>,
) -> Option<Action> {
    let led: Vec<(&ShardView, NodeId)> =
        shards.iter().filter_map(|s| nodes.leaders.get(&s.desc.id).map(|l| (s, *l))).collect();
    let counts = tally(nodes, led.iter().map(|(_, l)| *l));
    let (from, _) = out_of_band(&counts, config.balance_band)?;
    let most = counts[&from];
    // Any voter of a shard `from` leads that leads fewer than `most - band` will do.
    let candidates = led.iter().filter(|(s, l)| *l == from && !busy.contains(&s.desc.id)).filter_map(|(s, _)| {
        let to = s
            .desc
            .replicas
            .iter()
            .filter(|r| counts.get(r).is_some_and(|c| c + config.balance_band < most))
            .min_by_key(|r| (counts[r], **r))?;
        Some((*s, *to))
    });
    let (shard, to) = candidates.min_by(|a, b| {
        a.0.qps.total_cmp(&b.0.qps).then(counts[&a.1].cmp(&counts[&b.1])).then(a.0.desc.id.cmp(&b.0.desc.id))
    })?;
    Some(Action::TransferLeader { shard: shard.desc.id, from, to })
}

/// Splits (hot or large shards), then merges of cold neighbours; neighbours that would merge
/// but sit on different replicas get one replica moved towards each other first.
fn plan_splits_and_merges(
    shards: &[ShardView],
    config: &PlacementConfig,
    actions: &mut Vec<Action>,
    busy: &mut BTreeSet<GroupId>,
) {
    let mut by_start: Vec<&ShardView> = shards.iter().collect();
    by_start.sort_by(|a, b| a.desc.start.cmp(&b.desc.start));
    // Splits first, hottest first: load is what users feel.
    let mut hot: Vec<&ShardView> = by_start.iter().copied().filter(|s| s.since_change >= config.cooldown).collect();
    hot.sort_by(|a, b| b.qps.total_cmp(&a.qps).then(a.desc.id.cmp(&b.desc.id)));
    for view in hot {
        if actions.len() >= config.operations_per_round_max {
            return;
        }
        let by_load = config.split_qps > 0.0 && view.qps > config.split_qps;
        let by_size = config.split_bytes > 0 && view.bytes > config.split_bytes;
        let split = if by_load {
            load_split_key(view).map(|k| (k, "load"))
        } else if by_size {
            view.middle_key.clone().filter(|k| strictly_inside(&view.desc, k)).map(|k| (k, "size"))
        } else {
            None
        };
        if let Some((key, reason)) = split {
            busy.insert(view.desc.id);
            actions.push(Action::Split { shard: view.desc.id, expected_epoch: view.desc.epoch, key, reason });
        }
    }
    if config.merge_qps <= 0.0 {
        return;
    }
    for pair in by_start.windows(2) {
        if actions.len() >= config.operations_per_round_max {
            break;
        }
        let (left, right) = (pair[0], pair[1]);
        let adjacent = !left.desc.end.is_empty() && left.desc.end == right.desc.start;
        let mut left_replicas = left.desc.replicas.clone();
        let mut right_replicas = right.desc.replicas.clone();
        left_replicas.sort_unstable();
        right_replicas.sort_unstable();
        let cold = left.qps < config.merge_qps && right.qps < config.merge_qps;
        let small = left.bytes.saturating_add(right.bytes) < config.merge_bytes;
        let settled = left.since_change >= config.cooldown && right.since_change >= config.cooldown;
        let free = !busy.contains(&left.desc.id) && !busy.contains(&right.desc.id);
        if !(adjacent && cold && small && settled && free) {
            continue;
        }
        busy.insert(left.desc.id);
        busy.insert(right.desc.id);
        if left_replicas == right_replicas {
            actions.push(Action::Merge { left: left.desc.id, right: right.desc.id, reason: "cold" });
            continue;
        }
        // Co-locate first: one replica of the right shard moves onto a node of the left.
        let from = right_replicas.iter().find(|r| !left_replicas.contains(r));
        let to = left_replicas.iter().find(|r| !right_replicas.contains(r));
        if let (Some(&from), Some(&to)) = (from, to) {
            actions.push(Action::Move { shard: right.desc.id, from, to, reason: "co-locate for merge" });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: GroupId, start: &[u8], end: &[u8], qps: f64, bytes: u64) -> ShardView {
        ShardView {
            desc: ShardDesc {
                id,
                start: start.to_vec(),
                end: end.to_vec(),
                epoch: 3,
                replicas: vec![1, 2, 3],
                replicas_at: 0,
                merged: vec![],
            },
            qps,
            bytes,
            sample: Vec::new(),
            middle_key: None,
            since_change: Duration::from_secs(600),
        }
    }

    fn config() -> PlacementConfig {
        PlacementConfig { split_qps: 100.0, split_bytes: 1_000, merge_qps: 5.0, merge_bytes: 500, ..Default::default() }
    }

    #[test]
    fn a_hot_shard_splits_at_the_median_of_its_requests() {
        let mut hot = view(1, b"a", b"z", 500.0, 10);
        hot.sample = [b"m1", b"m2", b"m3", b"m4", b"m5"].iter().map(|k| k.to_vec()).collect();
        let actions = plan(&[hot, view(2, b"z", b"", 1.0, 10)], &NodesView::default(), &config());
        assert_eq!(actions, vec![Action::Split { shard: 1, expected_epoch: 3, key: b"m3".to_vec(), reason: "load" }]);
    }

    #[test]
    fn a_hot_shard_whose_load_is_one_key_at_its_start_does_not_split() {
        // Every request hits the first key: no split point would move load off the shard.
        let mut hot = view(1, b"a", b"z", 500.0, 10);
        hot.sample = vec![b"a".to_vec(); 10];
        assert_eq!(plan(&[hot], &NodesView::default(), &config()), vec![]);
    }

    #[test]
    fn a_large_shard_splits_at_its_middle_and_a_recent_one_waits() {
        let mut big = view(1, b"a", b"", 1.0, 5_000);
        big.middle_key = Some(b"k".to_vec());
        let mut recent = view(2, b"", b"a", 1_000.0, 5_000);
        recent.sample = vec![b"0".to_vec(); 3];
        recent.middle_key = Some(b"0".to_vec());
        recent.since_change = Duration::from_secs(1);
        let actions = plan(&[big, recent], &NodesView::default(), &config());
        assert_eq!(actions, vec![Action::Split { shard: 1, expected_epoch: 3, key: b"k".to_vec(), reason: "size" }]);
    }

    #[test]
    fn cold_small_neighbours_on_the_same_replicas_merge() {
        let shards = [
            view(1, b"", b"f", 1.0, 100),
            view(2, b"f", b"m", 1.0, 100),
            view(3, b"m", b"t", 1.0, 100),
            view(4, b"t", b"", 50.0, 100),
        ];
        // 1 and 2 merge; 3 cannot pair with 2 (busy) and 4 is warm.
        assert_eq!(
            plan(&shards, &NodesView::default(), &config()),
            vec![Action::Merge { left: 1, right: 2, reason: "cold" }]
        );
        let mut moved = shards.clone();
        moved[1].desc.replicas = vec![1, 2, 4];
        assert_eq!(
            plan(&moved, &NodesView::default(), &config()),
            vec![Action::Move { shard: 2, from: 4, to: 3, reason: "co-locate for merge" }],
            "2 is on other replicas than 1: one of its replicas moves first; 4 is warm"
        );
        let big = [view(1, b"", b"f", 1.0, 400), view(2, b"f", b"", 1.0, 400)];
        assert_eq!(plan(&big, &NodesView::default(), &config()), vec![], "together too large");
    }

    fn nodes(ids: &[NodeId], leaders: &[(GroupId, NodeId)]) -> NodesView {
        NodesView { nodes: ids.to_vec(), leaders: leaders.iter().copied().collect() }
    }

    fn balance_config() -> PlacementConfig {
        PlacementConfig { split_qps: 0.0, split_bytes: 0, merge_qps: 0.0, balance_band: 1, ..Default::default() }
    }

    #[test]
    fn a_node_that_joined_empty_gets_the_coldest_replica_of_the_fullest_node() {
        let mut shards: Vec<ShardView> = (1..=4u64).map(|i| view(i, &[i as u8], &[i as u8 + 1], 10.0, 100)).collect();
        shards[2].qps = 1.0; // shard 3 is the coldest
        let actions = plan(&shards, &nodes(&[1, 2, 3, 4], &[]), &balance_config());
        // Nodes 1-3 hold 4 replicas each, node 4 none: node 1 (lowest id of the fullest)
        // gives shard 3 to node 4.
        assert_eq!(actions, vec![Action::Move { shard: 3, from: 1, to: 4, reason: "balance" }]);
        // Within the band nothing moves; a recently changed shard is not moved.
        assert_eq!(
            plan(&shards, &nodes(&[1, 2, 3, 4], &[]), &PlacementConfig { balance_band: 4, ..balance_config() }),
            vec![]
        );
        for s in &mut shards {
            s.since_change = Duration::from_secs(1);
        }
        assert_eq!(plan(&shards, &nodes(&[1, 2, 3, 4], &[]), &balance_config()), vec![]);
    }

    #[test]
    fn leadership_moves_from_the_busiest_leader_to_a_voter_that_leads_less() {
        let shards: Vec<ShardView> = (1..=4u64).map(|i| view(i, &[i as u8], &[i as u8 + 1], 10.0, 100)).collect();
        let all_on_1 = nodes(&[1, 2, 3], &[(1, 1), (2, 1), (3, 1), (4, 1)]);
        assert_eq!(
            plan(&shards, &all_on_1, &balance_config()),
            vec![Action::TransferLeader { shard: 1, from: 1, to: 2 }]
        );
        let spread = nodes(&[1, 2, 3], &[(1, 1), (2, 2), (3, 3), (4, 1)]);
        assert_eq!(plan(&shards, &spread, &balance_config()), vec![], "2/1/1 is within a band of 1");
        assert_eq!(plan(&shards, &all_on_1, &PlacementConfig { balance_band: 0, ..balance_config() }), vec![]);
    }

    #[test]
    fn operations_per_round_are_bounded() {
        let shards: Vec<ShardView> = (0..10u8)
            .map(|i| {
                let mut v = view(i as u64 + 1, &[i * 2], &[i * 2 + 2], 500.0, 10);
                v.sample = vec![vec![i * 2, 1]; 3];
                v
            })
            .collect();
        let actions =
            plan(&shards, &NodesView::default(), &PlacementConfig { operations_per_round_max: 3, ..config() });
        assert_eq!(actions.len(), 3);
    }
}
