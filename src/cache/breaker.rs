//! Circuit breaker in front of Redis: after `failures` consecutive failures Redis is skipped for
//! `cooldown`, then one probe call decides whether to close again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

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

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { since: Instant },
}

/// Thread-safe breaker; every method holds the lock for a few instructions only.
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// Whether a call may go to Redis now. When the cooldown is over, exactly one caller gets
    /// `true` (the probe); a probe that never reports is replaced after another cooldown.
    pub fn allow(&self) -> bool {
        let mut s = self.lock();
        let now = Instant::now();
        match *s {
            State::Closed { .. } => true,
            State::Open { until } if now >= until => {
                *s = State::HalfOpen { since: now };
                true
            }
            State::Open { .. } => false,
            State::HalfOpen { since } if now.duration_since(since) >= self.cooldown => {
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
            until: Instant::now() + self.cooldown,
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

    /// The breaker reads `Instant::now()` itself (no injected clock), so the assertions that
    /// something is still closed off within the cooldown are made only when the test can show
    /// less than the cooldown passed (a descheduled thread then skips them, saying so, instead of
    /// failing), and the ones after it follow a sleep longer than the cooldown. Nothing depends
    /// on a sleep being short.
    #[test]
    fn opens_after_threshold_and_probes_once_after_cooldown() {
        const COOLDOWN: Duration = Duration::from_millis(100);
        let within = |since: Instant, what: &str, check: &dyn Fn() -> bool| {
            let ok = check();
            if since.elapsed() < COOLDOWN {
                assert!(ok, "{what}");
            } else {
                eprintln!("skipped `{what}`: the thread was descheduled for a whole cooldown");
            }
        };
        let b = Breaker::new(3, COOLDOWN);
        b.on_failure();
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow(), "closed below the threshold");
        let opened = Instant::now();
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
        within(opened, "no call while open", &|| !b.allow());
        std::thread::sleep(COOLDOWN + Duration::from_millis(10));
        let probe = Instant::now();
        assert!(b.allow(), "probe after cooldown");
        within(probe, "only one probe", &|| !b.allow());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let reopened = Instant::now();
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
        within(
            reopened,
            "a failed probe reopens for a whole cooldown",
            &|| !b.allow(),
        );
        std::thread::sleep(COOLDOWN + Duration::from_millis(10));
        assert!(b.allow());
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow());
        assert!(b.allow(), "closed again: every call goes through");
    }

    #[test]
    fn a_lost_probe_is_replaced_after_another_cooldown() {
        let b = Breaker::new(1, Duration::from_millis(50));
        b.on_failure();
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.allow(), "probe");
        // The probe never reports back: after another cooldown a new one may go.
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.allow(), "replacement probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_secs(60));
        b.on_failure();
        b.on_success();
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
