//! What a job is, whichever source it came from: the runner's view of a job (`Job`), how an
//! attempt ended (`Report`), what is to become of the job (`Verdict`); how an ID given by an
//! operator is read (an ID is never a path); and how job names and job data are shown to people
//! without letting them drive the terminal.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// A job as the runner knows it: an ID, an attempt number and a local file for the handler.
/// It is borrowed from the source's lease on the job, which alone knows where the job lives.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    /// The job's ID as the handler gets it (`{id}`, `SPOOLD_JOB_ID`).
    pub id: &'a OsStr,
    /// The ID escaped for logs (`display_name`), computed once per job by the source.
    pub shown: &'a str,
    /// The file the handler reads (`{path}`, `SPOOLD_JOB_PATH`, or its stdin).
    pub path: &'a Path,
    /// The attempt about to run, 1-based.
    pub attempt: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    /// Stopped by a spoold abort: the attempt does not count.
    Aborted,
    /// Ended because the source lost its hold on the job (`source::Lease::revoked`): the job
    /// is the source's again, and the attempt does not count.
    LeaseLost,
}

/// How an attempt ended. When it failed, this is the failure a source records for the job
/// (the spool in `state/` and `reasons/`), so there is one type for both.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub outcome: Outcome,
    pub started: SystemTime,
    pub duration: Duration,
    /// The exit code, when the handler exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the handler, when one did.
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// One line a human can act on: "exit status 3", "killed by SIGKILL after timeout 10s", ...
    pub reason: String,
    /// The last lines the handler wrote to stderr.
    pub stderr_tail: Vec<String>,
}

impl Report {
    /// A failure for `reason` that no handler run ended in (a job a source refuses to run, or
    /// one that never reached its handler): no exit status, no signal, no output, no time.
    pub fn without_run(reason: String) -> Report {
        Report {
            outcome: Outcome::Failed,
            started: SystemTime::now(),
            duration: Duration::ZERO,
            exit_code: None,
            signal: None,
            timed_out: false,
            reason,
            stderr_tail: Vec::new(),
        }
    }

    /// The shell's convention: the exit code, or 128 + the signal number.
    pub fn exit_status(&self) -> Option<i32> {
        self.exit_code.or(self.signal.map(|s| 128 + s))
    }
}

/// What is to become of a job after an attempt (`policy::decide`); a source's lease carries it
/// out (`source::Lease::settle`). The attempt's `Report` goes with it: `Retry` and `Fail` record
/// it as the job's last failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The handler succeeded: the job is finished.
    Done,
    /// The attempt failed and attempts are left: run it again after `delay`.
    Retry { delay: Duration },
    /// Failed for good: out of attempts, or (`permanent`) an exit code that retrying cannot fix.
    Fail { permanent: bool },
    /// The attempt was interrupted (a stop, or a lease lost): the job goes back to wait, and
    /// the attempt does not count.
    Release,
}

/// A failed attempt, as a source keeps it for people (`spoold failed`): the attempt's `Report`,
/// numbered, with its times as RFC 3339 text, shown as they were recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Failure {
    pub attempt: u32,
    pub started_at: String,
    pub ended_at: String,
    pub duration_ms: u64,
    /// The exit code, when the handler exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the handler, when one did.
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// One line a human can act on: "exit status 3", "killed by SIGKILL after timeout 10s", ...
    pub reason: String,
    /// The last lines the handler wrote to stderr.
    pub stderr_tail: Vec<String>,
}

/// What a source knows of a job that has failed at least once, or was running when its daemon
/// died: how often, when, and how it last failed. Each source stores it in its own format
/// (the spool: `source::spool::record`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// The job's ID when the history was written, escaped for display.
    pub id: String,
    /// Attempts that ended in failure. An attempt interrupted by a stop does not count.
    pub attempts: u32,
    pub first_attempt_at: Option<String>,
    /// When a waiting retry may run, as milliseconds since the epoch (for spoold) ...
    pub next_attempt_unix_ms: Option<u64>,
    /// ... and as RFC 3339 (for people).
    pub next_attempt_at: Option<String>,
    pub failed_at: Option<String>,
    /// True when the failure was a permanent exit code rather than running out of attempts.
    pub permanent: bool,
    pub last_failure: Option<Failure>,
    /// Every failed attempt, oldest first, as far back as the source keeps them (the spool
    /// keeps the last 20), so that `spoold show` tells more than the last failure. Empty when
    /// the record was written by a spoold that kept only the last failure.
    pub failures: Vec<Failure>,
    /// When the job expires unless done (`spoold enqueue --ttl`), as milliseconds since the
    /// epoch; None when it was submitted without a time to live.
    pub expires_unix_ms: Option<u64>,
    /// How many times the job was found running when its daemon had died (the spool's crash
    /// recovery at a start). Like an interrupted attempt, none of them counts as an attempt;
    /// they are bounded on their own, since a job that takes its daemon down would otherwise
    /// run at every start.
    pub recoveries: u32,
}

/// A job ID as an operator gives it on a command line: one name inside a spool directory,
/// never a path. It holds no `/` and no NUL, and is not `.`, `..` or empty, so that whatever a
/// command does with it stays inside the one directory that command is about. It may hold any
/// other byte, written in the escaped form `spoold failed` shows (`\xNN`, `\n`, `\u{..}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobId(OsString);

/// Why an argument is not a job ID. The message says what to give instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadId {
    /// The argument as given, escaped for display.
    pub arg: String,
    pub why: String,
}

impl fmt::Display for BadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: not a job ID: {}", self.arg, self.why)
    }
}

impl std::error::Error for BadId {}

impl JobId {
    /// Reads an ID from a command-line argument, refusing anything that is not a plain name.
    pub fn parse(arg: &str) -> Result<JobId, BadId> {
        let bad = |why: String| BadId {
            arg: escape_text(arg).into_owned(),
            why,
        };
        if arg.contains('/') {
            // A path that clearly points at a job (a tab-completed `spool/failed/ID`) gets the
            // command to type instead; any other path is simply refused.
            let last = arg.trim_end_matches('/').rsplit('/').next().unwrap_or("");
            let hint = if is_plain(last) {
                format!(
                    "give the job ID, not a path (the ID here is {})",
                    escape_text(last)
                )
            } else {
                "give the job ID as `spoold failed` shows it, not a path".to_owned()
            };
            return Err(bad(format!("it holds a `/`; {hint}")));
        }
        let name = parse_display_name(arg);
        let bytes = name.as_bytes();
        if bytes.is_empty() {
            return Err(bad("it is empty".to_owned()));
        }
        if bytes == b"." || bytes == b".." {
            return Err(bad("`.` and `..` name directories, not jobs".to_owned()));
        }
        if bytes.contains(&b'/') {
            return Err(bad(
                "it holds an escaped `/`, which no job name can hold".to_owned()
            ));
        }
        if bytes.contains(&0) {
            return Err(bad(
                "it holds a NUL byte, which no job name can hold".to_owned()
            ));
        }
        Ok(JobId(name))
    }

    /// The ID as a name in a spool directory: a single path component.
    pub fn as_os_str(&self) -> &OsStr {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&display_name(&self.0))
    }
}

/// True when `s` would be a job ID as it stands: not empty, not `.` or `..`.
fn is_plain(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".."
}

/// A job name as it appears in logs, output and JSON: UTF-8 is kept, control characters and
/// `\` are escaped (`\n`, `\u{1b}`, `\\`), and bytes that are not UTF-8 appear as `\xNN`, so
/// that [`parse_display_name`] gives the same bytes back.
pub fn display_name(name: &OsStr) -> String {
    escape(name.as_bytes(), true)
}

/// Text from a job (a handler's stderr, a recorded reason, a path) made safe to print on a
/// terminal: control characters (C0, DEL, C1), the invisible characters that reorder text, and
/// bytes that are not UTF-8 are shown escaped, so a handler cannot set a terminal's title,
/// clear its screen or disguise a line for whoever reads `spoold failed`. Text with none of
/// them is returned as it is.
pub fn escape_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(needs_escape) {
        escape(text.as_bytes(), false).into()
    } else {
        text.into()
    }
}

/// [`escape_text`] for bytes that may not be UTF-8 (a path).
pub fn escape_bytes(bytes: &[u8]) -> String {
    escape(bytes, false)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        // Bidirectional overrides and isolates, and the marks: they reorder or hide what a
        // terminal shows without being control characters.
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape(bytes: &[u8], backslash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if needs_escape(c) || (backslash && c == '\\') {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Turns a name as given on the command line back into the bytes of a job name: the inverse of
/// [`display_name`] for `\xNN`, `\n`, `\t`, `\r`, `\\` and `\u{..}`.
pub fn parse_display_name(text: &str) -> OsString {
    let mut out = Vec::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 1 < bytes.len() {
            let simple = match bytes[i + 1] {
                b'n' => Some(b'\n'),
                b't' => Some(b'\t'),
                b'r' => Some(b'\r'),
                b'\\' => Some(b'\\'),
                _ => None,
            };
            if let Some(b) = simple {
                out.push(b);
                i += 2;
                continue;
            }
            if bytes[i + 1] == b'x'
                && let Some(b) = text
                    .get(i + 2..i + 4)
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            {
                out.push(b);
                i += 4;
                continue;
            }
            if text[i..].starts_with("\\u{")
                && let Some(end) = text[i..].find('}')
                && let Some(c) = text
                    .get(i + 3..i + end)
                    .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                    .and_then(char::from_u32)
            {
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                i += end + 1;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_name_escapes_and_round_trips() {
        let raw = OsString::from_vec(b"a\nb\x1b\xffc\\d".to_vec());
        let shown = display_name(&raw);
        assert_eq!(shown, "a\\nb\\u{1b}\\xffc\\\\d");
        assert_eq!(parse_display_name(&shown), raw);
        assert_eq!(display_name(OsStr::new("plain-ü.job")), "plain-ü.job");
    }

    #[test]
    fn an_id_is_never_a_path() {
        for arg in [
            "/tmp/x/decoy.txt",
            "../done/01J",
            "spool/failed/01J",
            "failed/",
            ".",
            "..",
            "",
            "a\\x2fb",
            "a\\u{2f}b",
            "a\\x00b",
            "a\\u{0}b",
        ] {
            assert!(JobId::parse(arg).is_err(), "{arg:?} was taken as an ID");
        }
        let err = JobId::parse("/var/spool/spoold/failed/01JABC").unwrap_err();
        assert!(err.to_string().contains("the ID here is 01JABC"), "{err}");
        assert_eq!(
            JobId::parse("01JABC").unwrap().as_os_str(),
            OsStr::new("01JABC")
        );
        assert_eq!(
            JobId::parse("..hidden").unwrap().as_os_str(),
            OsStr::new("..hidden")
        );
        assert_eq!(
            JobId::parse("a\\nb").unwrap().as_os_str().as_bytes(),
            b"a\nb"
        );
    }

    #[test]
    fn text_for_a_terminal_has_no_control_characters() {
        let evil = "\u{1b}]0;TITLE\u{7}\u{1b}[2J\r\u{9b}31m\u{202e}txt.exe";
        let shown = escape_text(evil);
        assert!(!shown.chars().any(needs_escape), "{shown}");
        assert_eq!(
            shown,
            "\\u{1b}]0;TITLE\\u{7}\\u{1b}[2J\\r\\u{9b}31m\\u{202e}txt.exe"
        );
        assert!(matches!(
            escape_text("plain \\ text"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(escape_bytes(b"/srv/\xff\x1b"), "/srv/\\xff\\u{1b}");
    }
}
