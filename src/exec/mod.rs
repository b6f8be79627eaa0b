//! Tool files, registry, runner and job store: everything that runs commands,
//! independent of HTTP and of the tailnet.
//!
//! - [`tool`]: tool files (JSON as the Go SDK writes it, or TOML) and their
//!   validation; [`tool::validate_path`] backs `tailkitd validate`.
//! - [`registry`]: the live, atomically swapped index of a tools directory.
//! - [`runner`]: argument validation, argv substitution, running a process.
//! - [`launcher`]: the `tailkitd-launch` supervisor between daemon and
//!   command.
//! - [`jobs`]: the job store.
//! - [`executor`]: admits, audits, runs and finishes jobs.
//! - [`duration`], [`pattern`]: Go's duration syntax and regex semantics.

pub mod duration;
pub mod executor;
pub mod jobs;
pub mod launcher;
pub mod pattern;
pub mod registry;
pub mod runner;
pub mod tool;

use std::path::PathBuf;
use std::time::Duration;

pub use executor::{Executor, JobCaller, StartError};
pub use jobs::{JobResult, JobStatus, JobStore};
pub use registry::{ExecEntry, Registry, WatchGuard};
pub use runner::{CancelReason, Runner, RunnerSettings};
pub use tool::{Problem, Tool, ToolLimits, validate_path};

/// Every limit of the exec side, with SPEC defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSettings {
    /// Timeout of a command that declares none (60 s).
    pub default_timeout: Duration,
    /// Largest timeout a tool file may declare (1 h).
    pub max_timeout: Duration,
    /// Output kept per stream and job (1 MiB).
    pub max_output_bytes: usize,
    /// Largest `max_output_bytes` a tool file may declare (64 MiB).
    pub max_declared_output_bytes: usize,
    /// Time between SIGTERM and SIGKILL (5 s).
    pub kill_grace: Duration,
    /// Output drained after the main process exits (1 s).
    pub drain_after_exit: Duration,
    /// Jobs accepted or running at once (16).
    pub max_jobs: usize,
    /// How long finished results are kept (5 min).
    pub job_ttl: Duration,
    /// Finished results kept at most (10 000).
    pub max_retained: usize,
    /// Total stdout + stderr bytes of the finished results kept (256 MiB);
    /// the oldest are evicted past it, never the result just finished.
    pub max_retained_output_bytes: usize,
    /// Largest request body (64 KiB).
    pub max_body_bytes: usize,
    /// Largest argument value (4 KiB).
    pub max_value_bytes: usize,
    /// Largest `?wait=` (60 s).
    pub max_wait: Duration,
    /// The `tailkitd-launch` executable started as each job's supervisor;
    /// by default the one next to the running executable.
    pub launcher: PathBuf,
}

impl Default for ExecSettings {
    fn default() -> Self {
        ExecSettings {
            default_timeout: Duration::from_secs(60),
            max_timeout: Duration::from_secs(3600),
            max_output_bytes: 1 << 20,
            max_declared_output_bytes: 64 << 20,
            kill_grace: Duration::from_secs(5),
            drain_after_exit: Duration::from_secs(1),
            max_jobs: 16,
            job_ttl: Duration::from_secs(300),
            max_retained: 10_000,
            max_retained_output_bytes: 256 << 20,
            max_body_bytes: 64 << 10,
            max_value_bytes: 4 << 10,
            max_wait: Duration::from_secs(60),
            launcher: default_launcher(),
        }
    }
}

/// Where the launcher is expected: next to the running executable.
pub fn default_launcher() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(launcher::LAUNCHER_NAME)))
        .unwrap_or_else(|| PathBuf::from(launcher::LAUNCHER_NAME))
}

impl ExecSettings {
    /// The limits tool files are loaded with.
    pub fn tool_limits(&self) -> ToolLimits {
        ToolLimits {
            max_timeout: self.max_timeout,
            max_value_bytes: self.max_value_bytes,
            max_output_bytes: self.max_declared_output_bytes,
        }
    }

    /// The longest a run takes from its cancellation to its end.
    pub fn stop_limit(&self) -> Duration {
        runner::stop_limit(self.kill_grace)
    }

    /// The runner's part of the settings.
    pub fn runner_settings(&self) -> RunnerSettings {
        RunnerSettings {
            launcher: self.launcher.clone(),
            kill_grace: self.kill_grace,
            drain_after_exit: self.drain_after_exit,
        }
    }
}
