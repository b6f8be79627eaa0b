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

use tokio_util::sync::CancellationToken;
use tsnet_bridge::{self as tailnet, BridgeError, Node, NodeConfig, Status};

use crate::api::{Api, ApiSettings};
use crate::audit::AuditLog;
use crate::config::Settings;
use crate::run::{ExecSettings, Executor};
use crate::server::{self, WhoIs};
use crate::tools::{Registry, RegistryError};

/// How long one `up` attempt waits before the daemon looks at the node's
/// health for something new to say (it keeps waiting).
const UP_ATTEMPT: Duration = Duration::from_secs(1);
/// How often the daemon says it is still waiting to join when nothing
/// changed.
const STILL_WAITING: Duration = Duration::from_secs(30);
/// Tailscale's control server, what tsnet uses when none is set.
pub const TAILSCALE_CONTROL_URL: &str = "https://controlplane.tailscale.com";
/// How often the node's names are re-read for the `Host` check.
const NAMES_REFRESH: Duration = Duration::from_secs(30);
/// At shutdown with live streams open, once every connection is done, how
/// long the tailnet stack gets to deliver what they wrote last (their
/// jobs' terminal events) before the node closes: closing it drops what
/// is still in flight, and the client would wait for an end that never
/// comes.
const DELIVERY_LINGER: Duration = Duration::from_millis(500);

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
    /// The tailnet listener went away while serving.
    #[error("the tailnet listener stopped: {0}")]
    Listener(std::io::Error),
}

/// Runs the daemon until SIGTERM or SIGINT, then shuts down in order.
///
/// # Errors
///
/// When the state dir, audit log, tools watcher, signal handlers or tailnet
/// node cannot be set up, or when the tailnet listener dies under a running
/// daemon (jobs are still shut down in order first). Other errors after the
/// node is up are logged, not returned.
pub async fn run(settings: Settings) -> Result<(), DaemonError> {
    let Signals {
        mut sigterm,
        mut sigint,
        mut sighup,
        mut sigchld,
    } = install_signal_handlers().map_err(DaemonError::Signals)?;
    // Commands whose supervisor was killed (by a command of the daemon's
    // own user) become the daemon's children instead of init's: each one
    // is killed and reaped at once, and the next job starts a new
    // supervisor.
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| DaemonError::Signals(std::io::Error::from(e)))?;
    // A command run as the daemon's own user must not read the daemon's
    // memory (the auth key, the node's keys) through ptrace or
    // /proc/PID/{mem,environ}: the kernel refuses both for a process that
    // is not dumpable, and owns its /proc entries by root.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "could not make the daemon non-dumpable");
    }
    tokio::spawn(async move {
        while sigchld.recv().await.is_some() {
            crate::run::supervisor::reap_adopted();
        }
    });

    create_state_dir(&settings.state_dir)?;
    let audit =
        Arc::new(
            AuditLog::open(&settings.audit_log).map_err(|source| DaemonError::Audit {
                path: settings.audit_log.clone(),
                source,
            })?,
        );
    // Jobs a killed daemon left open get their end: exec.abandoned.
    match audit.close_abandoned() {
        Ok(0) => {}
        Ok(closed) => warn!(
            closed,
            "recorded jobs of a previous run that never ended as exec.abandoned"
        ),
        Err(e) => {
            error!(error = %e, "could not check the audit log for jobs a previous run left open")
        }
    }

    let exec_settings = ExecSettings {
        max_jobs: settings.max_jobs,
        command_user: settings.command_user.clone(),
        cgroup: settings.cgroup.clone(),
        // Go raised this process's limit; commands get the original back.
        command_nofile: tailnet::original_nofile_limit(),
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
        status = join_tailnet(&node, &settings) => status?,
        name = wait_for_stop(&mut sigterm, &mut sigint) => {
            info!(signal = name, "stopping before the node came up");
            leave(node).await;
            return Ok(());
        }
    };
    let listener = node.listen(settings.port).await?;

    let api = Api::new(
        registry.clone(),
        Executor::new(exec_settings, audit.clone()),
        audit.clone(),
        ApiSettings {
            require_cap: settings.require_cap,
            stream_heartbeat: settings.stream_heartbeat,
            max_streams_per_peer: settings.max_streams_per_peer,
            ..ApiSettings::new(
                settings.hostname.clone(),
                allowed_hosts(&settings.hostname, &status),
            )
        },
    );

    let (tools, commands) = registry.counts();
    let ips: Vec<String> = status.ips.iter().map(|ip| ip.to_string()).collect();
    let up = format!(
        "tailkitd up: name={} ips={} port={} tools={tools} commands={commands}",
        status.dns_name,
        ips.join(","),
        settings.port,
    );
    // With the audit log on stdout, stdout carries JSON lines only.
    if settings.audit_log.as_os_str() == "-" {
        eprintln!("{up}");
    } else {
        println!("{up}");
        let _ = std::io::stdout().flush();
    }
    info!(
        name = %status.dns_name,
        ips = %ips.join(","),
        port = settings.port,
        tools,
        commands,
        audit = %audit.describe(),
        config = %settings.config_file.as_deref().map_or("(none)".into(), |p| p.display().to_string()),
        "serving the exec API on the tailnet"
    );

    let stop_serving = CancellationToken::new();
    let mut server = tokio::spawn(
        server::Listener::new(listener, Arc::new(WhoIs(node.clone())), api.router())
            .run(stop_serving.clone()),
    );
    let names = tokio::spawn(refresh_names(
        node.clone(),
        api.clone(),
        settings.hostname.clone(),
    ));

    let stopped_by = loop {
        tokio::select! {
            name = wait_for_stop(&mut sigterm, &mut sigint) => break Ok(name),
            served = &mut server => {
                let e = match served {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => std::io::Error::other("the server stopped"),
                    Err(e) => std::io::Error::other(e),
                };
                error!(error = %e, "the tailnet listener is gone; shutting down");
                break Err(e);
            }
            Some(()) = sighup.recv() => {
                // Off this loop: a stalled audit sink or a slow directory
                // scan must not delay SIGTERM.
                tokio::spawn(reopen_and_reload(audit.clone(), registry.clone()));
            }
        }
    };
    names.abort();
    let _ = names.await;

    info!(
        grace = ?settings.shutdown_grace,
        "shutting down: new jobs are refused, running ones get the grace period"
    );
    // Live streams end with their jobs, during the drain: their last bytes
    // need the node a moment longer.
    let mut streaming = api.open_streams() > 0;
    api.shutdown(settings.shutdown_grace).await;
    streaming |= api.open_streams() > 0;
    stop_serving.cancel();
    if stopped_by.is_ok() {
        match server.await {
            Ok(Err(e)) => error!(error = %e, "the tailnet listener failed while stopping"),
            Err(e) => error!(error = %e, "the server task failed"),
            Ok(Ok(())) => {}
        }
        if streaming {
            tokio::time::sleep(DELIVERY_LINGER).await;
        }
    }
    leave(node).await;
    match stopped_by {
        Ok(signal) => {
            info!(signal, "stopped");
            Ok(())
        }
        Err(e) => Err(DaemonError::Listener(e)),
    }
}

/// SIGHUP: reopens the audit log (log rotation) and rescans the tools.
async fn reopen_and_reload(audit: Arc<AuditLog>, registry: Arc<Registry>) {
    match audit.reopen().await {
        Ok(()) => info!(audit = %audit.describe(), "SIGHUP: audit log reopened"),
        Err(e) => error!(audit = %audit.describe(), error = %e,
            "SIGHUP: could not reopen the audit log; still writing to the old file"),
    }
    if let Err(e) = tokio::task::spawn_blocking(move || registry.reload()).await {
        error!(error = %e, "SIGHUP: the tools rescan failed");
    }
}

/// Keeps the API's accepted `Host` names in step with the node's names.
async fn refresh_names(node: Arc<Node>, api: Api, hostname: String) {
    let mut tick = tokio::time::interval(NAMES_REFRESH);
    tick.reset();
    loop {
        tick.tick().await;
        if let Ok(status) = node.status().await
            && !status.dns_name.is_empty()
        {
            api.set_allowed_hosts(&allowed_hosts(&hostname, &status));
        }
    }
}

/// The `Host` values this node answers to: the configured host name, the
/// first label of its MagicDNS name (which the control server may have
/// suffixed after a name collision, or an admin renamed), the MagicDNS name,
/// and its tailnet IPs.
fn allowed_hosts(hostname: &str, status: &Status) -> Vec<String> {
    let mut hosts = vec![hostname.to_string(), status.dns_name.clone()];
    if let Some(short) = status.dns_name.split('.').next().filter(|s| !s.is_empty()) {
        hosts.push(short.to_string());
    }
    hosts.extend(status.ips.iter().map(|ip| ip.to_string()));
    hosts
}

/// The signal streams the daemon listens to.
struct Signals {
    sigterm: tokio::signal::unix::Signal,
    sigint: tokio::signal::unix::Signal,
    sighup: tokio::signal::unix::Signal,
    /// Adopted processes to reap (the daemon is a child subreaper).
    sigchld: tokio::signal::unix::Signal,
}

/// Installs tokio's handlers for SIGTERM, SIGINT, SIGHUP and SIGCHLD, made
/// safe for the Go runtime in this process.
fn install_signal_handlers() -> std::io::Result<Signals> {
    let signals = Signals {
        sigterm: signal(SignalKind::terminate())?,
        sigint: signal(SignalKind::interrupt())?,
        sighup: signal(SignalKind::hangup())?,
        // Also tokio's fallback where pidfd_open is unavailable; installed
        // now, so that it too gets SA_ONSTACK below (a handler, once
        // installed, stays for the life of the process).
        sigchld: signal(SignalKind::child())?,
    };
    // tokio's handlers lack SA_ONSTACK, which the Go runtime in this
    // process requires of every handler (see tailnet::ensure_signal_onstack).
    tailnet::ensure_signal_onstack(&HANDLED_SIGNALS)?;
    Ok(signals)
}

/// The signals the daemon handles.
const HANDLED_SIGNALS: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD];

/// Waits for SIGTERM or SIGINT.
async fn wait_for_stop(
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) -> &'static str {
    tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    }
}

/// Brings the node up, announcing a login URL when one is needed and
/// waiting as long as it takes. It says at once what is missing: no auth
/// key and no saved node (a login URL is needed), a control server that
/// cannot be reached (with its URL), and any other health warning of the
/// node as it appears.
async fn join_tailnet(node: &Node, settings: &Settings) -> Result<Status, DaemonError> {
    let control = settings
        .control_url
        .as_deref()
        .unwrap_or(TAILSCALE_CONTROL_URL);
    let state_file = settings.state_dir.join("tsnet").join("tailscaled.state");
    info!(control, "joining the tailnet");
    if settings.auth_key.is_none() && !state_file.exists() {
        warn!(
            control,
            state_dir = %settings.state_dir.display(),
            "no auth key given (TS_AUTHKEY, TS_AUTHKEY_FILE, --auth-key-file or auth_key_file) and no saved node state: \
             this node can only join by logging in at a URL the control server hands out; waiting for that URL"
        );
    }
    let mut announced: Option<String> = None;
    let mut reported_health: Vec<String> = Vec::new();
    let mut last_said = tokio::time::Instant::now();
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
                    last_said = tokio::time::Instant::now();
                }
            }
            Err(e) if e.is_timeout() => {
                let status = node.status().await.ok();
                let mut health = status
                    .as_ref()
                    .map(|s| s.health.clone())
                    .unwrap_or_default();
                health.sort();
                let state = status.map_or_else(String::new, |s| s.backend_state);
                if !health.is_empty() && health != reported_health {
                    warn_join_health(control, &state, &health);
                    last_said = tokio::time::Instant::now();
                } else if last_said.elapsed() >= STILL_WAITING {
                    warn!(control, state, "still waiting to join the tailnet");
                    last_said = tokio::time::Instant::now();
                }
                reported_health = health;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Says what the node's health warnings mean while it waits to join.
fn warn_join_health(control: &str, state: &str, health: &[String]) {
    let health = health.join("; ");
    // Every login starts by fetching the control server's key: when that
    // fails, the server cannot be reached (or is no control server).
    if health.contains("fetch control key") {
        warn!(
            control,
            state, health, "the control server {control} cannot be reached; retrying"
        );
    } else {
        warn!(control, state, health, "not on the tailnet yet");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_handled_signal_has_a_go_safe_handler() {
        let _signals = install_signal_handlers().unwrap();
        for sig in HANDLED_SIGNALS {
            assert!(
                tailnet::signal_handler_is_onstack(sig).unwrap(),
                "signal {sig} has no SA_ONSTACK handler"
            );
        }
    }

    #[test]
    fn allowed_hosts_cover_names_and_ips() {
        let status = Status {
            backend_state: "Running".into(),
            auth_url: None,
            dns_name: "tk-1.tail1234.ts.net".into(),
            ips: vec!["100.64.0.3".parse().unwrap()],
            user_login: String::new(),
            hostname: "tk".into(),
            health: vec![],
        };
        let hosts = allowed_hosts("tk", &status);
        for h in ["tk", "tk-1", "tk-1.tail1234.ts.net", "100.64.0.3"] {
            assert!(hosts.iter().any(|x| x == h), "{h} missing from {hosts:?}");
        }
    }
}
