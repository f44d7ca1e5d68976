//! `${VAR}` substitution in scalar values.

/// Replaces `${VAR}` and `${VAR:-default}` in `text`; `$${` stands for a literal `${`.
///
/// As in the shell, the default applies when the variable is unset or empty. Every problem in
/// the string is returned, not just the first, so one line can name all its missing variables.
pub(crate) fn interpolate(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<String>> {
    if !text.contains('$') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let Some(close) = tail.find('}') else {
                errors.push(format!("unterminated `${{` in `{text}`: expected `}}`"));
                return Err(errors);
            };
            let body = &tail[..close];
            rest = &tail[close + 1..];
            let (name, default) = match body.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (body, None),
            };
            if !is_variable_name(name) {
                errors.push(format!(
                    "invalid variable reference `${{{body}}}`: a name is letters, digits and `_`, not starting with a digit"
                ));
                continue;
            }
            match (env(name), default) {
                (Some(value), Some(default)) if value.is_empty() => out.push_str(default),
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => errors.push(format!(
                    "environment variable `{name}` is not set (write `${{{name}:-default}}` to give a default)"
                )),
            }
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`, the shape of a portable environment variable name.
pub(crate) fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOME" => Some("/home/ops".to_owned()),
            "PORT" => Some("9000".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn run(text: &str) -> Result<String, Vec<String>> {
        interpolate(text, &env)
    }

    #[test]
    fn substitutes_defined_variables() {
        assert_eq!(run("${HOME}/fn"), Ok("/home/ops/fn".to_owned()));
        assert_eq!(run("127.0.0.1:${PORT}"), Ok("127.0.0.1:9000".to_owned()));
        assert_eq!(run("${HOME}${PORT}"), Ok("/home/ops9000".to_owned()));
    }

    #[test]
    fn defaults_apply_when_unset_or_empty() {
        assert_eq!(run("${NOPE:-3s}"), Ok("3s".to_owned()));
        assert_eq!(run("${EMPTY:-x}"), Ok("x".to_owned()));
        assert_eq!(run("${PORT:-1}"), Ok("9000".to_owned()));
        assert_eq!(run("${NOPE:-}"), Ok(String::new()));
        assert_eq!(run("${EMPTY}"), Ok(String::new()));
    }

    #[test]
    fn double_dollar_brace_is_a_literal() {
        assert_eq!(run("$${HOME}"), Ok("${HOME}".to_owned()));
        assert_eq!(run("cost: $5 and $$"), Ok("cost: $5 and $$".to_owned()));
        assert_eq!(run("a$"), Ok("a$".to_owned()));
    }

    #[test]
    fn every_undefined_variable_is_reported() {
        assert_eq!(
            run("${A}-${PORT}-${B}"),
            Err(vec![
                "environment variable `A` is not set (write `${A:-default}` to give a default)"
                    .to_owned(),
                "environment variable `B` is not set (write `${B:-default}` to give a default)"
                    .to_owned(),
            ])
        );
    }

    #[test]
    fn malformed_references_are_errors() {
        assert_eq!(
            run("${HOME"),
            Err(vec![
                "unterminated `${` in `${HOME`: expected `}`".to_owned()
            ])
        );
        assert!(run("${1X}").unwrap_err()[0].contains("invalid variable reference `${1X}`"));
        assert!(run("${}").is_err());
    }

    #[test]
    fn variable_names_follow_the_portable_shape() {
        assert!(is_variable_name("_A1"));
        assert!(is_variable_name("bucket"));
        assert!(!is_variable_name("1A"));
        assert!(!is_variable_name("A-B"));
        assert!(!is_variable_name(""));
    }
}
