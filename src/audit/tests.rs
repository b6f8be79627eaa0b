//! Unit tests of the audit log: records, rotation, a stalled sink, a full
//! disk (a real tmpfs), a deleted file, and the start-up repair.

use std::fs::File;
use std::io::Write;

use super::*;

fn caller() -> AuditCaller {
    AuditCaller {
        node: "laptop.ts.net".into(),
        node_id: "n1".into(),
        ip: Some("100.64.0.2".parse().unwrap()),
        user: "alice@example.com".into(),
        tags: vec![],
    }
}

#[test]
fn records_are_json_lines_with_the_event_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path).unwrap();
    let mut rec = AuditRecord::new(AuditEvent::Accepted, caller(), "disk", "usage");
    rec.job_id = Some("j1".into());
    rec.args.insert("path".into(), "/var".into());
    log.record(&rec).unwrap();
    let mut rec = AuditRecord::new(AuditEvent::Denied, caller(), "disk", "usage");
    rec.reason = Some("missing capability".into());
    log.record(&rec).unwrap();

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["event"], "exec.accepted");
    assert_eq!(lines[0]["job_id"], "j1");
    assert_eq!(lines[0]["args"]["path"], "/var");
    assert_eq!(lines[0]["caller"]["user"], "alice@example.com");
    assert_eq!(lines[0]["caller"]["ip"], "100.64.0.2");
    assert!(lines[0].get("reason").is_none());
    assert_eq!(lines[1]["event"], "exec.denied");
    assert_eq!(lines[1]["reason"], "missing capability");
}

#[tokio::test]
async fn reopen_follows_a_rotated_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path).unwrap();
    log.record(&AuditRecord::new(AuditEvent::Denied, caller(), "a", "b"))
        .unwrap();
    std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
    log.reopen().await.unwrap();
    log.record(&AuditRecord::new(AuditEvent::Denied, caller(), "c", "d"))
        .unwrap();
    let new = std::fs::read_to_string(&path).unwrap();
    assert_eq!(new.lines().count(), 1);
    assert!(new.contains(r#""tool":"c""#));
}

#[tokio::test]
async fn async_records_reach_the_file_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = Arc::new(AuditLog::open(&path).unwrap());
    for tool in ["a", "b", "c"] {
        log.record_async(&AuditRecord::new(AuditEvent::Denied, caller(), tool, "x"))
            .await
            .unwrap();
    }
    let tools: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["tool"].to_string())
        .collect();
    assert_eq!(tools, [r#""a""#, r#""b""#, r#""c""#]);
    let full = Arc::new(AuditLog::open(Path::new("/dev/full")).unwrap());
    let err = full
        .record_async(&AuditRecord::new(AuditEvent::Accepted, caller(), "a", "b"))
        .await
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
}

/// A log (write timeout 200 ms) into a FIFO whose reader (returned,
/// non-blocking) reads nothing until the test does, filled with
/// acceptances until one times out: the writer is then stuck on that
/// record. Returns how many were written before it.
async fn stalled_log(dir: &Path) -> (AuditLog, File, usize) {
    use std::os::unix::fs::OpenOptionsExt;
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let log = AuditLog::open(&fifo)
        .unwrap()
        .with_write_timeout(Duration::from_millis(200));
    let filler = AuditRecord::new(AuditEvent::Accepted, caller(), "filler", "c");
    for written in 0..5000 {
        if let Err(err) = log.record_async(&filler).await {
            assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
            return (log, reader, written);
        }
    }
    panic!("the pipe never filled up");
}

#[tokio::test]
async fn a_stalled_sink_holds_callers_for_the_write_timeout_only() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _reader, written) = stalled_log(dir.path()).await;
    assert!(written > 0);
    // Later callers are answered too (timed out, or refused at once
    // when too many wait), never left hanging.
    let rec = AuditRecord::new(AuditEvent::Accepted, caller(), "t", "c");
    let err = log.record_async(&rec).await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        ),
        "{err}"
    );
    let status = log.status();
    assert!(status.failing, "a stalled sink is reported");
    assert!(status.error.unwrap().contains("took no record"));
}

#[tokio::test]
async fn late_records_other_than_acceptances_are_still_written() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let (log, mut reader, _) = stalled_log(dir.path()).await;
    let record = |event, tool: &str| AuditRecord::new(event, caller(), tool, "c");
    // Queued behind the stalled write, all three time out; then fill
    // the queue, which refuses denials but never a finished record.
    let late = [
        record(AuditEvent::Accepted, "late-accepted"),
        record(AuditEvent::Denied, "late-denied"),
        record(AuditEvent::Finished, "late-finished"),
    ];
    for r in &late {
        let err = log.record_async(r).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    }
    for _ in 0..QUEUE {
        let _ = log.send(
            Order::Reopen {
                reply: Box::new(|_| {}),
            },
            false,
        );
    }
    let full = log
        .record_async(&record(AuditEvent::Denied, "refused"))
        .await
        .unwrap_err();
    assert_eq!(full.kind(), io::ErrorKind::WouldBlock, "{full}");
    let err = log
        .record_async(&record(AuditEvent::Finished, "queued-finished"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");

    // The sink moves again: read everything.
    let mut text = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&text).contains("queued-finished") {
        assert!(
            std::time::Instant::now() < deadline,
            "the late records never came"
        );
        let mut chunk = [0u8; 65536];
        match reader.read(&mut chunk) {
            Ok(n) => text.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    }
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("late-denied"), "a late denial was dropped");
    assert!(text.contains("late-finished"), "a late finish was dropped");
    assert!(
        !text.contains("late-accepted"),
        "a refused job's acceptance was written"
    );
    assert!(
        !text.contains("\"refused\""),
        "a refused record was written"
    );
    eventually("the log to be reported working again", || {
        !log.status().failing
    })
    .await;
}

#[test]
fn a_failed_write_is_reported() {
    let log = AuditLog::open(Path::new("/dev/full")).unwrap();
    let err = log
        .record(&AuditRecord::new(AuditEvent::Accepted, caller(), "a", "b"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
}

/// A tmpfs of `size` (mount syntax: `64k`), mounted in a mount namespace
/// of its own by a helper process (`unshare --mount`, which needs root or
/// a user namespace, as `scripts/test` provides), and reached from here
/// through `/proc/PID/root`. It disappears with the helper (on drop).
struct SmallDisk {
    helper: std::process::Child,
    /// The tmpfs, as this process reaches it.
    dir: PathBuf,
    _mount_point: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        use std::io::BufRead;
        let mount_point = tempfile::tempdir().unwrap();
        let mut helper = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs -o size=$1 tailkitd-test \"$2\" && echo mounted && exec sleep 600")
            .args(["sh", size])
            .arg(mount_point.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) runs");
        let mut line = String::new();
        std::io::BufReader::new(helper.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "mounted",
            "could not mount a tmpfs: run the tests as root or in a user namespace (scripts/test)"
        );
        let dir = Path::new(&format!("/proc/{}/root", helper.id()))
            .join(mount_point.path().strip_prefix("/").unwrap());
        SmallDisk {
            helper,
            dir,
            _mount_point: mount_point,
        }
    }

    /// Fills every free block with a file; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut file = File::create(&path).unwrap();
        let block = [0u8; 4096];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = self.helper.kill();
        let _ = self.helper.wait();
    }
}

/// Polls `condition` every 20 ms for at most 20 s (a hang guard).
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn events_in(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["event"].as_str().unwrap().to_string(),
                v["tool"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn records_that_meet_a_full_disk_are_kept_and_written_once_it_has_room() {
    let disk = SmallDisk::mount("64k");
    let filler = disk.fill();
    // Created on the full disk: empty, so its first record needs a block.
    let path = disk.dir.join("audit.jsonl");
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(log.status(), AuditStatus::default());
    let record = |event, tool: &str| AuditRecord::new(event, caller(), tool, "c");

    let err = log
        .record_async(&record(AuditEvent::Finished, "finished-1"))
        .await
        .unwrap_err();
    assert!(is_queued(&err), "{err}");
    assert_eq!(err.raw_os_error(), None);
    assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
    let err = log
        .record_async(&record(AuditEvent::Denied, "denied-1"))
        .await
        .unwrap_err();
    assert!(is_queued(&err), "{err}");
    // An acceptance is never kept: its job is refused.
    let err = log
        .record_async(&record(AuditEvent::Accepted, "accepted-refused"))
        .await
        .unwrap_err();
    assert!(!is_queued(&err), "{err}");
    let err = log
        .record_async(&record(AuditEvent::Finished, "finished-2"))
        .await
        .unwrap_err();
    assert!(is_queued(&err), "{err}");
    let status = log.status();
    assert!(status.failing);
    assert_eq!(status.queued, 3);
    assert!(status.error.unwrap().contains("No space left"));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "no half line");

    std::fs::remove_file(&filler).unwrap();
    eventually("the kept records to be written", || {
        log.status().queued == 0
    })
    .await;
    assert!(!log.status().failing);
    log.record_async(&record(AuditEvent::Accepted, "accepted-after"))
        .await
        .unwrap();
    let tools: Vec<String> = events_in(&path).into_iter().map(|(_, t)| t).collect();
    assert_eq!(
        tools,
        ["finished-1", "denied-1", "finished-2", "accepted-after"],
        "in order, the refused acceptance left out"
    );
}

#[tokio::test]
async fn a_full_disk_keeps_a_bounded_number_of_denials_but_every_finish() {
    // Room for the 1025 records kept, once the filler is gone.
    let disk = SmallDisk::mount("1m");
    let filler = disk.fill();
    let path = disk.dir.join("audit.jsonl");
    let log = AuditLog::open(&path).unwrap();
    let record = |event, tool: &str| AuditRecord::new(event, caller(), tool, "c");
    for _ in 0..writer::MAX_BACKLOG_DENIALS + 10 {
        let _ = log.record_async(&record(AuditEvent::Denied, "d")).await;
    }
    let err = log
        .record_async(&record(AuditEvent::Finished, "f"))
        .await
        .unwrap_err();
    assert!(is_queued(&err), "a finish is kept past the denial bound");
    let status = log.status();
    assert_eq!(status.queued, writer::MAX_BACKLOG_DENIALS + 1);
    assert_eq!(status.dropped, 10);
    std::fs::remove_file(&filler).unwrap();
    eventually("the kept records to be written", || {
        log.status().queued == 0
    })
    .await;
    let events = events_in(&path);
    assert_eq!(events.len(), writer::MAX_BACKLOG_DENIALS + 1);
    assert_eq!(events.last().unwrap().1, "f");
}

#[tokio::test]
async fn a_deleted_file_is_created_again_without_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path).unwrap();
    log.record_async(&AuditRecord::new(
        AuditEvent::Denied,
        caller(),
        "before",
        "c",
    ))
    .await
    .unwrap();
    std::fs::remove_file(&path).unwrap();
    log.record_async(&AuditRecord::new(
        AuditEvent::Denied,
        caller(),
        "after",
        "c",
    ))
    .await
    .unwrap();
    let events = events_in(&path);
    assert_eq!(events, [("exec.denied".to_string(), "after".to_string())]);
}

#[test]
fn jobs_a_killed_daemon_left_open_are_closed_as_abandoned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let line = |event, id: &str| {
        let mut r = AuditRecord::new(event, caller(), "t", "c");
        r.job_id = Some(id.into());
        r.args.insert("secs".into(), 600.into());
        to_line(&r).unwrap()
    };
    let text = [
        line(AuditEvent::Accepted, "done"),
        line(AuditEvent::Accepted, "open-1"),
        "not json\n".to_string(),
        line(AuditEvent::Finished, "done"),
        line(AuditEvent::Accepted, "closed-before"),
        line(AuditEvent::Abandoned, "closed-before"),
        line(AuditEvent::Accepted, "open-2"),
        // Torn: the daemon died while writing this one.
        r#"{"ts":"2026-01-01T00:00:00.000Z","event":"exec.fini"#.to_string(),
    ]
    .concat();
    std::fs::write(&path, &text).unwrap();
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(log.close_abandoned().unwrap(), 2);
    assert_eq!(
        log.close_abandoned().unwrap(),
        0,
        "a second start has nothing to close"
    );
    let after = std::fs::read_to_string(&path).unwrap();
    let added: Vec<serde_json::Value> = after[text.len()..]
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        after.as_bytes()[text.len()],
        b'\n',
        "the torn line was ended"
    );
    assert_eq!(added.len(), 2, "{after}");
    for (record, id) in added.iter().zip(["open-1", "open-2"]) {
        assert_eq!(record["event"], "exec.abandoned");
        assert_eq!(record["job_id"], id);
        assert_eq!(record["args"]["secs"], 600);
        assert_eq!(record["caller"]["user"], "alice@example.com");
        assert_eq!(record["reason"], recover::ABANDONED_REASON);
    }
}

#[test]
fn only_the_tail_of_a_large_log_is_read_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut accepted = AuditRecord::new(AuditEvent::Accepted, caller(), "t", "c");
    accepted.job_id = Some("too-old".into());
    let mut file = File::create(&path).unwrap();
    file.write_all(to_line(&accepted).unwrap().as_bytes())
        .unwrap();
    let denial = to_line(&AuditRecord::new(AuditEvent::Denied, caller(), "t", "c")).unwrap();
    let mut written = 0;
    while written <= recover::TAIL_BYTES {
        file.write_all(denial.as_bytes()).unwrap();
        written += denial.len() as u64;
    }
    drop(file);
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(log.close_abandoned().unwrap(), 0);
}
