//! Argument patterns with Go's meaning: RE2 syntax where `\d`, `\w`, `\s`
//! and `\b` are ASCII-only (the `regex` crate makes them Unicode-aware), and
//! the pattern always has to match the whole value.

use std::fmt;

use regex::bytes::{Regex, RegexBuilder};

/// A compiled argument pattern. Matches whole values only, with Go's ASCII
/// Perl classes, whatever anchors or flags the source carries itself.
///
/// ```
/// use tailkitd::tools::pattern::ArgPattern;
///
/// let digits = ArgPattern::new(r"\d+").unwrap();
/// assert!(digits.is_match("123"));
/// assert!(!digits.is_match("١٢٣"), "Arabic-Indic digits are not \\d in Go");
/// assert!(!digits.is_match("12a"), "the whole value must match");
/// ```
#[derive(Clone)]
pub struct ArgPattern {
    source: String,
    regex: Regex,
}

impl ArgPattern {
    /// Compiles `source` as `^(?:source)$` with Go's class semantics.
    ///
    /// # Errors
    ///
    /// When the pattern does not compile on its own (so that `a)|(b`, which
    /// the wrapper would turn into `^(?:a)|(b)$`, cannot escape the anchors);
    /// the message is the regex parser's.
    pub fn new(source: &str) -> Result<Self, String> {
        let rewritten = rewrite_perl_classes(source);
        // The pattern alone first: wrapped, an unbalanced `)` closes the
        // wrapper's group early and the rest is an unanchored alternative.
        compile(&rewritten)?;
        let regex = compile(&format!("^(?:{rewritten})$"))?;
        Ok(ArgPattern {
            source: source.to_string(),
            regex,
        })
    }

    /// Whether the whole of `value` matches.
    pub fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value.as_bytes())
    }

    /// The pattern as written in the tool file.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// A bytes regex, because ASCII `\B` may match between the bytes of a UTF-8
/// sequence and a `&str` regex refuses it; Unicode mode stays on so that `.`
/// and literals still match whole characters.
fn compile(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| e.to_string())
}

impl PartialEq for ArgPattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for ArgPattern {}

impl fmt::Debug for ArgPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ArgPattern({:?})", self.source)
    }
}

/// Rewrites the Perl classes to their ASCII definitions in RE2 (Go):
/// `\d` = `[0-9]`, `\w` = `[0-9A-Za-z_]`, `\s` = `[\t\n\f\r ]`, and `\b`/`\B`
/// to ASCII word boundaries. Inside a bracket class the replacement is a
/// nested class, which the `regex` crate accepts.
fn rewrite_perl_classes(source: &str) -> String {
    let mut out = String::with_capacity(source.len() + 16);
    let mut chars = source.chars().peekable();
    let mut in_class = false;
    // Whether the previous token opened a class (`[` or `[^`), where a `]`
    // is a literal.
    let mut class_start = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let Some(next) = chars.next() else {
                    out.push('\\');
                    break;
                };
                class_start = false;
                match (next, in_class) {
                    ('d', _) => out.push_str("[0-9]"),
                    ('D', _) => out.push_str("[^0-9]"),
                    ('w', _) => out.push_str("[0-9A-Za-z_]"),
                    ('W', _) => out.push_str("[^0-9A-Za-z_]"),
                    ('s', _) => out.push_str(r"[\t\n\x0C\r ]"),
                    ('S', _) => out.push_str(r"[^\t\n\x0C\r ]"),
                    ('b', false) => out.push_str(r"(?-u:\b)"),
                    ('B', false) => out.push_str(r"(?-u:\B)"),
                    (other, _) => {
                        out.push('\\');
                        out.push(other);
                    }
                }
            }
            '[' if !in_class => {
                in_class = true;
                class_start = true;
                out.push('[');
                if chars.peek() == Some(&'^') {
                    chars.next();
                    out.push('^');
                }
            }
            '[' if chars.peek() == Some(&':') => {
                // A POSIX class such as `[:alpha:]`: copy it whole.
                out.push('[');
                for d in chars.by_ref() {
                    out.push(d);
                    if d == ']' {
                        break;
                    }
                }
                class_start = false;
            }
            '[' => {
                // A literal `[` inside a class in RE2; the regex crate would
                // read it as a nested class.
                out.push_str(r"\[");
                class_start = false;
            }
            ']' if in_class && !class_start => {
                in_class = false;
                out.push(']');
            }
            other => {
                class_start = false;
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ArgPattern {
        ArgPattern::new(s).unwrap()
    }

    #[test]
    fn digits_are_ascii_only() {
        let d = p(r"^\d+$");
        assert!(d.is_match("123"));
        assert!(!d.is_match("١٢٣"), "Arabic-Indic digits");
        assert!(!d.is_match("１２"), "full-width digits");
        assert!(!p(r"[\d]+").is_match("١"));
        assert!(p(r"[\d]+").is_match("42"));
        assert!(p(r"\D").is_match("é"));
    }

    #[test]
    fn word_and_space_are_ascii_only() {
        assert!(p(r"\w+").is_match("abc_09"));
        assert!(!p(r"\w+").is_match("é"));
        assert!(!p(r"\w+").is_match("日本"));
        assert!(p(r"a\sb").is_match("a b"));
        assert!(!p(r"a\sb").is_match("a\u{a0}b"), "no-break space");
        assert!(!p(r"a\sb").is_match("a\u{b}b"), "Go's \\s has no \\v");
        assert!(p(r"[^\s]+").is_match("x"));
        assert!(!p(r"[^\s]+").is_match("x y"));
    }

    #[test]
    fn word_boundaries_are_ascii() {
        // With ASCII \b, é is not a word character, so there is a boundary
        // between it and `a`.
        assert!(p(r"é\ba").is_match("éa"));
        assert!(!p(r"é\Ba").is_match("éa"));
        assert!(p(r"a\Bb").is_match("ab"));
    }

    #[test]
    fn non_ascii_literals_and_dot_still_match_characters() {
        assert!(p("café").is_match("café"));
        assert!(p("^.$").is_match("é"));
        assert!(p("[é-ë]+").is_match("éêë"));
        assert!(!p("[é-ë]+").is_match("e"));
    }

    #[test]
    fn patterns_match_the_whole_value() {
        assert!(!p("abc").is_match("xabcx"));
        assert!(!p("a|b").is_match("ab"));
        assert!(p("a|b").is_match("b"));
        assert!(!p(r"^[a-z]+").is_match("abc; rm -rf /"));
        assert!(!p(r"^[a-z]+$").is_match("abc\n"));
        assert!(!p(r"(?m)^[a-z]+$").is_match("abc\ndef"));
    }

    #[test]
    fn classes_with_brackets_and_posix_names() {
        assert!(p(r"[]a]+").is_match("]a"));
        assert!(p(r"[^]a]").is_match("b"));
        assert!(p(r"[[:alpha:]]+").is_match("abc"));
        assert!(p(r"[\]\\]+").is_match(r"]\"));
        assert!(p(r"[[]").is_match("["));
        assert!(p(r"\\d").is_match(r"\d"), "escaped backslash then d");
    }

    #[test]
    fn bad_patterns_are_errors() {
        assert!(ArgPattern::new("(").is_err());
        assert!(ArgPattern::new("[a-").is_err());
        assert!(ArgPattern::new("a{2,1}").is_err());
    }

    #[test]
    fn unbalanced_groups_cannot_escape_the_anchors() {
        // Wrapped as `^(?:a)|(b)$` these would compile and match `axyz` and
        // `"; rm -rf /"`; Go refuses them, and so do we.
        for bad in ["a)|(b", "[a-z]+)|(.*", ")(", "a)", "(?:a))|((?:b"] {
            assert!(ArgPattern::new(bad).is_err(), "{bad:?} must not compile");
        }
        assert!(p("(a)|(b)").is_match("b"));
        assert!(!p("(a)|(b)").is_match("axyz"));
    }
}
