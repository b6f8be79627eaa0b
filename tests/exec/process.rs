//! The child process: its environment, descriptors, exit codes and signals, and commands or launchers that fail.

use super::*;

#[tokio::test]
async fn the_child_gets_a_clean_environment_devnull_stdin_and_its_own_group() {
    let d = Stack::command(
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
    let d = Stack::command(json!(["/bin/ls", "/proc/self/fd"]), json!([]), settings());
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
    let d = Stack::command(
        json!(["/bin/sh", "-c", "{{.script}}"]),
        json!([{"name": "script"}]),
        settings(),
    );
    let r = d.run(r#"{"script": "echo out; echo err >&2"}"#).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("completed"), Some(0)),
        "{r}"
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
    let d = Stack::command(
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
    let d = Stack::command(
        json!(["/bin/true"]),
        json!([]),
        ExecSettings {
            launcher,
            cgroup: CgroupSetting::Off,
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
        let d = Stack::command(json!([path]), json!([]), settings());
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
    let d = Stack::command(
        json!(["/bin/echo", "hi"]),
        json!([]),
        ExecSettings {
            launcher: "/bin/true".into(),
            cgroup: CgroupSetting::Off,
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
    let d = Stack::command(json!(["/nonexistent/program"]), json!([]), settings());
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
                user: None,
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
    let runner = Runner::new(tailkitd::run::RunnerSettings {
        launcher,
        cgroup: CgroupSetting::Off,
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
                user: None,
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
