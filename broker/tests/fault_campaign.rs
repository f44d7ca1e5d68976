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
//! `FAULT_SEED=N` replays the random instants of an earlier run.

mod common;
mod faults;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::{SLUICE, Server, free_port, start, write};
use faults::{Answer, Recorder, Rng, Row, Tally, aws, http};
use serde_json::{Value, json};

/// Kills of `sluice run` per source in the `kill/*` scenarios.
const KILLS: usize = 20;
/// A record is produced this often while a scenario's faults happen.
const PRODUCE_EVERY: Duration = Duration::from_millis(60);
/// How long, after the faults, every record has to reach its outcome.
const DRAIN: Duration = Duration::from_secs(75);
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
            Source::Kafka { producer, topic } => {
                let record = rdkafka::producer::FutureRecord::to(topic)
                    .key(id)
                    .payload(id);
                match producer.send(record, Duration::from_secs(10)).await {
                    Ok(_) => Sent::Yes,
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
    task: tokio::task::JoinHandle<(BTreeSet<String>, BTreeSet<String>, usize)>,
}

impl Producer {
    fn start(scenario: &str, source: Source, poison_every: Option<usize>) -> Producer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let scenario = scenario.to_string();
        let task = tokio::spawn(async move {
            let http = http();
            let (mut sent, mut unknown, mut refused) = (BTreeSet::new(), BTreeSet::new(), 0);
            let mut n = 0;
            while !flag.load(Ordering::SeqCst) {
                let poison = poison_every.is_some_and(|every| n % every == every - 1);
                let id = format!("fc:{scenario}:{n}{}", if poison { ":poison" } else { "" });
                match source.send(&http, &id).await {
                    Sent::Yes => {
                        sent.insert(id);
                        n += 1;
                    }
                    Sent::Unknown => {
                        unknown.insert(id);
                        n += 1;
                    }
                    Sent::No => refused += 1,
                }
                tokio::time::sleep(PRODUCE_EVERY).await;
            }
            (sent, unknown, refused)
        });
        Producer { stop, task }
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
        Instance {
            dir,
            config,
            port: free_port(),
        }
    }

    async fn start(&self) -> Server {
        let config = self.config.clone();
        let port = self.port;
        tokio::task::spawn_blocking(move || start(&config, port))
            .await
            .expect("sluice starts")
    }
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

async fn new_sqs_queue(endpoint: &str) -> String {
    let out = aws(
        &http(),
        endpoint,
        "sqs",
        "CreateQueue",
        json!({"QueueName": unique("fc"), "Attributes": {"VisibilityTimeout": "2"}}),
    )
    .await
    .expect("create a queue");
    out["QueueUrl"].as_str().expect("QueueUrl").to_string()
}

async fn new_kinesis_stream(endpoint: &str) -> String {
    let stream = unique("fc");
    aws(
        &http(),
        endpoint,
        "kinesis",
        "CreateStream",
        json!({"StreamName": stream, "ShardCount": 2}),
    )
    .await
    .expect("create a stream");
    stream
}

async fn new_dynamo_table(endpoint: &str) -> String {
    let table = unique("fc");
    aws(
        &http(),
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
    .await
    .expect("create a table");
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

// ---------------------------------------------------------------------------------------------
// kill/*: SIGKILL at random instants.

async fn kill_scenario(ctx: Ctx, scenario: &'static str) -> Row {
    let mut rng = Rng::new(ctx.seed ^ scenario.len() as u64 * 0x9e37_79b9);
    let url = ctx
        .recorder
        .route(scenario, Duration::from_millis(20), |_| Answer::Succeed);
    let mut keep: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
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
            (
                format!(
                    "sources:\n  s:\n    type: kafka\n    function: f\n    brokers: [{brokers}]\n    topics: [{topic}]\n    group_id: {topic}\n    batch: {{size: 5}}\n    properties: {{session.timeout.ms: 6000, heartbeat.interval.ms: 500}}\n"
                ),
                Some(Source::Kafka { producer, topic }),
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
    let row = settle(
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
    drop(server);
    drop(keep);
    drop(instance);
    row
}

// ---------------------------------------------------------------------------------------------
// The campaign.

type Scenario = Pin<Box<dyn Future<Output = Row> + Send>>;

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
        (
            "kill/async",
            Box::pin(kill_scenario(ctx.clone(), "kill/async")),
        ),
        ("kill/sqs", Box::pin(kill_scenario(ctx.clone(), "kill/sqs"))),
        (
            "kill/kinesis",
            Box::pin(kill_scenario(ctx.clone(), "kill/kinesis")),
        ),
        (
            "kill/dynamodb",
            Box::pin(kill_scenario(ctx.clone(), "kill/dynamodb")),
        ),
        (
            "kill/rabbitmq",
            Box::pin(kill_scenario(ctx.clone(), "kill/rabbitmq")),
        ),
    ];
    let mut skipped = Vec::new();
    if kafka().is_some() {
        scenarios.push((
            "kill/kafka",
            Box::pin(kill_scenario(ctx.clone(), "kill/kafka")),
        ));
    } else {
        skipped.push("kill/kafka: no Kafka broker (SLUICE_TEST_KAFKA)");
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
            Ok(row) => rows.push(row),
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
        if let Some(known) = &row.known_loss {
            println!("KNOWN LOSS {}: {known}", row.scenario);
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
        if row.known_loss.is_none() && row.lost > 0 {
            failures.push(format!(
                "{}: {} records lost ({})",
                row.scenario, row.lost, row.note
            ));
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
