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
    /// `raftsql_read_index_total`: read-index rounds this node asked for (linearizable
    /// reads, and bounded reads without a recent enough round; concurrent ones share a
    /// heartbeat round on the leader).
    pub read_index: IntCounter,
    /// The leader's write path, stage by stage.
    pub write: WriteMetrics,
}

/// Where a leader's write batch spends its time (the state machine records them).
#[derive(Clone, Debug)]
pub struct WriteMetrics {
    /// `raftsql_write_batch_requests`: requests per group-commit batch.
    pub batch_requests: Histogram,
    /// `raftsql_write_batch_execute_seconds`: from the batch's start to its proposal (SQL,
    /// speculative COMMIT, capture of the frames).
    pub execute: Histogram,
    /// `raftsql_write_batch_commit_seconds`: from the proposal to the start of its apply
    /// here (log append and fsync, replication, a quorum's fsyncs, commit).
    pub commit: Histogram,
    /// `raftsql_apply_seconds`: writing one entry's pages into its database.
    pub apply: Histogram,
    /// `raftsql_checkpoint_seconds`: one checkpoint on any node, from its start to the
    /// checkpoint index recorded (the passive copy, phase 2, the files' fsyncs). Writes and
    /// applies go on during most of it; see `checkpoint_stall`.
    pub checkpoint: Histogram,
    /// `raftsql_checkpoint_stall_seconds`: the part of a checkpoint the state machine stops
    /// for (phase 2: copying what was written during the passive copy, emptying the WAL).
    pub checkpoint_stall: Histogram,
}

fn seconds(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(
        HistogramOpts::new(name, help)
            .buckets(exponential_buckets(0.0001, 2.0, 16).expect("valid buckets")),
    )
    .expect("a valid histogram")
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
        let read_index = IntCounter::new(
            "raftsql_read_index_total",
            "Read-index rounds this node asked for.",
        )
        .expect("a valid counter");
        let write = WriteMetrics {
            batch_requests: Histogram::with_opts(
                HistogramOpts::new(
                    "raftsql_write_batch_requests",
                    "Requests per group-commit write batch on the leader.",
                )
                .buckets(exponential_buckets(1.0, 2.0, 10).expect("valid buckets")),
            )
            .expect("a valid histogram"),
            execute: seconds(
                "raftsql_write_batch_execute_seconds",
                "From a write batch's start to its proposal (SQL, commit, capture).",
            ),
            commit: seconds(
                "raftsql_write_batch_commit_seconds",
                "From a write batch's proposal to its apply on the leader (fsyncs, replication).",
            ),
            apply: seconds(
                "raftsql_apply_seconds",
                "Writing one committed entry's pages into its database.",
            ),
            checkpoint: seconds(
                "raftsql_checkpoint_seconds",
                "One checkpoint: the WAL copied into the database files, which are fsynced.",
            ),
            checkpoint_stall: seconds(
                "raftsql_checkpoint_stall_seconds",
                "The part of a checkpoint the state machine stops writes and applies for.",
            ),
        };
        for c in [
            Box::new(write.batch_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(write.execute.clone()),
            Box::new(write.commit.clone()),
            Box::new(write.apply.clone()),
            Box::new(write.checkpoint.clone()),
            Box::new(write.checkpoint_stall.clone()),
            Box::new(wal_fsync.clone()),
            Box::new(leader_changes.clone()),
            Box::new(backup_last_success.clone()),
            Box::new(backup_last_bytes.clone()),
            Box::new(backup_failures.clone()),
            Box::new(read_index.clone()),
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
            read_index,
            write,
        }
    }

    /// The registry holding every metric above; gather it to export them.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}
