//! tailkitd: a Tailscale node that lets tailnet peers run pre-registered
//! commands on the machine beside it, each call identified by WhoIs,
//! authorized by app capabilities and written to an audit log.
//!
//! # Layout
//!
//! The tailnet itself lives in the `tsnet-bridge` crate (the only crate
//! with FFI), the per-job supervisor's protocol in `tailkitd-launch`
//! (a crate without Go). This crate forbids unchecked code (the attribute
//! below); data flows one way:
//! [`server`] → [`api`] → [`run`] → [`tools`], with [`identity`] and
//! [`audit`] used along the way.
//!
//! - [`identity`]: who is calling, as plain data, and who owns a job.
//! - [`tools`]: what may be run: tool files, their validation, the
//!   live-reloading registry, argument checks, Go durations and patterns.
//! - [`run`]: running it: the executor (the one seam the API calls), the
//!   process runner and launcher, the job store, and each job's output
//!   buffer that live streams follow.
//! - [`api`]: the HTTP routes, transport-agnostic: takes a resolved caller
//!   per request and decides; `?stream=true` answers with server-sent
//!   events.
//! - [`audit`]: the append-only JSON-lines audit log.
//! - [`server`]: transport: the accept loop on the tailnet listener, HTTP/1.1
//!   per connection, WhoIs per request.
//! - [`config`]: flags, environment, TOML config and defaults merged.
//! - [`daemon`]: `tailkitd run`, the pieces above put together.
//! - [`startup`]: the clean start: re-executing without the auth key in
//!   the environment, with the knobs tsnet reads from there.
//! - [`client`]: a small HTTP client for the API over any stream, with an
//!   SSE parser to follow live job streams.
//! - [`call`]: `tailkitd call` and `tailkitd tools`, the operator's
//!   client: one node or a fleet, over an ephemeral node of its own or the
//!   machine's tailscaled.
//! - [`localapi`]: the machine's tailscaled through its LocalAPI socket
//!   (peer list and dial), for callers without a tsnet node of their own.
//! - `demo` (feature `localnet`): `tailkitd demo` and `tailkitd localnet`.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod call;
pub mod client;
pub mod config;
pub mod daemon;
#[cfg(feature = "localnet")]
pub mod demo;
pub mod identity;
pub mod localapi;
pub mod run;
pub mod server;
pub mod startup;
pub mod tools;
