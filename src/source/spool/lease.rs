//! The spool as a [`Source`]: a worker's claim of a name that discovery found in `new/`, and
//! the settling of each verdict by the renames and records of [`Spool`].
//!
//! | verdict   | what the spool does                                                      |
//! |-----------|--------------------------------------------------------------------------|
//! | `Done`    | rename to `done/` (or unlink when `done.keep = false`)                   |
//! | `Retry`   | write `state/NAME`, rename to `retry/`, tell discovery when it is due    |
//! | `Fail`    | write `reasons/NAME`, rename to `failed/`                                |
//! | `Release` | rename back to `new/`; `state/NAME` is untouched, so the attempt does not count |

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::control::{CANCELLED, CancelFd};
use super::discovery::RetryScheduled;
use super::{Claim, Claimed, Dir, Spool, record, rfc3339, unix_ms};
use crate::clock::later;
use crate::config::Config;
use crate::daemon::stats::{Finished, Stats};
use crate::job::{History, Job, Outcome, Report, Verdict, display_name};
use crate::source::admin::Paused;
use crate::source::{Lease, Source};

/// The spool as the workers' source of jobs. Discovery (`super::discovery::Discovery`) sends
/// it the names it finds in `new/`; a name is claimed, by a rename into `active/`, only when a
/// worker asks for its next job.
pub struct SpoolSource {
    spool: Arc<Spool>,
    names: Mutex<mpsc::Receiver<OsString>>,
    /// Tells discovery of each job put in `retry/`, and when it is due.
    retries: mpsc::UnboundedSender<RetryScheduled>,
    /// Gives discovery back a name a worker took and did not claim (see [`Held`]).
    given_back: Option<mpsc::UnboundedSender<OsString>>,
    stats: Arc<Stats>,
    /// For `done.keep`, read when a job is done.
    config: watch::Receiver<Arc<Config>>,
    /// The operator's pause, as discovery reads it from the spool: while it is Some, no job is
    /// claimed.
    paused: watch::Receiver<Option<Paused>>,
    /// Jobs that one more crash recovery would fail (`Recovery::alone`). Each runs alone: a
    /// crash while it runs is then charged to it, and to no job beside it, which would
    /// otherwise be recovered with it and run beside it again, crash after crash, until both
    /// reached `spool.max_recoveries`. Emptied as they run; empty, nothing waits for `gate`.
    alone: std::sync::Mutex<HashSet<OsString>>,
    /// While `alone` holds a name, every claim holds this: shared for an ordinary job,
    /// exclusive for one of those.
    gate: RwLock<()>,
}

/// A claim's hold on `SpoolSource::gate`.
enum Gate<'a> {
    Shared {
        _held: RwLockReadGuard<'a, ()>,
    },
    /// The job runs alone; `name` is the one it was handed out under, to be taken from `alone`
    /// once it has run.
    Alone {
        _held: RwLockWriteGuard<'a, ()>,
        name: OsString,
    },
}

impl SpoolSource {
    /// A source fed by `names`, which tells `retries` of each job it puts in `retry/`.
    pub fn new(
        spool: Arc<Spool>,
        names: mpsc::Receiver<OsString>,
        retries: mpsc::UnboundedSender<RetryScheduled>,
        stats: Arc<Stats>,
        config: watch::Receiver<Arc<Config>>,
        paused: watch::Receiver<Option<Paused>>,
    ) -> SpoolSource {
        SpoolSource {
            spool,
            names: Mutex::new(names),
            retries,
            given_back: None,
            stats,
            config,
            paused,
            alone: std::sync::Mutex::new(HashSet::new()),
            gate: RwLock::new(()),
        }
    }

    /// Where the names a worker took and did not claim go back to (discovery).
    pub fn giving_back(mut self, to: mpsc::UnboundedSender<OsString>) -> SpoolSource {
        self.given_back = Some(to);
        self
    }

    /// The jobs to run alone, from the crash recovery at start.
    pub fn run_alone(self, names: impl IntoIterator<Item = OsString>) -> SpoolSource {
        self.alone
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(names);
        self
    }

    /// Job `name` no longer waits to run alone.
    fn ran_alone(&self, name: &OsStr) {
        self.alone
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
    }

    /// Waits for the hold on `gate` that a claim of `name` needs (none once `alone` is
    /// empty); None when `stop` came first.
    async fn gate_for<'a>(
        &'a self,
        name: &OsStr,
        stop: &CancellationToken,
    ) -> Option<Option<Gate<'a>>> {
        let alone = {
            let alone = self
                .alone
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if alone.is_empty() {
                return Some(None);
            }
            alone.contains(name)
        };
        let gate = if alone {
            tokio::select! {
                biased;
                () = stop.cancelled() => return None,
                held = self.gate.write() => Gate::Alone { _held: held, name: name.to_owned() },
            }
        } else {
            tokio::select! {
                biased;
                () = stop.cancelled() => return None,
                held = self.gate.read() => Gate::Shared { _held: held },
            }
        };
        Some(Some(gate))
    }

    /// Returns once the spool is not paused (at once when it is not), or false when `stop`
    /// came first. A name a worker holds meanwhile is still in `new/`: nothing to undo.
    async fn unpaused(&self, stop: &CancellationToken) -> bool {
        if self.paused.borrow().is_none() {
            return true;
        }
        let mut paused = self.paused.clone();
        tokio::select! {
            biased;
            () = stop.cancelled() => false,
            changed = paused.wait_for(Option::is_none) => match changed {
                Ok(_) => !stop.is_cancelled(),
                // Discovery, which keeps the pause, ended: the daemon is stopping.
                Err(_) => {
                    stop.cancelled().await;
                    false
                }
            },
        }
    }

    /// Claims `name`; None when it is not a job to run (taken already, or refused).
    fn claim(&self, name: OsString) -> Option<SpoolLease<'_>> {
        let claimed = match self.spool.claim(&name) {
            Ok(Claim::Job(claimed)) => claimed,
            Ok(Claim::Skipped) => {
                // The name was counted as queued when it was handed out (a scan and an inotify
                // hint can both name a file that arrived as a pass began), so a name that turns
                // out to be taken already leaves the count like a claimed one does.
                self.stats.took();
                tracing::debug!(
                    job_id = display_name(&name),
                    "already taken or still running under the same name; skipped"
                );
                return None;
            }
            Ok(Claim::Rejected { reason, .. }) => {
                self.stats.took();
                self.stats.finished(Finished::Failed);
                tracing::warn!(
                    job_id = display_name(&name),
                    outcome = "failed",
                    "rejected: {reason}; moved to failed/"
                );
                return None;
            }
            Err(e) => {
                tracing::error!(job_id = display_name(&name), "{e}");
                return None;
            }
        };
        self.stats.took();
        if claimed.attempt == 1 {
            let waited = SystemTime::now().duration_since(claimed.submitted);
            self.stats
                .queue_wait_seconds
                .observe(waited.unwrap_or_default());
        }
        // Shown from the claimed name: the claim may have renamed the job (a job of the same
        // name waits in retry/).
        let shown = display_name(&claimed.name);
        let cancel = match self.spool.start_running(&claimed.name) {
            Ok(cancel) => Some(cancel),
            Err(e) => {
                tracing::error!(
                    job_id = shown,
                    "cannot make the cancel switch ({e}); `spoold cancel` cannot stop this attempt"
                );
                None
            }
        };
        Some(SpoolLease {
            source: self,
            shown,
            claimed,
            cancel,
            gate: None,
        })
    }
}

impl Source for SpoolSource {
    type Lease<'a> = SpoolLease<'a>;

    async fn next<'a>(&'a self, stop: &'a CancellationToken) -> Option<SpoolLease<'a>> {
        loop {
            // A pause is waited out before a name is taken: the runner drops a worker's wait
            // for its next job at a reload or a resize, and a name dropped with it would wait
            // in new/ for the next rescan.
            if !self.unpaused(stop).await {
                return None;
            }
            // The receiver is shared by the workers; it is released before the claim, so that
            // claims (a rename each) run side by side.
            let name = {
                let mut names = tokio::select! {
                    biased;
                    () = stop.cancelled() => return None,
                    names = self.names.lock() => names,
                };
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return None,
                    name = names.recv() => name?,
                }
            };
            // Held until it is claimed: should this wait be dropped (the runner drops it at a
            // reload or a resize) or end, the name goes back to discovery, which hands it out
            // again; else the job would wait in new/ for the next rescan.
            let mut held = Held {
                name: Some(name),
                back: self.given_back.as_ref(),
            };
            // A name received just as the stop began is left in new/ rather than started; so is
            // one received as a pause began, until the pause ends.
            if stop.is_cancelled() || !self.unpaused(stop).await {
                return None;
            }
            let gate = self.gate_for(held.name(), stop).await?;
            let name = held.take();
            if let Some(mut lease) = self.claim(name) {
                if let Some(Gate::Alone { .. }) = gate {
                    tracing::warn!(
                        job_id = lease.shown,
                        "it was running when the daemon died, and one more such death fails it: \
                         it runs alone, so that a crash it causes is charged to it only"
                    );
                }
                lease.gate = gate;
                return Some(lease);
            }
            // A job to run alone that is no longer in new/ (cancelled, held, refused or taken)
            // leaves the set, or every later claim would go on waiting for the gate for it.
            if let Some(Gate::Alone { name, .. }) = &gate
                && !self.spool.is_in(Dir::New, name)
            {
                self.ran_alone(name);
            }
        }
    }
}

/// A name a worker took from discovery and has not claimed yet.
struct Held<'a> {
    name: Option<OsString>,
    back: Option<&'a mpsc::UnboundedSender<OsString>>,
}

impl Held<'_> {
    fn name(&self) -> &OsStr {
        self.name.as_deref().expect("held until taken")
    }

    fn take(&mut self) -> OsString {
        self.name.take().expect("taken once")
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let (Some(name), Some(back)) = (self.name.take(), self.back) {
            // Discovery gone (the daemon stops): nothing to hand it out again to.
            let _ = back.send(name);
        }
    }
}

/// A job claimed from the spool: its file is in `active/`.
pub struct SpoolLease<'a> {
    source: &'a SpoolSource,
    claimed: Box<Claimed>,
    /// The job's name escaped for logs.
    shown: String,
    /// Raised by discovery when an operator cancels this attempt (`spoold cancel`).
    cancel: Option<Arc<CancelFd>>,
    /// Held until the lease is gone (see `SpoolSource::alone`).
    gate: Option<Gate<'a>>,
}

impl Drop for SpoolLease<'_> {
    fn drop(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            self.source.spool.stop_running(&self.claimed.name, cancel);
        }
        // Taken from the set before the exclusive hold goes (with the lease's fields, after
        // this), so that no claim in between finds the set empty and skips the gate.
        if let Some(Gate::Alone { name, .. }) = &self.gate {
            self.source.ran_alone(name);
        }
    }
}

impl Lease for SpoolLease<'_> {
    fn job(&self) -> Job<'_> {
        Job {
            id: &self.claimed.name,
            shown: &self.shown,
            path: &self.claimed.path,
            attempt: self.claimed.attempt,
        }
    }

    /// A claim in `active/` is the spool's alone until it is settled, so it is never lost; the
    /// descriptor is raised only by an operator's cancel, which ends the attempt the same way.
    fn revoked(&self) -> Option<BorrowedFd<'_>> {
        self.cancel.as_ref().map(|c| c.fd())
    }

    fn settle(self, verdict: Verdict, mut report: Report) {
        // The runner reports a raised `revoked` as a lost lease, to be released; here it can
        // only be a cancel, which fails the job for good instead. So does a cancel that came
        // after the handler ended but before this, for a job that would run again (its
        // request is gone: the cancel was taken as one of a running job). A job done or failed
        // meanwhile stays as it ended. A cancel that comes from here on waits for the next look.
        let cancelled_by = self.cancel.as_ref().and_then(|c| c.settling());
        crate::fault::settle_pause();
        if let Some(uid) = cancelled_by {
            if report.outcome == Outcome::LeaseLost
                || matches!(verdict, Verdict::Retry { .. } | Verdict::Release)
            {
                // The runner calls it a lost lease; on the spool a raised `revoked` is a cancel.
                let how = match report.reason.strip_prefix(crate::runner::LEASE_LOST) {
                    Some(rest) => format!("the handler {}", rest.trim_start_matches("; ")),
                    None => report.reason.clone(),
                };
                tracing::warn!(
                    job_id = self.shown.as_str(),
                    operator_uid = uid,
                    "cancelled by uid {uid} while running ({how}); not retried"
                );
                report.reason = CANCELLED.to_owned();
                return self.fail(true, report);
            }
            tracing::info!(
                job_id = self.shown.as_str(),
                operator_uid = uid,
                "the cancel by uid {uid} came as the handler ended; the job is settled as it ended"
            );
        }
        match verdict {
            Verdict::Done => self.done(&report),
            Verdict::Release => self.release(&report),
            Verdict::Retry { delay } => self.retry(delay, report),
            Verdict::Fail { permanent } => self.fail(permanent, report),
        }
    }
}

impl SpoolLease<'_> {
    fn done(&self, report: &Report) {
        let (job, id, stats) = (&*self.claimed, self.shown.as_str(), &self.source.stats);
        let duration_ms = report.duration.as_millis() as u64;
        let exit_status = report.exit_status();
        let keep = self.source.config.borrow().done.keep;
        match self.source.spool.finish_done(job, keep) {
            Ok(to) => {
                stats.finished(Finished::Done);
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
        }
    }

    fn release(&self, report: &Report) {
        let (job, id, stats) = (&*self.claimed, self.shown.as_str(), &self.source.stats);
        match self.source.spool.requeue(job) {
            Ok(_) => {
                // Not counted as queued here: the rename's inotify hint counts it, as it
                // does any file that arrives in new/.
                stats.finished(Finished::Aborted);
                let why = if report.reason.is_empty() {
                    "aborted by the stop"
                } else {
                    report.reason.as_str()
                };
                tracing::info!(
                    job_id = id,
                    attempt = job.attempt,
                    outcome = "requeued",
                    exit_status = report.exit_status(),
                    duration_ms = report.duration.as_millis() as u64,
                    "{why}; back in new/, this attempt does not count"
                );
            }
            Err(e) => tracing::error!(
                job_id = id,
                attempt = job.attempt,
                outcome = "requeued",
                "{e}; it stays in active/ and runs again after a restart"
            ),
        }
    }

    /// The job's history with this failed attempt: what its state or reason file records.
    fn history(&self, report: Report, now: SystemTime) -> History {
        let job = &*self.claimed;
        record::after_failure(&self.shown, job.attempt, job.history.as_ref(), report, now)
    }

    fn retry(self, delay: Duration, report: Report) {
        let (exit_status, duration_ms) = (report.exit_status(), report.duration.as_millis() as u64);
        let reason = report.reason.clone();
        let now = SystemTime::now();
        let due = later(now, delay);
        let mut history = self.history(report, now);
        record::set_next_attempt(&mut history, due);
        let (job, id) = (&*self.claimed, self.shown.as_str());
        match self.source.spool.schedule_retry(job, history) {
            Ok(name) => {
                // Gone only once the daemon stops; the next start reads retry/ anyway.
                let _ = self.source.retries.send((name, unix_ms(due)));
                self.source.stats.finished(Finished::Retried);
                tracing::warn!(
                    job_id = id,
                    attempt = job.attempt,
                    outcome = "retry",
                    exit_status,
                    duration_ms,
                    "attempt failed ({reason}); next attempt in {}",
                    humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
                );
            }
            Err(e) => tracing::error!(
                job_id = id,
                attempt = job.attempt,
                outcome = "retry",
                exit_status,
                duration_ms,
                "attempt failed ({reason}); {e}; the job stays in active/ and runs again after a restart"
            ),
        }
    }

    fn fail(self, permanent: bool, report: Report) {
        let (exit_status, duration_ms) = (report.exit_status(), report.duration.as_millis() as u64);
        let reason = report.reason.clone();
        let cancelled = report.outcome == Outcome::LeaseLost;
        let now = SystemTime::now();
        let mut history = self.history(report, now);
        history.permanent = permanent;
        history.failed_at = Some(rfc3339(now));
        let why = if cancelled {
            "cancelled by the operator"
        } else if permanent {
            "permanent exit code"
        } else {
            "out of attempts"
        };
        let (job, id) = (&*self.claimed, self.shown.as_str());
        match self.source.spool.fail(&job.name, history) {
            Ok(_) => {
                self.source.stats.finished(if cancelled {
                    Finished::Cancelled
                } else {
                    Finished::Failed
                });
                tracing::warn!(
                    job_id = id,
                    attempt = job.attempt,
                    outcome = "failed",
                    exit_status,
                    duration_ms,
                    "job failed ({reason}): {why}; moved to failed/"
                );
            }
            Err(e) => tracing::error!(
                job_id = id,
                attempt = job.attempt,
                outcome = "failed",
                exit_status,
                duration_ms,
                "job failed ({reason}): {why}; {e}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::report;
    use std::sync::atomic::Ordering::Relaxed;

    fn config(dir: &std::path::Path) -> Arc<Config> {
        Arc::new(
            Config::parse(
                &dir.join("c.toml"),
                "[spool]\ndir = \".\"\n[handler]\ncommand = [\"true\"]\n",
            )
            .unwrap(),
        )
    }

    /// A job named twice (by a scan and by an inotify hint) is counted twice and handed out
    /// twice; once it has run, STATUS must not show it as still queued.
    #[tokio::test]
    async fn a_name_handed_out_twice_leaves_nothing_queued() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        std::fs::write(dir.path().join("new/job"), "x").unwrap();
        let stats = Arc::new(Stats::default());
        stats.counted_hint();
        stats.counted_hint();
        let (tx, rx) = mpsc::channel(4);
        tx.send(OsString::from("job")).await.unwrap();
        tx.send(OsString::from("job")).await.unwrap();
        drop(tx);
        let source = SpoolSource::new(
            spool,
            rx,
            mpsc::unbounded_channel().0,
            stats.clone(),
            watch::channel(config(dir.path())).1,
            watch::channel(None).1,
        );
        let stop = CancellationToken::new();
        let lease = source.next(&stop).await.expect("the job is claimed");
        lease.settle(Verdict::Done, report(Outcome::Succeeded));
        // The channel is closed, so the second name is skipped and the source is exhausted.
        assert!(source.next(&stop).await.is_none());
        assert_eq!(stats.done.load(Relaxed), 1);
        assert_eq!(stats.queued(), 0);
    }

    /// A job that was to run alone but left new/ before its claim (cancelled or held, say)
    /// leaves the set: the claims after it no longer take the gate for it.
    #[tokio::test]
    async fn a_job_to_run_alone_that_is_gone_no_longer_gates_claims() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        std::fs::write(dir.path().join("new/other"), "x").unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.send(OsString::from("gone")).await.unwrap();
        tx.send(OsString::from("other")).await.unwrap();
        drop(tx);
        let source = SpoolSource::new(
            spool,
            rx,
            mpsc::unbounded_channel().0,
            Arc::new(Stats::default()),
            watch::channel(config(dir.path())).1,
            watch::channel(None).1,
        )
        .run_alone([OsString::from("gone")]);
        let stop = CancellationToken::new();
        let lease = source.next(&stop).await.expect("the other job is claimed");
        assert_eq!(lease.job().id, "other");
        assert!(lease.gate.is_none(), "the other job still took the gate");
        assert!(source.alone.lock().unwrap().is_empty());
    }

    /// While paused, a worker that holds a name waits without claiming it, and a stop ends the
    /// wait at once, leaving the job in new/.
    #[tokio::test]
    async fn a_paused_source_claims_nothing_and_a_stop_ends_its_wait() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        std::fs::write(dir.path().join("new/job"), "x").unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.send(OsString::from("job")).await.unwrap();
        let paused = Paused {
            reason: None,
            since: rfc3339(SystemTime::now()),
            by_uid: 0,
        };
        let (_paused_tx, paused_rx) = watch::channel(Some(paused));
        let source = SpoolSource::new(
            spool,
            rx,
            mpsc::unbounded_channel().0,
            Arc::new(Stats::default()),
            watch::channel(config(dir.path())).1,
            paused_rx,
        );
        let stop = CancellationToken::new();
        let canceller = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            canceller.cancel();
        });
        let began = std::time::Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(5), source.next(&stop)).await;
        assert!(
            matches!(ended, Ok(None)),
            "claimed while paused, or the stop did not end the wait"
        );
        assert!(began.elapsed() >= Duration::from_millis(250));
        assert!(dir.path().join("new/job").exists());
    }

    /// The contract a source keeps towards the runner, run here against the spool; a broker
    /// source runs `crate::source::contract` against itself the same way.
    #[tokio::test]
    async fn the_spool_keeps_the_source_contract() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (tx, rx) = mpsc::channel(64);
        let (retries_tx, _retries_rx) = mpsc::unbounded_channel();
        let source = SpoolSource::new(
            spool.clone(),
            rx,
            retries_tx,
            Arc::new(Stats::default()),
            watch::channel(config(dir.path())).1,
            watch::channel(None).1,
        );
        let submit = |id: &str, body: &str| spool.enqueue(&mut body.as_bytes(), id).unwrap();
        // Discovery, by hand: what is due in retry/ goes to new/, and new/ is named to the
        // source. A real dispatcher also names each file once more than needed at times; the
        // source skips what it cannot claim.
        let discover = || {
            spool.promote_due_retries(u64::MAX).unwrap();
            let mut scan = spool.scan_new().unwrap();
            while let Some(c) = scan.next_candidate(false).unwrap() {
                tx.try_send(c.name).unwrap();
            }
        };
        crate::source::contract(&source, submit, discover).await;
        // What the contract left behind, as the spool keeps it.
        let names = |d: Dir| std::fs::read_dir(spool.dir_path(d)).unwrap().count();
        assert_eq!((names(Dir::Done), names(Dir::Failed)), (1, 1));
        assert_eq!(
            (names(Dir::New), names(Dir::Active), names(Dir::Retry)),
            (0, 0, 0)
        );
        assert_eq!(names(Dir::State), 0, "no bookkeeping left behind");
    }
}
