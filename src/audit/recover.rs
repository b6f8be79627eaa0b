//! Start-up repair of the audit log: a daemon that was killed (SIGKILL, the
//! OOM killer, a power cut) left jobs whose `exec.accepted` is in the log
//! and whose end is not. Its commands did not outlive it, so the next start
//! records each such job as `exec.abandoned`, and the log again has an end
//! for every job it accepted. Only the last [`TAIL_BYTES`] of the file are
//! read, so the work at start stays bounded however large the log grew.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use super::{AuditEvent, AuditLog, AuditRecord, Target};

/// How much of the end of the log is read at start (16 MiB: tens of
/// thousands of records, far more than the jobs one daemon can have
/// running).
pub const TAIL_BYTES: u64 = 16 << 20;
/// Abandoned jobs recorded at most in one start (a log written by
/// something else could name any number).
const MAX_ABANDONED: usize = 10_000;

/// The `reason` of an `exec.abandoned` record.
pub const ABANDONED_REASON: &str = "the daemon stopped without recording this job's end (killed or crashed); its command did not outlive the daemon";

/// What the end of a log file says.
#[derive(Debug, Default)]
pub(super) struct Tail {
    /// Acceptances without an end, in log order.
    pub(super) open: Vec<AuditRecord>,
    /// The file ends inside a line (the daemon died while writing it).
    pub(super) cut: bool,
}

/// Reads the last [`TAIL_BYTES`] of the log at `path`. A missing file, or
/// one that is not a regular file (a FIFO, a device), has nothing to say.
///
/// # Errors
///
/// When the file exists but cannot be read.
pub(super) fn read_tail(path: &Path) -> io::Result<Tail> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Tail::default()),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() == 0 {
        return Ok(Tail::default());
    }
    let start = meta.len().saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(meta.len() - 1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    file.seek(SeekFrom::Start(start))?;
    let mut lines = BufReader::new(file.take(meta.len() - start)).split(b'\n');
    if start > 0 {
        // Most likely the middle of a line.
        lines.next();
    }
    let mut open: HashMap<String, (usize, AuditRecord)> = HashMap::new();
    for (seq, line) in lines.enumerate() {
        let line = line?;
        let Some(record) = parse(&line) else { continue };
        let Some(id) = record.job_id.clone() else {
            continue;
        };
        match record.event {
            AuditEvent::Accepted => {
                open.insert(id, (seq, record));
            }
            AuditEvent::Finished | AuditEvent::Abandoned => {
                open.remove(&id);
            }
            AuditEvent::Denied => {}
        }
    }
    let mut open: Vec<(usize, AuditRecord)> = open.into_values().collect();
    open.sort_by_key(|(seq, _)| *seq);
    Ok(Tail {
        open: open.into_iter().map(|(_, r)| r).collect(),
        cut: last[0] != b'\n',
    })
}

/// A record of the events that matter here, or `None` (other lines, a
/// torn line, a line of something else).
fn parse(line: &[u8]) -> Option<AuditRecord> {
    // Cheap filter before parsing: denials are most lines in a busy log.
    let text = std::str::from_utf8(line).ok()?;
    if !(text.contains("\"exec.accepted\"")
        || text.contains("\"exec.finished\"")
        || text.contains("\"exec.abandoned\""))
    {
        return None;
    }
    serde_json::from_str(text).ok()
}

impl AuditLog {
    /// Records every job that the log shows accepted but never ended as
    /// `exec.abandoned` (a daemon killed while it ran; see `audit/recover.rs`),
    /// ending a torn last line first so that no record is glued onto it.
    /// Call it once at start, before serving. A no-op for stdout and
    /// memory logs. Returns how many jobs it closed.
    ///
    /// # Errors
    ///
    /// When the file cannot be read, or a record cannot be written (it is
    /// then kept and written later, see [`super::is_queued`]).
    pub fn close_abandoned(&self) -> io::Result<usize> {
        let Target::File(path) = &self.target else {
            return Ok(0);
        };
        let tail = read_tail(path)?;
        if tail.cut {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            self.send(
                super::Order::Write {
                    line: "\n".into(),
                    kind: super::Kind::Finish,
                    abandoned: None,
                    reply: Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                },
                false,
            )?;
            rx.recv_timeout(self.write_timeout)
                .unwrap_or_else(|_| Err(super::timed_out()))?;
        }
        if tail.open.len() > MAX_ABANDONED {
            tracing::warn!(
                open = tail.open.len(),
                "more accepted jobs without an end than one daemon can run; recording the last {MAX_ABANDONED}"
            );
        }
        let skip = tail.open.len().saturating_sub(MAX_ABANDONED);
        let mut closed = 0;
        for accepted in tail.open.into_iter().skip(skip) {
            let mut record = AuditRecord::new(
                AuditEvent::Abandoned,
                accepted.caller,
                &accepted.tool,
                &accepted.command,
            );
            record.args = accepted.args;
            record.job_id = accepted.job_id;
            record.reason = Some(ABANDONED_REASON.into());
            match self.record(&record) {
                Ok(()) => {}
                // Kept, and written once the log takes records again.
                Err(e) if super::is_queued(&e) => {}
                Err(e) => return Err(e),
            }
            closed += 1;
        }
        Ok(closed)
    }
}
