//! Test-only oracle: decides linearizability by trying every order of the operations that
//! respects real time, with no memo, no entry list and no value interning, so it shares as
//! little as possible with the search it checks.
//!
//! Definition used: a key is linearizable iff some subset S of its indeterminate operations
//! and some total order of (definite operations ∪ S) exist such that an operation whose
//! completion precedes another's invoke comes first, and executing the order on a register
//! that starts `null` gives every read its observed value and every definite cas a match.
//! Indeterminate operations never precede anything (their completion is +infinity), and the
//! depth-first search stops as soon as every definite operation is placed, which leaves the
//! rest out of S.
//!
//! Invariant: the search is bounded by `CALLS_MAX`; past it the oracle panics (tests only).

use serde_json::Value;

use crate::history::{Action, History, Operation};

/// Recursive calls allowed per key; 8 operations need at most 8! orders.
const CALLS_MAX: u64 = 50_000_000;

/// Whether every key of `history` is linearizable.
pub(super) fn is_linearizable(history: &History) -> bool {
    history.indices_by_key().values().all(|indices| {
        let operations: Vec<&Operation> = indices.iter().map(|&index| &history.operations()[index]).collect();
        let definite = operations.iter().filter(|op| op.is_definite()).count();
        let mut placed = vec![false; operations.len()];
        let mut calls = 0u64;
        place_next(&operations, &mut placed, &Value::Null, definite, &mut calls)
    })
}

/// The register after `operation` from `state`, or `None` if it cannot happen there.
fn apply(operation: &Operation, state: &Value) -> Option<Value> {
    match &operation.action {
        Action::Read { observed } => (observed == state).then(|| state.clone()),
        Action::Write { value } => Some(value.clone()),
        Action::Cas { expected, new } => {
            if expected == state {
                Some(new.clone())
            } else if operation.is_definite() {
                None
            } else {
                Some(state.clone())
            }
        }
    }
}

fn place_next(
    operations: &[&Operation],
    placed: &mut [bool],
    state: &Value,
    definite_left: usize,
    calls: &mut u64,
) -> bool {
    *calls += 1;
    assert!(*calls <= CALLS_MAX, "brute force exceeded {CALLS_MAX} calls");
    if definite_left == 0 {
        return true;
    }
    for candidate in 0..operations.len() {
        if placed[candidate] {
            continue;
        }
        let invoke = operations[candidate].invoke_line;
        let must_wait = (0..operations.len())
            .any(|other| !placed[other] && operations[other].complete_line().is_some_and(|complete| complete < invoke));
        if must_wait {
            continue;
        }
        let Some(next_state) = apply(operations[candidate], state) else {
            continue;
        };
        placed[candidate] = true;
        let left = definite_left - usize::from(operations[candidate].is_definite());
        if place_next(operations, placed, &next_state, left, calls) {
            return true;
        }
        placed[candidate] = false;
    }
    false
}
