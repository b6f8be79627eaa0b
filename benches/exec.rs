//! Benchmarks of the exec core: registry lookup, argument validation and
//! substitution, the job store at 100k jobs, and one POST → completed round
//! trip of `/bin/true` through the router on loopback.

use std::hint::black_box;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use tailkitd::api::{Api, ApiSettings, IdentityResolver, serve_connection};
use tailkitd::audit::AuditLog;
use tailkitd::exec::jobs::{JobLimits, JobResult, JobStatus, JobStore};
use tailkitd::exec::runner::prepare;
use tailkitd::exec::{ExecSettings, Executor, Registry, ToolLimits};
use tailkitd::tailnet::Identity;
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
    let tool = tailkitd::exec::tool::parse_str(
        &text,
        tailkitd::exec::tool::Format::Json,
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
        job_id: id.to_string(),
        status: JobStatus::Completed,
        exit_code: 0,
        stdout: "ok\n".into(),
        stderr: String::new(),
        duration_ms: 1,
        error: None,
        tool: "t".into(),
        command: "c".into(),
        stdout_truncated: false,
        stderr_truncated: false,
        started_at: None,
        finished_at: None,
        signal: None,
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

struct Alice;

impl IdentityResolver for Alice {
    fn resolve(
        &self,
        _peer: SocketAddr,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<Identity, String>> + Send + '_>> {
        Box::pin(async { Ok(alice()) })
    }
}

fn round_trip(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("t.json"),
        r#"{"name": "t", "commands": [{"name": "c", "exec_parts": ["/bin/true"]}]}"#,
    )
    .unwrap();
    let addr = runtime.block_on(async {
        let registry = Arc::new(Registry::load(dir.path(), ToolLimits::default()));
        let audit = Arc::new(AuditLog::open(std::path::Path::new("/dev/null")).unwrap());
        let settings = ExecSettings {
            launcher: env!("CARGO_BIN_EXE_tailkitd-launch").into(),
            ..ExecSettings::default()
        };
        let api = Api::new(
            registry,
            Executor::new(settings, audit),
            ApiSettings::new("bench", vec!["bench".into()]),
        );
        let router = api.router();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let resolver: Arc<dyn IdentityResolver> = Arc::new(Alice);
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                tokio::spawn(serve_connection(
                    stream,
                    peer,
                    resolver.clone(),
                    router.clone(),
                    std::future::pending::<()>(),
                ));
            }
        });
        addr
    });
    let request = b"POST /exec/t/c?wait=10s HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    let mut group = c.benchmark_group("api");
    group.sample_size(50);
    group.bench_function("POST /bin/true -> completed, loopback", |b| {
        b.to_async(&runtime).iter(|| async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(request).await.unwrap();
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
