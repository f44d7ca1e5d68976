//! `type: http`: a webhook on Sluice's API listener. The request becomes a Lambda Function URL
//! event (payload format 2.0); a synchronous webhook answers with the function's result, an
//! asynchronous one with 202 once the event is durably queued.
//!
//! A body larger than the source's `max_body` (default 6 MiB, Lambda's synchronous payload
//! limit) is answered 413 without being read. A synchronous invocation runs in its own task,
//! so a caller that disconnects does not cut it short.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use sluice_config::HttpSourceConfig;

use crate::{Dispatch, DispatchError};

/// Checks a request to a webhook with `auth: { type: aws_iam }`: its Signature Version 4 and
/// whether its principal may call `lambda:InvokeFunctionUrl` on `function`. The broker
/// implements it with the API's principals and policies; the answer to a refusal is the
/// response to send (403 with Lambda's error shape).
pub trait UrlAuthorizer: Send + Sync + 'static {
    fn authorize<'a>(
        &'a self,
        function: &'a str,
        request: UrlRequest<'a>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Response>> + Send + 'a>>;
}

/// What a webhook request's signature covers.
pub struct UrlRequest<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

pub const WEBHOOK_REQUESTS: &str = "sluice_webhook_requests_total";
/// Requests refused before the function was invoked, by `reason` (`body_too_large`,
/// `unreadable_body`).
pub const WEBHOOK_REFUSED: &str = "sluice_webhook_refused_total";
/// Requests refused for their credentials (`auth:`), by `reason` (`missing`, `invalid`).
pub const HTTP_AUTH_FAILURES: &str = "sluice_http_auth_failures_total";

#[derive(Clone)]
struct Hook {
    name: String,
    function: String,
    asynchronous: bool,
    max_body: usize,
    dispatch: Arc<dyn Dispatch>,
    account: String,
    auth: Arc<sluice_config::WebhookAuth>,
    iam: Option<Arc<dyn UrlAuthorizer>>,
}

/// Routes for every webhook, to be merged into the API router. `iam` checks the webhooks with
/// `auth: { type: aws_iam }`; without it they refuse every request.
pub fn router(
    hooks: &[(String, String, HttpSourceConfig)],
    dispatch: Arc<dyn Dispatch>,
    account: &str,
    iam: Option<Arc<dyn UrlAuthorizer>>,
) -> Router {
    let mut router = Router::new();
    for (name, function, config) in hooks {
        let mut filter: Option<MethodFilter> = None;
        for m in &config.methods {
            let f = match m.as_str() {
                "GET" => MethodFilter::GET,
                "PUT" => MethodFilter::PUT,
                "PATCH" => MethodFilter::PATCH,
                "DELETE" => MethodFilter::DELETE,
                _ => MethodFilter::POST,
            };
            filter = Some(filter.map_or(f, |acc| acc.or(f)));
        }
        let hook = Hook {
            name: name.clone(),
            function: function.clone(),
            asynchronous: config.asynchronous,
            max_body: usize::try_from(config.max_body).unwrap_or(usize::MAX),
            dispatch: dispatch.clone(),
            account: account.to_string(),
            auth: Arc::new(config.auth.clone()),
            iam: iam.clone(),
        };
        router = router.route(
            &config.path,
            on(filter.unwrap_or(MethodFilter::POST), handle).with_state(hook),
        );
    }
    router
}

/// The Function URL request event for one HTTP request.
fn event(
    hook: &Hook,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    peer: SocketAddr,
    body: &[u8],
    request_id: &str,
) -> Value {
    let mut header_map: BTreeMap<String, String> = BTreeMap::new();
    let mut cookies = Vec::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        if name == "cookie" {
            cookies.extend(value.split("; ").map(str::to_string));
            continue;
        }
        header_map
            .entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let query = uri.query().unwrap_or_default();
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        params
            .entry(k.to_string())
            .and_modify(|old| {
                old.push(',');
                old.push_str(v);
            })
            .or_insert_with(|| v.to_string());
    }
    let (body, is_base64) = match std::str::from_utf8(body) {
        Ok(text) => (text.to_string(), false),
        Err(_) => (B64.encode(body), true),
    };
    let now = chrono::Utc::now();
    let mut event = json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": uri.path(),
        "rawQueryString": query,
        "headers": header_map,
        "requestContext": {
            "accountId": hook.account,
            "apiId": hook.name,
            "domainName": headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or_default(),
            "domainPrefix": hook.name,
            "http": {
                "method": method.as_str(),
                "path": uri.path(),
                "protocol": "HTTP/1.1",
                "sourceIp": peer.ip().to_string(),
                "userAgent": headers.get("user-agent").and_then(|h| h.to_str().ok()).unwrap_or_default(),
            },
            "requestId": request_id,
            "routeKey": "$default",
            "stage": "$default",
            "time": now.format("%d/%b/%Y:%H:%M:%S +0000").to_string(),
            "timeEpoch": now.timestamp_millis(),
        },
        "isBase64Encoded": is_base64,
    });
    if !body.is_empty() {
        event["body"] = Value::String(body);
    }
    if !cookies.is_empty() {
        event["cookies"] = json!(cookies);
    }
    if !params.is_empty() {
        event["queryStringParameters"] = json!(params);
    }
    event
}

/// A function result becomes a response as Function URLs do it: an object with `statusCode`
/// is a full response; any other JSON is a 200 with that JSON as the body.
fn response(result: &[u8]) -> Response {
    let value: Value = match serde_json::from_slice(result) {
        Ok(v) => v,
        Err(_) => return (StatusCode::OK, result.to_vec()).into_response(),
    };
    let Some(status) = value.get("statusCode").and_then(Value::as_u64) else {
        return (
            StatusCode::OK,
            [("content-type", "application/json")],
            result.to_vec(),
        )
            .into_response();
    };
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let body = match value.get("body") {
        Some(Value::String(s)) if value["isBase64Encoded"] == json!(true) => {
            B64.decode(s).unwrap_or_default()
        }
        Some(Value::String(s)) => s.clone().into_bytes(),
        Some(other) => other.to_string().into_bytes(),
        None => Vec::new(),
    };
    let mut response = (status, body).into_response();
    if let Some(Value::Object(headers)) = value.get("headers") {
        for (k, v) in headers {
            if let (Ok(name), Some(Ok(value))) = (
                HeaderName::from_bytes(k.as_bytes()),
                v.as_str().map(HeaderValue::from_str),
            ) {
                response.headers_mut().insert(name, value);
            }
        }
    }
    if let Some(Value::Array(cookies)) = value.get("cookies") {
        for c in cookies.iter().filter_map(Value::as_str) {
            if let Ok(v) = HeaderValue::from_str(c) {
                response.headers_mut().append("set-cookie", v);
            }
        }
    }
    response
}

async fn handle(
    State(hook): State<Hook>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let labels = [
        ("source", hook.name.clone()),
        ("function", hook.function.clone()),
    ];
    if let Err(refusal) = crate::http_auth::check_headers(&hook.auth, &headers) {
        return refuse(&hook, refusal);
    }
    let body = match read_body(&hook, &headers, body).await {
        Ok(body) => body,
        Err((status, reason, message)) => {
            metrics::counter!(
                WEBHOOK_REFUSED,
                &[
                    ("source", hook.name.clone()),
                    ("reason", reason.to_string())
                ]
            )
            .increment(1);
            return (status, axum::Json(json!({"message": message}))).into_response();
        }
    };
    if let Err(refusal) = crate::http_auth::check_body(&hook.auth, &headers, &body) {
        return refuse(&hook, refusal);
    }
    if *hook.auth == sluice_config::WebhookAuth::AwsIam {
        let request = UrlRequest {
            method: &method,
            uri: &uri,
            headers: &headers,
            body: &body,
        };
        let checked = match &hook.iam {
            Some(iam) => iam.authorize(&hook.function, request).await,
            None => Err((
                StatusCode::FORBIDDEN,
                axum::Json(json!({"message": "this webhook's aws_iam auth has no principals to check against"})),
            )
                .into_response()),
        };
        if let Err(response) = checked {
            metrics::counter!(
                HTTP_AUTH_FAILURES,
                &[
                    ("source", hook.name.clone()),
                    ("reason", "aws_iam".to_owned())
                ]
            )
            .increment(1);
            return response;
        }
    }
    let request_id = uuid::Uuid::new_v4().to_string();
    let event = event(&hook, &method, &uri, &headers, peer, &body, &request_id);
    let payload = Bytes::from(serde_json::to_vec(&event).unwrap_or_default());
    metrics::counter!(WEBHOOK_REQUESTS, &labels).increment(1);
    let outcome = if hook.asynchronous {
        hook.dispatch
            .invoke_async(&hook.function, payload)
            .await
            .map(|id| (StatusCode::ACCEPTED, axum::Json(json!({"requestId": id}))).into_response())
    } else {
        // Its own task: a caller that goes away does not cut the invocation short.
        let (dispatch, function) = (hook.dispatch.clone(), hook.function.clone());
        let task = tokio::spawn(async move { dispatch.invoke(&function, payload).await });
        match task.await {
            Ok(result) => result.map(|result| response(&result)),
            Err(e) => {
                tracing::error!(source = %hook.name, error = %e, "a webhook invocation task failed");
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(json!({"message": "the invocation failed inside Sluice"})),
                )
                    .into_response();
            }
        }
    };
    outcome.unwrap_or_else(|e| {
        let status = match &e {
            DispatchError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            DispatchError::NotFound(_) => StatusCode::NOT_FOUND,
            DispatchError::Function { .. } => StatusCode::BAD_GATEWAY,
        };
        tracing::warn!(source = %hook.name, function = %hook.function, error = %e, "webhook invocation failed");
        (status, axum::Json(json!({"message": e.to_string()}))).into_response()
    })
}

/// Why a request body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("cannot read the request body: {0}")]
    Unreadable(#[source] axum::Error),
}

/// How much of a refused body is read and thrown away before the answer. A server that closes
/// a socket with unread data resets the connection, and a client still sending its body then
/// sees a broken connection instead of the 413; reading a bounded rest lets an ordinary client
/// read its answer. Past the bound (or the time), the connection is simply closed.
const DRAIN_BOUND: u64 = 16 * 1024 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads a request body of at most `limit` bytes. A larger one, by its Content-Length or once
/// more than `limit` bytes have come, is refused without keeping the rest (a bounded part of it
/// is read and dropped, see [`DRAIN_BOUND`]). Shared by the webhooks and Sluice's own API.
pub async fn read_limited(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt as _;
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared.filter(|n| *n > limit as u64) {
        if declared - limit as u64 <= DRAIN_BOUND {
            drain(&mut body).await;
        }
        return Err(BodyError::TooLarge { limit });
    }
    let mut read = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(BodyError::Unreadable)?.into_data() else {
            continue;
        };
        if read.len() + data.len() > limit {
            drain(&mut body).await;
            return Err(BodyError::TooLarge { limit });
        }
        read.extend_from_slice(&data);
    }
    Ok(read.freeze())
}

/// Reads and drops what is left of `body`, at most [`DRAIN_BOUND`] bytes for [`DRAIN_TIME`].
async fn drain(body: &mut Body) {
    use http_body_util::BodyExt as _;
    let mut dropped = 0u64;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while dropped <= DRAIN_BOUND {
            match body.frame().await {
                Some(Ok(frame)) => {
                    dropped += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                _ => return,
            }
        }
    })
    .await;
}

/// The answer to a request refused for its credentials: 401 without any, 403 with wrong ones.
fn refuse(hook: &Hook, refusal: crate::http_auth::Refusal) -> Response {
    use crate::http_auth::Refusal;
    metrics::counter!(
        HTTP_AUTH_FAILURES,
        &[
            ("source", hook.name.clone()),
            ("reason", refusal.reason().to_string())
        ]
    )
    .increment(1);
    let (status, message) = match (refusal, hook.auth.as_ref()) {
        (Refusal::Missing, sluice_config::WebhookAuth::HmacSha256 { header, .. }) => (
            StatusCode::UNAUTHORIZED,
            format!("This webhook needs an HMAC-SHA256 signature of the body in `{header}`"),
        ),
        (Refusal::Missing, _) => (
            StatusCode::UNAUTHORIZED,
            "This webhook needs `Authorization: Bearer <token>`".to_owned(),
        ),
        (Refusal::Invalid, sluice_config::WebhookAuth::HmacSha256 { header, .. }) => (
            StatusCode::FORBIDDEN,
            format!("The signature in `{header}` does not match the body"),
        ),
        (Refusal::Invalid, _) => (
            StatusCode::FORBIDDEN,
            "The bearer token is not valid for this webhook".to_owned(),
        ),
    };
    let mut response = (status, axum::Json(json!({"message": message}))).into_response();
    if status == StatusCode::UNAUTHORIZED
        && matches!(
            hook.auth.as_ref(),
            sluice_config::WebhookAuth::Bearer { .. }
        )
    {
        response
            .headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    }
    response
}

/// Reads a webhook body of at most the hook's `max_body`.
async fn read_body(
    hook: &Hook,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, (StatusCode, &'static str, String)> {
    read_limited(headers, body, hook.max_body)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("Request body must be at most {limit} bytes"),
            ),
            BodyError::Unreadable(_) => (StatusCode::BAD_REQUEST, "unreadable_body", e.to_string()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lambda_events::event::lambda_function_urls::LambdaFunctionUrlRequest;

    fn hook() -> Hook {
        struct Nothing;
        impl Dispatch for Nothing {
            fn invoke<'a>(&'a self, _: &'a str, _: Bytes) -> crate::DispatchFuture<'a> {
                Box::pin(async { Ok(Bytes::new()) })
            }
            fn invoke_async<'a>(
                &'a self,
                _: &'a str,
                _: Bytes,
            ) -> crate::DispatchFuture<'a, String> {
                Box::pin(async { Ok(String::new()) })
            }
        }
        Hook {
            name: "orders".into(),
            function: "f".into(),
            asynchronous: false,
            max_body: 6 * 1024 * 1024,
            dispatch: Arc::new(Nothing),
            account: "000000000000".into(),
            auth: Arc::new(sluice_config::WebhookAuth::None),
            iam: None,
        }
    }

    #[test]
    fn event_is_a_function_url_request() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("cookie", HeaderValue::from_static("a=1; b=2"));
        let uri: Uri = "/hooks/orders?x=1&x=2&y=".parse().expect("uri");
        let value = event(
            &hook(),
            &Method::POST,
            &uri,
            &headers,
            "127.0.0.1:5000".parse().expect("peer"),
            br#"{"id":7}"#,
            "rid",
        );
        let parsed: LambdaFunctionUrlRequest =
            serde_json::from_value(value.clone()).expect("Function URL shape");
        assert_eq!(parsed.raw_path.as_deref(), Some("/hooks/orders"));
        assert_eq!(parsed.body.as_deref(), Some(r#"{"id":7}"#));
        assert_eq!(parsed.request_context.http.method.as_deref(), Some("POST"));
        assert_eq!(value["cookies"], json!(["a=1", "b=2"]));
        assert_eq!(value["queryStringParameters"], json!({"x": "1,2", "y": ""}));
        assert_eq!(value["requestContext"]["http"]["sourceIp"], "127.0.0.1");
    }

    #[test]
    fn binary_bodies_are_base64() {
        let uri: Uri = "/h".parse().expect("uri");
        let value = event(
            &hook(),
            &Method::PUT,
            &uri,
            &HeaderMap::new(),
            "127.0.0.1:1".parse().expect("peer"),
            &[0xff, 0xfe],
            "rid",
        );
        assert_eq!(value["isBase64Encoded"], true);
        assert_eq!(value["body"], B64.encode([0xff, 0xfe]));
    }

    #[test]
    fn a_result_with_status_code_is_a_full_response() {
        let r = response(br#"{"statusCode":201,"headers":{"x-a":"b"},"body":"made"}"#);
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.headers()["x-a"], "b");
        let plain = response(br#"{"ok":true}"#);
        assert_eq!(plain.status(), StatusCode::OK);
        assert_eq!(plain.headers()["content-type"], "application/json");
    }
}
