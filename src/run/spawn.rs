//! Forking: the one long-lived thread that starts every launcher, and
//! where a command's program is found.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::mpsc;

use tokio::sync::oneshot;

/// The only PATH commands see, and the one bare program names are looked
/// up on.
pub const FIXED_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The program to execute: an absolute path as is (whether it can be
/// executed is the launcher's to find out, and to report), a bare name
/// looked up on [`FIXED_PATH`].
///
/// # Errors
///
/// When a bare name is not an executable file in any directory of the PATH.
pub fn resolve_program(program: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    if program.starts_with('/') {
        return Ok(PathBuf::from(program));
    }
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    FIXED_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| executable(p))
        .ok_or_else(|| format!("{program}: executable file not found in {FIXED_PATH}"))
}

struct SpawnRequest {
    command: tokio::process::Command,
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<io::Result<tokio::process::Child>>,
}

/// The one thread that forks every command. It lives as long as the
/// process: the parent-death signal of a child follows the thread that
/// forked it, so it must never exit while the process lives.
fn spawner() -> Option<&'static mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            let thread = std::thread::Builder::new()
                .name("tailkitd-spawner".into())
                .spawn(move || {
                    for request in rx {
                        let SpawnRequest {
                            mut command,
                            runtime,
                            reply,
                        } = request;
                        let _runtime = runtime.enter();
                        let result = command.spawn();
                        // The launcher's end of the status socket must not
                        // stay open here: its end is how the runner learns
                        // that the launcher died.
                        drop(command);
                        // If the run was dropped meanwhile, so was its end
                        // of the status socket: the launcher kills what it
                        // started and exits, and the child is reaped by
                        // tokio once dropped here.
                        let _ = reply.send(result);
                    }
                })
                .ok();
            thread.map(|_| tx)
        })
        .as_ref()
}

pub(super) async fn spawn_from_spawner_thread(
    command: tokio::process::Command,
) -> io::Result<tokio::process::Child> {
    let spawner = spawner().ok_or_else(|| io::Error::other("no spawner thread"))?;
    let (reply, response) = oneshot::channel();
    spawner
        .send(SpawnRequest {
            command,
            runtime: tokio::runtime::Handle::current(),
            reply,
        })
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    response
        .await
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_on_the_fixed_path() {
        assert!(resolve_program("sh").unwrap().is_absolute());
        assert_eq!(
            resolve_program("/bin/sh").unwrap(),
            PathBuf::from("/bin/sh")
        );
        assert!(resolve_program("no-such-program-tailkitd").is_err());
        assert_eq!(
            resolve_program("/etc/passwd").unwrap(),
            PathBuf::from("/etc/passwd"),
            "the launcher reports what cannot be executed"
        );
    }
}
