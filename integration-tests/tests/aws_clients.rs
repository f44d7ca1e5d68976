//! The AWS SDK for Python (boto3) and the AWS CLI, pointed at Sluice with `endpoint_url`,
//! are Sluice clients without any change.

mod common;

use std::time::Duration;

use common::{Function, Sluice, aws_client_env, client_script, run_program};
use serde_json::{Value, json};
use sluice_integration_tests::{unique_name, venv_bin, venv_python};

const CLIENT_LIMIT: Duration = Duration::from_secs(60);

/// Runs `clients/boto3_invoke.py` and returns what it printed.
async fn boto3_invoke(sluice: &Sluice, function: &str, payload: &Value, tail: bool) -> Value {
    let script = client_script("boto3_invoke.py");
    let payload = payload.to_string();
    let mut args = vec![
        script.to_str().expect("utf-8 path"),
        "--endpoint",
        &sluice.url,
        "--function",
        function,
        "--payload",
        &payload,
    ];
    if tail {
        args.push("--tail");
    }
    let env = aws_client_env(sluice.dir());
    let (code, stdout, stderr) = run_program(&venv_python(), &args, &env, CLIENT_LIMIT).await;
    assert_eq!(code, 0, "boto3_invoke.py failed:\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!("boto3_invoke.py printed no JSON ({error}): {stdout}\n{stderr}")
    })
}

/// The major version of the AWS CLI in the test virtualenv.
async fn aws_cli_major_version(env: &[(String, String)]) -> u32 {
    let (code, stdout, stderr) =
        run_program(&venv_bin("aws"), &["--version"], env, CLIENT_LIMIT).await;
    assert_eq!(code, 0, "aws --version failed:\n{stderr}");
    // `aws-cli/1.46.3 Python/3.11.7 ...`, on stdout or (older releases) stderr.
    let text = format!("{stdout}{stderr}");
    text.strip_prefix("aws-cli/")
        .and_then(|rest| rest.split('.').next())
        .and_then(|major| major.parse().ok())
        .unwrap_or_else(|| panic!("unexpected aws --version output: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_invoke_returns_the_function_payload() {
    let name = unique_name("boto3");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let event = json!({"action": "echo", "from": "boto3"});
    let out = boto3_invoke(&sluice, &name, &event, false).await;
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["executed_version"], "$LATEST", "{out}");
    assert_eq!(out["function_error"], Value::Null, "{out}");
    assert_eq!(out["payload"]["event"], event, "{out}");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_function_error_is_reported_as_function_error() {
    let name = unique_name("boto3-fail");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let out = boto3_invoke(
        &sluice,
        &name,
        &json!({"action": "fail", "message": "nope"}),
        false,
    )
    .await;
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["function_error"], "Unhandled", "{out}");
    assert_eq!(out["payload"]["errorMessage"], "nope", "{out}");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_tail_invoke_returns_the_log_result() {
    let name = unique_name("boto3-tail");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let marker = unique_name("boto3-line");
    let out = boto3_invoke(
        &sluice,
        &name,
        &json!({"action": "print", "text": marker}),
        true,
    )
    .await;
    assert_eq!(out["payload"], "printed", "{out}");
    let log = out["log"]
        .as_str()
        .unwrap_or_else(|| panic!("no LogResult: {out}"));
    assert!(log.contains("START RequestId: "), "{log}");
    assert!(log.contains(&marker), "{log}");
    assert!(log.contains("REPORT RequestId: "), "{log}");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_missing_function_raises_resource_not_found() {
    let name = unique_name("boto3-present");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let missing = unique_name("boto3-missing");
    let out = boto3_invoke(&sluice, &missing, &json!({}), false).await;
    assert_eq!(out["exception"], "ResourceNotFoundException", "{out}");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_cli_invoke_writes_the_payload_to_the_outfile() {
    let name = unique_name("awscli");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let outfile = sluice.dir().join("out.json");
    let event = json!({"action": "echo", "from": "aws-cli"});
    let payload = event.to_string();
    let env = aws_client_env(sluice.dir());
    let mut args = vec![
        "lambda",
        "invoke",
        "--endpoint-url",
        &sluice.url,
        "--region",
        "us-east-1",
        "--function-name",
        &name,
        "--payload",
        &payload,
    ];
    // Version 2 reads blobs as base64 unless told otherwise; version 1 (the one on PyPI) takes
    // the payload as it is and does not know the option.
    if aws_cli_major_version(&env).await >= 2 {
        args.extend(["--cli-binary-format", "raw-in-base64-out"]);
    }
    args.push(outfile.to_str().expect("utf-8 path"));
    let (code, stdout, stderr) = run_program(&venv_bin("aws"), &args, &env, CLIENT_LIMIT).await;
    assert_eq!(code, 0, "aws lambda invoke failed:\n{stdout}\n{stderr}");
    let summary: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|error| panic!("aws printed no JSON ({error}): {stdout}"));
    assert_eq!(summary["StatusCode"], 200, "{summary}");
    assert_eq!(summary["ExecutedVersion"], "$LATEST", "{summary}");
    let written: Value = serde_json::from_slice(&std::fs::read(&outfile).expect("outfile"))
        .expect("outfile is JSON");
    assert_eq!(written["event"], event);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_cli_missing_function_fails_with_resource_not_found() {
    let name = unique_name("awscli-present");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let missing = unique_name("awscli-missing");
    let outfile = sluice.dir().join("out.json");
    let args = [
        "lambda",
        "invoke",
        "--endpoint-url",
        &sluice.url,
        "--function-name",
        &missing,
        outfile.to_str().expect("utf-8 path"),
    ];
    let env = aws_client_env(sluice.dir());
    let (code, stdout, stderr) = run_program(&venv_bin("aws"), &args, &env, CLIENT_LIMIT).await;
    assert_ne!(code, 0, "invoking a missing function fails: {stdout}");
    assert!(
        stderr.contains("ResourceNotFoundException"),
        "stderr: {stderr}"
    );
    sluice.shutdown().await;
}
