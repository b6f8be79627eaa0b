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
//! `String::from_utf8_lossy` does, so the result's text needs no copy)
//! and counted as the job result sends them, JSON-escaped (a newline
//! takes two bytes, a control byte six: `\u0001`), so that the cap bounds
//! the answer, not only what was read; the rest is counted and dropped. Events are derived from what is kept:
//! one per line (newline stripped, a `\r` before it too), lines longer
//! than [`MAX_LINE_BYTES`] split at a character boundary, a last partial
//! line flushed when the stream ends or reaches its cap.
//!
//! The event index does not grow per line: it holds one entry per *run*
//! of consecutive lines from the same stream (a switch between stdout and
//! stderr starts one, and so does every 4096th line, to bound a resume's
//! scan), and a reader finds a run's lines by scanning its bytes again
//! with the same rule that counted them. Runs cost
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

mod buffer;
mod event;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::watch;

use super::result::{JobResult, JobStatus};
use super::runner::Output;
use buffer::{Buffer, Data, Unreadable, next_piece};
pub use event::{Event, Pipe, Terminal};

/// Longest line an event carries, in bytes of UTF-8; longer lines are
/// split into several events. Even escaped as JSON (at most 6 bytes per
/// byte) an event stays far below the Go SDK's 1 MiB line limit.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// What one entry of the event index costs against a stream's cap.
pub const INDEX_ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

/// Lines in one index entry at most, so that resuming in the middle of a
/// run scans at most this many lines.
const RUN_LINES: u32 = 4096;

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

impl Log {
    /// Counts the complete lines of `pipe` not counted yet as events, if
    /// the job is past `accepted` (or `force`, when it ends): lines never
    /// come before `running`.
    fn count_lines(&mut self, pipe: Pipe, force: bool, cap: usize) -> bool {
        if self.status == JobStatus::Accepted && !force {
            return false;
        }
        let Log {
            pipes,
            entries,
            events,
            ..
        } = self;
        let buffer = &mut pipes[pipe.index()];
        let Buffer {
            data,
            counted,
            closed,
            index_bytes,
            ..
        } = buffer;
        let Ok(bytes) = data.bytes() else {
            return false;
        };
        let before = *events;
        while let Some(piece) = next_piece(bytes, *counted, *closed) {
            match entries.last_mut() {
                Some(Entry::Lines { count, pipe: p, .. }) if *p == pipe && *count < RUN_LINES => {
                    *count += 1;
                }
                _ => {
                    entries.push(Entry::Lines {
                        first: *events + 1,
                        count: 1,
                        // The cap keeps offsets far below 4 GiB.
                        start: u32::try_from(*counted).unwrap_or(u32::MAX),
                        pipe,
                    });
                    *index_bytes += INDEX_ENTRY_BYTES;
                }
            }
            *counted = piece.end;
            *events += 1;
        }
        if buffer.room(cap) == 0 && !buffer.closed && matches!(buffer.data, Data::Live(_)) {
            // The index took the last room: what is kept is final.
            buffer.closed = true;
            buffer.pending.clear();
        }
        *events > before
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
        log.entries.shrink_to_fit();
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

    /// The job's result left the store (its TTL, the count cap or the
    /// output budget): the output it shares with the result is let go, so
    /// that a stream still open on the job holds no memory outside the
    /// budget. A reader that still needs its lines is told that the output
    /// is no longer available; the terminal events stay readable.
    pub fn expire(&self) {
        let mut log = self.write_log();
        for buffer in &mut log.pipes {
            if matches!(buffer.data, Data::Shared(..)) {
                buffer.data = Data::Lost;
            }
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

    /// Bytes of the event index's line entries (what the store counts
    /// against its output budget, with the kept bytes).
    pub fn index_bytes(&self) -> usize {
        let log = self.read_log();
        log.pipes.iter().map(|b| b.index_bytes).sum()
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
mod tests;
