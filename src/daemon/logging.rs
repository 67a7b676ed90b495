//! Logging: structured journald records under systemd, readable lines on stderr otherwise.
//!
//! The journal is detected the way systemd documents it: `$JOURNAL_STREAM` holds the device and
//! inode of the stream systemd connected to stderr. Job events carry JOB_ID, ATTEMPT and, at
//! their end, OUTCOME, EXIT_STATUS and DURATION_MS as journal fields (no `F_` prefix), so that
//! `journalctl -u spoold JOB_ID=...` tells a job's story. INFO maps to priority 6 (info), as
//! journalctl users expect, not tracing-journald's default of 5 (notice).

use std::os::fd::AsFd;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Changes the log level at run time (on reload).
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// RUST_LOG, when set, wins over `log.level`, also across reloads.
    env_override: bool,
}

impl LogControl {
    pub fn set_level(&self, level: &str) {
        if self.env_override {
            return;
        }
        if let Err(e) = self.handle.reload(EnvFilter::new(level)) {
            tracing::warn!("cannot change the log level to {level}: {e}");
        }
    }
}

/// Installs the global subscriber. `level` is the config's `log.level`.
pub fn init(level: &str) -> LogControl {
    let env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let filter = match &env {
        Some(directives) => EnvFilter::new(directives),
        None => EnvFilter::new(level),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let journald = if stderr_is_journal() {
        tracing_journald::layer().ok().map(|layer| {
            layer.with_field_prefix(None).with_priority_mappings(
                tracing_journald::PriorityMappings {
                    info: tracing_journald::Priority::Informational,
                    debug: tracing_journald::Priority::Debug,
                    ..tracing_journald::PriorityMappings::new()
                },
            )
        })
    } else {
        None
    };
    let fmt = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(fmt)
        .init();
    LogControl {
        handle,
        env_override: env.is_some(),
    }
}

/// True when stderr is the stream systemd connected to the journal.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(stat.st_dev) && ino.parse::<u64>().ok() == Some(stat.st_ino)
}
