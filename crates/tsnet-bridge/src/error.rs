//! The error type of everything that goes through the Go bridge.

use std::io;

/// An error from the tailnet node, the bridge, or the local tailnet.
#[derive(thiserror::Error, Debug)]
pub enum BridgeError {
    /// The node needs interactive login: a person must visit `url` (or the
    /// node must be given an auth key). The node stays started; calling
    /// [`Node::up`](super::Node::up) again keeps waiting.
    #[error("the node needs to be logged in: visit {url}")]
    NeedsLogin {
        /// The login URL the control server handed out.
        url: String,
    },
    /// The operation did not finish in time; `detail` says what was awaited
    /// (for `up`, the backend state and the control server).
    #[error("{op} timed out: {detail}")]
    Timeout {
        /// The operation (`up`, `dial`, `whois`, ...).
        op: &'static str,
        /// What was awaited, and where.
        detail: String,
    },
    /// A setting or argument was rejected (hostname, control URL, grant...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// WhoIs found no tailnet peer with that address.
    #[error("no tailnet peer has address {addr}")]
    PeerNotFound {
        /// The address that was looked up.
        addr: String,
    },
    /// The node (or listener, or local tailnet) was already closed.
    #[error("{op}: the node is closed")]
    Closed {
        /// The operation that was attempted.
        op: &'static str,
    },
    /// Any other failure reported by the bridge, with its TSNB_E* code.
    #[error("{op} failed: {msg}")]
    Bridge {
        /// The operation.
        op: &'static str,
        /// The bridge's return code (a negated errno where one fits).
        code: i32,
        /// The bridge's message.
        msg: String,
    },
    /// The bridge returned JSON that does not have the expected shape.
    #[error("{op}: unexpected answer from the bridge: {source}")]
    Json {
        /// The operation.
        op: &'static str,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// An I/O error on the Rust side (sockets, threads).
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl BridgeError {
    /// Whether this is a timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, BridgeError::Timeout { .. })
    }
}
