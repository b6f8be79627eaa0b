//! Tool files on disk: reading one (bounded, never blocking, saying which
//! version was read), listing a directory's tool files, loading a
//! directory, and `tailkitd validate`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::super::ToolLimits;
use super::super::model::Tool;
use super::{Format, Problem, parse_str};

/// The largest tool file that is read (1 MiB; the largest real tool files
/// are a few KiB). A bigger file is refused, with its size, without being
/// read.
pub const MAX_TOOL_FILE_BYTES: u64 = 1 << 20;

/// Whether a directory entry named `name` is a tool file: `*.json` or
/// `*.toml`, and not hidden (a name starting with `.`, such as a
/// ConfigMap's `..data` or an editor's `.x.json.swp`).
pub fn is_tool_file_name(name: &OsStr) -> bool {
    !name.as_encoded_bytes().starts_with(b".") && Format::from_path(Path::new(name)).is_some()
}

/// One version of a file on disk: device, inode, size, modification and
/// change times (of the file a symlink leads to). A file written, replaced
/// or renamed over has another key; the registry re-reads a file only when
/// its key changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    /// The key of a file's metadata.
    pub fn of(meta: &Metadata) -> FileKey {
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The key of the regular file at `path` (following symlinks), or
    /// `None` if there is none.
    pub fn stat(path: &Path) -> Option<FileKey> {
        std::fs::metadata(path)
            .ok()
            .filter(Metadata::is_file)
            .map(|m| FileKey::of(&m))
    }
}

/// Reads and validates one tool file (following symlinks).
///
/// # Errors
///
/// When the file cannot be read, is not a regular file, is over
/// [`MAX_TOOL_FILE_BYTES`] (refused unread), has an extension other than
/// `.json` or `.toml`, or has validation problems.
pub fn load_file(path: &Path, limits: &ToolLimits) -> Result<Tool, Vec<Problem>> {
    parse_bytes(&read_bytes(path).bytes?, path, limits)
}

/// One read of a tool file's bytes, as [`read_bytes`] returns it.
#[derive(Debug)]
pub struct RawRead {
    /// The file's key when it was opened; `None` if it could not be opened
    /// or is not a regular file.
    pub key: Option<FileKey>,
    /// Whether the file changed while it was read (its key afterwards
    /// differs), so that the bytes may be a mix of two versions.
    pub torn: bool,
    /// The whole file, or why it was not read.
    pub bytes: Result<Vec<u8>, Vec<Problem>>,
}

/// Reads one tool file (following symlinks), saying which version of the
/// file was read; [`parse_bytes`] makes a tool of it. The size is checked
/// on the open file before anything is read, and the read itself stops
/// past [`MAX_TOOL_FILE_BYTES`], in case the file grows in between.
/// Opening never blocks (a FIFO put in a file's place is refused, not
/// waited on).
pub fn read_bytes(path: &Path) -> RawRead {
    match Opened::open(path) {
        Ok(opened) => opened.read(),
        Err(problems) => RawRead::unopened(problems),
    }
}

/// [`read_bytes`], unless the file opened is the version `known` (it has
/// that key): then it is closed unread, and `None` returned. One lookup of
/// the path where a `stat` first and then [`read_bytes`] would take two.
pub fn read_bytes_unless(path: &Path, known: Option<FileKey>) -> Option<RawRead> {
    match Opened::open(path) {
        Ok(opened) if Some(opened.key) == known => None,
        Ok(opened) => Some(opened.read()),
        Err(problems) => Some(RawRead::unopened(problems)),
    }
}

impl RawRead {
    fn unopened(problems: Vec<Problem>) -> RawRead {
        RawRead {
            key: None,
            torn: false,
            bytes: Err(problems),
        }
    }
}

/// Parses and validates the bytes read from the tool file `path`, in the
/// format its extension names.
///
/// # Errors
///
/// Not UTF-8, an extension other than `.json` or `.toml`, or any problem
/// [`parse_str`] finds.
pub fn parse_bytes(bytes: &[u8], path: &Path, limits: &ToolLimits) -> Result<Tool, Vec<Problem>> {
    let format =
        Format::from_path(path).ok_or_else(|| file_problem(path, NOT_A_TOOL_FILE.into()))?;
    let text = std::str::from_utf8(bytes).map_err(|e| {
        file_problem(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    parse_str(text, format, path, limits)
}

const NOT_A_TOOL_FILE: &str = "not a .json or .toml tool file";

fn file_problem(path: &Path, message: String) -> Vec<Problem> {
    vec![Problem {
        file: path.to_path_buf(),
        field: "file".into(),
        message,
    }]
}

/// A tool file opened (a regular file), not yet read.
struct Opened<'a> {
    path: &'a Path,
    file: std::fs::File,
    key: FileKey,
    len: u64,
}

impl<'a> Opened<'a> {
    fn open(path: &'a Path) -> Result<Opened<'a>, Vec<Problem>> {
        let problem = |message: String| file_problem(path, message);
        if Format::from_path(path).is_none() {
            return Err(problem(NOT_A_TOOL_FILE.into()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| problem(e.to_string()))?;
        let meta = file.metadata().map_err(|e| problem(e.to_string()))?;
        if !meta.is_file() {
            return Err(problem("not a regular file".into()));
        }
        Ok(Opened {
            path,
            file,
            key: FileKey::of(&meta),
            len: meta.len(),
        })
    }

    fn read(self) -> RawRead {
        let mut torn = false;
        let bytes = self.read_checked(&mut torn);
        RawRead {
            key: Some(self.key),
            torn,
            bytes,
        }
    }

    fn read_checked(&self, torn: &mut bool) -> Result<Vec<u8>, Vec<Problem>> {
        let problem = |message: String| file_problem(self.path, message);
        if self.len > MAX_TOOL_FILE_BYTES {
            return Err(problem(format!(
                "{} bytes ({}), over the limit of {MAX_TOOL_FILE_BYTES} bytes (1 MiB) for a tool file; not read",
                self.len,
                human_size(self.len)
            )));
        }
        let bytes = read_at_most(&self.file, MAX_TOOL_FILE_BYTES, self.len)
            .map_err(|e| problem(e.to_string()))?;
        *torn = self.file.metadata().map(|m| FileKey::of(&m)).ok() != Some(self.key);
        bytes.ok_or_else(|| {
            problem(format!(
                "grew past the limit of {MAX_TOOL_FILE_BYTES} bytes (1 MiB) for a tool file while being read; not read"
            ))
        })
    }
}

/// Reads `reader` to its end, or `None` as soon as it holds more than
/// `limit` bytes: never more than `limit + 1` bytes are read. `expected` is
/// a size hint (at most `limit` is reserved).
fn read_at_most(reader: impl Read, limit: u64, expected: u64) -> std::io::Result<Option<Vec<u8>>> {
    let reserve = usize::try_from(expected.min(limit)).unwrap_or(0);
    let mut bytes = Vec::with_capacity(reserve);
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

/// `536870912` as `512.0 MiB`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = "bytes";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    if unit == "bytes" {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {unit}")
    }
}

/// The result of loading a directory: the valid tools (sorted by name) and
/// every problem found.
#[derive(Debug, Default)]
pub struct LoadedDir {
    /// Valid tools; on duplicate names the first file by file name wins.
    pub tools: Vec<Tool>,
    /// Problems, per file.
    pub problems: Vec<Problem>,
}

/// The tool files of `dir` (see [`is_tool_file_name`]), sorted by path;
/// not yet checked to be regular files.
///
/// # Errors
///
/// When the directory cannot be read.
pub fn tool_file_paths(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| is_tool_file_name(&e.file_name()))
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files)
}

/// The problem of a directory that cannot be read.
pub(crate) fn directory_problem(dir: &Path, e: &std::io::Error) -> Problem {
    Problem {
        file: dir.to_path_buf(),
        field: "directory".into(),
        message: e.to_string(),
    }
}

/// The problem of `file`, whose tool name `tool` was taken by `first`.
pub(crate) fn duplicate_problem(tool: &str, first: &Path, file: &Path) -> Problem {
    Problem {
        file: file.to_path_buf(),
        field: "name".into(),
        message: format!(
            "tool {tool:?} is also declared by {}, which wins; {} is ignored",
            first.display(),
            file.display()
        ),
    }
}

/// Loads every `*.json` / `*.toml` file of `dir` whose name does not start
/// with `.`, following symlinks (Kubernetes ConfigMap mounts). A missing
/// directory loads as empty without a problem; the caller decides whether
/// that matters.
pub fn load_dir(dir: &Path, limits: &ToolLimits) -> LoadedDir {
    let mut loaded = LoadedDir::default();
    let files = match tool_file_paths(dir) {
        Ok(files) => files,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return loaded,
        Err(e) => {
            loaded.problems.push(directory_problem(dir, &e));
            return loaded;
        }
    };
    let mut by_name: BTreeMap<String, Tool> = BTreeMap::new();
    for file in files.into_iter().filter(|p| p.is_file()) {
        match load_file(&file, limits) {
            Ok(tool) => {
                if let Some(first) = by_name.get(&tool.name) {
                    loaded
                        .problems
                        .push(duplicate_problem(&tool.name, &first.source, &file));
                } else {
                    by_name.insert(tool.name.clone(), tool);
                }
            }
            Err(problems) => loaded.problems.extend(problems),
        }
    }
    loaded.tools = by_name.into_values().collect();
    loaded
}

/// Checks a tool file or a directory of them, as `tailkitd validate` does.
/// A directory that does not exist, or holds no tool file, is a problem.
pub fn validate_path(path: &Path) -> Vec<Problem> {
    let limits = ToolLimits::default();
    if path.is_dir() {
        let loaded = load_dir(path, &limits);
        if loaded.tools.is_empty() && loaded.problems.is_empty() {
            return vec![Problem {
                file: path.to_path_buf(),
                field: "directory".into(),
                message: "no .json or .toml tool files".into(),
            }];
        }
        loaded.problems
    } else if path.exists() {
        load_file(path, &limits).err().unwrap_or_default()
    } else {
        vec![Problem {
            file: path.to_path_buf(),
            field: "file".into(),
            message: "no such file or directory".into(),
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stop_past_the_limit() {
        // A reader that never ends, as a file growing while it is read.
        let endless = std::io::repeat(b'x');
        assert_eq!(read_at_most(endless, 10, 0).unwrap(), None);
        let short = &b"0123456789"[..];
        assert_eq!(read_at_most(short, 10, 10).unwrap().unwrap(), short);
        assert_eq!(read_at_most(&b"0123456789a"[..], 10, 10).unwrap(), None);
    }

    #[test]
    fn sizes_read_as_people_say_them() {
        assert_eq!(human_size(5), "5 bytes");
        assert_eq!(human_size(3 << 19), "1.5 MiB");
        assert_eq!(human_size(512 << 20), "512.0 MiB");
    }

    #[test]
    fn a_file_is_read_unless_it_is_the_version_known() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        std::fs::write(&path, "{}").unwrap();
        let key = FileKey::stat(&path);
        assert!(read_bytes_unless(&path, key).is_none());
        let read = read_bytes_unless(&path, None).unwrap();
        assert_eq!((read.key, read.bytes.unwrap()), (key, b"{}".to_vec()));
        // Written again with as many bytes: another version.
        std::fs::write(&path, "[]").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(std::time::UNIX_EPOCH).unwrap();
        let read = read_bytes_unless(&path, key).unwrap();
        assert_eq!(read.bytes.unwrap(), b"[]");
        assert_ne!(read.key, key);
        // Gone: read, and its problem told.
        std::fs::remove_file(&path).unwrap();
        let read = read_bytes_unless(&path, key).unwrap();
        assert_eq!(read.key, None);
        assert!(read.bytes.is_err());
    }

    #[test]
    fn a_fifo_in_a_files_place_is_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let read = read_bytes(&path);
        assert_eq!(read.key, None);
        let problems = read.bytes.unwrap_err();
        assert_eq!(problems[0].message, "not a regular file");
    }
}
