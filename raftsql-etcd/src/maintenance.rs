//! etcd's Maintenance Status and Cluster MemberList, from the raftsql node's state.

use raftsql_core::Consistency;
use rusqlite::OptionalExtension;
use tokio::sync::{mpsc, oneshot};

use crate::error::{decode_err, R};
use crate::pb::etcdserverpb::{
    AlarmResponse, DefragmentResponse, HashKvResponse, HashResponse, Member, MemberListResponse,
    StatusResponse,
};
use crate::store::{EtcdStore, DB};

/// The etcd version this facade reports (the API level it implements). kube-apiserver
/// enables RequestWatchProgress (and with it ConsistentListFromCache and WatchList) only
/// for etcd >= 3.4.31 / 3.5.13 / 3.6.0, the versions whose progress notifications wait for
/// the watches' events (etcd issue 15220); raftsql's do (`watch.rs`, "Progress requests"),
/// and it serves 3.6's `/livez` and `/readyz`.
pub const ETCD_VERSION: &str = "3.6.0";

impl EtcdStore {
    /// Maintenance.Status: etcd's version, this node's database size, leader and Raft indexes.
    pub async fn status(&self) -> R<StatusResponse> {
        let size = self.db_sizes().await?;
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
            is_learner: self.node().conf_roles().1.contains(&self.node().id()),
        })
    }

    /// The `etcd` database's size and the part of it in use (bytes; zeros before it exists).
    pub(crate) async fn db_sizes(&self) -> R<(i64, i64)> {
        Ok(self
            .node()
            .read(DB, Consistency::Local, |c| {
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
            .unwrap_or((0, 0)))
    }

    /// Cluster.MemberList: the raftsql nodes, with their peer URLs (`https://` on a TLS
    /// cluster), the client URLs each member recorded (see
    /// [`crate::EtcdOptions::advertise_client_urls`]), and standbys and spares as learners.
    pub async fn member_list(&self) -> R<MemberListResponse> {
        let rev = self.current_rev().await;
        let scheme = if self.node().dialer().is_tls() {
            "https"
        } else {
            "http"
        };
        let (_, learners) = self.node().conf_roles();
        let urls = self.client_urls().await;
        let members = self
            .node()
            .peers()
            .into_iter()
            .map(|(id, addr)| Member {
                id,
                name: format!("raftsql-{id}"),
                peer_ur_ls: vec![format!("{scheme}://{addr}")],
                client_ur_ls: urls.get(&id).cloned().unwrap_or_default(),
                is_learner: learners.contains(&id),
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
            .read(DB, Consistency::Local, move |c| {
                let has = crate::mvcc::has_table(c, "meta")?;
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
            .read(DB, Consistency::Local, |c| {
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
    /// in one read transaction on this node), followed by its sha256 as etcd sends it. It is
    /// raftsql's format, not etcd's bbolt: `etcdctl snapshot save` stores it; `raftsql
    /// snapshot restore` (issue 5) is what restores it.
    ///
    /// Streamed: a blocking task reads the pages into 1 MiB chunks and hands them over a
    /// channel of `SNAPSHOT_CHUNKS_IN_FLIGHT`, so a snapshot of any size costs a few MiB
    /// of memory (the whole database was built in memory before: issue 15), and a client
    /// that reads slowly slows the reader instead of growing a buffer. Returns the stream's
    /// total size (database plus digest, for `remaining_bytes`) and the chunks; a read
    /// error after the first chunk ends the stream with that error.
    pub async fn snapshot_stream(&self) -> R<(u64, mpsc::Receiver<R<Vec<u8>>>)> {
        let (tx, rx) = mpsc::channel::<R<Vec<u8>>>(SNAPSHOT_CHUNKS_IN_FLIGHT);
        let (total_tx, total_rx) = oneshot::channel::<u64>();
        let node = self.node().clone();
        let errors = tx.clone();
        tokio::spawn(async move {
            let read = node
                .read(DB, Consistency::Local, move |c| {
                    // `read` runs this in one read transaction: the page count and every
                    // page come from one state.
                    let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                    let page_size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
                    let _ = total_tx.send((pages * page_size) as u64 + 32);
                    stream_pages(c, &tx)
                })
                .await;
            match read {
                Ok(Some(())) => {}
                // No etcd database on this node yet: an empty stream (the oneshot is gone).
                Ok(None) => {}
                Err(e) => {
                    let _ = errors.send(Err(decode_err(e))).await;
                }
            }
        });
        match total_rx.await {
            Ok(total) => Ok((total, rx)),
            Err(_) => {
                // The read ended before it knew the size: its error, or nothing to send.
                let mut rx = rx;
                match rx.recv().await {
                    Some(Err(e)) => Err(e),
                    _ => Ok((0, rx)),
                }
            }
        }
    }
}

/// Chunks of a snapshot stream read ahead of the client.
pub const SNAPSHOT_CHUNKS_IN_FLIGHT: usize = 2;

/// Sends every page of `c`'s database in 1 MiB chunks, then the sha256 of them all (etcd
/// ends the stream with the digest of the content; etcdctl checks it).
fn stream_pages(
    c: &rusqlite::Connection,
    tx: &mpsc::Sender<R<Vec<u8>>>,
) -> raftsql_core::Result<()> {
    use sha2::Digest;
    let gone = || raftsql_core::Error::Internal("the snapshot's client went away".into());
    let mut h = sha2::Sha256::new();
    let mut st = c.prepare("SELECT data FROM sqlite_dbpage ORDER BY pgno")?;
    let mut rows = st.query([])?;
    let mut cur = Vec::with_capacity(1 << 20);
    while let Some(r) = rows.next()? {
        cur.extend_from_slice(r.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?);
        if cur.len() >= 1 << 20 {
            h.update(&cur);
            let full = std::mem::replace(&mut cur, Vec::with_capacity(1 << 20));
            tx.blocking_send(Ok(full)).map_err(|_| gone())?;
        }
    }
    h.update(&cur);
    cur.extend_from_slice(&h.finalize());
    tx.blocking_send(Ok(cur)).map_err(|_| gone())?;
    Ok(())
}
