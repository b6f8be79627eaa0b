//! The `tailkitd` command line: parse, pick the subcommand, map errors to
//! exit codes. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Audited remote commands for Tailscale peers")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check a tool file or a directory of them; print every problem.
    Validate {
        /// A `.json` / `.toml` tool file, or a directory of them.
        path: PathBuf,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    // The command launcher (`tailkitd __launch ...`) must run before
    // anything else starts; it never returns.
    tailkitd::exec::launcher::run_if_requested();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Validate { path } => Ok(validate(&path)),
    }
}

fn validate(path: &std::path::Path) -> ExitCode {
    let problems = tailkitd::exec::validate_path(path);
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
