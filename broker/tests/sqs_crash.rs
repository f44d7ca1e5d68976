//! An SQS mapping across a crash, with the `sluice` binary: killed (SIGKILL) while it reads a
//! queue of hundreds of messages and restarted, it loses none of them. A message is deleted
//! only once the function has succeeded, so what was in flight at the kill reappears after
//! its visibility timeout and runs again.
//!
//! The queue is in moto_server at `SLUICE_TEST_MOTO` (scripts/test starts one). This crate has
//! no AWS SDK, so the test speaks SQS's JSON protocol to moto itself with reqwest.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Server, bootstrap, free_port, start, write};
use serde_json::{Value, json};

/// Appends `{"id", "body"}` to `$SEEN` for every message of a batch, then succeeds.
const RECORDING_FUNCTION: &str = r#"#!/usr/bin/env python3
import json, os, time, urllib.request
API = f"http://{os.environ['AWS_LAMBDA_RUNTIME_API']}/2018-06-01/runtime"
while True:
    with urllib.request.urlopen(f"{API}/invocation/next") as r:
        rid = r.headers["Lambda-Runtime-Aws-Request-Id"]; event = json.loads(r.read())
    with open(os.environ["SEEN"], "a") as f:
        for record in event["Records"]:
            f.write(json.dumps({"id": record["messageId"], "body": record["body"]}) + "\n")
    time.sleep(0.05)
    request = urllib.request.Request(f"{API}/invocation/{rid}/response", data=b"{}", method="POST")
    urllib.request.urlopen(request).close()
"#;

const MESSAGES: usize = 400;
const BATCH: usize = 10;
/// The mapping's pollers: with the batch size, what a kill can catch in flight.
const POLLERS: usize = 4;
const LIMIT: Duration = Duration::from_secs(120);

fn moto() -> String {
    std::env::var("SLUICE_TEST_MOTO").unwrap_or_else(|_| {
        panic!(
            "SLUICE_TEST_MOTO is not set: this test needs a moto_server. Run it with scripts/test, \
             which starts one, or start `moto_server -H 127.0.0.1 -p PORT` and set \
             SLUICE_TEST_MOTO=http://127.0.0.1:PORT"
        )
    })
}

/// One SQS call in the JSON protocol. moto tells the service from the credential scope of
/// the Authorization header and checks no signature.
async fn sqs(http: &reqwest::Client, action: &str, body: Value) -> Value {
    let response = http
        .post(moto())
        .header("X-Amz-Target", format!("AmazonSQS.{action}"))
        .header("Content-Type", "application/x-amz-json-1.0")
        .header(
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=0",
        )
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{action}: {e}"));
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert!(status.is_success(), "{action}: {status}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{action}: {e}: {text}"))
}

/// (visible, in flight) messages of the queue.
async fn counts(http: &reqwest::Client, url: &str) -> (u64, u64) {
    let out = sqs(
        http,
        "GetQueueAttributes",
        json!({"QueueUrl": url, "AttributeNames": ["All"]}),
    )
    .await;
    let count = |name: &str| {
        out["Attributes"][name]
            .as_str()
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX)
    };
    (
        count("ApproximateNumberOfMessages"),
        count("ApproximateNumberOfMessagesNotVisible"),
    )
}

/// The complete JSON lines of a file; a line still being written is left for the next look.
fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// How many times the function was given each message id.
fn seen(path: &Path) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for line in lines(path) {
        *seen
            .entry(line["id"].as_str().expect("id").to_string())
            .or_default() += 1;
    }
    seen
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < LIMIT,
            "{what} did not happen within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_sqs_message() {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let name = format!("sluice-crash-{}", uuid::Uuid::new_v4().simple());
    // A short visibility timeout, so that what the kill left in flight comes back soon.
    let url = sqs(
        &http,
        "CreateQueue",
        json!({"QueueName": name, "Attributes": {"VisibilityTimeout": "3"}}),
    )
    .await["QueueUrl"]
        .as_str()
        .expect("QueueUrl")
        .to_string();
    let mut sent = BTreeSet::new();
    for chunk in 0..MESSAGES / 10 {
        let entries: Vec<Value> = (0..10)
            .map(|i| json!({"Id": i.to_string(), "MessageBody": format!("m-{}", chunk * 10 + i)}))
            .collect();
        let out = sqs(
            &http,
            "SendMessageBatch",
            json!({"QueueUrl": url, "Entries": entries}),
        )
        .await;
        let ok = out["Successful"].as_array().expect("Successful");
        assert_eq!(ok.len(), 10, "{out}");
        sent.extend(
            ok.iter()
                .map(|m| m["MessageId"].as_str().expect("MessageId").to_string()),
        );
    }
    assert_eq!(sent.len(), MESSAGES);

    let dir = tempfile::tempdir().expect("dir");
    bootstrap(dir.path(), RECORDING_FUNCTION);
    let seen_file = dir.path().join("seen.jsonl");
    let config = write(
        dir.path(),
        "sluice.yaml",
        &format!(
            "state: sqlite://./data/state.db
functions:
  recorder:
    package: ./fn
    timeout: 3s
    environment: {{SEEN: {seen}}}
sources:
  queue:
    type: sqs
    function: recorder
    queue_url: {url}
    endpoint_url: {endpoint}
    region: us-east-1
    batch: {{size: {BATCH}}}
    maximum_concurrency: {POLLERS}
",
            seen = Value::from(seen_file.to_string_lossy()),
            url = Value::from(url.as_str()),
            endpoint = Value::from(moto()),
        ),
    );
    let mut server: Server = start(&config, free_port());
    wait_until("60 messages delivered before the kill", async || {
        seen(&seen_file).len() >= 60
    })
    .await;
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(10));
    let before = seen(&seen_file);
    assert!(
        before.len() < MESSAGES,
        "every message was done before the kill; the test proves nothing"
    );
    assert!(
        counts(&http, &url).await != (0, 0),
        "the queue still holds messages at the kill"
    );

    let _server = start(&config, free_port());
    wait_until("every message delivered", async || {
        let got = seen(&seen_file);
        sent.iter().all(|id| got.contains_key(id))
    })
    .await;
    wait_until("an empty queue", async || {
        counts(&http, &url).await == (0, 0)
    })
    .await;

    let seen = seen(&seen_file);
    let strangers: Vec<&String> = seen.keys().filter(|id| !sent.contains(*id)).collect();
    assert!(
        strangers.is_empty(),
        "ids that were never sent: {strangers:?}"
    );
    // At least once; repeats for what the kill caught in flight, and a few more: moto now and
    // then hands one message to two pollers that receive at the same instant.
    let repeats: usize = seen.values().map(|n| n - 1).sum();
    let in_flight = POLLERS * BATCH;
    assert!(
        repeats <= 2 * in_flight,
        "{repeats} repeated deliveries after one kill with at most {in_flight} messages in flight"
    );
}
