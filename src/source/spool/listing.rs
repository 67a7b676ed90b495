//! Read-only listings of the spool for `spoold top`: the jobs running now, with their attempt
//! and start, and the oldest queued job. They only read directories and records, so a member
//! of the spool's group can ask, and nothing a daemon does is disturbed.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::AtFlags;
use rustix::io::Errno;

use super::{Dir, Spool};
use crate::job::History;
use crate::source::admin::{Queued, RunningJob};

impl Spool {
    /// The jobs in `active/`, oldest start first. A claim is a rename into `active/`, which
    /// sets the file's ctime, so the ctime is when the attempt began. The attempt is the
    /// recorded failures plus one; None when the record cannot be read.
    pub fn running_jobs(&self) -> io::Result<Vec<RunningJob>> {
        let mut jobs = Vec::new();
        for entry in fs::read_dir(self.dir_path(Dir::Active))? {
            let name = entry?.file_name();
            if name.as_bytes().first() == Some(&b'.') {
                continue;
            }
            let st =
                match rustix::fs::statat(self.fd(Dir::Active), &name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => st,
                    // Settled since the listing.
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(e.into()),
                };
            let attempt = match self.read_record(Dir::State, &name) {
                Ok(record) => Some(record.map(History::from).map_or(0, |h| h.attempts) + 1),
                Err(_) => None,
            };
            jobs.push(RunningJob {
                name,
                attempt,
                since: at(st.st_ctime, st.st_ctime_nsec),
            });
        }
        jobs.sort_by(|a, b| (a.since, &a.name).cmp(&(b.since, &b.name)));
        Ok(jobs)
    }

    /// The queued job submitted first (by its file's modification time), if any.
    pub fn oldest_queued(&self) -> io::Result<Option<Queued>> {
        let mut oldest: Option<(i128, OsString)> = None;
        let mut scan = self.scan_new()?;
        while let Some(c) = scan.next_candidate(true)? {
            if oldest.as_ref().is_none_or(|(t, _)| c.mtime_ns < *t) {
                oldest = Some((c.mtime_ns, c.name));
            }
        }
        Ok(oldest.map(|(ns, name)| Queued {
            name,
            since: UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64),
        }))
    }
}

fn at(secs: i64, nsecs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs.max(0) as u64, nsecs as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_jobs_and_the_oldest_queued_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert!(spool.running_jobs().unwrap().is_empty());
        assert!(spool.oldest_queued().unwrap().is_none());
        for name in ["a", "b"] {
            spool.enqueue(&mut &b"x"[..], name).unwrap();
        }
        let old = std::fs::File::options()
            .write(true)
            .open(dir.path().join("new/b"))
            .unwrap();
        old.set_modified(UNIX_EPOCH + Duration::from_secs(1_000_000))
            .unwrap();
        let oldest = spool.oldest_queued().unwrap().unwrap();
        assert_eq!(oldest.name, "b");
        let super::super::Claim::Job(claimed) = spool.claim("a".as_ref()).unwrap() else {
            panic!("not claimed");
        };
        let running = spool.running_jobs().unwrap();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].name, claimed.name);
        assert_eq!(running[0].attempt, Some(1));
        let age = SystemTime::now().duration_since(running[0].since).unwrap();
        assert!(age < Duration::from_secs(60), "{age:?}");
    }
}
