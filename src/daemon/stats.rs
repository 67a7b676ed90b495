//! Counters shared by discovery, the source, the workers, the STATUS line and the metrics
//! endpoint; plain atomics, no locks, so that counting costs a job a few uncontended adds.

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
    /// Jobs that went to `failed/`, whatever the reason (out of attempts, cancelled, expired).
    pub failed: AtomicU64,
    pub requeued: AtomicU64,
    /// Workers whose persistent handler failed and waits for its restart delay.
    pub handlers_restarting: AtomicUsize,
    /// Jobs that left a run or a wait, by [`Finished`]; the metrics endpoint's
    /// `spoold_jobs_finished_total`.
    finished: [AtomicU64; Finished::ALL.len()],
    /// How long each attempt's handler ran.
    pub run_seconds: Histogram,
    /// From a job's submission (its file's modification time) to the start of its first attempt.
    pub queue_wait_seconds: Histogram,
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
            finished: Default::default(),
            run_seconds: Histogram::new(RUN_BUCKETS),
            queue_wait_seconds: Histogram::new(WAIT_BUCKETS),
            discovery_beat_ms: AtomicU64::new(0),
        }
    }
}

/// How a job left a run or a wait, as `spoold_jobs_finished_total{outcome}` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// The handler succeeded.
    Done,
    /// The attempt failed and the job waits for another.
    Retried,
    /// Out of attempts, a permanent exit code, or not a regular file: in `failed/`.
    Failed,
    /// An operator cancelled it (`spoold cancel`), waiting or running: in `failed/`.
    Cancelled,
    /// Not done within its time to live or `retry.max_age`: in `failed/` (discovery expires it).
    Expired,
    /// A stop aborted its attempt, which does not count: back in the queue.
    Aborted,
}

impl Finished {
    pub const ALL: [Finished; 6] = [
        Finished::Done,
        Finished::Retried,
        Finished::Failed,
        Finished::Cancelled,
        Finished::Expired,
        Finished::Aborted,
    ];

    /// The `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            Finished::Done => "done",
            Finished::Retried => "retried",
            Finished::Failed => "failed",
            Finished::Cancelled => "cancelled",
            Finished::Expired => "expired",
            Finished::Aborted => "aborted",
        }
    }
}

impl Stats {
    /// Records how a job left: the outcome's counter, and the STATUS line's `done`, `failed`
    /// or `requeued`.
    pub fn finished(&self, how: Finished) {
        self.finished[how as usize].fetch_add(1, Relaxed);
        match how {
            Finished::Done => self.done.fetch_add(1, Relaxed),
            Finished::Failed | Finished::Cancelled | Finished::Expired => {
                self.failed.fetch_add(1, Relaxed)
            }
            Finished::Aborted => self.requeued.fetch_add(1, Relaxed),
            Finished::Retried => 0,
        };
    }

    /// Jobs that left this way since the daemon started.
    pub fn finished_count(&self, how: Finished) -> u64 {
        self.finished[how as usize].load(Relaxed)
    }

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

/// Upper bounds of the run-time buckets, in seconds: from a quick script to the longest
/// sensible handler timeout.
const RUN_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
/// Upper bounds of the queue-wait buckets, in seconds: a backlog can wait for days.
const WAIT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 21600.0, 86400.0,
];

/// A Prometheus histogram made of atomics: an observation is a short search and three
/// uncontended adds, with no lock a worker could wait on (prometheus-client's own histogram
/// takes a lock per observation). The metrics endpoint reads it as it stands; a scrape that
/// races an observation may see the count and the buckets one apart, which the next scrape
/// sets right.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, plus the overflow (+Inf) bucket; each counts its own range only.
    buckets: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|b| *b < secs);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// (sum in seconds, count, [(upper bound, observations in that bucket alone)]), the last
    /// bucket's bound being +Inf: what prometheus-client's encoder takes.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(|b| b.load(Relaxed)))
            .collect();
        (
            self.sum_micros.load(Relaxed) as f64 / 1e6,
            self.count.load(Relaxed),
            buckets,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_puts_each_observation_in_its_bucket() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(100));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(7));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 7.65).abs() < 1e-9, "{sum}");
        assert_eq!(buckets, vec![(0.1, 2), (1.0, 1), (f64::INFINITY, 1)]);
    }

    #[test]
    fn finished_also_counts_for_the_status_line() {
        let stats = Stats::default();
        stats.finished(Finished::Done);
        stats.finished(Finished::Cancelled);
        stats.finished(Finished::Aborted);
        stats.finished(Finished::Retried);
        assert_eq!(stats.done.load(Relaxed), 1);
        assert_eq!(stats.failed.load(Relaxed), 1);
        assert_eq!(stats.requeued.load(Relaxed), 1);
        assert_eq!(stats.finished_count(Finished::Cancelled), 1);
        assert_eq!(stats.finished_count(Finished::Retried), 1);
    }

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
