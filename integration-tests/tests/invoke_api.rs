//! The Lambda Invoke API against a `lambda_runtime` function in the `process` runtime: what
//! an AWS SDK sees, and what the function sees of its environment.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{
    Function, Sluice, assert_function_arn, assert_request_id, env_var, pid, quoted, str_field,
};
use serde_json::{Value, json};
use sluice_integration_tests::{TEST_ERROR_TYPE, unique_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_invoke_returns_the_result_and_executed_version() {
    let name = unique_name("echo");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let event = json!({"action": "echo", "n": 1, "nested": {"list": [1, "two", null]}});

    let implicit = sluice.invoke(&name, &event).await;
    let echo = implicit.ok_json();
    assert_eq!(echo["event"], event);
    assert_eq!(
        implicit.header("x-amz-executed-version").as_deref(),
        Some("$LATEST")
    );

    let explicit = sluice
        .invoke_with(
            &name,
            &event,
            &[("X-Amz-Invocation-Type", "RequestResponse")],
        )
        .await;
    assert_eq!(explicit.ok_json()["event"], event);
    assert_eq!(
        explicit.header("x-amz-executed-version").as_deref(),
        Some("$LATEST")
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_answers_204_with_no_body() {
    let name = unique_name("dryrun");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let response = sluice
        .invoke_with(
            &name,
            &json!({"action": "echo"}),
            &[("X-Amz-Invocation-Type", "DryRun")],
        )
        .await;
    assert_eq!(response.status, 204, "body: {}", response.text());
    assert!(response.body.is_empty(), "body: {}", response.text());
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_function_is_404_resource_not_found() {
    let name = unique_name("present");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let missing = unique_name("missing");
    let response = sluice.invoke(&missing, &json!({})).await;
    assert_eq!(response.status, 404, "body: {}", response.text());
    assert_eq!(
        response.header("x-amzn-errortype").as_deref(),
        Some("ResourceNotFoundException")
    );
    let body = response.json();
    assert!(
        body.get("Type").and_then(Value::as_str).is_some(),
        "no Type in {body}"
    );
    let message = str_field(&body, "Message");
    assert!(
        message.contains(&missing),
        "the message names the function: {message}"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_error_is_200_with_unhandled_and_the_error_body() {
    let name = unique_name("fail");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let response = sluice
        .invoke(
            &name,
            &json!({"action": "fail", "message": "the widget is broken"}),
        )
        .await;
    let error = response.unhandled_error();
    assert_eq!(str_field(&error, "errorType"), TEST_ERROR_TYPE);
    assert_eq!(str_field(&error, "errorMessage"), "the widget is broken");
    assert_eq!(
        response.header("x-amz-executed-version").as_deref(),
        Some("$LATEST")
    );

    // A handled error leaves the environment usable.
    sluice
        .invoke(&name, &json!({"action": "echo"}))
        .await
        .ok_json();
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_log_has_start_output_end_and_report_lines() {
    let name = unique_name("tail");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let out_marker = unique_name("stdout-line");
    let err_marker = unique_name("stderr-line");
    let response = sluice
        .invoke_with(
            &name,
            &json!({"action": "print", "text": out_marker, "stderr": err_marker}),
            &[("X-Amz-Log-Type", "Tail")],
        )
        .await;
    assert_eq!(response.ok_json(), json!("printed"));
    let log = response.log_result();
    assert!(
        log.len() <= 4096,
        "the tail is at most 4 KB, got {} bytes",
        log.len()
    );

    let start = log
        .find("START RequestId: ")
        .unwrap_or_else(|| panic!("no START line:\n{log}"));
    let request_id: String = log[start + "START RequestId: ".len()..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    assert_request_id(&request_id);
    if let Some(header_id) = response.header("x-amzn-requestid") {
        assert_eq!(header_id, request_id, "x-amzn-RequestId and the log agree");
    }
    let end = log
        .find(&format!("END RequestId: {request_id}"))
        .unwrap_or_else(|| panic!("no END line for {request_id}:\n{log}"));
    let report = log
        .find(&format!("REPORT RequestId: {request_id}"))
        .unwrap_or_else(|| panic!("no REPORT line for {request_id}:\n{log}"));
    for marker in [&out_marker, &err_marker] {
        let at = log
            .find(marker.as_str())
            .unwrap_or_else(|| panic!("no `{marker}` in:\n{log}"));
        assert!(
            start < at && at < end,
            "`{marker}` is between START and END:\n{log}"
        );
    }
    assert!(end < report, "REPORT comes after END:\n{log}");
    let report_line = log[report..].lines().next().unwrap_or_default();
    for field in ["Duration:", "Max Memory Used:"] {
        assert!(
            report_line.contains(field),
            "REPORT has `{field}`: {report_line}"
        );
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_log_keeps_only_the_last_4kb() {
    let name = unique_name("tail-big");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let head = unique_name("first-bytes");
    let text = format!("{head}{}", "y".repeat(16 * 1024));
    let response = sluice
        .invoke_with(
            &name,
            &json!({"action": "print", "text": text, "stderr": "short"}),
            &[("X-Amz-Log-Type", "Tail")],
        )
        .await;
    response.ok_json();
    let log = response.log_result();
    assert!(
        log.len() <= 4096,
        "the tail is at most 4 KB, got {} bytes",
        log.len()
    );
    assert!(
        !log.contains(&head),
        "the start of a long log is cut, not the end:\n{log}"
    );
    assert!(
        log.contains("REPORT RequestId: "),
        "the end of the log is kept:\n{log}"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_context_header_reaches_the_function() {
    let name = unique_name("clientctx");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let context = json!({
        "client": {"installation_id": "install-1", "app_title": "Sluice Test", "app_version_name": "1.0",
                   "app_version_code": "100", "app_package_name": "dev.sluice.test"},
        "custom": {"tenant": "acme"},
        "env": {"platform": "linux"}
    });
    let encoded = BASE64.encode(context.to_string());
    let with_context = sluice
        .invoke_with(
            &name,
            &json!({"action": "echo"}),
            &[("X-Amz-Client-Context", &encoded)],
        )
        .await
        .ok_json();
    let received = &with_context["client_context"];
    assert_eq!(
        received["custom"]["tenant"], "acme",
        "client context: {received}"
    );
    assert_eq!(
        received["client"]["appTitle"], "Sluice Test",
        "client context: {received}"
    );

    let without = sluice
        .invoke(&name, &json!({"action": "echo"}))
        .await
        .ok_json();
    assert_eq!(
        without["client_context"],
        Value::Null,
        "no header, no client context"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_environment_and_next_invoke_works() {
    let name = unique_name("timeout");
    let sluice = Sluice::with(Function::rust(&name).set("timeout", "1s")).await;
    let before = pid(&sluice
        .invoke(&name, &json!({"action": "echo"}))
        .await
        .ok_json());

    let response = sluice
        .invoke(&name, &json!({"action": "sleep", "ms": 10_000}))
        .await;
    let error = response.unhandled_error();
    assert_eq!(
        str_field(&error, "errorMessage"),
        "Task timed out after 1.00 seconds"
    );
    assert!(
        response.elapsed < Duration::from_secs(5),
        "the caller gets the timeout about when it happens, not when the function ends: {:?}",
        response.elapsed
    );

    let after = pid(&sluice
        .invoke(&name, &json!({"action": "echo"}))
        .await
        .ok_json());
    assert_ne!(before, after, "a timed-out environment is not reused");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_is_a_runtime_error_and_next_invoke_works() {
    let name = unique_name("crash");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let before = pid(&sluice
        .invoke(&name, &json!({"action": "echo"}))
        .await
        .ok_json());

    let response = sluice
        .invoke(&name, &json!({"action": "crash", "code": 7}))
        .await;
    let error = response.unhandled_error();
    let error_type = str_field(&error, "errorType");
    assert!(
        error_type.starts_with("Runtime."),
        "errorType: {error_type}"
    );
    assert!(
        response.elapsed < Duration::from_secs(2),
        "a crash is reported when it happens, not at the timeout: {:?}",
        response.elapsed
    );

    let after = pid(&sluice
        .invoke(&name, &json!({"action": "echo"}))
        .await
        .ok_json());
    assert_ne!(
        before, after,
        "a new environment replaces the one that exited"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_stops_a_runaway_allocation_and_next_invoke_works() {
    let name = unique_name("memory");
    let sluice = Sluice::with(
        Function::rust(&name)
            .set("memory_mb", "128")
            .set("timeout", "10s"),
    )
    .await;
    let first = sluice
        .invoke(&name, &json!({"action": "echo"}))
        .await
        .ok_json();
    assert_eq!(
        env_var(&first, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE").as_deref(),
        Some("128")
    );

    // Well under the limit: the cap must not get in the way of an ordinary function.
    let modest = sluice
        .invoke(&name, &json!({"action": "alloc", "mb": 32}))
        .await
        .ok_json();
    assert_eq!(modest, json!("allocated"));

    let response = sluice
        .invoke(&name, &json!({"action": "alloc", "mb": 400}))
        .await;
    response.unhandled_error();
    assert!(
        response.elapsed < Duration::from_secs(9),
        "running out of memory fails the invocation, it does not hang it: {:?}",
        response.elapsed
    );

    let after = sluice
        .invoke(&name, &json!({"action": "echo"}))
        .await
        .ok_json();
    assert_ne!(
        pid(&first),
        pid(&after),
        "the environment that ran out of memory is replaced"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_a_fresh_uuid_per_invocation() {
    let name = unique_name("reqid");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let mut ids = HashSet::new();
    for _ in 0..3 {
        let echo = sluice
            .invoke(&name, &json!({"action": "echo"}))
            .await
            .ok_json();
        let id = str_field(&echo, "request_id").to_owned();
        assert_request_id(&id);
        ids.insert(id);
    }
    assert_eq!(ids.len(), 3, "request ids: {ids:?}");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remaining_time_is_positive_and_within_the_timeout() {
    let name = unique_name("deadline");
    let sluice = Sluice::with(Function::rust(&name).set("timeout", "3s")).await;
    let echo = sluice
        .invoke(&name, &json!({"action": "echo"}))
        .await
        .ok_json();
    let remaining = echo["remaining_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("{echo}"));
    assert!(
        remaining > 1000 && remaining <= 3000,
        "remaining time {remaining} ms with a 3 s timeout"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoked_function_arn_names_the_function() {
    let name = unique_name("arn");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let echo = sluice
        .invoke(&name, &json!({"action": "echo"}))
        .await
        .ok_json();
    assert_function_arn(str_field(&echo, "invoked_function_arn"), &name);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_environment_variables_are_set() {
    let name = unique_name("env");
    let sluice = Sluice::with(
        Function::rust(&name)
            .set("memory_mb", "256")
            .set("handler", "my.handler")
            .set(
                "environment",
                &format!("{{GREETING: {}, EMPTY: \"\"}}", quoted("hello there")),
            ),
    )
    .await;
    let echo = sluice
        .invoke(
            &name,
            &json!({"action": "echo", "env_names": ["GREETING", "EMPTY", "TZ"]}),
        )
        .await
        .ok_json();
    let var = |n: &str| env_var(&echo, n);
    assert_eq!(
        var("AWS_LAMBDA_FUNCTION_NAME").as_deref(),
        Some(name.as_str())
    );
    assert_eq!(
        var("AWS_LAMBDA_FUNCTION_VERSION").as_deref(),
        Some("$LATEST")
    );
    assert_eq!(
        var("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").as_deref(),
        Some("256")
    );
    assert_eq!(var("_HANDLER").as_deref(), Some("my.handler"));
    assert_eq!(var("GREETING").as_deref(), Some("hello there"));
    assert_eq!(var("EMPTY").as_deref(), Some(""));
    assert_eq!(
        var("AWS_LAMBDA_LOG_GROUP_NAME").as_deref(),
        Some(format!("/aws/lambda/{name}").as_str())
    );
    for present in [
        "AWS_REGION",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "LAMBDA_TASK_ROOT",
        "AWS_LAMBDA_RUNTIME_API",
    ] {
        let value = var(present).unwrap_or_default();
        assert!(!value.is_empty(), "{present} is set: {echo}");
    }
    let task_root = var("LAMBDA_TASK_ROOT").unwrap_or_default();
    assert!(
        std::path::Path::new(&task_root).is_dir(),
        "LAMBDA_TASK_ROOT is the package directory: {task_root}"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_invocations_run_in_separate_environments() {
    let name = unique_name("concurrent");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let started = Instant::now();
    let events: Vec<Value> = (0..3)
        .map(|i| json!({"action": "echo", "sleep_ms": 1500, "i": i}))
        .collect();
    let calls = events.iter().map(|event| sluice.invoke(&name, event));
    let results = futures::future::join_all(calls).await;
    let pids: HashSet<u64> = results.iter().map(|r| pid(&r.ok_json())).collect();
    assert_eq!(
        pids.len(),
        3,
        "one environment per concurrent invocation, got pids {pids:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(4000),
        "three 1.5 s invocations ran side by side, not one after another: {:?}",
        started.elapsed()
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_invocations_reuse_a_warm_environment() {
    let name = unique_name("warm");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let mut pids = HashSet::new();
    for i in 0..4 {
        let echo = sluice
            .invoke(&name, &json!({"action": "echo", "i": i}))
            .await
            .ok_json();
        pids.insert(pid(&echo));
    }
    assert_eq!(
        pids.len(),
        1,
        "one warm environment serves calls in sequence: {pids:?}"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_response_round_trips_intact() {
    let name = unique_name("big");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let response = sluice
        .invoke(&name, &json!({"action": "big", "bytes": 1_000_000}))
        .await;
    let value = response.ok_json();
    assert_eq!(value.as_str().map(str::len), Some(1_000_000));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_invocations_per_function() {
    let name = unique_name("metrics");
    let sluice = Sluice::with(Function::rust(&name)).await;
    sluice
        .invoke(&name, &json!({"action": "echo"}))
        .await
        .ok_json();
    sluice
        .invoke(&name, &json!({"action": "fail"}))
        .await
        .unhandled_error();

    let (status, text) = sluice.get("/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {text}");
    let label = format!("function=\"{name}\"");
    let total: f64 = text
        .lines()
        .filter(|line| {
            line.starts_with("sluice_function_invocations_total{") && line.contains(&label)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(total, 2.0, "two invocations of {name} counted in:\n{text}");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_payload_reaches_the_function_as_an_empty_object() {
    let name = unique_name("empty");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let echo = sluice.invoke_raw(&name, Vec::new(), &[]).await.ok_json();
    assert_eq!(echo["event"], json!({}));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_payload_is_400_invalid_request_content() {
    let name = unique_name("badjson");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let response = sluice.invoke_raw(&name, b"{not json".to_vec(), &[]).await;
    assert_eq!(response.status, 400, "body: {}", response.text());
    assert_eq!(
        response.header("x-amzn-errortype").as_deref(),
        Some("InvalidRequestContentException")
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_is_413_request_too_large() {
    let name = unique_name("bigreq");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let payload = json!({"action": "echo", "padding": "p".repeat(6 * 1024 * 1024)});
    let response = sluice.invoke(&name, &payload).await;
    assert_eq!(response.status, 413, "body: {}", response.text());
    assert_eq!(
        response.header("x-amzn-errortype").as_deref(),
        Some("RequestTooLargeException")
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_response_is_a_response_size_too_large_function_error() {
    let name = unique_name("bigresp");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let response = sluice
        .invoke(&name, &json!({"action": "big", "bytes": 7 * 1024 * 1024}))
        .await;
    let error = response.unhandled_error();
    assert_eq!(
        str_field(&error, "errorType"),
        "Function.ResponseSizeTooLarge"
    );
    sluice
        .invoke(&name, &json!({"action": "echo"}))
        .await
        .ok_json();
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_concurrency_throttles_the_excess_with_429() {
    let name = unique_name("reserved");
    let sluice = Sluice::with(Function::rust(&name).set("reserved_concurrency", "1")).await;
    let slow = json!({"action": "echo", "sleep_ms": 1500});
    let (first, second) = tokio::join!(sluice.invoke(&name, &slow), async {
        // Let the first call take the only slot.
        tokio::time::sleep(Duration::from_millis(300)).await;
        sluice.invoke(&name, &json!({"action": "echo"})).await
    });
    first.ok_json();
    assert_eq!(second.status, 429, "body: {}", second.text());
    assert_eq!(
        second.header("x-amzn-errortype").as_deref(),
        Some("TooManyRequestsException")
    );
    // The slot is free again once the first call is done.
    sluice
        .invoke(&name, &json!({"action": "echo"}))
        .await
        .ok_json();
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_line_shows_the_memory_the_function_holds() {
    let name = unique_name("maxmem");
    let sluice = Sluice::with(Function::rust(&name).set("memory_mb", "256")).await;
    let response = sluice
        .invoke_with(
            &name,
            &json!({"action": "alloc", "mb": 64}),
            &[("X-Amz-Log-Type", "Tail")],
        )
        .await;
    response.ok_json();
    let log = response.log_result();
    let used: u64 = log
        .split("Max Memory Used: ")
        .nth(1)
        .and_then(|rest| rest.split(" MB").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `Max Memory Used: N MB` in:\n{log}"));
    assert!(
        (64..=256).contains(&used),
        "64 MB held, Max Memory Used: {used} MB\n{log}"
    );
    assert!(log.contains("Memory Size: 256 MB"), "{log}");
    sluice.shutdown().await;
}
