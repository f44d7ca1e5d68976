//! Kafka mappings: records per second from one pre-filled partition into a native no-op
//! function through a mapping, next to a bare rdkafka consumer reading the same topic in the
//! same run, at 100-byte and 1 KB records; and the resident memory an idle Kafka mapping costs.
//!
//! `cargo bench -p sluice-integration-tests --bench kafka`
//!
//! The broker is tansu at `SLUICE_TEST_KAFKA` when it is set (scripts/test starts one), else
//! librdkafka's in-process mock cluster — then the rows still compare with each other, but say
//! little about a real broker. Figures are printed, never asserted: compare the rows of one run
//! with each other rather than with a fixed number. `cargo test --all-targets` runs this
//! binary without `--bench`: a small smoke run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use serde_json::Value;
use sluice::pipeline::Mapping;
use sluice::pipeline::kafka::{KafkaTuning, run_with};
use sluice::{Functions, NativeRegistry};
use sluice_config::{BatchConfig, KafkaConfig, MappingConfig};
use tokio_util::sync::CancellationToken;

struct Sizes {
    records: usize,
    idle_mappings: usize,
    settle: Duration,
}

/// `cargo bench` passes `--bench`; without it a short smoke run is enough.
fn sizes() -> Sizes {
    if std::env::args().any(|arg| arg == "--bench") {
        Sizes {
            records: 100_000,
            idle_mappings: 20,
            settle: Duration::from_secs(8),
        }
    } else {
        Sizes {
            records: 2_000,
            idle_mappings: 3,
            settle: Duration::from_secs(4),
        }
    }
}

const BATCH_SIZE: u32 = 100;

enum Broker {
    Tansu(String),
    Mock(MockCluster<'static, DefaultProducerContext>),
}

impl Broker {
    fn pick() -> Broker {
        match std::env::var("SLUICE_TEST_KAFKA") {
            Ok(addr) => Broker::Tansu(addr),
            Err(_) => Broker::Mock(MockCluster::new(1).expect("mock cluster")),
        }
    }

    fn servers(&self) -> String {
        match self {
            Broker::Tansu(addr) => addr.clone(),
            Broker::Mock(cluster) => cluster.bootstrap_servers(),
        }
    }

    fn name(&self) -> String {
        match self {
            Broker::Tansu(addr) => format!("tansu at {addr}"),
            Broker::Mock(_) => "librdkafka mock cluster (in-process)".to_string(),
        }
    }

    async fn create_topic(&self, topic: &str) {
        match self {
            Broker::Mock(cluster) => cluster.create_topic(topic, 1, 1).expect("mock topic"),
            Broker::Tansu(addr) => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", addr)
                    .create()
                    .expect("admin");
                for r in admin
                    .create_topics(
                        &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
                        &AdminOptions::new(),
                    )
                    .await
                    .expect("create topic")
                {
                    r.unwrap_or_else(|(t, e)| panic!("cannot create {t}: {e}"));
                }
            }
        }
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn fill(servers: &str, topic: &str, records: usize, size: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("linger.ms", "20")
        .set("message.timeout.ms", "120000")
        .create()
        .expect("producer");
    let payload = vec![b'x'; size];
    let mut done = 0;
    while done < records {
        let chunk = (records - done).min(10_000);
        let mut deliveries = Vec::with_capacity(chunk);
        for i in done..done + chunk {
            let key = format!("k{}", i % 16);
            let record = FutureRecord::to(topic)
                .partition(0)
                .key(&key)
                .payload(&payload);
            deliveries.push(
                producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .expect("queued"),
            );
        }
        for d in deliveries {
            d.await
                .expect("report")
                .map_err(|(e, _)| e)
                .expect("delivered");
        }
        done += chunk;
    }
}

/// Reads `records` messages with a plain consumer; the time from the first to the last.
async fn bare(servers: &str, topic: &str, records: usize) -> Duration {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", unique("bare"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut first = None;
    let mut bytes = 0usize;
    for _ in 0..records {
        let m = consumer.recv().await.expect("message");
        bytes += m.payload().map_or(0, <[u8]>::len);
        first.get_or_insert_with(Instant::now);
    }
    assert!(bytes > 0);
    first.map_or(Duration::ZERO, |t| t.elapsed())
}

struct Counter {
    records: AtomicUsize,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
}

fn noop_functions(counter: Arc<Counter>, names: &[String]) -> (Arc<Functions>, tempfile::TempDir) {
    let mut registry = NativeRegistry::new();
    let mut yaml = String::from("functions:\n");
    for name in names {
        yaml.push_str(&format!("  {name}: {{ runtime: native, handler: noop }}\n"));
    }
    registry.register("noop", move |event: Value, _ctx| {
        let counter = counter.clone();
        async move {
            let now = Instant::now();
            counter.first.lock().expect("first").get_or_insert(now);
            let n: usize = event["records"].as_object().map_or(0, |m| {
                m.values().map(|v| v.as_array().map_or(0, Vec::len)).sum()
            });
            counter.records.fetch_add(n, Ordering::SeqCst);
            *counter.last.lock().expect("last") = Some(now);
            Ok(Value::Null)
        }
    });
    let dir = tempfile::tempdir().expect("dir");
    let config =
        sluice_config::parse_str(&yaml, "bench.yaml", dir.path(), &|_| None).expect("config");
    let functions = Functions::build(&config, &registry, dir.path()).expect("functions");
    (Arc::new(functions), dir)
}

fn kafka_config(servers: &str, topic: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: vec![servers.to_string()],
        topics: vec![topic.to_string()],
        topic_pattern: None,
        group_id: unique("bench"),
        security: Default::default(),
        properties: BTreeMap::new(),
        mapping: MappingConfig {
            batch: BatchConfig {
                size: BATCH_SIZE,
                window: Duration::ZERO,
                max_bytes: 6 * 1024 * 1024,
            },
            ..Default::default()
        },
    }
}

fn start(
    functions: &Arc<Functions>,
    name: &str,
    config: KafkaConfig,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let mapping = Mapping::new(
        name,
        name,
        config.mapping.clone(),
        functions.clone(),
        None,
        stop.clone(),
    )
    .expect("mapping");
    let task = tokio::spawn(run_with(Arc::new(mapping), config, KafkaTuning::default()));
    (stop, task)
}

/// Runs `records` messages through a mapping into a native no-op; first to last invocation.
async fn through_mapping(servers: &str, topic: &str, records: usize) -> Duration {
    let counter = Arc::new(Counter {
        records: AtomicUsize::new(0),
        first: Mutex::new(None),
        last: Mutex::new(None),
    });
    let name = "through".to_string();
    let (functions, _dir) = noop_functions(counter.clone(), std::slice::from_ref(&name));
    let (stop, task) = start(&functions, &name, kafka_config(servers, topic));
    let started = Instant::now();
    while counter.records.load(Ordering::SeqCst) < records {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the mapping did not deliver every record"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    let _ = task.await;
    let first = counter.first.lock().expect("first").expect("first");
    let last = counter.last.lock().expect("last").expect("last");
    last - first
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// Resident memory of `n` idle mappings (each its own group, on one empty topic), per mapping.
async fn idle_memory(broker: &Broker, n: usize, settle: Duration) -> (u64, u64) {
    let servers = broker.servers();
    let topic = unique("idle");
    broker.create_topic(&topic).await;
    let counter = Arc::new(Counter {
        records: AtomicUsize::new(0),
        first: Mutex::new(None),
        last: Mutex::new(None),
    });
    let names: Vec<String> = (0..n).map(|i| format!("idle{i}")).collect();
    let (functions, _dir) = noop_functions(counter, &names);
    // Settle the allocator and the runtime with one mapping started and stopped first.
    let (stop, task) = start(&functions, "idle0", kafka_config(&servers, &topic));
    tokio::time::sleep(settle).await;
    stop.cancel();
    let _ = task.await;
    let before = vm_rss_kib();
    let running: Vec<_> = names
        .iter()
        .map(|name| start(&functions, name, kafka_config(&servers, &topic)))
        .collect();
    tokio::time::sleep(settle).await;
    let after = vm_rss_kib();
    for (stop, task) in running {
        stop.cancel();
        let _ = task.await;
    }
    let total = after.saturating_sub(before);
    (total, total / n as u64)
}

fn main() {
    let sizes = sizes();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let broker = Broker::pick();
        let servers = broker.servers();
        let mut rows = Vec::new();
        for size in [100usize, 1024] {
            let topic = unique("bench");
            broker.create_topic(&topic).await;
            fill(&servers, &topic, sizes.records, size).await;
            let bare = bare(&servers, &topic, sizes.records).await;
            let mapped = through_mapping(&servers, &topic, sizes.records).await;
            rows.push((size, "bare rdkafka StreamConsumer", bare));
            rows.push((size, "mapping -> native no-op", mapped));
        }
        let (total, per) = idle_memory(&broker, sizes.idle_mappings, sizes.settle).await;
        println!();
        println!("Kafka mapping, {} records per row from one partition; broker: {}", sizes.records, broker.name());
        println!("mapping: batch.size {BATCH_SIZE}, window 0, parallelization 1, offsets committed as rounds finish");
        println!();
        println!("| record | path                          |   records/s | first to last |");
        println!("|-------:|-------------------------------|------------:|--------------:|");
        for (size, path, elapsed) in rows {
            let rate = (sizes.records.saturating_sub(1)) as f64 / elapsed.as_secs_f64().max(1e-9);
            println!("| {:>5}B | {path:<29} | {rate:>11.0} | {:>11.1}ms |", size, elapsed.as_secs_f64() * 1000.0);
        }
        println!();
        println!(
            "idle mappings: {} started, VmRSS grew {} KiB: about {} KiB per idle Kafka mapping",
            sizes.idle_mappings, total, per
        );
    });
}
