//! The on-disk record of a job's failures (`state/NAME`, `reasons/NAME`): its JSON, and the
//! conversions to and from the domain types (`job::History`, `job::Failure`) that the rest of
//! spoold uses. Nothing outside the spool source sees these types, so the file format can only
//! change here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{rfc3339, unix_ms};
use crate::job::{Failure, History, Report};

/// One failed attempt, as `last_failure` in a record. The field names are the file format:
/// records written by any earlier spoold must still read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct FailureRecord {
    attempt: u32,
    started_at: String,
    ended_at: String,
    duration_ms: u64,
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    reason: String,
    stderr_tail: Vec<String>,
}

/// The bookkeeping of one job, in `state/NAME` while it lives and `reasons/NAME` once failed.
/// The optional fields may be missing from a file (read as None), the others may not.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct JobRecord {
    id: String,
    attempts: u32,
    first_attempt_at: Option<String>,
    /// When a waiting retry may run, as milliseconds since the epoch (for spoold) ...
    pub(super) next_attempt_unix_ms: Option<u64>,
    /// ... and as RFC 3339 (for people).
    next_attempt_at: Option<String>,
    failed_at: Option<String>,
    permanent: bool,
    last_failure: Option<FailureRecord>,
    /// Every failed attempt, oldest first, the last [`HISTORY_CAP`] of them. Records written
    /// before it existed lack it (read as empty), and an empty one is not written, so that a
    /// record without it reads and writes back as it was.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    history: Vec<FailureRecord>,
    /// When the job expires unless done (`spoold enqueue --ttl`), in ms since the epoch (for
    /// spoold) and as RFC 3339 (for people). Absent from records of jobs without a time to
    /// live, so that those read and write back as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) expires_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    /// How many times crash recovery found the job in `active/` (its daemon died while it
    /// ran). Records written before it existed lack it (read as 0), and 0 is not written, so
    /// that a record without it reads and writes back as it was.
    #[serde(default, skip_serializing_if = "is_zero")]
    recoveries: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// How many failed attempts a record keeps: enough to see a pattern across retries, while a
/// job retried without end cannot grow its record without end.
pub(super) const HISTORY_CAP: usize = 20;

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

impl From<Failure> for FailureRecord {
    fn from(f: Failure) -> FailureRecord {
        FailureRecord {
            attempt: f.attempt,
            started_at: f.started_at,
            ended_at: f.ended_at,
            duration_ms: f.duration_ms,
            exit_code: f.exit_code,
            signal: f.signal,
            timed_out: f.timed_out,
            reason: f.reason,
            stderr_tail: f.stderr_tail,
        }
    }
}

impl From<JobRecord> for History {
    fn from(r: JobRecord) -> History {
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
            expires_unix_ms: r.expires_unix_ms,
            recoveries: r.recoveries,
        }
    }
}

impl From<History> for JobRecord {
    fn from(h: History) -> JobRecord {
        JobRecord {
            id: h.id,
            attempts: h.attempts,
            first_attempt_at: h.first_attempt_at,
            next_attempt_unix_ms: h.next_attempt_unix_ms,
            next_attempt_at: h.next_attempt_at,
            failed_at: h.failed_at,
            permanent: h.permanent,
            last_failure: h.last_failure.map(FailureRecord::from),
            history: h.failures.into_iter().map(FailureRecord::from).collect(),
            expires_at: h
                .expires_unix_ms
                .map(|ms| rfc3339(UNIX_EPOCH + Duration::from_millis(ms))),
            expires_unix_ms: h.expires_unix_ms,
            recoveries: h.recoveries,
        }
    }
}

/// The failure of attempt number `attempt`, which ended at `ended` as `report` says.
pub(super) fn failure(attempt: u32, report: Report, ended: SystemTime) -> Failure {
    Failure {
        attempt,
        started_at: rfc3339(report.started),
        ended_at: rfc3339(ended),
        duration_ms: report.duration.as_millis() as u64,
        exit_code: report.exit_code,
        signal: report.signal,
        timed_out: report.timed_out,
        reason: report.reason,
        stderr_tail: report.stderr_tail,
    }
}

/// The history of job `shown` after attempt `attempt` failed at `now` as `report` says; the
/// time of its first attempt is kept from `earlier`, its history before this attempt.
pub(super) fn after_failure(
    shown: &str,
    attempt: u32,
    earlier: Option<&History>,
    report: Report,
    now: SystemTime,
) -> History {
    let failure = failure(attempt, report, now);
    // A record from a spoold that kept only the last failure starts the list with that one.
    let mut failures = match earlier {
        Some(h) if h.failures.is_empty() => h.last_failure.iter().cloned().collect(),
        Some(h) => h.failures.clone(),
        None => Vec::new(),
    };
    failures.push(failure.clone());
    let excess = failures.len().saturating_sub(HISTORY_CAP);
    failures.drain(..excess);
    History {
        id: shown.to_owned(),
        attempts: attempt,
        first_attempt_at: earlier
            .and_then(|h| h.first_attempt_at.clone())
            .or_else(|| Some(failure.started_at.clone())),
        last_failure: Some(failure),
        failures,
        // A time to live holds for the whole life of the job, across its retries; so does the
        // count of its recoveries, which bounds crashes, not attempts.
        expires_unix_ms: earlier.and_then(|h| h.expires_unix_ms),
        recoveries: earlier.map_or(0, |h| h.recoveries),
        ..History::default()
    }
}

/// Sets when the next attempt of a job with history `h` may run.
pub(super) fn set_next_attempt(h: &mut History, due: SystemTime) {
    h.next_attempt_unix_ms = Some(unix_ms(due));
    h.next_attempt_at = Some(rfc3339(due));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as an earlier spoold wrote it reads, and writes back, field for field.
    #[test]
    fn the_file_format_round_trips() {
        let text = r#"{"id":"j","attempts":2,"first_attempt_at":"2024-01-01T00:00:00.000Z","next_attempt_unix_ms":1704067260000,"next_attempt_at":"2024-01-01T00:01:00.000Z","failed_at":null,"permanent":false,"last_failure":{"attempt":2,"started_at":"a","ended_at":"b","duration_ms":5,"exit_code":3,"signal":null,"timed_out":false,"reason":"exit status 3","stderr_tail":["x"]}}"#;
        let record: JobRecord = serde_json::from_str(text).unwrap();
        let back = JobRecord::from(History::from(record.clone()));
        assert_eq!(back, record);
        assert_eq!(serde_json::to_string(&back).unwrap(), text);

        // The same record with a history of two attempts also round-trips.
        let with = text.replacen(
            "]}}",
            r#"]},"history":[{"attempt":1,"started_at":"c","ended_at":"d","duration_ms":4,"exit_code":null,"signal":9,"timed_out":true,"reason":"timeout","stderr_tail":[]},{"attempt":2,"started_at":"a","ended_at":"b","duration_ms":5,"exit_code":3,"signal":null,"timed_out":false,"reason":"exit status 3","stderr_tail":["x"]}]}"#,
            1,
        );
        let record: JobRecord = serde_json::from_str(&with).unwrap();
        let history = History::from(record.clone());
        assert_eq!(history.failures.len(), 2);
        assert_eq!(history.failures[0].signal, Some(9));
        let back = JobRecord::from(history);
        assert_eq!(back, record);
        assert_eq!(serde_json::to_string(&back).unwrap(), with);
    }

    /// Each failure adds to the history, which an old record (only a last failure) seeds, and
    /// which keeps only the last HISTORY_CAP attempts.
    #[test]
    fn the_history_grows_from_old_records_and_is_capped() {
        let report = |reason: &str| Report {
            outcome: crate::job::Outcome::Failed,
            started: SystemTime::now(),
            duration: std::time::Duration::ZERO,
            exit_code: Some(1),
            signal: None,
            timed_out: false,
            reason: reason.to_owned(),
            stderr_tail: Vec::new(),
        };
        let old: JobRecord = serde_json::from_str(
            r#"{"id":"j","attempts":1,"permanent":false,"last_failure":{"attempt":1,"started_at":"a","ended_at":"b","duration_ms":5,"exit_code":3,"signal":null,"timed_out":false,"reason":"first","stderr_tail":[]}}"#,
        )
        .unwrap();
        let mut h = History::from(old);
        h = after_failure("j", 2, Some(&h), report("second"), SystemTime::now());
        let reasons: Vec<_> = h.failures.iter().map(|f| f.reason.as_str()).collect();
        assert_eq!(reasons, ["first", "second"]);
        for attempt in 3..=30 {
            h = after_failure("j", attempt, Some(&h), report("again"), SystemTime::now());
        }
        assert_eq!(h.failures.len(), HISTORY_CAP);
        assert_eq!(h.failures.last().unwrap().attempt, 30);
        assert_eq!(h.failures[0].attempt, 30 - HISTORY_CAP as u32 + 1);
    }

    /// A record written before recoveries were counted reads as 0 and writes back without the
    /// field; a count reads, writes back and survives a failed attempt.
    #[test]
    fn the_count_of_recoveries_defaults_to_zero_and_is_kept() {
        let text = r#"{"id":"j","attempts":1,"first_attempt_at":null,"next_attempt_unix_ms":null,"next_attempt_at":null,"failed_at":null,"permanent":false,"last_failure":null}"#;
        let record: JobRecord = serde_json::from_str(text).unwrap();
        let h = History::from(record.clone());
        assert_eq!(h.recoveries, 0);
        assert_eq!(serde_json::to_string(&JobRecord::from(h)).unwrap(), text);

        let counted = text.replacen('}', r#","recoveries":2}"#, 1);
        let record: JobRecord = serde_json::from_str(&counted).unwrap();
        let h = History::from(record);
        assert_eq!(h.recoveries, 2);
        assert_eq!(
            serde_json::to_string(&JobRecord::from(h.clone())).unwrap(),
            counted
        );
        let report = Report {
            exit_code: Some(1),
            ..Report::without_run("exit status 1".to_owned())
        };
        let after = after_failure("j", 2, Some(&h), report, SystemTime::now());
        assert_eq!((after.attempts, after.recoveries), (2, 2));
    }

    /// Optional fields may be missing from a file; the others may not.
    #[test]
    fn optional_fields_may_be_missing() {
        let record: JobRecord =
            serde_json::from_str(r#"{"id":"j","attempts":1,"permanent":true}"#).unwrap();
        assert_eq!(History::from(record).attempts, 1);
        assert!(serde_json::from_str::<JobRecord>(r#"{"id":"j","permanent":true}"#).is_err());
    }
}
