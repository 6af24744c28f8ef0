//! End-to-end tests of the `floe-sim` binary on the sample histories in `tests/data/`:
//! verdict text, exit codes (0 linearizable, 1 not, 2 invalid input, 3 unknown), and error
//! messages that name the offending line.

use std::path::PathBuf;
use std::process::{Command, Output};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("data").join(name)
}

fn floe_sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_floe-sim")).args(args).output().expect("floe-sim runs")
}

fn check(name: &str, extra: &[&str]) -> (i32, String, String) {
    let path = data(name);
    let path = path.to_str().expect("UTF-8 path");
    let mut args = vec!["check", "--history", path];
    args.extend_from_slice(extra);
    let output = floe_sim(&args);
    (
        output.status.code().expect("exited normally"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn help_lists_check() {
    let output = floe_sim(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("check"), "{help}");
    assert!(help.contains("run"), "{help}");
}

#[test]
fn linearizable_history_exits_zero() {
    let (code, stdout, stderr) = check("linearizable_registers.jsonl", &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(stdout, "linearizable\n");
    assert!(stderr.contains("19 events"), "{stderr}");
}

#[test]
fn stale_read_exits_one_naming_the_key_and_counterexample() {
    let (code, stdout, stderr) = check("stale_read.jsonl", &[]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.starts_with("NOT linearizable\n"), "{stdout}");
    assert!(stdout.contains("key \"doc-1\": not linearizable"), "{stdout}");
    assert!(!stdout.contains("doc-2"), "only the bad key is reported: {stdout}");
    assert!(stdout.contains("register after the prefix: 2"), "{stdout}");
    assert!(stdout.contains("cannot be placed next: process 2 read -> 1 (lines 7-8)"), "{stdout}");
}

#[test]
fn indeterminate_write_read_before_its_invoke_exits_one() {
    let (code, stdout, _) = check("info_write_read_before_invoke.jsonl", &[]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("key \"x\""), "{stdout}");
}

#[test]
fn exhausted_budget_exits_three() {
    let (code, stdout, _) = check("wide_phantom_read.jsonl", &["--steps-max-per-key", "100"]);
    assert_eq!(code, 3, "{stdout}");
    assert!(stdout.starts_with("unknown\n"), "{stdout}");
    assert!(stdout.contains("step budget of 100 exhausted"), "{stdout}");
    // With the default budget the same history is refuted.
    let (code, stdout, _) = check("wide_phantom_read.jsonl", &[]);
    assert_eq!(code, 1, "{stdout}");
}

#[test]
fn invalid_histories_exit_two_naming_the_line() {
    let (code, stdout, stderr) = check("invalid_overlapping_invoke.jsonl", &[]);
    assert_eq!(code, 2, "{stdout}");
    assert!(stderr.contains("line 3: process 0 invokes"), "{stderr}");
    let (code, _, stderr) = check("invalid_json.jsonl", &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("line 2: invalid JSON"), "{stderr}");
}

#[test]
fn unreadable_history_and_bad_arguments_exit_two() {
    let (code, _, stderr) = check("no_such_file.jsonl", &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("cannot read history"), "{stderr}");
    let output = floe_sim(&["check"]);
    assert_eq!(output.status.code(), Some(2));
    let output = floe_sim(&["run", "--seeds", "5..2"]);
    assert_eq!(output.status.code(), Some(2), "an empty seed range is bad input");
    let output = floe_sim(&["replay"]);
    assert_eq!(output.status.code(), Some(2), "no fake subcommands");
}
