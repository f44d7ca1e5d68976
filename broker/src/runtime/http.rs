//! `runtime: http`: POST the event to a URL; the response body is the result.

use std::time::Duration;

use crate::invocation::{Executed, FunctionError, Invocation};

pub(crate) struct HttpRunner {
    client: reqwest::Client,
    url: String,
    timeout: Duration,
}

impl HttpRunner {
    pub(crate) fn new(url: String, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Self {
            client,
            url,
            timeout,
        })
    }

    pub(crate) async fn invoke(&self, inv: &Invocation) -> Executed {
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("lambda-runtime-aws-request-id", &inv.request_id)
            .header("lambda-runtime-invoked-function-arn", &inv.invoked_arn)
            .header("lambda-runtime-trace-id", &inv.trace_id)
            .body(inv.payload.clone());
        if let Some(cc) = &inv.client_context {
            request = request.header("lambda-runtime-client-context", cc);
        }
        let result = match request.send().await {
            Err(e) if e.is_timeout() => Err(FunctionError::timed_out(self.timeout)),
            Err(e) => Err(FunctionError::new(
                "Runtime.HttpError",
                format!("POST {} failed: {e}", self.url),
            )),
            Ok(response) => {
                let status = response.status();
                match response.bytes().await {
                    Err(e) if e.is_timeout() => Err(FunctionError::timed_out(self.timeout)),
                    Err(e) => Err(FunctionError::new(
                        "Runtime.HttpError",
                        format!("reading the response of {} failed: {e}", self.url),
                    )),
                    Ok(body) if status.is_success() => Ok(body),
                    Ok(body) => Err(FunctionError::new(
                        "Runtime.HttpError",
                        format!(
                            "POST {} returned {status}: {}",
                            self.url,
                            String::from_utf8_lossy(&body[..body.len().min(1024)])
                        ),
                    )),
                }
            }
        };
        Executed {
            result,
            output: Vec::new(),
            max_memory_bytes: None,
            init_duration: None,
        }
    }
}
