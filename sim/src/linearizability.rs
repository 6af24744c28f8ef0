//! Per-key linearizability checking of a read/write/cas register history.
//!
//! Linearizability is local (Herlihy & Wing), so the history is split by key and each key is
//! checked on its own. Each key is searched with Wing & Gong's algorithm as improved by Lowe
//! and implemented by Porcupine (`checker.go`): walk a doubly linked list of call and return
//! entries in real-time order, linearize an operation just in time at its call entry,
//! backtrack when a return entry is reached before its operation was linearized, and memoize
//! every (set of linearized operations, register value) pair already explored, so no
//! configuration is explored twice. The set is memoized as a 128-bit Zobrist fingerprint
//! (see `Configuration`), so memo entries stay small on long histories.
//!
//! Model: the register starts absent (`null`); a write sets it; a cas `[expected, new]` that
//! completed `ok` succeeded, so it requires the register to equal `expected`; an indeterminate
//! cas either applies or finds another value (which changes nothing, so it is modelled as
//! never taking effect); a read returns the register. A `fail`ed cas was dropped by the
//! parser as not having happened; unlike Jepsen's etcd model, it does not assert that the
//! register differed from `expected`, so an anomaly visible only through a failed cas is not
//! reported. Values are compared by JSON equality (serde_json's `PartialEq`), through an
//! interning table keyed on a canonical rendering (object keys sorted, `-0.0` as `0.0`); the
//! rendering recurses as deep as the value nests, which serde_json's parser caps at 128.
//!
//! Invariants:
//! - The search never runs more than `CheckConfig::steps_max_per_key` steps on one key, nor
//!   holds more than about `CheckConfig::cache_bytes_max_per_key` of memo; past either it
//!   answers `Unknown` for that key, so a check always terminates.
//! - Indeterminate operations complete at +infinity: they may be linearized anywhere after
//!   their invoke. An indeterminate operation that never took effect is the same as one
//!   linearized after every definite operation, where nothing observes it; so a key is
//!   linearizable as soon as every definite operation is linearized.
//! - The search is deterministic: no randomness, no wall clock, keys visited in sorted order,
//!   and the memo uses a fixed-key hasher.
//! - No I/O.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::BuildHasherDefault;

use serde_json::Value;

use crate::history::{Action, History, Operation};

#[cfg(test)]
mod brute_force;
#[cfg(test)]
mod tests;

/// A hasher with fixed keys: lookups only, but no run may depend on a random seed.
type FixedHasher = BuildHasherDefault<DefaultHasher>;

/// Default for [`CheckConfig::steps_max_per_key`].
pub const STEPS_MAX_PER_KEY_DEFAULT: u64 = 5_000_000;
/// Default for [`CheckConfig::cache_bytes_max_per_key`]: 256 MiB.
pub const CACHE_BYTES_MAX_PER_KEY_DEFAULT: usize = 256 * 1024 * 1024;

/// Bounds on the search for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckConfig {
    /// Search steps (list moves, linearizations and backtracks) allowed per key before the
    /// key is reported `Unknown`.
    pub steps_max_per_key: u64,
    /// Estimated bytes of memo allowed per key before the key is reported `Unknown`.
    pub cache_bytes_max_per_key: usize,
}

impl Default for CheckConfig {
    fn default() -> Self {
        Self { steps_max_per_key: STEPS_MAX_PER_KEY_DEFAULT, cache_bytes_max_per_key: CACHE_BYTES_MAX_PER_KEY_DEFAULT }
    }
}

/// The verdict for a whole history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every key is linearizable.
    Linearizable,
    /// At least one key is certainly not linearizable.
    NotLinearizable,
    /// No key is certainly not linearizable, but at least one ran out of budget.
    Unknown,
}

/// Why a key's search stopped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownReason {
    /// The step budget ran out.
    StepBudget {
        /// The budget that was exhausted.
        steps_max: u64,
    },
    /// The memo grew past its byte budget.
    CacheBudget {
        /// The budget that was exhausted.
        bytes_max: usize,
    },
}

/// Evidence that a key is not linearizable.
#[derive(Debug, Clone, PartialEq)]
pub struct Counterexample {
    /// The longest linearizable prefix the search found, as indices into
    /// [`History::operations`], in linearization order.
    pub prefix: Vec<usize>,
    /// The register's value after the prefix.
    pub register_after_prefix: Value,
    /// An operation (index into [`History::operations`]) that had to be linearized next,
    /// because its completion came before any further call, and could not be: the model
    /// rejects it after the prefix.
    pub unplaceable: usize,
}

/// The outcome for one key.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyOutcome {
    /// A linearization exists.
    Linearizable,
    /// No linearization exists.
    NotLinearizable(Counterexample),
    /// The budget ran out first.
    Unknown(UnknownReason),
}

/// The result for one key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyReport {
    /// The key.
    pub key: String,
    /// Operations on this key that were checked (definite and indeterminate).
    pub operations: usize,
    /// Search steps spent.
    pub steps: u64,
    /// What the search found.
    pub outcome: KeyOutcome,
}

/// The result for a whole history: one report per key, keys in sorted order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CheckReport {
    /// Per-key reports, sorted by key.
    pub keys: Vec<KeyReport>,
}

impl CheckReport {
    /// NotLinearizable if any key is; otherwise Unknown if any key is; else Linearizable.
    pub fn verdict(&self) -> Verdict {
        let mut verdict = Verdict::Linearizable;
        for report in &self.keys {
            match report.outcome {
                KeyOutcome::NotLinearizable(_) => return Verdict::NotLinearizable,
                KeyOutcome::Unknown(_) => verdict = Verdict::Unknown,
                KeyOutcome::Linearizable => {}
            }
        }
        verdict
    }

    /// Total search steps over all keys.
    pub fn steps(&self) -> u64 {
        self.keys.iter().map(|report| report.steps).sum()
    }
}

/// Checks every key of `history` for linearizability.
pub fn check_history(history: &History, config: &CheckConfig) -> CheckReport {
    let operations = history.operations();
    let mut report = CheckReport::default();
    for (key, indices) in history.indices_by_key() {
        let key_operations: Vec<&Operation> = indices.iter().map(|&index| &operations[index]).collect();
        let (outcome, steps) = search(&key_operations, config);
        // The search numbers operations within the key; report history indices.
        let outcome = match outcome {
            KeyOutcome::NotLinearizable(counterexample) => KeyOutcome::NotLinearizable(Counterexample {
                prefix: counterexample.prefix.iter().map(|&local| indices[local]).collect(),
                register_after_prefix: counterexample.register_after_prefix,
                unplaceable: indices[counterexample.unplaceable],
            }),
            other => other,
        };
        report.keys.push(KeyReport { key: key.to_owned(), operations: indices.len(), steps, outcome });
    }
    report
}

/// Interns JSON values so the model state is a small integer.
#[derive(Default)]
struct ValueTable {
    ids: HashMap<String, u32, FixedHasher>,
    values: Vec<Value>,
}

impl ValueTable {
    fn intern(&mut self, value: &Value) -> u32 {
        let mut canonical_text = String::new();
        write_canonical(value, &mut canonical_text);
        if let Some(&id) = self.ids.get(&canonical_text) {
            return id;
        }
        // A key has at most 3 values per operation, far below u32::MAX in any history that
        // fits in memory.
        let id = u32::try_from(self.values.len()).unwrap_or(u32::MAX);
        self.ids.insert(canonical_text, id);
        self.values.push(value.clone());
        id
    }

    fn value(&self, id: u32) -> Value {
        self.values.get(id as usize).cloned().unwrap_or(Value::Null)
    }
}

/// Renders `value` so that two values render alike iff serde_json's `PartialEq` holds.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push('n'),
        Value::Bool(flag) => out.push(if *flag { 't' } else { 'f' }),
        Value::Number(number) => {
            // Numbers equal as f64 (0.0 and -0.0) are equal Values; integers and floats are
            // not (1 != 1.0), and Display keeps them apart ("1" vs "1.0").
            if number.is_f64() && number.as_f64() == Some(0.0) {
                out.push_str("#0.0");
            } else {
                let _ = write!(out, "#{number}");
            }
        }
        Value::String(text) => {
            let _ = write!(out, "s{}:{text}", text.len());
        }
        Value::Array(items) => {
            let _ = write!(out, "a{}[", items.len());
            for item in items {
                write_canonical(item, out);
                out.push(',');
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|left, right| left.0.cmp(right.0));
            let _ = write!(out, "o{}{{", entries.len());
            for (name, item) in entries {
                let _ = write!(out, "{}:{name}=", name.len());
                write_canonical(item, out);
                out.push(',');
            }
            out.push('}');
        }
    }
}

/// An operation compiled against the value table.
#[derive(Clone, Copy)]
enum ModelOp {
    Read { observed: u32 },
    Write { value: u32 },
    Cas { expected: u32, new: u32 },
}

impl ModelOp {
    fn compile(operation: &Operation, values: &mut ValueTable) -> Self {
        match &operation.action {
            Action::Read { observed } => Self::Read { observed: values.intern(observed) },
            Action::Write { value } => Self::Write { value: values.intern(value) },
            Action::Cas { expected, new } => Self::Cas { expected: values.intern(expected), new: values.intern(new) },
        }
    }

    /// The register after this operation from `state`, or `None` if the model forbids it.
    fn apply(self, state: u32) -> Option<u32> {
        match self {
            Self::Read { observed } => (observed == state).then_some(state),
            Self::Write { value } => Some(value),
            // An ok cas succeeded, so it cannot have found another value. An indeterminate
            // one may have, and then changed nothing: the same as never taking effect, which
            // the search already covers by not linearizing it, so it is refused here too.
            Self::Cas { expected, new } => (expected == state).then_some(new),
        }
    }
}

/// "No node": the end of the entry list.
const NIL: usize = usize::MAX;
/// Index of the list's head sentinel.
const HEAD: usize = 0;

/// A call or return entry in the doubly linked list.
struct Node {
    /// Index of the operation within the key.
    operation: usize,
    is_call: bool,
    /// The matching return (for a call) or call (for a return).
    partner: usize,
    prev: usize,
    next: usize,
}

/// The entry list with O(1) unlink and relink (dancing links). Relinks must happen in the
/// reverse order of unlinks, which the search's stack discipline guarantees.
struct EntryList {
    nodes: Vec<Node>,
}

impl EntryList {
    /// Builds the list for `operations` in real-time order. Calls sit at their invoke line,
    /// returns at their completion line; indeterminate returns at +infinity, after every
    /// definite entry.
    fn new(operations: &[&Operation]) -> Self {
        // (time, operation, is_return): lines are unique, so only +infinity ties, and those
        // are broken by operation index.
        let mut order: Vec<(usize, usize, bool)> = Vec::with_capacity(operations.len() * 2);
        for (index, operation) in operations.iter().enumerate() {
            order.push((operation.invoke_line, index, false));
            let complete = operation.complete_line().unwrap_or(usize::MAX);
            debug_assert!(complete > operation.invoke_line, "completion before invoke");
            order.push((complete, index, true));
        }
        order.sort_unstable();
        let mut nodes = Vec::with_capacity(order.len() + 1);
        nodes.push(Node {
            operation: usize::MAX,
            is_call: false,
            partner: NIL,
            prev: NIL,
            next: if order.is_empty() { NIL } else { 1 },
        });
        let mut call_of = vec![NIL; operations.len()];
        let mut return_of = vec![NIL; operations.len()];
        for (position, &(_, operation, is_return)) in order.iter().enumerate() {
            let node = position + 1;
            if is_return {
                return_of[operation] = node;
            } else {
                call_of[operation] = node;
            }
            nodes.push(Node {
                operation,
                is_call: !is_return,
                partner: NIL,
                prev: position,
                next: if node == order.len() { NIL } else { node + 1 },
            });
        }
        for operation in 0..operations.len() {
            nodes[call_of[operation]].partner = return_of[operation];
            nodes[return_of[operation]].partner = call_of[operation];
        }
        Self { nodes }
    }

    fn first(&self) -> usize {
        self.nodes[HEAD].next
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.nodes[node].prev, self.nodes[node].next);
        self.nodes[prev].next = next;
        if next != NIL {
            self.nodes[next].prev = prev;
        }
    }

    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.nodes[node].prev, self.nodes[node].next);
        self.nodes[prev].next = node;
        if next != NIL {
            self.nodes[next].prev = node;
        }
    }

    /// Removes a call and its return.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.nodes[call].partner);
    }

    /// Undoes [`EntryList::lift`]; must be the most recent lift not yet undone.
    fn unlift(&mut self, call: usize) {
        self.relink(self.nodes[call].partner);
        self.relink(call);
    }
}

/// The set of linearized operations plus the register value, as a memo key: a 128-bit
/// Zobrist fingerprint of the set (XOR of a fixed pseudo-random word per operation, updated
/// in O(1) per step) and the value. A full bitset per memo entry costs n/8 bytes, which ran
/// out of memory on long histories (47k operations per key: 6 KiB per entry) before the
/// search had placed every operation once. Two different sets share a fingerprint with
/// probability about 2^-128 per pair; a collision can only prune a branch, so it could turn
/// a linearizable verdict into a false alarm, never hide a violation.
struct Configuration {
    fingerprint: u128,
    state: u32,
}

impl Configuration {
    fn new(state: u32) -> Self {
        Self { fingerprint: 0, state }
    }

    /// Adds or removes `operation` (XOR is its own inverse).
    fn toggle(&mut self, operation: usize) {
        self.fingerprint ^= operation_word(operation);
    }

    fn set_state(&mut self, state: u32) {
        self.state = state;
    }

    fn key(&self) -> (u128, u32) {
        (self.fingerprint, self.state)
    }

    /// Estimated heap bytes one memo entry costs (key and the hash table's slot and
    /// control byte).
    fn memo_entry_bytes() -> usize {
        32 + 1
    }
}

/// The fixed pseudo-random 128-bit word of an operation (splitmix64 of its index, twice).
fn operation_word(operation: usize) -> u128 {
    fn splitmix64(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let index = operation as u64;
    let high = splitmix64(index.wrapping_mul(2));
    let low = splitmix64(index.wrapping_mul(2).wrapping_add(1));
    (u128::from(high) << 64) | u128::from(low)
}

/// A linearized operation on the search stack.
struct Frame {
    call: usize,
    state_before: u32,
}

/// Searches one key's operations; indices in the outcome are positions in `operations`.
/// Returns the outcome and the steps spent.
fn search(operations: &[&Operation], config: &CheckConfig) -> (KeyOutcome, u64) {
    let definite_total = operations.iter().filter(|operation| operation.is_definite()).count();
    if definite_total == 0 {
        return (KeyOutcome::Linearizable, 0);
    }
    let mut values = ValueTable::default();
    let absent = values.intern(&Value::Null);
    let model: Vec<ModelOp> = operations.iter().map(|operation| ModelOp::compile(operation, &mut values)).collect();
    let mut list = EntryList::new(operations);
    let mut configuration = Configuration::new(absent);
    let mut memo: HashSet<(u128, u32), FixedHasher> = HashSet::default();
    let memo_entry_bytes = Configuration::memo_entry_bytes();
    let mut memo_bytes = 0usize;
    let mut stack: Vec<Frame> = Vec::new();
    let mut state = absent;
    let mut definite_linearized = 0usize;
    // The deepest dead end: (prefix as stack of calls, state, operation that blocked).
    let mut deepest: Option<(Vec<usize>, u32, usize)> = None;
    let mut cursor = list.first();
    let mut steps = 0u64;

    loop {
        if steps >= config.steps_max_per_key {
            let reason = UnknownReason::StepBudget { steps_max: config.steps_max_per_key };
            return (KeyOutcome::Unknown(reason), steps);
        }
        steps += 1;

        if cursor != NIL && list.nodes[cursor].is_call {
            let operation = list.nodes[cursor].operation;
            if let Some(state_after) = model[operation].apply(state) {
                configuration.toggle(operation);
                configuration.set_state(state_after);
                let unexplored = !memo.contains(&configuration.key());
                if unexplored {
                    if memo_bytes.saturating_add(memo_entry_bytes) > config.cache_bytes_max_per_key {
                        let reason = UnknownReason::CacheBudget { bytes_max: config.cache_bytes_max_per_key };
                        return (KeyOutcome::Unknown(reason), steps);
                    }
                    memo.insert(configuration.key());
                    memo_bytes += memo_entry_bytes;
                    stack.push(Frame { call: cursor, state_before: state });
                    state = state_after;
                    list.lift(cursor);
                    if operations[operation].is_definite() {
                        definite_linearized += 1;
                        if definite_linearized == definite_total {
                            return (KeyOutcome::Linearizable, steps);
                        }
                    }
                    cursor = list.first();
                    continue;
                }
                configuration.toggle(operation);
                configuration.set_state(state);
            }
            cursor = list.nodes[cursor].next;
            continue;
        }

        // Dead end: a return entry whose operation is not linearized (or, defensively, the
        // end of the list, which cannot be reached while a definite operation is pending
        // because its return entry stops the cursor first).
        debug_assert!(cursor != NIL, "cursor passed every return entry");
        if cursor != NIL {
            let depth_best = deepest.as_ref().map(|(prefix, _, _)| prefix.len());
            if depth_best.is_none_or(|best| stack.len() > best) {
                let prefix = stack.iter().map(|frame| list.nodes[frame.call].operation).collect();
                deepest = Some((prefix, state, list.nodes[cursor].operation));
            }
        }
        let Some(frame) = stack.pop() else {
            let counterexample = match deepest {
                Some((prefix, state_after, unplaceable)) => {
                    Counterexample { prefix, register_after_prefix: values.value(state_after), unplaceable }
                }
                // Unreachable (the first dead end is always recorded); keep a sound answer.
                None => Counterexample { prefix: Vec::new(), register_after_prefix: Value::Null, unplaceable: 0 },
            };
            return (KeyOutcome::NotLinearizable(counterexample), steps);
        };
        let operation = list.nodes[frame.call].operation;
        if operations[operation].is_definite() {
            definite_linearized -= 1;
        }
        state = frame.state_before;
        configuration.toggle(operation);
        configuration.set_state(state);
        list.unlift(frame.call);
        cursor = list.nodes[frame.call].next;
    }
}
