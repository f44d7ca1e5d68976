//! Audit events in CloudTrail's shape (`eventVersion` 1.08), built from what the audit layer
//! saw of a call, with secrets taken out of the request before anything is written.

use axum::http::StatusCode;
use serde_json::{Map, Value, json};

use super::Seen;
use crate::invocation::{ACCOUNT_ID, REGION};
use crate::operation::{Caller, Operation};

const EVENT_VERSION: &str = "1.08";
const EVENT_SOURCE: &str = "lambda.amazonaws.com";
/// What replaces a secret value.
const REDACTED: &str = "***";
/// A key holding any of these (case-insensitive) holds a secret.
const SECRET_WORDS: &[&str] = &["secret", "password", "token", "key", "credential"];
/// The fields of an answer that identify what was changed; the rest (a function's whole
/// configuration, a policy document) stays out of the trail.
const IDENTIFYING_FIELDS: &[&str] = &[
    "FunctionName",
    "FunctionArn",
    "Version",
    "Name",
    "AliasArn",
    "FunctionVersion",
    "RevisionId",
    "CodeSha256",
    "ReservedConcurrentExecutions",
];

/// One call of the API, as the audit layer saw it.
pub(super) struct ApiCall<'a> {
    pub seen: &'a Seen,
    /// `None` for a path under Lambda's API that names no operation Sluice knows.
    pub operation: Option<&'a Operation>,
    pub caller: &'a Caller,
    pub status: StatusCode,
    pub error_code: Option<String>,
    pub response_body: &'a [u8],
    pub request_id: String,
}

/// The event of one API call.
pub(super) fn api_call(call: ApiCall<'_>) -> Value {
    let seen = call.seen;
    let name = call.operation.map_or("UnsupportedOperation", |o| o.name);
    let answer: Option<Map<String, Value>> = serde_json::from_slice::<Value>(call.response_body)
        .ok()
        .and_then(|v| match v {
            Value::Object(map) => Some(map),
            _ => None,
        });
    let mut response = Map::new();
    response.insert("status".into(), call.status.as_u16().into());
    let failed = call.status.is_client_error() || call.status.is_server_error();
    if !failed && let Some(answer) = &answer {
        for field in IDENTIFYING_FIELDS {
            if let Some(v) = answer
                .get(*field)
                .filter(|v| !v.is_object() && !v.is_array())
            {
                response.insert((*field).into(), v.clone());
            }
        }
    }
    let mut event = json!({
        "eventVersion": EVENT_VERSION,
        "eventTime": seen.time.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        "eventSource": EVENT_SOURCE,
        "eventName": name,
        "awsRegion": REGION,
        "userIdentity": user_identity(call.caller),
        "sourceIPAddress": seen.source_ip,
        "userAgent": seen.user_agent,
        "requestParameters": request_parameters(seen, call.operation),
        "responseElements": Value::Object(response),
        "requestID": call.request_id,
        "eventID": uuid::Uuid::new_v4().to_string(),
        "readOnly": seen.method == axum::http::Method::GET,
        "eventType": "AwsApiCall",
        "managementEvent": name != "Invoke",
        "recipientAccountId": ACCOUNT_ID,
    });
    if failed {
        let message = answer
            .as_ref()
            .and_then(|a| a.get("Message").or_else(|| a.get("message")))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| call.status.canonical_reason().unwrap_or("error").to_owned());
        let code = call.error_code.unwrap_or_else(|| {
            call.status
                .canonical_reason()
                .unwrap_or("Error")
                .replace(' ', "")
        });
        event["errorCode"] = code.into();
        event["errorMessage"] = message.into();
    }
    event
}

/// The event of a configuration loaded at start: the file and the SHA-256 of its bytes, so
/// that a change to the file between two starts shows in the trail.
pub(super) fn configuration_loaded(path: &str, sha256: Option<&str>) -> Value {
    json!({
        "eventVersion": EVENT_VERSION,
        "eventTime": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        "eventSource": EVENT_SOURCE,
        "eventName": "LoadConfiguration",
        "awsRegion": REGION,
        "userIdentity": { "type": "AWSService", "invokedBy": "sluice" },
        "sourceIPAddress": null,
        "userAgent": "sluice",
        "requestParameters": { "path": path, "sha256": sha256 },
        "responseElements": null,
        "requestID": uuid::Uuid::new_v4().to_string(),
        "eventID": uuid::Uuid::new_v4().to_string(),
        "readOnly": false,
        "eventType": "AwsServiceEvent",
        "managementEvent": true,
        "recipientAccountId": ACCOUNT_ID,
    })
}

fn user_identity(caller: &Caller) -> Value {
    match &caller.principal {
        Some(principal) => json!({
            "type": "IAMUser",
            "principalId": principal,
            "userName": principal,
            "arn": format!("arn:aws:iam::{ACCOUNT_ID}:user/{principal}"),
            "accountId": ACCOUNT_ID,
            "accessKeyId": caller.access_key_id,
        }),
        None => json!({
            "type": "Anonymous",
            "accessKeyId": caller.access_key_id,
        }),
    }
}

/// The path's function, the query's parameters and the body's fields, secrets redacted.
fn request_parameters(seen: &Seen, operation: Option<&Operation>) -> Value {
    let mut params = Map::new();
    match operation.and_then(|o| o.function.as_deref()) {
        Some(function) => {
            let function = percent_encoding::percent_decode_str(function).decode_utf8_lossy();
            params.insert("functionName".into(), function.into_owned().into());
        }
        None if operation.is_none() => {
            params.insert("method".into(), seen.method.as_str().into());
            params.insert("path".into(), seen.path.clone().into());
        }
        None => {}
    }
    let segments: Vec<&str> = seen.path.split('/').collect();
    if let [_, _, "functions", _, "aliases", alias] = segments.as_slice() {
        params.insert("name".into(), (*alias).into());
    }
    for pair in seen.query.as_deref().unwrap_or_default().split('&') {
        if let Some((k, v)) = pair.split_once('=') {
            let k = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
            let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
            let mut key = k.into_owned();
            // `Qualifier`, as the query spells it, is `qualifier` in CloudTrail's events.
            if let Some(first) = key.get(..1) {
                key = format!("{}{}", first.to_lowercase(), &key[1..]);
            }
            params.insert(key, v.into_owned().into());
        }
    }
    if let Some(body) = &seen.body
        && let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body)
    {
        for (k, v) in fields {
            params.insert(k, v);
        }
    }
    let mut params = Value::Object(params);
    redact(&mut params);
    params
}

/// Replaces secrets in a request with `***`: every value under a key that names a secret
/// (`SecretAccessKey`, `password`, `AuthToken`), and every environment variable's value,
/// whose names say nothing about what they hold.
pub(super) fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let lower = k.to_ascii_lowercase();
                if SECRET_WORDS.iter().any(|w| lower.contains(w)) {
                    *v = REDACTED.into();
                } else if k == "Environment" {
                    if let Some(Value::Object(vars)) = v.get_mut("Variables") {
                        for var in vars.values_mut() {
                            *var = REDACTED.into();
                        }
                    }
                    redact(v);
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_environment_values_are_redacted_at_any_depth() {
        let mut v = json!({
            "Description": "d",
            "Environment": {"Variables": {"DB_HOST": "db.internal", "MODE": "x"}},
            "Nested": [{"ApiToken": "t0k", "SecretAccessKey": "s3cr3t", "db_password": "pw"}],
            "Credentials": {"a": "b"},
            "Qualifier": "live",
        });
        redact(&mut v);
        assert_eq!(
            v,
            json!({
                "Description": "d",
                "Environment": {"Variables": {"DB_HOST": "***", "MODE": "***"}},
                "Nested": [{"ApiToken": "***", "SecretAccessKey": "***", "db_password": "***"}],
                "Credentials": "***",
                "Qualifier": "live",
            })
        );
    }

    fn seen(method: axum::http::Method, path: &str, body: &str) -> Seen {
        Seen {
            time: chrono::Utc::now(),
            method,
            path: path.into(),
            query: Some("Qualifier=live".into()),
            user_agent: Some("Boto3/1".into()),
            source_ip: Some("127.0.0.1".into()),
            body: Some(bytes::Bytes::from(body.to_owned())),
        }
    }

    #[test]
    fn a_refused_call_carries_its_error_and_no_answer_fields() {
        let seen = seen(
            axum::http::Method::PUT,
            "/2017-10-31/functions/f/concurrency",
            r#"{"ReservedConcurrentExecutions": -1}"#,
        );
        let op = crate::operation::classify(&seen.method, &seen.path, None).expect("op");
        let event = api_call(ApiCall {
            seen: &seen,
            operation: Some(&op),
            caller: &Caller::default(),
            status: StatusCode::BAD_REQUEST,
            error_code: Some("InvalidParameterValueException".into()),
            response_body: br#"{"Type":"User","Message":"bad value","FunctionName":"f"}"#,
            request_id: "r-1".into(),
        });
        assert_eq!(event["eventName"], "PutFunctionConcurrency");
        assert_eq!(event["errorCode"], "InvalidParameterValueException");
        assert_eq!(event["errorMessage"], "bad value");
        assert_eq!(event["responseElements"], json!({"status": 400}));
        assert_eq!(event["requestParameters"]["functionName"], "f");
        assert_eq!(event["requestParameters"]["qualifier"], "live");
        assert_eq!(
            event["requestParameters"]["ReservedConcurrentExecutions"],
            -1
        );
        assert_eq!(event["userIdentity"]["type"], "Anonymous");
        assert_eq!(event["requestID"], "r-1");
    }

    #[test]
    fn an_authenticated_caller_is_an_iam_user_and_answers_are_summarised() {
        let seen = seen(
            axum::http::Method::POST,
            "/2015-03-31/functions/f/versions",
            "{}",
        );
        let op = crate::operation::classify(&seen.method, &seen.path, None).expect("op");
        let caller = Caller {
            principal: Some("deployer".into()),
            access_key_id: Some("AKIDEXAMPLE".into()),
        };
        let event = api_call(ApiCall {
            seen: &seen,
            operation: Some(&op),
            caller: &caller,
            status: StatusCode::CREATED,
            error_code: None,
            response_body:
                br#"{"FunctionName":"f","Version":"3","Environment":{"Variables":{"A":"b"}}}"#,
            request_id: "r-2".into(),
        });
        assert_eq!(
            event["responseElements"],
            json!({"status": 201, "FunctionName": "f", "Version": "3"})
        );
        assert_eq!(event["userIdentity"]["type"], "IAMUser");
        assert_eq!(event["userIdentity"]["userName"], "deployer");
        assert_eq!(
            event["userIdentity"]["arn"],
            "arn:aws:iam::000000000000:user/deployer"
        );
        assert_eq!(event["userIdentity"]["accessKeyId"], "AKIDEXAMPLE");
        assert!(event.get("errorCode").is_none());
    }
}
