//! The spool directory: its layout and every filesystem operation on a job, as plain synchronous code.
//!
//! Layout under the root (`spool.dir`):
//!
//! | entry         | holds                                                                  |
//! |---------------|------------------------------------------------------------------------|
//! | `tmp/`        | files being written by producers (the Maildir rule)                    |
//! | `new/`        | jobs waiting to run; names starting with `.` are ignored               |
//! | `active/`     | jobs a worker has claimed                                              |
//! | `retry/`      | jobs waiting for their backoff to pass before going back to `new/`     |
//! | `done/`       | jobs whose handler exited 0 (unless `done.keep = false`)               |
//! | `failed/`     | jobs that ran out of attempts or exited with a permanent code          |
//! | `state/NAME`  | JSON record of a live job that has failed at least once or was recovered after a crash: attempts, next attempt time, recoveries |
//! | `reasons/NAME`| JSON record of why `failed/NAME` failed                                |
//! | `hold/`       | jobs an operator set aside (`spoold hold`); they never start until released |
//! | `control/pause` | JSON record of the operator's pause or resume (`spoold pause`/`resume`) |
//! | `control/cancel-ID` | an operator's request to cancel job ID (`spoold cancel`), until the daemon acts on it |
//! | `control/submit-ID` | a delayed job's or a job with a time to live (`spoold enqueue --in/--at/--ttl`), waiting in `tmp/` until the daemon files it |
//! | `spoold.lock` | flock held by the one daemon that owns the spool                       |
//!
//! Every move is a `renameat2(RENAME_NOREPLACE)` inside one filesystem, so a job file is always
//! in exactly one directory and nothing is ever overwritten. When the destination already holds a
//! job of the same name (the same name submitted twice), the arriving job keeps its name with a
//! `.dup-<ULID>` suffix instead: renamed, never lost.
//!
//! No other module knows these names. Nothing here is async: the operations are single system
//! calls on a local directory, and keeping them synchronous makes them testable without a runtime.

mod control;
pub mod discovery;
mod expiry;
mod lease;
mod listing;
mod record;
pub mod schedule;
mod submit;

pub(crate) use control::CANCELLED;
pub use lease::{SpoolLease, SpoolSource};

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::job::{Failure, History, JobId, display_name, escape_bytes};
use crate::source::admin::{
    Admin, Counts, FailedJob, Finished, Moved, Operation, OperatorError, Partial, Paused, Place,
    PublishError, Purged, Retried, Submission, SubmitError,
};
use crate::source::admin::{Queued, RunningJob, ShownJob};
use crate::source::spool::schedule::RetrySchedule;
use record::JobRecord;
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

/// The longest file name Linux filesystems accept, in bytes.
const NAME_MAX: usize = 255;
/// How long `lock` waits for a lock that is held, before it says another daemon owns the spool.
const LOCK_WAIT: Duration = Duration::from_secs(1);
/// How long `lock` waits between two tries.
const LOCK_RETRY: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Tmp,
    New,
    Active,
    Retry,
    Done,
    Failed,
    State,
    Reasons,
    Hold,
    Control,
}

impl Dir {
    pub const ALL: [Dir; 10] = [
        Dir::Tmp,
        Dir::New,
        Dir::Active,
        Dir::Retry,
        Dir::Done,
        Dir::Failed,
        Dir::State,
        Dir::Reasons,
        Dir::Hold,
        Dir::Control,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dir::Tmp => "tmp",
            Dir::New => "new",
            Dir::Active => "active",
            Dir::Retry => "retry",
            Dir::Done => "done",
            Dir::Failed => "failed",
            Dir::State => "state",
            Dir::Reasons => "reasons",
            Dir::Hold => "hold",
            Dir::Control => "control",
        }
    }

    /// The directory as log lines and the client commands name it to people: `new/`.
    pub fn place(self) -> Place {
        Place::named(match self {
            Dir::Tmp => "tmp/",
            Dir::New => "new/",
            Dir::Active => "active/",
            Dir::Retry => "retry/",
            Dir::Done => "done/",
            Dir::Failed => "failed/",
            Dir::State => "state/",
            Dir::Reasons => "reasons/",
            Dir::Hold => "hold/",
            Dir::Control => "control/",
        })
    }
}

/// Why a spool could not be opened or locked. Each names the path at fault.
#[derive(Debug)]
pub enum SpoolError {
    Root {
        path: PathBuf,
        problem: String,
    },
    Subdir {
        path: PathBuf,
        err: io::Error,
    },
    CrossDevice {
        root: PathBuf,
        subdir: PathBuf,
    },
    /// A client found the root but not the layout: no daemon has opened this spool yet.
    NotSetUp {
        root: PathBuf,
        missing: PathBuf,
    },
    /// A client may not use the spool; `group` is the root's group, which grants access.
    Denied {
        path: PathBuf,
        group: u32,
    },
    Locked {
        path: PathBuf,
        owner: Option<u32>,
    },
    Lock {
        path: PathBuf,
        err: io::Error,
    },
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpoolError::Root { path, problem } => {
                write!(f, "spool directory {}: {problem}", path.display())
            }
            SpoolError::Subdir { path, err } => write!(f, "{}: {err}", path.display()),
            SpoolError::CrossDevice { root, subdir } => write!(
                f,
                "{} is on a different filesystem (or mount) than the spool root {}: jobs move \
                 by rename, so every spool directory must be on one filesystem",
                subdir.display(),
                root.display()
            ),
            SpoolError::NotSetUp { root, missing } => write!(
                f,
                "spool {} has not been set up yet ({} is missing: no spoold has opened it); \
                 start spoold once (systemctl start spoold), or check spool.dir",
                root.display(),
                missing.display()
            ),
            SpoolError::Denied { path, .. } => write!(f, "permission denied on {}", path.display()),
            SpoolError::Locked { path, owner } => {
                write!(
                    f,
                    "spool {} is already owned by another spoold",
                    path.display()
                )?;
                if let Some(pid) = owner {
                    write!(f, " (pid {pid})")?;
                }
                write!(f, "; only one daemon may run on a spool")
            }
            SpoolError::Lock { path, err } => {
                write!(f, "cannot lock {}: {err}", path.display())
            }
        }
    }
}

impl std::error::Error for SpoolError {}

/// A job a worker has claimed: its file is in `active/`.
#[derive(Debug)]
pub struct Claimed {
    pub name: OsString,
    /// Absolute path of the job file in `active/`.
    pub path: PathBuf,
    /// The attempt about to run, 1-based.
    pub attempt: u32,
    /// The job's earlier failed attempts, if any.
    pub history: Option<History>,
    /// When it was submitted, as its file's modification time says: the start of its wait.
    pub submitted: SystemTime,
}

/// The outcome of trying to claim a name seen in `new/`.
#[derive(Debug)]
pub enum Claim {
    Job(Box<Claimed>),
    /// Not in `new/` any more (another claimant, or its producer, took it), or a job of the same
    /// name is still active: skip, it is not an error.
    Skipped,
    /// Not a regular file: it was moved to `failed/` with this reason, and never opened.
    Rejected {
        reason: String,
    },
}

/// One entry seen in `new/` by a scan.
#[derive(Debug)]
pub struct Candidate {
    pub name: OsString,
    /// Modification time in nanoseconds since the epoch, used to run the oldest first.
    pub mtime_ns: i128,
}

/// What `promote_if_due` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    Moved,
    /// Still waiting: its record says it is due at this time (ms since the epoch).
    NotDue(u64),
    /// Not in `retry/` any more.
    Gone,
}

/// What crash recovery ([`Spool::recover_active`]) did with the jobs a daemon that died left
/// in `active/`.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Back in `new/` under these names, to run again.
    pub requeued: Vec<OsString>,
    /// In `failed/` under these names: each reached `spool.max_recoveries`.
    pub failed: Vec<OsString>,
    /// Those of `requeued` that one more recovery would fail: each is to run alone (see
    /// `SpoolSource`), so that a crash it causes is charged to it and to no other job.
    pub alone: Vec<OsString>,
}

/// The reason a job gets in `failed/` when crash recovery found it running `count` times.
fn recovered_reason(count: u32) -> String {
    format!(
        "the daemon died {count} times while it ran (a handler that crashes spoold?); not run \
         again after spool.max_recoveries"
    )
}

/// The flock that makes one daemon the owner of a spool; released when dropped.
#[derive(Debug)]
pub struct SpoolLock {
    _file: File,
}

#[derive(Debug)]
pub struct Spool {
    root: PathBuf,
    dirs: Vec<OwnedFd>,
    /// Read-held by a claim and write-held by each promotion from retry/: a claim that looks for
    /// a job of its name in retry/ must not miss one that is being moved to new/ at that very
    /// moment. Claims need not exclude each other: `renameat2(RENAME_NOREPLACE)` lets one claim
    /// of a name win, and the others see it taken. Taken shared, the lock costs two workers'
    /// claims no futex wait or wake-up (they used to queue on a mutex about once per job).
    claim_or_promote: std::sync::RwLock<()>,
    /// The attempts under way and their cancel switches, for `spoold cancel`.
    running: control::Running,
}

impl Spool {
    /// Opens the spool at `root`, creating missing subdirectories. The root itself must exist,
    /// be a directory, and be readable and writable; every subdirectory must share its filesystem.
    pub fn open(root: &Path) -> Result<Spool, SpoolError> {
        let root_err = |problem: String| SpoolError::Root {
            path: root.to_owned(),
            problem,
        };
        let meta = fs::metadata(root).map_err(|e| {
            root_err(match e.kind() {
                io::ErrorKind::NotFound => "does not exist (create it, or fix spool.dir)".into(),
                _ => e.to_string(),
            })
        })?;
        if !meta.is_dir() {
            return Err(root_err("is not a directory".into()));
        }
        rustix::fs::access(
            root,
            rustix::fs::Access::READ_OK
                | rustix::fs::Access::WRITE_OK
                | rustix::fs::Access::EXEC_OK,
        )
        .map_err(|e| root_err(format!("must be readable and writable by this user: {e}")))?;
        let root = fs::canonicalize(root).map_err(|e| root_err(e.to_string()))?;
        let root_mount = mount_id(rustix::fs::CWD, &root, AtFlags::empty());
        let mut dirs = Vec::with_capacity(Dir::ALL.len());
        for dir in Dir::ALL {
            let path = root.join(dir.name());
            match fs::create_dir(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(SpoolError::Subdir { path, err }),
            }
            let fd = rustix::fs::open(
                &path,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::empty(),
            )
            .map_err(|e| SpoolError::Subdir {
                path: path.clone(),
                err: e.into(),
            })?;
            let stat = rustix::fs::fstat(&fd).map_err(|e| SpoolError::Subdir {
                path: path.clone(),
                err: e.into(),
            })?;
            // A bind mount has the device number of its filesystem, yet a rename across it fails
            // (EXDEV) all the same: compare the mounts too, where the kernel tells them.
            let other_mount = matches!(
                (root_mount, mount_id(&fd, "", AtFlags::EMPTY_PATH)),
                (Some(a), Some(b)) if a != b
            );
            if stat.st_dev != meta.dev() || other_mount {
                return Err(SpoolError::CrossDevice {
                    root: root.clone(),
                    subdir: path,
                });
            }
            dirs.push(fd);
        }
        Ok(Spool::with_dirs(root, dirs))
    }

    /// The spool at `root`, whose directories are open as `dirs` (in `Dir::ALL`'s order).
    fn with_dirs(root: PathBuf, dirs: Vec<OwnedFd>) -> Spool {
        Spool {
            root,
            dirs,
            claim_or_promote: std::sync::RwLock::new(()),
            running: control::Running::default(),
        }
    }

    /// Opens an existing spool for a client command (enqueue, status, failed, retry): nothing is
    /// created, and the root need not be writable (a member of group spoold may only submit).
    /// A missing root or layout, and a permission error, get errors of their own, so that the
    /// command can say what to do.
    pub fn attach(root: &Path) -> Result<Spool, SpoolError> {
        // The group that grants access: the denied directory's, else (when it cannot even be
        // looked at) the root's.
        let group = |path: &Path| fs::metadata(path).map_or(u32::MAX, |m| m.gid());
        let root = fs::canonicalize(root).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => SpoolError::Root {
                path: root.to_owned(),
                problem: "does not exist (check spool.dir in the config)".into(),
            },
            io::ErrorKind::PermissionDenied => SpoolError::Denied {
                path: root.to_owned(),
                group: root.parent().map_or(u32::MAX, group),
            },
            _ => SpoolError::Root {
                path: root.to_owned(),
                problem: e.to_string(),
            },
        })?;
        let mut dirs = Vec::with_capacity(Dir::ALL.len());
        for dir in Dir::ALL {
            let path = root.join(dir.name());
            let fd = rustix::fs::open(
                &path,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::empty(),
            )
            .map_err(|e| match e {
                Errno::NOENT => SpoolError::NotSetUp {
                    root: root.clone(),
                    missing: path.clone(),
                },
                Errno::ACCESS | Errno::PERM => SpoolError::Denied {
                    group: fs::metadata(&path).map_or_else(|_| group(&root), |m| m.gid()),
                    path: path.clone(),
                },
                _ => SpoolError::Subdir {
                    path: path.clone(),
                    err: io::Error::from(e),
                },
            })?;
            dirs.push(fd);
        }
        Ok(Spool::with_dirs(root, dirs))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir_path(&self, dir: Dir) -> PathBuf {
        self.root.join(dir.name())
    }

    fn fd(&self, dir: Dir) -> &OwnedFd {
        &self.dirs[Dir::ALL
            .iter()
            .position(|d| *d == dir)
            .expect("every Dir is opened")]
    }

    /// Takes the lock that makes this process the one daemon of the spool, waiting up to
    /// `LOCK_WAIT` for a holder to let go. This blocks the calling thread; the daemon uses
    /// [`Spool::lock_async`].
    pub fn lock(&self) -> Result<SpoolLock, SpoolError> {
        let (path, mut file) = self.lock_file()?;
        let give_up = std::time::Instant::now() + LOCK_WAIT;
        while !self.try_lock(&path, &mut file, std::time::Instant::now() >= give_up)? {
            std::thread::sleep(LOCK_RETRY);
        }
        self.own(&path, file)
    }

    /// [`Spool::lock`] for the daemon's runtime: the waits between tries are timers, so that
    /// nothing else on the main thread waits behind them.
    pub async fn lock_async(&self) -> Result<SpoolLock, SpoolError> {
        let (path, mut file) = self.lock_file()?;
        let give_up = std::time::Instant::now() + LOCK_WAIT;
        while !self.try_lock(&path, &mut file, std::time::Instant::now() >= give_up)? {
            tokio::time::sleep(LOCK_RETRY).await;
        }
        self.own(&path, file)
    }

    fn lock_file(&self) -> Result<(PathBuf, File), SpoolError> {
        let path = self.root.join("spoold.lock");
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(|err| SpoolError::Lock {
                path: path.clone(),
                err,
            })?;
        Ok((path, file))
    }

    /// One try at the flock: true when taken, false when held and `last` is false. A daemon
    /// killed while it was starting a handler leaves a copy of the locked file in the child
    /// until that child's exec closes it, a few milliseconds later: a restart at once would
    /// otherwise be refused in the name of a dead pid. So the callers try for a little while.
    fn try_lock(&self, path: &Path, file: &mut File, last: bool) -> Result<bool, SpoolError> {
        match rustix::fs::flock(&*file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(true),
            Err(Errno::WOULDBLOCK) if !last => Ok(false),
            Err(Errno::WOULDBLOCK) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                Err(SpoolError::Locked {
                    path: self.root.clone(),
                    owner: text.trim().parse().ok(),
                })
            }
            Err(e) => Err(SpoolError::Lock {
                path: path.to_owned(),
                err: e.into(),
            }),
        }
    }

    /// Writes this process's pid into the locked file, for the error message a second daemon
    /// prints; the lock itself is the flock.
    fn own(&self, path: &Path, mut file: File) -> Result<SpoolLock, SpoolError> {
        let lock_err = |err: io::Error| SpoolError::Lock {
            path: path.to_owned(),
            err,
        };
        file.set_len(0).map_err(lock_err)?;
        writeln!(file, "{}", std::process::id()).map_err(lock_err)?;
        Ok(SpoolLock { _file: file })
    }

    /// Moves every job left in `active/` by a daemon that died back to `new/`, for another
    /// attempt at once; the interrupted attempt does not count. Each such job's count of
    /// recoveries is raised in its `state/NAME` record first, and a job whose count reaches
    /// `max_recoveries` goes to `failed/` instead: a job that kills its daemon (the OOM killer,
    /// a kernel bug) would otherwise run, and kill it, at every start.
    pub fn recover_active(&self, max_recoveries: u32) -> io::Result<Recovery> {
        let mut recovery = Recovery::default();
        for entry in fs::read_dir(self.dir_path(Dir::Active))? {
            let name = entry?.file_name();
            self.recover(&name, max_recoveries, &mut recovery)?;
        }
        Ok(recovery)
    }

    /// Counts the recovery of job `name` in `active/`, then moves it to `new/`, or to `failed/`
    /// once its count reaches `max_recoveries`.
    fn recover(
        &self,
        name: &OsStr,
        max_recoveries: u32,
        recovery: &mut Recovery,
    ) -> io::Result<()> {
        // As at a claim: a job of the same name waiting in retry/ owns state/NAME, so this one
        // takes a .dup- name of its own, and a count of its own.
        let (name, own_record) = if self.is_in(Dir::Retry, name) {
            (self.rename_in_active(name)?, false)
        } else {
            (name.to_owned(), true)
        };
        let shown = display_name(&name);
        let earlier = if own_record {
            self.read_record(Dir::State, &name)
        } else {
            Ok(None)
        };
        // Every field of the record is kept: its failed attempts, their times, a time to live.
        let counted = earlier.and_then(|record| {
            let mut history = record.map_or_else(
                || History {
                    id: shown.clone(),
                    ..History::default()
                },
                History::from,
            );
            history.recoveries = history.recoveries.saturating_add(1);
            if history.recoveries < max_recoveries {
                self.write_record(Dir::State, &name, &history.clone().into())?;
            }
            Ok(history)
        });
        let mut last_chance = false;
        match counted {
            Ok(history) if history.recoveries >= max_recoveries => {
                return self.fail_recovered(&name, &shown, history, recovery);
            }
            Ok(history) => last_chance = history.recoveries.saturating_add(1) >= max_recoveries,
            // A record that cannot be read or written (a full disk, a corrupt file) must not
            // keep the job, or the daemon, from running: this one recovery goes uncounted.
            Err(e) => tracing::warn!(
                job_id = shown,
                "cannot count its recovery in {}: {e}; it runs again all the same",
                Dir::State.place()
            ),
        }
        match self.move_job(Dir::Active, Dir::New, &name) {
            Ok(Some(to)) => {
                if last_chance {
                    recovery.alone.push(to.clone());
                }
                recovery.requeued.push(to);
            }
            Ok(None) => {}
            Err(e) => return Err(annotate(e, &name, "cannot move back to new/")),
        }
        Ok(())
    }

    /// Fails job `name` in `active/` for good, its recoveries having reached the bound: the
    /// crash it was in is recorded as one more attempt, as a broker's dead letter records it.
    fn fail_recovered(
        &self,
        name: &OsStr,
        shown: &str,
        history: History,
        recovery: &mut Recovery,
    ) -> io::Result<()> {
        let reason = recovered_reason(history.recoveries);
        let report = crate::job::Report::without_run(reason.clone());
        let now = report.started;
        let attempt = history.attempts.saturating_add(1);
        let mut failed = record::after_failure(shown, attempt, Some(&history), report, now);
        failed.permanent = true;
        failed.failed_at = Some(rfc3339(now));
        match self.fail_from(Dir::Active, name, failed) {
            Ok(to) => {
                tracing::warn!(
                    job_id = shown,
                    outcome = "failed",
                    "job failed for good without running again: {reason}; moved to failed/"
                );
                recovery.failed.push(to);
                Ok(())
            }
            // Moved all the same, without its reason (a full disk): the error says so.
            Err(e) if !self.is_in(Dir::Active, name) => {
                tracing::error!(job_id = shown, outcome = "failed", "{reason}; {e}");
                recovery.failed.push(name.to_owned());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// True when `dir` holds an entry `name` (not following links).
    fn is_in(&self, dir: Dir, name: &OsStr) -> bool {
        rustix::fs::statat(self.fd(dir), name, AtFlags::SYMLINK_NOFOLLOW).is_ok()
    }

    /// Streams the names in `new/`, skipping dot-files. Memory stays constant whatever the size
    /// of the directory: the caller takes entries a batch at a time.
    pub fn scan_new(&self) -> io::Result<NewScan> {
        let path = self.dir_path(Dir::New);
        // The path goes into the error: "No such file or directory" alone does not say that the
        // spool was deleted under the daemon.
        let inner = fs::read_dir(&path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))
        })?;
        Ok(NewScan {
            inner,
            // CLOEXEC: a scan is open while handlers start, and they must not inherit new/.
            new_fd: rustix::io::fcntl_dupfd_cloexec(self.fd(Dir::New), 0)?,
        })
    }

    /// Removes what was left in `tmp/` by producers that never finished (a killed `cp`, a
    /// crashed client): every entry but a directory last modified before `before`. Stops early
    /// when `cancelled` says so, and reports each removal, or a failed one, to `report`.
    /// Returns how many it removed.
    pub fn sweep_tmp(
        &self,
        before: SystemTime,
        cancelled: &dyn Fn() -> bool,
        report: &mut dyn FnMut(&OsStr, io::Result<()>),
    ) -> io::Result<usize> {
        let tmp = self.fd(Dir::Tmp);
        let mut removed = 0;
        for entry in fs::read_dir(self.dir_path(Dir::Tmp))? {
            if cancelled() {
                break;
            }
            let name = entry?.file_name();
            let st = match rustix::fs::statat(tmp, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                // Renamed into new/ (or removed by its producer) since the listing.
                Err(Errno::NOENT) => continue,
                Err(e) => {
                    report(&name, Err(e.into()));
                    continue;
                }
            };
            // Untouched means neither its data (mtime) nor its inode (ctime) changed. A producer
            // may set an old mtime on purpose (`cp -p`, `rsync -t`, `tar -x`) just before its
            // rename into new/; nobody can set a ctime, and setting the mtime updates it.
            let at = |secs: i64, nsecs: u64| {
                UNIX_EPOCH + Duration::new(secs.max(0) as u64, nsecs as u32)
            };
            let touched = at(st.st_mtime, st.st_mtime_nsec as u64)
                .max(at(st.st_ctime, st.st_ctime_nsec as u64));
            // A delayed job waits here, whatever its age, until the daemon files it.
            if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
                || touched >= before
                || self.is_submitted(&name)
            {
                continue;
            }
            match rustix::fs::unlinkat(tmp, &name, AtFlags::empty()) {
                Ok(()) => {
                    removed += 1;
                    report(&name, Ok(()));
                }
                Err(Errno::NOENT) => {}
                Err(e) => report(&name, Err(e.into())),
            }
        }
        Ok(removed)
    }

    /// True when `new/NAME` is a regular file (not following links).
    pub fn is_regular_in_new(&self, name: &OsStr) -> bool {
        rustix::fs::statat(self.fd(Dir::New), name, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_file())
    }

    /// Claims `name` from `new/` by renaming it into `active/`.
    pub fn claim(&self, name: &OsStr) -> io::Result<Claim> {
        // The lock covers the moves and the look in retry/, and no more: a promotion, on the
        // daemon's main thread, waits for it, so nothing slow (a record's fsync when the job is
        // rejected below) may happen under it.
        let (name, own_record) = {
            let _claiming = self
                .claim_or_promote
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match rename_noreplace(self.fd(Dir::New), name, self.fd(Dir::Active), name) {
                Ok(()) => {}
                // Taken by someone else, or a job of the same name is still running: not ours.
                Err(e) if e == Errno::NOENT || e == Errno::EXIST => return Ok(Claim::Skipped),
                Err(e) => return Err(annotate(e.into(), name, "cannot claim")),
            }
            // A job of the same name waiting in retry/ owns state/NAME. This one is another job
            // submitted under that name (or another entry): it must neither take nor, when it
            // fails, delete the other's record, so it gets a .dup- name of its own, as a name
            // clash anywhere else would give it.
            if self.is_in(Dir::Retry, name) {
                (self.rename_in_active(name)?, false)
            } else {
                (name.to_owned(), true)
            }
        };
        let stat = rustix::fs::statat(self.fd(Dir::Active), &name, AtFlags::SYMLINK_NOFOLLOW)?;
        let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
        if kind != rustix::fs::FileType::RegularFile {
            let reason = format!(
                "not a regular file but {}: spoold never follows or opens such an entry",
                describe_file_type(kind)
            );
            return self.reject(&name, reason);
        }
        let history = if own_record {
            match self.read_record(Dir::State, &name) {
                Ok(record) => record.map(History::from),
                // A read that may pass (no descriptor left, an I/O error) leaves the job in
                // active/, with its record, for the next start, as a record that cannot be
                // written does.
                Err(e) if e.kind() != io::ErrorKind::InvalidData => {
                    return Err(annotate(
                        e,
                        &name,
                        "cannot read its record in state/; it stays in active/ and runs again \
                         after a restart",
                    ));
                }
                // A record that is not spoold's: its count and its time limits are unknown,
                // so it does not run; left in active/, nothing would ever settle it. It goes to
                // failed/ with the reason, and `spoold retry` runs it with a fresh count.
                Err(e) => {
                    let reason = format!(
                        "its record in state/ cannot be read ({e}); not run, since its attempt \
                         count and time limits are unknown: `spoold retry` runs it again with a \
                         fresh count"
                    );
                    return self.reject(&name, reason);
                }
            }
        } else {
            None
        };
        // A job whose time to live ran out while no daemon ran (or before the next look for
        // expired jobs) does not start: the names of new/ are handed out before that look.
        if let Some(history) = &history
            && history
                .expires_unix_ms
                .is_some_and(|due| due <= unix_ms(SystemTime::now()))
        {
            let now = SystemTime::now();
            let failed = History {
                failed_at: Some(rfc3339(now)),
                permanent: true,
                next_attempt_unix_ms: None,
                next_attempt_at: None,
                last_failure: Some(Failure {
                    reason: control::EXPIRED.to_owned(),
                    ended_at: rfc3339(now),
                    ..Failure::default()
                }),
                ..history.clone()
            };
            self.fail(&name, failed)?;
            return Ok(Claim::Rejected {
                reason: "expired: its time to live ran out before it could start".to_owned(),
            });
        }
        let attempt = history.as_ref().map_or(0, |h| h.attempts) + 1;
        Ok(Claim::Job(Box::new(Claimed {
            path: self.dir_path(Dir::Active).join(&name),
            name,
            attempt,
            history,
            submitted: UNIX_EPOCH
                + Duration::new(stat.st_mtime.max(0) as u64, stat.st_mtime_nsec as u32),
        })))
    }

    /// Fails the job just claimed as `name` for good, without running it, for `reason`.
    fn reject(&self, name: &OsStr, reason: String) -> io::Result<Claim> {
        let history = History {
            id: display_name(name),
            failed_at: Some(rfc3339(SystemTime::now())),
            permanent: true,
            last_failure: Some(Failure {
                reason: reason.clone(),
                ..Failure::default()
            }),
            ..History::default()
        };
        self.fail(name, history)?;
        Ok(Claim::Rejected { reason })
    }

    /// Gives a job in `active/` a `.dup-` name of its own; its state record, if any, stays put.
    fn rename_in_active(&self, name: &OsStr) -> io::Result<OsString> {
        loop {
            let alt = dup_name(name);
            match rename_noreplace(self.fd(Dir::Active), name, self.fd(Dir::Active), &alt) {
                Ok(()) => return Ok(alt),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(annotate(e.into(), name, "cannot rename in active/")),
            }
        }
    }

    /// The handler succeeded: keep the job in `done/` or delete it. Returns where it went.
    pub fn finish_done(&self, job: &Claimed, keep: bool) -> io::Result<Option<OsString>> {
        let result = if keep {
            self.move_job(Dir::Active, Dir::Done, &job.name)
                .map_err(|e| annotate(e, &job.name, "cannot move to done/"))?
        } else {
            rustix::fs::unlinkat(self.fd(Dir::Active), &job.name, AtFlags::empty())
                .map_err(|e| annotate(e.into(), &job.name, "cannot delete"))?;
            None
        };
        if job.history.is_some() {
            // A move that met a name clash took the record along to the new name: remove it
            // there, or it is left behind with no job. reasons/ holds the records of failed
            // jobs only, so a done job's failed attempts go with its record.
            self.remove_record(Dir::State, result.as_deref().unwrap_or(&job.name));
        }
        Ok(result)
    }

    /// The job has failed for good: move it to `failed/` and record its history beside it.
    /// Returns the name it has in `failed/`.
    pub fn fail(&self, name: &OsStr, history: History) -> io::Result<OsString> {
        self.fail_from(Dir::Active, name, history)
    }

    /// Moves job `name` from `from` (`active/`, or a waiting or held job an operator cancelled)
    /// to `failed/`, with `history` as its reason record. A job no longer in `from` is an error
    /// of kind NotFound, and leaves no record behind.
    fn fail_from(&self, from: Dir, name: &OsStr, history: History) -> io::Result<OsString> {
        self.fail_from_owning(from, name, history, true)
    }

    /// [`fail_from`](Self::fail_from); `owns_record` false when `state/NAME` belongs to another
    /// job of the same name (one in `retry/`), which keeps it.
    pub(super) fn fail_from_owning(
        &self,
        from: Dir,
        name: &OsStr,
        history: History,
        owns_record: bool,
    ) -> io::Result<OsString> {
        // The reason is written first, under the name the job will have in failed/, so that
        // whoever sees the job there finds its reason too. Only this daemon adds to failed/, so
        // a name free now is still free at the rename below.
        let mut final_name = name.to_owned();
        while rustix::fs::statat(self.fd(Dir::Failed), &final_name, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok()
        {
            final_name = dup_name(name);
        }
        // A reason that cannot be written (a full disk) must not keep the job out of failed/:
        // it is moved all the same, and the error is reported once it is safe there.
        let recorded = self.write_record(Dir::Reasons, &final_name, &history.into());
        if let Err(e) = rename_noreplace(self.fd(from), name, self.fd(Dir::Failed), &final_name) {
            self.remove_record(Dir::Reasons, &final_name);
            return Err(annotate(e.into(), name, "cannot move to failed/"));
        }
        if owns_record {
            self.remove_record(Dir::State, name);
        }
        recorded.map_err(|e| {
            annotate(
                e,
                &final_name,
                "moved to failed/, but the reason could not be recorded",
            )
        })?;
        Ok(final_name)
    }

    /// The attempt failed and another is due at `history.next_attempt_unix_ms`: record that,
    /// then move the job to `retry/`. If the record cannot be written the job stays in
    /// `active/`, where the next start finds it: the attempt count is never silently lost.
    /// Returns the name the job has in `retry/`.
    pub fn schedule_retry(&self, job: &Claimed, history: History) -> io::Result<OsString> {
        self.write_record(Dir::State, &job.name, &history.into())
            .map_err(|e| annotate(e, &job.name, "cannot record the failed attempt"))?;
        let moved = self
            .move_job(Dir::Active, Dir::Retry, &job.name)
            .map_err(|e| annotate(e, &job.name, "cannot move to retry/"))?;
        moved.ok_or_else(|| {
            annotate(
                io::Error::from(io::ErrorKind::NotFound),
                &job.name,
                "vanished from active/ before it could move to retry/",
            )
        })
    }

    /// The attempt was interrupted by a stop: put the job back in `new/` with its attempt count
    /// unchanged.
    pub fn requeue(&self, job: &Claimed) -> io::Result<Option<OsString>> {
        self.move_job(Dir::Active, Dir::New, &job.name)
            .map_err(|e| annotate(e, &job.name, "cannot move back to new/"))
    }

    /// Reads the due time of every job in `retry/` into a schedule that holds at most `cap` of
    /// them (the earliest). A job whose record is missing (lost to a full disk, or deleted by
    /// hand) or unreadable is due at once: better run now than never. This reads one record per
    /// waiting job, so it runs off the daemon's main thread, at start and when the schedule had
    /// to leave jobs out.
    pub fn scan_retries(&self, cap: usize) -> io::Result<RetrySchedule> {
        let mut schedule = RetrySchedule::new(cap);
        for entry in fs::read_dir(self.dir_path(Dir::Retry))? {
            let name = entry?.file_name();
            let due = self.retry_due(&name);
            schedule.insert(name, due);
        }
        Ok(schedule)
    }

    /// When the job `retry/NAME` is due, from its record (0, at once, when it has none).
    fn retry_due(&self, name: &OsStr) -> u64 {
        match self.read_record(Dir::State, name) {
            Ok(Some(r)) => r.next_attempt_unix_ms.unwrap_or(0),
            Ok(None) | Err(_) => 0,
        }
    }

    /// Moves `retry/NAME` to `new/` if its record says it is due at `now_ms`. The record is read
    /// again here, so an entry of the schedule that is stale (the job was promoted and failed
    /// again since) cannot move a job before its time.
    pub fn promote_if_due(&self, name: &OsStr, now_ms: u64) -> io::Result<Promotion> {
        // Only a job that is not there is gone: any other error is reported, and the caller
        // tries again, since nothing else would bring the job back to the schedule.
        match rustix::fs::statat(self.fd(Dir::Retry), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => {}
            Err(Errno::NOENT) => return Ok(Promotion::Gone),
            Err(e) => return Err(e.into()),
        }
        let due = self.retry_due(name);
        if due > now_ms {
            return Ok(Promotion::NotDue(due));
        }
        // The lock guards no data, so a panic elsewhere cannot leave anything half-done: a
        // poisoned lock is taken all the same.
        let _promoting = self
            .claim_or_promote
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(match self.move_job(Dir::Retry, Dir::New, name)? {
            Some(_) => Promotion::Moved,
            None => Promotion::Gone,
        })
    }

    /// Moves every job in `retry/` that is due at `now_ms` to `new/`, reading every record.
    /// Returns how many moved and when the next one is due. The daemon does not use it (it keeps
    /// a schedule); it is the whole operation in one call, for tests and tools.
    pub fn promote_due_retries(&self, now_ms: u64) -> io::Result<(usize, Option<u64>)> {
        let mut schedule = self.scan_retries(usize::MAX)?;
        let mut promoted = 0;
        while let Some((name, _)) = schedule.pop_due(now_ms) {
            if self.promote_if_due(&name, now_ms)? == Promotion::Moved {
                promoted += 1;
            }
        }
        Ok((promoted, schedule.next_due()))
    }

    /// Atomically submits the bytes of `src` as a new job named `id`. The file is written in
    /// `tmp/`, flushed to disk, then renamed into `new/`: a daemon never sees half a job. On an
    /// error the partial file is removed; while it is being written, `partial` holds its
    /// removal, so that a signal can remove it too (see [`Partial`]).
    fn enqueue_tracked(&self, src: &mut dyn Read, id: &str, partial: &Partial) -> io::Result<()> {
        let (mut file, tmp_path) = self.create_in_tmp(id, partial)?;
        let written = io::copy(src, &mut file).and_then(|_| file.sync_all());
        drop(file);
        let mut current = partial.hold();
        let moved = written.and_then(|()| {
            rename_noreplace(self.fd(Dir::Tmp), id, self.fd(Dir::New), id).map_err(io::Error::from)
        });
        *current = None;
        if let Err(e) = moved {
            let _ = fs::remove_file(&tmp_path);
            return Err(e);
        }
        Ok(())
    }

    /// Creates `tmp/ID` for a submission (never an existing file), and makes `partial` remove
    /// it, after whatever `partial` already removes (the jobs staged before it by the same
    /// `spoold enqueue`).
    pub(super) fn create_in_tmp(
        &self,
        id: &str,
        partial: &Partial,
    ) -> io::Result<(fs::File, PathBuf)> {
        let tmp_path = self.dir_path(Dir::Tmp).join(id);
        let mut current = partial.hold();
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&tmp_path)
            .map_err(|e| {
                let tmp = self.dir_path(Dir::Tmp);
                io::Error::new(
                    e.kind(),
                    format!("cannot create a file in {}: {e}", tmp.display()),
                )
            })?;
        let earlier = current.take();
        let removed = tmp_path.clone();
        *current = Some(Box::new(move || {
            let _ = fs::remove_file(removed);
            if let Some(undo) = earlier {
                undo();
            }
        }));
        Ok((file, tmp_path))
    }

    /// [`Spool::enqueue_tracked`] for a caller that has no signal to handle.
    pub fn enqueue(&self, src: &mut dyn Read, id: &str) -> io::Result<()> {
        self.enqueue_tracked(src, id, &Partial::default())
    }

    /// Counts the jobs in each state. The age of the oldest queued job costs one stat per queued
    /// job, so it is only computed when asked for.
    pub fn counts(&self, with_age: bool) -> io::Result<Counts> {
        let count = |dir: Dir| -> io::Result<u64> {
            let mut n = 0;
            for entry in fs::read_dir(self.dir_path(dir))? {
                entry?;
                n += 1;
            }
            Ok(n)
        };
        let mut queued = 0;
        let mut oldest: Option<i128> = None;
        let mut scan = self.scan_new()?;
        while let Some(c) = scan.next_candidate(with_age)? {
            queued += 1;
            if with_age {
                oldest = Some(oldest.map_or(c.mtime_ns, |o| o.min(c.mtime_ns)));
            }
        }
        let pause = self.paused()?;
        let now = SystemTime::now();
        let now_ns = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128;
        // A delayed job in retry/ has its due time as its modification time (see `submit`):
        // one stat tells it from a retry, without reading its record.
        let (mut retry, mut scheduled) = (0, 0);
        for entry in fs::read_dir(self.dir_path(Dir::Retry))? {
            let name = entry?.file_name();
            match rustix::fs::statat(self.fd(Dir::Retry), &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st)
                    if i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec)
                        > now_ns =>
                {
                    scheduled += 1
                }
                Ok(_) => retry += 1,
                Err(Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let (pending_scheduled, pending_queued) = self.pending_submissions(now)?;
        Ok(Counts {
            queued: queued + pending_queued,
            active: count(Dir::Active)?,
            retry,
            scheduled: scheduled + pending_scheduled,
            done: count(Dir::Done)?,
            failed: count(Dir::Failed)?,
            oldest_queued_age_s: oldest.map(|o| ((now_ns - o).max(0) as f64) / 1e9),
            daemon_pid: self.owner(),
            paused: pause.is_some(),
            paused_reason: pause.as_ref().and_then(|p| p.reason.clone()),
            paused_since: pause.as_ref().map(|p| p.since.clone()),
            paused_by_uid: pause.as_ref().map(|p| p.by_uid),
            held: count(Dir::Hold)?,
        })
    }

    /// The pid holding the flock on `spoold.lock`, read from /proc/locks: asking does not
    /// touch the lock, so it can never get in the way of a daemon that is starting.
    pub fn owner(&self) -> Option<u32> {
        let stat = rustix::fs::stat(self.root.join("spoold.lock")).ok()?;
        let key = format!(
            "{:02x}:{:02x}:{}",
            rustix::fs::major(stat.st_dev),
            rustix::fs::minor(stat.st_dev),
            stat.st_ino
        );
        let locks = fs::read_to_string("/proc/locks").ok()?;
        locks.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 6217 fe:00:10051585 0 EOF"
            (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&key.as_str()))
                .then(|| fields.get(4)?.parse().ok())
                .flatten()
        })
    }

    /// The jobs in `failed/`, oldest name first, with their recorded reasons.
    pub fn failed_jobs(&self) -> io::Result<Vec<FailedJob>> {
        let mut jobs = Vec::new();
        for entry in fs::read_dir(self.dir_path(Dir::Failed))? {
            let name = entry?.file_name();
            let history = self
                .read_record(Dir::Reasons, &name)
                .unwrap_or(None)
                .map(History::from);
            jobs.push(FailedJob {
                name,
                history,
                payload: None,
            });
        }
        jobs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(jobs)
    }

    /// Moves a failed job back to `new/` with a fresh attempt count. Only an entry of `failed/`
    /// itself is touched: `id` is one name, never a path, and a link there is not followed.
    pub fn retry_failed(&self, id: &JobId) -> io::Result<Retried> {
        let name = id.as_os_str();
        let stat = match rustix::fs::statat(self.fd(Dir::Failed), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => return Ok(Retried::NoSuchJob),
            Err(e) => return Err(e.into()),
        };
        // An entry that is not a regular file was refused unopened when it was claimed; sent
        // back, it would only be refused again (and a link's target is nobody's job).
        let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
        if kind != rustix::fs::FileType::RegularFile {
            return Ok(Retried::NotAJob {
                kind: describe_file_type(kind),
                place: Dir::Failed.place(),
            });
        }
        // A stale record must not follow the job back, but one that a live job of the same
        // name (in new/, active/ or retry/) owns must stay.
        let live = [Dir::New, Dir::Active, Dir::Retry]
            .into_iter()
            .any(|dir| rustix::fs::statat(self.fd(dir), name, AtFlags::SYMLINK_NOFOLLOW).is_ok());
        if !live {
            self.remove_record(Dir::State, name);
        }
        // The job starts its life again: its modification time, which `retry.max_age` counts
        // from, becomes now, or a job that expired would expire again at once. Best effort:
        // the move below is what matters, and only root and the owner may set the time.
        let now_only = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_NOW,
            },
        };
        let _ = rustix::fs::utimensat(
            self.fd(Dir::Failed),
            name,
            &now_only,
            AtFlags::SYMLINK_NOFOLLOW,
        );
        let Some(moved) = self.move_job(Dir::Failed, Dir::New, name)? else {
            return Ok(Retried::NoSuchJob);
        };
        self.remove_record(Dir::Reasons, name);
        Ok(Retried::Queued {
            name: moved,
            place: Dir::New.place(),
        })
    }

    /// Renames `name` from one directory to another without overwriting anything. When the
    /// destination has a job of that name already, the moved job gets a `.dup-<ULID>` suffix
    /// (and its state record follows it). Returns the name it now has, or None when `name` was
    /// not in `from` at all.
    fn move_job(&self, from: Dir, to: Dir, name: &OsStr) -> io::Result<Option<OsString>> {
        match rename_noreplace(self.fd(from), name, self.fd(to), name) {
            Ok(()) => return Ok(Some(name.to_owned())),
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        loop {
            let alt = dup_name(name);
            match rename_noreplace(self.fd(from), name, self.fd(to), &alt) {
                Ok(()) => {
                    // A job in failed/ has no state record: state/NAME, if any, is another's.
                    if from != Dir::Failed
                        && let Err(e) =
                            rename_noreplace(self.fd(Dir::State), name, self.fd(Dir::State), &alt)
                        && e != Errno::NOENT
                    {
                        return Err(e.into());
                    }
                    return Ok(Some(alt));
                }
                Err(Errno::NOENT) => return Ok(None),
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Where the job `id` is, since when, and its record of failed attempts, for `spoold show`;
    /// None when no directory holds it. Only entries of the spool's own directories are looked
    /// at: `id` is one name, never a path, and a link is not followed.
    pub fn show_job(&self, id: &JobId) -> io::Result<Option<ShownJob>> {
        let name = id.as_os_str();
        for dir in [
            Dir::Active,
            Dir::New,
            Dir::Retry,
            Dir::Hold,
            Dir::Failed,
            Dir::Done,
        ] {
            let stat = match rustix::fs::statat(self.fd(dir), name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(annotate(e.into(), name, "cannot look it up")),
            };
            // A rename sets the ctime, so it says when the job came into this directory.
            let since = UNIX_EPOCH
                + Duration::new(
                    u64::try_from(stat.st_ctime).unwrap_or(0),
                    u32::try_from(stat.st_ctime_nsec).unwrap_or(0),
                );
            let records = if matches!(dir, Dir::Failed | Dir::Done) {
                Dir::Reasons
            } else {
                Dir::State
            };
            let (history, record_error) = match self.read_record(records, name) {
                Ok(r) => (r.map(History::from), None),
                Err(e) => (None, Some(e.to_string())),
            };
            // Delayed by `spoold enqueue --in`/`--at`: in retry/ without a failed attempt.
            let scheduled = dir == Dir::Retry
                && history
                    .as_ref()
                    .is_some_and(|h| h.attempts == 0 && h.next_attempt_unix_ms.is_some());
            return Ok(Some(ShownJob {
                name: name.to_owned(),
                place: dir.place(),
                since: rfc3339(since),
                history,
                record_error,
                scheduled,
            }));
        }
        self.show_submitted(name)
    }

    fn read_record(&self, dir: Dir, name: &OsStr) -> io::Result<Option<JobRecord>> {
        let fd = match rustix::fs::openat(
            self.fd(dir),
            name,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut text = String::new();
        File::from(fd).read_to_string(&mut text)?;
        serde_json::from_str(&text).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}/{}: corrupt record: {e}",
                    self.dir_path(dir).display(),
                    display_name(name)
                ),
            )
        })
    }

    /// Writes a record atomically (a temporary file, fsync, rename over the old one), so that a
    /// crash leaves either the old record or the new one.
    fn write_record(&self, dir: Dir, name: &OsStr, record: &JobRecord) -> io::Result<()> {
        let tmp = format!(".tmp-{}", ulid::Ulid::generate());
        let fd = rustix::fs::openat(
            self.fd(dir),
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o640),
        )?;
        let mut file = File::from(fd);
        let written = serde_json::to_writer_pretty(&mut file, record)
            .map_err(io::Error::from)
            .and_then(|()| file.sync_all())
            .and_then(|()| {
                rustix::fs::renameat(self.fd(dir), tmp.as_str(), self.fd(dir), name)
                    .map_err(io::Error::from)
            });
        if written.is_err() {
            let _ = rustix::fs::unlinkat(self.fd(dir), tmp.as_str(), AtFlags::empty());
        }
        written
    }

    fn remove_record(&self, dir: Dir, name: &OsStr) {
        let _ = rustix::fs::unlinkat(self.fd(dir), name, AtFlags::empty());
    }
}

impl Spool {
    /// A submission's error; one refused by tmp/ itself, rather than by the file being
    /// submitted, is `Denied`, with tmp/'s group, which grants access.
    fn submit_error(&self, e: io::Error) -> SubmitError {
        let tmp = self.dir_path(Dir::Tmp);
        if e.kind() == io::ErrorKind::PermissionDenied
            && e.to_string().contains(&*tmp.to_string_lossy())
        {
            let group = fs::metadata(&tmp).map_or(u32::MAX, |m| m.gid());
            SubmitError::Denied { err: e, group }
        } else {
            SubmitError::Io(e)
        }
    }
}

/// The spool as the client commands see it.
impl Admin for Spool {
    fn address(&self) -> (&'static str, String) {
        (
            "spool",
            escape_bytes(self.root.as_os_str().as_encoded_bytes()),
        )
    }

    fn submit(&self, src: &mut dyn Read, id: &str, partial: &Partial) -> Result<(), SubmitError> {
        self.enqueue_tracked(src, id, partial)
            .map_err(|e| self.submit_error(e))
    }

    fn counts(&self) -> io::Result<Counts> {
        Spool::counts(self, true)
    }

    fn running(&self) -> io::Result<Vec<RunningJob>> {
        self.running_jobs()
    }

    fn oldest_queued(&self) -> io::Result<Option<Queued>> {
        Spool::oldest_queued(self)
    }

    fn failed(&self) -> io::Result<Vec<FailedJob>> {
        self.failed_jobs()
    }

    fn retry(&self, id: &JobId) -> io::Result<Retried> {
        self.retry_failed(id)
    }

    fn paused(&self) -> io::Result<Option<Paused>> {
        Spool::paused(self)
    }

    fn pause(&self, reason: Option<&str>) -> Result<(Paused, bool), OperatorError> {
        Spool::pause(self, reason)
    }

    fn resume(&self) -> Result<bool, OperatorError> {
        Spool::resume(self)
    }

    fn hold(&self, id: &JobId) -> Result<Moved, OperatorError> {
        Spool::hold(self, id)
    }

    fn release(&self, id: &JobId) -> Result<Moved, OperatorError> {
        Spool::release(self, id)
    }

    fn waiting(&self) -> io::Result<Vec<JobId>> {
        let mut ids = self.ids_in(Dir::New)?;
        ids.extend(self.ids_in(Dir::Retry)?);
        Ok(ids)
    }

    fn cancel(&self, id: &JobId) -> Result<bool, OperatorError> {
        self.request_cancel(id)
    }

    fn record_operation(
        &self,
        op: Operation,
        reason: Option<&str>,
        done: &[JobId],
        asked: &[JobId],
    ) -> Result<(), OperatorError> {
        self.write_operation(op, reason, done, asked)
    }

    fn held(&self) -> io::Result<Vec<JobId>> {
        self.ids_in(Dir::Hold)
    }

    fn show(&self, id: &JobId) -> io::Result<Option<ShownJob>> {
        self.show_job(id)
    }

    fn stage(
        &self,
        src: &mut dyn Read,
        id: &str,
        partial: &Partial,
        submission: &Submission,
    ) -> Result<(), SubmitError> {
        self.stage_job(src, id, partial, submission)
            .map_err(|e| self.submit_error(e))
    }

    fn publish(
        &self,
        ids: &[String],
        partial: &Partial,
        submission: &Submission,
    ) -> Result<(), PublishError> {
        self.publish_jobs(ids, partial, submission)
    }

    fn purge(
        &self,
        state: Finished,
        before: SystemTime,
        dry_run: bool,
    ) -> Result<Vec<Purged>, OperatorError> {
        self.purge_finished(state, before, dry_run)
    }
}

/// A streaming read of `new/`.
pub struct NewScan {
    inner: fs::ReadDir,
    new_fd: OwnedFd,
}

impl NewScan {
    /// The next candidate, or None at the end of the directory. With `with_mtime`, the entry is
    /// stat'ed for its modification time (used to run the oldest first); entries that vanished
    /// meanwhile are skipped.
    pub fn next_candidate(&mut self, with_mtime: bool) -> io::Result<Option<Candidate>> {
        for entry in self.inner.by_ref() {
            let entry = entry?;
            let name = entry.file_name();
            if name.as_bytes().first() == Some(&b'.') {
                continue;
            }
            let mut mtime_ns = 0;
            if with_mtime {
                match rustix::fs::statat(&self.new_fd, &name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => {
                        mtime_ns =
                            i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec);
                    }
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(Some(Candidate { name, mtime_ns }));
        }
        Ok(None)
    }
}

/// The mount a file is on (statx's STATX_MNT_ID, Linux 5.8 and later), or None when the kernel
/// cannot tell.
fn mount_id<Fd: AsFd, P: rustix::path::Arg>(dir: Fd, path: P, flags: AtFlags) -> Option<u64> {
    let st = rustix::fs::statx(dir, path, flags, rustix::fs::StatxFlags::MNT_ID).ok()?;
    rustix::fs::StatxFlags::from_bits_retain(st.stx_mask)
        .contains(rustix::fs::StatxFlags::MNT_ID)
        .then_some(st.stx_mnt_id)
}

/// `renameat2(RENAME_NOREPLACE)`, with a `link` + `unlink` fallback for filesystems that do not
/// support the flag (both refuse to overwrite).
fn rename_noreplace<P: rustix::path::Arg + Copy, Q: rustix::path::Arg + Copy>(
    from_dir: &OwnedFd,
    from: P,
    to_dir: &OwnedFd,
    to: Q,
) -> Result<(), Errno> {
    match rustix::fs::renameat_with(
        from_dir.as_fd(),
        from,
        to_dir.as_fd(),
        to,
        RenameFlags::NOREPLACE,
    ) {
        Err(Errno::INVAL) => {
            rustix::fs::linkat(from_dir, from, to_dir, to, AtFlags::empty())?;
            rustix::fs::unlinkat(from_dir, from, AtFlags::empty())
        }
        other => other,
    }
}

/// `NAME.dup-<ULID>`, shortened at the front of NAME if needed to fit NAME_MAX.
fn dup_name(name: &OsStr) -> OsString {
    let suffix = format!(".dup-{}", ulid::Ulid::generate());
    let bytes = name.as_bytes();
    let keep = bytes.len().min(NAME_MAX - suffix.len());
    let mut out = bytes[..keep].to_vec();
    out.extend_from_slice(suffix.as_bytes());
    OsString::from_vec(out)
}

fn annotate(e: io::Error, name: &OsStr, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("job {}: {what}: {e}", display_name(name)))
}

fn describe_file_type(kind: rustix::fs::FileType) -> &'static str {
    use rustix::fs::FileType as T;
    match kind {
        T::Symlink => "a symbolic link",
        T::Directory => "a directory",
        T::Fifo => "a FIFO",
        T::Socket => "a socket",
        T::CharacterDevice => "a character device",
        T::BlockDevice => "a block device",
        _ => "an unknown kind of file",
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// A time as people read it in records: RFC 3339, UTC, milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    crate::clock::rfc3339_ms(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool() -> (tempfile::TempDir, Spool) {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        (dir, spool)
    }

    fn put(spool: &Spool, dir: Dir, name: &str, body: &str) {
        fs::write(spool.dir_path(dir).join(name), body).unwrap();
    }

    fn names(spool: &Spool, dir: Dir) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(spool.dir_path(dir))
            .unwrap()
            .map(|e| display_name(&e.unwrap().file_name()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn job_ids_sort_by_submit_time() {
        use crate::source::admin::new_job_id;
        let mut g = ulid::Generator::new();
        let ids: Vec<String> = (0..1000).map(|_| new_job_id(&mut g)).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert!(ids.iter().all(|id| id.len() == 26));
        let later = {
            std::thread::sleep(Duration::from_millis(2));
            new_job_id(&mut ulid::Generator::new())
        };
        assert!(later > ids[999]);
    }

    #[test]
    fn claim_then_done_and_never_overwrite() {
        let (_d, spool) = spool();
        put(&spool, Dir::New, "a", "1");
        put(&spool, Dir::Done, "a", "old");
        let Claim::Job(job) = spool.claim(OsStr::new("a")).unwrap() else {
            panic!("not claimed")
        };
        assert_eq!(job.attempt, 1);
        assert!(matches!(
            spool.claim(OsStr::new("a")).unwrap(),
            Claim::Skipped
        ));
        let to = spool.finish_done(&job, true).unwrap().unwrap();
        assert!(to.to_str().unwrap().starts_with("a.dup-"));
        assert_eq!(
            fs::read_to_string(spool.dir_path(Dir::Done).join("a")).unwrap(),
            "old"
        );
        assert_eq!(
            fs::read_to_string(spool.dir_path(Dir::Done).join(&to)).unwrap(),
            "1"
        );
    }

    #[test]
    fn retry_keeps_attempt_count_across_reopen() {
        let (d, spool) = spool();
        put(&spool, Dir::New, "j", "x");
        let Claim::Job(job) = spool.claim(OsStr::new("j")).unwrap() else {
            panic!()
        };
        let history = History {
            attempts: 1,
            next_attempt_unix_ms: Some(1000),
            ..History::default()
        };
        spool.schedule_retry(&job, history).unwrap();
        assert_eq!(names(&spool, Dir::Retry), vec!["j"]);
        drop(spool);
        let spool = Spool::open(d.path()).unwrap();
        assert_eq!(spool.promote_due_retries(999).unwrap(), (0, Some(1000)));
        assert_eq!(spool.promote_due_retries(1000).unwrap(), (1, None));
        let Claim::Job(job) = spool.claim(OsStr::new("j")).unwrap() else {
            panic!()
        };
        assert_eq!(job.attempt, 2);
        spool.finish_done(&job, false).unwrap();
        assert!(names(&spool, Dir::State).is_empty());
        assert!(names(&spool, Dir::Done).is_empty());
    }

    #[test]
    fn non_regular_entries_are_rejected_unopened() {
        let (_d, spool) = spool();
        std::os::unix::fs::symlink("/etc/passwd", spool.dir_path(Dir::New).join("link")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            spool.dir_path(Dir::New).join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        fs::create_dir(spool.dir_path(Dir::New).join("dir")).unwrap();
        for name in ["link", "fifo", "dir"] {
            match spool.claim(OsStr::new(name)).unwrap() {
                Claim::Rejected { reason, .. } => assert!(reason.contains("not a regular file")),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(names(&spool, Dir::Failed), vec!["dir", "fifo", "link"]);
        let failed = spool.failed_jobs().unwrap();
        assert!(
            failed[1]
                .history
                .as_ref()
                .unwrap()
                .last_failure
                .as_ref()
                .unwrap()
                .reason
                .contains("FIFO")
        );
    }

    #[test]
    fn recovery_moves_active_back_without_loss() {
        let (_d, spool) = spool();
        put(&spool, Dir::Active, "a", "1");
        put(&spool, Dir::Active, "b", "2");
        put(&spool, Dir::New, "b", "3");
        let recovery = spool.recover_active(3).unwrap();
        assert_eq!(recovery.requeued.len(), 2);
        assert!(recovery.failed.is_empty());
        let new = names(&spool, Dir::New);
        assert_eq!(new.len(), 3, "{new:?}");
        assert!(names(&spool, Dir::Active).is_empty());
    }

    fn record(spool: &Spool, name: &str) -> Option<History> {
        spool
            .read_record(Dir::State, OsStr::new(name))
            .unwrap()
            .map(History::from)
    }

    /// Each recovery raises the job's count in its record, which a failed attempt keeps and
    /// which never counts as an attempt; at the bound the job goes to failed/ with the reason,
    /// and `spoold retry` brings it back with no record at all.
    #[test]
    fn recoveries_are_counted_until_the_bound_fails_the_job() {
        let (_d, spool) = spool();
        let claim = |name: &str| match spool.claim(OsStr::new(name)).unwrap() {
            Claim::Job(job) => job,
            other => panic!("{name}: {other:?}"),
        };
        put(&spool, Dir::Active, "p", "x");
        assert_eq!(spool.recover_active(3).unwrap().requeued, ["p"]);
        let h = record(&spool, "p").expect("the recovery wrote a record");
        assert_eq!((h.recoveries, h.attempts, h.id.as_str()), (1, 0, "p"));
        // Claimed again (left in active/ by the next crash): the recovery did not count as an
        // attempt.
        assert_eq!(claim("p").attempt, 1);
        spool.recover_active(3).unwrap();
        assert_eq!(record(&spool, "p").unwrap().recoveries, 2);
        // A failed attempt keeps the count: it is the same job.
        let job = claim("p");
        let report = crate::job::Report {
            exit_code: Some(3),
            ..crate::job::Report::without_run("exit status 3".into())
        };
        let mut h = record::after_failure(
            "p",
            job.attempt,
            job.history.as_ref(),
            report,
            SystemTime::now(),
        );
        record::set_next_attempt(&mut h, UNIX_EPOCH);
        spool.schedule_retry(&job, h).unwrap();
        assert_eq!(record(&spool, "p").unwrap().recoveries, 2);
        spool.promote_due_retries(u64::MAX).unwrap();
        assert_eq!(claim("p").attempt, 2);
        // The third recovery reaches the bound.
        let recovery = spool.recover_active(3).unwrap();
        assert!(recovery.requeued.is_empty());
        assert_eq!(recovery.failed, ["p"]);
        assert!(names(&spool, Dir::State).is_empty());
        let failed = spool.failed_jobs().unwrap();
        let h = failed[0].history.as_ref().unwrap();
        let reason = &h.last_failure.as_ref().unwrap().reason;
        assert!(
            reason.contains("died 3 times while it ran") && reason.contains("spool.max_recoveries"),
            "{reason}"
        );
        assert!(h.permanent);
        assert_eq!((h.recoveries, h.attempts, h.failures.len()), (3, 2, 2));
        // Retried: a fresh life, with no count.
        spool.retry_failed(&JobId::parse("p").unwrap()).unwrap();
        assert!(names(&spool, Dir::State).is_empty());
        let job = claim("p");
        assert_eq!(job.attempt, 1);
        assert!(job.history.is_none());
        spool.recover_active(3).unwrap();
        assert_eq!(record(&spool, "p").unwrap().recoveries, 1);
        // Done: the record goes with the job.
        let job = claim("p");
        spool.finish_done(&job, true).unwrap();
        assert!(names(&spool, Dir::State).is_empty());
    }

    /// A record written by an older spoold (no count) is counted from 0 with every field kept;
    /// a job whose name a job waiting in retry/ holds gets a .dup- name and a count of its own,
    /// and leaves the other's record alone.
    #[test]
    fn recovery_keeps_old_records_and_leaves_another_jobs_record_alone() {
        let (_d, spool) = spool();
        let old = r#"{"id":"r","attempts":2,"first_attempt_at":"2024-01-01T00:00:00.000Z","next_attempt_unix_ms":1,"next_attempt_at":"x","failed_at":null,"permanent":false,"last_failure":null,"expires_unix_ms":4102444800000,"expires_at":"2100-01-01T00:00:00.000Z"}"#;
        put(&spool, Dir::State, "r", old);
        put(&spool, Dir::Active, "r", "x");
        spool.recover_active(3).unwrap();
        let h = record(&spool, "r").unwrap();
        assert_eq!(h.recoveries, 1);
        assert_eq!(h.attempts, 2);
        assert_eq!(
            h.first_attempt_at.as_deref(),
            Some("2024-01-01T00:00:00.000Z")
        );
        assert_eq!(h.expires_unix_ms, Some(4_102_444_800_000));

        put(&spool, Dir::Retry, "q", "waiting");
        put(&spool, Dir::State, "q", old);
        put(&spool, Dir::Active, "q", "running");
        let recovery = spool.recover_active(3).unwrap();
        let dup = display_name(&recovery.requeued[0]);
        assert!(dup.starts_with("q.dup-"), "{dup}");
        assert_eq!(
            fs::read_to_string(spool.dir_path(Dir::State).join("q")).unwrap(),
            old
        );
        assert_eq!(record(&spool, &dup).unwrap().recoveries, 1);
        assert_eq!(record(&spool, &dup).unwrap().attempts, 0);
    }

    #[test]
    fn second_lock_is_refused_with_owner() {
        let (d, spool) = spool();
        let _lock = spool.lock().unwrap();
        let other = Spool::open(d.path()).unwrap();
        let err = other.lock().unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
    }

    /// The daemon waits for a held lock on its runtime's timers: the other tasks of the main
    /// thread (signals, notifications) run while it waits.
    #[tokio::test]
    async fn waiting_for_the_lock_does_not_block_the_runtime() {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        let (d, spool) = spool();
        let _held = spool.lock().unwrap();
        let other = Spool::open(d.path()).unwrap();
        let ticks = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                counter.fetch_add(1, Relaxed);
                tokio::task::yield_now().await;
            }
        });
        let err = other.lock_async().await.unwrap_err().to_string();
        ticker.abort();
        assert!(err.contains("already owned by another spoold"), "{err}");
        assert!(
            ticks.load(Relaxed) > 1,
            "nothing else ran while the lock was awaited"
        );
    }

    #[test]
    fn long_names_get_a_dup_suffix_that_fits() {
        let long = "n".repeat(255);
        let dup = dup_name(OsStr::new(&long));
        assert_eq!(dup.len(), 255);
    }

    #[test]
    fn missing_root_is_a_clear_error() {
        let err = Spool::open(Path::new("/nonexistent/spool"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/spool") && err.contains("does not exist"),
            "{err}"
        );
    }

    #[test]
    fn counts_skip_dot_files_and_report_age() {
        let (_d, spool) = spool();
        put(&spool, Dir::New, "a", "");
        put(&spool, Dir::New, ".partial", "");
        put(&spool, Dir::Failed, "f", "");
        let c = spool.counts(true).unwrap();
        assert_eq!((c.queued, c.failed, c.done), (1, 1, 0));
        assert!(c.oldest_queued_age_s.unwrap() >= 0.0);
    }
}
