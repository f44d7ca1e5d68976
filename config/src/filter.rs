//! Lambda event filtering: the EventBridge-style patterns of an event source mapping's
//! `FilterCriteria`.
//!
//! A pattern is a JSON object whose keys name fields of the record. A key whose value is an object
//! descends into the nested field; a key whose value is an array is a leaf, a list of match
//! conditions of which at least one must hold. Every key must match (AND); the conditions of one
//! leaf are alternatives (OR). Fields of the record that the pattern does not name are ignored.
//!
//! Conditions, as Lambda (and EventBridge) write them:
//!
//! | Condition | Example |
//! |---|---|
//! | equals (string, number, boolean, null) | `"Name": ["Alice"]`, `"UserID": [null]`, `"LastName": [""]` |
//! | begins with | `"Region": [{"prefix": "us-"}]`, `[{"prefix": {"equals-ignore-case": "us-"}}]` |
//! | ends with | `"File": [{"suffix": ".png"}]`, `[{"suffix": {"equals-ignore-case": ".png"}}]` |
//! | equals, ignoring case | `"Name": [{"equals-ignore-case": "alice"}]` |
//! | anything but | `[{"anything-but": "Raining"}]`, `[{"anything-but": [100, 200]}]`, `[{"anything-but": {"prefix": "us-"}}]` (also `suffix`, `equals-ignore-case`) |
//! | numeric | `[{"numeric": ["=", 100]}]`, `[{"numeric": [">", 10, "<=", 20]}]` |
//! | exists | `[{"exists": true}]`, `[{"exists": false}]` |
//! | IP address block | `[{"cidr": "10.0.0.0/24"}]` |
//!
//! and `"$or": [{..}, {..}]` inside any object, which holds when at least one of its (two or more)
//! sub-patterns holds against that same object.
//!
//! The finer points, following the EventBridge matching engine that Lambda documents as its syntax:
//!
//! - `{}`, and an empty nested object, are rejected: a pattern must name at least one field. (An
//!   empty `FilterCriteria` is how Lambda says "no filters"; that is the caller's business, see
//!   [`matches_any`].) A pattern longer than 4096 characters (as compact JSON) is rejected, the
//!   limit of Lambda's `Filter.Pattern`. Lambda documents no separate nesting limit.
//! - A leaf condition looks at leaf values only: strings, numbers, booleans and `null`. A field
//!   whose value is an object is not a leaf, so no condition but `{"exists": false}` matches it.
//! - `null` is a value: `{"exists": true}` matches a field that is `null`, `[null]` matches only
//!   `null`, and `[""]` only the empty string.
//! - When the record's field is an array, a leaf condition holds when it holds for any element
//!   (nested arrays are flattened). An empty array has no values, so it counts as absent:
//!   `{"exists": false}` matches it and `{"exists": true}` does not. When a nested pattern meets an
//!   array of objects, one element must satisfy the whole nested pattern: `{"staff": {"first":
//!   ["Anna"], "last": ["Jones"]}}` needs a single Anna Jones, not an Anna and a Jones.
//! - Numbers compare as numbers: `[5]` matches `5` and `5.0`, `[300]` matches `3.0e2`. A string
//!   never equals a number (`["5"]` does not match `5`), and `numeric` matches JSON numbers only,
//!   so `"46"` in a record is not a number to it. Integers compare exactly, others as `f64`.
//! - `anything-but` needs the field to be present; it matches any leaf value other than the
//!   excluded ones (including values of another type and `null`), so for an array, any element
//!   that is not excluded.
//! - Prefix, suffix and ignore-case conditions match strings only; case folding is Unicode
//!   lowercase. `cidr` matches strings that are IPv4 or IPv6 addresses inside the block.
//! - Duplicate keys are resolved before a pattern gets here: `serde_json` keeps the last value for
//!   a key, which is what Lambda does.
//! - Keys are field names as written: `"a.b"` names a field called `a.b`, not `b` inside `a`.

use std::cmp::Ordering;
use std::net::IpAddr;

use serde_json::{Map, Number, Value};

/// Lambda's limit on the length of one filter pattern.
const MAX_PATTERN_CHARS: usize = 4096;

/// The key that makes its array of sub-patterns alternatives.
const OR_KEY: &str = "$or";

/// The operators a match condition object may use.
const OPERATORS: &[&str] = &[
    "prefix",
    "suffix",
    "equals-ignore-case",
    "anything-but",
    "numeric",
    "exists",
    "cidr",
];

const NUMERIC_HINT: &str =
    "numeric filter needs an operator and a number, e.g. [\">\", 0, \"<=\", 5]";

/// One filter pattern of an event source mapping, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterPattern {
    root: Fields,
}

/// An object of the pattern: every field must match, and one of the `$or` branches if any.
#[derive(Debug, Clone, PartialEq)]
struct Fields {
    fields: Vec<(String, Node)>,
    any_of: Vec<Fields>,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Nested(Fields),
    /// Alternatives: the leaf matches when any of them does.
    Leaf(Vec<Condition>),
}

#[derive(Debug, Clone, PartialEq)]
enum Condition {
    /// A scalar literal: string, number, boolean or null.
    Equals(Value),
    Prefix(String),
    /// Kept lowercase.
    PrefixIgnoreCase(String),
    Suffix(String),
    /// Kept lowercase.
    SuffixIgnoreCase(String),
    /// Kept lowercase.
    EqualsIgnoreCase(String),
    AnythingBut(Exclusion),
    Numeric(Range),
    Exists(bool),
    Cidr(Cidr),
}

/// What an `anything-but` leaves out.
#[derive(Debug, Clone, PartialEq)]
enum Exclusion {
    /// Strings or numbers, never mixed.
    Values(Vec<Value>),
    Prefixes(Vec<String>),
    Suffixes(Vec<String>),
    /// Kept lowercase.
    IgnoreCase(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
struct Range {
    lower: Option<Bound>,
    upper: Option<Bound>,
}

#[derive(Debug, Clone, PartialEq)]
struct Bound {
    value: Number,
    inclusive: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Cidr {
    network: IpAddr,
    prefix_len: u8,
}

impl FilterPattern {
    /// Parses one pattern (a JSON object). Errors are one line and name the offending key path,
    /// e.g. "`data.amount`: numeric filter needs an operator and a number, e.g. [\">\", 0, \"<=\", 5]".
    pub fn parse(pattern: &Value) -> Result<FilterPattern, String> {
        let Value::Object(object) = pattern else {
            return Err(format!(
                "a filter pattern must be a JSON object of fields, e.g. {{\"body\": {{\"status\": [\"ok\"]}}}}, not {}",
                describe(pattern)
            ));
        };
        let root = parse_fields(object, "")?;
        let length = serde_json::to_string(pattern)
            .map_err(|e| format!("filter pattern cannot be written as JSON: {e}"))?
            .chars()
            .count();
        if length > MAX_PATTERN_CHARS {
            return Err(format!(
                "filter pattern is {length} characters long as JSON; Lambda allows at most {MAX_PATTERN_CHARS}"
            ));
        }
        Ok(FilterPattern { root })
    }

    /// Whether `event` matches.
    pub fn matches(&self, event: &Value) -> bool {
        self.root.matches(Some(event))
    }
}

/// A record passes when it matches any pattern (or there are none).
pub fn matches_any(patterns: &[FilterPattern], event: &Value) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| p.matches(event))
}

// ---------------------------------------------------------------------------------------------
// Parsing

fn at(path: &str, message: impl std::fmt::Display) -> String {
    if path.is_empty() {
        message.to_string()
    } else {
        format!("`{path}`: {message}")
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// `"a string"`, `the number 5`, ... for error messages.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {}", Value::String(s.clone())),
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

fn parse_fields(object: &Map<String, Value>, path: &str) -> Result<Fields, String> {
    if object.is_empty() {
        return Err(if path.is_empty() {
            "a filter pattern must name at least one field; `{}` is not allowed".to_owned()
        } else {
            at(
                path,
                "an empty object is not allowed; name at least one field inside it",
            )
        });
    }
    let mut fields = Vec::with_capacity(object.len());
    let mut any_of = Vec::new();
    for (key, value) in object {
        let child = join(path, key);
        if key == OR_KEY {
            any_of = parse_or(value, &child)?;
            continue;
        }
        let node = match value {
            Value::Object(nested) => Node::Nested(parse_fields(nested, &child)?),
            Value::Array(items) => Node::Leaf(parse_leaf(items, &child)?),
            scalar => return Err(scalar_leaf_error(path, key, scalar)),
        };
        fields.push((key.clone(), node));
    }
    Ok(Fields { fields, any_of })
}

/// The error for `"key": <scalar>`, which is either a leaf missing its brackets or a match
/// condition written where a field was expected.
fn scalar_leaf_error(path: &str, key: &str, value: &Value) -> String {
    let child = join(path, key);
    if OPERATORS.contains(&key) && !path.is_empty() {
        let parent = path.rsplit('.').next().unwrap_or(path);
        return at(
            &child,
            format!(
                "match conditions go inside a list, e.g. \"{parent}\": [{{\"{key}\": {value}}}]"
            ),
        );
    }
    at(
        &child,
        format!(
            "must be a list of match conditions, e.g. [{value}], or an object of nested fields"
        ),
    )
}

fn parse_or(value: &Value, path: &str) -> Result<Vec<Fields>, String> {
    const HINT: &str = "needs a list of two or more patterns, e.g. [{\"a\": [1]}, {\"b\": [2]}]";
    let Value::Array(branches) = value else {
        return Err(at(path, format!("{HINT}, not {}", describe(value))));
    };
    if branches.len() < 2 {
        return Err(at(path, HINT));
    }
    branches
        .iter()
        .enumerate()
        .map(|(i, branch)| {
            let branch_path = format!("{path}[{i}]");
            match branch {
                Value::Object(object) => parse_fields(object, &branch_path),
                other => Err(at(
                    &branch_path,
                    format!(
                        "each `$or` alternative must be an object, not {}",
                        describe(other)
                    ),
                )),
            }
        })
        .collect()
}

fn parse_leaf(items: &[Value], path: &str) -> Result<Vec<Condition>, String> {
    if items.is_empty() {
        return Err(at(
            path,
            "needs at least one match condition; an empty list matches nothing",
        ));
    }
    items
        .iter()
        .map(|item| match item {
            Value::Object(object) => parse_condition(object, path),
            Value::Array(_) => Err(at(
                path,
                "match conditions cannot be nested lists; list values directly, e.g. [\"a\", \"b\"]",
            )),
            scalar => Ok(Condition::Equals(scalar.clone())),
        })
        .collect()
}

fn parse_condition(object: &Map<String, Value>, path: &str) -> Result<Condition, String> {
    let mut entries = object.iter();
    let (Some((operator, value)), None) = (entries.next(), entries.next()) else {
        let keys: Vec<String> = object.keys().map(|k| format!("`{k}`")).collect();
        return Err(at(
            path,
            format!(
                "a match condition takes exactly one operator ({}), found {}",
                OPERATORS.join(", "),
                if keys.is_empty() {
                    "none".to_owned()
                } else {
                    keys.join(", ")
                }
            ),
        ));
    };
    match operator.as_str() {
        "prefix" => parse_affix(value, path, "prefix", "us-").map(|(s, ignore_case)| {
            if ignore_case {
                Condition::PrefixIgnoreCase(s)
            } else {
                Condition::Prefix(s)
            }
        }),
        "suffix" => parse_affix(value, path, "suffix", ".png").map(|(s, ignore_case)| {
            if ignore_case {
                Condition::SuffixIgnoreCase(s)
            } else {
                Condition::Suffix(s)
            }
        }),
        "equals-ignore-case" => match value {
            Value::String(s) => Ok(Condition::EqualsIgnoreCase(s.to_lowercase())),
            other => Err(at(
                path,
                format!(
                    "equals-ignore-case needs a string, e.g. {{\"equals-ignore-case\": \"alice\"}}, not {}",
                    describe(other)
                ),
            )),
        },
        "anything-but" => parse_anything_but(value, path).map(Condition::AnythingBut),
        "numeric" => parse_numeric(value, path).map(Condition::Numeric),
        "exists" => match value {
            Value::Bool(b) => Ok(Condition::Exists(*b)),
            other => Err(at(
                path,
                format!("exists needs true or false, not {}", describe(other)),
            )),
        },
        "cidr" => parse_cidr(value, path).map(Condition::Cidr),
        other => Err(at(
            path,
            format!(
                "unknown match operator `{other}`; Lambda event filtering supports {}",
                OPERATORS.join(", ")
            ),
        )),
    }
}

/// `"text"` or `{"equals-ignore-case": "text"}` after `prefix` or `suffix`; the flag says which.
fn parse_affix(
    value: &Value,
    path: &str,
    operator: &str,
    example: &str,
) -> Result<(String, bool), String> {
    match value {
        Value::String(s) => Ok((s.clone(), false)),
        Value::Object(inner) if inner.len() == 1 => match inner.get("equals-ignore-case") {
            Some(Value::String(s)) => Ok((s.to_lowercase(), true)),
            _ => Err(at(
                path,
                format!(
                    "{operator} takes a string or {{\"equals-ignore-case\": \"{example}\"}}, e.g. {{\"{operator}\": \"{example}\"}}"
                ),
            )),
        },
        other => Err(at(
            path,
            format!(
                "{operator} needs a string, e.g. {{\"{operator}\": \"{example}\"}}, not {}",
                describe(other)
            ),
        )),
    }
}

fn parse_anything_but(value: &Value, path: &str) -> Result<Exclusion, String> {
    match value {
        Value::String(_) | Value::Number(_) => Ok(Exclusion::Values(vec![value.clone()])),
        Value::Array(list) => {
            if list.is_empty() {
                return Err(at(
                    path,
                    "anything-but needs at least one value, e.g. {\"anything-but\": [\"Raining\"]}",
                ));
            }
            let all_strings = list.iter().all(Value::is_string);
            let all_numbers = list.iter().all(Value::is_number);
            if !all_strings && !all_numbers {
                return Err(at(
                    path,
                    "anything-but takes a list of all strings or all numbers (not null, booleans, objects or a mix)",
                ));
            }
            Ok(Exclusion::Values(list.clone()))
        }
        Value::Object(inner) => {
            let mut entries = inner.iter();
            let (Some((operator, operand)), None) = (entries.next(), entries.next()) else {
                return Err(at(
                    path,
                    "anything-but takes one of prefix, suffix or equals-ignore-case, e.g. {\"anything-but\": {\"prefix\": \"us-\"}}",
                ));
            };
            let strings = anything_but_strings(operand, path, operator)?;
            match operator.as_str() {
                "prefix" | "suffix" if strings.iter().any(String::is_empty) => Err(at(
                    path,
                    format!("anything-but {operator} cannot be the empty string"),
                )),
                "prefix" => Ok(Exclusion::Prefixes(strings)),
                "suffix" => Ok(Exclusion::Suffixes(strings)),
                "equals-ignore-case" => Ok(Exclusion::IgnoreCase(
                    strings.iter().map(|s| s.to_lowercase()).collect(),
                )),
                other => Err(at(
                    path,
                    format!(
                        "anything-but does not support `{other}`; use prefix, suffix or equals-ignore-case"
                    ),
                )),
            }
        }
        other => Err(at(
            path,
            format!(
                "anything-but needs a string, a number, a list of them, or {{\"prefix\": ..}}, not {}",
                describe(other)
            ),
        )),
    }
}

/// A string or a non-empty list of strings, the operand of `anything-but`'s inner operator.
fn anything_but_strings(value: &Value, path: &str, operator: &str) -> Result<Vec<String>, String> {
    let bad = || {
        at(
            path,
            format!("anything-but {operator} needs a string or a non-empty list of strings"),
        )
    };
    match value {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(list) if !list.is_empty() => list
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

fn parse_numeric(value: &Value, path: &str) -> Result<Range, String> {
    let Value::Array(terms) = value else {
        return Err(at(path, NUMERIC_HINT));
    };
    match terms.as_slice() {
        [operator, operand] => {
            let operator = numeric_operator(operator, path)?;
            let bound = |inclusive| {
                numeric_operand(operand, path).map(|value| Some(Bound { value, inclusive }))
            };
            Ok(match operator {
                "=" => {
                    let b = bound(true)?;
                    Range {
                        lower: b.clone(),
                        upper: b,
                    }
                }
                "<" => Range {
                    lower: None,
                    upper: bound(false)?,
                },
                "<=" => Range {
                    lower: None,
                    upper: bound(true)?,
                },
                ">" => Range {
                    lower: bound(false)?,
                    upper: None,
                },
                _ => Range {
                    lower: bound(true)?,
                    upper: None,
                },
            })
        }
        [low_op, low, high_op, high] => {
            let low_op = numeric_operator(low_op, path)?;
            let high_op = numeric_operator(high_op, path)?;
            if !matches!(low_op, ">" | ">=") || !matches!(high_op, "<" | "<=") {
                return Err(at(
                    path,
                    "a numeric range gives its lower bound first, then its upper, e.g. [\">\", 0, \"<=\", 5]",
                ));
            }
            let lower = Bound {
                value: numeric_operand(low, path)?,
                inclusive: low_op == ">=",
            };
            let upper = Bound {
                value: numeric_operand(high, path)?,
                inclusive: high_op == "<=",
            };
            let empty = match compare_numbers(&lower.value, &upper.value) {
                Some(Ordering::Less) => false,
                Some(Ordering::Equal) => !(lower.inclusive && upper.inclusive),
                _ => true,
            };
            if empty {
                return Err(at(
                    path,
                    format!(
                        "numeric range is empty: no number is {low_op} {} and {high_op} {}",
                        lower.value, upper.value
                    ),
                ));
            }
            Ok(Range {
                lower: Some(lower),
                upper: Some(upper),
            })
        }
        _ => Err(at(path, NUMERIC_HINT)),
    }
}

fn numeric_operator<'a>(value: &'a Value, path: &str) -> Result<&'a str, String> {
    match value.as_str() {
        Some(op @ ("=" | "<" | "<=" | ">" | ">=")) => Ok(op),
        Some(op) => Err(at(
            path,
            format!("unknown numeric operator `{op}`; use =, <, <=, > or >="),
        )),
        None => Err(at(
            path,
            format!(
                "{NUMERIC_HINT}; found {} where an operator belongs",
                describe(value)
            ),
        )),
    }
}

fn numeric_operand(value: &Value, path: &str) -> Result<Number, String> {
    match value {
        Value::Number(n) => Ok(n.clone()),
        other => Err(at(
            path,
            format!("{NUMERIC_HINT}; {} is not a number", describe(other)),
        )),
    }
}

fn parse_cidr(value: &Value, path: &str) -> Result<Cidr, String> {
    let bad = || {
        at(
            path,
            format!(
                "cidr needs an address block like \"10.0.0.0/24\" or \"2001:db8::/32\", not {}",
                describe(value)
            ),
        )
    };
    let text = value.as_str().ok_or_else(bad)?;
    let (address, prefix_len) = text.split_once('/').ok_or_else(bad)?;
    let address: IpAddr = address.parse().map_err(|_| bad())?;
    let prefix_len: u8 = prefix_len.parse().map_err(|_| bad())?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    if prefix_len > max {
        return Err(bad());
    }
    Ok(Cidr {
        network: mask(address, prefix_len),
        prefix_len,
    })
}

/// `address` with all but its first `prefix_len` bits cleared.
fn mask(address: IpAddr, prefix_len: u8) -> IpAddr {
    match address {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let kept = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4((bits & kept).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let kept = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6((bits & kept).into())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Matching

impl Fields {
    /// `value` is the record's value at this object's place, `None` when absent.
    fn matches(&self, value: Option<&Value>) -> bool {
        match value {
            Some(Value::Object(object)) => self.matches_object(Some(object)),
            Some(Value::Array(items)) => {
                let mut objects = Vec::new();
                collect_objects(items, &mut objects);
                if objects.is_empty() {
                    self.matches_object(None)
                } else {
                    objects.iter().any(|o| self.matches_object(Some(o)))
                }
            }
            // A scalar has no fields, so everything below it is absent.
            _ => self.matches_object(None),
        }
    }

    fn matches_object(&self, object: Option<&Map<String, Value>>) -> bool {
        self.fields
            .iter()
            .all(|(key, node)| node.matches(object.and_then(|o| o.get(key))))
            && (self.any_of.is_empty() || self.any_of.iter().any(|b| b.matches_object(object)))
    }
}

fn collect_objects<'a>(items: &'a [Value], out: &mut Vec<&'a Map<String, Value>>) {
    for item in items {
        match item {
            Value::Object(object) => out.push(object),
            Value::Array(inner) => collect_objects(inner, out),
            _ => {}
        }
    }
}

/// The leaf values at a field: the scalar itself, the scalars of an array (flattened), or none
/// for an absent field or an object.
fn collect_leaves<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Object(_) => {}
        Value::Array(items) => {
            for item in items {
                collect_leaves(item, out);
            }
        }
        scalar => out.push(scalar),
    }
}

impl Node {
    fn matches(&self, value: Option<&Value>) -> bool {
        match self {
            Node::Nested(fields) => fields.matches(value),
            Node::Leaf(conditions) => {
                let mut leaves = Vec::new();
                if let Some(value) = value {
                    collect_leaves(value, &mut leaves);
                }
                conditions.iter().any(|c| c.matches(&leaves))
            }
        }
    }
}

impl Condition {
    fn matches(&self, leaves: &[&Value]) -> bool {
        match self {
            Condition::Exists(wanted) => *wanted != leaves.is_empty(),
            _ => leaves.iter().any(|leaf| self.matches_value(leaf)),
        }
    }

    /// Whether one present leaf value satisfies the condition.
    fn matches_value(&self, value: &Value) -> bool {
        let text = value.as_str();
        match self {
            Condition::Equals(literal) => literals_equal(literal, value),
            Condition::Prefix(p) => text.is_some_and(|s| s.starts_with(p.as_str())),
            Condition::PrefixIgnoreCase(p) => {
                text.is_some_and(|s| s.to_lowercase().starts_with(p.as_str()))
            }
            Condition::Suffix(p) => text.is_some_and(|s| s.ends_with(p.as_str())),
            Condition::SuffixIgnoreCase(p) => {
                text.is_some_and(|s| s.to_lowercase().ends_with(p.as_str()))
            }
            Condition::EqualsIgnoreCase(x) => text.is_some_and(|s| s.to_lowercase() == *x),
            Condition::AnythingBut(exclusion) => !exclusion.excludes(value),
            Condition::Numeric(range) => match value {
                Value::Number(n) => range.contains(n),
                _ => false,
            },
            Condition::Exists(wanted) => *wanted,
            Condition::Cidr(cidr) => text
                .and_then(|s| s.parse::<IpAddr>().ok())
                .is_some_and(|ip| cidr.contains(ip)),
        }
    }
}

impl Exclusion {
    fn excludes(&self, value: &Value) -> bool {
        let text = value.as_str();
        match self {
            Exclusion::Values(list) => list.iter().any(|x| literals_equal(x, value)),
            Exclusion::Prefixes(list) => {
                text.is_some_and(|s| list.iter().any(|p| s.starts_with(p.as_str())))
            }
            Exclusion::Suffixes(list) => {
                text.is_some_and(|s| list.iter().any(|p| s.ends_with(p.as_str())))
            }
            Exclusion::IgnoreCase(list) => text.is_some_and(|s| {
                let lower = s.to_lowercase();
                list.contains(&lower)
            }),
        }
    }
}

impl Range {
    fn contains(&self, n: &Number) -> bool {
        let above = self
            .lower
            .as_ref()
            .is_none_or(|b| match compare_numbers(n, &b.value) {
                Some(Ordering::Greater) => true,
                Some(Ordering::Equal) => b.inclusive,
                _ => false,
            });
        let below = self
            .upper
            .as_ref()
            .is_none_or(|b| match compare_numbers(n, &b.value) {
                Some(Ordering::Less) => true,
                Some(Ordering::Equal) => b.inclusive,
                _ => false,
            });
        above && below
    }
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix_len) == self.network
    }
}

/// Scalar equality, numbers by value.
fn literals_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => compare_numbers(x, y) == Some(Ordering::Equal),
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Null, Value::Null) => true,
        _ => false,
    }
}

fn as_integer(n: &Number) -> Option<i128> {
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
}

/// Integers exactly, anything else as `f64`.
fn compare_numbers(a: &Number, b: &Number) -> Option<Ordering> {
    match (as_integer(a), as_integer(b)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pattern(p: Value) -> FilterPattern {
        match FilterPattern::parse(&p) {
            Ok(parsed) => parsed,
            Err(e) => panic!("pattern {p} should parse: {e}"),
        }
    }

    fn matches(p: Value, event: Value) -> bool {
        pattern(p).matches(&event)
    }

    fn error(p: Value) -> String {
        match FilterPattern::parse(&p) {
            Ok(parsed) => panic!("pattern {p} should be rejected, parsed as {parsed:?}"),
            Err(e) => e,
        }
    }

    // --- Examples from AWS's documentation -----------------------------------------------------

    #[test]
    fn kinesis_numeric_example() {
        let p = json!({"data": {"tire_pressure": [{"numeric": ["<", 32]}]}});
        assert!(matches(p.clone(), json!({"data": {"tire_pressure": 31}})));
        assert!(matches(p.clone(), json!({"data": {"tire_pressure": 31.9}})));
        assert!(!matches(p.clone(), json!({"data": {"tire_pressure": 32}})));
        assert!(!matches(
            p.clone(),
            json!({"data": {"tire_pressure": "20"}})
        ));
        assert!(!matches(p, json!({"data": {"pressure": 20}})));
    }

    #[test]
    fn sqs_body_example() {
        let p = json!({"body": {"RequestCode": ["BBBB"]}});
        assert!(matches(
            p.clone(),
            json!({"messageId": "1", "body": {"RequestCode": "BBBB"}})
        ));
        assert!(!matches(
            p.clone(),
            json!({"body": {"RequestCode": "AAAA"}})
        ));
        assert!(!matches(
            p.clone(),
            json!({"body": {"RequestCode": "bbbb"}})
        ));
        assert!(!matches(p, json!({"body": "RequestCode BBBB"})));
    }

    #[test]
    fn dynamodb_new_image_example() {
        let p = json!({"dynamodb": {"NewImage": {"status": {"S": ["active"]}}}});
        let event = json!({
            "eventName": "INSERT",
            "dynamodb": {
                "Keys": {"id": {"S": "1"}},
                "NewImage": {"id": {"S": "1"}, "status": {"S": "active"}},
            }
        });
        assert!(matches(p.clone(), event));
        assert!(!matches(
            p.clone(),
            json!({"dynamodb": {"NewImage": {"status": {"S": "inactive"}}}})
        ));
        assert!(!matches(
            p,
            json!({"eventName": "REMOVE", "dynamodb": {"Keys": {}}})
        ));
    }

    #[test]
    fn dynamodb_keys_example_nested_several_levels() {
        let p = json!({"dynamodb": {"Keys": {"Id": {"N": ["101"]}}}});
        let event = json!({"dynamodb": {
            "Keys": {"Id": {"N": "101"}},
            "NewImage": {"Message": {"S": "New item!"}, "Id": {"N": "101"}},
            "SequenceNumber": "111", "SizeBytes": 26, "StreamViewType": "NEW_AND_OLD_IMAGES"
        }});
        assert!(matches(p.clone(), event));
        assert!(!matches(
            p,
            json!({"dynamodb": {"Keys": {"Id": {"N": "102"}}}})
        ));
    }

    #[test]
    fn kinesis_metadata_and_data_example() {
        let p = json!({"partitionKey": ["1"], "data": {"Location": ["Los Angeles"]}});
        assert!(matches(
            p.clone(),
            json!({"partitionKey": "1", "data": {"Location": "Los Angeles", "x": 1}})
        ));
        assert!(!matches(
            p.clone(),
            json!({"partitionKey": "2", "data": {"Location": "Los Angeles"}})
        ));
        assert!(!matches(
            p,
            json!({"partitionKey": "1", "data": {"Location": "Seattle"}})
        ));
    }

    #[test]
    fn temperature_range_example() {
        let p = json!({"data": {"Temperature": [{"numeric": [">", 50, "<=", 60]}]}});
        let at = |t: Value| matches(p.clone(), json!({"data": {"Temperature": t}}));
        assert!(!at(json!(50)));
        assert!(at(json!(50.5)));
        assert!(at(json!(60)));
        assert!(!at(json!(60.01)));
        assert!(!at(json!("55")));
    }

    #[test]
    fn console_example_number_list() {
        let p = json!({"a": [1, 2]});
        assert!(matches(p.clone(), json!({"a": 1})));
        assert!(matches(p.clone(), json!({"a": 2})));
        assert!(!matches(p.clone(), json!({"a": 3})));
        assert!(!matches(p, json!({"a": "1"})));
    }

    #[test]
    fn comparison_operator_table() {
        let cases = [
            (
                json!({"UserID": [null]}),
                json!({"UserID": null}),
                json!({"UserID": "u"}),
            ),
            (
                json!({"LastName": [""]}),
                json!({"LastName": ""}),
                json!({"LastName": null}),
            ),
            (
                json!({"Name": ["Alice"]}),
                json!({"Name": "Alice"}),
                json!({"Name": "alice"}),
            ),
            (
                json!({"Name": [{"equals-ignore-case": "alice"}]}),
                json!({"Name": "ALICE"}),
                json!({"Name": "Alicia"}),
            ),
            (
                json!({"Location": ["New York"], "Day": ["Monday"]}),
                json!({"Location": "New York", "Day": "Monday"}),
                json!({"Location": "New York", "Day": "Tuesday"}),
            ),
            (
                json!({"PaymentType": ["Credit", "Debit"]}),
                json!({"PaymentType": "Debit"}),
                json!({"PaymentType": "Cash"}),
            ),
            (
                json!({"Weather": [{"anything-but": ["Raining"]}]}),
                json!({"Weather": "Sunny"}),
                json!({"Weather": "Raining"}),
            ),
            (
                json!({"Price": [{"numeric": ["=", 100]}]}),
                json!({"Price": 100.0}),
                json!({"Price": 101}),
            ),
            (
                json!({"Price": [{"numeric": [">", 10, "<=", 20]}]}),
                json!({"Price": 20}),
                json!({"Price": 10}),
            ),
            (
                json!({"ProductName": [{"exists": true}]}),
                json!({"ProductName": "x"}),
                json!({"Other": "x"}),
            ),
            (
                json!({"ProductName": [{"exists": false}]}),
                json!({"Other": "x"}),
                json!({"ProductName": "x"}),
            ),
            (
                json!({"Region": [{"prefix": "us-"}]}),
                json!({"Region": "us-east-1"}),
                json!({"Region": "eu-west-1"}),
            ),
            (
                json!({"FileName": [{"suffix": ".png"}]}),
                json!({"FileName": "cat.png"}),
                json!({"FileName": "cat.PNG"}),
            ),
        ];
        for (p, yes, no) in cases {
            assert!(matches(p.clone(), yes.clone()), "{p} should match {yes}");
            assert!(!matches(p.clone(), no.clone()), "{p} should not match {no}");
        }
    }

    // --- Literals ------------------------------------------------------------------------------

    #[test]
    fn numbers_compare_as_numbers() {
        assert!(matches(json!({"n": [5]}), json!({"n": 5.0})));
        assert!(matches(json!({"n": [5.0]}), json!({"n": 5})));
        assert!(matches(
            json!({"n": [300]}),
            serde_json::from_str(r#"{"n": 3.0e2}"#).unwrap()
        ));
        assert!(matches(json!({"n": [-0.5]}), json!({"n": -0.5})));
        assert!(!matches(json!({"n": [5]}), json!({"n": 5.000001})));
        assert!(!matches(json!({"n": [5]}), json!({"n": "5"})));
        assert!(!matches(json!({"n": ["5"]}), json!({"n": 5})));
    }

    #[test]
    fn large_integers_compare_exactly() {
        let big = json!({"n": [9_007_199_254_740_993_u64]});
        assert!(matches(
            big.clone(),
            json!({"n": 9_007_199_254_740_993_u64})
        ));
        assert!(!matches(big, json!({"n": 9_007_199_254_740_992_u64})));
        assert!(matches(json!({"n": [u64::MAX]}), json!({"n": u64::MAX})));
        assert!(!matches(json!({"n": [-1]}), json!({"n": u64::MAX})));
    }

    #[test]
    fn booleans_and_null_are_distinct_from_strings() {
        assert!(matches(json!({"b": [true]}), json!({"b": true})));
        assert!(!matches(json!({"b": [true]}), json!({"b": "true"})));
        assert!(!matches(json!({"b": ["true"]}), json!({"b": true})));
        assert!(!matches(json!({"b": [false]}), json!({"b": null})));
        assert!(!matches(json!({"b": [null]}), json!({"b": "null"})));
        assert!(!matches(json!({"b": [null]}), json!({})));
        assert!(!matches(json!({"b": [""]}), json!({})));
    }

    #[test]
    fn strings_match_exactly() {
        assert!(!matches(json!({"s": ["abc"]}), json!({"s": "abc "})));
        assert!(!matches(json!({"s": ["é"]}), json!({"s": "e\u{301}"})));
        assert!(matches(json!({"s": ["日本"]}), json!({"s": "日本"})));
    }

    // --- Structure -----------------------------------------------------------------------------

    #[test]
    fn every_key_must_match() {
        let p = json!({"a": ["x"], "b": {"c": [1]}});
        assert!(matches(p.clone(), json!({"a": "x", "b": {"c": 1}, "z": 0})));
        assert!(!matches(p.clone(), json!({"a": "x", "b": {"c": 2}})));
        assert!(!matches(p.clone(), json!({"a": "y", "b": {"c": 1}})));
        assert!(!matches(p, json!({"a": "x"})));
    }

    #[test]
    fn nested_pattern_does_not_match_scalar_or_missing_parent() {
        let p = json!({"detail": {"state": ["running"]}});
        assert!(!matches(p.clone(), json!({"detail": "running"})));
        assert!(!matches(p.clone(), json!({"state": "running"})));
        assert!(!matches(p, json!({"detail": null})));
    }

    #[test]
    fn leaf_does_not_match_an_object() {
        assert!(!matches(json!({"a": ["x"]}), json!({"a": {"x": "x"}})));
        assert!(!matches(
            json!({"a": [{"exists": true}]}),
            json!({"a": {"b": 1}})
        ));
        // An object is not a leaf, so "does not exist" holds (as in EventBridge).
        assert!(matches(
            json!({"a": [{"exists": false}]}),
            json!({"a": {"b": 1}})
        ));
        assert!(!matches(
            json!({"a": [{"anything-but": "x"}]}),
            json!({"a": {"b": 1}})
        ));
    }

    #[test]
    fn keys_with_dots_are_literal_field_names() {
        assert!(matches(json!({"a.b": ["x"]}), json!({"a.b": "x"})));
        assert!(!matches(json!({"a.b": ["x"]}), json!({"a": {"b": "x"}})));
    }

    #[test]
    fn duplicate_keys_keep_the_last_value() {
        let p: Value = serde_json::from_str(
            r#"{"data": {"duplicateKey": ["hello"], "uniqueKey": ["test123"], "duplicateKey": ["world"]}}"#,
        )
        .unwrap();
        let p = pattern(p);
        assert!(p.matches(&json!({"data": {"duplicateKey": "world", "uniqueKey": "test123"}})));
        assert!(!p.matches(&json!({"data": {"duplicateKey": "hello", "uniqueKey": "test123"}})));
    }

    // --- Arrays in events ----------------------------------------------------------------------

    #[test]
    fn array_field_matches_when_any_element_does() {
        let p = json!({"tags": ["red"]});
        assert!(matches(p.clone(), json!({"tags": ["blue", "red"]})));
        assert!(!matches(p.clone(), json!({"tags": ["blue", "green"]})));
        assert!(!matches(p.clone(), json!({"tags": []})));
        assert!(matches(p, json!({"tags": [["blue"], ["red"]]})));
        assert!(matches(
            json!({"n": [{"numeric": [">", 10]}]}),
            json!({"n": [1, "x", 11]})
        ));
        assert!(matches(
            json!({"s": [{"prefix": "ab"}]}),
            json!({"s": [1, null, "abc"]})
        ));
    }

    #[test]
    fn pattern_list_against_array_is_an_intersection() {
        let p = json!({"resources": ["arn:1", "arn:2"]});
        assert!(matches(p.clone(), json!({"resources": ["arn:0", "arn:2"]})));
        assert!(!matches(p, json!({"resources": ["arn:0", "arn:3"]})));
    }

    #[test]
    fn arrays_of_objects_are_matched_element_by_element() {
        let event = json!({"employees": [
            {"firstName": "John", "lastName": "Doe"},
            {"firstName": "Anna", "lastName": "Smith"},
            {"firstName": "Peter", "lastName": "Jones"},
        ]});
        assert!(matches(
            json!({"employees": {"firstName": ["Anna"]}}),
            event.clone()
        ));
        assert!(matches(
            json!({"employees": {"firstName": ["Anna"], "lastName": ["Smith"]}}),
            event.clone()
        ));
        assert!(!matches(
            json!({"employees": {"firstName": ["Anna"], "lastName": ["Jones"]}}),
            event.clone()
        ));
        // Multi-level arrays are flattened.
        let nested = json!({"employees": [[{"firstName": "John"}], [{"firstName": "Peter"}]]});
        assert!(matches(
            json!({"employees": {"firstName": ["Peter"]}}),
            nested
        ));
        // Deeper structure inside array elements.
        let records = json!({"Records": [
            {"s3": {"object": {"key": "a.txt"}}},
            {"s3": {"object": {"key": "b.png"}}},
        ]});
        assert!(matches(
            json!({"Records": {"s3": {"object": {"key": [{"suffix": ".png"}]}}}}),
            records.clone()
        ));
        assert!(!matches(
            json!({"Records": {"s3": {"object": {"key": [{"suffix": ".gif"}]}}}}),
            records
        ));
    }

    #[test]
    fn exists_false_inside_array_of_objects_needs_one_element_without_it() {
        let p = json!({"items": {"deleted": [{"exists": false}], "id": [2]}});
        let event = json!({"items": [{"id": 1}, {"id": 2, "deleted": true}]});
        assert!(!matches(p.clone(), event));
        let event = json!({"items": [{"id": 1, "deleted": true}, {"id": 2}]});
        assert!(matches(p, event));
    }

    #[test]
    fn nested_pattern_against_array_without_objects_sees_absent_fields() {
        let p = json!({"a": {"b": [{"exists": false}]}});
        assert!(matches(p.clone(), json!({"a": []})));
        assert!(matches(p.clone(), json!({"a": [1, 2]})));
        assert!(!matches(p, json!({"a": [{"b": 1}]})));
        assert!(!matches(json!({"a": {"b": [1]}}), json!({"a": [1]})));
    }

    // --- prefix / suffix / equals-ignore-case --------------------------------------------------

    #[test]
    fn prefix_and_suffix() {
        assert!(matches(
            json!({"t": [{"prefix": "2017-10-02"}]}),
            json!({"t": "2017-10-02T18:43:48Z"})
        ));
        assert!(!matches(
            json!({"t": [{"prefix": "2017-10-02"}]}),
            json!({"t": "2017-10-03"})
        ));
        assert!(!matches(json!({"t": [{"prefix": "1"}]}), json!({"t": 12})));
        assert!(matches(
            json!({"t": [{"prefix": ""}]}),
            json!({"t": "anything"})
        ));
        assert!(!matches(json!({"t": [{"prefix": ""}]}), json!({"t": null})));
        assert!(matches(
            json!({"f": [{"suffix": ".png"}]}),
            json!({"f": "a/b.png"})
        ));
        assert!(!matches(
            json!({"f": [{"suffix": ".png"}]}),
            json!({"f": "a/b.png.bak"})
        ));
        assert!(!matches(json!({"f": [{"suffix": "5"}]}), json!({"f": 5})));
    }

    #[test]
    fn ignore_case_variants() {
        let p = json!({"s": [{"prefix": {"equals-ignore-case": "EventB"}}]});
        assert!(matches(p.clone(), json!({"s": "eventbridge"})));
        assert!(matches(p.clone(), json!({"s": "EVENTBRIDGE"})));
        assert!(!matches(p, json!({"s": "event-bridge"})));
        let p = json!({"f": [{"suffix": {"equals-ignore-case": ".png"}}]});
        assert!(matches(p.clone(), json!({"f": "CAT.PNG"})));
        assert!(!matches(p, json!({"f": "cat.jpg"})));
        let p = json!({"n": [{"equals-ignore-case": "Ärger"}]});
        assert!(matches(p.clone(), json!({"n": "äRGER"})));
        assert!(!matches(p, json!({"n": "Ärgerlich"})));
        assert!(!matches(
            json!({"n": [{"equals-ignore-case": "true"}]}),
            json!({"n": true})
        ));
    }

    #[test]
    fn prefix_or_suffix_or_literal_in_one_leaf() {
        let p = json!({"k": ["exact", {"prefix": "pre-"}, {"suffix": "-post"}]});
        assert!(matches(p.clone(), json!({"k": "exact"})));
        assert!(matches(p.clone(), json!({"k": "pre-x"})));
        assert!(matches(p.clone(), json!({"k": "x-post"})));
        assert!(!matches(p, json!({"k": "other"})));
    }

    // --- anything-but --------------------------------------------------------------------------

    #[test]
    fn anything_but_single_and_list() {
        let p = json!({"state": [{"anything-but": "initializing"}]});
        assert!(matches(p.clone(), json!({"state": "running"})));
        assert!(!matches(p.clone(), json!({"state": "initializing"})));
        assert!(
            !matches(p.clone(), json!({})),
            "anything-but needs the field present"
        );
        assert!(matches(p.clone(), json!({"state": null})));
        assert!(matches(p, json!({"state": 7})));

        let p = json!({"state": [{"anything-but": ["stopped", "overloaded"]}]});
        assert!(matches(p.clone(), json!({"state": "running"})));
        assert!(!matches(p.clone(), json!({"state": "stopped"})));
        assert!(!matches(p, json!({"state": "overloaded"})));
    }

    #[test]
    fn anything_but_numbers_compare_numerically() {
        let p = json!({"x": [{"anything-but": [100, 200, 300]}]});
        assert!(matches(p.clone(), json!({"x": 301.8})));
        assert!(!matches(p.clone(), json!({"x": 200.0})));
        assert!(matches(p.clone(), json!({"x": "200"})));
        let p = json!({"x": [{"anything-but": 123}]});
        assert!(!matches(p.clone(), json!({"x": 123})));
        assert!(matches(p, json!({"x": 124})));
    }

    #[test]
    fn anything_but_prefix_suffix_ignore_case() {
        let p = json!({"r": [{"anything-but": {"prefix": "us-"}}]});
        assert!(matches(p.clone(), json!({"r": "eu-west-1"})));
        assert!(!matches(p.clone(), json!({"r": "us-east-1"})));
        assert!(!matches(p, json!({})));

        let p = json!({"r": [{"anything-but": {"prefix": ["us-", "ca-"]}}]});
        assert!(!matches(p.clone(), json!({"r": "ca-central-1"})));
        assert!(matches(p, json!({"r": "ap-south-1"})));

        let p = json!({"f": [{"anything-but": {"suffix": ".png"}}]});
        assert!(matches(p.clone(), json!({"f": "a.jpg"})));
        assert!(!matches(p, json!({"f": "a.png"})));

        let p =
            json!({"s": [{"anything-but": {"equals-ignore-case": ["Initializing", "stopped"]}}]});
        assert!(!matches(p.clone(), json!({"s": "INITIALIZING"})));
        assert!(!matches(p.clone(), json!({"s": "Stopped"})));
        assert!(matches(p, json!({"s": "running"})));
    }

    #[test]
    fn anything_but_with_arrays_needs_one_element_not_excluded() {
        let p = json!({"tags": [{"anything-but": ["a"]}]});
        assert!(matches(p.clone(), json!({"tags": ["a", "b"]})));
        assert!(!matches(p.clone(), json!({"tags": ["a", "a"]})));
        assert!(!matches(p, json!({"tags": []})));
    }

    // --- numeric -------------------------------------------------------------------------------

    #[test]
    fn numeric_operators() {
        let check = |op: &str, bound: Value, value: Value| {
            matches(
                json!({"n": [{"numeric": [op, bound]}]}),
                json!({"n": value}),
            )
        };
        assert!(check("=", json!(5), json!(5.0)));
        assert!(!check("=", json!(5), json!(5.5)));
        assert!(check("<", json!(5), json!(4.99)));
        assert!(!check("<", json!(5), json!(5)));
        assert!(check("<=", json!(5), json!(5)));
        assert!(!check("<=", json!(5), json!(5.01)));
        assert!(check(">", json!(-1), json!(0)));
        assert!(!check(">", json!(-1), json!(-1)));
        assert!(check(">=", json!(-1.5), json!(-1.5)));
        assert!(!check(">=", json!(-1.5), json!(-2)));
        assert!(check(">", json!(0.1), json!(1)));
        assert!(!check("=", json!(5), json!("5")));
        assert!(!check(">", json!(0), json!(true)));
        assert!(!check(">", json!(0), json!(null)));
    }

    #[test]
    fn numeric_ranges() {
        let p = json!({"c": [{"numeric": [">", 0, "<=", 5]}]});
        for (v, want) in [
            (0.0, false),
            (0.001, true),
            (5.0, true),
            (5.001, false),
            (-1.0, false),
        ] {
            assert_eq!(matches(p.clone(), json!({"c": v})), want, "{v}");
        }
        let p = json!({"c": [{"numeric": [">=", 1, "<", 2]}]});
        assert!(matches(p.clone(), json!({"c": 1})));
        assert!(matches(p.clone(), json!({"c": 1.999})));
        assert!(!matches(p, json!({"c": 2})));
        let p = json!({"c": [{"numeric": [">=", 3, "<=", 3]}]});
        assert!(matches(p.clone(), json!({"c": 3.0})));
        assert!(!matches(p, json!({"c": 3.1})));
    }

    #[test]
    fn several_numeric_conditions_are_alternatives() {
        let p = json!({"n": [{"numeric": ["<", 0]}, {"numeric": [">", 100]}]});
        assert!(matches(p.clone(), json!({"n": -1})));
        assert!(matches(p.clone(), json!({"n": 101})));
        assert!(!matches(p, json!({"n": 50})));
    }

    // --- exists --------------------------------------------------------------------------------

    #[test]
    fn exists_true_and_false() {
        let yes = json!({"detail": {"c-count": [{"exists": true}]}});
        let no = json!({"detail": {"c-count": [{"exists": false}]}});
        for (event, present) in [
            (json!({"detail": {"c-count": 5}}), true),
            (json!({"detail": {"c-count": null}}), true),
            (json!({"detail": {"c-count": ""}}), true),
            (json!({"detail": {"c-count": [0]}}), true),
            (json!({"detail": {"c-count": []}}), false),
            (json!({"detail": {"c-count": {"c1": 100}}}), false),
            (json!({"detail": {"other": 1}}), false),
            (json!({"detail": 1}), false),
            (json!({}), false),
        ] {
            assert_eq!(
                matches(yes.clone(), event.clone()),
                present,
                "exists:true on {event}"
            );
            assert_eq!(
                matches(no.clone(), event.clone()),
                !present,
                "exists:false on {event}"
            );
        }
    }

    #[test]
    fn exists_combined_with_other_fields() {
        let p = json!({
            "source": [{"prefix": "aws."}],
            "detail": {"error": [{"exists": false}], "state": [{"anything-but": "pending"}]}
        });
        assert!(matches(
            p.clone(),
            json!({"source": "aws.ec2", "detail": {"state": "running"}})
        ));
        assert!(!matches(
            p.clone(),
            json!({"source": "aws.ec2", "detail": {"state": "running", "error": "boom"}})
        ));
        assert!(!matches(
            p.clone(),
            json!({"source": "aws.ec2", "detail": {"state": "pending"}})
        ));
        assert!(!matches(
            p,
            json!({"source": "custom", "detail": {"state": "running"}})
        ));
    }

    #[test]
    fn exists_or_value_in_one_leaf() {
        let p = json!({"v": [{"exists": false}, "yes"]});
        assert!(matches(p.clone(), json!({})));
        assert!(matches(p.clone(), json!({"v": "yes"})));
        assert!(!matches(p, json!({"v": "no"})));
    }

    // --- cidr ----------------------------------------------------------------------------------

    #[test]
    fn cidr_blocks() {
        let p = json!({"ip": [{"cidr": "10.0.0.0/24"}]});
        assert!(matches(p.clone(), json!({"ip": "10.0.0.33"})));
        assert!(!matches(p.clone(), json!({"ip": "10.0.1.1"})));
        assert!(!matches(p.clone(), json!({"ip": "not an ip"})));
        assert!(!matches(p.clone(), json!({"ip": "::ffff:10.0.0.1"})));
        assert!(!matches(p, json!({"ip": 10})));
        let p = json!({"ip": [{"cidr": "10.1.2.3/8"}]});
        assert!(matches(p, json!({"ip": "10.200.0.1"})));
        let p = json!({"ip": [{"cidr": "2001:db8::/32"}]});
        assert!(matches(p.clone(), json!({"ip": "2001:db8:1::5"})));
        assert!(!matches(p, json!({"ip": "2001:db9::1"})));
        assert!(matches(
            json!({"ip": [{"cidr": "0.0.0.0/0"}]}),
            json!({"ip": "8.8.8.8"})
        ));
        assert!(matches(
            json!({"ip": [{"cidr": "1.2.3.4/32"}]}),
            json!({"ip": "1.2.3.4"})
        ));
    }

    // --- $or -----------------------------------------------------------------------------------

    #[test]
    fn or_of_sub_patterns() {
        let p = json!({
            "source": ["aws.cloudwatch"],
            "$or": [
                {"metricName": ["CPUUtilization", "ReadLatency"]},
                {"namespace": ["AWS/EC2", "AWS/ES"]}
            ]
        });
        assert!(matches(
            p.clone(),
            json!({"source": "aws.cloudwatch", "metricName": "ReadLatency"})
        ));
        assert!(matches(
            p.clone(),
            json!({"source": "aws.cloudwatch", "namespace": "AWS/ES"})
        ));
        assert!(!matches(
            p.clone(),
            json!({"source": "aws.cloudwatch", "namespace": "AWS/S3"})
        ));
        assert!(!matches(
            p,
            json!({"source": "aws.ec2", "namespace": "AWS/EC2"})
        ));
    }

    #[test]
    fn nested_or_applies_to_its_own_object() {
        let p = json!({"detail": {"$or": [
            {"c-count": [{"numeric": [">", 0, "<=", 5]}]},
            {"d-count": [{"numeric": ["<", 10]}]}
        ]}});
        assert!(matches(p.clone(), json!({"detail": {"c-count": 3}})));
        assert!(matches(p.clone(), json!({"detail": {"d-count": 3}})));
        assert!(!matches(
            p.clone(),
            json!({"detail": {"c-count": 30, "d-count": 30}})
        ));
        assert!(!matches(p, json!({"c-count": 3})));
    }

    // --- matches_any ---------------------------------------------------------------------------

    #[test]
    fn matches_any_ors_patterns_and_passes_everything_without_them() {
        let event = json!({"body": {"status": "ok"}});
        assert!(matches_any(&[], &event));
        let ok = pattern(json!({"body": {"status": ["ok"]}}));
        let failed = pattern(json!({"body": {"status": ["failed"]}}));
        assert!(matches_any(&[failed.clone(), ok.clone()], &event));
        assert!(matches_any(std::slice::from_ref(&ok), &event));
        assert!(!matches_any(std::slice::from_ref(&failed), &event));
    }

    #[test]
    fn parsed_patterns_compare_equal() {
        let a = pattern(json!({"a": [1, {"prefix": "x"}]}));
        let b = pattern(json!({"a": [1, {"prefix": "x"}]}));
        let c = pattern(json!({"a": [2]}));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    // --- Parse errors --------------------------------------------------------------------------

    #[test]
    fn the_example_error_message() {
        assert_eq!(
            error(json!({"data": {"amount": [{"numeric": [">"]}]}})),
            "`data.amount`: numeric filter needs an operator and a number, e.g. [\">\", 0, \"<=\", 5]"
        );
    }

    #[test]
    fn pattern_must_be_a_non_empty_object() {
        assert!(error(json!([])).contains("must be a JSON object"));
        assert!(error(json!("x")).contains("the string \"x\""));
        assert!(error(json!(null)).contains("must be a JSON object"));
        assert_eq!(
            error(json!({})),
            "a filter pattern must name at least one field; `{}` is not allowed"
        );
        assert_eq!(
            error(json!({"a": {"b": {}}})),
            "`a.b`: an empty object is not allowed; name at least one field inside it"
        );
    }

    #[test]
    fn leaves_must_be_non_empty_lists() {
        assert_eq!(
            error(json!({"body": {"status": "ok"}})),
            "`body.status`: must be a list of match conditions, e.g. [\"ok\"], or an object of nested fields"
        );
        assert!(
            error(json!({"n": 5})).starts_with("`n`: must be a list of match conditions, e.g. [5]")
        );
        assert!(error(json!({"n": null})).contains("e.g. [null]"));
        assert_eq!(
            error(json!({"a": []})),
            "`a`: needs at least one match condition; an empty list matches nothing"
        );
        assert!(
            error(json!({"a": [["x"]]}))
                .starts_with("`a`: match conditions cannot be nested lists")
        );
    }

    #[test]
    fn operator_written_without_its_list_gets_a_hint() {
        assert_eq!(
            error(json!({"data": {"Region": {"prefix": "us-"}}})),
            "`data.Region.prefix`: match conditions go inside a list, e.g. \"Region\": [{\"prefix\": \"us-\"}]"
        );
    }

    #[test]
    fn match_condition_objects_take_one_known_operator() {
        let e = error(json!({"a": [{"wildcard": "*.png"}]}));
        assert!(
            e.starts_with("`a`: unknown match operator `wildcard`"),
            "{e}"
        );
        let e = error(json!({"a": [{"prefix": "x", "suffix": "y"}]}));
        assert!(
            e.starts_with("`a`: a match condition takes exactly one operator"),
            "{e}"
        );
        assert!(e.contains("found `prefix`, `suffix`"), "{e}");
        let e = error(json!({"a": [{}]}));
        assert!(e.contains("found none"), "{e}");
    }

    #[test]
    fn string_operators_need_strings() {
        assert!(error(json!({"a": [{"prefix": 5}]})).contains("prefix needs a string"));
        assert!(error(json!({"a": [{"suffix": ["x"]}]})).contains("suffix needs a string"));
        assert!(
            error(json!({"a": [{"prefix": {"equals-ignore-case": 1}}]}))
                .contains("prefix takes a string or")
        );
        assert!(
            error(json!({"a": [{"prefix": {"wildcard": "x"}}]}))
                .contains("prefix takes a string or")
        );
        assert!(
            error(json!({"a": [{"equals-ignore-case": null}]}))
                .contains("equals-ignore-case needs a string")
        );
    }

    #[test]
    fn numeric_errors() {
        let hint = "numeric filter needs an operator and a number";
        for bad in [
            json!(5),
            json!(">"),
            json!([]),
            json!([">"]),
            json!([">", 1, "<"]),
            json!([">", 1, "<", 5, "x"]),
        ] {
            let e = error(json!({"n": [{"numeric": bad}]}));
            assert!(e.starts_with(&format!("`n`: {hint}")), "{bad}: {e}");
        }
        assert!(
            error(json!({"n": [{"numeric": [">", "5"]}]}))
                .contains("the string \"5\" is not a number")
        );
        assert!(error(json!({"n": [{"numeric": [">", null]}]})).contains("null is not a number"));
        assert!(error(json!({"n": [{"numeric": [5, ">"]}]})).contains("where an operator belongs"));
        assert_eq!(
            error(json!({"n": [{"numeric": ["!=", 5]}]})),
            "`n`: unknown numeric operator `!=`; use =, <, <=, > or >="
        );
        assert!(error(json!({"n": [{"numeric": ["<", 5, ">", 1]}]})).contains("lower bound first"));
        assert!(error(json!({"n": [{"numeric": ["=", 5, "<", 6]}]})).contains("lower bound first"));
        assert!(
            error(json!({"n": [{"numeric": [">", 5, "<", 5]}]})).contains("numeric range is empty")
        );
        assert!(
            error(json!({"n": [{"numeric": [">=", 5, "<", 5]}]}))
                .contains("numeric range is empty")
        );
        assert!(
            error(json!({"n": [{"numeric": [">", 6, "<=", 5]}]}))
                .contains("numeric range is empty")
        );
    }

    #[test]
    fn anything_but_errors() {
        assert!(error(json!({"a": [{"anything-but": []}]})).contains("at least one value"));
        assert!(
            error(json!({"a": [{"anything-but": ["x", 1]}]}))
                .contains("all strings or all numbers")
        );
        assert!(
            error(json!({"a": [{"anything-but": [null]}]})).contains("all strings or all numbers")
        );
        assert!(
            error(json!({"a": [{"anything-but": true}]})).contains("anything-but needs a string")
        );
        assert!(
            error(json!({"a": [{"anything-but": null}]})).contains("anything-but needs a string")
        );
        assert!(
            error(json!({"a": [{"anything-but": {"prefix": ""}}]}))
                .contains("cannot be the empty string")
        );
        assert!(
            error(json!({"a": [{"anything-but": {"suffix": ["x", ""]}}]}))
                .contains("cannot be the empty string")
        );
        assert!(
            error(json!({"a": [{"anything-but": {"prefix": []}}]}))
                .contains("non-empty list of strings")
        );
        assert!(
            error(json!({"a": [{"anything-but": {"prefix": 5}}]}))
                .contains("non-empty list of strings")
        );
        assert!(
            error(json!({"a": [{"anything-but": {"wildcard": "x*"}}]}))
                .contains("does not support `wildcard`")
        );
        assert!(error(json!({"a": [{"anything-but": {}}]})).contains("takes one of prefix"));
        assert!(
            error(json!({"a": [{"anything-but": {"prefix": "x", "suffix": "y"}}]}))
                .contains("takes one of prefix")
        );
    }

    #[test]
    fn exists_and_cidr_errors() {
        assert_eq!(
            error(json!({"a": [{"exists": "true"}]})),
            "`a`: exists needs true or false, not the string \"true\""
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/-1",
        ] {
            let e = error(json!({"ip": [{"cidr": bad}]}));
            assert!(
                e.starts_with("`ip`: cidr needs an address block"),
                "{bad}: {e}"
            );
        }
        assert!(error(json!({"ip": [{"cidr": 10}]})).contains("cidr needs"));
    }

    #[test]
    fn or_errors() {
        assert!(
            error(json!({"$or": {"a": [1]}}))
                .starts_with("`$or`: needs a list of two or more patterns")
        );
        assert!(
            error(json!({"$or": [{"a": [1]}]})).starts_with("`$or`: needs a list of two or more")
        );
        assert_eq!(
            error(json!({"d": {"$or": [{"a": [1]}, "b"]}})),
            "`d.$or[1]`: each `$or` alternative must be an object, not the string \"b\""
        );
        assert_eq!(
            error(json!({"$or": [{"a": [1]}, {"b": "x"}]})),
            "`$or[1].b`: must be a list of match conditions, e.g. [\"x\"], or an object of nested fields"
        );
    }

    #[test]
    fn pattern_length_is_limited_like_lambda() {
        let fits = json!({"k": ["x".repeat(MAX_PATTERN_CHARS - 10)]});
        assert_eq!(
            serde_json::to_string(&fits).unwrap().chars().count(),
            MAX_PATTERN_CHARS
        );
        assert!(FilterPattern::parse(&fits).is_ok());
        let too_long = json!({"k": ["x".repeat(MAX_PATTERN_CHARS - 9)]});
        assert_eq!(
            error(too_long),
            "filter pattern is 4097 characters long as JSON; Lambda allows at most 4096"
        );
    }

    #[test]
    fn errors_name_the_deepest_path() {
        let e = error(json!({"dynamodb": {"NewImage": {"status": {"S": [{"prefx": "a"}]}}}}));
        assert!(
            e.starts_with("`dynamodb.NewImage.status.S`: unknown match operator `prefx`"),
            "{e}"
        );
    }

    // --- Properties over generated values ------------------------------------------------------

    /// A small deterministic generator (xorshift64*), enough to explore value shapes.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn scalar(&mut self) -> Value {
            match self.below(6) {
                0 => Value::Null,
                1 => Value::Bool(self.below(2) == 0),
                2 => json!(i64::try_from(self.below(7)).unwrap() - 3),
                3 => json!((f64::from(u32::try_from(self.below(13)).unwrap()) - 6.0) / 2.0),
                _ => {
                    let words = ["", "a", "ab", "abc", "AB", "b", "ba", "10.0.0.1"];
                    json!(words[usize::try_from(self.below(8)).unwrap()])
                }
            }
        }

        fn value(&mut self, depth: u32) -> Value {
            match (depth, self.below(5)) {
                (0, _) | (_, 0..=2) => self.scalar(),
                (_, 3) => Value::Array((0..self.below(3)).map(|_| self.value(depth - 1)).collect()),
                _ => {
                    let mut object = Map::new();
                    for _ in 0..self.below(3) {
                        let key = ["f", "g"][usize::try_from(self.below(2)).unwrap()];
                        object.insert(key.to_owned(), self.value(depth - 1));
                    }
                    Value::Object(object)
                }
            }
        }

        /// An event with maybe a field `f`.
        fn event(&mut self) -> Value {
            if self.below(5) == 0 {
                json!({"g": 1})
            } else {
                json!({"f": self.value(2), "g": 1})
            }
        }
    }

    #[test]
    fn generated_properties_hold() {
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        for _ in 0..3000 {
            let event = g.event();
            let field = event.get("f");
            let probe = g.scalar();

            // exists:true and exists:false are complements.
            let yes = matches(json!({"f": [{"exists": true}]}), event.clone());
            let no = matches(json!({"f": [{"exists": false}]}), event.clone());
            assert_ne!(yes, no, "{event}");

            // A lone scalar field either equals a string/number literal or is "anything but" it.
            if let Some(v @ (Value::String(_) | Value::Number(_))) = field
                && (probe.is_string() || probe.is_number())
            {
                let equal = matches(json!({"f": [probe.clone()]}), event.clone());
                let other = matches(
                    json!({"f": [{"anything-but": probe.clone()}]}),
                    event.clone(),
                );
                assert_ne!(equal, other, "{probe} vs {v}");
                assert_eq!(equal, literals_equal(&probe, v));
            }

            // For a lone number, `> x` and `<= x` split the line; nothing else matches numeric.
            if let Value::Number(x) = &probe {
                let above = matches(json!({"f": [{"numeric": [">", x]}]}), event.clone());
                let below = matches(json!({"f": [{"numeric": ["<=", x]}]}), event.clone());
                match field {
                    Some(Value::Number(_)) => assert_ne!(above, below, "{x} vs {event}"),
                    Some(Value::Array(_)) => {}
                    _ => assert!(!above && !below, "{x} vs {event}"),
                }
            }

            // An empty prefix matches exactly when some leaf is a string.
            let mut leaves = Vec::new();
            if let Some(f) = field {
                collect_leaves(f, &mut leaves);
            }
            assert_eq!(
                matches(json!({"f": [{"prefix": ""}]}), event.clone()),
                leaves.iter().any(|l| l.is_string()),
                "{event}"
            );

            // A leaf list is the OR of its conditions, and a pattern the AND of its fields.
            let a = json!({"prefix": "a"});
            let both = matches(json!({"f": [a.clone(), probe.clone()]}), event.clone());
            let first = matches(json!({"f": [a.clone()]}), event.clone());
            let second = matches(json!({"f": [probe.clone()]}), event.clone());
            assert_eq!(both, first || second, "{probe} on {event}");
            let and = matches(json!({"f": [a], "g": [1]}), event.clone());
            assert_eq!(and, first, "{event}");

            // One pattern through matches_any is the pattern itself.
            let p = pattern(json!({"f": [probe.clone()]}));
            assert_eq!(
                matches_any(std::slice::from_ref(&p), &event),
                p.matches(&event)
            );
        }
    }

    #[test]
    fn generated_patterns_never_panic() {
        let mut g = Gen(0x0123_4567_89ab_cdef);
        let mut parsed = 0;
        for _ in 0..3000 {
            let candidate = g.value(4);
            if let Ok(p) = FilterPattern::parse(&candidate) {
                parsed += 1;
                for _ in 0..3 {
                    let _ = p.matches(&g.value(4));
                }
            }
        }
        assert!(
            parsed > 0,
            "the generator should produce some valid patterns"
        );
    }
}
