//! What the benches that run `tailkitd run` on the local tailnet share:
//! their runtime, a tools directory, starting a daemon and waiting for its
//! "up" line and for a caller's grant, and stopping it.
// Each bench uses a part.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tailkitd::client::Call;
use tailkitd::demo::Client;
use tsnet_bridge::Localnet;

/// Runs a bench's body on a multi-threaded runtime.
pub fn block_on(body: impl Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(body);
}

/// The local tailnet with one client node, alice, granted `cap` toward
/// every node; her state goes in `dir`.
pub async fn tailnet_with_alice(dir: &Path, cap: &str) -> (Localnet, Client) {
    let localnet = Localnet::start().await.expect("local tailnet");
    let alice = Client::join(&localnet, "alice", dir)
        .await
        .expect("client node");
    localnet.grant(&alice.ips, cap).await.expect("grant");
    (localnet, alice)
}

/// Writes `json` as the one tool file `name` of a new `dir/tools`; returns
/// that directory.
pub fn write_tools(dir: &Path, name: &str, json: &str) -> PathBuf {
    let tools = dir.join("tools");
    std::fs::create_dir(&tools).expect("tools dir");
    std::fs::write(tools.join(name), json).expect("tool file");
    tools
}

/// A `tailkitd run` process, SIGKILLed if the bench panics half-way.
pub struct Daemon {
    child: Child,
    /// Its "tailkitd up: ..." line, once [`Daemon::wait_up`] read it.
    pub up: String,
}

impl Daemon {
    /// Starts `bin run --hostname HOST` on the local tailnet with its state
    /// in `state`, tools from `tools`, `extra` flags and `RUST_LOG=rust_log`;
    /// does not wait for it.
    pub fn spawn<S: AsRef<OsStr>>(
        bin: impl AsRef<OsStr>,
        host: &str,
        localnet: &Localnet,
        state: &Path,
        tools: &Path,
        extra: &[S],
        rust_log: &str,
    ) -> Daemon {
        let child = Command::new(bin)
            .args(["run", "--hostname", host, "--config", "/dev/null"])
            .arg("--state-dir")
            .arg(state)
            .arg("--tools-dir")
            .arg(tools)
            .args(["--control-url", localnet.control_url()])
            .args(extra)
            .env("TS_AUTHKEY", localnet.auth_key().unwrap_or_default())
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .spawn()
            .expect("tailkitd run");
        Daemon {
            child,
            up: String::new(),
        }
    }

    /// [`Daemon::spawn`], then [`Daemon::wait_up`].
    pub fn start<S: AsRef<OsStr>>(
        bin: impl AsRef<OsStr>,
        host: &str,
        localnet: &Localnet,
        state: &Path,
        tools: &Path,
        extra: &[S],
        rust_log: &str,
    ) -> Daemon {
        let mut daemon = Daemon::spawn(bin, host, localnet, state, tools, extra, rust_log);
        daemon.wait_up();
        daemon
    }

    /// Blocks until the daemon prints its "up" line (it never comes if the
    /// daemon exits first: the bench stops there).
    pub fn wait_up(&mut self) -> &str {
        let stdout = self.child.stdout.take().expect("stdout");
        self.up = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("tailkitd up:"))
            .expect("the daemon came up");
        &self.up
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and waits for it to exit.
    pub fn terminate(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (a minute at most) until `client`'s `GET /tools` on `host` names
/// `command`: the caller's grant has reached the daemon.
pub async fn wait_for_grant(client: &Client, host: &str, command: &str) {
    let needle = format!("\"{command}\"");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = client
            .call(host, Call::get(host, "/tools"))
            .await
            .expect("GET /tools");
        if r.text.contains(&needle) {
            return;
        }
        assert!(Instant::now() < deadline, "grant never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
