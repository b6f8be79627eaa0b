//! Shared by the test binaries: the in-process stack ([`Stack`]: a real
//! tools directory, the registry, the executor with the real launcher
//! binary, the router with a constructed identity), callers, the one
//! [`eventually`] wait, and process inspection through /proc. The daemon
//! process fixture is in [`daemon`].
#![allow(dead_code)]

#[cfg(feature = "localnet")]
pub mod daemon;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tailkitd::api::{Api, ApiSettings, PeerIdentity};
use tailkitd::audit::AuditLog;
use tailkitd::identity::Identity;
use tailkitd::run::{ExecSettings, Executor};
use tailkitd::server::{IdentityResolver, serve_connection};
use tailkitd::tools::Registry;
use tailkitd_launch::{proc_stat, proc_stats};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The node's name in these tests.
pub const HOST: &str = "tailkitd-test";

/// The launcher binary, built by cargo next to the daemon's (this test
/// binary lives in `target/<profile>/deps/`).
pub fn launcher() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let launcher = dir.join(tailkitd_launch::LAUNCHER_NAME);
    assert!(
        launcher.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        launcher.display()
    );
    launcher
}

/// Settings with the real launcher and short grace periods.
pub fn settings() -> ExecSettings {
    ExecSettings {
        launcher: launcher(),
        supervisor: launcher(),
        kill_grace: Duration::from_millis(300),
        ..ExecSettings::default()
    }
}

/// A user-owned caller holding `caps`.
pub fn user(login: &str, caps: &[&str]) -> Identity {
    Identity {
        node_name: format!("{}.tail1234.ts.net", login.split('@').next().unwrap_or("x")),
        node_id: format!("n-{login}"),
        ips: vec!["100.64.0.7".parse().unwrap()],
        user_login: login.into(),
        tags: vec![],
        caps: caps.iter().map(|c| (c.to_string(), vec![])).collect(),
    }
}

pub fn alice() -> Identity {
    user("alice@example.com", &["example.com/cap/x"])
}

pub fn bob() -> Identity {
    user("bob@example.com", &["example.com/cap/x"])
}

/// The in-process stack: a tools directory, the registry over it, the
/// executor, the API, and an in-memory audit log.
pub struct Stack {
    pub api: Api,
    pub registry: Arc<Registry>,
    pub audit: Arc<AuditLog>,
    pub dir: tempfile::TempDir,
}

impl Stack {
    /// A stack whose tools directory holds `tools` (file name, content),
    /// serving as [`HOST`].
    pub fn new(tools: &[(&str, &str)], settings: ExecSettings) -> Self {
        let stack = Stack::build(
            tools,
            settings,
            ApiSettings::new(HOST, vec![HOST.into()]),
            AuditLog::in_memory(),
        );
        let problems = stack.registry.problems();
        assert!(problems.is_empty(), "{problems:?}");
        stack
    }

    /// A stack with every part given.
    pub fn build(
        tools: &[(&str, &str)],
        settings: ExecSettings,
        api_settings: ApiSettings,
        audit: AuditLog,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in tools {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let registry = Arc::new(Registry::load(dir.path(), settings.tool_limits()));
        let audit = Arc::new(audit);
        let executor = Executor::new(settings, audit.clone());
        let api = Api::new(registry.clone(), executor, audit.clone(), api_settings);
        Stack {
            api,
            registry,
            audit,
            dir,
        }
    }

    /// One tool `t` with one command `c` running `exec_parts` with `args`.
    pub fn command(exec_parts: Value, args: Value, settings: ExecSettings) -> Self {
        let tool = serde_json::json!({
            "name": "t",
            "commands": [{"name": "c", "exec_parts": exec_parts, "args": args, "timeout": "30s"}],
        });
        Stack::new(&[("t.json", &tool.to_string())], settings)
    }

    /// Sends `builder` with `body` through the router, as `who` (no
    /// identity at all when `None`): status, JSON body (`Null` if none),
    /// headers.
    pub async fn send(
        &self,
        builder: axum::http::request::Builder,
        body: &str,
        who: Option<PeerIdentity>,
    ) -> (StatusCode, Value, HeaderMap) {
        let mut req = builder.body(Body::from(body.to_string())).unwrap();
        if let Some(who) = who {
            req.extensions_mut().insert(who);
        }
        let res = self.api.router().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            headers,
        )
    }

    /// `method path` with `body` to [`HOST`] as `who`, from a tailnet peer.
    pub async fn request(
        &self,
        who: &Identity,
        method: &str,
        path: &str,
        body: &str,
    ) -> (StatusCode, Value, HeaderMap) {
        let builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", HOST);
        let peer: SocketAddr = "100.64.0.7:40000".parse().unwrap();
        self.send(builder, body, Some(PeerIdentity::known(peer, who.clone())))
            .await
    }

    /// POST /exec/t/c?wait=30s as alice; the job result (or panics).
    pub async fn run(&self, body: &str) -> Value {
        let (s, v, _) = self
            .request(&alice(), "POST", "/exec/t/c?wait=30s", body)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    /// Audit lines as JSON.
    pub fn audit_records(&self) -> Vec<Value> {
        self.audit
            .lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The `exec.denied` audit records.
    pub fn denials(&self) -> Vec<Value> {
        self.audit_records()
            .into_iter()
            .filter(|v| v["event"] == "exec.denied")
            .collect()
    }
}

/// Resolves callers by IP address (every loopback connection comes from
/// 127.0.0.1).
pub struct ByIp(pub BTreeMap<IpAddr, Identity>);

impl IdentityResolver for ByIp {
    fn resolve(
        &self,
        peer: SocketAddr,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<Identity, String>> + Send + '_>> {
        let found = self
            .0
            .get(&peer.ip())
            .cloned()
            .ok_or_else(|| format!("no peer at {peer}"));
        Box::pin(async move { found })
    }
}

/// Serves `stack`'s router on a loopback TCP port, callers resolved by
/// `resolver`; returns the address.
pub async fn serve_on_loopback(stack: &Stack, resolver: impl IdentityResolver) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = stack.api.router();
    let resolver: Arc<dyn IdentityResolver> = Arc::new(resolver);
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let conn = serve_connection(
                stream,
                peer,
                resolver.clone(),
                router.clone(),
                CancellationToken::new(),
            );
            tokio::spawn(conn);
        }
    });
    addr
}

/// Whether process `pid` is gone (no such process, or a zombie nobody
/// reaped yet: it runs nothing any more).
pub fn process_gone(pid: i32) -> bool {
    proc_stat(pid).is_none_or(|p| matches!(p.state, 'Z' | 'X'))
}

/// The parent of process `pid`.
pub fn parent_of(pid: i32) -> i32 {
    proc_stat(pid).expect("the process exists").ppid
}

/// The process group of process `pid`.
pub fn group_of(pid: i32) -> i32 {
    proc_stat(pid).expect("the process exists").pgid
}

/// Whether any live process is in process group `pgid`.
pub fn group_alive(pgid: i32) -> bool {
    proc_stats()
        .iter()
        .any(|p| p.pgid == pgid && !matches!(p.state, 'Z' | 'X'))
}

/// Polls `probe` every 20 ms until it returns `Some`, and returns that;
/// panics naming `what` after `limit` (a hang guard, not a timing
/// assertion). The one wait of these tests ([`eventually`] is the same for
/// a plain condition).
pub async fn eventually_some<T>(
    limit: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`eventually_some`] for a condition that takes no waiting itself.
pub async fn eventually(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    eventually_some(limit, what, async || condition().then_some(())).await
}

/// Peak resident memory of this process so far (`VmHWM`), in KiB.
pub fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Pids printed one per line.
pub fn pids(text: &str) -> Vec<i32> {
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Writes `text` to `dir/name` through a temporary file and a rename, as
/// editors and config managers do.
pub fn rename_save(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// Writes `dir/leaf.sh`, a process that appends its pid to the file named
/// by `$1` and then sleeps for good (ignoring SIGTERM when `$2` is
/// `ignore-term`): started with `setsid`, it leaves the command's process
/// group and session.
pub fn write_leaf_script(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("leaf.sh");
    std::fs::write(
        &path,
        "#!/bin/sh\n[ \"$2\" = ignore-term ] && trap '' TERM\necho $$ >> \"$1\"\nexec sleep 1000\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// SIGKILLs the processes of a test that are still alive when it ends, so
/// that a failing test leaves nothing behind.
pub struct KillOnDrop(pub Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            if !process_gone(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// This test binary, started to run only the ignored helper test `name`
/// (a test that acts as a separate process, e.g. one to be SIGKILLed).
pub fn helper_process(name: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd
}
