//! The membership services: [`super::MEMBERS_SERVICE`] and the join service on every node,
//! the leader's service, and removal notices.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use raftsql_proto::v1 as pb;

use super::keeper::Keeper;
use super::ops::{admit, cluster, leave, removal_confirmed, remove};
use super::token::create_token;
use super::{LEADER_SERVICE, NOTICE_SERVICE};
use crate::error::{Error, Result};
use crate::node::{ServiceHandler, WeakNode};

/// Runs on every node: membership requests go to the leader, except a node's own `leave`.
pub(super) struct Entry {
    pub(super) node: WeakNode,
    pub(super) join_only: bool,
}

impl ServiceHandler for Entry {
    fn call(
        &self,
        payload: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes>> + Send>> {
        let node = self.node.upgrade();
        let join_only = self.join_only;
        Box::pin(async move {
            let node = node.ok_or(Error::Shutdown)?;
            let req = pb::MembershipRequest::decode(payload.clone())
                .map_err(|e| Error::Invalid(format!("membership request: {e}")))?;
            match req.req {
                Some(pb::membership_request::Req::Join(_)) => {}
                _ if join_only => {
                    return Err(Error::Invalid("only a join may be sent here".into()))
                }
                Some(pb::membership_request::Req::Removed(_)) => {
                    return Err(Error::Invalid(format!(
                        "a removal notice goes to {NOTICE_SERVICE}, which only members may call"
                    )))
                }
                Some(pb::membership_request::Req::Remove(r)) if r.leaving => {
                    let report = leave(&node, r.force).await?;
                    return Ok(encode(pb::membership_response::Resp::Remove(
                        pb::RemoveResponse { report },
                    )));
                }
                _ => {}
            }
            node.call_leader(LEADER_SERVICE, payload).await
        })
    }
}

/// Runs on every node, for members only: the leader's notice that it removed this node.
pub(super) struct Notice(pub(super) WeakNode);

impl ServiceHandler for Notice {
    fn call(
        &self,
        payload: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes>> + Send>> {
        let node = self.0.upgrade();
        Box::pin(async move {
            let node = node.ok_or(Error::Shutdown)?;
            let Ok(pb::MembershipRequest {
                req: Some(pb::membership_request::Req::Removed(n)),
            }) = pb::MembershipRequest::decode(payload)
            else {
                return Err(Error::Invalid("expected a removal notice".into()));
            };
            if n.id != node.id() {
                return Err(Error::Invalid(format!(
                    "removal notice for node {}, but this is node {}",
                    n.id,
                    node.id()
                )));
            }
            // Without TLS any process can claim to be a member: believe the notice only
            // once the cluster itself confirms that this node is no longer a member.
            if !removal_confirmed(&node).await {
                tracing::warn!(
                    "ignored a removal notice that no member confirms (this node is still a \
                     member, or no member answered)"
                );
                return Err(Error::Invalid(
                    "removal not confirmed by the cluster".into(),
                ));
            }
            tracing::warn!("the leader removed this node from the cluster");
            node.mark_departed(format!("node {} was removed from the cluster", n.id));
            Ok(encode(pb::membership_response::Resp::Remove(
                pb::RemoveResponse {
                    report: format!("node {} stops", n.id),
                },
            )))
        })
    }
}

fn encode(r: pb::membership_response::Resp) -> Bytes {
    pb::MembershipResponse { resp: Some(r) }
        .encode_to_vec()
        .into()
}

/// Runs on the leader.
pub(super) struct Leader(pub(super) WeakNode, pub(super) Arc<Keeper>);

impl ServiceHandler for Leader {
    fn call(
        &self,
        payload: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes>> + Send>> {
        let node = self.0.upgrade();
        let keeper = self.1.clone();
        Box::pin(async move {
            use pb::membership_request::Req;
            use pb::membership_response::Resp;
            let node = node.ok_or(Error::Shutdown)?;
            if !node.is_leader() {
                return Err(Error::NotLeader {
                    leader_id: None,
                    leader_addr: None,
                });
            }
            let req = pb::MembershipRequest::decode(payload)
                .map_err(|e| Error::Invalid(format!("membership request: {e}")))?;
            let resp = match req.req {
                Some(Req::CreateToken(r)) => Resp::CreateToken(create_token(&node, r).await?),
                Some(Req::Join(r)) => Resp::Join(admit(&node, r).await?),
                Some(Req::Cluster(_)) => Resp::Cluster(cluster(&node, &keeper).await?),
                Some(Req::Remove(r)) => Resp::Remove(pb::RemoveResponse {
                    report: remove(&node, &keeper, r.id, r.force, r.leaving).await?,
                }),
                Some(Req::Removed(_)) => {
                    return Err(Error::Invalid(
                        "a removal notice goes to the removed node".into(),
                    ))
                }
                None => return Err(Error::Invalid("empty membership request".into())),
            };
            Ok(encode(resp))
        })
    }
}
