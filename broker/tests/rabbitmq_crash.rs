//! A RabbitMQ mapping across a crash, with the `sluice` binary: killed (SIGKILL) while it
//! consumes a queue of hundreds of messages and restarted, it loses none of them. A message is
//! acknowledged only once the function has succeeded, so what the dead connection held
//! unacknowledged goes back to the queue and runs again.
//!
//! The queue is on the RabbitMQ server at 127.0.0.1:5672 (guest/guest; scripts/test starts an
//! installed one); `rabbitmqctl` counts its unacknowledged messages.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Server, bootstrap, free_port, start, write};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Appends `{"body"}` to `$SEEN` for every message of an `aws:rmq` batch, then succeeds.
const RECORDING_FUNCTION: &str = r#"#!/usr/bin/env python3
import base64, json, os, time, urllib.request
API = f"http://{os.environ['AWS_LAMBDA_RUNTIME_API']}/2018-06-01/runtime"
while True:
    with urllib.request.urlopen(f"{API}/invocation/next") as r:
        rid = r.headers["Lambda-Runtime-Aws-Request-Id"]; event = json.loads(r.read())
    with open(os.environ["SEEN"], "a") as f:
        for messages in event["rmqMessagesByQueue"].values():
            for message in messages:
                body = base64.b64decode(message["data"]).decode()
                f.write(json.dumps({"body": body, "redelivered": message["redelivered"]}) + "\n")
    time.sleep(0.05)
    request = urllib.request.Request(f"{API}/invocation/{rid}/response", data=b"{}", method="POST")
    urllib.request.urlopen(request).close()
"#;

const MESSAGES: usize = 400;
const BATCH: usize = 10;
/// Unacknowledged messages Sluice may hold: what a kill can leave to run again.
const PREFETCH: usize = 40;
const LIMIT: Duration = Duration::from_secs(120);

/// Messages ready in `queue` (not counting those delivered and not yet acknowledged).
async fn ready(channel: &Channel, queue: &str) -> u32 {
    channel
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

/// (ready, unacknowledged) messages of `queue`, as the server counts them.
fn depth(queue: &str) -> (u64, u64) {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-p",
            "/",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "--no-table-headers",
            "--quiet",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl (installed with rabbitmq-server): {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
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

/// The complete JSON lines of a file; a line still being written is left for the next look.
fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// How many times the function was given each body.
fn seen(path: &Path) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for line in lines(path) {
        *seen
            .entry(line["body"].as_str().expect("body").to_string())
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
async fn sigkill_mid_stream_loses_no_rabbitmq_message() {
    let connection = Connection::connect(
        URI,
        ConnectionProperties::default()
            .with_connection_name("rabbitmq crash test publisher".into()),
    )
    .await
    .unwrap_or_else(|e| panic!("RabbitMQ does not answer at {URI}: {e}"));
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let queue = format!("sluice-crash-{}", uuid::Uuid::new_v4().simple());
    let mut arguments = FieldTable::default();
    // Gone by itself ten minutes after a failed run left it unused.
    arguments.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            arguments,
        )
        .await
        .expect("declare the queue");
    let sent: BTreeSet<String> = (0..MESSAGES).map(|i| format!("m-{i:03}")).collect();
    for body in &sent {
        let confirmation = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirmation.is_ack(), "{body} was not taken");
    }
    assert_eq!(ready(&channel, &queue).await as usize, MESSAGES);

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
    timeout: 10s
    environment: {{SEEN: {seen}}}
sources:
  queue:
    type: rabbitmq
    function: recorder
    uri: {uri}
    queue: {queue}
    prefetch: {PREFETCH}
    batch: {{size: {BATCH}}}
",
            seen = Value::from(seen_file.to_string_lossy()),
            uri = Value::from(URI),
            queue = Value::from(queue.as_str()),
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
    // The broker requeues what the dead connection held as soon as it sees the socket close.
    wait_until("the queue holds the rest", async || {
        ready(&channel, &queue).await as usize >= MESSAGES - before.len()
    })
    .await;

    let _server = start(&config, free_port());
    wait_until("every message delivered", async || {
        let got = seen(&seen_file);
        sent.iter().all(|body| got.contains_key(body))
    })
    .await;
    wait_until("an empty queue, every message acknowledged", async || {
        ready(&channel, &queue).await == 0 && depth(&queue) == (0, 0)
    })
    .await;

    let seen = seen(&seen_file);
    let strangers: Vec<&String> = seen.keys().filter(|body| !sent.contains(*body)).collect();
    assert!(
        strangers.is_empty(),
        "bodies that were never sent: {strangers:?}"
    );
    // At least once; repeats only for what the dead connection held unacknowledged.
    let repeats: usize = seen.values().map(|n| n - 1).sum();
    assert!(
        repeats <= PREFETCH,
        "{repeats} repeated deliveries after one kill with at most {PREFETCH} messages unacknowledged"
    );
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the queue");
}
