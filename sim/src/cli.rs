//! The `floe-sim` command line: clap definitions, the `check` subcommand, how its results are
//! rendered, and the exit codes.
//!
//! Exit codes: 0 linearizable, 1 not linearizable, 2 unreadable or invalid input (including
//! bad arguments, as clap reports them), 3 unknown (a key exhausted its search budget and no
//! key is certainly not linearizable).
//!
//! Invariants: this is the only module that touches files or the terminal, and it only reads
//! the history file it is given and writes to the writers it is handed. Output is bounded:
//! at most `KEYS_SHOWN_MAX` keys and `PREFIX_SHOWN_MAX` prefix operations per key.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::history::{abbreviate, History, HistoryError};
use crate::linearizability::{
    check_history, CheckConfig, CheckReport, KeyOutcome, KeyReport, UnknownReason, Verdict,
    CACHE_BYTES_MAX_PER_KEY_DEFAULT, STEPS_MAX_PER_KEY_DEFAULT,
};

/// Exit code: every key is linearizable.
pub const EXIT_LINEARIZABLE: u8 = 0;
/// Exit code: some key is not linearizable.
pub const EXIT_NOT_LINEARIZABLE: u8 = 1;
/// Exit code: the input could not be read or parsed, or the arguments were wrong.
pub const EXIT_INVALID_INPUT: u8 = 2;
/// Exit code: the search budget ran out before an answer.
pub const EXIT_UNKNOWN: u8 = 3;

/// Keys rendered per verdict; the rest are counted.
const KEYS_SHOWN_MAX: usize = 10;
/// Operations of a counterexample's prefix rendered (the last ones); the rest are counted.
const PREFIX_SHOWN_MAX: usize = 20;

/// Floe's deterministic simulator and consistency checkers.
#[derive(Debug, Parser)]
#[command(name = "floe-sim", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a JSONL register history for per-key linearizability.
    ///
    /// Exit codes: 0 linearizable, 1 not linearizable, 2 unreadable or invalid input,
    /// 3 unknown (a key exhausted its search budget).
    Check(CheckArgs),
    /// Run simulated clusters of real node code from seeds, with faults, and check them.
    ///
    /// Prints one line per seed with its trace hash, then a summary; exits 1 if any seed
    /// found a violation.
    Run(RunArgs),
    /// Re-run one seed and write its timeline (operations per client, faults, leader
    /// changes, the violating operations highlighted) as HTML.
    Replay(ReplayArgs),
}

/// Arguments of `floe-sim replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Where to write the HTML timeline.
    #[arg(long)]
    pub html: PathBuf,
}

/// Runs the one seed of `args.run` and writes its timeline; returns true when it passed.
pub fn replay(args: &ReplayArgs, out: &mut dyn Write) -> anyhow::Result<bool> {
    let seed = args.run.seed.ok_or_else(|| anyhow::anyhow!("replay needs --seed N"))?;
    let faults = crate::run::FaultKind::parse_list(&args.run.faults).map_err(anyhow::Error::msg)?;
    floe_node::planted::plant(args.run.plant.as_deref()).map_err(anyhow::Error::msg)?;
    let config = crate::run::RunConfig {
        seed,
        nodes: args.run.nodes,
        ops: args.run.ops,
        clients: args.run.clients,
        keys: args.run.keys,
        faults,
    };
    let report = crate::run::run_seed(&config).map_err(anyhow::Error::msg)?;
    std::fs::write(&args.html, crate::html::render(&report))?;
    writeln!(
        out,
        "seed {seed}: trace-hash: {:016x} verdict {:?}; timeline written to {}",
        report.trace_hash,
        report.verdict,
        args.html.display()
    )?;
    for v in &report.violations {
        writeln!(out, "  violation: {v}")?;
    }
    Ok(report.violations.is_empty())
}

/// Arguments of `floe-sim run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// One seed.
    #[arg(long, conflicts_with = "seeds")]
    pub seed: Option<u64>,
    /// A seed range `A..B` (B exclusive).
    #[arg(long)]
    pub seeds: Option<String>,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Client operations per seed.
    #[arg(long, default_value_t = 300)]
    pub ops: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    pub clients: u64,
    /// Documents (registers) the clients share.
    #[arg(long, default_value_t = 4)]
    pub keys: u64,
    /// Fault classes: `all`, `none`, or a comma list of crash, partition, cut, net, disk, pause,
    /// elastic (splits, merges, leader transfers, replica moves when there are more nodes
    /// than replicas per shard, hibernation).
    #[arg(long, default_value = "all")]
    pub faults: String,
    /// Plant a known bug (needs the `planted-bugs` feature): stale-strong-read,
    /// ack-before-commit, lost-session, stale-bounded-read, split-drops-entry.
    #[arg(long)]
    pub plant: Option<String>,
    /// Write each violating seed's history here as `seed-N.jsonl`.
    #[arg(long)]
    pub history_dir: Option<PathBuf>,
}

/// Parses `A..B` into a range.
pub fn parse_seed_range(text: &str) -> Result<std::ops::Range<u64>, String> {
    let (a, b) = text.split_once("..").ok_or_else(|| format!("{text:?} is not A..B"))?;
    let a: u64 = a.trim().parse().map_err(|e| format!("seed range start {a:?}: {e}"))?;
    let b: u64 = b.trim().parse().map_err(|e| format!("seed range end {b:?}: {e}"))?;
    if b <= a {
        return Err(format!("empty seed range {text:?}"));
    }
    Ok(a..b)
}

/// Runs the seeds of `args`, printing per-seed lines and a summary to `out`. Returns true when
/// every seed passed.
pub fn run_seeds(args: &RunArgs, out: &mut dyn Write) -> anyhow::Result<bool> {
    let seeds = match (&args.seed, &args.seeds) {
        (Some(s), _) => *s..*s + 1,
        (None, Some(r)) => parse_seed_range(r).map_err(anyhow::Error::msg)?,
        (None, None) => 0..1,
    };
    let faults = crate::run::FaultKind::parse_list(&args.faults).map_err(anyhow::Error::msg)?;
    floe_node::planted::plant(args.plant.as_deref()).map_err(anyhow::Error::msg)?;
    let (mut ops, mut sim, mut wall, mut bad, mut fault_total) = (0u64, 0f64, 0f64, Vec::new(), 0u64);
    for seed in seeds.clone() {
        let config = crate::run::RunConfig {
            seed,
            nodes: args.nodes,
            ops: args.ops,
            clients: args.clients,
            keys: args.keys,
            faults: faults.clone(),
        };
        let report = crate::run::run_seed(&config).map_err(anyhow::Error::msg)?;
        ops += report.ops_ok + report.ops_failed + report.ops_unknown;
        sim += report.sim_time.as_secs_f64();
        wall += report.wall_time.as_secs_f64();
        fault_total += report.faults;
        writeln!(
            out,
            "seed {seed}: trace-hash: {:016x} events {} ops ok/fail/unknown {}/{}/{} eventual/bounded reads {}/{} bank transfers/reads {}/{} splits/merges/transfers/moves {}/{}/{}/{} reads via replica {} hibernations {} driver splits/merges/moves/re-replications/transfers {}/{}/{}/{}/{} faults {} sim {:.1}s wall {:.2}s verdict {:?}",
            report.trace_hash,
            report.trace_events,
            report.ops_ok,
            report.ops_failed,
            report.ops_unknown,
            report.eventual_reads,
            report.bounded_reads,
            report.bank_transfers_ok,
            report.bank_reads_ok,
            report.splits,
            report.merges,
            report.transfers,
            report.moves,
            report.counters.reads_via_replica,
            report.hibernations,
            report.counters.driver_splits,
            report.counters.driver_merges,
            report.counters.driver_moves,
            report.counters.driver_re_replications,
            report.counters.driver_transfers,
            report.faults,
            report.sim_time.as_secs_f64(),
            report.wall_time.as_secs_f64(),
            report.verdict
        )?;
        if !report.violations.is_empty() || report.verdict == Verdict::NotLinearizable {
            for v in &report.violations {
                writeln!(out, "  violation: {v}")?;
            }
            writeln!(
                out,
                "  replay: floe-sim run --seed {seed} --nodes {} --ops {} --clients {} --keys {} --faults {}",
                args.nodes, args.ops, args.clients, args.keys, args.faults
            )?;
            if let Some(dir) = &args.history_dir {
                std::fs::create_dir_all(dir)?;
                let lines: Vec<String> = report.history.iter().map(|e| e.to_json_line()).collect();
                std::fs::write(dir.join(format!("seed-{seed}.jsonl")), lines.join("\n") + "\n")?;
            }
            bad.push(seed);
        }
    }
    let n = seeds.end - seeds.start;
    writeln!(
        out,
        "summary: seeds {n} operations {ops} faults {fault_total} simulated {sim:.1}s wall {wall:.2}s speed-up {:.0}x seeds/min {:.0} violations {}",
        if wall > 0.0 { sim / wall } else { 0.0 },
        if wall > 0.0 { n as f64 * 60.0 / wall } else { 0.0 },
        bad.len()
    )?;
    if !bad.is_empty() {
        writeln!(out, "violating seeds: {bad:?}")?;
    }
    Ok(bad.is_empty())
}

/// Arguments of `floe-sim check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The history: one JSON event per line, e.g.
    /// {"process": 0, "type": "invoke", "f": "write", "key": "a", "value": 1}.
    #[arg(long, value_name = "FILE.jsonl")]
    pub history: PathBuf,
    /// Search steps allowed per key before the key is reported unknown.
    #[arg(long, value_name = "STEPS", default_value_t = STEPS_MAX_PER_KEY_DEFAULT)]
    pub steps_max_per_key: u64,
    /// Memo bytes allowed per key before the key is reported unknown.
    #[arg(long, value_name = "BYTES", default_value_t = CACHE_BYTES_MAX_PER_KEY_DEFAULT)]
    pub cache_bytes_max_per_key: usize,
}

/// Why `check` could not produce a verdict. Display gives the outer message only; the
/// cause is the `source()` (print with `{:#}` in anyhow, or walk the chain).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The history file could not be read.
    #[error("cannot read history {path}")]
    ReadHistory {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The history file is not a valid history.
    #[error("invalid history {path}")]
    InvalidHistory {
        /// The file.
        path: PathBuf,
        /// The parse error, naming the line.
        source: HistoryError,
    },
    /// Writing the result failed.
    #[error("cannot write output")]
    Output(#[from] io::Error),
}

/// The exit code for a verdict.
pub fn exit_code(verdict: Verdict) -> u8 {
    match verdict {
        Verdict::Linearizable => EXIT_LINEARIZABLE,
        Verdict::NotLinearizable => EXIT_NOT_LINEARIZABLE,
        Verdict::Unknown => EXIT_UNKNOWN,
    }
}

/// Runs `floe-sim check`: the verdict and any counterexample go to `out`, a one-line summary
/// to `diagnostics`.
pub fn run_check(args: &CheckArgs, out: &mut impl Write, diagnostics: &mut impl Write) -> Result<Verdict, CliError> {
    let bytes =
        std::fs::read(&args.history).map_err(|source| CliError::ReadHistory { path: args.history.clone(), source })?;
    let history = History::parse_jsonl(&bytes)
        .map_err(|source| CliError::InvalidHistory { path: args.history.clone(), source })?;
    let config = CheckConfig {
        steps_max_per_key: args.steps_max_per_key,
        cache_bytes_max_per_key: args.cache_bytes_max_per_key,
    };
    let report = check_history(&history, &config);
    render_report(&history, &report, out)?;
    render_summary(&args.history, &history, &report, diagnostics)?;
    Ok(report.verdict())
}

/// Writes the verdict line, then each non-linearizable key's counterexample and each unknown
/// key's reason.
pub fn render_report(history: &History, report: &CheckReport, out: &mut impl Write) -> io::Result<()> {
    let verdict = report.verdict();
    match verdict {
        Verdict::Linearizable => return writeln!(out, "linearizable"),
        Verdict::NotLinearizable => writeln!(out, "NOT linearizable")?,
        Verdict::Unknown => writeln!(out, "unknown")?,
    }
    let violations: Vec<&KeyReport> =
        report.keys.iter().filter(|key| matches!(key.outcome, KeyOutcome::NotLinearizable(_))).collect();
    let unknowns: Vec<&KeyReport> =
        report.keys.iter().filter(|key| matches!(key.outcome, KeyOutcome::Unknown(_))).collect();
    for key in violations.iter().take(KEYS_SHOWN_MAX) {
        render_key(history, key, out)?;
    }
    if violations.len() > KEYS_SHOWN_MAX {
        writeln!(out, "... and {} more keys not linearizable", violations.len() - KEYS_SHOWN_MAX)?;
    }
    for key in unknowns.iter().take(KEYS_SHOWN_MAX) {
        render_key(history, key, out)?;
    }
    if unknowns.len() > KEYS_SHOWN_MAX {
        writeln!(out, "... and {} more keys unknown", unknowns.len() - KEYS_SHOWN_MAX)?;
    }
    Ok(())
}

fn render_key(history: &History, key: &KeyReport, out: &mut impl Write) -> io::Result<()> {
    let name = abbreviate(&serde_json::Value::from(key.key.as_str()));
    let operations = history.operations();
    match &key.outcome {
        KeyOutcome::Linearizable => writeln!(out, "key {name}: linearizable"),
        KeyOutcome::Unknown(reason) => {
            let why = match reason {
                UnknownReason::StepBudget { steps_max } => {
                    format!("step budget of {steps_max} exhausted")
                }
                UnknownReason::CacheBudget { bytes_max } => {
                    format!("memo budget of {bytes_max} bytes exhausted")
                }
            };
            let steps = count(usize::try_from(key.steps).unwrap_or(usize::MAX), "step");
            writeln!(out, "key {name}: unknown ({why} after {steps} on {})", count(key.operations, "operation"))
        }
        KeyOutcome::NotLinearizable(counterexample) => {
            writeln!(out, "key {name}: not linearizable ({} on this key)", count(key.operations, "operation"))?;
            let prefix = &counterexample.prefix;
            writeln!(out, "  longest linearizable prefix found ({}):", count(prefix.len(), "operation"))?;
            if prefix.is_empty() {
                writeln!(out, "    (none: no operation can go first)")?;
            }
            let hidden = prefix.len().saturating_sub(PREFIX_SHOWN_MAX);
            if hidden > 0 {
                writeln!(out, "    ... {hidden} earlier operations")?;
            }
            for (position, &index) in prefix.iter().enumerate().skip(hidden) {
                writeln!(out, "    {}. {}", position + 1, operations[index])?;
            }
            writeln!(out, "  register after the prefix: {}", abbreviate(&counterexample.register_after_prefix))?;
            writeln!(out, "  cannot be placed next: {}", operations[counterexample.unplaceable])
        }
    }
}

fn render_summary(
    path: &Path,
    history: &History,
    report: &CheckReport,
    diagnostics: &mut impl Write,
) -> io::Result<()> {
    let stats = history.stats();
    writeln!(
        diagnostics,
        "{}: {}, {} on {} ({} ok, {} indeterminate; dropped {} failed, {} indeterminate reads), \
         {} search steps",
        path.display(),
        count(stats.events, "event"),
        count(history.operations().len(), "operation"),
        count(report.keys.len(), "key"),
        stats.definite,
        stats.indeterminate,
        stats.failed_dropped,
        stats.indeterminate_reads_dropped,
        report.steps()
    )
}

/// `1 operation`, `2 operations`.
fn count(number: usize, noun: &str) -> String {
    if number == 1 {
        format!("1 {noun}")
    } else {
        format!("{number} {noun}s")
    }
}
