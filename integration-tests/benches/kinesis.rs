//! Kinesis mappings: records per second and this process's CPU time per million records from
//! one pre-filled shard into a native no-op function through a Sluice mapping, next to a bare
//! AWS SDK GetRecords loop reading the same shard in the same run; then the latency from
//! PutRecord to the function's entry at a steady put rate.
//!
//! `cargo bench -p sluice-integration-tests --bench kinesis`
//!
//! The stream is in moto_server at `SLUICE_TEST_MOTO` (scripts/test starts one). moto is a
//! Python server and is the bottleneck: the rows compare the readers with each other on the
//! same server, and say little about Kinesis itself. The bare loop calls GetRecords back to
//! back; Sluice keeps Kinesis's limit of five calls a second per shard. CPU time is this
//! process's user + system time (`/proc/self/stat`, in clock ticks of 10 ms), so moto's own
//! work is not in it. The latency is measured from just before the PutRecord call to the
//! start of the invocation carrying the record; a shard at its tip is read every 200 ms to
//! 1 s. Figures are printed, never asserted. `cargo test --all-targets` runs this binary
//! without `--bench`: a small smoke run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType};
use serde_json::Value;

const REGION: &str = "us-east-1";
const SHARD: &str = "shardId-000000000000";
const DATA_BYTES: usize = 100;
/// How long any row may take before the bench gives up.
const LIMIT: Duration = Duration::from_secs(900);

/// Whether `cargo bench` ran this (it passes `--bench`); without it a smoke run is enough.
fn full() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

/// Records in the pre-filled shard.
fn records() -> usize {
    if full() { 20_000 } else { 500 }
}

/// (puts per second, seconds) of the latency run.
fn steady() -> (u32, u32) {
    if full() { (50, 10) } else { (50, 1) }
}

fn moto() -> String {
    std::env::var("SLUICE_TEST_MOTO").unwrap_or_else(|_| {
        panic!(
            "SLUICE_TEST_MOTO is not set: this bench needs a moto_server. Run it with scripts/test, \
             or start `moto_server -H 127.0.0.1 -p PORT` and set SLUICE_TEST_MOTO=http://127.0.0.1:PORT \
             (with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION set)"
        )
    })
}

fn client() -> Client {
    Client::from_conf(
        aws_sdk_kinesis::Config::builder()
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

async fn create_stream(client: &Client) -> String {
    let name = format!("sluice-bench-{}", uuid::Uuid::new_v4().simple());
    client
        .create_stream()
        .stream_name(&name)
        .shard_count(1)
        .send()
        .await
        .expect("create the stream");
    name
}

/// Puts `n` records of [`DATA_BYTES`] bytes, 500 to a call, one call at a time (moto's shards
/// are not safe for concurrent puts).
async fn fill(client: &Client, stream: &str, n: usize) {
    let data = vec![b'x'; DATA_BYTES];
    let mut put = 0;
    while put < n {
        let size = (n - put).min(500);
        let entries = (0..size)
            .map(|i| {
                PutRecordsRequestEntry::builder()
                    .partition_key(format!("key-{}", (put + i) % 16))
                    .data(Blob::new(data.clone()))
                    .build()
                    .expect("entry")
            })
            .collect::<Vec<_>>();
        let out = client
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries))
            .send()
            .await
            .expect("put records");
        assert_eq!(out.failed_record_count(), Some(0), "records not put");
        put += size;
    }
}

/// GetRecords from the trim horizon, back to back, until `n` records came.
async fn bare(client: &Client, stream: &str, n: usize) {
    let mut iterator = client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(SHARD)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await
        .expect("an iterator")
        .shard_iterator()
        .expect("an iterator")
        .to_string();
    let mut read = 0;
    while read < n {
        let out = client
            .get_records()
            .shard_iterator(&iterator)
            .limit(10_000)
            .send()
            .await
            .expect("get records");
        read += out.records().len();
        iterator = out
            .next_shard_iterator()
            .expect("an open shard has a next iterator")
            .to_string();
    }
}

/// Sluice, started in-process on a state of its own, maps the stream (from the trim horizon,
/// batches of `batch`) into a native function that calls `seen` with each event.
async fn start_sluice(
    stream: &str,
    batch: u32,
    seen: impl Fn(&Value) + Send + Sync + 'static,
) -> (sluice::Running, tempfile::TempDir) {
    let seen = Arc::new(seen);
    let mut native = sluice::NativeRegistry::new();
    native.register("noop", move |event: Value, _ctx| {
        seen(&event);
        async { Ok(Value::Null) }
    });
    let dir = tempfile::tempdir().expect("state dir");
    let quote = |s: &str| Value::from(s).to_string();
    let yaml = format!(
        "state: {}\nfunctions:\n  noop: {{runtime: native, timeout: 30s}}\nsources:\n  bench:\n    type: kinesis\n    function: noop\n    stream: {}\n    endpoint_url: {}\n    region: {REGION}\n    starting_position: trim_horizon\n    batch: {{size: {batch}}}\n",
        quote(&format!("sqlite://{}/state.db", dir.path().display())),
        quote(stream),
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
    (running, dir)
}

fn count(event: &Value) -> usize {
    event["Records"].as_array().map_or(0, Vec::len)
}

/// Sluice maps the pre-filled stream into a no-op until the function has seen `n` records;
/// returns it still running, so that stopping it is not part of the figure.
async fn through_sluice(
    stream: &str,
    n: usize,
    batch: u32,
) -> (sluice::Running, tempfile::TempDir) {
    let invoked = Arc::new(AtomicUsize::new(0));
    let counter = invoked.clone();
    let started = start_sluice(stream, batch, move |event| {
        counter.fetch_add(count(event), Ordering::SeqCst);
    })
    .await;
    while invoked.load(Ordering::SeqCst) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(invoked.load(Ordering::SeqCst), n, "each record once");
    started
}

struct Row {
    path: String,
    elapsed: Duration,
    cpu: Duration,
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
    };
    (row, out)
}

/// PutRecord at `rate` a second for `secs` seconds into a stream a Sluice maps into a function
/// that notes when each record reached it; answers the delays, sorted.
async fn latencies(client: &Client, rate: u32, secs: u32) -> Vec<Duration> {
    let stream = create_stream(client).await;
    let total = (rate * secs) as usize;
    // Index 0 is the warm-up record; the measured ones follow.
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total + 1]));
    let delays: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let (sent_in, delays_in) = (sent.clone(), delays.clone());
    let (running, _dir) = start_sluice(&stream, 100, move |event| {
        let entered = Instant::now();
        let sent = sent_in.lock().expect("sent");
        let mut delays = delays_in.lock().expect("delays");
        for record in event["Records"].as_array().into_iter().flatten() {
            let key = record["kinesis"]["partitionKey"]
                .as_str()
                .unwrap_or_default();
            if let Some(at) = key
                .parse::<usize>()
                .ok()
                .and_then(|i| sent.get(i).copied().flatten())
            {
                delays.push(entered.saturating_duration_since(at));
            }
        }
    })
    .await;
    let put = |i: usize| {
        let (client, stream, sent) = (client.clone(), stream.clone(), sent.clone());
        async move {
            sent.lock().expect("sent")[i] = Some(Instant::now());
            client
                .put_record()
                .stream_name(&stream)
                .partition_key(i.to_string())
                .data(Blob::new(vec![b'x'; DATA_BYTES]))
                .send()
                .await
                .expect("put a record");
        }
    };
    // The mapping is reading once the warm-up record went through.
    put(0).await;
    let started = Instant::now();
    while delays.lock().expect("delays").is_empty() {
        assert!(
            started.elapsed() < LIMIT,
            "the warm-up record never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    delays.lock().expect("delays").clear();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    for i in 1..=total {
        tick.tick().await;
        tokio::spawn(put(i));
    }
    let started = Instant::now();
    while delays.lock().expect("delays").len() < total {
        assert!(started.elapsed() < LIMIT, "not every record arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running.shutdown_within(Duration::from_secs(5)).await;
    let _ = client.delete_stream().stream_name(&stream).send().await;
    let mut delays = delays.lock().expect("delays").clone();
    delays.sort_unstable();
    delays
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let n = records();
        let client = client();
        let stream = create_stream(&client).await;
        fill(&client, &stream, n).await;

        let mut rows = Vec::new();
        rows.push(measure("bare SDK GetRecords loop".to_string(), bare(&client, &stream, n)).await.0);
        for batch in [100, 1_000] {
            let (row, (running, _dir)) = measure(
                format!("mapping, batch {batch} -> no-op"),
                through_sluice(&stream, n, batch),
            )
            .await;
            rows.push(row);
            running.shutdown_within(Duration::from_secs(5)).await;
        }
        let _ = client.delete_stream().stream_name(&stream).send().await;

        let (rate, secs) = steady();
        let delays = latencies(&client, rate, secs).await;

        println!();
        println!(
            "Kinesis (moto at {}), one shard pre-filled with {n} records of {DATA_BYTES} B",
            moto()
        );
        println!();
        println!("| path                           |  records/s | wall s | CPU ms | CPU s/million records |");
        println!("|--------------------------------|-----------:|-------:|-------:|----------------------:|");
        for row in rows {
            let secs = row.elapsed.as_secs_f64().max(1e-9);
            println!(
                "| {:<30} | {:>10.0} | {:>6.2} | {:>6} | {:>21.1} |",
                row.path,
                n as f64 / secs,
                secs,
                row.cpu.as_millis(),
                row.cpu.as_secs_f64() * 1e6 / n as f64
            );
        }
        println!();
        println!(
            "PutRecord -> function entry, {rate} puts/s for {secs} s ({} records), batch 100",
            delays.len()
        );
        println!();
        println!("|    p50 ms |    p99 ms |    max ms |");
        println!("|----------:|----------:|----------:|");
        println!(
            "| {:>9.1} | {:>9.1} | {:>9.1} |",
            ms(percentile(&delays, 0.5)),
            ms(percentile(&delays, 0.99)),
            ms(delays[delays.len() - 1])
        );
    });
}
