//! Snapshots for followers that are too far behind for the log.
//!
//! A snapshot is a directory `<data>/snapshots/out-<index>-<term>/` holding one `<db>.db`
//! file per database (its pages at `index`, read through `sqlite_dbpage` in one read
//! transaction, so byte-identical to the leader's) and `manifest.json` (index, term, each
//! file's length and crc32). The Raft snapshot message carries only the manifest; the
//! follower pulls the files in chunks from the node that made it, checks every length and
//! checksum, and only then steps the message into Raft, which asks the state machine to
//! install it (a new generation directory, switched by an atomic rename of `CURRENT`).
//!
//! Only the newest outgoing snapshot is kept; received ones are deleted once installed, and
//! stale `in-*`/`*.tmp` directories are removed at start-up.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use raft::eraftpb::{ConfState, Snapshot};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How often a wait for a snapshot being built looks.
const BUILD_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Size of one chunk pulled by a follower.
pub const CHUNK: usize = 1 << 20;
/// Most database files a snapshot may list (one per database).
pub const MAX_FILES: usize = 1024;

/// One file of a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileInfo {
    /// File name (`<db>.db`).
    pub name: String,
    /// Length in bytes.
    pub len: u64,
    /// crc32 of the whole file.
    pub crc32: u32,
}

/// What the Raft snapshot message carries.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// Last entry included.
    pub index: u64,
    /// Its term.
    pub term: u64,
    /// Node serving the files.
    pub from: u64,
    /// The files.
    pub files: Vec<FileInfo>,
}

impl Manifest {
    /// Parses the manifest carried in a snapshot message (bytes from the network).
    pub fn decode(data: &[u8]) -> Result<Manifest> {
        let m: Manifest = serde_json::from_slice(data)
            .map_err(|e| Error::Corrupt(format!("snapshot manifest: {e}")))?;
        if m.files.len() > MAX_FILES {
            return Err(Error::Corrupt(format!(
                "snapshot manifest lists {} files (at most {MAX_FILES})",
                m.files.len()
            )));
        }
        let mut names = std::collections::HashSet::new();
        for f in &m.files {
            if !names.insert(&f.name) {
                return Err(Error::Corrupt(format!(
                    "snapshot file {:?} listed twice",
                    f.name
                )));
            }
            let stem = f.name.strip_suffix(".db").unwrap_or("");
            crate::fsutil::check_db_name(stem)
                .map_err(|_| Error::Corrupt(format!("snapshot file name {:?}", f.name)))?;
        }
        Ok(m)
    }
}

/// Asks for a snapshot to be built.
type Builder = Box<dyn Fn() -> bool + Send + Sync>;

/// Builds, serves and receives snapshots.
pub struct SnapshotStore {
    dir: PathBuf,
    me: u64,
    latest: Mutex<Option<Manifest>>,
    building: AtomicBool,
    /// Configuration to put in snapshot metadata (the Raft thread tells it: `log_changed`).
    conf_state: Mutex<ConfState>,
    /// First index still in the Raft log (the Raft thread tells it: `log_changed`): a
    /// snapshot older than it cannot be followed by log entries, so it is rebuilt.
    log_first_index: AtomicU64,
    /// Asks the state machine to build a snapshot at its checkpoint (false: it is gone).
    builder: Mutex<Option<Builder>>,
    /// Failed builds so far, and the reason of the last one.
    failures: Mutex<(u64, String)>,
}

impl SnapshotStore {
    /// Opens `<data>/snapshots`, removing partial and received leftovers.
    pub fn open(dir: &Path, me: u64) -> Result<SnapshotStore> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut latest = None;
        for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("out-") && !name.ends_with(".tmp") {
                if let Ok(m) = fs::read(p.join("manifest.json"))
                    .map_err(|e| Error::io(&p, e))
                    .and_then(|b| Manifest::decode(&b))
                {
                    if latest.as_ref().is_none_or(|l: &Manifest| l.index < m.index) {
                        latest = Some(m);
                        continue;
                    }
                }
            }
            let _ = fs::remove_dir_all(&p);
        }
        Ok(SnapshotStore {
            dir: dir.to_path_buf(),
            me,
            latest: Mutex::new(latest),
            building: AtomicBool::new(false),
            conf_state: Mutex::new(ConfState::default()),
            log_first_index: AtomicU64::new(1),
            builder: Mutex::new(None),
            failures: Mutex::new((0, String::new())),
        })
    }

    /// The Raft thread's news: the log now starts at `first_index` (if it moved) and the
    /// applied configuration is `conf` (if it changed).
    pub fn log_changed(&self, first_index: Option<u64>, conf: Option<ConfState>) {
        if let Some(i) = first_index {
            self.log_first_index.store(i, Ordering::SeqCst);
        }
        if let Some(cs) = conf {
            *self.conf_state.lock() = cs;
        }
    }

    /// The applied configuration, as the Raft thread last told.
    pub fn conf_state(&self) -> ConfState {
        self.conf_state.lock().clone()
    }

    /// Connects the store to what builds snapshots (the state machine, which it asks for a
    /// new one when a follower needs it).
    pub fn set_builder(&self, ask: impl Fn() -> bool + Send + Sync + 'static) {
        *self.builder.lock() = Some(Box::new(ask));
    }

    fn out_dir(&self, index: u64, term: u64) -> PathBuf {
        self.dir.join(format!("out-{index}-{term}"))
    }

    /// Writes the pinned databases to a new snapshot on a background thread.
    pub fn build_in_background(
        self: &Arc<Self>,
        index: u64,
        term: u64,
        pinned: Vec<(String, Connection)>,
    ) {
        let me = self.clone();
        std::thread::Builder::new()
            .name("raftsql-snapshot".into())
            .spawn(move || {
                match me.build(index, term, pinned) {
                    Ok(m) => tracing::info!(
                        "snapshot at index {} term {} ready ({} files)",
                        m.index,
                        m.term,
                        m.files.len()
                    ),
                    Err(e) => {
                        tracing::warn!("building snapshot at index {index} failed: {e}");
                        me.build_failed(format!("writing the snapshot at index {index}: {e}"));
                    }
                }
                me.building.store(false, Ordering::SeqCst);
            })
            .expect("spawn snapshot thread");
    }

    fn build(&self, index: u64, term: u64, pinned: Vec<(String, Connection)>) -> Result<Manifest> {
        let tmp = self.dir.join(format!("out-{index}-{term}.tmp"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut files = Vec::new();
        for (name, conn) in pinned {
            let path = tmp.join(format!("{name}.db"));
            let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
            let mut w = BufWriter::new(f);
            let mut h = crc32fast::Hasher::new();
            let mut len = 0u64;
            {
                let mut st = conn.prepare("SELECT data FROM sqlite_dbpage ORDER BY pgno")?;
                let mut rows = st.query([])?;
                while let Some(r) = rows.next()? {
                    let page = r
                        .get_ref(0)?
                        .as_blob()
                        .map_err(|e| Error::Internal(e.to_string()))?;
                    h.update(page);
                    len += page.len() as u64;
                    w.write_all(page).map_err(|e| Error::io(&path, e))?;
                }
            }
            let _ = conn.execute_batch("COMMIT");
            let f = w
                .into_inner()
                .map_err(|e| Error::io(&path, e.into_error()))?;
            f.sync_all().map_err(|e| Error::io(&path, e))?;
            files.push(FileInfo {
                name: format!("{name}.db"),
                len,
                crc32: h.finalize(),
            });
        }
        let m = Manifest {
            index,
            term,
            from: self.me,
            files,
        };
        fs::write(tmp.join("manifest.json"), serde_json::to_vec(&m).unwrap())
            .map_err(|e| Error::io(&tmp, e))?;
        let out = self.out_dir(index, term);
        fs::rename(&tmp, &out).map_err(|e| Error::io(&out, e))?;
        let old = self.latest.lock().replace(m.clone());
        if let Some(old) = old {
            if (old.index, old.term) != (index, term) {
                let _ = fs::remove_dir_all(self.out_dir(old.index, old.term));
            }
        }
        Ok(m)
    }

    /// A snapshot of every database at an applied index of at least `min_index`: the newest
    /// one if it is recent enough, else a new one (built by the state machine at its applied
    /// index). Blocks until it is ready, or fails after `timeout`. For backups.
    pub fn fresh(&self, min_index: u64, timeout: std::time::Duration) -> Result<Manifest> {
        let deadline = std::time::Instant::now() + timeout;
        let failed_before = self.failures.lock().0;
        loop {
            if let Some(m) = self.latest.lock().as_ref() {
                if m.index >= min_index {
                    return Ok(m.clone());
                }
            }
            {
                let f = self.failures.lock();
                if f.0 != failed_before {
                    return Err(Error::Unavailable(format!(
                        "the snapshot could not be built: {}",
                        f.1
                    )));
                }
            }
            if !self.building.swap(true, Ordering::SeqCst) {
                match self.builder.lock().as_ref() {
                    Some(ask) if ask() => {}
                    _ => {
                        self.building.store(false, Ordering::SeqCst);
                        return Err(Error::Shutdown);
                    }
                }
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Timeout(timeout));
            }
            std::thread::sleep(BUILD_POLL);
        }
    }

    /// Called when a requested build failed (the state machine could not pin a database, or
    /// writing the files failed): the next request starts a new one, and callers waiting in
    /// [`SnapshotStore::fresh`] get the reason.
    pub fn build_failed(&self, why: String) {
        {
            let mut f = self.failures.lock();
            f.0 += 1;
            f.1 = why;
        }
        self.building.store(false, Ordering::SeqCst);
    }

    /// Reads a chunk of a file of the snapshot at (index, term).
    pub fn read_chunk(
        &self,
        index: u64,
        term: u64,
        file: &str,
        offset: u64,
    ) -> Result<(Bytes, bool)> {
        let known = self.latest.lock().as_ref().is_some_and(|m| {
            m.index == index && m.term == term && m.files.iter().any(|f| f.name == file)
        });
        if !known {
            return Err(Error::Invalid(format!(
                "no snapshot file {file} at index {index} term {term}"
            )));
        }
        let path = self.out_dir(index, term).join(file);
        let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = f.metadata().map_err(|e| Error::io(&path, e))?.len();
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| Error::io(&path, e))?;
        let mut buf = vec![0u8; CHUNK.min(len.saturating_sub(offset) as usize)];
        f.read_exact(&mut buf).map_err(|e| Error::io(&path, e))?;
        let eof = offset + buf.len() as u64 >= len;
        Ok((Bytes::from(buf), eof))
    }

    /// Where a received snapshot is assembled.
    pub fn incoming_dir(&self, m: &Manifest) -> PathBuf {
        self.dir.join(format!("in-{}-{}", m.index, m.term))
    }

    /// Pulls every file of `m` with `fetch(file, offset)`, checking lengths and checksums.
    pub async fn receive<F, Fut>(&self, m: &Manifest, mut fetch: F) -> Result<PathBuf>
    where
        F: FnMut(String, u64) -> Fut,
        Fut: std::future::Future<Output = Result<(Bytes, bool)>>,
    {
        let dir = self.incoming_dir(m);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // The sizes come from the network: refuse what cannot fit before writing any of it.
        let declared = m.files.iter().fold(0u64, |a, f| a.saturating_add(f.len));
        let free = fs2::available_space(&dir).map_err(|e| Error::io(&dir, e))?;
        if declared > free {
            let _ = fs::remove_dir_all(&dir);
            return Err(Error::Invalid(format!(
                "a snapshot of {declared} bytes does not fit in the {free} bytes free under {}",
                dir.display()
            )));
        }
        for fi in &m.files {
            let path = dir.join(&fi.name);
            let mut f = BufWriter::new(File::create(&path).map_err(|e| Error::io(&path, e))?);
            let mut h = crc32fast::Hasher::new();
            let mut off = 0u64;
            loop {
                let (data, eof) = fetch(fi.name.clone(), off).await?;
                if data.len() > CHUNK {
                    let _ = fs::remove_dir_all(&dir);
                    return Err(Error::Corrupt(format!(
                        "snapshot chunk of {} bytes (chunks are at most {CHUNK})",
                        data.len()
                    )));
                }
                h.update(&data);
                off += data.len() as u64;
                f.write_all(&data).map_err(|e| Error::io(&path, e))?;
                if off > fi.len {
                    return Err(Error::Corrupt(format!(
                        "snapshot file {} longer than its manifest says",
                        fi.name
                    )));
                }
                if eof || data.is_empty() {
                    break;
                }
            }
            f.flush().map_err(|e| Error::io(&path, e))?;
            let crc = h.finalize();
            if off != fi.len || crc != fi.crc32 {
                let _ = fs::remove_dir_all(&dir);
                return Err(Error::Corrupt(format!(
                    "snapshot file {}: got {off} bytes crc {crc:08x}, manifest says {} bytes crc {:08x}",
                    fi.name, fi.len, fi.crc32
                )));
            }
        }
        Ok(dir)
    }
}

impl crate::log::SnapshotProvider for SnapshotStore {
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let first = self.log_first_index.load(Ordering::SeqCst);
        if let Some(m) = self.latest.lock().as_ref() {
            if m.index >= request_index && m.index + 1 >= first {
                let mut s = Snapshot {
                    data: serde_json::to_vec(m).unwrap().into(),
                    ..Default::default()
                };
                let md = s.mut_metadata();
                md.index = m.index;
                md.term = m.term;
                md.set_conf_state(self.conf_state.lock().clone());
                return Ok(s);
            }
        }
        if !self.building.swap(true, Ordering::SeqCst) {
            if let Some(ask) = self.builder.lock().as_ref() {
                ask();
            }
        }
        Err(raft::Error::Store(
            raft::StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(files: Vec<FileInfo>) -> Manifest {
        Manifest {
            index: 5,
            term: 1,
            from: 2,
            files,
        }
    }

    fn file(name: &str, len: u64) -> FileInfo {
        FileInfo {
            name: name.into(),
            len,
            crc32: 0,
        }
    }

    #[test]
    fn declared_sizes_from_the_network_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path(), 1).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // More than the disk holds: refused before anything is fetched.
        let huge = manifest(vec![file("main.db", u64::MAX / 2)]);
        let e = rt
            .block_on(store.receive(&huge, |_, _| async { panic!("fetched") }))
            .unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        // A chunk over the chunk size.
        let m = manifest(vec![file("main.db", 10 << 20)]);
        let e = rt
            .block_on(store.receive(&m, |_, _| async {
                Ok((Bytes::from(vec![0u8; CHUNK + 1]), false))
            }))
            .unwrap_err();
        assert!(e.to_string().contains("chunks are at most"), "{e}");
        // Too many files, or one listed twice.
        let many = manifest(
            (0..=MAX_FILES)
                .map(|i| file(&format!("d{i}.db"), 1))
                .collect(),
        );
        let e = Manifest::decode(&serde_json::to_vec(&many).unwrap()).unwrap_err();
        assert!(e.to_string().contains("files (at most"), "{e}");
        let twice = manifest(vec![file("a.db", 1), file("a.db", 1)]);
        let e = Manifest::decode(&serde_json::to_vec(&twice).unwrap()).unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
    }
}
