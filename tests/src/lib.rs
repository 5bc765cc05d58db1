//! Support code for the integration and fault tests: checkers for recorded histories.
//!
//! - [`linearizability`]: a WGL/Porcupine-style checker for key/value register histories;
//! - [`report`]: a run's report directory (history, faults, verdict, SVG pictures).
#![warn(missing_docs)]

pub mod linearizability;
pub mod report;
