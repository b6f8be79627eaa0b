//! Integration tests of the exec core with real processes, real directories
//! and the real launcher binary; the API is driven through its router with
//! a constructed identity, or over loopback TCP with a resolver.

mod fixture;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use fixture::*;
use serde_json::{Value, json};
use tailkitd::api::{IdentityResolver, serve_connection};
use tailkitd::exec::runner::{RunEnd, RunSpec};
use tailkitd::exec::{ExecSettings, Registry, Runner, ToolLimits};
use tailkitd::tailnet::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LONG: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// argv and injection

/// The child prints its own argv (NUL-separated) from /proc: exactly what
/// execve gave it.
fn argv_printer() -> Daemon {
    Daemon::command(
        json!([
            "sh",
            "-c",
            "cat /proc/$$/cmdline",
            "{{.v}}",
            "--opt={{.v}}",
            "{{.w}}"
        ]),
        json!([{"name": "v", "required": true, "allow_leading_dash": true},
               {"name": "w", "default": "end"}]),
        settings(),
    )
}

fn argv_of(result: &Value) -> Vec<String> {
    let out = result["stdout"].as_str().unwrap();
    out.strip_suffix('\0')
        .unwrap_or(out)
        .split('\0')
        .map(String::from)
        .collect()
}

#[tokio::test]
async fn injection_attempts_stay_one_argv_element_and_reach_no_shell() {
    let d = argv_printer();
    let marker = d.dir.path().join("pwned");
    let m = marker.display();
    for value in [
        "two words".to_string(),
        format!("x; touch {m}"),
        format!("$(touch {m})"),
        format!("`touch {m}`"),
        format!("' \"; touch {m}; echo \""),
        "--output=/etc/passwd".to_string(),
        "*".to_string(),
        "{{.w}}".to_string(),
    ] {
        let result = d.run(&json!({"v": value}).to_string()).await;
        assert_eq!(result["status"], "completed", "{result}");
        assert_eq!(
            argv_of(&result),
            [
                "sh",
                "-c",
                "cat /proc/$$/cmdline",
                &value,
                &format!("--opt={value}"),
                "end"
            ],
            "argv for {value:?}"
        );
    }
    assert!(!marker.exists(), "no shell ever ran a value");
}

#[tokio::test]
async fn refused_values_never_start_a_process() {
    let d = Daemon::command(
        json!(["/bin/echo", "{{.v}}"]),
        json!([{"name": "v", "required": true, "pattern": "^\\d+$"}]),
        settings(),
    );
    for (value, needle) in [
        ("١٢٣", "pattern"),
        ("12\n; touch x", "control character"),
        ("--output=/etc/passwd", "starts with '-'"),
        ("12 34", "pattern"),
    ] {
        let (s, v, _) = d
            .request(
                &alice(),
                "POST",
                "/exec/t/c",
                &json!({"v": value}).to_string(),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{value:?}: {v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("\"v\""),
            "names the arg: {v}"
        );
    }
    assert!(d.api.executor().jobs().is_empty());
    let events: Vec<Value> = d
        .audit_records()
        .iter()
        .map(|r| r["event"].clone())
        .collect();
    assert_eq!(events, ["exec.denied"; 4]);
    assert_eq!(d.run(r#"{"v": "123"}"#).await["stdout"], "123\n");
}

// ---------------------------------------------------------------------------
// process environment

#[tokio::test]
async fn the_child_gets_a_clean_environment_devnull_stdin_and_its_own_group() {
    let d = Daemon::command(
        json!([
            "/bin/sh",
            "-c",
            "env | sort; echo ---; readlink /proc/self/fd/0; cut -d' ' -f5 /proc/$$/stat"
        ]),
        json!([]),
        settings(),
    );
    let result = d.run("").await;
    assert_eq!(result["status"], "completed", "{result}");
    let out = result["stdout"].as_str().unwrap();
    let (env, rest) = out.split_once("---\n").unwrap();
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .filter(|k| !matches!(*k, "PWD" | "SHLVL" | "_"))
        .collect();
    assert_eq!(
        names,
        [
            "LANG",
            "PATH",
            "TAILKIT_CALLER_NODE",
            "TAILKIT_CALLER_USER",
            "TAILKIT_JOB_ID"
        ]
    );
    assert!(env.contains("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"));
    assert!(env.contains("LANG=C.UTF-8\n"));
    assert!(env.contains("TAILKIT_CALLER_USER=alice@example.com\n"));
    assert!(env.contains(&format!(
        "TAILKIT_JOB_ID={}\n",
        result["job_id"].as_str().unwrap()
    )));
    let lines: Vec<&str> = rest.lines().collect();
    assert_eq!(lines[0], "/dev/null", "stdin");
    let pgid: i32 = lines[1].parse().unwrap();
    assert_ne!(
        pgid,
        nix::unistd::getpgrp().as_raw(),
        "its own process group"
    );
}

#[tokio::test]
async fn the_child_inherits_only_stdin_stdout_and_stderr() {
    // The test harness itself holds inheritable descriptors (cargo's
    // jobserver pipe): none of them may reach the command.
    let d = Daemon::command(json!(["/bin/ls", "/proc/self/fd"]), json!([]), settings());
    let result = d.run("").await;
    assert_eq!(
        result["stdout"], "0\n1\n2\n3\n",
        "3 is the directory ls reads"
    );
}

// ---------------------------------------------------------------------------
// exit codes, signals, could-not-start

#[tokio::test]
async fn statuses_exit_codes_and_signals_follow_the_spec() {
    let d = Daemon::command(
        json!(["/bin/sh", "-c", "{{.script}}"]),
        json!([{"name": "script"}]),
        settings(),
    );
    let r = d.run(r#"{"script": "echo out; echo err >&2"}"#).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("completed"), Some(0))
    );
    assert_eq!(
        (r["stdout"].as_str(), r["stderr"].as_str()),
        (Some("out\n"), Some("err\n"))
    );
    assert!(r.get("error").is_none() && r.get("signal").is_none());
    assert!(r["started_at"].as_str().unwrap().ends_with('Z'));
    assert!(r["finished_at"].is_string());

    let r = d.run(r#"{"script": "exit 3"}"#).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("failed"), Some(3))
    );
    assert_eq!(r["error"], "exit status 3");

    let r = d.run(r#"{"script": "kill -KILL $$"}"#).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("failed"), Some(-1))
    );
    assert_eq!(r["signal"], "SIGKILL");

    let r = d.run(r#"{"script": "kill -TERM $$"}"#).await;
    assert_eq!(r["signal"], "SIGTERM");
    assert_eq!(r["exit_code"], -1);
    assert_eq!(r["status"], "failed", "the daemon did not send it");
    assert_eq!(r["error"], "killed by signal SIGTERM");

    // A real-time signal: glibc's SIGRTMIN is 34.
    let r = d.run(r#"{"script": "kill -35 $$"}"#).await;
    assert_eq!(r["signal"], "SIGRTMIN+1", "{r}");
    assert_eq!(r["error"], "killed by signal SIGRTMIN+1");
}

#[tokio::test]
async fn a_command_killed_by_sigpipe_reports_the_signal() {
    let d = Daemon::command(
        json!(["/bin/sh", "-c", "{{.script}}", "sh", "{{.dir}}"]),
        json!([{"name": "script"}, {"name": "dir"}]),
        settings(),
    );
    let dir = d.dir.path().display().to_string();
    // Sent directly, and for real: `yes` writing into a FIFO whose only
    // reader has gone.
    for script in [
        "kill -PIPE $$",
        r#"cd "$1" && mkfifo f && { (exec 4<f) & exec yes > f; }"#,
    ] {
        let r = d
            .run(&json!({"script": script, "dir": dir}).to_string())
            .await;
        assert_eq!(
            (r["status"].as_str(), r["exit_code"].as_i64()),
            (Some("failed"), Some(-1)),
            "{script}: {r}"
        );
        assert_eq!(r["signal"], "SIGPIPE", "{script}: {r}");
        assert_eq!(r["error"], "killed by signal SIGPIPE");
    }
}

#[tokio::test]
async fn a_launcher_that_ignores_kill_is_killed_after_a_while() {
    use std::os::unix::fs::PermissionsExt;
    // A stand-in launcher that reports a start, then neither obeys nor
    // reports anything.
    let dir = tempfile::tempdir().unwrap();
    let launcher = dir.path().join("stuck-launcher");
    std::fs::write(
        &launcher,
        "#!/bin/sh\necho \"started $$\" >&0\ntrap '' TERM\nexec sleep 1000\n",
    )
    .unwrap();
    std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::command(
        json!(["/bin/true"]),
        json!([]),
        ExecSettings {
            launcher,
            ..settings()
        },
    );
    let (_, v, _) = d.request(&alice(), "POST", "/exec/t/c", "").await;
    let path = format!("/exec/jobs/{}", v["job_id"].as_str().unwrap());
    eventually(LONG, "the job to run", || {
        d.api
            .executor()
            .jobs()
            .get(v["job_id"].as_str().unwrap().parse().unwrap(), &alice())
            .is_some_and(|r| r.status.as_str() == "running")
    })
    .await;
    let (s, r, _) = d.request(&alice(), "DELETE", &path, "").await;
    assert_eq!(
        (s, r["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    let r = d
        .request(&alice(), "GET", &format!("{path}?wait=30s"), "")
        .await
        .1;
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(r["exit_code"], -1);
}

#[tokio::test]
async fn files_that_cannot_be_executed_could_not_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    for (name, text, mode, reason) in [
        ("no-shebang", "echo hi\n", 0o755, "Exec format error"),
        (
            "not-executable",
            "#!/bin/sh\necho hi\n",
            0o644,
            "Permission denied",
        ),
        (
            "no-interpreter",
            "#!/nonexistent/interpreter\n",
            0o755,
            "No such file or directory",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let d = Daemon::command(json!([path]), json!([]), settings());
        let r = d.run("").await;
        assert_eq!(
            (r["status"].as_str(), r["exit_code"].as_i64()),
            (Some("failed"), Some(-1)),
            "{name}: {r}"
        );
        let error = r["error"].as_str().unwrap();
        assert!(error.starts_with("could not start"), "{name}: {r}");
        assert!(error.contains(reason), "{name}: {r}");
        assert!(r.get("signal").is_none(), "{name}: {r}");
        let finished = d.audit_records().pop().unwrap();
        assert_eq!(finished["event"], "exec.finished");
        assert_eq!(finished["exit_code"], -1);
    }
}

#[tokio::test]
async fn a_launcher_that_dies_without_a_status_fails_the_job() {
    // `true` stands in for a launcher that exits before saying how the
    // command ended: its exit status must not pass for the command's.
    let d = Daemon::command(
        json!(["/bin/echo", "hi"]),
        json!([]),
        ExecSettings {
            launcher: "/bin/true".into(),
            ..settings()
        },
    );
    let r = d.run("").await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("failed"), Some(-1)),
        "{r}"
    );
    assert!(r["error"].as_str().unwrap().contains("launcher"), "{r}");
}

#[tokio::test]
async fn a_command_that_cannot_start_fails_and_is_audited() {
    let d = Daemon::command(json!(["/nonexistent/program"]), json!([]), settings());
    let r = d.run("").await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("failed"), Some(-1))
    );
    assert!(r.get("started_at").is_none_or(Value::is_null), "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("could not start"),
        "{r}"
    );
    let events: Vec<Value> = d
        .audit_records()
        .iter()
        .map(|r| r["event"].clone())
        .collect();
    assert_eq!(events, ["exec.accepted", "exec.finished"]);
}

#[tokio::test]
async fn a_command_that_cannot_start_never_runs() {
    // The launcher runs, but the program cannot be executed: the job must
    // not pass through `running`, nor show a start time.
    let runner = Runner::new(settings().runner_settings());
    let (_cancel, cancelled) = tokio::sync::watch::channel(None);
    let mut started = None;
    let outcome = runner
        .run(
            RunSpec {
                argv: vec!["/nonexistent/program".into()],
                env: vec![],
                workdir: None,
                timeout: LONG,
                max_output_bytes: 1024,
            },
            cancelled,
            |at| started = Some(at),
        )
        .await;
    assert!(
        matches!(&outcome.end, RunEnd::Error(e) if e.starts_with("could not start")),
        "{:?}",
        outcome.end
    );
    assert_eq!(started, None, "on_start was called");
    assert_eq!(outcome.started_at, None);
}

#[tokio::test]
async fn an_incomplete_sweep_ends_the_job_and_the_daemon_kills_the_group() {
    // A stand-in launcher that starts the "program" (a sleep leading its
    // own process group), then reports a sweep it could not finish and
    // exits, as the real one does when a fork storm outruns it.
    let dir = tempfile::tempdir().unwrap();
    let launcher = dir.path().join("launcher");
    std::fs::write(
        &launcher,
        r#"#!/bin/sh
setsid sleep 1000 </dev/null >/dev/null 2>&1 &
echo $! > "${0%/*}/pid"
echo "started $!" >&0
echo "error sweep incomplete: 1 processes left after 2s" >&0
exit 1
"#,
    )
    .unwrap();
    std::fs::set_permissions(
        &launcher,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let runner = Runner::new(tailkitd::exec::RunnerSettings {
        launcher,
        ..settings().runner_settings()
    });
    let (_cancel, cancelled) = tokio::sync::watch::channel(None);
    let outcome = runner
        .run(
            RunSpec {
                argv: vec!["/bin/true".into()],
                env: vec![],
                workdir: None,
                timeout: LONG,
                max_output_bytes: 1024,
            },
            cancelled,
            |_| {},
        )
        .await;
    let pid = pids(&std::fs::read_to_string(dir.path().join("pid")).unwrap())[0];
    let _cleanup = KillOnDrop(vec![pid]);
    assert!(
        matches!(&outcome.end, RunEnd::Error(e) if e.contains("sweep incomplete") && !e.contains("could not start")),
        "{:?}",
        outcome.end
    );
    assert!(outcome.started_at.is_some());
    eventually(LONG, "the group to be killed", || process_gone(pid)).await;
}

// ---------------------------------------------------------------------------
// killing

#[tokio::test]
async fn a_timeout_kills_a_term_ignoring_child_and_its_grandchild() {
    let d = Daemon::command(
        json!([
            "/bin/sh",
            "-c",
            "trap '' TERM; sleep 1000 & echo $$ $!; wait; sleep 1000"
        ]),
        json!([]),
        settings(),
    );
    // A 2 s timeout for this tool (time enough to start both sleeps on a
    // busy machine).
    let text = std::fs::read_to_string(d.dir.path().join("t.json")).unwrap();
    std::fs::write(d.dir.path().join("t.json"), text.replace("30s", "2s")).unwrap();
    d.registry.reload();
    let r = d.run("").await;
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(r["exit_code"], -1);
    assert!(
        r["error"].as_str().unwrap().contains("timed out after 2s"),
        "{r}"
    );
    assert_eq!(
        r["signal"], "SIGKILL",
        "SIGTERM was ignored, SIGKILL was not"
    );
    let pids = pids(r["stdout"].as_str().unwrap());
    assert_eq!(pids.len(), 2, "{r}");
    for pid in pids {
        assert!(process_gone(pid), "process {pid} survived the timeout");
    }
}

#[tokio::test]
async fn a_launcher_killed_on_its_own_takes_the_command_with_it() {
    let d = Daemon::command(
        json!(["/bin/sh", "-c", "echo $$ > {{.file}}; exec sleep 1000"]),
        json!([{"name": "file"}]),
        settings(),
    );
    let file = d.dir.path().join("pid");
    let body = json!({"file": file.display().to_string()}).to_string();
    let (s, v, _) = d.request(&alice(), "POST", "/exec/t/c", &body).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let id = v["job_id"].as_str().unwrap().to_string();
    eventually(LONG, "the command's pid", || {
        std::fs::read_to_string(&file).is_ok_and(|t| pids(&t).len() == 1)
    })
    .await;
    let sleep = pids(&std::fs::read_to_string(&file).unwrap())[0];
    let _cleanup = KillOnDrop(vec![sleep]);
    eventually(LONG, "the sleep to run", || {
        std::fs::read_to_string(format!("/proc/{sleep}/comm")).is_ok_and(|c| c == "sleep\n")
    })
    .await;
    // Until the launcher's `started` is read the daemon does not know the
    // command's pid; the job turns `running` then.
    eventually(LONG, "the job to run", || {
        d.api
            .executor()
            .jobs()
            .get(id.parse().unwrap(), &alice())
            .is_some_and(|r| r.status.as_str() == "running")
    })
    .await;
    // The launcher is the command's parent (as the OOM killer would).
    let launcher = parent_of(sleep);
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{launcher}/comm")).unwrap(),
        "tailkitd-launch\n"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(launcher),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (s, r, _) = d
        .request(&alice(), "GET", &format!("/exec/jobs/{id}?wait=30s"), "")
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("failed"), Some(-1)),
        "{r}"
    );
    assert!(r["error"].as_str().unwrap().contains("launcher"), "{r}");
    // SIGKILL was sent before the result was stored; dying may take a
    // moment on a busy machine.
    eventually(LONG, "the command to die with its launcher", || {
        process_gone(sleep)
    })
    .await;
}

#[tokio::test]
async fn descendants_get_the_grace_period_when_the_main_process_dies_of_sigterm() {
    // The main shell dies of SIGTERM at once; its background child (not
    // holding the output pipes) takes a second to clean up on SIGTERM.
    let d = Daemon::command(
        json!([
            "/bin/sh",
            "-c",
            r#"cd "$1" || exit 1
sh -c 'trap "sleep 1; touch marker; exit 0" TERM; echo $$ > pids; while :; do sleep 0.05; done' >/dev/null 2>&1 &
wait"#,
            "sh",
            "{{.dir}}"
        ]),
        json!([{"name": "dir"}]),
        ExecSettings {
            kill_grace: Duration::from_secs(5),
            ..settings()
        },
    );
    let dir = d.dir.path();
    let body = json!({"dir": dir.display().to_string()}).to_string();
    let (s, v, _) = d.request(&alice(), "POST", "/exec/t/c", &body).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let id = v["job_id"].as_str().unwrap().to_string();
    eventually(LONG, "the child's pid", || pids_in(dir).len() == 1).await;
    let child = pids_in(dir)[0];
    let _cleanup = KillOnDrop(vec![child]);
    let (s, r, _) = d
        .request(&alice(), "DELETE", &format!("/exec/jobs/{id}"), "")
        .await;
    assert_eq!(
        (s, r["status"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{r}"
    );
    assert!(
        dir.join("marker").exists(),
        "the child was killed before the end of its grace period"
    );
    assert!(process_gone(child), "the child outlived its job");
}

/// SIGKILLs process group `pgid` until it is empty when a test ends, so
/// that a failing storm test leaves nothing behind.
struct KillGroupOnDrop(i32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while group_alive(self.0) && std::time::Instant::now() < deadline {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[tokio::test]
async fn a_fork_storm_is_swept_completely() {
    // Four chains of processes that ignore SIGTERM, each forking its
    // successor and exiting at once, so that no pid stays put for long.
    // They stay in the command's process group: a storm that also leaves
    // its group (setsid at each generation) can outrun any sweep from
    // /proc, which is why the README points to a cgroup's pids.max. Kept
    // small (3000 generations each) so that a failure cannot hurt the
    // machine.
    let d = Daemon::command(
        json!([
            "/bin/sh",
            "-c",
            r#"echo $$ > "$1/pids"
for i in 1 2 3 4; do
  perl -e '$SIG{TERM} = "IGNORE"; for (1..3000) { exit 0 if fork() }' &
done
sleep 1000"#,
            "sh",
            "{{.dir}}"
        ]),
        json!([{"name": "dir"}]),
        settings(),
    );
    let dir = d.dir.path();
    let body = json!({"dir": dir.display().to_string()}).to_string();
    let (s, v, _) = d.request(&alice(), "POST", "/exec/t/c", &body).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let id = v["job_id"].as_str().unwrap().to_string();
    eventually(LONG, "the command's pid", || pids_in(dir).len() == 1).await;
    let pgid = pids_in(dir)[0];
    let _cleanup = KillGroupOnDrop(pgid);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, r, _) = d
        .request(&alice(), "DELETE", &format!("/exec/jobs/{id}"), "")
        .await;
    assert_eq!(
        (s, r["status"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{r}"
    );
    assert!(!group_alive(pgid), "part of the storm outlived its job");
}

/// The command of the setsid tests (`$1`: a directory holding
/// `leaf.sh`): one descendant that calls setsid while its parent lives,
/// one that ignores SIGTERM and is orphaned at once (setsid, then its
/// parent exits: a double fork), then the main process sleeps. Every pid
/// goes to `$1/pids`.
const SETSID_SCRIPT: &str = r#"cd "$1" || exit 1
echo $$ >> pids
setsid ./leaf.sh pids &
sh -c 'setsid ./leaf.sh pids ignore-term &'
sleep 1000"#;

fn setsid_daemon(timeout: &str) -> Daemon {
    let d = Daemon::command(
        json!(["/bin/sh", "-c", SETSID_SCRIPT, "sh", "{{.dir}}"]),
        json!([{"name": "dir"}]),
        settings(),
    );
    let text = std::fs::read_to_string(d.dir.path().join("t.json")).unwrap();
    std::fs::write(d.dir.path().join("t.json"), text.replace("30s", timeout)).unwrap();
    d.registry.reload();
    write_leaf_script(d.dir.path());
    d
}

fn pids_in(dir: &std::path::Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("pids"))
        .map(|t| pids(&t))
        .unwrap_or_default()
}

#[tokio::test]
async fn a_timeout_kills_descendants_that_left_the_group() {
    // Time enough to start all three processes on a busy machine.
    let d = setsid_daemon("3s");
    let body = json!({"dir": d.dir.path().display().to_string()}).to_string();
    let r = d.run(&body).await;
    assert_eq!(r["status"], "cancelled", "{r}");
    let pids = pids_in(d.dir.path());
    let _cleanup = KillOnDrop(pids.clone());
    assert_eq!(pids.len(), 3, "{pids:?}");
    for pid in pids {
        assert!(process_gone(pid), "process {pid} survived the timeout");
    }
}

#[tokio::test]
async fn delete_kills_descendants_that_left_the_group() {
    let d = setsid_daemon("30s");
    let body = json!({"dir": d.dir.path().display().to_string()}).to_string();
    let (s, v, _) = d.request(&alice(), "POST", "/exec/t/c", &body).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let id = v["job_id"].as_str().unwrap().to_string();
    eventually(LONG, "three pids", || pids_in(d.dir.path()).len() == 3).await;
    let pids = pids_in(d.dir.path());
    let _cleanup = KillOnDrop(pids.clone());
    let (s, r, _) = d
        .request(&alice(), "DELETE", &format!("/exec/jobs/{id}"), "")
        .await;
    assert_eq!(
        (s, r["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    for pid in pids {
        assert!(process_gone(pid), "process {pid} survived DELETE");
    }
}

#[tokio::test]
async fn shutdown_kills_descendants_that_left_the_group() {
    let d = setsid_daemon("30s");
    let body = json!({"dir": d.dir.path().display().to_string()}).to_string();
    let (s, _, _) = d.request(&alice(), "POST", "/exec/t/c", &body).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    eventually(LONG, "three pids", || pids_in(d.dir.path()).len() == 3).await;
    let pids = pids_in(d.dir.path());
    let _cleanup = KillOnDrop(pids.clone());
    d.api.shutdown(Duration::ZERO).await;
    for pid in pids {
        assert!(process_gone(pid), "process {pid} survived shutdown");
    }
}

#[tokio::test]
async fn a_normal_exit_leaves_no_descendant_behind() {
    let d = Daemon::command(
        json!([
            "/bin/sh",
            "-c",
            r#"cd "$1" && setsid ./leaf.sh pids >/dev/null 2>&1 & while [ ! -s "$1/pids" ]; do sleep 0.01; done; echo done"#,
            "sh",
            "{{.dir}}"
        ]),
        json!([{"name": "dir"}]),
        settings(),
    );
    write_leaf_script(d.dir.path());
    let body = json!({"dir": d.dir.path().display().to_string()}).to_string();
    let r = d.run(&body).await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["stdout"], "done\n");
    let pids = pids_in(d.dir.path());
    let _cleanup = KillOnDrop(pids.clone());
    assert_eq!(pids.len(), 1);
    assert!(process_gone(pids[0]), "the setsid'd process survived");
}

#[tokio::test]
async fn exit_with_a_background_grandchild_holding_stdout_ends_the_job() {
    let d = Daemon::command(
        json!(["/bin/sh", "-c", "sleep 1000 & echo $!"]),
        json!([]),
        settings(),
    );
    // The sleep holds stdout open for 1000 s: the job waits out the drain
    // period after the shell's exit (1 s), and not much more.
    let r = d.run("").await;
    assert_eq!(r["status"], "completed", "{r}");
    let drain = settings().drain_after_exit.as_millis() as u64;
    let took = r["duration_ms"].as_u64().unwrap();
    assert!(
        (drain..drain + 4_000).contains(&took),
        "{took} ms with a drain period of {drain} ms: {r}"
    );
    let pid = pids(r["stdout"].as_str().unwrap())[0];
    eventually(LONG, "the background sleep to be killed", || {
        process_gone(pid)
    })
    .await;
}

#[tokio::test]
async fn delete_cancels_the_whole_group() {
    let d = Daemon::command(
        json!(["/bin/sh", "-c", "sleep 1000 & echo $$ $! > {{.file}}; wait"]),
        json!([{"name": "file"}]),
        settings(),
    );
    let file = d.dir.path().join("pids");
    let body = json!({"file": file.display().to_string()}).to_string();
    let (s, v, _) = d.request(&alice(), "POST", "/exec/t/c", &body).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(v["status"], "accepted");
    let id = v["job_id"].as_str().unwrap().to_string();
    eventually(LONG, "the pids file", || {
        std::fs::read_to_string(&file).is_ok_and(|t| pids(&t).len() == 2)
    })
    .await;
    let running = pids(&std::fs::read_to_string(&file).unwrap());
    let (s, r, _) = d
        .request(&alice(), "GET", &format!("/exec/jobs/{id}"), "")
        .await;
    assert_eq!((s, r["status"].as_str()), (StatusCode::OK, Some("running")));
    let (s, r, _) = d
        .request(&alice(), "DELETE", &format!("/exec/jobs/{id}"), "")
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["status"], "cancelled");
    assert_eq!(r["error"], "cancelled by the caller");
    assert_eq!(r["exit_code"], -1);
    for pid in running {
        assert!(process_gone(pid), "{pid} survived DELETE");
    }
    // DELETE of a terminal job returns it unchanged.
    let (s, again, _) = d
        .request(&alice(), "DELETE", &format!("/exec/jobs/{id}"), "")
        .await;
    assert_eq!((s, again), (StatusCode::OK, r));
}

/// Not a test on its own: run by `a_sigkilled_daemon_leaves_no_command`
/// as a separate process that starts a long command and is then SIGKILLed.
#[tokio::test]
#[ignore = "helper process for a_sigkilled_daemon_leaves_no_command"]
async fn helper_start_a_long_command_and_wait() {
    let Ok(file) = std::env::var("TAILKITD_TEST_PID_FILE") else {
        return;
    };
    // Two pids first (the shell and its sleep), then two setsid'd ones (see
    // SETSID_SCRIPT), written by `leaf.sh` next to the pid file.
    let d = Daemon::command(
        json!([
            "/bin/sh",
            "-c",
            r#"sleep 1000 & echo $$ $! >> "$1"; cd "$(dirname "$1")" || exit 1
setsid ./leaf.sh "$1" &
sh -c 'setsid ./leaf.sh "$0" ignore-term &' "$1"
wait"#,
            "sh",
            "{{.file}}"
        ]),
        json!([{"name": "file"}]),
        settings(),
    );
    let (s, _, _) = d
        .request(
            &alice(),
            "POST",
            "/exec/t/c",
            &json!({"file": file}).to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    tokio::time::sleep(Duration::from_secs(1000)).await;
}

#[tokio::test]
async fn a_sigkilled_daemon_leaves_no_command() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pids");
    write_leaf_script(dir.path());
    let mut helper = helper_process("helper_start_a_long_command_and_wait")
        .env("TAILKITD_TEST_PID_FILE", &file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually(LONG, "the helper's command to start", || {
        std::fs::read_to_string(&file).is_ok_and(|t| pids(&t).len() == 4)
    })
    .await;
    let command_pids = pids(&std::fs::read_to_string(&file).unwrap());
    let _cleanup = KillOnDrop(command_pids.clone());
    let pgid = group_of(command_pids[0]);
    assert!(command_pids.iter().all(|p| !process_gone(*p)));
    helper.start_kill().unwrap();
    let status = helper.wait().await.unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    eventually(
        LONG,
        "the command and its group to die with the daemon",
        || command_pids.iter().all(|p| process_gone(*p)) && !group_alive(pgid),
    )
    .await;
}

// ---------------------------------------------------------------------------
// output

/// Peak resident memory of this process so far (`VmHWM`), in KiB.
fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Not a test on its own: run by `an_output_flood_is_capped_and_memory_stays_bounded`
/// in a process of its own, so that the peak it measures is the flood's and
/// no other test's. Writes `baseline peak` (KiB) to the report file.
#[tokio::test]
#[ignore = "helper process for an_output_flood_is_capped_and_memory_stays_bounded"]
async fn helper_run_an_output_flood() {
    let Ok(report) = std::env::var("TAILKITD_TEST_FLOOD_REPORT") else {
        return;
    };
    let d = Daemon::command(
        json!([
            "/bin/sh",
            "-c",
            "yes tailkitd | head -c $0; head -c $1 /dev/zero | tr '\\0' e >&2",
            "{{.out}}",
            "{{.err}}"
        ]),
        json!([{"name": "out", "type": "int"}, {"name": "err", "type": "int"}]),
        settings(),
    );
    // A small run first, so that the baseline already holds what any job
    // needs (code paged in, runtime threads, buffers).
    let small = d.run(r#"{"out": 1000, "err": 1000}"#).await;
    assert_eq!(small["status"], "completed", "{}", small["error"]);
    let baseline = vm_hwm_kib();
    let r = d.run(r#"{"out": 52428800, "err": 3000000}"#).await;
    let peak = vm_hwm_kib();
    assert_eq!(r["status"], "completed", "{}", r["error"]);
    assert_eq!(r["stdout"].as_str().unwrap().len(), 1 << 20);
    assert!(
        r["stdout"]
            .as_str()
            .unwrap()
            .starts_with("tailkitd\ntailkitd\n")
    );
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(r["stderr"].as_str().unwrap().len(), 1 << 20);
    assert_eq!(r["stderr_truncated"], true);
    let finished = d
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "exec.finished")
        .nth(1)
        .unwrap();
    assert_eq!(
        finished["stdout_bytes"], 52_428_800,
        "every byte was counted"
    );
    assert_eq!(finished["stderr_bytes"], 3_000_000);
    std::fs::write(report, format!("{baseline} {peak}")).unwrap();
}

#[tokio::test]
async fn an_output_flood_is_capped_and_memory_stays_bounded() {
    // In this process the peak may already be higher than anything the
    // flood could reach (other tests run here), which would make the
    // measurement vacuous: run the flood in a fresh process instead.
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("hwm");
    let out = helper_process("helper_run_an_output_flood")
        .env("TAILKITD_TEST_FLOOD_REPORT", &report)
        .output()
        .await
        .unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the flood helper failed:\n{logs}");
    let report = std::fs::read_to_string(&report).expect("the helper wrote its report");
    let [baseline, peak]: [u64; 2] = report
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let grown_mib = peak.saturating_sub(baseline) / 1024;
    eprintln!("flood helper: peak {peak} KiB, {grown_mib} MiB over its baseline {baseline} KiB");
    // The kept result alone is 2 MiB (and the answer's JSON as much again),
    // so a peak that did not move means the measurement saw nothing.
    assert!(
        peak >= baseline + 2048,
        "the peak did not rise with the result: {baseline} -> {peak} KiB"
    );
    // Keeping the flood would take over 50 MiB; the caps keep it to a few.
    assert!(grown_mib < 24, "peak memory grew by {grown_mib} MiB");
}

#[tokio::test]
async fn output_under_the_cap_is_whole_and_not_truncated() {
    let d = Daemon::command(
        json!(["/bin/sh", "-c", "printf 'caf\\303\\251 \\377'"]),
        json!([]),
        settings(),
    );
    let r = d.run("").await;
    assert_eq!(r["stdout"], "café \u{fffd}", "lossy UTF-8");
    assert_eq!(r["stdout_truncated"], false);
}

// ---------------------------------------------------------------------------
// jobs: owners, slots, waits, shutdown

#[tokio::test]
async fn a_job_is_invisible_to_another_owner() {
    let d = Daemon::command(json!(["/bin/sleep", "5"]), json!([]), settings());
    let (_, v, _) = d.request(&alice(), "POST", "/exec/t/c", "").await;
    let path = format!("/exec/jobs/{}", v["job_id"].as_str().unwrap());
    let (s, _, _) = d.request(&bob(), "GET", &path, "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = d.request(&bob(), "DELETE", &path, "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, r, _) = d.request(&alice(), "GET", &path, "").await;
    assert_eq!(s, StatusCode::OK);
    assert_ne!(r["status"], "cancelled", "bob's DELETE did nothing");
    let tagged = Identity {
        user_login: String::new(),
        tags: vec!["tag:ci".into()],
        ..alice()
    };
    assert_eq!(
        d.request(&tagged, "GET", &path, "").await.0,
        StatusCode::NOT_FOUND
    );
    d.request(&alice(), "DELETE", &path, "").await;
}

#[tokio::test]
async fn full_slots_answer_429_with_retry_after() {
    let d = Daemon::command(
        json!(["/bin/sleep", "1000"]),
        json!([]),
        ExecSettings {
            max_jobs: 1,
            ..settings()
        },
    );
    let (s, first, _) = d.request(&alice(), "POST", "/exec/t/c", "").await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, v, headers) = d.request(&bob(), "POST", "/exec/t/c", "").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(headers["retry-after"], "1");
    let denied = d
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "exec.denied")
        .unwrap();
    assert_eq!(denied["http_status"], 429);
    assert_eq!(denied["caller"]["user"], "bob@example.com");
    let path = format!("/exec/jobs/{}", first["job_id"].as_str().unwrap());
    assert_eq!(
        d.request(&alice(), "DELETE", &path, "").await.1["status"],
        "cancelled"
    );
    let (s, _, _) = d.request(&bob(), "POST", "/exec/t/c", "").await;
    assert_eq!(s, StatusCode::ACCEPTED, "the slot is free again");
    d.api.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn get_with_wait_long_polls_until_the_job_ends() {
    let d = Daemon::command(
        json!(["/bin/sh", "-c", "sleep 0.3; echo done"]),
        json!([]),
        settings(),
    );
    let (_, v, _) = d.request(&alice(), "POST", "/exec/t/c", "").await;
    let path = format!("/exec/jobs/{}?wait=30s", v["job_id"].as_str().unwrap());
    let (s, r, _) = d.request(&alice(), "GET", &path, "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (r["status"].as_str(), r["stdout"].as_str()),
        (Some("completed"), Some("done\n"))
    );
    let (s, _, _) = d.request(&alice(), "GET", &format!("{path}0000"), "").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "wait over the maximum");
}

#[tokio::test]
async fn post_with_a_short_wait_answers_202_for_a_slow_job() {
    let d = Daemon::command(json!(["/bin/sleep", "1000"]), json!([]), settings());
    let (s, v, _) = d
        .request(&alice(), "POST", "/exec/t/c?wait=100ms", "")
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
    d.api.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn shutdown_lets_short_jobs_finish_and_cancels_the_rest() {
    let d = Daemon::command(
        json!(["/bin/sh", "-c", "{{.s}}"]),
        json!([{"name": "s"}]),
        settings(),
    );
    let post = |script: &'static str| {
        let d = &d;
        async move {
            let (_, v, _) = d
                .request(
                    &alice(),
                    "POST",
                    "/exec/t/c",
                    &json!({"s": script}).to_string(),
                )
                .await;
            v["job_id"].as_str().unwrap().to_string()
        }
    };
    let short = post("sleep 0.2; echo short").await;
    let long = post("trap '' TERM; sleep 1000").await;
    d.api.shutdown(Duration::from_secs(2)).await;
    // Everything is terminal and audited the moment shutdown returns.
    let get = |id: &str| {
        d.api
            .executor()
            .jobs()
            .get(id.parse().unwrap(), &alice())
            .unwrap()
    };
    assert_eq!(get(&short).status.as_str(), "completed");
    let long = get(&long);
    assert_eq!(long.status.as_str(), "cancelled");
    assert!(long.error.as_deref().unwrap().contains("shutting down"));
    let finished: Vec<Value> = d
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "exec.finished")
        .collect();
    assert_eq!(finished.len(), 2);
    let (s, v, _) = d
        .request(&alice(), "POST", "/exec/t/c", r#"{"s": "true"}"#)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"], "shutting down");
}

// ---------------------------------------------------------------------------
// the registry, live

const V1: &str =
    r#"{"name": "live", "commands": [{"name": "say", "exec_parts": ["/bin/echo", "v1"]}]}"#;
const V2: &str =
    r#"{"name": "live", "commands": [{"name": "say", "exec_parts": ["/bin/echo", "v2"]}]}"#;

fn says(registry: &Registry, word: &str) -> bool {
    registry
        .lookup("live", "say")
        .is_some_and(|e| e.command.exec_parts[1] == word)
}

#[tokio::test]
async fn a_directory_created_later_is_loaded() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("tools");
    let registry = Arc::new(Registry::load(&dir, ToolLimits::default()));
    let _watch = registry.spawn_watcher().unwrap();
    assert_eq!(registry.counts(), (0, 0));
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("live.json"), V1).unwrap();
    eventually(LONG, "the new directory to load", || says(&registry, "v1")).await;
    // Deleting the directory empties the registry; recreating it reloads.
    std::fs::remove_dir_all(&dir).unwrap();
    eventually(LONG, "the deleted directory to unload", || {
        registry.counts() == (0, 0)
    })
    .await;
    std::fs::create_dir(&dir).unwrap();
    rename_save(&dir, "live.json", V2);
    eventually(LONG, "the recreated directory to load", || {
        says(&registry, "v2")
    })
    .await;
}

#[tokio::test]
async fn edits_rename_saves_and_deletions_reload() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("live.json"), V1).unwrap();
    let registry = Arc::new(Registry::load(dir.path(), ToolLimits::default()));
    let _watch = registry.spawn_watcher().unwrap();
    assert!(says(&registry, "v1"));
    rename_save(dir.path(), "live.json", V2);
    eventually(LONG, "a rename-save to reload", || says(&registry, "v2")).await;
    std::fs::write(dir.path().join("live.json"), V1).unwrap();
    eventually(LONG, "an in-place write to reload", || {
        says(&registry, "v1")
    })
    .await;
    std::fs::write(dir.path().join("live.json"), "{ broken").unwrap();
    eventually(LONG, "a broken file to be dropped", || {
        registry.lookup("live", "say").is_none()
    })
    .await;
    assert_eq!(registry.problems().len(), 1);
    std::fs::write(dir.path().join("live.json"), V2).unwrap();
    eventually(LONG, "the fixed file", || says(&registry, "v2")).await;
    std::fs::remove_file(dir.path().join("live.json")).unwrap();
    eventually(LONG, "a deletion", || registry.counts() == (0, 0)).await;
}

#[tokio::test]
async fn a_configmap_data_symlink_swap_reloads() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..2024_01_01_00_00_00.1")).unwrap();
    std::fs::write(d.join("..2024_01_01_00_00_00.1/live.json"), V1).unwrap();
    symlink("..2024_01_01_00_00_00.1", d.join("..data")).unwrap();
    symlink("..data/live.json", d.join("live.json")).unwrap();
    let registry = Arc::new(Registry::load(d, ToolLimits::default()));
    let _watch = registry.spawn_watcher().unwrap();
    assert!(says(&registry, "v1"));
    assert!(registry.problems().is_empty(), "..data is ignored");

    // What the kubelet does: new timestamped dir, `..data_tmp` symlink to
    // it, renamed over `..data`, old dir removed.
    std::fs::create_dir(d.join("..2024_01_02_00_00_00.2")).unwrap();
    std::fs::write(d.join("..2024_01_02_00_00_00.2/live.json"), V2).unwrap();
    symlink("..2024_01_02_00_00_00.2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..2024_01_01_00_00_00.1")).unwrap();
    eventually(LONG, "the ConfigMap swap to reload", || {
        says(&registry, "v2")
    })
    .await;
}

#[tokio::test]
async fn a_running_job_keeps_the_command_it_started_with() {
    let d = Daemon::new(
        &[(
            "live.json",
            r#"{"name": "live", "commands": [{"name": "say", "exec_parts": ["/bin/sh", "-c", "sleep 0.5; echo v1"]}]}"#,
        )],
        settings(),
    );
    let _watch = d.registry.spawn_watcher().unwrap();
    let (_, v, _) = d.request(&alice(), "POST", "/exec/live/say", "").await;
    rename_save(d.dir.path(), "live.json", V2);
    eventually(LONG, "the reload", || says(&d.registry, "v2")).await;
    let path = format!("/exec/jobs/{}?wait=30s", v["job_id"].as_str().unwrap());
    assert_eq!(
        d.request(&alice(), "GET", &path, "").await.1["stdout"],
        "v1\n"
    );
    let (_, r, _) = d
        .request(&alice(), "POST", "/exec/live/say?wait=30s", "")
        .await;
    assert_eq!(r["stdout"], "v2\n");
}

// ---------------------------------------------------------------------------
// tool files and the CLI

#[test]
fn the_examples_validate_and_bad_files_are_reported() {
    let bin = env!("CARGO_BIN_EXE_tailkitd");
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tools");
    let out = std::process::Command::new(bin)
        .args(["validate", examples])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.json"),
        r#"{"name": "x", "commands": [{"name": "c", "exec_parts": []}]}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("good.toml"), "name = \"g\"\n").unwrap();
    let out = std::process::Command::new(bin)
        .arg("validate")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = format!(
        "{}: commands[0].exec_parts: must not be empty",
        dir.path().join("bad.json").display()
    );
    assert_eq!(stdout.trim(), expected);
}

#[test]
fn validate_refuses_patterns_that_escape_the_whole_value_anchor() {
    let bin = env!("CARGO_BIN_EXE_tailkitd");
    let dir = tempfile::tempdir().unwrap();
    for (file, pattern) in [("alt.json", "a)|(b"), ("any.json", "[a-z]+)|(.*")] {
        let tool = serde_json::json!({
            "name": file.trim_end_matches(".json"),
            "commands": [{
                "name": "c",
                "exec_parts": ["/bin/echo", "{{.x}}"],
                "args": [{"name": "x", "pattern": pattern}],
            }],
        });
        std::fs::write(dir.path().join(file), tool.to_string()).unwrap();
    }
    let out = std::process::Command::new(bin)
        .arg("validate")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for file in ["alt.json", "any.json"] {
        let expected = format!(
            "{}: commands[0].args[0].pattern: does not compile",
            dir.path().join(file).display()
        );
        assert!(stdout.contains(&expected), "{expected:?} not in {stdout}");
    }

    // And the registry refuses them at load, so no request can use them.
    let registry = Registry::load(dir.path(), ToolLimits::default());
    assert_eq!(registry.counts(), (0, 0));
    assert!(registry.lookup("alt", "c").is_none());
    assert!(registry.lookup("any", "c").is_none());
}

#[tokio::test]
async fn the_example_tools_run() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tools");
    let tools: Vec<(String, String)> = std::fs::read_dir(examples)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = tools
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let d = Daemon::new(&refs, settings());
    let (s, r, _) = d
        .request(
            &alice(),
            "POST",
            "/exec/demo/count?wait=30s",
            r#"{"seconds": "2"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["stdout"], "tick 1\ntick 2\n");
    let (s, r, _) = d
        .request(
            &alice(),
            "POST",
            "/exec/disk/usage?wait=30s",
            r#"{"path": "/etc/hostname"}"#,
        )
        .await;
    assert_eq!(
        (s, r["status"].as_str()),
        (StatusCode::OK, Some("completed")),
        "{r}"
    );
    for bad in ["/etc/../root", "etc", "/etc/.ssh", "/ -x"] {
        let (s, _, _) = d
            .request(
                &alice(),
                "POST",
                "/exec/disk/usage",
                &json!({"path": bad}).to_string(),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
    }
    let nobody = user("eve@example.com", &[]);
    let (s, _, _) = d
        .request(&nobody, "POST", "/exec/disk/usage", r#"{"path": "/"}"#)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (_, tools, _) = d.request(&nobody, "GET", "/tools", "").await;
    let visible: Vec<String> = tools
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| {
            let tool = t["name"].as_str().unwrap().to_string();
            t["commands"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |c| format!("{tool}/{}", c["name"].as_str().unwrap()))
        })
        .collect();
    assert_eq!(visible, ["demo/count", "system/uptime"]);
}

// ---------------------------------------------------------------------------
// serving connections

/// Resolves by IP address (every loopback connection comes from 127.0.0.1).
struct Resolver(BTreeMap<IpAddr, Identity>);

impl IdentityResolver for Resolver {
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

/// Serves `d`'s router on a loopback port with `resolver`.
async fn serve(d: &Daemon, resolver: Resolver) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = d.api.router();
    let resolver: Arc<dyn IdentityResolver> = Arc::new(resolver);
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let conn = serve_connection(
                stream,
                peer,
                resolver.clone(),
                router.clone(),
                std::future::pending::<()>(),
            );
            tokio::spawn(conn);
        }
    });
    addr
}

async fn http(addr: SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn loopback_requests_fail_closed_for_unknown_peers() {
    let d = Daemon::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let addr = serve(&d, Resolver(BTreeMap::new())).await;
    let out = http(addr, &format!("POST /exec/t/c HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("could not identify caller"));
    assert!(d.api.executor().jobs().is_empty());
    let denied = d.audit_records().pop().unwrap();
    assert_eq!(denied["event"], "exec.denied");
    assert_eq!(denied["caller"]["ip"], "127.0.0.1");
}

#[tokio::test]
async fn loopback_round_trip_with_keep_alive() {
    let d = Daemon::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let addr = serve(
        &d,
        Resolver(BTreeMap::from([("127.0.0.1".parse().unwrap(), alice())])),
    )
    .await;
    let post = format!(
        "POST /exec/t/c?wait=30s HTTP/1.1\r\nHost: {HOST}:80\r\nContent-Type: application/octet-stream\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    let health = format!("GET /health HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    let out = http(addr, &format!("{post}{health}")).await;
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert!(out.contains(r#""stdout":"hi\n""#), "{out}");
    assert!(out.contains(r#""status":"completed""#));
    assert!(out.contains(r#""hostname":"tailkitd-test""#));
    let accepted = d
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "exec.accepted")
        .unwrap();
    assert_eq!(accepted["caller"]["user"], "alice@example.com");
}

#[tokio::test(start_paused = true)]
async fn slow_headers_close_the_connection() {
    let d = Daemon::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let (mut client, server) = tokio::io::duplex(4096);
    let resolver: Arc<dyn IdentityResolver> = Arc::new(Resolver(BTreeMap::new()));
    let peer: SocketAddr = "100.64.0.7:40000".parse().unwrap();
    let conn = tokio::spawn(serve_connection(
        server,
        peer,
        resolver,
        d.api.router(),
        std::future::pending::<()>(),
    ));
    client
        .write_all(b"POST /exec/t/c HTTP/1.1\r\nHost: tailkitd-test\r\n")
        .await
        .unwrap();
    // Time only advances while everything waits: the header timeout fires,
    // the server closes, and the read sees the end of the stream.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(600), client.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was not closed");
    assert!(
        conn.await.unwrap().is_err(),
        "served with a header timeout error"
    );
    assert!(d.api.executor().jobs().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_body_that_never_arrives_is_refused_408_and_runs_nothing() {
    let d = Daemon::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let (mut client, server) = tokio::io::duplex(4096);
    let peer: SocketAddr = "100.64.0.7:40000".parse().unwrap();
    let resolver: Arc<dyn IdentityResolver> =
        Arc::new(Resolver(BTreeMap::from([(peer.ip(), alice())])));
    tokio::spawn(serve_connection(
        server,
        peer,
        resolver,
        d.api.router(),
        std::future::pending::<()>(),
    ));
    client
        .write_all(
            format!("POST /exec/t/c HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 10\r\n\r\n{{}}")
                .as_bytes(),
        )
        .await
        .unwrap();
    // The other 8 bytes never come; time only advances while all wait.
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(600), client.read(&mut buf))
        .await
        .expect("no answer to a stalled body")
        .unwrap();
    let out = String::from_utf8_lossy(&buf[..n]);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(d.api.executor().jobs().is_empty());
    assert_eq!(d.audit_records().pop().unwrap()["http_status"], 408);
}

#[tokio::test]
async fn connections_close_gracefully_on_shutdown() {
    let d = Daemon::command(json!(["/bin/echo", "hi"]), json!([]), settings());
    let (mut client, server) = tokio::io::duplex(4096);
    let resolver: Arc<dyn IdentityResolver> = Arc::new(Resolver(BTreeMap::from([(
        "100.64.0.7".parse().unwrap(),
        alice(),
    )])));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let peer: SocketAddr = "100.64.0.7:40000".parse().unwrap();
    let conn = tokio::spawn(serve_connection(
        server,
        peer,
        resolver,
        d.api.router(),
        async move {
            let _ = stopped.await;
        },
    ));
    client
        .write_all(format!("GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = client.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    stop.send(()).unwrap();
    let served = tokio::time::timeout(LONG, conn)
        .await
        .expect("the idle connection closed");
    assert!(served.unwrap().is_ok());
}
