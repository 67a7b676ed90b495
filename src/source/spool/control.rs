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
//! is rewritten, not removed, by `spoold resume` (with `paused: false`), so that the daemon can
//! log who resumed as well as who paused: the uid it logs is the one the client wrote, since a
//! daemon cannot otherwise learn who changed a file.
//!
//! Why `control/` and not a file in the root: in the package the root is `2750 spoold:spoold`,
//! and members of the group must be able to pause. `control/` is `2770` (setgid, group write,
//! no sticky bit), so any member can write the record and any member can replace another's
//! (one operator resumes what another paused), and nothing else in the spool opens up to them.
//!
//! Held jobs move by rename from `new/` or `retry/` into `hold/`, and back into `new/`; their
//! `state/NAME` stays where it is, so a released job keeps its attempt count. In the package
//! `hold/` is `2750` like `retry/`: only root (and the user spoold) may hold and release, since
//! members may not move jobs that are not theirs (a member could otherwise hold another
//! member's job). The command says so when a member tries.

use std::collections::HashMap;
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
use crate::source::admin::{Moved, OperatorError, Paused};

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

    /// Puts a held job back in `new/`, with its attempt count kept.
    pub fn release(&self, id: &JobId) -> Result<Moved, OperatorError> {
        Ok(self
            .move_operator(Dir::Hold, Dir::New, id.as_os_str())?
            .unwrap_or(Moved::NoSuchJob))
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
            }))
    }

    /// The regular files in `dir` whose names are job IDs, sorted.
    pub(super) fn ids_in(&self, dir: Dir) -> io::Result<Vec<JobId>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(self.dir_path(dir))? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
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
    /// The uid of the operator who cancelled the attempt, once one did.
    by: OnceLock<u32>,
}

impl CancelFd {
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Who cancelled the attempt, if anyone did.
    pub(crate) fn cancelled_by(&self) -> Option<u32> {
        self.by.get().copied()
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
        // table an unset `by` means a counter still at zero. Anyone else still holding the
        // entry makes `try_unwrap` fail, and the descriptor is closed instead.
        if entry.by.get().is_none()
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

    /// The pending cancel requests: (job name, uid of the operator who asked), oldest first.
    /// A request whose record cannot be read is still acted on, with the uid of its file's owner.
    pub(super) fn cancel_requests(&self) -> io::Result<Vec<(OsString, u32)>> {
        use std::os::unix::fs::MetadataExt;
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
            let uid = fs::read(entry.path())
                .ok()
                .and_then(|t| serde_json::from_slice::<CancelRecord>(&t).ok())
                .map(|r| r.uid)
                .or_else(|| entry.metadata().ok().map(|m| m.uid()))
                .unwrap_or(u32::MAX);
            requests.push((OsStr::from_bytes(name).to_owned(), uid));
        }
        Ok(requests)
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
            if entry.by.set(uid).is_ok() {
                rustix::io::write(&entry.fd, &1u64.to_ne_bytes())?;
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
            Ok(_) => Ok(Cancelled::Pending),
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
        let earlier = self.read_record(Dir::State, name)?.map(History::from);
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
            expires_unix_ms: earlier.and_then(|h| h.expires_unix_ms),
            ..History::default()
        };
        match self.fail_from(from, name, history) {
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
}
