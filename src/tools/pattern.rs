//! Argument patterns with Go's meaning: RE2 syntax where `\d`, `\w`, `\s`
//! and `\b` are ASCII-only (the `regex` crate makes them Unicode-aware), and
//! the pattern always has to match the whole value.

use std::fmt;

use regex::bytes::{Regex, RegexBuilder};
use regex_syntax::ast::{self, Ast};

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
        let rewritten = rewrite_perl_classes(source)?;
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

/// Gives `source` Go's meaning for the `regex` crate: RE2's bracket
/// literals first (see [`escape_class_brackets`]), then, on the parsed
/// pattern, every Perl class replaced by its ASCII definition in RE2:
/// `\d` = `[0-9]`, `\w` = `[0-9A-Za-z_]`, `\s` = `[\t\n\f\r ]` (no `\v`),
/// and word boundaries made ASCII (`(?-u:\b)`).
fn rewrite_perl_classes(source: &str) -> Result<String, String> {
    let source = escape_class_brackets(source);
    let ast = ast::parse::Parser::new()
        .parse(&source)
        .map_err(|e| e.to_string())?;
    let mut edits = ast::visit(&ast, PerlClasses::default())?;
    // From the end, so that earlier offsets stay valid.
    edits.sort_by_key(|(span, _)| std::cmp::Reverse(span.start.offset));
    let mut out = source.into_owned();
    for (span, replacement) in edits {
        out.replace_range(span.start.offset..span.end.offset, &replacement);
    }
    Ok(out)
}

/// Collects the replacement of each Perl class and word boundary.
#[derive(Default)]
struct PerlClasses(Vec<(ast::Span, String)>);

impl PerlClasses {
    fn class(&mut self, class: &ast::ClassPerl) {
        let set = match class.kind {
            ast::ClassPerlKind::Digit => "0-9",
            ast::ClassPerlKind::Word => "0-9A-Za-z_",
            ast::ClassPerlKind::Space => r"\t\n\x0C\r ",
        };
        let not = if class.negated { "^" } else { "" };
        // A nested class inside a bracket class is fine for the regex crate.
        self.0.push((class.span, format!("[{not}{set}]")));
    }
}

impl ast::Visitor for PerlClasses {
    type Output = Vec<(ast::Span, String)>;
    type Err = String;

    fn finish(self) -> Result<Self::Output, String> {
        Ok(self.0)
    }

    fn visit_pre(&mut self, node: &Ast) -> Result<(), String> {
        match node {
            Ast::ClassPerl(class) => self.class(class),
            Ast::Assertion(assertion) => {
                if let Some(text) = word_boundary(&assertion.kind) {
                    // ASCII word characters, as in Go; a bytes regex allows
                    // it (see `compile`).
                    self.0.push((assertion.span, format!("(?-u:{text})")));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn visit_class_set_item_pre(&mut self, item: &ast::ClassSetItem) -> Result<(), String> {
        if let ast::ClassSetItem::Perl(class) = item {
            self.class(class);
        }
        Ok(())
    }
}

/// The text of a word-boundary assertion, `None` for other assertions.
fn word_boundary(kind: &ast::AssertionKind) -> Option<&'static str> {
    use ast::AssertionKind::*;
    Some(match kind {
        WordBoundary => r"\b",
        NotWordBoundary => r"\B",
        WordBoundaryStart => r"\b{start}",
        WordBoundaryEnd => r"\b{end}",
        WordBoundaryStartAngle => r"\<",
        WordBoundaryEndAngle => r"\>",
        WordBoundaryStartHalf => r"\b{start-half}",
        WordBoundaryEndHalf => r"\b{end-half}",
        StartLine | EndLine | StartText | EndText => return None,
    })
}

/// RE2 reads a `[` inside a bracket class as a literal (unless it starts a
/// POSIX class such as `[:alpha:]`); the `regex` crate reads it as a nested
/// class. Escapes such a `[` so that both read the same class. Everything
/// else is left as written.
fn escape_class_brackets(source: &str) -> std::borrow::Cow<'_, str> {
    if !source.contains('[') {
        return source.into();
    }
    let mut out = String::with_capacity(source.len() + 4);
    let mut chars = source.chars().peekable();
    let mut in_class = false;
    // Right after `[` or `[^`, where a `]` is a literal.
    let mut class_start = false;
    while let Some(c) = chars.next() {
        let starting = std::mem::take(&mut class_start);
        match c {
            '\\' => {
                out.push(c);
                out.extend(chars.next());
            }
            '[' if !in_class => {
                in_class = true;
                class_start = true;
                out.push('[');
                if chars.next_if_eq(&'^').is_some() {
                    out.push('^');
                }
            }
            '[' if chars.peek() == Some(&':') => {
                out.push('[');
                for d in chars.by_ref() {
                    out.push(d);
                    if d == ']' {
                        break;
                    }
                }
            }
            '[' => out.push_str(r"\["),
            ']' if in_class && !starting => {
                in_class = false;
                out.push(']');
            }
            other => out.push(other),
        }
    }
    out.into()
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
