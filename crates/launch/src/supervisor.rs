//! The supervisor: `tailkitd-launch serve PARENT_PID [--cgroup DIR]
//! [--nofile N] [--launcher PATH]`, started once by the daemon (from its
//! long-lived spawner thread, the control socket as stdin, every signal at
//! its default disposition, an empty mask and environment) and then handed
//! every job as one message on that socket (a [`JobRequest`] and three
//! descriptors), so that the daemon never waits for an `execve` per job.
//!
//! It asks for `SIGTERM` when the daemon dies (`PR_SET_PDEATHSIG`), is a
//! child subreaper, blocks every asynchronous signal (reading them from a
//! `signalfd`: only `SIGCHLD` and the parent-death `SIGTERM` mean
//! anything), and runs one `poll` loop over the control socket, the
//! signals and its jobs. Two kinds of jobs:
//!
//! - **With a cgroup** (`--cgroup DIR` given and usable, see
//!   [`crate::cgroup`]): the supervisor starts the command itself, inside
//!   the job's cgroup, and speaks the job's status protocol: `started`,
//!   `exited`/`signaled` when it reaps the program; `term` is SIGTERM to
//!   the program's group and every process in the cgroup; `kill` (or the
//!   end of the status socket) is `cgroup.kill`, then the cgroup is removed
//!   once it is empty and the status socket closed. A job whose program
//!   ended and whose cgroup emptied ends by itself.
//! - **Without** (no `--cgroup`, or it failed its probe): a per-job
//!   [launcher](crate::launcher) is started with the job's descriptors
//!   and speaks the protocol itself; the supervisor reports `launcher PID`
//!   and reaps it. A launcher seen stopped is SIGKILLed.
//!
//! Any process the supervisor did not start that becomes its child (an
//! orphan: from a launcher that was killed, or a process that left its
//! job's cgroup) is SIGKILLed as soon as the supervisor sees it, and so in
//! turn are its children; orphans of a job still running inside its
//! cgroup are left to the job.

use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::prctl;
use nix::sys::signal::{SigSet, Signal, kill, killpg};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::{Pid, getpid, getppid};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
use rustix::process::{WaitOptions, WaitStatus};
use tailkitd_launch::{
    Hello, JobRequest, MAX_JOB_MESSAGE, Order, SWEEP_LIMIT, Status, cgroup_dir_of, proc_stat,
    proc_stats, valid_job_name,
};

use crate::cgroup::{self, Cgroups};
use crate::command::{CommandSpec, Spawned, Stdio, holds_inheritable_caps, spawn_command};

/// Runs the supervisor with `args` (after `serve`); returns the exit code.
pub fn serve(args: &[OsString]) -> i32 {
    let Some(options) = Options::parse(args) else {
        eprintln!(
            "usage: tailkitd-launch serve PARENT_PID [--cgroup DIR] [--nofile N] [--launcher PATH]"
        );
        return 2;
    };
    match Supervisor::start(options) {
        Ok(Some(mut supervisor)) => supervisor.run(),
        Ok(None) => 0,
        Err(e) => {
            eprintln!("tailkitd-launch serve: {e}");
            1
        }
    }
}

struct Options {
    parent: Pid,
    cgroup: Option<PathBuf>,
    nofile: Option<u64>,
    launcher: Option<PathBuf>,
}

impl Options {
    fn parse(args: &[OsString]) -> Option<Options> {
        let (parent, mut rest) = args.split_first()?;
        let mut options = Options {
            parent: Pid::from_raw(parent.to_str()?.parse().ok()?),
            cgroup: None,
            nofile: None,
            launcher: None,
        };
        while let [flag, value, tail @ ..] = rest {
            match flag.to_str()? {
                "--cgroup" => options.cgroup = Some(PathBuf::from(value)),
                "--nofile" => options.nofile = Some(value.to_str()?.parse().ok()?),
                "--launcher" => options.launcher = Some(PathBuf::from(value)),
                _ => return None,
            }
            rest = tail;
        }
        rest.is_empty().then_some(options)
    }
}

/// Signals the supervisor reads instead of being stopped or killed by
/// them: every one but the synchronous ones (a fault is a fault).
fn blocked_signals() -> SigSet {
    let mut set = SigSet::all();
    for s in [
        Signal::SIGSEGV,
        Signal::SIGBUS,
        Signal::SIGILL,
        Signal::SIGFPE,
        Signal::SIGTRAP,
        Signal::SIGSYS,
        Signal::SIGABRT,
    ] {
        set.remove(s);
    }
    set
}

/// A job contained by a cgroup.
struct Job {
    socket: UnixStream,
    dir: PathBuf,
    program: Pid,
    /// The program's end was reaped and reported.
    reaped: bool,
    /// `cgroup.kill` was written; the job is given up at this instant.
    killing: Option<Instant>,
    /// `cgroup.events`, once the job's end is being waited for.
    events: Option<File>,
    /// Its cgroup is empty (and its program ended, or it was killed): the
    /// job is over.
    empty: bool,
    inbox: Vec<u8>,
    /// The daemon closed its end.
    hung_up: bool,
}

struct Supervisor {
    control: OwnedFd,
    signals: SignalFd,
    parent: Pid,
    me: Pid,
    cgroups: Option<Cgroups>,
    nofile: Option<u64>,
    launcher: PathBuf,
    helper: PathBuf,
    clear_caps: bool,
    jobs: Vec<Job>,
    launchers: HashSet<i32>,
    /// `spawn-as` helpers still to be reaped.
    helpers: HashSet<i32>,
    /// Job cgroups that could not be emptied in time, retried later.
    leftovers: Vec<PathBuf>,
    buf: Vec<u8>,
}

impl Supervisor {
    /// Sets everything up and says hello; `None` if the parent is gone.
    fn start(options: Options) -> Result<Option<Supervisor>, String> {
        let control = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("stdin must be the control socket: {e}"))?;
        let blocked = blocked_signals();
        blocked
            .thread_block()
            .map_err(|e| format!("blocking signals: {e}"))?;
        let signals =
            SignalFd::with_flags(&blocked, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
                .map_err(|e| format!("signalfd: {e}"))?;
        prctl::set_pdeathsig(Signal::SIGTERM).map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
        if getppid() != options.parent {
            return Ok(None);
        }
        prctl::set_child_subreaper(true).map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
        nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
        let helper =
            std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
        let (cgroups, fallback_reason) = match &options.cgroup {
            None => (None, None),
            Some(base) => match Cgroups::setup(base) {
                Ok(c) => (Some(c), None),
                Err(e) => (None, Some(e)),
            },
        };
        let supervisor = Supervisor {
            control,
            signals,
            parent: options.parent,
            me: getpid(),
            cgroups,
            nofile: options.nofile,
            launcher: options.launcher.unwrap_or_else(|| helper.clone()),
            clear_caps: holds_inheritable_caps(),
            helper,
            jobs: Vec::new(),
            launchers: HashSet::new(),
            helpers: HashSet::new(),
            leftovers: Vec::new(),
            buf: vec![0; MAX_JOB_MESSAGE],
        };
        let hello = Hello {
            pid: supervisor.me.as_raw(),
            cgroup: supervisor
                .cgroups
                .as_ref()
                .map(|c| c.dir().display().to_string()),
            fallback_reason,
        };
        let text = serde_json::to_vec(&hello).map_err(|e| e.to_string())?;
        rustix::net::send(&supervisor.control, &text, rustix::net::SendFlags::NOSIGNAL)
            .map_err(|e| format!("saying hello: {e}"))?;
        Ok(Some(supervisor))
    }

    /// The loop, until the daemon is gone or closes the control socket.
    fn run(&mut self) -> i32 {
        loop {
            let now = Instant::now();
            let timeout = self
                .jobs
                .iter()
                .filter(|j| !j.empty)
                .filter_map(|j| j.killing)
                .min()
                .map_or(PollTimeout::NONE, |d| {
                    let ms = d.saturating_duration_since(now).as_millis() + 1;
                    PollTimeout::try_from(ms.min(10_000) as i32).unwrap_or(PollTimeout::MAX)
                });
            let (control, signalled, sockets, events) = self.wait(timeout);
            if signalled && self.handle_signals() {
                break;
            }
            if control && !self.receive() {
                break;
            }
            for i in sockets {
                self.read_orders(i);
            }
            for i in events {
                self.check_empty(i);
            }
            self.finish_jobs();
        }
        self.shut_down();
        0
    }

    /// Polls; returns which of control, signals, job sockets (indices) and
    /// job events (indices) are ready.
    fn wait(&self, timeout: PollTimeout) -> (bool, bool, Vec<usize>, Vec<usize>) {
        let mut fds = vec![
            PollFd::new(self.control.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
        ];
        let mut owners = Vec::new();
        for (i, job) in self.jobs.iter().enumerate() {
            if !job.hung_up {
                fds.push(PollFd::new(job.socket.as_fd(), PollFlags::POLLIN));
                owners.push((i, false));
            }
            if let Some(events) = &job.events {
                fds.push(PollFd::new(events.as_fd(), PollFlags::POLLPRI));
                owners.push((i, true));
            }
        }
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(_) => return (false, false, Vec::new(), Vec::new()),
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        let (mut sockets, mut events) = (Vec::new(), Vec::new());
        for (fd, (i, is_events)) in fds[2..].iter().zip(owners) {
            if ready(fd) {
                if is_events {
                    events.push(i);
                } else {
                    sockets.push(i);
                }
            }
        }
        (ready(&fds[0]), ready(&fds[1]), sockets, events)
    }

    /// Handles the pending signals; returns whether the daemon is gone.
    fn handle_signals(&mut self) -> bool {
        let mut children = false;
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => children = true,
                Ok(Signal::SIGTERM) if getppid() != self.parent => return true,
                // Anything else (a command of the daemon's own user may
                // send us signals): ignored.
                _ => {}
            }
        }
        if children {
            self.reap();
        }
        false
    }

    /// Reaps every child that ended (and kills stopped launchers).
    fn reap(&mut self) {
        let mut orphans = false;
        loop {
            let options = WaitOptions::NOHANG | WaitOptions::UNTRACED;
            let (pid, status) = match rustix::process::wait(options) {
                Ok(Some(ended)) => ended,
                Ok(None) | Err(_) => break,
            };
            let raw = pid.as_raw_nonzero().get();
            if status.stopped() {
                if self.launchers.contains(&raw) {
                    // A stopped launcher contains nothing: kill it; its
                    // orphans come here and are killed in turn.
                    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
                }
                continue;
            }
            if let Some(i) = self.jobs.iter().position(|j| j.program.as_raw() == raw) {
                self.program_ended(i, status);
            } else if self.launchers.remove(&raw) {
                // A launcher that ends on its own has reaped everything.
                orphans |= status.exit_status() != Some(0) && status.exit_status() != Some(125);
            } else if !self.helpers.remove(&raw) {
                orphans = true;
            }
        }
        if orphans {
            self.kill_orphans();
        }
    }

    /// Job `i`'s program ended as `status`: report it.
    fn program_ended(&mut self, i: usize, status: WaitStatus) {
        let job = &mut self.jobs[i];
        job.reaped = true;
        let end = match (status.exit_status(), status.terminating_signal()) {
            (Some(code), _) => Status::Exited(code),
            (_, Some(signal)) => Status::Signaled(signal),
            _ => return,
        };
        send(&job.socket, &end);
        if job.events.is_none() {
            job.events = cgroup::events(&job.dir).ok();
        }
        self.check_empty(i);
    }

    /// SIGKILLs every child that is neither a job's program, a launcher,
    /// a helper, nor (with cgroups) a process still inside a running job's
    /// cgroup.
    fn kill_orphans(&self) {
        let known: HashSet<i32> = self
            .jobs
            .iter()
            .filter(|j| !j.reaped)
            .map(|j| j.program.as_raw())
            .chain(self.launchers.iter().copied())
            .chain(self.helpers.iter().copied())
            .collect();
        for pid in children(self.me) {
            if known.contains(&pid) {
                continue;
            }
            let in_live_job = cgroup_dir_of(&pid.to_string()).is_some_and(|dir| {
                self.jobs
                    .iter()
                    .any(|j| j.killing.is_none() && j.dir == dir)
            });
            if !in_live_job {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    /// Receives one job; returns false at the end of the control socket.
    fn receive(&mut self) -> bool {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut ancillary = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut self.buf)];
        let received = match rustix::net::recvmsg(
            &self.control,
            &mut iov,
            &mut ancillary,
            RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
        ) {
            Ok(r) => r,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => return true,
            Err(_) => return false,
        };
        let mut fds: Vec<OwnedFd> = Vec::new();
        for message in ancillary.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                fds.extend(rights);
            }
        }
        if received.bytes == 0 && fds.is_empty() {
            return false;
        }
        let truncated = received
            .flags
            .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC);
        let request: Option<JobRequest> = serde_json::from_slice(&self.buf[..received.bytes]).ok();
        // Every descriptor received is closed on the way out, whatever
        // happens; the job's are used (and closed) in `start_job`.
        match (request, <[OwnedFd; 3]>::try_from(fds)) {
            (Some(request), Ok(fds)) if !truncated => self.start_job(request, fds),
            (_, Ok([status, _, _])) => {
                send_fd(&status, &Status::Error("malformed job message".into()));
            }
            (_, Err(_)) => {
                eprintln!("tailkitd-launch serve: a job message without its descriptors")
            }
        }
        true
    }

    fn start_job(&mut self, request: JobRequest, [status, stdout, stderr]: [OwnedFd; 3]) {
        let stdio = Stdio {
            stdout: stdout.as_raw_fd(),
            stderr: stderr.as_raw_fd(),
        };
        if self.cgroups.is_none() {
            match self.start_launcher(&request, &status, &stdio) {
                Ok(pid) => {
                    self.launchers.insert(pid.as_raw());
                    send_fd(&status, &Status::Launcher(pid.as_raw()));
                }
                Err(e) => send_fd(&status, &e),
            }
            return;
        }
        match self.start_in_cgroup(&request, &stdio) {
            Ok((program, dir)) => {
                let socket = UnixStream::from(status);
                send(&socket, &Status::Started(program.as_raw()));
                self.jobs.push(Job {
                    socket,
                    dir,
                    program,
                    reaped: false,
                    killing: None,
                    events: None,
                    empty: false,
                    inbox: Vec::new(),
                    hung_up: false,
                });
            }
            Err(e) => send_fd(&status, &e),
        }
    }

    /// Starts the program of `request` inside a new job cgroup.
    fn start_in_cgroup(
        &mut self,
        request: &JobRequest,
        stdio: &Stdio,
    ) -> Result<(Pid, PathBuf), Status> {
        let Some(cgroups) = &self.cgroups else {
            return Err(Status::Error("no cgroups".into()));
        };
        if !valid_job_name(&request.name) {
            return Err(Status::Error(format!("bad job name {:?}", request.name)));
        }
        let dir = cgroups
            .create(&request.name)
            .map_err(|e| Status::Error(format!("creating the job's cgroup: {e}")))?;
        let (argv, env) = (os_strings(&request.argv), os_strings(&request.env));
        let spec = CommandSpec {
            program: OsStr::new(&request.program),
            argv: &argv,
            env: &env,
            credentials: request.credentials.as_ref(),
        };
        let entered = cgroups.enter(&dir);
        let spawned = match entered {
            Ok(()) => self.in_workdir(request, || {
                spawn_command(&spec, stdio, &[], &self.helper, self.clear_caps)
            }),
            Err(e) => Err(Status::Error(format!("entering the job's cgroup: {e}"))),
        };
        if let Ok(Spawned {
            helper: Some(helper),
            ..
        }) = &spawned
        {
            self.helpers.insert(helper.as_raw());
        }
        if let Err(e) = self.leave_cgroup() {
            // Inside a job's cgroup the supervisor would die with the job:
            // better to stop now (the daemon starts another).
            eprintln!("tailkitd-launch serve: cannot leave a job cgroup: {e}");
            std::process::exit(1);
        }
        match spawned {
            Ok(spawned) => Ok((spawned.pid, dir)),
            Err(e) => {
                let _ = cgroup::remove(&dir);
                Err(e)
            }
        }
    }

    fn leave_cgroup(&self) -> std::io::Result<()> {
        let Some(cgroups) = &self.cgroups else {
            return Ok(());
        };
        let mut result = cgroups.leave();
        for _ in 0..3 {
            if result.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            result = cgroups.leave();
        }
        result
    }

    /// Starts a launcher for `request` (no cgroup): it gets the status
    /// socket as stdin and the output pipes, in a process group of its own.
    fn start_launcher(
        &self,
        request: &JobRequest,
        status: &OwnedFd,
        stdio: &Stdio,
    ) -> Result<Pid, Status> {
        let setup = |e: Errno| Status::Error(format!("posix_spawn setup: {e}"));
        let c =
            |s: &str| CString::new(s).map_err(|_| Status::Error("an argument contains NUL".into()));
        let mut argv = vec![CString::from(c"tailkitd-launch")];
        if let Some(creds) = &request.credentials {
            argv.push(CString::from(c"--as"));
            argv.push(c(&creds.to_arg())?);
        }
        argv.push(c(&self.me.as_raw().to_string())?);
        argv.push(c(&request.program)?);
        for a in &request.argv {
            argv.push(c(a)?);
        }
        let env = request
            .env
            .iter()
            .map(|e| c(e))
            .collect::<Result<Vec<_>, _>>()?;
        let launcher = CString::new(self.launcher.as_os_str().as_bytes())
            .map_err(|_| Status::Error("the launcher's path contains NUL".into()))?;
        let mut attr = PosixSpawnAttr::init().map_err(setup)?;
        attr.set_sigmask(&SigSet::empty()).map_err(setup)?;
        attr.set_sigdefault(&SigSet::all()).map_err(setup)?;
        attr.set_pgroup(Pid::from_raw(0)).map_err(setup)?;
        attr.set_flags(
            PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
                | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF
                | PosixSpawnFlags::POSIX_SPAWN_SETPGROUP,
        )
        .map_err(setup)?;
        let mut actions = PosixSpawnFileActions::init().map_err(setup)?;
        actions.add_dup2(status.as_raw_fd(), 0).map_err(setup)?;
        actions.add_dup2(stdio.stdout, 1).map_err(setup)?;
        actions.add_dup2(stdio.stderr, 2).map_err(setup)?;
        self.in_workdir(request, || {
            posix_spawn(launcher.as_c_str(), &actions, &attr, &argv, &env)
                .map_err(|e| Status::Error(format!("starting {}: {e}", self.launcher.display())))
        })
    }

    /// Runs `spawn` in the job's working directory and with the commands'
    /// soft limit of open files, then restores both.
    fn in_workdir<T>(
        &self,
        request: &JobRequest,
        spawn: impl FnOnce() -> Result<T, Status>,
    ) -> Result<T, Status> {
        if let Some(dir) = &request.workdir {
            nix::unistd::chdir(Path::new(dir)).map_err(|e| Status::SpawnError {
                errno: e as i32,
                message: format!("working directory {dir}: {}", e.desc()),
            })?;
        }
        let restore = self.nofile.and_then(set_soft_nofile);
        let result = spawn();
        if let Some(limit) = restore {
            let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, limit);
        }
        if request.workdir.is_some() {
            let _ = nix::unistd::chdir("/");
        }
        result
    }

    /// Reads job `i`'s orders and obeys them.
    fn read_orders(&mut self, i: usize) {
        let job = &mut self.jobs[i];
        let mut buf = [0u8; 256];
        let orders = match job.socket.read(&mut buf) {
            Ok(0) | Err(_) => {
                job.hung_up = true;
                vec![Order::Kill]
            }
            Ok(n) => {
                job.inbox.extend_from_slice(&buf[..n]);
                let mut orders = Vec::new();
                while let Some(end) = job.inbox.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = job.inbox.drain(..=end).collect();
                    orders.extend(Order::parse(&line[..end]));
                }
                if job.inbox.len() > 1024 {
                    job.inbox.clear();
                }
                orders
            }
        };
        for order in orders {
            match order {
                Order::Term => terminate(&self.jobs[i]),
                Order::Kill => self.kill_job(i),
            }
        }
    }

    /// `cgroup.kill` for job `i`; it ends once its cgroup is empty.
    fn kill_job(&mut self, i: usize) {
        let job = &mut self.jobs[i];
        if job.killing.is_some() {
            return;
        }
        if let Err(e) = cgroup::kill(&job.dir) {
            eprintln!(
                "tailkitd-launch serve: {}: cgroup.kill: {e}",
                job.dir.display()
            );
        }
        job.killing = Some(Instant::now() + SWEEP_LIMIT);
        if job.events.is_none() {
            job.events = cgroup::events(&job.dir).ok();
        }
        self.check_empty(i);
    }

    /// Marks job `i` over once its cgroup is empty and its program ended
    /// (or it is being killed); [`Supervisor::finish_jobs`] removes it.
    fn check_empty(&mut self, i: usize) {
        let job = &mut self.jobs[i];
        if job.empty || !(job.reaped || job.killing.is_some()) {
            return;
        }
        let empty = match &mut job.events {
            Some(events) => cgroup::populated(events) == Some(false),
            None => cgroup::procs(&job.dir).is_empty(),
        };
        if empty {
            job.empty = true;
            job.events = None;
        }
    }

    /// Removes the jobs that are over: empty ones (their cgroup removed)
    /// and ones whose kill did not empty the cgroup in time. Dropping a
    /// job closes its status socket, which tells the daemon.
    fn finish_jobs(&mut self) {
        let now = Instant::now();
        let mut finished = false;
        let mut i = 0;
        while i < self.jobs.len() {
            let job = &self.jobs[i];
            if !(job.empty || job.killing.is_some_and(|d| d <= now)) {
                i += 1;
                continue;
            }
            let mut job = self.jobs.swap_remove(i);
            if !job.reaped {
                reap_program(&mut job);
            }
            if !job.empty {
                let left = cgroup::procs(&job.dir).len();
                send(
                    &job.socket,
                    &Status::Error(format!(
                        "sweep incomplete: {left} processes left after {SWEEP_LIMIT:?}"
                    )),
                );
                self.leftovers.push(job.dir.clone());
            } else if cgroup::remove(&job.dir).is_err() {
                self.leftovers.push(job.dir.clone());
            }
            finished = true;
        }
        if finished {
            self.leftovers.retain(|dir| {
                let _ = cgroup::kill(dir);
                cgroup::remove(dir).is_err()
            });
            self.kill_orphans();
        }
    }

    /// The daemon is gone or let go of us: kill every job and leave.
    fn shut_down(&mut self) {
        for job in &self.jobs {
            let _ = cgroup::kill(&job.dir);
        }
        self.jobs.clear();
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove_all();
        }
        // Launchers get the parent-death signal when this process exits,
        // and sweep their jobs.
    }
}

/// SIGTERM to job's program group (while the program lives) and to every
/// other process in its cgroup.
fn terminate(job: &Job) {
    let group = job.program.as_raw();
    if !job.reaped {
        let _ = killpg(job.program, Signal::SIGTERM);
    }
    for pid in cgroup::procs(&job.dir) {
        let in_group = proc_stat(pid).is_some_and(|p| p.pgid == group);
        if job.reaped || !in_group {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
}

/// Reaps a killed job's program (a zombie by now, or about to be) and
/// reports its end, which the daemon may still be waiting for.
fn reap_program(job: &mut Job) {
    let _ = kill(job.program, Signal::SIGKILL);
    let Some(pid) = rustix::process::Pid::from_raw(job.program.as_raw()) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        match rustix::process::waitpid(Some(pid), WaitOptions::NOHANG) {
            Ok(Some((_, status))) => {
                job.reaped = true;
                if let Some(code) = status.exit_status() {
                    send(&job.socket, &Status::Exited(code));
                } else if let Some(signal) = status.terminating_signal() {
                    send(&job.socket, &Status::Signaled(signal));
                }
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(_) => return,
        }
    }
}

/// Sets the soft limit of open files to `soft` (at most the hard limit);
/// returns the limit to restore, if it changed.
fn set_soft_nofile(soft: u64) -> Option<rustix::process::Rlimit> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let current = getrlimit(Resource::Nofile);
    let soft = current.maximum.map_or(soft, |max| soft.min(max));
    if current.current == Some(soft) {
        return None;
    }
    let lowered = Rlimit {
        current: Some(soft),
        maximum: current.maximum,
    };
    setrlimit(Resource::Nofile, lowered).ok()?;
    Some(current)
}

/// The children of this (single-threaded) process.
fn children(me: Pid) -> Vec<i32> {
    match std::fs::read_to_string(format!("/proc/{me}/task/{me}/children")) {
        Ok(text) => text
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect(),
        // Without CONFIG_PROC_CHILDREN: the long way.
        Err(_) => proc_stats()
            .into_iter()
            .filter(|p| p.ppid == me.as_raw())
            .map(|p| p.pid)
            .collect(),
    }
}

fn os_strings(items: &[String]) -> Vec<OsString> {
    items.iter().map(OsString::from).collect()
}

/// Sends `status` on a job's status socket, never blocking (a daemon that
/// does not read has closed its end, or will).
fn send(socket: &UnixStream, status: &Status) {
    send_fd(socket, status);
}

fn send_fd(fd: impl AsFd, status: &Status) {
    let line = format!("{status}\n");
    let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
    let _ = rustix::net::send(fd, line.as_bytes(), flags);
    let _ = std::io::stderr().flush();
}
