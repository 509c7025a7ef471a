//! Draining: who is in flight, whether new calls are taken, and the hard stop.
//!
//! Every Inference call holds a [`CallGuard`] for its whole life (a streaming call hands it to its
//! forwarding task), so "in flight" counts streams until their last chunk. Shutdown sets
//! `draining` (new calls → UNAVAILABLE), waits for the count to reach zero, and after the drain
//! timeout flips `stopped`, which every call watches to give up at once.

// `tonic::Status` (176 bytes) is what handlers return; boxing it would only add conversions.
#![allow(clippy::result_large_err)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::watch;
use tonic::Status;

/// Shared by the Inference service and `run`.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    draining: AtomicBool,
    in_flight: watch::Sender<usize>,
    stopped: watch::Sender<bool>,
    gauge: IntGauge,
}

/// Counts one call as in flight until dropped.
#[derive(Debug)]
pub(crate) struct CallGuard {
    lifecycle: Arc<Lifecycle>,
}

impl Lifecycle {
    /// `gauge` mirrors the in-flight count for Prometheus.
    pub(crate) fn new(gauge: IntGauge) -> Arc<Self> {
        Arc::new(Self {
            draining: AtomicBool::new(false),
            in_flight: watch::channel(0).0,
            stopped: watch::channel(false).0,
            gauge,
        })
    }

    /// Admits a call, or UNAVAILABLE when the node is draining.
    pub(crate) fn admit(self: &Arc<Self>) -> Result<CallGuard, Status> {
        // Count first, then check: a call that slips in while `start_drain` runs is either
        // refused here or seen by `wait_idle`, never lost.
        self.in_flight.send_modify(|n| *n += 1);
        self.gauge.inc();
        let guard = CallGuard {
            lifecycle: Arc::clone(self),
        };
        if self.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable(
                "node is draining and takes no new requests; retry on another node",
            ));
        }
        Ok(guard)
    }

    /// New calls are refused from now on.
    pub(crate) fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
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

    /// Resolves when [`Lifecycle::hard_stop`] has been called.
    pub(crate) async fn stopped(&self) {
        let mut rx = self.stopped.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.lifecycle.in_flight.send_modify(|n| *n -= 1);
        self.lifecycle.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn draining_refuses_new_calls_and_waits_for_old_ones() {
        let lifecycle = Lifecycle::new(IntGauge::new("g", "g").unwrap());
        let guard = lifecycle.admit().unwrap();
        lifecycle.start_drain();
        let status = lifecycle.admit().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(lifecycle.in_flight(), 1);
        let waiter = tokio::spawn({
            let lifecycle = Arc::clone(&lifecycle);
            async move { lifecycle.wait_idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(guard);
        waiter.await.unwrap();
        assert_eq!(lifecycle.gauge.get(), 0);
    }
}
