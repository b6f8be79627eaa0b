//! Go's `time.ParseDuration`, exactly: tool files written by the Go SDK may
//! carry `"timeout": "1m30s"`, and `?wait=` takes the same syntax.

use std::time::Duration;

use thiserror::Error;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DurationError {
    /// Not Go duration syntax (`300ms`, `1.5h`, `2h45m`, `1us`, `1µs`).
    #[error("invalid duration {0:?} (expected Go syntax such as 300ms, 30s, 1m30s, 1.5h)")]
    Syntax(String),
    /// A negative duration where only non-negative ones make sense.
    #[error("negative duration {0:?}")]
    Negative(String),
    /// Larger than Go's maximum (about 292 years).
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

/// Go's accumulator bound while parsing: `1 << 63`, one past
/// `time.Duration`'s maximum (the magnitude of its minimum).
const LIMIT: u64 = 1 << 63;

/// Parses a Go duration string into a non-negative [`Duration`], with Go's
/// rules: a sequence of decimal numbers, each with an optional fraction and a
/// unit (`ns`, `us`, `µs`, `μs`, `ms`, `s`, `m`, `h`), an optional leading
/// sign; the bare string `0` is zero. Fractions are handled as Go does: the
/// leading fraction digits are kept while they fit in 63 bits, the rest are
/// ignored, and the fraction is scaled to the unit in `f64` and truncated to
/// whole nanoseconds, so every input gives the same value as in Go. All
/// arithmetic is checked: no input panics or wraps.
///
/// # Errors
///
/// [`DurationError::Syntax`] for anything Go would refuse,
/// [`DurationError::Negative`] for a negative non-zero value and
/// [`DurationError::Overflow`] beyond Go's `time.Duration` range (Go's
/// "invalid duration").
///
/// ```
/// use std::time::Duration;
/// use tailkitd::tools::duration::parse_go_duration;
///
/// assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
/// assert_eq!(parse_go_duration("300ms"), Ok(Duration::from_millis(300)));
/// assert!(parse_go_duration("30").is_err(), "a unit is required");
/// ```
pub fn parse_go_duration(input: &str) -> Result<Duration, DurationError> {
    let syntax = || DurationError::Syntax(input.to_string());
    let overflow = || DurationError::Overflow(input.to_string());
    let mut s = input;
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(syntax());
    }
    let mut total: u64 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, rest) = s.split_at(int_len);
        s = rest;
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            (frac_part, s) = rest.split_at(frac_len);
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(syntax());
        }
        let unit_len = s
            .char_indices()
            .find(|(_, c)| *c == '.' || c.is_ascii_digit())
            .map_or(s.len(), |(i, _)| i);
        let (unit, rest) = s.split_at(unit_len);
        s = rest;
        let unit_nanos: u64 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(syntax()),
        };
        let value = leading_int(int_part).ok_or_else(overflow)?;
        let mut nanos = value
            .checked_mul(unit_nanos)
            .filter(|n| *n <= LIMIT)
            .ok_or_else(overflow)?;
        let (frac, scale) = leading_fraction(frac_part);
        if frac > 0 {
            // Go: `v += uint64(float64(f) * (float64(unit) / scale))`. The
            // fraction is below one, so the product is at most `unit_nanos`
            // (rounding included) and the cast cannot saturate.
            let part = (frac as f64 * (unit_nanos as f64 / scale)) as u64;
            nanos = nanos
                .checked_add(part)
                .filter(|n| *n <= LIMIT)
                .ok_or_else(overflow)?;
        }
        total = total
            .checked_add(nanos)
            .filter(|t| *t <= LIMIT)
            .ok_or_else(overflow)?;
    }
    if negative && total != 0 {
        return Err(DurationError::Negative(input.to_string()));
    }
    if total > LIMIT - 1 {
        return Err(overflow());
    }
    Ok(Duration::from_nanos(total))
}

/// The value of a run of ASCII digits, as Go's `leadingInt`: `None` past
/// `1 << 63`.
fn leading_int(digits: &str) -> Option<u64> {
    digits.bytes().try_fold(0u64, |x, b| {
        x.checked_mul(10)?
            .checked_add(u64::from(b - b'0'))
            .filter(|x| *x <= LIMIT)
    })
}

/// A run of fraction digits as Go's `leadingFraction`: the value of the
/// leading digits that fit (`value * 10 + digit` stays within `1 << 63`) and
/// `10^(digits kept)`; later digits are ignored.
fn leading_fraction(digits: &str) -> (u64, f64) {
    let mut value: u64 = 0;
    let mut scale: f64 = 1.0;
    for b in digits.bytes() {
        let next = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .filter(|v| *v <= LIMIT);
        match next {
            // Go stops at `value > (1<<63 - 1) / 10` before multiplying;
            // `checked_mul` and the bound above refuse the same digits.
            Some(v) if value <= (LIMIT - 1) / 10 => {
                value = v;
                scale *= 10.0;
            }
            _ => break,
        }
    }
    (value, scale)
}

/// Formats a duration the way Go's `Duration.String` does (`1m30s`, `300ms`),
/// for messages that operators compare with their tool files.
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}µs", trim_fraction(nanos, 1_000));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", trim_fraction(nanos, 1_000_000));
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let sub = u128::from(s) * 1_000_000_000 + u128::from(d.subsec_nanos());
    let seconds = format!("{}s", trim_fraction(sub, 1_000_000_000));
    match (h, m) {
        (0, 0) => seconds,
        (0, m) => format!("{m}m{seconds}"),
        (h, m) => format!("{h}h{m}m{seconds}"),
    }
}

fn trim_fraction(value: u128, unit: u128) -> String {
    let whole = value / unit;
    let frac = value % unit;
    if frac == 0 {
        return whole.to_string();
    }
    let width = unit.ilog10() as usize;
    let digits = format!("{frac:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn parses_what_go_parses() {
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("300ms"), Ok(ms(300)));
        assert_eq!(parse_go_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("2h45m"), Ok(Duration::from_secs(9900)));
        assert_eq!(parse_go_duration("1us"), Ok(Duration::from_micros(1)));
        assert_eq!(parse_go_duration("1µs"), Ok(Duration::from_micros(1)));
        assert_eq!(parse_go_duration("1μs"), Ok(Duration::from_micros(1)));
        assert_eq!(parse_go_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_go_duration("+5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_go_duration(".5s"), Ok(ms(500)));
        assert_eq!(parse_go_duration("1.s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("1m0.25s"), Ok(ms(60_250)));
        assert_eq!(parse_go_duration("-0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(
            parse_go_duration("1.000000001s"),
            Ok(Duration::new(1, 1)),
            "nanosecond precision"
        );
        assert_eq!(
            parse_go_duration("0.3333333333s"),
            Ok(Duration::new(0, 333_333_333))
        );
    }

    #[test]
    fn refuses_what_go_refuses() {
        for bad in [
            "", "5", "s", ".s", "1x", "1 s", "1s ", "1S", "--1s", "1h-1m", "one",
        ] {
            assert!(
                matches!(parse_go_duration(bad), Err(DurationError::Syntax(_))),
                "{bad:?} should be a syntax error"
            );
        }
        assert!(matches!(
            parse_go_duration("-1s"),
            Err(DurationError::Negative(_))
        ));
        assert!(matches!(
            parse_go_duration("9999999999h"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(
            parse_go_duration("2562048h"),
            Err(DurationError::Overflow(_))
        ));
    }

    /// Expected values from Go 1.26's `time.ParseDuration`.
    #[test]
    fn long_fractions_keep_the_digits_go_keeps() {
        let nanos = |n: u64| Ok(Duration::from_nanos(n));
        // Used to overflow u128 (a panic in debug builds, 197 s in release).
        assert_eq!(
            parse_go_duration("0.99999999999999999999999999h"),
            nanos(3_600_000_000_000)
        );
        assert_eq!(
            parse_go_duration("0.9999999999999999999h"),
            nanos(3_600_000_000_000)
        );
        assert_eq!(
            parse_go_duration("0.3333333333333333333333333333333h"),
            nanos(1_200_000_000_000)
        );
        assert_eq!(
            parse_go_duration("0.123456789123456789123h"),
            nanos(444_444_440_844)
        );
        assert_eq!(
            parse_go_duration("1.0000000000000000000000000000000000000001s"),
            nanos(1_000_000_000)
        );
        assert_eq!(
            parse_go_duration(&format!("0.{}s", "9".repeat(10_000))),
            nanos(1_000_000_000)
        );
        assert_eq!(
            parse_go_duration(&format!("1.{}h", "0".repeat(10_000))),
            nanos(3_600_000_000_000)
        );
        assert_eq!(
            parse_go_duration("0.000000000000000000000000000001h"),
            nanos(0)
        );
        assert_eq!(parse_go_duration("0.0000000001s"), nanos(0));
        assert_eq!(
            parse_go_duration("2562047.7h"),
            nanos(9_223_371_720_000_000_000)
        );
        assert_eq!(
            parse_go_duration("2562047h47m16.854775807s"),
            nanos(i64::MAX as u64),
            "the maximum itself"
        );
        assert_eq!(
            parse_go_duration("9223372036854775807ns"),
            nanos(i64::MAX as u64)
        );
    }

    #[test]
    fn overflow_is_an_error_never_a_panic() {
        for bad in [
            "9223372036854775808ns",
            "18446744073709551616ns",
            "99999999999999999999ns",
            "99999999999999999999999999999999999999999h",
            "2562047h47m16.854775808s",
            "2562047h47m16.854775807999999999999s",
            "2562048h",
            "1000000h1000000h1000000h",
            "2000000h2000000h",
            "-9999999999h",
        ] {
            assert!(
                matches!(parse_go_duration(bad), Err(DurationError::Overflow(_))),
                "{bad:?} should overflow, got {:?}",
                parse_go_duration(bad)
            );
        }
        let many = "1000000h".repeat(10_000);
        assert!(matches!(
            parse_go_duration(&many),
            Err(DurationError::Overflow(_))
        ));
        let many_fractions = "1000000.99999999999999999999999999h".repeat(3);
        assert!(matches!(
            parse_go_duration(&many_fractions),
            Err(DurationError::Overflow(_))
        ));
        let long_int = format!("{}s", "9".repeat(10_000));
        assert!(matches!(
            parse_go_duration(&long_int),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format_go_duration(Duration::ZERO), "0s");
        assert_eq!(format_go_duration(ms(300)), "300ms");
        assert_eq!(format_go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(format_go_duration(ms(1500)), "1.5s");
        assert_eq!(format_go_duration(Duration::from_micros(2)), "2µs");
    }
}
