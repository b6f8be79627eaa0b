//! The audit log: one JSON object per line, appended and handed to the OS
//! before the caller goes on, so an `exec.accepted` record exists before the
//! command starts. A separate sink from `tracing`: operators ship and keep
//! it differently from debug logs. One thread of its own does the writing.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::SystemTime;

use serde::Serialize;

use crate::identity::Identity;

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

enum Sink {
    File(File),
    Stdout,
    Memory(Arc<Mutex<Vec<String>>>),
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

/// Tells a waiting caller how its order went.
type Reply = Box<dyn FnOnce(io::Result<()>) + Send>;

enum Order {
    /// Append `line`, unless its caller gave up waiting and set
    /// `abandoned` (only acceptances carry one; every other record is
    /// written however late).
    Write {
        line: String,
        abandoned: Option<Arc<AtomicBool>>,
        reply: Reply,
    },
    /// Reopen the file.
    Reopen { reply: Reply },
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
        let file = open_append(path)?;
        AuditLog::start(Target::File(path.to_path_buf()), Sink::File(file))
    }

    /// A log that keeps its lines in memory; see [`AuditLog::lines`].
    ///
    /// # Panics
    ///
    /// When the writer thread cannot start (tests and benchmarks only).
    pub fn in_memory() -> Self {
        AuditLog {
            target: Target::Memory,
            orders: None,
            queued: Arc::default(),
            memory: Some(Arc::new(Mutex::new(Vec::new()))),
            write_timeout: WRITE_TIMEOUT,
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
        let path = match &target {
            Target::File(p) => Some(p.clone()),
            _ => None,
        };
        let taken = queued.clone();
        std::thread::Builder::new()
            .name("tailkitd-audit".into())
            .spawn(move || write_orders(sink, path, queue, &taken))?;
        Ok(AuditLog {
            target,
            orders: Some(orders),
            queued,
            memory: None,
            write_timeout: WRITE_TIMEOUT,
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

    /// Reopens the file (after log rotation moved it away). A no-op for
    /// stdout and memory logs. On failure the old file stays in use.
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
    /// A late acceptance is then not written (unless its write had already
    /// begun): the caller refuses the job. Any other late record is still
    /// written when the sink moves again.
    pub fn record(&self, record: &AuditRecord) -> io::Result<()> {
        let line = to_line(record)?;
        if let Some(lines) = &self.memory {
            return write_line(&mut Sink::Memory(lines.clone()), line);
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
            return write_line(&mut Sink::Memory(lines.clone()), line);
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
                Err(timed_out())
            }
        }
    }

    /// Queues `line`, the text of `record`: bounded by [`QUEUE`] unless it
    /// is an `exec.finished`.
    fn write(
        &self,
        record: &AuditRecord,
        line: String,
        abandoned: Option<Arc<AtomicBool>>,
        reply: Reply,
    ) -> io::Result<()> {
        let order = Order::Write {
            line,
            abandoned,
            reply,
        };
        self.send(order, record.event != AuditEvent::Finished)
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

/// The writer thread: carries out orders until every sender is gone.
fn write_orders(
    mut sink: Sink,
    path: Option<PathBuf>,
    queue: Receiver<Order>,
    queued: &AtomicUsize,
) {
    for order in queue {
        queued.fetch_sub(1, Ordering::SeqCst);
        match order {
            Order::Write {
                line,
                abandoned,
                reply,
            } => {
                // A caller that gave up has answered its client already
                // (for an acceptance: the job was refused); its record
                // must not appear after the fact.
                let result = if abandoned.is_some_and(|a| a.load(Ordering::SeqCst)) {
                    Err(timed_out())
                } else {
                    write_line(&mut sink, line)
                };
                reply(result);
            }
            Order::Reopen { reply } => {
                let result = match &path {
                    Some(path) => open_append(path).map(|file| sink = Sink::File(file)),
                    None => Ok(()),
                };
                reply(result);
            }
        }
    }
}

fn write_line(sink: &mut Sink, mut line: String) -> io::Result<()> {
    match sink {
        Sink::File(file) => {
            // A failed write must not leave half a line for the next record
            // to be glued onto: cut a regular file back.
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
            lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            Ok(())
        }
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

    #[tokio::test]
    async fn reopen_follows_a_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        log.record(&AuditRecord::new(AuditEvent::Denied, caller(), "a", "b"))
            .unwrap();
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        log.reopen().await.unwrap();
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

    /// A log (write timeout 200 ms) into a FIFO whose reader (returned,
    /// non-blocking) reads nothing until the test does, filled with
    /// acceptances until one times out: the writer is then stuck on that
    /// record. Returns how many were written before it.
    async fn stalled_log(dir: &Path) -> (AuditLog, File, usize) {
        use std::os::unix::fs::OpenOptionsExt;
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let log = AuditLog::open(&fifo)
            .unwrap()
            .with_write_timeout(Duration::from_millis(200));
        let filler = AuditRecord::new(AuditEvent::Accepted, caller(), "filler", "c");
        for written in 0..5000 {
            if let Err(err) = log.record_async(&filler).await {
                assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
                return (log, reader, written);
            }
        }
        panic!("the pipe never filled up");
    }

    #[tokio::test]
    async fn a_stalled_sink_holds_callers_for_the_write_timeout_only() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _reader, written) = stalled_log(dir.path()).await;
        assert!(written > 0);
        // Later callers are answered too (timed out, or refused at once
        // when too many wait), never left hanging.
        let rec = AuditRecord::new(AuditEvent::Accepted, caller(), "t", "c");
        let err = log.record_async(&rec).await.unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn late_records_other_than_acceptances_are_still_written() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let (log, mut reader, _) = stalled_log(dir.path()).await;
        let record = |event, tool: &str| AuditRecord::new(event, caller(), tool, "c");
        // Queued behind the stalled write, all three time out; then fill
        // the queue, which refuses denials but never a finished record.
        let late = [
            record(AuditEvent::Accepted, "late-accepted"),
            record(AuditEvent::Denied, "late-denied"),
            record(AuditEvent::Finished, "late-finished"),
        ];
        for r in &late {
            let err = log.record_async(r).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        }
        for _ in 0..QUEUE {
            let _ = log.send(
                Order::Reopen {
                    reply: Box::new(|_| {}),
                },
                false,
            );
        }
        let full = log
            .record_async(&record(AuditEvent::Denied, "refused"))
            .await
            .unwrap_err();
        assert_eq!(full.kind(), io::ErrorKind::WouldBlock, "{full}");
        let err = log
            .record_async(&record(AuditEvent::Finished, "queued-finished"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");

        // The sink moves again: read everything.
        let mut text = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !String::from_utf8_lossy(&text).contains("queued-finished") {
            assert!(
                std::time::Instant::now() < deadline,
                "the late records never came"
            );
            let mut chunk = [0u8; 65536];
            match reader.read(&mut chunk) {
                Ok(n) => text.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        }
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains("late-denied"), "a late denial was dropped");
        assert!(text.contains("late-finished"), "a late finish was dropped");
        assert!(
            !text.contains("late-accepted"),
            "a refused job's acceptance was written"
        );
        assert!(
            !text.contains("\"refused\""),
            "a refused record was written"
        );
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
