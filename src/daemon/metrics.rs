//! The Prometheus endpoint (`[metrics] listen`): a small HTTP/1.1 server on the daemon's runtime
//! that answers `GET /metrics` in the Prometheus text format, from the shared counters
//! (`Stats`) and a count of the spool's directories.
//!
//! The counters cost the workers nothing more than the atomics they already update; all the
//! work of a scrape (counting the directories, formatting) is done when Prometheus asks. The
//! directory count runs on a blocking thread, since `done/` may hold a million files, and
//! nothing on the daemon's one main thread may wait for that. A count stands for a while
//! ([`stands_for`]): scraped often, a large spool would otherwise spend a good part of a core
//! reading its own directories, under the same directory locks the workers' renames take.

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::daemon::stats::{Finished, Stats};
use crate::source::admin::{Counts, Paused};
use crate::source::spool::Spool;

/// How long a client may take to send its request's headers: a scraper that connects and says
/// nothing must not hold a connection for ever.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest time a count of the spool stands before a scrape counts again: a third of
/// Prometheus's usual 15 s interval, so that its gauges are fresh at every usual scrape, while
/// `spoold top` or a scraper set to every second does not make the daemon read its own
/// directories every second.
const MIN_RECOUNT: Duration = Duration::from_secs(5);
/// A count stands for this many times what it cost, so that counting takes at most a fiftieth
/// of one core however large the spool and however often it is scraped.
const RECOUNT_FACTOR: u32 = 50;

/// How long a count that took `cost` stands.
fn stands_for(cost: Duration) -> Duration {
    cost.saturating_mul(RECOUNT_FACTOR).max(MIN_RECOUNT)
}

/// How long the endpoint waits after a failed accept (out of file descriptors, say) before it
/// tries again, so that a persistent error does not spin the main thread.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why the endpoint could not start.
#[derive(Debug)]
pub struct BindError {
    pub addr: SocketAddr,
    pub error: io::Error,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot serve metrics on {} ([metrics] listen): {}",
            self.addr, self.error
        )
    }
}

/// Binds the endpoint's socket. It is done at start, before any job runs, so that an address
/// in use is a start-up error rather than a daemon that runs without the metrics it was asked
/// for.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    let bound = std::net::TcpListener::bind(addr).and_then(|l| {
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    });
    bound.map_err(|error| BindError { addr, error })
}

/// What a scrape reads.
pub struct Sources {
    pub stats: Arc<Stats>,
    pub spool: Arc<Spool>,
    pub paused: watch::Receiver<Option<Paused>>,
}

/// How many connections the endpoint keeps open at once.
const MAX_CONNECTIONS: usize = 16;

/// Serves `/metrics` on `listener` until `stop` is cancelled; then it returns at once, and
/// the connections still open are dropped with it (a scrape cut short is retried by
/// Prometheus at its next interval).
pub async fn serve(listener: TcpListener, sources: Sources, stop: CancellationToken) {
    let scrape = Arc::new(Scrape {
        sources,
        counted: Mutex::new(None),
    });
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            Some(_) = connections.join_next() => {}
            accepted = listener.accept() => match accepted {
                // Each connection is a descriptor of the daemon's, which its handlers' pipes and
                // pidfds need too: past the bound, a connection is closed at once rather than
                // let anyone who can connect use up the daemon's descriptors. A scraper and a
                // `spoold top` or two need a few.
                Ok((stream, _)) if connections.len() >= MAX_CONNECTIONS => {
                    drop(stream);
                    tracing::debug!("metrics endpoint: {MAX_CONNECTIONS} connections open; one more closed");
                }
                Ok((stream, _)) => {
                    let scrape = scrape.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |req| {
                            let scrape = scrape.clone();
                            async move { Ok::<_, Infallible>(scrape.answer(req).await) }
                        });
                        let _ = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_TIMEOUT)
                            .keep_alive(true)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Err(e) => {
                    tracing::warn!("metrics endpoint: cannot accept a connection: {e}");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            },
        }
    }
}

struct Scrape {
    sources: Sources,
    /// The last count, when it was made and how long it stands. Behind a lock, so that one
    /// directory count runs at a time: scrapers that ask together wait for each other rather
    /// than read a large spool side by side.
    counted: Mutex<Option<Counted>>,
}

struct Counted {
    at: Instant,
    stands: Duration,
    counts: Counts,
}

impl Scrape {
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() != "/metrics" {
            return plain(StatusCode::NOT_FOUND, "spoold serves /metrics only\n");
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
            response
                .headers_mut()
                .insert(ALLOW, "GET, HEAD".parse().expect("a valid header value"));
            return response;
        }
        match self.render().await {
            Ok(text) => {
                let mut response = Response::new(Full::new(Bytes::from(text)));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE
                        .parse()
                        .expect("a valid header value"),
                );
                response
            }
            Err(e) => {
                tracing::warn!("metrics endpoint: {e}");
                plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n"))
            }
        }
    }

    /// The exposition text, or why the spool could not be counted.
    async fn render(&self) -> Result<String, String> {
        let counts = {
            let mut counted = self.counted.lock().await;
            match counted.as_ref() {
                Some(c) if c.at.elapsed() < c.stands => c.counts.clone(),
                _ => {
                    let spool = self.sources.spool.clone();
                    let began = Instant::now();
                    let counts = tokio::task::spawn_blocking(move || spool.counts(true))
                        .await
                        .map_err(|e| format!("counting the spool failed: {e}"))?
                        .map_err(|e| format!("cannot count the spool's jobs: {e}"))?;
                    *counted = Some(Counted {
                        at: began,
                        stands: stands_for(began.elapsed()),
                        counts: counts.clone(),
                    });
                    counts
                }
            }
        };
        let snapshot = Snapshot {
            stats: self.sources.stats.clone(),
            counts,
            paused: self.sources.paused.borrow().is_some(),
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(snapshot));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .map_err(|_| "cannot format the metrics".to_owned())?;
        Ok(text)
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_owned())));
    *response.status_mut() = status;
    response
}

/// Every metric as it stood when the scrape began.
#[derive(Debug)]
struct Snapshot {
    stats: Arc<Stats>,
    counts: Counts,
    paused: bool,
}

impl Snapshot {
    /// Jobs per state, as `spoold status` counts them. A state added to `Counts` gets its line
    /// here.
    fn states(&self) -> [(&'static str, u64); 7] {
        let c = &self.counts;
        [
            ("queued", c.queued),
            ("active", c.active),
            ("retry", c.retry),
            ("scheduled", c.scheduled),
            ("held", c.held),
            ("failed", c.failed),
            ("done", c.done),
        ]
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = &self.stats;

        let mut family = encoder.encode_descriptor(
            "spoold_jobs_finished",
            "Jobs that left a run or a wait since the daemon started, by outcome",
            None,
            MetricType::Counter,
        )?;
        for how in Finished::ALL {
            let labels = [("outcome", how.label())];
            ConstCounter::new(stats.finished_count(how)).encode(family.encode_family(&labels)?)?;
        }

        let mut family = encoder.encode_descriptor(
            "spoold_jobs",
            "Jobs in each state, as last counted in the spool (a count stands 5 s, longer in a large spool)",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in self.states() {
            let labels = [("state", state)];
            ConstGauge::new(n as i64).encode(family.encode_family(&labels)?)?;
        }

        let metric = encoder.encode_descriptor(
            "spoold_oldest_queued_age_seconds",
            "Age of the oldest queued job (by its file's modification time); 0 when none waits",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.counts.oldest_queued_age_s.unwrap_or(0.0)).encode(metric)?;

        let gauges: [(&str, &str, i64); 3] = [
            (
                "spoold_workers_busy",
                "Workers running a handler",
                stats.busy.load(Relaxed) as i64,
            ),
            (
                "spoold_workers",
                "Workers alive",
                stats.workers.load(Relaxed) as i64,
            ),
            (
                "spoold_paused",
                "1 while an operator's pause is in force (spoold pause), else 0",
                i64::from(self.paused),
            ),
        ];
        for (name, help, value) in gauges {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(metric)?;
        }

        for (name, help, histogram) in [
            (
                "spoold_job_run_seconds",
                "How long each attempt's handler ran",
                &stats.run_seconds,
            ),
            (
                "spoold_job_queue_wait_seconds",
                "From a job's submission (its file's modification time) to its first attempt",
                &stats.queue_wait_seconds,
            ),
        ] {
            let (sum, count, buckets) = histogram.snapshot();
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            metric.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quick count stands for five seconds; a slow one for fifty times its cost.
    #[test]
    fn a_count_stands_longer_the_more_it_cost() {
        assert_eq!(stands_for(Duration::from_millis(3)), MIN_RECOUNT);
        assert_eq!(stands_for(Duration::from_secs(1)), Duration::from_secs(50));
    }

    /// The exposition text names every metric with its labels, and a histogram's buckets are
    /// cumulative, ending in +Inf at the count.
    #[test]
    fn snapshot_encodes_every_metric() {
        let stats = Arc::new(Stats::default());
        stats.finished(Finished::Done);
        stats.finished(Finished::Done);
        stats.finished(Finished::Cancelled);
        stats.run_seconds.observe(Duration::from_millis(20));
        stats.run_seconds.observe(Duration::from_secs(2));
        let snapshot = Snapshot {
            stats,
            counts: Counts {
                queued: 3,
                held: 1,
                oldest_queued_age_s: Some(1.5),
                ..Counts::default()
            },
            paused: true,
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(snapshot));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        for line in [
            "spoold_jobs_finished_total{outcome=\"done\"} 2",
            "spoold_jobs_finished_total{outcome=\"cancelled\"} 1",
            "spoold_jobs_finished_total{outcome=\"expired\"} 0",
            "spoold_jobs{state=\"queued\"} 3",
            "spoold_jobs{state=\"held\"} 1",
            "spoold_oldest_queued_age_seconds 1.5",
            "spoold_paused 1",
            "spoold_job_run_seconds_bucket{le=\"0.025\"} 1",
            "spoold_job_run_seconds_bucket{le=\"2.5\"} 2",
            "spoold_job_run_seconds_bucket{le=\"+Inf\"} 2",
            "spoold_job_run_seconds_count 2",
            "spoold_job_queue_wait_seconds_count 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }
}
