//! `tailkitd-launch ready PARENT_PID [--cgroup DIR]`: a launcher started
//! ahead of its jobs by the supervisor (`PARENT_PID`), which hands it one
//! job after another on its stdin, a `SOCK_SEQPACKET` control socket
//! ([`crate::control`] messages: the request and the job's three
//! descriptors). No job waits for a launcher's `execve`, and once the pool
//! is warm no job costs one: a job's only `execve` is its command's.
//!
//! It prepares as the per-job [launcher](crate::launcher) does (steps 1 to
//! 3), then for each job:
//!
//! - with `--cgroup DIR` (the supervisor's job cgroups): it waits for the
//!   job in an empty cgroup made for it ([`Parking`]); says `cgroup NAME`
//!   on the status socket; starts the command, which is born in that
//!   cgroup; says `started PID`; moves itself on into a new empty cgroup,
//!   the next job's; and contains the job by its cgroup (`term`: SIGTERM to
//!   every process in it; `kill`, or the end of the status socket:
//!   `cgroup.kill`), until the program ended and the cgroup is empty, then
//!   removes it;
//! - without: it starts the command in the job's working directory with
//!   the request's environment and contains the job as the per-job
//!   launcher does (its sweep).
//!
//! Once the job is over and nothing of it is left, it says `ready` on the
//! control socket, closes the job's status socket, removes the job's
//! cgroup and waits for the next. It exits at the end of the control
//! socket, when its parent dies, and after a sweep that gave up; and,
//! instead of saying `ready`, when it is not fit for another job
//! ([`Jobs::fit`]): a child left (a process of the job that moved itself
//! out of the job's cgroup), anything but itself in the next job's
//! cgroup, or its [settings](crate::settings) changed since it started (a
//! command of the same user reached it through `$PPID`). Its supervisor
//! then kills what is left (its orphans, its cgroups) and the next job
//! gets another launcher.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::{Pid, getppid};
use tailkitd_launch::{JobRequest, LAUNCHER_NAME, MAX_JOB_MESSAGE, Status};

use crate::cgroup::{self, Parking};
use crate::command::{CommandSpec, Stdio, holds_inheritable_caps, spawn_command};
use crate::control::{self, Received};
use crate::launcher::{
    End, JobCgroup, LAUNCH_FAILED, Launcher, NOT_REUSABLE, SWEEP_GAVE_UP, open_fds, prepare,
};
use crate::settings::Settings;

/// Runs a ready launcher with `args` (after `ready`); returns the exit code.
pub fn ready(args: &[OsString]) -> i32 {
    let Ok(control) = std::io::stdin().as_fd().try_clone_to_owned() else {
        eprintln!("{LAUNCHER_NAME} ready: stdin must be the control socket");
        return LAUNCH_FAILED;
    };
    let (parent, cgroups) = match args {
        [pid] => (pid, None),
        [pid, flag, dir] if flag == "--cgroup" => (pid, Some(PathBuf::from(dir))),
        _ => (&OsString::new(), None),
    };
    let Some(parent) = parent.to_str().and_then(|p| p.parse::<i32>().ok()) else {
        eprintln!("usage: {LAUNCHER_NAME} ready PARENT_PID [--cgroup DIR]");
        return LAUNCH_FAILED;
    };
    let signals = match prepare(parent) {
        Ok(Some(signals)) => signals,
        Ok(None) => return LAUNCH_FAILED,
        Err(status) => {
            eprintln!("{LAUNCHER_NAME} ready: {status}");
            return LAUNCH_FAILED;
        }
    };
    let Ok(helper) = std::env::current_exe() else {
        eprintln!("{LAUNCHER_NAME} ready: cannot locate {LAUNCHER_NAME}");
        return LAUNCH_FAILED;
    };
    let parking = match cgroups.as_deref().map(Parking::new).transpose() {
        Ok(parking) => parking,
        Err(e) => {
            eprintln!("{LAUNCHER_NAME} ready: {e}");
            return LAUNCH_FAILED;
        }
    };
    let mut jobs = Jobs {
        settings: Settings::read(parking.is_none()),
        parent: Pid::from_raw(parent),
        signals,
        helper,
        clear_caps: holds_inheritable_caps(),
        // Descriptors this process got without close-on-exec: closed in
        // every command (its own are all close-on-exec).
        inherited: open_fds().into_iter().filter(|fd| *fd > 2).collect(),
        parking,
        leftovers: Vec::new(),
    };
    // Ready for the first job before it comes (a failure is the job's).
    if let Some(parking) = &mut jobs.parking {
        let _ = parking.park();
    }
    let mut buf = vec![0u8; MAX_JOB_MESSAGE];
    loop {
        let Some((request, fds)) = jobs.next(&control, &mut buf) else {
            return 0;
        };
        let done = match (request, <[OwnedFd; 3]>::try_from(fds)) {
            (Some(request), Ok(fds)) => jobs.run(&request, fds),
            (None, Ok([status, _, _])) => {
                let mut socket = UnixStream::from(status);
                let line = format!("{}\n", Status::Error("malformed job message".into()));
                let _ = socket.write_all(line.as_bytes());
                Done {
                    end: End::Clean,
                    socket,
                    cgroup: None,
                }
            }
            // Not a job: nobody to tell.
            (_, Err(_)) => continue,
        };
        // `ready` goes to the supervisor before the daemon sees the job's
        // end (its status socket closing): the daemon's next job then
        // finds this launcher back in the pool rather than starting
        // another. The job is over already; what follows only tidies up,
        // before the next job is read.
        let unfit = done.end == End::Clean && jobs.unfit();
        let ready = done.end == End::Clean
            && !unfit
            && rustix::net::send(&control, b"ready", rustix::net::SendFlags::NOSIGNAL).is_ok();
        drop(done.socket);
        match done.end {
            End::Clean if ready => {}
            End::Clean if unfit => return NOT_REUSABLE,
            End::Clean | End::ParentGone => return 0,
            End::GaveUp => return SWEEP_GAVE_UP,
        }
        jobs.leftovers.extend(done.cgroup);
        let _ = nix::unistd::chdir("/");
        jobs.leftovers.retain(|dir| cgroup::remove(dir).is_err());
    }
}

/// A job that is over, its status socket still open.
struct Done {
    end: End,
    socket: UnixStream,
    /// Its cgroup, empty, to be removed.
    cgroup: Option<PathBuf>,
}

/// What a ready launcher keeps from one job to the next.
struct Jobs {
    /// Its settings when it started, for every job.
    settings: Settings,
    parent: Pid,
    signals: SignalFd,
    helper: PathBuf,
    clear_caps: bool,
    inherited: Vec<i32>,
    /// With job cgroups.
    parking: Option<Parking>,
    /// Cgroups of jobs over that could not be removed yet.
    leftovers: Vec<PathBuf>,
}

impl Jobs {
    /// Whether this launcher is unfit for another job (see [`Jobs::fit`]);
    /// says why on stderr.
    fn unfit(&mut self) -> bool {
        match self.fit() {
            Ok(()) => false,
            Err(why) => {
                eprintln!("{LAUNCHER_NAME} ready: not reused: {why}");
                true
            }
        }
    }

    /// Checks, once a job is over, that this launcher may take another:
    /// no child left (ended ones, a `spawn-as` helper, are reaped), nothing
    /// but itself in the next job's cgroup, and its settings as they were
    /// when it started. A few system calls and three small reads.
    fn fit(&mut self) -> Result<(), String> {
        // The helper of a `spawn-as` that reported an error may still be on
        // its way out: a moment for it.
        let deadline = Instant::now() + Duration::from_millis(100);
        loop {
            match rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG) {
                Ok(Some(_)) | Err(rustix::io::Errno::INTR) => {}
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(None) => return Err("a process of its last job is still its child".into()),
                // ECHILD: no child at all.
                Err(_) => break,
            }
        }
        if let Some((_, dir)) = self.parking.as_ref().and_then(Parking::here) {
            let procs = cgroup::procs(dir);
            if procs != [std::process::id() as i32] {
                return Err(format!(
                    "the next job's cgroup {} holds {procs:?}, not this launcher alone",
                    dir.display()
                ));
            }
        }
        let changes = self
            .settings
            .changes(&Settings::read(self.parking.is_none()));
        if !changes.is_empty() {
            return Err(format!("its {} changed", changes.join(", ")));
        }
        Ok(())
    }

    /// Waits for the next job message; `None` at the end of the control
    /// socket or when the parent is gone.
    fn next(
        &self,
        control: &OwnedFd,
        buf: &mut [u8],
    ) -> Option<(Option<JobRequest>, Vec<OwnedFd>)> {
        loop {
            let mut fds = [
                PollFd::new(control.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => return None,
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            if ready(&fds[1]) {
                while let Ok(Some(info)) = self.signals.read_signal() {
                    if info.ssi_signo == Signal::SIGTERM as u32 && getppid() != self.parent {
                        return None;
                    }
                }
                // The helper of a command that could not start, if any.
                while matches!(
                    waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG),
                    Ok(status) if status != WaitStatus::StillAlive
                ) {}
            }
            if ready(&fds[0]) {
                match control::receive(control, buf) {
                    Received::Job(request, fds) => return Some((request, fds)),
                    Received::Nothing => {}
                    Received::Closed => return None,
                }
            }
        }
    }

    /// Runs one job to its end; its status socket is closed by the caller.
    fn run(&mut self, request: &JobRequest, [status, stdout, stderr]: [OwnedFd; 3]) -> Done {
        let mut socket = UnixStream::from(status);
        let mut say = |status: &Status| {
            let _ = socket.write_all(format!("{status}\n").as_bytes());
        };
        // With job cgroups: the one this process is parked in is the job's.
        let cgroup = match &mut self.parking {
            None => None,
            Some(parking) => {
                if parking.here().is_none()
                    && let Err(e) = parking.park()
                {
                    say(&Status::Error(format!("creating the job's cgroup: {e}")));
                    return Done {
                        end: End::Clean,
                        socket,
                        cgroup: None,
                    };
                }
                let events = parking.take_events();
                parking.here().map(|(name, dir)| {
                    say(&Status::Cgroup(name.to_string()));
                    (dir.to_path_buf(), events)
                })
            }
        };
        let spawned = self.spawn(request, &stdout, &stderr);
        // The program holds the output pipes now (or nobody does).
        drop((stdout, stderr));
        let program = match spawned {
            Ok(program) => program,
            Err(status) => {
                say(&status);
                if let Some((dir, _)) = cgroup {
                    // Not reused for another job: the daemon knows it as
                    // this one's. Empty, unless the helper of `spawn-as`
                    // is still on its way out.
                    self.move_on(&dir);
                    if cgroup::remove(&dir).is_err() {
                        self.leftovers.push(dir);
                    }
                }
                return Done {
                    end: End::Clean,
                    socket,
                    cgroup: None,
                };
            }
        };
        let mut launcher = Launcher {
            socket,
            signals: &self.signals,
            daemon_pid: self.parent,
            program,
            program_reaped: false,
            inbox: Vec::new(),
            cgroup: None,
            hung_up: false,
        };
        launcher.send(&Status::Started(program.as_raw()));
        if let Some((dir, events)) = cgroup {
            // Out of the job's cgroup before anything can kill it.
            if let Err(e) = move_on(self.parking.as_mut(), &dir) {
                launcher.send(&Status::Error(format!(
                    "cannot leave the job's cgroup: {e}"
                )));
                // Kills this process too: the daemon kills what is left.
                let _ = cgroup::kill(&dir);
                return Done {
                    end: End::GaveUp,
                    socket: launcher.socket,
                    cgroup: None,
                };
            }
            launcher.cgroup = Some(JobCgroup::new(dir, events));
        }
        let end = launcher.supervise();
        let cgroup = launcher.cgroup.take().filter(|_| end == End::Clean);
        Done {
            end,
            socket: launcher.socket,
            cgroup: cgroup.map(|c| c.dir().to_path_buf()),
        }
    }

    /// Leaves `dir` for a new cgroup, ready for the next job (or for home);
    /// see [`move_on`].
    fn move_on(&mut self, dir: &Path) {
        let _ = move_on(self.parking.as_mut(), dir);
    }

    fn spawn(
        &self,
        request: &JobRequest,
        stdout: &OwnedFd,
        stderr: &OwnedFd,
    ) -> Result<Pid, Status> {
        if let Some(dir) = &request.workdir {
            nix::unistd::chdir(Path::new(dir)).map_err(|e| Status::SpawnError {
                errno: e as i32,
                message: format!("working directory {dir}: {}", e.desc()),
            })?;
        }
        let strings = |items: &[String]| items.iter().map(OsString::from).collect::<Vec<_>>();
        let (argv, env) = (strings(&request.argv), strings(&request.env));
        let spec = CommandSpec {
            program: OsStr::new(&request.program),
            argv: &argv,
            env: &env,
            credentials: request.credentials.as_ref(),
        };
        let stdio = Stdio {
            stdout: stdout.as_raw_fd(),
            stderr: stderr.as_raw_fd(),
        };
        spawn_command(
            &spec,
            &stdio,
            &self.inherited,
            &self.helper,
            self.clear_caps,
        )
    }
}

/// Moves this process out of job cgroup `dir`: into a new empty cgroup,
/// ready for the next job, or else back home. An error means it is still
/// in `dir`.
fn move_on(parking: Option<&mut Parking>, dir: &Path) -> std::io::Result<()> {
    let Some(parking) = parking else {
        return Ok(());
    };
    if let Err(e) = parking.park() {
        eprintln!(
            "{LAUNCHER_NAME} ready: cannot make a cgroup ready next to {}: {e}",
            dir.display()
        );
        return parking.go_home();
    }
    Ok(())
}
