//! Everything the client prints goes through one thread ([`Output`]): the
//! remote lines (prefixed with the node's name in a fleet), notes, JSON,
//! the summary, and, on a terminal, the one-line progress display on
//! stderr, cleared before any other line and drawn again after it. Writes
//! are buffered and flushed whenever no message is waiting, so a flood
//! costs few system calls and a quiet stream shows at once; what waits is
//! bounded in messages and in bytes. A local stdout
//! that closes (`| head`) stops the call like Ctrl-C does.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};

use super::report::format_duration;
use super::stop::Stop;

/// The exit status for a local stdout that closed (128 + SIGPIPE).
pub const EXIT_BROKEN_PIPE: u8 = 141;

/// Messages waiting for the printer, at most.
const QUEUE: usize = 1024;
/// Bytes of remote output waiting for the printer, at most (a line is at
/// most 4 MiB, the event parser's limit; one bigger message waits alone).
const QUEUE_BYTES: usize = 8 << 20;
/// Redraws of the progress line, at most one per this.
const REDRAW: Duration = Duration::from_millis(100);

/// Which local stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipe {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

enum Msg {
    /// A remote line, without its newline; `cost` is its share of the
    /// byte budget.
    Line {
        node: usize,
        pipe: Pipe,
        text: String,
        cost: u32,
    },
    /// Bytes written as they are (one node's whole output, from a daemon
    /// that does not stream).
    Raw {
        pipe: Pipe,
        bytes: Vec<u8>,
        cost: u32,
    },
    /// Text written as is (ends with a newline).
    Text { pipe: Pipe, text: String },
    /// The counts changed, or a second passed.
    Progress,
    /// No more progress line.
    EndProgress,
}

/// Nodes done, running and failed, for the progress line.
#[derive(Debug, Default)]
pub struct Counts {
    /// Finished, whatever the outcome.
    pub done: AtomicUsize,
    /// Started and not finished.
    pub running: AtomicUsize,
    /// Finished with a non-zero status.
    pub failed: AtomicUsize,
}

/// The printer's handle; cheap to clone.
#[derive(Clone)]
pub struct Output {
    tx: mpsc::Sender<Msg>,
    counts: Arc<Counts>,
    prefixed: bool,
    /// The byte budget of the queue: taken before a message is queued,
    /// given back once it is written.
    budget: Arc<Semaphore>,
}

/// The printer thread, to wait for at the end.
pub struct Printer {
    thread: std::thread::JoinHandle<()>,
}

impl Output {
    /// Starts the printer. `names` are the nodes' names; `prefixed` puts
    /// `name: ` before each remote line; `progress` draws the progress
    /// line on stderr (only ever asked for when stderr is a terminal).
    pub fn start(
        names: Vec<String>,
        prefixed: bool,
        progress: bool,
        stop: Stop,
    ) -> (Output, Printer) {
        Output::start_to(
            (Box::new(io::stdout()), Box::new(io::stderr())),
            names,
            prefixed,
            progress,
            stop,
        )
    }

    /// [`Output::start`] writing to `sinks` (stdout, stderr) instead.
    pub fn start_to(
        sinks: (Box<dyn Write + Send>, Box<dyn Write + Send>),
        names: Vec<String>,
        prefixed: bool,
        progress: bool,
        stop: Stop,
    ) -> (Output, Printer) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counts = Arc::new(Counts::default());
        let budget = Arc::new(Semaphore::new(QUEUE_BYTES));
        let state = State {
            budget: budget.clone(),
            names,
            prefixed,
            progress,
            counts: counts.clone(),
            stop,
            started: Instant::now(),
            drawn: false,
            last_draw: None,
            stdout: io::BufWriter::new(sinks.0),
            stderr: io::BufWriter::new(sinks.1),
            stdout_broken: false,
        };
        let thread = std::thread::Builder::new()
            .name("output".into())
            .spawn(move || state.run(rx))
            .unwrap_or_else(|e| panic!("cannot start the output thread: {e}"));
        (
            Output {
                tx,
                counts,
                prefixed,
                budget,
            },
            Printer { thread },
        )
    }

    /// Whether a node's output goes out as it is (one node), rather than
    /// line by line with its name before each.
    pub fn is_raw(&self) -> bool {
        !self.prefixed
    }

    /// A remote line of node `node`.
    pub async fn line(&self, node: usize, pipe: Pipe, text: String) {
        let cost = self.take_budget(text.len()).await;
        self.send(Msg::Line {
            node,
            pipe,
            text,
            cost,
        })
        .await;
    }

    /// Bytes as they are.
    pub async fn raw(&self, pipe: Pipe, bytes: Vec<u8>) {
        let cost = self.take_budget(bytes.len()).await;
        self.send(Msg::Raw { pipe, bytes, cost }).await;
    }

    /// Waits until `len` bytes (at most the whole budget) may be queued.
    async fn take_budget(&self, len: usize) -> u32 {
        let cost = u32::try_from(len.clamp(1, QUEUE_BYTES)).unwrap_or(u32::MAX);
        match self.budget.acquire_many(cost).await {
            Ok(permit) => {
                permit.forget();
                cost
            }
            // Never closed.
            Err(_) => 0,
        }
    }

    /// Text as it is (a note, a JSON line, the summary).
    pub async fn text(&self, pipe: Pipe, text: impl Into<String>) {
        let mut text = text.into();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        self.send(Msg::Text { pipe, text }).await;
    }

    /// The progress counts, to update, then [`Output::progress`].
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Asks for the progress line to be drawn again.
    pub async fn progress(&self) {
        self.send(Msg::Progress).await;
    }

    /// Takes the progress line away for good (before the summary).
    pub async fn end_progress(&self) {
        self.send(Msg::EndProgress).await;
    }

    async fn send(&self, msg: Msg) {
        // Fails only once the printer has gone, at the very end.
        let _ = self.tx.send(msg).await;
    }
}

impl Printer {
    /// Waits until everything sent before every [`Output`] handle was
    /// dropped is written.
    pub async fn finish(self) {
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

struct State {
    budget: Arc<Semaphore>,
    names: Vec<String>,
    prefixed: bool,
    progress: bool,
    counts: Arc<Counts>,
    stop: Stop,
    started: Instant,
    drawn: bool,
    last_draw: Option<Instant>,
    stdout: io::BufWriter<Box<dyn Write + Send>>,
    stderr: io::BufWriter<Box<dyn Write + Send>>,
    stdout_broken: bool,
}

impl State {
    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        while let Some(first) = rx.blocking_recv() {
            let mut redraw = self.write(first);
            while let Ok(next) = rx.try_recv() {
                redraw |= self.write(next);
            }
            if self.progress && (redraw || !self.drawn) {
                self.draw();
            }
            self.flush();
        }
        if self.drawn {
            let _ = self.stderr.write_all(b"\r\x1b[K");
        }
        self.flush();
    }

    /// Writes one message; true when the progress line needs drawing.
    fn write(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Progress => return true,
            Msg::EndProgress => {
                self.clear();
                self.progress = false;
            }
            Msg::Line {
                node,
                pipe,
                text,
                cost,
            } => {
                self.clear();
                let name = self.names.get(node).map_or("?", String::as_str);
                let mut line = String::with_capacity(text.len() + name.len() + 3);
                if self.prefixed {
                    line.push_str(name);
                    line.push_str(": ");
                }
                line.push_str(&text);
                line.push('\n');
                self.put(pipe, line.as_bytes());
                self.budget.add_permits(cost as usize);
            }
            Msg::Raw { pipe, bytes, cost } => {
                self.clear();
                self.put(pipe, &bytes);
                self.budget.add_permits(cost as usize);
            }
            Msg::Text { pipe, text } => {
                self.clear();
                self.put(pipe, text.as_bytes());
            }
        }
        false
    }

    fn put(&mut self, pipe: Pipe, bytes: &[u8]) {
        match pipe {
            Pipe::Stdout if self.stdout_broken => {}
            Pipe::Stdout => {
                if self.stdout.write_all(bytes).is_err() {
                    self.broken();
                }
            }
            Pipe::Stderr => {
                let _ = self.stderr.write_all(bytes);
            }
        }
    }

    fn broken(&mut self) {
        self.stdout_broken = true;
        self.stop.trigger(EXIT_BROKEN_PIPE);
    }

    fn flush(&mut self) {
        if !self.stdout_broken && self.stdout.flush().is_err() {
            self.broken();
        }
        let _ = self.stderr.flush();
    }

    /// Takes the progress line away before other output; stdout goes out
    /// first so that the line is cleared after it, on the same terminal.
    fn clear(&mut self) {
        if self.drawn {
            self.flush();
            let _ = self.stderr.write_all(b"\r\x1b[K");
            let _ = self.stderr.flush();
            self.drawn = false;
        }
    }

    fn draw(&mut self) {
        let now = Instant::now();
        if self.drawn && self.last_draw.is_some_and(|t| now - t < REDRAW) {
            return;
        }
        self.flush();
        let total = self.names.len();
        let done = self.counts.done.load(Ordering::Relaxed);
        let running = self.counts.running.load(Ordering::Relaxed);
        let failed = self.counts.failed.load(Ordering::Relaxed);
        let line = progress_line(total, done, running, failed, now - self.started);
        let _ = write!(self.stderr, "\r\x1b[K{line}");
        self.drawn = true;
        self.last_draw = Some(now);
    }
}

/// `[12/30 done] 10 running, 2 failed, 8 waiting  4.2s`.
pub fn progress_line(
    total: usize,
    done: usize,
    running: usize,
    failed: usize,
    t: Duration,
) -> String {
    let waiting = total.saturating_sub(done + running);
    format!(
        "[{done}/{total} done] {running} running, {failed} failed, {waiting} waiting  {}",
        format_duration(t)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_counts_done_running_failed_and_waiting() {
        assert_eq!(
            progress_line(30, 12, 10, 2, Duration::from_millis(4200)),
            "[12/30 done] 10 running, 2 failed, 8 waiting  4.2s"
        );
    }
}
