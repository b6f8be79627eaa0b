//! The HTTP API of SPEC §3, transport-agnostic: the router takes the
//! caller's identity, already resolved by whoever accepted the connection,
//! from the request's extensions ([`PeerIdentity`]), and decides. The
//! tailnet server feeds it (see [`crate::server`]); tests call
//! [`Api::router`] directly (tests/exec/router.rs).
//!
//! Every request first passes the guards (`guard.rs`: Host → 421, `Origin` or
//! a browser-safe Content-Type → 403, unknown caller → 403); `POST
//! /exec/{tool}/{cmd}` then checks, in order: 404 (no such command), 403
//! (capability), 413 (body size), 400 (`?wait=`, body, then the arguments),
//! 429 (slots), 503 (shutting down, audit log). The API decides and audits
//! the checks up to the body; the rest is the executor's
//! [`submit`](crate::run::Executor::submit), whose [`Refusal`] is mapped to
//! its status here. Every refusal of an exec request is audited
//! (`exec.denied`). With `?stream=true`, both `POST /exec/{tool}/{cmd}` and
//! `GET /exec/jobs/{id}` answer with the job's live events (`stream.rs`).

mod body;
mod error;
mod guard;
mod respond;
mod stream;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router, middleware};
use serde_json::Value;
use uuid::Uuid;

pub use error::ApiError;
pub use guard::PeerIdentity;

use crate::audit::{AuditCaller, AuditLog, AuditRecord};
use crate::identity::Identity;
use crate::run::{Executor, JobView, Refusal};
use crate::tools::{Command, ExecEntry, Registry};
use guard::{AllowedHosts, Caller};
use respond::ResponseBudget;

/// API settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSettings {
    /// This node's name, reported by `GET /health`.
    pub hostname: String,
    /// The `Host` values accepted: the short name, the MagicDNS name, the
    /// tailnet IPs. Matched case-insensitively, with or without a port, a
    /// trailing dot, IPv6 in brackets. An empty list accepts no request.
    pub allowed_hosts: Vec<String>,
    /// Refuse commands that declare no `acl_cap`.
    pub require_cap: bool,
    /// Largest request body (64 KiB).
    pub max_body_bytes: usize,
    /// How long a body may take to arrive once the headers did (10 s);
    /// a slower one gets `408`.
    pub body_timeout: Duration,
    /// Largest `?wait=` (60 s).
    pub max_wait: Duration,
    /// Time between heartbeat comments on a live stream (15 s).
    pub stream_heartbeat: Duration,
    /// Live streams one peer may have open at once (16); more get `429`.
    pub max_streams_per_peer: usize,
    /// Job result bytes that answers may hold in flight at once (256 MiB;
    /// a result sent by many answers counts once). See `api/respond.rs`.
    pub max_response_bytes_in_flight: usize,
    /// How long an answer waits for room in that budget before it is
    /// refused `503` (5 s).
    pub response_budget_wait: Duration,
}

impl ApiSettings {
    /// Settings for node `hostname`, reachable under `allowed_hosts`, with
    /// SPEC's limits.
    pub fn new(hostname: impl Into<String>, allowed_hosts: Vec<String>) -> Self {
        ApiSettings {
            hostname: hostname.into(),
            allowed_hosts,
            require_cap: false,
            max_body_bytes: 64 << 10,
            body_timeout: Duration::from_secs(10),
            max_wait: Duration::from_secs(60),
            stream_heartbeat: Duration::from_secs(15),
            max_streams_per_peer: 16,
            max_response_bytes_in_flight: 256 << 20,
            response_budget_wait: Duration::from_secs(5),
        }
    }
}

/// The API: registry, executor, audit log and settings behind an `Arc`.
/// Cheap to clone.
#[derive(Clone)]
pub struct Api {
    inner: Arc<ApiInner>,
}

struct ApiInner {
    registry: Arc<Registry>,
    executor: Executor,
    audit: Arc<AuditLog>,
    settings: ApiSettings,
    /// `allowed_hosts`, normalized; replaced by [`Api::set_allowed_hosts`].
    hosts: AllowedHosts,
    /// Live streams open, per peer.
    streams: Arc<stream::StreamSlots>,
    /// Job result bytes held by answers in flight.
    budget: ResponseBudget,
}

impl Api {
    /// An API over `registry` running jobs with `executor`; its own
    /// refusals of exec requests are recorded in `audit`.
    pub fn new(
        registry: Arc<Registry>,
        executor: Executor,
        audit: Arc<AuditLog>,
        settings: ApiSettings,
    ) -> Self {
        let hosts = AllowedHosts::new(&settings.allowed_hosts);
        let streams = stream::StreamSlots::new(settings.max_streams_per_peer);
        let budget = ResponseBudget::new(
            settings.max_response_bytes_in_flight,
            settings.response_budget_wait,
        );
        Api {
            inner: Arc::new(ApiInner {
                registry,
                executor,
                audit,
                settings,
                hosts,
                streams,
                budget,
            }),
        }
    }

    /// Replaces the accepted `Host` values (the node's names can change
    /// while it runs: a rename in the admin console, a collision suffix).
    pub fn set_allowed_hosts(&self, allowed_hosts: &[String]) {
        self.inner.hosts.set(allowed_hosts);
    }

    /// The executor (and through it the job store).
    pub fn executor(&self) -> &Executor {
        &self.inner.executor
    }

    /// Bytes of the in-flight answer budget not held now (see
    /// [`ApiSettings::max_response_bytes_in_flight`]).
    pub fn response_budget_available(&self) -> usize {
        self.inner.budget.available()
    }

    /// An answer carrying job result `view` (shared, charged to the
    /// budget).
    async fn job_answer(&self, status: StatusCode, view: &JobView) -> Response {
        self.inner.budget.answer(status, view).await
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
            .layer(middleware::from_fn_with_state(self.clone(), guard::guard))
            .with_state(self.clone())
    }

    /// Live streams open now, over every peer.
    pub fn open_streams(&self) -> usize {
        self.inner.streams.open()
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

    /// Records a refusal of an exec request that the API made itself (the
    /// guards, the command lookup and capability, the body): its arguments
    /// were never read.
    async fn deny(&self, caller: AuditCaller, target: (&str, &str), err: &ApiError) {
        let status = err.status.as_u16();
        let record = AuditRecord::denial(caller, target, &err.error, status, BTreeMap::new());
        if let Err(e) = self.inner.audit.record_async(&record).await {
            crate::audit::log_unwritten("exec.denied", &e);
        }
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
}

// ---------------------------------------------------------------------------
// Handlers

#[tracing::instrument(skip_all, fields(tool = %tool, cmd = %cmd, peer = %caller.peer))]
async fn exec_command(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Segments(tool, cmd): Segments,
    request: Request,
) -> Result<Response, ApiError> {
    let target = (tool.as_str(), cmd.as_str());
    let streaming = stream::requested(request.uri());
    let checked = read_exec_request(&api, &caller, target, request)
        .await
        .and_then(|ready| stream::check_mode(&streaming, ready.2).map(|()| ready));
    let (entry, args, wait) = match checked {
        Ok(ready) => ready,
        Err(err) => {
            api.deny(caller.job().audit(), target, &err).await;
            return Err(err);
        }
    };
    if matches!(streaming, Ok(true)) {
        return stream::run_and_follow(&api, &caller, target, &entry, &args).await;
    }
    let id = api
        .inner
        .executor
        .submit(&entry, &args, caller.job())
        .await
        .map_err(|refusal: Refusal| ApiError::from(&refusal))?;
    tracing::info!(job_id = %id, "job accepted");
    if let Some(wait) = wait {
        let result = api.inner.executor.wait(id, &caller.identity, wait).await;
        if let Some(result) = result.filter(|r| r.status.is_terminal()) {
            return Ok(api.job_answer(StatusCode::OK, &result).await);
        }
    }
    let accepted = serde_json::json!({"job_id": id.to_string(), "status": "accepted"});
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}

/// The API's checks of SPEC §3, in order: the command exists, the caller
/// may run it, the body fits and arrives in time, `?wait=` is valid, and
/// the body is a JSON object. The arguments themselves are the executor's
/// to check.
async fn read_exec_request(
    api: &Api,
    caller: &Caller,
    (tool, cmd): (&str, &str),
    request: Request,
) -> Result<(ExecEntry, serde_json::Map<String, Value>, Option<Duration>), ApiError> {
    let entry = api.inner.registry.lookup(tool, cmd).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown tool or command {tool}/{cmd}"),
        )
        .hint("GET /tools lists the commands you may run")
    })?;
    api.authorize(&caller.identity, &entry.command)?;
    let settings = &api.inner.settings;
    let (parts, body) = request.into_parts();
    let body = body::read_body(
        &parts.headers,
        body,
        settings.max_body_bytes,
        settings.body_timeout,
    )
    .await?;
    let wait = body::parse_wait(&parts.uri, settings.max_wait)?;
    let args = body::parse_args(&body).map_err(|e| {
        ApiError::bad_request(format!("invalid body: {e}"))
            .hint("send a JSON object of arguments, e.g. {\"name\": \"value\"}")
    })?;
    Ok((entry, args, wait))
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
            .map_err(|_| ApiError::not_found())
    }
}

fn job_id(prefix: &str, id: &str) -> Result<Uuid, ApiError> {
    if prefix != "jobs" {
        return Err(ApiError::not_found());
    }
    Uuid::parse_str(id).map_err(|_| ApiError::job_not_found())
}

#[tracing::instrument(skip_all, fields(peer = %caller.peer))]
async fn get_job(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Segments(prefix, id): Segments,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = job_id(&prefix, &id)?;
    let wait = body::parse_wait(&uri, api.inner.settings.max_wait)?;
    let streaming = stream::requested(&uri);
    stream::check_mode(&streaming, wait)?;
    if streaming == Ok(true) {
        return stream::follow_job(&api, &caller, id, &headers);
    }
    let result = match wait {
        Some(wait) => api.inner.executor.wait(id, &caller.identity, wait).await,
        None => api.inner.executor.get(id, &caller.identity),
    };
    let result = result.ok_or_else(ApiError::job_not_found)?;
    Ok(api.job_answer(StatusCode::OK, &result).await)
}

#[tracing::instrument(skip_all, fields(peer = %caller.peer))]
async fn delete_job(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Segments(prefix, id): Segments,
) -> Result<Response, ApiError> {
    let id = job_id(&prefix, &id)?;
    let result = api
        .inner
        .executor
        .cancel(id, &caller.identity)
        .await
        .ok_or_else(ApiError::job_not_found)?;
    Ok(api.job_answer(StatusCode::OK, &result).await)
}

async fn list_tools(State(api): State<Api>, Extension(caller): Extension<Caller>) -> Response {
    let index = api.inner.registry.snapshot();
    let tools: Vec<_> = index
        .tools()
        .filter_map(|t| t.to_wire(|c| api.authorize(&caller.identity, c).is_ok()))
        .collect();
    Json(tools).into_response()
}

/// `{"status": "ok", "hostname": ..., "audit": "ok"}`; while the audit log
/// cannot be written, `"audit": "failing"` with the error and the records
/// kept for later (the daemon still answers, so `status` stays `ok`: see
/// the README's Exec API decisions).
async fn health(State(api): State<Api>) -> Response {
    let audit = api.inner.audit.status();
    let mut body = serde_json::json!({
        "status": "ok",
        "hostname": api.inner.settings.hostname,
        "audit": if audit.failing { "failing" } else { "ok" },
    });
    if audit.failing {
        body["audit_error"] = audit.error.unwrap_or_default().into();
    }
    if audit.failing || audit.queued > 0 {
        body["audit_queued"] = audit.queued.into();
    }
    if audit.dropped > 0 {
        body["audit_dropped"] = audit.dropped.into();
    }
    Json(body).into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found().hint(
        "routes: POST /exec/{tool}/{cmd}, GET|DELETE /exec/jobs/{id}, GET /tools, GET /health",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}
