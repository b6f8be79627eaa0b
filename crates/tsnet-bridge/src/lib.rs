//! tailkitd's bridge to the tailnet: a tsnet node over our own small Go
//! package (`go/`, built by this crate's build script as a C archive and
//! linked in, `links = "tsnetbridge"`), the FFI declarations and the safe
//! wrapper over them, WhoIs results, and the embedded local tailnet. This is
//! the only crate of the workspace with `unsafe`; every block carries a
//! `// SAFETY:` line.
//!
//! - [`Node`]: one tsnet node in this process (several can run side by
//!   side): `up`, `status`, `listen`, `dial`, `whois`, `loopback`, `close`.
//! - [`Listener`] yields each connection together with the peer address it
//!   really came from (both arrive in one message from the bridge), and
//!   [`Stream`] is the connection (tokio `AsyncRead + AsyncWrite`).
//! - [`WhoIs`]: who a peer is.
//! - `Localnet` (feature `localnet`): a complete tailnet on loopback.
//! - [`ensure_signal_onstack`]: keeps signal handlers compatible with the Go
//!   runtime that shares this process.
//! - [`original_nofile_limit`]: the soft limit of open files the process
//!   was started with, before the Go runtime raised it.
//! - The environment as tsnet reads it: [`TSNET_FALLBACK_VARS`] never act,
//!   [`LOOPBACK_CONTROL_ENV`] must be there from the start for a node on a
//!   loopback control server, and [`adopt_inherited_fd`] takes over a pipe
//!   a re-executing parent left open.
//!
//! Every file descriptor the bridge creates or hands over is close-on-exec,
//! so child processes inherit no tailnet connection. tsnet's logs are
//! forwarded into `tracing` (target `tsnet`, debug level); tsnet's log upload
//! to Tailscale is off unless a node sets `upload_logs`.

mod environment;
mod error;
mod ffi;
mod listener;
#[cfg(feature = "localnet")]
mod localnet;
mod logs;
mod node;
mod signals;
mod whois;

pub use environment::{
    LOOPBACK_CONTROL_ENV, TSNET_FALLBACK_VARS, adopt_inherited_fd, exec, is_loopback_control_url,
    missing_loopback_env,
};
pub use error::BridgeError;
pub use listener::{Listener, Stream};
#[cfg(feature = "localnet")]
pub use localnet::{LOGIN_DOMAIN, Localnet, LocalnetOptions, MAGIC_DNS_SUFFIX};
pub use node::{DEFAULT_DIAL_TIMEOUT, LoopbackProxy, Node, NodeConfig, Status};
pub use signals::{ensure_signal_onstack, signal_handler_is_onstack};

/// The soft `RLIMIT_NOFILE` this process was started with. The Go runtime
/// linked in raises the soft limit to (nearly) the hard one in every
/// process it lives in, before `main`; programs the process starts should
/// get the original back (Go's own `os/exec` does that for its children).
/// `None` if it cannot be read.
pub fn original_nofile_limit() -> Option<u64> {
    ffi::orig_nofile().map(|(soft, _hard)| soft)
}
pub use whois::WhoIs;

#[cfg(test)]
mod tests {
    #[test]
    fn the_original_nofile_limit_is_at_most_the_raised_one() {
        let original = super::original_nofile_limit().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let got =
            // SAFETY: `limit` is valid for writes for the duration of the call.
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(got, 0);
        let soft = limit.rlim_cur;
        assert!(original > 0 && original <= soft, "{original} > {soft}");
    }
}
