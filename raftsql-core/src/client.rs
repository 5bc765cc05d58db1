//! A client for raftsql nodes in other processes.
//!
//! It talks to any node, follows `NotLeader` hints to the leader, and retries only what is
//! safe to retry: a request refused before it ran (not leader, no leader yet, connection
//! refused). A write whose connection broke after it was sent is reported as
//! [`Error::OutcomeUnknown`], never retried blindly.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use raftsql_proto::v1 as pb;
use tokio::sync::Mutex;

use crate::error::{Error, Result};
use crate::tls::{Dialer, Peer};
use crate::transport::RpcConn;
use crate::value::{ExecResult, Rows, Statement, Value};

/// Client of a raftsql cluster.
pub struct Client {
    endpoints: Vec<SocketAddr>,
    cluster: String,
    conn: Mutex<Option<(SocketAddr, RpcConn)>>,
    preferred: parking_lot::Mutex<Option<SocketAddr>>,
    dialer: Dialer,
    /// How long a call keeps retrying (elections, reconnects) before giving up.
    pub timeout: Duration,
}

impl Client {
    /// A client of the cluster named `cluster` reachable at any of `endpoints`.
    pub fn new(endpoints: Vec<SocketAddr>, cluster: &str) -> Client {
        Client {
            endpoints,
            cluster: cluster.to_string(),
            conn: Mutex::new(None),
            preferred: parking_lot::Mutex::new(None),
            dialer: Dialer::Plain,
            timeout: Duration::from_secs(15),
        }
    }

    /// Connects with `dialer` (e.g. TLS, [`Dialer::client`]) instead of plain TCP.
    pub fn with_dialer(mut self, dialer: Dialer) -> Client {
        self.dialer = dialer;
        self
    }

    /// Sends one request to one node (no retries, no leader following), over plain TCP.
    pub async fn call_node(
        addr: SocketAddr,
        cluster: &str,
        body: pb::request::Body,
    ) -> Result<pb::response::Body> {
        Self::call_node_with(&Dialer::Plain, addr, cluster, body).await
    }

    /// [`Client::call_node`] with `dialer`.
    pub async fn call_node_with(
        dialer: &Dialer,
        addr: SocketAddr,
        cluster: &str,
        body: pb::request::Body,
    ) -> Result<pb::response::Body> {
        let mut c = RpcConn::connect(dialer, Peer::Endpoint, addr, 0, cluster, None)
            .await
            .map_err(|e| Error::Transport(format!("{addr}: {e}")))?;
        c.call(body)
            .await
            .map_err(|e| Error::Transport(format!("{addr}: {e}")))
    }

    /// Status of one node, over plain TCP.
    pub async fn status_of(
        addr: SocketAddr,
        cluster: &str,
        with_digests: bool,
    ) -> Result<pb::StatusResponse> {
        Self::status_of_with(&Dialer::Plain, addr, cluster, with_digests).await
    }

    /// [`Client::status_of`] with `dialer`.
    pub async fn status_of_with(
        dialer: &Dialer,
        addr: SocketAddr,
        cluster: &str,
        with_digests: bool,
    ) -> Result<pb::StatusResponse> {
        match Self::call_node_with(
            dialer,
            addr,
            cluster,
            pb::request::Body::Status(pb::StatusRequest { with_digests }),
        )
        .await?
        {
            pb::response::Body::Status(s) => Ok(s),
            pb::response::Body::Error(e) => Err(from_pb(e)),
            _ => Err(Error::Transport("unexpected response".into())),
        }
    }

    async fn call(&self, body: pb::request::Body, is_write: bool) -> Result<pb::response::Body> {
        self.call_at(body, is_write).await.map(|(_, b)| b)
    }

    /// Like `call`, also saying which node answered.
    async fn call_at(
        &self,
        body: pb::request::Body,
        is_write: bool,
    ) -> Result<(SocketAddr, pb::response::Body)> {
        let deadline = Instant::now() + self.timeout;
        let mut next = 0usize;
        let mut last_err = Error::Unavailable("no endpoint answered".into());
        while Instant::now() < deadline {
            let target = self.preferred.lock().take().unwrap_or_else(|| {
                let a = self.endpoints[next % self.endpoints.len()];
                next += 1;
                a
            });
            let mut guard = self.conn.lock().await;
            // A connection the server already closed (it restarted, or lost leadership and
            // was stopped) is replaced before sending, so the request is never lost in it.
            if guard.as_mut().is_some_and(|(_, c)| c.is_closed()) {
                *guard = None;
            }
            if guard.as_ref().map(|(a, _)| *a) != Some(target) {
                *guard = match RpcConn::connect(
                    &self.dialer,
                    Peer::Endpoint,
                    target,
                    0,
                    &self.cluster,
                    None,
                )
                .await
                {
                    Ok(c) => Some((target, c)),
                    // A certificate the node refuses (or that does not verify) will not
                    // change by retrying.
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        return Err(transport_error(target, &e));
                    }
                    Err(e) => {
                        last_err = transport_error(target, &e);
                        drop(guard);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
            }
            let (_, conn) = guard.as_mut().unwrap();
            let r = conn.call(body.clone()).await;
            match r {
                Err(e)
                    if guard.as_ref().is_some_and(|(_, c)| c.answered() == 0)
                        && (e.kind() == std::io::ErrorKind::PermissionDenied
                            || (!is_write && e.kind() == std::io::ErrorKind::InvalidData)) =>
                {
                    // Refused right after the hello, before any request ran (no client
                    // certificate, a revoked one), or a read that got TLS from a node
                    // (a plaintext client): retrying will not help.
                    *guard = None;
                    return Err(transport_error(target, &e));
                }
                Err(e) => {
                    *guard = None;
                    if is_write {
                        tracing::debug!("write to {target} lost its connection: {e}");
                        return Err(Error::OutcomeUnknown);
                    }
                    last_err = transport_error(target, &e);
                }
                Ok(pb::response::Body::Error(e)) => {
                    let err = from_pb(e);
                    match &err {
                        Error::NotLeader { leader_addr, .. } => {
                            if let Some(a) = leader_addr.as_ref().and_then(|a| a.parse().ok()) {
                                *self.preferred.lock() = Some(a);
                            } else {
                                drop(guard);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            last_err = err;
                        }
                        Error::Unavailable(_) => {
                            drop(guard);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            last_err = err;
                        }
                        _ => {
                            // Stick to this node next time.
                            *self.preferred.lock() = Some(target);
                            return Err(err);
                        }
                    }
                }
                Ok(body) => {
                    // A follower forwarded the write: go to the leader directly next time.
                    let hint = match &body {
                        pb::response::Body::Execute(r) if !r.leader_addr.is_empty() => {
                            r.leader_addr.parse().ok()
                        }
                        _ => None,
                    };
                    *self.preferred.lock() = Some(hint.unwrap_or(target));
                    return Ok((target, body));
                }
            }
        }
        Err(last_err)
    }

    /// Runs statements atomically on `db`.
    pub async fn execute_batch(&self, db: &str, stmts: &[Statement]) -> Result<Vec<ExecResult>> {
        let body = pb::request::Body::Execute(pb::ExecuteRequest {
            forwarded: false,
            db: db.to_string(),
            statements: stmts.iter().map(pb::Statement::from).collect(),
        });
        match self.call(body, true).await? {
            pb::response::Body::Execute(r) => Ok(r
                .results
                .into_iter()
                .map(|r| ExecResult {
                    rows_affected: r.rows_affected,
                    last_insert_rowid: r.last_insert_rowid,
                })
                .collect()),
            _ => Err(Error::Transport("unexpected response".into())),
        }
    }

    /// Runs one write statement.
    pub async fn execute(&self, db: &str, sql: &str, params: Vec<Value>) -> Result<ExecResult> {
        let mut r = self
            .execute_batch(db, &[Statement::with_params(sql, params)])
            .await?;
        Ok(r.pop().unwrap_or_default())
    }

    /// Runs a query (linearizable unless `local`).
    pub async fn query_with(
        &self,
        db: &str,
        sql: &str,
        params: Vec<Value>,
        local: bool,
    ) -> Result<Rows> {
        let body = pb::request::Body::Query(pb::QueryRequest {
            db: db.to_string(),
            statement: Some(pb::Statement::from(&Statement::with_params(sql, params))),
            consistency: if local {
                pb::ReadConsistency::Local as i32
            } else {
                pb::ReadConsistency::Linearizable as i32
            },
        });
        match self.call(body, false).await? {
            pb::response::Body::Query(q) => Ok(Rows {
                columns: q.columns,
                rows: q
                    .rows
                    .into_iter()
                    .map(|r| r.values.into_iter().map(Value::from).collect())
                    .collect(),
            }),
            _ => Err(Error::Transport("unexpected response".into())),
        }
    }

    /// Runs a linearizable query.
    pub async fn query(&self, db: &str, sql: &str, params: Vec<Value>) -> Result<Rows> {
        self.query_with(db, sql, params, false).await
    }
}

impl Client {
    /// Starts an interactive transaction on the leader. Statements run one round trip each;
    /// the leader rolls it back if it stays idle longer than `idle`, or if the transaction is
    /// dropped without `commit` (best effort, by an explicit rollback).
    pub async fn transaction(&self, db: &str, idle: Duration) -> Result<RemoteTransaction> {
        let body = pb::request::Body::TxBegin(pb::TxBeginRequest {
            db: db.to_string(),
            idle_ms: idle.as_millis().min(u32::MAX as u128) as u32,
        });
        // Beginning is safe to retry: nothing is written until commit.
        let (addr, body) = self.call_at(body, false).await?;
        let pb::response::Body::TxBegin(b) = body else {
            return Err(Error::Transport("unexpected response".into()));
        };
        let conn = RpcConn::connect(&self.dialer, Peer::Endpoint, addr, 0, &self.cluster, None)
            .await
            .map_err(|e| Error::Transport(format!("{addr}: {e}")))?;
        Ok(RemoteTransaction {
            conn: Some(conn),
            tx_id: b.tx_id,
        })
    }

    /// A statement prepared for repeated use (the nodes cache its compiled form).
    pub fn prepare<'a>(&'a self, db: &str, sql: &str) -> Prepared<'a> {
        Prepared {
            client: self,
            db: db.to_string(),
            sql: sql.to_string(),
        }
    }
}

/// A statement bound to a client and database (see [`Client::prepare`]).
pub struct Prepared<'a> {
    client: &'a Client,
    db: String,
    sql: String,
}

impl Prepared<'_> {
    /// Runs it as a write with `params`.
    pub async fn execute(&self, params: Vec<Value>) -> Result<ExecResult> {
        self.client.execute(&self.db, &self.sql, params).await
    }
    /// Runs it as a linearizable query with `params`.
    pub async fn query(&self, params: Vec<Value>) -> Result<Rows> {
        self.client.query(&self.db, &self.sql, params).await
    }
}

/// An interactive transaction held open on the leader (see [`Client::transaction`]).
pub struct RemoteTransaction {
    conn: Option<RpcConn>,
    tx_id: u64,
}

impl RemoteTransaction {
    async fn call(&mut self, body: pb::request::Body) -> Result<pb::response::Body> {
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| Error::Invalid("the transaction is over".into()))?;
        match conn.call(body).await {
            Ok(pb::response::Body::Error(e)) => Err(from_pb(e)),
            Ok(b) => Ok(b),
            Err(e) => {
                self.conn = None;
                Err(Error::Transport(format!(
                    "transaction connection lost: {e}"
                )))
            }
        }
    }

    /// Runs a statement; returns its rows (if any) and what it changed.
    pub async fn execute(&mut self, sql: &str, params: Vec<Value>) -> Result<(Rows, ExecResult)> {
        let body = pb::request::Body::TxExec(pb::TxExecRequest {
            tx_id: self.tx_id,
            statement: Some(pb::Statement::from(&Statement::with_params(sql, params))),
        });
        match self.call(body).await? {
            pb::response::Body::TxExec(r) => {
                let res = r.result.unwrap_or_default();
                Ok((
                    Rows {
                        columns: r.columns,
                        rows: r
                            .rows
                            .into_iter()
                            .map(|r| r.values.into_iter().map(Value::from).collect())
                            .collect(),
                    },
                    ExecResult {
                        rows_affected: res.rows_affected,
                        last_insert_rowid: res.last_insert_rowid,
                    },
                ))
            }
            _ => Err(Error::Transport("unexpected response".into())),
        }
    }

    /// Commits; returns once a quorum has it. A lost connection here means the outcome is
    /// unknown.
    pub async fn commit(mut self) -> Result<()> {
        let body = pb::request::Body::TxEnd(pb::TxEndRequest {
            tx_id: self.tx_id,
            commit: true,
        });
        let r = self.call(body).await;
        self.conn = None;
        match r {
            Ok(_) => Ok(()),
            Err(Error::Transport(_)) => Err(Error::OutcomeUnknown),
            Err(e) => Err(e),
        }
    }

    /// Rolls back.
    pub async fn rollback(mut self) -> Result<()> {
        let body = pb::request::Body::TxEnd(pb::TxEndRequest {
            tx_id: self.tx_id,
            commit: false,
        });
        let r = self.call(body).await.map(|_| ());
        self.conn = None;
        r
    }
}

impl Drop for RemoteTransaction {
    fn drop(&mut self) {
        // Dropped without commit or rollback: roll back in the background if possible; the
        // leader's idle timeout covers the rest.
        if let Some(mut conn) = self.conn.take() {
            let tx_id = self.tx_id;
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    let _ = conn
                        .call(pb::request::Body::TxEnd(pb::TxEndRequest {
                            tx_id,
                            commit: false,
                        }))
                        .await;
                });
            }
        }
    }
}

/// Converts a wire error to [`Error`].
pub fn from_pb(e: pb::Error) -> Error {
    use pb::error::Code;
    match Code::try_from(e.code).unwrap_or(Code::Internal) {
        Code::NotLeader => Error::NotLeader {
            leader_id: (e.leader_id != 0).then_some(e.leader_id),
            leader_addr: (!e.leader_addr.is_empty()).then_some(e.leader_addr),
        },
        Code::Sql => Error::Sql {
            code: e.sqlite_code,
            message: e.message,
        },
        Code::OutcomeUnknown => Error::OutcomeUnknown,
        Code::Unavailable => Error::Unavailable(e.message),
        Code::Timeout => Error::Timeout(Duration::ZERO),
        Code::Invalid => Error::Invalid(e.message),
        Code::Shutdown => Error::Shutdown,
        Code::Internal => Error::Internal(e.message),
    }
}

/// A transport error for `target`, with what to do about it when the cause is a TLS mistake.
fn transport_error(target: impl std::fmt::Display, e: &std::io::Error) -> Error {
    Error::Transport(crate::tls::with_hint(format!("{target}: {e}")))
}
