//! `tailkitd call` fanning out to 30 daemons on the embedded local tailnet,
//! against the same call to one of them: the client binary's wall time
//! (joining as an ephemeral node and leaving included) and its peak RSS
//! (VmHWM, sampled every 5 ms while it runs). Each case runs 5 times after
//! one warm-up; medians are printed.
//!
//! Run inside a loopback-only namespace (`scripts/bench fanout`).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tsnet_bridge::Localnet;

const DAEMONS: usize = 30;
const RUNS: usize = 5;
const CAP: &str = "example.com/cap/x";
const TOOL: &str = r#"{"name": "t", "version": "1", "commands": [
  {"name": "true", "acl_cap": "example.com/cap/x", "exec_parts": ["/bin/true"], "timeout": "10s"},
  {"name": "lines", "acl_cap": "example.com/cap/x",
   "exec_parts": ["/bin/sh", "-c", "i=0; while [ $i -lt 1000 ]; do echo line $i; i=$((i+1)); done"],
   "timeout": "10s"}
]}"#;

fn main() {
    common::block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let localnet = Localnet::start().await.expect("local tailnet");
    let everyone: Vec<IpAddr> = (1..=254u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(100, 64, 0, i)))
        .collect();
    localnet.grant(&everyone, CAP).await.expect("grant");
    let tools = common::write_tools(dir.path(), "t.json", TOOL);

    let started = Instant::now();
    let mut daemons: Vec<common::Daemon> = (0..DAEMONS)
        .map(|i| {
            let name = format!("tailkitd-{i:02}");
            common::Daemon::spawn(
                env!("CARGO_BIN_EXE_tailkitd"),
                &name,
                &localnet,
                &dir.path().join(&name),
                &tools,
                &[] as &[&str],
                "tailkitd=warn",
            )
        })
        .collect();
    for d in &mut daemons {
        d.wait_up();
    }
    eprintln!("{DAEMONS} daemons up in {:.1?}", started.elapsed());

    let client = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tailkitd"));
        cmd.args(args)
            .args(["--control-url", localnet.control_url()])
            .env("TS_AUTHKEY", localnet.auth_key().unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    };
    for (what, args) in [
        ("one node, t/true", &["call", "tailkitd-00", "t/true"][..]),
        (
            "30 nodes, t/true, --parallel 10",
            &["call", "--all", "t/true"][..],
        ),
        (
            "30 nodes, t/true, --parallel 30",
            &["call", "--all", "--parallel", "30", "t/true"][..],
        ),
        (
            "one node, 1000 lines",
            &["call", "tailkitd-00", "t/lines"][..],
        ),
        (
            "30 nodes, 1000 lines each",
            &["call", "--all", "--parallel", "30", "t/lines"][..],
        ),
    ] {
        let mut times = Vec::new();
        let mut peaks = Vec::new();
        for i in 0..=RUNS {
            let (took, peak_kib) = measure(client(args));
            if i > 0 {
                times.push(took);
                peaks.push(peak_kib);
            }
        }
        times.sort();
        peaks.sort();
        println!(
            "tailkitd call, {what}: wall median={:.2?} (min {:.2?}, max {:.2?}), peak RSS median={} MiB (max {} MiB), n={RUNS}",
            times[RUNS / 2],
            times[0],
            times[RUNS - 1],
            peaks[RUNS / 2] / 1024,
            peaks[RUNS - 1] / 1024,
        );
    }
    drop(daemons);
    let _ = localnet.close().await;
}

/// Runs `cmd` to the end: its wall time and peak RSS in KiB.
fn measure(mut cmd: Command) -> (Duration, u64) {
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("tailkitd call");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "tailkitd call failed: {status}");
            return (t0.elapsed(), peak);
        }
        if let Ok(text) = std::fs::read_to_string(&status_path)
            && let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        {
            peak = kib;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
