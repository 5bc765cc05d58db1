//! The calling side: a joiner's join, and membership requests sent to any member.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use raftsql_proto::v1 as pb;

use super::token::{derive, hmac, hmac_ok, parse_token};
use super::MEMBERS_SERVICE;
use crate::error::{Error, Result};
use crate::net::conn::RpcConn;
use crate::net::{Dialer, Peer};

pub use crate::net::server::JOIN_SERVICE;

/// How long a membership request is retried while no member knows a leader.
const REQUEST_RETRY_FOR: Duration = Duration::from_secs(10);
/// The pause between those retries.
const REQUEST_RETRY_PAUSE: Duration = Duration::from_millis(250);
/// How long one membership request may take (a join includes a snapshot's start).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// What a joiner needs to start: its id, the cluster's name and its members.
#[derive(Clone, Debug)]
pub struct JoinTicket {
    /// The id the cluster gave this node.
    pub id: u64,
    /// The cluster's name.
    pub cluster: String,
    /// Every member's address, this node included.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// A TLS cluster's files for this node (its certificate, the CA).
    pub tls: Option<crate::net::tls::Material>,
}

/// Joins the cluster that issued `token`, through its member at `target`: `addr` is the
/// address this node will listen on. Verifies that the answer comes from that cluster.
/// `fingerprint` (a TLS cluster's CA, from the join string) is checked during the TLS
/// handshake, before anything is sent.
pub async fn join(
    target: SocketAddr,
    token: &str,
    fingerprint: Option<[u8; 32]>,
    addr: SocketAddr,
    domain: &str,
    weight: u32,
) -> Result<JoinTicket> {
    let secret = parse_token(token)?;
    let (token_id, key) = derive(&secret);
    let nonce: [u8; 16] = rand::random();
    let (dialer, node_key, csr) = match fingerprint {
        Some(fp) => {
            let (k, csr) = crate::net::tls::node_request()?;
            (Dialer::pinned(fp), Some(k), csr)
        }
        None => (Dialer::Plain, None, Vec::new()),
    };
    let req = pb::MembershipRequest {
        req: Some(pb::membership_request::Req::Join(pb::JoinRequest {
            token_id: token_id.into(),
            nonce: nonce.to_vec().into(),
            proof: hmac(&key, &[b"join", &nonce, addr.to_string().as_bytes(), &csr]).into(),
            addr: addr.to_string(),
            domain: domain.to_string(),
            weight,
            csr: csr.into(),
        })),
    };
    let mut conn = RpcConn::connect(&dialer, Peer::Endpoint, target, 0, "", Some(addr.ip()))
        .await
        .map_err(|e| Error::Unavailable(format!("cannot reach {target}: {e}")))?;
    let body = pb::request::Body::Service(pb::ServiceCall {
        service: JOIN_SERVICE.into(),
        payload: req.encode_to_vec().into(),
    });
    let reply = match conn.call(body).await {
        Ok(pb::response::Body::Service(r)) => r.payload,
        Ok(pb::response::Body::Error(e)) => return Err(crate::client::from_pb(e)),
        Ok(_) => return Err(Error::Transport("unexpected answer to a join".into())),
        Err(e) => return Err(Error::Unavailable(format!("{target}: {e}"))),
    };
    let j = match pb::MembershipResponse::decode(reply) {
        Ok(pb::MembershipResponse {
            resp: Some(pb::membership_response::Resp::Join(j)),
        }) => j,
        _ => return Err(Error::Transport("malformed answer to a join".into())),
    };
    if !hmac_ok(
        &key,
        &[
            b"cluster",
            &nonce,
            &j.id.to_le_bytes(),
            j.cluster.as_bytes(),
            &j.cert,
            &j.ca_cert,
            &j.ca_key,
        ],
        &j.proof,
    ) {
        return Err(Error::Invalid(format!(
            "the node at {target} could not prove it belongs to the cluster that issued this \
             token: refusing to join"
        )));
    }
    let mut peers = BTreeMap::new();
    for m in &j.members {
        let a = m
            .addr
            .parse()
            .map_err(|_| Error::Transport(format!("bad member address {:?}", m.addr)))?;
        peers.insert(m.id, a);
    }
    let tls = match (fingerprint, node_key) {
        (Some(fp), Some(node_key)) => {
            let text = |b: &Bytes, what: &str| {
                String::from_utf8(b.to_vec())
                    .map_err(|_| Error::Transport(format!("the join answer's {what} is not PEM")))
            };
            if j.cert.is_empty() {
                return Err(Error::Invalid(
                    "the cluster answered without a certificate (it runs without TLS?)".into(),
                ));
            }
            let ca = crate::net::tls::ClusterCa::from_pem(
                text(&j.ca_cert, "CA")?,
                text(&j.ca_key, "CA key")?,
            )?;
            if ca.fingerprint() != fp {
                return Err(Error::Invalid(
                    "the cluster's CA does not match the join string's fingerprint".into(),
                ));
            }
            let m = crate::net::tls::Material {
                ca,
                node_cert_pem: text(&j.cert, "certificate")?,
                node_key_pem: node_key,
            };
            m.check_for(j.id)?;
            Some(m)
        }
        _ => None,
    };
    Ok(JoinTicket {
        id: j.id,
        cluster: j.cluster,
        peers,
        tls,
    })
}

/// Sends a membership request to the first of `endpoints` that answers (any member: it is
/// forwarded to the leader). For the CLI and other processes.
pub async fn request(
    dialer: &Dialer,
    endpoints: &[SocketAddr],
    cluster: &str,
    req: pb::membership_request::Req,
) -> Result<pb::membership_response::Resp> {
    let payload: Bytes = pb::MembershipRequest { req: Some(req) }
        .encode_to_vec()
        .into();
    // During an election (or right after a join) no member may know a leader for a moment:
    // retry what is safe to retry for a few seconds.
    let deadline = Instant::now() + REQUEST_RETRY_FOR;
    loop {
        match request_once(dialer, endpoints, cluster, &payload).await {
            Err(e @ (Error::Unavailable(_) | Error::NotLeader { .. }))
                if Instant::now() < deadline =>
            {
                tracing::debug!("membership request: {e}; retrying");
                tokio::time::sleep(REQUEST_RETRY_PAUSE).await;
            }
            r => return r,
        }
    }
}

async fn request_once(
    dialer: &Dialer,
    endpoints: &[SocketAddr],
    cluster: &str,
    payload: &Bytes,
) -> Result<pb::membership_response::Resp> {
    let mut last = Error::Unavailable("no endpoint given".into());
    for ep in endpoints {
        let mut conn = match RpcConn::connect(dialer, Peer::Endpoint, *ep, 0, cluster, None).await {
            Ok(c) => c,
            Err(e) => {
                last = Error::Unavailable(format!("cannot reach {ep}: {e}"));
                continue;
            }
        };
        let body = pb::request::Body::Service(pb::ServiceCall {
            service: MEMBERS_SERVICE.into(),
            payload: payload.clone(),
        });
        match tokio::time::timeout(REQUEST_TIMEOUT, conn.call(body)).await {
            Ok(Ok(pb::response::Body::Service(r))) => {
                return match pb::MembershipResponse::decode(r.payload) {
                    Ok(pb::MembershipResponse { resp: Some(resp) }) => Ok(resp),
                    _ => Err(Error::Transport("malformed membership answer".into())),
                }
            }
            Ok(Ok(pb::response::Body::Error(e))) => {
                let e = crate::client::from_pb(e);
                match e {
                    Error::Unavailable(_) | Error::NotLeader { .. } => last = e,
                    e => return Err(e),
                }
            }
            Ok(Ok(_)) => last = Error::Transport("unexpected answer".into()),
            Ok(Err(e)) => {
                last = Error::Unavailable(crate::net::dial::with_hint(format!("{ep}: {e}")))
            }
            Err(_) => last = Error::Timeout(REQUEST_TIMEOUT),
        }
    }
    Err(last)
}
