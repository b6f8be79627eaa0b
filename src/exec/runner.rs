//! Running one command: request-time argument validation, per-element
//! `{{.name}}` substitution into argv, and the process itself — no shell, a
//! fixed PATH and a clean environment, its own process group, output caps,
//! timeout and cancellation with SIGTERM then SIGKILL of every descendant.
//!
//! Commands are started by the [launcher](super::launcher), forked by one
//! long-lived spawner thread. The runner talks to it over the status
//! socket: the command's start and end come from there (not from the
//! launcher's exit status), and `term`/`kill` go there; the launcher does
//! the signalling, so that descendants which left the command's process
//! group are reached too, and a daemon killed with SIGKILL takes its
//! commands with it.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use super::launcher::{LAUNCHER_NAME, Order, Status, proc_stat, proc_stats};
use super::tool::{Arg, ArgType, Command, Segment};

/// The only PATH commands see, and the one bare program names are looked
/// up on.
pub const FIXED_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the value in [`Prepared::audit_args`] is replaced with for
/// `sensitive` arguments.
pub const REDACTED: &str = "<redacted>";

// ---------------------------------------------------------------------------
// Arguments

/// Why a request's arguments were refused (HTTP 400, naming the argument).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ArgError {
    /// The body names an argument the command does not declare.
    #[error("unknown argument {0:?}")]
    Unknown(String),
    /// A required argument, or an optional one the command line uses and
    /// that has no default, was not supplied.
    #[error("missing argument {0:?}")]
    Missing(String),
    /// The JSON value has the wrong type.
    #[error("argument {name:?} must be {expected}")]
    WrongType {
        /// The argument.
        name: String,
        /// What was expected, for the message.
        expected: &'static str,
    },
    /// The value does not match the argument's pattern (whole value).
    #[error("argument {name:?} does not match the pattern {pattern}")]
    Pattern {
        /// The argument.
        name: String,
        /// The pattern as written.
        pattern: String,
    },
    /// The value is longer than the limit.
    #[error("argument {name:?} is longer than {max} bytes")]
    TooLong {
        /// The argument.
        name: String,
        /// The limit in bytes.
        max: usize,
    },
    /// The value contains a control character (newline, NUL, escape, ...).
    #[error("argument {0:?} contains a control character")]
    ControlCharacter(String),
    /// The value starts with `-` and the argument does not allow it.
    #[error("argument {0:?} starts with '-', which this command does not allow")]
    LeadingDash(String),
}

impl ArgError {
    /// The argument the error is about.
    pub fn arg(&self) -> &str {
        match self {
            ArgError::Unknown(n)
            | ArgError::Missing(n)
            | ArgError::ControlCharacter(n)
            | ArgError::LeadingDash(n) => n,
            ArgError::WrongType { name, .. }
            | ArgError::Pattern { name, .. }
            | ArgError::TooLong { name, .. } => name,
        }
    }
}

/// Validates one value for `arg` and returns its text form: the string
/// itself, the canonical decimal of an `int`, `true`/`false` for a `bool`.
/// Strings are accepted for `int` and `bool` too (the Go SDK sends every
/// value as a string).
///
/// # Errors
///
/// Wrong JSON type or unparsable text, longer than `max_bytes`, a control
/// character, a leading `-` (except for `int` and `allow_leading_dash`), or
/// no whole-value match of the pattern.
pub fn check_value(arg: &Arg, value: &Value, max_bytes: usize) -> Result<String, ArgError> {
    let wrong = |expected| ArgError::WrongType {
        name: arg.name.clone(),
        expected,
    };
    let text = match (arg.kind, value) {
        (ArgType::String, Value::String(s)) => s.clone(),
        (ArgType::String, _) => return Err(wrong("a string")),
        (ArgType::Int, Value::Number(n)) => {
            n.as_i64().ok_or_else(|| wrong("an integer"))?.to_string()
        }
        (ArgType::Int, Value::String(s)) if s.len() <= 32 => s
            .parse::<i64>()
            .map_err(|_| wrong("an integer"))?
            .to_string(),
        (ArgType::Int, _) => return Err(wrong("an integer")),
        (ArgType::Bool, Value::Bool(b)) => b.to_string(),
        (ArgType::Bool, Value::String(s)) if s == "true" || s == "false" => s.clone(),
        (ArgType::Bool, _) => return Err(wrong("true or false")),
    };
    if text.len() > max_bytes {
        return Err(ArgError::TooLong {
            name: arg.name.clone(),
            max: max_bytes,
        });
    }
    if text.chars().any(char::is_control) {
        return Err(ArgError::ControlCharacter(arg.name.clone()));
    }
    if text.starts_with('-') && arg.kind != ArgType::Int && !arg.allow_leading_dash {
        return Err(ArgError::LeadingDash(arg.name.clone()));
    }
    match &arg.pattern {
        Some(pattern) if !pattern.is_match(&text) => Err(ArgError::Pattern {
            name: arg.name.clone(),
            pattern: pattern.as_str().to_string(),
        }),
        _ => Ok(text),
    }
}

/// A request whose arguments passed validation: the final argv and what the
/// audit log may show of the arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The argv the command will receive, `exec_parts` with every
    /// placeholder replaced inside its own element.
    pub argv: Vec<String>,
    /// The arguments as the caller gave them, `sensitive` ones replaced by
    /// [`REDACTED`].
    pub audit_args: BTreeMap<String, Value>,
}

/// Validates `args` (a request body's JSON object) against `command` and
/// substitutes them into its argv.
///
/// # Errors
///
/// The first [`ArgError`]: unknown arguments first, then each declared
/// argument in order.
pub fn prepare(
    command: &Command,
    args: &serde_json::Map<String, Value>,
    max_value_bytes: usize,
) -> Result<Prepared, ArgError> {
    if let Some(unknown) = args.keys().find(|k| command.arg(k).is_none()) {
        return Err(ArgError::Unknown(unknown.clone()));
    }
    let mut values = Vec::with_capacity(command.args.len());
    for (index, arg) in command.args.iter().enumerate() {
        let value = match args.get(&arg.name) {
            Some(v) => Some(check_value(arg, v, max_value_bytes)?),
            None if arg.required => return Err(ArgError::Missing(arg.name.clone())),
            None if command.uses_arg(index) => Some(
                arg.default
                    .clone()
                    .ok_or_else(|| ArgError::Missing(arg.name.clone()))?,
            ),
            None => None,
        };
        values.push(value);
    }
    let argv = command
        .template
        .iter()
        .map(|segments| {
            let mut element = String::new();
            for segment in segments {
                match segment {
                    Segment::Literal(text) => element.push_str(text),
                    // `prepare` filled every argument the template uses.
                    Segment::Arg(i) => element.push_str(values[*i].as_deref().unwrap_or("")),
                }
            }
            element
        })
        .collect();
    Ok(Prepared {
        argv,
        audit_args: redact_args(command, args),
    })
}

/// The arguments as the audit log may show them: as given, with the values
/// of `sensitive` arguments replaced by [`REDACTED`].
pub fn redact_args(
    command: &Command,
    args: &serde_json::Map<String, Value>,
) -> BTreeMap<String, Value> {
    args.iter()
        .map(|(name, value)| {
            let sensitive = command.arg(name).is_some_and(|a| a.sensitive);
            let shown = if sensitive {
                Value::String(REDACTED.into())
            } else {
                value.clone()
            };
            (name.clone(), shown)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Processes

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
                super::duration::format_go_duration(*d)
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
        let early_end = |end: RunEnd, cancelled: Option<CancelReason>| RunOutcome {
            end,
            cancelled,
            stdout: Output::default(),
            stderr: Output::default(),
            started_at: None,
            finished_at: SystemTime::now(),
            duration: start.elapsed(),
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

/// The program to execute: an absolute path as is (whether it can be
/// executed is the launcher's to find out, and to report), a bare name
/// looked up on [`FIXED_PATH`].
///
/// # Errors
///
/// When a bare name is not an executable file in any directory of the PATH.
pub fn resolve_program(program: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    if program.starts_with('/') {
        return Ok(PathBuf::from(program));
    }
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    FIXED_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| executable(p))
        .ok_or_else(|| format!("{program}: executable file not found in {FIXED_PATH}"))
}

// ---------------------------------------------------------------------------
// The spawner thread

struct SpawnRequest {
    command: tokio::process::Command,
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<io::Result<tokio::process::Child>>,
}

/// The one thread that forks every command. It lives as long as the
/// process: the parent-death signal of a child follows the thread that
/// forked it, so it must never exit while the process lives.
fn spawner() -> Option<&'static mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            let thread = std::thread::Builder::new()
                .name("tailkitd-spawner".into())
                .spawn(move || {
                    for request in rx {
                        let SpawnRequest {
                            mut command,
                            runtime,
                            reply,
                        } = request;
                        let _runtime = runtime.enter();
                        let result = command.spawn();
                        // The launcher's end of the status socket must not
                        // stay open here: its end is how the runner learns
                        // that the launcher died.
                        drop(command);
                        // If the run was dropped meanwhile, so was its end
                        // of the status socket: the launcher kills what it
                        // started and exits, and the child is reaped by
                        // tokio once dropped here.
                        let _ = reply.send(result);
                    }
                })
                .ok();
            thread.map(|_| tx)
        })
        .as_ref()
}

async fn spawn_from_spawner_thread(
    command: tokio::process::Command,
) -> io::Result<tokio::process::Child> {
    let spawner = spawner().ok_or_else(|| io::Error::other("no spawner thread"))?;
    let (reply, response) = oneshot::channel();
    spawner
        .send(SpawnRequest {
            command,
            runtime: tokio::runtime::Handle::current(),
            reply,
        })
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    response
        .await
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::tool::{Format, ToolLimits, parse_str};
    use serde_json::json;

    fn command(args: &str, parts: &str) -> Arc<Command> {
        let text = format!(
            r#"{{"name": "t", "commands": [{{"name": "c", "exec_parts": {parts}, "args": {args}}}]}}"#
        );
        let tool = parse_str(
            &text,
            Format::Json,
            Path::new("t.json"),
            &ToolLimits::default(),
        )
        .unwrap();
        tool.commands[0].clone()
    }

    fn obj(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn five_args() -> Arc<Command> {
        command(
            r#"[{"name": "name", "required": true, "pattern": "^[a-z]+$"},
                {"name": "count", "type": "int"},
                {"name": "force", "type": "bool", "default": false},
                {"name": "note", "allow_leading_dash": true},
                {"name": "token", "sensitive": true, "default": "none"}]"#,
            r#"["/bin/echo", "{{.name}}", "--count={{.count}}", "{{ .force }}", "{{.note}}", "{{.token}}"]"#,
        )
    }

    #[test]
    fn substitution_is_per_element() {
        let c = five_args();
        let p = prepare(
            &c,
            &obj(
                json!({"name": "abc", "count": "-3", "note": "a b; $(rm) `x`", "token": "s3cret"}),
            ),
            4096,
        )
        .unwrap();
        assert_eq!(
            p.argv,
            [
                "/bin/echo",
                "abc",
                "--count=-3",
                "false",
                "a b; $(rm) `x`",
                "s3cret"
            ]
        );
        assert_eq!(p.audit_args["token"], REDACTED);
        assert_eq!(p.audit_args["note"], "a b; $(rm) `x`");
        assert!(
            !p.audit_args.contains_key("force"),
            "defaults are not caller input"
        );
    }

    #[test]
    fn int_and_bool_accept_json_values_and_strings() {
        let c = five_args();
        let p = prepare(
            &c,
            &obj(json!({"name": "a", "count": 7, "force": true, "note": "-x"})),
            4096,
        )
        .unwrap();
        assert_eq!(p.argv[2], "--count=7");
        assert_eq!(p.argv[3], "true");
        assert_eq!(p.argv[4], "-x", "allow_leading_dash");
        let p = prepare(
            &c,
            &obj(json!({"name": "a", "count": "+0012", "force": "false", "note": ""})),
            4096,
        )
        .unwrap();
        assert_eq!(p.argv[2], "--count=12", "ints are canonical");
    }

    #[test]
    fn every_request_time_rule() {
        let c = five_args();
        let base = json!({"name": "abc", "count": 1, "note": "n"});
        let with = |k: &str, v: Value| {
            let mut m = obj(base.clone());
            m.insert(k.into(), v);
            m
        };
        let cases: Vec<(serde_json::Map<String, Value>, ArgError)> = vec![
            (with("nope", json!("x")), ArgError::Unknown("nope".into())),
            (
                obj(json!({"count": 1, "note": "n"})),
                ArgError::Missing("name".into()),
            ),
            (
                obj(json!({"name": "abc", "count": 1})),
                ArgError::Missing("note".into()),
            ),
            (
                with("name", json!(5)),
                ArgError::WrongType {
                    name: "name".into(),
                    expected: "a string",
                },
            ),
            (
                with("name", json!(null)),
                ArgError::WrongType {
                    name: "name".into(),
                    expected: "a string",
                },
            ),
            (
                with("count", json!(1.5)),
                ArgError::WrongType {
                    name: "count".into(),
                    expected: "an integer",
                },
            ),
            (
                with("count", json!("12abc")),
                ArgError::WrongType {
                    name: "count".into(),
                    expected: "an integer",
                },
            ),
            (
                with("count", json!("99999999999999999999")),
                ArgError::WrongType {
                    name: "count".into(),
                    expected: "an integer",
                },
            ),
            (
                with("force", json!("yes")),
                ArgError::WrongType {
                    name: "force".into(),
                    expected: "true or false",
                },
            ),
            (
                with("force", json!(1)),
                ArgError::WrongType {
                    name: "force".into(),
                    expected: "true or false",
                },
            ),
            (
                with("name", json!("ABC")),
                ArgError::Pattern {
                    name: "name".into(),
                    pattern: "^[a-z]+$".into(),
                },
            ),
            (
                with("name", json!("abc def")),
                ArgError::Pattern {
                    name: "name".into(),
                    pattern: "^[a-z]+$".into(),
                },
            ),
            (
                with("note", json!("x".repeat(4097))),
                ArgError::TooLong {
                    name: "note".into(),
                    max: 4096,
                },
            ),
            (
                with("note", json!("a\nb")),
                ArgError::ControlCharacter("note".into()),
            ),
            (
                with("note", json!("a\u{0}b")),
                ArgError::ControlCharacter("note".into()),
            ),
            (
                with("note", json!("a\u{1b}[31m")),
                ArgError::ControlCharacter("note".into()),
            ),
            (
                with("note", json!("a\u{85}")),
                ArgError::ControlCharacter("note".into()),
            ),
            (
                with("token", json!("--output=/etc/passwd")),
                ArgError::LeadingDash("token".into()),
            ),
        ];
        for (args, expected) in cases {
            assert_eq!(prepare(&c, &args, 4096), Err(expected.clone()), "{args:?}");
            assert!(!expected.to_string().is_empty() && !expected.arg().is_empty());
        }
        assert!(prepare(&c, &with("note", json!("x".repeat(4096))), 4096).is_ok());
        assert!(
            prepare(&c, &with("count", json!(-5)), 4096).is_ok(),
            "ints may be negative"
        );
    }

    #[test]
    fn unused_optional_args_need_no_default() {
        let c = command(r#"[{"name": "unused"}]"#, r#"["true"]"#);
        assert_eq!(
            prepare(&c, &serde_json::Map::new(), 4096).unwrap().argv,
            ["true"]
        );
    }

    #[test]
    fn non_ascii_digits_are_refused() {
        let c = command(
            r#"[{"name": "n", "pattern": "^\\d+$"}]"#,
            r#"["echo", "{{.n}}"]"#,
        );
        assert!(prepare(&c, &obj(json!({"n": "123"})), 4096).is_ok());
        assert!(matches!(
            prepare(&c, &obj(json!({"n": "١٢٣"})), 4096),
            Err(ArgError::Pattern { .. })
        ));
    }

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
        let outcome = RunOutcome {
            end: RunEnd::Signaled(min + 1),
            cancelled: None,
            stdout: Output::default(),
            stderr: Output::default(),
            started_at: None,
            finished_at: SystemTime::now(),
            duration: Duration::ZERO,
        };
        assert_eq!(outcome.signal_name().as_deref(), Some("SIGRTMIN+1"));
        let result = crate::exec::executor::job_result(uuid::Uuid::nil(), "t", "c", outcome);
        assert_eq!(result.error.as_deref(), Some("killed by signal SIGRTMIN+1"));
    }

    #[test]
    fn programs_resolve_on_the_fixed_path() {
        assert!(resolve_program("sh").unwrap().is_absolute());
        assert_eq!(
            resolve_program("/bin/sh").unwrap(),
            PathBuf::from("/bin/sh")
        );
        assert!(resolve_program("no-such-program-tailkitd").is_err());
        assert_eq!(
            resolve_program("/etc/passwd").unwrap(),
            PathBuf::from("/etc/passwd"),
            "the launcher reports what cannot be executed"
        );
    }
}
