//! The answers of etcd's HTTP endpoints on the client port (served by `crate::http`), from the
//! node's state:
//!
//! - `/health` (etcd 3.4-3.6): `{"health":"true","reason":""}` when the member has a leader and
//!   a linearizable read answers (a serializable one with `?serializable=true`); else 503
//!   with the reason (`RAFT NO LEADER`, or the read's error).
//! - `/livez` (etcd 3.6): the process serves a serializable read. `/readyz`: also has a
//!   leader and serves a linearizable read, so a node cut off from the quorum is taken out of
//!   a load balancer's rotation. Both answer `ok`, or 503 with `[-]check failed: reason`
//!   lines; `?verbose` lists every check (`[+]name ok`), as etcd does.
//! - `/version`: `{"etcdserver":..,"etcdcluster":..}`.
//! - `/metrics`: Prometheus text: the node's own metrics ([`raftsql_core::Metrics`]) and the
//!   point-in-time gauges below, with etcd's names where the meaning matches and `raftsql_`
//!   ones for the rest.

use raftsql_core::Consistency;
use std::time::Duration;

use prometheus::{IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::http::HttpAnswer;
use crate::maintenance::ETCD_VERSION;
use crate::store::{EtcdStore, DB};

/// How long a health check's read may take before the check fails.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

impl EtcdStore {
    /// The answer to `GET path?query`, `None` for a path not served.
    pub(crate) async fn http_answer(&self, path: &str, query: &str) -> Option<HttpAnswer> {
        let flags: Vec<&str> = query.split('&').filter(|f| !f.is_empty()).collect();
        let verbose = flags
            .iter()
            .any(|f| *f == "verbose" || f.starts_with("verbose="));
        Some(match path {
            "/health" => {
                let serializable = flags.contains(&"serializable=true");
                let reason = if !self.has_leader_now() {
                    Some("RAFT NO LEADER".to_string())
                } else {
                    self.check_read(!serializable)
                        .await
                        .err()
                        .map(|e| format!("QGET ERROR: {e}"))
                };
                match reason {
                    None => HttpAnswer::json(200, r#"{"health":"true","reason":""}"#),
                    Some(r) => HttpAnswer::json(
                        503,
                        format!(
                            r#"{{"health":"false","reason":"{}"}}"#,
                            r.replace('\\', "\\\\").replace('"', "\\\"")
                        ),
                    ),
                }
            }
            "/livez" => self.checks("livez", false, verbose).await,
            "/readyz" => self.checks("readyz", true, verbose).await,
            "/version" => HttpAnswer::json(
                200,
                format!(r#"{{"etcdserver":"{ETCD_VERSION}","etcdcluster":"{ETCD_VERSION}"}}"#),
            ),
            "/metrics" => self.metrics_text().await,
            _ => return None,
        })
    }

    /// A leader is known and was heard from within an election timeout (a cut-off standby
    /// keeps the leader's id but hears nothing).
    pub(crate) fn has_leader_now(&self) -> bool {
        let r = self.node().status().raft;
        r.leader_id != 0 && r.heard_leader
    }

    /// A read of the store's revision, linearizable or not, within [`CHECK_TIMEOUT`].
    async fn check_read(&self, linearizable: bool) -> Result<(), String> {
        let read = self.node().read(
            DB,
            if linearizable {
                Consistency::Linearizable
            } else {
                Consistency::Local
            },
            |_| Ok(()),
        );
        match tokio::time::timeout(CHECK_TIMEOUT, read).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer in {CHECK_TIMEOUT:?}")),
        }
    }

    /// etcd 3.6's `/livez` (`ready` false) or `/readyz` checks.
    async fn checks(&self, what: &str, ready: bool, verbose: bool) -> HttpAnswer {
        let mut results: Vec<(&str, Result<(), String>)> = vec![
            // raftsql raises no alarms, so no data corruption alarm either.
            ("data_corruption", Ok(())),
            ("serializable_read", self.check_read(false).await),
        ];
        if ready {
            let leader = if self.has_leader_now() {
                Ok(())
            } else {
                Err("no leader".to_string())
            };
            results.push(("leader", leader));
            results.push(("linearizable_read", self.check_read(true).await));
        }
        let failed = results.iter().any(|r| r.1.is_err());
        let mut body = String::new();
        for (name, r) in &results {
            match r {
                Ok(()) if verbose => body.push_str(&format!("[+]{name} ok\n")),
                Ok(()) => {}
                Err(e) => body.push_str(&format!("[-]{name} failed: {e}\n")),
            }
        }
        if failed {
            body.push_str(&format!("{what} check failed\n"));
            HttpAnswer::text(503, body)
        } else {
            body.push_str("ok\n");
            HttpAnswer::text(200, body)
        }
    }

    /// The node's metrics and this scrape's gauges, in Prometheus text format.
    async fn metrics_text(&self) -> HttpAnswer {
        let st = self.node().status();
        let (voters, learners) = self.node().conf_roles();
        let id = self.node().id();
        let db_size = self.db_sizes().await.map_or(0, |s| s.0);
        let registry = Registry::new();
        let gauge = |name: &str, help: &str, v: i64| {
            let g = IntGauge::new(name, help).expect("a valid gauge");
            g.set(v);
            registry.register(Box::new(g)).expect("registered once");
        };
        gauge(
            "etcd_server_has_leader",
            "Whether or not a leader exists. 1 is existence, 0 is not.",
            i64::from(st.raft.leader_id != 0),
        );
        gauge(
            "etcd_server_is_leader",
            "Whether or not this member is a leader. 1 if is, 0 otherwise.",
            i64::from(st.raft.role == "leader"),
        );
        gauge(
            "etcd_server_is_learner",
            "Whether or not this member is a learner (a raftsql standby or spare).",
            i64::from(learners.contains(&id)),
        );
        gauge(
            "etcd_server_proposals_committed_total",
            "The total number of consensus proposals committed (the Raft commit index).",
            st.raft.commit as i64,
        );
        gauge(
            "etcd_server_proposals_applied_total",
            "The total number of consensus proposals applied (the applied index).",
            st.applied as i64,
        );
        gauge(
            "etcd_mvcc_db_total_size_in_bytes",
            "Total size of the underlying database physically allocated in bytes.",
            db_size,
        );
        gauge(
            "raftsql_checkpoint_index",
            "The Raft index the databases' files are checkpointed to.",
            st.checkpoint as i64,
        );
        gauge(
            "raftsql_apply_lag_entries",
            "Committed Raft entries not applied yet on this node.",
            st.raft.commit.saturating_sub(st.applied) as i64,
        );
        gauge(
            "raftsql_raft_log_entries",
            "Entries in this node's Raft log (first to last index).",
            (st.raft.log_last + 1).saturating_sub(st.raft.log_first) as i64,
        );
        gauge(
            "raftsql_raft_term",
            "The current Raft term.",
            st.raft.term as i64,
        );
        gauge(
            "raftsql_voters",
            "Voters in the configuration.",
            voters.len() as i64,
        );
        gauge(
            "raftsql_learners",
            "Learners (standbys and spares) in the configuration.",
            learners.len() as i64,
        );
        let role = IntGaugeVec::new(
            Opts::new(
                "raftsql_raft_role",
                "This node's Raft role: 1 for the role it has, 0 for the others.",
            ),
            &["role"],
        )
        .expect("a valid gauge");
        for r in ["leader", "follower", "candidate", "pre-candidate"] {
            role.with_label_values(&[r])
                .set(i64::from(st.raft.role == r));
        }
        registry.register(Box::new(role)).expect("registered once");
        let mut families = self.node().metrics().registry().gather();
        families.extend(registry.gather());
        match TextEncoder::new().encode_to_string(&families) {
            Ok(text) => HttpAnswer {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: text,
            },
            Err(e) => HttpAnswer::text(500, format!("encoding metrics: {e}\n")),
        }
    }
}
