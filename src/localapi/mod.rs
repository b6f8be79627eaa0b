//! The machine's own `tailscaled`, through its LocalAPI on a Unix socket:
//! the peer list (`GET /localapi/v0/status`) and connections to tailnet
//! peers (`POST /localapi/v0/dial`, upgraded to a raw byte stream). This is
//! how `tailkitd call` reaches the tailnet when it is given no auth key, and
//! it works whether tailscaled runs with a kernel TUN or in userspace
//! networking mode, since tailscaled itself opens the connection.
//!
//! The protocol, as tailscale.com v1.102's `client/local` speaks it and
//! `ipn/localapi` checks it:
//!
//! - HTTP/1.1 over the Unix socket, `Host: local-tailscaled.sock` (any
//!   other host is refused with 403 unless a password is configured), no
//!   `Origin` or `Referer` header.
//! - Permissions come from the socket peer's credentials: any local user may
//!   read (`status`) and dial; writes need root or the operator user.
//! - A dial is `POST /localapi/v0/dial` with `Connection: upgrade`,
//!   `Upgrade: ts-dial`, `Dial-Host`, `Dial-Port` and `Dial-Network: tcp`.
//!   tailscaled answers `101 Switching Protocols` and from then on the
//!   socket carries the TCP stream to the peer; or `200` with `Dial-Self:
//!   true` and `Dial-Addr` when the address is not on the tailnet (the
//!   caller should dial it itself; here that is an error, since a tailkitd
//!   peer is only reachable over the tailnet); or an error status with a
//!   text body (`502` "dial failure: ..." when the peer does not answer).

mod dial;
mod status;

pub use dial::DialStream;
pub use status::{Peer, Status};

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;

/// The `Host` header tailscaled's LocalAPI requires.
pub const LOCALAPI_HOST: &str = "local-tailscaled.sock";

/// The environment variable naming the socket (the convention of
/// Tailscale's container image; the `tailscale` CLI takes `--socket`).
pub const SOCKET_ENV: &str = "TS_SOCKET";

/// Where tailscaled listens on Linux, in the order they are tried. The first
/// is the default of tailscale.com's `paths.DefaultTailscaledSocket`; the
/// second is the same place on systems without a `/var/run` link.
pub const SOCKET_PATHS: [&str; 2] = [
    "/var/run/tailscale/tailscaled.sock",
    "/run/tailscale/tailscaled.sock",
];

/// How long a LocalAPI exchange may take unless [`LocalApi::with_timeout`]
/// says otherwise: for a dial, until the stream to the peer is open.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest status answer read (a tailnet of many thousands of peers
/// stays well below).
const MAX_STATUS_BYTES: usize = 64 << 20;
/// The largest error body kept from the LocalAPI.
const MAX_ERROR_BYTES: usize = 4096;

/// What can go wrong talking to tailscaled.
#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    /// Nothing listens on the socket (it does not exist, or refuses).
    #[error("tailscaled is not running at {}: connect: {source}", socket.display())]
    NotRunning {
        /// The socket path tried.
        socket: PathBuf,
        /// The connect error.
        #[source]
        source: io::Error,
    },
    /// The socket exists but could not be connected to (permissions...).
    #[error("cannot connect to tailscaled at {}: {source}", socket.display())]
    Connect {
        /// The socket path tried.
        socket: PathBuf,
        /// The connect error.
        #[source]
        source: io::Error,
    },
    /// The HTTP exchange with tailscaled failed (connection closed,
    /// malformed answer).
    #[error("{op}: talking to tailscaled: {source}")]
    Http {
        /// The LocalAPI call (`status`, `dial`).
        op: &'static str,
        /// The HTTP error.
        #[source]
        source: hyper::Error,
    },
    /// The request could not be built (a host with characters no header
    /// may carry).
    #[error("{op}: bad request: {source}")]
    Request {
        /// The LocalAPI call.
        op: &'static str,
        /// The builder's error.
        #[source]
        source: hyper::http::Error,
    },
    /// The LocalAPI answered with an unexpected status; `body` is its
    /// (trimmed) message, e.g. "dial failure: ...".
    #[error("{op}: tailscaled answered {status}: {body}")]
    Status {
        /// The LocalAPI call.
        op: &'static str,
        /// The HTTP status.
        status: StatusCode,
        /// The answer's body, trimmed (at most 4 KiB).
        body: String,
    },
    /// The answer is not the JSON expected.
    #[error("{op}: unexpected answer from tailscaled: {detail}")]
    Decode {
        /// The LocalAPI call.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// No answer within the timeout.
    #[error("{op}: no answer from tailscaled within {timeout:?}")]
    Timeout {
        /// The LocalAPI call.
        op: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// tailscaled says the address is not on the tailnet, and would have
    /// the caller connect to it directly.
    #[error("{host} is not on the tailnet (tailscaled resolved it to {addr})")]
    NotOnTailnet {
        /// The host asked for.
        host: String,
        /// Where tailscaled resolved it.
        addr: String,
    },
    /// No peer has that host name, MagicDNS name or address.
    #[error("peer {target} not found in the peer list")]
    PeerNotFound {
        /// The target asked for.
        target: String,
    },
    /// Several peers share that host name.
    #[error("{target} names several peers: {}; use a MagicDNS name or an IP", candidates.join(", "))]
    AmbiguousPeer {
        /// The target asked for.
        target: String,
        /// The MagicDNS names of the peers it matches.
        candidates: Vec<String>,
    },
}

/// A client for one tailscaled's LocalAPI. Cheap to clone; every call opens
/// its own connection (as the Go client does for dials).
#[derive(Debug, Clone)]
pub struct LocalApi {
    socket: PathBuf,
    timeout: Duration,
}

impl LocalApi {
    /// A client for the tailscaled listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> LocalApi {
        LocalApi {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// A client for the socket [`default_socket_path`] picks.
    pub fn with_default_socket() -> LocalApi {
        LocalApi::new(default_socket_path())
    }

    /// The same client with another timeout per call.
    pub fn with_timeout(self, timeout: Duration) -> LocalApi {
        LocalApi { timeout, ..self }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// tailscaled's view of the tailnet: this node and every peer.
    ///
    /// # Errors
    ///
    /// [`LocalApiError::NotRunning`] or [`LocalApiError::Connect`] when the
    /// socket cannot be reached; [`LocalApiError::Status`] with
    /// tailscaled's message when it refuses; [`LocalApiError::Decode`] for
    /// an answer that is not a status; [`LocalApiError::Timeout`].
    pub async fn status(&self) -> Result<Status, LocalApiError> {
        const OP: &str = "status";
        let body = self
            .within(OP, async {
                let mut sender = self.handshake(OP, false).await?;
                let req = request(Method::GET, "/localapi/v0/status")
                    .body(Empty::<Bytes>::new())
                    .map_err(|source| LocalApiError::Request { op: OP, source })?;
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|source| LocalApiError::Http { op: OP, source })?;
                let status = resp.status();
                if status != StatusCode::OK {
                    return Err(status_error(OP, resp).await);
                }
                Limited::new(resp.into_body(), MAX_STATUS_BYTES)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .map_err(|e| LocalApiError::Decode {
                        op: OP,
                        detail: format!("reading the body: {e}"),
                    })
            })
            .await?;
        Status::from_json(&body)
    }

    /// A TCP connection to `host:port` on the tailnet, opened by tailscaled.
    /// `host` is a tailnet IP, a MagicDNS name or a peer's short name
    /// (tailscaled resolves names from its network map); dial a
    /// [`Peer::addr`] to connect to exactly the peer [`Status::resolve`]
    /// found.
    ///
    /// # Errors
    ///
    /// As [`LocalApi::status`]; [`LocalApiError::Status`] with tailscaled's
    /// message when the peer cannot be reached (`502 Bad Gateway`, "dial
    /// failure: ..." or "resolve failure: ..."), and
    /// [`LocalApiError::NotOnTailnet`] for an address off the tailnet.
    pub async fn dial(&self, host: &str, port: u16) -> Result<DialStream, LocalApiError> {
        const OP: &str = "dial";
        self.within(OP, async {
            let mut sender = self.handshake(OP, true).await?;
            let req = request(Method::POST, "/localapi/v0/dial")
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, "ts-dial")
                .header("Dial-Host", host)
                .header("Dial-Port", port.to_string())
                .header("Dial-Network", "tcp")
                .body(Empty::<Bytes>::new())
                .map_err(|source| LocalApiError::Request { op: OP, source })?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|source| LocalApiError::Http { op: OP, source })?;
            match resp.status() {
                StatusCode::SWITCHING_PROTOCOLS => {}
                StatusCode::OK if header_is(&resp, "Dial-Self", "true") => {
                    let addr = resp
                        .headers()
                        .get("Dial-Addr")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("an address off the tailnet");
                    return Err(LocalApiError::NotOnTailnet {
                        host: host.to_string(),
                        addr: addr.to_string(),
                    });
                }
                _ => return Err(status_error(OP, resp).await),
            }
            let upgraded = hyper::upgrade::on(resp)
                .await
                .map_err(|source| LocalApiError::Http { op: OP, source })?;
            Ok(DialStream {
                io: TokioIo::new(upgraded),
            })
        })
        .await
    }

    /// Runs `fut` within the timeout.
    async fn within<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, LocalApiError>>,
    ) -> Result<T, LocalApiError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| LocalApiError::Timeout {
                op,
                timeout: self.timeout,
            })?
    }

    /// Connects to the socket and starts an HTTP/1.1 connection on it, its
    /// driver on a task (which ends with the connection, or hands the
    /// socket over on an upgrade).
    async fn handshake(
        &self,
        op: &'static str,
        upgrades: bool,
    ) -> Result<http1::SendRequest<Empty<Bytes>>, LocalApiError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| connect_error(&self.socket, source))?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| LocalApiError::Http { op, source })?;
        if upgrades {
            tokio::spawn(conn.with_upgrades());
        } else {
            tokio::spawn(conn);
        }
        Ok(sender)
    }
}

/// The socket to use: `$TS_SOCKET` when set and not empty, else the first
/// of [`SOCKET_PATHS`] that exists, else the first of them (so that the
/// error names the usual place).
pub fn default_socket_path() -> PathBuf {
    pick_socket_path(std::env::var_os(SOCKET_ENV), |p| p.exists())
}

fn pick_socket_path(env: Option<OsString>, exists: impl Fn(&Path) -> bool) -> PathBuf {
    if let Some(path) = env.filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    SOCKET_PATHS
        .iter()
        .map(Path::new)
        .find(|p| exists(p))
        .unwrap_or(Path::new(SOCKET_PATHS[0]))
        .to_path_buf()
}

fn connect_error(socket: &Path, source: io::Error) -> LocalApiError {
    let socket = socket.to_path_buf();
    match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            LocalApiError::NotRunning { socket, source }
        }
        _ => LocalApiError::Connect { socket, source },
    }
}

/// A request with the headers every LocalAPI call carries.
fn request(method: Method, path: &str) -> hyper::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, LOCALAPI_HOST)
}

fn header_is<B>(resp: &hyper::Response<B>, name: &str, value: &str) -> bool {
    resp.headers()
        .get(name)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

/// The error for an unexpected status, with (the start of) its body, which
/// is a text message from Go's `http.Error` or a JSON `{"error": ...}`.
async fn status_error(
    op: &'static str,
    resp: hyper::Response<hyper::body::Incoming>,
) -> LocalApiError {
    let status = resp.status();
    let body = match Limited::new(resp.into_body(), MAX_ERROR_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    LocalApiError::Status {
        op,
        status,
        body: error_message(&body),
    }
}

fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorJson {
        error: String,
    }
    if let Ok(e) = serde_json::from_slice::<ErrorJson>(body) {
        return e.error;
    }
    String::from_utf8_lossy(body).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    #[test]
    fn socket_path_comes_from_the_environment_then_the_usual_places() {
        let none = |_: &Path| false;
        assert_eq!(
            pick_socket_path(Some("/tmp/ts.sock".into()), none),
            Path::new("/tmp/ts.sock")
        );
        assert_eq!(
            pick_socket_path(Some("".into()), none),
            Path::new(SOCKET_PATHS[0])
        );
        assert_eq!(
            pick_socket_path(None, |p| p.starts_with("/run/")),
            Path::new("/run/tailscale/tailscaled.sock")
        );
    }

    #[tokio::test]
    async fn a_missing_socket_says_tailscaled_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("tailscaled.sock");
        let err = LocalApi::new(&sock).status().await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "tailscaled is not running at {}: connect: ",
                sock.display()
            )),
            "{msg}"
        );
    }

    /// A one-shot server on a Unix socket: reads one request head, answers
    /// `answer`, then echoes whatever follows. Returns the request head.
    async fn serve_once(
        listener: UnixListener,
        answer: &'static str,
    ) -> tokio::task::JoinHandle<String> {
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut byte).await.unwrap();
                assert!(n > 0, "client closed early");
                head.push(byte[0]);
            }
            s.write_all(answer.as_bytes()).await.unwrap();
            let mut buf = [0u8; 64];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => s.write_all(&buf[..n]).await.unwrap(),
                }
            }
            String::from_utf8(head).unwrap()
        })
    }

    #[tokio::test]
    async fn dial_sends_the_upgrade_headers_and_then_carries_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let server = serve_once(
            UnixListener::bind(&sock).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ts-dial\r\n\r\n",
        )
        .await;
        let mut stream = LocalApi::new(&sock).dial("tk", 80).await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        drop(stream);
        let head = server.await.unwrap().to_ascii_lowercase();
        assert!(
            head.starts_with("post /localapi/v0/dial http/1.1\r\n"),
            "{head}"
        );
        for h in [
            "host: local-tailscaled.sock\r\n",
            "connection: upgrade\r\n",
            "upgrade: ts-dial\r\n",
            "dial-host: tk\r\n",
            "dial-port: 80\r\n",
            "dial-network: tcp\r\n",
        ] {
            assert!(head.contains(h), "{h:?} missing in {head}");
        }
    }

    #[tokio::test]
    async fn dial_errors_carry_the_status_and_message() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let listener = UnixListener::bind(&sock).unwrap();
        let _server = serve_once(
            listener,
            "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 38\r\n\r\ndial failure: connection refused\n\n\n\n\n\n",
        )
        .await;
        let err = LocalApi::new(&sock).dial("tk", 81).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "dial: tailscaled answered 502 Bad Gateway: dial failure: connection refused"
        );
    }

    #[tokio::test]
    async fn dial_self_means_not_on_the_tailnet() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _server = serve_once(
            UnixListener::bind(&sock).unwrap(),
            "HTTP/1.1 200 OK\r\nDial-Self: true\r\nDial-Addr: 93.184.215.14:80\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        let err = LocalApi::new(&sock)
            .dial("example.com", 80)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "example.com is not on the tailnet (tailscaled resolved it to 93.184.215.14:80)"
        );
    }

    #[tokio::test]
    async fn a_silent_tailscaled_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _listener = UnixListener::bind(&sock).unwrap();
        let err = LocalApi::new(&sock)
            .with_timeout(Duration::from_millis(100))
            .status()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "status: no answer from tailscaled within 100ms"
        );
    }
}
