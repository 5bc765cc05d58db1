//! Integration tests of raftsql with real processes: see `tests/*.rs`. The binary
//! `raftsql-under-test` is the `raftsql` CLI (same code), built so that tests can find it
//! with `CARGO_BIN_EXE_raftsql-under-test`.
//!
//! The library holds what the fault tests share:
//!
//! - [`linearizability`]: a WGL/Porcupine-style checker for key/value register histories;
//! - [`append`]: the list-append checker (lost, duplicated, reordered, torn or stale);
//! - [`report`]: a run's report directory (history, faults, verdict, SVG pictures);
//! - [`harness`]: clusters of real processes, partitions, faults, a real etcd, etcdctl.
#![warn(missing_docs)]

pub mod append;
#[cfg(test)]
mod docs;
pub mod harness;
pub mod linearizability;
pub mod report;
