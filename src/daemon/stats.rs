//! Counters shared by the dispatcher, the workers and the status line; plain atomics, no locks.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Stats {
    epoch: Instant,
    /// Workers running a handler right now.
    pub busy: AtomicUsize,
    /// Workers alive (it lags the configured count while a shrink waits for jobs to end).
    pub workers: AtomicUsize,
    /// Jobs waiting in `new/`, as far as the dispatcher can tell without counting the directory.
    pub queued: AtomicI64,
    /// Jobs claimed since start; lets the dispatcher correct its count of queued jobs for the
    /// claims made while a scan pass was under way.
    pub claimed: AtomicU64,
    pub done: AtomicU64,
    pub failed: AtomicU64,
    pub requeued: AtomicU64,
    /// Milliseconds since the process started at the dispatcher's last heartbeat; the watchdog
    /// reads it to tell a live dispatcher from a hung one.
    pub dispatcher_beat_ms: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            busy: AtomicUsize::new(0),
            workers: AtomicUsize::new(0),
            queued: AtomicI64::new(0),
            claimed: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            requeued: AtomicU64::new(0),
            dispatcher_beat_ms: AtomicU64::new(0),
        }
    }
}

impl Stats {
    /// Records that the dispatcher's loop is turning.
    pub fn beat(&self) {
        self.dispatcher_beat_ms
            .store(self.epoch.elapsed().as_millis() as u64, Relaxed);
    }

    /// How long ago the dispatcher's loop last turned.
    pub fn since_beat(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.dispatcher_beat_ms.load(Relaxed)))
    }

    pub fn queued(&self) -> u64 {
        self.queued.load(Relaxed).max(0) as u64
    }
}
