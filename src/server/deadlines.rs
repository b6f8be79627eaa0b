//! The deadlines of one connection, enforced on its I/O (hyper's own header
//! timeout also runs while a kept-alive connection is idle, and hyper has
//! no write timeout):
//!
//! - a request's head must arrive within [`Timeouts::header`] of its first
//!   byte (of the accept, for a connection's first request);
//! - a kept-alive connection may stay silent between requests for
//!   [`Timeouts::idle`];
//! - a write that makes no progress for [`Timeouts::write_stall`] (a peer
//!   that does not read what it asked for) fails, and the connection
//!   closes with everything it held;
//! - a connection idle between requests, with nothing left to write,
//!   closes when the server needs its slot ([`ConnectionOptions::evict_idle`]).
//!
//! While a request is being served (from its head to the end of its
//! response body, [`Tracked`]) there is no read deadline: the API bounds
//! the body itself (`408`), and a `?wait=` may take a minute. Write
//! progress keeps the read deadlines from firing while the tail of a
//! response is still being flushed.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body as HttpBody, Bytes, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant, Sleep};

use super::ConnectionOptions;

/// The three limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From the first byte of a request (or the accept) to the end of its
    /// head.
    pub header: Duration,
    /// Silence allowed between two requests on a kept-alive connection.
    pub idle: Duration,
    /// How long a blocked write may make no progress.
    pub write_stall: Duration,
}

/// Requests started and finished on one connection, counted by the
/// service and read by the I/O: a request is in progress while more were
/// started than finished.
#[derive(Debug, Default)]
pub(super) struct Requests {
    started: AtomicU64,
    finished: AtomicU64,
    /// Bytes were read while no request was in progress, since the last
    /// request started: the next request was sent after the last answer
    /// (else it was pipelined behind it).
    read_while_idle: AtomicBool,
    /// Requests pipelined in a row, up to the last one started.
    pipelined: AtomicU64,
}

/// A request as it starts: its guard, and where it stands on its
/// connection.
pub(super) struct Started {
    /// Counts it finished when dropped.
    pub(super) finished: Finished,
    /// Requests started on the connection, this one included.
    pub(super) nth: u64,
    /// Requests in a row, this one included, that the peer sent before it
    /// had the previous answer (0 if this one came after it).
    pub(super) pipelined: u64,
}

impl Requests {
    /// A request's head was parsed and handed to the service; the returned
    /// guard counts it finished when dropped (with its response body, see
    /// [`Tracked`], or with the service call if the connection goes first).
    pub(super) fn start(self: &Arc<Self>) -> Started {
        let nth = self.started.fetch_add(1, Ordering::Relaxed) + 1;
        let came_after_answer = self.read_while_idle.swap(false, Ordering::Relaxed);
        let pipelined = if nth > 1 && !came_after_answer {
            self.pipelined.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.pipelined.store(0, Ordering::Relaxed);
            0
        };
        Started {
            finished: Finished(self.clone()),
            nth,
            pipelined,
        }
    }

    fn in_progress(&self) -> bool {
        self.started.load(Ordering::Relaxed) != self.finished.load(Ordering::Relaxed)
    }

    fn finished(&self) -> u64 {
        self.finished.load(Ordering::Relaxed)
    }
}

/// Counts a request finished when dropped.
pub(super) struct Finished(Arc<Requests>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Relaxed);
    }
}

/// A response body that ends its request when dropped: hyper drops it
/// once it has taken the last frame (or with the connection), so a
/// streamed answer counts as in progress for as long as it streams.
pub(super) struct Tracked {
    body: axum::body::Body,
    _finished: Finished,
}

impl Tracked {
    pub(super) fn new(body: axum::body::Body, finished: Finished) -> Self {
        Tracked {
            body,
            _finished: finished,
        }
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What the read side is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// The rest of a request head.
    Head,
    /// The first byte of the next request.
    NextRequest,
}

/// A connection's I/O with its deadlines.
pub(super) struct Deadlines<IO> {
    io: IO,
    timeouts: Timeouts,
    requests: Arc<Requests>,
    /// `requests.finished()` when the read side last looked.
    seen_finished: u64,
    waiting: Waiting,
    /// When the read side's wait ends (before write progress extends it).
    read_deadline: Instant,
    read_timer: Pin<Box<Sleep>>,
    /// When a write last made progress.
    last_write: Option<Instant>,
    /// When the blocked write gives up; `None` while writes go through.
    stall_deadline: Option<Instant>,
    stall_timer: Option<Pin<Box<Sleep>>>,
    /// Where the server asks idle connections to make room.
    evict: Option<Arc<tokio::sync::Notify>>,
    /// Waiting for that request while idle between requests.
    eviction: Option<Pin<Box<OwnedNotified>>>,
    /// The request came while a write was under way: close at the next
    /// read.
    evicted: bool,
}

impl<IO> Deadlines<IO> {
    /// `io`, just accepted, awaiting its first request head.
    pub(super) fn new(io: IO, options: ConnectionOptions, requests: Arc<Requests>) -> Self {
        let timeouts = options.timeouts;
        let read_deadline = Instant::now() + timeouts.header;
        Deadlines {
            io,
            timeouts,
            requests,
            seen_finished: 0,
            waiting: Waiting::Head,
            read_deadline,
            read_timer: Box::pin(tokio::time::sleep_until(read_deadline)),
            last_write: None,
            stall_deadline: None,
            stall_timer: None,
            evict: options.evict_idle,
            eviction: None,
            evicted: false,
        }
    }

    fn limit(&self, waiting: Waiting) -> Duration {
        match waiting {
            Waiting::Head => self.timeouts.header,
            Waiting::NextRequest => self.timeouts.idle,
        }
    }

    /// Whether the connection awaits a request (none is in progress);
    /// notes a response finished since the last look (the connection is
    /// kept alive, idle until the next request's first byte).
    fn awaiting_request(&mut self) -> bool {
        if self.requests.in_progress() {
            self.leave_idle();
            return false;
        }
        let finished = self.requests.finished();
        if finished != self.seen_finished {
            self.seen_finished = finished;
            self.wait_for(Waiting::NextRequest);
        }
        true
    }

    fn wait_for(&mut self, waiting: Waiting) {
        self.waiting = waiting;
        self.read_deadline = Instant::now() + self.limit(waiting);
        match waiting {
            Waiting::NextRequest => {
                self.eviction = self
                    .evict
                    .as_ref()
                    .map(|evict| Box::pin(evict.clone().notified_owned()));
            }
            Waiting::Head => self.leave_idle(),
        }
    }

    /// A request came: the connection is no longer idle. A request to
    /// close that it took but did not act on goes to another connection.
    fn leave_idle(&mut self) {
        self.eviction = None;
        if std::mem::take(&mut self.evicted)
            && let Some(evict) = &self.evict
        {
            evict.notify_one();
        }
    }

    /// Whether the server asked this connection, idle between requests,
    /// to close (the read side acts on it only with nothing left to
    /// write, so a response is never cut off).
    fn poll_eviction(&mut self, cx: &mut Context<'_>) -> bool {
        if self.evicted {
            return true;
        }
        let Some(eviction) = &mut self.eviction else {
            return false;
        };
        if eviction.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.eviction = None;
        self.evicted = true;
        true
    }

    /// Polls the read deadline (extended by recent write progress); the
    /// error once it passed. The timer is moved only when it would fire
    /// too late: one that fires early (the deadline moved on since) is
    /// set again then, so that writes cost no timer update each.
    fn poll_read_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let mut deadline = self.read_deadline;
        if let Some(at) = self.last_write {
            deadline = deadline.max(at + self.limit(self.waiting));
        }
        if deadline < self.read_timer.deadline() || self.read_timer.is_elapsed() {
            self.read_timer.as_mut().reset(deadline);
        }
        while self.read_timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return Poll::Ready(self.read_timed_out());
            }
            self.read_timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }

    fn read_timed_out(&self) -> io::Error {
        let (what, limit) = match self.waiting {
            Waiting::Head => ("a request head", self.timeouts.header),
            Waiting::NextRequest => ("the next request", self.timeouts.idle),
        };
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} did not arrive within {limit:?}"),
        )
    }

    /// Notes write progress, or starts (and polls) the stall deadline of
    /// a blocked write.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match result {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.stall_deadline = None;
                    self.last_write = Some(Instant::now());
                    if self.awaiting_request() {
                        // The tail of a response: hyper, idle once it is
                        // written, may not read again until the peer sends
                        // something, so the read deadline's timer (and the
                        // eviction) must be registered from here to wake
                        // the connection.
                        let _ = self.poll_read_deadline(cx);
                        if self.poll_eviction(cx) {
                            cx.waker().wake_by_ref();
                        }
                    }
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                let deadline = *self
                    .stall_deadline
                    .get_or_insert_with(|| Instant::now() + self.timeouts.write_stall);
                let timer = self
                    .stall_timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                std::task::ready!(timer.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the peer read nothing for {:?} of a response",
                        self.timeouts.write_stall
                    ),
                )))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Deadlines<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if !this.awaiting_request() {
            return result;
        }
        match result {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.requests.read_while_idle.store(true, Ordering::Relaxed);
                    if this.waiting == Waiting::NextRequest {
                        this.wait_for(Waiting::Head);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // hyper reads between its flushes: no blocked write means
            // that nothing of the last response is left to write.
            Poll::Pending if this.stall_deadline.is_none() && this.poll_eviction(cx) => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "closed while idle to make room for another connection",
                )))
            }
            Poll::Pending => this.poll_read_deadline(cx).map(Err),
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Deadlines<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.after_write(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.after_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
