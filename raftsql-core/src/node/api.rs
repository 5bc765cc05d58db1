//! The public API of a running node: writes, reads, transactions, status, shutdown; and
//! the shared state's side of each (queue to the state machine, read index, waits).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raft::eraftpb::ConfChange;
use raftsql_proto::v1 as pb;
use tokio::sync::{oneshot, watch};

use super::config::NodeConfig;
use super::{Node, RaftStatus, ServiceHandler, Shared, Status, WeakNode};
use crate::consistency::Consistency;
use crate::error::{Error, Result};
use crate::net::Dialer;
use crate::roles::{Change, Role};
use crate::snapshot::SnapshotStore;
use crate::state::{self, ToStateMachine, TxOp, WriteReq};
use crate::value::{ExecResult, Rows, Statement, Value};

/// How often `wait_ready` looks for a leader.
const READY_POLL: Duration = Duration::from_millis(10);
/// How often a wait on the Raft thread's published state looks again.
const STATE_POLL: Duration = Duration::from_millis(20);
/// How long a leadership handover may take (`transfer_leadership`, a leader's shutdown).
const HANDOVER_WAIT: Duration = Duration::from_secs(3);
/// How long a role change may take to be applied here.
const CONF_CHANGE_WAIT: Duration = Duration::from_secs(5);
/// Past the write timeout, how long a caller waits for the state machine's own answer.
const REPLY_GRACE: Duration = Duration::from_secs(1);
/// The pause before asking again for a writer held by an interactive transaction.
const WRITER_BUSY_RETRY: Duration = Duration::from_millis(2);
/// How long a read waits for this node to apply up to its read index.
const APPLY_WAIT: Duration = Duration::from_secs(10);

/// How long a read waits for the leader to confirm a read index.
const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(3);

impl Node {
    /// How this node dials its peers (plain TCP, or TLS with its node certificate).
    pub fn dialer(&self) -> Dialer {
        self.shared.dialer()
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.shared.cfg.id
    }

    /// Current status.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// let s = node.status();
    /// assert_eq!(s.raft.leader_id, node.id());
    /// assert!(s.applied >= s.raft.commit.min(s.applied));
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn status(&self) -> Status {
        self.shared.status()
    }

    /// The current term, as the Raft thread last published it (cheap: no lock, no copy; for
    /// response headers).
    pub fn term(&self) -> u64 {
        self.shared.leadership.borrow().term
    }

    /// Bytes in each of this node's database WALs (held in memory, see `vfs.rs`), by name.
    pub fn wal_bytes(&self) -> BTreeMap<String, u64> {
        self.shared.wal_bytes()
    }

    /// Runs one write statement (atomically, replicated) and says what it changed.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// use raftsql_core::Value;
    /// node.execute("main", "CREATE TABLE kv(k TEXT PRIMARY KEY, v)", vec![]).await?;
    /// let r = node
    ///     .execute("main", "INSERT INTO kv VALUES (?1, ?2)", vec!["a".into(), Value::Integer(1)])
    ///     .await?;
    /// assert_eq!(r.rows_affected, 1);
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn execute(&self, db: &str, sql: &str, params: Vec<Value>) -> Result<ExecResult> {
        let mut r = self
            .execute_batch(db, vec![Statement::with_params(sql, params)])
            .await?;
        Ok(r.pop().unwrap_or_default())
    }

    /// Runs statements atomically as one transaction: all take effect or none.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// use raftsql_core::{Error, Statement};
    /// node.execute("main", "CREATE TABLE kv(k TEXT PRIMARY KEY, v)", vec![]).await?;
    /// let batch = vec![
    ///     Statement::new("INSERT INTO kv VALUES ('a', 1)"),
    ///     Statement::new("INSERT INTO kv VALUES ('a', 2)"), // fails: the batch is rolled back
    /// ];
    /// let e = node.execute_batch("main", batch).await.unwrap_err();
    /// assert!(matches!(e, Error::Constraint { .. }));
    /// let n = node.query("main", "SELECT count(*) FROM kv", vec![]).await?;
    /// assert_eq!(n.rows[0][0], raftsql_core::Value::Integer(0));
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn execute_batch(&self, db: &str, stmts: Vec<Statement>) -> Result<Vec<ExecResult>> {
        self.shared.execute_batch(db, stmts).await
    }

    /// Runs `f` as a write on the leader: inside the group-commit transaction, in its own
    /// SAVEPOINT (if it fails, only its changes are rolled back), on the writer connection.
    /// Returns `f`'s result once the transaction is committed by a quorum and applied here.
    /// `f` must be deterministic only in what it returns: replicas get its pages, not a re-run.
    /// On a follower: [`Error::NotLeader`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// // A read-modify-write in Rust, atomic on the leader.
    /// node.execute("main", "CREATE TABLE c(id INTEGER PRIMARY KEY, n INTEGER)", vec![]).await?;
    /// let n: i64 = node
    ///     .write("main", |c| {
    ///         c.execute("INSERT OR IGNORE INTO c VALUES (1, 0)", [])?;
    ///         c.execute("UPDATE c SET n = n + 1 WHERE id = 1", [])?;
    ///         Ok(c.query_row("SELECT n FROM c WHERE id = 1", [], |r| r.get(0))?)
    ///     })
    ///     .await?;
    /// assert_eq!(n, 1);
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn write<T, F>(&self, db: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<T> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let work = state::Work::Func(Box::new(state::TypedWrite { f, reply }));
        self.shared.submit_write(db, work, rx).await
    }

    /// Runs `f` on a read transaction of `db`, as fresh as `consistency` asks: it sees only
    /// committed entries, as of one consistent point. `Ok(None)` if `db` does not exist yet.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// use raftsql_core::Consistency;
    /// node.execute("main", "CREATE TABLE t(x)", vec![]).await?;
    /// let n: Option<i64> = node
    ///     .read("main", Consistency::Linearizable, |c| {
    ///         Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?)
    ///     })
    ///     .await?;
    /// assert_eq!(n, Some(0));
    /// // A database nobody has written is `None`.
    /// assert!(node.read("nothing", Consistency::Local, |_| Ok(())).await?.is_none());
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn read<T, F>(&self, db: &str, consistency: Consistency, f: F) -> Result<Option<T>>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<T> + Send + 'static,
    {
        state::check_db_name(db)?;
        self.shared.read_barrier(consistency).await?;
        let Some(handle) = self.shared.dbs.read().get(db).cloned() else {
            return Ok(None);
        };
        tokio::task::spawn_blocking(move || handle.read(f).map(Some))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
    }

    /// [`Node::read`] at [`Consistency::Local`], on the calling thread: for a thread of the
    /// embedding program's own that follows this node's state (the etcd watch hub), saving
    /// the hop to tokio's blocking pool and back. It blocks: never call it from async code.
    /// `Ok(None)` if `db` does not exist yet.
    pub fn read_local_blocking<T>(
        &self,
        db: &str,
        f: impl FnOnce(&rusqlite::Connection) -> Result<T>,
    ) -> Result<Option<T>> {
        state::check_db_name(db)?;
        let Some(handle) = self.shared.dbs.read().get(db).cloned() else {
            return Ok(None);
        };
        handle.read(f).map(Some)
    }

    /// Registers a service other members can call (see [`ServiceHandler`]); a connection
    /// that did not identify as a member (a client) is refused.
    pub fn register_service(&self, name: &str, handler: Arc<dyn ServiceHandler>) {
        self.shared
            .services
            .write()
            .insert(name.to_string(), (handler, false));
    }

    /// Registers a service that clients may call too.
    pub fn register_client_service(&self, name: &str, handler: Arc<dyn ServiceHandler>) {
        self.shared
            .services
            .write()
            .insert(name.to_string(), (handler, true));
    }

    /// This node's TLS files, if the cluster runs TLS.
    pub(crate) fn tls_material(&self) -> Option<&crate::net::tls::Material> {
        self.shared.tls.as_ref()
    }

    /// Calls `service` on the current leader (which may be this node) and returns its reply.
    /// A call whose answer is lost after it was sent is [`Error::OutcomeUnknown`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// use std::sync::Arc;
    /// use bytes::Bytes;
    /// use raftsql_core::{Result, ServiceHandler};
    ///
    /// /// Answers with the payload reversed (on the leader).
    /// struct Reverse;
    /// impl ServiceHandler for Reverse {
    ///     fn call(&self, payload: Bytes)
    ///         -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes>> + Send>> {
    ///         Box::pin(async move { Ok(payload.iter().rev().copied().collect::<Vec<u8>>().into()) })
    ///     }
    /// }
    /// node.register_service("reverse", Arc::new(Reverse));
    /// let reply = node.call_leader("reverse", Bytes::from_static(b"abc")).await?;
    /// assert_eq!(&reply[..], b"cba");
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn call_leader(&self, service: &str, payload: Bytes) -> Result<Bytes> {
        self.shared.call_leader(service, payload).await
    }

    /// The index of the last entry applied here, and every later change of it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// let mut applied = node.subscribe_applied();
    /// let before = *applied.borrow();
    /// node.execute("main", "CREATE TABLE t(x)", vec![]).await?;
    /// // Answered writes are applied here already; later ones arrive as changes.
    /// assert!(*applied.borrow_and_update() > before);
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.shared.applied_rx.clone()
    }

    /// Runs a query with a linearizable read (ReadIndex): it sees every write acknowledged
    /// before it started, on any node.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// let rows = node.query("main", "SELECT 1 + ?1", vec![raftsql_core::Value::Integer(41)]).await?;
    /// assert_eq!(rows.rows, vec![vec![raftsql_core::Value::Integer(42)]]);
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn query(&self, db: &str, sql: &str, params: Vec<Value>) -> Result<Rows> {
        self.query_with(db, sql, params, Consistency::Linearizable)
            .await
    }

    /// Runs a query as fresh as `consistency` asks.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// use std::time::Duration;
    /// use raftsql_core::Consistency;
    /// node.execute("main", "CREATE TABLE t(x)", vec![]).await?;
    /// node.execute("main", "INSERT INTO t VALUES (1)", vec![]).await?;
    /// // At most 1 s stale: served without a round trip if this node confirmed its state
    /// // within the last second.
    /// let bounded = Consistency::Bounded(Duration::from_secs(1));
    /// let rows = node.query_with("main", "SELECT x FROM t", vec![], bounded).await?;
    /// assert_eq!(rows.rows, vec![vec![raftsql_core::Value::Integer(1)]]);
    /// // Whatever this node has applied (here: the leader, so everything).
    /// let rows = node.query_with("main", "SELECT x FROM t", vec![], Consistency::Local).await?;
    /// assert_eq!(rows.columns, vec!["x"]);
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
        self.shared
            .query(db, Statement::with_params(sql, params), consistency)
            .await
    }

    /// Starts an interactive transaction on `db` (leader only). It holds the writer, so other
    /// writes wait; it is rolled back after `idle` without a statement, or when dropped.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// use std::time::Duration;
    /// node.execute("main", "CREATE TABLE acct(id INTEGER PRIMARY KEY, balance INTEGER)", vec![]).await?;
    /// node.execute("main", "INSERT INTO acct VALUES (1, 100), (2, 0)", vec![]).await?;
    /// let mut tx = node.transaction("main", Duration::from_secs(5)).await?;
    /// let (rows, _) = tx.execute("SELECT balance FROM acct WHERE id = 1", vec![]).await?;
    /// assert_eq!(rows.rows[0][0], raftsql_core::Value::Integer(100));
    /// tx.execute("UPDATE acct SET balance = balance - 30 WHERE id = 1", vec![]).await?;
    /// tx.execute("UPDATE acct SET balance = balance + 30 WHERE id = 2", vec![]).await?;
    /// tx.commit().await?; // returns once a quorum has it
    /// let sum = node.query("main", "SELECT sum(balance) FROM acct", vec![]).await?;
    /// assert_eq!(sum.rows[0][0], raftsql_core::Value::Integer(100));
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn transaction(&self, db: &str, idle: Duration) -> Result<Transaction> {
        let id = self.shared.tx_begin(db, idle).await?;
        Ok(Transaction {
            shared: self.shared.clone(),
            id,
            done: false,
        })
    }

    /// Every member's id and address.
    pub fn peers(&self) -> BTreeMap<u64, SocketAddr> {
        self.shared.peers.lock().clone()
    }

    /// Names of the databases on this node.
    pub fn databases(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shared.dbs.read().keys().cloned().collect();
        v.sort();
        v
    }

    /// A reference to this node that does not keep it running: a background thread or task
    /// of the embedding program holds it, so that dropping the last [`Node`] still stops it.
    pub fn downgrade(&self) -> WeakNode {
        WeakNode {
            shared: Arc::downgrade(&self.shared),
            threads: Arc::downgrade(&self.threads),
            lock: Arc::downgrade(&self._lock),
        }
    }

    pub(crate) fn snapshots(&self) -> Arc<SnapshotStore> {
        self.shared.snapshots.clone()
    }

    /// Waits until the cluster can serve this node: a leader is known and has committed an
    /// entry of its term, and this node has applied it (so a linearizable read here, or a
    /// write on the leader, no longer fails for want of a leader). A freshly started
    /// cluster needs an election first (about one election timeout).
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use raftsql_core::{Node, NodeConfig};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// let node = Node::start(NodeConfig::new(1, dir.path(), addr)).await?;
    /// node.wait_ready(Duration::from_secs(10)).await?;
    /// assert!(node.is_leader()); // a cluster of one
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.shared.raft_status.lock().clone();
            if status.leader_id != 0 && (status.heard_leader || self.shared.leads()) {
                let left = deadline.saturating_duration_since(Instant::now());
                let index = tokio::time::timeout(left, self.shared.read_index()).await;
                if let Ok(Ok(index)) = index {
                    return self.shared.wait_applied(index).await;
                }
            }
            if self.shared.stopped.load(Ordering::SeqCst) {
                return Err(Error::Shutdown);
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "no leader confirmed within {timeout:?}"
                )));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// Whether this node leads the cluster right now.
    pub fn is_leader(&self) -> bool {
        self.shared.leads()
    }

    /// The applied Raft configuration: (voters, standbys).
    pub fn conf_roles(&self) -> (Vec<u64>, Vec<u64>) {
        let cs = self.shared.snapshots.conf_state();
        (cs.voters.clone(), cs.learners.clone())
    }

    /// The node's metrics (for a `/metrics` endpoint; see [`crate::Metrics`]).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.shared.metrics
    }

    /// This node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.shared.cfg
    }

    /// Hands leadership to the most up-to-date other voter and waits (up to 3 s) until that
    /// node leads; answers its id.
    pub async fn transfer_leadership(&self) -> Result<u64> {
        let rx = self.shared.raft.transfer_leader()?;
        let to = rx.await.map_err(|_| Error::Shutdown)??;
        let deadline = Instant::now() + HANDOVER_WAIT;
        while Instant::now() < deadline {
            let leader = self.shared.raft_status.lock().leader_id;
            if leader == to {
                return Ok(to);
            }
            tokio::time::sleep(STATE_POLL).await;
        }
        Err(Error::Unavailable(format!(
            "node {to} did not take leadership within {HANDOVER_WAIT:?}"
        )))
    }

    /// Applies one role change through a Raft configuration change and waits (up to 5 s)
    /// until this node has applied it. Leader only.
    pub(crate) async fn change_role(&self, c: Change) -> Result<()> {
        use raft::eraftpb::ConfChangeType;
        let mut cc = ConfChange {
            node_id: c.id,
            ..Default::default()
        };
        cc.set_change_type(match c.to {
            Role::Voter => ConfChangeType::AddNode,
            Role::Standby => ConfChangeType::AddLearnerNode,
            Role::Spare => ConfChangeType::RemoveNode,
        });
        let rx = self.shared.raft.conf_change(cc)?;
        rx.await.map_err(|_| Error::Shutdown)??;
        let deadline = Instant::now() + CONF_CHANGE_WAIT;
        while Instant::now() < deadline {
            let (voters, learners) = self.conf_roles();
            if Role::of(c.id, &voters, &learners) == c.to {
                return Ok(());
            }
            tokio::time::sleep(STATE_POLL).await;
        }
        Err(Error::Timeout(CONF_CHANGE_WAIT))
    }

    /// Changes once this node has left the cluster or been removed from it: `Some(why)`.
    pub fn departed(&self) -> watch::Receiver<Option<String>> {
        self.shared.departed.subscribe()
    }

    /// Records that this node is no longer a member (its data directory will refuse to
    /// start again) and tells [`Node::departed`] watchers.
    pub(crate) fn mark_departed(&self, why: String) {
        self.shared.mark_departed(why);
    }

    /// Member `by` refused this node's connection (see `Shared::refused`).
    pub(crate) fn refused(&self, by: u64, refusal: pb::Refused) {
        self.shared.refused(by, refusal);
    }

    /// The removed members: the transport refuses their connections.
    pub(crate) fn set_revoked(&self, ids: std::collections::HashSet<u64>) {
        if let Some(t) = self.shared.transport.lock().as_ref() {
            t.set_revoked(ids);
        }
    }

    /// Replaces the addresses of the other members (from the replicated registry).
    pub(crate) fn set_peers(&self, peers: BTreeMap<u64, SocketAddr>) {
        let transport = self.shared.transport.lock().clone();
        let mut cur = self.shared.peers.lock();
        if let Some(t) = &transport {
            for (id, addr) in &peers {
                t.set_peer(*id, *addr);
            }
            for id in cur.keys() {
                if !peers.contains_key(id) {
                    t.remove_peer(*id);
                }
            }
        }
        *cur = peers;
    }

    /// Raft status (leader, term, commit index, role).
    pub(crate) fn raft_status(&self) -> RaftStatus {
        self.shared.raft_status.lock().clone()
    }

    /// Digest of each database's pages (equal on every replica once they applied the same
    /// index).
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// node.execute("main", "CREATE TABLE t(x)", vec![]).await?;
    /// let digests = node.digests().await?;
    /// assert!(digests.contains_key("main")); // equal on every replica at the same index
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn digests(&self) -> Result<BTreeMap<String, String>> {
        self.shared.digests().await
    }

    /// Stops the node: the Raft and state machine threads finish, files are closed, the data
    /// directory lock is released when the last clone is dropped.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// node.shutdown().await; // a leader of several hands leadership over first
    /// assert!(node.execute("main", "SELECT 1", vec![]).await.is_err());
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self) {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        // A leader hands over first, so that the cluster has no election gap.
        if self.is_leader() && self.conf_roles().0.len() > 1 {
            match tokio::time::timeout(HANDOVER_WAIT, self.transfer_leadership()).await {
                Ok(Ok(to)) => tracing::info!("handed leadership to node {to} before stopping"),
                Ok(Err(e)) => tracing::warn!("could not hand leadership over: {e}"),
                Err(_) => tracing::warn!("leadership transfer timed out"),
            }
        }
        if self.shared.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(t) = self.shared.transport.lock().take() {
            t.close();
        }
        self.shared.raft.shutdown();
        let _ = self.shared.sm_tx.send(ToStateMachine::Shutdown);
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        tracing::info!(id = self.id(), "node stopped");
    }
}

/// An interactive transaction (see [`Node::transaction`]).
pub struct Transaction {
    shared: Arc<Shared>,
    id: u64,
    done: bool,
}

impl Transaction {
    /// Runs a statement inside the transaction; returns its rows (if any) and changes.
    pub async fn execute(&mut self, sql: &str, params: Vec<Value>) -> Result<(Rows, ExecResult)> {
        self.shared
            .tx_exec(self.id, Statement::with_params(sql, params))
            .await
    }

    /// Commits: returns once the transaction is committed by a quorum.
    pub async fn commit(mut self) -> Result<()> {
        self.done = true;
        self.shared.tx_end(self.id, true).await
    }

    /// Rolls back.
    pub fn rollback(mut self) {
        self.done = true;
        let _ = self
            .shared
            .send_sm(ToStateMachine::Tx(TxOp::Rollback { id: self.id }));
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if !self.done {
            let _ = self
                .shared
                .send_sm(ToStateMachine::Tx(TxOp::Rollback { id: self.id }));
        }
    }
}

impl Shared {
    fn send_sm(&self, m: ToStateMachine) -> Result<()> {
        self.sm_tx.send(m).map_err(|_| Error::Shutdown)
    }

    pub(super) fn status(&self) -> Status {
        let raft = self.raft_status.lock().clone();
        let leader_addr = self.peers.lock().get(&raft.leader_id).copied();
        Status {
            id: self.cfg.id,
            leader_addr,
            applied: self.progress.applied.load(Ordering::SeqCst),
            checkpoint: self.progress.checkpoint.load(Ordering::SeqCst),
            raft,
        }
    }

    /// The WAL of each of this node's databases.
    pub(super) fn wal_bytes(&self) -> BTreeMap<String, u64> {
        self.dbs
            .read()
            .iter()
            .map(|(name, h)| (name.clone(), h.wal_bytes()))
            .collect()
    }

    fn with_leader_hint(&self, e: Error) -> Error {
        match e {
            Error::NotLeader { .. } => {
                let id = self.raft_status.lock().leader_id;
                let addr = self.peers.lock().get(&id).map(|a| a.to_string());
                Error::NotLeader {
                    leader_id: (id != 0 && id != self.cfg.id).then_some(id),
                    leader_addr: if id != self.cfg.id { addr } else { None },
                }
            }
            other => other,
        }
    }

    pub(super) async fn execute_batch(
        &self,
        db: &str,
        stmts: Vec<Statement>,
    ) -> Result<Vec<ExecResult>> {
        if stmts.is_empty() {
            state::check_db_name(db)?;
            return Ok(Vec::new());
        }
        let (tx, rx) = oneshot::channel();
        self.submit_write(db, state::Work::Statements { stmts, reply: tx }, rx)
            .await
    }

    /// Queues a write for the state machine and waits for its answer.
    async fn submit_write<T>(
        &self,
        db: &str,
        work: state::Work,
        rx: oneshot::Receiver<Result<T>>,
    ) -> Result<T> {
        state::check_db_name(db)?;
        if !self.leads() {
            return Err(self.with_leader_hint(Error::NotLeader {
                leader_id: None,
                leader_addr: None,
            }));
        }
        let timeout = self.cfg.write_timeout;
        self.send_sm(ToStateMachine::Write(WriteReq {
            db: db.to_string(),
            work,
            deadline: Instant::now() + timeout,
        }))?;
        match tokio::time::timeout(timeout + REPLY_GRACE, rx).await {
            Ok(Ok(r)) => r.map_err(|e| match e {
                Error::Timeout(_) => Error::Timeout(timeout),
                e => self.with_leader_hint(e),
            }),
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// Opens an interactive transaction (waits up to the write timeout for the writer).
    pub(super) async fn tx_begin(&self, db: &str, idle: Duration) -> Result<u64> {
        state::check_db_name(db)?;
        let deadline = Instant::now() + self.cfg.write_timeout;
        loop {
            let (tx, rx) = oneshot::channel();
            self.send_sm(ToStateMachine::Tx(TxOp::Begin {
                db: db.to_string(),
                idle,
                reply: tx,
            }))?;
            match rx.await.map_err(|_| Error::Shutdown)? {
                Ok(id) => return Ok(id),
                Err(Error::Unavailable(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(WRITER_BUSY_RETRY).await;
                }
                Err(e) => return Err(self.with_leader_hint(e)),
            }
        }
    }

    pub(super) async fn tx_exec(&self, id: u64, stmt: Statement) -> Result<(Rows, ExecResult)> {
        let (tx, rx) = oneshot::channel();
        self.send_sm(ToStateMachine::Tx(TxOp::Exec {
            id,
            stmt,
            reply: tx,
        }))?;
        rx.await.map_err(|_| Error::Shutdown)?
    }

    /// Commits (answers once committed by a quorum) or rolls back.
    pub(super) async fn tx_end(&self, id: u64, commit: bool) -> Result<()> {
        if !commit {
            return self.send_sm(ToStateMachine::Tx(TxOp::Rollback { id }));
        }
        let (tx, rx) = oneshot::channel();
        self.send_sm(ToStateMachine::Tx(TxOp::Commit { id, reply: tx }))?;
        match tokio::time::timeout(self.cfg.write_timeout, rx).await {
            Ok(r) => r
                .map_err(|_| Error::Shutdown)?
                .map_err(|e| self.with_leader_hint(e)),
            Err(_) => Err(Error::Timeout(self.cfg.write_timeout)),
        }
    }

    /// Whether this node leads, as the Raft thread last published.
    pub(super) fn leads(&self) -> bool {
        self.leadership.borrow().leads()
    }

    /// A read index: every write committed before this call started is at or below it.
    /// The newest one (by start) is kept for [`Consistency::Bounded`] reads.
    pub(super) async fn read_index(&self) -> Result<u64> {
        let started = Instant::now();
        self.metrics.read_index.inc();
        let rx = self.raft.read_index()?;
        let index = match tokio::time::timeout(READ_INDEX_TIMEOUT, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(Error::Shutdown),
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "no leader confirmed a read index within {READ_INDEX_TIMEOUT:?} (no quorum?)"
                )))
            }
        };
        let mut fresh = self.fresh.lock();
        if fresh.is_none_or(|(s, i)| s < started && i <= index) {
            *fresh = Some((started, index));
        }
        Ok(index)
    }

    async fn wait_applied(&self, index: u64) -> Result<()> {
        let mut rx = self.applied_rx.clone();
        let r = tokio::time::timeout(APPLY_WAIT, async {
            rx.wait_for(|a| *a >= index).await.map(|_| ())
        })
        .await;
        match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => Err(Error::Timeout(APPLY_WAIT)),
        }
    }

    /// Waits until this node's state is as fresh as `c` asks (see [`Consistency`]).
    async fn read_barrier(&self, c: Consistency) -> Result<()> {
        let index = match c {
            Consistency::Local => return Ok(()),
            Consistency::Linearizable => self.read_index().await?,
            Consistency::Bounded(bound) => {
                let fresh = *self.fresh.lock();
                match fresh {
                    Some((started, index)) if started.elapsed() <= bound => index,
                    _ => self.read_index().await?,
                }
            }
        };
        self.wait_applied(index).await
    }

    pub(super) async fn query(
        &self,
        db: &str,
        stmt: Statement,
        consistency: Consistency,
    ) -> Result<Rows> {
        state::check_db_name(db)?;
        self.read_barrier(consistency).await?;
        let handle = self.dbs.read().get(db).cloned();
        let (max, budget) = (self.cfg.max_result_bytes, self.cfg.statement_timeout);
        // A database nobody has written yet reads as an empty one (SQLite's behaviour on a
        // file that does not exist), so a fresh cluster answers `SELECT 1`.
        tokio::task::spawn_blocking(move || match handle {
            Some(h) => h.query(&stmt, max, budget),
            None => state::query_empty(&stmt, max, budget),
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
    }

    pub(super) async fn digests(&self) -> Result<BTreeMap<String, String>> {
        let handles: Vec<_> = self.dbs.read().values().cloned().collect();
        tokio::task::spawn_blocking(move || {
            let mut out = BTreeMap::new();
            for h in handles {
                let d = h.digest()?;
                // An empty file (a first write that failed on the leader) holds no data and
                // exists only where it was tried: not part of the replicated state.
                if !d.starts_with("0:") {
                    out.insert(h.name.clone(), d);
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
    }
}
