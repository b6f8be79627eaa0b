//! The status socket's two line protocols: [`Status`] lines from the
//! supervisor to the daemon, [`Order`] lines from the daemon to the
//! supervisor.

use std::fmt;
use std::time::Duration;

/// The launcher's file name; the daemon looks for it next to itself.
pub const LAUNCHER_NAME: &str = "tailkitd-launch";

/// How long a sweep keeps killing before the launcher gives up and exits
/// anyway (only a fork bomb or a process stuck in the kernel lasts that
/// long; the rest is gone within milliseconds).
pub const SWEEP_LIMIT: Duration = Duration::from_secs(2);

/// What the launcher tells the daemon: one line each on the status socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// `started PID`: the program runs, as process `PID`, leader of process
    /// group `PID`.
    Started(i32),
    /// `spawn-error ERRNO TEXT`: the program could not be executed (no
    /// such file, permission denied, exec format error, ...). Final.
    SpawnError {
        /// The `errno` `posix_spawn` failed with.
        errno: i32,
        /// Its description.
        message: String,
    },
    /// `error TEXT`: the launcher itself failed before starting the
    /// program (bad invocation, a system call it needs was refused), so the
    /// command could not start. Final.
    Error(String),
    /// `exited CODE`: the program exited with `CODE`. Final for the job;
    /// descendants may still run until the daemon says `kill`.
    Exited(i32),
    /// `signaled SIGNO`: the program was killed by signal `SIGNO`. Final,
    /// as [`Status::Exited`].
    Signaled(i32),
}

impl Status {
    /// Parses one line (without its newline); `None` for anything else.
    pub fn parse(line: &str) -> Option<Status> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let number = || rest.parse::<i32>().ok();
        match word {
            "started" => number().map(Status::Started),
            "exited" => number().map(Status::Exited),
            "signaled" => number().map(Status::Signaled),
            "spawn-error" => {
                let (errno, message) = rest.split_once(' ').unwrap_or((rest, ""));
                Some(Status::SpawnError {
                    errno: errno.parse().ok()?,
                    message: message.to_string(),
                })
            }
            "error" => Some(Status::Error(rest.to_string())),
            _ => None,
        }
    }
}

impl fmt::Display for Status {
    /// The line as sent, without its newline (texts are kept on one line).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let one_line = |s: &str| s.replace(['\n', '\r'], " ");
        match self {
            Status::Started(pid) => write!(f, "started {pid}"),
            Status::SpawnError { errno, message } => {
                write!(f, "spawn-error {errno} {}", one_line(message))
            }
            Status::Error(message) => write!(f, "error {}", one_line(message)),
            Status::Exited(code) => write!(f, "exited {code}"),
            Status::Signaled(signal) => write!(f, "signaled {signal}"),
        }
    }
}

/// What the daemon tells the launcher: one line each on the status socket.
/// The end of the socket means [`Order::Kill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// `term`: SIGTERM to the program's group and to every other
    /// descendant.
    Term,
    /// `kill`: sweep (SIGKILL to every descendant), then exit.
    Kill,
}

impl Order {
    /// The line to send, newline included.
    pub fn line(self) -> &'static [u8] {
        match self {
            Order::Term => b"term\n",
            Order::Kill => b"kill\n",
        }
    }

    /// Parses one line (without its newline); `None` for anything else.
    pub fn parse(line: &[u8]) -> Option<Order> {
        match line {
            b"term" => Some(Order::Term),
            b"kill" => Some(Order::Kill),
            _ => None,
        }
    }
}

/// The launcher's `main`: runs it with this process's arguments and
/// returns the code to exit with (0 once the job is over, 1 if a sweep gave
/// up, 125 when nothing could be started).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_orders_round_trip() {
        for status in [
            Status::Started(42),
            Status::SpawnError {
                errno: 8,
                message: "Exec format error".into(),
            },
            Status::Error("PR_SET_CHILD_SUBREAPER: EPERM".into()),
            Status::Exited(3),
            Status::Exited(0),
            Status::Signaled(13),
        ] {
            assert_eq!(Status::parse(&status.to_string()), Some(status.clone()));
        }
        assert_eq!(
            Status::Error("two\nlines".into()).to_string(),
            "error two lines"
        );
        for bad in ["", "started", "exited x", "spawn-error x y", "hello 1"] {
            assert_eq!(Status::parse(bad), None, "{bad:?}");
        }
        for order in [Order::Term, Order::Kill] {
            let line = order.line();
            assert_eq!(Order::parse(&line[..line.len() - 1]), Some(order));
        }
        assert_eq!(Order::parse(b"stop"), None);
    }
}
