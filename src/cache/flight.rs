//! Single flight: identical requests that arrive while one generation runs share it. Each
//! subscriber gets every event from the first (replayed from the log), then follows live.
//!
//! Cancellation: the generation belongs to nobody in particular. It goes on while at least one
//! subscriber (the first caller or any joiner) still listens, and stops (its inner stream is
//! dropped, which cancels it in the engine) once the last one has gone. So a leader that hangs
//! up never cuts off its followers, and a generation nobody waits for frees its slot.
//!
//! Deadlines are per subscriber for the same reason: the shared generation is submitted without
//! one, and each subscriber's stream ends with `DeadlineExceeded` when its own deadline passes,
//! which unsubscribes it. So the generation runs until the last interested caller's deadline (or
//! to its end when one caller has none), and one caller's short deadline never fails another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use super::CacheKey;
use crate::engine::{EngineError, EventStream, GenerationEvent};

/// One item of an event stream.
pub type Event = Result<GenerationEvent, EngineError>;

/// Capacity of each subscriber's channel. The log absorbs a slow reader, so this only bounds how
/// far the forwarding task runs ahead of it.
const SUBSCRIBER_CAPACITY: usize = 32;

#[derive(Default)]
struct Log {
    events: Vec<Event>,
    done: bool,
}

/// One generation in progress and everything it sent so far.
pub struct Flight {
    log: Mutex<Log>,
    /// Bumped on each append; its receivers are the live subscribers.
    notify: watch::Sender<usize>,
    /// Whether the generation was admitted (or answered from Redis): `None` until the driver
    /// knows. Every caller's `submit` waits for it, so a refusal is their `Err`.
    admitted: watch::Sender<Option<Result<(), EngineError>>>,
}

impl Flight {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            log: Mutex::new(Log::default()),
            notify: watch::channel(0).0,
            admitted: watch::channel(None).0,
        })
    }

    /// Records whether the generation was admitted; only the first call counts.
    pub fn settle(&self, outcome: Result<(), EngineError>) {
        self.admitted.send_if_modified(|v| {
            let first = v.is_none();
            if first {
                *v = Some(outcome);
            }
            first
        });
    }

    /// Resolves once the flight is settled: `Ok` when its generation runs (or its answer was
    /// found), else the refusal every subscriber shares.
    pub async fn admitted(&self) -> Result<(), EngineError> {
        let mut rx = self.admitted.subscribe();
        // The sender lives in `self`, so `wait_for` cannot see it closed.
        let settled = rx.wait_for(Option::is_some).await;
        match settled.as_deref() {
            Ok(Some(outcome)) => outcome.clone(),
            _ => Err(EngineError::Internal(
                "single flight lost its driver".into(),
            )),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends events; `done` marks the last batch.
    pub fn push(&self, events: impl IntoIterator<Item = Event>, done: bool) {
        let len = {
            let mut log = self.lock();
            log.events.extend(events);
            log.done |= done;
            log.events.len()
        };
        self.notify.send_replace(len);
    }

    /// Live subscribers.
    pub fn subscribers(&self) -> usize {
        self.notify.receiver_count()
    }

    /// Resolves once no subscriber is left (at once if none is).
    pub async fn unwatched(&self) {
        self.notify.closed().await
    }

    fn read_from(&self, pos: usize) -> (Vec<Event>, bool) {
        let log = self.lock();
        (log.events.get(pos..).unwrap_or_default().to_vec(), log.done)
    }

    /// A new stream of this flight: the log so far, then live events, until `deadline` (then
    /// `DeadlineExceeded`, counted from `arrival`). Needs a tokio runtime.
    fn subscribe(self: &Arc<Self>, caller: Caller) -> EventStream {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_CAPACITY);
        let watch = self.notify.subscribe();
        tokio::spawn(forward(self.clone(), watch, tx, caller));
        rx
    }
}

/// When one subscriber arrived and when it stops waiting.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// When the caller's request arrived.
    pub arrival: Instant,
    /// When the caller stops waiting; `None` waits to the end.
    pub deadline: Option<Instant>,
}

async fn forward(
    flight: Arc<Flight>,
    mut watch: watch::Receiver<usize>,
    tx: mpsc::Sender<Event>,
    caller: Caller,
) {
    let deadline = async {
        match caller.deadline {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut pos = 0;
    loop {
        watch.borrow_and_update();
        let (batch, done) = flight.read_from(pos);
        pos += batch.len();
        for event in batch {
            if tx.send(event).await.is_err() {
                return; // the caller went away; dropping `watch` unsubscribes
            }
        }
        if done {
            return;
        }
        tokio::select! {
            changed = watch.changed() => {
                if changed.is_err() {
                    // The driver is gone. Deliver what it left; if it never finished, say so.
                    let (batch, done) = flight.read_from(pos);
                    for event in batch {
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                    if !done {
                        let lost = EngineError::Internal("generation ended without a result".into());
                        let _ = tx.send(Err(lost)).await;
                    }
                    return;
                }
            }
            _ = tx.closed() => return,
            () = &mut deadline => {
                // This caller's deadline only: leaving drops `watch`, and the generation goes on
                // for whoever still listens.
                let after = caller.arrival.elapsed();
                let _ = tx.send(Err(EngineError::DeadlineExceeded(after))).await;
                return;
            }
        }
    }
}

/// Whether the caller leads a new flight or joined one.
pub enum Joined {
    /// A new flight: the caller must drive it, settle it and call [`Flights::finish`].
    Lead(Arc<Flight>, EventStream),
    /// An existing flight (wait for [`Flight::admitted`] before answering).
    Follow(Arc<Flight>, EventStream),
}

/// The flights in progress, by key.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<CacheKey, Arc<Flight>>>,
}

impl Flights {
    fn lock(&self) -> MutexGuard<'_, HashMap<CacheKey, Arc<Flight>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the flight for `key`, or starts one; the stream ends at `caller`'s deadline.
    /// Subscribing happens under the map lock, so a
    /// flight is never abandoned between being found and being joined.
    pub fn join_or_lead(&self, key: CacheKey, caller: Caller) -> Joined {
        let mut map = self.lock();
        if let Some(flight) = map.get(&key) {
            return Joined::Follow(flight.clone(), flight.subscribe(caller));
        }
        let flight = Flight::new();
        let stream = flight.subscribe(caller);
        map.insert(key, flight.clone());
        Joined::Lead(flight, stream)
    }

    /// Removes a flight that has finished (its log stays readable by its subscribers).
    pub fn finish(&self, key: &CacheKey, flight: &Arc<Flight>) {
        let mut map = self.lock();
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
        }
    }

    /// Removes the flight if nobody listens any more; `true` when it did (the caller then stops
    /// generating).
    pub fn abandon_if_unwatched(&self, key: &CacheKey, flight: &Arc<Flight>) -> bool {
        let mut map = self.lock();
        if flight.subscribers() > 0 {
            return false;
        }
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
        }
        true
    }

    /// Flights in progress.
    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }
}
