//! The audit trail's writer: the bounded channel the API hands events to, and the one task
//! that writes them to the file and the state store, in batches.
//!
//! An API call never waits for the trail: `record` only tries to queue. A full queue (the
//! disk or the store slower than the calls) or a failed write loses the event, which is
//! counted in `sluice_audit_dropped_total{sink}` and logged once per episode: when the first
//! event is lost, and again when events get through.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::file::AuditFile;
use crate::metrics as m;
use crate::state::{AuditRecord, StateStore};

/// Events waiting for the writer. Management calls are seldom; a backlog this long means the
/// writer is stuck, and holding more would only cost memory.
const QUEUE: usize = 4_096;
/// Events written in one batch (one file sync, one store transaction).
const BATCH: usize = 256;
/// How often expired events are purged from the store.
const PURGE_EVERY: Duration = Duration::from_secs(3_600);

/// An episode of lost events, per place they are lost at, logged when it starts and ends.
#[derive(Default)]
struct Episode(AtomicBool);

impl Episode {
    fn lost(&self, sink: &'static str, count: usize, why: &dyn std::fmt::Display) {
        metrics::counter!(m::AUDIT_DROPPED, "sink" => sink).increment(count as u64);
        if !self.0.swap(true, Ordering::Relaxed) {
            tracing::error!(sink, error = %why, "audit events are being lost; counting them in sluice_audit_dropped_total until they get through again");
        }
    }

    fn through(&self, sink: &'static str) {
        if self.0.swap(false, Ordering::Relaxed) {
            tracing::info!(sink, "audit events get through again");
        }
    }
}

/// An event with when it was recorded, in milliseconds: the store orders and filters by it
/// (`eventTime` has CloudTrail's whole seconds, too coarse to order calls by).
struct Stamped {
    event: Value,
    at_ms: i64,
}

/// The events a test trail recorded ([`AuditTrail::channel`]).
#[cfg(test)]
pub(crate) struct Recorded(mpsc::Receiver<Stamped>);

#[cfg(test)]
impl Recorded {
    pub(crate) fn try_recv(&mut self) -> Result<Value, mpsc::error::TryRecvError> {
        self.0.try_recv().map(|s| s.event)
    }
}

/// Where the API hands its audit events; cheap to clone.
#[derive(Clone)]
pub struct AuditTrail {
    tx: mpsc::Sender<Stamped>,
    full: Arc<Episode>,
}

impl AuditTrail {
    /// Starts the writer: to `file` when given, and to `store`. The writer ends once every
    /// `AuditTrail` is dropped and what was queued is written.
    pub fn start(
        config: &sluice_config::AuditConfig,
        store: Arc<dyn StateStore>,
    ) -> (AuditTrail, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let file = config
            .path
            .clone()
            .map(|path| AuditFile::new(path, config.max_file_size, config.max_files));
        let writer = tokio::spawn(write(rx, file, store));
        (
            AuditTrail {
                tx,
                full: Arc::default(),
            },
            writer,
        )
    }

    /// A trail whose events go to the returned receiver, for tests of what is recorded.
    #[cfg(test)]
    pub(crate) fn channel(capacity: usize) -> (AuditTrail, Recorded) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            AuditTrail {
                tx,
                full: Arc::default(),
            },
            Recorded(rx),
        )
    }

    /// Queues an event, or counts it lost if the queue is full; never waits.
    pub(crate) fn record(&self, event: Value) {
        let at_ms = chrono::Utc::now().timestamp_millis();
        match self.tx.try_send(Stamped { event, at_ms }) {
            Ok(()) => self.full.through("queue"),
            Err(e) => self.full.lost("queue", 1, &e),
        }
    }

    /// Records the configuration Sluice started with.
    pub fn configuration_loaded(&self, config: &sluice_config::Config) {
        self.record(super::event::configuration_loaded(
            &config.origin,
            config.source_sha256.as_deref(),
        ));
    }
}

async fn write(
    mut rx: mpsc::Receiver<Stamped>,
    mut file: Option<AuditFile>,
    store: Arc<dyn StateStore>,
) {
    let file_episode = Episode::default();
    let store_episode = Episode::default();
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let records: Vec<AuditRecord> = batch.drain(..).filter_map(record_of).collect();
        if let Some(mut f) = file.take() {
            let lines: Vec<Vec<u8>> = records
                .iter()
                .map(|r| {
                    let mut line = r.event.clone().into_bytes();
                    line.push(b'\n');
                    line
                })
                .collect();
            let count = lines.len();
            let (f, outcome) = match tokio::task::spawn_blocking(move || {
                let outcome = f.append(&lines);
                (f, outcome)
            })
            .await
            {
                Ok((f, outcome)) => (Some(f), outcome),
                Err(e) => (None, Err(std::io::Error::other(e))),
            };
            match outcome {
                Ok(()) => file_episode.through("file"),
                Err(e) => file_episode.lost("file", count, &e),
            }
            file = f;
        }
        match store.put_audit_events(&records).await {
            Ok(()) => store_episode.through("store"),
            Err(e) => store_episode.lost("store", records.len(), &e),
        }
    }
}

/// The store's row for an event; `None` (never in practice) for an event without an id.
fn record_of(Stamped { event, at_ms }: Stamped) -> Option<AuditRecord> {
    let event_id = event.get("eventID")?.as_str()?.to_owned();
    let event_time_ms = at_ms;
    let event_name = event
        .get("eventName")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let principal = event
        .pointer("/userIdentity/userName")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Some(AuditRecord {
        event_id,
        event_time_ms,
        event_name,
        principal,
        event: event.to_string(),
    })
}

/// Purges events older than `retention` now and then every hour, until `stop`.
pub async fn purge_expired(
    store: Arc<dyn StateStore>,
    retention: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let before = chrono::Utc::now().timestamp_millis()
            - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        match store.purge_audit_events(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired audit events purged"),
            // The store counts and logs its own failures; the next round tries again.
            Err(e) => tracing::debug!(error = %e, "cannot purge expired audit events"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(PURGE_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AuditQuery, SqliteStore};

    #[tokio::test]
    async fn events_past_the_retention_are_purged() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("s.db");
        let store: Arc<dyn StateStore> = Arc::new(SqliteStore::open(&path).await.expect("open"));
        let now = chrono::Utc::now().timestamp_millis();
        let day = 24 * 3_600 * 1_000;
        let record = |id: &str, at: i64| AuditRecord {
            event_id: id.into(),
            event_time_ms: at,
            event_name: "PublishVersion".into(),
            principal: None,
            event: "{}".into(),
        };
        store
            .put_audit_events(&[
                record("old", now - 91 * day),
                record("recent", now - 89 * day),
            ])
            .await
            .expect("put");
        let stop = tokio_util::sync::CancellationToken::new();
        stop.cancel();
        // One round, then it sees the stop.
        purge_expired(store.clone(), Duration::from_secs(90 * 24 * 3_600), stop).await;
        let left = crate::state::audit_events(
            &format!("sqlite://{}", path.display()),
            dir.path(),
            &AuditQuery {
                limit: 10,
                ..AuditQuery::default()
            },
        )
        .await
        .expect("read");
        let ids: Vec<_> = left.into_iter().map(|r| r.event_id).collect();
        assert_eq!(ids, ["recent"]);
    }

    #[test]
    fn a_full_queue_drops_the_event_instead_of_waiting() {
        let (trail, mut rx) = AuditTrail::channel(1);
        trail.record(serde_json::json!({"eventID": "1"}));
        trail.record(serde_json::json!({"eventID": "2"}));
        assert_eq!(rx.try_recv().expect("first")["eventID"], "1");
        assert!(rx.try_recv().is_err(), "the second was dropped, not queued");
        assert!(trail.full.0.load(Ordering::Relaxed), "the episode is open");
        trail.record(serde_json::json!({"eventID": "3"}));
        assert!(
            !trail.full.0.load(Ordering::Relaxed),
            "and closed once one gets through"
        );
    }
}
