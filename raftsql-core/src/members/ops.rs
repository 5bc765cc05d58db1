//! What the leader does for a membership request: admit a joiner, describe the cluster,
//! remove a member (and tell it), and a member's own departure.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use raftsql_proto::v1 as pb;
use rusqlite::OptionalExtension;

use super::history;
use super::keeper::{answered, applied_of, online, Keeper};
use super::registry::{read_registry, seed_registry, sql, SCHEMA};
use super::token::{hmac, hmac_ok, now_ms};
use super::{LEADER_SERVICE, MEMBERS_SERVICE, NOTICE_SERVICE, SYSTEM_DB};
use crate::consistency::Consistency;
use crate::error::{Error, Result};
use crate::net::conn::RpcConn;
use crate::net::Peer;
use crate::node::Node;
use crate::roles::{Change, Reason, Role};

/// How long a member asked about a removal may take to answer.
const PEER_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a removal notice to the removed node may take.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(1);
/// The pause before a leaving node asks the leader again (elections, a handover).
const LEAVE_RETRY: Duration = Duration::from_millis(150);

/// Leader: checks a join and registers the joiner as a spare.
pub(super) async fn admit(node: &Node, r: pb::JoinRequest) -> Result<pb::JoinResponse> {
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
pub(super) async fn cluster(node: &Node, keeper: &Keeper) -> Result<pb::ClusterResponse> {
    let members = seed_registry(node).await?;
    let (voters, learners) = node.conf_roles();
    let commit = node.raft_status().commit;
    let health = keeper.health.lock().clone();
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
                reachable: answered(node, keeper, m.id),
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
pub(super) async fn remove(
    node: &Node,
    keeper: &Keeper,
    id: u64,
    force: bool,
    leaving: bool,
) -> Result<String> {
    let members = seed_registry(node).await?;
    let Some(m) = members.iter().find(|m| m.id == id).cloned() else {
        return Err(Error::Invalid(format!("node {id} is not a member")));
    };
    if id == node.id() {
        return Err(Error::Invalid(format!(
            "node {id} leads the cluster: run `raftsql leave` on it (it hands leadership over first)"
        )));
    }
    let reachable = online(node, keeper, id);
    if reachable && !force && !leaving {
        return Err(Error::Invalid(format!(
            "node {id} ({}) is running: run `raftsql leave` on it, or stop it first; --force removes it anyway",
            m.addr
        )));
    }
    let _removing = keeper.mark_removing(id);
    let (voters, learners) = node.conf_roles();
    let role = Role::of(id, &voters, &learners);
    if role == Role::Voter {
        let rest: Vec<u64> = voters.iter().copied().filter(|v| *v != id).collect();
        let up = rest.iter().filter(|v| online(node, keeper, **v)).count();
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
pub(super) async fn removal_confirmed(node: &Node) -> bool {
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
        let answer = tokio::time::timeout(PEER_CALL_TIMEOUT, async {
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
    let r = tokio::time::timeout(NOTICE_TIMEOUT, async {
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
pub(super) async fn leave(node: &Node, force: bool) -> Result<String> {
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
                tokio::time::sleep(LEAVE_RETRY).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last)
}
