//! The checks every request passes before its route: the `Host` is this
//! node (else `421`), no web page sent it (an `Origin` header or a
//! browser-safe Content-Type: `403`), and WhoIs named the peer (else `403`,
//! fail closed). Browsers on tailnet machines must not be usable to drive
//! the API (CSRF, DNS rebinding).

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{Api, ApiError};
use crate::audit::AuditCaller;
use crate::identity::Identity;

/// The per-request extension the router reads: the peer's address and its
/// resolved identity (or why resolution failed: the request is then refused
/// 403). Whoever accepts the connection puts it there.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// The connection's remote address.
    pub peer: SocketAddr,
    /// The WhoIs result.
    pub identity: Result<Arc<Identity>, String>,
}

impl PeerIdentity {
    /// A peer whose identity is known.
    pub fn known(peer: SocketAddr, identity: Identity) -> Self {
        PeerIdentity {
            peer,
            identity: Ok(Arc::new(identity)),
        }
    }
}

/// The caller, once the guards passed.
#[derive(Debug, Clone)]
pub(super) struct Caller {
    pub(super) identity: Arc<Identity>,
    pub(super) peer: SocketAddr,
}

impl Caller {
    pub(super) fn job(&self) -> crate::run::JobCaller<'_> {
        crate::run::JobCaller {
            identity: &self.identity,
            ip: Some(self.peer.ip()),
        }
    }
}

/// The `Host` values accepted, normalized; replaced whole when the node's
/// names change.
#[derive(Debug)]
pub(super) struct AllowedHosts(ArcSwap<Vec<String>>);

impl AllowedHosts {
    pub(super) fn new(hosts: &[String]) -> Self {
        AllowedHosts(ArcSwap::from_pointee(normalize_hosts(hosts)))
    }

    pub(super) fn set(&self, hosts: &[String]) {
        self.0.store(Arc::new(normalize_hosts(hosts)));
    }

    /// Whether the request's `Host` (or, without one, its absolute-form
    /// authority) is one of this node's names.
    fn allows(&self, headers: &HeaderMap, uri: &Uri) -> bool {
        let host = match headers.get(header::HOST) {
            Some(value) => value.to_str().ok(),
            None => uri.authority().map(|a| a.as_str()),
        };
        let Some(host) = host else { return false };
        let name = normalize_host(host_without_port(host));
        self.0.load().contains(&name)
    }
}

fn normalize_hosts(hosts: &[String]) -> Vec<String> {
    hosts
        .iter()
        .map(|h| normalize_host(h.trim_start_matches('[').trim_end_matches(']')))
        .collect()
}

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// `name` from `name`, `name:port`, `[v6]` or `[v6]:port`.
pub(super) fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

/// `(tool, command)` of a `POST /exec/{tool}/{cmd}` request, raw.
fn exec_target(request: &Request) -> Option<(String, String)> {
    if request.method() != Method::POST {
        return None;
    }
    let rest = request.uri().path().strip_prefix("/exec/")?;
    let (tool, cmd) = rest.split_once('/')?;
    (!cmd.contains('/')).then(|| (tool.to_string(), cmd.to_string()))
}

/// Content types a web page may send cross-origin without a preflight.
fn is_browser_safe_content_type(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONTENT_TYPE).iter().any(|value| {
        let text = String::from_utf8_lossy(value.as_bytes());
        let essence = text
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        matches!(
            essence.as_str(),
            "text/plain" | "application/x-www-form-urlencoded" | "multipart/form-data"
        )
    })
}

/// The layer every route sits behind: admits the request (see
/// [`admit_request`]) and hands the [`Caller`] to the route, or answers the
/// refusal (audited when it refused an exec request).
pub(super) async fn guard(State(api): State<Api>, mut request: Request, next: Next) -> Response {
    let peer = request.extensions().get::<PeerIdentity>().cloned();
    match admit_request(&api, &request, peer.as_ref()) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(refusal) => {
            if let Some((tool, cmd)) = exec_target(&request) {
                let who = audit_caller(peer.as_ref());
                api.deny(who, (&tool, &cmd), &refusal).await;
            }
            refusal.into_response()
        }
    }
}

/// The checks every request passes before its route: the `Host` is this
/// node, no web page sent it, and WhoIs named the peer.
pub(super) fn admit_request(
    api: &Api,
    request: &Request,
    peer: Option<&PeerIdentity>,
) -> Result<Caller, ApiError> {
    let headers = request.headers();
    if !api.inner.hosts.allows(headers, request.uri()) {
        return Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "this Host is not this node",
        )
        .hint("address the node by its tailnet name or IP"));
    }
    if headers.contains_key(header::ORIGIN) {
        return Err(
            ApiError::new(StatusCode::FORBIDDEN, "requests from web pages are refused").hint(
                "call the API from a program, without an Origin header, e.g. curl --json '{...}'",
            ),
        );
    }
    if is_browser_safe_content_type(headers) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this Content-Type is refused; send JSON",
        )
        .hint("curl --json '{...}', or -H 'Content-Type: application/json'"));
    }
    match peer {
        Some(PeerIdentity {
            peer,
            identity: Ok(identity),
        }) => Ok(Caller {
            identity: identity.clone(),
            peer: *peer,
        }),
        _ => {
            let why = match peer {
                Some(PeerIdentity {
                    identity: Err(e), ..
                }) => e.clone(),
                _ => "no identity for this connection".into(),
            };
            tracing::warn!(peer = ?peer.map(|p| p.peer), error = %why, "could not identify caller");
            Err(
                ApiError::new(StatusCode::FORBIDDEN, "could not identify caller")
                    .hint("only tailnet peers that WhoIs can identify may call this API"),
            )
        }
    }
}

/// The caller as far as it is known, for the audit record of a refusal.
fn audit_caller(peer: Option<&PeerIdentity>) -> AuditCaller {
    match peer {
        Some(PeerIdentity {
            peer,
            identity: Ok(identity),
        }) => AuditCaller::new(identity, Some(peer.ip())),
        Some(p) => AuditCaller {
            ip: Some(p.peer.ip()),
            ..AuditCaller::default()
        },
        None => AuditCaller::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_are_stripped() {
        assert_eq!(host_without_port("a:80"), "a");
        assert_eq!(host_without_port("a"), "a");
        assert_eq!(host_without_port("[::1]:80"), "::1");
        assert_eq!(host_without_port("[::1]"), "::1");
        assert_eq!(host_without_port("::1"), "::1");
        assert_eq!(host_without_port("a:b"), "a:b");
    }
}
