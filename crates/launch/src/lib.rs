//! The protocol between tailkitd and its per-job supervisor,
//! `tailkitd-launch`, and the /proc reading both sides share.
//!
//! This crate links no Go: the supervisor binary built from it must stay a
//! small, single-threaded process (the `tailkitd` binary carries the Go
//! runtime, which starts its own threads, and about 20 MiB of memory, in
//! every process that loads it, before `main`, and those threads would also
//! catch the signals meant for the supervisor). How the supervisor works is
//! described in `src/main.rs`.
#![forbid(unsafe_code)]

mod procfs;
mod protocol;

pub use procfs::{ProcStat, proc_stat, proc_stats};
pub use protocol::{LAUNCHER_NAME, Order, SWEEP_LIMIT, Status};
