//! Job cgroups (cgroup v2): the supervisor's directory under the base the
//! daemon names (`<base>/tailkitd-sv.<pid>`, [`Cgroups`]), and in it the
//! cgroups of its launchers' jobs ([`Parking`]). A command is started
//! *inside* its job's cgroup: its launcher waits for the job in an empty
//! cgroup made for it and spawns the command there (`posix_spawn` creates
//! the child in the cgroup of its caller), then moves itself on into the
//! next one, ready for its next job. Writing the command's pid into the
//! cgroup after the spawn would be racy: the command could fork before.
//! One move per job, made by the launcher after the command started: none
//! on the way to the command's start, and none in the supervisor.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tailkitd_launch::{SWEEP_LIMIT, cgroup_dir_of};

/// The prefix of a supervisor's directory under the base.
const DIR_PREFIX: &str = "tailkitd-sv.";

/// This supervisor's job cgroups.
pub struct Cgroups {
    /// `cgroup.procs` of the cgroup the supervisor lives in, to move back.
    home: File,
    /// `<base>/tailkitd-sv.<pid>`.
    dir: PathBuf,
}

impl Cgroups {
    /// Removes what dead supervisors left under `base`, creates this
    /// supervisor's directory and checks, with a probe cgroup, that a job
    /// cgroup can be made, entered, left, killed and removed. Errors say
    /// why not (jobs then get no cgroup: their launchers sweep instead).
    pub fn setup(base: &Path) -> Result<Cgroups, String> {
        remove_stale(base);
        let home_dir = cgroup_dir_of("self")
            .ok_or("the supervisor's own cgroup v2 directory was not found")?;
        let home = OpenOptions::new()
            .write(true)
            .open(home_dir.join("cgroup.procs"))
            .map_err(|e| format!("{}/cgroup.procs: {e}", home_dir.display()))?;
        let dir = base.join(format!("{DIR_PREFIX}{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let cgroups = Cgroups { home, dir };
        if let Err(e) = cgroups.probe() {
            cgroups.remove_all();
            return Err(e);
        }
        Ok(cgroups)
    }

    fn probe(&self) -> Result<(), String> {
        let probe = self.dir.join("probe");
        std::fs::create_dir(&probe).map_err(|e| format!("creating a job cgroup: {e}"))?;
        let result = (|| {
            if !probe.join("cgroup.kill").exists() {
                return Err("the kernel has no cgroup.kill (Linux 5.14 or newer needed)".into());
            }
            enter(&probe).map_err(|e| format!("moving into a job cgroup: {e}"))?;
            (&self.home)
                .write_all(b"0")
                .map_err(|e| format!("moving back out of a job cgroup: {e}"))
        })();
        let _ = remove(&probe);
        result
    }

    /// The directory holding the job cgroups.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills and removes every job cgroup left (and the launchers waiting
    /// in theirs), then the directory (at exit).
    pub fn remove_all(&self) {
        kill_and_remove_tree(&self.dir);
    }
}

/// Where a launcher waits for its jobs: `<dir>/<launcher pid>.<n>`, an
/// empty cgroup made for the next job. The launcher moves itself into it
/// ([`Parking::park`]), and the next job's command is born there.
pub struct Parking {
    dir: PathBuf,
    /// `cgroup.procs` of the cgroup the launcher started in.
    home: File,
    /// Cgroups made so far.
    made: u64,
    /// The cgroup the launcher is in, if not its home, and its
    /// `cgroup.events` (opened ahead, for the job that will run in it).
    here: Option<(String, PathBuf, Option<File>)>,
}

impl Parking {
    /// Parking in the supervisor's directory `dir`.
    pub fn new(dir: &Path) -> Result<Parking, String> {
        let home_dir =
            cgroup_dir_of("self").ok_or("this process's cgroup v2 directory was not found")?;
        let home = OpenOptions::new()
            .write(true)
            .open(home_dir.join("cgroup.procs"))
            .map_err(|e| format!("{}/cgroup.procs: {e}", home_dir.display()))?;
        Ok(Parking {
            dir: dir.to_path_buf(),
            home,
            made: 0,
            here: None,
        })
    }

    /// The cgroup this process is in (its name and directory), unless it
    /// is home.
    pub fn here(&self) -> Option<(&str, &Path)> {
        self.here
            .as_ref()
            .map(|(n, d, _)| (n.as_str(), d.as_path()))
    }

    /// The `cgroup.events` of the cgroup this process is in (once).
    pub fn take_events(&mut self) -> Option<File> {
        self.here.as_mut().and_then(|(_, _, events)| events.take())
    }

    /// Moves this process into a new, empty cgroup (the one it leaves, if
    /// any, stays as it is: its job's).
    pub fn park(&mut self) -> std::io::Result<()> {
        self.made += 1;
        let name = format!("{}.{}", std::process::id(), self.made);
        let dir = self.dir.join(&name);
        std::fs::create_dir(&dir)?;
        if let Err(e) = enter(&dir) {
            let _ = remove(&dir);
            return Err(e);
        }
        let events = events(&dir).ok();
        self.here = Some((name, dir, events));
        Ok(())
    }

    /// Moves this process back into the cgroup it started in.
    pub fn go_home(&mut self) -> std::io::Result<()> {
        let mut result = (&self.home).write_all(b"0");
        for _ in 0..3 {
            if result.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            result = (&self.home).write_all(b"0");
        }
        if result.is_ok() {
            self.here = None;
        }
        result
    }
}

/// Moves this process into `cgroup`.
fn enter(cgroup: &Path) -> std::io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))?
        .write_all(b"0")
}

/// Kills and removes the cgroups of launcher `pid` under `dir` (it is
/// gone: whatever ran in them is over); returns those that could not be
/// removed yet (still emptying), to try again.
pub fn remove_launchers(dir: &Path, pid: i32) -> Vec<PathBuf> {
    let prefix = format!("{pid}.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .map(|e| e.path())
        .filter(|cgroup| {
            let _ = kill(cgroup);
            remove(cgroup).is_err()
        })
        .collect()
}

/// SIGKILL to every process in `job` and its descendants (`cgroup.kill`:
/// forks in progress included).
pub fn kill(job: &Path) -> std::io::Result<()> {
    std::fs::write(job.join("cgroup.kill"), b"1")
}

/// Opens `job`'s `cgroup.events`, whose `populated` line tells whether any
/// process is left (poll it for `POLLPRI` to learn of changes).
pub fn events(job: &Path) -> std::io::Result<File> {
    File::open(job.join("cgroup.events"))
}

/// Whether `events` (a `cgroup.events` file) says processes are left;
/// `None` when it cannot be read.
pub fn populated(events: &mut File) -> Option<bool> {
    let mut text = String::new();
    events.rewind().ok()?;
    events.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(|v| v.trim() != "0")
}

/// The processes in `job` itself.
pub fn procs(job: &Path) -> Vec<i32> {
    std::fs::read_to_string(job.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Removes the (empty) job cgroup `job`.
pub fn remove(job: &Path) -> std::io::Result<()> {
    std::fs::remove_dir(job)
}

/// Kills everything in `dir` and below, waits (at most [`SWEEP_LIMIT`])
/// until it is empty, and removes the cgroups, deepest first.
fn kill_and_remove_tree(dir: &Path) {
    let _ = kill(dir);
    let deadline = Instant::now() + SWEEP_LIMIT;
    if let Ok(mut events) = events(dir) {
        while populated(&mut events) == Some(true) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    remove_tree(dir);
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Kills and removes the directories of supervisors that are gone (a
/// daemon that was killed, or whose supervisor was): `tailkitd-sv.<pid>`
/// where no `tailkitd-launch` runs as `<pid>`. Directories of live
/// supervisors (other daemons sharing the base) are left alone.
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim_end() == tailkitd_launch::LAUNCHER_NAME);
        if !alive && pid != std::process::id() {
            kill_and_remove_tree(&entry.path());
        }
    }
}
