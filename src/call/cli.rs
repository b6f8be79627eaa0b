//! The command lines of `tailkitd call` and `tailkitd tools`: clap's
//! declarations, and [`plan`], which turns the words into a validated
//! [`Plan`] before anything touches the tailnet.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::tools::duration::parse_go_duration;

/// The prefix `--all` stands for: how the Go SDK discovers daemons.
pub const ALL_PREFIX: &str = "tailkitd-";

/// How the client reaches the tailnet (shared by `call` and `tools`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TailnetArgs {
    /// File holding an auth key: join as an ephemeral node of its own,
    /// logged out at exit (env TS_AUTHKEY holds the key itself,
    /// TS_AUTHKEY_FILE names a file) [default: the machine's tailscaled]
    #[arg(long, value_name = "PATH")]
    pub auth_key_file: Option<PathBuf>,
    /// Control server for that node [default: Tailscale's]
    #[arg(long, env = "TAILKITD_CONTROL_URL", value_name = "URL")]
    pub control_url: Option<String>,
    /// Where that node keeps its state [default: a temporary directory,
    /// removed at exit]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    // The doc is the --help text, where <...> is a placeholder, not HTML.
    #[allow(rustdoc::invalid_html_tags)]
    /// That node's host name [default: tkcall-<os hostname>]
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// tailscaled's LocalAPI socket, used without an auth key (env
    /// TS_SOCKET) [default: /var/run/tailscale/tailscaled.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The daemons' port
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
}

/// `tailkitd call`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    override_usage = "tailkitd call [OPTIONS] TARGET... TOOL/COMMAND [NAME=VALUE]...\n       \
                      tailkitd call [OPTIONS] --prefix P | --all | --tag TAG  TOOL/COMMAND [NAME=VALUE]...\n       \
                      tailkitd call [OPTIONS] TARGET --follow JOB_ID | --cancel JOB_ID",
    after_help = "Exit status: the remote exit code; 255 when the command never ran \
                  (refused, unreachable, bad argument); 124 when it timed out; 130 on Ctrl-C \
                  (the remote job is cancelled). Several nodes: 0 only if every node \
                  completed with 0, else 1."
)]
pub struct CallArgs {
    /// TARGET... (host name, MagicDNS name or tailnet IP), then
    /// TOOL/COMMAND, then its arguments as NAME=VALUE
    #[arg(value_name = "WORDS")]
    pub words: Vec<String>,
    /// Every online peer whose host name starts with P
    #[arg(long, value_name = "P", conflicts_with_all = ["all", "tag"])]
    pub prefix: Option<String>,
    /// Every online peer whose host name starts with `tailkitd-`
    #[arg(long, conflicts_with = "tag")]
    pub all: bool,
    /// Every online peer carrying this tag (`tag:` may be left out)
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,
    /// How many nodes run at once
    #[arg(long, default_value_t = 10, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub parallel: u64,
    /// Time limit per node (Go duration: 30s, 2m): the job is cancelled
    /// when it passes, exit 124
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// Print the final job result as JSON (one line per node for several)
    #[arg(long)]
    pub json: bool,
    /// Start the job, print its id and return
    #[arg(long = "async", conflicts_with_all = ["follow", "cancel"])]
    pub detach: bool,
    /// Follow a job started earlier (its output from the start); Ctrl-C
    /// stops following and leaves it running
    #[arg(long, value_name = "JOB_ID", conflicts_with_all = ["cancel", "prefix", "all", "tag"])]
    pub follow: Option<String>,
    /// Cancel a job started earlier
    #[arg(long, value_name = "JOB_ID", conflicts_with_all = ["prefix", "all", "tag"])]
    pub cancel: Option<String>,
    #[command(flatten)]
    pub tailnet: TailnetArgs,
}

/// `tailkitd tools`.
#[derive(Debug, Clone, clap::Args)]
pub struct ToolsArgs {
    /// The node (host name, MagicDNS name or tailnet IP)
    pub target: String,
    /// Print the daemon's raw list as JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tailnet: TailnetArgs,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_go_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than 0".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e} (for example 30s, 2m, 1h30m)")),
    }
}

/// Which nodes a call goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// The TARGETs named on the command line.
    Targets(Vec<String>),
    /// Online peers whose host name starts with this.
    Prefix(String),
    /// Online peers carrying this tag.
    Tag(String),
}

/// A command to run and its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The tool's name.
    pub tool: String,
    /// The command's name.
    pub command: String,
    /// The JSON body: every value a string, as the Go SDK sends them (the
    /// daemon checks and converts `int` and `bool` arguments).
    pub args: Map<String, Value>,
}

impl Request {
    /// `/exec/{tool}/{command}`.
    pub fn path(&self) -> String {
        format!("/exec/{}/{}", self.tool, self.command)
    }
}

/// What to do on each node.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Run and follow it to the end.
    Run(Request),
    /// Start it and print the job id (`--async`).
    Start(Request),
    /// Follow an existing job (`--follow`).
    Follow(String),
    /// Cancel an existing job (`--cancel`).
    Cancel(String),
}

/// A validated `call` command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The nodes.
    pub selection: Selection,
    /// Several nodes (or a selection by prefix or tag): output lines
    /// prefixed with the node's name, a summary, exit 0 or 1.
    pub fleet: bool,
    /// What to do there.
    pub action: Action,
    /// Nodes at once.
    pub parallel: usize,
    /// Time limit per node.
    pub timeout: Option<Duration>,
    /// JSON output.
    pub json: bool,
}

/// A command line that cannot work, said in words for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// Checks `args` and splits its words: TARGETs up to the first word with a
/// `/` (TOOL/COMMAND; a host name, MagicDNS name or IP never has one), then
/// NAME=VALUE arguments.
///
/// # Errors
///
/// A [`UsageError`] naming what is wrong: no TOOL/COMMAND, a bad tool or
/// command name, a word that is not NAME=VALUE, a duplicated NAME, no
/// TARGET (or TARGETs together with `--prefix`/`--all`/`--tag`), a bad job
/// id.
pub fn plan(args: &CallArgs) -> Result<Plan, UsageError> {
    let by_flag = if args.all {
        Some(Selection::Prefix(ALL_PREFIX.to_string()))
    } else if let Some(p) = &args.prefix {
        if p.is_empty() {
            return Err(usage(
                "--prefix must not be empty (use --all for every daemon)",
            ));
        }
        Some(Selection::Prefix(p.clone()))
    } else if let Some(t) = &args.tag {
        if t.is_empty() || t == "tag:" {
            return Err(usage("--tag must name a tag"));
        }
        Some(Selection::Tag(t.clone()))
    } else {
        None
    };
    let job = args.follow.as_ref().or(args.cancel.as_ref());
    let (targets, rest) = match job {
        Some(_) => (&args.words[..], &args.words[args.words.len()..]),
        None => {
            let cut = args
                .words
                .iter()
                .position(|w| w.contains('/'))
                .ok_or_else(|| usage("missing TOOL/COMMAND (for example disk/usage)"))?;
            (&args.words[..cut], &args.words[cut..])
        }
    };
    for t in targets {
        if t.contains('=') {
            return Err(usage(format!(
                "{t:?}: arguments (NAME=VALUE) come after TOOL/COMMAND"
            )));
        }
        if t.is_empty() {
            return Err(usage("an empty TARGET"));
        }
    }
    let selection = match (by_flag, targets.is_empty()) {
        (Some(_), false) => {
            return Err(usage(format!(
                "TARGET {:?} together with --prefix, --all or --tag: give one or the other",
                targets[0]
            )));
        }
        (Some(sel), true) => sel,
        (None, true) => return Err(usage("missing TARGET (or --prefix, --all, --tag)")),
        (None, false) => Selection::Targets(targets.to_vec()),
    };
    let fleet = !matches!(&selection, Selection::Targets(t) if t.len() == 1);
    let action = match (&args.follow, &args.cancel) {
        (Some(id), _) | (_, Some(id)) if fleet => {
            return Err(usage(format!(
                "--follow and --cancel take one TARGET (job {id} lives on one node)"
            )));
        }
        (Some(id), _) => Action::Follow(check_job_id(id)?),
        (_, Some(id)) => Action::Cancel(check_job_id(id)?),
        (None, None) => {
            let request = parse_request(rest)?;
            if args.detach {
                Action::Start(request)
            } else {
                Action::Run(request)
            }
        }
    };
    Ok(Plan {
        selection,
        fleet,
        action,
        parallel: usize::try_from(args.parallel).unwrap_or(usize::MAX),
        timeout: args.timeout,
        json: args.json,
    })
}

/// `TOOL/COMMAND NAME=VALUE...` into a [`Request`].
fn parse_request(words: &[String]) -> Result<Request, UsageError> {
    let Some((first, args)) = words.split_first() else {
        return Err(usage("missing TOOL/COMMAND (for example disk/usage)"));
    };
    let (tool, command) = first
        .split_once('/')
        .ok_or_else(|| usage(format!("{first:?} is not TOOL/COMMAND")))?;
    for (what, name) in [("tool", tool), ("command", command)] {
        if !is_name(name) {
            return Err(usage(format!(
                "{first:?}: the {what} name must be letters, digits, '_', '.' or '-'"
            )));
        }
    }
    let mut body = Map::new();
    for word in args {
        let (name, value) = word.split_once('=').ok_or_else(|| {
            usage(format!(
                "{word:?} is not NAME=VALUE (arguments come after TOOL/COMMAND)"
            ))
        })?;
        if name.is_empty() {
            return Err(usage(format!("{word:?}: the argument name is empty")));
        }
        if name.chars().any(char::is_control) {
            return Err(usage(format!("{word:?}: a control character in the name")));
        }
        if body
            .insert(name.to_string(), Value::String(value.to_string()))
            .is_some()
        {
            return Err(usage(format!("argument {name:?} given twice")));
        }
    }
    Ok(Request {
        tool: tool.to_string(),
        command: command.to_string(),
        args: body,
    })
}

/// Tool, command and job names as the daemon allows them.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether `id` can be a job id: the daemon's are UUIDs; anything that is
/// one path segment of safe characters is taken (a Go daemon's too). Ids a
/// daemon sends are checked the same way before they go into a path.
pub fn is_job_id(id: &str) -> bool {
    is_name(id) && id != "." && id != ".." && id.len() <= 128
}

fn check_job_id(id: &str) -> Result<String, UsageError> {
    if is_job_id(id) {
        Ok(id.to_string())
    } else {
        Err(usage(format!("{id:?} is not a job id")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        call: CallArgs,
    }

    fn parse(line: &[&str]) -> Result<Plan, String> {
        let cli = Cli::try_parse_from(std::iter::once("call").chain(line.iter().copied()))
            .map_err(|e| e.to_string())?;
        plan(&cli.call).map_err(|e| e.0)
    }

    fn request(tool: &str, command: &str, args: &[(&str, &str)]) -> Request {
        Request {
            tool: tool.into(),
            command: command.into(),
            args: args
                .iter()
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect(),
        }
    }

    #[test]
    fn one_target_a_command_and_string_arguments() {
        let p = parse(&["tk", "disk/usage", "path=/etc", "n=3", "x=a=b", "e="]).unwrap();
        assert_eq!(p.selection, Selection::Targets(vec!["tk".into()]));
        assert!(!p.fleet);
        assert_eq!(
            p.action,
            Action::Run(request(
                "disk",
                "usage",
                &[("path", "/etc"), ("n", "3"), ("x", "a=b"), ("e", "")]
            ))
        );
        assert_eq!(p.parallel, 10);
        assert_eq!(p.timeout, None);
        // Options anywhere.
        let p = parse(&["tk", "t/c", "--json", "--timeout", "1m30s"]).unwrap();
        assert!(p.json);
        assert_eq!(p.timeout, Some(Duration::from_secs(90)));
    }

    #[test]
    fn several_targets_or_a_selection_make_a_fleet() {
        let p = parse(&["a", "100.64.0.3", "b.ts.net", "t/c"]).unwrap();
        assert!(p.fleet);
        assert_eq!(
            p.selection,
            Selection::Targets(vec!["a".into(), "100.64.0.3".into(), "b.ts.net".into()])
        );
        let p = parse(&["--all", "t/c", "--parallel", "3"]).unwrap();
        assert_eq!(p.selection, Selection::Prefix("tailkitd-".into()));
        assert!(p.fleet);
        assert_eq!(p.parallel, 3);
        let p = parse(&["--prefix", "web-", "t/c"]).unwrap();
        assert_eq!(p.selection, Selection::Prefix("web-".into()));
        let p = parse(&["--tag", "tag:prod", "t/c"]).unwrap();
        assert_eq!(p.selection, Selection::Tag("tag:prod".into()));
        assert!(p.fleet);
    }

    #[test]
    fn async_follow_and_cancel() {
        let p = parse(&["tk", "t/c", "--async"]).unwrap();
        assert_eq!(p.action, Action::Start(request("t", "c", &[])));
        let p = parse(&["tk", "--follow", "3bd7-aa"]).unwrap();
        assert_eq!(p.action, Action::Follow("3bd7-aa".into()));
        let p = parse(&["tk", "--cancel", "3bd7-aa"]).unwrap();
        assert_eq!(p.action, Action::Cancel("3bd7-aa".into()));
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        for (line, want) in [
            (&["tk"][..], "missing TOOL/COMMAND"),
            (&["t/c"][..], "missing TARGET"),
            (&["tk", "t/c", "novalue"][..], "is not NAME=VALUE"),
            (&["tk", "t/c", "=v"][..], "the argument name is empty"),
            (
                &["tk", "t/c", "a=1", "a=2"][..],
                "argument \"a\" given twice",
            ),
            (&["tk", "a=1", "t/c"][..], "come after TOOL/COMMAND"),
            (&["tk", "t/c/x"][..], "the command name must be"),
            (&["tk", "/c"][..], "the tool name must be"),
            (&["tk", "--all", "t/c"][..], "together with --prefix"),
            (&["--prefix", "", "t/c"][..], "--prefix must not be empty"),
            (&["tk", "--follow", "../x"][..], "is not a job id"),
            (&["a", "b", "--cancel", "j"][..], "take one TARGET"),
            (&["tk", "t/c", "--timeout", "0s"][..], "must be more than 0"),
            (&["tk", "t/c", "--timeout", "10"][..], "for example 30s"),
            (&["tk", "t/c", "--parallel", "0"][..], "--parallel"),
            (&["--all", "--tag", "x", "t/c"][..], "cannot be used with"),
            (
                &["tk", "t/c", "--async", "--follow", "j"][..],
                "cannot be used with",
            ),
        ] {
            let err = parse(line).unwrap_err();
            assert!(err.contains(want), "{line:?}: {err}");
        }
    }
}
