//! The leader's role keeper (probe every member, plan one role change, apply it, repeat)
//! and the tasks every node runs to follow the registry.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use raftsql_proto::v1 as pb;

use super::history;
use super::registry::{read_registry, read_removed, seed_registry};
use super::SYSTEM_DB;
use crate::consistency::Consistency;
use crate::error::Result;
use crate::net::conn::RpcConn;
use crate::net::Peer;
use crate::node::{Node, WeakNode};
use crate::roles::{plan, MemberView, Role};

/// How long a peer asked at check-in may take to answer.
const CHECK_IN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a node that knows no leader checks in with its peers.
const CHECK_IN_EVERY: Duration = Duration::from_secs(2);
/// Bursts of applied entries within this are one registry read.
const SYNC_COALESCE: Duration = Duration::from_millis(50);
/// How long a member's answer to the keeper's probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);

/// How often the leader probes the members.
pub const PROBE_EVERY: Duration = Duration::from_millis(300);

/// A standby this close to the leader's commit index may become a voter.
const CAUGHT_UP_ENTRIES: u64 = 256;

/// What the leader last learned of a member by probing it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Health {
    last_ok: Instant,
    applied: u64,
}

/// Per-node membership state.
#[derive(Default)]
pub(crate) struct Keeper {
    pub(super) health: Mutex<HashMap<u64, Health>>,
    /// When this node's keeper started acting as leader (None while it follows). Members
    /// get the benefit of the doubt for `offline_after` from then: a new leader has not had
    /// time to hear from everyone.
    leading_since: Mutex<Option<Instant>>,
    /// Members a `remove` on this leader is taking out: the keeper leaves them alone (it
    /// would otherwise promote the spare a removal makes of a node before its registry row
    /// is deleted).
    pub(super) removing: Mutex<std::collections::HashSet<u64>>,
}

/// Marks a member as being removed while it lives.
pub(super) struct Removing<'a>(&'a Keeper, u64);

impl Keeper {
    /// Marks member `id` as being removed until the returned guard drops.
    pub(super) fn mark_removing(&self, id: u64) -> Removing<'_> {
        self.removing.lock().insert(id);
        Removing(self, id)
    }
}

impl Drop for Removing<'_> {
    fn drop(&mut self) {
        self.0.removing.lock().remove(&self.1);
    }
}

/// Asks every peer for its status at start, then every 2 s while this node knows no
/// leader: a node removed while it was down learns it from their refusal. (A voter would
/// when it campaigns, but a standby or spare never dials anyone by itself, and nobody
/// dials a removed node.)
pub(super) async fn check_in(weak: WeakNode) {
    loop {
        let Some(node) = weak.upgrade() else { return };
        let (me, cfg, dialer) = (node.id(), node.config().clone(), node.dialer());
        let peers = node.peers();
        drop(node);
        for (id, addr) in peers {
            if id == me {
                continue;
            }
            let r = tokio::time::timeout(CHECK_IN_TIMEOUT, async {
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
        tokio::time::sleep(CHECK_IN_EVERY).await;
        let Some(node) = weak.upgrade() else { return };
        if node.raft_status().leader_id != 0 {
            return;
        }
    }
}

/// Follows the registry: the transport's addresses, and whether this node was removed.
pub(super) async fn sync_task(weak: WeakNode, mut applied: tokio::sync::watch::Receiver<u64>) {
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
        tokio::time::sleep(SYNC_COALESCE).await;
    }
}

/// While this node leads: probe, plan, change one role, repeat.
pub(super) async fn keeper_task(weak: WeakNode, keeper: Arc<Keeper>) {
    let mut conns: HashMap<u64, (SocketAddr, RpcConn)> = HashMap::new();
    // The term whose election this node recorded in the history.
    let mut recorded_term = 0;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(node) = weak.upgrade() else { return };
        if !node.is_leader() {
            keeper.health.lock().clear();
            *keeper.leading_since.lock() = None;
            conns.clear();
            continue;
        }
        keeper.leading_since.lock().get_or_insert_with(Instant::now);
        let term = node.raft_status().term;
        if term != recorded_term {
            match record_election(&node, term).await {
                Ok(()) => recorded_term = term,
                Err(e) => tracing::debug!("history: election of term {term}: {e}"),
            }
        }
        if let Err(e) = keep(&node, &keeper, &mut conns).await {
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

pub(super) async fn keep(
    node: &Node,
    keeper: &Keeper,
    conns: &mut HashMap<u64, (SocketAddr, RpcConn)>,
) -> Result<()> {
    let members = seed_registry(node).await?;
    probe(node, keeper, &members, conns).await;
    if in_grace(node, keeper) {
        // Every member counts as online until the probes can tell: planning now would act
        // on dead members as if they were alive (promote a dead spare, keep a dead voter).
        return Ok(());
    }
    let views = views(node, keeper, &members);
    let targets = node.config().targets;
    if let Some(c) = plan(&views, node.id(), targets) {
        if keeper.removing.lock().contains(&c.id) {
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

/// Asks every other member for its status (at most 400 ms each, all at once).
async fn probe(
    node: &Node,
    keeper: &Keeper,
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
            let r = tokio::time::timeout(PROBE_TIMEOUT, async move {
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
pub(super) fn online(node: &Node, keeper: &Keeper, id: u64) -> bool {
    in_grace(node, keeper) || answered(node, keeper, id)
}

/// This node leads for less than `offline_after`: its probes have not had the time to tell
/// a dead member from a live one.
fn in_grace(node: &Node, keeper: &Keeper) -> bool {
    keeper
        .leading_since
        .lock()
        .is_none_or(|t| t.elapsed() < node.config().offline_after)
}

/// `id` is this node, or answered one of its probes within `offline_after`.
pub(super) fn answered(node: &Node, keeper: &Keeper, id: u64) -> bool {
    id == node.id()
        || keeper
            .health
            .lock()
            .get(&id)
            .is_some_and(|h| h.last_ok.elapsed() < node.config().offline_after)
}

/// A member's applied index: this node's own, or what its last probe answered.
pub(super) fn applied_of(node: &Node, id: u64, health: &HashMap<u64, Health>) -> u64 {
    if id == node.id() {
        node.status().applied
    } else {
        health.get(&id).map_or(0, |h| h.applied)
    }
}

pub(super) fn views(node: &Node, keeper: &Keeper, members: &[pb::Member]) -> Vec<MemberView> {
    let (voters, learners) = node.conf_roles();
    let commit = node.raft_status().commit;
    let health = keeper.health.lock().clone();
    members
        .iter()
        .map(|m| {
            let applied = applied_of(node, m.id, &health);
            MemberView {
                id: m.id,
                role: Role::of(m.id, &voters, &learners),
                online: online(node, keeper, m.id),
                caught_up: applied + CAUGHT_UP_ENTRIES >= commit,
                domain: m.domain.clone(),
                weight: m.weight,
            }
        })
        .collect()
}
