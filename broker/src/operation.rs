//! Which Lambda operation a request of the API is, named as Lambda and IAM name it: the one
//! table that authorization (the IAM action and resource a policy is checked against) and the
//! audit trail (the event's name and function) read.
//!
//! After a request has been authenticated and routed, the auth layer puts the [`Caller`] and
//! the [`Operation`] in the response's extensions as well as the request's, so that a layer
//! around it (the audit trail) sees both for allowed and refused calls alike.

use axum::http::Method;

use crate::invocation::function_arn;

/// Who made a request. `principal` is the name of a principal from `api.principals` once its
/// signature checked; both are `None` under `api.auth: none`. A request refused for its
/// signature keeps the access key id it claimed, with no principal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Caller {
    pub principal: Option<String>,
    pub access_key_id: Option<String>,
}

/// One operation of Lambda's API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Operation {
    /// Lambda's name for it, which is also the audit event's `eventName`: `Invoke`,
    /// `PublishVersion`, `AddPermission`.
    pub name: &'static str,
    /// The IAM action a policy must allow: `lambda:InvokeFunction`.
    pub action: &'static str,
    /// The function named in the path, as given (a name, `name:qualifier` or an ARN), or
    /// `None` for account-wide operations (`ListFunctions`).
    pub function: Option<String>,
    /// The ARN the action is on, as IAM sees it: the function's ARN, with the qualifier when
    /// the request names one (`…:function:f:live`), or `*` for account-wide operations.
    pub resource: String,
}

/// Classifies a request by method and path (and the `Qualifier` query parameter, which the
/// Invoke and several management operations take). `None` for anything that is not one of
/// Lambda's operations: `/metrics`, `/healthz`, webhooks, unknown paths.
pub(crate) fn classify(method: &Method, path: &str, query: Option<&str>) -> Option<Operation> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let m = method;
    let (name, action, function, qualifier): (_, _, Option<&str>, Option<&str>) =
        match segments.as_slice() {
            ["2015-03-31", "functions"] if m == Method::GET => {
                ("ListFunctions", "lambda:ListFunctions", None, None)
            }
            ["2015-03-31", "functions", f] if m == Method::GET => {
                ("GetFunction", "lambda:GetFunction", Some(*f), None)
            }
            ["2015-03-31", "functions", f, "invocations"] if m == Method::POST => {
                ("Invoke", "lambda:InvokeFunction", Some(*f), None)
            }
            ["2015-03-31", "functions", f, "versions"] if m == Method::GET => (
                "ListVersionsByFunction",
                "lambda:ListVersionsByFunction",
                Some(*f),
                None,
            ),
            ["2015-03-31", "functions", f, "versions"] if m == Method::POST => {
                ("PublishVersion", "lambda:PublishVersion", Some(*f), None)
            }
            ["2015-03-31", "functions", f, "aliases"] if m == Method::GET => {
                ("ListAliases", "lambda:ListAliases", Some(*f), None)
            }
            ["2015-03-31", "functions", f, "aliases"] if m == Method::POST => {
                ("CreateAlias", "lambda:CreateAlias", Some(*f), None)
            }
            ["2015-03-31", "functions", f, "aliases", a] => {
                let (name, action) = match *m {
                    Method::GET => ("GetAlias", "lambda:GetAlias"),
                    Method::PUT => ("UpdateAlias", "lambda:UpdateAlias"),
                    Method::DELETE => ("DeleteAlias", "lambda:DeleteAlias"),
                    _ => return None,
                };
                (name, action, Some(*f), Some(*a))
            }
            ["2015-03-31", "functions", f, "policy"] => {
                let (name, action) = match *m {
                    Method::GET => ("GetPolicy", "lambda:GetPolicy"),
                    Method::POST => ("AddPermission", "lambda:AddPermission"),
                    _ => return None,
                };
                (name, action, Some(*f), None)
            }
            ["2015-03-31", "functions", f, "policy", _sid] if m == Method::DELETE => (
                "RemovePermission",
                "lambda:RemovePermission",
                Some(*f),
                None,
            ),
            ["2017-10-31", "functions", f, "concurrency"] => {
                let (name, action) = match *m {
                    Method::PUT => ("PutFunctionConcurrency", "lambda:PutFunctionConcurrency"),
                    Method::DELETE => (
                        "DeleteFunctionConcurrency",
                        "lambda:DeleteFunctionConcurrency",
                    ),
                    _ => return None,
                };
                (name, action, Some(*f), None)
            }
            ["2019-09-30", "functions", f, "concurrency"] if m == Method::GET => (
                "GetFunctionConcurrency",
                "lambda:GetFunctionConcurrency",
                Some(*f),
                None,
            ),
            _ => return None,
        };
    let qualifier = qualifier.or_else(|| query_qualifier(query));
    let resource = match function {
        None => "*".to_owned(),
        Some(raw) => resource_arn(raw, qualifier),
    };
    Some(Operation {
        name,
        action,
        function: function.map(str::to_owned),
        resource,
    })
}

/// The ARN of the function `raw` names (a name, `name:qualifier`, a partial or full ARN), with
/// `qualifier` appended when `raw` carries none. A name that does not parse is kept as the
/// last part of the ARN, so that a policy on `*` still matches it and the handler reports the
/// bad name as Lambda does.
pub(crate) fn resource_arn(raw: &str, qualifier: Option<&str>) -> String {
    let raw = percent_decode(raw);
    let (name, own) = match crate::api::parse_function_ref(&raw, None) {
        Ok(f) => (f.name, f.qualifier),
        Err(_) => (raw.clone(), None),
    };
    match own.as_deref().or(qualifier) {
        Some(q) => format!("{}:{q}", function_arn(&name)),
        None => function_arn(&name),
    }
}

fn query_qualifier(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("Qualifier="))
        .filter(|q| !q.is_empty())
}

/// Paths arrive percent-encoded (`%24LATEST`, `%3A` in an ARN).
fn percent_decode(raw: &str) -> String {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(method: Method, path: &str, query: Option<&str>) -> (&'static str, &'static str, String) {
        let o = classify(&method, path, query).expect("an operation");
        (o.name, o.action, o.resource)
    }

    #[test]
    fn invocations_are_invoke_function_on_the_qualified_arn() {
        assert_eq!(
            op(Method::POST, "/2015-03-31/functions/f/invocations", None),
            (
                "Invoke",
                "lambda:InvokeFunction",
                "arn:aws:lambda:us-east-1:000000000000:function:f".to_owned()
            )
        );
        assert_eq!(
            op(
                Method::POST,
                "/2015-03-31/functions/f/invocations",
                Some("Qualifier=live")
            )
            .2,
            "arn:aws:lambda:us-east-1:000000000000:function:f:live"
        );
        assert_eq!(
            op(
                Method::POST,
                "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Afunction%3Af%3A%24LATEST/invocations",
                None
            )
            .2,
            "arn:aws:lambda:us-east-1:000000000000:function:f:$LATEST"
        );
    }

    #[test]
    fn management_operations_carry_lambda_names_and_actions() {
        let cases = [
            (Method::GET, "/2015-03-31/functions/", "ListFunctions"),
            (Method::GET, "/2015-03-31/functions/f", "GetFunction"),
            (
                Method::POST,
                "/2015-03-31/functions/f/versions",
                "PublishVersion",
            ),
            (
                Method::GET,
                "/2015-03-31/functions/f/versions",
                "ListVersionsByFunction",
            ),
            (
                Method::POST,
                "/2015-03-31/functions/f/aliases",
                "CreateAlias",
            ),
            (
                Method::PUT,
                "/2015-03-31/functions/f/aliases/live",
                "UpdateAlias",
            ),
            (
                Method::DELETE,
                "/2015-03-31/functions/f/aliases/live",
                "DeleteAlias",
            ),
            (
                Method::POST,
                "/2015-03-31/functions/f/policy",
                "AddPermission",
            ),
            (Method::GET, "/2015-03-31/functions/f/policy", "GetPolicy"),
            (
                Method::DELETE,
                "/2015-03-31/functions/f/policy/s1",
                "RemovePermission",
            ),
            (
                Method::PUT,
                "/2017-10-31/functions/f/concurrency",
                "PutFunctionConcurrency",
            ),
            (
                Method::GET,
                "/2019-09-30/functions/f/concurrency",
                "GetFunctionConcurrency",
            ),
        ];
        for (method, path, name) in cases {
            let o = classify(&method, path, None).expect(path);
            assert_eq!(o.name, name, "{method} {path}");
            assert_eq!(
                o.action,
                format!("lambda:{name}").replace("lambda:Invoke", "lambda:InvokeFunction")
            );
        }
        assert_eq!(
            classify(&Method::GET, "/2015-03-31/functions", None).map(|o| o.resource),
            Some("*".to_owned())
        );
    }

    #[test]
    fn what_is_not_a_lambda_operation_is_none() {
        assert_eq!(classify(&Method::GET, "/metrics", None), None);
        assert_eq!(classify(&Method::POST, "/hooks/orders", None), None);
        assert_eq!(
            classify(&Method::PATCH, "/2015-03-31/functions/f/aliases/a", None),
            None
        );
    }
}
