//! Requests a follower sends on to the leader: forwarded writes and service calls, over one
//! multiplexed connection to the leader; the follower then catches up to what the leader
//! applied, so its caller reads its own write there.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use raftsql_proto::v1 as pb;

use super::handler::error_response;
use super::Shared;
use crate::error::{Error, Result};
use crate::net::mux::{CallError, MuxConn};
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

    /// The connection to the leader (shared by every forwarded request: calls are
    /// multiplexed), with its address; opened now if there is none or the leader closed it.
    async fn leader_conn(&self) -> Result<(SocketAddr, MuxConn)> {
        let leader = self.raft_status.lock().leader_id;
        let addr = self.peers.lock().get(&leader).copied();
        let Some(addr) = addr.filter(|_| leader != 0 && leader != self.cfg.id) else {
            return Err(Error::Unavailable(
                "no leader is known right now (an election may be in progress)".into(),
            ));
        };
        let dialer = self.dialer();
        let connect = || {
            MuxConn::connect(
                &dialer,
                Peer::Node(leader),
                addr,
                self.cfg.id,
                &self.cfg.cluster,
                Some(self.cfg.listen.ip()),
            )
        };
        let c = self
            .leader_conns
            .get_or_connect(addr, connect)
            .await
            .map_err(|e| Error::Unavailable(format!("cannot reach the leader at {addr}: {e}")))?;
        Ok((addr, c))
    }

    /// Sends `body` to the leader: a request the connection lost before sending it is
    /// Unavailable (retry), one lost after is OutcomeUnknown.
    async fn call_on_leader(
        &self,
        body: pb::request::Body,
    ) -> Result<(SocketAddr, pb::response::Body)> {
        let (addr, conn) = self.leader_conn().await?;
        match conn.call(body).await {
            Ok(b) => Ok((addr, b)),
            Err(CallError::NotSent(e)) => Err(Error::Unavailable(format!(
                "the connection to the leader at {addr} closed: {e}"
            ))),
            // Sent, but no answer: the leader may or may not have run it.
            Err(CallError::Lost(_)) => Err(Error::OutcomeUnknown),
        }
    }

    pub(super) async fn call_leader(&self, service: &str, payload: Bytes) -> Result<Bytes> {
        if self.leads() {
            let h = self.services.read().get(service).map(|(h, _)| h.clone());
            let h =
                h.ok_or_else(|| Error::Invalid(format!("no service {service:?} on this node")))?;
            return h.call(payload).await;
        }
        let body = pb::request::Body::Service(pb::ServiceCall {
            service: service.to_string(),
            payload,
        });
        match self.call_on_leader(body).await? {
            (_, pb::response::Body::Service(r)) => {
                self.catch_up_to(r.applied).await;
                Ok(r.payload)
            }
            (_, pb::response::Body::Error(e)) => Err(crate::client::from_pb(e)),
            _ => Err(Error::Transport("unexpected response".into())),
        }
    }

    /// Sends a write that reached this follower to the leader and relays the answer.
    pub(super) async fn forward_execute(&self, mut req: pb::ExecuteRequest) -> pb::Response {
        req.forwarded = true;
        match self.call_on_leader(pb::request::Body::Execute(req)).await {
            Ok((addr, body)) => {
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
            Err(e) => error_response(0, &e),
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
