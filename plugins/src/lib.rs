//! Dead-letter plugins: where a record goes when its outcome is a final failure. A write must
//! be durable when it returns, because the source record is acknowledged right after.

pub mod file;
pub mod kafka;
pub mod rabbitmq;
pub mod sqs;

use std::path::PathBuf;

use async_trait::async_trait;
use sluice_config::{DeadLetterConfig, DeadLetterKind};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DeadLetterError {
    #[error("cannot write dead letter to {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode dead letter: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("cannot write dead letter to kafka topic {topic}: {source}")]
    Kafka {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("cannot write dead letter to {destination}: {message}")]
    Remote {
        destination: String,
        message: String,
    },
    /// SendMessage failed; `code` is SQS's error code when the service answered.
    #[error(
        "cannot write dead letter to {destination}: {}",
        aws_sdk_sqs::error::DisplayErrorContext(source)
    )]
    Sqs {
        destination: String,
        code: Option<String>,
        #[source]
        source: Box<
            aws_sdk_sqs::error::SdkError<
                aws_sdk_sqs::operation::send_message::SendMessageError,
                aws_sdk_sqs::config::http::HttpResponse,
            >,
        >,
    },
    #[error("cannot write dead letter to {destination}: {source}")]
    RabbitMq {
        destination: String,
        #[source]
        source: lapin::Error,
    },
}

impl DeadLetterError {
    /// Whether writing again later can succeed; decided here, where the error is born.
    pub fn is_retriable(&self) -> bool {
        match self {
            // A producer librdkafka refused to create stays refused.
            Self::Kafka { source, .. } => !matches!(
                source,
                rdkafka::error::KafkaError::ClientCreation(_)
                    | rdkafka::error::KafkaError::ClientConfig(..)
            ),
            // The broker or the connection failed; it or another connection can take it later.
            Self::RabbitMq { .. } => true,
            Self::Sqs { code, source, .. } => {
                !matches!(
                    **source,
                    aws_sdk_sqs::error::SdkError::ConstructionFailure(_)
                ) && !code
                    .as_deref()
                    .is_some_and(|c| sqs::PERMANENT_ERRORS.contains(&c))
            }
            _ => matches!(self, Self::Io { .. } | Self::Remote { .. }),
        }
    }
}

#[async_trait]
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Writes one record durably.
    async fn write(&self, record: &serde_json::Value) -> Result<(), DeadLetterError>;
    /// Where the records go, for logs.
    fn describe(&self) -> String;
}

/// Builds the plugin a `dead_letters:` entry declares.
pub fn build(config: &DeadLetterConfig) -> Box<dyn DeadLetterSink> {
    match &config.kind {
        DeadLetterKind::File { path } => Box::new(file::FileDeadLetter::new(path.clone())),
        DeadLetterKind::Kafka {
            brokers,
            topic,
            properties,
        } => Box::new(kafka::KafkaDeadLetter::new(brokers, topic, properties)),
        DeadLetterKind::RabbitMq {
            uri,
            exchange,
            routing_key,
        } => Box::new(rabbitmq::RabbitMqDeadLetter::new(
            uri.clone(),
            exchange.clone(),
            routing_key.clone(),
        )),
        DeadLetterKind::Sqs { queue_url, aws } => Box::new(sqs::SqsDeadLetter::new(
            queue_url.clone(),
            aws.endpoint_url.clone(),
            aws.region.clone(),
        )),
    }
}
