//! `tailkitd demo` and `tailkitd localnet`: the embedded local tailnet put
//! to use. `demo` runs the whole product once, with no account and no
//! setup: a local tailnet, the real daemon (this binary, `run`) serving the
//! example tools, and two client nodes, one holding `example.com/cap/x` and
//! one holding nothing; it makes a few calls, prints what happened and the
//! audit log, and exits. `localnet` keeps such a tailnet running, with
//! SOCKS5 proxies into it, so anyone can try the API with curl.

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::{self, Call, Response};
use tsnet_bridge::{BridgeError, Localnet, Node};

/// The example tools `demo` serves, built into the binary so the demo works
/// from any directory.
const EXAMPLE_TOOLS: &[(&str, &str)] = &[
    ("demo.json", include_str!("../examples/tools/demo.json")),
    ("disk.json", include_str!("../examples/tools/disk.json")),
    ("system.toml", include_str!("../examples/tools/system.toml")),
];

/// The capability the demo grants to its first client.
pub const DEMO_CAP: &str = "example.com/cap/x";
/// The daemon's host name in the demo.
const DAEMON_HOST: &str = "tailkitd-demo";
/// How long any one demo step may take before the demo gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Names given to client nodes, in order; more get `client-N`.
const CLIENT_NAMES: &[&str] = &["alice", "bob", "carol", "dave", "erin", "frank"];

/// What stopped the demo or the local tailnet.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The local tailnet or a node failed.
    #[error("tailnet: {0}")]
    Tailnet(#[from] BridgeError),
    /// Files or processes failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A call to the daemon failed or answered something unexpected.
    #[error("{0}")]
    Unexpected(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// A client node on the local tailnet.
pub struct Client {
    /// Its host name.
    pub name: String,
    /// Its user login.
    pub user: String,
    /// Its tailnet addresses.
    pub ips: Vec<IpAddr>,
    /// The node, shareable so that many calls can dial at once.
    pub node: Arc<Node>,
}

impl Client {
    /// Joins `localnet` as `name`, keeping state under `dir`.
    ///
    /// # Errors
    ///
    /// When the node cannot come up.
    pub async fn join(localnet: &Localnet, name: &str, dir: &Path) -> Result<Client, DemoError> {
        let node = Node::new(localnet.node_config(name, &dir.join(name)))?;
        let status = node.up(STEP_TIMEOUT).await?;
        Ok(Client {
            name: name.to_string(),
            user: Localnet::user_login(name),
            ips: status.ips,
            node: Arc::new(node),
        })
    }

    /// Sends `call` to `host:80` over the tailnet.
    ///
    /// # Errors
    ///
    /// When the daemon cannot be reached or does not answer in time.
    pub async fn call(&self, host: &str, call: Call<'_>) -> Result<Response, DemoError> {
        let stream = self.node.dial(&format!("{host}:80")).await?;
        client::send(stream, call, STEP_TIMEOUT)
            .await
            .map_err(|e| DemoError::Unexpected(format!("{} -> {host}: {e}", self.name)))
    }
}

/// The name of the `i`-th client node.
pub fn client_name(i: usize) -> String {
    CLIENT_NAMES
        .get(i)
        .map_or_else(|| format!("client-{}", i + 1), |n| n.to_string())
}

/// Runs the demo; see the module docs. `exe` is this binary (the daemon is
/// started as `exe run ...`).
///
/// # Errors
///
/// When any step fails or the daemon answers something other than what the
/// demo shows.
pub async fn run_demo(exe: &Path) -> Result<(), DemoError> {
    let launcher = crate::run::default_launcher();
    if !launcher.is_file() {
        return Err(DemoError::Unexpected(format!(
            "{} is missing: the daemon runs every command through it. `cargo build --release` builds it next to tailkitd",
            launcher.display()
        )));
    }
    let dir = tempfile::Builder::new()
        .prefix("tailkitd-demo-")
        .tempdir()
        .map_err(io_err("creating a temp dir"))?;
    let tools_dir = dir.path().join("tools");
    std::fs::create_dir(&tools_dir).map_err(io_err("creating the tools dir"))?;
    for (name, text) in EXAMPLE_TOOLS {
        std::fs::write(tools_dir.join(name), text).map_err(io_err(format!("writing {name}")))?;
    }
    let audit_path = dir.path().join("audit.jsonl");

    say("tailkitd demo: a whole tailnet on loopback, no account needed\n");
    let localnet = Localnet::start().await?;
    say(&format!("  control server  {}", localnet.control_url()));

    let alice = Client::join(&localnet, "alice", dir.path()).await?;
    let bob = Client::join(&localnet, "bob", dir.path()).await?;
    localnet.grant(&alice.ips, DEMO_CAP).await?;
    for (c, holds) in [(&alice, DEMO_CAP), (&bob, "no capability")] {
        say(&format!(
            "  client {:<8} {:<14} user {:<18} holds {holds}",
            c.name,
            first_ip(&c.ips),
            c.user
        ));
    }

    let mut daemon = Daemon::spawn(exe, &localnet, dir.path(), &tools_dir, &audit_path).await?;
    say(&format!("  daemon          {}\n", daemon.up_line));
    let outcome = demo_calls(&alice, &bob).await;
    let stopped = daemon.stop().await;

    say("\nThe audit log (one JSON object per line; here shortened):");
    let audit = std::fs::read_to_string(&audit_path).map_err(io_err("reading the audit log"))?;
    for line in audit.lines() {
        say(&format!("  {}", summarize_audit(line)));
    }
    say(&format!(
        "\n(full audit log: {} lines)",
        audit.lines().count()
    ));

    alice.node.shutdown().await?;
    bob.node.shutdown().await?;
    localnet.close().await?;
    outcome?;
    stopped?;
    say("\ndemo finished: every call did what tailkitd promises");
    Ok(())
}

/// The calls the demo makes, each checked.
async fn demo_calls(alice: &Client, bob: &Client) -> Result<(), DemoError> {
    // Grants reach the daemon's netmap within moments; wait until alice's
    // capability shows in what the daemon lets her run.
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let tools = alice
            .call(DAEMON_HOST, Call::get(DAEMON_HOST, "/tools"))
            .await?;
        if tools.text.contains("\"usage\"") {
            break;
        }
        if Instant::now() > deadline {
            return Err(DemoError::Unexpected(format!(
                "alice's capability never reached the daemon; /tools says {}",
                tools.text
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    step(
        "1. alice (holds example.com/cap/x) runs disk/usage {\"path\": \"/etc\"}, waiting for the result",
    );
    let r = post(alice, "/exec/disk/usage?wait=20s", json!({"path": "/etc"})).await?;
    show_and_expect(&r, 200, "completed")?;

    step("2. bob (no capability) asks for the same command");
    let r = post(bob, "/exec/disk/usage?wait=20s", json!({"path": "/etc"})).await?;
    show_and_expect(&r, 403, "")?;

    step("3. alice tries to smuggle a shell command into the path argument");
    let r = post(
        alice,
        "/exec/disk/usage?wait=20s",
        json!({"path": "/etc; rm -rf /"}),
    )
    .await?;
    show_and_expect(&r, 400, "")?;

    step(
        "4. bob runs system/uptime, a command without acl_cap (the daemon warned about it at start)",
    );
    let r = post(bob, "/exec/system/uptime?wait=20s", json!({})).await?;
    show_and_expect(&r, 200, "completed")?;

    step("5. alice starts demo/whoami without waiting, then fetches the result by job id");
    let r = post(alice, "/exec/demo/whoami", json!({})).await?;
    show_and_expect(&r, 202, "accepted")?;
    let id = r.json["job_id"].as_str().unwrap_or_default().to_string();
    let path = format!("/exec/jobs/{id}?wait=20s");
    let r = alice
        .call(DAEMON_HOST, Call::get(DAEMON_HOST, &path))
        .await?;
    show_and_expect(&r, 200, "completed")?;

    step("6. bob tries to read alice's job");
    let path = format!("/exec/jobs/{id}");
    let r = bob.call(DAEMON_HOST, Call::get(DAEMON_HOST, &path)).await?;
    show_and_expect(&r, 404, "")?;
    Ok(())
}

/// POSTs `body` as JSON to `path` on the demo daemon, as `client`.
async fn post(client: &Client, path: &str, body: Value) -> Result<Response, DemoError> {
    client
        .call(DAEMON_HOST, Call::post_json(DAEMON_HOST, path, &body))
        .await
}

/// The daemon process of the demo.
struct Daemon {
    child: Child,
    up_line: String,
}

impl Daemon {
    async fn spawn(
        exe: &Path,
        localnet: &Localnet,
        dir: &Path,
        tools_dir: &Path,
        audit_path: &Path,
    ) -> Result<Daemon, DemoError> {
        let mut cmd = Command::new(exe);
        cmd.arg("run")
            .arg("--hostname")
            .arg(DAEMON_HOST)
            .arg("--state-dir")
            .arg(dir.join("daemon"))
            .arg("--tools-dir")
            .arg(tools_dir)
            .arg("--audit-log")
            .arg(audit_path)
            .arg("--control-url")
            .arg(localnet.control_url())
            .arg("--config")
            .arg("/dev/null")
            .env("RUST_LOG", "tailkitd=error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // The demo's daemon is set up by the flags above alone: settings the
        // user exported for a real daemon (a port, an auth key, ...) stay out.
        for (name, _) in std::env::vars_os() {
            let name_text = name.to_string_lossy();
            if name_text.starts_with("TAILKITD_") || name_text.starts_with("TS_AUTHKEY") {
                cmd.env_remove(&name);
            }
        }
        if let Some(key) = localnet.auth_key() {
            cmd.env("TS_AUTHKEY", key);
        }
        let mut child = cmd
            .spawn()
            .map_err(io_err(format!("starting {} run", exe.display())))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| DemoError::Unexpected("daemon stdout missing".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let up_line = tokio::time::timeout(STEP_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with("tailkitd up:") {
                    return Ok(Some(line));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let up_line = match up_line {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                return Err(DemoError::Unexpected(
                    "the daemon exited before it was up".into(),
                ));
            }
            Ok(Err(e)) => return Err(io_err("reading the daemon's output")(e)),
            Err(_) => {
                return Err(DemoError::Unexpected(
                    "the daemon did not come up within 60 s".into(),
                ));
            }
        };
        // Keep draining its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Daemon { child, up_line })
    }

    /// SIGTERM, then wait for a clean exit.
    async fn stop(&mut self) -> Result<(), DemoError> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let status = tokio::time::timeout(STEP_TIMEOUT, self.child.wait())
            .await
            .map_err(|_| DemoError::Unexpected("the daemon did not stop after SIGTERM".into()))?
            .map_err(io_err("waiting for the daemon"))?;
        if status.success() {
            Ok(())
        } else {
            Err(DemoError::Unexpected(format!(
                "the daemon exited with {status}"
            )))
        }
    }
}

/// Prints `r`, then checks it has `status` (and `job_status`, if not empty).
fn show_and_expect(r: &Response, status: u16, job_status: &str) -> Result<(), DemoError> {
    show(r);
    expect(r, status, job_status)
}

fn expect(r: &Response, status: u16, job_status: &str) -> Result<(), DemoError> {
    let got = r.json["status"].as_str().unwrap_or_default();
    if r.status.as_u16() == status && (job_status.is_empty() || got == job_status) {
        Ok(())
    } else {
        Err(DemoError::Unexpected(format!(
            "expected {status} {job_status}, got {} {}",
            r.status, r.text
        )))
    }
}

fn step(text: &str) {
    say(&format!("\n{text}"));
}

fn show(r: &Response) {
    let j = &r.json;
    let mut line = format!("   -> {}", r.status);
    if let Some(status) = j["status"].as_str() {
        line.push_str(&format!("  status={status}"));
    }
    if let Some(code) = j.get("exit_code").and_then(Value::as_i64) {
        line.push_str(&format!(" exit_code={code}"));
    }
    if let Some(err) = j["error"].as_str() {
        line.push_str(&format!("  error={err:?}"));
    }
    if let Some(hint) = j["hint"].as_str() {
        line.push_str(&format!("  hint={hint:?}"));
    }
    say(&line);
    if let Some(out) = j["stdout"].as_str().filter(|s| !s.is_empty()) {
        for l in out.lines().take(5) {
            say(&format!("      | {l}"));
        }
    }
}

/// One audit line, shortened to the fields a reader scans for.
fn summarize_audit(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return line.to_string();
    };
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let mut out = format!(
        "{} {:<14} {:<16} {}/{}",
        s("ts"),
        s("event"),
        v["caller"]["user"].as_str().unwrap_or(""),
        s("tool"),
        s("command")
    );
    if let Some(args) = v.get("args") {
        out.push_str(&format!(" args={args}"));
    }
    if let Some(reason) = v["reason"].as_str() {
        out.push_str(&format!(" reason={reason:?}"));
    }
    if let Some(status) = v["status"].as_str() {
        out.push_str(&format!(" status={status} exit_code={}", v["exit_code"]));
    }
    out
}

fn first_ip(ips: &[IpAddr]) -> String {
    ips.iter()
        .find(|ip| ip.is_ipv4())
        .or(ips.first())
        .map(ToString::to_string)
        .unwrap_or_default()
}

fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// Runs `tailkitd localnet`: a local tailnet with `clients` client nodes,
/// each with a SOCKS5 proxy on loopback, and `grants` (client name or
/// 1-based index, capability) applied; prints one JSON line describing it
/// and runs until SIGINT or SIGTERM.
///
/// # Errors
///
/// When the tailnet or a client cannot start, or a grant names no client.
pub async fn run_localnet(clients: usize, grants: &[(String, String)]) -> Result<(), DemoError> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_err("installing signal handlers"))?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(io_err("installing signal handlers"))?;
    tsnet_bridge::ensure_signal_onstack(&[libc::SIGTERM, libc::SIGINT])
        .map_err(io_err("installing signal handlers"))?;

    let dir = tempfile::Builder::new()
        .prefix("tailkitd-localnet-")
        .tempdir()
        .map_err(io_err("creating a temp dir"))?;
    let localnet = Localnet::start().await?;
    let mut nodes = Vec::new();
    let mut described = Vec::new();
    for i in 0..clients {
        let client = Client::join(&localnet, &client_name(i), dir.path()).await?;
        let proxy = client.node.loopback().await?;
        described.push(json!({
            "name": client.name,
            "ip": first_ip(&client.ips),
            "user": client.user,
            "socks5": proxy.addr.to_string(),
            "socks5_user": proxy.socks5_user,
            "socks5_password": proxy.socks5_password,
        }));
        nodes.push(client);
    }
    for (who, cap) in grants {
        let client = resolve_client(&nodes, who)?;
        localnet.grant(&client.ips, cap).await?;
    }
    let line = json!({
        "control_url": localnet.control_url(),
        "auth_key": localnet.auth_key(),
        "clients": described,
    });
    say(&line.to_string());

    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    for client in nodes {
        let _ = client.node.shutdown().await;
    }
    localnet.close().await?;
    Ok(())
}

fn resolve_client<'a>(nodes: &'a [Client], who: &str) -> Result<&'a Client, DemoError> {
    if let Ok(index) = who.parse::<usize>()
        && let Some(c) = index.checked_sub(1).and_then(|i| nodes.get(i))
    {
        return Ok(c);
    }
    nodes.iter().find(|c| c.name == who).ok_or_else(|| {
        DemoError::Unexpected(format!(
            "--grant {who}=...: no client named {who:?} (clients: {})",
            nodes
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// Parses `CLIENT=CAP` of `--grant`.
///
/// # Errors
///
/// When there is no `=` or either side is empty.
pub fn parse_grant(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((who, cap)) if !who.is_empty() && !cap.is_empty() => {
            Ok((who.to_string(), cap.to_string()))
        }
        _ => Err(format!(
            "{s:?}: want CLIENT=CAP, e.g. alice=example.com/cap/x"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse_and_name_the_problem() {
        assert_eq!(
            parse_grant("alice=example.com/cap/x").unwrap(),
            ("alice".into(), "example.com/cap/x".into())
        );
        assert!(parse_grant("alice").unwrap_err().contains("CLIENT=CAP"));
        assert!(parse_grant("=cap").is_err());
    }

    #[test]
    fn clients_are_named_then_numbered() {
        assert_eq!(client_name(0), "alice");
        assert_eq!(client_name(1), "bob");
        assert_eq!(client_name(10), "client-11");
    }

    #[test]
    fn example_tools_are_valid() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in EXAMPLE_TOOLS {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let problems = crate::tools::validate_path(dir.path());
        assert!(problems.is_empty(), "{problems:?}");
    }
}
