//! The one way a test says it could not run its real checks: a failure under CI, a visible and
//! counted skip elsewhere.
//!
//! Every suite skips through it (`util::skip`), the systemd harness in tests/it/sysd included, so
//! that every skip is seen and counted the same way.

use std::fs::OpenOptions;
use std::io::Write as _;

/// The variable `.ci/run` sets to the file each skip is recorded in, one line per skip.
pub const SKIP_LOG_VAR: &str = "SPOOLD_SKIP_LOG";

/// Called by a test that cannot run its real checks on this machine, before it returns.
///
/// With `CI=true` this panics with `reason`, so the test fails: CI must run every check, and a
/// skip there means the machine is not set up as `.ci/run` sets it up. Elsewhere it writes one
/// line `SKIPPED: <test>: <reason>` from column 0 straight to the process's stderr, which
/// libtest does not capture (it captures `eprintln!` and `println!`, and shows them only for a
/// failing test), and appends the same line to the file named by `SPOOLD_SKIP_LOG`, if set,
/// for `.ci/run` to count.
pub fn skip(test: &str, reason: &str) {
    // The reason is one line, so that the log stays one line per skip.
    let reason = reason.replace('\n', " ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} cannot run its checks, and CI=true forbids skipping: {reason}");
    }
    let line = format!("SKIPPED: {test}: {reason}\n");
    // One write each, so that parallel tests' lines do not interleave.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os(SKIP_LOG_VAR) {
        let recorded = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = recorded {
            panic!(
                "{test} skipped ({reason}), but the skip cannot be recorded in {} ({SKIP_LOG_VAR}): {e}",
                path.to_string_lossy()
            );
        }
    }
}
