//! Where jobs come from and where their outcomes go: the seam between the runner and a queue.

pub mod spool;
