//! etcd's Maintenance Status and Cluster MemberList, from the raftsql node's state.

use rusqlite::OptionalExtension;

use crate::pb::etcdserverpb::{Member, MemberListResponse, StatusResponse};
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
        let rev = crate::watch::current_rev_of(self).await;
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
        let rev = crate::watch::current_rev_of(self).await;
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
}
