//! The audit log's writer thread: the one owner of the sink. It appends
//! each record as one `write`, cuts a failed write back so no half line is
//! left, reopens a file that was deleted under it, and keeps every record
//! that could not be written (other than acceptances, whose jobs are then
//! refused) in a backlog that it retries, in order, until the sink takes
//! it again.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the backlog is retried while the sink fails.
pub(super) const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Denials kept in the backlog at most; past it, further denials are
/// dropped (and counted). Finishes are never dropped: see [`Kind::Finish`].
pub(super) const MAX_BACKLOG_DENIALS: usize = 1024;

/// What a record is, for what happens when it cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `exec.accepted`: never kept for later; its job is refused instead.
    Acceptance,
    /// `exec.denied`: kept for later, up to [`MAX_BACKLOG_DENIALS`].
    Denial,
    /// `exec.finished`, `exec.abandoned` and repairs: always kept for later.
    /// There is at most one per accepted job, and a job is accepted only
    /// when its acceptance was written with the backlog empty, so at most
    /// the job limit of them ever wait: each has its place reserved by the
    /// job slot it was accepted into.
    Finish,
}

/// Tells a waiting caller how its order went.
pub(super) type Reply = Box<dyn FnOnce(io::Result<()>) + Send>;

pub(super) enum Order {
    /// Append `line`, unless its caller gave up waiting and set
    /// `abandoned` (only acceptances carry one).
    Write {
        line: String,
        kind: Kind,
        abandoned: Option<Arc<AtomicBool>>,
        reply: Reply,
    },
    /// Reopen the file, then retry the backlog.
    Reopen { reply: Reply },
}

pub(super) enum Sink {
    File(File),
    Stdout,
}

/// What the writer tells the rest of the daemon about the sink (for
/// `/health`).
#[derive(Debug, Default)]
pub(super) struct Health {
    /// The last write failed, and no write has succeeded since.
    pub(super) failing: AtomicBool,
    /// Records waiting in the backlog.
    pub(super) backlog: AtomicUsize,
    /// Denials dropped because the backlog held too many.
    pub(super) dropped: AtomicU64,
    /// The last write error.
    pub(super) error: Mutex<Option<String>>,
}

/// The error a caller gets for a record that was not written yet but is
/// kept and will be (see [`super::is_queued`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}; the record is kept and written when the audit log can be written again")]
pub(super) struct Queued(String);

struct Writer<'a> {
    sink: Sink,
    path: Option<PathBuf>,
    backlog: VecDeque<(String, Kind)>,
    /// Denials in `backlog`.
    denials: usize,
    health: &'a Health,
}

/// The writer thread: carries out orders until every sender is gone,
/// retrying the backlog every [`RETRY_INTERVAL`] while it is not empty.
pub(super) fn write_orders(
    sink: Sink,
    path: Option<PathBuf>,
    queue: Receiver<Order>,
    queued: &AtomicUsize,
    health: &Health,
) {
    let mut writer = Writer {
        sink,
        path,
        backlog: VecDeque::new(),
        denials: 0,
        health,
    };
    loop {
        let order = if writer.backlog.is_empty() {
            match queue.recv() {
                Ok(order) => order,
                Err(_) => return,
            }
        } else {
            match queue.recv_timeout(RETRY_INTERVAL) {
                Ok(order) => order,
                Err(RecvTimeoutError::Timeout) => {
                    writer.flush_backlog();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    writer.flush_backlog();
                    writer.report_lost();
                    return;
                }
            }
        };
        queued.fetch_sub(1, Ordering::SeqCst);
        match order {
            Order::Write {
                line,
                kind,
                abandoned,
                reply,
            } => {
                // A caller that gave up has answered its client already
                // (for an acceptance: the job was refused); its record
                // must not appear after the fact.
                let result = if abandoned.is_some_and(|a| a.load(Ordering::SeqCst)) {
                    Err(super::timed_out())
                } else {
                    writer.write(line, kind)
                };
                reply(result);
            }
            Order::Reopen { reply } => {
                let result = writer.reopen();
                writer.flush_backlog();
                reply(result);
            }
        }
    }
}

impl Writer<'_> {
    /// Writes `line` after the backlog; keeps it in the backlog if it
    /// cannot be written and is not an acceptance.
    fn write(&mut self, line: String, kind: Kind) -> io::Result<()> {
        self.flush_backlog();
        if !self.backlog.is_empty() {
            // Still failing: nothing may overtake the backlog.
            let error = self.last_error();
            return self.defer(line, kind, error);
        }
        match self.write_now(&line) {
            Ok(()) => {
                self.recovered();
                Ok(())
            }
            Err(e) => {
                self.failed(&e);
                self.defer(line, kind, e)
            }
        }
    }

    /// Keeps `line` for later (see [`Kind`]); the caller's answer.
    fn defer(&mut self, line: String, kind: Kind, error: io::Error) -> io::Result<()> {
        match kind {
            Kind::Acceptance => return Err(error),
            Kind::Denial if self.denials >= MAX_BACKLOG_DENIALS => {
                self.health.dropped.fetch_add(1, Ordering::SeqCst);
                tracing::error!(error = %error, "an exec.denied audit record is lost: too many records wait for the audit log");
                return Err(error);
            }
            Kind::Denial => self.denials += 1,
            Kind::Finish => {}
        }
        self.backlog.push_back((line, kind));
        self.health
            .backlog
            .store(self.backlog.len(), Ordering::SeqCst);
        Err(io::Error::new(error.kind(), Queued(error.to_string())))
    }

    /// Writes the backlog, oldest first, until it is empty or a write fails.
    fn flush_backlog(&mut self) {
        while let Some((line, kind)) = self.backlog.pop_front() {
            match self.write_now(&line) {
                Ok(()) => {
                    if kind == Kind::Denial {
                        self.denials -= 1;
                    }
                    self.health
                        .backlog
                        .store(self.backlog.len(), Ordering::SeqCst);
                    if self.backlog.is_empty() {
                        self.recovered();
                    }
                }
                Err(e) => {
                    self.backlog.push_front((line, kind));
                    self.failed(&e);
                    return;
                }
            }
        }
    }

    fn failed(&self, e: &io::Error) {
        if !self.health.failing.swap(true, Ordering::SeqCst) {
            tracing::error!(error = %e, "the audit log cannot be written; records are kept and retried, new jobs are refused");
        }
        *self.health.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    fn recovered(&self) {
        if self.health.failing.swap(false, Ordering::SeqCst) {
            tracing::warn!("the audit log can be written again");
        }
    }

    fn last_error(&self) -> io::Error {
        let text = self
            .health
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "the audit log cannot be written".into());
        io::Error::other(text)
    }

    fn report_lost(&self) {
        if !self.backlog.is_empty() {
            tracing::error!(
                records = self.backlog.len(),
                "audit records could not be written before the daemon stopped and are lost (the next start records the jobs as exec.abandoned)"
            );
        }
    }

    fn reopen(&mut self) -> io::Result<()> {
        if let Some(path) = &self.path {
            self.sink = Sink::File(open_append(path)?);
        }
        Ok(())
    }

    /// Appends `line` to the sink in one write. A file that was deleted
    /// under the daemon is reopened (created again) first; a failed write
    /// to a regular file is cut back, so no half line is left for the next
    /// record to be glued onto.
    fn write_now(&mut self, line: &str) -> io::Result<()> {
        match &mut self.sink {
            Sink::File(file) => {
                use std::os::unix::fs::MetadataExt;
                let mut meta = file.metadata().ok();
                if meta.as_ref().is_some_and(|m| m.nlink() == 0)
                    && let Some(path) = &self.path
                {
                    *file = open_append(path)?;
                    tracing::warn!(path = %path.display(), "the audit log file was deleted; it was created again");
                    meta = file.metadata().ok();
                }
                let before = meta.filter(|m| m.is_file()).map(|m| m.len());
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
        }
    }
}

pub(super) fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}
