//! The tailnet side of tailkitd: the tsnet node over our own Go bridge
//! (`vendor/tsnet-bridge`, linked as a C archive), peer identity (WhoIs
//! results), and the embedded local tailnet. This is the only module allowed
//! `unsafe`.
//!
//! - [`Node`]: one tsnet node in this process (several can run side by
//!   side): `up`, `status`, `listen`, `dial`, `whois`, `loopback`, `close`.
//! - [`Listener`] yields each connection together with the peer address it
//!   really came from (both arrive in one message from the bridge), and
//!   [`Stream`] is the connection (tokio `AsyncRead + AsyncWrite`).
//! - [`Identity`]: who a peer is, from WhoIs.
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
mod identity;
mod listener;
#[cfg(feature = "localnet")]
mod localnet;
mod logs;
mod node;
mod signals;

pub use error::BridgeError;
pub use identity::{Identity, Owner};
pub use listener::{Listener, Stream};
#[cfg(feature = "localnet")]
pub use localnet::{LOGIN_DOMAIN, Localnet, LocalnetOptions, MAGIC_DNS_SUFFIX};
pub use node::{DEFAULT_DIAL_TIMEOUT, LoopbackProxy, Node, NodeConfig, Status};
pub use signals::{ensure_signal_onstack, signal_handler_is_onstack};
