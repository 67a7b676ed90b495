//! OS signals: SIGTERM and SIGINT become the stop and abort tokens, SIGHUP a reload request, and
//! an inherited ignored SIGCHLD is undone.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use futures_util::StreamExt;
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::runner::handler::signal_name;

/// The two stages of a stop. `stop` is the root token: cancelled by the first SIGTERM or SIGINT,
/// it stops discovery and lets in-flight jobs drain. `abort` is cancelled by a second
/// signal (or by the supervisor at the drain deadline): handlers are signalled and their jobs
/// requeued. `stop` is a child of `abort`, so an abort is always also a stop.
#[derive(Debug, Clone)]
pub struct Shutdown {
    pub stop: CancellationToken,
    pub abort: CancellationToken,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let abort = CancellationToken::new();
        let stop = abort.child_token();
        Shutdown { stop, abort }
    }
}

/// Installs the signal handlers and starts the task that turns signals into the tokens of
/// `shutdown` and into reload requests. Must run inside the runtime.
pub fn listen(shutdown: &Shutdown) -> std::io::Result<mpsc::Receiver<()>> {
    unignore_sigchld()?;
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    // One pending reload is enough: several SIGHUPs before the first is handled mean one reload.
    let (reload_tx, reload_rx) = mpsc::channel(1);
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        while let Some(signal) = signals.next().await {
            let name = rustix::process::Signal::from_named_raw(signal)
                .map_or_else(|| format!("signal {signal}"), signal_name);
            if signal == SIGHUP {
                tracing::info!("received SIGHUP; reloading the configuration");
                let _ = reload_tx.try_send(());
            } else if !shutdown.stop.is_cancelled() {
                // The stop first, then the line: a journal that is slow to take it (rotating
                // on a slow disk) must not hold back the stop.
                shutdown.stop.cancel();
                tracing::info!(
                    "received {name}; stopping (a second signal aborts the jobs in flight)"
                );
            } else if !shutdown.abort.is_cancelled() {
                shutdown.abort.cancel();
                tracing::info!("received {name} again; aborting the jobs in flight");
            }
        }
    });
    Ok(reload_rx)
}

/// Undoes a SIGCHLD ignored by whoever started spoold (the setting survives exec). With SIGCHLD
/// ignored the kernel reaps every handler the moment it exits, before its worker waits for it,
/// and each job would fail with ECHILD. A handler of our own restores normal reaping, for spoold
/// and, since handlers reset to the default on exec, for the programs it starts. It is installed
/// only then: a handler costs a signal delivery per job, and the default disposition is already
/// right.
fn unignore_sigchld() -> std::io::Result<()> {
    let ignored = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        })
        // Unknown (no /proc): install it, which is right either way.
        .is_none_or(|mask| mask & (1 << (SIGCHLD - 1)) != 0);
    if ignored {
        signal_hook::flag::register(SIGCHLD, Arc::new(AtomicBool::new(false)))?;
    }
    Ok(())
}
