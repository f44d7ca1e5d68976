//! SQS mappings end to end: queues in moto_server (at `SLUICE_TEST_MOTO`; `scripts/test`
//! starts one) read by a Sluice started in-process into a native function that records what
//! it is given and answers as each test tells it.
//!
//! Every test uses its own queues, so that they can share one moto_server. Failed messages
//! come back after their queue's visibility timeout, so the queues that see failures have a
//! short one.
//!
//! moto now and then hands one message to two consumers that receive at the same instant (a
//! few in a thousand with five busy consumers, Sluice or not), as SQS's at-least-once delivery
//! allows. So a test asserts "exactly once" only where the behaviour it pins is about
//! repeats; elsewhere, with several pollers running, it asserts "at least once".

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{
    Message, MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use common::{Function, Logs, Sluice, json_lines, quoted, wait_for_lines};
use serde_json::{Value, json};
use sluice::{FunctionError, NativeRegistry};
use sluice_integration_tests::unique_name;

const REGION: &str = "us-east-1";
/// How long a test waits for deliveries before it fails.
const PATIENCE: Duration = Duration::from_secs(60);
/// The function every test maps its queue to.
const FUNCTION: &str = "consumer";

fn moto() -> String {
    std::env::var("SLUICE_TEST_MOTO").unwrap_or_else(|_| {
        panic!(
            "SLUICE_TEST_MOTO is not set: these tests need a moto_server. Run them with \
             scripts/test, which starts one, or start `moto_server -H 127.0.0.1 -p PORT` and set \
             SLUICE_TEST_MOTO=http://127.0.0.1:PORT"
        )
    })
}

fn client() -> Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(moto())
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
        .build();
    Client::from_conf(config)
}

/// One queue in moto, and the test's own client for it.
struct Queue {
    client: Client,
    url: String,
    arn: String,
}

impl Queue {
    /// A standard queue with these attributes.
    async fn create(prefix: &str, attributes: &[(QueueAttributeName, String)]) -> Queue {
        Self::create_named(&unique_name(prefix), attributes).await
    }

    /// A FIFO queue (content-based deduplication) with this visibility timeout.
    async fn fifo(prefix: &str, visibility_timeout: u32) -> Queue {
        Self::create_named(
            &format!("{}.fifo", unique_name(prefix)),
            &[
                (QueueAttributeName::FifoQueue, "true".into()),
                (QueueAttributeName::ContentBasedDeduplication, "true".into()),
                (
                    QueueAttributeName::VisibilityTimeout,
                    visibility_timeout.to_string(),
                ),
            ],
        )
        .await
    }

    async fn create_named(name: &str, attributes: &[(QueueAttributeName, String)]) -> Queue {
        let client = client();
        let mut create = client.create_queue().queue_name(name);
        for (key, value) in attributes {
            create = create.attributes(key.clone(), value);
        }
        let url = create
            .send()
            .await
            .unwrap_or_else(|e| panic!("create queue {name}: {e:?}"))
            .queue_url()
            .expect("a queue URL")
            .to_string();
        let arn = client
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("queue attributes")
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .expect("a queue ARN");
        Queue { client, url, arn }
    }

    /// A queue whose messages move to `dead_letter` after `max_receive_count` receives.
    async fn with_redrive(
        prefix: &str,
        visibility_timeout: u32,
        dead_letter: &Queue,
        max_receive_count: u32,
    ) -> Queue {
        let policy =
            json!({"deadLetterTargetArn": dead_letter.arn, "maxReceiveCount": max_receive_count});
        Self::create(
            prefix,
            &[
                (
                    QueueAttributeName::VisibilityTimeout,
                    visibility_timeout.to_string(),
                ),
                (QueueAttributeName::RedrivePolicy, policy.to_string()),
            ],
        )
        .await
    }

    async fn send(&self, body: &str) -> String {
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .send()
            .await
            .expect("send a message")
            .message_id()
            .expect("a message id")
            .to_string()
    }

    /// Sends `bodies` in order, ten to a call; returns their message ids by body.
    async fn send_all(&self, bodies: &[String]) -> BTreeMap<String, String> {
        self.send_grouped(&bodies.iter().map(|b| (b.clone(), None)).collect::<Vec<_>>())
            .await
    }

    /// Sends `(body, message group)` pairs in order, ten to a call; returns ids by body.
    async fn send_grouped(
        &self,
        messages: &[(String, Option<String>)],
    ) -> BTreeMap<String, String> {
        let mut ids = BTreeMap::new();
        for chunk in messages.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, (body, group))| {
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(body)
                        .set_message_group_id(group.clone())
                        .build()
                        .expect("entry")
                })
                .collect::<Vec<_>>();
            let out = self
                .client
                .send_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .expect("send a batch");
            assert!(
                out.failed().is_empty(),
                "messages not sent: {:?}",
                out.failed()
            );
            for ok in out.successful() {
                let i: usize = ok.id().parse().expect("entry id");
                ids.insert(chunk[i].0.clone(), ok.message_id().to_string());
            }
        }
        ids
    }

    /// (visible, in flight) messages.
    async fn counts(&self) -> (u64, u64) {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .expect("queue attributes");
        let attrs = out.attributes().cloned().unwrap_or_default();
        let count = |name: QueueAttributeName| {
            attrs
                .get(&name)
                .and_then(|n| n.parse().ok())
                .unwrap_or(u64::MAX)
        };
        (
            count(QueueAttributeName::ApproximateNumberOfMessages),
            count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        )
    }

    /// Waits until no message is left, visible or in flight: every one was deleted.
    async fn wait_empty(&self) {
        let started = Instant::now();
        loop {
            let counts = self.counts().await;
            if counts == (0, 0) {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{}: (visible, in flight) = {counts:?} after {PATIENCE:?}; the queue never emptied",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Receives (without deleting) until `want` messages came, or fails.
    async fn receive_at_least(&self, want: usize) -> Vec<Message> {
        let started = Instant::now();
        let mut got = Vec::new();
        while got.len() < want {
            assert!(
                started.elapsed() < PATIENCE,
                "{}: {} of {want} messages after {PATIENCE:?}: {got:?}",
                self.url,
                got.len()
            );
            got.extend(self.receive(1).await);
        }
        got
    }

    async fn receive(&self, wait_secs: i32) -> Vec<Message> {
        self.client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(10)
            .wait_time_seconds(wait_secs)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .expect("receive")
            .messages()
            .to_vec()
    }

    /// `sources:` YAML mapping this queue to [`FUNCTION`], with more settings (YAML lines
    /// under the source, already indented by four spaces).
    fn source_yaml(&self, settings: &str) -> String {
        format!(
            "sources:\n  queue:\n    type: sqs\n    function: {FUNCTION}\n    queue_url: {}\n    endpoint_url: {}\n    region: {REGION}\n{settings}",
            quoted(&self.url),
            quoted(&moto()),
        )
    }

    /// One more `type: sqs` source named `name` (a second mapping, say), without the
    /// `sources:` line.
    fn named_source_yaml(&self, name: &str, settings: &str) -> String {
        format!(
            "  {name}:\n    type: sqs\n    function: {FUNCTION}\n    queue_url: {}\n    endpoint_url: {}\n    region: {REGION}\n{settings}",
            quoted(&self.url),
            quoted(&moto()),
        )
    }

    /// A `type: sqs` dead letter named `name` sending to this queue.
    fn dead_letter_yaml(&self, name: &str) -> String {
        format!(
            "dead_letters:\n  {name}: {{type: sqs, queue_url: {}, endpoint_url: {}, region: {REGION}}}\n",
            quoted(&self.url),
            quoted(&moto())
        )
    }
}

/// One message as the function was given it.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    body: String,
    receive_count: u32,
    group: Option<String>,
    /// Which invocation (in the order they started) carried it.
    invocation: usize,
    /// When that invocation started.
    at: Instant,
    /// The whole record.
    record: Value,
}

/// What the function answers for a batch (given the messages in it).
type Answer = Arc<dyn Fn(&[Seen]) -> Result<Value, FunctionError> + Send + Sync>;

fn succeed() -> Answer {
    Arc::new(|_| Ok(Value::Null))
}

/// `{"batchItemFailures": …}` naming the messages `fails` picks.
fn report_failures(fails: impl Fn(&Seen) -> bool + Send + Sync + 'static) -> Answer {
    Arc::new(move |batch| {
        let failures: Vec<Value> = batch
            .iter()
            .filter(|s| fails(s))
            .map(|s| json!({"itemIdentifier": s.id}))
            .collect();
        Ok(json!({ "batchItemFailures": failures }))
    })
}

/// The native function [`FUNCTION`]: records every message it is given and how many
/// invocations run at once, waits `pause`, then answers as told.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    invocations: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Recorder {
    fn registry(&self, pause: Duration, answer: Answer) -> NativeRegistry {
        let mut registry = NativeRegistry::new();
        let this = self.clone();
        registry.register(FUNCTION, move |event: Value, _ctx| {
            let (this, answer) = (this.clone(), answer.clone());
            async move {
                let running = this.running.fetch_add(1, Ordering::SeqCst) + 1;
                this.peak.fetch_max(running, Ordering::SeqCst);
                let batch = {
                    let mut seen = this.seen.lock().expect("seen");
                    let invocation = this.invocations.fetch_add(1, Ordering::SeqCst);
                    let batch = decode(&event, invocation);
                    seen.extend(batch.iter().cloned());
                    batch
                };
                tokio::time::sleep(pause).await;
                let result = answer(&batch);
                this.running.fetch_sub(1, Ordering::SeqCst);
                result
            }
        });
        registry
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// Deliveries by body.
    fn by_body(&self) -> BTreeMap<String, Vec<Seen>> {
        let mut by_body: BTreeMap<String, Vec<Seen>> = BTreeMap::new();
        for s in self.seen() {
            by_body.entry(s.body.clone()).or_default().push(s);
        }
        by_body
    }

    async fn wait_until(&self, what: &str, done: impl Fn(&[Seen]) -> bool) {
        let started = Instant::now();
        while !done(&self.seen()) {
            assert!(
                started.elapsed() < PATIENCE,
                "timed out waiting until {what}; seen: {:?}",
                self.seen()
                    .iter()
                    .map(|s| (&s.body, s.receive_count))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every one of `bodies` was delivered at least once.
    async fn wait_for_all(&self, bodies: &[String]) {
        self.wait_until(
            &format!("all {} messages are delivered", bodies.len()),
            |seen| {
                let got: BTreeSet<&str> = seen.iter().map(|s| s.body.as_str()).collect();
                bodies.iter().all(|b| got.contains(b.as_str()))
            },
        )
        .await;
    }
}

fn decode(event: &Value, invocation: usize) -> Vec<Seen> {
    let at = Instant::now();
    event["Records"]
        .as_array()
        .map(|records| {
            records
                .iter()
                .map(|r| Seen {
                    id: r["messageId"].as_str().unwrap_or_default().to_string(),
                    body: r["body"].as_str().unwrap_or_default().to_string(),
                    receive_count: r["attributes"]["ApproximateReceiveCount"]
                        .as_str()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0),
                    group: r["attributes"]["MessageGroupId"]
                        .as_str()
                        .map(str::to_string),
                    invocation,
                    at,
                    record: r.clone(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Starts Sluice with the native [`FUNCTION`] (`function_settings`: more `key: value` pairs)
/// and `yaml` (sources, dead letters).
async fn start(registry: NativeRegistry, function_settings: &[(&str, &str)], yaml: &str) -> Sluice {
    // No longer than the shortest visibility timeout of a test queue (1 s): a longer one is
    // refused, as Lambda refuses it.
    let mut function = Function::native(FUNCTION).set("timeout", "1s");
    for (key, value) in function_settings {
        function = function.set(key, value);
    }
    Sluice::start_native_in(Sluice::new_dir(), &[function], yaml, registry).await
}

fn bodies(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_every_message_in_lambdas_sqs_shape_and_deletes_it() {
    let queue = Queue::create("sluice-sqs-shape", &[]).await;
    let arn = queue.arn.clone();
    let mut sent = BTreeMap::new();
    for i in 0..25 {
        let body = format!("{{\"order\": {i}}}");
        let out = queue
            .client
            .send_message()
            .queue_url(&queue.url)
            .message_body(&body)
            .message_attributes(
                "Kind",
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value("order")
                    .build()
                    .expect("attribute"),
            )
            .message_attributes(
                "N",
                MessageAttributeValue::builder()
                    .data_type("Number")
                    .string_value(i.to_string())
                    .build()
                    .expect("attribute"),
            )
            .message_attributes(
                "Raw",
                MessageAttributeValue::builder()
                    .data_type("Binary")
                    .binary_value(Blob::new(vec![1u8, 2, 3]))
                    .build()
                    .expect("attribute"),
            )
            .send()
            .await
            .expect("send");
        sent.insert(body, out);
    }
    let recorder = Recorder::default();
    let sluice = start(
        recorder.registry(Duration::ZERO, succeed()),
        &[],
        &queue.source_yaml("    batch: {size: 10}\n"),
    )
    .await;
    let all: Vec<String> = sent.keys().cloned().collect();
    recorder.wait_for_all(&all).await;
    queue.wait_empty().await;

    let by_body = recorder.by_body();
    for (body, out) in &sent {
        let first = by_body[body]
            .iter()
            .min_by_key(|s| s.receive_count)
            .expect("delivered");
        let r = &first.record;
        let n = body
            .trim_start_matches("{\"order\": ")
            .trim_end_matches('}');
        assert_eq!(r["messageId"], out.message_id().expect("id"), "{r}");
        assert!(
            r["receiptHandle"].as_str().is_some_and(|h| !h.is_empty()),
            "{r}"
        );
        assert_eq!(r["body"], *body, "{r}");
        assert_eq!(
            r["md5OfBody"],
            out.md5_of_message_body().expect("md5"),
            "{r}"
        );
        assert_eq!(
            r["md5OfMessageAttributes"],
            out.md5_of_message_attributes().expect("md5"),
            "{r}"
        );
        assert_eq!(r["eventSource"], "aws:sqs", "{r}");
        assert_eq!(r["eventSourceARN"], arn, "{r}");
        assert_eq!(r["awsRegion"], REGION, "{r}");
        let attributes = &r["attributes"];
        assert_eq!(attributes["ApproximateReceiveCount"], "1", "{r}");
        for key in ["SentTimestamp", "ApproximateFirstReceiveTimestamp"] {
            assert!(
                attributes[key]
                    .as_str()
                    .is_some_and(|t| t.parse::<u64>().is_ok()),
                "{key} is not milliseconds in a string: {r}"
            );
        }
        assert!(
            attributes["SenderId"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{r}"
        );
        let message_attributes = &r["messageAttributes"];
        assert_eq!(
            message_attributes["Kind"],
            json!({"stringValue": "order", "binaryValue": null, "stringListValues": [], "binaryListValues": [], "dataType": "String"}),
            "{r}"
        );
        assert_eq!(message_attributes["N"]["stringValue"], n, "{r}");
        assert_eq!(message_attributes["N"]["dataType"], "Number", "{r}");
        assert_eq!(message_attributes["Raw"]["binaryValue"], "AQID", "{r}");
        assert_eq!(message_attributes["Raw"]["dataType"], "Binary", "{r}");
    }
    let mut sizes: BTreeMap<usize, usize> = BTreeMap::new();
    for s in recorder.seen() {
        *sizes.entry(s.invocation).or_default() += 1;
    }
    assert!(
        sizes.values().all(|n| *n <= 10),
        "a batch over batch.size: {sizes:?}"
    );
    sluice.shutdown().await;
}

/// Where the poison message of [`poison_goes_to_the_dead_letter_while_the_rest_flow`] ends.
enum DeadLetterKind {
    File,
    Sqs(Queue),
}

/// 20 good messages and one that always fails, one message per invocation, with
/// `retry.max_attempts: 1`: the poison is tried twice, then written to the `on_failure` dead
/// letter with its payload and both attempts and deleted; every good message is delivered
/// and deleted meanwhile.
async fn poison_goes_to_the_dead_letter_while_the_rest_flow(kind: DeadLetterKind) {
    let queue = Queue::create(
        "sluice-sqs-poison",
        &[(QueueAttributeName::VisibilityTimeout, "1".into())],
    )
    .await;
    let good = bodies("good", 20);
    let poison = "poison".to_string();
    let mut all = good.clone();
    all.insert(10, poison.clone());
    let ids = queue.send_all(&all).await;
    let recorder = Recorder::default();
    let answer: Answer =
        Arc::new(
            |batch: &[Seen]| match batch.iter().find(|s| s.body == "poison") {
                Some(s) => Err(FunctionError::new(
                    "Poisoned",
                    format!("cannot digest {}", s.id),
                )),
                None => Ok(Value::Null),
            },
        );
    let dead_letter_yaml = match &kind {
        DeadLetterKind::File => {
            "dead_letters:\n  failed: {type: file, path: ./failed.jsonl}\n".to_string()
        }
        DeadLetterKind::Sqs(q) => q.dead_letter_yaml("failed"),
    };
    let sluice = start(
        recorder.registry(Duration::ZERO, answer),
        &[],
        &format!(
            "{}{dead_letter_yaml}",
            queue.source_yaml(
                "    batch: {size: 1}\n    retry: {max_attempts: 1}\n    on_failure: failed\n"
            )
        ),
    )
    .await;
    let dead: Vec<Value> = match &kind {
        DeadLetterKind::File => {
            wait_for_lines(&sluice.dir().join("failed.jsonl"), 1, PATIENCE).await
        }
        DeadLetterKind::Sqs(q) => q
            .receive_at_least(1)
            .await
            .iter()
            .map(|m| {
                serde_json::from_str(m.body().unwrap_or_default()).expect("a JSON dead letter")
            })
            .collect(),
    };
    queue.wait_empty().await;
    recorder.wait_for_all(&all).await;

    let by_body = recorder.by_body();
    let tries: Vec<u32> = by_body[&poison].iter().map(|s| s.receive_count).collect();
    assert_eq!(tries, [1, 2], "the poison is tried once and retried once");
    assert_eq!(dead.len(), 1, "one dead letter: {dead:?}");
    let record = &dead[0];
    assert_eq!(
        record["requestContext"]["condition"], "RetryAttemptsExhausted",
        "{record}"
    );
    assert_eq!(
        record["requestContext"]["approximateInvokeCount"], 2,
        "{record}"
    );
    assert_eq!(
        record["responseContext"]["functionError"], "Unhandled",
        "{record}"
    );
    assert_eq!(record["SQSBatchInfo"]["batchSize"], 1, "{record}");
    assert_eq!(record["SQSBatchInfo"]["streamArn"], queue.arn, "{record}");
    let records = record["sluice"]["records"]
        .as_array()
        .expect("sluice.records");
    assert_eq!(records.len(), 1, "{record}");
    assert_eq!(records[0]["body"], "poison", "{record}");
    assert_eq!(records[0]["messageId"], ids[&poison], "{record}");
    assert_eq!(records[0]["eventSourceARN"], queue.arn, "{record}");
    let attempts = record["sluice"]["attempts"]
        .as_array()
        .expect("sluice.attempts");
    assert_eq!(
        attempts.len(),
        2,
        "both attempts are in the dead letter: {record}"
    );
    for attempt in attempts {
        assert_eq!(attempt["errorType"], "Poisoned", "{record}");
        assert_eq!(
            attempt["errorMessage"],
            format!("cannot digest {}", ids[&poison]),
            "{record}"
        );
        assert_eq!(attempt["records"], 1, "{record}");
    }
    if let DeadLetterKind::File = kind {
        assert_eq!(
            json_lines(&sluice.dir().join("failed.jsonl")).len(),
            1,
            "written once"
        );
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_goes_to_a_file_dead_letter_with_its_payload_and_attempts_while_the_rest_flow()
 {
    poison_goes_to_the_dead_letter_while_the_rest_flow(DeadLetterKind::File).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_goes_to_an_sqs_dead_letter_with_its_payload_and_attempts_while_the_rest_flow()
 {
    let dead_letters = Queue::create("sluice-sqs-poison-dlq", &[]).await;
    poison_goes_to_the_dead_letter_while_the_rest_flow(DeadLetterKind::Sqs(dead_letters)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_item_failures_delete_the_successes_and_redeliver_exactly_the_failed_message() {
    let queue = Queue::create(
        "sluice-sqs-partial",
        &[(QueueAttributeName::VisibilityTimeout, "1".into())],
    )
    .await;
    let all = bodies("item", 8);
    queue.send_all(&all).await;
    let recorder = Recorder::default();
    // item-003 fails the first time it is seen, and only then.
    let answer = report_failures(|s| s.body == "item-003" && s.receive_count == 1);
    let sluice = start(
        recorder.registry(Duration::ZERO, answer),
        &[],
        &queue.source_yaml("    batch: {size: 10}\n    report_batch_item_failures: true\n"),
    )
    .await;
    recorder
        .wait_until("item-003 comes back", |seen| {
            seen.iter()
                .any(|s| s.body == "item-003" && s.receive_count == 2)
        })
        .await;
    queue.wait_empty().await;
    // The successes were deleted at once: well past a visibility timeout, none came back.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let by_body = recorder.by_body();
    assert_eq!(
        by_body.keys().cloned().collect::<Vec<_>>(),
        all,
        "every message was delivered"
    );
    let first_batch = by_body["item-003"][0].invocation;
    for (body, deliveries) in &by_body {
        let counts: Vec<u32> = deliveries.iter().map(|s| s.receive_count).collect();
        if body == "item-003" {
            assert_eq!(counts, [1, 2], "the failed message comes back once");
        } else {
            assert_eq!(counts, [1], "{body} succeeded, yet came back");
        }
    }
    assert!(
        by_body
            .values()
            .filter(|d| d[0].invocation == first_batch)
            .count()
            > 1,
        "the failed message shared its batch with successes: {by_body:?}"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_keeps_order_in_each_group_and_a_failing_group_does_not_hold_back_another() {
    let queue = Queue::fifo("sluice-sqs-fifo", 2).await;
    // In moto's queue order: a-0..a-3 and b-0..b-5 fill the first receive of ten; the rest
    // follow. a-3 fails on its first delivery: as the last of group a in its batch it comes
    // back alone, and a-4.. wait behind it, while group b goes on.
    let a = |i: usize| (format!("a-{i}"), Some("a".to_string()));
    let b = |i: usize| (format!("b-{i}"), Some("b".to_string()));
    let mut messages: Vec<(String, Option<String>)> = (0..4).map(a).chain((0..6).map(b)).collect();
    messages.extend((4..7).map(a).chain((6..16).map(b)));
    queue.send_grouped(&messages).await;
    let recorder = Recorder::default();
    let answer = report_failures(|s| s.body == "a-3" && s.receive_count == 1);
    let sluice = start(
        recorder.registry(Duration::ZERO, answer),
        &[],
        &queue.source_yaml("    batch: {size: 10}\n    report_batch_item_failures: true\n"),
    )
    .await;
    let all: Vec<String> = messages.iter().map(|(body, _)| body.clone()).collect();
    recorder.wait_for_all(&all).await;
    queue.wait_empty().await;

    let seen = recorder.seen();
    assert!(
        seen.iter().all(|s| s.group.is_some()),
        "every record names its group: {seen:?}"
    );
    // The last delivery of each message is the one that succeeded: in order within a group.
    let last_delivery = |body: &str| {
        seen.iter()
            .rposition(|s| s.body == body)
            .expect("delivered")
    };
    for group in ["a", "b"] {
        let in_group: Vec<&String> = all.iter().filter(|body| body.starts_with(group)).collect();
        let mut order: Vec<&String> = in_group.clone();
        order.sort_by_key(|body| last_delivery(body));
        assert_eq!(order, in_group, "group {group} was completed out of order");
    }
    let deliveries = |body: &str| seen.iter().filter(|s| s.body == body).count();
    assert_eq!(deliveries("a-3"), 2, "a-3 failed once and came back");
    for body in all.iter().filter(|body| body.starts_with('b')) {
        assert_eq!(deliveries(body), 1, "{body} did not fail, yet came back");
    }
    let a3_retry = seen
        .iter()
        .filter(|s| s.body == "a-3")
        .nth(1)
        .expect("a-3 retried")
        .at;
    let b_done = seen
        .iter()
        .filter(|s| s.group.as_deref() == Some("b"))
        .map(|s| s.at)
        .max()
        .expect("b");
    assert!(
        b_done < a3_retry,
        "group b waited for group a's failed message"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_never_deletes_a_message_behind_a_failed_one_in_its_group() {
    let queue = Queue::fifo("sluice-sqs-fifo-behind", 1).await;
    let messages: Vec<(String, Option<String>)> = (0..3)
        .map(|i| (format!("m-{i}"), Some("g".to_string())))
        .collect();
    queue.send_grouped(&messages).await;
    let recorder = Recorder::default();
    // The function reports only m-1; m-2, behind it, must not be deleted either.
    let answer = report_failures(|s| s.body == "m-1" && s.receive_count == 1);
    let sluice = start(
        recorder.registry(Duration::ZERO, answer),
        &[],
        &queue.source_yaml("    batch: {size: 10}\n    report_batch_item_failures: true\n"),
    )
    .await;
    recorder
        .wait_until("m-1 comes back", |seen| {
            seen.iter().any(|s| s.body == "m-1" && s.receive_count == 2)
        })
        .await;
    queue.wait_empty().await;

    let by_body = recorder.by_body();
    let counts = |body: &str| {
        by_body[body]
            .iter()
            .map(|s| s.receive_count)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        by_body["m-0"][0].invocation, by_body["m-2"][0].invocation,
        "one first batch: {by_body:?}"
    );
    assert_eq!(counts("m-0"), [1], "m-0, before the failure, is done");
    assert_eq!(counts("m-1"), [1, 2]);
    // moto hands the two released messages back in either order, so their order is not
    // asserted here; that m-2 came back at all is the point.
    assert_eq!(counts("m-2"), [1, 2], "m-2 was deleted past the failed m-1");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_batch_on_a_short_visibility_queue_read_by_two_mappings_runs_each_message_once() {
    // The batch window and the function together outlast the 2 s visibility timeout; the
    // messages must stay hidden from the other mapping's pollers all along, which takes an
    // extension before the first second is out, counted from when the receive was sent.
    let queue = Queue::create(
        "sluice-sqs-slow",
        &[(QueueAttributeName::VisibilityTimeout, "2".into())],
    )
    .await;
    let all = bodies("slow", 6);
    queue.send_all(&all).await;
    let recorder = Recorder::default();
    let settings = "    batch: {size: 10, window: 1500ms}\n";
    let sluice = start(
        recorder.registry(Duration::from_millis(1500), succeed()),
        &[("timeout", "2s")],
        &format!(
            "{}{}",
            queue.source_yaml(settings),
            queue.named_source_yaml("again", settings)
        ),
    )
    .await;
    recorder.wait_for_all(&all).await;
    queue.wait_empty().await;
    // Time for a message that reappeared to be run a second time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let by_body = recorder.by_body();
    for body in &all {
        let tries: Vec<u32> = by_body[body].iter().map(|s| s.receive_count).collect();
        assert_eq!(tries, [1], "{body} ran more than once: {by_body:?}");
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_queue_is_long_polled_without_read_errors() {
    let queue = Queue::create("sluice-sqs-idle", &[]).await;
    let recorder = Recorder::default();
    // Its own name in the process-wide metrics.
    let source = unique_name("idle");
    let sluice = start(
        recorder.registry(Duration::ZERO, succeed()),
        &[],
        &format!("sources:\n{}", queue.named_source_yaml(&source, "")),
    )
    .await;
    // Longer than the AWS client's 10 s attempt timeout, shorter than one 20 s long poll.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let label = format!("source=\"{source}\"");
    assert_eq!(
        sluice
            .metric("sluice_mapping_read_errors_total", &[&label])
            .await,
        0.0,
        "a long poll on an idle queue failed"
    );
    queue.send("late").await;
    recorder.wait_for_all(&["late".to_string()]).await;
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visibility_extensions_the_queue_refuses_are_counted() {
    let queue = Queue::create(
        "sluice-sqs-lost-lease",
        &[(QueueAttributeName::VisibilityTimeout, "2".into())],
    )
    .await;
    queue.send("purged").await;
    let recorder = Recorder::default();
    // Its own name in the process-wide metrics.
    let source = unique_name("lease");
    let sluice = start(
        recorder.registry(Duration::from_millis(1800), succeed()),
        &[("timeout", "2s")],
        &format!(
            "sources:\n{}",
            queue.named_source_yaml(&source, "    batch: {size: 1}\n")
        ),
    )
    .await;
    recorder
        .wait_until("the message is delivered", |seen| !seen.is_empty())
        .await;
    // Gone from the queue while the function runs: its receipt handle is no longer valid, and
    // the next extension is refused for it.
    queue
        .client
        .purge_queue()
        .queue_url(&queue.url)
        .send()
        .await
        .expect("purge the queue");
    let label = format!("source=\"{source}\"");
    let started = Instant::now();
    while sluice
        .metric(
            "sluice_mapping_visibility_extension_failures_total",
            &[&label],
        )
        .await
        < 1.0
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no refused visibility extension was counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_queue_whose_visibility_timeout_is_shorter_than_the_function_timeout_is_refused() {
    let logs = Logs::default();
    let _logging = logs.capture();
    let short = Queue::create(
        "sluice-sqs-refused",
        &[(QueueAttributeName::VisibilityTimeout, "1".into())],
    )
    .await;
    let fine = Queue::create(
        "sluice-sqs-beside-refused",
        &[(QueueAttributeName::VisibilityTimeout, "3".into())],
    )
    .await;
    short.send("never").await;
    let all = bodies("beside", 3);
    fine.send_all(&all).await;
    let recorder = Recorder::default();
    let refused = unique_name("refused");
    let sluice = start(
        recorder.registry(Duration::ZERO, succeed()),
        &[("timeout", "3s")],
        &format!(
            "sources:\n{}{}",
            short.named_source_yaml(&refused, ""),
            fine.named_source_yaml("beside", "")
        ),
    )
    .await;
    // The other mapping runs.
    recorder.wait_for_all(&all).await;
    let message = "Queue visibility timeout: 1 seconds is less than Function timeout: 3 seconds";
    let line = logs.wait_for_line(message, PATIENCE).await;
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&refused), "the log names the source: {line}");
    let label = format!("source=\"{refused}\"");
    assert_eq!(
        sluice
            .metric(
                "sluice_mapping_refused_total",
                &[&label, "reason=\"visibility_timeout\""]
            )
            .await,
        1.0
    );
    // Nothing read it: the message is still there, visible.
    assert_eq!(short.counts().await, (1, 0));
    assert!(!recorder.by_body().contains_key("never"));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_on_failure_a_failing_message_moves_to_the_queues_own_redrive_dead_letter_queue() {
    let redrive = Queue::create("sluice-sqs-redrive-dlq", &[]).await;
    let queue = Queue::with_redrive("sluice-sqs-redrive", 1, &redrive, 2).await;
    let good = bodies("fine", 5);
    let poison_id = queue.send("poison").await;
    queue.send_all(&good).await;
    let recorder = Recorder::default();
    let answer = report_failures(|s| s.body == "poison");
    let sluice = start(
        recorder.registry(Duration::ZERO, answer),
        &[],
        &queue.source_yaml("    batch: {size: 10}\n    report_batch_item_failures: true\n"),
    )
    .await;
    let moved = redrive.receive_at_least(1).await;
    queue.wait_empty().await;

    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0].body(), Some("poison"));
    assert_eq!(moved[0].message_id(), Some(poison_id.as_str()));
    let by_body = recorder.by_body();
    let tries: Vec<u32> = by_body["poison"].iter().map(|s| s.receive_count).collect();
    assert_eq!(
        tries,
        [1, 2],
        "tried maxReceiveCount times, then moved by the queue"
    );
    for body in &good {
        assert_eq!(by_body[body].len(), 1, "{body}");
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_batches_spend_no_receive_count_toward_the_redrive() {
    let redrive = Queue::create("sluice-sqs-throttle-dlq", &[]).await;
    // Three visibility timeouts pass while the function is throttled; a message received more
    // than twice meanwhile would be moved to the redrive queue.
    let queue = Queue::with_redrive("sluice-sqs-throttle", 3, &redrive, 2).await;
    let all = bodies("held", 12);
    queue.send_all(&all).await;
    let recorder = Recorder::default();
    let sluice = start(
        recorder.registry(Duration::ZERO, succeed()),
        &[("reserved_concurrency", "0")],
        &queue.source_yaml("    batch: {size: 5}\n    maximum_concurrency: 5\n"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(
        recorder.seen().is_empty(),
        "the function ran while its concurrency was 0"
    );
    let response = sluice
        .http
        .put(format!(
            "{}/2017-10-31/functions/{FUNCTION}/concurrency",
            sluice.url
        ))
        .json(&json!({"ReservedConcurrentExecutions": 5}))
        .send()
        .await
        .expect("PutFunctionConcurrency");
    assert_eq!(
        response.status().as_u16(),
        200,
        "{:?}",
        response.text().await
    );
    recorder.wait_for_all(&all).await;
    queue.wait_empty().await;

    let seen = recorder.seen();
    let counts: BTreeMap<&str, u32> = seen
        .iter()
        .map(|s| (s.body.as_str(), s.receive_count))
        .collect();
    assert!(
        counts.values().all(|n| *n == 1),
        "throttled messages were received again: {counts:?}"
    );
    assert_eq!(
        seen.len(),
        all.len(),
        "each message delivered once: {counts:?}"
    );
    assert_eq!(
        redrive.counts().await,
        (0, 0),
        "a throttled message reached the redrive queue"
    );
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pollers_scale_up_with_a_backlog_within_maximum_concurrency() {
    let queue = Queue::create("sluice-sqs-scale", &[]).await;
    let all = bodies("backlog", 40);
    queue.send_all(&all).await;
    let recorder = Recorder::default();
    let sluice = start(
        recorder.registry(Duration::from_millis(400), succeed()),
        &[],
        &queue.source_yaml("    batch: {size: 1}\n    maximum_concurrency: 5\n"),
    )
    .await;
    recorder.wait_for_all(&all).await;
    queue.wait_empty().await;

    let peak = recorder.peak.load(Ordering::SeqCst);
    assert!(
        peak > 1,
        "one invocation at a time despite a backlog of {}",
        all.len()
    );
    assert!(
        peak <= 5,
        "{peak} concurrent invocations, over maximum_concurrency 5"
    );
    sluice.shutdown().await;
}
