//! The etcd v3 facade over raftsql-core: etcd's gRPC API (v3.5 wire format), so etcd clients
//! (etcdctl, Go clientv3 as used by kube-apiserver, the Rust etcd-client crate) can use a
//! raftsql cluster. See issue 4.
//!
//! - [`pb`]: the generated protobuf messages and tonic services and clients.
//! - [`server`]: [`EtcdServer`], the tonic services, delegating to a [`Backend`]; [`serve`].
//! - `range_stream`: KV.RangeStream (etcd 3.7), a range answered in chunks.
//! - [`http`]: etcd's HTTP endpoints on the same port (`/health`, `/livez`, `/readyz`,
//!   `/version`, `/metrics`) and the gRPC call counters.
mod error;
mod forward;
pub mod http;
mod hub;
pub mod lease;
pub mod maintenance;
mod members;
mod metrics;
mod mvcc;
pub mod pb;
mod range_stream;
pub mod server;
pub mod store;
pub mod watch;

pub use mvcc::{MAX_TXN_DEPTH, MAX_TXN_OPS, MAX_TXN_TOTAL_OPS};
pub use server::{
    serve, serve_listener, serve_listener_tls, Backend, EtcdServer, TlsError, TlsFiles,
};
pub use store::{EtcdOptions, EtcdStore};
