//! Calls from client nodes: capabilities, owners, the Go SDK's request shape, connection limits, no host port.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capable_client_runs_a_command_and_polls_the_result() {
    let net = Net::start().await;
    let daemon = net.daemon(&[]).await;
    let up = daemon.wait_up().await;
    assert!(up.contains(&format!("name={HOST}.")), "{up}");
    assert!(up.contains("port=80 tools=1 commands=5"), "{up}");

    let r = post(&net.alice, "/exec/t/echo", json!({"msg": "hello tailnet"})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.json["status"], "accepted");
    let id = r.json["job_id"].as_str().unwrap().to_string();

    let result = eventually_some(LONG, "the job to finish", async || {
        let r = get(&net.alice, &format!("/exec/jobs/{id}")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let done = r.json["status"] == "completed" || r.json["status"] == "failed";
        done.then_some(r.json)
    })
    .await;
    assert_eq!(result["status"], "completed", "{result}");
    assert_eq!(result["exit_code"], 0);
    assert_eq!(result["stdout"], "hello tailnet\n");
    assert_eq!(result["tool"], "t");
    assert_eq!(result["command"], "echo");
    assert_eq!(net.ran(), vec!["echo"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_the_capability_gets_403_and_nothing_runs() {
    let net = Net::start().await;
    let daemon = net.daemon(&[]).await;
    for (path, body) in [
        ("/exec/t/echo?wait=5s", json!({"msg": "hi"})),
        ("/exec/t/sleep", json!({"secs": 1})),
    ] {
        let r = post(&net.bob, path, body).await;
        assert_eq!(r.status, 403, "{}", r.text);
        assert!(
            r.json["error"].as_str().unwrap().contains(CAP),
            "{}",
            r.text
        );
    }
    // bob's /tools lists only what he may run.
    let tools = get(&net.bob, "/tools").await;
    assert!(tools.text.contains("\"open\""), "{}", tools.text);
    assert!(!tools.text.contains("\"echo\""), "{}", tools.text);
    // An accepted job's acceptance is on disk before its answer: none.
    let records = daemon.audit_lines();
    assert!(
        records.iter().all(|l| l["event"] != "exec.accepted"),
        "{records:?}"
    );
    assert!(net.ran().is_empty(), "something ran: {:?}", net.ran());
    let denied: Vec<Value> = records
        .into_iter()
        .filter(|l| l["event"] == "exec.denied")
        .collect();
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert_eq!(denied[0]["caller"]["user"], Localnet::user_login("bob"));
    assert!(denied[0]["reason"].as_str().unwrap().contains(CAP));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_cap_denies_commands_without_acl_cap() {
    let net = Net::start().await;
    let open = net.daemon(&[]).await;
    let r = post(&net.bob, "/exec/t/open?wait=10s", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "completed");
    assert_eq!(net.ran(), vec!["open"]);
    drop(open);

    let strict = net.daemon(&["--require-cap"]).await;
    for who in [&net.alice, &net.bob] {
        let r = post(who, "/exec/t/open?wait=10s", json!({})).await;
        assert_eq!(r.status, 403, "{}", r.text);
    }
    assert_eq!(net.ran(), vec!["open"], "a refused command ran");
    let tools = get(&net.alice, "/tools").await;
    assert!(!tools.text.contains("\"open\""), "{}", tools.text);
    drop(strict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_read_or_cancel_anothers_job() {
    let net = Net::start().await;
    // bob needs the capability too, to own a job of his own.
    net.localnet.grant(&net.bob.ips, CAP).await.unwrap();
    let daemon = net.daemon(&[]).await;
    daemon.wait_for_grant(&net.bob).await;

    let r = post(&net.alice, "/exec/t/sleep", json!({"secs": 60})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json["job_id"].as_str().unwrap().to_string();
    let path = format!("/exec/jobs/{id}");

    let r = get(&net.bob, &path).await;
    assert_eq!(r.status, 404, "{}", r.text);
    let r = net.bob.call(HOST, Call::delete(HOST, &path)).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.text);

    let r = get(&net.alice, &path).await;
    assert_eq!(r.status, 200);
    assert!(
        r.json["status"] == "running" || r.json["status"] == "accepted",
        "{}",
        r.text
    );

    let r = net
        .alice
        .call(HOST, Call::delete(HOST, &path))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    let r = get(&net.alice, &format!("{path}?wait=20s")).await;
    assert_eq!(r.json["status"], "cancelled", "{}", r.text);
    assert_eq!(r.json["exit_code"], -1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_sdk_request_shape_works() {
    let net = Net::start().await;
    let _daemon = net.daemon(&[]).await;
    // What tailkit.Client sends: POST, Content-Type application/octet-stream,
    // a JSON body, Host the daemon's short name.
    let call = Call {
        content_type: Some("application/octet-stream"),
        ..Call::post_json(HOST, "/exec/t/echo", &json!({"msg": "from go"}))
    };
    let r = net.alice.call(HOST, call).await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json["job_id"].as_str().unwrap();
    let r = get(&net.alice, &format!("/exec/jobs/{id}?wait=10s")).await;
    assert_eq!(r.json["stdout"], "from go\n", "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_listens_on_no_host_tcp_port() {
    let net = Net::start().await;
    let daemon = net.daemon(&[]).await;
    // It serves on the tailnet...
    let r = get(&net.alice, "/health").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["status"], "ok");
    // ...and holds no listening TCP socket on the host.
    let inodes = socket_inodes(daemon.pid());
    assert!(
        !inodes.is_empty(),
        "found no sockets at all: the check would be vacuous"
    );
    let listening = listening_tcp_inodes();
    let ours: Vec<_> = inodes.intersection(&listening).collect();
    assert!(
        ours.is_empty(),
        "the daemon listens on host TCP sockets {ours:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_hold_every_connection() {
    let net = Net::start().await;
    let _daemon = net.daemon(&[]).await;
    let limit = tailkitd::server::MAX_CONNECTIONS_PER_PEER;
    // bob holds the limit of idle connections (no request yet)...
    let mut held = Vec::new();
    for _ in 0..limit {
        held.push(net.bob.node.dial(&format!("{HOST}:80")).await.unwrap());
    }
    // ...his next one is answered 429 without running anything...
    let r = get(&net.bob, "/health").await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.retry_after, Some(1));
    // ...and more idle ones than the daemon has slots in all take none of
    // them: alice is served as usual.
    for _ in 0..tailkitd::server::MAX_CONNECTIONS {
        held.push(net.bob.node.dial(&format!("{HOST}:80")).await.unwrap());
    }
    // Were bob's idle connections holding slots, alice would wait for the
    // 10 s header timeout to free one; she is answered well before.
    let stream = net.alice.node.dial(&format!("{HOST}:80")).await.unwrap();
    let r = tailkitd::client::send(stream, Call::get(HOST, "/health"), Duration::from_secs(5))
        .await
        .expect("alice was starved by bob's connections");
    assert_eq!(r.status, 200, "{}", r.text);
    drop(held);
    eventually_some(LONG, "bob's slots to be given back", async || {
        (get(&net.bob, "/health").await.status == 200).then_some(())
    })
    .await;
}
