//! The etcd v3 API messages and gRPC services, generated at build time from `proto/etcd`
//! (etcd v3.5's `rpc.proto`, `kv.proto`, `auth.proto`, unchanged on the wire) by build.rs.
//!
//! Each module holds the prost messages of one protobuf package; `etcdserverpb` also holds,
//! per service, a `*_server` module (trait + tonic service, e.g. [`etcdserverpb::kv_server::Kv`])
//! and a `*_client` module (e.g. [`etcdserverpb::kv_client::KvClient`]). Field names follow
//! prost's snake_case mapping of the proto names (`ID` → `id`, `TTL` → `ttl`,
//! `peerURLs` → `peer_ur_ls`, `dbSizeInUse` → `db_size_in_use`).
#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    rustdoc::broken_intra_doc_links,
    rustdoc::invalid_html_tags,
    rustdoc::bare_urls
)]

/// `mvccpb`: `KeyValue` and watch `Event`.
pub mod mvccpb {
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
}

/// `authpb`: users, roles and permissions.
pub mod authpb {
    include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
}

/// `etcdserverpb`: the KV, Watch, Lease, Cluster, Maintenance and Auth services.
pub mod etcdserverpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}

/// raftsql's own messages between the etcd facades of two nodes (`proto/forward.proto`):
/// a write that reached a follower, run on the leader.
pub mod raftsql {
    /// `raftsql.etcd`: [`etcd::Forwarded`] and [`etcd::ForwardedReply`].
    pub mod etcd {
        include!(concat!(env!("OUT_DIR"), "/raftsql.etcd.rs"));
    }
}
