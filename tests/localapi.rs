//! The LocalAPI client against a real `tailscaled` (userspace networking) on
//! the embedded local tailnet, next to the real `tailkitd run` daemon: the
//! daemon shows up in tailscaled's peer list and answers `GET /health` over
//! a connection tailscaled dials; `tailkitd call` and `tailkitd tools`
//! work through it (one node, a prefix, `--async`, `--follow`, `--cancel`),
//! as tailscaled's node.
//!
//! Needs the `tailscaled` and `tailscale` binaries of the tailscale.com
//! version the bridge pins, in the directory `TAILKITD_TEST_TAILSCALED`
//! names, and a loopback-only network namespace; without either it says why
//! and passes. `scripts/tailscaled-localnet` builds the binaries and runs it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tailkitd::client::{self, Call};
use tailkitd::localapi::{LocalApi, LocalApiError, Status};

const LONG: Duration = Duration::from_secs(90);
const ENV: &str = "TAILKITD_TEST_TAILSCALED";

/// The binaries' directory, or why the test cannot run here.
fn tailscaled_dir() -> Result<PathBuf, String> {
    let dir = std::env::var_os(ENV).map(PathBuf::from).ok_or(format!(
        "{ENV} is not set (scripts/tailscaled-localnet sets it)"
    ))?;
    for bin in ["tailscaled", "tailscale"] {
        if !dir.join(bin).is_file() {
            return Err(format!("{} does not exist", dir.join(bin).display()));
        }
    }
    // tailscaled on defaults talks to the internet; here it must not be able to.
    let dev = std::fs::read_to_string("/proc/self/net/dev").map_err(|e| e.to_string())?;
    let others: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .filter(|name| *name != "lo")
        .collect();
    if !others.is_empty() {
        return Err(format!(
            "the network namespace has interfaces besides lo ({}); run it in a \
             loopback-only one (scripts/tailscaled-localnet)",
            others.join(", ")
        ));
    }
    Ok(dir)
}

/// A child process killed on drop; its output goes to a log file that is
/// printed when the test fails.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc { name, child, log }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("--- last lines of {} ---", self.name);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// The stdout lines of `child`, read on a thread.
fn stdout_lines(child: &mut Child) -> Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            eprintln!("| {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

/// The first line from `lines` that starts with `prefix`.
async fn line_starting(lines: Receiver<String>, prefix: &str) -> String {
    let prefix = prefix.to_string();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + LONG;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.starts_with(&prefix) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!("no line {prefix:?} within {LONG:?}"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the process ended before printing {prefix:?}")
                }
            }
        }
    })
    .await
    .unwrap()
}

/// Polls tailscaled's status until `ok` holds for it.
async fn wait_status(api: &LocalApi, what: &str, ok: impl Fn(&Status) -> bool) -> Status {
    let deadline = Instant::now() + LONG;
    loop {
        let last = match api.status().await {
            Ok(st) if ok(&st) => return st,
            Ok(st) => format!("{st:?}"),
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "{what}: not within {LONG:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_tailscaled_lists_the_daemon_and_dials_it() {
    let bins = match tailscaled_dir() {
        Ok(dir) => dir,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let tailkitd = env!("CARGO_BIN_EXE_tailkitd");

    // The local tailnet, from the real binary: one JSON line.
    let mut localnet = Proc::spawn(
        "localnet",
        Command::new(tailkitd)
            .args(["localnet", "--clients", "0"])
            .stdout(Stdio::piped()),
        dir.path(),
    );
    let line = line_starting(stdout_lines(&mut localnet.child), "{").await;
    let info: serde_json::Value = serde_json::from_str(&line).unwrap();
    let control_url = info["control_url"].as_str().unwrap().to_string();
    let auth_key = info["auth_key"].as_str().unwrap().to_string();

    // tailscaled in userspace mode, no log upload, network assumed up (the
    // namespace has only loopback), no port mapping, in-memory state, and
    // every file in the temp dir: without TS_LOGS_DIR it writes its log ID
    // to /var/lib/tailscale (the namespace shares the host's file system).
    let socket = dir.path().join("tailscaled.sock");
    let state_dir = dir.path().join("ts");
    std::fs::create_dir(&state_dir).unwrap();
    let _tailscaled = Proc::spawn(
        "tailscaled",
        Command::new(bins.join("tailscaled"))
            .arg("--tun=userspace-networking")
            .arg(format!("--socket={}", socket.display()))
            .arg("--state=mem:")
            .arg(format!("--statedir={}", state_dir.display()))
            .arg("--port=0")
            .arg("--no-logs-no-support")
            .env("TS_LOGS_DIR", &state_dir)
            .env("TS_NO_LOGS_NO_SUPPORT", "true")
            .env("TS_ASSUME_NETWORK_UP_FOR_TEST", "true")
            .env("TS_DISABLE_PORTMAPPER", "true")
            .stdout(Stdio::null()),
        dir.path(),
    );
    let api = LocalApi::new(&socket).with_timeout(Duration::from_secs(20));
    let st = wait_status(&api, "tailscaled answers", |_| true).await;
    assert!(!st.tun, "userspace networking: {st:?}");
    eprintln!(
        "tailscaled {} answers ({:?})",
        st.version,
        started.elapsed()
    );

    let up = tokio::process::Command::new(bins.join("tailscale"))
        .arg(format!("--socket={}", socket.display()))
        .args(["up", "--hostname=ops", "--timeout=60s"])
        .arg(format!("--login-server={control_url}"))
        .arg(format!("--authkey={auth_key}"))
        .env("TS_NO_LOGS_NO_SUPPORT", "true")
        .output()
        .await
        .unwrap();
    assert!(
        up.status.success(),
        "tailscale up: {}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    eprintln!("tailscale up ({:?})", started.elapsed());

    // The daemon, its own tsnet node on the same tailnet.
    let mut daemon = Proc::spawn(
        "tailkitd",
        Command::new(tailkitd)
            .args(["run", "--hostname", "tk", "--config", "/dev/null"])
            .arg("--state-dir")
            .arg(dir.path().join("tk"))
            .arg("--tools-dir")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tools"))
            .arg("--audit-log")
            .arg(dir.path().join("audit.jsonl"))
            .arg("--control-url")
            .arg(&control_url)
            .env("TS_AUTHKEY", &auth_key)
            .env_remove("TS_AUTHKEY_FILE")
            .stdout(Stdio::piped()),
        dir.path(),
    );
    let up_line = line_starting(stdout_lines(&mut daemon.child), "tailkitd up:").await;
    eprintln!("tailkitd up ({:?})", started.elapsed());

    // The peer list: tk, online, with the addresses the daemon reported.
    let st = wait_status(&api, "tk online in the peer list", |st| {
        st.is_running() && st.resolve("tk").is_ok_and(|p| p.online)
    })
    .await;
    eprintln!("tk in tailscaled's peer list ({:?})", started.elapsed());
    assert_eq!(st.self_node.host_name, "ops");
    assert_eq!(st.magic_dns_suffix, "localnet.ts.net");
    let tk = st.resolve("tk").unwrap().clone();
    assert_eq!(tk.dns_name, "tk.localnet.ts.net");
    assert_eq!(tk.user_login.as_deref(), Some("tk@localnet"));
    assert!(!tk.ips.is_empty());
    for ip in &tk.ips {
        assert!(up_line.contains(&ip.to_string()), "{ip} not in {up_line:?}");
        assert_eq!(st.resolve(&ip.to_string()).unwrap().id, tk.id);
    }
    assert_eq!(st.resolve("tk.localnet.ts.net.").unwrap().id, tk.id);
    let with_t: Vec<&str> = st.online_with_prefix("t").map(|p| p.id.as_str()).collect();
    assert_eq!(with_t, [tk.id.as_str()]);
    assert!(matches!(
        st.resolve("nope"),
        Err(LocalApiError::PeerNotFound { .. })
    ));

    // GET /health through a connection tailscaled dials: by address, by
    // MagicDNS name and by short name.
    let addr = tk.addr().unwrap().to_string();
    for host in [addr.as_str(), "tk.localnet.ts.net", "tk"] {
        let stream = api
            .dial(host, 80)
            .await
            .unwrap_or_else(|e| panic!("dial {host}: {e}"));
        let resp = client::send(stream, Call::get("tk", "/health"), LONG)
            .await
            .unwrap();
        assert_eq!(resp.status, StatusCode::OK, "{host}: {}", resp.text);
        assert_eq!(resp.json["hostname"], "tk", "{host}: {}", resp.text);
        assert_eq!(resp.json["status"], "ok", "{host}: {}", resp.text);
        eprintln!("GET /health via {host} ({:?})", started.elapsed());
    }

    // Failures, as tailscaled reports them.
    match api.dial(&addr, 81).await {
        Err(LocalApiError::Status { status, body, .. }) => {
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
            assert!(body.starts_with("dial failure:"), "{body}");
        }
        other => panic!("dial to a closed port: {other:?}"),
    }
    match api.dial("127.0.0.1", 9).await {
        Err(e @ LocalApiError::NotOnTailnet { .. }) => {
            assert_eq!(
                e.to_string(),
                "127.0.0.1 is not on the tailnet (tailscaled resolved it to 127.0.0.1:9)"
            );
        }
        other => panic!("dial to loopback: {other:?}"),
    }

    // `tailkitd call` and `tailkitd tools` through this tailscaled: the
    // daemon sees the call come from tailscaled's node, ops.
    let client = |args: &[&str]| {
        let out = Command::new(tailkitd)
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .env_remove("TS_AUTHKEY")
            .env_remove("TS_AUTHKEY_FILE")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!(
            "$ tailkitd {}\n{stdout}{stderr}-> {:?}",
            args.join(" "),
            out.status
        );
        (out.status.code().unwrap_or(-1), stdout, stderr)
    };
    let (code, out, err) = client(&["call", "tk", "demo/count", "seconds=2"]);
    assert_eq!((code, out.as_str()), (0, "tick 1\ntick 2\n"), "{err}");
    let (code, out, err) = client(&["tools", "tk"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("demo/count") && out.contains("[seconds=INT (5)]"),
        "{out}"
    );
    let (code, out, err) = client(&["call", "--prefix", "t", "demo/count", "seconds=1"]);
    assert_eq!((code, out.as_str()), (0, "tk: tick 1\n"), "{err}");
    // The same node each time: a job started earlier can be followed and
    // cancelled.
    let (code, out, err) = client(&["call", "tk", "--async", "demo/count", "seconds=2"]);
    assert_eq!(code, 0, "{err}");
    let (code, followed, err) = client(&["call", "tk", "--follow", out.trim()]);
    assert_eq!((code, followed.as_str()), (0, "tick 1\ntick 2\n"), "{err}");
    let (code, out, err) = client(&["call", "tk", "--async", "demo/count", "seconds=60"]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    let (code, _, err) = client(&["call", "tk", "--cancel", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("job {id} is cancelled")), "{err}");
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let callers: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == "exec.accepted")
        .map(|r| r["caller"]["node"].clone())
        .collect();
    assert_eq!(callers.len(), 4, "{audit}");
    assert!(
        callers.iter().all(|n| n == "ops.localnet.ts.net"),
        "{callers:?}"
    );
    eprintln!("tailkitd call through tailscaled ({:?})", started.elapsed());
    eprintln!("done ({:?})", started.elapsed());
}
