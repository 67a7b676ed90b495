//! Counters shared by discovery, the source, the workers and the STATUS line; plain atomics, no
//! locks.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Stats {
    epoch: Instant,
    /// Workers running a handler right now.
    pub busy: AtomicUsize,
    /// Workers alive (it lags the configured count while a shrink waits for jobs to end).
    pub workers: AtomicUsize,
    /// Names discovery has counted into `new/`, on the scale of `taken`: at the end of a scan
    /// pass, what the pass saw plus `taken` when the pass began; one more for each hint since.
    /// Discovery alone writes it.
    counted: AtomicU64,
    /// Names the source has taken out of `new/` (claimed, or refused at the claim) or found
    /// gone; it only grows. The queued count is `counted - taken`.
    taken: AtomicU64,
    pub done: AtomicU64,
    pub failed: AtomicU64,
    pub requeued: AtomicU64,
    /// Workers whose persistent handler failed and waits for its restart delay.
    pub handlers_restarting: AtomicUsize,
    /// Milliseconds since the process started at discovery's last heartbeat; the watchdog
    /// reads it to tell a live discovery loop from a hung one.
    discovery_beat_ms: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            busy: AtomicUsize::new(0),
            workers: AtomicUsize::new(0),
            counted: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            requeued: AtomicU64::new(0),
            handlers_restarting: AtomicUsize::new(0),
            discovery_beat_ms: AtomicU64::new(0),
        }
    }
}

impl Stats {
    /// Records that discovery's loop is turning.
    pub fn beat(&self) {
        self.discovery_beat_ms
            .store(self.epoch.elapsed().as_millis() as u64, Relaxed);
    }

    /// How long ago discovery's loop last turned.
    pub fn since_beat(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.discovery_beat_ms.load(Relaxed)))
    }

    /// Jobs waiting in `new/`, as far as discovery and the source can tell without counting
    /// the directory. It is an estimate: a scan and a hint can both name one file, and a pass
    /// can name again a file still waiting from the pass before, so a name may be counted or
    /// taken twice. Each scan pass sets it right again, and it never goes below zero.
    pub fn queued(&self) -> u64 {
        let taken = self.taken.load(Relaxed);
        self.counted.load(Relaxed).saturating_sub(taken)
    }

    /// Names taken so far; a scan pass reads it when it begins.
    pub fn taken(&self) -> u64 {
        self.taken.load(Relaxed)
    }

    /// Records that the source took one name out of the queue, whatever became of it.
    pub fn took(&self) {
        self.taken.fetch_add(1, Relaxed);
    }

    /// Publishes what a scan pass saw in `new/`, given `taken` when it began: whatever was
    /// taken while the pass ran comes off the count.
    pub fn counted_pass(&self, seen: u64, taken_before: u64) {
        self.counted
            .store(seen.saturating_add(taken_before), Relaxed);
    }

    /// Records one name that inotify reported in `new/` since the last pass.
    pub fn counted_hint(&self) {
        self.counted.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What STATUS shows as queued: a pass's count less what was taken while it ran, plus the
    /// hints since, less what was taken since.
    #[test]
    fn queued_is_derived_from_what_was_counted_and_taken() {
        let stats = Stats::default();
        stats.counted_hint();
        stats.counted_hint();
        assert_eq!(stats.queued(), 2);
        stats.took();
        assert_eq!(stats.queued(), 1);
        // A pass begins, one name is taken while it runs, and it saw 10.
        let before = stats.taken();
        stats.took();
        stats.counted_pass(10, before);
        assert_eq!(stats.queued(), 9);
        stats.counted_hint();
        stats.took();
        stats.took();
        assert_eq!(stats.queued(), 8);
        // More taken than counted (a name handed out twice): zero, not a wrapped number.
        stats.counted_pass(0, stats.taken());
        stats.took();
        assert_eq!(stats.queued(), 0);
    }
}
