//! The protocols between tailkitd and `tailkitd-launch` (the supervisor's
//! control messages, each job's status lines), and the /proc reading both
//! sides share.
//!
//! This crate links no Go: the supervisor binary built from it must stay a
//! small, single-threaded process (the `tailkitd` binary carries the Go
//! runtime, which starts its own threads, and about 20 MiB of memory, in
//! every process that loads it, before `main`, and those threads would also
//! catch the signals meant for the supervisor). How the supervisor and the
//! launcher work is described in `src/main.rs` and its modules.
#![forbid(unsafe_code)]

mod procfs;
mod protocol;

pub use procfs::{ProcStat, cgroup_dir_of, proc_stat, proc_stats};
pub use protocol::{
    Credentials, Hello, JobRequest, LAUNCHER_NAME, MAX_JOB_MESSAGE, Order, SWEEP_LIMIT, Status,
    valid_job_name,
};
