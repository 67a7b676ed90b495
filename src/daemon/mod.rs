//! The daemon's life around the runner and the source: start, serve, reload and stop
//! (`supervisor`), signals, sd_notify, logging and the shared counters.

pub mod logging;
pub mod notify;
pub mod signals;
pub mod stats;
pub mod supervisor;
