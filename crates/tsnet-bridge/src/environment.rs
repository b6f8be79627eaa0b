//! The process environment as tsnet sees it, and handing a secret to a
//! re-executed process without the environment.
//!
//! tsnet reads its settings from the environment in two ways that a daemon
//! must control:
//!
//! - Fallbacks: a node without an auth key takes `TS_AUTHKEY` or
//!   `TS_AUTH_KEY`, and a node without a control URL takes
//!   `TS_CONTROL_URL`. The bridge always gives tsnet an explicit control URL
//!   (Tailscale's when none is set), and refuses to create a node without
//!   an auth key while either key variable is set ([`TSNET_FALLBACK_VARS`]).
//! - Knobs (`envknob`), read from the environment the Go runtime copied at
//!   process start. A node whose control server is on loopback needs
//!   [`LOOPBACK_CONTROL_ENV`]; the bridge never calls `setenv` (other
//!   threads may be reading the environment, and glibc may move it), so
//!   these must be in the process's environment from its start: a program
//!   re-executes itself with them ([`missing_loopback_env`] says whether it
//!   must), and `scripts/test` exports them for the test binaries. Node
//!   creation fails, naming them, when they are missing.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// The variables tsnet falls back to when a node's settings leave the auth
/// key or the control URL empty. The bridge lets none of them act: the
/// control URL is always explicit, and a node without an auth key is not
/// created while `TS_AUTHKEY` or `TS_AUTH_KEY` is set.
pub const TSNET_FALLBACK_VARS: [&str; 3] = ["TS_AUTHKEY", "TS_AUTH_KEY", "TS_CONTROL_URL"];

/// tsnet's knobs for a node whose control server is on loopback (the local
/// tailnet): do not wait for a network interface to come up (a
/// loopback-only network namespace has none, and tsnet would pause), never
/// probe the LAN gateway for port mappings (UPnP, NAT-PMP, PCP), and do not
/// offer the host's interface addresses to peers as endpoints (peers then
/// reach each other on 127.0.0.1, where the local STUN server saw them, or
/// through the local DERP server). Process-wide; they must be in the
/// environment the process started with.
pub const LOOPBACK_CONTROL_ENV: [(&str, &str); 3] = [
    ("TS_ASSUME_NETWORK_UP_FOR_TEST", "true"),
    ("TS_DISABLE_PORTMAPPER", "true"),
    ("TS_DEBUG_OMIT_LOCAL_ADDRS", "true"),
];

/// Whether `url` names a control server on loopback (`localhost`, or a
/// loopback IP), as the bridge decides it.
pub fn is_loopback_control_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The entries of [`LOOPBACK_CONTROL_ENV`] that `env` lacks (or holds with
/// another value): what a process must be started with before it creates a
/// node on a loopback control server.
pub fn missing_loopback_env(
    env: impl Fn(&str) -> Option<String>,
) -> Vec<(&'static str, &'static str)> {
    LOOPBACK_CONTROL_ENV
        .into_iter()
        .filter(|(k, v)| env(k).as_deref() != Some(*v))
        .collect()
}

/// Replaces this process with `program` (`execve`: same pid), with `args`
/// (the first one is the new `argv[0]`) and exactly the environment `env`.
/// Unlike [`std::os::unix::process::CommandExt::exec`], it first sets the
/// soft `RLIMIT_NOFILE` back to what this process started with: the Go
/// runtime linked in here raised it when the process started, and the new
/// program would otherwise take the raised value for the original (and its
/// Go runtime would record no original at all). Fds that are not
/// close-on-exec stay open across it. Returns only on failure.
pub fn exec(
    program: &std::path::Path,
    args: &[std::ffi::OsString],
    env: &[(std::ffi::OsString, std::ffi::OsString)],
) -> io::Error {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |bytes: &[u8]| {
        CString::new(bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in an argument"))
    };
    let built = (|| -> io::Result<(CString, Vec<CString>, Vec<CString>)> {
        let path = c(program.as_os_str().as_bytes())?;
        let argv = args
            .iter()
            .map(|a| c(a.as_bytes()))
            .collect::<io::Result<Vec<_>>>()?;
        let envv = env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                c(&kv)
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok((path, argv, envv))
    })();
    match built {
        Ok((path, argv, envv)) => {
            let e = crate::ffi::exec(&path, &argv, &envv);
            io::Error::other(e.msg)
        }
        Err(e) => e,
    }
}

/// The fds already adopted by [`adopt_inherited_fd`].
static ADOPTED: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Takes ownership of an fd this process inherited across `exec` and that
/// nothing in it owns yet: the read end of a pipe a parent named in an
/// environment variable. It is made close-on-exec at once.
///
/// Each fd number is adopted at most once per process, and only fds above 2
/// that are open, are pipes (FIFOs), and are not close-on-exec: every fd
/// this process creates itself (Rust's standard library, tokio, the Go
/// runtime, this bridge) is close-on-exec, so one that is not came across
/// the exec, which is what keeps this function from taking over an fd that
/// something in the process already owns.
///
/// # Errors
///
/// `InvalidInput` for fd 0-2 or one already adopted; the OS error when it is
/// not open; `InvalidInput` when it is not a pipe or is close-on-exec.
pub fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    let mut adopted = ADOPTED.lock().unwrap_or_else(|e| e.into_inner());
    if fd <= 2 || adopted.contains(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} cannot be adopted (a standard stream, or taken already)"),
        ));
    }
    // SAFETY: fstat writes only into `st`, a plain-data struct; an fd that
    // is not open makes it fail with EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is not a pipe"),
        ));
    }
    // SAFETY: F_GETFD only reads the fd's flags; the fd is open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is close-on-exec: not one inherited across exec"),
        ));
    }
    // SAFETY: the fd is open (fstat succeeded) and not close-on-exec, so it
    // came from the parent across exec (everything this process opens is
    // close-on-exec), and the caller names it as one nothing here owns;
    // `ADOPTED` makes sure it is wrapped only once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    adopted.push(fd);
    // SAFETY: F_SETFD on an fd we own, with a valid flag.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, IntoRawFd};

    #[test]
    fn loopback_control_urls() {
        for url in [
            "http://127.0.0.1:8080",
            "http://localhost",
            "https://LOCALHOST:1/x",
            "http://[::1]:9",
            "http://127.9.9.9",
            "http://user@127.0.0.1:1",
        ] {
            assert!(is_loopback_control_url(url), "{url}");
        }
        for url in [
            "https://controlplane.tailscale.com",
            "http://10.0.0.1",
            "http://127.0.0.1.example.com",
            "http://[fd7a::1]:80",
            "127.0.0.1:80",
            "http://localhost.evil@example.com",
        ] {
            assert!(!is_loopback_control_url(url), "{url}");
        }
    }

    #[test]
    fn missing_loopback_env_names_what_is_absent_or_different() {
        assert_eq!(missing_loopback_env(|_| None).len(), 3);
        let all = |k: &str| {
            LOOPBACK_CONTROL_ENV
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        assert!(missing_loopback_env(all).is_empty());
        let one_off = |k: &str| {
            if k == "TS_DISABLE_PORTMAPPER" {
                Some("false".into())
            } else {
                all(k)
            }
        };
        assert_eq!(
            missing_loopback_env(one_off),
            [("TS_DISABLE_PORTMAPPER", "true")]
        );
    }

    #[test]
    fn only_open_pipes_are_adopted_once() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let raw = r.into_raw_fd();
        let owned = adopt_inherited_fd(raw).unwrap();
        assert_eq!(owned.as_raw_fd(), raw);
        let flags = nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "adopted fd is close-on-exec");
        assert!(adopt_inherited_fd(raw).is_err(), "adopted twice");
        assert!(adopt_inherited_fd(0).is_err());
        // Not a pipe: a socket.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(adopt_inherited_fd(a.as_raw_fd()).is_err());
        // A pipe this process made, close-on-exec as all of them are.
        let (own, _own_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let err = adopt_inherited_fd(own.as_raw_fd()).unwrap_err();
        assert!(err.to_string().contains("close-on-exec"), "{err}");
        drop(w);
    }
}
