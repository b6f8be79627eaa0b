//! A clean start: `tailkitd run` (and `demo`, `localnet`) re-executes itself
//! when its environment holds an auth key or one of tsnet's fallbacks, or
//! lacks the knobs a node on a loopback control server needs.
//!
//! Why a re-exec: `/proc/<pid>/environ` shows the environment a process was
//! started with, whatever it does to its environment later, and any process
//! of the same user (a command the daemon runs, unless it runs as another
//! user) can read it. Changing the environment of a running process is no
//! answer either: other threads (the Go runtime's, tokio's) may read it
//! meanwhile. So the process replaces itself (`exec`, same pid, same
//! arguments) with an environment that has none of [`DROPPED_VARS`] and
//! has [`tsnet_bridge::LOOPBACK_CONTROL_ENV`] when the control server is on loopback. The
//! auth key, already read from `TS_AUTHKEY` or a file, goes over a pipe
//! inherited across the exec, named by [`AUTHKEY_FD_VAR`] (`none` when there
//! is no key); the new process reads it to the end and closes it.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};

use tsnet_bridge::{TSNET_FALLBACK_VARS, missing_loopback_env};

use crate::config::Secret;

/// Names the inherited pipe that holds the auth key, in the re-executed
/// process (`none`: no key). Set by tailkitd itself only.
pub const AUTHKEY_FD_VAR: &str = "TAILKITD_AUTHKEY_FD";

/// Dropped from the environment by the re-exec: the auth key and its file,
/// and tsnet's own fallbacks (`TS_AUTH_KEY`, `TS_CONTROL_URL`), which
/// tailkitd's settings replace.
pub const DROPPED_VARS: [&str; 4] = [
    "TS_AUTHKEY",
    "TS_AUTHKEY_FILE",
    TSNET_FALLBACK_VARS[1],
    TSNET_FALLBACK_VARS[2],
];

/// The longest auth key handed over (real ones are under 100 bytes; the
/// pipe must hold it all before the new process reads it).
const MAX_KEY_LEN: usize = 4096;

/// Why the clean start failed.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The pipe for the key could not be made or written.
    #[error("handing the auth key to the re-executed daemon: {0}")]
    Pipe(std::io::Error),
    /// The key is too long to be an auth key.
    #[error("the auth key is {0} bytes long, longer than any auth key (at most {MAX_KEY_LEN})")]
    KeyTooLong(usize),
    /// `exec` failed.
    #[error("re-executing {exe} with a clean environment: {source}")]
    Exec {
        /// What was executed.
        exe: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The handed-over key could not be read.
    #[error("{AUTHKEY_FD_VAR}={value}: {message}")]
    Handoff {
        /// The variable's value.
        value: String,
        /// What went wrong.
        message: String,
    },
}

/// Whether this process was re-executed by [`reexec_if_needed`].
pub fn is_reexecuted() -> bool {
    std::env::var_os(AUTHKEY_FD_VAR).is_some()
}

/// In a process re-executed for `run`: the auth key handed over (`Some(None)`:
/// handed over, there is none). `None` when this process was not
/// re-executed.
///
/// # Errors
///
/// When the variable does not name an inherited pipe, or the key cannot be
/// read.
pub fn take_handed_over_key() -> Result<Option<Option<Secret>>, StartupError> {
    let Some(value) = std::env::var_os(AUTHKEY_FD_VAR) else {
        return Ok(None);
    };
    let value = value.to_string_lossy().into_owned();
    if value == "none" {
        return Ok(Some(None));
    }
    let fail = |message: String| StartupError::Handoff {
        value: value.clone(),
        message,
    };
    let fd: i32 = value
        .parse()
        .map_err(|_| fail("not an fd number; this variable is set by tailkitd itself".into()))?;
    let pipe = tsnet_bridge::adopt_inherited_fd(fd).map_err(|e| fail(e.to_string()))?;
    let mut text = String::new();
    std::fs::File::from(pipe)
        .take(MAX_KEY_LEN as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| fail(format!("reading the key: {e}")))?;
    if text.len() > MAX_KEY_LEN {
        return Err(StartupError::KeyTooLong(text.len()));
    }
    let key = text.trim();
    Ok(Some((!key.is_empty()).then(|| Secret::new(key))))
}

/// What the re-exec must change in `env`: the variables to drop and the
/// knobs to add. Both empty: no re-exec needed.
fn changes(
    env: impl Fn(&str) -> Option<String>,
    loopback_control: bool,
) -> (Vec<&'static str>, Vec<(&'static str, &'static str)>) {
    let drop = DROPPED_VARS
        .into_iter()
        .filter(|v| env(v).is_some())
        .collect();
    let add = if loopback_control {
        missing_loopback_env(&env)
    } else {
        Vec::new()
    };
    (drop, add)
}

/// Re-executes this program, same arguments and pid, when its environment
/// holds any of [`DROPPED_VARS`], or lacks [`tsnet_bridge::LOOPBACK_CONTROL_ENV`] while
/// `loopback_control`; returns only when no re-exec is needed (or this
/// process is one already). `key`: `Some` hands the auth key (or its
/// absence) over to the new process (`run`); `None` hands nothing over
/// (`demo`, `localnet`).
///
/// # Errors
///
/// When the key cannot be handed over or `exec` fails.
pub fn reexec_if_needed(
    key: Option<Option<&Secret>>,
    loopback_control: bool,
) -> Result<(), StartupError> {
    if is_reexecuted() {
        return Ok(());
    }
    let (drop, add) = changes(
        |k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()),
        loopback_control,
    );
    if drop.is_empty() && add.is_empty() {
        return Ok(());
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| OsString::from("tailkitd"));
    // This program by its path (so that its process keeps its name; exec
    // of /proc/self/exe would name it "exe"), or /proc/self/exe when the
    // file is gone.
    let exe = std::env::current_exe()
        .ok()
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "/proc/self/exe".into());
    let mut argv = vec![arg0];
    argv.extend(args);
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !DROPPED_VARS.contains(&k.as_ref())
                && !add.iter().any(|(a, _)| *a == k)
                && k != AUTHKEY_FD_VAR
        })
        .collect();
    env.extend(add.iter().map(|(k, v)| (k.into(), v.into())));
    // Kept alive until exec: the read end must be open when it happens.
    let _pipe: Option<OwnedFd> = match key {
        None => None,
        Some(None) => {
            env.push((AUTHKEY_FD_VAR.into(), "none".into()));
            None
        }
        Some(Some(key)) => {
            let read = key_pipe(key.expose())?;
            env.push((AUTHKEY_FD_VAR.into(), read.as_raw_fd().to_string().into()));
            Some(read)
        }
    };
    // Through the bridge, not std's exec: it also restores the soft
    // RLIMIT_NOFILE the Go runtime raised in this process.
    let source = tsnet_bridge::exec(&exe, &argv, &env);
    Err(StartupError::Exec {
        exe: exe.display().to_string(),
        source,
    })
}

/// A pipe holding `key`: returns its read end, which (alone) survives exec.
fn key_pipe(key: &str) -> Result<OwnedFd, StartupError> {
    use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
    if key.len() > MAX_KEY_LEN {
        return Err(StartupError::KeyTooLong(key.len()));
    }
    let pipe_err = |e: nix::Error| StartupError::Pipe(e.into());
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(pipe_err)?;
    fcntl(&read, FcntlArg::F_SETFD(FdFlag::empty())).map_err(pipe_err)?;
    let mut write = std::fs::File::from(write);
    std::io::Write::write_all(&mut write, key.as_bytes()).map_err(StartupError::Pipe)?;
    drop(write);
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsnet_bridge::LOOPBACK_CONTROL_ENV;

    #[test]
    fn a_clean_environment_needs_no_reexec() {
        let knobs = |k: &str| {
            LOOPBACK_CONTROL_ENV
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        let (drop, add) = changes(knobs, true);
        assert!(drop.is_empty() && add.is_empty());
        let (drop, add) = changes(|_| None, false);
        assert!(drop.is_empty() && add.is_empty());
    }

    #[test]
    fn keys_and_fallbacks_are_dropped_and_knobs_added() {
        // Even empty or blank values: they would still show in environ, and
        // tsnet takes a blank TS_AUTHKEY as a key.
        let env = |k: &str| match k {
            "TS_AUTHKEY" => Some("   ".into()),
            "TS_AUTHKEY_FILE" | "TS_AUTH_KEY" | "TS_CONTROL_URL" => Some(String::new()),
            _ => None,
        };
        let (drop, add) = changes(env, true);
        assert_eq!(
            drop,
            [
                "TS_AUTHKEY",
                "TS_AUTHKEY_FILE",
                "TS_AUTH_KEY",
                "TS_CONTROL_URL"
            ]
        );
        assert_eq!(add.len(), LOOPBACK_CONTROL_ENV.len());
        let (_, add) = changes(env, false);
        assert!(add.is_empty(), "knobs only for a loopback control server");
    }

    #[test]
    fn the_key_pipe_holds_the_key_and_only_its_read_end_survives_exec() {
        use nix::fcntl::{FcntlArg, fcntl};
        let read = key_pipe("tskey-auth-x").unwrap();
        let flags = fcntl(&read, FcntlArg::F_GETFD).unwrap();
        assert_eq!(
            flags & libc::FD_CLOEXEC,
            0,
            "the read end must survive exec"
        );
        let mut text = String::new();
        std::fs::File::from(read).read_to_string(&mut text).unwrap();
        assert_eq!(text, "tskey-auth-x");
        assert!(matches!(
            key_pipe(&"k".repeat(MAX_KEY_LEN + 1)),
            Err(StartupError::KeyTooLong(_))
        ));
    }
}
