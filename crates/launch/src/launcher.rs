//! The per-job launcher (`tailkitd-launch [--as UID:GID:GROUPS] PARENT_PID
//! PROGRAM ARGV0 ARGS...`): the containment of a job that gets no cgroup.
//! The supervisor starts one per job, so that no descendant of a command
//! outlives its job or the daemon (even a daemon killed with SIGKILL, even
//! a descendant that left the command's process group with `setsid`),
//! without a `pre_exec` hook (which Rust marks as not memory-safe).
//!
//! The supervisor starts the launcher into a new process group, with the
//! job's environment, working directory and output pipes, and as stdin the
//! job's end of its *status socket*. The launcher:
//!
//! 1. blocks the catchable signals it must not die of and reads them from a
//!    `signalfd` instead of running handlers (a SIGTERM while the daemon
//!    lives counts as `term`; the others are passed on to the program's
//!    group);
//! 2. asks for `SIGTERM` when its parent dies (`PR_SET_PDEATHSIG`) and
//!    starts nothing if the parent is already gone;
//! 3. becomes a child subreaper (`PR_SET_CHILD_SUBREAPER`), so every
//!    orphaned descendant, `setsid`'d ones included, becomes its child;
//! 4. starts the program with exactly the argv the tool file gave (argv\[0\]
//!    included) and its own environment ([`crate::command`]): in a new
//!    process group the program leads, with an empty signal mask, every
//!    signal at its default disposition, `/dev/null` as stdin and every
//!    descriptor but 0, 1 and 2 closed, as the user `--as` names (through
//!    `spawn-as`); then lets go of the output pipes itself, so that they
//!    close when the command's last process holding them ends;
//! 5. reports on the status socket ([`Status`]) and obeys it ([`Order`]).
//!
//! When the program ends the launcher reports how at once, then keeps
//! reaping; if no descendant is left it exits on its own. On `kill`, on
//! the end of the status socket (the daemon died or dropped the job) and on
//! the parent-death signal it *sweeps*: SIGKILL to the program's group and
//! to every descendant it finds in /proc, reap, again, until it has no
//! child left (each killed process hands its children to the launcher, so
//! the sweep reaches the whole tree), giving up after [`SWEEP_LIMIT`]
//! against a fork bomb; then it exits. The daemon reads the command's end
//! from the socket, never from the launcher's exit status.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::prctl;
use nix::sys::signal::{SigSet, Signal, kill, killpg};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::{Pid, dup2_stderr, dup2_stdout, getpid, getppid};
use tailkitd_launch::{
    Credentials, LAUNCHER_NAME, Order, ProcStat, SWEEP_LIMIT, Status, proc_stat, proc_stats,
};

use crate::cgroup;

use crate::command::{CommandSpec, Stdio, holds_inheritable_caps, spawn_command};

/// Exit code of a launcher that started nothing (the daemon reads the
/// status socket, not this; it is for people running the launcher by hand).
pub const LAUNCH_FAILED: i32 = 125;
/// Exit code of a launcher whose sweep gave up.
pub const SWEEP_GAVE_UP: i32 = 1;
/// Exit code of a ready launcher that is not fit for another job (a
/// process of the last one left, or its settings changed): its supervisor
/// kills its orphans and its cgroups.
pub const NOT_REUSABLE: i32 = 2;

/// Runs the launcher with `args` (after the executable's name) and returns
/// the code to exit with (0 once the job is over, 1 if a sweep gave up, 125
/// when nothing could be started).
pub fn run(args: &[OsString]) -> i32 {
    // The status socket is stdin; a duplicate (close-on-exec) can be read
    // and written as a socket.
    let Ok(socket) = std::io::stdin().as_fd().try_clone_to_owned() else {
        eprintln!("{LAUNCHER_NAME}: stdin must be the daemon's status socket");
        return LAUNCH_FAILED;
    };
    let mut socket = UnixStream::from(socket);
    match start(args) {
        Ok(Some((program, signals, daemon_pid))) => {
            let mut launcher = Launcher {
                socket,
                signals: &signals,
                daemon_pid,
                program,
                program_reaped: false,
                inbox: Vec::new(),
                cgroup: None,
                hung_up: false,
            };
            launcher.send(&Status::Started(program.as_raw()));
            match launcher.supervise() {
                End::Clean | End::ParentGone => 0,
                End::GaveUp => SWEEP_GAVE_UP,
            }
        }
        // The daemon is gone already: nothing starts, nobody listens.
        Ok(None) => LAUNCH_FAILED,
        Err(status) => {
            if let Status::Error(message) = &status {
                eprintln!("{LAUNCHER_NAME}: {message}");
            }
            let _ = socket.write_all(format!("{status}\n").as_bytes());
            LAUNCH_FAILED
        }
    }
}

/// Signals the launcher reads from its `signalfd` instead of dying of them.
fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGALRM,
        Signal::SIGPIPE,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    set
}

/// Steps 1 to 3: the signal descriptor; `None` if the parent (the
/// supervisor, `parent`) is gone already.
pub fn prepare(parent: i32) -> Result<Option<SignalFd>, Status> {
    let failed = |what: &str, e: Errno| Status::Error(format!("{what}: {e}"));
    let signals = handled_signals();
    signals
        .thread_block()
        .map_err(|e| failed("blocking signals", e))?;
    let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| failed("signalfd", e))?;
    prctl::set_pdeathsig(Signal::SIGTERM).map_err(|e| failed("PR_SET_PDEATHSIG", e))?;
    // Not dumpable: a command of the same user can neither ptrace this
    // process nor read its memory (other jobs' messages), and its /proc
    // files (`oom_score_adj`...) belong to root. Its commands are dumpable
    // again: `execve` resets it.
    prctl::set_dumpable(false).map_err(|e| failed("PR_SET_DUMPABLE", e))?;
    // The parent may have died between fork and prctl: then the signal will
    // never come, and nothing must start.
    if getppid().as_raw() != parent {
        return Ok(None);
    }
    prctl::set_child_subreaper(true).map_err(|e| failed("PR_SET_CHILD_SUBREAPER", e))?;
    Ok(Some(signal_fd))
}

/// Everything up to the running program: its pid, the signal descriptor
/// and the daemon's pid; `None` if the daemon died before the program
/// started; the status to report if nothing could start.
fn start(args: &[OsString]) -> Result<Option<(Pid, SignalFd, Pid)>, Status> {
    let (credentials, args) = match args {
        [flag, creds, rest @ ..] if flag == "--as" => {
            let creds = creds
                .to_str()
                .and_then(Credentials::parse_arg)
                .ok_or_else(|| Status::Error(format!("bad --as {creds:?}")))?;
            (Some(creds), rest)
        }
        _ => (None, args),
    };
    let [daemon_pid, program, argv @ ..] = args else {
        return Err(Status::Error(
            "usage: [--as UID:GID:GROUPS] PARENT_PID PROGRAM ARGV0 [ARGS...]".into(),
        ));
    };
    if argv.is_empty() {
        return Err(Status::Error(
            "usage: [--as UID:GID:GROUPS] PARENT_PID PROGRAM ARGV0 [ARGS...]".into(),
        ));
    }
    let Some(daemon_pid) = daemon_pid.to_str().and_then(|p| p.parse::<i32>().ok()) else {
        return Err(Status::Error("bad daemon pid".into()));
    };
    let Some(signal_fd) = prepare(daemon_pid)? else {
        return Ok(None);
    };
    let program = spawn_program(program, argv, credentials.as_ref())?;
    // The program holds the output pipes now; the launcher must not keep
    // them open after the program's last process is gone.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = dup2_stdout(&null);
        let _ = dup2_stderr(&null);
    }
    Ok(Some((program, signal_fd, Pid::from_raw(daemon_pid))))
}

/// Starts the program ([`spawn_command`]) with this process's environment,
/// closing every descriptor but 0-2 in it (even if whoever started the
/// launcher leaked one without close-on-exec).
fn spawn_program(
    program: &OsStr,
    argv: &[OsString],
    credentials: Option<&Credentials>,
) -> Result<Pid, Status> {
    let env: Vec<OsString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            kv
        })
        .collect();
    let helper = std::env::current_exe()
        .map_err(|e| Status::Error(format!("locating {LAUNCHER_NAME}: {e}")))?;
    spawn_command(
        &CommandSpec {
            program,
            argv,
            env: &env,
            credentials,
        },
        &Stdio {
            stdout: 1,
            stderr: 2,
        },
        &open_fds(),
        &helper,
        holds_inheritable_caps(),
    )
}

/// The descriptors open in this process (the one used to list them is
/// closed again by then; closing it in the child is harmless).
pub fn open_fds() -> Vec<i32> {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// How a job's supervision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The job is over and nothing of it is left.
    Clean,
    /// The supervisor (or whoever started the launcher) is gone; the job
    /// was swept.
    ParentGone,
    /// The sweep gave up, and said so on the status socket.
    GaveUp,
}

/// The job's cgroup, when it has one: it contains the job, instead of the
/// sweep of the launcher's descendants.
pub struct JobCgroup {
    dir: PathBuf,
    /// Its `cgroup.events`, once the job's end is awaited.
    events: Option<File>,
    /// `cgroup.kill` was written; the job is given up at this instant.
    killing: Option<Instant>,
}

impl JobCgroup {
    /// The job cgroup `dir`, with its `cgroup.events` if already open.
    pub fn new(dir: PathBuf, events: Option<File>) -> JobCgroup {
        JobCgroup {
            dir,
            events,
            killing: None,
        }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The running launcher.
pub struct Launcher<'a> {
    /// The job's status socket.
    pub socket: UnixStream,
    /// The launcher's signal descriptor.
    pub signals: &'a SignalFd,
    /// Its parent, whose death ends the job.
    pub daemon_pid: Pid,
    /// The program, leader of its own process group.
    pub program: Pid,
    /// Whether the program's end was reaped (and reported).
    pub program_reaped: bool,
    /// Bytes of an order not complete yet.
    pub inbox: Vec<u8>,
    /// The job's cgroup, if it has one.
    pub cgroup: Option<JobCgroup>,
    /// The status socket ended (the daemon let go of the job).
    pub hung_up: bool,
}

impl Launcher<'_> {
    /// Runs until the job is over; says how it ended.
    pub fn supervise(&mut self) -> End {
        loop {
            let timeout = match self.cgroup.as_ref().and_then(|c| c.killing) {
                Some(deadline) => {
                    let ms = deadline
                        .saturating_duration_since(Instant::now())
                        .as_millis()
                        + 1;
                    PollTimeout::try_from(ms.min(10_000) as i32).unwrap_or(PollTimeout::MAX)
                }
                None => PollTimeout::NONE,
            };
            let (signalled, ordered) = self.wait(!self.hung_up, timeout);
            if signalled {
                for signal in self.take_signals() {
                    match signal {
                        Signal::SIGCHLD | Signal::SIGPIPE => {}
                        // The daemon is gone (the parent-death signal).
                        Signal::SIGTERM if getppid() != self.daemon_pid => {
                            self.stop_all();
                            return End::ParentGone;
                        }
                        Signal::SIGTERM => self.terminate(),
                        // Meant for the command.
                        other => {
                            if !self.program_reaped {
                                let _ = killpg(self.program, other);
                            }
                        }
                    }
                }
                if !self.reap() && self.program_reaped && self.cgroup.is_none() {
                    // The program ended and left nothing behind.
                    return End::Clean;
                }
            }
            if ordered {
                let orders = self.take_orders().unwrap_or_else(|| {
                    self.hung_up = true;
                    vec![Order::Kill]
                });
                for order in orders {
                    match order {
                        Order::Term => self.terminate(),
                        Order::Kill => {
                            if let Some(end) = self.kill() {
                                return end;
                            }
                        }
                    }
                }
            }
            if let Some(end) = self.cgroup_over() {
                return end;
            }
        }
    }

    /// Waits for a signal, (with `socket`) an order or a change of the job
    /// cgroup's `cgroup.events`; returns whether a signal or an order came.
    fn wait(&self, socket: bool, timeout: PollTimeout) -> (bool, bool) {
        let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
        if socket {
            fds.push(PollFd::new(self.socket.as_fd(), PollFlags::POLLIN));
        }
        // Only once the job's end is awaited: `cgroup.events` stays
        // readable (POLLPRI) from its last change until it is read again,
        // and it is read only then (see `cgroup_over`).
        if let Some(cgroup) = self
            .cgroup
            .as_ref()
            .filter(|c| self.program_reaped || c.killing.is_some())
            && let Some(events) = cgroup.events.as_ref()
        {
            fds.push(PollFd::new(events.as_fd(), PollFlags::POLLPRI));
        }
        match poll(&mut fds, timeout) {
            Ok(_) => {
                let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), socket && ready(&fds[1]))
            }
            Err(_) => (false, false),
        }
    }

    /// `kill` (or the end of the status socket): the sweep, or
    /// `cgroup.kill` of the job's cgroup, whose emptying then ends the
    /// job. Returns the end, if the job is over already.
    fn kill(&mut self) -> Option<End> {
        let Some(cgroup) = &mut self.cgroup else {
            return Some(self.sweep());
        };
        if cgroup.killing.is_none() {
            if let Err(e) = cgroup::kill(&cgroup.dir) {
                eprintln!(
                    "{LAUNCHER_NAME}: {}: cgroup.kill: {e}",
                    cgroup.dir.display()
                );
            }
            cgroup.killing = Some(Instant::now() + SWEEP_LIMIT);
        }
        None
    }

    /// With a cgroup: whether the job is over, that is its program ended
    /// (or it is being killed) and its cgroup is empty (to be removed once
    /// the status socket is closed); or its kill did not empty the cgroup
    /// in time (then it says so).
    fn cgroup_over(&mut self) -> Option<End> {
        let cgroup = self.cgroup.as_mut()?;
        if !self.program_reaped && cgroup.killing.is_none() {
            return None;
        }
        if cgroup.events.is_none() {
            cgroup.events = cgroup::events(&cgroup.dir).ok();
        }
        let empty = match &mut cgroup.events {
            Some(events) => cgroup::populated(events) == Some(false),
            None => cgroup::procs(&cgroup.dir).is_empty(),
        };
        if empty {
            self.reap_program();
            return Some(End::Clean);
        }
        if cgroup.killing.is_some_and(|d| Instant::now() >= d) {
            let left = cgroup::procs(&cgroup.dir).len();
            self.send(&Status::Error(format!(
                "sweep incomplete: {left} processes left after {SWEEP_LIMIT:?}"
            )));
            return Some(End::GaveUp);
        }
        None
    }

    /// Reaps the program of a job whose cgroup emptied (its end may be
    /// noticed before its `SIGCHLD`), so that its end is reported; one that
    /// left the cgroup (as root, it could) is killed first.
    fn reap_program(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        self.reap();
        if !self.program_reaped {
            // Our child, not reaped: the pid is still the program's.
            let _ = kill(self.program, Signal::SIGKILL);
        }
        while !self.program_reaped && Instant::now() < deadline {
            let peek = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
            if waitid(Id::Pid(self.program), peek).is_err() {
                // Not our child: nothing to report.
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
            self.reap();
        }
    }

    /// The parent is gone: kill everything of the job, wait (at most
    /// [`SWEEP_LIMIT`]) until it is gone.
    fn stop_all(&mut self) {
        if self.cgroup.is_none() {
            self.sweep();
            return;
        }
        self.kill();
        while self.cgroup_over().is_none() {
            self.wait(false, PollTimeout::from(10u8));
            self.take_signals();
            self.reap();
        }
        if let Some(cgroup) = &self.cgroup {
            let _ = cgroup::remove(&cgroup.dir);
        }
    }

    /// The signals received since the last call.
    fn take_signals(&self) -> Vec<Signal> {
        let mut signals = Vec::new();
        while let Ok(Some(info)) = self.signals.read_signal() {
            if let Ok(signal) = Signal::try_from(info.ssi_signo as i32) {
                signals.push(signal);
            }
        }
        signals
    }

    /// The complete orders read from the socket, or `None` at its end.
    fn take_orders(&mut self) -> Option<Vec<Order>> {
        let mut buf = [0u8; 256];
        match self.socket.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
        let mut orders = Vec::new();
        while let Some(end) = self.inbox.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.inbox.drain(..=end).collect();
            orders.extend(Order::parse(&line[..end]));
        }
        if self.inbox.len() > 1024 {
            self.inbox.clear();
        }
        Some(orders)
    }

    /// Sends `status` on the status socket.
    pub fn send(&mut self, status: &Status) {
        // A daemon that is gone cannot be told; the end of the socket will
        // make the launcher sweep.
        let _ = self.socket.write_all(format!("{status}\n").as_bytes());
    }

    /// SIGTERM to the program's group and to every other process of the
    /// job (in its cgroup, or descendants of the launcher).
    fn terminate(&mut self) {
        if !self.program_reaped {
            let _ = killpg(self.program, Signal::SIGTERM);
        }
        let group = self.program.as_raw();
        let others: Vec<ProcStat> = match &self.cgroup {
            Some(cgroup) => cgroup::procs(&cgroup.dir)
                .into_iter()
                .filter_map(proc_stat)
                .collect(),
            None => descendants(),
        };
        for p in others {
            // The group's members got it from killpg already.
            if self.program_reaped || p.pgid != group {
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGTERM);
            }
        }
    }

    /// SIGKILLs the program's group and every descendant and reaps them,
    /// round after round, until no child is left. Gives up after
    /// [`SWEEP_LIMIT`], and then says so on the status socket (`error
    /// sweep incomplete: ...`, for the daemon to try the group once more)
    /// before exiting. Says how it ended.
    fn sweep(&mut self) -> End {
        let deadline = Instant::now() + SWEEP_LIMIT;
        loop {
            let left = descendants();
            self.signal_group(&left, Signal::SIGKILL);
            for p in &left {
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
            if !self.reap() {
                return End::Clean;
            }
            if Instant::now() >= deadline {
                let left = descendants().len();
                self.send(&Status::Error(format!(
                    "sweep incomplete: {left} processes left after {SWEEP_LIMIT:?}"
                )));
                return End::GaveUp;
            }
            // Wait for the next child to end (its children are ours then).
            self.wait(false, PollTimeout::from(10u8));
            self.take_signals();
        }
    }

    /// Sends `signal` to the program's process group, if it is still
    /// there: the program not reaped yet, or one of `descendants` still in
    /// the group (its id cannot go to another group while it has members).
    fn signal_group(&self, descendants: &[ProcStat], signal: Signal) {
        let id = self.program.as_raw();
        if !self.program_reaped || descendants.iter().any(|p| p.pgid == id) {
            let _ = killpg(self.program, signal);
        }
    }

    /// Reaps every child that has ended, reporting the program's end;
    /// returns whether any child is left.
    fn reap(&mut self) -> bool {
        let peek = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        loop {
            match waitid(Id::All, peek) {
                Ok(WaitStatus::StillAlive) => return true,
                Ok(status) => {
                    let Some(pid) = status.pid() else { return true };
                    let end = match status {
                        WaitStatus::Exited(_, code) => Some(Status::Exited(code)),
                        WaitStatus::Signaled(_, signal, _) => Some(Status::Signaled(signal as i32)),
                        _ => None,
                    };
                    self.reap_one(pid, end);
                }
                // A child died of a signal nix has no name for (a
                // real-time one): reap the zombies by their /proc entries.
                Err(Errno::EINVAL) => {
                    if !self.reap_unnamed() {
                        return true;
                    }
                }
                Err(Errno::EINTR) => {}
                // ECHILD: no child at all.
                Err(_) => return false,
            }
        }
    }

    /// Reaps child `pid`, which has ended as `end`; reports it if it is
    /// the program. (An end that could not be read is not reported: the
    /// daemon then sees the socket close without one, a launcher failure.)
    fn reap_one(&mut self, pid: Pid, end: Option<Status>) {
        let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
        if pid == self.program && !self.program_reaped {
            self.program_reaped = true;
            if let Some(end) = end {
                self.send(&end);
            }
        }
    }

    /// Reaps the zombie children listed in /proc, with the status the
    /// kernel shows there; returns whether there was any.
    fn reap_unnamed(&mut self) -> bool {
        let me = getpid().as_raw();
        let zombies: Vec<ProcStat> = proc_stats()
            .into_iter()
            .filter(|p| p.ppid == me && p.state == 'Z')
            .collect();
        for z in &zombies {
            let end = z.exit_code.map(|raw| match raw & 0x7f {
                0 => Status::Exited((raw >> 8) & 0xff),
                signal => Status::Signaled(signal),
            });
            self.reap_one(Pid::from_raw(z.pid), end);
        }
        !zombies.is_empty()
    }
}

/// Every descendant of this process (children, their children, ...).
fn descendants() -> Vec<ProcStat> {
    let mut by_parent: HashMap<i32, Vec<ProcStat>> = HashMap::new();
    for p in proc_stats() {
        by_parent.entry(p.ppid).or_default().push(p);
    }
    let mut found = Vec::new();
    let mut parents = vec![getpid().as_raw()];
    while let Some(parent) = parents.pop() {
        for child in by_parent.remove(&parent).unwrap_or_default() {
            parents.push(child.pid);
            found.push(child);
        }
    }
    found
}
