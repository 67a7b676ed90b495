//! Deadlines that cannot overflow: a clock reading plus a duration, saturating in the far future.
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

#[cfg(test)]
mod tests {
    use super::*;

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
