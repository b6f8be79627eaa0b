//! Tests of tool file parsing and validation.

use super::*;

const GO_SDK_JSON: &str = r#"{
  "name": "docker-ops",
  "version": "1.2.0",
  "tsnet_host": "ignored by the daemon",
  "commands": [{
    "name": "restart",
    "description": "Restart one container",
    "acl_cap": "example.com/cap/docker-ops",
    "exec_parts": ["/usr/bin/docker", "restart", "{{.container}}"],
    "timeout": 30000000000,
    "args": [{"name": "container", "type": "string", "required": true,
              "pattern": "^[a-zA-Z0-9_-]+$"}]
  }, {
    "name": "ps",
    "description": "",
    "acl_cap": "",
    "exec_parts": ["docker", "ps"],
    "timeout": 0
  }]
}"#;

fn parse_json(text: &str) -> Result<Tool, Vec<Problem>> {
    parse_str(
        text,
        Format::Json,
        Path::new("t.json"),
        &ToolLimits::default(),
    )
}

fn problems_of(text: &str) -> Vec<String> {
    parse_json(text)
        .unwrap_err()
        .into_iter()
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect()
}

fn one_command(command: &str) -> String {
    format!(r#"{{"name": "t", "commands": [{command}]}}"#)
}

#[test]
fn go_sdk_json_loads() {
    let tool = parse_json(GO_SDK_JSON).unwrap();
    assert_eq!(tool.name, "docker-ops");
    assert_eq!(tool.tsnet_host, "ignored by the daemon");
    let restart = tool.command("restart").unwrap();
    assert_eq!(restart.timeout, Some(Duration::from_secs(30)));
    assert_eq!(
        restart.acl_cap.as_deref(),
        Some("example.com/cap/docker-ops")
    );
    assert_eq!(restart.args[0].kind, ArgType::String);
    assert!(restart.args[0].required);
    let ps = tool.command("ps").unwrap();
    assert_eq!(ps.timeout, None, "zero means the daemon default");
    assert_eq!(ps.acl_cap, None);
}

#[test]
fn go_nulls_and_string_timeouts_load() {
    let tool = parse_json(&one_command(
        r#"{"name": "c", "exec_parts": ["true"], "args": null, "timeout": "1m30s", "env": null}"#,
    ))
    .unwrap();
    assert_eq!(tool.commands[0].timeout, Some(Duration::from_secs(90)));
}

#[test]
fn toml_has_the_same_fields() {
    let text = r#"
        name = "disk"
        version = "1"
        [[commands]]
        name = "usage"
        exec_parts = ["du", "-sh", "--", "{{ .path }}"]
        timeout = "10s"
        acl_cap = "example.com/cap/x"
        [[commands.args]]
        name = "path"
        type = "string"
        pattern = '^/[a-z/]+$'
        default = "/var"
    "#;
    let tool = parse_str(
        text,
        Format::Toml,
        Path::new("d.toml"),
        &ToolLimits::default(),
    )
    .unwrap();
    let c = &tool.commands[0];
    assert_eq!(c.timeout, Some(Duration::from_secs(10)));
    assert_eq!(c.args[0].default.as_deref(), Some("/var"));
    assert_eq!(c.template[3], vec![Segment::Arg(0)]);
}

#[test]
fn syntax_problems_say_where() {
    let toml = |text: &str| {
        parse_str(
            text,
            Format::Toml,
            Path::new("t.toml"),
            &ToolLimits::default(),
        )
        .unwrap_err()
        .remove(0)
        .to_string()
    };
    // An array left open on line 4 (found at its end), and a wrong type
    // on line 3 (the column counts characters: "é" is one).
    let broken = "name = \"t\"\n[[commands]]\nname = \"c\"\nexec_parts = [\"true]\n";
    assert_eq!(
        toml(broken),
        "t.toml: syntax: line 4, column 21: unclosed array, expected `]`"
    );
    let problem = toml("name = \"é\"\n[[commands]]\nname = 5\n");
    assert!(
        problem.starts_with("t.toml: syntax: line 3, column 8: "),
        "{problem}"
    );
    assert!(problem.contains("invalid type"), "{problem}");

    let json = parse_json("{\n  \"name\": \"t\",\n  \"commands\": [}\n")
        .unwrap_err()
        .remove(0)
        .to_string();
    assert_eq!(json, "t.json: syntax: line 3, column 16: expected value");
}

#[test]
fn line_and_column_count_characters_from_one() {
    let text = "ab\ncé\nx";
    assert_eq!(line_column(text, 0), (1, 1));
    assert_eq!(line_column(text, 3), (2, 1));
    assert_eq!(line_column(text, 6), (2, 3), "after the two-byte é");
    assert_eq!(line_column(text, 5), (2, 2), "inside é: its start");
    assert_eq!(line_column(text, 99), (3, 2), "past the end: the end");
}

#[test]
fn wire_shape_is_the_go_sdks() {
    let tool = parse_json(GO_SDK_JSON).unwrap();
    let wire = serde_json::to_value(tool.to_wire(|_| true).unwrap()).unwrap();
    let expected: serde_json::Value = serde_json::from_str(GO_SDK_JSON).unwrap();
    assert_eq!(wire, expected);
    assert!(tool.to_wire(|_| false).is_none());
}

#[test]
fn placeholders_anywhere_in_an_element() {
    let tool = parse_json(&one_command(
        r#"{"name": "c", "exec_parts": ["echo", "--tag={{.tag}}-{{ .n }}!"],
            "args": [{"name": "tag"}, {"name": "n", "type": "int"}]}"#,
    ))
    .unwrap();
    assert_eq!(
        tool.commands[0].template[1],
        vec![
            Segment::Literal("--tag=".into()),
            Segment::Arg(0),
            Segment::Literal("-".into()),
            Segment::Arg(1),
            Segment::Literal("!".into()),
        ]
    );
}

#[test]
fn every_load_time_rule_names_its_field() {
    let cases: &[(&str, &str)] = &[
        (r#"{"name": "", "commands": []}"#, "name: must not be empty"),
        (
            r#"{"name": "a b", "commands": []}"#,
            "name: \"a b\" may only",
        ),
        (
            &one_command(r#"{"name": "c/d", "exec_parts": ["true"]}"#),
            "commands[0].name:",
        ),
        (
            &one_command(r#"{"name": "", "exec_parts": ["true"]}"#),
            "commands[0].name: must not be empty",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": []}"#),
            "commands[0].exec_parts: must not be empty",
        ),
        (
            &one_command(r#"{"name": "c"}"#),
            "commands[0].exec_parts: must not be empty",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": ["echo", "{{.x}}"]}"#),
            "commands[0].exec_parts[1]: placeholder {{.x}} names no declared argument",
        ),
        (
            &one_command(
                r#"{"name": "c", "exec_parts": ["echo", "{{.x | printf}}"], "args": [{"name": "x"}]}"#,
            ),
            "commands[0].exec_parts[1]: {{.x | printf}} is not a placeholder",
        ),
        (
            &one_command(
                r#"{"name": "c", "exec_parts": ["echo", "{{if .x}}"], "args": [{"name": "x"}]}"#,
            ),
            "commands[0].exec_parts[1]:",
        ),
        (
            &one_command(
                r#"{"name": "c", "exec_parts": ["echo", "{{.x"], "args": [{"name": "x"}]}"#,
            ),
            "commands[0].exec_parts[1]: unclosed",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": ["{{.x}}"], "args": [{"name": "x"}]}"#),
            "commands[0].exec_parts[0]: the program must be fixed text",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": ["bin/x"]}"#),
            "commands[0].exec_parts[0]: the program must be an absolute path",
        ),
        (
            &one_command(
                r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x", "pattern": "("}]}"#,
            ),
            "commands[0].args[0].pattern: does not compile",
        ),
        (
            &one_command(
                r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x", "pattern": "a)|(b"}]}"#,
            ),
            "commands[0].args[0].pattern: does not compile",
        ),
        (
            &one_command(
                r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x", "pattern": "[a-z]+)|(.*"}]}"#,
            ),
            "commands[0].args[0].pattern: does not compile",
        ),
        (
            &one_command(
                r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x", "type": "float"}]}"#,
            ),
            "commands[0].args[0].type:",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x y"}]}"#),
            "commands[0].args[0].name:",
        ),
        (
            &one_command(
                r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x"}, {"name": "x"}]}"#,
            ),
            "commands[0].args[1].name: argument \"x\" is declared twice",
        ),
        (
            &one_command(
                r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x", "type": "int", "default": "abc"}]}"#,
            ),
            "commands[0].args[0].default:",
        ),
        (
            &one_command(
                r#"{"name": "c", "exec_parts": ["true"], "args": [{"name": "x", "pattern": "^[a-z]+$", "default": "ABC"}]}"#,
            ),
            "commands[0].args[0].default:",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": ["true"], "timeout": -1}"#),
            "commands[0].timeout: must not be negative",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": ["true"], "timeout": "-5s"}"#),
            "commands[0].timeout: negative duration",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": ["true"], "timeout": "2h"}"#),
            "commands[0].timeout: 2h0m0s is over the maximum of 1h0m0s",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": ["true"], "timeout": 3600000000001}"#),
            "commands[0].timeout:",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": ["true"], "timeout": "soon"}"#),
            "commands[0].timeout: invalid duration",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": ["true"], "env": {"PATH": "/tmp"}}"#),
            "commands[0].env.PATH:",
        ),
        (
            &one_command(
                r#"{"name": "c", "exec_parts": ["true"], "env": {"TAILKIT_JOB_ID": "x"}}"#,
            ),
            "commands[0].env.TAILKIT_JOB_ID:",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": ["true"], "env": {"A=B": "x"}}"#),
            "commands[0].env.A=B:",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": ["true"], "workdir": "tmp"}"#),
            "commands[0].workdir:",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": ["true"], "max_output_bytes": 0}"#),
            "commands[0].max_output_bytes:",
        ),
        (
            &one_command(r#"{"name": "c", "exec_parts": ["true"], "max_output_bytes": 67108865}"#),
            "commands[0].max_output_bytes: 67108865 is over the maximum of 67108864",
        ),
        (
            &one_command(
                r#"{"name": "c", "exec_parts": ["true"], "max_output_bytes": 9223372036854775807}"#,
            ),
            "commands[0].max_output_bytes: 9223372036854775807 is over the maximum",
        ),
        (
            r#"{"name": "t", "commands": [{"name": "c", "exec_parts": ["true"]}, {"name": "c", "exec_parts": ["true"]}]}"#,
            "commands[1].name: command \"c\" is declared twice",
        ),
        ("{not json", "syntax:"),
        (r#"{"name": 5}"#, "syntax:"),
    ];
    for (text, expected) in cases {
        let problems = problems_of(text);
        assert!(
            problems.iter().any(|p| p.starts_with(expected)),
            "{text}\nexpected a problem starting with {expected:?}, got {problems:?}"
        );
    }
}

#[test]
fn max_output_bytes_is_bounded() {
    let with = |n: u64| {
        parse_json(&one_command(&format!(
            r#"{{"name": "c", "exec_parts": ["true"], "max_output_bytes": {n}}}"#
        )))
    };
    let limit = ToolLimits::default().max_output_bytes;
    assert_eq!(limit, 64 << 20);
    let tool = with(limit as u64).unwrap();
    assert_eq!(tool.commands[0].max_output_bytes, Some(limit));
    assert!(with(limit as u64 + 1).is_err());
    assert!(with(i64::MAX as u64).is_err());
}

#[test]
fn a_directory_loads_valid_files_and_reports_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write(
        "a.json",
        r#"{"name": "dup", "commands": [{"name": "one", "exec_parts": ["true"]}]}"#,
    );
    write(
        "b.toml",
        "name = \"dup\"\n[[commands]]\nname = \"two\"\nexec_parts = [\"true\"]\n",
    );
    write("c.json", r#"{"name": "", "commands": []}"#);
    write("d.json", GO_SDK_JSON);
    write(".hidden.json", "garbage");
    write("notes.txt", "garbage");
    std::fs::create_dir(dir.path().join("sub.json")).unwrap();

    let loaded = load_dir(dir.path(), &ToolLimits::default());
    let names: Vec<_> = loaded.tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["docker-ops", "dup"]);
    assert!(
        loaded.tools[1].command("one").is_some(),
        "the first file by name wins"
    );
    assert_eq!(loaded.problems.len(), 2, "{:?}", loaded.problems);
    let dup = loaded
        .problems
        .iter()
        .find(|p| p.field == "name" && p.message.contains("also declared"))
        .unwrap();
    assert!(dup.file.ends_with("b.toml"));
    assert!(dup.message.contains("a.json") && dup.message.contains("b.toml"));
    assert!(loaded.problems.iter().any(|p| p.file.ends_with("c.json")));
    assert!(validate_path(&dir.path().join("d.json")).is_empty());
    assert_eq!(validate_path(&dir.path().join("c.json")).len(), 1);
    assert_eq!(validate_path(&dir.path().join("missing")).len(), 1);
    assert_eq!(
        validate_path(&dir.path().join("notes.txt"))[0].field,
        "file"
    );
}

#[test]
fn problems_print_as_file_field_message() {
    let p = Problem {
        file: "/etc/t.json".into(),
        field: "commands[0].name".into(),
        message: "must not be empty".into(),
    };
    assert_eq!(
        p.to_string(),
        "/etc/t.json: commands[0].name: must not be empty"
    );
}
