//! The spare segment: a file of the segment size, written with zeros and synced ahead of
//! time by a thread of its own (`raftsql-spare`), which the next segment is made of (L7).
//!
//! Why written and not only allocated: after an append into space that `fallocate` reserved,
//! `fdatasync` must also write the file's extent metadata (the blocks change from unwritten
//! to written), a second I/O before the flush; into blocks already written it writes the data
//! alone. Measured on this project's machines (ext4, 12 KiB appends, each followed by
//! `fdatasync`, 2,000 of them): p50 149 µs into allocated space, 90 µs into written zeros.
//! etcd allocates its WAL segments the same way (and pays the same); PostgreSQL writes its
//! WAL segments with zeros for this reason.
//!
//! Protocol (one spare at a time, one file name, [`SPARE_FILE`]):
//!
//! - The log asks for a spare ([`Spare::want`]) once it has shown it writes (it is not worth
//!   the disk for a log that is opened and closed again, as tests and the tools do).
//! - The thread writes the file in [`CHUNK`]s, each followed by `fdatasync`, so that the
//!   zeros never become one large flush in front of the log's own, and at most at [`RATE`];
//!   then it marks it ready.
//! - The log takes a ready spare ([`Spare::take`]) when it creates a segment, writes the
//!   segment's header over its start and renames it into place; only then does it ask for the
//!   next one, so the thread never writes the file the log is renaming.
//! - The name ends in `.seg.tmp`: opening the log removes it like any unfinished segment, so
//!   a crash at any point leaves nothing the log could take for data.
//! - After an I/O error (a full disk) the file is removed and the thread tries again
//!   [`RETRY`] later; meanwhile the log allocates its segments as they grow, as before.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// The spare's file name in the log directory (removed when the log opens, as `*.seg.tmp`).
pub(super) const SPARE_FILE: &str = "spare.seg.tmp";

/// Zeros written between two `fdatasync`s.
const CHUNK: usize = 256 << 10;

/// The most zeros a spare is written at, in bytes per second. Written as fast as the disk
/// goes, a 64 MiB spare (on every node at once, a second after start-up) queues the log's
/// own `fdatasync`s behind it: a single put client's p99 in a cluster's first 10 s was 1.0-3.0
/// times (median 1.8) what it was in the next 10 s over five fresh clusters, and 0.9-2.0
/// times (median 1.3) with this pace. At this rate a 64 MiB spare takes 2 s, while the log
/// fills a segment at 6-9 MiB/s under 64 etcd put clients; a log that writes faster than
/// this rolls into an allocated segment when the spare is late (L6), as before.
const RATE: u64 = 32 << 20;

/// After a failed spare (a full disk), the next try waits this long.
#[cfg(not(test))]
const RETRY: Duration = Duration::from_secs(30);
#[cfg(test)]
const RETRY: Duration = Duration::from_millis(20);

#[derive(Default)]
struct State {
    /// The log asked for a spare and has not taken it yet.
    wanted: bool,
    /// The file is complete and synced.
    ready: bool,
    /// The log is closing: stop between two chunks.
    stop: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The spare segment of one log directory and the thread that prepares it.
pub(super) struct Spare {
    path: PathBuf,
    size: u64,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Spare {
    /// Starts the thread that prepares spares of `size` bytes in `dir`; it writes nothing
    /// until asked.
    pub(super) fn start(dir: &Path, size: u64) -> std::io::Result<Spare> {
        let path = dir.join(SPARE_FILE);
        let shared = Arc::new(Shared::default());
        let thread = std::thread::Builder::new()
            .name("raftsql-spare".into())
            .spawn({
                let (path, shared) = (path.clone(), shared.clone());
                move || prepare_loop(&path, size, &shared)
            })?;
        Ok(Spare {
            path,
            size,
            shared,
            thread: Some(thread),
        })
    }

    /// Asks for a spare (nothing if one is ready or being written).
    pub(super) fn want(&self) {
        let mut s = self.shared.state.lock();
        if !s.wanted {
            s.wanted = true;
            self.shared.changed.notify_all();
        }
    }

    /// Whether a spare is ready to be taken.
    pub(super) fn ready(&self) -> bool {
        self.shared.state.lock().ready
    }

    /// Takes the ready spare, if there is one: its path and its size. The caller renames it
    /// away before calling [`Spare::want`] again.
    pub(super) fn take(&self) -> Option<(PathBuf, u64)> {
        let mut s = self.shared.state.lock();
        if !s.ready {
            return None;
        }
        s.ready = false;
        s.wanted = false;
        Some((self.path.clone(), self.size))
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn prepare_loop(path: &Path, size: u64, shared: &Shared) {
    loop {
        {
            let mut s = shared.state.lock();
            while !s.stop && (!s.wanted || s.ready) {
                shared.changed.wait(&mut s);
            }
            if s.stop {
                return;
            }
        }
        match write_zeros(path, size, shared) {
            Ok(true) => {
                shared.state.lock().ready = true;
                tracing::debug!(path = %path.display(), size, "spare raft log segment ready");
            }
            Ok(false) => return,
            Err(e) => {
                let _ = fs::remove_file(path);
                tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "could not write a spare raft log segment; segments are allocated as \
                     they grow until a try in {RETRY:?} succeeds"
                );
                let mut s = shared.state.lock();
                if !s.stop {
                    shared.changed.wait_for(&mut s, RETRY);
                }
            }
        }
    }
}

/// Writes `size` zero bytes to `path` and syncs them; `Ok(false)` if told to stop first.
fn write_zeros(path: &Path, size: u64, shared: &Shared) -> std::io::Result<bool> {
    let mut f: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let zeros = vec![0u8; CHUNK];
    let started = Instant::now();
    let mut written = 0u64;
    while written < size {
        if shared.state.lock().stop {
            return Ok(false);
        }
        let n = (size - written).min(CHUNK as u64) as usize;
        f.write_all(&zeros[..n])?;
        f.sync_data()?;
        written += n as u64;
        // No faster than RATE; a close does not wait for the pause.
        let due = Duration::from_secs_f64(written as f64 / RATE as f64);
        let mut s = shared.state.lock();
        while !s.stop {
            let Some(left) = due.checked_sub(started.elapsed()).filter(|d| !d.is_zero()) else {
                break;
            };
            shared.changed.wait_for(&mut s, left);
        }
    }
    f.sync_all()?;
    Ok(true)
}
