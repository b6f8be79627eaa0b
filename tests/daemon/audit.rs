//! The audit log of the daemon process: records, an unwritable log, SIGHUP, stdout.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_job_is_audited_accepted_then_finished() {
    let net = Net::start().await;
    let mut daemon = net.daemon(&[]).await;
    let mut ids = Vec::new();
    for msg in ["one", "two", "three"] {
        let r = post(&net.alice, "/exec/t/echo?wait=10s", json!({"msg": msg})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        ids.push(r.json["job_id"].as_str().unwrap().to_string());
    }
    let r = post(&net.alice, "/exec/t/echo", json!({"msg": "BAD!"})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = post(&net.bob, "/exec/t/echo", json!({"msg": "hi"})).await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = post(&net.alice, "/exec/t/nope", json!({})).await;
    assert_eq!(r.status, 404, "{}", r.text);
    // The command counts its job's lines in the audit file: the acceptance
    // is there before the process starts, the finish not yet.
    let r = post(&net.alice, "/exec/t/audited?wait=10s", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["stdout"], "1\n", "{}", r.text);
    ids.push(r.json["job_id"].as_str().unwrap().to_string());
    assert!(daemon.terminate().await.success());

    let lines = daemon.audit_lines();
    for id in &ids {
        let events: Vec<&str> = lines
            .iter()
            .filter(|l| l["job_id"] == id.as_str())
            .map(|l| l["event"].as_str().unwrap())
            .collect();
        assert_eq!(events, ["exec.accepted", "exec.finished"], "job {id}");
    }
    let finished: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "exec.finished")
        .collect();
    assert!(
        finished
            .iter()
            .all(|l| l["status"] == "completed" && l["exit_code"] == 0)
    );
    assert!(
        finished
            .iter()
            .all(|l| l["stdout_bytes"].as_u64().unwrap() > 0)
    );
    let accepted = lines
        .iter()
        .find(|l| l["event"] == "exec.accepted")
        .unwrap();
    assert_eq!(accepted["caller"]["user"], Localnet::user_login("alice"));
    assert_eq!(accepted["caller"]["ip"], net.alice.ips[0].to_string());
    assert_eq!(accepted["args"]["msg"], "one");
    let denied: Vec<u64> = lines
        .iter()
        .filter(|l| l["event"] == "exec.denied")
        .map(|l| l["http_status"].as_u64().unwrap())
        .collect();
    assert_eq!(denied, [400, 403, 404]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_audit_log() {
    let net = Net::start().await;
    let daemon = net.daemon(&[]).await;
    let r = post(
        &net.alice,
        "/exec/t/echo?wait=10s",
        json!({"msg": "before"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let rotated = daemon.audit.with_extension("jsonl.1");
    std::fs::rename(&daemon.audit, &rotated).unwrap();
    kill(daemon.pid(), Signal::SIGHUP).unwrap();
    eventually(LONG, "SIGHUP to reopen the audit log", || {
        daemon.audit.exists()
    })
    .await;
    let r = post(&net.alice, "/exec/t/echo?wait=10s", json!({"msg": "after"})).await;
    assert_eq!(r.status, 200, "{}", r.text);

    let old = std::fs::read_to_string(&rotated).unwrap();
    assert_eq!(old.lines().count(), 2, "{old}");
    assert!(old.contains("\"before\""));
    let new = daemon.audit_lines();
    let events: Vec<&str> = new.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["exec.accepted", "exec.finished"]);
    assert_eq!(new[0]["args"]["msg"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_log_of_dash_goes_to_stdout() {
    let net = Net::start().await;
    let daemon = net.daemon(&["--audit-log", "-"]).await;
    let r = post(
        &net.alice,
        "/exec/t/echo?wait=10s",
        json!({"msg": "to stdout"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let id = r.json["job_id"].as_str().unwrap().to_string();
    for event in ["exec.accepted", "exec.finished"] {
        let line = next_line(&daemon.stdout, event, |_| true).await;
        let v: Value = serde_json::from_str(&line).expect("stdout carries only JSON lines");
        assert_eq!(v["event"], event);
        assert_eq!(v["job_id"], id.as_str());
    }
}

/// A tmpfs of `size` (mount syntax: `256k`), mounted in a mount namespace
/// of its own by a helper process (`unshare --mount`; `scripts/test` runs
/// as root or in a user namespace, where that works), reached from here
/// and from the daemon through `/proc/PID/root`. It disappears with the
/// helper (on drop).
struct SmallDisk {
    helper: std::process::Child,
    dir: std::path::PathBuf,
    _mount_point: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        use std::io::BufRead;
        let mount_point = tempfile::tempdir().unwrap();
        let mut helper = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs -o size=$1 tailkitd-test \"$2\" && echo mounted && exec sleep 600")
            .args(["sh", size])
            .arg(mount_point.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) runs");
        let mut line = String::new();
        std::io::BufReader::new(helper.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "mounted",
            "could not mount a tmpfs: run the tests with scripts/test"
        );
        let dir = Path::new(&format!("/proc/{}/root", helper.id()))
            .join(mount_point.path().strip_prefix("/").unwrap());
        SmallDisk {
            helper,
            dir,
            _mount_point: mount_point,
        }
    }

    /// Fills every free block with a file; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        loop {
            match file.write(&[0u8; 4096]) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = self.helper.kill();
        let _ = self.helper.wait();
    }
}

fn lines_of(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

/// The events recorded for job `id`, in order.
fn events_of(lines: &[Value], id: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l["job_id"] == id)
        .map(|l| l["event"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_records_outlast_a_full_disk_and_health_says_it_is_failing() {
    let net = Net::start().await;
    let disk = SmallDisk::mount("256k");
    let audit = disk.dir.join("audit.jsonl");
    let _daemon = net.daemon(&["--audit-log", audit.to_str().unwrap()]).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let r = post(&net.alice, "/exec/t/sleep", json!({"secs": 600})).await;
        assert_eq!(r.status, 202, "{}", r.text);
        ids.push(r.json["job_id"].as_str().unwrap().to_string());
    }
    let filler = disk.fill();
    // The log's last block may still have room: denials fill it until one
    // can no longer be written.
    for _ in 0..100 {
        let before = std::fs::metadata(&audit).unwrap().len();
        let r = post(&net.bob, "/exec/t/echo", json!({"msg": "hi"})).await;
        assert_eq!(r.status, 403, "{}", r.text);
        if std::fs::metadata(&audit).unwrap().len() == before {
            break;
        }
    }
    // The jobs end while nothing can be written.
    for id in &ids {
        let r = net
            .alice
            .call(HOST, Call::delete(HOST, &format!("/exec/jobs/{id}")))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["status"], "cancelled");
    }
    let refused = post(&net.alice, "/exec/t/echo", json!({"msg": "full"})).await;
    assert_eq!(refused.status, 503, "{}", refused.text);
    let failing = get(&net.alice, "/health").await.json;

    std::fs::remove_file(&filler).unwrap();
    let lines = eventually_some(
        LONG,
        "every job's exec.finished once the disk has room",
        async || {
            let lines = lines_of(&audit);
            let missing = ids
                .iter()
                .filter(|id| !events_of(&lines, id).contains(&"exec.finished".to_string()))
                .count();
            (missing == 0).then_some(lines)
        },
    )
    .await;
    for id in &ids {
        assert_eq!(
            events_of(&lines, id),
            ["exec.accepted", "exec.finished"],
            "job {id}"
        );
    }
    assert_eq!(failing["status"], "ok", "{failing}");
    assert_eq!(failing["audit"], "failing", "{failing}");
    assert!(
        failing["audit_error"]
            .as_str()
            .unwrap()
            .contains("No space left"),
        "{failing}"
    );
    assert!(failing["audit_queued"].as_u64().unwrap() >= 5, "{failing}");
    let health = get(&net.alice, "/health").await.json;
    assert_eq!(health["audit"], "ok", "{health}");
    let r = post(&net.alice, "/exec/t/echo?wait=10s", json!({"msg": "room"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_sigkilled_daemon_are_recorded_abandoned_at_the_next_start() {
    let net = Net::start().await;
    let mut first = net.daemon(&[]).await;
    let r = post(&net.alice, "/exec/t/sleep", json!({"secs": 600})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json["job_id"].as_str().unwrap().to_string();
    let done = post(&net.alice, "/exec/t/echo?wait=10s", json!({"msg": "done"})).await;
    assert_eq!(done.status, 200, "{}", done.text);
    kill(first.pid(), Signal::SIGKILL).unwrap();
    wait_exit(&mut first.child, "the daemon to die of SIGKILL").await;
    assert_eq!(events_of(&first.audit_lines(), &id), ["exec.accepted"]);

    let second = net.daemon(&[]).await;
    let lines = second.audit_lines();
    assert_eq!(events_of(&lines, &id), ["exec.accepted", "exec.abandoned"]);
    let abandoned = lines
        .iter()
        .find(|l| l["event"] == "exec.abandoned")
        .unwrap();
    assert_eq!(abandoned["args"]["secs"], 600, "{abandoned}");
    assert_eq!(abandoned["caller"]["user"], Localnet::user_login("alice"));
    assert!(abandoned["reason"].as_str().unwrap().contains("killed"));
    let done = done.json["job_id"].as_str().unwrap();
    assert_eq!(
        events_of(&lines, done),
        ["exec.accepted", "exec.finished"],
        "a job that ended is left alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_audit_file_is_created_again_without_sighup() {
    let net = Net::start().await;
    let daemon = net.daemon(&[]).await;
    let r = post(
        &net.alice,
        "/exec/t/echo?wait=10s",
        json!({"msg": "before"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    std::fs::remove_file(&daemon.audit).unwrap();
    let r = post(&net.alice, "/exec/t/echo?wait=10s", json!({"msg": "after"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let id = r.json["job_id"].as_str().unwrap();
    let lines = daemon.audit_lines();
    assert_eq!(events_of(&lines, id), ["exec.accepted", "exec.finished"]);
    assert_eq!(lines[0]["args"]["msg"], "after");
}
