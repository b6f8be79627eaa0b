//! `tailkitd-launch`: where tailkitd's commands are started and contained.
//! Three modes, by the first argument:
//!
//! - `serve ...`: the [supervisor](supervisor), started once by the
//!   daemon, which starts every job (`tailkitd-launch serve PARENT_PID
//!   [--cgroup DIR] [--nofile N] [--launcher PATH]`, the control socket as
//!   stdin);
//! - `spawn-as ...`: the [helper](command::spawn_as) that takes on a
//!   command's user and drops inheritable capabilities before starting it;
//! - anything else: the per-job [launcher](launcher) of a job without a
//!   cgroup.
//!
//! It is its own small executable, installed next to `tailkitd`
//! ([`tailkitd_launch::LAUNCHER_NAME`]), not a subcommand of `tailkitd`:
//! the `tailkitd` binary links the Go runtime, which starts several threads
//! (about 20 MiB resident) in every process that loads it, before `main`;
//! those threads would also receive the signals meant for the supervisor,
//! and no process that has them may fork.
#![forbid(unsafe_code)]

mod cgroup;
mod command;
mod control;
mod launcher;
mod launchers;
mod ready;
mod settings;
mod supervisor;

use std::ffi::OsString;

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let code = match args.first().and_then(|a| a.to_str()) {
        Some("serve") => supervisor::serve(&args[1..]),
        Some("spawn-as") => command::spawn_as(&args[1..]),
        Some("ready") => ready::ready(&args[1..]),
        _ => launcher::run(&args),
    };
    std::process::exit(code);
}
