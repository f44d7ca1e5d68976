//! Test functions and harness helpers for Sluice's integration tests.
//!
//! The handlers live here rather than in the binaries so that a benchmark can call them
//! in-process and compare with the same code behind the Runtime API.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lambda_runtime::{Diagnostic, LambdaEvent};
use serde_json::{Map, Value, json};

/// Environment variables `echo` always reports; `event.env_names` adds more.
pub const ECHOED_ENV: &[&str] = &[
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_REGION",
    "LAMBDA_TASK_ROOT",
    "_HANDLER",
    "AWS_LAMBDA_RUNTIME_API",
    "AWS_ACCESS_KEY_ID",
    "SLUICE_TEST_SECRET",
];

/// The `errorType` the test function reports for `fail` and for events it cannot understand.
pub const TEST_ERROR_TYPE: &str = "TestFunctionError";

/// A handled failure of the test function, reported to the Runtime API as
/// `{"errorType": "TestFunctionError", "errorMessage": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestFunctionError {
    pub message: String,
}

impl From<TestFunctionError> for Diagnostic {
    fn from(error: TestFunctionError) -> Self {
        Diagnostic {
            error_type: TEST_ERROR_TYPE.to_string(),
            error_message: error.message,
        }
    }
}

fn failure(message: impl Into<String>) -> TestFunctionError {
    TestFunctionError {
        message: message.into(),
    }
}

/// The benchmark function: returns its event unchanged.
pub async fn noop_handler(event: Value) -> Value {
    event
}

/// Memory `alloc` keeps for the life of the environment, so that it shows in the
/// environment's footprint after the invocation returns.
static HELD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// The test function behind `fn-rust`. The event is `{"action": ..., ...}`:
///
/// - `echo`: the event, the invocation context and selected environment variables, and the
///   process id (to tell environments apart); `sleep_ms` delays the answer.
/// - `print`: `text` to stdout, `stderr` (or `text`) to stderr; returns `"printed"`.
/// - `fail`: a handled error with `message`.
/// - `sleep`: sleeps `ms` milliseconds; returns `"slept"`.
/// - `crash`: exits the process with `code` (default 3).
/// - `alloc`: allocates, touches and holds `mb` megabytes; returns `"allocated"`.
/// - `big`: returns a string of `bytes` bytes.
pub async fn test_function(event: LambdaEvent<Value>) -> Result<Value, TestFunctionError> {
    let (payload, context) = event.into_parts();
    let action = payload
        .get("action")
        .and_then(Value::as_str)
        .unwrap_or("echo")
        .to_string();
    match action.as_str() {
        "echo" => {
            if let Some(ms) = payload.get("sleep_ms").and_then(Value::as_u64) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default();
            let mut names: Vec<String> = ECHOED_ENV.iter().map(|s| s.to_string()).collect();
            if let Some(extra) = payload.get("env_names").and_then(Value::as_array) {
                names.extend(extra.iter().filter_map(Value::as_str).map(str::to_string));
            }
            let env: Map<String, Value> = names
                .into_iter()
                .map(|name| {
                    let value = std::env::var(&name)
                        .map(Value::String)
                        .unwrap_or(Value::Null);
                    (name, value)
                })
                .collect();
            let client_context = match &context.client_context {
                Some(cc) => serde_json::to_value(cc).unwrap_or(Value::Null),
                None => Value::Null,
            };
            Ok(json!({
                "event": payload,
                "request_id": context.request_id,
                "deadline_ms": context.deadline,
                "remaining_ms": context.deadline as i64 - now_ms,
                "invoked_function_arn": context.invoked_function_arn,
                "client_context": client_context,
                "env": env,
                "pid": std::process::id(),
            }))
        }
        "print" => {
            let text = payload.get("text").and_then(Value::as_str).unwrap_or("");
            let err_text = payload
                .get("stderr")
                .and_then(Value::as_str)
                .unwrap_or(text);
            println!("{text}");
            eprintln!("{err_text}");
            Ok(json!("printed"))
        }
        "fail" => Err(failure(
            payload
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("failed on purpose"),
        )),
        "sleep" => {
            let ms = payload.get("ms").and_then(Value::as_u64).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(json!("slept"))
        }
        "crash" => {
            let code = payload.get("code").and_then(Value::as_i64).unwrap_or(3);
            std::process::exit(code as i32)
        }
        "alloc" => {
            let mb = payload.get("mb").and_then(Value::as_u64).unwrap_or(0) as usize;
            let mut held = HELD.lock().map_err(|_| failure("memory lock poisoned"))?;
            for _ in 0..mb {
                // Written page by page: zeroed memory that is never touched costs nothing.
                let mut chunk = vec![0u8; 1 << 20];
                for byte in chunk.iter_mut().step_by(4096) {
                    *byte = 1;
                }
                held.push(chunk);
            }
            Ok(json!("allocated"))
        }
        "big" => {
            let bytes = payload.get("bytes").and_then(Value::as_u64).unwrap_or(0) as usize;
            Ok(Value::String("x".repeat(bytes)))
        }
        other => Err(failure(format!("unknown action {other:?}"))),
    }
}

/// The test virtualenv (awslambdaric, boto3, awscli) that `scripts/test` prepares.
pub fn venv_dir() -> PathBuf {
    let dir = match std::env::var_os("SLUICE_TEST_VENV") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_default();
            Path::new(&home).join(".cache/sluice/venv")
        }
    };
    if !dir.join("bin/python").exists() {
        panic!(
            "no Python virtualenv at {}: run scripts/test to create the test virtualenv \
             (or point SLUICE_TEST_VENV at one with integration-tests/requirements.txt installed)",
            dir.display()
        );
    }
    dir
}

/// The virtualenv's interpreter.
pub fn venv_python() -> PathBuf {
    venv_dir().join("bin/python")
}

/// A program installed in the virtualenv (`aws`, say).
pub fn venv_bin(name: &str) -> PathBuf {
    venv_dir().join("bin").join(name)
}

/// `integration-tests/functions`: the test functions that are not Rust binaries.
pub fn functions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("functions")
}

/// `integration-tests/clients`: the AWS SDK and CLI client scripts.
pub fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// A name no other test (in this process or another) uses: `prefix-<12 hex digits>`, valid
/// as a Lambda function name.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mixed = (nanos ^ (u64::from(std::process::id()) << 40))
        .wrapping_add(count.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    format!("{prefix}-{:012x}", mixed & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_are_valid_function_names() {
        let a = unique_name("fn");
        let b = unique_name("fn");
        assert_ne!(a, b);
        assert!(a.len() <= 64);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }

    #[tokio::test]
    async fn fail_action_reports_the_message_with_the_test_error_type() {
        let event = LambdaEvent::new(
            json!({"action": "fail", "message": "boom"}),
            lambda_runtime::Context::default(),
        );
        let error = test_function(event).await.expect_err("fail must fail");
        let diagnostic = Diagnostic::from(error);
        assert_eq!(diagnostic.error_type, TEST_ERROR_TYPE);
        assert_eq!(diagnostic.error_message, "boom");
    }

    #[tokio::test]
    async fn big_action_returns_exactly_the_requested_size() {
        let event = LambdaEvent::new(
            json!({"action": "big", "bytes": 1000}),
            lambda_runtime::Context::default(),
        );
        let value = test_function(event).await.expect("big succeeds");
        assert_eq!(value.as_str().map(str::len), Some(1000));
    }
}
