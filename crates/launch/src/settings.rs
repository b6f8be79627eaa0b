//! What another process of the same user can change in a process from
//! outside, and every command it starts would then inherit: its resource
//! limits (`prlimit`), nice value (`setpriority`), scheduling policy
//! (`sched_setscheduler`), CPU affinity (`sched_setaffinity`), OOM score
//! adjustment (`/proc/PID/oom_score_adj`, when it may write it) and cgroup
//! (a `cgroup.procs` it may write). A ready launcher records them when it
//! starts and compares when each job is over: one whose settings changed
//! (a command of its user reached it through `$PPID`) is not reused
//! ([`crate::ready`]).
//!
//! The I/O priority (`ioprio_set`) is not compared: nothing reads it
//! without a raw system call.

use rustix::process::{Resource, Rlimit, getpriority_process, getrlimit};

/// Every resource limit.
const RESOURCES: [Resource; 16] = [
    Resource::Cpu,
    Resource::Fsize,
    Resource::Data,
    Resource::Stack,
    Resource::Core,
    Resource::Rss,
    Resource::Nproc,
    Resource::Nofile,
    Resource::Memlock,
    Resource::As,
    Resource::Locks,
    Resource::Sigpending,
    Resource::Msgqueue,
    Resource::Nice,
    Resource::Rtprio,
    Resource::Rttime,
];

/// This process's settings that others can change, as read at one time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    limits: Vec<Rlimit>,
    nice: Option<i32>,
    /// `rt_priority` and `policy` of /proc/self/stat.
    scheduling: Option<(String, String)>,
    /// The CPUs it may run on.
    cpus: Option<Vec<usize>>,
    oom_score_adj: Option<String>,
    /// `/proc/self/cgroup`.
    cgroup: Option<String>,
}

impl Settings {
    /// This process's settings now; its cgroup only `with_cgroup` (a
    /// launcher that moves itself from cgroup to cgroup checks it another
    /// way).
    pub fn read(with_cgroup: bool) -> Settings {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let scheduling = stat.as_deref().and_then(|stat| {
            // Fields 40 and 41, after the command name (field 2).
            let (_, rest) = stat.rsplit_once(')')?;
            let mut fields = rest.split_whitespace().skip(37);
            Some((fields.next()?.to_string(), fields.next()?.to_string()))
        });
        let cpus = rustix::thread::sched_getaffinity(None).ok().map(|set| {
            (0..rustix::thread::CpuSet::MAX_CPU)
                .filter(|cpu| set.is_set(*cpu))
                .collect()
        });
        Settings {
            limits: RESOURCES.iter().map(|r| getrlimit(*r)).collect(),
            nice: getpriority_process(None).ok(),
            scheduling,
            cpus,
            oom_score_adj: std::fs::read_to_string("/proc/self/oom_score_adj").ok(),
            cgroup: with_cgroup
                .then(|| std::fs::read_to_string("/proc/self/cgroup").ok())
                .flatten(),
        }
    }

    /// What differs in `now` from these settings (empty if nothing).
    pub fn changes(&self, now: &Settings) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.limits != now.limits {
            changed.push("resource limits");
        }
        if self.nice != now.nice {
            changed.push("nice value");
        }
        if self.scheduling != now.scheduling {
            changed.push("scheduling policy");
        }
        if self.cpus != now.cpus {
            changed.push("CPU affinity");
        }
        if self.oom_score_adj != now.oom_score_adj {
            changed.push("oom_score_adj");
        }
        if self.cgroup != now.cgroup {
            changed.push("cgroup");
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_limit_is_seen() {
        let before = Settings::read(true);
        assert!(before.changes(&Settings::read(true)).is_empty());
        let mut after = before.clone();
        after.limits[1] = Rlimit {
            current: Some(0),
            maximum: Some(0),
        };
        after.nice = Some(15);
        assert_eq!(
            before.changes(&after),
            vec!["resource limits", "nice value"]
        );
    }
}
