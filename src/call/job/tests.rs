//! One node's call against a scripted daemon: the protocol paths a real
//! daemon does not take on demand (a daemon without live output, a stream
//! that breaks, one that keeps breaking). The daemon is reached the way
//! the tailscaled path reaches any peer: a `ts-dial` upgrade on a Unix
//! socket, after which the socket carries the HTTP exchange.

use std::io::Write;
use std::sync::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::*;
use crate::call::cli::Request;
use crate::localapi::LocalApi;

#[test]
fn a_terminal_event_stands_in_for_the_result() {
    let r = from_event("job.completed", &json!({"job_id": "j", "exit_code": 0}));
    assert_eq!(
        r,
        json!({"job_id": "j", "status": "completed", "exit_code": 0})
    );
    let r = from_event(
        "job.failed",
        &json!({"job_id": "j", "exit_code": -1, "error": "cancelled: timed out after 1s",
                "signal": "SIGTERM", "stdout_truncated": false}),
    );
    assert_eq!(r["status"], "cancelled");
    assert_eq!(r["signal"], "SIGTERM");
    let r = from_event(
        "job.failed",
        &json!({"job_id": "j", "exit_code": 2, "error": "exit status 2"}),
    );
    assert_eq!(r["status"], "failed");
    assert!(is_terminal(&r));
    assert!(!is_terminal(&json!({"status": "running"})));
}

/// What the scripted daemon does on one connection.
enum Step {
    Write(String),
    Stop(Stop, u8),
    Hold,
}

type Handler = Box<dyn Fn(&str) -> Vec<Step> + Send + Sync>;

fn json_answer(status: &str, body: Value) -> Step {
    let body = body.to_string();
    Step::Write(format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))
}

/// An event stream's head: the body runs until the connection closes.
fn events_head() -> Step {
    Step::Write(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n".into(),
    )
}

fn event(id: u64, name: &str, data: Value) -> Step {
    Step::Write(format!("event: {name}\nid: {id}\ndata: {data}\n\n"))
}

fn result(status: &str, code: i64, stdout: &str) -> Value {
    json!({"job_id": "j1", "status": status, "exit_code": code,
           "stdout": stdout, "stderr": "", "stdout_truncated": false, "stderr_truncated": false})
}

async fn read_head(s: &mut UnixStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

/// Serves one handler per connection, in order (the last one for every
/// connection after it); returns the request heads it saw.
fn daemon(listener: UnixListener, script: Vec<Handler>) -> Arc<Mutex<Vec<String>>> {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let dial = read_head(&mut s).await;
            assert!(dial.starts_with("post /localapi/v0/dial "), "{dial}");
            s.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ts-dial\r\n\r\n",
            )
            .await
            .unwrap();
            let head = read_head(&mut s).await;
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |n| n.trim().parse().unwrap());
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).await.unwrap();
            seen.lock().unwrap().push(head.clone());
            let handler = script.get(n).or(script.last()).expect("a script");
            let steps = handler(&head);
            tokio::spawn(async move {
                for step in steps {
                    match step {
                        Step::Write(text) => {
                            if s.write_all(text.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        Step::Stop(stop, exit) => stop.trigger(exit),
                        Step::Hold => {
                            let mut rest = Vec::new();
                            let _ = s.read_to_end(&mut rest).await;
                        }
                    }
                }
            });
        }
    });
    heads
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Runs `action` against the scripted daemon: the report, the request
/// heads, the local stdout and stderr.
async fn call_with(
    script: Vec<Handler>,
    stop: Stop,
    action: Action,
) -> (Report, Vec<String>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("tailscaled.sock");
    let heads = daemon(UnixListener::bind(&sock).unwrap(), script);
    let (out, err) = (Captured::default(), Captured::default());
    let (output, printer) = Output::start_to(
        (Box::new(out.clone()), Box::new(err.clone())),
        vec!["tk".into()],
        false,
        false,
        stop.clone(),
    );
    let call = NodeCall {
        tailnet: Arc::new(Tailnet::Tailscaled(LocalApi::new(&sock))),
        target: Target {
            name: "tk".into(),
            addr: "100.64.0.9:80".parse().unwrap(),
            host: "tk.ts.net".into(),
        },
        index: 0,
        out: output,
        stop,
        timeout: None,
        live: true,
    };
    let report = tokio::time::timeout(Duration::from_secs(60), call.run(&action))
        .await
        .expect("the call ends");
    drop(call);
    printer.finish().await;
    let heads = heads.lock().unwrap().clone();
    (report, heads, out.text(), err.text())
}

fn run_action() -> Action {
    Action::Run(Request {
        tool: "t".into(),
        command: "c".into(),
        args: serde_json::Map::new(),
    })
}

#[tokio::test]
async fn a_daemon_without_live_output_is_polled_and_its_output_printed_as_is() {
    let script: Vec<Handler> = vec![
        Box::new(|_| {
            vec![json_answer(
                "202 Accepted",
                json!({"job_id": "j1", "status": "accepted"}),
            )]
        }),
        Box::new(|_| {
            let mut r = result("completed", 0, "a\nb");
            r["stderr"] = json!("e\n");
            vec![json_answer("200 OK", r)]
        }),
    ];
    let (report, heads, out, err) = call_with(script, Stop::new(), run_action()).await;
    assert_eq!((report.outcome, report.exit), (Outcome::Completed, 0));
    assert!(
        heads[0].starts_with("post /exec/t/c?stream=true "),
        "{heads:?}"
    );
    assert!(heads[0].contains("host: tk.ts.net\r\n"), "{heads:?}");
    assert!(
        heads[1].starts_with("get /exec/jobs/j1?wait=30s "),
        "{heads:?}"
    );
    // One node: the bytes as they are, no newline added.
    assert_eq!((out.as_str(), err.as_str()), ("a\nb", "e\n"));
}

#[tokio::test]
async fn a_broken_stream_resumes_after_the_last_event() {
    let script: Vec<Handler> = vec![
        Box::new(|_| {
            vec![
                events_head(),
                event(
                    1,
                    "job.status",
                    json!({"job_id": "j1", "status": "accepted"}),
                ),
                event(
                    2,
                    "job.status",
                    json!({"job_id": "j1", "status": "running"}),
                ),
                event(
                    3,
                    "job.stdout",
                    json!({"job_id": "j1", "line": "one", "stream": "stdout"}),
                ),
            ]
        }),
        Box::new(|head| {
            assert!(head.starts_with("get /exec/jobs/j1?stream=true "), "{head}");
            assert!(head.contains("last-event-id: 3\r\n"), "{head}");
            vec![
                events_head(),
                event(
                    4,
                    "job.stderr",
                    json!({"job_id": "j1", "line": "two", "stream": "stderr"}),
                ),
                event(5, "job.completed", json!({"job_id": "j1", "exit_code": 0})),
            ]
        }),
        Box::new(|head| {
            assert!(head.starts_with("get /exec/jobs/j1?wait=10s "), "{head}");
            vec![json_answer("200 OK", result("completed", 0, "one\n"))]
        }),
    ];
    let (report, heads, out, err) = call_with(script, Stop::new(), run_action()).await;
    assert_eq!(
        (report.outcome, report.exit),
        (Outcome::Completed, 0),
        "{report:?}"
    );
    assert_eq!(heads.len(), 3, "{heads:?}");
    assert_eq!((out.as_str(), err.as_str()), ("one\n", "two\n"));
}

#[tokio::test]
async fn a_stream_that_keeps_breaking_ends_lost() {
    let script: Vec<Handler> = vec![
        Box::new(|_| {
            vec![
                events_head(),
                event(
                    1,
                    "job.status",
                    json!({"job_id": "j1", "status": "accepted"}),
                ),
            ]
        }),
        // Every resumption: a head, nothing, the end.
        Box::new(|_| vec![events_head()]),
    ];
    let (report, heads, _, _) = call_with(script, Stop::new(), run_action()).await;
    assert_eq!(
        (report.outcome, report.exit),
        (Outcome::Lost, 255),
        "{report:?}"
    );
    assert_eq!(report.job_id.as_deref(), Some("j1"));
    assert!(
        report.error.as_deref().unwrap().contains("keeps breaking"),
        "{report:?}"
    );
    assert_eq!(heads.len(), 1 + ATTEMPTS as usize, "{heads:?}");
}

#[tokio::test]
async fn a_stop_cancels_the_job_it_started() {
    let stop = Stop::new();
    let trigger = stop.clone();
    let script: Vec<Handler> = vec![
        Box::new(move |_| {
            vec![
                events_head(),
                event(
                    1,
                    "job.status",
                    json!({"job_id": "j1", "status": "accepted"}),
                ),
                Step::Stop(trigger.clone(), 130),
                Step::Hold,
            ]
        }),
        Box::new(|head| {
            assert!(head.starts_with("delete /exec/jobs/j1 "), "{head}");
            let mut r = result("cancelled", -1, "");
            r["error"] = json!("cancelled by the caller");
            vec![json_answer("200 OK", r)]
        }),
    ];
    let (report, heads, _, _) = call_with(script, stop, run_action()).await;
    assert_eq!(
        (report.outcome, report.exit),
        (Outcome::Interrupted, 130),
        "{report:?}"
    );
    assert_eq!(heads.len(), 2, "{heads:?}");
}

#[tokio::test]
async fn refusals_carry_the_error_and_hint_and_busy_is_asked_again() {
    let script: Vec<Handler> = vec![
        Box::new(|_| {
            vec![Step::Write(
                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 17\r\n\r\n{\"error\":\"busy\"}\n"
                    .into(),
            )]
        }),
        Box::new(|_| {
            vec![json_answer(
                "403 Forbidden",
                json!({"error": "the caller lacks \u{1b}[31m x", "hint": "ask"}),
            )]
        }),
    ];
    let (report, heads, _, _) = call_with(script, Stop::new(), run_action()).await;
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert_eq!((report.outcome, report.exit), (Outcome::Refused, 255));
    assert_eq!(report.http_status, Some(403));
    assert_eq!(report.hint.as_deref(), Some("ask"));
}
