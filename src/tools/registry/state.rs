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
use super::scan::{Listed, list, map_parallel};
use crate::tools::ToolLimits;
use crate::tools::file::{
    FileKey, Problem, RawRead, directory_problem, duplicate_problem, parse_bytes, read_bytes,
    read_bytes_unless,
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

/// Where a tool file that is a symlink leads, as far as changes to the
/// other entries of the directory are concerned.
#[derive(Debug)]
enum Link {
    /// Through this entry of the directory (`..data`).
    Through(OsString),
    /// Anywhere: the target is absolute, or starts with `./` or `../`.
    Anywhere,
}

/// What a rescan found of one listed file, before anything is changed.
#[derive(Debug)]
struct Probe {
    /// Where it leads, if it is a symlink.
    link: Option<Link>,
    /// Its key (`None`: not a regular file, or gone).
    key: Option<FileKey>,
    /// The file read (and whether it changed while it was read), if the
    /// rescan loads it now.
    read: Option<(bool, Loaded)>,
}

/// The registry's knowledge of its directory. Files are known by their
/// name in the directory (the watcher reports only those directly in it),
/// which orders them as their paths would and compares fast.
#[derive(Debug)]
pub(super) struct DirState {
    dir: PathBuf,
    limits: ToolLimits,
    settle: Duration,
    files: BTreeMap<OsString, Entry>,
    pending: BTreeMap<OsString, Pending>,
    /// Files written in place in this pass, whose key is taken once at its
    /// end (a large write is many events).
    touched: BTreeSet<OsString>,
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
            Change::Gone(path) => self.remove(name_of(&path)),
            Change::Replaced(path) => {
                self.note_link(link_of(&path));
                self.replace(name_of(&path), false);
            }
            Change::Written(path, at) => self.written(name_of(&path).to_os_string(), at),
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

    /// Notes what a tool file links through, if it is a symlink.
    fn note_link(&mut self, link: Option<Link>) {
        match link {
            Some(Link::Through(first)) => {
                self.links.insert(first);
            }
            Some(Link::Anywhere) => self.links_anywhere = true,
            None => {}
        }
    }

    /// Takes the key of each file written in place since the last call (so
    /// that a file written once more after that is seen to have changed).
    pub(super) fn note_written(&mut self) {
        for name in std::mem::take(&mut self.touched) {
            let path = self.dir.join(&name);
            if let Some(p) = self.pending.get_mut(&name) {
                p.seen = FileKey::stat(&path);
            }
        }
    }

    /// A file deleted or renamed away: its commands go now, and a write in
    /// progress is forgotten.
    fn remove(&mut self, name: &OsStr) {
        self.pending.remove(name);
        if self.files.remove(name).is_some() {
            self.dirty = true;
        }
    }

    /// A file that arrived whole: read it now.
    fn replace(&mut self, name: &OsStr, fresh: bool) {
        let (torn, loaded) = self.read(name, false, fresh);
        self.replaced(name, torn, loaded);
    }

    /// What a file that arrived whole held when it was read (`torn`: it
    /// changed while it was read). If it changed, it is being written in
    /// place after all and waits to settle.
    fn replaced(&mut self, name: &OsStr, torn: bool, loaded: Loaded) {
        let path = self.dir.join(name);
        // Gone already, or not a regular file (ignored, as when listing).
        if loaded.key.is_none() && FileKey::stat(&path).is_none() {
            return self.remove(name);
        }
        if torn {
            self.wait(name.to_os_string(), FileKey::stat(&path), true);
            return;
        }
        self.pending.remove(name);
        self.install(name, loaded);
    }

    /// Reads the file `name` (`settled`: once it has settled), reusing the
    /// tool in force if the bytes are the same, unless `fresh` (an explicit
    /// reload validates again what depends on more than the bytes, such as
    /// the users a tool runs as); and whether the file changed while it was
    /// read.
    fn read(&self, name: &OsStr, settled: bool, fresh: bool) -> (bool, Loaded) {
        let path = self.dir.join(name);
        self.loaded(name, &path, read_bytes(&path), settled, fresh)
    }

    /// [`DirState::read`], of what was read already.
    fn loaded(
        &self,
        name: &OsStr,
        path: &Path,
        raw: RawRead,
        settled: bool,
        fresh: bool,
    ) -> (bool, Loaded) {
        let current = self.files.get(name).map(|e| &e.current).filter(|_| !fresh);
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
    fn written(&mut self, name: OsString, at: Instant) {
        if let Some(entry) = self.files.get_mut(&name)
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
                    self.files.remove(&name);
                }
            }
            self.dirty = true;
        }
        self.wait(name.clone(), None, true);
        self.touched.insert(name);
    }

    fn wait(&mut self, name: OsString, seen: Option<FileKey>, written: bool) {
        let due = Instant::now() + self.settle;
        let written = written || self.pending.get(&name).is_some_and(|p| p.written);
        self.pending.insert(name, Pending { due, seen, written });
    }

    fn install(&mut self, name: &OsStr, loaded: Loaded) {
        match self.files.get_mut(name) {
            Some(entry) => {
                let previous = std::mem::replace(&mut entry.current, loaded);
                entry.prior = Some(previous);
            }
            None => {
                self.files.insert(
                    name.to_os_string(),
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
    /// in place keep waiting. The files are looked at (and read, where
    /// they are loaded) on a few threads at once; what is in force changes
    /// only after that, in one go.
    pub(super) fn rescan(&mut self, kind: Rescan) {
        let listed = match list(&self.dir) {
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
        let probes = map_parallel(&listed, |file| self.probe(file, kind));
        self.links.clear();
        self.links_anywhere = false;
        let known: Vec<OsString> = self
            .files
            .keys()
            .chain(self.pending.keys())
            .cloned()
            .collect();
        for name in known {
            let present = listed
                .binary_search_by(|file| file.name.as_os_str().cmp(&name))
                .is_ok_and(|i| probes[i].key.is_some());
            if !present {
                self.remove(&name);
            }
        }
        for (file, probe) in listed.into_iter().zip(probes) {
            self.note_link(probe.link);
            let Some(key) = probe.key else { continue };
            match self.pending.get(&file.name) {
                Some(p) if p.written || kind == Rescan::Uncertain => continue,
                Some(_) => {
                    self.pending.remove(&file.name);
                }
                None => {}
            }
            let same = self
                .files
                .get(&file.name)
                .is_some_and(|e| e.current.key == Some(key));
            match probe.read {
                Some((torn, loaded)) => self.replaced(&file.name, torn, loaded),
                None if kind == Rescan::Uncertain && !same => {
                    self.wait(file.name, Some(key), false);
                }
                None => {}
            }
        }
    }

    /// What a rescan of `kind` finds of `file`, changing nothing: its key,
    /// where it links, and what it holds if it is to be loaded now (the
    /// rules of [`DirState::rescan`]: every file on an explicit reload, a
    /// file whose key changed on an atomic rescan, none on an uncertain
    /// one, never a file waiting to settle after a write in place).
    fn probe(&self, file: &Listed, kind: Rescan) -> Probe {
        let name = file.name.as_os_str();
        let path = self.dir.join(name);
        let link = if file.symlink { link_of(&path) } else { None };
        let waits = self
            .pending
            .get(name)
            .is_some_and(|p| p.written || kind == Rescan::Uncertain);
        let known = self.files.get(name).and_then(|e| e.current.key);
        let raw = match kind {
            _ if waits => None,
            Rescan::Uncertain => None,
            Rescan::Forced => Some(read_bytes(&path)),
            // Opened first, and read only if it is another version: one
            // lookup of the path, not a `stat` and then another.
            Rescan::Atomic => match read_bytes_unless(&path, known) {
                None => {
                    return Probe {
                        link,
                        key: known,
                        read: None,
                    };
                }
                raw => raw,
            },
        };
        let Some(raw) = raw else {
            let key = FileKey::stat(&path);
            return Probe {
                link,
                key,
                read: None,
            };
        };
        if let Some(key) = raw.key {
            let read = self.loaded(name, &path, raw, false, kind == Rescan::Forced);
            return Probe {
                link,
                key: Some(key),
                read: Some(read),
            };
        }
        // Not opened: a file there that cannot be opened is a problem (if
        // it changed, or on an explicit reload); nothing there, or not a
        // regular file, is not a tool file.
        let key = FileKey::stat(&path);
        let read = key
            .filter(|k| kind == Rescan::Forced || known != Some(*k))
            .map(|_| self.loaded(name, &path, raw, false, kind == Rescan::Forced));
        Probe { link, key, read }
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
        let due: Vec<(OsString, Pending)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(name, p)| (name.clone(), *p))
            .collect();
        for (name, pending) in due {
            let path = self.dir.join(&name);
            let Some(key) = FileKey::stat(&path) else {
                self.remove(&name);
                continue;
            };
            if pending.seen != Some(key) {
                self.wait(name, Some(key), false);
                continue;
            }
            let (torn, loaded) = self.read(&name, true, false);
            // Another version than the one that settled: wait for that one.
            // No version at all (it cannot be opened): that is its problem.
            if torn || loaded.key.is_some_and(|k| k != key) {
                self.wait(name, FileKey::stat(&path), false);
                continue;
            }
            self.pending.remove(&name);
            self.install(&name, loaded);
        }
    }

    /// The index of what is in force: files in path order, so that of two
    /// files declaring one tool name the first by name wins.
    pub(super) fn index(&mut self) -> Index {
        self.dirty = false;
        let mut tools: BTreeMap<String, Arc<Tool>> = BTreeMap::new();
        let mut problems: Vec<Problem> = self.dir_problem.iter().cloned().collect();
        for (name, entry) in &self.files {
            match &entry.current.outcome {
                Ok(tool) => match tools.get(&tool.name) {
                    Some(first) => problems.push(duplicate_problem(
                        &tool.name,
                        &first.source,
                        &self.dir.join(name),
                    )),
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

/// The name in the directory of the tool file `path` (the watcher reports
/// only files directly in it).
fn name_of(path: &Path) -> &OsStr {
    path.file_name().unwrap_or_default()
}

/// Where the tool file `path` leads, if it is a symlink.
fn link_of(path: &Path) -> Option<Link> {
    let target = std::fs::read_link(path).ok()?;
    Some(match target.components().next() {
        Some(Component::Normal(first)) => Link::Through(first.to_os_string()),
        // Absolute, `./`, `../`: leave the analysis to a rescan.
        _ => Link::Anywhere,
    })
}
