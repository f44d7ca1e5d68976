//! Kafka mappings end to end: a consumer group read through `sluice::pipeline::kafka` into a
//! native function, offsets committed only once records are final.
//!
//! Two kinds of broker:
//! - librdkafka's mock cluster (`mock_*` tests), in-process and broker-free. It is here for
//!   fault injection a real broker cannot do on demand: a broker going down and coming back,
//!   errors answered to offset commits.
//! - tansu (`tansu_*` tests), a real Kafka-protocol broker, at `SLUICE_TEST_KAFKA`
//!   (`scripts/test` starts one). Those tests fail, saying so, when it is unset.
//!
//! Every test uses its own topics and consumer groups, so that they can share one broker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{Value, json};
use sluice::pipeline::Mapping;
use sluice::pipeline::kafka::{KafkaTuning, run_with};
use sluice::{FunctionError, Functions, NativeRegistry};
use sluice_config::{BatchConfig, KafkaConfig, MappingConfig};
use sluice_plugins::DeadLetterSink;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a test waits for deliveries before it fails.
const PATIENCE: Duration = Duration::from_secs(90);

/// Logs to the test's output when `RUST_LOG` is set (`RUST_LOG=sluice=debug`).
fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

fn unique(prefix: &str) -> String {
    logs();
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn tansu() -> String {
    std::env::var("SLUICE_TEST_KAFKA").unwrap_or_else(|_| {
        panic!(
            "SLUICE_TEST_KAFKA is not set: these tests need a Kafka-protocol broker (tansu). \
             Run them through scripts/test, which starts one, or set SLUICE_TEST_KAFKA=HOST:PORT"
        )
    })
}

/// One record as the function saw it.
#[derive(Debug, Clone)]
struct Seen {
    /// Which mapping instance invoked the function.
    instance: String,
    partition: i32,
    offset: i64,
    key: String,
    value: String,
    /// When the function got it.
    at: Instant,
}

/// What the test function answers for a batch.
type Behaviour = Arc<dyn Fn(&[Seen], usize) -> Result<Value, FunctionError> + Send + Sync>;

fn succeed() -> Behaviour {
    Arc::new(|_, _| Ok(Value::Null))
}

/// A native function `sink` that records every record it is given, per mapping instance (the
/// instance is the function's name: one function per instance), and answers as told.
struct Sink {
    functions: Arc<Functions>,
    seen: Arc<Mutex<Vec<Seen>>>,
    _dir: tempfile::TempDir,
}

impl Sink {
    fn new(instances: &[&str], behaviour: Behaviour, pause: Duration) -> Sink {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let batches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut registry = NativeRegistry::new();
        let mut yaml = String::from("functions:\n");
        for instance in instances {
            yaml.push_str(&format!(
                "  {instance}: {{ runtime: native, timeout: 60s }}\n"
            ));
            let (seen, behaviour, batches, instance) = (
                seen.clone(),
                behaviour.clone(),
                batches.clone(),
                instance.to_string(),
            );
            registry.register(instance.clone(), move |event: Value, _ctx| {
                let (seen, behaviour, batches, instance) = (
                    seen.clone(),
                    behaviour.clone(),
                    batches.clone(),
                    instance.clone(),
                );
                async move {
                    let records = decode(&event, &instance);
                    let n = batches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // Seen as soon as the function has them: an invocation cut short by a
                    // crash counts as a delivery, as its side effects would.
                    seen.lock().expect("seen").extend(records.iter().cloned());
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                    behaviour(&records, n)
                }
            });
        }
        let dir = tempfile::tempdir().expect("dir");
        let config =
            sluice_config::parse_str(&yaml, "test.yaml", dir.path(), &|_| None).expect("config");
        let functions = Functions::build(&config, &registry, dir.path()).expect("functions");
        Sink {
            functions: Arc::new(functions),
            seen,
            _dir: dir,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// Waits until every `(partition, offset)` of `expected` was delivered at least once.
    async fn wait_for(&self, expected: &BTreeSet<(i32, i64)>) {
        let started = Instant::now();
        loop {
            let got: BTreeSet<(i32, i64)> = self
                .seen()
                .iter()
                .map(|s| (s.partition, s.offset))
                .collect();
            let missing: Vec<_> = expected.difference(&got).take(10).collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{} of {} records never delivered, first ones: {missing:?}",
                expected.difference(&got).count(),
                expected.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_until(&self, what: &str, done: impl Fn(&[Seen]) -> bool) {
        let started = Instant::now();
        while !done(&self.seen()) {
            assert!(
                started.elapsed() < PATIENCE,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn decode(event: &Value, instance: &str) -> Vec<Seen> {
    assert_eq!(event["eventSource"], "SelfManagedKafka", "{event}");
    let text = |v: &Value| {
        v.as_str()
            .map(|s| String::from_utf8_lossy(&BASE64.decode(s).expect("base64")).into_owned())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for (tp, records) in event["records"].as_object().expect("records") {
        for r in records.as_array().expect("list") {
            assert_eq!(
                format!("{}-{}", r["topic"].as_str().expect("topic"), r["partition"]),
                *tp
            );
            out.push(Seen {
                instance: instance.to_string(),
                partition: r["partition"].as_i64().expect("partition") as i32,
                offset: r["offset"].as_i64().expect("offset"),
                key: text(&r["key"]),
                value: text(&r["value"]),
                at: Instant::now(),
            });
        }
    }
    out
}

fn mapping_config(size: u32, parallelization: u32) -> MappingConfig {
    MappingConfig {
        batch: BatchConfig {
            size,
            window: Duration::ZERO,
            max_bytes: 6 * 1024 * 1024,
        },
        parallelization,
        ..Default::default()
    }
}

fn kafka_config(brokers: &str, topic: &str, group: &str, mapping: MappingConfig) -> KafkaConfig {
    let mut properties = BTreeMap::new();
    // Short group timings so that rebalances in tests take seconds, not tens of seconds.
    properties.insert("session.timeout.ms".to_string(), "6000".to_string());
    properties.insert("heartbeat.interval.ms".to_string(), "500".to_string());
    properties.insert(
        "topic.metadata.refresh.interval.ms".to_string(),
        "1000".to_string(),
    );
    // librdkafka's own debug contexts, when diagnosing: SLUICE_TEST_KAFKA_DEBUG=cgrp,fetch
    if let Ok(contexts) = std::env::var("SLUICE_TEST_KAFKA_DEBUG") {
        properties.insert("debug".to_string(), contexts);
    }
    KafkaConfig {
        brokers: vec![brokers.to_string()],
        topics: vec![topic.to_string()],
        topic_pattern: None,
        group_id: group.to_string(),
        security: Default::default(),
        properties,
        mapping,
    }
}

fn tuning() -> KafkaTuning {
    KafkaTuning {
        revoke_grace: Duration::from_secs(10),
        commit_persistence: Duration::from_secs(10),
    }
}

/// A running mapping instance.
struct Instance {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Instance {
    fn start(
        sink: &Sink,
        function: &str,
        config: KafkaConfig,
        on_failure: Option<(String, Arc<dyn DeadLetterSink>)>,
    ) -> Instance {
        let stop = CancellationToken::new();
        let mapping = Mapping::new(
            function,
            function,
            config.mapping.clone(),
            sink.functions.clone(),
            on_failure,
            stop.clone(),
        )
        .expect("mapping");
        let task = tokio::spawn(run_with(Arc::new(mapping), config, tuning()));
        Instance { stop, task }
    }

    /// Graceful stop: commits what is final and leaves the group.
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the mapping stops within a minute")
            .expect("the mapping task ends cleanly");
    }

    /// What SIGKILL would do: the tasks are dropped where they stand, nothing more is committed.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// One record per record batch. tansu 0.6.0 answers a fetch from an offset inside a batch
/// with the batches that *start* at or after it (Kafka returns the batch holding the offset),
/// so a consumer resuming from a committed offset in mid-batch would never see the rest of
/// that batch. With single-record batches every committed offset is a batch boundary.
fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "120000")
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()
        .expect("producer")
}

/// Produces `values` to `partition` with keys `key-{i % keys}`; returns their offsets.
async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    values: &[String],
    keys: usize,
) -> Vec<i64> {
    let mut deliveries = Vec::new();
    for (i, value) in values.iter().enumerate() {
        let key = format!("key-{}", i % keys.max(1));
        let record = FutureRecord::to(topic)
            .partition(partition)
            .key(&key)
            .payload(value);
        deliveries.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("queued"),
        );
    }
    let mut offsets = Vec::new();
    for d in deliveries {
        let delivery = d
            .await
            .expect("delivery report")
            .map_err(|(e, _)| e)
            .expect("delivered");
        offsets.push(delivery.offset);
    }
    offsets
}

async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e}"));
    }
}

/// The group's committed offsets for `topic`'s partitions.
fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, Offset> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_range(topic, 0, partitions - 1);
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    committed
        .elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect()
}

fn values(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

/// Each partition's offsets in the order of their first delivery must increase: nothing was
/// delivered ahead of a record before it.
fn assert_partition_order(seen: &[Seen]) {
    let mut first: HashMap<i32, Vec<i64>> = HashMap::new();
    let mut delivered: BTreeSet<(i32, i64)> = BTreeSet::new();
    for s in seen {
        if delivered.insert((s.partition, s.offset)) {
            first.entry(s.partition).or_default().push(s.offset);
        }
    }
    for (p, offsets) in first {
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "partition {p} delivered out of order: {offsets:?}"
        );
    }
}

fn duplicates(seen: &[Seen]) -> usize {
    let distinct: BTreeSet<(i32, i64)> = seen.iter().map(|s| (s.partition, s.offset)).collect();
    seen.len() - distinct.len()
}

fn expected(partition: i32, offsets: &[i64]) -> BTreeSet<(i32, i64)> {
    offsets.iter().map(|o| (partition, *o)).collect()
}

// ---- librdkafka's mock cluster: fault injection ----

fn mock(
    partitions: i32,
    topic: &str,
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster
        .create_topic(topic, partitions, 1)
        .expect("mock topic");
    let brokers = cluster.bootstrap_servers();
    (cluster, brokers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_nothing_is_lost_when_the_broker_goes_down_and_comes_back() {
    let topic = unique("down");
    let (cluster, brokers) = mock(2, &topic);
    let sink = Sink::new(&["down"], succeed(), Duration::ZERO);
    let producer = producer(&brokers);
    let mut want = BTreeSet::new();
    for p in 0..2 {
        want.extend(expected(
            p,
            &produce(&producer, &topic, p, &values("before", 200), 5).await,
        ));
    }
    let group = unique("g");
    let instance = Instance::start(
        &sink,
        "down",
        kafka_config(&brokers, &topic, &group, mapping_config(20, 1)),
        None,
    );
    sink.wait_until("some records are delivered", |s| s.len() >= 50)
        .await;

    cluster.broker_down(1).expect("broker down");
    // Produced while the broker is away: the producer holds them until it is back.
    let (p2, t2) = (producer.clone(), topic.clone());
    let late = tokio::spawn(async move {
        let mut offsets = BTreeSet::new();
        for p in 0..2 {
            offsets.extend(expected(
                p,
                &produce(&p2, &t2, p, &values("during", 100), 5).await,
            ));
        }
        offsets
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.broker_up(1).expect("broker up");
    want.extend(late.await.expect("late producer"));

    sink.wait_for(&want).await;
    instance.stop().await;
    let seen = sink.seen();
    assert_partition_order(&seen);
    let ends: BTreeMap<i32, Offset> = (0..2)
        .map(|p| {
            (
                p,
                Offset::Offset(
                    want.iter()
                        .filter(|(q, _)| *q == p)
                        .map(|(_, o)| o + 1)
                        .max()
                        .unwrap_or(0),
                ),
            )
        })
        .collect();
    assert_eq!(
        committed(&brokers, &group, &topic, 2),
        ends,
        "everything delivered is committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_failed_commits_are_made_good_and_lose_nothing() {
    let topic = unique("commit");
    let (cluster, brokers) = mock(1, &topic);
    let sink = Sink::new(&["commit1", "commit2"], succeed(), Duration::ZERO);
    let producer = producer(&brokers);
    let offsets = produce(&producer, &topic, 0, &values("v", 300), 3).await;
    let group = unique("g");
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        ],
    );
    let first = Instance::start(
        &sink,
        "commit1",
        kafka_config(&brokers, &topic, &group, mapping_config(25, 1)),
        None,
    );
    sink.wait_for(&expected(0, &offsets)).await;
    first.stop().await;
    assert_eq!(
        committed(&brokers, &group, &topic, 1),
        BTreeMap::from([(0, Offset::Offset(offsets.last().expect("offsets") + 1))]),
        "the commits that failed were made good"
    );

    // A new instance in the group starts after the last commit: it reads only what is new.
    let more = produce(&producer, &topic, 0, &values("w", 10), 3).await;
    let second = Instance::start(
        &sink,
        "commit2",
        kafka_config(&brokers, &topic, &group, mapping_config(25, 1)),
        None,
    );
    sink.wait_for(&expected(0, &more)).await;
    second.stop().await;
    let again: Vec<i64> = sink
        .seen()
        .iter()
        .filter(|s| s.instance == "commit2")
        .map(|s| s.offset)
        .collect();
    assert_eq!(
        again, more,
        "the second instance reads exactly the new records"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_a_rebalance_hands_partitions_over_with_nothing_lost() {
    let topic = unique("rebalance");
    let (_cluster, brokers) = mock(4, &topic);
    // A little work per batch, so that rounds are in flight when the revoke comes.
    let sink = Sink::new(&["first", "second"], succeed(), Duration::from_millis(5));
    let producer = producer(&brokers);
    let mut want = BTreeSet::new();
    for p in 0..4 {
        want.extend(expected(
            p,
            &produce(&producer, &topic, p, &values("a", 300), 7).await,
        ));
    }
    let group = unique("g");
    let revoked_before = revoked(&["first", "second"]);
    let first = Instance::start(
        &sink,
        "first",
        kafka_config(&brokers, &topic, &group, mapping_config(10, 1)),
        None,
    );
    sink.wait_until("the first instance is under way", |s| s.len() >= 100)
        .await;
    let second = Instance::start(
        &sink,
        "second",
        kafka_config(&brokers, &topic, &group, mapping_config(10, 1)),
        None,
    );
    for p in 0..4 {
        want.extend(expected(
            p,
            &produce(&producer, &topic, p, &values("b", 300), 7).await,
        ));
    }
    sink.wait_for(&want).await;
    let revoked = revoked(&["first", "second"]) - revoked_before;
    first.stop().await;
    second.stop().await;
    let seen = sink.seen();
    assert!(
        seen.iter().any(|s| s.instance == "second"),
        "the second instance took partitions"
    );
    assert_partition_order(&seen);
    // The mock coordinator refuses commits from the moment a rebalance begins (Kafka accepts
    // them until the group's members have rejoined), so what the first instance finished after
    // that is read again by the second: at most two rounds per partition, since a partition's
    // reader waits for the commit of the round before the last. One rebalance revokes the
    // 4 partitions once; a loaded machine can miss heartbeats and rebalance again, and each
    // revoke may cost its two rounds again.
    let bound = revoked.max(4) * 2 * 10;
    let dups = duplicates(&seen);
    assert!(
        dups <= bound,
        "{dups} duplicates, more than two rounds per revoked partition ({revoked} revoked, bound {bound})"
    );
}

/// Partitions revoked from the mappings named `sources` so far (every test of this file that
/// uses those names counts too, which can only make the bound looser, never stricter).
fn revoked(sources: &[&str]) -> usize {
    let handle = sluice::metrics::prometheus().expect("the metrics recorder");
    handle
        .render()
        .lines()
        .filter(|line| line.starts_with(sluice_connectors::kafka::PARTITIONS_REVOKED))
        .filter(|line| {
            sources
                .iter()
                .any(|s| line.contains(&format!("source=\"{s}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

// ---- tansu: a real Kafka-protocol broker ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_keeps_partition_and_key_order_across_a_restart() {
    let brokers = tansu();
    let topic = unique("order");
    create_topic(&brokers, &topic, 3).await;
    let sink = Sink::new(&["order1", "order2"], succeed(), Duration::ZERO);
    let producer = producer(&brokers);
    let mut want = BTreeSet::new();
    for p in 0..3 {
        want.extend(expected(
            p,
            &produce(&producer, &topic, p, &values("a", 200), 4).await,
        ));
    }
    let group = unique("g");
    let first = Instance::start(
        &sink,
        "order1",
        kafka_config(&brokers, &topic, &group, mapping_config(15, 1)),
        None,
    );
    sink.wait_until("a third is delivered", |s| s.len() >= 200)
        .await;
    first.stop().await;
    let second = Instance::start(
        &sink,
        "order2",
        kafka_config(&brokers, &topic, &group, mapping_config(15, 1)),
        None,
    );
    for p in 0..3 {
        want.extend(expected(
            p,
            &produce(&producer, &topic, p, &values("b", 100), 4).await,
        ));
    }
    sink.wait_for(&want).await;
    second.stop().await;
    let seen = sink.seen();
    assert_partition_order(&seen);
    assert_eq!(
        duplicates(&seen),
        0,
        "a graceful stop commits everything it delivered"
    );
    // Within a key, values arrive in the order they were produced.
    let mut by_key: HashMap<(i32, String), Vec<String>> = HashMap::new();
    for s in &seen {
        by_key
            .entry((s.partition, s.key.clone()))
            .or_default()
            .push(s.value.clone());
    }
    for (key, vals) in by_key {
        let mut sorted = vals.clone();
        sorted.sort();
        assert_eq!(vals, sorted, "key {key:?} out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_parallel_lanes_keep_each_keys_order() {
    let brokers = tansu();
    let topic = unique("lanes");
    create_topic(&brokers, &topic, 1).await;
    let sink = Sink::new(&["lanes"], succeed(), Duration::from_millis(2));
    let producer = producer(&brokers);
    let offsets = produce(&producer, &topic, 0, &values("v", 400), 8).await;
    let group = unique("g");
    let instance = Instance::start(
        &sink,
        "lanes",
        kafka_config(&brokers, &topic, &group, mapping_config(5, 4)),
        None,
    );
    sink.wait_for(&expected(0, &offsets)).await;
    instance.stop().await;
    let seen = sink.seen();
    assert_eq!(duplicates(&seen), 0);
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    for s in &seen {
        by_key.entry(s.key.clone()).or_default().push(s.offset);
    }
    assert_eq!(by_key.len(), 8);
    for (key, offsets) in by_key {
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order: {offsets:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_a_poison_record_goes_to_the_kafka_dead_letter_and_its_partition_flows_on() {
    let brokers = tansu();
    let topic = unique("poison");
    let dlq = unique("poison-dlq");
    create_topic(&brokers, &topic, 1).await;
    create_topic(&brokers, &dlq, 1).await;
    let behaviour: Behaviour = Arc::new(|records, _| {
        if records.iter().any(|r| r.value == "poison") {
            Err(FunctionError::new("PoisonError", "cannot digest this one"))
        } else {
            Ok(Value::Null)
        }
    });
    let sink = Sink::new(&["poison"], behaviour, Duration::ZERO);
    let producer = producer(&brokers);
    let mut vals = values("v", 60);
    vals[23] = "poison".to_string();
    let offsets = produce(&producer, &topic, 0, &vals, 1).await;
    let dead_letter: Arc<dyn DeadLetterSink> =
        Arc::new(sluice_plugins::kafka::KafkaDeadLetter::new(
            std::slice::from_ref(&brokers),
            &dlq,
            &BTreeMap::new(),
        ));
    let mut mapping = mapping_config(10, 1);
    mapping.retry.max_attempts = Some(1);
    mapping.bisect_on_error = true;
    mapping.on_failure = Some("dlq".to_string());
    let group = unique("g");
    let instance = Instance::start(
        &sink,
        "poison",
        kafka_config(&brokers, &topic, &group, mapping),
        Some(("dlq".to_string(), dead_letter)),
    );
    let healthy: BTreeSet<(i32, i64)> = offsets
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 23)
        .map(|(_, o)| (0, *o))
        .collect();
    sink.wait_for(&healthy).await;

    // The dead letter: the original record, key and value untouched, the story in headers.
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("dlq reader");
    reader.subscribe(&[&dlq]).expect("subscribe");
    let message = tokio::time::timeout(PATIENCE, reader.recv())
        .await
        .expect("a dead letter")
        .expect("read");
    assert_eq!(message.payload(), Some(&b"poison"[..]));
    assert_eq!(message.key(), Some(&b"key-0"[..]));
    let headers: HashMap<String, String> = message
        .headers()
        .expect("headers")
        .iter()
        .map(|h| {
            (
                h.key.to_string(),
                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
            )
        })
        .collect();
    assert_eq!(headers["sluice-condition"], "RetryAttemptsExhausted");
    assert_eq!(headers["sluice-source"], "poison");
    assert_eq!(headers["sluice-error-type"], "PoisonError");
    assert_eq!(headers["sluice-error-message"], "cannot digest this one");
    assert_eq!(headers["sluice-offset"], offsets[23].to_string());
    drop(message);

    // The partition flowed on past the poison record, and the commit covers it.
    let more = produce(&producer, &topic, 0, &values("after", 5), 1).await;
    sink.wait_for(&expected(0, &more)).await;
    instance.stop().await;
    assert_partition_order(&sink.seen());
    assert_eq!(
        committed(&brokers, &group, &topic, 1),
        BTreeMap::from([(0, Offset::Offset(more.last().expect("more") + 1))])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_batch_item_failures_retry_from_the_failed_record() {
    let brokers = tansu();
    let topic = unique("items");
    create_topic(&brokers, &topic, 1).await;
    let producer = producer(&brokers);
    let offsets = produce(&producer, &topic, 0, &values("v", 30), 1).await;
    let failing = offsets[5];
    let failing_id = format!("{topic}-0@{failing}");
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let behaviour: Behaviour = {
        let failed_once = failed_once.clone();
        Arc::new(move |records, _| {
            let hit = records.iter().any(|r| r.offset == failing);
            if hit && !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                Ok(json!({"batchItemFailures": [{"itemIdentifier": failing_id}]}))
            } else {
                Ok(json!({"batchItemFailures": []}))
            }
        })
    };
    let sink = Sink::new(&["items"], behaviour, Duration::ZERO);
    let mut mapping = mapping_config(10, 1);
    // A window, so that the first batch is surely offsets[0..10].
    mapping.batch.window = Duration::from_secs(1);
    mapping.report_batch_item_failures = true;
    let group = unique("g");
    let instance = Instance::start(
        &sink,
        "items",
        kafka_config(&brokers, &topic, &group, mapping),
        None,
    );
    sink.wait_for(&expected(0, &offsets)).await;
    instance.stop().await;
    let seen = sink.seen();
    let count = |o: i64| seen.iter().filter(|s| s.offset == o).count();
    for (i, o) in offsets.iter().enumerate() {
        // The batch holding the failure is offsets[0..10]: what precedes the failed record is
        // done, the failed record and what follows it in the batch are tried again.
        let want = if (5..10).contains(&i) { 2 } else { 1 };
        assert_eq!(
            count(*o),
            want,
            "record {i} (offset {o}) delivered {} times",
            count(*o)
        );
    }
    assert_partition_order(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_two_instances_share_partitions_and_a_killed_one_loses_nothing() {
    let brokers = tansu();
    let topic = unique("shared");
    let partitions = 4;
    let per_partition = 400;
    create_topic(&brokers, &topic, partitions).await;
    // Slow enough that the kill lands while the first instance is partway through its partitions.
    let sink = Sink::new(&["a", "b"], succeed(), Duration::from_millis(20));
    let producer = producer(&brokers);
    let mut want = BTreeSet::new();
    let group = unique("g");
    let batch = 10;
    let a = Instance::start(
        &sink,
        "a",
        kafka_config(&brokers, &topic, &group, mapping_config(batch, 1)),
        None,
    );
    let b = Instance::start(
        &sink,
        "b",
        kafka_config(&brokers, &topic, &group, mapping_config(batch, 1)),
        None,
    );
    // A trickle until the group has settled: both instances deliver at the same moment.
    let settling = Instant::now();
    loop {
        for p in 0..partitions {
            want.extend(expected(
                p,
                &produce(&producer, &topic, p, &values("w", 1), 1).await,
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = sink.seen();
        let recent = |name: &str| {
            seen.iter()
                .any(|s| s.instance == name && s.at.elapsed() < Duration::from_millis(300))
        };
        if recent("a") && recent("b") {
            break;
        }
        assert!(
            settling.elapsed() < PATIENCE,
            "the two instances never shared the partitions"
        );
    }
    for p in 0..partitions {
        want.extend(expected(
            p,
            &produce(&producer, &topic, p, &values("a", per_partition), 5).await,
        ));
    }
    sink.wait_until("the first instance is partway through", |s| {
        s.iter()
            .filter(|s| s.instance == "a" && s.value.starts_with("a-"))
            .count()
            >= 40
    })
    .await;
    a.kill().await;
    // Where the killed instance was in its partitions when it was killed.
    let mut killed_at: HashMap<i32, i64> = HashMap::new();
    for s in sink
        .seen()
        .iter()
        .filter(|s| s.instance == "a" && s.value.starts_with("a-"))
    {
        let at = killed_at.entry(s.partition).or_default();
        *at = (*at).max(s.offset);
    }
    for p in 0..partitions {
        want.extend(expected(
            p,
            &produce(&producer, &topic, p, &values("b", 150), 5).await,
        ));
    }
    sink.wait_for(&want).await;
    b.stop().await;
    let seen = sink.seen();
    assert!(
        seen.iter().any(|s| s.instance == "b"
            && killed_at.get(&s.partition).is_some_and(|at| s.offset > *at)
            && s.value.starts_with("a-")),
        "the survivor took over a partition the killed instance was partway through"
    );
    // What a killed instance had delivered but not committed is delivered again: at most its
    // round in flight and the round whose commit was still travelling, per partition.
    let bound = partitions as usize * 2 * batch as usize;
    let dups = duplicates(&seen);
    eprintln!("{dups} records delivered again after the kill (bound {bound})");
    assert!(
        dups <= bound,
        "{dups} duplicates, more than the in-flight window of {bound}"
    );
    assert_partition_order(
        &seen
            .iter()
            .filter(|s| s.instance == "b")
            .cloned()
            .collect::<Vec<_>>(),
    );
}
