//! RabbitMQ mappings end to end: queues on the RabbitMQ server at 127.0.0.1:5672 (guest/guest;
//! `scripts/test` starts it when it is installed but stopped) read by a Sluice started
//! in-process into a native function that records what it is given and answers as each test
//! tells it. `rabbitmqctl` (installed with the server) counts unacknowledged messages and closes
//! connections from the server side.
//!
//! Every test declares its own queues and exchanges under unique names and deletes them at the
//! end, so that tests share the server. Should a test fail halfway, its queues expire by
//! themselves ten minutes after their last use, and their exchanges go with their last binding.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lambda_events::event::rabbitmq::RabbitMqEvent;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{Function, Sluice, quoted, wait_for_lines};
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use serde_json::{Value, json};
use sluice::{FunctionError, NativeRegistry};
use sluice_integration_tests::unique_name;

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The `eventSourceArn` of every event from that server's `/` vhost.
const BROKER_ARN: &str = "arn:aws:mq:us-east-1:000000000000:broker:127.0.0.1:/";
/// How long a test waits for deliveries before it fails.
const PATIENCE: Duration = Duration::from_secs(60);
/// The function every test maps its queue to.
const FUNCTION: &str = "consumer";
/// Declared queues delete themselves after this long unused (a safety net for failed tests).
const QUEUE_EXPIRES_MS: i32 = 10 * 60 * 1000;

/// The test's own connection, to declare, publish (with publisher confirms) and inspect. Its
/// name says it is the test's, so that it is never mistaken for one of Sluice's.
struct Rabbit {
    _connection: Connection,
    channel: Channel,
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
}

impl Rabbit {
    async fn connect() -> Rabbit {
        let properties = ConnectionProperties::default()
            .with_connection_name(unique_name("test-publisher").as_str().into());
        let connection = Connection::connect(URI, properties).await.unwrap_or_else(|e| {
            panic!(
                "RabbitMQ does not answer at {URI}: {e}. Run the tests with scripts/test, which \
                 starts an installed rabbitmq-server"
            )
        });
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Rabbit {
            _connection: connection,
            channel,
            queues: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
        }
    }

    /// A new durable queue with these arguments (and an expiry), deleted by [`Rabbit::clean_up`].
    async fn queue(&self, prefix: &str, mut arguments: FieldTable) -> String {
        let name = unique_name(prefix);
        arguments.insert("x-expires".into(), AMQPValue::LongInt(QUEUE_EXPIRES_MS));
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::durable(),
                arguments,
            )
            .await
            .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
        self.queues.lock().expect("queues").push(name.clone());
        name
    }

    /// A queue whose rejected messages go to a fanout exchange bound to a second queue: returns
    /// (queue, dead-letter queue).
    async fn queue_with_dead_letter_exchange(&self, prefix: &str) -> (String, String) {
        let exchange = unique_name(&format!("{prefix}-dlx"));
        self.channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the dead-letter exchange");
        self.exchanges
            .lock()
            .expect("exchanges")
            .push(exchange.clone());
        let dead = self
            .queue(&format!("{prefix}-dead"), FieldTable::default())
            .await;
        self.channel
            .queue_bind(
                dead.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the dead-letter queue");
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(exchange.as_str())),
        );
        (self.queue(prefix, arguments).await, dead)
    }

    /// Publishes to `queue` through the default exchange and waits for the broker's confirm.
    async fn publish(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        let confirmation = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("publisher confirm");
        assert!(
            matches!(confirmation, Confirmation::Ack(None)),
            "the broker did not take the message: {confirmation:?}"
        );
    }

    /// Publishes each body with its body as the message id, in order.
    async fn publish_all(&self, queue: &str, bodies: &[String]) {
        for body in bodies {
            self.publish(
                queue,
                body.as_bytes(),
                BasicProperties::default().with_message_id(body.as_str().into()),
            )
            .await;
        }
    }

    /// Messages ready in `queue` (not counting those delivered and not yet acknowledged).
    async fn ready(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("passive declare {queue}: {e}"))
            .message_count()
    }

    /// Waits until `queue` holds no message, ready or unacknowledged: every one was acknowledged
    /// (or rejected) by its consumer.
    async fn wait_drained(&self, queue: &str) {
        let started = Instant::now();
        loop {
            if self.ready(queue).await == 0 {
                // Only the server knows what is delivered and not yet acknowledged.
                let depth = depth(queue);
                if depth == (0, 0) {
                    return;
                }
                assert!(
                    started.elapsed() < PATIENCE,
                    "{queue}: (ready, unacknowledged) = {depth:?} after {PATIENCE:?}"
                );
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{queue} still has ready messages after {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Takes (and acknowledges) the next message of `queue`, if any.
    async fn get(&self, queue: &str) -> Option<BasicGetMessage> {
        self.channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap_or_else(|e| panic!("basic.get {queue}: {e}"))
    }

    /// Takes the next message of `queue`, waiting for it.
    async fn wait_get(&self, queue: &str) -> BasicGetMessage {
        let started = Instant::now();
        loop {
            if let Some(message) = self.get(queue).await {
                return message;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "no message arrived in {queue} within {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes every queue and exchange this test declared.
    async fn clean_up(self) {
        let queues = self.queues.into_inner().expect("queues");
        let exchanges = self.exchanges.into_inner().expect("exchanges");
        for queue in queues {
            self.channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .unwrap_or_else(|e| panic!("delete queue {queue}: {e}"));
        }
        for exchange in exchanges {
            // Auto-delete: gone already with its last binding, and then this is a no-op.
            let _ = self
                .channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

/// `rabbitmqctl` with these arguments; its standard output.
fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl (installed with rabbitmq-server): {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (ready, unacknowledged) messages of `queue`, as the server counts them.
fn depth(queue: &str) -> (u64, u64) {
    let list = rabbitmqctl(&[
        "list_queues",
        "-p",
        "/",
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "--no-table-headers",
        "--quiet",
    ]);
    list.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&queue))
        .map(|fields| {
            let n = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse().ok())
                    .unwrap_or(u64::MAX)
            };
            (n(1), n(2))
        })
        .unwrap_or_else(|| panic!("{queue} is not listed: {list}"))
}

/// Closes, from the server side, every connection whose client properties contain `marker`;
/// returns how many.
fn close_connections(marker: &str) -> usize {
    // The table form: the json formatter writes pids in a form close_connection rejects.
    let list = rabbitmqctl(&[
        "list_connections",
        "pid",
        "client_properties",
        "--no-table-headers",
        "--quiet",
    ]);
    let pids: Vec<&str> = list
        .lines()
        .filter(|line| line.contains(marker))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    for pid in &pids {
        rabbitmqctl(&["close_connection", pid, "closed by a test"]);
    }
    pids.len()
}

/// One message as the function was given it.
#[derive(Debug, Clone)]
struct Seen {
    body: Vec<u8>,
    message_id: Option<String>,
    redelivered: bool,
    /// Which invocation (in the order they started) carried it.
    invocation: usize,
    /// The message as the event holds it.
    message: Value,
}

impl Seen {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What the function answers for a batch.
type Answer = Arc<dyn Fn(&[Seen]) -> Result<Value, FunctionError> + Send + Sync>;

fn succeed() -> Answer {
    Arc::new(|_| Ok(Value::Null))
}

/// Fails every batch that holds the message `poison`.
fn fail_on_poison() -> Answer {
    Arc::new(|batch: &[Seen]| {
        if batch.iter().any(|s| s.body == b"poison") {
            Err(FunctionError::new("Poisoned", "cannot digest poison"))
        } else {
            Ok(Value::Null)
        }
    })
}

/// Invocations that hold back their answer from the `after`-th message on, until opened.
#[derive(Default)]
struct Hold {
    after: usize,
    holding: AtomicBool,
    open: AtomicBool,
}

/// The native function [`FUNCTION`]: records every event and message it is given, then
/// answers as told.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    events: Arc<Mutex<Vec<Value>>>,
    invocations: Arc<AtomicUsize>,
}

impl Recorder {
    fn registry(&self, answer: Answer) -> NativeRegistry {
        self.registry_holding(answer, None)
    }

    fn registry_holding(&self, answer: Answer, hold: Option<Arc<Hold>>) -> NativeRegistry {
        let mut registry = NativeRegistry::new();
        let this = self.clone();
        registry.register(FUNCTION, move |event: Value, _ctx| {
            let (this, answer, hold) = (this.clone(), answer.clone(), hold.clone());
            async move {
                let (batch, total) = {
                    let mut seen = this.seen.lock().expect("seen");
                    let invocation = this.invocations.fetch_add(1, Ordering::SeqCst);
                    let batch = decode(&event, invocation);
                    seen.extend(batch.iter().cloned());
                    this.events.lock().expect("events").push(event);
                    (batch, seen.len())
                };
                if let Some(hold) = hold
                    && total >= hold.after
                    && !hold.open.load(Ordering::SeqCst)
                {
                    hold.holding.store(true, Ordering::SeqCst);
                    while !hold.open.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                answer(&batch)
            }
        });
        registry
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    fn events(&self) -> Vec<Value> {
        self.events.lock().expect("events").clone()
    }

    /// Deliveries by body.
    fn by_body(&self) -> BTreeMap<String, Vec<Seen>> {
        let mut by_body: BTreeMap<String, Vec<Seen>> = BTreeMap::new();
        for s in self.seen() {
            by_body.entry(s.text()).or_default().push(s);
        }
        by_body
    }

    async fn wait_until(&self, what: &str, done: impl Fn(&[Seen]) -> bool) {
        let started = Instant::now();
        while !done(&self.seen()) {
            assert!(
                started.elapsed() < PATIENCE,
                "timed out waiting until {what}; seen: {:?}",
                self.seen().iter().map(Seen::text).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every one of `bodies` was delivered at least once.
    async fn wait_for_all(&self, bodies: &[String]) {
        self.wait_until(
            &format!("all {} messages are delivered", bodies.len()),
            |seen| {
                let got: BTreeSet<String> = seen.iter().map(Seen::text).collect();
                bodies.iter().all(|b| got.contains(b))
            },
        )
        .await;
    }
}

/// The messages of an `aws:rmq` event, of whichever queue.
fn decode(event: &Value, invocation: usize) -> Vec<Seen> {
    let Some(queues) = event["rmqMessagesByQueue"].as_object() else {
        return Vec::new();
    };
    queues
        .values()
        .filter_map(Value::as_array)
        .flatten()
        .map(|m| Seen {
            body: m["data"]
                .as_str()
                .and_then(|d| BASE64.decode(d).ok())
                .unwrap_or_default(),
            message_id: m["basicProperties"]["messageId"]
                .as_str()
                .map(str::to_string),
            redelivered: m["redelivered"].as_bool().unwrap_or(false),
            invocation,
            message: m.clone(),
        })
        .collect()
}

/// Starts Sluice with the native [`FUNCTION`] and `yaml` (sources, dead letters).
async fn start(registry: NativeRegistry, yaml: &str) -> Sluice {
    let function = Function::native(FUNCTION).set("timeout", "30s");
    Sluice::start_native_in(Sluice::new_dir(), &[function], yaml, registry).await
}

/// `sources:` YAML mapping `queue` to [`FUNCTION`], with more settings (YAML lines under the
/// source, already indented by four spaces).
fn source_yaml(queue: &str, settings: &str) -> String {
    format!(
        "sources:\n  queue:\n    type: rabbitmq\n    function: {FUNCTION}\n    uri: {}\n    queue: {}\n{settings}",
        quoted(URI),
        quoted(queue),
    )
}

/// The connection name Sluice's source uses for `queue` (`RabbitMqSource::connect`).
fn source_connection(queue: &str) -> String {
    format!("sluice {queue}")
}

fn bodies(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

fn invocation_sizes(seen: &[Seen]) -> BTreeMap<usize, usize> {
    let mut sizes = BTreeMap::new();
    for s in seen {
        *sizes.entry(s.invocation).or_default() += 1;
    }
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_every_message_once_in_publish_order_in_lambdas_rmq_shape_and_acks_it() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit
        .queue("sluice-rmq-shape", FieldTable::default())
        .await;
    let mut published = Vec::new();
    for i in 0..25i32 {
        let body = format!("{{\"order\": {i}}}");
        let mut headers = FieldTable::default();
        headers.insert(
            "tenant".into(),
            AMQPValue::LongString(LongString::from("acme")),
        );
        headers.insert("n".into(), AMQPValue::LongInt(i));
        let properties = BasicProperties::default()
            .with_message_id(format!("order-{i}").as_str().into())
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(3)
            .with_correlation_id(format!("corr-{i}").as_str().into())
            .with_reply_to("replies".into())
            .with_expiration("600000".into())
            .with_timestamp(1_700_000_000)
            .with_type("order.created".into())
            .with_user_id("guest".into())
            .with_app_id("shop".into());
        rabbit.publish(&queue, body.as_bytes(), properties).await;
        published.push(body);
    }
    // Not JSON, and no properties at all.
    let binary = b"\x00\xffbinary".to_vec();
    rabbit
        .publish(&queue, &binary, BasicProperties::default())
        .await;

    let recorder = Recorder::default();
    let sluice = start(
        recorder.registry(succeed()),
        &source_yaml(&queue, "    batch: {size: 10}\n"),
    )
    .await;
    recorder
        .wait_until("all 26 messages are delivered", |seen| seen.len() >= 26)
        .await;
    rabbit.wait_drained(&queue).await;

    let seen = recorder.seen();
    let order: Vec<Vec<u8>> = seen.iter().map(|s| s.body.clone()).collect();
    let mut expected: Vec<Vec<u8>> = published.iter().map(|b| b.as_bytes().to_vec()).collect();
    expected.push(binary.clone());
    assert_eq!(order, expected, "each message once, in publish order");
    for (i, s) in seen.iter().take(25).enumerate() {
        let m = &s.message;
        assert_eq!(m["data"], BASE64.encode(&published[i]), "{m}");
        assert_eq!(m["redelivered"], false, "{m}");
        let p = &m["basicProperties"];
        assert_eq!(p["messageId"], format!("order-{i}"), "{m}");
        assert_eq!(p["contentType"], "application/json", "{m}");
        assert_eq!(p["contentEncoding"], "utf-8", "{m}");
        // Gson's rendering of the Java client's LongString: signed bytes.
        assert_eq!(
            p["headers"]["tenant"],
            json!({"bytes": [97, 99, 109, 101]}),
            "{m}"
        );
        assert_eq!(p["headers"]["n"], i, "{m}");
        assert_eq!(p["deliveryMode"], 2, "{m}");
        assert_eq!(p["priority"], 3, "{m}");
        assert_eq!(p["correlationId"], format!("corr-{i}"), "{m}");
        assert_eq!(p["replyTo"], "replies", "{m}");
        assert_eq!(p["expiration"], "600000", "{m}");
        assert_eq!(p["timestamp"], "Nov 14, 2023, 10:13:20 PM", "{m}");
        assert_eq!(p["type"], "order.created", "{m}");
        assert_eq!(p["userId"], "guest", "{m}");
        assert_eq!(p["appId"], "shop", "{m}");
        assert_eq!(p["bodySize"], published[i].len(), "{m}");
    }
    let last = &seen[25].message;
    assert_eq!(last["data"], BASE64.encode(&binary), "{last}");
    let p = &last["basicProperties"];
    assert_eq!(
        (&p["deliveryMode"], &p["priority"]),
        (&json!(1), &json!(0)),
        "AMQP's defaults: {last}"
    );
    assert_eq!(p["headers"], json!({}), "{last}");
    assert_eq!(p["messageId"], Value::Null, "{last}");
    assert_eq!(p["bodySize"], binary.len(), "{last}");

    let key = format!("{queue}::/");
    for event in recorder.events() {
        assert_eq!(event["eventSource"], "aws:rmq", "{event}");
        assert_eq!(event["eventSourceArn"], BROKER_ARN, "{event}");
        let queues: Vec<&String> = event["rmqMessagesByQueue"]
            .as_object()
            .expect("rmqMessagesByQueue")
            .keys()
            .collect();
        assert_eq!(queues, [&key], "keyed `queue::vhost`: {event}");
        let parsed: RabbitMqEvent = serde_json::from_value(event.clone())
            .unwrap_or_else(|e| panic!("not an aws:rmq event ({e}): {event}"));
        assert!(!parsed.messages_by_queue[&key].is_empty());
    }
    let sizes = invocation_sizes(&seen);
    assert!(
        sizes.values().all(|n| *n <= 10),
        "a batch over batch.size: {sizes:?}"
    );

    sluice.shutdown().await;
    assert_eq!(
        rabbit.ready(&queue).await,
        0,
        "a message came back after Sluice stopped"
    );
    rabbit.clean_up().await;
}

/// Where the poison message of [`poison_goes_to_the_on_failure_dead_letter_while_the_rest_flow`]
/// ends.
enum DeadLetterKind {
    File,
    RabbitMq,
}

/// 20 good messages and one that always fails, one message per invocation, with the default
/// retries (`max_attempts` 4 for RabbitMQ): the poison is tried five times, written to the
/// `on_failure` dead letter with its payload and every attempt, and then acknowledged (not
/// rejected: the queue's own dead-letter exchange receives nothing); every good message is
/// delivered once and acknowledged.
async fn poison_goes_to_the_on_failure_dead_letter_while_the_rest_flow(kind: DeadLetterKind) {
    let rabbit = Rabbit::connect().await;
    let (queue, rejected) = rabbit
        .queue_with_dead_letter_exchange("sluice-rmq-poison")
        .await;
    let good = bodies("good", 20);
    let mut all = good.clone();
    all.insert(10, "poison".to_string());
    rabbit.publish_all(&queue, &all).await;
    let (dead_letter_yaml, target) = match kind {
        DeadLetterKind::File => (
            "dead_letters:\n  failed: {type: file, path: ./failed.jsonl}\n".to_string(),
            None,
        ),
        DeadLetterKind::RabbitMq => {
            let target = rabbit
                .queue("sluice-rmq-poison-target", FieldTable::default())
                .await;
            (
                format!(
                    "dead_letters:\n  failed: {{type: rabbitmq, uri: {}, routing_key: {}}}\n",
                    quoted(URI),
                    quoted(&target)
                ),
                Some(target),
            )
        }
    };
    let recorder = Recorder::default();
    let sluice = start(
        recorder.registry(fail_on_poison()),
        &format!(
            "{}{dead_letter_yaml}",
            source_yaml(&queue, "    batch: {size: 1}\n    on_failure: failed\n")
        ),
    )
    .await;
    let dead: Vec<Value> = match &target {
        None => wait_for_lines(&sluice.dir().join("failed.jsonl"), 1, PATIENCE).await,
        Some(target) => {
            let message = rabbit.wait_get(target).await;
            let properties = &message.delivery.properties;
            assert_eq!(*properties.delivery_mode(), Some(2), "a persistent message");
            assert_eq!(
                properties.content_type().as_ref().map(|c| c.as_str()),
                Some("application/json")
            );
            vec![serde_json::from_slice(&message.delivery.data).expect("a JSON dead letter")]
        }
    };
    recorder.wait_for_all(&all).await;
    rabbit.wait_drained(&queue).await;

    let by_body = recorder.by_body();
    for body in &good {
        assert_eq!(
            by_body[body].len(),
            1,
            "{body} was delivered {} times",
            by_body[body].len()
        );
    }
    assert_eq!(
        by_body["poison"].len(),
        5,
        "the poison is tried once and retried retry.max_attempts (default 4) times"
    );
    assert_eq!(dead.len(), 1, "one dead letter: {dead:?}");
    let record = &dead[0];
    assert_eq!(
        record["requestContext"]["condition"], "RetryAttemptsExhausted",
        "{record}"
    );
    assert_eq!(
        record["requestContext"]["approximateInvokeCount"], 5,
        "{record}"
    );
    assert_eq!(
        record["responseContext"]["functionError"], "Unhandled",
        "{record}"
    );
    assert_eq!(record["RabbitMQBatchInfo"]["batchSize"], 1, "{record}");
    assert_eq!(
        record["RabbitMQBatchInfo"]["streamArn"], BROKER_ARN,
        "{record}"
    );
    assert_eq!(record["sluice"]["source"], "queue", "{record}");
    assert_eq!(record["sluice"]["function"], FUNCTION, "{record}");
    let records = record["sluice"]["records"]
        .as_array()
        .expect("sluice.records");
    assert_eq!(records.len(), 1, "{record}");
    assert_eq!(
        records[0]["data"],
        BASE64.encode("poison"),
        "the payload: {record}"
    );
    assert_eq!(
        records[0]["basicProperties"]["messageId"], "poison",
        "{record}"
    );
    let attempts = record["sluice"]["attempts"]
        .as_array()
        .expect("sluice.attempts");
    assert_eq!(
        attempts.len(),
        5,
        "every attempt is in the dead letter: {record}"
    );
    for attempt in attempts {
        assert_eq!(attempt["errorType"], "Poisoned", "{record}");
        assert_eq!(attempt["errorMessage"], "cannot digest poison", "{record}");
        assert_eq!(attempt["records"], 1, "{record}");
    }
    match &target {
        Some(target) => assert!(rabbit.get(target).await.is_none(), "written once"),
        None => assert_eq!(
            common::json_lines(&sluice.dir().join("failed.jsonl")).len(),
            1,
            "written once"
        ),
    }
    assert!(
        rabbit.get(&rejected).await.is_none(),
        "the poison was also rejected to the queue's own dead-letter exchange"
    );
    sluice.shutdown().await;
    rabbit.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_goes_to_a_rabbitmq_dead_letter_with_its_payload_and_attempts_while_the_rest_flow()
 {
    poison_goes_to_the_on_failure_dead_letter_while_the_rest_flow(DeadLetterKind::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_goes_to_a_file_dead_letter_with_its_payload_and_attempts_while_the_rest_flow()
 {
    poison_goes_to_the_on_failure_dead_letter_while_the_rest_flow(DeadLetterKind::File).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_on_failure_a_poison_message_is_rejected_to_the_queues_dead_letter_exchange() {
    let rabbit = Rabbit::connect().await;
    let (queue, dead) = rabbit
        .queue_with_dead_letter_exchange("sluice-rmq-reject")
        .await;
    let good = bodies("fine", 6);
    let mut all = good.clone();
    all.insert(3, "poison".to_string());
    rabbit.publish_all(&queue, &all).await;
    let recorder = Recorder::default();
    let sluice = start(
        recorder.registry(fail_on_poison()),
        &source_yaml(&queue, "    batch: {size: 1}\n"),
    )
    .await;
    let moved = rabbit.wait_get(&dead).await;
    recorder.wait_for_all(&all).await;
    rabbit.wait_drained(&queue).await;

    assert_eq!(moved.delivery.data, b"poison");
    let headers = moved
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let death = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
            Some(AMQPValue::FieldTable(death)) => death.clone(),
            other => panic!("x-death holds {other:?}"),
        },
        other => panic!("the broker did not dead-letter it (x-death: {other:?}): {headers:?}"),
    };
    let text = |key: &str| match death.inner().get(key) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.to_string(),
        other => panic!("x-death {key}: {other:?}"),
    };
    assert_eq!(text("reason"), "rejected", "{death:?}");
    assert_eq!(text("queue"), queue, "{death:?}");
    assert!(
        rabbit.get(&dead).await.is_none(),
        "only the poison is dead-lettered"
    );
    let by_body = recorder.by_body();
    assert_eq!(
        by_body["poison"].len(),
        5,
        "tried once and retried 4 times, then rejected"
    );
    for body in &good {
        assert_eq!(by_body[body].len(), 1, "{body}");
    }
    sluice.shutdown().await;
    rabbit.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_item_failures_retry_only_the_failed_message_and_ack_the_rest() {
    let rabbit = Rabbit::connect().await;
    let (queue, rejected) = rabbit
        .queue_with_dead_letter_exchange("sluice-rmq-partial")
        .await;
    let all = bodies("item", 8);
    rabbit.publish_all(&queue, &all).await;
    let recorder = Recorder::default();
    // item-003 fails the first time it is seen, and only then; the function names it by its
    // message id.
    let tries = Arc::new(AtomicUsize::new(0));
    let answer: Answer = {
        let tries = tries.clone();
        Arc::new(move |batch: &[Seen]| {
            let failed: Vec<Value> = batch
                .iter()
                .filter(|s| s.body == b"item-003" && tries.fetch_add(1, Ordering::SeqCst) == 0)
                .map(|s| json!({"itemIdentifier": s.message_id}))
                .collect();
            Ok(json!({ "batchItemFailures": failed }))
        })
    };
    let sluice = start(
        recorder.registry(answer),
        &source_yaml(
            &queue,
            "    batch: {size: 10, window: 1s}\n    report_batch_item_failures: true\n",
        ),
    )
    .await;
    recorder
        .wait_until("item-003 comes back", |seen| {
            seen.iter().filter(|s| s.body == b"item-003").count() >= 2
        })
        .await;
    rabbit.wait_drained(&queue).await;

    let by_body = recorder.by_body();
    assert_eq!(
        by_body.keys().cloned().collect::<Vec<_>>(),
        all,
        "every message was delivered"
    );
    let first = by_body["item-000"][0].invocation;
    assert!(
        all.iter().all(|body| by_body[body][0].invocation == first),
        "the eight messages share their first batch: {:?}",
        invocation_sizes(&recorder.seen())
    );
    for (body, deliveries) in &by_body {
        let want = if body == "item-003" { 2 } else { 1 };
        assert_eq!(
            deliveries.len(),
            want,
            "{body}: delivered {} times; only the reported failure is retried",
            deliveries.len()
        );
    }
    assert!(
        rabbit.get(&rejected).await.is_none(),
        "nothing was rejected"
    );
    sluice.shutdown().await;
    rabbit.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_drop_and_acknowledge_the_messages_they_do_not_match() {
    let rabbit = Rabbit::connect().await;
    let (queue, rejected) = rabbit
        .queue_with_dead_letter_exchange("sluice-rmq-filter")
        .await;
    let mut kept = Vec::new();
    for i in 0..10 {
        let keep = format!("{{\"kind\": \"keep\", \"n\": {i}}}");
        let drop = format!("{{\"kind\": \"drop\", \"n\": {i}}}");
        rabbit
            .publish(&queue, keep.as_bytes(), BasicProperties::default())
            .await;
        rabbit
            .publish(&queue, drop.as_bytes(), BasicProperties::default())
            .await;
        kept.push(keep);
    }
    // Not JSON: a pattern on `data` cannot match it.
    rabbit
        .publish(&queue, b"kind keep", BasicProperties::default())
        .await;
    let recorder = Recorder::default();
    let sluice = start(
        recorder.registry(succeed()),
        &source_yaml(
            &queue,
            "    batch: {size: 5}\n    filters:\n      - data: { kind: [keep] }\n",
        ),
    )
    .await;
    recorder.wait_for_all(&kept).await;
    rabbit.wait_drained(&queue).await;

    let delivered: Vec<String> = recorder.seen().iter().map(Seen::text).collect();
    assert_eq!(
        delivered, kept,
        "only the matching messages, each once, in order"
    );
    assert!(
        rabbit.get(&rejected).await.is_none(),
        "filtered messages are acknowledged, not rejected"
    );
    sluice.shutdown().await;
    assert_eq!(
        rabbit.ready(&queue).await,
        0,
        "a filtered message came back"
    );
    rabbit.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_server_closes_its_connection_and_delivers_every_message() {
    const MESSAGES: usize = 400;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit
        .queue("sluice-rmq-reconnect", FieldTable::default())
        .await;
    let all = bodies("m", MESSAGES);
    rabbit.publish_all(&queue, &all).await;
    let recorder = Recorder::default();
    // From the 50th message on, the function holds its answer until the connection is closed:
    // a batch is in flight, and more sit unacknowledged in the prefetch, when it goes.
    let hold = Arc::new(Hold {
        after: 50,
        ..Hold::default()
    });
    let sluice = start(
        recorder.registry_holding(succeed(), Some(hold.clone())),
        &source_yaml(&queue, "    prefetch: 30\n    batch: {size: 10}\n"),
    )
    .await;
    let started = Instant::now();
    while !hold.holding.load(Ordering::SeqCst) {
        assert!(
            started.elapsed() < PATIENCE,
            "no invocation reached the hold"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let in_flight: BTreeSet<String> = {
        let seen = recorder.seen();
        let last = seen.last().expect("a batch is held").invocation;
        seen.iter()
            .filter(|s| s.invocation == last)
            .map(Seen::text)
            .collect()
    };
    let closed = close_connections(&source_connection(&queue));
    assert_eq!(
        closed, 1,
        "Sluice's connection for {queue} was found and closed"
    );
    hold.open.store(true, Ordering::SeqCst);
    recorder.wait_for_all(&all).await;
    rabbit.wait_drained(&queue).await;

    let by_body = recorder.by_body();
    assert_eq!(by_body.len(), MESSAGES, "every message was delivered");
    for body in &in_flight {
        assert!(
            by_body[body].iter().any(|s| s.redelivered),
            "{body} was in flight at the close, and its acknowledgement went with the \
             connection: the broker must have delivered it again"
        );
    }
    let deliveries: usize = by_body.values().map(Vec::len).sum();
    assert!(
        deliveries >= MESSAGES + in_flight.len(),
        "{deliveries} deliveries: the in-flight batch came back"
    );
    let repeated: usize = by_body.values().filter(|d| d.len() > 1).count();
    assert!(
        repeated <= 30,
        "{repeated} messages were delivered twice, more than the prefetch of 30 could hold"
    );
    sluice.shutdown().await;
    rabbit.clean_up().await;
}
