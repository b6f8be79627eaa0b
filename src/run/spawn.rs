//! The one long-lived thread that starts the supervisor (whose
//! parent-death signal follows it), and where a command's program is
//! found.

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

/// Work for the spawner thread.
type Task = Box<dyn FnOnce() + Send>;

/// The one thread that starts the supervisor. It lives as long as the
/// process: the parent-death signal of a child follows the thread that
/// created it, so it must never exit while the process lives.
fn spawner() -> Option<&'static mpsc::Sender<Task>> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<Task>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Task>();
            let thread = std::thread::Builder::new()
                .name("tailkitd-spawner".into())
                .spawn(move || {
                    for task in rx {
                        task();
                    }
                })
                .ok();
            thread.map(|_| tx)
        })
        .as_ref()
}

/// Runs `f` on the spawner thread and returns what it returns.
///
/// # Errors
///
/// When the spawner thread could not be started or is gone.
pub(super) async fn run_on_spawner_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let spawner = spawner().ok_or_else(|| io::Error::other("no spawner thread"))?;
    let (reply, response) = oneshot::channel();
    spawner
        .send(Box::new(move || {
            let _ = reply.send(f());
        }))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    response
        .await
        .map_err(|_| io::Error::other("the spawner thread is gone"))
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
