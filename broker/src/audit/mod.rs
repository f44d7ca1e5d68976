//! The audit trail: a record of every change made through the API, in CloudTrail's event
//! shape, so that "who published version 7, from where, and when" has an answer.
//!
//! Every call of Lambda's API is recorded, allowed or refused, except allowed invocations
//! (those are counted by metrics, and recording each would cost a write per event); a refused
//! invocation is recorded. Sluice's own configuration load at start is recorded too
//! (`LoadConfiguration`, with the file's SHA-256).
//!
//! The layer ([`audit`]) sits around the auth layer and reads the [`Caller`] and [`Operation`]
//! it leaves in the response's extensions, so it sees refused calls the same as allowed ones.
//! Recording never blocks or fails a call: events go through a bounded channel to one writer
//! task ([`writer`]), which appends them to the JSON Lines file (`audit.path`) and to the state
//! store's `audit_events` table. When the channel is full or a write fails, the event is
//! counted in `sluice_audit_dropped_total` and the episode is logged once.

mod event;
mod file;
mod writer;

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

pub use writer::{AuditTrail, purge_expired};

use crate::operation::{Caller, Operation};

/// The header Lambda answers every call with; the event's `requestID` is its value.
const REQUEST_ID: &str = "x-amzn-requestid";

/// The part of the request the event needs, taken before the handler consumes it.
struct Seen {
    time: chrono::DateTime<chrono::Utc>,
    method: axum::http::Method,
    path: String,
    query: Option<String>,
    user_agent: Option<String>,
    source_ip: Option<String>,
    body: Option<bytes::Bytes>,
}

/// The audit layer: records the call once its response is ready. Only paths of Lambda's API
/// are looked at; webhooks, `/metrics` and `/healthz` pass untouched.
pub(crate) async fn audit(
    State(trail): State<AuditTrail>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    if !crate::api::is_lambda_api_path(&path) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let name = crate::operation::classify(&parts.method, &path, parts.uri.query()).map(|o| o.name);
    let invoke = name == Some("Invoke");
    let mut seen = Seen {
        time: chrono::Utc::now(),
        method: parts.method.clone(),
        path,
        query: parts.uri.query().map(str::to_owned),
        user_agent: parts
            .headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        source_ip: parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| peer.ip().to_string()),
        body: None,
    };
    // An invocation's payload is never part of its event, so it is not read here; other
    // bodies are a few short fields, read against the management limit the handlers apply.
    let response = if invoke {
        next.run(Request::from_parts(parts, body)).await
    } else {
        match crate::api::read_body(
            &parts.headers,
            body,
            crate::api::MAX_MANAGE_BODY,
            name.unwrap_or("management"),
        )
        .await
        {
            Ok(bytes) => {
                seen.body = Some(bytes.clone());
                next.run(Request::from_parts(parts, Body::from(bytes)))
                    .await
            }
            Err(refused) => refused,
        }
    };
    let response = with_request_id(response);
    let operation = response.extensions().get::<Operation>().cloned();
    let caller = response
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_default();
    let status = response.status();
    let refused = status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
    if invoke && !refused {
        return response;
    }
    let (parts, body) = response.into_parts();
    // The handlers' answers are whole buffers already (JSON documents), so this copies no more
    // than what is about to be sent.
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read an API answer for the audit trail");
            bytes::Bytes::new()
        }
    };
    let request_id = parts
        .headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let error_code = parts
        .headers
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .map(|code| code.split(':').next().unwrap_or(code).to_owned());
    trail.record(event::api_call(event::ApiCall {
        seen: &seen,
        operation: operation.as_ref(),
        caller: &caller,
        status,
        error_code,
        response_body: &bytes,
        request_id,
    }));
    Response::from_parts(parts, Body::from(bytes))
}

/// Every answer of Lambda's API carries `x-amzn-RequestId`; the handlers that do not set one
/// (management calls, refusals) get a fresh one here.
fn with_request_id(mut response: Response) -> Response {
    if !response.headers().contains_key(REQUEST_ID)
        && let Ok(v) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
    {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

/// A stand-in for the auth layer in these tests: an anonymous caller and the operation the
/// path names, put where the audit layer reads them (the response's extensions).
#[cfg(test)]
pub(crate) async fn anonymous_caller(mut request: Request, next: Next) -> Response {
    let operation = crate::operation::classify(
        request.method(),
        request.uri().path(),
        request.uri().query(),
    );
    let caller = Caller::default();
    request.extensions_mut().insert(caller.clone());
    if let Some(op) = &operation {
        request.extensions_mut().insert(op.clone());
    }
    let mut response = next.run(request).await;
    response.extensions_mut().insert(caller);
    if let Some(op) = operation {
        response.extensions_mut().insert(op);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::response::IntoResponse;
    use axum::routing::{post, put};
    use tower::ServiceExt;

    /// The audit and caller layers around handlers that answer as given: an allowed and a
    /// refused invocation, and a management call that sets no request id of its own.
    fn app(trail: AuditTrail) -> Router {
        Router::new()
            .route(
                "/2015-03-31/functions/{f}/invocations",
                post(
                    |axum::extract::Path(f): axum::extract::Path<String>| async move {
                        if f == "locked" {
                            let mut r = (StatusCode::FORBIDDEN, r#"{"Message":"not allowed"}"#)
                                .into_response();
                            r.headers_mut().insert(
                                "x-amzn-errortype",
                                HeaderValue::from_static("AccessDeniedException"),
                            );
                            r
                        } else {
                            (StatusCode::OK, "{}").into_response()
                        }
                    },
                ),
            )
            .route(
                "/2017-10-31/functions/{f}/concurrency",
                put(|body: bytes::Bytes| async move { (StatusCode::OK, body).into_response() }),
            )
            .layer(axum::middleware::from_fn(anonymous_caller))
            .layer(axum::middleware::from_fn_with_state(trail, audit))
    }

    async fn call(app: &Router, method: &str, path: &str, body: &str) -> Response {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("user-agent", "test/1")
            .body(Body::from(body.to_owned()))
            .expect("request");
        app.clone().oneshot(request).await.expect("infallible")
    }

    #[tokio::test]
    async fn allowed_invocations_are_not_recorded_but_refused_ones_and_changes_are() {
        let (trail, mut rx) = AuditTrail::channel(16);
        let app = app(trail);
        call(&app, "POST", "/2015-03-31/functions/open/invocations", "{}").await;
        assert!(
            rx.try_recv().is_err(),
            "an allowed invocation is a metric, not an event"
        );

        let refused = call(
            &app,
            "POST",
            "/2015-03-31/functions/locked/invocations",
            "{}",
        )
        .await;
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        let event = rx.try_recv().expect("the refused invocation");
        assert_eq!(event["eventName"], "Invoke");
        assert_eq!(event["errorCode"], "AccessDeniedException");
        assert_eq!(event["errorMessage"], "not allowed");
        assert_eq!(
            event["requestParameters"],
            serde_json::json!({"functionName": "locked"})
        );

        let body = r#"{"ReservedConcurrentExecutions":5}"#;
        let changed = call(&app, "PUT", "/2017-10-31/functions/f/concurrency", body).await;
        let request_id = changed.headers()[REQUEST_ID]
            .to_str()
            .expect("id")
            .to_owned();
        let answer = axum::body::to_bytes(changed.into_body(), 1024)
            .await
            .expect("body");
        assert_eq!(
            &answer[..],
            body.as_bytes(),
            "the handler got the body and the caller the answer"
        );
        let event = rx.try_recv().expect("the change");
        assert_eq!(event["eventName"], "PutFunctionConcurrency");
        assert_eq!(event["requestID"], request_id.as_str());
        assert_eq!(event["userAgent"], "test/1");
        assert_eq!(
            event["requestParameters"]["ReservedConcurrentExecutions"],
            5
        );
        assert_eq!(
            event["responseElements"],
            serde_json::json!({"status": 200, "ReservedConcurrentExecutions": 5})
        );
    }
}
