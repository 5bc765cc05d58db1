//! The member registry, join tokens, and the leader's role keeper.
//!
//! **Registry.** Who the members are (id, address, failure domain, weight) is a table of the
//! replicated system database [`SYSTEM_DB`], written on the leader like any other write, so
//! every node knows every member's address. A member's *role* is not in the table: it is its
//! place in the Raft configuration (voter, learner = standby, absent = spare), so there is one
//! source of truth for who votes. The first leader seeds the table from the bootstrap peers.
//! Every node follows the table (the sync task) to keep its transport's addresses current.
//!
//! **Joining.** `add-node` asks the leader for a token: 128 random bits, shown once. The leader
//! stores only keys derived from it (an id to find it and an HMAC key), with an expiry and a
//! single-use flag. The joiner proves it holds the token with an HMAC over a fresh nonce and
//! its address (the token never crosses the wire); the leader checks the token, marks it used
//! and registers the joiner as a spare in one write transaction (so a token cannot be used
//! twice), and answers with its own HMAC over the nonce and the cluster's name: only a member
//! of the cluster that issued the token can produce it, so a joiner cannot be lured into
//! joining an impostor.
//!
//! **Keeping roles.** While a node leads, its keeper probes every member every
//! [`PROBE_EVERY`] and applies at most one change planned by `roles::plan` per round,
//! waiting until it is applied.
//!
//! The services: [`MEMBERS_SERVICE`] answers on every node (clients send membership requests
//! there; they are forwarded to the leader), [`JOIN_SERVICE`] is the only call a connection
//! that has not named the cluster may make.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use prost::Message as _;
use raftsql_proto::v1 as pb;
use rusqlite::OptionalExtension;
use sha2::{Digest, Sha256};

use crate::consistency::Consistency;
use crate::error::{Error, Result};
use crate::history;
use crate::net::conn::RpcConn;
pub use crate::net::server::JOIN_SERVICE;
use crate::net::{Dialer, Peer};
use crate::node::{Node, ServiceHandler, WeakNode};
use crate::roles::{plan, Change, MemberView, Reason, Role};

/// The replicated database holding the registry and the join tokens.
pub const SYSTEM_DB: &str = "_raftsql";
/// Membership requests ([`pb::MembershipRequest`]), answered on any node.
pub const MEMBERS_SERVICE: &str = "raftsql.members";
/// The same requests, run on the leader.
const LEADER_SERVICE: &str = "raftsql.members.leader";
/// Members only: the leader tells a node it removed (see `Notice`).
pub const NOTICE_SERVICE: &str = "raftsql.members.notice";
/// How often the leader probes the members.
pub const PROBE_EVERY: Duration = Duration::from_millis(300);
/// A standby this close to the leader's commit index may become a voter.
const CAUGHT_UP_ENTRIES: u64 = 256;
/// A token's lifetime unless the request says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS members(
    id INTEGER PRIMARY KEY,
    addr TEXT NOT NULL UNIQUE,
    domain TEXT NOT NULL DEFAULT '',
    weight INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS join_tokens(
    id BLOB PRIMARY KEY,
    key BLOB NOT NULL,
    expires_ms INTEGER NOT NULL,
    reusable INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS removed(id INTEGER PRIMARY KEY);
";

/// What the leader last learned of a member by probing it.
#[derive(Clone, Copy, Debug)]
struct Health {
    last_ok: Instant,
    applied: u64,
}

/// Per-node membership state.
#[derive(Default)]
pub(crate) struct Keeper {
    health: Mutex<HashMap<u64, Health>>,
    /// When this node's keeper started acting as leader (None while it follows). Members
    /// get the benefit of the doubt for `offline_after` from then: a new leader has not had
    /// time to hear from everyone.
    leading_since: Mutex<Option<Instant>>,
    /// Members a `remove` on this leader is taking out: the keeper leaves them alone (it
    /// would otherwise promote the spare a removal makes of a node before its registry row
    /// is deleted).
    removing: Mutex<std::collections::HashSet<u64>>,
}

/// Marks a member as being removed while it lives.
struct Removing<'a>(&'a Keeper, u64);

impl Drop for Removing<'_> {
    fn drop(&mut self) {
        self.0.removing.lock().remove(&self.1);
    }
}

/// What a joiner needs to start: its id, the cluster's name and its members.
#[derive(Clone, Debug)]
pub struct JoinTicket {
    /// The id the cluster gave this node.
    pub id: u64,
    /// The cluster's name.
    pub cluster: String,
    /// Every member's address, this node included.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// A TLS cluster's files for this node (its certificate, the CA).
    pub tls: Option<crate::net::tls::Material>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// (id, HMAC key) derived from a token's secret.
fn derive(secret: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let id = Sha256::new()
        .chain_update(b"raftsql join id\0")
        .chain_update(secret)
        .finalize()[..16]
        .to_vec();
    let key = Sha256::new()
        .chain_update(b"raftsql join key\0")
        .chain_update(secret)
        .finalize()
        .to_vec();
    (id, key)
}

/// HMAC-SHA256 over length-prefixed `parts` (so that part boundaries are unambiguous).
fn mac(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    mac(key, parts).finalize().into_bytes().to_vec()
}

/// Constant-time check of a tag made by [`hmac`].
fn hmac_ok(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    mac(key, parts).verify_slice(tag).is_ok()
}

fn parse_token(token: &str) -> Result<Vec<u8>> {
    let t = token.trim();
    if t.len() != 32 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Invalid(
            "malformed join token: expected 32 hexadecimal digits".into(),
        ));
    }
    Ok((0..16)
        .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).unwrap())
        .collect())
}

fn sql(e: rusqlite::Error) -> Error {
    Error::Internal(format!("system database: {e}"))
}

/// Whether the system database has table `name` yet (tables are created by the first write
/// that needs them).
fn table_exists(c: &rusqlite::Connection, name: &str) -> Result<bool> {
    c.query_row(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |_| Ok(()),
    )
    .optional()
    .map_err(sql)
    .map(|r| r.is_some())
}

/// The registry as stored (empty before the first leader seeded it).
fn read_registry(c: &rusqlite::Connection) -> Result<Vec<pb::Member>> {
    if !table_exists(c, "members")? {
        return Ok(Vec::new());
    }
    let mut st = c
        .prepare("SELECT id, addr, domain, weight FROM members ORDER BY id")
        .map_err(sql)?;
    let rows = st
        .query_map([], |r| {
            Ok(pb::Member {
                id: r.get::<_, i64>(0)? as u64,
                addr: r.get(1)?,
                domain: r.get(2)?,
                weight: r.get::<_, i64>(3)? as u32,
            })
        })
        .map_err(sql)?;
    rows.collect::<std::result::Result<Vec<_>, _>>()
        .map_err(sql)
}

/// The ids of removed members (none before the first removal created the table).
pub(crate) fn read_removed(c: &rusqlite::Connection) -> Result<std::collections::HashSet<u64>> {
    if !table_exists(c, "removed")? {
        return Ok(Default::default());
    }
    let mut st = c.prepare("SELECT id FROM removed").map_err(sql)?;
    let ids = st
        .query_map([], |r| r.get::<_, i64>(0))
        .map_err(sql)?
        .collect::<rusqlite::Result<Vec<i64>>>()
        .map_err(sql)?;
    Ok(ids.into_iter().map(|i| i as u64).collect())
}

/// The registry in a system database file on disk, read-only (empty if there is no file).
pub fn read_registry_file(path: &std::path::Path) -> Result<Vec<pb::Member>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(sql)?;
    read_registry(&c)
}

/// Rewrites the registry in a system database file on disk, with its node stopped (disaster
/// recovery and restore): keeps only the member `keep` (none if `None`) and drops every join
/// token. `retire` (recovery: every other id of the old configuration) and the dropped
/// members' ids go into `removed` when `keep` is set. Leaves the file whole (its WAL checkpointed and removed). Returns the members
/// removed. A missing file is left missing (the first leader seeds the registry). `event`
/// goes into the history; a restore (`keep` unset: a new cluster) first drops the old
/// cluster's history.
pub fn rewrite_registry_file(
    path: &std::path::Path,
    keep: Option<u64>,
    retire: &[u64],
    event: pb::ClusterEvent,
) -> Result<Vec<pb::Member>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let c = rusqlite::Connection::open(path).map_err(sql)?;
    let before = read_registry(&c)?;
    let removed: Vec<pb::Member> = before.into_iter().filter(|m| Some(m.id) != keep).collect();
    c.execute_batch(SCHEMA).map_err(sql)?;
    c.execute(
        "DELETE FROM members WHERE id IS NOT ?1",
        [keep.map(|k| k as i64)],
    )
    .map_err(sql)?;
    c.execute("DELETE FROM join_tokens", []).map_err(sql)?;
    if keep.is_none() {
        c.execute("DROP TABLE IF EXISTS events", []).map_err(sql)?;
    }
    history::record(&c, event)?;
    if keep.is_some() {
        // Recovery: the dropped members are removed for good, like any removal (their ids
        // retired, their certificates refused), or they could come back with their old
        // certificates. (A restore makes a new cluster, with a new CA.)
        let ids = removed.iter().map(|m| m.id).chain(retire.iter().copied());
        for id in ids.filter(|id| Some(*id) != keep) {
            c.execute("INSERT OR IGNORE INTO removed(id) VALUES (?1)", [id as i64])
                .map_err(sql)?;
        }
    }
    // The replicas' files never carry a WAL: fold it into the file before closing.
    let busy: i64 = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .map_err(sql)?;
    if busy != 0 {
        return Err(Error::Internal(format!(
            "{}: the checkpoint could not complete",
            path.display()
        )));
    }
    c.close().map_err(|(_, e)| sql(e))?;
    Ok(removed)
}

/// The registry as this node has applied it (`linearizable`: as of now, through the leader).
pub async fn registry(node: &Node, linearizable: bool) -> Result<Vec<pb::Member>> {
    Ok(node
        .read(
            SYSTEM_DB,
            if linearizable {
                Consistency::Linearizable
            } else {
                Consistency::Local
            },
            read_registry,
        )
        .await?
        .unwrap_or_default())
}

/// Registers the services and starts the sync and keeper tasks (called by `Node::start`).
pub(crate) fn start(node: &Node) {
    let weak = node.downgrade();
    node.register_client_service(
        MEMBERS_SERVICE,
        Arc::new(Entry {
            node: weak.clone(),
            join_only: false,
        }),
    );
    node.register_client_service(
        JOIN_SERVICE,
        Arc::new(Entry {
            node: weak.clone(),
            join_only: true,
        }),
    );
    node.register_service(LEADER_SERVICE, Arc::new(Leader(weak.clone())));
    node.register_service(NOTICE_SERVICE, Arc::new(Notice(weak.clone())));
    tokio::spawn(check_in(weak.clone()));
    tokio::spawn(sync_task(weak.clone(), node.subscribe_applied()));
    tokio::spawn(keeper_task(weak));
}

/// Asks every peer for its status at start, then every 2 s while this node knows no
/// leader: a node removed while it was down learns it from their refusal. (A voter would
/// when it campaigns, but a standby or spare never dials anyone by itself, and nobody
/// dials a removed node.)
async fn check_in(weak: WeakNode) {
    loop {
        let Some(node) = weak.upgrade() else { return };
        let (me, cfg, dialer) = (node.id(), node.config().clone(), node.dialer());
        let peers = node.peers();
        drop(node);
        for (id, addr) in peers {
            if id == me {
                continue;
            }
            let r = tokio::time::timeout(Duration::from_secs(2), async {
                let local = Some(cfg.listen.ip());
                let mut conn =
                    RpcConn::connect(&dialer, Peer::Node(id), addr, me, &cfg.cluster, local)
                        .await
                        .ok()?;
                let status = pb::request::Body::Status(pb::StatusRequest {
                    with_digests: false,
                });
                let _ = conn.call(status).await;
                conn.refusal().cloned()
            })
            .await;
            if let Ok(Some(refusal)) = r {
                let Some(node) = weak.upgrade() else { return };
                let revoked = refusal.revoked;
                node.refused(id, refusal);
                if revoked {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Some(node) = weak.upgrade() else { return };
        if node.raft_status().leader_id != 0 {
            return;
        }
    }
}

/// Follows the registry: the transport's addresses, and whether this node was removed.
async fn sync_task(weak: WeakNode, mut applied: tokio::sync::watch::Receiver<u64>) {
    let mut last: Option<Vec<pb::Member>> = None;
    let mut seen_self = false;
    loop {
        {
            let Some(node) = weak.upgrade() else { return };
            // One read of both tables per round.
            let both = node
                .read(SYSTEM_DB, Consistency::Local, |c| {
                    Ok((read_registry(c)?, read_removed(c)?))
                })
                .await;
            if let Ok(Some((members, removed))) = both {
                node.set_revoked(removed);
                if !members.is_empty() && last.as_ref() != Some(&members) {
                    let me = node.id();
                    let peers: BTreeMap<u64, SocketAddr> = members
                        .iter()
                        .filter_map(|m| Some((m.id, m.addr.parse().ok()?)))
                        .collect();
                    node.set_peers(peers);
                    let present = members.iter().any(|m| m.id == me);
                    if present {
                        seen_self = true;
                    } else if seen_self {
                        tracing::warn!("this node was removed from the cluster");
                        node.mark_departed(format!("node {me} was removed from the cluster"));
                    }
                    last = Some(members);
                }
            }
        }
        if applied.changed().await.is_err() {
            return;
        }
        // Coalesce bursts of applied entries.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// While this node leads: probe, plan, change one role, repeat.
async fn keeper_task(weak: WeakNode) {
    let mut conns: HashMap<u64, (SocketAddr, RpcConn)> = HashMap::new();
    // The term whose election this node recorded in the history.
    let mut recorded_term = 0;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(node) = weak.upgrade() else { return };
        if !node.is_leader() {
            node.shared_keeper().health.lock().clear();
            *node.shared_keeper().leading_since.lock() = None;
            conns.clear();
            continue;
        }
        node.shared_keeper()
            .leading_since
            .lock()
            .get_or_insert_with(Instant::now);
        let term = node.raft_status().term;
        if term != recorded_term {
            match record_election(&node, term).await {
                Ok(()) => recorded_term = term,
                Err(e) => tracing::debug!("history: election of term {term}: {e}"),
            }
        }
        if let Err(e) = keep(&node, &mut conns).await {
            tracing::debug!("role keeper: {e}");
        }
    }
}

/// Records this node's election in `term`, naming the leader recorded before it.
async fn record_election(node: &Node, term: u64) -> Result<()> {
    let id = node.id();
    node.write(SYSTEM_DB, move |c| {
        let before = history::summary(c)?.last_leader;
        if before.as_ref().is_some_and(|b| b.term >= term) {
            return Ok(()); // recorded already (or a newer term's leader did)
        }
        history::record(c, history::election_event(id, term, before.as_ref()))
    })
    .await
}

async fn keep(node: &Node, conns: &mut HashMap<u64, (SocketAddr, RpcConn)>) -> Result<()> {
    let members = seed_registry(node).await?;
    probe(node, &members, conns).await;
    if in_grace(node) {
        // Every member counts as online until the probes can tell: planning now would act
        // on dead members as if they were alive (promote a dead spare, keep a dead voter).
        return Ok(());
    }
    let views = views(node, &members);
    let targets = node.config().targets;
    if let Some(c) = plan(&views, node.id(), targets) {
        if node.shared_keeper().removing.lock().contains(&c.id) {
            return Ok(());
        }
        tracing::info!(
            "roles: node {} {} -> {}",
            c.id,
            c.from.as_str(),
            c.to.as_str()
        );
        node.change_role(c).await?;
        let e = history::role_event(&c, &views, node.raft_status().term);
        if let Err(e) = history::record_write(node, e).await {
            tracing::warn!("history: node {} became a {}: {e}", c.id, c.to.as_str());
        }
    }
    Ok(())
}

/// The registry, after adding any member of the Raft configuration it lacks (the bootstrap
/// peers, on a new cluster's first leader).
async fn seed_registry(node: &Node) -> Result<Vec<pb::Member>> {
    let members = registry(node, false).await?;
    let (voters, learners) = node.conf_roles();
    let peers = node.peers();
    let missing: Vec<pb::Member> = voters
        .iter()
        .chain(learners.iter())
        .filter(|id| !members.iter().any(|m| m.id == **id))
        .filter_map(|id| {
            Some(pb::Member {
                id: *id,
                addr: peers.get(id)?.to_string(),
                domain: if *id == node.id() {
                    node.config().domain.clone()
                } else {
                    String::new()
                },
                weight: if *id == node.id() {
                    node.config().weight
                } else {
                    0
                },
            })
        })
        .collect();
    if missing.is_empty() {
        return Ok(members);
    }
    node.write(SYSTEM_DB, move |c| {
        c.execute_batch(SCHEMA).map_err(sql)?;
        for m in &missing {
            c.execute(
                "INSERT OR IGNORE INTO members(id, addr, domain, weight) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![m.id as i64, m.addr, m.domain, m.weight as i64],
            )
            .map_err(sql)?;
        }
        read_registry(c)
    })
    .await
}

/// Asks every other member for its status (at most 400 ms each, all at once).
async fn probe(
    node: &Node,
    members: &[pb::Member],
    conns: &mut HashMap<u64, (SocketAddr, RpcConn)>,
) {
    let me = node.id();
    let cluster = node.config().cluster.clone();
    let local_ip = node.config().listen.ip();
    let dialer = node.dialer();
    let mut tasks = Vec::new();
    for m in members.iter().filter(|m| m.id != me) {
        let Ok(addr) = m.addr.parse::<SocketAddr>() else {
            continue;
        };
        let pooled = conns.remove(&m.id).filter(|(a, _)| *a == addr);
        let (id, cluster, dialer) = (m.id, cluster.clone(), dialer.clone());
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_millis(400), async move {
                // A pooled connection the peer has not closed, else a new one.
                let mut conn = match pooled.map(|(_, mut c)| (c.is_closed(), c)) {
                    Some((false, c)) => c,
                    _ => {
                        RpcConn::connect(
                            &dialer,
                            Peer::Node(id),
                            addr,
                            me,
                            &cluster,
                            Some(local_ip),
                        )
                        .await?
                    }
                };
                let body = pb::request::Body::Status(pb::StatusRequest {
                    with_digests: false,
                });
                match conn.call(body).await? {
                    pb::response::Body::Status(s) => Ok((s.applied_index, conn)),
                    _ => Err(std::io::Error::other("unexpected answer")),
                }
            })
            .await;
            (id, addr, r)
        }));
    }
    let now = Instant::now();
    let keeper = node.shared_keeper();
    for t in tasks {
        if let Ok((id, addr, Ok(Ok((applied, conn))))) = t.await {
            keeper.health.lock().insert(
                id,
                Health {
                    last_ok: now,
                    applied,
                },
            );
            conns.insert(id, (addr, conn));
        }
    }
}

/// Whether `id` answered a probe recently (this node always counts as online).
fn online(node: &Node, id: u64) -> bool {
    in_grace(node) || answered(node, id)
}

/// This node leads for less than `offline_after`: its probes have not had the time to tell
/// a dead member from a live one.
fn in_grace(node: &Node) -> bool {
    node.shared_keeper()
        .leading_since
        .lock()
        .is_none_or(|t| t.elapsed() < node.config().offline_after)
}

/// `id` is this node, or answered one of its probes within `offline_after`.
fn answered(node: &Node, id: u64) -> bool {
    id == node.id()
        || node
            .shared_keeper()
            .health
            .lock()
            .get(&id)
            .is_some_and(|h| h.last_ok.elapsed() < node.config().offline_after)
}

/// A member's applied index: this node's own, or what its last probe answered.
fn applied_of(node: &Node, id: u64, health: &HashMap<u64, Health>) -> u64 {
    if id == node.id() {
        node.status().applied
    } else {
        health.get(&id).map_or(0, |h| h.applied)
    }
}

fn views(node: &Node, members: &[pb::Member]) -> Vec<MemberView> {
    let (voters, learners) = node.conf_roles();
    let commit = node.raft_status().commit;
    let health = node.shared_keeper().health.lock().clone();
    members
        .iter()
        .map(|m| {
            let applied = applied_of(node, m.id, &health);
            MemberView {
                id: m.id,
                role: Role::of(m.id, &voters, &learners),
                online: online(node, m.id),
                caught_up: applied + CAUGHT_UP_ENTRIES >= commit,
                domain: m.domain.clone(),
                weight: m.weight,
            }
        })
        .collect()
}

/// Runs on every node: membership requests go to the leader, except a node's own `leave`.
struct Entry {
    node: WeakNode,
    join_only: bool,
}

impl ServiceHandler for Entry {
    fn call(
        &self,
        payload: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes>> + Send>> {
        let node = self.node.upgrade();
        let join_only = self.join_only;
        Box::pin(async move {
            let node = node.ok_or(Error::Shutdown)?;
            let req = pb::MembershipRequest::decode(payload.clone())
                .map_err(|e| Error::Invalid(format!("membership request: {e}")))?;
            match req.req {
                Some(pb::membership_request::Req::Join(_)) => {}
                _ if join_only => {
                    return Err(Error::Invalid("only a join may be sent here".into()))
                }
                Some(pb::membership_request::Req::Removed(_)) => {
                    return Err(Error::Invalid(format!(
                        "a removal notice goes to {NOTICE_SERVICE}, which only members may call"
                    )))
                }
                Some(pb::membership_request::Req::Remove(r)) if r.leaving => {
                    let report = leave(&node, r.force).await?;
                    return Ok(encode(pb::membership_response::Resp::Remove(
                        pb::RemoveResponse { report },
                    )));
                }
                _ => {}
            }
            node.call_leader(LEADER_SERVICE, payload).await
        })
    }
}

/// Runs on every node, for members only: the leader's notice that it removed this node.
struct Notice(WeakNode);

impl ServiceHandler for Notice {
    fn call(
        &self,
        payload: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes>> + Send>> {
        let node = self.0.upgrade();
        Box::pin(async move {
            let node = node.ok_or(Error::Shutdown)?;
            let Ok(pb::MembershipRequest {
                req: Some(pb::membership_request::Req::Removed(n)),
            }) = pb::MembershipRequest::decode(payload)
            else {
                return Err(Error::Invalid("expected a removal notice".into()));
            };
            if n.id != node.id() {
                return Err(Error::Invalid(format!(
                    "removal notice for node {}, but this is node {}",
                    n.id,
                    node.id()
                )));
            }
            // Without TLS any process can claim to be a member: believe the notice only
            // once the cluster itself confirms that this node is no longer a member.
            if !removal_confirmed(&node).await {
                tracing::warn!(
                    "ignored a removal notice that no member confirms (this node is still a \
                     member, or no member answered)"
                );
                return Err(Error::Invalid(
                    "removal not confirmed by the cluster".into(),
                ));
            }
            tracing::warn!("the leader removed this node from the cluster");
            node.mark_departed(format!("node {} was removed from the cluster", n.id));
            Ok(encode(pb::membership_response::Resp::Remove(
                pb::RemoveResponse {
                    report: format!("node {} stops", n.id),
                },
            )))
        })
    }
}

fn encode(r: pb::membership_response::Resp) -> Bytes {
    pb::MembershipResponse { resp: Some(r) }
        .encode_to_vec()
        .into()
}

/// Runs on the leader.
struct Leader(WeakNode);

impl ServiceHandler for Leader {
    fn call(
        &self,
        payload: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes>> + Send>> {
        let node = self.0.upgrade();
        Box::pin(async move {
            use pb::membership_request::Req;
            use pb::membership_response::Resp;
            let node = node.ok_or(Error::Shutdown)?;
            if !node.is_leader() {
                return Err(Error::NotLeader {
                    leader_id: None,
                    leader_addr: None,
                });
            }
            let req = pb::MembershipRequest::decode(payload)
                .map_err(|e| Error::Invalid(format!("membership request: {e}")))?;
            let resp = match req.req {
                Some(Req::CreateToken(r)) => Resp::CreateToken(create_token(&node, r).await?),
                Some(Req::Join(r)) => Resp::Join(admit(&node, r).await?),
                Some(Req::Cluster(_)) => Resp::Cluster(cluster(&node).await?),
                Some(Req::Remove(r)) => Resp::Remove(pb::RemoveResponse {
                    report: remove(&node, r.id, r.force, r.leaving).await?,
                }),
                Some(Req::Removed(_)) => {
                    return Err(Error::Invalid(
                        "a removal notice goes to the removed node".into(),
                    ))
                }
                None => return Err(Error::Invalid("empty membership request".into())),
            };
            Ok(encode(resp))
        })
    }
}

/// Leader: a new join token.
async fn create_token(node: &Node, r: pb::CreateTokenRequest) -> Result<pb::CreateTokenResponse> {
    let ttl = if r.ttl_ms == 0 {
        DEFAULT_TOKEN_TTL
    } else {
        Duration::from_millis(r.ttl_ms)
    };
    let secret: [u8; 16] = rand::random();
    let (id, key) = derive(&secret);
    let now = now_ms();
    let expires = now + ttl.as_millis() as i64;
    let reusable = r.reusable;
    seed_registry(node).await?;
    let members = node
        .write(SYSTEM_DB, move |c| {
            c.execute_batch(SCHEMA).map_err(sql)?;
            c.execute("DELETE FROM join_tokens WHERE expires_ms < ?1", [now])
                .map_err(sql)?;
            c.execute(
                "INSERT INTO join_tokens(id, key, expires_ms, reusable) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![id, key, expires, reusable],
            )
            .map_err(sql)?;
            read_registry(c)
        })
        .await?;
    tracing::info!(
        "issued a join token valid for {} s{}",
        ttl.as_secs(),
        if reusable { " (reusable)" } else { "" }
    );
    Ok(pb::CreateTokenResponse {
        token: secret.iter().map(|b| format!("{b:02x}")).collect(),
        expires_unix_ms: expires as u64,
        addrs: members.into_iter().map(|m| m.addr).collect(),
        ca_fingerprint: node
            .tls_material()
            .map(|m| m.ca.fingerprint_hex())
            .unwrap_or_default(),
    })
}

/// Leader: checks a join and registers the joiner as a spare.
async fn admit(node: &Node, r: pb::JoinRequest) -> Result<pb::JoinResponse> {
    let addr: SocketAddr = r
        .addr
        .parse()
        .map_err(|_| Error::Invalid(format!("bad joiner address {:?}", r.addr)))?;
    seed_registry(node).await?;
    let (voters, learners) = node.conf_roles();
    let max_conf = voters
        .iter()
        .chain(learners.iter())
        .copied()
        .max()
        .unwrap_or(0);
    let now = now_ms();
    let term = node.raft_status().term;
    let (token_id, nonce, proof) = (r.token_id.to_vec(), r.nonce.to_vec(), r.proof.to_vec());
    let (domain, weight, csr) = (r.domain.clone(), r.weight, r.csr.to_vec());
    let ca = node.tls_material().map(|m| m.ca.clone());
    match (&ca, csr.is_empty()) {
        (Some(_), true) => {
            return Err(Error::Invalid(
                "this cluster runs TLS: join with the HOST:PORT/TOKEN/FINGERPRINT string that \
                 `raftsql add-node` prints"
                    .into(),
            ))
        }
        (None, false) => {
            return Err(Error::Invalid(
                "this cluster runs without TLS: join with HOST:PORT/TOKEN".into(),
            ))
        }
        _ => {}
    }
    let (id, members, key, cert) = node
        .write(SYSTEM_DB, move |c| {
            c.execute_batch(SCHEMA).map_err(sql)?;
            let row: Option<(Vec<u8>, i64, bool, bool)> = c
                .query_row(
                    "SELECT key, expires_ms, reusable, used FROM join_tokens WHERE id = ?1",
                    [&token_id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()
                .map_err(sql)?;
            let Some((key, expires, reusable, used)) = row else {
                return Err(Error::Invalid(
                    "join token refused: this cluster did not issue it, or it expired".into(),
                ));
            };
            if !hmac_ok(&key, &[b"join", &nonce, addr.to_string().as_bytes(), &csr], &proof) {
                return Err(Error::Invalid("join token refused: wrong token".into()));
            }
            if expires < now {
                return Err(Error::Invalid("join token refused: it expired".into()));
            }
            if used && !reusable {
                return Err(Error::Invalid(
                    "join token refused: it was already used (tokens are single-use unless created with a TTL)"
                        .into(),
                ));
            }
            let taken: Option<i64> = c
                .query_row(
                    "SELECT id FROM members WHERE addr = ?1",
                    [addr.to_string()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql)?;
            if let Some(other) = taken {
                return Err(Error::Invalid(format!(
                    "address {addr} already belongs to node {other}: remove that node first"
                )));
            }
            // Ids are never reused: a removed node's id stays retired (its old messages,
            // its removal in the registry, its certificate must never match a new member).
            let (max_reg, max_removed): (i64, i64) = c
                .query_row(
                    "SELECT (SELECT coalesce(max(id), 0) FROM members), \
                            (SELECT coalesce(max(id), 0) FROM removed)",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(sql)?;
            let id = (max_reg.max(max_removed) as u64).max(max_conf) + 1;
            // Signed inside the transaction: if the request is refused, nothing is spent.
            let cert = match &ca {
                Some(ca) => ca.issue_node(id, addr.ip(), &csr)?,
                None => String::new(),
            };
            c.execute(
                "INSERT INTO members(id, addr, domain, weight) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![id as i64, addr.to_string(), domain, weight as i64],
            )
            .map_err(sql)?;
            history::record(
                c,
                pb::ClusterEvent {
                    node: id,
                    kind: "role".into(),
                    term,
                    from_role: "new".into(),
                    to_role: Role::Spare.as_str().into(),
                    reason: format!("joined with a token from {addr}"),
                    ..Default::default()
                },
            )?;
            if !reusable {
                c.execute("UPDATE join_tokens SET used = 1 WHERE id = ?1", [&token_id])
                    .map_err(sql)?;
            }
            Ok((id, read_registry(c)?, key, cert))
        })
        .await?;
    let cluster = node.config().cluster.clone();
    let (ca_cert, ca_key) = match node.tls_material() {
        Some(m) => (m.ca.cert_pem().to_string(), m.ca.key_pem().to_string()),
        None => Default::default(),
    };
    tracing::info!(
        "node {id} at {addr} joined as a spare{}",
        if cert.is_empty() {
            ""
        } else {
            " (certificate issued)"
        }
    );
    Ok(pb::JoinResponse {
        id,
        proof: hmac(
            &key,
            &[
                b"cluster",
                &r.nonce,
                &id.to_le_bytes(),
                cluster.as_bytes(),
                cert.as_bytes(),
                ca_cert.as_bytes(),
                ca_key.as_bytes(),
            ],
        )
        .into(),
        cluster,
        members,
        cert: cert.into_bytes().into(),
        ca_cert: ca_cert.into_bytes().into(),
        ca_key: ca_key.into_bytes().into(),
    })
}

/// Leader: every member's role and health.
async fn cluster(node: &Node) -> Result<pb::ClusterResponse> {
    let members = seed_registry(node).await?;
    let (voters, learners) = node.conf_roles();
    let commit = node.raft_status().commit;
    let health = node.shared_keeper().health.lock().clone();
    let mut history = node
        .read(SYSTEM_DB, Consistency::Local, history::summary)
        .await?
        .unwrap_or_default();
    let nodes: Vec<pb::MemberStatus> = members
        .into_iter()
        .map(|m| {
            let me = m.id == node.id();
            let applied = applied_of(node, m.id, &health);
            pb::MemberStatus {
                role: Role::of(m.id, &voters, &learners).as_str().into(),
                leader: me,
                // What the probes say, also in a new leader's first seconds (a dead
                // member is not shown as reachable because nobody has asked it yet).
                reachable: answered(node, m.id),
                applied,
                lag: commit.saturating_sub(applied),
                last_role_change: history.last_role.remove(&m.id),
                member: Some(m),
            }
        })
        .collect();
    let ha = voters.len() >= 3
        && voters.iter().all(|v| {
            nodes
                .iter()
                .any(|n| n.member.as_ref().is_some_and(|m| m.id == *v) && n.reachable)
        });
    let t = node.config().targets;
    Ok(pb::ClusterResponse {
        leader_id: node.id(),
        nodes,
        ha,
        target_voters: t.voters as u32,
        target_standbys: t.standbys as u32,
        commit_index: commit,
        last_leader_change: history.last_leader,
        recent_events: history.recent,
    })
}

/// Leader: removes member `id` from the configuration and the registry.
async fn remove(node: &Node, id: u64, force: bool, leaving: bool) -> Result<String> {
    let members = seed_registry(node).await?;
    let Some(m) = members.iter().find(|m| m.id == id).cloned() else {
        return Err(Error::Invalid(format!("node {id} is not a member")));
    };
    if id == node.id() {
        return Err(Error::Invalid(format!(
            "node {id} leads the cluster: run `raftsql leave` on it (it hands leadership over first)"
        )));
    }
    let reachable = online(node, id);
    if reachable && !force && !leaving {
        return Err(Error::Invalid(format!(
            "node {id} ({}) is running: run `raftsql leave` on it, or stop it first; --force removes it anyway",
            m.addr
        )));
    }
    let keeper = node.shared_keeper();
    keeper.removing.lock().insert(id);
    let _removing = Removing(keeper, id);
    let (voters, learners) = node.conf_roles();
    let role = Role::of(id, &voters, &learners);
    if role == Role::Voter {
        let rest: Vec<u64> = voters.iter().copied().filter(|v| *v != id).collect();
        let up = rest.iter().filter(|v| online(node, **v)).count();
        if up * 2 <= rest.len() {
            return Err(Error::Unavailable(format!(
                "removing node {id} would leave {up} of {} voters online, short of a quorum \
                 (if the others are gone for good, see `raftsql recover`)",
                rest.len()
            )));
        }
    }
    if role != Role::Spare {
        node.change_role(Change {
            id,
            from: role,
            to: Role::Spare,
            reason: Reason::Removed,
        })
        .await?;
    }
    let event = history::removal_event(id, role, node.raft_status().term, leaving, force);
    node.write(SYSTEM_DB, move |c| {
        c.execute("DELETE FROM members WHERE id = ?1", [id as i64])
            .map_err(sql)?;
        history::record(c, event)?;
        c.execute("INSERT OR IGNORE INTO removed(id) VALUES (?1)", [id as i64])
            .map_err(sql)?;
        Ok(())
    })
    .await?;
    // Out of the configuration, the node receives no more entries, so it would never see
    // its removal in the registry: tell it (best effort; a leaving node stops by itself).
    if !leaving {
        if let Ok(addr) = m.addr.parse::<SocketAddr>() {
            notify_removed(node, id, addr).await;
        }
    }
    let (voters, learners) = node.conf_roles();
    let report = format!(
        "removed node {id} ({}), which was a {}; voters now {:?}, standbys {:?}",
        m.addr,
        role.as_str(),
        voters,
        learners
    );
    tracing::info!("{report}");
    Ok(report)
}

/// Asks the other members (each forwards to the leader) for the member list: true once
/// one answers with a list that lacks this node.
async fn removal_confirmed(node: &Node) -> bool {
    let (me, cfg) = (node.id(), node.config());
    let payload: Bytes = pb::MembershipRequest {
        req: Some(pb::membership_request::Req::Cluster(pb::ClusterRequest {})),
    }
    .encode_to_vec()
    .into();
    for (id, addr) in node.peers() {
        if id == me {
            continue;
        }
        let answer = tokio::time::timeout(Duration::from_secs(2), async {
            let mut conn = RpcConn::connect(
                &node.dialer(),
                Peer::Node(id),
                addr,
                me,
                &cfg.cluster,
                Some(cfg.listen.ip()),
            )
            .await?;
            conn.call(pb::request::Body::Service(pb::ServiceCall {
                service: MEMBERS_SERVICE.to_string(),
                payload: payload.clone(),
            }))
            .await
        })
        .await;
        let Ok(Ok(pb::response::Body::Service(r))) = answer else {
            continue;
        };
        if let Ok(pb::MembershipResponse {
            resp: Some(pb::membership_response::Resp::Cluster(c)),
        }) = pb::MembershipResponse::decode(r.payload)
        {
            return !c
                .nodes
                .iter()
                .any(|n| n.member.as_ref().is_some_and(|m| m.id == me));
        }
    }
    false
}

/// Tells node `id` at `addr` that it was removed, so that a node still running stops.
async fn notify_removed(node: &Node, id: u64, addr: SocketAddr) {
    let cfg = node.config();
    let payload = pb::MembershipRequest {
        req: Some(pb::membership_request::Req::Removed(pb::RemovedNotice {
            id,
        })),
    }
    .encode_to_vec();
    let r = tokio::time::timeout(Duration::from_secs(1), async {
        let mut conn = RpcConn::connect(
            &node.dialer(),
            Peer::Node(id),
            addr,
            node.id(),
            &cfg.cluster,
            Some(cfg.listen.ip()),
        )
        .await?;
        conn.call(pb::request::Body::Service(pb::ServiceCall {
            service: NOTICE_SERVICE.to_string(),
            payload: payload.into(),
        }))
        .await
    })
    .await;
    match r {
        Ok(Ok(_)) => tracing::info!("told node {id} at {addr} that it was removed"),
        _ => tracing::info!("node {id} at {addr} did not answer the removal notice (stopped?)"),
    }
}

/// On the leaving node: hand leadership over, have the leader remove this node, then stop.
async fn leave(node: &Node, force: bool) -> Result<String> {
    let (voters, learners) = node.conf_roles();
    if node.is_leader() {
        if voters.len() == 1 {
            if !force {
                return Err(Error::Invalid(format!(
                    "node {} is the only voter: leaving would leave no copy of the data{}; \
                     --force leaves anyway",
                    node.id(),
                    if learners.is_empty() && voters.len() == 1 {
                        " (there are no other nodes)"
                    } else {
                        ""
                    }
                )));
            }
            node.mark_departed(format!("node {} left the cluster (forced)", node.id()));
            return Ok(format!(
                "node {} left (forced); the cluster is gone",
                node.id()
            ));
        }
        let to = node.transfer_leadership().await?;
        tracing::info!("handed leadership to node {to} before leaving");
    }
    let payload = pb::MembershipRequest {
        req: Some(pb::membership_request::Req::Remove(pb::RemoveRequest {
            id: node.id(),
            force,
            leaving: true,
        })),
    }
    .encode_to_vec();
    let mut last = Error::Unavailable("no leader".into());
    // The new leader may need a moment to be known here.
    for _ in 0..20 {
        match node
            .call_leader(LEADER_SERVICE, payload.clone().into())
            .await
        {
            Ok(b) => {
                let report = match pb::MembershipResponse::decode(b) {
                    Ok(pb::MembershipResponse {
                        resp: Some(pb::membership_response::Resp::Remove(r)),
                    }) => r.report,
                    _ => String::new(),
                };
                node.mark_departed(format!("node {} left the cluster", node.id()));
                return Ok(report);
            }
            Err(e @ (Error::NotLeader { .. } | Error::Unavailable(_))) => {
                last = e;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Joins the cluster that issued `token`, through its member at `target`: `addr` is the
/// address this node will listen on. Verifies that the answer comes from that cluster.
/// `fingerprint` (a TLS cluster's CA, from the join string) is checked during the TLS
/// handshake, before anything is sent.
pub async fn join(
    target: SocketAddr,
    token: &str,
    fingerprint: Option<[u8; 32]>,
    addr: SocketAddr,
    domain: &str,
    weight: u32,
) -> Result<JoinTicket> {
    let secret = parse_token(token)?;
    let (token_id, key) = derive(&secret);
    let nonce: [u8; 16] = rand::random();
    let (dialer, node_key, csr) = match fingerprint {
        Some(fp) => {
            let (k, csr) = crate::net::tls::node_request()?;
            (Dialer::pinned(fp), Some(k), csr)
        }
        None => (Dialer::Plain, None, Vec::new()),
    };
    let req = pb::MembershipRequest {
        req: Some(pb::membership_request::Req::Join(pb::JoinRequest {
            token_id: token_id.into(),
            nonce: nonce.to_vec().into(),
            proof: hmac(&key, &[b"join", &nonce, addr.to_string().as_bytes(), &csr]).into(),
            addr: addr.to_string(),
            domain: domain.to_string(),
            weight,
            csr: csr.into(),
        })),
    };
    let mut conn = RpcConn::connect(&dialer, Peer::Endpoint, target, 0, "", Some(addr.ip()))
        .await
        .map_err(|e| Error::Unavailable(format!("cannot reach {target}: {e}")))?;
    let body = pb::request::Body::Service(pb::ServiceCall {
        service: JOIN_SERVICE.into(),
        payload: req.encode_to_vec().into(),
    });
    let reply = match conn.call(body).await {
        Ok(pb::response::Body::Service(r)) => r.payload,
        Ok(pb::response::Body::Error(e)) => return Err(crate::client::from_pb(e)),
        Ok(_) => return Err(Error::Transport("unexpected answer to a join".into())),
        Err(e) => return Err(Error::Unavailable(format!("{target}: {e}"))),
    };
    let j = match pb::MembershipResponse::decode(reply) {
        Ok(pb::MembershipResponse {
            resp: Some(pb::membership_response::Resp::Join(j)),
        }) => j,
        _ => return Err(Error::Transport("malformed answer to a join".into())),
    };
    if !hmac_ok(
        &key,
        &[
            b"cluster",
            &nonce,
            &j.id.to_le_bytes(),
            j.cluster.as_bytes(),
            &j.cert,
            &j.ca_cert,
            &j.ca_key,
        ],
        &j.proof,
    ) {
        return Err(Error::Invalid(format!(
            "the node at {target} could not prove it belongs to the cluster that issued this \
             token: refusing to join"
        )));
    }
    let mut peers = BTreeMap::new();
    for m in &j.members {
        let a = m
            .addr
            .parse()
            .map_err(|_| Error::Transport(format!("bad member address {:?}", m.addr)))?;
        peers.insert(m.id, a);
    }
    let tls = match (fingerprint, node_key) {
        (Some(fp), Some(node_key)) => {
            let text = |b: &Bytes, what: &str| {
                String::from_utf8(b.to_vec())
                    .map_err(|_| Error::Transport(format!("the join answer's {what} is not PEM")))
            };
            if j.cert.is_empty() {
                return Err(Error::Invalid(
                    "the cluster answered without a certificate (it runs without TLS?)".into(),
                ));
            }
            let ca = crate::net::tls::ClusterCa::from_pem(
                text(&j.ca_cert, "CA")?,
                text(&j.ca_key, "CA key")?,
            )?;
            if ca.fingerprint() != fp {
                return Err(Error::Invalid(
                    "the cluster's CA does not match the join string's fingerprint".into(),
                ));
            }
            let m = crate::net::tls::Material {
                ca,
                node_cert_pem: text(&j.cert, "certificate")?,
                node_key_pem: node_key,
            };
            m.check_for(j.id)?;
            Some(m)
        }
        _ => None,
    };
    Ok(JoinTicket {
        id: j.id,
        cluster: j.cluster,
        peers,
        tls,
    })
}

/// Sends a membership request to the first of `endpoints` that answers (any member: it is
/// forwarded to the leader). For the CLI and other processes.
pub async fn request(
    dialer: &Dialer,
    endpoints: &[SocketAddr],
    cluster: &str,
    req: pb::membership_request::Req,
) -> Result<pb::membership_response::Resp> {
    let payload: Bytes = pb::MembershipRequest { req: Some(req) }
        .encode_to_vec()
        .into();
    // During an election (or right after a join) no member may know a leader for a moment:
    // retry what is safe to retry for a few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match request_once(dialer, endpoints, cluster, &payload).await {
            Err(e @ (Error::Unavailable(_) | Error::NotLeader { .. }))
                if Instant::now() < deadline =>
            {
                tracing::debug!("membership request: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            r => return r,
        }
    }
}

async fn request_once(
    dialer: &Dialer,
    endpoints: &[SocketAddr],
    cluster: &str,
    payload: &Bytes,
) -> Result<pb::membership_response::Resp> {
    let mut last = Error::Unavailable("no endpoint given".into());
    for ep in endpoints {
        let mut conn = match RpcConn::connect(dialer, Peer::Endpoint, *ep, 0, cluster, None).await {
            Ok(c) => c,
            Err(e) => {
                last = Error::Unavailable(format!("cannot reach {ep}: {e}"));
                continue;
            }
        };
        let body = pb::request::Body::Service(pb::ServiceCall {
            service: MEMBERS_SERVICE.into(),
            payload: payload.clone(),
        });
        match tokio::time::timeout(Duration::from_secs(15), conn.call(body)).await {
            Ok(Ok(pb::response::Body::Service(r))) => {
                return match pb::MembershipResponse::decode(r.payload) {
                    Ok(pb::MembershipResponse { resp: Some(resp) }) => Ok(resp),
                    _ => Err(Error::Transport("malformed membership answer".into())),
                }
            }
            Ok(Ok(pb::response::Body::Error(e))) => {
                let e = crate::client::from_pb(e);
                match e {
                    Error::Unavailable(_) | Error::NotLeader { .. } => last = e,
                    e => return Err(e),
                }
            }
            Ok(Ok(_)) => last = Error::Transport("unexpected answer".into()),
            Ok(Err(e)) => {
                last = Error::Unavailable(crate::net::dial::with_hint(format!("{ep}: {e}")))
            }
            Err(_) => last = Error::Timeout(Duration::from_secs(15)),
        }
    }
    Err(last)
}
