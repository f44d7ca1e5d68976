//! A Kinesis mapping across a crash, with the `sluice` binary: killed (SIGKILL) while it reads
//! a stream of hundreds of records and restarted on the same state, it resumes each shard right
//! after its checkpoint, loses nothing, and repeats at most the round that was in flight.
//!
//! The stream is in moto_server at `SLUICE_TEST_MOTO` (scripts/test starts one). This crate has
//! no AWS SDK, so the test speaks Kinesis's JSON protocol to moto itself with reqwest.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::{Server, bootstrap, free_port, start, write};
use serde_json::{Value, json};

/// Appends `{"shard", "seq"}` to `$SEEN` for every record of a batch, then succeeds.
const RECORDING_FUNCTION: &str = r#"#!/usr/bin/env python3
import json, os, time, urllib.request
API = f"http://{os.environ['AWS_LAMBDA_RUNTIME_API']}/2018-06-01/runtime"
while True:
    with urllib.request.urlopen(f"{API}/invocation/next") as r:
        rid = r.headers["Lambda-Runtime-Aws-Request-Id"]; event = json.loads(r.read())
    with open(os.environ["SEEN"], "a") as f:
        for record in event["Records"]:
            shard = record["eventID"].split(":")[0]
            f.write(json.dumps({"shard": shard, "seq": record["kinesis"]["sequenceNumber"]}) + "\n")
    time.sleep(0.02)
    request = urllib.request.Request(f"{API}/invocation/{rid}/response", data=b"{}", method="POST")
    urllib.request.urlopen(request).close()
"#;

const RECORDS: usize = 400;
const SHARDS: usize = 2;
const BATCH: usize = 10;
const PARALLELIZATION: usize = 2;
const SOURCE: &str = "stream";
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

/// One Kinesis call in the JSON protocol. moto tells the service from the credential scope of
/// the Authorization header and checks no signature.
async fn kinesis(http: &reqwest::Client, action: &str, body: Value) -> Value {
    let response = http
        .post(moto())
        .header("X-Amz-Target", format!("Kinesis_20131202.{action}"))
        .header("Content-Type", "application/x-amz-json-1.1")
        .header(
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/kinesis/aws4_request, SignedHeaders=host, Signature=0",
        )
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{action}: {e}"));
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert!(status.is_success(), "{action}: {status}: {text}");
    if text.trim().is_empty() {
        return Value::Null;
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{action}: {e}: {text}"))
}

/// The complete JSON lines of a file; a line still being written is left for the next look.
fn lines(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display()));
            let field = |k: &str| v[k].as_str().expect("a string").to_string();
            (field("shard"), field("seq"))
        })
        .collect()
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < LIMIT,
            "{what} did not happen within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each shard's checkpointed sequence number.
async fn checkpoints(state: &str) -> BTreeMap<String, Option<String>> {
    let store =
        sluice::state::open_with(state, Path::new("."), sluice::state::OpenOptions::INSPECT)
            .await
            .expect("open the state");
    let mut at = BTreeMap::new();
    for shard in 0..SHARDS {
        let shard = format!("shardId-{shard:012}");
        let checkpoint = store
            .checkpoint(SOURCE, &shard)
            .await
            .expect("read a checkpoint");
        at.insert(shard, checkpoint.and_then(|c| c.sequence));
    }
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_resumes_each_shard_from_its_checkpoint_without_loss() {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let name = format!("sluice-crash-{}", uuid::Uuid::new_v4().simple());
    kinesis(
        &http,
        "CreateStream",
        json!({"StreamName": name, "ShardCount": SHARDS}),
    )
    .await;
    // Each shard's sequence numbers, in put order.
    let mut put: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for chunk in 0..RECORDS / 100 {
        let records: Vec<Value> = (0..100)
            .map(|i| {
                let n = chunk * 100 + i;
                json!({"Data": B64.encode(format!("r-{n}")), "PartitionKey": format!("key-{}", n % 16)})
            })
            .collect();
        let out = kinesis(
            &http,
            "PutRecords",
            json!({"StreamName": name, "Records": records}),
        )
        .await;
        assert_eq!(out["FailedRecordCount"], 0, "{out}");
        for r in out["Records"].as_array().expect("Records") {
            let field = |k: &str| r[k].as_str().expect(k).to_string();
            put.entry(field("ShardId"))
                .or_default()
                .push(field("SequenceNumber"));
        }
    }
    assert_eq!(put.len(), SHARDS, "the keys spread over every shard");
    let sent: BTreeSet<(String, String)> = put
        .iter()
        .flat_map(|(shard, seqs)| seqs.iter().map(|s| (shard.clone(), s.clone())))
        .collect();
    assert_eq!(sent.len(), RECORDS);

    let dir = tempfile::tempdir().expect("dir");
    bootstrap(dir.path(), RECORDING_FUNCTION);
    let seen_file = dir.path().join("seen.jsonl");
    let state = format!("sqlite://{}", dir.path().join("data/state.db").display());
    let config = write(
        dir.path(),
        "sluice.yaml",
        &format!(
            "state: sqlite://./data/state.db
functions:
  recorder:
    package: ./fn
    timeout: 10s
    environment: {{SEEN: {seen}}}
sources:
  {SOURCE}:
    type: kinesis
    function: recorder
    stream: {name}
    endpoint_url: {endpoint}
    region: us-east-1
    batch: {{size: {BATCH}}}
    parallelization: {PARALLELIZATION}
",
            seen = Value::from(seen_file.to_string_lossy()),
            name = Value::from(name.as_str()),
            endpoint = Value::from(moto()),
        ),
    );
    let mut server: Server = start(&config, free_port());
    wait_until("80 records delivered before the kill", async || {
        lines(&seen_file).len() >= 80
    })
    .await;
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(10));
    // The function outlives its broker by at most the batch it was running.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = lines(&seen_file);
    let at_kill = checkpoints(&state).await;
    let delivered: BTreeSet<&(String, String)> = before.iter().collect();
    assert!(
        delivered.len() < RECORDS,
        "every record was done before the kill; the test proves nothing"
    );
    assert!(
        at_kill.values().any(Option::is_some),
        "nothing was checkpointed before the kill: {at_kill:?}"
    );

    let _server = start(&config, free_port());
    wait_until("every record delivered", async || {
        let got: BTreeSet<(String, String)> = lines(&seen_file).into_iter().collect();
        sent.is_subset(&got)
    })
    .await;
    wait_until("each shard checkpointed to its last record", async || {
        let at = checkpoints(&state).await;
        put.iter()
            .all(|(shard, seqs)| at.get(shard).cloned().flatten().as_ref() == seqs.last())
    })
    .await;

    let all = lines(&seen_file);
    let strangers: Vec<_> = all.iter().filter(|r| !sent.contains(*r)).collect();
    assert!(
        strangers.is_empty(),
        "records that were never put: {strangers:?}"
    );
    // The second run read each shard from right after its checkpoint, each record once.
    let after = &all[before.len()..];
    for (shard, seqs) in &put {
        let from = match &at_kill[shard] {
            Some(seq) => {
                seqs.iter()
                    .position(|s| s == seq)
                    .expect("a checkpoint of a put record")
                    + 1
            }
            None => 0,
        };
        let mut resumed: Vec<&String> = after
            .iter()
            .filter(|(s, _)| s == shard)
            .map(|(_, seq)| seq)
            .collect();
        let count = resumed.len();
        resumed.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
        resumed.dedup();
        assert_eq!(
            count,
            resumed.len(),
            "{shard}: the second run repeated records"
        );
        assert_eq!(
            resumed,
            seqs[from..].iter().collect::<Vec<_>>(),
            "{shard}: the second run's records"
        );
    }
    // Repeated: what the first run delivered past a checkpoint, at most one round per shard.
    let repeats = all.len() - RECORDS;
    assert!(
        repeats <= BATCH * PARALLELIZATION * SHARDS,
        "{repeats} repeated deliveries after one kill, with rounds of {} records on {SHARDS} shards",
        BATCH * PARALLELIZATION
    );
}
