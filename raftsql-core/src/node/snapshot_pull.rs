//! Receiving a snapshot: a follower told to install one pulls its files in chunks from the
//! leader, then hands it to the Raft thread.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use raft::eraftpb::Message;
use raftsql_proto::v1 as pb;

use super::Shared;
use crate::error::Error;
use crate::net::conn::RpcConn;
use crate::net::Peer;
use crate::snapshot::Manifest;

/// Pulls the files of an incoming snapshot from its maker, then steps the message into Raft.
pub(super) fn receive_snapshot(shared: Arc<Shared>, m: Message) {
    if shared.receiving_snapshot.swap(true, Ordering::SeqCst) {
        return; // one at a time; the leader will send it again
    }
    tokio::spawn(async move {
        let r = async {
            let manifest = Manifest::decode(&m.get_snapshot().data)?;
            let addr = shared
                .peers
                .lock()
                .get(&manifest.from)
                .copied()
                .ok_or_else(|| {
                    Error::Invalid(format!("snapshot from unknown node {}", manifest.from))
                })?;
            let started = Instant::now();
            let conn = RpcConn::connect(
                &shared.dialer(),
                Peer::Node(manifest.from),
                addr,
                shared.cfg.id,
                &shared.cfg.cluster,
                Some(shared.cfg.listen.ip()),
            )
            .await
            .map_err(|e| Error::Transport(format!("snapshot source {addr}: {e}")))?;
            let conn = tokio::sync::Mutex::new(conn);
            let (index, term) = (manifest.index, manifest.term);
            shared
                .snapshots
                .receive(&manifest, |file, offset| {
                    let conn = &conn;
                    async move {
                        let body = pb::request::Body::SnapshotChunk(pb::SnapshotChunkRequest {
                            index,
                            term,
                            file,
                            offset,
                        });
                        match conn.lock().await.call(body).await {
                            Ok(pb::response::Body::SnapshotChunk(c)) => Ok((c.data, c.eof)),
                            Ok(pb::response::Body::Error(e)) => Err(Error::Transport(e.message)),
                            Ok(_) => Err(Error::Transport("unexpected response".into())),
                            Err(e) => Err(Error::Transport(e.to_string())),
                        }
                    }
                })
                .await?;
            tracing::info!(
                "received snapshot at index {index} in {:?}",
                started.elapsed()
            );
            Ok::<_, Error>(())
        }
        .await;
        match r {
            Ok(()) => {
                shared.raft.step(m);
            }
            Err(e) => tracing::warn!("receiving snapshot failed: {e}"),
        }
        shared.receiving_snapshot.store(false, Ordering::SeqCst);
    });
}
