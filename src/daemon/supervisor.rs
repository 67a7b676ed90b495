//! The daemon's life: start-up and crash recovery, READY, STATUS, reload, the watchdog, and the stop.
//!
//! The stop has two stages, driven by the tokens in [`Shutdown`]. At `stop` discovery
//! returns and the workers take no new job; in-flight jobs may finish until
//! `shutdown.drain_timeout`. At that deadline, or at a second signal, `abort` is cancelled:
//! handlers get SIGTERM, then SIGKILL after `handler.kill_grace`, and their jobs go back to
//! `new/`. The stop therefore ends within drain_timeout + kill_grace plus a little; while it
//! runs, systemd is kept informed (STOPPING=1, STATUS=, EXTEND_TIMEOUT_USEC=) so that it waits
//! for exactly that long and never needs SIGKILL.

use std::fmt;
use std::io;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::clock::later;
use crate::config::{BackendKind, Config, ConfigError, EX_CONFIG};
use crate::daemon::logging::LogControl;
use crate::daemon::metrics;
use crate::daemon::notify::Notifier;
use crate::daemon::signals::Shutdown;
use crate::daemon::stats::Stats;
use crate::fault::{self, Point};
use crate::runner::Pool;
use crate::source::Source;
use crate::source::admin::Paused;
use crate::source::jetstream::JetStreamSource;
use crate::source::jetstream::broker::BrokerError;
use crate::source::spool::discovery::{self, Discovery, Watcher};
use crate::source::spool::{Dir, Spool, SpoolError, SpoolLock, SpoolSource};

/// Names waiting between discovery and the workers. Small: a name in the channel is a job
/// that is not yet claimed, so this only smooths hand-offs.
const CHANNEL: usize = 16;
/// How often STATUS= is refreshed (it is only sent when it changed).
const STATUS_EVERY: Duration = Duration::from_millis(500);
/// How often EXTEND_TIMEOUT_USEC= is resent while stopping.
const EXTEND_EVERY: Duration = Duration::from_secs(1);
/// What EXTEND_TIMEOUT_USEC= adds on top of the worst case still ahead, so that a resend
/// always arrives in time.
const EXTEND_MARGIN: Duration = Duration::from_secs(3);
/// How long after the last SIGKILL the stop waits for workers before giving up on them: a
/// worker may wait `PIPE_GRACE` for its handler's pipes to close once the group is gone (a
/// process that left the group can hold them), and then releases its job.
const ABORT_SLACK: Duration =
    Duration::from_millis(crate::runner::handler::PIPE_GRACE.as_millis() as u64 + 100);

/// Why the daemon could not run or had to end.
#[derive(Debug)]
pub enum RunError {
    Config(ConfigError),
    Spool(SpoolError),
    /// The jobs a daemon that died left in `active/` could not be moved back to `new/`.
    Recovery {
        root: PathBuf,
        error: io::Error,
    },
    /// The signal handlers could not be installed.
    Signals(io::Error),
    /// The eventfd that carries an abort to the workers waiting on their handlers could not be
    /// created.
    AbortEventfd(io::Error),
    /// Discovery broke: the spool was removed or moved away, or it could not be read.
    DiscoveryFailed(io::Error),
    /// Discovery returned although nothing stopped it (a bug).
    DiscoveryEnded,
    /// Discovery's task panicked or was cancelled; the description says which.
    DiscoveryCrashed(String),
    /// A thread panicked (a bug); the description names the thread and the place.
    Panic(String),
    /// The metrics endpoint could not listen on its address (in use, or not this host's).
    Metrics(metrics::BindError),
    /// The JetStream cluster could not be reached (69) or contradicts the config (78).
    Broker(BrokerError),
}

/// EX_SOFTWARE from sysexits(3): the exit status after a panic. It is non-zero, so the packaged
/// unit's `Restart=on-failure` starts spoold again, and crash recovery reruns the job the
/// panicking thread held in `active/`.
pub const EX_SOFTWARE: u8 = 70;

/// EX_IOERR from sysexits(3): the exit status when the daemon could not start or keep running
/// for a reason outside the config and the spool's own checks.
const EX_IOERR: u8 = 74;

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Config(e) => f.write_str(&e.invalid()),
            RunError::Spool(e) => write!(f, "{e}"),
            RunError::Recovery { root, error } => {
                write!(f, "crash recovery in {}: {error}", root.display())
            }
            RunError::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
            RunError::AbortEventfd(e) => write!(f, "cannot create the abort eventfd: {e}"),
            RunError::DiscoveryFailed(e) => write!(f, "job discovery failed: {e}"),
            RunError::DiscoveryEnded => f.write_str("job discovery ended unexpectedly"),
            RunError::DiscoveryCrashed(e) => write!(f, "job discovery crashed: {e}"),
            RunError::Metrics(e) => write!(f, "{e}"),
            RunError::Broker(e) => write!(f, "{e}"),
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
            RunError::Recovery { .. }
            | RunError::Signals(_)
            | RunError::AbortEventfd(_)
            | RunError::DiscoveryFailed(_)
            | RunError::DiscoveryEnded
            | RunError::DiscoveryCrashed(_)
            | RunError::Metrics(_) => EX_IOERR,
            RunError::Panic(_) => EX_SOFTWARE,
            RunError::Broker(e) => e.exit_code(),
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

/// Makes every panic loud and fatal. A panic is a bug, and a worker thread that died quietly
/// would leave its job in `active/` while the daemon looked healthy. The hook logs it at error level with the thread's name and place, records it, and cancels
/// `abort`, so the daemon stops on the abort path and exits with [`EX_SOFTWARE`]. The default
/// hook's output (to stderr) is kept only when RUST_BACKTRACE asks for the backtrace, which
/// the log line lacks; otherwise it would repeat the line in the journal.
pub fn install_panic_hook(abort: CancellationToken) -> Panics {
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

/// What a reload needs from `main`: where the config was read from, the requests (one per
/// SIGHUP, from `signals::listen`), and the handle that sets the log level.
pub struct Reloads {
    pub config_path: PathBuf,
    pub requests: mpsc::Receiver<()>,
    pub log: LogControl,
}

/// Runs the daemon on `config` until `shutdown` stops it: start, serve, stop. `panics` is what
/// the panic hook fills in; a panic anywhere makes the run end in [`RunError::Panic`].
pub async fn run(
    config: Config,
    shutdown: Shutdown,
    reloads: Reloads,
    notifier: Notifier,
    panics: Panics,
) -> Result<StopSummary, RunError> {
    if config.backend.kind == BackendKind::Jetstream {
        let began = Instant::now();
        let Some(mut running) = Running::start_jetstream(config, &shutdown, notifier).await? else {
            tracing::info!("stopped while waiting for the NATS cluster; nothing had started");
            return Ok(StopSummary {
                drained: 0,
                requeued: 0,
                took: began.elapsed(),
            });
        };
        let fatal = running.serve(&shutdown, reloads).await;
        return running.stop(&shutdown, fatal, &panics).await;
    }
    let mut running = Running::start(config, &shutdown, notifier).await?;
    let fatal = running.serve(&shutdown, reloads).await;
    running.stop(&shutdown, fatal, &panics).await
}

/// The daemon once started: the spool it holds, its workers, discovery, and the means to
/// reconfigure them.
struct Running<S: Source> {
    spool: Arc<Spool>,
    /// Held until the daemon returns: one daemon per spool.
    _lock: SpoolLock,
    stats: Arc<Stats>,
    pool: Pool<S>,
    discovery: JoinHandle<io::Result<()>>,
    notifier: Arc<Notifier>,
    config_tx: watch::Sender<Arc<Config>>,
    rescan_tx: watch::Sender<Duration>,
    /// The watchdog's task; dropping the handle ends it, once the stop sequence is over.
    watchdog: Option<AbortOnDropHandle<()>>,
    /// The operator's pause, for STATUS=.
    paused: watch::Receiver<Option<Paused>>,
    /// The metrics endpoint's task, when `[metrics] listen` is set, and what ends it: it
    /// serves through the drain, so that a stop can be watched, and ends with the daemon.
    metrics: Option<(CancellationToken, AbortOnDropHandle<()>)>,
    /// The broker connection as STATUS= shows it (empty while connected); None for a spool.
    broker_status: Option<watch::Receiver<String>>,
    /// What the stop waits for after the drain, within its bound: the JetStream claimer's
    /// last pull (source::jetstream::Started::last_pull). None for a spool.
    after_drain: Option<(JoinHandle<()>, Duration)>,
}

impl Running<JetStreamSource> {
    /// Locks `spool.dir` (one daemon per scratch area), connects to the cluster and checks its
    /// topology (source::jetstream), and starts the workers and the watchdog. The claimer
    /// takes discovery's place: the supervisor waits for it at the stop, and its loop feeds
    /// the watchdog.
    /// Starts on the broker; None when a stop came while it waited for the cluster, which may
    /// be up to twice `jetstream.connect_timeout` (the connection, then the topology).
    async fn start_jetstream(
        config: Config,
        shutdown: &Shutdown,
        notifier: Notifier,
    ) -> Result<Option<Running<JetStreamSource>>, RunError> {
        // Its active/ is not used: a broker's jobs are never there, so none is to run alone.
        let (spool, lock, _) = open_spool(&config).await?;
        if let Err(problem) = crate::runner::handler::check_program(&config.handler) {
            tracing::warn!("{problem}; jobs will fail until that is fixed");
        }
        let stats = Arc::new(Stats::default());
        stats.beat();
        let started = {
            let start = JetStreamSource::start(
                &config,
                stats.clone(),
                shutdown.stop.clone(),
                shutdown.abort.clone(),
            );
            tokio::pin!(start);
            // The wait for the cluster gives way to a stop, and keeps systemd's start timeout
            // from running out while it lasts: connect_timeout may be longer than that.
            let mut extend = tokio::time::interval_at(
                tokio::time::Instant::now() + EXTEND_EVERY / 2,
                EXTEND_EVERY,
            );
            loop {
                tokio::select! {
                    biased;
                    () = shutdown.stop.cancelled() => return Ok(None),
                    started = &mut start => break started.map_err(RunError::Broker)?,
                    _ = extend.tick() => {
                        notifier.extend_timeout(EXTEND_EVERY.saturating_add(EXTEND_MARGIN));
                        notifier.status("waiting for the NATS cluster (jetstream.servers)");
                    }
                }
            }
        };
        let (config_tx, config_rx) = watch::channel(Arc::new(config));
        let (rescan_tx, _) = watch::channel(config_rx.borrow().spool.rescan_interval);
        let pool = Pool::new(
            started.source,
            config_rx.clone(),
            stats.clone(),
            shutdown.stop.clone(),
            shutdown.abort.clone(),
        )
        .map_err(RunError::AbortEventfd)?;
        pool.resize(config_rx.borrow().workers.count.get());
        let notifier = Arc::new(notifier);
        let watchdog = notifier.watchdog().map(|interval| {
            AbortOnDropHandle::new(tokio::spawn(watchdog_loop(
                notifier.clone(),
                stats.clone(),
                interval,
                shutdown.stop.clone(),
            )))
        });
        Ok(Some(Running {
            spool,
            _lock: lock,
            stats,
            pool,
            discovery: started.claimer,
            notifier,
            config_tx,
            rescan_tx,
            watchdog,
            paused: watch::channel(None).1,
            // Config::check_jetstream refuses metrics.listen with this backend.
            metrics: None,
            broker_status: Some(started.broker_status),
            after_drain: Some((
                started.last_pull,
                crate::source::jetstream::CLAIMER_AFTER_STOP,
            )),
        }))
    }
}

impl Running<SpoolSource> {
    /// Opens and locks the spool, recovers what a dead daemon left in `active/`, and starts
    /// the workers, discovery and the watchdog. READY is for `serve`.
    async fn start(
        config: Config,
        shutdown: &Shutdown,
        notifier: Notifier,
    ) -> Result<Running<SpoolSource>, RunError> {
        let (spool, lock, alone) = open_spool(&config).await?;
        let listener = match config.metrics.listen {
            Some(addr) => Some(metrics::bind(addr).map_err(RunError::Metrics)?),
            None => None,
        };
        // Only a warning: the program may be installed after spoold starts, and each attempt
        // reports the spawn's own error anyway. It is looked up as the spawn will look it up.
        if let Err(problem) = crate::runner::handler::check_program(&config.handler) {
            tracing::warn!("{problem}; jobs will fail until that is fixed");
        }
        let watcher = Watcher::new(&spool)
            .map_err(|e| tracing::warn!("cannot watch the spool with inotify: {e}"))
            .ok();

        let stats = Arc::new(Stats::default());
        let (names_tx, names_rx) = mpsc::channel(CHANNEL);
        let (config_tx, config_rx) = watch::channel(Arc::new(config));
        let (rescan_tx, rescan_rx) = watch::channel(config_rx.borrow().spool.rescan_interval);
        let (retries_tx, retries_rx) = mpsc::unbounded_channel();
        let (given_back_tx, given_back_rx) = mpsc::unbounded_channel();
        let (paused_tx, paused_rx) = discovery::pause_channel(&spool);
        let source = SpoolSource::new(
            spool.clone(),
            names_rx,
            retries_tx,
            stats.clone(),
            config_rx.clone(),
            paused_rx.clone(),
        )
        .run_alone(alone)
        .giving_back(given_back_tx);
        let pool = Pool::new(
            source,
            config_rx.clone(),
            stats.clone(),
            shutdown.stop.clone(),
            shutdown.abort.clone(),
        )
        .map_err(RunError::AbortEventfd)?;
        pool.resize(config_rx.borrow().workers.count.get());

        let watchdog = notifier.watchdog();
        let discovery = Discovery {
            spool: spool.clone(),
            names: names_tx,
            stats: stats.clone(),
            rescan_interval: rescan_rx,
            retries: retries_rx,
            given_back: given_back_rx,
            watcher,
            heartbeat: watchdog.map(|w| w / 4),
            paused: paused_tx,
            config: config_rx.clone(),
        };
        stats.beat();
        let discovery = tokio::spawn(discovery.run(shutdown.stop.clone()));

        let notifier = Arc::new(notifier);
        let watchdog = watchdog.map(|interval| {
            AbortOnDropHandle::new(tokio::spawn(watchdog_loop(
                notifier.clone(),
                stats.clone(),
                interval,
                shutdown.stop.clone(),
            )))
        });
        let metrics = listener.map(|listener| {
            tracing::info!(
                "serving metrics on http://{}/metrics",
                config_rx.borrow().metrics.listen.expect("bound above")
            );
            let sources = metrics::Sources {
                stats: stats.clone(),
                spool: spool.clone(),
                paused: paused_rx.clone(),
            };
            let stop = CancellationToken::new();
            let task = tokio::spawn(metrics::serve(listener, sources, stop.clone()));
            (stop, AbortOnDropHandle::new(task))
        });
        Ok(Running {
            spool,
            _lock: lock,
            stats,
            pool,
            discovery,
            notifier,
            config_tx,
            rescan_tx,
            watchdog,
            paused: paused_rx,
            metrics,
            broker_status: None,
            after_drain: None,
        })
    }
}

impl<S: Source> Running<S> {
    /// STATUS=: the counts, the pause, a failed reload, and a lost broker connection.
    fn status(&self, reload_error: &Option<String>) -> String {
        let mut line = status_line(&self.stats, &self.paused, reload_error);
        if let Some(broker) = &self.broker_status {
            let broker = broker.borrow();
            if !broker.is_empty() {
                line = format!("{}; {line}", *broker);
            }
        }
        line
    }

    /// Sends READY, then serves reloads and STATUS until the stop. Returns the error that
    /// ended the daemon, if one did (discovery broke).
    async fn serve(&mut self, shutdown: &Shutdown, reloads: Reloads) -> Option<RunError> {
        let Reloads {
            config_path,
            mut requests,
            log,
        } = reloads;
        let mut reload_error: Option<String> = None;
        let mut status = self.status(&reload_error);
        self.notifier.ready(&status);
        tracing::info!(
            spool = %self.spool.root().display(),
            workers = self.config_tx.borrow().workers.count.get(),
            "spoold ready"
        );

        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        let mut fatal: Option<RunError> = None;
        // A panic in here (a bug) has been logged and has cancelled `abort` by the time it
        // unwinds to this point; what is left to do is the stop, on the abort path.
        let _ = AssertUnwindSafe(async {
            loop {
                tokio::select! {
                    biased;
                    () = shutdown.stop.cancelled() => break,
                    ended = &mut self.discovery => {
                        let why = match ended {
                            Ok(Ok(())) => RunError::DiscoveryEnded,
                            Ok(Err(e)) => RunError::DiscoveryFailed(e),
                            Err(e) => RunError::DiscoveryCrashed(e.to_string()),
                        };
                        tracing::error!("{why}; stopping");
                        fatal = Some(why);
                        shutdown.stop.cancel();
                        break;
                    }
                    Some(()) = requests.recv() => {
                        self.notifier.reloading();
                        reload_error = self.reload(&config_path, &log);
                        status = self.status(&reload_error);
                        self.notifier.ready(&status);
                    }
                    _ = status_tick.tick() => {
                        let now = self.status(&reload_error);
                        if now != status {
                            status = now;
                            self.notifier.status(&status);
                        }
                    }
                }
            }
        })
        .catch_unwind()
        .await;
        fatal
    }

    /// Re-reads the config and applies what can change at run time. Returns the error that
    /// kept the old config, if any.
    fn reload(&self, path: &std::path::Path, log: &LogControl) -> Option<String> {
        let mut new = match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("reload failed, still running on the previous config: {e}");
                return Some(e.to_string());
            }
        };
        let old = self.config_tx.borrow().clone();
        if new.spool.dir != old.spool.dir {
            tracing::warn!(
                "spool.dir changed to {}; that takes a restart, so spoold keeps using {}",
                new.spool.dir.display(),
                old.spool.dir.display()
            );
            new.spool.dir = old.spool.dir.clone();
        }
        if new.metrics.listen != old.metrics.listen {
            tracing::warn!(
                "metrics.listen changed; that takes a restart, so the metrics endpoint stays as \
                 it was"
            );
            new.metrics.listen = old.metrics.listen;
        }
        if new.backend != old.backend || new.jetstream != old.jetstream {
            tracing::warn!(
                "[backend] or [jetstream] changed; that takes a restart, so spoold keeps the \
                 broker settings it started with"
            );
            new.backend = old.backend.clone();
            new.jetstream = old.jetstream.clone();
        }
        log.set_level(&new.log.level);
        self.rescan_tx.send_replace(new.spool.rescan_interval);
        self.pool.resize(new.workers.count.get());
        tracing::info!(
            workers = new.workers.count.get(),
            "configuration reloaded from {}",
            path.display()
        );
        self.config_tx.send_replace(Arc::new(new));
        None
    }

    /// Waits for discovery, runs the stop sequence, and says how the daemon ended: a panic
    /// outranks `fatal` (what ended `serve`), which outranks a clean stop.
    async fn stop(
        self,
        shutdown: &Shutdown,
        fatal: Option<RunError>,
        panics: &Panics,
    ) -> Result<StopSummary, RunError> {
        // Discovery returns as soon as it sees the stop, even from a send to a full channel:
        // every await in it also waits on the token. It is awaited, not aborted, so that a
        // regression there shows up as a stop that hangs (tests/it/shutdown.rs catches it).
        if fatal.is_none() {
            let _ = self.discovery.await;
        }
        let config = self.config_tx.borrow().clone();
        let summary = AssertUnwindSafe(drain(
            &self.pool,
            &self.stats,
            shutdown,
            &self.notifier,
            &config,
        ))
        .catch_unwind()
        .await;
        if let Some((task, bound)) = self.after_drain {
            let _ = tokio::time::timeout(bound, task).await;
        }
        drop(self.watchdog);
        if let Some((stop, task)) = self.metrics {
            stop.cancel();
            drop(task);
        }
        let Ok(summary) = summary else {
            // The stop sequence itself panicked. The hook cancelled `abort`, so the handlers
            // are being signalled: wait for their workers as an aborted stop would, and for no
            // longer.
            let bound = config
                .handler
                .kill_grace
                .max(self.pool.kill_grace_in_flight())
                .saturating_add(abort_slack(&config));
            if tokio::time::timeout(bound, self.pool.wait()).await.is_err() {
                tracing::error!(
                    "workers did not finish {} after the abort; exiting without them ({})",
                    humantime::format_duration(bound),
                    left_behind(&config)
                );
            }
            let what = panics.first().unwrap_or("the stop sequence panicked");
            return Err(RunError::Panic(what.to_owned()));
        };
        // A panic outranks any other reason to stop: it is the one that needs a restart and a
        // bug report. The summary is not logged then: the job the panicking thread held would
        // count as drained although it waits in active/.
        if let Some(what) = panics.first() {
            return Err(RunError::Panic(what.to_owned()));
        }
        tracing::info!(
            drained = summary.drained,
            requeued = summary.requeued,
            took_ms = summary.took.as_millis() as u64,
            "spoold stopped: {} drained, {} requeued, in {}",
            jobs_in_words(summary.drained),
            summary.requeued,
            humantime::format_duration(Duration::from_millis(summary.took.as_millis() as u64))
        );
        match fatal {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }
}

/// Opens and locks the spool and moves back to `new/` whatever a daemon that died left in
/// `active/`, or to `failed/` what was left there `spool.max_recoveries` times.
///
/// Also returns the recovered jobs that are to run alone (`Recovery::alone`).
async fn open_spool(
    config: &Config,
) -> Result<(Arc<Spool>, SpoolLock, Vec<std::ffi::OsString>), RunError> {
    let spool = Arc::new(Spool::open(&config.spool.dir).map_err(RunError::Spool)?);
    let lock = spool.lock_async().await.map_err(RunError::Spool)?;
    // Counting a recovery writes and syncs a record per job, which must not hold up the main
    // thread (signals, notifications).
    let recovering = spool.clone();
    let max_recoveries = config.spool.max_recoveries;
    let recovery_error = |error| RunError::Recovery {
        root: spool.root().to_owned(),
        error,
    };
    let recovery = tokio::task::spawn_blocking(move || recovering.recover_active(max_recoveries))
        .await
        .map_err(|e| recovery_error(io::Error::other(e.to_string())))?
        .map_err(recovery_error)?;
    let (requeued, failed) = (recovery.requeued.len(), recovery.failed.len());
    if requeued + failed > 0 {
        let then = match (requeued, failed) {
            (1, 0) => "it runs again now".to_owned(),
            (_, 0) => "they run again now".to_owned(),
            (r, f) => format!(
                "{r} run again now, {f} moved to {} (see above)",
                Dir::Failed.place()
            ),
        };
        tracing::warn!(
            jobs = requeued + failed,
            "found {} in {} left by a daemon that did not stop cleanly; {then}",
            jobs_in_words((requeued + failed) as u64),
            Dir::Active.place(),
        );
    }
    Ok((spool, lock, recovery.alone))
}

/// How long after the last SIGKILL the stop waits for the workers to settle their jobs: the
/// pipes' grace, and on a broker the hand-back of an aborted job, which is bounded on its own
/// (so that another host starts the job at once rather than after the ack wait).
fn abort_slack(config: &Config) -> Duration {
    match config.backend.kind {
        BackendKind::Spool => ABORT_SLACK,
        BackendKind::Jetstream => ABORT_SLACK + crate::source::jetstream::HANDBACK_WITHIN,
    }
}

/// What becomes of the jobs of workers that a stop leaves behind, as the log says it.
fn left_behind(config: &Config) -> &'static str {
    match config.backend.kind {
        BackendKind::Spool => "their jobs stay in active/ and run again at the next start",
        BackendKind::Jetstream => {
            "whatever their jobs had not settled comes back after the ack wait, on any host"
        }
    }
}

/// The stop sequence: drain until `drain_timeout`, then abort; see the module documentation.
async fn drain<S: Source>(
    pool: &Pool<S>,
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
    // A job keeps the config it started with: one that started before a reload lowered
    // kill_grace gets its SIGKILL only after the old, longer grace, and the stop waits for it.
    let kill_grace = || config.handler.kill_grace.max(pool.kill_grace_in_flight());
    notifier.stopping(&stopping_line(in_flight as usize, drain_until));
    if in_flight > 0 {
        tracing::info!(
            in_flight,
            "stopping: waiting up to {} for {} in flight",
            humantime::format_duration(config.shutdown.drain_timeout),
            jobs_in_words(in_flight)
        );
    }

    let wait = pool.wait();
    tokio::pin!(wait);
    let mut aborted_at: Option<Instant> = None;
    let mut extend_at = Instant::now();
    // Only ever grows: a job that ends takes its grace out of the count before its worker
    // has left, and the bound of the jobs it was counted for still holds.
    let mut grace = Duration::ZERO;
    loop {
        // The worst case still ahead: the rest of the drain, then kill_grace.
        grace = grace.max(kill_grace().saturating_add(abort_slack(config)));
        let end = match aborted_at {
            Some(at) => later(at, grace),
            None => later(drain_until, grace),
        };
        tokio::select! {
            biased;
            () = &mut wait => break,
            () = shutdown.abort.cancelled(), if aborted_at.is_none() => {
                aborted_at = Some(Instant::now());
                notifier.status(&format!("stopping: aborting {}", jobs_in_words(pool.in_flight() as u64)));
            }
            () = sleep_until(drain_until), if aborted_at.is_none() => {
                if pool.in_flight() > 0 {
                    tracing::warn!(
                        in_flight = pool.in_flight(),
                        "drain timeout reached; aborting {} in flight (they go back to the queue; the attempt does not count)",
                        jobs_in_words(pool.in_flight() as u64)
                    );
                }
                shutdown.abort.cancel();
            }
            () = sleep_until(end), if aborted_at.is_some() => {
                tracing::error!(
                    "{} workers did not finish {} after the abort; exiting without them ({})",
                    stats.workers.load(Relaxed),
                    humantime::format_duration(grace),
                    left_behind(config)
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
        jobs_in_words(in_flight as u64),
        left.as_secs()
    )
}

/// "1 job", "3 jobs": operators read these lines in `systemctl status`.
fn jobs_in_words(n: u64) -> String {
    if n == 1 {
        "1 job".to_owned()
    } else {
        format!("{n} jobs")
    }
}

fn status_line(
    stats: &Stats,
    paused: &watch::Receiver<Option<Paused>>,
    reload_error: &Option<String>,
) -> String {
    // First, since it is what explains a queue that does not move.
    let paused = if paused.borrow().is_some() {
        "paused (spoold resume to go on); "
    } else {
        ""
    };
    let mut line = format!(
        "{paused}{}/{} busy, {} queued, {} done, {} failed",
        stats.busy.load(Relaxed),
        stats.workers.load(Relaxed),
        stats.queued(),
        stats.done.load(Relaxed),
        stats.failed.load(Relaxed),
    );
    let restarting = stats.handlers_restarting.load(Relaxed);
    if restarting > 0 {
        line.push_str(&format!(
            "; {restarting} persistent handler(s) failing, restarting with a growing delay (see the log)"
        ));
    }
    if let Some(e) = reload_error {
        line.push_str("; reload failed, running on the previous config: ");
        line.push_str(e);
    }
    line
}

/// Pings the watchdog at half its interval, but only while discovery's loop is turning (or the
/// daemon is stopping, which has its own deadline): a hung discovery leads to a restart. It
/// runs until its task is dropped.
async fn watchdog_loop(
    notifier: Arc<Notifier>,
    stats: Arc<Stats>,
    interval: Duration,
    stop: CancellationToken,
) {
    let half = interval / 2;
    loop {
        if stop.is_cancelled() || stats.since_beat() < half {
            notifier.watchdog_ping();
        } else {
            tracing::error!(
                "job discovery has not run for {}; withholding the watchdog ping",
                humantime::format_duration(Duration::from_millis(
                    stats.since_beat().as_millis() as u64
                ))
            );
        }
        tokio::time::sleep(half).await;
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

    /// The watchdog must stop pinging when discovery's loop stops turning, so that systemd
    /// restarts a daemon whose discovery hung; and ping again while it stops.
    #[tokio::test]
    async fn watchdog_pings_only_while_discovery_turns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_nonblocking(true).unwrap();
        let interval = Duration::from_millis(200);
        let notifier = Arc::new(Notifier::with(Some(path.into_os_string()), Some(interval)));
        let stats = Arc::new(Stats::default());
        let stop = CancellationToken::new();
        stats.beat();
        let task = AbortOnDropHandle::new(tokio::spawn(watchdog_loop(
            notifier,
            stats.clone(),
            interval,
            stop.clone(),
        )));

        // A turning discovery loop: pings arrive.
        let mut seen = 0;
        let give_up = Instant::now() + Duration::from_secs(30);
        while seen < 3 && Instant::now() < give_up {
            stats.beat();
            tokio::time::sleep(Duration::from_millis(10)).await;
            seen += pings(&sock);
        }
        assert!(seen >= 3, "pings while discovery turns: {seen}");

        // A hung discovery loop: once its last beat is older than half the interval, no more pings.
        tokio::time::sleep(interval).await;
        pings(&sock);
        tokio::time::sleep(interval * 3).await;
        assert_eq!(pings(&sock), 0, "a ping although discovery is stuck");

        // While stopping, the stop's own deadline bounds the wait: pings resume.
        stop.cancel();
        let mut seen = 0;
        let give_up = Instant::now() + Duration::from_secs(30);
        while seen == 0 && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(10)).await;
            seen += pings(&sock);
        }
        assert!(seen > 0, "pings while stopping");
        drop(task);
    }
}
