//! Output: caps, truncation and bounded memory.

use super::*;

/// Not a test on its own: run by `an_output_flood_is_capped_and_memory_stays_bounded`
/// in a process of its own, so that the peak it measures is the flood's and
/// no other test's. Writes `baseline peak` (KiB) to the report file.
#[tokio::test]
#[ignore = "helper process for an_output_flood_is_capped_and_memory_stays_bounded"]
async fn helper_run_an_output_flood() {
    let Ok(report) = std::env::var("TAILKITD_TEST_FLOOD_REPORT") else {
        return;
    };
    let d = Stack::command(
        json!([
            "/bin/sh",
            "-c",
            "yes tailkitd | head -c $0; head -c $1 /dev/zero | tr '\\0' e >&2",
            "{{.out}}",
            "{{.err}}"
        ]),
        json!([{"name": "out", "type": "int"}, {"name": "err", "type": "int"}]),
        settings(),
    );
    // A small run first, so that the baseline already holds what any job
    // needs (code paged in, runtime threads, buffers).
    let small = d.run(r#"{"out": 1000, "err": 1000}"#).await;
    assert_eq!(small["status"], "completed", "{}", small["error"]);
    let baseline = vm_hwm_kib();
    let r = d.run(r#"{"out": 52428800, "err": 3000000}"#).await;
    let peak = vm_hwm_kib();
    assert_eq!(r["status"], "completed", "{}", r["error"]);
    // The cap counts the bytes sent: each "tailkitd\n" line takes 10
    // JSON-escaped, so 1 MiB of answer holds a little less raw output.
    let sent = serde_json::to_string(&r["stdout"]).unwrap().len() - 2;
    assert!(((1 << 20) - 1..=1 << 20).contains(&sent), "{sent}");
    assert!(
        r["stdout"]
            .as_str()
            .unwrap()
            .starts_with("tailkitd\ntailkitd\n")
    );
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(r["stderr"].as_str().unwrap().len(), 1 << 20);
    assert_eq!(r["stderr_truncated"], true);
    let finished = d
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "exec.finished")
        .nth(1)
        .unwrap();
    assert_eq!(
        finished["stdout_bytes"], 52_428_800,
        "every byte was counted"
    );
    assert_eq!(finished["stderr_bytes"], 3_000_000);
    std::fs::write(report, format!("{baseline} {peak}")).unwrap();
}

#[tokio::test]
async fn an_output_flood_is_capped_and_memory_stays_bounded() {
    // In this process the peak may already be higher than anything the
    // flood could reach (other tests run here), which would make the
    // measurement vacuous: run the flood in a fresh process instead.
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("hwm");
    let out = helper_process("output::helper_run_an_output_flood")
        .env("TAILKITD_TEST_FLOOD_REPORT", &report)
        .output()
        .await
        .unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the flood helper failed:\n{logs}");
    let report = std::fs::read_to_string(&report).expect("the helper wrote its report");
    let [baseline, peak]: [u64; 2] = report
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let grown_mib = peak.saturating_sub(baseline) / 1024;
    eprintln!("flood helper: peak {peak} KiB, {grown_mib} MiB over its baseline {baseline} KiB");
    // The kept result alone is 2 MiB (and the answer's JSON as much again),
    // so a peak that did not move means the measurement saw nothing.
    assert!(
        peak >= baseline + 2048,
        "the peak did not rise with the result: {baseline} -> {peak} KiB"
    );
    // Keeping the flood would take over 50 MiB; the caps keep it to a few.
    assert!(grown_mib < 24, "peak memory grew by {grown_mib} MiB");
}

#[tokio::test]
async fn output_under_the_cap_is_whole_and_not_truncated() {
    let d = Stack::command(
        json!(["/bin/sh", "-c", "printf 'caf\\303\\251 \\377'"]),
        json!([]),
        settings(),
    );
    let r = d.run("").await;
    assert_eq!(r["stdout"], "café \u{fffd}", "lossy UTF-8");
    assert_eq!(r["stdout_truncated"], false);
}

/// A stack whose command `t/c` writes `{{.n}}` bytes of `{{.byte}}` (an
/// octal escape for `tr`), with `api` settings.
fn bytes_stack(api: tailkitd::api::ApiSettings) -> Stack {
    let tool = json!({"name": "t", "commands": [{
        "name": "c",
        "exec_parts": ["/bin/sh", "-c", "head -c \"$0\" /dev/zero | tr '\\0' \"$1\"", "{{.n}}", "{{.byte}}"],
        "args": [{"name": "n", "type": "int", "required": true},
                 {"name": "byte", "required": true, "pattern": "^\\\\[0-7]{3}$"}],
        "timeout": "30s"}]});
    Stack::build(
        &[("t.json", &tool.to_string())],
        settings(),
        api,
        tailkitd::audit::AuditLog::in_memory(),
    )
}

/// `GET path` through the router as alice, the answer's body not read.
async fn get_unread(d: &Stack, path: &str) -> axum::response::Response {
    use tower::ServiceExt;
    let mut req = axum::http::Request::get(path)
        .header("host", HOST)
        .body(axum::body::Body::empty())
        .unwrap();
    let peer: SocketAddr = "100.64.0.7:40000".parse().unwrap();
    req.extensions_mut()
        .insert(tailkitd::api::PeerIdentity::known(peer, alice()));
    d.api.router().oneshot(req).await.unwrap()
}

#[tokio::test]
async fn control_bytes_do_not_multiply_the_answer_past_the_cap() {
    let d = bytes_stack(tailkitd::api::ApiSettings::new(HOST, vec![HOST.into()]));
    let r = d.run(r#"{"n": 1048576, "byte": "\\001"}"#).await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["stdout_truncated"], true);
    let kept = r["stdout"].as_str().unwrap();
    assert!(kept.bytes().all(|b| b == 1));
    assert_eq!(
        kept.len(),
        (1 << 20) / 6,
        "as many as fit in 1 MiB as \\u0001"
    );
    let id = r["job_id"].as_str().unwrap();
    let answer = get_unread(&d, &format!("/exec/jobs/{id}")).await;
    let body = http_body_util::BodyExt::collect(answer.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(
        body.len() <= (1 << 20) + 1024,
        "a {} byte answer",
        body.len()
    );
    let finished = d.audit_records().pop().unwrap();
    assert_eq!(
        finished["stdout_bytes"], 1_048_576,
        "every byte was counted"
    );
}

#[tokio::test]
async fn answers_share_one_buffer_within_a_budget_of_bytes_in_flight() {
    use http_body_util::BodyExt;
    let d = bytes_stack(tailkitd::api::ApiSettings {
        max_response_bytes_in_flight: 100 << 10,
        response_budget_wait: Duration::from_millis(200),
        ..tailkitd::api::ApiSettings::new(HOST, vec![HOST.into()])
    });
    let budget = d.api.response_budget_available();
    assert_eq!(budget, 100 << 10);
    let a = d.run(r#"{"n": 61440, "byte": "\\141"}"#).await;
    let b = d.run(r#"{"n": 61440, "byte": "\\142"}"#).await;
    let (a, b) = (a["job_id"].as_str().unwrap(), b["job_id"].as_str().unwrap());
    assert_eq!(
        d.api.response_budget_available(),
        budget,
        "answers read are released"
    );

    // Two unread answers of the same result: one buffer, counted once.
    let first = get_unread(&d, &format!("/exec/jobs/{a}")).await;
    let second = get_unread(&d, &format!("/exec/jobs/{a}")).await;
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let held = budget - d.api.response_budget_available();
    assert!((61440..70_000).contains(&held), "{held} bytes held");
    // Another result does not fit beside it: 503, Retry-After.
    let refused = get_unread(&d, &format!("/exec/jobs/{b}")).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "1");
    // Both answers send the very same bytes (no copy).
    let mut first = first.into_body();
    let mut second = second.into_body();
    let one = first.frame().await.unwrap().unwrap().into_data().unwrap();
    let two = second.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(one.as_ptr(), two.as_ptr());
    drop((first, second));
    // The transport holds a chunk until it is written: so does the charge.
    assert!(d.api.response_budget_available() < budget);
    drop((one, two));
    assert_eq!(
        d.api.response_budget_available(),
        budget,
        "the buffer is released"
    );
    let again = get_unread(&d, &format!("/exec/jobs/{b}")).await;
    assert_eq!(again.status(), StatusCode::OK);
}
