//! `runtime: native`: Rust handlers registered in-process, for embedding Sluice as a library
//! and for fast tests.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::FutureExt;
use serde_json::Value;

use crate::invocation::{Executed, FunctionError, Invocation};

/// What a native handler is told about its invocation, as `lambda_runtime::Context` would.
#[derive(Debug, Clone)]
pub struct Context {
    pub request_id: String,
    pub deadline: SystemTime,
    pub invoked_function_arn: String,
    pub client_context: Option<String>,
    pub trace_id: String,
    pub function_name: String,
    pub function_version: String,
    pub memory_mb: u32,
}

impl Context {
    pub fn remaining(&self) -> Duration {
        self.deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

pub type NativeFuture = Pin<Box<dyn Future<Output = Result<Value, FunctionError>> + Send>>;
type Handler = Arc<dyn Fn(Value, Context) -> NativeFuture + Send + Sync>;

/// Native handlers by name. A value, not a global: each embedding builds its own.
#[derive(Clone, Default)]
pub struct NativeRegistry {
    handlers: HashMap<String, Handler>,
}

impl std::fmt::Debug for NativeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeRegistry")
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl NativeRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` under `name`; a function with `runtime: native` finds it by its
    /// `handler` key, or by its own name when it has none.
    pub fn register<F, Fut>(&mut self, name: impl Into<String>, handler: F) -> &mut Self
    where
        F: Fn(Value, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, FunctionError>> + Send + 'static,
    {
        self.handlers.insert(
            name.into(),
            Arc::new(move |event, ctx| Box::pin(handler(event, ctx))),
        );
        self
    }

    pub fn contains(&self, name: &str) -> bool {
        self.handlers.contains_key(name)
    }

    pub(crate) fn get(&self, name: &str) -> Option<Handler> {
        self.handlers.get(name).cloned()
    }
}

pub(crate) struct NativeRunner {
    handler: Handler,
    function_name: String,
    memory_mb: u32,
    timeout: Duration,
}

impl NativeRunner {
    pub(crate) fn new(
        handler: Handler,
        function_name: String,
        memory_mb: u32,
        timeout: Duration,
    ) -> Self {
        Self {
            handler,
            function_name,
            memory_mb,
            timeout,
        }
    }

    pub(crate) async fn invoke(&self, inv: &Invocation, version: &str) -> Executed {
        let event: Value = match serde_json::from_slice(&inv.payload) {
            Ok(v) => v,
            Err(e) => {
                return Executed::failed(FunctionError::new(
                    "Runtime.InvalidEvent",
                    format!("event is not JSON: {e}"),
                ));
            }
        };
        let ctx = Context {
            request_id: inv.request_id.clone(),
            deadline: SystemTime::now() + self.timeout,
            invoked_function_arn: inv.invoked_arn.clone(),
            client_context: inv.client_context.clone(),
            trace_id: inv.trace_id.clone(),
            function_name: self.function_name.clone(),
            function_version: version.to_string(),
            memory_mb: self.memory_mb,
        };
        let call = AssertUnwindSafe((self.handler)(event, ctx)).catch_unwind();
        let result = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(FunctionError::timed_out(self.timeout)),
            Ok(Err(panic)) => Err(FunctionError::new(
                "Runtime.HandlerPanic",
                panic_message(panic.as_ref()),
            )),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok(value))) => serde_json::to_vec(&value)
                .map(Bytes::from)
                .map_err(|e| FunctionError::new("Runtime.InvalidResponse", e.to_string())),
        };
        Executed {
            result,
            output: Vec::new(),
            max_memory_bytes: None,
            init_duration: None,
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "handler panicked".to_string()
    }
}
