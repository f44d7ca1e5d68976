//! The mapping pipeline every poll-based source uses: filter → batch → ordered lanes →
//! synchronous invoke → outcome → retry, bisect or dead letter. It is the one place where
//! Lambda's event source mapping rules live; connectors only read and acknowledge.

pub mod items;
pub mod kafka;
pub mod queue;
pub mod stream;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use sluice_config::MappingConfig;
use sluice_config::SourceKind;
use sluice_config::filter::FilterPattern;
use sluice_connectors::backoff::Backoff;
use sluice_connectors::dynamodb_streams::DynamoDbStreamsSource;
use sluice_connectors::kinesis::KinesisSource;
use sluice_connectors::queue::QueueSource;
use sluice_connectors::rabbitmq::RabbitMqSource;
use sluice_connectors::record::Record;
use sluice_connectors::sqs::SqsSource;
use sluice_connectors::stream::{ReadError, StreamSource};
use sluice_plugins::DeadLetterSink;
use tokio_util::sync::CancellationToken;

use crate::state::StateStore;

use crate::function::{Function, Functions};
use crate::invocation::{FunctionError, Invocation, MAX_SYNC_PAYLOAD};
use crate::metrics as m;

/// Connects a mapping's source (retrying until it answers or the mapping stops) and runs it.
pub async fn run_source(mapping: Arc<Mapping>, kind: SourceKind, store: Arc<dyn StateStore>) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let connected: Result<Connected, ReadError> = match &kind {
            SourceKind::Kinesis(k) => KinesisSource::connect(
                &k.stream,
                k.aws.endpoint_url.as_deref(),
                k.aws.region.as_deref(),
            )
            .await
            .map(|s| Connected::Stream(Arc::new(s))),
            SourceKind::DynamoDbStreams(d) => {
                let target = d
                    .stream_arn
                    .as_deref()
                    .or(d.table.as_deref())
                    .unwrap_or_default();
                DynamoDbStreamsSource::connect(
                    target,
                    d.aws.endpoint_url.as_deref(),
                    d.aws.region.as_deref(),
                )
                .await
                .map(|s| Connected::Stream(Arc::new(s)))
            }
            SourceKind::RabbitMq(r) => RabbitMqSource::from_config(r)
                .await
                // One consumer: its prefetch bounds what is in flight, and order is kept.
                .map(|s| Connected::Queue(Arc::new(s), 1)),
            SourceKind::Sqs(q) => SqsSource::connect(
                &q.queue_url,
                q.aws.endpoint_url.as_deref(),
                q.aws.region.as_deref(),
            )
            .await
            .map(|s| {
                Connected::Queue(
                    Arc::new(s),
                    q.maximum_concurrency.unwrap_or(DEFAULT_SQS_POLLERS) as usize,
                )
            }),
            SourceKind::Kafka(k) => return kafka::run(mapping, k.clone()).await,
            _ => return,
        };
        match connected {
            Ok(Connected::Stream(source)) => return stream::run(mapping, source, store).await,
            Ok(Connected::Queue(source, pollers)) => {
                return queue::run(mapping, source, pollers).await;
            }
            Err(e) => {
                metrics::counter!(m::MAPPING_READ_ERRORS, "source" => mapping.name.clone())
                    .increment(1);
                tracing::error!(source = %mapping.name, error = %e, "cannot connect to the source; retrying");
            }
        }
        if backoff.wait(&mapping.stop).await {
            return;
        }
    }
}

enum Connected {
    Stream(Arc<dyn StreamSource>),
    Queue(Arc<dyn QueueSource>, usize),
}

/// Lambda starts an SQS mapping with five pollers.
const DEFAULT_SQS_POLLERS: u32 = 5;

/// Why a batch was given up, as Lambda names it in on-failure records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    RetryAttemptsExhausted,
    RecordAgeExceeded,
}

impl GiveUp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RetryAttemptsExhausted => "RetryAttemptsExhausted",
            Self::RecordAgeExceeded => "RecordAgeExceeded",
        }
    }
}

/// What a partial batch response (`batchItemFailures`) retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartialRetry {
    /// Ordered sources: the lowest failed item and everything after it.
    FromLowestFailed,
    /// Queues: the failed items only.
    OnlyFailed,
}

/// The result of one invocation of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchResult {
    Succeeded,
    /// The function reported these item identifiers as failed (`batchItemFailures`).
    Partial(Vec<String>),
    Failed(FunctionError),
}

/// One try of a batch, for the on-failure record.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub time: String,
    pub error: Option<FunctionError>,
    pub duration_ms: f64,
    pub records: usize,
}

/// What is known of the source a batch came from, for events and on-failure records.
#[derive(Debug, Clone)]
pub struct BatchSource {
    /// `KinesisBatchInfo`, `DDBStreamBatchInfo`, `SQSBatchInfo`, …
    pub info_key: &'static str,
    pub source_arn: String,
    pub partition: String,
}

pub type Envelope = Arc<dyn Fn(&[&Record]) -> Value + Send + Sync>;

/// One mapping: a source's records to a function, with its rules.
pub struct Mapping {
    pub name: String,
    pub function: String,
    pub config: MappingConfig,
    filters: Vec<FilterPattern>,
    functions: Arc<Functions>,
    on_failure: Option<Arc<dyn DeadLetterSink>>,
    on_failure_name: Option<String>,
    pub(crate) stop: CancellationToken,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// How often a dead-letter write that failed for good is tried again: often enough to go on
/// soon after an operator fixes the destination, rarely enough not to flood it or the logs.
const PERMANENT_FAILURE_RETRY: Duration = Duration::from_secs(60);

/// Backoff before the next try of a failed batch: short at first, growing to 10 s.
fn retry_backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << attempt.min(8))).min(Duration::from_secs(10))
}

/// How long a throttled batch waits before it is offered again (throttles spend no attempt).
const THROTTLE_BACKOFF: Duration = Duration::from_millis(200);

impl Mapping {
    pub fn new(
        name: &str,
        function: &str,
        config: MappingConfig,
        functions: Arc<Functions>,
        on_failure: Option<(String, Arc<dyn DeadLetterSink>)>,
        stop: CancellationToken,
    ) -> Result<Self, String> {
        let filters = config
            .filters
            .iter()
            .map(FilterPattern::parse)
            .collect::<Result<Vec<_>, _>>()?;
        let (on_failure_name, on_failure) = match on_failure {
            Some((n, s)) => (Some(n), Some(s)),
            None => (None, None),
        };
        Ok(Self {
            name: name.to_string(),
            function: function.to_string(),
            config,
            filters,
            functions,
            on_failure,
            on_failure_name,
            stop,
        })
    }

    fn labels(&self) -> [(&'static str, String); 2] {
        [
            ("source", self.name.clone()),
            ("function", self.function.clone()),
        ]
    }

    pub(crate) fn count(&self, outcome: &'static str, n: usize) {
        let [s, f] = self.labels();
        metrics::counter!(
            m::MAPPING_RECORDS,
            &[s, f, ("outcome", outcome.to_string())]
        )
        .increment(n as u64);
    }

    /// Splits records into those that pass the filters and those filtered out (which are
    /// done: Lambda drops them and moves on).
    pub fn filter(&self, records: Vec<Record>) -> Vec<Record> {
        if self.filters.is_empty() {
            return records;
        }
        let before = records.len();
        let kept: Vec<Record> = records
            .into_iter()
            .filter(|r| sluice_config::filter::matches_any(&self.filters, &r.filter_view))
            .collect();
        self.count("filtered", before - kept.len());
        kept
    }

    /// Cuts records (already in order) into invocation batches within `batch.size` and
    /// `batch.max_bytes`.
    pub fn batches<'a>(&self, records: &'a [Record]) -> Vec<&'a [Record]> {
        let size = self.config.batch.size.max(1) as usize;
        let max_bytes = self.config.batch.max_bytes.max(1) as usize;
        let mut out = Vec::new();
        let mut start = 0;
        let mut bytes = 0;
        for (i, r) in records.iter().enumerate() {
            if i > start && (i - start >= size || bytes + r.size > max_bytes) {
                out.push(&records[start..i]);
                start = i;
                bytes = 0;
            }
            bytes += r.size;
        }
        if start < records.len() {
            out.push(&records[start..]);
        }
        out
    }

    fn resolve(&self) -> Option<(Arc<Function>, Arc<crate::function::Instance>, String)> {
        let (name, qualifier) = match self.function.split_once(':') {
            Some((n, q)) => (n, Some(q)),
            None => (self.function.as_str(), None),
        };
        let f = self.functions.get(name)?.clone();
        let instance = f.resolve(qualifier)?;
        let arn = match qualifier {
            Some(q) => format!("{}:{q}", f.arn),
            None => f.arn.clone(),
        };
        Some((f, instance, arn))
    }

    /// Invokes the function once with `records`, waiting out throttles (which spend no
    /// attempt). Returns `None` only when stopping.
    pub async fn invoke(
        &self,
        records: &[&Record],
        envelope: &Envelope,
    ) -> Option<(BatchResult, Attempt)> {
        let payload = Bytes::from(serde_json::to_vec(&envelope(records)).unwrap_or_default());
        loop {
            let started = now_ms();
            let Some((f, instance, arn)) = self.resolve() else {
                let error = FunctionError::new(
                    "ResourceNotFoundException",
                    format!("Function not found: {}", self.function),
                );
                return Some((
                    BatchResult::Failed(error.clone()),
                    Attempt {
                        time: rfc3339(started),
                        error: Some(error),
                        duration_ms: 0.0,
                        records: records.len(),
                    },
                ));
            };
            if payload.len() > MAX_SYNC_PAYLOAD {
                let error = FunctionError::new(
                    "RequestTooLargeException",
                    format!(
                        "the batch's event is {} bytes, over Lambda's {MAX_SYNC_PAYLOAD}",
                        payload.len()
                    ),
                );
                return Some((
                    BatchResult::Failed(error.clone()),
                    Attempt {
                        time: rfc3339(started),
                        error: Some(error),
                        duration_ms: 0.0,
                        records: records.len(),
                    },
                ));
            }
            match f
                .invoke(&instance, Invocation::new(payload.clone(), arn))
                .await
            {
                Err(_throttle) => {
                    let [s, fl] = self.labels();
                    metrics::counter!(m::MAPPING_THROTTLES, &[s, fl]).increment(1);
                    tokio::select! {
                        _ = self.stop.cancelled() => return None,
                        _ = tokio::time::sleep(THROTTLE_BACKOFF) => continue,
                    }
                }
                Ok(outcome) => {
                    let result = match outcome.result {
                        Err(e) => BatchResult::Failed(e),
                        Ok(body) if self.config.report_batch_item_failures => {
                            let ids: HashSet<&str> =
                                records.iter().map(|r| r.id.as_str()).collect();
                            match items::parse(&body, &ids) {
                                Ok(failed) if failed.is_empty() => BatchResult::Succeeded,
                                Ok(failed) => BatchResult::Partial(failed),
                                Err(message) => BatchResult::Failed(FunctionError::new(
                                    "InvalidBatchItemFailures",
                                    message,
                                )),
                            }
                        }
                        Ok(_) => BatchResult::Succeeded,
                    };
                    let error = match &result {
                        BatchResult::Failed(e) => Some(e.clone()),
                        BatchResult::Partial(ids) => Some(FunctionError::new(
                            "BatchItemFailures",
                            format!(
                                "the function reported {} of {} records as failed",
                                ids.len(),
                                records.len()
                            ),
                        )),
                        BatchResult::Succeeded => None,
                    };
                    let attempt = Attempt {
                        time: rfc3339(started),
                        error,
                        duration_ms: outcome.duration.as_secs_f64() * 1000.0,
                        records: records.len(),
                    };
                    return Some((result, attempt));
                }
            }
        }
    }

    /// Runs one batch until every record's outcome is final: delivered, or given up (to the
    /// on-failure destination; when there is none, returned so the caller can hand them to
    /// the source's own dead-lettering, or drop them). Retries in place, in order; bisects a
    /// failing batch when asked; resumes from the lowest failed item on a partial failure.
    /// Returns `None` only when stopping with records whose outcome is not final (they must
    /// not be acknowledged or checkpointed).
    pub async fn run_to_completion<'a>(
        &self,
        records: &'a [Record],
        source: &BatchSource,
        envelope: &Envelope,
        partial: PartialRetry,
    ) -> Option<Vec<&'a Record>> {
        let mut unrouted: Vec<&'a Record> = Vec::new();
        // Work items: a slice of the batch and the attempts it has used.
        let mut queue: std::collections::VecDeque<(Vec<&Record>, Vec<Attempt>)> =
            std::collections::VecDeque::from([(records.iter().collect(), Vec::new())]);
        while let Some((mut batch, mut attempts)) = queue.pop_front() {
            loop {
                if batch.is_empty() {
                    break;
                }
                if let Some(max_age) = self.config.retry.max_record_age {
                    let cutoff = now_ms() - max_age.as_millis() as i64;
                    let (old, fresh): (Vec<&Record>, Vec<&Record>) =
                        batch.iter().partition(|r| r.arrival_ms < cutoff);
                    if !old.is_empty() {
                        match self
                            .give_up(&old, &attempts, GiveUp::RecordAgeExceeded, source)
                            .await
                        {
                            None => return None,
                            Some(false) => unrouted.extend(old),
                            Some(true) => {}
                        }
                        batch = fresh;
                        continue;
                    }
                }
                let (result, attempt) = self.invoke(&batch, envelope).await?;
                let [s, f] = self.labels();
                metrics::counter!(m::MAPPING_BATCHES, &[s, f]).increment(1);
                match result {
                    BatchResult::Succeeded => {
                        self.count("delivered", batch.len());
                        break;
                    }
                    BatchResult::Partial(failed) => {
                        let failed: HashSet<String> = failed.into_iter().collect();
                        let before = batch.len();
                        match partial {
                            // Lambda resumes a shard from the lowest failed item: everything
                            // before it is done, everything from it on runs again, in order.
                            PartialRetry::FromLowestFailed => {
                                let first = batch
                                    .iter()
                                    .position(|r| failed.contains(&r.id))
                                    .unwrap_or(0);
                                batch.drain(..first);
                            }
                            // A queue retries exactly what failed.
                            PartialRetry::OnlyFailed => batch.retain(|r| failed.contains(&r.id)),
                        }
                        self.count("delivered", before - batch.len());
                        attempts.push(attempt);
                    }
                    BatchResult::Failed(_) => {
                        attempts.push(attempt);
                        if self.config.bisect_on_error && batch.len() > 1 {
                            // Splitting spends no attempt: the halves start afresh, in order.
                            let second = batch.split_off(batch.len() / 2);
                            let [s, f] = self.labels();
                            metrics::counter!(m::MAPPING_BISECTS, &[s, f]).increment(1);
                            queue.push_front((second, Vec::new()));
                            queue.push_front((batch, Vec::new()));
                            break;
                        }
                    }
                }
                let retries_used = attempts.len().saturating_sub(1) as u32;
                if self
                    .config
                    .retry
                    .max_attempts
                    .is_some_and(|max| retries_used >= max)
                {
                    match self
                        .give_up(&batch, &attempts, GiveUp::RetryAttemptsExhausted, source)
                        .await
                    {
                        None => return None,
                        Some(false) => unrouted.extend(batch),
                        Some(true) => {}
                    }
                    break;
                }
                let [s, f] = self.labels();
                metrics::counter!(m::MAPPING_RETRIES, &[s, f]).increment(1);
                tokio::select! {
                    _ = self.stop.cancelled() => return None,
                    _ = tokio::time::sleep(retry_backoff(attempts.len() as u32)) => {}
                }
            }
        }
        Some(unrouted)
    }

    /// Lambda's on-failure record for a batch, with the full records under `sluice`.
    pub fn failure_record(
        &self,
        records: &[&Record],
        attempts: &[Attempt],
        condition: GiveUp,
        source: &BatchSource,
    ) -> Value {
        let first = records.first();
        let last = records.last();
        let last_error = attempts.iter().rev().find_map(|a| a.error.clone());
        let function_arn = self
            .resolve()
            .map(|(_, _, arn)| arn)
            .unwrap_or_else(|| crate::invocation::function_arn(&self.function));
        let mut record = json!({
            "requestContext": {
                "requestId": uuid::Uuid::new_v4().to_string(),
                "functionArn": function_arn,
                "condition": condition.as_str(),
                "approximateInvokeCount": attempts.len(),
            },
            "responseContext": {
                "statusCode": 200,
                "executedVersion": self.resolve().map(|(_, i, _)| i.version.clone()).unwrap_or_default(),
                "functionError": if last_error.is_some() { "Unhandled" } else { "" },
            },
            "version": "1.0",
            "timestamp": rfc3339(now_ms()),
            "sluice": {
                "source": self.name,
                "function": self.function,
                "reason": condition.as_str(),
                "error": last_error,
                "attempts": attempts.iter().map(|a| json!({
                    "time": a.time,
                    "records": a.records,
                    "errorType": a.error.as_ref().map(|e| e.error_type.clone()),
                    "errorMessage": a.error.as_ref().map(|e| e.error_message.clone()),
                    "durationMs": a.duration_ms,
                })).collect::<Vec<_>>(),
                "records": records.iter().map(|r| &r.lambda).collect::<Vec<_>>(),
            },
        });
        record[source.info_key] = json!({
            "shardId": source.partition,
            "startSequenceNumber": first.map(|r| r.position.clone()),
            "endSequenceNumber": last.map(|r| r.position.clone()),
            "approximateArrivalOfFirstRecord": first.map(|r| rfc3339(r.arrival_ms)),
            "approximateArrivalOfLastRecord": last.map(|r| rfc3339(r.arrival_ms)),
            "batchSize": records.len(),
            "streamArn": source.source_arn,
        });
        record
    }

    /// Sends records whose retries are over to the on-failure destination, retrying the write
    /// until it is durable (the records stay unacknowledged meanwhile). `Some(true)` when
    /// written, `Some(false)` when the mapping has no destination (the caller decides: the
    /// source's own dead-lettering, or drop), `None` when stopping before the write succeeded.
    pub async fn give_up(
        &self,
        records: &[&Record],
        attempts: &[Attempt],
        condition: GiveUp,
        source: &BatchSource,
    ) -> Option<bool> {
        let Some(sink) = &self.on_failure else {
            self.count("given_up", records.len());
            tracing::warn!(source = %self.name, records = records.len(), condition = condition.as_str(),
                "records given up: the mapping has no on_failure destination");
            return Some(false);
        };
        let record = self.failure_record(records, attempts, condition, source);
        let destination = self.on_failure_name.clone().unwrap_or_default();
        let failed = metrics::gauge!(m::MAPPING_FAILED, "source" => self.name.clone());
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut stuck = false;
        loop {
            let error = match sink.write(&record).await {
                Ok(()) => {
                    self.count("dead_lettered", records.len());
                    metrics::counter!(m::DEAD_LETTERS_WRITTEN, "source" => self.name.clone(), "destination" => destination.clone()).increment(1);
                    if stuck {
                        failed.set(0.0);
                        tracing::info!(source = %self.name, destination = %sink.describe(),
                            "the on-failure destination takes records again; the mapping goes on");
                    }
                    return Some(true);
                }
                Err(error) => error,
            };
            metrics::counter!(m::DEAD_LETTER_ERRORS, "source" => self.name.clone(), "destination" => destination.clone()).increment(1);
            if error.is_retriable() {
                tracing::error!(source = %self.name, destination = %sink.describe(), %error,
                    "cannot write to the on-failure destination; retrying, the records stay unacknowledged");
                if backoff.wait(&self.stop).await {
                    return None;
                }
                continue;
            }
            // No retry soon can cure this (a missing queue, a record over the destination's
            // size limit): the mapping is marked failed, loudly once, and the write is tried
            // again rarely, in case an operator fixes the destination. The records stay
            // unacknowledged: losing them would break the delivery contract.
            if !stuck {
                stuck = true;
                failed.set(1.0);
                tracing::error!(source = %self.name, destination = %sink.describe(), %error,
                    retry_every = ?PERMANENT_FAILURE_RETRY,
                    "the on-failure destination refuses the records and retrying cannot help: the mapping is failed until the destination is fixed; the records stay unacknowledged");
            }
            tokio::select! {
                _ = self.stop.cancelled() => return None,
                _ = tokio::time::sleep(PERMANENT_FAILURE_RETRY) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use sluice_config::RetryConfig;
    use sluice_plugins::DeadLetterError;

    use super::*;
    use crate::NativeRegistry;

    const MAX_AGE: Duration = Duration::from_secs(60);

    /// An on-failure destination that keeps what it is given.
    #[derive(Default)]
    struct Kept(Mutex<Vec<Value>>);

    #[async_trait::async_trait]
    impl DeadLetterSink for Kept {
        async fn write(&self, record: &Value) -> Result<(), DeadLetterError> {
            self.0.lock().expect("kept").push(record.clone());
            Ok(())
        }
        fn describe(&self) -> String {
            "kept".into()
        }
    }

    impl Kept {
        fn records(&self) -> Vec<Value> {
            self.0.lock().expect("kept").clone()
        }
    }

    /// A shard record that reached the source `age_ms` ago.
    fn record(seq: &str, age_ms: i64) -> Record {
        Record {
            id: seq.into(),
            position: seq.into(),
            key: "k".into(),
            arrival_ms: now_ms() - age_ms,
            size: 1,
            lambda: json!({ "seq": seq }),
            filter_view: json!({ "seq": seq }),
        }
    }

    /// A mapping with `max_record_age` and no attempt limit into a native function `f` that
    /// notes the sequence numbers of every batch and fails when `fail` says so.
    fn mapping(
        fail: bool,
        seen: Arc<Mutex<Vec<Vec<String>>>>,
        dir: &std::path::Path,
        dead: Arc<dyn DeadLetterSink>,
    ) -> Mapping {
        let mut native = NativeRegistry::new();
        native.register("f", move |event: Value, _ctx| {
            let batch = event["Records"]
                .as_array()
                .map(|rs| {
                    rs.iter()
                        .map(|r| r["seq"].as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default();
            seen.lock().expect("seen").push(batch);
            async move {
                if fail {
                    Err(FunctionError::new("Boom", "fails on purpose"))
                } else {
                    Ok(Value::Null)
                }
            }
        });
        let config = sluice_config::parse_str(
            "functions:\n  f: {runtime: native}\n",
            "test.yaml",
            dir,
            &|_| None,
        )
        .expect("the test configuration loads");
        let functions =
            Arc::new(Functions::build(&config, &native, dir).expect("the functions build"));
        let config = MappingConfig {
            retry: RetryConfig {
                max_attempts: None,
                max_record_age: Some(MAX_AGE),
            },
            ..MappingConfig::default()
        };
        let on_failure = dead;
        Mapping::new(
            "m",
            "f",
            config,
            functions,
            Some(("dlq".into(), on_failure)),
            CancellationToken::new(),
        )
        .expect("mapping")
    }

    fn envelope() -> Envelope {
        Arc::new(
            |records: &[&Record]| json!({ "Records": records.iter().map(|r| &r.lambda).collect::<Vec<_>>() }),
        )
    }

    fn source() -> BatchSource {
        BatchSource {
            info_key: "KinesisBatchInfo",
            source_arn: "arn:aws:kinesis:us-east-1:000000000000:stream/s".into(),
            partition: "shardId-000000000000".into(),
        }
    }

    /// A destination that refuses its first `refusals` writes with an error no retry cures.
    struct Refusing {
        refusals: usize,
        writes: Mutex<usize>,
    }

    #[async_trait::async_trait]
    impl DeadLetterSink for Refusing {
        async fn write(&self, _record: &Value) -> Result<(), DeadLetterError> {
            let mut writes = self.writes.lock().expect("writes");
            *writes += 1;
            if *writes <= self.refusals {
                let error = serde_json::from_str::<Value>("{").expect_err("not JSON");
                return Err(DeadLetterError::Encode(error));
            }
            Ok(())
        }
        fn describe(&self) -> String {
            "refusing".into()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_that_refuses_for_good_is_tried_rarely_not_in_a_busy_loop() {
        let dir = tempfile::tempdir().expect("dir");
        let dead = Arc::new(Refusing {
            refusals: 2,
            writes: Mutex::new(0),
        });
        let mapping = mapping(false, Arc::default(), dir.path(), dead.clone());
        let record = record("1", 0);
        let started = tokio::time::Instant::now();
        let written = mapping
            .give_up(&[&record], &[], GiveUp::RetryAttemptsExhausted, &source())
            .await;
        assert_eq!(written, Some(true), "written once the destination took it");
        assert_eq!(*dead.writes.lock().expect("writes"), 3);
        // Two refusals, each followed by the long wait rather than the short backoff.
        assert!(
            started.elapsed() >= PERMANENT_FAILURE_RETRY * 2,
            "tried again after {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn records_older_than_max_record_age_go_to_on_failure_without_an_invoke() {
        let dir = tempfile::tempdir().expect("dir");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let dead = Arc::new(Kept::default());
        let mapping = mapping(false, seen.clone(), dir.path(), dead.clone());
        let records = [record("1", 61_000), record("2", 1_000), record("3", 0)];
        let unrouted = mapping
            .run_to_completion(
                &records,
                &source(),
                &envelope(),
                PartialRetry::FromLowestFailed,
            )
            .await
            .expect("not stopped");
        assert!(
            unrouted.is_empty(),
            "written to the destination, not handed back"
        );

        assert_eq!(
            *seen.lock().expect("seen"),
            [vec!["2".to_string(), "3".to_string()]]
        );
        let dead = dead.records();
        assert_eq!(dead.len(), 1, "{dead:?}");
        let failure = &dead[0];
        assert_eq!(failure["requestContext"]["condition"], "RecordAgeExceeded");
        assert_eq!(failure["requestContext"]["approximateInvokeCount"], 0);
        let info = &failure["KinesisBatchInfo"];
        assert_eq!(
            (
                info["startSequenceNumber"].as_str(),
                info["endSequenceNumber"].as_str()
            ),
            (Some("1"), Some("1"))
        );
        assert_eq!(info["batchSize"], 1);
        assert_eq!(failure["sluice"]["records"], json!([{ "seq": "1" }]));
    }

    #[tokio::test]
    async fn a_failing_record_is_retried_until_it_is_older_than_max_record_age() {
        let dir = tempfile::tempdir().expect("dir");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let dead = Arc::new(Kept::default());
        let mapping = mapping(true, seen.clone(), dir.path(), dead.clone());
        // 400 ms short of the limit: a few retries fit before it expires.
        let records = [record("7", MAX_AGE.as_millis() as i64 - 400)];
        let started = std::time::Instant::now();
        let unrouted = tokio::time::timeout(
            Duration::from_secs(10),
            mapping.run_to_completion(
                &records,
                &source(),
                &envelope(),
                PartialRetry::FromLowestFailed,
            ),
        )
        .await
        .expect("the record expired instead of being retried for ever")
        .expect("not stopped");
        assert!(unrouted.is_empty());
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "given up after {:?}, before it expired",
            started.elapsed()
        );

        let tries = seen.lock().expect("seen").len();
        assert!(tries >= 2, "tried {tries} times before it expired");
        let dead = dead.records();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0]["requestContext"]["condition"], "RecordAgeExceeded");
        assert_eq!(dead[0]["requestContext"]["approximateInvokeCount"], tries);
        assert_eq!(
            dead[0]["sluice"]["attempts"].as_array().map(Vec::len),
            Some(tries)
        );
        assert_eq!(dead[0]["sluice"]["error"]["errorType"], "Boom");
        assert_eq!(dead[0]["KinesisBatchInfo"]["startSequenceNumber"], "7");
    }
}
