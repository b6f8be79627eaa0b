//! The command line: settings precedence, `run --help`, `tailkitd localnet` with curl, and the demo.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_beats_the_config_file_which_beats_the_defaults() {
    let net = Net::start().await;
    let config = net.dir.path().join("tailkitd.toml");
    std::fs::write(&config, "port = 8081\nrequire_cap = true\n").unwrap();
    let daemon = DaemonProcess::spawn_with_env(
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

    let daemon = DaemonProcess::spawn(dir.path(), control, key, &[]);
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
    eventually(LONG, "alice's grant to arrive", || {
        curl(&clients[0], &[&format!("http://{HOST}/tools")]).contains("\"echo\"")
    })
    .await;
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
    let status = wait_exit(&mut localnet, "localnet to stop on SIGTERM").await;
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
