//! The launcher: a tiny supervisor the daemon starts instead of the command
//! itself (`tailkitd-launch DAEMON_PID PROGRAM ARGV0 ARGS...`), so that
//! nothing a command started outlives a daemon killed with SIGKILL, without
//! any `unsafe` `pre_exec` hook.
//!
//! It is its own small executable, installed next to `tailkitd`
//! ([`LAUNCHER_NAME`]), not a subcommand of `tailkitd`: the `tailkitd`
//! binary links the Go runtime, which starts several threads (about 20 MiB
//! resident) in every process that loads it, before `main`, and those
//! threads would also receive the signals meant for the command.
//!
//! The daemon forks the launcher from one long-lived spawner thread into a
//! new process group, with the clean environment, stdin `/dev/null` and the
//! output pipes. The launcher then:
//!
//! 1. blocks the catchable signals it must not die of (they are meant for the
//!    command: the daemon signals the whole group) and reads them with
//!    `sigwait` instead of handlers;
//! 2. asks for `SIGTERM` when its parent thread dies (`PR_SET_PDEATHSIG`)
//!    and exits at once if the daemon is already gone;
//! 3. starts the program with exactly the argv the tool file gave (argv\[0\]
//!    included) in the same group, through `posix_spawn` with an empty
//!    signal mask, default signal dispositions, and every descriptor but
//!    0, 1 and 2 closed;
//! 4. waits: when the program exits it exits the same way (same code, or
//!    re-raises the same signal), so the daemon sees the command's status;
//!    when the parent-death signal comes (its parent pid changed) it
//!    SIGKILLs its whole process group: the command and every descendant
//!    that stayed in the group.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::prctl;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SigSet, Signal, killpg, raise};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getpgrp, getppid};

/// The launcher's file name; the daemon looks for it next to itself.
pub const LAUNCHER_NAME: &str = "tailkitd-launch";

/// Exit code of a launcher that could not even start the program (bad
/// invocation, or the daemon died before the program started).
const LAUNCH_FAILED: i32 = 125;
/// Exit code when the program could not be executed, as a shell reports it.
const EXEC_FAILED: i32 = 127;

/// The launcher's `main`: runs it with this process's arguments and
/// returns the exit code to exit with (the command's own, or 125 when the
/// command could not be started at all).
pub fn main_from_args() -> i32 {
    launch(std::env::args_os().skip(1).collect())
}

/// Signals the launcher reads with `sigwait` instead of dying of them.
fn blocked_signals() -> SigSet {
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

fn launch(args: Vec<OsString>) -> i32 {
    let [daemon_pid, program, argv0, rest @ ..] = args.as_slice() else {
        eprintln!("{LAUNCHER_NAME}: usage: DAEMON_PID PROGRAM ARGV0 [ARGS...]");
        return LAUNCH_FAILED;
    };
    let Some(daemon_pid) = daemon_pid.to_str().and_then(|p| p.parse::<i32>().ok()) else {
        eprintln!("{LAUNCHER_NAME}: bad daemon pid");
        return LAUNCH_FAILED;
    };
    let signals = blocked_signals();
    if let Err(e) = signals.thread_block() {
        eprintln!("{LAUNCHER_NAME}: cannot block signals: {e}");
        return LAUNCH_FAILED;
    }
    if let Err(e) = prctl::set_pdeathsig(Signal::SIGTERM) {
        eprintln!("{LAUNCHER_NAME}: cannot set the parent-death signal: {e}");
        return LAUNCH_FAILED;
    }
    // The daemon may have died between fork and prctl: then the signal will
    // never come, and nothing must start.
    if getppid().as_raw() != daemon_pid {
        return LAUNCH_FAILED;
    }
    let child = match spawn_program(program, argv0, rest, &signals) {
        Ok(pid) => pid,
        Err(e) => {
            eprintln!(
                "tailkitd: could not start {}: {e}",
                program.to_string_lossy()
            );
            return EXEC_FAILED;
        }
    };
    loop {
        let Ok(signal) = signals.wait() else { continue };
        match signal {
            Signal::SIGCHLD => match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return code,
                Ok(WaitStatus::Signaled(_, signal, _)) => return exit_by(signal),
                Ok(_) => {}
                Err(_) => return LAUNCH_FAILED,
            },
            Signal::SIGTERM if getppid().as_raw() != daemon_pid => {
                // The daemon is gone: take the whole group down, us included.
                let _ = killpg(getpgrp(), Signal::SIGKILL);
            }
            // Signals sent to the whole group are for the command.
            _ => {}
        }
    }
}

/// Starts the program with `posix_spawn`: in this process group, with this
/// environment, with an empty signal mask and default dispositions for the
/// signals the launcher blocks or ignores (std's `Command` would pass the
/// launcher's blocked mask on).
fn spawn_program(
    program: &OsStr,
    argv0: &OsStr,
    rest: &[OsString],
    blocked: &SigSet,
) -> Result<Pid, String> {
    let c =
        |s: &OsStr| CString::new(s.as_bytes()).map_err(|_| "an argument contains NUL".to_string());
    let path = c(program)?;
    let argv = std::iter::once(argv0)
        .chain(rest.iter().map(OsString::as_os_str))
        .map(c)
        .collect::<Result<Vec<_>, _>>()?;
    let envp = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            c(&kv)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut attr = PosixSpawnAttr::init().map_err(|e| e.to_string())?;
    attr.set_sigmask(&SigSet::empty())
        .map_err(|e| e.to_string())?;
    let mut defaults = *blocked;
    defaults.add(Signal::SIGPIPE);
    attr.set_sigdefault(&defaults).map_err(|e| e.to_string())?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )
    .map_err(|e| e.to_string())?;
    // Only stdin, stdout and stderr reach the command, even if whoever
    // started the daemon leaked a descriptor without close-on-exec.
    let mut actions = PosixSpawnFileActions::init().map_err(|e| e.to_string())?;
    for fd in open_fds().into_iter().filter(|fd| *fd > 2) {
        actions.add_close(fd).map_err(|e| e.to_string())?;
    }
    posix_spawn(path.as_c_str(), &actions, &attr, &argv, &envp).map_err(|e| e.desc().to_string())
}

/// The descriptors open in this process (the one used to list them is
/// closed again by then; closing it in the child is harmless).
fn open_fds() -> Vec<i32> {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Ends the launcher by the signal that ended the program (without a core
/// dump of the launcher), so the daemon sees the same status.
fn exit_by(signal: Signal) -> i32 {
    let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
    let _ = SigSet::from(signal).thread_unblock();
    let _ = raise(signal);
    // Still alive: the signal is ignored here (SIGPIPE under Rust's runtime).
    128 + signal as i32
}
