//! One attempt of a job: the handler process in its own process group, its output, its time limit.
//!
//! The handler is started from an argv (never a shell) in a new process group, so that a timeout
//! or an abort reaches everything it started. Its stdout and stderr are read a bounded chunk at
//! a time and logged line by line with the job's ID; memory stays bounded whatever it prints.
//! No process of the group outlives the attempt: when the handler exits while members of its
//! group live on, they get SIGTERM, then SIGKILL after `kill_grace`.
//!
//! An attempt runs synchronously on its worker's thread: one `poll(2)` waits on the handler's
//! pidfd, its two pipes, the abort eventfd and the lease's `revoked` descriptor at once, with
//! the nearest deadline as timeout. What is watched, and what is due next, follows from the
//! attempt's `Phase`.
//! Nothing is registered with a reactor, so a job costs no `epoll_ctl`, and its pipes need no
//! `fcntl` to become non-blocking; a worker thread has nothing else to do while its handler
//! runs.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::{CStr, CString, OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags};
use nix::sys::signal::SigSet;
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal};
use tokio_util::sync::CancellationToken;

use crate::clock::later;
use crate::config::{HandlerConfig, StdinMode};
use crate::job::{Job, Outcome, Report};
use crate::runner::LEASE_LOST;

/// A line longer than this is cut, and the rest of it dropped, so one endless line cannot grow
/// memory.
pub(super) const MAX_LINE: usize = 4096;
/// Lines of stderr kept for the failure record.
pub(super) const STDERR_TAIL: usize = 10;
/// Lines logged per attempt; past this the output is read and counted but not logged, so a
/// handler that prints gigabytes cannot flood the journal.
pub(super) const MAX_LOGGED_LINES: u64 = 10_000;
/// How long to wait for the output pipes to close once the handler's group is gone. Only a
/// process that left the group (setsid) can hold them open that long.
pub const PIPE_GRACE: Duration = Duration::from_millis(200);

/// How often to look whether the rest of a handler's group has gone, between its SIGTERM and
/// SIGKILL, once the handler itself has exited. Each look may read /proc (`group_alive`), so
/// not much more often than this.
pub(super) const GROUP_CHECK: Duration = Duration::from_millis(50);

/// How much of a pipe one read takes.
pub(super) const CHUNK: usize = 8192;

/// What a worker keeps from one attempt to the next, so that an attempt neither allocates its
/// output buffers nor opens `/dev/null` anew, nor rebuilds the handler's environment: at
/// thousands of jobs a second, each of these is a measurable share of spoold's own CPU.
pub struct Scratch {
    out: Box<[u8; CHUNK]>,
    err: Box<[u8; CHUNK]>,
    /// Duplicated onto each handler's stdin when it is `null`. None if it could not be opened,
    /// in which case each attempt opens it itself.
    dev_null: Option<std::fs::File>,
    /// How every handler starts: in a process group of its own, with SIGPIPE back at its
    /// default (spoold ignores it, as Rust programs do, and an ignored signal stays ignored
    /// across exec), and with no signal blocked. std's `Command` let the child inherit the
    /// spawning thread's mask instead; an empty one is what systemd gives a service, and a
    /// handler started with SIGTERM blocked would only end at SIGKILL. The same for every
    /// attempt, so it is built once.
    attr: nix::Result<PosixSpawnAttr>,
    /// The environment of the handlers under the current `[handler] env`, rebuilt only when
    /// that table changes.
    env: Option<HandlerEnv>,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            out: Box::new([0; CHUNK]),
            err: Box::new([0; CHUNK]),
            dev_null: std::fs::File::open("/dev/null").ok(),
            attr: spawn_attr(),
            env: None,
        }
    }

    /// Builds the handlers' environment for `cfg` if `[handler] env` changed since the last
    /// attempt (a reload).
    fn refresh_env(&mut self, cfg: &HandlerConfig) {
        if self.env.as_ref().is_none_or(|e| e.from != cfg.env) {
            self.env = Some(HandlerEnv::new(cfg));
        }
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

fn spawn_attr() -> nix::Result<PosixSpawnAttr> {
    let mut attr = PosixSpawnAttr::init()?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETPGROUP
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )?;
    // Group 0: a new group whose ID is the handler's PID.
    attr.set_pgroup(nix::unistd::Pid::from_raw(0))?;
    attr.set_sigmask(&SigSet::empty())?;
    let mut default = SigSet::empty();
    default.add(nix::sys::signal::Signal::SIGPIPE);
    attr.set_sigdefault(&default)?;
    Ok(attr)
}

/// Variables spoold sets for each job; the same names elsewhere are replaced.
const JOB_VARS: [&str; 3] = ["SPOOLD_JOB_PATH", "SPOOLD_JOB_ID", "SPOOLD_ATTEMPT"];
/// spoold's own variables from systemd: the handler is not spoold and must not speak to
/// systemd in its name.
const WITHHELD_VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// The environment every handler gets before its job's own variables: spoold's environment,
/// less spoold's systemd variables, with `[handler] env` on top. Built once per config rather
/// than copied from spoold's environment at every spawn, which is what a `Command` with
/// variables set does.
struct HandlerEnv {
    /// The `[handler] env` it was built from. A PATH set there is where a handler named
    /// without a `/` is looked up, as a shell with that environment would, not spoold's own.
    from: BTreeMap<String, String>,
    vars: Vec<CString>,
}

impl HandlerEnv {
    fn new(cfg: &HandlerConfig) -> HandlerEnv {
        let keep = |key: &OsStr| {
            let key = key.as_bytes();
            !WITHHELD_VARS
                .iter()
                .chain(&JOB_VARS)
                .any(|v| v.as_bytes() == key)
        };
        let mut vars: Vec<CString> = std::env::vars_os()
            // A name that is not UTF-8 cannot be in `[handler] env`, whose names are strings.
            .filter(|(k, _)| keep(k) && !k.to_str().is_some_and(|k| cfg.env.contains_key(k)))
            .filter_map(|(k, v)| var(k.as_bytes(), v.as_bytes()))
            .collect();
        vars.extend(
            cfg.env
                .iter()
                .filter(|(k, _)| keep(OsStr::new(k)))
                .filter_map(|(k, v)| var(k.as_bytes(), v.as_bytes())),
        );
        HandlerEnv {
            from: cfg.env.clone(),
            vars,
        }
    }
}

/// `KEY=VALUE` as exec wants it; None for what no environment can hold (a NUL byte: the config
/// refuses one in `[handler] env`, and neither spoold's own environment nor a file name can
/// hold one).
fn var(key: &[u8], value: &[u8]) -> Option<CString> {
    let mut kv = Vec::with_capacity(key.len() + 1 + value.len());
    kv.extend_from_slice(key);
    kv.push(b'=');
    kv.extend_from_slice(value);
    CString::new(kv).ok()
}

/// The abort token as a descriptor `poll(2)` can wait on: an eventfd that becomes readable, and
/// stays readable, once the token is cancelled. A worker blocked in `poll` on its handler sees
/// an abort as soon as a waker would have.
#[derive(Clone)]
pub struct Abort {
    pub(super) fd: Arc<OwnedFd>,
}

impl Abort {
    /// Watches `token` from a task on the current runtime; the task ends when the token is
    /// cancelled, or with the runtime. Must be called from within a runtime.
    pub fn watch(token: CancellationToken) -> io::Result<Abort> {
        let fd = Arc::new(rustix::event::eventfd(0, EventfdFlags::CLOEXEC)?);
        let raise = Arc::clone(&fd);
        tokio::spawn(async move {
            token.cancelled().await;
            // Never read back, so the counter stays non-zero and every poller sees it. The
            // write cannot block: the counter is far from its maximum.
            let _ = rustix::io::write(&*raise, &1u64.to_ne_bytes());
        });
        Ok(Abort { fd })
    }

    /// Whether the abort has come (the descriptor is readable), without waiting.
    pub fn raised(&self) -> bool {
        readable_now(self.fd.as_fd())
    }
}

/// Whether a read of `fd` would not block now (data, or its end), by a poll that does not wait.
pub(super) fn readable_now(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [rustix::event::PollFd::from_borrowed_fd(
        fd,
        rustix::event::PollFlags::IN,
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
}

/// The handler's process. Were `run` left without having waited for it (a handler it cannot
/// watch, or a panic), dropping this kills its group and reaps it: no handler runs on
/// unobserved.
pub(super) struct HandlerProcess {
    /// The handler's PID, which is also its process group's ID.
    pub(super) pgid: Pid,
    /// What reaping it gave, once it has been reaped. A second `waitpid` must never run: the
    /// PID may by then belong to another worker's handler, whose exit it would steal.
    pub(super) reaped: Option<Result<ExitStatus, rustix::io::Errno>>,
}

impl HandlerProcess {
    /// Reaps the handler, waiting for its exit, or gives what reaping it gave before.
    pub(super) fn wait(&mut self) -> io::Result<ExitStatus> {
        let reaped = *self.reaped.get_or_insert_with(|| {
            loop {
                match rustix::process::waitpid(
                    Some(self.pgid),
                    rustix::process::WaitOptions::empty(),
                ) {
                    Ok(Some((_, status))) => break Ok(ExitStatus::from_raw(status.as_raw())),
                    // Not expected without WNOHANG; counted as reaped all the same.
                    Ok(None) => break Err(rustix::io::Errno::CHILD),
                    Err(rustix::io::Errno::INTR) => continue,
                    // Even an error means there is nothing left to reap.
                    Err(e) => break Err(e),
                }
            }
        });
        reaped.map_err(io::Error::from)
    }
}

impl Drop for HandlerProcess {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            signal_group(self.pgid, Signal::KILL);
            let _ = self.wait();
        }
    }
}

/// Why spoold itself ended the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// `handler.timeout` ran out.
    Timeout,
    /// The abort token: a stop that no longer waits for jobs.
    Abort,
    /// The source lost its hold on the job (`Lease::revoked`).
    LeaseLost,
}

/// Where an attempt stands. The phase alone says which descriptors are watched and which
/// instant is due next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The handler runs and spoold has not ended it: its time limit counts, and an abort or a
    /// lost lease ends it.
    Running,
    /// spoold has sent the group SIGTERM (`Attempt::ended` says why); SIGKILL follows at
    /// `kill_at`.
    Ending { kill_at: Instant },
    /// The group has had its SIGKILL; only the handler's exit is awaited. A member seen after
    /// this is dying, not defying: it gets no second grace period, which would stretch an abort
    /// past the stop's bound.
    Killed,
    /// The handler has been reaped, but members of its group live on: they have had SIGTERM,
    /// get SIGKILL at `kill_at`, and are looked for again at `check_at`. They may hold no pipe,
    /// and must not outlive the job all the same. No descriptor reports their end, and a look
    /// may read /proc, so looks are paced at `GROUP_CHECK` rather than made at every wake-up
    /// (a member that floods the pipe would otherwise cost a scan per read).
    Outlived { kill_at: Instant, check_at: Instant },
    /// The handler has been reaped and nothing of its group lives (or all of it is dying of
    /// SIGKILL): the pipes are read until they close, or until `until`.
    Draining { until: Instant },
}

impl Phase {
    fn reaped(self) -> bool {
        matches!(self, Phase::Outlived { .. } | Phase::Draining { .. })
    }

    /// The next instant at which something is due; `deadline` is the attempt's time limit.
    fn next_due(self, deadline: Instant) -> Option<Instant> {
        match self {
            Phase::Running => Some(deadline),
            Phase::Ending { kill_at } => Some(kill_at),
            Phase::Killed => None,
            Phase::Outlived { kill_at, check_at } => Some(kill_at.min(check_at)),
            Phase::Draining { until } => Some(until),
        }
    }
}

/// What `Attempt::on_time` did.
enum Flow {
    /// Nothing was due: wait for the next event.
    Wait,
    /// The phase changed: look again at what is due before waiting.
    Changed,
    /// The pipes stayed open past their grace: stop reading them.
    GiveUp,
}

/// What one `poll` found ready.
#[derive(Default)]
struct Ready {
    out: bool,
    err: bool,
    exited: bool,
    aborted: bool,
    revoked: bool,
}

/// One attempt being watched: the handler, its output, and where it stands.
struct Attempt<'a, 'b> {
    cfg: &'a HandlerConfig,
    job: Job<'a>,
    child: HandlerProcess,
    /// Readable once the handler has exited, so one poll waits for the exit and the output.
    pidfd: OwnedFd,
    out: LineReader<'b, std::fs::File>,
    err: LineReader<'b, std::fs::File>,
    log: OutputLog<'a>,
    /// When the time limit runs out; it counts only in `Phase::Running`.
    deadline: Instant,
    phase: Phase,
    /// Why spoold ended the handler, if it did: set once, as the attempt leaves `Running`.
    ended: Option<Ended>,
}

/// Runs one attempt to its end, blocking the calling thread until then. `abort`, or `revoked`
/// (the job's lease, lost) becoming readable, ends it early: SIGTERM to the group, SIGKILL
/// after `kill_grace`, and an `Aborted` or a `LeaseLost` outcome.
pub fn run(
    cfg: &HandlerConfig,
    job: &Job<'_>,
    abort: &Abort,
    revoked: Option<BorrowedFd<'_>>,
    scratch: &mut Scratch,
) -> Report {
    let started = SystemTime::now();
    let clock = Instant::now();
    let spawned = spawn(cfg, job, scratch).and_then(|(child, stdout, stderr)| {
        // Without a pidfd (out of descriptors) the attempt cannot be watched: it is ended at
        // once (dropping `child` kills and reaps it) rather than left running unobserved.
        let pidfd = rustix::process::pidfd_open(child.pgid, PidfdFlags::empty())
            .map_err(|e| format!("cannot watch the handler (pidfd_open): {e}"))?;
        Ok((child, pidfd, stdout, stderr))
    });
    let (child, pidfd, stdout, stderr) = match spawned {
        Ok(spawned) => spawned,
        Err(reason) => {
            return Report {
                outcome: Outcome::Failed,
                started,
                duration: clock.elapsed(),
                exit_code: None,
                signal: None,
                timed_out: false,
                reason,
                stderr_tail: Vec::new(),
            };
        }
    };
    let mut attempt = Attempt {
        cfg,
        job: *job,
        child,
        pidfd,
        out: LineReader::new(Some(std::fs::File::from(stdout)), &mut scratch.out),
        err: LineReader::new(Some(std::fs::File::from(stderr)), &mut scratch.err),
        log: OutputLog {
            id: job.shown,
            attempt: job.attempt,
            logged: 0,
            suppressed: 0,
            stderr_tail: VecDeque::new(),
        },
        deadline: later(clock, cfg.timeout),
        phase: Phase::Running,
        ended: None,
    };
    attempt.watch(abort, revoked);
    attempt.report(started, clock)
}

impl Attempt<'_, '_> {
    /// Watches the attempt until it is over: the handler reaped, no member of its group being
    /// ended, and its pipes closed or given up on.
    fn watch(&mut self, abort: &Abort, revoked: Option<BorrowedFd<'_>>) {
        while !self.over() {
            let now = Instant::now();
            match self.on_time(now) {
                Flow::Wait => {}
                Flow::Changed => continue,
                Flow::GiveUp => break,
            }
            let Some(ready) = self.poll(now, abort, revoked) else {
                break;
            };
            self.on_ready(ready);
        }
        if self.log.suppressed > 0 {
            tracing::warn!(
                job_id = self.job.shown,
                attempt = self.job.attempt,
                "{} more lines of handler output were not logged (at most {MAX_LOGGED_LINES} lines \
                 are logged per attempt)",
                self.log.suppressed
            );
        }
    }

    fn over(&self) -> bool {
        match self.phase {
            Phase::Draining { .. } => !self.out.open() && !self.err.open(),
            _ => false,
        }
    }

    /// Carries out what is due at `now` in the current phase.
    fn on_time(&mut self, now: Instant) -> Flow {
        let pgid = self.child.pgid;
        match self.phase {
            Phase::Running if self.deadline <= now => {
                self.end(Ended::Timeout, now);
                Flow::Changed
            }
            Phase::Ending { kill_at } if kill_at <= now => {
                signal_group(pgid, Signal::KILL);
                self.phase = Phase::Killed;
                Flow::Changed
            }
            Phase::Outlived { kill_at, check_at } => {
                if check_at <= now {
                    if !group_alive(pgid) {
                        // The rest of the group went on SIGTERM: nothing is left to kill.
                        self.phase = Phase::Draining {
                            until: later(now, PIPE_GRACE),
                        };
                        return Flow::Changed;
                    }
                    self.phase = Phase::Outlived {
                        kill_at,
                        check_at: later(now, GROUP_CHECK),
                    };
                }
                if kill_at > now {
                    return Flow::Wait;
                }
                signal_group(pgid, Signal::KILL);
                self.phase = Phase::Draining {
                    until: later(now, PIPE_GRACE),
                };
                Flow::Changed
            }
            Phase::Draining { until } if until <= now => {
                tracing::warn!(
                    job_id = self.job.shown,
                    attempt = self.job.attempt,
                    "a process that left the handler's process group keeps its output open; \
                     no longer reading it"
                );
                Flow::GiveUp
            }
            _ => Flow::Wait,
        }
    }

    /// spoold ends the handler: SIGTERM to its group now, SIGKILL after `kill_grace`.
    fn end(&mut self, why: Ended, now: Instant) {
        self.ended = Some(why);
        signal_group(self.child.pgid, Signal::TERM);
        self.phase = Phase::Ending {
            kill_at: later(now, self.cfg.kill_grace),
        };
    }

    /// Waits, until the next instant due, for what the phase watches: the open pipes; the
    /// handler's exit until it is reaped; the abort and the lost lease while it runs. None when
    /// the wait itself failed, which ends the attempt.
    fn poll(
        &mut self,
        now: Instant,
        abort: &Abort,
        revoked: Option<BorrowedFd<'_>>,
    ) -> Option<Ready> {
        let running = self.phase == Phase::Running;
        let reaped = self.phase.reaped();
        let mut fds = Vec::with_capacity(5);
        let out_at = slot(&mut fds, self.out.fd());
        let err_at = slot(&mut fds, self.err.fd());
        let exit_at = slot(&mut fds, (!reaped).then(|| self.pidfd.as_fd()));
        let abort_at = slot(&mut fds, running.then(|| abort.fd.as_fd()));
        let revoked_at = slot(&mut fds, revoked.filter(|_| running));
        let timeout = self.phase.next_due(self.deadline).map(|t| {
            Timespec::try_from(t.saturating_duration_since(now)).unwrap_or(Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            })
        });
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(_) => {}
            // A signal for spoold landed on this thread; its handler has run, so poll again.
            Err(rustix::io::Errno::INTR) => return Some(Ready::default()),
            Err(e) => {
                // Not expected with valid descriptors; end the attempt rather than spin.
                tracing::error!(
                    job_id = self.job.shown,
                    attempt = self.job.attempt,
                    "poll failed: {e}"
                );
                signal_group(self.child.pgid, Signal::KILL);
                // The status is kept for the report.
                let _ = self.child.wait();
                return None;
            }
        }
        let ready = |at: Option<usize>| at.is_some_and(|i| !fds[i].revents().is_empty());
        Some(Ready {
            out: ready(out_at),
            err: ready(err_at),
            exited: ready(exit_at),
            aborted: ready(abort_at),
            revoked: ready(revoked_at),
        })
    }

    fn on_ready(&mut self, ready: Ready) {
        if ready.out {
            let r = self.out.fill();
            self.out.take_lines(r, |l| self.log.line("stdout", l));
        }
        if ready.err {
            let r = self.err.fill();
            self.err.take_lines(r, |l| self.log.line("stderr", l));
        }
        if ready.exited {
            self.on_exit();
        } else if ready.aborted {
            self.end(Ended::Abort, Instant::now());
        } else if ready.revoked {
            self.end(Ended::LeaseLost, Instant::now());
        }
    }

    /// Reaps the handler. Whatever it left running in its group must not outlive the job.
    fn on_exit(&mut self) {
        // The status is kept for the report.
        let _ = self.child.wait();
        let pgid = self.child.pgid;
        self.phase = match self.phase {
            Phase::Running | Phase::Ending { .. } if group_alive(pgid) => {
                signal_group(pgid, Signal::TERM);
                let now = Instant::now();
                let kill_at = match self.phase {
                    Phase::Ending { kill_at } => kill_at,
                    _ => later(now, self.cfg.kill_grace),
                };
                Phase::Outlived {
                    kill_at,
                    check_at: later(now, GROUP_CHECK),
                }
            }
            // Nothing of the group lives (or all of it is dying of SIGKILL): a SIGKILL still
            // pending from a timeout or an abort has nothing left to do, and must not hold the
            // job until it is due.
            _ => Phase::Draining {
                until: later(Instant::now(), PIPE_GRACE),
            },
        };
    }

    /// How the attempt ended, once `watch` has returned (the handler is reaped by then).
    fn report(mut self, started: SystemTime, clock: Instant) -> Report {
        debug_assert!(
            self.child.reaped.is_some(),
            "the watch ends with the handler reaped"
        );
        let status = self.child.wait();
        let ended = self.ended;
        let mut report = Report {
            outcome: Outcome::Failed,
            started,
            duration: clock.elapsed(),
            exit_code: None,
            signal: None,
            timed_out: ended == Some(Ended::Timeout),
            reason: String::new(),
            stderr_tail: std::mem::take(&mut self.log.stderr_tail).into(),
        };
        match status {
            Ok(status) => {
                report.exit_code = status.code();
                report.signal = status.signal();
                report.outcome = match ended {
                    Some(Ended::Abort) => Outcome::Aborted,
                    Some(Ended::LeaseLost) => Outcome::LeaseLost,
                    Some(Ended::Timeout) => Outcome::Failed,
                    None if status.success() => Outcome::Succeeded,
                    None => Outcome::Failed,
                };
                report.reason = match ended {
                    Some(Ended::Timeout) => format!(
                        "timed out after {}; {}",
                        humantime::format_duration(self.cfg.timeout),
                        describe_status(status)
                    ),
                    Some(Ended::Abort) => {
                        format!("aborted by a spoold stop; {}", describe_status(status))
                    }
                    Some(Ended::LeaseLost) => {
                        format!("{LEASE_LOST}; {}", describe_status(status))
                    }
                    None => describe_status(status),
                };
            }
            Err(e) => report.reason = format!("lost track of the handler: {e}"),
        }
        report
    }
}

pub(super) fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!(
            "killed by {}",
            Signal::from_named_raw(sig).map_or_else(|| format!("signal {sig}"), signal_name)
        ),
        _ => status.to_string(),
    }
}

/// The conventional name of a signal, as spoold writes it in every log line and reason.
pub fn signal_name(sig: Signal) -> String {
    match sig {
        Signal::TERM => "SIGTERM".into(),
        Signal::KILL => "SIGKILL".into(),
        Signal::INT => "SIGINT".into(),
        Signal::HUP => "SIGHUP".into(),
        Signal::SEGV => "SIGSEGV".into(),
        Signal::ABORT => "SIGABRT".into(),
        Signal::PIPE => "SIGPIPE".into(),
        Signal::BUS => "SIGBUS".into(),
        Signal::ILL => "SIGILL".into(),
        Signal::FPE => "SIGFPE".into(),
        Signal::USR1 => "SIGUSR1".into(),
        Signal::USR2 => "SIGUSR2".into(),
        other => format!("signal {}", other.as_raw()),
    }
}

/// Starts the handler: argv with placeholders filled (never a shell), the environment, stdin,
/// its own process group, and its stdout and stderr on pipes whose read ends it returns.
///
/// It uses `posix_spawn(3)` directly rather than `std::process::Command`, which copies all of
/// spoold's environment into a map, and back into strings, at every spawn that sets a
/// variable; here the environment is prepared once per config. glibc's `posix_spawn` starts the
/// child with `CLONE_VFORK`, as std does, and reports an exec failure as the spawn's error.
fn spawn(
    cfg: &HandlerConfig,
    job: &Job<'_>,
    scratch: &mut Scratch,
) -> Result<(HandlerProcess, OwnedFd, OwnedFd), String> {
    scratch.refresh_env(cfg);
    let scratch = &*scratch;
    let attempt = job.attempt.to_string();
    let argv = cfg
        .command
        .iter()
        .map(|a| fill(a, job, &attempt))
        .collect::<Result<Vec<CString>, String>>()?;
    let cannot_run =
        |e: &dyn std::fmt::Display| format!("cannot run handler {}: {e}", cfg.command[0]);
    let stdin = Stdin::open(cfg.stdin, job, scratch.dev_null.as_ref())?;

    // Close-on-exec, so that no other handler, started meanwhile by another worker, inherits
    // them: only the dup2 below gives the child its ends.
    let pipe = || {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| format!("cannot create a pipe for the handler's output: {e}"))
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // The sources are never 0, 1 or 2, so no dup2 below overwrites a later one's source: std
    // opens /dev/null on any of those that is closed at start-up, and spoold never closes them.
    let mut actions = PosixSpawnFileActions::init().map_err(|e| cannot_run(&e))?;
    for (fd, to) in [(stdin.as_fd(), 0), (out_w.as_fd(), 1), (err_w.as_fd(), 2)] {
        actions
            .add_dup2(fd.as_raw_fd(), to)
            .map_err(|e| cannot_run(&e))?;
    }
    let attr = scratch.attr.as_ref().map_err(|e| cannot_run(e))?;

    let env = scratch.env.as_ref().expect("refreshed above");
    let job_vars = [
        var(b"SPOOLD_JOB_PATH", job.path.as_os_str().as_bytes()),
        var(b"SPOOLD_JOB_ID", job.id.as_bytes()),
        var(b"SPOOLD_ATTEMPT", attempt.as_bytes()),
    ];
    let mut envp: Vec<&CStr> = Vec::with_capacity(env.vars.len() + job_vars.len());
    envp.extend(env.vars.iter().map(CString::as_c_str));
    envp.extend(job_vars.iter().flatten().map(CString::as_c_str));

    let pid = spawn_program(&argv, env, &actions, attr, &envp)
        .map_err(|e| cannot_run(&io::Error::from(e)))?;
    let pgid = Pid::from_raw(pid.as_raw()).expect("a child that was just spawned has a pid");
    Ok((HandlerProcess { pgid, reaped: None }, out_r, err_r))
}

/// Starts a persistent handler (`runner::persistent`): the argv as it is (the config refuses
/// placeholders in this mode), the same environment and process group as an exec-mode handler
/// but no job variables, and pipes on all three standard streams. Returns the process and
/// spoold's ends: stdin's write end, stdout's and stderr's read ends.
pub(super) fn spawn_persistent(
    cfg: &HandlerConfig,
    scratch: &mut Scratch,
) -> Result<(HandlerProcess, OwnedFd, OwnedFd, OwnedFd), String> {
    scratch.refresh_env(cfg);
    let scratch = &*scratch;
    let argv = cfg
        .command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<CString>, _>>()
        .map_err(|_| "the handler command holds a NUL byte".to_owned())?;
    let cannot_run =
        |e: &dyn std::fmt::Display| format!("cannot run handler {}: {e}", cfg.command[0]);
    // Close-on-exec for the same reason as in `spawn`: only the dup2 below hands the child
    // its ends, so no other worker's handler inherits them and holds a pipe open.
    let pipe = || {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| format!("cannot create a pipe for the handler: {e}"))
    };
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let mut actions = PosixSpawnFileActions::init().map_err(|e| cannot_run(&e))?;
    for (fd, to) in [(in_r.as_fd(), 0), (out_w.as_fd(), 1), (err_w.as_fd(), 2)] {
        actions
            .add_dup2(fd.as_raw_fd(), to)
            .map_err(|e| cannot_run(&e))?;
    }
    let attr = scratch.attr.as_ref().map_err(|e| cannot_run(e))?;
    let env = scratch.env.as_ref().expect("refreshed above");
    let envp: Vec<&CStr> = env.vars.iter().map(CString::as_c_str).collect();
    let pid = spawn_program(&argv, env, &actions, attr, &envp)
        .map_err(|e| cannot_run(&io::Error::from(e)))?;
    let pgid = Pid::from_raw(pid.as_raw()).expect("a child that was just spawned has a pid");
    Ok((HandlerProcess { pgid, reaped: None }, in_w, out_r, err_r))
}

/// One argument of the handler's argv: `template` with `{path}`, `{id}` and `{attempt}` filled
/// in for `job`; any other `{` stays as it is.
fn fill(template: &str, job: &Job<'_>, attempt: &str) -> Result<CString, String> {
    let mut out = OsString::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push(&rest[..start]);
        let tail = &rest[start..];
        let (value, len): (&OsStr, usize) = if tail.starts_with("{path}") {
            (job.path.as_os_str(), 6)
        } else if tail.starts_with("{id}") {
            (job.id, 4)
        } else if tail.starts_with("{attempt}") {
            (OsStr::new(attempt), 9)
        } else {
            (OsStr::new("{"), 1)
        };
        out.push(value);
        rest = &tail[len..];
    }
    out.push(rest);
    CString::new(out.into_vec())
        .map_err(|_| format!("the handler command {template:?} holds a NUL byte"))
}

/// The handler's stdin, held open until the spawn has returned, when the child holds its own
/// copy.
enum Stdin<'s> {
    /// The worker's `/dev/null`, which serves every attempt: the child gets a duplicate of it.
    Shared(BorrowedFd<'s>),
    /// A file opened for this attempt alone: the job file, or `/dev/null` when the worker has
    /// none.
    Own(std::fs::File),
}

impl<'s> Stdin<'s> {
    fn open(
        mode: StdinMode,
        job: &Job<'_>,
        dev_null: Option<&'s std::fs::File>,
    ) -> Result<Stdin<'s>, String> {
        match (mode, dev_null) {
            (StdinMode::Null, Some(null)) => Ok(Stdin::Shared(null.as_fd())),
            (StdinMode::Null, None) => std::fs::File::open("/dev/null")
                .map(Stdin::Own)
                .map_err(|e| format!("cannot open /dev/null for the handler's stdin: {e}")),
            (StdinMode::Job, _) => {
                // O_NONBLOCK and O_NOFOLLOW: even if the claimed file were swapped for a FIFO or
                // a link, opening it can neither block a worker nor follow the link.
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(
                        (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
                    )
                    .open(job.path)
                    .map_err(|e| {
                        format!("cannot open the job file for the handler's stdin: {e}")
                    })?;
                if !file.metadata().map_err(|e| e.to_string())?.is_file() {
                    return Err("the job file is not a regular file".into());
                }
                rustix::fs::fcntl_setfl(&file, rustix::fs::OFlags::empty())
                    .map_err(|e| format!("cannot prepare the job file for the handler: {e}"))?;
                Ok(Stdin::Own(file))
            }
        }
    }
}

impl AsFd for Stdin<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stdin::Shared(fd) => *fd,
            Stdin::Own(file) => file.as_fd(),
        }
    }
}

/// Spawns `argv`: a program named with a `/` as it is; a bare name in the PATH that
/// `[handler] env` sets, if it sets one (glibc would search spoold's own: this searches the
/// handler's, as execvp(3) would); else in spoold's PATH, as glibc does.
fn spawn_program(
    argv: &[CString],
    env: &HandlerEnv,
    actions: &PosixSpawnFileActions,
    attr: &PosixSpawnAttr,
    envp: &[&CStr],
) -> nix::Result<nix::unistd::Pid> {
    let program = &argv[0];
    if program.as_bytes().contains(&b'/') {
        nix::spawn::posix_spawn(program.as_c_str(), actions, attr, argv, envp)
    } else if let Some(path) = env.from.get("PATH") {
        spawn_in_path(program, OsStr::new(path), |candidate| {
            nix::spawn::posix_spawn(candidate, actions, attr, argv, envp)
        })
    } else {
        nix::spawn::posix_spawnp(program, actions, attr, argv, envp)
    }
}

/// Tries `spawn` on `program` in each directory of `path` in turn, as execvp(3) does: an empty
/// entry is the working directory; a candidate that is missing, or not a directory on the
/// way, or not executable, is passed over; if none runs, the error is EACCES when some
/// candidate was not executable (the reason a user needs), else the last one.
fn spawn_in_path<T>(
    program: &CStr,
    path: &OsStr,
    mut spawn: impl FnMut(&Path) -> nix::Result<T>,
) -> nix::Result<T> {
    let program = OsStr::from_bytes(program.to_bytes());
    let mut error = Errno::ENOENT;
    let mut denied = false;
    for dir in path.as_bytes().split(|&b| b == b':') {
        let candidate = if dir.is_empty() {
            Path::new(program).to_owned()
        } else {
            Path::new(OsStr::from_bytes(dir)).join(program)
        };
        match spawn(&candidate) {
            Ok(pid) => return Ok(pid),
            Err(
                e @ (Errno::ENOENT
                | Errno::ENOTDIR
                | Errno::ESTALE
                | Errno::ENODEV
                | Errno::ETIMEDOUT),
            ) => error = e,
            Err(Errno::EACCES) => denied = true,
            Err(e) => return Err(e),
        }
    }
    Err(if denied { Errno::EACCES } else { error })
}

/// Adds `fd`, if any, to the poll set; returns its index there.
pub(super) fn slot<'a>(fds: &mut Vec<PollFd<'a>>, fd: Option<BorrowedFd<'a>>) -> Option<usize> {
    fd.map(|fd| {
        fds.push(PollFd::from_borrowed_fd(fd, PollFlags::IN));
        fds.len() - 1
    })
}

/// True while a process of the group lives. `kill(-pgid, 0)` also succeeds for zombies, which
/// only their parent or init can reap, and a slow init (a container's PID 1) may leave them for
/// long: so a group that answers it is looked up in /proc for a member that is not a zombie,
/// provided /proc numbers processes as spoold does (`proc_is_ours`). The common case, an empty
/// group, costs the one `kill`.
pub(super) fn group_alive(pgid: Pid) -> bool {
    if rustix::process::test_kill_process_group(pgid).is_err() {
        return false;
    }
    // Without /proc, or with one that lists another PID namespace's processes, what `kill` said
    // stands. A zombie member then keeps the group "alive" until its SIGKILL at `kill_grace`:
    // bounded, whereas trusting a foreign /proc would find no member and kill none.
    if !proc_is_ours() {
        return true;
    }
    live_member_in_proc(pgid).unwrap_or(true)
}

/// Whether /proc belongs to spoold's own PID namespace, decided once per process: the answer
/// cannot change while it runs, and `group_alive` asks it every `GROUP_CHECK`. A PID namespace
/// entered without a /proc of its own (`unshare --pid --fork` without `--mount-proc`, as some
/// sandboxes and container runtimes start services) sees its parent's /proc, whose pids are not
/// the ones `kill` and spoold's process groups use.
fn proc_is_ours() -> bool {
    static OURS: OnceLock<bool> = OnceLock::new();
    *OURS.get_or_init(|| proc_numbers_us_as(std::process::id()))
}

/// Whether /proc knows this process by `pid`, and in no other namespace's numbering.
fn proc_numbers_us_as(pid: u32) -> bool {
    // /proc/self resolves to the pid that the namespace of the /proc mount gives us; in a
    // foreign /proc that is another number, or nothing if we are not visible there at all.
    let self_link = std::fs::read_link("/proc/self").ok();
    if self_link.and_then(|l| l.to_str()?.parse::<u32>().ok()) != Some(pid) {
        return false;
    }
    // The two numbers can still agree by chance (small pids in nested containers). NSpid lists
    // our pid in each namespace from that of /proc down to our own, so a single entry means they
    // are one namespace. Kernels before 4.1 have no NSpid line; the link's answer stands there.
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .is_none_or(|pids| pids.split_ascii_whitespace().count() == 1)
}

/// Whether /proc lists a process of group `pgid` that is not a zombie; None if /proc cannot be
/// read.
fn live_member_in_proc(pgid: Pid) -> Option<bool> {
    let pgid = pgid.as_raw_nonzero().get();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // A process may end between the listing and the read; it is then not alive.
        if let Some((state, pgrp)) = state_and_group(pid)
            && pgrp == pgid
            && !matches!(state, 'Z' | 'X')
        {
            return Some(true);
        }
    }
    Some(false)
}

/// The state letter and the process group of `pid`, from /proc/PID/stat.
fn state_and_group(pid: &str) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; the fields after the last
    // ')' are state, ppid, pgrp.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

pub(super) fn signal_group(pgid: Pid, sig: Signal) {
    // ESRCH (the group is already gone) is the normal end of the race, not an error.
    let _ = rustix::process::kill_process_group(pgid, sig);
}

/// Logs handler output and keeps the tail of stderr.
struct OutputLog<'a> {
    id: &'a str,
    attempt: u32,
    logged: u64,
    suppressed: u64,
    stderr_tail: VecDeque<String>,
}

impl OutputLog<'_> {
    fn line(&mut self, stream: &'static str, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        if stream == "stderr" {
            if self.stderr_tail.len() == STDERR_TAIL {
                self.stderr_tail.pop_front();
            }
            self.stderr_tail.push_back(text.clone().into_owned());
        }
        if self.logged < MAX_LOGGED_LINES {
            self.logged += 1;
            tracing::info!(job_id = self.id, attempt = self.attempt, stream, "{text}");
        } else {
            self.suppressed += 1;
        }
    }
}

/// Splits a pipe into lines without ever holding more than a fixed amount of it.
struct LineReader<'b, R> {
    src: Option<R>,
    /// The worker's buffer for this stream; what it held from an earlier attempt is never read.
    chunk: &'b mut [u8; CHUNK],
    line: Vec<u8>,
    /// Bytes of the current line dropped past MAX_LINE.
    dropped: usize,
}

impl<'b, R: Read> LineReader<'b, R> {
    fn new(src: Option<R>, chunk: &'b mut [u8; CHUNK]) -> Self {
        Self {
            src,
            chunk,
            line: Vec::new(),
            dropped: 0,
        }
    }

    fn open(&self) -> bool {
        self.src.is_some()
    }

    /// Reads once; called only when poll found the stream readable (or hung up), so the read
    /// returns at once.
    fn fill(&mut self) -> io::Result<usize> {
        loop {
            match &mut self.src {
                Some(src) => match src.read(&mut self.chunk[..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => return r,
                },
                None => return Ok(0),
            }
        }
    }

    /// Hands each complete line of what `fill` read to `emit`; at end of stream (or error) it
    /// flushes a last partial line and closes.
    fn take_lines(&mut self, read: io::Result<usize>, mut emit: impl FnMut(&[u8])) {
        let n = match read {
            Ok(0) | Err(_) => {
                if !self.line.is_empty() || self.dropped > 0 {
                    emit_line(&mut self.line, &mut self.dropped, &mut emit);
                }
                self.src = None;
                return;
            }
            Ok(n) => n,
        };
        let mut data = &self.chunk[..n];
        while !data.is_empty() {
            let (part, newline) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], true),
                None => (data, false),
            };
            let room = MAX_LINE.saturating_sub(self.line.len());
            let take = room.min(part.len());
            self.line.extend_from_slice(&part[..take]);
            self.dropped += part.len() - take;
            data = &data[part.len() + usize::from(newline)..];
            if newline {
                emit_line(&mut self.line, &mut self.dropped, &mut emit);
            }
        }
    }
}

impl<R: AsFd> LineReader<'_, R> {
    /// The descriptor to poll while the stream is open.
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.src.as_ref().map(AsFd::as_fd)
    }
}

pub(super) fn emit_line(line: &mut Vec<u8>, dropped: &mut usize, emit: &mut impl FnMut(&[u8])) {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if *dropped > 0 {
        let note = format!(" [... {dropped} more bytes of this line dropped]");
        line.extend_from_slice(note.as_bytes());
    }
    emit(line);
    line.clear();
    *dropped = 0;
}

/// glibc's search path for `posix_spawnp` when the environment has no PATH (`confstr(_CS_PATH)`).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// Checks that the handler program can be run, looking it up exactly as a spawn does: a name
/// with a `/` as it is, a bare name in `[handler] env`'s PATH when it sets one, else in
/// spoold's own. `check-config` and `spoold run` at start-up warn with the problem returned,
/// one that names the program and, for a bare name, the PATH searched. It tells "not found"
/// from "not executable" as execvp(3) would: a candidate without the execute permission (for
/// this user) is passed over, and is the reason given when no other candidate runs.
pub fn check_program(cfg: &HandlerConfig) -> Result<(), String> {
    let program = &cfg.command[0];
    let runnable = |candidate: &Path| -> nix::Result<()> {
        let raw = |e: rustix::io::Errno| Errno::from_raw(e.raw_os_error());
        let stat = rustix::fs::stat(candidate).map_err(raw)?;
        // execve(2) refuses anything but a regular file with EACCES, a directory included.
        if !rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file() {
            return Err(Errno::EACCES);
        }
        rustix::fs::accessat(
            rustix::fs::CWD,
            candidate,
            rustix::fs::Access::EXEC_OK,
            rustix::fs::AtFlags::EACCESS,
        )
        .map_err(raw)
    };
    let (result, searched) = if program.contains('/') {
        (runnable(Path::new(program)), None)
    } else {
        let (path, whose) = match cfg.env.get("PATH") {
            Some(path) => (OsString::from(path), "[handler] env's PATH"),
            None => match std::env::var_os("PATH") {
                Some(path) => (path, "spoold's PATH"),
                None => (OsString::from(DEFAULT_PATH), "the default PATH"),
            },
        };
        // The config refuses a NUL byte in handler.command, so this conversion cannot fail.
        let name = CString::new(program.as_bytes()).map_err(|e| e.to_string())?;
        (
            spawn_in_path(&name, &path, runnable),
            Some(format!(" in {whose} {}", path.to_string_lossy())),
        )
    };
    let searched = searched.unwrap_or_default();
    match result {
        Ok(()) => Ok(()),
        Err(Errno::EACCES) => Err(format!(
            "handler program {program} is not executable by this user{searched} \
             (Permission denied)"
        )),
        Err(e @ (Errno::ENOENT | Errno::ENOTDIR)) => Err(format!(
            "handler program {program} is not found{searched} ({})",
            e.desc()
        )),
        Err(e) => Err(format!(
            "handler program {program} cannot be run{searched} ({})",
            e.desc()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn lines_of(chunks: &[&[u8]]) -> Vec<String> {
        let mut buf = [0; CHUNK];
        let mut r: LineReader<std::io::Empty> = LineReader::new(Some(std::io::empty()), &mut buf);
        let mut out = Vec::new();
        for c in chunks {
            r.chunk[..c.len()].copy_from_slice(c);
            r.take_lines(Ok(c.len()), |l| {
                out.push(String::from_utf8_lossy(l).into_owned())
            });
        }
        r.take_lines(Ok(0), |l| out.push(String::from_utf8_lossy(l).into_owned()));
        assert!(!r.open());
        out
    }

    /// The loop may ask for the handler's status again after it has been reaped (a failed
    /// poll while the pipes drain): it must get the same status, not a second `waitpid`, which
    /// could reap another worker's handler that reuses the PID.
    #[test]
    #[expect(
        clippy::zombie_processes,
        reason = "the HandlerProcess under test reaps it"
    )]
    fn a_handler_is_reaped_once_and_its_status_kept() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let mut handler = HandlerProcess {
            pgid: Pid::from_raw(child.id() as i32).unwrap(),
            reaped: None,
        };
        assert_eq!(handler.wait().unwrap().code(), Some(7));
        assert_eq!(handler.wait().unwrap().code(), Some(7));
    }

    /// A group whose only member is a zombie answers `kill(-pgid, 0)`, but nothing in it lives:
    /// spoold must not wait for it (a slow init may leave zombies for long).
    #[test]
    fn a_group_of_zombies_is_not_alive() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = Pid::from_raw(child.id() as i32).unwrap();
        assert!(group_alive(pgid), "a sleeping member is alive");
        signal_group(pgid, Signal::KILL);
        // Not reaped yet: wait until the kernel has made it a zombie.
        let zombie = (0..3000).any(|_| {
            let (state, _) = state_and_group(&child.id().to_string()).unwrap();
            std::thread::sleep(Duration::from_millis(1));
            state == 'Z'
        });
        assert!(zombie, "the killed child became a zombie");
        assert!(
            rustix::process::test_kill_process_group(pgid).is_ok(),
            "kill(-pgid, 0) still answers for a zombie"
        );
        assert!(
            proc_is_ours(),
            "the unit tests run with a /proc of their own PID namespace"
        );
        assert!(!group_alive(pgid), "but the group has no live member");
        child.wait().unwrap();
        assert!(!group_alive(pgid));
    }

    /// /proc is trusted only if it knows this process by its own pid: another number is what a
    /// parent namespace's /proc would show.
    #[test]
    fn proc_that_numbers_us_otherwise_is_not_ours() {
        assert!(proc_numbers_us_as(std::process::id()));
        assert!(!proc_numbers_us_as(std::process::id() + 1));
    }

    #[test]
    fn lines_split_across_reads_and_partial_last_line() {
        assert_eq!(lines_of(&[b"ab", b"c\nd\r\n", b"e"]), vec!["abc", "d", "e"]);
    }

    #[test]
    fn long_lines_are_cut_with_a_note() {
        let big = vec![b'x'; 8000];
        let out = lines_of(&[&big, &big, b"\nok\n"]);
        assert_eq!(out.len(), 2);
        assert!(out[0].starts_with(&"x".repeat(MAX_LINE)));
        assert!(
            out[0].ends_with("[... 11904 more bytes of this line dropped]"),
            "{}",
            &out[0][4096..]
        );
        assert_eq!(out[1], "ok");
    }
}
