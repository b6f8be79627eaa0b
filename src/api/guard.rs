//! The checks every request passes before its route: its framing is one
//! this server decodes (a `Transfer-Encoding` other than `chunked`: `501`),
//! it names one valid host (two `Host` headers, a bad port, a target
//! authority that is not plain `http`: `400`), that host is this node
//! (else `421`; for an absolute-form target both its authority and the
//! `Host` header), no web page sent it (an `Origin` header or a
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

    /// Whether `name` (a host without its port) is one of this node's
    /// names.
    fn allows(&self, name: &str) -> bool {
        self.0.load().contains(&normalize_host(name))
    }
}

/// The host names a request addresses: its `Host` header's and, for an
/// absolute-form target (`POST http://name/...`), the target's authority's
/// (RFC 9112 §3.2.2 makes that the one that counts; both must be this
/// node). Empty when it names none.
///
/// # Errors
///
/// `400` for more than one `Host` header, a value that is not a valid
/// host (see [`host_name`]), or a target whose scheme is not `http`.
fn addressed_hosts<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> Result<Vec<&'a str>, ApiError> {
    let bad = |why: String| {
        ApiError::bad_request(why)
            .hint("send one Host header naming this node, e.g. Host: <its tailnet name>")
    };
    let mut names = Vec::with_capacity(2);
    let mut values = headers.get_all(header::HOST).iter();
    if let Some(value) = values.next() {
        if values.next().is_some() {
            return Err(bad("more than one Host header".into()));
        }
        let text = value
            .to_str()
            .map_err(|_| bad("the Host header is not ASCII text".into()))?;
        names.push(
            host_name(text).map_err(|why| bad(format!("invalid Host header {text:?}: {why}")))?,
        );
    }
    if let Some(authority) = uri.authority() {
        if uri
            .scheme_str()
            .is_some_and(|scheme| !scheme.eq_ignore_ascii_case("http"))
        {
            return Err(bad("only http:// request targets are served".into()));
        }
        let text = authority.as_str();
        names.push(
            host_name(text)
                .map_err(|why| bad(format!("invalid request target authority {text:?}: {why}")))?,
        );
    }
    Ok(names)
}

/// The host of a `Host` value or target authority: `name`, `name:port`,
/// `[v6]` or `[v6]:port`, the port (if any) a number from 1 to 65535.
///
/// # Errors
///
/// What is wrong: an empty value, a port that is empty, zero, too large
/// or not a number, an IPv6 address without brackets, user info, or a
/// character no host name has.
pub(super) fn host_name(value: &str) -> Result<&str, &'static str> {
    let (name, port) = if let Some(rest) = value.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or("an unclosed [")?;
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("not an IPv6 address inside [ ]");
        }
        match after {
            "" => (v6, None),
            _ => (v6, Some(after.strip_prefix(':').ok_or("text after ]")?)),
        }
    } else {
        match value.split_once(':') {
            Some((name, port)) if !port.contains(':') => (name, Some(port)),
            Some(_) => return Err("an IPv6 address must be in [ ]"),
            None => (value, None),
        }
    };
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
        if !valid {
            return Err("the port must be a number from 1 to 65535");
        }
    }
    if name.is_empty() {
        return Err("no host name");
    }
    if !value.starts_with('[')
        && !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err("a character no host name has");
    }
    Ok(name)
}

/// Refuses a body framed with a transfer coding other than `chunked`
/// alone: hyper decodes only `chunked`, and would hand the rest (`gzip,
/// chunked`) on still encoded.
fn check_transfer_coding(headers: &HeaderMap) -> Result<(), ApiError> {
    let codings: Vec<String> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| {
            String::from_utf8_lossy(value.as_bytes())
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
        })
        .collect();
    if codings.is_empty() || codings == ["chunked"] {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "Transfer-Encoding {:?} is not supported: only chunked",
            codings.join(", ")
        ),
    )
    .hint("send the body as is (with Content-Length) or chunked, without compression"))
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
    check_transfer_coding(headers)?;
    let hosts = addressed_hosts(headers, request.uri())?;
    if hosts.is_empty() || !hosts.iter().all(|h| api.inner.hosts.allows(h)) {
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
    fn host_values_are_parsed_strictly() {
        for (value, name) in [
            ("a", "a"),
            ("a:80", "a"),
            ("a:65535", "a"),
            ("tk.tail-1.ts.net.", "tk.tail-1.ts.net."),
            ("100.64.0.1:8080", "100.64.0.1"),
            ("[::1]:80", "::1"),
            ("[::1]", "::1"),
        ] {
            assert_eq!(host_name(value), Ok(name), "{value}");
        }
        for value in [
            "", ":80", "a:", "a:0", "a:65536", "a:99999", "a:080000", "a:b", "a:+1", "::1", "[::1",
            "[::1]x", "[::1]:", "[a]", "user@a", "a b", "a/b", "é",
        ] {
            assert!(host_name(value).is_err(), "{value:?} was accepted");
        }
    }
}
