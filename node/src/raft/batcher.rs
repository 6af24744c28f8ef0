//! The proposal batcher: concurrent document writes of one group become one log entry.
//!
//! Owns: per group on each node, a queue of document batches waiting to be proposed and the
//! task that drains it. openraft 0.9 appends (and fsyncs) each client write as its own entry
//! and waits for that append before the next, so without batching a leader does one fsync
//! per write (measured: 29k syncs for 32k writes at 64 clients). The batcher proposes what
//! queued up while earlier proposals were in flight as one `Command::DocsMany` entry: one
//! append, one fsync, one replication round, one forward from a follower.
//!
//! Invariants:
//! - an entry's batches touch disjoint documents (a batch that overlaps one already taken
//!   waits for the next entry), so every document write still gets a version of its own;
//! - at most `IN_FLIGHT_MAX` proposals of a group are in flight from this node, and at most
//!   `QUEUE_MAX` batches wait (more get a retryable error); a batch whose caller gave up
//!   before it was proposed is dropped, never proposed;
//! - a lone batch is proposed as a plain `Command::Docs` (no change at low load);
//! - every caller gets exactly one answer: its own batch's response, or the proposal's error.

use super::host::{GroupError, RaftHost};
use super::types::{Command, CommandResponse, GroupId};
use crate::docs::{DocAction, DocBatch};
use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Weak};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Proposals of one group in flight from one node at once.
pub const IN_FLIGHT_MAX: usize = 2;
/// Bound on the batches of one entry.
pub const BATCHES_PER_ENTRY_MAX: usize = 256;
/// Bound on the approximate bytes of one entry's batches (a lone batch may exceed it).
pub const BYTES_PER_ENTRY_MAX: usize = 1 << 20;
/// Bound on the worst-case bytes of one entry's answers (a lone batch may exceed it): a
/// patch answers with the whole patched document, so each patch counts as the largest
/// document its batch allows. Keeps a forwarded answer well under the 64 MiB reply limit.
pub const ANSWER_BYTES_PER_ENTRY_MAX: usize = 16 << 20;
/// Bound on overlapping batches passed over while building one entry (keeps a hot-document
/// backlog from making every entry scan the whole queue).
pub const SKIPPED_PER_ENTRY_MAX: usize = 64;
/// Bound on queued batches per group (callers beyond it get a retryable error).
pub const QUEUE_MAX: usize = 16_384;

/// A proposal's outcome: the entry's index and this batch's answer.
pub type ProposalResult = Result<(u64, CommandResponse), GroupError>;
/// One caller's batch and where its answer goes.
pub type Proposal = (DocBatch, oneshot::Sender<ProposalResult>);

/// Takes the next entry's batches from `pending` (in arrival order): every batch whose
/// documents do not overlap an earlier taken one, up to the bounds. Pure.
pub fn take_entry(pending: &mut VecDeque<Proposal>) -> Vec<Proposal> {
    let mut taken = Vec::new();
    let mut keys: BTreeSet<(String, String, String)> = BTreeSet::new();
    let mut bytes = 0usize;
    let mut answer_bytes = 0usize;
    let mut skipped = VecDeque::new();
    while let Some(p) = pending.pop_front() {
        let size = approximate_bytes(&p.0);
        let answer = worst_answer_bytes(&p.0);
        let too_big = bytes + size > BYTES_PER_ENTRY_MAX || answer_bytes + answer > ANSWER_BYTES_PER_ENTRY_MAX;
        if taken.len() >= BATCHES_PER_ENTRY_MAX || (!taken.is_empty() && too_big) {
            skipped.push_back(p);
            break;
        }
        let batch_keys: Vec<(String, String, String)> =
            p.0.ops.iter().map(|o| (p.0.tenant.clone(), o.collection.clone(), o.id.clone())).collect();
        if batch_keys.iter().any(|k| keys.contains(k)) {
            skipped.push_back(p);
            if skipped.len() >= SKIPPED_PER_ENTRY_MAX {
                break;
            }
            continue;
        }
        bytes += size;
        answer_bytes += answer;
        keys.extend(batch_keys);
        taken.push(p);
    }
    // What was not taken keeps its place at the front, in order.
    while let Some(p) = skipped.pop_back() {
        pending.push_front(p);
    }
    taken
}

/// The payload size of a batch, roughly (documents and patches dominate).
fn approximate_bytes(batch: &DocBatch) -> usize {
    batch
        .ops
        .iter()
        .map(|op| {
            let body = match &op.action {
                DocAction::Put { json, .. } | DocAction::Create { json } | DocAction::Replace { json, .. } => {
                    json.len()
                }
                DocAction::MergePatch { patch, .. } | DocAction::JsonPatch { patch, .. } => patch.len(),
                DocAction::Delete { .. } => 0,
            };
            body + op.id.len() + op.collection.len() + 64
        })
        .sum()
}

/// The largest answer a batch can produce: patches return the patched document.
fn worst_answer_bytes(batch: &DocBatch) -> usize {
    let patches = batch
        .ops
        .iter()
        .filter(|op| matches!(op.action, DocAction::MergePatch { .. } | DocAction::JsonPatch { .. }))
        .count();
    patches.saturating_mul(batch.limits.doc_bytes_max)
}

/// Drains `rx` for `group` until every sender is gone.
pub async fn run(host: Weak<RaftHost>, group: GroupId, mut rx: mpsc::Receiver<Proposal>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    let mut pending: VecDeque<Proposal> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(p) => pending.push_back(p),
                None => return,
            }
        }
        // Wait for a free slot first: what arrives meanwhile joins this entry. Draining stops
        // at `QUEUE_MAX` pending, so a full channel pushes back on callers.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        while pending.len() < QUEUE_MAX {
            match rx.try_recv() {
                Ok(p) => pending.push_back(p),
                Err(_) => break,
            }
        }
        // A caller that gave up (timed out, disconnected) is not proposed for any more.
        pending.retain(|(_, reply)| !reply.is_closed());
        let entry = take_entry(&mut pending);
        if entry.is_empty() {
            continue;
        }
        let Some(host) = host.upgrade() else { return };
        super::runtime::spawn(async move {
            propose_entry(&host, group, entry).await;
            drop(slot);
        });
    }
}

async fn propose_entry(host: &Arc<RaftHost>, group: GroupId, mut entry: Vec<Proposal>) {
    if entry.len() == 1 {
        if let Some((batch, reply)) = entry.pop() {
            let _ = reply.send(host.propose(group, Command::Docs(batch)).await);
        }
        return;
    }
    let (batches, replies): (Vec<DocBatch>, Vec<_>) = entry.into_iter().unzip();
    match host.propose(group, Command::DocsMany(batches)).await {
        Ok((index, CommandResponse::Many(responses))) if responses.len() == replies.len() => {
            for (reply, response) in replies.into_iter().zip(responses) {
                let _ = reply.send(Ok((index, response)));
            }
        }
        Ok((index, other)) => {
            // A whole-entry answer (e.g. WrongGroup for the meta group) applies to each batch.
            for reply in replies {
                let _ = reply.send(Ok((index, other.clone())));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docs::{DocAction, DocOp, Limits};

    fn proposal(ids: &[&str]) -> (Proposal, oneshot::Receiver<ProposalResult>) {
        let ops = ids
            .iter()
            .map(|id| DocOp {
                collection: "c".into(),
                id: id.to_string(),
                action: DocAction::Delete { expected: None },
            })
            .collect();
        let (tx, rx) = oneshot::channel();
        ((DocBatch { tenant: "t".into(), ops, limits: Limits::default(), request_id: None }, tx), rx)
    }

    fn ids(entry: &[Proposal]) -> Vec<Vec<String>> {
        entry.iter().map(|p| p.0.ops.iter().map(|o| o.id.clone()).collect()).collect()
    }

    #[test]
    fn an_entry_takes_disjoint_batches_and_leaves_the_rest_in_order() {
        let mut pending = VecDeque::new();
        let mut receivers = Vec::new();
        for batch in [&["a"][..], &["b", "c"], &["a"], &["d"], &["c", "e"], &["f"]] {
            let (p, rx) = proposal(batch);
            pending.push_back(p);
            receivers.push(rx);
        }
        let entry = take_entry(&mut pending);
        assert_eq!(ids(&entry), vec![vec!["a"], vec!["b", "c"], vec!["d"], vec!["f"]]);
        let rest: Vec<Proposal> = pending.drain(..).collect();
        assert_eq!(ids(&rest), vec![vec!["a"], vec!["c", "e"]]);
    }

    #[test]
    fn patch_answers_bound_an_entry() {
        let mut pending = VecDeque::new();
        let mut receivers = Vec::new();
        for i in 0..40 {
            let (mut p, rx) = proposal(&[&format!("p{i}")]);
            p.0.ops[0].action = DocAction::MergePatch { patch: "{}".into(), expected: None };
            pending.push_back(p);
            receivers.push(rx);
        }
        // Each patch may answer with a whole 1 MiB document: 16 fit in the answer budget.
        let per_entry = ANSWER_BYTES_PER_ENTRY_MAX / Limits::default().doc_bytes_max;
        assert_eq!(take_entry(&mut pending).len(), per_entry);
        assert_eq!(pending.len(), 40 - per_entry);
    }

    #[test]
    fn entries_are_bounded() {
        let mut pending = VecDeque::new();
        let mut receivers = Vec::new();
        for i in 0..(BATCHES_PER_ENTRY_MAX + 10) {
            let (p, rx) = proposal(&[&format!("d{i}")]);
            pending.push_back(p);
            receivers.push(rx);
        }
        assert_eq!(take_entry(&mut pending).len(), BATCHES_PER_ENTRY_MAX);
        assert_eq!(pending.len(), 10);
        assert_eq!(pending.front().map(|p| p.0.ops[0].id.clone()), Some(format!("d{BATCHES_PER_ENTRY_MAX}")));
    }
}
