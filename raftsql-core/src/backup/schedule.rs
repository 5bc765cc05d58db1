//! Scheduled backups (`raftsql node --backup-dir DIR --backup-every 12h --backup-keep 5`).
//!
//! Every node given a backup directory saves a backup of its own replica there on the
//! schedule, as k3s takes its etcd snapshots on every server: a leader change does not stop
//! them, and each machine holds its own copies. A file is the one `raftsql snapshot save`
//! writes ([`crate::backup`]), made in process by [`backup::save_local`] after a linearizable
//! barrier, so that a follower's copy holds every write acknowledged before it started.
//!
//! Files are named `<cluster>-node<id>-<UTC time, YYYYMMDDTHHMMSS.mmmZ>.rsqlbak`; the time is
//! fixed-width, so name order is time order.
//!
//! Invariants (test: `tests/tests/operations.rs`, `scheduled_backups_keep_n_verified_files`):
//! - A `*.rsqlbak` file in the directory is complete and was checked end to end: it is
//!   written as `NAME.rsqlbak.partial`, synced, read back completely ([`backup::verify`]),
//!   and only then renamed to its name.
//! - Old backups are deleted only after a new one verified, and only this node's own (its
//!   cluster and node id prefix); the newest `keep` stay. Files of other nodes or clusters
//!   that share the directory are never touched.
//! - A crash leaves at most a `.partial` file, removed when the schedule starts again.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{self as backup, BackupHeader};
use crate::error::{Error, Result};
use crate::node::{Node, WeakNode};

/// The shortest schedule accepted.
const MIN_EVERY: Duration = Duration::from_secs(1);

/// Extension of backup files.
pub const EXTENSION: &str = "rsqlbak";
/// After a failed attempt (no leader during an election, a full disk), the next try comes
/// this soon (or at the next scheduled time, if that is sooner).
const RETRY: Duration = Duration::from_secs(30);

/// When and where a node saves its backups.
#[derive(Clone, Debug)]
pub struct BackupSchedule {
    /// The directory (created if missing).
    pub dir: PathBuf,
    /// Time between the starts of two backups (at least one second).
    pub every: Duration,
    /// How many of this node's backups to keep (at least one).
    pub keep: usize,
}

impl BackupSchedule {
    /// Refuses a schedule that cannot work (checked by [`spawn`]; call it before starting a
    /// node to fail early).
    pub fn check(&self) -> Result<()> {
        if self.every < MIN_EVERY {
            return Err(Error::Invalid(format!(
                "--backup-every {:?} is too short: give at least {MIN_EVERY:?}",
                self.every
            )));
        }
        if self.keep == 0 {
            return Err(Error::Invalid(
                "--backup-keep 0 would delete every backup: keep at least 1".into(),
            ));
        }
        if self.dir.exists() && !self.dir.is_dir() {
            return Err(Error::Invalid(format!(
                "{} exists and is not a directory",
                self.dir.display()
            )));
        }
        Ok(())
    }
}

/// One file of a backup directory, as [`list`] found it.
#[derive(Debug)]
pub struct Listed {
    /// The file.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Its header if the whole file checks out, or why it does not.
    pub verdict: Result<BackupHeader>,
}

/// Starts saving backups of `node` on `schedule`, in a task of the current runtime; it ends
/// when the node stops. The first backup is due `every` after the newest one this node left
/// in the directory (at once if there is none).
pub fn spawn(node: &Node, schedule: BackupSchedule) -> Result<tokio::task::JoinHandle<()>> {
    schedule.check()?;
    let dir = &schedule.dir;
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let prefix = prefix(&node.config().cluster, node.id());
    let mut newest: Option<SystemTime> = None;
    for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".partial") || name.ends_with(".partial.tmp") {
            tracing::info!("removing {name}, a backup that was not finished");
            let _ = fs::remove_file(e.path());
        } else if name.starts_with(&prefix) && name.ends_with(EXTENSION) {
            let t = e.metadata().and_then(|m| m.modified()).ok();
            newest = newest.max(t);
        }
    }
    let first = newest
        .and_then(|t| (t + schedule.every).duration_since(SystemTime::now()).ok())
        .unwrap_or_default();
    tracing::info!(
        "backups every {:?} into {} (keeping {}), the next in {:?}",
        schedule.every,
        dir.display(),
        schedule.keep,
        first
    );
    Ok(tokio::spawn(run(node.downgrade(), schedule, prefix, first)))
}

async fn run(weak: WeakNode, s: BackupSchedule, prefix: String, first: Duration) {
    let mut delay = first;
    loop {
        tokio::time::sleep(delay).await;
        let Some(node) = weak.upgrade() else { return };
        let started = Instant::now();
        match once(&node, &s, &prefix).await {
            Ok((path, header, bytes, pruned)) => {
                tracing::info!(
                    "backup {} saved: index {} (term {}), {} bytes in {:.2?}; {} old removed",
                    path.display(),
                    header.index,
                    header.term,
                    bytes,
                    started.elapsed(),
                    pruned
                );
                let m = node.metrics();
                m.backup_last_success.set(unix_secs(SystemTime::now()));
                m.backup_last_bytes.set(bytes as i64);
                delay = s.every.saturating_sub(started.elapsed());
            }
            Err(e) => {
                tracing::warn!(
                    "backup into {} failed: {e}; trying again in {:?}",
                    s.dir.display(),
                    RETRY.min(s.every)
                );
                node.metrics().backup_failures.inc();
                delay = RETRY.min(s.every);
            }
        }
    }
}

/// Saves, verifies and renames one backup, then prunes. Returns its path, header, size and
/// how many old ones were removed.
async fn once(
    node: &Node,
    s: &BackupSchedule,
    prefix: &str,
) -> Result<(PathBuf, BackupHeader, u64, usize)> {
    let name = format!("{prefix}{}.{EXTENSION}", stamp(SystemTime::now()));
    let partial = s.dir.join(format!("{name}.partial"));
    let path = s.dir.join(&name);
    let (_, bytes) = match backup::save_local(node, &partial).await {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
    };
    let (dir, keep, prefix) = (s.dir.clone(), s.keep, prefix.to_string());
    tokio::task::spawn_blocking(move || {
        // Read back what reached the disk, not what we meant to write.
        let header = match backup::verify(&partial) {
            Ok(h) => h,
            Err(e) => {
                let _ = fs::remove_file(&partial);
                return Err(e);
            }
        };
        fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
        crate::fsutil::fsync_dir(&dir)?;
        let pruned = prune(&dir, &prefix, keep)?;
        Ok((path, header, bytes, pruned))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
}

/// Deletes all but the newest `keep` of the backups named `prefix...`. Returns how many.
fn prune(dir: &Path, prefix: &str, keep: usize) -> Result<usize> {
    let mut own: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(prefix) && n.ends_with(&format!(".{EXTENSION}"))
        })
        .map(|e| e.path())
        .collect();
    own.sort();
    let old = own.len().saturating_sub(keep);
    for p in &own[..old] {
        fs::remove_file(p).map_err(|e| Error::io(p, e))?;
    }
    if old > 0 {
        crate::fsutil::fsync_dir(dir)?;
    }
    Ok(old)
}

/// Every `*.rsqlbak` file of `dir`, each checked completely, newest first (by the time its
/// header records; a file that does not check out by its modification time).
pub fn list(dir: &Path) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let path = e.path();
        if path.extension().is_none_or(|x| x != EXTENSION) || !path.is_file() {
            continue;
        }
        let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
        let verdict = backup::verify(&path);
        out.push(Listed {
            path,
            bytes,
            verdict,
        });
    }
    let key = |l: &Listed| match &l.verdict {
        Ok(h) => h.created_unix_ms,
        Err(_) => fs::metadata(&l.path)
            .and_then(|m| m.modified())
            .map(|t| unix_secs(t) as u64 * 1000)
            .unwrap_or(0),
    };
    out.sort_by_key(|l| std::cmp::Reverse(key(l)));
    Ok(out)
}

/// The newest backup of `dir` that checks out, and the newer ones skipped because they do
/// not (each with its reason).
pub fn newest_good(dir: &Path) -> Result<(Listed, Vec<Listed>)> {
    let mut skipped = Vec::new();
    for l in list(dir)? {
        if l.verdict.is_ok() {
            return Ok((l, skipped));
        }
        skipped.push(l);
    }
    Err(Error::Corrupt(format!(
        "no backup in {} checks out ({} file(s) named *.{EXTENSION} do not)",
        dir.display(),
        skipped.len()
    )))
}

/// `<cluster>-node<id>-`, with anything but letters, digits, '-' and '_' in the cluster
/// name replaced by '_' (it becomes part of a file name).
fn prefix(cluster: &str, id: u64) -> String {
    let c: String = cluster
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{c}-node{id}-")
}

/// `YYYYMMDDTHHMMSS.mmmZ` (UTC).
fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time_and_prune_keeps_only_the_newest_own() {
        let t = UNIX_EPOCH + Duration::from_millis(1_796_300_000_123);
        let s = stamp(t);
        assert_eq!(s.len(), "20261203T123456.789Z".len(), "{s}");
        assert!(stamp(t + Duration::from_millis(1)) > s);
        assert!(stamp(t + Duration::from_secs(86_400 * 40)) > s);
        assert_eq!(prefix("my cluster/1", 3), "my_cluster_1-node3-");

        let dir = tempfile::tempdir().unwrap();
        let p = prefix("c", 1);
        for i in 0..5u64 {
            let name = format!("{p}{}.{EXTENSION}", stamp(t + Duration::from_secs(i)));
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        let other = format!("{}{}.{EXTENSION}", prefix("c", 2), stamp(t));
        fs::write(dir.path().join(&other), b"x").unwrap();
        assert_eq!(prune(dir.path(), &p, 2).unwrap(), 3);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let newest: Vec<String> = (3..5u64)
            .map(|i| format!("{p}{}.{EXTENSION}", stamp(t + Duration::from_secs(i))))
            .collect();
        assert_eq!(left, [newest, vec![other]].concat());
    }
}
