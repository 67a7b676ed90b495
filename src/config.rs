//! The configuration file: its schema, its defaults, and errors that name the file, line, column and key.
//!
//! Every check that can be expressed while deserializing is done there, so that the TOML parser
//! attaches the position of the offending value to the error. Relative paths (the spool directory
//! and a handler program written as `./prog`) are resolved against the directory that holds the
//! config file, so the same file works from a shell in any directory and from systemd, whose
//! working directory is `/`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Where `spoold run` and the other subcommands look when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/spoold/spoold.toml";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub spool: SpoolConfig,
    #[serde(default)]
    pub workers: WorkersConfig,
    pub handler: HandlerConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub done: DoneConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Where the jobs come from: the spool (the default) or a JetStream cluster.
    #[serde(default)]
    pub backend: BackendConfig,
    /// The JetStream cluster, read only when `backend.kind = "jetstream"`.
    pub jetstream: Option<JetStreamConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    #[serde(default)]
    pub kind: BackendKind,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Jobs are files in `spool.dir`: one host.
    #[default]
    Spool,
    /// Jobs are messages of a NATS JetStream work-queue stream that several hosts share.
    Jetstream,
}

/// `[jetstream]`: the cluster and the queue's name, from which every stream, consumer and
/// subject is named (`source::jetstream::Names`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamConfig {
    #[serde(deserialize_with = "nats_servers")]
    pub servers: Vec<String>,
    #[serde(default = "default_queue", deserialize_with = "queue_name")]
    pub queue: String,
    #[serde(default = "default_replicas", deserialize_with = "replicas")]
    pub replicas: usize,
    #[serde(default = "default_ack_wait", deserialize_with = "ack_wait")]
    pub ack_wait: Duration,
    #[serde(default = "default_progress", deserialize_with = "progress_interval")]
    pub progress_interval: Duration,
    /// How many deliveries of one job may end with no outcome (the host stopped, lost the job
    /// or died) before the job is dead-lettered instead of run again.
    #[serde(
        default = "default_max_unsettled",
        deserialize_with = "max_unsettled_deliveries"
    )]
    pub max_unsettled_deliveries: u32,
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "connect_timeout"
    )]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    #[serde(default = "default_rescan", deserialize_with = "rescan_interval")]
    pub rescan_interval: Duration,
    /// `spoold enqueue` refuses (exit 75) when this many jobs wait; None: no limit.
    #[serde(default, deserialize_with = "max_queued")]
    pub max_queued: Option<u64>,
    /// How many times crash recovery may find one job in `active/` (its daemon died while it
    /// ran) before the job is moved to `failed/` instead of run again.
    #[serde(
        default = "default_max_recoveries",
        deserialize_with = "max_recoveries"
    )]
    pub max_recoveries: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    #[serde(default = "default_workers", deserialize_with = "worker_count")]
    pub count: NonZeroUsize,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            count: default_workers(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StdinMode {
    /// The handler reads `/dev/null`.
    Null,
    /// The handler reads the job file itself.
    Job,
}

/// How a handler serves jobs (`handler.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerMode {
    /// One process per attempt, with the job in its argv and environment.
    #[default]
    Exec,
    /// One long-lived process per worker, given each job as a JSON line on its stdin
    /// (`runner::persistent`).
    Persistent,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    #[serde(default)]
    pub mode: HandlerMode,
    #[serde(deserialize_with = "non_empty_argv")]
    pub command: Vec<String>,
    #[serde(default = "default_timeout", deserialize_with = "handler_timeout")]
    pub timeout: Duration,
    #[serde(default = "default_kill_grace", deserialize_with = "kill_grace")]
    pub kill_grace: Duration,
    #[serde(default = "default_stdin")]
    pub stdin: StdinMode,
    #[serde(default, deserialize_with = "environment")]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default = "default_max_attempts", deserialize_with = "max_attempts")]
    pub max_attempts: NonZeroU32Attempts,
    #[serde(default = "default_backoff_initial", deserialize_with = "backoff")]
    pub backoff_initial: Duration,
    #[serde(default = "default_backoff_max", deserialize_with = "backoff")]
    pub backoff_max: Duration,
    #[serde(default, deserialize_with = "exit_codes")]
    pub permanent_exit_codes: Vec<i32>,
    /// A job not done this long after its submission (or its due time, when delayed) fails
    /// with the reason `expired`; None: jobs never expire.
    #[serde(default, deserialize_with = "max_age")]
    pub max_age: Option<Duration>,
}

/// The number of attempts a job gets, at least one.
pub type NonZeroU32Attempts = std::num::NonZeroU32;

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            backoff_initial: default_backoff_initial(),
            backoff_max: default_backoff_max(),
            permanent_exit_codes: Vec::new(),
            max_age: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoneConfig {
    #[serde(default = "default_true")]
    pub keep: bool,
    /// The daemon removes jobs from `done/` this long after they got there; None: kept.
    #[serde(default, deserialize_with = "max_age")]
    pub max_age: Option<Duration>,
}

impl Default for DoneConfig {
    fn default() -> Self {
        Self {
            keep: true,
            max_age: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    #[serde(default = "default_drain", deserialize_with = "drain_timeout")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout: default_drain(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_level", deserialize_with = "log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_level(),
        }
    }
}

/// `[metrics]`: the Prometheus endpoint, off unless `listen` names an address.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default, deserialize_with = "listen_address")]
    pub listen: Option<SocketAddr>,
}

fn default_rescan() -> Duration {
    Duration::from_secs(30)
}
fn default_workers() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}
fn default_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_kill_grace() -> Duration {
    Duration::from_secs(5)
}
fn default_stdin() -> StdinMode {
    StdinMode::Null
}
fn default_max_attempts() -> NonZeroU32Attempts {
    NonZeroU32Attempts::new(5).expect("5 is not zero")
}
fn default_backoff_initial() -> Duration {
    Duration::from_secs(10)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(3600)
}
fn default_true() -> bool {
    true
}
fn default_drain() -> Duration {
    Duration::from_secs(20)
}
fn default_level() -> String {
    "info".to_owned()
}
fn default_queue() -> String {
    "default".to_owned()
}
fn default_replicas() -> usize {
    3
}
fn default_ack_wait() -> Duration {
    Duration::from_secs(30)
}
fn default_progress() -> Duration {
    Duration::from_secs(10)
}
/// A stop costs a job at most two deliveries (the abort's hand-back, and a catch by the
/// stopping host's last pull), and only a job that outlives `drain_timeout` is aborted at all;
/// ten leaves room for several such stops while a job that kills its host stops after ten
/// hosts, not never.
fn default_max_unsettled() -> u32 {
    10
}
/// A recovery happens only when the daemon died (a stop never leaves a job in `active/`), and
/// a death charges every job in flight once: three lets an innocent job live through two
/// deaths of the daemon (a power loss, an OOM of the whole host) while a job that kills the
/// daemon takes it down three times, as Sidekiq Pro's super_fetch allows, not forever.
fn default_max_recoveries() -> u32 {
    3
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The longest duration each key accepts. Every duration ends up added to a clock reading, so an
/// unbounded one (`"500000000000 years"`) would overflow it; and far below that, values beyond
/// these are mistakes rather than policies. A handler attempt or a backoff of more than 30 days
/// is a job that should be scheduled another way. A full rescan more than once a day adds
/// nothing, since inotify finds new jobs and the rescan only covers what it missed. A stop lasts
/// up to `drain_timeout + kill_grace`, during which the unit cannot be started again: 6 hours of
/// drain and 1 hour between SIGTERM and SIGKILL already hold a reboot or an upgrade for longer
/// than any operator waits for one.
pub struct Limit {
    pub max: Duration,
    /// The maximum as the error message and the documentation write it.
    pub text: &'static str,
}

const DAY: u64 = 86_400;
pub const MAX_RESCAN_INTERVAL: Limit = Limit {
    max: Duration::from_secs(DAY),
    text: "24 hours (\"24h\")",
};
pub const MAX_HANDLER_TIMEOUT: Limit = Limit {
    max: Duration::from_secs(30 * DAY),
    text: "30 days (\"30d\")",
};
pub const MAX_KILL_GRACE: Limit = Limit {
    max: Duration::from_secs(3600),
    text: "1 hour (\"1h\")",
};
pub const MAX_BACKOFF: Limit = Limit {
    max: Duration::from_secs(30 * DAY),
    text: "30 days (\"30d\")",
};
/// `retry.max_age`, `done.max_age`, and the times `spoold enqueue` takes (`--in`, `--at`,
/// `--ttl`): ten years is beyond any job's useful life, and keeps every deadline far from the
/// clock's end.
pub const MAX_AGE: Limit = Limit {
    max: Duration::from_secs(3650 * DAY),
    text: "10 years (\"3650d\")",
};
pub const MAX_DRAIN_TIMEOUT: Limit = Limit {
    max: Duration::from_secs(6 * 3600),
    text: "6 hours (\"6h\")",
};

/// A job's lease on a broker. Below 5 s, one leader election (4-7 s, measured) outlasts the
/// lease; above an hour, a host that died holds its jobs for longer than anyone waits.
pub const MIN_ACK_WAIT: Duration = Duration::from_secs(5);
pub const MAX_ACK_WAIT: Limit = Limit {
    max: Duration::from_secs(3600),
    text: "1 hour (\"1h\")",
};
/// Heartbeats more often than twice a second only load the cluster.
pub const MIN_PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
pub const MAX_CONNECT_TIMEOUT: Limit = Limit {
    max: Duration::from_secs(600),
    text: "10 minutes (\"10m\")",
};

/// The units a duration may use, for error messages.
const UNITS: &str = "ms, s (sec, seconds), m (min, minutes), h (hr, hours), d (days), w (weeks); \
                     also ns, us, M (months), y (years)";

/// Rescans more often than every second only load the main thread: each lists all of `new/`.
pub const MIN_RESCAN_INTERVAL: Duration = Duration::from_secs(1);

fn rescan_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value = duration(d, false, &MAX_RESCAN_INTERVAL)?;
    if value < MIN_RESCAN_INTERVAL {
        return Err(custom(
            "must be at least \"1s\": each rescan lists all of new/, and inotify finds new \
             jobs in between",
        ));
    }
    Ok(value)
}
fn handler_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration(d, false, &MAX_HANDLER_TIMEOUT)
}
fn kill_grace<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration(d, false, &MAX_KILL_GRACE)
}
fn backoff<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration(d, false, &MAX_BACKOFF)
}
fn max_age<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d, false, &MAX_AGE).map(Some)
}

/// `spool.max_queued`: how many waiting jobs make `spoold enqueue` refuse more.
fn max_queued<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    positive_integer(d, "jobs that may wait", "10000").map(Some)
}

/// A duration given on the command line (`spoold enqueue --in`, `--ttl`, `spoold purge
/// --older-than`), with the messages and the maximum of the config's durations.
pub fn parse_cli_duration(text: &str) -> Result<Duration, String> {
    let value = parse_duration(text, &MAX_AGE)?;
    if value.is_zero() {
        return Err("must be greater than zero, for example \"10m\"".to_owned());
    }
    if value > MAX_AGE.max {
        return Err(format!(
            "{text:?} is longer than the maximum of {}",
            MAX_AGE.text
        ));
    }
    Ok(value)
}

/// A drain timeout of zero is allowed: it means "abort at once".
fn drain_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration(d, true, &MAX_DRAIN_TIMEOUT)
}

fn ack_wait<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value = duration(d, false, &MAX_ACK_WAIT)?;
    if value < MIN_ACK_WAIT {
        return Err(custom(
            "must be at least \"5s\": a leader election alone takes 4-7 s, and a shorter \
             lease would be lost in every one",
        ));
    }
    Ok(value)
}
fn progress_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value = duration(d, false, &MAX_ACK_WAIT)?;
    if value < MIN_PROGRESS_INTERVAL {
        return Err(custom("must be at least \"500ms\""));
    }
    Ok(value)
}
/// The most `jetstream.max_unsettled_deliveries` accepts: beyond that the bound would never
/// be reached in practice, and "never" is what it exists to prevent.
pub const MAX_UNSETTLED_DELIVERIES: u64 = 1000;

/// `jetstream.max_unsettled_deliveries`: 1 to [`MAX_UNSETTLED_DELIVERIES`].
fn max_unsettled_deliveries<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = positive_integer(d, "deliveries that may end without an outcome", "10")?;
    if n > MAX_UNSETTLED_DELIVERIES {
        return Err(custom(format!(
            "{n} is too many; the maximum is {MAX_UNSETTLED_DELIVERIES} (a job that kills its \
             host should not take down that many)"
        )));
    }
    Ok(n as u32)
}
/// The most `spool.max_recoveries` accepts: beyond that the bound would never be reached in
/// practice, and "never" is what it exists to prevent.
pub const MAX_RECOVERIES: u64 = 1000;

/// `spool.max_recoveries`: 1 to [`MAX_RECOVERIES`].
fn max_recoveries<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = positive_integer(d, "times a job may be found running after a crash", "3")?;
    if n > MAX_RECOVERIES {
        return Err(custom(format!(
            "{n} is too many; the maximum is {MAX_RECOVERIES} (a job that kills the daemon \
             should not take it down that many times)"
        )));
    }
    Ok(n as u32)
}
fn connect_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration(d, false, &MAX_CONNECT_TIMEOUT)
}

/// `jetstream.servers`: 1 to 16 URLs `nats://HOST:PORT` or `tls://HOST:PORT`.
fn nats_servers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    const EXAMPLE: &str = "[\"nats://10.0.0.1:4222\", \"nats://10.0.0.2:4222\"]";
    let toml::Value::Array(items) = toml::Value::deserialize(d)? else {
        return Err(custom(format!(
            "must be a list of server URLs, for example {EXAMPLE}"
        )));
    };
    if items.is_empty() || items.len() > 16 {
        return Err(custom(format!(
            "must list 1 to 16 servers, not {}, for example {EXAMPLE}",
            items.len()
        )));
    }
    let mut urls = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let toml::Value::String(url) = item else {
            return Err(custom(format!(
                "element {} must be a URL in quotes, not {}",
                i + 1,
                describe(&item)
            )));
        };
        let rest = url
            .strip_prefix("nats://")
            .or_else(|| url.strip_prefix("tls://"));
        match rest {
            Some(host) if !host.is_empty() && !host.contains(['/', ' ', ',']) => urls.push(url),
            _ => {
                return Err(custom(format!(
                    "element {} ({url:?}) is not a server URL: write nats://HOST:PORT or \
                     tls://HOST:PORT",
                    i + 1
                )));
            }
        }
    }
    Ok(urls)
}

/// `jetstream.queue`: a name that fits into stream, consumer and subject names.
fn queue_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = match toml::Value::deserialize(d)? {
        toml::Value::String(s) => s,
        other => {
            return Err(custom(format!(
                "must be a name in quotes, for example \"default\", not {}",
                describe(&other)
            )));
        }
    };
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return Err(custom(format!(
            "{name:?}: a queue name is 1 to 32 letters, digits, `_` or `-` (it names the \
             stream, the consumer and the subjects)"
        )));
    }
    Ok(name)
}

/// `jetstream.replicas`: how many nodes hold each stream (Raft needs an odd number).
fn replicas<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match toml::Value::deserialize(d)? {
        toml::Value::Integer(n @ (1 | 3 | 5)) => Ok(n as usize),
        other => Err(custom(format!(
            "must be 1, 3 or 5 (the nodes that hold each stream), not {}",
            describe(&other)
        ))),
    }
}

/// A duration such as `"250ms"`, `"30s"` or `"1m 30s"`, at most `limit`, and greater than zero
/// unless `zero_ok` (a zero timeout or interval is always a mistake).
fn duration<'de, D: Deserializer<'de>>(
    d: D,
    zero_ok: bool,
    limit: &Limit,
) -> Result<Duration, D::Error> {
    let text = match toml::Value::deserialize(d)? {
        toml::Value::String(text) => text,
        toml::Value::Integer(n) => {
            return Err(custom(format!(
                "a duration needs a unit and quotes, for example \"{n}s\"; units: {UNITS}"
            )));
        }
        other => {
            return Err(custom(format!(
                "must be a duration in quotes, for example \"30s\" or \"1m 30s\", not {}",
                describe(&other)
            )));
        }
    };
    let value = parse_duration(&text, limit).map_err(custom)?;
    if value.is_zero() && !zero_ok {
        return Err(custom("must be greater than zero, for example \"30s\""));
    }
    if value > limit.max {
        return Err(custom(format!(
            "{text:?} is longer than the maximum of {}",
            limit.text
        )));
    }
    Ok(value)
}

/// Parses a duration, with messages that say what is wrong and what would be right.
fn parse_duration(text: &str, limit: &Limit) -> Result<Duration, String> {
    use humantime::DurationError as E;
    if text.trim_start().starts_with('-') {
        return Err(format!("{text:?}: a duration cannot be negative"));
    }
    humantime::parse_duration(text).map_err(|e| match e {
        E::Empty => "an empty string is not a duration; write a number and a unit, for example \
                     \"30s\""
            .to_owned(),
        E::UnknownUnit { unit, .. } if unit.is_empty() => {
            let example = if text.trim().bytes().all(|b| b.is_ascii_digit()) {
                format!("{}s", text.trim())
            } else {
                "30s".to_owned()
            };
            format!("{text:?} has no unit; write for example \"{example}\" (units: {UNITS})")
        }
        E::UnknownUnit { unit, .. } => {
            format!("{text:?}: unknown unit {unit:?}; the units are {UNITS}")
        }
        E::NumberOverflow => format!(
            "{text:?} is too large (or finer than a nanosecond); the maximum is {}",
            limit.text
        ),
        E::InvalidCharacter(_) | E::NumberExpected(_) => format!(
            "{text:?} is not a duration; write numbers each followed by a unit, for example \
             \"1m 30s\" (units: {UNITS})"
        ),
    })
}

/// `workers.count`: how many jobs run at once.
fn worker_count<'de, D: Deserializer<'de>>(d: D) -> Result<NonZeroUsize, D::Error> {
    let n = positive_integer(d, "jobs run at once", "4")?;
    usize::try_from(n)
        .ok()
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| custom(format!("{n} is more workers than this machine can run")))
}

/// `retry.max_attempts`: how many attempts a job gets before it goes to `failed/`.
fn max_attempts<'de, D: Deserializer<'de>>(d: D) -> Result<NonZeroU32Attempts, D::Error> {
    let n = positive_integer(d, "attempts before a job fails for good", "5")?;
    u32::try_from(n)
        .ok()
        .and_then(NonZeroU32Attempts::new)
        .ok_or_else(|| custom(format!("{n} is too many; the maximum is {}", u32::MAX)))
}

/// A whole number of at least 1, the number of `what`; `example` shows one.
fn positive_integer<'de, D: Deserializer<'de>>(
    d: D,
    what: &str,
    example: &str,
) -> Result<u64, D::Error> {
    match toml::Value::deserialize(d)? {
        toml::Value::Integer(n) if n >= 1 => Ok(n as u64),
        toml::Value::Integer(n) => Err(custom(format!(
            "must be at least 1 (the number of {what}), not {n}"
        ))),
        other => Err(custom(format!(
            "must be a whole number (the number of {what}), for example {example}, not {}",
            describe(&other)
        ))),
    }
}

/// `retry.permanent_exit_codes`: exit statuses a handler can return that mean "do not retry".
fn exit_codes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i32>, D::Error> {
    let toml::Value::Array(items) = toml::Value::deserialize(d)? else {
        return Err(custom(
            "must be a list of exit codes, for example [2, 64]".to_owned(),
        ));
    };
    let mut codes = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item {
            toml::Value::Integer(code @ 1..=255) => codes.push(*code as i32),
            toml::Value::Integer(code) => {
                return Err(custom(format!(
                    "element {} ({code}) is not an exit code a failed handler can return: \
                     codes run from 1 to 255 (0 is success)",
                    i + 1
                )));
            }
            other => {
                return Err(custom(format!(
                    "element {} must be an exit code from 1 to 255, not {}",
                    i + 1,
                    describe(other)
                )));
            }
        }
    }
    Ok(codes)
}

/// `handler.command`: the program and its arguments, as a list of strings.
fn non_empty_argv<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    const EXAMPLE: &str = "[\"/usr/local/bin/handle-job\", \"{path}\"]";
    let items = match toml::Value::deserialize(d)? {
        toml::Value::Array(items) => items,
        other => {
            return Err(custom(format!(
                "must be a list of the program and its arguments, for example {EXAMPLE}, not {}",
                describe(&other)
            )));
        }
    };
    let mut argv = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        match item {
            toml::Value::String(arg) => argv.push(arg),
            other => {
                return Err(custom(format!(
                    "element {} must be a string, not {}",
                    i + 1,
                    describe(&other)
                )));
            }
        }
    }
    match argv.first() {
        None => Err(custom(format!(
            "must name a program, for example {EXAMPLE}"
        ))),
        Some(program) if program.is_empty() => {
            Err(custom("the program (first element) is an empty string"))
        }
        Some(_) => match argv.iter().position(|a| a.contains('\0')) {
            Some(i) => Err(custom(format!(
                "element {} holds a NUL byte, which no program name or argument can hold",
                i + 1
            ))),
            None => Ok(argv),
        },
    }
}

/// A TOML value as a sentence names it: "the string \"x\"", "the number 3", "a list".
fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("the string {s:?}"),
        toml::Value::Integer(n) => format!("the number {n}"),
        toml::Value::Float(f) => format!("the number {f}"),
        toml::Value::Boolean(b) => format!("{b}"),
        toml::Value::Datetime(t) => format!("the date {t}"),
        toml::Value::Array(_) => "a list".to_owned(),
        toml::Value::Table(_) => "a table".to_owned(),
    }
}

fn custom<E: serde::de::Error>(message: impl fmt::Display) -> E {
    E::custom(message)
}

/// `[handler] env`: names and values an environment can hold. A name that is empty or holds
/// `=`, or a NUL anywhere, could only be dropped or mangled at every spawn.
fn environment<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let env: BTreeMap<String, String> = BTreeMap::deserialize(d)?;
    for (name, value) in &env {
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err(serde::de::Error::custom(format!(
                "{name:?} cannot be the name of an environment variable (empty, or holds `=` or \
                 a NUL byte)"
            )));
        }
        if value.contains('\0') {
            return Err(serde::de::Error::custom(format!(
                "the value of {name} holds a NUL byte, which no environment variable can hold"
            )));
        }
    }
    Ok(env)
}

/// `[metrics] listen`: an IP address and a port, such as "127.0.0.1:9465" or "[::1]:9465". A
/// host name is refused rather than resolved: what a name resolves to can change between the
/// check and the start, and the unit's sandbox allows addresses, not names.
fn listen_address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse::<SocketAddr>().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an address and port; write for example \"127.0.0.1:9465\" or \
             \"[::1]:9465\""
        ))
    })
}

fn log_level<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let level = String::deserialize(d)?;
    match level.as_str() {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(level),
        _ => Err(serde::de::Error::custom(format!(
            "unknown level {level:?}, expected one of error, warn, info, debug, trace"
        ))),
    }
}

/// A config file that could not be used, with everything a user needs to find the mistake.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based line and column of the offending text, when the parser knows it.
    pub position: Option<(usize, usize)>,
    /// The dotted key the error is about, when it can be told.
    pub key: Option<String>,
    pub message: String,
    /// Set when the file could not be read at all, with the reason: a client command tells a
    /// user who may not read it (the packaged config is `root:spoold 0640`) how to get access,
    /// rather than calling the file invalid.
    pub unreadable: Option<std::io::ErrorKind>,
}

/// EX_CONFIG from sysexits(3): the exit status of every command, the daemon's included, that
/// was given a config it cannot use. systemd units can refuse to restart on it.
pub const EX_CONFIG: u8 = 78;

impl ConfigError {
    /// The one line that reports an unusable config, wherever it was read:
    /// "invalid config FILE:LINE:COLUMN: key `KEY`: WHY".
    pub fn invalid(&self) -> String {
        format!("invalid config {self}")
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            position: None,
            key: None,
            message: format!("cannot read the config file: {e}"),
            unreadable: Some(e.kind()),
        })?;
        Self::parse(path, &text)
    }

    /// Parses config text; `path` names the file in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let span = e.span();
            let position = span.as_ref().map(|s| line_column(text, s.start));
            let key = span.as_ref().and_then(|s| key_at(text, s.start));
            ConfigError {
                path: path.to_owned(),
                position,
                key,
                message: e.message().trim().to_owned(),
                unreadable: None,
            }
        })?;
        config.check_backoff_order(path, text)?;
        config.check_persistent(path, text)?;
        config.check_jetstream(path, text)?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Absolute, so that what the paths mean does not depend on the working directory of
        // whoever reads them later (a handler, a log reader).
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_owned());
        config.resolve_relative_paths(&base);
        Ok(config)
    }

    /// `retry.backoff_max` caps the backoff that starts at `retry.backoff_initial`, so it cannot
    /// be the shorter of the two. Each key is checked alone while deserializing; this check
    /// needs both, so it runs afterwards and finds the position of the offending value itself.
    fn check_backoff_order(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let retry = &self.retry;
        if retry.backoff_max >= retry.backoff_initial {
            return Ok(());
        }
        #[derive(Deserialize)]
        struct Spans {
            retry: Option<RetrySpans>,
        }
        #[derive(Deserialize)]
        struct RetrySpans {
            backoff_initial: Option<toml::Spanned<toml::Value>>,
            backoff_max: Option<toml::Spanned<toml::Value>>,
        }
        let spans = toml::from_str::<Spans>(text)
            .ok()
            .and_then(|s| s.retry)
            .map(|r| {
                (
                    r.backoff_initial.map(|v| v.span()),
                    r.backoff_max.map(|v| v.span()),
                )
            });
        let show = |d: Duration| humantime::format_duration(d).to_string();
        // Blame backoff_max when the file sets it; otherwise the file raised backoff_initial
        // above the default cap.
        let (key, span, message) = match spans {
            Some((initial, None)) => (
                "retry.backoff_initial",
                initial,
                format!(
                    "{} is longer than retry.backoff_max ({}, the default), which caps every \
                     backoff; raise backoff_max too",
                    show(retry.backoff_initial),
                    show(retry.backoff_max)
                ),
            ),
            other => (
                "retry.backoff_max",
                other.and_then(|(_, max)| max),
                format!(
                    "{} is shorter than retry.backoff_initial ({}); the cap must be at least the \
                     first backoff",
                    show(retry.backoff_max),
                    show(retry.backoff_initial)
                ),
            ),
        };
        Err(ConfigError {
            path: path.to_owned(),
            position: span.map(|s| line_column(text, s.start)),
            key: Some(key.to_owned()),
            message,
            unreadable: None,
        })
    }

    /// A persistent handler is started once for many jobs, so nothing in its argv can name one
    /// job, and its stdin carries the protocol rather than a job file. Checked after
    /// deserializing because it needs `handler.mode` and the other key together; the position
    /// is that of the offending value.
    fn check_persistent(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let handler = &self.handler;
        if handler.mode != HandlerMode::Persistent {
            return Ok(());
        }
        #[derive(Deserialize)]
        struct Spans {
            handler: Option<HandlerSpans>,
        }
        #[derive(Deserialize)]
        struct HandlerSpans {
            command: Option<toml::Spanned<toml::Value>>,
            stdin: Option<toml::Spanned<toml::Value>>,
        }
        let spans = toml::from_str::<Spans>(text).ok().and_then(|s| s.handler);
        let placeholder = handler.command.iter().enumerate().find_map(|(i, arg)| {
            ["{path}", "{id}", "{attempt}"]
                .into_iter()
                .find(|p| arg.contains(p))
                .map(|p| (i, p))
        });
        let (key, span, message) = if let Some((i, p)) = placeholder {
            (
                "handler.command",
                spans
                    .as_ref()
                    .and_then(|s| s.command.as_ref())
                    .map(|v| v.span()),
                format!(
                    "element {} holds the placeholder {p}, but with mode = \"persistent\" the \
                     command starts once for many jobs and each job arrives as a JSON line on \
                     its stdin; remove the placeholder",
                    i + 1
                ),
            )
        } else if handler.stdin == StdinMode::Job {
            (
                "handler.stdin",
                spans
                    .as_ref()
                    .and_then(|s| s.stdin.as_ref())
                    .map(|v| v.span()),
                "must be \"null\" (the default) with mode = \"persistent\": a persistent \
                 handler's stdin carries the jobs as JSON lines"
                    .to_owned(),
            )
        } else {
            return Ok(());
        };
        Err(ConfigError {
            path: path.to_owned(),
            position: span.map(|s| line_column(text, s.start)),
            key: Some(key.to_owned()),
            message,
            unreadable: None,
        })
    }

    /// The checks of `[backend]` and `[jetstream]` that need more than one key.
    fn check_jetstream(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let error = |section: &str, key: &str, message: String| ConfigError {
            path: path.to_owned(),
            position: value_position(text, section, key),
            key: Some(format!("{section}.{key}")),
            message,
            unreadable: None,
        };
        // The endpoint counts jobs per state in the spool; a broker's counts are not wired to it
        // yet, and an endpoint that showed the local scratch area would mislead.
        if self.backend.kind == BackendKind::Jetstream && self.metrics.listen.is_some() {
            return Err(error(
                "metrics",
                "listen",
                "is not served with backend.kind = \"jetstream\" yet; remove it, or use the \
                 spool backend"
                    .to_owned(),
            ));
        }
        let Some(js) = &self.jetstream else {
            if self.backend.kind == BackendKind::Jetstream {
                return Err(error(
                    "backend",
                    "kind",
                    "\"jetstream\" needs a [jetstream] table with at least `servers`".to_owned(),
                ));
            }
            return Ok(());
        };
        if js.progress_interval > js.ack_wait / 3 {
            return Err(error(
                "jetstream",
                "progress_interval",
                format!(
                    "{} is more than a third of jetstream.ack_wait ({}): a job whose \
                     heartbeats are not confirmed for ack_wait - progress_interval is given \
                     up, so the interval must leave room for at least two missed beats",
                    humantime::format_duration(js.progress_interval),
                    humantime::format_duration(js.ack_wait)
                ),
            ));
        }
        match (&js.tls_cert_file, &js.tls_key_file) {
            (Some(_), None) => {
                return Err(error(
                    "jetstream",
                    "tls_cert_file",
                    "is set without jetstream.tls_key_file; a client certificate needs its key"
                        .to_owned(),
                ));
            }
            (None, Some(_)) => {
                return Err(error(
                    "jetstream",
                    "tls_key_file",
                    "is set without jetstream.tls_cert_file; a key needs its certificate"
                        .to_owned(),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    fn resolve_relative_paths(&mut self, base: &Path) {
        if self.spool.dir.is_relative() {
            self.spool.dir = base.join(&self.spool.dir);
        }
        if let Some(js) = &mut self.jetstream {
            for file in [
                &mut js.creds_file,
                &mut js.tls_ca_file,
                &mut js.tls_cert_file,
                &mut js.tls_key_file,
            ]
            .into_iter()
            .flatten()
            {
                if file.is_relative() {
                    *file = base.join(&*file);
                }
            }
        }
        // A bare program name ("python3") is looked up in $PATH like a shell would; only a
        // relative path with a slash in it ("./handler.sh") is taken relative to the config.
        let program = &mut self.handler.command[0];
        if program.contains('/') && Path::new(program.as_str()).is_relative() {
            *program = base.join(program.as_str()).to_string_lossy().into_owned();
        }
    }
}

/// Where the value of `key` under `[section]` starts in `text`, for an error found after
/// deserializing; None when the file does not set it (a default is to blame).
fn value_position(text: &str, section: &str, key: &str) -> Option<(usize, usize)> {
    let mut offset = 0;
    let mut current = String::new();
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if trimmed.starts_with('[') && !trimmed.starts_with("[[") {
            current = trimmed
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned();
        } else if current == section
            && let Some((k, _)) = line.split_once('=')
            && k.trim() == key
        {
            let at = offset + line.find('=').map_or(0, |i| i + 1);
            let at = at + line[at - offset..].len() - line[at - offset..].trim_start().len();
            return Some(line_column(text, at));
        }
        offset += line.len();
    }
    None
}

/// 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..at].chars().count() + 1;
    (line, column)
}

/// The dotted key whose line holds byte offset `at`: the nearest `[table]` header above it and
/// the key on the left of `=` on that line.
fn key_at(text: &str, at: usize) -> Option<String> {
    let at = at.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line = &text[line_start..line_end];
    let key = line.split_once('=').map(|(k, _)| k.trim())?;
    if key.is_empty() || key.starts_with('#') || key.starts_with('[') {
        return None;
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/spoold/test.toml"), text)
    }

    const MINIMAL: &str = "[spool]\ndir = \"/var/spool/x\"\n[handler]\ncommand = [\"/bin/true\"]\n";

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.spool.dir, Path::new("/var/spool/x"));
        assert_eq!(c.spool.rescan_interval, Duration::from_secs(30));
        assert_eq!(
            c.workers.count,
            std::thread::available_parallelism().unwrap()
        );
        assert_eq!(c.handler.timeout, Duration::from_secs(600));
        assert_eq!(c.handler.kill_grace, Duration::from_secs(5));
        assert_eq!(c.handler.stdin, StdinMode::Null);
        assert_eq!(c.retry.max_attempts.get(), 5);
        assert_eq!(c.retry.backoff_initial, Duration::from_secs(10));
        assert_eq!(c.retry.backoff_max, Duration::from_secs(3600));
        assert!(c.retry.permanent_exit_codes.is_empty());
        assert!(c.done.keep);
        assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(20));
        assert_eq!(c.log.level, "info");
        assert_eq!(c.metrics.listen, None);
    }

    #[test]
    fn metrics_listen_is_an_address_and_port() {
        let c = parse(&format!(
            "{MINIMAL}[metrics]\nlisten = \"127.0.0.1:9465\"\n"
        ))
        .unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9465".parse().unwrap()));
        for bad in ["localhost:9465", "127.0.0.1", "127.0.0.1:99999", ""] {
            let err = parse(&format!("{MINIMAL}[metrics]\nlisten = {bad:?}\n")).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("test.toml:6:") && text.contains("metrics.listen"),
                "{bad}: {text}"
            );
            assert!(text.contains("is not an address and port"), "{bad}: {text}");
        }
    }

    /// The limits on waiting and on age are off by default, read when set, and refuse zero.
    #[test]
    fn queue_limits_and_ages_are_optional_and_positive() {
        let base =
            "[spool]\ndir = \"/x\"\nmax_queued = 100\n[handler]\ncommand = [\"/bin/true\"]\n";
        let c = parse(&format!(
            "{base}[retry]\nmax_age = \"1d\"\n[done]\nmax_age = \"30d\"\n"
        ))
        .unwrap();
        assert_eq!(c.spool.max_queued, Some(100));
        assert_eq!(c.retry.max_age, Some(Duration::from_secs(86_400)));
        assert_eq!(c.done.max_age, Some(Duration::from_secs(30 * 86_400)));
        let err = parse(&base.replace("100", "0")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("spool.max_queued"), "{err}");
        assert!(err.message.contains("at least 1"), "{err}");
        let err = parse(&format!("{base}[retry]\nmax_age = \"0s\"\n")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("retry.max_age"), "{err}");
        assert!(err.message.contains("greater than zero"), "{err}");
        assert!(
            parse_cli_duration("10")
                .unwrap_err()
                .contains("has no unit")
        );
        assert!(parse_cli_duration("0s").is_err());
        assert_eq!(parse_cli_duration("10m"), Ok(Duration::from_secs(600)));
    }

    /// The bound on a job's recoveries after crashes is 3 by default, and a whole number from 1
    /// to 1000; an error names the key and its position.
    #[test]
    fn max_recoveries_has_a_default_and_bounds() {
        assert_eq!(parse(MINIMAL).unwrap().spool.max_recoveries, 3);
        let with = |value: &str| {
            format!(
                "[spool]\ndir = \"/x\"\nmax_recoveries = {value}\n[handler]\ncommand = [\"/bin/true\"]\n"
            )
        };
        assert_eq!(parse(&with("1")).unwrap().spool.max_recoveries, 1);
        assert_eq!(parse(&with("1000")).unwrap().spool.max_recoveries, 1000);
        for (value, needle) in [
            ("0", "at least 1"),
            ("-2", "at least 1"),
            ("1001", "maximum is 1000"),
            ("\"3\"", "whole number"),
            ("2.5", "whole number"),
        ] {
            let err = parse(&with(value)).unwrap_err();
            assert_eq!(
                err.key.as_deref(),
                Some("spool.max_recoveries"),
                "{value}: {err}"
            );
            assert_eq!(err.position.map(|p| p.0), Some(3), "{value}: {err}");
            assert!(err.message.contains(needle), "{value}: {err}");
        }
    }

    #[test]
    fn durations_are_human_friendly() {
        let c = parse(&format!(
            "{MINIMAL}timeout = \"250ms\"\nkill_grace = \"1m 30s\"\n[shutdown]\ndrain_timeout = \"10m\"\n"
        ))
        .unwrap();
        assert_eq!(c.handler.timeout, Duration::from_millis(250));
        assert_eq!(c.handler.kill_grace, Duration::from_secs(90));
        assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(600));
    }

    #[test]
    fn unknown_key_names_file_line_column_and_key() {
        let err = parse("[spool]\ndir = \"/x\"\nrescan = \"1s\"\n[handler]\ncommand = [\"a\"]\n")
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("/etc/spoold/test.toml:3:1: key `spool.rescan`"),
            "{text}"
        );
        assert!(text.contains("unknown field `rescan`"), "{text}");
    }

    #[test]
    fn wrong_type_is_located() {
        let err = parse(&format!("{MINIMAL}[workers]\ncount = \"four\"\n")).unwrap_err();
        assert_eq!(err.position, Some((6, 9)));
        assert_eq!(err.key.as_deref(), Some("workers.count"));
    }

    #[test]
    fn a_rescan_more_often_than_every_second_is_refused() {
        let err = parse(
            "[spool]\ndir = \"/tmp/s\"\nrescan_interval = \"1ms\"\n[handler]\ncommand = [\"/bin/true\"]\n",
        )
        .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("spool.rescan_interval"));
        assert!(err.message.contains("at least \"1s\""), "{}", err.message);
    }

    #[test]
    fn zero_workers_and_zero_durations_are_refused() {
        let err = parse(&format!("{MINIMAL}[workers]\ncount = 0\n")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("workers.count"));
        let err = parse(&format!("{MINIMAL}timeout = \"0s\"\n")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("handler.timeout"));
        assert!(err.message.contains("greater than zero"), "{}", err.message);
        let err = parse(&format!("{MINIMAL}timeout = \"-5s\"\n")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("handler.timeout"));
        let err = parse(&format!("{MINIMAL}[retry]\nmax_attempts = 0\n")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("retry.max_attempts"));
    }

    #[test]
    fn zero_drain_timeout_means_abort_at_once() {
        let c = parse(&format!("{MINIMAL}[shutdown]\ndrain_timeout = \"0s\"\n")).unwrap();
        assert!(c.shutdown.drain_timeout.is_zero());
    }

    #[test]
    fn missing_required_keys_and_empty_command_are_refused() {
        let err = parse("[spool]\ndir = \"/x\"\n").unwrap_err();
        assert!(err.message.contains("handler"), "{}", err.message);
        let err = parse("[spool]\ndir = \"/x\"\n[handler]\ncommand = []\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("handler.command"));
    }

    #[test]
    fn malformed_toml_is_located() {
        let err = parse("[spool\ndir = 1\n").unwrap_err();
        assert_eq!(err.position.map(|p| p.0), Some(1));
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let c = Config::parse(
            Path::new("config/spoold.toml"),
            "[spool]\ndir = \"../spool\"\n[handler]\ncommand = [\"./h.sh\", \"{path}\"]\n",
        )
        .unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(c.spool.dir, cwd.join("config/../spool"));
        assert_eq!(
            c.handler.command[0],
            cwd.join("config/./h.sh").to_str().unwrap()
        );
        let c = parse("[spool]\ndir = \"/x\"\n[handler]\ncommand = [\"python3\"]\n").unwrap();
        assert_eq!(c.handler.command[0], "python3");
    }

    /// Each duration key refuses a value beyond its documented maximum, naming the key and the
    /// maximum, and accepts the maximum itself. A huge value used to be accepted and then
    /// overflowed the clock at run time.
    #[test]
    fn durations_beyond_their_maximum_are_refused() {
        // (table, key, limit): the key goes into its table, after MINIMAL's lines of it.
        let cases = [
            ("spool", "rescan_interval", &MAX_RESCAN_INTERVAL),
            ("handler", "timeout", &MAX_HANDLER_TIMEOUT),
            ("handler", "kill_grace", &MAX_KILL_GRACE),
            ("retry", "backoff_initial", &MAX_BACKOFF),
            ("retry", "backoff_max", &MAX_BACKOFF),
            ("shutdown", "drain_timeout", &MAX_DRAIN_TIMEOUT),
            ("retry", "max_age", &MAX_AGE),
            ("done", "max_age", &MAX_AGE),
        ];
        let file = |table: &str, line: String| {
            let spool = "[spool]\ndir = \"/x\"\n";
            let handler = "[handler]\ncommand = [\"/bin/true\"]\n";
            match table {
                "spool" => format!("{spool}{line}{handler}"),
                "handler" => format!("{spool}{handler}{line}"),
                _ => format!("{spool}{handler}[{table}]\n{line}"),
            }
        };
        for (table, key, limit) in cases {
            let text = file(table, format!("{key} = \"500000000000 years\"\n"));
            let err = parse(&text).unwrap_err();
            assert_eq!(err.key, Some(format!("{table}.{key}")), "{err}");
            assert!(err.position.is_some(), "{err}");
            assert!(err.message.contains(limit.text), "{err}");
            let max = humantime::format_duration(limit.max);
            // backoff_initial may not exceed backoff_max, so raise both.
            let line = if key == "backoff_initial" {
                format!("{key} = \"{max}\"\nbackoff_max = \"{max}\"\n")
            } else {
                format!("{key} = \"{max}\"\n")
            };
            let text = file(table, line);
            parse(&text).unwrap_or_else(|e| panic!("the maximum is refused: {e}\n{text}"));
        }
    }

    #[test]
    fn duration_errors_say_what_is_wrong() {
        let err = parse(&format!("{MINIMAL}timeout = \"10\"\n")).unwrap_err();
        assert!(err.message.contains("has no unit"), "{err}");
        assert!(err.message.contains("\"10s\""), "{err}");
        assert!(err.message.contains("h (hr, hours)"), "{err}");
        let err = parse(&format!("{MINIMAL}timeout = \"10 minuets\"\n")).unwrap_err();
        assert!(err.message.contains("unknown unit \"minuets\""), "{err}");
        assert!(err.message.contains("m (min, minutes)"), "{err}");
        let err = parse(&format!("{MINIMAL}timeout = 10\n")).unwrap_err();
        assert!(err.message.contains("needs a unit and quotes"), "{err}");
        let err = parse(&format!("{MINIMAL}timeout = \"-5s\"\n")).unwrap_err();
        assert!(err.message.contains("cannot be negative"), "{err}");
    }

    #[test]
    fn counts_lists_and_exit_codes_are_explained_in_plain_words() {
        let err = parse(&format!("{MINIMAL}[workers]\ncount = 0\n")).unwrap_err();
        assert!(err.message.contains("at least 1"), "{err}");
        let err = parse(&format!("{MINIMAL}[workers]\ncount = \"four\"\n")).unwrap_err();
        assert!(err.message.contains("whole number"), "{err}");
        assert!(!err.message.contains("usize"), "{err}");
        let err = parse("[spool]\ndir = \"/x\"\n[handler]\ncommand = \"/bin/true\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("handler.command"));
        assert!(err.message.contains("must be a list"), "{err}");
        assert!(!err.message.contains("sequence"), "{err}");
        for code in ["0", "256", "-1"] {
            let err = parse(&format!(
                "{MINIMAL}[retry]\npermanent_exit_codes = [2, {code}]\n"
            ))
            .unwrap_err();
            assert_eq!(err.key.as_deref(), Some("retry.permanent_exit_codes"));
            assert!(
                err.message.contains(&format!("element 2 ({code})")),
                "{err}"
            );
            assert!(err.message.contains("1 to 255"), "{err}");
        }
        let c = parse(&format!(
            "{MINIMAL}[retry]\npermanent_exit_codes = [1, 255]\n"
        ))
        .unwrap();
        assert_eq!(c.retry.permanent_exit_codes, [1, 255]);
    }

    #[test]
    fn backoff_max_below_backoff_initial_is_located() {
        let err = parse(&format!(
            "{MINIMAL}[retry]\nbackoff_initial = \"1m\"\nbackoff_max = \"30s\"\n"
        ))
        .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("retry.backoff_max"));
        assert_eq!(err.position, Some((7, 15)));
        assert!(
            err.message.contains("shorter than retry.backoff_initial"),
            "{err}"
        );
        // Only backoff_initial set, above the default cap of 1h: it is the one to blame.
        let err = parse(&format!("{MINIMAL}[retry]\nbackoff_initial = \"2h\"\n")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("retry.backoff_initial"));
        assert_eq!(err.position, Some((6, 19)));
        // Equal is fine: every backoff is then the same.
        parse(&format!(
            "{MINIMAL}[retry]\nbackoff_initial = \"1m\"\nbackoff_max = \"1m\"\n"
        ))
        .unwrap();
    }

    #[test]
    fn bad_log_level_is_refused() {
        let err = parse(&format!("{MINIMAL}[log]\nlevel = \"loud\"\n")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("log.level"));
    }

    #[test]
    fn persistent_mode_refuses_placeholders_and_stdin_job_with_their_place() {
        let c =
            parse(&MINIMAL.replace("[handler]\n", "[handler]\nmode = \"persistent\"\n")).unwrap();
        assert_eq!(c.handler.mode, HandlerMode::Persistent);
        assert_eq!(parse(MINIMAL).unwrap().handler.mode, HandlerMode::Exec);
        let err = parse(
            "[spool]\ndir = \"/x\"\n[handler]\nmode = \"persistent\"\ncommand = [\"h\", \"--job={id}\"]\n",
        )
        .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("handler.command"));
        assert_eq!(err.position, Some((5, 11)), "{err}");
        assert!(
            err.message.contains("element 2 holds the placeholder {id}"),
            "{err}"
        );
        let err = parse(&format!(
            "{MINIMAL}mode = \"persistent\"\nstdin = \"job\"\n"
        ))
        .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("handler.stdin"));
        assert_eq!(err.position.map(|p| p.0), Some(6), "{err}");
        let err = parse(&format!("{MINIMAL}mode = \"forking\"\n")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("handler.mode"), "{err}");
    }

    const JS: &str = "[spool]\ndir = \"/x\"\n[handler]\ncommand = [\"/bin/true\"]\n[backend]\nkind = \"jetstream\"\n";

    #[test]
    fn jetstream_keys_get_their_defaults_and_bounds() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.backend.kind, BackendKind::Spool);
        assert!(c.jetstream.is_none());

        let c = parse(&format!(
            "{JS}[jetstream]\nservers = [\"nats://a:4222\", \"tls://b:4222\"]\ncreds_file = \"n.creds\"\n"
        ))
        .unwrap();
        assert_eq!(c.backend.kind, BackendKind::Jetstream);
        let js = c.jetstream.unwrap();
        assert_eq!(js.queue, "default");
        assert_eq!(js.replicas, 3);
        assert_eq!(js.ack_wait, Duration::from_secs(30));
        assert_eq!(js.progress_interval, Duration::from_secs(10));
        assert_eq!(js.connect_timeout, Duration::from_secs(30));
        assert_eq!(js.max_unsettled_deliveries, 10);
        assert_eq!(js.creds_file.unwrap(), Path::new("/etc/spoold/n.creds"));

        for (extra, key, needle) in [
            ("servers = []", "jetstream.servers", "1 to 16"),
            (
                "servers = [\"http://a\"]",
                "jetstream.servers",
                "not a server URL",
            ),
            (
                "servers = [\"nats://a\"]\nqueue = \"a.b\"",
                "jetstream.queue",
                "1 to 32",
            ),
            (
                "servers = [\"nats://a\"]\nreplicas = 2",
                "jetstream.replicas",
                "1, 3 or 5",
            ),
            (
                "servers = [\"nats://a\"]\nack_wait = \"2s\"",
                "jetstream.ack_wait",
                "at least",
            ),
            (
                "servers = [\"nats://a\"]\nack_wait = \"2h\"",
                "jetstream.ack_wait",
                "maximum",
            ),
            (
                "servers = [\"nats://a\"]\nprogress_interval = \"100ms\"",
                "jetstream.progress_interval",
                "500ms",
            ),
            (
                "servers = [\"nats://a\"]\nack_wait = \"9s\"\nprogress_interval = \"4s\"",
                "jetstream.progress_interval",
                "a third",
            ),
            (
                "servers = [\"nats://a\"]\nmax_unsettled_deliveries = 0",
                "jetstream.max_unsettled_deliveries",
                "at least 1",
            ),
            (
                "servers = [\"nats://a\"]\nmax_unsettled_deliveries = 1001",
                "jetstream.max_unsettled_deliveries",
                "maximum is 1000",
            ),
            (
                "servers = [\"nats://a\"]\nmax_unsettled_deliveries = \"3\"",
                "jetstream.max_unsettled_deliveries",
                "whole number",
            ),
            (
                "servers = [\"nats://a\"]\ntls_cert_file = \"c.pem\"",
                "jetstream.tls_cert_file",
                "tls_key_file",
            ),
            (
                "servers = [\"nats://a\"]\nretries = 3",
                "jetstream.retries",
                "unknown field",
            ),
        ] {
            let err = parse(&format!("{JS}[jetstream]\n{extra}\n")).unwrap_err();
            assert_eq!(err.key.as_deref(), Some(key), "{extra}: {err}");
            assert!(err.position.is_some(), "{extra}: {err}");
            assert!(err.message.contains(needle), "{extra}: {err}");
        }
        let err = parse(&format!(
            "{JS}[jetstream]\nservers = [\"nats://a\"]\n[metrics]\nlisten = \"127.0.0.1:9465\"\n"
        ))
        .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("metrics.listen"), "{err}");
        assert!(err.position.is_some(), "{err}");
        let err = parse(JS).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("backend.kind"), "{err}");
        assert_eq!(err.position, Some((6, 8)), "{err}");
    }
}
