//! etcd's Watch service: one bidirectional stream multiplexing many watches.
//!
//! Each watch is a task that owns `next`, the first revision it has not sent yet. It reads
//! the changes at or after `next` from `kv_rev` (the event log, ordered by revision and
//! sub-revision) on what this node has applied, sends them, and moves `next` past the last
//! revision sent. Once it has caught up it takes the events of later revisions from the
//! store's fan-out (`hub.rs`: one read per applied change for all watches, as etcd's synced
//! watchers get theirs from memory), and goes back to reading history whenever a chunk does
//! not follow on from `next`. Hence, as etcd documents:
//! - *ordered*: events come in revision order;
//! - *unique* and *reliable*: a response always ends on a whole revision and `next` moves
//!   exactly past it, so no event is sent twice or skipped;
//! - *atomic*: the events of one revision (one txn) are never split across responses;
//! - *resumable*: a client that reconnects with `start_revision` = last seen + 1 gets the rest;
//! - a watch whose `next` falls below the compaction revision is canceled with
//!   `compact_revision` (the client must re-list), never silently given a gap;
//! - a slow client is never dropped: its task simply waits on the stream's send buffer and
//!   catches up from history afterwards.
//!
//! # Progress requests
//! A `WatchProgressRequest` is answered (watch_id -1, header revision R) only once every watch
//! of the stream has put all its events at or below R in the stream's send queue, where R is
//! the store's revision when the request arrived (etcd issue 15220, fixed in 3.4.31/3.5.13).
//! kube-apiserver's consistent list from its watch cache waits for a progress notification at
//! or above the list's revision and then trusts its cache: an answer that overtook a watch's
//! events would let it serve a list missing writes. Each watch publishes `sent`, the revision
//! through which its events are queued, after the send returns; the stream's loop answers when
//! every watch's `sent` has reached R (requests that arrive meanwhile are folded into one
//! answer at the latest R, as etcd does), and the answer is queued behind those events.

use raftsql_core::Consistency;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rusqlite::{params, OptionalExtension};
use tokio::sync::{mpsc, Notify};
use tonic::Status;

use crate::mvcc::Interval;
use crate::pb::etcdserverpb::{
    watch_create_request::FilterType, watch_request, WatchCreateRequest, WatchRequest,
    WatchResponse,
};
use crate::pb::mvccpb::{event::EventType, Event, KeyValue};
use crate::store::{EtcdStore, DB};

/// Most events read (and sent) at once, unless one revision alone has more.
pub(crate) const BATCH: i64 = 1000;

type Out = mpsc::Sender<Result<WatchResponse, Status>>;

/// What one read of the event log found for a watch.
pub(crate) enum Batch {
    /// Events (possibly none) and the revision to continue from, with the store revision.
    Events {
        events: Vec<Event>,
        next: i64,
        rev: i64,
    },
    /// `next` is below the compaction revision.
    Compacted(i64),
}

/// Reads the changes of `keys` at revisions >= `next`, never splitting a revision.
pub(crate) fn read_events(
    c: &rusqlite::Connection,
    keys: &Interval,
    next: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
) -> rusqlite::Result<Batch> {
    let meta = |name: &str, d: i64| -> rusqlite::Result<i64> {
        Ok(c.prepare_cached("SELECT value FROM meta WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?
            .unwrap_or(d))
    };
    let has_schema = crate::mvcc::has_table(c, "meta")?;
    if !has_schema {
        return Ok(Batch::Events {
            events: Vec::new(),
            next,
            rev: 1,
        });
    }
    let rev = meta("rev", 1)?;
    let compact = meta("compact_rev", 0)?;
    if next < compact {
        return Ok(Batch::Compacted(compact));
    }
    if next > rev {
        return Ok(Batch::Events {
            events: Vec::new(),
            next,
            rev,
        });
    }
    // The last revision to read: cut at BATCH rows, but never inside a revision.
    let cut: Option<i64> = c
        .prepare_cached(
            "SELECT rev FROM kv_rev WHERE rev >= ?1 ORDER BY rev, sub LIMIT 1 OFFSET ?2",
        )?
        .query_row(params![next, BATCH], |r| r.get(0))
        .optional()?;
    let upto = match cut {
        Some(r) if r > next => r - 1,
        Some(r) => r,
        None => rev,
    };
    let mut st = c.prepare_cached(
        "SELECT rev, key, create_rev, version, value, lease FROM kv_rev
         WHERE rev >= ?1 AND rev <= ?2 AND key >= ?3 AND (?4 IS NULL OR key < ?4) ORDER BY rev, sub",
    )?;
    let mut prev = c.prepare_cached(
        "SELECT key, create_rev, rev, version, value, lease FROM kv_rev INDEXED BY kv_rev_key
         WHERE key = ?1 AND rev < ?2 ORDER BY rev DESC LIMIT 1",
    )?;
    let mut rows = st.query(params![next, upto, keys.start, keys.end])?;
    let mut events = Vec::new();
    while let Some(r) = rows.next()? {
        let (mod_rev, key, create_rev, version, value, lease): (
            i64,
            Vec<u8>,
            i64,
            i64,
            Vec<u8>,
            i64,
        ) = (
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        );
        let deleted = version == 0;
        if (deleted && no_delete) || (!deleted && no_put) {
            continue;
        }
        let kv = if deleted {
            KeyValue {
                key: Bytes::from(key.clone()),
                mod_revision: mod_rev,
                ..Default::default()
            }
        } else {
            KeyValue {
                key: Bytes::from(key.clone()),
                create_revision: create_rev,
                mod_revision: mod_rev,
                version,
                value: Bytes::from(value),
                lease,
            }
        };
        let prev_kv = if prev_kv {
            prev.query_row(params![key, mod_rev], |r| {
                Ok(KeyValue {
                    key: Bytes::from(r.get::<_, Vec<u8>>(0)?),
                    create_revision: r.get(1)?,
                    mod_revision: r.get(2)?,
                    version: r.get(3)?,
                    value: Bytes::from(r.get::<_, Vec<u8>>(4)?),
                    lease: r.get(5)?,
                })
            })
            .optional()?
            .filter(|p| p.version > 0)
        } else {
            None
        };
        events.push(Event {
            r#type: if deleted {
                EventType::Delete as i32
            } else {
                EventType::Put as i32
            },
            kv: Some(kv),
            prev_kv,
        });
    }
    Ok(Batch::Events {
        events,
        next: upto + 1,
        rev,
    })
}

/// A watch of a stream: its task, and the revision through which its events are queued.
struct Running {
    task: tokio::task::JoinHandle<()>,
    sent: Arc<AtomicI64>,
}

/// What a watch task tells its stream: how far it has sent ([`Running::sent`]), with a wake-up
/// for a progress request waiting on it.
#[derive(Clone)]
struct Progress {
    sent: Arc<AtomicI64>,
    changed: Arc<Notify>,
}

impl Progress {
    /// Every event at or below `rev` is in the send queue.
    fn sent_through(&self, rev: i64) {
        if self.sent.fetch_max(rev, Ordering::SeqCst) < rev {
            self.changed.notify_one();
        }
    }
}

/// Serves one Watch stream until the client closes it.
pub async fn serve_stream(
    store: Arc<EtcdStore>,
    mut reqs: tonic::Streaming<WatchRequest>,
    out: Out,
) {
    let mut watches: HashMap<i64, Running> = HashMap::new();
    let mut next_id = 0i64;
    let changed = Arc::new(Notify::new());
    // The revision a progress request waits to be answered at (see the module doc).
    let mut progress_due: Option<i64> = None;
    loop {
        let req = tokio::select! {
            r = reqs.message() => r,
            _ = changed.notified(), if progress_due.is_some() => {
                progress_due = answer_progress(&store, &out, &mut watches, progress_due).await;
                continue;
            }
            _ = out.closed() => break,
        };
        let req = match req {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => break,
        };
        watches.retain(|_, w| !w.task.is_finished());
        match req.request_union {
            Some(watch_request::RequestUnion::CreateRequest(c)) => {
                let id = if c.watch_id != 0 {
                    c.watch_id
                } else {
                    while watches.contains_key(&next_id) {
                        next_id += 1;
                    }
                    next_id
                };
                let refusal = if watches.len() >= MAX_WATCHES_PER_STREAM {
                    Some(format!(
                        "raftsql: too many watches on one stream (limit \
                         {MAX_WATCHES_PER_STREAM}); cancel some or open another stream"
                    ))
                } else if watches.contains_key(&id) {
                    Some("etcdserver: duplicate watch ID".to_string())
                } else {
                    None
                };
                if let Some(cancel_reason) = refusal {
                    let _ = out
                        .send(Ok(WatchResponse {
                            header: Some(store.header_now(0)),
                            watch_id: id,
                            created: false,
                            canceled: true,
                            cancel_reason,
                            ..Default::default()
                        }))
                        .await;
                    continue;
                }
                let current = store.current_rev().await;
                let start = if c.start_revision > 0 {
                    c.start_revision
                } else {
                    current + 1
                };
                // `created` goes out before any event of this watch (in request order).
                let _ = out
                    .send(Ok(WatchResponse {
                        header: Some(store.header_now(current)),
                        watch_id: id,
                        created: true,
                        ..Default::default()
                    }))
                    .await;
                let progress = Progress {
                    sent: Arc::new(AtomicI64::new(start - 1)),
                    changed: changed.clone(),
                };
                watches.insert(
                    id,
                    Running {
                        sent: progress.sent.clone(),
                        task: tokio::spawn(run_watch(
                            store.clone(),
                            id,
                            c,
                            start,
                            out.clone(),
                            progress,
                        )),
                    },
                );
            }
            Some(watch_request::RequestUnion::CancelRequest(c)) => {
                if let Some(w) = watches.remove(&c.watch_id) {
                    w.task.abort();
                    let _ = out
                        .send(Ok(WatchResponse {
                            header: Some(store.header_now(store.current_rev().await)),
                            watch_id: c.watch_id,
                            canceled: true,
                            ..Default::default()
                        }))
                        .await;
                }
            }
            Some(watch_request::RequestUnion::ProgressRequest(_)) => {
                let rev = store.current_rev().await;
                progress_due = Some(progress_due.map_or(rev, |r| r.max(rev)));
                progress_due = answer_progress(&store, &out, &mut watches, progress_due).await;
            }
            None => {}
        }
    }
    for (_, w) in watches {
        w.task.abort();
    }
}

/// Answers a due progress request if every running watch has queued its events through the
/// revision it waits for (etcd: a progress notification for the whole stream, watch_id -1);
/// returns what is still due.
async fn answer_progress(
    store: &EtcdStore,
    out: &Out,
    watches: &mut HashMap<i64, Running>,
    due: Option<i64>,
) -> Option<i64> {
    let rev = due?;
    watches.retain(|_, w| !w.task.is_finished());
    if watches
        .values()
        .any(|w| w.sent.load(Ordering::SeqCst) < rev)
    {
        return Some(rev);
    }
    let _ = out
        .send(Ok(WatchResponse {
            header: Some(store.header_now(rev)),
            watch_id: -1,
            ..Default::default()
        }))
        .await;
    None
}

/// One watch: sends the events from `start` on, then follows what this node applies.
/// Watches one stream may hold at once (etcd has no such limit; kube-apiserver holds one
/// per resource type, etcdctl one). Each costs a task and a slot in the stream's fan-out.
pub const MAX_WATCHES_PER_STREAM: usize = 1000;

async fn run_watch(
    store: Arc<EtcdStore>,
    id: i64,
    c: WatchCreateRequest,
    start: i64,
    out: Out,
    progress: Progress,
) {
    let keys = Interval::new(&c.key, &c.range_end);
    let no_put = c.filters.contains(&(FilterType::Noput as i32));
    let no_delete = c.filters.contains(&(FilterType::Nodelete as i32));
    // Subscribed before the first read of history, so no chunk read after it is missed.
    let mut sub = store.hub().subscribe(c.prev_kv);
    let mut next = start;
    let mut last_progress = tokio::time::Instant::now();
    loop {
        // Catch up from history.
        loop {
            let (k, pk) = (keys.clone(), c.prev_kv);
            let batch = store
                .node()
                .read(DB, Consistency::Local, move |conn| {
                    Ok(read_events(conn, &k, next, pk, no_put, no_delete)?)
                })
                .await;
            match batch {
                Ok(Some(Batch::Compacted(compact))) => {
                    send_compacted(&store, &out, id, compact).await;
                    return;
                }
                Ok(Some(Batch::Events {
                    events,
                    next: n,
                    rev,
                })) => {
                    let advanced = n > next;
                    next = n;
                    if !events.is_empty() {
                        if !send_events(&store, &out, id, events, rev).await {
                            return;
                        }
                        last_progress = tokio::time::Instant::now();
                    }
                    progress.sent_through(next - 1);
                    if advanced && next <= rev {
                        continue; // more history to send
                    }
                }
                Ok(None) => {} // the database does not exist yet
                Err(e) => tracing::warn!("watch {id}: reading events failed: {e}"),
            }
            break;
        }
        // Follow the hub until a chunk does not follow on from `next`.
        loop {
            let chunk = if c.progress_notify {
                let due = last_progress + store.options.progress_notify_interval;
                tokio::select! {
                    r = sub.rx.recv() => r,
                    _ = tokio::time::sleep_until(due) => {
                        let resp = WatchResponse { header: Some(store.header_now(next - 1)), watch_id: id, ..Default::default() };
                        if out.send(Ok(resp)).await.is_err() {
                            return;
                        }
                        last_progress = tokio::time::Instant::now();
                        continue;
                    }
                }
            } else {
                sub.rx.recv().await
            };
            let chunk = match chunk {
                Ok(chunk) => chunk,
                // Fell behind the broadcast buffer: history has what was dropped.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if next < chunk.compact {
                send_compacted(&store, &out, id, chunk.compact).await;
                return;
            }
            if chunk.from > next || (c.prev_kv && !chunk.with_prev) {
                break; // a gap, or events without the prev_kv this watch sends
            }
            if chunk.next <= next {
                continue; // already sent from history
            }
            let events: Vec<Event> = chunk
                .events
                .iter()
                .filter(|e| {
                    let kv = e.kv.as_ref().expect("an event has its kv");
                    let deleted = e.r#type == EventType::Delete as i32;
                    kv.mod_revision >= next
                        && keys.contains(&kv.key)
                        && !(deleted && no_delete)
                        && (deleted || !no_put)
                })
                .map(|e| Event {
                    prev_kv: if c.prev_kv { e.prev_kv.clone() } else { None },
                    ..e.clone()
                })
                .collect();
            next = chunk.next;
            if !events.is_empty() {
                if !send_events(&store, &out, id, events, chunk.rev).await {
                    return;
                }
                last_progress = tokio::time::Instant::now();
            }
            progress.sent_through(next - 1);
        }
    }
}

/// Sends one response of events; `false` once the stream is gone.
async fn send_events(store: &EtcdStore, out: &Out, id: i64, events: Vec<Event>, rev: i64) -> bool {
    let resp = WatchResponse {
        header: Some(store.header_now(rev)),
        watch_id: id,
        events,
        ..Default::default()
    };
    out.send(Ok(resp)).await.is_ok()
}

/// Cancels the watch: its next revision was compacted (etcd sends revision 0 in the header).
async fn send_compacted(store: &EtcdStore, out: &Out, id: i64, compact: i64) {
    let _ = out
        .send(Ok(WatchResponse {
            header: Some(store.header_now(0)),
            watch_id: id,
            canceled: true,
            compact_revision: compact,
            ..Default::default()
        }))
        .await;
}
