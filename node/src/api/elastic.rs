//! Elastic shards on `NodeApi`: splitting (by hand or by the placement driver), the load
//! reports every node sends the meta leader, and the placement loop the meta leader runs.
//!
//! Owns: carrying out a split (new group ids from the meta group, the split entry in the
//! parent's log, the report of the result to the meta group), gathering the placement
//! driver's snapshot (load, size, middle keys), and running its decisions.
//!
//! Invariants:
//! - a split is planned against the epoch this node's replica of the parent applied after a
//!   linearizable read of it, and refused by apply if the parent changed since (no stale
//!   split is ever applied);
//! - the driver runs only on the meta leader; every operation it starts is bounded by the
//!   request timeout; a failed one is retried by a later round, never in a loop here.

use super::{ApiError, NodeApi};
use crate::catalog::{CatalogCommand, CatalogResponse, MergeIntent, MergeState, ShardDesc};
use crate::keys;
use crate::liveness::{self, Liveness};
use crate::placement::{self, Action, NodesView, RangeChanges, ShardView};
use crate::raft::host::ForwardRequest;
use crate::raft::types::{Command, CommandResponse, GroupId, SplitDone};
use crate::shard::{GroupState, MergeRefused, SplitAt, SplitRefused};
use crate::storage::Cf;
use crate::transport::{Envelope, RpcKind};
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often every node reports its load to the meta leader, and the driver runs.
pub const PLACEMENT_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on the bytes scanned to find a shard's middle key.
pub const MIDDLE_KEY_SCAN_BYTES_MAX: u64 = 1 << 30;
/// Bound on the split points of one request.
pub const SPLIT_KEYS_MAX: usize = 10_000;
/// A shard's size is measured again after this long (sizes change slowly; measuring every
/// shard every round would cost the meta leader CPU with many idle shards).
pub const SIZE_REFRESH: Duration = Duration::from_secs(10);

/// A merge still preparing after this long (its coordinator is gone) is aborted.
pub const MERGE_PREPARE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on waiting for the merged group to start on the coordinator's node.
pub const MERGED_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Shard sizes by `(id, epoch)` with when they were measured.
type SizeCache = BTreeMap<(GroupId, u64), (tokio::time::Instant, u64)>;

fn split_error(e: SplitRefused) -> ApiError {
    match e {
        SplitRefused::EpochChanged { .. } | SplitRefused::MembershipChanging(_) | SplitRefused::NotActive { .. } => {
            ApiError::Unavailable { message: e.to_string(), retry_safe: true }
        }
        _ => ApiError::invalid("invalid_split", e.to_string()),
    }
}

impl NodeApi {
    /// Splits shards at `at` (data keys, each becoming the start of a new shard; several
    /// keys in one shard split it into several at once). Returns each split's result.
    pub async fn split_at(&self, mut at: Vec<Vec<u8>>) -> Result<Vec<SplitDone>, ApiError> {
        if at.is_empty() {
            return Err(ApiError::invalid("invalid_split", "give at least one split key"));
        }
        if at.len() > SPLIT_KEYS_MAX {
            return Err(ApiError::invalid(
                "invalid_split",
                format!("{} split keys, the limit is {SPLIT_KEYS_MAX}", at.len()),
            ));
        }
        at.sort();
        at.dedup();
        let mut by_shard: BTreeMap<GroupId, Vec<Vec<u8>>> = BTreeMap::new();
        for key in at {
            if key.first() != Some(&keys::DOC_PREFIX) {
                return Err(ApiError::invalid("invalid_split", "split keys must be document keys"));
            }
            by_shard.entry(self.route(&key)?).or_default().push(key);
        }
        let mut out = Vec::new();
        for (shard, keys) in by_shard {
            out.push(self.split_shard(shard, keys).await?);
        }
        Ok(out)
    }

    /// The manual split: at documents `ids` of `collection` (each starts a new shard), or,
    /// with no ids, shard `shard` at the median of its recent requests or its middle by size.
    pub async fn split(
        &self,
        shard: GroupId,
        tenant: &str,
        collection: &str,
        ids: &[String],
    ) -> Result<Vec<SplitDone>, ApiError> {
        if !ids.is_empty() {
            let tenant = super::tenant_or_default(tenant);
            self.check_tenant_collection(tenant, collection)?;
            for id in ids {
                crate::docs::limits::check_id(id, &self.limits)?;
            }
            return self.split_at(ids.iter().map(|id| keys::doc_key(tenant, collection, id)).collect()).await;
        }
        if shard == 0 {
            return Err(ApiError::invalid("invalid_split", "give a shard id, or a collection and the ids to split at"));
        }
        let map = self.catalog.shard_map()?;
        let desc = map.shards.get(&shard).cloned().ok_or_else(|| ApiError::NotFound {
            code: "shard_not_found",
            message: format!("shard {shard} does not exist"),
        })?;
        let sample = self.host.cluster_load().remove(&shard).map(|l| l.sample).unwrap_or_default();
        let inside = |k: &Vec<u8>| {
            k.as_slice() > desc.start.as_slice() && (desc.end.is_empty() || k.as_slice() < desc.end.as_slice())
        };
        let key = match crate::load::median_key(sample).filter(inside) {
            Some(k) => k,
            None => self.middle_key(&desc)?.filter(inside).ok_or_else(|| {
                ApiError::invalid(
                    "invalid_split",
                    format!("shard {shard} has no key to split at (empty, or one document); give the ids to split at"),
                )
            })?,
        };
        Ok(vec![self.split_shard(shard, vec![key]).await?])
    }

    /// Splits `shard` at `keys` (increasing, strictly inside it).
    pub async fn split_shard(&self, shard: GroupId, keys: Vec<Vec<u8>>) -> Result<SplitDone, ApiError> {
        if shard == keys::META_GROUP {
            return Err(ApiError::invalid("invalid_split", "the meta group does not split"));
        }
        let count = keys.len() as u64;
        let first = match self.propose_catalog(CatalogCommand::AllocateGroupIds { count }).await? {
            CatalogResponse::GroupIds { first } => first,
            other => return Err(ApiError::Internal { message: format!("unexpected catalog result {other:?}") }),
        };
        let at: Vec<SplitAt> = keys.into_iter().zip(first..).map(|(key, child)| SplitAt { key, child }).collect();
        // Plan against what the shard is now: a linearizable read brings this replica up to
        // date; apply refuses the split if the shard changed after all.
        self.host.linearizable_position(shard).await?;
        let expected_epoch = self.host.local.get(shard).map(|s| s.epoch).ok_or_else(|| ApiError::Unavailable {
            message: format!("shard {shard} has no replica here"),
            retry_safe: true,
        })?;
        let command = Command::Split { expected_epoch, at };
        let done = match self.host.propose(shard, command).await? {
            (_, CommandResponse::Split(Ok(done))) => done,
            (_, CommandResponse::Split(Err(refused))) => return Err(split_error(refused)),
            (_, CommandResponse::WrongGroup(m)) => return Err(ApiError::invalid("invalid_split", m)),
            (_, other) => return Err(ApiError::Internal { message: format!("unexpected split result {other:?}") }),
        };
        // The parent's leader reports the split too (and keeps reporting until the catalog has
        // it); reporting here makes the catalog current before this call returns.
        // The children's voters are the parent's (from its membership on this node).
        let parent_desc =
            self.host.shard_desc(shard).or_else(|| self.catalog.shard_map().ok()?.shards.get(&shard).cloned());
        let (replicas, replicas_at) = parent_desc.map(|d| (d.replicas, d.replicas_at)).unwrap_or_default();
        let shards = std::iter::once(&done.parent)
            .chain(&done.children)
            .map(|g| ShardDesc {
                id: g.id,
                start: g.start.clone(),
                end: g.end.clone(),
                epoch: g.epoch,
                replicas: replicas.clone(),
                replicas_at,
                merged: Vec::new(),
            })
            .collect();
        self.propose_catalog(CatalogCommand::ReportShards { shards }).await?;
        tracing::info!(
            shard,
            children = ?done.children.iter().map(|c| c.id).collect::<Vec<_>>(),
            epoch = done.parent.epoch,
            "shard split"
        );
        Ok(done)
    }

    /// Merges adjacent shards `left` and `right` (same replicas) into a new shard: both are
    /// frozen, the meta group commits the merge, both retire, and every node starts the
    /// merged shard over the data it already holds. Returns the merged shard's state.
    pub async fn merge_shards(&self, left: GroupId, right: GroupId) -> Result<GroupState, ApiError> {
        // The coordinator reads both parts' applied states: a node not hosting both has one
        // of their replicas do it (a cluster larger than the replication factor; found by the
        // simulator, seed 924 with 5 nodes: the meta leader's merges failed forever).
        if !(self.host.hosts(left) && self.host.hosts(right)) {
            return self.merge_through_replica(left, right).await;
        }
        self.merge_here(left, right).await
    }

    /// `merge_shards` coordinated by this node (it must host both parts).
    pub(super) async fn merge_here(&self, left: GroupId, right: GroupId) -> Result<GroupState, ApiError> {
        let map = self.catalog.shard_map()?;
        let found = |id: GroupId| {
            map.shards.get(&id).cloned().ok_or_else(|| ApiError::NotFound {
                code: "shard_not_found",
                message: format!("shard {id} does not exist"),
            })
        };
        let (mut l, mut r) = (found(left)?, found(right)?);
        if r.end == l.start && !r.end.is_empty() {
            std::mem::swap(&mut l, &mut r);
        }
        if l.end.is_empty() || l.end != r.start {
            return Err(ApiError::invalid("invalid_merge", format!("shards {left} and {right} are not adjacent")));
        }
        if l.replicas.len() != r.replicas.len() || l.replicas.iter().any(|n| !r.replicas.contains(n)) {
            return Err(ApiError::invalid(
                "invalid_merge",
                format!("shards {} and {} are on different replicas ({:?}, {:?})", l.id, r.id, l.replicas, r.replicas),
            ));
        }
        // Plan against what the parts are now (a linearizable read of each brings this
        // node's replicas up to date); each freeze is refused if its part changed since.
        let mut parts = Vec::with_capacity(2);
        for id in [l.id, r.id] {
            self.host.linearizable_position(id).await?;
            parts.push(self.host.local.get(id).ok_or_else(|| ApiError::Unavailable {
                message: format!("shard {id} has no replica on this node"),
                retry_safe: true,
            })?);
        }
        let (left_state, right_state) = (parts[0].clone(), parts[1].clone());
        // The voters to freeze with: the parts' memberships as applied here (the catalog's
        // replica lists may lag); each freeze checks its part's own.
        let voters_of = |id: GroupId| self.host.shard_desc(id).map(|d| d.replicas).unwrap_or_default();
        let mut voters = voters_of(l.id);
        let mut right_voters = voters_of(r.id);
        voters.sort_unstable();
        right_voters.sort_unstable();
        if voters.is_empty() || voters != right_voters {
            return Err(ApiError::invalid(
                "invalid_merge",
                format!("shards {} and {} are on different replicas ({voters:?}, {right_voters:?})", l.id, r.id),
            ));
        }
        if left_state.end.is_empty() || left_state.end != right_state.start {
            return Err(ApiError::Unavailable {
                message: format!(
                    "shards {} and {} are no longer adjacent (a split or merge applied meanwhile)",
                    l.id, r.id
                ),
                retry_safe: true,
            });
        }
        let into = match self.propose_catalog(CatalogCommand::AllocateGroupIds { count: 1 }).await? {
            CatalogResponse::GroupIds { first } => first,
            other => return Err(ApiError::Internal { message: format!("unexpected catalog result {other:?}") }),
        };
        match self.propose_catalog(CatalogCommand::BeginMerge { into, left: l.id, right: r.id }).await? {
            CatalogResponse::Merge(Some(_)) => {}
            CatalogResponse::MergeBusy { busy } => {
                return Err(ApiError::Unavailable {
                    message: format!("shard {} or {} is already in merge {busy}", l.id, r.id),
                    retry_safe: true,
                })
            }
            other => return Err(ApiError::Internal { message: format!("unexpected catalog result {other:?}") }),
        }
        // Freeze both at the epochs their replicas here applied after a linearizable read.
        let mut refused = None;
        for (part, partner) in [(&left_state, r.id), (&right_state, l.id)] {
            if let Err(e) = self.freeze(part, partner, into, &voters).await {
                refused = Some(e);
                break;
            }
        }
        let commit = refused.is_none();
        let decided = match self.propose_catalog(CatalogCommand::DecideMerge { into, commit }).await? {
            CatalogResponse::Merge(Some(intent)) => intent,
            other => return Err(ApiError::Internal { message: format!("unexpected catalog result {other:?}") }),
        };
        self.finish_merge(&decided).await?;
        if decided.state == MergeState::Aborted {
            // Best effort: the placement loop forgets it otherwise.
            let _ = self.propose_catalog(CatalogCommand::ForgetMerge { into }).await;
        }
        match (decided.state, refused) {
            (MergeState::Committed, _) => {}
            (_, Some(e)) => return Err(e),
            (state, None) => {
                return Err(ApiError::Unavailable { message: format!("merge {into} was {state:?}"), retry_safe: true })
            }
        }
        let deadline = tokio::time::Instant::now() + MERGED_START_TIMEOUT;
        loop {
            if let Some(state) = self.host.local.get(into).filter(|_| self.host.group(into).is_some()) {
                tracing::info!(into, left = l.id, right = r.id, epoch = state.epoch, "shards merged");
                // The merged shard's leader reports it too (and keeps reporting until the
                // catalog has it); reporting here makes the catalog current before this call
                // returns (it removes the parts).
                if let Err(e) = self.host.report_shards(&[into]).await {
                    tracing::debug!(into, error = %e, "reporting the merge; the leader's report retries");
                }
                return Ok(state);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ApiError::Unavailable {
                    message: format!("merge {into} committed, the merged shard has not started on this node yet"),
                    retry_safe: true,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Freezes `part` (as planned) for merging into `into`.
    async fn freeze(&self, part: &GroupState, partner: GroupId, into: GroupId, voters: &[u64]) -> Result<(), ApiError> {
        let cmd = Command::Freeze {
            into,
            partner,
            expected_epoch: part.epoch,
            start: part.start.clone(),
            end: part.end.clone(),
            voters: voters.to_vec(),
        };
        self.merge_step(part.id, cmd).await
    }

    async fn merge_step(&self, part: GroupId, cmd: Command) -> Result<(), ApiError> {
        match self.host.propose(part, cmd).await? {
            (_, CommandResponse::Merge(Ok(_))) => Ok(()),
            (_, CommandResponse::Merge(Err(e))) => Err(match e {
                MergeRefused::ReplicasDiffer { .. } | MergeRefused::Aborted { .. } => {
                    ApiError::invalid("invalid_merge", e.to_string())
                }
                _ => ApiError::Unavailable { message: e.to_string(), retry_safe: true },
            }),
            (_, other) => Err(ApiError::Internal { message: format!("unexpected merge result {other:?}") }),
        }
    }

    /// Carries out a decided merge's step on both parts: retire (committed) or unfreeze
    /// (aborted). Idempotent; the placement loop re-runs it for a merge left unfinished.
    async fn finish_merge(&self, intent: &MergeIntent) -> Result<(), ApiError> {
        let cmd = |_: GroupId| match intent.state {
            MergeState::Committed => Some(Command::Retire { into: intent.into }),
            MergeState::Aborted => Some(Command::Unfreeze { into: intent.into }),
            MergeState::Preparing => None,
        };
        for part in [intent.left, intent.right] {
            let Some(cmd) = cmd(part) else { return Ok(()) };
            match self.merge_step(part, cmd).await {
                Ok(()) => {}
                // Already retired and destroyed here (the merged shard replaced it).
                Err(_) if self.host.local.get(part).is_none() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The key that splits `shard` in half by size, scanning at most
    /// `MIDDLE_KEY_SCAN_BYTES_MAX` bytes of this node's replica (`None`: too small or empty).
    pub fn middle_key(&self, desc: &ShardDesc) -> Result<Option<Vec<u8>>, ApiError> {
        let engine = self.host.engine();
        let total = engine.approximate_size(Cf::Data, &desc.start, &desc.end);
        let half = (total / 2).min(MIDDLE_KEY_SCAN_BYTES_MAX);
        let mut seen = 0u64;
        let mut from = desc.start.clone();
        loop {
            let page = engine.scan(Cf::Data, &from, &desc.end, 1_024)?;
            let Some(last) = page.last().map(|(k, _)| k.clone()) else { return Ok(None) };
            for (k, v) in &page {
                seen += (k.len() + v.len()) as u64;
                if seen >= half && k.as_slice() > desc.start.as_slice() {
                    return Ok(Some(k.clone()));
                }
            }
            from = last;
            from.push(0);
        }
    }

    /// The placement driver's snapshot of every shard.
    fn placement_view(&self, sizes: &mut SizeCache) -> Result<Vec<ShardView>, ApiError> {
        let load = self.host.cluster_load();
        let now = tokio::time::Instant::now();
        let config = &self.placement;
        let map = self.catalog.shard_map()?;
        let mut views = Vec::with_capacity(map.shards.len());
        for desc in map.shards.values() {
            let bytes = match sizes.get(&(desc.id, desc.epoch)) {
                Some((at, bytes)) if now.saturating_duration_since(*at) < SIZE_REFRESH => *bytes,
                _ => {
                    let bytes = self.host.engine().approximate_size(Cf::Data, &desc.start, &desc.end);
                    sizes.insert((desc.id, desc.epoch), (now, bytes));
                    bytes
                }
            };
            let middle_key =
                if config.split_bytes > 0 && bytes > config.split_bytes { self.middle_key(desc)? } else { None };
            let shard_load = load.get(&desc.id).cloned().unwrap_or_default();
            views.push(ShardView {
                desc: desc.clone(),
                qps: shard_load.qps,
                bytes,
                sample: shard_load.sample,
                middle_key,
                // Set by `RangeChanges::stamp`.
                since_change: Duration::ZERO,
            });
        }
        Ok(views)
    }

    /// The driver's view of the nodes: the live members and who leads each active shard.
    /// On the meta leader: finds the members that stopped reporting and has every other
    /// node (this one too) wake the hibernated shards each of them led.
    fn announce_failures(&self, liveness: &mut Liveness) {
        let Ok(view) = self.nodes_view() else { return };
        let Ok(all) = self.catalog.nodes() else { return };
        let now = tokio::time::Instant::now();
        for down in liveness.observe(now, self.node_id, &view.nodes, &self.host.report_times()) {
            tracing::warn!(node = down, "node stopped reporting; the others wake the shards it led");
            let peers = all
                .iter()
                .filter(|n| n.id != down && n.id != self.node_id && view.nodes.contains(&n.id))
                .map(|n| (n.id, n.grpc_addr.clone()))
                .collect();
            self.host.announce_peer_down(down, peers);
        }
    }

    fn nodes_view(&self) -> Result<NodesView, ApiError> {
        let mut nodes = Vec::new();
        for n in self.catalog.nodes()? {
            if !self.catalog.is_removed(n.id)? {
                nodes.push(n.id);
            }
        }
        Ok(NodesView { nodes, leaders: self.host.reported_leaders(), dead: Default::default() })
    }

    /// Carries out one planned operation.
    async fn run_action(&self, action: Action) -> Result<(), ApiError> {
        match action {
            Action::Split { shard, expected_epoch, key, reason } => {
                let current = self.host.local.get(shard).map(|s| s.epoch);
                if current.is_some_and(|e| e != expected_epoch) {
                    return Ok(()); // planned on an older view; the next round sees the new one
                }
                tracing::info!(shard, reason, key = %keys::to_hex(&key), "placement: splitting shard");
                self.split_shard(shard, vec![key]).await.map(|_| ())
            }
            Action::Merge { left, right, reason } => {
                tracing::info!(left, right, reason, "placement: merging shards");
                self.merge_shards(left, right).await.map(|_| ())
            }
            Action::Move { shard, from, to, reason } => {
                tracing::info!(shard, from, to, reason, "placement: moving a replica");
                self.move_replica(shard, from, to).await.map(|_| ())
            }
            Action::TransferLeader { shard, from, to } => {
                tracing::info!(shard, from, to, "placement: transferring leadership");
                self.transfer_leader(shard, to).await.map(|_| ())
            }
        }
    }
}

impl NodeApi {
    /// On the meta leader: finishes merges their coordinator left behind: a committed one
    /// retires its parts, one preparing for longer than `MERGE_PREPARE_TIMEOUT` is aborted
    /// and its parts unfrozen.
    async fn resolve_merges(&self, preparing: &mut BTreeMap<GroupId, tokio::time::Instant>) {
        let Ok(intents) = self.catalog.merges() else { return };
        preparing.retain(|into, _| intents.iter().any(|i| i.into == *into && i.state == MergeState::Preparing));
        for intent in intents {
            let decided = match intent.state {
                MergeState::Preparing => {
                    let since = *preparing.entry(intent.into).or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() < MERGE_PREPARE_TIMEOUT {
                        continue;
                    }
                    match self.propose_catalog(CatalogCommand::DecideMerge { into: intent.into, commit: false }).await {
                        Ok(CatalogResponse::Merge(Some(decided))) => decided,
                        _ => continue,
                    }
                }
                _ => intent,
            };
            let finished = tokio::time::timeout(self.request_timeout() * 2, self.finish_merge(&decided)).await;
            if !matches!(finished, Ok(Ok(()))) {
                tracing::info!(into = decided.into, state = ?decided.state, "finishing a merge failed; a later round retries");
                continue;
            }
            if decided.state == MergeState::Aborted {
                // Nothing more to wait for: forget the record.
                let _ = self.propose_catalog(CatalogCommand::ForgetMerge { into: decided.into }).await;
            }
        }
    }
}

/// Sends this node's load to the meta leader every `PLACEMENT_INTERVAL`.
pub async fn report_load_loop(api: Weak<NodeApi>) {
    loop {
        tokio::time::sleep(PLACEMENT_INTERVAL).await;
        let Some(api) = api.upgrade() else { return };
        let groups = api.load_snapshot();
        let host = api.host().clone();
        let leading: Vec<GroupId> = host
            .group_ids()
            .into_iter()
            .filter(|g| *g != keys::META_GROUP && host.group(*g).is_some_and(|h| h.is_leader()))
            .collect();
        let Some(meta) = host.group(keys::META_GROUP) else { continue };
        match meta.leader() {
            Some((id, _)) if id == api.node_id => host.record_load_report(id, groups, leading),
            Some((id, addr)) if !addr.is_empty() => {
                let env = Envelope {
                    cluster_id: host.config.cluster_id.clone(),
                    group_id: keys::META_GROUP,
                    from_node: api.node_id,
                    to_node: id,
                };
                let Ok(payload) = serde_json::to_vec(&ForwardRequest::ReportLoad { groups, leading }) else { continue };
                // Best effort: a lost report only delays a split.
                let _ = host.transport_call(addr, env, RpcKind::Forward, payload, PLACEMENT_INTERVAL).await;
            }
            _ => {}
        }
    }
}

/// On the meta leader: every `PLACEMENT_INTERVAL`, plans and runs the elastic operations.
pub async fn placement_loop(api: Weak<NodeApi>) {
    let mut changes = RangeChanges::default();
    let mut sizes = SizeCache::new();
    // When each open merge was first seen preparing.
    let mut preparing: BTreeMap<GroupId, tokio::time::Instant> = BTreeMap::new();
    let Some(dead_after) = api.upgrade().map(|a| a.placement.dead_after) else { return };
    let mut liveness = Liveness::new(liveness::DOWN_AFTER, dead_after);
    loop {
        tokio::time::sleep(PLACEMENT_INTERVAL).await;
        let Some(api) = api.upgrade() else { return };
        if !api.host().group(keys::META_GROUP).is_some_and(|m| m.is_leader()) {
            changes.clear();
            sizes.clear();
            liveness.stop_watching();
            continue;
        }
        api.announce_failures(&mut liveness);
        api.resolve_merges(&mut preparing).await;
        let mut views = match api.placement_view(&mut sizes) {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "placement view unavailable");
                continue;
            }
        };
        changes.stamp(&mut views, tokio::time::Instant::now());
        let current: std::collections::BTreeSet<(GroupId, u64)> =
            views.iter().map(|v| (v.desc.id, v.desc.epoch)).collect();
        sizes.retain(|k, _| current.contains(k));
        let nodes = match api.nodes_view() {
            // Nothing moves to or balances onto a node that stopped reporting; a dead one's
            // replicas are re-created elsewhere.
            Ok(mut n) => {
                n.nodes.retain(|id| !liveness.is_down(*id));
                n.dead = liveness.dead().clone();
                n
            }
            Err(e) => {
                tracing::debug!(error = %e, "node view unavailable");
                continue;
            }
        };
        for action in placement::plan(&views, &nodes, &api.placement) {
            // A move waits for a learner to catch up (a snapshot): cut short, it would
            // leave the shard with an extra voter.
            let bound = match action {
                Action::Move { .. } => 2 * crate::raft::host::MEMBERSHIP_TIMEOUT,
                _ => api.request_timeout() * 2,
            };
            let outcome = match tokio::time::timeout(bound, api.run_action(action.clone())).await {
                Ok(Ok(())) => "ok",
                Ok(Err(e)) => {
                    tracing::info!(?action, error = %e, "placement operation failed; a later round retries");
                    "failed"
                }
                Err(_) => {
                    tracing::info!(?action, "placement operation timed out; a later round retries");
                    "timed_out"
                }
            };
            api.metrics.observe_placement(action.kind(), action.reason(), outcome);
        }
    }
}

/// Starts the node's elastic loops (load reports; the driver, active on the meta leader).
pub fn spawn_loops(api: &Arc<NodeApi>) {
    crate::raft::runtime::spawn(report_load_loop(Arc::downgrade(api)));
    crate::raft::runtime::spawn(placement_loop(Arc::downgrade(api)));
}
