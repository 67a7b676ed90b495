//! spoold: a spool-directory job queue daemon that shuts down right.
//!
//! This file is the table of contents: parse the arguments, load the config, start logging,
//! turn SIGTERM/SIGINT into the root cancellation token, run the supervisor, and map its result
//! to an exit status. ARCHITECTURE.md has the map of the rest.

#![forbid(unsafe_code)]

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use futures_util::FutureExt;

use spoold::cli::{Cli, Command};
use spoold::config::{Config, EX_CONFIG};
use spoold::daemon::signals::Shutdown;
use spoold::daemon::supervisor::{Reloads, RunError};
use spoold::daemon::{logging, notify, signals, supervisor};
use spoold::{client, fault};

/// How long the runtime may take to drop what is left after the supervisor returned. Nothing
/// (a blocking task, a child that will not be reaped) may hold the exit longer.
const RUNTIME_SHUTDOWN: Duration = Duration::from_millis(100);

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => run(&args.config),
        client => client::run(client),
    }
}

fn run(config_path: &Path) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("spoold: {}", e.invalid());
            return ExitCode::from(EX_CONFIG);
        }
    };
    if let Err(e) = fault::arm_from_env() {
        eprintln!("spoold: {e}");
        return ExitCode::from(64);
    }
    let log = logging::init(&config.log.level);
    // Before anything can panic: from here on a panic in any thread is logged and stops the
    // daemon on the abort path (supervisor::install_panic_hook says why).
    let shutdown = Shutdown::new();
    let panics = supervisor::install_panic_hook(shutdown.abort.clone());
    let notifier = notify::Notifier::from_env();
    // One thread for the supervisor, discovery and the signals: their work is a few system
    // calls between waits. Each worker gets a thread and a runtime of its own (runner/mod.rs),
    // so that one worker's spawn never waits for another's bookkeeping.
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
    let run = async {
        let requests = signals::listen(&shutdown).map_err(RunError::Signals)?;
        let reloads = Reloads {
            config_path: config_path.to_owned(),
            requests,
            log,
        };
        supervisor::run(config, shutdown, reloads, notifier, panics.clone()).await
    };
    // The supervisor catches the panics of its loop and of the stop; this catches one before
    // its workers exist (start-up), which has nothing to stop. No unwinding reaches main,
    // whose exit status (101) would say nothing.
    let result = runtime.block_on(AssertUnwindSafe(run).catch_unwind());
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    let result = match (result, panics.first()) {
        (Ok(Err(e)), _) => Err(e),
        (_, Some(what)) => Err(RunError::Panic(what.to_owned())),
        (Ok(Ok(summary)), None) => Ok(summary),
        (Err(_), None) => Err(RunError::Panic("the supervisor panicked".to_owned())),
    };
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}
