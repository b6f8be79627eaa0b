//! The registry's watcher: turns inotify events (through `notify`) into
//! [`Change`]s, keeps the directory and its nearest existing ancestor
//! watched, and paces the work: a change is handled as soon as it arrives,
//! but the index is rebuilt at most once per coalescing period (the first
//! change of a burst at once, the rest of the burst in one trailing
//! rebuild), and a rescan of the whole directory runs at most once per four
//! times its own cost.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};

use super::state::{Change, Rescan};
use crate::tools::file::is_tool_file_name;

/// What the watcher must remember between passes to pace them.
#[derive(Debug, Default)]
pub(super) struct Pace {
    /// When the index was last rebuilt by the watcher.
    last_rebuild: Option<Instant>,
    /// When the directory was last rescanned, and how long to wait after
    /// that before the next rescan.
    last_rescan: Option<(Instant, Duration)>,
    /// A rescan asked for and not yet done.
    pub(super) rescan: Option<Rescan>,
}

/// The shortest pause between two rescans.
const MIN_RESCAN_GAP: Duration = Duration::from_millis(1);

impl Pace {
    /// Whether a rescan may run at `now`.
    pub(super) fn may_rescan(&self, now: Instant) -> bool {
        self.last_rescan.is_none_or(|(at, gap)| now >= at + gap)
    }

    /// A rescan ran from `started` to now.
    pub(super) fn rescanned(&mut self, started: Instant) {
        let gap = (started.elapsed() * 4).max(MIN_RESCAN_GAP);
        self.last_rescan = Some((started, gap));
        self.rescan = None;
    }

    /// Whether the index may be rebuilt at `now`.
    pub(super) fn may_rebuild(&self, now: Instant, coalesce: Duration) -> bool {
        self.last_rebuild.is_none_or(|at| now >= at + coalesce)
    }

    pub(super) fn rebuilt(&mut self, at: Instant) {
        self.last_rebuild = Some(at);
    }

    /// When the next paced step may run: a rescan asked for, a rebuild
    /// (`dirty`), or a waiting file (`due`).
    pub(super) fn next_wake(
        &self,
        dirty: bool,
        due: Option<Instant>,
        coalesce: Duration,
    ) -> Option<Instant> {
        let rescan = self.rescan.map(|_| {
            self.last_rescan
                .map_or_else(Instant::now, |(at, gap)| at + gap)
        });
        let rebuild = dirty.then(|| {
            self.last_rebuild
                .map_or_else(Instant::now, |at| at + coalesce)
        });
        [rescan, rebuild, due].into_iter().flatten().min()
    }
}

/// What an event from the watcher of `dir` (the directory, or the ancestor
/// watched beside it) means for the registry; `at` is when it arrived.
///
/// - Reads (opening and reading files, a rescan's own among them) mean
///   nothing.
/// - A tool file renamed into the directory, or created as a symlink, is
///   [`Change::Replaced`]; deleted or renamed away, [`Change::Gone`];
///   created as a file or written, [`Change::Written`].
/// - Another entry of the directory is a [`Change::Entry`]: it matters if
///   tool files link through it (the Kubernetes atomic writer's `..data`).
/// - The directory or a path leading to it, a `..` entry beside it, an
///   event without a path, or lost events: a rescan.
/// - Other files beside the directory (an audit log) mean nothing.
///
/// A rescan or entry change is [`Rescan::Atomic`] when the name was
/// renamed (into place, or away: half of a swap) or created as a symlink.
pub(super) fn classify(
    dir: &Path,
    event: &notify::Result<notify::Event>,
    at: Instant,
) -> Vec<Change> {
    let event = match event {
        Ok(event) => event,
        Err(_) => return vec![Change::Rescan(Rescan::Uncertain)],
    };
    match event.kind {
        EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write) => {
            return Vec::new();
        }
        // inotify also reports a rename as its two halves, on their own.
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => return Vec::new(),
        _ => {}
    }
    if event.paths.is_empty() || event.need_rescan() {
        return vec![Change::Rescan(Rescan::Uncertain)];
    }
    let mut changes = Vec::new();
    for path in &event.paths {
        let name = path.file_name().unwrap_or_default();
        let kind = if arrived_whole(&event.kind, path) {
            Rescan::Atomic
        } else {
            Rescan::Uncertain
        };
        if path.parent() == Some(dir) {
            changes.push(if is_tool_file_name(name) {
                file_change(&event.kind, path, at)
            } else {
                Change::Entry(name.to_os_string(), kind)
            });
        } else if path == dir || dir.starts_with(path) || name.as_encoded_bytes().starts_with(b"..")
        {
            changes.push(Change::Rescan(kind));
        }
    }
    changes
}

/// The change an event on tool file `path` makes.
fn file_change(kind: &EventKind, path: &Path, at: Instant) -> Change {
    match kind {
        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
            Change::Gone(path.to_path_buf())
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => Change::Replaced(path.to_path_buf()),
        _ if arrived_whole(kind, path) => Change::Replaced(path.to_path_buf()),
        _ => Change::Written(path.to_path_buf(), at),
    }
}

/// Whether the entry `path` changed whole: renamed into place or away, or
/// created as a symlink (symlink(2) makes it complete at once).
fn arrived_whole(kind: &EventKind, path: &Path) -> bool {
    match kind {
        EventKind::Modify(ModifyKind::Name(_)) => true,
        EventKind::Create(_) => std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink()),
        _ => false,
    }
}

/// Whether the watches must be checked again after `changes`: the
/// directory or the path to it may have appeared, gone or been replaced.
pub(super) fn touches_directory(changes: &[Change]) -> bool {
    changes.iter().any(|c| matches!(c, Change::Rescan(_)))
}

/// Watches `dir` itself when it exists, and its nearest existing ancestor
/// (normally its parent) so that the directory appearing or being replaced
/// is seen. Re-watching `dir` picks up a directory that was created or
/// replaced since.
pub(super) fn update_watches(
    watcher: &mut impl Watcher,
    dir: &Path,
    watched_ancestor: &mut Option<PathBuf>,
) {
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
