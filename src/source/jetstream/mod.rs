//! The NATS JetStream source: several hosts consume one work-queue stream, each job leased by
//! the acknowledgement deadline, renewed by confirmed in-progress heartbeats, and settled by
//! confirmed acknowledgements (ARCHITECTURE.md, "The JetStream source").
//!
//! The runner's workers call `next` and `settle` on threads whose runtimes have no timer or
//! I/O driver, so nothing of the NATS client runs there. The client, the claimer and every
//! lease's heartbeat live on the daemon's main runtime; a worker asks the claimer for a job
//! through a channel, and hands a verdict to the main runtime and waits for its end. The
//! claimer pulls only as many messages as there are workers asking, so that no job's ack wait
//! runs while it waits in a buffer.
//!
//! The lease rule: the server redelivers a job `ack_wait` after the last in-progress
//! heartbeat it received. A host that has had no heartbeat confirmed for
//! `ack_wait - progress_interval` has lost the job: it raises `revoked` (the runner ends the
//! handler's group: SIGTERM, then SIGKILL after `kill_grace`) and sends nothing more for that
//! delivery, so no late acknowledgement from it can settle a job another host runs. Each
//! acknowledgement is sent only while the lease holds and the connection is up; the two runs
//! of one job overlap for at most `kill_grace - progress_interval` (none with the defaults).

pub mod admin;
pub mod broker;
pub mod payload;
pub mod record;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, Message};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, JetStreamConfig};
use crate::daemon::stats::{Finished, Stats};
use crate::job::{Job, Outcome, Report, Verdict, display_name};
use crate::source::{Lease, Source};
use broker::{BrokerError, Names, confirmed, confirmed_bytes, header, nak};
use payload::{Fetched, ObjectRef};
use record::{Record, Settled, SettledAs, rfc3339};

/// How long one pull waits at the server for jobs. Short, because a stopping host's last pull
/// stays registered at the server until it expires, and whatever it catches is handed back.
const FETCH_EXPIRES: Duration = Duration::from_secs(1);
/// The pause after a failed pull, doubling up to the maximum: an election answers every pull
/// with an error for 4-7 s, and an unpaused claimer would spin.
const PULL_PAUSE: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(2));
/// How often an unanswered outcome is sent again while the lease holds.
const RESEND_EVERY: Duration = Duration::from_millis(500);
/// How long a stop waits for the hand-back of one aborted job before leaving it to the ack
/// wait: a broker that cannot be reached must not hold the stop.
pub(crate) const HANDBACK_WITHIN: Duration = Duration::from_secs(1);
/// The least time an outcome is sent again and again while the broker answers the heartbeat
/// but refuses the outcome; see `while_leased`.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
/// A retry due within this is run now, not given back: it was timed by another host's clock,
/// and hosts' clocks differ by a little.
const NOT_YET: Duration = Duration::from_secs(1);
/// How often a host writes its entry in the hosts stream.
const HOST_BEAT: Duration = Duration::from_secs(5);
/// How long after its pull's expiry a stopping host's catch comes back: the server's clock for
/// that expiry starts a little after this host's, when the pull request arrives.
const AFTER_LAST_PULL: Duration = Duration::from_millis(100);

/// The headers of a job message.
pub const ID_HEADER: &str = "Spoold-Id";
pub const GENERATION_HEADER: &str = "Spoold-Generation";
pub const RECORD_HEADER: &str = "Spoold-Record";
pub const HOST_HEADER: &str = "Spoold-Host";

/// What every lease and the claimer share; it lives on the main runtime's side.
struct Shared {
    handle: tokio::runtime::Handle,
    client: Client,
    js: jetstream::Context,
    names: Names,
    ack_wait: Duration,
    progress: Duration,
    /// `jetstream.max_unsettled_deliveries`.
    max_unsettled: u64,
    /// This host as records and logs name it: "HOSTNAME (pid N)".
    host: String,
    scratch: PathBuf,
    stats: Arc<Stats>,
    stop: CancellationToken,
    abort: CancellationToken,
}

/// A worker's request for a job: the claimer answers with one delivery.
type Claim = oneshot::Sender<Delivery>;

/// The JetStream source; see the module documentation.
pub struct JetStreamSource {
    shared: Arc<Shared>,
    claims: mpsc::Sender<Claim>,
}

/// What a started source gives the supervisor besides itself.
pub struct Started {
    pub source: JetStreamSource,
    /// Returns once the claimer has seen the stop (it goes on handing back what its last pull
    /// brings, on its own task).
    pub claimer: JoinHandle<io::Result<()>>,
    /// The connection as STATUS= should show it: empty while connected.
    pub broker_status: watch::Receiver<String>,
    /// The claimer itself, which ends once its last pull has expired and what that pull
    /// brought after the stop is handed back. The supervisor waits for it after the drain
    /// (bounded by [`CLAIMER_AFTER_STOP`]): a host that exited with its last pull still
    /// registered at the server could catch its own handed-back job and take it into the
    /// void, where it would wait out the ack wait.
    pub last_pull: JoinHandle<()>,
}

/// How long the claimer may take to end after the stop: its last pull's expiry, and slack.
pub const CLAIMER_AFTER_STOP: Duration = Duration::from_millis(1500);

/// One delivery of a job, claimed for a worker. One dropped before it is settled goes back to
/// the queue (see its `Drop`).
struct Delivery {
    shared: Arc<Shared>,
    id: String,
    shown: String,
    path: PathBuf,
    attempt: u32,
    generation: u32,
    /// The message's stream sequence, which its settled marker names; None when the server's
    /// reply subject did not carry it.
    sequence: Option<u64>,
    reply: String,
    headers: HeaderMap,
    /// The message's body as the cluster delivered it (empty when the payload is an object),
    /// for its dead letter: the file handed to the handler is the handler's to change or
    /// replace (with a FIFO, say), so it is never read back.
    payload: Bytes,
    record: Option<Record>,
    lease: Arc<LeaseState>,
    revoked: OwnedFd,
}

/// A delivery is settled by `settle`, or handed back by the claimer when no worker takes it;
/// one dropped otherwise was on its way to a worker that went away (a reload or a stop came in
/// that instant: a worker's wait for its next job is dropped then). Its heartbeat would keep
/// the job from every host for as long as the daemon runs: it ends, and the job goes back to
/// the queue at once.
impl Drop for Delivery {
    fn drop(&mut self) {
        if self.lease.settled.is_cancelled() {
            return;
        }
        self.lease.settled.cancel();
        if let Err(e) = fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(
                job_id = self.shown,
                "cannot remove {}: {e}",
                self.path.display()
            );
        }
        // A lease already lost may be another host's delivery by now: nothing is sent.
        if self.lease.lost.load(Relaxed) {
            return;
        }
        tracing::info!(
            job_id = self.shown,
            "job handed back to the queue unsettled: the worker it was for went away (a \
             reload or a stop came as it arrived)"
        );
        let shared = self.shared.clone();
        let (reply, shown) = (self.reply.clone(), self.shown.clone());
        // After a stop, once this host's last pull is over, so that it cannot catch the job
        // again (see `Pull::after_stop`).
        let delay = if shared.stop.is_cancelled() {
            FETCH_EXPIRES + AFTER_LAST_PULL
        } else {
            Duration::ZERO
        };
        self.shared.handle.spawn(async move {
            handback(&shared, &reply, &shown, "its worker went away", delay).await;
        });
    }
}

/// A delivery's lease, shared by its heartbeat and its settle.
struct LeaseState {
    /// Milliseconds since `epoch` at which the last confirmed heartbeat (or the delivery) was
    /// sent: the server's deadline runs from no earlier than that.
    epoch: Instant,
    last_ok_ms: AtomicU64,
    /// Set once the lease is given up; nothing more is sent for the delivery.
    lost: AtomicBool,
    /// Cancelled when the delivery is settled: the heartbeat ends.
    settled: CancellationToken,
    /// `ack_wait - progress_interval`: how long without a confirmed heartbeat the lease holds.
    limit: Duration,
}

impl LeaseState {
    /// A lease of `limit` that runs from `since`: the moment the pull that brought the delivery
    /// was sent, no later than the server's deadline for it began. A delivery may wait behind
    /// the others of its pull (their records to read, a large payload to fetch), and that
    /// wait is part of its ack wait.
    fn new(since: Instant, limit: Duration) -> LeaseState {
        LeaseState {
            epoch: since,
            last_ok_ms: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            settled: CancellationToken::new(),
            limit,
        }
    }

    fn confirmed_at(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last_ok_ms.fetch_max(ms, Relaxed);
    }

    /// How long the lease holds from now: zero once it is lost.
    fn left(&self) -> Duration {
        if self.lost.load(Relaxed) {
            return Duration::ZERO;
        }
        let last = self.epoch + Duration::from_millis(self.last_ok_ms.load(Relaxed));
        (last + self.limit).saturating_duration_since(Instant::now())
    }
}

pub struct JetStreamLease<'a> {
    source: &'a JetStreamSource,
    delivery: Delivery,
}

impl JetStreamSource {
    /// Connects (waiting up to `connect_timeout`), checks or creates the topology, empties the
    /// scratch area and starts the claimer and this host's liveness beat. Must run on the
    /// main runtime, which keeps the client.
    pub async fn start(
        config: &Config,
        stats: Arc<Stats>,
        stop: CancellationToken,
        abort: CancellationToken,
    ) -> Result<Started, BrokerError> {
        let js_config = config
            .jetstream
            .as_ref()
            .expect("backend.kind = \"jetstream\" has a [jetstream] table (config check)");
        let scratch = config.spool.dir.join("jetstream").join("active");
        clear_scratch(&scratch).map_err(|e| {
            BrokerError::Topology(format!(
                "cannot prepare the scratch directory {}: {e}",
                scratch.display()
            ))
        })?;
        let host = host_name();
        let (status_tx, status_rx) = watch::channel(String::new());
        let (client, denied) = connect_with_events(js_config, &host, status_tx).await?;
        let js = broker::context(&client);
        let names = Names::new(&js_config.queue);
        let consumer = topology(&js, &names, js_config, &denied).await?;
        let shared = Arc::new(Shared {
            handle: tokio::runtime::Handle::current(),
            client,
            js,
            names,
            ack_wait: js_config.ack_wait,
            progress: js_config.progress_interval,
            max_unsettled: u64::from(js_config.max_unsettled_deliveries),
            host,
            scratch,
            stats,
            stop: stop.clone(),
            abort,
        });
        let (claims_tx, claims_rx) = mpsc::channel(64);
        let last_pull = tokio::spawn(claimer(shared.clone(), consumer, claims_rx));
        tokio::spawn(host_beat(
            shared.clone(),
            config.workers.count.get(),
            SystemTime::now(),
        ));
        // The supervisor waits for this at the stop; the claimer's own task hands back what its
        // last pull brings and ends by itself.
        let claimer = tokio::spawn(async move {
            stop.cancelled().await;
            Ok(())
        });
        Ok(Started {
            source: JetStreamSource {
                shared,
                claims: claims_tx,
            },
            claimer,
            broker_status: status_rx,
            last_pull,
        })
    }
}

/// The topology checked (or created), retried through an election until `connect_timeout`.
///
/// `denied` holds a Permissions Violation the connection's events reported: the server never
/// answers such a request, so it looks like a timeout here, but waiting cannot fix the user's
/// JWT, so it ends the start at once as a config error.
async fn topology(
    js: &jetstream::Context,
    names: &Names,
    config: &JetStreamConfig,
    denied: &Mutex<Option<String>>,
) -> Result<PullConsumer, BrokerError> {
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    let mut pause = PULL_PAUSE.0;
    loop {
        let result = async {
            broker::ensure_topology(js, names, config).await?;
            js.get_consumer_from_stream(&names.consumer, &names.stream)
                .await
                .map_err(|e| {
                    BrokerError::Unavailable(format!(
                        "consumer {}/{}: {e}",
                        names.stream, names.consumer
                    ))
                })
        }
        .await;
        if let (Err(BrokerError::Unavailable(e)), Some(violation)) = (
            &result,
            denied.lock().unwrap_or_else(|p| p.into_inner()).take(),
        ) {
            return Err(BrokerError::Topology(format!(
                "the servers refused a request of spoold's user: {violation} (give the \
                 jetstream.creds_file user the permissions README.md lists; {e})"
            )));
        }
        match result {
            Err(BrokerError::Unavailable(e)) if tokio::time::Instant::now() + pause < deadline => {
                tracing::info!("jetstream not ready yet ({e}); trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(PULL_PAUSE.1);
            }
            Err(BrokerError::Unavailable(e)) => {
                return Err(BrokerError::Unavailable(format!(
                    "{e} (gave up after jetstream.connect_timeout, {})",
                    humantime::format_duration(config.connect_timeout)
                )));
            }
            other => return other,
        }
    }
}

/// Connects with an event callback that logs the connection's changes and shows a lost one
/// in STATUS=.
async fn connect_with_events(
    config: &JetStreamConfig,
    host: &str,
    status: watch::Sender<String>,
) -> Result<(Client, broker::Denied), BrokerError> {
    let on_event: broker::OnEvent = Arc::new(move |event| match event {
        async_nats::Event::Disconnected => {
            tracing::warn!(
                "jetstream: connection lost; reconnecting (jobs in flight keep running while \
                 their lease holds)"
            );
            status.send_replace(format!(
                "broker: disconnected since {}",
                rfc3339(SystemTime::now())
            ));
        }
        async_nats::Event::Connected => {
            if !status.borrow().is_empty() {
                tracing::info!("jetstream: connected again");
            }
            status.send_replace(String::new());
        }
        other => tracing::debug!("jetstream: {other}"),
    });
    broker::connect(config, &format!("spoold {host}"), on_event).await
}

fn host_name() -> String {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{name} (pid {})", std::process::id())
}

/// Empties the scratch directory: in broker mode nothing there is a job (a host that died
/// holds nothing another host needs; its jobs come back after the ack wait).
fn clear_scratch(scratch: &Path) -> io::Result<()> {
    fs::create_dir_all(scratch)?;
    for entry in fs::read_dir(scratch)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(entry.path())?;
        } else {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

impl Source for JetStreamSource {
    type Lease<'a> = JetStreamLease<'a>;

    async fn next<'a>(&'a self, stop: &'a CancellationToken) -> Option<JetStreamLease<'a>> {
        loop {
            let (tx, rx) = oneshot::channel();
            tokio::select! {
                biased;
                () = stop.cancelled() => return None,
                sent = self.claims.send(tx) => sent.ok()?,
            }
            // Dropped here (a stop, a reload), the claimer finds the request closed and hands
            // back what it had for it; a delivery already sent is handed back by its drop.
            let delivery = tokio::select! {
                biased;
                () = stop.cancelled() => return None,
                delivery = rx => delivery.ok()?,
            };
            if crate::fault::drop_delivery() {
                drop(delivery);
                continue;
            }
            return Some(JetStreamLease {
                source: self,
                delivery,
            });
        }
    }
}

impl Lease for JetStreamLease<'_> {
    fn job(&self) -> Job<'_> {
        let d = &self.delivery;
        Job {
            id: OsStr::new(&d.id),
            shown: &d.shown,
            path: &d.path,
            attempt: d.attempt,
        }
    }

    fn revoked(&self) -> Option<BorrowedFd<'_>> {
        Some(self.delivery.revoked.as_fd())
    }

    fn settle(self, verdict: Verdict, report: Report) {
        let shared = self.source.shared.clone();
        let delivery = self.delivery;
        // The worker's thread waits for the outcome on a plain channel: its own runtime has
        // nothing else to run meanwhile, and the broker I/O needs the main runtime's drivers.
        let (tx, rx) = std::sync::mpsc::channel();
        shared.handle.clone().spawn(async move {
            settle(&shared, delivery, verdict, report).await;
            let _ = tx.send(());
        });
        // An Err means the main runtime is gone (the process is ending): nothing left to do.
        let _ = rx.recv();
    }
}

/// Carries out `verdict` for `d`; see the table in `source/mod.rs`.
async fn settle(shared: &Shared, d: Delivery, verdict: Verdict, report: Report) {
    let stats = &shared.stats;
    let lost = d.lease.lost.load(Relaxed) || report.outcome == Outcome::LeaseLost;
    if lost {
        // Another host may run it now: nothing is sent for this delivery, not even a nak,
        // which could hand back the other host's delivery.
        d.lease.lost.store(true, Relaxed);
        tracing::warn!(
            job_id = d.shown,
            host = shared.host,
            "lease lost: the job was not acknowledged and runs again (here or on another host)"
        );
        stats.finished(Finished::Aborted);
        finish(&d);
        return;
    }
    match verdict {
        Verdict::Done => {
            // The marker and the acknowledgement go together: each is sent until confirmed
            // while the lease holds, and waiting for the marker first would add a round trip
            // to every job.
            let (marked, acked) = tokio::join!(
                while_leased(shared, &d, || mark(shared, &d, SettledAs::Done)),
                async {
                    if crate::fault::lose_ack() {
                        return Ok(());
                    }
                    while_leased(shared, &d, || confirmed(&shared.client, &d.reply, b"+ACK")).await
                },
            );
            if let Err(e) = marked {
                unmarked(&d, &e);
            }
            match acked {
                Ok(()) => {
                    stats.finished(Finished::Done);
                    tracing::info!(job_id = d.shown, host = shared.host, "job done");
                    if d.record.is_some() {
                        forget_record(shared, &d.id).await;
                    }
                    if let Some(object) = ObjectRef::of(Some(&d.headers)) {
                        payload::forget(&shared.js, &shared.names, &object, &d.shown).await;
                    }
                }
                Err(e) => unconfirmed(&d, &e),
            }
        }
        Verdict::Retry { delay } => {
            let now = SystemTime::now();
            let mut record = Record::after_failure(
                &d.shown,
                d.attempt,
                d.record.as_ref(),
                report,
                &shared.host,
                now,
            );
            record.set_next_attempt(now + delay);
            // The count first: a nak whose record was not written would rerun the attempt
            // with the same number, which is the safe side.
            let written = while_leased(shared, &d, || write_record(shared, &d.id, &record)).await;
            let result = match written {
                Ok(()) => {
                    // The marker, once the record has the count, and before the nak: should
                    // the cluster forget this delivery and the nak's delay, the job comes back
                    // at once as a first delivery, and the marker sends it to the record. Not
                    // beside the nak: the heartbeat runs until the delivery is finished, and a
                    // `+WPI` after the nak would start the ack wait again in place of the
                    // backoff; and a marker written late could replace the done marker of
                    // another host that has run the job meanwhile.
                    let marked =
                        while_leased(shared, &d, || mark(shared, &d, SettledAs::Retry)).await;
                    if let Err(e) = marked {
                        tracing::warn!(
                            job_id = d.shown,
                            "retry marker not written ({e}); should the cluster forget this \
                             delivery, the job's attempts are counted again from 1"
                        );
                    }
                    while_leased(shared, &d, || {
                        confirmed_bytes(&shared.client, &d.reply, nak(delay))
                    })
                    .await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    stats.finished(Finished::Retried);
                    tracing::info!(
                        job_id = d.shown,
                        attempt = d.attempt,
                        "job failed; retry in {}",
                        humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
                    );
                }
                Err(e) => unconfirmed(&d, &e),
            }
        }
        Verdict::Fail { permanent } => {
            let now = SystemTime::now();
            let mut record = Record::after_failure(
                &d.shown,
                d.attempt,
                d.record.as_ref(),
                report,
                &shared.host,
                now,
            );
            record.permanent = permanent;
            record.failed_at = Some(rfc3339(now));
            let result = async {
                // The dead letter first, then the term: a crash in between reruns the job,
                // and the second dead letter replaces the first (one per job).
                while_leased(shared, &d, || dead_letter(shared, &d, &record)).await?;
                let (marked, termed) = tokio::join!(
                    while_leased(shared, &d, || mark(shared, &d, SettledAs::Failed)),
                    while_leased(shared, &d, || confirmed(&shared.client, &d.reply, b"+TERM")),
                );
                if let Err(e) = marked {
                    unmarked(&d, &e);
                }
                termed
            }
            .await;
            match result {
                Ok(()) => {
                    stats.finished(Finished::Failed);
                    tracing::warn!(
                        job_id = d.shown,
                        attempts = d.attempt,
                        permanent,
                        "job failed for good; in the dead-letter stream {}",
                        shared.names.failed_stream
                    );
                    forget_record(shared, &d.id).await;
                }
                Err(e) => unconfirmed(&d, &e),
            }
        }
        Verdict::Release => {
            // Handed back at once, so another host starts it now rather than after the ack
            // wait; bounded, so that a broker that does not answer cannot hold the stop.
            let handback = tokio::time::timeout(
                HANDBACK_WITHIN.min(d.lease.left()),
                confirmed_bytes(&shared.client, &d.reply, nak(Duration::ZERO)),
            )
            .await;
            stats.finished(Finished::Aborted);
            match handback {
                Ok(Ok(())) => tracing::info!(
                    job_id = d.shown,
                    "job handed back to the queue; the attempt does not count"
                ),
                _ => tracing::warn!(
                    job_id = d.shown,
                    "job not handed back (the broker did not answer); it runs again after \
                     the ack wait"
                ),
            }
        }
    }
    finish(&d);
}

fn unconfirmed(d: &Delivery, why: &str) {
    tracing::error!(
        job_id = d.shown,
        "outcome not confirmed ({why}); the job may run again"
    );
}

fn unmarked(d: &Delivery, why: &str) {
    tracing::warn!(
        job_id = d.shown,
        "settled marker not written ({why}); should the cluster lose the acknowledgement, the \
         job runs again"
    );
}

/// Writes the marker that says this delivery was settled as `outcome`; see [`Settled`].
async fn mark(shared: &Shared, d: &Delivery, outcome: SettledAs) -> Result<(), String> {
    let Some(sequence) = d.sequence else {
        return Ok(());
    };
    let marker = Settled {
        sequence,
        outcome,
        host: shared.host.clone(),
        at: rfc3339(SystemTime::now()),
    };
    let body = serde_json::to_vec(&marker).map_err(|e| e.to_string())?;
    let mut headers = HeaderMap::new();
    // A resend after a lost answer is then one marker, not two; each failed run has its own.
    headers.insert(
        "Nats-Msg-Id",
        format!("{}.s{sequence}.{}{}", d.id, outcome.word(), d.attempt).as_str(),
    );
    let ack = shared
        .js
        .publish_with_headers(shared.names.done_subject(&d.id), headers, body.into())
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map(drop).map_err(|e| e.to_string())
}

/// The delivery is settled: its heartbeat ends and its scratch file goes.
fn finish(d: &Delivery) {
    d.lease.settled.cancel();
    if let Err(e) = fs::remove_file(&d.path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(job_id = d.shown, "cannot remove {}: {e}", d.path.display());
    }
}

/// Runs `op` until it succeeds, as long as the lease holds and no abort asks to give up,
/// sending only while the connection is up (a request queued while disconnected could reach
/// the server after the lease is gone).
async fn while_leased<F, Fut>(shared: &Shared, d: &Delivery, mut op: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut last = String::from("the lease ran out before the broker answered");
    // The heartbeat renews the lease for as long as the broker answers it, so a request the
    // broker refuses for good (a permission, a limit of the stream) would be sent forever and
    // hold the worker: it is given up after an ack wait, and at least a minute, which rides
    // out the election of another stream's leader, and the job comes back.
    let give_up_after = shared.ack_wait.max(GIVE_UP_AFTER);
    let give_up = Instant::now() + give_up_after;
    loop {
        let left = d.lease.left();
        if left.is_zero() {
            return Err(last);
        }
        let Some(until_give_up) = give_up.checked_duration_since(Instant::now()) else {
            return Err(format!(
                "{last}; given up after {}",
                humantime::format_duration(give_up_after)
            ));
        };
        if shared.client.connection_state() == async_nats::connection::State::Connected {
            match tokio::time::timeout(left.min(until_give_up), op()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last = e,
                Err(_) => last = "the lease ran out before the broker answered".to_owned(),
            }
        } else {
            last = "disconnected from the broker".to_owned();
        }
        // One try at least; after an abort no more, so that the stop keeps its bound.
        if shared.abort.is_cancelled() {
            return Err(format!("{last}; given up at the abort"));
        }
        tokio::select! {
            () = tokio::time::sleep(RESEND_EVERY.min(d.lease.left())) => {}
            () = shared.abort.cancelled(), if !shared.abort.is_cancelled() => {}
        }
    }
}

async fn write_record(shared: &Shared, id: &str, record: &Record) -> Result<(), String> {
    let body = serde_json::to_vec(record).map_err(|e| e.to_string())?;
    let ack = shared
        .js
        .publish(shared.names.attempts_subject(id), body.into())
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map(drop).map_err(|e| e.to_string())
}

/// Removes a job's attempts record, best effort: a leaked one expires with the stream's
/// max age.
async fn forget_record(shared: &Shared, id: &str) {
    let subject = shared.names.attempts_subject(id);
    let purged = async {
        let stream = shared
            .js
            .get_stream_no_info(&shared.names.attempts_stream)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .purge()
            .filter(subject)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
    .await;
    if let Err(e) = purged {
        tracing::debug!(job_id = id, "attempts record not removed: {e}");
    }
}

async fn dead_letter(shared: &Shared, d: &Delivery, record: &Record) -> Result<(), String> {
    // A job whose payload is an object keeps it there: its dead letter carries the headers
    // that name it, and no body (the payload would not fit in one message).
    let body = if ObjectRef::of(Some(&d.headers)).is_some() {
        Bytes::new()
    } else {
        d.payload.clone()
    };
    publish_dead_letter(shared, &d.id, d.generation, d.headers.clone(), body, record).await
}

async fn publish_dead_letter(
    shared: &Shared,
    id: &str,
    generation: u32,
    mut headers: HeaderMap,
    body: Bytes,
    record: &Record,
) -> Result<(), String> {
    headers.insert("Nats-Msg-Id", format!("{id}.failed.g{generation}").as_str());
    headers.insert(ID_HEADER, id);
    headers.insert(GENERATION_HEADER, generation.to_string().as_str());
    // The record travels in a header, and the payload may take all but a few kilobytes of the
    // server's largest message: a dead letter too large would be refused at every try, and
    // the job would never leave the queue.
    let room = shared
        .client
        .server_info()
        .max_payload
        .saturating_sub(body.len() + header_bytes(&headers) + RECORD_HEADER.len() + 64);
    let mut record = record.clone();
    if record.fit(room) {
        tracing::warn!(
            job_id = id,
            "the dead letter's record was shortened to fit beside the payload: older runs or \
             older stderr lines left out"
        );
    }
    let json = serde_json::to_string(&record).map_err(|e| e.to_string())?;
    headers.insert(RECORD_HEADER, json.as_str());
    let ack = shared
        .js
        .publish_with_headers(shared.names.failed_subject(id), headers, body)
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map(drop).map_err(|e| e.to_string())
}

/// What `headers` take in a message: `NATS/1.0`, each `Name: value` line and the blank line.
fn header_bytes(headers: &HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            values
                .iter()
                .map(|v| AsRef::<str>::as_ref(name).len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n\r\n".len() + lines
}

/// A pulled message that [`reject`] dead-letters.
struct Pulled<'a> {
    reply: &'a str,
    headers: &'a HeaderMap,
    id: &'a str,
    shown: &'a str,
    /// The server's delivery count of the message.
    delivered: u64,
    /// The message's body: the payload, unless the headers name an object that holds it.
    payload: &'a Bytes,
}

/// Dead-letters a delivery that must not run (its payload object is missing or damaged, or
/// too many of its deliveries ended without an outcome) without running the handler: the
/// reason says why, the job is terminated, and the dead letter keeps the payload (or the
/// object reference), so that `spoold retry` can run it again. Handing it back instead would
/// redeliver it forever. Should any step fail, the job comes back shortly and this runs again
/// (the dead letter is deduplicated).
async fn reject(shared: &Shared, pulled: &Pulled<'_>, earlier: Option<&Record>, reason: String) {
    let &Pulled {
        reply,
        headers,
        id,
        shown,
        delivered,
        payload,
    } = pulled;
    // An object's bytes stay in the object store; the dead letter names it in its headers.
    let body = if ObjectRef::of(Some(headers)).is_some() {
        Bytes::new()
    } else {
        payload.clone()
    };
    let again = soon(delivered, shared.ack_wait);
    let generation = header(Some(headers), GENERATION_HEADER)
        .and_then(|g| g.parse().ok())
        .unwrap_or(0);
    let report = Report::without_run(reason.clone());
    let now = report.started;
    let attempt = earlier.map_or(1, |r| r.attempts + 1);
    let mut record = Record::after_failure(shown, attempt, earlier, report, &shared.host, now);
    record.permanent = true;
    record.failed_at = Some(rfc3339(now));
    let result = async {
        publish_dead_letter(shared, id, generation, headers.clone(), body, &record).await?;
        confirmed(&shared.client, reply, b"+TERM").await
    }
    .await;
    match result {
        Ok(()) => {
            shared.stats.finished(Finished::Failed);
            tracing::warn!(
                job_id = shown,
                "job failed for good without running: {reason}; in the dead-letter stream {}",
                shared.names.failed_stream
            );
            if earlier.is_some() {
                forget_record(shared, id).await;
            }
        }
        Err(e) => {
            tracing::warn!(
                job_id = shown,
                "{reason}; the dead letter was not confirmed ({e}): trying again in {}",
                humantime::format_duration(again)
            );
            let _ = confirmed_bytes(&shared.client, reply, nak(again)).await;
        }
    }
}

/// What the claimer knows of its latest pull, for what it hands back after a stop.
struct Pull {
    /// When the pull was sent: the deadline of each delivery it brings runs from later.
    sent: Instant,
    /// When the pull expires at the server (give or take the request's trip there).
    ends: Instant,
    /// The stream sequences handed back since the stop.
    caught: HashSet<u64>,
}

impl Pull {
    /// The delay of the hand-back of message `sequence` after a stop. The first time, none:
    /// another host's waiting pull gets it at once (the server serves waiting pulls in turn).
    /// Caught again, no other host took it, and this host's last pull could catch it once for
    /// each idle worker, each catch a delivery without an outcome: it comes back only once that
    /// pull has expired.
    fn after_stop(&mut self, sequence: u64) -> Duration {
        if self.caught.insert(sequence) {
            Duration::ZERO
        } else {
            self.ends.saturating_duration_since(Instant::now()) + AFTER_LAST_PULL
        }
    }
}

/// The claimer: pulls as many jobs as workers ask for, and hands each to one of them.
async fn claimer(shared: Arc<Shared>, consumer: PullConsumer, mut claims: mpsc::Receiver<Claim>) {
    let mut waiting: Vec<Claim> = Vec::new();
    let mut pull = Pull {
        sent: Instant::now(),
        ends: Instant::now(),
        caught: HashSet::new(),
    };
    let mut pause = PULL_PAUSE.0;
    loop {
        shared.stats.beat();
        waiting.retain(|c| !c.is_closed());
        if shared.stop.is_cancelled() {
            break;
        }
        if waiting.is_empty() {
            tokio::select! {
                biased;
                () = shared.stop.cancelled() => break,
                claim = claims.recv() => match claim {
                    Some(c) => waiting.push(c),
                    None => break,
                },
                // The watchdog is fed while the loop turns, also when every worker is busy.
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        }
        while let Ok(c) = claims.try_recv() {
            waiting.push(c);
        }
        waiting.retain(|c| !c.is_closed());
        if waiting.is_empty() {
            continue;
        }
        pull.sent = Instant::now();
        pull.ends = pull.sent + FETCH_EXPIRES;
        let pulled = consumer
            .batch()
            .max_messages(waiting.len())
            .expires(FETCH_EXPIRES)
            .messages()
            .await;
        let mut batch = match pulled {
            Ok(batch) => batch,
            Err(e) => {
                tracing::debug!("jetstream pull failed: {e}; pausing {pause:?}");
                pull_pause(&shared, &mut pause).await;
                continue;
            }
        };
        let mut failed = false;
        // Read to the end even after a stop: what the pull brings is handed back (at once, or
        // once this pull is over: `Pull::after_stop`).
        while let Some(message) = batch.next().await {
            match message {
                Ok(message) => {
                    let delivered = deliver(&shared, message, &mut waiting, &mut pull);
                    beating(&shared, delivered).await;
                }
                Err(e) => {
                    tracing::debug!("jetstream pull ended: {e}");
                    failed = !e.to_string().contains("timed out");
                    break;
                }
            }
        }
        if failed {
            pull_pause(&shared, &mut pause).await;
        } else {
            pause = PULL_PAUSE.0;
        }
    }
}

/// Awaits `work` while feeding the watchdog every second: a delivery may take a while (a large
/// payload streamed from the object store, records read through an election), each of its
/// steps bounded, and the claimer's loop is not stuck meanwhile. A runtime that stops turning
/// stops this too, which is what the watchdog is there to catch.
async fn beating(shared: &Shared, work: impl std::future::Future<Output = ()>) {
    tokio::pin!(work);
    loop {
        tokio::select! {
            () = &mut work => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => shared.stats.beat(),
        }
    }
}

async fn pull_pause(shared: &Shared, pause: &mut Duration) {
    tokio::select! {
        () = shared.stop.cancelled() => {}
        () = tokio::time::sleep(*pause) => {}
    }
    *pause = (*pause * 2).min(PULL_PAUSE.1);
}

/// A job's ID from its message: `Spoold-Id`, else `Nats-Msg-Id`, else its stream sequence;
/// only a name that is safe as a file name and a subject token is taken.
fn job_id(headers: Option<&HeaderMap>, sequence: u64) -> String {
    let safe = |s: &&str| broker::is_job_token(s);
    header(headers, ID_HEADER)
        .filter(safe)
        .or_else(|| header(headers, "Nats-Msg-Id").filter(safe))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("seq{sequence}"))
}

/// How many deliveries of a job ended with no outcome, counted at its delivery number
/// `delivered` (the server's count, from 1) when its attempts record counts `failed_runs`.
///
/// Every earlier delivery ended in one of three ways: a failed run, which wrote the record
/// before its nak; a done or dead-lettered job, which is never delivered again (a lost
/// acknowledgement is caught by the settled marker before this count); or nothing that
/// counts: a stop's or an abort's hand-back, a lost lease, a host that died, a delivery that
/// could not read its records or payload. Saturating, because the record belongs to the job
/// ID, not to the message: one left behind by an earlier message of the same ID (its removal
/// is best effort) may count more failures than this message has had deliveries.
fn unsettled(delivered: u64, failed_runs: u32) -> u64 {
    delivered
        .saturating_sub(1)
        .saturating_sub(u64::from(failed_runs))
}

/// The nak delay of a delivery that could not be started for a reason that may pass (its
/// records or payload could not be read, a local resource ran out): 1 s, doubling with each
/// delivery, at most `ack_wait`. Each such delivery counts as one without an outcome, so a
/// short outage must not use up `max_unsettled_deliveries` in seconds; a long one uses it up
/// no faster than hosts that die would.
fn soon(delivered: u64, ack_wait: Duration) -> Duration {
    let doublings = delivered.saturating_sub(1).min(12) as u32;
    Duration::from_secs(1u64 << doublings).min(ack_wait)
}

/// Gives back a delivery that could not start for `why`, a reason that may pass: logged, and
/// back after [`soon`].
async fn later(shared: &Shared, reply: &str, shown: &str, delivered: u64, why: &str) {
    let delay = soon(delivered, shared.ack_wait);
    tracing::warn!(
        job_id = shown,
        "{why}; trying again in {}",
        humantime::format_duration(delay)
    );
    let _ = confirmed_bytes(&shared.client, reply, nak(delay)).await;
}

/// The reason a job's dead letter gives when `count` of its deliveries ended with no outcome.
fn unsettled_reason(count: u64) -> String {
    format!(
        "{count} deliveries ended without an outcome (no done, no failure): the host that had \
         it stopped, lost it or died each time (a handler that crashes its host?); not run \
         again after jetstream.max_unsettled_deliveries"
    )
}

/// Turns a pulled message into a delivery for a waiting worker, or hands it back (after a
/// stop, as [`Pull::after_stop`] says).
async fn deliver(
    shared: &Arc<Shared>,
    message: Message,
    waiting: &mut Vec<Claim>,
    pull: &mut Pull,
) {
    let Some(reply) = message.reply.as_ref().map(|r| r.to_string()) else {
        return;
    };
    let (delivered, sequence) = match message.info() {
        Ok(info) => (
            u64::try_from(info.delivered).unwrap_or(1).max(1),
            info.stream_sequence,
        ),
        Err(_) => (1, 0),
    };
    let headers = message.headers.clone().unwrap_or_default();
    let id = job_id(message.headers.as_ref(), sequence);
    let shown = display_name(OsStr::new(&id));
    if shared.stop.is_cancelled() {
        let delay = pull.after_stop(sequence);
        handback(shared, &reply, &shown, "stopping", delay).await;
        return;
    }
    tracing::debug!(job_id = shown, delivered, sequence, "job delivered");
    let sequence = (sequence > 0).then_some(sequence);
    let lease = Arc::new(LeaseState::new(
        pull.sent,
        shared.ack_wait - shared.progress,
    ));
    // Every delivery reads the job's settled marker first: one the cluster has settled may
    // come back. A consumer leader that dies can lose an acknowledgement it already confirmed,
    // and with it the record of the delivery itself, so the job comes back as a redelivery or
    // even as a first delivery; its marker, confirmed by a quorum, says it was settled, and it
    // is settled again without a run. Attempts count handler runs that failed: a redelivery
    // also reads the record, which only a failure writes (an abort or a lost host writes
    // none); a first delivery reads it only when the marker says a run of this very message
    // failed, which is how a forgotten failed delivery shows.
    let reads = async {
        if delivered > 1 {
            let (record, marker) = tokio::join!(read_record(shared, &id), read_marker(shared, &id));
            return record.and_then(|record| marker.map(|marker| (record, marker)));
        }
        let marker = read_marker(shared, &id).await?;
        let record = match &marker {
            Some(m) if m.outcome == SettledAs::Retry && Some(m.sequence) == sequence => {
                read_record(shared, &id).await?
            }
            _ => None,
        };
        Ok((record, marker))
    };
    // A stop does not wait for a cluster that is slow to answer: the job goes back.
    let read = tokio::select! {
        biased;
        () = shared.stop.cancelled() => {
            let delay = pull.after_stop(sequence.unwrap_or(0));
            handback(shared, &reply, &shown, "stopping", delay).await;
            return;
        }
        read = reads => read,
    };
    let (record, marker) = match read {
        Ok(read) => read,
        Err(e) => {
            let why = format!("cannot read the job's records: {e}");
            return later(shared, &reply, &shown, delivered, &why).await;
        }
    };
    if let Some(marker) = marker.filter(|m| Some(m.sequence) == sequence) {
        match marker.outcome {
            SettledAs::Done | SettledAs::Failed => {
                let body: &'static [u8] = if marker.outcome == SettledAs::Done {
                    b"+ACK"
                } else {
                    b"+TERM"
                };
                resettle(shared, &reply, &shown, &marker, body).await;
                // The host that settled it may have died before it deleted the object.
                if marker.outcome == SettledAs::Done
                    && let Some(object) = ObjectRef::of(Some(&headers))
                {
                    payload::forget(&shared.js, &shared.names, &object, &shown).await;
                }
                return;
            }
            // The cluster forgot a failed delivery and the delay its nak asked for: the job
            // waits out the rest of its backoff, as it would have.
            SettledAs::Retry if delivered == 1 => {
                let wait = record
                    .as_ref()
                    .and_then(|r| r.due_in(SystemTime::now()))
                    .filter(|&wait| wait > NOT_YET);
                if let Some(wait) = wait {
                    tracing::info!(
                        job_id = shown,
                        attempts = record.as_ref().map_or(0, |r| r.attempts),
                        "job delivered before its retry is due: the cluster forgot its failed \
                         delivery; given back for {}",
                        humantime::format_duration(Duration::from_millis(wait.as_millis() as u64))
                    );
                    handback(shared, &reply, &shown, "retry not due", wait).await;
                    return;
                }
            }
            SettledAs::Retry => {}
        }
    }
    // A job whose deliveries keep ending with no outcome is most likely one whose handler
    // takes its host down (the OOM killer, a kernel bug); run again, it would take down host
    // after host, forever. It goes to the dead letters, with its payload, without running.
    let pulled = Pulled {
        reply: &reply,
        headers: &headers,
        id: &id,
        shown: &shown,
        delivered,
        payload: &message.payload,
    };
    let count = unsettled(delivered, record.as_ref().map_or(0, |r| r.attempts));
    if count >= shared.max_unsettled {
        reject(shared, &pulled, record.as_ref(), unsettled_reason(count)).await;
        return;
    }
    let attempt = record.as_ref().map_or(1, |r| r.attempts + 1);
    let generation = header(Some(&headers), GENERATION_HEADER)
        .and_then(|g| g.parse().ok())
        .unwrap_or(0);
    let revoked = match rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(job_id = shown, "cannot create the lease's eventfd: {e}");
            let delay = soon(delivered, shared.ack_wait);
            handback(shared, &reply, &shown, "no eventfd", delay).await;
            return;
        }
    };
    let signal = match revoked.try_clone() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(job_id = shown, "cannot duplicate the lease's eventfd: {e}");
            let delay = soon(delivered, shared.ack_wait);
            handback(shared, &reply, &shown, "no eventfd", delay).await;
            return;
        }
    };
    // The lease is kept from here on, so that a large payload that takes a while to arrive
    // does not lose it.
    tokio::spawn(heartbeat(
        shared.clone(),
        reply.clone(),
        lease.clone(),
        signal,
        shown.clone(),
    ));
    let path = shared.scratch.join(format!("{id}.{delivered}"));
    if let Some(object) = ObjectRef::of(Some(&headers)) {
        // Streamed, not held: the object may be far larger than a message. A stop ends the
        // read and hands the job back; a cluster that does not answer brings it back soon.
        match payload::fetch(&shared.js, &shared.names, &object, &path, &shared.stop).await {
            Fetched::Whole => {}
            Fetched::Stopped => {
                lease.settled.cancel();
                let delay = pull.after_stop(sequence.unwrap_or(0));
                handback(shared, &reply, &shown, "stopping", delay).await;
                return;
            }
            Fetched::Failed(e) => {
                lease.settled.cancel();
                let why = format!("cannot read the job's payload: {e}");
                return later(shared, &reply, &shown, delivered, &why).await;
            }
            Fetched::Missing(reason) | Fetched::Damaged(reason) => {
                lease.settled.cancel();
                reject(shared, &pulled, record.as_ref(), reason).await;
                return;
            }
        }
    } else if let Err(e) = write_payload(&path, &message.payload) {
        lease.settled.cancel();
        // A file cut short by a full disk goes, or each delivery would leave another.
        let _ = fs::remove_file(&path);
        tracing::error!(job_id = shown, "cannot write the job's file: {e}");
        let delay = soon(delivered, shared.ack_wait);
        handback(shared, &reply, &shown, "no scratch file", delay).await;
        return;
    }
    let mut delivery = Delivery {
        shared: shared.clone(),
        id,
        shown,
        path,
        attempt,
        generation,
        sequence,
        reply,
        headers,
        payload: message.payload.clone(),
        record,
        lease,
        revoked,
    };
    // A delivery that waited behind the others of its pull until its lease ran out may be on
    // another host by now: it does not run here, and nothing is sent for it.
    if delivery.lease.left().is_zero() {
        delivery.lease.lost.store(true, Relaxed);
        delivery.lease.settled.cancel();
        let _ = fs::remove_file(&delivery.path);
        tracing::warn!(
            job_id = delivery.shown,
            "lease ran out before the job could start (it waited behind the other jobs of its \
             pull); left to the ack wait"
        );
        return;
    }
    while let Some(claim) = waiting.pop() {
        match claim.send(delivery) {
            Ok(()) => return,
            Err(back) => delivery = back,
        }
    }
    // Every worker that asked has gone (a stop): the job goes back.
    delivery.lease.settled.cancel();
    let _ = fs::remove_file(&delivery.path);
    let delay = pull.after_stop(delivery.sequence.unwrap_or(0));
    handback(
        shared,
        &delivery.reply,
        &delivery.shown,
        "no worker waits for it",
        delay,
    )
    .await;
}

/// Gives a delivery back after `delay` (a nak, bounded): another host, or a worker here, gets
/// it then rather than after the ack wait.
async fn handback(shared: &Shared, reply: &str, shown: &str, why: &str, delay: Duration) {
    tracing::debug!(job_id = shown, "handing the job back: {why}");
    let _ = tokio::time::timeout(
        HANDBACK_WITHIN,
        confirmed_bytes(&shared.client, reply, nak(delay)),
    )
    .await;
}

fn write_payload(path: &Path, payload: &Bytes) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(path)?;
    file.write_all(payload)
}

/// Settles again a delivery of a job that its marker says was settled: the cluster lost the
/// acknowledgement. Not counted again; should the answer not come, the job comes back after
/// the ack wait and this runs again. `body` is the acknowledgement that settles it as the
/// marker says: `+ACK` for done, `+TERM` for failed.
async fn resettle(
    shared: &Shared,
    reply: &str,
    shown: &str,
    marker: &Settled,
    body: &'static [u8],
) {
    match confirmed(&shared.client, reply, body).await {
        Ok(()) => tracing::warn!(
            job_id = shown,
            host = shared.host,
            "job redelivered although it was {} on {} at {}: the cluster lost its \
             acknowledgement; settled again without running it",
            marker.outcome.word(),
            marker.host,
            marker.at
        ),
        Err(e) => tracing::warn!(
            job_id = shown,
            "job redelivered although it was {} on {} at {}; settling it again was not \
             confirmed ({e}): it comes back after the ack wait",
            marker.outcome.word(),
            marker.host,
            marker.at
        ),
    }
}

/// The job's settled marker, read directly from any replica of the marker stream that is
/// current: every delivery reads it, and a direct read costs the servers less than one through
/// the stream leader. A replica may trail the quorum by moments, but a marker that matters was
/// confirmed seconds before its job came back (an election, or an ack wait, in between).
async fn read_marker(shared: &Shared, id: &str) -> Result<Option<Settled>, String> {
    let subject = shared.names.done_subject(id);
    let stream = shared
        .js
        .get_stream_no_info(&shared.names.done_stream)
        .await
        .map_err(|e| e.to_string())?;
    match stream.direct_get_last_for_subject(subject).await {
        Ok(message) => serde_json::from_slice(&message.payload)
            .map(Some)
            .map_err(|e| format!("the settled marker is not spoold's: {e}")),
        Err(e) if matches!(e.kind(), jetstream::stream::DirectGetErrorKind::NotFound) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

async fn read_record(shared: &Shared, id: &str) -> Result<Option<Record>, String> {
    let subject = shared.names.attempts_subject(id);
    read_last(
        shared,
        &shared.names.attempts_stream,
        &subject,
        "attempts record",
    )
    .await
}

/// The last message on `subject` of `stream`, as spoold's JSON `what`; None when there is none.
async fn read_last<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    stream: &str,
    subject: &str,
    what: &str,
) -> Result<Option<T>, String> {
    let stream = shared
        .js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| e.to_string())?;
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => serde_json::from_slice(&message.payload)
            .map(Some)
            .map_err(|e| format!("the {what} is not spoold's: {e}")),
        Err(e)
            if matches!(
                e.kind(),
                jetstream::stream::LastRawMessageErrorKind::NoMessageFound
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Keeps one delivery's lease: a confirmed in-progress heartbeat every `progress_interval`;
/// once none has been confirmed for the lease's limit, the lease is lost and `revoked` fires.
async fn heartbeat(
    shared: Arc<Shared>,
    reply: String,
    lease: Arc<LeaseState>,
    revoked: OwnedFd,
    shown: String,
) {
    loop {
        let wait = shared.progress.min(lease.left());
        tokio::select! {
            () = lease.settled.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        if lease.settled.is_cancelled() {
            return;
        }
        if lease.left().is_zero() {
            lease.lost.store(true, Relaxed);
            tracing::warn!(
                job_id = shown,
                host = shared.host,
                "lease lost: no heartbeat confirmed for {}; ending the handler (the job goes \
                 to another host)",
                humantime::format_duration(lease.limit)
            );
            let _ = rustix::io::write(&revoked, &1u64.to_ne_bytes());
            return;
        }
        if shared.client.connection_state() != async_nats::connection::State::Connected {
            continue;
        }
        let sent = Instant::now();
        let answer = tokio::time::timeout(
            shared.progress.min(lease.left()),
            confirmed(&shared.client, &reply, b"+WPI"),
        )
        .await;
        match answer {
            Ok(Ok(())) => lease.confirmed_at(sent),
            Ok(Err(e)) => tracing::debug!(job_id = shown, "heartbeat not confirmed: {e}"),
            Err(_) => tracing::debug!(job_id = shown, "heartbeat not confirmed in time"),
        }
    }
}

/// This host's entry in the hosts stream, every few seconds while it runs: what `spoold
/// status` lists as the hosts consuming.
async fn host_beat(shared: Arc<Shared>, workers: usize, started: SystemTime) {
    let key: String = shared
        .host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let subject = shared.names.host_subject(&key);
    let started = rfc3339(started);
    loop {
        let entry = serde_json::json!({
            "host": shared.host,
            "workers": workers,
            "busy": shared.stats.busy.load(Relaxed),
            "done": shared.stats.done.load(Relaxed),
            "failed": shared.stats.failed.load(Relaxed),
            "started_at": started,
            "version": env!("CARGO_PKG_VERSION"),
        });
        if let Ok(ack) = shared
            .js
            .publish(subject.clone(), entry.to_string().into())
            .await
        {
            let _ = ack.await;
        }
        tokio::select! {
            () = shared.stop.cancelled() => return,
            () = tokio::time::sleep(HOST_BEAT) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_runs_out_limit_after_its_last_confirmed_heartbeat() {
        let lease = LeaseState::new(Instant::now(), Duration::from_millis(200));
        assert!(lease.left() > Duration::from_millis(150));
        std::thread::sleep(Duration::from_millis(120));
        lease.confirmed_at(Instant::now());
        assert!(lease.left() > Duration::from_millis(150), "renewed");
        lease.lost.store(true, Relaxed);
        assert_eq!(
            lease.left(),
            Duration::ZERO,
            "a lost lease is never renewed"
        );
    }

    #[test]
    fn a_lease_runs_from_its_pull_not_from_when_its_turn_came() {
        let pulled = Instant::now()
            .checked_sub(Duration::from_millis(150))
            .unwrap();
        let lease = LeaseState::new(pulled, Duration::from_millis(200));
        assert!(
            lease.left() <= Duration::from_millis(50),
            "{:?}",
            lease.left()
        );
        let pulled = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
        let lease = LeaseState::new(pulled, Duration::from_millis(200));
        assert_eq!(lease.left(), Duration::ZERO, "a wait longer than the lease");
    }

    /// The count at each delivery of a job's life, as the server numbers them, for a life
    /// written as one letter per delivery: `f` a failed run (its record written, then the
    /// nak), `u` one that ended without an outcome (a hand-back, a lost lease, a dead host).
    fn counts(life: &str) -> Vec<u64> {
        let mut failed_runs = 0;
        life.chars()
            .enumerate()
            .map(|(i, how)| {
                let count = unsettled(i as u64 + 1, failed_runs);
                if how == 'f' {
                    failed_runs += 1;
                }
                count
            })
            .collect()
    }

    #[test]
    fn only_deliveries_without_an_outcome_count_towards_the_bound() {
        // max_attempts failures in a row never count, however many there are.
        assert!(counts(&"f".repeat(1000)).iter().all(|&c| c == 0));
        // A host that dies each time: one more at each delivery.
        assert_eq!(counts("uuuu"), [0, 1, 2, 3]);
        // Failures between them do not count, and do not reset the count either.
        assert_eq!(counts("ufufuf"), [0, 1, 1, 2, 2, 3]);
        // A record left by an earlier message of the same ID counts more failures than this
        // message has had deliveries: never below zero.
        assert_eq!(unsettled(1, 1), 0);
        assert_eq!(unsettled(2, 5), 0);
        // `spoold retry` publishes a new message (delivered from 1) and purges the record.
        assert_eq!(unsettled(1, 0), 0);
    }

    #[test]
    fn a_delivery_that_cannot_start_comes_back_later_each_time() {
        let ack_wait = Duration::from_secs(30);
        let delays: Vec<u64> = (1..=8).map(|d| soon(d, ack_wait).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(soon(u64::MAX, Duration::from_secs(3600)).as_secs(), 3600);
        // Ten deliveries of an outage take minutes, not ten seconds.
        let ten: u64 = (1..=10).map(|d| soon(d, ack_wait).as_secs()).sum();
        assert!(ten >= 150, "{ten}");
    }

    #[test]
    fn a_job_id_is_taken_only_when_safe() {
        let mut h = HeaderMap::new();
        assert_eq!(job_id(Some(&h), 7), "seq7");
        h.insert("Nats-Msg-Id", "a.b");
        assert_eq!(job_id(Some(&h), 7), "seq7");
        h.insert(ID_HEADER, "01JABC");
        assert_eq!(job_id(Some(&h), 7), "01JABC");
    }
}
