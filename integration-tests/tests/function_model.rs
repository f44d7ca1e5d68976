//! Lambda's function model as boto3 and the AWS CLI see it: versions, aliases (weighted too),
//! reserved and account concurrency, asynchronous invocation with retries, maximum event age
//! and destinations, and the webhook and schedule sources.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{
    Function, Logs, Sluice, aws_client_env, client_script, env_var, json_lines, quoted, recorder,
    run_program, wait_for_lines,
};
use serde_json::{Value, json};
use sluice::state::{AttemptRecord, QueuedEvent, SqliteStore, StateStore};
use sluice_integration_tests::{TEST_ERROR_TYPE, unique_name, venv_bin, venv_python};

const CLIENT_LIMIT: Duration = Duration::from_secs(90);
/// How long an asynchronous outcome may take to show up in a dead letter.
const ASYNC_LIMIT: Duration = Duration::from_secs(20);

/// Two `file` dead letters in the test directory: `ok.jsonl` for `on_success`, `dlq.jsonl` for
/// `on_failure`.
const DEAD_LETTERS: &str =
    "dead_letters:\n  ok: {type: file, path: ok.jsonl}\n  dlq: {type: file, path: dlq.jsonl}\n";

fn call(op: &str, args: Value) -> Value {
    json!({"op": op, "args": args})
}

fn publish(function: &str) -> Value {
    call("publish_version", json!({"FunctionName": function}))
}

fn create_alias(function: &str, alias: &str, version: &str) -> Value {
    call(
        "create_alias",
        json!({"FunctionName": function, "Name": alias, "FunctionVersion": version}),
    )
}

fn reserve(function: &str, reserved: u32) -> Value {
    call(
        "put_function_concurrency",
        json!({"FunctionName": function, "ReservedConcurrentExecutions": reserved}),
    )
}

/// An asynchronous `invoke` (`InvocationType: Event`); `function` may carry a qualifier.
fn event(function: &str, payload: &Value) -> Value {
    call(
        "invoke",
        json!({"FunctionName": function, "InvocationType": "Event", "Payload": payload.to_string()}),
    )
}

/// `invoke` of `fn-rust`'s `echo`, reporting `MARK` from its environment too.
fn echo(function: &str) -> Value {
    call(
        "invoke",
        json!({"FunctionName": function, "Payload": json!({"action": "echo", "env_names": ["MARK"]}).to_string()}),
    )
}

async fn run_boto3(sluice: &Sluice, calls: &[Value], parallel: bool) -> Vec<Value> {
    let script = client_script("boto3_calls.py");
    let calls = Value::from(calls.to_vec()).to_string();
    let mut args = vec![
        script.to_str().expect("utf-8 path"),
        "--endpoint",
        &sluice.url,
        "--calls",
        &calls,
    ];
    if parallel {
        args.push("--parallel");
    }
    let env = aws_client_env(sluice.dir());
    let (code, stdout, stderr) = run_program(&venv_python(), &args, &env, CLIENT_LIMIT).await;
    assert_eq!(code, 0, "boto3_calls.py failed:\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!("boto3_calls.py printed no JSON list ({error}): {stdout}\n{stderr}")
    })
}

/// Makes the calls one after the other through boto3; returns one result per call.
async fn boto3(sluice: &Sluice, calls: &[Value]) -> Vec<Value> {
    run_boto3(sluice, calls, false).await
}

/// Makes the calls all at once through boto3.
async fn boto3_parallel(sluice: &Sluice, calls: &[Value]) -> Vec<Value> {
    run_boto3(sluice, calls, true).await
}

/// Runs `aws lambda ARGS --endpoint-url …` and returns its output as JSON (null when empty).
async fn aws_lambda(sluice: &Sluice, args: &[&str]) -> Value {
    let mut all = vec!["lambda"];
    all.extend_from_slice(args);
    all.extend([
        "--endpoint-url",
        &sluice.url,
        "--region",
        "us-east-1",
        "--output",
        "json",
    ]);
    let env = aws_client_env(sluice.dir());
    let (code, stdout, stderr) = run_program(&venv_bin("aws"), &all, &env, CLIENT_LIMIT).await;
    assert_eq!(code, 0, "aws {all:?} failed:\n{stdout}\n{stderr}");
    if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout)
            .unwrap_or_else(|error| panic!("aws {all:?} printed no JSON ({error}): {stdout}"))
    }
}

/// Asserts a boto3 call raised `code` and returns the error response.
#[track_caller]
fn raised<'a>(result: &'a Value, code: &str) -> &'a Value {
    assert_eq!(result["exception"], code, "{result}");
    &result["error"]
}

/// Asserts a boto3 invoke succeeded and returns (ExecutedVersion, payload).
#[track_caller]
fn invoked(result: &Value) -> (&str, &Value) {
    assert_eq!(
        (&result["StatusCode"], &result["FunctionError"]),
        (&json!(200), &Value::Null),
        "{result}"
    );
    let version = result["ExecutedVersion"]
        .as_str()
        .unwrap_or_else(|| panic!("no ExecutedVersion: {result}"));
    (version, &result["Payload"])
}

#[track_caller]
fn versions_listed(result: &Value) -> Vec<&str> {
    result["Versions"]
        .as_array()
        .unwrap_or_else(|| panic!("no Versions: {result}"))
        .iter()
        .map(|v| v["Version"].as_str().unwrap_or_default())
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_version_freezes_latest_and_republishing_unchanged_returns_the_same_version() {
    let name = unique_name("publish");
    let sluice = Sluice::with(Function::rust(&name).set("description", "the function")).await;
    let out = boto3(
        &sluice,
        &[
            call(
                "publish_version",
                json!({"FunctionName": name, "CodeSha256": "not-the-code"}),
            ),
            call("list_versions_by_function", json!({"FunctionName": name})),
            call(
                "publish_version",
                json!({"FunctionName": name, "Description": "first"}),
            ),
            publish(&name),
            call("list_versions_by_function", json!({"FunctionName": name})),
            call(
                "get_function",
                json!({"FunctionName": name, "Qualifier": "1"}),
            ),
            call(
                "get_function",
                json!({"FunctionName": name, "Qualifier": "2"}),
            ),
        ],
    )
    .await;
    // A CodeSha256 that is not $LATEST's refuses the publication and publishes nothing.
    raised(&out[0], "InvalidParameterValueException");
    assert_eq!(versions_listed(&out[1]), ["$LATEST"], "{}", out[1]);
    let out = &out[2..];
    assert_eq!(out[0]["Version"], "1", "{}", out[0]);
    assert_eq!(out[0]["Description"], "first", "{}", out[0]);
    assert!(
        out[0]["FunctionArn"]
            .as_str()
            .is_some_and(|arn| arn.ends_with(&format!(":function:{name}:1"))),
        "{}",
        out[0]
    );
    assert_eq!(
        out[1]["Version"], "1",
        "nothing changed, so no new version: {}",
        out[1]
    );
    assert_eq!(versions_listed(&out[2]), ["$LATEST", "1"], "{}", out[2]);
    assert_eq!(out[3]["Configuration"]["Version"], "1", "{}", out[3]);
    assert_eq!(
        out[3]["Configuration"]["CodeSha256"], out[0]["CodeSha256"],
        "{}",
        out[3]
    );
    raised(&out[4], "ResourceNotFoundException");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_are_created_read_updated_listed_and_deleted() {
    let name = unique_name("alias");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let out = boto3(
        &sluice,
        &[
            publish(&name),
            call(
                "create_alias",
                json!({"FunctionName": name, "Name": "live", "FunctionVersion": "1", "Description": "production"}),
            ),
            create_alias(&name, "live", "1"),
            create_alias(&name, "next", "9"),
            call("get_alias", json!({"FunctionName": name, "Name": "live"})),
            call(
                "update_alias",
                json!({"FunctionName": name, "Name": "live", "FunctionVersion": "$LATEST", "Description": "moved"}),
            ),
            call("list_aliases", json!({"FunctionName": name})),
            call("delete_alias", json!({"FunctionName": name, "Name": "live"})),
            call("get_alias", json!({"FunctionName": name, "Name": "live"})),
            echo(&format!("{name}:live")),
            call("list_aliases", json!({"FunctionName": name})),
        ],
    )
    .await;
    let created = &out[1];
    assert_eq!(
        (
            &created["Name"],
            &created["FunctionVersion"],
            &created["Description"]
        ),
        (&json!("live"), &json!("1"), &json!("production")),
        "{created}"
    );
    assert!(
        created["AliasArn"]
            .as_str()
            .is_some_and(|arn| arn.ends_with(&format!(":function:{name}:live"))),
        "{created}"
    );
    raised(&out[2], "ResourceConflictException");
    raised(&out[3], "ResourceNotFoundException");
    assert_eq!(out[4]["FunctionVersion"], "1", "{}", out[4]);
    assert_eq!(out[4]["RevisionId"], created["RevisionId"], "{}", out[4]);
    assert_eq!(
        (&out[5]["FunctionVersion"], &out[5]["Description"]),
        (&json!("$LATEST"), &json!("moved")),
        "{}",
        out[5]
    );
    assert_ne!(
        out[5]["RevisionId"], created["RevisionId"],
        "an update makes a new revision"
    );
    let listed = out[6]["Aliases"].as_array().expect("Aliases");
    assert_eq!(listed.len(), 1, "{}", out[6]);
    assert_eq!(listed[0]["Name"], "live");
    assert_eq!(listed[0]["FunctionVersion"], "$LATEST");
    assert!(
        out[7].get("exception").is_none(),
        "delete_alias: {}",
        out[7]
    );
    raised(&out[8], "ResourceNotFoundException");
    raised(&out[9], "ResourceNotFoundException");
    assert_eq!(out[10]["Aliases"], json!([]), "{}", out[10]);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoking_a_version_or_alias_runs_that_version() {
    let name = unique_name("qualified");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let setup = boto3(&sluice, &[publish(&name), create_alias(&name, "live", "1")]).await;
    assert_eq!(setup[0]["Version"], "1", "{}", setup[0]);
    let with_qualifier = |qualifier: &str| {
        call(
            "invoke",
            json!({"FunctionName": name, "Qualifier": qualifier, "Payload": r#"{"action":"echo"}"#}),
        )
    };
    let out = boto3(
        &sluice,
        &[
            echo(&name),
            echo(&format!("{name}:1")),
            echo(&format!("{name}:live")),
            with_qualifier("1"),
            with_qualifier("live"),
            with_qualifier("$LATEST"),
            echo(&format!("{name}:2")),
            with_qualifier("gone"),
        ],
    )
    .await;
    // (how it was invoked, executed version, the qualifier the invoked ARN ends with)
    let expected = [
        ("unqualified", "$LATEST", None),
        ("name:1", "1", Some("1")),
        ("name:live", "1", Some("live")),
        ("Qualifier=1", "1", Some("1")),
        ("Qualifier=live", "1", Some("live")),
        ("Qualifier=$LATEST", "$LATEST", Some("$LATEST")),
    ];
    for (result, (how, version, qualifier)) in out.iter().zip(expected) {
        let (executed, echo) = invoked(result);
        assert_eq!(executed, version, "{how}: {result}");
        assert_eq!(
            env_var(echo, "AWS_LAMBDA_FUNCTION_VERSION").as_deref(),
            Some(version),
            "{how}: the function sees its version: {echo}"
        );
        let arn = echo["invoked_function_arn"].as_str().unwrap_or_default();
        let arn_end = match qualifier {
            Some(q) => format!(":function:{name}:{q}"),
            None => format!(":function:{name}"),
        };
        assert!(
            arn.ends_with(&arn_end),
            "{how}: invoked ARN {arn} should end with {arn_end}"
        );
    }
    raised(&out[6], "ResourceNotFoundException");
    raised(&out[7], "ResourceNotFoundException");

    // What a plain HTTP client sees: the version in X-Amz-Executed-Version.
    let response = sluice
        .http
        .post(format!("{}?Qualifier=live", sluice.invocations_url(&name)))
        .body(r#"{"action":"echo"}"#)
        .send()
        .await
        .expect("invoke");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("x-amz-executed-version")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_alias_splits_traffic_between_versions_that_survive_restarts() {
    let name = unique_name("weighted");
    // A version freezes its environment, so MARK tells the versions apart.
    let first = Function::rust(&name).set("environment", "{MARK: one}");
    let second = Function::rust(&name).set("environment", "{MARK: two}");
    let sluice = Sluice::with(first).await;
    let out = boto3(&sluice, &[publish(&name)]).await;
    assert_eq!(out[0]["Version"], "1", "{}", out[0]);

    let sluice = sluice.restart(std::slice::from_ref(&second), "").await;
    let mut calls = vec![
        call("list_versions_by_function", json!({"FunctionName": name})),
        publish(&name),
        call(
            "create_alias",
            json!({"FunctionName": name, "Name": "canary", "FunctionVersion": "1",
                   "RoutingConfig": {"AdditionalVersionWeights": {"2": 0.5}}}),
        ),
    ];
    const INVOKES: usize = 60;
    calls.extend((0..INVOKES).map(|_| echo(&format!("{name}:canary"))));
    let out = boto3(&sluice, &calls).await;
    assert_eq!(
        versions_listed(&out[0]),
        ["$LATEST", "1"],
        "version 1 survives a restart: {}",
        out[0]
    );
    assert_eq!(
        out[1]["Version"], "2",
        "a changed environment is a new version: {}",
        out[1]
    );
    assert_eq!(
        out[2]["RoutingConfig"]["AdditionalVersionWeights"],
        json!({"2": 0.5}),
        "{}",
        out[2]
    );
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for result in &out[3..] {
        let (version, echo) = invoked(result);
        let mark = env_var(echo, "MARK");
        let expected = match version {
            "1" => "one",
            "2" => "two",
            other => panic!("the canary alias ran version {other}: {result}"),
        };
        assert_eq!(
            mark.as_deref(),
            Some(expected),
            "version {version} runs its own configuration"
        );
        assert_eq!(
            env_var(echo, "AWS_LAMBDA_FUNCTION_VERSION").as_deref(),
            Some(version)
        );
        *seen.entry(version.to_string()).or_default() += 1;
    }
    assert!(
        seen.get("1").copied().unwrap_or(0) > 0 && seen.get("2").copied().unwrap_or(0) > 0,
        "a 0.5 weight sends traffic to both versions over {INVOKES} invokes: {seen:?}"
    );

    // Versions and aliases are state: another restart keeps them, weights and all.
    let sluice = sluice.restart(std::slice::from_ref(&second), "").await;
    let mut calls = vec![
        call("get_alias", json!({"FunctionName": name, "Name": "canary"})),
        echo(&format!("{name}:1")),
        echo(&name),
        publish(&name),
    ];
    // Reading a weighted alias's function describes its own version, never the other one.
    calls.extend((0..20).map(|_| {
        call(
            "get_function",
            json!({"FunctionName": name, "Qualifier": "canary"}),
        )
    }));
    let out = boto3(&sluice, &calls).await;
    assert_eq!(out[0]["FunctionVersion"], "1", "{}", out[0]);
    assert_eq!(
        out[0]["RoutingConfig"]["AdditionalVersionWeights"],
        json!({"2": 0.5}),
        "{}",
        out[0]
    );
    assert_eq!(env_var(invoked(&out[1]).1, "MARK").as_deref(), Some("one"));
    assert_eq!(env_var(invoked(&out[2]).1, "MARK").as_deref(), Some("two"));
    assert_eq!(
        out[3]["Version"], "2",
        "unchanged since version 2: {}",
        out[3]
    );
    for got in &out[4..] {
        assert_eq!(got["Configuration"]["Version"], "1", "{got}");
        assert_eq!(
            got["Configuration"]["Environment"]["Variables"]["MARK"], "one",
            "{got}"
        );
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_concurrency_is_put_read_and_deleted_and_zero_throttles_every_invoke() {
    let name = unique_name("reserve");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let out = boto3(
        &sluice,
        &[
            call("get_function_concurrency", json!({"FunctionName": name})),
            reserve(&name, 0),
            call("get_function_concurrency", json!({"FunctionName": name})),
            call("get_function", json!({"FunctionName": name})),
            echo(&name),
            echo(&name),
            call("delete_function_concurrency", json!({"FunctionName": name})),
            call("get_function_concurrency", json!({"FunctionName": name})),
            echo(&name),
        ],
    )
    .await;
    assert!(
        out[0].get("ReservedConcurrentExecutions").is_none(),
        "none reserved yet: {}",
        out[0]
    );
    assert_eq!(out[1]["ReservedConcurrentExecutions"], 0, "{}", out[1]);
    assert_eq!(out[2]["ReservedConcurrentExecutions"], 0, "{}", out[2]);
    assert_eq!(
        out[3]["Concurrency"]["ReservedConcurrentExecutions"], 0,
        "{}",
        out[3]
    );
    for throttled in &out[4..6] {
        let error = raised(throttled, "TooManyRequestsException");
        assert_eq!(
            error["Reason"], "ReservedFunctionConcurrentInvocationLimitExceeded",
            "{throttled}"
        );
    }
    assert!(out[6].get("exception").is_none(), "delete: {}", out[6]);
    assert!(
        out[7].get("ReservedConcurrentExecutions").is_none(),
        "deleted: {}",
        out[7]
    );
    invoked(&out[8]);
    sluice.shutdown().await;
}

fn slow_echo(function: &str) -> Value {
    call(
        "invoke",
        json!({"FunctionName": function, "Payload": r#"{"action":"echo","sleep_ms":1500}"#}),
    )
}

/// Of two overlapping invokes, asserts one ran and the other was throttled for `reason`.
#[track_caller]
fn one_ran_one_throttled(out: &[Value], reason: &str) {
    let throttled: Vec<&Value> = out
        .iter()
        .filter(|r| r.get("exception").is_some())
        .collect();
    assert_eq!(
        throttled.len(),
        1,
        "exactly one of two overlapping invokes is throttled: {out:?}"
    );
    assert_eq!(
        raised(throttled[0], "TooManyRequestsException")["Reason"],
        reason,
        "{out:?}"
    );
    let ran: Vec<&Value> = out
        .iter()
        .filter(|r| r.get("exception").is_none())
        .collect();
    invoked(ran[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_concurrency_of_one_throttles_one_of_two_overlapping_invokes() {
    let name = unique_name("reserve-one");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let out = boto3(&sluice, &[reserve(&name, 1)]).await;
    assert_eq!(out[0]["ReservedConcurrentExecutions"], 1, "{}", out[0]);
    let out = boto3_parallel(&sluice, &[slow_echo(&name), slow_echo(&name)]).await;
    one_ran_one_throttled(&out, "ReservedFunctionConcurrentInvocationLimitExceeded");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_concurrency_limit_throttles_with_concurrent_invocation_limit_exceeded() {
    let name = unique_name("account");
    let sluice = Sluice::start_with(&[Function::rust(&name)], "concurrency: {limit: 1}\n").await;
    let out = boto3_parallel(&sluice, &[slow_echo(&name), slow_echo(&name)]).await;
    one_ran_one_throttled(&out, "ConcurrentInvocationLimitExceeded");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_function_and_list_functions_describe_each_function() {
    let a = unique_name("describe-a");
    let b = unique_name("describe-b");
    let sluice = Sluice::start(&[
        Function::rust(&a)
            .set("description", "first of two")
            .set("memory_mb", "256")
            .set("timeout", "7s")
            .set("environment", "{COLOUR: blue}")
            .set("reserved_concurrency", "3"),
        Function::rust(&b),
    ])
    .await;
    let out = boto3(&sluice, &[call("get_function", json!({"FunctionName": a}))]).await;
    let config = &out[0]["Configuration"];
    assert_eq!(config["FunctionName"], a.as_str(), "{config}");
    assert_eq!(config["Version"], "$LATEST", "{config}");
    assert_eq!(config["Description"], "first of two", "{config}");
    assert_eq!(config["MemorySize"], 256, "{config}");
    assert_eq!(config["Timeout"], 7, "{config}");
    assert_eq!(
        config["Environment"]["Variables"],
        json!({"COLOUR": "blue"}),
        "{config}"
    );
    assert_eq!(
        out[0]["Concurrency"]["ReservedConcurrentExecutions"], 3,
        "{}",
        out[0]
    );

    // The AWS CLI reads the same API.
    let listed = aws_lambda(&sluice, &["list-functions"]).await;
    let names: Vec<&str> = listed["Functions"]
        .as_array()
        .unwrap_or_else(|| panic!("no Functions: {listed}"))
        .iter()
        .filter_map(|f| f["FunctionName"].as_str())
        .collect();
    assert!(
        names.contains(&a.as_str()) && names.contains(&b.as_str()),
        "{names:?}"
    );
    let got = aws_lambda(&sluice, &["get-function", "--function-name", &b]).await;
    assert_eq!(got["Configuration"]["FunctionName"], b.as_str(), "{got}");
    assert_eq!(
        got["Configuration"]["Timeout"], 3,
        "the default timeout: {got}"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_cli_publishes_aliases_and_invokes_by_qualifier() {
    let name = unique_name("cli-model");
    let sluice = Sluice::with(Function::rust(&name)).await;
    let published = aws_lambda(&sluice, &["publish-version", "--function-name", &name]).await;
    assert_eq!(published["Version"], "1", "{published}");
    let alias = aws_lambda(
        &sluice,
        &[
            "create-alias",
            "--function-name",
            &name,
            "--name",
            "live",
            "--function-version",
            "1",
        ],
    )
    .await;
    assert_eq!(alias["FunctionVersion"], "1", "{alias}");
    let versions = aws_lambda(
        &sluice,
        &["list-versions-by-function", "--function-name", &name],
    )
    .await;
    assert_eq!(versions_listed(&versions), ["$LATEST", "1"], "{versions}");
    let outfile = sluice.dir().join("out.json");
    let summary = aws_lambda(
        &sluice,
        &[
            "invoke",
            "--function-name",
            &name,
            "--qualifier",
            "live",
            "--payload",
            r#"{"action":"echo"}"#,
            outfile.to_str().expect("utf-8 path"),
        ],
    )
    .await;
    assert_eq!(summary["ExecutedVersion"], "1", "{summary}");
    let echo: Value =
        serde_json::from_slice(&std::fs::read(&outfile).expect("outfile")).expect("JSON");
    assert!(
        echo["invoked_function_arn"]
            .as_str()
            .is_some_and(|arn| arn.ends_with(":live")),
        "{echo}"
    );
    aws_lambda(
        &sluice,
        &["delete-alias", "--function-name", &name, "--name", "live"],
    )
    .await;
    let aliases = aws_lambda(&sluice, &["list-aliases", "--function-name", &name]).await;
    assert_eq!(aliases["Aliases"], json!([]), "{aliases}");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_invocation_answers_202_and_the_result_goes_to_on_success() {
    let name = unique_name("async-ok");
    let sluice = Sluice::start_with(
        &[Function::rust(&name).set("on_success", "ok")],
        DEAD_LETTERS,
    )
    .await;
    let payload = json!({"action": "echo", "marker": unique_name("event")});
    let out = boto3(
        &sluice,
        &[
            publish(&name),
            create_alias(&name, "live", "1"),
            event(&name, &payload),
            event(&format!("{name}:live"), &payload),
        ],
    )
    .await;
    let mut request_ids = Vec::new();
    for accepted in &out[2..] {
        assert_eq!(accepted["StatusCode"], 202, "{accepted}");
        assert_eq!(
            accepted["Payload"],
            Value::Null,
            "an Event invoke has no result: {accepted}"
        );
        let id = accepted["ResponseMetadata"]["RequestId"]
            .as_str()
            .expect("RequestId");
        common::assert_request_id(id);
        request_ids.push(id.to_string());
    }
    let records = wait_for_lines(&sluice.dir().join("ok.jsonl"), 2, ASYNC_LIMIT).await;
    for (id, (version, arn_end)) in request_ids.iter().zip([
        ("$LATEST", format!(":function:{name}:$LATEST")),
        ("1", format!(":function:{name}:live")),
    ]) {
        let record = records
            .iter()
            .find(|r| r["requestContext"]["requestId"] == id.as_str())
            .unwrap_or_else(|| panic!("no on_success record for {id}: {records:?}"));
        let context = &record["requestContext"];
        assert_eq!(context["condition"], "Success", "{record}");
        assert_eq!(context["approximateInvokeCount"], 1, "{record}");
        assert!(
            context["functionArn"]
                .as_str()
                .is_some_and(|a| a.ends_with(&arn_end)),
            "{record}"
        );
        assert_eq!(record["requestPayload"], payload, "{record}");
        assert_eq!(
            record["responseContext"]["executedVersion"], version,
            "{record}"
        );
        assert_eq!(
            record["responsePayload"]["event"], payload,
            "the function ran: {record}"
        );
        assert_eq!(
            record["responsePayload"]["request_id"],
            id.as_str(),
            "{record}"
        );
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_event_is_retried_then_dead_lettered_with_every_attempt() {
    let retried = unique_name("async-fail");
    let once = unique_name("async-fail-once");
    let sluice = Sluice::start_with(
        &[
            Function::rust(&retried)
                .set("max_retry_attempts", "2")
                .set("retry_delay", "100ms")
                .set("on_failure", "dlq"),
            Function::rust(&once)
                .set("max_retry_attempts", "0")
                .set("retry_delay", "0s")
                .set("on_failure", "dlq"),
        ],
        DEAD_LETTERS,
    )
    .await;
    let message = unique_name("boom");
    let payload = json!({"action": "fail", "message": message});
    let out = boto3(
        &sluice,
        &[event(&retried, &payload), event(&once, &payload)],
    )
    .await;
    let ids: Vec<&str> = out
        .iter()
        .map(|r| {
            assert_eq!(r["StatusCode"], 202, "{r}");
            r["ResponseMetadata"]["RequestId"]
                .as_str()
                .expect("RequestId")
        })
        .collect();
    let records = wait_for_lines(&sluice.dir().join("dlq.jsonl"), 2, ASYNC_LIMIT).await;
    for (id, function, tries) in [(ids[0], &retried, 3), (ids[1], &once, 1)] {
        let record = records
            .iter()
            .find(|r| r["requestContext"]["requestId"] == id)
            .unwrap_or_else(|| panic!("no dead letter for {function}: {records:?}"));
        let context = &record["requestContext"];
        assert_eq!(context["condition"], "RetriesExhausted", "{record}");
        assert_eq!(context["approximateInvokeCount"], tries, "{record}");
        assert!(
            context["functionArn"]
                .as_str()
                .is_some_and(|a| a.contains(&format!(":function:{function}"))),
            "{record}"
        );
        assert_eq!(record["requestPayload"], payload, "{record}");
        assert_eq!(
            record["responseContext"]["functionError"], "Unhandled",
            "{record}"
        );
        assert_eq!(
            record["responsePayload"]["errorType"], TEST_ERROR_TYPE,
            "{record}"
        );
        assert_eq!(
            record["responsePayload"]["errorMessage"],
            message.as_str(),
            "{record}"
        );
        let attempts = record["sluice"]["attempts"]
            .as_array()
            .expect("sluice.attempts");
        assert_eq!(attempts.len(), tries, "{record}");
        for attempt in attempts {
            assert_eq!(attempt["errorType"], TEST_ERROR_TYPE, "{record}");
            assert_eq!(attempt["errorMessage"], message.as_str(), "{record}");
        }
    }
    assert!(
        !sluice.dir().join("ok.jsonl").exists(),
        "a failed event has no success record"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_older_than_max_event_age_is_dead_lettered_without_running() {
    // The shortest maximum age Lambda allows is a minute: rather than wait for one, queue
    // events that arrived two minutes ago into the state before Sluice starts.
    let name = unique_name("aged");
    let dir = Sluice::new_dir();
    let now = now_ms();
    let queued = |id: &str, received_at_ms: i64, attempts: Vec<AttemptRecord>| QueuedEvent {
        id: id.to_string(),
        function: name.clone(),
        qualifier: None,
        payload: json!({"action": "echo", "id": id}).to_string().into_bytes(),
        trace_id: "Root=1-00000000-000000000000000000000000;Parent=0000000000000000;Sampled=0"
            .into(),
        received_at_ms,
        next_attempt_ms: now,
        attempts,
    };
    let failed_once = AttemptRecord {
        time: "2026-01-01T00:00:00.000Z".into(),
        executed_version: "$LATEST".into(),
        error_type: Some(TEST_ERROR_TYPE.into()),
        error_message: Some("the first try failed".into()),
        duration_ms: 1.0,
    };
    {
        let store = SqliteStore::open(&Sluice::state_file(dir.path()))
            .await
            .expect("state");
        store
            .apply(
                &[
                    queued("stale", now - 120_000, Vec::new()),
                    queued("stale-retry", now - 120_000, vec![failed_once]),
                    queued("fresh", now, Vec::new()),
                ],
                &[],
            )
            .await
            .expect("enqueue");
    }
    let function = Function::rust(&name)
        .set("max_event_age", "60s")
        .set("retry_delay", "0s")
        .set("on_success", "ok")
        .set("on_failure", "dlq");
    let sluice = Sluice::start_in(dir, &[function], DEAD_LETTERS).await;
    let dead = wait_for_lines(&sluice.dir().join("dlq.jsonl"), 2, ASYNC_LIMIT).await;
    let ok = wait_for_lines(&sluice.dir().join("ok.jsonl"), 1, ASYNC_LIMIT).await;
    for (id, tries) in [("stale", 0), ("stale-retry", 1)] {
        let record = dead
            .iter()
            .find(|r| r["requestContext"]["requestId"] == id)
            .unwrap_or_else(|| panic!("no dead letter for {id}: {dead:?}"));
        assert_eq!(
            record["requestContext"]["condition"], "EventAgeExceeded",
            "{record}"
        );
        assert_eq!(
            record["requestContext"]["approximateInvokeCount"], tries,
            "{record}"
        );
        assert_eq!(record["requestPayload"]["id"], id, "{record}");
    }
    let retried = dead
        .iter()
        .find(|r| r["requestContext"]["requestId"] == "stale-retry")
        .expect("stale-retry");
    assert_eq!(
        retried["sluice"]["attempts"][0]["errorMessage"], "the first try failed",
        "{retried}"
    );
    let ran: Vec<&Value> = ok
        .iter()
        .map(|r| &r["requestContext"]["requestId"])
        .collect();
    assert_eq!(ran, [&json!("fresh")], "only the fresh event runs");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_event_waits_for_capacity_and_spends_no_retries() {
    let name = unique_name("async-throttled");
    let function = Function::rust(&name)
        .set("reserved_concurrency", "0")
        .set("max_retry_attempts", "0")
        .set("retry_delay", "0s")
        .set("on_success", "ok")
        .set("on_failure", "dlq");
    let sluice = Sluice::start_with(&[function], DEAD_LETTERS).await;
    let out = boto3(&sluice, &[event(&name, &json!({"action": "echo"}))]).await;
    assert_eq!(out[0]["StatusCode"], 202, "{}", out[0]);
    let id = out[0]["ResponseMetadata"]["RequestId"]
        .as_str()
        .expect("RequestId")
        .to_string();
    // Reserved 0: the event waits, neither run nor given up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        json_lines(&sluice.dir().join("ok.jsonl")),
        Vec::<Value>::new()
    );
    assert_eq!(
        json_lines(&sluice.dir().join("dlq.jsonl")),
        Vec::<Value>::new()
    );
    let out = boto3(&sluice, &[reserve(&name, 5)]).await;
    assert_eq!(out[0]["ReservedConcurrentExecutions"], 5, "{}", out[0]);
    let ok = wait_for_lines(&sluice.dir().join("ok.jsonl"), 1, ASYNC_LIMIT).await;
    assert_eq!(
        ok[0]["requestContext"]["requestId"],
        id.as_str(),
        "{}",
        ok[0]
    );
    assert_eq!(
        ok[0]["requestContext"]["approximateInvokeCount"], 1,
        "{}",
        ok[0]
    );
    assert_eq!(
        json_lines(&sluice.dir().join("dlq.jsonl")),
        Vec::<Value>::new(),
        "never dead-lettered"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn events_of_a_function_removed_from_the_config_are_reported_kept_and_delivered_once_it_returns()
 {
    let logs = Logs::default();
    let _logging = logs.capture();
    let name = unique_name("async-orphan");
    let bystander = unique_name("async-bystander");
    // Reserved 0: the events wait in the queue, neither run nor given up.
    let held = Function::rust(&name).set("reserved_concurrency", "0");
    let sluice = Sluice::start_with(&[held, Function::rust(&bystander)], DEAD_LETTERS).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let accepted = sluice
            .invoke_with(
                &name,
                &json!({"action": "echo", "n": i}),
                &[("X-Amz-Invocation-Type", "Event")],
            )
            .await;
        assert_eq!(accepted.status, 202, "{}", accepted.text());
        ids.push(accepted.header("x-amzn-requestid").expect("a request id"));
    }

    // The function is gone from the file; its events are not.
    let sluice = sluice
        .restart(&[Function::rust(&bystander)], DEAD_LETTERS)
        .await;
    let line = logs
        .wait_for_line(&format!("function={name}"), ASYNC_LIMIT)
        .await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("events=3"), "{line}");
    let label = format!("function=\"{name}\"");
    assert_eq!(
        sluice
            .metric("sluice_async_orphaned_events", &[&label])
            .await,
        3.0
    );
    // Longer than a worker would take to run or drop them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let store = SqliteStore::open(&Sluice::state_file(sluice.dir()))
        .await
        .expect("state");
    let kept = store.due(&name, i64::MAX, 10).await.expect("queued events");
    assert_eq!(kept.len(), 3, "{kept:?}");
    drop(store);

    // Declared again, it gets them.
    let back = Function::rust(&name).set("on_success", "ok");
    let sluice = sluice
        .restart(&[back, Function::rust(&bystander)], DEAD_LETTERS)
        .await;
    let ok = wait_for_lines(&sluice.dir().join("ok.jsonl"), 3, ASYNC_LIMIT).await;
    let mut delivered: Vec<&str> = ok
        .iter()
        .filter_map(|r| r["requestContext"]["requestId"].as_str())
        .collect();
    delivered.sort_unstable();
    ids.sort();
    assert_eq!(delivered, ids, "{ok:?}");
    sluice.shutdown().await;
}

/// A webhook source for `function` at `path`.
fn webhook(source: &str, function: &str, path: &str, invocation: &str) -> String {
    format!(
        "sources:\n  {}:\n    type: http\n    function: {}\n    path: {}\n    invocation: {invocation}\n    methods: [POST, PUT]\n",
        quoted(source),
        quoted(function),
        quoted(path),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_webhook_delivers_a_function_url_event_and_answers_with_the_function_response() {
    let name = unique_name("hook-sync");
    let dir = Sluice::new_dir();
    let seen = dir.path().join("seen.jsonl");
    let function = recorder(&name, dir.path(), &seen);
    let path = format!("/hooks/{name}");
    let sluice = Sluice::start_in(dir, &[function], &webhook(&name, &name, &path, "sync")).await;
    let response = sluice
        .http
        .put(format!("{}{path}?colour=blue", sluice.url))
        .header("x-test", "yes")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .expect("webhook");
    assert_eq!(response.status(), 201, "the function's statusCode");
    assert_eq!(
        response
            .headers()
            .get("x-recorder")
            .and_then(|v| v.to_str().ok()),
        Some("yes"),
        "the function's headers"
    );
    let body: Value = response.json().await.expect("the function's body is JSON");
    assert_eq!(
        body,
        json!({"method": "PUT", "path": path, "body": r#"{"n":1}"#})
    );
    let seen = json_lines(&seen);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let event = &seen[0]["event"];
    assert_eq!(event["version"], "2.0", "{event}");
    assert_eq!(event["rawPath"], path.as_str(), "{event}");
    assert_eq!(event["rawQueryString"], "colour=blue", "{event}");
    assert_eq!(
        event["queryStringParameters"],
        json!({"colour": "blue"}),
        "{event}"
    );
    assert_eq!(event["headers"]["x-test"], "yes", "{event}");
    assert_eq!(event["requestContext"]["http"]["method"], "PUT", "{event}");
    assert_eq!(event["isBase64Encoded"], false, "{event}");
    let not_allowed = sluice
        .http
        .get(format!("{}{path}", sluice.url))
        .send()
        .await
        .expect("webhook GET");
    assert_eq!(
        not_allowed.status(),
        405,
        "GET is not among the source's methods"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_webhook_answers_202_and_the_function_receives_the_event() {
    let name = unique_name("hook-async");
    let dir = Sluice::new_dir();
    let seen = dir.path().join("seen.jsonl");
    let function = recorder(&name, dir.path(), &seen).set("on_success", "ok");
    let path = format!("/hooks/{name}");
    let extra = format!("{}{DEAD_LETTERS}", webhook(&name, &name, &path, "async"));
    let sluice = Sluice::start_in(dir, &[function], &extra).await;
    let response = sluice
        .http
        .post(format!("{}{path}", sluice.url))
        .body("order 7")
        .send()
        .await
        .expect("webhook");
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.expect("JSON");
    let id = accepted["requestId"]
        .as_str()
        .expect("requestId")
        .to_string();
    let seen = wait_for_lines(&seen, 1, ASYNC_LIMIT).await;
    assert_eq!(seen[0]["request_id"], id.as_str(), "{seen:?}");
    assert_eq!(seen[0]["event"]["body"], "order 7", "{seen:?}");
    assert_eq!(
        seen[0]["event"]["requestContext"]["http"]["method"], "POST",
        "{seen:?}"
    );
    let ok = wait_for_lines(&sluice.dir().join("ok.jsonl"), 1, ASYNC_LIMIT).await;
    assert_eq!(
        ok[0]["requestContext"]["requestId"],
        id.as_str(),
        "{}",
        ok[0]
    );
    assert_eq!(ok[0]["responsePayload"]["statusCode"], 201, "{}", ok[0]);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_schedule_invokes_the_function_with_scheduled_events() {
    let name = unique_name("scheduled");
    let dir = Sluice::new_dir();
    let seen = dir.path().join("seen.jsonl");
    let function = recorder(&name, dir.path(), &seen);
    let source = unique_name("tick");
    let extra = format!(
        "sources:\n  {}:\n    type: schedule\n    function: {}\n    rate: 1 second\n",
        quoted(&source),
        quoted(&name)
    );
    let sluice = Sluice::start_in(dir, &[function], &extra).await;
    let seen = wait_for_lines(&seen, 2, ASYNC_LIMIT).await;
    for tick in &seen {
        let event = &tick["event"];
        assert_eq!(event["source"], "aws.events", "{event}");
        assert_eq!(event["detail-type"], "Scheduled Event", "{event}");
        assert!(
            event["resources"][0]
                .as_str()
                .is_some_and(|r| r.ends_with(&format!(":rule/{source}"))),
            "{event}"
        );
    }
    assert_ne!(
        seen[0]["event"]["id"], seen[1]["event"]["id"],
        "each tick is its own event"
    );
    sluice.shutdown().await;
}
