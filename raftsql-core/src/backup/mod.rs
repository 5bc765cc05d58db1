//! Backups: a consistent, checksummed copy of every database of a cluster in one file
//! (`raftsql snapshot save`), and a new single-node cluster made from one (`raftsql snapshot
//! restore`), which other nodes can then join.
//!
//! Saving asks one member for a snapshot through the `raftsql.backup` service. The member
//! first passes a linearizable barrier (a ReadIndex round through the leader), so the copy
//! holds every write acknowledged before the request; then it takes a Raft snapshot at its
//! applied index (every database read in one pinned read transaction, the same snapshot a
//! lagging follower receives), and the saver pulls its files in 1 MiB chunks, checking each
//! file's length and crc32 against the snapshot's manifest.
//!
//! The file format (all integers little-endian):
//!
//! ```text
//! "RSQLBAK1"                      magic, 8 bytes
//! u32 header length, header       JSON: BackupHeader (index, term, cluster, files)
//! u32 crc32(header)
//! file 1 bytes, file 2 bytes, ... each as long as the header says
//! "RSQLEND1"                      trailer magic
//! u32 crc32(every byte before the trailer magic)
//! ```
//!
//! Invariant: restore writes nothing unless the whole file checks out (magic, header crc,
//! exact length, every file's crc, the whole-file crc), and it builds the new data directory
//! beside the target and renames it into place, so a failed restore leaves no directory.

pub mod schedule;

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use raft::eraftpb::{ConfState, SnapshotMetadata};
use raftsql_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::consistency::Consistency;
use crate::error::{Error, Result};
use crate::fsutil::with_suffix;
use crate::log::RaftLog;
use crate::members::{rewrite_registry_file, SYSTEM_DB};
use crate::net::conn::RpcConn;
use crate::node::{Node, NodeFile, ServiceHandler, WeakNode};
use crate::snapshot::{FileInfo, Manifest, SnapshotStore};
use crate::state::{self, Meta};

/// Past the snapshot's own timeout, how long a backup offer's answer may take.
const OFFER_GRACE: Duration = Duration::from_secs(10);

/// The service a saver calls on any member.
pub const BACKUP_SERVICE: &str = "raftsql.backup";
const MAGIC: &[u8; 8] = b"RSQLBAK1";
const TRAILER: &[u8; 8] = b"RSQLEND1";
/// Headers are small (a few names and numbers); anything larger is not a backup.
const MAX_HEADER: u32 = 1 << 20;
/// How long a member may take to make the snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

/// What a backup file says about itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupHeader {
    /// Format version (1).
    pub format: u32,
    /// The cluster's name.
    pub cluster: String,
    /// The last Raft entry the databases hold.
    pub index: u64,
    /// Its term.
    pub term: u64,
    /// When the snapshot was saved (Unix milliseconds).
    pub created_unix_ms: u64,
    /// The database files, in the order their bytes follow the header.
    pub files: Vec<FileInfo>,
}

impl BackupHeader {
    /// Total bytes of database files.
    pub fn data_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }
}

/// The service's answer: the snapshot to pull, and the cluster it belongs to.
#[derive(Serialize, Deserialize)]
struct Offer {
    cluster: String,
    manifest: Manifest,
}

struct Service(WeakNode);

impl ServiceHandler for Service {
    fn call(
        &self,
        _payload: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes>> + Send>> {
        let weak = self.0.clone();
        Box::pin(async move {
            let node = weak.upgrade().ok_or(Error::Shutdown)?;
            let offer = make_offer(&node).await?;
            Ok(serde_json::to_vec(&offer).unwrap().into())
        })
    }
}

/// Registers the backup service (called by `Node::start`).
pub(crate) fn start(node: &Node) {
    node.register_client_service(BACKUP_SERVICE, Arc::new(Service(node.downgrade())));
}

/// What [`save`] wrote.
#[derive(Clone, Debug)]
pub struct SaveReport {
    /// The backup file.
    pub path: PathBuf,
    /// Its header.
    pub header: BackupHeader,
    /// The member that made the snapshot.
    pub from: SocketAddr,
    /// Size of the file.
    pub file_bytes: u64,
}

/// Saves a backup of the cluster to `path`, from the first of `endpoints` that answers.
/// `progress(done, total)` is called as database bytes arrive. Writes `path` only once the
/// copy is complete and checked (through a temporary file renamed into place).
pub async fn save(
    dialer: &crate::net::Dialer,
    endpoints: &[SocketAddr],
    cluster: &str,
    path: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<SaveReport> {
    let mut last = Error::Unavailable("no endpoint given".into());
    // A member keeps only its newest snapshot: if Raft replaces it while we pull, start over.
    for _attempt in 0..3 {
        for ep in endpoints {
            let mut conn =
                match RpcConn::connect(dialer, crate::net::Peer::Endpoint, *ep, 0, cluster, None)
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        last = Error::Unavailable(format!("cannot reach {ep}: {e}"));
                        continue;
                    }
                };
            let offer = match call(&mut conn, *ep).await {
                Ok(o) => o,
                Err(e @ (Error::Unavailable(_) | Error::NotLeader { .. } | Error::Timeout(_))) => {
                    last = e;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match pull(&offer, path, &mut progress, Source::Member(&mut conn)).await {
                Ok((header, file_bytes)) => {
                    return Ok(SaveReport {
                        path: path.to_path_buf(),
                        header,
                        from: *ep,
                        file_bytes,
                    })
                }
                Err(e @ Error::Invalid(_)) => {
                    tracing::info!("snapshot replaced while saving ({e}); starting over");
                    last = e;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Err(last)
}

async fn call(conn: &mut RpcConn, ep: SocketAddr) -> Result<Offer> {
    let body = pb::request::Body::Service(pb::ServiceCall {
        service: BACKUP_SERVICE.into(),
        payload: Bytes::new(),
    });
    let timeout = SNAPSHOT_TIMEOUT + OFFER_GRACE;
    match tokio::time::timeout(timeout, conn.call(body)).await {
        Ok(Ok(pb::response::Body::Service(r))) => serde_json::from_slice(&r.payload)
            .map_err(|e| Error::Transport(format!("{ep}: malformed backup offer: {e}"))),
        Ok(Ok(pb::response::Body::Error(e))) => Err(crate::client::from_pb(e)),
        Ok(Ok(_)) => Err(Error::Transport(format!("{ep}: unexpected answer"))),
        Ok(Err(e)) => Err(Error::Unavailable(format!("{ep}: {e}"))),
        Err(_) => Err(Error::Timeout(timeout)),
    }
}

/// Saves a backup of what this node holds to `path`, without the network: it first passes a
/// linearizable barrier (so the copy holds every write acknowledged before the call, on a
/// follower too), then copies the Raft snapshot at its applied index, as [`save`] does through
/// a member. Used by scheduled backups ([`schedule`]).
pub async fn save_local(node: &Node, path: &Path) -> Result<(BackupHeader, u64)> {
    let mut last = Error::Unavailable("no attempt".into());
    // A member keeps only its newest snapshot: if Raft replaces it while we copy, start over.
    for _attempt in 0..3 {
        let offer = make_offer(node).await?;
        let local = Source::Local(node.snapshots());
        match pull(&offer, path, &mut |_, _| {}, local).await {
            Ok(r) => return Ok(r),
            Err(e @ Error::Invalid(_)) => {
                tracing::info!("snapshot replaced while saving ({e}); starting over");
                last = e;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// After a linearizable barrier, a snapshot of this node at (at least) its applied index.
async fn make_offer(node: &Node) -> Result<Offer> {
    // Everything acknowledged before this call is applied here once this returns.
    node.read(SYSTEM_DB, Consistency::Linearizable, |_| Ok(()))
        .await?;
    let min = *node.subscribe_applied().borrow();
    let store = node.snapshots();
    let manifest = tokio::task::spawn_blocking(move || store.fresh(min, SNAPSHOT_TIMEOUT))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    Ok(Offer {
        cluster: node.config().cluster.clone(),
        manifest,
    })
}

/// Where a snapshot's chunks come from.
enum Source<'a> {
    /// The member that made it, through the connection its offer came on.
    Member(&'a mut RpcConn),
    /// This node's own snapshot store.
    Local(Arc<SnapshotStore>),
}

impl Source<'_> {
    /// The chunk of `file` of the snapshot at (index, term) that starts at `offset`.
    async fn fetch(&mut self, index: u64, term: u64, file: &str, offset: u64) -> Result<Bytes> {
        match self {
            Source::Member(conn) => {
                let body = pb::request::Body::SnapshotChunk(pb::SnapshotChunkRequest {
                    index,
                    term,
                    file: file.to_string(),
                    offset,
                });
                match conn.call(body).await {
                    Ok(pb::response::Body::SnapshotChunk(c)) => Ok(c.data),
                    Ok(pb::response::Body::Error(e)) => Err(crate::client::from_pb(e)),
                    Ok(_) => Err(Error::Transport("unexpected answer".into())),
                    Err(e) => Err(Error::Unavailable(e.to_string())),
                }
            }
            Source::Local(store) => {
                let (store, file) = (store.clone(), file.to_string());
                tokio::task::spawn_blocking(move || store.read_chunk(index, term, &file, offset))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))?
                    .map(|(data, _eof)| data)
            }
        }
    }
}

/// Writes the offered snapshot to `path` (through `path` + `.tmp`), its files' bytes read
/// from `source` one chunk at a time. Returns the header and the file's size.
async fn pull(
    offer: &Offer,
    path: &Path,
    progress: &mut impl FnMut(u64, u64),
    mut source: Source<'_>,
) -> Result<(BackupHeader, u64)> {
    let m = &offer.manifest;
    let header = BackupHeader {
        format: 1,
        cluster: offer.cluster.clone(),
        index: m.index,
        term: m.term,
        created_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        files: m.files.clone(),
    };
    let total = header.data_bytes();
    let tmp = with_suffix(path, ".tmp");
    let result = async {
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = CrcWriter::new(BufWriter::new(f));
        let hjson = serde_json::to_vec(&header).unwrap();
        w.put(MAGIC, &tmp)?;
        w.put(&(hjson.len() as u32).to_le_bytes(), &tmp)?;
        w.put(&hjson, &tmp)?;
        w.put(&crc32fast::hash(&hjson).to_le_bytes(), &tmp)?;
        let mut done = 0u64;
        progress(0, total);
        for fi in &m.files {
            let mut h = crc32fast::Hasher::new();
            let mut off = 0u64;
            while off < fi.len {
                let data = source.fetch(m.index, m.term, &fi.name, off).await?;
                if data.is_empty() || off + data.len() as u64 > fi.len {
                    return Err(Error::Corrupt(format!(
                        "snapshot file {} does not have the length its manifest says ({})",
                        fi.name, fi.len
                    )));
                }
                h.update(&data);
                w.put(&data, &tmp)?;
                off += data.len() as u64;
                done += data.len() as u64;
                progress(done, total);
            }
            let crc = h.finalize();
            if crc != fi.crc32 {
                return Err(Error::Corrupt(format!(
                    "snapshot file {}: crc {crc:08x}, manifest says {:08x}",
                    fi.name, fi.crc32
                )));
            }
        }
        let crc = w.crc();
        w.put(TRAILER, &tmp)?;
        w.put(&crc.to_le_bytes(), &tmp)?;
        let bytes = w.written;
        let f = w
            .inner
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        Ok(bytes)
    }
    .await;
    match result {
        Ok(bytes) => {
            fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = File::open(dir).and_then(|d| d.sync_all());
            }
            Ok((header, bytes))
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// A writer that keeps a crc32 of everything written and counts the bytes.
struct CrcWriter<W: Write> {
    inner: W,
    hasher: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> CrcWriter<W> {
    fn new(inner: W) -> Self {
        CrcWriter {
            inner,
            hasher: crc32fast::Hasher::new(),
            written: 0,
        }
    }

    fn put(&mut self, b: &[u8], path: &Path) -> Result<()> {
        self.hasher.update(b);
        self.written += b.len() as u64;
        self.inner.write_all(b).map_err(|e| Error::io(path, e))
    }

    fn crc(&self) -> u32 {
        self.hasher.clone().finalize()
    }
}

/// Reads a backup file, checking everything; `sink(file, bytes)` receives each database
/// file's bytes as they are read (in order). Returns the header.
fn read_backup(
    path: &Path,
    mut sink: impl FnMut(&FileInfo, &[u8]) -> Result<()>,
) -> Result<BackupHeader> {
    let bad = |what: String| Error::Corrupt(format!("{}: {what}", path.display()));
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut hasher = crc32fast::Hasher::new();
    let mut read = |buf: &mut [u8], hasher: &mut crc32fast::Hasher| -> Result<()> {
        r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad("truncated".into())
            } else {
                Error::io(path, e)
            }
        })?;
        hasher.update(buf);
        Ok(())
    };
    let mut magic = [0u8; 8];
    read(&mut magic, &mut hasher).map_err(|_| bad("not a raftsql backup (too short)".into()))?;
    if &magic != MAGIC {
        return Err(bad("not a raftsql backup (wrong magic)".into()));
    }
    let mut n = [0u8; 4];
    read(&mut n, &mut hasher)?;
    let hlen = u32::from_le_bytes(n);
    if hlen > MAX_HEADER {
        return Err(bad(format!("header length {hlen} is not plausible")));
    }
    let mut hjson = vec![0u8; hlen as usize];
    read(&mut hjson, &mut hasher)?;
    read(&mut n, &mut hasher)?;
    if crc32fast::hash(&hjson) != u32::from_le_bytes(n) {
        return Err(bad("header checksum mismatch".into()));
    }
    let header: BackupHeader =
        serde_json::from_slice(&hjson).map_err(|e| bad(format!("header: {e}")))?;
    if header.format != 1 {
        return Err(bad(format!("format {} is not supported", header.format)));
    }
    for fi in &header.files {
        let stem = fi.name.strip_suffix(".db").unwrap_or("");
        state::check_db_name(stem).map_err(|_| bad(format!("file name {:?}", fi.name)))?;
    }
    let expected = 8 + 4 + hlen as u64 + 4 + header.data_bytes() + 8 + 4;
    if size < expected {
        return Err(bad(format!("truncated: {size} bytes, {expected} expected")));
    }
    if size > expected {
        return Err(bad(format!(
            "{} unexpected bytes after the end ({size} bytes, {expected} expected)",
            size - expected
        )));
    }
    let mut buf = vec![0u8; 1 << 20];
    for fi in &header.files {
        let mut h = crc32fast::Hasher::new();
        let mut left = fi.len;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            read(&mut buf[..k], &mut hasher)?;
            h.update(&buf[..k]);
            sink(fi, &buf[..k])?;
            left -= k as u64;
        }
        if h.finalize() != fi.crc32 {
            return Err(bad(format!(
                "database file {} is corrupt (checksum mismatch)",
                fi.name
            )));
        }
    }
    let whole = hasher.clone().finalize();
    let mut trailer = [0u8; 12];
    read(&mut trailer, &mut hasher)?;
    if &trailer[..8] != TRAILER {
        return Err(bad("trailer missing".into()));
    }
    if u32::from_le_bytes(trailer[8..].try_into().unwrap()) != whole {
        return Err(bad("checksum mismatch".into()));
    }
    Ok(header)
}

/// Checks a backup file completely without writing anything; returns its header.
pub fn verify(path: &Path) -> Result<BackupHeader> {
    read_backup(path, |_, _| Ok(()))
}

/// What [`restore`] made.
#[derive(Clone, Debug)]
pub struct RestoreReport {
    /// The backup's header.
    pub header: BackupHeader,
    /// The new data directory.
    pub data_dir: PathBuf,
    /// The new node's id.
    pub id: u64,
    /// Its address.
    pub listen: SocketAddr,
    /// Members of the old cluster dropped from the registry.
    pub dropped_members: usize,
}

/// Makes `data_dir` (absent or empty) the data directory of node `id` at `listen`, the only
/// voter of a new cluster holding the backup's databases. Checks the whole backup first and
/// writes nothing if any check fails.
pub fn restore(
    path: &Path,
    data_dir: &Path,
    id: u64,
    listen: SocketAddr,
    cluster: Option<&str>,
) -> Result<RestoreReport> {
    if id == 0 {
        return Err(Error::Invalid("node id must be non-zero".into()));
    }
    if let Ok(mut rd) = fs::read_dir(data_dir) {
        if rd.next().is_some() {
            return Err(Error::Invalid(format!(
                "{} is not empty: a restore makes a new node, give it an empty directory",
                data_dir.display()
            )));
        }
    } else if data_dir.exists() {
        return Err(Error::Invalid(format!(
            "{} exists and is not a directory",
            data_dir.display()
        )));
    }
    // First pass: check everything before writing anything.
    let header = verify(path)?;
    if header.index == 0 {
        return Err(Error::Corrupt(format!(
            "{}: the backup is at index 0 (an empty cluster)",
            path.display()
        )));
    }
    let name = data_dir
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a directory name", data_dir.display())))?;
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(format!(
        ".{}.restoring-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    let result = build(path, &header, &tmp, id, listen, cluster);
    let dropped = match result {
        Ok(d) => d,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if data_dir.exists() {
        fs::remove_dir(data_dir).map_err(|e| Error::io(data_dir, e))?;
    }
    fs::rename(&tmp, data_dir).map_err(|e| Error::io(data_dir, e))?;
    let _ = File::open(&parent).and_then(|d| d.sync_all());
    Ok(RestoreReport {
        header,
        data_dir: data_dir.to_path_buf(),
        id,
        listen,
        dropped_members: dropped,
    })
}

/// Writes the new data directory into `dir`. Returns how many old members were dropped.
fn build(
    path: &Path,
    header: &BackupHeader,
    dir: &Path,
    id: u64,
    listen: SocketAddr,
    cluster: Option<&str>,
) -> Result<usize> {
    let gen = dir.join("state").join("gen-0");
    fs::create_dir_all(&gen).map_err(|e| Error::io(&gen, e))?;
    // Second pass: extract, checking again (the file may have changed since the first).
    let mut open: Option<(String, BufWriter<File>)> = None;
    let finish = |open: &mut Option<(String, BufWriter<File>)>| -> Result<()> {
        if let Some((name, w)) = open.take() {
            let p = gen.join(&name);
            let f = w.into_inner().map_err(|e| Error::io(&p, e.into_error()))?;
            f.sync_all().map_err(|e| Error::io(&p, e))?;
        }
        Ok(())
    };
    for fi in &header.files {
        // Files may be empty (no chunks): create every one up front.
        let p = gen.join(&fi.name);
        File::create(&p).map_err(|e| Error::io(&p, e))?;
    }
    let again = read_backup(path, |fi, data| {
        if open.as_ref().is_none_or(|(n, _)| *n != fi.name) {
            finish(&mut open)?;
            let p = gen.join(&fi.name);
            let f = fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&p)
                .map_err(|e| Error::io(&p, e))?;
            open = Some((fi.name.clone(), BufWriter::with_capacity(1 << 20, f)));
        }
        let (name, w) = open.as_mut().unwrap();
        w.write_all(data)
            .map_err(|e| Error::io(gen.join(&*name), e))
    })?;
    finish(&mut open)?;
    if &again != header {
        return Err(Error::Corrupt(format!(
            "{} changed while restoring",
            path.display()
        )));
    }
    // The old cluster's members and tokens mean nothing here.
    let event = pb::ClusterEvent {
        node: id,
        kind: "role".into(),
        term: header.term,
        from_role: "new".into(),
        to_role: crate::roles::Role::Voter.as_str().into(),
        reason: format!(
            "restored from a backup of cluster {:?} at index {} (a new cluster)",
            header.cluster, header.index
        ),
        ..Default::default()
    };
    let system_db = gen.join(format!("{SYSTEM_DB}.db"));
    let dropped = rewrite_registry_file(&system_db, None, &[], event)?.len();
    let meta = Meta {
        checkpoint_index: header.index,
        checkpoint_term: header.term,
        voters: vec![id],
        learners: Vec::new(),
        checkpoint_target: 0,
    };
    crate::fsutil::write_atomic(&gen.join("meta.json"), &serde_json::to_vec(&meta).unwrap())?;
    crate::fsutil::write_atomic(&dir.join("state").join("CURRENT"), b"gen-0")?;
    let mut log = RaftLog::open(&dir.join("raft"))?;
    let mut md = SnapshotMetadata {
        index: header.index,
        term: header.term,
        ..Default::default()
    };
    md.set_conf_state(ConfState {
        voters: vec![id],
        ..Default::default()
    });
    log.apply_snapshot(&md)?;
    drop(log);
    NodeFile {
        id,
        cluster: cluster.unwrap_or(&header.cluster).to_string(),
        peers: [(id, listen)].into_iter().collect(),
        joined: false,
        left: false,
    }
    .store(dir)?;
    Ok(dropped)
}
