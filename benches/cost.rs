//! Per-job cost (issue 10), measured in one run with its floors:
//!
//! 1. the floor: this process spawning and reaping `/bin/true`
//!    (`std::process::Command`), one at a time (median) and from 16
//!    threads (jobs/s);
//! 2. the runner layer: `Runner::run` of `/bin/true` through the real
//!    supervisor, with job cgroups (`auto`, where usable) and without
//!    (`off`): median one at a time, jobs/s with 16 at once, CPU per job
//!    (this process, the supervisor, and the commands and launchers);
//! 3. end to end: a real `tailkitd run` on the local tailnet (the binary in
//!    `TAILKITD_BIN`, default the one built with this bench, so that another
//!    build can be measured the same way), called from a client node over
//!    kept-alive connections: `GET /health` round trip, `POST ?wait=` of
//!    `/bin/true`, `POST` + `GET ?wait=`, 16 concurrent callers (jobs/s,
//!    `--max-jobs 64`), and CPU per job from /proc: the daemon's own, and
//!    that of the daemon and every process under it (supervisors,
//!    launchers, commands). `COST_CGROUP=off` runs the daemon without job
//!    cgroups.
//!
//! Prints each figure and the ratios of the goals. Run it inside a
//! loopback-only namespace: `scripts/bench cost`. `COST_JOBS` scales the
//! job counts (default 400); `COST_ONLY=runner` (or `e2e`) measures only
//! the floors and that part.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tailkitd::run::runner::{RunEnd, RunSpec, RunnerSettings};
use tailkitd::run::{CgroupSetting, ExecSettings, Runner};

const HOST: &str = "tkd-cost";
const CAP: &str = "example.com/cap/x";
const TOOL: &str = r#"{"name": "t", "version": "1", "commands": [
  {"name": "true", "acl_cap": "example.com/cap/x", "exec_parts": ["/bin/true"], "timeout": "10s"}
]}"#;

fn jobs() -> usize {
    std::env::var("COST_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(400)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let n = jobs();
    let only = std::env::var("COST_ONLY").unwrap_or_default();
    println!("per-job cost, {n} jobs per figure (COST_JOBS)");
    let floor1 = floor_one(n);
    let floor16 = floor_concurrent(16, n * 4);
    println!(
        "floor: local spawn+reap of /bin/true: median {floor1:.3?} one at a time; {floor16:.0} jobs/s from 16 threads"
    );
    for (name, cgroup) in [("auto", CgroupSetting::Auto), ("off", CgroupSetting::Off)] {
        if only == "e2e" {
            break;
        }
        if name == "auto"
            && let Err(reason) = CgroupSetting::Auto.resolve()
        {
            println!("runner, cgroup auto: skipped ({reason})");
            continue;
        }
        rt.block_on(runner_layer(name, cgroup, n, floor16));
    }
    if only != "runner" {
        rt.block_on(end_to_end(n, floor1, floor16));
    }
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn floor_one(n: usize) -> Duration {
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let status = Command::new("/bin/true").status().expect("spawn");
            assert!(status.success());
            t.elapsed()
        })
        .collect();
    median(&mut times)
}

fn floor_concurrent(threads: usize, total: usize) -> f64 {
    let left = AtomicUsize::new(total);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                    .is_ok()
                {
                    let _ = Command::new("/bin/true").status();
                }
            });
        }
    });
    total as f64 / t.elapsed().as_secs_f64()
}

/// CPU seconds (user + system) of process `pid`, and of its reaped
/// children, from /proc.
fn cpu_of(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // After the command name: state is field 3, utime field 14 (index 11
    // here, the state being skipped as not a number).
    let tick = 100.0;
    let get = |i: usize| fields.get(i).copied().unwrap_or(0.0) / tick;
    (get(10) + get(11), get(12) + get(13))
}

/// CPU seconds of process `pid` and of everything under it: its own, its
/// reaped children's, and those of its live descendants (each with its
/// own reaped children).
fn tree_cpu(pid: u32) -> f64 {
    let stats = tailkitd_launch::proc_stats();
    let mut total = 0.0;
    let mut todo = vec![pid as i32];
    while let Some(p) = todo.pop() {
        let (own, children) = cpu_of(p as u32);
        total += own + children;
        todo.extend(stats.iter().filter(|s| s.ppid == p).map(|s| s.pid));
    }
    total
}

/// The children of `pid` that run `tailkitd-launch` (supervisors, or the
/// launchers a supervisor keeps ready).
fn launch_children_of(pid: u32) -> Vec<u32> {
    tailkitd_launch::proc_stats()
        .into_iter()
        .filter(|p| p.ppid == pid as i32)
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                .is_ok_and(|c| c.trim_end() == tailkitd_launch::LAUNCHER_NAME)
        })
        .map(|p| p.pid as u32)
        .collect()
}

async fn runner_layer(name: &str, cgroup: CgroupSetting, n: usize, floor16: f64) {
    let launcher = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.parent()?
                .parent()
                .map(|d| d.join(tailkitd_launch::LAUNCHER_NAME))
        })
        .expect("the launcher next to the bench");
    let settings = ExecSettings {
        launcher: launcher.clone(),
        supervisor: launcher,
        cgroup,
        ..ExecSettings::default()
    };
    let runner = Arc::new(Runner::new(RunnerSettings {
        ..settings.runner_settings()
    }));
    let spec = RunSpec {
        argv: vec!["/bin/true".into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        workdir: None,
        timeout: Duration::from_secs(30),
        max_output_bytes: 1 << 20,
        user: None,
    };
    let one = |runner: Arc<Runner>, spec: RunSpec| async move {
        let (_tx, rx) = tokio::sync::watch::channel(None);
        let out = runner.run(spec, rx, |_| {}).await;
        assert!(matches!(out.end, RunEnd::Exited(0)), "{:?}", out.end);
    };
    for _ in 0..20 {
        one(runner.clone(), spec.clone()).await;
    }
    let me = std::process::id();
    let sup = launch_children_of(me);
    // The supervisors' own CPU; and that of their reaped children and of
    // the launchers they keep ready, with the latter's reaped children.
    let cpu = |pids: &[u32]| {
        let (own, _) = cpu_of(me);
        let (sup_own, sup_children) = pids
            .iter()
            .map(|p| cpu_of(*p))
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        let launchers: f64 = pids
            .iter()
            .flat_map(|p| launch_children_of(*p))
            .map(|l| {
                let (own, children) = cpu_of(l);
                own + children
            })
            .sum();
        (own, sup_own, sup_children + launchers)
    };
    let c0 = cpu(&sup);
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        one(runner.clone(), spec.clone()).await;
        times.push(t.elapsed());
    }
    let c1 = cpu(&sup);
    let c2 = cpu(&launch_children_of(me));
    let total = n * 4;
    let left = Arc::new(AtomicUsize::new(total));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (runner, spec, left) = (runner.clone(), spec.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                .is_ok()
            {
                let (_tx, rx) = tokio::sync::watch::channel(None);
                runner.run(spec.clone(), rx, |_| {}).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let rate = total as f64 / t.elapsed().as_secs_f64();
    let sups = launch_children_of(me);
    let c3 = cpu(&sups);
    let per = |a: f64, b: f64, n: usize| (b - a) * 1000.0 / n as f64;
    println!(
        "runner, cgroup {name}: median {:.3?} one at a time; {rate:.0} jobs/s with 16 at once ({:.0}% of the floor); CPU per job: this process {:.2} ms, supervisor {:.2} ms, commands and launchers {:.2} ms; at 16: {:.2} + {:.2} + {:.2} ms ({} supervisors)",
        median(&mut times),
        100.0 * rate / floor16,
        per(c0.0, c1.0, n),
        per(c0.1, c1.1, n),
        per(c0.2, c1.2, n),
        per(c2.0, c3.0, total),
        per(c2.1, c3.1, total),
        per(c2.2, c3.2, total),
        sups.len(),
    );
}

async fn end_to_end(n: usize, floor1: Duration, floor16: f64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (localnet, alice) = common::tailnet_with_alice(dir.path(), CAP).await;
    let tools = common::write_tools(dir.path(), "t.json", TOOL);
    let cgroup = std::env::var("COST_CGROUP").unwrap_or_else(|_| "auto".into());
    let bin =
        std::env::var("TAILKITD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tailkitd").into());
    let daemon = common::Daemon::start(
        &bin,
        HOST,
        &localnet,
        &dir.path().join("daemon"),
        &tools,
        &["--max-jobs", "64", "--cgroup", &cgroup],
        "tailkitd=warn",
    );
    let pid = daemon.pid();
    common::wait_for_grant(&alice, HOST, "true").await;
    let mut conn = Conn::open(&alice.node).await;
    for _ in 0..20 {
        conn.post_wait().await;
    }
    let mut health: Vec<Duration> = Vec::with_capacity(n);
    let mut wait: Vec<Duration> = Vec::with_capacity(n);
    let mut poll: Vec<Duration> = Vec::with_capacity(n);
    // Interleaved, so that all three see the same machine.
    for _ in 0..n {
        health.push(conn.timed("GET", "/health").await.0);
        wait.push(conn.post_wait().await);
        poll.push(conn.post_and_poll().await);
    }
    let (c0, t0) = (cpu_of(pid).0, tree_cpu(pid));
    for _ in 0..n {
        conn.post_wait().await;
    }
    let daemon_cpu = (cpu_of(pid).0 - c0) * 1000.0 / n as f64;
    let all_cpu = (tree_cpu(pid) - t0) * 1000.0 / n as f64;
    let total = n * 4;
    let left = Arc::new(AtomicUsize::new(total));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (node, left) = (alice.node.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(&node).await;
            while left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                .is_ok()
            {
                conn.post_wait().await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("caller");
    }
    let rate = total as f64 / t.elapsed().as_secs_f64();
    let (h, w, p) = (median(&mut health), median(&mut wait), median(&mut poll));
    let goal = h + floor1 + Duration::from_millis(1);
    println!("end to end ({bin}, --cgroup {cgroup}):");
    println!("  GET /health round trip: median {h:.3?}");
    println!(
        "  POST ?wait /bin/true: median {w:.3?}; goal <= /health + local spawn + 1 ms = {goal:.3?}: {}",
        if w <= goal { "met" } else { "missed" }
    );
    println!(
        "  POST + GET ?wait: median {p:.3?}; {:.3?} over ?wait (goal: at most one /health round trip, {h:.3?}): {}",
        p.saturating_sub(w),
        if p <= w + h { "met" } else { "missed" }
    );
    println!(
        "  16 concurrent callers: {rate:.0} jobs/s = {:.0}% of the 16-thread local floor ({floor16:.0} jobs/s)",
        100.0 * rate / floor16
    );
    println!(
        "  CPU per job, one caller: daemon's own {daemon_cpu:.3} ms; daemon and everything under it {all_cpu:.3} ms"
    );
    daemon.terminate();
    let _ = alice.node.shutdown().await;
    let _ = localnet.close().await;
}

/// One kept-alive HTTP/1.1 connection to the daemon.
struct Conn(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl Conn {
    async fn open(node: &tsnet_bridge::Node) -> Conn {
        let stream = node.dial(&format!("{HOST}:80")).await.expect("dial");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Conn(sender)
    }

    async fn timed(&mut self, method: &str, path: &str) -> (Duration, serde_json::Value) {
        let body = if method == "POST" {
            &b"{}"[..]
        } else {
            &b""[..]
        };
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", HOST)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body)))
            .expect("request");
        let t = Instant::now();
        self.0.ready().await.expect("connection ready");
        let res = self.0.send_request(req).await.expect("request");
        let status = res.status();
        let body = res.into_body().collect().await.expect("body").to_bytes();
        let took = t.elapsed();
        assert!(
            status.is_success(),
            "{status}: {}",
            String::from_utf8_lossy(&body)
        );
        (took, serde_json::from_slice(&body).unwrap_or_default())
    }

    async fn post_wait(&mut self) -> Duration {
        let (took, v) = self.timed("POST", "/exec/t/true?wait=10s").await;
        assert_eq!(v["status"], "completed", "{v}");
        took
    }

    async fn post_and_poll(&mut self) -> Duration {
        let t = Instant::now();
        let (_, v) = self.timed("POST", "/exec/t/true").await;
        let id = v["job_id"].as_str().expect("job id").to_string();
        let (_, v) = self
            .timed("GET", &format!("/exec/jobs/{id}?wait=10s"))
            .await;
        assert_eq!(v["status"], "completed", "{v}");
        t.elapsed()
    }
}
