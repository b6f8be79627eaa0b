//! The HTTP API of SPEC §3, transport-agnostic: the router takes the
//! caller's identity, already resolved by whoever accepted the connection,
//! from the request's extensions ([`PeerIdentity`]), and decides. The
//! tailnet server feeds it through [`serve_connection`]; tests call
//! [`Api::router`] directly or serve it on in-memory streams.
//!
//! Every request first passes the browser guards (Host → 421, `Origin` or a
//! browser-safe Content-Type → 403) and the identity check (403, fail
//! closed); `POST /exec/{tool}/{cmd}` then checks, in order: 404, 403, 413,
//! 400, 429, 503. Every refusal of an exec request is audited
//! (`exec.denied`).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use http_body_util::BodyExt;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceExt;
use uuid::Uuid;

use crate::audit::{AuditCaller, AuditEvent, AuditRecord};
use crate::exec::duration::{format_go_duration, parse_go_duration};
use crate::exec::jobs::AdmitError;
use crate::exec::runner::{CancelReason, Prepared, prepare, redact_args};
use crate::exec::tool::Command;
use crate::exec::{ExecEntry, Executor, JobCaller, Registry, StartError};
use crate::tailnet::Identity;

/// How long a client may take to send a request's headers (also the idle
/// time allowed between requests on a kept-alive connection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to send a request's body once its headers
/// arrived; a slower one gets `408` (and its connection is closed).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves the identity of the peer at a connection's remote address. The
/// daemon implements it with tsnet WhoIs; it is called for every request.
pub trait IdentityResolver: Send + Sync + 'static {
    /// The identity of `peer`, or why it is unknown.
    fn resolve(
        &self,
        peer: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Result<Identity, String>> + Send + '_>>;
}

/// The per-request extension the router reads: the peer's address and its
/// resolved identity (or why resolution failed: the request is then refused
/// 403).
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

/// API settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiSettings {
    /// This node's name, reported by `GET /health`.
    pub hostname: String,
    /// The `Host` values accepted: the short name, the MagicDNS name, the
    /// tailnet IPs. Matched case-insensitively, with or without a port, a
    /// trailing dot, IPv6 in brackets. An empty list accepts no request.
    pub allowed_hosts: Vec<String>,
    /// Refuse commands that declare no `acl_cap`.
    pub require_cap: bool,
}

impl ApiSettings {
    /// Settings for node `hostname`, reachable under `allowed_hosts`.
    pub fn new(hostname: impl Into<String>, allowed_hosts: Vec<String>) -> Self {
        ApiSettings {
            hostname: hostname.into(),
            allowed_hosts,
            require_cap: false,
        }
    }
}

/// The API: registry, executor and settings behind an `Arc`. Cheap to clone.
#[derive(Clone)]
pub struct Api {
    inner: Arc<ApiInner>,
}

struct ApiInner {
    registry: Arc<Registry>,
    executor: Executor,
    settings: ApiSettings,
    /// `allowed_hosts`, normalized; replaced by [`Api::set_allowed_hosts`].
    hosts: ArcSwap<Vec<String>>,
}

/// The caller, once the guards passed.
#[derive(Debug, Clone)]
struct Caller {
    identity: Arc<Identity>,
    peer: SocketAddr,
}

impl Caller {
    fn audit(&self) -> AuditCaller {
        AuditCaller::new(&self.identity, Some(self.peer.ip()))
    }
}

impl Api {
    /// An API over `registry` running jobs with `executor` (whose audit log
    /// also receives the `exec.denied` records).
    pub fn new(registry: Arc<Registry>, executor: Executor, settings: ApiSettings) -> Self {
        let hosts = ArcSwap::from_pointee(normalize_hosts(&settings.allowed_hosts));
        Api {
            inner: Arc::new(ApiInner {
                registry,
                executor,
                settings,
                hosts,
            }),
        }
    }

    /// Replaces the accepted `Host` values (the node's names can change
    /// while it runs: a rename in the admin console, a collision suffix).
    pub fn set_allowed_hosts(&self, allowed_hosts: &[String]) {
        self.inner
            .hosts
            .store(Arc::new(normalize_hosts(allowed_hosts)));
    }

    /// The executor (and through it the job store).
    pub fn executor(&self) -> &Executor {
        &self.inner.executor
    }

    /// The routes, with the guards as a layer.
    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/exec/{tool}/{cmd}",
                post(exec_command).get(get_job).delete(delete_job),
            )
            .route("/tools", get(list_tools))
            .route("/health", get(health))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(middleware::from_fn_with_state(self.clone(), guard))
            .with_state(self.clone())
    }

    /// New exec requests are refused 503 from now on.
    pub fn begin_shutdown(&self) {
        self.inner.executor.begin_shutdown();
    }

    /// Refuses new jobs, lets running ones finish within `grace`, cancels
    /// the rest; resolves once every job is terminal and its `exec.finished`
    /// record is written.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.executor.shutdown(grace).await;
    }

    /// Records a refused exec request and returns the refusal.
    async fn deny(
        &self,
        caller: AuditCaller,
        target: (&str, &str),
        args: Option<BTreeMap<String, Value>>,
        err: ApiError,
    ) -> ApiError {
        let mut record = AuditRecord::new(AuditEvent::Denied, caller, target.0, target.1);
        record.reason = Some(err.error.clone());
        record.http_status = Some(err.status.as_u16());
        record.args = args.unwrap_or_default();
        if let Err(e) = self.inner.executor.audit().record_async(&record).await {
            tracing::error!(error = %e, "could not write the exec.denied audit record");
        }
        err
    }

    /// Whether the caller may run `command` (its `acl_cap`, or
    /// `require_cap` for commands without one).
    fn authorize(&self, identity: &Identity, command: &Command) -> Result<(), ApiError> {
        match &command.acl_cap {
            Some(cap) if identity.has_cap(cap) => Ok(()),
            Some(cap) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("the caller lacks the capability {cap}"),
            )
            .hint(format!(
                "the tailnet policy must grant the app capability {cap} to this caller for this node"
            ))),
            None if self.inner.settings.require_cap => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this command declares no acl_cap and the daemon requires one",
            )
            .hint("add an acl_cap to the command in its tool file")),
            None => Ok(()),
        }
    }

    fn host_allowed(&self, headers: &HeaderMap, uri: &Uri) -> bool {
        let host = match headers.get(header::HOST) {
            Some(value) => value.to_str().ok(),
            None => uri.authority().map(|a| a.as_str()),
        };
        let Some(host) = host else { return false };
        let name = normalize_host(host_without_port(host));
        self.inner.hosts.load().contains(&name)
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
fn host_without_port(host: &str) -> &str {
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

// ---------------------------------------------------------------------------
// Errors

/// An error answer: `{"error": "...", "hint": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    hint: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            hint: None,
            retry_after: None,
        }
    }

    pub(crate) fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub(crate) fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    fn bad_request(error: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, error)
    }

    fn job_not_found() -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "no such job")
            .hint("jobs are visible to their owner only, and expire after they finish")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.error });
        if let Some(hint) = self.hint {
            body["hint"] = Value::String(hint);
        }
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

// ---------------------------------------------------------------------------
// Guards

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

async fn guard(State(api): State<Api>, mut request: Request, next: Next) -> Response {
    let peer = request.extensions().get::<PeerIdentity>().cloned();
    match admit_request(&api, &request, peer.as_ref()) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(refusal) => {
            if let Some((tool, cmd)) = exec_target(&request) {
                let who = audit_caller(peer.as_ref());
                api.deny(who, (&tool, &cmd), None, refusal.clone()).await;
            }
            refusal.into_response()
        }
    }
}

/// The checks every request passes before its route: the `Host` is this
/// node, no web page sent it, and WhoIs named the peer.
fn admit_request(
    api: &Api,
    request: &Request,
    peer: Option<&PeerIdentity>,
) -> Result<Caller, ApiError> {
    let headers = request.headers();
    if !api.host_allowed(headers, request.uri()) {
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

// ---------------------------------------------------------------------------
// Handlers

/// `?wait=DURATION` from the query, at most `max`.
fn parse_wait(uri: &Uri, max: Duration) -> Result<Option<Duration>, ApiError> {
    let Ok(Query(pairs)) = Query::<Vec<(String, String)>>::try_from_uri(uri) else {
        return Err(ApiError::bad_request("the query string is malformed"));
    };
    let Some((_, value)) = pairs.iter().rev().find(|(k, _)| k == "wait") else {
        return Ok(None);
    };
    let wait = parse_go_duration(value).map_err(|e| {
        ApiError::bad_request(format!("wait: {e}")).hint("e.g. ?wait=30s (at most 60s)")
    })?;
    if wait > max {
        return Err(ApiError::bad_request(format!(
            "wait: {value} is over the maximum of {}",
            format_go_duration(max)
        )));
    }
    Ok(Some(wait).filter(|w| !w.is_zero()))
}

/// The request body as a JSON object of arguments; empty means none.
///
/// # Errors
///
/// Not JSON, not an object, or a key that appears twice (anywhere).
fn parse_args(body: &[u8]) -> Result<Map<String, Value>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let StrictValue(value) = StrictValue::deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err("the body must be a JSON object of arguments".into()),
    }
}

/// A JSON value that refuses duplicated object keys.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            let StrictValue(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[tracing::instrument(skip_all, fields(tool = %tool, cmd = %cmd, peer = %caller.peer))]
async fn exec_command(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Segments(tool, cmd): Segments,
    request: Request,
) -> Result<Response, ApiError> {
    let refuse = |err, args| api.deny(caller.audit(), (&tool, &cmd), args, err);
    let (entry, prepared, wait) = match read_exec_request(&api, &caller, &tool, &cmd, request).await
    {
        Ok(ready) => ready,
        Err((err, args)) => return Err(refuse(err, args).await),
    };
    let audit_args = prepared.audit_args.clone();
    let job = JobCaller {
        identity: &caller.identity,
        ip: Some(caller.peer.ip()),
    };
    let executor = &api.inner.executor;
    let id = match executor
        .start(&entry.tool.name, &entry.command, prepared, job)
        .await
    {
        Ok(id) => id,
        Err(StartError::Admit(AdmitError::Busy(n))) => {
            let err = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("all {n} job slots are busy"),
            )
            .hint("retry later")
            .retry_after(1);
            return Err(refuse(err, Some(audit_args)).await);
        }
        Err(StartError::Admit(AdmitError::ShuttingDown)) => {
            let err = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
            return Err(refuse(err, Some(audit_args)).await);
        }
        Err(StartError::Audit(e)) => {
            // Not audited: the audit log is what failed.
            tracing::error!(error = %e, "exec.accepted could not be recorded; the job does not run");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the audit log cannot be written, so nothing runs",
            ));
        }
    };
    tracing::info!(job_id = %id, "job accepted");
    if let Some(wait) = wait {
        let result = executor.jobs().wait(id, &caller.identity, wait).await;
        if let Some(result) = result.filter(|r| r.status.is_terminal()) {
            return Ok(Json(&*result).into_response());
        }
    }
    let accepted = serde_json::json!({"job_id": id.to_string(), "status": "accepted"});
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}

/// The checks of SPEC §3 up to admission, in order: the command exists,
/// the caller may run it, the body fits and arrives in time, `?wait=` and
/// the arguments are valid. A refusal comes with the arguments the audit
/// record may show, once they are known.
async fn read_exec_request(
    api: &Api,
    caller: &Caller,
    tool: &str,
    cmd: &str,
    request: Request,
) -> Result<(ExecEntry, Prepared, Option<Duration>), (ApiError, Option<BTreeMap<String, Value>>)> {
    let settings = api.inner.executor.settings();
    let refused = |err| (err, None);
    let entry = api.inner.registry.lookup(tool, cmd).ok_or_else(|| {
        refused(
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("unknown tool or command {tool}/{cmd}"),
            )
            .hint("GET /tools lists the commands you may run"),
        )
    })?;
    let command = &entry.command;
    api.authorize(&caller.identity, command).map_err(refused)?;

    let (parts, body) = request.into_parts();
    let too_large = || {
        refused(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {} bytes", settings.max_body_bytes),
        ))
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > settings.max_body_bytes as u64) {
        return Err(too_large());
    }
    let reading = http_body_util::Limited::new(body, settings.max_body_bytes).collect();
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, reading)
        .await
        .map_err(|_| {
            refused(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {BODY_READ_TIMEOUT:?}"),
            ))
        })?;
    let body = match read {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(e) => {
            return Err(refused(ApiError::bad_request(format!(
                "could not read the body: {e}"
            ))));
        }
    };

    let wait = parse_wait(&parts.uri, settings.max_wait).map_err(refused)?;
    let args = parse_args(&body).map_err(|e| {
        refused(
            ApiError::bad_request(format!("invalid body: {e}"))
                .hint("send a JSON object of arguments, e.g. {\"name\": \"value\"}"),
        )
    })?;
    let prepared = prepare(command, &args, settings.max_value_bytes).map_err(|e| {
        (
            ApiError::bad_request(e.to_string()),
            Some(redact_args(command, &args)),
        )
    })?;
    Ok((entry, prepared, wait))
}

/// The two path segments of `/exec/{a}/{b}`, percent-decoded; segments
/// that do not decode are a JSON `404` like any unknown path.
struct Segments(String, String);

impl<S: Send + Sync> FromRequestParts<S> for Segments {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map(|Path((a, b))| Segments(a, b))
            .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "not found"))
    }
}

fn job_id(prefix: &str, id: &str) -> Result<Uuid, ApiError> {
    if prefix != "jobs" {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not found"));
    }
    Uuid::parse_str(id).map_err(|_| ApiError::job_not_found())
}

#[tracing::instrument(skip_all, fields(peer = %caller.peer))]
async fn get_job(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Segments(prefix, id): Segments,
    uri: Uri,
) -> Result<Response, ApiError> {
    let id = job_id(&prefix, &id)?;
    let jobs = api.inner.executor.jobs();
    let wait = parse_wait(&uri, api.inner.executor.settings().max_wait)?;
    let result = match wait {
        Some(wait) => jobs.wait(id, &caller.identity, wait).await,
        None => jobs.get(id, &caller.identity),
    };
    // Serialized here, outside the store lock, from the shared result.
    result
        .map(|r| Json(&*r).into_response())
        .ok_or_else(ApiError::job_not_found)
}

#[tracing::instrument(skip_all, fields(peer = %caller.peer))]
async fn delete_job(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Segments(prefix, id): Segments,
) -> Result<Response, ApiError> {
    let id = job_id(&prefix, &id)?;
    let executor = &api.inner.executor;
    if !executor
        .jobs()
        .cancel(id, &caller.identity, CancelReason::Caller)
    {
        return Err(ApiError::job_not_found());
    }
    tracing::info!(job_id = %id, "job cancelled by its owner");
    // The run ends within its stop limit; the extra second is for the
    // executor to record the result.
    let bound = executor.settings().stop_limit() + Duration::from_secs(1);
    executor
        .jobs()
        .wait(id, &caller.identity, bound)
        .await
        .map(|r| Json(&*r).into_response())
        .ok_or_else(ApiError::job_not_found)
}

async fn list_tools(State(api): State<Api>, Extension(caller): Extension<Caller>) -> Response {
    let index = api.inner.registry.snapshot();
    let tools: Vec<_> = index
        .tools()
        .filter_map(|t| t.to_wire(|c| api.authorize(&caller.identity, c).is_ok()))
        .collect();
    Json(tools).into_response()
}

async fn health(State(api): State<Api>) -> Response {
    Json(serde_json::json!({"status": "ok", "hostname": api.inner.settings.hostname}))
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not found").hint(
        "routes: POST /exec/{tool}/{cmd}, GET|DELETE /exec/jobs/{id}, GET /tools, GET /health",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

// ---------------------------------------------------------------------------
// Serving one connection

/// Serves HTTP/1.1 on one accepted connection from `peer`: resolves the
/// identity for every request and hands it to `router`; closes connections
/// whose headers do not arrive within [`HEADER_READ_TIMEOUT`]; when
/// `shutdown` resolves, finishes the request in flight and closes.
///
/// # Errors
///
/// The connection's I/O or protocol error (a header timeout included).
pub async fn serve_connection<IO, F>(
    io: IO,
    peer: SocketAddr,
    resolver: Arc<dyn IdentityResolver>,
    router: Router,
    shutdown: F,
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Future,
{
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let resolver = resolver.clone();
            let router = router.clone();
            async move {
                let identity = resolver.resolve(peer).await.map(Arc::new);
                let mut request = request.map(Body::new);
                request
                    .extensions_mut()
                    .insert(PeerIdentity { peer, identity });
                router.oneshot(request).await
            }
        });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::pin!(shutdown);
    tokio::select! {
        result = connection.as_mut() => result,
        _ = &mut shutdown => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    }
}

#[cfg(test)]
mod tests;
