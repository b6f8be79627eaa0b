//! The job store: every job from acceptance until its result expires.
//! States `accepted` → `running` → `completed` / `failed` / `cancelled`,
//! the owner who may see it, waiters for `?wait=`, cancellation, at most N
//! jobs running, finished results kept for a TTL counted from completion, at
//! most M of them and at most B bytes of their output (oldest evicted first).
//! Each job also holds its [`JobOutput`], which live streams follow: the
//! store tells it when the job runs and hands it the terminal result.
//!
//! The shape is mini-redis's `db.rs`: shared state behind a std `Mutex`
//! (never held across an `.await`), expirations purged by one background
//! task woken through `Notify` and stopped when the [`JobStore`] is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use thiserror::Error;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use uuid::Uuid;

use super::output::JobOutput;
use super::result::{JobResult, JobStatus, JobView};
use super::runner::CancelReason;
use crate::identity::{Identity, Owner};

/// The output cap of jobs admitted with [`JobStore::admit`] (SPEC's 1 MiB).
const DEFAULT_OUTPUT_CAP: usize = 1 << 20;

/// Store limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Jobs that may be accepted or running at once.
    pub max_running: usize,
    /// How long a finished result is kept, from when it finished.
    pub ttl: Duration,
    /// How many finished results are kept at most.
    pub max_retained: usize,
    /// Total stdout + stderr bytes of the finished results kept. The result
    /// just finished is kept even if it alone is larger.
    pub max_retained_output_bytes: usize,
}

/// Why a job was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AdmitError {
    /// Every job slot is busy (HTTP 429).
    #[error("all {0} job slots are busy")]
    Busy(usize),
    /// The daemon is shutting down (HTTP 503).
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// What the executor gets for an admitted job.
#[derive(Debug)]
pub struct Admitted {
    /// The new job's id.
    pub id: Uuid,
    /// Becomes `Some` when the job is to be cancelled.
    pub cancel: watch::Receiver<Option<CancelReason>>,
    /// The job's output, for the runner to capture into.
    pub output: Arc<JobOutput>,
}

/// The job store. Dropping it stops its purge task.
#[derive(Debug)]
pub struct JobStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the purge task when the earliest expiration changes or on drop.
    background: Notify,
    limits: JobLimits,
    /// Number of non-terminal jobs, for [`JobStore::wait_idle`].
    active: watch::Sender<usize>,
}

#[derive(Debug, Default)]
struct State {
    jobs: HashMap<Uuid, Job>,
    /// Finished jobs in finish order with their expiry; since the TTL is the
    /// same for all, this is also expiry order.
    finished: VecDeque<(Instant, Uuid)>,
    /// Sum of [`output_bytes`] over the results in `jobs`; changed only by
    /// [`State::push_finished`] and [`State::remove`].
    output_bytes: usize,
    /// Jobs accepted or running.
    active: usize,
    shutting_down: bool,
    /// The store was dropped: the purge task ends.
    closed: bool,
}

#[derive(Debug)]
struct Job {
    owner: Owner,
    tool: String,
    command: String,
    status: JobStatus,
    /// Set when the process started.
    started: Option<(Instant, SystemTime)>,
    /// Set once terminal: the result, serialized once.
    result: Option<JobView>,
    updates: watch::Sender<JobStatus>,
    cancel: watch::Sender<Option<CancelReason>>,
    /// Its output and events, shared with the runner and live streams.
    output: Arc<JobOutput>,
    /// What its result counts against the output budget once finished.
    retained: usize,
}

/// A job as read under the store lock: the stored view of a finished job
/// (a cheap clone however large the output), or the state of one still
/// running, serialized once the lock is released.
enum Snapshot {
    Done(JobView),
    Pending(JobResult),
}

impl Snapshot {
    fn into_view(self) -> JobView {
        match self {
            Snapshot::Done(view) => view,
            Snapshot::Pending(result) => JobView::new(Arc::new(result)),
        }
    }
}

impl Job {
    fn snapshot(&self, id: Uuid) -> Snapshot {
        if let Some(view) = &self.result {
            return Snapshot::Done(view.clone());
        }
        let duration_ms = self
            .started
            .map_or(0, |(at, _)| at.elapsed().as_millis() as u64);
        Snapshot::Pending(JobResult::pending(
            id,
            self.status,
            &self.tool,
            &self.command,
            self.started.map(|(_, t)| t),
            duration_ms,
        ))
    }
}

impl JobStore {
    /// A store with `limits`; starts its purge task on the current tokio
    /// runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn new(limits: JobLimits) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            background: Notify::new(),
            limits,
            active: watch::Sender::new(0),
        });
        tokio::spawn(purge_expired_jobs(shared.clone()));
        JobStore { shared }
    }

    /// Creates a job in state `accepted` owned by `owner`, taking a slot.
    ///
    /// # Errors
    ///
    /// [`AdmitError::Busy`] when all slots are taken (checked first, as
    /// SPEC §3 orders 429 before 503), [`AdmitError::ShuttingDown`] after
    /// [`JobStore::begin_shutdown`].
    pub fn admit(&self, owner: Owner, tool: &str, command: &str) -> Result<Admitted, AdmitError> {
        self.admit_with_output(owner, tool, command, DEFAULT_OUTPUT_CAP)
    }

    /// [`JobStore::admit`] for a job that keeps at most `output_cap` bytes
    /// per output stream.
    ///
    /// # Errors
    ///
    /// As [`JobStore::admit`].
    pub fn admit_with_output(
        &self,
        owner: Owner,
        tool: &str,
        command: &str,
        output_cap: usize,
    ) -> Result<Admitted, AdmitError> {
        let mut state = self.shared.lock();
        if state.active >= self.shared.limits.max_running {
            return Err(AdmitError::Busy(self.shared.limits.max_running));
        }
        if state.shutting_down {
            return Err(AdmitError::ShuttingDown);
        }
        let id = Uuid::new_v4();
        let (cancel, cancel_rx) = watch::channel(None);
        let output = JobOutput::new(output_cap);
        state.jobs.insert(
            id,
            Job {
                owner,
                tool: tool.to_string(),
                command: command.to_string(),
                status: JobStatus::Accepted,
                started: None,
                result: None,
                updates: watch::Sender::new(JobStatus::Accepted),
                cancel,
                output: output.clone(),
                retained: 0,
            },
        );
        state.active += 1;
        self.shared.active.send_replace(state.active);
        Ok(Admitted {
            id,
            cancel: cancel_rx,
            output,
        })
    }

    /// Forgets an admitted job that will never run (its acceptance could not
    /// be recorded), freeing its slot. A terminal job is left alone: it has
    /// run, and its result is listed for expiry.
    pub fn abandon(&self, id: Uuid) {
        let mut state = self.shared.lock();
        if state
            .jobs
            .get(&id)
            .is_some_and(|job| !job.status.is_terminal())
        {
            let job = state.remove(id);
            state.active -= 1;
            self.shared.active.send_replace(state.active);
            drop(state);
            if let Some(job) = job {
                job.output.abort("the job was not started");
            }
        }
    }

    /// Marks the job `running`, its process started at `at`.
    pub fn set_running(&self, id: Uuid, at: SystemTime) {
        let mut state = self.shared.lock();
        if let Some(job) = state.jobs.get_mut(&id).filter(|j| !j.status.is_terminal()) {
            job.status = JobStatus::Running;
            job.started = Some((Instant::now(), at));
            job.updates.send_replace(JobStatus::Running);
            job.output.enter_running();
        }
    }

    /// Stores the terminal `result`, serialized once here (before the lock
    /// is taken), frees the job's slot, wakes its waiters and starts its
    /// TTL; evicts the oldest finished results past the count cap or the
    /// output budget (never this one for the budget).
    pub fn finish(&self, id: Uuid, result: JobResult) {
        let result = JobView::new(Arc::new(result));
        let status = result.status;
        debug_assert!(status.is_terminal());
        let mut state = self.shared.lock();
        let Some(job) = state.jobs.get_mut(&id) else {
            return;
        };
        if job.status.is_terminal() {
            return;
        }
        job.status = status;
        job.updates.send_replace(status);
        state.active -= 1;
        self.shared.active.send_replace(state.active);
        let was_empty = state.finished.is_empty();
        state.push_finished(id, result, Instant::now() + self.shared.limits.ttl);
        let limits = &self.shared.limits;
        // `len() > 1`: the result just stored (the newest) stays even when it
        // alone is over the budget, so its caller can read it.
        while state.finished.len() > limits.max_retained
            || (state.output_bytes > limits.max_retained_output_bytes && state.finished.len() > 1)
        {
            if !state.evict_oldest() {
                break;
            }
        }
        drop(state);
        if was_empty {
            // The purge task sleeps forever while nothing is finished.
            self.shared.background.notify_one();
        }
    }

    /// The output of job `id` (to follow it live), if `caller` owns it.
    pub fn output(&self, id: Uuid, caller: &Identity) -> Option<Arc<JobOutput>> {
        let state = self.shared.lock();
        let job = state.jobs.get(&id).filter(|j| caller.owns(&j.owner))?;
        Some(job.output.clone())
    }

    /// The job `id` if `caller` owns it. A finished result is shared, not
    /// copied or serialized again; a running job's state is serialized
    /// after the store lock is released.
    pub fn get(&self, id: Uuid, caller: &Identity) -> Option<JobView> {
        let snapshot = {
            let state = self.shared.lock();
            let job = state.jobs.get(&id).filter(|j| caller.owns(&j.owner))?;
            job.snapshot(id)
        };
        Some(snapshot.into_view())
    }

    /// Waits up to `wait` for the job to be terminal and returns it as it is
    /// then; `None` if it does not exist or `caller` does not own it.
    pub async fn wait(&self, id: Uuid, caller: &Identity, wait: Duration) -> Option<JobView> {
        let mut updates = {
            let state = self.shared.lock();
            let job = state.jobs.get(&id).filter(|j| caller.owns(&j.owner))?;
            job.updates.subscribe()
        };
        let _ = tokio::time::timeout(wait, updates.wait_for(|s| s.is_terminal())).await;
        self.get(id, caller)
    }

    /// Asks the job to stop with `reason`, if `caller` owns it. Returns
    /// whether the job exists for the caller (terminal jobs are left as
    /// they are).
    pub fn cancel(&self, id: Uuid, caller: &Identity, reason: CancelReason) -> bool {
        let state = self.shared.lock();
        let Some(job) = state.jobs.get(&id).filter(|j| caller.owns(&j.owner)) else {
            return false;
        };
        if !job.status.is_terminal() {
            job.cancel.send_if_modified(|r| {
                let first = r.is_none();
                if first {
                    *r = Some(reason);
                }
                first
            });
        }
        true
    }

    /// Refuses new jobs from now on ([`AdmitError::ShuttingDown`]).
    pub fn begin_shutdown(&self) {
        self.shared.lock().shutting_down = true;
    }

    /// Cancels every job that is not terminal with `reason`.
    pub fn cancel_all(&self, reason: CancelReason) {
        let state = self.shared.lock();
        for job in state.jobs.values().filter(|j| !j.status.is_terminal()) {
            job.cancel.send_if_modified(|r| {
                let first = r.is_none();
                if first {
                    *r = Some(reason.clone());
                }
                first
            });
        }
    }

    /// Jobs accepted or running.
    pub fn active(&self) -> usize {
        self.shared.lock().active
    }

    /// Jobs held, finished or not.
    pub fn len(&self) -> usize {
        self.shared.lock().jobs.len()
    }

    /// Whether the store holds no job.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when no job is accepted or running.
    pub async fn wait_idle(&self) {
        let mut active = self.shared.active.subscribe();
        let _ = active.wait_for(|n| *n == 0).await;
    }
}

impl Drop for JobStore {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.background.notify_one();
    }
}

/// What a result counts against [`JobLimits::max_retained_output_bytes`]:
/// its output as stored, twice (as text, and JSON-escaped in the answer
/// it is sent as); its job's event index is added to it.
fn output_bytes(result: &JobView) -> usize {
    result.output_bytes()
}

impl State {
    /// Stores `result` as job `id`'s and lists it as the newest finished
    /// result, expiring at `expires`.
    fn push_finished(&mut self, id: Uuid, result: JobView, expires: Instant) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        // Only `finish` calls this, once per job (it returns early for a
        // terminal one).
        debug_assert!(job.result.is_none());
        // Live streams read the stored result's output: it is the buffer
        // they followed, moved, not a copy (the view's JSON is the one
        // copy, made once in `finish`). Sealed first: the budget counts the
        // job's event index too, complete only then.
        job.output.seal(Arc::clone(&result.result));
        job.retained = output_bytes(&result) + job.output.index_bytes();
        self.output_bytes += job.retained;
        job.result = Some(result);
        self.finished.push_back((expires, id));
    }

    /// Removes job `id`. Every removal goes through here, so
    /// `output_bytes` stays exact.
    fn remove(&mut self, id: Uuid) -> Option<Job> {
        let job = self.jobs.remove(&id)?;
        if job.result.is_some() {
            self.output_bytes -= job.retained;
            // Streams still open on it must not keep its output alive.
            job.output.expire();
        }
        Some(job)
    }

    /// Removes the oldest finished result (TTL purge, count cap, output
    /// budget); returns whether there was one.
    fn evict_oldest(&mut self) -> bool {
        let Some((_, id)) = self.finished.pop_front() else {
            return false;
        };
        self.remove(id);
        true
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before any
        // call that could panic, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes expired results; returns the next expiry, if any.
    fn purge(&self) -> Option<Instant> {
        let mut state = self.lock();
        if state.closed {
            return None;
        }
        let now = Instant::now();
        while let Some(&(when, _)) = state.finished.front() {
            if when > now {
                return Some(when);
            }
            state.evict_oldest();
        }
        None
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

async fn purge_expired_jobs(shared: Arc<Shared>) {
    while !shared.is_closed() {
        if let Some(when) = shared.purge() {
            tokio::select! {
                () = tokio::time::sleep_until(when) => {}
                () = shared.background.notified() => {}
            }
        } else {
            shared.background.notified().await;
        }
    }
}

#[cfg(test)]
mod tests;
