//! The live tool registry: loads the tools directory into an immutable
//! index, swaps it atomically (readers see the old or the new index, never a
//! mix), and rebuilds it after any change in the directory — editor
//! rename-saves, in-place edits, deletions, a Kubernetes ConfigMap `..data`
//! symlink swap, or the directory itself appearing later. A job holds the
//! `Arc<Command>` it started with, so reloads never change a running job.
//!
//! A tool file is never served in a form its author did not finish: a file
//! that arrives whole (renamed into the directory, a `..data` swap) is
//! loaded at once; a file written in place is loaded only once it has
//! settled (no event for it, and the same size and times, for the settle
//! period, [`DEFAULT_SETTLE`]), and until then its previous definition
//! stays in force (a new file is not served). A file deleted goes at once.
//! Files are read again only when their (device, inode, size, times)
//! changed. The rules are in `registry/state.rs`, the event handling and
//! pacing in `registry/watch.rs`.

mod scan;
mod state;
mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use thiserror::Error;

use self::state::{Change, DirState, Rescan};
use self::watch::{Pace, classify, touches_directory, update_watches};
use super::ToolLimits;
use super::file::Problem;
use super::model::{Command, Tool};

/// How long a file written in place must stay unchanged before it is
/// loaded (3 s): longer than the pause between the steps of a write made in
/// two (a first `cat >`, then the `acl_cap` line appended), so that such a
/// write is never served half done.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(3);

/// The shortest time between two rebuilds by the watcher (25 ms): the
/// first change after a quiet spell is served at once, the rest of a burst
/// in one trailing rebuild per period. Short enough that a change in a
/// burst is served within 30 ms too.
pub const COALESCE: Duration = Duration::from_millis(25);

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

    /// What changed from `old` to this index. Tools loaded from an
    /// unchanged file are the same `Arc` in both and are skipped.
    fn changes_since(&self, old: &Index) -> ReloadReport {
        let mut report = ReloadReport::default();
        let empty = Vec::new();
        let names: std::collections::BTreeSet<&String> =
            self.tools.keys().chain(old.tools.keys()).collect();
        for name in names {
            let (before, after) = (old.tools.get(name), self.tools.get(name));
            if let (Some(b), Some(a)) = (before, after)
                && Arc::ptr_eq(b, a)
            {
                continue;
            }
            let before = before.map_or(&empty, |t| &t.commands);
            let after = after.map_or(&empty, |t| &t.commands);
            let find =
                |list: &[Arc<Command>], cmd: &str| list.iter().find(|c| c.name == cmd).cloned();
            for command in after {
                match find(before, &command.name) {
                    None => report.added.push(format!("{name}/{}", command.name)),
                    Some(previous) if previous != *command => {
                        report.changed.push(format!("{name}/{}", command.name));
                    }
                    Some(_) => {}
                }
            }
            for command in before {
                if find(after, &command.name).is_none() {
                    report.removed.push(format!("{name}/{}", command.name));
                }
            }
        }
        report
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
    index: ArcSwap<Index>,
    /// What is known of each file. Held across a whole reload or watcher
    /// pass (scan, compare, swap), so that reloads from SIGHUP and from the
    /// watcher thread never store an older scan over a newer one. Readers
    /// never take it.
    state: Mutex<DirState>,
    /// Rebuilds since the first load.
    rebuilds: AtomicU64,
}

impl Registry {
    /// Loads `dir` (a missing directory is an empty registry that fills up
    /// once the directory appears and [`Registry::spawn_watcher`] runs).
    /// Every file there is loaded as it is: the daemon cannot know whether
    /// one is being written at that moment. Problems are logged and kept in
    /// the index. A relative `dir` is taken from the current directory.
    pub fn load(dir: impl Into<PathBuf>, limits: ToolLimits) -> Self {
        let dir = dir.into();
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let mut state = DirState::load(&dir, limits, DEFAULT_SETTLE);
        let index = state.index();
        if !dir.exists() {
            tracing::warn!(dir = %dir.display(), "the tools directory does not exist (yet)");
        }
        log_problems(&index);
        let (tools, commands) = index.counts();
        tracing::info!(dir = %dir.display(), tools, commands, "tool registry loaded");
        Registry {
            dir,
            index: ArcSwap::from_pointee(index),
            state: Mutex::new(state),
            rebuilds: AtomicU64::new(0),
        }
    }

    /// Sets how long a file written in place must stay unchanged before it
    /// is loaded (default [`DEFAULT_SETTLE`]), for writes seen from now on.
    /// Tests shorten it.
    pub fn set_settle(&self, settle: Duration) {
        self.lock().set_settle(settle);
    }

    /// [`Registry::set_settle`], for building a registry.
    #[must_use]
    pub fn with_settle(self, settle: Duration) -> Self {
        self.set_settle(settle);
        self
    }

    /// How many files written in place wait to settle.
    pub fn waiting(&self) -> usize {
        self.lock().waiting()
    }

    /// The state, also after a panic while it was held: each change to it
    /// is whole, and the index is rebuilt from it as a whole.
    fn lock(&self) -> MutexGuard<'_, DirState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// Re-reads every tool file now (SIGHUP), swaps the index and logs what
    /// changed; only files the watcher saw being written in place and not
    /// yet settled keep waiting (a SIGHUP sent for log rotation must not
    /// serve a half-written file). Reloads are serialized with each other
    /// and with the watcher, so the stored index is always from the latest
    /// scan.
    pub fn reload(&self) -> ReloadReport {
        self.reload_with(|| {}, || {})
    }

    /// [`Registry::reload`], calling `waiting` if another reload holds the
    /// lock (just before waiting for it), and `after_scan` between the scan
    /// and the swap: where tests observe and pause reloads.
    fn reload_with(&self, waiting: impl FnOnce(), after_scan: impl FnOnce()) -> ReloadReport {
        let mut state = match self.state.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                waiting();
                self.lock()
            }
        };
        state.rescan(Rescan::Forced);
        after_scan();
        self.rebuild(&mut state)
    }

    /// Builds the index from `state`, swaps it in and logs what changed.
    fn rebuild(&self, state: &mut DirState) -> ReloadReport {
        let new = state.index();
        self.rebuilds.fetch_add(1, Ordering::Relaxed);
        let report = new.changes_since(&self.index.load());
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

    /// One pass of the watcher: applies `changes`, runs a rescan if one is
    /// asked for and its pause is over, loads the files that have settled,
    /// and rebuilds the index if anything in force changed and the
    /// coalescing period since the last rebuild is over.
    fn pass(&self, changes: Vec<Change>, pace: &mut Pace) {
        let mut state = self.lock();
        for change in changes {
            match change {
                Change::Rescan(kind) => pace.rescan = pace.rescan.max(Some(kind)),
                Change::Entry(name, kind) => {
                    if state.links_through(&name) {
                        pace.rescan = pace.rescan.max(Some(kind));
                    }
                }
                change => state.apply(change),
            }
        }
        state.note_written();
        let now = Instant::now();
        if let Some(kind) = pace.rescan
            && pace.may_rescan(now)
        {
            state.rescan(kind);
            pace.rescanned(now);
        }
        state.settle_due(Instant::now());
        let now = Instant::now();
        if state.dirty() && pace.may_rebuild(now, COALESCE) {
            self.rebuild(&mut state);
            pace.rebuilt(now);
        }
    }

    /// When the watcher must run its next pass if no event comes first.
    fn next_wake(&self, pace: &Pace) -> Option<Instant> {
        let state = self.lock();
        pace.next_wake(state.dirty(), state.next_due(), COALESCE)
    }

    /// Starts watching the directory: a change is served within
    /// milliseconds (a file written in place once it has settled). Watching
    /// the parent (or the nearest existing ancestor) as well catches the
    /// directory appearing, disappearing or being replaced. Stops when the
    /// guard is dropped.
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
                let changes = classify(&dir, &event, Instant::now());
                if !changes.is_empty() {
                    let _ = events.send(WatchMessage::Changes(changes));
                }
            })
            .map_err(watch_error)?;
        let mut watched_ancestor = None;
        update_watches(&mut watcher, &self.dir, &mut watched_ancestor);
        // Anything that changed between the initial load and the first
        // watch; how it was written is unknown.
        let _ = tx.send(WatchMessage::Changes(vec![Change::Rescan(
            Rescan::Uncertain,
        )]));
        let registry = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("tailkitd-tools-watch".into())
            .spawn(move || {
                let mut pace = Pace::default();
                loop {
                    let first = match registry.next_wake(&pace) {
                        None => rx.recv().ok(),
                        Some(at) => {
                            match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                                Ok(message) => Some(message),
                                Err(mpsc::RecvTimeoutError::Timeout) => {
                                    Some(WatchMessage::Changes(Vec::new()))
                                }
                                Err(mpsc::RecvTimeoutError::Disconnected) => None,
                            }
                        }
                    };
                    let Some(first) = first else { return };
                    // Everything already queued goes into the same pass.
                    let queued = std::iter::from_fn(|| rx.try_recv().ok());
                    let mut changes = Vec::new();
                    for message in std::iter::once(first).chain(queued) {
                        match message {
                            WatchMessage::Changes(c) => changes.extend(c),
                            WatchMessage::Stop => return,
                        }
                    }
                    if touches_directory(&changes) {
                        update_watches(&mut watcher, &registry.dir, &mut watched_ancestor);
                    }
                    registry.pass(changes, &mut pace);
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
    Changes(Vec<Change>),
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
            WatchMessage::Changes(_) => "Changes",
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

fn log_problems(index: &Index) {
    for p in index.problems() {
        tracing::warn!(file = %p.file.display(), field = %p.field, "tool file rejected: {}", p.message);
    }
}

#[cfg(test)]
mod tests;
