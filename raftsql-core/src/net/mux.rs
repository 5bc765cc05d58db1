//! A multiplexed request/response connection to one node: many calls in flight at once on one
//! socket, each answer matched to its call by the request id (the server answers in any
//! order, up to [`super::server::MAX_IN_FLIGHT`] at a time per connection).
//!
//! ```text
//!  call() ──► pending[id] = oneshot ──► out queue ──► writer task ──► socket
//!  call() ◄── oneshot ◄── reader task (Response{id}) ◄──────────────── socket
//! ```
//!
//! Invariants:
//! - Every call is answered exactly once: by its response, by the connection's failure (the
//!   reader or writer task ends, failing every pending call), or by being dropped (its entry
//!   is removed). A call is registered only while the connection is open, under the same
//!   lock that closing takes, so no call waits on a connection that has already failed.
//! - A connection-level answer (response id 0: the server refuses the connection, e.g. a
//!   request over the size limit) or a `Refused` frame answers every pending call and closes
//!   the connection.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use raftsql_proto::v1 as pb;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use super::dial::{Dialer, Peer};
use super::frame::{encode_frame, FrameReader, Reader, Writer};

/// Frames queued for the writer task before callers wait (backpressure).
const OUT_QUEUE: usize = 1024;

type Answer = io::Result<pb::response::Body>;

/// Why a call got no response.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The connection was closed before the request was sent: it did not reach the node.
    #[error("{0}")]
    NotSent(#[source] io::Error),
    /// The connection failed after the request was queued: it may or may not have reached
    /// the node (for a write: its outcome is unknown).
    #[error("{0}")]
    Lost(#[source] io::Error),
}

impl CallError {
    /// The underlying I/O error.
    pub fn io(&self) -> &io::Error {
        match self {
            CallError::NotSent(e) | CallError::Lost(e) => e,
        }
    }

    /// The kind of the underlying I/O error.
    pub fn kind(&self) -> io::ErrorKind {
        self.io().kind()
    }
}

/// A multiplexed connection to one node; cheap to clone (clones share the socket).
#[derive(Clone)]
pub struct MuxConn {
    shared: Arc<Shared>,
    out: mpsc::Sender<bytes::Bytes>,
}

struct Shared {
    next_id: AtomicU64,
    /// Responses received so far.
    answered: AtomicU64,
    /// Mirrors `State::closed` (set under the state lock), for the check before each call.
    is_closed: AtomicBool,
    state: Mutex<State>,
}

/// A call waiting for its answer, and the size of its request frame.
type Pending = (oneshot::Sender<Answer>, usize);

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// Set once, when the connection failed or was refused; no call is registered after.
    closed: Option<(io::ErrorKind, String)>,
}

impl State {
    /// Marks the connection closed (first reason wins) and takes the pending calls.
    fn close(&mut self, flag: &AtomicBool, kind: io::ErrorKind, msg: String) -> Vec<Pending> {
        self.closed.get_or_insert((kind, msg));
        flag.store(true, Ordering::Release);
        self.pending.drain().map(|(_, p)| p).collect()
    }
}

impl Shared {
    /// Closes the connection (first reason wins) and fails every pending call with it.
    fn close(&self, kind: io::ErrorKind, msg: String) {
        let (pending, (kind, msg)) = {
            let mut s = self.state.lock();
            let pending = s.close(&self.is_closed, kind, msg);
            (pending, s.closed.clone().expect("just closed"))
        };
        for (tx, _) in pending {
            let _ = tx.send(Err(io::Error::new(kind, msg.clone())));
        }
    }
}

/// Removes a call's entry if its future is dropped before the answer came.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
    /// False once the answer came (its entry is gone already).
    armed: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.state.lock().pending.remove(&self.id);
        }
    }
}

impl MuxConn {
    /// Connects with `dialer` to `to` at `addr` (source address `local` when given), says
    /// hello as `from_id` (0 for clients), and starts the connection's reader and writer tasks.
    pub async fn connect(
        dialer: &Dialer,
        to: Peer,
        addr: SocketAddr,
        from_id: u64,
        cluster: &str,
        local: Option<IpAddr>,
    ) -> io::Result<MuxConn> {
        let (r, w) = dialer
            .open_with_hello(addr, local, to, from_id, cluster)
            .await?;
        let shared = Arc::new(Shared {
            next_id: AtomicU64::new(1),
            answered: AtomicU64::new(0),
            is_closed: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        });
        let (out, rx) = mpsc::channel(OUT_QUEUE);
        tokio::spawn(write_loop(shared.clone(), w, rx));
        tokio::spawn(read_loop(shared.clone(), FrameReader::new(r)));
        Ok(MuxConn { shared, out })
    }

    /// True once the connection has failed or been refused: a call on it fails at once.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed.load(Ordering::Acquire)
    }

    /// How many responses this connection has received.
    pub fn answered(&self) -> u64 {
        self.shared.answered.load(Ordering::Relaxed)
    }

    /// Sends a request body and waits for its response. Other calls on this connection (and
    /// its clones) proceed meanwhile. An error means the connection failed: the request may
    /// or may not have reached the node.
    pub async fn call(&self, body: pb::request::Body) -> Result<pb::response::Body, CallError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(&pb::Frame {
            kind: Some(pb::frame::Kind::Request(pb::Request {
                id,
                body: Some(body),
            })),
        });
        let (tx, rx) = oneshot::channel();
        {
            let mut s = self.shared.state.lock();
            if let Some((kind, msg)) = &s.closed {
                return Err(CallError::NotSent(io::Error::new(*kind, msg.clone())));
            }
            s.pending.insert(id, (tx, frame.len()));
        }
        let mut guard = PendingGuard {
            shared: &self.shared,
            id,
            armed: true,
        };
        if self.out.send(frame).await.is_err() {
            // The writer task ended (it closed the connection as it did): nothing was sent.
            self.shared
                .close(io::ErrorKind::BrokenPipe, "connection closed".into());
            let (kind, msg) = self.shared.state.lock().closed.clone().unwrap();
            return Err(CallError::NotSent(io::Error::new(kind, msg)));
        }
        let answer = rx.await;
        guard.armed = false;
        match answer {
            Ok(answer) => answer.map_err(CallError::Lost),
            Err(_) => Err(CallError::Lost(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection closed",
            ))),
        }
    }
}

/// Open multiplexed connections by address; each is dialled once, however many callers find
/// it missing or closed at the same moment (they wait for the one dialling).
#[derive(Default)]
pub(crate) struct MuxCache {
    open: Mutex<HashMap<SocketAddr, MuxConn>>,
    connecting: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
}

impl MuxCache {
    /// The open connection to `addr`, if there is one its node has not closed.
    pub(crate) fn get(&self, addr: SocketAddr) -> Option<MuxConn> {
        let open = self.open.lock();
        open.get(&addr).filter(|c| !c.is_closed()).cloned()
    }

    /// The open connection to `addr`, or a new one from `connect`.
    pub(crate) async fn get_or_connect<F, Fut>(
        &self,
        addr: SocketAddr,
        connect: F,
    ) -> io::Result<MuxConn>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = io::Result<MuxConn>>,
    {
        if let Some(c) = self.get(addr) {
            return Ok(c);
        }
        let gate = self.connecting.lock().entry(addr).or_default().clone();
        let _dialling = gate.lock().await;
        // Another caller may have connected while this one waited.
        if let Some(c) = self.get(addr) {
            return Ok(c);
        }
        let c = connect().await?;
        let mut open = self.open.lock();
        open.retain(|_, c| !c.is_closed());
        open.insert(addr, c.clone());
        Ok(c)
    }
}

async fn write_loop(shared: Arc<Shared>, w: Writer, mut rx: mpsc::Receiver<bytes::Bytes>) {
    match super::frame::write_queued(w, &mut rx).await {
        // Every handle is gone: end the stream (a TLS close_notify, then FIN) so the node
        // closes its side and the reader task ends too.
        Ok(mut w) => {
            let _ = w.shutdown().await;
        }
        Err(e) => shared.close(e.kind(), e.to_string()),
    }
}

async fn read_loop(shared: Arc<Shared>, mut reader: FrameReader<Reader>) {
    loop {
        match reader.next().await {
            Ok(Some(pb::Frame {
                kind: Some(pb::frame::Kind::Response(r)),
            })) => {
                shared.answered.fetch_add(1, Ordering::Relaxed);
                let body = r
                    .body
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "empty response"));
                if r.id == 0 {
                    refused(&shared, body);
                    return;
                }
                let tx = shared.state.lock().pending.remove(&r.id);
                if let Some((tx, _)) = tx {
                    let _ = tx.send(body);
                }
            }
            Ok(Some(pb::Frame {
                kind: Some(pb::frame::Kind::Refused(r)),
            })) => {
                shared.close(io::ErrorKind::PermissionDenied, r.reason);
                return;
            }
            Ok(Some(_)) => continue,
            Ok(None) => {
                shared.close(io::ErrorKind::UnexpectedEof, "connection closed".into());
                return;
            }
            Err(e) => {
                shared.close(e.kind(), e.to_string());
                return;
            }
        }
    }
}

/// A connection-level answer (id 0): the node refused a request frame it would not read (too
/// large) and closes. The refused request is the largest pending one (it exceeded the node's
/// limit, which every frame the node read before it kept within); it gets the answer. The
/// others may have run (a write among them has an unknown outcome) or may not have been read:
/// they are Lost.
fn refused(shared: &Shared, body: Answer) {
    let msg = refused_msg(&body);
    let pending = shared.state.lock().close(
        &shared.is_closed,
        io::ErrorKind::ConnectionAborted,
        msg.clone(),
    );
    let largest = pending.iter().map(|(_, len)| *len).max().unwrap_or(0);
    let mut answer = Some(body);
    for (tx, len) in pending {
        let a = match answer.take_if(|_| len == largest) {
            Some(a) => a,
            None => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("the node closed the connection after refusing another request: {msg}"),
            )),
        };
        let _ = tx.send(a);
    }
}

fn refused_msg(a: &Answer) -> String {
    match a {
        Ok(pb::response::Body::Error(e)) => e.message.clone(),
        _ => "the node closed the connection".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn query(db: &str) -> pb::request::Body {
        pb::request::Body::Query(pb::QueryRequest {
            db: db.into(),
            ..Default::default()
        })
    }

    type ServerReader = FrameReader<tokio::net::tcp::OwnedReadHalf>;

    /// A node's side of one connection, past the hello.
    async fn accept(l: &TcpListener) -> (ServerReader, tokio::net::tcp::OwnedWriteHalf) {
        let (s, _) = l.accept().await.unwrap();
        let (r, w) = s.into_split();
        let mut r = FrameReader::new(r);
        let hello = r.next().await.unwrap().unwrap();
        assert!(matches!(hello.kind, Some(pb::frame::Kind::Hello(_))));
        (r, w)
    }

    async fn next_request(r: &mut ServerReader) -> pb::Request {
        match r.next().await.unwrap().unwrap().kind {
            Some(pb::frame::Kind::Request(q)) => q,
            other => panic!("not a request: {other:?}"),
        }
    }

    fn answer(id: u64, columns: Vec<String>) -> bytes::Bytes {
        encode_frame(&pb::Frame {
            kind: Some(pb::frame::Kind::Response(pb::Response {
                id,
                body: Some(pb::response::Body::Query(pb::QueryResponse {
                    columns,
                    rows: vec![],
                })),
            })),
        })
    }

    fn columns(b: pb::response::Body) -> Vec<String> {
        match b {
            pb::response::Body::Query(q) => q.columns,
            other => panic!("not a query answer: {other:?}"),
        }
    }

    /// Answers in reverse order reach their own calls; a connection that closes with a call
    /// pending fails it as Lost, and a call on the closed connection is NotSent.
    #[tokio::test]
    async fn answers_out_of_order_reach_their_calls_and_failures_say_whether_sent() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut r, mut s) = accept(&l).await;
            let mut reqs = Vec::new();
            for _ in 0..3 {
                reqs.push(next_request(&mut r).await);
            }
            for q in reqs.iter().rev() {
                let Some(pb::request::Body::Query(x)) = &q.body else {
                    panic!()
                };
                s.write_all(&answer(q.id, vec![x.db.clone()]))
                    .await
                    .unwrap();
            }
            // One more request, never answered: the connection closes under it.
            next_request(&mut r).await;
        });
        let c = MuxConn::connect(&Dialer::Plain, Peer::Endpoint, addr, 0, "c", None)
            .await
            .unwrap();
        let calls: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .map(|db| {
                let c = c.clone();
                tokio::spawn(async move { (db, c.call(query(db)).await) })
            })
            .collect();
        for t in calls {
            let (db, r) = t.await.unwrap();
            assert_eq!(columns(r.unwrap()), vec![db.to_string()]);
        }
        assert_eq!(c.answered(), 3);
        let lost = c.call(query("d")).await.unwrap_err();
        assert!(matches!(lost, CallError::Lost(_)), "{lost:?}");
        server.await.unwrap();
        assert!(c.is_closed());
        let not_sent = c.call(query("e")).await.unwrap_err();
        assert!(matches!(not_sent, CallError::NotSent(_)), "{not_sent:?}");
    }

    /// A connection-level answer (id 0: the node refused a frame too large to read) answers
    /// the largest pending call, the refused one; the others may have run, so they are Lost
    /// (a write among them has an unknown outcome, not the refusal); the connection closes.
    #[tokio::test]
    async fn a_refusal_answers_the_refused_call_and_loses_the_others() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut r, mut s) = accept(&l).await;
            next_request(&mut r).await;
            next_request(&mut r).await;
            s.write_all(&answer(0, vec!["refused".into()]))
                .await
                .unwrap();
            (r, s)
        });
        let c = MuxConn::connect(&Dialer::Plain, Peer::Endpoint, addr, 0, "c", None)
            .await
            .unwrap();
        let big = "b".repeat(10_000);
        let (small, large) = tokio::join!(c.call(query("a")), c.call(query(&big)));
        assert_eq!(columns(large.unwrap()), vec!["refused".to_string()]);
        assert!(matches!(small, Err(CallError::Lost(_))), "{small:?}");
        assert!(c.is_closed());
        drop(server.await.unwrap());
    }

    /// A call dropped before its answer leaves nothing behind, and the late answer is ignored.
    #[tokio::test]
    async fn a_dropped_call_leaves_no_pending_entry() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (mut r, mut s) = accept(&l).await;
            let first = next_request(&mut r).await;
            rx.await.unwrap();
            let second = next_request(&mut r).await;
            s.write_all(&answer(first.id, vec!["late".into()]))
                .await
                .unwrap();
            s.write_all(&answer(second.id, vec!["b".into()]))
                .await
                .unwrap();
            (r, s)
        });
        let c = MuxConn::connect(&Dialer::Plain, Peer::Endpoint, addr, 0, "c", None)
            .await
            .unwrap();
        let gave_up =
            tokio::time::timeout(std::time::Duration::from_millis(100), c.call(query("a"))).await;
        assert!(gave_up.is_err());
        assert!(c.shared.state.lock().pending.is_empty());
        tx.send(()).unwrap();
        assert_eq!(
            columns(c.call(query("b")).await.unwrap()),
            vec!["b".to_string()]
        );
        drop(server.await.unwrap());
    }
}
