//! Arguments reach the child as one argv element each, never a shell
//! (refused values are the router tests' `every_argument_rule_...`).

use super::*;

/// The child prints its own argv (NUL-separated) from /proc: exactly what
/// execve gave it.
fn argv_printer() -> Stack {
    Stack::command(
        json!([
            "sh",
            "-c",
            "cat /proc/$$/cmdline",
            "{{.v}}",
            "--opt={{.v}}",
            "{{.w}}"
        ]),
        json!([{"name": "v", "required": true, "allow_leading_dash": true},
               {"name": "w", "default": "end"}]),
        settings(),
    )
}

fn argv_of(result: &Value) -> Vec<String> {
    let out = result["stdout"].as_str().unwrap();
    out.strip_suffix('\0')
        .unwrap_or(out)
        .split('\0')
        .map(String::from)
        .collect()
}

#[tokio::test]
async fn injection_attempts_stay_one_argv_element_and_reach_no_shell() {
    let d = argv_printer();
    let marker = d.dir.path().join("pwned");
    let m = marker.display();
    for value in [
        "two words".to_string(),
        format!("x; touch {m}"),
        format!("$(touch {m})"),
        format!("`touch {m}`"),
        format!("' \"; touch {m}; echo \""),
        "--output=/etc/passwd".to_string(),
        "*".to_string(),
        "{{.w}}".to_string(),
    ] {
        let result = d.run(&json!({"v": value}).to_string()).await;
        assert_eq!(result["status"], "completed", "{result}");
        assert_eq!(
            argv_of(&result),
            [
                "sh",
                "-c",
                "cat /proc/$$/cmdline",
                &value,
                &format!("--opt={value}"),
                "end"
            ],
            "argv for {value:?}"
        );
    }
    assert!(!marker.exists(), "no shell ever ran a value");
}
