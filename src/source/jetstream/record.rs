//! A job's record on the broker: its attempts record (`SPOOLD_<q>_ATTEMPTS`, one message per
//! job) and the reason its dead letter carries (`Spoold-Record`), both the JSON of the spool's
//! `failed/` reason records with the host that ran the attempt added; and the marker of a
//! settled job (`SPOOLD_<q>_DONE`).

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::job::{Failure, History, Report};

/// How many failed attempts a record keeps, as in the spool.
const HISTORY_CAP: usize = 20;
/// A dead letter's record travels in a header; stderr lines are cut to keep it small.
const LINE_CAP: usize = 512;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub attempt: u32,
    pub started_at: String,
    pub ended_at: String,
    pub duration_ms: u64,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub reason: String,
    pub stderr_tail: Vec<String>,
    /// The host whose handler made this attempt.
    #[serde(default)]
    pub host: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// Attempts that ended in failure; a stop, an abort or a lost host does not count.
    pub attempts: u32,
    pub first_attempt_at: Option<String>,
    pub next_attempt_unix_ms: Option<u64>,
    pub next_attempt_at: Option<String>,
    pub failed_at: Option<String>,
    pub permanent: bool,
    pub last_failure: Option<FailureRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<FailureRecord>,
}

/// How a delivery was settled, as its marker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SettledAs {
    /// Acknowledged: the handler succeeded.
    Done,
    /// Terminated after its dead letter was written.
    Failed,
    /// Given back with the retry delay after a failed run, once the attempts record that
    /// counts the run was written. The job is not settled for good: it runs again.
    Retry,
}

/// The marker written, with the acknowledgement, when a job is settled. A consumer leader
/// that dies can lose an acknowledgement it already confirmed (it is replicated after the
/// answer), and the job then comes back: an ack wait later, or at once as a first delivery
/// when the record of its delivery was lost too. The marker, a stream write that is confirmed
/// only once a quorum has it, lets that delivery be settled again without running the handler
/// a second time. A failed run's marker says instead that the attempts record counts it: the
/// delivery that comes back at once after such a loss is a first delivery, which would not
/// otherwise read the record, and would run with its count and its retry delay forgotten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    /// The job message's stream sequence: a later submission under the same ID (a retry from
    /// the dead-letter stream) is another message and runs.
    pub sequence: u64,
    pub outcome: SettledAs,
    pub host: String,
    pub at: String,
}

impl SettledAs {
    pub fn word(self) -> &'static str {
        match self {
            SettledAs::Done => "done",
            SettledAs::Failed => "failed",
            SettledAs::Retry => "retry",
        }
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    crate::clock::rfc3339_ms(t)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Record {
    /// The record after attempt `attempt` failed as `report` says, on `host`.
    pub fn after_failure(
        id: &str,
        attempt: u32,
        earlier: Option<&Record>,
        report: Report,
        host: &str,
        now: SystemTime,
    ) -> Record {
        let failure = FailureRecord {
            attempt,
            started_at: rfc3339(report.started),
            ended_at: rfc3339(now),
            duration_ms: report.duration.as_millis() as u64,
            exit_code: report.exit_code,
            signal: report.signal,
            timed_out: report.timed_out,
            reason: report.reason,
            stderr_tail: report
                .stderr_tail
                .into_iter()
                .map(|mut l| {
                    if l.len() > LINE_CAP {
                        let mut cut = LINE_CAP;
                        while !l.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        l.truncate(cut);
                    }
                    l
                })
                .collect(),
            host: host.to_owned(),
        };
        let mut history = earlier.map(|r| r.history.clone()).unwrap_or_default();
        history.push(failure.clone());
        let excess = history.len().saturating_sub(HISTORY_CAP);
        history.drain(..excess);
        Record {
            id: id.to_owned(),
            attempts: attempt,
            first_attempt_at: earlier
                .and_then(|r| r.first_attempt_at.clone())
                .or_else(|| Some(failure.started_at.clone())),
            last_failure: Some(failure),
            history,
            ..Record::default()
        }
    }

    pub fn set_next_attempt(&mut self, due: SystemTime) {
        self.next_attempt_unix_ms = Some(unix_ms(due));
        self.next_attempt_at = Some(rfc3339(due));
    }

    /// Shortens the record until its JSON takes at most `room` bytes, for a dead letter whose
    /// payload leaves little room in the message for the record's header: the oldest entries
    /// of the history go first, then the oldest lines of each stderr tail, then the history
    /// and the reason's length beyond a line. The count, the times and the last failure's
    /// exit status stay. Returns whether anything was cut.
    pub fn fit(&mut self, room: usize) -> bool {
        let len = |r: &Record| serde_json::to_string(r).map_or(usize::MAX, |j| j.len());
        if len(self) <= room {
            return false;
        }
        while self.history.len() > 1 && len(self) > room {
            self.history.remove(0);
        }
        while len(self) > room {
            let tails = self
                .history
                .iter_mut()
                .chain(self.last_failure.as_mut())
                .map(|f| &mut f.stderr_tail)
                .filter(|t| !t.is_empty());
            let mut cut = false;
            for tail in tails {
                tail.remove(0);
                cut = true;
            }
            if !cut {
                break;
            }
        }
        if len(self) > room {
            self.history.clear();
            for failure in self.last_failure.iter_mut() {
                let mut end = failure.reason.len().min(LINE_CAP);
                while !failure.reason.is_char_boundary(end) {
                    end -= 1;
                }
                failure.reason.truncate(end);
            }
        }
        true
    }

    /// How long until the next attempt is due, by this host's clock; None when it is due.
    pub fn due_in(&self, now: SystemTime) -> Option<Duration> {
        let due = self.next_attempt_unix_ms?;
        due.checked_sub(unix_ms(now))
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis)
    }
}

impl From<FailureRecord> for Failure {
    fn from(r: FailureRecord) -> Failure {
        Failure {
            attempt: r.attempt,
            started_at: r.started_at,
            ended_at: r.ended_at,
            duration_ms: r.duration_ms,
            exit_code: r.exit_code,
            signal: r.signal,
            timed_out: r.timed_out,
            reason: r.reason,
            stderr_tail: r.stderr_tail,
        }
    }
}

impl From<Record> for History {
    fn from(r: Record) -> History {
        History {
            id: r.id,
            attempts: r.attempts,
            first_attempt_at: r.first_attempt_at,
            next_attempt_unix_ms: r.next_attempt_unix_ms,
            next_attempt_at: r.next_attempt_at,
            failed_at: r.failed_at,
            permanent: r.permanent,
            last_failure: r.last_failure.map(Failure::from),
            failures: r.history.into_iter().map(Failure::from).collect(),
            // Jobs on a broker have no time to live (enqueue --ttl is refused there).
            expires_unix_ms: None,
            // A broker's job is never recovered: its lease passes, and its deliveries count.
            recoveries: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Outcome;
    use std::time::Duration;

    #[test]
    fn a_record_counts_failures_and_keeps_the_host() {
        let report = Report {
            outcome: Outcome::Failed,
            started: SystemTime::UNIX_EPOCH,
            duration: Duration::from_millis(5),
            exit_code: Some(3),
            signal: None,
            timed_out: false,
            reason: "exit status 3".into(),
            stderr_tail: vec!["x".repeat(2000)],
        };
        let first = Record::after_failure("j", 1, None, report.clone(), "a", SystemTime::now());
        let second = Record::after_failure("j", 2, Some(&first), report, "b", SystemTime::now());
        assert_eq!(second.attempts, 2);
        assert_eq!(second.history.len(), 2);
        assert_eq!(second.first_attempt_at, first.first_attempt_at);
        let last = second.last_failure.clone().unwrap();
        assert_eq!(last.host, "b");
        assert_eq!(last.stderr_tail[0].len(), LINE_CAP);
        let text = serde_json::to_string(&second).unwrap();
        assert!(!text.contains('\n'), "a header value is one line");
        let back: Record = serde_json::from_str(&text).unwrap();
        assert_eq!(History::from(back).attempts, 2);
    }

    #[test]
    fn a_record_too_long_for_its_dead_letter_is_cut_to_fit_oldest_first() {
        let report = |n: u32| Report {
            outcome: Outcome::Failed,
            started: SystemTime::now(),
            duration: Duration::from_millis(5),
            exit_code: Some(3),
            signal: None,
            timed_out: false,
            reason: format!("exit status 3 (run {n})"),
            stderr_tail: (0..10)
                .map(|i| format!("{n}:{i}:{}", "x".repeat(600)))
                .collect(),
        };
        let mut record = None;
        for n in 1..=5 {
            let now = SystemTime::now();
            record = Some(Record::after_failure(
                "j",
                n,
                record.as_ref(),
                report(n),
                "h",
                now,
            ));
        }
        let full = record.unwrap();
        let len = |r: &Record| serde_json::to_string(r).unwrap().len();
        assert!(len(&full) > 25_000, "{}", len(&full));

        let mut fits = full.clone();
        assert!(!fits.fit(len(&full)), "a record that fits is left whole");
        assert_eq!(fits, full);

        // Room for about two runs: the older runs go, the last stays whole.
        let mut two = full.clone();
        assert!(two.fit(12_000));
        assert!(len(&two) <= 12_000);
        assert_eq!(two.history.last(), full.history.last());
        assert_eq!(two.last_failure, full.last_failure);
        assert_eq!(
            (two.attempts, &two.first_attempt_at),
            (5, &full.first_attempt_at)
        );

        // Room for less than one run: its oldest stderr lines go, its newest stay.
        let mut one = full.clone();
        assert!(one.fit(2_500));
        assert!(len(&one) <= 2_500, "{}", len(&one));
        let tail = &one.last_failure.as_ref().unwrap().stderr_tail;
        assert!(
            !tail.is_empty() && tail.last().unwrap().starts_with("5:9:"),
            "{tail:?}"
        );
        assert_eq!(one.last_failure.as_ref().unwrap().exit_code, Some(3));
        assert_eq!(one.attempts, 5);
    }

    #[test]
    fn a_retry_is_due_at_its_time_by_this_clock() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut record = Record::default();
        assert_eq!(
            record.due_in(now),
            None,
            "a record without a retry time is due"
        );
        record.set_next_attempt(now + Duration::from_millis(2_500));
        assert_eq!(record.due_in(now), Some(Duration::from_millis(2_500)));
        assert_eq!(record.due_in(now + Duration::from_secs(3)), None);
        assert_eq!(record.due_in(now + Duration::from_millis(2_500)), None);
    }

    #[test]
    fn a_settled_marker_reads_back_as_written() {
        let marker = Settled {
            sequence: 42,
            outcome: SettledAs::Failed,
            host: "a (pid 1)".into(),
            at: rfc3339(SystemTime::UNIX_EPOCH),
        };
        let text = serde_json::to_string(&marker).unwrap();
        assert!(text.contains("\"outcome\":\"failed\""), "{text}");
        assert_eq!(serde_json::from_str::<Settled>(&text).unwrap(), marker);
    }
}
