//! Tool files and `tailkitd validate`, and the example tools.

use super::*;

#[test]
fn the_examples_validate_and_bad_files_are_reported() {
    let bin = env!("CARGO_BIN_EXE_tailkitd");
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tools");
    let out = std::process::Command::new(bin)
        .args(["validate", examples])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.json"),
        r#"{"name": "x", "commands": [{"name": "c", "exec_parts": []}]}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("good.toml"), "name = \"g\"\n").unwrap();
    let out = std::process::Command::new(bin)
        .arg("validate")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = format!(
        "{}: commands[0].exec_parts: must not be empty",
        dir.path().join("bad.json").display()
    );
    assert_eq!(stdout.trim(), expected);
}

#[test]
fn validate_refuses_patterns_that_escape_the_whole_value_anchor() {
    let bin = env!("CARGO_BIN_EXE_tailkitd");
    let dir = tempfile::tempdir().unwrap();
    for (file, pattern) in [("alt.json", "a)|(b"), ("any.json", "[a-z]+)|(.*")] {
        let tool = serde_json::json!({
            "name": file.trim_end_matches(".json"),
            "commands": [{
                "name": "c",
                "exec_parts": ["/bin/echo", "{{.x}}"],
                "args": [{"name": "x", "pattern": pattern}],
            }],
        });
        std::fs::write(dir.path().join(file), tool.to_string()).unwrap();
    }
    let out = std::process::Command::new(bin)
        .arg("validate")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for file in ["alt.json", "any.json"] {
        let expected = format!(
            "{}: commands[0].args[0].pattern: does not compile",
            dir.path().join(file).display()
        );
        assert!(stdout.contains(&expected), "{expected:?} not in {stdout}");
    }

    // And the registry refuses them at load, so no request can use them.
    let registry = Registry::load(dir.path(), ToolLimits::default());
    assert_eq!(registry.counts(), (0, 0));
    assert!(registry.lookup("alt", "c").is_none());
    assert!(registry.lookup("any", "c").is_none());
}

#[tokio::test]
async fn the_example_tools_run() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tools");
    let tools: Vec<(String, String)> = std::fs::read_dir(examples)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = tools
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let d = Stack::new(&refs, settings());
    let (s, r, _) = d
        .request(
            &alice(),
            "POST",
            "/exec/demo/count?wait=30s",
            r#"{"seconds": "2"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["stdout"], "tick 1\ntick 2\n");
    let (s, r, _) = d
        .request(
            &alice(),
            "POST",
            "/exec/disk/usage?wait=30s",
            r#"{"path": "/etc/hostname"}"#,
        )
        .await;
    assert_eq!(
        (s, r["status"].as_str()),
        (StatusCode::OK, Some("completed")),
        "{r}"
    );
    for bad in ["/etc/../root", "etc", "/etc/.ssh", "/ -x"] {
        let (s, _, _) = d
            .request(
                &alice(),
                "POST",
                "/exec/disk/usage",
                &json!({"path": bad}).to_string(),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
    }
    let nobody = user("eve@example.com", &[]);
    let (s, _, _) = d
        .request(&nobody, "POST", "/exec/disk/usage", r#"{"path": "/"}"#)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (_, tools, _) = d.request(&nobody, "GET", "/tools", "").await;
    let visible: Vec<String> = tools
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| {
            let tool = t["name"].as_str().unwrap().to_string();
            t["commands"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |c| format!("{tool}/{}", c["name"].as_str().unwrap()))
        })
        .collect();
    assert_eq!(visible, ["demo/count", "system/uptime"]);
}

#[test]
fn validate_says_where_a_toml_syntax_error_is() {
    let bin = env!("CARGO_BIN_EXE_tailkitd");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.toml");
    std::fs::write(
        &file,
        "name = \"t\"\n[[commands]]\nname = \"c\"\ntimeout = 10s\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .arg("validate")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = format!("{}: syntax: line 4, column 11: ", file.display());
    assert!(
        stdout.starts_with(&expected),
        "{expected:?} is not how {stdout:?} starts"
    );
}

/// Not a test on its own: run by `a_huge_tool_file_is_refused_unread` in a
/// process of its own, so that the peaks it measures are its own. Loads
/// the directory named by `TAILKITD_TEST_HUGE_DIR` with the registry and
/// with `validate_path`, then runs `tailkitd validate` on it as its only
/// child; writes `baseline peak child-peak` (KiB) to the report file.
#[test]
#[ignore = "helper process for a_huge_tool_file_is_refused_unread"]
fn helper_load_a_huge_tool_file() {
    let (Ok(dir), Ok(report)) = (
        std::env::var("TAILKITD_TEST_HUGE_DIR"),
        std::env::var("TAILKITD_TEST_HUGE_REPORT"),
    ) else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    let huge = dir.join("huge.json");
    // Warm up (code paged in, allocator arenas) on a file just over the
    // limit first.
    let warm = tempfile::tempdir().unwrap();
    std::fs::write(warm.path().join("good.json"), GOOD).unwrap();
    std::fs::File::create(warm.path().join("big.json"))
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    drop(Registry::load(warm.path(), ToolLimits::default()));
    assert_eq!(tailkitd::tools::validate_path(warm.path()).len(), 1);
    let baseline = vm_hwm_kib();

    let registry = Registry::load(dir, ToolLimits::default());
    assert!(
        registry.lookup("good", "c").is_some(),
        "the other file loads"
    );
    let problems = registry.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(
        problems[0].to_string(),
        format!(
            "{}: file: 536870912 bytes (512.0 MiB), over the limit of 1048576 bytes (1 MiB) for a tool file; not read",
            huge.display()
        )
    );
    assert_eq!(tailkitd::tools::validate_path(dir), problems);
    let peak = vm_hwm_kib();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tailkitd"))
        .arg("validate")
        .arg(dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        problems[0].to_string()
    );
    let child = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .unwrap()
        .max_rss();
    std::fs::write(report, format!("{baseline} {peak} {child}")).unwrap();
}

const GOOD: &str = r#"{"name": "good", "commands": [{"name": "c", "exec_parts": ["/bin/true"]}]}"#;

#[tokio::test]
async fn a_huge_tool_file_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good.json"), GOOD).unwrap();
    // 512 MiB that take no disk: a sparse file.
    std::fs::File::create(dir.path().join("huge.json"))
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let report_dir = tempfile::tempdir().unwrap();
    let report = report_dir.path().join("hwm");
    let out = helper_process("tool_files::helper_load_a_huge_tool_file")
        .env("TAILKITD_TEST_HUGE_DIR", dir.path())
        .env("TAILKITD_TEST_HUGE_REPORT", &report)
        .output()
        .await
        .unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the helper failed:\n{logs}");
    let report = std::fs::read_to_string(&report).expect("the helper wrote its report");
    let [baseline, peak, child]: [u64; 3] = report
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    eprintln!(
        "huge tool file: registry + validate_path peak {peak} KiB (baseline {baseline}); `tailkitd validate` peak {child} KiB"
    );
    // Reading the file would take 512 MiB in either process; the rest is
    // noise (the Go runtime linked in starts its threads and heap in the
    // background).
    assert!(
        peak - baseline < 64 << 10,
        "the registry's peak grew by {} KiB",
        peak - baseline
    );
    assert!(
        child < 128 << 10,
        "`tailkitd validate` peaked at {child} KiB"
    );
}
