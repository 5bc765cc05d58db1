//! The client URLs each member advertises (etcd's `--advertise-client-urls`), for
//! Cluster.MemberList.
//!
//! A raftsql node knows its peers' Raft addresses but not where their etcd facades listen, so
//! each member records its own URLs in the replicated database [`DB`] (`client_urls(id, urls)`,
//! one row per member, URLs newline-separated) when its store starts, through the leader
//! (a forwarded `ClientUrls` request, `forward.rs`); MemberList reads the table locally. A row outlives
//! its member's removal harmlessly: MemberList lists the current peers only.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use raftsql_core::{Consistency, Error as CoreError, Statement, Value};

use crate::forward::Request;
use crate::pb::raftsql::etcd::ClientUrls;
use crate::store::EtcdStore;

/// The database holding the table (apart from `etcd`, so the etcd data and its hashes are
/// untouched).
pub(crate) const DB: &str = "etcd_members";

/// Until it succeeds: records `urls` as this member's, unless the table already says so.
pub(crate) fn spawn_record(store: Weak<EtcdStore>, urls: Vec<String>) {
    if urls.is_empty() {
        return;
    }
    tokio::spawn(async move {
        loop {
            let Some(s) = store.upgrade() else { return };
            let id = s.node().id();
            if s.client_urls().await.get(&id) == Some(&urls) {
                return;
            }
            let req = Request::ClientUrls(ClientUrls {
                member_id: id,
                urls: urls.clone(),
            });
            match s.forward(req).await {
                Ok(_) => return,
                Err(e) => tracing::debug!("recording this member's client URLs: {e}; retrying"),
            }
            drop(s);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// On the leader: records member `id`'s client URLs (a forwarded `ClientUrls` request).
pub(crate) async fn record_local(
    store: &EtcdStore,
    id: u64,
    urls: &[String],
) -> Result<(), CoreError> {
    let urls = urls.join("\n");
    store
        .node()
        .execute_batch(
            DB,
            vec![
                Statement::new(
                    "CREATE TABLE IF NOT EXISTS client_urls(id INTEGER PRIMARY KEY, urls TEXT NOT NULL)",
                ),
                Statement::with_params(
                    "INSERT OR REPLACE INTO client_urls(id, urls) VALUES (?1, ?2)",
                    vec![Value::Integer(id as i64), Value::Text(urls.to_string())],
                ),
            ],
        )
        .await?;
    Ok(())
}

impl EtcdStore {
    /// Every member's recorded client URLs, as this node has applied them.
    pub(crate) async fn client_urls(&self) -> HashMap<u64, Vec<String>> {
        self.node()
            .read(DB, Consistency::Local, |c| {
                if !crate::mvcc::has_table(c, "client_urls")? {
                    return Ok(HashMap::new());
                }
                let mut st = c.prepare("SELECT id, urls FROM client_urls")?;
                let rows = st.query_map([], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
                })?;
                let mut out = HashMap::new();
                for row in rows {
                    let (id, urls) = row?;
                    out.insert(id, urls.lines().map(String::from).collect());
                }
                Ok(out)
            })
            .await
            .ok()
            .flatten()
            .unwrap_or_default()
    }
}
