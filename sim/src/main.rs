//! The `floe-sim` binary: parses arguments, runs the chosen subcommand from
//! [`floe_sim::cli`], and maps the outcome to an exit code (see `floe-sim --help`).
//!
//! Invariant: this file only wires things together; errors reaching it (unreadable or
//! invalid input, failed output) exit with code 2, as clap does for bad arguments.

use std::process::ExitCode;

use clap::Parser as _;
use floe_sim::cli::{self, Cli, Command, EXIT_INVALID_INPUT};

/// jemalloc instead of the system allocator: a simulated run allocates and frees message
/// bodies, futures and log entries all the time, and glibc's malloc took about a fifth of
/// the time (3 nodes, 1,000 ops, release: 164x real time with glibc, 187-200x with mimalloc,
/// which returns freed pages to the kernel at once and faults them in again, 202-204x with
/// jemalloc). The allocator cannot change a run: no code reads addresses.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `FLOE_SIM_LOG=info` (any tracing filter) prints the nodes' own log lines, each inside
    // its node's span; simulated runs have no wall-clock timestamps to show.
    if let Ok(filter) = std::env::var("FLOE_SIM_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .without_time()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .init();
    }
    match run(&cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("floe-sim: {error:#}");
            ExitCode::from(EXIT_INVALID_INPUT)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Check(args) => {
            let stdout = std::io::stdout();
            let stderr = std::io::stderr();
            let verdict = cli::run_check(args, &mut stdout.lock(), &mut stderr.lock())?;
            Ok(ExitCode::from(cli::exit_code(verdict)))
        }
        Command::Replay(args) => {
            let stdout = std::io::stdout();
            let passed = cli::replay(args, &mut stdout.lock())?;
            Ok(if passed { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Run(args) => {
            let stdout = std::io::stdout();
            let passed = cli::run_seeds(args, &mut stdout.lock())?;
            Ok(if passed { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}
