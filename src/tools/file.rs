//! Tool files: the `*Raw` shapes serde reads (JSON exactly as the Go
//! `tailkit` SDK writes it, or TOML with the same fields), and their
//! validation into the [model](super::model). Every problem is reported with
//! its file and field; a file with any problem is rejected whole, the other
//! files still load. A file over [`MAX_TOOL_FILE_BYTES`] is refused without
//! being read.

mod disk;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::ToolLimits;
use super::args::check_value;
use super::duration::{format_go_duration, parse_go_duration};
use super::model::{Arg, ArgType, Command, Segment, Tool};
use super::pattern::ArgPattern;

pub use disk::{
    FileKey, LoadedDir, MAX_TOOL_FILE_BYTES, RawRead, is_tool_file_name, load_dir, load_file,
    parse_bytes, read_bytes, read_bytes_unless, tool_file_paths, validate_path,
};
pub(crate) use disk::{directory_problem, duplicate_problem};

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
    #[serde(default)]
    user: Option<IdRaw>,
    #[serde(default)]
    group: Option<IdRaw>,
}

/// A user or group as written: a name or a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IdRaw {
    Number(u32),
    Name(String),
}

impl IdRaw {
    fn text(&self) -> String {
        match self {
            IdRaw::Number(n) => n.to_string(),
            IdRaw::Name(s) => s.clone(),
        }
    }
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
    #[serde(default)]
    user: Option<IdRaw>,
    #[serde(default)]
    group: Option<IdRaw>,
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
        Format::Json => serde_json::from_str(text).map_err(|e| json_syntax(&e)),
        Format::Toml => toml::from_str(text).map_err(|e| toml_syntax(text, &e)),
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

/// A JSON syntax problem, its place first as for TOML:
/// `line 4, column 9: expected ...` (serde_json puts it at the end).
fn json_syntax(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if e.line() == 0 {
        return text;
    }
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = text.strip_suffix(&suffix).unwrap_or(&text);
    format!("line {}, column {}: {message}", e.line(), e.column())
}

/// A TOML syntax problem with its place: `line 4, column 9: ...` (the
/// `toml` error carries a byte span; the line and column are counted here,
/// the column in characters, both from 1).
fn toml_syntax(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', "; ");
    match e.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
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
        let tool_user = self.user("", raw.user.as_ref(), raw.group.as_ref());
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
            let mut command = self.command(&field, c);
            command.user = command.user.or_else(|| tool_user.clone());
            commands.push(Arc::new(command));
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
        let user = self.user(&format!("{field}."), raw.user.as_ref(), raw.group.as_ref());
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
            user,
        }
    }

    /// The user of a tool or command (`prefix` names which in problems):
    /// resolved, and (for the daemon) one it can switch to. A `group`
    /// needs a `user`.
    fn user(
        &mut self,
        prefix: &str,
        user: Option<&IdRaw>,
        group: Option<&IdRaw>,
    ) -> Option<super::RunAs> {
        let group = group.map(IdRaw::text);
        let Some(user) = user.map(IdRaw::text) else {
            if group.is_some() {
                self.problem(format!("{prefix}group"), "a group needs a user");
            }
            return None;
        };
        let resolved = super::users::resolve(&user, group.as_deref());
        let field = match &resolved {
            Err(e) if e.contains("group") && group.is_some() => format!("{prefix}group"),
            _ => format!("{prefix}user"),
        };
        let checked = resolved.and_then(|run_as| {
            if self.limits.check_user_switch {
                super::users::check_switch(&run_as)?;
            }
            Ok(run_as)
        });
        match checked {
            Ok(run_as) => Some(run_as),
            Err(e) => {
                self.problem(field, e);
                None
            }
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
            match check_value(&arg, &value, self.limits.max_value_bytes) {
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
mod tests;
