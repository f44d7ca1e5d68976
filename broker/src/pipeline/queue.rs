//! Driving a queue (SQS, RabbitMQ) through a mapping: gather a batch, invoke, then settle
//! each message by its outcome. A message is acknowledged only when its outcome is final.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sluice_connectors::queue::{Delivery, QueueSource, Redelivery};
use sluice_connectors::record::Record;

use super::{Attempt, BatchResult, BatchSource, Envelope, GiveUp, Mapping};
use crate::metrics as m;

/// How long one receive call may wait for the first message of a batch (SQS long polling).
const LONG_POLL: Duration = Duration::from_secs(20);
/// How often a running batch's messages are kept from other consumers when the source has no
/// visibility timeout to go by.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// The shortest interval between two keep-alives of one batch, so that a zero visibility
/// timeout does not turn the keep-alive into a busy loop.
const KEEP_ALIVE_MIN: Duration = Duration::from_millis(100);

/// When a batch's messages must next be kept from other consumers. A received message stays
/// hidden for the visibility timeout counted from some instant after its receive was sent
/// (the server's clock, unknown here), so every deadline is counted from when the receive
/// (or the last extension) was *sent*: that is never later than the server's own start, and
/// a long poll that waited most of the timeout cannot make an extension come too late. An
/// extension is due after a third of the visibility timeout, well before half of it passed,
/// which leaves the call time to arrive.
struct Lease {
    every: Duration,
    next: Option<Instant>,
}

impl Lease {
    fn new(source: &dyn QueueSource) -> Self {
        let every = source
            .visibility_timeout()
            .map_or(KEEP_ALIVE, |timeout| (timeout / 3).max(KEEP_ALIVE_MIN));
        Self { every, next: None }
    }

    /// The first messages of a batch came from a receive sent at `sent`.
    fn start(&mut self, sent: Instant) {
        self.next.get_or_insert(sent + self.every);
    }

    /// How long until the next extension is due (zero when overdue); `None` before the
    /// batch has messages.
    fn due_in(&self) -> Option<Duration> {
        self.next
            .map(|next| next.saturating_duration_since(Instant::now()))
    }

    /// Extends the visibility of `deliveries` now and schedules the next extension.
    async fn extend(
        &mut self,
        mapping: &Mapping,
        source: &dyn QueueSource,
        deliveries: &[&Delivery],
    ) {
        let sent = Instant::now();
        self.next = Some(sent + self.every);
        let (not_kept, error) = match source.keep_alive(deliveries).await {
            Ok(not_kept) if not_kept.is_empty() => return,
            Ok(not_kept) => {
                let first = not_kept
                    .first()
                    .map(|n| format!("{}: {}: {}", n.id, n.code, n.message));
                (not_kept.len(), first.unwrap_or_default())
            }
            Err(e) => (deliveries.len(), e.to_string()),
        };
        let [s, f] = [
            ("source", mapping.name.clone()),
            ("function", mapping.function.clone()),
        ];
        metrics::counter!(m::MAPPING_VISIBILITY_EXTENSION_FAILURES, &[s, f])
            .increment(not_kept as u64);
        tracing::warn!(source = %mapping.name, messages = not_kept, of = deliveries.len(), error = %error, "cannot extend the messages' visibility; another consumer may receive them");
    }
}

/// Why a mapping cannot start, in Lambda's words: a queue that would hand a message to
/// another consumer before the function's timeout ends is refused, as Lambda refuses to
/// create such a mapping (CreateEventSourceMapping's InvalidParameterValueException).
fn refusal(mapping: &Mapping, source: &dyn QueueSource) -> Option<String> {
    let visibility = source.visibility_timeout()?;
    let timeout = function_timeout(mapping)?;
    (visibility < timeout).then(|| {
        format!(
            "Queue visibility timeout: {} seconds is less than Function timeout: {} seconds",
            seconds(visibility),
            seconds(timeout)
        )
    })
}

/// Whole seconds as Lambda writes them; a fraction only when there is one.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        d.as_secs().to_string()
    } else {
        format!("{}", d.as_secs_f64())
    }
}

/// The longest timeout among the versions the mapping's function name may run: the
/// qualified version, or for an alias its version and its weighted one. `None` when the
/// function is not declared (invocations then fail on their own, with its name).
fn function_timeout(mapping: &Mapping) -> Option<Duration> {
    let (name, qualifier) = match mapping.function.split_once(':') {
        Some((n, q)) => (n, Some(q)),
        None => (mapping.function.as_str(), None),
    };
    let function = mapping.functions.get(name)?;
    let versions: Vec<String> = match qualifier.and_then(|q| function.alias(q)) {
        Some(alias) => std::iter::once(alias.version.clone())
            .chain(alias.weights.iter().map(|(v, _)| v.clone()))
            .collect(),
        None => vec![qualifier.unwrap_or(crate::function::LATEST).to_string()],
    };
    versions
        .iter()
        .filter_map(|v| function.resolve(Some(v)))
        .map(|instance| instance.config.timeout())
        .max()
}

/// Pollers a mapping keeps even when its queue is idle.
const MIN_POLLERS: usize = 1;
/// Empty long polls in a row after which a surplus poller stops.
const IDLE_POLLS: u32 = 2;

/// Messages whose failed tries are remembered for their on-failure record, at most.
const HISTORY_LIMIT: usize = 10_000;

/// How many poll loops run, whether one of them saw a backlog, and the failed tries of
/// messages that went back to a redelivering source (for the story an on-failure record
/// tells; what another instance tried is not known here).
struct Pollers {
    running: AtomicUsize,
    backlog: AtomicBool,
    history: std::sync::Mutex<std::collections::HashMap<String, Vec<Attempt>>>,
}

impl Pollers {
    fn remember(&self, ids: &[&Delivery], attempt: &Attempt) {
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if h.len() > HISTORY_LIMIT {
            h.clear();
        }
        for d in ids {
            h.entry(d.record.id.clone())
                .or_default()
                .push(attempt.clone());
        }
    }

    fn take(&self, ids: &[&Delivery]) -> Vec<Attempt> {
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for d in ids {
            out.extend(h.remove(&d.record.id).unwrap_or_default());
        }
        out.sort_by(|a, b| a.time.cmp(&b.time));
        out
    }

    fn forget(&self, ids: &[&Delivery]) {
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        for d in ids {
            h.remove(&d.record.id);
        }
    }
}

/// Runs `mapping` over `source` until stopped, with one poll loop per concurrent batch: more
/// start while a backlog exists (a poll that fills a whole batch), up to `max_pollers`, and
/// surplus ones stop when the queue runs dry, as Lambda scales its SQS pollers.
pub async fn run(mapping: Arc<Mapping>, source: Arc<dyn QueueSource>, max_pollers: usize) {
    if let Some(reason) = refusal(&mapping, source.as_ref()) {
        let [s, f] = [
            ("source", mapping.name.clone()),
            ("function", mapping.function.clone()),
        ];
        metrics::counter!(
            m::MAPPING_REFUSED,
            &[s, f, ("reason", "visibility_timeout".to_string())]
        )
        .increment(1);
        tracing::error!(source = %mapping.name, function = %mapping.function, "the mapping does not start: {reason}; raise the queue's VisibilityTimeout (Lambda advises six times the function's timeout) and restart");
        return;
    }
    let max = max_pollers.max(MIN_POLLERS);
    let pollers = Arc::new(Pollers {
        running: AtomicUsize::new(MIN_POLLERS),
        backlog: AtomicBool::new(false),
        history: std::sync::Mutex::new(std::collections::HashMap::new()),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..MIN_POLLERS {
        tasks.spawn(poll(mapping.clone(), source.clone(), pollers.clone()));
    }
    loop {
        tokio::select! {
            _ = mapping.stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        if pollers.backlog.swap(false, Ordering::Relaxed)
            && pollers.running.load(Ordering::Relaxed) < max
        {
            pollers.running.fetch_add(1, Ordering::Relaxed);
            tasks.spawn(poll(mapping.clone(), source.clone(), pollers.clone()));
            tracing::debug!(source = %mapping.name, pollers = pollers.running.load(Ordering::Relaxed), "backlog: one more poller");
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

async fn poll(mapping: Arc<Mapping>, source: Arc<dyn QueueSource>, pollers: Arc<Pollers>) {
    let size = mapping.config.batch.size.max(1) as usize;
    let window = mapping.config.batch.window;
    let envelope: Envelope = {
        let s = source.clone();
        Arc::new(move |records: &[&Record]| s.envelope(records))
    };
    let batch_source = BatchSource {
        info_key: source.batch_info_key(),
        source_arn: source.source_arn().to_string(),
        partition: source.source_arn().to_string(),
    };
    let mut idle = 0u32;
    while !mapping.stop.is_cancelled() {
        let mut batch: Vec<Delivery> = Vec::new();
        let mut gather_until: Option<Instant> = None;
        let mut lease = Lease::new(source.as_ref());
        loop {
            let wait = match gather_until {
                None => LONG_POLL,
                Some(until) => until.saturating_duration_since(Instant::now()),
            };
            // A long batch window must not outlast what was already received.
            let wait = lease.due_in().map_or(wait, |due| wait.min(due));
            let sent = Instant::now();
            let received = tokio::select! {
                _ = mapping.stop.cancelled() => {
                    release(&mapping, source.as_ref(), &batch.iter().collect::<Vec<_>>()).await;
                    return;
                }
                r = source.receive(size - batch.len(), wait) => r,
            };
            match received {
                Ok(d) => {
                    if !d.is_empty() {
                        lease.start(sent);
                    }
                    batch.extend(d);
                }
                Err(e) => {
                    metrics::counter!(m::MAPPING_READ_ERRORS, "source" => mapping.name.clone())
                        .increment(1);
                    tracing::warn!(source = %mapping.name, error = %e, "cannot receive from the queue");
                    tokio::select! {
                        _ = mapping.stop.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
            if batch.is_empty() {
                idle += 1;
                if idle >= IDLE_POLLS {
                    idle = 0;
                    let surplus = pollers
                        .running
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            (n > MIN_POLLERS).then(|| n - 1)
                        })
                        .is_ok();
                    if surplus {
                        return;
                    }
                }
                continue;
            }
            idle = 0;
            let until = *gather_until.get_or_insert_with(|| Instant::now() + window);
            if batch.len() >= size || Instant::now() >= until {
                break;
            }
            if lease.due_in() == Some(Duration::ZERO) {
                lease
                    .extend(&mapping, source.as_ref(), &batch.iter().collect::<Vec<_>>())
                    .await;
            }
        }
        if batch.len() >= size {
            pollers.backlog.store(true, Ordering::Relaxed);
        }
        settle(
            &mapping,
            source.as_ref(),
            batch,
            lease,
            &batch_source,
            &envelope,
            &pollers,
        )
        .await;
    }
}

async fn ack(mapping: &Mapping, source: &dyn QueueSource, deliveries: &[&Delivery]) {
    if deliveries.is_empty() {
        return;
    }
    if let Err(e) = source.ack(deliveries).await {
        // The messages come back and run again: at least once, never lost.
        tracing::warn!(source = %mapping.name, error = %e, messages = deliveries.len(), "cannot acknowledge; the messages will be delivered again");
    }
}

async fn release(mapping: &Mapping, source: &dyn QueueSource, deliveries: &[&Delivery]) {
    if deliveries.is_empty() {
        return;
    }
    if let Err(e) = source.release(deliveries).await {
        tracing::warn!(source = %mapping.name, error = %e, "cannot release messages; they come back when the source times them out");
    }
}

async fn reject(mapping: &Mapping, source: &dyn QueueSource, deliveries: &[&Delivery]) {
    if deliveries.is_empty() {
        return;
    }
    if let Err(e) = source.reject(deliveries).await {
        tracing::warn!(source = %mapping.name, error = %e, "cannot reject messages; they will be delivered again");
    }
}

/// Settles one gathered batch: filtered messages are done; the rest run.
async fn settle(
    mapping: &Mapping,
    source: &dyn QueueSource,
    batch: Vec<Delivery>,
    mut lease: Lease,
    batch_source: &BatchSource,
    envelope: &Envelope,
    pollers: &Pollers,
) {
    // Without filters every message passes: no need to copy each record to find that out.
    let (pass, filtered): (Vec<&Delivery>, Vec<&Delivery>) = if mapping.config.filters.is_empty() {
        (batch.iter().collect(), Vec::new())
    } else {
        let kept: HashSet<String> = mapping
            .filter(batch.iter().map(|d| d.record.clone()).collect())
            .into_iter()
            .map(|r| r.id)
            .collect();
        batch.iter().partition(|d| kept.contains(&d.record.id))
    };
    ack(mapping, source, &filtered).await;
    if pass.is_empty() {
        return;
    }
    // Keep the messages ours while the batch runs, on the schedule their receive started.
    let keep = async {
        loop {
            tokio::time::sleep(lease.due_in().unwrap_or(lease.every)).await;
            lease.extend(mapping, source, &pass).await;
        }
    };
    let work = async {
        match source.redelivery() {
            Redelivery::InPlace => in_place(mapping, source, &pass, batch_source, envelope).await,
            Redelivery::BySource => {
                by_source(mapping, source, &pass, batch_source, envelope, pollers).await
            }
        }
    };
    tokio::select! {
        _ = keep => {}
        _ = work => {}
    }
}

async fn in_place(
    mapping: &Mapping,
    source: &dyn QueueSource,
    pass: &[&Delivery],
    batch_source: &BatchSource,
    envelope: &Envelope,
) {
    let records: Vec<Record> = pass.iter().map(|d| d.record.clone()).collect();
    let Some(unrouted) = mapping
        .run_to_completion(
            &records,
            batch_source,
            envelope,
            super::PartialRetry::OnlyFailed,
        )
        .await
    else {
        // Stopping: nothing is final, so everything goes back to the queue.
        release(mapping, source, pass).await;
        return;
    };
    let unrouted: HashSet<&str> = unrouted.iter().map(|r| r.id.as_str()).collect();
    let (rejected, done): (Vec<&Delivery>, Vec<&Delivery>) = pass
        .iter()
        .partition(|d| unrouted.contains(d.record.id.as_str()));
    ack(mapping, source, &done).await;
    reject(mapping, source, &rejected).await;
}

/// For a source that redelivers by itself: one try; successes are deleted, failures left for
/// the source to deliver again, and messages past the retry budget go to the on-failure
/// destination (or to the queue's own redrive policy when there is none). Messages of a
/// FIFO group run in order, and a failure holds back only the rest of its own group.
async fn by_source(
    mapping: &Mapping,
    source: &dyn QueueSource,
    pass: &[&Delivery],
    batch_source: &BatchSource,
    envelope: &Envelope,
    pollers: &Pollers,
) {
    let retry = &mapping.config.retry;
    let now = chrono::Utc::now().timestamp_millis();
    let expired_age = |d: &&&Delivery| {
        retry
            .max_record_age
            .is_some_and(|age| d.record.arrival_ms < now - age.as_millis() as i64)
    };
    let expired_tries = |d: &&&Delivery| {
        retry
            .max_attempts
            .is_some_and(|max| d.receive_count > max.saturating_add(1))
    };
    let (too_old, rest): (Vec<&Delivery>, Vec<&Delivery>) = pass.iter().partition(expired_age);
    let (exhausted, fresh): (Vec<&Delivery>, Vec<&Delivery>) = rest.iter().partition(expired_tries);
    for (given_up, condition) in [
        (too_old, GiveUp::RecordAgeExceeded),
        (exhausted, GiveUp::RetryAttemptsExhausted),
    ] {
        if given_up.is_empty() {
            continue;
        }
        let records: Vec<&Record> = given_up.iter().map(|d| &d.record).collect();
        let attempts = pollers.take(&given_up);
        match mapping
            .give_up(&records, &attempts, condition, batch_source)
            .await
        {
            Some(true) => ack(mapping, source, &given_up).await,
            Some(false) => reject(mapping, source, &given_up).await,
            None => release(mapping, source, &given_up).await,
        }
    }
    if fresh.is_empty() {
        return;
    }
    // FIFO groups keep their order; unordered messages form one batch.
    let mut groups: BTreeMap<Option<&str>, Vec<&Delivery>> = BTreeMap::new();
    for d in &fresh {
        groups.entry(d.group.as_deref()).or_default().push(d);
    }
    let runs = groups.into_values().map(|group| async move {
        let records: Vec<&Record> = group.iter().map(|d| &d.record).collect();
        let Some((result, attempt)) = mapping.invoke(&records, envelope).await else {
            release(mapping, source, &group).await;
            return;
        };
        let [s, f] = [
            ("source", mapping.name.clone()),
            ("function", mapping.function.clone()),
        ];
        metrics::counter!(m::MAPPING_BATCHES, &[s, f]).increment(1);
        let ordered = group.first().is_some_and(|d| d.group.is_some());
        let (done, failed): (Vec<&Delivery>, Vec<&Delivery>) = match result {
            BatchResult::Succeeded => (group.clone(), Vec::new()),
            BatchResult::Failed(_) => (Vec::new(), group.clone()),
            BatchResult::Partial(ids) => {
                let ids: HashSet<String> = ids.into_iter().collect();
                if ordered {
                    // In a FIFO group nothing may pass a failed message.
                    let first = group
                        .iter()
                        .position(|d| ids.contains(&d.record.id))
                        .unwrap_or(group.len());
                    (group[..first].to_vec(), group[first..].to_vec())
                } else {
                    group.iter().partition(|d| !ids.contains(&d.record.id))
                }
            }
        };
        mapping.count("delivered", done.len());
        pollers.forget(&done);
        ack(mapping, source, &done).await;
        if !failed.is_empty() {
            mapping.count("failed", failed.len());
            pollers.remember(&failed, &attempt);
            release(mapping, source, &failed).await;
        }
    });
    futures::future::join_all(runs).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_writes_whole_seconds_as_lambda_does_and_a_fraction_only_when_there_is_one() {
        assert_eq!(seconds(Duration::from_secs(30)), "30");
        assert_eq!(seconds(Duration::from_millis(1500)), "1.5");
    }

    #[test]
    fn the_first_extension_is_due_a_third_of_the_visibility_after_the_receive_was_sent() {
        let mut lease = Lease {
            every: Duration::from_secs(10),
            next: None,
        };
        assert_eq!(
            lease.due_in(),
            None,
            "nothing to keep before a message came"
        );
        // A long poll sent 8 s ago that returned just now leaves 2 s, not 10.
        let sent = Instant::now() - Duration::from_secs(8);
        lease.start(sent);
        let due = lease.due_in().expect("due");
        assert!(due <= Duration::from_secs(2), "{due:?}");
        // A later receive of the same batch does not push the first deadline back.
        lease.start(Instant::now());
        assert!(lease.due_in().expect("due") <= Duration::from_secs(2));
    }
}
