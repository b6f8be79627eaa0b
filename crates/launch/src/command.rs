//! Starting a command: `posix_spawn` with every signal at its default
//! disposition, an empty signal mask, a process group of its own, stdin
//! `/dev/null` and the job's output pipes as stdout and stderr; directly,
//! or through `tailkitd-launch spawn-as` when the command must run as
//! another user or must not inherit this process's ambient and inheritable
//! capabilities (see [`spawn_as`]).

use std::ffi::{CString, OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::SigSet;
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use tailkitd_launch::{Credentials, Status};

/// Where the command's standard descriptors come from.
pub struct Stdio {
    /// Its stdout (the write end of the job's pipe).
    pub stdout: RawFd,
    /// Its stderr.
    pub stderr: RawFd,
}

/// One command to start.
pub struct CommandSpec<'a> {
    /// The program (an absolute path).
    pub program: &'a OsStr,
    /// Its argv, `argv[0]` included.
    pub argv: &'a [OsString],
    /// Its whole environment.
    pub env: &'a [OsString],
    /// Who it runs as, if not this process's user.
    pub credentials: Option<&'a Credentials>,
}

/// How long `spawn-as` may take to report, before it is given up on.
const SPAWN_AS_LIMIT_MS: u16 = 10_000;

fn c_string(s: &OsStr) -> Result<CString, Status> {
    CString::new(s.as_bytes()).map_err(|_| Status::Error("an argument contains NUL".into()))
}

fn setup(e: Errno) -> Status {
    Status::Error(format!("posix_spawn setup: {e}"))
}

/// Spawn attributes for a command: a new process group it leads, every
/// signal at its default disposition (also those ignored by whoever
/// started the daemon: `SIGTSTP`, `SIGTTOU`...), an empty signal mask.
fn command_attr() -> Result<PosixSpawnAttr, Status> {
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
    Ok(attr)
}

/// `fd` as the child's `target`, unless it already is.
fn put(actions: &mut PosixSpawnFileActions, fd: RawFd, target: RawFd) -> Result<(), Status> {
    if fd != target {
        actions.add_dup2(fd, target).map_err(setup)?;
    }
    Ok(())
}

fn spawn_error(program: &OsStr, e: Errno) -> Status {
    Status::SpawnError {
        errno: e as i32,
        message: format!("{}: {}", Path::new(program).display(), e.desc()),
    }
}

/// Starts `spec` with `stdio`; `close` lists descriptors to close in the
/// child besides the close-on-exec ones (a launcher closes every inherited
/// one). `helper` is this executable, for `spawn-as`, used when `spec`
/// has credentials or `clear_caps` is set (it exits at once, and is to be
/// reaped). Returns the command's pid (it leads its own process group), or
/// the status to report.
pub fn spawn_command(
    spec: &CommandSpec<'_>,
    stdio: &Stdio,
    close: &[RawFd],
    helper: &Path,
    clear_caps: bool,
) -> Result<Pid, Status> {
    if spec.credentials.is_some() || clear_caps {
        return spawn_through_helper(spec, stdio, close, helper);
    }
    let path = c_string(spec.program)?;
    let argv = to_c_strings(spec.argv)?;
    let env = to_c_strings(spec.env)?;
    let attr = command_attr()?;
    let mut actions = PosixSpawnFileActions::init().map_err(setup)?;
    put(&mut actions, stdio.stdout, 1)?;
    put(&mut actions, stdio.stderr, 2)?;
    for fd in close.iter().filter(|fd| **fd > 2) {
        actions.add_close(*fd).map_err(setup)?;
    }
    actions
        .add_open(0, "/dev/null", OFlag::O_RDONLY, Mode::empty())
        .map_err(setup)?;
    posix_spawn(path.as_c_str(), &actions, &attr, &argv, &env)
        .map_err(|e| spawn_error(spec.program, e))
}

fn to_c_strings(items: &[OsString]) -> Result<Vec<CString>, Status> {
    items.iter().map(|s| c_string(s)).collect()
}

/// Starts `tailkitd-launch spawn-as CREDENTIALS PROGRAM ARGV...` with a
/// pipe as its stdin on which it reports the command's start (a
/// [`Status`] line), and waits for that report.
fn spawn_through_helper(
    spec: &CommandSpec<'_>,
    stdio: &Stdio,
    close: &[RawFd],
    helper: &Path,
) -> Result<Pid, Status> {
    let (report_read, report_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| Status::Error(format!("pipe: {e}")))?;
    let helper_path = c_string(helper.as_os_str())?;
    let creds = spec
        .credentials
        .map_or_else(|| "-".to_string(), Credentials::to_arg);
    let mut argv = vec![
        CString::from(c"tailkitd-launch"),
        CString::from(c"spawn-as"),
        c_string(OsStr::new(&creds))?,
        c_string(spec.program)?,
    ];
    argv.extend(to_c_strings(spec.argv)?);
    let env = to_c_strings(spec.env)?;
    // The helper itself keeps the default mask and dispositions too, and
    // its process group (the command gets its own).
    let mut attr = PosixSpawnAttr::init().map_err(setup)?;
    attr.set_sigmask(&SigSet::empty()).map_err(setup)?;
    attr.set_sigdefault(&SigSet::all()).map_err(setup)?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )
    .map_err(setup)?;
    let mut actions = PosixSpawnFileActions::init().map_err(setup)?;
    put(&mut actions, report_write.as_raw_fd(), 0)?;
    put(&mut actions, stdio.stdout, 1)?;
    put(&mut actions, stdio.stderr, 2)?;
    for fd in close.iter().filter(|fd| **fd > 2) {
        actions.add_close(*fd).map_err(setup)?;
    }
    let helper_pid = posix_spawn(helper_path.as_c_str(), &actions, &attr, &argv, &env)
        .map_err(|e| Status::Error(format!("starting {}: {e}", helper.display())))?;
    drop(report_write);
    match read_report(report_read) {
        Some(Status::Started(pid)) if pid > 1 => Ok(Pid::from_raw(pid)),
        Some(status @ (Status::SpawnError { .. } | Status::Error(_))) => Err(status),
        other => {
            let _ = nix::sys::signal::kill(helper_pid, nix::sys::signal::Signal::SIGKILL);
            Err(Status::Error(format!(
                "spawn-as reported {other:?} instead of the command's start"
            )))
        }
    }
}

/// The one status line `spawn-as` writes before it exits.
fn read_report(report: OwnedFd) -> Option<Status> {
    let mut file = std::fs::File::from(report);
    let mut text = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(SPAWN_AS_LIMIT_MS)) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) => return None,
        }
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
        if text.len() > 4096 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&text);
    Status::parse(text.lines().next().unwrap_or(""))
}

/// Whether this process holds ambient or inheritable capabilities, which a
/// command started directly would inherit (an ambient capability survives
/// `execve`): then every command goes through `spawn-as`, which clears
/// both first.
pub fn holds_inheritable_caps() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return true;
    };
    status.lines().any(|l| {
        ["CapInh:", "CapAmb:"].iter().any(|key| {
            l.strip_prefix(key)
                .is_some_and(|v| u64::from_str_radix(v.trim(), 16) != Ok(0))
        })
    })
}

/// `tailkitd-launch spawn-as CREDENTIALS PROGRAM ARGV0 ARGS...`, started
/// with a report pipe as stdin, the job's pipes as stdout and stderr and
/// the command's environment: takes on CREDENTIALS (`UID:GID:GROUPS`, or
/// `-` for this process's own), clears the ambient and inheritable
/// capability sets, starts the command as [`spawn_command`] does (new
/// process group, default dispositions, empty mask, stdin `/dev/null`),
/// reports `started PID` (or why not) on the pipe and exits. The command,
/// orphaned, goes to the nearest subreaper: the supervisor or the job's
/// launcher, which reap it and report its end.
///
/// A helper process rather than an `execve` of the command in place:
/// Rust's runtime ignores `SIGPIPE` before `main`, and without `unsafe`
/// nothing here could give it back its default before an `execve`, while
/// `posix_spawn` does.
pub fn spawn_as(args: &[OsString]) -> i32 {
    let Ok(report) = std::io::stdin().as_fd().try_clone_to_owned() else {
        eprintln!("tailkitd-launch spawn-as: stdin must be the report pipe");
        return 125;
    };
    let mut report = std::fs::File::from(report);
    let status = match args {
        [creds, program, argv @ ..] if !argv.is_empty() => {
            start_as(creds, program, argv).unwrap_or_else(|status| status)
        }
        _ => Status::Error("usage: spawn-as CREDENTIALS PROGRAM ARGV0 [ARGS...]".into()),
    };
    let _ = report.write_all(format!("{status}\n").as_bytes());
    if matches!(status, Status::Started(_)) {
        0
    } else {
        125
    }
}

fn start_as(creds: &OsStr, program: &OsStr, argv: &[OsString]) -> Result<Status, Status> {
    let credentials = match creds.to_str() {
        Some("-") => None,
        Some(text) => Some(
            Credentials::parse_arg(text)
                .ok_or_else(|| Status::Error(format!("bad credentials {text:?}")))?,
        ),
        None => return Err(Status::Error("bad credentials".into())),
    };
    if let Some(c) = &credentials {
        take_on(c).map_err(Status::Error)?;
    }
    clear_inheritable_caps().map_err(Status::Error)?;
    let env: Vec<OsString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            kv
        })
        .collect();
    let spec = CommandSpec {
        program,
        argv,
        env: &env,
        credentials: None,
    };
    // fd 0 is the report pipe: the command gets /dev/null instead.
    let stdio = Stdio {
        stdout: 1,
        stderr: 2,
    };
    let pid = spawn_command(&spec, &stdio, &[], Path::new(""), false)?;
    Ok(Status::Started(pid.as_raw()))
}

/// Takes on `c`: supplementary groups, then group, then user (real,
/// effective and saved), each only if it differs, and checks the result.
fn take_on(c: &Credentials) -> Result<(), String> {
    use rustix::process::{Gid, Uid, getegid, geteuid, getgid, getgroups, getuid};
    use rustix::thread::{set_thread_groups, set_thread_res_gid, set_thread_res_uid};
    let mut want: Vec<u32> = c.groups.clone();
    want.sort_unstable();
    want.dedup();
    let mut have: Vec<u32> = getgroups()
        .map_err(|e| format!("getgroups: {e}"))?
        .iter()
        .map(|g| g.as_raw())
        .collect();
    have.sort_unstable();
    have.dedup();
    if want != have {
        let gids: Vec<Gid> = want.iter().map(|g| Gid::from_raw(*g)).collect();
        set_thread_groups(&gids).map_err(|e| format!("setgroups: {e}"))?;
    }
    let gid = Gid::from_raw(c.gid);
    if getgid() != gid || getegid() != gid {
        set_thread_res_gid(gid, gid, gid).map_err(|e| format!("setresgid {}: {e}", c.gid))?;
    }
    let uid = Uid::from_raw(c.uid);
    if getuid() != uid || geteuid() != uid {
        set_thread_res_uid(uid, uid, uid).map_err(|e| format!("setresuid {}: {e}", c.uid))?;
    }
    if getuid() != uid || geteuid() != uid || getgid() != gid || getegid() != gid {
        return Err(format!("could not become {}:{}", c.uid, c.gid));
    }
    Ok(())
}

/// Empties the ambient and inheritable capability sets, so that the
/// command's `execve` recomputes its capabilities from the file alone
/// (and, for root, the bounding set).
fn clear_inheritable_caps() -> Result<(), String> {
    match rustix::thread::clear_ambient_capability_set() {
        // A kernel without ambient capabilities (before 4.3) has none to clear.
        Ok(()) | Err(rustix::io::Errno::INVAL) => {}
        Err(e) => return Err(format!("clearing the ambient capabilities: {e}")),
    }
    let mut sets = rustix::thread::capabilities(None).map_err(|e| format!("capget: {e}"))?;
    if !sets.inheritable.is_empty() {
        sets.inheritable = rustix::thread::CapabilitySet::empty();
        rustix::thread::set_capabilities(None, sets).map_err(|e| format!("capset: {e}"))?;
    }
    Ok(())
}
