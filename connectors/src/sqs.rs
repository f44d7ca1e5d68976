//! `type: sqs`: long-polls a queue; a message is deleted only when its outcome is final, and
//! what failed reappears after its visibility timeout, as with Lambda. While a batch runs its
//! messages' visibility is extended, so no other consumer sees them meanwhile.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::timeout::TimeoutConfig;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, Message,
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value, json};

use crate::kinesis::polling::sdk_config;
use crate::queue::{Delivery, NotKept, QueueSource, Redelivery};
use crate::record::Record;
use crate::stream::ReadError;

/// As the shared AWS client configuration has it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How much longer than its long-poll wait a ReceiveMessage call may take before it is lost.
const LONG_POLL_MARGIN: Duration = Duration::from_secs(10);

pub struct SqsSource {
    client: Client,
    queue_url: String,
    arn: String,
    region: String,
    fifo: bool,
    visibility_timeout: i32,
}

fn sdk_error<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    e: aws_sdk_sqs::error::SdkError<E, R>,
) -> ReadError {
    let code = e.code().unwrap_or_default().to_string();
    let text = DisplayErrorContext(&e).to_string();
    if code.contains("NonExistentQueue") || code.contains("QueueDoesNotExist") {
        ReadError::NotFound(text)
    } else if code.contains("Throttl") || code.contains("RequestThrottled") {
        ReadError::Throttled(text)
    } else {
        ReadError::Other(text)
    }
}

impl SqsSource {
    pub async fn connect(
        queue_url: &str,
        endpoint_url: Option<&str>,
        region: Option<&str>,
    ) -> Result<Self, ReadError> {
        let (config, region) = sdk_config(endpoint_url, region, queue_url).await?;
        let client = Client::new(&config);
        let attrs = client
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .map_err(sdk_error)?;
        let attrs = attrs.attributes().cloned().unwrap_or_default();
        let arn = attrs
            .get(&QueueAttributeName::QueueArn)
            .cloned()
            .unwrap_or_else(|| {
                format!(
                    "arn:aws:sqs:{region}:000000000000:{}",
                    queue_url.rsplit('/').next().unwrap_or_default()
                )
            });
        let fifo = attrs
            .get(&QueueAttributeName::FifoQueue)
            .is_some_and(|v| v == "true");
        let visibility_timeout = attrs
            .get(&QueueAttributeName::VisibilityTimeout)
            .and_then(|v| v.parse().ok())
            .unwrap_or(30);
        Ok(Self {
            client,
            queue_url: queue_url.to_string(),
            arn,
            region,
            fifo,
            visibility_timeout,
        })
    }

    /// One message in Lambda's `aws:sqs` shape.
    fn lambda_record(&self, m: &Message) -> Value {
        let mut attributes = Map::new();
        if let Some(attrs) = m.attributes() {
            for (k, v) in attrs {
                attributes.insert(k.as_str().to_string(), Value::String(v.clone()));
            }
        }
        let mut message_attributes = Map::new();
        if let Some(attrs) = m.message_attributes() {
            for (k, v) in attrs {
                message_attributes.insert(k.clone(), attribute_json(v));
            }
        }
        json!({
            "messageId": m.message_id().unwrap_or_default(),
            "receiptHandle": m.receipt_handle().unwrap_or_default(),
            "body": m.body().unwrap_or_default(),
            "attributes": attributes,
            "messageAttributes": message_attributes,
            "md5OfBody": m.md5_of_body().unwrap_or_default(),
            "md5OfMessageAttributes": m.md5_of_message_attributes(),
            "eventSource": "aws:sqs",
            "eventSourceARN": self.arn,
            "awsRegion": self.region,
        })
    }

    fn delivery(&self, m: &Message) -> Delivery {
        let lambda = self.lambda_record(m);
        let body = m.body().unwrap_or_default();
        let mut filter_view = lambda.clone();
        if let Ok(parsed) = serde_json::from_str::<Value>(body) {
            filter_view["body"] = parsed;
        }
        let attr =
            |name: MessageSystemAttributeName| m.attributes().and_then(|a| a.get(&name)).cloned();
        let id = m.message_id().unwrap_or_default().to_string();
        let group = attr(MessageSystemAttributeName::MessageGroupId);
        Delivery {
            record: Record {
                id: id.clone(),
                position: attr(MessageSystemAttributeName::SequenceNumber)
                    .unwrap_or_else(|| id.clone()),
                key: group.clone().unwrap_or_else(|| id.clone()),
                arrival_ms: attr(MessageSystemAttributeName::SentTimestamp)
                    .and_then(|t| t.parse().ok())
                    .unwrap_or_else(|| chrono::Utc::now().timestamp_millis()),
                size: body.len(),
                lambda,
                filter_view,
            },
            handle: m.receipt_handle().unwrap_or_default().to_string(),
            receive_count: attr(MessageSystemAttributeName::ApproximateReceiveCount)
                .and_then(|c| c.parse().ok())
                .unwrap_or(1),
            group: if self.fifo { group } else { None },
        }
    }
}

/// A message attribute as Lambda writes it: camelCase, lists always present.
fn attribute_json(v: &MessageAttributeValue) -> Value {
    json!({
        "stringValue": v.string_value(),
        "binaryValue": v.binary_value().map(|b| B64.encode(b.as_ref())),
        "stringListValues": v.string_list_values(),
        "binaryListValues": v.binary_list_values().iter().map(|b| B64.encode(b.as_ref())).collect::<Vec<_>>(),
        "dataType": v.data_type(),
    })
}

#[async_trait]
impl QueueSource for SqsSource {
    fn source_arn(&self) -> &str {
        &self.arn
    }

    fn redelivery(&self) -> Redelivery {
        Redelivery::BySource
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, ReadError> {
        let wait_secs = i32::try_from(wait.as_secs().min(20)).unwrap_or(20);
        let out = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(i32::try_from(max.clamp(1, 10)).unwrap_or(10))
            .wait_time_seconds(wait_secs)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            // The client's attempt timeout (10 s) is shorter than a long poll may wait.
            .customize()
            .config_override(
                aws_sdk_sqs::config::Builder::default().timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(CONNECT_TIMEOUT)
                        .operation_attempt_timeout(
                            Duration::from_secs(u64::try_from(wait_secs).unwrap_or(20))
                                + LONG_POLL_MARGIN,
                        )
                        .build(),
                ),
            )
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(out.messages().iter().map(|m| self.delivery(m)).collect())
    }

    async fn ack(&self, deliveries: &[&Delivery]) -> Result<(), ReadError> {
        for chunk in deliveries.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(&d.handle)
                        .build()
                        .map_err(|e| ReadError::Other(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = self
                .client
                .delete_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(sdk_error)?;
            if let Some(f) = out.failed().first() {
                return Err(ReadError::Other(format!(
                    "DeleteMessageBatch failed for {} messages: {}",
                    out.failed().len(),
                    f.message().unwrap_or_default()
                )));
            }
        }
        Ok(())
    }

    /// A failed message comes back by itself when its visibility timeout ends; making it
    /// visible at once would retry it in a tight loop.
    async fn release(&self, _deliveries: &[&Delivery]) -> Result<(), ReadError> {
        Ok(())
    }

    /// Left alone, the message reappears until the queue's redrive policy moves it to its
    /// own dead-letter queue after maxReceiveCount receives.
    async fn reject(&self, _deliveries: &[&Delivery]) -> Result<(), ReadError> {
        Ok(())
    }

    /// Entries the batch call refused (a receipt handle gone stale because the message was
    /// received again elsewhere, say) come back as [`NotKept`] rather than vanishing.
    async fn keep_alive(&self, deliveries: &[&Delivery]) -> Result<Vec<NotKept>, ReadError> {
        let mut not_kept = Vec::new();
        for chunk in deliveries.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(&d.handle)
                        .visibility_timeout(self.visibility_timeout)
                        .build()
                        .map_err(|e| ReadError::Other(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = self
                .client
                .change_message_visibility_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(sdk_error)?;
            not_kept.extend(out.failed().iter().map(|f| {
                NotKept {
                    id: f
                        .id()
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| chunk.get(i))
                        .map_or_else(|| f.id().to_string(), |d| d.record.id.clone()),
                    code: f.code().to_string(),
                    message: f.message().unwrap_or_default().to_string(),
                }
            }));
        }
        Ok(not_kept)
    }

    fn visibility_timeout(&self) -> Option<Duration> {
        Some(Duration::from_secs(
            u64::try_from(self.visibility_timeout).unwrap_or(0),
        ))
    }

    fn envelope(&self, records: &[&Record]) -> Value {
        json!({ "Records": records.iter().map(|r| &r.lambda).collect::<Vec<_>>() })
    }

    fn batch_info_key(&self) -> &'static str {
        "SQSBatchInfo"
    }
}
