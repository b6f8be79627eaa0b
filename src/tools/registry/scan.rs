//! The groundwork of a rescan: the directory's tool files listed by name,
//! and the same work done for each of them on a few threads at once (a
//! ConfigMap `..data` swap gives every file a new inode, so a rescan reads
//! every file again; in parallel that takes a fraction of the time).

use std::ffi::OsString;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::tools::file::is_tool_file_name;

/// One tool file of the directory, as listed.
#[derive(Debug)]
pub(super) struct Listed {
    /// Its name in the directory.
    pub(super) name: OsString,
    /// Whether the entry is a symlink (its target is read only then).
    pub(super) symlink: bool,
}

/// The tool files of `dir` (see [`is_tool_file_name`]), sorted by name,
/// which is path order within one directory.
///
/// # Errors
///
/// When the directory cannot be read.
pub(super) fn list(dir: &Path) -> std::io::Result<Vec<Listed>> {
    let mut listed: Vec<Listed> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            is_tool_file_name(&name).then(|| Listed {
                // The type from the listing (no `lstat` on Linux); if
                // even that fails, the target is looked at anyway.
                symlink: entry.file_type().map_or(true, |t| t.is_symlink()),
                name,
            })
        })
        .collect();
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(listed)
}

/// The most threads a rescan uses (this one among them): enough to keep
/// two or four cores busy with reads; more would only compete with the
/// jobs the daemon runs.
const MAX_THREADS: usize = 4;

/// Below this many items the work stays on the calling thread: starting a
/// thread costs about as much as reading a few dozen small files.
const MIN_PARALLEL: usize = 64;

/// How many items a thread takes at a time.
const CHUNK: usize = 16;

/// `work` applied to every item of `items`, on up to [`MAX_THREADS`]
/// threads (no more than the CPUs there are, and the calling thread does
/// its share), results in the order of `items`. A thread that cannot be
/// started leaves its share to the others.
pub(super) fn map_parallel<T: Sync, R: Send>(items: &[T], work: impl Fn(&T) -> R + Sync) -> Vec<R> {
    // Asked once: on Linux it reads the cgroup's CPU quota files.
    static CPUS: OnceLock<usize> = OnceLock::new();
    let cpus =
        *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, NonZeroUsize::get));
    let threads = cpus
        .min(MAX_THREADS)
        .min(items.len().div_ceil(MIN_PARALLEL));
    if threads <= 1 {
        return items.iter().map(work).collect();
    }
    let next = AtomicUsize::new(0);
    let run = || {
        let mut done = Vec::new();
        loop {
            let start = next.fetch_add(CHUNK, Ordering::Relaxed);
            if start >= items.len() {
                return done;
            }
            let end = (start + CHUNK).min(items.len());
            done.extend((start..end).map(|i| (i, work(&items[i]))));
        }
    };
    let mut results: Vec<(usize, R)> = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads)
            .filter_map(|_| {
                std::thread::Builder::new()
                    .name("tailkitd-tools-scan".into())
                    .spawn_scoped(scope, run)
                    .ok()
            })
            .collect();
        let mut results = run();
        for helper in helpers {
            match helper.join() {
                Ok(done) => results.extend(done),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        results
    });
    results.sort_unstable_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_work_keeps_the_order_and_misses_nothing() {
        for n in [0, 1, MIN_PARALLEL - 1, MIN_PARALLEL + 1, 1000] {
            let items: Vec<usize> = (0..n).collect();
            let doubled = map_parallel(&items, |i| i * 2);
            assert_eq!(doubled, (0..n).map(|i| i * 2).collect::<Vec<_>>());
        }
    }

    #[test]
    fn listing_sorts_by_name_and_tells_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.json", "a.toml", ".hidden.json", "c.txt"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        std::os::unix::fs::symlink("b.json", dir.path().join("l.json")).unwrap();
        let listed = list(dir.path()).unwrap();
        let names: Vec<(&str, bool)> = listed
            .iter()
            .map(|l| (l.name.to_str().unwrap(), l.symlink))
            .collect();
        assert_eq!(
            names,
            [("a.toml", false), ("b.json", false), ("l.json", true)]
        );
    }
}
