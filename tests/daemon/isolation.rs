//! What a command inherits from the real daemon, and what it can reach:
//! the soft limit of open files and the signal dispositions the daemon was
//! started with (not the Go runtime's raised limit, not the ignored signals
//! of whoever started it), and, run as another user, nothing of the
//! daemon's (its signals, environment, state dir, audit log); run as the
//! daemon's own user, still not its memory or environment, nor those of
//! its supervisor and launcher (nor their `oom_score_adj`).

use super::*;

/// Tools of these tests, beside the common ones.
const ISOLATION_TOOLS: &str = r#"{
  "name": "iso",
  "commands": [
    {"name": "inherited", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "grep 'Max open files' /proc/self/limits; grep -E '^Sig(Ign|Blk)' /proc/self/status"]},
    {"name": "probe", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "id -u\nkill -0 \"$1\" 2>/dev/null && echo signalled-the-daemon\nfor p in $(pgrep -u 0 -x tailkitd-launch); do kill -0 \"$p\" 2>/dev/null && echo signalled-tailkitd-launch; done\ncat \"/proc/$1/environ\" >/dev/null 2>&1 && echo read-the-environ\nls \"$2\" >/dev/null 2>&1 && echo listed-the-state-dir\ncat \"$3\" >/dev/null 2>&1 && echo read-the-audit-log\n(echo x >> \"$3\") 2>/dev/null && echo wrote-the-audit-log\necho end", "sh", "{{.pid}}", "{{.state}}", "{{.audit}}"],
     "args": [{"name": "pid", "type": "int"}, {"name": "state"}, {"name": "audit"}]},
    {"name": "peek", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "id -u\nsleep 30 &\ncat \"/proc/$!/environ\" >/dev/null 2>&1 && echo read-a-siblings-environ\n(exec 3<\"/proc/$!/mem\") 2>/dev/null && echo opened-a-siblings-memory\nkill $!\ncat \"/proc/$1/environ\" >/dev/null 2>&1 && echo read-the-daemons-environ\n(exec 3<\"/proc/$1/mem\") 2>/dev/null && echo opened-the-daemons-memory\nl=$PPID; s=$(cut -d' ' -f4 /proc/$l/stat)\n[ \"$(cat /proc/$l/comm /proc/$s/comm)\" = \"$(printf 'tailkitd-launch\\ntailkitd-launch')\" ] || echo no-launcher-and-supervisor-above\ncat \"/proc/$l/environ\" >/dev/null 2>&1 && echo read-the-launchers-environ\n(exec 3<\"/proc/$l/mem\") 2>/dev/null && echo opened-the-launchers-memory\n(exec 3<\"/proc/$s/mem\") 2>/dev/null && echo opened-the-supervisors-memory\n(echo 900 > \"/proc/$l/oom_score_adj\") 2>/dev/null && echo adjusted-the-launchers-oom-score\n(echo 900 > \"/proc/$s/oom_score_adj\") 2>/dev/null && echo adjusted-the-supervisors-oom-score\necho end", "sh", "{{.pid}}"],
     "args": [{"name": "pid", "type": "int"}]}
  ]
}"#;

fn write_isolation_tools(dir: &Path) {
    let tools = dir.join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::write(tools.join("iso.json"), ISOLATION_TOOLS).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_get_the_daemons_original_file_limit_and_default_signals() {
    let net = Net::start().await;
    write_isolation_tools(net.dir.path());
    // Started as a shell with SIGTSTP and SIGTTOU ignored and a soft limit
    // of 1024 would start it; Go raises the daemon's own limit at once.
    let daemon = DaemonProcess::spawn_wrapped(
        net.dir.path(),
        net.localnet.control_url(),
        net.localnet.auth_key(),
        &[],
        &[],
        &[
            "/bin/sh",
            "-c",
            "trap '' TSTP TTOU; ulimit -Sn 1024; exec \"$0\" \"$@\"",
        ],
    );
    daemon.wait_up().await;
    daemon.wait_for_grant(&net.alice).await;
    let daemon_limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let daemon_soft: u64 = daemon_limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        daemon_soft > 1024,
        "Go did not raise the daemon's limit: {daemon_limits}"
    );

    let r = post(&net.alice, "/exec/iso/inherited?wait=30s", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "completed", "{}", r.text);
    let out = r.json["stdout"].as_str().unwrap();
    let soft: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(soft.get(3), Some(&"1024"), "{out}");
    let mask = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap()
    };
    assert_eq!(mask("SigBlk:"), 0, "{out}");
    // glibc's posix_spawn leaves its two internal signals (32, 33, which
    // programs cannot use) ignored in every child; every other one is at
    // its default.
    assert_eq!(mask("SigIgn:") & !(0b11 << 31), 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_run_as_nobody_cannot_reach_the_daemon() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root (to run commands as another user)");
        return;
    }
    let net = Net::start().await;
    // Everything but the daemon's own state dir and audit log may be
    // traversed, so that only their own modes keep the command out.
    std::fs::set_permissions(
        net.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    write_isolation_tools(net.dir.path());
    let daemon = net.daemon(&["--command-user", "65534:65534"]).await;
    let state = net.dir.path().join("daemon-state");
    let r = post(
        &net.alice,
        "/exec/iso/probe?wait=30s",
        json!({
            "pid": daemon.pid().as_raw(),
            "state": state.display().to_string(),
            "audit": daemon.audit.display().to_string(),
        }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "completed", "{}", r.text);
    assert_eq!(r.json["stdout"], "65534\nend\n", "{}", r.text);
    // The modes that keep it out.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&daemon.audit), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_of_the_daemons_own_user_cannot_read_its_memory() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root (to start the daemon as another user)");
        return;
    }
    let net = Net::start().await;
    write_isolation_tools(net.dir.path());
    // The daemon runs as nobody, and so do its commands (no
    // --command-user): the same user, which may signal the daemon but must
    // not read its memory (its auth key, its node keys).
    std::os::unix::fs::chown(net.dir.path(), Some(65534), Some(65534)).unwrap();
    let daemon = DaemonProcess::spawn_wrapped(
        net.dir.path(),
        net.localnet.control_url(),
        net.localnet.auth_key(),
        &[],
        &[],
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
    );
    daemon.wait_up().await;
    daemon.wait_for_grant(&net.alice).await;
    let r = post(
        &net.alice,
        "/exec/iso/peek?wait=30s",
        json!({"pid": daemon.pid().as_raw()}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "completed", "{}", r.text);
    // Another process of that user is open to it; the daemon, its
    // supervisor and its launcher are not.
    assert_eq!(
        r.json["stdout"], "65534\nread-a-siblings-environ\nopened-a-siblings-memory\nend\n",
        "{}",
        r.text
    );
}
