//! Unit tests of the job store.

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
