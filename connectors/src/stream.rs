//! What a sharded stream source (Kinesis, DynamoDB Streams) offers the mapping pipeline: its
//! shards with their lineage, and a reader per shard that starts at a position and yields
//! records in order.

use async_trait::async_trait;
use bytes::Bytes;
use thiserror::Error;

use crate::record::Record;

#[derive(Debug, Error)]
pub enum ReadError {
    /// The stream or shard does not exist (or no longer does).
    #[error("not found: {0}")]
    NotFound(String),
    /// The service asked us to slow down; try again after a backoff.
    #[error("throttled: {0}")]
    Throttled(String),
    /// The iterator expired; open the shard again from the last checkpoint.
    #[error("iterator expired: {0}")]
    ExpiredIterator(String),
    /// Anything else: the network, the service, a malformed answer.
    #[error("{0}")]
    Other(String),
}

impl ReadError {
    /// Decided where the error is born: all but a missing stream can pass with time.
    pub fn is_retriable(&self) -> bool {
        !matches!(self, Self::NotFound(_))
    }
}

/// A shard and where it came from (resharding makes children of closed parents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: String,
    pub parent: Option<String>,
    pub adjacent_parent: Option<String>,
    /// Set when the shard is closed: no record will ever follow this one.
    pub ending_sequence: Option<String>,
}

/// Where a reader starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    TrimHorizon,
    Latest,
    /// Milliseconds since the epoch.
    AtTimestamp(i64),
    /// Resume after a checkpoint.
    AfterSequence(String),
}

/// One read from a shard.
#[derive(Debug, Default)]
pub struct ShardRead {
    pub records: Vec<Record>,
    /// How far behind the tip of the shard this read is, in milliseconds, when known.
    pub millis_behind: Option<i64>,
    /// The shard is closed and fully read: nothing will ever follow.
    pub end_of_shard: bool,
}

#[async_trait]
pub trait ShardReader: Send {
    /// Reads the next records; an empty read is normal at the tip of an open shard. The
    /// reader paces itself (at most 5 calls/s per shard for Kinesis) and recovers from
    /// expired iterators on its own from the last record it returned.
    async fn next(&mut self) -> Result<ShardRead, ReadError>;
}

#[async_trait]
pub trait StreamSource: Send + Sync + 'static {
    /// The stream's ARN, as records and on-failure records name it.
    fn stream_arn(&self) -> &str;
    /// Every shard, open or closed, with its parents.
    async fn shards(&self) -> Result<Vec<ShardInfo>, ReadError>;
    async fn open(&self, shard: &str, start: StartAt) -> Result<Box<dyn ShardReader>, ReadError>;
    /// The invocation event for a batch of records, in the shape Lambda delivers
    /// (`{"Records": [...]}` for both Kinesis and DynamoDB Streams).
    fn envelope(&self, records: &[&Record]) -> serde_json::Value {
        serde_json::json!({ "Records": records.iter().map(|r| &r.lambda).collect::<Vec<_>>() })
    }
    /// `KinesisBatchInfo` or `DDBStreamBatchInfo`: the key the on-failure record uses.
    fn batch_info_key(&self) -> &'static str;
}

/// Compares two sequence numbers (decimal strings of any length).
pub fn sequence_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Marks bytes that are not JSON so filters and envelopes can tell.
pub fn json_or_null(data: &Bytes) -> serde_json::Value {
    serde_json::from_slice(data).unwrap_or(serde_json::Value::Null)
}
