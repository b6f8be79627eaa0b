//! What the registry knows of each tool file: the definition in force (as
//! last loaded, with the one before it), and the files written in place
//! that wait to settle. The rules of when a file is loaded live here; the
//! watcher only says what happened ([`Change`]) and when to look again.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Index;
use crate::tools::ToolLimits;
use crate::tools::file::{
    FileKey, Problem, directory_problem, duplicate_problem, parse_bytes, read_bytes,
    tool_file_paths,
};
use crate::tools::model::Tool;

/// How long after a file was read an in-place write to it may still have
/// been caught half done by that read: the write's data can land before the
/// read while its event reaches the watcher only after it (the watcher
/// learns of writes through a queue). Such a read is distrusted: the
/// definition before it comes back until the file settles again.
pub(super) const CAUGHT_MID_WRITE: Duration = Duration::from_secs(1);

/// What happened to the tools directory, as the watcher tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Change {
    /// A tool file was deleted or renamed away: its commands go at once.
    Gone(PathBuf),
    /// A tool file arrived whole: renamed into the directory, or a symlink
    /// created. It is loaded at once.
    Replaced(PathBuf),
    /// A tool file was created or written in place (the event arrived at
    /// the instant given). It is loaded once it has settled.
    Written(PathBuf, Instant),
    /// An entry of the directory that is not a tool file changed (named):
    /// it matters only if a tool file is a symlink through it, as through
    /// a ConfigMap's `..data`; then the directory is rescanned.
    Entry(OsString, Rescan),
    /// Something that may change many files at once: the directory or the
    /// path to it, a `..` entry beside it, lost events.
    Rescan(Rescan),
}

/// How a rescan treats a file whose key changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Rescan {
    /// Unknown how it changed (a directory created, events lost): a changed
    /// file waits to settle, as if written in place.
    Uncertain,
    /// Replaced atomically (a `..data` symlink renamed into place, the
    /// directory renamed or re-linked): a changed file is loaded at once.
    Atomic,
    /// An explicit reload (SIGHUP): every file is read and validated again
    /// now, except those the watcher saw being written in place and still
    /// wait.
    Forced,
}

/// One read of one file.
#[derive(Debug)]
struct Loaded {
    /// The version read (`None`: it could not be opened).
    key: Option<FileKey>,
    /// What it held, if it could be read: a file read again with the same
    /// bytes (a ConfigMap update gives every key a new inode) keeps its
    /// tool, unparsed.
    bytes: Option<Vec<u8>>,
    outcome: Result<Arc<Tool>, Vec<Problem>>,
    /// Until when an in-place write reported for the file may have been
    /// caught half done by this read. `None` for a file loaded once it had
    /// settled: it had the same key as at its last event both before and
    /// after the read, and a write since would have changed its times.
    distrust_until: Option<Instant>,
}

/// The definition of one file in force, and the one it replaced.
#[derive(Debug)]
struct Entry {
    current: Loaded,
    /// What was in force before `current`, for when `current` turns out to
    /// have been read in the middle of a write.
    prior: Option<Loaded>,
}

/// A file written in place, waiting to settle.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// When it may be loaded, if nothing else happens to it.
    due: Instant,
    /// Its key when the last event for it was handled; it must still have
    /// this key when it is due.
    seen: Option<FileKey>,
    /// Whether the watcher saw it being written in place (else an
    /// uncertain rescan found it changed, and a later atomic one may load
    /// it at once).
    written: bool,
}

/// The registry's knowledge of its directory.
#[derive(Debug)]
pub(super) struct DirState {
    dir: PathBuf,
    limits: ToolLimits,
    settle: Duration,
    files: BTreeMap<PathBuf, Entry>,
    pending: BTreeMap<PathBuf, Pending>,
    /// Files written in place in this pass, whose key is taken once at its
    /// end (a large write is many events).
    touched: BTreeSet<PathBuf>,
    dir_problem: Option<Problem>,
    /// The first components of the targets of the tool files that are
    /// symlinks (`..data` in a ConfigMap mount): the other entries of the
    /// directory whose changes matter. `links_anywhere`: a target is
    /// absolute or climbs out, so every entry matters.
    links: BTreeSet<OsString>,
    links_anywhere: bool,
    /// Whether what is in force changed since the index was last built.
    dirty: bool,
}

impl DirState {
    /// Everything in `dir`, loaded now.
    pub(super) fn load(dir: &Path, limits: ToolLimits, settle: Duration) -> DirState {
        let mut state = DirState {
            dir: dir.to_path_buf(),
            limits,
            settle,
            files: BTreeMap::new(),
            pending: BTreeMap::new(),
            touched: BTreeSet::new(),
            dir_problem: None,
            links: BTreeSet::new(),
            links_anywhere: false,
            dirty: true,
        };
        state.rescan(Rescan::Forced);
        state
    }

    pub(super) fn set_settle(&mut self, settle: Duration) {
        self.settle = settle;
    }

    /// Whether what is in force changed since [`DirState::index`] last ran.
    pub(super) fn dirty(&self) -> bool {
        self.dirty
    }

    /// How many files wait to settle.
    pub(super) fn waiting(&self) -> usize {
        self.pending.len()
    }

    /// Applies one change (a rescan at once: the watcher spaces them out).
    pub(super) fn apply(&mut self, change: Change) {
        match change {
            Change::Gone(path) => self.remove(&path),
            Change::Replaced(path) => {
                self.note_link(&path);
                self.replace(&path, false);
            }
            Change::Written(path, at) => self.written(path, at),
            Change::Entry(name, kind) => {
                if self.links_through(&name) {
                    self.rescan(kind);
                }
            }
            Change::Rescan(kind) => self.rescan(kind),
        }
    }

    /// Whether a tool file may be a symlink through the entry `name`.
    pub(super) fn links_through(&self, name: &OsStr) -> bool {
        self.links_anywhere || self.links.contains(name)
    }

    /// Notes what the tool file `path` links through, if it is a symlink.
    fn note_link(&mut self, path: &Path) {
        let Ok(target) = std::fs::read_link(path) else {
            return;
        };
        match target.components().next() {
            Some(Component::Normal(first)) => {
                self.links.insert(first.to_os_string());
            }
            // Absolute, `./`, `../`: leave the analysis to a rescan.
            _ => self.links_anywhere = true,
        }
    }

    /// Takes the key of each file written in place since the last call (so
    /// that a file written once more after that is seen to have changed).
    pub(super) fn note_written(&mut self) {
        for path in std::mem::take(&mut self.touched) {
            if let Some(p) = self.pending.get_mut(&path) {
                p.seen = FileKey::stat(&path);
            }
        }
    }

    /// A file deleted or renamed away: its commands go now, and a write in
    /// progress is forgotten.
    fn remove(&mut self, path: &Path) {
        self.pending.remove(path);
        if self.files.remove(path).is_some() {
            self.dirty = true;
        }
    }

    /// A file that arrived whole: read it now. If it changes while it is
    /// read, it is being written in place after all and waits to settle.
    fn replace(&mut self, path: &Path, fresh: bool) {
        let (torn, loaded) = self.read(path, false, fresh);
        // Gone already, or not a regular file (ignored, as when listing).
        if loaded.key.is_none() && FileKey::stat(path).is_none() {
            return self.remove(path);
        }
        if torn {
            self.wait(path.to_path_buf(), FileKey::stat(path), true);
            return;
        }
        self.pending.remove(path);
        self.install(path, loaded);
    }

    /// Reads `path` (`settled`: once it has settled), reusing the tool in
    /// force if the bytes are the same, unless `fresh` (an explicit reload
    /// validates again what depends on more than the bytes, such as the
    /// users a tool runs as); and whether the file changed while it was
    /// read.
    fn read(&self, path: &Path, settled: bool, fresh: bool) -> (bool, Loaded) {
        let raw = read_bytes(path);
        let current = self.files.get(path).map(|e| &e.current).filter(|_| !fresh);
        let (bytes, outcome) = match raw.bytes {
            Ok(bytes) => {
                let outcome = match current {
                    Some(c) if c.bytes.as_deref() == Some(bytes.as_slice()) => c.outcome.clone(),
                    _ => parse_bytes(&bytes, path, &self.limits).map(Arc::new),
                };
                (Some(bytes), outcome)
            }
            Err(problems) => (None, Err(problems)),
        };
        let loaded = Loaded {
            key: raw.key,
            bytes,
            outcome,
            distrust_until: (!settled).then(|| Instant::now() + CAUGHT_MID_WRITE),
        };
        (raw.torn, loaded)
    }

    /// A file written in place (the event arrived at `at`): it waits to
    /// settle, with its previous definition in force. If that definition
    /// was read (without settling first) so shortly before that it may
    /// hold part of this write, the one before it comes back (or none, for
    /// a file that had none).
    fn written(&mut self, path: PathBuf, at: Instant) {
        if let Some(entry) = self.files.get_mut(&path)
            && entry.current.distrust_until.is_some_and(|until| at < until)
        {
            match entry.prior.take() {
                // Read before the distrusted read, so before this write.
                Some(prior) => {
                    entry.current = Loaded {
                        distrust_until: None,
                        ..prior
                    };
                }
                None => {
                    self.files.remove(&path);
                }
            }
            self.dirty = true;
        }
        self.wait(path.clone(), None, true);
        self.touched.insert(path);
    }

    fn wait(&mut self, path: PathBuf, seen: Option<FileKey>, written: bool) {
        let due = Instant::now() + self.settle;
        let written = written || self.pending.get(&path).is_some_and(|p| p.written);
        self.pending.insert(path, Pending { due, seen, written });
    }

    fn install(&mut self, path: &Path, loaded: Loaded) {
        match self.files.get_mut(path) {
            Some(entry) => {
                let previous = std::mem::replace(&mut entry.current, loaded);
                entry.prior = Some(previous);
            }
            None => {
                self.files.insert(
                    path.to_path_buf(),
                    Entry {
                        current: loaded,
                        prior: None,
                    },
                );
            }
        }
        self.dirty = true;
    }

    /// Lists the directory again: files gone are removed, files whose key
    /// changed are loaded or wait, as `kind` says; files seen being written
    /// in place keep waiting.
    pub(super) fn rescan(&mut self, kind: Rescan) {
        let listed = match tool_file_paths(&self.dir) {
            Ok(listed) => {
                self.set_dir_problem(None);
                listed
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.set_dir_problem(None);
                Vec::new()
            }
            Err(e) => {
                self.set_dir_problem(Some(directory_problem(&self.dir, &e)));
                Vec::new()
            }
        };
        self.links.clear();
        self.links_anywhere = false;
        for path in &listed {
            self.note_link(path);
        }
        let present: BTreeMap<PathBuf, FileKey> = listed
            .into_iter()
            .filter_map(|p| FileKey::stat(&p).map(|k| (p, k)))
            .collect();
        let known: Vec<PathBuf> = self
            .files
            .keys()
            .chain(self.pending.keys())
            .cloned()
            .collect();
        for path in known {
            if !present.contains_key(&path) {
                self.remove(&path);
            }
        }
        for (path, key) in present {
            match self.pending.get(&path) {
                Some(p) if p.written || kind == Rescan::Uncertain => continue,
                Some(_) => {
                    self.pending.remove(&path);
                }
                None => {}
            }
            let same = self
                .files
                .get(&path)
                .is_some_and(|e| e.current.key == Some(key));
            match kind {
                Rescan::Forced => self.replace(&path, true),
                _ if same => {}
                Rescan::Atomic => self.replace(&path, false),
                Rescan::Uncertain => self.wait(path, Some(key), false),
            }
        }
    }

    fn set_dir_problem(&mut self, problem: Option<Problem>) {
        if self.dir_problem != problem {
            self.dir_problem = problem;
            self.dirty = true;
        }
    }

    /// The earliest instant a waiting file is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.due).min()
    }

    /// Loads the waiting files that are due and have not changed since
    /// their last event (same key now, and while being read); a file that
    /// did change waits one more settle period, a file gone is removed.
    pub(super) fn settle_due(&mut self, now: Instant) {
        let due: Vec<(PathBuf, Pending)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(path, p)| (path.clone(), *p))
            .collect();
        for (path, pending) in due {
            let Some(key) = FileKey::stat(&path) else {
                self.remove(&path);
                continue;
            };
            if pending.seen != Some(key) {
                self.wait(path, Some(key), false);
                continue;
            }
            let (torn, loaded) = self.read(&path, true, false);
            // Another version than the one that settled: wait for that one.
            // No version at all (it cannot be opened): that is its problem.
            if torn || loaded.key.is_some_and(|k| k != key) {
                self.wait(path.clone(), FileKey::stat(&path), false);
                continue;
            }
            self.pending.remove(&path);
            self.install(&path, loaded);
        }
    }

    /// The index of what is in force: files in path order, so that of two
    /// files declaring one tool name the first by name wins.
    pub(super) fn index(&mut self) -> Index {
        self.dirty = false;
        let mut tools: BTreeMap<String, Arc<Tool>> = BTreeMap::new();
        let mut problems: Vec<Problem> = self.dir_problem.iter().cloned().collect();
        for (path, entry) in &self.files {
            match &entry.current.outcome {
                Ok(tool) => match tools.get(&tool.name) {
                    Some(first) => {
                        problems.push(duplicate_problem(&tool.name, &first.source, path))
                    }
                    None => {
                        tools.insert(tool.name.clone(), tool.clone());
                    }
                },
                Err(found) => problems.extend(found.iter().cloned()),
            }
        }
        Index { tools, problems }
    }
}
