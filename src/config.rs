//! Daemon settings: command-line flags, then the environment (`TAILKITD_*`,
//! `TS_AUTHKEY`, `TS_AUTHKEY_FILE`), then the TOML config file, then the
//! defaults of SPEC §6, merged once into a validated [`Settings`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::BoolishValueParser;
use serde::Deserialize;

/// Where the config file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tailkitd/tailkitd.toml";
/// Default state directory (tsnet state and the audit log).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tailkitd";
/// Default tools directory.
pub const DEFAULT_TOOLS_DIR: &str = "/etc/tailkitd/tools";
/// Default number of jobs running at once.
pub const DEFAULT_MAX_JOBS: usize = 16;
/// Default tailnet port the API is served on.
pub const DEFAULT_PORT: u16 = 80;
/// Default time running jobs get to finish at shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default time between heartbeats on a live job stream.
pub const DEFAULT_STREAM_HEARTBEAT: Duration = Duration::from_secs(15);
/// Default number of live job streams one peer may have open.
pub const DEFAULT_MAX_STREAMS_PER_PEER: usize = 16;

/// Flags of `tailkitd run`. Every value is optional here: an absent flag
/// falls back to its environment variable (clap reads those), then to the
/// config file, then to the default.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct RunArgs {
    // The doc is the --help text, where <...> is a placeholder, not HTML.
    #[allow(rustdoc::invalid_html_tags)]
    /// Tailnet host name of this node [default: tailkitd-<os hostname>]
    #[arg(long, env = "TAILKITD_HOSTNAME")]
    pub hostname: Option<String>,

    /// Directory for the node's tailnet state and the audit log [default: /var/lib/tailkitd]
    #[arg(long, env = "TAILKITD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Directory of tool files (*.json, *.toml), watched for changes [default: /etc/tailkitd/tools]
    #[arg(long, env = "TAILKITD_TOOLS_DIR")]
    pub tools_dir: Option<PathBuf>,

    /// Control server URL, e.g. a headscale server [default: Tailscale's]
    #[arg(long, env = "TAILKITD_CONTROL_URL")]
    pub control_url: Option<String>,

    /// File holding the auth key (env TS_AUTHKEY_FILE; env TS_AUTHKEY holds the key itself) [default: none]
    #[arg(long)]
    pub auth_key_file: Option<PathBuf>,

    /// Ephemeral node: removed from the tailnet when it goes offline [default: false]
    #[arg(long, env = "TAILKITD_EPHEMERAL", value_parser = BoolishValueParser::new(),
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ephemeral: Option<bool>,

    /// Tailnet port the HTTP API is served on [default: 80]
    #[arg(long, env = "TAILKITD_PORT")]
    pub port: Option<u16>,

    // The doc is the --help text, where <...> is a placeholder, not HTML.
    #[allow(rustdoc::invalid_html_tags)]
    /// Audit log file, `-` for stdout [default: <state dir>/audit.jsonl]
    #[arg(long, env = "TAILKITD_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,

    /// Refuse commands that declare no acl_cap [default: false]
    #[arg(long, env = "TAILKITD_REQUIRE_CAP", value_parser = BoolishValueParser::new(),
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub require_cap: Option<bool>,

    /// Jobs allowed to run at once; more get 429 [default: 16]
    #[arg(long, env = "TAILKITD_MAX_JOBS")]
    pub max_jobs: Option<usize>,

    /// Log format on stderr: text or json [default: text]
    #[arg(long, env = "TAILKITD_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Let tsnet upload its logs to Tailscale's log service [default: false]
    #[arg(long, env = "TAILKITD_UPLOAD_LOGS", value_parser = BoolishValueParser::new(),
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub upload_logs: Option<bool>,

    /// On SIGTERM/SIGINT, how long running jobs may finish before they are cancelled (Go duration) [default: 10s]
    #[arg(long, env = "TAILKITD_SHUTDOWN_GRACE", value_parser = parse_duration)]
    pub shutdown_grace: Option<Duration>,

    /// Run commands as this user (USER or USER:GROUP, names or numbers) unless their tool says [default: the daemon's own user]
    #[arg(long, env = "TAILKITD_COMMAND_USER")]
    pub command_user: Option<String>,

    /// Job cgroups: auto (under the daemon's own cgroup v2, if writable), off, or a cgroup v2 directory [default: auto]
    #[arg(long, env = "TAILKITD_CGROUP")]
    pub cgroup: Option<String>,

    /// Time between heartbeat comments on a live job stream (Go duration) [default: 15s]
    #[arg(long, env = "TAILKITD_STREAM_HEARTBEAT", value_parser = parse_duration)]
    pub stream_heartbeat: Option<Duration>,

    /// Live job streams (?stream=true) one peer may have open at once; more get 429 [default: 16]
    #[arg(long, env = "TAILKITD_MAX_STREAMS_PER_PEER")]
    pub max_streams_per_peer: Option<usize>,

    /// TOML config file [default: /etc/tailkitd/tailkitd.toml if present]
    #[arg(long, env = "TAILKITD_CONFIG")]
    pub config: Option<PathBuf>,

    /// Not a flag: the auth key (or its absence) handed over by the process
    /// this one was re-executed from (see `startup`); when set, no other key
    /// source is read.
    #[arg(skip)]
    pub handed_over_key: Option<Option<Secret>>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The TOML config file: the same settings as the flags, minus `config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    hostname: Option<String>,
    state_dir: Option<PathBuf>,
    tools_dir: Option<PathBuf>,
    control_url: Option<String>,
    auth_key_file: Option<PathBuf>,
    ephemeral: Option<bool>,
    port: Option<u16>,
    audit_log: Option<PathBuf>,
    require_cap: Option<bool>,
    max_jobs: Option<usize>,
    log_format: Option<LogFormat>,
    upload_logs: Option<bool>,
    shutdown_grace: Option<String>,
    command_user: Option<String>,
    cgroup: Option<String>,
    stream_heartbeat: Option<String>,
    max_streams_per_peer: Option<usize>,
}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    /// The secret itself, for handing to tsnet.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The daemon's validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Tailnet host name (`[a-z0-9-]`, 1 to 63 characters).
    pub hostname: String,
    /// tsnet state directory.
    pub state_dir: PathBuf,
    /// Tool files directory.
    pub tools_dir: PathBuf,
    /// Control server URL; `None` means Tailscale's.
    pub control_url: Option<String>,
    /// Auth key, from `TS_AUTHKEY` or a key file.
    pub auth_key: Option<Secret>,
    /// Whether the node is ephemeral.
    pub ephemeral: bool,
    /// Tailnet port of the API.
    pub port: u16,
    /// Audit log path (`-` for stdout).
    pub audit_log: PathBuf,
    /// Whether commands without `acl_cap` are refused.
    pub require_cap: bool,
    /// Jobs running at once.
    pub max_jobs: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// Whether tsnet may upload logs to Tailscale.
    pub upload_logs: bool,
    /// How long running jobs may finish after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Who commands run as unless their tool file says.
    pub command_user: Option<crate::tools::RunAs>,
    /// Where job cgroups go.
    pub cgroup: crate::run::CgroupSetting,
    /// Time between heartbeats on a live job stream.
    pub stream_heartbeat: Duration,
    /// Live job streams one peer may have open at once.
    pub max_streams_per_peer: usize,
    /// The config file that was read, if any.
    pub config_file: Option<PathBuf>,
}

/// A setting that could not be used; the message names it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown keys or wrong types.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message (names the key).
        message: String,
    },
    /// A setting has an unusable value.
    #[error("{setting}: {message}")]
    Invalid {
        /// The setting's flag name.
        setting: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

impl Settings {
    /// Merges flags (which already carry their environment fallbacks),
    /// `TS_AUTHKEY`/`TS_AUTHKEY_FILE` from `env`, the config file and the
    /// defaults. `os_hostname` feeds the default host name.
    ///
    /// # Errors
    ///
    /// When an explicitly named config file is missing, the file is not
    /// valid, the auth key file cannot be read or is empty, or a value is out
    /// of range (host name, port 0, max jobs 0).
    pub fn resolve(
        args: RunArgs,
        env: impl Fn(&str) -> Option<String>,
        os_hostname: &str,
    ) -> Result<Settings, ConfigError> {
        let (file, config_file) = read_config(args.config.as_deref())?;

        let hostname = match args.hostname.or(file.hostname) {
            Some(h) => check_hostname(&h)?,
            None => default_hostname(os_hostname),
        };
        let state_dir = args
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let tools_dir = args
            .tools_dir
            .or(file.tools_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_TOOLS_DIR));
        let control_url = args
            .control_url
            .or(file.control_url)
            .filter(|u| !u.is_empty());
        if let Some(url) = &control_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid {
                setting: "--control-url",
                message: format!("{url:?} is not an http:// or https:// URL"),
            });
        }

        // Handed over by a re-exec (which read the sources below), else the
        // flag, then the key itself in TS_AUTHKEY, then TS_AUTHKEY_FILE,
        // then the config file.
        let auth_key = if let Some(key) = args.handed_over_key {
            key
        } else if let Some(path) = args.auth_key_file {
            Some(read_key_file(&path)?)
        } else if let Some(key) = env("TS_AUTHKEY").filter(|k| !k.trim().is_empty()) {
            Some(Secret(key.trim().to_string()))
        } else if let Some(path) = env("TS_AUTHKEY_FILE").filter(|p| !p.is_empty()) {
            Some(read_key_file(Path::new(&path))?)
        } else if let Some(path) = file.auth_key_file {
            Some(read_key_file(&path)?)
        } else {
            None
        };

        let port = args.port.or(file.port).unwrap_or(DEFAULT_PORT);
        if port == 0 {
            return Err(ConfigError::Invalid {
                setting: "--port",
                message: "must be between 1 and 65535".into(),
            });
        }
        let max_jobs = args.max_jobs.or(file.max_jobs).unwrap_or(DEFAULT_MAX_JOBS);
        if max_jobs == 0 {
            return Err(ConfigError::Invalid {
                setting: "--max-jobs",
                message: "must be at least 1".into(),
            });
        }
        let shutdown_grace = match (args.shutdown_grace, file.shutdown_grace) {
            (Some(d), _) => d,
            (None, Some(text)) => {
                parse_duration(&text).map_err(|message| ConfigError::Invalid {
                    setting: "--shutdown-grace",
                    message,
                })?
            }
            (None, None) => DEFAULT_SHUTDOWN_GRACE,
        };
        let command_user = match args.command_user.or(file.command_user) {
            Some(spec) => Some(
                crate::tools::users::parse_user_spec(&spec)
                    .and_then(|u| crate::tools::users::check_switch(&u).map(|()| u))
                    .map_err(|message| ConfigError::Invalid {
                        setting: "--command-user",
                        message,
                    })?,
            ),
            None => None,
        };
        let cgroup = match args.cgroup.or(file.cgroup) {
            Some(text) => parse_cgroup(&text).map_err(|message| ConfigError::Invalid {
                setting: "--cgroup",
                message,
            })?,
            None => crate::run::CgroupSetting::Auto,
        };
        let stream_heartbeat = match (args.stream_heartbeat, file.stream_heartbeat) {
            (Some(d), _) => d,
            (None, Some(text)) => {
                parse_duration(&text).map_err(|message| ConfigError::Invalid {
                    setting: "--stream-heartbeat",
                    message,
                })?
            }
            (None, None) => DEFAULT_STREAM_HEARTBEAT,
        };
        if stream_heartbeat.is_zero() {
            return Err(ConfigError::Invalid {
                setting: "--stream-heartbeat",
                message: "must be more than 0".into(),
            });
        }
        let max_streams_per_peer = args
            .max_streams_per_peer
            .or(file.max_streams_per_peer)
            .unwrap_or(DEFAULT_MAX_STREAMS_PER_PEER);
        if max_streams_per_peer == 0 {
            return Err(ConfigError::Invalid {
                setting: "--max-streams-per-peer",
                message: "must be at least 1".into(),
            });
        }
        let audit_log = args
            .audit_log
            .or(file.audit_log)
            .unwrap_or_else(|| state_dir.join("audit.jsonl"));

        Ok(Settings {
            hostname,
            state_dir,
            tools_dir,
            control_url,
            auth_key,
            ephemeral: args.ephemeral.or(file.ephemeral).unwrap_or(false),
            port,
            audit_log,
            require_cap: args.require_cap.or(file.require_cap).unwrap_or(false),
            max_jobs,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            upload_logs: args.upload_logs.or(file.upload_logs).unwrap_or(false),
            shutdown_grace,
            command_user,
            cgroup,
            stream_heartbeat,
            max_streams_per_peer,
            config_file,
        })
    }
}

/// `auto`, `off`, or a cgroup v2 directory this process may write.
fn parse_cgroup(text: &str) -> Result<crate::run::CgroupSetting, String> {
    let setting = crate::run::CgroupSetting::parse(text)?;
    if let crate::run::CgroupSetting::Path(dir) = &setting {
        crate::run::supervisor::check_cgroup_dir(dir)?;
    }
    Ok(setting)
}

/// clap's message for a bad value that came from an environment variable
/// rather than from the flag it names: the same message naming the
/// variable. `None` for any other error (or a value from the flag). `run`
/// is the command whose arguments carry the `env` names; `args` the command
/// line.
pub fn name_env_in_error(
    e: &clap::Error,
    run: &clap::Command,
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        e.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let Some(ContextValue::String(shown)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let rest = shown.strip_prefix("--")?;
    let long = rest.split(['=', '[', ' ', '<']).next().unwrap_or(rest);
    let var = run
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())?
        .to_string_lossy()
        .into_owned();
    let flag = format!("--{long}");
    let given = args.into_iter().any(|a| {
        let a = a.to_string_lossy();
        a == flag || a.starts_with(&format!("{flag}="))
    });
    if given {
        return None;
    }
    Some(e.to_string().replacen(
        &format!("'{shown}'"),
        &format!("the environment variable {var} (the setting of '{flag}')"),
        1,
    ))
}

/// A Go duration (`10s`, `1m30s`) of at most an hour.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let d =
        crate::tools::duration::parse_go_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    if d > Duration::from_secs(3600) {
        return Err(format!("{text:?}: at most 1h"));
    }
    Ok(d)
}

/// Reads the named config file (which must exist), or the default one if
/// it exists.
fn read_config(named: Option<&Path>) -> Result<(FileConfig, Option<PathBuf>), ConfigError> {
    let path = match named {
        Some(p) => p.to_path_buf(),
        None => {
            let p = PathBuf::from(DEFAULT_CONFIG_PATH);
            if !p.exists() {
                return Ok((FileConfig::default(), None));
            }
            p
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let file = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.clone(),
        message: e.to_string().trim_end().to_string(),
    })?;
    Ok((file, Some(path)))
}

fn read_key_file(path: &Path) -> Result<Secret, ConfigError> {
    let key = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        setting: "--auth-key-file",
        message: format!("{}: {e}", path.display()),
    })?;
    let key = key.trim();
    if key.is_empty() {
        return Err(ConfigError::Invalid {
            setting: "--auth-key-file",
            message: format!("{} is empty", path.display()),
        });
    }
    Ok(Secret(key.to_string()))
}

/// `tailkitd-<os hostname>`, as [`host_label`] makes it.
pub fn default_hostname(os_hostname: &str) -> String {
    host_label("tailkitd-", os_hostname)
}

/// `<prefix><os hostname>` as one DNS label: lower-cased, every character
/// outside `[a-z0-9-]` turned into `-`, runs of `-` collapsed, at most 63
/// long, no trailing `-`.
pub fn host_label(prefix: &str, os_hostname: &str) -> String {
    let mut name = String::from(prefix);
    for c in os_hostname.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && name.ends_with('-')) {
            name.push(c);
        }
    }
    let mut name: String = name.chars().take(63).collect();
    while name.ends_with('-') {
        name.pop();
    }
    name
}

/// Accepts a DNS label: 1 to 63 of `[a-z0-9-]` (upper case is folded), not
/// starting or ending with `-`.
fn check_hostname(name: &str) -> Result<String, ConfigError> {
    let lower = name.to_ascii_lowercase();
    let ok = !lower.is_empty()
        && lower.len() <= 63
        && lower
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !lower.starts_with('-')
        && !lower.ends_with('-');
    if ok {
        Ok(lower)
    } else {
        Err(ConfigError::Invalid {
            setting: "--hostname",
            message: format!(
                "{name:?} is not a valid host name (1-63 of a-z, 0-9 and '-', not starting or ending with '-')"
            ),
        })
    }
}

#[cfg(test)]
mod tests;
