//! The audit log: one JSON object per line, appended and flushed to the OS
//! before the caller goes on, so an `exec.accepted` record exists before the
//! command starts. A separate sink from `tracing`: operators ship and keep
//! it differently from debug logs.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::tailnet::Identity;

/// The three kinds of audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AuditEvent {
    /// A job was accepted; written before its process starts.
    #[serde(rename = "exec.accepted")]
    Accepted,
    /// A request to run a command was refused; `reason` says why.
    #[serde(rename = "exec.denied")]
    Denied,
    /// A job that was accepted reached a terminal state.
    #[serde(rename = "exec.finished")]
    Finished,
}

/// The caller as the audit log names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuditCaller {
    /// MagicDNS name of the calling node.
    pub node: String,
    /// Stable node id.
    pub node_id: String,
    /// The tailnet address the request came from.
    pub ip: Option<IpAddr>,
    /// User login; empty for tagged nodes.
    pub user: String,
    /// ACL tags of the node.
    pub tags: Vec<String>,
}

impl AuditCaller {
    /// The caller record for `identity`, seen at address `ip`.
    pub fn new(identity: &Identity, ip: Option<IpAddr>) -> Self {
        AuditCaller {
            node: identity.node_name.clone(),
            node_id: identity.node_id.clone(),
            ip: ip.or_else(|| identity.ips.first().copied()),
            user: identity.user_login.clone(),
            tags: identity.tags.clone(),
        }
    }
}

/// One line of the audit log. Optional fields are left out when unset.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// RFC 3339 UTC timestamp with milliseconds, set by [`AuditRecord::new`].
    pub ts: String,
    /// Which kind of record this is.
    pub event: AuditEvent,
    /// Who asked.
    pub caller: AuditCaller,
    /// Tool name from the request path.
    pub tool: String,
    /// Command name from the request path.
    pub command: String,
    /// Arguments as given, sensitive ones replaced by `"<redacted>"`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, serde_json::Value>,
    /// The job id (accepted and finished records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Why a request was denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// HTTP status the denial was answered with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Terminal status of a finished job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Exit code of a finished job (-1 when it did not exit normally).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that killed the command, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// The job's error text, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the job ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Bytes the command wrote to stdout (all of them, not only those kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_bytes: Option<u64>,
    /// Bytes the command wrote to stderr (all of them, not only those kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_bytes: Option<u64>,
}

impl AuditRecord {
    /// A record of `event` stamped now, with the optional fields unset.
    pub fn new(event: AuditEvent, caller: AuditCaller, tool: &str, command: &str) -> Self {
        AuditRecord {
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
            caller,
            tool: tool.to_string(),
            command: command.to_string(),
            args: BTreeMap::new(),
            job_id: None,
            reason: None,
            http_status: None,
            status: None,
            exit_code: None,
            signal: None,
            error: None,
            duration_ms: None,
            stdout_bytes: None,
            stderr_bytes: None,
        }
    }
}

enum Target {
    /// Append to this file; reopened on SIGHUP for log rotation.
    File(PathBuf),
    /// Standard output (`-`).
    Stdout,
    /// Keep everything in memory (tests and benchmarks).
    Memory,
}

enum Sink {
    File(File),
    Stdout,
    Memory(Vec<String>),
}

/// The audit log writer. Cheap to share behind an `Arc`; every record is one
/// `write` of a whole line under a mutex, so lines never interleave.
pub struct AuditLog {
    target: Target,
    sink: Mutex<Sink>,
}

impl AuditLog {
    /// Opens `path` for appending (creating it, mode 0600), or standard
    /// output when `path` is `-`.
    ///
    /// # Errors
    ///
    /// When the file cannot be opened for appending.
    pub fn open(path: &Path) -> io::Result<Self> {
        if path.as_os_str() == "-" {
            return Ok(AuditLog {
                target: Target::Stdout,
                sink: Mutex::new(Sink::Stdout),
            });
        }
        let file = open_append(path)?;
        Ok(AuditLog {
            target: Target::File(path.to_path_buf()),
            sink: Mutex::new(Sink::File(file)),
        })
    }

    /// A log that keeps its lines in memory; see [`AuditLog::lines`].
    pub fn in_memory() -> Self {
        AuditLog {
            target: Target::Memory,
            sink: Mutex::new(Sink::Memory(Vec::new())),
        }
    }

    /// The lines written so far to an in-memory log (empty for other logs).
    pub fn lines(&self) -> Vec<String> {
        match &*self.lock() {
            Sink::Memory(lines) => lines.clone(),
            _ => Vec::new(),
        }
    }

    /// Where records go, for the start-up log line.
    pub fn describe(&self) -> String {
        match &self.target {
            Target::File(p) => p.display().to_string(),
            Target::Stdout => "-".into(),
            Target::Memory => "(memory)".into(),
        }
    }

    /// Reopens the file (after log rotation moved it away). A no-op for
    /// stdout and memory logs. On failure the old file stays in use.
    ///
    /// # Errors
    ///
    /// When the path can no longer be opened for appending.
    pub fn reopen(&self) -> io::Result<()> {
        if let Target::File(path) = &self.target {
            let file = open_append(path)?;
            *self.lock() = Sink::File(file);
        }
        Ok(())
    }

    /// Appends one record as a JSON line and hands it to the OS before
    /// returning. Blocks the calling thread for the write: from async code
    /// use [`AuditLog::record_async`].
    ///
    /// # Errors
    ///
    /// When the line cannot be written completely (disk full, file gone
    /// read-only, ...). The caller decides what a lost record means: for an
    /// acceptance it means the job must not start.
    pub fn record(&self, record: &AuditRecord) -> io::Result<()> {
        self.write_line(to_line(record)?)
    }

    /// [`AuditLog::record`] on tokio's blocking pool, so that a slow sink (a
    /// full disk, a stdout pipe nobody drains) holds no runtime worker.
    ///
    /// # Errors
    ///
    /// As [`AuditLog::record`].
    pub async fn record_async(self: &Arc<Self>, record: &AuditRecord) -> io::Result<()> {
        let line = to_line(record)?;
        let log = Arc::clone(self);
        tokio::task::spawn_blocking(move || log.write_line(line))
            .await
            .map_err(io::Error::other)?
    }

    fn write_line(&self, mut line: String) -> io::Result<()> {
        match &mut *self.lock() {
            Sink::File(file) => {
                // A failed write must not leave half a line for the next
                // record to be glued onto: cut a regular file back.
                let before = file
                    .metadata()
                    .ok()
                    .filter(|m| m.is_file())
                    .map(|m| m.len());
                let written = file.write_all(line.as_bytes());
                if written.is_err()
                    && let Some(len) = before
                {
                    let _ = file.set_len(len);
                }
                written
            }
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line.as_bytes())?;
                out.flush()
            }
            Sink::Memory(lines) => {
                line.pop();
                lines.push(line);
                Ok(())
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sink> {
        // A panic while holding the lock cannot leave a half-written line
        // in the sink's state, so a poisoned lock is still usable.
        self.sink.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One record as a JSON line, newline included.
fn to_line(record: &AuditRecord) -> io::Result<String> {
    let mut line = serde_json::to_string(record).map_err(io::Error::other)?;
    line.push('\n');
    Ok(line)
}

fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller() -> AuditCaller {
        AuditCaller {
            node: "laptop.ts.net".into(),
            node_id: "n1".into(),
            ip: Some("100.64.0.2".parse().unwrap()),
            user: "alice@example.com".into(),
            tags: vec![],
        }
    }

    #[test]
    fn records_are_json_lines_with_the_event_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let mut rec = AuditRecord::new(AuditEvent::Accepted, caller(), "disk", "usage");
        rec.job_id = Some("j1".into());
        rec.args.insert("path".into(), "/var".into());
        log.record(&rec).unwrap();
        let mut rec = AuditRecord::new(AuditEvent::Denied, caller(), "disk", "usage");
        rec.reason = Some("missing capability".into());
        log.record(&rec).unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "exec.accepted");
        assert_eq!(lines[0]["job_id"], "j1");
        assert_eq!(lines[0]["args"]["path"], "/var");
        assert_eq!(lines[0]["caller"]["user"], "alice@example.com");
        assert_eq!(lines[0]["caller"]["ip"], "100.64.0.2");
        assert!(lines[0].get("reason").is_none());
        assert_eq!(lines[1]["event"], "exec.denied");
        assert_eq!(lines[1]["reason"], "missing capability");
    }

    #[test]
    fn reopen_follows_a_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        log.record(&AuditRecord::new(AuditEvent::Denied, caller(), "a", "b"))
            .unwrap();
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        log.reopen().unwrap();
        log.record(&AuditRecord::new(AuditEvent::Denied, caller(), "c", "d"))
            .unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(new.lines().count(), 1);
        assert!(new.contains(r#""tool":"c""#));
    }

    #[tokio::test]
    async fn async_records_reach_the_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = Arc::new(AuditLog::open(&path).unwrap());
        for tool in ["a", "b", "c"] {
            log.record_async(&AuditRecord::new(AuditEvent::Denied, caller(), tool, "x"))
                .await
                .unwrap();
        }
        let tools: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["tool"].to_string())
            .collect();
        assert_eq!(tools, [r#""a""#, r#""b""#, r#""c""#]);
        let full = Arc::new(AuditLog::open(Path::new("/dev/full")).unwrap());
        let err = full
            .record_async(&AuditRecord::new(AuditEvent::Accepted, caller(), "a", "b"))
            .await
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    }

    #[test]
    fn a_failed_write_is_reported() {
        let log = AuditLog::open(Path::new("/dev/full")).unwrap();
        let err = log
            .record(&AuditRecord::new(AuditEvent::Accepted, caller(), "a", "b"))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    }
}
