//! The transport attacks of issue 9 (and the keep-alive check of issue 10)
//! against a real `tailkitd run` on the embedded local tailnet, with the
//! figures an operator cares about: the daemon's RSS (now and peak), the
//! descriptors it holds (two per served connection), whether a peer that
//! takes no part still gets `/health`, and what a kept-alive connection
//! does after 65 s of silence. Not a speed benchmark, and it asserts
//! nothing: it prints. Run it with `scripts/bench attacks` (a loopback-only
//! namespace); `TAILKITD_BIN` picks another daemon binary (with its
//! `tailkitd-launch` beside it) to compare two builds; `ATTACK_SCALE`
//! (default 1) multiplies the request counts.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tailkitd::client::Call;
use tailkitd::demo::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tsnet_bridge::Localnet;

const HOST: &str = "tkd-attack";
const PEERS: usize = 8;
const CONNS_PER_PEER: usize = 64;
const TOOL: &str = r#"{"name": "t", "version": "1", "commands": [
  {"name": "ones", "exec_parts": ["/bin/sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' '\\1'"], "timeout": "30s"},
  {"name": "big", "exec_parts": ["/bin/sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' a"], "timeout": "30s"}
]}"#;

fn main() {
    common::block_on(run());
}

/// The daemon's memory: (VmRSS, VmHWM) in MiB.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn show(what: &str, pid: u32) {
    let (now, peak) = rss(pid);
    println!("  {what}: rss={now} MiB peak={peak} MiB fds={}", fds(pid));
}

async fn run() {
    let scale: usize = std::env::var("ATTACK_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let bin = std::env::var_os("TAILKITD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tailkitd")));
    println!("daemon: {}", bin.display());
    let dir = tempfile::tempdir().expect("temp dir");
    let localnet = Localnet::start().await.expect("local tailnet");
    let mut peers = Vec::new();
    for i in 0..=PEERS {
        peers.push(Arc::new(
            Client::join(&localnet, &format!("peer{i}"), dir.path())
                .await
                .expect("client node"),
        ));
    }
    let tools = common::write_tools(dir.path(), "t.json", TOOL);
    // Each check meets a daemon of its own, so that none inherits what an
    // earlier one left behind.
    let start = async || {
        let daemon = common::Daemon::start(
            &bin,
            HOST,
            &localnet,
            &dir.path().join("daemon"),
            &tools,
            &[] as &[&str],
            "tailkitd=error",
        );
        println!("{}", daemon.up);
        for p in &peers {
            let r = p
                .call(HOST, Call::get(HOST, "/health"))
                .await
                .expect("health");
            assert_eq!(r.status, 200);
        }
        show("at rest", daemon.pid());
        daemon
    };

    // 0. Keep-alive on a quiet daemon.
    println!("\n0. keep-alive: one GET, 65 s of silence, another GET on the same connection");
    let daemon = start().await;
    println!("  {}", keep_alive_after_silence(peers[PEERS].clone()).await);
    drop(daemon);

    // 1. Slow readers: every peer but the last opens 64 connections, writes
    // many pipelined GET /health in one write, and never reads.
    let per_conn = 2_000 * scale;
    println!(
        "\n1. slow readers: {PEERS} peers x {CONNS_PER_PEER} connections, {per_conn} pipelined GET /health each, never read"
    );
    let daemon = start().await;
    let pid = daemon.pid();
    let health: Bytes = format!("GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
        .repeat(per_conn)
        .into();
    let attack = flood(&peers[..PEERS], health, CONNS_PER_PEER);
    for at in [10u64, 30, 60] {
        sleep_until_after(at).await;
        show(&format!("after {at:>2} s"), pid);
        probe(&peers[PEERS], "the 9th peer's GET /health").await;
    }
    drop(attack);
    tokio::time::sleep(Duration::from_secs(5)).await;
    show("5 s after the attackers closed", pid);
    drop(daemon);

    // 2. The same with a 1 MiB job result: each attacking peer runs its own
    // job, then pipelines GETs of it.
    let gets = 50 * scale;
    println!(
        "\n2. pipelined GETs of a 1 MiB result: {PEERS} peers x {CONNS_PER_PEER} connections x {gets} GETs, never read"
    );
    let daemon = start().await;
    let pid = daemon.pid();
    let mut attack = Vec::new();
    for p in &peers[..PEERS] {
        let r = p
            .call(
                HOST,
                Call::post_json(HOST, "/exec/t/big?wait=30s", &serde_json::json!({})),
            )
            .await;
        let Some(id) = r.as_ref().ok().and_then(|r| r.json["job_id"].as_str()) else {
            println!("  {}'s POST got no job: {:?}", p.name, r.map(|r| r.status));
            continue;
        };
        let get: Bytes = format!("GET /exec/jobs/{id} HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
            .repeat(gets)
            .into();
        attack.push(flood(std::slice::from_ref(p), get, CONNS_PER_PEER));
    }
    reset_clock();
    for at in [10u64, 30] {
        sleep_until_after(at).await;
        show(&format!("after {at:>2} s"), pid);
        probe(&peers[PEERS], "the 9th peer's GET /health").await;
    }
    drop(attack);
    tokio::time::sleep(Duration::from_secs(5)).await;
    show("5 s after the attackers closed", pid);
    drop(daemon);

    // 3. Amplification: 1 MiB of 0x01 bytes, fetched 60 times without reading.
    println!("\n3. amplification: a 1 MiB output of 0x01, 60 unread GETs from one peer");
    let daemon = start().await;
    let pid = daemon.pid();
    let p = &peers[0];
    let r = p
        .call(
            HOST,
            Call::post_json(HOST, "/exec/t/ones?wait=30s", &serde_json::json!({})),
        )
        .await
        .expect("POST ones");
    let id = r.json["job_id"].as_str().expect("job id").to_string();
    println!(
        "  response: {} bytes (stdout_truncated={})",
        r.text.len(),
        r.json["stdout_truncated"]
    );
    show("before the GETs", pid);
    let get: Bytes = format!("GET /exec/jobs/{id} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").into();
    let attack = flood(std::slice::from_ref(p), get, 60);
    tokio::time::sleep(Duration::from_secs(10)).await;
    show("60 unread GETs, 10 s later", pid);
    drop(attack);
    tokio::time::sleep(Duration::from_secs(5)).await;
    show("5 s after they closed", pid);
    drop(daemon);
}

static START: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);

fn reset_clock() {
    *START.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
}

async fn sleep_until_after(secs: u64) {
    let start = START
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(Instant::now)
        .to_owned();
    let until = start + Duration::from_secs(secs);
    tokio::time::sleep_until(until.into()).await;
}

/// Connections that write `payload` and never read; closed when dropped.
struct Flood(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Flood {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

fn flood(peers: &[Arc<Client>], payload: Bytes, conns: usize) -> Flood {
    reset_clock();
    let mut tasks = Vec::new();
    for p in peers {
        for _ in 0..conns {
            let (p, payload) = (p.clone(), payload.clone());
            tasks.push(tokio::spawn(async move {
                let Ok(mut stream) = p.node.dial(&format!("{HOST}:80")).await else {
                    return;
                };
                let _ = stream.write_all(&payload).await;
                // Hold the connection, never reading.
                std::future::pending::<()>().await;
            }));
        }
    }
    Flood(tasks)
}

/// Whether `peer` gets `/health` within 10 s.
async fn probe(peer: &Client, what: &str) {
    let t0 = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        let mut stream = peer.node.dial(&format!("{HOST}:80")).await.ok()?;
        stream
            .write_all(
                format!("GET /health HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .ok()?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.ok()?;
        Some(out.starts_with(b"HTTP/1.1 200"))
    })
    .await;
    match outcome {
        Ok(Some(true)) => println!("  {what}: 200 in {:.0?}", t0.elapsed()),
        Ok(_) => println!("  {what}: refused or closed"),
        Err(_) => println!("  {what}: no answer within 10 s"),
    }
}

/// A kept-alive connection: one GET, 65 s of silence, another GET on it.
async fn keep_alive_after_silence(peer: Arc<Client>) -> String {
    let Ok(stream) = peer.node.dial(&format!("{HOST}:80")).await else {
        return "could not dial".into();
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return "handshake failed".into();
    };
    tokio::spawn(conn);
    let get = || {
        hyper::Request::get("/health")
            .header("host", HOST)
            .body(Empty::<Bytes>::new())
            .expect("request")
    };
    for (i, pause) in [0u64, 65].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_secs(pause)).await;
        if sender.ready().await.is_err() {
            return format!(
                "the connection was closed during {pause} s of silence (request {})",
                i + 1
            );
        }
        match sender.send_request(get()).await {
            Ok(res) => {
                let _ = res.into_body().collect().await;
            }
            Err(e) => return format!("request {} after {pause} s of silence failed: {e}", i + 1),
        }
    }
    "the same connection answered again after 65 s of silence".into()
}
