//! How a call ended on one node ([`Report`]), the exit status that stands
//! for it, and the fleet's summary table and JSON lines.

use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

use serde_json::{Value, json};

/// The exit status when the command never ran: refused, unreachable, a bad
/// argument (like ssh's 255).
pub const EXIT_NEVER_RAN: u8 = 255;
/// The exit status of a job cancelled by a timeout (as `timeout(1)`).
pub const EXIT_TIMED_OUT: u8 = 124;
/// A fleet where some node did not complete with 0.
pub const EXIT_FLEET_FAILED: u8 = 1;

/// How the call ended on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit code 0.
    Completed,
    /// A non-zero exit, a signal, or a command that could not start.
    Failed,
    /// Cancelled by the command's timeout or `--timeout`.
    TimedOut,
    /// Cancelled by someone else (another caller, the daemon's shutdown).
    Cancelled,
    /// Stopped here (Ctrl-C, SIGTERM, a closed stdout): cancelled there,
    /// or, when following a job, left running.
    Interrupted,
    /// Started with `--async`.
    Started,
    /// The daemon refused the request: nothing ran.
    Refused,
    /// The node could not be reached (or named no peer): nothing ran.
    Unreachable,
    /// The job started, but its end could not be learned.
    Lost,
}

impl Outcome {
    /// Its name in summaries and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed out",
            Outcome::Cancelled => "cancelled",
            Outcome::Interrupted => "interrupted",
            Outcome::Started => "started",
            Outcome::Refused => "refused",
            Outcome::Unreachable => "unreachable",
            Outcome::Lost => "lost",
        }
    }
}

/// Why the client stopped waiting, when it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    /// `--timeout` passed.
    Deadline,
    /// A signal or a closed stdout; the exit status that stands for it.
    Stopped(u8),
}

/// One node's end.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The node's name.
    pub node: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The exit status `tailkitd call` has for this node alone.
    pub exit: u8,
    /// The job, once known.
    pub job_id: Option<String>,
    /// The daemon's final job result, when there is one.
    pub result: Option<Value>,
    /// What went wrong, for the operator.
    pub error: Option<String>,
    /// The daemon's hint, with a refusal.
    pub hint: Option<String>,
    /// The HTTP status of a refusal.
    pub http_status: Option<u16>,
    /// From the first connection attempt to the end.
    pub duration: Duration,
}

impl Report {
    /// A report with no job result.
    pub fn new(node: &str, outcome: Outcome, exit: u8, error: impl Into<String>) -> Report {
        Report {
            node: node.to_string(),
            outcome,
            exit,
            job_id: None,
            result: None,
            error: Some(error.into()).filter(|e: &String| !e.is_empty()),
            hint: None,
            http_status: None,
            duration: Duration::ZERO,
        }
    }

    /// The report for a final job `result`; `halt` says whether the client
    /// cancelled it (and why).
    pub fn from_result(node: &str, result: Value, halt: Option<Halt>) -> Report {
        let (outcome, exit) = judge(&result, halt);
        let error = match outcome {
            Outcome::Completed => None,
            Outcome::Failed
                if result["error"]
                    .as_str()
                    .is_none_or(|e| e.starts_with("exit status")) =>
            {
                None
            }
            _ => result["error"].as_str().map(str::to_string),
        };
        Report {
            node: node.to_string(),
            outcome,
            exit,
            job_id: result["job_id"].as_str().map(str::to_string),
            error,
            hint: None,
            http_status: None,
            duration: Duration::ZERO,
            result: Some(result),
        }
    }

    /// Output the daemon cut at its cap, for a note.
    pub fn truncated(&self) -> Vec<&'static str> {
        let Some(r) = &self.result else {
            return Vec::new();
        };
        [
            ("stdout", "stdout_truncated"),
            ("stderr", "stderr_truncated"),
        ]
        .into_iter()
        .filter(|(_, k)| r[k] == Value::Bool(true))
        .map(|(name, _)| name)
        .collect()
    }

    /// One JSON line for `--json` with several nodes.
    pub fn json_line(&self) -> String {
        let mut v = json!({
            "node": self.node,
            "status": self.outcome.as_str(),
            "exit_code": self.exit,
            "duration_ms": u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
            "job_id": self.job_id,
            "result": self.result,
        });
        for (k, val) in [("error", &self.error), ("hint", &self.hint)] {
            if let Some(val) = val {
                v[k] = json!(val);
            }
        }
        if let Some(s) = self.http_status {
            v["http_status"] = json!(s);
        }
        v.to_string()
    }

    /// What `--json` prints for one node: the daemon's job result as is,
    /// or, when there is none, `{"error", "hint"?, "http_status"?}`.
    pub fn json_result(&self) -> String {
        if let Some(r) = &self.result {
            return r.to_string();
        }
        let mut v = json!({ "error": self.error.as_deref().unwrap_or(self.outcome.as_str()) });
        if let Some(job) = &self.job_id {
            v["job_id"] = json!(job);
        }
        if let Some(h) = &self.hint {
            v["hint"] = json!(h);
        }
        if let Some(s) = self.http_status {
            v["http_status"] = json!(s);
        }
        v.to_string()
    }
}

/// The outcome and exit status of a job result: `completed` 0; `failed`
/// with its exit code, 128 + the signal's number when a signal killed it,
/// 255 when it could not start; `cancelled` 124 when a timeout did it,
/// the halt's status when the client did, else 255.
fn judge(result: &Value, halt: Option<Halt>) -> (Outcome, u8) {
    let code = result["exit_code"].as_i64().unwrap_or(-1);
    let error = result["error"].as_str().unwrap_or("");
    match result["status"].as_str().unwrap_or("") {
        "completed" => (Outcome::Completed, 0),
        "failed" => {
            let exit = match (code, result["signal"].as_str()) {
                (1..=255, _) => u8::try_from(code).unwrap_or(EXIT_NEVER_RAN),
                (_, Some(sig)) => signal_exit(sig),
                _ => EXIT_NEVER_RAN,
            };
            (Outcome::Failed, exit)
        }
        "cancelled" => match halt {
            Some(Halt::Deadline) => (Outcome::TimedOut, EXIT_TIMED_OUT),
            Some(Halt::Stopped(exit)) => (Outcome::Interrupted, exit),
            None if error.contains("timed out") || error.contains("deadline exceeded") => {
                (Outcome::TimedOut, EXIT_TIMED_OUT)
            }
            None => (Outcome::Cancelled, EXIT_NEVER_RAN),
        },
        _ => (Outcome::Lost, EXIT_NEVER_RAN),
    }
}

/// 128 + the number of a signal named like `SIGKILL` (255 if unknown).
fn signal_exit(name: &str) -> u8 {
    nix::sys::signal::Signal::from_str(name)
        .ok()
        .and_then(|s| u8::try_from(128 + s as i32).ok())
        .unwrap_or(EXIT_NEVER_RAN)
}

/// The exit status of a fleet: 0 when every node completed with 0, the
/// halt's status when the client was stopped, else 1.
pub fn fleet_exit(reports: &[Report], stopped: Option<u8>) -> u8 {
    match stopped {
        Some(code) => code,
        None if reports.iter().all(|r| r.exit == 0) => 0,
        None => EXIT_FLEET_FAILED,
    }
}

/// The summary table: node, status, exit status, duration, and what went
/// wrong; a last line counting the outcomes.
pub fn summary(reports: &[Report]) -> String {
    let width = |f: &dyn Fn(&Report) -> usize, title: &str| {
        reports.iter().map(f).max().unwrap_or(0).max(title.len())
    };
    let wn = width(&|r| r.node.len(), "NODE");
    let ws = width(&|r| r.outcome.as_str().len(), "STATUS");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:wn$}  {:ws$}  EXIT  {:>8}  ERROR",
        "NODE", "STATUS", "TIME"
    );
    for r in reports {
        let mut note = r.error.clone().unwrap_or_default();
        for pipe in r.truncated() {
            if !note.is_empty() {
                note.push_str("; ");
            }
            let _ = write!(note, "{pipe} truncated at the daemon's cap");
        }
        let line = format!(
            "{:wn$}  {:ws$}  {:>4}  {:>8}  {}",
            r.node,
            r.outcome.as_str(),
            r.exit,
            format_duration(r.duration),
            first_line(&note),
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let ok = reports.iter().filter(|r| r.exit == 0).count();
    let _ = writeln!(out, "{ok} of {} nodes succeeded", reports.len());
    out
}

fn first_line(s: &str) -> String {
    printable(s.lines().next().unwrap_or(""))
}

/// `s` with control characters (a terminal's escape sequences) replaced:
/// for the daemon's words in notes and tables, never for the remote
/// command's own output.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

/// `850ms`, `12.3s`, `4m05s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: &str, code: i64, error: Option<&str>, signal: Option<&str>) -> Value {
        let mut r = json!({"job_id": "j1", "status": status, "exit_code": code,
                           "stdout": "", "stderr": ""});
        if let Some(e) = error {
            r["error"] = json!(e);
        }
        if let Some(s) = signal {
            r["signal"] = json!(s);
        }
        r
    }

    #[test]
    fn results_map_to_exit_statuses() {
        let j = |r: Value, halt| {
            let rep = Report::from_result("n", r, halt);
            (rep.outcome, rep.exit)
        };
        assert_eq!(
            j(result("completed", 0, None, None), None),
            (Outcome::Completed, 0)
        );
        assert_eq!(
            j(result("failed", 3, Some("exit status 3"), None), None),
            (Outcome::Failed, 3)
        );
        assert_eq!(
            j(
                result(
                    "failed",
                    -1,
                    Some("killed by signal SIGKILL"),
                    Some("SIGKILL")
                ),
                None
            ),
            (Outcome::Failed, 137)
        );
        assert_eq!(
            j(
                result("failed", -1, Some("could not start: ENOENT"), None),
                None
            ),
            (Outcome::Failed, 255)
        );
        assert_eq!(
            j(
                result(
                    "cancelled",
                    -1,
                    Some("cancelled: timed out after 30s"),
                    Some("SIGTERM")
                ),
                None
            ),
            (Outcome::TimedOut, 124)
        );
        let by_caller = result("cancelled", -1, Some("cancelled by the caller"), None);
        assert_eq!(
            j(by_caller.clone(), Some(Halt::Deadline)),
            (Outcome::TimedOut, 124)
        );
        assert_eq!(
            j(by_caller.clone(), Some(Halt::Stopped(130))),
            (Outcome::Interrupted, 130)
        );
        assert_eq!(j(by_caller, None), (Outcome::Cancelled, 255));
        // Finished before the cancel reached it: the real end counts.
        assert_eq!(
            j(result("completed", 0, None, None), Some(Halt::Stopped(130))),
            (Outcome::Completed, 0)
        );
        assert_eq!(
            j(result("running", 0, None, None), None),
            (Outcome::Lost, 255)
        );
    }

    #[test]
    fn errors_are_kept_except_plain_exit_statuses() {
        let r = Report::from_result("n", result("failed", 2, Some("exit status 2"), None), None);
        assert_eq!(r.error, None);
        assert_eq!(r.job_id.as_deref(), Some("j1"));
        let r = Report::from_result(
            "n",
            result("failed", -1, Some("could not start: x"), None),
            None,
        );
        assert_eq!(r.error.as_deref(), Some("could not start: x"));
    }

    #[test]
    fn a_fleet_exits_0_only_when_every_node_did() {
        let ok = Report::new("a", Outcome::Completed, 0, "");
        let bad = Report::new("b", Outcome::Unreachable, 255, "dial: refused");
        assert_eq!(fleet_exit(&[ok.clone(), ok.clone()], None), 0);
        assert_eq!(fleet_exit(&[ok.clone(), bad.clone()], None), 1);
        assert_eq!(fleet_exit(&[ok], Some(130)), 130);
        let table = summary(&[bad]);
        assert!(table.starts_with("NODE  STATUS"), "{table}");
        assert!(table.contains("b     unreachable   255"), "{table}");
        assert!(table.contains("dial: refused"), "{table}");
        assert!(table.ends_with("0 of 1 nodes succeeded\n"), "{table}");
    }

    #[test]
    fn json_lines_carry_node_status_exit_and_result() {
        let mut r = Report::from_result(
            "web1",
            result("failed", 2, Some("exit status 2"), None),
            None,
        );
        r.duration = Duration::from_millis(1500);
        let v: Value = serde_json::from_str(&r.json_line()).unwrap();
        assert_eq!(v["node"], "web1");
        assert_eq!(v["status"], "failed");
        assert_eq!(v["exit_code"], 2);
        assert_eq!(v["duration_ms"], 1500);
        assert_eq!(v["result"]["exit_code"], 2);
        let mut refused = Report::new("n", Outcome::Refused, 255, "no such command");
        refused.http_status = Some(404);
        let v: Value = serde_json::from_str(&refused.json_result()).unwrap();
        assert_eq!(v, json!({"error": "no such command", "http_status": 404}));
        assert_eq!(format_duration(Duration::from_millis(12_345)), "12.3s");
        assert_eq!(printable("a\u{1b}[31mb\n"), "a\u{FFFD}[31mb\u{FFFD}");
        assert_eq!(format_duration(Duration::from_secs(245)), "4m05s");
    }
}
