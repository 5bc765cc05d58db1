//! Membership commands: `add-node`, `join`, `leave`, `remove-node`, `cluster show` and the
//! `status` summary. They talk to any member; the member forwards to the leader.
//!
//! `cluster show --format json` prints one object with stable fields:
//! `{"leader_id", "ha", "target_voters", "target_standbys", "commit_index", "nodes": [{"id",
//! "address", "role" ("voter"|"standby"|"spare"), "leader", "reachable", "applied", "lag",
//! "domain", "weight", "last_role_change"}], "last_leader_change", "recent_events"}`, where
//! each change is `null` or `{"at" (RFC 3339, UTC), "at_ms", "node", "kind" ("leader"|"role"),
//! "term", "from", "to", "reason"}` and `recent_events` lists up to 10, the newest first.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use raftsql_core::members::{self, JoinTicket};
use raftsql_proto::v1 as pb;

use crate::{parse_endpoints, run_node_with, CliResult, NodeArgs};

const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003";

/// Where to reach the cluster.
#[derive(Args, Debug)]
pub struct Target {
    /// Members to contact: HOST:PORT[,HOST:PORT...] (any member will do).
    #[arg(long, default_value = DEFAULT_ENDPOINTS)]
    endpoints: String,
    /// Cluster name.
    #[arg(long, default_value = "raftsql")]
    cluster: String,
    #[command(flatten)]
    tls: crate::ClientTls,
}

/// `raftsql add-node`.
#[derive(Args, Debug)]
pub struct AddNodeArgs {
    #[command(flatten)]
    target: Target,
    /// Make the token reusable until it expires after this long (e.g. 10m, 2h). Without it,
    /// the token is single-use and expires after an hour.
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
}

/// `raftsql join`.
#[derive(Args, Debug)]
pub struct JoinArgs {
    /// What `raftsql add-node` printed: HOST:PORT/TOKEN, or HOST:PORT/TOKEN/FINGERPRINT for
    /// a TLS cluster (the fingerprint of its CA, checked before anything is sent).
    join: String,
    #[command(flatten)]
    node: NodeArgs,
}

/// `raftsql leave`.
#[derive(Args, Debug)]
pub struct LeaveArgs {
    /// The leaving node's own address.
    #[arg(long, default_value = "127.0.0.1:7001")]
    endpoint: SocketAddr,
    /// Cluster name.
    #[arg(long, default_value = "raftsql")]
    cluster: String,
    /// Leave even if this node holds the only copy of the data.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    tls: crate::ClientTls,
}

/// `raftsql remove-node`.
#[derive(Args, Debug)]
pub struct RemoveNodeArgs {
    /// The node: its id or its HOST:PORT.
    node: String,
    #[command(flatten)]
    target: Target,
    /// Remove it even if it still answers (for a node that misbehaves), or without waiting
    /// for it to be seen offline.
    #[arg(long)]
    force: bool,
}

/// `raftsql cluster show`.
#[derive(Args, Debug)]
pub struct ShowArgs {
    #[command(flatten)]
    target: Target,
    /// table or json.
    #[arg(long, default_value = "table")]
    format: String,
}

/// `raftsql status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    target: Target,
}

async fn ask(
    t: &Target,
    req: pb::membership_request::Req,
) -> Result<pb::membership_response::Resp, String> {
    let eps = parse_endpoints(&t.endpoints)?;
    members::request(&t.tls.dialer()?, &eps, &t.cluster, req)
        .await
        .map_err(|e| e.to_string())
}

/// The cluster's state, as its leader sees it.
pub async fn cluster_state(t: &Target) -> Result<pb::ClusterResponse, String> {
    match ask(
        t,
        pb::membership_request::Req::Cluster(pb::ClusterRequest {}),
    )
    .await?
    {
        pb::membership_response::Resp::Cluster(c) => Ok(c),
        _ => Err("unexpected answer".into()),
    }
}

/// `raftsql add-node`: prints the join command.
pub async fn add_node(a: AddNodeArgs) -> CliResult {
    let req = pb::CreateTokenRequest {
        ttl_ms: a.ttl.map_or(0, |d| d.as_millis() as u64),
        reusable: a.ttl.is_some(),
    };
    let r = match ask(&a.target, pb::membership_request::Req::CreateToken(req)).await? {
        pb::membership_response::Resp::CreateToken(r) => r,
        _ => return Err("unexpected answer".into()),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let left = Duration::from_secs(r.expires_unix_ms.saturating_sub(now) / 1000);
    println!("From the node you are adding, run one of:");
    let fp = if r.ca_fingerprint.is_empty() {
        String::new()
    } else {
        format!("/{}", r.ca_fingerprint)
    };
    for addr in &r.addrs {
        println!(
            "  raftsql join {addr}/{}{fp} --data-dir DIR --listen HOST:PORT",
            r.token
        );
    }
    println!(
        "The token {} expires in {}.",
        if a.ttl.is_some() {
            "may be used by several nodes; it"
        } else {
            "is single-use and"
        },
        humantime::format_duration(left)
    );
    Ok(())
}

/// `raftsql join`: joins, then runs the node in the foreground.
pub async fn join(a: JoinArgs) -> CliResult {
    let parts: Vec<&str> = a.join.splitn(3, '/').collect();
    let (target, token, fp) = match parts[..] {
        [t, tok] => (t, tok, None),
        [t, tok, fp] => (
            t,
            tok,
            Some(raftsql_core::tls::parse_fingerprint(fp).map_err(|e| e.to_string())?),
        ),
        _ => {
            return Err(format!(
                "{:?}: expected HOST:PORT/TOKEN or HOST:PORT/TOKEN/FINGERPRINT",
                a.join
            ))
        }
    };
    let target: SocketAddr = target
        .parse()
        .map_err(|_| format!("{target:?}: expected HOST:PORT"))?;
    if a.node.id.is_some() || a.node.bootstrap_peers.is_some() {
        return Err("--id and --bootstrap-peers are chosen by the cluster when joining".into());
    }
    if let Ok(Some(id)) = raftsql_core::stored_id(&a.node.data_dir) {
        return Err(format!(
            "{} already holds node {id}: start it with `raftsql node --data-dir {} --listen ...`",
            a.node.data_dir.display(),
            a.node.data_dir.display()
        ));
    }
    let ticket: JoinTicket = members::join(
        target,
        token,
        fp,
        a.node.listen,
        &a.node.domain,
        a.node.weight,
    )
    .await
    .map_err(|e| format!("join refused: {e}"))?;
    // "joined cluster" is printed by the node once it has stored what the ticket gave it.
    run_node_with(a.node, Some(ticket)).await
}

/// `raftsql leave`.
pub async fn leave(a: LeaveArgs) -> CliResult {
    let req = pb::membership_request::Req::Remove(pb::RemoveRequest {
        id: 0,
        force: a.force,
        leaving: true,
    });
    // Sent to the leaving node itself: it hands over leadership, then asks the leader.
    match members::request(&a.tls.dialer()?, &[a.endpoint], &a.cluster, req).await {
        Ok(pb::membership_response::Resp::Remove(r)) => {
            println!("{}", r.report);
            Ok(())
        }
        Ok(_) => Err("unexpected answer".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `raftsql remove-node`.
pub async fn remove_node(a: RemoveNodeArgs) -> CliResult {
    let id = match a.node.parse::<u64>() {
        Ok(id) => id,
        Err(_) => {
            let c = cluster_state(&a.target).await?;
            c.nodes
                .iter()
                .filter_map(|n| n.member.as_ref())
                .find(|m| m.addr == a.node)
                .map(|m| m.id)
                .ok_or_else(|| format!("no member has the address {}", a.node))?
        }
    };
    let req = pb::membership_request::Req::Remove(pb::RemoveRequest {
        id,
        force: a.force,
        leaving: false,
    });
    match ask(&a.target, req).await? {
        pb::membership_response::Resp::Remove(r) => {
            println!("{}", r.report);
            Ok(())
        }
        _ => Err("unexpected answer".into()),
    }
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn event_json(e: Option<&pb::ClusterEvent>) -> serde_json::Value {
    match e {
        None => serde_json::Value::Null,
        Some(e) => serde_json::json!({
            "at": rfc3339(e.at_ms), "at_ms": e.at_ms, "node": e.node, "kind": e.kind,
            "term": e.term, "from": e.from_role, "to": e.to_role, "reason": e.reason,
        }),
    }
}

/// "2026-12-03T12:50:01Z (5m 3s ago)".
fn when(ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let ago = Duration::from_secs(now.saturating_sub(ms) / 1000);
    format!("{} ({} ago)", rfc3339(ms), humantime::format_duration(ago))
}

/// One line for an event.
fn event_line(e: &pb::ClusterEvent) -> String {
    if e.kind == "leader" {
        format!(
            "{}  node {} leads (term {}): {}",
            when(e.at_ms),
            e.node,
            e.term,
            e.reason
        )
    } else {
        format!(
            "{}  node {} {} -> {}: {}",
            when(e.at_ms),
            e.node,
            e.from_role,
            e.to_role,
            e.reason
        )
    }
}

/// The JSON form of a cluster state (see the module docs).
pub fn cluster_json(c: &pb::ClusterResponse) -> serde_json::Value {
    serde_json::json!({
        "leader_id": c.leader_id,
        "ha": c.ha,
        "target_voters": c.target_voters,
        "target_standbys": c.target_standbys,
        "commit_index": c.commit_index,
        "nodes": c.nodes.iter().map(|n| {
            let m = n.member.clone().unwrap_or_default();
            serde_json::json!({
                "id": m.id, "address": m.addr, "role": n.role, "leader": n.leader,
                "reachable": n.reachable, "applied": n.applied, "lag": n.lag,
                "domain": m.domain, "weight": m.weight,
                "last_role_change": event_json(n.last_role_change.as_ref()),
            })
        }).collect::<Vec<_>>(),
        "last_leader_change": event_json(c.last_leader_change.as_ref()),
        "recent_events": c.recent_events.iter().map(|e| event_json(Some(e))).collect::<Vec<_>>(),
    })
}

/// `raftsql cluster show`.
pub async fn show(a: ShowArgs) -> CliResult {
    let c = cluster_state(&a.target).await?;
    match a.format.as_str() {
        "json" => println!("{}", cluster_json(&c)),
        "table" => {
            println!(
                "{:<4} {:<22} {:<8} {:<6} {:<9} {:>10} {:>6}  {:<8}  LAST ROLE CHANGE",
                "ID", "ADDRESS", "ROLE", "LEADER", "REACHABLE", "APPLIED", "LAG", "DOMAIN"
            );
            for n in &c.nodes {
                let m = n.member.clone().unwrap_or_default();
                let change = n.last_role_change.as_ref().map_or("-".to_string(), |e| {
                    format!(
                        "{} -> {} {}: {}",
                        e.from_role,
                        e.to_role,
                        rfc3339(e.at_ms),
                        e.reason
                    )
                });
                println!(
                    "{:<4} {:<22} {:<8} {:<6} {:<9} {:>10} {:>6}  {:<8}  {}",
                    m.id,
                    m.addr,
                    n.role,
                    if n.leader { "*" } else { "" },
                    if n.reachable { "yes" } else { "NO" },
                    n.applied,
                    n.lag,
                    if m.domain.is_empty() { "-" } else { &m.domain },
                    change
                );
            }
            println!(
                "high-availability: {} (targets: {} voters, {} standbys)",
                if c.ha { "yes" } else { "no" },
                c.target_voters,
                c.target_standbys
            );
            match &c.last_leader_change {
                Some(e) => println!("last leader change: {}", event_line(e)),
                None => println!("last leader change: none recorded"),
            }
            if !c.recent_events.is_empty() {
                println!("recent events (newest first):");
                for e in &c.recent_events {
                    println!("  {}", event_line(e));
                }
            }
        }
        f => return Err(format!("--format {f:?}: use table or json")),
    }
    Ok(())
}

/// `raftsql status`: the short summary.
pub async fn status(a: StatusArgs) -> CliResult {
    let c = cluster_state(&a.target).await?;
    let list = |role: &str| {
        let v: Vec<String> = c
            .nodes
            .iter()
            .filter(|n| n.role == role)
            .filter_map(|n| n.member.as_ref().map(|m| m.addr.clone()))
            .collect();
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(" ")
        }
    };
    println!("raftsql is running");
    println!("high-availability: {}", if c.ha { "yes" } else { "no" });
    println!("  voter nodes: {}", list("voter"));
    println!("  standby nodes: {}", list("standby"));
    println!("  spare nodes: {}", list("spare"));
    Ok(())
}
