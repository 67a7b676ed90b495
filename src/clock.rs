//! Deadlines that cannot overflow (a clock reading plus a duration, saturating in the far
//! future), and times written as text without a panic.
//!
//! `Instant + Duration` panics when the sum does not fit the clock, and a panic on a worker
//! thread used to stall the queue silently. The config bounds every duration, but deadlines are
//! also built from sums of them and from times read from the spool, so every one is computed
//! here, where an overflow means "never" instead of a panic.

use std::time::{Duration, SystemTime};

/// How far away "never" is: beyond any deadline spoold sets, and within what every clock can
/// hold (tokio's own "far future" is 30 years too).
pub const NEVER: Duration = Duration::from_secs(86_400 * 365 * 30);

/// A clock reading that a duration can be added to without panicking.
pub trait Clock: Copy {
    fn checked(self, by: Duration) -> Option<Self>;
}

impl Clock for std::time::Instant {
    fn checked(self, by: Duration) -> Option<Self> {
        self.checked_add(by)
    }
}

impl Clock for tokio::time::Instant {
    fn checked(self, by: Duration) -> Option<Self> {
        self.checked_add(by)
    }
}

impl Clock for SystemTime {
    fn checked(self, by: Duration) -> Option<Self> {
        self.checked_add(by)
    }
}

/// `from + by`, or `from + NEVER` when that does not fit the clock. Should even that not fit,
/// `from` itself: a deadline that comes at once is still better than a panic.
pub fn later<T: Clock>(from: T, by: Duration) -> T {
    from.checked(by)
        .or_else(|| from.checked(by.min(NEVER)))
        .unwrap_or(from)
}

/// The last moment RFC 3339 text can show: 9999-12-31T23:59:59.999Z.
const LAST_WRITABLE: Duration = Duration::from_millis(253_402_300_799_999);

/// A time as records and logs show it: RFC 3339, UTC, milliseconds. humantime writes no year
/// past 9999 (and no time before 1970), and its `to_string` would panic on one; a record that
/// was forged or damaged can hold such a time, so it is shown as the nearest it can write.
pub fn rfc3339_ms(t: SystemTime) -> String {
    let t = t.clamp(
        SystemTime::UNIX_EPOCH,
        SystemTime::UNIX_EPOCH + LAST_WRITABLE,
    );
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_time_is_written_without_a_panic() {
        let at = |ms: u64| rfc3339_ms(SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(1_000), "1970-01-01T00:00:01.000Z");
        assert_eq!(at(300_000_000_000_000), "9999-12-31T23:59:59.999Z");
        assert_eq!(at(u64::MAX), "9999-12-31T23:59:59.999Z");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(rfc3339_ms(before), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn huge_durations_saturate_instead_of_panicking() {
        let now = std::time::Instant::now();
        assert_eq!(
            later(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert_eq!(later(now, Duration::MAX), now + NEVER);
        let now = tokio::time::Instant::now();
        assert_eq!(later(now, Duration::MAX), now + NEVER);
        let now = SystemTime::now();
        assert_eq!(later(now, Duration::MAX), now + NEVER);
    }
}
