//! Who may call Lambda's API and what they may do: a layer in front of every Lambda operation
//! that verifies the request's Signature Version 4 ([`sigv4`]) against the principals of
//! `api.principals`, and authorizes the operation with IAM's rules ([`policy`]) over the
//! caller's identity policy and the function's resource-based policy.
//!
//! The layer classifies each request with [`crate::operation::classify`]; what is not one of
//! Lambda's operations (`/metrics`, `/healthz`, webhooks) passes through untouched. For every
//! Lambda operation it puts the [`Caller`] and the [`Operation`] in the request's extensions
//! and in the response's, refusals included, so that a layer around it (the audit trail) sees
//! both. Under `api.auth: none` it still does that, with an anonymous caller.

pub mod policy;
pub use sluice_sigv4 as sigv4;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use sluice_config::{ApiAuth, ApiConfig, Policy, Secret};

use crate::api::{lambda_error, read_body};
use crate::invocation::MAX_SYNC_PAYLOAD;
use crate::operation::{Caller, Operation, classify};
use crate::state::StateStore;
use policy::{Decision, evaluate_identity, resource_statement_allows, user_arn};

/// One principal of `api.principals`.
struct Principal {
    name: String,
    access_key_id: String,
    secret: Secret,
    policy: Policy,
}

/// The API's authentication and authorization, shared by every connection.
pub(crate) struct Auth {
    mode: ApiAuth,
    by_key: HashMap<String, Principal>,
    store: Arc<dyn StateStore>,
}

impl sigv4::Keys for Auth {
    fn secret(&self, access_key_id: &str) -> Option<&str> {
        self.by_key.get(access_key_id).map(|p| p.secret.expose())
    }
}

impl Auth {
    pub(crate) fn new(api: &ApiConfig, store: Arc<dyn StateStore>) -> Self {
        let by_key = api
            .principals
            .iter()
            .map(|(name, p)| {
                (
                    p.access_key_id.clone(),
                    Principal {
                        name: name.clone(),
                        access_key_id: p.access_key_id.clone(),
                        secret: p.secret_access_key.clone(),
                        policy: p.policy.clone(),
                    },
                )
            })
            .collect();
        Auth {
            mode: api.auth,
            by_key,
            store,
        }
    }

    /// Whether `principal` may perform `operation`: an explicit deny in its identity policy
    /// refuses; otherwise its identity policy or the function's resource-based policy must
    /// allow it.
    async fn authorize(&self, principal: &Principal, op: &Operation) -> Result<(), Response> {
        let refuse = |why: &str| {
            lambda_error(
                StatusCode::FORBIDDEN,
                "AccessDeniedException",
                &format!(
                    "User: {} is not authorized to perform: {} on resource: {} {why}",
                    user_arn(&principal.name),
                    op.action,
                    op.resource
                ),
            )
        };
        match evaluate_identity(&principal.policy, op.action, &op.resource) {
            Decision::Allow => return Ok(()),
            Decision::ExplicitDeny => {
                return Err(refuse("with an explicit deny in an identity-based policy"));
            }
            Decision::ImplicitDeny => {}
        }
        if let Some(key) = policy_key(&op.resource) {
            match self.store.function_policy(key).await {
                Ok(Some((document, _))) => {
                    if resource_policy_allows(&document, &principal.name, op) {
                        return Ok(());
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot read a function's resource policy");
                    return Err(lambda_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "ServiceException",
                        "the function's resource-based policy cannot be read",
                    ));
                }
            }
        }
        Err(refuse(&format!(
            "because no identity-based policy allows the {} action",
            op.action
        )))
    }
}

fn resource_policy_allows(document: &str, principal: &str, op: &Operation) -> bool {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(document) else {
        return false;
    };
    doc.get("Statement")
        .and_then(serde_json::Value::as_array)
        .is_some_and(|statements| {
            statements
                .iter()
                .any(|s| resource_statement_allows(s, principal, op.action, &op.resource))
        })
}

/// The key of the resource policy that governs `resource` (a function ARN with an optional
/// qualifier): `f` or `f:live`. `None` for account-wide operations.
pub(crate) fn policy_key(resource: &str) -> Option<&str> {
    resource
        .split_once(":function:")
        .map(|(_, rest)| rest)
        .filter(|k| !k.is_empty())
}

/// `app` with authentication and authorization in front of every Lambda operation.
pub(crate) async fn authenticate(
    State(auth): State<Arc<Auth>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(op) = classify(
        request.method(),
        request.uri().path(),
        request.uri().query(),
    ) else {
        return next.run(request).await;
    };
    if auth.mode == ApiAuth::None {
        return run(request, next, Caller::default(), op).await;
    }
    let (parts, body) = request.into_parts();
    // The signature covers the body: it is read here, within the largest body of any Lambda
    // operation, and handed on for the handler to read against its own limit.
    let operation = op.action.trim_start_matches("lambda:");
    let body = match read_body(&parts.headers, body, MAX_SYNC_PAYLOAD, operation).await {
        Ok(b) => b,
        Err(response) => return tagged(response, Caller::default(), op),
    };
    let request = sigv4::Request {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        body: &body,
    };
    let caller = match auth.check(&request, &op).await {
        Ok(caller) => caller,
        Err((response, caller)) => return tagged(response, caller, op),
    };
    let request = Request::from_parts(parts, Body::from(body));
    run(request, next, caller, op).await
}

impl Auth {
    /// Verifies `request`'s signature and authorizes `op` for its principal: the caller, or
    /// the refusal to answer with whoever the request claimed to be.
    async fn check(
        &self,
        request: &sigv4::Request<'_>,
        op: &Operation,
    ) -> Result<Caller, (Response, Caller)> {
        let principal = match sigv4::verify(request, self, SystemTime::now()) {
            Ok(key) => match self.by_key.get(&key) {
                Some(p) => p,
                None => {
                    let e = sigv4::AuthError::UnknownKey { access_key_id: key };
                    return Err((refusal(&e), Caller::default()));
                }
            },
            Err(e) => {
                let caller = Caller {
                    principal: None,
                    access_key_id: e.access_key_id().map(str::to_owned),
                };
                metrics::counter!(crate::metrics::API_AUTH_FAILURES, "error" => e.code())
                    .increment(1);
                return Err((refusal(&e), caller));
            }
        };
        let caller = Caller {
            principal: Some(principal.name.clone()),
            access_key_id: Some(principal.access_key_id.clone()),
        };
        if let Err(response) = self.authorize(principal, op).await {
            metrics::counter!(crate::metrics::API_AUTH_FAILURES, "error" => "AccessDeniedException")
                .increment(1);
            return Err((response, caller));
        }
        Ok(caller)
    }
}

/// Webhooks with `auth: { type: aws_iam }` (a Function URL's `AWS_IAM`): the request signed by
/// a principal whose policies allow `lambda:InvokeFunctionUrl` on the function.
impl sluice_connectors::http::UrlAuthorizer for Auth {
    fn authorize<'a>(
        &'a self,
        function: &'a str,
        request: sluice_connectors::http::UrlRequest<'a>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Response>> + Send + 'a>>
    {
        Box::pin(async move {
            let op = Operation {
                name: "InvokeFunctionUrl",
                action: "lambda:InvokeFunctionUrl",
                function: Some(function.to_owned()),
                resource: crate::operation::resource_arn(function, None),
            };
            let signed = sigv4::Request {
                method: request.method,
                path: request.uri.path(),
                query: request.uri.query(),
                headers: request.headers,
                body: request.body,
            };
            self.check(&signed, &op)
                .await
                .map(|_| ())
                .map_err(|(r, _)| r)
        })
    }
}

async fn run(mut request: Request, next: Next, caller: Caller, op: Operation) -> Response {
    request.extensions_mut().insert(caller.clone());
    request.extensions_mut().insert(op.clone());
    tagged(next.run(request).await, caller, op)
}

fn tagged(mut response: Response, caller: Caller, op: Operation) -> Response {
    response.extensions_mut().insert(caller);
    response.extensions_mut().insert(op);
    response
}

/// A refused signature, answered as Lambda answers it.
fn refusal(e: &sigv4::AuthError) -> Response {
    lambda_error(StatusCode::FORBIDDEN, e.code(), &e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_policies_are_kept_per_function_and_qualifier() {
        assert_eq!(
            policy_key("arn:aws:lambda:us-east-1:000000000000:function:f"),
            Some("f")
        );
        assert_eq!(
            policy_key("arn:aws:lambda:us-east-1:000000000000:function:f:live"),
            Some("f:live")
        );
        assert_eq!(policy_key("*"), None);
    }
}
