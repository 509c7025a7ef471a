//! The preparation threads: chat-template rendering, tokenization and grammar compilation run
//! here, off the async runtime's workers, so a flood of long prompts never delays a health check
//! or another caller's stream (the idea of TGI's validation workers).
//!
//! A few OS threads share one bounded FIFO of jobs; each job answers over a oneshot channel, so
//! `run` can be awaited from any executor (a tokio worker, `futures::executor::block_on` in a
//! tool). A job whose caller has gone is skipped.

use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Mutex;

use tokio::sync::oneshot;

/// Threads per node. Two keep one long tokenization from stalling the rest without taking
/// cores from the instances (a 1,500-token prompt tokenizes in ~1 ms).
pub const PREP_THREADS: usize = 2;
/// Jobs waiting for a thread before `run` refuses more.
pub const PREP_QUEUE: usize = 4096;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Why a job did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrepError {
    /// [`PREP_QUEUE`] jobs are waiting already.
    Full,
    /// The threads are gone (the pool is shutting down) or the job panicked.
    Gone,
}

/// A small fixed pool of preparation threads.
pub struct Prep {
    jobs: Mutex<Option<SyncSender<Job>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Prep {
    /// Starts `threads` named threads.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Job>(PREP_QUEUE);
        let rx = std::sync::Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("qnode-prep-{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                            Ok(job) => job,
                            Err(_) => return, // the pool closed its end
                        };
                        job();
                    })?,
            );
        }
        Ok(Self {
            jobs: Mutex::new(Some(tx)),
            threads: Mutex::new(handles),
        })
    }

    /// Runs `f` on a preparation thread and resolves with its result. A panic in `f` is
    /// contained to its job (`Gone`).
    pub async fn run<T, F>(&self, f: F) -> Result<T, PrepError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            if tx.is_closed() {
                return; // the caller left while the job waited
            }
            if let Ok(value) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                let _ = tx.send(value);
            }
        });
        {
            let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let Some(jobs) = jobs.as_ref() else {
                return Err(PrepError::Gone);
            };
            match jobs.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => return Err(PrepError::Full),
                Err(TrySendError::Disconnected(_)) => return Err(PrepError::Gone),
            }
        }
        rx.await.map_err(|_| PrepError::Gone)
    }

    /// Stops taking jobs, lets the queued ones finish and joins the threads.
    pub fn shutdown(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        let handles = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }
}

impl Drop for Prep {
    fn drop(&mut self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    #[test]
    fn jobs_run_off_the_caller_and_answer() {
        let prep = Prep::new(2).unwrap();
        let caller = std::thread::current().id();
        let ran_on = block_on(prep.run(move || std::thread::current().id())).unwrap();
        assert_ne!(ran_on, caller);
        assert_eq!(block_on(prep.run(|| 6 * 7)), Ok(42));
    }

    #[test]
    fn a_panicking_job_fails_alone() {
        let prep = Prep::new(1).unwrap();
        assert_eq!(
            block_on(prep.run(|| -> u32 { panic!("boom") })),
            Err(PrepError::Gone)
        );
        assert_eq!(block_on(prep.run(|| 1)), Ok(1));
    }

    #[test]
    fn after_shutdown_jobs_are_refused() {
        let prep = Prep::new(1).unwrap();
        prep.shutdown();
        assert_eq!(block_on(prep.run(|| 1)), Err(PrepError::Gone));
    }
}
