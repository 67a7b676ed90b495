//! The configuration file: its schema, its defaults, and errors that name the file, line, column and key.
//!
//! Every check that can be expressed while deserializing is done there, so that the TOML parser
//! attaches the position of the offending value to the error. Relative paths (the spool directory
//! and a handler program written as `./prog`) are resolved against the directory that holds the
//! config file, so the same file works from a shell in any directory and from systemd, whose
//! working directory is `/`.

use std::collections::BTreeMap;
use std::fmt;
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
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    #[serde(default = "default_rescan", deserialize_with = "positive_duration")]
    pub rescan_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    #[serde(default = "default_workers")]
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

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    #[serde(deserialize_with = "non_empty_argv")]
    pub command: Vec<String>,
    #[serde(default = "default_timeout", deserialize_with = "positive_duration")]
    pub timeout: Duration,
    #[serde(default = "default_kill_grace", deserialize_with = "positive_duration")]
    pub kill_grace: Duration,
    #[serde(default = "default_stdin")]
    pub stdin: StdinMode,
    #[serde(default, deserialize_with = "environment")]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default = "default_max_attempts")]
    pub max_attempts: NonZeroU32Attempts,
    #[serde(
        default = "default_backoff_initial",
        deserialize_with = "positive_duration"
    )]
    pub backoff_initial: Duration,
    #[serde(
        default = "default_backoff_max",
        deserialize_with = "positive_duration"
    )]
    pub backoff_max: Duration,
    #[serde(default)]
    pub permanent_exit_codes: Vec<i32>,
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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoneConfig {
    #[serde(default = "default_true")]
    pub keep: bool,
}

impl Default for DoneConfig {
    fn default() -> Self {
        Self { keep: true }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    #[serde(default = "default_drain", deserialize_with = "any_duration")]
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

/// A duration such as `"250ms"`, `"30s"` or `"10m"`, which may be zero (a drain timeout of zero
/// means "abort at once").
fn any_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    humantime_serde::deserialize(d)
}

/// A duration that must be greater than zero: a zero timeout or interval is always a mistake.
fn positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value: Duration = humantime_serde::deserialize(d)?;
    if value.is_zero() {
        return Err(serde::de::Error::custom(
            "must be greater than zero, for example \"30s\"",
        ));
    }
    Ok(value)
}

fn non_empty_argv<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let argv: Vec<String> = Vec::deserialize(d)?;
    match argv.first() {
        None => Err(serde::de::Error::custom(
            "must name a program, for example [\"/usr/local/bin/handle-job\", \"{path}\"]",
        )),
        Some(program) if program.is_empty() => Err(serde::de::Error::custom(
            "the program (first element) is an empty string",
        )),
        Some(_) => match argv.iter().position(|a| a.contains('\0')) {
            Some(i) => Err(serde::de::Error::custom(format!(
                "element {} holds a NUL byte, which no program name or argument can hold",
                i + 1
            ))),
            None => Ok(argv),
        },
    }
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
            }
        })?;
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

    fn resolve_relative_paths(&mut self, base: &Path) {
        if self.spool.dir.is_relative() {
            self.spool.dir = base.join(&self.spool.dir);
        }
        // A bare program name ("python3") is looked up in $PATH like a shell would; only a
        // relative path with a slash in it ("./handler.sh") is taken relative to the config.
        let program = &mut self.handler.command[0];
        if program.contains('/') && Path::new(program.as_str()).is_relative() {
            *program = base.join(program.as_str()).to_string_lossy().into_owned();
        }
    }
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

    #[test]
    fn bad_log_level_is_refused() {
        let err = parse(&format!("{MINIMAL}[log]\nlevel = \"loud\"\n")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("log.level"));
    }
}
