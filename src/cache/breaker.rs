//! Circuit breaker in front of Redis: after `failures` consecutive failures Redis is skipped for
//! `cooldown`, then one probe call decides whether to close again. Time comes from the cache's
//! [`Clock`], so tests drive the cooldown with a [`ManualClock`](super::ManualClock).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Clock;

/// Breaker position, as exported in the `breaker_state` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through (gauge 0).
    Closed,
    /// Calls are skipped (gauge 1).
    Open,
    /// One probe is in flight (gauge 2).
    HalfOpen,
}

impl BreakerState {
    /// Value of the gauge.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

/// Times are the clock's milliseconds.
#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: u64 },
    HalfOpen { since: u64 },
}

/// Thread-safe breaker; every method holds the lock for a few instructions only.
pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown_ms: u64,
    clock: Arc<dyn Clock>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(threshold: u32, cooldown: Duration, clock: Arc<dyn Clock>) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown_ms: u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX),
            clock,
        }
    }

    /// Whether a call may go to Redis now. When the cooldown is over, exactly one caller gets
    /// `true` (the probe); a probe that never reports is replaced after another cooldown.
    pub fn allow(&self) -> bool {
        let mut s = self.lock();
        let now = self.clock.now_ms();
        match *s {
            State::Closed { .. } => true,
            State::Open { until } if now >= until => {
                *s = State::HalfOpen { since: now };
                true
            }
            State::Open { .. } => false,
            State::HalfOpen { since } if now.saturating_sub(since) >= self.cooldown_ms => {
                *s = State::HalfOpen { since: now };
                true
            }
            State::HalfOpen { .. } => false,
        }
    }

    /// A call succeeded: close.
    pub fn on_success(&self) {
        *self.lock() = State::Closed { failures: 0 };
    }

    /// A call failed or timed out: count it, open at the threshold, reopen after a failed probe.
    pub fn on_failure(&self) {
        let mut s = self.lock();
        let open = State::Open {
            until: self.clock.now_ms().saturating_add(self.cooldown_ms),
        };
        *s = match *s {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            _ => open,
        };
    }

    /// Current position.
    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is always valid, even if a holder panicked.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ManualClock;

    #[test]
    fn opens_after_threshold_and_probes_once_after_cooldown() {
        let clock = ManualClock::new();
        let b = Breaker::new(3, Duration::from_millis(30), Arc::new(clock.clone()));
        b.on_failure();
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow(), "closed below the threshold");
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow());
        clock.advance(Duration::from_millis(29));
        assert!(!b.allow(), "still cooling down");
        clock.advance(Duration::from_millis(1));
        assert!(b.allow(), "probe after cooldown");
        assert!(!b.allow(), "only one probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance(Duration::from_millis(30));
        assert!(b.allow());
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow());
    }

    #[test]
    fn success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_secs(60), Arc::new(ManualClock::new()));
        b.on_failure();
        b.on_success();
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
