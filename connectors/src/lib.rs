//! Sluice's event sources. Each source is small and looks like its siblings: its config comes
//! from `sluice-config`, and it hands events to the broker through [`Dispatch`].

pub mod backoff;
pub mod dynamodb_streams;
pub mod http;
mod http_auth;
pub mod kafka;
pub mod kinesis;
pub mod queue;
pub mod rabbitmq;
pub mod record;
pub mod schedule;
pub mod sqs;
pub mod stream;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use thiserror::Error;

/// Why the broker could not deliver an event. Each variant says whether trying again later can
/// help, decided where the error is born.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum DispatchError {
    #[error("function `{0}` not found")]
    NotFound(String),
    #[error("throttled: {0}")]
    Throttled(String),
    #[error("{error_type}: {message}")]
    Function { error_type: String, message: String },
}

impl DispatchError {
    pub fn is_retriable(&self) -> bool {
        !matches!(self, Self::NotFound(_))
    }
}

pub type DispatchFuture<'a, T = Bytes> =
    Pin<Box<dyn Future<Output = Result<T, DispatchError>> + Send + 'a>>;

/// How a source hands one event to a function (`name` or `name:qualifier`). The broker
/// implements it; tests may implement it to observe a source.
pub trait Dispatch: Send + Sync + 'static {
    /// Invokes synchronously and returns the function's result.
    fn invoke<'a>(&'a self, function: &'a str, payload: Bytes) -> DispatchFuture<'a>;
    /// Queues the event durably for asynchronous invocation and returns its request id.
    fn invoke_async<'a>(&'a self, function: &'a str, payload: Bytes) -> DispatchFuture<'a, String>;
}
