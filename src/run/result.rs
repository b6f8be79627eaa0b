//! A job as the API shows it: Go's `tailkit.JobResult` plus additive
//! fields, how a run's outcome becomes one (SPEC §3's exit-code and error
//! rules), the output cap counted in the bytes that are sent, and the
//! [`JobView`]: a result serialized once, shared by every answer.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::runner::{RunEnd, RunOutcome};

/// A job's lifecycle state, as the Go SDK names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Accepted, process not started yet.
    Accepted,
    /// The process is running.
    Running,
    /// Exited with status 0.
    Completed,
    /// Non-zero exit, killed by a signal, or could not start.
    Failed,
    /// Stopped by timeout, its owner, or shutdown.
    Cancelled,
}

impl JobStatus {
    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// The wire name (`"completed"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Accepted => "accepted",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }
}

/// A job as the API returns it: Go's `tailkit.JobResult` plus additive
/// fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    /// Random job id (UUID v4).
    pub job_id: String,
    /// Current state.
    pub status: JobStatus,
    /// Exit code; -1 when it did not exit normally; 0 while not terminal.
    pub exit_code: i32,
    /// Captured stdout (lossy UTF-8), at most the cap.
    pub stdout: String,
    /// Captured stderr (lossy UTF-8), at most the cap.
    pub stderr: String,
    /// Run time so far, or in total once terminal.
    pub duration_ms: u64,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Tool name.
    pub tool: String,
    /// Command name.
    pub command: String,
    /// Whether stdout was cut at the cap.
    pub stdout_truncated: bool,
    /// Whether stderr was cut at the cap.
    pub stderr_truncated: bool,
    /// RFC 3339 time the process started (`null` before).
    pub started_at: Option<String>,
    /// RFC 3339 time the job ended (`null` before).
    pub finished_at: Option<String>,
    /// The signal that killed the command (`"SIGKILL"`), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl JobResult {
    /// The job result for a run, with SPEC §3's exit-code and error rules.
    pub fn from_outcome(id: Uuid, tool: &str, command: &str, outcome: RunOutcome) -> JobResult {
        let signal = outcome.signal_name();
        let (status, exit_code, error) = match (&outcome.cancelled, &outcome.end) {
            (Some(reason), _) => (JobStatus::Cancelled, -1, Some(reason.message())),
            (None, RunEnd::Exited(0)) => (JobStatus::Completed, 0, None),
            (None, RunEnd::Exited(code)) => (
                JobStatus::Failed,
                *code,
                Some(format!("exit status {code}")),
            ),
            (None, RunEnd::Signaled(_)) => (
                JobStatus::Failed,
                -1,
                Some(format!(
                    "killed by signal {}",
                    signal.as_deref().unwrap_or("?")
                )),
            ),
            (None, RunEnd::Error(e)) => (JobStatus::Failed, -1, Some(e.clone())),
        };
        JobResult {
            job_id: id.to_string(),
            status,
            exit_code,
            stdout: into_text(outcome.stdout.data),
            stderr: into_text(outcome.stderr.data),
            duration_ms: outcome.duration.as_millis() as u64,
            error,
            tool: tool.to_string(),
            command: command.to_string(),
            stdout_truncated: outcome.stdout.truncated,
            stderr_truncated: outcome.stderr.truncated,
            started_at: outcome.started_at.map(rfc3339),
            finished_at: Some(rfc3339(outcome.finished_at)),
            signal,
        }
    }
}

/// How many bytes `byte` takes in a JSON string as serde_json writes it.
fn sent_len(byte: u8) -> usize {
    match byte {
        b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
        0..0x20 => 6,
        _ => 1,
    }
}

/// The JSON-escaped length of `text`, quotes excluded.
pub fn sent_text_len(text: &str) -> usize {
    text.bytes().map(sent_len).sum()
}

/// The longest prefix of `text` (cut at a character boundary) whose
/// JSON-escaped length is at most `max`: its length in bytes, and
/// JSON-escaped. How a job's output is capped as it is kept
/// (`run/output`), so that the cap bounds what is sent, not only what was
/// read: a control byte takes six bytes in the answer (`\u0001`).
pub fn sent_prefix(text: &str, max: usize) -> (usize, usize) {
    let mut sent = 0;
    for (i, byte) in text.bytes().enumerate() {
        let next = sent + sent_len(byte);
        if next > max {
            let mut end = i;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            // The bytes of a cut character are not escaped: one each.
            return (end, sent - (i - end));
        }
        sent = next;
    }
    (text.len(), sent)
}

/// A job as answered: its [`JobResult`] and that result serialized once
/// (for a finished job, when it finished), so every answer that sends it
/// shares one buffer instead of serializing, or copying, the output
/// again. Cheap to clone; reads as the [`JobResult`] it holds.
#[derive(Debug, Clone)]
pub struct JobView {
    /// The result.
    pub result: Arc<JobResult>,
    /// Its JSON, as sent.
    pub json: Bytes,
    /// stdout + stderr as they appear in `json` (JSON-escaped).
    sent_output: usize,
}

impl JobView {
    /// Serializes `result`.
    pub fn new(result: Arc<JobResult>) -> JobView {
        let sent_output = sent_text_len(&result.stdout) + sent_text_len(&result.stderr);
        let mut json = Vec::with_capacity(sent_output + 512);
        // Serializing plain strings and numbers into a Vec cannot fail.
        if let Err(e) = serde_json::to_writer(&mut json, &*result) {
            tracing::error!(error = %e, "could not serialize a job result");
        }
        JobView {
            result,
            json: Bytes::from(json),
            sent_output,
        }
    }

    /// The bytes this view holds for its output: the output itself, and
    /// again as it appears in the JSON (what a retained result counts
    /// against the store's output budget).
    pub fn output_bytes(&self) -> usize {
        self.result.stdout.len() + self.result.stderr.len() + self.sent_output
    }
}

impl std::ops::Deref for JobView {
    type Target = JobResult;

    fn deref(&self) -> &JobResult {
        &self.result
    }
}

/// `data` as text, without a copy unless it is not valid UTF-8 (then each
/// bad sequence becomes U+FFFD).
fn into_text(data: Vec<u8>) -> String {
    String::from_utf8(data).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

impl JobResult {
    /// The result of a job that is not terminal yet: Go's zero values, and
    /// `duration_ms` so far.
    pub fn pending(
        id: Uuid,
        status: JobStatus,
        tool: &str,
        command: &str,
        started_at: Option<SystemTime>,
        duration_ms: u64,
    ) -> JobResult {
        JobResult {
            job_id: id.to_string(),
            status,
            exit_code: 0,
            stdout: String::new(),
            stderr: String::new(),
            duration_ms,
            error: None,
            tool: tool.to_string(),
            command: command.to_string(),
            stdout_truncated: false,
            stderr_truncated: false,
            started_at: started_at.map(rfc3339),
            finished_at: None,
            signal: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::run::runner::{CancelReason, Output};

    fn outcome(end: RunEnd, cancelled: Option<CancelReason>) -> RunOutcome {
        RunOutcome {
            end,
            cancelled,
            stdout: Output {
                data: b"ok \xff".to_vec(),
                total: 9,
                truncated: true,
            },
            stderr: Output::default(),
            started_at: Some(SystemTime::UNIX_EPOCH),
            finished_at: SystemTime::UNIX_EPOCH,
            duration: Duration::from_millis(1500),
        }
    }
    #[test]
    fn the_sent_length_is_what_serde_json_writes() {
        let mut all = String::new();
        for c in (0u32..0x300).filter_map(char::from_u32) {
            all.push(c);
            let one = c.to_string();
            let json = serde_json::to_string(&one).unwrap();
            assert_eq!(sent_text_len(&one), json.len() - 2, "{c:?}");
        }
        assert_eq!(
            sent_text_len(&all),
            serde_json::to_string(&all).unwrap().len() - 2
        );
    }

    #[test]
    fn the_sent_prefix_is_cut_in_the_bytes_that_are_sent() {
        let controls = "\u{1}".repeat(1000);
        assert_eq!(
            sent_prefix(&controls, 100),
            (16, 96),
            "16 x 6 bytes fit in 100"
        );
        let text = "é".repeat(10) + "ab";
        assert_eq!(sent_prefix(&text, 100), (22, 22), "22 bytes: all of it");
        assert_eq!(sent_prefix(&text, 7), (6, 6), "cut at a character boundary");
        assert_eq!(sent_prefix("a\nb", 2), (1, 1), "a newline takes two");
        assert_eq!(sent_prefix("a\nb", 3), (2, 3));
        let mut r = JobResult::pending(Uuid::nil(), JobStatus::Completed, "t", "c", None, 0);
        r.stdout = "\u{1}".into();
        r.stderr = "ééé".into();
        let view = JobView::new(Arc::new(r.clone()));
        // Stored: 1 + 6 bytes of text; sent: 6 + 6 bytes of JSON.
        assert_eq!(view.output_bytes(), (1 + 6) + (6 + 6));
        let parsed: JobResult = serde_json::from_slice(&view.json).unwrap();
        assert_eq!(parsed, r);
    }

    #[test]
    fn exit_code_and_error_follow_the_spec() {
        let id = Uuid::nil();
        let r = JobResult::from_outcome(id, "t", "c", outcome(RunEnd::Exited(0), None));
        assert_eq!(
            (r.status, r.exit_code, r.error.as_deref()),
            (JobStatus::Completed, 0, None)
        );
        assert_eq!(r.stdout, "ok \u{fffd}", "lossy UTF-8");
        assert!(r.stdout_truncated);
        assert_eq!(r.duration_ms, 1500);
        assert_eq!(r.finished_at.as_deref(), Some("1970-01-01T00:00:00.000Z"));

        let r = JobResult::from_outcome(id, "t", "c", outcome(RunEnd::Exited(3), None));
        assert_eq!((r.status, r.exit_code), (JobStatus::Failed, 3));
        assert_eq!(r.error.as_deref(), Some("exit status 3"));

        let r = JobResult::from_outcome(id, "t", "c", outcome(RunEnd::Signaled(9), None));
        assert_eq!((r.status, r.exit_code), (JobStatus::Failed, -1));
        assert_eq!(r.signal.as_deref(), Some("SIGKILL"));

        let r = JobResult::from_outcome(
            id,
            "t",
            "c",
            outcome(RunEnd::Error("could not start: x".into()), None),
        );
        assert_eq!((r.status, r.exit_code), (JobStatus::Failed, -1));
        assert_eq!(r.error.as_deref(), Some("could not start: x"));

        for (reason, text) in [
            (
                CancelReason::Timeout(Duration::from_secs(2)),
                "timed out after 2s",
            ),
            (CancelReason::Caller, "cancelled by the caller"),
            (CancelReason::Shutdown, "shutting down"),
        ] {
            let r =
                JobResult::from_outcome(id, "t", "c", outcome(RunEnd::Signaled(15), Some(reason)));
            assert_eq!((r.status, r.exit_code), (JobStatus::Cancelled, -1));
            assert!(r.error.as_deref().unwrap().contains(text), "{:?}", r.error);
            assert_eq!(r.signal.as_deref(), Some("SIGTERM"));
        }
    }
}
