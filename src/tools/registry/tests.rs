//! Tests of the registry: reload reports, the rules of [`DirState`] driven
//! step by step, event classification, and the watcher's pacing.

use std::path::Path;

use notify::event::{
    AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RemoveKind, RenameMode,
};

use super::state::CAUGHT_MID_WRITE;
use super::*;
use crate::tools::load_dir;

fn tool_json(name: &str, cmds: &[(&str, &str)]) -> String {
    let commands: Vec<String> = cmds
        .iter()
        .map(|(n, prog)| format!(r#"{{"name": "{n}", "exec_parts": ["{prog}"]}}"#))
        .collect();
    format!(
        r#"{{"name": "{name}", "commands": [{}]}}"#,
        commands.join(",")
    )
}

fn write(dir: &Path, name: &str, cmds: &[(&str, &str)]) {
    std::fs::write(dir.join(format!("{name}.json")), tool_json(name, cmds)).unwrap();
}

/// Each tool with its commands' programs, to compare indexes.
fn summary<'a>(tools: impl Iterator<Item = &'a Tool>) -> Vec<(String, Vec<(String, String)>)> {
    tools
        .map(|t| {
            let commands = t
                .commands
                .iter()
                .map(|c| (c.name.clone(), c.exec_parts[0].clone()))
                .collect();
            (t.name.clone(), commands)
        })
        .collect()
}

#[test]
fn reload_reports_added_removed_and_changed() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &[("one", "true"), ("two", "true")]);
    let registry = Registry::load(dir.path(), ToolLimits::default());
    assert_eq!(registry.counts(), (1, 2));
    let old = registry.lookup("a", "one").unwrap();
    write(dir.path(), "a", &[("one", "false"), ("three", "true")]);
    let report = registry.reload();
    assert_eq!(report.added, ["a/three"]);
    assert_eq!(report.removed, ["a/two"]);
    assert_eq!(report.changed, ["a/one"]);
    assert_eq!(
        old.command.exec_parts,
        ["true"],
        "a held command never changes"
    );
    assert_eq!(
        registry.lookup("a", "one").unwrap().command.exec_parts,
        ["false"]
    );
    assert!(registry.lookup("a", "two").is_none());
    assert!(registry.reload().is_empty(), "nothing changed since");
}

// ---------------------------------------------------------------------------
// The rules, step by step (no watcher: each change applied by hand)

const SETTLE: Duration = Duration::from_secs(3600);

fn state_of(dir: &Path) -> DirState {
    DirState::load(dir, ToolLimits::default(), SETTLE)
}

fn program(state: &mut DirState, tool: &str) -> Option<String> {
    let entry = state.index().lookup(tool, "c")?;
    Some(entry.command.exec_parts[0].clone())
}

/// As if the settle period were over.
fn later() -> Instant {
    Instant::now() + SETTLE + Duration::from_secs(1)
}

#[test]
fn a_file_written_in_place_keeps_its_previous_definition_until_it_settles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.json");
    write(dir.path(), "a", &[("c", "v1")]);
    let mut state = state_of(dir.path());
    let loaded_at = Instant::now();
    // Long enough after the load that the load cannot hold this write.
    let at = loaded_at + CAUGHT_MID_WRITE;

    std::fs::write(&path, r#"{"name": "a", "commands": [{"name": "c", "#).unwrap();
    state.apply(Change::Written(path.clone(), at));
    state.note_written();
    state.settle_due(Instant::now());
    assert_eq!(program(&mut state, "a").as_deref(), Some("v1"));
    assert!(
        state.index().problems().is_empty(),
        "a prefix is no problem yet"
    );

    write(dir.path(), "a", &[("c", "v2")]);
    state.apply(Change::Written(path.clone(), at));
    state.note_written();
    state.settle_due(Instant::now());
    assert_eq!(program(&mut state, "a").as_deref(), Some("v1"));
    state.settle_due(later());
    assert_eq!(program(&mut state, "a").as_deref(), Some("v2"));
    assert_eq!(state.waiting(), 0);
}

#[test]
fn a_new_file_written_in_place_is_not_served_until_it_settles() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = state_of(dir.path());
    write(dir.path(), "n", &[("c", "v1")]);
    let path = dir.path().join("n.json");
    state.apply(Change::Written(path, Instant::now()));
    state.note_written();
    assert_eq!(program(&mut state, "n"), None);
    state.settle_due(later());
    assert_eq!(program(&mut state, "n").as_deref(), Some("v1"));
}

#[test]
fn a_file_that_changed_after_its_last_event_waits_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n.json");
    std::fs::write(&path, "{").unwrap();
    let mut state = state_of(dir.path());
    state.apply(Change::Written(path.clone(), Instant::now()));
    state.note_written();
    // Written again without an event reaching the registry (an mmap
    // write, a lost event): the size differs when it is due.
    write(dir.path(), "n", &[("c", "v1")]);
    state.settle_due(later());
    assert_eq!(program(&mut state, "n"), None, "changed since its event");
    assert_eq!(state.waiting(), 1);
    state.settle_due(later() + SETTLE);
    assert_eq!(program(&mut state, "n").as_deref(), Some("v1"));
}

#[test]
fn a_write_right_after_a_load_brings_the_definition_before_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.json");
    write(dir.path(), "a", &[("c", "v1")]);
    let mut state = state_of(dir.path());
    // v2 renamed into place and loaded...
    let tmp = dir.path().join(".a.json.tmp");
    std::fs::write(&tmp, tool_json("a", &[("c", "v2")])).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    state.apply(Change::Replaced(path.clone()));
    assert_eq!(program(&mut state, "a").as_deref(), Some("v2"));
    // ...then written in place at once: the read may have caught part of
    // that write, so v1 (whole) is served until the file settles.
    write(dir.path(), "a", &[("c", "v3")]);
    state.apply(Change::Written(path.clone(), Instant::now()));
    // One write is many events; v1 was read before all of them.
    state.apply(Change::Written(path.clone(), Instant::now()));
    state.note_written();
    assert_eq!(program(&mut state, "a").as_deref(), Some("v1"));
    state.settle_due(later());
    assert_eq!(program(&mut state, "a").as_deref(), Some("v3"));

    // A file with nothing before it is withdrawn instead.
    let new = dir.path().join("n.json");
    std::fs::write(&tmp, tool_json("n", &[("c", "v1")])).unwrap();
    std::fs::rename(&tmp, &new).unwrap();
    state.apply(Change::Replaced(new.clone()));
    assert_eq!(program(&mut state, "n").as_deref(), Some("v1"));
    state.apply(Change::Written(new, Instant::now()));
    assert_eq!(program(&mut state, "n"), None);
}

#[test]
fn deletions_and_renames_act_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.json");
    write(dir.path(), "a", &[("c", "v1")]);
    let mut state = state_of(dir.path());
    // Waiting to settle, then deleted: gone at once, and not loaded later.
    write(dir.path(), "a", &[("c", "v2")]);
    state.apply(Change::Written(path.clone(), Instant::now()));
    std::fs::remove_file(&path).unwrap();
    state.apply(Change::Gone(path.clone()));
    assert_eq!(program(&mut state, "a"), None);
    assert_eq!(state.waiting(), 0);
    // A rename into place replaces a file waiting to settle.
    std::fs::write(&path, "{").unwrap();
    state.apply(Change::Written(path.clone(), Instant::now()));
    let tmp = dir.path().join("a.tmp");
    std::fs::write(&tmp, tool_json("a", &[("c", "v3")])).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    state.apply(Change::Replaced(path));
    assert_eq!(program(&mut state, "a").as_deref(), Some("v3"));
    assert_eq!(state.waiting(), 0);
}

#[test]
fn rescans_load_what_was_swapped_and_keep_what_did_not_change() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..v1")).unwrap();
    std::fs::write(d.join("..v1/a.json"), tool_json("a", &[("c", "v1")])).unwrap();
    std::fs::write(d.join("..v1/same.json"), tool_json("same", &[("c", "s")])).unwrap();
    symlink("..v1", d.join("..data")).unwrap();
    symlink("..data/a.json", d.join("a.json")).unwrap();
    symlink("..data/same.json", d.join("same.json")).unwrap();
    write(d, "plain", &[("c", "p1")]);
    let mut state = state_of(d);
    let plain = state.index().lookup("plain", "c").unwrap().tool;
    let same = state.index().lookup("same", "c").unwrap().tool;

    // An uncertain rescan (a directory appeared, events lost) lets a
    // changed file settle; the atomic one that follows (the `..data`
    // rename) loads it at once.
    std::fs::create_dir(d.join("..v2")).unwrap();
    std::fs::write(d.join("..v2/a.json"), tool_json("a", &[("c", "v2")])).unwrap();
    std::fs::write(d.join("..v2/same.json"), tool_json("same", &[("c", "s")])).unwrap();
    symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    // Entries no tool file links through change nothing.
    state.apply(Change::Entry("..v2".into(), Rescan::Atomic));
    state.apply(Change::Entry("..data_tmp".into(), Rescan::Atomic));
    assert_eq!(program(&mut state, "a").as_deref(), Some("v1"));
    state.rescan(Rescan::Uncertain);
    assert_eq!(program(&mut state, "a").as_deref(), Some("v1"));
    state.apply(Change::Entry("..data".into(), Rescan::Atomic));
    assert_eq!(program(&mut state, "a").as_deref(), Some("v2"));
    // The unchanged file was not read again: the same tool, not a copy;
    // nor was the key whose bytes stayed the same parsed again.
    let again = state.index().lookup("plain", "c").unwrap().tool;
    assert!(Arc::ptr_eq(&plain, &again));
    let again = state.index().lookup("same", "c").unwrap().tool;
    assert!(Arc::ptr_eq(&same, &again));

    // A file written in place (seen by the watcher) keeps waiting through
    // an atomic rescan; a file gone goes.
    write(d, "plain", &[("c", "p2")]);
    state.apply(Change::Written(
        d.join("plain.json"),
        Instant::now() + SETTLE,
    ));
    state.note_written();
    std::fs::remove_dir_all(d.join("..v1")).unwrap();
    std::fs::remove_file(d.join("..data")).unwrap();
    state.rescan(Rescan::Atomic);
    assert_eq!(program(&mut state, "a"), None);
    assert_eq!(program(&mut state, "plain").as_deref(), Some("p1"));
    state.rescan(Rescan::Forced);
    assert_eq!(
        program(&mut state, "plain").as_deref(),
        Some("p1"),
        "SIGHUP too"
    );
    state.settle_due(later());
    assert_eq!(program(&mut state, "plain").as_deref(), Some("p2"));
}

#[test]
fn same_bytes_are_not_parsed_again_except_on_an_explicit_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.json");
    write(dir.path(), "a", &[("c", "v1")]);
    let mut state = state_of(dir.path());
    let tool = |state: &mut DirState| state.index().lookup("a", "c").unwrap().tool;
    let first = tool(&mut state);
    // The same bytes renamed into place: a new inode, the same tool.
    let tmp = dir.path().join(".a.json.tmp");
    std::fs::write(&tmp, tool_json("a", &[("c", "v1")])).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    state.apply(Change::Replaced(path));
    assert!(Arc::ptr_eq(&first, &tool(&mut state)));
    // SIGHUP validates again what depends on more than the bytes (the
    // users a tool runs as).
    state.rescan(Rescan::Forced);
    assert!(!Arc::ptr_eq(&first, &tool(&mut state)));
}

#[test]
fn a_file_rewritten_under_the_same_inode_is_not_taken_for_the_version_known() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.json");
    write(dir.path(), "a", &[("c", "v1")]);
    let mut state = state_of(dir.path());
    let inode = std::fs::metadata(&path).unwrap().ino();
    // Rewritten in place with as many bytes, and its time set apart from
    // the first (a write within the same clock tick could keep it).
    let rewrite = |program: &str, secs: u64| {
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::io::Write::write_all(&mut &file, tool_json("a", &[("c", program)]).as_bytes())
            .unwrap();
        file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap();
    };

    // Seen being written: an atomic rescan (a `..data` swap elsewhere)
    // neither loads it early nor drops it; it loads once it has settled.
    rewrite("v2", 1_000_000);
    state.apply(Change::Written(path.clone(), Instant::now() + SETTLE));
    state.note_written();
    state.rescan(Rescan::Atomic);
    assert_eq!(program(&mut state, "a").as_deref(), Some("v1"));
    state.settle_due(later());
    assert_eq!(program(&mut state, "a").as_deref(), Some("v2"));

    // Not seen (no event, as for a file behind a ConfigMap symlink): its
    // key changed, so an atomic rescan reads it again, though the inode
    // and the size are the same.
    rewrite("v3", 2_000_000);
    state.rescan(Rescan::Atomic);
    assert_eq!(program(&mut state, "a").as_deref(), Some("v3"));
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
    assert!(state.index().problems().is_empty());
}

#[test]
fn a_swap_of_many_files_keeps_every_rule() {
    use std::os::unix::fs::symlink;
    // Enough files that a rescan reads them on several threads.
    const MANY: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let generation = |k: usize, program: &str| {
        let data = d.join(format!("..{k}"));
        std::fs::create_dir(&data).unwrap();
        for t in 0..MANY {
            let text = tool_json(&format!("t{t:03}"), &[("c", "same")]);
            std::fs::write(data.join(format!("t{t:03}.json")), text).unwrap();
        }
        std::fs::write(data.join("live.json"), tool_json("live", &[("c", program)])).unwrap();
        std::fs::write(data.join("bad.json"), "{").unwrap();
        symlink(format!("..{k}"), d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    };
    generation(1, "v1");
    for t in 0..MANY {
        symlink(
            format!("..data/t{t:03}.json"),
            d.join(format!("t{t:03}.json")),
        )
        .unwrap();
    }
    symlink("..data/live.json", d.join("live.json")).unwrap();
    symlink("..data/bad.json", d.join("bad.json")).unwrap();
    write(d, "plain", &[("c", "p1")]);
    let mut state = state_of(d);
    let index = state.index();
    assert_eq!(index.counts().0, MANY + 2);
    assert_eq!(index.problems().len(), 1, "{:?}", index.problems());
    let unchanged = index.lookup("t100", "c").unwrap().tool;

    // A plain file seen being written in place, then the swap.
    write(d, "plain", &[("c", "p2")]);
    state.apply(Change::Written(
        d.join("plain.json"),
        Instant::now() + SETTLE,
    ));
    state.note_written();
    generation(2, "v2");
    state.apply(Change::Entry("..data".into(), Rescan::Atomic));
    let index = state.index();
    assert_eq!(program(&mut state, "live").as_deref(), Some("v2"));
    assert_eq!(program(&mut state, "plain").as_deref(), Some("p1"));
    assert_eq!(index.counts().0, MANY + 2);
    let [problem] = index.problems() else {
        panic!("{:?}", index.problems())
    };
    assert!(problem.file.ends_with("bad.json"), "{problem}");
    // Read again (a new inode), not parsed again (the same bytes).
    let again = index.lookup("t100", "c").unwrap().tool;
    assert!(Arc::ptr_eq(&unchanged, &again));
    // SIGHUP parses every file, and still leaves the written one waiting.
    state.rescan(Rescan::Forced);
    let again = state.index().lookup("t100", "c").unwrap().tool;
    assert!(!Arc::ptr_eq(&unchanged, &again));
    assert_eq!(program(&mut state, "plain").as_deref(), Some("p1"));
    state.settle_due(later());
    assert_eq!(program(&mut state, "plain").as_deref(), Some("p2"));
}

#[test]
fn a_huge_file_is_a_problem_and_the_others_load() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &[("c", "v1")]);
    let big = std::fs::File::create(dir.path().join("big.json")).unwrap();
    big.set_len(2 << 20).unwrap();
    let mut state = state_of(dir.path());
    let index = state.index();
    assert!(index.lookup("a", "c").is_some());
    let [problem] = index.problems() else {
        panic!("{:?}", index.problems())
    };
    assert!(problem.file.ends_with("big.json"));
    assert!(
        problem
            .message
            .starts_with("2097152 bytes (2.0 MiB), over the limit"),
        "{problem}"
    );
}

// ---------------------------------------------------------------------------
// Events

fn event(kind: EventKind, path: &Path) -> notify::Result<notify::Event> {
    Ok(notify::Event::new(kind).add_path(path.to_path_buf()))
}

#[test]
fn events_are_classified_by_what_they_mean_for_the_files() {
    use std::os::unix::fs::symlink;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("tools");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("a.json");
    std::fs::write(&file, "{}").unwrap();
    symlink("a.json", dir.join("l.json")).unwrap();
    let at = Instant::now();
    let of = |kind, path: &Path| classify(&dir, &event(kind, path), at);
    let rename = |mode| EventKind::Modify(ModifyKind::Name(mode));
    let write = EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any));
    let created = EventKind::Create(CreateKind::File);

    assert_eq!(
        of(rename(RenameMode::To), &file),
        [Change::Replaced(file.clone())]
    );
    assert_eq!(
        of(created, &dir.join("l.json")),
        [Change::Replaced(dir.join("l.json"))]
    );
    assert_eq!(of(created, &file), [Change::Written(file.clone(), at)]);
    assert_eq!(of(write, &file), [Change::Written(file.clone(), at)]);
    let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
    assert_eq!(of(closed, &file), [Change::Written(file.clone(), at)]);
    assert_eq!(
        of(EventKind::Remove(RemoveKind::File), &file),
        [Change::Gone(file.clone())]
    );
    assert_eq!(
        of(rename(RenameMode::From), &file),
        [Change::Gone(file.clone())]
    );

    // Reads, the other half of a rename and files beside the directory
    // mean nothing.
    let read = EventKind::Access(AccessKind::Close(AccessMode::Read));
    let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
    assert!(of(read, &file).is_empty());
    assert!(of(open, &file).is_empty());
    assert!(of(rename(RenameMode::Both), &file).is_empty());
    assert!(of(write, &parent.path().join("audit.jsonl")).is_empty());

    // Other entries of the directory, named: they matter if tool files
    // link through them.
    let entry = |name: &str, kind| [Change::Entry(name.into(), kind)];
    let swp = dir.join(".a.json.swp");
    assert_eq!(of(write, &swp), entry(".a.json.swp", Rescan::Uncertain));
    let tmp = dir.join("a.json.tmp");
    assert_eq!(of(write, &tmp), entry("a.json.tmp", Rescan::Uncertain));
    let data = dir.join("..data");
    assert_eq!(
        of(rename(RenameMode::To), &data),
        entry("..data", Rescan::Atomic)
    );
    let data_tmp = dir.join("..data_tmp");
    let renamed_away = of(rename(RenameMode::From), &data_tmp);
    assert_eq!(renamed_away, entry("..data_tmp", Rescan::Atomic));
    let generation = dir.join("..2026_01_01");
    std::fs::create_dir(&generation).unwrap();
    let folder = EventKind::Create(CreateKind::Folder);
    assert_eq!(
        of(folder, &generation),
        entry("..2026_01_01", Rescan::Uncertain)
    );

    // The directory, the path to it, `..` entries beside it, lost events:
    // rescans.
    let atomic = [Change::Rescan(Rescan::Atomic)];
    let uncertain = [Change::Rescan(Rescan::Uncertain)];
    let beside = parent.path().join("..data");
    assert_eq!(of(rename(RenameMode::To), &beside), atomic);
    assert_eq!(of(folder, &dir), uncertain);
    assert_eq!(of(rename(RenameMode::To), &dir), atomic);
    assert_eq!(
        of(EventKind::Remove(RemoveKind::Folder), parent.path()),
        uncertain
    );
    let lost = Ok(notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan));
    assert_eq!(classify(&dir, &lost, at), uncertain);
}

// ---------------------------------------------------------------------------
// The watcher

/// Polls `condition` every 10 ms for up to 20 s (a hang guard).
fn wait_for(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_watcher_rebuilds_for_the_directory_only_and_boundedly_per_burst() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("tools");
    std::fs::create_dir(&dir).unwrap();
    write(&dir, "a", &[("one", "true")]);
    let settle = Duration::from_secs(1);
    let registry = Arc::new(Registry::load(&dir, ToolLimits::default()).with_settle(settle));
    let _watch = registry.spawn_watcher().unwrap();
    let quiet = Duration::from_millis(500);

    // Idle: nothing to rebuild. A reload reads every file; those reads
    // set off no rebuild of the watcher's.
    std::thread::sleep(quiet);
    assert_eq!(registry.rebuilds(), 0, "rebuilt with nothing changed");
    registry.reload();
    std::thread::sleep(quiet);
    assert_eq!(registry.rebuilds(), 1, "a reload's reads set off a rebuild");

    // Files beside the directory (an audit log, a state dir) are not its
    // business.
    for i in 0..20 {
        std::fs::write(parent.path().join(format!("audit-{i}.jsonl")), "x").unwrap();
    }
    std::thread::sleep(quiet);
    assert_eq!(
        registry.rebuilds(),
        1,
        "rebuilt for files beside the directory"
    );

    // A burst of 20 in-place writes: one rebuild, once the file settled.
    for i in 0..20 {
        write(&dir, "b", &[(&format!("c{i}"), "true")]);
    }
    wait_for("the in-place burst to land", || {
        registry.lookup("b", "c19").is_some()
    });
    std::thread::sleep(settle * 2);
    let burst = registry.rebuilds() - 1;
    assert_eq!(
        burst, 1,
        "{burst} rebuilds for one burst of 20 in-place writes"
    );

    // A burst of 20 rename-saves: the first at once, the rest coalesced,
    // at most one rebuild per coalescing period (plus the leading one and
    // one that may straddle the end).
    let before = registry.rebuilds();
    let started = Instant::now();
    for i in 0..20 {
        let tmp = dir.join(".b.json.tmp");
        std::fs::write(&tmp, tool_json("b", &[(&format!("r{i}"), "true")])).unwrap();
        std::fs::rename(&tmp, dir.join("b.json")).unwrap();
    }
    let span = started.elapsed();
    wait_for("the rename burst to land", || {
        registry.lookup("b", "r19").is_some()
    });
    std::thread::sleep(quiet);
    let burst = registry.rebuilds() - before;
    let bound = 3 + (span.as_millis() / COALESCE.as_millis()) as u64;
    assert!(
        (1..=bound).contains(&burst),
        "{burst} rebuilds for one burst of 20 rename-saves in {span:?}"
    );
}

#[test]
fn concurrent_reloads_never_store_an_older_scan() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &[("old", "true")]);
    write(dir.path(), "b", &[("c", "true")]);
    let registry = Arc::new(Registry::load(dir.path(), ToolLimits::default()));

    // Reload A (say SIGHUP) scans the directory, then pauses before
    // storing what it read.
    let (scanned_tx, scanned) = mpsc::channel();
    let (resume, resume_rx) = mpsc::channel::<()>();
    let a = std::thread::spawn({
        let registry = Arc::clone(&registry);
        move || {
            registry.reload_with(
                || {},
                || {
                    scanned_tx.send(()).unwrap();
                    let _ = resume_rx.recv();
                },
            )
        }
    });
    scanned.recv().unwrap();

    // The directory changes and reload B (the watcher) runs meanwhile.
    write(dir.path(), "a", &[("new", "true")]);
    std::fs::remove_file(dir.path().join("b.json")).unwrap();
    let (waiting_tx, waiting) = mpsc::channel::<()>();
    let b = std::thread::spawn({
        let registry = Arc::clone(&registry);
        move || registry.reload_with(move || waiting_tx.send(()).unwrap(), || {})
    });
    // Serialized, B says it waits for A's lock; unserialized, B stores
    // its scan and returns without a word (its sender is dropped).
    // Either way A resumes only after that.
    let _ = waiting.recv();
    resume.send(()).unwrap();
    a.join().unwrap();
    b.join().unwrap();

    let index = registry.snapshot();
    let expected = load_dir(dir.path(), &ToolLimits::default());
    assert_eq!(
        summary(index.tools().map(|t| &**t)),
        summary(expected.tools.iter()),
        "the stored index must be the latest scan's"
    );
    assert!(index.lookup("a", "new").is_some());
    assert!(index.lookup("a", "old").is_none());
    assert!(index.lookup("b", "c").is_none());
}

#[test]
fn commands_without_cap_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("t.json"),
        r#"{"name": "t", "commands": [{"name": "open", "exec_parts": ["true"]},
            {"name": "closed", "acl_cap": "example.com/cap/x", "exec_parts": ["true"]}]}"#,
    )
    .unwrap();
    let registry = Registry::load(dir.path(), ToolLimits::default());
    assert_eq!(
        registry.commands_without_cap(),
        [("t".to_string(), "open".to_string())]
    );
}

#[test]
fn a_missing_directory_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::load(dir.path().join("nope"), ToolLimits::default());
    assert_eq!(registry.counts(), (0, 0));
    assert!(registry.problems().is_empty());
}
