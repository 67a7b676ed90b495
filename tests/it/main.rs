//! The integration tests: every suite drives the real `spoold` binary (or, for `spool_props`,
//! the library's spool) and shares the helpers in `util` and the throwaway systemd in `sysd`.
//!
//! They are one test crate with a module per suite, so that each helper is compiled once and
//! every helper is used somewhere (a crate per file compiled `util` into each, where the helpers
//! a file did not use were dead code). Run a suite with `cargo test --test it core::`, one test
//! with `cargo test --test it core::oldest_job_runs_first`.

mod nats;
mod sysd;
mod util;

mod bad_inputs;
mod cancel;
mod client;
mod core;
mod handlers;
mod jetstream;
mod jetstream_cluster;
mod metrics;
mod operator;
mod operator_sysd;
mod packaging;
mod persistent;
mod reliability;
mod schedule;
mod shutdown;
mod spool_props;
mod systemd;
mod top;
