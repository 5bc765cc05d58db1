//! etcd's leases: Grant, Revoke, KeepAlive, TimeToLive, Leases, and expiry.
//!
//! A lease (id, TTL) is a row of the replicated `lease` table, so every node knows every
//! lease. Its *deadline* is not replicated: only the leader keeps deadlines, in memory
//! ([`LeaseClock`]). When a node becomes leader it starts every live lease afresh at its full
//! TTL, so a leader change extends leases instead of expiring them all at once (as etcd's
//! lessor does on promotion). Keep-alives and time-to-live questions are answered by the
//! leader (a follower forwards them). An expired lease is revoked through the ordinary write
//! path: its keys are deleted in one write transaction, one revision, producing DELETE events
//! for watchers, and its row goes.

use raftsql_core::Consistency;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{params, OptionalExtension};
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::{decode_err, EtcdError, R};
use crate::forward::{expect_reply, Reply, Request};
use crate::mvcc::delete_range;
use crate::pb::etcdserverpb::{
    DeleteRangeRequest, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseStatus, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use crate::store::{EtcdStore, DB};

/// etcd's minimum TTL with its default timing (1.5 election timeouts, rounded up to seconds).
pub const MIN_TTL: i64 = 2;
/// etcd's maximum TTL.
pub const MAX_TTL: i64 = 9_000_000_000;

/// Lease deadlines, on the leader.
#[derive(Default)]
pub struct LeaseClock {
    deadlines: HashMap<i64, Instant>,
    /// True while this node leads and `deadlines` covers every lease.
    leading: bool,
}

async fn lease_ttl(store: &EtcdStore, id: i64) -> R<Option<(i64, i64)>> {
    let r = store
        .node()
        .read(DB, Consistency::Local, move |c| {
            let has = crate::mvcc::has_table(c, "lease")?;
            if !has {
                return Ok(None);
            }
            Ok(c.query_row(
                "SELECT ttl, granted_ttl FROM lease WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
        })
        .await
        .map_err(decode_err)?;
    Ok(r.flatten())
}

impl EtcdStore {
    /// LeaseGrant (on the leader).
    pub async fn lease_grant(&self, req: LeaseGrantRequest) -> R<LeaseGrantResponse> {
        if !self.leads() {
            return expect_reply!(
                self.forward(Request::LeaseGrant(req)).await?,
                Reply::LeaseGrant
            );
        }
        if req.ttl > MAX_TTL {
            return Err(EtcdError::LeaseTtlTooLarge);
        }
        let ttl = req.ttl.max(MIN_TTL);
        let want = req.id;
        let (id, rev) = self
            .write(move |c, _t| {
                let id = if want != 0 {
                    want
                } else {
                    loop {
                        let id = (rand::random::<u64>() >> 1) as i64;
                        let taken = c
                            .query_row("SELECT 1 FROM lease WHERE id = ?1", [id], |_| Ok(()))
                            .optional()?
                            .is_some();
                        if id != 0 && !taken {
                            break id;
                        }
                    }
                };
                let exists = c
                    .query_row("SELECT 1 FROM lease WHERE id = ?1", [id], |_| Ok(()))
                    .optional()?
                    .is_some();
                if exists {
                    return Err(EtcdError::LeaseExist);
                }
                c.execute(
                    "INSERT INTO lease(id, ttl, granted_ttl) VALUES (?1, ?2, ?2)",
                    params![id, ttl],
                )?;
                Ok(id)
            })
            .await?;
        self.clock
            .lock()
            .deadlines
            .insert(id, Instant::now() + Duration::from_secs(ttl as u64));
        Ok(LeaseGrantResponse {
            header: Some(self.header_now(rev)),
            id,
            ttl,
            error: String::new(),
        })
    }

    /// LeaseRevoke (on the leader): deletes the lease's keys at one revision.
    pub async fn lease_revoke(&self, req: LeaseRevokeRequest) -> R<LeaseRevokeResponse> {
        if !self.leads() {
            return expect_reply!(
                self.forward(Request::LeaseRevoke(req)).await?,
                Reply::LeaseRevoke
            );
        }
        let rev = self.revoke_local(req.id).await?;
        Ok(LeaseRevokeResponse {
            header: Some(self.header_now(rev)),
        })
    }

    async fn revoke_local(&self, id: i64) -> R<i64> {
        let (_, rev) = self
            .write(move |c, t| {
                let exists = c
                    .query_row("SELECT 1 FROM lease WHERE id = ?1", [id], |_| Ok(()))
                    .optional()?
                    .is_some();
                if !exists {
                    return Err(EtcdError::LeaseNotFound);
                }
                let keys: Vec<Vec<u8>> = c
                    .prepare("SELECT key FROM kv_live WHERE lease = ?1 ORDER BY key")?
                    .query_map([id], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                for k in keys {
                    delete_range(
                        c,
                        t,
                        &DeleteRangeRequest {
                            key: Bytes::from(k),
                            range_end: Bytes::new(),
                            prev_kv: false,
                        },
                    )?;
                }
                c.execute("DELETE FROM lease WHERE id = ?1", [id])?;
                Ok(())
            })
            .await?;
        self.clock.lock().deadlines.remove(&id);
        Ok(rev)
    }

    /// One keep-alive (on the leader): the lease's TTL, or 0 if it does not exist.
    pub(crate) async fn keep_alive_one(&self, id: i64) -> R<LeaseKeepAliveResponse> {
        if !self.leads() {
            let req = Request::LeaseKeepAlive(LeaseKeepAliveRequest { id });
            return expect_reply!(self.forward(req).await?, Reply::LeaseKeepAlive);
        }
        let ttl = match lease_ttl(self, id).await? {
            Some((ttl, _)) => {
                self.clock
                    .lock()
                    .deadlines
                    .insert(id, Instant::now() + Duration::from_secs(ttl as u64));
                ttl
            }
            None => 0,
        };
        let rev = self.current_rev().await;
        Ok(LeaseKeepAliveResponse {
            header: Some(self.header_now(rev)),
            id,
            ttl,
        })
    }

    /// LeaseTimeToLive (answered by the leader). An unknown lease gets TTL -1, as etcd
    /// answers.
    pub async fn lease_time_to_live(
        &self,
        req: LeaseTimeToLiveRequest,
    ) -> R<LeaseTimeToLiveResponse> {
        if !self.leads() {
            return expect_reply!(
                self.forward(Request::LeaseTimeToLive(req)).await?,
                Reply::LeaseTimeToLive
            );
        }
        let id = req.id;
        let Some((_, granted)) = lease_ttl(self, id).await? else {
            let rev = self.current_rev().await;
            return Ok(LeaseTimeToLiveResponse {
                header: Some(self.header_now(rev)),
                id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            });
        };
        let remaining = self
            .clock
            .lock()
            .deadlines
            .get(&id)
            .map(|d| d.saturating_duration_since(Instant::now()).as_secs() as i64)
            .unwrap_or(granted);
        let keys = if req.keys {
            self.node()
                .read(DB, Consistency::Local, move |c| {
                    Ok(
                        c.prepare("SELECT key FROM kv_live WHERE lease = ?1 ORDER BY key")?
                            .query_map([id], |r| r.get::<_, Vec<u8>>(0))?
                            .collect::<Result<Vec<_>, _>>()?,
                    )
                })
                .await
                .map_err(decode_err)?
                .unwrap_or_default()
                .into_iter()
                .map(Bytes::from)
                .collect()
        } else {
            Vec::new()
        };
        let rev = self.current_rev().await;
        Ok(LeaseTimeToLiveResponse {
            header: Some(self.header_now(rev)),
            id,
            ttl: remaining,
            granted_ttl: granted,
            keys,
        })
    }

    /// LeaseLeases: every lease id.
    pub async fn lease_leases(&self) -> R<LeaseLeasesResponse> {
        let ids = self
            .node()
            .read(DB, Consistency::Linearizable, |c| {
                let has = crate::mvcc::has_table(c, "lease")?;
                if !has {
                    return Ok(Vec::new());
                }
                Ok(c.prepare("SELECT id FROM lease ORDER BY id")?
                    .query_map([], |r| r.get::<_, i64>(0))?
                    .collect::<Result<Vec<_>, _>>()?)
            })
            .await
            .map_err(decode_err)?
            .unwrap_or_default();
        let rev = self.current_rev().await;
        Ok(LeaseLeasesResponse {
            header: Some(self.header_now(rev)),
            leases: ids.into_iter().map(|id| LeaseStatus { id }).collect(),
        })
    }
}

/// Serves one LeaseKeepAlive stream: one answer per request.
pub async fn serve_keep_alive(
    store: Arc<EtcdStore>,
    mut reqs: tonic::Streaming<LeaseKeepAliveRequest>,
    out: mpsc::Sender<Result<LeaseKeepAliveResponse, Status>>,
) {
    while let Ok(Some(r)) = reqs.message().await {
        let resp = store.keep_alive_one(r.id).await.map_err(Status::from);
        let failed = resp.is_err();
        if out.send(resp).await.is_err() || failed {
            return;
        }
    }
}

/// Starts the leader's expiry loop (checks every 250 ms; ends when the store is dropped).
pub(crate) fn spawn_expiry(store: Weak<EtcdStore>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let Some(store) = store.upgrade() else { return };
            if !store.leads() {
                let mut c = store.clock.lock();
                c.leading = false;
                c.deadlines.clear();
                continue;
            }
            if !store.clock.lock().leading {
                // Just became leader: every live lease starts afresh at its full TTL.
                let leases = store
                    .node()
                    .read(DB, Consistency::Linearizable, |c| {
                        let has = crate::mvcc::has_table(c, "lease")?;
                        if !has {
                            return Ok(Vec::new());
                        }
                        Ok(c.prepare("SELECT id, ttl FROM lease")?
                            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?
                            .collect::<Result<Vec<_>, _>>()?)
                    })
                    .await;
                let Ok(leases) = leases else { continue };
                let now = Instant::now();
                let mut c = store.clock.lock();
                c.deadlines = leases
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(id, ttl)| (id, now + Duration::from_secs(ttl as u64)))
                    .collect();
                c.leading = true;
                continue;
            }
            let now = Instant::now();
            let expired: Vec<i64> = store
                .clock
                .lock()
                .deadlines
                .iter()
                .filter(|(_, d)| **d <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                match store.revoke_local(id).await {
                    Ok(_) | Err(EtcdError::LeaseNotFound) => {
                        store.clock.lock().deadlines.remove(&id);
                        tracing::debug!("lease {id:x} expired");
                    }
                    Err(e) => tracing::warn!("expiring lease {id:x}: {e}"),
                }
            }
        }
    });
}
