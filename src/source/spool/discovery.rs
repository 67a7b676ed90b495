//! Discovery: finds the jobs that are ready to run and hands their names to the workers.
//!
//! Sources: a full scan of `new/` at start, after an inotify queue overflow, after inotify
//! hints were dropped, and every `spool.rescan_interval`; inotify hints (`IN_MOVED_TO`,
//! `IN_CLOSE_WRITE`, and `IN_CREATE` for entries that are not regular files) in between; and the
//! promotion of due retries from `retry/`. A second watch, on the spool root, reports at once a
//! spool that was deleted or moved away (a fatal error). inotify is
//! only a hint: losing one costs latency, never a job, because a later scan sees the file.
//!
//! Ordering and fairness: a scan is read a batch at a time and each batch runs oldest first by
//! mtime. While a scan pass is under way, or when hints had to be dropped, new hints are not
//! queued but mark the spool dirty, and another pass follows. Every pass visits each file that
//! existed when it began, so a file waits at most about two passes: nothing starves however fast
//! new jobs arrive. Memory is bounded by the batch size, not by the backlog.
//!
//! Discovery only names candidates; a worker claims one by renaming it. A name waiting in
//! the channel is still in `new/`, so a stop leaves nothing to undo. Every await here also waits
//! on the stop token: the send to a full channel cannot outlive the workers.
//!
//! What it counts in `new/` (a pass's names, and each hint) it publishes in `Stats`, so that
//! STATUS shows a queued count without anyone counting the directory.
//!
//! It also sweeps `tmp/` of files that producers abandoned (the Maildir rule), hourly and on the
//! blocking pool, and keeps the operator's pause (`control/pause`): a watch on `control/` tells
//! it at once when the record changes, a read every second is the fallback, and each change is
//! published to the source (which claims nothing while paused) and logged. The same look at
//! `control/` carries out the operator's cancel requests (`control/cancel-ID`), logs with the
//! operator's uid (and, for a member, carries out) pauses, resumes, holds, releases and retries
//! (`control/op-ULID`), once before the first job is handed out and then with the pause, and
//! files the jobs submitted with a delay or a time to live (`control/submit-ID`). Every second
//! or so it looks, on the blocking pool, for waiting jobs past their time (`spool::expiry`), and
//! once a minute purges `done/` when `done.max_age` says so.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinError, JoinHandle};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::clock::later;
use crate::config::Config;
use crate::daemon::stats::{Finished as Counted, Stats};
use crate::job::display_name;
use crate::source::admin::Paused;
use crate::source::admin::{Finished, OperatorError, Purged};
use crate::source::spool::control::{Cancelled, EXPIRED, PauseRecord};
use crate::source::spool::expiry::Expired;
use crate::source::spool::schedule::{self, RetrySchedule};
use crate::source::spool::submit::{Filed, SubmitRecord};
use crate::source::spool::{Dir, NewScan, Promotion, Spool, unix_ms};

/// Names read from a scan per batch, sorted oldest first within the batch.
const BATCH: usize = 1024;
/// Hints queued at most before discovery falls back to a scan.
const MAX_PENDING: usize = 4 * BATCH;
/// Due retries moved to `new/` per turn of the loop, so that a stop, a hint or a watchdog beat
/// never waits behind thousands of renames that fell due together: each costs a stat, a read
/// of the job's record and a rename, so a batch stays within a few milliseconds.
const PROMOTE_BATCH: usize = 64;
/// How long a promotion that failed (an I/O error) waits before it is tried again.
const PROMOTE_RETRY: Duration = Duration::from_secs(1);
/// Cancel requests acted on in one turn of the loop. Cancelling a waiting job writes and flushes
/// its record, a few milliseconds each, on this thread: a member's `spoold cancel` of
/// thousands of jobs is carried out over many turns, with the signals, the watchdog and new
/// jobs served in between.
const CANCELS_PER_TURN: usize = 16;
/// Cancel requests looked at in one turn, whatever became of them: one that names no job costs
/// a few stats, and a member who writes a hundred thousand of them must not hold the loop.
const CANCEL_LOOKS_PER_TURN: usize = 256;
/// The least time between two reads of `control/` that its changes bring: a change is acted on
/// at once, but a stream of them (a member writing thousands of requests, and the daemon's own
/// removals of the ones it acted on, which raise events too) is read at most this often.
const CONTROL_SETTLE: Duration = Duration::from_millis(20);
/// How often the pause record is read when no inotify event said it changed: a running daemon
/// acts on a pause within a second even without the watch. One small read a second costs
/// nothing next to a job.
const PAUSE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// How often discovery looks for waiting jobs past their time (`--ttl`, `retry.max_age`), at
/// the most: a job expires within about a second of its deadline.
const EXPIRY_EVERY: Duration = Duration::from_secs(1);
/// How often `done/` is purged when `done.max_age` is set (or every `max_age`, when shorter):
/// old finished jobs cost only space, so once a minute is plenty.
const DONE_PURGE_EVERY: Duration = Duration::from_secs(60);

/// A file in `tmp/` untouched (not modified) for this long was abandoned by its producer, and
/// is removed: the Maildir rule. A producer still writing it would have touched it since.
pub const TMP_MAX_AGE: Duration = Duration::from_secs(36 * 3600);
/// How often `tmp/` is swept, after the sweep at start. Abandoned files are rare and cost only
/// space, so the sweep stays far off the hot path.
const TMP_SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// A job a worker has just put in `retry/`: its name there and when it is due (ms since the
/// epoch). The channel is unbounded so that a worker never waits on discovery; it carries
/// one small message per failed attempt, which discovery takes at every turn.
pub type RetryScheduled = (OsString, u64);

/// The inotify stream on `new/`, created before READY so that no submission after it is missed.
pub struct Watcher {
    stream: EventStream<Vec<u8>>,
    /// The watch on the spool root, which reports the removal of `new/` and its siblings at
    /// once: spoold holds them open, so their own DELETE_SELF comes only when they are closed.
    root: Option<WatchDescriptor>,
    /// The watch on `control/`, which tells of a pause or a resume at once.
    control: Option<WatchDescriptor>,
}

impl Watcher {
    /// Watches `new/`. An error here (the inotify instance or watch limit reached) is not fatal:
    /// the caller falls back to periodic scans.
    pub fn new(spool: &Spool) -> io::Result<Watcher> {
        let inotify = Inotify::init()?;
        inotify.watches().add(
            spool.dir_path(Dir::New),
            WatchMask::MOVED_TO
                | WatchMask::CLOSE_WRITE
                | WatchMask::CREATE
                | WatchMask::DELETE_SELF
                | WatchMask::MOVE_SELF
                | WatchMask::ONLYDIR,
        )?;
        // Without this watch (the watch limit), a removed spool is found by the next rescan.
        let root = inotify
            .watches()
            .add(
                spool.root(),
                WatchMask::DELETE
                    | WatchMask::MOVED_FROM
                    | WatchMask::DELETE_SELF
                    | WatchMask::MOVE_SELF
                    | WatchMask::ONLYDIR,
            )
            .ok();
        // Without this one, the pause is read every PAUSE_CHECK_EVERY all the same.
        let control = inotify
            .watches()
            .add(
                spool.dir_path(Dir::Control),
                WatchMask::CLOSE_WRITE
                    | WatchMask::MOVED_TO
                    | WatchMask::MOVED_FROM
                    | WatchMask::DELETE
                    | WatchMask::ONLYDIR,
            )
            .ok();
        let stream = inotify.into_event_stream(vec![0u8; 64 * 1024])?;
        Ok(Watcher {
            stream,
            root,
            control,
        })
    }
}

/// What discovery works with, as the supervisor hands it over.
pub struct Discovery {
    pub spool: Arc<Spool>,
    /// Where the names of candidate jobs go, to the `SpoolSource`.
    pub names: mpsc::Sender<OsString>,
    pub stats: Arc<Stats>,
    pub rescan_interval: watch::Receiver<Duration>,
    pub retries: mpsc::UnboundedReceiver<RetryScheduled>,
    /// Names handed out that no worker claimed: its wait for a job was dropped (a reload, a
    /// resize) while it held one, through a pause or while waiting for its gate.
    pub given_back: mpsc::UnboundedReceiver<OsString>,
    pub watcher: Option<Watcher>,
    /// How often to record a heartbeat for the watchdog; None when there is no watchdog.
    pub heartbeat: Option<Duration>,
    /// Where the operator's pause is published (see [`pause_channel`]).
    pub paused: watch::Sender<Option<Paused>>,
    /// The config in force, for `retry.max_age` and `done.max_age` (a reload applies to the
    /// next look).
    pub config: watch::Receiver<Arc<Config>>,
}

/// The channel of the operator's pause, holding the pause in force at start: a daemon that
/// starts on a paused spool claims nothing, from its first job on.
pub fn pause_channel(
    spool: &Spool,
) -> (
    watch::Sender<Option<Paused>>,
    watch::Receiver<Option<Paused>>,
) {
    let paused = match spool.pause_record() {
        Ok(record) => record.and_then(|r| r.pause()),
        Err(e) => {
            tracing::error!("{e}; spoold runs as if not paused until the record is fixed");
            None
        }
    };
    if let Some(p) = &paused {
        tracing::warn!(
            operator_uid = p.by_uid,
            "the spool is paused (by uid {}, since {}{}): no job starts until `spoold resume`",
            p.by_uid,
            p.since,
            reason_text(p.reason.as_deref())
        );
    }
    watch::channel(paused)
}

/// ": REASON" for log lines, escaped, or nothing.
fn reason_text(reason: Option<&str>) -> String {
    reason.map_or_else(String::new, |r| format!(": {}", crate::job::escape_text(r)))
}

/// Where discovery stands in the current scan pass.
struct Scan {
    reader: NewScan,
    seen: u64,
    /// `Stats::taken` when the pass began.
    taken_before: u64,
}

/// Discovery's state between two turns of its loop; each arm of the loop's `select!` is a
/// method on it. The sender of names stays outside: the permits of a hand-over borrow it.
struct Turns {
    spool: Arc<Spool>,
    stats: Arc<Stats>,
    rescan_interval: watch::Receiver<Duration>,
    retries: mpsc::UnboundedReceiver<RetryScheduled>,
    given_back: mpsc::UnboundedReceiver<OsString>,
    watcher: Option<Watcher>,
    heartbeat: Duration,
    /// Names found and not yet handed over, oldest first.
    pending: VecDeque<OsString>,
    /// The scan pass under way, if any.
    scan: Option<Scan>,
    /// Whether another scan pass is needed: a hint could not be queued, or one was lost.
    dirty: bool,
    rescan_at: Instant,
    /// The due times of the jobs in retry/, read from the directory off this thread (at
    /// start, and again only when the schedule had to leave some out).
    schedule: RetrySchedule,
    retry_scan: Option<JoinHandle<io::Result<RetrySchedule>>>,
    rescan_retries_at: Option<Instant>,
    beat_at: Instant,
    paused: watch::Sender<Option<Paused>>,
    /// The pause record as last read, to log each change once.
    pause_seen: Option<PauseRecord>,
    /// The last error reading it, to log each distinct error once rather than every second.
    pause_error: Option<String>,
    pause_check_at: Instant,
    /// Cancel requests listed and not yet looked at. `control/` is listed again only once
    /// these are done, so that a long list is read once, not once per turn.
    cancel_backlog: VecDeque<OsString>,
    /// When `control/` was last read (`check_control`).
    control_read_at: Instant,
    /// `control/` changed since the submissions were last filed.
    control_event: bool,
    /// When the submissions are filed again without a change (a request the last look could
    /// not read, say).
    filing_due: Instant,
    /// The operators' records listed and not yet taken, for the same reason.
    op_backlog: VecDeque<OsString>,
    config: watch::Receiver<Arc<Config>>,
    /// The look for expired jobs (and the purge of old done/ jobs) under way, on the blocking
    /// pool, and when the next one starts.
    expiry: Option<JoinHandle<Sweep>>,
    expiry_at: Instant,
    done_purge_at: Instant,
    /// The filing of submissions under way, on the blocking pool, and whether another look
    /// was asked for meanwhile.
    filing: Option<JoinHandle<io::Result<Filings>>>,
    file_again: bool,
    /// Whether a job with a time to live may wait: the look reads `state/` only then. True
    /// at start (the first look finds out), and whenever one is filed.
    ttl_jobs: bool,
    /// Whether a job with a time to live was filed since the look under way began.
    ttl_filed: bool,
}

/// What the filing of submissions did: each request and its outcome.
type Filings = Vec<(OsString, SubmitRecord, io::Result<Filed>)>;

/// What a look for expired jobs found.
struct Sweep {
    expired: io::Result<Vec<Expired>>,
    /// Whether a job with a time to live still waits.
    ttl_jobs: bool,
    /// The jobs removed from done/, when `done.max_age` is set and a purge was due.
    purged: Option<Result<Vec<Purged>, OperatorError>>,
    took: Duration,
}

impl Discovery {
    /// Runs until `stop` is cancelled. An error return means discovery itself broke (the spool
    /// vanished, say): the supervisor treats it as fatal.
    pub async fn run(self, stop: CancellationToken) -> io::Result<()> {
        let (mut turns, names) = Turns::new(self);
        // Owned by this task's stop token like everything else here; it needs no handle.
        tokio::spawn(sweep_tmp(turns.spool.clone(), stop.clone()));
        // Never more than the channel holds, which reserve_many would refuse.
        let handoff = (names.max_capacity() / 2).max(1);
        // Before any job is handed out: a hold or a cancel asked while no daemon ran must win
        // over the claim of the job it names.
        turns.check_control();
        loop {
            turns.scan_new()?;
            turns.read_retries_if_due();
            let promote_at = turns.schedule.next_due().map(instant_of);
            // A turn that left work for the next one (cancels, operators' records, due
            // retries, each taken a bounded number at a time and each with a write or a
            // rename) gives the other tasks of this thread their turn first: the signals'
            // task among them, which turns a SIGTERM into the stop.
            let now = Instant::now();
            if turns.pause_check_at <= now || promote_at.is_some_and(|at| at <= now) {
                tokio::task::yield_now().await;
            }

            tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(()),
                // Names go out up to half a channel at a time: the workers run on threads of
                // their own, and waking this task for every slot they free would cost a
                // cross-thread wake-up per job.
                permits = names.reserve_many(turns.pending.len().min(handoff)), if !turns.pending.is_empty() => match permits {
                    Ok(permits) => {
                        for permit in permits {
                            permit.send(turns.pending.pop_front().expect("as many names as permits"));
                        }
                    }
                    // Every worker is gone: nothing left to dispatch to.
                    Err(_) => return Ok(()),
                },
                // Ahead of the events, which a member can keep coming (by writing in
                // control/): the watchdog is fed whatever arrives.
                () = sleep_until(turns.beat_at) => turns.beat(),
                event = next_event(&mut turns.watcher) => turns.on_event(event)?,
                () = sleep_until(turns.rescan_at) => turns.rescan_due(),
                Some((name, due)) = turns.retries.recv() => turns.schedule.insert(name, due),
                Some(name) = turns.given_back.recv() => turns.given_back(name),
                scanned = async { turns.retry_scan.as_mut().expect("guarded").await }, if turns.retry_scan.is_some() => {
                    turns.retries_read(scanned);
                }
                () = sleep_until(promote_at.unwrap_or_else(far_future)), if promote_at.is_some() => {
                    turns.promote_due();
                }
                () = sleep_until(turns.pause_check_at) => turns.check_control(),
                () = sleep_until(turns.expiry_at), if turns.expiry.is_none() => turns.start_expiry(&stop),
                swept = async { turns.expiry.as_mut().expect("guarded").await }, if turns.expiry.is_some() => {
                    turns.expiry_done(swept);
                }
                filed = async { turns.filing.as_mut().expect("guarded").await }, if turns.filing.is_some() => {
                    turns.submissions_filed(filed);
                }
            }
        }
    }
}

impl Turns {
    fn new(discovery: Discovery) -> (Turns, mpsc::Sender<OsString>) {
        let Discovery {
            spool,
            names,
            stats,
            rescan_interval,
            retries,
            given_back,
            watcher,
            heartbeat,
            paused,
            config,
        } = discovery;
        if watcher.is_none() {
            tracing::warn!(
                "no inotify watch on {}; new jobs are found by rescans only",
                spool.dir_path(Dir::New).display()
            );
        }
        let rescan_at = later(Instant::now(), *rescan_interval.borrow());
        let turns = Turns {
            spool,
            stats,
            rescan_interval,
            retries,
            given_back,
            watcher,
            heartbeat: heartbeat.unwrap_or(Duration::from_secs(3600)),
            pending: VecDeque::new(),
            scan: None,
            // A scan at start: whatever was submitted while no daemon ran.
            dirty: true,
            rescan_at,
            schedule: RetrySchedule::new(schedule::CAP),
            retry_scan: None,
            rescan_retries_at: Some(Instant::now()),
            beat_at: Instant::now(),
            paused,
            // Nothing seen yet: the first turn reads the record, in case it changed since
            // `pause_channel` read it.
            pause_seen: None,
            pause_error: None,
            pause_check_at: Instant::now(),
            cancel_backlog: VecDeque::new(),
            control_read_at: Instant::now(),
            control_event: true,
            filing_due: Instant::now(),
            op_backlog: VecDeque::new(),
            config,
            expiry: None,
            expiry_at: Instant::now(),
            done_purge_at: Instant::now(),
            filing: None,
            file_again: false,
            ttl_jobs: true,
            ttl_filed: false,
        };
        (turns, names)
    }

    /// Begins a scan pass when one is needed and the queue has room, and reads the next batch
    /// of the pass under way into `pending`. At the end of a pass, publishes what it counted.
    fn scan_new(&mut self) -> io::Result<()> {
        if self.scan.is_none() && self.dirty && self.pending.len() < BATCH {
            self.dirty = false;
            crate::fault::hit(crate::fault::Point::Dispatcher);
            self.scan = Some(Scan {
                reader: self.spool.scan_new()?,
                seen: 0,
                taken_before: self.stats.taken(),
            });
            self.rescan_at = later(Instant::now(), self.poll_interval());
        }
        if self.pending.len() < BATCH
            && let Some(s) = &mut self.scan
            && read_batch(s, &mut self.pending)?
        {
            self.stats.counted_pass(s.seen, s.taken_before);
            self.scan = None;
        }
        Ok(())
    }

    /// Starts reading retry/ off this thread, at start, after a failed read, and whenever the
    /// schedule had to leave entries out.
    fn read_retries_if_due(&mut self) {
        if self.retry_scan.is_none()
            && (self.rescan_retries_at.is_some_and(|t| t <= Instant::now())
                || self.schedule.needs_rescan())
        {
            self.rescan_retries_at = None;
            self.schedule.clear();
            let spool = self.spool.clone();
            self.retry_scan = Some(tokio::task::spawn_blocking(move || {
                spool.scan_retries(schedule::CAP)
            }));
        }
    }

    /// One inotify event (or the end of the stream). An error return is fatal: the spool was
    /// removed or moved away.
    fn on_event(&mut self, event: Option<io::Result<inotify::Event<OsString>>>) -> io::Result<()> {
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                tracing::warn!("inotify failed ({e}); new jobs are found by rescans only");
                self.watcher = None;
                self.dirty = true;
                return Ok(());
            }
            None => {
                self.watcher = None;
                self.dirty = true;
                return Ok(());
            }
        };
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            tracing::warn!("inotify queue overflowed; rescanning new/");
            self.dirty = true;
            self.control_changed();
        } else if self
            .watcher
            .as_ref()
            .is_some_and(|w| w.control.as_ref() == Some(&event.wd))
        {
            // Any change in control/ (a temporary file's too): the records are read again.
            self.control_changed();
        } else if self
            .watcher
            .as_ref()
            .is_some_and(|w| w.root.as_ref() == Some(&event.wd))
        {
            if let Some(path) = lost_spool_path(&self.spool, &event) {
                return Err(spool_gone(&path));
            }
        } else if event
            .mask
            .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED)
        {
            return Err(spool_gone(&self.spool.dir_path(Dir::New)));
        } else if let Some(name) = event.name {
            self.hint(name, event.mask);
        }
        Ok(())
    }

    /// Something changed in `control/`. The pause record, one small file, is read now: a
    /// pause takes hold at once. The rest is read now, or [`CONTROL_SETTLE`] after the last
    /// read when that was more recent; sooner if a read is due sooner anyway.
    fn control_changed(&mut self) {
        self.control_event = true;
        let next_read = later(self.control_read_at, CONTROL_SETTLE);
        // At once when the last read is old enough; events that never stop would otherwise
        // keep the timer's arm of the loop, below theirs, from ever running.
        if Instant::now() >= next_read {
            self.check_control();
        } else {
            self.check_pause();
            self.pause_check_at = self.pause_check_at.min(next_read);
        }
    }

    /// A name inotify reported in `new/`.
    fn hint(&mut self, name: OsString, mask: EventMask) {
        if name.as_bytes().first() == Some(&b'.') {
            return;
        }
        // A regular file that was just created is still being written: its CLOSE_WRITE (or the
        // producer's rename) brings it. Anything else created here (a link, a FIFO, a
        // directory) raises no further event, so it is dispatched now, to be rejected at claim.
        if mask.contains(EventMask::CREATE) && self.spool.is_regular_in_new(&name) {
            return;
        }
        self.stats.counted_hint();
        // While a pass runs, or after hints were dropped, a hint could jump ahead of older
        // files: leave it to the next pass instead.
        if self.scan.is_some() || self.dirty || self.pending.len() >= MAX_PENDING {
            self.dirty = true;
        } else {
            self.pending.push_back(name);
        }
    }

    /// A name handed out that no worker claimed: it goes out again first, as the oldest it
    /// is. Not counted again: it was counted as queued when it was found, and not taken.
    fn given_back(&mut self, name: OsString) {
        if self.scan.is_some() || self.dirty || self.pending.len() >= MAX_PENDING {
            self.dirty = true;
        } else {
            self.pending.push_front(name);
        }
    }

    fn rescan_due(&mut self) {
        self.dirty = true;
        self.rescan_at = later(Instant::now(), self.poll_interval());
    }

    /// The read of retry/ ended: its due times replace the schedule, or it is tried again
    /// after a rescan interval.
    fn retries_read(&mut self, scanned: Result<io::Result<RetrySchedule>, JoinError>) {
        self.retry_scan = None;
        let interval = *self.rescan_interval.borrow();
        match scanned {
            Ok(Ok(scanned)) => return self.schedule.replace_with(scanned),
            Ok(Err(e)) => tracing::error!(
                "cannot read {}: {e}; trying again in {}",
                self.spool.dir_path(Dir::Retry).display(),
                humantime::format_duration(interval)
            ),
            Err(e) => tracing::error!("the read of retry/ ended abnormally: {e}"),
        }
        self.rescan_retries_at = Some(later(Instant::now(), interval));
    }

    /// Acts on what operators wrote in `control/`: the pause record, cancel requests, the
    /// records of holds, releases and retries, and the submissions of delayed jobs and jobs with
    /// a time to live.
    fn check_control(&mut self) {
        self.control_read_at = Instant::now();
        self.pause_check_at = later(self.control_read_at, PAUSE_CHECK_EVERY);
        self.check_pause();
        let more_cancels = self.check_cancels();
        if self.check_operations() || more_cancels {
            // More records wait: the next turn takes them, after a stop or a hand-out of jobs.
            self.pause_check_at = Instant::now();
        }
        // Not at every turn through a backlog of records: each filing lists all of control/.
        if self.control_event || self.control_read_at >= self.filing_due {
            self.control_event = false;
            self.filing_due = later(self.control_read_at, PAUSE_CHECK_EVERY);
            self.file_submissions();
        }
    }

    /// Acts on the operators' records of holds, releases and retries (`Spool::act_on_operations`).
    /// Returns true when records are left for the next turn.
    fn check_operations(&mut self) -> bool {
        let turn = self.spool.act_on_operations(&mut self.op_backlog);
        if turn.queue_changed {
            // new/ gained or lost a job: a pass sets the queued count right.
            self.dirty = true;
        }
        for (name, due) in turn.scheduled {
            self.schedule.insert(name, due);
        }
        turn.more
    }

    /// Files each job submitted with `--in`, `--at` or `--ttl` (see `submit`): into retry/,
    /// and into the schedule, when it is not due yet; else into new/. The filing writes and
    /// flushes a record per job, so it runs on the blocking pool; a look asked for while one
    /// runs follows it.
    fn file_submissions(&mut self) {
        if self.filing.is_some() {
            self.file_again = true;
            return;
        }
        self.file_again = false;
        let spool = self.spool.clone();
        self.filing = Some(tokio::task::spawn_blocking(move || {
            let now = SystemTime::now();
            let mut filings = Vec::new();
            for (name, request) in spool.submit_requests_to_file()? {
                let result = spool.file_submission(&name, &request, now);
                filings.push((name, request, result));
            }
            Ok(filings)
        }));
    }

    /// Logs what the filing did and puts the delayed jobs in the schedule.
    fn submissions_filed(&mut self, filed: Result<io::Result<Filings>, JoinError>) {
        self.filing = None;
        let filings = match filed {
            Ok(Ok(filings)) => filings,
            Ok(Err(e)) => {
                tracing::error!(
                    "cannot read the submissions in {}: {e}",
                    self.spool.dir_path(Dir::Control).display()
                );
                Vec::new()
            }
            Err(e) => {
                tracing::error!("the filing of submissions ended abnormally: {e}");
                Vec::new()
            }
        };
        for (name, request, result) in filings {
            let id = display_name(&name);
            let uid = request.uid;
            if request.expires_unix_ms.is_some() && result.is_ok() {
                self.ttl_jobs = true;
                self.ttl_filed = true;
            }
            let expires = request
                .expires_unix_ms
                .map(|ms| format!("; expires at {}", rfc3339_ms(ms)))
                .unwrap_or_default();
            match result {
                Ok(Filed::Scheduled { name: filed, due }) => {
                    tracing::info!(
                        job_id = display_name(&filed),
                        operator_uid = uid,
                        "scheduled by uid {uid}: waits in retry/ until {}{expires}",
                        rfc3339_ms(due)
                    );
                    self.schedule.insert(filed, due);
                }
                Ok(Filed::Queued { name: filed }) => tracing::info!(
                    job_id = display_name(&filed),
                    operator_uid = uid,
                    "submitted by uid {uid}: queued in new/{expires}"
                ),
                Ok(Filed::NoJob) => tracing::warn!(
                    job_id = id,
                    operator_uid = uid,
                    "submission by uid {uid} has no job in tmp/; request dropped"
                ),
                // Left in place: tried again at the next look.
                Err(e) => tracing::error!(
                    job_id = id,
                    operator_uid = uid,
                    "cannot file the job submitted by uid {uid}: {e}; trying again"
                ),
            }
        }
        if self.file_again {
            self.file_submissions();
        }
    }

    /// Starts a look for expired jobs on the blocking pool, with a purge of done/ when one is due.
    fn start_expiry(&mut self, stop: &CancellationToken) {
        let config = self.config.borrow().clone();
        let max_age = config.retry.max_age;
        let done_age = config
            .done
            .max_age
            .filter(|_| self.done_purge_at <= Instant::now());
        if let Some(age) = done_age {
            self.done_purge_at = later(Instant::now(), DONE_PURGE_EVERY.min(age));
        }
        let (spool, token) = (self.spool.clone(), stop.clone());
        let mut ttl_jobs = self.ttl_jobs;
        self.expiry = Some(tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let now = SystemTime::now();
            let expired = spool.expire_waiting(
                now,
                max_age,
                &mut ttl_jobs,
                &|| token.is_cancelled(),
                &mut |name, e| {
                    tracing::error!(
                        job_id = display_name(name),
                        "cannot fail the expired job: {e}; trying again at the next look"
                    )
                },
            );
            let purged = done_age.map(|age| {
                let before = now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH);
                spool.purge_finished(Finished::Done, before, false)
            });
            Sweep {
                expired,
                ttl_jobs,
                purged,
                took: started.elapsed(),
            }
        }));
    }

    /// Logs what a look for expired jobs did, and sets the next look: every second, or less
    /// often when a look takes long (a huge backlog), so that looking never takes more than a
    /// fifth of the blocking pool's time.
    fn expiry_done(&mut self, swept: Result<Sweep, JoinError>) {
        self.expiry = None;
        let sweep = match swept {
            Ok(sweep) => sweep,
            Err(e) => {
                tracing::error!("the look for expired jobs ended abnormally: {e}");
                self.expiry_at = later(Instant::now(), EXPIRY_EVERY);
                return;
            }
        };
        self.expiry_at = later(Instant::now(), EXPIRY_EVERY.max(sweep.took * 4));
        // A job filed with a time to live while the look ran keeps it true.
        self.ttl_jobs = sweep.ttl_jobs || self.ttl_filed;
        self.ttl_filed = false;
        match sweep.expired {
            Ok(expired) => {
                for job in expired {
                    self.stats.finished(Counted::Expired);
                    // The queued count still holds a job taken out of new/: a pass sets it right.
                    if job.from == Dir::New {
                        self.dirty = true;
                    }
                    let renamed = if job.moved == job.name {
                        String::new()
                    } else {
                        format!(" as {}", display_name(&job.moved))
                    };
                    tracing::warn!(
                        job_id = display_name(&job.name),
                        outcome = "failed",
                        reason = EXPIRED,
                        "expired (not done within {}): moved from {} to failed/{renamed}",
                        job.why,
                        job.from.place()
                    );
                }
            }
            Err(e) => tracing::error!("cannot look for expired jobs: {e}"),
        }
        match sweep.purged {
            Some(Ok(purged)) => {
                for job in purged {
                    tracing::info!(
                        job_id = display_name(&job.name),
                        "removed from done/ (there since {}): older than done.max_age",
                        job.finished
                    );
                }
            }
            Some(Err(OperatorError::Io(e) | OperatorError::Denied { err: e, .. })) => {
                tracing::error!("cannot purge done/: {e}");
            }
            None => {}
        }
    }

    /// Acts on the cancel requests in `control/`, at most [`CANCELS_PER_TURN`] of them, and
    /// removes each once acted on. A request for a job that is being claimed or settled right
    /// now stays, for the next look. Returns true when requests are left for the next turn.
    fn check_cancels(&mut self) -> bool {
        if self.cancel_backlog.is_empty() {
            match self.spool.cancel_requests() {
                Ok(requests) => self.cancel_backlog.extend(requests),
                Err(e) => {
                    tracing::error!(
                        "cannot read the cancel requests in {}: {e}",
                        self.spool.dir_path(Dir::Control).display()
                    );
                    return false;
                }
            }
        }
        // A request left for later (its job being claimed or settled) is dropped from the
        // backlog and found again by the next listing. Only requests that moved or stopped a
        // job (a flush each) count towards CANCELS_PER_TURN; every look counts towards
        // CANCEL_LOOKS_PER_TURN.
        let (mut acted, mut looked) = (0, 0);
        while let Some(name) = self.cancel_backlog.pop_front() {
            if acted == CANCELS_PER_TURN || looked == CANCEL_LOOKS_PER_TURN {
                self.cancel_backlog.push_front(name);
                return true;
            }
            looked += 1;
            // Gone since the listing: withdrawn by whoever wrote it.
            let Some(uid) = self.spool.cancel_request_uid(&name) else {
                continue;
            };
            let id = display_name(&name);
            match self.spool.cancel(&name, uid) {
                Ok(Cancelled::Pending) => continue,
                Ok(Cancelled::Running) => {
                    acted += 1;
                    tracing::warn!(
                        job_id = id,
                        operator_uid = uid,
                        operator_action = "cancel",
                        "cancel by uid {uid}: stopping the running handler"
                    )
                }
                Ok(Cancelled::Failed { from, name: moved }) => {
                    acted += 1;
                    self.stats.finished(Counted::Cancelled);
                    // The queued count still holds a job taken out of new/: a pass sets it right.
                    if from == Dir::New {
                        self.dirty = true;
                    }
                    let renamed = if moved == name {
                        String::new()
                    } else {
                        format!(" as {}", display_name(&moved))
                    };
                    tracing::warn!(
                        job_id = id,
                        operator_uid = uid,
                        operator_action = "cancel",
                        outcome = "failed",
                        "cancelled by uid {uid}: moved from {} to failed/{renamed}",
                        from.place()
                    );
                }
                Ok(Cancelled::NoSuchJob) => tracing::warn!(
                    job_id = id,
                    operator_uid = uid,
                    operator_action = "cancel",
                    "cancel by uid {uid}: no waiting, held or running job of that name; request dropped"
                ),
                Err(e) => tracing::error!(
                    job_id = id,
                    operator_uid = uid,
                    operator_action = "cancel",
                    "cancel by uid {uid} failed: {e}; request dropped"
                ),
            }
            self.spool.remove_cancel_request(&name);
        }
        false
    }

    /// Reads the pause record and, when it changed, publishes the pause and logs who changed it.
    fn check_pause(&mut self) {
        let record = match self.spool.pause_record() {
            Ok(record) => {
                self.pause_error = None;
                record
            }
            Err(e) => {
                let text = e.to_string();
                if self.pause_error.as_ref() != Some(&text) {
                    tracing::error!("{text}; the pause stays as it was until the record is fixed");
                    self.pause_error = Some(text);
                }
                return;
            }
        };
        if record == self.pause_seen {
            return;
        }
        let now = record.as_ref().and_then(PauseRecord::pause);
        let was = self.paused.borrow().is_some();
        match (&now, &record) {
            // Who paused and resumed is logged from the operator's own record (`control/op-`),
            // once per command, even for a pause and a resume this look did not tell apart or
            // that were made while no daemon ran; these lines say what the daemon does now.
            (Some(_), _) if !was => tracing::warn!(
                "the spool is paused now: no new job starts until `spoold resume`; jobs in flight go on"
            ),
            (None, Some(_)) if was => tracing::warn!("the pause is over: jobs start again"),
            (None, None) if was => {
                tracing::warn!("the pause record was removed: jobs start again")
            }
            _ => {}
        }
        self.paused.send_replace(now);
        self.pause_seen = record;
    }

    fn beat(&mut self) {
        self.stats.beat();
        self.beat_at = later(Instant::now(), self.heartbeat);
    }

    /// How long until the next rescan. Without inotify, rescans are the only discovery: poll
    /// at least every second.
    fn poll_interval(&self) -> Duration {
        let interval = *self.rescan_interval.borrow();
        if self.watcher.is_some() {
            interval
        } else {
            interval.min(Duration::from_secs(1))
        }
    }

    /// Moves up to PROMOTE_BATCH due retries to `new/`; their inotify events bring them back
    /// here as hints. A job that is not due after all (a stale entry) goes back in the schedule
    /// at its real time.
    fn promote_due(&mut self) {
        let schedule = &mut self.schedule;
        let now = unix_ms(SystemTime::now());
        let mut promoted = 0;
        for _ in 0..PROMOTE_BATCH {
            let Some((name, _)) = schedule.pop_due(now) else {
                break;
            };
            match self.spool.promote_if_due(&name, now) {
                Ok(Promotion::Moved) => promoted += 1,
                Ok(Promotion::NotDue(due)) => schedule.insert(name, due),
                Ok(Promotion::Gone) => {}
                Err(e) => {
                    tracing::error!(
                        job_id = display_name(&name),
                        "cannot move the job from retry/ to new/: {e}; trying again in {}",
                        humantime::format_duration(PROMOTE_RETRY)
                    );
                    schedule.insert(name, now.saturating_add(PROMOTE_RETRY.as_millis() as u64));
                }
            }
        }
        if promoted > 0 {
            tracing::debug!(promoted, "retries due; moved back to new/");
        }
    }
}

/// Reads up to BATCH names of the current pass into `pending`, oldest first. Returns true when
/// the pass is complete.
fn read_batch(scan: &mut Scan, pending: &mut VecDeque<OsString>) -> io::Result<bool> {
    let mut batch = Vec::with_capacity(BATCH);
    let mut finished = false;
    while batch.len() < BATCH {
        match scan.reader.next_candidate(true)? {
            Some(c) => batch.push(c),
            None => {
                finished = true;
                break;
            }
        }
    }
    scan.seen += batch.len() as u64;
    batch.sort_by(|a, b| {
        a.mtime_ns
            .cmp(&b.mtime_ns)
            .then_with(|| a.name.cmp(&b.name))
    });
    pending.extend(batch.into_iter().map(|c| c.name));
    Ok(finished)
}

/// The error that ends discovery when a directory it depends on is gone.
fn spool_gone(path: &std::path::Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{} was removed or moved away while spoold was running",
            path.display()
        ),
    )
}

/// The path an event on the root watch says is gone: the root itself, or one of the spool's
/// directories in it. Other entries of the root (the lock file, a user's file) do not matter.
fn lost_spool_path(spool: &Spool, event: &inotify::Event<OsString>) -> Option<std::path::PathBuf> {
    match &event.name {
        None => event
            .mask
            .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF)
            .then(|| spool.root().to_owned()),
        Some(name) => Dir::ALL
            .iter()
            .any(|d| name.as_os_str() == d.name())
            .then(|| spool.root().join(name)),
    }
}

async fn next_event(
    watcher: &mut Option<Watcher>,
) -> Option<io::Result<inotify::Event<std::ffi::OsString>>> {
    match watcher {
        Some(w) => w.stream.next().await,
        None => std::future::pending().await,
    }
}

/// A moment no timer reaches, for a branch whose guard is off.
fn far_future() -> Instant {
    later(Instant::now(), Duration::from_secs(86400 * 365))
}

/// The monotonic instant of a wall-clock time in ms since the epoch (the far future for u64::MAX,
/// or for any time read from a record that lies beyond what the clock holds).
fn instant_of(unix_ms_due: u64) -> Instant {
    let now_ms = unix_ms(SystemTime::now());
    let wait = Duration::from_millis(unix_ms_due.saturating_sub(now_ms));
    later(Instant::now(), wait)
}

/// A time in ms since the epoch as RFC 3339, for log lines.
fn rfc3339_ms(ms: u64) -> String {
    super::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

/// "36 hours" rather than humantime's "1day 12h": the Maildir rule is stated in hours.
fn age_in_words(age: Duration) -> String {
    if age.as_secs().is_multiple_of(3600) && age.subsec_nanos() == 0 {
        format!("{} hours", age.as_secs() / 3600)
    } else {
        humantime::format_duration(age).to_string()
    }
}

/// Removes abandoned files from `tmp/` at start and then every `TMP_SWEEP_EVERY`, until `stop`.
/// Each sweep runs on the blocking pool, since a `tmp/` with a million files would hold the
/// main thread for seconds, and checks the token between entries, so it also ends at a stop.
async fn sweep_tmp(spool: Arc<Spool>, stop: CancellationToken) {
    loop {
        let max_age = crate::fault::tmp_max_age(TMP_MAX_AGE);
        let before = SystemTime::now()
            .checked_sub(max_age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let (sweeper, token) = (spool.clone(), stop.clone());
        let sweep = tokio::task::spawn_blocking(move || {
            let tmp = sweeper.dir_path(Dir::Tmp);
            let result = sweeper.sweep_tmp(before, &|| token.is_cancelled(), &mut |name, result| {
                let file = display_name(name);
                match result {
                    Ok(()) => tracing::warn!(
                        file = %file,
                        "removed {}/{file}: untouched for more than {}, so abandoned by whatever was writing it",
                        tmp.display(),
                        age_in_words(max_age)
                    ),
                    Err(e) => tracing::warn!(file = %file, "cannot remove the abandoned {}/{file}: {e}", tmp.display()),
                }
            });
            if let Err(e) = result {
                tracing::warn!("cannot sweep {}: {e}", tmp.display());
            }
        });
        tokio::select! {
            () = stop.cancelled() => return,
            _ = sweep => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(TMP_SWEEP_EVERY) => {}
        }
    }
}
