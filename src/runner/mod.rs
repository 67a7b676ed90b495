//! The runner: the worker pool and the life of one job, whatever its source.
//!
//! Each worker asks the source for its next job (`Source::next`), runs one attempt with the
//! config current at that moment, asks `policy::decide` what becomes of the job, and hands the
//! verdict to the job's lease. The runner knows a job only as a `Job` (an ID, an attempt number
//! and a local file): where jobs live, and what settling a verdict means, belong to the source.
//! The pool grows at once when `workers.count` rises and shrinks as workers finish their
//! current job.
//!
//! Two tokens drive a stop, both given to [`Pool::new`]: `stop` (no new job is taken; the
//! current one runs on) and `abort` (the current handler is signalled and its job released).
//! A lease the source loses (`Lease::revoked`) ends its one attempt as `abort` does.
//!
//! A job runs in one of two ways, per `handler.mode`: a process per attempt (`handler`), or a
//! long-lived process per worker that takes one job after the other (`persistent`), which the
//! worker starts before it claims a job and ends when it leaves.

pub mod handler;
pub mod persistent;

/// How the reason of an attempt that the source's lease ended begins (see `Lease::revoked`).
/// A source for which that can only mean something else (the spool's cancel) says so instead.
pub const LEASE_LOST: &str = "ended because the source lost its lease on the job";

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, HandlerMode};
use crate::daemon::stats::Stats;
use crate::policy;
use crate::source::{Lease, Source};
use handler::Abort;

/// How often an idle worker looks at its persistent handler.
const IDLE_LOOK: std::time::Duration = std::time::Duration::from_secs(1);

/// What every worker shares.
struct Crew<S> {
    source: S,
    config: watch::Receiver<Arc<Config>>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    /// The abort token, pollable by a worker blocked on its handler.
    abort: Abort,
    /// The `handler.kill_grace` of each job in flight, counted: a job keeps the config it
    /// started with, so after a reload that lowered it, a handler may still be owed the old,
    /// longer grace before its SIGKILL, and the stop must wait for that.
    graces: std::sync::Mutex<std::collections::BTreeMap<std::time::Duration, usize>>,
}

/// The pool: how many workers there should be, and the tasks that are.
pub struct Pool<S> {
    crew: Arc<Crew<S>>,
    target: watch::Sender<usize>,
    tracker: TaskTracker,
}

impl<S: Source> Pool<S> {
    /// A pool of no workers yet (see `resize`) that takes its jobs from `source`. At `stop`
    /// workers take no new job; at `abort` their handlers are ended and their jobs released.
    /// Must be called from within the runtime that will watch `abort`.
    pub fn new(
        source: S,
        config: watch::Receiver<Arc<Config>>,
        stats: Arc<Stats>,
        stop: CancellationToken,
        abort: CancellationToken,
    ) -> io::Result<Pool<S>> {
        let abort = Abort::watch(abort)?;
        Ok(Pool {
            crew: Arc::new(Crew {
                source,
                config,
                stats,
                stop,
                abort,
                graces: Default::default(),
            }),
            target: watch::Sender::new(0),
            tracker: TaskTracker::new(),
        })
    }

    /// Sets the number of workers: new ones start at once; surplus ones leave as soon as they
    /// are between jobs.
    pub fn resize(&self, count: usize) {
        self.target.send_replace(count);
        loop {
            let live = self.crew.stats.workers.load(Relaxed);
            if live >= count {
                break;
            }
            if self
                .crew
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
    /// thread each, the workers' bookkeeping runs side by side, as each handler does. The
    /// tokens and channels the worker awaits are not tied to any runtime, so cancellation
    /// reaches it the same way. The runtime needs no I/O driver: a handler is waited for by
    /// `handler::run`'s own poll. Its timer serves two waits: a persistent handler's
    /// restart delay, which must also give way to a stop, and the idle worker's looks at its
    /// persistent handler.
    /// Returns false when no runtime or thread could be had.
    fn start_worker(&self) -> bool {
        let crew = self.crew.clone();
        let target = self.target.subscribe();
        // The tracker counts the thread until it ends, so `wait` waits for it like a task.
        let token = self.tracker.token();
        let started = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .and_then(|runtime| {
                std::thread::Builder::new()
                    .name("spoold-worker".into())
                    .spawn(move || {
                        runtime.block_on(worker(crew, target));
                        // The runtime goes first, so that the stop also waits for its teardown.
                        drop(runtime);
                        drop(token);
                    })
            });
        if let Err(e) = started {
            self.crew.stats.workers.fetch_sub(1, Relaxed);
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
        self.crew.stats.busy.load(Relaxed)
    }

    /// The longest `handler.kill_grace` that a job in flight runs under (zero when none does):
    /// a job keeps the config it started with, which a reload may since have changed.
    pub fn kill_grace_in_flight(&self) -> std::time::Duration {
        let graces = self
            .crew
            .graces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        graces.keys().next_back().copied().unwrap_or_default()
    }
}

/// Leaves the pool if there are more workers than wanted; true when this worker should exit.
fn retire_if_surplus(stats: &Stats, target: &watch::Receiver<usize>) -> bool {
    loop {
        let live = stats.workers.load(Relaxed);
        if live <= *target.borrow() {
            return false;
        }
        if stats
            .workers
            .compare_exchange(live, live - 1, Relaxed, Relaxed)
            .is_ok()
        {
            return true;
        }
    }
}

async fn worker<S: Source>(crew: Arc<Crew<S>>, mut target: watch::Receiver<usize>) {
    let mut scratch = handler::Scratch::new();
    let mut persistent = persistent::Persistent::new();
    let mut config = crew.config.clone();
    // Whether this worker counts in `Stats::handlers_restarting`.
    let mut restarting = false;
    'jobs: loop {
        note_restarting(&crew.stats, &persistent, &mut restarting);
        if crew.stop.is_cancelled() {
            break;
        }
        if retire_if_surplus(&crew.stats, &target) {
            let current = config.borrow().clone();
            persistent.shutdown(&current.handler, &crew.abort);
            note_restarting(&crew.stats, &persistent, &mut restarting);
            return;
        }
        // A persistent handler is started before a job is claimed, so that a handler that
        // cannot start leaves the jobs waiting, rather than failing them, while its restart
        // delay runs. A reload ends the delay, since it may have fixed the handler.
        let current = config.borrow_and_update().clone();
        if current.handler.mode == HandlerMode::Persistent {
            if let Some(at) = persistent.prepare(&current.handler, &crew.abort, &mut scratch) {
                note_restarting(&crew.stats, &persistent, &mut restarting);
                tokio::select! {
                    biased;
                    () = crew.stop.cancelled() => break,
                    _ = target.changed() => continue,
                    _ = config.changed() => continue,
                    () = tokio::time::sleep_until(at.into()) => continue,
                }
            }
        } else {
            persistent.shutdown(&current.handler, &crew.abort);
        }
        // While no job comes, a persistent handler is looked at every `IDLE_LOOK`: one that
        // exits, or writes to stdout, between jobs is ended and restarted then (and what it
        // wrote to stderr is logged then), not when the next job comes. A look does not give up
        // the wait for a job, which a broker source may be fetching; only a handler that had
        // to be ended does, since no job is claimed while its restart is pending.
        let watch_handler = current.handler.mode == HandlerMode::Persistent;
        let next = crew.source.next(&crew.stop);
        tokio::pin!(next);
        let lease = loop {
            tokio::select! {
                biased;
                () = crew.stop.cancelled() => break 'jobs,
                _ = target.changed() => continue 'jobs,
                lease = &mut next => match lease {
                    Some(lease) => break lease,
                    None => break 'jobs,
                },
                () = tokio::time::sleep(IDLE_LOOK), if watch_handler => {
                    if persistent.ended_while_idle(&current.handler, &crew.abort) {
                        continue 'jobs;
                    }
                }
            }
        };
        run_job(&crew, lease, &mut scratch, &mut persistent);
    }
    let current = config.borrow().clone();
    persistent.shutdown(&current.handler, &crew.abort);
    note_restarting(&crew.stats, &persistent, &mut restarting);
    crew.stats.workers.fetch_sub(1, Relaxed);
}

/// Keeps `Stats::handlers_restarting` (shown in STATUS=) in step with whether this worker's
/// persistent handler waits for a restart after failures; `counted` is what the worker added.
fn note_restarting(stats: &Stats, persistent: &persistent::Persistent, counted: &mut bool) {
    let now = persistent.restarting();
    if now != *counted {
        if now {
            stats.handlers_restarting.fetch_add(1, Relaxed);
        } else {
            stats.handlers_restarting.fetch_sub(1, Relaxed);
        }
        *counted = now;
    }
}

/// Takes a claimed job through one attempt and hands the verdict to its lease.
fn run_job<S: Source>(
    crew: &Crew<S>,
    lease: S::Lease<'_>,
    scratch: &mut handler::Scratch,
    persistent: &mut persistent::Persistent,
) {
    let config = crew.config.borrow().clone();
    let _busy = BusyGuard::new(&crew.stats);
    let _grace = GraceGuard::new(&crew.graces, config.handler.kill_grace);
    let job = lease.job();
    tracing::info!(job_id = job.shown, attempt = job.attempt, "job started");
    crate::fault::hit(crate::fault::Point::Worker);
    // The attempt blocks this worker's thread, which has nothing else to run meanwhile: its
    // runtime only serves this worker's waits between jobs.
    let report = match config.handler.mode {
        HandlerMode::Exec => {
            persistent.shutdown(&config.handler, &crew.abort);
            handler::run(&config.handler, &job, &crew.abort, lease.revoked(), scratch)
        }
        HandlerMode::Persistent => {
            persistent.run(&config.handler, &job, &crew.abort, lease.revoked(), scratch)
        }
    };
    crew.stats.run_seconds.observe(report.duration);
    let verdict = policy::decide(&report, job.attempt, &config.retry, fastrand::f64());
    lease.settle(verdict, report);
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

/// Counts a job's `kill_grace` among those in flight for as long as it lives.
struct GraceGuard<'a> {
    graces: &'a std::sync::Mutex<std::collections::BTreeMap<std::time::Duration, usize>>,
    grace: std::time::Duration,
}

impl<'a> GraceGuard<'a> {
    fn new(
        graces: &'a std::sync::Mutex<std::collections::BTreeMap<std::time::Duration, usize>>,
        grace: std::time::Duration,
    ) -> Self {
        *graces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(grace)
            .or_default() += 1;
        Self { graces, grace }
    }
}

impl Drop for GraceGuard<'_> {
    fn drop(&mut self) {
        let mut graces = self
            .graces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = graces.get_mut(&self.grace) {
            *count -= 1;
            if *count == 0 {
                graces.remove(&self.grace);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Job, Outcome, Report, Verdict};
    use std::ffi::OsStr;
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// A source of one job whose lease can be lost: `revoked` is an eventfd the test raises, as
    /// a broker source would when it cannot renew its lease. It keeps what the runner settled.
    struct LosingSource {
        path: PathBuf,
        revoked: OwnedFd,
        settled: Mutex<Option<(Verdict, Report)>>,
    }

    struct LosingLease<'a>(&'a LosingSource);

    impl Source for LosingSource {
        type Lease<'a> = LosingLease<'a>;

        async fn next<'a>(&'a self, _stop: &'a CancellationToken) -> Option<LosingLease<'a>> {
            Some(LosingLease(self))
        }
    }

    impl Lease for LosingLease<'_> {
        fn job(&self) -> Job<'_> {
            Job {
                id: OsStr::new("job"),
                shown: "job",
                path: &self.0.path,
                attempt: 1,
            }
        }

        fn revoked(&self) -> Option<BorrowedFd<'_>> {
            Some(self.0.revoked.as_fd())
        }

        fn settle(self, verdict: Verdict, report: Report) {
            *self.0.settled.lock().unwrap() = Some((verdict, report));
        }
    }

    /// Waits (boundedly) until `path` exists.
    fn wait_for_file(path: &Path) -> bool {
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if path.exists() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// A lease lost while the handler runs ends that attempt as an abort would: SIGTERM to the
    /// group, SIGKILL after `kill_grace` (this handler ignores the SIGTERM, noting it), and the
    /// job is released, its attempt not counted, instead of being failed or retried.
    ///
    /// The trap writes its note with a shell builtin and the grace is a second, so that a loaded
    /// machine (CI builds beside the test) cannot take the SIGKILL before the note is written.
    #[tokio::test]
    async fn a_lost_lease_ends_the_attempt_as_an_abort_does_and_releases_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job");
        std::fs::write(&path, "x").unwrap();
        let config = Config::parse(
            &dir.path().join("c.toml"),
            r#"
            [spool]
            dir = "."
            [handler]
            command = ["sh", "-c", "trap ': > \"$1.termed\"' TERM; : > \"$1.started\"; while :; do sleep 1; done", "sh", "{path}"]
            timeout = "30s"
            kill_grace = "1s"
            "#,
        )
        .unwrap();
        let kill_grace = config.handler.kill_grace;
        let source = LosingSource {
            path: path.clone(),
            revoked: rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap(),
            settled: Mutex::new(None),
        };
        let crew = Crew {
            source,
            config: watch::channel(Arc::new(config)).1,
            stats: Arc::new(Stats::default()),
            stop: CancellationToken::new(),
            abort: Abort::watch(CancellationToken::new()).unwrap(),
            graces: Default::default(),
        };

        let revoked = crew.source.revoked.try_clone().unwrap();
        let started = dir.path().join("job.started");
        let loser = std::thread::spawn(move || {
            let seen = wait_for_file(&started);
            rustix::io::write(&revoked, &1u64.to_ne_bytes()).unwrap();
            seen
        });
        let lease = crew.source.next(&crew.stop).await.unwrap();
        run_job(
            &crew,
            lease,
            &mut handler::Scratch::new(),
            &mut persistent::Persistent::new(),
        );
        assert!(loser.join().unwrap(), "the handler started");

        let (verdict, report) = crew.source.settled.lock().unwrap().take().expect("settled");
        assert_eq!(verdict, Verdict::Release, "{report:?}");
        assert_eq!(report.outcome, Outcome::LeaseLost, "{report:?}");
        assert!(!report.timed_out, "{report:?}");
        assert!(
            dir.path().join("job.termed").exists(),
            "the handler had SIGTERM first: {report:?}"
        );
        assert_eq!(report.signal, Some(9), "then SIGKILL: {report:?}");
        assert!(report.duration >= kill_grace, "{report:?}");
        assert!(
            report.reason.starts_with(
                "ended because the source lost its lease on the job; killed by SIGKILL"
            ),
            "{report:?}"
        );
    }
}
