//! Killing: timeouts, cancellation and shutdown reach every descendant, also ones that left the group, and a SIGKILLed daemon leaves no command.

use super::*;

#[tokio::test]
async fn a_timeout_kills_a_term_ignoring_child_and_its_grandchild() {
    let d = Stack::command(
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
    let d = Stack::command(
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
    let d = Stack::command(
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
    let d = Stack::command(
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

fn setsid_daemon(timeout: &str) -> Stack {
    let d = Stack::command(
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
    let d = Stack::command(
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
    let d = Stack::command(
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
    let d = Stack::command(
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
    // The command may write its pids before the runner has read the
    // launcher's `started` line.
    eventually_some(LONG, "the job to be running", async || {
        let (s, r, _) = d
            .request(&alice(), "GET", &format!("/exec/jobs/{id}"), "")
            .await;
        assert_eq!(s, StatusCode::OK);
        (r["status"] == "running").then_some(())
    })
    .await;
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
    let d = Stack::command(
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
    let mut helper = helper_process("kill::helper_start_a_long_command_and_wait")
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
