//! The one backoff every loop that waits after a failure uses: reconnecting to a source,
//! reopening a shard, saving a checkpoint, committing an offset, writing a dead letter.
//! Delays double from a minimum to a maximum with jitter (backon's exponential backoff), so
//! that many shards or instances that failed together do not retry in lockstep.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// Growing delays between tries of one failing operation.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    next: Duration,
}

impl Backoff {
    /// Delays from `min` doubling to `max`; each with a random jitter of up to itself added,
    /// so a delay lies in `[d, 2d)`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        let mut delays = builder.build();
        let next = delays.next().unwrap_or(max);
        Backoff {
            builder,
            delays,
            next,
        }
    }

    /// The delay the next [`Backoff::wait`] sleeps.
    pub fn delay(&self) -> Duration {
        self.next
    }

    /// Takes the next delay without sleeping it (for loops that sleep in a `select!` of their
    /// own).
    pub fn advance(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.delays.next().unwrap_or(delay);
        delay
    }

    /// Sleeps the next delay; `true` when `stop` was cancelled meanwhile (the caller returns).
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let delay = self.advance();
        tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
        }
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
        self.next = self.delays.next().unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    #[test]
    fn delays_double_within_their_jitter_and_stop_growing_at_the_maximum() {
        let mut backoff = Backoff::new(MIN, MAX);
        let mut base = MIN;
        for _ in 0..10 {
            let delay = backoff.advance();
            assert!(
                delay >= base && delay < base * 2 + Duration::from_millis(1),
                "{delay:?} outside [{base:?}, {:?})",
                base * 2
            );
            base = (base * 2).min(MAX);
        }
    }

    #[test]
    fn a_reset_starts_again_from_the_minimum() {
        let mut backoff = Backoff::new(MIN, MAX);
        for _ in 0..6 {
            backoff.advance();
        }
        assert!(backoff.delay() >= MAX);
        backoff.reset();
        assert!(backoff.delay() < MIN * 2);
    }

    #[tokio::test]
    async fn waiting_ends_early_when_stopped() {
        let stop = CancellationToken::new();
        stop.cancel();
        let mut backoff = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        assert!(backoff.wait(&stop).await);
    }
}
