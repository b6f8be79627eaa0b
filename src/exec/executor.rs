//! The executor ties a validated request to a job: it admits the job into
//! the store, writes `exec.accepted` before anything starts, runs the command
//! on its own task, and writes exactly one `exec.finished` before the job is
//! marked terminal. It also drives shutdown.

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use thiserror::Error;
use uuid::Uuid;

use super::ExecSettings;
use super::jobs::{AdmitError, JobLimits, JobResult, JobStatus, JobStore, rfc3339};
use super::runner::{CancelReason, FIXED_PATH, Prepared, RunEnd, RunOutcome, RunSpec, Runner};
use super::tool::Command;
use crate::audit::{AuditCaller, AuditEvent, AuditLog, AuditRecord};
use crate::tailnet::Identity;

/// Why a job could not be started.
#[derive(Debug, Error)]
pub enum StartError {
    /// No slot, or shutting down.
    #[error(transparent)]
    Admit(#[from] AdmitError),
    /// The `exec.accepted` record could not be written: nothing ran.
    #[error("the audit record could not be written: {0}")]
    Audit(io::Error),
}

/// Starts jobs and owns the job store. Cheap to clone.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    store: JobStore,
    runner: Runner,
    audit: Arc<AuditLog>,
    settings: ExecSettings,
}

/// Who asked for a job, as recorded with it.
#[derive(Debug, Clone)]
pub struct JobCaller<'a> {
    /// The caller's WhoIs identity.
    pub identity: &'a Identity,
    /// The address the request came from.
    pub ip: Option<IpAddr>,
}

impl Executor {
    /// An executor with `settings`, recording to `audit`. Starts the job
    /// store's purge task, so it must be called inside a tokio runtime.
    pub fn new(settings: ExecSettings, audit: Arc<AuditLog>) -> Self {
        let store = JobStore::new(JobLimits {
            max_running: settings.max_jobs,
            ttl: settings.job_ttl,
            max_retained: settings.max_retained,
            max_retained_output_bytes: settings.max_retained_output_bytes,
        });
        let runner = Runner::new(settings.runner_settings());
        Executor {
            inner: Arc::new(Inner {
                store,
                runner,
                audit,
                settings,
            }),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &ExecSettings {
        &self.inner.settings
    }

    /// The job store (reads, waits and cancels go straight to it).
    pub fn jobs(&self) -> &JobStore {
        &self.inner.store
    }

    /// The audit log jobs are recorded in.
    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.inner.audit
    }

    /// Admits a job for `command` of `tool` with `prepared` arguments,
    /// records `exec.accepted`, and starts it on its own task.
    ///
    /// Once admitted, the job belongs to that task: the acceptance is
    /// written there (on the blocking pool, so a slow audit sink holds no
    /// runtime worker), and the job runs to a terminal state even if the
    /// caller stops waiting for this answer.
    ///
    /// # Errors
    ///
    /// [`StartError::Admit`] when no slot is free or the daemon is shutting
    /// down; [`StartError::Audit`] when the acceptance could not be
    /// recorded (the job is forgotten and nothing runs).
    pub async fn start(
        &self,
        tool: &str,
        command: &Arc<Command>,
        prepared: Prepared,
        caller: JobCaller<'_>,
    ) -> Result<Uuid, StartError> {
        let inner = &self.inner;
        let admitted = inner
            .store
            .admit(caller.identity.owner(), tool, &command.name)?;
        let id = admitted.id;
        let audit_caller = AuditCaller::new(caller.identity, caller.ip);
        let mut accepted = AuditRecord::new(
            AuditEvent::Accepted,
            audit_caller.clone(),
            tool,
            &command.name,
        );
        accepted.args = prepared.audit_args;
        accepted.job_id = Some(id.to_string());
        let spec = RunSpec {
            env: child_env(command, id, caller.identity),
            argv: prepared.argv,
            workdir: command.workdir.clone(),
            timeout: command.timeout.unwrap_or(inner.settings.default_timeout),
            max_output_bytes: command
                .max_output_bytes
                .unwrap_or(inner.settings.max_output_bytes),
        };
        let inner = self.inner.clone();
        let tool = tool.to_string();
        let command = command.name.clone();
        let (answer, answered) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            // Until the job runs, a dropped task (runtime teardown) must not
            // leave it admitted forever.
            let mut admission = Admission {
                inner: inner.clone(),
                id,
                armed: true,
            };
            let recorded = inner.audit.record_async(&accepted).await;
            admission.armed = false;
            if let Err(e) = recorded {
                inner.store.abandon(id);
                let _ = answer.send(Err(StartError::Audit(e)));
                return;
            }
            let mut finished = accepted;
            finished.event = AuditEvent::Finished;
            let job = RunningJob {
                inner,
                id,
                tool,
                command,
                record: finished,
                pending: None,
                finished: false,
            };
            let _ = answer.send(Ok(id));
            job.run(spec, admitted.cancel).await;
        });
        answered.await.unwrap_or_else(|_| {
            Err(StartError::Audit(io::Error::other(
                "the job's task ended before its acceptance was recorded",
            )))
        })
    }

    /// Refuses new jobs from now on (HTTP 503).
    pub fn begin_shutdown(&self) {
        self.inner.store.begin_shutdown();
    }

    /// Refuses new jobs, lets running ones finish within `grace`, cancels
    /// the rest, and resolves once every job is terminal with its
    /// `exec.finished` record written.
    pub async fn shutdown(&self, grace: Duration) {
        let store = &self.inner.store;
        store.begin_shutdown();
        if tokio::time::timeout(grace, store.wait_idle())
            .await
            .is_err()
        {
            tracing::info!(active = store.active(), "cancelling the jobs still running");
            store.cancel_all(CancelReason::Shutdown);
            store.wait_idle().await;
        }
    }
}

/// The child's whole environment: PATH, LANG, the command's `env`, and who
/// asked.
fn child_env(command: &Command, id: Uuid, caller: &Identity) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_string(), FIXED_PATH.to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
    ];
    for (k, v) in &command.env {
        match env.iter_mut().find(|(name, _)| name == k) {
            Some(existing) => existing.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    env.push(("TAILKIT_JOB_ID".into(), id.to_string()));
    env.push(("TAILKIT_CALLER_NODE".into(), caller.node_name.clone()));
    env.push(("TAILKIT_CALLER_USER".into(), caller.user_login.clone()));
    env
}

/// One job's task. If it is dropped before the job finished (a panic), the
/// job is still marked failed and audited, so that shutdown never waits
/// forever and every started job has its `exec.finished` record.
/// An admitted job whose acceptance is being recorded; abandons it if
/// dropped before it could run.
struct Admission {
    inner: Arc<Inner>,
    id: Uuid,
    armed: bool,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.armed {
            self.inner.store.abandon(self.id);
        }
    }
}

struct RunningJob {
    inner: Arc<Inner>,
    id: Uuid,
    tool: String,
    command: String,
    /// The `exec.finished` record, caller and arguments filled in.
    record: AuditRecord,
    /// The result whose `exec.finished` is being written: if the task is
    /// dropped meanwhile (runtime teardown), `Drop` stores it without a
    /// second record.
    pending: Option<JobResult>,
    finished: bool,
}

impl RunningJob {
    async fn run(
        mut self,
        spec: RunSpec,
        cancel: tokio::sync::watch::Receiver<Option<CancelReason>>,
    ) {
        let store = &self.inner.store;
        let outcome = self
            .inner
            .runner
            .run(spec, cancel, |at| store.set_running(self.id, at))
            .await;
        let (result, record) = self.conclude(outcome);
        self.pending = Some(result);
        if let Err(e) = self.inner.audit.record_async(&record).await {
            self.log_lost_record(&e);
        }
        if let Some(result) = self.pending.take() {
            self.mark_finished(result);
        }
    }

    /// The job result and its `exec.finished` record for `outcome`.
    fn conclude(&self, outcome: RunOutcome) -> (JobResult, AuditRecord) {
        let (stdout_bytes, stderr_bytes) = (outcome.stdout.total, outcome.stderr.total);
        let result = job_result(self.id, &self.tool, &self.command, outcome);
        let mut record = self.record.clone();
        record.ts = rfc3339(SystemTime::now());
        record.status = Some(result.status.as_str().to_string());
        record.exit_code = Some(result.exit_code);
        record.signal = result.signal.clone();
        record.error = result.error.clone();
        record.duration_ms = Some(result.duration_ms);
        record.stdout_bytes = Some(stdout_bytes);
        record.stderr_bytes = Some(stderr_bytes);
        (result, record)
    }

    /// A lost `exec.finished` is logged: the job has run. A late one (the
    /// sink stalled) stays queued and is written when the sink moves.
    fn log_lost_record(&self, e: &io::Error) {
        if e.kind() == io::ErrorKind::TimedOut {
            tracing::warn!(job_id = %self.id, "the exec.finished audit record is late; it stays queued");
        } else {
            tracing::error!(job_id = %self.id, error = %e, "could not write the exec.finished audit record");
        }
    }

    /// Marks the job terminal (after its `exec.finished` was written).
    fn mark_finished(&mut self, result: JobResult) {
        tracing::info!(
            job_id = %self.id, tool = %self.tool, command = %self.command,
            status = result.status.as_str(), exit_code = result.exit_code,
            duration_ms = result.duration_ms, "job finished"
        );
        self.finished = true;
        self.inner.store.finish(self.id, result);
    }
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        if let Some(result) = self.pending.take() {
            self.mark_finished(result);
        }
        if !self.finished {
            let outcome = RunOutcome {
                end: RunEnd::Error("internal error: the job's task ended early".into()),
                cancelled: None,
                stdout: Default::default(),
                stderr: Default::default(),
                started_at: None,
                finished_at: SystemTime::now(),
                duration: Duration::ZERO,
            };
            let (result, record) = self.conclude(outcome);
            // No await in Drop: this rare path writes on the spot.
            if let Err(e) = self.inner.audit.record(&record) {
                self.log_lost_record(&e);
            }
            self.mark_finished(result);
        }
    }
}

/// The job result for a run, with SPEC §3's exit-code and error rules.
pub fn job_result(id: Uuid, tool: &str, command: &str, outcome: RunOutcome) -> JobResult {
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

/// `data` as text, without a copy unless it is not valid UTF-8 (then each
/// bad sequence becomes U+FFFD).
fn into_text(data: Vec<u8>) -> String {
    String::from_utf8(data).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::runner::Output;

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
    fn exit_code_and_error_follow_the_spec() {
        let id = Uuid::nil();
        let r = job_result(id, "t", "c", outcome(RunEnd::Exited(0), None));
        assert_eq!(
            (r.status, r.exit_code, r.error.as_deref()),
            (JobStatus::Completed, 0, None)
        );
        assert_eq!(r.stdout, "ok \u{fffd}", "lossy UTF-8");
        assert!(r.stdout_truncated);
        assert_eq!(r.duration_ms, 1500);
        assert_eq!(r.finished_at.as_deref(), Some("1970-01-01T00:00:00.000Z"));

        let r = job_result(id, "t", "c", outcome(RunEnd::Exited(3), None));
        assert_eq!((r.status, r.exit_code), (JobStatus::Failed, 3));
        assert_eq!(r.error.as_deref(), Some("exit status 3"));

        let r = job_result(id, "t", "c", outcome(RunEnd::Signaled(9), None));
        assert_eq!((r.status, r.exit_code), (JobStatus::Failed, -1));
        assert_eq!(r.signal.as_deref(), Some("SIGKILL"));

        let r = job_result(
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
            let r = job_result(id, "t", "c", outcome(RunEnd::Signaled(15), Some(reason)));
            assert_eq!((r.status, r.exit_code), (JobStatus::Cancelled, -1));
            assert!(r.error.as_deref().unwrap().contains(text), "{:?}", r.error);
            assert_eq!(r.signal.as_deref(), Some("SIGTERM"));
        }
    }

    fn laptop_alice() -> Identity {
        Identity {
            node_name: "laptop.ts.net".into(),
            user_login: "alice@example.com".into(),
            ..Identity::default()
        }
    }

    #[tokio::test]
    async fn a_job_whose_task_dies_is_still_finished_and_audited() {
        let audit = Arc::new(AuditLog::in_memory());
        let executor = Executor::new(ExecSettings::default(), audit.clone());
        let caller = laptop_alice();
        let admitted = executor.jobs().admit(caller.owner(), "t", "c").unwrap();
        let record = AuditRecord::new(
            AuditEvent::Finished,
            AuditCaller::new(&caller, None),
            "t",
            "c",
        );
        // What a panic in the job's task leaves: the task dropped unfinished.
        drop(RunningJob {
            inner: executor.inner.clone(),
            id: admitted.id,
            tool: "t".into(),
            command: "c".into(),
            record,
            pending: None,
            finished: false,
        });
        let result = executor.jobs().get(admitted.id, &caller).unwrap();
        assert_eq!((result.status, result.exit_code), (JobStatus::Failed, -1));
        let lines = audit.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let finished: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(finished["event"], "exec.finished");
        assert_eq!(finished["status"], "failed");
        assert!(
            finished["error"].as_str().unwrap().contains("ended early"),
            "{finished}"
        );
    }

    #[tokio::test]
    async fn a_job_dropped_while_its_record_is_written_keeps_its_result_and_one_record() {
        let audit = Arc::new(AuditLog::in_memory());
        let executor = Executor::new(ExecSettings::default(), audit.clone());
        let caller = laptop_alice();
        let admitted = executor.jobs().admit(caller.owner(), "t", "c").unwrap();
        let outcome = RunOutcome {
            end: RunEnd::Exited(0),
            cancelled: None,
            stdout: Default::default(),
            stderr: Default::default(),
            started_at: None,
            finished_at: SystemTime::now(),
            duration: Duration::ZERO,
        };
        let record = AuditRecord::new(
            AuditEvent::Finished,
            AuditCaller::new(&caller, None),
            "t",
            "c",
        );
        let mut job = RunningJob {
            inner: executor.inner.clone(),
            id: admitted.id,
            tool: "t".into(),
            command: "c".into(),
            record,
            pending: None,
            finished: false,
        };
        // As `run` leaves it while awaiting the write of exec.finished (which
        // the writer makes on its own): the result is pending.
        let (result, _record) = job.conclude(outcome);
        job.pending = Some(result);
        drop(job);
        let result = executor.jobs().get(admitted.id, &caller).unwrap();
        assert_eq!((result.status, result.exit_code), (JobStatus::Completed, 0));
        assert!(audit.lines().is_empty(), "Drop wrote a second record");
    }

    #[test]
    fn the_child_environment_is_fixed() {
        let tool = crate::exec::tool::parse_str(
            r#"{"name": "t", "commands": [{"name": "c", "exec_parts": ["env"], "env": {"LANG": "de_DE.UTF-8", "FOO": "bar"}}]}"#,
            crate::exec::tool::Format::Json,
            std::path::Path::new("t.json"),
            &Default::default(),
        )
        .unwrap();
        let caller = laptop_alice();
        let env = child_env(&tool.commands[0], Uuid::nil(), &caller);
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "PATH",
                "LANG",
                "FOO",
                "TAILKIT_JOB_ID",
                "TAILKIT_CALLER_NODE",
                "TAILKIT_CALLER_USER"
            ]
        );
        assert_eq!(env[1].1, "de_DE.UTF-8");
        assert_eq!(env[5].1, "alice@example.com");
    }
}
