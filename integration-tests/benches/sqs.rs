//! SQS mappings: messages per second and this process's CPU time per message from one
//! pre-filled queue into a native no-op function through a Sluice mapping, next to a bare AWS
//! SDK loop (ReceiveMessage of ten, then DeleteMessageBatch) draining the same queue in the
//! same run, with one loop and with as many loops as the mapping may have pollers.
//!
//! `cargo bench -p sluice-integration-tests --bench sqs`
//!
//! The queue is in moto_server at `SLUICE_TEST_MOTO` (scripts/test starts one). moto is a
//! Python server and is the bottleneck: the rows compare the consumers with each other on the
//! same server, and say little about SQS itself. CPU time is this process's user + system time
//! (`/proc/self/stat`, in clock ticks of 10 ms), so moto's own work is not in it. Figures are
//! printed, never asserted. `cargo test --all-targets` runs this binary without `--bench`: a
//! small smoke run.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, QueueAttributeName, SendMessageBatchRequestEntry,
};
use serde_json::Value;

const REGION: &str = "us-east-1";
/// Pollers of the mapping (its `maximum_concurrency`), and loops of the wider bare row.
const POLLERS: usize = 5;
const BODY_BYTES: usize = 100;
/// The bare loops' long poll.
const BARE_WAIT_SECS: i32 = 1;
/// How long any row may take before the bench gives up.
const LIMIT: Duration = Duration::from_secs(900);

/// Messages per row. `cargo bench` passes `--bench`; without it a smoke run is enough.
fn messages() -> usize {
    if std::env::args().any(|arg| arg == "--bench") {
        1_000
    } else {
        100
    }
}

fn moto() -> String {
    std::env::var("SLUICE_TEST_MOTO").unwrap_or_else(|_| {
        panic!(
            "SLUICE_TEST_MOTO is not set: this bench needs a moto_server. Run it with scripts/test, \
             or start `moto_server -H 127.0.0.1 -p PORT` and set SLUICE_TEST_MOTO=http://127.0.0.1:PORT"
        )
    })
}

fn client() -> Client {
    Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(moto())
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "bench"))
            .build(),
    )
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

async fn fill(client: &Client, url: &str, n: usize) {
    let body = "x".repeat(BODY_BYTES);
    let chunks: Vec<usize> = (0..n)
        .step_by(10)
        .map(|start| (n - start).min(10))
        .collect();
    let next = Arc::new(AtomicUsize::new(0));
    let chunks = Arc::new(chunks);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, url, body, next, chunks) = (
            client.clone(),
            url.to_string(),
            body.clone(),
            next.clone(),
            chunks.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while let Some(&size) = chunks.get(next.fetch_add(1, Ordering::SeqCst)) {
                let entries = (0..size)
                    .map(|i| {
                        SendMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .message_body(&body)
                            .build()
                            .expect("entry")
                    })
                    .collect::<Vec<_>>();
                let out = client
                    .send_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .expect("send a batch");
                assert!(out.failed().is_empty(), "{:?}", out.failed());
            }
        }));
    }
    for t in tasks {
        t.await.expect("filler");
    }
}

/// (visible, in flight) messages.
async fn counts(client: &Client, url: &str) -> (u64, u64) {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
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

/// Message ids a consumer was given, and how many deliveries in all: moto hands a message to
/// two consumers now and then when they receive at the same instant, so repeats are counted,
/// not refused.
#[derive(Default)]
struct Deliveries {
    ids: Mutex<HashSet<String>>,
    total: AtomicUsize,
}

impl Deliveries {
    /// Records a batch; returns how many distinct messages were seen so far.
    fn record<'a>(&self, ids: impl Iterator<Item = &'a str>) -> usize {
        let mut seen = self.ids.lock().expect("ids");
        for id in ids {
            seen.insert(id.to_string());
            self.total.fetch_add(1, Ordering::SeqCst);
        }
        seen.len()
    }

    fn distinct(&self) -> usize {
        self.ids.lock().expect("ids").len()
    }

    fn repeats(&self) -> usize {
        self.total.load(Ordering::SeqCst) - self.distinct()
    }
}

/// `loops` concurrent ReceiveMessage + DeleteMessageBatch loops until `n` messages are gone.
/// It ends at the last delete: loops still in a long poll on the empty queue are dropped.
async fn bare(client: &Client, url: &str, n: usize, loops: usize) -> usize {
    let deliveries = Arc::new(Deliveries::default());
    let done = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for _ in 0..loops {
        let (client, url, deliveries, done) = (
            client.clone(),
            url.to_string(),
            deliveries.clone(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let out = client
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(BARE_WAIT_SECS)
                    .message_system_attribute_names(
                        aws_sdk_sqs::types::MessageSystemAttributeName::All,
                    )
                    .message_attribute_names("All")
                    .send()
                    .await
                    .expect("receive");
                let messages = out.messages();
                if messages.is_empty() {
                    continue;
                }
                let entries = messages
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(m.receipt_handle().unwrap_or_default())
                            .build()
                            .expect("entry")
                    })
                    .collect::<Vec<_>>();
                // A repeat's receipt handle may be refused: the other copy was deleted first.
                client
                    .delete_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .expect("delete");
                let ids = messages.iter().map(|m| m.message_id().unwrap_or_default());
                if deliveries.record(ids) >= n {
                    done.notify_one();
                }
            }
        }));
    }
    done.notified().await;
    for t in tasks {
        t.abort();
    }
    deliveries.repeats()
}

/// A Sluice started in-process, mapping the queue into a native no-op.
struct Mapped {
    running: sluice::Running,
    _dir: tempfile::TempDir,
    repeats: usize,
}

/// Sluice, started in-process, maps the queue into a native no-op until the queue is empty;
/// it is returned still running, so that stopping it is not part of the figure.
async fn through_sluice(client: &Client, url: &str, n: usize) -> Mapped {
    let deliveries = Arc::new(Deliveries::default());
    let mut native = sluice::NativeRegistry::new();
    {
        let deliveries = deliveries.clone();
        native.register("noop", move |event: Value, _ctx| {
            let records = event["Records"].as_array().cloned().unwrap_or_default();
            deliveries.record(
                records
                    .iter()
                    .map(|r| r["messageId"].as_str().unwrap_or_default()),
            );
            async { Ok(Value::Null) }
        });
    }
    let dir = tempfile::tempdir().expect("state dir");
    let quote = |s: &str| Value::from(s).to_string();
    let yaml = format!(
        "state: {}\nfunctions:\n  noop: {{runtime: native, timeout: 30s}}\nsources:\n  bench:\n    type: sqs\n    function: noop\n    queue_url: {}\n    endpoint_url: {}\n    region: {REGION}\n    batch: {{size: 10}}\n    maximum_concurrency: {POLLERS}\n",
        quote(&format!("sqlite://{}/state.db", dir.path().display())),
        quote(url),
        quote(&moto()),
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
    let started = Instant::now();
    while deliveries.distinct() < n || counts(client, url).await != (0, 0) {
        assert!(
            started.elapsed() < LIMIT,
            "the mapping did not drain the queue"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Mapped {
        running,
        _dir: dir,
        repeats: deliveries.repeats(),
    }
}

struct Row {
    path: String,
    elapsed: Duration,
    cpu: Duration,
    repeats: usize,
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
        repeats: 0,
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
        let n = messages();
        let client = client();
        let name = format!("sluice-bench-{}", uuid::Uuid::new_v4().simple());
        let url = client
            .create_queue()
            .queue_name(&name)
            .send()
            .await
            .expect("create the queue")
            .queue_url()
            .expect("queue URL")
            .to_string();
        let mut rows = Vec::new();
        for loops in [1, POLLERS] {
            fill(&client, &url, n).await;
            let path = format!("bare SDK loop{} x{loops}", if loops > 1 { "s" } else { "" });
            let (row, repeats) = measure(path, bare(&client, &url, n, loops)).await;
            rows.push(Row { repeats, ..row });
            // A long poll of a dropped loop lives on in moto for up to its wait time; it would
            // take messages of the next row if they came sooner.
            tokio::time::sleep(Duration::from_millis(BARE_WAIT_SECS as u64 * 1000 + 500)).await;
        }
        fill(&client, &url, n).await;
        let (row, mapped) = measure(
            format!("mapping (<= {POLLERS} pollers) -> no-op"),
            through_sluice(&client, &url, n),
        )
        .await;
        rows.push(Row {
            repeats: mapped.repeats,
            ..row
        });
        mapped.running.shutdown_within(Duration::from_secs(5)).await;
        let _ = client.delete_queue().queue_url(&url).send().await;

        println!();
        println!(
            "SQS (moto at {}), {n} messages of {BODY_BYTES} B per row, batches of 10",
            moto()
        );
        println!();
        println!(
            "| path                              |  messages/s | wall s | CPU ms | CPU us/message | repeats |"
        );
        println!(
            "|-----------------------------------|------------:|-------:|-------:|---------------:|--------:|"
        );
        for row in rows {
            let secs = row.elapsed.as_secs_f64().max(1e-9);
            println!(
                "| {:<33} | {:>11.0} | {:>6.2} | {:>6} | {:>14.0} | {:>7} |",
                row.path,
                n as f64 / secs,
                secs,
                row.cpu.as_millis(),
                row.cpu.as_secs_f64() * 1e6 / n as f64,
                row.repeats
            );
        }
        println!();
        println!(
            "repeats: deliveries of a message already delivered (moto gives a message to two \
             consumers that receive at the same instant now and then)"
        );
    });
}
