//! etcd's Maintenance Status and Cluster MemberList, from the raftsql node's state.

use rusqlite::OptionalExtension;

use crate::pb::etcdserverpb::{
    AlarmResponse, DefragmentResponse, HashKvResponse, HashResponse, Member, MemberListResponse,
    StatusResponse,
};
use crate::store::{decode_err, EtcdStore, DB, R};

/// The etcd version this facade reports (the API level it implements).
pub const ETCD_VERSION: &str = "3.5.0";

impl EtcdStore {
    /// Maintenance.Status: etcd's version, this node's database size, leader and Raft indexes.
    pub async fn status(&self) -> R<StatusResponse> {
        let size = self
            .node()
            .read(DB, true, |c| {
                let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                let free: i64 = c
                    .query_row("PRAGMA freelist_count", [], |r| r.get(0))
                    .optional()?
                    .unwrap_or(0);
                let size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
                Ok((pages * size, (pages - free) * size))
            })
            .await
            .map_err(decode_err)?
            .unwrap_or((0, 0));
        let st = self.node().status();
        let rev = self.current_rev().await;
        Ok(StatusResponse {
            header: Some(self.header_now(rev)),
            version: ETCD_VERSION.into(),
            db_size: size.0,
            leader: st.raft.leader_id,
            raft_index: st.raft.commit,
            raft_term: st.raft.term,
            raft_applied_index: st.applied,
            errors: Vec::new(),
            db_size_in_use: size.1,
            is_learner: false,
            ..Default::default()
        })
    }

    /// Cluster.MemberList: the raftsql nodes, with their peer addresses.
    pub async fn member_list(&self) -> R<MemberListResponse> {
        let rev = self.current_rev().await;
        let members = self
            .node()
            .peers()
            .into_iter()
            .map(|(id, addr)| Member {
                id,
                name: format!("raftsql-{id}"),
                peer_ur_ls: vec![format!("http://{addr}")],
                client_ur_ls: Vec::new(),
                is_learner: false,
            })
            .collect();
        Ok(MemberListResponse {
            header: Some(self.header_now(rev)),
            members,
        })
    }

    /// Maintenance.Alarm: raftsql raises no alarms (no space quota, no corruption alarm).
    pub async fn alarm(&self) -> R<AlarmResponse> {
        let rev = self.current_rev().await;
        Ok(AlarmResponse {
            header: Some(self.header_now(rev)),
            alarms: Vec::new(),
        })
    }

    /// Maintenance.Defragment: a no-op that says so. SQLite reuses freed pages, and a VACUUM
    /// of a replicated database would have to be a replicated write of every page.
    pub async fn defragment(&self) -> R<DefragmentResponse> {
        tracing::info!("defragment requested: a no-op in raftsql (SQLite reuses freed pages)");
        let rev = self.current_rev().await;
        Ok(DefragmentResponse {
            header: Some(self.header_now(rev)),
        })
    }

    /// Maintenance.HashKV: crc32 of every key revision up to `revision` (0: current). Equal on
    /// every member that applied the same entries; not comparable with etcd's own hash.
    pub async fn hash_kv(&self, revision: i64) -> R<HashKvResponse> {
        let r = self
            .node()
            .read(DB, true, move |c| {
                let has = crate::store::has_table(c, "meta")?;
                if !has {
                    return Ok((0u32, 0i64, 1i64));
                }
                let cur: i64 = c.query_row("SELECT value FROM meta WHERE name = 'rev'", [], |r| r.get(0)).optional()?.unwrap_or(1);
                let compact: i64 = c.query_row("SELECT value FROM meta WHERE name = 'compact_rev'", [], |r| r.get(0)).optional()?.unwrap_or(0);
                let upto = if revision <= 0 { cur } else { revision.min(cur) };
                let mut h = crc32fast::Hasher::new();
                let mut st = c.prepare("SELECT rev, sub, key, version, value FROM kv_rev WHERE rev <= ?1 ORDER BY rev, sub")?;
                let mut rows = st.query([upto])?;
                while let Some(r) = rows.next()? {
                    h.update(&r.get::<_, i64>(0)?.to_le_bytes());
                    h.update(&r.get::<_, i64>(1)?.to_le_bytes());
                    h.update(&r.get::<_, Vec<u8>>(2)?);
                    h.update(&r.get::<_, i64>(3)?.to_le_bytes());
                    h.update(&r.get::<_, Vec<u8>>(4)?);
                }
                Ok((h.finalize(), compact, upto))
            })
            .await
            .map_err(decode_err)?
            .unwrap_or((0, 0, 1));
        let rev = self.current_rev().await;
        Ok(HashKvResponse {
            header: Some(self.header_now(rev)),
            hash: r.0,
            compact_revision: r.1,
        })
    }

    /// Maintenance.Hash: a crc32 of the whole etcd database file, its pages read in one read
    /// transaction on this node. Replicas are byte-identical, so every node that has applied
    /// the same index answers the same hash (as etcd's members do); the value itself is
    /// raftsql's, not comparable with etcd's bbolt hash.
    pub async fn hash(&self) -> R<HashResponse> {
        let hash = self
            .node()
            .read(DB, true, |c| {
                let mut st = c.prepare("SELECT data FROM sqlite_dbpage ORDER BY pgno")?;
                let mut rows = st.query([])?;
                let mut h = crc32fast::Hasher::new();
                while let Some(r) = rows.next()? {
                    if let rusqlite::types::ValueRef::Blob(page) = r.get_ref(0)? {
                        h.update(page);
                    }
                }
                Ok(h.finalize())
            })
            .await
            .map_err(decode_err)?
            .unwrap_or(0);
        let rev = self.current_rev().await;
        Ok(HashResponse {
            header: Some(self.header_now(rev)),
            hash,
        })
    }

    /// Maintenance.Snapshot: the etcd database as one consistent SQLite file (its pages read
    /// in one read transaction on this node), in 1 MiB chunks, followed by its sha256 as etcd sends it. It is raftsql's format, not
    /// etcd's bbolt: `etcdctl snapshot save` stores it; `raftsql snapshot restore` (issue 5)
    /// is what restores it.
    pub async fn snapshot_chunks(&self) -> R<Vec<Vec<u8>>> {
        let pages = self
            .node()
            .read(DB, true, |c| {
                let mut st = c.prepare("SELECT data FROM sqlite_dbpage ORDER BY pgno")?;
                let rows = st.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
                let mut out = Vec::new();
                let mut cur = Vec::with_capacity(1 << 20);
                for p in rows {
                    cur.extend_from_slice(&p?);
                    if cur.len() >= 1 << 20 {
                        out.push(std::mem::replace(&mut cur, Vec::with_capacity(1 << 20)));
                    }
                }
                // etcd ends the stream with the sha256 of the content; etcdctl checks it.
                use sha2::Digest;
                let mut h = sha2::Sha256::new();
                for c in &out {
                    h.update(c);
                }
                h.update(&cur);
                cur.extend_from_slice(&h.finalize());
                out.push(cur);
                Ok(out)
            })
            .await
            .map_err(decode_err)?
            .unwrap_or_default();
        Ok(pages)
    }
}
