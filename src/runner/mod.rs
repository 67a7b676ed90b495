//! The worker pool and the life of one job: claim, run the handler, record the outcome.
//!
//! Workers share one receiver of job names. Each claims a name by renaming it into `active/`,
//! runs one attempt with the config current at that moment, then moves the job to `done/`,
//! `retry/` (with backoff), `failed/`, or, when a stop aborted it, back to `new/` with its
//! attempt count unchanged. The pool grows at once when `workers.count` rises and shrinks as
//! workers finish their current job.
//!
//! Two tokens drive a stop: `stop` (no new job is taken; the current one runs on) and `abort`
//! (the current handler is signalled and its job requeued).

pub mod handler;

use std::ffi::OsString;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use tokio::sync::{Mutex, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::later;
use crate::config::{Config, RetryConfig};
use crate::daemon::stats::Stats;
use crate::job::display_name;
use crate::source::spool::discovery::RetryScheduled;
use crate::source::spool::{Claim, Claimed, Failure, JobRecord, Spool, rfc3339, unix_ms};
use handler::{Attempt, Outcome, Report};

/// What every worker shares.
pub struct Shared {
    pub spool: Arc<Spool>,
    pub jobs: Mutex<mpsc::Receiver<OsString>>,
    pub config: watch::Receiver<Arc<Config>>,
    pub stats: Arc<Stats>,
    /// Tells the dispatcher of each job put in `retry/`, and when it is due.
    pub retries: mpsc::UnboundedSender<RetryScheduled>,
    pub stop: CancellationToken,
    /// The abort token, pollable by a worker blocked on its handler.
    pub abort: handler::Abort,
}

/// The pool: how many workers there should be, and the tasks that are.
pub struct Pool {
    shared: Arc<Shared>,
    target: watch::Sender<usize>,
    tracker: TaskTracker,
}

impl Pool {
    pub fn new(shared: Shared) -> Pool {
        Pool {
            shared: Arc::new(shared),
            target: watch::Sender::new(0),
            tracker: TaskTracker::new(),
        }
    }

    /// Sets the number of workers: new ones start at once; surplus ones leave as soon as they
    /// are between jobs.
    pub fn resize(&self, count: usize) {
        self.target.send_replace(count);
        loop {
            let live = self.shared.stats.workers.load(Relaxed);
            if live >= count {
                break;
            }
            if self
                .shared
                .stats
                .workers
                .compare_exchange(live, live + 1, Relaxed, Relaxed)
                .is_ok()
                && !self.start_worker()
            {
                // No thread to be had: the pool stays smaller rather than spin; the next
                // reload tries again.
                break;
            }
        }
    }

    /// Starts one worker on a thread of its own, driven by a current-thread runtime of its own.
    ///
    /// A worker's work between two handlers (renames, pipes, the spawn, the log lines) is short
    /// but serial, and `posix_spawn` holds its thread until the child has exec'd. On one shared
    /// thread, each worker waited for the others' bookkeeping while a core stood idle; on a
    /// thread each, the workers' bookkeeping runs side by side, as each handler does (9-26 %
    /// more jobs per second in BENCHMARKS.md). The tokens and channels the worker awaits are
    /// not tied to any runtime, so cancellation reaches it the same way. The runtime needs no
    /// I/O or timer driver: a handler is waited for by `handler::run`'s own poll.
    /// Returns false when no runtime or thread could be had.
    fn start_worker(&self) -> bool {
        let shared = self.shared.clone();
        let target = self.target.subscribe();
        // The tracker counts the thread until it ends, so `wait` waits for it like a task.
        let token = self.tracker.token();
        let started = tokio::runtime::Builder::new_current_thread()
            .build()
            .and_then(|runtime| {
                std::thread::Builder::new()
                    .name("spoold-worker".into())
                    .spawn(move || {
                        runtime.block_on(worker(shared, target));
                        // The runtime goes first, so that the stop also waits for its teardown.
                        drop(runtime);
                        drop(token);
                    })
            });
        if let Err(e) = started {
            self.shared.stats.workers.fetch_sub(1, Relaxed);
            tracing::error!("cannot start a worker: {e}");
            return false;
        }
        true
    }

    /// Waits until every worker has returned (after `stop`, each returns when its job ends).
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    pub fn in_flight(&self) -> usize {
        self.shared.stats.busy.load(Relaxed)
    }
}

/// Leaves the pool if there are more workers than wanted; true when this worker should exit.
fn retire_if_surplus(shared: &Shared, target: &watch::Receiver<usize>) -> bool {
    loop {
        let live = shared.stats.workers.load(Relaxed);
        if live <= *target.borrow() {
            return false;
        }
        if shared
            .stats
            .workers
            .compare_exchange(live, live - 1, Relaxed, Relaxed)
            .is_ok()
        {
            return true;
        }
    }
}

async fn worker(shared: Arc<Shared>, mut target: watch::Receiver<usize>) {
    let mut scratch = handler::Scratch::new();
    loop {
        if shared.stop.is_cancelled() {
            break;
        }
        if retire_if_surplus(&shared, &target) {
            return;
        }
        let name = {
            let mut jobs = tokio::select! {
                biased;
                () = shared.stop.cancelled() => break,
                _ = target.changed() => continue,
                jobs = shared.jobs.lock() => jobs,
            };
            tokio::select! {
                biased;
                () = shared.stop.cancelled() => break,
                _ = target.changed() => continue,
                name = jobs.recv() => match name {
                    Some(name) => name,
                    None => break,
                },
            }
        };
        run_job(&shared, name, &mut scratch);
    }
    shared.stats.workers.fetch_sub(1, Relaxed);
}

/// Claims `name` and takes it through one attempt to its next place.
fn run_job(shared: &Shared, name: OsString, scratch: &mut handler::Scratch) {
    // A name received just as the stop began is left in new/ rather than started.
    if shared.stop.is_cancelled() {
        return;
    }
    let id = display_name(&name);
    let job = match shared.spool.claim(&name) {
        Ok(Claim::Job(job)) => job,
        Ok(Claim::Skipped) => {
            // The name was counted as queued when it was handed out (a scan and an inotify
            // hint can both name a file that arrived as a pass began), so a name that turns out
            // to be taken already leaves the count like a claimed one does.
            shared.stats.queued.fetch_sub(1, Relaxed);
            tracing::debug!(
                job_id = id,
                "already taken or still running under the same name; skipped"
            );
            return;
        }
        Ok(Claim::Rejected { reason, .. }) => {
            shared.stats.queued.fetch_sub(1, Relaxed);
            shared.stats.failed.fetch_add(1, Relaxed);
            tracing::warn!(
                job_id = id,
                outcome = "failed",
                "rejected: {reason}; moved to failed/"
            );
            return;
        }
        Err(e) => {
            tracing::error!(job_id = id, "{e}");
            return;
        }
    };
    shared.stats.queued.fetch_sub(1, Relaxed);
    shared.stats.claimed.fetch_add(1, Relaxed);
    // The claim may have renamed the job (a job of the same name waits in retry/).
    let id = display_name(&job.name);
    let config = shared.config.borrow().clone();
    let _busy = BusyGuard::new(&shared.stats);
    tracing::info!(job_id = id, attempt = job.attempt, "job started");
    crate::fault::hit(crate::fault::Point::Worker);
    let attempt = Attempt {
        id: &id,
        name: &job.name,
        path: &job.path,
        attempt: job.attempt,
    };
    // The attempt blocks this worker's thread, which has nothing else to run meanwhile: its
    // runtime only serves this worker's waits between jobs.
    let report = handler::run(&config.handler, &attempt, &shared.abort, scratch);
    record_outcome(shared, &config, &job, &id, report);
}

fn record_outcome(shared: &Shared, config: &Config, job: &Claimed, id: &str, report: Report) {
    let duration_ms = report.duration.as_millis() as u64;
    let exit_status = report.exit_status();
    match report.outcome {
        Outcome::Succeeded => match shared.spool.finish_done(job, config.done.keep) {
            Ok(to) => {
                shared.stats.done.fetch_add(1, Relaxed);
                if let Some(to) = to.filter(|to| *to != job.name) {
                    tracing::warn!(
                        job_id = id,
                        "done/ already held a job of this name; kept as {}",
                        display_name(&to)
                    );
                }
                tracing::info!(
                    job_id = id,
                    attempt = job.attempt,
                    outcome = "done",
                    exit_status,
                    duration_ms,
                    "job done"
                );
            }
            Err(e) => tracing::error!(
                job_id = id,
                attempt = job.attempt,
                outcome = "done",
                exit_status,
                duration_ms,
                "handler succeeded, but {e}; the job stays in active/ and runs again after a restart"
            ),
        },
        Outcome::Aborted => match shared.spool.requeue(job) {
            Ok(_) => {
                shared.stats.requeued.fetch_add(1, Relaxed);
                shared.stats.queued.fetch_add(1, Relaxed);
                tracing::info!(
                    job_id = id,
                    attempt = job.attempt,
                    outcome = "requeued",
                    exit_status,
                    duration_ms,
                    "aborted by the stop; back in new/, this attempt does not count"
                );
            }
            Err(e) => tracing::error!(
                job_id = id,
                attempt = job.attempt,
                outcome = "requeued",
                "{e}; it stays in active/ and runs again after a restart"
            ),
        },
        Outcome::Failed => {
            let now = SystemTime::now();
            let previous = job.record.clone().unwrap_or_default();
            let failure = Failure {
                attempt: job.attempt,
                started_at: rfc3339(report.started),
                ended_at: rfc3339(now),
                duration_ms,
                exit_code: report.exit_code,
                signal: report.signal,
                timed_out: report.timed_out,
                reason: report.reason.clone(),
                stderr_tail: report.stderr_tail,
            };
            let permanent = report
                .exit_code
                .is_some_and(|c| config.retry.permanent_exit_codes.contains(&c));
            let mut record = JobRecord {
                id: id.to_owned(),
                attempts: job.attempt,
                first_attempt_at: previous
                    .first_attempt_at
                    .or_else(|| Some(failure.started_at.clone())),
                permanent,
                last_failure: Some(failure),
                ..JobRecord::default()
            };
            if permanent || job.attempt >= config.retry.max_attempts.get() {
                record.failed_at = Some(rfc3339(now));
                let why = if permanent {
                    "permanent exit code"
                } else {
                    "out of attempts"
                };
                match shared.spool.fail(&job.name, &record) {
                    Ok(_) => {
                        shared.stats.failed.fetch_add(1, Relaxed);
                        tracing::warn!(
                            job_id = id,
                            attempt = job.attempt,
                            outcome = "failed",
                            exit_status,
                            duration_ms,
                            "job failed ({}): {why}; moved to failed/",
                            report.reason
                        );
                    }
                    Err(e) => tracing::error!(
                        job_id = id,
                        attempt = job.attempt,
                        outcome = "failed",
                        exit_status,
                        duration_ms,
                        "job failed ({}): {why}; {e}",
                        report.reason
                    ),
                }
            } else {
                let delay = backoff(&config.retry, job.attempt);
                let due = later(now, delay);
                record.next_attempt_unix_ms = Some(unix_ms(due));
                record.next_attempt_at = Some(rfc3339(due));
                match shared.spool.schedule_retry(job, &record) {
                    Ok(name) => {
                        // Gone only once the daemon stops; the next start reads retry/ anyway.
                        let _ = shared.retries.send((name, unix_ms(due)));
                        tracing::warn!(
                            job_id = id,
                            attempt = job.attempt,
                            outcome = "retry",
                            exit_status,
                            duration_ms,
                            "attempt failed ({}); next attempt in {}",
                            report.reason,
                            humantime::format_duration(Duration::from_millis(
                                delay.as_millis() as u64
                            ))
                        );
                    }
                    Err(e) => tracing::error!(
                        job_id = id,
                        attempt = job.attempt,
                        outcome = "retry",
                        exit_status,
                        duration_ms,
                        "attempt failed ({}); {e}; the job stays in active/ and runs again after a restart",
                        report.reason
                    ),
                }
            }
        }
    }
}

/// Exponential backoff with jitter: the n-th failure waits between half and all of
/// `backoff_initial * 2^(n-1)`, capped at `backoff_max`. The jitter keeps jobs that failed
/// together (a database that went away) from all coming back at the same instant.
pub fn backoff(cfg: &RetryConfig, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(31));
    let full = cfg
        .backoff_initial
        .saturating_mul(factor)
        .min(cfg.backoff_max);
    let half = full / 2;
    half + half.mul_f64(fastrand::f64())
}

/// Counts a worker as busy for as long as it lives.
struct BusyGuard<'a>(&'a Stats);

impl<'a> BusyGuard<'a> {
    fn new(stats: &'a Stats) -> Self {
        stats.busy.fetch_add(1, Relaxed);
        Self(stats)
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job named twice (by a scan and by an inotify hint) is counted twice and handed out
    /// twice; once it has run, STATUS must not show it as still queued.
    #[tokio::test]
    async fn a_name_handed_out_twice_leaves_nothing_queued() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        std::fs::write(dir.path().join("new/job"), "x").unwrap();
        let config = Config::parse(
            &dir.path().join("c.toml"),
            "[spool]\ndir = \".\"\n[handler]\ncommand = [\"true\"]\n",
        )
        .unwrap();
        let stats = Arc::new(Stats::default());
        stats.queued.store(2, Relaxed);
        let (tx, rx) = mpsc::channel(4);
        tx.send(OsString::from("job")).await.unwrap();
        tx.send(OsString::from("job")).await.unwrap();
        drop(tx);
        let pool = Pool::new(Shared {
            spool,
            jobs: Mutex::new(rx),
            config: watch::channel(Arc::new(config)).1,
            stats: stats.clone(),
            retries: mpsc::unbounded_channel().0,
            stop: CancellationToken::new(),
            abort: handler::Abort::watch(CancellationToken::new()).unwrap(),
        });
        pool.resize(1);
        // The channel is closed, so the worker returns once it has taken both names.
        tokio::time::timeout(Duration::from_secs(30), pool.wait())
            .await
            .expect("the worker ends");
        assert_eq!(stats.done.load(Relaxed), 1);
        assert_eq!(stats.queued(), 0);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let cfg = RetryConfig {
            backoff_initial: Duration::from_secs(10),
            backoff_max: Duration::from_secs(60),
            ..RetryConfig::default()
        };
        for _ in 0..100 {
            let first = backoff(&cfg, 1);
            assert!(first >= Duration::from_secs(5) && first <= Duration::from_secs(10));
            let third = backoff(&cfg, 3);
            assert!(third >= Duration::from_secs(20) && third <= Duration::from_secs(40));
            let late = backoff(&cfg, 40);
            assert!(late >= Duration::from_secs(30) && late <= Duration::from_secs(60));
        }
    }
}
