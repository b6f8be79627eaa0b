//! The launcher: a tiny supervisor the daemon starts instead of the command
//! itself (`tailkitd __launch DAEMON_PID PROGRAM ARGV0 ARGS...`), so that
//! nothing a command started outlives a daemon killed with SIGKILL, without
//! any `unsafe` `pre_exec` hook.
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
//!    included; std resets the signal mask in the child), in its own group;
//! 4. waits: when the program exits it exits the same way (same code, or
//!    re-raises the same signal), so the daemon sees the command's status;
//!    when the parent-death signal comes (its parent pid changed) it
//!    SIGKILLs its whole process group: the command and every descendant
//!    that stayed in the group.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::ExitStatus;

use nix::sys::prctl;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SigSet, Signal, killpg, raise};
use nix::unistd::{getpgrp, getppid};

/// The hidden subcommand that runs the launcher.
pub const LAUNCH_SUBCOMMAND: &str = "__launch";

/// Exit code of a launcher that could not even start the program (bad
/// invocation, or the daemon died before the program started).
const LAUNCH_FAILED: i32 = 125;
/// Exit code when the program could not be executed, as a shell reports it.
const EXEC_FAILED: i32 = 127;

/// Runs the launcher and exits if this process was started as one
/// (`argv[1]` is [`LAUNCH_SUBCOMMAND`]); returns otherwise. Call it first
/// thing in `main`, before any runtime or thread starts.
pub fn run_if_requested() {
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == LAUNCH_SUBCOMMAND) {
        std::process::exit(launch(args.collect()));
    }
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
        eprintln!("tailkitd {LAUNCH_SUBCOMMAND}: usage: DAEMON_PID PROGRAM ARGV0 [ARGS...]");
        return LAUNCH_FAILED;
    };
    let Some(daemon_pid) = daemon_pid.to_str().and_then(|p| p.parse::<i32>().ok()) else {
        eprintln!("tailkitd {LAUNCH_SUBCOMMAND}: bad daemon pid");
        return LAUNCH_FAILED;
    };
    let signals = blocked_signals();
    if let Err(e) = signals.thread_block() {
        eprintln!("tailkitd {LAUNCH_SUBCOMMAND}: cannot block signals: {e}");
        return LAUNCH_FAILED;
    }
    if let Err(e) = prctl::set_pdeathsig(Signal::SIGTERM) {
        eprintln!("tailkitd {LAUNCH_SUBCOMMAND}: cannot set the parent-death signal: {e}");
        return LAUNCH_FAILED;
    }
    // The daemon may have died between fork and prctl: then the signal will
    // never come, and nothing must start.
    if getppid().as_raw() != daemon_pid {
        return LAUNCH_FAILED;
    }
    let mut child = match std::process::Command::new(program)
        .arg0(argv0)
        .args(rest)
        .spawn()
    {
        Ok(child) => child,
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
            Signal::SIGCHLD => match child.try_wait() {
                Ok(Some(status)) => return exit_like(status),
                Ok(None) => {}
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

/// Ends the launcher the way the program ended: the same exit code, or the
/// same signal (without a core dump of the launcher).
fn exit_like(status: ExitStatus) -> i32 {
    if let Some(code) = status.code() {
        return code;
    }
    let Some(signo) = status.signal() else {
        return LAUNCH_FAILED;
    };
    if let Ok(signal) = Signal::try_from(signo) {
        let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
        let _ = SigSet::from(signal).thread_unblock();
        let _ = raise(signal);
    }
    // Still alive: the signal is ignored here (SIGPIPE under Rust's runtime).
    128 + signo
}
