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
mod tests {
    use super::*;

    fn limits() -> JobLimits {
        JobLimits {
            max_running: 2,
            ttl: Duration::from_secs(300),
            max_retained: 3,
            max_retained_output_bytes: 1 << 20,
        }
    }

    /// Limits where the output budget binds before the count: 100 bytes of
    /// plain text, which counts twice (as stored, and in the result's JSON).
    fn budget_limits() -> JobLimits {
        JobLimits {
            max_retained: 10,
            max_retained_output_bytes: 2 * 100,
            ..limits()
        }
    }

    /// The store's output byte total, checked against a recount, in bytes
    /// of plain text (each counts twice: see [`budget_limits`]).
    fn output_bytes_held(store: &JobStore) -> usize {
        let state = store.shared.lock();
        let recount: usize = state
            .jobs
            .values()
            .filter_map(|j| Some(output_bytes(j.result.as_ref()?) + j.output.index_bytes()))
            .sum();
        assert_eq!(state.output_bytes, recount, "accounting drifted");
        state.output_bytes / 2
    }

    /// Runs a job to completion with `bytes` of output, split over both
    /// streams.
    fn finish_with_output(store: &JobStore, bytes: usize) -> Uuid {
        let j = store.admit(alice().owner(), "t", "c").unwrap();
        let mut result = done(j.id, JobStatus::Completed);
        result.stdout = "o".repeat(bytes / 2);
        result.stderr = "e".repeat(bytes - bytes / 2);
        store.finish(j.id, result);
        j.id
    }

    fn kept(store: &JobStore, ids: &[Uuid]) -> Vec<bool> {
        ids.iter()
            .map(|id| store.get(*id, &alice()).is_some())
            .collect()
    }

    fn alice() -> Identity {
        Identity {
            node_id: "n1".into(),
            user_login: "alice@example.com".into(),
            ..Identity::default()
        }
    }

    fn bob() -> Identity {
        Identity {
            node_id: "n2".into(),
            user_login: "bob@example.com".into(),
            ..Identity::default()
        }
    }

    fn done(id: Uuid, status: JobStatus) -> JobResult {
        JobResult {
            stdout: "out".into(),
            ..JobResult::pending(id, status, "t", "c", None, 1)
        }
    }

    #[tokio::test]
    async fn lifecycle_and_slots() {
        let store = JobStore::new(limits());
        let a = store.admit(alice().owner(), "t", "c").unwrap();
        let b = store.admit(alice().owner(), "t", "c").unwrap();
        assert_eq!(
            store.admit(alice().owner(), "t", "c").unwrap_err(),
            AdmitError::Busy(2)
        );
        assert_eq!(
            store.get(a.id, &alice()).unwrap().status,
            JobStatus::Accepted
        );
        store.set_running(a.id, SystemTime::now());
        let running = store.get(a.id, &alice()).unwrap();
        assert_eq!(running.status, JobStatus::Running);
        assert!(running.started_at.is_some() && running.finished_at.is_none());
        store.finish(a.id, done(a.id, JobStatus::Completed));
        assert_eq!(store.get(a.id, &alice()).unwrap().stdout, "out");
        assert_eq!(store.active(), 1);
        store.admit(alice().owner(), "t", "c").unwrap();
        store.abandon(b.id);
        assert!(store.get(b.id, &alice()).is_none());
        assert_eq!(store.active(), 1);
    }

    #[tokio::test]
    async fn abandoning_a_finished_job_keeps_its_result() {
        let store = JobStore::new(limits());
        let a = store.admit(alice().owner(), "t", "c").unwrap();
        store.finish(a.id, done(a.id, JobStatus::Completed));
        store.abandon(a.id);
        assert_eq!(store.get(a.id, &alice()).unwrap().stdout, "out");
        assert_eq!(store.active(), 0);
    }

    #[tokio::test]
    async fn jobs_are_visible_to_their_owner_only() {
        let store = JobStore::new(limits());
        let a = store.admit(alice().owner(), "t", "c").unwrap();
        assert!(store.get(a.id, &bob()).is_none());
        assert!(!store.cancel(a.id, &bob(), CancelReason::Caller));
        assert!(a.cancel.borrow().is_none(), "bob cannot cancel alice's job");
        let alice_phone = Identity {
            node_id: "n9".into(),
            ..alice()
        };
        assert!(
            store.get(a.id, &alice_phone).is_some(),
            "same user, other node"
        );
        assert!(store.cancel(a.id, &alice(), CancelReason::Caller));
        assert_eq!(*a.cancel.borrow(), Some(CancelReason::Caller));
        assert!(
            store
                .wait(a.id, &bob(), Duration::from_secs(1))
                .await
                .is_none()
        );
    }

    #[tokio::test]
    async fn shutdown_refuses_new_jobs_after_the_busy_check() {
        let store = JobStore::new(JobLimits {
            max_running: 1,
            ..limits()
        });
        store.admit(alice().owner(), "t", "c").unwrap();
        store.begin_shutdown();
        assert_eq!(
            store.admit(alice().owner(), "t", "c").unwrap_err(),
            AdmitError::Busy(1)
        );
        store.cancel_all(CancelReason::Shutdown);
        let store = JobStore::new(limits());
        store.begin_shutdown();
        assert_eq!(
            store.admit(alice().owner(), "t", "c").unwrap_err(),
            AdmitError::ShuttingDown
        );
    }

    #[tokio::test(start_paused = true)]
    async fn results_expire_a_ttl_after_they_finished() {
        let store = JobStore::new(limits());
        let a = store.admit(alice().owner(), "t", "c").unwrap();
        // Running for longer than the TTL does not count against it.
        tokio::time::sleep(Duration::from_secs(400)).await;
        assert!(store.get(a.id, &alice()).is_some());
        store.finish(a.id, done(a.id, JobStatus::Failed));
        tokio::time::sleep(Duration::from_secs(299)).await;
        assert!(store.get(a.id, &alice()).is_some());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(store.get(a.id, &alice()).is_none(), "expired");
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn the_oldest_results_are_evicted_past_the_cap() {
        let store = JobStore::new(limits());
        let mut ids = Vec::new();
        for _ in 0..5 {
            let j = store.admit(alice().owner(), "t", "c").unwrap();
            store.finish(j.id, done(j.id, JobStatus::Completed));
            ids.push(j.id);
        }
        let kept: Vec<bool> = ids
            .iter()
            .map(|id| store.get(*id, &alice()).is_some())
            .collect();
        assert_eq!(kept, [false, false, true, true, true]);
    }

    #[tokio::test]
    async fn the_oldest_results_are_evicted_past_the_output_budget() {
        let store = JobStore::new(budget_limits());
        let running = store.admit(alice().owner(), "t", "c").unwrap();
        store.set_running(running.id, SystemTime::now());
        let mut ids = vec![
            finish_with_output(&store, 40),
            finish_with_output(&store, 40),
        ];
        assert_eq!(output_bytes_held(&store), 80);
        ids.push(finish_with_output(&store, 30));
        assert_eq!(kept(&store, &ids), [false, true, true]);
        assert_eq!(output_bytes_held(&store), 70);
        ids.push(finish_with_output(&store, 50));
        assert_eq!(kept(&store, &ids), [false, false, true, true]);
        assert_eq!(output_bytes_held(&store), 80);
        let still = store.get(running.id, &alice()).unwrap();
        assert_eq!(still.status, JobStatus::Running, "running jobs stay");
    }

    #[tokio::test]
    async fn an_evicted_job_lets_the_output_its_streams_hold_go() {
        use crate::run::output::{Cursor, Pipe, ReadState};
        let store = JobStore::new(budget_limits());
        let j = store.admit(alice().owner(), "t", "c").unwrap();
        j.output.enter_running();
        j.output.write(Pipe::Stdout, "o\n".repeat(20).as_bytes());
        let mut result = done(j.id, JobStatus::Completed);
        result.stdout = String::from_utf8(j.output.take(Pipe::Stdout).data).unwrap();
        result.stderr = String::from_utf8(j.output.take(Pipe::Stderr).data).unwrap();
        store.finish(j.id, result);
        // A stream open on it holds `j.output`; later jobs evict it.
        let reads_all = |output: &JobOutput| output.read(&mut Cursor::start(), |_, _| true);
        assert_eq!(reads_all(&j.output), ReadState::Ended);
        finish_with_output(&store, 90);
        assert!(store.get(j.id, &alice()).is_none());
        assert!(
            matches!(reads_all(&j.output), ReadState::Failed(e) if e.contains("no longer available"))
        );
    }

    #[tokio::test]
    async fn a_result_alone_over_the_budget_is_kept_until_the_next_one() {
        let store = JobStore::new(budget_limits());
        let small = finish_with_output(&store, 30);
        let big = finish_with_output(&store, 500);
        assert!(store.get(small, &alice()).is_none());
        let r = store.get(big, &alice()).unwrap();
        assert_eq!(r.stdout.len() + r.stderr.len(), 500);
        assert_eq!(output_bytes_held(&store), 500);
        let next = finish_with_output(&store, 10);
        assert_eq!(kept(&store, &[big, next]), [false, true]);
        assert_eq!(output_bytes_held(&store), 10);
    }

    #[tokio::test]
    async fn the_count_cap_and_the_budget_evict_together() {
        let store = JobStore::new(JobLimits {
            max_retained: 3,
            ..budget_limits()
        });
        let mut ids: Vec<Uuid> = (0..4).map(|_| finish_with_output(&store, 10)).collect();
        assert_eq!(kept(&store, &ids), [false, true, true, true], "count");
        assert_eq!(output_bytes_held(&store), 30);
        // 120 bytes in 4 results: the count evicts one, the budget one more;
        // exactly the budget is allowed.
        ids.push(finish_with_output(&store, 90));
        assert_eq!(kept(&store, &ids), [false, false, false, true, true]);
        assert_eq!(output_bytes_held(&store), 100);
        ids.push(finish_with_output(&store, 1));
        assert_eq!(kept(&store, &ids), [false, false, false, false, true, true]);
        assert_eq!(output_bytes_held(&store), 91);
    }

    #[tokio::test(start_paused = true)]
    async fn output_bytes_return_to_zero_once_every_result_expired() {
        let store = JobStore::new(JobLimits {
            max_retained: 4,
            ..budget_limits()
        });
        let first: Vec<Uuid> = (0..4).map(|_| finish_with_output(&store, 10)).collect();
        let abandoned = store.admit(alice().owner(), "t", "c").unwrap();
        store.abandon(abandoned.id);
        tokio::time::sleep(Duration::from_secs(100)).await;
        // The count cap evicts two of the first, the budget a third.
        let later = [
            finish_with_output(&store, 30),
            finish_with_output(&store, 60),
        ];
        assert_eq!(kept(&store, &first), [false, false, false, true]);
        assert_eq!(output_bytes_held(&store), 100);
        tokio::time::sleep(Duration::from_secs(201)).await;
        assert_eq!(kept(&store, &first), [false; 4], "expired");
        assert_eq!(kept(&store, &later), [true, true]);
        assert_eq!(output_bytes_held(&store), 90);
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert_eq!(output_bytes_held(&store), 0);
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn reads_share_the_stored_result_instead_of_copying_it() {
        let store = JobStore::new(limits());
        let id = finish_with_output(&store, 1 << 20);
        let first = store.get(id, &alice()).unwrap();
        let second = store.get(id, &alice()).unwrap();
        let waited = store.wait(id, &alice(), Duration::ZERO).await.unwrap();
        // One output buffer, and one JSON of it, however many readers: a
        // GET costs no copy of the (up to 2 MiB) output under the store
        // lock, and no serialization after it.
        assert_eq!(first.stdout.as_ptr(), second.stdout.as_ptr());
        assert_eq!(first.stderr.as_ptr(), waited.stderr.as_ptr());
        assert_eq!(first.json.as_ptr(), second.json.as_ptr());
        assert_eq!(first.json.as_ptr(), waited.json.as_ptr());
        assert_eq!(first.stdout.len() + first.stderr.len(), 1 << 20);
        assert_eq!(output_bytes_held(&store), 1 << 20, "counted once");
    }

    #[tokio::test]
    async fn the_budget_counts_a_finished_jobs_event_index() {
        use crate::run::output::{INDEX_ENTRY_BYTES, Pipe};
        let store = JobStore::new(limits());
        let j = store.admit(alice().owner(), "t", "c").unwrap();
        store.set_running(j.id, SystemTime::now());
        for _ in 0..100 {
            j.output.write(Pipe::Stdout, b"o\n");
            j.output.write(Pipe::Stderr, b"e\n");
        }
        let (stdout, stderr) = (j.output.take(Pipe::Stdout), j.output.take(Pipe::Stderr));
        let result = JobResult {
            stdout: String::from_utf8(stdout.data).unwrap(),
            stderr: String::from_utf8(stderr.data).unwrap(),
            ..done(j.id, JobStatus::Completed)
        };
        store.finish(j.id, result);
        assert_eq!(j.output.index_bytes(), 200 * INDEX_ENTRY_BYTES);
        // 400 bytes stored, 600 sent ("\n" is escaped in two), and the index.
        let held = store.shared.lock().output_bytes;
        assert_eq!(held, 400 + 600 + 200 * INDEX_ENTRY_BYTES);
        output_bytes_held(&store);
        assert!(j.output.is_sealed(), "finish seals the output");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_on_completion_or_time_out() {
        let store = Arc::new(JobStore::new(limits()));
        let a = store.admit(alice().owner(), "t", "c").unwrap();
        let timed_out = store
            .wait(a.id, &alice(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(timed_out.status, JobStatus::Accepted);
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.wait(a.id, &alice(), Duration::from_secs(60)).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        store.finish(a.id, done(a.id, JobStatus::Completed));
        let r = waiter.await.unwrap().unwrap();
        assert_eq!(r.status, JobStatus::Completed);
        store.wait_idle().await;
    }
}
