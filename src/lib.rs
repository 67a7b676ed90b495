//! spoold's library: every module of the daemon, so that the binary, the integration tests, the
//! property tests and the benchmarks share one implementation. `main.rs` is the entry point.

#![forbid(unsafe_code)]

pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod dispatcher;
pub mod fault;
pub mod handler;
pub mod job;
pub mod logging;
pub mod notify;
pub mod schedule;
pub mod signals;
pub mod spool;
pub mod stats;
pub mod supervisor;
pub mod worker;
