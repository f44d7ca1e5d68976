//! EventBridge cron expressions (`cron(0 12 * * ? *)`), checked field by field and translated
//! to the seven-field syntax of the `cron` crate, which the schedule source runs on.

use std::str::FromStr;

/// One EventBridge field: its name in messages, its numeric range and, for month and
/// day-of-week, the names it accepts (ordinal = index + min).
struct FieldSpec {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MONTHS: &[&str] = &[
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: &[&str] = &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

const FIELDS: [FieldSpec; 6] = [
    FieldSpec {
        name: "minutes",
        min: 0,
        max: 59,
        names: &[],
    },
    FieldSpec {
        name: "hours",
        min: 0,
        max: 23,
        names: &[],
    },
    FieldSpec {
        name: "day-of-month",
        min: 1,
        max: 31,
        names: &[],
    },
    FieldSpec {
        name: "month",
        min: 1,
        max: 12,
        names: MONTHS,
    },
    // 1 is Sunday in EventBridge and in the `cron` crate alike, so numbers pass through.
    FieldSpec {
        name: "day-of-week",
        min: 1,
        max: 7,
        names: DAYS,
    },
    // EventBridge goes on to 2199; the `cron` crate stops at 2100.
    FieldSpec {
        name: "year",
        min: 1970,
        max: 2100,
        names: &[],
    },
];
const DAY_OF_MONTH: usize = 2;
const DAY_OF_WEEK: usize = 4;

/// A checked cron schedule: the six EventBridge fields as written and their translation for
/// `cron::Schedule::from_str`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CronExpression {
    pub(crate) expression: String,
    pub(crate) cron: String,
}

/// Parses `cron(0 12 * * ? *)` or the same without the wrapper.
pub(crate) fn parse_cron(s: &str) -> Result<CronExpression, String> {
    let text = s.trim();
    let inner = match text.strip_prefix("cron(") {
        Some(after) => after.strip_suffix(')').ok_or_else(|| {
            format!(
                "invalid cron expression `{text}`: missing `)`, expected e.g. `cron(0 12 * * ? *)`"
            )
        })?,
        None => text,
    }
    .trim();
    let invalid = |problem: String| format!("invalid cron expression `{inner}`: {problem}");
    let fields: Vec<&str> = inner.split_whitespace().collect();
    let Ok(fields) = <[&str; 6]>::try_from(fields.as_slice()) else {
        let hint = match fields.len() {
            5 => "; EventBridge has a year field last, add `*` for every year",
            7 => "; EventBridge has no seconds field",
            _ => "",
        };
        return Err(invalid(format!(
            "expected six fields (minutes hours day-of-month month day-of-week year), found {}{hint}",
            fields.len()
        )));
    };
    let [minutes, hours, day_of_month, month, day_of_week, year] = fields;

    for (i, special) in [(DAY_OF_MONTH, "LW#"), (DAY_OF_WEEK, "L#")] {
        // Only the day fields give these letters a meaning; day-of-week's `W` starts WED.
        if fields[i]
            .chars()
            .any(|c| special.contains(c.to_ascii_uppercase()))
        {
            return Err(invalid(format!(
                "{} `{}`: `L`, `W` and `#` are not supported",
                FIELDS[i].name, fields[i]
            )));
        }
    }
    match (day_of_month == "?", day_of_week == "?") {
        (false, false) => {
            return Err(invalid(
                "one of day-of-month and day-of-week must be `?`, as in EventBridge \
                 (like `0 12 * * ? *` or `0 12 ? * MON-FRI *`)"
                    .to_owned(),
            ));
        }
        (true, true) => {
            return Err(invalid(
                "only one of day-of-month and day-of-week can be `?`".to_owned(),
            ));
        }
        _ => {}
    }
    for (i, (spec, field)) in FIELDS.iter().zip(fields).enumerate() {
        let any_day = field == "?" && (i == DAY_OF_MONTH || i == DAY_OF_WEEK);
        if !any_day {
            check_field(spec, field).map_err(&invalid)?;
        }
    }

    let any = |field| if field == "?" { "*" } else { field };
    let cron = format!(
        "0 {minutes} {hours} {} {month} {} {year}",
        any(day_of_month),
        any(day_of_week)
    );
    // The crate has the last word: what it cannot run must not load.
    if let Err(e) = ::cron::Schedule::from_str(&cron) {
        return Err(invalid(crate_problem(&cron, &fields, &e.to_string())));
    }
    Ok(CronExpression {
        expression: inner.to_owned(),
        cron,
    })
}

/// Checks one field: a comma-separated list of `*`, `N`, `N-M` or `NAME`, each optionally
/// followed by `/STEP`.
fn check_field(spec: &FieldSpec, field: &str) -> Result<(), String> {
    let name = spec.name;
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        if let Some(step) = step
            && !step
                .parse::<u32>()
                .is_ok_and(|step| (1..=spec.max).contains(&step))
        {
            return Err(format!(
                "{name} `{field}`: step `{step}` must be a whole number from 1 to {}",
                spec.max
            ));
        }
        if range == "*" {
            continue;
        }
        let bounds = match range.split_once('-') {
            Some((start, end)) => [start, end],
            None => [range, range],
        };
        let mut ordinals = [0; 2];
        for (value, slot) in bounds.into_iter().zip(&mut ordinals) {
            let Some(ordinal) = ordinal(spec, value) else {
                let mut expected = format!("a number from {} to {}", spec.min, spec.max);
                if let (Some(first), Some(last)) = (spec.names.first(), spec.names.last()) {
                    expected.push_str(&format!(" or a name from {first} to {last}"));
                }
                return Err(if value == field {
                    format!("{name} `{field}` is not valid: expected {expected}")
                } else {
                    format!("{name} `{field}`: `{value}` is not valid, expected {expected}")
                });
            };
            *slot = ordinal;
        }
        if ordinals[0] > ordinals[1] {
            return Err(format!(
                "{name} `{field}`: range `{range}` runs backwards, write the earlier bound first"
            ));
        }
    }
    Ok(())
}

fn ordinal(spec: &FieldSpec, value: &str) -> Option<u32> {
    if let Ok(number) = value.parse::<u32>() {
        return (spec.min..=spec.max).contains(&number).then_some(number);
    }
    let upper = value.to_ascii_uppercase();
    let index = spec.names.iter().position(|name| *name == upper)?;
    u32::try_from(index).ok().map(|index| index + spec.min)
}

/// The crate's error without its echo of the expression, named by the field its caret points
/// at. It looks like "0 0 12 * FOO * *\n         ^\n'FOO' is not a valid month name."
fn crate_problem(cron: &str, fields: &[&str; 6], error: &str) -> String {
    let mut lines = error.lines().skip(1);
    let caret = lines.next().and_then(|line| line.find('^'));
    let message = lines.collect::<Vec<_>>().join(" ");
    let message = message.trim();
    let message = if message.is_empty() {
        "not supported by the scheduler"
    } else {
        message
    };
    // Field i of the translation (seconds first) is EventBridge field i - 1.
    let field = caret.and_then(|column| {
        let before = cron.get(..column)?;
        before
            .split_whitespace()
            .count()
            .checked_sub(usize::from(!before.ends_with(' ')))?
            .checked_sub(1)
    });
    match field.filter(|&i| i < FIELDS.len()) {
        Some(i) => format!("{} `{}`: {message}", FIELDS[i].name, fields[i]),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translated(text: &str) -> String {
        parse_cron(text).unwrap().cron
    }

    #[test]
    fn eventbridge_fields_gain_seconds_and_lose_question_marks() {
        assert_eq!(translated("0 12 * * ? *"), "0 0 12 * * * *");
        assert_eq!(
            translated("cron(15 10 ? * MON-FRI *)"),
            "0 15 10 * * MON-FRI *"
        );
        assert_eq!(
            translated("0/5 8-17 ? * 2-6 2030"),
            "0 0/5 8-17 * * 2-6 2030"
        );
        assert_eq!(
            translated(" cron( 0 0 1,15 JAN,JUL ? * ) "),
            "0 0 0 1,15 JAN,JUL * *"
        );
    }

    #[test]
    fn the_expression_is_kept_as_written_without_the_wrapper() {
        let cron = parse_cron("cron(0 12 * * ? *)").unwrap();
        assert_eq!(cron.expression, "0 12 * * ? *");
    }

    #[test]
    fn day_of_week_one_is_sunday_in_the_cron_crate_too() {
        use chrono::Datelike;
        let cron = translated("0 0 ? * 1 *");
        let schedule = ::cron::Schedule::from_str(&cron).unwrap();
        let next = schedule.upcoming(chrono::Utc).next().unwrap();
        assert_eq!(next.weekday(), chrono::Weekday::Sun);
    }

    #[test]
    fn lambda_special_characters_are_refused_clearly() {
        for (text, field) in [
            ("0 12 L * ? *", "day-of-month `L`"),
            ("0 12 15W * ? *", "day-of-month `15W`"),
            ("0 12 ? * 6L *", "day-of-week `6L`"),
            ("0 12 ? * 3#2 *", "day-of-week `3#2`"),
        ] {
            let error = parse_cron(text).unwrap_err();
            assert!(
                error.ends_with(&format!("{field}: `L`, `W` and `#` are not supported")),
                "{error}"
            );
        }
        // A W in a day name is just a name.
        assert!(parse_cron("0 12 ? JUL WED *").is_ok());
    }

    #[test]
    fn exactly_one_day_field_is_a_question_mark() {
        assert!(
            parse_cron("0 12 * * * *")
                .unwrap_err()
                .contains("one of day-of-month and day-of-week must be `?`")
        );
        assert!(
            parse_cron("0 12 1 * MON *")
                .unwrap_err()
                .contains("must be `?`")
        );
        assert!(parse_cron("0 12 ? * ? *").unwrap_err().contains("only one"));
    }

    #[test]
    fn fields_are_checked_against_their_ranges_and_names() {
        let error = parse_cron("60 12 * * ? *").unwrap_err();
        assert_eq!(
            error,
            "invalid cron expression `60 12 * * ? *`: minutes `60` is not valid: expected a number from 0 to 59"
        );
        let error = parse_cron("0 12 * 1-FOO ? *").unwrap_err();
        assert!(
            error.ends_with("month `1-FOO`: `FOO` is not valid, expected a number from 1 to 12 or a name from JAN to DEC"),
            "{error}"
        );
        assert!(
            parse_cron("0 12 ? * 0 *")
                .unwrap_err()
                .contains("day-of-week `0`")
        );
        assert!(
            parse_cron("0/0 12 * * ? *")
                .unwrap_err()
                .contains("step `0`")
        );
        assert!(
            parse_cron("0 12 * * ? 2101")
                .unwrap_err()
                .contains("1970 to 2100")
        );
        assert!(
            parse_cron("? 12 * * ? *")
                .unwrap_err()
                .contains("minutes `?`")
        );
        assert!(parse_cron("0 12 ? * FRI-MON *").unwrap_err().ends_with(
            "day-of-week `FRI-MON`: range `FRI-MON` runs backwards, write the earlier bound first"
        ));
    }

    #[test]
    fn field_count_and_wrapper_are_checked() {
        assert!(
            parse_cron("0 12 * * ?")
                .unwrap_err()
                .contains("found 5; EventBridge has a year field last")
        );
        assert!(
            parse_cron("cron(0 12 * * ? *")
                .unwrap_err()
                .contains("missing `)`")
        );
        assert!(parse_cron("").unwrap_err().contains("found 0"));
    }

    #[test]
    fn what_only_the_crate_refuses_is_reported_by_field() {
        // A named day with a step passes the field check but not the crate's grammar.
        let error = parse_cron("0 12 ? * MON/2 *").unwrap_err();
        assert!(error.contains("day-of-week `MON/2`: "), "{error}");
        assert_eq!(
            crate_problem(
                "0 0 12 * FOO * *",
                &["0", "12", "*", "FOO", "?", "*"],
                "0 0 12 * FOO * *\n         ^\n'FOO' is not a valid month name."
            ),
            "month `FOO`: 'FOO' is not a valid month name."
        );
    }
}
