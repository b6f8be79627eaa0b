//! Running one command: the process itself — no shell, a fixed PATH and a
//! clean environment, its own process group, output caps, timeout and
//! cancellation with SIGTERM then SIGKILL of every descendant.
//!
//! Commands are started by the [supervisor](super::supervisor)
//! (`tailkitd-launch serve`, one process the daemon starts once): inside a
//! cgroup of their own, or through a per-job launcher. The runner hands it
//! the job with the job's end of a *status socket* and the output pipes,
//! and then talks over the status socket only: the command's start and end
//! come from there, and `term`/`kill` go there; the supervisor (or the
//! job's launcher) does the signalling, so that descendants which left the
//! command's process group are reached too, and a daemon killed with
//! SIGKILL takes its commands with it. The other end closing is the end
//! of the job's containment.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tailkitd_launch::{JobRequest, LAUNCHER_NAME, Order, Status, proc_stat, proc_stats};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::output::{JobOutput, Pipe};
use super::spawn::resolve_program;
use super::supervisor::{CgroupSetting, Submitted, Supervisor, SupervisorSettings};
use crate::tools::RunAs;

/// Why a running command was stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelReason {
    /// It ran longer than its timeout.
    Timeout(Duration),
    /// Its owner cancelled it (`DELETE /exec/jobs/{id}`).
    Caller,
    /// The daemon is shutting down.
    Shutdown,
}

impl CancelReason {
    /// The job's `error` text for this cancellation.
    pub fn message(&self) -> String {
        match self {
            CancelReason::Timeout(d) => format!(
                "cancelled: timed out after {}",
                crate::tools::duration::format_go_duration(*d)
            ),
            CancelReason::Caller => "cancelled by the caller".into(),
            CancelReason::Shutdown => "cancelled: the daemon is shutting down".into(),
        }
    }
}

/// Runner settings (see [`super::ExecSettings`] for the defaults).
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// The `tailkitd-launch` executable started as the supervisor.
    pub supervisor: PathBuf,
    /// The per-job launcher of jobs without a cgroup (`tailkitd-launch`).
    pub launcher: PathBuf,
    /// Where job cgroups go.
    pub cgroup: CgroupSetting,
    /// The soft limit of open files commands get (`None`: the daemon's).
    pub command_nofile: Option<u64>,
    /// Time between SIGTERM and SIGKILL on timeout or cancel.
    pub kill_grace: Duration,
    /// How long output is still drained after the main process exited
    /// (unless the command was being terminated: then until the end of
    /// the grace period).
    pub drain_after_exit: Duration,
}

/// The longest a run can take from its cancellation to its end, with
/// `kill_grace` between SIGTERM and SIGKILL: the grace period, then the
/// launcher's time to sweep and exit (or be SIGKILLed), the wait for a
/// launcher that died, and the last reads of its status socket and of the
/// output pipes.
pub fn stop_limit(kill_grace: Duration) -> Duration {
    kill_grace + LAUNCHER_EXIT_LIMIT + LAUNCHER_DIED_WAIT + 2 * FINAL_DRAIN
}

/// One command to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The final argv; `argv[0]` is the program as written.
    pub argv: Vec<String>,
    /// The complete environment of the child.
    pub env: Vec<(String, String)>,
    /// Working directory, if not the daemon's.
    pub workdir: Option<PathBuf>,
    /// Timeout after which the command is cancelled.
    pub timeout: Duration,
    /// Bytes kept per stream.
    pub max_output_bytes: usize,
    /// Who it runs as (`None`: the daemon's user).
    pub user: Option<RunAs>,
}

/// How the process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// The command could not be started (or waited for); the text says why.
    Error(String),
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal number.
    Signaled(i32),
}

/// One output stream as kept: at most the cap, plus the total count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// The first bytes written, up to the cap.
    pub data: Vec<u8>,
    /// Every byte written, kept or not.
    pub total: u64,
    /// Whether bytes past the cap were dropped.
    pub truncated: bool,
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// How the process ended.
    pub end: RunEnd,
    /// Set when the runner stopped the command (timeout, cancel, shutdown).
    pub cancelled: Option<CancelReason>,
    /// Captured stdout.
    pub stdout: Output,
    /// Captured stderr.
    pub stderr: Output,
    /// When the process started (`None` if it never did).
    pub started_at: Option<SystemTime>,
    /// When the job ended.
    pub finished_at: SystemTime,
    /// Wall time from start of the run to its end.
    pub duration: Duration,
}

impl RunOutcome {
    /// The outcome of a run that never started a process (or whose task
    /// ended before it could say how the process did): no output.
    pub fn without_run(end: RunEnd, cancelled: Option<CancelReason>, duration: Duration) -> Self {
        RunOutcome {
            end,
            cancelled,
            stdout: Output::default(),
            stderr: Output::default(),
            started_at: None,
            finished_at: SystemTime::now(),
            duration,
        }
    }

    /// The name of the signal that killed the command, if one did.
    pub fn signal_name(&self) -> Option<String> {
        match self.end {
            RunEnd::Signaled(n) => Some(signal_name(n)),
            _ => None,
        }
    }
}

/// The name of signal `signo`: `SIGKILL`, ..., `SIGRTMIN+N` for the
/// real-time ones (numbered from the C library's `SIGRTMIN`, as `kill -l`
/// does), the bare number for anything else.
pub fn signal_name(signo: i32) -> String {
    if let Ok(signal) = Signal::try_from(signo) {
        return signal.as_str().to_string();
    }
    match signo - libc::SIGRTMIN() {
        0 => "SIGRTMIN".to_string(),
        n if n > 0 && signo <= libc::SIGRTMAX() => format!("SIGRTMIN+{n}"),
        _ => signo.to_string(),
    }
}

/// How long the launcher may take to sweep and exit after `kill` before
/// the runner SIGKILLs it and the command's process group itself.
const LAUNCHER_EXIT_LIMIT: Duration = Duration::from_secs(5);

/// How long output is still read after the launcher swept and exited (its
/// writers are all dead by then: only what is buffered is left).
const FINAL_DRAIN: Duration = Duration::from_millis(100);

/// How long the exit status of a launcher that closed its status socket
/// early is waited for, to put it in the job's error.
const LAUNCHER_DIED_WAIT: Duration = Duration::from_secs(1);

/// Where a run stands on its way to stopping the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    /// Running untouched.
    Running,
    /// `term` was sent; `kill` follows after the grace period.
    Terminating,
    /// `kill` was sent; the launcher sweeps and exits.
    Killing,
    /// The launcher did not exit in time and was SIGKILLed.
    Forced,
}

/// Starts and supervises commands.
#[derive(Debug, Clone)]
pub struct Runner {
    settings: RunnerSettings,
    supervisor: Arc<Supervisor>,
}

impl Runner {
    /// A runner with `settings`; its supervisor starts with the first job.
    pub fn new(settings: RunnerSettings) -> Self {
        let supervisor = Arc::new(Supervisor::new(SupervisorSettings {
            program: settings.supervisor.clone(),
            launcher: settings.launcher.clone(),
            cgroup: settings.cgroup.clone(),
            nofile: settings.command_nofile,
        }));
        Runner {
            settings,
            supervisor,
        }
    }

    /// Runs `spec` through the launcher to its end: until the main process
    /// exits (then at most `drain_after_exit` more of output, then every
    /// descendant left is killed), or until the timeout or `cancel` (then
    /// SIGTERM to every descendant, SIGKILL after the grace period, which
    /// descendants get in full even if the main process ends at once).
    /// `on_start` is called once the launcher reports that the program
    /// started (never for a command that could not start). Never fails:
    /// problems are in [`RunOutcome::end`]. Dropping the future closes the
    /// status socket, which makes the launcher kill everything and exit.
    pub async fn run(
        &self,
        spec: RunSpec,
        cancel: watch::Receiver<Option<CancelReason>>,
        on_start: impl FnOnce(SystemTime),
    ) -> RunOutcome {
        let output = JobOutput::new(spec.max_output_bytes);
        self.run_into(spec, &output, cancel, on_start).await
    }

    /// [`Runner::run`], the output captured into `output` (whose cap
    /// applies, not `spec.max_output_bytes`), where live readers follow
    /// it; the outcome's output is moved out of it at the end.
    pub async fn run_into(
        &self,
        spec: RunSpec,
        output: &Arc<JobOutput>,
        mut cancel: watch::Receiver<Option<CancelReason>>,
        on_start: impl FnOnce(SystemTime),
    ) -> RunOutcome {
        let start = Instant::now();
        let early_end = |end: RunEnd, cancelled: Option<CancelReason>| {
            RunOutcome::without_run(end, cancelled, start.elapsed())
        };
        if let Some(reason) = cancel.borrow().clone() {
            return early_end(
                RunEnd::Error("cancelled before it started".into()),
                Some(reason),
            );
        }
        let program = match spec.argv.first().map(|p| resolve_program(p)) {
            Some(Ok(program)) => program,
            Some(Err(e)) => return early_end(RunEnd::Error(format!("could not start: {e}")), None),
            None => return early_end(RunEnd::Error("could not start: empty argv".into()), None),
        };
        if let Some(dir) = spec.workdir.as_ref().filter(|d| !d.is_dir()) {
            let e = format!(
                "could not start: working directory {} does not exist",
                dir.display()
            );
            return early_end(RunEnd::Error(e), None);
        }
        let (status_socket, theirs) = match status_socket_pair() {
            Ok(pair) => pair,
            Err(e) => {
                let e = format!("could not start: no status socket: {e}");
                return early_end(RunEnd::Error(e), None);
            }
        };
        let pipes = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).and_then(|out| {
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map(|err| (out, err))
        });
        let ((out_read, out_write), (err_read, err_write)) = match pipes {
            Ok(pipes) => pipes,
            Err(e) => return early_end(RunEnd::Error(format!("could not start: pipe: {e}")), None),
        };
        let request = JobRequest {
            program: program.to_string_lossy().into_owned(),
            argv: spec.argv.clone(),
            env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            workdir: spec
                .workdir
                .as_ref()
                .map(|d| d.to_string_lossy().into_owned()),
            credentials: spec.user.as_ref().map(RunAs::credentials),
        };
        let submitted = match self
            .supervisor
            .submit(request, [OwnedFd::from(theirs), out_write, err_write])
            .await
        {
            Ok(submitted) => submitted,
            Err(e) => return early_end(RunEnd::Error(format!("could not start: {e}")), None),
        };
        let mut on_start = Some(on_start);
        let mut started_at = None;

        let mut drains = JoinSet::new();
        for (pipe, kind) in [(out_read, Pipe::Stdout), (err_read, Pipe::Stderr)] {
            match tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) {
                Ok(reader) => {
                    drains.spawn(drain(reader, output.clone(), kind));
                }
                Err(e) => tracing::error!(error = %e, "cannot read a command's output"),
            }
        }

        let (reader, mut orders) = status_socket.into_split();
        let mut statuses = BufReader::new(reader).lines();
        let mut job = Contained {
            submitted,
            cgroup: None,
            group: None,
            launcher: None,
        };
        let mut cancelled = None;
        let mut stage = Stage::Running;
        let mut launcher_error = None;
        let timeout = tokio::time::sleep(spec.timeout);
        let grace = tokio::time::sleep(Duration::ZERO);
        let exit_limit = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timeout, grace, exit_limit);
        let end = loop {
            tokio::select! {
                line = statuses.next_line() => match line {
                    Ok(Some(line)) => match Status::parse(&line) {
                        Some(Status::Started(pid)) if pid <= 1 => {
                            // killpg(0) would hit the daemon's own group,
                            // killpg(1) every process.
                            break RunEnd::Error(format!(
                                "could not start: {LAUNCHER_NAME} reported an impossible pid {pid}"
                            ));
                        }
                        Some(Status::Started(pid)) => {
                            job.group = Some(ProgramGroup::started(pid));
                            let now = SystemTime::now();
                            started_at = Some(now);
                            if let Some(on_start) = on_start.take() {
                                on_start(now);
                            }
                        }
                        Some(Status::Launcher(pid)) if pid > 1 => job.launcher = Some(Pid::from_raw(pid)),
                        Some(Status::Cgroup(name)) => job.cgroup = job.submitted.instance.cgroup(&name),
                        Some(Status::Exited(code)) => break RunEnd::Exited(code),
                        Some(Status::Signaled(signal)) => break RunEnd::Signaled(signal),
                        Some(Status::SpawnError { message, .. }) => {
                            break RunEnd::Error(format!(
                                "could not start: {}: {message}",
                                program.display()
                            ));
                        }
                        Some(Status::Error(message)) if job.group.is_none() => {
                            break RunEnd::Error(format!(
                                "could not start: {LAUNCHER_NAME}: {message}"
                            ));
                        }
                        Some(Status::Error(message)) => {
                            // After the start, only an incomplete sweep
                            // (the program itself may be stuck, in D
                            // state); the end of the socket follows.
                            job.sweep_incomplete(&message);
                            launcher_error = Some(message);
                        }
                        _ => tracing::warn!(line, "unexpected status line from the launcher"),
                    },
                    Ok(None) | Err(_) => {
                        // The launcher or the supervisor died (SIGKILL, the
                        // OOM killer) or broke the protocol: nobody sweeps,
                        // and the command, now a child of init, would run on.
                        if job.kill_directly() {
                            tracing::warn!("the launcher is gone; killed the command");
                        }
                        break RunEnd::Error(match launcher_error.take() {
                            Some(message) => format!("{LAUNCHER_NAME}: {message}"),
                            None => job.died_message(),
                        });
                    }
                },
                reason = async {
                    tokio::select! {
                        () = &mut timeout => CancelReason::Timeout(spec.timeout),
                        reason = cancelled_by(&mut cancel) => reason,
                    }
                }, if stage == Stage::Running => {
                    cancelled = Some(reason);
                    stage = Stage::Terminating;
                    send(&mut orders, Order::Term).await;
                    grace.as_mut().reset(tokio::time::Instant::now() + self.settings.kill_grace);
                }
                () = &mut grace, if stage == Stage::Terminating => {
                    stage = Stage::Killing;
                    send(&mut orders, Order::Kill).await;
                    exit_limit.as_mut().reset(tokio::time::Instant::now() + LAUNCHER_EXIT_LIMIT);
                }
                () = &mut exit_limit, if stage == Stage::Killing => {
                    stage = Stage::Forced;
                    job.force_kill();
                }
            }
        };

        let mut closed = false;
        if stage == Stage::Terminating {
            // `term` was sent and the main process is gone (it usually
            // dies of the SIGTERM at once): the rest of the command still
            // gets the whole grace period, unless it ends first and the
            // job's containment ends by itself. Output is read meanwhile.
            tokio::select! {
                () = &mut grace => {}
                () = until_closed(&mut statuses, &job) => closed = true,
            }
        } else {
            // The main process is gone: give the pipes a moment to empty
            // (a background grandchild may hold them open forever).
            let _ =
                tokio::time::timeout(self.settings.drain_after_exit, join_all(&mut drains)).await;
        }
        // Then have whatever is left killed, and keep what was read.
        if stage < Stage::Killing {
            send(&mut orders, Order::Kill).await;
        }
        if !closed
            && tokio::time::timeout(LAUNCHER_EXIT_LIMIT, until_closed(&mut statuses, &job))
                .await
                .is_err()
        {
            job.force_kill();
            let _ = tokio::time::timeout(FINAL_DRAIN, until_closed(&mut statuses, &job)).await;
        }
        let _ = tokio::time::timeout(FINAL_DRAIN, join_all(&mut drains)).await;
        drains.abort_all();
        RunOutcome {
            end,
            cancelled,
            stdout: output.take(Pipe::Stdout),
            stderr: output.take(Pipe::Stderr),
            started_at,
            finished_at: SystemTime::now(),
            duration: start.elapsed(),
        }
    }
}

/// Reads the status socket until the other end is closed (the job's
/// containment is over: its launcher exited, or the supervisor removed
/// its cgroup). An incomplete sweep said on the way (a fork storm outran
/// it) gets a last SIGKILL of the command from here.
async fn until_closed(statuses: &mut tokio::io::Lines<BufReader<OwnedReadHalf>>, job: &Contained) {
    while let Ok(Some(line)) = statuses.next_line().await {
        if let Some(Status::Error(message)) = Status::parse(&line) {
            job.sweep_incomplete(&message);
        }
    }
}

/// The status socket: the runner's end (non-blocking, for tokio) and the
/// job's end (the launcher's stdin, or the supervisor's). Both are
/// close-on-exec, so no command inherits them.
fn status_socket_pair() -> io::Result<(UnixStream, std::os::unix::net::UnixStream)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    Ok((UnixStream::from_std(ours)?, theirs))
}

/// Sends `order` to the launcher. A launcher that is gone cannot be told;
/// the end of its status socket says so.
async fn send(orders: &mut OwnedWriteHalf, order: Order) {
    let _ = orders.write_all(order.line()).await;
}

/// One running job as the runner knows it, for killing it without its
/// launcher or supervisor when they die or hang.
struct Contained {
    submitted: Submitted,
    /// From `cgroup` (jobs with a cgroup).
    cgroup: Option<PathBuf>,
    /// From `started`.
    group: Option<ProgramGroup>,
    /// From `launcher` (jobs without a cgroup).
    launcher: Option<Pid>,
}

impl Contained {
    /// Kills the command without its launcher or supervisor: its job
    /// cgroup (everything in it) and its process group. Returns whether
    /// anything was there to kill.
    fn kill_directly(&self) -> bool {
        let cgroup = self.cgroup.as_deref().is_some_and(kill_cgroup);
        let group = self.group.is_some_and(|g| g.kill());
        cgroup || group
    }

    /// The error of a job whose status socket closed before it said how
    /// the command ended.
    fn died_message(&self) -> String {
        let supervisor = if self.submitted.instance.exited() {
            " (the supervisor died)"
        } else {
            ""
        };
        format!(
            "the launcher ({LAUNCHER_NAME}) died before reporting how the command ended{supervisor}"
        )
    }

    /// A sweep gave up (`message` says what is left): one more SIGKILL of
    /// the command, from the daemon.
    fn sweep_incomplete(&self, message: &str) {
        let killed = self.kill_directly();
        tracing::warn!(message, killed, "the launcher could not kill everything");
    }

    /// The fallback when the job's containment does not end after `kill`:
    /// SIGKILL to its launcher (or to the supervisor, when the supervisor
    /// holds the job itself and has stopped answering), and to the
    /// command's cgroup and process group.
    fn force_kill(&self) {
        tracing::warn!(
            launcher = self.launcher.map(Pid::as_raw),
            "the launcher did not end the job in time; killing it and the command"
        );
        match self.launcher {
            Some(pid) => {
                let _ = kill(pid, Signal::SIGKILL);
            }
            None => self.submitted.instance.kill(),
        }
        self.kill_directly();
    }
}

/// Writes `cgroup.kill` of `dir`; whether it was written.
fn kill_cgroup(dir: &Path) -> bool {
    std::fs::write(dir.join("cgroup.kill"), b"1").is_ok()
}

/// The command's process group, for killing it without the launcher
/// (when the launcher died or hangs). The program leads it: its id is the
/// program's pid, from `started`.
#[derive(Debug, Clone, Copy)]
struct ProgramGroup {
    pgid: i32,
    /// The program's start time, read when `started` came (`None` if it
    /// was gone already): tells the program from a later process that got
    /// its pid.
    start_time: Option<u64>,
}

impl ProgramGroup {
    fn started(pid: i32) -> Self {
        ProgramGroup {
            pgid: pid,
            start_time: proc_stat(pid).map(|p| p.start_time),
        }
    }

    /// Whether the group still exists and is the command's: its leader is
    /// the program (same start time) and still leads it; or the program
    /// is gone or left the group (the pid still the program's), and some
    /// process is still in the group — a group id is never given to a new
    /// group while the old one has members.
    fn is_live(&self) -> bool {
        match proc_stat(self.pgid) {
            Some(p) if self.start_time.is_some_and(|t| t != p.start_time) => false,
            Some(p) if p.pgid == self.pgid => true,
            _ => proc_stats()
                .iter()
                .any(|p| p.pgid == self.pgid && p.state != 'Z'),
        }
    }

    /// SIGKILL to the whole group, if [`ProgramGroup::is_live`]; returns
    /// whether it was sent. The pid-reuse window left: between the check
    /// and the signal, the group's last process could end and pids wrap
    /// all the way round to a new group leader given the same id (no
    /// pidfd names a process group, so this instant cannot be closed).
    fn kill(&self) -> bool {
        self.is_live() && killpg(Pid::from_raw(self.pgid), Signal::SIGKILL).is_ok()
    }
}

async fn cancelled_by(cancel: &mut watch::Receiver<Option<CancelReason>>) -> CancelReason {
    loop {
        if let Some(reason) = cancel.borrow_and_update().clone() {
            return reason;
        }
        if cancel.changed().await.is_err() {
            // Nobody can cancel any more.
            std::future::pending::<()>().await;
        }
    }
}

/// Waits until every task of `tasks` has ended.
async fn join_all(tasks: &mut JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}

/// Reads `reader` to its end into `into` as `pipe` (which keeps the first
/// bytes up to its cap and counts all).
async fn drain(mut reader: impl AsyncRead + Unpin, into: Arc<JobOutput>, pipe: Pipe) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => into.write(pipe, &chunk[..n]),
        }
    }
    into.close(pipe);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_have_names_real_time_ones_included() {
        let min = libc::SIGRTMIN();
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(13), "SIGPIPE");
        assert_eq!(signal_name(min), "SIGRTMIN");
        assert_eq!(signal_name(min + 1), "SIGRTMIN+1");
        assert_eq!(
            signal_name(libc::SIGRTMAX()),
            format!("SIGRTMIN+{}", libc::SIGRTMAX() - min)
        );
        assert_eq!(signal_name(libc::SIGRTMAX() + 1), "65");
        let outcome = RunOutcome::without_run(RunEnd::Signaled(min + 1), None, Duration::ZERO);
        assert_eq!(outcome.signal_name().as_deref(), Some("SIGRTMIN+1"));
        let result = crate::run::JobResult::from_outcome(uuid::Uuid::nil(), "t", "c", outcome);
        assert_eq!(result.error.as_deref(), Some("killed by signal SIGRTMIN+1"));
    }
}
