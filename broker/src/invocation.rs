//! What an invocation carries in and what comes back out, independent of the runtime.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Lambda's limit on a synchronous request or response payload.
pub const MAX_SYNC_PAYLOAD: usize = 6 * 1024 * 1024;

/// The region and account that ARNs are built with.
pub const REGION: &str = "us-east-1";
pub const ACCOUNT_ID: &str = "000000000000";

pub fn function_arn(name: &str) -> String {
    format!("arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{name}")
}

/// One invocation as the runtime sees it.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub request_id: String,
    pub payload: Bytes,
    /// The decoded client context (JSON text), as the Runtime API hands it on.
    pub client_context: Option<String>,
    pub cognito_identity: Option<String>,
    /// X-Ray style trace header (`Root=1-…;Parent=…;Sampled=0`).
    pub trace_id: String,
    /// The ARN the caller used, with its qualifier if it gave one.
    pub invoked_arn: String,
    /// The caller wants Lambda's log lines (START/END/REPORT): measuring peak memory for the
    /// REPORT line costs a read of the cgroup, so it is done only then.
    pub want_log: bool,
}

impl Invocation {
    pub fn new(payload: Bytes, invoked_arn: String) -> Self {
        Self {
            request_id: uuid::Uuid::new_v4().to_string(),
            payload,
            client_context: None,
            cognito_identity: None,
            trace_id: new_trace_id(),
            invoked_arn,
            want_log: false,
        }
    }
}

/// A trace header in the X-Ray format Lambda hands to functions.
pub fn new_trace_id() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // 24 hex digits for the root and 16 for the parent: 160 random bits, one UUID and a half.
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().as_u128() as u64;
    format!("Root=1-{secs:08x}-{};Parent={b:016x};Sampled=0", &a[..24])
}

/// A function error in the shape Lambda reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionError {
    #[serde(rename = "errorType")]
    pub error_type: String,
    #[serde(rename = "errorMessage")]
    pub error_message: String,
    #[serde(rename = "stackTrace", default, skip_serializing_if = "Vec::is_empty")]
    pub stack_trace: Vec<String>,
}

impl FunctionError {
    pub fn new(error_type: impl Into<String>, error_message: impl Into<String>) -> Self {
        Self {
            error_type: error_type.into(),
            error_message: error_message.into(),
            stack_trace: Vec::new(),
        }
    }

    pub fn to_json(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Reads an error body posted by a runtime. Runtimes post `{errorType, errorMessage,
    /// stackTrace}`, but the Runtime API accepts anything, so a body that is not of that shape
    /// is kept as the message.
    pub fn from_runtime_body(body: &[u8], header_type: Option<&str>) -> Self {
        #[derive(Deserialize)]
        struct Loose {
            #[serde(rename = "errorType")]
            error_type: Option<String>,
            #[serde(rename = "errorMessage")]
            error_message: Option<serde_json::Value>,
            #[serde(rename = "stackTrace", default)]
            stack_trace: serde_json::Value,
        }
        let fallback_type = header_type.unwrap_or("Unhandled").to_string();
        match serde_json::from_slice::<Loose>(body) {
            Ok(loose) => Self {
                error_type: loose.error_type.unwrap_or(fallback_type),
                error_message: match loose.error_message {
                    Some(serde_json::Value::String(s)) => s,
                    Some(other) => other.to_string(),
                    None => String::new(),
                },
                stack_trace: match loose.stack_trace {
                    serde_json::Value::Array(items) => items
                        .into_iter()
                        .map(|v| match v {
                            serde_json::Value::String(s) => s,
                            other => other.to_string(),
                        })
                        .collect(),
                    _ => Vec::new(),
                },
            },
            Err(_) => Self::new(fallback_type, String::from_utf8_lossy(body).into_owned()),
        }
    }

    pub fn timed_out(timeout: Duration) -> Self {
        Self::new(
            "Sandbox.Timedout",
            format!("Task timed out after {:.2} seconds", timeout.as_secs_f64()),
        )
    }
}

/// What a runtime returns for one invocation.
#[derive(Debug)]
pub struct Executed {
    pub result: Result<Bytes, FunctionError>,
    /// The function's own output during this invocation (stdout and stderr).
    pub output: Vec<u8>,
    /// Peak memory of the environment, when the runtime can measure it.
    pub max_memory_bytes: Option<u64>,
    /// Time spent starting a new environment for this invocation, if one was started.
    pub init_duration: Option<Duration>,
}

impl Executed {
    pub fn failed(error: FunctionError) -> Self {
        Self {
            result: Err(error),
            output: Vec::new(),
            max_memory_bytes: None,
            init_duration: None,
        }
    }
}
