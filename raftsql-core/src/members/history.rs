//! The cluster's history: who led when, and why each member has its role (`cluster show`).
//!
//! The leader records every change it makes or sees in the `events` table of the system
//! database (`_raftsql`), so the history is replicated like everything else and survives
//! any node: a new leader records its election (once per term, found by its keeper); the
//! keeper records each role change it makes with the planner's [`Reason`] (and the failure
//! domain that made it prefer a member); joining and removal record theirs in the same
//! transaction as the registry change they belong to.
//!
//! Times are the recording leader's wall clock. The table keeps the newest [`KEEP`] events.

use raftsql_proto::v1 as pb;
use rusqlite::{params, Connection, OptionalExtension};

use super::SYSTEM_DB;
use crate::error::{Error, Result};
use crate::node::Node;
use crate::roles::{Change, MemberView, Reason, Role};

/// Events kept (older ones are deleted as new ones arrive).
pub const KEEP: i64 = 1000;

pub(super) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS events(
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    node INTEGER NOT NULL,
    kind TEXT NOT NULL,
    term INTEGER NOT NULL,
    from_role TEXT NOT NULL,
    to_role TEXT NOT NULL,
    reason TEXT NOT NULL)";

pub(super) fn sql(e: rusqlite::Error) -> Error {
    Error::Internal(format!("system database: {e}"))
}

/// Records `e` (with the current time) inside the caller's write transaction on the system
/// database.
pub(crate) fn record(c: &Connection, mut e: pb::ClusterEvent) -> Result<()> {
    c.execute_batch(SCHEMA).map_err(sql)?;
    if e.at_ms == 0 {
        e.at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
    }
    c.execute(
        "INSERT INTO events(at_ms, node, kind, term, from_role, to_role, reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            e.at_ms as i64,
            e.node as i64,
            e.kind,
            e.term as i64,
            e.from_role,
            e.to_role,
            e.reason
        ],
    )
    .map_err(sql)?;
    c.execute(
        "DELETE FROM events WHERE seq <= (SELECT max(seq) FROM events) - ?1",
        [KEEP],
    )
    .map_err(sql)?;
    Ok(())
}

/// Records `e` in a write of its own (through Raft: leader only).
pub(crate) async fn record_write(node: &Node, e: pb::ClusterEvent) -> Result<()> {
    node.write(SYSTEM_DB, move |c| record(c, e)).await
}

/// A role change event for `c`, its reason said for an operator: the planner's rule, and
/// the failure domain when that is what made the planner prefer or pick this member.
pub(crate) fn role_event(c: &Change, views: &[MemberView], term: u64) -> pb::ClusterEvent {
    let mut reason = c.reason.as_str().to_string();
    if let Some(me) = views.iter().find(|v| v.id == c.id) {
        let d = &me.domain;
        let others = |role: Role| {
            views
                .iter()
                .filter(|v| v.id != c.id && v.role == role && v.online && v.domain == *d)
                .count()
        };
        if !d.is_empty() {
            if c.to > c.from {
                // A demotion of an online member: its domain has another of its role.
                if me.online && others(c.from) > 0 {
                    reason.push_str(&format!("; domain {d:?} has another {}", c.from.as_str()));
                }
            } else if others(c.to) == 0 {
                reason.push_str(&format!("; brings domain {d:?} in as a {}", c.to.as_str()));
            }
        }
    }
    pb::ClusterEvent {
        at_ms: 0,
        node: c.id,
        kind: "role".into(),
        term,
        from_role: c.from.as_str().into(),
        to_role: c.to.as_str().into(),
        reason,
    }
}

/// A removal (`leaving`: the node asked itself, with `raftsql leave`).
pub(crate) fn removal_event(
    id: u64,
    from: Role,
    term: u64,
    leaving: bool,
    force: bool,
) -> pb::ClusterEvent {
    let how = match (leaving, force) {
        (true, _) => "left (raftsql leave)",
        (false, true) => "removed (remove-node --force)",
        (false, false) => "removed (remove-node, the node was stopped)",
    };
    pb::ClusterEvent {
        at_ms: 0,
        node: id,
        kind: "role".into(),
        term,
        from_role: from.as_str().into(),
        to_role: "removed".into(),
        reason: format!("{}: {how}", Reason::Removed.as_str()),
    }
}

/// What `cluster show` needs: the last leader change, the last role change of each member,
/// and the 10 newest events. Empty if nothing was recorded yet.
#[derive(Default)]
pub(crate) struct Summary {
    pub last_leader: Option<pb::ClusterEvent>,
    pub last_role: std::collections::HashMap<u64, pb::ClusterEvent>,
    pub recent: Vec<pb::ClusterEvent>,
}

/// Reads the [`Summary`] from the system database.
pub(crate) fn summary(c: &Connection) -> Result<Summary> {
    let exists: Option<i64> = c
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql)?;
    let mut s = Summary {
        last_leader: None,
        last_role: Default::default(),
        recent: Vec::new(),
    };
    if exists.is_none() {
        return Ok(s);
    }
    let row = |r: &rusqlite::Row<'_>| -> rusqlite::Result<pb::ClusterEvent> {
        Ok(pb::ClusterEvent {
            at_ms: r.get::<_, i64>(0)? as u64,
            node: r.get::<_, i64>(1)? as u64,
            kind: r.get(2)?,
            term: r.get::<_, i64>(3)? as u64,
            from_role: r.get(4)?,
            to_role: r.get(5)?,
            reason: r.get(6)?,
        })
    };
    const COLS: &str = "at_ms, node, kind, term, from_role, to_role, reason";
    s.last_leader = c
        .query_row(
            &format!("SELECT {COLS} FROM events WHERE kind = 'leader' ORDER BY seq DESC LIMIT 1"),
            [],
            row,
        )
        .optional()
        .map_err(sql)?;
    let mut st = c
        .prepare(&format!(
            "SELECT {COLS} FROM events WHERE seq IN
               (SELECT max(seq) FROM events WHERE kind = 'role' GROUP BY node)"
        ))
        .map_err(sql)?;
    for e in st.query_map([], row).map_err(sql)? {
        let e = e.map_err(sql)?;
        s.last_role.insert(e.node, e);
    }
    let mut st = c
        .prepare(&format!(
            "SELECT {COLS} FROM events ORDER BY seq DESC LIMIT 10"
        ))
        .map_err(sql)?;
    for e in st.query_map([], row).map_err(sql)? {
        s.recent.push(e.map_err(sql)?);
    }
    Ok(s)
}

/// The reason a new leader records for its election: which node led before it.
pub(crate) fn election_event(
    node: u64,
    term: u64,
    before: Option<&pb::ClusterEvent>,
) -> pb::ClusterEvent {
    let reason = match before {
        None => format!("elected in term {term}: the first leader recorded"),
        Some(b) if b.node == node => format!(
            "elected in term {term}: leads again after a new election (led term {})",
            b.term
        ),
        Some(b) => format!(
            "elected in term {term}: node {} (leader in term {}) stepped down, was stopped \
             or stopped answering",
            b.node, b.term
        ),
    };
    pb::ClusterEvent {
        at_ms: 0,
        node,
        kind: "leader".into(),
        term,
        from_role: String::new(),
        to_role: String::new(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(node: u64, kind: &str, reason: &str) -> pb::ClusterEvent {
        pb::ClusterEvent {
            node,
            kind: kind.into(),
            term: 1,
            reason: reason.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_summary_has_the_last_of_each_and_the_table_stays_bounded() {
        let c = Connection::open_in_memory().unwrap();
        assert!(summary(&c).unwrap().last_leader.is_none());
        for i in 0..(KEEP + 50) {
            record(&c, ev((i % 3 + 1) as u64, "role", &format!("r{i}"))).unwrap();
        }
        record(&c, ev(2, "leader", "L")).unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, KEEP);
        let s = summary(&c).unwrap();
        assert_eq!(s.last_leader.unwrap().reason, "L");
        let last = KEEP + 49;
        for node in 1..=3u64 {
            let want = (0..=last)
                .rev()
                .find(|i| (i % 3 + 1) as u64 == node)
                .unwrap();
            assert_eq!(s.last_role[&node].reason, format!("r{want}"));
        }
        assert_eq!(s.recent.len(), 10);
        assert_eq!(s.recent[0].reason, "L");
        assert!(s.recent[0].at_ms > 0);
    }

    #[test]
    fn a_promotion_that_brings_a_new_domain_says_so() {
        let v = |id, role, domain: &str| MemberView {
            id,
            role,
            online: true,
            caught_up: true,
            domain: domain.into(),
            weight: 0,
        };
        let views = vec![
            v(1, Role::Voter, "a"),
            v(2, Role::Voter, "b"),
            v(4, Role::Standby, "c"),
        ];
        let c = Change {
            id: 4,
            from: Role::Standby,
            to: Role::Voter,
            reason: Reason::TooFewVoters,
        };
        let e = role_event(&c, &views, 7);
        assert_eq!(
            e.reason,
            "too few voters online; brings domain \"c\" in as a voter"
        );
        assert_eq!(
            (e.from_role.as_str(), e.to_role.as_str(), e.term),
            ("standby", "voter", 7)
        );
    }
}
