//! The fault campaign: the asynchronous queue and every poll source (SQS, Kinesis and DynamoDB
//! Streams on moto, RabbitMQ, Kafka on tansu) run through the faults Sluice promises to survive
//! (DESIGN.md §2), with the `sluice` binary as operators run it:
//!
//! - `kill/*`: `sluice run` killed with SIGKILL at random instants while records stream in,
//!   and restarted, at least 20 times per source;
//! - `broker/*`: the source's server unreachable or hung mid-stream (a private moto_server
//!   frozen with SIGSTOP, links to it, to RabbitMQ and to a private tansu cut);
//! - `postgres/*`: a private PostgreSQL cluster holding the state stopped (immediate mode) and
//!   started again mid-stream;
//! - `dlq-full/*`: the dead-letter destination down (a file on a full tmpfs), and Sluice
//!   killed meanwhile;
//! - `function/*`: a function that hangs, crashes at random or floods its output.
//!
//! It prints one line per scenario (`scenario  records-in  delivered  dead-lettered  lost
//! duplicates`) and asserts that nothing is lost: every record the source accepted was
//! delivered or dead-lettered. Scenarios share nothing and run concurrently, so the whole
//! campaign stays within a few minutes. The recording function is served by the test itself
//! (`runtime: http`), so deliveries are counted even while Sluice is being killed.
//! `FAULT_SEED=N` replays the random instants of an earlier run, `FAULT_ONLY=kill,dlq` runs the
//! scenarios whose names hold one of the words, and `FAULT_KEEP=1` keeps each scenario's
//! directory (configuration and Sluice's log).
//!
//! No mock stands in for a server: every fault happens to a real one. moto and tansu keep their
//! data in memory, so restarting them would empty the queue or topic under test; for them (and
//! for the RabbitMQ server the other tests share) a TCP link between Sluice and the server is
//! cut, which Sluice sees as the server going away, and the private moto is also frozen with
//! SIGSTOP, which Sluice sees as a server that hangs. PostgreSQL, whose data survives, is
//! really stopped and started.

mod common;
mod faults;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::{SLUICE, Server, free_port, write};
use faults::{Answer, Recorder, Rng, Row, Tally, aws, http};
use serde_json::{Value, json};

/// Kills of `sluice run` per source in the `kill/*` scenarios.
const KILLS: usize = 20;
/// A record is produced this often while a scenario's faults happen.
const PRODUCE_EVERY: Duration = Duration::from_millis(60);
/// How long, after the faults, every record has to reach its outcome.
const DRAIN: Duration = Duration::from_secs(75);
/// How long the state store's PostgreSQL is down in the first outage: past the 30 s a
/// connection pool waits for a connection by default, so that waits turn into errors.
const PG_OUTAGE: Duration = Duration::from_secs(35);
const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn moto() -> String {
    std::env::var("SLUICE_TEST_MOTO").unwrap_or_else(|_| {
        panic!("SLUICE_TEST_MOTO is not set: run the fault campaign with scripts/test")
    })
}

/// `SLUICE_TEST_KAFKA`, unless it is the placeholder that says no Kafka broker is there.
fn kafka() -> Option<String> {
    std::env::var("SLUICE_TEST_KAFKA")
        .ok()
        .filter(|k| k != "127.0.0.1:9")
}

fn tansu_binary() -> Option<PathBuf> {
    let home = std::env::var("HOME").ok()?;
    let cache = std::env::var("SLUICE_CACHE").unwrap_or_else(|_| format!("{home}/.cache/sluice"));
    let path = PathBuf::from(cache).join("tansu/bin/tansu");
    path.exists().then_some(path)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// What every scenario is given.
#[derive(Clone)]
struct Ctx {
    recorder: Recorder,
    seed: u64,
}

type KafkaOffsets = Arc<std::sync::Mutex<std::collections::BTreeMap<String, (i32, i64)>>>;

/// Where a scenario's records go in, and how one is sent.
#[derive(Clone)]
enum Source {
    Sqs {
        endpoint: String,
        url: String,
    },
    Kinesis {
        endpoint: String,
        stream: String,
    },
    Dynamo {
        endpoint: String,
        table: String,
    },
    Rabbit {
        channel: lapin::Channel,
        queue: String,
    },
    Kafka {
        producer: rdkafka::producer::FutureProducer,
        topic: String,
        /// Where each record landed: (partition, offset) by id.
        offsets: KafkaOffsets,
    },
    /// Asynchronous invokes to the Sluice listening on `port`.
    Async {
        port: u16,
    },
}

/// The outcome of one send.
enum Sent {
    Yes,
    /// The request went out and no answer came back: the record may be in.
    Unknown,
    No,
}

impl Source {
    async fn send(&self, http: &reqwest::Client, id: &str) -> Sent {
        let aws_outcome = |r: Result<Value, String>| match r {
            Ok(_) => Sent::Yes,
            Err(_) => Sent::Unknown,
        };
        match self {
            Source::Sqs { endpoint, url } => aws_outcome(
                aws(
                    http,
                    endpoint,
                    "sqs",
                    "SendMessage",
                    json!({"QueueUrl": url, "MessageBody": id}),
                )
                .await,
            ),
            Source::Kinesis { endpoint, stream } => aws_outcome(
                aws(
                    http,
                    endpoint,
                    "kinesis",
                    "PutRecord",
                    json!({"StreamName": stream, "Data": B64.encode(id), "PartitionKey": id}),
                )
                .await,
            ),
            Source::Dynamo { endpoint, table } => aws_outcome(
                aws(
                    http,
                    endpoint,
                    "dynamodb",
                    "PutItem",
                    json!({"TableName": table, "Item": {"id": {"S": id}}}),
                )
                .await,
            ),
            Source::Rabbit { channel, queue } => {
                let published = channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        lapin::options::BasicPublishOptions::default(),
                        id.as_bytes(),
                        lapin::BasicProperties::default().with_delivery_mode(2),
                    )
                    .await;
                match published {
                    Ok(confirm) => match confirm.await {
                        Ok(c) if c.is_ack() => Sent::Yes,
                        _ => Sent::Unknown,
                    },
                    Err(_) => Sent::No,
                }
            }
            Source::Kafka {
                producer,
                topic,
                offsets,
            } => {
                let record = rdkafka::producer::FutureRecord::to(topic)
                    .key(id)
                    .payload(id);
                match producer.send(record, Duration::from_secs(10)).await {
                    Ok(delivery) => {
                        offsets
                            .lock()
                            .expect("offsets")
                            .insert(id.to_string(), (delivery.partition, delivery.offset));
                        Sent::Yes
                    }
                    Err(_) => Sent::Unknown,
                }
            }
            Source::Async { port } => {
                let response = http
                    .post(format!(
                        "http://127.0.0.1:{port}/2015-03-31/functions/f/invocations"
                    ))
                    .header("X-Amz-Invocation-Type", "Event")
                    .body(json!({"id": id}).to_string())
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().as_u16() == 202 => Sent::Yes,
                    Ok(_) => Sent::No,
                    Err(e) if e.is_connect() => Sent::No,
                    Err(_) => Sent::Unknown,
                }
            }
        }
    }
}

/// Sends records `fc:<scenario>:<n>` every [`PRODUCE_EVERY`] until stopped; a record that was
/// refused is sent again at the next tick.
struct Producer {
    stop: Arc<AtomicBool>,
    /// Sends the source refused so far (Sluice or its state store down, say).
    refused: Arc<AtomicUsize>,
    /// The longest any accepted send took, in milliseconds.
    slowest_ms: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<(BTreeSet<String>, BTreeSet<String>, usize)>,
}

impl Producer {
    fn start(scenario: &str, source: Source, poison_every: Option<usize>) -> Producer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let refused = Arc::new(AtomicUsize::new(0));
        let refusals = refused.clone();
        let slowest_ms = Arc::new(AtomicUsize::new(0));
        let slowest = slowest_ms.clone();
        let scenario = scenario.to_string();
        let task = tokio::spawn(async move {
            let http = http();
            let (mut sent, mut unknown, mut refused) = (BTreeSet::new(), BTreeSet::new(), 0);
            let mut n = 0;
            while !flag.load(Ordering::SeqCst) {
                let poison = poison_every.is_some_and(|every| n % every == every - 1);
                let id = format!("fc:{scenario}:{n}{}", if poison { ":poison" } else { "" });
                let sending = Instant::now();
                match source.send(&http, &id).await {
                    Sent::Yes => {
                        slowest.fetch_max(sending.elapsed().as_millis() as usize, Ordering::SeqCst);
                        sent.insert(id);
                        n += 1;
                    }
                    Sent::Unknown => {
                        unknown.insert(id);
                        n += 1;
                    }
                    Sent::No => {
                        refused += 1;
                        refusals.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(PRODUCE_EVERY).await;
            }
            (sent, unknown, refused)
        });
        Producer {
            stop,
            refused,
            slowest_ms,
            task,
        }
    }

    async fn stop(self, tally: &mut Tally) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let (sent, unknown, refused) = self.task.await.expect("the producer");
        tally.sent.extend(sent);
        tally.uncertain.extend(unknown);
        refused
    }
}

/// A `sluice run` of one scenario: its directory, configuration and port.
struct Instance {
    dir: tempfile::TempDir,
    config: PathBuf,
    port: u16,
}

impl Instance {
    /// `body` is the configuration after the `state:` line; `{fn}` in it is replaced with the
    /// recorder's URL for the scenario.
    fn new(state: Option<&str>, body: &str) -> Instance {
        let dir = tempfile::tempdir().expect("scenario directory");
        let state = state.map_or_else(|| "sqlite://./data/state.db".to_string(), str::to_string);
        let config = write(
            dir.path(),
            "sluice.yaml",
            &format!("state: {}\n{body}", Value::from(state)),
        );
        let mut dir = dir;
        if std::env::var_os("FAULT_KEEP").is_some() {
            dir.disable_cleanup(true);
            println!("keeping {}", dir.path().display());
        }
        Instance {
            dir,
            config,
            port: free_port(),
        }
    }

    async fn start(&self) -> Server {
        let config = self.config.clone();
        let port = self.port;
        let log = self.dir.path().join("sluice.log");
        tokio::task::spawn_blocking(move || start_logged(&config, port, &log))
            .await
            .expect("sluice starts")
    }
}

/// Starts `sluice run -c CONFIG` on `port`, appending its log to `log` (kept with the scenario's
/// directory when `FAULT_KEEP` is set), and waits until it listens.
fn start_logged(config: &Path, port: u16, log: &Path) -> Server {
    use std::io::{BufRead, BufReader, Write};
    let child = std::process::Command::new(SLUICE)
        .args(["run", "-c"])
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--grace", "5s"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sluice starts");
    let mut server = Server(child);
    let stderr = server.0.stderr.take().expect("stderr");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("sluice log");
    let (tx, rx) = std::sync::mpsc::channel();
    // Keeps draining stderr after the start, so that a chatty Sluice never blocks on it.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(file, "{line}");
            if line.contains("Sluice is listening") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("sluice said it is listening");
    server
}

/// Kills the server at a random instant `kills` times, restarting it each time; returns the
/// last, running one.
async fn kill_and_restart(instance: &Instance, rng: &mut Rng, kills: usize) -> Server {
    let mut server = instance.start().await;
    for _ in 0..kills {
        tokio::time::sleep(rng.between(Duration::from_millis(150), Duration::from_millis(1100)))
            .await;
        server.signal(libc::SIGKILL);
        let mut dead = server;
        tokio::task::spawn_blocking(move || {
            dead.wait_exit(Duration::from_secs(10));
        })
        .await
        .expect("reap sluice");
        server = instance.start().await;
    }
    server
}

/// Waits until every record sent reached an outcome (or [`DRAIN`] passed), with the
/// recorder's deliveries and the dead letters of `dlq`, and returns the row.
async fn settle(
    ctx: &Ctx,
    scenario: &str,
    mut tally: Tally,
    dlq: Option<&Path>,
    note: String,
) -> Row {
    let deadline = Instant::now() + DRAIN;
    loop {
        tally.delivered = ctx.recorder.delivered(scenario);
        if let Some(dlq) = dlq {
            tally.dead = faults::ids_in_lines(dlq);
        }
        if tally.missing().is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Late redeliveries count as duplicates: give them a moment to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tally.delivered = ctx.recorder.delivered(scenario);
    if let Some(dlq) = dlq {
        tally.dead = faults::ids_in_lines(dlq);
    }
    let mut row = tally.row(scenario, note);
    let missing = tally.missing();
    if !missing.is_empty() {
        row.note = format!(
            "{}; missing {:?}",
            row.note,
            &missing[..missing.len().min(8)]
        );
    }
    row
}

fn http_function(url: &str, extra: &str) -> String {
    format!(
        "functions:\n  f:\n    runtime: http\n    url: {}\n    timeout: 10s\n{extra}",
        Value::from(url)
    )
}

/// A setup call to the shared moto_server, sent again while it does not answer: it serves one
/// request at a time, and every scenario sets up at once, so a request can time out after
/// moto has carried it out. A create sent again then finds its resource made
/// (`ResourceInUseException`: the stream or table exists; SQS's CreateQueue is idempotent).
/// Any other error moto answers is not repeated.
async fn setup(endpoint: &str, service: &str, target: &str, body: Value) -> Value {
    let mut last = String::new();
    for attempt in 0..SETUP_TRIES {
        match aws(&http(), endpoint, service, target, body.clone()).await {
            Ok(out) => return out,
            Err(e) if attempt > 0 && e.contains("ResourceInUseException") => return Value::Null,
            Err(e) if e.contains("error sending request") => {
                last = e;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => panic!("{target}: {e}"),
        }
    }
    panic!("{target}: moto_server did not answer in {SETUP_TRIES} tries: {last}")
}

const SETUP_TRIES: u32 = 6;

async fn new_sqs_queue(endpoint: &str) -> String {
    let out = setup(
        endpoint,
        "sqs",
        "CreateQueue",
        // No shorter than the functions' timeouts (10 s), or the mapping is refused as Lambda
        // refuses it.
        json!({"QueueName": unique("fc"), "Attributes": {"VisibilityTimeout": "10"}}),
    )
    .await;
    out["QueueUrl"].as_str().expect("QueueUrl").to_string()
}

async fn new_kinesis_stream(endpoint: &str) -> String {
    let stream = unique("fc");
    setup(
        endpoint,
        "kinesis",
        "CreateStream",
        json!({"StreamName": stream, "ShardCount": 2}),
    )
    .await;
    stream
}

async fn new_dynamo_table(endpoint: &str) -> String {
    let table = unique("fc");
    setup(
        endpoint,
        "dynamodb",
        "CreateTable",
        json!({
            "TableName": table,
            "KeySchema": [{"AttributeName": "id", "KeyType": "HASH"}],
            "AttributeDefinitions": [{"AttributeName": "id", "AttributeType": "S"}],
            "BillingMode": "PAY_PER_REQUEST",
            "StreamSpecification": {"StreamEnabled": true, "StreamViewType": "NEW_IMAGE"},
        }),
    )
    .await;
    table
}

async fn rabbit_queue() -> (lapin::Connection, lapin::Channel, String) {
    let connection = lapin::Connection::connect(RABBITMQ, lapin::ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ does not answer at {RABBITMQ}: {e}"));
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let queue = unique("fc");
    let mut arguments = lapin::types::FieldTable::default();
    // Gone by itself ten minutes after a failed run left it unused.
    arguments.insert(
        "x-expires".into(),
        lapin::types::AMQPValue::LongInt(600_000),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions::durable(),
            arguments,
        )
        .await
        .expect("declare the queue");
    (connection, channel, queue)
}

async fn kafka_topic(brokers: &str) -> (rdkafka::producer::FutureProducer, String) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::config::ClientConfig;
    let topic = unique("fc");
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "10000");
    let admin: AdminClient<_> = config.create().expect("Kafka admin client");
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create the topic");
    for result in created {
        result.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
    let producer = config.create().expect("Kafka producer");
    (producer, topic)
}

/// Of the records a Kafka scenario did not see delivered, those at or past the group's
/// committed offset of their partition: still owed by the group, not skipped by a commit.
async fn stranded_in_kafka(
    brokers: &str,
    group: &str,
    topic: &str,
    offsets: &std::collections::BTreeMap<String, (i32, i64)>,
    missing: &[String],
) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("Kafka consumer");
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in 0..2 {
        partitions.add_partition(topic, p);
    }
    let committed = tokio::task::spawn_blocking(move || {
        consumer.committed_offsets(partitions, Duration::from_secs(10))
    })
    .await
    .expect("committed offsets")
    .expect("the group's committed offsets");
    let at = |p: i32| match committed.find_partition(topic, p).map(|e| e.offset()) {
        Some(rdkafka::Offset::Offset(o)) => o,
        _ => 0,
    };
    missing
        .iter()
        .filter(|id| offsets.get(*id).is_some_and(|(p, o)| *o >= at(*p)))
        .count()
}

// ---------------------------------------------------------------------------------------------
// kill/*: SIGKILL at random instants.

async fn kill_scenario(ctx: Ctx, scenario: &'static str) -> Row {
    // Each scenario its own sequence, all from the one printed seed.
    let mut rng = Rng::new(
        scenario
            .bytes()
            .fold(ctx.seed, |h, b| h.rotate_left(5) ^ u64::from(b)),
    );
    let url = ctx
        .recorder
        .route(scenario, Duration::from_millis(20), |_| Answer::Succeed);
    let mut keep: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    let offsets = KafkaOffsets::default();
    let mut kafka_check = None;
    let (source_yaml, source, function_extra) = match scenario {
        "kill/sqs" => {
            let endpoint = moto();
            let queue = new_sqs_queue(&endpoint).await;
            (
                format!(
                    "sources:\n  s:\n    type: sqs\n    function: f\n    queue_url: {}\n    endpoint_url: {}\n    region: us-east-1\n    batch: {{size: 5}}\n    maximum_concurrency: 2\n",
                    Value::from(queue.as_str()),
                    Value::from(endpoint.as_str())
                ),
                Some(Source::Sqs {
                    endpoint,
                    url: queue,
                }),
                "",
            )
        }
        "kill/kinesis" => {
            let endpoint = moto();
            let stream = new_kinesis_stream(&endpoint).await;
            (
                format!(
                    "sources:\n  s:\n    type: kinesis\n    function: f\n    stream: {stream}\n    endpoint_url: {}\n    region: us-east-1\n    batch: {{size: 5}}\n",
                    Value::from(endpoint.as_str())
                ),
                Some(Source::Kinesis { endpoint, stream }),
                "",
            )
        }
        "kill/dynamodb" => {
            let endpoint = moto();
            let table = new_dynamo_table(&endpoint).await;
            (
                format!(
                    "sources:\n  s:\n    type: dynamodb_streams\n    function: f\n    table: {table}\n    endpoint_url: {}\n    region: us-east-1\n    batch: {{size: 5}}\n",
                    Value::from(endpoint.as_str())
                ),
                Some(Source::Dynamo { endpoint, table }),
                "",
            )
        }
        "kill/rabbitmq" => {
            let (connection, channel, queue) = rabbit_queue().await;
            keep.push(Box::new(connection));
            (
                format!(
                    "sources:\n  s:\n    type: rabbitmq\n    function: f\n    uri: {RABBITMQ}\n    queue: {queue}\n    prefetch: 10\n    batch: {{size: 5}}\n"
                ),
                Some(Source::Rabbit { channel, queue }),
                "",
            )
        }
        "kill/kafka" => {
            let brokers = kafka().expect("a Kafka broker");
            let (producer, topic) = kafka_topic(&brokers).await;
            kafka_check = Some((brokers.clone(), topic.clone(), offsets.clone()));
            (
                format!(
                    "sources:\n  s:\n    type: kafka\n    function: f\n    brokers: [{brokers}]\n    topics: [{topic}]\n    group_id: {topic}\n    batch: {{size: 5}}\n    properties: {{session.timeout.ms: 6000, heartbeat.interval.ms: 500}}\n"
                ),
                Some(Source::Kafka {
                    producer,
                    topic,
                    offsets: offsets.clone(),
                }),
                "",
            )
        }
        "kill/async" => (
            String::new(),
            None,
            "    max_retry_attempts: 2\n    retry_delay: 0s\n    reserved_concurrency: 4\n",
        ),
        other => panic!("no scenario {other}"),
    };
    let instance = Instance::new(
        None,
        &format!("{}{source_yaml}", http_function(&url, function_extra)),
    );
    let source = source.unwrap_or(Source::Async {
        port: instance.port,
    });
    let producer = Producer::start(scenario, source, None);
    let started = Instant::now();
    let server = kill_and_restart(&instance, &mut rng, KILLS).await;
    let mut tally = Tally::default();
    // A little more after the last restart, so the last start sees traffic too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = producer.stop(&mut tally).await;
    let mut row = settle(
        &ctx,
        scenario,
        tally,
        None,
        format!(
            "{KILLS} kills in {:.1}s; {refused} sends refused while down",
            started.elapsed().as_secs_f64()
        ),
    )
    .await;
    if let Some((brokers, topic, offsets)) = kafka_check
        && row.lost > 0
    {
        let mut tally = Tally {
            sent: offsets.lock().expect("offsets").keys().cloned().collect(),
            ..Tally::default()
        };
        tally.delivered = ctx.recorder.delivered(scenario);
        let missing = tally.missing();
        let offsets = offsets.lock().expect("offsets").clone();
        let stranded = stranded_in_kafka(&brokers, &topic, &topic, &offsets, &missing).await;
        if stranded == row.lost {
            // Every undelivered record is still at or past the group's committed offset:
            // Sluice committed past none of them. They wait for the group to give a partition
            // to the live consumer, which the broker did not do.
            row.lost = 0;
            row.known_stall = Some(format!(
                "{stranded} records undelivered after {DRAIN:?} but not lost: all at or past the group's committed offsets (seen with tansu, whose group coordinator kept handing the restarted consumer no partition; FAULT_KEEP=1 keeps the log)"
            ));
        } else {
            row.note
                .push_str(&format!("; {stranded} of the lost still uncommitted"));
        }
    }
    drop(server);
    drop(keep);
    drop(instance);
    row
}

/// The sum of a metric's series on Sluice's `/metrics`; `None` when Sluice does not answer.
async fn metric(port: u16, name: &str) -> Option<f64> {
    let text = http()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

fn alive(server: &mut Server) -> bool {
    matches!(server.0.try_wait(), Ok(None))
}

// ---------------------------------------------------------------------------------------------
// postgres/*: the state store's PostgreSQL stopped and started mid-stream.

/// Functions `g` and `h` (after `f`) and the sources feeding them: a Kinesis stream and a
/// DynamoDB table's stream on moto at `endpoint`, the two sources that keep checkpoints in the
/// state store.
fn checkpointed_sources(
    stream_url: &str,
    table_url: &str,
    endpoint: &str,
    stream: &str,
    table: &str,
) -> String {
    format!(
        "  g:\n    runtime: http\n    url: {}\n    timeout: 10s\n  h:\n    runtime: http\n    url: {}\n    timeout: 10s\nsources:\n  s:\n    type: kinesis\n    function: g\n    stream: {stream}\n    endpoint_url: {endpoint}\n    region: us-east-1\n    batch: {{size: 5}}\n  d:\n    type: dynamodb_streams\n    function: h\n    table: {table}\n    endpoint_url: {endpoint}\n    region: us-east-1\n    batch: {{size: 5}}\n",
        Value::from(stream_url),
        Value::from(table_url),
        endpoint = Value::from(endpoint),
    )
}

async fn postgres_scenarios(ctx: Ctx) -> Vec<Row> {
    let pg = tokio::task::spawn_blocking(faults::PrivatePostgres::start)
        .await
        .expect("initdb")
        .unwrap_or_else(|e| panic!("a private PostgreSQL cluster does not start: {e}"));
    let pg = Arc::new(pg);
    let async_url = ctx
        .recorder
        .route("postgres/async", Duration::from_millis(20), |_| {
            Answer::Succeed
        });
    let stream_url = ctx
        .recorder
        .route("postgres/kinesis", Duration::from_millis(20), |_| {
            Answer::Succeed
        });
    let table_url = ctx
        .recorder
        .route("postgres/dynamodb", Duration::from_millis(20), |_| {
            Answer::Succeed
        });
    let endpoint = moto();
    let stream = new_kinesis_stream(&endpoint).await;
    let table = new_dynamo_table(&endpoint).await;
    let instance = Instance::new(
        Some(&pg.url()),
        &format!(
            "{}{}",
            http_function(
                &async_url,
                "    max_retry_attempts: 2\n    retry_delay: 0s\n    reserved_concurrency: 4\n"
            ),
            checkpointed_sources(&stream_url, &table_url, &endpoint, &stream, &table),
        ),
    );
    let mut server = instance.start().await;
    let invokes = Producer::start(
        "postgres/async",
        Source::Async {
            port: instance.port,
        },
        None,
    );
    let records = Producer::start(
        "postgres/kinesis",
        Source::Kinesis {
            endpoint: endpoint.clone(),
            stream,
        },
        None,
    );
    let items = Producer::start(
        "postgres/dynamodb",
        Source::Dynamo { endpoint, table },
        None,
    );
    let stop_pg = async |pg: &Arc<faults::PrivatePostgres>| {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.pg_ctl_stop())
            .await
            .expect("pg_ctl")
            .expect("stop PostgreSQL");
    };
    let start_pg = async |pg: &Arc<faults::PrivatePostgres>| {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.pg_ctl_start())
            .await
            .expect("pg_ctl")
            .expect("start PostgreSQL again");
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // First outage, longer than a connection wait of the state store's pool: Sluice rides it
    // out and must reconnect by itself. A probe with a patient client sees what an invoke
    // gets meanwhile: an error within seconds; never a 202 before the event can be stored.
    stop_pg(&pg).await;
    let down_at = Instant::now();
    let refused_before = invokes.refused.load(Ordering::SeqCst);
    let probe_port = instance.port;
    let probe = tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let sent = Instant::now();
        let status = client
            .post(format!(
                "http://127.0.0.1:{probe_port}/2015-03-31/functions/f/invocations"
            ))
            .header("X-Amz-Invocation-Type", "Event")
            .body(json!({"probe": true}).to_string())
            .send()
            .await
            .map(|r| r.status().as_u16());
        (status.map_err(|e| e.to_string()), sent.elapsed())
    });
    tokio::time::sleep(PG_OUTAGE).await;
    let refused_while_down = invokes.refused.load(Ordering::SeqCst) - refused_before;
    let survived = alive(&mut server);
    start_pg(&pg).await;
    let back_after = down_at.elapsed();
    let (probe_status, probe_took) = probe.await.expect("the probe");
    let probe_note = format!(
        "probe invoke: {probe_status:?} after {:.1}s",
        probe_took.as_secs_f64()
    );
    let false_ack = probe_status == Ok(202) && probe_took < back_after - Duration::from_millis(500);
    // Writes fail visibly while the store is down: the probe hears an error within seconds
    // (the state store's connection wait), which the SDKs retry, rather than hanging.
    let refused_visibly =
        matches!(probe_status, Ok(status) if status >= 500) && probe_took < Duration::from_secs(15);
    if !survived {
        server = instance.start().await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Second outage: Sluice is killed while PostgreSQL is down, so whatever it answered 202
    // meanwhile must have been durable, or it is lost.
    stop_pg(&pg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.signal(libc::SIGKILL);
    drop(server);
    start_pg(&pg).await;
    let server = instance.start().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slowest = invokes.slowest_ms.load(Ordering::SeqCst);
    let mut async_tally = Tally::default();
    let mut stream_tally = Tally::default();
    let mut table_tally = Tally::default();
    invokes.stop(&mut async_tally).await;
    records.stop(&mut stream_tally).await;
    items.stop(&mut table_tally).await;
    let note = format!(
        "PostgreSQL down {}s (sluice {}; {refused_while_down} invokes refused, {probe_note}, slowest 202 {slowest}ms), then down 2s with a SIGKILL{}",
        PG_OUTAGE.as_secs(),
        if survived { "rode it out" } else { "EXITED" },
        if false_ack {
            "; A 202 WHILE THE STATE STORE WAS DOWN"
        } else if !refused_visibly {
            "; THE PROBE WAS NOT REFUSED WHILE THE STATE STORE WAS DOWN"
        } else {
            ""
        }
    );
    let a = settle(&ctx, "postgres/async", async_tally, None, note.clone()).await;
    let b = settle(&ctx, "postgres/kinesis", stream_tally, None, note.clone()).await;
    let c = settle(&ctx, "postgres/dynamodb", table_tally, None, note).await;
    let rows = vec![a, b, c];
    drop(server);
    drop(instance);
    drop(pg);
    rows
}

// ---------------------------------------------------------------------------------------------
// dlq-full/*: the dead-letter destination down (a file on a full tmpfs).

/// A small tmpfs at `dir`, filled up; `None` when it cannot be mounted (not root, say).
fn full_tmpfs(dir: &Path) -> Option<PathBuf> {
    std::fs::create_dir_all(dir).ok()?;
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "fc-dlq"])
        .arg(dir)
        .status()
        .ok()?
        .success();
    if !mounted {
        return None;
    }
    // An earlier dead letter leaves the file's last page part used: the next lines fill it,
    // and the one that crosses into a page the disk no longer has is written in part.
    std::fs::write(
        dir.join("dead.jsonl"),
        "{\"earlier\": \"a dead letter from before\"}\n",
    )
    .ok()?;
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).ok()?;
    let block = vec![0u8; 4096];
    while std::io::Write::write_all(&mut file, &block).is_ok() {}
    Some(filler)
}

/// The longest the dead-letter disk stays full while waiting for a failed write.
const DLQ_FULL_AT_MOST: Duration = Duration::from_secs(20);

/// Unmounts the tmpfs at its path when dropped, even when the scenario panics.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l"])
            .arg(&self.0)
            .status();
    }
}

async fn dlq_scenarios(ctx: Ctx) -> Vec<Row> {
    let poison = |ids: &BTreeSet<String>| {
        if ids.iter().any(|id| id.ends_with(":poison")) {
            Answer::Fail
        } else {
            Answer::Succeed
        }
    };
    let async_url = ctx
        .recorder
        .route("dlq-full/async", Duration::from_millis(10), poison);
    let stream_url = ctx
        .recorder
        .route("dlq-full/kinesis", Duration::from_millis(10), poison);
    let endpoint = moto();
    let stream = new_kinesis_stream(&endpoint).await;
    let instance = Instance::new(
        None,
        &format!(
            "{}  g:\n    runtime: http\n    url: {}\n    timeout: 10s\nsources:\n  s:\n    type: kinesis\n    function: g\n    stream: {stream}\n    endpoint_url: {}\n    region: us-east-1\n    batch: {{size: 1}}\n    retry: {{max_attempts: 0}}\n    on_failure: dlq\ndead_letters:\n  dlq: {{type: file, path: ./dlq/dead.jsonl}}\n",
            http_function(
                &async_url,
                "    max_retry_attempts: 0\n    retry_delay: 0s\n    on_failure: dlq\n"
            ),
            Value::from(stream_url.as_str()),
            Value::from(endpoint.as_str()),
        ),
    );
    let dlq_dir = instance.dir.path().join("dlq");
    let dlq = dlq_dir.join("dead.jsonl");
    // Without a tmpfs, a directory standing where the file should be refuses every write.
    let filler = full_tmpfs(&dlq_dir);
    let _mounted = filler.as_ref().map(|_| Mounted(dlq_dir.clone()));
    let how = if filler.is_some() {
        "a full tmpfs"
    } else {
        std::fs::create_dir_all(&dlq).expect("a directory in the way");
        "a directory in the file's place"
    };
    let mut server = instance.start().await;
    let invokes = Producer::start(
        "dlq-full/async",
        Source::Async {
            port: instance.port,
        },
        Some(3),
    );
    let records = Producer::start(
        "dlq-full/kinesis",
        Source::Kinesis { endpoint, stream },
        Some(3),
    );
    // The disk stays full for at least 3 s, and until a write has failed: on a loaded machine
    // the first poison records may come late, and the first few fit the file's last page.
    let full_since = Instant::now();
    let mut errors = 0.0;
    while full_since.elapsed() < DLQ_FULL_AT_MOST {
        tokio::time::sleep(Duration::from_millis(250)).await;
        errors = metric(instance.port, "sluice_dead_letter_errors_total")
            .await
            .unwrap_or(0.0);
        if errors > 0.0 && full_since.elapsed() >= Duration::from_secs(3) {
            break;
        }
    }
    let full_for = full_since.elapsed();
    let written_while_down = faults::ids_in_lines(&dlq).len();
    // Nothing may have been acknowledged meanwhile: a kill now must lose nothing.
    server.signal(libc::SIGKILL);
    drop(server);
    server = instance.start().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    match &filler {
        Some(filler) => std::fs::remove_file(filler).expect("free the tmpfs"),
        None => std::fs::remove_dir(&dlq).expect("take the directory away"),
    }
    let mut async_tally = Tally::default();
    let mut stream_tally = Tally::default();
    invokes.stop(&mut async_tally).await;
    records.stop(&mut stream_tally).await;
    let note = format!(
        "DLQ on {how} for {:.0}s, sluice killed meanwhile; {errors} dead-letter errors, {written_while_down} fitted the last page",
        full_for.as_secs_f64() + 1.0
    );
    let a = settle(
        &ctx,
        "dlq-full/async",
        async_tally,
        Some(&dlq),
        note.clone(),
    )
    .await;
    let b = settle(&ctx, "dlq-full/kinesis", stream_tally, Some(&dlq), note).await;
    let mut rows = vec![a, b];
    for row in &mut rows {
        if errors == 0.0 {
            row.note.push_str("; NO dead-letter error was counted");
        }
    }
    drop(server);
    rows
}

// ---------------------------------------------------------------------------------------------
// state-full/*: the state store's disk full, then freed.

/// The SQLite state on a small tmpfs that fills up for 4 s while events and records flow: the
/// async queue refuses what it cannot store (never a 202 it did not write), Kinesis
/// checkpoints wait, and once space returns everything flows again without a restart.
async fn state_full_scenarios(ctx: Ctx) -> Vec<Row> {
    let async_url = ctx
        .recorder
        .route("state-full/async", Duration::from_millis(10), |_| {
            Answer::Succeed
        });
    let stream_url = ctx
        .recorder
        .route("state-full/kinesis", Duration::from_millis(10), |_| {
            Answer::Succeed
        });
    let table_url = ctx
        .recorder
        .route("state-full/dynamodb", Duration::from_millis(10), |_| {
            Answer::Succeed
        });
    let endpoint = moto();
    let stream = new_kinesis_stream(&endpoint).await;
    let table = new_dynamo_table(&endpoint).await;
    let instance = Instance::new(
        None,
        &format!(
            "{}{}",
            http_function(&async_url, ""),
            checkpointed_sources(&stream_url, &table_url, &endpoint, &stream, &table),
        ),
    );
    let data = instance.dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data directory");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "fc-state"])
        .arg(&data)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        mounted,
        "THE STATE-FULL SCENARIOS CANNOT RUN HERE: mounting a tmpfs needs root; run the test command as root"
    );
    let _mounted = Mounted(data.clone());
    let mut server = instance.start().await;
    let invokes = Producer::start(
        "state-full/async",
        Source::Async {
            port: instance.port,
        },
        None,
    );
    let records = Producer::start(
        "state-full/kinesis",
        Source::Kinesis {
            endpoint: endpoint.clone(),
            stream,
        },
        None,
    );
    let items = Producer::start(
        "state-full/dynamodb",
        Source::Dynamo { endpoint, table },
        None,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused_before = invokes.refused.load(Ordering::SeqCst);
    let filler = data.join("filler");
    {
        let mut file = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 4096];
        while std::io::Write::write_all(&mut file, &block).is_ok() {}
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let refused_while_full = invokes.refused.load(Ordering::SeqCst) - refused_before;
    let disk_full_errors = metric(
        instance.port,
        "sluice_state_errors_total{kind=\"disk_full\"}",
    )
    .await
    .unwrap_or(0.0);
    std::fs::remove_file(&filler).expect("free the tmpfs");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let up = alive(&mut server);
    let mut async_tally = Tally::default();
    let mut stream_tally = Tally::default();
    let mut table_tally = Tally::default();
    invokes.stop(&mut async_tally).await;
    records.stop(&mut stream_tally).await;
    items.stop(&mut table_tally).await;
    let note = format!(
        "state on a full tmpfs for 4s: {refused_while_full} invokes refused, {disk_full_errors} disk-full errors counted{}{}",
        if disk_full_errors == 0.0 {
            "; THE DISK NEVER FILLED"
        } else {
            ""
        },
        if up { "" } else { "; sluice EXITED" }
    );
    let rows = vec![
        settle(&ctx, "state-full/async", async_tally, None, note.clone()).await,
        settle(&ctx, "state-full/kinesis", stream_tally, None, note.clone()).await,
        settle(&ctx, "state-full/dynamodb", table_tally, None, note).await,
    ];
    drop(server);
    rows
}

// ---------------------------------------------------------------------------------------------
// function/*: a function that hangs, crashes at random or floods its output.

/// A Runtime API function: event `fc:…:N` crashes half the time when N % 5 == 1, writes 8 MB
/// to stdout when N % 5 == 2, hangs past its timeout when N % 10 == 3, and otherwise
/// succeeds. Each success is appended to `$SEEN` first.
const UNRULY_FUNCTION: &str = r#"#!/usr/bin/env python3
import json, os, random, sys, time, urllib.request
API = f"http://{os.environ['AWS_LAMBDA_RUNTIME_API']}/2018-06-01/runtime"
while True:
    with urllib.request.urlopen(f"{API}/invocation/next") as r:
        rid = r.headers["Lambda-Runtime-Aws-Request-Id"]; event = json.loads(r.read())
    # An asynchronous event carries one id; an SQS batch one per record (its body).
    ids = [r["body"] for r in event["Records"]] if "Records" in event else [event["id"]]
    n = int(ids[0].split(":")[2])
    if n % 5 == 1 and random.random() < 0.5:
        os._exit(3)
    if n % 5 == 2:
        line = "x" * 1023 + "\n"
        for _ in range(8 * 1024):
            sys.stdout.write(line)
        sys.stdout.flush()
    if n % 10 == 3:
        time.sleep(60)
    with open(os.environ["SEEN"], "a") as f:
        for i in ids:
            f.write(json.dumps({"id": i}) + "\n")
    request = urllib.request.Request(f"{API}/invocation/{rid}/response", data=b"{}", method="POST")
    urllib.request.urlopen(request).close()
"#;

/// The unruly function behind the asynchronous queue (`function/async`: two retries, then the
/// dead letter) or behind an SQS queue (`function/sqs`: one record per batch, two retries,
/// then the dead letter).
async fn function_scenario(scenario: &'static str) -> Row {
    let dir = tempfile::tempdir().expect("dir");
    common::bootstrap(dir.path(), UNRULY_FUNCTION);
    let seen = dir.path().join("seen.jsonl");
    let function = format!(
        "functions:\n  f:\n    package: {}\n    timeout: 2s\n    max_retry_attempts: 2\n    retry_delay: 0s\n    reserved_concurrency: 4\n    on_failure: dlq\n    environment: {{SEEN: {}}}\ndead_letters:\n  dlq: {{type: file, path: ./dead.jsonl}}\n",
        Value::from(dir.path().join("fn").to_string_lossy()),
        Value::from(seen.to_string_lossy()),
    );
    let (sources, source) = if scenario == "function/sqs" {
        let endpoint = moto();
        let queue = new_sqs_queue(&endpoint).await;
        (
            format!(
                "sources:\n  s:\n    type: sqs\n    function: f\n    queue_url: {}\n    endpoint_url: {}\n    region: us-east-1\n    batch: {{size: 1}}\n    maximum_concurrency: 4\n    retry: {{max_attempts: 2}}\n    on_failure: dlq\n",
                Value::from(queue.as_str()),
                Value::from(endpoint.as_str())
            ),
            Some(Source::Sqs {
                endpoint,
                url: queue,
            }),
        )
    } else {
        (String::new(), None)
    };
    let instance = Instance::new(None, &format!("{function}{sources}"));
    let source = source.unwrap_or(Source::Async {
        port: instance.port,
    });
    let dlq = instance.dir.path().join("dead.jsonl");
    let mut server = instance.start().await;
    let pid = server.0.id();
    let invokes = Producer::start(scenario, source, None);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut tally = Tally::default();
    invokes.stop(&mut tally).await;
    // The recorder is not the function here: deliveries come from `$SEEN`.
    let deadline = Instant::now() + DRAIN;
    loop {
        tally.delivered = faults::id_counts_in_lines(&seen);
        tally.dead = faults::ids_in_lines(&dlq);
        if tally.missing().is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peak = faults::peak_rss_kib(pid).unwrap_or(0);
    let up = alive(&mut server);
    let mut row = tally.row(
        scenario,
        format!(
            "crash/flood 8MB/hang past 2s timeout; sluice peak RSS {} MB{}",
            peak / 1024,
            if up { "" } else { "; sluice EXITED" }
        ),
    );
    if !tally.missing().is_empty() {
        row.note
            .push_str(&format!("; missing {:?}", tally.missing()));
    }
    if peak > 300 * 1024 {
        row.note.push_str("; MEMORY NOT BOUNDED");
    }
    drop(server);
    drop(instance);
    row
}

// ---------------------------------------------------------------------------------------------
// broker/*: the source's server unreachable or hung mid-stream.

/// Two seconds into the stream, cuts `link` for 4 s, then lets it run 2 s more; answers
/// whether Sluice is still up.
async fn cut_link_for_4s(link: &faults::Link, server: &mut Server) -> bool {
    tokio::time::sleep(Duration::from_secs(2)).await;
    link.set_cut(true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    link.set_cut(false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    alive(server)
}

/// One source's row for a link outage: the cut, then the tally of what `producer` sent.
async fn link_outage(
    ctx: &Ctx,
    scenario: &str,
    link: &faults::Link,
    server: &mut Server,
    producer: Producer,
    what: &str,
) -> Row {
    let up = cut_link_for_4s(link, server).await;
    let mut tally = Tally::default();
    producer.stop(&mut tally).await;
    let exited = if up { "" } else { "; sluice EXITED" };
    settle(ctx, scenario, tally, None, format!("{what}{exited}")).await
}

/// Private moto behind a link: the link cut for 4 s, then moto frozen (SIGSTOP) for 4 s.
async fn moto_outage_scenarios(ctx: Ctx) -> Vec<Row> {
    let scratch = tempfile::tempdir().expect("dir");
    let moto = faults::PrivateMoto::start(&scratch.path().join("moto.log")).await;
    let upstream: std::net::SocketAddr = moto
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("moto address");
    let link = faults::Link::start(upstream).await;
    let through = format!("http://127.0.0.1:{}", link.port);
    let queue = new_sqs_queue(&moto.url).await;
    let stream = new_kinesis_stream(&moto.url).await;
    let table = new_dynamo_table(&moto.url).await;
    let sqs_url = ctx
        .recorder
        .route("broker/sqs", Duration::from_millis(20), |_| Answer::Succeed);
    let stream_url = ctx
        .recorder
        .route("broker/kinesis", Duration::from_millis(20), |_| {
            Answer::Succeed
        });
    let table_url = ctx
        .recorder
        .route("broker/dynamodb", Duration::from_millis(20), |_| {
            Answer::Succeed
        });
    let instance = Instance::new(
        None,
        &format!(
            "{}  g:\n    runtime: http\n    url: {}\n    timeout: 10s\n  h:\n    runtime: http\n    url: {}\n    timeout: 10s\nsources:\n  q:\n    type: sqs\n    function: f\n    queue_url: {}\n    endpoint_url: {through}\n    region: us-east-1\n    batch: {{size: 5}}\n    maximum_concurrency: 2\n  s:\n    type: kinesis\n    function: g\n    stream: {stream}\n    endpoint_url: {through}\n    region: us-east-1\n    batch: {{size: 5}}\n  d:\n    type: dynamodb_streams\n    function: h\n    table: {table}\n    endpoint_url: {through}\n    region: us-east-1\n    batch: {{size: 5}}\n",
            http_function(&sqs_url, ""),
            Value::from(stream_url.as_str()),
            Value::from(table_url.as_str()),
            // The queue URL names moto's own port; the endpoint decides where calls go.
            Value::from(queue.as_str()),
        ),
    );
    let mut server = instance.start().await;
    let messages = Producer::start(
        "broker/sqs",
        Source::Sqs {
            endpoint: moto.url.clone(),
            url: queue,
        },
        None,
    );
    let records = Producer::start(
        "broker/kinesis",
        Source::Kinesis {
            endpoint: moto.url.clone(),
            stream,
        },
        None,
    );
    let items = Producer::start(
        "broker/dynamodb",
        Source::Dynamo {
            endpoint: moto.url.clone(),
            table,
        },
        None,
    );
    cut_link_for_4s(&link, &mut server).await;
    moto.child.signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(4)).await;
    moto.child.signal(libc::SIGCONT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let up = alive(&mut server);
    let mut sqs_tally = Tally::default();
    let mut stream_tally = Tally::default();
    let mut table_tally = Tally::default();
    messages.stop(&mut sqs_tally).await;
    records.stop(&mut stream_tally).await;
    items.stop(&mut table_tally).await;
    let note = format!(
        "private moto: link cut 4s, then SIGSTOP 4s{}",
        if up { "" } else { "; sluice EXITED" }
    );
    let rows = vec![
        settle(&ctx, "broker/sqs", sqs_tally, None, note.clone()).await,
        settle(&ctx, "broker/kinesis", stream_tally, None, note.clone()).await,
        settle(&ctx, "broker/dynamodb", table_tally, None, note).await,
    ];
    drop(server);
    drop(instance);
    drop(moto);
    rows
}

/// The shared RabbitMQ behind a link cut for 4 s: Sluice's connection dropped and refused
/// while the server, and the other tests on it, carry on.
async fn rabbitmq_outage_scenario(ctx: Ctx) -> Row {
    let scenario = "broker/rabbitmq";
    let link = faults::Link::start("127.0.0.1:5672".parse().expect("address")).await;
    let (connection, channel, queue) = rabbit_queue().await;
    let url = ctx
        .recorder
        .route(scenario, Duration::from_millis(20), |_| Answer::Succeed);
    let instance = Instance::new(
        None,
        &format!(
            "{}sources:\n  s:\n    type: rabbitmq\n    function: f\n    uri: amqp://guest:guest@127.0.0.1:{}/%2f\n    queue: {queue}\n    prefetch: 10\n    batch: {{size: 5}}\n",
            http_function(&url, ""),
            link.port
        ),
    );
    let mut server = instance.start().await;
    let producer = Producer::start(scenario, Source::Rabbit { channel, queue }, None);
    let row = link_outage(
        &ctx,
        scenario,
        &link,
        &mut server,
        producer,
        "link to the shared RabbitMQ cut 4s",
    )
    .await;
    drop(server);
    drop(connection);
    row
}

/// A private tansu whose advertised address is a link, cut for 4 s mid-stream. (Its storage is
/// in memory, so a real restart would empty the topic: the link stands for the restart.)
async fn kafka_outage_scenario(ctx: Ctx, tansu: PathBuf) -> Row {
    let scenario = "broker/kafka";
    let port = free_port();
    // The link is started first, on a port of its own, so that tansu can advertise it.
    let link = faults::Link::start(format!("127.0.0.1:{port}").parse().expect("address")).await;
    let scratch = tempfile::tempdir().expect("dir");
    let log = std::fs::File::create(scratch.path().join("tansu.log")).expect("log");
    let child = std::process::Command::new(&tansu)
        .args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{port}"),
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{}", link.port),
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start a private tansu");
    let tansu = Server(child);
    assert!(
        faults::wait_for_port(port, Duration::from_secs(20)).await,
        "the private tansu did not listen"
    );
    let brokers = format!("127.0.0.1:{}", link.port);
    let (producer, topic) = kafka_topic(&brokers).await;
    let url = ctx
        .recorder
        .route(scenario, Duration::from_millis(20), |_| Answer::Succeed);
    let instance = Instance::new(
        None,
        &format!(
            "{}sources:\n  s:\n    type: kafka\n    function: f\n    brokers: [{brokers}]\n    topics: [{topic}]\n    group_id: {topic}\n    batch: {{size: 5}}\n",
            http_function(&url, ""),
        ),
    );
    let mut server = instance.start().await;
    let records = Producer::start(
        scenario,
        Source::Kafka {
            producer,
            topic,
            offsets: KafkaOffsets::default(),
        },
        None,
    );
    let row = link_outage(
        &ctx,
        scenario,
        &link,
        &mut server,
        records,
        "link to a private tansu cut 4s",
    )
    .await;
    drop(server);
    drop(tansu);
    row
}

// ---------------------------------------------------------------------------------------------
// The campaign.

type Scenario = Pin<Box<dyn Future<Output = Vec<Row>> + Send>>;

fn one(row: impl Future<Output = Row> + Send + 'static) -> Scenario {
    Box::pin(async move { vec![row.await] })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_campaign_loses_no_record() {
    let seed = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("fault campaign: FAULT_SEED={seed}; sluice binary {SLUICE}");
    let started = Instant::now();
    let ctx = Ctx {
        recorder: Recorder::start().await,
        seed,
    };
    let mut scenarios: Vec<(&str, Scenario)> = vec![
        ("kill/async", one(kill_scenario(ctx.clone(), "kill/async"))),
        ("kill/sqs", one(kill_scenario(ctx.clone(), "kill/sqs"))),
        (
            "kill/kinesis",
            one(kill_scenario(ctx.clone(), "kill/kinesis")),
        ),
        (
            "kill/dynamodb",
            one(kill_scenario(ctx.clone(), "kill/dynamodb")),
        ),
        (
            "kill/rabbitmq",
            one(kill_scenario(ctx.clone(), "kill/rabbitmq")),
        ),
        ("postgres/*", Box::pin(postgres_scenarios(ctx.clone()))),
        ("dlq-full/*", Box::pin(dlq_scenarios(ctx.clone()))),
        ("state-full/*", Box::pin(state_full_scenarios(ctx.clone()))),
        ("function/async", one(function_scenario("function/async"))),
        ("function/sqs", one(function_scenario("function/sqs"))),
        (
            "broker/sqs+kinesis+dynamodb",
            Box::pin(moto_outage_scenarios(ctx.clone())),
        ),
        (
            "broker/rabbitmq",
            one(rabbitmq_outage_scenario(ctx.clone())),
        ),
    ];
    let mut skipped = Vec::new();
    if kafka().is_some() {
        scenarios.push(("kill/kafka", one(kill_scenario(ctx.clone(), "kill/kafka"))));
    } else {
        skipped.push("kill/kafka: no Kafka broker (SLUICE_TEST_KAFKA)");
    }
    match tansu_binary() {
        Some(tansu) => scenarios.push((
            "broker/kafka",
            one(kafka_outage_scenario(ctx.clone(), tansu)),
        )),
        None => skipped.push("broker/kafka: no tansu binary in the cache"),
    }
    // FAULT_ONLY=kill/kafka,dlq runs only the scenarios whose names contain one of the words.
    if let Ok(only) = std::env::var("FAULT_ONLY") {
        scenarios.retain(|(name, _)| only.split(',').any(|word| name.contains(word)));
    }
    let names: Vec<&str> = scenarios.iter().map(|(n, _)| *n).collect();
    let handles: Vec<_> = scenarios
        .into_iter()
        .map(|(_, s)| tokio::spawn(s))
        .collect();
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (name, handle) in names.iter().zip(handles) {
        match handle.await {
            Ok(row) => rows.extend(row),
            Err(e) => failures.push(format!("{name}: the scenario failed: {e}")),
        }
    }
    println!(
        "{:<26}{:>11}{:>11}{:>15}{:>6}{:>12}",
        "scenario", "records-in", "delivered", "dead-lettered", "lost", "duplicates"
    );
    for row in &rows {
        println!(
            "{:<26}{:>11}{:>11}{:>15}{:>6}{:>12}   {}",
            row.scenario,
            row.records_in,
            row.delivered,
            row.dead_lettered,
            row.lost,
            row.duplicates,
            row.note
        );
        if let Some(known) = &row.known_stall {
            println!("KNOWN STALL {}: {known}", row.scenario);
        }
    }
    for skip in &skipped {
        println!("SKIPPED {skip}");
    }
    println!(
        "fault campaign: {} scenarios in {:.1}s",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    for row in &rows {
        if row.lost > 0 {
            failures.push(format!(
                "{}: {} records lost ({})",
                row.scenario, row.lost, row.note
            ));
        }
        // Faults Sluice must ride out without dying or growing without bound.
        for word in [
            "EXITED",
            "NOT BOUNDED",
            "A 202 WHILE",
            "WAS NOT REFUSED",
            "NEVER FILLED",
            "NO dead-letter error",
        ] {
            if row.note.contains(word) {
                failures.push(format!("{}: {}", row.scenario, row.note));
            }
        }
        if row.records_in == 0 {
            failures.push(format!(
                "{}: no record went in; it proves nothing",
                row.scenario
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
