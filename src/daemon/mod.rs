//! The daemon's life around the runner and the source: start, serve, reload and stop
//! (`supervisor`), signals, sd_notify, logging, the shared counters and the metrics endpoint.

pub mod logging;
pub mod metrics;
pub mod notify;
pub mod signals;
pub mod stats;
pub mod supervisor;
