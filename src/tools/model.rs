//! The validated tool model the rest of tailkitd works with: [`Tool`],
//! [`Command`], [`Arg`], and the wire shape `GET /tools` answers with (the
//! Go SDK's JSON, timeout in nanoseconds).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::pattern::ArgPattern;
use super::users::RunAs;

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

/// A validated command: everything needed to check a request and run it.
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
    pub(super) template: Vec<Vec<Segment>>,
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
    /// Extension: who it runs as (the command's `user`/`group`, else the
    /// tool's); `None`: the daemon's `command_user`, else the daemon's own.
    pub user: Option<RunAs>,
}

/// One piece of an argv element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
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
    pub(super) fn uses_arg(&self, index: usize) -> bool {
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
