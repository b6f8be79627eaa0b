//! Request-time argument checks and argv substitution: a request body's
//! JSON object is validated against a command's declared arguments, and
//! each value is put into its own argv element (`{{.name}}` placeholders),
//! never through a shell.

use std::collections::BTreeMap;

use serde_json::Value;
use thiserror::Error;

use super::model::{Arg, ArgType, Command, Segment};

/// What the value in [`Prepared::audit_args`] is replaced with for
/// `sensitive` arguments.
pub const REDACTED: &str = "<redacted>";

/// Why a request's arguments were refused (HTTP 400, naming the argument).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ArgError {
    /// The body names an argument the command does not declare.
    #[error("unknown argument {0:?}")]
    Unknown(String),
    /// A required argument, or an optional one the command line uses and
    /// that has no default, was not supplied.
    #[error("missing argument {0:?}")]
    Missing(String),
    /// The JSON value has the wrong type.
    #[error("argument {name:?} must be {expected}")]
    WrongType {
        /// The argument.
        name: String,
        /// What was expected, for the message.
        expected: &'static str,
    },
    /// The value does not match the argument's pattern (whole value).
    #[error("argument {name:?} does not match the pattern {pattern}")]
    Pattern {
        /// The argument.
        name: String,
        /// The pattern as written.
        pattern: String,
    },
    /// The value is longer than the limit.
    #[error("argument {name:?} is longer than {max} bytes")]
    TooLong {
        /// The argument.
        name: String,
        /// The limit in bytes.
        max: usize,
    },
    /// The value contains a control character (newline, NUL, escape, ...).
    #[error("argument {0:?} contains a control character")]
    ControlCharacter(String),
    /// The value starts with `-` and the argument does not allow it.
    #[error("argument {0:?} starts with '-', which this command does not allow")]
    LeadingDash(String),
}

impl ArgError {
    /// The argument the error is about.
    pub fn arg(&self) -> &str {
        match self {
            ArgError::Unknown(n)
            | ArgError::Missing(n)
            | ArgError::ControlCharacter(n)
            | ArgError::LeadingDash(n) => n,
            ArgError::WrongType { name, .. }
            | ArgError::Pattern { name, .. }
            | ArgError::TooLong { name, .. } => name,
        }
    }
}

/// Validates one value for `arg` and returns its text form: the string
/// itself, the canonical decimal of an `int`, `true`/`false` for a `bool`.
/// Strings are accepted for `int` and `bool` too (the Go SDK sends every
/// value as a string).
///
/// # Errors
///
/// Wrong JSON type or unparsable text, longer than `max_bytes`, a control
/// character, a leading `-` (except for `int` and `allow_leading_dash`), or
/// no whole-value match of the pattern.
pub fn check_value(arg: &Arg, value: &Value, max_bytes: usize) -> Result<String, ArgError> {
    let wrong = |expected| ArgError::WrongType {
        name: arg.name.clone(),
        expected,
    };
    let text = match (arg.kind, value) {
        (ArgType::String, Value::String(s)) => s.clone(),
        (ArgType::String, _) => return Err(wrong("a string")),
        (ArgType::Int, Value::Number(n)) => {
            n.as_i64().ok_or_else(|| wrong("an integer"))?.to_string()
        }
        (ArgType::Int, Value::String(s)) if s.len() <= 32 => s
            .parse::<i64>()
            .map_err(|_| wrong("an integer"))?
            .to_string(),
        (ArgType::Int, _) => return Err(wrong("an integer")),
        (ArgType::Bool, Value::Bool(b)) => b.to_string(),
        (ArgType::Bool, Value::String(s)) if s == "true" || s == "false" => s.clone(),
        (ArgType::Bool, _) => return Err(wrong("true or false")),
    };
    if text.len() > max_bytes {
        return Err(ArgError::TooLong {
            name: arg.name.clone(),
            max: max_bytes,
        });
    }
    if text.chars().any(char::is_control) {
        return Err(ArgError::ControlCharacter(arg.name.clone()));
    }
    if text.starts_with('-') && arg.kind != ArgType::Int && !arg.allow_leading_dash {
        return Err(ArgError::LeadingDash(arg.name.clone()));
    }
    match &arg.pattern {
        Some(pattern) if !pattern.is_match(&text) => Err(ArgError::Pattern {
            name: arg.name.clone(),
            pattern: pattern.as_str().to_string(),
        }),
        _ => Ok(text),
    }
}

/// A request whose arguments passed validation: the final argv and what the
/// audit log may show of the arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The argv the command will receive, `exec_parts` with every
    /// placeholder replaced inside its own element.
    pub argv: Vec<String>,
    /// The arguments as the caller gave them, `sensitive` ones replaced by
    /// [`REDACTED`].
    pub audit_args: BTreeMap<String, Value>,
}

/// Validates `args` (a request body's JSON object) against `command` and
/// substitutes them into its argv.
///
/// # Errors
///
/// The first [`ArgError`]: unknown arguments first, then each declared
/// argument in order.
pub fn prepare(
    command: &Command,
    args: &serde_json::Map<String, Value>,
    max_value_bytes: usize,
) -> Result<Prepared, ArgError> {
    if let Some(unknown) = args.keys().find(|k| command.arg(k).is_none()) {
        return Err(ArgError::Unknown(unknown.clone()));
    }
    let mut values = Vec::with_capacity(command.args.len());
    for (index, arg) in command.args.iter().enumerate() {
        let value = match args.get(&arg.name) {
            Some(v) => Some(check_value(arg, v, max_value_bytes)?),
            None if arg.required => return Err(ArgError::Missing(arg.name.clone())),
            None if command.uses_arg(index) => Some(
                arg.default
                    .clone()
                    .ok_or_else(|| ArgError::Missing(arg.name.clone()))?,
            ),
            None => None,
        };
        values.push(value);
    }
    let argv = command
        .template
        .iter()
        .map(|segments| {
            let mut element = String::new();
            for segment in segments {
                match segment {
                    Segment::Literal(text) => element.push_str(text),
                    // `prepare` filled every argument the template uses.
                    Segment::Arg(i) => element.push_str(values[*i].as_deref().unwrap_or("")),
                }
            }
            element
        })
        .collect();
    Ok(Prepared {
        argv,
        audit_args: redact_args(command, args),
    })
}

/// The arguments as the audit log may show them: as given, with the values
/// of `sensitive` arguments replaced by [`REDACTED`].
pub fn redact_args(
    command: &Command,
    args: &serde_json::Map<String, Value>,
) -> BTreeMap<String, Value> {
    args.iter()
        .map(|(name, value)| {
            let sensitive = command.arg(name).is_some_and(|a| a.sensitive);
            let shown = if sensitive {
                Value::String(REDACTED.into())
            } else {
                value.clone()
            };
            (name.clone(), shown)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::tools::ToolLimits;
    use crate::tools::file::{Format, parse_str};

    fn command(args: &str, parts: &str) -> Arc<Command> {
        let text = format!(
            r#"{{"name": "t", "commands": [{{"name": "c", "exec_parts": {parts}, "args": {args}}}]}}"#
        );
        let tool = parse_str(
            &text,
            Format::Json,
            Path::new("t.json"),
            &ToolLimits::default(),
        )
        .unwrap();
        tool.commands[0].clone()
    }

    fn obj(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn five_args() -> Arc<Command> {
        command(
            r#"[{"name": "name", "required": true, "pattern": "^[a-z]+$"},
                {"name": "count", "type": "int"},
                {"name": "force", "type": "bool", "default": false},
                {"name": "note", "allow_leading_dash": true},
                {"name": "token", "sensitive": true, "default": "none"}]"#,
            r#"["/bin/echo", "{{.name}}", "--count={{.count}}", "{{ .force }}", "{{.note}}", "{{.token}}"]"#,
        )
    }

    #[test]
    fn substitution_is_per_element() {
        let c = five_args();
        let p = prepare(
            &c,
            &obj(
                json!({"name": "abc", "count": "-3", "note": "a b; $(rm) `x`", "token": "s3cret"}),
            ),
            4096,
        )
        .unwrap();
        assert_eq!(
            p.argv,
            [
                "/bin/echo",
                "abc",
                "--count=-3",
                "false",
                "a b; $(rm) `x`",
                "s3cret"
            ]
        );
        assert_eq!(p.audit_args["token"], REDACTED);
        assert_eq!(p.audit_args["note"], "a b; $(rm) `x`");
        assert!(
            !p.audit_args.contains_key("force"),
            "defaults are not caller input"
        );
    }

    #[test]
    fn int_and_bool_accept_json_values_and_strings() {
        let c = five_args();
        let p = prepare(
            &c,
            &obj(json!({"name": "a", "count": 7, "force": true, "note": "-x"})),
            4096,
        )
        .unwrap();
        assert_eq!(p.argv[2], "--count=7");
        assert_eq!(p.argv[3], "true");
        assert_eq!(p.argv[4], "-x", "allow_leading_dash");
        let p = prepare(
            &c,
            &obj(json!({"name": "a", "count": "+0012", "force": "false", "note": ""})),
            4096,
        )
        .unwrap();
        assert_eq!(p.argv[2], "--count=12", "ints are canonical");
    }

    #[test]
    fn every_request_time_rule() {
        let c = five_args();
        let base = json!({"name": "abc", "count": 1, "note": "n"});
        let with = |k: &str, v: Value| {
            let mut m = obj(base.clone());
            m.insert(k.into(), v);
            m
        };
        let cases: Vec<(serde_json::Map<String, Value>, ArgError)> = vec![
            (with("nope", json!("x")), ArgError::Unknown("nope".into())),
            (
                obj(json!({"count": 1, "note": "n"})),
                ArgError::Missing("name".into()),
            ),
            (
                obj(json!({"name": "abc", "count": 1})),
                ArgError::Missing("note".into()),
            ),
            (
                with("name", json!(5)),
                ArgError::WrongType {
                    name: "name".into(),
                    expected: "a string",
                },
            ),
            (
                with("name", json!(null)),
                ArgError::WrongType {
                    name: "name".into(),
                    expected: "a string",
                },
            ),
            (
                with("count", json!(1.5)),
                ArgError::WrongType {
                    name: "count".into(),
                    expected: "an integer",
                },
            ),
            (
                with("count", json!("12abc")),
                ArgError::WrongType {
                    name: "count".into(),
                    expected: "an integer",
                },
            ),
            (
                with("count", json!("99999999999999999999")),
                ArgError::WrongType {
                    name: "count".into(),
                    expected: "an integer",
                },
            ),
            (
                with("force", json!("yes")),
                ArgError::WrongType {
                    name: "force".into(),
                    expected: "true or false",
                },
            ),
            (
                with("force", json!(1)),
                ArgError::WrongType {
                    name: "force".into(),
                    expected: "true or false",
                },
            ),
            (
                with("name", json!("ABC")),
                ArgError::Pattern {
                    name: "name".into(),
                    pattern: "^[a-z]+$".into(),
                },
            ),
            (
                with("name", json!("abc def")),
                ArgError::Pattern {
                    name: "name".into(),
                    pattern: "^[a-z]+$".into(),
                },
            ),
            (
                with("note", json!("x".repeat(4097))),
                ArgError::TooLong {
                    name: "note".into(),
                    max: 4096,
                },
            ),
            (
                with("note", json!("a\nb")),
                ArgError::ControlCharacter("note".into()),
            ),
            (
                with("note", json!("a\u{0}b")),
                ArgError::ControlCharacter("note".into()),
            ),
            (
                with("note", json!("a\u{1b}[31m")),
                ArgError::ControlCharacter("note".into()),
            ),
            (
                with("note", json!("a\u{85}")),
                ArgError::ControlCharacter("note".into()),
            ),
            (
                with("token", json!("--output=/etc/passwd")),
                ArgError::LeadingDash("token".into()),
            ),
        ];
        for (args, expected) in cases {
            assert_eq!(prepare(&c, &args, 4096), Err(expected.clone()), "{args:?}");
            assert!(!expected.to_string().is_empty() && !expected.arg().is_empty());
        }
        assert!(prepare(&c, &with("note", json!("x".repeat(4096))), 4096).is_ok());
        assert!(
            prepare(&c, &with("count", json!(-5)), 4096).is_ok(),
            "ints may be negative"
        );
    }

    #[test]
    fn unused_optional_args_need_no_default() {
        let c = command(r#"[{"name": "unused"}]"#, r#"["true"]"#);
        assert_eq!(
            prepare(&c, &serde_json::Map::new(), 4096).unwrap().argv,
            ["true"]
        );
    }

    #[test]
    fn non_ascii_digits_are_refused() {
        let c = command(
            r#"[{"name": "n", "pattern": "^\\d+$"}]"#,
            r#"["echo", "{{.n}}"]"#,
        );
        assert!(prepare(&c, &obj(json!({"n": "123"})), 4096).is_ok());
        assert!(matches!(
            prepare(&c, &obj(json!({"n": "١٢٣"})), 4096),
            Err(ArgError::Pattern { .. })
        ));
    }
}
