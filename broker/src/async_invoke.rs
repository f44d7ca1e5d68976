//! Asynchronous invocation (`X-Amz-Invocation-Type: Event`): an accepted event is on disk
//! before the caller hears 202, and leaves the queue only when its outcome is final: the
//! function succeeded, or the failure was delivered to the function's `on_failure`
//! destination (or dropped and counted when it has none). A crash at any instant loses
//! nothing: on restart every queued event is tried again. Events of a function the
//! configuration no longer declares are kept, named in a warning and counted in a gauge.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_plugins::DeadLetterSink;
use thiserror::Error;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::function::{Function, Functions};
use crate::invocation::{FunctionError, Invocation, new_trace_id};
use crate::metrics as m;
use crate::state::{AttemptRecord, QueuedEvent, StateStore};

/// Invocations of one function running at once from the queue, at most.
const MAX_IN_FLIGHT: usize = 64;
/// Events written to the store in one transaction, at most.
const MAX_BATCH: usize = 512;
/// How long a throttled event waits before its next try; throttles spend no retries.
const THROTTLE_BACKOFF: Duration = Duration::from_millis(500);
/// How long an undeliverable failure waits before its destination is tried again.
const DESTINATION_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum AcceptError {
    #[error("cannot queue the event: {0}")]
    Store(String),
    #[error("the asynchronous queue is stopping")]
    Stopping,
}

/// Why an event was given up, as Lambda names it in destination records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    RetriesExhausted,
    EventAgeExceeded,
    Success,
}

impl Condition {
    fn as_str(self) -> &'static str {
        match self {
            Self::RetriesExhausted => "RetriesExhausted",
            Self::EventAgeExceeded => "EventAgeExceeded",
            Self::Success => "Success",
        }
    }
}

/// A change to the queue, made durable together with whatever else is waiting.
enum Write {
    Insert(QueuedEvent),
    Remove(String),
}

struct Accept {
    write: Write,
    done: oneshot::Sender<Result<(), String>>,
}

pub struct AsyncQueue {
    store: Arc<dyn StateStore>,
    functions: Arc<Functions>,
    dead_letters: HashMap<String, Arc<dyn DeadLetterSink>>,
    writer: mpsc::Sender<Accept>,
    wakers: HashMap<String, Arc<Notify>>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl AsyncQueue {
    /// Starts one worker per function, which run until `stop`, and the batching writer, which
    /// runs as long as the queue can be written to (the returned handle; abort it last).
    pub fn start(
        store: Arc<dyn StateStore>,
        functions: Arc<Functions>,
        dead_letters: HashMap<String, Arc<dyn DeadLetterSink>>,
        stop: CancellationToken,
    ) -> (Arc<Self>, JoinHandle<()>, Vec<JoinHandle<()>>) {
        let (writer, rx) = mpsc::channel(MAX_BATCH * 4);
        let wakers: HashMap<String, Arc<Notify>> = functions
            .names()
            .map(|n| (n.to_string(), Arc::new(Notify::new())))
            .collect();
        let queue = Arc::new(Self {
            store,
            functions,
            dead_letters,
            writer,
            wakers,
        });
        let writer = tokio::spawn(queue.clone().write_batches(rx));
        let mut workers: Vec<JoinHandle<()>> = queue
            .functions
            .all()
            .map(|f| tokio::spawn(queue.clone().work(f.clone(), stop.clone())))
            .collect();
        workers.push(tokio::spawn(queue.clone().report_orphans()));
        (queue, writer, workers)
    }

    /// Events queued for a function the configuration no longer declares have no worker.
    /// They are kept, not dropped: removing a function from the file is often a mistake or a
    /// rename, and declaring it again delivers them (its `on_failure`, the only place they
    /// could be dead-lettered to, went with it). So that they do not wait unseen, each such
    /// function is named in a warning and counted in a gauge.
    async fn report_orphans(self: Arc<Self>) {
        let counts = match self.store.queued_by_function().await {
            Ok(counts) => counts,
            Err(e) => {
                tracing::error!(error = %e, "cannot count the asynchronous queue's events");
                return;
            }
        };
        for (function, events) in counts {
            if self.functions.get(&function).is_some() {
                continue;
            }
            metrics::gauge!(m::ASYNC_ORPHANED_EVENTS, "function" => function.clone())
                .set(events as f64);
            tracing::warn!(%function, events, "asynchronous events are queued for a function the configuration does not declare; they are kept and delivered once it is declared again");
        }
    }

    pub fn functions(&self) -> &Arc<Functions> {
        &self.functions
    }

    /// Queues an event durably and returns its request id.
    pub async fn accept(
        &self,
        function: &str,
        qualifier: Option<String>,
        payload: Bytes,
        trace_id: Option<String>,
    ) -> Result<String, AcceptError> {
        let now = now_ms();
        let event = QueuedEvent {
            id: uuid::Uuid::new_v4().to_string(),
            function: function.to_string(),
            qualifier,
            payload: payload.to_vec(),
            trace_id: trace_id.unwrap_or_else(new_trace_id),
            received_at_ms: now,
            next_attempt_ms: now,
            attempts: Vec::new(),
        };
        let id = event.id.clone();
        let (done, wait) = oneshot::channel();
        self.writer
            .send(Accept {
                write: Write::Insert(event),
                done,
            })
            .await
            .map_err(|_| AcceptError::Stopping)?;
        match wait.await {
            Ok(Ok(())) => {
                metrics::counter!(m::ASYNC_EVENTS_RECEIVED, "function" => function.to_string())
                    .increment(1);
                Ok(id)
            }
            Ok(Err(e)) => Err(AcceptError::Store(e)),
            Err(_) => Err(AcceptError::Stopping),
        }
    }

    /// Group commit: whatever arrived while the last transaction was on its way to disk (new
    /// events, finished ones) goes into the next one, so one fsync serves many callers.
    async fn write_batches(self: Arc<Self>, mut rx: mpsc::Receiver<Accept>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let mut inserts = Vec::new();
            let mut removes = Vec::new();
            for accept in &batch {
                match &accept.write {
                    Write::Insert(e) => inserts.push(e.clone()),
                    Write::Remove(id) => removes.push(id.clone()),
                }
            }
            let result = self
                .store
                .apply(&inserts, &removes)
                .await
                .map_err(|e| e.to_string());
            if let Err(e) = &result {
                tracing::error!(error = %e, events = inserts.len(), finished = removes.len(), "cannot write the asynchronous queue");
            }
            let mut touched = HashSet::new();
            for accept in batch.drain(..) {
                if let Write::Insert(e) = &accept.write {
                    touched.insert(e.function.clone());
                }
                let _ = accept.done.send(result.clone());
            }
            if result.is_ok() {
                for f in touched {
                    self.wake(&f);
                }
            }
        }
    }

    fn wake(&self, function: &str) {
        if let Some(w) = self.wakers.get(function) {
            w.notify_one();
        }
    }

    async fn work(self: Arc<Self>, f: Arc<Function>, stop: CancellationToken) {
        let wake = self.wakers.get(&f.name).cloned().unwrap_or_default();
        let mut in_flight: HashSet<String> = HashSet::new();
        let mut tasks: JoinSet<String> = JoinSet::new();
        while !stop.is_cancelled() {
            let now = now_ms();
            let room = MAX_IN_FLIGHT
                .saturating_sub(tasks.len())
                .min(f.available_concurrency() as usize);
            let mut wait = Duration::from_secs(5);
            if room > 0 {
                match self
                    .store
                    .due(&f.name, now, (room + in_flight.len()) as u32)
                    .await
                {
                    Ok(events) => {
                        let fresh: Vec<QueuedEvent> = events
                            .into_iter()
                            .filter(|e| !in_flight.contains(&e.id))
                            .take(room)
                            .collect();
                        for e in fresh {
                            in_flight.insert(e.id.clone());
                            tasks.spawn(self.clone().process(f.clone(), e));
                        }
                    }
                    Err(e) => {
                        tracing::error!(function = %f.name, error = %e, "cannot read the asynchronous queue");
                        wait = Duration::from_secs(1);
                    }
                }
                if let Ok(Some(next)) = self.store.next_due(&f.name, now).await {
                    wait = wait.min(Duration::from_millis(
                        u64::try_from(next - now).unwrap_or(0),
                    ));
                }
            } else if tasks.is_empty() {
                // Every slot is taken by synchronous callers: look again soon.
                wait = THROTTLE_BACKOFF;
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = wake.notified() => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok(id) = done {
                        in_flight.remove(&id);
                    }
                    while let Some(Ok(id)) = tasks.try_join_next() {
                        in_flight.remove(&id);
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Graceful stop: what runs may finish; what waits stays queued for the next start.
        while tasks.join_next().await.is_some() {}
    }

    async fn process(self: Arc<Self>, f: Arc<Function>, mut e: QueuedEvent) -> String {
        let id = e.id.clone();
        let config = &f.config;
        let now = now_ms();
        if e.attempts.last().is_some_and(|a| a.error_type.is_none()) {
            // The function already succeeded; only its on_success record is still owed.
            if let Some(dest) = &config.on_success {
                let version = e
                    .attempts
                    .last()
                    .map(|a| a.executed_version.clone())
                    .unwrap_or_default();
                let record = self.record(
                    &f,
                    &e,
                    Condition::Success,
                    &version,
                    Ok(&Bytes::from_static(b"null")),
                );
                if !self.deliver(&f, dest, record).await {
                    self.reschedule(&e, now_ms() + DESTINATION_BACKOFF.as_millis() as i64)
                        .await;
                    return id;
                }
            }
            self.remove(&e).await;
            return id;
        }
        let age = Duration::from_millis(u64::try_from(now - e.received_at_ms).unwrap_or(0));
        let given_up = if e.attempts.len() > config.max_retry_attempts as usize {
            Some(Condition::RetriesExhausted)
        } else if age > config.max_event_age {
            Some(Condition::EventAgeExceeded)
        } else {
            None
        };
        if let Some(condition) = given_up {
            self.finish_failed(&f, &e, condition).await;
            return id;
        }
        let Some(instance) = f.resolve(e.qualifier.as_deref()) else {
            e.attempts.push(AttemptRecord {
                time: rfc3339(now),
                executed_version: String::new(),
                error_type: Some("ResourceNotFoundException".into()),
                error_message: Some(format!(
                    "qualifier {} of {} no longer exists",
                    e.qualifier.as_deref().unwrap_or("$LATEST"),
                    f.name
                )),
                duration_ms: 0.0,
            });
            self.finish_failed(&f, &e, Condition::RetriesExhausted)
                .await;
            return id;
        };
        metrics::histogram!(m::ASYNC_EVENT_AGE, "function" => f.name.clone())
            .record(age.as_secs_f64());
        let invoked_arn = match &e.qualifier {
            Some(q) => format!("{}:{q}", f.arn),
            None => f.arn.clone(),
        };
        let inv = Invocation {
            request_id: e.id.clone(),
            payload: Bytes::from(e.payload.clone()),
            client_context: None,
            cognito_identity: None,
            trace_id: e.trace_id.clone(),
            invoked_arn,
            want_log: false,
        };
        let outcome = match f.invoke(&instance, inv).await {
            Ok(o) => o,
            Err(_throttled) => {
                self.reschedule(&e, now_ms() + THROTTLE_BACKOFF.as_millis() as i64)
                    .await;
                return id;
            }
        };
        let attempt = AttemptRecord {
            time: rfc3339(now),
            executed_version: outcome.executed_version.clone(),
            error_type: outcome.result.as_ref().err().map(|x| x.error_type.clone()),
            error_message: outcome
                .result
                .as_ref()
                .err()
                .map(|x| x.error_message.clone()),
            duration_ms: outcome.duration.as_secs_f64() * 1000.0,
        };
        e.attempts.push(attempt);
        match &outcome.result {
            Ok(response) => {
                if let Some(dest) = &config.on_success {
                    let record = self.record(
                        &f,
                        &e,
                        Condition::Success,
                        &outcome.executed_version,
                        Ok(response),
                    );
                    if !self.deliver(&f, dest, record).await {
                        // The function ran; only the success record is owed. Keep the event so
                        // the record is written later, without running the function again.
                        self.reschedule(&e, now_ms() + DESTINATION_BACKOFF.as_millis() as i64)
                            .await;
                        return id;
                    }
                }
                self.remove(&e).await;
            }
            Err(error) => {
                let tries = e.attempts.len();
                if tries > config.max_retry_attempts as usize {
                    let record = self.record(
                        &f,
                        &e,
                        Condition::RetriesExhausted,
                        &outcome.executed_version,
                        Err(error),
                    );
                    self.give_up(&f, &e, record).await;
                } else {
                    metrics::counter!(m::ASYNC_RETRIES, "function" => f.name.clone()).increment(1);
                    let delay = config.retry_delay.saturating_mul(1 << (tries - 1).min(16));
                    self.reschedule(&e, now_ms() + delay.as_millis() as i64)
                        .await;
                }
            }
        }
        id
    }

    /// Gives an event up after it was picked from the queue already past its limits.
    async fn finish_failed(&self, f: &Function, e: &QueuedEvent, condition: Condition) {
        let last = e.attempts.last();
        let version = last.map(|a| a.executed_version.clone()).unwrap_or_default();
        let error = FunctionError::new(
            last.and_then(|a| a.error_type.clone()).unwrap_or_default(),
            last.and_then(|a| a.error_message.clone())
                .unwrap_or_default(),
        );
        let record = self.record(f, e, condition, &version, Err(&error));
        self.give_up(f, e, record).await;
    }

    async fn give_up(&self, f: &Function, e: &QueuedEvent, record: serde_json::Value) {
        match &f.config.on_failure {
            Some(dest) => {
                if self.deliver(f, dest, record).await {
                    self.remove(e).await;
                } else {
                    self.reschedule(e, now_ms() + DESTINATION_BACKOFF.as_millis() as i64)
                        .await;
                }
            }
            None => {
                metrics::counter!(m::ASYNC_EVENTS_DROPPED, "function" => f.name.clone())
                    .increment(1);
                tracing::warn!(function = %f.name, request_id = %e.id, attempts = e.attempts.len(),
                    "asynchronous event given up and dropped: the function has no on_failure destination");
                self.remove(e).await;
            }
        }
    }

    /// Writes a record to a dead letter, or queues it for a destination function. Returns
    /// whether it is durably delivered.
    async fn deliver(&self, f: &Function, destination: &str, record: serde_json::Value) -> bool {
        let labels = [
            ("function", f.name.clone()),
            ("destination", destination.to_string()),
        ];
        let result = if let Some(sink) = self.dead_letters.get(destination) {
            sink.write(&record).await.map_err(|e| e.to_string())
        } else if self.functions.get(destination).is_some() {
            let payload = Bytes::from(serde_json::to_vec(&record).unwrap_or_default());
            let trace = record["sluice"]["traceId"].as_str().map(str::to_string);
            self.accept(destination, None, payload, trace)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            Err(format!("no destination named `{destination}`"))
        };
        match result {
            Ok(()) => {
                metrics::counter!(m::DEAD_LETTERS_WRITTEN, &labels).increment(1);
                true
            }
            Err(error) => {
                metrics::counter!(m::DEAD_LETTER_ERRORS, &labels).increment(1);
                tracing::error!(function = %f.name, destination, %error,
                    "cannot deliver to the destination; the event stays queued and delivery is retried");
                false
            }
        }
    }

    /// Lambda's destination record, plus the whole story under `sluice`.
    fn record(
        &self,
        f: &Function,
        e: &QueuedEvent,
        condition: Condition,
        executed_version: &str,
        result: Result<&Bytes, &FunctionError>,
    ) -> serde_json::Value {
        let request_payload = serde_json::from_slice::<serde_json::Value>(&e.payload)
            .unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&e.payload).into_owned())
            });
        let (response_context, response_payload) = match result {
            Ok(body) => (
                serde_json::json!({"statusCode": 200, "executedVersion": executed_version}),
                serde_json::from_slice(body).unwrap_or(serde_json::Value::Null),
            ),
            Err(error) => (
                serde_json::json!({"statusCode": 200, "executedVersion": executed_version, "functionError": "Unhandled"}),
                serde_json::to_value(error).unwrap_or_default(),
            ),
        };
        let qualifier = e
            .qualifier
            .clone()
            .unwrap_or_else(|| crate::function::LATEST.to_string());
        serde_json::json!({
            "version": "1.0",
            "timestamp": rfc3339(now_ms()),
            "requestContext": {
                "requestId": e.id,
                "functionArn": format!("{}:{qualifier}", f.arn),
                "condition": condition.as_str(),
                "approximateInvokeCount": e.attempts.len(),
            },
            "requestPayload": request_payload,
            "responseContext": response_context,
            "responsePayload": response_payload,
            "sluice": {
                "source": "async",
                "function": f.name,
                "qualifier": qualifier,
                "executedVersion": executed_version,
                "traceId": e.trace_id,
                "receivedAt": rfc3339(e.received_at_ms),
                "reason": condition.as_str(),
                "attempts": e.attempts,
            },
        })
    }

    async fn reschedule(&self, e: &QueuedEvent, at_ms: i64) {
        if let Err(error) = self.store.reschedule(&e.id, &e.attempts, at_ms).await {
            // The event keeps its old schedule and is tried again; nothing is lost.
            tracing::error!(request_id = %e.id, %error, "cannot reschedule an asynchronous event");
        }
    }

    /// Forgets a finished event. The worker keeps the event out of its next reads until this
    /// returns, so the removal rides a group commit without the event running twice.
    async fn remove(&self, e: &QueuedEvent) {
        let (done, wait) = oneshot::channel();
        let sent = self
            .writer
            .send(Accept {
                write: Write::Remove(e.id.clone()),
                done,
            })
            .await;
        let result = match sent {
            Ok(()) => wait
                .await
                .unwrap_or_else(|_| Err("the queue writer stopped".to_string())),
            Err(_) => Err("the queue writer stopped".to_string()),
        };
        if let Err(error) = result {
            // Its outcome is final but still on record: it will run again (at least once).
            tracing::error!(request_id = %e.id, %error, "cannot remove a finished asynchronous event");
        }
    }
}

impl sluice_connectors::Dispatch for AsyncQueue {
    fn invoke<'a>(
        &'a self,
        function: &'a str,
        payload: Bytes,
    ) -> sluice_connectors::DispatchFuture<'a> {
        self.functions.invoke(function, payload)
    }

    fn invoke_async<'a>(
        &'a self,
        function: &'a str,
        payload: Bytes,
    ) -> sluice_connectors::DispatchFuture<'a, String> {
        use sluice_connectors::DispatchError;
        Box::pin(async move {
            let (name, qualifier) = match function.split_once(':') {
                Some((n, q)) => (n, Some(q.to_string())),
                None => (function, None),
            };
            let f = self
                .functions
                .get(name)
                .filter(|f| f.resolve(qualifier.as_deref()).is_some())
                .ok_or_else(|| DispatchError::NotFound(function.to_string()))?;
            self.accept(&f.name, qualifier, payload, None)
                .await
                .map_err(|e| DispatchError::Function {
                    error_type: "ServiceException".into(),
                    message: e.to_string(),
                })
        })
    }
}
