//! Functions that were not written for Sluice run unchanged: Python on AWS's own runtime
//! interface client (awslambdaric) and a bash + curl custom runtime.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{Function, Sluice, assert_function_arn, assert_request_id, str_field};
use serde_json::{Value, json};
use sluice_integration_tests::unique_name;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_handler_gets_request_id_remaining_time_and_arn() {
    let name = unique_name("py-context");
    let sluice = Sluice::with(Function::python(&name, "python").set("timeout", "5s")).await;
    let event = json!({"hello": "python", "n": [1, 2, 3]});

    let first = sluice.invoke(&name, &event).await.ok_json();
    assert_eq!(first["event"], event);
    assert_request_id(str_field(&first, "request_id"));
    assert_function_arn(str_field(&first, "invoked_function_arn"), &name);
    let remaining = first["remaining_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("{first}"));
    assert!(
        remaining > 0 && remaining <= 5000,
        "remaining time {remaining} ms with a 5 s timeout"
    );
    assert_eq!(first["client_context"], Value::Null);

    let second = sluice.invoke(&name, &event).await.ok_json();
    assert_ne!(first["request_id"], second["request_id"]);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_handler_gets_the_client_context() {
    let name = unique_name("py-clientctx");
    let sluice = Sluice::with(Function::python(&name, "python")).await;
    let context = json!({"custom": {"tenant": "acme", "plan": "gold"}, "env": {"locale": "en"}});
    let encoded = BASE64.encode(context.to_string());
    let result = sluice
        .invoke_with(&name, &json!({}), &[("X-Amz-Client-Context", &encoded)])
        .await
        .ok_json();
    assert_eq!(
        result["client_context"],
        json!({"tenant": "acme", "plan": "gold"})
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_exception_is_unhandled_with_its_type_and_message() {
    let name = unique_name("py-raise");
    let sluice = Sluice::with(Function::python(&name, "python")).await;
    let response = sluice.invoke(&name, &json!({"raise": "bad input"})).await;
    let error = response.unhandled_error();
    assert_eq!(str_field(&error, "errorType"), "ValueError");
    assert_eq!(str_field(&error, "errorMessage"), "bad input");
    assert!(
        error["stackTrace"].is_array(),
        "awslambdaric sends a stack trace: {error}"
    );

    // The environment survives a handled exception.
    sluice.invoke(&name, &json!({"ok": true})).await.ok_json();
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_import_error_fails_promptly_with_a_runtime_error() {
    let name = unique_name("py-import");
    let sluice =
        Sluice::with(Function::python(&name, "python-import-error").set("timeout", "20s")).await;
    for attempt in 1..=2 {
        let response = sluice.invoke(&name, &json!({})).await;
        let error = response.unhandled_error();
        let error_type = str_field(&error, "errorType");
        assert!(
            error_type.starts_with("Runtime."),
            "attempt {attempt}: errorType {error_type}"
        );
        assert!(
            str_field(&error, "errorMessage").contains("does_not_exist_module"),
            "attempt {attempt}: the message names the missing module: {error}"
        );
        assert!(
            response.elapsed < Duration::from_secs(10),
            "attempt {attempt}: an init failure is reported when it happens, not at the timeout: {:?}",
            response.elapsed
        );
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_bootstrap_custom_runtime_answers() {
    let name = unique_name("shell");
    let sluice = Sluice::with(Function::shell(&name)).await;
    for n in 0..2 {
        let event = json!({"n": n, "text": "a b  c"});
        let result = sluice.invoke(&name, &event).await.ok_json();
        assert_eq!(result, json!({"shell": true, "event": event}));
    }
    sluice.shutdown().await;
}
