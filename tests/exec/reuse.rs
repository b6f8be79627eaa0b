//! Launchers kept ready and reused from one job to the next: a job finds
//! nothing of the one before in its launcher (descriptors, environment,
//! working directory, leftover processes), with job cgroups and without,
//! and commands of different users never share a launcher.

use super::*;

/// Prints, for the command's launcher (its parent once a `spawn-as`
/// helper is out of the way): `launcher PID`, `children PIDS` (of the
/// launcher), `self PID`, then its descriptors, working directory and
/// environment.
const PROBE: &str = r#"p=$(cut -d' ' -f4 /proc/$$/stat)
while grep -q spawn-as /proc/$p/cmdline 2>/dev/null; do sleep 0.01; p=$(cut -d' ' -f4 /proc/$$/stat); done
echo "launcher $p"
echo "children $(cat /proc/$p/task/*/children)"
echo "self $$"
ls /proc/self/fd | tr '\n' ' '; echo
pwd
env | sort"#;

/// One tool with `dirty` (leaves a `setsid`'d process, its pid in
/// `dir/pid`, an environment variable and a working directory of its own
/// behind, and prints its launcher) and `probe` ([`PROBE`]); and `dir`.
fn stack(cgroup: CgroupSetting) -> (Stack, tempfile::TempDir) {
    let leftovers = tempfile::tempdir().unwrap();
    let dir = leftovers.path();
    let dirty = json!({
        "name": "dirty",
        "exec_parts": ["/bin/sh", "-c", r#"setsid sh -c 'echo $$ > "$1/pid"; exec sleep 300' sh "$1" >/dev/null 2>&1 &
while [ ! -s "$1/pid" ]; do sleep 0.01; done
echo "launcher $PPID""#, "sh", dir.display().to_string()],
        "env": {"LEFT_BEHIND": "1"},
        "workdir": dir.display().to_string(),
        "timeout": "30s"
    });
    let probe = json!({"name": "probe", "exec_parts": ["/bin/sh", "-c", PROBE], "timeout": "30s"});
    let tool = json!({"name": "t", "commands": [dirty, probe]});
    let d = Stack::new(
        &[("t.json", &tool.to_string())],
        ExecSettings {
            cgroup,
            ..settings()
        },
    );
    (d, leftovers)
}

async fn call(d: &Stack, command: &str) -> Value {
    let (s, v, _) = d
        .request(&alice(), "POST", &format!("/exec/t/{command}?wait=30s"), "")
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "completed", "{v}");
    v
}

/// The value of `key` in a probe's or a dirty job's output.
fn field(v: &Value, key: &str) -> String {
    let out = v["stdout"].as_str().unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key} in {v}"))
        .trim()
        .to_string()
}

/// What a probe reports of its surroundings: descriptors, working
/// directory and environment (without the job's own id).
fn surroundings(v: &Value) -> String {
    let out = v["stdout"].as_str().unwrap();
    out.lines()
        .skip(3)
        .filter(|l| !l.starts_with("TAILKIT_JOB_ID="))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `dirty` then `probe` until the probe ran in the launcher of the
/// dirty job: each time the dirty job's leftover is gone once its job
/// ended, and the probe sees what a probe sees in a fresh launcher.
async fn nothing_passes(cgroup: CgroupSetting) {
    let (d, leftovers) = stack(cgroup);
    let pid_file = leftovers.path().join("pid");
    let fresh = call(&d, "probe").await;
    assert_eq!(field(&fresh, "children"), field(&fresh, "self"), "{fresh}");
    let expected = surroundings(&fresh);
    assert!(expected.starts_with("0 1 2 3 \n/\n"), "{fresh}");
    assert!(!expected.contains("LEFT_BEHIND"), "{fresh}");
    let mut reused = 0;
    for _ in 0..10 {
        let dirty = call(&d, "dirty").await;
        let left = pids(&std::fs::read_to_string(&pid_file).unwrap())[0];
        std::fs::remove_file(&pid_file).unwrap();
        let _cleanup = KillOnDrop(vec![left]);
        // Gone once its job ended (the daemon's result comes when its
        // launcher is done with it).
        assert!(process_gone(left), "leftover {left} of {dirty}");
        let probe = call(&d, "probe").await;
        // The probe's launcher has no child but the probe.
        assert_eq!(field(&probe, "children"), field(&probe, "self"), "{probe}");
        assert_eq!(surroundings(&probe), expected, "{probe}");
        if field(&probe, "launcher") == field(&dirty, "launcher") {
            reused += 1;
            if reused == 3 {
                break;
            }
        }
    }
    assert!(reused > 0, "no launcher was ever reused");
}

#[tokio::test]
async fn a_reused_launcher_passes_nothing_on_without_cgroups() {
    nothing_passes(CgroupSetting::Off).await;
}

#[tokio::test]
async fn a_reused_launcher_passes_nothing_on_with_cgroups() {
    if CgroupSetting::Auto.resolve().is_ok() {
        nothing_passes(CgroupSetting::Auto).await;
    } else {
        eprintln!("skipped: no job cgroups here");
    }
}

/// Commands as the daemon's own user and as nobody, in turns: no launcher
/// serves both.
async fn users_apart(cgroup: CgroupSetting) {
    let (own, _leftovers) = stack(cgroup);
    let tool = json!({"name": "u", "user": "65534", "group": 65534, "commands": [
        {"name": "probe", "exec_parts": ["/bin/sh", "-c", PROBE], "timeout": "30s"}
    ]});
    std::fs::write(own.dir.path().join("u.json"), tool.to_string()).unwrap();
    own.registry.reload();
    assert!(
        own.registry.problems().is_empty(),
        "{:?}",
        own.registry.problems()
    );
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..6 {
        ours.push(field(&call(&own, "probe").await, "launcher"));
        let (s, v, _) = own
            .request(&alice(), "POST", "/exec/u/probe?wait=30s", "")
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["status"], "completed", "{v}");
        theirs.push(field(&v, "launcher"));
    }
    for pid in &theirs {
        assert!(
            !ours.contains(pid),
            "shared launcher {pid}: {ours:?} {theirs:?}"
        );
    }
}

fn as_root() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("skipped: needs root (to run commands as another user)");
    }
    root
}

#[tokio::test]
async fn users_never_share_a_launcher_without_cgroups() {
    if as_root() {
        users_apart(CgroupSetting::Off).await;
    }
}

#[tokio::test]
async fn users_never_share_a_launcher_with_cgroups() {
    if as_root() && CgroupSetting::Auto.resolve().is_ok() {
        users_apart(CgroupSetting::Auto).await;
    }
}

/// A job that runs a while costs its launcher next to no CPU: it waits
/// (for a signal, an order, or its cgroup to empty), it does not spin.
async fn waits_idle(cgroup: CgroupSetting) {
    // The launcher's utime + stime in clock ticks (100 a second here),
    // after one second of the command sleeping.
    let d = Stack::command(
        json!([
            "/bin/sh",
            "-c",
            "sleep 1; cut -d' ' -f14,15 /proc/$PPID/stat"
        ]),
        json!([]),
        ExecSettings {
            cgroup,
            ..settings()
        },
    );
    let r = d.run("").await;
    assert_eq!(r["status"], "completed", "{r}");
    let ticks: u64 = r["stdout"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .map(|t| t.parse::<u64>().unwrap())
        .sum();
    // A spinning launcher would have used most of that second.
    assert!(ticks < 25, "the launcher used {ticks} ticks of CPU: {r}");
}

#[tokio::test]
async fn a_launcher_waits_without_spinning_without_cgroups() {
    waits_idle(CgroupSetting::Off).await;
}

#[tokio::test]
async fn a_launcher_waits_without_spinning_with_cgroups() {
    if CgroupSetting::Auto.resolve().is_ok() {
        waits_idle(CgroupSetting::Auto).await;
    } else {
        eprintln!("skipped: no job cgroups here");
    }
}

/// Finds the command's launcher as [`PROBE`] does, into `$p`.
const FIND_LAUNCHER: &str = r#"p=$(cut -d' ' -f4 /proc/$$/stat)
while grep -q spawn-as /proc/$p/cmdline 2>/dev/null; do sleep 0.01; p=$(cut -d' ' -f4 /proc/$$/stat); done
echo "launcher $p""#;

/// A job that changes its launcher's settings from outside (as a command
/// of the launcher's user can: `$PPID`), then jobs that print theirs: none
/// inherits the change, and none runs in that launcher again.
async fn settings_stay(cgroup: CgroupSetting) {
    let tamper = format!(
        "{FIND_LAUNCHER}
prlimit --pid $p --fsize=1:1 && renice -n 15 -p $p >/dev/null && taskset -p 1 $p >/dev/null && echo 900 > /proc/$p/oom_score_adj && echo tampered"
    );
    let show = format!(
        "{FIND_LAUNCHER}
echo \"fsize $(ulimit -f)\"
echo \"nice $(cut -d' ' -f19 /proc/$$/stat)\"
echo \"cpus $(grep Cpus_allowed_list /proc/$$/status)\"
echo \"oom $(cat /proc/$$/oom_score_adj)\""
    );
    let tool = json!({"name": "t", "commands": [
        {"name": "tamper", "exec_parts": ["/bin/sh", "-c", tamper], "timeout": "30s"},
        {"name": "show", "exec_parts": ["/bin/sh", "-c", show], "timeout": "30s"},
    ]});
    let d = Stack::new(
        &[("t.json", &tool.to_string())],
        ExecSettings {
            cgroup,
            ..settings()
        },
    );
    let settings = |v: &Value| {
        ["fsize", "nice", "cpus", "oom"]
            .map(|key| field(v, key))
            .join(" / ")
    };
    let fresh = call(&d, "show").await;
    let expected = settings(&fresh);
    assert!(expected.starts_with("unlimited / 0 / "), "{fresh}");
    for _ in 0..3 {
        let tamper = call(&d, "tamper").await;
        assert!(
            tamper["stdout"].as_str().unwrap().contains("tampered"),
            "{tamper}"
        );
        let tampered = field(&tamper, "launcher");
        for _ in 0..3 {
            let v = call(&d, "show").await;
            assert_eq!(settings(&v), expected, "after {tamper}: {v}");
            assert_ne!(field(&v, "launcher"), tampered, "{v}");
        }
    }
}

#[tokio::test]
async fn a_launcher_whose_settings_its_command_changed_is_not_reused_without_cgroups() {
    settings_stay(CgroupSetting::Off).await;
}

#[tokio::test]
async fn a_launcher_whose_settings_its_command_changed_is_not_reused_with_cgroups() {
    if CgroupSetting::Auto.resolve().is_ok() {
        settings_stay(CgroupSetting::Auto).await;
    } else {
        eprintln!("skipped: no job cgroups here");
    }
}

/// The cgroup v2 directory of the shell (`$cg`), on the first cgroup2
/// mount (whose root is the file system's).
const OWN_CGROUP: &str = r#"m=$(grep -m1 ' - cgroup2 ' /proc/self/mountinfo | cut -d' ' -f5)
cg=$m$(sed -n 's/^0:://p' /proc/self/cgroup)"#;

/// With job cgroups: a job moves a `setsid`'d process into the cgroup its
/// launcher made for the next job, and ends. That process does not outlive
/// the job for long, and the jobs after run in cgroups of their own.
#[tokio::test]
async fn a_process_moved_into_the_next_jobs_cgroup_does_not_stay() {
    if let Err(reason) = CgroupSetting::Auto.resolve() {
        eprintln!("skipped: no job cgroups here ({reason})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let squat = format!(
        r#"{OWN_CGROUP}
name=${{cg##*/}}
next=${{cg%/*}}/${{name%.*}}.$((${{name##*.}} + 1))
while [ ! -e "$next/cgroup.procs" ]; do sleep 0.01; done
setsid sh -c 'echo $$ > "$1/cgroup.procs" && echo $$ > "$2/pid"; exec sleep 300' sh "$next" "$1" >/dev/null 2>&1 &
while [ ! -s "$1/pid" ]; do sleep 0.01; done
echo "next $next""#
    );
    // Builtins only, after `$cg`: the shell is the cgroup's one process
    // (its launcher may not have moved on yet).
    let members = format!(
        r#"{OWN_CGROUP}
echo "self $$"
echo "cgroup $cg"
name=${{cg##*/}}
echo "launcher ${{name%.*}}"
while read -r q; do echo "member $q"; done < "$cg/cgroup.procs""#
    );
    let tool = json!({"name": "t", "commands": [
        {"name": "squat", "exec_parts": ["/bin/sh", "-c", squat, "sh", dir.path().display().to_string()], "timeout": "30s"},
        {"name": "members", "exec_parts": ["/bin/sh", "-c", members], "timeout": "30s"},
    ]});
    let d = Stack::new(
        &[("t.json", &tool.to_string())],
        ExecSettings {
            cgroup: CgroupSetting::Auto,
            ..settings()
        },
    );
    let pid_file = dir.path().join("pid");
    for _ in 0..3 {
        let squat = call(&d, "squat").await;
        let squatter = pids(&std::fs::read_to_string(&pid_file).unwrap())[0];
        std::fs::remove_file(&pid_file).unwrap();
        let _cleanup = KillOnDrop(vec![squatter]);
        for _ in 0..3 {
            let v = call(&d, "members").await;
            let out = v["stdout"].as_str().unwrap();
            let launcher = field(&v, "launcher");
            let members: Vec<&str> = out
                .lines()
                .filter_map(|l| l.strip_prefix("member "))
                .filter(|m| *m != launcher)
                .collect();
            assert_eq!(members, [field(&v, "self")], "after {squat}: {v}");
        }
        eventually(
            LONG,
            "the process moved into the next job's cgroup to die",
            || process_gone(squatter),
        )
        .await;
    }
}
