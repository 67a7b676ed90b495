//! Where jobs come from and where their outcomes go: the seam between the runner and a queue.
//!
//! The runner (`crate::runner`) knows a job only as a [`Job`]: an ID, an attempt number and a
//! local file for the handler. A [`Source`] claims jobs (`next`) and hands each out as a
//! [`Lease`]; the runner runs the attempt, asks `policy::decide` for a [`Verdict`], and the
//! lease settles it. Everything about where a job lives, how it is claimed and what settling
//! means (renames, records, acknowledgements) stays behind this seam. Dispatch is static: the
//! pool is generic over its source.
//!
//! How each verdict maps to the two sources (ARCHITECTURE.md has the full table):
//!
//! | verdict   | spool (`spool::SpoolSource`)                    | broker (JetStream)                        |
//! |-----------|-------------------------------------------------|-------------------------------------------|
//! | `Done`    | rename to `done/` (or unlink)                   | ack, confirmed                            |
//! | `Retry`   | write `state/NAME`, rename to `retry/`          | write the attempts record, nak with delay |
//! | `Fail`    | write `reasons/NAME`, rename to `failed/`       | publish the dead letter, then term        |
//! | `Release` | rename back to `new/`; the attempt not counted  | nak at once; the attempt not counted      |

use std::future::Future;
use std::os::fd::BorrowedFd;

use tokio_util::sync::CancellationToken;

use crate::job::{Job, Report, Verdict};

pub mod admin;
pub mod jetstream;
pub mod spool;

pub use admin::Admin;

/// A queue that jobs are claimed from.
pub trait Source: Send + Sync + 'static {
    /// A claimed job, until it is settled.
    type Lease<'a>: Lease
    where
        Self: 'a;

    /// Waits for the next job and claims it. Returns None once `stop` is cancelled or the
    /// source has no more jobs to give; a job the source had fetched but not handed out when the
    /// stop came is the source's to put back (the spool never claims before this returns).
    ///
    /// Cancel-safe: dropped while it waits, it has claimed nothing. It must work on a worker's
    /// runtime, which has no timer or I/O driver: it may await only channels, locks and tokens.
    fn next<'a>(
        &'a self,
        stop: &'a CancellationToken,
    ) -> impl Future<Output = Option<Self::Lease<'a>>>;
}

/// A source's hold on one claimed job. The job is the source's again once `settle` returns.
///
/// A lease that must be renewed while the handler runs (a broker's acknowledgement deadline)
/// renews itself; if it cannot, it raises `revoked`, and the runner ends that one attempt as it
/// ends one at an abort, with `Verdict::Release`. The spool's lease never expires.
pub trait Lease {
    /// The job, as the runner and the handler see it.
    fn job(&self) -> Job<'_>;

    /// A descriptor that becomes readable, and stays readable, once the source has lost its
    /// hold on the job. The runner polls it beside the handler and the abort: when it fires,
    /// the handler's group gets SIGTERM, then SIGKILL after `kill_grace`, and the outcome is
    /// `Outcome::LeaseLost`, settled as `Verdict::Release`. None for a lease that cannot be
    /// lost. A descriptor rather than a future, because the runner waits for its handler in
    /// one `poll(2)`, outside any runtime.
    fn revoked(&self) -> Option<BorrowedFd<'_>>;

    /// Carries out `verdict` for the attempt that `report` describes: the job moves on (or is
    /// acknowledged), and the outcome is logged and counted. An error is logged here, and
    /// leaves the job where the source finds it again at the next start.
    fn settle(self, verdict: Verdict, report: Report);
}

/// A report of an attempt that ended with `outcome` (exit status 0, or 1 with a line of
/// stderr), for the tests of the runner's partners.
#[cfg(test)]
pub(crate) fn report(outcome: crate::job::Outcome) -> Report {
    use crate::job::Outcome;
    use std::time::{Duration, SystemTime};
    Report {
        outcome,
        started: SystemTime::now(),
        duration: Duration::ZERO,
        exit_code: Some(if outcome == Outcome::Succeeded { 0 } else { 1 }),
        signal: None,
        timed_out: false,
        reason: "exit status 1".into(),
        stderr_tail: vec!["oops".into()],
    }
}

/// The contract every source keeps towards the runner, for each source's own tests to run
/// against it (`source::spool` does). `submit(id, body)` adds a job; `discover()` lets the
/// source see every job waiting, and every retry as if it were due.
#[cfg(test)]
pub(crate) async fn contract<S: Source>(
    source: &S,
    submit: impl Fn(&str, &str),
    discover: impl Fn(),
) {
    use crate::job::Outcome;
    use std::ffi::OsStr;
    use std::time::Duration;

    let stop = CancellationToken::new();
    let next = async |expect: &str, attempt: u32| {
        // Bounded, so that a source that loses a job fails the test instead of hanging it.
        let lease = tokio::time::timeout(Duration::from_secs(30), source.next(&stop))
            .await
            .unwrap_or_else(|_| panic!("{expect}: not handed out again"))
            .expect("a job is handed out");
        let job = lease.job();
        assert_eq!(job.id, OsStr::new(expect));
        assert_eq!(job.attempt, attempt, "{expect}: the attempt number");
        let body = std::fs::read_to_string(job.path).expect("the job's file can be read");
        assert!(!body.is_empty(), "{expect}: the job's file holds the job");
        lease
    };

    // A job is handed out as its first attempt, with its data in a local file.
    submit("a", "alpha");
    discover();
    let lease = next("a", 1).await;
    // Released (a stop): handed out again, the interrupted attempt not counted.
    lease.settle(Verdict::Release, report(Outcome::Aborted));
    discover();
    let lease = next("a", 1).await;
    // Retried: handed out again once due, as the next attempt.
    lease.settle(
        Verdict::Retry {
            delay: Duration::ZERO,
        },
        report(Outcome::Failed),
    );
    discover();
    let lease = next("a", 2).await;
    // Failed for good, and another job done: neither is handed out again.
    lease.settle(Verdict::Fail { permanent: false }, report(Outcome::Failed));
    submit("b", "beta");
    discover();
    let lease = next("b", 1).await;
    lease.settle(Verdict::Done, report(Outcome::Succeeded));
    discover();
    // After the stop, nothing more is handed out.
    stop.cancel();
    assert!(source.next(&stop).await.is_none());
}
