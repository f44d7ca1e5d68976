//! `type: kinesis`: a Kinesis data stream read shard by shard with the AWS SDK, its records
//! handed on in the `aws:kinesis` shape Lambda delivers.

pub(crate) mod polling;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{EncryptionType, Shard, ShardIteratorType};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tracing::debug;

use self::polling::{
    CallError, INVOKE_IDENTITY_ARN, Page, PolledShard, Rules, ShardApi, ShardCache, classify,
    epoch_millis, now_millis, sdk_config,
};
use crate::record::Record;
use crate::stream::{
    ReadError, ShardInfo, ShardRead, ShardReader, StartAt, StreamSource, json_or_null,
};

/// GetRecords' largest `Limit`.
pub const MAX_READ_LIMIT: i32 = 10_000;

/// How old the shard listing may be when a reader at the tip of a shard asks whether its shard
/// closed (one ListShards per stream, not per shard).
const LISTING_MAX_AGE: Duration = Duration::from_secs(2);

/// A Kinesis data stream.
pub struct KinesisSource {
    api: Arc<KinesisApi>,
    rules: Rules,
}

struct KinesisApi {
    client: Client,
    stream_arn: String,
    region: String,
    listing: Mutex<ShardCache>,
}

impl KinesisSource {
    /// Finds the stream (`stream` is its name or ARN) with credentials from the default chain.
    /// `endpoint_url` points the client elsewhere than AWS (moto, LocalStack); `region` defaults
    /// to the ARN's, then to the default chain's.
    pub async fn connect(
        stream: &str,
        endpoint_url: Option<&str>,
        region: Option<&str>,
    ) -> Result<Self, ReadError> {
        let (config, region) = sdk_config(endpoint_url, region, stream).await?;
        let client = Client::new(&config);
        let request = client.describe_stream_summary();
        let request = if stream.starts_with("arn:") {
            request.stream_arn(stream)
        } else {
            request.stream_name(stream)
        };
        let summary = request
            .send()
            .await
            .map_err(|e| ReadError::from(classify("DescribeStreamSummary", &e, false)))?;
        let stream_arn = summary
            .stream_description_summary()
            .map(|s| s.stream_arn().to_string())
            .ok_or_else(|| {
                ReadError::Other(format!(
                    "DescribeStreamSummary of `{stream}` answered no stream"
                ))
            })?;
        Ok(Self {
            api: Arc::new(KinesisApi {
                client,
                stream_arn,
                region,
                listing: Mutex::new(ShardCache::default()),
            }),
            rules: Rules {
                min_interval: Duration::from_millis(200),
                idle_max: Duration::from_secs(1),
                limit: MAX_READ_LIMIT,
                empty_read_ends_closed_shard: true,
                at_timestamp: true,
            },
        })
    }

    /// Records per GetRecords call, clamped to 1..=10000 (10000 by default).
    pub fn with_read_limit(mut self, limit: i32) -> Self {
        self.rules.limit = limit.clamp(1, MAX_READ_LIMIT);
        self
    }

    pub fn region(&self) -> &str {
        &self.api.region
    }

    /// [`StreamSource::open`] with the concrete reader.
    pub async fn open_shard(
        &self,
        shard: &str,
        start: StartAt,
    ) -> Result<KinesisShardReader, ReadError> {
        let inner = PolledShard::open(self.api.clone(), shard, start, self.rules.clone()).await?;
        Ok(KinesisShardReader { inner })
    }
}

#[async_trait]
impl StreamSource for KinesisSource {
    fn stream_arn(&self) -> &str {
        &self.api.stream_arn
    }

    async fn shards(&self) -> Result<Vec<ShardInfo>, ReadError> {
        let mut listing = self.api.listing.lock().await;
        let shards = self.api.list_shards().await?;
        listing.fill(&shards);
        Ok(shards)
    }

    async fn open(&self, shard: &str, start: StartAt) -> Result<Box<dyn ShardReader>, ReadError> {
        Ok(Box::new(self.open_shard(shard, start).await?))
    }

    fn batch_info_key(&self) -> &'static str {
        "KinesisBatchInfo"
    }
}

/// Reads one shard of a Kinesis stream (see [`ShardReader`]).
pub struct KinesisShardReader {
    inner: PolledShard<KinesisApi>,
}

impl KinesisShardReader {
    pub fn shard(&self) -> &str {
        self.inner.shard()
    }

    /// Makes the next read use `iterator`, so tests can provoke a bad or expired iterator.
    #[doc(hidden)]
    pub fn replace_iterator(&mut self, iterator: &str) {
        self.inner.replace_iterator(iterator);
    }
}

#[async_trait]
impl ShardReader for KinesisShardReader {
    async fn next(&mut self) -> Result<ShardRead, ReadError> {
        self.inner.next().await
    }
}

impl KinesisApi {
    async fn list_shards(&self) -> Result<Vec<ShardInfo>, ReadError> {
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let request = self.client.list_shards();
            // A page token names the stream; the API refuses both.
            let request = match &token {
                Some(token) => request.next_token(token),
                None => request.stream_arn(&self.stream_arn),
            };
            let page = request
                .send()
                .await
                .map_err(|e| ReadError::from(classify("ListShards", &e, false)))?;
            shards.extend(page.shards().iter().map(shard_info));
            match page.next_token() {
                Some(next) if !page.shards().is_empty() => token = Some(next.to_string()),
                _ => return Ok(shards),
            }
        }
    }
}

fn shard_info(shard: &Shard) -> ShardInfo {
    ShardInfo {
        id: shard.shard_id().to_string(),
        parent: shard.parent_shard_id().map(str::to_string),
        adjacent_parent: shard.adjacent_parent_shard_id().map(str::to_string),
        ending_sequence: shard
            .sequence_number_range()
            .and_then(|r| r.ending_sequence_number())
            .map(str::to_string),
    }
}

#[async_trait]
impl ShardApi for KinesisApi {
    async fn iterator(&self, shard: &str, start: &StartAt) -> Result<String, CallError> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_arn(&self.stream_arn)
            .shard_id(shard);
        let request = match start {
            StartAt::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
            StartAt::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            StartAt::AtTimestamp(ms) => request
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from_millis(*ms)),
            StartAt::AfterSequence(seq) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
        };
        let answer = request
            .send()
            .await
            .map_err(|e| classify("GetShardIterator", &e, false))?;
        answer.shard_iterator().map(str::to_string).ok_or_else(|| {
            CallError::Other(format!("GetShardIterator for {shard} answered no iterator"))
        })
    }

    async fn records(&self, shard: &str, iterator: &str, limit: i32) -> Result<Page, CallError> {
        let answer = self
            .client
            .get_records()
            .stream_arn(&self.stream_arn)
            .shard_iterator(iterator)
            .limit(limit)
            .send()
            .await
            .map_err(|e| classify("GetRecords", &e, true))?;
        Ok(Page {
            records: answer
                .records()
                .iter()
                .map(|r| lambda_record(r, shard, &self.region, &self.stream_arn))
                .collect(),
            next_iterator: answer.next_shard_iterator().map(str::to_string),
            millis_behind: answer.millis_behind_latest(),
        })
    }

    async fn ending_sequence(&self, shard: &str) -> Option<String> {
        let mut listing = self.listing.lock().await;
        if listing.is_stale(LISTING_MAX_AGE) {
            match self.list_shards().await {
                Ok(shards) => listing.fill(&shards),
                Err(e) => debug!(stream = %self.stream_arn, error = %e, "could not list shards"),
            }
        }
        listing.ending(shard)
    }
}

/// A Kinesis record in Lambda's `aws:kinesis` shape.
pub(crate) fn lambda_record(
    record: &aws_sdk_kinesis::types::Record,
    shard: &str,
    region: &str,
    stream_arn: &str,
) -> Record {
    let sequence = record.sequence_number();
    let partition_key = record.partition_key().unwrap_or_default();
    let data = Bytes::copy_from_slice(record.data().as_ref());
    let arrival_ms = record
        .approximate_arrival_timestamp()
        .map(epoch_millis)
        .unwrap_or_else(now_millis);
    let mut kinesis = json!({
        "kinesisSchemaVersion": "1.0",
        "partitionKey": partition_key,
        "sequenceNumber": sequence,
        "data": B64.encode(&data),
        "approximateArrivalTimestamp": arrival_ms as f64 / 1000.0,
    });
    if let Some(encryption) = record
        .encryption_type()
        .filter(|e| **e != EncryptionType::None)
    {
        kinesis["encryptionType"] = Value::from(encryption.as_str());
    }
    let lambda = json!({
        "kinesis": kinesis,
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": format!("{shard}:{sequence}"),
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": INVOKE_IDENTITY_ARN,
        "awsRegion": region,
        "eventSourceARN": stream_arn,
    });
    // Lambda's Kinesis filters match the `kinesis` object's fields at the top level
    // (`{"data": {...}}`, `{"partitionKey": [...]}`), with `data` decoded when it is JSON.
    let mut filter_view = lambda["kinesis"].clone();
    filter_view["data"] = json_or_null(&data);
    Record {
        id: sequence.to_string(),
        position: sequence.to_string(),
        key: partition_key.to_string(),
        arrival_ms,
        size: data.len(),
        lambda,
        filter_view,
    }
}

#[cfg(test)]
mod tests {
    use aws_lambda_events::event::kinesis::{KinesisEvent, KinesisEventRecord};
    use aws_sdk_kinesis::primitives::Blob;

    use super::*;

    const ARN: &str = "arn:aws:kinesis:eu-west-1:000000000000:stream/orders";

    fn sdk_record(data: &[u8]) -> aws_sdk_kinesis::types::Record {
        aws_sdk_kinesis::types::Record::builder()
            .sequence_number("49590338271490256608559692538361571095921575989136588898")
            .partition_key("customer-7")
            .data(Blob::new(data))
            .approximate_arrival_timestamp(DateTime::from_millis(1_480_641_523_477))
            .build()
            .expect("a complete record")
    }

    #[test]
    fn builds_the_record_lambda_delivers() {
        let record = lambda_record(
            &sdk_record(br#"{"total": 12}"#),
            "shardId-000000000003",
            "eu-west-1",
            ARN,
        );
        let parsed: KinesisEventRecord =
            serde_json::from_value(record.lambda.clone()).expect("an aws:kinesis record");
        assert_eq!(parsed.event_source.as_deref(), Some("aws:kinesis"));
        assert_eq!(parsed.event_name.as_deref(), Some("aws:kinesis:record"));
        assert_eq!(parsed.event_version.as_deref(), Some("1.0"));
        assert_eq!(
            parsed.event_id.as_deref(),
            Some("shardId-000000000003:49590338271490256608559692538361571095921575989136588898")
        );
        assert_eq!(parsed.event_source_arn.as_deref(), Some(ARN));
        assert_eq!(parsed.aws_region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            parsed.invoke_identity_arn.as_deref(),
            Some(INVOKE_IDENTITY_ARN)
        );
        assert_eq!(parsed.kinesis.partition_key, "customer-7");
        assert_eq!(
            parsed.kinesis.kinesis_schema_version.as_deref(),
            Some("1.0")
        );
        assert_eq!(parsed.kinesis.data.0, br#"{"total": 12}"#);
        assert_eq!(
            parsed
                .kinesis
                .approximate_arrival_timestamp
                .0
                .timestamp_millis(),
            1_480_641_523_477
        );
        assert_eq!(
            record.lambda["kinesis"]["approximateArrivalTimestamp"],
            json!(1_480_641_523.477)
        );

        assert_eq!(
            record.id,
            "49590338271490256608559692538361571095921575989136588898"
        );
        assert_eq!(record.position, record.id);
        assert_eq!(record.key, "customer-7");
        assert_eq!(record.size, 13);
        assert_eq!(record.arrival_ms, 1_480_641_523_477);
    }

    #[test]
    fn filters_see_json_data_decoded() {
        let record = lambda_record(
            &sdk_record(br#"{"total": 12}"#),
            "shardId-0",
            "eu-west-1",
            ARN,
        );
        assert_eq!(record.filter_view["data"], json!({"total": 12}));
        assert_eq!(record.filter_view["partitionKey"], "customer-7");
        let opaque = lambda_record(
            &sdk_record(b"\x00\x01 not json"),
            "shardId-0",
            "eu-west-1",
            ARN,
        );
        assert_eq!(opaque.filter_view["data"], Value::Null);
        assert_eq!(
            opaque.lambda["kinesis"]["data"],
            B64.encode(b"\x00\x01 not json")
        );
    }

    #[test]
    fn the_envelope_is_a_kinesis_event() {
        let a = lambda_record(&sdk_record(b"a"), "shardId-0", "eu-west-1", ARN);
        let b = lambda_record(&sdk_record(b"b"), "shardId-0", "eu-west-1", ARN);
        let envelope = json!({ "Records": [&a.lambda, &b.lambda] });
        let event: KinesisEvent = serde_json::from_value(envelope).expect("an aws:kinesis record");
        assert_eq!(event.records.len(), 2);
        assert_eq!(event.records[1].kinesis.data.0, b"b");
    }

    #[test]
    fn names_the_encryption_when_there_is_one() {
        let mut sdk = sdk_record(b"x");
        sdk.encryption_type = Some(EncryptionType::Kms);
        let record = lambda_record(&sdk, "shardId-0", "eu-west-1", ARN);
        assert_eq!(record.lambda["kinesis"]["encryptionType"], "KMS");
        assert!(
            lambda_record(&sdk_record(b"x"), "shardId-0", "eu-west-1", ARN).lambda["kinesis"]
                .get("encryptionType")
                .is_none()
        );
    }
}
