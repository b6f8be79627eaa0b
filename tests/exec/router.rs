//! The router with a constructed identity: guards, the order of the exec
//! checks, denials and their audit records (no tailnet, no processes: the
//! launcher does not exist, so an accepted job fails to start).

use axum::http::Request;
use tailkitd::api::{ApiSettings, PeerIdentity};
use tailkitd::audit::AuditLog;

use super::*;

const TOOLS: &str = r#"{
  "name": "demo",
  "version": "1",
  "tsnet_host": "",
  "commands": [
    {"name": "open", "description": "", "acl_cap": "", "exec_parts": ["echo", "{{.word}}"], "timeout": 0,
     "args": [{"name": "word", "type": "string", "required": false, "pattern": "^[a-z]+$", "default": "hi"},
              {"name": "secret", "type": "string", "required": false, "sensitive": true}]},
    {"name": "closed", "description": "", "acl_cap": "example.com/cap/x", "exec_parts": ["true"], "timeout": 0}
  ]
}"#;

/// The stack of these tests: the launcher does not exist, so an accepted
/// job fails to start.
fn fixture_with(settings: ApiSettings, audit: AuditLog) -> Stack {
    let exec = ExecSettings {
        launcher: "/nonexistent/tailkitd".into(),
        ..ExecSettings::default()
    };
    Stack::build(&[("demo.json", TOOLS)], exec, settings, audit)
}

fn settings() -> ApiSettings {
    ApiSettings::new(
        "tailkitd-test",
        vec![
            "tailkitd-test".into(),
            "tailkitd-test.tail1234.ts.net".into(),
            "100.64.0.1".into(),
            "[fd7a:115c:a1e0::1]".into(),
        ],
    )
}

fn fixture() -> Stack {
    fixture_with(settings(), AuditLog::in_memory())
}

fn peer() -> SocketAddr {
    "100.64.0.7:41000".parse().unwrap()
}

fn alice(caps: &[&str]) -> Identity {
    Identity {
        node_name: "laptop.tail1234.ts.net".into(),
        node_id: "nAlice".into(),
        ips: vec![peer().ip()],
        user_login: "alice@example.com".into(),
        tags: vec![],
        caps: caps.iter().map(|c| (c.to_string(), vec![])).collect(),
    }
}

fn request(method: &str, path: &str) -> axum::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "tailkitd-test")
}

async fn send(
    f: &Stack,
    builder: axum::http::request::Builder,
    body: &str,
    who: Option<PeerIdentity>,
) -> (StatusCode, Value, axum::http::HeaderMap) {
    f.send(builder, body, who).await
}

async fn call(
    f: &Stack,
    method: &str,
    path: &str,
    body: &str,
    id: Identity,
) -> (StatusCode, Value) {
    let (s, v, _) = send(
        f,
        request(method, path),
        body,
        Some(PeerIdentity::known(peer(), id)),
    )
    .await;
    (s, v)
}

fn denials(f: &Stack) -> Vec<Value> {
    f.denials()
}

#[tokio::test]
async fn health_answers_with_the_hostname() {
    let f = fixture();
    let (s, v) = call(&f, "GET", "/health", "", alice(&[])).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v,
        json!({"status": "ok", "hostname": "tailkitd-test", "audit": "ok"})
    );
}

#[tokio::test]
async fn only_this_nodes_host_names_are_served() {
    let f = fixture();
    let who = || Some(PeerIdentity::known(peer(), alice(&[])));
    for host in [
        "tailkitd-test",
        "TAILKITD-TEST:80",
        "tailkitd-test.tail1234.ts.net.",
        "100.64.0.1:8080",
        "[fd7a:115c:a1e0::1]:80",
        "[FD7A:115C:A1E0::1]",
    ] {
        let b = Request::builder().uri("/health").header("host", host);
        assert_eq!(send(&f, b, "", who()).await.0, StatusCode::OK, "{host}");
    }
    for host in [
        "evil.example.com",
        "tailkitd-test.evil.com",
        "127.0.0.1",
        "localhost:80",
        "100.64.0.10",
    ] {
        let b = Request::builder().uri("/health").header("host", host);
        let (s, v, _) = send(&f, b, "", who()).await;
        assert_eq!(s, StatusCode::MISDIRECTED_REQUEST, "{host}");
        assert!(v["error"].is_string() && v["hint"].is_string());
    }
    let b = Request::builder().uri("/health");
    assert_eq!(
        send(&f, b, "", who()).await.0,
        StatusCode::MISDIRECTED_REQUEST,
        "no Host"
    );
    let empty = fixture_with(
        ApiSettings::new("tailkitd-test", vec![]),
        AuditLog::in_memory(),
    );
    let b = request("GET", "/health");
    assert_eq!(
        send(&empty, b, "", who()).await.0,
        StatusCode::MISDIRECTED_REQUEST
    );
}

#[tokio::test]
async fn page_style_requests_never_run_anything() {
    let f = fixture();
    let who = || Some(PeerIdentity::known(peer(), alice(&[])));
    let cases = [
        request("POST", "/exec/demo/open").header("origin", "https://evil.example.com"),
        request("POST", "/exec/demo/open").header("content-type", "text/plain;charset=UTF-8"),
        request("POST", "/exec/demo/open")
            .header("content-type", "application/x-www-form-urlencoded"),
        request("POST", "/exec/demo/open")
            .header("content-type", "Multipart/Form-Data; boundary=x"),
    ];
    for b in cases {
        let (s, v, _) = send(&f, b, "{}", who()).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert!(v["hint"].as_str().unwrap().contains("curl"), "{v}");
    }
    let foreign = Request::builder()
        .method("POST")
        .uri("/exec/demo/open")
        .header("host", "attacker.example.com");
    assert_eq!(
        send(&f, foreign, "{}", who()).await.0,
        StatusCode::MISDIRECTED_REQUEST
    );
    assert!(f.api.executor().jobs().is_empty(), "no job was created");
    let denied = denials(&f);
    assert_eq!(denied.len(), 5);
    assert_eq!(denied[0]["http_status"], 403);
    assert_eq!(denied[4]["http_status"], 421);
    assert_eq!(denied[0]["caller"]["user"], "alice@example.com");
    // Programs' content types are fine (the Go SDK sends octet-stream).
    for ct in ["application/octet-stream", "application/json"] {
        let b = request("GET", "/health").header("content-type", ct);
        assert_eq!(send(&f, b, "", who()).await.0, StatusCode::OK);
    }
}

#[tokio::test]
async fn unknown_callers_are_refused_and_audited() {
    let f = fixture();
    let failed = PeerIdentity {
        peer: peer(),
        identity: Err("whois: no such peer".into()),
    };
    let (s, v, _) = send(&f, request("POST", "/exec/demo/open"), "", Some(failed)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(v["error"], "could not identify caller");
    let (s, _, _) = send(&f, request("GET", "/tools"), "", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "no identity at all");
    let denied = denials(&f);
    assert_eq!(denied.len(), 1, "only the exec request is audited");
    assert_eq!(denied[0]["caller"]["ip"], "100.64.0.7");
    assert_eq!(denied[0]["caller"]["node"], "");
    assert!(f.api.executor().jobs().is_empty());
}

#[tokio::test]
async fn exec_checks_come_in_spec_order() {
    let f = fixture();
    let cases: Vec<(&str, String, Vec<&str>, StatusCode, &str)> = vec![
        (
            "/exec/nope/open",
            "{".into(),
            vec![],
            StatusCode::NOT_FOUND,
            "unknown tool",
        ),
        (
            "/exec/demo/nope",
            "{".into(),
            vec![],
            StatusCode::NOT_FOUND,
            "unknown tool",
        ),
        (
            "/exec/demo/closed",
            "{".into(),
            vec![],
            StatusCode::FORBIDDEN,
            "example.com/cap/x",
        ),
        (
            "/exec/demo/open",
            "x".repeat(64 * 1024 + 1),
            vec![],
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger",
        ),
        (
            "/exec/demo/open",
            "[1]".into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "JSON object",
        ),
        (
            "/exec/demo/open",
            "{".into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid body",
        ),
        (
            "/exec/demo/open",
            r#"{"word": "a", "word": "b"}"#.into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "duplicate key \"word\"",
        ),
        (
            "/exec/demo/open",
            r#"{"word": "a", "x": {"k": 1, "k": 2}}"#.into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "duplicate key \"k\"",
        ),
        (
            "/exec/demo/open",
            r#"{"nope": "a"}"#.into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "\"nope\"",
        ),
        (
            "/exec/demo/open",
            r#"{"word": "A"}"#.into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "\"word\"",
        ),
        (
            "/exec/demo/open?wait=61s",
            "{}".into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "wait",
        ),
        (
            "/exec/demo/open?wait=soon",
            "{}".into(),
            vec![],
            StatusCode::BAD_REQUEST,
            "wait",
        ),
        (
            "/exec/demo/closed?wait=soon",
            "{}".into(),
            vec!["example.com/cap/x"],
            StatusCode::BAD_REQUEST,
            "wait",
        ),
    ];
    for (path, body, caps, status, needle) in cases {
        let (s, v) = call(&f, "POST", path, &body, alice(&caps)).await;
        assert_eq!(s, status, "{path} {body:.40}: {v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{path}: {v}");
    }
    assert!(f.api.executor().jobs().is_empty(), "nothing was accepted");
    let denied = denials(&f);
    assert_eq!(denied.len(), 13);
    assert!(
        denied
            .iter()
            .all(|d| d["reason"].is_string() && d["http_status"].is_number())
    );
}

#[tokio::test]
async fn every_argument_rule_is_a_400_that_names_the_argument_and_starts_nothing() {
    let f = fixture();
    let typed = r#"{"name": "typed", "commands": [{"name": "c", "exec_parts": ["echo", "{{.n}}", "{{.b}}", "{{.s}}", "{{.f}}"],
        "args": [{"name": "n", "type": "int", "required": true},
                 {"name": "b", "type": "bool", "default": "false"},
                 {"name": "s", "type": "string", "pattern": "^\\d+$", "default": "0"},
                 {"name": "f", "type": "string", "default": "x"}]}]}"#;
    std::fs::write(f.dir.path().join("typed.json"), typed).unwrap();
    f.registry.reload();
    // Each case: the body, and the words of the rule it breaks. `f` has
    // no pattern, so its refusals come from the rule itself.
    let cases = [
        (json!({}), "missing argument \"n\""),
        (json!({"n": "five"}), "argument \"n\" must be an integer"),
        (json!({"n": true}), "argument \"n\" must be an integer"),
        (json!({"n": 1.5}), "argument \"n\" must be an integer"),
        (
            json!({"n": 1, "b": "yes"}),
            "argument \"b\" must be true or false",
        ),
        (json!({"n": 1, "s": 7}), "argument \"s\" must be a string"),
        (
            json!({"n": 1, "f": "1".repeat(4097)}),
            "argument \"f\" is longer than",
        ),
        (
            json!({"n": 1, "f": "12\n3"}),
            "argument \"f\" contains a control character",
        ),
        (json!({"n": 1, "f": "-1"}), "argument \"f\" starts with '-'"),
        (
            json!({"n": 1, "s": "\u{0661}"}),
            "argument \"s\" does not match",
        ),
        (json!({"n": 1, "x": 1}), "unknown argument \"x\""),
    ];
    for (body, needle) in &cases {
        let (s, v) = call(&f, "POST", "/exec/typed/c", &body.to_string(), alice(&[])).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        let error = v["error"].as_str().unwrap();
        assert!(error.contains(needle), "{body}: {v}");
    }
    assert!(
        f.api.executor().jobs().is_empty(),
        "a refused request was accepted"
    );
    assert_eq!(denials(&f).len(), cases.len());
    let good = json!({"n": 1, "b": true, "s": "42"}).to_string();
    let (s, v) = call(&f, "POST", "/exec/typed/c", &good, alice(&[])).await;
    assert_eq!(
        s,
        StatusCode::ACCEPTED,
        "the rules refuse a good request: {v}"
    );
}

#[tokio::test]
async fn a_caller_without_the_capability_gets_403_before_413() {
    let f = fixture();
    let big = "x".repeat(64 * 1024 + 1);
    let (s, v) = call(&f, "POST", "/exec/demo/closed", &big, alice(&[])).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // Also when the size is only declared (refused before reading).
    let b = request("POST", "/exec/demo/closed").header("content-length", "1000000");
    let who = PeerIdentity::known(peer(), alice(&[]));
    let (s, v, _) = send(&f, b, "", Some(who)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // With the capability, the same body is a 413.
    let caps = ["example.com/cap/x"];
    let (s, _) = call(&f, "POST", "/exec/demo/closed", &big, alice(&caps)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn bad_arguments_get_400_before_429_when_every_slot_is_busy() {
    let f = fixture();
    let jobs = f.api.executor().jobs();
    let max_jobs = f.api.executor().settings().max_jobs;
    for _ in 0..max_jobs {
        jobs.admit(alice(&[]).owner(), "demo", "open").unwrap();
    }
    for (path, body) in [
        ("/exec/demo/open", r#"{"word": "A"}"#),
        ("/exec/demo/open", r#"{"nope": "a"}"#),
        ("/exec/demo/open", "[1]"),
        ("/exec/demo/open?wait=soon", "{}"),
    ] {
        let (s, v) = call(&f, "POST", path, body, alice(&[])).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path} {body}: {v}");
    }
    // The slots really are busy: a valid request is a 429.
    let (s, _) = call(
        &f,
        "POST",
        "/exec/demo/open",
        r#"{"word": "a"}"#,
        alice(&[]),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn a_declared_oversized_body_is_refused_before_reading() {
    let f = fixture();
    let b = request("POST", "/exec/demo/open").header("content-length", "1000000");
    let (s, _, _) = send(&f, b, "", Some(PeerIdentity::known(peer(), alice(&[])))).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn require_cap_refuses_commands_without_acl_cap() {
    let mut s = settings();
    s.require_cap = true;
    let f = fixture_with(s, AuditLog::in_memory());
    let (status, v) = call(&f, "POST", "/exec/demo/open", "", alice(&[])).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(v["error"].as_str().unwrap().contains("acl_cap"));
    let (_, tools) = call(&f, "GET", "/tools", "", alice(&["example.com/cap/x"])).await;
    assert_eq!(tools[0]["commands"].as_array().unwrap().len(), 1);
    assert_eq!(tools[0]["commands"][0]["name"], "closed");
}

#[tokio::test]
async fn tools_lists_what_the_caller_may_run() {
    let f = fixture();
    let (s, tools) = call(&f, "GET", "/tools", "", alice(&[])).await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = tools[0]["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["open"]);
    assert_eq!(tools[0]["commands"][0]["timeout"], 0);
    let (_, tools) = call(&f, "GET", "/tools", "", alice(&["example.com/cap/x"])).await;
    assert_eq!(tools[0]["commands"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn accepted_jobs_are_audited_with_redacted_args_and_finish() {
    let f = fixture();
    let (s, v) = call(
        &f,
        "POST",
        "/exec/demo/open?wait=10s",
        r#"{"secret": "hunter2"}"#,
        alice(&[]),
    )
    .await;
    // The launcher does not exist: the job was accepted, then failed to start.
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "failed");
    assert_eq!(v["exit_code"], -1);
    assert!(
        v["error"].as_str().unwrap().contains("could not start"),
        "{v}"
    );
    let lines: Vec<Value> = f
        .audit
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["event"], "exec.accepted");
    assert_eq!(lines[0]["args"]["secret"], "<redacted>");
    assert_eq!(lines[1]["event"], "exec.finished");
    assert_eq!(lines[1]["job_id"], lines[0]["job_id"]);
    assert_eq!(lines[1]["status"], "failed");
    assert!(!f.audit.lines().concat().contains("hunter2"));
}

#[tokio::test]
async fn an_unwritable_audit_log_means_nothing_runs() {
    let f = fixture_with(
        settings(),
        AuditLog::open(std::path::Path::new("/dev/full")).unwrap(),
    );
    let (s, v) = call(&f, "POST", "/exec/demo/open", "", alice(&[])).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(f.api.executor().jobs().is_empty());
    assert_eq!(
        f.api.executor().jobs().active(),
        0,
        "the slot was given back"
    );
}

#[tokio::test]
async fn shutting_down_refuses_new_jobs() {
    let f = fixture();
    f.api.begin_shutdown();
    let (s, v) = call(&f, "POST", "/exec/demo/open", "", alice(&[])).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"], "shutting down");
    assert_eq!(denials(&f)[0]["http_status"], 503);
}

#[tokio::test]
async fn unknown_jobs_and_routes_are_404_json() {
    let f = fixture();
    for path in [
        "/exec/jobs/not-a-uuid",
        "/exec/jobs/00000000-0000-4000-8000-000000000000",
        "/exec/other/x",
        "/nope",
    ] {
        let (s, v) = call(&f, "GET", path, "", alice(&[])).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
        assert!(v["error"].is_string());
    }
    let (s, _) = call(
        &f,
        "DELETE",
        "/exec/jobs/00000000-0000-4000-8000-000000000000",
        "",
        alice(&[]),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&f, "PUT", "/tools", "", alice(&[])).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn malformed_hosts_targets_and_codings_are_refused_audited_and_run_nothing() {
    let f = fixture();
    let who = || Some(PeerIdentity::known(peer(), alice(&[])));
    let post = |uri: &str| Request::builder().method("POST").uri(uri);
    let cases = [
        // An absolute-form target names the host (RFC 9112 §3.2.2).
        (
            post("http://evil.example.com/exec/demo/open").header("host", "tailkitd-test"),
            StatusCode::MISDIRECTED_REQUEST,
        ),
        (
            post("http://tailkitd-test/exec/demo/open").header("host", "evil.example.com"),
            StatusCode::MISDIRECTED_REQUEST,
        ),
        (
            post("https://tailkitd-test/exec/demo/open").header("host", "tailkitd-test"),
            StatusCode::BAD_REQUEST,
        ),
        (
            post("http://tailkitd-test:0/exec/demo/open").header("host", "tailkitd-test"),
            StatusCode::BAD_REQUEST,
        ),
        (
            post("/exec/demo/open")
                .header("host", "tailkitd-test")
                .header("host", "tailkitd-test"),
            StatusCode::BAD_REQUEST,
        ),
        (
            post("/exec/demo/open").header("host", "tailkitd-test:99999"),
            StatusCode::BAD_REQUEST,
        ),
        (
            post("/exec/demo/open").header("host", "tailkitd-test:0"),
            StatusCode::BAD_REQUEST,
        ),
        (
            post("/exec/demo/open").header("host", "tailkitd-test:"),
            StatusCode::BAD_REQUEST,
        ),
        (
            request("POST", "/exec/demo/open").header("transfer-encoding", "gzip, chunked"),
            StatusCode::NOT_IMPLEMENTED,
        ),
        (
            request("POST", "/exec/demo/open")
                .header("transfer-encoding", "gzip")
                .header("transfer-encoding", "chunked"),
            StatusCode::NOT_IMPLEMENTED,
        ),
    ];
    let expected: Vec<u64> = cases.iter().map(|(_, s)| u64::from(s.as_u16())).collect();
    for (builder, status) in cases {
        let (s, v, _) = send(&f, builder, "{}", who()).await;
        assert_eq!(s, status, "{v}");
        assert!(v["error"].is_string() && v["hint"].is_string(), "{v}");
    }
    assert!(f.api.executor().jobs().is_empty(), "no job was created");
    let denied: Vec<u64> = denials(&f)
        .iter()
        .map(|d| d["http_status"].as_u64().unwrap())
        .collect();
    assert_eq!(denied, expected, "every refusal was audited");
    // What stays accepted: this node, with or without a port, plain
    // chunked bodies, and an absolute-form target naming this node.
    for builder in [
        request("GET", "/health").header("transfer-encoding", "Chunked"),
        Request::builder()
            .uri("http://tailkitd-test:80/health")
            .header("host", "tailkitd-test"),
        Request::builder()
            .uri("/health")
            .header("host", "tailkitd-test:65535"),
    ] {
        let (s, v, _) = send(&f, builder, "", who()).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
}
