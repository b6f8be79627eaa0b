//! Integration tests of the in-process stack (registry, executor, API) with
//! real processes, real directories and the real launcher binary; the API is
//! driven through its router with a constructed identity, or over loopback
//! TCP with a resolver. One module per topic.

#[path = "../common/mod.rs"]
mod common;

mod args;
mod isolation;
mod jobs;
mod kill;
mod output;
mod process;
mod registry;
mod reuse;
mod router;
mod serving;
mod tool_files;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use serde_json::{Value, json};
use tailkitd::identity::Identity;
use tailkitd::run::runner::{RunEnd, RunSpec};
use tailkitd::run::{CgroupSetting, ExecSettings, Runner};
use tailkitd::server::{
    ConnectionOptions, HEADER_READ_TIMEOUT, IDLE_TIMEOUT, IdentityResolver, MAX_PIPELINED_REQUESTS,
    MAX_REQUESTS_PER_CONNECTION, Timeouts, serve_connection, serve_connection_with,
};
use tailkitd::tools::{Registry, ToolLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The hang guard of a single step.
const LONG: Duration = Duration::from_secs(20);
