//! The command line: subcommands, options and their help, the one source for --help and the man pages.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::DEFAULT_PATH;

#[derive(Debug, Parser)]
#[command(
    name = "spoold",
    version,
    about = "A spool-directory job queue daemon that shuts down right",
    long_about = "spoold runs a handler program on each job file dropped into a spool directory, \
                  with N workers, retries with backoff, and a failed/ queue. Under systemd it \
                  drains or aborts the jobs in flight within the unit's stop timeout, applies \
                  config edits on reload without dropping work, and logs every job to the \
                  journal with a JOB_ID field."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The config file.
    #[arg(long, short, value_name = "PATH", default_value = DEFAULT_PATH, env = "SPOOLD_CONFIG")]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon until SIGTERM or SIGINT; SIGHUP reloads the config.
    ///
    /// Exit status: 0 after a clean stop, 78 for an invalid config, 73 when the spool cannot
    /// be opened, 75 when another spoold owns the spool, 74 when job discovery fails, 70 after
    /// a panic (a bug; logged, and systemd restarts spoold).
    Run(ConfigArg),
    /// Submit files as jobs, atomically; prints one job ID per file.
    Enqueue {
        #[command(flatten)]
        config: ConfigArg,
        /// Files to submit; `-` reads one job from standard input.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Show how many jobs are in each state, read from the spool.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print one JSON object (queued, active, retry, done, failed, oldest_queued_age_s).
        #[arg(long)]
        json: bool,
    },
    /// List the failed jobs with the reason each failed.
    Failed {
        #[command(flatten)]
        config: ConfigArg,
        /// Print a JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Move failed jobs back to new/ with a fresh attempt count.
    Retry {
        #[command(flatten)]
        config: ConfigArg,
        /// IDs of failed jobs, as `spoold failed` shows them.
        #[arg(
            value_name = "ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ids: Vec<String>,
        /// Retry every failed job.
        #[arg(long)]
        all: bool,
    },
    /// Check a config file: exit 0 when it is valid, else print the error and exit 78.
    CheckConfig {
        /// The config file.
        #[arg(value_name = "PATH", default_value = DEFAULT_PATH)]
        path: PathBuf,
    },
}
