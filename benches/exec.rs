//! Benchmarks of the exec core: registry lookup, argument validation and
//! substitution, the job store at 100k jobs, and one POST → completed round
//! trip of `/bin/true` through the router on loopback.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::SystemTime;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use tailkitd::api::ApiSettings;
use tailkitd::audit::AuditLog;
use tailkitd::identity::Identity;
use tailkitd::run::store::{JobLimits, JobStore};
use tailkitd::run::{ExecSettings, JobResult, JobStatus};
use tailkitd::tools::{Registry, ToolLimits, prepare};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn alice() -> Identity {
    Identity {
        node_name: "laptop.ts.net".into(),
        node_id: "n1".into(),
        user_login: "alice@example.com".into(),
        ..Identity::default()
    }
}

fn registry_lookup(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    for t in 0..50 {
        let commands: Vec<_> = (0..5)
            .map(|i| json!({"name": format!("cmd{i}"), "exec_parts": ["true"]}))
            .collect();
        let tool = json!({"name": format!("tool{t}"), "commands": commands});
        std::fs::write(dir.path().join(format!("tool{t}.json")), tool.to_string()).unwrap();
    }
    let registry = Registry::load(dir.path(), ToolLimits::default());
    assert_eq!(registry.counts(), (50, 250));
    c.bench_function("registry lookup (50 tools, 250 commands)", |b| {
        b.iter(|| {
            registry
                .lookup(black_box("tool37"), black_box("cmd3"))
                .unwrap()
        })
    });
}

fn substitution(c: &mut Criterion) {
    let text = json!({"name": "t", "commands": [{
        "name": "c",
        "exec_parts": ["/usr/bin/tool", "--name={{.name}}", "{{.count}}", "--force={{.force}}", "{{.path}}", "--tag", "{{.tag}}"],
        "args": [
            {"name": "name", "required": true, "pattern": "^[a-z][a-z0-9-]{0,30}$"},
            {"name": "count", "type": "int", "required": true},
            {"name": "force", "type": "bool", "default": false},
            {"name": "path", "required": true, "pattern": "^(/[a-zA-Z0-9_.-]+)+$"},
            {"name": "tag", "pattern": "^v?\\d+\\.\\d+\\.\\d+$", "default": "v1.0.0"}
        ]}]})
    .to_string();
    let tool = tailkitd::tools::parse_str(
        &text,
        tailkitd::tools::Format::Json,
        std::path::Path::new("b.json"),
        &ToolLimits::default(),
    )
    .unwrap();
    let command = tool.commands[0].clone();
    let args = json!({"name": "web-01", "count": "3", "force": true, "path": "/var/lib/app", "tag": "v1.2.3"});
    let args = args.as_object().unwrap().clone();
    c.bench_function("validate + substitute 5 args", |b| {
        b.iter(|| prepare(&command, black_box(&args), 4096).unwrap())
    });
}

fn finished(id: uuid::Uuid) -> JobResult {
    JobResult {
        stdout: "ok\n".into(),
        ..JobResult::pending(id, JobStatus::Completed, "t", "c", None, 1)
    }
}

fn job_store(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let store = JobStore::new(JobLimits {
        max_running: 16,
        ttl: std::time::Duration::from_secs(3600),
        max_retained: 100_000,
        max_retained_output_bytes: ExecSettings::default().max_retained_output_bytes,
    });
    let owner = alice();
    let mut ids = Vec::with_capacity(100_000);
    for _ in 0..100_000 {
        let job = store.admit(owner.owner(), "t", "c").unwrap();
        store.finish(job.id, finished(job.id));
        ids.push(job.id);
    }
    assert_eq!(store.len(), 100_000);
    c.bench_function("job store insert+finish+evict at 100k", |b| {
        b.iter(|| {
            let job = store.admit(owner.owner(), "t", "c").unwrap();
            store.set_running(job.id, SystemTime::now());
            store.finish(job.id, finished(job.id));
        })
    });
    assert_eq!(store.len(), 100_000, "the oldest were evicted");
    let recent = {
        let job = store.admit(owner.owner(), "t", "c").unwrap();
        store.finish(job.id, finished(job.id));
        job.id
    };
    c.bench_function("job store get at 100k", |b| {
        b.iter(|| store.get(black_box(recent), &owner).unwrap())
    });
}

fn round_trip(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (addr, _stack) = runtime.block_on(async {
        let stack = common::Stack::build(
            &[(
                "t.json",
                r#"{"name": "t", "commands": [{"name": "c", "exec_parts": ["/bin/true"]}]}"#,
            )],
            common::settings(),
            ApiSettings::new(common::HOST, vec![common::HOST.into()]),
            AuditLog::open(std::path::Path::new("/dev/null")).unwrap(),
        );
        let resolver = common::ByIp([("127.0.0.1".parse().unwrap(), alice())].into());
        (common::serve_on_loopback(&stack, resolver).await, stack)
    });
    let request = format!(
        "POST /exec/t/c?wait=10s HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        common::HOST
    );
    let mut group = c.benchmark_group("api");
    group.sample_size(50);
    group.bench_function("POST /bin/true -> completed, loopback", |b| {
        b.to_async(&runtime).iter(|| async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = Vec::with_capacity(1024);
            stream.read_to_end(&mut response).await.unwrap();
            assert!(response.starts_with(b"HTTP/1.1 200"));
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    registry_lookup,
    substitution,
    job_store,
    round_trip
);
criterion_main!(benches);
