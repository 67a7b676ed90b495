//! Test-only switches, in debug builds only: deliberate panics (`SPOOLD_TEST_PANIC=worker|dispatcher|stop`),
//! a shorter age for the sweep of `tmp/` (`SPOOLD_TEST_TMP_MAX_AGE`), a pause inside
//! `spoold enqueue`'s limited publication (`SPOOLD_TEST_PUBLISH_PAUSE`), a broker
//! acknowledgement left out (`SPOOLD_TEST_LOSE_ACK`), a broker delivery dropped on its way to
//! a worker (`SPOOLD_TEST_DROP_DELIVERY`), a pause as a spool attempt is settled
//! (`SPOOLD_TEST_SETTLE_PAUSE`), and one inside a broker `retry` (`SPOOLD_TEST_RETRY_PAUSE`).
//!
//! Once the time arithmetic could no longer overflow, no known panic was left, yet the path a
//! panic takes (logged with its thread, the abort path, exit status 70, crash recovery at the
//! next start) still needs a test. The tests run the debug binary with this variable set. In a
//! release build the variable is never read and [`hit`] is empty, so no such switch ships.

/// Where a deliberate panic can be raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// In a worker, just after it claimed a job (the job is in `active/`).
    Worker,
    /// In the dispatcher, as its first scan of `new/` begins.
    Dispatcher,
    /// In the supervisor, as the stop sequence begins.
    Stop,
}

#[cfg(debug_assertions)]
static ARMED: std::sync::OnceLock<Option<Point>> = std::sync::OnceLock::new();

/// Reads `SPOOLD_TEST_PANIC` once, at the start of `spoold run`. An unknown value is refused
/// with the values it may take, rather than silently arming nothing.
#[cfg(debug_assertions)]
pub fn arm_from_env() -> Result<(), String> {
    let point = match std::env::var("SPOOLD_TEST_PANIC").ok().as_deref() {
        None | Some("") => None,
        Some("worker") => Some(Point::Worker),
        Some("dispatcher") => Some(Point::Dispatcher),
        Some("stop") => Some(Point::Stop),
        Some(other) => {
            return Err(format!(
                "SPOOLD_TEST_PANIC={other:?}: expected worker, dispatcher or stop"
            ));
        }
    };
    let _ = ARMED.set(point);
    Ok(())
}

/// Release builds have no fault injection.
#[cfg(not(debug_assertions))]
pub fn arm_from_env() -> Result<(), String> {
    Ok(())
}

/// Panics if the tests armed `point`.
#[inline]
pub fn hit(point: Point) {
    #[cfg(debug_assertions)]
    if ARMED.get().copied().flatten() == Some(point) {
        panic!("deliberate panic at {point:?} (SPOOLD_TEST_PANIC, a test-only switch)");
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

/// How old a file in `tmp/` must be before the sweep removes it: `default`, or in debug builds
/// `SPOOLD_TEST_TMP_MAX_AGE` (a duration such as "2s"). The sweep compares the inode's change
/// time, which no test can set back, so a test cannot make a file 36 hours old: it shortens the
/// age instead.
pub fn tmp_max_age(default: std::time::Duration) -> std::time::Duration {
    #[cfg(debug_assertions)]
    if let Some(age) = std::env::var("SPOOLD_TEST_TMP_MAX_AGE")
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
    {
        return age;
    }
    default
}

/// How long `spoold enqueue` waits between counting the waiting jobs and publishing its own,
/// under `spool.max_queued`: nothing, or in debug builds `SPOOLD_TEST_PUBLISH_PAUSE` (a duration
/// such as "200ms"). Concurrent enqueues start a few milliseconds apart, which hides a missing
/// lock around the count and the publication; the pause widens that window until a test sees it.
pub fn publish_pause() {
    #[cfg(debug_assertions)]
    if let Some(pause) = pause_from_env("SPOOLD_TEST_PUBLISH_PAUSE") {
        std::thread::sleep(pause);
    }
}

/// How long a spool lease waits, once it has begun to settle an attempt (its cancel switch
/// closed), before it settles: nothing, or in debug builds `SPOOLD_TEST_SETTLE_PAUSE` (a
/// duration such as "2s"). Settling takes milliseconds, too short for a test to send a cancel
/// into it by timing.
pub fn settle_pause() {
    #[cfg(debug_assertions)]
    if let Some(pause) = pause_from_env("SPOOLD_TEST_SETTLE_PAUSE") {
        tracing::info!("settling the attempt after {pause:?} (SPOOLD_TEST_SETTLE_PAUSE)");
        std::thread::sleep(pause);
    }
}

/// How long `spoold retry` on the broker waits between publishing a job again and removing
/// its dead letter: nothing, or in debug builds `SPOOLD_TEST_RETRY_PAUSE` (a duration). A
/// daemon that runs the job and dead-letters it again within those milliseconds is too quick
/// for a test to catch by timing.
pub fn retry_pause() {
    #[cfg(debug_assertions)]
    if let Some(pause) = pause_from_env("SPOOLD_TEST_RETRY_PAUSE") {
        std::thread::sleep(pause);
    }
}

/// Whether to leave out the acknowledgement of a job done, as a consumer leader killed just
/// after confirming it would lose it: in debug builds, for the first job done in the process
/// when `SPOOLD_TEST_LOSE_ACK` is set; never otherwise. The loss itself is rare and timing-bound
/// (a leader's death in the instant after its answer), so a test could not wait for it.
pub fn lose_ack() -> bool {
    #[cfg(debug_assertions)]
    if std::env::var_os("SPOOLD_TEST_LOSE_ACK").is_some() {
        static LOST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        return !LOST.swap(true, std::sync::atomic::Ordering::Relaxed);
    }
    false
}

/// Whether the worker that receives a broker delivery drops it instead of running it, as one
/// does when a reload or a stop comes in the instant the delivery reaches it: in debug builds,
/// for the first delivery in the process when `SPOOLD_TEST_DROP_DELIVERY` is set; never
/// otherwise. That instant is too short for a test to hit by timing.
pub fn drop_delivery() -> bool {
    #[cfg(debug_assertions)]
    if std::env::var_os("SPOOLD_TEST_DROP_DELIVERY").is_some() {
        static DROPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        return !DROPPED.swap(true, std::sync::atomic::Ordering::Relaxed);
    }
    false
}

/// The duration a test gave in the environment variable `var`, if any.
#[cfg(debug_assertions)]
fn pause_from_env(var: &str) -> Option<std::time::Duration> {
    std::env::var(var)
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
}
