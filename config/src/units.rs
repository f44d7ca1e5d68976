//! Durations (`1m30s`), sizes (`6MB`) and schedule rates (`rate(5 minutes)`).

use std::time::Duration;

const NANOS_PER_MS: u128 = 1_000_000;
const NANOS_PER_S: u128 = 1_000 * NANOS_PER_MS;

const DURATION_UNITS: &[(&str, u128)] = &[
    ("ms", NANOS_PER_MS),
    ("s", NANOS_PER_S),
    ("m", 60 * NANOS_PER_S),
    ("h", 3_600 * NANOS_PER_S),
    ("d", 86_400 * NANOS_PER_S),
];

const SIZE_UNITS: &[(&str, u128)] = &[
    ("b", 1),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
];

/// A decimal number split at its point, kept exact so that `0.1s` is exactly 100 ms.
struct Decimal<'a> {
    whole: &'a str,
    fraction: &'a str,
}

impl Decimal<'_> {
    /// `self × unit`, rounded down to a whole number of the unit's base (nanoseconds or bytes).
    fn times(&self, unit: u128) -> Option<u128> {
        let whole: u128 = if self.whole.is_empty() {
            0
        } else {
            self.whole.parse().ok()?
        };
        // Digits past the 18th are below a nanosecond even for days, so they can go.
        let digits = &self.fraction[..self.fraction.len().min(18)];
        let fraction: u128 = if digits.is_empty() {
            0
        } else {
            digits.parse().ok()?
        };
        let denominator = 10u128.pow(u32::try_from(digits.len()).ok()?);
        whole
            .checked_mul(unit)?
            .checked_add(unit.checked_mul(fraction)? / denominator)
    }
}

/// Splits `s` into a leading decimal number and the rest. `None` when it does not start with a
/// digit or a point followed by a digit.
fn leading_decimal(s: &str) -> Option<(Decimal<'_>, &str)> {
    let whole_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (whole, rest) = s.split_at(whole_end);
    let (fraction, rest) = match rest.strip_prefix('.') {
        Some(after) => {
            let end = after
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(after.len());
            after.split_at(end)
        }
        None => ("", rest),
    };
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    Some((Decimal { whole, fraction }, rest))
}

fn duration_from_nanos(nanos: u128) -> Option<Duration> {
    let secs = u64::try_from(nanos / NANOS_PER_S).ok()?;
    let sub = u32::try_from(nanos % NANOS_PER_S).ok()?;
    Some(Duration::new(secs, sub))
}

/// Parses a duration such as `500ms`, `30s`, `5m`, `1h`, `1d`, `1m30s` or `1.5s`.
///
/// A bare number is refused rather than guessed at: `timeout: 30` could mean seconds or
/// milliseconds, and Lambda users have been bitten by both.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty duration: expected a number with a unit, like `30s`".to_owned());
    }
    if text.starts_with('-') {
        return Err(format!("invalid duration `{text}`: must not be negative"));
    }
    if leading_decimal(text).is_some_and(|(_, rest)| rest.is_empty()) {
        return Err(format!(
            "invalid duration `{text}`: missing unit, add one of ms, s, m, h, d (e.g. `{text}s`)"
        ));
    }
    let mut rest = text;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let Some((number, after)) = leading_decimal(rest) else {
            return Err(format!(
                "invalid duration `{text}`: expected a number with a unit (ms, s, m, h, d), like `30s` or `1m30s`"
            ));
        };
        let unit_end = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        let Some(&(_, nanos)) = DURATION_UNITS.iter().find(|(name, _)| *name == unit) else {
            let shown = if unit.is_empty() { after } else { unit };
            return Err(format!(
                "invalid duration `{text}`: unknown unit `{shown}`, expected one of ms, s, m, h, d"
            ));
        };
        total = number
            .times(nanos)
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| format!("invalid duration `{text}`: too large"))?;
        rest = after;
    }
    duration_from_nanos(total).ok_or_else(|| format!("invalid duration `{text}`: too large"))
}

/// Parses a size such as `6MB`, `256KB`, `1GB`, `512B` or `1MiB`; a bare integer is bytes.
/// Decimal units are powers of 1000 and binary ones (`KiB`, `MiB`, `GiB`) powers of 1024, as
/// Lambda's own limits (50 MB zipped) are stated in decimal units.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    if text.starts_with('-') {
        return Err(format!("invalid size `{text}`: must not be negative"));
    }
    let Some((number, unit)) = leading_decimal(text) else {
        return Err(format!(
            "invalid size `{text}`: expected a number with an optional unit, like `6MB`, `256KiB` or `1024`"
        ));
    };
    let unit = unit.trim_start();
    let multiplier = if unit.is_empty() {
        if !number.fraction.is_empty() {
            return Err(format!(
                "invalid size `{text}`: a size without a unit is a whole number of bytes"
            ));
        }
        1
    } else {
        let lower = unit.to_ascii_lowercase();
        match SIZE_UNITS.iter().find(|(name, _)| *name == lower) {
            Some(&(_, multiplier)) => multiplier,
            None => {
                return Err(format!(
                    "invalid size `{text}`: unknown unit `{unit}`, expected one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
                ));
            }
        }
    };
    number
        .times(multiplier)
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| format!("invalid size `{text}`: too large"))
}

const RATE_UNITS: &[(&str, u64)] = &[
    ("second", 1),
    ("seconds", 1),
    ("minute", 60),
    ("minutes", 60),
    ("hour", 3_600),
    ("hours", 3_600),
    ("day", 86_400),
    ("days", 86_400),
];

/// Parses a schedule rate: EventBridge's `rate(5 minutes)`, the same without the wrapper
/// (`5 minutes`, `1 day`), or a plain duration (`30s`).
pub(crate) fn parse_rate(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let inner = match text.strip_prefix("rate(") {
        Some(after) => after.strip_suffix(')').ok_or_else(|| {
            format!("invalid rate `{text}`: missing `)`, expected e.g. `rate(5 minutes)`")
        })?,
        None => text,
    }
    .trim();
    let rate = match inner.split_once(char::is_whitespace) {
        Some((value, unit)) => {
            let unit = unit.trim();
            let value: u64 = value.parse().map_err(|_| {
                format!("invalid rate `{text}`: `{value}` is not a whole number, expected e.g. `5 minutes`")
            })?;
            let Some(&(_, secs)) = RATE_UNITS.iter().find(|(name, _)| *name == unit) else {
                return Err(format!(
                    "invalid rate `{text}`: unknown unit `{unit}`, expected seconds, minutes, hours or days"
                ));
            };
            value
                .checked_mul(secs)
                .map(Duration::from_secs)
                .ok_or_else(|| format!("invalid rate `{text}`: too large"))?
        }
        None => parse_duration(inner).map_err(|e| {
            format!("{e}; a rate can also be written `rate(5 minutes)` or `5 minutes`")
        })?,
    };
    if rate.is_zero() {
        return Err(format!("invalid rate `{text}`: must be greater than zero"));
    }
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn durations_accept_every_unit_and_combinations() {
        assert_eq!(parse_duration("500ms"), Ok(ms(500)));
        assert_eq!(parse_duration("30s"), Ok(ms(30_000)));
        assert_eq!(parse_duration("5m"), Ok(ms(300_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("1d"), Ok(ms(86_400_000)));
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration("1h2m3s4ms"), Ok(ms(3_723_004)));
        assert_eq!(parse_duration(" 2s "), Ok(ms(2_000)));
    }

    #[test]
    fn fractional_durations_are_exact() {
        assert_eq!(parse_duration("1.5s"), Ok(ms(1_500)));
        assert_eq!(parse_duration("0.1s"), Ok(ms(100)));
        assert_eq!(parse_duration(".25h"), Ok(ms(900_000)));
        assert_eq!(parse_duration("0.000000001s"), Ok(Duration::from_nanos(1)));
    }

    #[test]
    fn bare_number_duration_asks_for_a_unit() {
        let err = parse_duration("30").unwrap_err();
        assert_eq!(
            err,
            "invalid duration `30`: missing unit, add one of ms, s, m, h, d (e.g. `30s`)"
        );
        assert!(parse_duration("1.5").unwrap_err().contains("missing unit"));
    }

    #[test]
    fn malformed_durations_are_rejected() {
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").unwrap_err().contains("negative"));
        assert!(
            parse_duration("5x")
                .unwrap_err()
                .contains("unknown unit `x`")
        );
        assert!(parse_duration("5 s").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1m30").is_err());
        assert!(
            parse_duration("99999999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn sizes_distinguish_decimal_and_binary_units() {
        assert_eq!(parse_size("6MB"), Ok(6_000_000));
        assert_eq!(parse_size("256KB"), Ok(256_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("1MiB"), Ok(1_048_576));
        assert_eq!(parse_size("2KiB"), Ok(2_048));
        assert_eq!(parse_size("1GiB"), Ok(1_073_741_824));
        assert_eq!(parse_size("1024"), Ok(1_024));
        assert_eq!(parse_size("1.5MB"), Ok(1_500_000));
        assert_eq!(parse_size("6 mb"), Ok(6_000_000));
    }

    #[test]
    fn malformed_sizes_are_rejected() {
        assert!(parse_size("").is_err());
        assert!(parse_size("MB").is_err());
        assert!(parse_size("-1MB").unwrap_err().contains("negative"));
        assert!(parse_size("6XB").unwrap_err().contains("unknown unit `XB`"));
        assert!(
            parse_size("1.5")
                .unwrap_err()
                .contains("whole number of bytes")
        );
        assert!(
            parse_size("99999999999TB")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn rates_accept_eventbridge_and_duration_forms() {
        assert_eq!(parse_rate("rate(5 minutes)"), Ok(ms(300_000)));
        assert_eq!(parse_rate("5 minutes"), Ok(ms(300_000)));
        assert_eq!(parse_rate("1 minute"), Ok(ms(60_000)));
        assert_eq!(parse_rate("10 seconds"), Ok(ms(10_000)));
        assert_eq!(parse_rate("2 hours"), Ok(ms(7_200_000)));
        assert_eq!(parse_rate("1 day"), Ok(ms(86_400_000)));
        assert_eq!(parse_rate("30s"), Ok(ms(30_000)));
        assert_eq!(parse_rate("rate(1m30s)"), Ok(ms(90_000)));
    }

    #[test]
    fn zero_and_malformed_rates_are_rejected() {
        assert!(
            parse_rate("0 minutes")
                .unwrap_err()
                .contains("greater than zero")
        );
        assert!(parse_rate("0s").unwrap_err().contains("greater than zero"));
        assert!(
            parse_rate("rate(5 minutes")
                .unwrap_err()
                .contains("missing `)`")
        );
        assert!(
            parse_rate("5 fortnights")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(
            parse_rate("five minutes")
                .unwrap_err()
                .contains("whole number")
        );
        assert!(parse_rate("5").unwrap_err().contains("missing unit"));
    }
}
