//! KV.RangeStream (etcd 3.7; kube-apiserver's `EtcdRangeStream` gate): a range answered in
//! chunks, so that listing a large keyspace needs neither one huge gRPC message nor one huge
//! answer in memory.
//!
//! The first chunk is an ordinary [`EtcdStore::range`] (linearizable unless `serializable`)
//! with a chunk-sized limit; it fixes the revision R of the whole answer and its `count`.
//! Each next chunk reads on from the key after the last one sent, at revision R, from this
//! node's applied state (it has applied R already: the first read saw it). So the chunks
//! concatenate to what one Range at R answers. As etcd does, `header`, `more` and `count`
//! are set on the final chunk only.
//!
//! A range sorted by anything but key ascending, a count-only range, or a single-key range
//! is answered as one chunk (continuing after the last key would not be its order).

use tokio::sync::mpsc;

use crate::error::EtcdError;
use crate::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::pb::etcdserverpb::{RangeRequest, RangeResponse, RangeStreamResponse};
use crate::store::EtcdStore;

/// Keys per chunk.
pub const CHUNK_KEYS: i64 = 500;
/// Chunks read ahead of what the client has taken.
const IN_FLIGHT: usize = 2;

impl EtcdStore {
    /// The answer to `req` as a stream of chunks (see the module docs).
    pub async fn range_stream(
        &self,
        req: RangeRequest,
    ) -> Result<mpsc::Receiver<Result<RangeStreamResponse, EtcdError>>, EtcdError> {
        let by_key = (req.sort_order() == SortOrder::None || req.sort_order() == SortOrder::Ascend)
            && req.sort_target() == SortTarget::Key;
        let chunked = by_key && !req.count_only && !req.range_end.is_empty();
        let limit = req.limit; // 0: no limit
        let mut first = req.clone();
        if chunked {
            first.limit = if limit > 0 {
                limit.min(CHUNK_KEYS)
            } else {
                CHUNK_KEYS
            };
        }
        let resp = self.range(first).await?;
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        if !chunked {
            let _ = tx
                .send(Ok(RangeStreamResponse {
                    range_response: Some(resp),
                }))
                .await;
            return Ok(rx);
        }
        let store = self.clone();
        tokio::spawn(async move {
            let header = resp.header;
            let (count, rev) = (resp.count, header.as_ref().map_or(0, |h| h.revision));
            let mut sent = resp.kvs.len() as i64;
            let mut more = resp.more;
            let mut next = resp.kvs.last().map(|kv| after(&kv.key));
            let mut chunk = resp.kvs;
            // Reads on while the first read said there is more than the chunk, and the
            // request's own limit (if any) is not reached.
            while more && (limit == 0 || sent < limit) {
                let Some(key) = next.take() else { break };
                let want = if limit > 0 {
                    (limit - sent).min(CHUNK_KEYS)
                } else {
                    CHUNK_KEYS
                };
                let r = RangeRequest {
                    key: key.into(),
                    revision: rev,
                    limit: want,
                    serializable: true,
                    ..req.clone()
                };
                let msg = RangeStreamResponse {
                    range_response: Some(RangeResponse {
                        kvs: std::mem::take(&mut chunk),
                        ..Default::default()
                    }),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return; // the client went away
                }
                match store.range(r).await {
                    Ok(r) => {
                        more = r.more;
                        sent += r.kvs.len() as i64;
                        next = r.kvs.last().map(|kv| after(&kv.key));
                        chunk = r.kvs;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
            let _ = tx
                .send(Ok(RangeStreamResponse {
                    range_response: Some(RangeResponse {
                        header,
                        kvs: chunk,
                        more: limit > 0 && count > limit,
                        count,
                    }),
                }))
                .await;
        });
        Ok(rx)
    }
}

/// The smallest key after `k`.
fn after(k: &[u8]) -> Vec<u8> {
    let mut v = k.to_vec();
    v.push(0);
    v
}
