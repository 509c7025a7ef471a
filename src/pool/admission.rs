//! The bounded FIFO queue of one model, shared by its instances.
//!
//! Instances pull work between steps. An instance takes a request only when no other instance of
//! the model has more free batch slots, so work goes to the least loaded instance; an idle instance
//! waits on the condvar and is woken by each push.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::engine::instance::WorkSource;
use crate::engine::sequence::Admitted;

/// The queue was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// Admission queue and free-slot board of one model.
pub struct Admission {
    queue: Mutex<VecDeque<Admitted>>,
    ready: Condvar,
    max_queued: usize,
    free_slots: Vec<AtomicUsize>,
    running: AtomicBool,
}

impl Admission {
    /// A queue holding at most `max_queued` requests for `instances` instances of `max_batch`.
    pub fn new(max_queued: usize, instances: usize, max_batch: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            max_queued,
            free_slots: (0..instances)
                .map(|_| AtomicUsize::new(max_batch))
                .collect(),
            running: AtomicBool::new(true),
        }
    }

    /// Queue a request and return the queue depth, or `Err(QueueFull)` when it is full (the
    /// request is dropped). Requests whose caller has left are purged first, so they never hold a
    /// place.
    pub fn push(&self, request: Admitted) -> Result<usize, QueueFull> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= self.max_queued {
            queue.retain(|a| !a.tx.is_closed());
        }
        if queue.len() >= self.max_queued {
            return Err(QueueFull);
        }
        queue.push_back(request);
        let depth = queue.len();
        drop(queue);
        self.ready.notify_one();
        Ok(depth)
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured bound.
    pub fn max_queued(&self) -> usize {
        self.max_queued
    }

    /// Free batch slots over all instances.
    pub fn free_slots(&self) -> usize {
        self.free_slots
            .iter()
            .map(|f| f.load(Ordering::Relaxed))
            .sum()
    }

    /// Stop handing out work; instances finish their batches and exit.
    pub fn close(&self) {
        self.running.store(false, Ordering::Relaxed);
        self.ready.notify_all();
    }

    /// Stop handing out work and take every queued request out, for the caller to refuse.
    pub fn close_and_take(&self) -> Vec<Admitted> {
        let taken = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            self.running.store(false, Ordering::Relaxed);
            queue.drain(..).collect()
        };
        self.ready.notify_all();
        taken
    }

    fn pop_live(queue: &mut VecDeque<Admitted>) -> Option<Admitted> {
        while let Some(a) = queue.pop_front() {
            if !a.tx.is_closed() {
                return Some(a);
            }
        }
        None
    }
}

impl WorkSource for Admission {
    fn take(&self, instance: usize, free: usize, wait: Option<Duration>) -> Option<Admitted> {
        if let Some(slot) = self.free_slots.get(instance) {
            slot.store(free, Ordering::Relaxed);
        }
        if free == 0 {
            return None;
        }
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if wait.is_none() {
            let best_other = self
                .free_slots
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != instance)
                .map(|(_, f)| f.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0);
            // Leave it to a less loaded instance, which is waiting and was woken by the push.
            if best_other > free {
                return None;
            }
        }
        if let Some(a) = Self::pop_live(&mut queue) {
            return Some(a);
        }
        let wait = wait?;
        if !self.running.load(Ordering::Relaxed) {
            return None;
        }
        let (mut queue, _) = self
            .ready
            .wait_timeout(queue, wait)
            .unwrap_or_else(|e| e.into_inner());
        Self::pop_live(&mut queue)
    }

    fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }
}
