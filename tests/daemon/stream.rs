//! Live job output over server-sent events (SPEC §7), on the real daemon:
//! the event sequence, live lines, resuming, owners, POST ?stream=true,
//! cancellation, heartbeats, stalled readers, shutdown, the per-peer cap.

use super::*;
use tailkitd::client::sse::Event;
use tailkitd::client::{EventStream, Opened, open_stream};

/// The stream tests' own tool, beside the fixture's. `DIR` becomes the
/// test's directory.
const STREAM_TOOLS: &str = r#"{
  "name": "s",
  "version": "1.0.0",
  "commands": [
    {"name": "lines", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "printf 'one\\ntwo\\r\\n\\nlast'"], "timeout": "30s"},
    {"name": "gate", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "echo ready; while [ ! -e DIR/gate ]; do sleep 0.02; done; echo after >&2; exit \"$0\"", "{{.code}}"],
     "args": [{"name": "code", "type": "int", "required": true}], "timeout": "5m"},
    {"name": "idle", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "echo started; exec sleep 300"], "timeout": "5m"},
    {"name": "brief", "acl_cap": "example.com/cap/x",
     "exec_parts": ["/bin/sh", "-c", "echo started; exec sleep 300"], "timeout": "1s"},
    {"name": "flood", "acl_cap": "example.com/cap/x", "max_output_bytes": 17825792,
     "exec_parts": ["/bin/sh", "-c", "yes 'a line of the flood, one of very many' | head -c 16777216"],
     "timeout": "5m"}
  ]
}"#;

/// A daemon serving the fixture's tools and [`STREAM_TOOLS`].
async fn stream_daemon(net: &Net, extra: &[&str]) -> DaemonProcess {
    let tools = net.dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let dir = net.dir.path().to_str().unwrap();
    std::fs::write(tools.join("s.json"), STREAM_TOOLS.replace("DIR", dir)).unwrap();
    net.daemon(extra).await
}

/// Sends `call` from `c` and returns the event stream or the plain answer.
async fn open(c: &Client, call: Call<'_>) -> Opened {
    let stream = c.node.dial(&format!("{HOST}:80")).await.unwrap();
    open_stream(stream, call, LONG).await.unwrap()
}

/// `call`'s event stream (panics on a plain answer).
async fn follow(c: &Client, call: Call<'_>) -> EventStream {
    match open(c, call).await {
        Opened::Events(events) => events,
        Opened::Answer(r) => panic!("no stream: {} {}", r.status, r.text),
    }
}

/// `call`'s plain answer (panics on a stream).
async fn refused(c: &Client, call: Call<'_>) -> tailkitd::client::Response {
    match open(c, call).await {
        Opened::Answer(r) => r,
        Opened::Events(_) => panic!("a stream where a refusal was expected"),
    }
}

fn stream_path(id: &str) -> String {
    format!("/exec/jobs/{id}?stream=true")
}

/// The next event (heartbeats skipped), within the hang guard.
async fn next(events: &mut EventStream) -> Event {
    tokio::time::timeout(LONG, events.next_event())
        .await
        .expect("an event within the hang guard")
        .unwrap()
        .expect("an event, not the end")
}

/// Every event to the end of the stream.
async fn rest(events: &mut EventStream) -> Vec<Event> {
    let mut all = Vec::new();
    loop {
        let item = tokio::time::timeout(LONG, events.next_event())
            .await
            .expect("the stream to end within the hang guard")
            .unwrap();
        match item {
            Some(event) => all.push(event),
            None => return all,
        }
    }
}

/// (id, name, data) of each event, for comparing sequences.
fn summary(events: &[Event]) -> Vec<(Option<u64>, String, Value)> {
    events
        .iter()
        .map(|e| (e.id, e.name.clone(), e.json()))
        .collect()
}

/// The audit records of job `id`.
fn records_of(daemon: &DaemonProcess, id: &str) -> Vec<Value> {
    daemon
        .audit_lines()
        .into_iter()
        .filter(|r| r["job_id"] == id)
        .collect()
}

/// A value of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
fn proc_kib(pid: Pid, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_streams_its_fixed_sequence_and_resumes_after_any_event() {
    let net = Net::start().await;
    let daemon = stream_daemon(&net, &[]).await;
    let r = post(&net.alice, "/exec/s/lines?wait=30s", json!({})).await;
    assert_eq!(r.json["status"], "completed", "{}", r.text);
    let id = r.json["job_id"].as_str().unwrap().to_string();

    let path = stream_path(&id);
    let mut events = follow(&net.alice, Call::get(HOST, &path)).await;
    let headers = &events.headers;
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert!(
        !headers.contains_key("access-control-allow-origin"),
        "no CORS header: {headers:?}"
    );
    let all = rest(&mut events).await;
    let line = |stream: &str, line: &str| json!({"job_id": id, "stream": stream, "line": line});
    let status = |status: &str| json!({"job_id": id, "status": status});
    assert_eq!(
        summary(&all),
        [
            (Some(1), "job.status".into(), status("accepted")),
            (Some(2), "job.status".into(), status("running")),
            (Some(3), "job.stdout".into(), line("stdout", "one")),
            (Some(4), "job.stdout".into(), line("stdout", "two")),
            (Some(5), "job.stdout".into(), line("stdout", "")),
            (Some(6), "job.stdout".into(), line("stdout", "last")),
            (Some(7), "job.status".into(), status("completed")),
            (
                Some(8),
                "job.completed".into(),
                json!({"job_id": id, "exit_code": 0,
                       "stdout_truncated": false, "stderr_truncated": false})
            ),
        ]
    );

    // Event N is always the same: Last-Event-ID resumes right after it.
    for last in [1, 4, 5, 7, 8, 20] {
        let value = last.to_string();
        let mut call = Call::get(HOST, &path);
        call.headers.push(("Last-Event-ID", &value));
        let mut events = follow(&net.alice, call).await;
        let tail = rest(&mut events).await;
        assert_eq!(
            summary(&tail),
            summary(&all[(last as usize).min(all.len())..]),
            "after {last}"
        );
    }

    // Only the owner sees the job, streamed or not.
    let r = refused(&net.bob, Call::get(HOST, &stream_path(&id))).await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.json["error"], "no such job");
    let unknown = stream_path("2d0c4a4e-5f06-4fd2-9c85-9d8c6e4b5a01");
    assert_eq!(
        refused(&net.alice, Call::get(HOST, &unknown)).await.status,
        404
    );
    // A bad Last-Event-ID or stream value is a plain 400.
    let mut call = Call::get(HOST, &path);
    call.headers.push(("Last-Event-ID", "seven"));
    assert_eq!(refused(&net.alice, call).await.status, 400);
    let yes = format!("/exec/jobs/{id}?stream=yes");
    assert_eq!(refused(&net.alice, Call::get(HOST, &yes)).await.status, 400);
    // The browser guard applies to streams as to everything else.
    let mut call = Call::get(HOST, &path);
    call.headers.push(("Origin", "http://evil.example"));
    assert_eq!(refused(&net.alice, call).await.status, 403);

    // Streams add nothing to the audit log.
    let events: Vec<Value> = records_of(&daemon, &id)
        .into_iter()
        .map(|r| r["event"].clone())
        .collect();
    assert_eq!(events, ["exec.accepted", "exec.finished"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_stream_delivers_lines_live_and_ends_with_the_exit_code() {
    let net = Net::start().await;
    let daemon = stream_daemon(&net, &[]).await;
    let gate = net.dir.path().join("gate");

    // The command prints a line, then waits for a file this test creates
    // only once it has the line: the line came while the job ran.
    let call = Call::post_json(HOST, "/exec/s/gate?stream=true", &json!({"code": 3}));
    let mut events = follow(&net.alice, call).await;
    let accepted = next(&mut events).await;
    assert_eq!(
        (accepted.id, accepted.name.as_str()),
        (Some(1), "job.status")
    );
    assert_eq!(accepted.json()["status"], "accepted");
    let id = accepted.json()["job_id"].as_str().unwrap().to_string();
    assert_eq!(next(&mut events).await.json()["status"], "running");
    let ready = next(&mut events).await;
    assert_eq!(ready.name, "job.stdout");
    assert_eq!(ready.json()["line"], "ready");
    let status = get(&net.alice, &format!("/exec/jobs/{id}")).await;
    assert_eq!(
        status.json["status"], "running",
        "the line came before the end"
    );
    std::fs::write(&gate, "").unwrap();
    let tail = rest(&mut events).await;
    assert_eq!(
        summary(&tail),
        [
            (
                Some(4),
                "job.stderr".into(),
                json!({"job_id": id, "stream": "stderr", "line": "after"})
            ),
            (
                Some(5),
                "job.status".into(),
                json!({"job_id": id, "status": "failed"})
            ),
            (
                Some(6),
                "job.failed".into(),
                json!({"job_id": id, "exit_code": 3, "error": "exit status 3",
                       "stdout_truncated": false, "stderr_truncated": false})
            ),
        ]
    );

    // A passing command: the same call, the gate already open (its two
    // lines now come at once, on two pipes: in either order).
    let call = Call::post_json(HOST, "/exec/s/gate?stream=true", &json!({"code": 0}));
    let mut events = follow(&net.alice, call).await;
    let all = rest(&mut events).await;
    let mut names: Vec<&str> = all.iter().map(|e| e.name.as_str()).collect();
    names[2..4].sort();
    assert_eq!(
        names,
        [
            "job.status",
            "job.status",
            "job.stderr",
            "job.stdout",
            "job.status",
            "job.completed"
        ]
    );
    assert_eq!(all[5].json()["exit_code"], 0);
    let passing = all[0].json()["job_id"].as_str().unwrap().to_string();

    // Refusals stay plain JSON errors with their status, and run nothing.
    let call = Call::post_json(HOST, "/exec/s/gate?stream=true", &json!({"code": 0}));
    let r = refused(&net.bob, call).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(
        r.json["error"].as_str().unwrap().contains(CAP),
        "{}",
        r.text
    );
    let call = Call::post_json(HOST, "/exec/s/gate?stream=true", &json!({"code": "x"}));
    let r = refused(&net.alice, call).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(
        r.json["error"].as_str().unwrap().contains("code"),
        "{}",
        r.text
    );
    let call = Call::post_json(
        HOST,
        "/exec/s/gate?stream=true&wait=1s",
        &json!({"code": 0}),
    );
    assert_eq!(refused(&net.alice, call).await.status, 400);

    // Streamed jobs are audited like any other: accepted, then finished.
    for (job, status, code) in [(&id, "failed", 3), (&passing, "completed", 0)] {
        let records = records_of(&daemon, job);
        let events: Vec<&Value> = records.iter().map(|r| &r["event"]).collect();
        assert_eq!(events, ["exec.accepted", "exec.finished"], "{records:?}");
        assert_eq!(records[1]["status"], status);
        assert_eq!(records[1]["exit_code"], code);
    }
    let denied = daemon
        .audit_lines()
        .into_iter()
        .filter(|r| r["event"] == "exec.denied")
        .count();
    assert_eq!(denied, 3, "every refused POST is audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_timeout_end_the_stream_and_a_client_leaving_cancels_nothing() {
    let net = Net::start().await;
    let _daemon = stream_daemon(&net, &["--stream-heartbeat", "300ms"]).await;
    let r = post(&net.alice, "/exec/s/idle", json!({})).await;
    let id = r.json["job_id"].as_str().unwrap().to_string();
    let mut events = follow(&net.alice, Call::get(HOST, &stream_path(&id))).await;
    // Heartbeats while nothing happens, between the events.
    let mut heartbeats = 0;
    let mut lines = Vec::new();
    while heartbeats < 3 || lines.len() < 3 {
        let item = tokio::time::timeout(LONG, events.next())
            .await
            .expect("heartbeats within the hang guard")
            .unwrap()
            .expect("the stream goes on");
        match item {
            tailkitd::client::sse::Item::Comment(c) => {
                assert_eq!(c, "heartbeat");
                heartbeats += 1;
            }
            tailkitd::client::sse::Item::Event(e) => lines.push(e.name),
        }
    }
    assert_eq!(lines, ["job.status", "job.status", "job.stdout"]);

    // A client that goes away cancels nothing.
    drop(events);
    let mut again = follow(&net.alice, Call::get(HOST, &stream_path(&id))).await;
    assert_eq!(next(&mut again).await.id, Some(1));
    let status = get(&net.alice, &format!("/exec/jobs/{id}")).await;
    assert_eq!(status.json["status"], "running");

    // DELETE mid-stream: the stream ends with the cancellation.
    let deleted = net
        .alice
        .call(HOST, Call::delete(HOST, &format!("/exec/jobs/{id}")))
        .await
        .unwrap();
    assert_eq!(deleted.json["status"], "cancelled", "{}", deleted.text);
    let tail = rest(&mut again).await;
    let last = tail.last().unwrap();
    assert_eq!(last.name, "job.failed");
    assert_eq!(last.json()["error"], "cancelled by the caller");
    assert_eq!(last.json()["exit_code"], -1);
    let status = &tail[tail.len() - 2];
    assert_eq!(status.json()["status"], "cancelled");

    // A timeout ends it the same way.
    let call = Call::post_json(HOST, "/exec/s/brief?stream=true", &json!({}));
    let mut events = follow(&net.alice, call).await;
    let all = rest(&mut events).await;
    let last = all.last().unwrap();
    assert_eq!(last.name, "job.failed");
    assert_eq!(last.json()["error"], "cancelled: timed out after 1s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_are_capped_per_peer_without_taking_others_slots() {
    let net = Net::start().await;
    let daemon = stream_daemon(
        &net,
        &["--max-streams-per-peer", "2", "--stream-heartbeat", "200ms"],
    )
    .await;
    let r = post(&net.alice, "/exec/s/idle", json!({})).await;
    let id = r.json["job_id"].as_str().unwrap().to_string();
    let mut first = follow(&net.alice, Call::get(HOST, &stream_path(&id))).await;
    let mut second = follow(&net.alice, Call::get(HOST, &stream_path(&id))).await;
    next(&mut first).await;
    next(&mut second).await;

    let r = refused(&net.alice, Call::get(HOST, &stream_path(&id))).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.retry_after, Some(1));
    // A POST past the cap starts nothing and is audited as refused.
    let ran_before = net.ran().len();
    let call = Call::post_json(HOST, "/exec/t/echo?stream=true", &json!({"msg": "hi"}));
    let r = refused(&net.alice, call).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(net.ran().len(), ran_before, "nothing ran");
    let denial = daemon
        .audit_lines()
        .into_iter()
        .rfind(|r| r["event"] == "exec.denied")
        .unwrap();
    assert_eq!(denial["http_status"], 429);
    // The cap is alice's: bob still streams, and alice still polls and runs.
    let r = post(&net.bob, "/exec/t/open", json!({})).await;
    let bobs = r.json["job_id"].as_str().unwrap().to_string();
    let mut events = follow(&net.bob, Call::get(HOST, &stream_path(&bobs))).await;
    assert_eq!(
        rest(&mut events).await.last().unwrap().name,
        "job.completed"
    );
    let r = post(&net.alice, "/exec/t/true?wait=30s", json!({})).await;
    assert_eq!(r.json["status"], "completed", "{}", r.text);

    // A stream closed by its client gives its slot back.
    drop(first);
    let mut third = eventually_some(LONG, "a slot to come free", async || {
        match open(&net.alice, Call::get(HOST, &stream_path(&id))).await {
            Opened::Events(events) => Some(events),
            Opened::Answer(r) => {
                assert_eq!(r.status, 429, "{}", r.text);
                None
            }
        }
    })
    .await;
    assert_eq!(next(&mut third).await.id, Some(1));
    drop(second);
    drop(third);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_slow_nothing_and_share_one_buffer() {
    let net = Net::start().await;
    let daemon = stream_daemon(&net, &[]).await;
    let pid = daemon.pid();
    // A job, so that the daemon's memory already holds what any job needs.
    let r = post(&net.alice, "/exec/s/lines?wait=30s", json!({})).await;
    assert_eq!(r.json["status"], "completed");
    let before = proc_kib(pid, "VmRSS");

    // Three readers that take the first event and then read nothing while
    // the command writes 16 MiB (all of it kept: the tool's cap is 16 MiB).
    let call = Call::post_json(HOST, "/exec/s/flood?stream=true", &json!({}));
    let mut stalled = vec![follow(&net.alice, call).await];
    let id = next(&mut stalled[0]).await.json()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..2 {
        let mut events = follow(&net.alice, Call::get(HOST, &stream_path(&id))).await;
        next(&mut events).await;
        stalled.push(events);
    }
    let finished = eventually_some(LONG, "the flood to finish", async || {
        records_of(&daemon, &id)
            .into_iter()
            .find(|r| r["event"] == "exec.finished")
    })
    .await;
    assert_eq!(finished["status"], "completed", "{finished}");
    assert_eq!(finished["stdout_bytes"], 16_777_216);
    let peak = proc_kib(pid, "VmHWM");
    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!("daemon: VmRSS {before} KiB before, VmHWM {peak} KiB with 3 stalled readers");
    // The kept output is 16 MiB, once; a copy per stalled reader would be
    // 48 MiB more.
    assert!(grown_mib < 40, "the daemon grew by {grown_mib} MiB");

    // The readers were only waiting: each still gets every line, in order.
    let mut reader = stalled.pop().unwrap();
    let mut lines = 0u64;
    let mut last = None;
    while let Some(event) = tokio::time::timeout(LONG, reader.next_event())
        .await
        .expect("events within the hang guard")
        .unwrap()
    {
        if event.name == "job.stdout" {
            lines += 1;
        }
        last = Some(event);
    }
    let last = last.unwrap();
    assert_eq!(last.name, "job.completed");
    assert_eq!(last.json()["stdout_truncated"], false);
    let line_bytes = "a line of the flood, one of very many\n".len() as u64;
    assert_eq!(lines, 16_777_216_u64.div_ceil(line_bytes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_every_stream_with_its_jobs_terminal_event() {
    let net = Net::start().await;
    let mut daemon = stream_daemon(&net, &["--shutdown-grace", "500ms"]).await;
    let mut streams = Vec::new();
    for _ in 0..2 {
        let call = Call::post_json(HOST, "/exec/s/idle?stream=true", &json!({}));
        let mut events = follow(&net.alice, call).await;
        for _ in 0..3 {
            next(&mut events).await; // accepted, running, "started"
        }
        streams.push(events);
    }
    kill(daemon.pid(), Signal::SIGTERM).unwrap();
    for events in &mut streams {
        let tail = rest(events).await;
        let names: Vec<&str> = tail.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["job.status", "job.failed"], "{tail:?}");
        assert_eq!(tail[0].json()["status"], "cancelled");
        assert_eq!(
            tail[1].json()["error"],
            "cancelled: the daemon is shutting down"
        );
    }
    let status = wait_exit(&mut daemon.child, "the daemon to exit").await;
    assert!(status.success(), "{status}");
}
