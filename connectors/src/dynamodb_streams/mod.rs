//! `type: dynamodb_streams`: a DynamoDB table's stream read shard by shard with the AWS SDK, its
//! records handed on in the `aws:dynamodb` shape Lambda delivers. The reading rules are
//! Kinesis's (see `kinesis::polling`), with DynamoDB Streams' calls.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodbstreams::Client;
use aws_sdk_dynamodbstreams::primitives::DateTime;
use aws_sdk_dynamodbstreams::types::{AttributeValue, KeyType, ShardIteratorType};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;
use tracing::debug;

use crate::kinesis::polling::{
    CallError, Page, PolledShard, Rules, ShardApi, ShardCache, classify, epoch_millis, now_millis,
    sdk_config,
};
use crate::record::Record;
use crate::stream::{ReadError, ShardInfo, ShardRead, ShardReader, StartAt, StreamSource};

/// GetRecords' largest `Limit`.
pub const MAX_READ_LIMIT: i32 = 1000;

/// Readers ask for the listing only when they open (DescribeStream allows 10 calls a second
/// per account, and a closing shard ends with a null iterator).
const LISTING_MAX_AGE: Duration = Duration::from_secs(30);

/// A DynamoDB table's stream.
pub struct DynamoDbStreamsSource {
    api: Arc<StreamsApi>,
    rules: Rules,
}

struct StreamsApi {
    client: Client,
    stream_arn: String,
    region: String,
    /// The table's partition key attribute: records of one item keep their order by it.
    hash_key: Option<String>,
    listing: Mutex<ShardCache>,
}

fn is_stream_arn(s: &str) -> bool {
    s.starts_with("arn:") && s.contains("/stream/")
}

impl DynamoDbStreamsSource {
    /// Finds the stream: `stream_or_table` is a stream ARN, or a table (name or ARN) whose latest
    /// stream is read. Credentials come from the default chain; `endpoint_url` points the clients
    /// elsewhere than AWS; `region` defaults to the ARN's, then to the default chain's.
    pub async fn connect(
        stream_or_table: &str,
        endpoint_url: Option<&str>,
        region: Option<&str>,
    ) -> Result<Self, ReadError> {
        let (config, region) = sdk_config(endpoint_url, region, stream_or_table).await?;
        let stream_arn = if is_stream_arn(stream_or_table) {
            stream_or_table.to_string()
        } else {
            let table = aws_sdk_dynamodb::Client::new(&config)
                .describe_table()
                .table_name(stream_or_table)
                .send()
                .await
                .map_err(|e| ReadError::from(classify("DescribeTable", &e, false)))?;
            table
                .table()
                .and_then(|t| t.latest_stream_arn())
                .map(str::to_string)
                .ok_or_else(|| {
                    ReadError::NotFound(format!("table `{stream_or_table}` has no stream"))
                })?
        };
        let client = Client::new(&config);
        let described = client
            .describe_stream()
            .stream_arn(&stream_arn)
            .limit(1)
            .send()
            .await
            .map_err(|e| ReadError::from(classify("DescribeStream", &e, false)))?;
        let hash_key = described.stream_description().and_then(|d| {
            d.key_schema()
                .iter()
                .find(|k| *k.key_type() == KeyType::Hash)
                .map(|k| k.attribute_name().to_string())
        });
        Ok(Self {
            api: Arc::new(StreamsApi {
                client,
                stream_arn,
                region,
                hash_key,
                listing: Mutex::new(ShardCache::default()),
            }),
            rules: Rules {
                // Lambda polls a DynamoDB stream's shard four times a second.
                min_interval: Duration::from_millis(250),
                idle_max: Duration::from_secs(1),
                limit: MAX_READ_LIMIT,
                empty_read_ends_closed_shard: false,
                at_timestamp: false,
            },
        })
    }

    /// Records per GetRecords call, clamped to 1..=1000 (1000 by default).
    pub fn with_read_limit(mut self, limit: i32) -> Self {
        self.rules.limit = limit.clamp(1, MAX_READ_LIMIT);
        self
    }

    pub fn region(&self) -> &str {
        &self.api.region
    }

    /// [`StreamSource::open`] with the concrete reader. DynamoDB Streams has no AT_TIMESTAMP:
    /// [`StartAt::AtTimestamp`] reads from the trim horizon and drops the records created
    /// before the timestamp's second.
    pub async fn open_shard(
        &self,
        shard: &str,
        start: StartAt,
    ) -> Result<DynamoDbStreamsShardReader, ReadError> {
        let inner = PolledShard::open(self.api.clone(), shard, start, self.rules.clone()).await?;
        Ok(DynamoDbStreamsShardReader { inner })
    }
}

#[async_trait]
impl StreamSource for DynamoDbStreamsSource {
    fn stream_arn(&self) -> &str {
        &self.api.stream_arn
    }

    async fn shards(&self) -> Result<Vec<ShardInfo>, ReadError> {
        let mut listing = self.api.listing.lock().await;
        let shards = self.api.describe_shards().await?;
        listing.fill(&shards);
        Ok(shards)
    }

    async fn open(&self, shard: &str, start: StartAt) -> Result<Box<dyn ShardReader>, ReadError> {
        Ok(Box::new(self.open_shard(shard, start).await?))
    }

    fn batch_info_key(&self) -> &'static str {
        "DDBStreamBatchInfo"
    }
}

/// Reads one shard of a DynamoDB stream (see [`ShardReader`]).
pub struct DynamoDbStreamsShardReader {
    inner: PolledShard<StreamsApi>,
}

impl DynamoDbStreamsShardReader {
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
impl ShardReader for DynamoDbStreamsShardReader {
    async fn next(&mut self) -> Result<ShardRead, ReadError> {
        self.inner.next().await
    }
}

impl StreamsApi {
    async fn describe_shards(&self) -> Result<Vec<ShardInfo>, ReadError> {
        let mut shards = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let answer = self
                .client
                .describe_stream()
                .stream_arn(&self.stream_arn)
                .set_exclusive_start_shard_id(after.clone())
                .send()
                .await
                .map_err(|e| ReadError::from(classify("DescribeStream", &e, false)))?;
            let Some(description) = answer.stream_description() else {
                return Ok(shards);
            };
            shards.extend(description.shards().iter().filter_map(|s| {
                Some(ShardInfo {
                    id: s.shard_id()?.to_string(),
                    parent: s.parent_shard_id().map(str::to_string),
                    adjacent_parent: None,
                    ending_sequence: s
                        .sequence_number_range()
                        .and_then(|r| r.ending_sequence_number())
                        .map(str::to_string),
                })
            }));
            match description.last_evaluated_shard_id() {
                Some(last) if Some(last) != after.as_deref() => after = Some(last.to_string()),
                _ => return Ok(shards),
            }
        }
    }
}

#[async_trait]
impl ShardApi for StreamsApi {
    async fn iterator(&self, shard: &str, start: &StartAt) -> Result<String, CallError> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_arn(&self.stream_arn)
            .shard_id(shard);
        let request = match start {
            StartAt::TrimHorizon | StartAt::AtTimestamp(_) => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            StartAt::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            StartAt::AfterSequence(seq) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(seq),
        };
        let answer = request
            .send()
            .await
            .map_err(|e| classify("GetShardIterator", &e, false))?;
        answer.shard_iterator().map(str::to_string).ok_or_else(|| {
            CallError::Other(format!("GetShardIterator for {shard} answered no iterator"))
        })
    }

    async fn records(&self, _shard: &str, iterator: &str, limit: i32) -> Result<Page, CallError> {
        let answer = self
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(limit)
            .send()
            .await
            .map_err(|e| classify("GetRecords", &e, true))?;
        Ok(Page {
            records: answer
                .records()
                .iter()
                .map(|r| lambda_record(r, &self.region, &self.stream_arn, self.hash_key.as_deref()))
                .collect(),
            next_iterator: answer.next_shard_iterator().map(str::to_string),
            millis_behind: None,
        })
    }

    async fn ending_sequence(&self, shard: &str) -> Option<String> {
        let mut listing = self.listing.lock().await;
        if listing.is_stale(LISTING_MAX_AGE) {
            match self.describe_shards().await {
                Ok(shards) => listing.fill(&shards),
                Err(e) => {
                    debug!(stream = %self.stream_arn, error = %e, "could not describe the stream")
                }
            }
        }
        listing.ending(shard)
    }
}

/// An attribute value in DynamoDB's JSON (`{"S": "x"}`, `{"N": "1"}`, …), as Lambda delivers it.
pub fn attribute_json(value: &AttributeValue) -> Value {
    let b64 = |b: &aws_sdk_dynamodbstreams::primitives::Blob| Value::from(B64.encode(b.as_ref()));
    match value {
        AttributeValue::S(s) => json!({ "S": s }),
        AttributeValue::N(n) => json!({ "N": n }),
        AttributeValue::B(b) => json!({ "B": b64(b) }),
        AttributeValue::Ss(v) => json!({ "SS": v }),
        AttributeValue::Ns(v) => json!({ "NS": v }),
        AttributeValue::Bs(v) => json!({ "BS": v.iter().map(b64).collect::<Vec<_>>() }),
        AttributeValue::M(m) => json!({ "M": item_json(m) }),
        AttributeValue::L(l) => json!({ "L": l.iter().map(attribute_json).collect::<Vec<_>>() }),
        AttributeValue::Null(b) => json!({ "NULL": b }),
        AttributeValue::Bool(b) => json!({ "BOOL": b }),
        // A type newer than this SDK: nothing faithful to say.
        _ => Value::Null,
    }
}

/// An item (or its keys) in DynamoDB's JSON.
pub fn item_json(item: &HashMap<String, AttributeValue>) -> Value {
    Value::Object(
        item.iter()
            .map(|(k, v)| (k.clone(), attribute_json(v)))
            .collect(),
    )
}

/// Seconds since the epoch, whole when the service gave whole seconds (as it does by default).
fn epoch_seconds(t: &DateTime) -> Value {
    if t.subsec_nanos() == 0 {
        Value::from(t.secs())
    } else {
        Value::from(t.as_secs_f64())
    }
}

/// A stream record in Lambda's `aws:dynamodb` shape.
pub(crate) fn lambda_record(
    record: &aws_sdk_dynamodbstreams::types::Record,
    region: &str,
    stream_arn: &str,
    hash_key: Option<&str>,
) -> Record {
    let change = record.dynamodb();
    let sequence = change.and_then(|c| c.sequence_number()).unwrap_or_default();
    let created = change.and_then(|c| c.approximate_creation_date_time());
    let keys = change.and_then(|c| c.keys());
    let mut dynamodb = Map::new();
    if let Some(t) = created {
        dynamodb.insert("ApproximateCreationDateTime".into(), epoch_seconds(t));
    }
    dynamodb.insert(
        "Keys".into(),
        keys.map(item_json).unwrap_or_else(|| json!({})),
    );
    if let Some(image) = change.and_then(|c| c.new_image()) {
        dynamodb.insert("NewImage".into(), item_json(image));
    }
    if let Some(image) = change.and_then(|c| c.old_image()) {
        dynamodb.insert("OldImage".into(), item_json(image));
    }
    dynamodb.insert("SequenceNumber".into(), Value::from(sequence));
    let size_bytes = change.and_then(|c| c.size_bytes());
    dynamodb.insert(
        "SizeBytes".into(),
        Value::from(size_bytes.unwrap_or_default()),
    );
    if let Some(view) = change.and_then(|c| c.stream_view_type()) {
        dynamodb.insert("StreamViewType".into(), Value::from(view.as_str()));
    }
    let mut lambda = json!({
        "eventID": record.event_id().unwrap_or(sequence),
        "eventName": record.event_name().map(|n| n.as_str()).unwrap_or_default(),
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": record.aws_region().unwrap_or(region),
        "dynamodb": dynamodb,
        "eventSourceARN": stream_arn,
    });
    if let Some(identity) = record.user_identity() {
        lambda["userIdentity"] = json!({
            "type": identity.r#type().unwrap_or_default(),
            "principalId": identity.principal_id().unwrap_or_default(),
        });
    }
    // Changes to one item stay in order; the partition key is what items share when they must.
    let key = match (hash_key, keys) {
        (Some(attribute), Some(keys)) if keys.contains_key(attribute) => {
            attribute_json(&keys[attribute]).to_string()
        }
        _ => lambda["dynamodb"]["Keys"].to_string(),
    };
    let size = match size_bytes {
        Some(n) => usize::try_from(n).unwrap_or_default(),
        None => lambda["dynamodb"].to_string().len(),
    };
    Record {
        id: sequence.to_string(),
        position: sequence.to_string(),
        key,
        arrival_ms: created.map(epoch_millis).unwrap_or_else(now_millis),
        size,
        filter_view: lambda.clone(),
        lambda,
    }
}

#[cfg(test)]
mod tests {
    use aws_lambda_events::event::dynamodb::{Event, EventRecord, StreamViewType};
    use aws_sdk_dynamodbstreams::primitives::Blob;
    use aws_sdk_dynamodbstreams::types::{Identity, OperationType, StreamRecord};

    use super::*;

    const ARN: &str =
        "arn:aws:dynamodb:eu-west-1:000000000000:table/orders/stream/2024-01-01T00:00:00.000";

    fn attrs(pairs: &[(&str, AttributeValue)]) -> HashMap<String, AttributeValue> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn modify() -> aws_sdk_dynamodbstreams::types::Record {
        let keys = attrs(&[
            ("id", AttributeValue::S("o-1".into())),
            ("at", AttributeValue::N("3".into())),
        ]);
        let old = attrs(&[
            ("id", AttributeValue::S("o-1".into())),
            ("at", AttributeValue::N("3".into())),
            ("total", AttributeValue::N("12".into())),
        ]);
        let mut new = old.clone();
        new.insert("total".into(), AttributeValue::N("15".into()));
        new.insert("paid".into(), AttributeValue::Bool(true));
        new.insert(
            "tags".into(),
            AttributeValue::Ss(vec!["a".into(), "b".into()]),
        );
        new.insert("blob".into(), AttributeValue::B(Blob::new(b"\x00\x01")));
        new.insert("note".into(), AttributeValue::Null(true));
        new.insert(
            "lines".into(),
            AttributeValue::L(vec![AttributeValue::M(attrs(&[(
                "sku",
                AttributeValue::S("x".into()),
            )]))]),
        );
        aws_sdk_dynamodbstreams::types::Record::builder()
            .event_id("c81e728d9d4c2f636f067f89cc14862c")
            .event_name(OperationType::Modify)
            .event_version("1.0")
            .event_source("aws:dynamodb")
            .aws_region("eu-west-1")
            .dynamodb(
                StreamRecord::builder()
                    .approximate_creation_date_time(DateTime::from_secs(1_480_642_020))
                    .set_keys(Some(keys))
                    .set_old_image(Some(old))
                    .set_new_image(Some(new))
                    .sequence_number("111")
                    .size_bytes(59)
                    .stream_view_type(
                        aws_sdk_dynamodbstreams::types::StreamViewType::NewAndOldImages,
                    )
                    .build(),
            )
            .build()
    }

    #[test]
    fn builds_the_record_lambda_delivers() {
        let record = lambda_record(&modify(), "us-east-1", ARN, Some("id"));
        let parsed: EventRecord =
            serde_json::from_value(record.lambda.clone()).expect("an aws:dynamodb record");
        assert_eq!(parsed.event_id, "c81e728d9d4c2f636f067f89cc14862c");
        assert_eq!(parsed.event_name, "MODIFY");
        assert_eq!(parsed.event_version.as_deref(), Some("1.1"));
        assert_eq!(parsed.event_source.as_deref(), Some("aws:dynamodb"));
        assert_eq!(parsed.event_source_arn.as_deref(), Some(ARN));
        assert_eq!(parsed.aws_region, "eu-west-1");
        assert_eq!(
            parsed.change.approximate_creation_date_time.timestamp(),
            1_480_642_020
        );
        assert_eq!(parsed.change.sequence_number.as_deref(), Some("111"));
        assert_eq!(parsed.change.size_bytes, 59);
        assert_eq!(
            parsed.change.stream_view_type,
            Some(StreamViewType::NewAndOldImages)
        );
        let as_json = |item| serde_json::to_value(item).expect("serializes");
        assert_eq!(
            as_json(&parsed.change.keys),
            json!({"id": {"S": "o-1"}, "at": {"N": "3"}})
        );
        assert_eq!(
            as_json(&parsed.change.old_image)["total"],
            json!({"N": "12"})
        );
        assert_eq!(
            as_json(&parsed.change.new_image),
            json!({
                "id": {"S": "o-1"}, "at": {"N": "3"}, "total": {"N": "15"}, "paid": {"BOOL": true},
                "tags": {"SS": ["a", "b"]}, "blob": {"B": "AAE="}, "note": {"NULL": true},
                "lines": {"L": [{"M": {"sku": {"S": "x"}}}]},
            })
        );
        assert_eq!(
            record.lambda["dynamodb"]["ApproximateCreationDateTime"],
            json!(1_480_642_020)
        );

        assert_eq!(
            (record.id.as_str(), record.position.as_str()),
            ("111", "111")
        );
        assert_eq!(record.key, r#"{"S":"o-1"}"#);
        assert_eq!(record.arrival_ms, 1_480_642_020_000);
        assert_eq!(record.size, 59);
        assert_eq!(record.filter_view, record.lambda);
    }

    #[test]
    fn an_insert_has_no_old_image_and_a_ttl_delete_names_its_identity() {
        let mut insert = modify();
        insert.event_name = Some(OperationType::Insert);
        if let Some(change) = insert.dynamodb.as_mut() {
            change.old_image = None;
        }
        let record = lambda_record(&insert, "us-east-1", ARN, Some("id"));
        assert!(record.lambda["dynamodb"].get("OldImage").is_none());
        assert_eq!(record.lambda["eventName"], "INSERT");

        let mut expired = modify();
        expired.event_name = Some(OperationType::Remove);
        expired.user_identity = Some(
            Identity::builder()
                .r#type("Service")
                .principal_id("dynamodb.amazonaws.com")
                .build(),
        );
        let parsed: EventRecord =
            serde_json::from_value(lambda_record(&expired, "us-east-1", ARN, None).lambda)
                .expect("an aws:dynamodb record");
        let identity = parsed.user_identity.expect("an identity");
        assert_eq!(
            (identity.type_.as_str(), identity.principal_id.as_str()),
            ("Service", "dynamodb.amazonaws.com")
        );
    }

    #[test]
    fn without_a_key_schema_the_whole_key_orders() {
        let record = lambda_record(&modify(), "us-east-1", ARN, None);
        assert_eq!(
            serde_json::from_str::<Value>(&record.key).expect("JSON"),
            json!({"id": {"S": "o-1"}, "at": {"N": "3"}})
        );
    }

    #[test]
    fn keeps_sub_second_creation_times() {
        let mut precise = modify();
        if let Some(change) = precise.dynamodb.as_mut() {
            change.approximate_creation_date_time = Some(DateTime::from_millis(1_480_642_020_250));
        }
        let record = lambda_record(&precise, "us-east-1", ARN, None);
        assert_eq!(
            record.lambda["dynamodb"]["ApproximateCreationDateTime"],
            json!(1_480_642_020.25)
        );
        assert_eq!(record.arrival_ms, 1_480_642_020_250);
    }

    #[test]
    fn the_envelope_is_a_dynamodb_event() {
        let record = lambda_record(&modify(), "us-east-1", ARN, None);
        let event: Event = serde_json::from_value(json!({ "Records": [&record.lambda] }))
            .expect("an aws:dynamodb record");
        assert_eq!(event.records[0].event_name, "MODIFY");
    }

    #[test]
    fn tells_stream_arns_from_tables() {
        assert!(is_stream_arn(ARN));
        assert!(!is_stream_arn("orders"));
        assert!(!is_stream_arn(
            "arn:aws:dynamodb:eu-west-1:000000000000:table/orders"
        ));
    }
}
