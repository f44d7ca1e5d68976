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
//! record is committed for the partition — asynchronously, since a lost commit only means
//! records read again, and the next commit carries a higher offset anyway. A commit never
//! covers a record whose outcome is not final: rounds run one after another per partition, so
//! the last finished round *is* the highest contiguous final position. Before a partition is
//! let go (revoke, stop) and after a second of idleness, its final offset is committed
//! synchronously.
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
use sluice_connectors::kafka::{
    BATCH_INFO_KEY, GroupEvent, KafkaSource, PartitionQueue, TopicPartition, record,
};
use sluice_connectors::record::Record;
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
    /// How long a synchronous commit of final offsets is retried when a partition is let go.
    pub commit_persistence: Duration,
    /// After this long without records, final offsets are committed synchronously.
    pub idle_commit: Duration,
}

impl Default for KafkaTuning {
    fn default() -> Self {
        Self {
            revoke_grace: Duration::from_secs(30),
            commit_persistence: Duration::from_secs(10),
            idle_commit: Duration::from_secs(1),
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
            metrics::counter!(m::MAPPING_READ_ERRORS, "source" => mapping.name.clone()).increment(1);
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
                    let task = PartitionTask::start(mapping.clone(), source.clone(), tp.clone(), queue, tuning.clone());
                    tasks.insert(tp, task);
                }
            }
            Some(GroupEvent::Revoked { partitions, done }) => {
                let leaving: Vec<PartitionTask> = partitions.iter().filter_map(|tp| tasks.remove(tp)).collect();
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
                metrics::counter!(m::MAPPING_READ_ERRORS, "source" => mapping.name.clone()).increment(1);
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
    fn start(mapping: Arc<Mapping>, source: Arc<KafkaSource>, tp: TopicPartition, queue: PartitionQueue, tuning: KafkaTuning) -> Self {
        let revoke = CancellationToken::new();
        let task = tokio::spawn(read_partition(mapping, source, tp, queue, revoke.clone(), tuning));
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

/// What is known of a partition's offsets: the offset after the last final record, and what
/// has been committed of it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Offsets {
    /// The offset after the last record whose outcome is final (the one to commit).
    final_next: Option<i64>,
    /// The highest offset committed synchronously (known durable).
    synced: Option<i64>,
}

impl Offsets {
    /// The offset to commit synchronously, if any is not known durable yet.
    fn unsynced(&self) -> Option<i64> {
        match (self.final_next, self.synced) {
            (Some(next), Some(synced)) if next <= synced => None,
            (next, _) => next,
        }
    }
}

/// Why a round's gathering ended early.
enum Interrupted {
    Stop,
    Revoke,
}

async fn read_partition(
    mapping: Arc<Mapping>,
    source: Arc<KafkaSource>,
    tp: TopicPartition,
    queue: PartitionQueue,
    revoke: CancellationToken,
    tuning: KafkaTuning,
) {
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
    let lag = metrics::gauge!(m::MAPPING_OFFSET_LAG,
        "source" => mapping.name.clone(), "topic" => tp.topic.clone(), "partition" => tp.partition.to_string());
    let mut offsets = Offsets::default();
    tracing::debug!(source = %mapping.name, partition = %tp, "reading partition");
    'rounds: loop {
        // The first record of a round; an idle partition makes its final offset durable.
        let first = loop {
            let idle_commit = offsets.unsynced().is_some();
            tokio::select! {
                biased;
                _ = mapping.stop.cancelled() => break 'rounds,
                _ = revoke.cancelled() => break 'rounds,
                read = queue.recv() => break read.map(|m| record(&m)),
                _ = tokio::time::sleep(tuning.idle_commit), if idle_commit => {
                    commit_durably(&mapping, &source, &tp, &mut offsets, tuning.commit_persistence).await;
                }
            }
        };
        let mut buffer: Vec<Record> = Vec::new();
        let mut bytes = 0;
        match first {
            Ok(r) => {
                bytes += r.size;
                buffer.push(r);
            }
            Err(error) => {
                read_error(&mapping, &tp, &error);
                tokio::select! {
                    _ = mapping.stop.cancelled() => break 'rounds,
                    _ = revoke.cancelled() => break 'rounds,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue 'rounds,
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
                    read_error(&mapping, &tp, &error);
                    break;
                }
            }
        }
        if let Some(why) = interrupted {
            // Gathered but never invoked: the next reader of the partition reads them again.
            tracing::debug!(source = %mapping.name, partition = %tp, records = buffer.len(),
                stopping = matches!(why, Interrupted::Stop), "round dropped before its invocation");
            break 'rounds;
        }
        let last: i64 = buffer
            .last()
            .and_then(|r| r.position.parse().ok())
            .unwrap_or_default();
        let records = mapping.filter(buffer);
        let round = process_round(&mapping, records, &batch_source, &envelope);
        let abandon = async {
            revoke.cancelled().await;
            tokio::time::sleep(tuning.revoke_grace).await;
        };
        let finished = tokio::select! {
            finished = round => finished,
            _ = abandon => {
                tracing::warn!(source = %mapping.name, partition = %tp, grace = ?tuning.revoke_grace,
                    "revoked partition's round did not finish within the grace; abandoning it uncommitted (its records will be read again)");
                false
            }
        };
        if !finished {
            // Stopping or abandoned with records whose outcome is not final: no commit past them.
            break 'rounds;
        }
        offsets.final_next = Some(last + 1);
        if let Err(error) = source.commit_async(&tp, last + 1) {
            tracing::warn!(source = %mapping.name, partition = %tp, %error, "cannot queue the offset commit");
        }
        if let Some(high) = source.high_watermark(&tp) {
            lag.set((high - (last + 1)).max(0) as f64);
        }
    }
    commit_durably(&mapping, &source, &tp, &mut offsets, tuning.commit_persistence).await;
    tracing::debug!(source = %mapping.name, partition = %tp, committed = ?offsets.synced, "partition let go");
}

/// Commits the partition's final offset synchronously, retrying for up to `persistence`.
/// A commit that never lands costs duplicates after a restart, never records.
async fn commit_durably(mapping: &Mapping, source: &Arc<KafkaSource>, tp: &TopicPartition, offsets: &mut Offsets, persistence: Duration) {
    let Some(next) = offsets.unsynced() else {
        return;
    };
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let (s, t) = (source.clone(), tp.clone());
        let result = tokio::task::spawn_blocking(move || s.commit_sync(&t, next)).await;
        match result {
            Ok(Ok(())) => {
                offsets.synced = Some(next);
                return;
            }
            Ok(Err(error)) => {
                tracing::warn!(source = %mapping.name, partition = %tp, offset = next, %error, "offset commit failed; retrying");
            }
            Err(error) => {
                tracing::warn!(source = %mapping.name, partition = %tp, %error, "offset commit did not run");
            }
        }
        if started.elapsed() + backoff > persistence {
            tracing::error!(source = %mapping.name, partition = %tp, offset = next,
                "giving up committing the offset; records after the last commit will be read again");
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

fn read_error(mapping: &Mapping, tp: &TopicPartition, error: &rdkafka::error::KafkaError) {
    metrics::counter!(m::MAPPING_READ_ERRORS, "source" => mapping.name.clone()).increment(1);
    tracing::warn!(source = %mapping.name, partition = %tp, %error, "cannot read the partition");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_offsets_not_yet_durable_are_committed_again() {
        let mut o = Offsets::default();
        assert_eq!(o.unsynced(), None, "nothing final yet");
        o.final_next = Some(10);
        assert_eq!(o.unsynced(), Some(10));
        o.synced = Some(10);
        assert_eq!(o.unsynced(), None);
        o.final_next = Some(15);
        assert_eq!(o.unsynced(), Some(15));
    }
}
