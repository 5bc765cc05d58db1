//! Requests a follower sends on to the leader: forwarded writes and service calls, over a
//! pool of connections to the leader; the follower then catches up to what the leader
//! applied, so its caller reads its own write there.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use raftsql_proto::v1 as pb;

use super::handler::error_response;
use super::Shared;
use crate::error::{Error, Result};
use crate::net::conn::RpcConn;
use crate::net::{Dialer, Peer};

/// How long a follower waits to apply what the leader had applied when it answered a
/// forwarded request, before answering anyway.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

impl Shared {
    /// How this node dials its peers.
    pub(super) fn dialer(&self) -> Dialer {
        self.transport
            .lock()
            .as_ref()
            .map(|t| t.dialer().clone())
            .unwrap_or_default()
    }

    /// A pooled connection to the leader, with its address.
    async fn leader_conn(&self) -> Result<(SocketAddr, RpcConn)> {
        let leader = self.raft_status.lock().leader_id;
        let addr = self.peers.lock().get(&leader).copied();
        let Some(addr) = addr.filter(|_| leader != 0) else {
            return Err(Error::Unavailable(
                "no leader is known right now (an election may be in progress)".into(),
            ));
        };
        let pooled = self
            .forward_pool
            .lock()
            .get_mut(&addr)
            .and_then(|v| v.pop());
        if let Some(mut c) = pooled {
            if !c.is_closed() {
                return Ok((addr, c));
            }
        }
        let c = RpcConn::connect(
            &self.dialer(),
            Peer::Node(leader),
            addr,
            self.cfg.id,
            &self.cfg.cluster,
            Some(self.cfg.listen.ip()),
        )
        .await
        .map_err(|e| Error::Unavailable(format!("cannot reach the leader at {addr}: {e}")))?;
        Ok((addr, c))
    }

    pub(super) async fn call_leader(&self, service: &str, payload: Bytes) -> Result<Bytes> {
        if self.leads() {
            let h = self.services.read().get(service).map(|(h, _)| h.clone());
            let h =
                h.ok_or_else(|| Error::Invalid(format!("no service {service:?} on this node")))?;
            return h.call(payload).await;
        }
        let (addr, mut conn) = self.leader_conn().await?;
        let body = pb::request::Body::Service(pb::ServiceCall {
            service: service.to_string(),
            payload,
        });
        match conn.call(body).await {
            Ok(pb::response::Body::Service(r)) => {
                self.forward_pool.lock().entry(addr).or_default().push(conn);
                self.catch_up_to(r.applied).await;
                Ok(r.payload)
            }
            Ok(pb::response::Body::Error(e)) => {
                self.forward_pool.lock().entry(addr).or_default().push(conn);
                Err(crate::client::from_pb(e))
            }
            Ok(_) => Err(Error::Transport("unexpected response".into())),
            Err(_) => Err(Error::OutcomeUnknown),
        }
    }

    /// Sends a write that reached this follower to the leader and relays the answer.
    pub(super) async fn forward_execute(&self, mut req: pb::ExecuteRequest) -> pb::Response {
        let leader = self.raft_status.lock().leader_id;
        let addr = self.peers.lock().get(&leader).copied();
        let Some(addr) = addr.filter(|_| leader != 0 && leader != self.cfg.id) else {
            return error_response(
                0,
                &Error::Unavailable(
                    "no leader is known right now (an election may be in progress)".into(),
                ),
            );
        };
        req.forwarded = true;
        let pooled = self
            .forward_pool
            .lock()
            .get_mut(&addr)
            .and_then(|v| v.pop());
        let mut conn = match pooled {
            Some(c) => c,
            None => match RpcConn::connect(
                &self.dialer(),
                Peer::Node(leader),
                addr,
                self.cfg.id,
                &self.cfg.cluster,
                Some(self.cfg.listen.ip()),
            )
            .await
            {
                Ok(c) => c,
                Err(e) => {
                    return error_response(
                        0,
                        &Error::Unavailable(format!("cannot reach the leader at {addr}: {e}")),
                    )
                }
            },
        };
        if conn.is_closed() {
            match RpcConn::connect(
                &self.dialer(),
                Peer::Node(leader),
                addr,
                self.cfg.id,
                &self.cfg.cluster,
                Some(self.cfg.listen.ip()),
            )
            .await
            {
                Ok(c) => conn = c,
                Err(e) => {
                    return error_response(
                        0,
                        &Error::Unavailable(format!("cannot reach the leader at {addr}: {e}")),
                    )
                }
            }
        }
        match conn.call(pb::request::Body::Execute(req)).await {
            Ok(body) => {
                self.forward_pool.lock().entry(addr).or_default().push(conn);
                let body = match body {
                    pb::response::Body::Execute(mut r) => {
                        r.leader_addr = addr.to_string();
                        self.catch_up_to(r.applied).await;
                        pb::response::Body::Execute(r)
                    }
                    other => other,
                };
                pb::Response {
                    id: 0,
                    body: Some(body),
                }
            }
            // Sent, but no answer: the leader may or may not have run it.
            Err(_) => error_response(0, &Error::OutcomeUnknown),
        }
    }

    /// After a forwarded write: waits (boundedly) until this node has applied what the leader
    /// had applied when it answered, so that the caller reads its own write here. The write
    /// is committed either way; if this node is cut off from the leader, the answer goes out
    /// after the wait and only local reads may lag.
    async fn catch_up_to(&self, index: u64) {
        let mut rx = self.applied_rx.clone();
        let _ = tokio::time::timeout(CATCH_UP_WAIT, rx.wait_for(|a| *a >= index)).await;
    }
}
