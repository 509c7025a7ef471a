//! In-flight calls and the hard stop, shared by every front.
//!
//! Every generation call holds a [`CallGuard`] for its whole life (a streaming call hands it to its
//! forwarding task), so "in flight" counts streams until their last chunk.

use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::watch;

/// Counts calls in flight and broadcasts the hard stop.
#[derive(Debug)]
pub(crate) struct Calls {
    in_flight: watch::Sender<usize>,
    stopped: watch::Sender<bool>,
    gauge: IntGauge,
}

/// Counts one call as in flight until dropped.
#[derive(Debug)]
pub struct CallGuard {
    calls: Arc<Calls>,
}

impl Calls {
    /// `gauge` mirrors the in-flight count for Prometheus.
    pub(crate) fn new(gauge: IntGauge) -> Arc<Self> {
        Arc::new(Self {
            in_flight: watch::channel(0).0,
            stopped: watch::channel(false).0,
            gauge,
        })
    }

    /// Counts a call until the guard drops.
    pub(crate) fn enter(self: &Arc<Self>) -> CallGuard {
        self.in_flight.send_modify(|n| *n += 1);
        self.gauge.inc();
        CallGuard {
            calls: Arc::clone(self),
        }
    }

    /// Calls in flight now.
    pub(crate) fn in_flight(&self) -> usize {
        *self.in_flight.borrow()
    }

    /// Resolves once no call is in flight.
    pub(crate) async fn wait_idle(&self) {
        let mut rx = self.in_flight.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail while we borrow it.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Tells every call still running to give up.
    pub(crate) fn hard_stop(&self) {
        self.stopped.send_replace(true);
    }

    /// Resolves when [`Calls::hard_stop`] has been called.
    pub(crate) async fn stopped(&self) {
        let mut rx = self.stopped.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.calls.in_flight.send_modify(|n| *n -= 1);
        self.calls.gauge.dec();
    }
}
