//! A client for raftsql nodes in other processes.
//!
//! A [`Client`] is a cheap `Clone + Send + Sync` handle: every clone shares one multiplexed
//! connection per node ([`MuxConn`]: many calls in flight on one socket, answered in any
//! order), the reconnects, and which node leads. Share one client among all tasks, as with
//! `tonic::transport::Channel`.
//!
//! It talks to any node, follows `NotLeader` hints to the leader, and retries only what is
//! safe to retry: a request refused before it ran (not leader, no leader yet, connection
//! refused, a connection found closed before the request was sent). A write whose
//! connection broke after it was sent is reported as [`Error::OutcomeUnknown`], never retried
//! blindly.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftsql_proto::v1 as pb;

use crate::consistency::Consistency;
use crate::error::{Error, Result};
use crate::net::conn::RpcConn;
use crate::net::mux::{CallError, MuxCache, MuxConn};
use crate::net::{Dialer, Peer};
use crate::value::{ExecResult, Rows, Statement, Value};

/// How long a call keeps retrying (elections, reconnects) unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// The pause before retrying after a refusal that names no leader, or a failed connect.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Client of a raftsql cluster: cheap to clone, every clone shares the connections.
///
/// ```
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
/// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
/// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
/// use raftsql_core::{Client, Value};
///
/// // Any members' addresses will do: the client finds the leader.
/// let client = Client::new(vec![addr], "raftsql");
/// client.execute("main", "CREATE TABLE kv(k INTEGER PRIMARY KEY, v TEXT)", vec![]).await?;
/// let mut tasks = Vec::new();
/// for i in 0..64 {
///     let c = client.clone(); // the same connections: calls are multiplexed
///     tasks.push(tokio::spawn(async move {
///         c.execute("main", "INSERT INTO kv VALUES (?1, 'x')", vec![Value::Integer(i)]).await
///     }));
/// }
/// for t in tasks {
///     t.await??;
/// }
/// let n = client.query("main", "SELECT count(*) FROM kv", vec![]).await?;
/// assert_eq!(n.rows, vec![vec![Value::Integer(64)]]);
/// # node.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    endpoints: Arc<[SocketAddr]>,
    cluster: Arc<str>,
    dialer: Dialer,
    timeout: Duration,
    shared: Arc<Shared>,
}

/// What every clone of a client shares.
#[derive(Default)]
struct Shared {
    /// The connection to each node (a call takes a clone: no lock is held across it).
    conns: MuxCache,
    /// The node to try first: the leader, as last learned.
    preferred: parking_lot::Mutex<Option<SocketAddr>>,
    /// Where the next round over the endpoints starts.
    next: AtomicUsize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoints)
            .field("cluster", &self.cluster)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the cluster named `cluster` reachable at any of `endpoints`. Nothing is
    /// dialled until the first call.
    pub fn new(endpoints: Vec<SocketAddr>, cluster: &str) -> Client {
        Client {
            endpoints: endpoints.into(),
            cluster: cluster.into(),
            dialer: Dialer::Plain,
            timeout: DEFAULT_TIMEOUT,
            shared: Arc::default(),
        }
    }

    /// Connects with `dialer` (e.g. TLS, [`Dialer::client`]) instead of plain TCP. The
    /// returned client has connections of its own (clones made before do not share them).
    pub fn with_dialer(mut self, dialer: Dialer) -> Client {
        self.dialer = dialer;
        self.shared = Arc::default();
        self
    }

    /// How long a call keeps retrying (elections, reconnects) before it fails; 15 s unless
    /// set. A call never takes longer than this.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// # let client = raftsql_core::Client::new(vec![addr], "raftsql");
    /// use std::time::Duration;
    /// let impatient = client.clone().with_timeout(Duration::from_secs(1));
    /// impatient.query("main", "SELECT 1", vec![]).await?;
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The nodes this client contacts.
    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.endpoints
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
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// # let client = raftsql_core::Client::new(vec![addr], "raftsql");
    /// use raftsql_core::Client;
    /// let s = Client::status_of(addr, "raftsql", false).await?;
    /// assert_eq!((s.id, s.role.as_str()), (1, "leader"));
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
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

    /// The shared connection to `addr`, opened (or reopened, if the node closed it) now.
    async fn conn_to(&self, addr: SocketAddr) -> std::io::Result<MuxConn> {
        let connect =
            || MuxConn::connect(&self.dialer, Peer::Endpoint, addr, 0, &self.cluster, None);
        self.shared.conns.get_or_connect(addr, connect).await
    }

    /// Forgets `addr` as the node to try first (it failed).
    fn unprefer(&self, addr: SocketAddr) {
        let mut p = self.shared.preferred.lock();
        if *p == Some(addr) {
            *p = None;
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
        if self.endpoints.is_empty() {
            return Err(Error::Invalid("the client has no endpoints".into()));
        }
        let deadline = Instant::now() + self.timeout;
        // Where a round over the endpoints starts (taken only when no node is preferred).
        let mut next: Option<usize> = None;
        let mut last_err = Error::Unavailable("no endpoint answered".into());
        while Instant::now() < deadline {
            let preferred = *self.shared.preferred.lock();
            let target = preferred.unwrap_or_else(|| {
                let n =
                    next.get_or_insert_with(|| self.shared.next.fetch_add(1, Ordering::Relaxed));
                let target = self.endpoints[*n % self.endpoints.len()];
                *n += 1;
                target
            });
            let connected = tokio::time::timeout_at(deadline.into(), self.conn_to(target)).await;
            let Ok(connected) = connected else {
                // Out of time while connecting: nothing was sent.
                last_err = Error::Unavailable(format!(
                    "{target}: not connected within the client's timeout ({:?})",
                    self.timeout
                ));
                break;
            };
            let conn = match connected {
                Ok(c) => c,
                // A certificate the node refuses (or that does not verify) will not
                // change by retrying.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Err(transport_error(target, &e));
                }
                Err(e) => {
                    self.unprefer(target);
                    last_err = unreachable(target, &e);
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            };
            let r = match tokio::time::timeout_at(deadline.into(), conn.call(body.clone())).await {
                Ok(r) => r,
                Err(_) if is_write => return Err(Error::OutcomeUnknown),
                Err(_) => return Err(Error::Timeout(self.timeout)),
            };
            match r {
                Err(e)
                    if conn.answered() == 0
                        && (e.kind() == std::io::ErrorKind::PermissionDenied
                            || (!is_write && e.kind() == std::io::ErrorKind::InvalidData)) =>
                {
                    // Refused right after the hello, before any request ran (no client
                    // certificate, a revoked one), or a read that got TLS from a node
                    // (a plaintext client): retrying will not help.
                    return Err(transport_error(target, e.io()));
                }
                Err(CallError::NotSent(e)) => {
                    // The connection was found closed before the request left: the next
                    // round reconnects (or tries another node).
                    last_err = unreachable(target, &e);
                }
                Err(CallError::Lost(e)) => {
                    self.unprefer(target);
                    if is_write {
                        tracing::debug!("write to {target} lost its connection: {e}");
                        return Err(Error::OutcomeUnknown);
                    }
                    last_err = unreachable(target, &e);
                }
                Ok(pb::response::Body::Error(e)) => {
                    let err = from_pb(e);
                    match &err {
                        Error::NotLeader { leader_addr, .. } => {
                            let hint = leader_addr.as_ref().and_then(|a| a.parse().ok());
                            self.prefer(preferred, hint);
                            if hint.is_none() {
                                tokio::time::sleep(RETRY_PAUSE).await;
                            }
                            last_err = err;
                        }
                        Error::Unavailable(_) => {
                            // This node cannot serve now (cut off, no leader known): another
                            // one may.
                            self.unprefer(target);
                            tokio::time::sleep(RETRY_PAUSE).await;
                            last_err = err;
                        }
                        _ => {
                            // Stick to this node next time.
                            self.prefer(preferred, Some(target));
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
                    self.prefer(preferred, Some(hint.unwrap_or(target)));
                    return Ok((target, body));
                }
            }
        }
        Err(last_err)
    }

    /// Makes `new` the node to try first, unless it already is (`current`, read at the
    /// start of the attempt): the shared lock is taken only for a change.
    fn prefer(&self, current: Option<SocketAddr>, new: Option<SocketAddr>) {
        if current != new {
            *self.shared.preferred.lock() = new;
        }
    }

    /// Runs statements atomically on `db`: all take effect or none.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// # let client = raftsql_core::Client::new(vec![addr], "raftsql");
    /// use raftsql_core::{Error, Statement, Value};
    /// client.execute("main", "CREATE TABLE u(email TEXT UNIQUE)", vec![]).await?;
    /// let r = client
    ///     .execute_batch("main", &[
    ///         Statement::with_params("INSERT INTO u VALUES (?1)", vec!["a@x".into()]),
    ///         Statement::with_params("INSERT INTO u VALUES (?1)", vec!["b@x".into()]),
    ///     ])
    ///     .await?;
    /// assert_eq!(r.len(), 2);
    /// // A constraint failure is typed, with SQLite's extended code.
    /// let e = client
    ///     .execute("main", "INSERT INTO u VALUES ('a@x')", vec![])
    ///     .await
    ///     .unwrap_err();
    /// assert_eq!(e.constraint(), Some(raftsql_core::ConstraintKind::Unique));
    /// assert!(matches!(e, Error::Constraint { code: 2067, .. }));
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
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
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// # let client = raftsql_core::Client::new(vec![addr], "raftsql");
    /// use raftsql_core::Value;
    /// client.execute("main", "CREATE TABLE n(x INTEGER)", vec![]).await?;
    /// let r = client.execute("main", "INSERT INTO n VALUES (?1)", vec![Value::Integer(7)]).await?;
    /// assert_eq!((r.rows_affected, r.last_insert_rowid), (1, 1));
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn execute(&self, db: &str, sql: &str, params: Vec<Value>) -> Result<ExecResult> {
        let mut r = self
            .execute_batch(db, &[Statement::with_params(sql, params)])
            .await?;
        Ok(r.pop().unwrap_or_default())
    }

    /// Runs a query as fresh as `consistency` asks, on whichever node the client talks to.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// # let client = raftsql_core::Client::new(vec![addr], "raftsql");
    /// use std::time::Duration;
    /// use raftsql_core::{Consistency, Value};
    /// let stale_ok = Consistency::Bounded(Duration::from_millis(500));
    /// let rows = client.query_with("main", "SELECT 6 * 7", vec![], stale_ok).await?;
    /// assert_eq!(rows.rows, vec![vec![Value::Integer(42)]]);
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn query_with(
        &self,
        db: &str,
        sql: &str,
        params: Vec<Value>,
        consistency: Consistency,
    ) -> Result<Rows> {
        let (level, max_staleness_ms) = match consistency {
            Consistency::Linearizable => (pb::ReadConsistency::Linearizable, 0),
            Consistency::Local => (pb::ReadConsistency::Local, 0),
            Consistency::Bounded(d) => (
                pb::ReadConsistency::Bounded,
                d.as_millis().min(u64::MAX as u128) as u64,
            ),
        };
        let body = pb::request::Body::Query(pb::QueryRequest {
            db: db.to_string(),
            statement: Some(pb::Statement::from(&Statement::with_params(sql, params))),
            consistency: level as i32,
            max_staleness_ms,
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

    /// Runs a linearizable query: it sees every write acknowledged before it started.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// # let client = raftsql_core::Client::new(vec![addr], "raftsql");
    /// let rows = client.query("main", "SELECT 'hello'", vec![]).await?;
    /// assert_eq!(rows.rows, vec![vec!["hello".into()]]);
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn query(&self, db: &str, sql: &str, params: Vec<Value>) -> Result<Rows> {
        self.query_with(db, sql, params, Consistency::Linearizable)
            .await
    }
}

impl Client {
    /// Starts an interactive transaction on the leader. Statements run one round trip each;
    /// the leader rolls it back if it stays idle longer than `idle`, or if the transaction is
    /// dropped without `commit` (best effort, by an explicit rollback).
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// # let client = raftsql_core::Client::new(vec![addr], "raftsql");
    /// use std::time::Duration;
    /// use raftsql_core::Value;
    /// client.execute("main", "CREATE TABLE stock(item TEXT PRIMARY KEY, n INTEGER)", vec![]).await?;
    /// client.execute("main", "INSERT INTO stock VALUES ('apple', 3)", vec![]).await?;
    /// let mut tx = client.transaction("main", Duration::from_secs(5)).await?;
    /// let (rows, _) = tx.execute("SELECT n FROM stock WHERE item = 'apple'", vec![]).await?;
    /// if rows.rows[0][0] == Value::Integer(3) {
    ///     tx.execute("UPDATE stock SET n = n - 1 WHERE item = 'apple'", vec![]).await?;
    /// }
    /// tx.commit().await?;
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
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
        // The transaction lives on the node that began it: its statements go there, on the
        // shared connection.
        let conn = self
            .conn_to(addr)
            .await
            .map_err(|e| transport_error(addr, &e))?;
        Ok(RemoteTransaction {
            conn: Some(conn),
            tx_id: b.tx_id,
        })
    }

    /// A statement prepared for repeated use (the nodes cache its compiled form).
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// # let client = raftsql_core::Client::new(vec![addr], "raftsql");
    /// use raftsql_core::Value;
    /// client.execute("main", "CREATE TABLE p(id INTEGER PRIMARY KEY, name TEXT)", vec![]).await?;
    /// let insert = client.prepare("main", "INSERT INTO p VALUES (?1, ?2)");
    /// for (id, name) in [(1, "ada"), (2, "grace")] {
    ///     insert.execute(vec![Value::Integer(id), name.into()]).await?;
    /// }
    /// let by_id = client.prepare("main", "SELECT name FROM p WHERE id = ?1");
    /// assert_eq!(by_id.query(vec![Value::Integer(2)]).await?.rows[0][0], "grace".into());
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn prepare(&self, db: &str, sql: &str) -> Prepared {
        Prepared {
            client: self.clone(),
            db: db.to_string(),
            sql: sql.to_string(),
        }
    }
}

/// A statement bound to a client and database (see [`Client::prepare`]).
#[derive(Clone, Debug)]
pub struct Prepared {
    client: Client,
    db: String,
    sql: String,
}

impl Prepared {
    /// Runs it as a write with `params`.
    pub async fn execute(&self, params: Vec<Value>) -> Result<ExecResult> {
        self.client.execute(&self.db, &self.sql, params).await
    }
    /// Runs it as a linearizable query with `params`.
    pub async fn query(&self, params: Vec<Value>) -> Result<Rows> {
        self.client.query(&self.db, &self.sql, params).await
    }
    /// Runs it as a query as fresh as `consistency` asks.
    pub async fn query_with(&self, params: Vec<Value>, consistency: Consistency) -> Result<Rows> {
        self.client
            .query_with(&self.db, &self.sql, params, consistency)
            .await
    }
}

/// An interactive transaction held open on the leader (see [`Client::transaction`]).
pub struct RemoteTransaction {
    conn: Option<MuxConn>,
    tx_id: u64,
}

impl RemoteTransaction {
    async fn call(&mut self, body: pb::request::Body) -> Result<pb::response::Body> {
        let conn = self
            .conn
            .as_ref()
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
        let conn = self
            .conn
            .take()
            .ok_or_else(|| Error::Invalid("the transaction is over".into()))?;
        match conn.call(body).await {
            Ok(pb::response::Body::Error(e)) => Err(from_pb(e)),
            Ok(_) => Ok(()),
            // Never sent: the leader rolls it back when its idle timeout expires.
            Err(CallError::NotSent(e)) => Err(Error::Transport(format!(
                "transaction connection lost before the commit was sent ({e}): not committed"
            ))),
            Err(CallError::Lost(_)) => Err(Error::OutcomeUnknown),
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
        if let Some(conn) = self.conn.take() {
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
        Code::Sql if e.sqlite_code & 0xff == rusqlite::ffi::SQLITE_CONSTRAINT => {
            Error::Constraint {
                code: e.sqlite_code,
                message: e.message,
            }
        }
        Code::Sql => Error::Sql {
            code: e.sqlite_code,
            message: e.message,
        },
        Code::OutcomeUnknown => Error::OutcomeUnknown,
        Code::Unavailable => Error::Unavailable(e.message),
        Code::Timeout => Error::Timeout(Duration::from_millis(e.timeout_ms)),
        Code::Invalid => Error::Invalid(e.message),
        Code::Shutdown => Error::Shutdown,
        Code::Application => Error::Application {
            code: e.app_code,
            message: e.message,
        },
        Code::Internal => Error::Internal(e.message),
    }
}

/// A node that could not be reached (or whose connection broke before an answer): the call
/// goes on with another node, and the cluster counts as unavailable if none answers.
fn unreachable(target: SocketAddr, e: &std::io::Error) -> Error {
    Error::Unavailable(crate::net::dial::with_hint(format!("{target}: {e}")))
}

/// A transport error for `target`, with what to do about it when the cause is a TLS mistake.
fn transport_error(target: impl std::fmt::Display, e: &std::io::Error) -> Error {
    Error::Transport(crate::net::dial::with_hint(format!("{target}: {e}")))
}
