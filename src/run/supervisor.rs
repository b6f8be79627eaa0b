//! The daemon's side of the supervisors (`tailkitd-launch serve`): a small
//! pool of them, the first started on the first job, from the [spawner
//! thread](super::spawn) with `posix_spawn` (every signal at its default
//! disposition, an empty mask and environment, its own process group,
//! only a `SOCK_SEQPACKET` control socket as stdin); one that died is
//! replaced when needed. Each job is one message on a supervisor's control
//! socket ([`JobRequest`], then the job's status socket end and output
//! pipe write ends by `SCM_RIGHTS`); the per-job protocol then runs on the
//! status socket, with the job's launcher.
//!
//! Also here: where job cgroups go ([`CgroupSetting`]), and the reaper of
//! a daemon that is a child subreaper ([`reap_adopted`]).

use std::collections::HashSet;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tailkitd_launch::{Hello, JobRequest, LAUNCHER_NAME, cgroup_dir_of, proc_stat};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

use super::spawn::run_on_spawner_thread;

/// How long a new supervisor may take to say hello.
const HELLO_LIMIT: Duration = Duration::from_secs(10);

/// Where job cgroups are made (`cgroup` setting).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CgroupSetting {
    /// Under the daemon's own cgroup v2 directory, if it can write there;
    /// else no job cgroups (a launcher per job).
    #[default]
    Auto,
    /// No job cgroups: a launcher per job.
    Off,
    /// Under this cgroup v2 directory.
    Path(PathBuf),
}

impl CgroupSetting {
    /// Parses `auto`, `off` or an absolute path.
    ///
    /// # Errors
    ///
    /// Anything else.
    pub fn parse(text: &str) -> Result<CgroupSetting, String> {
        match text {
            "auto" => Ok(CgroupSetting::Auto),
            "off" => Ok(CgroupSetting::Off),
            p if p.starts_with('/') => Ok(CgroupSetting::Path(PathBuf::from(p))),
            other => Err(format!(
                "{other:?} is not auto, off or an absolute cgroup v2 directory"
            )),
        }
    }

    /// The base directory for job cgroups, or why there is none.
    ///
    /// # Errors
    ///
    /// `Off`, or (`Auto`) no writable cgroup v2 directory of our own, or
    /// (`Path`) a directory that is not a writable cgroup v2 directory.
    pub fn resolve(&self) -> Result<PathBuf, String> {
        let dir = match self {
            CgroupSetting::Off => return Err("job cgroups are off".into()),
            CgroupSetting::Auto => cgroup_dir_of("self")
                .ok_or("this process is in no cgroup v2 hierarchy it can see")?,
            CgroupSetting::Path(p) => p.clone(),
        };
        check_cgroup_dir(&dir)?;
        Ok(dir)
    }
}

/// Whether `dir` is a cgroup v2 directory this process may create
/// cgroups in.
///
/// # Errors
///
/// Says what is wrong.
pub fn check_cgroup_dir(dir: &Path) -> Result<(), String> {
    use nix::unistd::{AccessFlags, access};
    let procs = dir.join("cgroup.procs");
    if !procs.exists() {
        return Err(format!("{} is not a cgroup v2 directory", dir.display()));
    }
    access(dir, AccessFlags::W_OK)
        .and_then(|()| access(&procs, AccessFlags::W_OK))
        .map_err(|e| format!("{} is not writable: {e}", dir.display()))
}

/// What the supervisor is started with.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    /// The `tailkitd-launch` executable.
    pub program: PathBuf,
    /// The per-job launcher of jobs without a cgroup.
    pub launcher: PathBuf,
    /// Where job cgroups go.
    pub cgroup: CgroupSetting,
    /// The soft limit of open files commands get (`None`: as the
    /// supervisor has it).
    pub nofile: Option<u64>,
}

/// At most this many supervisor processes share the jobs: each one
/// starts one job at a time (`posix_spawn` returns only once the new
/// process has called `execve`, which on a busy machine waits for a CPU),
/// so several let jobs start side by side. One per CPU, between 2 and 4.
fn pool_size() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

/// Starts jobs through a small pool of supervisor processes: the first
/// started with the first job, more (up to one per CPU, 2 to 4) in the
/// background while every one already holds jobs. Each job goes to the
/// supervisor with the fewest jobs.
#[derive(Debug)]
pub struct Supervisor {
    settings: SupervisorSettings,
    pool: Arc<Pool>,
}

#[derive(Debug)]
struct Pool {
    size: usize,
    instances: Mutex<Vec<Arc<Instance>>>,
    /// Held while a supervisor starts, so that one starts at a time.
    starting: tokio::sync::Mutex<()>,
    /// A supervisor is being started in the background.
    growing: AtomicBool,
}

/// One supervisor process.
#[derive(Debug)]
pub struct Instance {
    pid: Pid,
    /// The control socket (`SOCK_SEQPACKET`). tokio has no type for one
    /// and its `AsyncFd` needs a raw-descriptor type of our own; a
    /// `UnixDatagram` over it carries the readiness (it only wraps the
    /// descriptor), and the messages go through rustix.
    control: UnixDatagram,
    /// Its job cgroups' directory, if it makes job cgroups.
    cgroups: Option<PathBuf>,
    dead: AtomicBool,
    pidfd: Option<OwnedFd>,
    /// Its jobs not over yet.
    active: AtomicUsize,
}

/// A job handed to a supervisor (counted as one of its jobs until
/// dropped).
#[derive(Debug)]
pub struct Submitted {
    /// The supervisor that has it.
    pub instance: Arc<Instance>,
}

impl Drop for Submitted {
    fn drop(&mut self) {
        self.instance.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Instance {
    /// The directory of job cgroup `name` (from the job's `cgroup NAME`
    /// status line), if this supervisor makes job cgroups and `name` can
    /// be one.
    pub fn cgroup(&self, name: &str) -> Option<PathBuf> {
        let dir = self.cgroups.as_ref()?;
        tailkitd_launch::valid_job_name(name).then(|| dir.join(name))
    }

    /// Whether the supervisor process is gone (or was given up on).
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }

    /// Whether the supervisor process has exited (checked now, in /proc).
    pub fn exited(&self) -> bool {
        self.is_dead() || proc_stat(self.pid.as_raw()).is_none_or(|p| p.state == 'Z')
    }

    /// SIGKILLs the supervisor (it stopped answering): every job it holds
    /// fails, and the next job goes to another one.
    pub fn kill(&self) {
        if !self.dead.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                pid = self.pid.as_raw(),
                "killing the supervisor, which stopped answering"
            );
            match &self.pidfd {
                Some(fd) => {
                    let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
                }
                None => {
                    let _ = kill(self.pid, Signal::SIGKILL);
                }
            }
        }
    }
}

impl Supervisor {
    /// Supervisors started with `settings` when jobs come.
    pub fn new(settings: SupervisorSettings) -> Self {
        Supervisor {
            settings,
            pool: Arc::new(Pool {
                size: pool_size(),
                instances: Mutex::new(Vec::new()),
                starting: tokio::sync::Mutex::new(()),
                growing: AtomicBool::new(false),
            }),
        }
    }

    /// Hands `request` with the job's status socket end and output pipe
    /// write ends to a supervisor, starting one if none runs. The
    /// descriptors are closed on return.
    ///
    /// # Errors
    ///
    /// When no supervisor can be started, or the job cannot be sent (a
    /// command line too long for one message, for one).
    pub async fn submit(&self, request: JobRequest, fds: [OwnedFd; 3]) -> io::Result<Submitted> {
        let message = serde_json::to_vec(&request).map_err(io::Error::other)?;
        for attempt in 0..2 {
            let instance = self.instance().await?;
            match send_job(&instance, &message, &fds).await {
                Ok(()) => {
                    instance.active.fetch_add(1, Ordering::Relaxed);
                    return Ok(Submitted { instance });
                }
                // It died since: once more, with another one.
                Err(e) if attempt == 0 && is_gone(&e) => {
                    instance.dead.store(true, Ordering::Relaxed)
                }
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    return Err(io::Error::other(format!(
                        "the command line and environment are too long ({} bytes)",
                        message.len()
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("the supervisor died twice in a row"))
    }

    /// The running supervisor with the fewest jobs; one is started if
    /// none runs, and another in the background if every one is busy
    /// and the pool is not full.
    async fn instance(&self) -> io::Result<Arc<Instance>> {
        if let Some(instance) = self.pool.least_busy(&self.settings) {
            return Ok(instance);
        }
        let _starting = self.pool.starting.lock().await;
        if let Some(instance) = self.pool.least_busy(&self.settings) {
            return Ok(instance);
        }
        let instance = start(&self.settings).await?;
        self.pool.add(instance.clone());
        Ok(instance)
    }
}

impl Pool {
    /// The live supervisor with the fewest jobs (forgetting dead ones);
    /// starts another in the background if it has jobs and there is
    /// room for one.
    fn least_busy(self: &Arc<Self>, settings: &SupervisorSettings) -> Option<Arc<Instance>> {
        let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        instances.retain(|i| !i.is_dead());
        let best = instances
            .iter()
            .min_by_key(|i| i.active.load(Ordering::Relaxed))?
            .clone();
        if best.active.load(Ordering::Relaxed) > 0
            && instances.len() < self.size
            && !self.growing.swap(true, Ordering::Relaxed)
        {
            let (pool, settings) = (self.clone(), settings.clone());
            tokio::spawn(async move {
                let _starting = pool.starting.lock().await;
                match start(&settings).await {
                    Ok(instance) => pool.add(instance),
                    Err(e) => tracing::warn!(error = %e, "could not start another supervisor"),
                }
                pool.growing.store(false, Ordering::Relaxed);
            });
        }
        Some(best)
    }

    fn add(&self, instance: Arc<Instance>) {
        let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        instances.retain(|i| !i.is_dead());
        if instances.len() < self.size {
            instances.push(instance);
        }
    }
}

/// Starts one supervisor process and waits for its hello.
async fn start(settings: &SupervisorSettings) -> io::Result<Arc<Instance>> {
    let cgroup = match settings.cgroup.resolve() {
        Ok(dir) => Some(dir),
        Err(reason) => {
            if settings.cgroup != CgroupSetting::Off {
                tracing::warn!(
                    reason,
                    "no job cgroups: every job gets a launcher of its own"
                );
            }
            None
        }
    };
    let (ours, theirs) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
        None,
    )?;
    let owned = settings.clone();
    let pid = run_on_spawner_thread(move || spawn_supervisor(&owned, cgroup, theirs)).await??;
    registry().insert(pid.as_raw());
    let pidfd = rustix::process::Pid::from_raw(pid.as_raw())
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    let control = UnixDatagram::from_std(std::os::unix::net::UnixDatagram::from(ours))?;
    let hello = match tokio::time::timeout(HELLO_LIMIT, receive_hello(&control)).await {
        Ok(Ok(hello)) => hello,
        failed => {
            let _ = kill(pid, Signal::SIGKILL);
            reap_in_background(pid, None);
            return Err(io::Error::other(match failed {
                Ok(Err(e)) => {
                    format!("the supervisor ({LAUNCHER_NAME} serve) failed to start: {e}")
                }
                _ => format!("the supervisor ({LAUNCHER_NAME} serve) did not start in time"),
            }));
        }
    };
    if let Some(reason) = &hello.fallback_reason {
        tracing::warn!(
            reason,
            "job cgroups cannot be used: every job gets a launcher of its own"
        );
    }
    tracing::debug!(pid = hello.pid, cgroups = ?hello.cgroup, "supervisor started");
    let instance = Arc::new(Instance {
        pid,
        control,
        cgroups: hello.cgroup.map(PathBuf::from),
        dead: AtomicBool::new(false),
        pidfd,
        active: AtomicUsize::new(0),
    });
    reap_in_background(pid, Some(Arc::downgrade(&instance)));
    Ok(instance)
}

/// Whether a send failed because the supervisor is gone.
fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ECONNREFUSED | libc::ENOTCONN)
    )
}

async fn receive_hello(control: &UnixDatagram) -> io::Result<Hello> {
    let mut buf = vec![0u8; 64 << 10];
    let n = control.recv(&mut buf).await?;
    if n == 0 {
        return Err(io::Error::other("it exited at once"));
    }
    serde_json::from_slice(&buf[..n]).map_err(io::Error::other)
}

async fn send_job(instance: &Instance, message: &[u8], fds: &[OwnedFd; 3]) -> io::Result<()> {
    if instance.is_dead() {
        return Err(io::Error::from_raw_os_error(libc::EPIPE));
    }
    let borrowed = [fds[0].as_fd(), fds[1].as_fd(), fds[2].as_fd()];
    let control = &instance.control;
    loop {
        control.writable().await?;
        let sent = control.try_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(3))];
            let mut ancillary = SendAncillaryBuffer::new(&mut space);
            ancillary.push(SendAncillaryMessage::ScmRights(&borrowed));
            rustix::net::sendmsg(
                control,
                &[IoSlice::new(message)],
                &mut ancillary,
                SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Starts `tailkitd-launch serve` (on the spawner thread), with `control`
/// as its stdin and no other descriptor but stdout (`/dev/null`) and
/// stderr (the daemon's, for its few messages).
fn spawn_supervisor(
    settings: &SupervisorSettings,
    cgroup: Option<PathBuf>,
    control: OwnedFd,
) -> io::Result<Pid> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |s: &[u8]| CString::new(s).map_err(io::Error::other);
    let mut argv = vec![
        c(LAUNCHER_NAME.as_bytes())?,
        c(b"serve")?,
        c(std::process::id().to_string().as_bytes())?,
        c(b"--launcher")?,
        c(settings.launcher.as_os_str().as_bytes())?,
    ];
    if let Some(dir) = &cgroup {
        argv.push(c(b"--cgroup")?);
        argv.push(c(dir.as_os_str().as_bytes())?);
    }
    if let Some(n) = settings.nofile {
        argv.push(c(b"--nofile")?);
        argv.push(c(n.to_string().as_bytes())?);
    }
    let program = c(settings.program.as_os_str().as_bytes())?;
    let mut attr = PosixSpawnAttr::init()?;
    attr.set_sigmask(&SigSet::empty())?;
    attr.set_sigdefault(&SigSet::all())?;
    attr.set_pgroup(Pid::from_raw(0))?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF
            | PosixSpawnFlags::POSIX_SPAWN_SETPGROUP,
    )?;
    let mut actions = PosixSpawnFileActions::init()?;
    actions.add_dup2(control.as_raw_fd(), 0)?;
    actions.add_open(1, "/dev/null", OFlag::O_WRONLY, Mode::empty())?;
    // Whoever started the daemon may have leaked descriptors without
    // close-on-exec: none of them reaches the supervisor.
    for fd in open_fds().into_iter().filter(|fd| *fd > 2) {
        actions.add_close(fd)?;
    }
    let env: [CString; 0] = [];
    let pid = posix_spawn(program.as_c_str(), &actions, &attr, &argv, &env)
        .map_err(|e| io::Error::other(format!("starting {}: {e}", settings.program.display())))?;
    Ok(pid)
}

fn open_fds() -> Vec<i32> {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits for supervisor `pid` to exit on a thread of its own (killing it
/// if it is stopped), reaps it and marks it dead (the next job then goes
/// to another).
fn reap_in_background(pid: Pid, instance: Option<Weak<Instance>>) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let reap = move || {
        let status = loop {
            match waitpid(pid, Some(WaitPidFlag::WUNTRACED)) {
                // A stopped supervisor would hold its jobs and take new
                // ones without starting them: it is killed (its launchers
                // then kill their jobs), and the next job goes to another.
                Ok(WaitStatus::Stopped(..)) => {
                    tracing::warn!(pid = pid.as_raw(), "the supervisor was stopped; killing it");
                    let _ = kill(pid, Signal::SIGKILL);
                }
                Err(nix::errno::Errno::EINTR) => {}
                other => break other,
            }
        };
        registry().remove(pid.as_raw());
        if let Some(instance) = instance.and_then(|w| w.upgrade()) {
            instance.dead.store(true, Ordering::Relaxed);
        }
        tracing::debug!(pid = pid.as_raw(), ?status, "the supervisor exited");
    };
    let spawned = std::thread::Builder::new()
        .name("tailkitd-supervisor-reaper".into())
        .spawn(reap);
    if let Err(e) = spawned {
        tracing::error!(error = %e, "no thread to reap the supervisor with");
    }
}

/// The pids of this process's live supervisors.
struct Registry(Mutex<HashSet<i32>>);

impl Registry {
    fn insert(&self, pid: i32) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(pid);
    }
    fn remove(&self, pid: i32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    }
    fn contains(&self, pid: i32) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&pid)
    }
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry(Mutex::new(HashSet::new())))
}

/// For a daemon that is a child subreaper (`tailkitd run`): SIGKILLs and
/// reaps every child of this process that is not one of its supervisors
/// (a process adopted because its parent died: a command whose supervisor
/// was killed), and SIGKILLs a supervisor that was stopped (it would hold
/// every job). Call it on each SIGCHLD. Leaves alone the children that a
/// `tokio::process` or `std::process` of this process started, as long as
/// they are reaped by pid; `tailkitd run` starts none besides.
pub fn reap_adopted() {
    let me = std::process::id();
    let supervisors = registry();
    for pid in children_of(me) {
        let Some(stat) = proc_stat(pid) else { continue };
        if supervisors.contains(pid) {
            if matches!(stat.state, 'T' | 't') {
                tracing::warn!(pid, "the supervisor was stopped; killing it");
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            continue;
        }
        if stat.state != 'Z' {
            tracing::warn!(pid, "killing a process adopted from a dead supervisor");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = nix::sys::wait::waitpid(
            Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
    }
}

/// The children of every thread of process `pid`.
fn children_of(pid: u32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_settings_parse() {
        assert_eq!(CgroupSetting::parse("auto"), Ok(CgroupSetting::Auto));
        assert_eq!(CgroupSetting::parse("off"), Ok(CgroupSetting::Off));
        assert_eq!(
            CgroupSetting::parse("/sys/fs/cgroup/x"),
            Ok(CgroupSetting::Path("/sys/fs/cgroup/x".into()))
        );
        assert!(CgroupSetting::parse("relative").is_err());
        assert!(CgroupSetting::Off.resolve().is_err());
        assert!(
            CgroupSetting::Path("/tmp".into())
                .resolve()
                .unwrap_err()
                .contains("not a cgroup v2 directory")
        );
    }
}
