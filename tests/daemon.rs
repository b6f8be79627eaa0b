//! The daemon end to end: the real `tailkitd run` binary, spawned as a
//! process, on the embedded local tailnet, called by real client nodes.
//! alice holds `example.com/cap/x`; bob holds nothing.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tailkitd::client::{Call, Response};
use tailkitd::demo::Client;
use tailkitd::exec::launcher::{proc_stat, proc_stats};
use tailkitd::tailnet::{Localnet, LocalnetOptions};

const CAP: &str = "example.com/cap/x";
const HOST: &str = "tkd";
const LONG: Duration = Duration::from_secs(90);

/// The tools every test daemon serves. `MARKER` becomes a file path that a
/// command appends to, so a test can tell whether anything ran; `AUDIT`
/// the default audit log's path.
const TOOLS: &str = r#"{
  "name": "t",
  "version": "1.0.0",
  "tsnet_host": "ignored",
  "commands": [
    {"name": "echo", "description": "", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "echo \"$1\"; echo echo >> MARKER", "sh", "{{.msg}}"],
     "timeout": 10000000000,
     "args": [{"name": "msg", "type": "string", "required": true, "pattern": "^[a-z ]+$"}]},
    {"name": "open", "description": "no acl_cap", "acl_cap": "",
     "exec_parts": ["/bin/sh", "-c", "echo open >> MARKER"], "timeout": 0},
    {"name": "sleep", "description": "", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "echo sleep >> MARKER; exec sleep \"$1\"", "sh", "{{.secs}}"],
     "timeout": "5m",
     "args": [{"name": "secs", "type": "int", "required": true}]},
    {"name": "true", "description": "", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/true"], "timeout": "10s"},
    {"name": "audited", "description": "its own audit lines", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "grep -c \"$TAILKIT_JOB_ID\" AUDIT"], "timeout": "10s"}
  ]
}"#;

/// A local tailnet with alice (granted CAP) and bob, and a temp dir.
struct Net {
    localnet: Localnet,
    dir: tempfile::TempDir,
    alice: Client,
    bob: Client,
}

impl Net {
    async fn start() -> Net {
        let dir = tempfile::tempdir().unwrap();
        let localnet = Localnet::start().await.unwrap();
        let alice = Client::join(&localnet, "alice", dir.path()).await.unwrap();
        let bob = Client::join(&localnet, "bob", dir.path()).await.unwrap();
        localnet.grant(&alice.ips, CAP).await.unwrap();
        Net {
            localnet,
            dir,
            alice,
            bob,
        }
    }

    fn marker(&self) -> PathBuf {
        self.dir.path().join("marker")
    }

    /// What ran so far, one line per command start.
    fn ran(&self) -> Vec<String> {
        std::fs::read_to_string(self.marker())
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Starts `tailkitd run` with the test tools and `extra` flags, and
    /// waits for its "up" line and for alice's grant to reach it.
    async fn daemon(&self, extra: &[&str]) -> Daemon {
        let daemon = Daemon::spawn(
            self.dir.path(),
            self.localnet.control_url(),
            self.localnet.auth_key(),
            extra,
        );
        daemon.wait_up().await;
        daemon.wait_for_grant(&self.alice).await;
        daemon
    }
}

/// Writes the test tools into `dir/tools`, commands appending to
/// `dir/marker`.
fn write_tools(dir: &Path) -> PathBuf {
    let tools = dir.join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let marker = dir.join("marker");
    let audit = dir.join("audit.jsonl");
    let text = TOOLS
        .replace("MARKER", marker.to_str().unwrap())
        .replace("AUDIT", audit.to_str().unwrap());
    std::fs::write(tools.join("t.json"), text).unwrap();
    tools
}

/// Reads a child's output lines on a thread, into a channel.
fn line_reader(out: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            // Shown with a failing test's output.
            eprintln!("| {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

/// The first line from `lines` that satisfies `pick`, within `LONG`.
async fn next_line(
    lines: &Mutex<Receiver<String>>,
    what: &str,
    pick: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + LONG;
    loop {
        let got = lines.lock().unwrap().try_recv();
        match got {
            Ok(line) if pick(&line) => return line,
            Ok(_) => {}
            Err(TryRecvError::Empty) => {
                assert!(Instant::now() < deadline, "no {what} within {LONG:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(TryRecvError::Disconnected) => panic!("the process ended before printing {what}"),
        }
    }
}

struct Daemon {
    child: Child,
    audit: PathBuf,
    stdout: Mutex<Receiver<String>>,
    stderr: Mutex<Receiver<String>>,
    /// `--audit-log -`: stdout is for audit lines; the up line goes to stderr.
    audit_on_stdout: bool,
    up_line: std::sync::OnceLock<String>,
}
impl Daemon {
    /// Spawns `tailkitd run` as `HOST` with state, tools and audit log in
    /// `dir` (unless `extra` names its own `--audit-log`). Its stdout and
    /// stderr are read line by line (the login URL goes to stderr).
    fn spawn(dir: &Path, control_url: &str, auth_key: Option<&str>, extra: &[&str]) -> Daemon {
        Daemon::spawn_with_env(dir, control_url, auth_key, extra, &[])
    }

    /// [`Daemon::spawn`] with `env` added to its environment. Without a
    /// `--config` in `extra`, the config file is `/dev/null`.
    fn spawn_with_env(
        dir: &Path,
        control_url: &str,
        auth_key: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let tools = write_tools(dir);
        let audit = dir.join("audit.jsonl");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tailkitd"));
        cmd.args(["run", "--hostname", HOST])
            .args(if extra.contains(&"--config") {
                &[][..]
            } else {
                &["--config", "/dev/null"][..]
            })
            .arg("--state-dir")
            .arg(dir.join("daemon-state"))
            .arg("--tools-dir")
            .arg(&tools)
            .args(if extra.contains(&"--audit-log") {
                vec![]
            } else {
                vec!["--audit-log".to_string(), audit.display().to_string()]
            })
            .arg("--control-url")
            .arg(control_url)
            .args(extra)
            .env_remove("TS_AUTHKEY")
            .env_remove("TS_AUTHKEY_FILE")
            .env("RUST_LOG", "tailkitd=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(key) = auth_key {
            cmd.env("TS_AUTHKEY", key);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = Mutex::new(line_reader(child.stdout.take().unwrap()));
        let stderr = Mutex::new(line_reader(child.stderr.take().unwrap()));
        Daemon {
            child,
            audit,
            stdout,
            stderr,
            audit_on_stdout: extra.windows(2).any(|w| w == ["--audit-log", "-"]),
            up_line: std::sync::OnceLock::new(),
        }
    }

    /// Waits for the "up" line and returns it.
    async fn wait_up(&self) -> &str {
        if self.up_line.get().is_none() {
            let lines = if self.audit_on_stdout {
                &self.stderr
            } else {
                &self.stdout
            };
            let line = next_line(lines, "up line", |l| l.starts_with("tailkitd up:")).await;
            let _ = self.up_line.set(line);
        }
        self.up_line.get().unwrap()
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Grants reach the daemon's netmap within moments: wait until alice's
    /// capability shows in what the daemon lets her run.
    async fn wait_for_grant(&self, alice: &Client) {
        self.wait_for_grant_on(alice, 80).await;
    }

    /// [`Daemon::wait_for_grant`] for a daemon serving on `port`.
    async fn wait_for_grant_on(&self, alice: &Client, port: u16) {
        let deadline = Instant::now() + LONG;
        loop {
            let r = call_port(alice, port, Call::get(HOST, "/tools")).await;
            if r.text.contains("\"sleep\"") {
                return;
            }
            assert!(Instant::now() < deadline, "grant never arrived: {}", r.text);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// SIGTERM, and the exit status once it exits.
    fn terminate(&mut self) -> std::process::ExitStatus {
        kill(self.pid(), Signal::SIGTERM).unwrap();
        wait_exit(&mut self.child, LONG).expect("daemon did not exit after SIGTERM")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// `call` from `c` to the daemon's `port`.
async fn call_port(c: &Client, port: u16, call: Call<'_>) -> Response {
    let stream = c.node.dial(&format!("{HOST}:{port}")).await.unwrap();
    tailkitd::client::send(stream, call, LONG).await.unwrap()
}

async fn post(c: &Client, path: &str, body: Value) -> Response {
    c.call(HOST, Call::post_json(HOST, path, &body))
        .await
        .unwrap()
}

async fn get(c: &Client, path: &str) -> Response {
    c.call(HOST, Call::get(HOST, path)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capable_client_runs_a_command_and_polls_the_result() {
    let net = Net::start().await;
    let daemon = net.daemon(&[]).await;
    let up = daemon.wait_up().await;
    assert!(up.contains(&format!("name={HOST}.")), "{up}");
    assert!(up.contains("port=80 tools=1 commands=5"), "{up}");

    let r = post(&net.alice, "/exec/t/echo", json!({"msg": "hello tailnet"})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.json["status"], "accepted");
    let id = r.json["job_id"].as_str().unwrap().to_string();

    let deadline = Instant::now() + LONG;
    let result = loop {
        let r = get(&net.alice, &format!("/exec/jobs/{id}")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if r.json["status"] == "completed" || r.json["status"] == "failed" {
            break r.json;
        }
        assert!(Instant::now() < deadline, "job never finished: {}", r.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(result["status"], "completed", "{result}");
    assert_eq!(result["exit_code"], 0);
    assert_eq!(result["stdout"], "hello tailnet\n");
    assert_eq!(result["tool"], "t");
    assert_eq!(result["command"], "echo");
    assert_eq!(net.ran(), vec!["echo"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_the_capability_gets_403_and_nothing_runs() {
    let net = Net::start().await;
    let daemon = net.daemon(&[]).await;
    for (path, body) in [
        ("/exec/t/echo?wait=5s", json!({"msg": "hi"})),
        ("/exec/t/sleep", json!({"secs": 1})),
    ] {
        let r = post(&net.bob, path, body).await;
        assert_eq!(r.status, 403, "{}", r.text);
        assert!(
            r.json["error"].as_str().unwrap().contains(CAP),
            "{}",
            r.text
        );
    }
    // bob's /tools lists only what he may run.
    let tools = get(&net.bob, "/tools").await;
    assert!(tools.text.contains("\"open\""), "{}", tools.text);
    assert!(!tools.text.contains("\"echo\""), "{}", tools.text);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(net.ran().is_empty(), "something ran: {:?}", net.ran());
    let denied: Vec<Value> = daemon
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "exec.denied")
        .collect();
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert_eq!(denied[0]["caller"]["user"], Localnet::user_login("bob"));
    assert!(denied[0]["reason"].as_str().unwrap().contains(CAP));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_beats_the_config_file_which_beats_the_defaults() {
    let net = Net::start().await;
    let config = net.dir.path().join("tailkitd.toml");
    std::fs::write(&config, "port = 8081\nrequire_cap = true\n").unwrap();
    let daemon = Daemon::spawn_with_env(
        net.dir.path(),
        net.localnet.control_url(),
        net.localnet.auth_key(),
        &["--config", config.to_str().unwrap()],
        &[("TAILKITD_PORT", "8082")],
    );
    let up = daemon.wait_up().await;
    assert!(up.contains(" port=8082 "), "the environment lost: {up}");
    daemon.wait_for_grant_on(&net.alice, 8082).await;
    // Where no flag and no variable speak, the file does: require_cap.
    let open = Call::post_json(HOST, "/exec/t/open?wait=10s", &json!({}));
    let r = call_port(&net.bob, 8082, open).await;
    assert_eq!(r.status, 403, "the config file lost: {}", r.text);
    assert!(net.ran().is_empty(), "a refused command ran");
}

#[test]
fn run_help_lists_every_setting_with_its_default_and_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_tailkitd"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, default, variable) in [
        ("--hostname", "tailkitd-<os hostname>", "TAILKITD_HOSTNAME"),
        ("--state-dir", "/var/lib/tailkitd", "TAILKITD_STATE_DIR"),
        ("--tools-dir", "/etc/tailkitd/tools", "TAILKITD_TOOLS_DIR"),
        ("--control-url", "Tailscale's", "TAILKITD_CONTROL_URL"),
        ("--auth-key-file", "none", "TS_AUTHKEY_FILE"),
        ("--ephemeral", "false", "TAILKITD_EPHEMERAL"),
        ("--port", "80", "TAILKITD_PORT"),
        (
            "--audit-log",
            "<state dir>/audit.jsonl",
            "TAILKITD_AUDIT_LOG",
        ),
        ("--require-cap", "false", "TAILKITD_REQUIRE_CAP"),
        ("--max-jobs", "16", "TAILKITD_MAX_JOBS"),
        ("--log-format", "text", "TAILKITD_LOG_FORMAT"),
        ("--upload-logs", "false", "TAILKITD_UPLOAD_LOGS"),
        ("--shutdown-grace", "10s", "TAILKITD_SHUTDOWN_GRACE"),
        ("--config", "/etc/tailkitd/tailkitd.toml", "TAILKITD_CONFIG"),
    ] {
        // clap prints a flag's help after the flag, up to the next flag.
        let start = help
            .find(&format!("{flag} "))
            .or_else(|| help.find(&format!("{flag}[")))
            .unwrap_or_else(|| panic!("{flag} is not in:\n{help}"));
        let rest = &help[start + flag.len()..];
        let entry = &rest[..rest.find("\n      --").unwrap_or(rest.len())];
        assert!(
            entry.contains(&format!("[default: {default}")),
            "{flag} does not show its default {default:?}:\n{entry}"
        );
        assert!(
            entry.contains(variable),
            "{flag} does not name {variable}:\n{entry}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_cap_denies_commands_without_acl_cap() {
    let net = Net::start().await;
    let open = net.daemon(&[]).await;
    let r = post(&net.bob, "/exec/t/open?wait=10s", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "completed");
    assert_eq!(net.ran(), vec!["open"]);
    drop(open);

    let strict = net.daemon(&["--require-cap"]).await;
    for who in [&net.alice, &net.bob] {
        let r = post(who, "/exec/t/open?wait=10s", json!({})).await;
        assert_eq!(r.status, 403, "{}", r.text);
    }
    assert_eq!(net.ran(), vec!["open"], "a refused command ran");
    let tools = get(&net.alice, "/tools").await;
    assert!(!tools.text.contains("\"open\""), "{}", tools.text);
    drop(strict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_read_or_cancel_anothers_job() {
    let net = Net::start().await;
    // bob needs the capability too, to own a job of his own.
    net.localnet.grant(&net.bob.ips, CAP).await.unwrap();
    let daemon = net.daemon(&[]).await;
    daemon.wait_for_grant(&net.bob).await;

    let r = post(&net.alice, "/exec/t/sleep", json!({"secs": 60})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json["job_id"].as_str().unwrap().to_string();
    let path = format!("/exec/jobs/{id}");

    let r = get(&net.bob, &path).await;
    assert_eq!(r.status, 404, "{}", r.text);
    let r = net.bob.call(HOST, Call::delete(HOST, &path)).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.text);

    let r = get(&net.alice, &path).await;
    assert_eq!(r.status, 200);
    assert!(
        r.json["status"] == "running" || r.json["status"] == "accepted",
        "{}",
        r.text
    );

    let r = net
        .alice
        .call(HOST, Call::delete(HOST, &path))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    let r = get(&net.alice, &format!("{path}?wait=20s")).await;
    assert_eq!(r.json["status"], "cancelled", "{}", r.text);
    assert_eq!(r.json["exit_code"], -1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_job_is_audited_accepted_then_finished() {
    let net = Net::start().await;
    let mut daemon = net.daemon(&[]).await;
    let mut ids = Vec::new();
    for msg in ["one", "two", "three"] {
        let r = post(&net.alice, "/exec/t/echo?wait=10s", json!({"msg": msg})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        ids.push(r.json["job_id"].as_str().unwrap().to_string());
    }
    let r = post(&net.alice, "/exec/t/echo", json!({"msg": "BAD!"})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = post(&net.bob, "/exec/t/echo", json!({"msg": "hi"})).await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = post(&net.alice, "/exec/t/nope", json!({})).await;
    assert_eq!(r.status, 404, "{}", r.text);
    // The command counts its job's lines in the audit file: the acceptance
    // is there before the process starts, the finish not yet.
    let r = post(&net.alice, "/exec/t/audited?wait=10s", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["stdout"], "1\n", "{}", r.text);
    ids.push(r.json["job_id"].as_str().unwrap().to_string());
    assert!(daemon.terminate().success());

    let lines = daemon.audit_lines();
    for id in &ids {
        let events: Vec<&str> = lines
            .iter()
            .filter(|l| l["job_id"] == id.as_str())
            .map(|l| l["event"].as_str().unwrap())
            .collect();
        assert_eq!(events, ["exec.accepted", "exec.finished"], "job {id}");
    }
    let finished: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "exec.finished")
        .collect();
    assert!(
        finished
            .iter()
            .all(|l| l["status"] == "completed" && l["exit_code"] == 0)
    );
    assert!(
        finished
            .iter()
            .all(|l| l["stdout_bytes"].as_u64().unwrap() > 0)
    );
    let accepted = lines
        .iter()
        .find(|l| l["event"] == "exec.accepted")
        .unwrap();
    assert_eq!(accepted["caller"]["user"], Localnet::user_login("alice"));
    assert_eq!(accepted["caller"]["ip"], net.alice.ips[0].to_string());
    assert_eq!(accepted["args"]["msg"], "one");
    let denied: Vec<u64> = lines
        .iter()
        .filter(|l| l["event"] == "exec.denied")
        .map(|l| l["http_status"].as_u64().unwrap())
        .collect();
    assert_eq!(denied, [400, 403, 404]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_audit_log_refuses_the_job_with_503() {
    let net = Net::start().await;
    let daemon = net.daemon(&["--audit-log", "/dev/full"]).await;
    let r = post(&net.alice, "/exec/t/echo?wait=5s", json!({"msg": "hi"})).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(
        r.json["error"].as_str().unwrap().contains("audit"),
        "{}",
        r.text
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(net.ran().is_empty(), "the job ran without its audit record");
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cancels_running_jobs_audits_them_and_exits_0() {
    let net = Net::start().await;
    let mut daemon = net.daemon(&["--shutdown-grace", "1s"]).await;
    let r = post(&net.alice, "/exec/t/sleep", json!({"secs": 300})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json["job_id"].as_str().unwrap().to_string();
    // Wait until the command really runs.
    let deadline = Instant::now() + LONG;
    while net.ran().is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sleeper = find_process_with_parent_chain(daemon.pid(), "sleep")
        .expect("the sleep command is not running under the daemon");

    let started = Instant::now();
    let signalled_at = std::time::SystemTime::now();
    let status = daemon.terminate();
    assert!(status.success(), "{status:?}");
    // Within the shutdown grace (1 s) plus the SIGTERM→SIGKILL grace (5 s)
    // plus leaving the tailnet; `sleep` dies at the SIGTERM, so this is a
    // generous bound, not a measurement.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let finished = daemon
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "exec.finished" && l["job_id"] == id.as_str())
        .expect("no exec.finished for the cancelled job");
    assert_eq!(finished["status"], "cancelled", "{finished}");
    assert_eq!(finished["exit_code"], -1);
    // The job had its grace period (1 s) before it was cancelled.
    let finished_at = humantime::parse_rfc3339(finished["ts"].as_str().unwrap()).unwrap();
    let ran_on = finished_at.duration_since(signalled_at).unwrap_or_default();
    assert!(
        ran_on >= Duration::from_millis(900),
        "cancelled {ran_on:?} after SIGTERM, before the grace period ended"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{sleeper}")).exists() && !is_zombie(sleeper) {
        assert!(Instant::now() < deadline, "the command survived the daemon");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_listens_on_no_host_tcp_port() {
    let net = Net::start().await;
    let daemon = net.daemon(&[]).await;
    // It serves on the tailnet...
    let r = get(&net.alice, "/health").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["status"], "ok");
    // ...and holds no listening TCP socket on the host.
    let inodes = socket_inodes(daemon.pid());
    assert!(
        !inodes.is_empty(),
        "found no sockets at all: the check would be vacuous"
    );
    let listening = listening_tcp_inodes();
    let ours: Vec<_> = inodes.intersection(&listening).collect();
    assert!(
        ours.is_empty(),
        "the daemon listens on host TCP sockets {ours:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_sdk_request_shape_works() {
    let net = Net::start().await;
    let _daemon = net.daemon(&[]).await;
    // What tailkit.Client sends: POST, Content-Type application/octet-stream,
    // a JSON body, Host the daemon's short name.
    let call = Call {
        content_type: Some("application/octet-stream"),
        ..Call::post_json(HOST, "/exec/t/echo", &json!({"msg": "from go"}))
    };
    let r = net.alice.call(HOST, call).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json["job_id"].as_str().unwrap();
    let r = get(&net.alice, &format!("/exec/jobs/{id}?wait=10s")).await;
    assert_eq!(r.json["stdout"], "from go\n", "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_short_commands_and_sighups_neither_crashes_nor_leaves_zombies() {
    let net = Net::start().await;
    let mut daemon = net.daemon(&["--max-jobs", "400"]).await;
    let pid = daemon.pid();
    // Five clients, 60 calls each: all 300 at once, each client within the
    // per-peer connection limit.
    let mut clients = vec![net.alice.node.clone()];
    for name in ["carol", "dave", "erin", "frank"] {
        let c = Client::join(&net.localnet, name, net.dir.path())
            .await
            .unwrap();
        net.localnet.grant(&c.ips, CAP).await.unwrap();
        daemon.wait_for_grant(&c).await;
        clients.push(c.node.clone());
    }
    let hups = std::thread::spawn(move || {
        for _ in 0..200 {
            if kill(pid, Signal::SIGHUP).is_err() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    });
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..300 {
        let node = clients[i % clients.len()].clone();
        calls.spawn(async move {
            let stream = node.dial(&format!("{HOST}:80")).await?;
            tailkitd::client::send(
                stream,
                Call::post_json(HOST, "/exec/t/true?wait=30s", &json!({})),
                LONG,
            )
            .await
            .map_err(|e| tailkitd::tailnet::BridgeError::Io(std::io::Error::other(e)))
        });
    }
    let mut completed = 0;
    while let Some(r) = calls.join_next().await {
        let r = r.unwrap().unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["status"], "completed", "{}", r.text);
        completed += 1;
    }
    assert!(
        hups.join().unwrap(),
        "the daemon died during the SIGHUP storm"
    );
    assert_eq!(completed, 300);
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon exited"
    );
    let r = get(&net.alice, "/health").await;
    assert_eq!(r.status, 200);
    // No zombies: every child the daemon started has been reaped.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let zombies = zombie_children(pid);
        if zombies.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "zombie children: {zombies:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_hold_every_connection() {
    let net = Net::start().await;
    let _daemon = net.daemon(&[]).await;
    let limit = tailkitd::server::MAX_CONNECTIONS_PER_PEER;
    // bob holds the limit of idle connections (no request yet)...
    let mut held = Vec::new();
    for _ in 0..limit {
        held.push(net.bob.node.dial(&format!("{HOST}:80")).await.unwrap());
    }
    // ...his next one is answered 429 without running anything...
    let r = get(&net.bob, "/health").await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.retry_after, Some(1));
    // ...and more idle ones than the daemon has slots in all take none of
    // them: alice is served as usual.
    for _ in 0..tailkitd::server::MAX_CONNECTIONS {
        held.push(net.bob.node.dial(&format!("{HOST}:80")).await.unwrap());
    }
    // Were bob's idle connections holding slots, alice would wait for the
    // 10 s header timeout to free one; she is answered well before.
    let stream = net.alice.node.dial(&format!("{HOST}:80")).await.unwrap();
    let r = tailkitd::client::send(stream, Call::get(HOST, "/health"), Duration::from_secs(5))
        .await
        .expect("alice was starved by bob's connections");
    assert_eq!(r.status, 200, "{}", r.text);
    drop(held);
    let deadline = Instant::now() + LONG;
    while get(&net.bob, "/health").await.status != 200 {
        assert!(
            Instant::now() < deadline,
            "bob's slots were never given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_audit_log() {
    let net = Net::start().await;
    let daemon = net.daemon(&[]).await;
    let r = post(
        &net.alice,
        "/exec/t/echo?wait=10s",
        json!({"msg": "before"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let rotated = daemon.audit.with_extension("jsonl.1");
    std::fs::rename(&daemon.audit, &rotated).unwrap();
    kill(daemon.pid(), Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + LONG;
    while !daemon.audit.exists() {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reopen the audit log"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = post(&net.alice, "/exec/t/echo?wait=10s", json!({"msg": "after"})).await;
    assert_eq!(r.status, 200, "{}", r.text);

    let old = std::fs::read_to_string(&rotated).unwrap();
    assert_eq!(old.lines().count(), 2, "{old}");
    assert!(old.contains("\"before\""));
    let new = daemon.audit_lines();
    let events: Vec<&str> = new.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["exec.accepted", "exec.finished"]);
    assert_eq!(new[0]["args"]["msg"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_log_of_dash_goes_to_stdout() {
    let net = Net::start().await;
    let daemon = net.daemon(&["--audit-log", "-"]).await;
    let r = post(
        &net.alice,
        "/exec/t/echo?wait=10s",
        json!({"msg": "to stdout"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let id = r.json["job_id"].as_str().unwrap().to_string();
    for event in ["exec.accepted", "exec.finished"] {
        let line = next_line(&daemon.stdout, event, |_| true).await;
        let v: Value = serde_json::from_str(&line).expect("stdout carries only JSON lines");
        assert_eq!(v["event"], event);
        assert_eq!(v["job_id"], id.as_str());
    }
}

/// Starts a daemon with no auth key on an interactive-login tailnet and
/// returns it once up, approving its login URL if it prints one (and
/// whether it did).
async fn daemon_logged_in(localnet: &Localnet, dir: &Path, extra: &[&str]) -> (Daemon, bool) {
    let daemon = Daemon::spawn(dir, localnet.control_url(), None, extra);
    let deadline = Instant::now() + LONG;
    let mut asked = false;
    loop {
        let out = daemon.stdout.lock().unwrap().try_recv();
        if let Ok(line) = out
            && line.starts_with("tailkitd up:")
        {
            let _ = daemon.up_line.set(line);
            return (daemon, asked);
        }
        let urls: Vec<String> = daemon
            .stderr
            .lock()
            .unwrap()
            .try_iter()
            .filter(|l| l.trim_start().starts_with("http"))
            .collect();
        for url in urls {
            localnet.approve_login(url.trim()).await.unwrap();
            asked = true;
        }
        assert!(Instant::now() < deadline, "the daemon never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ephemeral_daemon_logs_out_when_it_stops() {
    let localnet = Localnet::start_with(LocalnetOptions {
        interactive_login: true,
    })
    .await
    .unwrap();
    // A regular node keeps its identity across a restart...
    let regular = tempfile::tempdir().unwrap();
    let (mut d, asked) = daemon_logged_in(&localnet, regular.path(), &[]).await;
    assert!(asked, "a new node must log in");
    assert!(d.terminate().success());
    let (mut d, asked) = daemon_logged_in(&localnet, regular.path(), &[]).await;
    assert!(!asked, "a regular node lost its login on restart");
    assert!(d.terminate().success());
    // ...an ephemeral one logs out when it stops (tsnet does so on close,
    // which the daemon waits for): it must log in anew. A real control
    // server deletes the node at that logout.
    let ephemeral = tempfile::tempdir().unwrap();
    let (mut d, asked) = daemon_logged_in(&localnet, ephemeral.path(), &["--ephemeral"]).await;
    assert!(asked, "a new node must log in");
    assert!(d.terminate().success());
    let (mut d, asked) = daemon_logged_in(&localnet, ephemeral.path(), &["--ephemeral"]).await;
    assert!(
        asked,
        "the ephemeral node was still logged in after it stopped"
    );
    assert!(d.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_auth_key_the_login_url_is_printed_and_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let localnet = Localnet::start_with(LocalnetOptions {
        interactive_login: true,
    })
    .await
    .unwrap();
    let daemon = Daemon::spawn(dir.path(), localnet.control_url(), None, &[]);
    let line = next_line(&daemon.stderr, "login URL", |l| {
        l.trim_start().starts_with("http")
    })
    .await;
    let url = line.trim().to_string();
    // Not up before someone logs in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        daemon.stdout.lock().unwrap().try_recv().is_err(),
        "up without login"
    );
    localnet.approve_login(&url).await.unwrap();
    let up = daemon.wait_up().await;
    assert!(up.contains(&format!("name={HOST}.")), "{up}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localnet_command_lets_curl_call_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let mut localnet = Command::new(env!("CARGO_BIN_EXE_tailkitd"))
        .args([
            "localnet",
            "--clients",
            "2",
            "--grant",
            "alice=example.com/cap/x",
        ])
        .env("RUST_LOG", "tailkitd=warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Mutex::new(line_reader(localnet.stdout.take().unwrap()));
    let info: Value =
        serde_json::from_str(&next_line(&lines, "localnet JSON", |l| l.starts_with('{')).await)
            .unwrap();
    let control = info["control_url"].as_str().unwrap();
    let key = info["auth_key"].as_str();
    let clients = info["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 2);
    assert_eq!(clients[0]["name"], "alice");
    assert_eq!(clients[1]["user"], "bob@localnet");

    let daemon = Daemon::spawn(dir.path(), control, key, &[]);
    daemon.wait_up().await;
    let curl = |client: &Value, args: &[&str]| {
        let proxy_user = format!(
            "{}:{}",
            client["socks5_user"].as_str().unwrap(),
            client["socks5_password"].as_str().unwrap()
        );
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--socks5-hostname"])
            .arg(client["socks5"].as_str().unwrap())
            .args(["--proxy-user", &proxy_user])
            .args(args)
            .output()
            .expect("curl is installed");
        assert!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let deadline = Instant::now() + LONG;
    loop {
        let tools = curl(&clients[0], &[&format!("http://{HOST}/tools")]);
        if tools.contains("\"echo\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice's grant never arrived: {tools}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = format!("http://{HOST}/exec/t/echo?wait=10s");
    let ran = curl(&clients[0], &["--json", r#"{"msg":"via curl"}"#, &url]);
    let ran: Value = serde_json::from_str(&ran).unwrap();
    assert_eq!(ran["status"], "completed", "{ran}");
    assert_eq!(ran["stdout"], "via curl\n");
    let denied = curl(&clients[1], &["--json", r#"{"msg":"via curl"}"#, &url]);
    assert!(denied.contains(CAP), "{denied}");
    // A browser-style form post is refused before anything runs.
    let form = curl(&clients[0], &["-d", "msg=hi", &url]);
    assert!(form.contains("curl --json"), "{form}");

    kill(Pid::from_raw(localnet.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut localnet, LONG).expect("localnet did not stop on SIGTERM");
    assert!(status.success(), "{status:?}");
    drop(daemon);
}

#[test]
fn demo_runs_end_to_end_and_exits_0() {
    let out = Command::new(env!("CARGO_BIN_EXE_tailkitd"))
        .arg("demo")
        // Settings exported for a real daemon must not reach the demo's.
        .env("TAILKITD_PORT", "8080")
        .env("TAILKITD_REQUIRE_CAP", "true")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "403 Forbidden",
        "400 Bad Request",
        "exec.accepted",
        "exec.denied",
        "exec.finished",
        "demo finished",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
}

// ---------------------------------------------------------------------------
// /proc helpers

fn socket_inodes(pid: Pid) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let Ok(target) = std::fs::read_link(entry.unwrap().path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
        {
            inodes.insert(inode.parse().unwrap());
        }
    }
    inodes
}

/// Inodes of TCP sockets in LISTEN state (st = 0A), IPv4 and IPv6.
fn listening_tcp_inodes() -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9 && fields[3] == "0A" {
                inodes.insert(fields[9].parse().unwrap());
            }
        }
    }
    inodes
}

fn is_zombie(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|p| p.state == 'Z')
}

fn zombie_children(parent: Pid) -> Vec<i32> {
    proc_stats()
        .into_iter()
        .filter(|p| p.state == 'Z' && p.ppid == parent.as_raw())
        .map(|p| p.pid)
        .collect()
}

/// A process named `comm` whose ancestors include `ancestor`.
fn find_process_with_parent_chain(ancestor: Pid, comm: &str) -> Option<i32> {
    let parents: BTreeMap<i32, i32> = proc_stats().into_iter().map(|p| (p.pid, p.ppid)).collect();
    let descends = |pid: i32| {
        let mut cur = pid;
        for _ in 0..10 {
            match parents.get(&cur) {
                Some(&parent) if parent == ancestor.as_raw() => return true,
                Some(&parent) => cur = parent,
                None => return false,
            }
        }
        false
    };
    parents.keys().copied().find(|&pid| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
            && descends(pid)
    })
}
