//! The Lambda-compatible Invoke API, so the AWS CLI and every AWS SDK are Sluice clients, and
//! the Prometheus `/metrics` endpoint.
//!
//! Every request body is read against a limit (Lambda's for the operation) and refused with
//! `RequestTooLargeException` past it, without reading the rest. An operation Sluice does not
//! implement, or an unknown path, gets a JSON error an SDK can raise, never an empty 404. A
//! synchronous invocation runs in its own task: a caller that disconnects does not cut it
//! short (Lambda finishes it and discards the result).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::Deserialize;

use crate::async_invoke::AsyncQueue;
use crate::function::Functions;
use crate::invocation::{Invocation, MAX_SYNC_PAYLOAD, function_arn};

/// Lambda's limit on an asynchronous request payload.
const MAX_ASYNC_PAYLOAD: usize = 1024 * 1024;

/// Lambda returns at most this much of an invocation's log with `X-Amz-Log-Type: Tail`.
const LOG_TAIL: usize = 4096;
/// Lambda's limit on a base64-encoded client context.
const MAX_CLIENT_CONTEXT: usize = 3583;
/// Lambda parses payloads with Jackson, whose default limit on nesting (StreamReadConstraints)
/// is 1000 levels of arrays and objects.
const MAX_JSON_DEPTH: usize = 1000;
/// The largest body of a management request (versions, aliases, concurrency): their bodies
/// are a few short fields.
pub(crate) const MAX_MANAGE_BODY: usize = 256 * 1024;

/// The date prefixes of Lambda's REST API: a path under one of them that Sluice does not serve
/// is an operation it does not support.
const LAMBDA_API_PREFIXES: &[&str] = &[
    "/2015-03-31/",
    "/2016-08-19/",
    "/2017-03-31/",
    "/2017-10-31/",
    "/2018-10-31/",
    "/2019-09-25/",
    "/2019-09-30/",
    "/2020-04-22/",
    "/2020-06-30/",
    "/2021-10-31/",
    "/2021-11-15/",
];

#[derive(Clone)]
pub(crate) struct ApiState {
    pub functions: Arc<Functions>,
    pub queue: Arc<AsyncQueue>,
    /// Functions' resource-based policies live here.
    pub store: Arc<dyn crate::state::StateStore>,
    /// The names of `api.principals`, which `AddPermission` takes as a `Principal`.
    pub principals: Arc<Vec<String>>,
    /// `api.metrics_token`: the bearer token `/metrics` asks for, if any.
    pub metrics_token: Option<sluice_config::Secret>,
}

/// Whether `path` is under one of the date prefixes of Lambda's API.
pub(crate) fn is_lambda_api_path(path: &str) -> bool {
    LAMBDA_API_PREFIXES.iter().any(|p| path.starts_with(p))
}

/// The API's routes, with `webhooks` (routes of their own state) merged in, every call of
/// Lambda's API recorded in the audit `trail`.
pub(crate) fn router(
    state: ApiState,
    webhooks: Router,
    trail: crate::audit::AuditTrail,
    auth: Arc<crate::auth::Auth>,
) -> Router {
    Router::new()
        .route("/2015-03-31/functions/{function}/invocations", post(invoke))
        .merge(crate::manage::routes())
        .merge(crate::permissions::routes())
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        // Each handler reads its body against its own limit (`read_body`).
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
        .merge(webhooks)
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        // Innermost first: who called and what, then the audit trail around it, so that it
        // sees refused calls too.
        .layer(axum::middleware::from_fn_with_state(
            auth,
            crate::auth::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            trail,
            crate::audit::audit,
        ))
}

/// Connections served past `api.max_connections`, for everything but invocations: enough for
/// health checks, metrics scrapes and management calls while invocations hold every slot.
pub(crate) const RESERVED_CONNECTIONS: u32 = 32;

/// `app` for the reserve connections: invocations (the Invoke API and webhooks) are refused
/// with 429, the rest is served as usual.
pub(crate) fn without_invocations(app: Router) -> Router {
    app.layer(axum::middleware::from_fn(refuse_invocations))
}

async fn refuse_invocations(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    let operator = path == "/healthz"
        || path == "/metrics"
        || (LAMBDA_API_PREFIXES.iter().any(|p| path.starts_with(p))
            && !path.ends_with("/invocations"));
    if operator {
        return next.run(request).await;
    }
    let mut extra = serde_json::Map::new();
    extra.insert("Reason".into(), "ConnectionLimitExceeded".into());
    let mut response = lambda_error_with(
        StatusCode::TOO_MANY_REQUESTS,
        "TooManyRequestsException",
        "Rate Exceeded.",
        extra,
    );
    // Closed after the answer, so that the reserve slot is free for the next operator call.
    response
        .headers_mut()
        .insert("connection", HeaderValue::from_static("close"));
    response
}

/// A path no route serves.
async fn not_found(method: Method, uri: Uri) -> Response {
    refuse_unrouted(&method, &uri, StatusCode::NOT_FOUND)
}

/// A served path asked with a method it does not take.
async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    refuse_unrouted(&method, &uri, StatusCode::METHOD_NOT_ALLOWED)
}

/// An operation of Lambda's API that Sluice does not implement (an unknown path under one of
/// its date prefixes, or a method a served path does not take) is a client error naming it,
/// in the shape the SDKs raise; anything else is a JSON 404 or 405. Never an empty body.
fn refuse_unrouted(method: &Method, uri: &Uri, status: StatusCode) -> Response {
    let path = uri.path();
    let (status, code, message) = if LAMBDA_API_PREFIXES.iter().any(|p| path.starts_with(p)) {
        let status = if status == StatusCode::NOT_FOUND {
            StatusCode::BAD_REQUEST
        } else {
            status
        };
        (
            status,
            "UnsupportedOperationException",
            format!("{method} {path} is not supported by Sluice"),
        )
    } else if status == StatusCode::NOT_FOUND {
        (
            status,
            "UnknownOperationException",
            format!("No operation or webhook at {path}"),
        )
    } else {
        (
            status,
            "MethodNotAllowedException",
            format!("{method} is not allowed on {path}"),
        )
    };
    metrics::counter!(crate::metrics::API_INVALID_REQUESTS, "error" => code).increment(1);
    let body = serde_json::json!({"Type": "User", "message": message});
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert("x-amzn-errortype", HeaderValue::from_static(code));
    response
}

/// Reads a request body of at most `limit` bytes. A larger one (by its Content-Length, or
/// once more than `limit` bytes have come) is refused with Lambda's
/// `RequestTooLargeException` for `operation`, and the rest is never read.
#[allow(
    clippy::result_large_err,
    reason = "the error is the handler's finished response, returned at once"
)]
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    operation: &str,
) -> Result<Bytes, Response> {
    use sluice_connectors::http::{BodyError, read_limited};
    read_limited(headers, body, limit)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { limit } => lambda_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLargeException",
                &format!(
                    "Request must be smaller than {limit} bytes for the {operation} operation"
                ),
            ),
            // A body cut short by the client is not a size problem.
            BodyError::Unreadable(_) => lambda_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContentException",
                &e.to_string(),
            ),
        })
}

/// Checks that a payload is JSON as Lambda accepts it: UTF-8 throughout (strings included),
/// nested at most `MAX_JSON_DEPTH` deep. Linear in time; constant memory beyond the payload.
fn check_json(payload: &[u8]) -> Result<(), String> {
    if let Err(e) = std::str::from_utf8(payload) {
        let at = e.valid_up_to();
        return Err(format!(
            "Invalid UTF-8 byte 0x{:02x} at byte {at}",
            payload.get(at).copied().unwrap_or_default()
        ));
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in payload {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(format!(
                        "Document nesting depth ({depth}) exceeds the maximum allowed ({MAX_JSON_DEPTH})"
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    // Skipping values keeps no tree: memory stays flat whatever the payload holds.
    serde_json::from_slice::<serde::de::IgnoredAny>(payload)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Counts a synchronous caller that went away before its invocation finished.
struct CallerWaiting {
    function: String,
    answered: bool,
}

impl Drop for CallerWaiting {
    fn drop(&mut self) {
        if !self.answered {
            metrics::counter!(crate::metrics::API_CALLER_DISCONNECTS, "function" => self.function.clone())
                .increment(1);
        }
    }
}

/// An error in the shape Lambda's API returns, which the AWS SDKs turn into typed exceptions.
pub(crate) fn lambda_error(status: StatusCode, code: &str, message: &str) -> Response {
    lambda_error_with(status, code, message, serde_json::Map::new())
}

fn lambda_error_with(
    status: StatusCode,
    code: &str,
    message: &str,
    mut extra: serde_json::Map<String, serde_json::Value>,
) -> Response {
    if status.is_client_error() {
        metrics::counter!(crate::metrics::API_INVALID_REQUESTS, "error" => code.to_string())
            .increment(1);
    }
    let kind = if status.is_server_error() {
        "Service"
    } else {
        "User"
    };
    extra.insert("Type".into(), kind.into());
    extra.insert("Message".into(), message.into());
    let mut response = (status, axum::Json(serde_json::Value::Object(extra))).into_response();
    if let Ok(v) = HeaderValue::from_str(code) {
        response.headers_mut().insert("x-amzn-errortype", v);
    }
    response
}

/// A function as the caller named it: a name, a partial ARN or a full ARN, with an optional
/// qualifier in the name or in the `Qualifier` query parameter.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FunctionRef {
    pub name: String,
    pub qualifier: Option<String>,
}

pub(crate) fn parse_function_ref(
    raw: &str,
    query_qualifier: Option<&str>,
) -> Result<FunctionRef, String> {
    let parts: Vec<&str> = raw.split(':').collect();
    let (name, qualifier) = match parts.as_slice() {
        [name] => (*name, None),
        [name, q] => (*name, Some(*q)),
        [_account, "function", name] => (*name, None),
        [_account, "function", name, q] => (*name, Some(*q)),
        [
            "arn",
            _partition,
            "lambda",
            _region,
            _account,
            "function",
            name,
        ] => (*name, None),
        [
            "arn",
            _partition,
            "lambda",
            _region,
            _account,
            "function",
            name,
            q,
        ] => (*name, Some(*q)),
        _ => {
            return Err(format!(
                "1 validation error detected: Value '{raw}' at 'functionName' failed to satisfy constraint: Member must satisfy regular expression pattern: (arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{{2}}(-gov)?-[a-z]+-\\d{{1}}:)?(\\d{{12}}:)?(function:)?([a-zA-Z0-9-_\\.]+)(:(\\$LATEST|[a-zA-Z0-9-_]+))?"
            ));
        }
    };
    if name.is_empty() || qualifier.is_some_and(str::is_empty) {
        return Err(format!("invalid function name `{raw}`"));
    }
    let qualifier = match (qualifier, query_qualifier) {
        (Some(a), Some(b)) if a != b => {
            return Err("The derived qualifier from the function name does not match the specified qualifier.".to_string());
        }
        (a, b) => a.or(b).map(str::to_string),
    };
    Ok(FunctionRef {
        name: name.to_string(),
        qualifier,
    })
}

#[derive(Debug, Deserialize)]
struct InvokeQuery {
    #[serde(rename = "Qualifier")]
    qualifier: Option<String>,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn invoke(
    State(state): State<ApiState>,
    Path(function): Path<String>,
    Query(query): Query<InvokeQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let fref = match parse_function_ref(&function, query.qualifier.as_deref()) {
        Ok(f) => f,
        Err(message) => {
            return lambda_error(StatusCode::BAD_REQUEST, "ValidationException", &message);
        }
    };
    let qualified_arn = match &fref.qualifier {
        Some(q) => format!("{}:{q}", function_arn(&fref.name)),
        None => function_arn(&fref.name),
    };
    let resolved = state
        .functions
        .get(&fref.name)
        .and_then(|f| Some((f.clone(), f.resolve(fref.qualifier.as_deref())?)));
    let Some((function, instance)) = resolved else {
        return lambda_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            &format!("Function not found: {qualified_arn}"),
        );
    };
    let invocation_type = header(&headers, "x-amz-invocation-type").unwrap_or("RequestResponse");
    let asynchronous = match invocation_type {
        "RequestResponse" => false,
        "Event" => true,
        "DryRun" => return StatusCode::NO_CONTENT.into_response(),
        other => {
            return lambda_error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
                &format!(
                    "1 validation error detected: Value '{other}' at 'invocationType' failed to satisfy constraint: Member must satisfy enum value set: [Event, RequestResponse, DryRun]"
                ),
            );
        }
    };
    let limit = if asynchronous {
        MAX_ASYNC_PAYLOAD
    } else {
        MAX_SYNC_PAYLOAD
    };
    let payload = match read_body(&headers, body, limit, "InvokeFunction").await {
        Ok(b) => b,
        Err(response) => return response,
    };
    // Lambda hands an empty request to the function as an empty JSON object.
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        Bytes::from_static(b"{}")
    } else {
        payload
    };
    if let Err(e) = check_json(&payload) {
        return lambda_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            &format!("Could not parse request body into json: {e}"),
        );
    }
    let mut inv = Invocation::new(payload, qualified_arn);
    if let Some(cc) = header(&headers, "x-amz-client-context") {
        match decode_client_context(cc) {
            Ok(json) => inv.client_context = Some(json),
            Err(message) => {
                return lambda_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestContentException",
                    &message,
                );
            }
        }
    }
    if let Some(trace) = header(&headers, "x-amzn-trace-id") {
        inv.trace_id = trace.to_string();
    }
    if asynchronous {
        return match state
            .queue
            .accept(
                &function.name,
                fref.qualifier.clone(),
                inv.payload,
                Some(inv.trace_id),
            )
            .await
        {
            Ok(request_id) => {
                let mut response = StatusCode::ACCEPTED.into_response();
                if let Ok(v) = HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert("x-amzn-requestid", v);
                }
                response
            }
            Err(e) => lambda_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ServiceException",
                &e.to_string(),
            ),
        };
    }
    let tail = header(&headers, "x-amz-log-type") == Some("Tail");
    inv.want_log = tail;

    // Its own task: if the caller goes away, the invocation still runs to its end.
    let mut waiting = CallerWaiting {
        function: function.name.clone(),
        answered: false,
    };
    let task = tokio::spawn(async move { function.invoke(&instance, inv).await });
    let joined = task.await;
    waiting.answered = true;
    let invoked = match joined {
        Ok(invoked) => invoked,
        Err(e) => {
            tracing::error!(error = %e, "an invocation task failed");
            return lambda_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ServiceException",
                "the invocation failed inside Sluice",
            );
        }
    };
    let outcome = match invoked {
        Ok(o) => o,
        Err(throttle) => {
            let mut extra = serde_json::Map::new();
            extra.insert("Reason".into(), throttle.reason().into());
            extra.insert("message".into(), throttle.to_string().into());
            return lambda_error_with(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequestsException",
                &throttle.to_string(),
                extra,
            );
        }
    };
    let mut response_headers = HeaderMap::new();
    response_headers.insert("content-type", HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(&outcome.request_id) {
        response_headers.insert("x-amzn-requestid", v);
    }
    if let Ok(v) = HeaderValue::from_str(&outcome.executed_version) {
        response_headers.insert("x-amz-executed-version", v);
    }
    if tail {
        let start = outcome.log.len().saturating_sub(LOG_TAIL);
        if let Ok(v) = HeaderValue::from_str(&B64.encode(&outcome.log[start..])) {
            response_headers.insert("x-amz-log-result", v);
        }
    }
    let body = match outcome.result {
        Ok(body) => body,
        Err(e) => {
            response_headers.insert(
                "x-amz-function-error",
                HeaderValue::from_static("Unhandled"),
            );
            e.to_json()
        }
    };
    (StatusCode::OK, response_headers, body).into_response()
}

fn decode_client_context(b64: &str) -> Result<String, String> {
    const INVALID: &str = "Client context must be a valid Base64-encoded JSON object.";
    if b64.len() > MAX_CLIENT_CONTEXT {
        return Err(format!(
            "Client context must be at most {MAX_CLIENT_CONTEXT} bytes, base64-encoded."
        ));
    }
    let bytes = B64.decode(b64.trim()).map_err(|_| INVALID.to_string())?;
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(_)) => {
            String::from_utf8(bytes).map_err(|_| INVALID.to_string())
        }
        _ => Err(INVALID.to_string()),
    }
}

/// `/metrics`, behind `api.metrics_token` when one is set. The token is compared in constant
/// time, so the time an answer takes says nothing about how much of a guess was right.
async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(token) = &state.metrics_token {
        use subtle::ConstantTimeEq;
        let given = header(&headers, "authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !bool::from(given.as_bytes().ct_eq(token.expose().as_bytes())) {
            metrics::counter!(crate::metrics::API_INVALID_REQUESTS, "error" => "MetricsUnauthorized")
                .increment(1);
            let mut response = (
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({
                    "message": "/metrics needs `Authorization: Bearer <api.metrics_token>`"
                })),
            )
                .into_response();
            response
                .headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    match crate::metrics::prometheus() {
        Some(handle) => (
            [("content-type", "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => lambda_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            "metrics go to the embedding application's own recorder",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, q: Option<&str>) -> FunctionRef {
        FunctionRef {
            name: name.into(),
            qualifier: q.map(Into::into),
        }
    }

    #[test]
    fn parses_every_way_lambda_accepts_a_function_name() {
        assert_eq!(parse_function_ref("f", None), Ok(r("f", None)));
        assert_eq!(parse_function_ref("f:live", None), Ok(r("f", Some("live"))));
        assert_eq!(
            parse_function_ref("123456789012:function:f", None),
            Ok(r("f", None))
        );
        assert_eq!(
            parse_function_ref(
                "arn:aws:lambda:us-east-1:123456789012:function:f:$LATEST",
                None
            ),
            Ok(r("f", Some("$LATEST")))
        );
        assert_eq!(parse_function_ref("f", Some("3")), Ok(r("f", Some("3"))));
    }

    #[test]
    fn refuses_conflicting_qualifiers_and_odd_names() {
        assert!(parse_function_ref("f:1", Some("2")).is_err());
        assert!(parse_function_ref("a:b:c", None).is_err());
        assert!(parse_function_ref("f:", None).is_err());
    }

    #[test]
    fn json_check_counts_nesting_outside_strings_only() {
        let at = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(check_json(at(MAX_JSON_DEPTH).as_bytes()), Ok(()));
        let err = check_json(at(MAX_JSON_DEPTH + 1).as_bytes()).expect_err("too deep");
        assert!(err.contains("nesting depth (1001)"), "{err}");
        assert_eq!(check_json(br#"{"a": "[[[[{{{{\"[["}"#), Ok(()));
        assert!(check_json(b"[1,]").is_err());
    }

    #[test]
    fn json_check_refuses_invalid_utf8_inside_strings() {
        let err = check_json(b"[\"\xff\"]").expect_err("invalid UTF-8");
        assert_eq!(err, "Invalid UTF-8 byte 0xff at byte 2");
        assert_eq!(check_json("[\"caf\u{e9}\"]".as_bytes()), Ok(()));
    }

    #[test]
    fn client_context_must_be_base64_json_object() {
        let ok = B64.encode(br#"{"custom":{"a":1}}"#);
        assert_eq!(
            decode_client_context(&ok).as_deref(),
            Ok(r#"{"custom":{"a":1}}"#)
        );
        assert!(decode_client_context("not base64!").is_err());
        assert!(decode_client_context(&B64.encode(b"[1]")).is_err());
    }
}
