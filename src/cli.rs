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
                  journal with a JOB_ID field.",
    after_long_help = "Exit status: 0 on success; 1 when a client command failed; 2 for a usage \
                       error (an unknown option, a missing argument); 78 for an invalid config; \
                       75 when `spoold enqueue` finds the queue full (spool.max_queued); 69 \
                       when a JetStream cluster cannot be reached; `spoold run` also exits 70, \
                       73, 74 or 75 (see `spoold run --help`)."
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

/// The states of a finished job, for `spoold purge --state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FinishedState {
    Done,
    Failed,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon until SIGTERM or SIGINT; SIGHUP reloads the config.
    ///
    /// Exit status: 0 after a clean stop, 78 for an invalid config, 73 when the spool cannot
    /// be opened, 75 when another spoold owns the spool, 74 when job discovery fails or the
    /// metrics address cannot be bound, 69 when a JetStream cluster cannot be reached within
    /// jetstream.connect_timeout, 70 after a panic (a bug; logged, and systemd restarts
    /// spoold), 2 for a usage error.
    #[command(override_usage = "spoold run [-c|--config <PATH>]")]
    Run(ConfigArg),
    /// Submit files as jobs, atomically; prints one job ID per file.
    ///
    /// Only regular files are submitted: a FIFO or a device is refused. Interrupted (SIGINT,
    /// SIGTERM, SIGHUP) or failing, it leaves nothing behind in tmp/. When the spool's
    /// subdirectories are missing (no daemon opened it yet), it creates them if this user owns
    /// the spool root, and otherwise says so.
    ///
    /// Every file is written first, then all are published together. With `spool.max_queued`
    /// set, they are published all or none: when the jobs waiting (queued, waiting for a retry
    /// or their time, held) and these would pass the limit, nothing is submitted and the exit
    /// status is 75 (EX_TEMPFAIL): try again later.
    ///
    /// A job given --in, --at or --ttl is handed to the daemon, which files it within a second
    /// (or when it starts): a delayed job counts as `scheduled` in `spoold status` until its
    /// time comes.
    #[command(
        override_usage = "spoold enqueue [-c|--config <PATH>] [--in <DURATION> | --at <TIME>] [--ttl <DURATION>] <FILE>...\n       \
                                spoold enqueue [-c|--config <PATH>] [--in <DURATION> | --at <TIME>] [--ttl <DURATION>] -"
    )]
    Enqueue {
        #[command(flatten)]
        config: ConfigArg,
        /// Files to submit; `-` reads one job from standard input.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Do not start the jobs before this much time has passed, for example `10m` or `2h 30m`.
        #[arg(long = "in", value_name = "DURATION", conflicts_with = "at")]
        delay: Option<String>,
        /// Do not start the jobs before this time: RFC 3339, such as `2026-01-31T18:00:00Z` or
        /// `2026-01-31T19:00:00+01:00`.
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
        /// A job not done within this time of its submission (of its due time when delayed)
        /// fails with the reason `expired`, whether it waits, waits for a retry or is held. A
        /// running job is not stopped.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// Show how many jobs are in each state, read from the spool.
    #[command(override_usage = "spoold status [-c|--config <PATH>] [--json]")]
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print one JSON object (queued, active, retry, done, failed, oldest_queued_age_s,
        /// daemon_pid: the pid of the daemon that owns the spool, or null; paused,
        /// paused_reason, paused_since, paused_by_uid; held; scheduled: delayed jobs not yet
        /// due, which `retry` does not count).
        #[arg(long)]
        json: bool,
    },
    /// List the failed jobs with the reason each failed.
    #[command(override_usage = "spoold failed [-c|--config <PATH>] [--json]")]
    Failed {
        #[command(flatten)]
        config: ConfigArg,
        /// Print a JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Move failed jobs back to new/ with a fresh attempt count.
    #[command(override_usage = "spoold retry [-c|--config <PATH>] <ID>...\n       \
                                spoold retry [-c|--config <PATH>] --all")]
    Retry {
        #[command(flatten)]
        config: ConfigArg,
        /// IDs of failed jobs, as `spoold failed` shows them; `-` reads IDs from standard input, one per line.
        #[arg(
            value_name = "ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ids: Vec<String>,
        /// Retry every failed job but the cancelled ones (name those to retry them).
        #[arg(long)]
        all: bool,
    },
    /// Pause the queue: no new job starts; jobs in flight go on.
    ///
    /// The pause is state of the spool, not of the daemon: it holds across restarts and works
    /// with or without a running daemon, which acts on it within a second. `spoold status`
    /// shows it; the journal records who paused (OPERATOR_UID=). Members of the spool's group
    /// may pause. Pausing a paused queue keeps the pause in force as it was.
    #[command(override_usage = "spoold pause [-c|--config <PATH>] [--reason <TEXT>]")]
    Pause {
        #[command(flatten)]
        config: ConfigArg,
        /// Why, for `spoold status` and the journal.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// End a pause: jobs start again.
    #[command(override_usage = "spoold resume [-c|--config <PATH>]")]
    Resume {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Set waiting jobs aside (queued, or waiting for a retry): they never start until released.
    ///
    /// Held jobs keep their attempt count. Like Postfix's hold queue. Members of the spool's
    /// group may hold and release: the daemon moves the jobs for them. The journal records who
    /// held each job (OPERATOR_UID=, JOB_ID=).
    #[command(override_usage = "spoold hold [-c|--config <PATH>] <ID>...\n       \
                                spoold hold [-c|--config <PATH>] --all")]
    Hold {
        #[command(flatten)]
        config: ConfigArg,
        /// IDs of waiting jobs, as `spoold enqueue` printed them; `-` reads IDs from standard input, one per line.
        #[arg(
            value_name = "ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ids: Vec<String>,
        /// Hold every waiting job.
        #[arg(long)]
        all: bool,
    },
    /// Put held jobs back in the queue, with their attempt count kept.
    ///
    /// A hold does not move a job's time: one held while it waited for a retry's backoff or
    /// for the time it was submitted for (`enqueue --in`/`--at`) goes back to retry/ and waits
    /// for the rest of it; any other goes to new/.
    #[command(
        override_usage = "spoold release [-c|--config <PATH>] <ID>...\n       \
                                spoold release [-c|--config <PATH>] --all"
    )]
    Release {
        #[command(flatten)]
        config: ConfigArg,
        /// IDs of held jobs; `-` reads IDs from standard input, one per line.
        #[arg(
            value_name = "ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ids: Vec<String>,
        /// Release every held job.
        #[arg(long)]
        all: bool,
    },
    /// A live view of the queue in the terminal; q quits.
    ///
    /// Jobs per state, the rates of done and failed jobs over the last minute, the running
    /// jobs with their attempt and how long they have run, the oldest queued job, and the
    /// pause. Refreshed every second (less often when reading a large spool takes long). It
    /// only reads the spool: members of the spool's group may run it. It needs a terminal;
    /// scripts use `spoold status --json`.
    #[command(override_usage = "spoold top [-c|--config <PATH>]")]
    Top(ConfigArg),
    /// Show one job: where it is and since when, and every failed attempt.
    ///
    /// It prints the job's place (new/, active/, retry/, hold/, done/ or failed/) and since
    /// when, its failed attempts and when the next may run, then each failed attempt (the last
    /// 20): start, duration, exit status or signal, timeout, and its stderr tail; for a failed
    /// job, why it failed (a cancel or an expiry also, which are no attempt); and the
    /// journalctl command that shows the job's log. A delayed job says "scheduled: not before
    /// TIME" (in tmp/ until the daemon files it, then in retry/). Exit status 1 when no job has
    /// that ID.
    #[command(override_usage = "spoold show [-c|--config <PATH>] [--json] <ID>")]
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// The job's ID, as `spoold enqueue` printed it (an ID, never a path).
        #[arg(value_name = "ID")]
        id: String,
        /// Print one JSON object (id, place, since, attempts, first_attempt_at,
        /// next_attempt_at, failed_at, permanent, reason: why a failed job failed (a cancel's
        /// or an expiry's too, which are no attempt) or null, history: one object per failed attempt,
        /// record_error, scheduled: true for a delayed job not yet due, expires_at: its time to
        /// live's end or null, journalctl) with the values as recorded, unescaped.
        #[arg(long)]
        json: bool,
    },
    /// Cancel jobs: a waiting, held or running job fails for good with the reason `cancelled`.
    ///
    /// A running job's handler gets SIGTERM, then SIGKILL after `handler.kill_grace`. The
    /// daemon carries out the request, within a second when it runs, else when it starts;
    /// members of the spool's group may cancel. `spoold retry` brings a cancelled job back.
    #[command(override_usage = "spoold cancel [-c|--config <PATH>] <ID>...")]
    Cancel {
        #[command(flatten)]
        config: ConfigArg,
        /// IDs of jobs, as `spoold enqueue` printed them; `-` reads IDs from standard input, one per line.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
    /// Remove finished jobs (done or failed) older than a duration, with their records.
    ///
    /// A job's age is the time since it went to done/ or failed/. Each removal is logged to
    /// the journal with the caller's uid (OPERATOR_UID=) and the job's ID (JOB_ID=). Members
    /// of the spool's group may purge too: the daemon removes the jobs for them.
    #[command(
        override_usage = "spoold purge [-c|--config <PATH>] --state <done|failed> --older-than <DURATION> [--dry-run]"
    )]
    Purge {
        #[command(flatten)]
        config: ConfigArg,
        /// Which finished jobs.
        #[arg(long, value_enum, value_name = "STATE")]
        state: FinishedState,
        /// Only jobs finished at least this long ago, for example `7d`.
        #[arg(long, value_name = "DURATION")]
        older_than: String,
        /// List what would be removed, and remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check a config file: exit 0 when it is valid, else print the error and exit 78.
    ///
    /// It also warns, without failing, when the handler program cannot be run: it is looked up
    /// as spoold would run it, in the PATH that `[handler] env` sets, if it sets one.
    #[command(override_usage = "spoold check-config [-c|--config <PATH>]\n       \
                                spoold check-config <PATH>")]
    CheckConfig {
        /// The config file [env: SPOOLD_CONFIG] [default: /etc/spoold/spoold.toml].
        // Not a `ConfigArg`: a value clap takes from SPOOLD_CONFIG counts as given, and would
        // then conflict with the positional PATH, which must win over the environment.
        #[arg(long, short, value_name = "PATH")]
        config: Option<PathBuf>,
        /// The config file, as an alternative to --config.
        #[arg(value_name = "PATH", conflicts_with = "config")]
        path: Option<PathBuf>,
    },
}

impl Command {
    /// The file `check-config` checks: PATH, else --config, else SPOOLD_CONFIG, else the default.
    pub fn check_config_path(config: Option<PathBuf>, path: Option<PathBuf>) -> PathBuf {
        path.or(config)
            .or_else(|| {
                std::env::var_os("SPOOLD_CONFIG")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
    }
}
