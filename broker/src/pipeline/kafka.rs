//! Driving a Kafka consumer group through a mapping.
//!
//! **Shape.** One consumer per mapping (`sluice_connectors::kafka::KafkaSource`), one task per
//! assigned partition, and a coordinator (`run`) that starts and stops those tasks as the group
//! assigns and revokes partitions. Each partition has its own librdkafka queue, split before
//! the partition is assigned, so a task sees exactly its partition's records, in offset order.
//!
//! **Rounds.** A partition task gathers up to `batch.size × parallelization` records (or
//! `batch.max_bytes × parallelization` bytes, or what arrives within `batch.window`) and runs
//! them as one round through [`stream::process_round`]: `parallelization` lanes by message key,
//! each lane's batches in order, retries, bisection, `batchItemFailures` and the on-failure
//! destination as for any stream. Lambda's own Kafka batches may mix partitions; here a batch
//! holds one partition's records, which keeps ordering and commits a per-partition affair with
//! no cross-partition bookkeeping.
//!
//! **Commits.** When a round returns with every record final, the offset after its last
//! record becomes the partition's final offset. A committer beside the reader commits it
//! synchronously, one commit at a time and always the latest value, so that the reader never
//! waits for the broker and commits of a partition never overtake each other (librdkafka
//! retries failed commits internally; an older one landing after a newer one would move the
//! group's offset back). A commit never covers a record whose outcome is not final: rounds run
//! one after another per partition, so the last finished round *is* the highest contiguous
//! final position. When the partition is let go (revoke, stop), its last final offset is
//! committed before the task ends.
//!
//! **Rebalances.** On a revoke, librdkafka's rebalance callback (on the consumer's own thread)
//! hands the partitions to the coordinator and blocks. The coordinator tells their tasks to
//! stop reading; a task between rounds stops at once, a task in a round lets it finish within
//! `revoke_grace` — or abandons it, committing nothing for it, so the next owner reads those
//! records again. Each task commits synchronously what is final and ends; only then does the
//! callback return and the group move the partitions. A newly assigned partition starts at the
//! group's committed offset (`starting_position` applies only when there is none).
//!
//! **Memory.** A task holds at most one round. Behind it, librdkafka's queue for the partition
//! holds what was prefetched, up to `queued.min.messages` / `queued.max.messages.kbytes` (set
//! per mapping to about two rounds); when full, librdkafka stops fetching that partition until
//! the task drains it: the partition pauses on its own, whatever the backlog at the broker.
//!
//! **Stop.** When the mapping's stop token is cancelled, tasks stop reading, rounds end at
//! their next retry point (an invocation in flight finishes), final offsets are committed, and
//! the consumer leaves the group.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use sluice_config::KafkaConfig;
use sluice_connectors::backoff::Backoff;
use sluice_connectors::kafka::{
    BATCH_INFO_KEY, GroupEvent, KafkaSource, PartitionQueue, TopicPartition, record,
};
use sluice_connectors::record::Record;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::stream::process_round;
use super::{BatchSource, Envelope, Mapping};
use crate::metrics as m;

/// Timings of a Kafka mapping; the defaults suit production, tests shorten them.
#[derive(Debug, Clone)]
pub struct KafkaTuning {
    /// How long a revoked partition's round in flight may run on before it is abandoned.
    pub revoke_grace: Duration,
    /// How long the commit of a partition's final offset is retried when it is let go.
    pub commit_persistence: Duration,
}

impl Default for KafkaTuning {
    fn default() -> Self {
        Self {
            revoke_grace: Duration::from_secs(30),
            commit_persistence: Duration::from_secs(10),
        }
    }
}

/// Runs `mapping` over the Kafka source `config` until the mapping is stopped; then commits
/// what is final and leaves the group.
pub async fn run(mapping: Arc<Mapping>, config: KafkaConfig) {
    run_with(mapping, config, KafkaTuning::default()).await
}

/// [`run`] with its timings spelled out.
pub async fn run_with(mapping: Arc<Mapping>, config: KafkaConfig, tuning: KafkaTuning) {
    // The callback waits a little longer than a task may take, so that the task, not the
    // callback, decides what is abandoned.
    let revoke_wait = tuning.revoke_grace + tuning.commit_persistence + Duration::from_secs(5);
    let (source, mut events) = match KafkaSource::connect(&mapping.name, &config, revoke_wait) {
        Ok(connected) => connected,
        Err(error) => {
            metrics::counter!(m::MAPPING_READ_ERRORS, "source" => mapping.name.clone())
                .increment(1);
            tracing::error!(source = %mapping.name, %error, "the Kafka mapping cannot start");
            return;
        }
    };
    let source = Arc::new(source);
    tracing::info!(source = %mapping.name, topics = ?sluice_connectors::kafka::subscription(&config),
        group = %config.group_id, "joining the consumer group");
    let mut tasks: HashMap<TopicPartition, PartitionTask> = HashMap::new();
    loop {
        let event = tokio::select! {
            _ = mapping.stop.cancelled() => break,
            event = events.recv() => event,
        };
        match event {
            None => break,
            Some(GroupEvent::Assigned(queues)) => {
                for (tp, queue) in queues {
                    if let Some(stale) = tasks.remove(&tp) {
                        // A partition assigned again before its revoke was seen: the old reader
                        // is obsolete; what it had not committed will be read again.
                        tracing::warn!(source = %mapping.name, partition = %tp, "partition assigned twice; restarting its reader");
                        drop(stale);
                    }
                    let task = PartitionTask::start(
                        mapping.clone(),
                        source.clone(),
                        tp.clone(),
                        queue,
                        tuning.clone(),
                    );
                    tasks.insert(tp, task);
                }
            }
            Some(GroupEvent::Revoked { partitions, done }) => {
                let leaving: Vec<PartitionTask> = partitions
                    .iter()
                    .filter_map(|tp| tasks.remove(tp))
                    .collect();
                for task in &leaving {
                    task.revoke.cancel();
                }
                for task in leaving {
                    task.finish().await;
                }
                // Dropping `done` lets the rebalance go on.
                drop(done);
            }
            Some(GroupEvent::Error(error)) => {
                metrics::counter!(m::MAPPING_READ_ERRORS, "source" => mapping.name.clone())
                    .increment(1);
                tracing::warn!(source = %mapping.name, %error, "Kafka consumer error");
            }
        }
    }
    for (_, task) in tasks.drain() {
        task.finish().await;
    }
    // No one answers revokes any more: closing the consumer must not wait for us.
    drop(events);
    // Closing leaves the group and waits for librdkafka: off the async threads.
    let _ = tokio::task::spawn_blocking(move || drop(source)).await;
    tracing::info!(source = %mapping.name, "Kafka mapping stopped");
}

/// A partition's reader. Dropping it aborts the task (what a crash would do); [`finish`]
/// waits for it to let the partition go properly.
///
/// [`finish`]: PartitionTask::finish
struct PartitionTask {
    revoke: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl PartitionTask {
    fn start(
        mapping: Arc<Mapping>,
        source: Arc<KafkaSource>,
        tp: TopicPartition,
        queue: PartitionQueue,
        tuning: KafkaTuning,
    ) -> Self {
        let revoke = CancellationToken::new();
        let task = tokio::spawn(read_partition(
            mapping,
            source,
            tp,
            queue,
            revoke.clone(),
            tuning,
        ));
        Self {
            revoke,
            task: Some(task),
        }
    }

    async fn finish(mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for PartitionTask {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Why a round's gathering ended early.
enum Interrupted {
    Stop,
    Revoke,
}

/// A partition's reader and its committer, in one task (aborting it stops both).
async fn read_partition(
    mapping: Arc<Mapping>,
    source: Arc<KafkaSource>,
    tp: TopicPartition,
    queue: PartitionQueue,
    revoke: CancellationToken,
    tuning: KafkaTuning,
) {
    let lag = metrics::gauge!(m::MAPPING_OFFSET_LAG,
        "source" => mapping.name.clone(), "topic" => tp.topic.clone(), "partition" => tp.partition.to_string());
    let partition = Partition {
        mapping,
        source,
        tp,
        tuning,
        lag,
    };
    let (finals, latest) = watch::channel(None);
    let (committed_tx, committed_rx) = watch::channel(None);
    let reading = partition.read_rounds(&queue, &revoke, finals, committed_rx);
    let committing = partition.commit_finals(latest, committed_tx);
    let ((), committed) = tokio::join!(reading, committing);
    tracing::debug!(source = %partition.mapping.name, partition = %partition.tp, ?committed, "partition let go");
}

/// What a partition's reader and committer share.
struct Partition {
    mapping: Arc<Mapping>,
    source: Arc<KafkaSource>,
    tp: TopicPartition,
    tuning: KafkaTuning,
    lag: metrics::Gauge,
}

impl Partition {
    /// OffsetLag: records between `position` (where the group would resume) and the end of
    /// the partition, as of the last fetch.
    fn record_lag(&self, position: i64) {
        if let Some(high) = self.source.high_watermark(&self.tp) {
            self.lag.set((high - position).max(0) as f64);
        }
    }

    fn read_error(&self, error: &rdkafka::error::KafkaError) {
        let (mapping, tp) = (&self.mapping, &self.tp);
        metrics::counter!(m::MAPPING_READ_ERRORS, "source" => mapping.name.clone()).increment(1);
        tracing::warn!(source = %mapping.name, partition = %tp, %error, "cannot read the partition");
    }

    /// Reads the partition round after round; after each round whose records are all final,
    /// publishes the offset after its last record to `finals`. A round starts only once the
    /// round before the last one is `committed`: at most one finished round waits for its
    /// commit while the next one runs, so a crash repeats at most two rounds of the partition,
    /// however long commits keep failing. Ends (dropping `finals`) on stop, on revoke, or when
    /// a round cannot finish.
    async fn read_rounds(
        &self,
        queue: &PartitionQueue,
        revoke: &CancellationToken,
        finals: watch::Sender<Option<i64>>,
        mut committed: watch::Receiver<Option<i64>>,
    ) {
        let (mapping, source, tp) = (&*self.mapping, &self.source, &self.tp);
        let batch_source = BatchSource {
            info_key: BATCH_INFO_KEY,
            source_arn: source.bootstrap_servers().to_string(),
            partition: tp.to_string(),
        };
        let envelope: Envelope = {
            let s = source.clone();
            Arc::new(move |records: &[&Record]| s.envelope(records))
        };
        let lanes = mapping.config.parallelization.max(1) as usize;
        let want = (mapping.config.batch.size.max(1) as usize).saturating_mul(lanes);
        let max_bytes = (mapping.config.batch.max_bytes.max(1) as usize).saturating_mul(lanes);
        let window = mapping.config.batch.window;
        tracing::debug!(source = %mapping.name, partition = %tp, "reading partition");
        // The final offset of the round before the last one, which must be committed first.
        let mut behind: Option<i64> = None;
        loop {
            if let Some(needed) = behind {
                let caught_up = committed.wait_for(|c| c.is_some_and(|c| c >= needed));
                tokio::select! {
                    biased;
                    _ = mapping.stop.cancelled() => return,
                    _ = revoke.cancelled() => return,
                    caught_up = caught_up => if caught_up.is_err() { return },
                }
            }
            let first = tokio::select! {
                biased;
                _ = mapping.stop.cancelled() => return,
                _ = revoke.cancelled() => return,
                read = queue.recv() => read.map(|m| record(&m)),
            };
            let mut buffer: Vec<Record> = Vec::new();
            let mut bytes = 0;
            match first {
                Ok(r) => {
                    bytes += r.size;
                    buffer.push(r);
                }
                Err(error) => {
                    self.read_error(&error);
                    tokio::select! {
                        _ = mapping.stop.cancelled() => return,
                        _ = revoke.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            }
            let deadline = Instant::now() + window;
            let mut interrupted = None;
            while buffer.len() < want && bytes < max_bytes {
                let read = if window.is_zero() {
                    // No window: take what has already arrived, without waiting.
                    match queue.recv().now_or_never() {
                        Some(read) => read.map(|m| record(&m)),
                        None => break,
                    }
                } else {
                    tokio::select! {
                        biased;
                        _ = mapping.stop.cancelled() => { interrupted = Some(Interrupted::Stop); break }
                        _ = revoke.cancelled() => { interrupted = Some(Interrupted::Revoke); break }
                        _ = tokio::time::sleep_until(deadline) => break,
                        read = queue.recv() => read.map(|m| record(&m)),
                    }
                };
                match read {
                    Ok(r) => {
                        bytes += r.size;
                        buffer.push(r);
                    }
                    Err(error) => {
                        self.read_error(&error);
                        break;
                    }
                }
            }
            if let Some(why) = interrupted {
                // Gathered but never invoked: the next reader of the partition reads them again.
                tracing::debug!(source = %mapping.name, partition = %tp, records = buffer.len(),
                    stopping = matches!(why, Interrupted::Stop), "round dropped before its invocation");
                return;
            }
            let offset = |r: Option<&Record>| r.and_then(|r| r.position.parse::<i64>().ok());
            let first = offset(buffer.first()).unwrap_or_default();
            let last = offset(buffer.last()).unwrap_or_default();
            self.record_lag((*committed.borrow()).unwrap_or(first));
            tracing::trace!(source = %mapping.name, partition = %tp, first, last, "round");
            let records = mapping.filter(buffer);
            let round = process_round(mapping, records, &batch_source, &envelope);
            let abandon = async {
                revoke.cancelled().await;
                tokio::time::sleep(self.tuning.revoke_grace).await;
            };
            let finished = tokio::select! {
                finished = round => finished,
                _ = abandon => {
                    tracing::warn!(source = %mapping.name, partition = %tp, grace = ?self.tuning.revoke_grace,
                        "revoked partition's round did not finish within the grace; abandoning it uncommitted (its records will be read again)");
                    false
                }
            };
            if !finished {
                // Stopping or abandoned with records whose outcome is not final: no commit past them.
                return;
            }
            behind = finals.send_replace(Some(last + 1));
        }
    }

    /// Commits what `finals` publishes, one synchronous commit at a time, always the latest
    /// value, and tells the reader through `committed_tx`. Commits of a partition never
    /// overtake each other (librdkafka retries a failed commit internally, and an older
    /// retried commit landing after a newer one would move the group's offset back). When
    /// `finals` closes, the last value is committed, retried for up to `commit_persistence`.
    /// Returns the last offset committed.
    async fn commit_finals(
        &self,
        mut finals: watch::Receiver<Option<i64>>,
        committed_tx: watch::Sender<Option<i64>>,
    ) -> Option<i64> {
        let (mapping, tp) = (&self.mapping, &self.tp);
        let mut committed: Option<i64> = None;
        let mut closed_at: Option<Instant> = None;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let target = *finals.borrow_and_update();
            if let Some(next) = target.filter(|next| committed.is_none_or(|c| *next > c)) {
                let (s, t) = (self.source.clone(), tp.clone());
                match tokio::task::spawn_blocking(move || s.commit_sync(&t, next)).await {
                    Ok(Ok(())) => {
                        tracing::trace!(source = %mapping.name, partition = %tp, offset = next, "committed");
                        committed = Some(next);
                        committed_tx.send_replace(committed);
                        backoff.reset();
                        self.record_lag(next);
                        continue;
                    }
                    Ok(Err(error))
                        if closed_at.is_some()
                            && KafkaSource::commit_needs_new_generation(&error) =>
                    {
                        // Letting the partition go while the group has moved on: no retry can
                        // land, and retrying would only hold the rebalance up.
                        tracing::warn!(source = %mapping.name, partition = %tp, offset = next, %error,
                            "cannot commit the final offset in this group generation; the next owner reads the records after the last commit again");
                        return committed;
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(source = %mapping.name, partition = %tp, offset = next, %error, "offset commit failed; retrying");
                    }
                    Err(error) => {
                        tracing::warn!(source = %mapping.name, partition = %tp, %error, "offset commit did not run");
                    }
                }
                if closed_at.is_some_and(|at| {
                    at.elapsed() + backoff.delay() > self.tuning.commit_persistence
                }) {
                    tracing::error!(source = %mapping.name, partition = %tp, offset = next,
                        "giving up committing the offset; records after the last commit will be read again");
                    return committed;
                }
                // Wait before trying again, or sooner when a newer offset is published.
                tokio::select! {
                    _ = tokio::time::sleep(backoff.advance()) => {}
                    changed = finals.changed(), if closed_at.is_none() => {
                        if changed.is_err() {
                            closed_at = Some(Instant::now());
                        }
                    }
                }
                continue;
            }
            if closed_at.is_some() {
                return committed;
            }
            if finals.changed().await.is_err() {
                // The reader is done: one last look at its final value.
                closed_at = Some(Instant::now());
            }
        }
    }
}
