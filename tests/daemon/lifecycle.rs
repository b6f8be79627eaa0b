//! Starting and stopping: SIGTERM with running jobs, storms of commands and signals, ephemeral nodes, interactive login.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cancels_running_jobs_audits_them_and_exits_0() {
    let net = Net::start().await;
    let mut daemon = net.daemon(&["--shutdown-grace", "1s"]).await;
    let r = post(&net.alice, "/exec/t/sleep", json!({"secs": 300})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json["job_id"].as_str().unwrap().to_string();
    // Wait until the command really runs.
    eventually(LONG, "the command to run", || !net.ran().is_empty()).await;
    let sleeper = find_process_with_parent_chain(daemon.pid(), "sleep")
        .expect("the sleep command is not running under the daemon");

    let started = Instant::now();
    let signalled_at = std::time::SystemTime::now();
    let status = daemon.terminate().await;
    assert!(status.success(), "{status:?}");
    // Within the shutdown grace (1 s) plus the SIGTERM→SIGKILL grace (5 s)
    // plus leaving the tailnet; `sleep` dies at the SIGTERM, so this is a
    // generous bound, not a measurement.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let finished = daemon
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "exec.finished" && l["job_id"] == id.as_str())
        .expect("no exec.finished for the cancelled job");
    assert_eq!(finished["status"], "cancelled", "{finished}");
    assert_eq!(finished["exit_code"], -1);
    // The job had its grace period (1 s) before it was cancelled.
    let finished_at = humantime::parse_rfc3339(finished["ts"].as_str().unwrap()).unwrap();
    let ran_on = finished_at.duration_since(signalled_at).unwrap_or_default();
    assert!(
        ran_on >= Duration::from_millis(900),
        "cancelled {ran_on:?} after SIGTERM, before the grace period ended"
    );
    eventually(LONG, "the command to die with the daemon", || {
        !Path::new(&format!("/proc/{sleeper}")).exists() || is_zombie(sleeper)
    })
    .await;
}

/// The daemon's supervisor killed (as the OOM killer or a command of the
/// daemon's own user could): the job fails, its command dies, and the
/// daemon, a child subreaper (PID 1 in a container), reaps whatever was
/// adopted by it, so no zombie stays; the next job gets a new supervisor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_supervisor_leaves_no_command_and_no_zombie() {
    let net = Net::start().await;
    let daemon = net.daemon(&[]).await;
    let r = post(&net.alice, "/exec/t/sleep", json!({"secs": 300})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json["job_id"].as_str().unwrap().to_string();
    eventually(LONG, "the command to run", || !net.ran().is_empty()).await;
    let sleeper = find_process_with_parent_chain(daemon.pid(), "sleep")
        .expect("the sleep command is not running under the daemon");
    let supervisor = find_child_named(daemon.pid(), "tailkitd-launch")
        .expect("the daemon has no tailkitd-launch child");
    kill(Pid::from_raw(supervisor), Signal::SIGKILL).unwrap();

    let r = get(&net.alice, &format!("/exec/jobs/{id}?wait=30s")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "failed", "{}", r.text);
    eventually(LONG, "the command to die and be reaped", || {
        !Path::new(&format!("/proc/{sleeper}")).exists()
    })
    .await;
    eventually(LONG, "no zombie child of the daemon", || {
        zombie_children(daemon.pid()).is_empty()
    })
    .await;
    let r = post(&net.alice, "/exec/t/true?wait=30s", json!({})).await;
    assert_eq!(r.json["status"], "completed", "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_short_commands_and_sighups_neither_crashes_nor_leaves_zombies() {
    let net = Net::start().await;
    let mut daemon = net.daemon(&["--max-jobs", "400"]).await;
    let pid = daemon.pid();
    // Five clients, 60 calls each: all 300 at once, each client within the
    // per-peer connection limit.
    let mut clients = vec![net.alice.node.clone()];
    for name in ["carol", "dave", "erin", "frank"] {
        let c = Client::join(&net.localnet, name, net.dir.path())
            .await
            .unwrap();
        net.localnet.grant(&c.ips, CAP).await.unwrap();
        daemon.wait_for_grant(&c).await;
        clients.push(c.node.clone());
    }
    let hups = std::thread::spawn(move || {
        for _ in 0..200 {
            if kill(pid, Signal::SIGHUP).is_err() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    });
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..300 {
        let node = clients[i % clients.len()].clone();
        calls.spawn(async move {
            let stream = node.dial(&format!("{HOST}:80")).await?;
            tailkitd::client::send(
                stream,
                Call::post_json(HOST, "/exec/t/true?wait=30s", &json!({})),
                LONG,
            )
            .await
            .map_err(|e| tsnet_bridge::BridgeError::Io(std::io::Error::other(e)))
        });
    }
    let mut completed = 0;
    while let Some(r) = calls.join_next().await {
        let r = r.unwrap().unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["status"], "completed", "{}", r.text);
        completed += 1;
    }
    assert!(
        hups.join().unwrap(),
        "the daemon died during the SIGHUP storm"
    );
    assert_eq!(completed, 300);
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon exited"
    );
    let r = get(&net.alice, "/health").await;
    assert_eq!(r.status, 200);
    // No zombies: every child the daemon started has been reaped.
    eventually(LONG, "every child to be reaped (no zombies)", || {
        zombie_children(pid).is_empty()
    })
    .await;
    assert!(daemon.terminate().await.success());
}

/// Starts a daemon with no auth key on an interactive-login tailnet and
/// returns it once up, approving its login URL if it prints one (and
/// whether it did).
async fn daemon_logged_in(
    localnet: &Localnet,
    dir: &Path,
    extra: &[&str],
) -> (DaemonProcess, bool) {
    let daemon = DaemonProcess::spawn(dir, localnet.control_url(), None, extra);
    let mut asked = false;
    eventually_some(LONG, "the daemon to come up", async || {
        let out = daemon.stdout.lock().unwrap().try_recv();
        if let Ok(line) = out
            && line.starts_with("tailkitd up:")
        {
            let _ = daemon.up_line.set(line);
            return Some(());
        }
        let urls: Vec<String> = daemon
            .stderr
            .lock()
            .unwrap()
            .try_iter()
            .filter(|l| l.trim_start().starts_with("http"))
            .collect();
        for url in urls {
            localnet.approve_login(url.trim()).await.unwrap();
            asked = true;
        }
        None
    })
    .await;
    (daemon, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ephemeral_daemon_logs_out_when_it_stops() {
    let localnet = Localnet::start_with(LocalnetOptions {
        interactive_login: true,
    })
    .await
    .unwrap();
    // A regular node keeps its identity across a restart...
    let regular = tempfile::tempdir().unwrap();
    let (mut d, asked) = daemon_logged_in(&localnet, regular.path(), &[]).await;
    assert!(asked, "a new node must log in");
    assert!(d.terminate().await.success());
    let (mut d, asked) = daemon_logged_in(&localnet, regular.path(), &[]).await;
    assert!(!asked, "a regular node lost its login on restart");
    assert!(d.terminate().await.success());
    // ...an ephemeral one logs out when it stops (tsnet does so on close,
    // which the daemon waits for): it must log in anew. A real control
    // server deletes the node at that logout.
    let ephemeral = tempfile::tempdir().unwrap();
    let (mut d, asked) = daemon_logged_in(&localnet, ephemeral.path(), &["--ephemeral"]).await;
    assert!(asked, "a new node must log in");
    assert!(d.terminate().await.success());
    let (mut d, asked) = daemon_logged_in(&localnet, ephemeral.path(), &["--ephemeral"]).await;
    assert!(
        asked,
        "the ephemeral node was still logged in after it stopped"
    );
    assert!(d.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_auth_key_the_login_url_is_printed_and_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let localnet = Localnet::start_with(LocalnetOptions {
        interactive_login: true,
    })
    .await
    .unwrap();
    let daemon = DaemonProcess::spawn(dir.path(), localnet.control_url(), None, &[]);
    let line = next_line(&daemon.stderr, "login URL", |l| {
        l.trim_start().starts_with("http")
    })
    .await;
    let url = line.trim().to_string();
    // Not up before someone logs in.
    let early = tokio::time::timeout(Duration::from_millis(300), daemon.wait_up()).await;
    assert!(early.is_err(), "up without login: {early:?}");
    localnet.approve_login(&url).await.unwrap();
    let up = daemon.wait_up().await;
    assert!(up.contains(&format!("name={HOST}.")), "{up}");
}
