//! What may be run: tool files, their validated model, the live registry of
//! a tools directory, and the request-time checks of arguments. Knows
//! nothing of processes, jobs, HTTP or the tailnet; the [run](crate::run)
//! side builds on it, never the other way round.
//!
//! - [`file`](mod@file): tool files (JSON as the Go SDK writes it, or TOML) and their
//!   validation; [`validate_path`] backs `tailkitd validate`.
//! - [`model`]: the validated [`Tool`], [`Command`], [`Arg`], and the
//!   `GET /tools` wire shape.
//! - [`registry`]: the live, atomically swapped index of a tools directory,
//!   which serves a file written in place only once it has settled.
//! - [`args`]: argument validation and argv substitution for one request.
//! - [`duration`], [`pattern`]: Go's duration syntax and regex semantics.
//! - [`users`]: who commands run as (`user`/`group`, `command_user`).

pub mod args;
pub mod duration;
pub mod file;
pub mod model;
pub mod pattern;
pub mod registry;
pub mod users;

use std::time::Duration;

pub use args::{ArgError, Prepared, prepare, redact_args};
pub use file::{
    FileKey, Format, MAX_TOOL_FILE_BYTES, Problem, load_dir, load_file, parse_str, validate_path,
};
pub use model::{Arg, ArgType, Command, Tool};
pub use registry::{COALESCE, DEFAULT_SETTLE, ExecEntry, Registry, RegistryError, WatchGuard};
pub use users::RunAs;

/// The largest `timeout` a tool file may declare by default (1 h).
pub const DEFAULT_MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// The largest argument value by default (4 KiB).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 4 << 10;
/// The largest `max_output_bytes` a tool file may declare by default, per
/// stream (64 MiB).
pub const DEFAULT_MAX_DECLARED_OUTPUT_BYTES: usize = 64 << 20;

/// Limits applied while loading tool files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolLimits {
    /// Largest `timeout` a command may declare (SPEC default 1 h).
    pub max_timeout: Duration,
    /// Largest argument value in bytes; applies to `default` too (4 KiB).
    pub max_value_bytes: usize,
    /// Largest `max_output_bytes` a command may declare, per stream
    /// (64 MiB): it bounds the memory one job may hold.
    pub max_output_bytes: usize,
    /// Whether a `user`/`group` the daemon could not switch to is a
    /// problem (the daemon: yes; `tailkitd validate`, which may run as
    /// someone else: only users and groups that do not exist are).
    pub check_user_switch: bool,
}

impl Default for ToolLimits {
    fn default() -> Self {
        ToolLimits {
            max_timeout: DEFAULT_MAX_TIMEOUT,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_output_bytes: DEFAULT_MAX_DECLARED_OUTPUT_BYTES,
            check_user_switch: false,
        }
    }
}
