//! The `tailkitd` command line: parse, pick the subcommand, map errors to
//! exit codes. Everything else lives in the library.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tailkitd::config::{LogFormat, RunArgs, Settings};

#[derive(Parser)]
#[command(
    version,
    about = "Audited remote commands for Tailscale peers",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
// Parsed once; the size of `RunArgs` does not matter.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Run the daemon (the default when no subcommand is given).
    Run(RunArgs),
    /// Check a tool file or a directory of them; print every problem.
    Validate {
        /// A `.json` / `.toml` tool file, or a directory of them.
        path: PathBuf,
    },
    /// Show the whole thing on an embedded local tailnet: no account, no setup.
    Demo,
    /// Run an embedded local tailnet with client nodes and SOCKS5 proxies,
    /// print how to reach it as one JSON line, and wait for SIGINT/SIGTERM.
    Localnet {
        /// How many client nodes to start.
        #[arg(long, default_value_t = 2)]
        clients: usize,
        /// Grant a capability to one client (its name or 1-based index) toward every node.
        #[arg(long = "grant", value_name = "CLIENT=CAP", value_parser = tailkitd::demo::parse_grant)]
        grants: Vec<(String, String)>,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Cmd::Run(cli.run)) {
        Cmd::Run(args) => {
            let os_hostname = nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default();
            let settings = Settings::resolve(args, |k| std::env::var(k).ok(), &os_hostname)?;
            init_tracing(settings.log_format, "tailkitd=info");
            runtime()?.block_on(tailkitd::daemon::run(settings))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Validate { path } => Ok(validate(&path)),
        Cmd::Demo => {
            init_tracing(LogFormat::Text, "tailkitd=warn");
            let exe = std::env::current_exe().context("locating this executable")?;
            runtime()?.block_on(tailkitd::demo::run_demo(&exe))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Localnet { clients, grants } => {
            init_tracing(LogFormat::Text, "tailkitd=info");
            runtime()?.block_on(tailkitd::demo::run_localnet(clients, &grants))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Logs to stderr, filtered by `RUST_LOG` (default `default_filter`).
fn init_tracing(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn validate(path: &Path) -> ExitCode {
    let problems = tailkitd::tools::validate_path(path);
    for problem in &problems {
        println!("{problem}");
    }
    if problems.is_empty() {
        println!("{}: ok", path.display());
        ExitCode::SUCCESS
    } else {
        eprintln!("{} problem(s)", problems.len());
        ExitCode::FAILURE
    }
}
