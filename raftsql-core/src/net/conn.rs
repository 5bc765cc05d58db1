//! A request/response connection to one node, one call at a time (node-to-node forwarding,
//! snapshot pulls, one-off calls). Many calls at once on one socket: `mux.rs`.

use std::io;
use std::net::{IpAddr, SocketAddr};

use raftsql_proto::v1 as pb;

use super::dial::{Dialer, Peer};
use super::frame::{encode_frame, write_frame, FrameReader, Reader, Writer};

/// A request/response connection to one node (one call at a time).
pub struct RpcConn {
    reader: FrameReader<Reader>,
    writer: Writer,
    next_id: u64,
    /// The server answered with a connection-level error (id 0) and is closing.
    refused: bool,
    /// Responses received so far.
    answered: u64,
    /// The server's refusal, if it refused this connection.
    refusal: Option<pb::Refused>,
}

impl RpcConn {
    /// Connects with `dialer` to `to` at `addr` (source address `local` when given) and
    /// says hello as `from_id` (0 for clients).
    pub async fn connect(
        dialer: &Dialer,
        to: Peer,
        addr: SocketAddr,
        from_id: u64,
        cluster: &str,
        local: Option<IpAddr>,
    ) -> io::Result<RpcConn> {
        let (r, w) = dialer
            .open_with_hello(addr, local, to, from_id, cluster)
            .await?;
        Ok(RpcConn {
            reader: FrameReader::new(r),
            writer: w,
            next_id: 1,
            refused: false,
            answered: 0,
            refusal: None,
        })
    }

    /// The server's refusal of this connection, once one arrived.
    pub fn refusal(&self) -> Option<&pb::Refused> {
        self.refusal.as_ref()
    }

    /// How many responses this connection has received.
    pub fn answered(&self) -> u64 {
        self.answered
    }

    /// True if the server has closed this connection: a request sent on it would be lost.
    pub fn is_closed(&mut self) -> bool {
        self.refused || self.reader.peer_closed()
    }

    /// Sends a request body and waits for its response.
    pub async fn call(&mut self, body: pb::request::Body) -> io::Result<pb::response::Body> {
        let id = self.next_id;
        self.next_id += 1;
        let f = pb::Frame {
            kind: Some(pb::frame::Kind::Request(pb::Request {
                id,
                body: Some(body),
            })),
        };
        write_frame(&mut self.writer, &encode_frame(&f)).await?;
        loop {
            match self.reader.next().await? {
                Some(pb::Frame {
                    kind: Some(pb::frame::Kind::Response(r)),
                }) if r.id == id || r.id == 0 => {
                    self.refused |= r.id == 0;
                    self.answered += 1;
                    return r.body.ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "empty response")
                    });
                }
                Some(pb::Frame {
                    kind: Some(pb::frame::Kind::Refused(r)),
                }) => {
                    self.refused = true;
                    let e = io::Error::new(io::ErrorKind::PermissionDenied, r.reason.clone());
                    self.refusal = Some(r);
                    return Err(e);
                }
                Some(_) => continue,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed",
                    ))
                }
            }
        }
    }
}
