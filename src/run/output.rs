//! A job's output as it arrives, and its fixed sequence of events (SPEC §7).
//!
//! [`JobOutput`] is the job's one retained buffer: the runner's output
//! capture writes stdout and stderr into it ([`JobOutput::write`]), every
//! stream of the job reads it through a [`Cursor`] of its own, and the
//! finished result's `stdout`/`stderr` are the same bytes, moved out
//! ([`JobOutput::take`]) and shared back ([`JobOutput::seal`]), never
//! copied. A reader costs a cursor, not a copy; a slow one holds back
//! nobody, since the writer never waits for readers.
//!
//! What is kept, per stream: the first `cap` bytes, converted to UTF-8 on
//! the way in (each invalid sequence becomes U+FFFD, as
//! `String::from_utf8_lossy` does, so the result's text needs no copy);
//! the rest is counted and dropped. Events are derived from what is kept:
//! one per line (newline stripped, a `\r` before it too), lines longer
//! than [`MAX_LINE_BYTES`] split at a character boundary, a last partial
//! line flushed when the stream ends or reaches its cap.
//!
//! The event index does not grow per line: it holds one entry per *run*
//! of consecutive lines from the same stream (a switch between stdout and
//! stderr starts one), and a reader finds a run's lines by scanning its
//! bytes again with the same rule that counted them. Runs cost
//! [`INDEX_ENTRY_BYTES`] each; a stream gets `cap / 16 + 1 KiB` of them
//! free, and past that each run counts against the stream's cap, so a
//! command that alternates tiny lines between stdout and stderr keeps less
//! output, never more memory: a stream holds at most `cap + cap / 16 +
//! 1 KiB` bytes.
//!
//! Event ids are 1, 2, 3, ... and never change: 1 is `accepted`, then
//! `running` once the process started (lines that arrive before that wait
//! for it, so they always follow it), then the lines in the order they were
//! completed, and last the terminal status and `job.completed` or
//! `job.failed`.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::Serialize;
use tokio::sync::watch;

use super::result::{JobResult, JobStatus};
use super::runner::Output;

/// Longest line an event carries, in bytes of UTF-8; longer lines are
/// split into several events. Even escaped as JSON (at most 6 bytes per
/// byte) an event stays far below the Go SDK's 1 MiB line limit.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// What one entry of the event index costs against a stream's cap.
pub const INDEX_ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

/// One of the two output streams of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipe {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Pipe {
    /// `"stdout"` or `"stderr"`, as events name them.
    pub fn as_str(self) -> &'static str {
        match self {
            Pipe::Stdout => "stdout",
            Pipe::Stderr => "stderr",
        }
    }

    fn index(self) -> usize {
        match self {
            Pipe::Stdout => 0,
            Pipe::Stderr => 1,
        }
    }
}

/// How a job ended, as its terminal event tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminal {
    /// `completed`, `failed` or `cancelled`.
    pub status: JobStatus,
    /// The job's exit code (-1 unless it exited).
    pub exit_code: i32,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// The signal that killed it, if one did.
    pub signal: Option<String>,
    /// Whether stdout was cut at its cap (events cover what was kept).
    pub stdout_truncated: bool,
    /// Whether stderr was cut at its cap.
    pub stderr_truncated: bool,
}

impl Terminal {
    fn of(result: &JobResult) -> Self {
        Terminal {
            status: result.status,
            exit_code: result.exit_code,
            error: result.error.clone(),
            signal: result.signal.clone(),
            stdout_truncated: result.stdout_truncated,
            stderr_truncated: result.stderr_truncated,
        }
    }
}

/// One event of a job's sequence, borrowed from its buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// The job entered `status` (`job.status`).
    Status(JobStatus),
    /// One line of output (`job.stdout` / `job.stderr`).
    Line {
        /// The stream it came on.
        pipe: Pipe,
        /// The line, without its newline.
        line: Cow<'a, str>,
    },
    /// The end: `job.completed` for `completed`, else `job.failed`.
    Finished(&'a Terminal),
}

/// An event's JSON: the Go SDK's `types.JobUpdate` fields, plus, on the
/// terminal event, the additive `signal` and `*_truncated`.
#[derive(Serialize)]
struct Update<'a> {
    job_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout_truncated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr_truncated: Option<bool>,
}

impl Event<'_> {
    /// The event's name: `job.status`, `job.stdout`, `job.stderr`,
    /// `job.completed` or `job.failed`.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Status(_) => "job.status",
            Event::Line {
                pipe: Pipe::Stdout, ..
            } => "job.stdout",
            Event::Line {
                pipe: Pipe::Stderr, ..
            } => "job.stderr",
            Event::Finished(t) if t.status == JobStatus::Completed => "job.completed",
            Event::Finished(_) => "job.failed",
        }
    }

    /// Appends the event's JSON (one line: no raw newline) for job
    /// `job_id` to `out`.
    pub fn write_json(&self, job_id: &str, out: &mut Vec<u8>) {
        let mut update = Update {
            job_id,
            line: None,
            stream: None,
            status: None,
            exit_code: None,
            error: None,
            signal: None,
            stdout_truncated: None,
            stderr_truncated: None,
        };
        match self {
            Event::Status(status) => update.status = Some(status.as_str()),
            Event::Line { pipe, line } => {
                update.line = Some(line);
                update.stream = Some(pipe.as_str());
            }
            Event::Finished(t) => {
                update.exit_code = Some(t.exit_code);
                update.error = t.error.as_deref();
                update.signal = t.signal.as_deref();
                update.stdout_truncated = Some(t.stdout_truncated);
                update.stderr_truncated = Some(t.stderr_truncated);
            }
        }
        // Writing plain data into a Vec cannot fail.
        let _ = serde_json::to_writer(out, &update);
    }
}

/// Where a reader is in a job's sequence: the next event it wants, and
/// where that event's line starts, so that following a job costs no
/// search.
#[derive(Debug, Clone)]
pub struct Cursor {
    next: u64,
    /// The index entry `offset` belongs to.
    entry: usize,
    /// Byte offset of event `next`'s line, when it is in `entry`.
    offset: Option<usize>,
}

impl Cursor {
    /// A cursor at the first event.
    pub fn start() -> Self {
        Cursor::after(0)
    }

    /// A cursor right after event `last` (`Last-Event-ID`).
    pub fn after(last: u64) -> Self {
        Cursor {
            next: last.saturating_add(1),
            entry: 0,
            offset: None,
        }
    }

    /// The id of the next event this cursor reads.
    pub fn next_id(&self) -> u64 {
        self.next
    }
}

/// Why [`JobOutput::read`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadState {
    /// The visitor asked to stop; more events may be ready.
    Paused,
    /// Every event so far was read; wait for [`JobOutput::subscribe`].
    Waiting,
    /// The terminal event was read: nothing follows.
    Ended,
    /// The sequence cannot go on (the job was abandoned before it ran, or
    /// its output is gone): say so and end.
    Failed(String),
}

/// A job's output and events; see the module documentation.
#[derive(Debug)]
pub struct JobOutput {
    log: RwLock<Log>,
    /// Per stream, outside the lock: once a stream is full, the writer
    /// only counts.
    counters: [Counters; 2],
    /// Bumped whenever readers may have something new.
    changes: watch::Sender<u64>,
    cap: usize,
}

#[derive(Debug, Default)]
struct Counters {
    total: AtomicU64,
    full: AtomicBool,
    dropped: AtomicBool,
}

#[derive(Debug)]
struct Log {
    pipes: [Buffer; 2],
    entries: Vec<Entry>,
    /// Events in `entries` (ids 1..=events).
    events: u64,
    status: JobStatus,
    end: End,
}

#[derive(Debug)]
enum End {
    Open,
    /// Terminal: ids `events + 1` (the status) and `events + 2` follow.
    Sealed(Terminal),
    Aborted(String),
}

/// An entry of the event index: one status event, or a run of lines of
/// one stream whose bytes start at `start`.
#[derive(Debug, Clone, Copy)]
enum Entry {
    Status {
        id: u64,
        status: JobStatus,
    },
    Lines {
        first: u64,
        count: u32,
        start: u32,
        pipe: Pipe,
    },
}

impl Entry {
    fn first(&self) -> u64 {
        match *self {
            Entry::Status { id, .. } => id,
            Entry::Lines { first, .. } => first,
        }
    }

    fn last(&self) -> u64 {
        match *self {
            Entry::Status { id, .. } => id,
            Entry::Lines { first, count, .. } => first + u64::from(count) - 1,
        }
    }
}

#[derive(Debug)]
struct Buffer {
    data: Data,
    /// Start of the first line not counted as an event yet.
    counted: usize,
    /// No more bytes come: end of file, the cap reached, or taken.
    closed: bool,
    /// Bytes were dropped at the cap.
    truncated: bool,
    /// An incomplete UTF-8 sequence carried to the next write.
    pending: Vec<u8>,
    /// Index bytes attributed to this stream.
    index_bytes: usize,
}

#[derive(Debug)]
enum Data {
    Live(Vec<u8>),
    /// Moved into the job's result; `usize` is its length.
    Taken(usize),
    /// The job's result holds the bytes.
    Shared(Arc<JobResult>, Pipe),
    /// The result does not hold the bytes that were taken (its task ended
    /// early): the lines cannot be read any more.
    Lost,
}

impl Data {
    fn bytes(&self) -> Result<&[u8], Unreadable> {
        match self {
            Data::Live(v) => Ok(v),
            Data::Shared(result, Pipe::Stdout) => Ok(result.stdout.as_bytes()),
            Data::Shared(result, Pipe::Stderr) => Ok(result.stderr.as_bytes()),
            Data::Taken(_) => Err(Unreadable::InFlight),
            Data::Lost => Err(Unreadable::Lost),
        }
    }

    fn len(&self) -> usize {
        match self {
            Data::Taken(len) => *len,
            other => other.bytes().map_or(0, <[u8]>::len),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unreadable {
    /// Between the end of the run and the stored result.
    InFlight,
    Lost,
}

impl Buffer {
    fn new() -> Self {
        Buffer {
            data: Data::Live(Vec::new()),
            counted: 0,
            closed: false,
            truncated: false,
            pending: Vec::new(),
            index_bytes: 0,
        }
    }

    /// Bytes that may still be kept: the cap, less what is kept, less the
    /// index bytes past the free allowance.
    fn room(&self, cap: usize) -> usize {
        let excess = self.index_bytes.saturating_sub(free_index_bytes(cap));
        cap.saturating_sub(self.data.len() + excess)
    }

    /// Keeps `input` (raw bytes, an incomplete UTF-8 sequence at its end
    /// carried over) as UTF-8 text, up to the cap.
    fn push_bytes(&mut self, input: &[u8], cap: usize) {
        let mut rest = input;
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    self.push_text(text, cap);
                    return;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    if let Ok(text) = std::str::from_utf8(valid)
                        && !self.push_text(text, cap)
                    {
                        return;
                    }
                    match e.error_len() {
                        Some(n) => {
                            if !self.push_text("\u{FFFD}", cap) {
                                return;
                            }
                            rest = &after[n..];
                        }
                        None => {
                            self.pending = after.to_vec();
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Keeps as much of `text` as fits, cut at a character boundary;
    /// returns whether all of it did.
    fn push_text(&mut self, text: &str, cap: usize) -> bool {
        let room = self.room(cap);
        let Data::Live(data) = &mut self.data else {
            return false;
        };
        if self.closed {
            self.truncated |= !text.is_empty();
            return false;
        }
        let mut keep = text.len().min(room);
        while !text.is_char_boundary(keep) {
            keep -= 1;
        }
        reserve_within(data, keep, cap);
        data.extend_from_slice(&text.as_bytes()[..keep]);
        if keep < text.len() {
            self.truncated = true;
        }
        if keep == room {
            // Full: what is kept is final, its last line can go out.
            self.closed = true;
            self.pending.clear();
        }
        keep == text.len()
    }

    /// The end of the input: a carried incomplete sequence becomes U+FFFD.
    fn finish_input(&mut self, cap: usize) {
        if !self.pending.is_empty() {
            self.pending.clear();
            self.push_text("\u{FFFD}", cap);
        }
        self.closed = true;
    }
}

/// The index bytes a stream with `cap` gets without counting them against
/// the cap.
fn free_index_bytes(cap: usize) -> usize {
    cap / 16 + 1024
}

/// Grows `data` for `additional` more bytes, doubling but never past
/// `limit` (the cap), so that a full buffer holds no spare capacity.
fn reserve_within(data: &mut Vec<u8>, additional: usize, limit: usize) {
    let needed = data.len() + additional;
    if needed <= data.capacity() {
        return;
    }
    let target = (data.capacity() * 2)
        .max(needed)
        .max(4096)
        .min(limit.max(needed));
    data.reserve_exact(target - data.len());
}

/// One line event's place in its stream's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    /// Where the next piece starts.
    end: usize,
    /// Where the line's text ends (before `\n` or `\r\n`).
    text_end: usize,
}

/// The line event that starts at `at` in `bytes` (valid UTF-8), if it is
/// complete: it ends at a newline, or is cut at [`MAX_LINE_BYTES`], or is
/// what is left of a `closed` stream. The same bytes always give the same
/// pieces, which is what makes event ids fixed: a piece is only decided
/// once the bytes that decide it are there (a newline, or enough bytes to
/// know the line is too long).
fn next_piece(bytes: &[u8], at: usize, closed: bool) -> Option<Piece> {
    let available = bytes.len();
    if at >= available {
        return None;
    }
    let window = &bytes[at..available.min(at + MAX_LINE_BYTES + 2)];
    if let Some(i) = memchr::memchr(b'\n', window) {
        let newline = at + i;
        let text_end = if newline > at && bytes[newline - 1] == b'\r' {
            newline - 1
        } else {
            newline
        };
        if text_end - at <= MAX_LINE_BYTES {
            return Some(Piece {
                end: newline + 1,
                text_end,
            });
        }
    } else if !closed && window.len() < MAX_LINE_BYTES + 2 {
        return None;
    }
    if available - at <= MAX_LINE_BYTES {
        // The last partial line of a closed stream.
        return Some(Piece {
            end: available,
            text_end: available,
        });
    }
    // Too long: cut at the last character boundary within the limit.
    let mut cut = at + MAX_LINE_BYTES;
    while cut > at && bytes[cut] & 0xC0 == 0x80 {
        cut -= 1;
    }
    if cut == at {
        cut = at + MAX_LINE_BYTES;
    }
    Some(Piece {
        end: cut,
        text_end: cut,
    })
}

impl Log {
    /// Counts the complete lines of `pipe` not counted yet as events, if
    /// the job is past `accepted` (or `force`, when it ends): lines never
    /// come before `running`.
    fn count_lines(&mut self, pipe: Pipe, force: bool, cap: usize) -> bool {
        if self.status == JobStatus::Accepted && !force {
            return false;
        }
        let buffer = &mut self.pipes[pipe.index()];
        let Ok(bytes) = buffer.data.bytes() else {
            return false;
        };
        let start = buffer.counted;
        let mut count: u32 = 0;
        while let Some(piece) = next_piece(bytes, buffer.counted, buffer.closed) {
            buffer.counted = piece.end;
            count += 1;
        }
        if count == 0 {
            return false;
        }
        match self.entries.last_mut() {
            Some(Entry::Lines {
                count: n, pipe: p, ..
            }) if *p == pipe => *n += count,
            _ => {
                self.entries.push(Entry::Lines {
                    first: self.events + 1,
                    count,
                    // The cap keeps offsets far below 4 GiB.
                    start: u32::try_from(start).unwrap_or(u32::MAX),
                    pipe,
                });
                let buffer = &mut self.pipes[pipe.index()];
                buffer.index_bytes += INDEX_ENTRY_BYTES;
                if buffer.room(cap) == 0 && !buffer.closed && matches!(buffer.data, Data::Live(_)) {
                    buffer.closed = true;
                    buffer.pending.clear();
                }
            }
        }
        self.events += u64::from(count);
        true
    }

    fn enter(&mut self, status: JobStatus) {
        self.status = status;
        self.events += 1;
        self.entries.push(Entry::Status {
            id: self.events,
            status,
        });
    }

    /// The index entry holding event `id` (which is at most `events`),
    /// trying `hint` first.
    fn find(&self, id: u64, hint: usize) -> Option<usize> {
        for i in [hint, hint + 1] {
            if self
                .entries
                .get(i)
                .is_some_and(|e| e.first() <= id && id <= e.last())
            {
                return Some(i);
            }
        }
        let i = self.entries.partition_point(|e| e.last() < id);
        (i < self.entries.len()).then_some(i)
    }
}

impl JobOutput {
    /// The output of a new job, in state `accepted` (event 1), keeping at
    /// most `cap` bytes per stream.
    pub fn new(cap: usize) -> Arc<Self> {
        let mut log = Log {
            pipes: [Buffer::new(), Buffer::new()],
            entries: Vec::new(),
            events: 0,
            status: JobStatus::Accepted,
            end: End::Open,
        };
        log.enter(JobStatus::Accepted);
        Arc::new(JobOutput {
            log: RwLock::new(log),
            counters: Default::default(),
            changes: watch::Sender::new(0),
            cap,
        })
    }

    /// The cap per stream, in bytes.
    pub fn cap(&self) -> usize {
        self.cap
    }

    fn write_log(&self) -> RwLockWriteGuard<'_, Log> {
        // Every change leaves the log consistent before anything that
        // could panic, so a poisoned lock is still usable.
        self.log.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read_log(&self) -> RwLockReadGuard<'_, Log> {
        self.log.read().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Keeps `bytes` the command wrote on `pipe` (up to the cap; every byte
    /// is counted). Never waits for readers.
    pub fn write(&self, pipe: Pipe, bytes: &[u8]) {
        let counters = &self.counters[pipe.index()];
        counters
            .total
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if bytes.is_empty() {
            return;
        }
        if counters.full.load(Ordering::Relaxed) {
            counters.dropped.store(true, Ordering::Relaxed);
            return;
        }
        let mut log = self.write_log();
        let buffer = &mut log.pipes[pipe.index()];
        if buffer.pending.is_empty() {
            buffer.push_bytes(bytes, self.cap);
        } else {
            let joined = [std::mem::take(&mut buffer.pending).as_slice(), bytes].concat();
            buffer.push_bytes(&joined, self.cap);
        }
        let new = log.count_lines(pipe, false, self.cap);
        if log.pipes[pipe.index()].closed {
            counters.full.store(true, Ordering::Relaxed);
        }
        drop(log);
        if new {
            self.notify();
        }
    }

    /// The end of `pipe` (end of file): its last partial line is complete.
    pub fn close(&self, pipe: Pipe) {
        let mut log = self.write_log();
        log.pipes[pipe.index()].finish_input(self.cap);
        let new = log.count_lines(pipe, false, self.cap);
        drop(log);
        if new {
            self.notify();
        }
    }

    /// The process started: event `running`, then the lines that came
    /// before it. Only the first call counts.
    pub fn enter_running(&self) {
        let mut log = self.write_log();
        if log.status != JobStatus::Accepted || !matches!(log.end, End::Open) {
            return;
        }
        log.enter(JobStatus::Running);
        for pipe in [Pipe::Stdout, Pipe::Stderr] {
            log.count_lines(pipe, false, self.cap);
        }
        drop(log);
        self.notify();
    }

    /// Moves `pipe`'s kept bytes out, for the job's result (the stream is
    /// closed first). Readers wait for them until [`JobOutput::seal`]
    /// hands the result back.
    pub fn take(&self, pipe: Pipe) -> Output {
        let mut log = self.write_log();
        log.pipes[pipe.index()].finish_input(self.cap);
        log.count_lines(pipe, false, self.cap);
        let buffer = &mut log.pipes[pipe.index()];
        let len = buffer.data.len();
        let data = match std::mem::replace(&mut buffer.data, Data::Taken(len)) {
            Data::Live(data) => data,
            other => {
                buffer.data = other;
                Vec::new()
            }
        };
        let counters = &self.counters[pipe.index()];
        let truncated = buffer.truncated || counters.dropped.load(Ordering::Relaxed);
        drop(log);
        self.notify();
        Output {
            data,
            total: counters.total.load(Ordering::Relaxed),
            truncated,
        }
    }

    /// The job is terminal with `result`, whose `stdout`/`stderr` are the
    /// bytes [`JobOutput::take`] moved out: readers read them there. The
    /// terminal events follow the last lines. Only the first call counts.
    pub fn seal(&self, result: Arc<JobResult>) {
        let mut log = self.write_log();
        if !matches!(log.end, End::Open) {
            return;
        }
        for pipe in [Pipe::Stdout, Pipe::Stderr] {
            let buffer = &mut log.pipes[pipe.index()];
            let text = match pipe {
                Pipe::Stdout => &result.stdout,
                Pipe::Stderr => &result.stderr,
            };
            if let Data::Taken(len) = buffer.data {
                buffer.data = if text.len() == len {
                    Data::Shared(Arc::clone(&result), pipe)
                } else {
                    Data::Lost
                };
            }
            buffer.finish_input(self.cap);
            log.count_lines(pipe, true, self.cap);
        }
        log.status = result.status;
        log.end = End::Sealed(Terminal::of(&result));
        drop(log);
        self.notify();
    }

    /// The job will never run (its acceptance could not be recorded):
    /// readers are told `reason` and end.
    pub fn abort(&self, reason: &str) {
        let mut log = self.write_log();
        if matches!(log.end, End::Open) {
            log.end = End::Aborted(reason.to_string());
        }
        drop(log);
        self.notify();
    }

    /// Changes readers wait for: a new value means there may be new
    /// events (or the end).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether the job's terminal events are there.
    pub fn is_sealed(&self) -> bool {
        matches!(self.read_log().end, End::Sealed(_))
    }

    /// Bytes kept so far on `pipe`.
    pub fn kept(&self, pipe: Pipe) -> usize {
        self.read_log().pipes[pipe.index()].data.len()
    }

    /// Entries in the event index (its memory is this times
    /// [`INDEX_ENTRY_BYTES`]).
    pub fn index_len(&self) -> usize {
        self.read_log().entries.len()
    }

    /// Hands the events from `cursor` on to `visit` (id, event) until it
    /// returns `false` or none is left, and moves the cursor past them.
    /// `visit` runs under the read lock: it should only encode.
    pub fn read(
        &self,
        cursor: &mut Cursor,
        mut visit: impl FnMut(u64, Event<'_>) -> bool,
    ) -> ReadState {
        let log = self.read_log();
        loop {
            let id = cursor.next;
            let event = if id <= log.events {
                let Some(i) = log.find(id, cursor.entry) else {
                    return ReadState::Failed("internal error: an event is missing".into());
                };
                if i != cursor.entry {
                    cursor.entry = i;
                    cursor.offset = None;
                }
                match log.entries[i] {
                    Entry::Status { status, .. } => Event::Status(status),
                    Entry::Lines {
                        first, start, pipe, ..
                    } => {
                        let buffer = &log.pipes[pipe.index()];
                        let bytes = match buffer.data.bytes() {
                            Ok(bytes) => bytes,
                            Err(Unreadable::InFlight) => return ReadState::Waiting,
                            Err(Unreadable::Lost) => {
                                return ReadState::Failed(
                                    "the job's output is no longer available".into(),
                                );
                            }
                        };
                        let mut at = match cursor.offset {
                            Some(at) => at,
                            None => {
                                // Resuming inside a run: skip its earlier lines.
                                let mut at = start as usize;
                                for _ in first..id {
                                    match next_piece(bytes, at, buffer.closed) {
                                        Some(piece) => at = piece.end,
                                        None => break,
                                    }
                                }
                                at
                            }
                        };
                        let Some(piece) = next_piece(bytes, at, buffer.closed) else {
                            return ReadState::Failed("internal error: a line is missing".into());
                        };
                        let line = String::from_utf8_lossy(&bytes[at..piece.text_end]);
                        at = piece.end;
                        cursor.offset = Some(at);
                        Event::Line { pipe, line }
                    }
                }
            } else {
                match &log.end {
                    End::Open => return ReadState::Waiting,
                    End::Aborted(reason) => return ReadState::Failed(reason.clone()),
                    End::Sealed(t) if id == log.events + 1 => Event::Status(t.status),
                    End::Sealed(t) if id == log.events + 2 => Event::Finished(t),
                    End::Sealed(_) => return ReadState::Ended,
                }
            };
            cursor.next += 1;
            let last = matches!(event, Event::Finished(_));
            let more = visit(id, event);
            if last {
                return ReadState::Ended;
            }
            if !more {
                return ReadState::Paused;
            }
        }
    }
}

#[cfg(test)]
#[path = "output_tests.rs"]
mod tests;
