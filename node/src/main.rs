//! The `floe` binary: parses the command line, sets up logging, runs the command.
use clap::Parser;
use floe_node::cli::{self, Cli, Commands, LogFormat};

fn init_logging(format: LogFormat, filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Errors end the process with status 1 and the message chain on stderr (no backtrace: these
/// are operator-facing messages, not crashes).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Commands::Dev(args) => cli::run_dev(args).await,
            Commands::Start(args) => cli::run_start(args).await,
            Commands::Doc(cmd) => cli::run_doc(cmd).await,
            Commands::Bench(args) => cli::run_bench(args).await,
            Commands::Ctl(args) => floe_node::ctl::run(args).await,
        }
    })
}
