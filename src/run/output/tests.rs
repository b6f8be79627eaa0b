//! Unit tests of the job output buffer and its event sequence.

use super::*;
use crate::run::result::JobView;
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;

/// Every event readable from `cursor` now: (id, name, data), and why the
/// read stopped.
fn read_all(output: &JobOutput, cursor: &mut Cursor) -> (Vec<(u64, String, Value)>, ReadState) {
    let mut events = Vec::new();
    let state = output.read(cursor, |id, event| {
        let mut json = Vec::new();
        event.write_json("j", &mut json);
        events.push((
            id,
            event.name().to_string(),
            serde_json::from_slice(&json).unwrap(),
        ));
        true
    });
    (events, state)
}

/// The lines of every line event from the start, as `stream:text`.
fn lines(output: &JobOutput) -> Vec<String> {
    let (events, _) = read_all(output, &mut Cursor::start());
    events
        .into_iter()
        .filter(|(_, name, _)| name == "job.stdout" || name == "job.stderr")
        .map(|(_, _, v)| {
            format!(
                "{}:{}",
                v["stream"].as_str().unwrap(),
                v["line"].as_str().unwrap()
            )
        })
        .collect()
}

fn running(cap: usize) -> Arc<JobOutput> {
    let output = JobOutput::new(cap);
    output.enter_running();
    output
}

fn result_of(output: &JobOutput, status: JobStatus, exit_code: i32) -> Arc<JobResult> {
    let stdout = output.take(Pipe::Stdout);
    let stderr = output.take(Pipe::Stderr);
    Arc::new(JobResult {
        stdout: String::from_utf8(stdout.data).unwrap(),
        stderr: String::from_utf8(stderr.data).unwrap(),
        stdout_truncated: stdout.truncated,
        stderr_truncated: stderr.truncated,
        exit_code,
        error: (status != JobStatus::Completed).then(|| format!("exit status {exit_code}")),
        ..JobResult::pending(Uuid::nil(), status, "t", "c", None, 1)
    })
}

#[test]
fn lines_lose_their_newline_and_crlf_becomes_lf() {
    let output = running(1 << 20);
    output.write(Pipe::Stdout, b"one\ntwo\r\n\nthree\rstill three\r\nfour");
    assert_eq!(
        lines(&output),
        [
            "stdout:one",
            "stdout:two",
            "stdout:",
            "stdout:three\rstill three"
        ],
        "the partial last line waits"
    );
    output.close(Pipe::Stdout);
    assert_eq!(
        lines(&output).last().unwrap(),
        "stdout:four",
        "flushed at the end"
    );
}

#[test]
fn the_sequence_is_accepted_running_lines_then_the_end() {
    let output = JobOutput::new(1 << 20);
    // Output before the process is known to run waits for `running`.
    output.write(Pipe::Stderr, b"early\n");
    let mut cursor = Cursor::start();
    let (events, state) = read_all(&output, &mut cursor);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].2, json!({"job_id": "j", "status": "accepted"}));
    assert_eq!(state, ReadState::Waiting);
    output.enter_running();
    output.enter_running();
    output.write(Pipe::Stdout, b"out\n");
    let result = result_of(&output, JobStatus::Failed, 3);
    output.seal(result);
    let (events, state) = read_all(&output, &mut cursor);
    assert_eq!(state, ReadState::Ended);
    let got: Vec<(u64, &str, &Value)> =
        events.iter().map(|(i, n, v)| (*i, n.as_str(), v)).collect();
    assert_eq!(
        got,
        [
            (
                2,
                "job.status",
                &json!({"job_id": "j", "status": "running"})
            ),
            (
                3,
                "job.stderr",
                &json!({"job_id": "j", "line": "early", "stream": "stderr"})
            ),
            (
                4,
                "job.stdout",
                &json!({"job_id": "j", "line": "out", "stream": "stdout"})
            ),
            (5, "job.status", &json!({"job_id": "j", "status": "failed"})),
            (
                6,
                "job.failed",
                &json!({"job_id": "j", "exit_code": 3, "error": "exit status 3",
                        "stdout_truncated": false, "stderr_truncated": false})
            ),
        ]
    );
    let (events, state) = read_all(&output, &mut cursor);
    assert!(events.is_empty());
    assert_eq!(state, ReadState::Ended);
}

#[test]
fn a_job_that_never_ran_still_ends_with_its_output() {
    // The launcher may say why it could not start on stderr.
    let output = JobOutput::new(1 << 20);
    output.write(Pipe::Stderr, b"tailkitd-launch: no such file");
    output.seal(result_of(&output, JobStatus::Failed, -1));
    let (events, _) = read_all(&output, &mut Cursor::start());
    let names: Vec<&str> = events.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["job.status", "job.stderr", "job.status", "job.failed"]
    );
    assert_eq!(events[1].2["line"], "tailkitd-launch: no such file");
}

#[test]
fn completed_jobs_end_with_job_completed_and_exit_code_zero() {
    let output = running(1 << 20);
    output.seal(result_of(&output, JobStatus::Completed, 0));
    let (events, _) = read_all(&output, &mut Cursor::start());
    let last = events.last().unwrap();
    assert_eq!(last.1, "job.completed");
    assert_eq!(
        last.2,
        json!({"job_id": "j", "exit_code": 0, "stdout_truncated": false, "stderr_truncated": false})
    );
}

#[test]
fn invalid_utf8_is_replaced_and_split_characters_are_joined() {
    let output = running(1 << 20);
    let text = "é€😀\n".as_bytes();
    // Every character cut across two writes.
    for chunk in text.chunks(1) {
        output.write(Pipe::Stdout, chunk);
    }
    output.write(Pipe::Stdout, b"bad \xff\xfe end\n\xe2\x82");
    output.close(Pipe::Stdout);
    assert_eq!(
        lines(&output),
        [
            "stdout:é€😀",
            "stdout:bad \u{fffd}\u{fffd} end",
            "stdout:\u{fffd}"
        ]
    );
    let kept = output.take(Pipe::Stdout);
    let expected = String::from_utf8_lossy(
        b"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\nbad \xff\xfe end\n\xe2\x82",
    );
    assert_eq!(
        String::from_utf8(kept.data).unwrap(),
        expected,
        "as from_utf8_lossy"
    );
    assert_eq!(kept.total, (text.len() + 13) as u64);
}

#[test]
fn long_lines_are_split_at_character_boundaries() {
    let output = running(1 << 20);
    let long = "é".repeat(MAX_LINE_BYTES); // twice the limit in bytes
    output.write(Pipe::Stdout, format!("{long}\n").as_bytes());
    let exact = "x".repeat(MAX_LINE_BYTES);
    output.write(Pipe::Stdout, format!("{exact}\r\n{exact}x\n").as_bytes());
    let got = lines(&output);
    let sizes: Vec<usize> = got.iter().map(|l| l.len() - "stdout:".len()).collect();
    assert_eq!(
        sizes,
        [
            MAX_LINE_BYTES,
            MAX_LINE_BYTES,
            MAX_LINE_BYTES,
            MAX_LINE_BYTES,
            1
        ]
    );
    assert_eq!(got[0], format!("stdout:{}", "é".repeat(MAX_LINE_BYTES / 2)));
    assert_eq!(
        got[2],
        format!("stdout:{exact}"),
        "exactly the limit: one event, CRLF gone"
    );
}

#[test]
fn a_long_line_goes_out_before_its_newline_arrives() {
    let output = running(1 << 20);
    output.write(Pipe::Stdout, "y".repeat(MAX_LINE_BYTES + 1).as_bytes());
    assert!(lines(&output).is_empty(), "it may still end at a newline");
    output.write(Pipe::Stdout, b"yy");
    assert_eq!(lines(&output).len(), 1, "too long now whatever follows");
}

#[test]
fn writes_split_anywhere_give_the_same_events() {
    // Lines, CRLFs, long lines and multi-byte characters, written in
    // pseudo-random pieces, count exactly as written at once.
    let mut text = Vec::new();
    let mut seed: u64 = 7;
    let mut rand = |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    for _ in 0..3000 {
        match rand(6) {
            0 => text.push(b'\n'),
            1 => text.extend_from_slice(b"\r\n"),
            2 => text.extend_from_slice("é".as_bytes()),
            3 => text.extend(std::iter::repeat_n(b'a', rand(3000) as usize)),
            4 => text.push(0xff),
            _ => text.extend_from_slice(b"word "),
        }
    }
    let whole = running(1 << 24);
    whole.write(Pipe::Stdout, &text);
    whole.close(Pipe::Stdout);
    let expected = lines(&whole);
    assert!(expected.len() > 500);
    for _ in 0..5 {
        let split = running(1 << 24);
        let mut rest = &text[..];
        while !rest.is_empty() {
            let n = (rand(5000) as usize + 1).min(rest.len());
            split.write(Pipe::Stdout, &rest[..n]);
            rest = &rest[n..];
        }
        split.close(Pipe::Stdout);
        assert_eq!(lines(&split), expected);
    }
}

#[test]
fn streams_interleave_in_arrival_order_with_one_index_entry_per_run() {
    let output = running(1 << 20);
    output.write(Pipe::Stdout, b"a\nb\n");
    output.write(Pipe::Stderr, b"partial ");
    output.write(Pipe::Stdout, b"c\n");
    output.write(Pipe::Stderr, b"e\n");
    output.write(Pipe::Stdout, b"d\n");
    assert_eq!(
        lines(&output),
        [
            "stdout:a",
            "stdout:b",
            "stdout:c",
            "stderr:partial e",
            "stdout:d"
        ],
        "a line counts when it is complete"
    );
    // accepted, running, then three runs of lines.
    assert_eq!(output.index_len(), 5);
    // A flood of tiny lines on one stream adds an entry per 4096 lines
    // (so that resuming in it scans at most that many), not one per line.
    output.write(Pipe::Stdout, "\n".repeat(100_000).as_bytes());
    assert_eq!(output.index_len(), 5 + 100_001 / 4096);
    assert_eq!(lines(&output).len(), 100_005);
}

#[test]
fn the_cap_keeps_the_first_bytes_and_flushes_the_line_it_cuts() {
    let output = running(11);
    output.write(Pipe::Stdout, "abc\ndefé".as_bytes());
    output.write(Pipe::Stdout, "ghijk\n".as_bytes());
    output.write(Pipe::Stdout, b"more\n");
    // "abc\n" as sent (the newline escaped takes two) + "defé" (5 bytes)
    // = 10: one byte left, for the "g".
    assert_eq!(lines(&output), ["stdout:abc", "stdout:defég"]);
    output.seal(result_of(&output, JobStatus::Completed, 0));
    let (events, _) = read_all(&output, &mut Cursor::start());
    let last = &events.last().unwrap().2;
    assert_eq!(last["stdout_truncated"], true);
    assert_eq!(last["stderr_truncated"], false);
    assert_eq!(lines(&output).len(), 2, "events cover the kept output only");
}

#[test]
fn the_cap_cuts_at_a_character_boundary() {
    let output = running(5);
    output.write(Pipe::Stdout, "ab€€".as_bytes());
    let kept = output.take(Pipe::Stdout);
    assert_eq!(kept.data, "ab€".as_bytes());
    assert!(kept.truncated);
    assert_eq!(kept.total, 8);
}

#[test]
fn the_cap_counts_the_bytes_a_result_sends() {
    // A control byte takes six bytes in the JSON answer: `\u0001`.
    let output = running(100);
    output.write(Pipe::Stdout, &[1u8; 1000]);
    let kept = output.take(Pipe::Stdout);
    assert_eq!(kept.data, [1u8; 16], "16 x 6 bytes fit in 100");
    assert!(kept.truncated);
    // Whatever the output, the answer stays within the caps and its
    // envelope.
    let output = running(1 << 20);
    output.write(Pipe::Stdout, &vec![1u8; 1 << 20]);
    output.write(Pipe::Stderr, &vec![b'\n'; 1 << 20]);
    let view = JobView::new(result_of(&output, JobStatus::Completed, 0));
    assert!(view.json.len() <= (2 << 20) + 512, "{}", view.json.len());
    assert!(view.stdout_truncated && view.stderr_truncated);
}

#[test]
fn output_exactly_at_the_cap_is_not_truncated() {
    let output = running(4);
    output.write(Pipe::Stdout, b"abcd");
    output.close(Pipe::Stdout);
    assert!(!output.take(Pipe::Stdout).truncated);
}

#[test]
fn alternating_tiny_lines_count_their_index_against_the_cap() {
    let cap = 64 << 10;
    let output = running(cap);
    for _ in 0..100_000 {
        output.write(Pipe::Stdout, b"o\n");
        output.write(Pipe::Stderr, b"e\n");
    }
    let index = output.index_len() * INDEX_ENTRY_BYTES;
    let held = output.kept(Pipe::Stdout) + output.kept(Pipe::Stderr) + index;
    // Per stream the cap, its free index bytes and the entry that went
    // past them; and the two status entries.
    let bound = 2 * (cap + cap / 16 + 1024 + INDEX_ENTRY_BYTES) + 2 * INDEX_ENTRY_BYTES;
    assert!(
        held <= bound,
        "held {held} bytes for two streams capped at {cap}"
    );
    let stdout = output.take(Pipe::Stdout);
    assert!(stdout.truncated, "the index took room from the output");
    assert_eq!(stdout.total, 200_000);
}

#[test]
fn a_cursor_resumes_right_after_any_event() {
    let output = running(1 << 20);
    output.write(Pipe::Stdout, b"1\n2\n");
    output.write(Pipe::Stderr, b"3\n");
    output.write(
        Pipe::Stdout,
        format!("4\n{}\n5", "z".repeat(MAX_LINE_BYTES * 2)).as_bytes(),
    );
    output.seal(result_of(&output, JobStatus::Completed, 0));
    let (all, _) = read_all(&output, &mut Cursor::start());
    assert_eq!(all.len(), 11);
    for last in 0..=all.len() as u64 + 1 {
        let (rest, state) = read_all(&output, &mut Cursor::after(last));
        assert_eq!(
            rest[..],
            all[(last as usize).min(all.len())..],
            "after {last}"
        );
        assert_eq!(state, ReadState::Ended);
    }
}

#[test]
fn a_paused_reader_goes_on_where_it_stopped() {
    let output = running(1 << 20);
    output.write(Pipe::Stdout, b"a\nb\nc\n");
    let mut cursor = Cursor::start();
    let mut ids = Vec::new();
    let state = output.read(&mut cursor, |id, _| {
        ids.push(id);
        ids.len() < 3
    });
    assert_eq!(state, ReadState::Paused);
    assert_eq!(cursor.next_id(), 4);
    let (rest, _) = read_all(&output, &mut cursor);
    assert_eq!(rest.iter().map(|e| e.0).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(ids, [1, 2, 3]);
}

#[test]
fn readers_wait_while_the_output_is_in_flight_to_the_result() {
    let output = running(1 << 20);
    output.write(Pipe::Stdout, b"x\ny");
    let mut cursor = Cursor::start();
    read_all(&output, &mut cursor);
    let stdout = output.take(Pipe::Stdout);
    let taken_at = stdout.data.as_ptr();
    let stderr = output.take(Pipe::Stderr);
    let (events, state) = read_all(&output, &mut cursor);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(state, ReadState::Waiting);
    let result = Arc::new(JobResult {
        stdout: String::from_utf8(stdout.data).unwrap(),
        stderr: String::from_utf8(stderr.data).unwrap(),
        ..JobResult::pending(Uuid::nil(), JobStatus::Completed, "t", "c", None, 1)
    });
    assert_eq!(
        result.stdout.as_ptr(),
        taken_at,
        "the result holds the buffer itself"
    );
    output.seal(result);
    let (events, state) = read_all(&output, &mut cursor);
    assert_eq!(events[0].2["line"], "y");
    assert_eq!(events.len(), 3);
    assert_eq!(state, ReadState::Ended);
}

#[test]
fn a_result_without_the_taken_output_ends_readers_with_an_error() {
    let output = running(1 << 20);
    output.write(Pipe::Stdout, b"x\n");
    let _lost = output.take(Pipe::Stdout);
    output.take(Pipe::Stderr);
    output.seal(Arc::new(JobResult::pending(
        Uuid::nil(),
        JobStatus::Failed,
        "t",
        "c",
        None,
        1,
    )));
    let (events, state) = read_all(&output, &mut Cursor::start());
    assert_eq!(events.len(), 2);
    assert!(matches!(state, ReadState::Failed(e) if e.contains("no longer available")));
}

#[test]
fn an_expired_job_lets_its_output_go_and_fails_readers_that_still_need_it() {
    let output = running(1 << 20);
    output.write(Pipe::Stdout, b"one\ntwo\n");
    let result = result_of(&output, JobStatus::Completed, 0);
    output.seal(Arc::clone(&result));
    assert_eq!(Arc::strong_count(&result), 3, "both pipes share the result");
    // A reader that got the first events, then the store lets the job go.
    let mut cursor = Cursor::start();
    let mut read = 0;
    output.read(&mut cursor, |_, _| {
        read += 1;
        read < 2
    });
    output.expire();
    assert_eq!(Arc::strong_count(&result), 1, "the output still holds it");
    let (events, state) = read_all(&output, &mut cursor);
    assert!(events.is_empty(), "{events:?}");
    assert!(matches!(state, ReadState::Failed(e) if e.contains("no longer available")));
    // One past its lines only needs the terminal events.
    let mut late = Cursor::after(4);
    let (events, state) = read_all(&output, &mut late);
    let names: Vec<&str> = events.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(names, ["job.status", "job.completed"], "{events:?}");
    assert_eq!(state, ReadState::Ended);
}

#[test]
fn an_aborted_job_fails_its_readers() {
    let output = JobOutput::new(1 << 20);
    output.abort("the job's acceptance could not be recorded");
    let (events, state) = read_all(&output, &mut Cursor::start());
    assert_eq!(events.len(), 1);
    assert_eq!(
        state,
        ReadState::Failed("the job's acceptance could not be recorded".into())
    );
}

#[tokio::test]
async fn subscribers_wake_on_new_lines_but_not_on_partial_ones() {
    let output = running(1 << 20);
    let mut changes = output.subscribe();
    changes.borrow_and_update();
    output.write(Pipe::Stdout, b"no newline yet");
    assert!(!changes.has_changed().unwrap());
    output.write(Pipe::Stdout, b"\n");
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
}

#[test]
fn a_full_stream_only_counts() {
    let output = running(8);
    output.write(Pipe::Stdout, b"12345678");
    for _ in 0..1000 {
        output.write(Pipe::Stdout, &[b'x'; 1000]);
    }
    let kept = output.take(Pipe::Stdout);
    assert_eq!(kept.data, b"12345678");
    assert_eq!(kept.total, 1_000_008);
    assert!(kept.truncated);
}

#[test]
fn resuming_inside_long_runs_finds_the_same_lines() {
    let output = running(1 << 20);
    let text: String = (0..10_000).map(|i| format!("{i}\n")).collect();
    output.write(Pipe::Stdout, text.as_bytes());
    output.write(Pipe::Stderr, b"e\n");
    output.write(Pipe::Stdout, b"tail\n");
    let (all, _) = read_all(&output, &mut Cursor::start());
    assert_eq!(all.len(), 2 + 10_002);
    for last in [2, 3, 4097, 4098, 5000, 8193, 10_001, 10_002, 10_003] {
        let (rest, state) = read_all(&output, &mut Cursor::after(last));
        assert_eq!(rest[..], all[last as usize..], "after {last}");
        assert_eq!(state, ReadState::Waiting);
    }
}
