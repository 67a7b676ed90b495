//! spoold: a spool-directory job queue daemon that shuts down right.
//!
//! This file is the table of contents: parse the arguments, load the config, start logging,
//! turn SIGTERM/SIGINT into the root cancellation token, run the supervisor, and map its result
//! to an exit status. ARCHITECTURE.md has the map of the rest.

#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use spoold::cli::{Cli, Command};
use spoold::config::Config;
use spoold::signals::Shutdown;
use spoold::supervisor::{Daemon, RunError};
use spoold::{commands, logging, notify, signals, supervisor};

/// How long the runtime may take to drop what is left after the supervisor returned. Nothing
/// (a blocking task, a child that will not be reaped) may hold the exit longer.
const RUNTIME_SHUTDOWN: Duration = Duration::from_millis(100);

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => run(&args.config),
        client => commands::run(client),
    }
}

fn run(config_path: &Path) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("spoold: invalid config {e}");
            return ExitCode::from(RunError::Config(e).exit_code());
        }
    };
    let log = logging::init(&config.log.level);
    let notifier = notify::Notifier::from_env();
    // One thread for the supervisor, the dispatcher and the signals: their work is a few system
    // calls between waits. Each worker gets a thread and a runtime of its own (worker.rs), so
    // that one worker's spawn never waits for another's bookkeeping.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = Shutdown::new();
        let reloads = signals::listen(&shutdown)
            .map_err(|e| RunError::Io(format!("cannot install signal handlers: {e}")))?;
        supervisor::run(Daemon {
            config_path: config_path.to_owned(),
            config,
            shutdown,
            reloads,
            notifier,
            log,
        })
        .await
    });
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}
