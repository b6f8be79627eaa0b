//! Processes as /proc shows them.

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
