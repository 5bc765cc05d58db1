//! The watch fan-out: one read of the event log per applied change, shared by every watch
//! of this node that has caught up.
//!
//! Without it each watch read `kv_rev` itself on every applied entry: 100 watches at 1,000
//! writes/s were 100,000 SQLite reads a second (issue 15). etcd's `watchableStore` keeps
//! its synced watchers in memory and hands each write's events to them; this does the same
//! with one task per store:
//!
//! - the hub's thread waits for the node to apply something, reads the events after the last
//!   revision it read (every key, never splitting a revision, at most [`BATCH`] rows at a
//!   time, `crate::watch::BATCH`) and broadcasts them as a [`Chunk`] covering revisions `[from, next)`;
//! - a watch first catches up from history by its own reads ([`crate::watch`]), then takes
//!   its events from the chunks, filtered by its keys and filters;
//! - a watch that cannot use a chunk (it starts after the revision the watch needs: the hub
//!   idled or restarted; the watch fell behind the broadcast buffer; the watch wants
//!   `prev_kv` and the chunk was read without) reads from history again until it has caught
//!   up. A chunk is therefore an optimisation only: the events a watch sends are always
//!   those of the log, in revision order, each once (the watch guarantees of `watch.rs`).
//!
//! While no watch is subscribed the hub reads nothing and forgets where it was. Its first
//! chunk after that is an empty one at the revision it finds: a watch that needs an earlier
//! revision sees the gap and reads history (so a write applied while the hub woke up is
//! never left unsent).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::mvcc::Interval;
use crate::pb::mvccpb::Event;
use crate::store::DB;
use crate::watch::{read_events, Batch};

/// Chunks kept for watches that are slow to take them; one further behind reads history.
const BUFFER: usize = 256;

/// Events of revisions `[from, next)` (every key), as read once for all watches.
#[derive(Debug)]
pub(crate) struct Chunk {
    /// The first revision the chunk covers.
    pub from: i64,
    /// The revision after the last one covered.
    pub next: i64,
    /// The store's revision when the chunk was read (the response header's).
    pub rev: i64,
    /// The compaction revision then: a watch that needs a revision below it is canceled.
    pub compact: i64,
    /// The events, in revision order.
    pub events: Vec<Event>,
    /// Whether each event carries its `prev_kv` (read only while a watch wants them).
    pub with_prev: bool,
}

/// The hub of one store: its broadcast channel, and how many watches want `prev_kv`.
pub(crate) struct Hub {
    tx: broadcast::Sender<Arc<Chunk>>,
    want_prev: AtomicUsize,
}

impl Hub {
    /// Starts the hub's thread on `node`.
    pub(crate) fn start(node: raftsql_core::Node) -> Arc<Hub> {
        let (tx, _) = broadcast::channel(BUFFER);
        let hub = Arc::new(Hub {
            tx,
            want_prev: AtomicUsize::new(0),
        });
        let h = hub.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("etcd-watch-hub".into())
            .spawn(move || run(node, h))
        {
            // Without a hub every watch reads its events from history itself (slower, the
            // same events): see the module's notes.
            tracing::error!("watch hub: cannot start its thread: {e}");
        }
        hub
    }

    /// A receiver of the chunks read from now on; with `prev_kv`, also asks for them (until
    /// the returned guard drops).
    pub(crate) fn subscribe(self: &Arc<Hub>, prev_kv: bool) -> Subscription {
        if prev_kv {
            self.want_prev.fetch_add(1, Ordering::SeqCst);
        }
        Subscription {
            rx: self.tx.subscribe(),
            hub: self.clone(),
            prev_kv,
        }
    }
}

/// One watch's subscription to the hub.
pub(crate) struct Subscription {
    pub rx: broadcast::Receiver<Arc<Chunk>>,
    hub: Arc<Hub>,
    prev_kv: bool,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.prev_kv {
            self.hub.want_prev.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The hub's thread: a read per applied change while anyone listens.
///
/// A thread of its own, not a task: it wakes once per applied change and reads on the spot
/// (a task woke on a tokio worker, handed the read to the blocking pool and woke again for
/// its answer: two more thread hops on every event's way to its watches).
fn run(node: raftsql_core::Node, hub: Arc<Hub>) {
    let mut applied = node.subscribe_applied();
    // Held weakly: the hub must not keep the node running (its last handle stops it, and
    // the applied channel closing then ends this thread).
    let node = node.downgrade();
    let all = Interval::new(b"\0", b"\0");
    // The next revision to read; `None` after an idle spell (start at the current one).
    let mut next: Option<i64> = None;
    loop {
        if hub.tx.receiver_count() == 0 {
            next = None;
        } else {
            let with_prev = hub.want_prev.load(Ordering::SeqCst) > 0;
            let from = next;
            let Some(node) = node.upgrade() else {
                return; // the node stopped
            };
            let read = node.read_local_blocking(DB, |c| {
                let start = match from {
                    Some(n) => n,
                    None => match crate::mvcc::current_rev_in(c)? {
                        Some(rev) => rev + 1,
                        None => return Ok(None),
                    },
                };
                Ok(Some((
                    start,
                    read_events(c, &all, start, with_prev, false, false)?,
                )))
            });
            match read {
                Ok(Some(Some((
                    start,
                    Batch::Events {
                        events,
                        next: n,
                        rev,
                    },
                )))) => {
                    let fresh = next.is_none();
                    next = Some(n);
                    if n > start || fresh {
                        let _ = hub.tx.send(Arc::new(Chunk {
                            from: start,
                            next: n,
                            rev,
                            compact: 0,
                            events,
                            with_prev,
                        }));
                        if n <= rev {
                            continue; // more to read
                        }
                    }
                }
                Ok(Some(Some((start, Batch::Compacted(compact))))) => {
                    // The store moved past `start` by a snapshot install: watches that need
                    // revisions below `compact` are canceled, the others read history.
                    let _ = hub.tx.send(Arc::new(Chunk {
                        from: start,
                        next: start,
                        rev: compact,
                        compact,
                        events: Vec::new(),
                        with_prev,
                    }));
                    next = Some(compact);
                    continue;
                }
                Ok(_) => {} // no etcd database or schema yet
                Err(e) => {
                    tracing::warn!("watch hub: reading events failed: {e}");
                    next = None;
                }
            }
        }
        if block_on(applied.changed()).is_err() {
            return; // the node stopped
        }
    }
}

/// Runs `fut` to completion on this thread (not a runtime's: the hub's own), parking it
/// until the future's waker is called.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}
