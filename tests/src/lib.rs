//! Support code for the integration and fault tests: checkers for recorded histories.
//!
//! - [`linearizability`]: a WGL/Porcupine-style checker for key/value register histories.
#![warn(missing_docs)]

pub mod linearizability;
