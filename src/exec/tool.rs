//! Tool files: the `*Raw` shapes serde reads (JSON exactly as the Go
//! `tailkit` SDK writes it, or TOML with the same fields), and the validated
//! [`Tool`] / [`Command`] / [`Arg`] the rest of tailkitd works with. Every
//! problem is reported with its file and field; a file with any problem is
//! rejected whole, the other files still load.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::duration::{format_go_duration, parse_go_duration};
use super::pattern::ArgPattern;

/// Limits applied while loading tool files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolLimits {
    /// Largest `timeout` a command may declare (SPEC default 1 h).
    pub max_timeout: Duration,
    /// Largest argument value in bytes; applies to `default` too (4 KiB).
    pub max_value_bytes: usize,
    /// Largest `max_output_bytes` a command may declare, per stream
    /// (64 MiB): it bounds the memory one job may hold.
    pub max_output_bytes: usize,
}

impl Default for ToolLimits {
    /// The limits of the default [`ExecSettings`](super::ExecSettings).
    fn default() -> Self {
        super::ExecSettings::default().tool_limits()
    }
}

/// One problem in one tool file: printed as `file: field: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is in.
    pub file: PathBuf,
    /// Where in the file: `commands[0].args[1].pattern`, or `syntax`/`file`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.file.display(),
            self.field,
            self.message
        )
    }
}

/// The two file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `*.json`, as the Go SDK writes it.
    Json,
    /// `*.toml`, same fields.
    Toml,
}

impl Format {
    /// The format a file name's extension selects, if any.
    pub fn from_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "json" => Some(Format::Json),
            "toml" => Some(Format::Toml),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Raw shapes (serde input)

/// A tool file as written.
#[derive(Debug, Deserialize)]
pub struct ToolRaw {
    #[serde(default)]
    name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    version: String,
    #[serde(default, deserialize_with = "null_as_default")]
    tsnet_host: String,
    #[serde(default, deserialize_with = "null_as_default")]
    commands: Vec<CommandRaw>,
}

/// A command as written.
#[derive(Debug, Deserialize)]
pub struct CommandRaw {
    #[serde(default)]
    name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    description: String,
    #[serde(default, deserialize_with = "null_as_default")]
    acl_cap: String,
    #[serde(default, deserialize_with = "null_as_default")]
    exec_parts: Vec<String>,
    #[serde(default)]
    timeout: Option<TimeoutRaw>,
    #[serde(default, deserialize_with = "null_as_default")]
    args: Vec<ArgRaw>,
    #[serde(default, deserialize_with = "null_as_default")]
    env: BTreeMap<String, String>,
    #[serde(default)]
    workdir: Option<String>,
    #[serde(default)]
    max_output_bytes: Option<i64>,
}

/// A timeout as written: Go's integer nanoseconds or a duration string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TimeoutRaw {
    Nanos(i64),
    Text(String),
}

/// An argument declaration as written.
#[derive(Debug, Deserialize)]
pub struct ArgRaw {
    #[serde(default)]
    name: String,
    #[serde(default, rename = "type", deserialize_with = "null_as_default")]
    kind: String,
    #[serde(default)]
    required: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pattern: String,
    #[serde(default, deserialize_with = "null_as_default")]
    description: String,
    #[serde(default)]
    default: Option<serde_json::Value>,
    #[serde(default)]
    allow_leading_dash: bool,
    #[serde(default)]
    sensitive: bool,
}

/// Go writes a nil slice or map as `null`; read it as empty.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

// ---------------------------------------------------------------------------
// Validated types

/// A validated tool: a named group of commands from one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    /// Unique tool name (`[A-Za-z0-9_.-]+`).
    pub name: String,
    /// The tool's version string, as written.
    pub version: String,
    /// Written by the Go SDK; ignored by the daemon, echoed by `GET /tools`.
    pub tsnet_host: String,
    /// The commands, in file order.
    pub commands: Vec<Arc<Command>>,
    /// The file the tool came from.
    pub source: PathBuf,
}

/// A validated command: everything the runner needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Command name, unique within its tool.
    pub name: String,
    /// Free text for listings.
    pub description: String,
    /// The app capability a caller must hold; `None` when the file has none.
    pub acl_cap: Option<String>,
    /// The argv template as written.
    pub exec_parts: Vec<String>,
    /// `exec_parts` parsed into literal text and placeholders.
    pub(crate) template: Vec<Vec<Segment>>,
    /// The declared timeout; `None` means the daemon default.
    pub timeout: Option<Duration>,
    /// Declared arguments, in file order.
    pub args: Vec<Arg>,
    /// Extension: fixed environment variables for the child.
    pub env: BTreeMap<String, String>,
    /// Extension: working directory of the child (absolute).
    pub workdir: Option<PathBuf>,
    /// Extension: per-stream output cap overriding the daemon's.
    pub max_output_bytes: Option<usize>,
}

/// One piece of an argv element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// Text copied as is.
    Literal(String),
    /// The value of the argument at this index of [`Command::args`].
    Arg(usize),
}

/// The value types an argument can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArgType {
    /// Any string (the default when `type` is empty).
    String,
    /// A signed 64-bit integer.
    Int,
    /// `true` or `false`.
    Bool,
}

impl ArgType {
    /// The name used in tool files.
    pub fn as_str(self) -> &'static str {
        match self {
            ArgType::String => "string",
            ArgType::Int => "int",
            ArgType::Bool => "bool",
        }
    }
}

/// A validated argument declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    /// Name used in `{{.name}}` placeholders and request bodies.
    pub name: String,
    /// Value type.
    pub kind: ArgType,
    /// Whether callers must supply it.
    pub required: bool,
    /// Whole-value pattern, Go semantics.
    pub pattern: Option<ArgPattern>,
    /// Free text for listings.
    pub description: String,
    /// Extension: the value used when the caller supplies none, already
    /// validated and in its canonical text form.
    pub default: Option<String>,
    /// Extension: accept values starting with `-`.
    pub allow_leading_dash: bool,
    /// Extension: redact the value in logs and audit records.
    pub sensitive: bool,
}

impl Command {
    /// The declared argument named `name`.
    pub fn arg(&self, name: &str) -> Option<&Arg> {
        self.args.iter().find(|a| a.name == name)
    }

    /// Whether `exec_parts` uses the argument at `index`.
    pub(crate) fn uses_arg(&self, index: usize) -> bool {
        self.template
            .iter()
            .flatten()
            .any(|s| *s == Segment::Arg(index))
    }
}

impl Tool {
    /// The command named `name`.
    pub fn command(&self, name: &str) -> Option<&Arc<Command>> {
        self.commands.iter().find(|c| c.name == name)
    }
}

// ---------------------------------------------------------------------------
// The wire shape (`GET /tools`): the Go SDK's JSON, timeout in nanoseconds.

/// A tool as `GET /tools` returns it: the Go SDK's `tailkit.Tool`.
#[derive(Debug, Serialize)]
pub struct ToolWire<'a> {
    name: &'a str,
    version: &'a str,
    tsnet_host: &'a str,
    commands: Vec<CommandWire<'a>>,
}

#[derive(Debug, Serialize)]
struct CommandWire<'a> {
    name: &'a str,
    description: &'a str,
    acl_cap: &'a str,
    exec_parts: &'a [String],
    timeout: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    args: Vec<ArgWire<'a>>,
}

#[derive(Debug, Serialize)]
struct ArgWire<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    required: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    pattern: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    default: Option<&'a str>,
}

impl Tool {
    /// The Go SDK's JSON shape of this tool with only the commands `keep`
    /// accepts; `None` when it keeps none. Sensitive defaults are left out.
    pub fn to_wire(&self, keep: impl Fn(&Command) -> bool) -> Option<ToolWire<'_>> {
        let commands: Vec<CommandWire<'_>> = self
            .commands
            .iter()
            .filter(|c| keep(c))
            .map(|c| CommandWire {
                name: &c.name,
                description: &c.description,
                acl_cap: c.acl_cap.as_deref().unwrap_or(""),
                exec_parts: &c.exec_parts,
                timeout: c.timeout.map_or(0, |t| t.as_nanos() as u64),
                args: c
                    .args
                    .iter()
                    .map(|a| ArgWire {
                        name: &a.name,
                        kind: a.kind.as_str(),
                        required: a.required,
                        pattern: a.pattern.as_ref().map_or("", |p| p.as_str()),
                        description: &a.description,
                        default: a.default.as_deref().filter(|_| !a.sensitive),
                    })
                    .collect(),
            })
            .collect();
        if commands.is_empty() {
            return None;
        }
        Some(ToolWire {
            name: &self.name,
            version: &self.version,
            tsnet_host: &self.tsnet_host,
            commands,
        })
    }
}

// ---------------------------------------------------------------------------
// Parsing and validation

/// Whether `name` is a valid tool, command or argument name.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Parses and validates the text of one tool file. `source` only names the
/// file in problems and in [`Tool::source`].
///
/// # Errors
///
/// Every problem found, each naming `source` and the field.
pub fn parse_str(
    text: &str,
    format: Format,
    source: &Path,
    limits: &ToolLimits,
) -> Result<Tool, Vec<Problem>> {
    let raw: Result<ToolRaw, String> = match format {
        Format::Json => serde_json::from_str(text).map_err(|e| e.to_string()),
        Format::Toml => toml::from_str(text).map_err(|e| e.message().to_string()),
    };
    let raw = raw.map_err(|message| {
        vec![Problem {
            file: source.to_path_buf(),
            field: "syntax".into(),
            message,
        }]
    })?;
    let mut v = Validator {
        file: source,
        limits,
        problems: Vec::new(),
    };
    let tool = v.tool(raw);
    if v.problems.is_empty() {
        Ok(tool)
    } else {
        Err(v.problems)
    }
}

/// Reads and validates one tool file (following symlinks).
///
/// # Errors
///
/// When the file cannot be read, has an extension other than `.json` or
/// `.toml`, or has validation problems.
pub fn load_file(path: &Path, limits: &ToolLimits) -> Result<Tool, Vec<Problem>> {
    let problem = |field: &str, message: String| {
        vec![Problem {
            file: path.to_path_buf(),
            field: field.into(),
            message,
        }]
    };
    let Some(format) = Format::from_path(path) else {
        return Err(problem("file", "not a .json or .toml tool file".into()));
    };
    let text = std::fs::read_to_string(path).map_err(|e| problem("file", e.to_string()))?;
    parse_str(&text, format, path, limits)
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

/// Loads every `*.json` / `*.toml` file of `dir` whose name does not start
/// with `.`, following symlinks (Kubernetes ConfigMap mounts). A missing
/// directory loads as empty without a problem; the caller decides whether
/// that matters.
pub fn load_dir(dir: &Path, limits: &ToolLimits) -> LoadedDir {
    let mut loaded = LoadedDir::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return loaded,
        Err(e) => {
            loaded.problems.push(Problem {
                file: dir.to_path_buf(),
                field: "directory".into(),
                message: e.to_string(),
            });
            return loaded;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| Format::from_path(p).is_some() && p.is_file())
        .collect();
    files.sort();
    let mut by_name: BTreeMap<String, Tool> = BTreeMap::new();
    for file in files {
        match load_file(&file, limits) {
            Ok(tool) => {
                if let Some(first) = by_name.get(&tool.name) {
                    loaded.problems.push(Problem {
                        file: file.clone(),
                        field: "name".into(),
                        message: format!(
                            "tool {:?} is also declared by {}, which wins; {} is ignored",
                            tool.name,
                            first.source.display(),
                            file.display()
                        ),
                    });
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

struct Validator<'a> {
    file: &'a Path,
    limits: &'a ToolLimits,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn problem(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            field: field.into(),
            message: message.into(),
        });
    }

    fn name(&mut self, field: String, name: &str) {
        if name.is_empty() {
            self.problem(field, "must not be empty");
        } else if !is_valid_name(name) {
            self.problem(
                field,
                format!("{name:?} may only contain A-Z a-z 0-9 _ . -"),
            );
        }
    }

    fn tool(&mut self, raw: ToolRaw) -> Tool {
        self.name("name".into(), &raw.name);
        let mut seen = BTreeSet::new();
        let mut commands = Vec::with_capacity(raw.commands.len());
        for (i, c) in raw.commands.into_iter().enumerate() {
            let field = format!("commands[{i}]");
            if !seen.insert(c.name.clone()) {
                self.problem(
                    format!("{field}.name"),
                    format!("command {:?} is declared twice", c.name),
                );
            }
            commands.push(Arc::new(self.command(&field, c)));
        }
        Tool {
            name: raw.name,
            version: raw.version,
            tsnet_host: raw.tsnet_host,
            commands,
            source: self.file.to_path_buf(),
        }
    }

    fn command(&mut self, field: &str, raw: CommandRaw) -> Command {
        self.name(format!("{field}.name"), &raw.name);
        let mut args = Vec::with_capacity(raw.args.len());
        let mut seen = BTreeSet::new();
        for (k, a) in raw.args.into_iter().enumerate() {
            let afield = format!("{field}.args[{k}]");
            if !seen.insert(a.name.clone()) {
                self.problem(
                    format!("{afield}.name"),
                    format!("argument {:?} is declared twice", a.name),
                );
            }
            args.push(self.arg(&afield, a));
        }
        let template = self.exec_parts(field, &raw.exec_parts, &args);
        let timeout = self.timeout(&format!("{field}.timeout"), raw.timeout);
        for (name, value) in &raw.env {
            self.env_var(&format!("{field}.env.{name}"), name, value);
        }
        let workdir = raw.workdir.filter(|w| !w.is_empty()).map(PathBuf::from);
        if workdir.as_ref().is_some_and(|w| !w.is_absolute()) {
            self.problem(format!("{field}.workdir"), "must be an absolute path");
        }
        let max_output_bytes = match raw.max_output_bytes {
            None => None,
            Some(n) if n <= 0 => {
                self.problem(
                    format!("{field}.max_output_bytes"),
                    format!("must be positive, got {n}"),
                );
                None
            }
            Some(n) => match usize::try_from(n) {
                Ok(n) if n <= self.limits.max_output_bytes => Some(n),
                _ => {
                    self.problem(
                        format!("{field}.max_output_bytes"),
                        format!(
                            "{n} is over the maximum of {}",
                            self.limits.max_output_bytes
                        ),
                    );
                    None
                }
            },
        };
        Command {
            name: raw.name,
            description: raw.description,
            acl_cap: Some(raw.acl_cap).filter(|c| !c.is_empty()),
            exec_parts: raw.exec_parts,
            template,
            timeout,
            args,
            env: raw.env,
            workdir,
            max_output_bytes,
        }
    }

    fn arg(&mut self, field: &str, raw: ArgRaw) -> Arg {
        self.name(format!("{field}.name"), &raw.name);
        let kind = match raw.kind.as_str() {
            "" | "string" => ArgType::String,
            "int" => ArgType::Int,
            "bool" => ArgType::Bool,
            other => {
                self.problem(
                    format!("{field}.type"),
                    format!("{other:?} is not one of string, int, bool"),
                );
                ArgType::String
            }
        };
        let pattern = if raw.pattern.is_empty() {
            None
        } else {
            match ArgPattern::new(&raw.pattern) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.problem(format!("{field}.pattern"), format!("does not compile: {e}"));
                    None
                }
            }
        };
        let mut arg = Arg {
            name: raw.name,
            kind,
            required: raw.required,
            pattern,
            description: raw.description,
            default: None,
            allow_leading_dash: raw.allow_leading_dash,
            sensitive: raw.sensitive,
        };
        if let Some(value) = raw.default {
            match super::runner::check_value(&arg, &value, self.limits.max_value_bytes) {
                Ok(text) => arg.default = Some(text),
                Err(e) => self.problem(format!("{field}.default"), e.to_string()),
            }
        }
        arg
    }

    fn exec_parts(&mut self, field: &str, parts: &[String], args: &[Arg]) -> Vec<Vec<Segment>> {
        let field = format!("{field}.exec_parts");
        let Some(program) = parts.first() else {
            self.problem(field, "must not be empty");
            return Vec::new();
        };
        if program.is_empty() {
            self.problem(format!("{field}[0]"), "the program must not be empty");
        } else if program.contains("{{") {
            self.problem(
                format!("{field}[0]"),
                "the program must be fixed text, not a placeholder",
            );
        } else if program.contains('/') && !program.starts_with('/') {
            self.problem(
                format!("{field}[0]"),
                "the program must be an absolute path or a bare name looked up on PATH",
            );
        }
        let mut template = Vec::with_capacity(parts.len());
        for (j, part) in parts.iter().enumerate() {
            match parse_template(part, args) {
                Ok(segments) => template.push(segments),
                Err(message) => {
                    self.problem(format!("{field}[{j}]"), message);
                    template.push(Vec::new());
                }
            }
        }
        template
    }

    fn timeout(&mut self, field: &str, raw: Option<TimeoutRaw>) -> Option<Duration> {
        let timeout = match raw? {
            TimeoutRaw::Nanos(n) if n < 0 => {
                self.problem(field, format!("must not be negative, got {n}"));
                return None;
            }
            TimeoutRaw::Nanos(n) => Duration::from_nanos(n as u64),
            TimeoutRaw::Text(s) => match parse_go_duration(&s) {
                Ok(d) => d,
                Err(e) => {
                    self.problem(field, e.to_string());
                    return None;
                }
            },
        };
        if timeout > self.limits.max_timeout {
            self.problem(
                field,
                format!(
                    "{} is over the maximum of {}",
                    format_go_duration(timeout),
                    format_go_duration(self.limits.max_timeout)
                ),
            );
            return None;
        }
        Some(timeout).filter(|t| !t.is_zero())
    }

    fn env_var(&mut self, field: &str, name: &str, value: &str) {
        let valid = !name.is_empty()
            && !name.as_bytes()[0].is_ascii_digit()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            self.problem(field, "not a valid environment variable name");
        } else if name == "PATH" || name.starts_with("TAILKIT_") {
            self.problem(field, "PATH and TAILKIT_* are set by the daemon");
        } else if value.contains('\0') {
            self.problem(field, "the value contains a NUL byte");
        }
    }
}

/// Parses one `exec_parts` element into literal text and `{{.name}}`
/// placeholders (spaces inside the braces allowed).
fn parse_template(part: &str, args: &[Arg]) -> Result<Vec<Segment>, String> {
    let mut segments = Vec::new();
    let mut rest = part;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            segments.push(Segment::Literal(rest[..start].to_string()));
        }
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(format!("unclosed {{{{ in {part:?}"));
        };
        let inner = after[..end].trim_matches(|c: char| c == ' ' || c == '\t');
        let name = inner
            .strip_prefix('.')
            .filter(|n| is_valid_name(n))
            .ok_or_else(|| {
                format!(
                    "{{{{{}}}}} is not a placeholder: only {{{{.name}}}} is supported",
                    &after[..end]
                )
            })?;
        let index = args
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| format!("placeholder {{{{.{name}}}}} names no declared argument"))?;
        segments.push(Segment::Arg(index));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() || segments.is_empty() {
        segments.push(Segment::Literal(rest.to_string()));
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GO_SDK_JSON: &str = r#"{
      "name": "docker-ops",
      "version": "1.2.0",
      "tsnet_host": "ignored by the daemon",
      "commands": [{
        "name": "restart",
        "description": "Restart one container",
        "acl_cap": "example.com/cap/docker-ops",
        "exec_parts": ["/usr/bin/docker", "restart", "{{.container}}"],
        "timeout": 30000000000,
        "args": [{"name": "container", "type": "string", "required": true,
                  "pattern": "^[a-zA-Z0-9_-]+$"}]
      }, {
        "name": "ps",
        "description": "",
        "acl_cap": "",
        "exec_parts": ["docker", "ps"],
        "timeout": 0
      }]
    }"#;

    fn parse_json(text: &str) -> Result<Tool, Vec<Problem>> {
        parse_str(
            text,
            Format::Json,
            Path::new("t.json"),
            &ToolLimits::default(),
        )
    }

    fn problems_of(text: &str) -> Vec<String> {
        parse_json(text)
            .unwrap_err()
            .into_iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect()
    }

    fn one_command(command: &str) -> String {
        format!(r#"{{"name": "t", "commands": [{command}]}}"#)
    }

    #[test]
    fn go_sdk_json_loads() {
        let tool = parse_json(GO_SDK_JSON).unwrap();
        assert_eq!(tool.name, "docker-ops");
        assert_eq!(tool.tsnet_host, "ignored by the daemon");
        let restart = tool.command("restart").unwrap();
        assert_eq!(restart.timeout, Some(Duration::from_secs(30)));
        assert_eq!(
            restart.acl_cap.as_deref(),
            Some("example.com/cap/docker-ops")
        );
        assert_eq!(restart.args[0].kind, ArgType::String);
        assert!(restart.args[0].required);
        let ps = tool.command("ps").unwrap();
        assert_eq!(ps.timeout, None, "zero means the daemon default");
        assert_eq!(ps.acl_cap, None);
    }

    #[test]
    fn go_nulls_and_string_timeouts_load() {
        let tool = parse_json(&one_command(
            r#"{"name": "c", "exec_parts": ["true"], "args": null, "timeout": "1m30s", "env": null}"#,
        ))
        .unwrap();
        assert_eq!(tool.commands[0].timeout, Some(Duration::from_secs(90)));
    }

    #[test]
    fn toml_has_the_same_fields() {
        let text = r#"
            name = "disk"
            version = "1"
            [[commands]]
            name = "usage"
            exec_parts = ["du", "-sh", "--", "{{ .path }}"]
            timeout = "10s"
            acl_cap = "example.com/cap/x"
            [[commands.args]]
            name = "path"
            type = "string"
            pattern = '^/[a-z/]+$'
            default = "/var"
        "#;
        let tool = parse_str(
            text,
            Format::Toml,
            Path::new("d.toml"),
            &ToolLimits::default(),
        )
        .unwrap();
        let c = &tool.commands[0];
        assert_eq!(c.timeout, Some(Duration::from_secs(10)));
        assert_eq!(c.args[0].default.as_deref(), Some("/var"));
        assert_eq!(c.template[3], vec![Segment::Arg(0)]);
    }

    #[test]
    fn wire_shape_is_the_go_sdks() {
        let tool = parse_json(GO_SDK_JSON).unwrap();
        let wire = serde_json::to_value(tool.to_wire(|_| true).unwrap()).unwrap();
        let expected: serde_json::Value = serde_json::from_str(GO_SDK_JSON).unwrap();
        assert_eq!(wire, expected);
        assert!(tool.to_wire(|_| false).is_none());
    }

    #[test]
    fn placeholders_anywhere_in_an_element() {
        let tool = parse_json(&one_command(
            r#"{"name": "c", "exec_parts": ["echo", "--tag={{.tag}}-{{ .n }}!"],
                "args": [{"name": "tag"}, {"name": "n", "type": "int"}]}"#,
        ))
        .unwrap();
        assert_eq!(
            tool.commands[0].template[1],
            vec![
                Segment::Literal("--tag=".into()),
                Segment::Arg(0),
                Segment::Literal("-".into()),
                Segment::Arg(1),
                Segment::Literal("!".into()),
            ]
        );
    }

    #[test]
    fn every_load_time_rule_names_its_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"name": "", "commands": []}"#, "name: must not be empty"),
            (
                r#"{"name": "a b", "commands": []}"#,
                "name: \"a b\" may only",
            ),
            (
                &one_command(r#"{"name": "c/d", "exec_parts": ["true"]}"#),
                "commands[0].name:",
            ),
            (
                &one_command(r#"{"name": "", "exec_parts": ["true"]}"#),
                "commands[0].name: must not be empty",
            ),
            (
                &one_command(r#"{"name": "c", "exec_parts": []}"#),
                "commands[0].exec_parts: must not be empty",
            ),
            (
                &one_command(r#"{"name": "c"}"#),
                "commands[0].exec_parts: must not be empty",
            ),
            (
                &one_command(r#"{"name": "c", "exec_parts": ["echo", "{{.x}}"]}"#),
                "commands[0].exec_parts[1]: placeholder {{.x}} names no declared argument",
            ),
            (
                &one_command(
                    r#"{"name": "c", "exec_parts": ["echo", "{{.x | printf}}"], "args": [{"name": "x"}]}"#,
                ),
                "commands[0].exec_parts[1]: {{.x | printf}} is not a placeholder",
            ),
            (
                &one_command(
                    r#"{"name": "c", "exec_parts": ["echo", "{{if .x}}"], "args": [{"name": "x"}]}"#,
                ),
                "commands[0].exec_parts[1]:",
            ),
            (
                &one_command(
                    r#"{"name": "c", "exec_parts": ["echo", "{{.x"], "args": [{"name": "x"}]}"#,
                ),
                "commands[0].exec_parts[1]: unclosed",
            ),
            (
                &one_command(r#"{"name": "c", "exec_parts": ["{{.x}}"], "args": [{"name": "x"}]}"#),
                "commands[0].exec_parts[0]: the program must be fixed text",
            ),
            (
                &one_command(r#"{"name": "c", "exec_parts": ["bin/x"]}"#),
                "commands[0].exec_parts[0]: the program must be an absolute path",
            ),
            (
                &one_command(
                    r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x", "pattern": "("}]}"#,
                ),
                "commands[0].args[0].pattern: does not compile",
            ),
            (
                &one_command(
                    r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x", "pattern": "a)|(b"}]}"#,
                ),
                "commands[0].args[0].pattern: does not compile",
            ),
            (
                &one_command(
                    r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x", "pattern": "[a-z]+)|(.*"}]}"#,
                ),
                "commands[0].args[0].pattern: does not compile",
            ),
            (
                &one_command(
                    r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x", "type": "float"}]}"#,
                ),
                "commands[0].args[0].type:",
            ),
            (
                &one_command(r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x y"}]}"#),
                "commands[0].args[0].name:",
            ),
            (
                &one_command(
                    r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x"}, {"name": "x"}]}"#,
                ),
                "commands[0].args[1].name: argument \"x\" is declared twice",
            ),
            (
                &one_command(
                    r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x", "type": "int", "default": "abc"}]}"#,
                ),
                "commands[0].args[0].default:",
            ),
            (
                &one_command(
                    r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x", "pattern": "^[a-z]+$", "default": "ABC"}]}"#,
                ),
                "commands[0].args[0].default:",
            ),
            (
                &one_command(r#"{"name": "c", "exec_parts": ["true"], "timeout": -1}"#),
                "commands[0].timeout: must not be negative",
            ),
            (
                &one_command(r#"{"name": "c", "exec_parts": ["true"], "timeout": "-5s"}"#),
                "commands[0].timeout: negative duration",
            ),
            (
                &one_command(r#"{"name": "c", "exec_parts": ["true"], "timeout": "2h"}"#),
                "commands[0].timeout: 2h0m0s is over the maximum of 1h0m0s",
            ),
            (
                &one_command(r#"{"name": "c", "exec_parts": ["true"], "timeout": 3600000000001}"#),
                "commands[0].timeout:",
            ),
            (
                &one_command(r#"{"name": "c", "exec_parts": ["true"], "timeout": "soon"}"#),
                "commands[0].timeout: invalid duration",
            ),
            (
                &one_command(r#"{"name": "c", "exec_parts": ["true"], "env": {"PATH": "/tmp"}}"#),
                "commands[0].env.PATH:",
            ),
            (
                &one_command(
                    r#"{"name": "c", "exec_parts": ["true"], "env": {"TAILKIT_JOB_ID": "x"}}"#,
                ),
                "commands[0].env.TAILKIT_JOB_ID:",
            ),
            (
                &one_command(r#"{"name": "c", "exec_parts": ["true"], "env": {"A=B": "x"}}"#),
                "commands[0].env.A=B:",
            ),
            (
                &one_command(r#"{"name": "c", "exec_parts": ["true"], "workdir": "tmp"}"#),
                "commands[0].workdir:",
            ),
            (
                &one_command(r#"{"name": "c", "exec_parts": ["true"], "max_output_bytes": 0}"#),
                "commands[0].max_output_bytes:",
            ),
            (
                &one_command(
                    r#"{"name": "c", "exec_parts": ["true"], "max_output_bytes": 67108865}"#,
                ),
                "commands[0].max_output_bytes: 67108865 is over the maximum of 67108864",
            ),
            (
                &one_command(
                    r#"{"name": "c", "exec_parts": ["true"], "max_output_bytes": 9223372036854775807}"#,
                ),
                "commands[0].max_output_bytes: 9223372036854775807 is over the maximum",
            ),
            (
                r#"{"name": "t", "commands": [{"name": "c", "exec_parts": ["true"]}, {"name": "c", "exec_parts": ["true"]}]}"#,
                "commands[1].name: command \"c\" is declared twice",
            ),
            ("{not json", "syntax:"),
            (r#"{"name": 5}"#, "syntax:"),
        ];
        for (text, expected) in cases {
            let problems = problems_of(text);
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{text}\nexpected a problem starting with {expected:?}, got {problems:?}"
            );
        }
    }

    #[test]
    fn max_output_bytes_is_bounded() {
        let with = |n: u64| {
            parse_json(&one_command(&format!(
                r#"{{"name": "c", "exec_parts": ["true"], "max_output_bytes": {n}}}"#
            )))
        };
        let limit = ToolLimits::default().max_output_bytes;
        assert_eq!(limit, 64 << 20);
        let tool = with(limit as u64).unwrap();
        assert_eq!(tool.commands[0].max_output_bytes, Some(limit));
        assert!(with(limit as u64 + 1).is_err());
        assert!(with(i64::MAX as u64).is_err());
    }

    #[test]
    fn a_directory_loads_valid_files_and_reports_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write(
            "a.json",
            r#"{"name": "dup", "commands": [{"name": "one", "exec_parts": ["true"]}]}"#,
        );
        write(
            "b.toml",
            "name = \"dup\"\n[[commands]]\nname = \"two\"\nexec_parts = [\"true\"]\n",
        );
        write("c.json", r#"{"name": "", "commands": []}"#);
        write("d.json", GO_SDK_JSON);
        write(".hidden.json", "garbage");
        write("notes.txt", "garbage");
        std::fs::create_dir(dir.path().join("sub.json")).unwrap();

        let loaded = load_dir(dir.path(), &ToolLimits::default());
        let names: Vec<_> = loaded.tools.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["docker-ops", "dup"]);
        assert!(
            loaded.tools[1].command("one").is_some(),
            "the first file by name wins"
        );
        assert_eq!(loaded.problems.len(), 2, "{:?}", loaded.problems);
        let dup = loaded
            .problems
            .iter()
            .find(|p| p.field == "name" && p.message.contains("also declared"))
            .unwrap();
        assert!(dup.file.ends_with("b.toml"));
        assert!(dup.message.contains("a.json") && dup.message.contains("b.toml"));
        assert!(loaded.problems.iter().any(|p| p.file.ends_with("c.json")));
        assert!(validate_path(&dir.path().join("d.json")).is_empty());
        assert_eq!(validate_path(&dir.path().join("c.json")).len(), 1);
        assert_eq!(validate_path(&dir.path().join("missing")).len(), 1);
        assert_eq!(
            validate_path(&dir.path().join("notes.txt"))[0].field,
            "file"
        );
    }

    #[test]
    fn problems_print_as_file_field_message() {
        let p = Problem {
            file: "/etc/t.json".into(),
            field: "commands[0].name".into(),
            message: "must not be empty".into(),
        };
        assert_eq!(
            p.to_string(),
            "/etc/t.json: commands[0].name: must not be empty"
        );
    }
}
