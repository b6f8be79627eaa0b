//! The registry, live: reloads from a real directory through the real
//! watcher, and tool files written in place never served half done.

use std::io::Write;

use tailkitd::tools::WatchGuard;

use super::*;

const V1: &str =
    r#"{"name": "live", "commands": [{"name": "say", "exec_parts": ["/bin/echo", "v1"]}]}"#;
const V2: &str =
    r#"{"name": "live", "commands": [{"name": "say", "exec_parts": ["/bin/echo", "v2"]}]}"#;

/// A settle period no test waits out: whatever is served under it was
/// served without waiting.
const FOREVER: Duration = Duration::from_secs(3600);

fn says(registry: &Registry, word: &str) -> bool {
    registry
        .lookup("live", "say")
        .is_some_and(|e| e.command.exec_parts[1] == word)
}

#[tokio::test]
async fn a_directory_created_later_is_loaded() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("tools");
    let registry = Arc::new(
        Registry::load(&dir, ToolLimits::default()).with_settle(Duration::from_millis(300)),
    );
    let _watch = registry.spawn_watcher().unwrap();
    assert_eq!(registry.counts(), (0, 0));
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("live.json"), V1).unwrap();
    eventually(LONG, "the new directory to load", || says(&registry, "v1")).await;
    // Deleting the directory empties the registry; recreating it reloads.
    std::fs::remove_dir_all(&dir).unwrap();
    eventually(LONG, "the deleted directory to unload", || {
        registry.counts() == (0, 0)
    })
    .await;
    std::fs::create_dir(&dir).unwrap();
    rename_save(&dir, "live.json", V2);
    eventually(LONG, "the recreated directory to load", || {
        says(&registry, "v2")
    })
    .await;
}

#[tokio::test]
async fn edits_rename_saves_and_deletions_reload() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("live.json"), V1).unwrap();
    let registry = Arc::new(
        Registry::load(dir.path(), ToolLimits::default()).with_settle(Duration::from_millis(300)),
    );
    let _watch = registry.spawn_watcher().unwrap();
    assert!(says(&registry, "v1"));
    rename_save(dir.path(), "live.json", V2);
    eventually(LONG, "a rename-save to reload", || says(&registry, "v2")).await;
    std::fs::write(dir.path().join("live.json"), V1).unwrap();
    eventually(LONG, "an in-place write to reload", || {
        says(&registry, "v1")
    })
    .await;
    std::fs::write(dir.path().join("live.json"), "{ broken").unwrap();
    eventually(LONG, "a broken file to be dropped", || {
        registry.lookup("live", "say").is_none()
    })
    .await;
    assert_eq!(registry.problems().len(), 1);
    std::fs::write(dir.path().join("live.json"), V2).unwrap();
    eventually(LONG, "the fixed file", || says(&registry, "v2")).await;
    std::fs::remove_file(dir.path().join("live.json")).unwrap();
    eventually(LONG, "a deletion", || registry.counts() == (0, 0)).await;
}

#[tokio::test]
async fn a_configmap_data_symlink_swap_is_served_without_waiting() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..2024_01_01_00_00_00.1")).unwrap();
    std::fs::write(d.join("..2024_01_01_00_00_00.1/live.json"), V1).unwrap();
    symlink("..2024_01_01_00_00_00.1", d.join("..data")).unwrap();
    symlink("..data/live.json", d.join("live.json")).unwrap();
    let registry = Arc::new(Registry::load(d, ToolLimits::default()).with_settle(FOREVER));
    let _watch = registry.spawn_watcher().unwrap();
    assert!(says(&registry, "v1"));
    assert!(registry.problems().is_empty(), "..data is ignored");

    // What the kubelet does: new timestamped dir, `..data_tmp` symlink to
    // it, renamed over `..data`, old dir removed.
    std::fs::create_dir(d.join("..2024_01_02_00_00_00.2")).unwrap();
    std::fs::write(d.join("..2024_01_02_00_00_00.2/live.json"), V2).unwrap();
    symlink("..2024_01_02_00_00_00.2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..2024_01_01_00_00_00.1")).unwrap();
    eventually(LONG, "the ConfigMap swap to reload", || {
        says(&registry, "v2")
    })
    .await;
    // A key added to the ConfigMap: its symlink appears after the swap.
    std::fs::create_dir(d.join("..3")).unwrap();
    std::fs::write(d.join("..3/live.json"), V2).unwrap();
    std::fs::write(d.join("..3/more.json"), V1.replace("\"live\"", "\"more\"")).unwrap();
    symlink("..3", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    symlink("..data/more.json", d.join("more.json")).unwrap();
    eventually(LONG, "the new key to load", || {
        registry.lookup("more", "say").is_some()
    })
    .await;
}

#[tokio::test]
async fn in_place_writes_wait_while_renames_are_served_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("live.json"), V1).unwrap();
    let registry = Arc::new(Registry::load(dir.path(), ToolLimits::default()).with_settle(FOREVER));
    let _watch = registry.spawn_watcher().unwrap();
    // Long enough after the load that it cannot have caught the write
    // below half done (else the file would be withdrawn, not kept).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // In place: the previous definition stays; a new file is not served.
    std::fs::write(dir.path().join("live.json"), V2).unwrap();
    std::fs::write(
        dir.path().join("new.json"),
        V1.replace("\"live\"", "\"new\""),
    )
    .unwrap();
    eventually(LONG, "the in-place writes to be seen", || {
        registry.waiting() == 2
    })
    .await;
    // Renamed into place after them: served, while they still wait.
    rename_save(
        dir.path(),
        "other.json",
        &V1.replace("\"live\"", "\"other\""),
    );
    eventually(LONG, "the rename to be served", || {
        registry.lookup("other", "say").is_some()
    })
    .await;
    assert!(says(&registry, "v1"), "an in-place write was served");
    assert!(
        registry.lookup("new", "say").is_none(),
        "a new file was served"
    );
    // Nor does a SIGHUP's reload serve them.
    registry.reload();
    assert!(says(&registry, "v1") && registry.lookup("new", "say").is_none());
    // A deletion goes at once, and a rename over a waiting file is served.
    std::fs::remove_file(dir.path().join("new.json")).unwrap();
    rename_save(dir.path(), "live.json", &V2.replace("v2", "v3"));
    eventually(LONG, "the rename over the waiting file", || {
        says(&registry, "v3")
    })
    .await;
    eventually(LONG, "the deletion", || registry.waiting() == 0).await;
}

#[tokio::test]
async fn a_running_job_keeps_the_command_it_started_with() {
    let d = Stack::new(
        &[(
            "live.json",
            r#"{"name": "live", "commands": [{"name": "say", "exec_parts": ["/bin/sh", "-c", "sleep 0.5; echo v1"]}]}"#,
        )],
        settings(),
    );
    let _watch = d.registry.spawn_watcher().unwrap();
    let (_, v, _) = d.request(&alice(), "POST", "/exec/live/say", "").await;
    rename_save(d.dir.path(), "live.json", V2);
    eventually(LONG, "the reload", || says(&d.registry, "v2")).await;
    let path = format!("/exec/jobs/{}?wait=30s", v["job_id"].as_str().unwrap());
    assert_eq!(
        d.request(&alice(), "GET", &path, "").await.1["stdout"],
        "v1\n"
    );
    let (_, r, _) = d
        .request(&alice(), "POST", "/exec/live/say?wait=30s", "")
        .await;
    assert_eq!(r["stdout"], "v2\n");
}

// ---------------------------------------------------------------------------
// Two-step writes (issue 9.1): everything up to `timeout`, then 2 s later
// the `acl_cap` line or an argument's `pattern` line, as `cat >` and then
// `cat >>` write them, with the default settle period.

/// The pause between the two steps, as in the report.
const STEP_PAUSE: Duration = Duration::from_secs(2);

const CAPPED_TOML: &str = r#"name = "two"
[[commands]]
name = "run"
exec_parts = ["/bin/echo", "final"]
timeout = "10s"
"#;
const CAP_LINE: &str = "acl_cap = \"example.com/cap/x\"\n";

const PATTERNED_TOML: &str = r#"name = "two"
[[commands]]
name = "run"
exec_parts = ["/bin/echo", "final", "{{.x}}"]
timeout = "10s"
[[commands.args]]
name = "x"
"#;
const PATTERN_LINE: &str = "pattern = '^[a-z]+$'\n";

fn eve() -> Identity {
    user("eve@example.com", &[])
}

/// Writes `first` to `path` in place (created or truncated), and
/// `second` appended `STEP_PAUSE` later, on a thread of its own; the
/// returned receiver yields once both are written.
fn write_in_two_steps(
    path: std::path::PathBuf,
    first: &'static str,
    second: &'static str,
) -> std::sync::mpsc::Receiver<()> {
    let (done, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        std::fs::write(&path, first).unwrap();
        std::thread::sleep(STEP_PAUSE);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(second.as_bytes()).unwrap();
        drop(f);
        done.send(()).unwrap();
    });
    rx
}

/// A stack whose registry watches its directory, holding `two.toml` =
/// `initial` if given.
fn watched_stack(initial: Option<&str>) -> (Stack, WatchGuard) {
    let tools: Vec<(&str, &str)> = initial.map(|t| ("two.toml", t)).into_iter().collect();
    let d = Stack::new(&tools, settings());
    let watch = d.registry.spawn_watcher().unwrap();
    (d, watch)
}

/// Probes `d` every 10 ms while the two-step write runs and until the
/// final definition is served (`served`), checking `never` each time; the
/// number of probes.
async fn probe_through_the_window(
    d: &Stack,
    steps: std::sync::mpsc::Receiver<()>,
    mut never: impl AsyncFnMut(&Stack) -> Result<(), String>,
    mut served: impl AsyncFnMut(&Stack) -> bool,
) -> usize {
    let mut probes = 0;
    let mut written = false;
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        if let Err(broken) = never(d).await {
            panic!("after {probes} probes (both steps written: {written}): {broken}");
        }
        probes += 1;
        written = written || steps.try_recv().is_ok();
        if written && served(d).await {
            return probes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the final definition was never served"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Neither eve (no capability) may run it, nor may the registry hold it
/// without the capability.
async fn never_without_the_cap(d: &Stack) -> Result<(), String> {
    if let Some(e) = d.registry.lookup("two", "run")
        && e.command.acl_cap.as_deref() != Some("example.com/cap/x")
    {
        return Err(format!("served without its capability: {:?}", e.command));
    }
    let (status, body, _) = d.request(&eve(), "POST", "/exec/two/run", "").await;
    match status {
        StatusCode::NOT_FOUND | StatusCode::FORBIDDEN => Ok(()),
        other => Err(format!("eve, without the capability, got {other}: {body}")),
    }
}

/// A value the final pattern refuses is never accepted.
async fn never_without_the_pattern(d: &Stack) -> Result<(), String> {
    let (status, body, _) = d
        .request(&alice(), "POST", "/exec/two/run", r#"{"x": "NOT/lower"}"#)
        .await;
    match status {
        StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => Ok(()),
        other => Err(format!("a value the pattern refuses got {other}: {body}")),
    }
}

/// Whether alice runs the final definition, with `body`.
async fn final_is_served(d: &Stack, body: &str) -> bool {
    let entry = d.registry.lookup("two", "run");
    if entry.is_none_or(|e| e.command.exec_parts[1] != "final") {
        return false;
    }
    let (s, r, _) = d
        .request(&alice(), "POST", "/exec/two/run?wait=30s", body)
        .await;
    s == StatusCode::OK && r["stdout"].as_str().is_some_and(|o| o.starts_with("final"))
}

#[tokio::test]
async fn a_new_file_whose_cap_comes_second_never_runs_without_it() {
    let (d, _watch) = watched_stack(None);
    let steps = write_in_two_steps(d.dir.path().join("two.toml"), CAPPED_TOML, CAP_LINE);
    let probes = probe_through_the_window(&d, steps, never_without_the_cap, async |d| {
        final_is_served(d, "").await
    })
    .await;
    assert!(probes > 10, "only {probes} probes through the window");
    let (s, _, _) = d.request(&eve(), "POST", "/exec/two/run", "").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

/// The edited file's previous definition stays in force through the edit.
fn still_served(d: &Stack) -> Result<(), String> {
    match d.registry.lookup("two", "run") {
        Some(_) => Ok(()),
        None => Err("the previous definition was withdrawn".into()),
    }
}

/// A stack holding `before` as `two.toml`, loaded long enough ago that an
/// in-place write cannot be taken for one its load caught half done.
async fn stack_loaded_a_while_ago(before: &str) -> (Stack, WatchGuard) {
    let stack = watched_stack(Some(before));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stack
}

#[tokio::test]
async fn a_file_edited_in_place_keeps_its_cap_through_the_edit() {
    let before = CAPPED_TOML.replace("final", "before") + CAP_LINE;
    let (d, _watch) = stack_loaded_a_while_ago(&before).await;
    let steps = write_in_two_steps(d.dir.path().join("two.toml"), CAPPED_TOML, CAP_LINE);
    let never = async |d: &Stack| {
        still_served(d)?;
        never_without_the_cap(d).await
    };
    probe_through_the_window(&d, steps, never, async |d| final_is_served(d, "").await).await;
}

#[tokio::test]
async fn a_new_file_whose_pattern_comes_second_never_accepts_what_it_refuses() {
    let (d, _watch) = watched_stack(None);
    let steps = write_in_two_steps(d.dir.path().join("two.toml"), PATTERNED_TOML, PATTERN_LINE);
    probe_through_the_window(&d, steps, never_without_the_pattern, async |d| {
        final_is_served(d, r#"{"x": "ok"}"#).await
    })
    .await;
    assert_eq!(never_without_the_pattern(&d).await, Ok(()));
}

#[tokio::test]
async fn a_file_edited_in_place_keeps_its_pattern_through_the_edit() {
    let before = PATTERNED_TOML.replace("final", "before") + PATTERN_LINE;
    let (d, _watch) = stack_loaded_a_while_ago(&before).await;
    let steps = write_in_two_steps(d.dir.path().join("two.toml"), PATTERNED_TOML, PATTERN_LINE);
    let never = async |d: &Stack| {
        still_served(d)?;
        never_without_the_pattern(d).await
    };
    probe_through_the_window(&d, steps, never, async |d| {
        final_is_served(d, r#"{"x": "ok"}"#).await
    })
    .await;
}
