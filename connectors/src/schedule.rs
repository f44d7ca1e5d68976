//! `type: schedule`: invoke a function at a fixed rate with EventBridge's scheduled-event
//! payload, or with the configured `input`.
//!
//! A rate schedule remembers its last tick in a [`TickStore`] (the broker's state store), so
//! that a restart continues its rhythm: `rate: 1 day` fires once a day, not at every start.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::cloudwatch_events::CloudWatchEvent;
use bytes::Bytes;
use sluice_config::{Schedule, ScheduleConfig};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::Dispatch;

pub const SCHEDULE_EVENTS: &str = "sluice_schedule_events_total";
pub const SCHEDULE_FAILURES: &str = "sluice_schedule_failures_total";

/// Where a rate schedule remembers when it last fired (ms since the Unix epoch).
#[async_trait::async_trait]
pub trait TickStore: Send + Sync + 'static {
    async fn last_tick(&self, source: &str) -> Result<Option<i64>, TickStoreError>;
    async fn record_tick(&self, source: &str, tick_ms: i64) -> Result<(), TickStoreError>;
}

pub type TickStoreError = Box<dyn std::error::Error + Send + Sync>;

pub struct ScheduleSource {
    name: String,
    function: String,
    config: ScheduleConfig,
    region: String,
    account: String,
}

impl ScheduleSource {
    pub fn new(
        name: &str,
        function: &str,
        config: ScheduleConfig,
        region: &str,
        account: &str,
    ) -> Self {
        Self {
            name: name.to_string(),
            function: function.to_string(),
            config,
            region: region.to_string(),
            account: account.to_string(),
        }
    }

    /// When the tick after `now` fires; `None` when a cron schedule has no future time.
    fn next_after(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        match &self.config.schedule {
            Schedule::Rate(d) => chrono::Duration::from_std(*d).ok().map(|d| now + d),
            Schedule::Cron { cron, .. } => cron::Schedule::from_str(cron).ok()?.after(&now).next(),
        }
    }

    /// The event for one tick, in the shape EventBridge delivers to Lambda.
    pub fn event(&self, now: chrono::DateTime<chrono::Utc>) -> Bytes {
        let body = match &self.config.input {
            Some(input) => serde_json::to_vec(input),
            None => {
                let mut event = CloudWatchEvent::<serde_json::Value>::default();
                event.version = Some("0".into());
                event.id = Some(uuid::Uuid::new_v4().to_string());
                event.detail_type = Some("Scheduled Event".into());
                event.source = Some("aws.events".into());
                event.account_id = Some(self.account.clone());
                // EventBridge stamps the scheduled time to the second.
                event.time = chrono::DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now);
                event.region = Some(self.region.clone());
                event.resources = vec![format!(
                    "arn:aws:events:{}:{}:rule/{}",
                    self.region, self.account, self.name
                )];
                event.detail = Some(serde_json::json!({}));
                serde_json::to_vec(&event)
            }
        };
        Bytes::from(body.unwrap_or_default())
    }

    /// How long after start a rate schedule first fires: at once the first time, otherwise one
    /// period after the last recorded tick (at once if that time has passed while Sluice was
    /// stopped: the missed ticks collapse into one).
    async fn first_delay(&self, period: Duration, ticks: &dyn TickStore) -> Duration {
        let last = match ticks.last_tick(&self.name).await {
            Ok(last) => last,
            Err(e) => {
                tracing::warn!(source = %self.name, error = %e,
                    "cannot read the schedule's last tick; firing as on a first start");
                None
            }
        };
        let Some(last) = last else {
            return Duration::ZERO;
        };
        let since = chrono::Utc::now().timestamp_millis().saturating_sub(last);
        let since = Duration::from_millis(u64::try_from(since).unwrap_or(0));
        period.saturating_sub(since)
    }

    /// Ticks until `stop` is cancelled. A rate schedule fires every period, continuing from its
    /// last recorded tick; a cron schedule at its times (UTC, as EventBridge). Each tick queues
    /// one asynchronous invocation; ticks missed while Sluice was busy are skipped, not made
    /// up.
    pub async fn run(
        self,
        dispatch: Arc<dyn Dispatch>,
        ticks: Arc<dyn TickStore>,
        stop: CancellationToken,
    ) {
        let labels = [
            ("source", self.name.clone()),
            ("function", self.function.clone()),
        ];
        let mut ticker = match &self.config.schedule {
            Schedule::Rate(period) => {
                let first = self.first_delay(*period, ticks.as_ref()).await;
                let mut t = tokio::time::interval_at(tokio::time::Instant::now() + first, *period);
                t.set_missed_tick_behavior(MissedTickBehavior::Skip);
                Some(t)
            }
            Schedule::Cron { .. } => None,
        };
        loop {
            let tick = async {
                match ticker.as_mut() {
                    Some(t) => {
                        t.tick().await;
                        true
                    }
                    None => {
                        let now = chrono::Utc::now();
                        let Some(next) = self.next_after(now) else {
                            return false;
                        };
                        tokio::time::sleep((next - now).to_std().unwrap_or_default()).await;
                        true
                    }
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                more = tick => if !more {
                    tracing::info!(source = %self.name, "the cron schedule has no future times");
                    return;
                },
            }
            metrics::counter!(SCHEDULE_EVENTS, &labels).increment(1);
            let now = chrono::Utc::now();
            let event = self.event(now);
            // EventBridge invokes asynchronously: the event is queued durably and gets the
            // function's retries and on_failure destination.
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = dispatch.invoke_async(&self.function, event) => outcome,
            };
            if let Err(e) = outcome {
                metrics::counter!(SCHEDULE_FAILURES, &labels).increment(1);
                tracing::warn!(source = %self.name, function = %self.function, error = %e,
                    "cannot queue the scheduled event");
                continue;
            }
            // Recorded once the event is queued: a crash in between fires the tick again at the
            // next start rather than losing it.
            if ticker.is_some()
                && let Err(e) = ticks.record_tick(&self.name, now.timestamp_millis()).await
            {
                tracing::warn!(source = %self.name, error = %e,
                    "cannot record the schedule's tick; a restart may fire it again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    #[test]
    fn cron_schedules_fire_at_their_times_in_utc() {
        // EventBridge `0 12 * * ? *`: noon every day.
        let src = ScheduleSource::new(
            "noon",
            "f",
            ScheduleConfig {
                schedule: Schedule::Cron {
                    expression: "0 12 * * ? *".into(),
                    cron: "0 0 12 * * * *".into(),
                },
                input: None,
            },
            "us-east-1",
            "000000000000",
        );
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-26T13:00:00Z")
            .expect("t")
            .with_timezone(&chrono::Utc);
        let next = src.next_after(now).expect("a future time");
        assert_eq!(next.to_rfc3339(), "2026-11-27T12:00:00+00:00");
    }

    fn source(input: Option<serde_json::Value>, every: Duration) -> ScheduleSource {
        ScheduleSource::new(
            "nightly",
            "f",
            ScheduleConfig {
                schedule: Schedule::Rate(every),
                input,
            },
            "us-east-1",
            "000000000000",
        )
    }

    #[test]
    fn scheduled_event_has_eventbridges_shape() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-26T18:00:00.750Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        let event: serde_json::Value =
            serde_json::from_slice(&source(None, Duration::from_secs(60)).event(now))
                .expect("json");
        assert_eq!(event["source"], "aws.events");
        assert_eq!(event["detail-type"], "Scheduled Event");
        assert_eq!(event["account"], "000000000000");
        assert_eq!(event["region"], "us-east-1");
        assert_eq!(event["time"], "2026-11-26T18:00:00Z");
        assert_eq!(
            event["resources"][0],
            "arn:aws:events:us-east-1:000000000000:rule/nightly"
        );
        assert_eq!(event["detail"], serde_json::json!({}));
        assert_eq!(event["version"], "0");
    }

    #[test]
    fn configured_input_replaces_the_payload() {
        let input = serde_json::json!({"job": "compact"});
        let body = source(Some(input.clone()), Duration::from_secs(60)).event(chrono::Utc::now());
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).expect("json"),
            input
        );
    }

    struct Recorder(Mutex<Vec<(String, Bytes)>>);

    impl Dispatch for Recorder {
        fn invoke<'a>(&'a self, _: &'a str, _: Bytes) -> crate::DispatchFuture<'a> {
            Box::pin(async {
                Err(crate::DispatchError::NotFound(
                    "schedules invoke asynchronously".into(),
                ))
            })
        }

        fn invoke_async<'a>(
            &'a self,
            function: &'a str,
            payload: Bytes,
        ) -> crate::DispatchFuture<'a, String> {
            self.0
                .lock()
                .expect("lock")
                .push((function.to_string(), payload));
            Box::pin(async { Ok("request".to_string()) })
        }
    }

    /// Ticks in memory, for the rhythm; the state store's own table is tested with the store.
    #[derive(Default)]
    struct Ticks(Mutex<Option<i64>>);

    #[async_trait::async_trait]
    impl TickStore for Ticks {
        async fn last_tick(&self, _: &str) -> Result<Option<i64>, TickStoreError> {
            Ok(*self.0.lock().expect("lock"))
        }

        async fn record_tick(&self, _: &str, tick_ms: i64) -> Result<(), TickStoreError> {
            *self.0.lock().expect("lock") = Some(tick_ms);
            Ok(())
        }
    }

    /// Runs a 10 s rate schedule for `run_for` of paused, auto-advanced time; returns the
    /// number of ticks.
    async fn ticks_within(ticks: Arc<Ticks>, run_for: Duration) -> usize {
        let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
        let stop = CancellationToken::new();
        let task = tokio::spawn(source(None, Duration::from_secs(10)).run(
            recorder.clone(),
            ticks,
            stop.clone(),
        ));
        tokio::time::sleep(run_for).await;
        stop.cancel();
        task.await.expect("joined");
        let calls = recorder.0.lock().expect("lock");
        assert!(calls.iter().all(|(f, _)| f == "f"));
        calls.len()
    }

    #[tokio::test(start_paused = true)]
    async fn ticks_at_the_rate_from_the_first_start_and_records_each_tick() {
        let ticks = Arc::new(Ticks::default());
        let before = chrono::Utc::now().timestamp_millis();
        assert_eq!(
            ticks_within(ticks.clone(), Duration::from_secs(35)).await,
            4,
            "ticks at 0, 10, 20 and 30 s"
        );
        assert!(ticks.0.lock().expect("lock").is_some_and(|t| t >= before));
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_continues_from_the_last_tick_instead_of_firing_at_once() {
        // The last tick was 4 s ago (wall clock): the next is due 6 s after the start.
        let ticks = Arc::new(Ticks(Mutex::new(Some(
            chrono::Utc::now().timestamp_millis() - 4_000,
        ))));
        assert_eq!(ticks_within(ticks.clone(), Duration::from_secs(5)).await, 0);
        let ticks = Arc::new(Ticks(Mutex::new(Some(
            chrono::Utc::now().timestamp_millis() - 4_000,
        ))));
        assert_eq!(ticks_within(ticks, Duration::from_secs(7)).await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn ticks_missed_while_stopped_collapse_into_one_at_start() {
        let ticks = Arc::new(Ticks(Mutex::new(Some(
            chrono::Utc::now().timestamp_millis() - 3_600_000,
        ))));
        assert_eq!(ticks_within(ticks, Duration::from_secs(1)).await, 1);
    }
}
