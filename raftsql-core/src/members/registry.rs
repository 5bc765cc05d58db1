//! The member registry: who the members are (id, address, failure domain, weight) and
//! who was removed, as tables of the replicated system database; read and rewritten in
//! place by recovery and restore.

use raftsql_proto::v1 as pb;
use rusqlite::OptionalExtension;

use super::history;
use super::SYSTEM_DB;
use crate::consistency::Consistency;
use crate::error::{Error, Result};
use crate::node::Node;

pub(super) const SCHEMA: &str = "
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

pub(super) fn sql(e: rusqlite::Error) -> Error {
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
pub(super) fn read_registry(c: &rusqlite::Connection) -> Result<Vec<pb::Member>> {
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

/// The registry, after adding any member of the Raft configuration it lacks (the bootstrap
/// peers, on a new cluster's first leader).
pub(super) async fn seed_registry(node: &Node) -> Result<Vec<pb::Member>> {
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
