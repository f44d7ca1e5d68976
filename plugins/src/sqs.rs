//! `type: sqs`: SendMessage of the record to a queue, Lambda's usual on-failure destination.

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use tokio::sync::OnceCell;

use crate::{DeadLetterError, DeadLetterSink};

/// SQS error codes no retry can cure: the queue does not exist (until an operator creates
/// it), the message is over the queue's size limit or holds characters SQS refuses, the
/// credentials may not send to it. Anything else (throttling, 5xx, the network) is retried.
pub(crate) const PERMANENT_ERRORS: &[&str] = &[
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
    "InvalidParameterValue",
    "InvalidMessageContents",
    "AccessDenied",
    "AccessDeniedException",
    "KMS.AccessDeniedException",
];

pub struct SqsDeadLetter {
    queue_url: String,
    endpoint_url: Option<String>,
    region: Option<String>,
    client: OnceCell<Client>,
}

impl SqsDeadLetter {
    pub fn new(queue_url: String, endpoint_url: Option<String>, region: Option<String>) -> Self {
        Self {
            queue_url,
            endpoint_url,
            region,
            client: OnceCell::new(),
        }
    }

    async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async {
                let mut loader = aws_config::defaults(BehaviorVersion::latest());
                if let Some(r) = &self.region {
                    loader = loader.region(Region::new(r.clone()));
                }
                if let Some(url) = &self.endpoint_url {
                    loader = loader.endpoint_url(url);
                }
                Client::new(&loader.load().await)
            })
            .await
    }
}

#[async_trait]
impl DeadLetterSink for SqsDeadLetter {
    async fn write(&self, record: &serde_json::Value) -> Result<(), DeadLetterError> {
        let body = serde_json::to_string(record)?;
        let mut send = self
            .client()
            .await
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body);
        if self.queue_url.ends_with(".fifo") {
            // A FIFO destination needs a group and a deduplication id; the request id makes a
            // retried write of the same record a duplicate SQS drops.
            let id = record["requestContext"]["requestId"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            send = send
                .message_group_id("sluice")
                .message_deduplication_id(if id.is_empty() { uuid_like(record) } else { id });
        }
        send.send().await.map_err(|e| DeadLetterError::Sqs {
            destination: self.describe(),
            code: e.code().map(str::to_owned),
            source: Box::new(e),
        })?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("sqs {}", self.queue_url)
    }
}

fn uuid_like(record: &serde_json::Value) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    record.to_string().hash(&mut h);
    format!("{:016x}", h.finish())
}
