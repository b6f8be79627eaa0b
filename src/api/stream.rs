//! Live job output over server-sent events (SPEC §7): `GET
//! /exec/jobs/{id}?stream=true` follows a job, `POST
//! /exec/{tool}/{cmd}?stream=true` starts one and follows it.
//!
//! A stream is a [`Cursor`] over the job's [`JobOutput`], the one buffer
//! every reader shares: it reads a batch of events, hands it to hyper, and
//! reads the next only when hyper asks for more, that is when the client
//! has taken the last. A stalled client costs one batch and its socket
//! buffers, never the command's time or a copy of its output. Framing:
//! `event: NAME\nid: N\ndata: JSON\n\n`, `: heartbeat\n\n` every
//! [`ApiSettings::stream_heartbeat`](super::ApiSettings), and, if the
//! sequence cannot go on, `event: error\ndata: {"error": ...}\n\n` (no id:
//! it is not one of the job's events) before the end.
//!
//! Open streams are capped per peer (its WhoIs node, else its address):
//! a stream holds one of the peer's own connections, never a job slot.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Query;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::Response;
use hyper::body::Bytes;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use super::guard::Caller;
use super::{Api, ApiError};
use crate::run::Refusal;
use crate::run::output::{Cursor, Event, JobOutput, ReadState};
use crate::tools::ExecEntry;

/// Bytes of events a stream reads at once before handing them on.
const BATCH_BYTES: usize = 32 << 10;

/// Whether the request asks for a stream: `?stream=true` (`false` or no
/// `stream` is a plain request).
///
/// # Errors
///
/// `400` for any other value, or a malformed query.
pub(super) fn requested(uri: &Uri) -> Result<bool, ApiError> {
    let Ok(Query(pairs)) = Query::<Vec<(String, String)>>::try_from_uri(uri) else {
        return Err(ApiError::bad_request("the query string is malformed"));
    };
    match pairs.iter().rev().find(|(k, _)| k == "stream") {
        None => Ok(false),
        Some((_, v)) if v == "true" => Ok(true),
        Some((_, v)) if v == "false" => Ok(false),
        Some((_, v)) => Err(
            ApiError::bad_request(format!("stream: {v:?} is not true or false"))
                .hint("?stream=true follows the job's output as server-sent events"),
        ),
    }
}

/// Checks that a request is one thing: a stream (`requested`) does not
/// also `?wait=`.
///
/// # Errors
///
/// `requested`'s own error, or `400` for a stream with a wait.
pub(super) fn check_mode(
    requested: &Result<bool, ApiError>,
    wait: Option<Duration>,
) -> Result<(), ApiError> {
    match requested {
        Err(e) => Err(e.clone()),
        Ok(true) if wait.is_some() => Err(ApiError::bad_request(
            "?stream=true and ?wait= cannot be combined",
        )
        .hint("a stream ends with the job's terminal event; drop ?wait=")),
        Ok(_) => Ok(()),
    }
}

/// `Last-Event-ID`: the stream resumes right after that event (0 or none:
/// from the first).
///
/// # Errors
///
/// `400` when it is not a decimal event id.
fn last_event_id(headers: &HeaderMap) -> Result<u64, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(0);
    };
    value
        .to_str()
        .ok()
        .map(str::trim)
        .and_then(|v| {
            if v.is_empty() {
                Some(0)
            } else {
                v.parse().ok()
            }
        })
        .ok_or_else(|| {
            ApiError::bad_request("Last-Event-ID is not an event id")
                .hint("send the id of the last event received, e.g. Last-Event-ID: 7")
        })
}

/// `GET /exec/jobs/{id}?stream=true`: the job's events for its owner,
/// after `Last-Event-ID`.
///
/// # Errors
///
/// `400` bad `Last-Event-ID`, `404` no such job for this caller, `429`
/// the caller has too many streams open.
pub(super) fn follow_job(
    api: &Api,
    caller: &Caller,
    id: Uuid,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let after = last_event_id(headers)?;
    let output = api
        .inner
        .executor
        .output(id, &caller.identity)
        .ok_or_else(ApiError::job_not_found)?;
    let slot = api.inner.streams.take(caller)?;
    tracing::debug!(job_id = %id, after, "following a job");
    Ok(respond(api, output, id, Cursor::after(after), slot))
}

/// `POST /exec/{tool}/{cmd}?stream=true`, once the API's own checks
/// passed: takes a stream slot (before anything runs), submits the job as
/// any POST does, and follows it from its first event. Refusals are
/// audited and answered as JSON errors.
///
/// # Errors
///
/// `429` the caller has too many streams open, else the executor's
/// [`Refusal`].
pub(super) async fn run_and_follow(
    api: &Api,
    caller: &Caller,
    target: (&str, &str),
    entry: &ExecEntry,
    args: &Map<String, Value>,
) -> Result<Response, ApiError> {
    let slot = match api.inner.streams.take(caller) {
        Ok(slot) => slot,
        Err(err) => {
            api.deny(caller.job().audit(), target, &err).await;
            return Err(err);
        }
    };
    let id = api
        .inner
        .executor
        .submit(entry, args, caller.job())
        .await
        .map_err(|refusal: Refusal| ApiError::from(&refusal))?;
    tracing::info!(job_id = %id, "job accepted, following it");
    let output = api.inner.executor.output(id, &caller.identity);
    Ok(match output {
        Some(output) => respond(api, output, id, Cursor::start(), slot),
        // Only if the job expired already: say so in the stream.
        None => {
            let gone = JobOutput::new(0);
            gone.abort("the job is gone");
            respond(api, gone, id, Cursor::after(1), slot)
        }
    })
}

/// The `200 text/event-stream` answer following `output` from `cursor`.
fn respond(
    api: &Api,
    output: Arc<JobOutput>,
    id: Uuid,
    cursor: Cursor,
    slot: StreamSlot,
) -> Response {
    let heartbeat = api.inner.settings.stream_heartbeat;
    let follow = Follow {
        changes: output.subscribe(),
        output,
        cursor,
        job_id: id.to_string(),
        heartbeat,
        next_heartbeat: Instant::now() + heartbeat,
        done: false,
        _slot: slot,
    };
    let chunks = futures_util::stream::unfold(follow, |mut follow| async move {
        let chunk = follow.next_chunk().await?;
        Some((Ok::<_, Infallible>(chunk), follow))
    });
    let mut response = Response::new(Body::from_stream(chunks));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies (nginx) must not hold the events back.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// One open stream: where it is in the job's sequence, and when its next
/// heartbeat is due.
struct Follow {
    output: Arc<JobOutput>,
    cursor: Cursor,
    changes: watch::Receiver<u64>,
    job_id: String,
    heartbeat: Duration,
    next_heartbeat: Instant,
    done: bool,
    /// Released when the stream ends or its client goes away.
    _slot: StreamSlot,
}

impl Follow {
    /// The next bytes to send: a heartbeat when one is due, else a batch
    /// of events once there is one; `None` after the last.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if self.done {
                return None;
            }
            let now = Instant::now();
            if now >= self.next_heartbeat {
                self.next_heartbeat = now + self.heartbeat;
                return Some(Bytes::from_static(b": heartbeat\n\n"));
            }
            // Seen before reading: a change after the read wakes us.
            self.changes.borrow_and_update();
            let mut batch = Vec::new();
            let job_id = self.job_id.as_str();
            let state = self.output.read(&mut self.cursor, |id, event| {
                write_event(&mut batch, id, &event, job_id);
                batch.len() < BATCH_BYTES
            });
            match state {
                ReadState::Paused => return Some(batch.into()),
                ReadState::Waiting if !batch.is_empty() => return Some(batch.into()),
                ReadState::Waiting => {}
                ReadState::Ended => {
                    self.done = true;
                    return (!batch.is_empty()).then(|| batch.into());
                }
                ReadState::Failed(reason) => {
                    self.done = true;
                    write_error(&mut batch, &reason);
                    return Some(batch.into());
                }
            }
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        // Cannot happen while `output` is held; do not spin.
                        std::future::pending::<()>().await;
                    }
                }
                () = tokio::time::sleep_until(self.next_heartbeat) => {}
            }
        }
    }
}

/// Appends `event: NAME\nid: N\ndata: JSON\n\n`.
fn write_event(out: &mut Vec<u8>, id: u64, event: &Event<'_>, job_id: &str) {
    // Writes into a Vec cannot fail.
    let _ = write!(out, "event: {}\nid: {id}\ndata: ", event.name());
    event.write_json(job_id, out);
    out.extend_from_slice(b"\n\n");
}

/// Appends the `error` event that ends a stream early.
fn write_error(out: &mut Vec<u8>, reason: &str) {
    out.extend_from_slice(b"event: error\ndata: ");
    let _ = serde_json::to_writer(&mut *out, &serde_json::json!({ "error": reason }));
    out.extend_from_slice(b"\n\n");
}

/// Open streams per peer, capped.
#[derive(Debug)]
pub(super) struct StreamSlots {
    open: Mutex<HashMap<String, usize>>,
    max_per_peer: usize,
}

/// One open stream of a peer; given back when dropped.
#[derive(Debug)]
pub(super) struct StreamSlot {
    slots: Arc<StreamSlots>,
    peer: String,
}

impl StreamSlots {
    pub(super) fn new(max_per_peer: usize) -> Arc<Self> {
        Arc::new(StreamSlots {
            open: Mutex::new(HashMap::new()),
            max_per_peer,
        })
    }

    /// A slot for `caller`'s node.
    ///
    /// # Errors
    ///
    /// `429` with `Retry-After` when the node has the most streams open.
    fn take(self: &Arc<Self>, caller: &Caller) -> Result<StreamSlot, ApiError> {
        let peer = if caller.identity.node_id.is_empty() {
            caller.peer.ip().to_string()
        } else {
            caller.identity.node_id.clone()
        };
        // Never held across an await.
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(peer.clone()).or_insert(0);
        if *n >= self.max_per_peer {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "this peer already follows {} job streams, the most allowed",
                    self.max_per_peer
                ),
            )
            .hint("close a stream, or poll with GET /exec/jobs/{id}?wait=")
            .retry_after(1));
        }
        *n += 1;
        Ok(StreamSlot {
            slots: self.clone(),
            peer,
        })
    }
}

impl StreamSlots {
    /// Streams open now, over every peer.
    pub(super) fn open(&self) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.values().sum()
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_takes_true_or_false_only() {
        let uri = |q: &str| format!("/exec/jobs/x{q}").parse::<Uri>().unwrap();
        assert!(!requested(&uri("")).unwrap());
        assert!(requested(&uri("?stream=true")).unwrap());
        assert!(!requested(&uri("?stream=false")).unwrap());
        assert!(requested(&uri("?stream=false&stream=true")).unwrap());
        let e = requested(&uri("?stream=yes")).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(e.message().contains("yes"), "{}", e.message());
        let wait = Some(Duration::from_secs(1));
        assert!(check_mode(&Ok(true), wait).is_err());
        assert!(check_mode(&Ok(false), wait).is_ok());
        assert!(check_mode(&Ok(true), None).is_ok());
    }

    #[test]
    fn last_event_id_is_a_decimal_id() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("last-event-id", HeaderValue::from_str(v).unwrap());
            last_event_id(&h)
        };
        assert_eq!(last_event_id(&HeaderMap::new()).unwrap(), 0);
        assert_eq!(with("7").unwrap(), 7);
        assert_eq!(with(" 12 ").unwrap(), 12);
        assert_eq!(with("").unwrap(), 0);
        assert_eq!(with("-1").unwrap_err().status(), StatusCode::BAD_REQUEST);
        assert_eq!(with("x").unwrap_err().status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn frames_are_sse() {
        let mut out = Vec::new();
        write_event(
            &mut out,
            3,
            &Event::Line {
                pipe: crate::run::output::Pipe::Stderr,
                line: "a\u{1}\"b".into(),
            },
            "j",
        );
        write_error(&mut out, "gone");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "event: job.stderr\nid: 3\ndata: {\"job_id\":\"j\",\"line\":\"a\\u0001\\\"b\",\"stream\":\"stderr\"}\n\n\
             event: error\ndata: {\"error\":\"gone\"}\n\n"
        );
    }
}
