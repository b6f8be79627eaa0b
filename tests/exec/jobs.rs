//! Jobs: owners, slots, waits, shutdown.

use super::*;

#[tokio::test]
async fn a_job_is_invisible_to_another_owner() {
    let d = Stack::command(json!(["/bin/sleep", "5"]), json!([]), settings());
    let (_, v, _) = d.request(&alice(), "POST", "/exec/t/c", "").await;
    let path = format!("/exec/jobs/{}", v["job_id"].as_str().unwrap());
    let (s, _, _) = d.request(&bob(), "GET", &path, "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = d.request(&bob(), "DELETE", &path, "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, r, _) = d.request(&alice(), "GET", &path, "").await;
    assert_eq!(s, StatusCode::OK);
    assert_ne!(r["status"], "cancelled", "bob's DELETE did nothing");
    let tagged = Identity {
        user_login: String::new(),
        tags: vec!["tag:ci".into()],
        ..alice()
    };
    assert_eq!(
        d.request(&tagged, "GET", &path, "").await.0,
        StatusCode::NOT_FOUND
    );
    d.request(&alice(), "DELETE", &path, "").await;
}

#[tokio::test]
async fn full_slots_answer_429_with_retry_after() {
    let d = Stack::command(
        json!(["/bin/sleep", "1000"]),
        json!([]),
        ExecSettings {
            max_jobs: 1,
            ..settings()
        },
    );
    let (s, first, _) = d.request(&alice(), "POST", "/exec/t/c", "").await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, v, headers) = d.request(&bob(), "POST", "/exec/t/c", "").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(headers["retry-after"], "1");
    let denied = d
        .audit_records()
        .into_iter()
        .find(|r| r["event"] == "exec.denied")
        .unwrap();
    assert_eq!(denied["http_status"], 429);
    assert_eq!(denied["caller"]["user"], "bob@example.com");
    let path = format!("/exec/jobs/{}", first["job_id"].as_str().unwrap());
    assert_eq!(
        d.request(&alice(), "DELETE", &path, "").await.1["status"],
        "cancelled"
    );
    let (s, _, _) = d.request(&bob(), "POST", "/exec/t/c", "").await;
    assert_eq!(s, StatusCode::ACCEPTED, "the slot is free again");
    d.api.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn get_with_wait_long_polls_until_the_job_ends() {
    let d = Stack::command(
        json!(["/bin/sh", "-c", "sleep 0.3; echo done"]),
        json!([]),
        settings(),
    );
    let (_, v, _) = d.request(&alice(), "POST", "/exec/t/c", "").await;
    let path = format!("/exec/jobs/{}?wait=30s", v["job_id"].as_str().unwrap());
    let (s, r, _) = d.request(&alice(), "GET", &path, "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (r["status"].as_str(), r["stdout"].as_str()),
        (Some("completed"), Some("done\n"))
    );
    let (s, _, _) = d.request(&alice(), "GET", &format!("{path}0000"), "").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "wait over the maximum");
}

#[tokio::test]
async fn post_with_a_short_wait_answers_202_for_a_slow_job() {
    let d = Stack::command(json!(["/bin/sleep", "1000"]), json!([]), settings());
    let (s, v, _) = d
        .request(&alice(), "POST", "/exec/t/c?wait=100ms", "")
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
    d.api.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn shutdown_lets_short_jobs_finish_and_cancels_the_rest() {
    let d = Stack::command(
        json!(["/bin/sh", "-c", "{{.s}}"]),
        json!([{"name": "s"}]),
        settings(),
    );
    let post = |script: &'static str| {
        let d = &d;
        async move {
            let (_, v, _) = d
                .request(
                    &alice(),
                    "POST",
                    "/exec/t/c",
                    &json!({"s": script}).to_string(),
                )
                .await;
            v["job_id"].as_str().unwrap().to_string()
        }
    };
    let short = post("sleep 0.2; echo short").await;
    let long = post("trap '' TERM; sleep 1000").await;
    d.api.shutdown(Duration::from_secs(2)).await;
    // Everything is terminal and audited the moment shutdown returns.
    let get = |id: &str| {
        d.api
            .executor()
            .jobs()
            .get(id.parse().unwrap(), &alice())
            .unwrap()
    };
    assert_eq!(get(&short).status.as_str(), "completed");
    let long = get(&long);
    assert_eq!(long.status.as_str(), "cancelled");
    assert!(long.error.as_deref().unwrap().contains("shutting down"));
    let finished: Vec<Value> = d
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "exec.finished")
        .collect();
    assert_eq!(finished.len(), 2);
    let (s, v, _) = d
        .request(&alice(), "POST", "/exec/t/c", r#"{"s": "true"}"#)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"], "shutting down");
}
