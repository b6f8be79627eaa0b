//! The live tool registry: loads the tools directory into an immutable
//! index, swaps it atomically (readers see the old or the new index, never a
//! mix), and rebuilds it after any change in the directory — edits, editor
//! rename-saves, deletions, a Kubernetes ConfigMap `..data` symlink swap, or
//! the directory itself appearing later. A job holds the `Arc<Command>` it
//! started with, so reloads never change a running job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, TryLockError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use thiserror::Error;

use super::ToolLimits;
use super::file::{LoadedDir, Problem, load_dir};
use super::model::{Command, Tool};

/// How long the watcher gathers events before it rebuilds, so that one save
/// (often several events) is one rebuild, well within SPEC's 200 ms.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Registry errors.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// The file watcher could not be set up.
    #[error("cannot watch {dir}: {source}")]
    Watch {
        /// The tools directory.
        dir: PathBuf,
        /// What notify said.
        source: notify::Error,
    },
}

/// A tool and one of its commands, as a lookup returns them.
#[derive(Debug, Clone)]
pub struct ExecEntry {
    /// The tool.
    pub tool: Arc<Tool>,
    /// The command.
    pub command: Arc<Command>,
}

/// One immutable generation of the registry.
#[derive(Debug, Default)]
pub struct Index {
    tools: BTreeMap<String, Arc<Tool>>,
    problems: Vec<Problem>,
}

impl Index {
    fn from_loaded(loaded: LoadedDir) -> Self {
        Index {
            tools: loaded
                .tools
                .into_iter()
                .map(|t| (t.name.clone(), Arc::new(t)))
                .collect(),
            problems: loaded.problems,
        }
    }

    /// The command `cmd` of tool `tool`.
    pub fn lookup(&self, tool: &str, cmd: &str) -> Option<ExecEntry> {
        let tool = self.tools.get(tool)?;
        let command = tool.command(cmd)?.clone();
        Some(ExecEntry {
            tool: tool.clone(),
            command,
        })
    }

    /// All tools, by name.
    pub fn tools(&self) -> impl Iterator<Item = &Arc<Tool>> {
        self.tools.values()
    }

    /// Problems found while loading this generation.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// Number of tools and of commands.
    pub fn counts(&self) -> (usize, usize) {
        let commands = self.tools.values().map(|t| t.commands.len()).sum();
        (self.tools.len(), commands)
    }

    fn commands(&self) -> BTreeMap<(String, String), &Arc<Command>> {
        self.tools
            .values()
            .flat_map(|t| {
                t.commands
                    .iter()
                    .map(|c| ((t.name.clone(), c.name.clone()), c))
            })
            .collect()
    }
}

/// What a rebuild changed, as `tool/command` names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Commands that are new.
    pub added: Vec<String>,
    /// Commands that are gone.
    pub removed: Vec<String>,
    /// Commands whose definition changed.
    pub changed: Vec<String>,
}

impl ReloadReport {
    /// Whether the rebuild changed no command.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The live registry of one tools directory.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    limits: ToolLimits,
    index: ArcSwap<Index>,
    /// Held across a whole reload (scan, compare, swap), so that reloads
    /// from SIGHUP and from the watcher thread never store an older scan
    /// over a newer one. Readers never take it.
    reloading: Mutex<()>,
    /// Rebuilds since the first load.
    rebuilds: AtomicU64,
}

impl Registry {
    /// Loads `dir` (a missing directory is an empty registry that fills up
    /// once the directory appears and [`Registry::spawn_watcher`] runs).
    /// Problems are logged and kept in the index.
    pub fn load(dir: impl Into<PathBuf>, limits: ToolLimits) -> Self {
        let dir = dir.into();
        let index = Index::from_loaded(load_dir(&dir, &limits));
        if !dir.exists() {
            tracing::warn!(dir = %dir.display(), "the tools directory does not exist (yet)");
        }
        log_problems(&index);
        let (tools, commands) = index.counts();
        tracing::info!(dir = %dir.display(), tools, commands, "tool registry loaded");
        Registry {
            dir,
            limits,
            index: ArcSwap::from_pointee(index),
            reloading: Mutex::new(()),
            rebuilds: AtomicU64::new(0),
        }
    }

    /// How many times the index was rebuilt since the first load.
    pub fn rebuilds(&self) -> u64 {
        self.rebuilds.load(Ordering::Relaxed)
    }

    /// The current index; it never changes (a reload makes a new one).
    pub fn snapshot(&self) -> Arc<Index> {
        self.index.load_full()
    }

    /// The command `cmd` of tool `tool` in the current index.
    pub fn lookup(&self, tool: &str, cmd: &str) -> Option<ExecEntry> {
        self.index.load().lookup(tool, cmd)
    }

    /// Number of tools and of commands, for the daemon's "up" line.
    pub fn counts(&self) -> (usize, usize) {
        self.index.load().counts()
    }

    /// `(tool, command)` of every command without `acl_cap`, which any peer
    /// may run unless `require_cap` is set.
    pub fn commands_without_cap(&self) -> Vec<(String, String)> {
        self.index
            .load()
            .tools()
            .flat_map(|t| {
                t.commands
                    .iter()
                    .filter(|c| c.acl_cap.is_none())
                    .map(|c| (t.name.clone(), c.name.clone()))
            })
            .collect()
    }

    /// Problems of the current index.
    pub fn problems(&self) -> Vec<Problem> {
        self.index.load().problems().to_vec()
    }

    /// Re-reads the directory, swaps the index and logs what changed.
    /// Reloads are serialized: one that starts while another runs waits for
    /// it, so the stored index is always from the latest scan.
    pub fn reload(&self) -> ReloadReport {
        self.reload_with(|| {}, || {})
    }

    /// [`Registry::reload`], calling `waiting` if another reload holds the
    /// lock (just before waiting for it), and `after_scan` between the scan
    /// and the swap: where tests observe and pause reloads.
    fn reload_with(&self, waiting: impl FnOnce(), after_scan: impl FnOnce()) -> ReloadReport {
        // `()` cannot be left inconsistent by a panic, so a poisoned lock
        // is still usable.
        let _reloading = match self.reloading.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                waiting();
                self.reloading
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
            }
        };
        let new = Index::from_loaded(load_dir(&self.dir, &self.limits));
        self.rebuilds.fetch_add(1, Ordering::Relaxed);
        after_scan();
        let old = self.index.load();
        let (before, after) = (old.commands(), new.commands());
        let name = |(t, c): &(String, String)| format!("{t}/{c}");
        let mut report = ReloadReport::default();
        for (key, command) in &after {
            match before.get(key) {
                None => report.added.push(name(key)),
                Some(previous) if previous != command => report.changed.push(name(key)),
                Some(_) => {}
            }
        }
        report.removed = before
            .keys()
            .filter(|k| !after.contains_key(*k))
            .map(name)
            .collect();
        drop(old);
        log_problems(&new);
        let (tools, commands) = new.counts();
        self.index.store(Arc::new(new));
        if report.is_empty() {
            tracing::debug!(tools, commands, "tool registry rebuilt, no command changed");
        } else {
            tracing::info!(
                tools, commands, added = ?report.added, removed = ?report.removed,
                changed = ?report.changed, "tool registry rebuilt"
            );
        }
        report
    }

    /// Starts watching the directory: any change rebuilds the index about
    /// 100 ms later. Watching the parent (or the nearest existing ancestor)
    /// as well catches the directory appearing, disappearing or being
    /// replaced. Stops when the guard is dropped.
    ///
    /// # Errors
    ///
    /// When the OS watcher cannot be created.
    pub fn spawn_watcher(self: &Arc<Self>) -> Result<WatchGuard, RegistryError> {
        let watch_error = |source| RegistryError::Watch {
            dir: self.dir.clone(),
            source,
        };
        let (tx, rx) = mpsc::channel::<WatchMessage>();
        let events = tx.clone();
        let dir = self.dir.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Errors (such as a queue overflow) rebuild too.
                if event.is_err() || event.is_ok_and(|e| concerns(&dir, &e)) {
                    let _ = events.send(WatchMessage::Changed);
                }
            })
            .map_err(watch_error)?;
        let mut watched_ancestor = None;
        update_watches(&mut watcher, &self.dir, &mut watched_ancestor);
        // Anything that changed between the initial load and the first watch.
        let _ = tx.send(WatchMessage::Changed);
        let registry = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("tailkitd-tools-watch".into())
            .spawn(move || {
                while let Ok(WatchMessage::Changed) = rx.recv() {
                    let deadline = Instant::now() + DEBOUNCE;
                    loop {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match rx.recv_timeout(left) {
                            Ok(WatchMessage::Changed) => {}
                            Err(mpsc::RecvTimeoutError::Timeout) => break,
                            Ok(WatchMessage::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                                return;
                            }
                        }
                    }
                    update_watches(&mut watcher, &registry.dir, &mut watched_ancestor);
                    registry.reload();
                }
            })
            .map_err(|e| watch_error(notify::Error::io(e)))?;
        Ok(WatchGuard {
            tx,
            thread: Some(thread),
        })
    }
}

enum WatchMessage {
    Changed,
    Stop,
}

/// Keeps the registry's watcher running; dropping it stops the watcher.
#[derive(Debug)]
pub struct WatchGuard {
    tx: mpsc::Sender<WatchMessage>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for WatchMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WatchMessage::Changed => "Changed",
            WatchMessage::Stop => "Stop",
        })
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let _ = self.tx.send(WatchMessage::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Watches `dir` itself when it exists, and its nearest existing ancestor
/// (normally its parent) so that the directory appearing or being replaced
/// is seen. Re-watching `dir` after every rebuild picks up a directory that
/// was created or replaced since.
fn update_watches(watcher: &mut impl Watcher, dir: &Path, watched_ancestor: &mut Option<PathBuf>) {
    let ancestor = dir
        .ancestors()
        .skip(1)
        .find(|a| a.is_dir())
        .map(Path::to_path_buf);
    if ancestor != *watched_ancestor {
        if let Some(old) = watched_ancestor.take() {
            let _ = watcher.unwatch(&old);
        }
        if let Some(new) = &ancestor {
            match watcher.watch(new, RecursiveMode::NonRecursive) {
                Ok(()) => *watched_ancestor = ancestor.clone(),
                Err(e) => tracing::warn!(dir = %new.display(), error = %e, "cannot watch"),
            }
        }
    }
    if dir.is_dir()
        && let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive)
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the tools directory");
    }
}

/// Whether `event` (from the tools directory or from the ancestor watched
/// beside it) may change what the directory holds. Not a read: opening and
/// reading files (a rebuild's own scan among them) changes nothing, and
/// would otherwise set off the next rebuild, forever. Of the rest: anything
/// inside it;
/// anything on the way to it (the directory, or a symlink to it, created,
/// replaced or removed); a name starting with `..`, as the Kubernetes
/// atomic writer uses beside a projected file (`..data`, `..2026_...`);
/// and events that name no path (a rescan). Other files beside the
/// directory are not its business.
fn concerns(dir: &Path, event: &notify::Event) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write))
    {
        return false;
    }
    event.paths.is_empty()
        || event.need_rescan()
        || event.paths.iter().any(|p| {
            p.starts_with(dir)
                || dir.starts_with(p)
                || p.file_name()
                    .is_some_and(|n| n.as_encoded_bytes().starts_with(b".."))
        })
}

fn log_problems(index: &Index) {
    for p in index.problems() {
        tracing::warn!(file = %p.file.display(), field = %p.field, "tool file rejected: {}", p.message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, cmds: &[(&str, &str)]) {
        let commands: Vec<String> = cmds
            .iter()
            .map(|(n, prog)| format!(r#"{{"name": "{n}", "exec_parts": ["{prog}"]}}"#))
            .collect();
        let text = format!(
            r#"{{"name": "{name}", "commands": [{}]}}"#,
            commands.join(",")
        );
        std::fs::write(dir.join(format!("{name}.json")), text).unwrap();
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

    /// Polls `condition` every 10 ms for up to 10 s.
    fn wait_for(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_watcher_rebuilds_for_the_directory_only_and_once_per_burst() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("tools");
        std::fs::create_dir(&dir).unwrap();
        write(&dir, "a", &[("one", "true")]);
        let registry = Arc::new(Registry::load(&dir, ToolLimits::default()));
        let _watch = registry.spawn_watcher().unwrap();
        wait_for("the first rebuild", || registry.rebuilds() >= 1);
        std::thread::sleep(DEBOUNCE * 3);
        let settled = registry.rebuilds();
        // A rebuild's own scan (it opens and reads every file) sets off no
        // other.
        std::thread::sleep(DEBOUNCE * 5);
        assert_eq!(registry.rebuilds(), settled, "rebuilt with nothing changed");

        // Files beside the directory (an audit log, a state dir) are not
        // its business.
        for i in 0..20 {
            std::fs::write(parent.path().join(format!("audit-{i}.jsonl")), "x").unwrap();
        }
        std::thread::sleep(DEBOUNCE * 5);
        assert_eq!(
            registry.rebuilds(),
            settled,
            "rebuilt for files beside the directory"
        );

        // A burst of writes in the directory: one rebuild, or a few.
        for i in 0..20 {
            write(&dir, "b", &[(&format!("c{i}"), "true")]);
        }
        wait_for("the burst to land", || {
            registry.lookup("b", "c19").is_some()
        });
        std::thread::sleep(DEBOUNCE * 3);
        let burst = registry.rebuilds() - settled;
        assert!(
            (1..10).contains(&burst),
            "{burst} rebuilds for one burst of 20 writes"
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
        let expected = Index::from_loaded(load_dir(dir.path(), &ToolLimits::default()));
        assert_eq!(
            index.commands(),
            expected.commands(),
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
}
