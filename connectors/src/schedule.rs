//! `type: schedule`: invoke a function at a fixed rate with EventBridge's scheduled-event
//! payload, or with the configured `input`.

use std::str::FromStr;
use std::sync::Arc;

use aws_lambda_events::event::cloudwatch_events::CloudWatchEvent;
use bytes::Bytes;
use sluice_config::{Schedule, ScheduleConfig};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::Dispatch;

pub const SCHEDULE_EVENTS: &str = "sluice_schedule_events_total";
pub const SCHEDULE_FAILURES: &str = "sluice_schedule_failures_total";

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

    /// Ticks until `stop` is cancelled. A rate schedule fires at once and then every period; a
    /// cron schedule at its times (UTC, as EventBridge). Each tick queues one asynchronous
    /// invocation; ticks missed while Sluice was busy are skipped, not made up.
    pub async fn run(self, dispatch: Arc<dyn Dispatch>, stop: CancellationToken) {
        let labels = [
            ("source", self.name.clone()),
            ("function", self.function.clone()),
        ];
        let mut ticker = match &self.config.schedule {
            Schedule::Rate(period) => {
                let mut t = tokio::time::interval(*period);
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
            let event = self.event(chrono::Utc::now());
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

    #[tokio::test(start_paused = true)]
    async fn ticks_at_the_rate_until_stopped() {
        let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
        let stop = CancellationToken::new();
        let task =
            tokio::spawn(source(None, Duration::from_secs(10)).run(recorder.clone(), stop.clone()));
        // The first tick fires at once, then one every 10 s of (paused, auto-advanced) time.
        tokio::time::sleep(Duration::from_secs(35)).await;
        stop.cancel();
        task.await.expect("joined");
        let calls = recorder.0.lock().expect("lock");
        assert_eq!(calls.len(), 4, "ticks at 0, 10, 20 and 30 s");
        assert!(calls.iter().all(|(f, _)| f == "f"));
    }
}
