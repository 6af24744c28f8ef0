//! The placement driver's decisions: a pure function from a cluster snapshot to operations.
//!
//! Owns: the re-replication rule (a replica on a dead node is re-created on the live node
//! with the fewest replicas that holds none of that shard; first, because a shard short of a
//! replica is one failure from losing its quorum), the split rules (by load: a shard whose
//! request rate stays above `split_qps`, split at the median of its sampled request keys so
//! the load halves; by size: above `split_bytes`, split at its middle key), the merge rule
//! (two adjacent shards, both cold and small, on the same replicas), the balance rules
//! (replica and leader counts per node within `balance_band`) and their bounds per round;
//! and `RangeChanges`, which dates each shard's last range change for the cooldown. It runs on the meta leader
//! (`api::elastic`), which gathers the snapshot and carries the operations out.
//!
//! Invariants: no I/O, no clock (time comes in the snapshot), no randomness; a shard gets at
//! most one operation per round; a shard whose range changed less than `cooldown` ago is
//! left alone (its load window still counts requests from before the change).

use crate::catalog::ShardDesc;
use crate::raft::types::{GroupId, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::time::Instant;

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
    /// A node that sent no load report for this long is dead: its replicas are re-created
    /// elsewhere. `None` never re-replicates (an operator removes the node instead).
    pub dead_after: Option<Duration>,
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
            // As CockroachDB's `server.time_until_store_dead`: long enough that a restart or
            // a short partition copies nothing.
            dead_after: Some(Duration::from_secs(300)),
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
    /// How long ago its range last changed (as far as the driver knows; `RangeChanges`).
    pub since_change: Duration,
}

/// The nodes as the driver sees them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodesView {
    /// Live member nodes (removed ones, and ones that stopped reporting, are not listed).
    pub nodes: Vec<NodeId>,
    /// Members silent for `dead_after` (their replicas are re-created elsewhere).
    pub dead: BTreeSet<NodeId>,
    /// Each active shard's leader, as the nodes reported it (hibernated shards have none).
    pub leaders: BTreeMap<GroupId, NodeId>,
}

/// When the driver first saw each shard at its current epoch: its range changed then (a
/// split or merge gives the shard a new epoch). Sets each view's `since_change`.
#[derive(Debug, Default)]
pub struct RangeChanges {
    /// `None`: already there on the first round as leader (settled).
    first_seen: BTreeMap<(GroupId, u64), Option<Instant>>,
    /// False until the first round after `clear` (this node just became meta leader).
    started: bool,
}

impl RangeChanges {
    /// Stamps `views` as of `now`: a (shard, epoch) not seen before changed now, except on
    /// the first round as leader, when nothing is known to have changed recently (settled).
    /// Forgets shards no longer listed.
    pub fn stamp(&mut self, views: &mut [ShardView], now: Instant) {
        let unseen = self.started.then_some(now);
        self.started = true;
        let mut current = BTreeSet::new();
        for v in views.iter_mut() {
            let key = (v.desc.id, v.desc.epoch);
            current.insert(key);
            let at = *self.first_seen.entry(key).or_insert(unseen);
            v.since_change = at.map_or(Duration::MAX, |at| now.saturating_duration_since(at));
        }
        self.first_seen.retain(|k, _| current.contains(k));
    }

    /// This node stopped leading the meta group: the next round starts afresh.
    pub fn clear(&mut self) {
        self.first_seen.clear();
        self.started = false;
    }
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

impl Action {
    /// The operation's name in metrics and logs: `split`, `merge`, `move` or `transfer`.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Split { .. } => "split",
            Action::Merge { .. } => "merge",
            Action::Move { .. } => "move",
            Action::TransferLeader { .. } => "transfer",
        }
    }

    /// Why the driver chose it (`load`, `size`, `cold`, `balance`, `re-replicate`, ...).
    pub fn reason(&self) -> &'static str {
        match self {
            Action::Split { reason, .. } | Action::Merge { reason, .. } | Action::Move { reason, .. } => reason,
            Action::TransferLeader { .. } => "balance",
        }
    }
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
    plan_re_replication(shards, nodes, config, &mut actions, &mut busy);
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

/// For each shard with a replica on a dead node (up to the round's bound), a move of that
/// replica to the live node with the fewest replicas that holds none of the shard (ties: the
/// lower id). Counts are updated as moves are planned, so one round spreads them. A shard
/// with no such node keeps its replica on the dead node (it may come back). A shard that
/// has its full count of live replicas besides the dead one (a move cut short after adding
/// the new replica) gets a move to one of those, which only removes the dead replica.
/// Cooldowns do not apply: a missing replica is a durability risk, not a load decision.
fn plan_re_replication(
    shards: &[ShardView],
    nodes: &NodesView,
    config: &PlacementConfig,
    actions: &mut Vec<Action>,
    busy: &mut BTreeSet<GroupId>,
) {
    if nodes.dead.is_empty() {
        return;
    }
    let mut counts = tally(nodes, shards.iter().flat_map(|s| s.desc.replicas.iter().copied()));
    let mut by_id: Vec<&ShardView> = shards.iter().collect();
    by_id.sort_by_key(|s| s.desc.id);
    for view in by_id {
        if actions.len() >= config.operations_per_round_max {
            return;
        }
        let Some(&from) = view.desc.replicas.iter().find(|r| nodes.dead.contains(r)) else { continue };
        let alive: Vec<NodeId> = view.desc.replicas.iter().copied().filter(|r| !nodes.dead.contains(r)).collect();
        let to = if alive.len() >= config.replicas {
            // Already re-created (a move cut short after its add): the move to a replica the
            // shard has only removes the dead one.
            alive.iter().copied().max()
        } else {
            let target = counts
                .iter()
                .filter(|(n, _)| !view.desc.replicas.contains(n) && !nodes.dead.contains(n))
                .min_by_key(|(n, c)| (**c, **n))
                .map(|(n, _)| *n);
            if let Some(to) = target {
                *counts.entry(to).or_default() += 1;
            }
            target
        };
        let Some(to) = to else { continue };
        busy.insert(view.desc.id);
        actions.push(Action::Move { shard: view.desc.id, from, to, reason: "re-replicate" });
    }
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
        NodesView { nodes: ids.to_vec(), leaders: leaders.iter().copied().collect(), dead: BTreeSet::new() }
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
    fn a_dead_nodes_replicas_are_re_created_on_the_emptiest_live_nodes_first() {
        // Nodes 1-5; node 2 is dead (not live, listed dead). Shards 1-3 are on 1,2,3; shard 4
        // on 1,3,4 and shard 5 on 2,4,5.
        let mut shards: Vec<ShardView> = (1..=5u64).map(|i| view(i, &[i as u8], &[i as u8 + 1], 10.0, 100)).collect();
        shards[3].desc.replicas = vec![1, 3, 4];
        shards[4].desc.replicas = vec![2, 4, 5];
        // A hot shard would split, but re-replication comes first and the shard is busy.
        shards[0].qps = 1_000.0;
        shards[0].sample = vec![vec![1, 5]; 3];
        let mut live = nodes(&[1, 3, 4, 5], &[]);
        live.dead = BTreeSet::from([2]);
        let config = PlacementConfig { split_qps: 100.0, ..balance_config() };
        let moves = |to: &[(GroupId, NodeId)]| -> Vec<Action> {
            to.iter().map(|&(shard, to)| Action::Move { shard, from: 2, to, reason: "re-replicate" }).collect()
        };
        // Replicas on live nodes: node 1 and 3 hold 4 each, node 4 two, node 5 one. Shard 1
        // goes to node 5 (then 2), shard 2 to node 4 (2 each: the lower id; then 3), shard 3 to
        // node 5, shard 5 (already on 4 and 5) to node 1 (4 each with node 3: the lower id).
        // The round's bound (4) is then used up: the hot shard does not split this round.
        assert_eq!(plan(&shards, &live, &config), moves(&[(1, 5), (2, 4), (3, 5), (5, 1)]));
        // A smaller bound stops early; the hot shard waits for a later round.
        let two = PlacementConfig { operations_per_round_max: 2, ..config.clone() };
        assert_eq!(plan(&shards, &live, &two), moves(&[(1, 5), (2, 4)]));
        // Only three live nodes, all holding the shard: nothing to re-create it on.
        let mut small = nodes(&[1, 3], &[]);
        small.dead = BTreeSet::from([2]);
        let first_three = &shards[1..3];
        assert_eq!(plan(first_three, &small, &config), vec![]);
        // Shard 5's move was cut short after node 1 joined: the re-run only drops node 2.
        let mut cut_short = shards.clone();
        cut_short[4].desc.replicas = vec![1, 2, 4, 5];
        assert_eq!(plan(&cut_short[4..], &live, &config), moves(&[(5, 5)]));
        // Nobody dead: the hot shard splits.
        assert_eq!(
            plan(&shards, &nodes(&[1, 2, 3, 4, 5], &[]), &PlacementConfig { balance_band: 0, ..config }),
            vec![Action::Split { shard: 1, expected_epoch: 3, key: vec![1, 5], reason: "load" }]
        );
    }

    #[test]
    fn a_shard_whose_range_just_changed_waits_out_the_cooldown() {
        let mut changes = RangeChanges::default();
        let t0 = Instant::now();
        let config = PlacementConfig { cooldown: Duration::from_secs(10), ..config() };
        let hot = |epoch: u64| {
            let mut v = view(1, b"a", b"z", 500.0, 10);
            v.desc.epoch = epoch;
            v.sample = [b"m1", b"m2", b"m3"].iter().map(|k| k.to_vec()).collect();
            v
        };
        // First round as leader: shards are settled, the hot one splits.
        let mut views = vec![hot(3)];
        changes.stamp(&mut views, t0);
        assert_eq!(plan(&views, &NodesView::default(), &config).len(), 1);
        // Next round the split applied (new epoch): its load window still counts the old
        // range, so it waits the cooldown (a bug planned on the new epoch at once, because the
        // view was built before the epoch was recorded: a hot range split every second).
        let mut views = vec![hot(4)];
        changes.stamp(&mut views, t0 + Duration::from_secs(1));
        assert_eq!(views[0].since_change, Duration::ZERO);
        assert_eq!(plan(&views, &NodesView::default(), &config), vec![]);
        let mut views = vec![hot(4)];
        changes.stamp(&mut views, t0 + Duration::from_secs(11));
        assert_eq!(views[0].since_change, Duration::from_secs(10));
        assert_eq!(plan(&views, &NodesView::default(), &config).len(), 1);
        // A new meta leader starts settled again.
        changes.clear();
        let mut views = vec![hot(5)];
        changes.stamp(&mut views, t0 + Duration::from_secs(12));
        assert!(views[0].since_change >= config.cooldown);
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
