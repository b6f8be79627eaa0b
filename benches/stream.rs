//! Live job output (SPEC §7) between two nodes on the embedded local
//! tailnet, against a real `tailkitd run` process:
//!
//! 1. latency: a command prints its clock (CLOCK_REALTIME, microseconds)
//!    every 10 ms, 1000 times; the client, on the same machine, takes the
//!    difference to its own clock when the line's event arrives: median,
//!    p99 and max from the line's write to its event;
//! 2. fan-out: 100 readers follow one job that writes 50 MiB (all of it
//!    kept: the command's cap is 64 MiB); the daemon's RSS before, at its
//!    peak and after, and the command's own run time with 100 readers
//!    against none.
//!
//! Run inside a loopback-only namespace (`scripts/bench stream`).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tailkitd::client::{self, Call, Opened};
use tailkitd::demo::Client;
use tsnet_bridge::Node;

const HOST: &str = "tkd-stream";
const CAP: &str = "example.com/cap/x";
const LINES: usize = 1000;
const WARMUP: usize = 20;
const READERS: usize = 100;
const FLOOD_BYTES: u64 = 50 << 20;
const TOOL: &str = r#"{"name": "s", "version": "1", "commands": [
  {"name": "clock", "acl_cap": "example.com/cap/x", "timeout": "5m",
   "exec_parts": ["perl", "-MTime::HiRes=time,sleep", "-e", "$| = 1; for (1 .. $ARGV[0]) { printf \"%.6f\\n\", time; sleep 0.01 }", "{{.n}}"],
   "args": [{"name": "n", "type": "int", "required": true}]},
  {"name": "flood", "acl_cap": "example.com/cap/x", "timeout": "10m", "max_output_bytes": 67108864,
   "exec_parts": ["/bin/sh", "-c", "while [ ! -e \"$0\" ]; do sleep 0.01; done; yes \"$1\" | head -c 52428800", "{{.gate}}", "{{.line}}"],
   "args": [{"name": "gate", "type": "string", "required": true},
            {"name": "line", "type": "string", "required": true}]}
]}"#;

fn main() {
    common::block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (localnet, alice) = common::tailnet_with_alice(dir.path(), CAP).await;

    let tools = common::write_tools(dir.path(), "s.json", TOOL);
    let daemon = common::Daemon::start(
        env!("CARGO_BIN_EXE_tailkitd"),
        HOST,
        &localnet,
        &dir.path().join("daemon"),
        &tools,
        &["--max-streams-per-peer", "200"],
        "tailkitd=warn",
    );
    let up = daemon.up.clone();
    eprintln!("{up}");
    // The daemon's addresses: one peer address may hold 64 connections, so
    // the readers come over both of alice's (IPv4 and IPv6).
    let ips: Vec<String> = up
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ips="))
        .expect("ips in the up line")
        .split(',')
        .map(|ip| match ip.contains(':') {
            true => format!("[{ip}]:80"),
            false => format!("{ip}:80"),
        })
        .collect();

    common::wait_for_grant(&alice, HOST, "clock").await;

    latency(&alice).await;
    let pid = daemon.pid();
    let alone = fan_out(&alice, &ips, pid, 0, false, dir.path()).await;
    let stalled = fan_out(&alice, &ips, pid, READERS, true, dir.path()).await;
    let followed = fan_out(&alice, &ips, pid, READERS, false, dir.path()).await;
    println!(
        "the command's run time: {alone} ms alone, {stalled} ms with {READERS} stalled readers, {followed} ms followed by {READERS} readers"
    );

    daemon.terminate();
    let _ = alice.node.shutdown().await;
    let _ = localnet.close().await;
}

/// Line written → event received, for [`LINES`] lines.
async fn latency(alice: &Client) {
    let stream = alice.node.dial(&format!("{HOST}:80")).await.expect("dial");
    let body = serde_json::json!({ "n": LINES });
    let call = Call::post_json(HOST, "/exec/s/clock?stream=true", &body);
    let Opened::Events(mut events) = client::open_stream(stream, call, Duration::from_secs(30))
        .await
        .expect("POST ?stream=true")
    else {
        panic!("no stream");
    };
    let mut delays = Vec::with_capacity(LINES);
    while let Some(event) = events.next_event().await.expect("event") {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        if event.name != "job.stdout" {
            continue;
        }
        let written: f64 = event.json()["line"]
            .as_str()
            .and_then(|l| l.parse().ok())
            .expect("a timestamp line");
        delays.push(Duration::from_secs_f64((now - written).max(0.0)));
    }
    assert_eq!(delays.len(), LINES, "every line arrived");
    let mut delays = delays.split_off(WARMUP);
    delays.sort();
    let pct = |p: usize| delays[(delays.len() * p / 100).min(delays.len() - 1)];
    println!(
        "line written -> event at the client: n={} min={:.2?} median={:.2?} p90={:.2?} p99={:.2?} max={:.2?}",
        delays.len(),
        delays[0],
        pct(50),
        pct(90),
        pct(99),
        delays[delays.len() - 1]
    );
}

/// One job writing [`FLOOD_BYTES`] followed by `readers` streams from the
/// start (`stalled`: they open the stream and never read it); prints the
/// daemon's memory and returns the command's run time (the job's
/// `duration_ms`).
async fn fan_out(
    alice: &Client,
    addrs: &[String],
    pid: u32,
    readers: usize,
    stalled: bool,
    dir: &std::path::Path,
) -> u64 {
    let gate = dir.join(format!("gate-{readers}-{stalled}"));
    let line = "x".repeat(1023);
    let body = serde_json::json!({ "gate": gate.to_str().expect("path"), "line": line });
    let r = alice
        .call(HOST, Call::post_json(HOST, "/exec/s/flood", &body))
        .await
        .expect("POST flood");
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json["job_id"].as_str().expect("job id").to_string();
    let before = proc_kib(pid, "VmRSS");

    let bytes = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut opened = Vec::new();
    for i in 0..readers {
        let addr = addrs[i % addrs.len()].clone();
        opened.push(open_raw(alice.node.clone(), &addr, &id, 0).await);
    }
    // A stream resumed past any event the job will have: it ends, with
    // nothing, when the job does (a GET of the result would build 50 MB of
    // JSON in the daemon, and show in its memory).
    let (_waiter, mut end) = open_raw(alice.node.clone(), &addrs[0], &id, u64::MAX - 1).await;
    let start = Instant::now();
    std::fs::write(&gate, "").expect("gate");
    let peak = Arc::new(AtomicU64::new(before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(proc_kib(pid, "VmRSS"), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let held = if stalled {
        std::mem::take(&mut opened)
    } else {
        Vec::new()
    };
    for (sender, mut body) in opened {
        let bytes = bytes.clone();
        tasks.spawn(async move {
            let _sender = sender;
            let mut tail = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.expect("body").into_data() {
                    bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    // The last KiB, across frames: the end may be split.
                    tail.extend_from_slice(&data);
                    tail.drain(..tail.len().saturating_sub(1024));
                }
            }
            assert!(
                String::from_utf8_lossy(&tail).contains("event: job.completed"),
                "a reader did not get to the end"
            );
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("reader");
    }
    while let Some(frame) = end.frame().await {
        frame.expect("the waiter's stream");
    }
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let after = proc_kib(pid, "VmRSS");
    drop(held);
    let result = alice
        .call(HOST, Call::get(HOST, &format!("/exec/jobs/{id}")))
        .await
        .expect("GET result");
    assert_eq!(result.json["status"], "completed");
    let duration = result.json["duration_ms"].as_u64().expect("duration");
    if stalled {
        println!(
            "{readers} stalled readers of one job writing {} MiB: daemon RSS {} MiB before, {} MiB at the peak",
            FLOOD_BYTES >> 20,
            before / 1024,
            peak.load(Ordering::Relaxed) / 1024,
        );
    } else if readers > 0 {
        let per_reader = bytes.load(Ordering::Relaxed) / readers as u64;
        println!(
            "{readers} readers of one job writing {} MiB: every reader got {:.1} MiB of events in {:.1?}; daemon RSS {} MiB before, {} MiB at the peak, {} MiB after",
            FLOOD_BYTES >> 20,
            per_reader as f64 / (1 << 20) as f64,
            start.elapsed(),
            before / 1024,
            peak.load(Ordering::Relaxed) / 1024,
            after / 1024,
        );
    } else {
        println!(
            "no reader, one job writing {} MiB: daemon RSS {} MiB before, {} MiB at the peak",
            FLOOD_BYTES >> 20,
            before / 1024,
            peak.load(Ordering::Relaxed) / 1024,
        );
    }
    duration
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// `GET /exec/jobs/{id}?stream=true` after event `after` over a new
/// connection to `addr`, once its head arrived.
async fn open_raw(
    node: Arc<Node>,
    addr: &str,
    id: &str,
    after: u64,
) -> (Sender, hyper::body::Incoming) {
    let stream = node.dial(addr).await.expect("dial");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get(format!("/exec/jobs/{id}?stream=true"))
        .header("host", HOST)
        .header("last-event-id", after.to_string())
        .body(Empty::new())
        .expect("request");
    let res = sender.send_request(req).await.expect("GET ?stream=true");
    assert_eq!(res.status(), 200);
    (sender, res.into_body())
}

/// A value of `/proc/PID/status` in KiB.
fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
