//! Containment against the command itself: a command that kills or stops
//! a process above it (its launcher, or the supervisor above that) leaves
//! nothing running after its job, with job cgroups and without; commands
//! run as another user cannot touch the daemon; a launcher's impossible
//! pid is refused.

use super::*;

/// Whether job cgroups work here (as root, on cgroup v2): the cgroup
/// tests skip, saying why, where they do not.
fn cgroups_usable() -> bool {
    match CgroupSetting::Auto.resolve() {
        Ok(_) => true,
        Err(reason) => {
            eprintln!("skipped: no job cgroups here ({reason})");
            false
        }
    }
}

fn as_root() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("skipped: needs root (to run commands as another user)");
    }
    root
}

/// Whom a command attacks.
#[derive(Clone, Copy)]
enum Above {
    /// Its parent.
    Launcher,
    /// Its parent's parent.
    Supervisor,
}

/// The escape of issue 14: a command starts a `setsid`'d process, then
/// kills (or stops) its launcher or the supervisor. The setsid'd process
/// must not outlive the job, and the next job must run.
async fn escape(cgroup: CgroupSetting, signal: &str, whom: Above) {
    let settings = ExecSettings {
        cgroup: cgroup.clone(),
        ..settings()
    };
    let d = Stack::command(
        json!([
            "/bin/sh",
            "-c",
            r#"setsid sh -c 'echo $$ > "$1/pid"; exec sleep 300' sh "$1" &
while [ ! -s "$1/pid" ]; do sleep 0.01; done
cat /proc/self/cgroup >&2
target=$PPID
[ "$3" = supervisor ] && target=$(cut -d' ' -f4 /proc/$PPID/stat)
kill -"$2" $target
sleep 1"#,
            "sh",
            "{{.dir}}",
            "{{.signal}}",
            "{{.whom}}"
        ]),
        json!([{"name": "dir"}, {"name": "signal"}, {"name": "whom"}]),
        settings,
    );
    // A short timeout: a stopped launcher answers nothing.
    let text = std::fs::read_to_string(d.dir.path().join("t.json")).unwrap();
    std::fs::write(d.dir.path().join("t.json"), text.replace("30s", "3s")).unwrap();
    d.registry.reload();
    let whom = match whom {
        Above::Launcher => "launcher",
        Above::Supervisor => "supervisor",
    };
    let body = json!({"dir": d.dir.path().display().to_string(), "signal": signal, "whom": whom})
        .to_string();
    let r = d.run(&body).await;
    let pid = pids(&std::fs::read_to_string(d.dir.path().join("pid")).unwrap())[0];
    let _cleanup = KillOnDrop(vec![pid]);
    let in_cgroup = r["stderr"].as_str().unwrap_or("").contains("tailkitd-sv.");
    assert_eq!(in_cgroup, cgroup != CgroupSetting::Off, "{r}");
    assert_ne!(r["status"], "completed", "{r}");
    eventually(LONG, "the setsid'd process to die with its job", || {
        process_gone(pid)
    })
    .await;
    // The next job runs.
    let body = json!({"dir": "/", "signal": "0", "whom": "launcher"}).to_string();
    let r = d.run(&body).await;
    assert_eq!(r["status"], "completed", "{r}");
}

#[tokio::test]
async fn killing_the_launcher_leaves_nothing_running() {
    escape(CgroupSetting::Off, "KILL", Above::Launcher).await;
}

#[tokio::test]
async fn stopping_the_launcher_leaves_nothing_running() {
    escape(CgroupSetting::Off, "STOP", Above::Launcher).await;
}

#[tokio::test]
async fn killing_the_supervisor_leaves_nothing_running() {
    escape(CgroupSetting::Off, "KILL", Above::Supervisor).await;
}

#[tokio::test]
async fn stopping_the_supervisor_leaves_nothing_running() {
    escape(CgroupSetting::Off, "STOP", Above::Supervisor).await;
}

#[tokio::test]
async fn killing_the_launcher_of_a_job_cgroup_leaves_nothing_running() {
    if cgroups_usable() {
        escape(CgroupSetting::Auto, "KILL", Above::Launcher).await;
    }
}

#[tokio::test]
async fn stopping_the_launcher_of_a_job_cgroup_leaves_nothing_running() {
    if cgroups_usable() {
        escape(CgroupSetting::Auto, "STOP", Above::Launcher).await;
    }
}

#[tokio::test]
async fn killing_the_supervisor_of_job_cgroups_leaves_nothing_running() {
    if cgroups_usable() {
        escape(CgroupSetting::Auto, "KILL", Above::Supervisor).await;
    }
}

#[tokio::test]
async fn stopping_the_supervisor_of_job_cgroups_leaves_nothing_running() {
    if cgroups_usable() {
        escape(CgroupSetting::Auto, "STOP", Above::Supervisor).await;
    }
}

/// What a command running as nobody can do to this process (the daemon
/// here), its supervisor and launchers (every root-owned
/// `tailkitd-launch`): each line it prints but its ids and capabilities is
/// a success.
async fn as_nobody(cgroup: CgroupSetting) {
    let nobody = tailkitd::tools::users::parse_user_spec("65534:65534").unwrap();
    let d = Stack::command(
        json!([
            "/bin/sh",
            "-c",
            r#"id -u; id -g; id -G
kill -0 "$1" 2>/dev/null && echo signalled-the-daemon
n=0
for p in $(pgrep -u 0 -x tailkitd-launch); do
  n=$((n+1)); kill -0 "$p" 2>/dev/null && echo "signalled tailkitd-launch $p"
done
[ "$n" -gt 0 ] || echo no-supervisor-found
cat "/proc/$1/environ" >/dev/null 2>&1 && echo read-the-environ
grep -E '^Cap(Inh|Prm|Eff|Amb)' /proc/self/status
echo end"#,
            "sh",
            "{{.pid}}"
        ]),
        json!([{"name": "pid", "type": "int"}]),
        ExecSettings {
            cgroup,
            command_user: Some(nobody),
            ..settings()
        },
    );
    let r = d.run(&json!({"pid": std::process::id()}).to_string()).await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(
        r["stdout"],
        "65534\n65534\n65534\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapAmb:\t0000000000000000\nend\n",
        "{r}"
    );
}

#[tokio::test]
async fn a_command_as_nobody_cannot_touch_the_daemon_without_cgroups() {
    if as_root() {
        as_nobody(CgroupSetting::Off).await;
    }
}

#[tokio::test]
async fn a_command_as_nobody_cannot_touch_the_daemon_in_a_cgroup() {
    if as_root() && cgroups_usable() {
        as_nobody(CgroupSetting::Auto).await;
    }
}

#[tokio::test]
async fn a_tool_file_names_a_user_that_must_exist() {
    let tool = |user: &str| {
        json!({"name": "t", "user": user, "commands": [{"name": "c", "exec_parts": ["id", "-u"]}]})
            .to_string()
    };
    let d = Stack::build(
        &[("t.json", &tool("no-such-user-tk"))],
        settings(),
        tailkitd::api::ApiSettings::new(HOST, vec![HOST.into()]),
        tailkitd::audit::AuditLog::in_memory(),
    );
    let problems: Vec<String> = d
        .registry
        .problems()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("t.json: user: no user named \"no-such-user-tk\""),
        "{problems:?}"
    );
    if as_root() {
        // A command's own user wins over the tool's.
        let text = json!({"name": "t", "user": "65534", "group": 65534, "commands": [
            {"name": "c", "exec_parts": ["id", "-u"]},
            {"name": "d", "exec_parts": ["id", "-u"], "user": "root"}
        ]});
        std::fs::write(d.dir.path().join("t.json"), text.to_string()).unwrap();
        d.registry.reload();
        assert!(
            d.registry.problems().is_empty(),
            "{:?}",
            d.registry.problems()
        );
        for (cmd, uid) in [("c", "65534\n"), ("d", "0\n")] {
            let (s, v, _) = d
                .request(&alice(), "POST", &format!("/exec/t/{cmd}?wait=20s"), "")
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            assert_eq!(v["stdout"], uid, "{v}");
        }
    }
}

#[tokio::test]
async fn a_launcher_reporting_an_impossible_pid_fails_the_job() {
    use std::os::unix::fs::PermissionsExt;
    // killpg(0) would hit this process's own group, killpg(1) every
    // process: such a pid must never be used.
    for pid in ["0", "1", "-1"] {
        let dir = tempfile::tempdir().unwrap();
        let launcher = dir.path().join("liar");
        std::fs::write(
            &launcher,
            format!("#!/bin/sh\necho \"started {pid}\" >&0\nexec sleep 1000\n"),
        )
        .unwrap();
        std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = Stack::command(
            json!(["/bin/true"]),
            json!([]),
            ExecSettings {
                launcher,
                cgroup: CgroupSetting::Off,
                ..settings()
            },
        );
        let r = d.run("").await;
        assert_eq!(
            (r["status"].as_str(), r["exit_code"].as_i64()),
            (Some("failed"), Some(-1)),
            "{pid}: {r}"
        );
        assert!(
            r["error"].as_str().unwrap().contains("impossible pid"),
            "{pid}: {r}"
        );
    }
}
