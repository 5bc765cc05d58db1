//! The etcd v3 facade over raftsql-core: etcd's gRPC API (v3.5 wire format, and 3.7's
//! RangeStream), so etcd clients (etcdctl, Go clientv3 as used by kube-apiserver, the Rust
//! etcd-client crate) can use a raftsql cluster.
//!
//! Start one on a node with [`EtcdStore::new`] and [`serve_listener_tls`] (what `raftsql
//! node --etcd-listen` does). Layers, from the network down:
//!
//! | file | owns |
//! |---|---|
//! | [`pb`] | the generated protobuf messages, tonic services and clients |
//! | `server.rs` | [`EtcdServer`]: the tonic services, delegating to a [`Backend`]; limits per connection |
//! | `http.rs` | etcd's HTTP endpoints on the same port (`/health`, `/readyz`, `/version`, `/metrics`) |
//! | `watch.rs`, `hub.rs` | watches: one hub per node following applied revisions, progress notifications |
//! | `lease.rs` | leases: grants, keep-alives, expiry on the leader |
//! | `maintenance.rs`, `members.rs` | Status, Snapshot, Alarm, Defragment, HashKV; MemberList |
//! | `range_stream.rs` | KV.RangeStream (etcd 3.7): a range answered in chunks |
//! | `store.rs` | [`EtcdStore`]: runs requests on the node (writes on the leader, reads at the asked consistency) |
//! | `forward.rs` | writes a follower sends to the leader (`proto/forward.proto`) |
//! | `mvcc/` | etcd's MVCC model in SQL tables: pure functions of a connection, unit-tested |
//! | `error.rs` | etcd's errors and their codes, and how they cross raftsql-core |

mod error;
mod forward;
mod http;
mod hub;
mod lease;
mod maintenance;
mod members;
mod metrics;
mod mvcc;
pub mod pb;
mod range_stream;
mod server;
mod store;
mod watch;

pub use error::EtcdError;
pub use lease::{MAX_TTL, MIN_TTL};
pub use maintenance::ETCD_VERSION;
pub use mvcc::{MAX_TXN_DEPTH, MAX_TXN_OPS, MAX_TXN_TOTAL_OPS};
pub use server::MAX_STREAMS_PER_CONNECTION;
pub use server::{
    serve, serve_listener, serve_listener_tls, Backend, EtcdServer, TlsError, TlsFiles,
    MAX_REQUEST_BYTES, NOT_IMPLEMENTED,
};
pub use store::{EtcdOptions, EtcdStore, DB};
pub use watch::MAX_WATCHES_PER_STREAM;
