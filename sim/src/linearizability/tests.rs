//! Tests of the linearizability checker: hand-written known-good and known-bad histories
//! (each also run through the brute-force oracle), counterexample contents, budgets, and a
//! differential property test against the oracle on generated and mutated histories.

use proptest::prelude::*;
use serde_json::{json, Value};

use super::brute_force;
use super::*;
use crate::history::{Event, EventType, Function, History};

/// Builds a history from compact lines: `[key:] process type f [json value]`, e.g.
/// `"0 invoke write 1"`, `"a: 1 ok read null"`, `"2 invoke cas [1, 2]"`.
fn history(lines: &[&str]) -> History {
    let jsonl: Vec<String> = lines.iter().map(|line| compact_event(line).to_json_line()).collect();
    History::parse_jsonl(jsonl.join("\n").as_bytes()).expect("fixture parses")
}

fn compact_event(line: &str) -> Event {
    let mut rest = line.trim();
    let mut key = None;
    if let Some((first, tail)) = rest.split_once(' ') {
        if let Some(name) = first.strip_suffix(':') {
            key = Some(name.to_owned());
            rest = tail.trim();
        }
    }
    let mut parts = rest.splitn(4, ' ');
    let process = parts.next().and_then(|p| p.parse().ok()).expect("process");
    let event_type = match parts.next() {
        Some("invoke") => EventType::Invoke,
        Some("ok") => EventType::Ok,
        Some("fail") => EventType::Fail,
        Some("info") => EventType::Info,
        other => panic!("bad type {other:?} in {line}"),
    };
    let f = match parts.next() {
        Some("read") => Function::Read,
        Some("write") => Function::Write,
        Some("cas") => Function::Cas,
        other => panic!("bad f {other:?} in {line}"),
    };
    let value = parts.next().map(|text| serde_json::from_str(text).expect("fixture value is JSON"));
    Event { process, event_type, f, key, value }
}

fn check(history: &History) -> CheckReport {
    check_history(history, &CheckConfig::default())
}

/// Asserts the checker and the brute-force oracle agree that `lines` is linearizable.
fn assert_good(lines: &[&str]) {
    let history = history(lines);
    let report = check(&history);
    assert_eq!(report.verdict(), Verdict::Linearizable, "{lines:#?}\n{report:#?}");
    assert!(brute_force::is_linearizable(&history), "oracle: {lines:#?}");
}

/// Asserts the checker and the oracle agree that `lines` is not linearizable; returns the
/// report for further checks.
fn assert_bad(lines: &[&str]) -> (History, CheckReport) {
    let history = history(lines);
    let report = check(&history);
    assert_eq!(report.verdict(), Verdict::NotLinearizable, "{lines:#?}\n{report:#?}");
    assert!(!brute_force::is_linearizable(&history), "oracle: {lines:#?}");
    (history, report)
}

fn counterexample(report: &CheckReport) -> &Counterexample {
    report
        .keys
        .iter()
        .find_map(|key| match &key.outcome {
            KeyOutcome::NotLinearizable(counterexample) => Some(counterexample),
            _ => None,
        })
        .expect("a counterexample")
}

#[test]
fn empty_and_indeterminate_only_histories_are_linearizable() {
    assert_good(&[]);
    assert_good(&["0 invoke write 1", "0 info write", "1 invoke cas [5, 6]"]);
}

#[test]
fn stale_read_after_a_completed_write_is_caught_with_its_counterexample() {
    let (history, report) = assert_bad(&["0 invoke write 1", "0 ok write", "1 invoke read", "1 ok read null"]);
    let counterexample = counterexample(&report);
    let operations = history.operations();
    assert_eq!(counterexample.prefix.len(), 1);
    assert_eq!(operations[counterexample.prefix[0]].action, Action::Write { value: json!(1) });
    assert_eq!(counterexample.register_after_prefix, json!(1));
    assert_eq!(operations[counterexample.unplaceable].action, Action::Read { observed: Value::Null });
}

#[test]
fn lost_write_is_caught() {
    let (history, report) = assert_bad(&[
        "0 invoke write 1",
        "0 ok write",
        "1 invoke write 2",
        "1 ok write",
        "2 invoke read",
        "2 ok read 1",
    ]);
    let counterexample = counterexample(&report);
    assert_eq!(counterexample.prefix.len(), 2);
    assert_eq!(counterexample.register_after_prefix, json!(2));
    assert_eq!(history.operations()[counterexample.unplaceable].process, 2);
}

#[test]
fn phantom_value_is_caught() {
    assert_bad(&["0 invoke read", "0 ok read 42"]);
    // Even concurrent with real writes, a value nobody wrote cannot be read.
    assert_bad(&["0 invoke write 1", "1 invoke read", "1 ok read {\"a\": 1}", "0 ok write"]);
}

#[test]
fn read_overlapping_a_write_may_see_either_value() {
    assert_good(&["0 invoke write 1", "1 invoke read", "1 ok read 1", "0 ok write"]);
    assert_good(&["0 invoke write 1", "1 invoke read", "1 ok read null", "0 ok write"]);
}

#[test]
fn read_your_write_holds_across_processes() {
    // Process 1's read starts after process 0's write completed, overlapping another write.
    assert_good(&["0 invoke write 1", "0 ok write", "1 invoke read", "2 invoke write 2", "1 ok read 1", "2 ok write"]);
    // A read starting after the write completed must not miss it.
    assert_bad(&[
        "0 invoke write 1",
        "0 ok write",
        "2 invoke write 2",
        "2 ok write",
        "1 invoke read",
        "1 ok read null",
    ]);
}

#[test]
fn concurrent_writes_may_take_effect_in_either_order() {
    for last in [1, 2] {
        let read = format!("2 ok read {last}");
        assert_good(&[
            "0 invoke write 1",
            "1 invoke write 2",
            "0 ok write",
            "1 ok write",
            "2 invoke read",
            read.as_str(),
        ]);
    }
    // But once both completed, sequential reads cannot see them in both orders.
    assert_bad(&[
        "0 invoke write 1",
        "1 invoke write 2",
        "0 ok write",
        "1 ok write",
        "2 invoke read",
        "2 ok read 1",
        "2 invoke read",
        "2 ok read 2",
    ]);
}

#[test]
fn cas_succeeds_only_from_its_expected_value() {
    assert_good(&[
        "0 invoke cas [null, 1]",
        "0 ok cas",
        "1 invoke cas [1, 2]",
        "1 ok cas",
        "2 invoke read",
        "2 ok read 2",
    ]);
    // The second cas cannot find the register still absent.
    assert_bad(&["0 invoke cas [null, 1]", "0 ok cas", "1 invoke cas [null, 2]", "1 ok cas"]);
    // Two concurrent cas from the same value cannot both succeed.
    assert_bad(&["0 invoke cas [null, 1]", "1 invoke cas [null, 2]", "0 ok cas", "1 ok cas"]);
    // Chained concurrent cas can, in the one order that works.
    assert_good(&[
        "1 invoke cas [1, 2]",
        "0 invoke cas [null, 1]",
        "0 ok cas",
        "1 ok cas",
        "2 invoke read",
        "2 ok read 2",
    ]);
    // A cas from a value never written cannot succeed.
    assert_bad(&["0 invoke cas [7, 8]", "0 ok cas"]);
}

#[test]
fn failed_cas_did_not_happen() {
    assert_good(&[
        "0 invoke write 1",
        "0 ok write",
        "1 invoke cas [1, 2]",
        "1 fail cas",
        "2 invoke read",
        "2 ok read 1",
    ]);
    // Its new value would be a phantom.
    assert_bad(&[
        "0 invoke write 1",
        "0 ok write",
        "1 invoke cas [1, 2]",
        "1 fail cas",
        "2 invoke read",
        "2 ok read 2",
    ]);
}

#[test]
fn indeterminate_write_may_appear_any_time_after_its_invoke() {
    assert_good(&[
        "0 invoke write 1",
        "0 info write",
        "1 invoke read",
        "1 ok read null",
        "1 invoke read",
        "1 ok read 1",
    ]);
    // Never appearing is fine too, including when the history just ends.
    assert_good(&["0 invoke write 1", "1 invoke read", "1 ok read null"]);
    // But once seen it cannot be unseen.
    assert_bad(&[
        "0 invoke write 1",
        "0 info write",
        "1 invoke read",
        "1 ok read 1",
        "1 invoke read",
        "1 ok read null",
    ]);
}

#[test]
fn indeterminate_write_read_before_its_invoke_is_caught() {
    assert_bad(&["1 invoke read", "1 ok read 1", "0 invoke write 1", "0 info write"]);
}

#[test]
fn indeterminate_cas_may_or_may_not_apply() {
    let applied =
        ["0 invoke write 1", "0 ok write", "1 invoke cas [1, 2]", "1 info cas", "2 invoke read", "2 ok read 2"];
    assert_good(&applied);
    let not_applied =
        ["0 invoke write 1", "0 ok write", "1 invoke cas [1, 2]", "1 info cas", "2 invoke read", "2 ok read 1"];
    assert_good(&not_applied);
    // It cannot apply from a value the register never held.
    assert_bad(&[
        "0 invoke write 1",
        "0 ok write",
        "1 invoke cas [5, 2]",
        "1 info cas",
        "2 invoke read",
        "2 ok read 2",
    ]);
}

#[test]
fn indeterminate_reads_constrain_nothing() {
    assert_good(&["0 invoke read", "0 info read", "1 invoke write 1", "1 ok write"]);
}

#[test]
fn non_monotonic_reads_by_real_time_are_caught() {
    // The write is still in flight, but once a read saw it, a later read must too.
    assert_bad(&["0 invoke write 1", "1 invoke read", "1 ok read 1", "2 invoke read", "2 ok read null", "0 ok write"]);
    // Overlapping reads may disagree.
    assert_good(&["0 invoke write 1", "1 invoke read", "2 invoke read", "1 ok read 1", "2 ok read null", "0 ok write"]);
}

#[test]
fn values_compare_as_json() {
    assert_good(&[
        "0 invoke write {\"a\": 1, \"b\": [true, null]}",
        "0 ok write",
        "1 invoke read",
        "1 ok read {\"b\": [true, null], \"a\": 1}",
    ]);
    // 1 and 1.0 are different JSON values, as serde_json compares them.
    assert_bad(&["0 invoke write 1", "0 ok write", "1 invoke read", "1 ok read 1.0"]);
    assert_good(&["0 invoke write -0.0", "0 ok write", "1 invoke read", "1 ok read 0.0"]);
    assert_bad(&["0 invoke write \"1\"", "0 ok write", "1 invoke read", "1 ok read 1"]);
}

#[test]
fn keys_are_checked_independently() {
    let history = history(&[
        "a: 0 invoke write 1",
        "a: 0 ok write",
        "b: 1 invoke write 1",
        "b: 1 ok write",
        "b: 2 invoke read",
        "b: 2 ok read null",
        // This read of key "a" would be stale for a single register but "a" is not "b".
        "a: 2 invoke read",
        "a: 2 ok read 1",
        "3 invoke read",
        "3 ok read null",
    ]);
    let report = check(&history);
    assert_eq!(report.verdict(), Verdict::NotLinearizable);
    let outcomes: Vec<(&str, bool)> =
        report.keys.iter().map(|key| (key.key.as_str(), key.outcome == KeyOutcome::Linearizable)).collect();
    assert_eq!(outcomes, [("", true), ("a", true), ("b", false)]);
    let counterexample = counterexample(&report);
    assert_eq!(history.operations()[counterexample.unplaceable].key, "b");
}

/// `writers` concurrent writes, then a read of a value none of them wrote: the search has to
/// visit every subset of the writes before it can say no.
fn exhausting_history(writers: i64) -> History {
    let mut lines = Vec::new();
    for process in 0..writers {
        lines.push(format!("{process} invoke write {process}"));
    }
    for process in 0..writers {
        lines.push(format!("{process} ok write"));
    }
    lines.push(format!("{writers} invoke read"));
    lines.push(format!("{writers} ok read {}", writers + 100));
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    history(&lines)
}

#[test]
fn step_budget_gives_unknown_instead_of_hanging() {
    let history = exhausting_history(16);
    let config = CheckConfig { steps_max_per_key: 1_000, ..CheckConfig::default() };
    let report = check_history(&history, &config);
    assert_eq!(report.verdict(), Verdict::Unknown);
    assert_eq!(report.steps(), 1_000);
    assert_eq!(report.keys[0].outcome, KeyOutcome::Unknown(UnknownReason::StepBudget { steps_max: 1_000 }));
}

#[test]
fn cache_budget_gives_unknown_instead_of_exhausting_memory() {
    let history = exhausting_history(16);
    let config = CheckConfig { cache_bytes_max_per_key: 4_096, ..CheckConfig::default() };
    let report = check_history(&history, &config);
    assert_eq!(report.keys[0].outcome, KeyOutcome::Unknown(UnknownReason::CacheBudget { bytes_max: 4_096 }));
}

#[test]
fn memoization_keeps_a_wide_search_small() {
    // Without the memo, refuting this explores every order of 12 writes (12! ≈ 4.8e8);
    // with it, only every subset (2^12 = 4096, times a register value each).
    let history = exhausting_history(12);
    let report = check(&history);
    assert_eq!(report.verdict(), Verdict::NotLinearizable);
    assert!(report.steps() < 1_000_000, "steps {}", report.steps());
}

#[test]
fn a_history_of_nondefinite_reads_only_is_linearizable() {
    assert_good(&["0 invoke read", "1 invoke read", "0 info read"]);
}

// ---------------------------------------------------------------------------------------
// Generated histories.

/// A deterministic stream of choices; the generator stops when it runs out.
struct Choices<'a> {
    rest: &'a [u32],
}

impl Choices<'_> {
    fn next(&mut self) -> Option<u32> {
        let (&first, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(first)
    }
}

/// What happened when an operation took effect in the model.
#[derive(Clone)]
enum Effect {
    Read(Value),
    Applied,
    CasMissed,
}

struct Pending {
    f: Function,
    key: Option<String>,
    value: Option<Value>,
    effect: Option<Effect>,
}

/// Generates a history by running a sequential register model: each operation is invoked,
/// takes effect at a chosen instant (or never), and completes afterwards with the result the
/// model gave (`ok`, `fail` for a missed cas, or `info`), or not at all. Such histories are
/// linearizable by construction. Write and cas values are unique.
fn generate(choices: &[u32], processes: usize, keys: usize, operations_max: usize) -> Vec<Event> {
    let mut choices = Choices { rest: choices };
    let key_names: Vec<Option<String>> = (0..keys).map(|index| (index > 0).then(|| format!("k{index}"))).collect();
    let mut registers: Vec<Value> = vec![Value::Null; keys];
    let mut written: Vec<Vec<Value>> = vec![Vec::new(); keys];
    let mut pending: Vec<Option<Pending>> = (0..processes).map(|_| None).collect();
    let mut invoked = 0usize;
    let mut next_value = 1i64;
    let mut events = Vec::new();

    // Each iteration consumes at least one choice, so the loop is bounded by their count.
    while let Some(choice) = choices.next() {
        let mut moves: Vec<(usize, u8)> = Vec::new();
        for (process, slot) in pending.iter().enumerate() {
            match slot {
                None if invoked < operations_max => moves.push((process, 0)),
                None => {}
                Some(op) => {
                    if op.effect.is_none() {
                        moves.push((process, 1));
                    }
                    moves.push((process, 2));
                }
            }
        }
        if moves.is_empty() {
            break;
        }
        let (process, kind) = moves[choice as usize % moves.len()];
        let process_id = i64::try_from(process).expect("few processes");
        match kind {
            0 => {
                let Some(detail) = choices.next() else { break };
                let key_index = (detail / 3) as usize % keys;
                let key = key_names[key_index].clone();
                let (f, value) = match detail % 3 {
                    0 => (Function::Read, None),
                    1 => {
                        next_value += 1;
                        (Function::Write, Some(json!(next_value)))
                    }
                    _ => {
                        next_value += 1;
                        let mut candidates = vec![Value::Null];
                        candidates.extend(written[key_index].iter().cloned());
                        let pick = (detail / 9) as usize;
                        let expected = if pick.is_multiple_of(2) {
                            registers[key_index].clone()
                        } else {
                            candidates[(pick / 2) % candidates.len()].clone()
                        };
                        (Function::Cas, Some(json!([expected, next_value])))
                    }
                };
                events.push(Event {
                    process: process_id,
                    event_type: EventType::Invoke,
                    f,
                    key: key.clone(),
                    value: value.clone(),
                });
                pending[process] = Some(Pending { f, key, value, effect: None });
                invoked += 1;
            }
            1 => {
                let Some(op) = pending[process].as_mut() else { continue };
                let key_index = key_names.iter().position(|name| *name == op.key).expect("known key");
                let register = &mut registers[key_index];
                op.effect = Some(match (op.f, &op.value) {
                    (Function::Read, _) => Effect::Read(register.clone()),
                    (Function::Write, Some(value)) => {
                        *register = value.clone();
                        written[key_index].push(value.clone());
                        Effect::Applied
                    }
                    (Function::Cas, Some(Value::Array(pair))) if pair[0] == *register => {
                        *register = pair[1].clone();
                        written[key_index].push(pair[1].clone());
                        Effect::Applied
                    }
                    _ => Effect::CasMissed,
                });
            }
            _ => {
                let Some(detail) = choices.next() else { break };
                let Some(op) = pending[process].take() else { continue };
                let (event_type, value) = match op.effect {
                    Some(_) if detail % 4 == 3 => (EventType::Info, op.value),
                    Some(Effect::Read(observed)) => (EventType::Ok, Some(observed)),
                    Some(Effect::Applied) => (EventType::Ok, op.value),
                    Some(Effect::CasMissed) => (EventType::Fail, op.value),
                    None if detail.is_multiple_of(2) => (EventType::Fail, op.value),
                    None => (EventType::Info, op.value),
                };
                events.push(Event { process: process_id, event_type, f: op.f, key: op.key, value });
            }
        }
    }
    events
}

/// Applies one well-formedness-preserving mutation: `kind` picks what, `target` which event,
/// `pick` the replacement value (from null, values up to the largest written, or 99, a
/// value never written).
fn mutate(events: &mut [Event], kind: u8, target: u32, pick: u32) {
    let largest = events
        .iter()
        .filter_map(|event| match &event.value {
            Some(Value::Number(number)) => number.as_i64(),
            Some(Value::Array(pair)) => pair.get(1).and_then(Value::as_i64),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let candidate = match pick as i64 % (largest + 2) {
        0 => Value::Null,
        value if value == largest + 1 => json!(99),
        value => json!(value),
    };
    let choose = |matches: &dyn Fn(&Event) -> bool| -> Option<usize> {
        let indices: Vec<usize> = (0..events.len()).filter(|&i| matches(&events[i])).collect();
        (!indices.is_empty()).then(|| indices[target as usize % indices.len()])
    };
    match kind % 7 {
        0 => {
            if let Some(i) = choose(&|e| e.event_type == EventType::Ok && e.f == Function::Read) {
                events[i].value = Some(candidate);
            }
        }
        1 => {
            if events.len() >= 2 {
                let i = target as usize % (events.len() - 1);
                if events[i].process != events[i + 1].process {
                    events.swap(i, i + 1);
                }
            }
        }
        2 => {
            if let Some(i) = choose(&|e| e.event_type == EventType::Ok) {
                events[i].event_type = EventType::Info;
            }
        }
        3 | 4 => {
            let from = if kind % 7 == 3 { EventType::Info } else { EventType::Fail };
            if let Some(i) = choose(&|e| e.event_type == from) {
                events[i].event_type = EventType::Ok;
                if events[i].f == Function::Read {
                    events[i].value = Some(candidate);
                }
            }
        }
        5 => {
            if let Some(i) = choose(&|e| e.event_type == EventType::Invoke && e.f == Function::Cas) {
                if let Some(Value::Array(pair)) = &mut events[i].value {
                    pair[0] = candidate;
                }
            }
        }
        _ => {
            if let Some(i) = choose(&|e| e.event_type == EventType::Invoke && e.f == Function::Write) {
                events[i].value = Some(candidate);
            }
        }
    }
}

fn parse_events(events: &[Event]) -> History {
    let lines: Vec<String> = events.iter().map(Event::to_json_line).collect();
    History::parse_jsonl(lines.join("\n").as_bytes()).expect("generated histories are well formed")
}

/// The checker's verdict, which must be definite on these small histories.
fn checker_says_linearizable(history: &History) -> bool {
    match check(history).verdict() {
        Verdict::Linearizable => true,
        Verdict::NotLinearizable => false,
        Verdict::Unknown => panic!("small history exhausted the default budget"),
    }
}

/// A small, fast, seeded generator (SplitMix64) for the deterministic sweep below.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn mutants_split_both_ways_and_checker_agrees_with_oracle_on_all() {
    // Proves the differential test is not vacuous: a fixed sweep of mutants contains many
    // histories of each verdict, and the checker and the oracle agree on every one.
    let mut seed = 0x5eed_u64;
    let (mut good, mut bad) = (0, 0);
    for _ in 0..2_000 {
        let choices: Vec<u32> = (0..40).map(|_| splitmix(&mut seed) as u32).collect();
        let processes = 2 + (splitmix(&mut seed) % 2) as usize;
        let mut events = generate(&choices, processes, 1, 8);
        for _ in 0..1 + splitmix(&mut seed) % 3 {
            let word = splitmix(&mut seed);
            mutate(&mut events, word as u8, (word >> 8) as u32, (word >> 40) as u32);
        }
        let history = parse_events(&events);
        let verdict = checker_says_linearizable(&history);
        assert_eq!(verdict, brute_force::is_linearizable(&history), "{events:#?}");
        if verdict {
            good += 1;
        } else {
            bad += 1;
        }
    }
    eprintln!("good {good}, bad {bad}");
    assert!(good > 300 && bad > 300, "good {good}, bad {bad}");
}

#[test]
fn long_generated_histories_check_within_budget() {
    let mut seed = 7u64;
    for _ in 0..5 {
        let choices: Vec<u32> = (0..3_000).map(|_| splitmix(&mut seed) as u32).collect();
        let history = parse_events(&generate(&choices, 5, 3, 1_000));
        assert!(history.operations().len() > 300, "{}", history.operations().len());
        assert_eq!(check(&history).verdict(), Verdict::Linearizable);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Histories produced by a sequential execution with overlapping timing are linearizable,
    /// and both checkers say so.
    #[test]
    fn generated_histories_are_linearizable(
        choices in prop::collection::vec(any::<u32>(), 0..48),
        processes in 2usize..=3,
        keys in 1usize..=2,
    ) {
        let history = parse_events(&generate(&choices, processes, keys, 8));
        prop_assert!(checker_says_linearizable(&history));
        prop_assert!(brute_force::is_linearizable(&history));
    }

    /// After arbitrary mutations the checker and the brute-force oracle still agree.
    #[test]
    fn checker_agrees_with_brute_force_on_mutants(
        choices in prop::collection::vec(any::<u32>(), 0..48),
        processes in 2usize..=3,
        keys in 1usize..=2,
        mutations in prop::collection::vec((any::<u8>(), any::<u32>(), any::<u32>()), 1..4),
    ) {
        let mut events = generate(&choices, processes, keys, 8);
        for (kind, target, pick) in mutations {
            mutate(&mut events, kind, target, pick);
        }
        let history = parse_events(&events);
        prop_assert_eq!(
            checker_says_linearizable(&history),
            brute_force::is_linearizable(&history),
            "{:#?}",
            events
        );
    }
}
