//! A small HTTP/1.1 client for the exec API over any byte stream (a tailnet
//! connection from `Node::dial`, a loopback socket): what `tailkitd demo`
//! and the integration tests use to call a daemon the way the Go SDK does.
//! [`open_stream`] follows a live job stream (`?stream=true`, SPEC §7)
//! event by event, with the [`sse`] parser.

pub mod sse;

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// A response: status, the `Retry-After` header if any, and the body parsed
/// as JSON (or `Value::Null` when it is empty or not JSON; the raw text is
/// kept too).
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status.
    pub status: StatusCode,
    /// `Retry-After` in seconds, when the server sent one.
    pub retry_after: Option<u64>,
    /// The body as text.
    pub text: String,
    /// The body as JSON, `Null` when it is not JSON.
    pub json: serde_json::Value,
}

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The HTTP exchange failed (connection closed, malformed response).
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built (bad header value).
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    /// No answer in time.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The event stream broke the SSE format.
    #[error("event stream: {0}")]
    Stream(#[from] sse::SseError),
    /// A plain answer longer than [`MAX_RESPONSE_BYTES`].
    #[error("the answer is longer than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
}

/// The longest plain answer read: a job result holds at most two streams of
/// the daemon's largest output cap (64 MiB each), JSON-escaped; a peer
/// that sends more is not a daemon to trust with this process's memory.
pub const MAX_RESPONSE_BYTES: usize = 512 << 20;

/// One request to send.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    /// HTTP method.
    pub method: Method,
    /// Path and query, e.g. `/exec/disk/usage?wait=10s`.
    pub path: &'a str,
    /// The `Host` header: the daemon refuses names that are not its own.
    pub host: &'a str,
    /// Content type of the body, if any.
    pub content_type: Option<&'a str>,
    /// Extra headers.
    pub headers: Vec<(&'a str, &'a str)>,
    /// The body (empty for none).
    pub body: Vec<u8>,
}

impl<'a> Call<'a> {
    /// A GET of `path` on `host`.
    pub fn get(host: &'a str, path: &'a str) -> Self {
        Call {
            method: Method::GET,
            path,
            host,
            content_type: None,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A DELETE of `path` on `host`.
    pub fn delete(host: &'a str, path: &'a str) -> Self {
        Call {
            method: Method::DELETE,
            ..Call::get(host, path)
        }
    }

    /// A POST of `body` as JSON, with the Content-Type the Go SDK sends
    /// (`application/octet-stream`).
    pub fn post_json(host: &'a str, path: &'a str, body: &serde_json::Value) -> Self {
        Call {
            method: Method::POST,
            content_type: Some("application/octet-stream"),
            body: body.to_string().into_bytes(),
            ..Call::get(host, path)
        }
    }
}

/// Sends one request over `stream` and reads the whole response, within
/// `timeout`.
///
/// # Errors
///
/// When the exchange fails or takes longer than `timeout`.
pub async fn send<S>(stream: S, call: Call<'_>, timeout: Duration) -> Result<Response, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::time::timeout(timeout, exchange(stream, call))
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}

async fn exchange<S>(stream: S, call: Call<'_>) -> Result<Response, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (resp, driver) = request(stream, call).await?;
    read_response(resp, driver).await
}

/// Sends `call` and returns the response head, its body not read yet, and
/// the task driving the connection.
async fn request<S>(
    stream: S,
    call: Call<'_>,
) -> Result<(hyper::Response<Incoming>, tokio::task::JoinHandle<()>), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(call.method)
        .uri(call.path)
        .header(hyper::header::HOST, call.host);
    if let Some(ct) = call.content_type {
        req = req.header(hyper::header::CONTENT_TYPE, ct);
    }
    for (name, value) in call.headers {
        req = req.header(name, value);
    }
    let req = req.body(Full::new(Bytes::from(call.body)))?;
    let resp = sender.send_request(req).await?;
    Ok((resp, driver))
}

/// Reads the whole body of `resp`, then stops the connection.
async fn read_response(
    resp: hyper::Response<Incoming>,
    driver: tokio::task::JoinHandle<()>,
) -> Result<Response, ClientError> {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let body = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await;
    driver.abort();
    let body = match body {
        Ok(b) => b.to_bytes(),
        Err(e) => match e.downcast::<hyper::Error>() {
            Ok(e) => return Err(ClientError::Http(*e)),
            Err(_) => return Err(ClientError::TooLarge),
        },
    };
    let text = String::from_utf8_lossy(&body).into_owned();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    Ok(Response {
        status,
        retry_after,
        text,
        json,
    })
}

/// What [`open_stream`] got: the event stream, or a plain answer (a
/// refusal: `404`, `429`, ... with its JSON error).
#[derive(Debug)]
pub enum Opened {
    /// `200 text/event-stream`: the events follow.
    Events(EventStream),
    /// Anything else, read whole.
    Answer(Response),
}

/// A live job stream (SPEC §7), read event by event as it arrives.
#[derive(Debug)]
pub struct EventStream {
    /// The response headers (`Content-Type`, `Cache-Control`, ...).
    pub headers: hyper::HeaderMap,
    body: Incoming,
    parser: sse::Parser,
    driver: tokio::task::JoinHandle<()>,
    ended: bool,
}

impl EventStream {
    /// The next event or comment (a heartbeat); `None` once the server
    /// ended the stream.
    ///
    /// # Errors
    ///
    /// When the connection fails or the stream is not well-formed SSE.
    pub async fn next(&mut self) -> Result<Option<sse::Item>, ClientError> {
        loop {
            if let Some(item) = self.parser.next_item()? {
                return Ok(Some(item));
            }
            if self.ended {
                return Ok(self.parser.finish());
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.parser.feed(&data)?;
                    }
                }
                None => self.ended = true,
            }
        }
    }

    /// The next event, skipping comments; `None` at the end.
    ///
    /// # Errors
    ///
    /// As [`EventStream::next`].
    pub async fn next_event(&mut self) -> Result<Option<sse::Event>, ClientError> {
        loop {
            match self.next().await? {
                Some(sse::Item::Event(event)) => return Ok(Some(event)),
                Some(sse::Item::Comment(_)) => {}
                None => return Ok(None),
            }
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        // Closes the connection: the server sees the client go away.
        self.driver.abort();
    }
}

/// Sends `call` (e.g. `GET /exec/jobs/{id}?stream=true`, with
/// `Last-Event-ID` among its headers to resume) over `stream` and, when
/// the answer is an event stream, returns it to be read as it arrives;
/// the head must come within `timeout` (the events take their time).
///
/// # Errors
///
/// When the exchange fails or no head comes within `timeout`.
pub async fn open_stream<S>(
    stream: S,
    call: Call<'_>,
    timeout: Duration,
) -> Result<Opened, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (resp, driver) = tokio::time::timeout(timeout, request(stream, call))
        .await
        .map_err(|_| ClientError::Timeout(timeout))??;
    let is_events = resp.status() == StatusCode::OK
        && resp
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !is_events {
        return tokio::time::timeout(timeout, read_response(resp, driver))
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
            .map(Opened::Answer);
    }
    let (parts, body) = resp.into_parts();
    Ok(Opened::Events(EventStream {
        headers: parts.headers,
        body,
        parser: sse::Parser::default(),
        driver,
        ended: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn sends_host_and_sdk_content_type_and_reads_json() {
        let (client_side, mut server_side) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            // Read until the end of the headers plus the 7-byte body.
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") || !buf.ends_with(b"{\"a\":1}") {
                let n = server_side.read(&mut chunk).await.unwrap();
                assert!(n > 0, "client closed early");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = br#"{"error":"busy"}"#;
            let head = format!(
                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            server_side.write_all(head.as_bytes()).await.unwrap();
            server_side.write_all(body).await.unwrap();
            String::from_utf8(buf).unwrap()
        });
        let call = Call::post_json("tk", "/exec/t/c", &serde_json::json!({"a": 1}));
        let resp = send(client_side, call, Duration::from_secs(5))
            .await
            .unwrap();
        let request = server.await.unwrap();
        assert!(
            request.starts_with("POST /exec/t/c HTTP/1.1\r\n"),
            "{request}"
        );
        let lower = request.to_ascii_lowercase();
        assert!(lower.contains("host: tk\r\n"), "{request}");
        assert!(
            lower.contains("content-type: application/octet-stream\r\n"),
            "{request}"
        );
        assert_eq!(resp.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.retry_after, Some(3));
        assert_eq!(resp.json["error"], "busy");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let (client_side, _server_side) = tokio::io::duplex(4096);
        let err = send(
            client_side,
            Call::get("tk", "/health"),
            Duration::from_millis(50),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ClientError::Timeout(_)), "{err}");
    }
}
