//! The network layer: framed TCP (or TLS) between nodes and from clients.
//!
//! | file | owns |
//! |---|---|
//! | `frame.rs` | the frame format (length, crc32, protobuf `Frame`) and its reader with a size limit |
//! | `dial.rs` | opening a connection: TCP from the node's own address, then TLS for the [`Peer`] meant |
//! | `tls.rs` | the cluster CA, node and client certificates, `PeerTls` (who is a peer), private files |
//! | `server.rs` | accepting connections: hello, identity check, Raft batches and requests served |
//! | `transport.rs` | the node's endpoint: the listener and one batching sender per peer |
//! | `conn.rs` | `RpcConn`: one call at a time on one connection |
//! | `mux.rs` | `MuxConn`: many calls at once on one connection, answered by request id |
//!
//! Dependencies point down the table's reverse order only: `frame` uses nothing here, `dial`
//! uses `frame`, `tls` uses `dial`, `server` uses `frame` and `tls`, `transport` uses all of
//! those, and the two connection kinds use `dial` and `frame`.

pub(crate) mod conn;
pub(crate) mod dial;
pub(crate) mod frame;
pub(crate) mod mux;
pub(crate) mod server;
pub mod tls;
pub(crate) mod transport;

pub use dial::{Dialer, Peer};
pub use frame::{DEFAULT_MAX_CLIENT_FRAME, MAX_FRAME};
