//! `tailkitd run`: the daemon. Opens the audit log, loads and watches the
//! tools, joins the tailnet (printing the login URL when one is needed),
//! serves the exec API on the tailnet listener only, and shuts down in
//! order on SIGTERM/SIGINT: refuse new jobs, let running ones finish within
//! the grace period, cancel the rest and audit them, stop serving, leave
//! the tailnet. SIGHUP reopens the audit log and rescans the tools.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::api::{Api, ApiSettings};
use crate::audit::AuditLog;
use crate::config::Settings;
use crate::exec::registry::RegistryError;
use crate::exec::{ExecSettings, Executor, Registry};
use crate::server::{self, WhoIs};
use crate::tailnet::{self, BridgeError, Node, NodeConfig, Status};

/// How long one `up` attempt waits before the daemon logs that it is still
/// waiting (it keeps waiting).
const UP_ATTEMPT: Duration = Duration::from_secs(30);

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory could not be created.
    #[error("state dir {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The audit log could not be opened.
    #[error("audit log {path}: {source}")]
    Audit {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The tools directory could not be watched.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The tailnet node failed.
    #[error("tailnet: {0}")]
    Tailnet(#[from] BridgeError),
    /// The per-job supervisor executable is missing or not executable.
    #[error(
        "the job launcher {path} cannot be run ({source}): tailkitd-launch is built with tailkitd and must be installed next to it"
    )]
    Launcher {
        /// Where it was looked for.
        path: PathBuf,
        /// Why it cannot run.
        source: nix::Error,
    },
    /// Signal handlers could not be installed.
    #[error("signals: {0}")]
    Signals(std::io::Error),
}

/// Which signal asked the daemon to do something.
enum Stop {
    Terminate(&'static str),
}

/// Runs the daemon until SIGTERM or SIGINT, then shuts down in order.
///
/// # Errors
///
/// When the state dir, audit log, tools watcher, signal handlers or tailnet
/// node cannot be set up. Errors after the node is up are logged, not
/// returned: a running daemon only stops on a signal.
pub async fn run(settings: Settings) -> Result<(), DaemonError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    // tokio reaps children through pidfds, but falls back to a SIGCHLD
    // handler where pidfd_open is unavailable; install that handler now,
    // so that it too gets SA_ONSTACK below (a handler, once installed,
    // stays for the life of the process).
    let _sigchld = signal(SignalKind::child()).map_err(DaemonError::Signals)?;
    // tokio's handlers lack SA_ONSTACK, which the Go runtime in this
    // process requires of every handler (see tailnet::ensure_signal_onstack).
    tailnet::ensure_signal_onstack(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD])
        .map_err(DaemonError::Signals)?;

    create_state_dir(&settings.state_dir)?;
    let audit =
        Arc::new(
            AuditLog::open(&settings.audit_log).map_err(|source| DaemonError::Audit {
                path: settings.audit_log.clone(),
                source,
            })?,
        );

    let exec_settings = ExecSettings {
        max_jobs: settings.max_jobs,
        ..ExecSettings::default()
    };
    nix::unistd::access(&exec_settings.launcher, nix::unistd::AccessFlags::X_OK).map_err(
        |source| DaemonError::Launcher {
            path: exec_settings.launcher.clone(),
            source,
        },
    )?;
    let registry = Arc::new(Registry::load(
        settings.tools_dir.clone(),
        exec_settings.tool_limits(),
    ));
    let _watch = registry.spawn_watcher()?;
    warn_uncapped(&registry, settings.require_cap);

    let node = Arc::new(Node::new(NodeConfig {
        hostname: settings.hostname.clone(),
        state_dir: settings.state_dir.join("tsnet"),
        auth_key: settings.auth_key.as_ref().map(|k| k.expose().to_string()),
        control_url: settings.control_url.clone(),
        ephemeral: settings.ephemeral,
        upload_logs: settings.upload_logs,
    })?);

    let status = tokio::select! {
        status = join_tailnet(&node, settings.control_url.as_deref()) => status?,
        stop = wait_for_stop(&mut sigterm, &mut sigint) => {
            let Stop::Terminate(name) = stop;
            info!(signal = name, "stopping before the node came up");
            leave(node).await;
            return Ok(());
        }
    };
    let listener = node.listen(settings.port).await?;

    let mut allowed_hosts = vec![settings.hostname.clone(), status.dns_name.clone()];
    allowed_hosts.extend(status.ips.iter().map(|ip| ip.to_string()));
    let api = Api::new(
        registry.clone(),
        Executor::new(exec_settings, audit.clone()),
        ApiSettings {
            require_cap: settings.require_cap,
            ..ApiSettings::new(settings.hostname.clone(), allowed_hosts)
        },
    );

    let (tools, commands) = registry.counts();
    let ips: Vec<String> = status.ips.iter().map(|ip| ip.to_string()).collect();
    println!(
        "tailkitd up: name={} ips={} port={} tools={tools} commands={commands}",
        status.dns_name,
        ips.join(","),
        settings.port,
    );
    let _ = std::io::stdout().flush();
    info!(
        name = %status.dns_name,
        ips = %ips.join(","),
        port = settings.port,
        tools,
        commands,
        audit = %audit.describe(),
        "serving the exec API on the tailnet"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(server::serve(
        listener,
        Arc::new(WhoIs(node.clone())),
        api.router(),
        async move {
            let mut rx = stop_rx;
            let _ = rx.wait_for(|s| *s).await;
        },
    ));

    let signal_name = loop {
        tokio::select! {
            Stop::Terminate(name) = wait_for_stop(&mut sigterm, &mut sigint) => break name,
            Some(()) = sighup.recv() => {
                match audit.reopen() {
                    Ok(()) => info!(audit = %audit.describe(), "SIGHUP: audit log reopened"),
                    Err(e) => error!(audit = %audit.describe(), error = %e,
                        "SIGHUP: could not reopen the audit log; still writing to the old file"),
                }
                registry.reload();
            }
        }
    };

    info!(
        signal = signal_name,
        grace = ?settings.shutdown_grace,
        "shutting down: new jobs are refused, running ones get the grace period"
    );
    api.begin_shutdown();
    api.shutdown(settings.shutdown_grace).await;
    let _ = stop_tx.send(true);
    if let Err(e) = server.await {
        error!(error = %e, "the server task failed");
    }
    leave(node).await;
    info!("stopped");
    Ok(())
}

/// Waits for SIGTERM or SIGINT.
async fn wait_for_stop(
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) -> Stop {
    tokio::select! {
        _ = sigterm.recv() => Stop::Terminate("SIGTERM"),
        _ = sigint.recv() => Stop::Terminate("SIGINT"),
    }
}

/// Brings the node up, announcing a login URL when one is needed and
/// waiting as long as it takes (logging while it waits).
async fn join_tailnet(node: &Node, control_url: Option<&str>) -> Result<Status, DaemonError> {
    let control = control_url.unwrap_or("Tailscale's control server");
    let mut announced: Option<String> = None;
    loop {
        match node.up(UP_ATTEMPT).await {
            Ok(status) => return Ok(status),
            Err(BridgeError::NeedsLogin { url }) => {
                if announced.as_deref() != Some(url.as_str()) {
                    eprintln!(
                        "\nThis node needs to be logged in to the tailnet. Open this URL to log in:\n\n    {url}\n\n(or give it an auth key with TS_AUTHKEY / TS_AUTHKEY_FILE)\n"
                    );
                    warn!(%url, "waiting for interactive login");
                    announced = Some(url);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) if e.is_timeout() => {
                warn!(control, error = %e, "still waiting to join the tailnet");
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Closes the node (an ephemeral node is removed from the tailnet).
async fn leave(node: Arc<Node>) {
    match Arc::try_unwrap(node) {
        Ok(node) => {
            if let Err(e) = node.close().await {
                warn!(error = %e, "closing the tailnet node");
            }
        }
        Err(node) => {
            if let Err(e) = node.shutdown().await {
                warn!(error = %e, "closing the tailnet node");
            }
        }
    }
}

/// Creates the state dir (mode 0700) if it does not exist.
fn create_state_dir(path: &std::path::Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| DaemonError::StateDir {
            path: path.to_path_buf(),
            source,
        })
}

/// Warns once per command that declares no `acl_cap`.
fn warn_uncapped(registry: &Registry, require_cap: bool) {
    for (tool, command) in registry.commands_without_cap() {
        if require_cap {
            warn!(
                tool,
                command, "command has no acl_cap and require_cap is on: it will be refused"
            );
        } else {
            warn!(
                tool,
                command,
                "command has no acl_cap: any peer that can reach this node may run it (set require_cap to refuse)"
            );
        }
    }
}
