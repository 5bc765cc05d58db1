//! What a node measures over time, for monitoring: Prometheus metrics (the `prometheus`
//! crate) in a registry of the node's own ([`Metrics::registry`]), named as etcd names the
//! same quantity so that etcd's dashboards and alerts work unchanged.
//!
//! Only what must be observed as it happens lives here (fsync durations, leader changes,
//! scheduled backups).
//! Point-in-time values (has a leader, applied index, roles, database sizes) are read from
//! [`crate::Node::status`] when a scrape asks; the etcd facade's `/metrics` does that.

use prometheus::{exponential_buckets, Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

/// The node's metrics.
pub struct Metrics {
    registry: Registry,
    /// `etcd_disk_wal_fsync_duration_seconds`: each `fdatasync` of the Raft log (etcd's WAL),
    /// with etcd's buckets (1 ms to 8 s, doubling).
    pub wal_fsync: Histogram,
    /// `etcd_server_leader_changes_seen_total`: how often this node saw a new leader.
    pub leader_changes: IntCounter,
    /// `raftsql_backup_last_success_timestamp_seconds`: when this node last saved a scheduled
    /// backup (Unix seconds; 0 if never).
    pub backup_last_success: IntGauge,
    /// `raftsql_backup_last_size_bytes`: the size of that backup.
    pub backup_last_bytes: IntGauge,
    /// `raftsql_backup_failures_total`: scheduled backups that failed.
    pub backup_failures: IntCounter,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let registry = Registry::new();
        let wal_fsync = Histogram::with_opts(
            HistogramOpts::new(
                "etcd_disk_wal_fsync_duration_seconds",
                "The latency distributions of fsync called by the Raft log.",
            )
            .buckets(exponential_buckets(0.001, 2.0, 14).expect("valid buckets")),
        )
        .expect("a valid histogram");
        let leader_changes = IntCounter::new(
            "etcd_server_leader_changes_seen_total",
            "The number of leader changes seen.",
        )
        .expect("a valid counter");
        let backup_last_success = IntGauge::new(
            "raftsql_backup_last_success_timestamp_seconds",
            "When this node last saved a scheduled backup (Unix seconds).",
        )
        .expect("a valid gauge");
        let backup_last_bytes = IntGauge::new(
            "raftsql_backup_last_size_bytes",
            "The size of the last scheduled backup.",
        )
        .expect("a valid gauge");
        let backup_failures = IntCounter::new(
            "raftsql_backup_failures_total",
            "Scheduled backups that failed.",
        )
        .expect("a valid counter");
        for c in [
            Box::new(wal_fsync.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(leader_changes.clone()),
            Box::new(backup_last_success.clone()),
            Box::new(backup_last_bytes.clone()),
            Box::new(backup_failures.clone()),
        ] {
            registry.register(c).expect("registered once");
        }
        Metrics {
            registry,
            wal_fsync,
            leader_changes,
            backup_last_success,
            backup_last_bytes,
            backup_failures,
        }
    }

    /// The registry holding every metric above; gather it to export them.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}
