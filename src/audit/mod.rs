//! The audit log: one JSON object per line, appended and handed to the OS
//! before the caller goes on, so an `exec.accepted` record exists before the
//! command starts. A separate sink from `tracing`: operators ship and keep
//! it differently from debug logs. One thread of its own does the writing
//! (`audit/writer.rs`): a record it cannot write (a full disk) is kept and written
//! once the sink takes records again, except an acceptance, whose job is
//! refused instead; `/health` tells while that lasts ([`AuditLog::status`]).
//! At start, the daemon closes the jobs a killed daemon left open in the
//! log ([`AuditLog::close_abandoned`], in `audit/recover.rs`).

mod recover;
mod writer;

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::identity::Identity;
use writer::{Health, Kind, Order, Reply, Sink};

/// The kinds of audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// A job whose acceptance is in the log but whose end is not: the
    /// daemon was killed (or crashed) while it ran, and the command did not
    /// outlive it. Written at the next start.
    #[serde(rename = "exec.abandoned")]
    Abandoned,
}

/// The caller as the audit log names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    /// RFC 3339 UTC timestamp with milliseconds, set by [`AuditRecord::new`].
    pub ts: String,
    /// Which kind of record this is.
    pub event: AuditEvent,
    /// Who asked.
    #[serde(default)]
    pub caller: AuditCaller,
    /// Tool name from the request path.
    pub tool: String,
    /// Command name from the request path.
    pub command: String,
    /// Arguments as given, sensitive ones replaced by `"<redacted>"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
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

    /// An `exec.denied` record of a request for `target` (tool, command)
    /// refused with `reason` and HTTP `status`, with the arguments as the
    /// log may show them (empty when they were never read).
    pub fn denial(
        caller: AuditCaller,
        target: (&str, &str),
        reason: &str,
        status: u16,
        args: BTreeMap<String, serde_json::Value>,
    ) -> Self {
        AuditRecord {
            reason: Some(reason.to_string()),
            http_status: Some(status),
            args,
            ..AuditRecord::new(AuditEvent::Denied, caller, target.0, target.1)
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

/// How long a caller waits for its record to be written before it gives up
/// (and, for an acceptance, refuses the job).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Orders queued for the writer at most before acceptances, denials and
/// reopens are refused at once rather than piling up behind a stalled sink.
/// `exec.finished` records are always queued: there is one per accepted
/// job, so they are bounded by the job limit already, and each must be
/// written.
const QUEUE: usize = 256;

/// The state of the audit log, as `/health` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditStatus {
    /// The last write failed and none has succeeded since: new jobs are
    /// refused (their acceptance cannot be written).
    pub failing: bool,
    /// The last write error, while failing.
    pub error: Option<String>,
    /// Records kept for when the log can be written again.
    pub queued: usize,
    /// Denials lost because too many records were kept already.
    pub dropped: u64,
}

/// Whether `e`, returned for a record, means that the record was not
/// written yet but is kept and will be, in order, once the log can be
/// written again.
pub fn is_queued(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<writer::Queued>())
}

/// Logs a record of `event` that [`AuditLog::record`] could not write:
/// as a warning when it is kept for later, else as an error.
pub fn log_unwritten(event: &str, e: &io::Error) {
    if is_queued(e) {
        tracing::warn!(error = %e, "the {event} audit record could not be written yet; it is kept");
    } else {
        tracing::error!(error = %e, "could not write the {event} audit record");
    }
}

/// The audit log writer. Cheap to share behind an `Arc`. One thread of its
/// own writes every record (a whole line per `write`, so lines never
/// interleave) and owns the file: a slow or stalled sink (a full disk, a
/// stdout nobody drains) holds up that thread and the callers waiting for
/// their record, each for at most [`WRITE_TIMEOUT`], and nothing else.
pub struct AuditLog {
    target: Target,
    /// The writer thread's queue (`None` for the in-memory log, which
    /// cannot stall and is written in place).
    orders: Option<Sender<Order>>,
    /// Orders sent and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    memory: Option<Arc<Mutex<Vec<String>>>>,
    write_timeout: Duration,
    health: Arc<Health>,
}

impl AuditLog {
    /// Opens `path` for appending (creating it, mode 0600), or standard
    /// output when `path` is `-`.
    ///
    /// # Errors
    ///
    /// When the file cannot be opened for appending, or the writer thread
    /// cannot start.
    pub fn open(path: &Path) -> io::Result<Self> {
        if path.as_os_str() == "-" {
            return AuditLog::start(Target::Stdout, Sink::Stdout);
        }
        let file = writer::open_append(path)?;
        AuditLog::start(Target::File(path.to_path_buf()), Sink::File(file))
    }

    /// A log that keeps its lines in memory; see [`AuditLog::lines`].
    pub fn in_memory() -> Self {
        AuditLog {
            target: Target::Memory,
            orders: None,
            queued: Arc::default(),
            memory: Some(Arc::new(Mutex::new(Vec::new()))),
            write_timeout: WRITE_TIMEOUT,
            health: Arc::default(),
        }
    }

    /// The same log with another [`WRITE_TIMEOUT`].
    pub fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    fn start(target: Target, sink: Sink) -> io::Result<Self> {
        let (orders, queue) = std::sync::mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(Health::default());
        let path = match &target {
            Target::File(p) => Some(p.clone()),
            _ => None,
        };
        let (taken, writer_health) = (queued.clone(), health.clone());
        std::thread::Builder::new()
            .name("tailkitd-audit".into())
            .spawn(move || writer::write_orders(sink, path, queue, &taken, &writer_health))?;
        Ok(AuditLog {
            target,
            orders: Some(orders),
            queued,
            memory: None,
            write_timeout: WRITE_TIMEOUT,
            health,
        })
    }

    /// The lines written so far to an in-memory log (empty for other logs).
    pub fn lines(&self) -> Vec<String> {
        self.memory
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    /// Where records go, for the start-up log line.
    pub fn describe(&self) -> String {
        match &self.target {
            Target::File(p) => p.display().to_string(),
            Target::Stdout => "-".into(),
            Target::Memory => "(memory)".into(),
        }
    }

    /// Whether the log can be written, and what waits for it.
    pub fn status(&self) -> AuditStatus {
        let failing = self.health.failing.load(Ordering::SeqCst);
        AuditStatus {
            failing,
            error: if failing {
                self.health
                    .error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            } else {
                None
            },
            queued: self.health.backlog.load(Ordering::SeqCst),
            dropped: self.health.dropped.load(Ordering::SeqCst),
        }
    }

    /// Reopens the file (after log rotation moved it away), then writes
    /// whatever records wait. A no-op for stdout and memory logs. On
    /// failure the old file stays in use.
    ///
    /// # Errors
    ///
    /// When the path can no longer be opened for appending, or the writer
    /// does not answer within [`WRITE_TIMEOUT`].
    pub async fn reopen(&self) -> io::Result<()> {
        if self.orders.is_none() {
            return Ok(());
        }
        let (reply, answer) = async_reply();
        self.send(Order::Reopen { reply }, true)?;
        self.wait(answer, None).await
    }

    /// Appends one record as a JSON line and waits until it was handed to
    /// the OS. Blocks the calling thread: from async code use
    /// [`AuditLog::record_async`].
    ///
    /// # Errors
    ///
    /// When the line cannot be written completely (disk full, file gone
    /// read-only, ...), too many records are already waiting (never for an
    /// `exec.finished`), or the write takes longer than [`WRITE_TIMEOUT`].
    /// An acceptance that failed or came too late is not written (unless
    /// its write had already begun): the caller refuses the job. Any other
    /// record that could not be written yet is kept and written later, in
    /// order ([`is_queued`] tells).
    pub fn record(&self, record: &AuditRecord) -> io::Result<()> {
        let line = to_line(record)?;
        if let Some(lines) = &self.memory {
            return write_in_memory(lines, line);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let abandoned = abandonable(record);
        self.write(
            record,
            line,
            abandoned.clone(),
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        )?;
        rx.recv_timeout(self.write_timeout).unwrap_or_else(|_| {
            if let Some(flag) = abandoned {
                flag.store(true, Ordering::SeqCst);
            }
            self.stalled();
            Err(timed_out())
        })
    }

    /// [`AuditLog::record`] for async code: waits without holding a thread.
    ///
    /// # Errors
    ///
    /// As [`AuditLog::record`].
    pub async fn record_async(&self, record: &AuditRecord) -> io::Result<()> {
        let line = to_line(record)?;
        if let Some(lines) = &self.memory {
            return write_in_memory(lines, line);
        }
        let abandoned = abandonable(record);
        let (reply, answer) = async_reply();
        self.write(record, line, abandoned.clone(), reply)?;
        self.wait(answer, abandoned.as_deref()).await
    }

    /// Waits for the writer's answer, at most the write timeout; a caller
    /// that gives up marks its order `abandoned`.
    async fn wait(
        &self,
        answer: tokio::sync::oneshot::Receiver<io::Result<()>>,
        abandoned: Option<&AtomicBool>,
    ) -> io::Result<()> {
        match tokio::time::timeout(self.write_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(writer_gone()),
            Err(_) => {
                if let Some(flag) = abandoned {
                    flag.store(true, Ordering::SeqCst);
                }
                self.stalled();
                Err(timed_out())
            }
        }
    }

    /// A caller gave up waiting: the sink is stalled (a stdout nobody
    /// drains, a hung file system), which `/health` reports as failing
    /// until the writer gets a record through.
    fn stalled(&self) {
        if !self.health.failing.swap(true, Ordering::SeqCst) {
            tracing::error!(
                timeout = ?self.write_timeout,
                "the audit log takes no records: its sink is stalled; new jobs are refused"
            );
        }
        *self.health.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
            "the audit log took no record within {:?}",
            self.write_timeout
        ));
    }

    /// Queues `line`, the text of `record`: bounded by [`QUEUE`] unless it
    /// is an `exec.finished` (or `exec.abandoned`).
    fn write(
        &self,
        record: &AuditRecord,
        line: String,
        abandoned: Option<Arc<AtomicBool>>,
        reply: Reply,
    ) -> io::Result<()> {
        let kind = match record.event {
            AuditEvent::Accepted => Kind::Acceptance,
            AuditEvent::Denied => Kind::Denial,
            AuditEvent::Finished | AuditEvent::Abandoned => Kind::Finish,
        };
        let order = Order::Write {
            line,
            kind,
            abandoned,
            reply,
        };
        self.send(order, kind != Kind::Finish)
    }

    /// Queues `order`; a `bounded` one is refused once [`QUEUE`] orders
    /// wait.
    fn send(&self, order: Order, bounded: bool) -> io::Result<()> {
        let Some(orders) = &self.orders else {
            return Err(writer_gone());
        };
        if self.queued.fetch_add(1, Ordering::SeqCst) >= QUEUE && bounded {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "the audit log is not keeping up: too many records are waiting",
            ));
        }
        orders.send(order).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            writer_gone()
        })
    }
}

/// The flag a caller sets when it gives up waiting for its record, for an
/// acceptance only: its job is then refused, so the record must not appear
/// afterwards.
fn abandonable(record: &AuditRecord) -> Option<Arc<AtomicBool>> {
    (record.event == AuditEvent::Accepted).then(|| Arc::new(AtomicBool::new(false)))
}

fn async_reply() -> (Reply, tokio::sync::oneshot::Receiver<io::Result<()>>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    (
        Box::new(move |result| {
            let _ = tx.send(result);
        }),
        rx,
    )
}

fn writer_gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the audit writer is gone")
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the audit record was not written in time",
    )
}

fn write_in_memory(lines: &Mutex<Vec<String>>, mut line: String) -> io::Result<()> {
    line.pop();
    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    Ok(())
}

/// One record as a JSON line, newline included.
fn to_line(record: &AuditRecord) -> io::Result<String> {
    let mut line = serde_json::to_string(record).map_err(io::Error::other)?;
    line.push('\n');
    Ok(line)
}

#[cfg(test)]
mod tests;
