//! What Kinesis and DynamoDB Streams share. DynamoDB Streams serves a shard through the same
//! GetShardIterator/GetRecords pair as Kinesis, with the same hazards (iterators that expire,
//! reads that throttle, closed shards that end), so one reader ([`PolledShard`]) owns pacing,
//! recovery and the end of a shard, and each source supplies only the calls ([`ShardApi`]).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::DateTime;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::record::Record;
use crate::stream::{ReadError, ShardInfo, ShardRead, StartAt, sequence_cmp};

/// The role Lambda names in `invokeIdentityArn`; Sluice has no IAM, so a fixed one.
pub(crate) const INVOKE_IDENTITY_ARN: &str = "arn:aws:iam::000000000000:role/sluice";

/// Loads the SDK configuration: credentials from the default chain, the region given, else
/// the one in the stream's ARN, else the default chain's.
pub(crate) async fn sdk_config(
    endpoint_url: Option<&str>,
    region: Option<&str>,
    stream: &str,
) -> Result<(SdkConfig, String), ReadError> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
        aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(3))
            // GetRecords answers at once, records or not; a call hanging longer than this is lost.
            .operation_attempt_timeout(Duration::from_secs(10))
            .build(),
    );
    if let Some(region) = region.or_else(|| arn_region(stream)) {
        loader = loader.region(Region::new(region.to_string()));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let config = loader.load().await;
    let region = config.region().map(|r| r.to_string()).ok_or_else(|| {
        ReadError::Other(format!(
            "no AWS region for `{stream}`: configure one or set AWS_REGION"
        ))
    })?;
    Ok((config, region))
}

/// The region field of an ARN (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`).
fn arn_region(arn: &str) -> Option<&str> {
    let mut parts = arn.strip_prefix("arn:")?.split(':');
    parts.nth(2).filter(|r| !r.is_empty())
}

/// Milliseconds since the epoch.
pub(crate) fn epoch_millis(t: &DateTime) -> i64 {
    t.secs() * 1000 + i64::from(t.subsec_nanos() / 1_000_000)
}

pub(crate) fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// How one service call failed, as the reader needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CallError {
    NotFound(String),
    Throttled(String),
    /// The iterator can no longer be used: it expired, or the service rejected it (moto answers
    /// a malformed iterator with an HTTP 500 page).
    BadIterator(String),
    /// The position lies before the stream's retention.
    Trimmed(String),
    Other(String),
}

impl From<CallError> for ReadError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::NotFound(m) => ReadError::NotFound(m),
            CallError::Throttled(m) => ReadError::Throttled(m),
            CallError::BadIterator(m) => ReadError::ExpiredIterator(m),
            CallError::Trimmed(m) | CallError::Other(m) => ReadError::Other(m),
        }
    }
}

/// Classifies an SDK error of either service. `iterator_call` is set for GetRecords, where a
/// server error most likely means the iterator was refused, and opening a new one is harmless.
pub(crate) fn classify<E>(
    op: &str,
    err: &SdkError<E, HttpResponse>,
    iterator_call: bool,
) -> CallError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let message = format!("{op}: {}", DisplayErrorContext(err));
    classify_parts(err.code(), status, iterator_call, message)
}

pub(crate) fn classify_parts(
    code: Option<&str>,
    status: Option<u16>,
    iterator_call: bool,
    message: String,
) -> CallError {
    match code {
        Some("ResourceNotFoundException") => CallError::NotFound(message),
        Some("ExpiredIteratorException") => CallError::BadIterator(message),
        Some("TrimmedDataAccessException") => CallError::Trimmed(message),
        Some(
            "ProvisionedThroughputExceededException"
            | "LimitExceededException"
            | "KMSThrottlingException"
            | "ThrottlingException"
            | "RequestLimitExceeded",
        ) => CallError::Throttled(message),
        _ if iterator_call && status.is_some_and(|s| s >= 500) => CallError::BadIterator(message),
        _ => CallError::Other(message),
    }
}

/// One GetRecords answer, its records already in Lambda's shape.
#[derive(Debug, Default)]
pub(crate) struct Page {
    pub records: Vec<Record>,
    pub next_iterator: Option<String>,
    pub millis_behind: Option<i64>,
}

/// The calls a source makes for its shards.
#[async_trait]
pub(crate) trait ShardApi: Send + Sync + 'static {
    async fn iterator(&self, shard: &str, start: &StartAt) -> Result<String, CallError>;
    async fn records(&self, shard: &str, iterator: &str, limit: i32) -> Result<Page, CallError>;
    /// The shard's ending sequence number if it is known to be closed. May answer from a
    /// cache, refreshed when older than the source allows; a failed refresh answers `None`.
    async fn ending_sequence(&self, shard: &str) -> Option<String>;
}

/// The shards a source last listed, so that readers learn a shard closed without each of them
/// listing the stream.
#[derive(Debug, Default)]
pub(crate) struct ShardCache {
    fetched: Option<Instant>,
    ending: HashMap<String, Option<String>>,
}

impl ShardCache {
    pub fn is_stale(&self, max_age: Duration) -> bool {
        self.fetched.is_none_or(|at| at.elapsed() >= max_age)
    }

    pub fn fill(&mut self, shards: &[ShardInfo]) {
        self.fetched = Some(Instant::now());
        self.ending = shards
            .iter()
            .map(|s| (s.id.clone(), s.ending_sequence.clone()))
            .collect();
    }

    pub fn ending(&self, shard: &str) -> Option<String> {
        self.ending.get(shard).cloned().flatten()
    }
}

/// The reading rules of one service.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    /// The least time between two GetRecords calls on a shard (Kinesis allows 5 per second).
    pub min_interval: Duration,
    /// The longest wait between reads of a shard that keeps answering nothing.
    pub idle_max: Duration,
    /// Records per GetRecords call.
    pub limit: i32,
    /// Kinesis through moto never answers a null NextShardIterator, so an empty read that is
    /// not behind the tip of a shard known to be closed ends the shard too. DynamoDB Streams
    /// may answer empty reads in the middle of a shard and reports no lag, so it relies on the
    /// null iterator alone (moto never closes its shards anyway).
    pub empty_read_ends_closed_shard: bool,
    /// Whether GetShardIterator takes AT_TIMESTAMP. Without it the reader starts at the trim
    /// horizon and drops the records created before the timestamp's second.
    pub at_timestamp: bool,
}

/// Spaces GetRecords calls: never closer than `min_interval`, no extra wait while records come
/// back, a growing wait (up to `idle_max`) while reads are empty, a longer one when throttled.
#[derive(Debug)]
pub(crate) struct Pacer {
    min: Duration,
    idle_max: Duration,
    idle: Duration,
    wait: Duration,
    last: Option<Instant>,
}

const THROTTLE_FIRST: Duration = Duration::from_secs(1);
const THROTTLE_MAX: Duration = Duration::from_secs(10);

impl Pacer {
    pub fn new(min: Duration, idle_max: Duration) -> Self {
        Self {
            min,
            idle_max,
            idle: Duration::ZERO,
            wait: min,
            last: None,
        }
    }

    /// Waits until the next call is allowed, then counts it as made. Cancel-safe: a wait that
    /// is dropped counts nothing.
    pub async fn ready(&mut self) {
        if let Some(last) = self.last {
            tokio::time::sleep_until(last + self.wait).await;
        }
        self.last = Some(Instant::now());
    }

    pub fn after_read(&mut self, got_records: bool) {
        if got_records {
            self.idle = Duration::ZERO;
            self.wait = self.min;
        } else {
            self.idle = if self.idle.is_zero() {
                self.min
            } else {
                (self.idle * 2).min(self.idle_max)
            };
            self.wait = self.idle;
        }
    }

    pub fn throttled(&mut self) {
        self.wait = if self.wait < THROTTLE_FIRST {
            THROTTLE_FIRST
        } else {
            (self.wait * 2).min(THROTTLE_MAX)
        };
    }

    /// The wait before the next call, for tests.
    #[cfg(test)]
    pub fn wait(&self) -> Duration {
        self.wait
    }
}

/// A reader of one shard: opens its iterator, paces GetRecords, re-opens after the last record
/// it returned when the iterator fails, and says when a closed shard has been read to its end.
pub(crate) struct PolledShard<A: ShardApi> {
    api: Arc<A>,
    shard: String,
    rules: Rules,
    /// Where a new iterator starts: the requested start, then after the last record seen.
    resume: StartAt,
    /// Records created before this (milliseconds) are dropped: AT_TIMESTAMP emulated.
    skip_before_ms: Option<i64>,
    iterator: Option<String>,
    ending: Option<String>,
    pacer: Pacer,
    finished: bool,
}

impl<A: ShardApi> PolledShard<A> {
    /// Opens the shard's iterator at once, so that a missing shard fails here and LATEST means
    /// the tip as of this call.
    pub async fn open(
        api: Arc<A>,
        shard: &str,
        start: StartAt,
        rules: Rules,
    ) -> Result<Self, ReadError> {
        let skip_before_ms = match start {
            // Creation times may be rounded down to the second: keep that whole second.
            StartAt::AtTimestamp(ms) if !rules.at_timestamp => Some(ms - ms.rem_euclid(1000)),
            _ => None,
        };
        let ending = api.ending_sequence(shard).await;
        let pacer = Pacer::new(rules.min_interval, rules.idle_max);
        let mut reader = Self {
            api,
            shard: shard.to_string(),
            rules,
            resume: start,
            skip_before_ms,
            iterator: None,
            ending,
            pacer,
            finished: false,
        };
        reader.iterator = Some(reader.open_iterator().await?);
        Ok(reader)
    }

    pub fn shard(&self) -> &str {
        &self.shard
    }

    /// Replaces the iterator, so tests can hand the service a bad one.
    pub fn replace_iterator(&mut self, iterator: &str) {
        self.iterator = Some(iterator.to_string());
    }

    async fn open_iterator(&mut self) -> Result<String, ReadError> {
        let start = match &self.resume {
            StartAt::AtTimestamp(_) if !self.rules.at_timestamp => StartAt::TrimHorizon,
            other => other.clone(),
        };
        match self.api.iterator(&self.shard, &start).await {
            Ok(iterator) => Ok(iterator),
            Err(CallError::Trimmed(message)) => {
                // The position aged out of the stream: what it pointed at is gone for everyone,
                // so read on from the oldest record there is, as Lambda does.
                warn!(shard = %self.shard, ?start, %message, "position is past the stream's retention; reading from the trim horizon");
                self.resume = StartAt::TrimHorizon;
                Ok(self
                    .api
                    .iterator(&self.shard, &StartAt::TrimHorizon)
                    .await?)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn next(&mut self) -> Result<ShardRead, ReadError> {
        if self.finished {
            return Ok(ShardRead {
                end_of_shard: true,
                ..ShardRead::default()
            });
        }
        let mut reopened = false;
        loop {
            let iterator = match &self.iterator {
                Some(iterator) => iterator.clone(),
                None => {
                    let iterator = self.open_iterator().await?;
                    self.iterator = Some(iterator.clone());
                    iterator
                }
            };
            self.pacer.ready().await;
            match self
                .api
                .records(&self.shard, &iterator, self.rules.limit)
                .await
            {
                Ok(page) => return Ok(self.accept(page).await),
                Err(CallError::BadIterator(message) | CallError::Trimmed(message)) if !reopened => {
                    debug!(shard = %self.shard, resume = ?self.resume, %message, "iterator refused; opening a new one");
                    self.iterator = None;
                    reopened = true;
                }
                Err(CallError::Throttled(message)) => {
                    self.pacer.throttled();
                    return Err(ReadError::Throttled(message));
                }
                Err(e) => {
                    self.pacer.after_read(false);
                    return Err(e.into());
                }
            }
        }
    }

    async fn accept(&mut self, page: Page) -> ShardRead {
        let Page {
            mut records,
            next_iterator,
            millis_behind,
        } = page;
        let last_seen = records.last().map(|r| r.position.clone());
        // The one wait comes before any change, so that a caller who drops `next` here reads
        // these records again with the same iterator and resume point.
        let end = match &next_iterator {
            None => true,
            Some(_) => {
                self.closed_and_read(last_seen.as_deref(), millis_behind)
                    .await
            }
        };
        self.pacer.after_read(last_seen.is_some());
        if let Some(last) = last_seen {
            self.resume = StartAt::AfterSequence(last);
        }
        if let Some(cut) = self.skip_before_ms {
            match records.iter().position(|r| r.arrival_ms >= cut) {
                Some(first) => {
                    records.drain(..first);
                    self.skip_before_ms = None;
                }
                None => records.clear(),
            }
        }
        self.iterator = next_iterator;
        self.finished = end;
        ShardRead {
            records,
            millis_behind,
            end_of_shard: end,
        }
    }

    async fn closed_and_read(
        &mut self,
        last_seen: Option<&str>,
        millis_behind: Option<i64>,
    ) -> bool {
        if let (Some(ending), Some(last)) = (&self.ending, last_seen)
            && sequence_cmp(last, ending) != Ordering::Less
        {
            return true;
        }
        if last_seen.is_some()
            || !self.rules.empty_read_ends_closed_shard
            || millis_behind.is_some_and(|m| m > 0)
        {
            return false;
        }
        if self.ending.is_none() {
            self.ending = self.api.ending_sequence(&self.shard).await;
        }
        self.ending.is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn classifies_errors_where_they_are_born() {
        let c = |code, status, it| classify_parts(code, status, it, String::new());
        assert_eq!(
            c(Some("ResourceNotFoundException"), Some(400), true),
            CallError::NotFound(String::new())
        );
        assert_eq!(
            c(Some("ExpiredIteratorException"), Some(400), true),
            CallError::BadIterator(String::new())
        );
        assert_eq!(
            c(Some("TrimmedDataAccessException"), Some(400), true),
            CallError::Trimmed(String::new())
        );
        for code in [
            "ProvisionedThroughputExceededException",
            "LimitExceededException",
            "KMSThrottlingException",
        ] {
            assert_eq!(
                c(Some(code), Some(400), true),
                CallError::Throttled(String::new()),
                "{code}"
            );
        }
        // moto's answer to a malformed iterator: an HTML page with status 500 and no error code.
        assert_eq!(
            c(None, Some(500), true),
            CallError::BadIterator(String::new())
        );
        assert_eq!(c(None, Some(500), false), CallError::Other(String::new()));
        assert_eq!(c(None, None, true), CallError::Other(String::new()));
        assert_eq!(
            c(Some("InvalidArgumentException"), Some(400), true),
            CallError::Other(String::new())
        );
        assert!(!ReadError::from(c(Some("ResourceNotFoundException"), None, false)).is_retriable());
        assert!(matches!(
            ReadError::from(c(None, Some(500), true)),
            ReadError::ExpiredIterator(_)
        ));
    }

    #[test]
    fn finds_the_region_in_an_arn() {
        assert_eq!(
            arn_region("arn:aws:kinesis:eu-west-1:123456789012:stream/s"),
            Some("eu-west-1")
        );
        assert_eq!(arn_region("orders"), None);
        assert_eq!(arn_region("arn:aws:kinesis::1:stream/s"), None);
    }

    #[test]
    fn converts_smithy_times_to_millis() {
        assert_eq!(
            epoch_millis(&DateTime::from_millis(1_480_641_523_477)),
            1_480_641_523_477
        );
        assert_eq!(epoch_millis(&DateTime::from_secs(7)), 7000);
    }

    #[test]
    fn pacer_backs_off_while_empty_and_resets_on_records() {
        let ms = Duration::from_millis;
        let mut p = Pacer::new(ms(200), ms(1000));
        let waits: Vec<_> = (0..5)
            .map(|_| {
                p.after_read(false);
                p.wait()
            })
            .collect();
        assert_eq!(waits, [ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        p.after_read(true);
        assert_eq!(p.wait(), ms(200));
        p.throttled();
        assert_eq!(p.wait(), ms(1000));
        p.throttled();
        p.throttled();
        p.throttled();
        p.throttled();
        assert_eq!(p.wait(), ms(10_000));
    }

    /// A scripted service: answers come from a queue; calls are logged with their times.
    #[derive(Default)]
    struct Fake {
        answers: Mutex<VecDeque<Result<Page, CallError>>>,
        opened: Mutex<Vec<StartAt>>,
        calls: Mutex<Vec<(Instant, String)>>,
        ending: Mutex<Option<String>>,
    }

    #[async_trait]
    impl ShardApi for Fake {
        async fn iterator(&self, _shard: &str, start: &StartAt) -> Result<String, CallError> {
            let mut opened = self.opened.lock().expect("lock");
            opened.push(start.clone());
            Ok(format!("it-{}", opened.len()))
        }
        async fn records(
            &self,
            _shard: &str,
            iterator: &str,
            _limit: i32,
        ) -> Result<Page, CallError> {
            self.calls
                .lock()
                .expect("lock")
                .push((Instant::now(), iterator.to_string()));
            self.answers
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or_else(|| Ok(page(&[], Some("tip"), Some(0))))
        }
        async fn ending_sequence(&self, _shard: &str) -> Option<String> {
            self.ending.lock().expect("lock").clone()
        }
    }

    fn record(seq: &str, arrival_ms: i64) -> Record {
        Record {
            id: seq.to_string(),
            position: seq.to_string(),
            key: "k".to_string(),
            arrival_ms,
            size: 1,
            lambda: serde_json::Value::Null,
            filter_view: serde_json::Value::Null,
        }
    }

    fn page(seqs: &[&str], next: Option<&str>, millis_behind: Option<i64>) -> Page {
        Page {
            records: seqs.iter().map(|s| record(s, 0)).collect(),
            next_iterator: next.map(str::to_string),
            millis_behind,
        }
    }

    fn kinesis_rules() -> Rules {
        Rules {
            min_interval: Duration::from_millis(200),
            idle_max: Duration::from_secs(1),
            limit: 100,
            empty_read_ends_closed_shard: true,
            at_timestamp: true,
        }
    }

    fn fake(answers: Vec<Result<Page, CallError>>) -> Arc<Fake> {
        let fake = Fake::default();
        *fake.answers.lock().expect("lock") = answers.into();
        Arc::new(fake)
    }

    fn positions(read: &ShardRead) -> Vec<&str> {
        read.records.iter().map(|r| r.position.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn never_calls_get_records_more_than_five_times_a_second() {
        let api = fake(
            (0..20)
                .map(|i| Ok(page(&[&i.to_string()], Some("n"), Some(1))))
                .collect(),
        );
        let mut reader = PolledShard::open(api.clone(), "s", StartAt::TrimHorizon, kinesis_rules())
            .await
            .expect("open");
        for _ in 0..20 {
            reader.next().await.expect("read");
        }
        let calls = api.calls.lock().expect("lock");
        for pair in calls.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= Duration::from_millis(200));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_wait_when_the_caller_is_slower_than_the_pace() {
        let api = fake(vec![
            Ok(page(&["1"], Some("n"), Some(5))),
            Ok(page(&["2"], Some("n"), Some(0))),
        ]);
        let mut reader = PolledShard::open(api, "s", StartAt::TrimHorizon, kinesis_rules())
            .await
            .expect("open");
        reader.next().await.expect("read");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = Instant::now();
        reader.next().await.expect("read");
        assert_eq!(before.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn reopens_after_the_last_returned_record_when_the_iterator_fails() {
        let api = fake(vec![
            Ok(page(&["1", "2"], Some("n1"), Some(10))),
            Err(CallError::BadIterator("expired".into())),
            Ok(page(&["3"], Some("n2"), Some(0))),
        ]);
        let mut reader = PolledShard::open(api.clone(), "s", StartAt::TrimHorizon, kinesis_rules())
            .await
            .expect("open");
        assert_eq!(positions(&reader.next().await.expect("read")), ["1", "2"]);
        assert_eq!(positions(&reader.next().await.expect("read")), ["3"]);
        assert_eq!(
            *api.opened.lock().expect("lock"),
            [StartAt::TrimHorizon, StartAt::AfterSequence("2".into())]
        );
        let calls: Vec<_> = api
            .calls
            .lock()
            .expect("lock")
            .iter()
            .map(|c| c.1.clone())
            .collect();
        assert_eq!(calls, ["it-1", "n1", "it-2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn reopens_at_the_original_start_when_nothing_was_returned_yet() {
        let api = fake(vec![
            Err(CallError::BadIterator("500".into())),
            Ok(page(&["7"], Some("n"), Some(0))),
        ]);
        let mut reader =
            PolledShard::open(api.clone(), "s", StartAt::AtTimestamp(5), kinesis_rules())
                .await
                .expect("open");
        assert_eq!(positions(&reader.next().await.expect("read")), ["7"]);
        assert_eq!(
            *api.opened.lock().expect("lock"),
            [StartAt::AtTimestamp(5), StartAt::AtTimestamp(5)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_when_a_fresh_iterator_fails_too() {
        let api = fake(vec![
            Err(CallError::BadIterator("a".into())),
            Err(CallError::BadIterator("b".into())),
        ]);
        let mut reader = PolledShard::open(api, "s", StartAt::TrimHorizon, kinesis_rules())
            .await
            .expect("open");
        let err = reader.next().await.expect_err("the read fails");
        assert!(
            matches!(err, ReadError::ExpiredIterator(_)) && err.is_retriable(),
            "{err:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_keeps_the_iterator_and_slows_down() {
        let api = fake(vec![
            Err(CallError::Throttled("slow down".into())),
            Ok(page(&["1"], Some("n"), Some(0))),
        ]);
        let mut reader = PolledShard::open(api.clone(), "s", StartAt::TrimHorizon, kinesis_rules())
            .await
            .expect("open");
        assert!(matches!(reader.next().await, Err(ReadError::Throttled(_))));
        assert_eq!(positions(&reader.next().await.expect("read")), ["1"]);
        let calls = api.calls.lock().expect("lock");
        assert_eq!(calls[0].1, calls[1].1);
        assert!(calls[1].0 - calls[0].0 >= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_null_next_iterator_ends_the_shard() {
        let api = fake(vec![Ok(page(&["1"], None, Some(0)))]);
        let mut reader = PolledShard::open(api.clone(), "s", StartAt::TrimHorizon, kinesis_rules())
            .await
            .expect("open");
        let read = reader.next().await.expect("read");
        assert_eq!((positions(&read), read.end_of_shard), (vec!["1"], true));
        let again = reader.next().await.expect("read");
        assert!(again.end_of_shard && again.records.is_empty());
        assert_eq!(api.calls.lock().expect("lock").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_read_at_the_tip_of_a_closed_shard_ends_it() {
        let api = fake(vec![
            Ok(page(&["1"], Some("n"), Some(0))),
            Ok(page(&[], Some("n"), Some(0))),
            Ok(page(&[], Some("n"), Some(0))),
        ]);
        let mut reader = PolledShard::open(api.clone(), "s", StartAt::TrimHorizon, kinesis_rules())
            .await
            .expect("open");
        assert!(!reader.next().await.expect("read").end_of_shard);
        // Still open: an empty read is only the tip.
        assert!(!reader.next().await.expect("read").end_of_shard);
        // Closed meanwhile (moto's split leaves the parent empty, ending at "0").
        *api.ending.lock().expect("lock") = Some("0".into());
        assert!(reader.next().await.expect("read").end_of_shard);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_read_behind_the_tip_does_not_end_a_closed_shard() {
        let api = fake(vec![
            Ok(page(&[], Some("n"), Some(3000))),
            Ok(page(&["9"], Some("n"), Some(0))),
        ]);
        *api.ending.lock().expect("lock") = Some("9".into());
        let mut reader = PolledShard::open(api, "s", StartAt::TrimHorizon, kinesis_rules())
            .await
            .expect("open");
        assert!(!reader.next().await.expect("read").end_of_shard);
        let read = reader.next().await.expect("read");
        // Its last record reached the ending sequence number: no need for another read.
        assert_eq!((positions(&read), read.end_of_shard), (vec!["9"], true));
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_empty_read_rule_only_a_null_iterator_ends_a_shard() {
        let api = fake(vec![
            Ok(page(&[], Some("n"), None)),
            Ok(page(&[], None, None)),
        ]);
        *api.ending.lock().expect("lock") = Some("5".into());
        let rules = Rules {
            empty_read_ends_closed_shard: false,
            ..kinesis_rules()
        };
        let mut reader = PolledShard::open(api, "s", StartAt::TrimHorizon, rules)
            .await
            .expect("open");
        assert!(!reader.next().await.expect("read").end_of_shard);
        assert!(reader.next().await.expect("read").end_of_shard);
    }

    #[tokio::test(start_paused = true)]
    async fn emulates_at_timestamp_from_the_trim_horizon() {
        let mut early = page(&["1", "2", "3"], Some("n"), None);
        for (r, t) in early.records.iter_mut().zip([1_000, 4_000, 5_000]) {
            r.arrival_ms = t;
        }
        let api = fake(vec![Ok(early)]);
        let rules = Rules {
            at_timestamp: false,
            ..kinesis_rules()
        };
        let mut reader = PolledShard::open(api.clone(), "s", StartAt::AtTimestamp(5_500), rules)
            .await
            .expect("open");
        assert_eq!(positions(&reader.next().await.expect("read")), ["3"]);
        assert_eq!(*api.opened.lock().expect("lock"), [StartAt::TrimHorizon]);
    }
}
