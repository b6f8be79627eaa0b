//! The daemon process fixture: the real `tailkitd run` binary, spawned as
//! a process on the embedded local tailnet, with client nodes to call it.
//! alice holds [`CAP`]; bob holds nothing.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tailkitd::client::{Call, Response};
use tailkitd::demo::Client;
use tailkitd_launch::{proc_stat, proc_stats};
use tsnet_bridge::Localnet;

use super::eventually_some;

/// The capability alice holds.
pub const CAP: &str = "example.com/cap/x";
/// The daemon's host name.
pub const HOST: &str = "tkd";
/// The hang guard of one step on the tailnet.
pub const LONG: Duration = Duration::from_secs(90);

/// The tools every test daemon serves. `MARKER` becomes a file path that a
/// command appends to, so a test can tell whether anything ran; `AUDIT`
/// the default audit log's path.
pub const TOOLS: &str = r#"{
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
pub struct Net {
    pub localnet: Localnet,
    pub dir: tempfile::TempDir,
    pub alice: Client,
    pub bob: Client,
}

impl Net {
    pub async fn start() -> Net {
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

    pub fn marker(&self) -> PathBuf {
        self.dir.path().join("marker")
    }

    /// What ran so far, one line per command start.
    pub fn ran(&self) -> Vec<String> {
        std::fs::read_to_string(self.marker())
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Starts `tailkitd run` with the test tools and `extra` flags, and
    /// waits for its "up" line and for alice's grant to reach it.
    pub async fn daemon(&self, extra: &[&str]) -> DaemonProcess {
        let daemon = DaemonProcess::spawn(
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
pub fn write_tools(dir: &Path) -> PathBuf {
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
pub fn line_reader(out: impl std::io::Read + Send + 'static) -> Receiver<String> {
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
pub async fn next_line(
    lines: &Mutex<Receiver<String>>,
    what: &str,
    pick: impl Fn(&str) -> bool,
) -> String {
    eventually_some(LONG, what, async || {
        loop {
            let got = lines.lock().unwrap().try_recv();
            match got {
                Ok(line) if pick(&line) => return Some(line),
                Ok(_) => {}
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => {
                    panic!("the process ended before printing {what}")
                }
            }
        }
    })
    .await
}

/// A `tailkitd run` process; killed when dropped.
pub struct DaemonProcess {
    pub child: Child,
    pub audit: PathBuf,
    pub stdout: Mutex<Receiver<String>>,
    pub stderr: Mutex<Receiver<String>>,
    /// `--audit-log -`: stdout is for audit lines; the up line goes to stderr.
    pub audit_on_stdout: bool,
    pub up_line: std::sync::OnceLock<String>,
}

impl DaemonProcess {
    /// Spawns `tailkitd run` as `HOST` (unless `extra` names its own
    /// `--hostname`) with state, tools and audit log in `dir` (unless
    /// `extra` names its own `--audit-log`). Its stdout and
    /// stderr are read line by line (the login URL goes to stderr).
    pub fn spawn(
        dir: &Path,
        control_url: &str,
        auth_key: Option<&str>,
        extra: &[&str],
    ) -> DaemonProcess {
        DaemonProcess::spawn_with_env(dir, control_url, auth_key, extra, &[])
    }

    /// [`Daemon::spawn`] with `env` added to its environment. Without a
    /// `--config` in `extra`, the config file is `/dev/null`.
    pub fn spawn_with_env(
        dir: &Path,
        control_url: &str,
        auth_key: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> DaemonProcess {
        DaemonProcess::spawn_wrapped(dir, control_url, auth_key, extra, env, &[])
    }

    /// [`DaemonProcess::spawn_with_env`] through `wrapper` (a program and
    /// its arguments that `exec`s the daemon's command line it is given
    /// after them, e.g. `sh -c '...; exec "$0" "$@"'`).
    pub fn spawn_wrapped(
        dir: &Path,
        control_url: &str,
        auth_key: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> DaemonProcess {
        let tools = write_tools(dir);
        let audit = dir.join("audit.jsonl");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(env!("CARGO_BIN_EXE_tailkitd"));
                cmd
            }
            None => Command::new(env!("CARGO_BIN_EXE_tailkitd")),
        };
        cmd.arg("run")
            .args(if extra.contains(&"--hostname") {
                &[][..]
            } else {
                &["--hostname", HOST][..]
            })
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
        DaemonProcess {
            child,
            audit,
            stdout,
            stderr,
            audit_on_stdout: extra.windows(2).any(|w| w == ["--audit-log", "-"]),
            up_line: std::sync::OnceLock::new(),
        }
    }

    /// Waits for the "up" line and returns it.
    pub async fn wait_up(&self) -> &str {
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

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Grants reach the daemon's netmap within moments: wait until alice's
    /// capability shows in what the daemon lets her run.
    pub async fn wait_for_grant(&self, alice: &Client) {
        self.wait_for_grant_on(alice, 80).await;
    }

    /// [`DaemonProcess::wait_for_grant`] for a daemon serving on `port`.
    pub async fn wait_for_grant_on(&self, alice: &Client, port: u16) {
        eventually_some(LONG, "alice's grant to reach the daemon", async || {
            let r = call_port(alice, port, Call::get(HOST, "/tools")).await;
            r.text.contains("\"sleep\"").then_some(())
        })
        .await
    }

    pub fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// SIGTERM, and the exit status once it exits.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        kill(self.pid(), Signal::SIGTERM).unwrap();
        wait_exit(&mut self.child, "the daemon to exit after SIGTERM").await
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The exit status of `child` once it exits (within [`LONG`]).
pub async fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    eventually_some(LONG, what, async || child.try_wait().unwrap()).await
}

/// `call` from `c` to the daemon's `port`.
pub async fn call_port(c: &Client, port: u16, call: Call<'_>) -> Response {
    let stream = c.node.dial(&format!("{HOST}:{port}")).await.unwrap();
    tailkitd::client::send(stream, call, LONG).await.unwrap()
}

pub async fn post(c: &Client, path: &str, body: Value) -> Response {
    c.call(HOST, Call::post_json(HOST, path, &body))
        .await
        .unwrap()
}

pub async fn get(c: &Client, path: &str) -> Response {
    c.call(HOST, Call::get(HOST, path)).await.unwrap()
}

// /proc helpers

pub fn socket_inodes(pid: Pid) -> HashSet<u64> {
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
pub fn listening_tcp_inodes() -> HashSet<u64> {
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

pub fn is_zombie(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|p| p.state == 'Z')
}

pub fn zombie_children(parent: Pid) -> Vec<i32> {
    proc_stats()
        .into_iter()
        .filter(|p| p.state == 'Z' && p.ppid == parent.as_raw())
        .map(|p| p.pid)
        .collect()
}

/// A child of `parent` whose command name is `comm`.
pub fn find_child_named(parent: Pid, comm: &str) -> Option<i32> {
    proc_stats()
        .into_iter()
        .filter(|p| p.ppid == parent.as_raw())
        .map(|p| p.pid)
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
        })
}

/// A process named `comm` whose ancestors include `ancestor`.
pub fn find_process_with_parent_chain(ancestor: Pid, comm: &str) -> Option<i32> {
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
