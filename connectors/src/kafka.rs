//! `type: kafka`: a consumer in a consumer group, its records in the shape Lambda delivers for
//! self-managed Apache Kafka, and the group's rebalances handed to the mapping driver
//! (`sluice::pipeline::kafka`) so that offsets are committed only for records whose outcome is
//! final.
//!
//! Three rules shape the consumer:
//!
//! - **Offsets are Sluice's to commit.** `enable.auto.commit` and `enable.auto.offset.store`
//!   are off; the driver commits the offset after the last final record, per partition.
//! - **Each partition has its own queue, split before it is assigned.** The rebalance callback
//!   splits the queues of newly assigned partitions *before* calling `assign`: librdkafka then
//!   never forwards their messages to the consumer's main queue (an application-set forward is
//!   sticky), so no message can slip past its partition's queue and out of order. The main
//!   queue only carries group events, polled by a dedicated thread.
//! - **A revoke waits for the driver.** The callback runs on that thread; on a revoke it hands
//!   the partitions to the driver, which stops reading them, lets their in-flight rounds finish
//!   (within a grace), commits what is final, and only then lets the callback return and the
//!   partitions go. Blocking there is why the main queue has a thread of its own rather than a
//!   task on the runtime.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, Timestamp, TopicPartitionList};
use serde_json::{Map, Value, json};
use sluice_config::{KafkaConfig, StartingPosition};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::record::Record;

/// The consumer every Kafka mapping uses.
pub type KafkaConsumer = StreamConsumer<GroupContext>;
/// Partitions taken from this consumer by a rebalance (revoked, or lost when its session
/// expired), labelled `source`: each may cause the records after its last commit to be read
/// again by the next owner, so a high rate means duplicates.
pub const PARTITIONS_REVOKED: &str = "sluice_kafka_partitions_revoked_total";

/// The queue of one assigned partition.
pub type PartitionQueue = StreamPartitionQueue<GroupContext>;

/// `eventSource` of Lambda's self-managed Apache Kafka events.
pub const EVENT_SOURCE: &str = "SelfManagedKafka";
/// The key Lambda gives a Kafka batch in an on-failure record.
pub const BATCH_INFO_KEY: &str = "KafkaBatchInfo";

/// What a partition's queue may hold before librdkafka pauses fetching it, in KiB (a fetch
/// response, `max.partition.fetch.bytes`, 1 MiB by default, may come on top).
const QUEUED_KBYTES: u64 = 4096;

/// How long network lookups made inside a rebalance (committed offsets, offsets for a
/// timestamp) may take before the partition falls back to `auto.offset.reset`.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A topic's partition; shown `topic-partition`, as the keys of Lambda's `records` map.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.topic, self.partition)
    }
}

/// What the consumer group tells the mapping driver.
pub enum GroupEvent {
    /// These partitions are now this member's, each with its own queue; reading starts at the
    /// group's committed offset (or the starting position when there is none).
    Assigned(Vec<(TopicPartition, PartitionQueue)>),
    /// These partitions are being taken away. Stop reading them, let in-flight work finish,
    /// commit what is final, then drop `done`: the rebalance waits for that (up to the
    /// consumer's revoke wait) before the partitions go to another member.
    Revoked {
        partitions: Vec<TopicPartition>,
        done: std::sync::mpsc::Sender<()>,
    },
    /// An error of the consumer as a whole (brokers unreachable, authentication, …).
    /// librdkafka keeps retrying on its own; the driver counts and logs it.
    Error(KafkaError),
}

/// The consumer's context: librdkafka's callbacks, served on the main-queue thread.
pub struct GroupContext {
    source: String,
    events: mpsc::UnboundedSender<GroupEvent>,
    consumer: OnceLock<Weak<KafkaConsumer>>,
    starting_position: StartingPosition,
    revoke_wait: Duration,
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(source = %self.source, facility = fac, "librdkafka: {message}")
            }
            L::Warning => {
                tracing::warn!(source = %self.source, facility = fac, "librdkafka: {message}")
            }
            L::Notice | L::Info => {
                tracing::info!(source = %self.source, facility = fac, "librdkafka: {message}")
            }
            L::Debug => {
                tracing::debug!(source = %self.source, facility = fac, "librdkafka: {message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(source = %self.source, %error, reason, "consumer error");
        let _ = self.events.send(GroupEvent::Error(error));
    }
}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let StartingPosition::AtTimestamp(ms) = self.starting_position {
                    position_at_timestamp(base, tpl, ms, &self.source);
                }
                // Split first, assign second: see the module's notes.
                let queues = self.split(tpl);
                tracing::info!(source = %self.source, partitions = %names(tpl), "partitions assigned");
                let _ = self.events.send(GroupEvent::Assigned(queues));
                let assigned = if cooperative {
                    base.incremental_assign(tpl)
                } else {
                    base.assign(tpl)
                };
                if let Err(error) = assigned {
                    tracing::error!(source = %self.source, %error, "cannot take the assigned partitions");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if base.assignment_lost() {
                    tracing::warn!(source = %self.source, partitions = %names(tpl),
                        "partitions lost (session expired): their offsets may no longer be committed, records past the last commit will be read again");
                } else {
                    tracing::info!(source = %self.source, partitions = %names(tpl), "partitions revoked");
                }
                metrics::counter!(PARTITIONS_REVOKED, "source" => self.source.clone())
                    .increment(tpl.count() as u64);
                self.hand_back(tpl);
                let released = if cooperative {
                    base.incremental_unassign(tpl)
                } else {
                    base.unassign()
                };
                if let Err(error) = released {
                    tracing::error!(source = %self.source, %error, "cannot release the revoked partitions");
                }
            }
            other => {
                tracing::error!(source = %self.source, error = ?other, "rebalance failed; releasing every partition");
                let _ = base.unassign();
            }
        }
    }
}

impl GroupContext {
    fn split(&self, tpl: &TopicPartitionList) -> Vec<(TopicPartition, PartitionQueue)> {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return Vec::new();
        };
        let mut queues = Vec::new();
        for element in tpl.elements() {
            let tp = TopicPartition::new(element.topic(), element.partition());
            match consumer.split_partition_queue(&tp.topic, tp.partition) {
                Some(queue) => queues.push((tp, queue)),
                None => {
                    tracing::error!(source = %self.source, partition = %tp, "cannot open the partition's queue")
                }
            }
        }
        queues
    }

    fn hand_back(&self, tpl: &TopicPartitionList) {
        let partitions: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| TopicPartition::new(e.topic(), e.partition()))
            .collect();
        let (done, finished) = std::sync::mpsc::channel();
        if self
            .events
            .send(GroupEvent::Revoked { partitions, done })
            .is_err()
        {
            // The driver is gone (stopped, or its tasks were dropped): nothing to wait for.
            return;
        }
        match finished.recv_timeout(self.revoke_wait) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(source = %self.source, wait = ?self.revoke_wait,
                    "the revoked partitions' work did not finish in time; releasing them uncommitted");
            }
        }
    }
}

/// For `starting_position: at_timestamp`: partitions without a committed offset start at the
/// first record at or after `ms`, or at the end when there is none yet.
fn position_at_timestamp(
    base: &BaseConsumer<GroupContext>,
    tpl: &mut TopicPartitionList,
    ms: i64,
    source: &str,
) {
    let committed = match base.committed_offsets(tpl.clone(), LOOKUP_TIMEOUT) {
        Ok(c) => c,
        Err(error) => {
            tracing::warn!(%source, %error, "cannot read the committed offsets; partitions without one start at auto.offset.reset (earliest)");
            return;
        }
    };
    let mut query = TopicPartitionList::new();
    for e in committed.elements() {
        if matches!(e.offset(), Offset::Invalid)
            && let Err(error) =
                query.add_partition_offset(e.topic(), e.partition(), Offset::Offset(ms))
        {
            tracing::warn!(%source, %error, "cannot ask for offsets by time");
        }
    }
    if query.count() == 0 {
        return;
    }
    match base.offsets_for_times(query, LOOKUP_TIMEOUT) {
        Ok(found) => {
            for e in found.elements() {
                let offset = match e.offset() {
                    Offset::Offset(o) => Offset::Offset(o),
                    // No record at or after the timestamp yet: start with the next one written.
                    _ => Offset::End,
                };
                let _ = tpl.set_partition_offset(e.topic(), e.partition(), offset);
            }
        }
        Err(error) => {
            tracing::warn!(%source, %error, "cannot look up offsets for the starting timestamp; partitions without a committed offset start at auto.offset.reset (earliest)");
        }
    }
}

fn names(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}-{}", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Debug, Error)]
pub enum BuildError {
    #[error("cannot create the Kafka consumer of source `{source_name}`: {error}")]
    Create {
        source_name: String,
        #[source]
        error: Box<KafkaError>,
    },
    #[error("cannot subscribe source `{source_name}` to {topics}: {error}")]
    Subscribe {
        source_name: String,
        topics: String,
        #[source]
        error: Box<KafkaError>,
    },
    #[error("cannot start the consumer thread of source `{source_name}`: {error}")]
    Thread {
        source_name: String,
        #[source]
        error: std::io::Error,
    },
}

/// librdkafka's client configuration for a Kafka mapping. Sluice's own settings come first,
/// then security, then the raw `properties` (the config loader refuses those that would
/// override offsets, group or security).
pub fn client_config(name: &str, config: &KafkaConfig) -> ClientConfig {
    let mapping = &config.mapping;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", config.brokers.join(","))
        .set("group.id", &config.group_id)
        .set("client.id", format!("sluice-{name}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set(
            "auto.offset.reset",
            match mapping.starting_position {
                StartingPosition::Latest => "latest",
                // `at_timestamp` positions partitions itself on assignment; when that lookup
                // fails, reading from the start repeats records but loses none.
                StartingPosition::TrimHorizon | StartingPosition::AtTimestamp(_) => "earliest",
            },
        );
    // Each partition's queue is what bounds memory: librdkafka stops fetching a partition whose
    // queue holds `queued.min.messages` or `queued.max.messages.kbytes` (per partition, since
    // the queues are split) — the partition's pause — and looks again after
    // `fetch.queue.backoff.ms`. A few rounds' worth, not librdkafka's 100 000 messages / 64 MB
    // per partition; a short look-again, not its 1 s, so that a drained queue refills at once.
    let round = (mapping.batch.size.max(1) as u64) * (mapping.parallelization.max(1) as u64);
    c.set(
        "queued.min.messages",
        (round * 4).clamp(1_000, 100_000).to_string(),
    )
    .set("queued.max.messages.kbytes", QUEUED_KBYTES.to_string())
    .set("fetch.queue.backoff.ms", "20");
    let security = &config.security;
    if let Some(protocol) = &security.protocol {
        c.set("security.protocol", protocol);
    }
    if let Some(mechanism) = &security.sasl_mechanism {
        c.set("sasl.mechanisms", mechanism);
    }
    if let Some(username) = &security.username {
        c.set("sasl.username", username);
    }
    if let Some(password) = &security.password {
        c.set("sasl.password", password);
    }
    if let Some(ca) = &security.ca_location {
        c.set("ssl.ca.location", ca.to_string_lossy());
    }
    for (key, value) in &config.properties {
        c.set(key, value);
    }
    // rdkafka sets librdkafka's log level from the `log` crate's, which Sluice does not use:
    // whoever asks for librdkafka's `debug` contexts wants to see them.
    c.set_log_level(if config.properties.contains_key("debug") {
        rdkafka::config::RDKafkaLogLevel::Debug
    } else {
        rdkafka::config::RDKafkaLogLevel::Warning
    });
    c
}

/// What a Kafka mapping subscribes to. librdkafka reads a subscription that starts with `^` as
/// a regular expression (POSIX extended), matched from the start of the topic name.
pub fn subscription(config: &KafkaConfig) -> Vec<String> {
    match &config.topic_pattern {
        Some(pattern) if pattern.starts_with('^') => vec![pattern.clone()],
        Some(pattern) => vec![format!("^{pattern}")],
        None => config.topics.clone(),
    }
}

/// A running consumer in its group, with the thread that serves its group events.
pub struct KafkaSource {
    consumer: Arc<KafkaConsumer>,
    bootstrap_servers: String,
    stop: Arc<AtomicBool>,
    poller: Option<std::thread::JoinHandle<()>>,
}

impl KafkaSource {
    /// Creates the consumer, subscribes and starts serving group events. Must be called within
    /// a Tokio runtime. `revoke_wait` bounds how long a rebalance waits for the driver to
    /// finish the revoked partitions' work. The receiver gets the group's events.
    pub fn connect(
        name: &str,
        config: &KafkaConfig,
        revoke_wait: Duration,
    ) -> Result<(Self, mpsc::UnboundedReceiver<GroupEvent>), BuildError> {
        // Unbounded, yet bounded in practice: rebalances and consumer errors are few, and each
        // revoke waits for its answer before the next event can be sent.
        let (events, receiver) = mpsc::unbounded_channel();
        let context = GroupContext {
            source: name.to_string(),
            events,
            consumer: OnceLock::new(),
            starting_position: config.mapping.starting_position.clone(),
            revoke_wait,
        };
        let consumer: KafkaConsumer = client_config(name, config)
            .create_with_context(context)
            .map_err(|error| BuildError::Create {
                source_name: name.to_string(),
                error: Box::new(error),
            })?;
        let consumer = Arc::new(consumer);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        let topics = subscription(config);
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&refs)
            .map_err(|error| BuildError::Subscribe {
                source_name: name.to_string(),
                topics: topics.join(","),
                error: Box::new(error),
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let poller = {
            let consumer = consumer.clone();
            let stop = stop.clone();
            let source = name.to_string();
            std::thread::Builder::new()
                .name(format!("kafka-{name}"))
                .spawn(move || serve_group_events(&source, consumer, &stop))
                .map_err(|error| BuildError::Thread {
                    source_name: name.to_string(),
                    error,
                })?
        };
        Ok((
            KafkaSource {
                consumer,
                bootstrap_servers: config.brokers.join(","),
                stop,
                poller: Some(poller),
            },
            receiver,
        ))
    }

    pub fn consumer(&self) -> &Arc<KafkaConsumer> {
        &self.consumer
    }

    /// `bootstrapServers` of the events.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// Commits `next_offset` (the offset after the last final record) for a partition.
    /// Synchronous (it waits for the group coordinator); call it off the async threads.
    pub fn commit_sync(&self, tp: &TopicPartition, next_offset: i64) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next_offset))?;
        // With one partition, its error is the commit's error.
        self.consumer.commit(&tpl, CommitMode::Sync)
    }

    /// Whether a failed commit can only fail again in this group generation: the group is
    /// rebalancing, or this member is no longer the one the group knows. Retrying such a commit
    /// while a partition is being let go only delays the rebalance.
    pub fn commit_needs_new_generation(error: &KafkaError) -> bool {
        use rdkafka::types::RDKafkaErrorCode as C;
        matches!(
            error.rdkafka_error_code(),
            Some(
                C::RebalanceInProgress
                    | C::IllegalGeneration
                    | C::UnknownMemberId
                    | C::FencedInstanceId
                    | C::StaleMemberEpoch
                    | C::AssignmentLost
            )
        )
    }

    /// The partition's high watermark as of the last fetch response (no network call), if
    /// one has been seen.
    pub fn high_watermark(&self, tp: &TopicPartition) -> Option<i64> {
        let topic = CString::new(tp.topic.as_str()).ok()?;
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client pointer is valid while `self.consumer` lives; librdkafka only
        // reads the topic string and writes the two integers.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                self.consumer.client().native_ptr(),
                topic.as_ptr(),
                tp.partition,
                &mut low,
                &mut high,
            )
        };
        (err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
    }

    /// Lambda's event for a batch: `records` grouped by `topic-partition`, in order.
    pub fn envelope(&self, records: &[&Record]) -> Value {
        envelope(&self.bootstrap_servers, records)
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // The thread notices within one poll interval and drops its handle on the consumer;
        // whoever drops the last handle closes the consumer (leaving the group).
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
    }
}

/// Serves the main queue: rebalances, commit results, errors. Messages never arrive here (each
/// partition's queue is split before it is assigned); should one anyway, its partition is
/// sought back to it so that it is read, in order, from the partition's queue.
fn serve_group_events(name: &str, consumer: Arc<KafkaConsumer>, stop: &AtomicBool) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            tracing::error!(source = %name, %error, "cannot start the consumer's event loop");
            return;
        }
    };
    runtime.block_on(async {
        while !stop.load(Ordering::Acquire) {
            let polled = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await;
            match polled {
                Err(_idle) => {}
                Ok(Ok(message)) => {
                    let tp = TopicPartition::new(message.topic(), message.partition());
                    let offset = message.offset();
                    drop(message);
                    tracing::error!(source = %name, partition = %tp, offset,
                        "a message reached the consumer's main queue; seeking its partition back to it");
                    if let Err(error) = consumer.seek(&tp.topic, tp.partition, Offset::Offset(offset), Duration::from_secs(1)) {
                        tracing::error!(source = %name, partition = %tp, %error, "cannot seek");
                    }
                }
                Ok(Err(error)) => {
                    let _ = consumer.context().events.send(GroupEvent::Error(error));
                }
            }
        }
    });
}

/// One Kafka message as a [`Record`]. Its `id` is `topic-partition@offset` — what a
/// `batchItemFailures` entry names, whether as that string or as Lambda's
/// `{"partition": "topic-partition", "offset": N}` — its `position` the offset, its `key` the
/// message key (base64) for `parallelization` lanes.
pub fn record(message: &impl Message) -> Record {
    let topic = message.topic();
    let partition = message.partition();
    let offset = message.offset();
    let (timestamp, timestamp_type) = match message.timestamp() {
        Timestamp::CreateTime(ms) => (ms, "CREATE_TIME"),
        Timestamp::LogAppendTime(ms) => (ms, "LOG_APPEND_TIME"),
        Timestamp::NotAvailable => (-1, "NO_TIMESTAMP_TYPE"),
    };
    let key = message.key().map(|k| BASE64.encode(k));
    let value = message.payload().map(|v| BASE64.encode(v));
    let mut header_bytes = 0;
    let headers: Vec<Value> = message
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    let bytes = h.value.unwrap_or_default();
                    header_bytes += h.key.len() + bytes.len() * 4 + 8;
                    // Lambda hands header values over as Java bytes: signed.
                    let signed: Vec<i8> = bytes.iter().map(|b| *b as i8).collect();
                    let mut header = Map::new();
                    header.insert(h.key.to_string(), json!(signed));
                    Value::Object(header)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut lambda = Map::new();
    lambda.insert("topic".into(), json!(topic));
    lambda.insert("partition".into(), json!(partition));
    lambda.insert("offset".into(), json!(offset));
    lambda.insert("timestamp".into(), json!(timestamp));
    lambda.insert("timestampType".into(), json!(timestamp_type));
    if let Some(key) = &key {
        lambda.insert("key".into(), json!(key));
    }
    if let Some(value) = &value {
        lambda.insert("value".into(), json!(value));
    }
    lambda.insert("headers".into(), Value::Array(headers));
    let lambda = Value::Object(lambda);
    let mut filter_view = lambda.clone();
    if value.is_some() {
        filter_view["value"] = message
            .payload()
            .and_then(|v| serde_json::from_slice(v).ok())
            .unwrap_or(Value::Null);
    }
    // What the record adds to the event's JSON, for `batch.max_bytes` against Lambda's
    // payload limit: base64 text, header numbers and the fixed fields.
    let size = key.as_ref().map_or(0, String::len)
        + value.as_ref().map_or(0, String::len)
        + header_bytes
        + topic.len()
        + 128;
    Record {
        id: format!("{topic}-{partition}@{offset}"),
        position: offset.to_string(),
        key: key.unwrap_or_default(),
        arrival_ms: if timestamp >= 0 {
            timestamp
        } else {
            chrono::Utc::now().timestamp_millis()
        },
        size,
        lambda,
        filter_view,
    }
}

/// Lambda's self-managed Kafka event for `records`: grouped by `topic-partition`, each group
/// in the order given.
pub fn envelope(bootstrap_servers: &str, records: &[&Record]) -> Value {
    let mut groups: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in records {
        let key = format!(
            "{}-{}",
            r.lambda["topic"].as_str().unwrap_or_default(),
            r.lambda["partition"]
        );
        groups.entry(key).or_default().push(&r.lambda);
    }
    json!({
        "eventSource": EVENT_SOURCE,
        "bootstrapServers": bootstrap_servers,
        "records": groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};

    fn message(
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> OwnedMessage {
        OwnedMessage::new(
            value.map(<[u8]>::to_vec),
            key.map(<[u8]>::to_vec),
            "orders".to_string(),
            Timestamp::CreateTime(1_700_000_000_123),
            3,
            42,
            headers,
        )
    }

    fn config() -> KafkaConfig {
        KafkaConfig {
            brokers: vec!["127.0.0.1:9092".into(), "kafka-2:9092".into()],
            topics: vec!["orders".into()],
            topic_pattern: None,
            group_id: "g".into(),
            security: Default::default(),
            properties: BTreeMap::new(),
            mapping: Default::default(),
        }
    }

    #[test]
    fn events_read_as_lambdas_kafka_event() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "trace",
                value: Some(&b"ab\xff"[..]),
            })
            .insert(Header {
                key: "empty",
                value: None::<&[u8]>,
            });
        let a = record(&message(
            Some(b"k1"),
            Some(br#"{"total": 12}"#),
            Some(headers),
        ));
        let b = record(&message(None, Some(b"plain"), None));
        let event = envelope("127.0.0.1:9092,kafka-2:9092", &[&a, &b]);
        let parsed: aws_lambda_events::event::kafka::KafkaEvent =
            serde_json::from_value(event.clone()).expect("a KafkaEvent");
        assert_eq!(parsed.event_source.as_deref(), Some("SelfManagedKafka"));
        assert_eq!(
            parsed.bootstrap_servers.as_deref(),
            Some("127.0.0.1:9092,kafka-2:9092")
        );
        let records = &parsed.records["orders-3"];
        assert_eq!(records.len(), 2);
        let first = &records[0];
        assert_eq!(first.topic.as_deref(), Some("orders"));
        assert_eq!((first.partition, first.offset), (3, 42));
        // The reference type reads milliseconds through a float; the JSON holds them exactly.
        assert!((first.timestamp.0.timestamp_millis() - 1_700_000_000_123).abs() <= 1);
        assert_eq!(
            event["records"]["orders-3"][0]["timestamp"],
            1_700_000_000_123i64
        );
        assert_eq!(first.timestamp_type.as_deref(), Some("CREATE_TIME"));
        assert_eq!(first.key.as_deref(), Some(BASE64.encode(b"k1").as_str()));
        assert_eq!(
            first.value.as_deref(),
            Some(BASE64.encode(br#"{"total": 12}"#).as_str())
        );
        assert_eq!(first.headers[0]["trace"], vec![97i8, 98, -1]);
        assert_eq!(first.headers[1]["empty"], Vec::<i8>::new());
        assert_eq!(records[1].key, None);
        assert_eq!(
            event["records"]["orders-3"][1].get("key"),
            None,
            "no key, no field"
        );
    }

    #[test]
    fn a_record_carries_its_coordinates() {
        let r = record(&message(
            Some(b"customer-7"),
            Some(br#"{"total": 12}"#),
            None,
        ));
        assert_eq!(r.id, "orders-3@42");
        assert_eq!(r.position, "42");
        assert_eq!(r.key, BASE64.encode(b"customer-7"));
        assert_eq!(r.arrival_ms, 1_700_000_000_123);
        assert!(r.size >= BASE64.encode(br#"{"total": 12}"#).len());
        assert_eq!(r.filter_view["value"], json!({"total": 12}));
        assert_eq!(r.filter_view["topic"], "orders");
        let opaque = record(&message(None, Some(b"\x00not json"), None));
        assert_eq!(opaque.filter_view["value"], Value::Null);
        assert_eq!(opaque.lambda["value"], BASE64.encode(b"\x00not json"));
    }

    #[test]
    fn offsets_are_sluices_and_properties_come_last() {
        let mut c = config();
        c.security = sluice_config::KafkaSecurity {
            protocol: Some("sasl_ssl".into()),
            sasl_mechanism: Some("SCRAM-SHA-512".into()),
            username: Some("u".into()),
            password: Some("p".into()),
            ca_location: Some("/etc/ca.pem".into()),
        };
        c.properties
            .insert("session.timeout.ms".into(), "6000".into());
        c.properties
            .insert("queued.min.messages".into(), "7".into());
        let cc = client_config("orders", &c);
        assert_eq!(
            cc.get("bootstrap.servers"),
            Some("127.0.0.1:9092,kafka-2:9092")
        );
        assert_eq!(cc.get("group.id"), Some("g"));
        assert_eq!(cc.get("enable.auto.commit"), Some("false"));
        assert_eq!(cc.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(cc.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(cc.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(cc.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(cc.get("sasl.username"), Some("u"));
        assert_eq!(cc.get("sasl.password"), Some("p"));
        assert_eq!(cc.get("ssl.ca.location"), Some("/etc/ca.pem"));
        assert_eq!(cc.get("session.timeout.ms"), Some("6000"));
        assert_eq!(
            cc.get("queued.min.messages"),
            Some("7"),
            "raw properties win"
        );
        c.mapping.starting_position = StartingPosition::Latest;
        assert_eq!(
            client_config("orders", &c).get("auto.offset.reset"),
            Some("latest")
        );
    }

    #[test]
    fn only_group_generation_errors_make_a_commit_futile() {
        use rdkafka::types::RDKafkaErrorCode as C;
        for code in [
            C::RebalanceInProgress,
            C::IllegalGeneration,
            C::UnknownMemberId,
        ] {
            assert!(
                KafkaSource::commit_needs_new_generation(&KafkaError::ConsumerCommit(code)),
                "{code:?}"
            );
        }
        for code in [
            C::RequestTimedOut,
            C::CoordinatorNotAvailable,
            C::NotCoordinator,
        ] {
            assert!(
                !KafkaSource::commit_needs_new_generation(&KafkaError::ConsumerCommit(code)),
                "{code:?}"
            );
        }
    }

    #[test]
    fn a_topic_pattern_is_a_librdkafka_regex() {
        let mut c = config();
        assert_eq!(subscription(&c), vec!["orders".to_string()]);
        c.topics.clear();
        c.topic_pattern = Some("orders-.*".into());
        assert_eq!(subscription(&c), vec!["^orders-.*".to_string()]);
        c.topic_pattern = Some("^orders$".into());
        assert_eq!(subscription(&c), vec!["^orders$".to_string()]);
    }
}
