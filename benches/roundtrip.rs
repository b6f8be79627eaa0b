//! One exec between two nodes on the embedded local tailnet: a client node
//! POSTs `/exec/t/true?wait=10s` to a real `tailkitd run` process and reads
//! the completed result. Prints the distribution of 100 round trips (after
//! 10 warm-up calls), each on a new tailnet connection as a fresh Go SDK
//! client would open, and the same over one kept-alive connection.
//!
//! Run inside a loopback-only namespace (`scripts/bench roundtrip`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tailkitd::client::{self, Call};

const HOST: &str = "tkd-bench";
const CAP: &str = "example.com/cap/x";
const CALLS: usize = 100;
const WARMUP: usize = 10;
const TOOL: &str = r#"{"name": "t", "version": "1", "commands": [
  {"name": "true", "acl_cap": "example.com/cap/x", "exec_parts": ["/bin/true"], "timeout": "10s"}
]}"#;

fn main() {
    common::block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (localnet, alice) = common::tailnet_with_alice(dir.path(), CAP).await;

    let tools = common::write_tools(dir.path(), "t.json", TOOL);
    let daemon = common::Daemon::start(
        env!("CARGO_BIN_EXE_tailkitd"),
        HOST,
        &localnet,
        &dir.path().join("daemon"),
        &tools,
        &[] as &[&str],
        "tailkitd=warn",
    );
    eprintln!("{}", daemon.up);
    common::wait_for_grant(&alice, HOST, "true").await;

    let mut fresh = Vec::with_capacity(CALLS);
    for i in 0..WARMUP + CALLS {
        let t0 = Instant::now();
        let stream = alice.node.dial(&format!("{HOST}:80")).await.expect("dial");
        let r = client::send(
            stream,
            Call::post_json(HOST, "/exec/t/true?wait=10s", &serde_json::json!({})),
            Duration::from_secs(30),
        )
        .await
        .expect("POST");
        let took = t0.elapsed();
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["status"], "completed", "{}", r.text);
        if i >= WARMUP {
            fresh.push(took);
        }
    }
    report("new connection per call", &mut fresh);

    let kept = keep_alive_calls(alice.node.clone()).await;
    let mut kept = kept;
    report("one kept-alive connection", &mut kept);

    daemon.terminate();
    let _ = alice.node.shutdown().await;
    let _ = localnet.close().await;
}

/// The same calls over one HTTP/1.1 connection.
async fn keep_alive_calls(node: Arc<tsnet_bridge::Node>) -> Vec<Duration> {
    let stream = node.dial(&format!("{HOST}:80")).await.expect("dial");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut times = Vec::with_capacity(CALLS);
    for i in 0..WARMUP + CALLS {
        let req = hyper::Request::post("/exec/t/true?wait=10s")
            .header("host", HOST)
            .header("content-type", "application/octet-stream")
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        let t0 = Instant::now();
        sender.ready().await.expect("connection ready");
        let res = sender.send_request(req).await.expect("POST");
        let status = res.status();
        let body = res.into_body().collect().await.expect("body").to_bytes();
        let took = t0.elapsed();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        if i >= WARMUP {
            times.push(took);
        }
    }
    times
}

fn report(what: &str, times: &mut [Duration]) {
    times.sort();
    let pct = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)];
    println!(
        "POST /exec ?wait= round trip, {what}: n={} min={:.2?} median={:.2?} p90={:.2?} max={:.2?}",
        times.len(),
        times[0],
        pct(50),
        pct(90),
        times[times.len() - 1]
    );
}
