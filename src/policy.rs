//! The retry policy: what becomes of a job after an attempt, as a pure function of how the
//! attempt ended, which attempt it was and the `[retry]` config. No I/O and no clock, so every
//! verdict is unit-tested; the jitter is an argument for the same reason.

use std::time::Duration;

use crate::config::RetryConfig;
use crate::job::{Outcome, Report, Verdict};

/// Decides the fate of a job whose attempt number `attempt` ended as `report` says. `jitter`, in
/// `[0, 1)`, places the backoff between half and all of its full length (see [`backoff`]).
pub fn decide(report: &Report, attempt: u32, cfg: &RetryConfig, jitter: f64) -> Verdict {
    match report.outcome {
        Outcome::Succeeded => Verdict::Done,
        Outcome::Aborted | Outcome::LeaseLost => Verdict::Release,
        Outcome::Failed => {
            let permanent = report
                .exit_code
                .is_some_and(|c| cfg.permanent_exit_codes.contains(&c));
            if permanent || attempt >= cfg.max_attempts.get() {
                Verdict::Fail { permanent }
            } else {
                Verdict::Retry {
                    delay: backoff(cfg, attempt, jitter),
                }
            }
        }
    }
}

/// Exponential backoff with jitter: the n-th failure waits between half and all of
/// `backoff_initial * 2^(n-1)`, capped at `backoff_max`; `jitter` (in `[0, 1)`) says where. The
/// jitter keeps jobs that failed together (a database that went away) from all coming back at
/// the same instant.
pub fn backoff(cfg: &RetryConfig, failures: u32, jitter: f64) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(31));
    let full = cfg
        .backoff_initial
        .saturating_mul(factor)
        .min(cfg.backoff_max);
    let half = full / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
    use std::time::SystemTime;

    fn cfg() -> RetryConfig {
        RetryConfig {
            max_attempts: NonZeroU32::new(3).unwrap(),
            backoff_initial: Duration::from_secs(10),
            backoff_max: Duration::from_secs(60),
            permanent_exit_codes: vec![64],
            ..RetryConfig::default()
        }
    }

    fn report(outcome: Outcome, exit_code: Option<i32>) -> Report {
        Report {
            outcome,
            started: SystemTime::UNIX_EPOCH,
            duration: Duration::ZERO,
            exit_code,
            signal: None,
            timed_out: false,
            reason: String::new(),
            stderr_tail: Vec::new(),
        }
    }

    #[test]
    fn every_verdict() {
        let cfg = cfg();
        let decide = |outcome, code, attempt| decide(&report(outcome, code), attempt, &cfg, 0.0);
        assert_eq!(decide(Outcome::Succeeded, Some(0), 1), Verdict::Done);
        // An aborted attempt is released whatever its number: it does not count.
        assert_eq!(decide(Outcome::Aborted, None, 3), Verdict::Release);
        assert_eq!(decide(Outcome::LeaseLost, None, 3), Verdict::Release);
        assert_eq!(
            decide(Outcome::Failed, Some(1), 1),
            Verdict::Retry {
                delay: Duration::from_secs(5)
            }
        );
        assert_eq!(
            decide(Outcome::Failed, Some(1), 2),
            Verdict::Retry {
                delay: Duration::from_secs(10)
            }
        );
        assert_eq!(
            decide(Outcome::Failed, Some(1), 3),
            Verdict::Fail { permanent: false }
        );
        // A permanent code fails at the first attempt; a timeout (no code) is never permanent.
        assert_eq!(
            decide(Outcome::Failed, Some(64), 1),
            Verdict::Fail { permanent: true }
        );
        assert_eq!(
            decide(Outcome::Failed, None, 1),
            Verdict::Retry {
                delay: Duration::from_secs(5)
            }
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let cfg = cfg();
        let secs = Duration::from_secs;
        assert_eq!(backoff(&cfg, 1, 0.0), secs(5));
        assert_eq!(backoff(&cfg, 1, 1.0), secs(10));
        assert_eq!(backoff(&cfg, 3, 0.0), secs(20));
        assert_eq!(backoff(&cfg, 3, 0.5), secs(30));
        assert_eq!(backoff(&cfg, 40, 0.0), secs(30));
        assert_eq!(backoff(&cfg, 40, 1.0), secs(60));
    }
}
