//! Kinesis mappings end to end: streams in moto_server (at `SLUICE_TEST_MOTO`; `scripts/test`
//! starts one) read by a Sluice started in-process into a native function that records what
//! it is given and answers as each test tells it.
//!
//! Every test uses its own stream (and queue, and state), so that they can share one
//! moto_server. moto routes a record to the first shard whose hash range holds its key, open
//! or not: after a SplitShard the closed parent keeps every record and its children get none,
//! so the split test puts its records before the split.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::{StatefulSluice, moto_url, new_postgres_database, quoted, start_on_state};
use serde_json::{Value, json};
use sluice::state::Checkpoint;
use sluice::{FunctionError, NativeRegistry};
use sluice_integration_tests::unique_name;

const REGION: &str = "us-east-1";
/// How long a test waits for something before it fails.
const PATIENCE: Duration = Duration::from_secs(60);
/// The function every test maps its stream to.
const FUNCTION: &str = "consumer";
/// The source every test declares, unless it needs a name of its own in the shared metrics.
const SOURCE: &str = "stream";

fn credentials() -> Credentials {
    Credentials::new("testing", "testing", None, None, "tests")
}

fn kinesis() -> aws_sdk_kinesis::Client {
    aws_sdk_kinesis::Client::from_conf(
        aws_sdk_kinesis::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(moto_url())
            .region(Region::new(REGION))
            .credentials_provider(credentials())
            .build(),
    )
}

fn sqs() -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .endpoint_url(moto_url())
            .region(aws_sdk_sqs::config::Region::new(REGION))
            .credentials_provider(credentials())
            .build(),
    )
}

/// One record as put: where it landed and what it holds.
#[derive(Debug, Clone)]
struct Put {
    shard: String,
    seq: String,
    key: String,
    data: String,
}

/// One stream in moto, and the test's own client for it.
struct Stream {
    client: aws_sdk_kinesis::Client,
    name: String,
    arn: String,
}

impl Stream {
    async fn create(shards: i32) -> Stream {
        let client = kinesis();
        let name = unique_name("sluice-kinesis");
        client
            .create_stream()
            .stream_name(&name)
            .shard_count(shards)
            .send()
            .await
            .unwrap_or_else(|e| panic!("create stream {name}: {e:?}"));
        let arn = client
            .describe_stream_summary()
            .stream_name(&name)
            .send()
            .await
            .expect("describe the stream")
            .stream_description_summary()
            .map(|s| s.stream_arn().to_string())
            .expect("a stream ARN");
        Stream { client, name, arn }
    }

    /// Puts `(partition key, data)` pairs in order, 500 to a call; answers where each landed.
    async fn put_all(&self, records: &[(String, String)]) -> Vec<Put> {
        self.put_entries(records, None).await
    }

    /// [`Stream::put_all`] with an explicit hash key, which picks the shard.
    async fn put_hashed(&self, records: &[(String, String)], hash_key: &str) -> Vec<Put> {
        self.put_entries(records, Some(hash_key)).await
    }

    async fn put_entries(&self, records: &[(String, String)], hash_key: Option<&str>) -> Vec<Put> {
        let mut puts = Vec::with_capacity(records.len());
        for chunk in records.chunks(500) {
            let entries = chunk
                .iter()
                .map(|(key, data)| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(key)
                        .data(Blob::new(data.as_bytes()))
                        .set_explicit_hash_key(hash_key.map(str::to_string))
                        .build()
                        .expect("entry")
                })
                .collect::<Vec<_>>();
            let out = self
                .client
                .put_records()
                .stream_name(&self.name)
                .set_records(Some(entries))
                .send()
                .await
                .expect("put records");
            assert_eq!(out.records().len(), chunk.len());
            for ((key, data), result) in chunk.iter().zip(out.records()) {
                assert_eq!(result.error_code(), None, "{result:?}");
                puts.push(Put {
                    shard: result.shard_id().expect("a shard").to_string(),
                    seq: result
                        .sequence_number()
                        .expect("a sequence number")
                        .to_string(),
                    key: key.clone(),
                    data: data.clone(),
                });
            }
        }
        puts
    }

    /// `sources:` YAML mapping this stream to [`FUNCTION`] under the name `source`, with more
    /// settings (YAML lines under the source, already indented by four spaces).
    fn source_yaml(&self, source: &str, settings: &str) -> String {
        format!(
            "sources:\n  {}:\n    type: kinesis\n    function: {FUNCTION}\n    stream: {}\n    endpoint_url: {}\n    region: {REGION}\n{settings}",
            quoted(source),
            quoted(&self.name),
            quoted(&moto_url()),
        )
    }

    async fn shards(&self) -> Vec<aws_sdk_kinesis::types::Shard> {
        self.client
            .list_shards()
            .stream_name(&self.name)
            .send()
            .await
            .expect("list shards")
            .shards()
            .to_vec()
    }
}

/// `n` records of JSON data `{"n": i}` over `keys` partition keys.
fn numbered(n: usize, keys: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("key-{}", i % keys), json!({ "n": i }).to_string()))
        .collect()
}

/// The last sequence number put to each shard.
fn last_by_shard(puts: &[Put]) -> BTreeMap<String, String> {
    puts.iter()
        .map(|p| (p.shard.clone(), p.seq.clone()))
        .collect()
}

/// One record as the function was given it.
#[derive(Debug, Clone)]
struct Seen {
    shard: String,
    seq: String,
    key: String,
    data: String,
    /// Which invocation (in the order they started) carried it.
    invocation: usize,
    /// How many records that invocation carried.
    batch_len: usize,
    /// The whole record.
    record: Value,
}

/// What the function answers for its `n`th invocation (from 0), given its records.
type Answer = Arc<dyn Fn(usize, &[Seen]) -> Result<Value, FunctionError> + Send + Sync>;
/// How long the function takes over a batch.
type Pause = Arc<dyn Fn(&[Seen]) -> Duration + Send + Sync>;

fn succeed() -> Answer {
    Arc::new(|_, _| Ok(Value::Null))
}

fn pause(d: Duration) -> Pause {
    Arc::new(move |_| d)
}

/// The native function [`FUNCTION`]: notes every record at the start of an invocation, how
/// many invocations run at once and whether each succeeded, waits, then answers as told.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    events: Arc<Mutex<Vec<Value>>>,
    failed: Arc<Mutex<BTreeSet<usize>>>,
    invocations: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Recorder {
    fn registry(&self, pause: Pause, answer: Answer) -> NativeRegistry {
        let mut registry = NativeRegistry::new();
        let this = self.clone();
        registry.register(FUNCTION, move |event: Value, _ctx| {
            let (this, pause, answer) = (this.clone(), pause.clone(), answer.clone());
            async move {
                let running = this.running.fetch_add(1, Ordering::SeqCst) + 1;
                this.peak.fetch_max(running, Ordering::SeqCst);
                let (invocation, batch) = {
                    let mut seen = this.seen.lock().expect("seen");
                    let invocation = this.invocations.fetch_add(1, Ordering::SeqCst);
                    let batch = decode(&event, invocation);
                    seen.extend(batch.iter().cloned());
                    this.events.lock().expect("events").push(event);
                    (invocation, batch)
                };
                tokio::time::sleep(pause(&batch)).await;
                let result = answer(invocation, &batch);
                if result.is_err() {
                    this.failed.lock().expect("failed").insert(invocation);
                }
                this.running.fetch_sub(1, Ordering::SeqCst);
                result
            }
        });
        registry
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// The records of invocations that did not fail, in the order they started.
    fn succeeded(&self) -> Vec<Seen> {
        let failed = self.failed.lock().expect("failed").clone();
        self.seen()
            .into_iter()
            .filter(|s| !failed.contains(&s.invocation))
            .collect()
    }

    /// The sequence numbers of each invocation, in the order they started.
    fn invocations(&self) -> Vec<Vec<String>> {
        let mut by_invocation: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for s in self.seen() {
            by_invocation.entry(s.invocation).or_default().push(s.seq);
        }
        by_invocation.into_values().collect()
    }

    /// Waits until every one of `puts` was given to the function at least once.
    async fn wait_for_all(&self, puts: &[Put]) {
        let want: BTreeSet<(&str, &str)> = puts
            .iter()
            .map(|p| (p.shard.as_str(), p.seq.as_str()))
            .collect();
        wait_until(
            &format!("all {} records are delivered", want.len()),
            async || {
                let seen = self.seen();
                let got: BTreeSet<(&str, &str)> = seen
                    .iter()
                    .map(|s| (s.shard.as_str(), s.seq.as_str()))
                    .collect();
                want.is_subset(&got)
            },
        )
        .await;
    }
}

fn decode(event: &Value, invocation: usize) -> Vec<Seen> {
    let records = event["Records"].as_array().cloned().unwrap_or_default();
    let batch_len = records.len();
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    records
        .into_iter()
        .map(|r| Seen {
            shard: r["eventID"]
                .as_str()
                .and_then(|id| id.split_once(':'))
                .map(|(shard, _)| shard.to_string())
                .unwrap_or_default(),
            seq: text(&r["kinesis"]["sequenceNumber"]),
            key: text(&r["kinesis"]["partitionKey"]),
            data: r["kinesis"]["data"]
                .as_str()
                .and_then(|d| B64.decode(d).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default(),
            invocation,
            batch_len,
            record: r,
        })
        .collect()
}

/// YAML for the native [`FUNCTION`], to put before the sources.
fn function_yaml() -> String {
    format!("functions:\n  {FUNCTION}: {{runtime: native, timeout: 30s}}\n")
}

async fn wait_until(what: &str, done: impl AsyncFnMut() -> bool) {
    common::wait_until(what, PATIENCE, done).await;
}

/// Starts Sluice with the native [`FUNCTION`] and `yaml` (sources, dead letters) on a SQLite
/// state of its own.
async fn start(registry: NativeRegistry, yaml: &str) -> StatefulSluice {
    StatefulSluice::start(&format!("{}{yaml}", function_yaml()), registry).await
}

/// Asserts that each key's records reached the function in the order they were put, each
/// exactly once.
#[track_caller]
fn assert_key_order(puts: &[Put], seen: &[Seen]) {
    let mut put_order: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for p in puts {
        put_order.entry(&p.key).or_default().push(&p.seq);
    }
    let mut seen_order: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for s in seen {
        seen_order.entry(&s.key).or_default().push(&s.seq);
    }
    assert_eq!(
        seen_order, put_order,
        "per-key delivery order differs from put order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_every_record_once_in_lambdas_kinesis_shape_and_checkpoints_each_shard() {
    let stream = Stream::create(2).await;
    let puts = stream.put_all(&numbered(60, 7)).await;
    let last = last_by_shard(&puts);
    assert_eq!(last.len(), 2, "the keys spread over both shards: {last:?}");
    let recorder = Recorder::default();
    let sluice = start(
        recorder.registry(pause(Duration::ZERO), succeed()),
        &stream.source_yaml(SOURCE, "    batch: {size: 10}\n"),
    )
    .await;
    recorder.wait_for_all(&puts).await;
    sluice.wait_for_checkpoints(SOURCE, &last, PATIENCE).await;

    let seen = recorder.seen();
    assert_eq!(seen.len(), puts.len(), "each record exactly once");
    for shard in last.keys() {
        let put: Vec<&str> = puts
            .iter()
            .filter(|p| &p.shard == shard)
            .map(|p| p.seq.as_str())
            .collect();
        let got: Vec<&str> = seen
            .iter()
            .filter(|s| &s.shard == shard)
            .map(|s| s.seq.as_str())
            .collect();
        assert_eq!(got, put, "{shard}: delivered out of put order");
    }
    let now = now_secs();
    for p in &puts {
        let s = seen
            .iter()
            .find(|s| s.shard == p.shard && s.seq == p.seq)
            .expect("delivered");
        let r = &s.record;
        assert_eq!(r["eventSource"], "aws:kinesis", "{r}");
        assert_eq!(r["eventName"], "aws:kinesis:record", "{r}");
        assert_eq!(r["eventVersion"], "1.0", "{r}");
        assert_eq!(r["eventID"], format!("{}:{}", p.shard, p.seq), "{r}");
        assert_eq!(r["eventSourceARN"], stream.arn, "{r}");
        assert_eq!(r["awsRegion"], REGION, "{r}");
        assert!(
            r["invokeIdentityArn"]
                .as_str()
                .is_some_and(|a| a.starts_with("arn:aws:iam::")),
            "{r}"
        );
        let k = &r["kinesis"];
        assert_eq!(k["kinesisSchemaVersion"], "1.0", "{r}");
        assert_eq!(k["partitionKey"], p.key, "{r}");
        assert_eq!(k["sequenceNumber"], p.seq, "{r}");
        assert_eq!(k["data"], B64.encode(&p.data), "{r}");
        let arrival = k["approximateArrivalTimestamp"]
            .as_f64()
            .expect("a number of seconds");
        assert!(
            (now - 120.0..=now + 5.0).contains(&arrival),
            "arrival {arrival}, now {now}"
        );
    }
    let events = recorder.events.lock().expect("events").clone();
    for event in &events {
        let parsed: KinesisEvent = serde_json::from_value(event.clone())
            .unwrap_or_else(|e| panic!("not a Kinesis event ({e}): {event}"));
        assert!(
            (1..=10).contains(&parsed.records.len()),
            "batch of {}",
            parsed.records.len()
        );
        let shards: BTreeSet<&str> = parsed
            .records
            .iter()
            .filter_map(|r| r.event_id.as_deref()?.split(':').next())
            .collect();
        assert_eq!(shards.len(), 1, "a batch mixes shards: {shards:?}");
    }
    sluice.running.shutdown().await;
}

/// Seconds since the epoch, as Kinesis timestamps are.
fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_lanes_keep_each_partition_keys_order_across_the_run() {
    let stream = Stream::create(1).await;
    let mut puts = stream.put_all(&numbered(120, 8)).await;
    let recorder = Recorder::default();
    // Batches take different times, so that lanes overtake each other.
    let uneven: Pause = Arc::new(|batch: &[Seen]| {
        let n: u64 = batch.first().and_then(|s| s.seq.parse().ok()).unwrap_or(0);
        Duration::from_millis(5 + (n * 7) % 30)
    });
    let sluice = start(
        recorder.registry(uneven, succeed()),
        &stream.source_yaml(SOURCE, "    batch: {size: 5}\n    parallelization: 4\n"),
    )
    .await;
    wait_until("half the first records are delivered", async || {
        recorder.seen().len() >= 60
    })
    .await;
    // More records while the mapping runs, keys continuing where they were.
    let more: Vec<(String, String)> = (120..200)
        .map(|i| (format!("key-{}", i % 8), json!({ "n": i }).to_string()))
        .collect();
    puts.extend(stream.put_all(&more).await);
    recorder.wait_for_all(&puts).await;
    sluice
        .wait_for_checkpoints(SOURCE, &last_by_shard(&puts), PATIENCE)
        .await;

    assert_key_order(&puts, &recorder.seen());
    let peak = recorder.peak.load(Ordering::SeqCst);
    assert!(
        (2..=4).contains(&peak),
        "{peak} invocations at once with 4 lanes"
    );
    sluice.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bisect_isolates_a_poison_record_into_the_sqs_on_failure_queue_while_the_rest_advance() {
    let stream = Stream::create(1).await;
    let poison_at = 7;
    let records: Vec<(String, String)> = (0..20)
        .map(|i| {
            let data = if i == poison_at {
                json!({ "n": i, "poison": true })
            } else {
                json!({ "n": i })
            };
            (format!("key-{}", i % 3), data.to_string())
        })
        .collect();
    let puts = stream.put_all(&records).await;
    let poison = puts[poison_at].clone();
    let sqs = sqs();
    let queue_url = sqs
        .create_queue()
        .queue_name(unique_name("sluice-kinesis-dlq"))
        .send()
        .await
        .expect("create the on-failure queue")
        .queue_url()
        .expect("a queue URL")
        .to_string();

    let recorder = Recorder::default();
    let answer: Answer = Arc::new(|_, batch: &[Seen]| {
        if batch.iter().any(|s| s.data.contains("poison")) {
            Err(FunctionError::new(
                "PoisonError",
                "cannot digest this record",
            ))
        } else {
            Ok(Value::Null)
        }
    });
    let yaml = format!(
        "{}dead_letters:\n  dlq: {{type: sqs, queue_url: {}, endpoint_url: {}, region: {REGION}}}\n",
        stream.source_yaml(
            SOURCE,
            "    batch: {size: 10}\n    bisect_on_error: true\n    retry: {max_attempts: 2}\n    on_failure: dlq\n"
        ),
        quoted(&queue_url),
        quoted(&moto_url()),
    );
    let sluice = start(recorder.registry(pause(Duration::ZERO), answer), &yaml).await;
    sluice
        .wait_for_checkpoints(SOURCE, &last_by_shard(&puts), PATIENCE)
        .await;

    // The rest advanced: every other record succeeded once, in order.
    let healthy: Vec<Put> = puts
        .iter()
        .filter(|p| p.seq != poison.seq)
        .cloned()
        .collect();
    let succeeded = recorder.succeeded();
    assert_eq!(
        succeeded.iter().map(|s| s.seq.as_str()).collect::<Vec<_>>(),
        healthy.iter().map(|p| p.seq.as_str()).collect::<Vec<_>>(),
        "the healthy records, each once and in order"
    );
    // Halved down to the poison record alone, which then used its three attempts.
    let poisoned: Vec<usize> = recorder
        .seen()
        .iter()
        .filter(|s| s.seq == poison.seq)
        .map(|s| s.batch_len)
        .collect();
    assert_eq!(
        poisoned,
        [10, 5, 3, 1, 1, 1],
        "sizes of the batches that held the poison record"
    );

    let mut messages = Vec::new();
    let started = Instant::now();
    while messages.is_empty() {
        assert!(
            started.elapsed() < PATIENCE,
            "nothing reached the on-failure queue"
        );
        messages = sqs
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("receive")
            .messages()
            .to_vec();
    }
    assert_eq!(messages.len(), 1, "{messages:?}");
    let failure: Value = serde_json::from_str(messages[0].body().expect("a body"))
        .expect("a JSON on-failure record");
    assert_eq!(
        failure["requestContext"]["condition"], "RetryAttemptsExhausted",
        "{failure}"
    );
    assert_eq!(
        failure["requestContext"]["approximateInvokeCount"], 3,
        "{failure}"
    );
    assert!(
        failure["requestContext"]["functionArn"]
            .as_str()
            .is_some_and(|a| a.ends_with(&format!(":function:{FUNCTION}"))),
        "{failure}"
    );
    assert_eq!(
        failure["responseContext"]["functionError"], "Unhandled",
        "{failure}"
    );
    let info = &failure["KinesisBatchInfo"];
    assert_eq!(info["shardId"], poison.shard, "{failure}");
    assert_eq!(info["startSequenceNumber"], poison.seq, "{failure}");
    assert_eq!(info["endSequenceNumber"], poison.seq, "{failure}");
    assert_eq!(info["batchSize"], 1, "{failure}");
    assert_eq!(info["streamArn"], stream.arn, "{failure}");
    for key in [
        "approximateArrivalOfFirstRecord",
        "approximateArrivalOfLastRecord",
    ] {
        assert!(
            info[key]
                .as_str()
                .is_some_and(|t| t.ends_with('Z') && t.contains('T')),
            "{key}: {failure}"
        );
    }
    let kept = failure["sluice"]["records"]
        .as_array()
        .expect("the records");
    assert_eq!(kept.len(), 1, "{failure}");
    assert_eq!(
        kept[0]["kinesis"]["data"],
        B64.encode(&poison.data),
        "{failure}"
    );
    let attempts = failure["sluice"]["attempts"]
        .as_array()
        .expect("the attempts");
    assert_eq!(attempts.len(), 3, "{failure}");
    assert!(
        attempts.iter().all(|a| a["errorType"] == "PoisonError"),
        "{failure}"
    );

    // Nothing else was given up.
    let later = sqs
        .receive_message()
        .queue_url(&queue_url)
        .wait_time_seconds(1)
        .send()
        .await
        .expect("receive");
    assert!(later.messages().is_empty(), "{:?}", later.messages());
    sluice.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_item_failures_redeliver_from_the_lowest_failed_record_and_nothing_before() {
    let stream = Stream::create(1).await;
    let puts = stream.put_all(&numbered(20, 3)).await;
    let seqs: Vec<String> = puts.iter().map(|p| p.seq.clone()).collect();
    let recorder = Recorder::default();
    let (fourth, sixth) = (seqs[4].clone(), seqs[6].clone());
    // The first invocation reports two of its records as failed, the higher one first.
    let answer: Answer = Arc::new(move |invocation, _| {
        if invocation == 0 {
            Ok(
                json!({ "batchItemFailures": [{ "itemIdentifier": sixth }, { "itemIdentifier": fourth }] }),
            )
        } else {
            Ok(json!({ "batchItemFailures": [] }))
        }
    });
    let sluice = start(
        recorder.registry(pause(Duration::ZERO), answer),
        &stream.source_yaml(
            SOURCE,
            "    batch: {size: 10}\n    report_batch_item_failures: true\n",
        ),
    )
    .await;
    sluice
        .wait_for_checkpoints(SOURCE, &last_by_shard(&puts), PATIENCE)
        .await;
    assert_eq!(
        recorder.invocations(),
        [
            seqs[..10].to_vec(),
            seqs[4..10].to_vec(),
            seqs[10..].to_vec()
        ],
        "invocations by sequence number"
    );
    sluice.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_deliver_only_matching_records_and_filtered_ones_advance_the_checkpoint() {
    let stream = Stream::create(1).await;
    // Every third record is kept; the last ones are all filtered out.
    let records: Vec<(String, String)> = (0..30)
        .map(|i| {
            let kind = if i % 3 == 0 && i < 25 { "keep" } else { "skip" };
            (
                format!("key-{}", i % 4),
                json!({ "n": i, "kind": kind }).to_string(),
            )
        })
        .collect();
    let puts = stream.put_all(&records).await;
    // Not JSON: a `data` pattern cannot match it.
    let opaque = stream
        .put_all(&[("key-0".to_string(), "keep".to_string())])
        .await;
    let all: Vec<Put> = puts.iter().chain(&opaque).cloned().collect();
    let recorder = Recorder::default();
    let sluice = start(
        recorder.registry(pause(Duration::ZERO), succeed()),
        &stream.source_yaml(
            SOURCE,
            "    batch: {size: 4}\n    filters:\n      - data: {kind: [keep]}\n",
        ),
    )
    .await;
    sluice
        .wait_for_checkpoints(SOURCE, &last_by_shard(&all), PATIENCE)
        .await;

    let kept: Vec<&str> = puts
        .iter()
        .filter(|p| p.data.contains("\"keep\""))
        .map(|p| p.seq.as_str())
        .collect();
    assert_eq!(kept.len(), 9);
    let seen = recorder.seen();
    assert_eq!(
        seen.iter().map(|s| s.seq.as_str()).collect::<Vec<_>>(),
        kept,
        "only the matching records, each once and in order"
    );
    sluice.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_during_the_run_delivers_the_parents_records_and_starts_its_children_after_it_finishes()
 {
    let stream = Stream::create(2).await;
    let (quick, slow) = ("shardId-000000000000", "shardId-000000000001");
    // Explicit hash keys pick the shards: a few records for the first, many for the second,
    // whose batches are slow. The first is done long before the second; its end makes the
    // mapping list the shards again while the second is still being read, and a child of
    // the second must not start then.
    let mut puts = stream.put_hashed(&numbered(8, 2), "1").await;
    puts.extend(
        stream
            .put_hashed(&numbered(60, 5), "200000000000000000000000000000000000000")
            .await,
    );
    assert_eq!(puts.iter().filter(|p| p.shard == quick).count(), 8);
    assert_eq!(puts.iter().filter(|p| p.shard == slow).count(), 60);
    let recorder = Recorder::default();
    let slow_batches: Pause = Arc::new(move |batch: &[Seen]| {
        if batch.iter().any(|s| s.shard == slow) {
            Duration::from_millis(400)
        } else {
            Duration::ZERO
        }
    });
    // Its own name in the process-wide metrics, where the children's reads show.
    let source = unique_name("split");
    let sluice = start(
        recorder.registry(slow_batches, succeed()),
        &stream.source_yaml(&source, "    batch: {size: 4}\n"),
    )
    .await;
    wait_until(
        "the first batch of the slow shard is delivered",
        async || recorder.seen().iter().any(|s| s.shard == slow),
    )
    .await;
    // Their middles: 2^126 and 3 * 2^126.
    for (shard, middle) in [
        (quick, "85070591730234615865843651857942052864"),
        (slow, "255211775190703847597530955573826158592"),
    ] {
        stream
            .client
            .split_shard()
            .stream_name(&stream.name)
            .shard_to_split(shard)
            .new_starting_hash_key(middle)
            .send()
            .await
            .unwrap_or_else(|e| panic!("split {shard}: {e:?}"));
    }
    assert!(
        recorder.seen().iter().filter(|s| s.shard == slow).count() < 60,
        "the slow shard was done before the split; the test proves nothing"
    );
    let shards = stream.shards().await;
    let children = |parent: &str| -> Vec<String> {
        shards
            .iter()
            .filter(|s| s.parent_shard_id() == Some(parent))
            .map(|s| s.shard_id().to_string())
            .collect()
    };
    let family: Vec<(&str, Vec<String>)> = vec![(quick, children(quick)), (slow, children(slow))];
    assert!(family.iter().all(|(_, c)| c.len() == 2), "{family:?}");

    // A child's first read sets its iterator age; until its parent's checkpoint says it is
    // finished, no child may have been read.
    let read = |metrics: &str, shard: &str| {
        metrics.lines().any(|l| {
            l.starts_with("sluice_mapping_iterator_age_milliseconds")
                && l.contains(&format!("source=\"{source}\""))
                && l.contains(&format!("shard=\"{shard}\""))
        })
    };
    let mut quick_children_first = false;
    wait_until("every child is read", async || {
        let metrics = sluice.metrics().await;
        let mut all = true;
        for (parent, children) in &family {
            let started: Vec<&String> = children.iter().filter(|c| read(&metrics, c)).collect();
            if !started.is_empty() {
                let at = sluice.checkpoint(&source, parent).await;
                assert!(
                    at.as_ref().is_some_and(|c| c.finished),
                    "{started:?} read while their parent's checkpoint is {at:?}"
                );
            }
            all &= started.len() == children.len();
        }
        if !quick_children_first && family[0].1.iter().all(|c| read(&metrics, c)) {
            quick_children_first = recorder.seen().iter().filter(|s| s.shard == slow).count() < 60;
        }
        all
    })
    .await;
    assert!(
        quick_children_first,
        "the quick shard's children started only after the slow shard was done; the test proves nothing"
    );

    for parent in [quick, slow] {
        assert_eq!(
            sluice.checkpoint(&source, parent).await,
            Some(Checkpoint {
                sequence: puts
                    .iter()
                    .filter(|p| p.shard == parent)
                    .map(|p| p.seq.clone())
                    .next_back(),
                finished: true
            }),
            "{parent}'s checkpoint row"
        );
    }
    let seen = recorder.seen();
    for parent in [quick, slow] {
        assert_eq!(
            seen.iter()
                .filter(|s| s.shard == parent)
                .map(|s| (s.seq.as_str(), s.data.as_str()))
                .collect::<Vec<_>>(),
            puts.iter()
                .filter(|p| p.shard == parent)
                .map(|p| (p.seq.as_str(), p.data.as_str()))
                .collect::<Vec<_>>(),
            "{parent}'s records, each once and in order"
        );
    }
    assert_eq!(seen.len(), puts.len(), "nothing from elsewhere");
    sluice.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_from_the_postgres_checkpoint_after_an_abrupt_stop_without_loss() {
    const BATCH: usize = 10;
    let state = new_postgres_database().await;
    let stream = Stream::create(2).await;
    let puts = stream.put_all(&numbered(300, 10)).await;
    let last = last_by_shard(&puts);
    assert_eq!(last.len(), 2, "{last:?}");
    let dir = tempfile::tempdir().expect("data directory");
    let yaml = format!(
        "{}{}",
        function_yaml(),
        stream.source_yaml(SOURCE, &format!("    batch: {{size: {BATCH}}}\n"))
    );

    // The first Sluice runs on a runtime of its own, dropped mid-stream with every task in it:
    // no graceful stop, nothing committed on the way out, as in a crash.
    let first = Recorder::default();
    let (runtime, running) = {
        let (state, data, yaml) = (state.clone(), dir.path().to_path_buf(), yaml.clone());
        let registry = first.registry(pause(Duration::from_millis(10)), succeed());
        tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a runtime for the first Sluice");
            let running = runtime.block_on(start_on_state(&state, &data, &yaml, registry));
            (runtime, running)
        })
        .await
        .expect("the first Sluice starts")
    };
    wait_until("60 records are delivered", async || {
        first.seen().len() >= 60
    })
    .await;
    runtime.shutdown_background();
    // Its connections belonged to the runtime that is gone: nothing to close them with.
    std::mem::forget(running);
    // A write the dead runtime had sent may still land; let it, before reading the state.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let store =
        sluice::state::open_with(&state, Path::new("."), sluice::state::OpenOptions::INSPECT)
            .await
            .expect("open the PostgreSQL state");
    let mut at_stop = BTreeMap::new();
    for shard in last.keys() {
        at_stop.insert(
            shard.clone(),
            store
                .checkpoint(SOURCE, shard)
                .await
                .expect("checkpoint")
                .and_then(|c| c.sequence),
        );
    }
    let before = first.seen();
    assert!(
        before.len() < puts.len(),
        "everything was delivered before the stop; the test proves nothing"
    );
    assert!(
        at_stop.values().any(Option::is_some),
        "no checkpoint before the stop: {at_stop:?}"
    );

    let second = Recorder::default();
    let running = start_on_state(
        &state,
        dir.path(),
        &yaml,
        second.registry(pause(Duration::ZERO), succeed()),
    )
    .await;
    wait_until("every record is delivered across both runs", async || {
        let got: BTreeSet<(String, String)> = before
            .iter()
            .chain(second.seen().iter())
            .map(|s| (s.shard.clone(), s.seq.clone()))
            .collect();
        puts.iter()
            .all(|p| got.contains(&(p.shard.clone(), p.seq.clone())))
    })
    .await;
    wait_until("the checkpoints reach the ends of the shards", async || {
        for (shard, seq) in &last {
            let at = store
                .checkpoint(SOURCE, shard)
                .await
                .expect("checkpoint")
                .and_then(|c| c.sequence);
            if at.as_ref() != Some(seq) {
                return false;
            }
        }
        true
    })
    .await;

    // The second run started right after each shard's checkpoint, and nowhere else.
    let after = second.seen();
    for (shard, checkpoint) in &at_stop {
        let order: Vec<&str> = puts
            .iter()
            .filter(|p| &p.shard == shard)
            .map(|p| p.seq.as_str())
            .collect();
        let from = match checkpoint {
            Some(seq) => {
                order
                    .iter()
                    .position(|s| s == seq)
                    .expect("a checkpoint of a put record")
                    + 1
            }
            None => 0,
        };
        let resumed: Vec<&str> = after
            .iter()
            .filter(|s| &s.shard == shard)
            .map(|s| s.seq.as_str())
            .collect();
        assert_eq!(
            resumed,
            order[from..],
            "{shard}: the second run's deliveries"
        );
    }
    // Repeated: what the first run delivered past its last checkpoint, at most a round per shard.
    let repeats = before.len() + after.len() - puts.len();
    assert!(
        repeats <= BATCH * last.len(),
        "{repeats} records delivered twice"
    );
    running.shutdown().await;
    drop(store);
    common::drop_postgres_database(&state).await;
}
