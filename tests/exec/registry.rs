//! The registry, live: reloads from a real directory.

use super::*;

const V1: &str =
    r#"{"name": "live", "commands": [{"name": "say", "exec_parts": ["/bin/echo", "v1"]}]}"#;
const V2: &str =
    r#"{"name": "live", "commands": [{"name": "say", "exec_parts": ["/bin/echo", "v2"]}]}"#;

fn says(registry: &Registry, word: &str) -> bool {
    registry
        .lookup("live", "say")
        .is_some_and(|e| e.command.exec_parts[1] == word)
}

#[tokio::test]
async fn a_directory_created_later_is_loaded() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("tools");
    let registry = Arc::new(Registry::load(&dir, ToolLimits::default()));
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
    let registry = Arc::new(Registry::load(dir.path(), ToolLimits::default()));
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
async fn a_configmap_data_symlink_swap_reloads() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..2024_01_01_00_00_00.1")).unwrap();
    std::fs::write(d.join("..2024_01_01_00_00_00.1/live.json"), V1).unwrap();
    symlink("..2024_01_01_00_00_00.1", d.join("..data")).unwrap();
    symlink("..data/live.json", d.join("live.json")).unwrap();
    let registry = Arc::new(Registry::load(d, ToolLimits::default()));
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
