//! Dead-letter plugins: where a record goes when its outcome is a final failure. A write must
//! be durable when it returns, because the source record is acknowledged right after.

pub mod file;

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
}

impl DeadLetterError {
    /// Whether writing again later can succeed; decided here, where the error is born.
    pub fn is_retriable(&self) -> bool {
        matches!(self, Self::Io { .. })
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
    }
}
