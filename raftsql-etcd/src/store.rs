//! The etcd store: [`EtcdStore`] runs etcd's requests on a raftsql node. Writes run as
//! [`raftsql_core::Node::write`] closures on the leader (a follower forwards them,
//! `forward.rs`), reads as [`raftsql_core::Node::read`] closures at the consistency the
//! request asks; both call the pure functions of `mvcc/` on the connection they get.
//! Every write runs inside the group-commit transaction, so concurrent requests share one
//! Raft entry and still each get their own revision, exactly as if run one after another.

use bytes::Bytes;
use raftsql_core::{Consistency, Node};
use rusqlite::Connection;

use crate::error::{decode_err, encode_err, EtcdError, R};
use crate::forward::{expect_reply, Reply, Request};
use crate::mvcc::*;
use crate::pb::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};

/// The raftsql database holding the etcd data.
pub const DB: &str = "etcd";

/// etcd's KV service on a raftsql node.
#[derive(Clone)]
pub struct EtcdStore {
    node: Node,
    /// Reported in response headers.
    pub cluster_id: u64,
    /// Lease deadlines, kept by the leader only (see `lease.rs`).
    pub(crate) clock: std::sync::Arc<parking_lot::Mutex<crate::lease::LeaseClock>>,
    /// Tunables.
    pub(crate) options: EtcdOptions,
    /// The watch fan-out, started by the first watch (`hub.rs`). Shared by the store's
    /// clones (each Watch stream serves a clone): one hub, one read per applied change, for
    /// every stream of the node.
    hub: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<crate::hub::Hub>>>,
}

/// Tunables of the etcd facade, with etcd's defaults.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// How long a watch that asked for progress notifications may stay silent before it is
    /// sent one (etcd's `--experimental-watch-progress-notify-interval`, default 10 minutes).
    pub progress_notify_interval: std::time::Duration,
    /// The client URLs this member advertises in MemberList (etcd's
    /// `--advertise-client-urls`), e.g. `https://10.0.0.1:2379`. Clients that sync their
    /// endpoints from MemberList (etcdctl `--endpoints` auto-sync, clientv3 `AutoSyncInterval`)
    /// use them; every member records its own in the replicated `etcd` database.
    pub advertise_client_urls: Vec<String>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            progress_notify_interval: std::time::Duration::from_secs(600),
            advertise_client_urls: Vec::new(),
        }
    }
}

/// The header etcd puts on every response.
pub fn header(cluster_id: u64, node: &Node, revision: i64) -> ResponseHeader {
    ResponseHeader {
        cluster_id,
        member_id: node.id(),
        revision,
        raft_term: node.term(),
    }
}

impl EtcdStore {
    /// A store on `node` (creates the schema on first write), registered with the node so
    /// that followers can forward writes to it when this node leads.
    pub fn new(node: Node, cluster_id: u64) -> std::sync::Arc<EtcdStore> {
        Self::with_options(node, cluster_id, EtcdOptions::default())
    }

    /// [`EtcdStore::new`] with non-default tunables.
    pub fn with_options(
        node: Node,
        cluster_id: u64,
        options: EtcdOptions,
    ) -> std::sync::Arc<EtcdStore> {
        let store = std::sync::Arc::new(EtcdStore {
            node,
            cluster_id,
            clock: Default::default(),
            options,
            hub: Default::default(),
        });
        store.node.register_service(
            crate::forward::SERVICE,
            std::sync::Arc::new(crate::forward::Service(std::sync::Arc::downgrade(&store))),
        );
        crate::lease::spawn_expiry(std::sync::Arc::downgrade(&store));
        crate::members::spawn_record(
            std::sync::Arc::downgrade(&store),
            store.options.advertise_client_urls.clone(),
        );
        store
    }

    /// The watch fan-out (started on first use, inside the runtime serving the watches).
    pub(crate) fn hub(&self) -> &std::sync::Arc<crate::hub::Hub> {
        self.hub
            .get_or_init(|| crate::hub::Hub::start(self.node.clone()))
    }

    pub(crate) fn leads(&self) -> bool {
        self.node.is_leader()
    }

    /// The node under the store.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The store's revision as this node has applied it (1 while the store is empty).
    pub async fn current_rev(&self) -> i64 {
        self.node
            .read(DB, Consistency::Local, |c| {
                if !has_table(c, "meta")? {
                    return Ok(1);
                }
                meta(c, "rev", 1).map_err(encode_err)
            })
            .await
            .ok()
            .flatten()
            .unwrap_or(1)
    }

    /// The response header for `revision` (this node as member, its current term).
    pub fn header_now(&self, revision: i64) -> ResponseHeader {
        self.header(revision)
    }

    fn header(&self, revision: i64) -> ResponseHeader {
        header(self.cluster_id, &self.node, revision)
    }

    /// Runs `f` as one write transaction of the store (schema ensured first).
    pub(crate) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &mut WriteTxn) -> R<T> + Send + 'static,
    ) -> R<(T, i64)> {
        self.node
            .write(DB, move |c| {
                ensure_schema(c)?;
                let mut t = WriteTxn::begin(c).map_err(encode_err)?;
                let out = f(c, &mut t).map_err(encode_err)?;
                let rev = t.finish(c).map_err(encode_err)?;
                Ok((out, rev))
            })
            .await
            .map_err(decode_err)
    }

    /// Range.
    pub async fn range(&self, req: RangeRequest) -> R<RangeResponse> {
        let local = req.serializable;
        let r = self
            .node
            .read(
                DB,
                if local {
                    Consistency::Local
                } else {
                    Consistency::Linearizable
                },
                move |c| {
                    let has_schema: bool = crate::mvcc::has_table(c, "meta")?;
                    if !has_schema {
                        if req.revision > 1 {
                            return Err(encode_err(EtcdError::FutureRev));
                        }
                        return Ok(RangeResponse {
                            header: None,
                            kvs: Vec::new(),
                            more: false,
                            count: 0,
                        });
                    }
                    let current = meta(c, "rev", 1).map_err(encode_err)?;
                    let mut resp = range(c, &req, current).map_err(encode_err)?;
                    resp.header = Some(ResponseHeader {
                        revision: current,
                        ..Default::default()
                    });
                    Ok(resp)
                },
            )
            .await
            .map_err(decode_err)?;
        let mut resp = match r {
            Some(r) => r,
            None => RangeResponse {
                header: None,
                kvs: Vec::new(),
                more: false,
                count: 0,
            },
        };
        let rev = resp.header.as_ref().map_or(1, |h| h.revision.max(1));
        resp.header = Some(self.header(rev));
        Ok(resp)
    }

    /// Put (forwarded to the leader from a follower).
    pub async fn put(&self, req: PutRequest) -> R<PutResponse> {
        check_size(&req)?;
        if !self.leads() {
            return expect_reply!(self.forward(Request::Put(req)).await?, Reply::Put);
        }
        self.put_local(req).await
    }

    pub(crate) async fn put_local(&self, req: PutRequest) -> R<PutResponse> {
        let (mut resp, rev) = self.write(move |c, t| put(c, t, &req)).await?;
        resp.header = Some(self.header(rev));
        Ok(resp)
    }

    /// DeleteRange (forwarded to the leader from a follower).
    pub async fn delete_range(&self, req: DeleteRangeRequest) -> R<DeleteRangeResponse> {
        if !self.leads() {
            return expect_reply!(
                self.forward(Request::DeleteRange(req)).await?,
                Reply::DeleteRange
            );
        }
        self.delete_local(req).await
    }

    pub(crate) async fn delete_local(&self, req: DeleteRangeRequest) -> R<DeleteRangeResponse> {
        let (mut resp, rev) = self.write(move |c, t| delete_range(c, t, &req)).await?;
        resp.header = Some(self.header(rev));
        Ok(resp)
    }

    /// Txn (forwarded to the leader from a follower).
    pub async fn txn(&self, req: TxnRequest) -> R<TxnResponse> {
        check_size(&req)?;
        if !self.leads() {
            check_txn(&req)?;
            return expect_reply!(self.forward(Request::Txn(req)).await?, Reply::Txn);
        }
        self.txn_local(req).await
    }

    pub(crate) async fn txn_local(&self, req: TxnRequest) -> R<TxnResponse> {
        check_txn(&req)?;
        let (mut resp, rev) = self.write(move |c, t| txn(c, t, &req)).await?;
        set_headers(&mut resp, &self.header(rev));
        Ok(resp)
    }

    /// Compact: records the compaction revision (reads below it fail from now on), then
    /// removes the history it makes unreachable, in small batches so writes keep flowing.
    pub async fn compact(&self, req: CompactionRequest) -> R<i64> {
        if !self.leads() {
            return expect_reply!(self.forward(Request::Compact(req)).await?, Reply::Compacted);
        }
        self.compact_local(req).await
    }

    pub(crate) async fn compact_local(&self, req: CompactionRequest) -> R<i64> {
        let target = req.revision;
        let (done, rev) = self
            .write(move |c, _t| {
                let current = meta(c, "rev", 1)?;
                if target > current {
                    return Err(EtcdError::FutureRev);
                }
                if target <= meta(c, "compact_rev", 0)? {
                    return Err(EtcdError::Compacted);
                }
                set_meta(c, "compact_rev", target)?;
                meta(c, "compact_done", 0)
            })
            .await?;
        // Remove, below the target, every row that a newer row at or below the target
        // supersedes, and the deletions that end a key's history; 1,000 revisions a write.
        // The work starts where the last compaction's ended (`compact_done`): below it every
        // key has at most one row left (invariant below), so only the rows since, and those
        // survivors of the keys written since, can have become unreachable. A compaction's
        // cost is the history written since the previous one, not the cluster's age.
        let mut lo = done;
        while lo < target {
            let hi = (lo + 1000).min(target);
            self.write(move |c, _t| {
                prune_history(c, lo, hi, target)?;
                Ok(())
            })
            .await?;
            lo = hi;
        }
        Ok(rev)
    }
}

#[tonic::async_trait]
impl crate::server::Backend for EtcdStore {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, tonic::Status> {
        Ok(EtcdStore::range(self, req).await?)
    }
    async fn range_stream(
        &self,
        req: RangeRequest,
    ) -> Result<
        crate::server::ResponseStream<crate::pb::etcdserverpb::RangeStreamResponse>,
        tonic::Status,
    > {
        let chunks = EtcdStore::range_stream(self, req).await?;
        let stream = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(chunks),
            |c| c.map_err(tonic::Status::from),
        );
        Ok(Box::pin(stream))
    }
    async fn put(&self, req: PutRequest) -> Result<PutResponse, tonic::Status> {
        Ok(EtcdStore::put(self, req).await?)
    }
    async fn delete_range(
        &self,
        req: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, tonic::Status> {
        Ok(EtcdStore::delete_range(self, req).await?)
    }
    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, tonic::Status> {
        Ok(EtcdStore::txn(self, req).await?)
    }
    async fn compact(
        &self,
        req: crate::pb::etcdserverpb::CompactionRequest,
    ) -> Result<crate::pb::etcdserverpb::CompactionResponse, tonic::Status> {
        let rev = EtcdStore::compact(self, req).await?;
        Ok(crate::pb::etcdserverpb::CompactionResponse {
            header: Some(self.header(rev)),
        })
    }
    async fn status(
        &self,
        req: crate::pb::etcdserverpb::StatusRequest,
    ) -> Result<crate::pb::etcdserverpb::StatusResponse, tonic::Status> {
        let _ = req;
        Ok(EtcdStore::status(self).await?)
    }
    async fn member_list(
        &self,
        req: crate::pb::etcdserverpb::MemberListRequest,
    ) -> Result<crate::pb::etcdserverpb::MemberListResponse, tonic::Status> {
        let _ = req;
        Ok(EtcdStore::member_list(self).await?)
    }
    async fn snapshot(
        &self,
        req: crate::pb::etcdserverpb::SnapshotRequest,
    ) -> Result<
        crate::server::ResponseStream<crate::pb::etcdserverpb::SnapshotResponse>,
        tonic::Status,
    > {
        let _ = req;
        let (total, chunks) = self.snapshot_stream().await?;
        let header = self.header_now(self.current_rev().await);
        let mut sent = 0u64;
        let stream = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(chunks),
            move |c| {
                let c = c?;
                sent += c.len() as u64;
                Ok(crate::pb::etcdserverpb::SnapshotResponse {
                    header: Some(header),
                    remaining_bytes: total.saturating_sub(sent),
                    blob: Bytes::from(c),
                })
            },
        );
        Ok(Box::pin(stream))
    }
    async fn alarm(
        &self,
        req: crate::pb::etcdserverpb::AlarmRequest,
    ) -> Result<crate::pb::etcdserverpb::AlarmResponse, tonic::Status> {
        let _ = req;
        Ok(EtcdStore::alarm(self).await?)
    }
    async fn defragment(
        &self,
        req: crate::pb::etcdserverpb::DefragmentRequest,
    ) -> Result<crate::pb::etcdserverpb::DefragmentResponse, tonic::Status> {
        let _ = req;
        Ok(EtcdStore::defragment(self).await?)
    }
    async fn hash_kv(
        &self,
        req: crate::pb::etcdserverpb::HashKvRequest,
    ) -> Result<crate::pb::etcdserverpb::HashKvResponse, tonic::Status> {
        Ok(EtcdStore::hash_kv(self, req.revision).await?)
    }
    async fn hash(
        &self,
        req: crate::pb::etcdserverpb::HashRequest,
    ) -> Result<crate::pb::etcdserverpb::HashResponse, tonic::Status> {
        let _ = req;
        Ok(EtcdStore::hash(self).await?)
    }
    async fn lease_grant(
        &self,
        req: crate::pb::etcdserverpb::LeaseGrantRequest,
    ) -> Result<crate::pb::etcdserverpb::LeaseGrantResponse, tonic::Status> {
        Ok(EtcdStore::lease_grant(self, req).await?)
    }
    async fn lease_revoke(
        &self,
        req: crate::pb::etcdserverpb::LeaseRevokeRequest,
    ) -> Result<crate::pb::etcdserverpb::LeaseRevokeResponse, tonic::Status> {
        Ok(EtcdStore::lease_revoke(self, req).await?)
    }
    async fn lease_time_to_live(
        &self,
        req: crate::pb::etcdserverpb::LeaseTimeToLiveRequest,
    ) -> Result<crate::pb::etcdserverpb::LeaseTimeToLiveResponse, tonic::Status> {
        Ok(EtcdStore::lease_time_to_live(self, req).await?)
    }
    async fn lease_leases(
        &self,
        req: crate::pb::etcdserverpb::LeaseLeasesRequest,
    ) -> Result<crate::pb::etcdserverpb::LeaseLeasesResponse, tonic::Status> {
        let _ = req;
        Ok(EtcdStore::lease_leases(self).await?)
    }
    async fn lease_keep_alive(
        &self,
        reqs: tonic::Streaming<crate::pb::etcdserverpb::LeaseKeepAliveRequest>,
    ) -> Result<
        crate::server::ResponseStream<crate::pb::etcdserverpb::LeaseKeepAliveResponse>,
        tonic::Status,
    > {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(crate::lease::serve_keep_alive(
            std::sync::Arc::new(self.clone()),
            reqs,
            tx,
        ));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
    fn has_leader(&self) -> bool {
        self.has_leader_now()
    }
    fn election_timeout(&self) -> std::time::Duration {
        let cfg = self.node.config();
        cfg.tick * cfg.election_ticks as u32
    }
    async fn http_get(&self, path: &str, query: &str) -> Option<crate::http::HttpAnswer> {
        self.http_answer(path, query).await
    }
    async fn watch(
        &self,
        reqs: tonic::Streaming<crate::pb::etcdserverpb::WatchRequest>,
    ) -> Result<crate::server::ResponseStream<crate::pb::etcdserverpb::WatchResponse>, tonic::Status>
    {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(crate::watch::serve_stream(
            std::sync::Arc::new(self.clone()),
            reqs,
            tx,
        ));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
