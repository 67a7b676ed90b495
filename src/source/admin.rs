//! The seam between the client commands (`enqueue`, `status`, `failed`, `retry`, `pause`,
//! `resume`, `hold`, `release`, `show`, `cancel`, `purge`) and a queue:
//! the [`Admin`] trait and the domain types its answers are made of. A source implements it
//! (the spool does); the commands name no directory and no on-disk record, so that they can
//! work the same against a broker.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Read};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::job::{History, JobId};

/// What the client commands ask of a queue.
pub trait Admin {
    /// What kind of queue this is and where, for people: ("spool", its root, escaped).
    fn address(&self) -> (&'static str, String);

    /// Submits the bytes of `src` as a new job named `id`, whole or not at all: a daemon never
    /// sees half a job. While the job is partial, `partial` holds how to undo it, so that a
    /// signal can (see [`Partial`]).
    fn submit(&self, src: &mut dyn Read, id: &str, partial: &Partial) -> Result<(), SubmitError>;

    /// The jobs in each state, the age of the oldest queued job, and the daemon's pid.
    fn counts(&self) -> io::Result<Counts>;

    /// The jobs running now, the longest-running first (for `spoold top`).
    fn running(&self) -> io::Result<Vec<RunningJob>>;

    /// The job that has waited longest to run, if any (for `spoold top`).
    fn oldest_queued(&self) -> io::Result<Option<Queued>>;

    /// The jobs that failed for good, in the order of their IDs, with their histories.
    fn failed(&self) -> io::Result<Vec<FailedJob>>;

    /// Why `id`, a valid job ID, can name no job of this queue (a broker's IDs are subject
    /// tokens, which a spool's names need not be); None when it can. Every argument of a
    /// command is checked before anything moves.
    fn refuses(&self, id: &JobId) -> Option<String> {
        let _ = id;
        None
    }

    /// Queues the failed job `id` again, with a fresh attempt count.
    fn retry(&self, id: &JobId) -> io::Result<Retried>;

    /// Whether the queue is paused, and by whom: None when it runs.
    fn paused(&self) -> io::Result<Option<Paused>>;

    /// Pauses the queue: no new job starts, jobs in flight go on. The pause is state of the
    /// queue, not of a daemon: it holds across restarts and with no daemon running. Returns
    /// the pause in force, and whether it was one already (then it is left as it was).
    fn pause(&self, reason: Option<&str>) -> Result<(Paused, bool), OperatorError>;

    /// Ends a pause. Returns false when the queue was not paused.
    fn resume(&self) -> Result<bool, OperatorError>;

    /// Sets the waiting job `id` aside: it never starts until released.
    fn hold(&self, id: &JobId) -> Result<Moved, OperatorError>;

    /// Puts the held job `id` back among the waiting ones, with its attempt count kept.
    fn release(&self, id: &JobId) -> Result<Moved, OperatorError>;

    /// The IDs of the jobs waiting to run (queued or waiting for a retry), for `hold --all`.
    fn waiting(&self) -> io::Result<Vec<JobId>>;

    /// The IDs of the held jobs, for `release --all`.
    fn held(&self) -> io::Result<Vec<JobId>>;

    /// Asks for job `id` to be cancelled: a waiting, held or running job fails for good with
    /// the reason `cancelled`. The daemon acts on the request (within a second when one runs,
    /// else when one starts). Returns false when no job of that ID is known to the queue.
    fn cancel(&self, id: &JobId) -> Result<bool, OperatorError>;

    /// Puts an operator's `op` in the daemon's journal, with the caller's uid and the job IDs:
    /// `done` are the jobs the caller acted on itself; `asked` are those it was not allowed to
    /// move (a member of the queue's group), which the daemon acts on for it (within a second
    /// when one runs, else when one starts) and logs with the outcome. `reason` is the
    /// operator's, for a pause.
    fn record_operation(
        &self,
        op: Operation,
        reason: Option<&str>,
        done: &[JobId],
        asked: &[JobId],
    ) -> Result<(), OperatorError>;

    /// Where the job `id` is and its failed attempts, for `spoold show`; None when there is
    /// no job of that ID.
    fn show(&self, id: &JobId) -> io::Result<Option<ShownJob>>;

    /// Writes the bytes of `src` as the job `id`, whole, where no worker sees it yet; it is
    /// published by [`Admin::publish`]. While it is not published, `partial` holds how to undo
    /// it together with every other job staged before it, so that a signal undoes them all.
    fn stage(
        &self,
        src: &mut dyn Read,
        id: &str,
        partial: &Partial,
        submission: &Submission,
    ) -> Result<(), SubmitError> {
        let _ = (src, id, partial, submission);
        Err(SubmitError::Io(io::Error::from(io::ErrorKind::Unsupported)))
    }

    /// Publishes the staged jobs `ids` together. With `submission.max_queued`, all or none:
    /// when the jobs waiting and these would pass the limit, every staged job is removed and
    /// the answer is [`PublishError::Full`]. Concurrent publishers never pass the limit together.
    fn publish(
        &self,
        ids: &[String],
        partial: &Partial,
        submission: &Submission,
    ) -> Result<(), PublishError> {
        let _ = (ids, partial, submission);
        Err(PublishError::Io {
            err: io::Error::from(io::ErrorKind::Unsupported),
            published: 0,
        })
    }

    /// Removes the finished jobs in `state` that finished before `before`, with their records;
    /// with `dry_run`, only lists them. Returns the jobs (to be) removed, oldest ID first.
    fn purge(
        &self,
        state: Finished,
        before: SystemTime,
        dry_run: bool,
    ) -> Result<Vec<Purged>, OperatorError> {
        let _ = (state, before, dry_run);
        Err(OperatorError::Io(io::Error::from(
            io::ErrorKind::Unsupported,
        )))
    }
}

/// How `spoold enqueue` submits its jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Submission {
    /// No job starts before this time.
    pub not_before: Option<SystemTime>,
    /// A job not done by this time fails with the reason `expired`.
    pub expires: Option<SystemTime>,
    /// Refuse when this many jobs wait (`spool.max_queued`).
    pub max_queued: Option<u64>,
}

/// Why [`Admin::publish`] published nothing.
#[derive(Debug)]
pub enum PublishError {
    /// `waiting` jobs wait, and `adding` more would pass `limit`.
    Full {
        waiting: u64,
        adding: u64,
        limit: u64,
    },
    /// The queue refused this user; membership of `group` grants access.
    Denied { err: io::Error, group: u32 },
    /// The first `published` jobs were published before `err` stopped the rest, which were
    /// removed.
    Io { err: io::Error, published: usize },
}

/// The states of a finished job, for [`Admin::purge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    Done,
    Failed,
}

/// A job [`Admin::purge`] removed (or, in a dry run, would remove).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purged {
    pub name: OsString,
    /// When it finished (came into done/ or failed/), RFC 3339, UTC.
    pub finished: String,
}

/// A job being run, as `spoold top` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningJob {
    pub name: OsString,
    /// The attempt under way, 1-based; None when its record could not be read.
    pub attempt: Option<u32>,
    /// When the attempt began.
    pub since: SystemTime,
}

/// A job waiting to run, and since when (its submission).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub name: OsString,
    pub since: SystemTime,
}

/// A job as `spoold show` shows it.
#[derive(Debug)]
pub struct ShownJob {
    pub name: OsString,
    /// Where it is now ...
    pub place: Place,
    /// ... and since when (RFC 3339, UTC).
    pub since: String,
    /// Its failed attempts; None when it has not failed (or nothing was recorded).
    pub history: Option<History>,
    /// Why its record could not be read, when it could not.
    pub record_error: Option<String>,
    /// True when it waits for the time `spoold enqueue --in`/`--at` gave it, and has not run yet.
    pub scheduled: bool,
}

/// A pause in force: who paused the queue, when, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paused {
    pub reason: Option<String>,
    /// RFC 3339, UTC.
    pub since: String,
    /// The effective uid of whoever paused it.
    pub by_uid: u32,
}

/// An operator action that the client carries out itself when it may, and that is logged in
/// the daemon's journal either way (see [`Admin::record_operation`]). Cancel is not among them:
/// the daemon logs it as it acts on the request. The names are the on-disk format and the
/// journal's `OPERATOR_ACTION=` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Logged from its own record, not from the pause record's changes, so that a pause and a
    /// resume made while no daemon ran (or within one look at `control/`) are both logged.
    Pause,
    Resume,
    Hold,
    Release,
    Retry,
    /// For `spoold purge`: logged when the client removed the jobs; the daemon does not carry
    /// out a purge for a member yet, and says so in the journal.
    Purge,
}

impl Operation {
    /// The past participle the journal's messages use: "held by uid 1001".
    pub fn done_verb(self) -> &'static str {
        match self {
            Operation::Pause => "paused",
            Operation::Resume => "resumed",
            Operation::Hold => "held",
            Operation::Release => "released",
            Operation::Retry => "retried",
            Operation::Purge => "purged",
        }
    }

    /// The name in the journal's `OPERATOR_ACTION=` field and in requests.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Pause => "pause",
            Operation::Resume => "resume",
            Operation::Hold => "hold",
            Operation::Release => "release",
            Operation::Retry => "retry",
            Operation::Purge => "purge",
        }
    }
}

/// Why an operator action failed.
#[derive(Debug)]
pub enum OperatorError {
    /// This user may not change the queue's state; membership of `group` would grant it, or
    /// (when `root_only`) only root may.
    Denied {
        err: io::Error,
        group: u32,
        root_only: bool,
    },
    Io(io::Error),
}

impl From<io::Error> for OperatorError {
    fn from(e: io::Error) -> OperatorError {
        OperatorError::Io(e)
    }
}

/// What [`Admin::hold`] or [`Admin::release`] did with an ID.
#[derive(Debug, PartialEq, Eq)]
pub enum Moved {
    /// Now in `place`, under `name` (another name when `place` held a job of that name);
    /// waiting there until `until` (ms since the Unix epoch) when it has a time to wait for.
    To {
        name: OsString,
        place: Place,
        until: Option<u64>,
    },
    /// No job of that ID is where the action takes jobs from.
    NoSuchJob,
}

/// Why a submission failed.
#[derive(Debug)]
pub enum SubmitError {
    /// The queue itself refused this user (not the file being submitted); membership of
    /// `group` grants access.
    Denied {
        err: io::Error,
        group: u32,
    },
    Io(io::Error),
}

impl From<io::Error> for SubmitError {
    fn from(e: io::Error) -> SubmitError {
        SubmitError::Io(e)
    }
}

/// A place a job can be in, as its source names it to people: `new/` in the spool, where a
/// broker would say "the queue".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place(&'static str);

impl Place {
    pub const fn named(name: &'static str) -> Place {
        Place(name)
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// " until TIME" for a job that waits for its time (ms since the Unix epoch), else nothing.
pub fn waits_until(until: Option<u64>) -> String {
    until
        .map(|ms| {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
            format!(" until {}", crate::clock::rfc3339_ms(t))
        })
        .unwrap_or_default()
}

/// What [`Admin::retry`] did with an ID.
#[derive(Debug, PartialEq, Eq)]
pub enum Retried {
    /// Waiting to run, in `place`, under `name` (another name when `place` held a job of that
    /// name already).
    Queued { name: OsString, place: Place },
    /// No failed job has that ID.
    NoSuchJob,
    /// An entry of that ID is in `place` but is no job (it is `kind`): it stays there.
    NotAJob { kind: &'static str, place: Place },
}

/// A job that failed for good, as `spoold failed` shows it.
#[derive(Debug)]
pub struct FailedJob {
    pub name: OsString,
    /// None when nothing was recorded, or the record cannot be read.
    pub history: Option<History>,
    /// Where its payload is kept, when that is not beside the job itself (a broker's object
    /// store holds a large one).
    pub payload: Option<String>,
}

/// Counts per state, as `spoold status` shows them (its `--json` is this, serialised).
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Counts {
    pub queued: u64,
    pub active: u64,
    pub retry: u64,
    pub done: u64,
    pub failed: u64,
    pub oldest_queued_age_s: Option<f64>,
    /// The pid of the daemon that owns the queue, if one runs.
    pub daemon_pid: Option<u32>,
    /// Whether an operator paused the queue (`spoold pause`), and the pause's record.
    pub paused: bool,
    pub paused_reason: Option<String>,
    pub paused_since: Option<String>,
    pub paused_by_uid: Option<u32>,
    /// Jobs set aside by `spoold hold`.
    pub held: u64,
    /// Delayed jobs (`spoold enqueue --in`/`--at`) whose time has not come; `retry` does not
    /// count them.
    pub scheduled: u64,
}

/// How to undo a submission that is not whole yet.
pub type Undo = Box<dyn FnOnce() + Send>;

/// The submission in progress, if any, as the means to undo it. A signal handler thread undoes
/// it (`Partial::discard`) before the process ends, and keeps the lock while the process ends:
/// a source holds the same lock while it completes a submission, so the job is either undone or
/// whole, never undone half-way into being published.
#[derive(Default)]
pub struct Partial(Mutex<Option<Undo>>);

impl Partial {
    /// The lock a source holds to start a submission (setting its undo) and to complete it
    /// (taking the undo away).
    pub fn hold(&self) -> MutexGuard<'_, Option<Undo>> {
        // The lock guards a closure that a panic elsewhere cannot leave half-made.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Undoes the submission in progress, if there is one, and returns the lock: no submission
    /// can start or complete while it is held. The caller ends the process.
    pub fn discard(&self) -> MutexGuard<'_, Option<Undo>> {
        let mut current = self.hold();
        if let Some(undo) = current.take() {
            undo();
        }
        current
    }
}

impl fmt::Debug for Partial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.hold().is_some() {
            "Partial(in progress)"
        } else {
            "Partial(none)"
        })
    }
}

/// A new job ID: a ULID, so that IDs sort by submit time.
pub fn new_job_id(generator: &mut ulid::Generator) -> String {
    match generator.generate() {
        Ok(id) => id.to_string(),
        // More than 2^80 IDs in one millisecond cannot happen; a fresh random one is still unique.
        Err(_) => ulid::Ulid::generate().to_string(),
    }
}
