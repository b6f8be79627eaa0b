//! Running one command: the process itself — no shell, a fixed PATH and a
//! clean environment, its own process group, output caps, timeout and
//! cancellation with SIGTERM then SIGKILL of every descendant.
//!
//! Commands are started by the launcher (`tailkitd-launch`, the
//! `tailkitd-launch` crate), forked by one long-lived
//! [spawner thread](super::spawn). The runner talks to it over the status
//! socket: the command's start and end come from there (not from the
//! launcher's exit status), and `term`/`kill` go there; the launcher does
//! the signalling, so that descendants which left the command's process
//! group are reached too, and a daemon killed with SIGKILL takes its
//! commands with it.

use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tailkitd_launch::{LAUNCHER_NAME, Order, Status, proc_stat, proc_stats};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::spawn::{resolve_program, spawn_from_spawner_thread};

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
    /// The `tailkitd-launch` executable started as each job's supervisor.
    pub launcher: PathBuf,
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
}

impl Runner {
    /// A runner with `settings`.
    pub fn new(settings: RunnerSettings) -> Self {
        Runner { settings }
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
        let (status_socket, launcher_end) = match status_socket_pair() {
            Ok(pair) => pair,
            Err(e) => {
                let e = format!("could not start: no status socket: {e}");
                return early_end(RunEnd::Error(e), None);
            }
        };

        let mut command = tokio::process::Command::new(&self.settings.launcher);
        command
            .arg(std::process::id().to_string())
            .arg(&program)
            .args(&spec.argv)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::from(OwnedFd::from(launcher_end)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        if let Some(dir) = &spec.workdir {
            command.current_dir(dir);
        }
        let mut launcher = match spawn_from_spawner_thread(command).await {
            Ok(child) => child,
            Err(e) => return early_end(RunEnd::Error(format!("could not start: {e}")), None),
        };
        let mut on_start = Some(on_start);
        let mut started_at = None;
        let launcher_pid = launcher
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);

        let stdout = Arc::new(Mutex::new(Output::default()));
        let stderr = Arc::new(Mutex::new(Output::default()));
        let mut drains = JoinSet::new();
        if let Some(out) = launcher.stdout.take() {
            drains.spawn(drain(out, spec.max_output_bytes, stdout.clone()));
        }
        if let Some(err) = launcher.stderr.take() {
            drains.spawn(drain(err, spec.max_output_bytes, stderr.clone()));
        }

        let (reader, mut orders) = status_socket.into_split();
        let mut statuses = BufReader::new(reader).lines();
        let mut group = None;
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
                        Some(Status::Started(pid)) => {
                            group = Some(ProgramGroup::started(pid));
                            let now = SystemTime::now();
                            started_at = Some(now);
                            if let Some(on_start) = on_start.take() {
                                on_start(now);
                            }
                        }
                        Some(Status::Exited(code)) => break RunEnd::Exited(code),
                        Some(Status::Signaled(signal)) => break RunEnd::Signaled(signal),
                        Some(Status::SpawnError { message, .. }) => {
                            break RunEnd::Error(format!(
                                "could not start: {}: {message}",
                                program.display()
                            ));
                        }
                        Some(Status::Error(message)) if group.is_none() => {
                            break RunEnd::Error(format!(
                                "could not start: {LAUNCHER_NAME}: {message}"
                            ));
                        }
                        Some(Status::Error(message)) => {
                            // After the start, only an incomplete sweep
                            // (the program itself may be stuck, in D
                            // state); the launcher's exit follows.
                            sweep_incomplete(group, &message);
                            launcher_error = Some(message);
                        }
                        None => tracing::warn!(line, "unexpected status line from the launcher"),
                    },
                    Ok(None) | Err(_) => {
                        // The launcher died (SIGKILL, the OOM killer) or
                        // broke the protocol: nobody sweeps, and the
                        // command, now a child of init, would run on.
                        if let Some(group) = group.filter(ProgramGroup::kill) {
                            tracing::warn!(
                                pgid = group.pgid,
                                "the launcher is gone; killed the command's process group"
                            );
                        }
                        break RunEnd::Error(match launcher_error.take() {
                            Some(message) => format!("{LAUNCHER_NAME}: {message}"),
                            None => launcher_died(&mut launcher).await,
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
                    force_kill(launcher_pid, group);
                }
            }
        };

        if stage == Stage::Terminating {
            // `term` was sent and the main process is gone (it usually
            // dies of the SIGTERM at once): the rest of the command still
            // gets the whole grace period, unless it ends first and the
            // launcher exits by itself. Output is read meanwhile.
            tokio::select! {
                () = &mut grace => {}
                _ = launcher.wait() => {}
            }
        } else {
            // The main process is gone: give the pipes a moment to empty
            // (a background grandchild may hold them open forever).
            let _ =
                tokio::time::timeout(self.settings.drain_after_exit, join_all(&mut drains)).await;
        }
        // Then have the launcher kill whatever is left, and keep what was
        // read.
        if stage < Stage::Killing {
            send(&mut orders, Order::Kill).await;
        }
        if tokio::time::timeout(LAUNCHER_EXIT_LIMIT, launcher.wait())
            .await
            .is_err()
        {
            force_kill(launcher_pid, group);
            let _ = launcher.wait().await;
        }
        // The launcher is gone, and with it its end of the status socket:
        // what it said after the command's end is all buffered. An
        // incomplete sweep (a fork storm outran it) gets a last SIGKILL of
        // the command's process group from here.
        let late = async {
            while let Ok(Some(line)) = statuses.next_line().await {
                if let Some(Status::Error(message)) = Status::parse(&line) {
                    sweep_incomplete(group, &message);
                }
            }
        };
        let _ = tokio::time::timeout(FINAL_DRAIN, late).await;
        let _ = tokio::time::timeout(FINAL_DRAIN, join_all(&mut drains)).await;
        drains.abort_all();
        let take = |o: &Arc<Mutex<Output>>| std::mem::take(&mut *lock(o));
        RunOutcome {
            end,
            cancelled,
            stdout: take(&stdout),
            stderr: take(&stderr),
            started_at,
            finished_at: SystemTime::now(),
            duration: start.elapsed(),
        }
    }
}

/// The status socket: the runner's end (non-blocking, for tokio) and the
/// launcher's end (its stdin). Both are close-on-exec, so no other
/// launcher inherits them.
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

/// The error of a job whose launcher closed the status socket before
/// reporting how the command ended.
async fn launcher_died(launcher: &mut tokio::process::Child) -> String {
    let how = match tokio::time::timeout(LAUNCHER_DIED_WAIT, launcher.wait()).await {
        Ok(Ok(status)) => format!(" ({status})"),
        _ => String::new(),
    };
    format!("the launcher ({LAUNCHER_NAME}) died before reporting how the command ended{how}")
}

/// The launcher gave up its sweep (`message` says what is left): one more
/// SIGKILL of the command's process group, from the daemon.
fn sweep_incomplete(group: Option<ProgramGroup>, message: &str) {
    let killed = group.is_some_and(|g| g.kill());
    tracing::warn!(message, killed, "the launcher could not kill everything");
}

/// The fallback when the launcher does not exit after `kill`: SIGKILL to
/// it and to the command's process group. Descendants outside the group
/// may survive this; it only happens if the launcher hangs.
fn force_kill(launcher: Option<Pid>, program: Option<ProgramGroup>) {
    tracing::warn!(
        launcher = launcher.map(Pid::as_raw),
        "the launcher did not exit in time; killing it and the command's process group"
    );
    if let Some(pid) = launcher {
        let _ = kill(pid, Signal::SIGKILL);
    }
    if let Some(group) = program {
        group.kill();
    }
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

fn lock(output: &Mutex<Output>) -> std::sync::MutexGuard<'_, Output> {
    output.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads `reader` to its end, keeping the first `cap` bytes and counting all.
async fn drain(mut reader: impl AsyncRead + Unpin, cap: usize, into: Arc<Mutex<Output>>) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut out = lock(&into);
        let keep = n.min(cap.saturating_sub(out.data.len()));
        out.data.extend_from_slice(&chunk[..keep]);
        out.total += n as u64;
        if keep < n {
            out.truncated = true;
        }
    }
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
