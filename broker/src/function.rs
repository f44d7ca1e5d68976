//! Functions as the rest of Sluice sees them: a runtime behind a concurrency limit, with
//! metrics and Lambda's log lines around every invocation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics::{Counter, Gauge, Histogram};
use sluice_config::{Config, ConfigError, FunctionConfig, Runtime};
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::invocation::{FunctionError, Invocation, REGION, function_arn};
use crate::metrics as m;
use crate::runtime::memory::MemoryCap;
use crate::runtime::native::{NativeRegistry, NativeRunner};
use crate::runtime::package::{self, SizeLimits};
use crate::runtime::process::{ProcessRunner, ProcessSpec};
use crate::runtime::{Runner, http::HttpRunner};

pub const LATEST: &str = "$LATEST";

/// Why an invocation was refused before it ran.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Throttle {
    #[error("Rate Exceeded.")]
    Reserved,
    #[error("Rate Exceeded.")]
    Account,
}

impl Throttle {
    /// The `Reason` field Lambda puts in a `TooManyRequestsException`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Reserved => "ReservedFunctionConcurrentInvocationLimitExceeded",
            Self::Account => "ConcurrentInvocationLimitExceeded",
        }
    }
}

/// The result of one invocation that ran.
#[derive(Debug)]
pub struct InvokeOutcome {
    pub request_id: String,
    pub result: Result<Bytes, FunctionError>,
    /// Lambda's log for this invocation: START, the function's output, END and REPORT.
    pub log: Vec<u8>,
    pub duration: Duration,
    pub executed_version: String,
}

struct FunctionMetrics {
    invocations: Counter,
    errors: Counter,
    throttles: Counter,
    duration: Histogram,
    concurrent: Gauge,
}

impl FunctionMetrics {
    fn new(name: &str, version: &str) -> Self {
        let labels = [("function", name.to_string()), ("version", version.to_string())];
        Self {
            invocations: metrics::counter!(m::FUNCTION_INVOCATIONS, &labels),
            errors: metrics::counter!(m::FUNCTION_ERRORS, &labels),
            throttles: metrics::counter!(m::FUNCTION_THROTTLES, &labels),
            duration: metrics::histogram!(m::FUNCTION_DURATION, &labels),
            concurrent: metrics::gauge!(m::FUNCTION_CONCURRENT_EXECUTIONS, &labels),
        }
    }
}

pub struct Function {
    pub name: String,
    pub arn: String,
    pub version: String,
    pub config: FunctionConfig,
    runner: Runner,
    reserved: Option<Arc<Semaphore>>,
    unreserved: Arc<Semaphore>,
    metrics: FunctionMetrics,
}

impl Function {
    /// Runs one invocation, or refuses it when a concurrency limit is reached.
    pub async fn invoke(&self, inv: Invocation) -> Result<InvokeOutcome, Throttle> {
        let _permit = self.acquire().inspect_err(|_| self.metrics.throttles.increment(1))?;
        self.metrics.concurrent.increment(1.0);
        let started = Instant::now();
        let executed = self.runner.invoke(&inv, &self.version).await;
        let elapsed = started.elapsed();
        self.metrics.concurrent.decrement(1.0);
        let duration = elapsed.saturating_sub(executed.init_duration.unwrap_or_default());
        self.metrics.invocations.increment(1);
        self.metrics.duration.record(duration.as_secs_f64());
        if let Err(e) = &executed.result {
            self.metrics.errors.increment(1);
            tracing::warn!(function = %self.name, request_id = %inv.request_id,
                error_type = %e.error_type, error = %e.error_message, "invocation failed");
        }
        for line in String::from_utf8_lossy(&executed.output).lines() {
            tracing::info!(function = %self.name, request_id = %inv.request_id, "{line}");
        }
        let log = lambda_log(
            &inv.request_id,
            &self.version,
            &executed.output,
            duration,
            self.config.memory_mb,
            executed.max_memory_bytes,
            executed.init_duration,
        );
        Ok(InvokeOutcome {
            request_id: inv.request_id,
            result: executed.result,
            log,
            duration,
            executed_version: self.version.clone(),
        })
    }

    /// A function with reserved concurrency runs only within its reservation; the others
    /// share what is left of the account's limit.
    fn acquire(&self) -> Result<OwnedSemaphorePermit, Throttle> {
        match &self.reserved {
            Some(reserved) => reserved
                .clone()
                .try_acquire_owned()
                .map_err(|_| Throttle::Reserved),
            None => self
                .unreserved
                .clone()
                .try_acquire_owned()
                .map_err(|_| Throttle::Account),
        }
    }

    fn shutdown(&self) {
        self.runner.shutdown();
    }
}

/// Lambda's log lines around a function's own output.
fn lambda_log(
    request_id: &str,
    version: &str,
    output: &[u8],
    duration: Duration,
    memory_mb: u32,
    max_memory_bytes: Option<u64>,
    init_duration: Option<Duration>,
) -> Vec<u8> {
    let mut log = Vec::with_capacity(output.len() + 256);
    log.extend_from_slice(format!("START RequestId: {request_id} Version: {version}\n").as_bytes());
    log.extend_from_slice(output);
    if !output.is_empty() && !output.ends_with(b"\n") {
        log.push(b'\n');
    }
    log.extend_from_slice(format!("END RequestId: {request_id}\n").as_bytes());
    let ms = duration.as_secs_f64() * 1000.0;
    let billed = ms.ceil().max(1.0) as u64;
    let used_mb = max_memory_bytes.map_or(0, |b| b.div_ceil(1024 * 1024));
    let mut report = format!(
        "REPORT RequestId: {request_id}\tDuration: {ms:.2} ms\tBilled Duration: {billed} ms\tMemory Size: {memory_mb} MB\tMax Memory Used: {used_mb} MB\t"
    );
    if let Some(init) = init_duration {
        report.push_str(&format!(
            "Init Duration: {:.2} ms\t",
            init.as_secs_f64() * 1000.0
        ));
    }
    report.push('\n');
    log.extend_from_slice(report.as_bytes());
    log
}

/// Why the functions of a configuration could not be built.
#[derive(Debug, Error)]
#[error("{}", .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct BuildError {
    pub errors: Vec<ConfigError>,
}

/// All functions of a configuration, by name.
pub struct Functions {
    by_name: HashMap<String, Arc<Function>>,
    account_limit: u32,
}

impl Functions {
    /// Builds every function, reporting all problems together: missing packages, unknown
    /// native handlers, concurrency reservations that leave too little unreserved.
    pub fn build(
        config: &Config,
        native: &NativeRegistry,
        data_dir: &Path,
    ) -> Result<Self, BuildError> {
        let memory = MemoryCap::detect();
        tracing::debug!(memory = %memory.describe(), "memory caps");
        let mut errors = Vec::new();
        let reserved_total: u64 = config
            .functions
            .values()
            .filter_map(|f| f.reserved_concurrency)
            .map(u64::from)
            .sum();
        let limit = config.concurrency.limit;
        let max_reservable = limit.saturating_sub(100);
        if reserved_total > u64::from(max_reservable) {
            for (name, f) in &config.functions {
                if f.reserved_concurrency.is_some_and(|r| r > 0) {
                    errors.push(config.error_at(
                        &format!("functions.{name}.reserved_concurrency"),
                        format!("reservations add up to {reserved_total}, but at most {max_reservable} of concurrency.limit {limit} can be reserved: 100 stay unreserved"),
                    ));
                }
            }
        }
        let unreserved = Arc::new(Semaphore::new(
            (u64::from(limit) - reserved_total.min(u64::from(limit))) as usize,
        ));
        let limits = SizeLimits {
            zipped: config.limits.package_zipped,
            unpacked: config.limits.package_unpacked,
        };
        let mut by_name = HashMap::new();
        for (name, fc) in &config.functions {
            let at = |field: &str| format!("functions.{name}.{field}");
            let runner = match fc.runtime {
                Runtime::Process => {
                    let Some(pkg) = &fc.package else {
                        errors.push(config.error_at(&format!("functions.{name}"), "missing field `package` (required for runtime `process`)"));
                        continue;
                    };
                    let task_root =
                        match package::prepare(pkg, limits, &data_dir.join("packages")) {
                            Ok(dir) => dir,
                            Err(e) => {
                                errors.push(config.error_at(&at("package"), e.to_string()));
                                continue;
                            }
                        };
                    let argv = fc
                        .command
                        .clone()
                        .unwrap_or_else(|| vec!["./bootstrap".to_string()]);
                    let spec = ProcessSpec {
                        function_name: name.clone(),
                        version: LATEST.to_string(),
                        memory_mb: fc.memory_mb,
                        timeout: fc.timeout,
                        task_root,
                        argv,
                        handler: fc.handler.clone().unwrap_or_default(),
                        environment: fc.environment.clone(),
                        region: REGION.to_string(),
                    };
                    Runner::Process(ProcessRunner::new(spec, memory.clone()))
                }
                Runtime::Http => {
                    let Some(url) = &fc.url else {
                        errors.push(config.error_at(&format!("functions.{name}"), "missing field `url` (required for runtime `http`)"));
                        continue;
                    };
                    match HttpRunner::new(url.clone(), fc.timeout) {
                        Ok(r) => Runner::Http(r),
                        Err(e) => {
                            errors.push(config.error_at(&at("url"), format!("cannot build an HTTP client: {e}")));
                            continue;
                        }
                    }
                }
                Runtime::Native => {
                    let handler = fc.handler.clone().unwrap_or_else(|| name.clone());
                    match native.get(&handler) {
                        Some(h) => Runner::Native(NativeRunner::new(
                            h,
                            name.clone(),
                            fc.memory_mb,
                            fc.timeout,
                        )),
                        None => {
                            errors.push(config.error_at(
                                &if fc.handler.is_some() { at("handler") } else { format!("functions.{name}") },
                                format!("no native handler named `{handler}` is registered"),
                            ));
                            continue;
                        }
                    }
                }
            };
            let reserved = fc
                .reserved_concurrency
                .map(|r| Arc::new(Semaphore::new(r as usize)));
            by_name.insert(
                name.clone(),
                Arc::new(Function {
                    name: name.clone(),
                    arn: function_arn(name),
                    version: LATEST.to_string(),
                    config: fc.clone(),
                    runner,
                    reserved,
                    unreserved: unreserved.clone(),
                    metrics: FunctionMetrics::new(name, LATEST),
                }),
            );
        }
        if errors.is_empty() {
            Ok(Self {
                by_name,
                account_limit: limit,
            })
        } else {
            Err(BuildError { errors })
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Function>> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn account_limit(&self) -> u32 {
        self.account_limit
    }

    /// Retires every idle execution environment.
    pub fn shutdown(&self) {
        for f in self.by_name.values() {
            f.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_has_lambdas_lines_around_the_output() {
        let log = lambda_log(
            "abc",
            "$LATEST",
            b"hello\nworld",
            Duration::from_micros(1500),
            128,
            Some(20 * 1024 * 1024),
            Some(Duration::from_millis(12)),
        );
        let text = String::from_utf8(log).expect("utf8");
        assert_eq!(
            text,
            "START RequestId: abc Version: $LATEST\nhello\nworld\nEND RequestId: abc\nREPORT RequestId: abc\tDuration: 1.50 ms\tBilled Duration: 2 ms\tMemory Size: 128 MB\tMax Memory Used: 20 MB\tInit Duration: 12.00 ms\t\n"
        );
    }
}

impl sluice_connectors::Dispatch for Functions {
    fn invoke<'a>(
        &'a self,
        function: &'a str,
        payload: Bytes,
    ) -> sluice_connectors::DispatchFuture<'a> {
        use sluice_connectors::DispatchError;
        Box::pin(async move {
            let (name, qualifier) = match function.split_once(':') {
                Some((n, q)) => (n, Some(q)),
                None => (function, None),
            };
            let f = match self.get(name) {
                Some(f) if qualifier.is_none_or(|q| q == LATEST) => f,
                _ => return Err(DispatchError::NotFound(function.to_string())),
            };
            let arn = match qualifier {
                Some(q) => format!("{}:{q}", f.arn),
                None => f.arn.clone(),
            };
            let outcome = f
                .invoke(Invocation::new(payload, arn))
                .await
                .map_err(|t| DispatchError::Throttled(t.reason().to_string()))?;
            outcome.result.map_err(|e| DispatchError::Function {
                error_type: e.error_type,
                message: e.error_message,
            })
        })
    }
}
