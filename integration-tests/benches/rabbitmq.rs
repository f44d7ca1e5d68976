//! RabbitMQ mappings: messages per second and this process's CPU time per message from one
//! pre-filled queue into a native no-op function through a Sluice mapping, next to a bare lapin
//! consumer with the same prefetch draining the same queue (refilled with as many messages) in
//! the same run.
//!
//! `cargo bench -p sluice-integration-tests --bench rabbitmq`
//!
//! The queue is on the RabbitMQ server at 127.0.0.1:5672 (guest/guest; scripts/test starts an
//! installed one). CPU time is this process's user + system time (`/proc/self/stat`, in clock
//! ticks of 10 ms), so the server's own work is not in it. Figures are printed, never asserted.
//! `cargo test --all-targets` runs this binary without `--bench`: a small smoke run.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The mapping's defaults, which the bare consumer copies: `prefetch` and `batch.size`.
const PREFETCH: u16 = 100;
const BATCH: usize = 100;
const BODY_BYTES: usize = 100;
/// How long any row may take before the bench gives up.
const LIMIT: Duration = Duration::from_secs(600);

/// (messages per row, rounds of rows). `cargo bench` passes `--bench`; without it a smoke run
/// is enough.
fn counts() -> (usize, usize) {
    if std::env::args().any(|arg| arg == "--bench") {
        (50_000, 2)
    } else {
        (500, 1)
    }
}

/// This process's user + system CPU time so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

async fn connect(name: &str) -> Connection {
    Connection::connect(
        URI,
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .unwrap_or_else(|e| panic!("RabbitMQ does not answer at {URI}: {e}"))
}

/// Messages ready in `queue`.
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
        .expect("passive declare")
        .message_count()
}

/// Publishes `n` messages of [`BODY_BYTES`] to `queue`, a thousand at a time between confirms.
async fn fill(channel: &Channel, queue: &str, n: usize) {
    let body = vec![b'x'; BODY_BYTES];
    let mut left = n;
    while left > 0 {
        let chunk = left.min(1_000);
        let mut confirms = Vec::with_capacity(chunk);
        for _ in 0..chunk {
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default(),
                    )
                    .await
                    .expect("publish"),
            );
        }
        for confirm in confirms {
            let confirmation = confirm.await.expect("confirm");
            assert!(confirmation.is_ack(), "the broker refused a message");
        }
        left -= chunk;
    }
    assert_eq!(
        ready(channel, queue).await as usize,
        n,
        "the queue is filled"
    );
}

/// A plain consumer with [`PREFETCH`] that acknowledges each message (`ack_every` 1) or every
/// `ack_every`-th with `multiple`, until `n` are acknowledged.
async fn bare(queue: &str, n: usize, ack_every: usize) {
    let connection = connect("bench bare consumer").await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut acked = 0;
    while acked < n {
        let delivery = consumer
            .next()
            .await
            .expect("the consumer ended")
            .expect("a delivery");
        acked += 1;
        if acked % ack_every == 0 || acked == n {
            delivery
                .ack(BasicAckOptions {
                    multiple: ack_every > 1,
                })
                .await
                .expect("ack");
        }
    }
    let _ = connection.close(200, "done".into()).await;
}

/// Sluice, started in-process, maps the queue into a native no-op until `n` messages were
/// invoked; returns it still running, so that stopping it is not part of the figure, and the
/// number of invocations.
async fn through_sluice(queue: &str, n: usize) -> (sluice::Running, tempfile::TempDir, usize) {
    let messages = Arc::new(AtomicUsize::new(0));
    let invocations = Arc::new(AtomicUsize::new(0));
    let mut native = sluice::NativeRegistry::new();
    {
        let (messages, invocations) = (messages.clone(), invocations.clone());
        native.register("noop", move |event: Value, _ctx| {
            let count = event["rmqMessagesByQueue"].as_object().map_or(0, |q| {
                q.values().filter_map(Value::as_array).map(Vec::len).sum()
            });
            messages.fetch_add(count, Ordering::SeqCst);
            invocations.fetch_add(1, Ordering::SeqCst);
            async { Ok(Value::Null) }
        });
    }
    let dir = tempfile::tempdir().expect("state dir");
    let quote = |s: &str| Value::from(s).to_string();
    let yaml = format!(
        "state: {}\nfunctions:\n  noop: {{runtime: native, timeout: 30s}}\nsources:\n  bench:\n    type: rabbitmq\n    function: noop\n    uri: {}\n    queue: {}\n    prefetch: {PREFETCH}\n    batch: {{size: {BATCH}}}\n",
        quote(&format!("sqlite://{}/state.db", dir.path().display())),
        quote(URI),
        quote(queue),
    );
    let config =
        sluice_config::parse_str(&yaml, "bench.yaml", dir.path(), &|_| None).expect("bench config");
    let running = sluice::start(
        config,
        sluice::StartOptions {
            listen: Some("127.0.0.1:0".parse().expect("addr")),
            native,
            data_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        },
    )
    .await
    .expect("sluice starts");
    while messages.load(Ordering::SeqCst) < n {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(messages.load(Ordering::SeqCst), n, "each message once");
    (running, dir, invocations.load(Ordering::SeqCst))
}

struct Row {
    path: String,
    elapsed: Duration,
    cpu: Duration,
    /// Messages per invocation, for the mapping.
    batch: Option<f64>,
}

async fn measure<T>(path: String, run: impl std::future::Future<Output = T>) -> (Row, T) {
    let (cpu, started) = (cpu_time(), Instant::now());
    let out = tokio::time::timeout(LIMIT, run)
        .await
        .expect("the row finished in time");
    let row = Row {
        path,
        elapsed: started.elapsed(),
        cpu: cpu_time().saturating_sub(cpu),
        batch: None,
    };
    (row, out)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (n, rounds) = counts();
        let admin = connect("bench publisher").await;
        let channel = admin.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let queue = format!("sluice-bench-{}", uuid::Uuid::new_v4().simple());
        let mut arguments = FieldTable::default();
        // Gone by itself ten minutes after a bench that died before deleting it.
        arguments.insert("x-expires".into(), AMQPValue::LongInt(600_000));
        channel
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), arguments)
            .await
            .expect("declare the queue");

        let mut rows = Vec::new();
        for _ in 0..rounds {
            fill(&channel, &queue, n).await;
            rows.push(measure("bare lapin consumer, ack each".into(), bare(&queue, n, 1)).await.0);
            fill(&channel, &queue, n).await;
            rows.push(
                measure(
                    format!("bare lapin consumer, ack per {BATCH}"),
                    bare(&queue, n, BATCH),
                )
                .await
                .0,
            );
            fill(&channel, &queue, n).await;
            let (mut row, (running, _dir, invocations)) =
                measure("mapping -> native no-op".into(), through_sluice(&queue, n)).await;
            row.batch = Some(n as f64 / invocations.max(1) as f64);
            rows.push(row);
            running.shutdown_within(Duration::from_secs(5)).await;
            assert_eq!(ready(&channel, &queue).await, 0, "a message came back: not acknowledged");
        }
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;

        let rate = |row: &Row| n as f64 / row.elapsed.as_secs_f64().max(1e-9);
        let best = |prefix: &str| {
            rows.iter()
                .filter(|r| r.path.starts_with(prefix))
                .map(rate)
                .fold(0.0, f64::max)
        };
        let bare_each = best("bare lapin consumer, ack each");
        println!();
        println!(
            "RabbitMQ (127.0.0.1:5672), {n} messages of {BODY_BYTES} B per row, prefetch {PREFETCH}, mapping batch.size {BATCH}"
        );
        println!();
        println!(
            "| path                               |  messages/s | wall s | CPU ms | CPU us/message | msgs/invoke | vs bare (ack each) |"
        );
        println!(
            "|------------------------------------|------------:|-------:|-------:|---------------:|------------:|-------------------:|"
        );
        for row in &rows {
            let secs = row.elapsed.as_secs_f64().max(1e-9);
            println!(
                "| {:<34} | {:>11.0} | {:>6.2} | {:>6} | {:>14.1} | {:>11} | {:>17.0}% |",
                row.path,
                rate(row),
                secs,
                row.cpu.as_millis(),
                row.cpu.as_secs_f64() * 1e6 / n as f64,
                row.batch.map_or("-".to_string(), |b| format!("{b:.1}")),
                100.0 * rate(row) / bare_each.max(1e-9),
            );
        }
        println!();
        println!(
            "best mapping rate / best bare (ack each) rate: {:.0}% (target >= 80%)",
            100.0 * best("mapping") / bare_each.max(1e-9)
        );
        // The mapping acknowledges a batch at once, as this bare consumer does.
        println!(
            "best mapping rate / best bare (ack per {BATCH}) rate: {:.0}%",
            100.0 * best("mapping") / best("bare lapin consumer, ack per").max(1e-9)
        );
    });
}
