//! The status socket's two line protocols: [`Status`] lines from the
//! supervisor to the daemon, [`Order`] lines from the daemon to the
//! supervisor; and the control socket's messages: one [`JobRequest`] per
//! job from the daemon, one [`Hello`] from the supervisor when it starts.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    /// `launcher PID`: the job's own launcher runs as process `PID` (sent
    /// by the supervisor when it hands it the job, so that the daemon can
    /// kill a launcher that hangs).
    Launcher(i32),
    /// `cgroup NAME`: the job runs in cgroup `NAME` (a [`valid_job_name`]),
    /// a directory of the supervisor's cgroup directory ([`Hello::cgroup`]).
    /// Sent before the program starts, so that the daemon can kill the
    /// whole job even if its launcher dies at once.
    Cgroup(String),
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
            "launcher" => number().map(Status::Launcher),
            "cgroup" => valid_job_name(rest).then(|| Status::Cgroup(rest.to_string())),
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
            Status::Launcher(pid) => write!(f, "launcher {pid}"),
            Status::Cgroup(name) => write!(f, "cgroup {name}"),
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

/// The largest control message (a job's header) the supervisor accepts.
pub const MAX_JOB_MESSAGE: usize = 256 << 10;

/// One job, as the daemon hands it to the supervisor (and the supervisor
/// to a launcher): this header (JSON) in one `SOCK_SEQPACKET` message on
/// the control socket, with three descriptors passed alongside
/// (`SCM_RIGHTS`), in this order: the job's end of its status socket, and
/// the write ends of its stdout and stderr pipes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    /// The program to execute (an absolute path).
    pub program: String,
    /// Its argv, `argv[0]` included.
    pub argv: Vec<String>,
    /// Its whole environment, `KEY=VALUE` each.
    pub env: Vec<String>,
    /// Its working directory, if not `/`.
    pub workdir: Option<String>,
    /// Who it runs as, if not the supervisor's own user.
    pub credentials: Option<Credentials>,
}

/// The user and groups a command runs as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// User id (real, effective and saved).
    pub uid: u32,
    /// Group id (real, effective and saved).
    pub gid: u32,
    /// Supplementary groups (empty: none).
    pub groups: Vec<u32>,
}

impl Credentials {
    /// The command-line form `UID:GID:G1,G2` (`UID:GID:` without
    /// supplementary groups).
    pub fn to_arg(&self) -> String {
        let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
        format!("{}:{}:{}", self.uid, self.gid, groups.join(","))
    }

    /// Parses [`Credentials::to_arg`]'s form.
    pub fn parse_arg(arg: &str) -> Option<Credentials> {
        let mut parts = arg.splitn(3, ':');
        let uid = parts.next()?.parse().ok()?;
        let gid = parts.next()?.parse().ok()?;
        let groups = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|g| g.parse().ok())
                .collect::<Option<Vec<u32>>>()?,
        };
        Some(Credentials { uid, gid, groups })
    }
}

/// What the supervisor says first on the control socket, once it is ready
/// for jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The supervisor's pid.
    pub pid: i32,
    /// The directory holding its job cgroups, when it contains jobs with
    /// cgroups; `None` when every job gets a launcher of its own.
    pub cgroup: Option<String>,
    /// Why there are no job cgroups, when they were asked for.
    pub fallback_reason: Option<String>,
}

/// Whether `name` may name a job's cgroup (`[A-Za-z0-9_.-]`, at most 64
/// bytes, not starting with a dot).
pub fn valid_job_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_orders_round_trip() {
        for status in [
            Status::Started(42),
            Status::Launcher(43),
            Status::Cgroup("1234.5".into()),
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
        for bad in [
            "",
            "started",
            "exited x",
            "spawn-error x y",
            "hello 1",
            "cgroup ../x",
            "cgroup ",
        ] {
            assert_eq!(Status::parse(bad), None, "{bad:?}");
        }
        for order in [Order::Term, Order::Kill] {
            let line = order.line();
            assert_eq!(Order::parse(&line[..line.len() - 1]), Some(order));
        }
        assert_eq!(Order::parse(b"stop"), None);
    }

    #[test]
    fn credentials_round_trip_as_an_argument() {
        for c in [
            Credentials {
                uid: 65534,
                gid: 65534,
                groups: vec![],
            },
            Credentials {
                uid: 1000,
                gid: 100,
                groups: vec![100, 27, 4],
            },
        ] {
            assert_eq!(Credentials::parse_arg(&c.to_arg()), Some(c));
        }
        for bad in ["", "1", "1:2", "x:2:", "1:2:3,x", "1:2:,"] {
            assert_eq!(Credentials::parse_arg(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn job_names_are_single_path_components() {
        assert!(valid_job_name("job-1.a_b"));
        for bad in ["", ".", "..", "a/b", &"x".repeat(65), ".hidden"] {
            assert!(!valid_job_name(bad), "{bad:?}");
        }
    }
}
