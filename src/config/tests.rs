//! Unit tests of the settings: flags, environment, config file, defaults.

use super::*;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn config_file(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("tailkitd.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn defaults_apply_when_nothing_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let args = RunArgs {
        config: Some(config_file(dir.path(), "")),
        ..RunArgs::default()
    };
    let s = Settings::resolve(args, no_env, "Build-Box_01.local").unwrap();
    assert_eq!(s.hostname, "tailkitd-build-box-01-local");
    assert_eq!(s.state_dir, Path::new(DEFAULT_STATE_DIR));
    assert_eq!(s.tools_dir, Path::new(DEFAULT_TOOLS_DIR));
    assert_eq!(s.audit_log, Path::new("/var/lib/tailkitd/audit.jsonl"));
    assert_eq!(s.port, 80);
    assert_eq!(s.max_jobs, 16);
    assert!(!s.ephemeral && !s.require_cap && !s.upload_logs);
    assert_eq!(s.control_url, None);
    assert!(s.auth_key.is_none());
    assert_eq!(s.log_format, LogFormat::Text);
    assert_eq!(s.shutdown_grace, Duration::from_secs(10));
    assert_eq!(s.command_user, None);
    assert_eq!(s.cgroup, crate::run::CgroupSetting::Auto);
    assert_eq!(s.stream_heartbeat, Duration::from_secs(15));
    assert_eq!(s.max_streams_per_peer, 16);
}

#[test]
fn command_user_and_cgroup_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path(), "command_user = \"no-such-user-tk\"\n");
    let args = RunArgs {
        config: Some(cfg),
        ..RunArgs::default()
    };
    let err = Settings::resolve(args, no_env, "h")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("--command-user:"), "{err}");
    assert!(err.contains("no-such-user-tk"), "{err}");
    let cli = Cli::try_parse_from(["t", "--config", "/dev/null", "--cgroup", "/tmp"]).unwrap();
    let err = Settings::resolve(cli.run, no_env, "h")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("--cgroup:") && err.contains("not a cgroup v2"),
        "{err}"
    );
    let cli = Cli::try_parse_from(["t", "--config", "/dev/null", "--cgroup", "off"]).unwrap();
    let s = Settings::resolve(cli.run, no_env, "h").unwrap();
    assert_eq!(s.cgroup, crate::run::CgroupSetting::Off);
}

#[test]
fn stream_settings_come_from_flags_or_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(
        dir.path(),
        "stream_heartbeat = \"500ms\"\nmax_streams_per_peer = 3\n",
    );
    let cli = Cli::try_parse_from(["t", "--config", cfg.to_str().unwrap()]).unwrap();
    let s = Settings::resolve(cli.run, no_env, "h").unwrap();
    assert_eq!(s.stream_heartbeat, Duration::from_millis(500));
    assert_eq!(s.max_streams_per_peer, 3);
    let cli = Cli::try_parse_from([
        "t",
        "--config",
        cfg.to_str().unwrap(),
        "--stream-heartbeat",
        "2s",
        "--max-streams-per-peer",
        "1",
    ])
    .unwrap();
    let s = Settings::resolve(cli.run, no_env, "h").unwrap();
    assert_eq!(s.stream_heartbeat, Duration::from_secs(2));
    assert_eq!(s.max_streams_per_peer, 1);
    for (flag, value) in [
        ("--stream-heartbeat", "0s"),
        ("--max-streams-per-peer", "0"),
    ] {
        let cli =
            Cli::try_parse_from(["t", "--config", cfg.to_str().unwrap(), flag, value]).unwrap();
        let err = Settings::resolve(cli.run, no_env, "h").unwrap_err();
        assert!(err.to_string().starts_with(flag), "{err}");
    }
}

#[test]
fn flags_beat_the_config_file_which_beats_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(
        dir.path(),
        "hostname = \"from-file\"\nport = 8080\nmax_jobs = 4\nrequire_cap = true\nstate_dir = \"/srv/tk\"\nshutdown_grace = \"1m30s\"\n",
    );
    let cli = Cli::try_parse_from([
        "t",
        "--config",
        cfg.to_str().unwrap(),
        "--port",
        "9000",
        "--require-cap=false",
        "--ephemeral",
    ])
    .unwrap();
    let s = Settings::resolve(cli.run, no_env, "h").unwrap();
    assert_eq!(s.hostname, "from-file");
    assert_eq!(s.port, 9000);
    assert_eq!(s.max_jobs, 4);
    assert!(!s.require_cap);
    assert!(s.ephemeral);
    assert_eq!(s.audit_log, Path::new("/srv/tk/audit.jsonl"));
    assert_eq!(s.config_file.as_deref(), Some(cfg.as_path()));
    assert_eq!(s.shutdown_grace, Duration::from_secs(90));
}

#[test]
fn auth_key_sources_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let file_key = dir.path().join("key");
    std::fs::write(&file_key, "tskey-from-file\n").unwrap();
    let cfg = config_file(dir.path(), "");
    let base = RunArgs {
        config: Some(cfg),
        ..RunArgs::default()
    };
    let fk = file_key.to_str().unwrap().to_string();

    let env_both = |k: &str| match k {
        "TS_AUTHKEY" => Some("tskey-env".to_string()),
        "TS_AUTHKEY_FILE" => Some(fk.clone()),
        _ => None,
    };
    let s = Settings::resolve(base.clone(), env_both, "h").unwrap();
    assert_eq!(s.auth_key.unwrap().expose(), "tskey-env");

    let env_file = |k: &str| (k == "TS_AUTHKEY_FILE").then(|| fk.clone());
    let s = Settings::resolve(base.clone(), env_file, "h").unwrap();
    assert_eq!(s.auth_key.as_ref().unwrap().expose(), "tskey-from-file");
    assert!(!format!("{s:?}").contains("tskey"), "Debug leaks the key");

    let with_flag = RunArgs {
        auth_key_file: Some(dir.path().join("missing")),
        ..base
    };
    let err = Settings::resolve(with_flag, env_both, "h").unwrap_err();
    assert!(err.to_string().contains("--auth-key-file"), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn bad_values_name_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path(), "");
    let bad_host = RunArgs {
        config: Some(cfg.clone()),
        hostname: Some("no_underscores".into()),
        ..RunArgs::default()
    };
    let err = Settings::resolve(bad_host, no_env, "h").unwrap_err();
    assert!(err.to_string().starts_with("--hostname:"), "{err}");

    let zero_jobs = RunArgs {
        config: Some(cfg),
        max_jobs: Some(0),
        ..RunArgs::default()
    };
    let err = Settings::resolve(zero_jobs, no_env, "h").unwrap_err();
    assert!(err.to_string().starts_with("--max-jobs:"), "{err}");
}

#[test]
fn config_file_errors_name_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path(), "hostnme = \"typo\"\n");
    let args = RunArgs {
        config: Some(cfg.clone()),
        ..RunArgs::default()
    };
    let err = Settings::resolve(args, no_env, "h")
        .unwrap_err()
        .to_string();
    assert!(err.contains(cfg.to_str().unwrap()), "{err}");
    assert!(err.contains("hostnme"), "{err}");

    let missing = RunArgs {
        config: Some(dir.path().join("nope.toml")),
        ..RunArgs::default()
    };
    let err = Settings::resolve(missing, no_env, "h")
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.toml"), "{err}");
}

#[test]
fn enum_and_bool_flags_parse() {
    let cli = Cli::try_parse_from(["t", "--log-format", "json", "--upload-logs"]).unwrap();
    assert_eq!(cli.run.log_format, Some(LogFormat::Json));
    assert_eq!(cli.run.upload_logs, Some(true));
    assert!(Cli::try_parse_from(["t", "--log-format", "xml"]).is_err());
    let cli = Cli::try_parse_from(["t", "--shutdown-grace", "2.5s"]).unwrap();
    assert_eq!(cli.run.shutdown_grace, Some(Duration::from_millis(2500)));
    assert!(Cli::try_parse_from(["t", "--shutdown-grace", "2h"]).is_err());
    assert!(Cli::try_parse_from(["t", "--shutdown-grace", "soon"]).is_err());
}

#[test]
fn default_hostname_is_a_dns_label() {
    assert_eq!(default_hostname("web01"), "tailkitd-web01");
    assert_eq!(default_hostname("ÜBER--box!"), "tailkitd-ber-box");
    let long = default_hostname(&"a".repeat(100));
    assert_eq!(long.len(), 63);
    assert_eq!(default_hostname("---"), "tailkitd");
}
