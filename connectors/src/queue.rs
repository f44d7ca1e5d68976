//! What a queue source (SQS, RabbitMQ) offers the mapping pipeline: deliveries that each
//! carry a record and the handle to settle it, and the calls that settle them.

use std::time::Duration;

use async_trait::async_trait;

use crate::record::Record;
use crate::stream::ReadError;

/// A received message, not yet settled.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub record: Record,
    /// Opaque to the pipeline: the SQS receipt handle, the AMQP delivery tag with its
    /// connection generation, …
    pub handle: String,
    /// How many times the source has delivered this message (SQS ApproximateReceiveCount;
    /// 1 for a first AMQP delivery, 2 for a redelivered one when the count is unknown).
    pub receive_count: u32,
    /// Messages with the same group must be processed in order (SQS FIFO message group);
    /// `None` for unordered queues.
    pub group: Option<String>,
}

/// How a source redelivers what failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    /// The source redelivers a released message later by itself (SQS visibility timeout):
    /// the pipeline tries a batch once and releases what failed.
    BySource,
    /// The pipeline retries in place (bisecting, partial responses) until the outcome is
    /// final, as for streams (RabbitMQ).
    InPlace,
}

/// A message whose keep-alive the source refused: it may reach another consumer when its
/// current visibility ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotKept {
    /// The record id (SQS message id).
    pub id: String,
    /// The source's error code (`ReceiptHandleIsInvalid`, `MessageNotInflight`, …).
    pub code: String,
    pub message: String,
}

#[async_trait]
pub trait QueueSource: Send + Sync + 'static {
    /// The source's ARN (or URI-derived name), as events and on-failure records name it.
    fn source_arn(&self) -> &str;
    fn redelivery(&self) -> Redelivery;
    /// Waits up to `wait` for at most `max` deliveries; fewer (or none) is normal. A source
    /// whose connection broke reconnects inside and returns what the new connection gives.
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, ReadError>;
    /// The outcome is final: delete (SQS) or acknowledge (AMQP).
    async fn ack(&self, deliveries: &[&Delivery]) -> Result<(), ReadError>;
    /// Failed for now: let the source deliver it again.
    async fn release(&self, deliveries: &[&Delivery]) -> Result<(), ReadError>;
    /// Failed for good and the mapping has no on-failure destination: hand it to the
    /// source's own dead-lettering (AMQP reject without requeue → the queue's dead-letter
    /// exchange; SQS: release, and the queue's redrive policy takes it).
    async fn reject(&self, deliveries: &[&Delivery]) -> Result<(), ReadError>;
    /// Called periodically while a batch runs, so the source does not hand its messages to
    /// another consumer meanwhile (SQS ChangeMessageVisibility). Returns the messages the
    /// source refused to keep (a batch call can fail for some entries only); an error means
    /// none was kept. Default: nothing to do.
    async fn keep_alive(&self, _deliveries: &[&Delivery]) -> Result<Vec<NotKept>, ReadError> {
        Ok(Vec::new())
    }
    /// How long a received message stays hidden from other consumers unless kept alive (SQS
    /// visibility timeout); `None` when the source has no such timeout.
    fn visibility_timeout(&self) -> Option<Duration> {
        None
    }
    /// The invocation event for a batch, in the shape Lambda delivers it.
    fn envelope(&self, records: &[&Record]) -> serde_json::Value;
    /// `SQSBatchInfo`, `RabbitMQBatchInfo`, …: the key the on-failure record uses.
    fn batch_info_key(&self) -> &'static str;
}
