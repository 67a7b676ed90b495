//! The operator's hand on the spool: the pause record (`control/pause`) and the hold queue
//! (`hold/`), as the client commands change them and as the daemon reads them.
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

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use super::{Dir, Spool, rename_noreplace, rfc3339};
use crate::job::{JobId, display_name};
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

    /// Writes the record atomically (a temporary file, fsync, rename over the old one): a
    /// daemon reads either the old record or the new one, never half of one.
    fn write_pause(&self, record: &PauseRecord) -> Result<(), OperatorError> {
        let dir = self.fd(Dir::Control);
        let tmp = format!(".tmp-{}", ulid::Ulid::generate());
        let fd = rustix::fs::openat(
            dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o640),
        )
        .map_err(|e| self.denied_or_io(Dir::Control, e, false))?;
        // The daemon's user reads it through the group: a umask of 077 must not take that away.
        let _ = rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o640));
        let mut file = File::from(fd);
        let written = serde_json::to_vec_pretty(record)
            .map_err(io::Error::from)
            .and_then(|text| file.write_all(&text))
            .and_then(|()| file.sync_all())
            .and_then(|()| {
                rustix::fs::renameat(dir, tmp.as_str(), dir, PAUSE).map_err(io::Error::from)
            });
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
            return Err(OperatorError::Io(self.control_error(e)));
        }
        Ok(())
    }

    /// A permission error becomes `Denied` with the group of `dir`, which grants the right in
    /// the package (or none, when `root_only`).
    fn denied_or_io(&self, dir: Dir, e: Errno, root_only: bool) -> OperatorError {
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
