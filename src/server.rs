//! Transport: HTTP/1.1 on connections from the tailnet listener, each with
//! the peer address it really came from, the caller resolved per request
//! (tsnet WhoIs, at this edge only) and handed to the
//! [router](crate::api::Api::router) as a [`PeerIdentity`].
//!
//! A [`Listener`] owns the accept loop in the way of mini-redis's: a
//! semaphore permit is taken before each accept and moved into the
//! connection's task (connections are bounded, in all and per peer
//! address), failed accepts back off, and shutdown is one
//! [`CancellationToken`] every connection watches, with a [`TaskTracker`]
//! to wait for them.
//!
//! What one connection may hold is bounded: hyper serves one request at a
//! time, buffers at most [`MAX_BUF_BYTES`] of what the peer sent ahead
//! (pipelined requests included: past that it stops reading, and the
//! peer's writes wait in TCP), and writes a response from its body's own
//! buffer (`writev`; a job result is one buffer shared by every answer,
//! see [`crate::api`]) without copying it, writing the next response only
//! once the last one was flushed. Deadlines (`server/deadlines.rs`) close a
//! connection whose request head is slow, which stays idle too long, or
//! whose peer stops reading a response.

mod deadlines;

pub use deadlines::Timeouts;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::IntoResponse;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, warn};
use tsnet_bridge::{Node, Stream};

use crate::api::{ApiError, PeerIdentity};
use crate::identity::Identity;

/// Connections served at once; more wait in the listener's backlog.
pub const MAX_CONNECTIONS: usize = 512;
/// Connections one peer address may hold open at once, so that one peer
/// cannot take every slot; the requests of further ones are answered `429`.
pub const MAX_CONNECTIONS_PER_PEER: usize = 64;
/// Over-limit connections being answered `429` at once (they hold no slot);
/// past this they are closed unanswered.
const MAX_REFUSALS: usize = 64;
/// How long an over-limit connection may take to send its request head.
const REFUSAL_HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// How long open connections get to finish after the server stops.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to send a request's head, from its first
/// byte (from the accept, for a connection's first request).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a kept-alive connection may stay silent between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// How long a response may make no progress (the peer reads nothing)
/// before the connection is closed.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Requests served on one connection at most; the last answer says
/// `Connection: close`. A kept-alive client reconnects once per this many
/// requests; a peer that pipelines without reading gets this many answers
/// buffered towards it at most, and what it sent beyond is dropped with
/// the connection.
pub const MAX_REQUESTS_PER_CONNECTION: u64 = 1000;
/// Requests in a row that a peer may send before it has the previous
/// answer (HTTP/1.1 pipelining, which no common client does); the last
/// of them is answered with `Connection: close`, and what the peer
/// pipelined beyond is dropped with the connection. So a peer that
/// pipelines thousands of requests and reads nothing gets a few answers
/// buffered towards it, not thousands, and its connection ends at once.
pub const MAX_PIPELINED_REQUESTS: u64 = 16;
/// What hyper buffers of a connection's input at most (a request head, and
/// whatever the peer pipelined behind it), and of its output besides the
/// response bodies themselves: 64 KiB. A request head must fit.
pub const MAX_BUF_BYTES: usize = 64 << 10;

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: HEADER_READ_TIMEOUT,
            idle: IDLE_TIMEOUT,
            write_stall: WRITE_STALL_TIMEOUT,
        }
    }
}

/// Resolves the identity of the peer at a connection's remote address; it
/// is called for every request.
pub trait IdentityResolver: Send + Sync + 'static {
    /// The identity of `peer`, or why it is unknown.
    fn resolve(
        &self,
        peer: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Result<Identity, String>> + Send + '_>>;
}

/// Resolves callers with tsnet WhoIs on the node that accepted them.
pub struct WhoIs(pub Arc<Node>);

impl IdentityResolver for WhoIs {
    fn resolve(
        &self,
        peer: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Result<Identity, String>> + Send + '_>> {
        Box::pin(async move {
            match self.0.whois(peer).await {
                Ok(who) => Ok(identity_of(who)),
                Err(e) => {
                    debug!(%peer, error = %e, "whois failed");
                    Err(e.to_string())
                }
            }
        })
    }
}

/// The caller's identity from a WhoIs answer.
pub fn identity_of(who: tsnet_bridge::WhoIs) -> Identity {
    Identity {
        node_name: who.node_name,
        node_id: who.node_id,
        ips: who.ips,
        user_login: who.user_login,
        tags: who.tags,
        caps: who.caps,
    }
}

/// Serves HTTP/1.1 on one accepted connection from `peer`: resolves the
/// identity for every request and hands it to `router`; closes connections
/// whose request head does not arrive within [`HEADER_READ_TIMEOUT`], that
/// stay idle for [`IDLE_TIMEOUT`], or whose peer reads nothing of a
/// response for [`WRITE_STALL_TIMEOUT`]; when `shutdown` is cancelled,
/// finishes the request in flight and closes.
///
/// # Errors
///
/// The connection's I/O or protocol error (a timeout included).
pub async fn serve_connection<IO>(
    io: IO,
    peer: SocketAddr,
    resolver: Arc<dyn IdentityResolver>,
    router: Router,
    shutdown: CancellationToken,
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_connection_with(
        io,
        peer,
        resolver,
        router,
        shutdown,
        ConnectionOptions::default(),
    )
    .await
}

/// How a connection is served besides its router: its [`Timeouts`], and
/// the signal that closes it while it is idle between requests.
#[derive(Debug, Clone, Default)]
pub struct ConnectionOptions {
    /// The connection's deadlines.
    pub timeouts: Timeouts,
    /// Notified (`notify_one`) when every connection slot is taken: the
    /// longest-waiting connection that is idle between requests (nothing
    /// left to write) closes, to make room.
    pub evict_idle: Option<Arc<Notify>>,
}

/// [`serve_connection`] with other [`ConnectionOptions`].
///
/// # Errors
///
/// As [`serve_connection`].
pub async fn serve_connection_with<IO>(
    io: IO,
    peer: SocketAddr,
    resolver: Arc<dyn IdentityResolver>,
    router: Router,
    shutdown: CancellationToken,
    options: ConnectionOptions,
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let requests = Arc::new(deadlines::Requests::default());
    let io = deadlines::Deadlines::new(io, options, requests.clone());
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let resolver = resolver.clone();
            let router = router.clone();
            let started = requests.start();
            async move {
                let identity = resolver.resolve(peer).await.map(Arc::new);
                let mut request = request.map(Body::new);
                request
                    .extensions_mut()
                    .insert(PeerIdentity { peer, identity });
                let mut response = router.oneshot(request).await?;
                if started.nth >= MAX_REQUESTS_PER_CONNECTION
                    || started.pipelined >= MAX_PIPELINED_REQUESTS
                {
                    // hyper closes the connection after this answer, and
                    // drops whatever the peer pipelined behind it.
                    response.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
                // The request ends with its response body, not before.
                Ok::<_, std::convert::Infallible>(
                    response.map(|body| deadlines::Tracked::new(body, started.finished)),
                )
            }
        });
    let connection = http1()
        // The header and idle deadlines are the I/O's (see `deadlines`).
        .header_read_timeout(None)
        .keep_alive(true)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    }
}

/// The HTTP/1.1 server settings every connection shares: at most
/// [`MAX_BUF_BYTES`] buffered, response bodies written from their own
/// buffers (`writev`: hyper queues them instead of copying them into its
/// write buffer, and writes the next response's head only once the queue
/// is flushed).
fn http1() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .max_buf_size(MAX_BUF_BYTES)
        .writev(true);
    builder
}

/// Answers every request on `stream` with `429` and closes it: the peer
/// already holds [`MAX_CONNECTIONS_PER_PEER`] connections. Nothing is
/// resolved, decided or run.
async fn refuse_connection(stream: Stream) -> Result<(), hyper::Error> {
    let service = hyper::service::service_fn(|_request| async {
        let mut response = ApiError::new(
            hyper::StatusCode::TOO_MANY_REQUESTS,
            "too many connections from this peer",
        )
        .hint(format!(
            "at most {MAX_CONNECTIONS_PER_PEER} at once; reuse connections or retry"
        ))
        .retry_after(1)
        .into_response();
        response.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        Ok::<_, std::convert::Infallible>(response)
    });
    http1()
        .header_read_timeout(REFUSAL_HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await
}

/// Open connections per peer address.
#[derive(Default)]
struct PeerCounts(Mutex<HashMap<IpAddr, usize>>);

/// One open connection of a peer; counted down when dropped.
struct PeerSlot {
    counts: Arc<PeerCounts>,
    ip: IpAddr,
}

impl PeerCounts {
    /// A slot for `ip`, or `None` when it already holds the most allowed.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        // Never held across an await.
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// The accept loop over one tailnet listener.
pub struct Listener {
    listener: tsnet_bridge::Listener,
    resolver: Arc<dyn IdentityResolver>,
    router: Router,
    /// Permits for the connections served at once.
    slots: Arc<Semaphore>,
    /// Permits for the over-limit connections being answered `429`.
    refusals: Arc<Semaphore>,
    /// Closes one idle kept-alive connection when every slot is taken.
    evict_idle: Arc<Notify>,
    peers: Arc<PeerCounts>,
    /// Every connection's task, to wait for at shutdown.
    connections: TaskTracker,
    /// Cancelled when the server stops: connections finish their request
    /// in flight and close.
    shutdown: CancellationToken,
    /// Cancelled [`DRAIN_TIMEOUT`] later: connections still open are
    /// dropped.
    abort: CancellationToken,
}

impl Listener {
    /// A server of `router` on `listener`, resolving callers with
    /// `resolver`.
    pub fn new(
        listener: tsnet_bridge::Listener,
        resolver: Arc<dyn IdentityResolver>,
        router: Router,
    ) -> Self {
        Listener {
            listener,
            resolver,
            router,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
            evict_idle: Arc::new(Notify::new()),
            peers: Arc::new(PeerCounts::default()),
            connections: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            abort: CancellationToken::new(),
        }
    }

    /// Serves every connection until `stop` is cancelled, then closes the
    /// listener, asks every connection to finish its request in flight,
    /// and waits up to [`DRAIN_TIMEOUT`] for them.
    ///
    /// # Errors
    ///
    /// When the listener itself is gone (its node closed under it): nothing
    /// more can be served, and the caller should stop.
    pub async fn run(self, stop: CancellationToken) -> io::Result<()> {
        let outcome = tokio::select! {
            () = stop.cancelled() => Ok(()),
            result = self.accept_loop() => result,
        };
        let Listener {
            listener,
            connections,
            shutdown,
            abort,
            ..
        } = self;
        drop(listener);
        shutdown.cancel();
        connections.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait())
            .await
            .is_err()
        {
            warn!(
                open = connections.len(),
                "closing connections that did not finish in time"
            );
            abort.cancel();
            connections.wait().await;
        }
        outcome
    }

    /// Accepts until the listener dies.
    async fn accept_loop(&self) -> io::Result<()> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    // Every slot is taken: a connection idle between
                    // requests gives its slot up (or the next to fall
                    // idle does), rather than new peers waiting for the
                    // idle timeout.
                    self.evict_idle.notify_one();
                    let Ok(slot) = self.slots.clone().acquire_owned().await else {
                        return Ok(());
                    };
                    slot
                }
            };
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(50);
                    self.serve(stream, peer, slot);
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Err(e),
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Serves one connection on its own task, holding `slot` and one of its
    /// peer's slots; a peer over its limit is answered `429` without taking
    /// a slot (or one peer could still take them all with connections it
    /// never uses).
    fn serve(&self, stream: Stream, peer: SocketAddr, slot: tokio::sync::OwnedSemaphorePermit) {
        let abort = self.abort.clone();
        let Some(peer_slot) = self.peers.take(peer.ip()) else {
            drop(slot);
            debug!(%peer, "too many connections from this peer");
            if let Ok(refusal) = self.refusals.clone().try_acquire_owned() {
                self.connections.spawn(async move {
                    let _refusal = refusal;
                    tokio::select! {
                        _ = refuse_connection(stream) => {}
                        () = abort.cancelled() => {}
                    }
                });
            }
            return;
        };
        let resolver = self.resolver.clone();
        let router = self.router.clone();
        let shutdown = self.shutdown.clone();
        let options = ConnectionOptions {
            timeouts: Timeouts::default(),
            evict_idle: Some(self.evict_idle.clone()),
        };
        self.connections.spawn(async move {
            let _slots = (slot, peer_slot);
            tokio::select! {
                result = serve_connection_with(stream, peer, resolver, router, shutdown, options) => {
                    if let Err(e) = result {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                () = abort.cancelled() => {}
            }
        });
    }
}
