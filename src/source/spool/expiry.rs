//! The end of a job's useful life: expiry of waiting jobs (`spoold enqueue --ttl`,
//! `retry.max_age`) and the purge of finished ones (`spoold purge`, `done.max_age`).
//!
//! A waiting job (in `new/`, `retry/` or `hold/`) expires when it is not done by its deadline:
//! the `expires_unix_ms` of its record (`--ttl`), or its file's modification time plus
//! `retry.max_age`. A file keeps its modification time across every rename, so that time is its
//! submission (for a delayed job, its due time: `spoold enqueue` sets it so). It then goes to
//! `failed/` with the reason `expired`, as a cancel would. A running job is left to finish: its
//! handler may be half-way through something that must not be cut, and the attempt has its own
//! limit (`handler.timeout`); if it fails, its retry expires at the next look.
//!
//! The daemon looks from its discovery task, on the blocking pool (a look reads `state/` and,
//! with `max_age`, stats every waiting job).
//!
//! A finished job's age is the time since it came into `done/` or `failed/`: its ctime, which
//! the rename set (`spoold show` gives the same "since").

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::AtFlags;
use rustix::io::Errno;

use super::control::EXPIRED;
use super::{Dir, Spool, rfc3339, unix_ms};
use crate::source::admin::{Finished, OperatorError, Place, Purged};

/// A job that expired.
#[derive(Debug)]
pub(crate) struct Expired {
    pub(crate) name: OsString,
    pub(crate) from: Dir,
    /// Its name in `failed/`.
    pub(crate) moved: OsString,
    /// Why: "its time to live" or "retry.max_age".
    pub(crate) why: &'static str,
}

/// The waiting places, where jobs expire.
const WAITING: [Dir; 3] = [Dir::New, Dir::Retry, Dir::Hold];

fn time_of(secs: i64, nsecs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs.max(0) as u64, nsecs.min(999_999_999) as u32)
}

impl Spool {
    /// Fails every waiting job whose deadline is at or before `now` with the reason `expired`,
    /// and returns them. Stops early when `cancelled` says so. A job that cannot be moved is
    /// reported to `report` and tried again at the next look.
    ///
    /// `ttl` says whether any job may have a time to live: only then is `state/` read (a record
    /// per job that failed once, so a downstream outage makes it large). It comes back saying
    /// whether one still waits; the caller sets it again when a job with one is filed.
    pub(crate) fn expire_waiting(
        &self,
        now: SystemTime,
        max_age: Option<Duration>,
        ttl: &mut bool,
        cancelled: &dyn Fn() -> bool,
        report: &mut dyn FnMut(&OsString, io::Error),
    ) -> io::Result<Vec<Expired>> {
        let mut expired = Vec::new();
        let now_ms = unix_ms(now);
        let mut ttl_left = false;
        // Time to live: only jobs with a record can have one, so state/ is the list to read.
        let records = if *ttl {
            Some(fs::read_dir(self.dir_path(Dir::State))?)
        } else {
            None
        };
        for entry in records.into_iter().flatten() {
            if cancelled() {
                return Ok(expired);
            }
            let name = entry?.file_name();
            if name.as_bytes().first() == Some(&b'.') {
                continue;
            }
            let due = match self.read_record(Dir::State, &name) {
                Ok(Some(r)) => r.expires_unix_ms,
                Ok(None) | Err(_) => None,
            };
            match due {
                None => continue,
                Some(due) if due > now_ms => {
                    ttl_left = true;
                    continue;
                }
                Some(_) => {}
            }
            let before = expired.len();
            // The record is that of the job in retry/ when there is one (see `fail_waiting`).
            let owners = [Dir::Retry, Dir::Hold, Dir::New];
            self.expire_one(&name, &owners, "its time to live", &mut expired, report);
            // Not moved (an error, or it was running): still to expire at a later look.
            ttl_left |= expired.len() == before;
        }
        *ttl = ttl_left;
        let Some(max_age) = max_age else {
            return Ok(expired);
        };
        let Some(born_before) = now.checked_sub(max_age) else {
            return Ok(expired);
        };
        for dir in WAITING {
            for entry in fs::read_dir(self.dir_path(dir))? {
                if cancelled() {
                    return Ok(expired);
                }
                let name = entry?.file_name();
                if name.as_bytes().first() == Some(&b'.') {
                    continue;
                }
                let st = match rustix::fs::statat(self.fd(dir), &name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => st,
                    Err(Errno::NOENT) => continue,
                    Err(e) => {
                        report(&name, e.into());
                        continue;
                    }
                };
                if time_of(st.st_mtime, st.st_mtime_nsec as u64) > born_before {
                    continue;
                }
                // This very job, where it was found, or in new/ if it was promoted meanwhile;
                // not another of the same name elsewhere.
                let here: &[Dir] = if dir == Dir::Retry {
                    &[Dir::Retry, Dir::New]
                } else {
                    &[dir]
                };
                self.expire_one(&name, here, "retry.max_age", &mut expired, report);
            }
        }
        Ok(expired)
    }

    /// Fails the waiting job `name`, looked for in `dirs` in that order, with the reason
    /// `expired`.
    fn expire_one(
        &self,
        name: &OsString,
        dirs: &[Dir],
        why: &'static str,
        expired: &mut Vec<Expired>,
        report: &mut dyn FnMut(&OsString, io::Error),
    ) {
        // Two rounds, as for a cancel: a retry promoted between two looks is found in new/.
        for _ in 0..2 {
            for &from in dirs {
                match rustix::fs::statat(self.fd(from), name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() => {}
                    Ok(_) | Err(Errno::NOENT) => continue,
                    Err(e) => return report(name, e.into()),
                }
                match self.fail_waiting(from, name, EXPIRED) {
                    Ok(Some(moved)) => {
                        return expired.push(Expired {
                            name: name.clone(),
                            from,
                            moved,
                            why,
                        });
                    }
                    Ok(None) => continue,
                    Err(e) => return report(name, e),
                }
            }
        }
    }

    /// Removes (or, with `dry_run`, lists) the jobs of `state` that came there before
    /// `before`, and a failed job's reason record. Only entries of that one directory are
    /// touched, never followed.
    pub fn purge_finished(
        &self,
        state: Finished,
        before: SystemTime,
        dry_run: bool,
    ) -> Result<Vec<Purged>, OperatorError> {
        let dir = match state {
            Finished::Done => Dir::Done,
            Finished::Failed => Dir::Failed,
        };
        let mut old = Vec::new();
        let listing = fs::read_dir(self.dir_path(dir)).map_err(|e| self.io_in(dir, e))?;
        for entry in listing {
            let name = entry.map_err(|e| self.io_in(dir, e))?.file_name();
            let st = match rustix::fs::statat(self.fd(dir), &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(self.denied_or_io(dir, e, true)),
            };
            let since = time_of(st.st_ctime, st.st_ctime_nsec as u64);
            if since < before {
                let is_dir = rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::Directory;
                old.push((name, since, is_dir));
            }
        }
        old.sort();
        let mut purged = Vec::with_capacity(old.len());
        for (name, since, is_dir) in old {
            if !dry_run {
                // A directory is in failed/ when it was refused unopened: only an empty one
                // is removed; anything else is left for a person to look at.
                let flags = if is_dir {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                match rustix::fs::unlinkat(self.fd(dir), &name, flags) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    // Not empty: left, and the purge goes on with the others.
                    Err(Errno::NOTEMPTY) if is_dir => continue,
                    Err(e) => return Err(self.denied_or_io(dir, e, true)),
                }
                if dir == Dir::Failed {
                    match rustix::fs::unlinkat(self.fd(Dir::Reasons), &name, AtFlags::empty()) {
                        Ok(()) | Err(Errno::NOENT) => {}
                        Err(e) => return Err(self.denied_or_io(Dir::Reasons, e, true)),
                    }
                }
            }
            purged.push(Purged {
                name,
                finished: rfc3339(since),
            });
        }
        Ok(purged)
    }

    /// Removes one finished job, asked for by a member's purge: from `failed/` with its reason
    /// record, or from `done/`. Returns the place it was removed from, or None when neither
    /// holds it any more (retried, or already purged). Only a regular file is removed.
    pub(super) fn purge_job(&self, id: &crate::job::JobId) -> io::Result<Option<Place>> {
        for dir in [Dir::Failed, Dir::Done] {
            match rustix::fs::statat(self.fd(dir), id.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st)
                    if rustix::fs::FileType::from_raw_mode(st.st_mode)
                        == rustix::fs::FileType::RegularFile => {}
                Ok(_) | Err(Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            }
            match rustix::fs::unlinkat(self.fd(dir), id.as_os_str(), AtFlags::empty()) {
                Ok(()) => {}
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            }
            if dir == Dir::Failed {
                match rustix::fs::unlinkat(self.fd(Dir::Reasons), id.as_os_str(), AtFlags::empty())
                {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(Some(dir.place()));
        }
        Ok(None)
    }

    fn io_in(&self, dir: Dir, e: io::Error) -> OperatorError {
        OperatorError::Io(io::Error::new(
            e.kind(),
            format!("{}: {e}", self.dir_path(dir).display()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::History;
    use crate::source::admin::{Partial, Submission};

    /// A job whose time to live has passed expires wherever it waits (here: held), keeping its
    /// record's attempts; one whose time has not come stays.
    #[test]
    fn a_held_job_past_its_ttl_expires_and_one_within_it_stays() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let now = SystemTime::now();
        for (id, ttl) in [("OLD", 1), ("YOUNG", 3600)] {
            let sub = Submission {
                expires: Some(now + Duration::from_secs(ttl)),
                ..Submission::default()
            };
            let partial = Partial::default();
            spool.stage_job(&mut &b"x"[..], id, &partial, &sub).unwrap();
            spool.publish_jobs(&[id.into()], &partial, &sub).unwrap();
        }
        for (name, request) in spool.submit_requests().unwrap() {
            spool.file_submission(&name, &request, now).unwrap();
        }
        for id in ["OLD", "YOUNG"] {
            fs::rename(
                spool.dir_path(Dir::New).join(id),
                spool.dir_path(Dir::Hold).join(id),
            )
            .unwrap();
        }
        let later = now + Duration::from_secs(2);
        let expired = spool
            .expire_waiting(later, None, &mut true, &|| false, &mut |n, e| {
                panic!("{n:?}: {e}")
            })
            .unwrap();
        assert_eq!(expired.len(), 1, "{expired:?}");
        assert_eq!(expired[0].name, "OLD");
        assert_eq!(expired[0].from, Dir::Hold);
        let failed = spool.failed_jobs().unwrap();
        let h: &History = failed[0].history.as_ref().unwrap();
        assert_eq!(h.last_failure.as_ref().unwrap().reason, EXPIRED);
        assert!(spool.dir_path(Dir::Hold).join("YOUNG").exists());
        // YOUNG still has a time to live: the next look must read state/ again.
        let mut ttl = true;
        spool
            .expire_waiting(later, None, &mut ttl, &|| false, &mut |_, _| {})
            .unwrap();
        assert!(ttl);
    }

    /// A dry run lists and removes nothing; a purge removes the job and its reason.
    #[test]
    fn purge_lists_in_a_dry_run_and_removes_with_records_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        fs::write(spool.dir_path(Dir::Failed).join("F"), "x").unwrap();
        fs::write(spool.dir_path(Dir::Reasons).join("F"), "{}").unwrap();
        let future = SystemTime::now() + Duration::from_secs(10);
        let listed = spool
            .purge_finished(Finished::Failed, future, true)
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert!(spool.dir_path(Dir::Failed).join("F").exists());
        let none = spool
            .purge_finished(
                Finished::Failed,
                SystemTime::now() - Duration::from_secs(60),
                false,
            )
            .unwrap();
        assert!(none.is_empty());
        spool
            .purge_finished(Finished::Failed, future, false)
            .unwrap();
        assert!(!spool.dir_path(Dir::Failed).join("F").exists());
        assert!(!spool.dir_path(Dir::Reasons).join("F").exists());
    }
}
