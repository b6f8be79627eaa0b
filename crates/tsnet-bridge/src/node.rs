//! `Node`: one tsnet node in this process, over the Go bridge. Every call
//! that may block in Go runs on tokio's blocking pool, never on a runtime
//! worker.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::BridgeError;
use super::ffi::{self, CallError};
use super::listener::{Listener, Stream};
use super::logs;
use super::whois::WhoIs;

/// How long `dial` waits by default.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `whois` waits.
const WHOIS_TIMEOUT: Duration = Duration::from_secs(15);
/// Extra time given to a bridge call beyond its own timeout before the Rust
/// side gives up on it (a safety net: the Go side enforces its timeouts).
const GRACE: Duration = Duration::from_secs(30);

/// The settings of a tailnet node.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node's name on the tailnet: one DNS label (`[A-Za-z0-9-]`, at
    /// most 63 bytes, not starting or ending with `-`).
    pub hostname: String,
    /// Where tsnet keeps the node's keys and state (created if missing).
    pub state_dir: PathBuf,
    /// Auth key to join without interactive login. Used only when the state
    /// dir holds no node yet.
    pub auth_key: Option<String>,
    /// Control server URL; `None` means Tailscale's.
    pub control_url: Option<String>,
    /// Register as an ephemeral node, removed from the tailnet when it
    /// closes (or goes offline for a while).
    pub ephemeral: bool,
    /// Let tsnet upload its logs to Tailscale's log service. Off by default;
    /// off is process-wide and sticky (see `tsnetbridge.h`).
    pub upload_logs: bool,
}

impl NodeConfig {
    /// A config with the given hostname and state dir and defaults otherwise.
    pub fn new(hostname: impl Into<String>, state_dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig {
            hostname: hostname.into(),
            state_dir: state_dir.into(),
            ..NodeConfig::default()
        }
    }

    /// Checks the settings the bridge would reject, with a clear message.
    ///
    /// # Errors
    ///
    /// [`BridgeError::InvalidConfig`] naming the bad hostname, an empty state
    /// dir, or a control URL that is not `http(s)://host[:port]`.
    pub fn validate(&self) -> Result<(), BridgeError> {
        validate_hostname(&self.hostname)?;
        if self.state_dir.as_os_str().is_empty() {
            return Err(BridgeError::InvalidConfig(
                "the state dir must not be empty".into(),
            ));
        }
        if self.state_dir.to_str().is_none() {
            return Err(BridgeError::InvalidConfig(format!(
                "the state dir {:?} is not valid UTF-8",
                self.state_dir
            )));
        }
        if let Some(url) = &self.control_url {
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
                return Err(BridgeError::InvalidConfig(format!(
                    "invalid control URL {url:?}: want http(s)://host[:port]"
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Debug for NodeConfig {
    // By hand, so the auth key never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeConfig")
            .field("hostname", &self.hostname)
            .field("state_dir", &self.state_dir)
            .field("auth_key", &self.auth_key.as_ref().map(|_| "<redacted>"))
            .field("control_url", &self.control_url)
            .field("ephemeral", &self.ephemeral)
            .field("upload_logs", &self.upload_logs)
            .finish()
    }
}

fn validate_hostname(h: &str) -> Result<(), BridgeError> {
    let bad = |why: &str| {
        Err(BridgeError::InvalidConfig(format!(
            "invalid hostname {h:?}: {why}"
        )))
    };
    if h.is_empty() {
        return bad("it is empty");
    }
    if h.len() > 63 {
        return bad("it is longer than 63 bytes");
    }
    if !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return bad("use only letters, digits and '-'");
    }
    if h.starts_with('-') || h.ends_with('-') {
        return bad("it must not start or end with '-'");
    }
    Ok(())
}

/// A node's view of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// tsnet's backend state: `NoState`, `NeedsLogin`, `NeedsMachineAuth`,
    /// `Stopped`, `Starting` or `Running`.
    pub backend_state: String,
    /// The login URL while the node waits for interactive login.
    pub auth_url: Option<String>,
    /// The node's MagicDNS name without the trailing dot (empty until up).
    pub dns_name: String,
    /// The node's tailnet addresses (empty until up).
    pub ips: Vec<IpAddr>,
    /// The login of the user owning the node (empty until up, or tagged).
    pub user_login: String,
    /// The hostname the node was configured with.
    pub hostname: String,
    /// tsnet's health warnings, if any.
    pub health: Vec<String>,
}

impl Status {
    fn from_json(op: &'static str, json: &[u8]) -> Result<Status, BridgeError> {
        #[derive(Deserialize)]
        struct Raw {
            backend_state: String,
            #[serde(default)]
            auth_url: String,
            #[serde(default)]
            dns_name: String,
            #[serde(default)]
            ips: Vec<IpAddr>,
            #[serde(default)]
            user_login: String,
            #[serde(default)]
            hostname: String,
            #[serde(default)]
            health: Option<Vec<String>>,
        }
        let raw: Raw =
            serde_json::from_slice(json).map_err(|source| BridgeError::Json { op, source })?;
        Ok(Status {
            backend_state: raw.backend_state,
            auth_url: Some(raw.auth_url).filter(|u| !u.is_empty()),
            dns_name: raw.dns_name,
            ips: raw.ips,
            user_login: raw.user_login,
            hostname: raw.hostname,
            health: raw.health.unwrap_or_default(),
        })
    }
}

/// tsnet's loopback proxy: a SOCKS5 server on 127.0.0.1 into the tailnet.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LoopbackProxy {
    /// Where the proxy listens (`127.0.0.1:PORT`).
    pub addr: SocketAddr,
    /// The SOCKS5 user name (`tsnet`).
    pub socks5_user: String,
    /// The SOCKS5 password.
    pub socks5_password: String,
}

/// A tsnet node running in this process. Several can run side by side.
///
/// `Send + Sync`; share it in an `Arc`. Dropping it closes the node in the
/// background (best effort); [`Node::close`] closes it and waits, which an
/// ephemeral node needs to leave the tailnet cleanly.
pub struct Node {
    handle: i64,
    hostname: String,
    closed: AtomicBool,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("hostname", &self.hostname)
            .field("handle", &self.handle)
            .finish()
    }
}

/// Runs a blocking bridge call on tokio's blocking pool, giving up (as a
/// timeout of `op`) if it outlives `limit`.
async fn blocking<T: Send + 'static>(
    op: &'static str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BridgeError> {
    let task = tokio::task::spawn_blocking(f);
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(join)) => Err(BridgeError::Io(std::io::Error::other(format!(
            "{op}: bridge call failed: {join}"
        )))),
        Err(_) => Err(BridgeError::Timeout {
            op,
            detail: format!("the bridge did not answer within {limit:?}"),
        }),
    }
}

/// `timeout` plus [`GRACE`], saturating: a caller may pass a timeout as
/// large as `Duration::MAX` to mean "no limit".
fn with_grace(timeout: Duration) -> Duration {
    timeout.saturating_add(GRACE)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl Node {
    /// Validates `cfg` and creates the node, without starting it.
    ///
    /// # Errors
    ///
    /// [`BridgeError::InvalidConfig`] naming the bad setting (see
    /// [`NodeConfig::validate`]).
    pub fn new(cfg: NodeConfig) -> Result<Node, BridgeError> {
        cfg.validate()?;
        logs::ensure_forwarding();
        let json = serde_json::json!({
            "hostname": cfg.hostname,
            "state_dir": cfg.state_dir.to_str(),
            "auth_key": cfg.auth_key,
            "control_url": cfg.control_url,
            "ephemeral": cfg.ephemeral,
            "upload_logs": cfg.upload_logs,
            "backend_logs": logs::backend_logs_enabled(),
        });
        let handle = ffi::node_new(&json.to_string()).map_err(|e| e.into_bridge("create node"))?;
        Ok(Node {
            handle,
            hostname: cfg.hostname,
            closed: AtomicBool::new(false),
        })
    }

    /// The hostname the node was created with.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    fn live_handle(&self, op: &'static str) -> Result<i64, BridgeError> {
        if self.closed.load(Ordering::Acquire) {
            Err(BridgeError::Closed { op })
        } else {
            Ok(self.handle)
        }
    }

    /// Starts the node if needed and waits until it is running on the
    /// tailnet, then returns its status.
    ///
    /// # Errors
    ///
    /// - [`BridgeError::NeedsLogin`] as soon as the control server asks for
    ///   interactive login and has handed out a URL. Each URL is reported
    ///   once: the node stays started, and a later `up` keeps waiting for the
    ///   login to complete (or reports a new URL, should one replace it).
    /// - [`BridgeError::Timeout`] after `timeout`, naming the backend state
    ///   and the control server (an unreachable control server ends here).
    /// - [`BridgeError::Bridge`] when the control server refuses the node
    ///   (for example, an invalid auth key).
    pub async fn up(&self, timeout: Duration) -> Result<Status, BridgeError> {
        let h = self.live_handle("up")?;
        let ms = millis(timeout);
        let res = blocking("up", with_grace(timeout), move || ffi::node_up(h, ms)).await?;
        match res {
            Ok(()) => self.status().await,
            Err(CallError {
                code: ffi::TSNB_ENEEDSLOGIN,
                msg,
            }) => {
                let url = match self.status().await {
                    Ok(Status {
                        auth_url: Some(url),
                        ..
                    }) => url,
                    _ => msg,
                };
                Err(BridgeError::NeedsLogin { url })
            }
            Err(e) => Err(e.into_bridge("up")),
        }
    }

    /// The node's current status. Does not start the node (an unstarted node
    /// reports `NoState`).
    ///
    /// # Errors
    ///
    /// [`BridgeError::Closed`] after close; bridge errors otherwise.
    pub async fn status(&self) -> Result<Status, BridgeError> {
        let h = self.live_handle("status")?;
        let json = blocking("status", with_grace(Duration::from_secs(10)), move || {
            ffi::node_status(h)
        })
        .await?
        .map_err(|e| e.into_bridge("status"))?;
        Status::from_json("status", &json)
    }

    /// The node's tailnet addresses; empty until the node is up. Does not
    /// block on the network.
    ///
    /// # Errors
    ///
    /// [`BridgeError::Closed`] after close.
    pub fn ips(&self) -> Result<Vec<IpAddr>, BridgeError> {
        let h = self.live_handle("ips")?;
        let json = ffi::node_ips(h).map_err(|e| e.into_bridge("ips"))?;
        serde_json::from_slice(&json).map_err(|source| BridgeError::Json { op: "ips", source })
    }

    /// The node's full view of the tailnet as JSON: tsnet's
    /// `ipnstate.Status` with every peer (host names, MagicDNS names,
    /// addresses, tags, online), the same document tailscaled's LocalAPI
    /// serves at `/localapi/v0/status`, so one parser reads both. Left as
    /// JSON: the bridge does not model peers.
    ///
    /// # Errors
    ///
    /// [`BridgeError::InvalidConfig`] when the node is not up;
    /// [`BridgeError::Closed`] after close; bridge errors otherwise.
    pub async fn peers_json(&self) -> Result<Vec<u8>, BridgeError> {
        let h = self.live_handle("peers")?;
        blocking("peers", Duration::from_secs(10) + GRACE, move || {
            ffi::node_peers(h)
        })
        .await?
        .map_err(|e| e.into_bridge("peers"))
    }

    /// Listens on the node's tailnet addresses, TCP `port` (0 picks a free
    /// one; see [`Listener::port`]). Starts the node if needed.
    ///
    /// # Errors
    ///
    /// When the port is taken on this node, or the node cannot start.
    pub async fn listen(&self, port: u16) -> Result<Listener, BridgeError> {
        let h = self.live_handle("listen")?;
        let (lh, fd, port) = blocking("listen", with_grace(Duration::from_secs(60)), move || {
            ffi::node_listen(h, port)
        })
        .await?
        .map_err(|e| e.into_bridge("listen"))?;
        match Listener::new(lh, fd, port) {
            Ok(l) => Ok(l),
            Err(err) => {
                let _ = ffi::listener_close(lh);
                Err(err.into())
            }
        }
    }

    /// Connects to `addr` (`host:port` with a MagicDNS or short host name, or
    /// `ip:port`) through the tailnet, waiting up to
    /// [`DEFAULT_DIAL_TIMEOUT`]. Waits for the node to be running first.
    ///
    /// # Errors
    ///
    /// As [`Node::dial_timeout`].
    pub async fn dial(&self, addr: &str) -> Result<Stream, BridgeError> {
        self.dial_timeout(addr, DEFAULT_DIAL_TIMEOUT).await
    }

    /// [`Node::dial`] with an explicit timeout.
    ///
    /// # Errors
    ///
    /// [`BridgeError::Timeout`] when the connection is not established in
    /// time; [`BridgeError::Bridge`] when it is refused or the name does not
    /// resolve.
    pub async fn dial_timeout(&self, addr: &str, timeout: Duration) -> Result<Stream, BridgeError> {
        let h = self.live_handle("dial")?;
        let target = addr.to_string();
        let ms = millis(timeout);
        let fd = blocking("dial", with_grace(timeout), move || {
            ffi::node_dial(h, &target, ms)
        })
        .await?
        .map_err(|e| e.into_bridge("dial"))?;
        Ok(Stream::from_fd(fd)?)
    }

    /// Who is behind a tailnet address, as this node's netmap says: node,
    /// user, tags, and the app capabilities granted to the peer toward this
    /// node.
    ///
    /// # Errors
    ///
    /// [`BridgeError::PeerNotFound`] when no peer has that address;
    /// [`BridgeError::Timeout`] or other bridge errors otherwise. Callers
    /// authorizing requests must treat any error as "refuse".
    pub async fn whois(&self, peer: SocketAddr) -> Result<WhoIs, BridgeError> {
        let h = self.live_handle("whois")?;
        let addr = peer.to_string();
        let ms = millis(WHOIS_TIMEOUT);
        let json = blocking("whois", with_grace(WHOIS_TIMEOUT), move || {
            ffi::node_whois(h, &addr, ms)
        })
        .await?
        .map_err(|e| match e.code {
            ffi::TSNB_ENOENT => BridgeError::PeerNotFound {
                addr: peer.to_string(),
            },
            _ => e.into_bridge("whois"),
        })?;
        WhoIs::from_json(&json).map_err(|source| BridgeError::Json {
            op: "whois",
            source,
        })
    }

    /// Starts (once) tsnet's loopback SOCKS5 proxy into the tailnet.
    ///
    /// # Errors
    ///
    /// When the node cannot start or the proxy cannot listen.
    pub async fn loopback(&self) -> Result<LoopbackProxy, BridgeError> {
        let h = self.live_handle("loopback")?;
        let json = blocking("loopback", with_grace(Duration::from_secs(60)), move || {
            ffi::node_loopback(h)
        })
        .await?
        .map_err(|e| e.into_bridge("loopback"))?;
        serde_json::from_slice(&json).map_err(|source| BridgeError::Json {
            op: "loopback",
            source,
        })
    }

    /// Closes the node and waits: its listeners and connections close, and
    /// an ephemeral node logs out of the tailnet.
    ///
    /// # Errors
    ///
    /// When tsnet reports a failure while stopping.
    pub async fn close(self) -> Result<(), BridgeError> {
        self.shutdown().await
    }

    /// [`Node::close`] for a shared node (in an `Arc`): closes it and waits;
    /// later calls on the node fail with [`BridgeError::Closed`]. Idempotent.
    ///
    /// # Errors
    ///
    /// As [`Node::close`].
    pub async fn shutdown(&self) -> Result<(), BridgeError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let h = self.handle;
        blocking("close", Duration::from_secs(90), move || ffi::node_close(h))
            .await?
            .map_err(|e| e.into_bridge("close"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let h = self.handle;
        let hostname = self.hostname.clone();
        // Closing can take seconds; never on the caller's (maybe async) thread.
        let spawned = std::thread::Builder::new()
            .name("tsnet-close".into())
            .spawn(move || {
                if let Err(e) = ffi::node_close(h) {
                    tracing::debug!(target: "tsnet", node = %hostname, err = %e.msg, "closing dropped node");
                }
            });
        if spawned.is_err() {
            let _ = ffi::node_close(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_shareable_across_tasks() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Node>();
        send_sync::<Listener>();
        send::<Stream>();
    }

    #[test]
    fn hostnames_are_validated_with_the_name_in_the_error() {
        for bad in ["", "-x", "x-", "has space", "dot.ted", "ü", &"a".repeat(64)] {
            let err = Node::new(NodeConfig::new(bad, "/tmp/unused")).unwrap_err();
            match err {
                BridgeError::InvalidConfig(msg) => {
                    assert!(msg.contains(&format!("{bad:?}")), "{msg}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        for good in ["a", "tailkitd-host1", "A1", &"a".repeat(63)] {
            NodeConfig::new(good, "/tmp/unused").validate().unwrap();
        }
    }

    #[test]
    fn control_urls_and_state_dirs_are_validated() {
        let mut cfg = NodeConfig::new("n", "/tmp/unused");
        for bad in ["127.0.0.1:80", "ftp://x", "http://", "https:///path"] {
            cfg.control_url = Some(bad.into());
            assert!(
                matches!(cfg.validate(), Err(BridgeError::InvalidConfig(_))),
                "{bad}"
            );
        }
        cfg.control_url = Some("http://127.0.0.1:1".into());
        cfg.validate().unwrap();
        cfg.state_dir = PathBuf::new();
        assert!(matches!(cfg.validate(), Err(BridgeError::InvalidConfig(_))));
    }

    #[test]
    fn huge_timeouts_saturate_instead_of_overflowing() {
        assert_eq!(with_grace(Duration::MAX), Duration::MAX);
        assert_eq!(with_grace(Duration::MAX - GRACE / 2), Duration::MAX);
        assert_eq!(
            with_grace(Duration::from_secs(1)),
            Duration::from_secs(1) + GRACE
        );
        assert_eq!(millis(Duration::MAX), i64::MAX);
    }

    #[test]
    fn debug_output_redacts_the_auth_key() {
        let mut cfg = NodeConfig::new("n", "/tmp/x");
        cfg.auth_key = Some("tskey-secret".into());
        let s = format!("{cfg:?}");
        assert!(!s.contains("tskey-secret"), "{s}");
        assert!(s.contains("redacted"));
    }

    #[test]
    fn status_json_maps_empty_auth_url_to_none() {
        let st = Status::from_json(
            "t",
            br#"{"backend_state":"Running","auth_url":"","dns_name":"a.b","ips":["100.64.0.1"],"user_login":"u","hostname":"a","health":null}"#,
        )
        .unwrap();
        assert_eq!(st.auth_url, None);
        assert_eq!(st.ips, vec!["100.64.0.1".parse::<IpAddr>().unwrap()]);
        assert!(st.health.is_empty());
    }

    // The public calls take any Duration: `Duration::MAX` (no limit) must
    // not overflow. A state dir that is a file makes tsnet fail at once.
    #[tokio::test]
    async fn up_and_dial_accept_duration_max() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let node = Node::new(NodeConfig::new("huge-timeouts", file.path())).unwrap();
        let err = node.up(Duration::MAX).await.unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        let err = node
            .dial_timeout("peer:80", Duration::MAX)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        node.close().await.unwrap();
    }

    #[tokio::test]
    async fn an_unstarted_node_reports_nostate_and_no_ips() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::new(NodeConfig::new("unstarted", dir.path())).unwrap();
        assert_eq!(node.status().await.unwrap().backend_state, "NoState");
        assert!(node.ips().unwrap().is_empty());
        node.close().await.unwrap();
    }
}
