//! Lambda's concurrency model: an account-wide limit, reserved concurrency carved out of it
//! per function, and the rest shared, with at least 100 always left unreserved; and the
//! guard that keeps the concurrent-executions gauge and the invocation counter true.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge};
use thiserror::Error;

/// Lambda keeps this much of the account's limit unreserved.
pub const MIN_UNRESERVED: u32 = 100;

/// Why an invocation was refused before it ran.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum Throttle {
    #[error("Rate Exceeded.")]
    Reserved,
    #[error("Rate Exceeded.")]
    Account,
    /// No execution environment was free, and none could start, within the function's
    /// timeout (a burst beyond the environment start limits).
    #[error("Rate Exceeded.")]
    Scaling,
}

impl Throttle {
    /// The `Reason` field Lambda puts in a `TooManyRequestsException`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Reserved => "ReservedFunctionConcurrentInvocationLimitExceeded",
            Self::Account => "ConcurrentInvocationLimitExceeded",
            Self::Scaling => "FunctionInvocationRateLimitExceeded",
        }
    }
}

#[derive(Debug, Default)]
struct PerFunction {
    reserved: Option<u32>,
    in_use: u32,
}

#[derive(Debug)]
struct State {
    limit: u32,
    reserved_total: u32,
    unreserved_in_use: u32,
    functions: HashMap<String, PerFunction>,
}

#[derive(Debug)]
pub struct Concurrency {
    state: Mutex<State>,
}

/// Held while an invocation runs.
#[derive(Debug)]
pub struct Permit {
    owner: Arc<Concurrency>,
    function: String,
    reserved: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.owner.lock();
        if self.reserved {
            if let Some(f) = s.functions.get_mut(&self.function) {
                f.in_use = f.in_use.saturating_sub(1);
            }
        } else {
            s.unreserved_in_use = s.unreserved_in_use.saturating_sub(1);
        }
    }
}

/// An invocation in progress, as the metrics see it: the concurrent-executions gauge is up
/// while it lives and the invocation is counted when it ends, on every way out (result, error,
/// panic, or the invocation's future being dropped by a caller that went away), so that the
/// gauge cannot drift from what is actually running.
#[derive(Debug)]
pub struct RunningInvocation {
    gauge: Gauge,
    invocations: Counter,
    ran: bool,
}

impl RunningInvocation {
    pub fn start(gauge: Gauge, invocations: Counter) -> Self {
        gauge.increment(1.0);
        Self {
            gauge,
            invocations,
            ran: true,
        }
    }

    /// The invocation was throttled before it ran (no environment could be had in time): a
    /// throttle, not an invocation, as Lambda counts them.
    pub fn throttled(mut self) {
        self.ran = false;
    }
}

impl Drop for RunningInvocation {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
        if self.ran {
            self.invocations.increment(1);
        }
    }
}

impl Concurrency {
    pub fn new(limit: u32) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                limit,
                reserved_total: 0,
                unreserved_in_use: 0,
                functions: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn limit(&self) -> u32 {
        self.lock().limit
    }

    /// The most a function may reserve now, given what the others hold.
    pub fn max_reservable(&self, function: &str) -> u32 {
        let s = self.lock();
        let own = s
            .functions
            .get(function)
            .and_then(|f| f.reserved)
            .unwrap_or(0);
        s.limit
            .saturating_sub(MIN_UNRESERVED)
            .saturating_sub(s.reserved_total - own)
    }

    /// Sets (or with `None` removes) a function's reserved concurrency. Refused when it would
    /// leave fewer than 100 unreserved, with Lambda's message.
    pub fn set_reserved(&self, function: &str, reserved: Option<u32>) -> Result<(), String> {
        let max = self.max_reservable(function);
        let mut s = self.lock();
        let new = reserved.unwrap_or(0);
        if new > max {
            return Err(format!(
                "Specified ReservedConcurrentExecutions for function decreases account's UnreservedConcurrentExecution below its minimum value of [{MIN_UNRESERVED}]."
            ));
        }
        let entry = s.functions.entry(function.to_string()).or_default();
        let old = entry.reserved.unwrap_or(0);
        entry.reserved = reserved;
        s.reserved_total = s.reserved_total - old + new;
        Ok(())
    }

    pub fn reserved(&self, function: &str) -> Option<u32> {
        self.lock().functions.get(function).and_then(|f| f.reserved)
    }

    /// How many more invocations of `function` could start right now.
    pub fn available(&self, function: &str) -> u32 {
        let s = self.lock();
        match s
            .functions
            .get(function)
            .and_then(|f| f.reserved.map(|r| (r, f.in_use)))
        {
            Some((reserved, in_use)) => reserved.saturating_sub(in_use),
            None => (s.limit - s.reserved_total).saturating_sub(s.unreserved_in_use),
        }
    }

    pub fn try_acquire(self: &Arc<Self>, function: &str) -> Result<Permit, Throttle> {
        let mut s = self.lock();
        let unreserved_capacity = s.limit - s.reserved_total;
        let entry = s.functions.entry(function.to_string()).or_default();
        let reserved = match entry.reserved {
            Some(limit) => {
                if entry.in_use >= limit {
                    return Err(Throttle::Reserved);
                }
                entry.in_use += 1;
                true
            }
            None => {
                if s.unreserved_in_use >= unreserved_capacity {
                    return Err(Throttle::Account);
                }
                s.unreserved_in_use += 1;
                false
            }
        };
        Ok(Permit {
            owner: self.clone(),
            function: function.to_string(),
            reserved,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_functions_run_within_their_reservation_only() {
        let c = Concurrency::new(1000);
        c.set_reserved("f", Some(2)).expect("reserve");
        let a = c.try_acquire("f").expect("first");
        let _b = c.try_acquire("f").expect("second");
        assert_eq!(c.try_acquire("f").map(|_| ()), Err(Throttle::Reserved));
        drop(a);
        assert!(
            c.try_acquire("f").is_ok(),
            "a finished invocation frees its slot"
        );
    }

    #[test]
    fn reserved_zero_throttles_everything() {
        let c = Concurrency::new(1000);
        c.set_reserved("off", Some(0)).expect("reserve 0");
        assert_eq!(c.try_acquire("off").map(|_| ()), Err(Throttle::Reserved));
    }

    #[test]
    fn unreserved_functions_share_what_is_left() {
        let c = Concurrency::new(102);
        c.set_reserved("big", Some(2)).expect("reserve");
        let held: Vec<_> = (0..100)
            .map(|i| {
                c.try_acquire(if i % 2 == 0 { "a" } else { "b" })
                    .expect("slot")
            })
            .collect();
        assert_eq!(c.try_acquire("a").map(|_| ()), Err(Throttle::Account));
        assert!(
            c.try_acquire("big").is_ok(),
            "reservations are not touched by the others"
        );
        drop(held);
        assert_eq!(c.available("a"), 100);
    }

    #[test]
    fn at_least_100_stay_unreserved() {
        let c = Concurrency::new(1000);
        c.set_reserved("a", Some(800)).expect("800 fits");
        assert!(c.set_reserved("b", Some(101)).is_err());
        c.set_reserved("b", Some(100)).expect("100 fits");
        c.set_reserved("a", None).expect("remove");
        c.set_reserved("b", Some(900)).expect("now 900 fits");
        assert_eq!(c.max_reservable("b"), 900);
    }
}
