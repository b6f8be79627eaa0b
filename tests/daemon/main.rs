//! The daemon end to end: the real `tailkitd run` binary, spawned as a
//! process, on the embedded local tailnet, called by real client nodes
//! (see `common::daemon`). One module per topic.

#![cfg(feature = "localnet")]

#[path = "../common/mod.rs"]
mod common;

mod audit;
mod call;
mod calls;
mod cli;
mod isolation;
mod lifecycle;
mod startup;
mod stream;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::*;
use common::{eventually, eventually_some};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::sync::Mutex;

use tailkitd::client::Call;
use tailkitd::demo::Client;
use tsnet_bridge::{Localnet, LocalnetOptions};
