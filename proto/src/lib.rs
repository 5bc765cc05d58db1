//! Wire messages of raftsql, generated from `proto/raftsql.proto` at build time.
#![allow(missing_docs)]

/// raftsql.v1: node-to-node frames and the client protocol.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/raftsql.v1.rs"));
}
