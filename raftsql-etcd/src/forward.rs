//! Writes that reach a follower run on the leader. The follower sends one
//! [`Forwarded`] message (a `oneof` of the etcd requests that write) through the node service
//! [`SERVICE`] ([`raftsql_core::Node::call_leader`]); the leader's [`Service`] runs it on its
//! own store and answers one [`ForwardedReply`]. etcd's errors travel as core application
//! errors (`error.rs`: `encode_err` / `decode_err`), so the follower's client sees etcd's code and
//! message.

use std::sync::Weak;

use bytes::Bytes;
use prost::Message;
use raftsql_core::Error as CoreError;

use crate::error::{decode_err, encode_err, EtcdError, R};
use crate::pb::raftsql::etcd::{forwarded, forwarded_reply, ClientUrls};
use crate::store::EtcdStore;

pub(crate) use crate::pb::raftsql::etcd::{Forwarded, ForwardedReply};

/// The node service the leader runs them under.
pub(crate) const SERVICE: &str = "etcd";

pub(crate) use forwarded::Request;
pub(crate) use forwarded_reply::Reply;

impl EtcdStore {
    /// Runs `req` on the leader's store and returns its reply.
    pub(crate) async fn forward(&self, req: Request) -> R<Reply> {
        let payload = Forwarded { request: Some(req) }.encode_to_vec();
        let reply = self
            .node()
            .call_leader(SERVICE, Bytes::from(payload))
            .await
            .map_err(decode_err)?;
        ForwardedReply::decode(reply)
            .map_err(|e| EtcdError::Internal(format!("undecodable reply from the leader: {e}")))?
            .reply
            .ok_or_else(|| EtcdError::Internal("empty reply from the leader".into()))
    }
}

/// The reply a forwarded request must get, or an internal error naming what came instead.
macro_rules! expect_reply {
    ($reply:expr, $variant:path) => {
        match $reply {
            $variant(r) => Ok(r),
            other => Err($crate::error::EtcdError::Internal(format!(
                "the leader answered a forwarded {} with {other:?}",
                stringify!($variant)
            ))),
        }
    };
}
pub(crate) use expect_reply;

/// The leader's side: runs what followers forward.
pub(crate) struct Service(pub(crate) Weak<EtcdStore>);

impl raftsql_core::ServiceHandler for Service {
    fn call(
        &self,
        payload: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, CoreError>> + Send>> {
        let store = self.0.upgrade();
        Box::pin(async move {
            let store = store.ok_or(CoreError::Shutdown)?;
            let req = Forwarded::decode(payload)
                .map_err(|e| CoreError::Invalid(format!("undecodable etcd request: {e}")))?
                .request
                .ok_or_else(|| CoreError::Invalid("empty etcd request".into()))?;
            let reply = run(&store, req).await.map_err(encode_err)?;
            Ok(Bytes::from(
                ForwardedReply { reply: Some(reply) }.encode_to_vec(),
            ))
        })
    }
}

/// Runs one forwarded request on this (the leader's) store.
async fn run(store: &EtcdStore, req: Request) -> R<Reply> {
    Ok(match req {
        Request::Put(r) => Reply::Put(store.put_local(r).await?),
        Request::DeleteRange(r) => Reply::DeleteRange(store.delete_local(r).await?),
        Request::Txn(r) => Reply::Txn(store.txn_local(r).await?),
        Request::Compact(r) => Reply::Compacted(store.compact_local(r).await?),
        Request::LeaseGrant(r) => Reply::LeaseGrant(store.lease_grant(r).await?),
        Request::LeaseRevoke(r) => Reply::LeaseRevoke(store.lease_revoke(r).await?),
        Request::LeaseKeepAlive(r) => Reply::LeaseKeepAlive(store.keep_alive_one(r.id).await?),
        Request::LeaseTimeToLive(r) => Reply::LeaseTimeToLive(store.lease_time_to_live(r).await?),
        Request::ClientUrls(ClientUrls { member_id, urls }) => {
            crate::members::record_local(store, member_id, &urls)
                .await
                .map_err(decode_err)?;
            Reply::ClientUrls(true)
        }
    })
}
