//! Output: caps, truncation and bounded memory.

use super::*;

/// Not a test on its own: run by `an_output_flood_is_capped_and_memory_stays_bounded`
/// in a process of its own, so that the peak it measures is the flood's and
/// no other test's. Writes `baseline peak` (KiB) to the report file.
#[tokio::test]
#[ignore = "helper process for an_output_flood_is_capped_and_memory_stays_bounded"]
async fn helper_run_an_output_flood() {
    let Ok(report) = std::env::var("TAILKITD_TEST_FLOOD_REPORT") else {
        return;
    };
    let d = Stack::command(
        json!([
            "/bin/sh",
            "-c",
            "yes tailkitd | head -c $0; head -c $1 /dev/zero | tr '\\0' e >&2",
            "{{.out}}",
            "{{.err}}"
        ]),
        json!([{"name": "out", "type": "int"}, {"name": "err", "type": "int"}]),
        settings(),
    );
    // A small run first, so that the baseline already holds what any job
    // needs (code paged in, runtime threads, buffers).
    let small = d.run(r#"{"out": 1000, "err": 1000}"#).await;
    assert_eq!(small["status"], "completed", "{}", small["error"]);
    let baseline = vm_hwm_kib();
    let r = d.run(r#"{"out": 52428800, "err": 3000000}"#).await;
    let peak = vm_hwm_kib();
    assert_eq!(r["status"], "completed", "{}", r["error"]);
    assert_eq!(r["stdout"].as_str().unwrap().len(), 1 << 20);
    assert!(
        r["stdout"]
            .as_str()
            .unwrap()
            .starts_with("tailkitd\ntailkitd\n")
    );
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(r["stderr"].as_str().unwrap().len(), 1 << 20);
    assert_eq!(r["stderr_truncated"], true);
    let finished = d
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "exec.finished")
        .nth(1)
        .unwrap();
    assert_eq!(
        finished["stdout_bytes"], 52_428_800,
        "every byte was counted"
    );
    assert_eq!(finished["stderr_bytes"], 3_000_000);
    std::fs::write(report, format!("{baseline} {peak}")).unwrap();
}

#[tokio::test]
async fn an_output_flood_is_capped_and_memory_stays_bounded() {
    // In this process the peak may already be higher than anything the
    // flood could reach (other tests run here), which would make the
    // measurement vacuous: run the flood in a fresh process instead.
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("hwm");
    let out = helper_process("output::helper_run_an_output_flood")
        .env("TAILKITD_TEST_FLOOD_REPORT", &report)
        .output()
        .await
        .unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the flood helper failed:\n{logs}");
    let report = std::fs::read_to_string(&report).expect("the helper wrote its report");
    let [baseline, peak]: [u64; 2] = report
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let grown_mib = peak.saturating_sub(baseline) / 1024;
    eprintln!("flood helper: peak {peak} KiB, {grown_mib} MiB over its baseline {baseline} KiB");
    // The kept result alone is 2 MiB (and the answer's JSON as much again),
    // so a peak that did not move means the measurement saw nothing.
    assert!(
        peak >= baseline + 2048,
        "the peak did not rise with the result: {baseline} -> {peak} KiB"
    );
    // Keeping the flood would take over 50 MiB; the caps keep it to a few.
    assert!(grown_mib < 24, "peak memory grew by {grown_mib} MiB");
}

#[tokio::test]
async fn output_under_the_cap_is_whole_and_not_truncated() {
    let d = Stack::command(
        json!(["/bin/sh", "-c", "printf 'caf\\303\\251 \\377'"]),
        json!([]),
        settings(),
    );
    let r = d.run("").await;
    assert_eq!(r["stdout"], "café \u{fffd}", "lossy UTF-8");
    assert_eq!(r["stdout_truncated"], false);
}
