//! The supervisor's launchers, one per running job. The supervisor keeps
//! launchers *ready* ([`crate::ready`]): each is started (as this very
//! executable) with a `SOCK_SEQPACKET` control socket as stdin, is handed
//! one job after another (the job message as the daemon sent it, with the
//! job's three descriptors), and is back in the pool once it says
//! `ready`. A job then costs no `execve` but its command's. With job
//! cgroups, every job goes to a ready launcher; without, only when the
//! launcher asked for (`--launcher`) is this executable: any other (the
//! tests' stand-ins) is started per job as `LAUNCHER [--as CREDENTIALS]
//! PARENT_PID PROGRAM ARGV...`, the status socket as stdin.
//!
//! A ready launcher only ever runs jobs of one user: the credentials of
//! its first job (or none, the supervisor's own user); a job of another
//! user goes to another launcher.
//!
//! A few ready launchers are kept idle ([`MAX_IDLE`]); past one, those
//! idle for [`IDLE_LIMIT`] are let go (their control socket closed, they
//! exit).

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use tailkitd_launch::{Credentials, JobRequest, Status};

use crate::control;

/// Idle ready launchers kept at most.
pub const MAX_IDLE: usize = 16;

/// How long a ready launcher may stay idle, past the first.
pub const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// A ready launcher.
struct Ready {
    pid: Pid,
    control: OwnedFd,
    /// Whose commands it starts (the jobs' credentials, `None`: the
    /// supervisor's own user): it never gets a job of anyone else.
    owner: Option<Credentials>,
    /// When it last became idle.
    since: Instant,
}

/// The launchers of one supervisor.
pub struct Launchers {
    /// The per-job launcher.
    program: PathBuf,
    /// This executable, the ready launchers.
    this: PathBuf,
    /// Launchers are kept ready.
    reusable: bool,
    /// The supervisor's job cgroup directory, if jobs get cgroups.
    cgroups: Option<PathBuf>,
    /// The supervisor's pid, every launcher's `PARENT_PID`.
    parent: Pid,
    nofile: Option<u64>,
    /// Every launcher started and not reaped yet.
    all: HashSet<i32>,
    idle: Vec<Ready>,
    busy: Vec<Ready>,
}

impl Launchers {
    /// The launchers of the supervisor `parent` (the executable `this`):
    /// ready ones, or per-job ones started as `program`, with `nofile` as
    /// their soft limit of open files (and their commands'), and job
    /// cgroups in `cgroups`.
    pub fn new(
        program: PathBuf,
        this: PathBuf,
        parent: Pid,
        nofile: Option<u64>,
        cgroups: Option<PathBuf>,
    ) -> Launchers {
        Launchers {
            reusable: cgroups.is_some() || same_file(&program, &this),
            program,
            this,
            cgroups,
            parent,
            nofile,
            all: HashSet::new(),
            idle: Vec::new(),
            busy: Vec::new(),
        }
    }

    /// Starts job `request` with its descriptors: hands it to a ready
    /// launcher (started now if none is idle), or starts a launcher for
    /// it. Returns the launcher's pid, or the status to report.
    pub fn start(&mut self, request: &JobRequest, fds: &[OwnedFd; 3]) -> Result<Pid, Status> {
        if self.reusable
            && let Some(pid) = self.hand_over(request, fds)
        {
            return Ok(pid);
        }
        let pid = self.start_for(request, fds)?;
        self.all.insert(pid.as_raw());
        announce(&fds[0], pid);
        Ok(pid)
    }

    /// Sends the job to a ready launcher; `None` if none could take it.
    fn hand_over(&mut self, request: &JobRequest, fds: &[OwnedFd; 3]) -> Option<Pid> {
        let message = serde_json::to_vec(request).ok()?;
        let borrowed = [fds[0].as_fd(), fds[1].as_fd(), fds[2].as_fd()];
        let owner = request.credentials.as_ref();
        let mut fresh = false;
        loop {
            // The most recently idle of this owner's.
            let mine = self.idle.iter().rposition(|r| r.owner.as_ref() == owner);
            let ready = match mine {
                Some(i) => self.idle.remove(i),
                None if !fresh => {
                    fresh = true;
                    self.start_ready(owner.cloned())?
                }
                None => return None,
            };
            // Said before the launcher has the job, so that the daemon
            // knows whom to kill before any line of the launcher's.
            announce(&fds[0], ready.pid);
            match control::send(&ready.control, &message, borrowed) {
                Ok(()) => {
                    let pid = ready.pid;
                    self.busy.push(ready);
                    return Some(pid);
                }
                // It died or hangs: never mind it (it is reaped, or
                // killed if it stopped), try the next.
                Err(_) => {
                    let _ = kill(ready.pid, Signal::SIGKILL);
                }
            }
        }
    }

    /// Starts a ready launcher.
    fn start_ready(&mut self, owner: Option<Credentials>) -> Option<Ready> {
        let (ours, theirs) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .ok()?;
        let mut argv = vec![
            CString::from(c"tailkitd-launch"),
            CString::from(c"ready"),
            CString::new(self.parent.as_raw().to_string()).ok()?,
        ];
        if let Some(dir) = &self.cgroups {
            argv.push(CString::from(c"--cgroup"));
            argv.push(CString::new(dir.as_os_str().as_bytes()).ok()?);
        }
        let spawned = self.spawn(&self.this, &argv, &[], |actions| {
            actions.add_dup2(theirs.as_raw_fd(), 0)?;
            actions.add_open(1, "/dev/null", OFlag::O_WRONLY, Mode::empty())
        });
        match spawned {
            Ok(pid) => {
                self.all.insert(pid.as_raw());
                Some(Ready {
                    pid,
                    control: ours,
                    owner,
                    since: Instant::now(),
                })
            }
            Err(e) => {
                eprintln!("tailkitd-launch serve: {e}");
                None
            }
        }
    }

    /// Starts a launcher for this one job: the status socket as stdin, the
    /// output pipes as stdout and stderr, in the job's working directory.
    fn start_for(&self, request: &JobRequest, fds: &[OwnedFd; 3]) -> Result<Pid, Status> {
        let c =
            |s: &str| CString::new(s).map_err(|_| Status::Error("an argument contains NUL".into()));
        let mut argv = vec![CString::from(c"tailkitd-launch")];
        if let Some(creds) = &request.credentials {
            argv.push(CString::from(c"--as"));
            argv.push(c(&creds.to_arg())?);
        }
        argv.push(c(&self.parent.as_raw().to_string())?);
        argv.push(c(&request.program)?);
        for a in &request.argv {
            argv.push(c(a)?);
        }
        let env = request
            .env
            .iter()
            .map(|e| c(e))
            .collect::<Result<Vec<_>, _>>()?;
        in_workdir(request.workdir.as_deref(), || {
            self.spawn(&self.program, &argv, &env, |actions| {
                for (fd, target) in fds.iter().zip(0..) {
                    actions.add_dup2(fd.as_raw_fd(), target)?;
                }
                Ok(())
            })
        })
    }

    /// `posix_spawn` of the launcher in a process group of its own, with
    /// every signal at its default disposition, an empty mask, and the
    /// commands' limit of open files.
    fn spawn(
        &self,
        path: &Path,
        argv: &[CString],
        env: &[CString],
        actions: impl FnOnce(&mut PosixSpawnFileActions) -> nix::Result<()>,
    ) -> Result<Pid, Status> {
        let setup = |e: Errno| Status::Error(format!("posix_spawn setup: {e}"));
        let program = CString::new(path.as_os_str().as_bytes())
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
        let mut file_actions = PosixSpawnFileActions::init().map_err(setup)?;
        actions(&mut file_actions).map_err(setup)?;
        with_nofile(self.nofile, || {
            posix_spawn(program.as_c_str(), &file_actions, &attr, argv, env)
                .map_err(|e| Status::Error(format!("starting {}: {e}", path.display())))
        })
    }

    /// Whether `pid` is one of these launchers.
    pub fn contains(&self, pid: i32) -> bool {
        self.all.contains(&pid)
    }

    /// Launcher `pid` was reaped: forgets it; returns whether it was one.
    pub fn ended(&mut self, pid: i32) -> bool {
        self.idle.retain(|r| r.pid.as_raw() != pid);
        self.busy.retain(|r| r.pid.as_raw() != pid);
        self.all.remove(&pid)
    }

    /// Every launcher's pid.
    pub fn pids(&self) -> impl Iterator<Item = i32> + '_ {
        self.all.iter().copied()
    }

    /// The ready launchers running a job, whose `ready` is awaited: their
    /// pids and control sockets.
    pub fn busy(&self) -> impl Iterator<Item = (i32, BorrowedFd<'_>)> {
        self.busy
            .iter()
            .map(|r| (r.pid.as_raw(), r.control.as_fd()))
    }

    /// The busy launchers `pids` said something (`ready`, or the end of
    /// their control socket: they exited). A pid no longer busy (reaped
    /// since) is passed over.
    pub fn answered(&mut self, pids: &[i32]) {
        let now = Instant::now();
        let mut buf = [0u8; 16];
        for pid in pids {
            let Some(i) = self.busy.iter().position(|r| r.pid.as_raw() == *pid) else {
                continue;
            };
            let ready = self.busy.swap_remove(i);
            let said =
                rustix::net::recv(&ready.control, &mut buf, rustix::net::RecvFlags::DONTWAIT);
            match said {
                Ok((n, _)) if &buf[..n] == b"ready" && self.idle.len() < MAX_IDLE => {
                    self.idle.push(Ready {
                        since: now,
                        ..ready
                    });
                }
                // Nothing yet (a spurious wake-up): still busy.
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => self.busy.push(ready),
                // Too many idle, or it is gone: dropping the socket lets
                // it go.
                _ => {}
            }
        }
    }

    /// Lets go of the idle launchers (but one) idle for [`IDLE_LIMIT`];
    /// returns when to call this again, if ever.
    pub fn tidy(&mut self, now: Instant) -> Option<Instant> {
        // The most recently idle is the last: the oldest go first.
        while self.idle.len() > 1 && now >= self.idle[0].since + IDLE_LIMIT {
            self.idle.remove(0);
        }
        (self.idle.len() > 1).then(|| self.idle[0].since + IDLE_LIMIT)
    }

    /// Lets go of every ready launcher (at exit; those with a job get the
    /// parent-death signal and sweep); returns the pids of the idle ones,
    /// which exit at once.
    pub fn clear(&mut self) -> Vec<i32> {
        self.busy.clear();
        self.idle.drain(..).map(|r| r.pid.as_raw()).collect()
    }
}

/// Whether `a` and `b` are the same file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Runs `spawn` in `workdir` (if any), then goes back to `/`.
pub fn in_workdir<T>(
    workdir: Option<&str>,
    spawn: impl FnOnce() -> Result<T, Status>,
) -> Result<T, Status> {
    if let Some(dir) = workdir {
        nix::unistd::chdir(Path::new(dir)).map_err(|e| Status::SpawnError {
            errno: e as i32,
            message: format!("working directory {dir}: {}", e.desc()),
        })?;
    }
    let result = spawn();
    if workdir.is_some() {
        let _ = nix::unistd::chdir("/");
    }
    result
}

/// Runs `spawn` with `nofile` (if any) as the soft limit of open files,
/// then restores the limit.
pub fn with_nofile<T>(nofile: Option<u64>, spawn: impl FnOnce() -> T) -> T {
    let restore = nofile.and_then(set_soft_nofile);
    let result = spawn();
    if let Some(limit) = restore {
        let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, limit);
    }
    result
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

/// Says `launcher PID` on a job's status socket (a later line for the same
/// job, after a launcher that could not take it, names the one that did).
fn announce(status: impl AsFd, pid: Pid) {
    let line = format!("{}\n", Status::Launcher(pid.as_raw()));
    let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
    let _ = rustix::net::send(status, line.as_bytes(), flags);
}
