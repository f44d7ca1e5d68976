//! IAM identity policies of API principals (`api.principals.NAME.policy`), written in YAML or
//! as a JSON string, decoded into a typed [`Policy`] whose every error names its path
//! (`api.principals.ci.policy.Statement[0].Effect`). Only the parts of IAM's grammar that apply
//! to Lambda's API are accepted; what Sluice would ignore (`Condition`, `Principal` in an
//! identity policy, another service's actions) is an error rather than a silently wider or
//! narrower grant.

use serde_json::Value;

use crate::decode::{Decoder, child, index};
use crate::yaml::{Kind, Node};

/// The most statements one policy may hold (IAM's size limit gives a few hundred at most); a
/// bound on the work each request's evaluation does.
const MAX_STATEMENTS: usize = 1000;
/// The most actions or resources one statement may list.
const MAX_PATTERNS: usize = 1000;
/// The longest action or resource pattern.
const MAX_PATTERN_LEN: usize = 2048;

/// An identity policy: statements, evaluated with IAM's rules (default deny, an explicit deny
/// wins over any allow).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    pub statements: Vec<Statement>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

/// Patterns a statement applies to (`Action`, `Resource`), or applies to everything but
/// (`NotAction`, `NotResource`). Patterns take IAM's wildcards `*` and `?`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Patterns {
    Only(Vec<String>),
    AllBut(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub sid: Option<String>,
    pub effect: Effect,
    /// Actions, `lambda:InvokeFunction` or `lambda:Get*` or `*`; matched without regard to case.
    pub actions: Patterns,
    /// Function ARNs, with wildcards; matched with regard to case.
    pub resources: Patterns,
}

const POLICY_KEYS: &[&str] = &["Version", "Id", "Statement"];
const STATEMENT_KEYS: &[&str] = &[
    "Sid",
    "Effect",
    "Action",
    "NotAction",
    "Resource",
    "NotResource",
];
/// IAM keys that an identity policy in Sluice does not take, each with why.
const REFUSED_KEYS: &[(&str, &str)] = &[
    (
        "Principal",
        "an identity policy has no `Principal` (it applies to the principal it belongs to); grant other callers with AddPermission",
    ),
    (
        "NotPrincipal",
        "an identity policy has no `NotPrincipal` (it applies to the principal it belongs to)",
    ),
    (
        "Condition",
        "`Condition` is not supported: a statement with it would grant more or less than written",
    ),
];

/// Decodes the policy at `path`: a YAML mapping, or a string holding the policy as JSON.
pub(crate) fn decode_policy(d: &mut Decoder<'_>, node: &Node, path: &str) -> Option<Policy> {
    let value = match &node.kind {
        Kind::Scalar { .. } => {
            let text = d.text_node(node, path, "a policy").ok()?;
            match serde_json::from_str::<Value>(&text) {
                Ok(v) => v,
                Err(e) => {
                    d.error(path, format!("the policy is not valid JSON: {e}"));
                    return None;
                }
            }
        }
        _ => yaml_to_json(d, node, path)?,
    };
    let mut errors = Vec::new();
    let policy = parse_policy(&value, &mut errors);
    // A JSON string's inner nodes have no place in the file of their own: they are reported
    // at the string.
    let fallback = d.locations.get(path).copied();
    for (at, message) in errors {
        let full = if at.is_empty() {
            path.to_owned()
        } else {
            child(path, &at)
        };
        let location = d.locations.get(&full).copied().or(fallback);
        d.error_at(&full, location, message);
    }
    policy
}

/// A YAML policy as the JSON value it stands for: every scalar is text (IAM's grammar has
/// strings only), `${VAR}` substituted.
fn yaml_to_json(d: &mut Decoder<'_>, node: &Node, path: &str) -> Option<Value> {
    match &node.kind {
        Kind::Scalar { .. } => Some(Value::String(d.text_node(node, path, "a value").ok()?)),
        Kind::Sequence(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                out.push(yaml_to_json(d, item, &index(path, i))?);
            }
            Some(Value::Array(out))
        }
        Kind::Mapping(entries) => {
            let mut out = serde_json::Map::new();
            for (key, value) in entries {
                let Kind::Scalar { text, .. } = &key.kind else {
                    continue; // reported by the walk over the whole file
                };
                let v = yaml_to_json(d, value, &child(path, text))?;
                out.insert(text.clone(), v);
            }
            Some(Value::Object(out))
        }
    }
}

/// The policy in `value`, or `None` with every error found in `errors` as (relative path,
/// message). Public through [`parse_policy_json`] for resource policies and tests.
fn parse_policy(value: &Value, errors: &mut Vec<(String, String)>) -> Option<Policy> {
    let Value::Object(top) = value else {
        errors.push((
            String::new(),
            format!(
                "a policy is a mapping with `Statement`, found {}",
                json_type(value)
            ),
        ));
        return None;
    };
    let before = errors.len();
    check_keys(top, POLICY_KEYS, "", errors);
    match top.get("Version") {
        None => {}
        Some(Value::String(v)) if v == "2012-10-17" || v == "2008-10-17" => {}
        Some(other) => errors.push((
            "Version".into(),
            format!("unknown policy version {other}, expected \"2012-10-17\" (or \"2008-10-17\")"),
        )),
    }
    let statements: Vec<(String, &Value)> = match top.get("Statement") {
        None => {
            errors.push((String::new(), "a policy needs `Statement`".into()));
            Vec::new()
        }
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, s)| (index("Statement", i), s))
            .collect(),
        Some(one) => vec![("Statement".to_owned(), one)],
    };
    if statements.len() > MAX_STATEMENTS {
        errors.push((
            "Statement".into(),
            format!("more than {MAX_STATEMENTS} statements"),
        ));
        return None;
    }
    let mut out = Vec::with_capacity(statements.len());
    for (at, s) in statements {
        if let Some(s) = parse_statement(s, &at, errors) {
            out.push(s);
        }
    }
    (errors.len() == before).then_some(Policy { statements: out })
}

fn parse_statement(
    value: &Value,
    at: &str,
    errors: &mut Vec<(String, String)>,
) -> Option<Statement> {
    let Value::Object(s) = value else {
        errors.push((
            at.to_owned(),
            format!("a statement is a mapping, found {}", json_type(value)),
        ));
        return None;
    };
    let before = errors.len();
    for (key, why) in REFUSED_KEYS {
        if s.contains_key(*key) {
            errors.push((child(at, key), (*why).to_owned()));
        }
    }
    let known: Vec<&str> = REFUSED_KEYS.iter().map(|(k, _)| *k).collect();
    let unknown: serde_json::Map<String, Value> = s
        .iter()
        .filter(|(k, _)| !known.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    check_keys(&unknown, STATEMENT_KEYS, at, errors);
    let sid = match s.get("Sid") {
        None => None,
        Some(Value::String(sid)) => Some(sid.clone()),
        Some(other) => {
            errors.push((
                child(at, "Sid"),
                format!("expected a string, found {}", json_type(other)),
            ));
            None
        }
    };
    let effect = match s.get("Effect") {
        Some(Value::String(e)) if e == "Allow" => Some(Effect::Allow),
        Some(Value::String(e)) if e == "Deny" => Some(Effect::Deny),
        Some(Value::String(e)) => {
            errors.push((
                child(at, "Effect"),
                format!("unknown effect `{e}`, expected `Allow` or `Deny`"),
            ));
            None
        }
        Some(other) => {
            errors.push((
                child(at, "Effect"),
                format!("expected `Allow` or `Deny`, found {}", json_type(other)),
            ));
            None
        }
        None => {
            errors.push((at.to_owned(), "a statement needs `Effect`".into()));
            None
        }
    };
    let actions = patterns(s, at, "Action", "NotAction", check_action, errors);
    let resources = patterns(s, at, "Resource", "NotResource", check_resource, errors);
    if errors.len() != before {
        return None;
    }
    Some(Statement {
        sid,
        effect: effect?,
        actions: actions?,
        resources: resources?,
    })
}

fn patterns(
    s: &serde_json::Map<String, Value>,
    at: &str,
    only: &str,
    not: &str,
    check: fn(&str) -> Result<(), String>,
    errors: &mut Vec<(String, String)>,
) -> Option<Patterns> {
    let (key, list) = match (s.get(only), s.get(not)) {
        (Some(_), Some(_)) => {
            errors.push((
                child(at, not),
                format!("give either `{only}` or `{not}`, not both"),
            ));
            return None;
        }
        (Some(v), None) => (only, v),
        (None, Some(v)) => (not, v),
        (None, None) => {
            errors.push((
                at.to_owned(),
                format!("a statement needs `{only}` (or `{not}`)"),
            ));
            return None;
        }
    };
    let path = child(at, key);
    let items: Vec<(String, &Value)> = match list {
        Value::Array(items) if items.is_empty() => {
            errors.push((path, format!("`{key}` is an empty list")));
            return None;
        }
        Value::Array(items) if items.len() > MAX_PATTERNS => {
            errors.push((path, format!("more than {MAX_PATTERNS} entries")));
            return None;
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (index(&path, i), v))
            .collect(),
        one => vec![(path.clone(), one)],
    };
    let before = errors.len();
    let mut out = Vec::with_capacity(items.len());
    for (p, v) in items {
        match v {
            Value::String(text) if text.len() > MAX_PATTERN_LEN => {
                errors.push((p, format!("longer than {MAX_PATTERN_LEN} characters")));
            }
            Value::String(text) => match check(text) {
                Ok(()) => out.push(text.clone()),
                Err(message) => errors.push((p, message)),
            },
            other => errors.push((p, format!("expected a string, found {}", json_type(other)))),
        }
    }
    if errors.len() != before {
        return None;
    }
    Some(if key == only {
        Patterns::Only(out)
    } else {
        Patterns::AllBut(out)
    })
}

/// `*`, or `lambda:` followed by an action name that may hold `*` and `?`.
fn check_action(text: &str) -> Result<(), String> {
    if text == "*" {
        return Ok(());
    }
    let Some((service, name)) = text.split_once(':') else {
        return Err(format!(
            "action `{text}` has no service prefix: expected `lambda:ACTION` (like `lambda:InvokeFunction`) or `*`"
        ));
    };
    if !service.eq_ignore_ascii_case("lambda") {
        return Err(format!(
            "action `{text}` is not one of Lambda's: Sluice's API has `lambda:` actions only"
        ));
    }
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '*' || c == '?')
    {
        return Err(format!(
            "action `{text}`: an action name is letters, digits and the wildcards `*` and `?`"
        ));
    }
    Ok(())
}

/// `*`, or an ARN (with wildcards).
fn check_resource(text: &str) -> Result<(), String> {
    if text == "*" || text.starts_with("arn:") {
        return Ok(());
    }
    Err(format!(
        "resource `{text}` is not an ARN: expected `*` or a function ARN like `arn:aws:lambda:us-east-1:000000000000:function:NAME` (wildcards allowed)"
    ))
}

fn check_keys(
    map: &serde_json::Map<String, Value>,
    allowed: &[&str],
    at: &str,
    errors: &mut Vec<(String, String)>,
) {
    for key in map.keys() {
        if !allowed.contains(&key.as_str()) {
            errors.push((
                child(at, key),
                format!(
                    "unknown field `{key}`, expected one of: {}",
                    allowed.join(", ")
                ),
            ));
        }
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Parses an identity policy from its JSON text, with its errors as `path: message` lines.
pub fn parse_policy_json(text: &str) -> Result<Policy, Vec<String>> {
    let value: Value = serde_json::from_str(text).map_err(|e| vec![e.to_string()])?;
    let mut errors = Vec::new();
    match parse_policy(&value, &mut errors) {
        Some(p) if errors.is_empty() => Ok(p),
        _ => Err(errors
            .into_iter()
            .map(|(at, m)| {
                if at.is_empty() {
                    m
                } else {
                    format!("{at}: {m}")
                }
            })
            .collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_statement_or_a_list_and_one_action_or_a_list_read_alike() {
        let one = parse_policy_json(
            r#"{"Statement":{"Effect":"Allow","Action":"lambda:Invoke*","Resource":"*"}}"#,
        )
        .unwrap();
        let list = parse_policy_json(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["lambda:Invoke*"],"Resource":["*"]}]}"#,
        )
        .unwrap();
        assert_eq!(one, list);
        assert_eq!(
            one.statements[0].actions,
            Patterns::Only(vec!["lambda:Invoke*".into()])
        );
    }

    #[test]
    fn errors_name_the_statement_and_key() {
        let errors = parse_policy_json(
            r#"{"Statement":[{"Effect":"Permit","Action":"s3:GetObject","Resource":"f","Condition":{}}]}"#,
        )
        .unwrap_err();
        assert_eq!(
            errors,
            [
                "Statement[0].Condition: `Condition` is not supported: a statement with it would grant more or less than written",
                "Statement[0].Effect: unknown effect `Permit`, expected `Allow` or `Deny`",
                "Statement[0].Action: action `s3:GetObject` is not one of Lambda's: Sluice's API has `lambda:` actions only",
                "Statement[0].Resource: resource `f` is not an ARN: expected `*` or a function ARN like `arn:aws:lambda:us-east-1:000000000000:function:NAME` (wildcards allowed)",
            ]
        );
    }

    #[test]
    fn action_and_not_action_together_are_refused() {
        let errors = parse_policy_json(
            r#"{"Statement":{"Effect":"Deny","Action":"*","NotAction":"lambda:Get*","Resource":"*"}}"#,
        )
        .unwrap_err();
        assert_eq!(
            errors,
            ["Statement.NotAction: give either `Action` or `NotAction`, not both"]
        );
    }
}
