//! A record read from a poll-based source, carrying its coordinates from the moment it is
//! read until its outcome is final.

/// One record, whatever its source.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The `itemIdentifier` a function names in `batchItemFailures`: the sequence number
    /// (Kinesis, DynamoDB), the message id (SQS), the offset (Kafka).
    pub id: String,
    /// Where it sits in its partition, for checkpoints (sequence number or offset as text).
    pub position: String,
    /// The partition key, which `parallelization` keeps in order.
    pub key: String,
    /// When the source received it, in milliseconds since the epoch.
    pub arrival_ms: i64,
    /// Its payload size in bytes, for `batch.max_bytes`.
    pub size: usize,
    /// The record in the shape Lambda delivers it (one element of `Records`).
    pub lambda: serde_json::Value,
    /// The view filters match against: Lambda's record with its data decoded from JSON when
    /// it is JSON (`body` for SQS, `value` for Kafka); for Kinesis, the record's `kinesis`
    /// object with `data` decoded, as Lambda's Kinesis patterns (`{"data": …}`) expect.
    pub filter_view: serde_json::Value,
}
