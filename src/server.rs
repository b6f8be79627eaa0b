//! The accept loop: connections from the tailnet listener, each with the
//! peer address it really came from, served one task each through
//! [`api::serve_connection`](crate::api::serve_connection) (which resolves
//! the caller per request). Connections are bounded, in all and per peer
//! address; failed accepts back off; stopping closes the listener, asks
//! every connection to finish its request in flight, and waits a little for
//! them.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::api::{IdentityResolver, serve_connection};
use crate::tailnet::{BridgeError, Identity, Listener, Node};

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

/// Resolves callers with tsnet WhoIs on the node that accepted them.
pub struct WhoIs(pub Arc<Node>);

impl IdentityResolver for WhoIs {
    fn resolve(
        &self,
        peer: std::net::SocketAddr,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Identity, String>> + Send + '_>> {
        Box::pin(async move {
            self.0.whois(peer).await.map_err(|e: BridgeError| {
                debug!(%peer, error = %e, "whois failed");
                e.to_string()
            })
        })
    }
}

/// Answers every request on `stream` with `429` and closes it: the peer
/// already holds [`MAX_CONNECTIONS_PER_PEER`] connections. Nothing is
/// resolved, decided or run.
async fn refuse_connection(stream: crate::tailnet::Stream) -> Result<(), hyper::Error> {
    use axum::response::IntoResponse;
    let service = hyper::service::service_fn(|_request| async {
        let mut response = crate::api::ApiError::new(
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
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(REFUSAL_HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    conn.await
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

/// Serves `router` on every connection `listener` accepts until `stop`
/// resolves, then drains (see the module docs).
///
/// # Errors
///
/// When the listener itself is gone (its node closed under it): nothing
/// more can be served, and the caller should stop.
pub async fn serve(
    listener: Listener,
    resolver: Arc<dyn IdentityResolver>,
    router: Router,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let peers = Arc::new(PeerCounts::default());
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let mut outcome = Ok(());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut backoff = Duration::from_millis(50);
    tokio::pin!(stop);

    loop {
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}

        let accepted = tokio::select! {
            () = &mut stop => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => tokio::select! {
                    () = &mut stop => break,
                    accepted = listener.accept() => accepted.map(|conn| (conn, slot)),
                },
                Err(_) => break,
            },
        };
        match accepted {
            Ok(((stream, peer), slot)) => {
                backoff = Duration::from_millis(50);
                let Some(peer_slot) = peers.take(peer.ip()) else {
                    // Refusals hold no slot, or one peer could still take
                    // them all with connections it never uses.
                    drop(slot);
                    debug!(%peer, "too many connections from this peer");
                    if let Ok(refusal) = refusals.clone().try_acquire_owned() {
                        connections.spawn(async move {
                            let _refusal = refusal;
                            let _ = refuse_connection(stream).await;
                        });
                    }
                    continue;
                };
                let resolver = resolver.clone();
                let router = router.clone();
                let mut stop_rx = stop_rx.clone();
                connections.spawn(async move {
                    let _slots = (slot, peer_slot);
                    let stopped = async move {
                        let _ = stop_rx.wait_for(|s| *s).await;
                    };
                    if let Err(e) = serve_connection(stream, peer, resolver, router, stopped).await
                    {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                outcome = Err(e);
                break;
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "accept failed");
                tokio::select! {
                    () = &mut stop => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }

    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            open = connections.len(),
            "closing connections that did not finish in time"
        );
        connections.shutdown().await;
    }
    outcome
}
