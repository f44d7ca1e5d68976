//! Driving a sharded stream (Kinesis, DynamoDB Streams) through a mapping: one task per
//! shard, children only after their parents are fully processed, and a checkpoint per shard
//! that never moves past a record whose outcome is not final.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_config::StartingPosition;
use sluice_connectors::backoff::Backoff;
use sluice_connectors::record::Record;
use sluice_connectors::stream::{ReadError, ShardInfo, StartAt, StreamSource};
use tokio::task::JoinHandle;

use super::{BatchSource, Envelope, Mapping};
use crate::metrics as m;
use crate::state::{Checkpoint, StateStore};

/// How often the shard list is read again to find new shards (after a reshard, say).
const SHARD_REFRESH: Duration = Duration::from_secs(10);

/// Runs `mapping` over every shard of `source` until the mapping is stopped.
pub async fn run(mapping: Arc<Mapping>, source: Arc<dyn StreamSource>, store: Arc<dyn StateStore>) {
    let mut running: HashMap<String, JoinHandle<()>> = HashMap::new();
    loop {
        let refresh;
        running.retain(|_, task| !task.is_finished());
        match source.shards().await {
            Ok(shards) => {
                let present: HashSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
                for shard in &shards {
                    if running.contains_key(&shard.id) {
                        continue;
                    }
                    match ready(&mapping, store.as_ref(), shard, &present).await {
                        Ok(Some(start)) => {
                            let task = tokio::spawn(run_shard(
                                mapping.clone(),
                                source.clone(),
                                store.clone(),
                                shard.id.clone(),
                                start,
                            ));
                            running.insert(shard.id.clone(), task);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(source = %mapping.name, shard = %shard.id, error = %e, "cannot read the shard's checkpoint")
                        }
                    }
                }
                // A parent that just finished lets its children start: look again soon.
                refresh = if running.values().any(|t| t.is_finished()) {
                    Duration::from_millis(200)
                } else {
                    SHARD_REFRESH
                };
            }
            Err(e) => {
                metrics::counter!(m::MAPPING_READ_ERRORS, "source" => mapping.name.clone())
                    .increment(1);
                tracing::warn!(source = %mapping.name, error = %e, "cannot list the stream's shards");
                refresh = Duration::from_secs(2);
            }
        }
        let next_finish = async {
            if running.is_empty() {
                std::future::pending::<()>().await;
            }
            loop {
                if running.values().any(|t| t.is_finished()) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            _ = mapping.stop.cancelled() => break,
            _ = tokio::time::sleep(refresh) => {}
            _ = next_finish => {}
        }
    }
    for (_, task) in running {
        let _ = task.await;
    }
}

/// Where a shard starts, or `None` when it is done or must wait for its parents.
async fn ready(
    mapping: &Mapping,
    store: &dyn StateStore,
    shard: &ShardInfo,
    present: &HashSet<&str>,
) -> Result<Option<StartAt>, crate::state::StateError> {
    let checkpoint = store.checkpoint(&mapping.name, &shard.id).await?;
    if checkpoint.as_ref().is_some_and(|c| c.finished) {
        return Ok(None);
    }
    let parents: Vec<&String> = [&shard.parent, &shard.adjacent_parent]
        .into_iter()
        .flatten()
        .collect();
    for parent in &parents {
        // A parent that aged out of the stream has nothing left to read.
        if present.contains(parent.as_str()) {
            let done = store
                .checkpoint(&mapping.name, parent)
                .await?
                .is_some_and(|c| c.finished);
            if !done {
                return Ok(None);
            }
        }
    }
    if let Some(seq) = checkpoint.and_then(|c| c.sequence) {
        return Ok(Some(StartAt::AfterSequence(seq)));
    }
    // A child of a shard this mapping read starts at its beginning, or records are skipped.
    if parents.iter().any(|p| present.contains(p.as_str())) {
        return Ok(Some(StartAt::TrimHorizon));
    }
    Ok(Some(match mapping.config.starting_position {
        StartingPosition::TrimHorizon => StartAt::TrimHorizon,
        StartingPosition::Latest => StartAt::Latest,
        StartingPosition::AtTimestamp(ms) => StartAt::AtTimestamp(ms),
    }))
}

fn lane_of(key: &str, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % lanes as u64) as usize
}

/// Runs records (in shard order) through the mapping: `parallelization` lanes by partition
/// key, each lane's batches one after another. `true` when every record's outcome is final.
pub async fn process_round(
    mapping: &Mapping,
    records: Vec<Record>,
    source: &BatchSource,
    envelope: &Envelope,
) -> bool {
    let lanes = mapping.config.parallelization.max(1) as usize;
    let mut by_lane: Vec<Vec<Record>> = vec![Vec::new(); lanes];
    for r in records {
        let lane = if lanes == 1 {
            0
        } else {
            lane_of(&r.key, lanes)
        };
        by_lane[lane].push(r);
    }
    let runs = by_lane
        .iter()
        .filter(|l| !l.is_empty())
        .map(|lane| async move {
            for batch in mapping.batches(lane) {
                // A stream has no dead-lettering of its own: records given up without a
                // destination are skipped, as Lambda does.
                if mapping
                    .run_to_completion(
                        batch,
                        source,
                        envelope,
                        super::PartialRetry::FromLowestFailed,
                    )
                    .await
                    .is_none()
                {
                    return false;
                }
            }
            true
        });
    futures::future::join_all(runs)
        .await
        .into_iter()
        .all(|done| done)
}

async fn run_shard(
    mapping: Arc<Mapping>,
    source: Arc<dyn StreamSource>,
    store: Arc<dyn StateStore>,
    shard: String,
    start: StartAt,
) {
    let batch_source = BatchSource {
        info_key: source.batch_info_key(),
        source_arn: source.stream_arn().to_string(),
        partition: shard.clone(),
    };
    let envelope: Envelope = {
        let s = source.clone();
        Arc::new(move |records: &[&Record]| s.envelope(records))
    };
    let mut last_checkpoint = match &start {
        StartAt::AfterSequence(seq) => Some(seq.clone()),
        _ => None,
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut reader = loop {
        let at = match &last_checkpoint {
            Some(seq) => StartAt::AfterSequence(seq.clone()),
            None => start.clone(),
        };
        match source.open(&shard, at).await {
            Ok(r) => break r,
            Err(e) => {
                read_error(&mapping, &shard, &e);
                if !e.is_retriable() || backoff.wait(&mapping.stop).await {
                    return;
                }
            }
        }
    };
    tracing::info!(source = %mapping.name, %shard, "reading shard");
    let want = (mapping.config.batch.size as usize)
        .saturating_mul(mapping.config.parallelization.max(1) as usize)
        .max(1);
    // Records read and not yet run. A round takes at most `want` of them and is checkpointed
    // when done, so a crash repeats at most one round; reads wait while a round's worth is
    // buffered, so a slow function slows the reads instead of growing the buffer.
    let mut buffer: VecDeque<Record> = VecDeque::new();
    let mut end_of_shard = false;
    loop {
        let gather_until = Instant::now() + mapping.config.batch.window;
        while !end_of_shard && buffer.len() < want {
            let read = tokio::select! {
                _ = mapping.stop.cancelled() => return,
                read = reader.next() => read,
            };
            match read {
                Ok(read) => {
                    if let Some(age) = read.millis_behind {
                        metrics::gauge!(m::MAPPING_ITERATOR_AGE, "source" => mapping.name.clone(), "shard" => shard.clone()).set(age as f64);
                    }
                    buffer.extend(read.records);
                    end_of_shard = read.end_of_shard;
                }
                Err(e) => {
                    read_error(&mapping, &shard, &e);
                    if !e.is_retriable() {
                        return;
                    }
                    tokio::select! {
                        _ = mapping.stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
            if Instant::now() >= gather_until {
                break;
            }
        }
        if !buffer.is_empty() {
            let round: Vec<Record> = buffer.drain(..buffer.len().min(want)).collect();
            let last = round.last().map(|r| r.position.clone());
            let records = mapping.filter(round);
            if !process_round(&mapping, records, &batch_source, &envelope).await {
                // Stopping with records whose outcome is not final: no checkpoint past them.
                return;
            }
            last_checkpoint = last;
            save(&mapping, store.as_ref(), &shard, &last_checkpoint, false).await;
        }
        if end_of_shard && buffer.is_empty() {
            save(&mapping, store.as_ref(), &shard, &last_checkpoint, true).await;
            tracing::info!(source = %mapping.name, %shard, "shard closed and fully processed");
            return;
        }
    }
}

async fn save(
    mapping: &Mapping,
    store: &dyn StateStore,
    shard: &str,
    sequence: &Option<String>,
    finished: bool,
) {
    let checkpoint = Checkpoint {
        sequence: sequence.clone(),
        finished,
    };
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        match store
            .put_checkpoint(&mapping.name, shard, &checkpoint)
            .await
        {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(source = %mapping.name, %shard, error = %e, "cannot save the checkpoint; retrying");
                if mapping.stop.is_cancelled() {
                    // The records are final; without a checkpoint they are read again after a
                    // restart (at least once), never lost.
                    return;
                }
                tokio::time::sleep(backoff.advance()).await;
            }
        }
    }
}

fn read_error(mapping: &Mapping, shard: &str, e: &ReadError) {
    metrics::counter!(m::MAPPING_READ_ERRORS, "source" => mapping.name.clone()).increment(1);
    tracing::warn!(source = %mapping.name, %shard, error = %e, "cannot read the shard");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_always_lands_in_the_same_lane() {
        for key in ["a", "b", "order-17", ""] {
            let lane = lane_of(key, 7);
            assert!(lane < 7);
            assert_eq!(lane, lane_of(key, 7));
        }
        let spread: HashSet<usize> = (0..100).map(|i| lane_of(&format!("k{i}"), 4)).collect();
        assert_eq!(spread.len(), 4, "keys spread over every lane");
    }
}
