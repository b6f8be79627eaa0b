//! How the client gets onto the tailnet, in this order: with an auth key,
//! as an ephemeral tsnet node of its own (logged out when it closes);
//! without one, through the machine's tailscaled (its LocalAPI: peer list
//! and dial); with neither, an error that says how to give one.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tsnet_bridge::{BridgeError, Node, NodeConfig};

use super::cli::TailnetArgs;
use crate::localapi::{DialStream, LocalApi, LocalApiError, Status};

/// How long the client's own node may take to join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the tailnet cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ReachError {
    /// No auth key and no tailscaled.
    #[error(
        "no way onto the tailnet: no auth key, and {0}.\n\
         Give an auth key (TS_AUTHKEY=tskey-..., TS_AUTHKEY_FILE=PATH or --auth-key-file PATH; \
         --control-url for a control server other than Tailscale's) to join as an ephemeral \
         node of its own, or run tailscaled (--socket or TS_SOCKET names its socket)"
    )]
    Nowhere(LocalApiError),
    /// The auth key file cannot be used.
    #[error("auth key file {}: {why}", path.display())]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The client's own node did not join.
    #[error("joining the tailnet as {hostname}: {source}")]
    Join {
        /// The node's host name.
        hostname: String,
        /// The bridge's error.
        #[source]
        source: BridgeError,
    },
    /// The node's peer list could not be read.
    #[error("reading the peer list: {0}")]
    Peers(String),
    /// tailscaled answered, but is not connected to a tailnet.
    #[error(
        "tailscaled at {} is not connected (state {state}): run `tailscale up`, or give an auth key",
        socket.display()
    )]
    NotConnected {
        /// Its socket.
        socket: PathBuf,
        /// Its backend state.
        state: String,
    },
    /// Talking to tailscaled failed.
    #[error(transparent)]
    Tailscaled(#[from] LocalApiError),
}

/// The client's way onto the tailnet.
#[derive(Debug)]
pub enum Tailnet {
    /// Its own ephemeral tsnet node.
    Own {
        /// The node.
        node: Node,
        /// Its state directory, when temporary (removed on drop).
        temp: Option<tempfile::TempDir>,
    },
    /// The machine's tailscaled.
    Tailscaled(LocalApi),
}

impl Tailnet {
    /// Joins the tailnet as [`TailnetArgs`] and `env` say.
    ///
    /// # Errors
    ///
    /// [`ReachError`]: a bad key file, a node that does not join, no
    /// tailscaled (when there is no key), a tailscaled that is not up.
    pub async fn open(
        args: &TailnetArgs,
        env: impl Fn(&str) -> Option<String>,
        os_hostname: &str,
    ) -> Result<Tailnet, ReachError> {
        match auth_key(args, &env)? {
            Some(key) => join(args, key, os_hostname).await,
            None => {
                let api = match &args.socket {
                    Some(path) => LocalApi::new(path),
                    None => LocalApi::with_default_socket(),
                };
                let status = match api.status().await {
                    Ok(st) => st,
                    Err(e @ LocalApiError::NotRunning { .. }) => {
                        return Err(ReachError::Nowhere(e));
                    }
                    Err(e) => return Err(e.into()),
                };
                if !status.is_running() {
                    return Err(ReachError::NotConnected {
                        socket: api.socket().to_path_buf(),
                        state: status.backend_state,
                    });
                }
                Ok(Tailnet::Tailscaled(api))
            }
        }
    }

    /// Who the client is on the tailnet, for messages.
    pub fn describe(&self) -> String {
        match self {
            Tailnet::Own { node, .. } => format!("ephemeral node {}", node.hostname()),
            Tailnet::Tailscaled(api) => format!("tailscaled at {}", api.socket().display()),
        }
    }

    /// The tailnet as this node sees it: itself and every peer.
    ///
    /// # Errors
    ///
    /// When the node or tailscaled does not answer.
    pub async fn status(&self) -> Result<Status, ReachError> {
        match self {
            Tailnet::Own { node, .. } => {
                let json = node
                    .peers_json()
                    .await
                    .map_err(|e| ReachError::Peers(e.to_string()))?;
                Status::from_json(&json).map_err(|e| ReachError::Peers(e.to_string()))
            }
            Tailnet::Tailscaled(api) => Ok(api.status().await?),
        }
    }

    /// A connection to `addr` on the tailnet, within `timeout`.
    ///
    /// # Errors
    ///
    /// The bridge's or tailscaled's reason, as text.
    pub async fn dial(&self, addr: SocketAddr, timeout: Duration) -> Result<Conn, String> {
        match self {
            Tailnet::Own { node, .. } => node
                .dial_timeout(&addr.to_string(), timeout)
                .await
                .map(Conn::Own)
                .map_err(|e| e.to_string()),
            Tailnet::Tailscaled(api) => api
                .clone()
                .with_timeout(timeout)
                .dial(&addr.ip().to_string(), addr.port())
                .await
                .map(Conn::Tailscaled)
                .map_err(|e| e.to_string()),
        }
    }

    /// Leaves the tailnet: the own node closes and, being ephemeral, logs
    /// out (the control server removes it at once); its temporary state
    /// goes.
    pub async fn close(self) {
        if let Tailnet::Own { node, temp } = self {
            if let Err(e) = node.close().await {
                tracing::warn!(error = %e, "closing the client's node");
            }
            drop(temp);
        }
    }
}

/// The key from `--auth-key-file`, else `TS_AUTHKEY`, else the file
/// `TS_AUTHKEY_FILE` names (the daemon's order).
fn auth_key(
    args: &TailnetArgs,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, ReachError> {
    if let Some(path) = &args.auth_key_file {
        return read_key(path).map(Some);
    }
    if let Some(key) = env("TS_AUTHKEY").filter(|k| !k.trim().is_empty()) {
        return Ok(Some(key.trim().to_string()));
    }
    match env("TS_AUTHKEY_FILE").filter(|p| !p.is_empty()) {
        Some(path) => read_key(Path::new(&path)).map(Some),
        None => Ok(None),
    }
}

fn read_key(path: &Path) -> Result<String, ReachError> {
    let bad = |why: String| ReachError::KeyFile {
        path: path.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(bad("it is empty".into()));
    }
    Ok(key.to_string())
}

/// The client node's default name: `tkcall-<os hostname>`, one DNS label.
/// Not `tailkitd-...`: `--all` (and the Go SDK) would take it for a daemon.
pub fn default_hostname(os_hostname: &str) -> String {
    crate::config::host_label("tkcall-", os_hostname)
}

async fn join(args: &TailnetArgs, key: String, os_hostname: &str) -> Result<Tailnet, ReachError> {
    let hostname = args
        .hostname
        .clone()
        .unwrap_or_else(|| default_hostname(os_hostname));
    let join_error = |source| ReachError::Join {
        hostname: hostname.clone(),
        source,
    };
    let (state_dir, temp) = match &args.state_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("tailkitd-call-")
                .tempdir()
                .map_err(|e| join_error(BridgeError::Io(e)))?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    let node = Node::new(NodeConfig {
        hostname: hostname.clone(),
        state_dir,
        auth_key: Some(key),
        control_url: args.control_url.clone().filter(|u| !u.is_empty()),
        ephemeral: true,
        upload_logs: false,
    })
    .map_err(join_error)?;
    match node.up(JOIN_TIMEOUT).await {
        Ok(_) => Ok(Tailnet::Own { node, temp }),
        Err(e) => {
            let e = match e {
                BridgeError::NeedsLogin { url } => BridgeError::InvalidConfig(format!(
                    "the control server did not take the auth key and asks for a login at {url}"
                )),
                e => e,
            };
            let _ = node.close().await;
            Err(join_error(e))
        }
    }
}

/// A connection to a peer, through the own node or through tailscaled.
#[derive(Debug)]
pub enum Conn {
    /// Relayed by the bridge.
    Own(tsnet_bridge::Stream),
    /// Relayed by tailscaled.
    Tailscaled(DialStream),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Own(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tailscaled(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Own(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tailscaled(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Own(s) => Pin::new(s).poll_flush(cx),
            Conn::Tailscaled(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Own(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tailscaled(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, String)]) -> impl Fn(&str) -> Option<String> + use<> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn the_key_comes_from_the_flag_then_ts_authkey_then_ts_authkey_file() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("flag");
        let file = dir.path().join("file");
        std::fs::write(&flag, "tskey-flag\n").unwrap();
        std::fs::write(&file, " tskey-file ").unwrap();
        let file_s = file.display().to_string();
        let with_flag = TailnetArgs {
            auth_key_file: Some(flag),
            ..TailnetArgs::default()
        };
        let none = TailnetArgs::default();
        let all = env_of(&[
            ("TS_AUTHKEY", "tskey-env".into()),
            ("TS_AUTHKEY_FILE", file_s.clone()),
        ]);
        assert_eq!(
            auth_key(&with_flag, &all).unwrap().as_deref(),
            Some("tskey-flag")
        );
        assert_eq!(auth_key(&none, &all).unwrap().as_deref(), Some("tskey-env"));
        let file_only = env_of(&[("TS_AUTHKEY", " ".into()), ("TS_AUTHKEY_FILE", file_s)]);
        assert_eq!(
            auth_key(&none, &file_only).unwrap().as_deref(),
            Some("tskey-file")
        );
        assert_eq!(auth_key(&none, &env_of(&[])).unwrap(), None);
    }

    #[test]
    fn a_bad_key_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        for (path, want) in [
            (empty, "it is empty"),
            (dir.path().join("missing"), "No such file"),
        ] {
            let args = TailnetArgs {
                auth_key_file: Some(path.clone()),
                ..TailnetArgs::default()
            };
            let err = auth_key(&args, &env_of(&[])).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("auth key file {}: ", path.display())),
                "{err}"
            );
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn the_default_name_is_a_label_that_is_not_a_daemons() {
        assert_eq!(default_hostname("Laptop.local"), "tkcall-laptop-local");
        assert_eq!(default_hostname(""), "tkcall");
        assert_eq!(default_hostname(&"x".repeat(100)).len(), 63);
        assert!(!default_hostname("tailkitd-x").starts_with(super::super::cli::ALL_PREFIX));
    }

    #[tokio::test]
    async fn without_key_or_tailscaled_the_error_says_how_to_give_one() {
        let dir = tempfile::tempdir().unwrap();
        let args = TailnetArgs {
            socket: Some(dir.path().join("tailscaled.sock")),
            ..TailnetArgs::default()
        };
        let err = Tailnet::open(&args, env_of(&[]), "h").await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ReachError::Nowhere(_)), "{msg}");
        for want in ["TS_AUTHKEY", "--auth-key-file", "tailscaled", "--socket"] {
            assert!(msg.contains(want), "{want} missing in {msg}");
        }
    }
}
