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
