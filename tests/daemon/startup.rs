//! Starting as a new user meets it: the auth key out of every environment a
//! command can read, tsnet's environment fallbacks without effect, saying at
//! once what is missing, stopping at once on SIGTERM in every state, and
//! plain errors that name the bad setting.

use super::*;

/// A tool whose command prints the environment the process `pid` started
/// with (`/proc/PID/environ`), then its own.
const ENVIRON_TOOL: &str = r#"{
  "name": "env",
  "commands": [
    {"name": "environ", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "tr '\\000' '\\n' < /proc/$1/environ; echo ---; env", "sh", "{{.pid}}"],
     "timeout": "10s",
     "args": [{"name": "pid", "type": "int", "required": true}]}
  ]
}"#;

/// SIGTERM to `daemon`: its exit status and how long it took.
async fn stop_timed(daemon: &mut DaemonProcess) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    let status = daemon.terminate().await;
    (status, started.elapsed())
}

/// Stopping must take well under the systemd unit's 30 s whatever the
/// daemon is doing; the daemon aims at 1 s. A hang guard, not a benchmark:
/// generous for a loaded machine, and far below the 10-25 s a join attempt
/// used to hold the exit.
const STOP_GUARD: Duration = Duration::from_secs(8);

fn assert_stopped_quickly(what: &str, status: std::process::ExitStatus, took: Duration) {
    eprintln!("SIGTERM while {what}: exit after {took:?}");
    assert!(status.success(), "{what}: {status:?}");
    assert!(took < STOP_GUARD, "{what}: SIGTERM took {took:?}");
}

/// The daemon's stderr lines so far (read without waiting).
fn stderr_so_far(daemon: &DaemonProcess) -> Vec<String> {
    daemon.stderr.lock().unwrap().try_iter().collect()
}

/// Calls `env/environ` for the daemon's own pid and returns what the command
/// printed.
async fn environ_seen_by_a_command(net: &Net, daemon: &DaemonProcess) -> String {
    let r = post(
        &net.alice,
        "/exec/env/environ?wait=30s",
        json!({"pid": daemon.pid().as_raw()}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "completed", "{}", r.text);
    r.json["stdout"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_key_is_in_no_environment_a_command_can_read() {
    let net = Net::start().await;
    let key = net.localnet.auth_key().unwrap().to_string();

    // The key in TS_AUTHKEY.
    std::fs::create_dir_all(net.dir.path().join("tools")).unwrap();
    std::fs::write(net.dir.path().join("tools/env.json"), ENVIRON_TOOL).unwrap();
    let daemon = net.daemon(&[]).await;
    // Re-executed (the key was in its environment) under its own name.
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", daemon.pid())).unwrap();
    assert_eq!(comm.trim_end(), "tailkitd");
    let seen = environ_seen_by_a_command(&net, &daemon).await;
    assert!(
        seen.contains("TAILKITD_AUTHKEY_FD="),
        "the daemon was not re-executed:\n{seen}"
    );
    assert!(
        seen.contains("RUST_LOG=tailkitd=debug"),
        "the command could not read the daemon's environ:\n{seen}"
    );
    assert!(!seen.contains(&key), "the key is readable:\n{seen}");
    assert!(!seen.contains("TS_AUTHKEY"), "{seen}");
    drop(daemon);

    // The key in a file named by TS_AUTHKEY_FILE: the variable goes too.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tools")).unwrap();
    std::fs::write(dir.path().join("tools/env.json"), ENVIRON_TOOL).unwrap();
    let key_file = dir.path().join("authkey");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let daemon = DaemonProcess::spawn_with_env(
        dir.path(),
        net.localnet.control_url(),
        None,
        &[],
        &[("TS_AUTHKEY_FILE", key_file.to_str().unwrap())],
    );
    daemon.wait_up().await;
    daemon.wait_for_grant(&net.alice).await;
    let seen = environ_seen_by_a_command(&net, &daemon).await;
    assert!(seen.contains("RUST_LOG=tailkitd=debug"), "{seen}");
    assert!(!seen.contains(&key), "the key is readable:\n{seen}");
    assert!(!seen.contains("TS_AUTHKEY"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tsnet_environment_fallbacks_have_no_effect() {
    let net = Net::start().await;

    // A bogus control URL and key in tsnet's own variables: the daemon
    // joins the tailnet its settings name, with the key they give.
    let mut daemon = DaemonProcess::spawn_with_env(
        net.dir.path(),
        net.localnet.control_url(),
        net.localnet.auth_key(),
        &[],
        &[
            ("TS_CONTROL_URL", "http://127.0.0.1:1"),
            ("TS_AUTH_KEY", "tskey-auth-bogus"),
        ],
    );
    daemon.wait_up().await;
    daemon.wait_for_grant(&net.alice).await;
    assert_eq!(get(&net.alice, "/health").await.status, 200);
    assert!(daemon.terminate().await.success());

    // A blank TS_AUTHKEY, which the daemon's settings ignore, is no key for
    // tsnet either: a new node asks for interactive login.
    let login = Localnet::start_with(LocalnetOptions {
        interactive_login: true,
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::spawn_with_env(
        dir.path(),
        login.control_url(),
        None,
        &[],
        &[("TS_AUTHKEY", "   ")],
    );
    next_line(&daemon.stderr, "a login URL", |l| {
        l.trim_start().starts_with("http")
    })
    .await;
    drop(daemon);

    // No control URL in the settings means Tailscale's: TS_CONTROL_URL
    // (with a key the local tailnet would take) does not redirect the
    // daemon there. In the loopback-only test namespace Tailscale's server
    // cannot be reached, which the daemon says.
    let dir = tempfile::tempdir().unwrap();
    let tools = write_tools(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_tailkitd"))
        .args(["run", "--hostname", HOST, "--config", "/dev/null"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--tools-dir")
        .arg(&tools)
        .env("TS_CONTROL_URL", net.localnet.control_url())
        .env("TS_AUTHKEY", net.localnet.auth_key().unwrap())
        .env("RUST_LOG", "tailkitd=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = Mutex::new(line_reader(child.stdout.take().unwrap()));
    let stderr = Mutex::new(line_reader(child.stderr.take().unwrap()));
    let joining = next_line(&stderr, "the control server it joins", |l| {
        l.contains("joining the tailnet")
    })
    .await;
    assert!(
        joining.contains("https://controlplane.tailscale.com"),
        "{joining}"
    );
    next_line(&stderr, "the daemon to say it cannot reach it", |l| {
        l.contains("cannot be reached") || l.contains("not on the tailnet yet")
    })
    .await;
    let up: Vec<String> = stdout.lock().unwrap().try_iter().collect();
    assert!(
        !up.iter().any(|l| l.starts_with("tailkitd up:")),
        "joined the local tailnet through TS_CONTROL_URL: {up:?}"
    );
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut child, "the daemon to stop").await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_key_or_control_server_it_says_so_and_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let mut daemon = DaemonProcess::spawn(dir.path(), "http://127.0.0.1:1", None, &[]);
    let no_key = next_line(&daemon.stderr, "that no auth key was given", |l| {
        l.contains("no auth key given")
    })
    .await;
    assert!(no_key.contains("no saved node state"), "{no_key}");
    let unreachable = next_line(
        &daemon.stderr,
        "that the control server is unreachable",
        |l| l.contains("cannot be reached"),
    )
    .await;
    assert!(unreachable.contains("http://127.0.0.1:1"), "{unreachable}");
    let (status, took) = stop_timed(&mut daemon).await;
    assert_stopped_quickly(
        "joining an unreachable control server without a key",
        status,
        took,
    );

    // With a key, joining an unreachable control server.
    let dir = tempfile::tempdir().unwrap();
    let mut daemon =
        DaemonProcess::spawn(dir.path(), "http://127.0.0.1:1", Some("tskey-auth-x"), &[]);
    next_line(
        &daemon.stderr,
        "that the control server is unreachable",
        |l| l.contains("cannot be reached"),
    )
    .await;
    assert!(
        !stderr_so_far(&daemon)
            .iter()
            .any(|l| l.contains("no auth key given")),
        "a key was given"
    );
    let (status, took) = stop_timed(&mut daemon).await;
    assert_stopped_quickly("joining with a key", status, took);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_daemon_at_once_while_waiting_for_login_and_while_running() {
    let login = Localnet::start_with(LocalnetOptions {
        interactive_login: true,
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = DaemonProcess::spawn(dir.path(), login.control_url(), None, &[]);
    next_line(&daemon.stderr, "a login URL", |l| {
        l.trim_start().starts_with("http")
    })
    .await;
    let (status, took) = stop_timed(&mut daemon).await;
    assert_stopped_quickly("waiting for login", status, took);

    let net = Net::start().await;
    let mut daemon = net.daemon(&[]).await;
    let (status, took) = stop_timed(&mut daemon).await;
    assert_stopped_quickly("running (no jobs)", status, took);
}

/// `tailkitd run` with `args` and `env`, which must fail before joining
/// anything: its exit code and stderr.
fn run_failing(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tailkitd"))
        .arg("run")
        .args(args)
        .envs(env.iter().copied())
        .env_remove("TS_AUTHKEY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_settings_are_named_plainly() {
    // A bad value from the environment names the variable.
    let (code, err) = run_failing(&[], &[("TAILKITD_REQUIRE_CAP", "maybe")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("TAILKITD_REQUIRE_CAP"), "{err}");
    assert!(err.contains("maybe"), "{err}");
    // The same from the flag names the flag.
    let (code, err) = run_failing(&["--require-cap=maybe"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--require-cap"), "{err}");
    assert!(!err.contains("TAILKITD_REQUIRE_CAP"), "{err}");
    let (_, err) = run_failing(&[], &[("TAILKITD_PORT", "eighty")]);
    assert!(err.contains("TAILKITD_PORT"), "{err}");

    // A missing config file: its cause once, and no stack trace even with
    // RUST_BACKTRACE set.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let (code, err) = run_failing(
        &["--config", missing.to_str().unwrap()],
        &[("RUST_BACKTRACE", "1")],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.starts_with("tailkitd: "), "{err}");
    assert!(err.contains("nope.toml"), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
