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
