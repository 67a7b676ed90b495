//! Submissions that are more than one rename into `new/`: delayed jobs and jobs with a time to
//! live (`spoold enqueue --in`, `--at`, `--ttl`), and the limit on waiting jobs
//! (`spool.max_queued`).
//!
//! `spoold enqueue` writes every job in `tmp/` first (staging), then publishes them together.
//! A plain job is published by its rename into `new/`. A delayed job, or one with a time to
//! live, needs a record in `state/` and (when delayed) a place in `retry/`, which members of the
//! group may not write in the package: so the client publishes it by writing a request,
//! `control/submit-ID` (the due time, the expiry and the uid), and the daemon files it (writes
//! `state/ID`, renames `tmp/ID` into `retry/` or `new/`) within a second, or when it starts; it
//! does so on its blocking pool, since each filing flushes a record to disk.
//! Until then the job waits in `tmp/`, whose sweep of abandoned files spares a file with a
//! request. The client also sets a delayed job's modification time to its due time: the daemon
//! promotes it by its record, but `spoold status` can then tell a scheduled job in `retry/`
//! from a retry with one stat rather than a read of its record, and the job, once due, sorts
//! among the queued ones by the time it became due.
//!
//! The limit: publishers take an exclusive flock on `tmp/` itself (every member may open it,
//! and no file needs creating), count the waiting jobs (`new/`, `retry/`, `hold/` and the
//! requests not yet filed, stopping at the limit) and publish or refuse while they hold it, so
//! that concurrent `spoold enqueue`s never pass the limit together. Writing the jobs happens
//! before, outside the lock: a slow standard input holds no other publisher. Producers that
//! rename into `new/` themselves take no lock and are not limited.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, FlockOperation};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use super::{Dir, Spool, dup_name, record, rename_noreplace, unix_ms};
use crate::job::{History, display_name};
use crate::source::admin::{OperatorError, Partial, PublishError, ShownJob, Submission};

/// The prefix of a submission request's name in `control/`: `submit-<ID>`.
const SUBMIT_PREFIX: &str = "submit-";

/// `control/submit-<ID>`. The field names are the file format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SubmitRecord {
    /// The effective uid of the client that submitted the job.
    pub(super) uid: u32,
    /// No attempt before this time (ms since the epoch).
    pub(super) not_before_unix_ms: Option<u64>,
    /// The job fails with the reason `expired` if not done by this time (ms since the epoch).
    pub(super) expires_unix_ms: Option<u64>,
}

/// What the daemon did with a submission request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Filed {
    /// In `retry/` under `name`, due at `due` (ms since the epoch).
    Scheduled { name: OsString, due: u64 },
    /// In `new/` under `name`.
    Queued { name: OsString },
    /// No job of that name in `tmp/`: the request was dropped.
    NoJob,
}

fn request_name(id: &OsStr) -> OsString {
    let mut name = OsString::from(SUBMIT_PREFIX);
    name.push(id);
    name
}

/// How long a submission under `spool.max_queued` waits for another to release `tmp/`'s lock.
const TMP_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Spool {
    /// Writes the bytes of `src` into `tmp/ID`, flushed to disk, with its modification time set
    /// to the due time of a delayed job. `partial` then removes it, and every job staged before.
    pub(super) fn stage_job(
        &self,
        src: &mut dyn Read,
        id: &str,
        partial: &Partial,
        submission: &Submission,
    ) -> io::Result<()> {
        let (mut file, tmp_path) = self.create_in_tmp(id, partial)?;
        let written = io::copy(src, &mut file)
            .and_then(|_| match submission.not_before {
                Some(due) => file.set_modified(due),
                None => Ok(()),
            })
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            // The undo stays in `partial`: removing a file already gone does no harm.
            let _ = fs::remove_file(&tmp_path);
            return Err(e);
        }
        Ok(())
    }

    /// Publishes the staged jobs `ids`, all or none when a limit is set (see the module's
    /// documentation). On an error part-way, the jobs published before it stay published, and
    /// the error says how many.
    pub(super) fn publish_jobs(
        &self,
        ids: &[String],
        partial: &Partial,
        submission: &Submission,
    ) -> Result<(), PublishError> {
        let io_err = |err: io::Error, published: usize| PublishError::Io { err, published };
        // Taken before `partial`: a signal that arrives while this waits for another publisher
        // must still be able to undo the staged jobs.
        let _limit = match submission.max_queued.map(|_| self.lock_tmp()) {
            Some(Ok(lock)) => Some(lock),
            // Nothing is published, so nothing staged may stay behind in tmp/.
            Some(Err(e)) => {
                if let Some(undo) = partial.hold().take() {
                    undo();
                }
                return Err(io_err(e, 0));
            }
            None => None,
        };
        let mut current = partial.hold();
        if let Some(limit) = submission.max_queued {
            let adding = ids.len() as u64;
            let waiting = match self.count_waiting(limit) {
                Ok(n) => n,
                Err(e) => {
                    if let Some(undo) = current.take() {
                        undo();
                    }
                    return Err(io_err(e, 0));
                }
            };
            crate::fault::publish_pause();
            if waiting.saturating_add(adding) > limit {
                if let Some(undo) = current.take() {
                    undo();
                }
                return Err(PublishError::Full {
                    waiting,
                    adding,
                    limit,
                });
            }
        }
        let request =
            (submission.not_before.is_some() || submission.expires.is_some()).then(|| {
                SubmitRecord {
                    uid: rustix::process::geteuid().as_raw(),
                    not_before_unix_ms: submission.not_before.map(unix_ms),
                    expires_unix_ms: submission.expires.map(unix_ms),
                }
            });
        for (published, id) in ids.iter().enumerate() {
            let done = match &request {
                None => rename_noreplace(
                    self.fd(Dir::Tmp),
                    id.as_str(),
                    self.fd(Dir::New),
                    id.as_str(),
                )
                .map_err(|e| match e {
                    Errno::ACCESS | Errno::PERM => self.publish_denied(Dir::New, e),
                    e => io_err(
                        io::Error::new(
                            io::Error::from(e).kind(),
                            format!("job {id}: cannot move it into new/: {}", io::Error::from(e)),
                        ),
                        published,
                    ),
                }),
                Some(record) => {
                    let text =
                        serde_json::to_vec(record).map_err(|e| io_err(e.into(), published))?;
                    self.write_control(&request_name(OsStr::new(id)), &text)
                        .map_err(|e| match e {
                            OperatorError::Denied { err, group, .. } => {
                                PublishError::Denied { err, group }
                            }
                            OperatorError::Io(e) => io_err(e, published),
                        })
                }
            };
            if let Err(e) = done {
                // The jobs not yet published are removed; those published before stay.
                for rest in &ids[published..] {
                    let _ =
                        rustix::fs::unlinkat(self.fd(Dir::Tmp), rest.as_str(), AtFlags::empty());
                }
                *current = None;
                return Err(match e {
                    PublishError::Denied { .. } if published > 0 => {
                        io_err(io::Error::other("permission denied part-way"), published)
                    }
                    e => e,
                });
            }
        }
        *current = None;
        Ok(())
    }

    fn publish_denied(&self, dir: Dir, e: Errno) -> PublishError {
        use std::os::unix::fs::MetadataExt;
        let path = self.dir_path(dir);
        PublishError::Denied {
            err: io::Error::new(
                io::Error::from(e).kind(),
                format!("{}: {}", path.display(), io::Error::from(e)),
            ),
            group: fs::metadata(&path).map_or(u32::MAX, |m| m.gid()),
        }
    }

    /// The exclusive flock on `tmp/` that publishers under a limit hold while they count and
    /// publish (a count and a few renames: milliseconds); released when the descriptor is
    /// dropped.
    fn lock_tmp(&self) -> io::Result<std::os::fd::OwnedFd> {
        // A descriptor of its own: the flock belongs to the open file description.
        let fd = rustix::fs::openat(
            self.fd(Dir::Tmp),
            ".",
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        // Tried without blocking until a deadline: a publisher stopped with Ctrl-Z while it
        // holds the lock would otherwise hold every other submission under the limit for good.
        // Nobody is woken when the lock is let go, so the tries are close together (a holder
        // keeps it for milliseconds) and jittered, so that waiters do not try in step.
        let deadline = std::time::Instant::now() + TMP_LOCK_WAIT;
        loop {
            match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(fd),
                Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_micros(fastrand::u64(
                        1_000..5_000,
                    )));
                }
                Err(e) => {
                    let why = if e == rustix::io::Errno::WOULDBLOCK {
                        format!(
                            "another submission has held it for {} (a stopped `spoold \
                             enqueue`?)",
                            humantime::format_duration(TMP_LOCK_WAIT)
                        )
                    } else {
                        io::Error::from(e).to_string()
                    };
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("cannot lock {}: {why}", self.dir_path(Dir::Tmp).display()),
                    ));
                }
            }
        }
    }

    /// The jobs waiting to run: queued in `new/`, in `retry/` (retries and delayed jobs), in
    /// `hold/`, and submitted but not yet filed by the daemon. Counting stops at `limit`: only
    /// whether it is reached matters, and `new/` may hold a million names.
    pub(super) fn count_waiting(&self, limit: u64) -> io::Result<u64> {
        let mut n = 0;
        for dir in [Dir::New, Dir::Retry, Dir::Hold, Dir::Control] {
            for entry in fs::read_dir(self.dir_path(dir))? {
                let name = entry?.file_name();
                let counts = match dir {
                    Dir::New => name.as_bytes().first() != Some(&b'.'),
                    Dir::Control => name.as_bytes().starts_with(SUBMIT_PREFIX.as_bytes()),
                    _ => true,
                };
                if counts {
                    n += 1;
                    if n >= limit {
                        return Ok(n);
                    }
                }
            }
        }
        Ok(n)
    }

    /// The submission requests in `control/`: (job name, request). A request that cannot be
    /// read for a reason that may pass is skipped, to be looked at again.
    pub(super) fn submit_requests(&self) -> io::Result<Vec<(OsString, SubmitRecord)>> {
        self.submit_requests_of(false)
    }

    /// [`submit_requests`](Self::submit_requests) for the daemon's filing, which also sets
    /// aside, with an error line, what is no request at all. Only the daemon does: a client
    /// (`status`, `show`) logs nowhere, and must not move what it only reads.
    pub(super) fn submit_requests_to_file(&self) -> io::Result<Vec<(OsString, SubmitRecord)>> {
        self.submit_requests_of(true)
    }

    fn submit_requests_of(&self, set_aside: bool) -> io::Result<Vec<(OsString, SubmitRecord)>> {
        let mut requests = Vec::new();
        for entry in fs::read_dir(self.dir_path(Dir::Control))? {
            let entry = entry?;
            let file = entry.file_name();
            let Some(name) = file.as_bytes().strip_prefix(SUBMIT_PREFIX.as_bytes()) else {
                continue;
            };
            if name.is_empty() || !entry.file_type()?.is_file() {
                continue;
            }
            let parsed = self.read_control(&file).and_then(|t| {
                serde_json::from_slice::<SubmitRecord>(&t)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
            });
            let record = match parsed {
                Ok(record) => record,
                // Withdrawn since the listing.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                // Never a request: set aside, said once, and no longer counted as a job that
                // waits (`count_waiting`), nor read again at every look.
                Err(_) if !set_aside => continue,
                Err(e)
                    if e.kind() == io::ErrorKind::InvalidData
                        || e.raw_os_error() == Some(Errno::LOOP.raw_os_error()) =>
                {
                    self.set_aside_control(&file, &format!("not a submission request ({e})"));
                    continue;
                }
                // One that may pass (no descriptor left): tried again at the next look.
                Err(e) => {
                    tracing::error!(
                        "{}/{}: cannot read the submission request: {e}",
                        self.dir_path(Dir::Control).display(),
                        display_name(&file)
                    );
                    continue;
                }
            };
            requests.push((OsStr::from_bytes(name).to_owned(), record));
        }
        Ok(requests)
    }

    /// Whether `tmp/NAME` waits for the daemon to file it: the sweep of `tmp/` spares it.
    pub(super) fn is_submitted(&self, name: &OsStr) -> bool {
        rustix::fs::statat(
            self.fd(Dir::Control),
            request_name(name),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_ok()
    }

    /// Files the job a request is about (the daemon does this): its record into `state/`, then
    /// the job from `tmp/` into `retry/` (delayed) or `new/`; then removes the request.
    pub(super) fn file_submission(
        &self,
        name: &OsStr,
        request: &SubmitRecord,
        now: SystemTime,
    ) -> io::Result<Filed> {
        match rustix::fs::statat(self.fd(Dir::Tmp), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() => {}
            Ok(_) | Err(Errno::NOENT) => {
                self.remove_control(&request_name(name));
                return Ok(Filed::NoJob);
            }
            Err(e) => return Err(e.into()),
        }
        let due = request.not_before_unix_ms.filter(|&due| due > unix_ms(now));
        let to = if due.is_some() { Dir::Retry } else { Dir::New };
        // Only this daemon adds to state/ and retry/: a name free in both now is free at the
        // rename below. A job submitted under a name that is taken gets a .dup- name, as
        // anywhere else in the spool.
        let taken = |n: &OsStr| {
            [to, Dir::State]
                .iter()
                .any(|d| rustix::fs::statat(self.fd(*d), n, AtFlags::SYMLINK_NOFOLLOW).is_ok())
        };
        let mut filed = name.to_owned();
        while taken(&filed) {
            filed = dup_name(name);
        }
        let mut history = History {
            id: display_name(&filed),
            expires_unix_ms: request.expires_unix_ms,
            ..History::default()
        };
        if let Some(due) = due {
            record::set_next_attempt(&mut history, UNIX_EPOCH + Duration::from_millis(due));
        }
        let with_record = due.is_some() || request.expires_unix_ms.is_some();
        if with_record {
            self.write_record(Dir::State, &filed, &history.into())?;
        }
        if let Err(e) = rename_noreplace(self.fd(Dir::Tmp), name, self.fd(to), &filed) {
            if with_record {
                self.remove_record(Dir::State, &filed);
            }
            return Err(io::Error::new(
                io::Error::from(e).kind(),
                format!(
                    "cannot move it from tmp/ to {}: {}",
                    to.place(),
                    io::Error::from(e)
                ),
            ));
        }
        self.remove_control(&request_name(name));
        Ok(match due {
            Some(due) => Filed::Scheduled { name: filed, due },
            None => Filed::Queued { name: filed },
        })
    }

    /// A job submitted with a delay or a time to live that the daemon has not filed yet, as
    /// `spoold show` shows it: in `tmp/`, with its times from the request.
    pub(super) fn show_submitted(&self, name: &OsStr) -> io::Result<Option<ShownJob>> {
        let Some((_, request)) = self
            .submit_requests()?
            .into_iter()
            .find(|(n, _)| n.as_os_str() == name)
        else {
            return Ok(None);
        };
        let stat = match rustix::fs::statat(self.fd(Dir::Tmp), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut history = History {
            id: display_name(name),
            expires_unix_ms: request.expires_unix_ms,
            ..History::default()
        };
        let now = unix_ms(SystemTime::now());
        let due = request.not_before_unix_ms.filter(|&due| due > now);
        if let Some(due) = due {
            record::set_next_attempt(&mut history, UNIX_EPOCH + Duration::from_millis(due));
        }
        Ok(Some(ShownJob {
            name: name.to_owned(),
            place: Dir::Tmp.place(),
            since: super::rfc3339(
                UNIX_EPOCH
                    + Duration::new(
                        u64::try_from(stat.st_ctime).unwrap_or(0),
                        u32::try_from(stat.st_ctime_nsec).unwrap_or(0),
                    ),
            ),
            history: Some(history),
            record_error: None,
            scheduled: due.is_some(),
        }))
    }

    /// Drops the submission request of `name`: its job was cancelled before it was filed.
    pub(super) fn withdraw_submission(&self, name: &OsStr) {
        self.remove_control(&request_name(name));
    }

    fn remove_control(&self, name: &OsStr) {
        let _ = rustix::fs::unlinkat(self.fd(Dir::Control), name, AtFlags::empty());
    }

    /// The submissions not yet filed: (scheduled, i.e. due later than `now`; queued).
    pub(super) fn pending_submissions(&self, now: SystemTime) -> io::Result<(u64, u64)> {
        let now = unix_ms(now);
        let (mut scheduled, mut queued) = (0, 0);
        for (_, r) in self.submit_requests()? {
            if r.not_before_unix_ms.is_some_and(|due| due > now) {
                scheduled += 1;
            } else {
                queued += 1;
            }
        }
        Ok((scheduled, queued))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submission(delay: Option<u64>, ttl: Option<u64>) -> Submission {
        let now = SystemTime::now();
        Submission {
            not_before: delay.map(|s| now + Duration::from_secs(s)),
            expires: ttl.map(|s| now + Duration::from_secs(s)),
            max_queued: None,
        }
    }

    /// A delayed job waits in tmp/ with its request until the daemon files it into retry/,
    /// with a record that says when it is due and that it never ran.
    #[test]
    fn a_delayed_job_is_filed_into_retry_with_its_due_time() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let partial = Partial::default();
        let sub = submission(Some(3600), Some(7200));
        spool
            .stage_job(&mut &b"x"[..], "J1", &partial, &sub)
            .unwrap();
        spool.publish_jobs(&["J1".into()], &partial, &sub).unwrap();
        assert!(spool.is_submitted(OsStr::new("J1")));
        assert_eq!(
            spool.pending_submissions(SystemTime::now()).unwrap(),
            (1, 0)
        );
        let requests = spool.submit_requests().unwrap();
        assert_eq!(requests.len(), 1);
        let filed = spool
            .file_submission(&requests[0].0, &requests[0].1, SystemTime::now())
            .unwrap();
        let Filed::Scheduled { name, due } = filed else {
            panic!("{filed:?}")
        };
        assert_eq!(name, "J1");
        assert!(due > unix_ms(SystemTime::now()) + 3_000_000);
        assert!(!spool.is_submitted(OsStr::new("J1")));
        let record = spool
            .read_record(Dir::State, OsStr::new("J1"))
            .unwrap()
            .unwrap();
        let h = History::from(record);
        assert_eq!(h.attempts, 0);
        assert_eq!(h.next_attempt_unix_ms, Some(due));
        assert!(h.expires_unix_ms.unwrap() > due);
        let c = spool.counts(false).unwrap();
        assert_eq!((c.scheduled, c.retry), (1, 0));
    }

    /// The sweep of abandoned files in tmp/ spares a submitted job waiting to be filed,
    /// however old it looks, and still removes a file nobody submitted.
    #[test]
    fn the_tmp_sweep_spares_a_job_waiting_to_be_filed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let partial = Partial::default();
        let sub = submission(None, Some(60));
        spool
            .stage_job(&mut &b"x"[..], "KEEP", &partial, &sub)
            .unwrap();
        spool
            .publish_jobs(&["KEEP".into()], &partial, &sub)
            .unwrap();
        fs::write(spool.dir_path(Dir::Tmp).join("LEFT"), "y").unwrap();
        let future = SystemTime::now() + Duration::from_secs(3600);
        let removed = spool.sweep_tmp(future, &|| false, &mut |_, _| {}).unwrap();
        assert_eq!(removed, 1);
        assert!(spool.dir_path(Dir::Tmp).join("KEEP").exists());
        assert!(!spool.dir_path(Dir::Tmp).join("LEFT").exists());
    }

    /// Under a limit, a publication that would pass it publishes nothing and leaves nothing
    /// in tmp/.
    #[test]
    fn a_full_queue_takes_nothing_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let partial = Partial::default();
        let sub = Submission {
            max_queued: Some(3),
            ..Submission::default()
        };
        for id in ["A", "B"] {
            spool.stage_job(&mut &b"x"[..], id, &partial, &sub).unwrap();
        }
        spool
            .publish_jobs(&["A".into(), "B".into()], &partial, &sub)
            .unwrap();
        for id in ["C", "D"] {
            spool.stage_job(&mut &b"x"[..], id, &partial, &sub).unwrap();
        }
        let err = spool
            .publish_jobs(&["C".into(), "D".into()], &partial, &sub)
            .unwrap_err();
        assert!(
            matches!(
                err,
                PublishError::Full {
                    waiting: 2,
                    adding: 2,
                    limit: 3
                }
            ),
            "{err:?}"
        );
        assert_eq!(fs::read_dir(spool.dir_path(Dir::Tmp)).unwrap().count(), 0);
        assert_eq!(fs::read_dir(spool.dir_path(Dir::New)).unwrap().count(), 2);
    }
}
