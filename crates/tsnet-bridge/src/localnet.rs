//! The embedded local tailnet (feature `localnet`): tailscale.com's test
//! control server with a DERP and a STUN server, all on free 127.0.0.1 ports,
//! for tests, `tailkitd demo` and `tailkitd localnet`.
//!
//! Nodes join with [`Localnet::node_config`]; each node gets its own user,
//! with login `<hostname>@localnet`. MagicDNS is on (`<host>.localnet.ts.net`,
//! and short names resolve). [`Localnet::grant`] grants an app capability to
//! the peers with given IPs toward every node: nodes of this process or of
//! any other pointed at [`Localnet::control_url`], present or joining later.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Deserialize;

use super::error::BridgeError;
use super::ffi;
use super::logs;
use super::node::NodeConfig;

/// The domain of the user logins the local tailnet hands out.
pub const LOGIN_DOMAIN: &str = "localnet";
/// The local tailnet's MagicDNS suffix.
pub const MAGIC_DNS_SUFFIX: &str = "localnet.ts.net";

/// How the local tailnet admits nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalnetOptions {
    /// Nodes must log in interactively: `up` returns
    /// [`BridgeError::NeedsLogin`] with a URL, and
    /// [`Localnet::approve_login`] completes the login. Otherwise nodes join
    /// with [`Localnet::auth_key`].
    pub interactive_login: bool,
}

/// A running local tailnet. Dropping it stops it (in the background);
/// [`Localnet::close`] stops it and waits.
#[derive(Debug)]
pub struct Localnet {
    handle: i64,
    control_url: String,
    auth_key: Option<String>,
    closed: AtomicBool,
}

async fn blocking<T: Send + 'static>(
    op: &'static str,
    f: impl FnOnce() -> Result<T, ffi::CallError> + Send + 'static,
) -> Result<T, BridgeError> {
    match tokio::time::timeout(Duration::from_secs(60), tokio::task::spawn_blocking(f)).await {
        Ok(Ok(res)) => res.map_err(|e| e.into_bridge(op)),
        Ok(Err(join)) => Err(BridgeError::Io(std::io::Error::other(format!(
            "{op}: bridge call failed: {join}"
        )))),
        Err(_) => Err(BridgeError::Timeout {
            op,
            detail: "the bridge did not answer within 60s".into(),
        }),
    }
}

impl Localnet {
    /// Starts a local tailnet whose nodes join with an auth key.
    ///
    /// # Errors
    ///
    /// When a server cannot listen on loopback.
    pub async fn start() -> Result<Localnet, BridgeError> {
        Localnet::start_with(LocalnetOptions::default()).await
    }

    /// Starts a local tailnet with `opts`.
    ///
    /// # Errors
    ///
    /// When a server cannot listen on loopback.
    pub async fn start_with(opts: LocalnetOptions) -> Result<Localnet, BridgeError> {
        logs::ensure_forwarding();
        let json = serde_json::json!({ "interactive_login": opts.interactive_login }).to_string();
        let handle = blocking("start local tailnet", move || ffi::localnet_start(&json)).await?;
        let info = blocking("local tailnet info", move || ffi::localnet_info(handle)).await;
        let info = info.and_then(|json| {
            #[derive(Deserialize)]
            struct Info {
                control_url: String,
                auth_key: Option<String>,
            }
            serde_json::from_slice::<Info>(&json).map_err(|source| BridgeError::Json {
                op: "local tailnet info",
                source,
            })
        });
        match info {
            Ok(info) => Ok(Localnet {
                handle,
                control_url: info.control_url,
                auth_key: info.auth_key,
                closed: AtomicBool::new(false),
            }),
            Err(e) => {
                let _ = ffi::localnet_close(handle);
                Err(e)
            }
        }
    }

    /// The control server's URL (`http://127.0.0.1:PORT`).
    pub fn control_url(&self) -> &str {
        &self.control_url
    }

    /// The auth key nodes join with (`None` with interactive login).
    pub fn auth_key(&self) -> Option<&str> {
        self.auth_key.as_deref()
    }

    /// The user login a node with this hostname gets here.
    pub fn user_login(hostname: &str) -> String {
        format!("{hostname}@{LOGIN_DOMAIN}")
    }

    /// A config that joins this local tailnet (auth key, control URL, not
    /// ephemeral, no log upload) with its state in `state_dir`. Each node
    /// gets its own user, `<hostname>@localnet`.
    pub fn node_config(&self, hostname: &str, state_dir: &Path) -> NodeConfig {
        NodeConfig {
            hostname: hostname.to_string(),
            state_dir: state_dir.to_path_buf(),
            auth_key: self.auth_key.clone(),
            control_url: Some(self.control_url.clone()),
            ephemeral: false,
            upload_logs: false,
        }
    }

    /// Grants app capability `cap` (with the value `{}`) to the peers with
    /// these IPs, toward every node. Takes effect within moments on every
    /// node's netmap, including nodes that join later.
    ///
    /// # Errors
    ///
    /// [`BridgeError::InvalidConfig`] for an empty capability or no IPs.
    pub async fn grant(&self, src_ips: &[IpAddr], cap: &str) -> Result<(), BridgeError> {
        self.grant_with_values(src_ips, cap, &[serde_json::json!({})])
            .await
    }

    /// [`Localnet::grant`] with explicit capability values (what a policy's
    /// `"app": {cap: [values...]}` would attach).
    ///
    /// # Errors
    ///
    /// As [`Localnet::grant`].
    pub async fn grant_with_values(
        &self,
        src_ips: &[IpAddr],
        cap: &str,
        values: &[serde_json::Value],
    ) -> Result<(), BridgeError> {
        let h = self.live_handle("grant")?;
        let json = serde_json::json!({
            "src_ips": src_ips.iter().map(IpAddr::to_string).collect::<Vec<_>>(),
            "cap": cap,
            "values": values,
        })
        .to_string();
        blocking("grant", move || ffi::localnet_grant(h, &json)).await
    }

    /// Completes an interactive login (the URL from
    /// [`BridgeError::NeedsLogin`]), as if its user had visited it.
    ///
    /// # Errors
    ///
    /// [`BridgeError::InvalidConfig`] when the URL is not a pending login.
    pub async fn approve_login(&self, url: &str) -> Result<(), BridgeError> {
        let h = self.live_handle("approve login")?;
        let url = url.to_string();
        blocking("approve login", move || ffi::localnet_approve(h, &url)).await
    }

    /// Stops the control, DERP and STUN servers and waits.
    ///
    /// # Errors
    ///
    /// Bridge errors.
    pub async fn close(self) -> Result<(), BridgeError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let h = self.handle;
        blocking("close local tailnet", move || ffi::localnet_close(h)).await
    }

    fn live_handle(&self, op: &'static str) -> Result<i64, BridgeError> {
        if self.closed.load(Ordering::Acquire) {
            Err(BridgeError::Closed { op })
        } else {
            Ok(self.handle)
        }
    }
}

impl Drop for Localnet {
    fn drop(&mut self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let h = self.handle;
        let spawned = std::thread::Builder::new()
            .name("localnet-close".into())
            .spawn(move || ffi::localnet_close(h));
        if spawned.is_err() {
            let _ = ffi::localnet_close(h);
        }
    }
}
