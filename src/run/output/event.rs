//! The events of a job's sequence as SPEC §7 names them, and their JSON
//! (the Go SDK's `types.JobUpdate`).

use std::borrow::Cow;

use serde::Serialize;

use crate::run::result::{JobResult, JobStatus};

/// One of the two output streams of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipe {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Pipe {
    /// `"stdout"` or `"stderr"`, as events name them.
    pub fn as_str(self) -> &'static str {
        match self {
            Pipe::Stdout => "stdout",
            Pipe::Stderr => "stderr",
        }
    }

    pub(super) fn index(self) -> usize {
        match self {
            Pipe::Stdout => 0,
            Pipe::Stderr => 1,
        }
    }
}

/// How a job ended, as its terminal event tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminal {
    /// `completed`, `failed` or `cancelled`.
    pub status: JobStatus,
    /// The job's exit code (-1 unless it exited).
    pub exit_code: i32,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// The signal that killed it, if one did.
    pub signal: Option<String>,
    /// Whether stdout was cut at its cap (events cover what was kept).
    pub stdout_truncated: bool,
    /// Whether stderr was cut at its cap.
    pub stderr_truncated: bool,
}

impl Terminal {
    pub(super) fn of(result: &JobResult) -> Self {
        Terminal {
            status: result.status,
            exit_code: result.exit_code,
            error: result.error.clone(),
            signal: result.signal.clone(),
            stdout_truncated: result.stdout_truncated,
            stderr_truncated: result.stderr_truncated,
        }
    }
}

/// One event of a job's sequence, borrowed from its buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// The job entered `status` (`job.status`).
    Status(JobStatus),
    /// One line of output (`job.stdout` / `job.stderr`).
    Line {
        /// The stream it came on.
        pipe: Pipe,
        /// The line, without its newline.
        line: Cow<'a, str>,
    },
    /// The end: `job.completed` for `completed`, else `job.failed`.
    Finished(&'a Terminal),
}

/// An event's JSON: the Go SDK's `types.JobUpdate` fields, plus, on the
/// terminal event, the additive `signal` and `*_truncated`.
#[derive(Serialize)]
struct Update<'a> {
    job_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout_truncated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr_truncated: Option<bool>,
}

impl Event<'_> {
    /// The event's name: `job.status`, `job.stdout`, `job.stderr`,
    /// `job.completed` or `job.failed`.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Status(_) => "job.status",
            Event::Line {
                pipe: Pipe::Stdout, ..
            } => "job.stdout",
            Event::Line {
                pipe: Pipe::Stderr, ..
            } => "job.stderr",
            Event::Finished(t) if t.status == JobStatus::Completed => "job.completed",
            Event::Finished(_) => "job.failed",
        }
    }

    /// Appends the event's JSON (one line: no raw newline) for job
    /// `job_id` to `out`.
    pub fn write_json(&self, job_id: &str, out: &mut Vec<u8>) {
        let mut update = Update {
            job_id,
            line: None,
            stream: None,
            status: None,
            exit_code: None,
            error: None,
            signal: None,
            stdout_truncated: None,
            stderr_truncated: None,
        };
        match self {
            Event::Status(status) => update.status = Some(status.as_str()),
            Event::Line { pipe, line } => {
                update.line = Some(line);
                update.stream = Some(pipe.as_str());
            }
            Event::Finished(t) => {
                update.exit_code = Some(t.exit_code);
                update.error = t.error.as_deref();
                update.signal = t.signal.as_deref();
                update.stdout_truncated = Some(t.stdout_truncated);
                update.stderr_truncated = Some(t.stderr_truncated);
            }
        }
        // Writing plain data into a Vec cannot fail.
        let _ = serde_json::to_writer(out, &update);
    }
}
