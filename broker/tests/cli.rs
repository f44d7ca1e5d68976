//! The `sluice` binary as an operator uses it: validate, run, invoke, stop.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{SLUICE, bootstrap, free_port, start, write};

/// A function in a shell one-liner's worth of Python: no dependencies beyond python3.
fn python_function(dir: &Path) {
    bootstrap(
        dir,
        r#"#!/usr/bin/env python3
import json, os, time, urllib.request
API = f"http://{os.environ['AWS_LAMBDA_RUNTIME_API']}/2018-06-01/runtime"
while True:
    with urllib.request.urlopen(f"{API}/invocation/next") as r:
        rid = r.headers["Lambda-Runtime-Aws-Request-Id"]; event = json.loads(r.read())
    print("got", json.dumps(event), flush=True)
    time.sleep(event.get("sleep", 0))
    body = json.dumps({"echo": event}).encode()
    urllib.request.urlopen(urllib.request.Request(f"{API}/invocation/{rid}/response", data=body, method="POST")).close()
"#,
    );
}

fn invoke(port: u16, name: &str, payload: &str, extra: &[&str]) -> std::process::Output {
    Command::new(SLUICE)
        .args(["invoke", name, "--payload", payload, "--endpoint"])
        .arg(format!("http://127.0.0.1:{port}"))
        .args(extra)
        .output()
        .expect("sluice invoke runs")
}

#[test]
fn validate_reports_every_error_with_path_and_line_and_fails() {
    let dir = tempfile::tempdir().expect("dir");
    let config = write(
        dir.path(),
        "bad.yaml",
        "functions:\n  a:\n    package: ./nowhere\n    timeout: soon\n  b:\n    package: ./nowhere\n    memroy_mb: 256\n",
    );
    let out = Command::new(SLUICE)
        .arg("validate")
        .arg(&config)
        .output()
        .expect("validate runs");
    assert!(!out.status.success(), "a bad file must fail validation");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(":4:") && stderr.contains("functions.a.timeout"),
        "{stderr}"
    );
    assert!(
        stderr.contains(":7:") && stderr.contains("functions.b.memroy_mb"),
        "{stderr}"
    );
}

#[test]
fn validate_checks_that_packages_exist() {
    let dir = tempfile::tempdir().expect("dir");
    let config = write(
        dir.path(),
        "missing.yaml",
        "functions:\n  a:\n    package: ./nowhere\n",
    );
    let out = Command::new(SLUICE)
        .arg("validate")
        .arg(&config)
        .output()
        .expect("validate runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("missing.yaml:3:")
            && stderr.contains("functions.a.package")
            && stderr.contains("does not exist"),
        "{stderr}"
    );
}

#[test]
fn validate_accepts_the_quickstart() {
    let quickstart =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart/sluice.yaml");
    let out = Command::new(SLUICE)
        .arg("validate")
        .arg(&quickstart)
        .output()
        .expect("validate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 functions, 1 sources)"));
}

#[test]
fn run_then_invoke_returns_the_function_result_and_its_log() {
    let dir = tempfile::tempdir().expect("dir");
    python_function(dir.path());
    let config = write(
        dir.path(),
        "s.yaml",
        "functions:\n  echo:\n    package: ./fn\n    timeout: 5s\n",
    );
    let port = free_port();
    let _server = start(&config, port);
    let out = invoke(port, "echo", r#"{"n":1}"#, &["--tail"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json result");
    assert_eq!(result, serde_json::json!({"echo": {"n": 1}}));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("START RequestId:")
            && log.contains("got {\"n\": 1}")
            && log.contains("REPORT RequestId:"),
        "{log}"
    );

    let missing = invoke(port, "nope", "{}", &[]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("ResourceNotFoundException"));
}

#[test]
fn sigterm_lets_the_running_invocation_finish() {
    let dir = tempfile::tempdir().expect("dir");
    python_function(dir.path());
    let config = write(
        dir.path(),
        "s.yaml",
        "functions:\n  slow:\n    package: ./fn\n    timeout: 10s\n",
    );
    let port = free_port();
    let server = start(&config, port);
    let caller = std::thread::spawn(move || invoke(port, "slow", r#"{"sleep":1.5}"#, &[]));
    // Let the invocation reach the function before the signal.
    std::thread::sleep(Duration::from_millis(700));
    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    let out = caller.join().expect("caller");
    assert!(
        out.status.success(),
        "in-flight invocation lost: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"sleep\": 1.5"));
    let mut server = server;
    let status = server.0.wait().expect("sluice exits");
    assert!(
        status.success(),
        "sluice exits cleanly after SIGTERM: {status:?}"
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "stopped within the grace period"
    );
}

/// Runs a `sluice` management command against the Sluice on `port`.
fn cli(port: u16, args: &[&str]) -> std::process::Output {
    Command::new(SLUICE)
        .args(args)
        .args(["--endpoint", &format!("http://127.0.0.1:{port}")])
        .output()
        .expect("sluice runs")
}

/// The JSON a command that must succeed printed.
#[track_caller]
fn printed(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Asserts the command failed with Lambda's `error_type`; returns what it said.
#[track_caller]
fn refused(out: &std::process::Output, error_type: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "should fail with {error_type}; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains(&format!("error: {error_type}")), "{stderr}");
    stderr
}

fn running_echo(extra_yaml: &str) -> (tempfile::TempDir, common::Server, u16) {
    let dir = tempfile::tempdir().expect("dir");
    python_function(dir.path());
    let config = write(
        dir.path(),
        "s.yaml",
        &format!("functions:\n  echo:\n    package: ./fn\n    timeout: 5s\n{extra_yaml}"),
    );
    let port = free_port();
    let server = start(&config, port);
    (dir, server, port)
}

#[test]
fn publish_versions_and_alias_commands_manage_versions_and_aliases() {
    let (_dir, _server, port) = running_echo("");
    let first = printed(&cli(port, &["publish", "echo", "--description", "first"]));
    assert_eq!(
        (&first["Version"], &first["Description"]),
        (&"1".into(), &"first".into()),
        "{first}"
    );
    let again = printed(&cli(port, &["publish", "echo"]));
    assert_eq!(
        again["Version"], "1",
        "nothing changed, no new version: {again}"
    );
    let versions = printed(&cli(port, &["versions", "echo"]));
    let listed: Vec<&str> = versions["Versions"]
        .as_array()
        .expect("Versions")
        .iter()
        .filter_map(|v| v["Version"].as_str())
        .collect();
    assert_eq!(listed, ["$LATEST", "1"]);

    let live = printed(&cli(
        port,
        &[
            "alias",
            "create",
            "echo",
            "live",
            "--version",
            "1",
            "--description",
            "prod",
        ],
    ));
    assert_eq!(
        (&live["Name"], &live["FunctionVersion"]),
        (&"live".into(), &"1".into()),
        "{live}"
    );
    refused(
        &cli(
            port,
            &[
                "alias",
                "create",
                "echo",
                "canary",
                "--version",
                "1",
                "--weight",
                "1=0.5",
            ],
        ),
        "InvalidParameterValueException",
    );
    refused(
        &cli(port, &["alias", "create", "echo", "live", "--version", "1"]),
        "ResourceConflictException",
    );
    assert_eq!(
        printed(&cli(port, &["alias", "get", "echo", "live"]))["Description"],
        "prod"
    );
    let moved = printed(&cli(
        port,
        &["alias", "update", "echo", "live", "--description", "moved"],
    ));
    assert_eq!(
        (&moved["FunctionVersion"], &moved["Description"]),
        (&"1".into(), &"moved".into()),
        "{moved}"
    );
    let aliases = printed(&cli(port, &["alias", "list", "echo"]));
    assert_eq!(
        aliases["Aliases"].as_array().map(Vec::len),
        Some(1),
        "{aliases}"
    );

    for qualified in [&["echo", "--qualifier", "live"][..], &["echo:1"][..]] {
        let mut args = vec!["invoke"];
        args.extend_from_slice(qualified);
        args.extend(["--payload", r#"{"n":3}"#, "--tail"]);
        let out = cli(port, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(r#""n": 3"#));
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            log.contains("START RequestId: ") && log.contains(" Version: 1\n"),
            "{qualified:?} runs version 1: {log}"
        );
    }

    let deleted = cli(port, &["alias", "delete", "echo", "live"]);
    assert!(
        deleted.status.success() && deleted.stdout.is_empty(),
        "{deleted:?}"
    );
    let stderr = refused(
        &cli(port, &["alias", "get", "echo", "live"]),
        "ResourceNotFoundException",
    );
    assert!(stderr.contains("Alias not found"), "{stderr}");
    refused(
        &cli(port, &["invoke", "echo", "--qualifier", "live"]),
        "ResourceNotFoundException",
    );
}

#[test]
fn concurrency_commands_reserve_and_release_and_a_throttle_names_its_reason() {
    let (_dir, _server, port) = running_echo("");
    assert_eq!(
        printed(&cli(port, &["concurrency", "get", "echo"])),
        serde_json::json!({})
    );
    let put = printed(&cli(port, &["concurrency", "put", "echo", "0"]));
    assert_eq!(put["ReservedConcurrentExecutions"], 0, "{put}");
    let stderr = refused(&cli(port, &["invoke", "echo"]), "TooManyRequestsException");
    assert!(
        stderr.contains("ReservedFunctionConcurrentInvocationLimitExceeded"),
        "{stderr}"
    );
    assert_eq!(
        printed(&cli(port, &["concurrency", "get", "echo"]))["ReservedConcurrentExecutions"],
        0
    );
    assert!(
        cli(port, &["concurrency", "delete", "echo"])
            .status
            .success()
    );
    assert_eq!(
        printed(&cli(port, &["concurrency", "get", "echo"])),
        serde_json::json!({})
    );
    let out = cli(port, &["invoke", "echo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn event_invoke_prints_the_request_id_and_the_function_runs() {
    let (dir, _server, port) =
        running_echo("    on_success: ok\ndead_letters:\n  ok: {type: file, path: ./ok.jsonl}\n");
    let out = cli(
        port,
        &[
            "invoke",
            "echo",
            "--invocation-type",
            "Event",
            "--payload",
            r#"{"n":2}"#,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "prints the request id: {id:?}"
    );
    let started = Instant::now();
    let record = loop {
        let text = std::fs::read_to_string(dir.path().join("ok.jsonl")).unwrap_or_default();
        if let Some(line) = text.lines().next() {
            break serde_json::from_str::<serde_json::Value>(line).expect("JSON line");
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the event never ran"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        record["requestContext"]["requestId"],
        id.as_str(),
        "{record}"
    );
    assert_eq!(
        record["responsePayload"],
        serde_json::json!({"echo": {"n": 2}}),
        "{record}"
    );
}

#[test]
fn functions_commands_find_sluice_through_the_config_file_or_the_environment() {
    let dir = tempfile::tempdir().expect("dir");
    python_function(dir.path());
    let port = free_port();
    let config = write(
        dir.path(),
        "s.yaml",
        &format!(
            "api: {{listen: 127.0.0.1:{port}}}\nfunctions:\n  echo:\n    package: ./fn\n  other:\n    package: ./fn\n    memory_mb: 256\n"
        ),
    );
    let _server = start(&config, port);
    let config_arg = config.to_str().expect("utf-8 path");
    let run = |args: &[&str], env: Option<&str>| {
        let mut command = Command::new(SLUICE);
        command.args(args).env_remove("SLUICE_ENDPOINT");
        if let Some(endpoint) = env {
            command.env("SLUICE_ENDPOINT", endpoint);
        }
        command.output().expect("sluice runs")
    };
    let listed = printed(&run(&["functions", "list", "-c", config_arg], None));
    let names: Vec<&str> = listed["Functions"]
        .as_array()
        .expect("Functions")
        .iter()
        .filter_map(|f| f["FunctionName"].as_str())
        .collect();
    assert_eq!(names, ["echo", "other"]);
    let endpoint = format!("127.0.0.1:{port}");
    let got = printed(&run(
        &["functions", "get", "other:$LATEST"],
        Some(&endpoint),
    ));
    assert_eq!(
        (
            &got["Configuration"]["FunctionName"],
            &got["Configuration"]["MemorySize"]
        ),
        (&"other".into(), &256.into()),
        "{got}"
    );
    refused(
        &run(&["functions", "get", "nope", "-c", config_arg], None),
        "ResourceNotFoundException",
    );
    let unreachable = run(
        &["functions", "list", "--endpoint", "http://127.0.0.1:1"],
        None,
    );
    assert!(!unreachable.status.success());
    assert!(
        String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach Sluice"),
        "{unreachable:?}"
    );
}

/// Reports the AWS keys it was given, whether Sluice's own environment shows in its own, and
/// whether it can read Sluice's (its parent's) `/proc/<pid>/environ`.
const ENVIRONMENT_REPORTER: &str = r#"#!/bin/bash
export PATH=/usr/local/bin:/usr/bin:/bin
api="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  headers="$(mktemp)"
  curl -sS -D "$headers" -o /dev/null "$api/invocation/next"
  request_id="$(grep -Fi Lambda-Runtime-Aws-Request-Id "$headers" | tr -d '[:space:]' | cut -d: -f2)"
  rm -f "$headers"
  if parent="$(tr '\0' '\n' < "/proc/$PPID/environ" 2>/dev/null)"; then
    parent_environ="readable"
  else
    parent_environ="refused"
  fi
  leaked="$( (env; echo "$parent") | grep -c sluice-marker-host)"
  reply="{\"key\": \"${AWS_ACCESS_KEY_ID-unset}\", \"secret\": \"${AWS_SECRET_ACCESS_KEY-unset}\", \"token\": \"${AWS_SESSION_TOKEN-unset}\", \"parent_environ\": \"$parent_environ\", \"leaked\": \"$leaked\"}"
  curl -sS -o /dev/null --data-binary "$reply" "$api/invocation/$request_id/response"
done
"#;

#[test]
fn a_function_gets_its_roles_keys_and_nothing_of_sluices_own_environment() {
    let dir = tempfile::tempdir().expect("dir");
    bootstrap(dir.path(), ENVIRONMENT_REPORTER);
    let token = write(dir.path(), "token", "role-session-token\n");
    let config = write(
        dir.path(),
        "s.yaml",
        &format!(
            "roles:\n  reader:\n    access_key_id: AKIASLUICEROLE000001\n    secret_access_key: ${{ROLE_SECRET}}\n    session_token_file: {}\nfunctions:\n  with-role:\n    package: ./fn\n    role: reader\n  without:\n    package: ./fn\n",
            token.display()
        ),
    );
    let port = free_port();
    // Sluice's own AWS keys and secrets, which no function may see.
    let _server = common::start_as(
        &config,
        port,
        &[
            "env",
            "AWS_ACCESS_KEY_ID=sluice-marker-host-key",
            "AWS_SECRET_ACCESS_KEY=sluice-marker-host-secret",
            "AWS_SESSION_TOKEN=sluice-marker-host-token",
            "SLUICE_DATABASE_PASSWORD=sluice-marker-host-password",
            "ROLE_SECRET=role-secret-access-key",
        ],
    );
    let seen = |name: &str| -> serde_json::Value {
        let out = invoke(port, name, "{}", &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json result")
    };
    let with_role = seen("with-role");
    assert_eq!(
        with_role,
        serde_json::json!({
            "key": "AKIASLUICEROLE000001",
            "secret": "role-secret-access-key",
            "token": "role-session-token",
            "parent_environ": "refused",
            "leaked": "0",
        })
    );
    let without = seen("without");
    assert_eq!(
        without,
        serde_json::json!({
            "key": "unset",
            "secret": "unset",
            "token": "unset",
            "parent_environ": "refused",
            "leaked": "0",
        })
    );
}
