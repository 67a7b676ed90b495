//! Persistent handlers (`handler.mode = "persistent"`): one long-lived handler process per
//! worker, given each job as a JSON line on its stdin and answering with one on its stdout.
//!
//! The process starts from the argv as it is, in its own process group, with exec mode's
//! environment (less the job variables). Per job, spoold writes
//! `{"id":…,"path":…,"attempt":N}` (with `id_hex` and `path_hex` when a name is not UTF-8 or
//! holds a control character, and then a `path` under `/proc/PID/fd/` that spoold holds open on
//! the claimed file) and waits for `{"id":…,"status":N,"reason":…}`; `status` means what an
//! exit status means in exec mode. stderr is logged line by line with the ID of the job in
//! flight, in bounded memory.
//!
//! Every exec-mode guarantee holds, and all waits are one `poll(2)` on the worker's thread, as
//! in `handler`: the time limit (SIGTERM to the group, SIGKILL after `kill_grace`, a fresh
//! process for the next job), the abort and the lost lease, a handler that exits, crashes,
//! answers for another job or writes garbage (the attempt fails with that reason; the handler
//! is restarted after a delay that doubles with each failure in a row, so one that cannot start
//! does not burn the CPU), and a drain (stdin closed, `kill_grace` to exit, then SIGKILL).
//! spoold's end of the stdin pipe is non-blocking and written only when poll says so, so a
//! handler that stops reading can never hold up a stop.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{PidfdFlags, Signal};
use serde::{Deserialize, Serialize};

use super::handler::{
    Abort, CHUNK, GROUP_CHECK, HandlerProcess, MAX_LINE, MAX_LOGGED_LINES, PIPE_GRACE, STDERR_TAIL,
    Scratch, describe_status, emit_line, group_alive, signal_group, slot, spawn_persistent,
};
use crate::clock::later;
use crate::config::HandlerConfig;
use crate::job::{Job, Outcome, Report, display_name, escape_text};

/// The longest answer line spoold reads; a longer one is garbage, and memory stays bounded.
const MAX_ANSWER: usize = 64 * 1024;
/// The delay before the first restart of a handler that failed; it doubles with each failure
/// in a row, up to `RESTART_MAX`, and a valid answer resets it.
const RESTART_INITIAL: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(30);

/// A worker's persistent handler, if it runs, and how soon it may be started again.
pub struct Persistent {
    live: Option<Live>,
    /// Failures in a row (exits, crashes, protocol violations, failed starts).
    failures: u32,
    /// No start before this instant.
    restart_at: Option<Instant>,
    /// The buffer every read of the handler's pipes goes through.
    chunk: Box<[u8; CHUNK]>,
}

/// The running handler process and spoold's ends of its pipes.
struct Live {
    child: HandlerProcess,
    /// Readable once the handler has exited.
    pidfd: OwnedFd,
    /// Non-blocking; None once closed (a drain).
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    out: Lines,
    err: Lines,
    /// The first line it wrote on stdout beyond an answer, or outside any job: it is restarted
    /// before the next job, which it would otherwise answer with a stale line.
    stray: Option<String>,
    /// The settings it was started with: a reload that changes them restarts it between jobs.
    command: Vec<String>,
    env: BTreeMap<String, String>,
}

/// A line being assembled from a pipe: at most `max` bytes are kept, the rest counted.
struct Lines {
    line: Vec<u8>,
    dropped: usize,
    max: usize,
}

impl Lines {
    fn new(max: usize) -> Lines {
        Lines {
            line: Vec::new(),
            dropped: 0,
            max,
        }
    }

    /// Hands each complete line in `data` to `emit` with the count of its bytes dropped.
    fn feed(&mut self, mut data: &[u8], emit: &mut impl FnMut(&mut Vec<u8>, usize)) {
        while !data.is_empty() {
            let (part, newline) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], true),
                None => (data, false),
            };
            let take = self.max.saturating_sub(self.line.len()).min(part.len());
            self.line.extend_from_slice(&part[..take]);
            self.dropped += part.len() - take;
            data = &data[part.len() + usize::from(newline)..];
            if newline {
                self.emit(emit);
            }
        }
    }

    /// At the end of the stream: a last line without a newline.
    fn flush(&mut self, emit: &mut impl FnMut(&mut Vec<u8>, usize)) {
        if !self.line.is_empty() || self.dropped > 0 {
            self.emit(emit);
        }
    }

    fn emit(&mut self, emit: &mut impl FnMut(&mut Vec<u8>, usize)) {
        emit(&mut self.line, self.dropped);
        self.line.clear();
        self.dropped = 0;
    }

    fn pending(&self) -> bool {
        !self.line.is_empty() || self.dropped > 0
    }
}

/// Where the handler's stderr lines go: the log, with the job in flight if any, and the tail
/// kept for the job's failure record.
struct Sink<'a> {
    job: Option<(&'a str, u32)>,
    logged: u64,
    suppressed: u64,
    tail: VecDeque<String>,
}

impl<'a> Sink<'a> {
    fn new(job: Option<(&'a str, u32)>) -> Sink<'a> {
        Sink {
            job,
            logged: 0,
            suppressed: 0,
            tail: VecDeque::new(),
        }
    }

    fn line(&mut self, stream: &'static str, line: &mut Vec<u8>, dropped: usize) {
        let mut dropped = dropped;
        emit_line(line, &mut dropped, &mut |l: &[u8]| {
            let text = String::from_utf8_lossy(l);
            if stream == "stderr" {
                if self.tail.len() == STDERR_TAIL {
                    self.tail.pop_front();
                }
                self.tail.push_back(text.clone().into_owned());
            }
            if self.logged >= MAX_LOGGED_LINES {
                self.suppressed += 1;
                return;
            }
            self.logged += 1;
            match self.job {
                Some((id, attempt)) => tracing::info!(job_id = id, attempt, stream, "{text}"),
                None => tracing::info!(stream, "persistent handler, between jobs: {text}"),
            }
        });
    }

    fn finish(&self) {
        if self.suppressed > 0 {
            tracing::warn!(
                job_id = self.job.map(|j| j.0),
                "{} more lines of handler output were not logged (at most {MAX_LOGGED_LINES} \
                 lines are logged per job)",
                self.suppressed
            );
        }
    }
}

/// What the handler is told about a job.
#[derive(Serialize)]
struct Request<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id_hex: Option<String>,
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    path_hex: Option<String>,
    attempt: u32,
}

/// What the handler answers. Other fields are ignored, so that handlers may say more.
#[derive(Deserialize)]
struct Answer {
    id: String,
    status: i64,
    #[serde(default)]
    reason: Option<String>,
}

/// Why the job's wait ended, other than by an answer.
#[derive(Debug)]
enum Ended {
    Timeout,
    Abort,
    LeaseLost,
    /// The handler broke the protocol, or closed a pipe it must keep: the reason.
    Broken(String),
    /// The handler exited by itself (already reaped).
    Exited,
    /// The handler exited by itself (already reaped) before it had read any of the job's
    /// line, or closed its stdin, on its way out, before any of the line got in: it never had
    /// the job. A handler that ends itself after so many jobs, as many do, can be handed the
    /// next in the instant before its exit is seen.
    ExitedUnread,
}

/// How a teardown begins.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// SIGTERM to the group now.
    Term,
    /// Close the handler's stdin and let it exit by itself (a drain, a reload).
    Close,
    /// The handler has exited; only its group is left to end.
    Exited,
}

fn clean(text: &str) -> bool {
    !text.chars().any(char::is_control)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The restart delay after `failures` failures in a row.
fn restart_delay(failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
    RESTART_INITIAL.saturating_mul(factor).min(RESTART_MAX)
}

/// Reads once from a pipe poll found ready; Ok(0) at its end.
fn read_some(fd: &OwnedFd, chunk: &mut [u8]) -> rustix::io::Result<usize> {
    loop {
        match rustix::io::read(fd, &mut *chunk) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r,
        }
    }
}

fn timespec(from: Instant, to: Instant) -> Timespec {
    Timespec::try_from(to.saturating_duration_since(from)).unwrap_or(Timespec {
        tv_sec: i64::MAX,
        tv_nsec: 0,
    })
}

impl Default for Persistent {
    fn default() -> Self {
        Self::new()
    }
}

impl Persistent {
    pub fn new() -> Persistent {
        Persistent {
            live: None,
            failures: 0,
            restart_at: None,
            chunk: Box::new([0; CHUNK]),
        }
    }

    /// True while a restart waits for its delay: a handler that keeps failing.
    pub fn restarting(&self) -> bool {
        self.live.is_none() && self.failures > 0
    }

    /// Gets the handler ready for the next job, between jobs: restarts it if `cfg` changed
    /// since it started, ends it if it wrote to stdout or exited while no job was in flight,
    /// and starts it if none runs and no restart delay is pending. Returns when the next start
    /// may be tried if no handler runs after this.
    pub fn prepare(
        &mut self,
        cfg: &HandlerConfig,
        abort: &Abort,
        scratch: &mut Scratch,
    ) -> Option<Instant> {
        if let Some(live) = &self.live
            && (live.command != cfg.command || live.env != cfg.env)
        {
            tracing::info!("the handler config changed: restarting the persistent handler");
            self.teardown(Start::Close, cfg, abort, &mut Sink::new(None));
            self.restart_at = None;
            self.failures = 0;
        }
        self.look_between_jobs(cfg, abort);
        // No handler starts after the abort: it would only be ended again, and its teardown
        // would take a kill_grace of its own past the one the stop allows for.
        if self.live.is_none() && !abort.raised() {
            let now = Instant::now();
            if let Some(at) = self.restart_at.filter(|at| *at > now) {
                return Some(at);
            }
            match self.start(cfg, scratch) {
                Ok(()) => {}
                Err(reason) => {
                    self.failed(&format!("cannot start the persistent handler: {reason}"));
                    return self.restart_at;
                }
            }
        }
        None
    }

    fn start(&mut self, cfg: &HandlerConfig, scratch: &mut Scratch) -> Result<(), String> {
        let (child, stdin, stdout, stderr) = spawn_persistent(cfg, scratch)?;
        // Without a pidfd the handler cannot be watched: dropping `child` kills and reaps it.
        let pidfd = rustix::process::pidfd_open(child.pgid, PidfdFlags::empty())
            .map_err(|e| format!("cannot watch the handler (pidfd_open): {e}"))?;
        rustix::fs::fcntl_setfl(&stdin, rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| format!("cannot make the handler's stdin non-blocking: {e}"))?;
        tracing::info!(
            pid = child.pgid.as_raw_nonzero().get(),
            "persistent handler started"
        );
        self.live = Some(Live {
            child,
            pidfd,
            stdin: Some(stdin),
            stdout: Some(stdout),
            stderr: Some(stderr),
            out: Lines::new(MAX_ANSWER),
            err: Lines::new(MAX_LINE),
            stray: None,
            command: cfg.command.clone(),
            env: cfg.env.clone(),
        });
        Ok(())
    }

    /// Counts a failure, logs it with the delay before the next start, and sets that delay.
    fn failed(&mut self, what: &str) {
        self.failures = self.failures.saturating_add(1);
        let delay = restart_delay(self.failures);
        self.restart_at = Some(later(Instant::now(), delay));
        tracing::warn!(
            failures_in_a_row = self.failures,
            "{what}; restarting it in {} (the delay doubles with each failure in a row)",
            humantime::format_duration(delay)
        );
    }

    /// Looks at a running handler while its worker waits for a job ([`look_between_jobs`]);
    /// true if the handler had to be ended, so that the worker restarts it now.
    ///
    /// [`look_between_jobs`]: Persistent::look_between_jobs
    pub fn ended_while_idle(&mut self, cfg: &HandlerConfig, abort: &Abort) -> bool {
        if self.live.is_none() {
            return false;
        }
        self.look_between_jobs(cfg, abort);
        self.live.is_none()
    }

    /// Looks, without waiting, at what the handler did while no job was in flight: stderr is
    /// logged; a line on stdout, or its exit, ends it and counts as a failure.
    fn look_between_jobs(&mut self, cfg: &HandlerConfig, abort: &Abort) {
        let Some(live) = &mut self.live else { return };
        let mut sink = Sink::new(None);
        let mut exited = false;
        // A few rounds at most: a handler that floods stderr between jobs is read during the
        // next job, not here.
        for _ in 0..4 {
            let mut fds = Vec::with_capacity(3);
            let out_at = slot(&mut fds, live.stdout.as_ref().map(AsFd::as_fd));
            let err_at = slot(&mut fds, live.stderr.as_ref().map(AsFd::as_fd));
            let exit_at = slot(&mut fds, Some(live.pidfd.as_fd()));
            let zero = Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            if rustix::event::poll(&mut fds, Some(&zero)).unwrap_or(0) == 0 {
                break;
            }
            let ready = |at: Option<usize>| at.is_some_and(|i| !fds[i].revents().is_empty());
            let (out, err, exit) = (ready(out_at), ready(err_at), ready(exit_at));
            drop(fds);
            if err {
                live.read_stderr(&mut self.chunk[..], &mut sink);
            }
            if out {
                live.read_stray(&mut self.chunk[..]);
            }
            if exit {
                exited = true;
                break;
            }
        }
        sink.finish();
        let broken = if exited {
            let status = describe_status_of(live);
            Some((
                Start::Exited,
                format!("the persistent handler exited between jobs ({status})"),
            ))
        } else {
            live.stray
                .take()
                .or_else(|| {
                    live.out
                        .pending()
                        .then(|| String::from_utf8_lossy(&live.out.line).into_owned())
                })
                .map(|line| {
                    (
                        Start::Term,
                        format!(
                            "the persistent handler wrote to stdout with no job in flight ({:?})",
                            escape_text(&cut(&line))
                        ),
                    )
                })
        };
        if let Some((start, what)) = broken {
            self.teardown(start, cfg, abort, &mut Sink::new(None));
            self.failed(&what);
        }
    }

    /// Ends the handler if one runs: stdin closed, `kill_grace` to exit, then SIGKILL to its
    /// group; an abort meanwhile sends SIGTERM at once. For a stop, a shrink, or a switch to
    /// exec mode.
    pub fn shutdown(&mut self, cfg: &HandlerConfig, abort: &Abort) {
        if self.live.is_some() {
            self.teardown(Start::Close, cfg, abort, &mut Sink::new(None));
            tracing::info!("persistent handler ended");
        }
        self.restart_at = None;
        self.failures = 0;
    }

    /// Runs one attempt of `job` on the handler, blocking the worker's thread until it is
    /// answered or ended. `prepare` has run just before the job was claimed; it runs again here,
    /// since a reload may have come while the worker waited for a job.
    pub fn run(
        &mut self,
        cfg: &HandlerConfig,
        job: &Job<'_>,
        abort: &Abort,
        revoked: Option<BorrowedFd<'_>>,
        scratch: &mut Scratch,
    ) -> Report {
        let clock = Instant::now();
        let mut report = Report::without_run(String::new());
        if self.prepare(cfg, abort, scratch).is_some() || self.live.is_none() {
            // The job never reached a handler: it goes back, and the attempt does not count.
            tracing::warn!(
                job_id = job.shown,
                attempt = job.attempt,
                "no persistent handler is running (see above why); the job goes back to wait for it"
            );
            report.outcome = Outcome::Aborted;
            report.reason = "the persistent handler is not running (see the log for why); the \
                             job goes back to the queue"
                .into();
            report.duration = clock.elapsed();
            return report;
        }
        let (line, _held) = match request(job) {
            Ok(request) => request,
            Err(reason) => {
                report.reason = reason;
                report.duration = clock.elapsed();
                return report;
            }
        };
        let mut sink = Sink::new(Some((job.shown, job.attempt)));
        let expected = request_id(job);
        let ended = self.exchange(cfg, &line, &expected, abort, revoked, clock, &mut sink);
        match ended {
            Ok(answer) => {
                self.failures = 0;
                let status = answer.status as i32;
                report.exit_code = Some(status);
                report.outcome = if status == 0 {
                    Outcome::Succeeded
                } else {
                    Outcome::Failed
                };
                report.reason = match answer.reason {
                    Some(r) if !r.is_empty() => format!("exit status {status}: {}", cut(&r)),
                    _ => format!("exit status {status}"),
                };
            }
            Err(why) => {
                let start = match why {
                    Ended::Exited | Ended::ExitedUnread => Start::Exited,
                    _ => Start::Term,
                };
                let status = self.teardown(start, cfg, abort, &mut sink);
                let said = status.map_or_else(
                    || "its status is unknown".to_owned(),
                    |s| describe_status(s).to_string(),
                );
                if let Some(s) = status {
                    report.signal = s.signal();
                }
                match why {
                    Ended::Timeout => {
                        report.timed_out = true;
                        report.reason = format!(
                            "timed out after {}; the persistent handler was {said}",
                            humantime::format_duration(cfg.timeout)
                        );
                        // A fresh process serves the next job, without delay.
                        self.restart_at = None;
                    }
                    Ended::Abort => {
                        report.outcome = Outcome::Aborted;
                        report.reason =
                            format!("aborted by a spoold stop; the persistent handler: {said}");
                    }
                    Ended::LeaseLost => {
                        report.outcome = Outcome::LeaseLost;
                        report.reason =
                            format!("{}; the persistent handler: {said}", super::LEASE_LOST);
                    }
                    Ended::Broken(reason) => {
                        report.reason = format!("{reason}; the persistent handler: {said}");
                        self.failed(&format!("job {}: {}", job.shown, report.reason));
                    }
                    Ended::Exited => {
                        report.reason =
                            format!("the persistent handler exited before answering: {said}");
                        self.failed(&format!("job {}: {}", job.shown, report.reason));
                    }
                    Ended::ExitedUnread => {
                        // Not an attempt: the job goes back, as when no handler runs.
                        report.outcome = Outcome::Aborted;
                        report.reason = format!(
                            "the persistent handler exited before it read the job ({said}); the \
                             job goes back, and the attempt does not count"
                        );
                        self.failed(&format!(
                            "the persistent handler exited before it read job {} ({said})",
                            job.shown
                        ));
                    }
                }
            }
        }
        sink.finish();
        report.stderr_tail = sink.tail.into();
        report.duration = clock.elapsed();
        report
    }

    /// Writes the job's line and waits for its answer, reading stderr meanwhile; the time
    /// limit, the abort and the lost lease end the wait.
    #[expect(
        clippy::too_many_arguments,
        reason = "one attempt's inputs, each distinct"
    )]
    fn exchange(
        &mut self,
        cfg: &HandlerConfig,
        line: &[u8],
        expected: &str,
        abort: &Abort,
        revoked: Option<BorrowedFd<'_>>,
        clock: Instant,
        sink: &mut Sink<'_>,
    ) -> Result<Answer, Ended> {
        let live = self.live.as_mut().expect("prepare started it");
        let deadline = later(clock, cfg.timeout);
        let mut written = 0;
        // When stdout closed: the handler is usually exiting, and its exit, the more useful
        // reason, is awaited for a moment before the closed pipe is blamed.
        let mut closed_at: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Ended::Timeout);
            }
            if closed_at.is_some_and(|at| now >= later(at, PIPE_GRACE)) {
                return Err(Ended::Broken(
                    "the handler closed its stdout without answering".into(),
                ));
            }
            let until = closed_at.map_or(deadline, |at| deadline.min(later(at, PIPE_GRACE)));
            let writing = written < line.len();
            let mut fds = Vec::with_capacity(6);
            let in_at = live.stdin.as_ref().filter(|_| writing).map(|fd| {
                fds.push(PollFd::from_borrowed_fd(fd.as_fd(), PollFlags::OUT));
                fds.len() - 1
            });
            let out_at = slot(&mut fds, live.stdout.as_ref().map(AsFd::as_fd));
            let err_at = slot(&mut fds, live.stderr.as_ref().map(AsFd::as_fd));
            let exit_at = slot(&mut fds, Some(live.pidfd.as_fd()));
            let abort_at = slot(&mut fds, Some(abort.fd.as_fd()));
            let revoked_at = slot(&mut fds, revoked);
            match rustix::event::poll(&mut fds, Some(&timespec(now, until))) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(Ended::Broken(format!("poll failed: {e}"))),
            }
            let ready = |at: Option<usize>| at.is_some_and(|i| !fds[i].revents().is_empty());
            let (input, out, err, exit, aborted, lost) = (
                ready(in_at),
                ready(out_at),
                ready(err_at),
                ready(exit_at),
                ready(abort_at),
                ready(revoked_at),
            );
            drop(fds);
            if err {
                live.read_stderr(&mut self.chunk[..], sink);
            }
            // An answer written just before an exit, an abort or a lost lease still counts. It
            // may take several reads (up to `MAX_ANSWER`, a chunk at a time), and an exit seen
            // in this same poll ends the wait for more: whatever is in the pipe now is read now.
            if out {
                let mut reads = 0;
                loop {
                    match live.read_answer(&mut self.chunk[..], expected) {
                        Ok(Some(answer)) => {
                            live.drain_stderr(&mut self.chunk[..], sink);
                            return Ok(answer);
                        }
                        Ok(None) => {}
                        Err(Ended::Exited) => {
                            closed_at = Some(now);
                            break;
                        }
                        Err(broken) => return Err(broken),
                    }
                    reads += 1;
                    if reads > MAX_ANSWER / self.chunk.len() || !live.stdout_has_more() {
                        break;
                    }
                }
            }
            if exit {
                let _ = live.child.wait();
                // What the handler left unread of its stdin: the job's line, whole, when it
                // never read it (the lines before it were read, since they were answered).
                let unread = live
                    .stdin
                    .as_ref()
                    .and_then(|fd| rustix::io::ioctl_fionread(fd).ok());
                if written == 0 || unread == Some(written as u64) {
                    return Err(Ended::ExitedUnread);
                }
                return Err(Ended::Exited);
            }
            if aborted {
                return Err(Ended::Abort);
            }
            if lost {
                return Err(Ended::LeaseLost);
            }
            if input && let Some(stdin) = &live.stdin {
                match rustix::io::write(stdin, &line[written..]) {
                    Ok(n) => written += n,
                    Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                    // Closed before a byte of the job got in: a handler on its way out (one
                    // that recycles itself), whose exit is not seen yet. Its teardown waits
                    // for that exit (and kills it after kill_grace if it does not come).
                    Err(rustix::io::Errno::PIPE) if written == 0 => {
                        return Err(Ended::ExitedUnread);
                    }
                    Err(e) => {
                        return Err(Ended::Broken(format!(
                            "cannot write the job to the handler's stdin ({e}): it closed it"
                        )));
                    }
                }
            }
        }
    }

    /// Ends the handler and its group: SIGTERM (or, for `Close`, its stdin closed) now,
    /// SIGKILL at `kill_grace`; members left after the handler exits get the same. Output read
    /// meanwhile goes to `sink`. An abort during a `Close` sends SIGTERM at once. Returns how the
    /// handler ended, once nothing of its group lives (or all of it has had SIGKILL).
    fn teardown(
        &mut self,
        start: Start,
        cfg: &HandlerConfig,
        abort: &Abort,
        sink: &mut Sink<'_>,
    ) -> Option<ExitStatus> {
        let mut live = self.live.take()?;
        let pgid = live.child.pgid;
        let kill_at = later(Instant::now(), cfg.kill_grace);
        let mut termed = false;
        let mut killed = false;
        match start {
            Start::Term => {
                signal_group(pgid, Signal::TERM);
                termed = true;
            }
            Start::Close => live.stdin = None,
            Start::Exited => {}
        }
        loop {
            let reaped = live.child.reaped.is_some();
            if reaped {
                if killed || !group_alive(pgid) {
                    break;
                }
                if !termed {
                    signal_group(pgid, Signal::TERM);
                    termed = true;
                }
            }
            let now = Instant::now();
            if !killed && now >= kill_at {
                signal_group(pgid, Signal::KILL);
                killed = true;
                continue;
            }
            let mut fds = Vec::with_capacity(4);
            let out_at = slot(&mut fds, live.stdout.as_ref().map(AsFd::as_fd));
            let err_at = slot(&mut fds, live.stderr.as_ref().map(AsFd::as_fd));
            let exit_at = slot(&mut fds, (!reaped).then(|| live.pidfd.as_fd()));
            let abort_at = slot(&mut fds, (!termed).then(|| abort.fd.as_fd()));
            let until = match (killed, reaped) {
                (true, _) => None,
                (false, true) => Some(kill_at.min(later(now, GROUP_CHECK))),
                (false, false) => Some(kill_at),
            };
            let timeout = until.map(|t| timespec(now, t));
            if let Err(e) = rustix::event::poll(&mut fds, timeout.as_ref())
                && e != rustix::io::Errno::INTR
            {
                tracing::error!("poll failed while ending the persistent handler: {e}");
                signal_group(pgid, Signal::KILL);
                let _ = live.child.wait();
                break;
            }
            let ready = |at: Option<usize>| at.is_some_and(|i| !fds[i].revents().is_empty());
            let (out, err, exit, aborted) = (
                ready(out_at),
                ready(err_at),
                ready(exit_at),
                ready(abort_at),
            );
            drop(fds);
            if out {
                live.read_output(&mut self.chunk[..], sink);
            }
            if err {
                live.read_stderr(&mut self.chunk[..], sink);
            }
            if exit {
                let _ = live.child.wait();
            }
            if aborted {
                signal_group(pgid, Signal::TERM);
                termed = true;
            }
        }
        live.child.wait().ok()
    }
}

/// The status of a reaped handler in words.
fn describe_status_of(live: &mut Live) -> String {
    live.child
        .wait()
        .map_or_else(|e| format!("lost track of it: {e}"), describe_status)
}

/// At most 1,000 characters of a handler's text, for a reason.
fn cut(text: &str) -> String {
    match text.char_indices().nth(1000) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// The `id` the handler gets, and must answer with: the name itself when it is clean UTF-8,
/// else its escaped form (`job::display_name`), with the bytes in `id_hex`.
fn request_id(job: &Job<'_>) -> String {
    match job.id.to_str() {
        Some(id) if clean(id) => id.to_owned(),
        _ => display_name(job.id),
    }
}

/// The job's line, and the descriptor that keeps its `/proc/PID/fd/N` path valid, if it needs
/// one.
fn request(job: &Job<'_>) -> Result<(Vec<u8>, Option<std::fs::File>), String> {
    let id = request_id(job);
    let id_hex = (job.id.to_str() != Some(id.as_str())).then(|| hex(job.id.as_bytes()));
    let (path, path_hex, held) = match job.path.to_str() {
        Some(path) if clean(path) => (path.to_owned(), None, None),
        _ => {
            // No JSON string can carry these bytes as a path to open, so the handler gets a
            // path spoold controls: its own descriptor of the claimed file, which opens that
            // very file for as long as the attempt lasts. O_NOFOLLOW and O_NONBLOCK, as for
            // stdin = "job": a swapped-in link or FIFO can neither redirect it nor block.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(
                    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32,
                )
                .open(job.path)
                .map_err(|e| format!("cannot open the job file to pass it to the handler: {e}"))?;
            let path = format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd());
            (path, Some(hex(job.path.as_os_str().as_bytes())), Some(file))
        }
    };
    let mut line = serde_json::to_vec(&Request {
        id: &id,
        id_hex,
        path: &path,
        path_hex,
        attempt: job.attempt,
    })
    .map_err(|e| format!("cannot write the job as JSON: {e}"))?;
    line.push(b'\n');
    Ok((line, held))
}

impl Live {
    fn read_stderr(&mut self, chunk: &mut [u8], sink: &mut Sink<'_>) {
        let Some(fd) = &self.stderr else { return };
        let mut emit = |line: &mut Vec<u8>, dropped| sink.line("stderr", line, dropped);
        match read_some(fd, chunk) {
            Ok(0) | Err(_) => {
                self.err.flush(&mut emit);
                self.stderr = None;
            }
            Ok(n) => self.err.feed(&chunk[..n], &mut emit),
        }
    }

    /// Reads what stderr holds now, without waiting: what the handler wrote before its answer
    /// is the job's, and is logged with its ID. A pipe holds at most a few reads' worth, but a
    /// handler writing on is cut off after 64 reads, so that an answer is never held up.
    fn drain_stderr(&mut self, chunk: &mut [u8], sink: &mut Sink<'_>) {
        for _ in 0..64 {
            let Some(fd) = &self.stderr else { return };
            let mut fds = [PollFd::from_borrowed_fd(fd.as_fd(), PollFlags::IN)];
            let zero = Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            if rustix::event::poll(&mut fds, Some(&zero)).unwrap_or(0) == 0 {
                return;
            }
            self.read_stderr(chunk, sink);
        }
    }

    /// Reads stdout outside a job's wait (a teardown): logged, not parsed.
    fn read_output(&mut self, chunk: &mut [u8], sink: &mut Sink<'_>) {
        let Some(fd) = &self.stdout else { return };
        let mut emit = |line: &mut Vec<u8>, _dropped| {
            line.truncate(MAX_LINE);
            sink.line("stdout", line, 0)
        };
        match read_some(fd, chunk) {
            Ok(0) | Err(_) => {
                self.out.flush(&mut emit);
                self.stdout = None;
            }
            Ok(n) => self.out.feed(&chunk[..n], &mut emit),
        }
    }

    /// Reads stdout between jobs: any line is a stray one.
    fn read_stray(&mut self, chunk: &mut [u8]) {
        let Some(fd) = &self.stdout else { return };
        let stray = &mut self.stray;
        let mut emit = |line: &mut Vec<u8>, _dropped| {
            stray.get_or_insert_with(|| String::from_utf8_lossy(line).into_owned());
        };
        match read_some(fd, chunk) {
            Ok(0) | Err(_) => {
                self.out.flush(&mut emit);
                stray.get_or_insert_with(|| "(it closed its stdout)".to_owned());
                self.stdout = None;
            }
            Ok(n) => self.out.feed(&chunk[..n], &mut emit),
        }
    }

    /// Whether a read of stdout would not block now: more of a line is waiting, or its end.
    fn stdout_has_more(&self) -> bool {
        self.stdout
            .as_ref()
            .is_some_and(|fd| super::handler::readable_now(fd.as_fd()))
    }

    /// Reads stdout while a job waits for its answer: the first complete line must be the
    /// answer for `expected`; lines after it are kept as stray.
    fn read_answer(&mut self, chunk: &mut [u8], expected: &str) -> Result<Option<Answer>, Ended> {
        let Some(fd) = &self.stdout else {
            return Ok(None);
        };
        let n = match read_some(fd, chunk) {
            // Its end: reported as `Exited`, which the caller checks.
            Ok(0) | Err(_) => {
                self.stdout = None;
                return Err(Ended::Exited);
            }
            Ok(n) => n,
        };
        let mut result: Option<Result<Answer, String>> = None;
        let stray = &mut self.stray;
        self.out
            .feed(&chunk[..n], &mut |line: &mut Vec<u8>, dropped| {
                if result.is_some() {
                    stray.get_or_insert_with(|| String::from_utf8_lossy(line).into_owned());
                    return;
                }
                result = Some(parse_answer(line, dropped, expected));
            });
        match result {
            None => Ok(None),
            Some(Ok(answer)) => Ok(Some(answer)),
            Some(Err(reason)) => Err(Ended::Broken(reason)),
        }
    }
}

/// Checks one answer line against the job in flight.
fn parse_answer(line: &[u8], dropped: usize, expected: &str) -> Result<Answer, String> {
    if dropped > 0 {
        return Err(format!(
            "the handler answered with a line longer than {MAX_ANSWER} bytes"
        ));
    }
    let shown = || escape_text(&cut(&String::from_utf8_lossy(line))).into_owned();
    let answer: Answer = serde_json::from_slice(line).map_err(|e| {
        format!(
            "the handler answered with something that is not a JSON answer \
             {{\"id\":…,\"status\":N}} ({e}): {:?}",
            shown()
        )
    })?;
    if answer.id != expected {
        return Err(format!(
            "the handler answered for job {:?}, not for the job in flight",
            escape_text(&cut(&answer.id))
        ));
    }
    if !(0..=255).contains(&answer.status) {
        return Err(format!(
            "the handler answered with status {}, which is no exit status (0 to 255)",
            answer.status
        ));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::path::Path;

    #[test]
    fn names_that_json_cannot_carry_travel_escaped_with_their_bytes() {
        let job = Job {
            id: OsStr::from_bytes(b"a\x07b\xff"),
            shown: "a\\x07b\\xff",
            path: Path::new("/nonexistent/a\x07b"),
            attempt: 2,
        };
        assert_eq!(request_id(&job), display_name(job.id));
        // The path cannot be opened here, which is the error the attempt fails with.
        let err = request(&job).unwrap_err();
        assert!(err.contains("cannot open the job file"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j\x01");
        std::fs::write(&path, "data").unwrap();
        let job = Job { path: &path, ..job };
        let (line, held) = request(&job).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["id_hex"], "610762ff");
        assert_eq!(v["attempt"], 2);
        assert_eq!(v["path_hex"], hex(path.as_os_str().as_bytes()));
        let via = v["path"].as_str().unwrap();
        assert_eq!(std::fs::read_to_string(via).unwrap(), "data", "{via}");
        drop(held);

        let plain = Job {
            id: OsStr::new("j1"),
            shown: "j1",
            path: Path::new("/s/active/j1"),
            attempt: 1,
        };
        let (line, held) = request(&plain).unwrap();
        assert!(held.is_none());
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"id\":\"j1\",\"path\":\"/s/active/j1\",\"attempt\":1}\n"
        );
    }

    #[test]
    fn answers_are_checked_against_the_job_in_flight() {
        assert_eq!(
            parse_answer(br#"{"id":"j1","status":3,"reason":"x"}"#, 0, "j1")
                .unwrap()
                .status,
            3
        );
        let err = parse_answer(br#"{"id":"j2","status":0}"#, 0, "j1")
            .err()
            .unwrap();
        assert!(err.contains("answered for job \"j2\""), "{err}");
        let err = parse_answer(b"hello", 0, "j1").err().unwrap();
        assert!(err.contains("not a JSON answer"), "{err}");
        let err = parse_answer(br#"{"id":"j1","status":300}"#, 0, "j1")
            .err()
            .unwrap();
        assert!(err.contains("no exit status"), "{err}");
        assert!(parse_answer(b"{}", 1, "j1").is_err());
    }

    #[test]
    fn the_restart_delay_doubles_up_to_its_cap() {
        assert_eq!(restart_delay(1), RESTART_INITIAL);
        assert_eq!(restart_delay(2), RESTART_INITIAL * 2);
        assert_eq!(restart_delay(4), RESTART_INITIAL * 8);
        assert_eq!(restart_delay(100), RESTART_MAX);
    }
}
