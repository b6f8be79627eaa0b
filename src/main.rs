//! The `tailkitd` command line: parse, pick the subcommand, map errors to
//! exit codes. Everything else lives in the library.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use tailkitd::call::cli::{CallArgs, ToolsArgs};
use tailkitd::config::{LogFormat, RunArgs, Settings};
use tailkitd::startup;

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
    /// Run a command on a node, or on a fleet, with its output live and its
    /// exit code.
    Call(CallArgs),
    /// List the commands you may run on a node, with their arguments.
    Tools(ToolsArgs),
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => exit_for_clap_error(e),
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // Plainly, without anyhow's backtrace (RUST_BACKTRACE is for
            // bugs, not for a missing file) and each cause once.
            eprintln!("tailkitd: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command.unwrap_or(Cmd::Run(cli.run)) {
        Cmd::Run(mut args) => {
            args.handed_over_key = startup::take_handed_over_key()?;
            let settings = Settings::resolve(args, |k| std::env::var(k).ok(), &os_hostname())?;
            let loopback = settings
                .control_url
                .as_deref()
                .is_some_and(tsnet_bridge::is_loopback_control_url);
            startup::reexec_if_needed(Some(settings.auth_key.as_ref()), loopback)?;
            init_tracing(settings.log_format, "tailkitd=info");
            block_on(tailkitd::daemon::run(settings))??;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Validate { path } => Ok(validate(&path)),
        Cmd::Demo => {
            startup::reexec_if_needed(None, true)?;
            init_tracing(LogFormat::Text, "tailkitd=warn");
            let exe = std::env::current_exe().context("locating this executable")?;
            block_on(tailkitd::demo::run_demo(&exe))??;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Call(args) => {
            init_tracing(LogFormat::Text, "tailkitd=warn");
            let exit = runtime()?.block_on(tailkitd::call::run_call(args, &os_hostname()));
            Ok(ExitCode::from(exit))
        }
        Cmd::Tools(args) => {
            init_tracing(LogFormat::Text, "tailkitd=warn");
            let exit = runtime()?.block_on(tailkitd::call::run_tools(args, &os_hostname()));
            Ok(ExitCode::from(exit))
        }
        Cmd::Localnet { clients, grants } => {
            startup::reexec_if_needed(None, true)?;
            init_tracing(LogFormat::Text, "tailkitd=info");
            block_on(tailkitd::demo::run_localnet(clients, &grants))??;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs `f` to completion on a multi-threaded runtime, then drops the
/// runtime without waiting for blocking bridge calls still under way (a
/// join attempt cut short by SIGTERM must not hold the exit).
fn block_on<T>(f: impl Future<Output = T>) -> anyhow::Result<T> {
    let rt = runtime()?;
    let out = rt.block_on(f);
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(out)
}

/// `err` and its causes, `: `-separated, skipping a cause whose text the
/// message before it already carries.
fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

/// Prints a command-line error and exits as clap does, naming the
/// environment variable when the bad value came from one.
/// A client command line that cannot work never ran anything: `call` and
/// `tools` exit 255 for it, like every other way they fail before the
/// command runs.
fn exit_for_clap_error(e: clap::Error) -> ! {
    if e.use_stderr() && is_client_command() {
        let _ = e.print();
        std::process::exit(tailkitd::call::report::EXIT_NEVER_RAN.into());
    }
    let run = Cli::command();
    let run = run.find_subcommand("run").unwrap_or(&run);
    match tailkitd::config::name_env_in_error(&e, run, std::env::args_os()) {
        Some(text) => {
            eprint!("{text}");
            std::process::exit(e.exit_code());
        }
        None => e.exit(),
    }
}

/// Whether the subcommand is `call` or `tools`.
fn is_client_command() -> bool {
    std::env::args()
        .nth(1)
        .is_some_and(|a| a == "call" || a == "tools")
}

fn os_hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
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
