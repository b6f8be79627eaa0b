//! `tailkitd tools TARGET`: `GET /tools` on the node, as a table of the
//! commands the caller may run there with their arguments, or the raw
//! JSON. Read leniently: a Go daemon's list has the same shape.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;

use super::report::printable;
use crate::tools::duration::format_go_duration;

/// A tool as `GET /tools` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct ToolInfo {
    /// Its name.
    #[serde(default)]
    pub name: String,
    /// Its version.
    #[serde(default)]
    pub version: String,
    /// Its commands.
    #[serde(default)]
    pub commands: Option<Vec<CommandInfo>>,
}

/// A command.
#[derive(Debug, Clone, Deserialize)]
pub struct CommandInfo {
    /// Its name.
    #[serde(default)]
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// Timeout in nanoseconds (0: the daemon's default).
    #[serde(default)]
    pub timeout: Option<serde_json::Value>,
    /// Its arguments.
    #[serde(default)]
    pub args: Option<Vec<ArgInfo>>,
}

/// An argument.
#[derive(Debug, Clone, Deserialize)]
pub struct ArgInfo {
    /// Its name.
    #[serde(default)]
    pub name: String,
    /// `string`, `int` or `bool` (empty: string).
    #[serde(default, rename = "type")]
    pub kind: String,
    /// Whether it must be given.
    #[serde(default)]
    pub required: bool,
    /// Its default, when optional (a tailkitd extension).
    #[serde(default)]
    pub default: Option<serde_json::Value>,
}

impl ArgInfo {
    /// `path=STRING`, `[n=INT]`, `[unit=STRING (ssh)]`.
    fn usage(&self) -> String {
        let kind = if self.kind.is_empty() {
            "STRING".to_string()
        } else {
            self.kind.to_uppercase()
        };
        let mut s = format!("{}={kind}", self.name);
        if let Some(d) = &self.default {
            let d = d.as_str().map_or_else(|| d.to_string(), str::to_string);
            let _ = write!(s, " ({d})");
        }
        if self.required { s } else { format!("[{s}]") }
    }
}

/// The table: COMMAND, ARGUMENTS, TIMEOUT, DESCRIPTION; one row per
/// command, sorted by tool then command.
pub fn table(tools: &[ToolInfo]) -> String {
    let mut rows: Vec<[String; 4]> = Vec::new();
    for tool in tools {
        for c in tool.commands.iter().flatten() {
            let args: Vec<String> = c.args.iter().flatten().map(ArgInfo::usage).collect();
            let timeout = match c.timeout.as_ref().and_then(serde_json::Value::as_u64) {
                Some(0) | None => "default".to_string(),
                Some(ns) => format_go_duration(Duration::from_nanos(ns)),
            };
            rows.push([
                printable(&format!("{}/{}", tool.name, c.name)),
                printable(&args.join(" ")),
                timeout,
                printable(c.description.lines().next().unwrap_or("")),
            ]);
        }
    }
    rows.sort();
    let titles = ["COMMAND", "ARGUMENTS", "TIMEOUT", "DESCRIPTION"];
    let widths: Vec<usize> = (0..3)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(titles[i].len())
        })
        .collect();
    let mut out = String::new();
    for row in std::iter::once(titles.map(str::to_string)).chain(rows) {
        let line = format!(
            "{:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_commands_with_their_arguments() {
        let tools: Vec<ToolInfo> = serde_json::from_str(
            r#"[{"name":"disk","version":"1.0.0","commands":[
                  {"name":"usage","description":"Total size","acl_cap":"x",
                   "timeout":30000000000,
                   "args":[{"name":"path","type":"string","required":true,"pattern":"^/"}]},
                  {"name":"free","description":"","timeout":0,"args":null}]},
                {"name":"demo","commands":[
                  {"name":"count","description":"Counts",
                   "args":[{"name":"seconds","type":"int","required":false,"default":"3"},
                           {"name":"loud","type":"bool"}]}]}]"#,
        )
        .unwrap();
        assert_eq!(
            table(&tools),
            "COMMAND     ARGUMENTS                      TIMEOUT  DESCRIPTION\n\
             demo/count  [seconds=INT (3)] [loud=BOOL]  default  Counts\n\
             disk/free                                  default\n\
             disk/usage  path=STRING                    30s      Total size\n"
        );
    }
}
