//! The daemon's life: start-up and crash recovery, READY, STATUS, reload, the watchdog, and the stop.
//!
//! The stop has two stages, driven by the tokens in [`Shutdown`]. At `stop` the dispatcher
//! returns and the workers take no new job; in-flight jobs may finish until
//! `shutdown.drain_timeout`. At that deadline, or at a second signal, `abort` is cancelled:
//! handlers get SIGTERM, then SIGKILL after `handler.kill_grace`, and their jobs go back to
//! `new/`. The stop therefore ends within drain_timeout + kill_grace plus a little; while it
//! runs, systemd is kept informed (STOPPING=1, STATUS=, EXTEND_TIMEOUT_USEC=) so that it waits
//! for exactly that long and never needs SIGKILL.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::clock::later;
use crate::config::{Config, ConfigError, EX_CONFIG};
use crate::daemon::logging::LogControl;
use crate::daemon::notify::Notifier;
use crate::daemon::signals::Shutdown;
use crate::daemon::stats::Stats;
use crate::fault::{self, Point};
use crate::runner::Pool;
use crate::source::spool::discovery::{Dispatcher, Watcher};
use crate::source::spool::{Spool, SpoolError, SpoolSource};

/// Names waiting between the dispatcher and the workers. Small: a name in the channel is a job
/// that is not yet claimed, so this only smooths hand-offs.
const CHANNEL: usize = 16;
/// How often STATUS= is refreshed (it is only sent when it changed).
const STATUS_EVERY: Duration = Duration::from_millis(500);
/// How often EXTEND_TIMEOUT_USEC= is resent while stopping.
const EXTEND_EVERY: Duration = Duration::from_secs(1);
/// What EXTEND_TIMEOUT_USEC= adds on top of the worst case still ahead, so that a resend
/// always arrives in time.
const EXTEND_MARGIN: Duration = Duration::from_secs(3);
/// How long after the last SIGKILL the stop waits for workers before giving up on them.
const ABORT_SLACK: Duration = Duration::from_millis(150);

/// Why the daemon could not run or had to end.
#[derive(Debug)]
pub enum RunError {
    Config(ConfigError),
    Spool(SpoolError),
    Io(String),
    /// A thread panicked (a bug); the description names the thread and the place.
    Panic(String),
}

/// EX_SOFTWARE from sysexits(3): the exit status after a panic. It is non-zero, so the packaged
/// unit's `Restart=on-failure` starts spoold again, and crash recovery reruns the job the
/// panicking thread held in `active/`.
pub const EX_SOFTWARE: u8 = 70;

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Config(e) => f.write_str(&e.invalid()),
            RunError::Spool(e) => write!(f, "{e}"),
            RunError::Io(e) => write!(f, "{e}"),
            RunError::Panic(e) => write!(
                f,
                "stopped after a panic ({e}); exiting with status {EX_SOFTWARE} so that the \
                 service manager restarts spoold"
            ),
        }
    }
}

impl RunError {
    /// sysexits(3) codes: systemd units can refuse to restart on a config error.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) => EX_CONFIG,
            RunError::Spool(SpoolError::Locked { .. }) => 75,
            RunError::Spool(_) => 73,
            RunError::Io(_) => 74,
            RunError::Panic(_) => EX_SOFTWARE,
        }
    }
}

/// The first panic in any thread of the daemon, as the hook of [`install_panic_hook`] recorded
/// it ("thread NAME panicked at FILE:LINE:COL: MESSAGE").
#[derive(Debug, Clone, Default)]
pub struct Panics(Arc<OnceLock<String>>);

impl Panics {
    pub fn first(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// Makes every panic loud and fatal. A panic is a bug, and one on a worker thread used to be
/// swallowed: the thread died with its job in `active/` while the daemon looked healthy. The
/// hook logs it at error level with the thread's name and place, records it, and cancels
/// `abort`, so the daemon stops on the abort path and exits with [`EX_SOFTWARE`]. The default
/// hook's output (to stderr) is kept only when RUST_BACKTRACE asks for the backtrace, which
/// the log line lacks; otherwise it would repeat the line in the journal.
pub fn install_panic_hook(abort: tokio_util::sync::CancellationToken) -> Panics {
    let panics = Panics::default();
    let record = panics.clone();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("(unnamed)");
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let place = info
            .location()
            .map(|l| format!(" at {l}"))
            .unwrap_or_default();
        let what = format!("thread {name} panicked{place}: {message}");
        // Recorded and acted on before it is logged: should the logging itself ever block or
        // panic, the daemon still stops with the right status rather than hang.
        let _ = record.0.set(what.clone());
        abort.cancel();
        tracing::error!(
            thread = name,
            "{what}; this is a bug: stopping, aborting the jobs in flight (a job this thread \
             held stays in active/ and runs again at the next start)"
        );
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| !v.is_empty() && v != "0") {
            default_hook(info);
        }
    }));
    panics
}

/// What a stop did, for the one summary line.
#[derive(Debug)]
pub struct StopSummary {
    pub drained: u64,
    pub requeued: u64,
    pub took: Duration,
}

/// Everything the daemon needs from `main`.
pub struct Daemon {
    pub config_path: PathBuf,
    pub config: Config,
    pub shutdown: Shutdown,
    pub reloads: mpsc::Receiver<()>,
    pub notifier: Notifier,
    pub log: LogControl,
    /// Filled in by the panic hook; a panic anywhere makes the run end in [`RunError::Panic`].
    pub panics: Panics,
}

pub async fn run(daemon: Daemon) -> Result<StopSummary, RunError> {
    let Daemon {
        config_path,
        config,
        shutdown,
        mut reloads,
        notifier,
        log,
        panics,
    } = daemon;
    let spool = Arc::new(Spool::open(&config.spool.dir).map_err(RunError::Spool)?);
    let _lock = spool.lock_async().await.map_err(RunError::Spool)?;
    let recovered = spool
        .recover_active()
        .map_err(|e| RunError::Io(format!("crash recovery in {}: {e}", spool.root().display())))?;
    if !recovered.is_empty() {
        tracing::warn!(
            jobs = recovered.len(),
            "found {} in active/ left by a daemon that did not stop cleanly; {} again now",
            jobs(recovered.len() as u64),
            if recovered.len() == 1 {
                "it runs"
            } else {
                "they run"
            }
        );
    }
    // Only a warning: the program may be installed after spoold starts, and each attempt
    // reports the spawn's own error anyway. It is looked up as the spawn will look it up.
    if let Err(problem) = crate::runner::handler::check_program(&config.handler) {
        tracing::warn!("{problem}; jobs will fail until that is fixed");
    }
    let watcher = Watcher::new(&spool)
        .map_err(|e| tracing::warn!("cannot watch the spool with inotify: {e}"))
        .ok();

    let stats = Arc::new(Stats::default());
    let (jobs_tx, jobs_rx) = mpsc::channel(CHANNEL);
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    let (rescan_tx, rescan_rx) = watch::channel(config_rx.borrow().spool.rescan_interval);
    let (retries_tx, retries_rx) = mpsc::unbounded_channel();
    let source = SpoolSource::new(
        spool.clone(),
        jobs_rx,
        retries_tx,
        stats.clone(),
        config_rx.clone(),
    );
    let pool = Pool::new(
        source,
        config_rx.clone(),
        stats.clone(),
        shutdown.stop.clone(),
        shutdown.abort.clone(),
    )
    .map_err(|e| RunError::Io(format!("cannot create the abort eventfd: {e}")))?;
    pool.resize(config_rx.borrow().workers.count.get());

    let watchdog = notifier.watchdog();
    let dispatcher = Dispatcher {
        spool: spool.clone(),
        jobs: jobs_tx,
        stats: stats.clone(),
        rescan_interval: rescan_rx,
        retries: retries_rx,
        watcher,
        heartbeat: watchdog.map(|w| w / 4),
    };
    stats.beat();
    let mut dispatcher = tokio::spawn(dispatcher.run(shutdown.stop.clone()));

    let notifier = Arc::new(notifier);
    let stopping = CancellationToken::new();
    let watchdog_done = CancellationToken::new();
    if let Some(interval) = watchdog {
        tokio::spawn(watchdog_loop(
            notifier.clone(),
            stats.clone(),
            interval,
            stopping.clone(),
            watchdog_done.clone(),
        ));
    }

    let mut reload_error: Option<String> = None;
    let mut status = status_line(&stats, &reload_error);
    notifier.ready(&status);
    tracing::info!(
        spool = %spool.root().display(),
        workers = config_rx.borrow().workers.count.get(),
        "spoold ready"
    );

    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    let mut fatal: Option<RunError> = None;
    // A panic in here (a bug) has been logged and has cancelled `abort` by the time it unwinds
    // to this point; what is left to do is the stop, on the abort path.
    let _ = AssertUnwindSafe(async {
        loop {
            tokio::select! {
                biased;
                () = shutdown.stop.cancelled() => break,
                ended = &mut dispatcher => {
                    let why = match ended {
                        Ok(Ok(())) => "the dispatcher ended unexpectedly".to_owned(),
                        Ok(Err(e)) => format!("job discovery failed: {e}"),
                        Err(e) => format!("the dispatcher crashed: {e}"),
                    };
                    tracing::error!("{why}; stopping");
                    fatal = Some(RunError::Io(why));
                    shutdown.stop.cancel();
                    break;
                }
                Some(()) = reloads.recv() => {
                    notifier.reloading();
                    reload_error = reload(&config_path, &config_tx, &rescan_tx, &pool, &log);
                    status = status_line(&stats, &reload_error);
                    notifier.ready(&status);
                }
                _ = status_tick.tick() => {
                    let now = status_line(&stats, &reload_error);
                    if now != status {
                        status = now;
                        notifier.status(&status);
                    }
                }
            }
        }
    })
    .catch_unwind()
    .await;

    stopping.cancel();
    // The dispatcher returns as soon as it sees the stop, even from a send to a full channel:
    // every await in it also waits on the token. It is awaited, not aborted, so that a
    // regression there shows up as a stop that hangs (tests/shutdown.rs catches it).
    if fatal.is_none() {
        let _ = dispatcher.await;
    }
    let config = config_rx.borrow().clone();
    let summary = AssertUnwindSafe(stop(&pool, &stats, &shutdown, &notifier, &config))
        .catch_unwind()
        .await;
    watchdog_done.cancel();
    let summary = match summary {
        Ok(summary) => summary,
        Err(_) => {
            // The stop sequence itself panicked. The hook cancelled `abort`, so the handlers
            // are being signalled: wait for their workers as an aborted stop would, and for no
            // longer.
            let bound = config.handler.kill_grace.saturating_add(ABORT_SLACK);
            if tokio::time::timeout(bound, pool.wait()).await.is_err() {
                tracing::error!(
                    "workers did not finish {} after the abort; exiting without them (their \
                     jobs stay in active/ and run again at the next start)",
                    humantime::format_duration(bound)
                );
            }
            let what = panics.first().unwrap_or("the stop sequence panicked");
            return Err(RunError::Panic(what.to_owned()));
        }
    };
    // A panic outranks any other reason to stop: it is the one that needs a restart and a bug
    // report. The summary is not logged then: the job the panicking thread held would count as
    // drained although it waits in active/.
    if let Some(what) = panics.first() {
        return Err(RunError::Panic(what.to_owned()));
    }
    tracing::info!(
        drained = summary.drained,
        requeued = summary.requeued,
        took_ms = summary.took.as_millis() as u64,
        "spoold stopped: {} drained, {} requeued, in {}",
        jobs(summary.drained),
        summary.requeued,
        humantime::format_duration(Duration::from_millis(summary.took.as_millis() as u64))
    );
    match fatal {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

/// The stop sequence; see the module documentation.
async fn stop(
    pool: &Pool<SpoolSource>,
    stats: &Stats,
    shutdown: &Shutdown,
    notifier: &Notifier,
    config: &Config,
) -> StopSummary {
    fault::hit(Point::Stop);
    let began = Instant::now();
    let in_flight = pool.in_flight() as u64;
    let requeued_before = stats.requeued.load(Relaxed);
    let drain_until = later(began, config.shutdown.drain_timeout);
    let kill_grace = config.handler.kill_grace;
    notifier.stopping(&stopping_line(in_flight as usize, drain_until));
    if in_flight > 0 {
        tracing::info!(
            in_flight,
            "stopping: waiting up to {} for {} in flight",
            humantime::format_duration(config.shutdown.drain_timeout),
            jobs(in_flight)
        );
    }

    let wait = pool.wait();
    tokio::pin!(wait);
    let mut aborted_at: Option<Instant> = None;
    let mut extend_at = Instant::now();
    loop {
        // The worst case still ahead: the rest of the drain, then kill_grace.
        let end = match aborted_at {
            Some(at) => later(at, kill_grace.saturating_add(ABORT_SLACK)),
            None => later(drain_until, kill_grace.saturating_add(ABORT_SLACK)),
        };
        tokio::select! {
            biased;
            () = &mut wait => break,
            () = shutdown.abort.cancelled(), if aborted_at.is_none() => {
                aborted_at = Some(Instant::now());
                notifier.status(&format!("stopping: aborting {}", jobs(pool.in_flight() as u64)));
            }
            () = sleep_until(drain_until), if aborted_at.is_none() => {
                if pool.in_flight() > 0 {
                    tracing::warn!(
                        in_flight = pool.in_flight(),
                        "drain timeout reached; aborting {} in flight (they go back to new/)",
                        jobs(pool.in_flight() as u64)
                    );
                }
                shutdown.abort.cancel();
            }
            () = sleep_until(end), if aborted_at.is_some() => {
                tracing::error!(
                    "{} workers did not finish {} after the abort; exiting without them (their \
                     jobs stay in active/ and run again at the next start)",
                    stats.workers.load(Relaxed),
                    humantime::format_duration(kill_grace.saturating_add(ABORT_SLACK))
                );
                break;
            }
            () = sleep_until(extend_at) => {
                notifier.extend_timeout(
                    end.saturating_duration_since(Instant::now()).saturating_add(EXTEND_MARGIN),
                );
                if aborted_at.is_none() {
                    notifier.status(&stopping_line(pool.in_flight(), drain_until));
                }
                extend_at = later(Instant::now(), EXTEND_EVERY);
            }
        }
    }
    let requeued = stats.requeued.load(Relaxed) - requeued_before;
    StopSummary {
        drained: in_flight.saturating_sub(requeued),
        requeued,
        took: began.elapsed(),
    }
}

fn stopping_line(in_flight: usize, drain_until: Instant) -> String {
    let left = drain_until.saturating_duration_since(Instant::now());
    format!(
        "stopping: draining {}, {}s left",
        jobs(in_flight as u64),
        left.as_secs()
    )
}

/// "1 job", "3 jobs": operators read these lines in `systemctl status`.
fn jobs(n: u64) -> String {
    if n == 1 {
        "1 job".to_owned()
    } else {
        format!("{n} jobs")
    }
}

fn status_line(stats: &Stats, reload_error: &Option<String>) -> String {
    let mut line = format!(
        "{}/{} busy, {} queued, {} done, {} failed",
        stats.busy.load(Relaxed),
        stats.workers.load(Relaxed),
        stats.queued(),
        stats.done.load(Relaxed),
        stats.failed.load(Relaxed),
    );
    if let Some(e) = reload_error {
        line.push_str("; reload failed, running on the previous config: ");
        line.push_str(e);
    }
    line
}

/// Re-reads the config and applies what can change at run time. Returns the error that kept
/// the old config, if any.
fn reload(
    path: &std::path::Path,
    config_tx: &watch::Sender<Arc<Config>>,
    rescan_tx: &watch::Sender<Duration>,
    pool: &Pool<SpoolSource>,
    log: &LogControl,
) -> Option<String> {
    let mut new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload failed, still running on the previous config: {e}");
            return Some(e.to_string());
        }
    };
    let old = config_tx.borrow().clone();
    if new.spool.dir != old.spool.dir {
        tracing::warn!(
            "spool.dir changed to {}; that takes a restart, so spoold keeps using {}",
            new.spool.dir.display(),
            old.spool.dir.display()
        );
        new.spool.dir = old.spool.dir.clone();
    }
    log.set_level(&new.log.level);
    rescan_tx.send_replace(new.spool.rescan_interval);
    pool.resize(new.workers.count.get());
    tracing::info!(
        workers = new.workers.count.get(),
        "configuration reloaded from {}",
        path.display()
    );
    config_tx.send_replace(Arc::new(new));
    None
}

/// Pings the watchdog at half its interval, but only while the dispatcher's loop is turning (or
/// the daemon is stopping, which has its own deadline): a hung dispatcher leads to a restart.
async fn watchdog_loop(
    notifier: Arc<Notifier>,
    stats: Arc<Stats>,
    interval: Duration,
    stopping: CancellationToken,
    done: CancellationToken,
) {
    let half = interval / 2;
    loop {
        if stopping.is_cancelled() || stats.since_beat() < half {
            notifier.watchdog_ping();
        } else {
            tracing::error!(
                "the dispatcher has not run for {}; withholding the watchdog ping",
                humantime::format_duration(Duration::from_millis(
                    stats.since_beat().as_millis() as u64
                ))
            );
        }
        tokio::select! {
            () = done.cancelled() => return,
            () = tokio::time::sleep(half) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn pings(sock: &UnixDatagram) -> usize {
        let mut n = 0;
        let mut buf = [0u8; 256];
        while let Ok(len) = sock.recv(&mut buf) {
            if buf[..len].starts_with(b"WATCHDOG=1") {
                n += 1;
            }
        }
        n
    }

    /// The watchdog must stop pinging when the dispatcher's loop stops turning, so that systemd
    /// restarts a daemon whose discovery hung; and ping again while it stops.
    #[tokio::test]
    async fn watchdog_pings_only_while_the_dispatcher_turns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_nonblocking(true).unwrap();
        let interval = Duration::from_millis(200);
        let notifier = Arc::new(Notifier::with(Some(path.into_os_string()), Some(interval)));
        let stats = Arc::new(Stats::default());
        let stopping = CancellationToken::new();
        let done = CancellationToken::new();
        stats.beat();
        let task = tokio::spawn(watchdog_loop(
            notifier,
            stats.clone(),
            interval,
            stopping.clone(),
            done.clone(),
        ));

        // A turning dispatcher: pings arrive.
        let mut seen = 0;
        let give_up = Instant::now() + Duration::from_secs(30);
        while seen < 3 && Instant::now() < give_up {
            stats.beat();
            tokio::time::sleep(Duration::from_millis(10)).await;
            seen += pings(&sock);
        }
        assert!(seen >= 3, "pings while the dispatcher turns: {seen}");

        // A hung dispatcher: once its last beat is older than half the interval, no more pings.
        tokio::time::sleep(interval).await;
        pings(&sock);
        tokio::time::sleep(interval * 3).await;
        assert_eq!(pings(&sock), 0, "a ping although the dispatcher is stuck");

        // While stopping, the stop's own deadline bounds the wait: pings resume.
        stopping.cancel();
        let mut seen = 0;
        let give_up = Instant::now() + Duration::from_secs(30);
        while seen == 0 && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(10)).await;
            seen += pings(&sock);
        }
        assert!(seen > 0, "pings while stopping");
        done.cancel();
        task.await.unwrap();
    }
}
