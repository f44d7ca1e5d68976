//! Functions' resource-based policies through Lambda's API: `AddPermission`,
//! `RemovePermission` and `GetPolicy`, with Lambda's paths, shapes and errors, so that
//! `aws lambda add-permission` and boto3 work unchanged. A function (or one of its versions or
//! aliases, by `Qualifier`) has one policy document in the state store; every change is a
//! compare-and-swap on its revision id, so concurrent changes (also from other Sluice
//! instances on one PostgreSQL) never lose a statement, and a caller's `RevisionId` is checked
//! against the latest one.
//!
//! What these statements grant is evaluated by [`crate::auth`] when a caller's identity policy
//! does not allow an operation.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{ApiState, MAX_MANAGE_BODY, lambda_error, parse_function_ref, read_body};
use crate::auth::policy::user_arn;
use crate::invocation::{ACCOUNT_ID, function_arn};

/// Tries of a read-modify-write that lost a race to another change, before giving up.
const SWAP_TRIES: usize = 8;
/// Lambda's limit on a function policy's size (20 KB).
const MAX_POLICY: usize = 20 * 1024;

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route(
            "/2015-03-31/functions/{function}/policy",
            get(get_policy).post(add_permission),
        )
        .route(
            "/2015-03-31/functions/{function}/policy/{sid}",
            delete(remove_permission),
        )
}

#[derive(Debug, Default, Deserialize)]
struct PolicyQuery {
    #[serde(rename = "Qualifier")]
    qualifier: Option<String>,
    #[serde(rename = "RevisionId")]
    revision_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AddPermissionBody {
    statement_id: Option<String>,
    action: Option<String>,
    principal: Option<String>,
    source_arn: Option<String>,
    source_account: Option<String>,
    revision_id: Option<String>,
}

fn invalid(message: impl AsRef<str>) -> Response {
    lambda_error(
        StatusCode::BAD_REQUEST,
        "InvalidParameterValueException",
        message.as_ref(),
    )
}

fn not_found(message: &str) -> Response {
    lambda_error(StatusCode::NOT_FOUND, "ResourceNotFoundException", message)
}

fn service_error(e: impl std::fmt::Display) -> Response {
    lambda_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "ServiceException",
        &e.to_string(),
    )
}

fn stale_revision() -> Response {
    lambda_error(
        StatusCode::PRECONDITION_FAILED,
        "PreconditionFailedException",
        "The Revision Id provided does not match the latest Revision Id. Call the GetPolicy API to retrieve the latest Revision Id",
    )
}

/// The policy key (`f` or `f:live`) and the ARN statements are on, for the function the path
/// names with the `Qualifier`, once the function (and its version or alias) is known to exist.
#[allow(
    clippy::result_large_err,
    reason = "the error is the handler's finished response, returned at once"
)]
fn target(
    state: &ApiState,
    raw: &str,
    qualifier: Option<&str>,
) -> Result<(String, String), Response> {
    let fref = parse_function_ref(raw, qualifier).map_err(invalid)?;
    let Some(function) = state.functions.get(&fref.name) else {
        return Err(not_found(&format!(
            "Function not found: {}",
            function_arn(&fref.name)
        )));
    };
    match fref.qualifier {
        None => Ok((fref.name.clone(), function_arn(&fref.name))),
        Some(q) => {
            if function.alias(&q).is_none() && function.resolve(Some(&q)).is_none() {
                return Err(not_found(&format!(
                    "Function not found: {}:{q}",
                    function_arn(&fref.name)
                )));
            }
            Ok((
                format!("{}:{q}", fref.name),
                format!("{}:{q}", function_arn(&fref.name)),
            ))
        }
    }
}

/// `Principal` as Lambda's policy shows it: `*`, an account (its root), an IAM ARN, a
/// service, or the name of a principal of `api.principals` (as its user ARN).
fn principal_json(state: &ApiState, principal: &str) -> Result<Value, String> {
    if principal == "*" {
        return Ok(json!("*"));
    }
    if principal.len() == 12 && principal.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(json!({"AWS": format!("arn:aws:iam::{principal}:root")}));
    }
    if principal.starts_with("arn:aws:iam::") {
        return Ok(json!({"AWS": principal}));
    }
    if principal.ends_with(".amazonaws.com") {
        return Ok(json!({"Service": principal}));
    }
    if state.principals.iter().any(|p| p == principal) {
        return Ok(json!({"AWS": user_arn(principal)}));
    }
    Err(format!(
        "The principal `{principal}` is not valid: give `*`, an account id, an IAM ARN (arn:aws:iam::{ACCOUNT_ID}:user/NAME), a service principal, or the name of a principal in api.principals"
    ))
}

fn valid_sid(sid: &str) -> bool {
    (1..=100).contains(&sid.len())
        && sid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn valid_action(action: &str) -> bool {
    if action == "*" {
        return true;
    }
    action.split_once(':').is_some_and(|(service, name)| {
        service.eq_ignore_ascii_case("lambda")
            && !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'*' || b == b'?')
    })
}

fn statements(document: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(document)
        .ok()
        .and_then(|v| v.get("Statement").and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

fn document(statements: Vec<Value>) -> String {
    json!({"Version": "2012-10-17", "Id": "default", "Statement": statements}).to_string()
}

async fn add_permission(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    Query(q): Query<PolicyQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&headers, body, MAX_MANAGE_BODY, "AddPermission").await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let req: AddPermissionBody = if body.iter().all(u8::is_ascii_whitespace) {
        AddPermissionBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return invalid(format!("invalid request body: {e}")),
        }
    };
    let (key, resource) = match target(&state, &raw, q.qualifier.as_deref()) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let (Some(sid), Some(action), Some(principal)) = (req.statement_id, req.action, req.principal)
    else {
        return invalid("AddPermission needs StatementId, Action and Principal");
    };
    if !valid_sid(&sid) {
        return invalid(format!(
            "1 validation error detected: Value '{sid}' at 'statementId' failed to satisfy constraint: Member must satisfy regular expression pattern: ([a-zA-Z0-9-_.]+)"
        ));
    }
    if !valid_action(&action) {
        return invalid(format!(
            "1 validation error detected: Value '{action}' at 'action' failed to satisfy constraint: Member must satisfy regular expression pattern: (lambda:[*]|lambda:[a-zA-Z]+|[*])"
        ));
    }
    let principal = match principal_json(&state, &principal) {
        Ok(p) => p,
        Err(m) => return invalid(m),
    };
    let mut statement = json!({
        "Sid": sid,
        "Effect": "Allow",
        "Principal": principal,
        "Action": action,
        "Resource": resource,
    });
    let mut condition = serde_json::Map::new();
    if let Some(arn) = req.source_arn {
        condition.insert("ArnLike".into(), json!({"AWS:SourceArn": arn}));
    }
    if let Some(account) = req.source_account {
        condition.insert("StringEquals".into(), json!({"AWS:SourceAccount": account}));
    }
    if !condition.is_empty() {
        statement["Condition"] = Value::Object(condition);
    }
    for _ in 0..SWAP_TRIES {
        let current = match state.store.function_policy(&key).await {
            Ok(c) => c,
            Err(e) => return service_error(e),
        };
        let (mut list, revision) = match &current {
            Some((doc, rev)) => (statements(doc), Some(rev.as_str())),
            None => (Vec::new(), None),
        };
        if let Some(wanted) = &req.revision_id
            && revision != Some(wanted.as_str())
        {
            return stale_revision();
        }
        if list.iter().any(|s| s.get("Sid") == Some(&json!(sid))) {
            return lambda_error(
                StatusCode::CONFLICT,
                "ResourceConflictException",
                "The statement id (sid) provided already exists. Please specify a new statement id, or remove the existing statement.",
            );
        }
        list.push(statement.clone());
        let new_doc = document(list);
        if new_doc.len() > MAX_POLICY {
            return lambda_error(
                StatusCode::BAD_REQUEST,
                "PolicyLengthExceededException",
                "The final policy size is bigger than the limit.",
            );
        }
        let new_revision = uuid::Uuid::new_v4().to_string();
        match state
            .store
            .swap_function_policy(&key, revision, Some((&new_doc, &new_revision)))
            .await
        {
            Ok(true) => {
                return (
                    StatusCode::CREATED,
                    axum::Json(json!({"Statement": statement.to_string()})),
                )
                    .into_response();
            }
            Ok(false) if req.revision_id.is_some() => return stale_revision(),
            Ok(false) => continue,
            Err(e) => return service_error(e),
        }
    }
    service_error("the policy kept changing under this call; try again")
}

async fn remove_permission(
    State(state): State<ApiState>,
    Path((raw, sid)): Path<(String, String)>,
    Query(q): Query<PolicyQuery>,
) -> Response {
    let (key, _) = match target(&state, &raw, q.qualifier.as_deref()) {
        Ok(t) => t,
        Err(r) => return r,
    };
    for _ in 0..SWAP_TRIES {
        let current = match state.store.function_policy(&key).await {
            Ok(c) => c,
            Err(e) => return service_error(e),
        };
        let Some((doc, revision)) = current else {
            return not_found("No policy is associated with the given resource.");
        };
        if let Some(wanted) = &q.revision_id
            && *wanted != revision
        {
            return stale_revision();
        }
        let mut list = statements(&doc);
        let before = list.len();
        list.retain(|s| s.get("Sid") != Some(&json!(sid)));
        if list.len() == before {
            return not_found(&format!("Statement {sid} is not found in resource policy."));
        }
        let new_revision = uuid::Uuid::new_v4().to_string();
        let new_doc = document(list.clone());
        let new = (!list.is_empty()).then_some((new_doc.as_str(), new_revision.as_str()));
        match state
            .store
            .swap_function_policy(&key, Some(&revision), new)
            .await
        {
            Ok(true) => return StatusCode::NO_CONTENT.into_response(),
            Ok(false) if q.revision_id.is_some() => return stale_revision(),
            Ok(false) => continue,
            Err(e) => return service_error(e),
        }
    }
    service_error("the policy kept changing under this call; try again")
}

async fn get_policy(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    Query(q): Query<PolicyQuery>,
) -> Response {
    let (key, _) = match target(&state, &raw, q.qualifier.as_deref()) {
        Ok(t) => t,
        Err(r) => return r,
    };
    match state.store.function_policy(&key).await {
        Ok(Some((doc, revision))) => (
            StatusCode::OK,
            axum::Json(json!({"Policy": doc, "RevisionId": revision})),
        )
            .into_response(),
        Ok(None) => not_found("The resource you requested does not exist."),
        Err(e) => service_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_ids_and_actions_follow_lambda_patterns() {
        assert!(valid_sid("allow-ci_1.x"));
        assert!(!valid_sid(""));
        assert!(!valid_sid("no spaces"));
        assert!(valid_action("lambda:InvokeFunction"));
        assert!(valid_action("lambda:*"));
        assert!(valid_action("*"));
        assert!(!valid_action("s3:GetObject"));
        assert!(!valid_action("lambda:"));
    }
}
