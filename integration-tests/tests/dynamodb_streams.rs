//! DynamoDB Streams mappings end to end: tables in moto_server (at `SLUICE_TEST_MOTO`;
//! `scripts/test` starts one) whose changes a Sluice started in-process reads into a native
//! function that records what it is given.
//!
//! Every test uses its own table and state, so that they can share one moto_server. moto
//! gives a table's stream one shard and never closes it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lambda_events::event::dynamodb::Event;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, StreamSpecification, StreamViewType,
};
use aws_sdk_dynamodbstreams::types::ShardIteratorType;
use common::{StatefulSluice, moto_url, quoted};
use serde_json::{Value, json};
use sluice::NativeRegistry;
use sluice_integration_tests::unique_name;

const REGION: &str = "us-east-1";
/// How long a test waits for something before it fails.
const PATIENCE: Duration = Duration::from_secs(60);
/// The function every test maps its table's stream to.
const FUNCTION: &str = "consumer";
/// The source every test declares.
const SOURCE: &str = "changes";

fn credentials() -> Credentials {
    Credentials::new("testing", "testing", None, None, "tests")
}

/// One change as the table's stream holds it.
#[derive(Debug, Clone, PartialEq)]
struct Change {
    shard: String,
    seq: String,
    name: String,
}

/// One table with a stream in moto, and the test's own clients for it.
struct Table {
    client: aws_sdk_dynamodb::Client,
    streams: aws_sdk_dynamodbstreams::Client,
    name: String,
    stream_arn: String,
}

impl Table {
    /// A table keyed by the string `id`, whose stream has the images `view` says.
    async fn create(view: StreamViewType) -> Table {
        let client = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .endpoint_url(moto_url())
                .region(Region::new(REGION))
                .credentials_provider(credentials())
                .build(),
        );
        let streams = aws_sdk_dynamodbstreams::Client::from_conf(
            aws_sdk_dynamodbstreams::Config::builder()
                .behavior_version(aws_sdk_dynamodbstreams::config::BehaviorVersion::latest())
                .endpoint_url(moto_url())
                .region(aws_sdk_dynamodbstreams::config::Region::new(REGION))
                .credentials_provider(credentials())
                .build(),
        );
        let name = unique_name("sluice-table");
        let created = client
            .create_table()
            .table_name(&name)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("id")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .expect("attribute definition"),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("id")
                    .key_type(KeyType::Hash)
                    .build()
                    .expect("key schema"),
            )
            .billing_mode(BillingMode::PayPerRequest)
            .stream_specification(
                StreamSpecification::builder()
                    .stream_enabled(true)
                    .stream_view_type(view)
                    .build()
                    .expect("stream specification"),
            )
            .send()
            .await
            .unwrap_or_else(|e| panic!("create table {name}: {e:?}"));
        let stream_arn = created
            .table_description()
            .and_then(|t| t.latest_stream_arn())
            .expect("the table's stream")
            .to_string();
        Table {
            client,
            streams,
            name,
            stream_arn,
        }
    }

    /// Puts the item `id` with `status` and `total` (an INSERT, or a MODIFY if it exists).
    async fn put(&self, id: &str, status: &str, total: u32) {
        self.client
            .put_item()
            .table_name(&self.name)
            .item("id", AttributeValue::S(id.into()))
            .item("status", AttributeValue::S(status.into()))
            .item("total", AttributeValue::N(total.to_string()))
            .send()
            .await
            .expect("put an item");
    }

    /// Sets the item's `total` (a MODIFY).
    async fn update(&self, id: &str, total: u32) {
        self.client
            .update_item()
            .table_name(&self.name)
            .key("id", AttributeValue::S(id.into()))
            .update_expression("SET #t = :t")
            .expression_attribute_names("#t", "total")
            .expression_attribute_values(":t", AttributeValue::N(total.to_string()))
            .send()
            .await
            .expect("update an item");
    }

    /// Deletes the item (a REMOVE).
    async fn delete(&self, id: &str) {
        self.client
            .delete_item()
            .table_name(&self.name)
            .key("id", AttributeValue::S(id.into()))
            .send()
            .await
            .expect("delete an item");
    }

    /// Every change in the stream, shard by shard, in order.
    async fn changes(&self) -> Vec<Change> {
        let described = self
            .streams
            .describe_stream()
            .stream_arn(&self.stream_arn)
            .send()
            .await
            .expect("describe the stream");
        let shards: Vec<String> = described
            .stream_description()
            .map(|d| {
                d.shards()
                    .iter()
                    .filter_map(|s| s.shard_id().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mut changes = Vec::new();
        for shard in shards {
            let mut iterator = self
                .streams
                .get_shard_iterator()
                .stream_arn(&self.stream_arn)
                .shard_id(&shard)
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await
                .expect("an iterator")
                .shard_iterator()
                .map(str::to_string);
            while let Some(it) = iterator {
                let out = self
                    .streams
                    .get_records()
                    .shard_iterator(&it)
                    .send()
                    .await
                    .expect("get records");
                if out.records().is_empty() {
                    break;
                }
                changes.extend(out.records().iter().map(|r| {
                    Change {
                        shard: shard.clone(),
                        seq: r
                            .dynamodb()
                            .and_then(|d| d.sequence_number())
                            .unwrap_or_default()
                            .to_string(),
                        name: r
                            .event_name()
                            .map(|n| n.as_str().to_string())
                            .unwrap_or_default(),
                    }
                }));
                iterator = out.next_shard_iterator().map(str::to_string);
            }
        }
        changes
    }

    /// The last sequence number of each shard.
    async fn last_by_shard(&self) -> BTreeMap<String, String> {
        self.changes()
            .await
            .into_iter()
            .map(|c| (c.shard, c.seq))
            .collect()
    }

    /// `sources:` YAML mapping this table's stream to [`FUNCTION`], with more settings (YAML
    /// lines under the source, already indented by four spaces).
    fn source_yaml(&self, settings: &str) -> String {
        format!(
            "sources:\n  {SOURCE}:\n    type: dynamodb_streams\n    function: {FUNCTION}\n    table: {}\n    endpoint_url: {}\n    region: {REGION}\n{settings}",
            quoted(&self.name),
            quoted(&moto_url()),
        )
    }
}

/// One change as the function was given it.
#[derive(Debug, Clone)]
struct Seen {
    seq: String,
    name: String,
    id: String,
    /// The whole record.
    record: Value,
}

/// The native function [`FUNCTION`]: notes every change it is given and how many invocations
/// run at once, waits as long as `pause` says, then succeeds.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    events: Arc<Mutex<Vec<Value>>>,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Recorder {
    fn registry(&self, pause: fn(&[Seen]) -> Duration) -> NativeRegistry {
        let mut registry = NativeRegistry::new();
        let this = self.clone();
        registry.register(FUNCTION, move |event: Value, _ctx| {
            let this = this.clone();
            async move {
                let running = this.running.fetch_add(1, Ordering::SeqCst) + 1;
                this.peak.fetch_max(running, Ordering::SeqCst);
                let batch = decode(&event);
                this.seen
                    .lock()
                    .expect("seen")
                    .extend(batch.iter().cloned());
                this.events.lock().expect("events").push(event);
                tokio::time::sleep(pause(&batch)).await;
                this.running.fetch_sub(1, Ordering::SeqCst);
                Ok(Value::Null)
            }
        });
        registry
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// The changes each item went through, in the order the function was given them.
    fn by_item(&self) -> BTreeMap<String, Vec<Seen>> {
        let mut by_item: BTreeMap<String, Vec<Seen>> = BTreeMap::new();
        for s in self.seen() {
            by_item.entry(s.id.clone()).or_default().push(s);
        }
        by_item
    }
}

fn no_pause(_: &[Seen]) -> Duration {
    Duration::ZERO
}

fn decode(event: &Value) -> Vec<Seen> {
    event["Records"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| Seen {
            seq: r["dynamodb"]["SequenceNumber"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            name: r["eventName"].as_str().unwrap_or_default().to_string(),
            id: r["dynamodb"]["Keys"]["id"]["S"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            record: r.clone(),
        })
        .collect()
}

async fn start(registry: NativeRegistry, yaml: &str) -> StatefulSluice {
    StatefulSluice::start(&format!("{}{yaml}", function_yaml()), registry).await
}

fn function_yaml() -> String {
    format!("functions:\n  {FUNCTION}: {{runtime: native, timeout: 30s}}\n")
}

/// Waits until the mapping has checkpointed every change the table's stream holds.
async fn wait_for_everything(sluice: &StatefulSluice, table: &Table) {
    sluice
        .wait_for_checkpoints(SOURCE, &table.last_by_shard().await, PATIENCE)
        .await;
}

fn names(changes: &[Seen]) -> Vec<&str> {
    changes.iter().map(|s| s.name.as_str()).collect()
}

/// An item with `status` and `total` as the stream shows it.
fn image(id: &str, status: &str, total: u32) -> Value {
    json!({ "id": { "S": id }, "status": { "S": status }, "total": { "N": total.to_string() } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_insert_modify_remove_in_order_with_old_and_new_images() {
    let table = Table::create(StreamViewType::NewAndOldImages).await;
    table.put("o-1", "new", 12).await;
    table.put("o-2", "new", 7).await;
    table.update("o-1", 15).await;
    table.update("o-2", 8).await;
    let recorder = Recorder::default();
    let sluice = start(
        recorder.registry(no_pause),
        &table.source_yaml("    batch: {size: 3}\n"),
    )
    .await;
    // More changes while the mapping runs.
    common::wait_until("the first changes are delivered", PATIENCE, async || {
        !recorder.seen().is_empty()
    })
    .await;
    table.delete("o-1").await;
    table.delete("o-2").await;
    table.put("o-3", "new", 1).await;
    wait_for_everything(&sluice, &table).await;

    let stream = table.changes().await;
    assert_eq!(stream.len(), 7, "{stream:?}");
    let seen = recorder.seen();
    assert_eq!(
        seen.iter().map(|s| s.seq.as_str()).collect::<Vec<_>>(),
        stream.iter().map(|c| c.seq.as_str()).collect::<Vec<_>>(),
        "every change once, in the stream's order"
    );
    let by_item = recorder.by_item();
    assert_eq!(names(&by_item["o-1"]), ["INSERT", "MODIFY", "REMOVE"]);
    assert_eq!(names(&by_item["o-2"]), ["INSERT", "MODIFY", "REMOVE"]);
    assert_eq!(names(&by_item["o-3"]), ["INSERT"]);

    let images = |s: &Seen| {
        (
            s.record["dynamodb"].get("OldImage").cloned(),
            s.record["dynamodb"].get("NewImage").cloned(),
        )
    };
    let o1 = &by_item["o-1"];
    assert_eq!(images(&o1[0]), (None, Some(image("o-1", "new", 12))));
    assert_eq!(
        images(&o1[1]),
        (Some(image("o-1", "new", 12)), Some(image("o-1", "new", 15)))
    );
    assert_eq!(images(&o1[2]), (Some(image("o-1", "new", 15)), None));
    let o2 = &by_item["o-2"];
    assert_eq!(
        images(&o2[1]),
        (Some(image("o-2", "new", 7)), Some(image("o-2", "new", 8)))
    );
    assert_eq!(images(&o2[2]), (Some(image("o-2", "new", 8)), None));

    for s in &seen {
        let r = &s.record;
        assert_eq!(r["eventSource"], "aws:dynamodb", "{r}");
        assert_eq!(r["eventVersion"], "1.1", "{r}");
        assert_eq!(r["awsRegion"], REGION, "{r}");
        assert_eq!(r["eventSourceARN"], table.stream_arn, "{r}");
        assert!(
            r["eventID"].as_str().is_some_and(|id| !id.is_empty()),
            "{r}"
        );
        let change = &r["dynamodb"];
        assert_eq!(change["Keys"], json!({ "id": { "S": s.id } }), "{r}");
        assert_eq!(change["StreamViewType"], "NEW_AND_OLD_IMAGES", "{r}");
        assert!(change["ApproximateCreationDateTime"].is_number(), "{r}");
        assert!(change["SizeBytes"].as_u64().is_some_and(|n| n > 0), "{r}");
    }
    let events = recorder.events.lock().expect("events").clone();
    for event in events {
        let parsed: Event = serde_json::from_value(event.clone())
            .unwrap_or_else(|e| panic!("not a DynamoDB event ({e}): {event}"));
        assert!(
            (1..=3).contains(&parsed.records.len()),
            "batch of {}",
            parsed.records.len()
        );
    }
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_lanes_keep_each_items_changes_in_order() {
    let table = Table::create(StreamViewType::NewImage).await;
    let items: Vec<String> = (0..6).map(|i| format!("item-{i}")).collect();
    for round in 0..5u32 {
        for id in &items {
            match round {
                0 => table.put(id, "new", 0).await,
                4 => table.delete(id).await,
                n => table.update(id, n).await,
            }
        }
    }
    let recorder = Recorder::default();
    // Batches take different times, so that lanes overtake each other.
    fn uneven(batch: &[Seen]) -> Duration {
        let n: u64 = batch
            .first()
            .map(|s| s.seq.bytes().map(u64::from).sum())
            .unwrap_or(0);
        Duration::from_millis(5 + (n * 7) % 40)
    }
    let sluice = start(
        recorder.registry(uneven),
        &table.source_yaml("    batch: {size: 2}\n    parallelization: 3\n"),
    )
    .await;
    wait_for_everything(&sluice, &table).await;

    assert_eq!(recorder.seen().len(), 30, "every change once");
    for (id, changes) in recorder.by_item() {
        assert_eq!(
            names(&changes),
            ["INSERT", "MODIFY", "MODIFY", "MODIFY", "REMOVE"],
            "{id}"
        );
        let totals: Vec<&str> = changes[..4]
            .iter()
            .map(|s| {
                s.record["dynamodb"]["NewImage"]["total"]["N"]
                    .as_str()
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(totals, ["0", "1", "2", "3"], "{id}");
    }
    let peak = recorder.peak.load(Ordering::SeqCst);
    assert!(
        (2..=3).contains(&peak),
        "{peak} invocations at once with 3 lanes"
    );
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_a_restart_from_the_checkpoint_without_redelivering() {
    let table = Table::create(StreamViewType::NewAndOldImages).await;
    table.put("a", "new", 1).await;
    table.update("a", 2).await;
    let first = Recorder::default();
    let sluice = start(first.registry(no_pause), &table.source_yaml("")).await;
    wait_for_everything(&sluice, &table).await;
    let dir = sluice.stop().await;
    assert_eq!(names(&first.seen()), ["INSERT", "MODIFY"]);
    let before: BTreeSet<String> = table.changes().await.into_iter().map(|c| c.seq).collect();

    // Changes while no Sluice runs.
    table.update("a", 3).await;
    table.delete("a").await;
    table.put("b", "new", 1).await;
    let second = Recorder::default();
    let sluice = StatefulSluice::start_in(
        dir,
        &format!("{}{}", function_yaml(), table.source_yaml("")),
        second.registry(no_pause),
    )
    .await;
    wait_for_everything(&sluice, &table).await;
    let after: Vec<String> = table
        .changes()
        .await
        .into_iter()
        .map(|c| c.seq)
        .filter(|s| !before.contains(s))
        .collect();
    assert_eq!(after.len(), 3);
    let seen = second.seen();
    assert_eq!(
        seen.iter().map(|s| s.seq.clone()).collect::<Vec<_>>(),
        after,
        "only what came after the checkpoint, once each"
    );
    assert_eq!(names(&seen), ["MODIFY", "REMOVE", "INSERT"]);
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_deliver_only_matching_changes_and_filtered_ones_advance_the_checkpoint() {
    let table = Table::create(StreamViewType::NewAndOldImages).await;
    table.put("o-1", "new", 1).await;
    table.put("o-1", "paid", 1).await;
    table.put("o-2", "paid", 5).await;
    // A removal has no new image: filtered out.
    table.delete("o-2").await;
    table.put("o-3", "new", 9).await;
    let recorder = Recorder::default();
    let sluice = start(
        recorder.registry(no_pause),
        &table.source_yaml("    filters:\n      - dynamodb: {NewImage: {status: {S: [paid]}}}\n"),
    )
    .await;
    // The last change is filtered out: the checkpoint reaches it all the same.
    wait_for_everything(&sluice, &table).await;

    let stream = table.changes().await;
    assert_eq!(stream.len(), 5, "{stream:?}");
    let seen = recorder.seen();
    assert_eq!(
        seen.iter()
            .map(|s| (s.seq.as_str(), s.id.as_str(), s.name.as_str()))
            .collect::<Vec<_>>(),
        [
            (stream[1].seq.as_str(), "o-1", "MODIFY"),
            (stream[2].seq.as_str(), "o-2", "INSERT")
        ],
        "only the paid items"
    );
    sluice.stop().await;
}
