//! tailkitd: a Tailscale node that lets tailnet peers run pre-registered
//! commands on the machine beside it, each call identified by WhoIs,
//! authorized by app capabilities and written to an audit log.
//!
//! # Layout
//!
//! - [`tailnet`]: the tsnet node over our own Go bridge (the only module allowed
//!   FFI calls into C): listen, dial, WhoIs, and the embedded local tailnet.
//! - [`exec`]: tool files, the live-reloading registry, the process runner and
//!   the job store. Knows nothing of HTTP or the tailnet.
//! - [`api`]: the HTTP routes, transport-agnostic: takes a resolved caller
//!   identity per request and decides.
//! - [`audit`]: the append-only JSON-lines audit log.
//! - [`config`]: flags, environment, TOML config and defaults merged.
//! - [`server`]: the accept loop on the tailnet listener.
//! - [`daemon`]: `tailkitd run`, the pieces above put together.
//! - [`client`]: a small HTTP client for the API over any stream.
//! - `demo` (feature `localnet`): `tailkitd demo` and `tailkitd localnet`.
#![deny(unsafe_code)]

pub mod api;
pub mod audit;
pub mod client;
pub mod config;
pub mod daemon;
#[cfg(feature = "localnet")]
pub mod demo;
pub mod exec;
pub mod localapi;
pub mod server;
pub mod tailnet;
