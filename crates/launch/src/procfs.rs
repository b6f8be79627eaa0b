//! Processes as /proc shows them, and the cgroup v2 directory of one.

use std::path::{Path, PathBuf};

/// One process as /proc/PID/stat shows it.
pub struct ProcStat {
    /// Its pid.
    pub pid: i32,
    /// Its state (`R`, `S`, `T`, `Z`, ...).
    pub state: char,
    /// Its parent's pid.
    pub ppid: i32,
    /// Its process group.
    pub pgid: i32,
    /// When it started, in clock ticks since boot (field 22): with the pid,
    /// this tells one process from a later one that got the same pid.
    pub start_time: u64,
    /// The status `waitpid` will report (field 52).
    pub exit_code: Option<i32>,
}

/// Process `pid` as /proc shows it, if it exists.
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold anything, parentheses included.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgid: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
        exit_code: fields.get(49).and_then(|f| f.parse().ok()),
    })
}

/// Every process in /proc.
pub fn proc_stats() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| proc_stat(entry.ok()?.file_name().to_str()?.parse().ok()?))
        .collect()
}

/// The cgroup v2 directory of process `pid` (a number, or `self`): its
/// `0::PATH` line in `/proc/PID/cgroup`, under the mount point of the
/// cgroup2 file system that this process sees. `None` without cgroup v2
/// (or when the path is not under the mount's root, as seen from another
/// cgroup namespace).
pub fn cgroup_dir_of(pid: &str) -> Option<PathBuf> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (root, mount_point) = cgroup2_mount(&mountinfo)?;
    let relative = Path::new(path).strip_prefix(&root).ok()?;
    Some(mount_point.join(relative))
}

/// The root and the mount point of the first cgroup2 mount in `mountinfo`.
fn cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = before.split_whitespace().collect();
        Some((
            PathBuf::from(unescape(fields.get(3)?)),
            PathBuf::from(unescape(fields.get(4)?)),
        ))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = field
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_among_v1_mounts() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified\\040dir rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some((
                PathBuf::from("/"),
                PathBuf::from("/sys/fs/cgroup/unified dir")
            ))
        );
        assert_eq!(cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/x rw\n"), None);
    }
}
