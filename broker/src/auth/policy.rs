//! IAM policy evaluation for Lambda's API, as IAM does it within one account: a request is
//! denied unless a statement allows it, an explicit `Deny` in the caller's identity policy wins
//! over every `Allow`, and an `Allow` may come from the caller's identity policy or from the
//! function's resource-based policy (statements added with `AddPermission`).
//!
//! Actions match without regard to case, resources (function ARNs) with regard to it, both
//! with IAM's wildcards `*` (any run of characters, `:` included) and `?` (one character). So a
//! policy on `…:function:f` does not cover `…:function:f:live`, while `…:function:f*` and
//! `…:function:f:*` do, as in IAM.

use serde_json::Value;
use sluice_config::{Effect, Patterns, Policy};

use crate::invocation::ACCOUNT_ID;

/// The outcome of evaluating a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// No statement allows it.
    ImplicitDeny,
    /// A statement of the identity policy denies it.
    ExplicitDeny,
}

/// The caller's identity ARN as IAM names a user: `arn:aws:iam::000000000000:user/NAME`.
pub fn user_arn(principal: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT_ID}:user/{principal}")
}

/// Whether `text` matches `pattern` with IAM's `*` and `?`. Linear in space, at most
/// `pattern.len() * text.len()` steps.
pub fn wildcard_match(pattern: &str, text: &str, ignore_case: bool) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let eq = |a: char, b: char| {
        if ignore_case {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || eq(c, t[ti]) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                // Let the last `*` take one more character and try again from there.
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

fn applies(patterns: &Patterns, text: &str, ignore_case: bool) -> bool {
    match patterns {
        Patterns::Only(list) => list.iter().any(|p| wildcard_match(p, text, ignore_case)),
        Patterns::AllBut(list) => !list.iter().any(|p| wildcard_match(p, text, ignore_case)),
    }
}

/// What the identity policy says of `action` on `resource`.
pub fn evaluate_identity(policy: &Policy, action: &str, resource: &str) -> Decision {
    let mut decision = Decision::ImplicitDeny;
    for s in &policy.statements {
        if applies(&s.actions, action, true) && applies(&s.resources, resource, false) {
            match s.effect {
                Effect::Deny => return Decision::ExplicitDeny,
                Effect::Allow => decision = Decision::Allow,
            }
        }
    }
    decision
}

/// Whether a statement of a function's resource-based policy (as `GetPolicy` shows it)
/// allows `caller` (a principal's name) to perform `action` on `resource`. Statements with a
/// condition (`SourceArn`, `SourceAccount`) are grants to AWS services acting for a source,
/// and an API caller has neither: they do not apply, as IAM treats a condition key that is
/// absent.
pub fn resource_statement_allows(
    statement: &Value,
    caller: &str,
    action: &str,
    resource: &str,
) -> bool {
    let field = |k: &str| statement.get(k);
    if field("Effect").and_then(Value::as_str) != Some("Allow") || field("Condition").is_some() {
        return false;
    }
    let strings = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    };
    let principal_ok = match field("Principal") {
        Some(Value::String(s)) => s == "*",
        Some(Value::Object(p)) => strings(p.get("AWS")).iter().any(|arn| {
            arn == "*"
                || *arn == user_arn(caller)
                || *arn == format!("arn:aws:iam::{ACCOUNT_ID}:root")
        }),
        _ => false,
    };
    principal_ok
        && strings(field("Action"))
            .iter()
            .any(|p| wildcard_match(p, action, true))
        && strings(field("Resource"))
            .iter()
            .any(|p| wildcard_match(p, resource, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_config::parse_policy_json;

    const F: &str = "arn:aws:lambda:us-east-1:000000000000:function:f";

    #[test]
    fn wildcards_match_as_iam_and_case_only_for_actions() {
        assert!(wildcard_match(
            "lambda:Invoke*",
            "lambda:InvokeFunction",
            false
        ));
        assert!(wildcard_match(
            "LAMBDA:invoke*",
            "lambda:InvokeFunction",
            true
        ));
        assert!(!wildcard_match(
            "LAMBDA:invoke*",
            "lambda:InvokeFunction",
            false
        ));
        assert!(wildcard_match("lambda:Get?lias", "lambda:GetAlias", true));
        assert!(wildcard_match("*", "", false));
        assert!(!wildcard_match("a*b*c", "aXbY", false));
        assert!(wildcard_match("a*b*c", "aXbYc", false));
        // Pathological patterns stay quick.
        let long = "a".repeat(2000);
        assert!(!wildcard_match(
            &"*a".repeat(500),
            &format!("{long}b"),
            false
        ));
    }

    #[test]
    fn a_policy_on_a_function_does_not_cover_its_qualifiers_unless_wildcarded() {
        let exact = parse_policy_json(&format!(
            r#"{{"Statement":{{"Effect":"Allow","Action":"lambda:InvokeFunction","Resource":"{F}"}}}}"#
        ))
        .expect("valid test input");
        let action = "lambda:InvokeFunction";
        assert_eq!(evaluate_identity(&exact, action, F), Decision::Allow);
        assert_eq!(
            evaluate_identity(&exact, action, &format!("{F}:live")),
            Decision::ImplicitDeny
        );
        for wild in [format!("{F}*"), format!("{F}:*")] {
            let p = parse_policy_json(&format!(
                r#"{{"Statement":{{"Effect":"Allow","Action":"lambda:InvokeFunction","Resource":"{wild}"}}}}"#
            ))
            .expect("valid test input");
            assert_eq!(
                evaluate_identity(&p, action, &format!("{F}:live")),
                Decision::Allow
            );
        }
    }

    #[test]
    fn an_explicit_deny_wins_over_any_allow_and_nothing_is_allowed_by_default() {
        let p = parse_policy_json(
            r#"{"Statement":[{"Effect":"Allow","Action":"lambda:*","Resource":"*"},
                            {"Effect":"Deny","Action":"lambda:Put*","Resource":"*"}]}"#,
        )
        .expect("valid test input");
        assert_eq!(
            evaluate_identity(&p, "lambda:GetFunction", F),
            Decision::Allow
        );
        assert_eq!(
            evaluate_identity(&p, "lambda:PutFunctionConcurrency", F),
            Decision::ExplicitDeny
        );
        assert_eq!(
            evaluate_identity(&Policy::default(), "lambda:GetFunction", F),
            Decision::ImplicitDeny
        );
        let not = parse_policy_json(
            r#"{"Statement":{"Effect":"Allow","NotAction":"lambda:Invoke*","Resource":"*"}}"#,
        )
        .expect("valid test input");
        assert_eq!(
            evaluate_identity(&not, "lambda:GetFunction", F),
            Decision::Allow
        );
        assert_eq!(
            evaluate_identity(&not, "lambda:InvokeFunction", F),
            Decision::ImplicitDeny
        );
    }

    #[test]
    fn resource_statements_grant_to_their_principal_only_and_skip_conditions() {
        let s: Value = serde_json::json!({
            "Sid": "s", "Effect": "Allow",
            "Principal": {"AWS": user_arn("ci")},
            "Action": "lambda:InvokeFunction", "Resource": F
        });
        assert!(resource_statement_allows(
            &s,
            "ci",
            "lambda:InvokeFunction",
            F
        ));
        assert!(!resource_statement_allows(
            &s,
            "other",
            "lambda:InvokeFunction",
            F
        ));
        assert!(!resource_statement_allows(
            &s,
            "ci",
            "lambda:GetFunction",
            F
        ));
        assert!(!resource_statement_allows(
            &s,
            "ci",
            "lambda:InvokeFunction",
            &format!("{F}:live")
        ));
        let mut conditioned = s.clone();
        conditioned["Condition"] =
            serde_json::json!({"ArnLike": {"AWS:SourceArn": "arn:aws:s3:::b"}});
        assert!(!resource_statement_allows(
            &conditioned,
            "ci",
            "lambda:InvokeFunction",
            F
        ));
        let anyone = serde_json::json!({"Effect": "Allow", "Principal": "*", "Action": "lambda:InvokeFunction", "Resource": F});
        assert!(resource_statement_allows(
            &anyone,
            "x",
            "lambda:InvokeFunction",
            F
        ));
    }
}
