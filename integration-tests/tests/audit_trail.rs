//! The audit trail as an operator reads it after real clients used the API: boto3's
//! management calls, a refused call and an unsupported one each leave one CloudTrail-style
//! event, with the request id boto3 was answered with, in the JSON Lines file and in the state
//! store; allowed invocations leave none; nothing secret is written; the file rotates.

mod common;

use std::time::Duration;

use common::{Function, Sluice, boto3_calls, json_lines, wait_for_lines};
use serde_json::{Value, json};
use sluice_integration_tests::unique_name;

const WRITE_LIMIT: Duration = Duration::from_secs(10);

fn call(op: &str, args: Value) -> Value {
    json!({"op": op, "args": args})
}

/// Every audit event in the state store of `sluice`, read as `sluice audit` reads it.
async fn stored_events(
    sluice: &Sluice,
) -> Result<Vec<sluice::state::AuditRecord>, sluice::state::StateError> {
    let state = format!("sqlite://{}", Sluice::state_file(sluice.dir()).display());
    let query = sluice::state::AuditQuery {
        limit: 1_000,
        ..Default::default()
    };
    sluice::state::audit_events(&state, sluice.dir(), &query).await
}

fn names(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["eventName"].as_str().unwrap_or("?"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_and_refusals_are_recorded_once_each_without_secrets() {
    let name = unique_name("audited");
    let function = Function::rust(&name).set("environment", "{DB_PASSWORD: env-s3cr3t-value}");
    let sluice = Sluice::start_in(
        Sluice::new_dir(),
        &[function],
        "audit:\n  path: audit.jsonl\n",
    )
    .await;
    let results = boto3_calls(
        &sluice,
        &[
            call(
                "publish_version",
                json!({"FunctionName": name, "Description": "first"}),
            ),
            call(
                "create_alias",
                json!({"FunctionName": name, "Name": "live", "FunctionVersion": "1"}),
            ),
            call(
                "update_alias",
                json!({"FunctionName": name, "Name": "live", "Description": "moved"}),
            ),
            call(
                "put_function_concurrency",
                json!({"FunctionName": name, "ReservedConcurrentExecutions": 5}),
            ),
            call("get_function", json!({"FunctionName": name})),
            call(
                "invoke",
                json!({"FunctionName": name, "Payload": "{\"action\":\"echo\"}"}),
            ),
            call(
                "put_function_concurrency",
                json!({"FunctionName": "no-such-function", "ReservedConcurrentExecutions": 1}),
            ),
        ],
    )
    .await;
    assert_eq!(results[5]["StatusCode"], 200, "{}", results[5]);
    assert_eq!(
        results[6]["exception"], "ResourceNotFoundException",
        "{}",
        results[6]
    );
    // A body with secrets in it, as a careless client could send, and a path Sluice does not
    // serve.
    let secret_body = json!({
        "Description": "by hand",
        "Environment": {"Variables": {"K": "body-env-s3cr3t"}},
        "AuthToken": "body-t0ken",
    });
    sluice
        .http
        .post(format!(
            "{}/2015-03-31/functions/{name}/versions",
            sluice.url
        ))
        .body(secret_body.to_string())
        .send()
        .await
        .expect("publish by hand");
    let unsupported = sluice
        .http
        .post(format!("{}/2015-03-31/functions/{name}/url", sluice.url))
        .send()
        .await
        .expect("unsupported");
    assert_eq!(unsupported.status(), 400);

    let file = sluice.dir().join("audit.jsonl");
    let events = wait_for_lines(&file, 9, WRITE_LIMIT).await;
    // Had the invocation been recorded, it would be here by now too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = if json_lines(&file).len() > events.len() {
        json_lines(&file)
    } else {
        events
    };
    assert_eq!(
        names(&events),
        [
            "LoadConfiguration",
            "PublishVersion",
            "CreateAlias",
            "UpdateAlias",
            "PutFunctionConcurrency",
            "GetFunction",
            "PutFunctionConcurrency",
            "PublishVersion",
            "UnsupportedOperation",
        ]
    );
    let publish = &events[1];
    assert_eq!(publish["eventSource"], "lambda.amazonaws.com");
    assert_eq!(publish["awsRegion"], "us-east-1");
    assert_eq!(publish["sourceIPAddress"], "127.0.0.1");
    assert!(
        publish["userAgent"]
            .as_str()
            .is_some_and(|ua| ua.contains("Boto3")),
        "{publish}"
    );
    assert_eq!(publish["userIdentity"]["type"], "Anonymous");
    assert_eq!(
        publish["requestID"], results[0]["ResponseMetadata"]["RequestId"],
        "the event carries the request id boto3 was answered with"
    );
    assert_eq!(publish["requestParameters"]["functionName"], name.as_str());
    assert_eq!(publish["requestParameters"]["Description"], "first");
    assert_eq!(publish["responseElements"]["Version"], "1");
    assert_eq!(events[3]["requestParameters"]["name"], "live");
    assert_eq!(
        events[4]["requestParameters"]["ReservedConcurrentExecutions"],
        5
    );
    let refused = &events[6];
    assert_eq!(refused["errorCode"], "ResourceNotFoundException");
    assert!(
        refused["errorMessage"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert_eq!(refused["responseElements"]["status"], 404);
    assert_eq!(events[7]["requestParameters"]["AuthToken"], "***");
    assert_eq!(
        events[7]["requestParameters"]["Environment"]["Variables"]["K"],
        "***"
    );
    assert_eq!(events[8]["errorCode"], "UnsupportedOperationException");
    assert_eq!(events[8]["requestParameters"]["method"], "POST");

    let text = std::fs::read_to_string(&file).expect("audit file");
    for secret in ["env-s3cr3t-value", "body-env-s3cr3t", "body-t0ken"] {
        assert!(!text.contains(secret), "{secret} is in the audit file");
    }

    // The store holds the same events, for `sluice audit`.
    let stored = stored_events(&sluice).await.expect("read the store");
    let ids = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .map(|e| e["eventID"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let stored: Vec<Value> = stored
        .iter()
        .map(|r| serde_json::from_str(&r.event).expect("JSON"))
        .collect();
    let mut in_store = ids(&stored);
    let mut in_file = ids(&events);
    in_store.sort();
    in_file.sort();
    assert_eq!(in_store, in_file);
    for secret in ["env-s3cr3t-value", "body-env-s3cr3t", "body-t0ken"] {
        assert!(
            stored.iter().all(|e| !e.to_string().contains(secret)),
            "{secret} is in the store"
        );
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_file_rotates_at_its_size_and_keeps_max_files() {
    let name = unique_name("rotated");
    let sluice = Sluice::start_in(
        Sluice::new_dir(),
        &[Function::rust(&name)],
        "audit:\n  path: logs/audit.jsonl\n  max_file_size: 4KiB\n  max_files: 2\n",
    )
    .await;
    let calls: Vec<Value> = (0..30)
        .map(|_| call("get_function", json!({"FunctionName": name})))
        .collect();
    boto3_calls(&sluice, &calls).await;
    let file = sluice.dir().join("logs/audit.jsonl");
    let rotated = |n: u32| sluice.dir().join(format!("logs/audit.jsonl.{n}"));
    common::wait_until("31 events in the store", WRITE_LIMIT, async || {
        stored_events(&sluice)
            .await
            .is_ok_and(|events| events.len() == 31)
    })
    .await;
    for path in [file.clone(), rotated(1), rotated(2)] {
        let size = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .len();
        assert!(size <= 4096, "{} is {size} bytes", path.display());
        assert!(!json_lines(&path).is_empty(), "{}", path.display());
    }
    assert!(
        !rotated(3).exists(),
        "only max_files rotated files are kept"
    );
    // The newest file ends with the last call; the files follow each other in time.
    let newest = json_lines(&file);
    let older = json_lines(&rotated(1));
    assert!(older.last().expect("events")["eventTime"].as_str() <= newest[0]["eventTime"].as_str());
    sluice.shutdown().await;
}
