//! The operator's hand on the spool: the pause record (`control/pause`) and the hold queue
//! (`hold/`), as the client commands change them and as the daemon reads them.
//!
//! It also owns cancelling (`spoold cancel`): the client only writes a request,
//! `control/cancel-ID`, and the daemon carries it out. That way members of the group, who may
//! write in `control/` but may not move jobs in `retry/` or `hold/`, can cancel; and a running
//! attempt, which only the daemon can reach, is stopped the same way: each attempt under way
//! has an eventfd in [`Running`], which is its lease's `revoked` descriptor. The lease settles
//! a cancelled attempt as failed for good, with the reason `cancelled`, not as a lost lease.
//!
//! A pause is state of the spool, not of a process: `spoold pause` writes the record whether
//! or not a daemon runs, and a daemon that starts on a paused spool claims nothing. The record
//! is rewritten, not removed, by `spoold resume` (with `paused: false`), so that it always says
//! who changed it last (the uid the client wrote, since a daemon cannot otherwise learn who
//! changed a file). Who paused and who resumed is logged from the operator's records below,
//! not from the pause record's changes: a daemon that was not running, or that read the record
//! once after a pause and a resume, would see only the last of them.
//!
//! Why `control/` and not a file in the root: in the package the root is `2750 spoold:spoold`,
//! and members of the group must be able to pause. `control/` is `2770` (setgid, group write,
//! no sticky bit), so any member can write the record and any member can replace another's
//! (one operator resumes what another paused), and nothing else in the spool opens up to them.
//!
//! Held jobs move by rename from `new/` or `retry/` into `hold/`, and back into `new/`; their
//! `state/NAME` stays where it is, so a released job keeps its attempt count.
//!
//! Pauses, resumes, holds, releases and retries are audited through `control/` too
//! (`control/op-<ULID>`, an [`OpRecord`]): for a hold, a release or a retry the client makes
//! the move itself when it may (root, or the user spoold; with
//! or without a daemon) and writes a record of it, which the daemon logs with `OPERATOR_UID=`
//! and `JOB_ID=`; a member of the group, who may not, writes the same record as a request,
//! and the daemon makes the move for them and logs it. The directories stay as they were
//! (`hold/` is `2750` like `retry/`), so that a member's every action on another's job goes
//! through the daemon and its journal: were `hold/`, `retry/` and `failed/` group-writable, a
//! member could move or delete jobs with `mv` and `rm` and no line would say so. The daemon
//! writes the journal, not the client, because only the daemon's lines belong to the unit
//! (`journalctl -u spoold`); a client's lines would carry the caller's session instead. The
//! uid in a record is the one its writer put there: under the unit's `PrivateUsers=yes` the
//! daemon sees every member's file as owned by `nobody`, so it cannot check it (a member who
//! forges a record by hand can lie about who they are, not about what was done).

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, OnceLock};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use super::{Dir, Spool, rename_noreplace, rfc3339};
use crate::job::{Failure, History, JobId, display_name};
use crate::source::admin::{Moved, Operation, OperatorError, Paused, waits_until};

/// The record's name in `control/`.
const PAUSE: &str = "pause";
/// The largest pause record read: a reason is a line or two, and a daemon reads the record
/// every second, so a file grown by hand must not cost it more than this.
const MAX_RECORD: u64 = 64 * 1024;

/// `control/pause`. The field names are the file format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct PauseRecord {
    pub(super) paused: bool,
    pub(super) reason: Option<String>,
    /// When the pause (or the resume) was made, RFC 3339.
    pub(super) since: String,
    /// The effective uid of the client that wrote the record.
    pub(super) uid: u32,
}

impl PauseRecord {
    pub(super) fn pause(&self) -> Option<Paused> {
        self.paused.then(|| Paused {
            reason: self.reason.clone(),
            since: self.since.clone(),
            by_uid: self.uid,
        })
    }
}

impl Spool {
    /// The pause record, if one was ever written. A record that cannot be parsed is an error
    /// naming the file: the daemon keeps its last state and says why.
    pub(super) fn pause_record(&self) -> io::Result<Option<PauseRecord>> {
        let fd = match rustix::fs::openat(
            self.fd(Dir::Control),
            PAUSE,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(self.control_error(e.into())),
        };
        let mut text = String::new();
        File::from(fd)
            .take(MAX_RECORD)
            .read_to_string(&mut text)
            .map_err(|e| self.control_error(e))?;
        serde_json::from_str(&text).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}/{PAUSE}: not a pause record: {e}",
                    self.dir_path(Dir::Control).display()
                ),
            )
        })
    }

    /// Reads `control/FILE` as a record: opened without following a link, without waiting on a
    /// FIFO, and only if it is a regular file, of at most [`MAX_RECORD`] bytes. Members of the
    /// group may write in `control/`: a link planted there must not make root's command, or
    /// the daemon, read something else, and a FIFO must not hold either up.
    pub(super) fn read_control(&self, file: &OsStr) -> io::Result<Vec<u8>> {
        let fd = rustix::fs::openat(
            self.fd(Dir::Control),
            file,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            Mode::empty(),
        )?;
        let stat = rustix::fs::fstat(&fd)?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        let mut text = Vec::new();
        File::from(fd).take(MAX_RECORD + 1).read_to_end(&mut text)?;
        if text.len() as u64 > MAX_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than a record can be ({MAX_RECORD} bytes)"),
            ));
        }
        Ok(text)
    }

    fn control_error(&self, e: io::Error) -> io::Error {
        io::Error::new(
            e.kind(),
            format!("{}/{PAUSE}: {e}", self.dir_path(Dir::Control).display()),
        )
    }

    /// The pause in force, if any.
    pub fn paused(&self) -> io::Result<Option<Paused>> {
        Ok(self.pause_record()?.and_then(|r| r.pause()))
    }

    /// Pauses the spool, unless it is paused already (then the pause in force is kept, so that
    /// its time and author stay true). Returns the pause and whether it was in force already.
    pub fn pause(&self, reason: Option<&str>) -> Result<(Paused, bool), OperatorError> {
        if let Some(p) = self.paused()? {
            return Ok((p, true));
        }
        let record = PauseRecord {
            paused: true,
            reason: reason.map(str::to_owned),
            since: rfc3339(std::time::SystemTime::now()),
            uid: rustix::process::geteuid().as_raw(),
        };
        self.write_pause(&record)?;
        Ok((record.pause().expect("a pause"), false))
    }

    /// Ends the pause, if there is one; returns false when there was none.
    pub fn resume(&self) -> Result<bool, OperatorError> {
        if self.paused()?.is_none() {
            return Ok(false);
        }
        self.write_pause(&PauseRecord {
            paused: false,
            reason: None,
            since: rfc3339(std::time::SystemTime::now()),
            uid: rustix::process::geteuid().as_raw(),
        })?;
        Ok(true)
    }

    /// Writes the pause record: a daemon reads either the old record or the new one, never
    /// half of one (`write_control`).
    fn write_pause(&self, record: &PauseRecord) -> Result<(), OperatorError> {
        let text = serde_json::to_vec_pretty(record)
            .map_err(|e| OperatorError::Io(self.control_error(e.into())))?;
        self.write_control(OsStr::new(PAUSE), &text)
    }

    /// A permission error becomes `Denied` with the group of `dir`, which grants the right in
    /// the package (or none, when `root_only`).
    pub(super) fn denied_or_io(&self, dir: Dir, e: Errno, root_only: bool) -> OperatorError {
        let path = self.dir_path(dir);
        let err = io::Error::new(
            io::Error::from(e).kind(),
            format!("{}: {}", path.display(), io::Error::from(e)),
        );
        if e == Errno::ACCESS || e == Errno::PERM {
            use std::os::unix::fs::MetadataExt;
            let group = fs::metadata(&path).map_or(u32::MAX, |m| m.gid());
            OperatorError::Denied {
                err,
                group,
                root_only,
            }
        } else {
            OperatorError::Io(err)
        }
    }

    /// Sets a waiting job aside: from `new/` or `retry/` into `hold/`. Its state record stays,
    /// so its attempt count is kept.
    pub fn hold(&self, id: &JobId) -> Result<Moved, OperatorError> {
        let name = id.as_os_str();
        // Two rounds: a retry that falls due between the look in new/ and the one in retry/
        // has moved to new/, where the second round finds it.
        for _ in 0..2 {
            for from in [Dir::New, Dir::Retry] {
                if let Some(moved) = self.move_operator(from, Dir::Hold, name)? {
                    return Ok(moved);
                }
            }
        }
        Ok(Moved::NoSuchJob)
    }

    /// Puts a held job back among the waiting ones, with its attempt count kept: into `new/`,
    /// or into `retry/` when its record gives a time still to come (a retry's backoff, or
    /// `enqueue --in`/`--at`), where it waits for the rest of it. A hold sets a job aside; it
    /// does not move its time (as `postsuper -H` puts mail back in the deferred queue, which
    /// keeps its retry time).
    pub fn release(&self, id: &JobId) -> Result<Moved, OperatorError> {
        let name = id.as_os_str();
        let now = super::unix_ms(std::time::SystemTime::now());
        // A record this user may not read, or a damaged one, sends the job to new/: the claim
        // reads the record again and deals with it there.
        let until = match self.read_record(Dir::State, name) {
            Ok(Some(record)) => record.next_attempt_unix_ms.filter(|&due| due > now),
            Ok(None) | Err(_) => None,
        };
        let to = if until.is_some() {
            Dir::Retry
        } else {
            Dir::New
        };
        Ok(match self.move_operator(Dir::Hold, to, name)? {
            Some(Moved::To { name, place, .. }) => Moved::To { name, place, until },
            Some(Moved::NoSuchJob) | None => Moved::NoSuchJob,
        })
    }

    /// One operator move of a regular file; None when `from` has no job of that name.
    fn move_operator(
        &self,
        from: Dir,
        to: Dir,
        name: &OsStr,
    ) -> Result<Option<Moved>, OperatorError> {
        match rustix::fs::statat(self.fd(from), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() => {}
            // Not a job: the daemon refuses such an entry at its claim, unopened.
            Ok(_) | Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(self.denied_or_io(from, e, true)),
        }
        // Tried first without the fallback of `move_job`, so that a user who may not write
        // either directory is told so, rather than shown the error of a later step.
        if let Err(e) = rename_noreplace(self.fd(from), name, self.fd(to), name) {
            match e {
                Errno::NOENT => return Ok(None),
                Errno::EXIST => {}
                Errno::ACCESS | Errno::PERM => {
                    return Err(self.denied_or_io(
                        if to == Dir::Hold { to } else { from },
                        e,
                        true,
                    ));
                }
                e => return Err(OperatorError::Io(e.into())),
            }
        } else {
            return Ok(Some(Moved::To {
                name: name.to_owned(),
                place: to.place(),
                until: None,
            }));
        }
        Ok(self
            .move_job(from, to, name)
            .map_err(|e| {
                OperatorError::Io(io::Error::new(
                    e.kind(),
                    format!("job {}: {e}", display_name(name)),
                ))
            })?
            .map(|name| Moved::To {
                name,
                place: to.place(),
                until: None,
            }))
    }

    /// The regular files in `dir` whose names are job IDs, sorted. A name that starts with a
    /// dot is no job: in `new/` it is one a producer is still writing (discovery skips it, and
    /// taking it would leave the producer's rename to its real name without a file).
    pub(super) fn ids_in(&self, dir: Dir) -> io::Result<Vec<JobId>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(self.dir_path(dir))? {
            let entry = entry?;
            if entry.file_name().as_bytes().first() == Some(&b'.') || !entry.file_type()?.is_file()
            {
                continue;
            }
            if let Ok(id) = JobId::parse(&display_name(&entry.file_name())) {
                ids.push(id);
            }
        }
        ids.sort_by(|a, b| a.as_os_str().cmp(b.as_os_str()));
        Ok(ids)
    }
}

/// The prefix of a cancel request's name in `control/`: `cancel-<ID>`.
const CANCEL_PREFIX: &str = "cancel-";

/// `control/cancel-<ID>`: who asked. The field names are the file format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CancelRecord {
    /// The effective uid of the client that wrote the request.
    uid: u32,
}

/// The attempts under way, by job name, each with the eventfd its handler's poll watches
/// (`Lease::revoked`): the one way discovery, on another thread, can end a running handler.
#[derive(Default)]
pub(super) struct Running(
    std::sync::Mutex<HashMap<OsString, Arc<CancelFd>>>,
    /// Eventfds of attempts that ended without a cancel, for the next attempts: making and
    /// closing one per job would cost two system calls on every job's path.
    std::sync::Mutex<Vec<OwnedFd>>,
);

/// The cancel switch of one attempt under way.
pub(crate) struct CancelFd {
    fd: OwnedFd,
    /// Who cancelled the attempt, once an operator did; or that its outcome is being settled,
    /// after which no cancel can take hold of it.
    by: OnceLock<Switch>,
}

/// What closed an attempt's cancel switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Switch {
    /// The operator with this uid cancelled it.
    CancelledBy(u32),
    /// Its settling began.
    Settling,
}

impl CancelFd {
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Closes the switch as the attempt's outcome is settled, and says who cancelled the
    /// attempt before that, if anyone did. A cancel that comes later finds the switch closed
    /// and leaves its request for the next look, which finds the job where settling put it.
    pub(crate) fn settling(&self) -> Option<u32> {
        match self.by.set(Switch::Settling) {
            Ok(()) => None,
            Err(_) => match self.by.get() {
                Some(Switch::CancelledBy(uid)) => Some(*uid),
                _ => None,
            },
        }
    }
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Running({} attempts)", self.lock().len())
    }
}

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<OsString, Arc<CancelFd>>> {
        // The map holds no invariant a panic elsewhere could leave half-made.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a cancel request did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Cancelled {
    /// The job was running: its handler is being stopped, and the lease fails it.
    Running,
    /// The job was waiting in `from`; it is in `failed/` now, under `name`.
    Failed { from: Dir, name: OsString },
    /// The job is in `active/` but not (or no longer) registered as running: it is being
    /// claimed or settled right now, so the request is kept and looked at again.
    Pending,
    /// No job of that name is waiting, held or running.
    NoSuchJob,
}

impl Spool {
    /// Registers an attempt of `name` as under way; its cancel switch is for the lease's
    /// `revoked`. None (and the job cannot be cancelled while it runs) when no eventfd can be made.
    pub(super) fn start_running(&self, name: &OsStr) -> io::Result<Arc<CancelFd>> {
        let spare = self
            .running
            .1
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let fd = match spare {
            Some(fd) => fd,
            None => rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )?,
        };
        let entry = Arc::new(CancelFd {
            fd,
            by: OnceLock::new(),
        });
        self.running.lock().insert(name.to_owned(), entry.clone());
        Ok(entry)
    }

    /// The attempt of `name` is over (settled): a cancel can no longer reach it.
    pub(super) fn stop_running(&self, name: &OsStr, entry: Arc<CancelFd>) {
        {
            let mut running = self.running.lock();
            if running.get(name).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                running.remove(name);
            }
        }
        // Kept for the next attempt only when nobody cancelled it: a cancel sets `by` and
        // raises the counter while it holds the table's lock, so once the entry is out of the
        // table a `by` unset or closed for settling means a counter still at zero. Anyone else still holding the
        // entry makes `try_unwrap` fail, and the descriptor is closed instead.
        if entry.by.get().is_none_or(|by| *by == Switch::Settling)
            && let Ok(CancelFd { fd, .. }) = Arc::try_unwrap(entry)
        {
            self.running
                .1
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(fd);
        }
    }

    /// Asks the daemon to cancel job `id` by writing `control/cancel-<ID>`. Members of the
    /// group may write in `control/`, so they may cancel; the daemon does the moves.
    pub fn request_cancel(&self, id: &JobId) -> Result<bool, OperatorError> {
        let name = id.as_os_str();
        let mut seen = false;
        let mut unsure = false;
        // A delayed job not yet filed by the daemon is in tmp/, with its request.
        if self.is_submitted(name) {
            seen = true;
        }
        for dir in [Dir::New, Dir::Retry, Dir::Hold, Dir::Active] {
            match rustix::fs::statat(self.fd(dir), name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(_) => seen = true,
                Err(Errno::NOENT) => {}
                // A member may not look in every directory: the daemon decides then.
                Err(_) => unsure = true,
            }
        }
        if !seen && !unsure {
            return Ok(false);
        }
        let mut request = OsString::from(CANCEL_PREFIX);
        request.push(name);
        let record = CancelRecord {
            uid: rustix::process::geteuid().as_raw(),
        };
        self.write_control(
            &request,
            &serde_json::to_vec(&record).map_err(io::Error::from)?,
        )?;
        Ok(true)
    }

    /// The names of the jobs with a pending cancel request. Only the names: a turn reads just
    /// the requests it acts on ([`cancel_request_uid`](Self::cancel_request_uid)), so that a
    /// cancel of thousands of jobs is not read whole at every turn.
    pub(super) fn cancel_requests(&self) -> io::Result<Vec<OsString>> {
        let mut requests = Vec::new();
        for entry in fs::read_dir(self.dir_path(Dir::Control))? {
            let entry = entry?;
            let file = entry.file_name();
            let Some(name) = file.as_bytes().strip_prefix(CANCEL_PREFIX.as_bytes()) else {
                continue;
            };
            if name.is_empty() || !entry.file_type()?.is_file() {
                continue;
            }
            // Written by hand (the client refuses them): "." and ".." name directories.
            if name == b"." || name == b".." {
                self.set_aside_control(&file, "names no job");
                continue;
            }
            requests.push(OsStr::from_bytes(name).to_owned());
        }
        Ok(requests)
    }

    /// Who asked to cancel `name`: the uid its request gives; None when the request is gone
    /// (withdrawn since it was listed). A request whose record cannot be read is still acted
    /// on, with the uid of its file's owner.
    pub(super) fn cancel_request_uid(&self, name: &OsStr) -> Option<u32> {
        let mut file = OsString::from(CANCEL_PREFIX);
        file.push(name);
        let st =
            rustix::fs::statat(self.fd(Dir::Control), &file, AtFlags::SYMLINK_NOFOLLOW).ok()?;
        Some(
            self.read_control(&file)
                .ok()
                .and_then(|t| serde_json::from_slice::<CancelRecord>(&t).ok())
                .map_or(st.st_uid, |r| r.uid),
        )
    }

    /// Removes the request to cancel `name`: it was acted on.
    pub(super) fn remove_cancel_request(&self, name: &OsStr) {
        let mut request = OsString::from(CANCEL_PREFIX);
        request.push(name);
        let _ = rustix::fs::unlinkat(self.fd(Dir::Control), &request, AtFlags::empty());
    }

    /// Cancels job `name` for the operator `uid`: a running attempt gets its switch raised,
    /// a waiting or held job goes to `failed/` with the reason `cancelled`, its attempt count
    /// kept from `state/NAME`.
    pub(super) fn cancel(&self, name: &OsStr, uid: u32) -> io::Result<Cancelled> {
        if let Some(entry) = self.running.lock().get(name) {
            if entry.by.set(Switch::CancelledBy(uid)).is_ok() {
                rustix::io::write(&entry.fd, &1u64.to_ne_bytes())?;
                return Ok(Cancelled::Running);
            }
            // Being settled (its handler has ended): the request stays, and the next look
            // finds the job in retry/ or new/ (and cancels it there) or done or failed.
            if entry.by.get() == Some(&Switch::Settling) {
                return Ok(Cancelled::Pending);
            }
            return Ok(Cancelled::Running);
        }
        // A delayed job not filed yet waits in tmp/ with its request. Looked at first: a filing
        // that moves it meanwhile puts it where the rounds below find it.
        if self.is_submitted(name)
            && let Some(moved) = self.fail_waiting(Dir::Tmp, name, CANCELLED)?
        {
            self.withdraw_submission(name);
            return Ok(Cancelled::Failed {
                from: Dir::Tmp,
                name: moved,
            });
        }
        // Two rounds: a retry that falls due between the look in new/ and the one in retry/
        // has moved to new/, where the second round finds it.
        for _ in 0..2 {
            for from in [Dir::New, Dir::Retry, Dir::Hold] {
                // A dot-file in new/ is one a producer is still writing, not a job.
                if from == Dir::New && name.as_bytes().first() == Some(&b'.') {
                    continue;
                }
                match rustix::fs::statat(self.fd(from), name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() => {}
                    Ok(_) | Err(Errno::NOENT) => continue,
                    Err(e) => return Err(e.into()),
                }
                match self.fail_waiting(from, name, CANCELLED)? {
                    Some(moved) => return Ok(Cancelled::Failed { from, name: moved }),
                    // Claimed or promoted meanwhile: looked for again.
                    None => continue,
                }
            }
        }
        match rustix::fs::statat(self.fd(Dir::Active), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() => {
                Ok(Cancelled::Pending)
            }
            Ok(_) => Ok(Cancelled::NoSuchJob),
            Err(Errno::NOENT) => Ok(Cancelled::NoSuchJob),
            Err(e) => Err(e.into()),
        }
    }

    /// Fails the waiting or held job `name` in `from` for good, with `reason` (`cancelled`,
    /// `expired`), its attempt count and earlier failures kept from `state/NAME`. Returns the
    /// name it has in `failed/`, or None when it is no longer in `from` (claimed, promoted or
    /// moved by someone else meanwhile).
    pub(super) fn fail_waiting(
        &self,
        from: Dir,
        name: &OsStr,
        reason: &str,
    ) -> io::Result<Option<OsString>> {
        // `state/NAME` is the record of the job of that name in retry/ if there is one, else
        // of the one in hold/, else of the one in new/: another job that took the same name
        // (a producer's) must neither take it nor remove it.
        let owns = match from {
            Dir::Retry => true,
            Dir::Hold => !self.is_in(Dir::Retry, name),
            _ => !self.is_in(Dir::Retry, name) && !self.is_in(Dir::Hold, name),
        };
        let earlier = if owns {
            self.read_record(Dir::State, name)?.map(History::from)
        } else {
            None
        };
        let now = std::time::SystemTime::now();
        let history = History {
            id: display_name(name),
            attempts: earlier.as_ref().map_or(0, |h| h.attempts),
            first_attempt_at: earlier.as_ref().and_then(|h| h.first_attempt_at.clone()),
            failed_at: Some(rfc3339(now)),
            permanent: true,
            last_failure: Some(Failure {
                reason: reason.to_owned(),
                ended_at: rfc3339(now),
                ..Failure::default()
            }),
            failures: earlier
                .as_ref()
                .map(|h| h.failures.clone())
                .unwrap_or_default(),
            recoveries: earlier.as_ref().map_or(0, |h| h.recoveries),
            expires_unix_ms: earlier.and_then(|h| h.expires_unix_ms),
            ..History::default()
        };
        match self.fail_from_owning(from, name, history, owns) {
            Ok(moved) => Ok(Some(moved)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `control/<name>` atomically (a temporary file, fsync, rename over the old one),
    /// readable by the daemon's group whatever the writer's umask.
    pub(super) fn write_control(&self, name: &OsStr, text: &[u8]) -> Result<(), OperatorError> {
        let dir = self.fd(Dir::Control);
        let tmp = format!(".tmp-{}", ulid::Ulid::generate());
        let fd = rustix::fs::openat(
            dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o640),
        )
        .map_err(|e| self.denied_or_io(Dir::Control, e, false))?;
        let _ = rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o640));
        let mut file = File::from(fd);
        let written = file
            .write_all(text)
            .and_then(|()| file.sync_all())
            .and_then(|()| rustix::fs::renameat(dir, tmp.as_str(), dir, name).map_err(Into::into));
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
            return Err(OperatorError::Io(io::Error::new(
                e.kind(),
                format!(
                    "{}/{}: {e}",
                    self.dir_path(Dir::Control).display(),
                    display_name(name)
                ),
            )));
        }
        Ok(())
    }
}

/// The prefix of an operator's record in `control/`: `op-<ULID>`. ULIDs sort by the time they
/// were made, so the daemon takes records in the order they were written (a hold, then a
/// release of the same job, ends released).
const OP_PREFIX: &str = "op-";
/// The most job IDs one record holds, and about the most the daemon acts on in one look at
/// `control/`: `hold --all` on a large backlog becomes many records, and the daemon's loop,
/// which also hands out jobs and answers a stop, comes round between them.
pub(super) const OP_CHUNK: usize = 256;

/// `control/op-<ULID>`: an operator's hold, release, retry or purge. `done` are the jobs the
/// client moved itself (root, or the user spoold), which the daemon only logs; `asked` are
/// those it was not allowed to move (a member of the group), which the daemon moves and logs.
/// The field names are the file format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct OpRecord {
    /// The effective uid of the client that wrote the record.
    pub(super) uid: u32,
    pub(super) action: Operation,
    #[serde(default)]
    pub(super) done: Vec<String>,
    #[serde(default)]
    pub(super) asked: Vec<String>,
    /// The operator's reason, for a pause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) reason: Option<String>,
    /// When the client wrote it, RFC 3339: the journal's own time is when the daemon read it,
    /// which is later when no daemon ran.
    #[serde(default)]
    pub(super) at: Option<String>,
}

/// Why an operator's record was not taken.
enum OpRecordError {
    /// It is no longer there.
    Gone,
    /// It cannot be read or is no record: why, naming the file.
    Bad(String),
}

/// How old a record may be before its line says when it was written: a running daemon reads it
/// within a second, so an older one was written while no daemon ran.
const LATE: std::time::Duration = std::time::Duration::from_secs(5);

impl OpRecord {
    /// " (done at TIME)" for a record older than [`LATE`], else nothing: the journal's time of
    /// the line tells when it was done.
    fn late(&self) -> String {
        let Some(at) = &self.at else {
            return String::new();
        };
        let old = humantime::parse_rfc3339(at)
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > LATE);
        if old {
            format!(" (done at {at})")
        } else {
            String::new()
        }
    }
}

/// What the daemon did with one job of an operator's record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Carried out: where the job is now, for the journal ("moved from new/ to hold/").
    Done(String),
    /// Not carried out, and why ("no waiting job of that name").
    NotDone(String),
}

impl Spool {
    /// Writes the records of an operator's `op` for the daemon (see [`OpRecord`]), at most
    /// [`OP_CHUNK`] IDs in each. Members of the group may write in `control/`, so a member's
    /// request reaches the daemon as root's log line does.
    pub(super) fn write_operation(
        &self,
        op: Operation,
        reason: Option<&str>,
        done: &[JobId],
        asked: &[JobId],
    ) -> Result<(), OperatorError> {
        let uid = rustix::process::geteuid().as_raw();
        // In the escaped form `spoold failed` shows, which the daemon parses back to the very
        // name: a name with a backslash, control characters or bytes that are not UTF-8 would
        // otherwise reach it as another job's name, or as none.
        let names = |ids: &[JobId]| -> Vec<String> {
            ids.iter().map(|id| display_name(id.as_os_str())).collect()
        };
        // One generator for the whole process: records written within one millisecond (the
        // chunks of one command, or two operations of one process) still sort in the order
        // they were written. Separate commands are further apart than that.
        static ULIDS: std::sync::LazyLock<std::sync::Mutex<ulid::Generator>> =
            std::sync::LazyLock::new(|| std::sync::Mutex::new(ulid::Generator::new()));
        let mut ulids = ULIDS.lock().unwrap_or_else(|p| p.into_inner());
        let chunks = done
            .chunks(OP_CHUNK)
            .map(|c| (names(c), Vec::new()))
            .chain(asked.chunks(OP_CHUNK).map(|c| (Vec::new(), names(c))));
        // A pause or a resume names no job: one record all the same.
        let lone = matches!(op, Operation::Pause | Operation::Resume).then(Default::default);
        for (done, asked) in chunks.chain(lone) {
            let record = OpRecord {
                uid,
                action: op,
                done,
                asked,
                reason: reason.map(str::to_owned),
                at: Some(rfc3339(std::time::SystemTime::now())),
            };
            let mut name = OsString::from(OP_PREFIX);
            name.push(crate::source::admin::new_job_id(&mut ulids));
            self.write_control(
                &name,
                &serde_json::to_vec(&record).map_err(io::Error::from)?,
            )?;
        }
        Ok(())
    }

    /// The names of the operators' records in `control/`, oldest first. Only the names: a
    /// turn reads just the records it acts on (see `act_on_operations`), so that a member's
    /// `hold --all` of a million jobs, thousands of records, is not read whole at every turn.
    pub(super) fn operation_files(&self) -> io::Result<Vec<OsString>> {
        let mut files = Vec::new();
        for entry in fs::read_dir(self.dir_path(Dir::Control))? {
            let entry = entry?;
            let file = entry.file_name();
            if file.as_bytes().starts_with(OP_PREFIX.as_bytes()) && entry.file_type()?.is_file() {
                files.push(file);
            }
        }
        files.sort();
        Ok(files)
    }

    /// An operator's record, or why it cannot be read (naming the file).
    fn operation_record(&self, file: &OsStr) -> Result<OpRecord, OpRecordError> {
        let text = match self.read_control(file) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(OpRecordError::Gone),
            Err(e) => {
                return Err(OpRecordError::Bad(
                    self.op_record_error(file, e.to_string()),
                ));
            }
        };
        serde_json::from_slice::<OpRecord>(&text).map_err(|e| {
            OpRecordError::Bad(self.op_record_error(file, format!("not an operator's record: {e}")))
        })
    }

    fn op_record_error(&self, file: &OsStr, why: String) -> String {
        format!(
            "{}/{}: {why}",
            self.dir_path(Dir::Control).display(),
            display_name(file)
        )
    }

    /// Removes an operator's record once the daemon has acted on it.
    pub(super) fn remove_operation(&self, file: &OsStr) {
        let _ = rustix::fs::unlinkat(self.fd(Dir::Control), file, AtFlags::empty());
    }

    /// Sets aside a file of `control/` that is no request, as `.bad-<name>`, and says why, once,
    /// naming the file.
    pub(super) fn set_aside_control(&self, file: &OsStr, why: &str) {
        tracing::error!(
            "{}/{}: {why}; set aside as .bad-{}",
            self.dir_path(Dir::Control).display(),
            display_name(file),
            display_name(file)
        );
        self.set_aside_operation(file);
    }

    /// Sets aside a record that cannot be read, as `.bad-<name>`: kept for the operator to look
    /// at, and not read again every second.
    pub(super) fn set_aside_operation(&self, file: &OsStr) {
        let mut bad = OsString::from(".bad-");
        bad.push(file);
        let dir = self.fd(Dir::Control);
        if rustix::fs::renameat(dir, file, dir, &bad).is_err() {
            self.remove_operation(file);
        }
    }

    /// Carries out `op` on job `id` for an operator who was not allowed to do it (a member of
    /// the group): the daemon owns every directory, so it may move any job.
    pub(super) fn carry_out(&self, op: Operation, id: &JobId) -> io::Result<Outcome> {
        let moved = |m: Moved| match m {
            Moved::To { name, place, until } if name == id.as_os_str() => {
                Outcome::Done(format!("now in {place}{}", waits_until(until)))
            }
            Moved::To { name, place, until } => Outcome::Done(format!(
                "now in {place} as {}{} ({place} already held a job of that name)",
                display_name(&name),
                waits_until(until)
            )),
            Moved::NoSuchJob => Outcome::NotDone(match op {
                Operation::Hold => "no waiting job of that name".to_owned(),
                _ => "no held job of that name".to_owned(),
            }),
        };
        let as_io = |e: OperatorError| match e {
            OperatorError::Denied { err, .. } | OperatorError::Io(err) => err,
        };
        Ok(match op {
            Operation::Hold => moved(self.hold(id).map_err(as_io)?),
            Operation::Release => moved(self.release(id).map_err(as_io)?),
            Operation::Retry => match self.retry_failed(id)? {
                crate::source::admin::Retried::Queued { name, place } if name == id.as_os_str() => {
                    Outcome::Done(format!("now in {place}"))
                }
                crate::source::admin::Retried::Queued { name, place } => Outcome::Done(format!(
                    "now in {place} as {} ({place} already held a job of that name)",
                    display_name(&name)
                )),
                crate::source::admin::Retried::NoSuchJob => {
                    Outcome::NotDone("no failed job of that name".to_owned())
                }
                crate::source::admin::Retried::NotAJob { kind, place } => Outcome::NotDone(
                    format!("it is {kind} in {place}, not a job file; left there"),
                ),
            },
            // A pause or a resume is a record a member may write: never asked of the daemon.
            Operation::Pause | Operation::Resume => {
                Outcome::NotDone(format!("a {} names no job", op.name()))
            }
            Operation::Purge => match self.purge_job(id)? {
                Some(place) => Outcome::Done(format!("removed from {place}")),
                None => Outcome::NotDone("no finished job of that name".to_owned()),
            },
        })
    }
}

/// What one turn of [`Spool::act_on_operations`] did.
#[derive(Debug, Default)]
pub(super) struct OpsTurn {
    /// Records are left for the next turn.
    pub(super) more: bool,
    /// A job entered or left `new/`.
    pub(super) queue_changed: bool,
    /// Released jobs that wait in `retry/` for their time, with when they are due (ms since
    /// the Unix epoch): discovery's schedule must learn of them, or they would wait for the
    /// next read of the whole directory.
    pub(super) scheduled: Vec<(OsString, u64)>,
}

impl Spool {
    /// Logs each operator's record in `control/` with the operator's uid and each job's ID,
    /// carries out what a member asked of the daemon, and removes the record; about
    /// [`OP_CHUNK`] jobs' worth in one turn.
    ///
    /// Logged here, by the daemon, rather than by the client: the daemon's lines are the
    /// unit's (`journalctl -u spoold OPERATOR_UID=...` finds them), while a client's own
    /// journal lines carry its session, not the unit, and a member could not have them
    /// attributed to the unit at all.
    ///
    /// `backlog` holds the records listed and not yet taken: `control/` is listed again only
    /// once it is empty, so that thousands of records are listed once, not once per turn.
    pub(super) fn act_on_operations(&self, backlog: &mut VecDeque<OsString>) -> OpsTurn {
        if backlog.is_empty() {
            match self.operation_files() {
                Ok(records) => backlog.extend(records),
                Err(e) => {
                    tracing::error!(
                        "cannot read the operators' records in {}: {e}",
                        self.dir_path(Dir::Control).display()
                    );
                    return OpsTurn::default();
                }
            }
        }
        let mut work = 0;
        let mut turn = OpsTurn::default();
        while let Some(file) = backlog.pop_front() {
            if work >= OP_CHUNK {
                backlog.push_front(file);
                turn.more = true;
                return turn;
            }
            let record = match self.operation_record(&file) {
                Ok(record) => record,
                // Gone since the listing (a record is removed only once acted on).
                Err(OpRecordError::Gone) => continue,
                Err(OpRecordError::Bad(e)) => {
                    tracing::error!("{e}; set aside as .bad-{}", display_name(&file));
                    self.set_aside_operation(&file);
                    continue;
                }
            };
            work += 1 + record.done.len() + record.asked.len();
            let (uid, action, late) = (record.uid, record.action, record.late());
            if matches!(action, Operation::Pause | Operation::Resume) {
                let reason = record
                    .reason
                    .as_deref()
                    .map(|r| format!(": {}", crate::job::escape_text(r)))
                    .unwrap_or_default();
                tracing::warn!(
                    operator_uid = uid,
                    operator_action = action.name(),
                    "{} by uid {uid}{reason}{late}",
                    action.done_verb()
                );
            }
            for (id, asked) in record
                .done
                .iter()
                .map(|id| (id, false))
                .chain(record.asked.iter().map(|id| (id, true)))
            {
                let Ok(job) = JobId::parse(id) else {
                    tracing::error!(
                        operator_uid = uid,
                        "{}/{}: {:?} is not a job ID; ignored",
                        self.dir_path(Dir::Control).display(),
                        display_name(&file),
                        id
                    );
                    continue;
                };
                // The job's name as every other line gives it: a record may name it in
                // another escaped form (`\x72eport` for `report`), which `JOB_ID=report`
                // would not find.
                let id = display_name(job.as_os_str());
                let id = id.as_str();
                let verb = action.done_verb();
                if !asked {
                    tracing::warn!(
                        job_id = id,
                        operator_uid = uid,
                        operator_action = action.name(),
                        "{verb} by uid {uid}{late}"
                    );
                    self.schedule_released(action, &job, &mut turn);
                    continue;
                }
                let outcome = self.carry_out(action, &job);
                self.schedule_released(action, &job, &mut turn);
                match outcome {
                    Ok(Outcome::Done(place)) => {
                        turn.queue_changed = true;
                        tracing::warn!(
                            job_id = id,
                            operator_uid = uid,
                            operator_action = action.name(),
                            "{verb} by uid {uid}: {place}"
                        )
                    }
                    Ok(Outcome::NotDone(why)) => tracing::warn!(
                        job_id = id,
                        operator_uid = uid,
                        operator_action = action.name(),
                        "{} by uid {uid}: {why}; request dropped",
                        action.name()
                    ),
                    Err(e) => tracing::error!(
                        job_id = id,
                        operator_uid = uid,
                        operator_action = action.name(),
                        "{} by uid {uid} failed: {e}; request dropped",
                        action.name()
                    ),
                }
            }
            self.remove_operation(&file);
        }
        turn
    }
}

impl Spool {
    /// A released job whose record gives a time still to come joins the schedule: it went
    /// back to `retry/` to wait for it. Whether it is there yet does not matter (an entry is a
    /// hint, and the promotion looks again), so a record read before the client's move still
    /// schedules the job.
    fn schedule_released(&self, action: Operation, job: &JobId, turn: &mut OpsTurn) {
        if action != Operation::Release {
            return;
        }
        let name = job.as_os_str();
        let due = self.retry_due(name);
        if due > super::unix_ms(std::time::SystemTime::now()) {
            turn.scheduled.push((name.to_owned(), due));
        }
    }
}

/// The reason a cancelled job's record gives.
pub(crate) const CANCELLED: &str = "cancelled";
/// The reason a job's record gives when it was not done within its time (`--ttl`, `max_age`).
pub(crate) const EXPIRED: &str = "expired";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_survives_reopen_and_resume_keeps_the_author() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.paused().unwrap(), None);
        let (p, already) = spool.pause(Some("disk full")).unwrap();
        assert!(!already);
        assert_eq!(p.reason.as_deref(), Some("disk full"));
        let (again, already) = Spool::open(dir.path()).unwrap().pause(None).unwrap();
        assert!(already);
        assert_eq!(again, p);
        assert!(spool.resume().unwrap());
        assert!(!spool.resume().unwrap());
        let record = spool.pause_record().unwrap().unwrap();
        assert!(!record.paused);
        assert_eq!(record.uid, rustix::process::geteuid().as_raw());
    }

    /// What a member's client writes (asked) is carried out by the daemon, in the order written,
    /// and the record goes; a record that is not JSON is set aside, not read every second.
    #[test]
    fn asked_operations_are_carried_out_in_order_and_bad_records_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let id = JobId::parse("01JOB").unwrap();
        fs::write(dir.path().join("new/01JOB"), "x").unwrap();
        spool
            .write_operation(Operation::Hold, None, &[], std::slice::from_ref(&id))
            .unwrap();
        spool
            .write_operation(Operation::Release, None, &[], std::slice::from_ref(&id))
            .unwrap();
        fs::write(dir.path().join("control/op-garbage"), "not json").unwrap();
        let turn = spool.act_on_operations(&mut VecDeque::new());
        assert!(turn.queue_changed && !turn.more);
        // Held, then released: taken the other way round, the release would find nothing held.
        assert!(dir.path().join("new/01JOB").exists());
        assert_eq!(fs::read_dir(dir.path().join("hold")).unwrap().count(), 0);
        let left: Vec<_> = fs::read_dir(dir.path().join("control"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [".bad-op-garbage"]);
    }

    /// A record read long after it was written (no daemon ran) says when it was done.
    #[test]
    fn a_late_record_says_when_it_was_done() {
        let record = |at: std::time::SystemTime| OpRecord {
            uid: 0,
            action: Operation::Hold,
            done: vec!["job".to_owned()],
            asked: Vec::new(),
            reason: None,
            at: Some(rfc3339(at)),
        };
        let now = std::time::SystemTime::now();
        assert_eq!(record(now).late(), "");
        let hour_ago = now - std::time::Duration::from_secs(3600);
        assert_eq!(
            record(hour_ago).late(),
            format!(" (done at {})", rfc3339(hour_ago))
        );
    }

    /// `hold --all` on a large backlog is many records, and one turn takes about OP_CHUNK jobs.
    #[test]
    fn a_large_operation_is_split_across_turns() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let ids: Vec<JobId> = (0..OP_CHUNK + 10)
            .map(|i| JobId::parse(&format!("job-{i}")).unwrap())
            .collect();
        spool
            .write_operation(Operation::Retry, None, &ids, &[])
            .unwrap();
        let mut backlog = VecDeque::new();
        assert!(spool.act_on_operations(&mut backlog).more);
        assert!(!spool.act_on_operations(&mut backlog).more);
        assert_eq!(fs::read_dir(dir.path().join("control")).unwrap().count(), 0);
    }
}
