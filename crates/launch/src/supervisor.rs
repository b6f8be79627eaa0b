//! The supervisor: `tailkitd-launch serve PARENT_PID [--cgroup DIR]
//! [--nofile N] [--launcher PATH]`, started by the daemon (from its
//! long-lived spawner thread, the control socket as stdin, every signal at
//! its default disposition, an empty mask and environment) and then handed
//! jobs as one message each on that socket (a [`JobRequest`] and three
//! descriptors), so that the daemon never waits for an `execve`. The
//! daemon may run a few, side by side.
//!
//! It asks for `SIGTERM` when the daemon dies (`PR_SET_PDEATHSIG`), is a
//! child subreaper, blocks every asynchronous signal (reading them from a
//! `signalfd`: only `SIGCHLD` and the parent-death `SIGTERM` mean
//! anything), and runs one `poll` loop over the control socket, the
//! signals and its launchers. It runs no command itself: each job goes to
//! a [launcher](crate::launchers), most often one kept [ready](crate::ready)
//! that has run jobs before, which speaks the job's status protocol; the
//! supervisor says `launcher PID` first. With `--cgroup DIR` (given and
//! usable, see [`crate::cgroup`]) every job runs in a cgroup of its own,
//! made by its launcher under this supervisor's directory in `DIR`.
//!
//! A launcher seen stopped is SIGKILLed. Any process that becomes the
//! supervisor's child without being one of its launchers (an orphan of a
//! launcher that was killed) is SIGKILLed as soon as the supervisor sees
//! it, and so in turn are its children; the cgroups of a launcher that is
//! gone are killed and removed.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::prctl;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::{Pid, getpid, getppid};
use rustix::process::WaitOptions;
use tailkitd_launch::{Hello, JobRequest, MAX_JOB_MESSAGE, SWEEP_LIMIT, Status, proc_stats};

use crate::cgroup::{self, Cgroups};
use crate::control::{self, Received};
use crate::launchers::Launchers;

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

struct Supervisor {
    control: OwnedFd,
    signals: SignalFd,
    parent: Pid,
    me: Pid,
    cgroups: Option<Cgroups>,
    launchers: Launchers,
    /// Cgroups of launchers that are gone, killed but not empty yet, and
    /// since when.
    leftovers: Vec<(PathBuf, Instant)>,
    buf: Vec<u8>,
}

/// What a poll found ready.
#[derive(Default)]
struct Ready {
    control: bool,
    signals: bool,
    /// Busy ready launchers that said something (their pids).
    launchers: Vec<i32>,
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
        // Not dumpable: no command of the same user may ptrace it, read
        // its memory (the job messages of every peer) or write its /proc
        // files (`oom_score_adj`); launchers start dumpable (`execve`)
        // and do the same.
        prctl::set_dumpable(false).map_err(|e| format!("PR_SET_DUMPABLE: {e}"))?;
        if getppid() != options.parent {
            return Ok(None);
        }
        prctl::set_child_subreaper(true).map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
        nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
        let this = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
        let (cgroups, fallback_reason) = match &options.cgroup {
            None => (None, None),
            Some(base) => match Cgroups::setup(base) {
                Ok(c) => (Some(c), None),
                Err(e) => (None, Some(e)),
            },
        };
        let me = getpid();
        let launchers = Launchers::new(
            options.launcher.unwrap_or_else(|| this.clone()),
            this,
            me,
            options.nofile,
            cgroups.as_ref().map(|c| c.dir().to_path_buf()),
        );
        let supervisor = Supervisor {
            control,
            signals,
            parent: options.parent,
            me,
            cgroups,
            launchers,
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
            // Leftovers are tried again often while they may still be
            // emptying, then now and then.
            let leftovers = self.leftovers.iter().map(|(_, since)| {
                let step = if now < *since + SWEEP_LIMIT { 20 } else { 1000 };
                now + Duration::from_millis(step)
            });
            let timeout = self
                .launchers
                .tidy(now)
                .into_iter()
                .chain(leftovers)
                .min()
                .map_or(PollTimeout::NONE, |d| {
                    let ms = d.saturating_duration_since(now).as_millis() + 1;
                    PollTimeout::try_from(ms.min(10_000) as i32).unwrap_or(PollTimeout::MAX)
                });
            let ready = self.wait(timeout);
            if ready.signals && self.handle_signals() {
                break;
            }
            // Launchers back in the pool first: a job that ended said
            // `ready` before the daemon could send the next.
            self.launchers.answered(&ready.launchers);
            if ready.control && !self.receive() {
                break;
            }
            self.leftovers
                .retain(|(dir, _)| cgroup::remove(dir).is_err());
        }
        self.shut_down();
        0
    }

    /// Polls; returns what is ready.
    fn wait(&self, timeout: PollTimeout) -> Ready {
        let mut fds = vec![
            PollFd::new(self.control.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
        ];
        let mut owners = Vec::new();
        for (pid, control) in self.launchers.busy() {
            fds.push(PollFd::new(control, PollFlags::POLLIN));
            owners.push(pid);
        }
        let mut ready = Ready::default();
        if poll(&mut fds, timeout).is_err() {
            return ready;
        }
        let is_ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        ready.control = is_ready(&fds[0]);
        ready.signals = is_ready(&fds[1]);
        ready.launchers = fds[2..]
            .iter()
            .zip(owners)
            .filter(|(fd, _)| is_ready(fd))
            .map(|(_, pid)| pid)
            .collect();
        ready
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
                if self.launchers.contains(raw) {
                    // A stopped launcher contains nothing: kill it; its
                    // orphans come here and are killed in turn.
                    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
                }
                continue;
            }
            if !self.launchers.ended(raw) {
                orphans = true;
                continue;
            }
            // A launcher that ends on its own has reaped everything of
            // its jobs; one that did not may have left orphans.
            orphans |= status.exit_status() != Some(0) && status.exit_status() != Some(125);
            if let Some(cgroups) = &self.cgroups {
                let now = Instant::now();
                let left = cgroup::remove_launchers(cgroups.dir(), raw);
                self.leftovers
                    .extend(left.into_iter().map(|dir| (dir, now)));
            }
        }
        if orphans {
            self.kill_orphans();
        }
    }

    /// SIGKILLs every child that is not a launcher.
    fn kill_orphans(&self) {
        let known: HashSet<i32> = self.launchers.pids().collect();
        for pid in children(self.me) {
            if !known.contains(&pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    /// Receives one job; returns false at the end of the control socket.
    fn receive(&mut self) -> bool {
        let (request, fds) = match control::receive(&self.control, &mut self.buf) {
            Received::Job(request, fds) => (request, fds),
            Received::Nothing => return true,
            Received::Closed => return false,
        };
        // Every descriptor received is closed on the way out, whatever
        // happens.
        match (request, <[OwnedFd; 3]>::try_from(fds)) {
            (Some(request), Ok(fds)) => self.start_job(&request, &fds),
            (_, Ok([status, _, _])) => {
                send(&status, &Status::Error("malformed job message".into()));
            }
            (_, Err(_)) => {
                eprintln!("tailkitd-launch serve: a job message without its descriptors")
            }
        }
        true
    }

    fn start_job(&mut self, request: &JobRequest, fds: &[OwnedFd; 3]) {
        // `launcher PID` is said by `start`, before the launcher can say
        // anything.
        if let Err(e) = self.launchers.start(request, fds) {
            send(&fds[0], &e);
        }
    }

    /// The daemon is gone or let go of us: kill every job and leave.
    /// Launchers get the parent-death signal when this process exits, and
    /// kill their jobs; the job cgroups are killed here as well.
    fn shut_down(&mut self) {
        // The idle launchers exit at the end of their control socket:
        // reaped here (for a second at most), they are nobody's orphans.
        let mut idle = self.launchers.clear();
        let deadline = Instant::now() + Duration::from_secs(1);
        while !idle.is_empty() && Instant::now() < deadline {
            match rustix::process::wait(WaitOptions::NOHANG) {
                Ok(Some((pid, _))) => idle.retain(|p| *p != pid.as_raw_nonzero().get()),
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(_) => break,
            }
        }
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove_all();
        }
    }
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

/// Sends `status` on a job's status socket, never blocking (a daemon that
/// does not read has closed its end, or will).
fn send(fd: impl AsFd, status: &Status) {
    let line = format!("{status}\n");
    let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
    let _ = rustix::net::send(fd, line.as_bytes(), flags);
    let _ = std::io::stderr().flush();
}
