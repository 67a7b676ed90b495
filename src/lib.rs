//! spoold's library: every module of the daemon, so that the binary, the integration tests, the
//! property tests and the benchmarks share one implementation. `main.rs` is the entry point.
//!
//! The layout follows the architecture (ARCHITECTURE.md): `runner` runs jobs, `source` is where
//! they come from and where their outcomes go, `daemon` is the process's life around the two,
//! and `client` holds the short-lived commands.

#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod fault;
pub mod job;
pub mod policy;
pub mod runner;
pub mod source;
pub mod top;
