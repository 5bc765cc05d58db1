//! What arrives from the network: Raft messages to the Raft thread, requests dispatched to
//! the API (clients' SQL, members' forwarded writes, services), errors in their wire form.

use std::time::Duration;

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use raftsql_proto::v1 as pb;

use super::config::{NodeFile, MAX_TX_IDLE};
use super::snapshot_pull::receive_snapshot;
use super::Shared;
use crate::consistency::Consistency;
use crate::error::Error;
use crate::net::server::{Handler, ResponseFuture};
use crate::value::Statement;

pub(super) struct NodeHandler {
    shared: std::sync::Weak<Shared>,
}

impl NodeHandler {
    /// A handler that does not keep the node alive (the transport holds it).
    pub(super) fn new(shared: std::sync::Weak<Shared>) -> NodeHandler {
        NodeHandler { shared }
    }
}

impl Shared {
    async fn status_pb(&self, with_digests: bool) -> pb::Response {
        let s = self.status();
        let db_digests = if with_digests {
            match self.digests().await {
                Ok(d) => d.into_iter().collect(),
                Err(e) => return error_response(0, &e),
            }
        } else {
            Default::default()
        };
        pb::Response {
            id: 0,
            body: Some(pb::response::Body::Status(pb::StatusResponse {
                id: s.id,
                leader_id: s.raft.leader_id,
                leader_addr: s.leader_addr.map(|a| a.to_string()).unwrap_or_default(),
                term: s.raft.term,
                commit_index: s.raft.commit,
                applied_index: s.applied,
                checkpoint_index: s.checkpoint,
                role: s.raft.role.clone(),
                log_first_index: s.raft.log_first,
                log_last_index: s.raft.log_last,
                db_digests,
                wal_bytes: self.wal_bytes().into_iter().collect(),
            })),
        }
    }
}

/// Rows in their wire form.
fn rows_pb(rows: &[Vec<crate::value::Value>]) -> Vec<pb::Row> {
    rows.iter()
        .map(|r| pb::Row {
            values: r.iter().map(pb::Value::from).collect(),
        })
        .collect()
}

/// The consistency a query asks for on the wire (an unknown level: linearizable).
fn consistency_of(q: &pb::QueryRequest) -> Consistency {
    match pb::ReadConsistency::try_from(q.consistency) {
        Ok(pb::ReadConsistency::Local) => Consistency::Local,
        Ok(pb::ReadConsistency::Bounded) => {
            Consistency::Bounded(Duration::from_millis(q.max_staleness_ms))
        }
        _ => Consistency::Linearizable,
    }
}

/// Maps an error to its wire form.
pub fn error_response(id: u64, e: &Error) -> pb::Response {
    use pb::error::Code;
    let mut err = pb::Error {
        code: Code::Internal as i32,
        message: e.to_string(),
        ..Default::default()
    };
    match e {
        Error::NotLeader {
            leader_id,
            leader_addr,
        } => {
            err.code = Code::NotLeader as i32;
            err.leader_id = leader_id.unwrap_or(0);
            err.leader_addr = leader_addr.clone().unwrap_or_default();
        }
        Error::Sql { code, message } | Error::Constraint { code, message } => {
            err.code = Code::Sql as i32;
            err.sqlite_code = *code;
            err.message = message.clone();
        }
        Error::OutcomeUnknown => err.code = Code::OutcomeUnknown as i32,
        // The message travels without the variant's prefix, which `from_pb` restores.
        Error::Unavailable(m) => {
            err.code = Code::Unavailable as i32;
            err.message = m.clone();
        }
        Error::Timeout(d) => {
            err.code = Code::Timeout as i32;
            err.timeout_ms = d.as_millis().min(u64::MAX as u128) as u64;
        }
        Error::Invalid(m) => {
            err.code = Code::Invalid as i32;
            err.message = m.clone();
        }
        Error::Shutdown => err.code = Code::Shutdown as i32,
        // The message travels without the variant's prefix, which `from_pb` restores.
        Error::Internal(m) => err.message = m.clone(),
        Error::Application { code, message } => {
            err.code = Code::Application as i32;
            err.app_code = *code;
            err.message = message.clone();
        }
        _ => {}
    }
    pb::Response {
        id,
        body: Some(pb::response::Body::Error(err)),
    }
}

impl Shared {
    /// Member `by` refused this node's connection: a revocation means this node was removed
    /// (it stops for good); anything else is logged.
    pub(super) fn refused(&self, by: u64, refusal: pb::Refused) {
        if refusal.revoked && self.departed.borrow().is_none() {
            tracing::error!("node {by} refused this node: {}", refusal.reason);
            self.mark_departed(refusal.reason);
        } else if !refusal.revoked {
            tracing::warn!("node {by} refused this node: {}", refusal.reason);
        }
    }

    /// Records in `node.json` that this node left (it will refuse to start again) and tells
    /// [`Node::departed`] watchers why.
    pub(super) fn mark_departed(&self, why: String) {
        let dir = &self.cfg.data_dir;
        if let Ok(mut nf) = NodeFile::load(dir) {
            nf.left = true;
            let _ = nf.store(dir);
        }
        self.departed.send_replace(Some(why));
    }
}

impl Handler for NodeHandler {
    fn refused(&self, by: u64, refusal: pb::Refused) {
        if let Some(shared) = self.shared.upgrade() {
            shared.refused(by, refusal);
        }
    }

    fn raft(&self, _from: u64, messages: Vec<Bytes>) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        for b in messages {
            let Ok(m) = Message::parse_from_bytes(&b) else {
                tracing::warn!("dropped an undecodable raft message");
                continue;
            };
            if m.get_msg_type() == MessageType::MsgPropose {
                // Nodes never forward proposals (see the Propose handler): a forwarded
                // batch was executed on another node's state and must not be appended here.
                tracing::warn!("dropped a proposal forwarded by node {}", m.from);
                continue;
            }
            if m.get_msg_type() == MessageType::MsgSnapshot {
                receive_snapshot(shared.clone(), m);
            } else {
                shared.raft.step(m);
            }
        }
    }

    fn request(&self, from: u64, req: pb::Request) -> ResponseFuture {
        let shared = self.shared.upgrade();
        Box::pin(async move {
            let Some(shared) = shared else {
                return error_response(req.id, &Error::Shutdown);
            };
            let id = req.id;
            let mut body = req.body;
            if from == 0 {
                // Only a member may say a write was forwarded (and is not to be forwarded
                // again): a client saying so is ignored.
                if let Some(pb::request::Body::Execute(x)) = &mut body {
                    x.forwarded = false;
                }
            }
            let mut resp = match body {
                Some(pb::request::Body::Execute(x)) if !x.forwarded && !shared.leads() => {
                    shared.forward_execute(x).await
                }
                Some(pb::request::Body::Execute(x)) => {
                    let stmts = x.statements.into_iter().map(Statement::from).collect();
                    match shared.execute_batch(&x.db, stmts).await {
                        Ok(rs) => pb::Response {
                            id,
                            body: Some(pb::response::Body::Execute(pb::ExecuteResponse {
                                leader_addr: String::new(),
                                applied: *shared.applied_rx.borrow(),
                                results: rs
                                    .into_iter()
                                    .map(|r| pb::ExecResult {
                                        rows_affected: r.rows_affected,
                                        last_insert_rowid: r.last_insert_rowid,
                                    })
                                    .collect(),
                            })),
                        },
                        Err(e) => error_response(id, &e),
                    }
                }
                Some(pb::request::Body::Query(q)) => {
                    let consistency = consistency_of(&q);
                    let stmt = q
                        .statement
                        .map(Statement::from)
                        .unwrap_or_else(|| Statement::new(""));
                    match shared.query(&q.db, stmt, consistency).await {
                        Ok(rows) => pb::Response {
                            id,
                            body: Some(pb::response::Body::Query(pb::QueryResponse {
                                columns: rows.columns,
                                rows: rows_pb(&rows.rows),
                            })),
                        },
                        Err(e) => error_response(id, &e),
                    }
                }
                Some(pb::request::Body::Status(s)) => shared.status_pb(s.with_digests).await,
                Some(pb::request::Body::TxBegin(b))
                    if u128::from(b.idle_ms) > MAX_TX_IDLE.as_millis() =>
                {
                    error_response(
                        id,
                        &Error::Invalid(format!(
                            "an idle timeout of {} ms exceeds the {} s limit (an open \
                             transaction holds the database's writer)",
                            b.idle_ms,
                            MAX_TX_IDLE.as_secs()
                        )),
                    )
                }
                Some(pb::request::Body::TxBegin(b)) => {
                    let idle = Duration::from_millis(if b.idle_ms == 0 {
                        30_000
                    } else {
                        b.idle_ms as u64
                    });
                    match shared.tx_begin(&b.db, idle).await {
                        Ok(tx_id) => pb::Response {
                            id,
                            body: Some(pb::response::Body::TxBegin(pb::TxBeginResponse { tx_id })),
                        },
                        Err(e) => error_response(id, &e),
                    }
                }
                Some(pb::request::Body::TxExec(x)) => {
                    let stmt = x
                        .statement
                        .map(Statement::from)
                        .unwrap_or_else(|| Statement::new(""));
                    match shared.tx_exec(x.tx_id, stmt).await {
                        Ok((rows, r)) => pb::Response {
                            id,
                            body: Some(pb::response::Body::TxExec(pb::TxExecResponse {
                                columns: rows.columns,
                                rows: rows_pb(&rows.rows),
                                result: Some(pb::ExecResult {
                                    rows_affected: r.rows_affected,
                                    last_insert_rowid: r.last_insert_rowid,
                                }),
                            })),
                        },
                        Err(e) => error_response(id, &e),
                    }
                }
                Some(pb::request::Body::Service(call)) => {
                    let h = shared.services.read().get(&call.service).cloned();
                    match h {
                        Some((_, false)) if from == 0 => error_response(
                            id,
                            &Error::Invalid(format!(
                                "service {:?} is only for members of the cluster",
                                call.service
                            )),
                        ),
                        Some((h, _)) => match h.call(call.payload).await {
                            Ok(payload) => pb::Response {
                                id,
                                body: Some(pb::response::Body::Service(pb::ServiceReply {
                                    payload,
                                    applied: *shared.applied_rx.borrow(),
                                })),
                            },
                            Err(e) => error_response(id, &e),
                        },
                        None => error_response(
                            id,
                            &Error::Invalid(format!("no service {:?} on this node", call.service)),
                        ),
                    }
                }
                Some(pb::request::Body::TxEnd(x)) => match shared.tx_end(x.tx_id, x.commit).await {
                    Ok(()) => pb::Response {
                        id,
                        body: Some(pb::response::Body::TxEnd(pb::TxEndResponse {})),
                    },
                    Err(e) => error_response(id, &e),
                },
                Some(pb::request::Body::SnapshotChunk(c)) => {
                    let snaps = shared.snapshots.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        snaps.read_chunk(c.index, c.term, &c.file, c.offset)
                    })
                    .await
                    .unwrap_or_else(|e| Err(Error::Internal(e.to_string())));
                    match r {
                        Ok((data, eof)) => pb::Response {
                            id,
                            body: Some(pb::response::Body::SnapshotChunk(
                                pb::SnapshotChunkResponse { data, eof },
                            )),
                        },
                        Err(e) => error_response(id, &e),
                    }
                }
                None => error_response(id, &Error::Invalid("empty request".into())),
            };
            resp.id = id;
            resp
        })
    }
}
