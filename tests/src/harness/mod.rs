//! What the process tests share: clusters of real `raftsql` processes on loopback
//! (`cluster.rs`; each cluster gets its own 127.x.y.0/24 addresses, so tests run in parallel
//! and every node has its own address), partitions with iptables (`net.rs`), the fault
//! schedule (`nemesis.rs`), a real etcd to compare with (`etcd.rs`), certificates
//! (`tls.rs`), the one `etcdctl` wrapper (`etcdctl.rs`) and the one polling helper
//! (`poll.rs`).

// Test code: items are documented where their use is not obvious from their name.
#![allow(missing_docs)]

mod cluster;
pub mod etcd;
mod etcdctl;
pub mod nemesis;
pub mod net;
mod poll;
pub mod tls;

pub use cluster::{bin, Cluster, NodeProc};
pub use etcdctl::{etcdctl, Etcdctl};
pub use poll::{try_wait_for, wait_for, POLL};

/// Whether etcdctl is installed.
pub fn etcdctl_available() -> bool {
    etcdctl::available()
}
