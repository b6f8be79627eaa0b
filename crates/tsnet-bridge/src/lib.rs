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
//!
//! Every file descriptor the bridge creates or hands over is close-on-exec,
//! so child processes inherit no tailnet connection. tsnet's logs are
//! forwarded into `tracing` (target `tsnet`, debug level); tsnet's log upload
//! to Tailscale is off unless a node sets `upload_logs`.

mod error;
mod ffi;
mod listener;
#[cfg(feature = "localnet")]
mod localnet;
mod logs;
mod node;
mod signals;
mod whois;

pub use error::BridgeError;
pub use listener::{Listener, Stream};
#[cfg(feature = "localnet")]
pub use localnet::{LOGIN_DOMAIN, Localnet, LocalnetOptions, MAGIC_DNS_SUFFIX};
pub use node::{DEFAULT_DIAL_TIMEOUT, LoopbackProxy, Node, NodeConfig, Status};
pub use signals::{ensure_signal_onstack, signal_handler_is_onstack};
pub use whois::WhoIs;
