//! `tailkitd call` and `tailkitd tools`: the real binary as the client,
//! joining the local tailnet as an ephemeral node of its own (auth key and
//! `--control-url`), against real daemon processes. The client is a new
//! node on every run, so the capability is granted up front to every
//! address the local tailnet hands out (100.64.0.1 to .254).

use super::*;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::process::Output;

/// Commands for these tests, beside the fixture's `t` tool.
const CLIENT_TOOLS: &str = r#"{
  "name": "c",
  "version": "1.0.0",
  "commands": [
    {"name": "out", "description": "stdout, stderr and an exit code", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "echo out1; echo err1 >&2; echo out2; exit \"$1\"", "sh", "{{.code}}"],
     "timeout": "10s",
     "args": [{"name": "code", "type": "int", "required": true}]},
    {"name": "slow", "description": "outlives its timeout", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "echo slow >> MARKER; exec sleep 60"], "timeout": "1s"},
    {"name": "locked", "description": "nobody holds its capability", "acl_cap": "example.com/cap/nobody",
     "exec_parts": ["/bin/true"], "timeout": "1s"},
    {"name": "live", "description": "waits for a file after its first line", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "echo first; while [ ! -e FLAG ]; do sleep 0.05; done; echo second"],
     "timeout": "2m"},
    {"name": "forever", "description": "a line every 50 ms", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "while true; do echo tick; sleep 0.05; done"], "timeout": "2m"},
    {"name": "barrier", "description": "ends once N jobs wait at the barrier", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "touch BARRIER/$TAILKIT_JOB_ID; until [ $(ls BARRIER | wc -l) -ge \"$1\" ]; do sleep 0.05; done; echo through", "sh", "{{.n}}"],
     "timeout": "2m",
     "args": [{"name": "n", "type": "int", "required": true}]}
  ]
}"#;

/// Grants CAP to every address a node of the local tailnet can get, so
/// that each client run (a new node) holds it.
async fn grant_everyone(net: &Net) {
    let ips: Vec<IpAddr> = (1..=254u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(100, 64, 0, i)))
        .collect();
    net.localnet.grant(&ips, CAP).await.unwrap();
}

/// Writes the client test tools into `dir/tools` (beside the fixture's).
fn write_client_tools(dir: &Path, shared: &Path) {
    let tools = dir.join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::create_dir_all(shared.join("barrier")).unwrap();
    let text = CLIENT_TOOLS
        .replace("MARKER", dir.join("marker").to_str().unwrap())
        .replace("FLAG", shared.join("flag").to_str().unwrap())
        .replace("BARRIER", shared.join("barrier").to_str().unwrap());
    std::fs::write(tools.join("c.json"), text).unwrap();
}

/// `tailkitd ARGS...` as a client of `net`'s local tailnet.
fn client(net: &Net, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tailkitd"));
    cmd.args(args)
        .arg("--control-url")
        .arg(net.localnet.control_url())
        .env("TS_AUTHKEY", net.localnet.auth_key().unwrap())
        .env_remove("TS_AUTHKEY_FILE")
        .env_remove("TAILKITD_CONTROL_URL")
        .env_remove("RUST_LOG")
        // No tailscaled here; the client must not look for one.
        .env("TS_SOCKET", net.dir.path().join("no-tailscaled.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs the client to the end: (exit code, stdout, stderr).
async fn run(net: &Net, args: &[&str]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::from(client(net, args));
    let out: Output = tokio::time::timeout(LONG, cmd.kill_on_drop(true).output())
        .await
        .unwrap_or_else(|_| panic!("tailkitd {args:?} did not end within {LONG:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "$ tailkitd {}\n{stdout}{stderr}-> {:?}",
        args.join(" "),
        out.status
    );
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// A local tailnet with everyone granted CAP and one daemon (`tkd`)
/// serving the fixture's tools and the client test tools.
async fn one_daemon() -> (Net, DaemonProcess) {
    let net = Net::start().await;
    grant_everyone(&net).await;
    write_client_tools(net.dir.path(), net.dir.path());
    let daemon = net.daemon(&[]).await;
    (net, daemon)
}

fn finished_records(daemon: &DaemonProcess, command: &str) -> Vec<Value> {
    daemon
        .audit_lines()
        .into_iter()
        .filter(|r| r["event"] == "exec.finished" && r["command"] == command)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_target_streams_output_and_exits_with_the_remote_code() {
    let (net, daemon) = one_daemon().await;

    let (code, out, err) = run(&net, &["call", HOST, "t/echo", "msg=hello there"]).await;
    assert_eq!((code, out.as_str()), (0, "hello there\n"), "{err}");
    assert!(
        err.is_empty(),
        "nothing on stderr for a plain success: {err}"
    );

    // Non-zero: the code itself, stdout and stderr each on their own side.
    let (code, out, err) = run(&net, &["call", HOST, "c/out", "code=3"]).await;
    assert_eq!(code, 3, "{err}");
    assert_eq!(out, "out1\nout2\n");
    assert_eq!(err, "err1\n");

    // Refused: the daemon's error and hint, 255, nothing ran.
    let (code, out, err) = run(&net, &["call", HOST, "c/locked"]).await;
    assert_eq!(code, 255);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("lacks the capability example.com/cap/nobody"),
        "{err}"
    );
    assert!(err.contains("hint: "), "{err}");
    let (code, _, err) = run(&net, &["call", HOST, "c/out"]).await;
    assert_eq!(code, 255);
    assert!(
        err.contains("\"code\""),
        "the missing argument is named: {err}"
    );
    let (code, _, err) = run(&net, &["call", HOST, "t/nope"]).await;
    assert_eq!(code, 255);
    assert!(err.contains("tkd: "), "{err}");
    let (code, _, err) = run(&net, &["call", "nosuchnode", "t/echo", "msg=x"]).await;
    assert_eq!(code, 255);
    assert!(err.contains("peer nosuchnode not found"), "{err}");
    assert_eq!(net.ran(), ["echo"], "refused calls ran nothing");

    // The command's own timeout: 124.
    let (code, _, err) = run(&net, &["call", HOST, "c/slow"]).await;
    assert_eq!(code, 124, "{err}");
    assert!(err.contains("timed out"), "{err}");

    // --timeout: the client cancels the job, 124, and the daemon agrees.
    let (code, _, err) = run(
        &net,
        &["call", HOST, "--timeout", "1s", "t/sleep", "secs=300"],
    )
    .await;
    assert_eq!(code, 124, "{err}");
    let sleeps = finished_records(&daemon, "sleep");
    assert_eq!(sleeps.len(), 1, "{sleeps:?}");
    assert_eq!(sleeps[0]["status"], "cancelled");

    // --json: the daemon's job result; the exit code still follows it.
    let (code, out, _) = run(&net, &["call", HOST, "c/out", "code=2", "--json"]).await;
    assert_eq!(code, 2);
    let result: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(result["status"], "failed");
    assert_eq!(result["exit_code"], 2);
    assert_eq!(result["stdout"], "out1\nout2\n");
    assert_eq!(result["stderr"], "err1\n");
    assert_eq!(result["command"], "out");
    let (code, out, _) = run(&net, &["call", HOST, "c/locked", "--json"]).await;
    assert_eq!(code, 255);
    let refusal: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(refusal["http_status"], 403);
    assert!(refusal["hint"].is_string(), "{refusal}");

    // --async: the job id, and the job runs.
    let (code, out, err) = run(&net, &["call", HOST, "--async", "t/echo", "msg=later"]).await;
    assert_eq!(code, 0, "{err}");
    let id = out.trim();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{out}");
    eventually(LONG, "the async job to run", || {
        finished_records(&daemon, "echo")
            .iter()
            .any(|r| r["job_id"] == id)
    })
    .await;
    // Each run is a new node, but of the same user (as with a user's auth
    // key; here the login is named after the host name), who owns the job:
    // --follow replays it from the start, --cancel stops one.
    let (code, out, err) = run(&net, &["call", HOST, "--follow", id]).await;
    assert_eq!((code, out.as_str()), (0, "later\n"), "{err}");
    let (code, out, err) = run(&net, &["call", HOST, "--async", "t/sleep", "secs=300"]).await;
    assert_eq!(code, 0, "{err}");
    let id = out.trim();
    let (code, _, err) = run(&net, &["call", HOST, "--cancel", id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("job {id} is cancelled")), "{err}");
    assert!(
        finished_records(&daemon, "sleep")
            .iter()
            .any(|r| r["job_id"] == id && r["status"] == "cancelled")
    );
    let (code, _, err) = run(&net, &["call", HOST, "--follow", "no-such-job"]).await;
    assert_eq!(code, 255);
    assert!(err.contains("tkd: "), "{err}");

    // The audit names the client's own node.
    let accepted: Vec<Value> = daemon
        .audit_lines()
        .into_iter()
        .filter(|r| r["event"] == "exec.accepted")
        .collect();
    assert!(
        accepted
            .iter()
            .all(|r| r["caller"]["node"].as_str().unwrap().starts_with("tkcall-")),
        "{accepted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_arrives_while_the_command_runs() {
    let (net, _daemon) = one_daemon().await;
    let mut child = client(&net, &["call", HOST, "c/live"]).spawn().unwrap();
    let lines = Mutex::new(line_reader(child.stdout.take().unwrap()));
    // The command prints its second line only once the flag exists, and
    // the flag is made only once its first line arrived here.
    let first = next_line(&lines, "the first line", |_| true).await;
    assert_eq!(first, "first");
    std::fs::write(net.dir.path().join("flag"), "").unwrap();
    let second = next_line(&lines, "the second line", |_| true).await;
    assert_eq!(second, "second");
    let status = wait_exit(&mut child, "the client to exit").await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_remote_job() {
    let (net, daemon) = one_daemon().await;
    let child = client(&net, &["call", HOST, "t/sleep", "secs=300"])
        .spawn()
        .unwrap();
    eventually(LONG, "the job to start", || {
        net.ran().iter().any(|l| l == "sleep")
    })
    .await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let out = tokio::time::timeout(
        LONG,
        tokio::task::spawn_blocking(|| child.wait_with_output()),
    )
    .await
    .expect("the client exits after SIGINT")
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let sleeps = finished_records(&daemon, "sleep");
    assert_eq!(sleeps.len(), 1, "{sleeps:?}");
    assert_eq!(sleeps[0]["status"], "cancelled");
    assert!(
        find_process_with_parent_chain(daemon.pid(), "sleep").is_none(),
        "the remote command is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_cancels_the_remote_job() {
    let (net, daemon) = one_daemon().await;
    let mut child = client(&net, &["call", HOST, "c/forever"]).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line // the pipe closes here: `tailkitd call ... | head -1`
    })
    .await
    .unwrap();
    assert_eq!(first, "tick\n");
    let status = wait_exit(&mut child, "the client to exit").await;
    assert_eq!(status.code(), Some(141));
    let runs = finished_records(&daemon, "forever");
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["status"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_lists_what_the_caller_may_run() {
    let (net, _daemon) = one_daemon().await;
    let (code, out, err) = run(&net, &["tools", HOST]).await;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert!(rows[0].starts_with("COMMAND"), "{out}");
    let row = |cmd: &str| rows.iter().find(|r| r.starts_with(cmd)).copied();
    assert!(row("t/echo ").unwrap().contains("msg=STRING"), "{out}");
    assert!(row("t/sleep ").unwrap().contains("secs=INT"), "{out}");
    assert!(row("c/out ").unwrap().contains("10s"), "{out}");
    assert!(row("c/locked").is_none(), "not granted, not listed: {out}");

    let (code, out, _) = run(&net, &["tools", HOST, "--json"]).await;
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&out).unwrap();
    let mut names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["c", "t"]);

    let (code, _, err) = run(&net, &["tools", "nosuchnode"]).await;
    assert_eq!(code, 255);
    assert!(err.contains("not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_runs_in_parallel_and_a_dead_node_is_named() {
    let net = Net::start().await;
    grant_everyone(&net).await;
    let names = ["tailkitd-a", "tailkitd-b", "tailkitd-c"];
    let mut daemons = Vec::new();
    for name in names {
        let dir = net.dir.path().join(name);
        write_client_tools(&dir, net.dir.path());
        let d = DaemonProcess::spawn(
            &dir,
            net.localnet.control_url(),
            net.localnet.auth_key(),
            &["--hostname", name],
        );
        daemons.push(d);
    }
    for d in &daemons {
        d.wait_up().await;
    }

    // The barrier lets no job through until all three wait at it: they
    // run at the same time, or this never ends.
    let (code, out, err) = run(&net, &["call", "--all", "c/barrier", "n=3"]).await;
    assert_eq!(code, 0, "{err}");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "tailkitd-a: through",
            "tailkitd-b: through",
            "tailkitd-c: through"
        ]
    );
    for name in names {
        assert!(
            err.lines()
                .any(|l| l.starts_with(name) && l.contains("completed")),
            "{name} in the summary: {err}"
        );
    }
    assert!(err.contains("3 of 3 nodes succeeded"), "{err}");
    // Not a terminal: no progress line.
    assert!(!err.contains("running,"), "{err}");

    // Stderr on a terminal: a progress line, gone before the summary.
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut cmd = client(&net, &["call", "--all", "t/echo", "msg=tty"]);
    cmd.stderr(Stdio::from(pty.slave));
    let child = cmd.spawn().unwrap();
    drop(cmd);
    let mut master = std::fs::File::from(pty.master);
    let tty = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut chunk = [0u8; 4096];
        // EIO once the client (the last holder of the other side) exits.
        while let Ok(n @ 1..) = std::io::Read::read(&mut master, &mut chunk) {
            all.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let out = tokio::task::spawn_blocking(|| child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let tty = tokio::task::spawn_blocking(|| tty.join().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{tty}");
    let progress = tty.rfind(" done] ").expect("a progress line");
    let cleared = tty.rfind("\r\x1b[K").expect("the line cleared");
    let table = tty.find("NODE ").expect("the summary");
    assert!(progress < cleared && cleared < table, "{tty:?}");
    assert!(tty.contains("3 of 3 nodes succeeded"), "{tty:?}");

    // --json: one line per node; --prefix picks the same nodes.
    let (code, out, err) = run(
        &net,
        &[
            "call",
            "--prefix",
            "tailkitd-",
            "c/barrier",
            "n=6",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let reports: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 3, "{out}");
    for r in &reports {
        assert_eq!(r["status"], "completed", "{r}");
        assert_eq!(r["exit_code"], 0, "{r}");
        assert_eq!(r["result"]["stdout"], "through\n", "{r}");
    }

    // One daemon dies: the others answer, it is named, the status is not 0.
    let mut b = daemons.remove(1);
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let (code, out, err) = run(
        &net,
        &[
            "call",
            "tailkitd-a",
            "tailkitd-b",
            "tailkitd-c",
            "nosuchnode",
            "--timeout",
            "5s",
            "t/echo",
            "msg=hi",
        ],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines, ["tailkitd-a: hi", "tailkitd-c: hi"]);
    let row = |name: &str| {
        err.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing in the summary: {err}"))
            .to_string()
    };
    assert!(row("tailkitd-b").contains("unreachable"), "{err}");
    assert!(row("nosuchnode").contains("not found"), "{err}");
    assert!(row("tailkitd-a").contains("completed"), "{err}");
    assert!(err.contains("2 of 4 nodes succeeded"), "{err}");
}

#[tokio::test]
async fn without_a_key_or_a_tailscaled_the_client_says_how_to_give_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tailkitd"))
        .args(["call", "tk", "t/c"])
        .env_remove("TS_AUTHKEY")
        .env_remove("TS_AUTHKEY_FILE")
        .env("TS_SOCKET", dir.path().join("none.sock"))
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{err}");
    for want in [
        "no way onto the tailnet",
        "TS_AUTHKEY",
        "--auth-key-file",
        "tailscaled",
    ] {
        assert!(err.contains(want), "{want} missing in {err}");
    }
    // A bad command line: 255 before any tailnet, whoever finds it.
    for (line, want) in [
        (&["call", "tk", "t/c", "oops"][..], "is not NAME=VALUE"),
        (&["call", "--parallel", "0", "tk", "t/c"][..], "--parallel"),
        (&["tools"][..], "TARGET"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tailkitd"))
            .args(line)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(255), "{line:?}: {err}");
        assert!(err.contains(want), "{line:?}: {err}");
    }
}
