//! Running what the [tools](crate::tools) side allows: the executor (the one
//! seam the API calls), the process runner and its per-job supervisor
//! (`tailkitd-launch`), and the job store. Knows nothing of HTTP or of the
//! tailnet: callers arrive as plain [`Identity`](crate::identity::Identity)
//! data.
//!
//! - [`executor`]: [`Executor::submit`] prepares the arguments, admits the
//!   job, records `exec.accepted` and starts it, refusing (and auditing)
//!   with a [`Refusal`]; results are read and cancelled through it too.
//! - [`runner`]: one command, through the supervisor, to its end.
//! - [`supervisor`]: the daemon's side of the supervisor process
//!   (`tailkitd-launch serve`) that starts and contains every command.
//! - [`spawn`]: the spawner thread that starts the supervisor.
//! - [`store`]: every job from acceptance until its result expires.
//! - [`output`]: a job's one retained output buffer and its fixed event
//!   sequence, which live streams read (SPEC §7).
//! - [`result`]: the job result as the API shows it.

pub mod executor;
pub mod output;
pub mod result;
pub mod runner;
pub mod spawn;
pub mod store;
pub mod supervisor;

use std::path::PathBuf;
use std::time::Duration;

pub use executor::{Executor, JobCaller, Refusal};
pub use output::JobOutput;
pub use result::{JobResult, JobStatus, JobView};
pub use runner::{CancelReason, Runner, RunnerSettings};
pub use store::JobStore;
pub use supervisor::CgroupSetting;

use crate::tools::{RunAs, ToolLimits};

/// Every limit of the run side, with SPEC defaults.
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
    /// Largest argument value (4 KiB).
    pub max_value_bytes: usize,
    /// The `tailkitd-launch` executable started as each job's launcher
    /// (jobs without a cgroup); by default the one next to the running
    /// executable.
    pub launcher: PathBuf,
    /// The `tailkitd-launch` executable started once as the supervisor;
    /// by default the one next to the running executable.
    pub supervisor: PathBuf,
    /// Where job cgroups go (`auto`).
    pub cgroup: CgroupSetting,
    /// The soft limit of open files commands get: the one the daemon was
    /// started with (the Go runtime raises its own); `None`: unchanged.
    pub command_nofile: Option<u64>,
    /// Who commands run as unless their tool file says (`None`: the
    /// daemon's own user).
    pub command_user: Option<RunAs>,
}

impl Default for ExecSettings {
    fn default() -> Self {
        let tools = ToolLimits::default();
        ExecSettings {
            default_timeout: Duration::from_secs(60),
            max_timeout: tools.max_timeout,
            max_output_bytes: 1 << 20,
            max_declared_output_bytes: tools.max_output_bytes,
            kill_grace: Duration::from_secs(5),
            drain_after_exit: Duration::from_secs(1),
            max_jobs: 16,
            job_ttl: Duration::from_secs(300),
            max_retained: 10_000,
            max_retained_output_bytes: 256 << 20,
            max_value_bytes: tools.max_value_bytes,
            launcher: default_launcher(),
            supervisor: default_launcher(),
            cgroup: CgroupSetting::Auto,
            command_nofile: None,
            command_user: None,
        }
    }
}

/// Where the launcher is expected: next to the running executable.
pub fn default_launcher() -> PathBuf {
    use tailkitd_launch::LAUNCHER_NAME;
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(LAUNCHER_NAME)))
        .unwrap_or_else(|| PathBuf::from(LAUNCHER_NAME))
}

impl ExecSettings {
    /// The limits tool files are loaded with.
    pub fn tool_limits(&self) -> ToolLimits {
        ToolLimits {
            max_timeout: self.max_timeout,
            max_value_bytes: self.max_value_bytes,
            max_output_bytes: self.max_declared_output_bytes,
            check_user_switch: true,
        }
    }

    /// The longest a run takes from its cancellation to its end.
    pub fn stop_limit(&self) -> Duration {
        runner::stop_limit(self.kill_grace)
    }

    /// The runner's part of the settings.
    pub fn runner_settings(&self) -> RunnerSettings {
        RunnerSettings {
            supervisor: self.supervisor.clone(),
            launcher: self.launcher.clone(),
            cgroup: self.cgroup.clone(),
            command_nofile: self.command_nofile,
            kill_grace: self.kill_grace,
            drain_after_exit: self.drain_after_exit,
        }
    }
}
