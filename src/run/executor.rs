//! The executor: the one seam between the API and running. [`Executor::submit`]
//! takes a command from the registry, the request's arguments and the
//! caller, and prepares the argv, admits the job into the store, writes
//! `exec.accepted` before anything starts, and runs the command on its own
//! task, which writes exactly one `exec.finished` before the job is marked
//! terminal. A request it refuses is audited here (`exec.denied`) and comes
//! back as a [`Refusal`] for the caller to map to its own answer. Results
//! are read, awaited and cancelled through it, and it drives shutdown.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use thiserror::Error;
use uuid::Uuid;

use super::ExecSettings;
use super::output::JobOutput;
use super::result::{JobResult, JobView, rfc3339};
use super::runner::{CancelReason, RunEnd, RunOutcome, RunSpec, Runner};
use super::spawn::FIXED_PATH;
use super::store::{AdmitError, JobLimits, JobStore};
use crate::audit::{AuditCaller, AuditEvent, AuditLog, AuditRecord};
use crate::identity::Identity;
use crate::tools::{ArgError, Command, ExecEntry, prepare, redact_args};

/// Why [`Executor::submit`] did not start a job. Nothing ran.
#[derive(Debug, Error)]
pub enum Refusal {
    /// An argument broke a rule of the command (the error names it).
    #[error(transparent)]
    BadArgument(#[from] ArgError),
    /// Every job slot is taken.
    #[error("all {0} job slots are busy")]
    Busy(usize),
    /// The daemon is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// `exec.accepted` could not be written, so the job does not run. The
    /// only refusal that is not audited: the audit log is what failed.
    #[error("the audit log cannot be written, so nothing runs")]
    AuditUnavailable(#[source] io::Error),
}

impl Refusal {
    /// The HTTP status SPEC §3 answers this refusal with (also written in
    /// its `exec.denied` record): 400, 429 or 503.
    pub fn http_status(&self) -> u16 {
        match self {
            Refusal::BadArgument(_) => 400,
            Refusal::Busy(_) => 429,
            Refusal::ShuttingDown | Refusal::AuditUnavailable(_) => 503,
        }
    }
}

impl From<AdmitError> for Refusal {
    fn from(e: AdmitError) -> Self {
        match e {
            AdmitError::Busy(n) => Refusal::Busy(n),
            AdmitError::ShuttingDown => Refusal::ShuttingDown,
        }
    }
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
#[derive(Debug, Clone, Copy)]
pub struct JobCaller<'a> {
    /// The caller's WhoIs identity.
    pub identity: &'a Identity,
    /// The address the request came from.
    pub ip: Option<IpAddr>,
}

impl JobCaller<'_> {
    /// The caller as audit records name it.
    pub fn audit(&self) -> AuditCaller {
        AuditCaller::new(self.identity, self.ip)
    }
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

    /// The job store, for inspection (tests, benchmarks).
    pub fn jobs(&self) -> &JobStore {
        &self.inner.store
    }

    /// Starts `entry` with the request's `args` for `caller`: checks the
    /// arguments and builds the argv, admits the job, records
    /// `exec.accepted`, and starts it on its own task; returns its id.
    ///
    /// Once admitted, the job belongs to that task: the acceptance is
    /// written there (on the blocking pool, so a slow audit sink holds no
    /// runtime worker), and the job runs to a terminal state even if the
    /// caller stops waiting for this answer.
    ///
    /// # Errors
    ///
    /// A [`Refusal`], already audited as `exec.denied` (except
    /// [`Refusal::AuditUnavailable`]): a bad argument, no free slot, the
    /// daemon shutting down, or an acceptance that could not be recorded
    /// (the job is forgotten and nothing runs).
    pub async fn submit(
        &self,
        entry: &ExecEntry,
        args: &Map<String, Value>,
        caller: JobCaller<'_>,
    ) -> Result<Uuid, Refusal> {
        let (tool, command) = (&entry.tool.name, &entry.command);
        let prepared = match prepare(command, args, self.inner.settings.max_value_bytes) {
            Ok(prepared) => prepared,
            Err(e) => {
                let refusal = Refusal::from(e);
                self.deny(caller, entry, redact_args(command, args), &refusal)
                    .await;
                return Err(refusal);
            }
        };
        let output_cap = command
            .max_output_bytes
            .unwrap_or(self.inner.settings.max_output_bytes);
        let admitted = match self.inner.store.admit_with_output(
            caller.identity.owner(),
            tool,
            &command.name,
            output_cap,
        ) {
            Ok(admitted) => admitted,
            Err(e) => {
                let refusal = Refusal::from(e);
                self.deny(caller, entry, prepared.audit_args, &refusal)
                    .await;
                return Err(refusal);
            }
        };
        let id = admitted.id;
        let mut accepted =
            AuditRecord::new(AuditEvent::Accepted, caller.audit(), tool, &command.name);
        accepted.args = prepared.audit_args;
        accepted.job_id = Some(id.to_string());
        let spec = RunSpec {
            env: child_env(command, id, caller.identity),
            argv: prepared.argv,
            workdir: command.workdir.clone(),
            timeout: command
                .timeout
                .unwrap_or(self.inner.settings.default_timeout),
            max_output_bytes: output_cap,
            user: command
                .user
                .clone()
                .or_else(|| self.inner.settings.command_user.clone())
                .filter(|u| !u.is_current()),
        };
        let inner = self.inner.clone();
        let tool = tool.to_string();
        let command = command.name.clone();
        let (answer, answered) = tokio::sync::oneshot::channel::<Result<Uuid, io::Error>>();
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
                let _ = answer.send(Err(e));
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
            job.run(spec, admitted.cancel, admitted.output).await;
        });
        let answer = answered.await.unwrap_or_else(|_| {
            Err(io::Error::other(
                "the job's task ended before its acceptance was recorded",
            ))
        });
        answer.map_err(|e| {
            tracing::error!(error = %e, "exec.accepted could not be recorded; the job does not run");
            Refusal::AuditUnavailable(e)
        })
    }

    /// Records `refusal` of a request for `entry` as `exec.denied`, with
    /// the arguments as the audit log may show them.
    async fn deny(
        &self,
        caller: JobCaller<'_>,
        entry: &ExecEntry,
        args: BTreeMap<String, Value>,
        refusal: &Refusal,
    ) {
        let record = AuditRecord::denial(
            caller.audit(),
            (&entry.tool.name, &entry.command.name),
            &refusal.to_string(),
            refusal.http_status(),
            args,
        );
        if let Err(e) = self.inner.audit.record_async(&record).await {
            crate::audit::log_unwritten("exec.denied", &e);
        }
    }

    /// Job `id` as it is now, if `caller` owns it (a finished result is
    /// shared, not copied or serialized again).
    pub fn get(&self, id: Uuid, caller: &Identity) -> Option<JobView> {
        self.inner.store.get(id, caller)
    }

    /// The output of job `id`, to follow it live, if `caller` owns it.
    pub fn output(&self, id: Uuid, caller: &Identity) -> Option<Arc<JobOutput>> {
        self.inner.store.output(id, caller)
    }

    /// Waits up to `wait` for job `id` to be terminal and returns it as it
    /// is then; `None` if it does not exist or `caller` does not own it.
    pub async fn wait(&self, id: Uuid, caller: &Identity, wait: Duration) -> Option<JobView> {
        self.inner.store.wait(id, caller, wait).await
    }

    /// Cancels job `id` for its owner and returns its terminal result
    /// (waiting at most the runner's stop limit, plus a second to record
    /// it); a terminal job is returned unchanged. `None` if it does not
    /// exist or `caller` does not own it.
    pub async fn cancel(&self, id: Uuid, caller: &Identity) -> Option<JobView> {
        if !self.inner.store.cancel(id, caller, CancelReason::Caller) {
            return None;
        }
        tracing::info!(job_id = %id, "job cancelled by its owner");
        let bound = self.inner.settings.stop_limit() + Duration::from_secs(1);
        self.inner.store.wait(id, caller, bound).await
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
        output: Arc<JobOutput>,
    ) {
        let store = &self.inner.store;
        let outcome = self
            .inner
            .runner
            .run_into(spec, &output, cancel, |at| store.set_running(self.id, at))
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
        // The output is within its cap as sent: the capture counts it so.
        let result = JobResult::from_outcome(self.id, &self.tool, &self.command, outcome);
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
    /// sink stalled) or one the sink refused (a full disk) stays queued and
    /// is written when the sink takes records again.
    fn log_lost_record(&self, e: &io::Error) {
        if crate::audit::is_queued(e) {
            tracing::warn!(job_id = %self.id, error = %e, "the exec.finished audit record could not be written yet; it is kept");
        } else if e.kind() == io::ErrorKind::TimedOut {
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
            let outcome = RunOutcome::without_run(
                RunEnd::Error("internal error: the job's task ended early".into()),
                None,
                Duration::ZERO,
            );
            let (result, record) = self.conclude(outcome);
            // No await in Drop: this rare path writes on the spot.
            if let Err(e) = self.inner.audit.record(&record) {
                self.log_lost_record(&e);
            }
            self.mark_finished(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::JobStatus;

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
        let outcome = RunOutcome::without_run(RunEnd::Exited(0), None, Duration::ZERO);
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
        let tool = crate::tools::parse_str(
            r#"{"name": "t", "commands": [{"name": "c", "exec_parts": ["env"], "env": {"LANG": "de_DE.UTF-8", "FOO": "bar"}}]}"#,
            crate::tools::Format::Json,
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
