//! The accept loop: connections from the tailnet listener, each with the
//! peer address it really came from, served one task each through
//! [`api::serve_connection`](crate::api::serve_connection) (which resolves
//! the caller per request). Connections are bounded; failed accepts back
//! off; stopping closes the listener, asks every connection to finish its
//! request in flight, and waits a little for them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::api::{IdentityResolver, serve_connection};
use crate::tailnet::{BridgeError, Identity, Listener, Node};

/// Connections served at once; more wait in the listener's backlog.
pub const MAX_CONNECTIONS: usize = 512;
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

/// Serves `router` on every connection `listener` accepts until `stop`
/// resolves, then drains (see the module docs).
pub async fn serve(
    listener: Listener,
    resolver: Arc<dyn IdentityResolver>,
    router: Router,
    stop: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
                let resolver = resolver.clone();
                let router = router.clone();
                let mut stop_rx = stop_rx.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    let stopped = async move {
                        let _ = stop_rx.wait_for(|s| *s).await;
                    };
                    if let Err(e) = serve_connection(stream, peer, resolver, router, stopped).await
                    {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
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
}
