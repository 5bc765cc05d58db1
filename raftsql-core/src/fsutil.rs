//! File-system helpers shared by every layer that writes files: atomic writes, directory
//! fsyncs, and the rule for database names (each becomes a file name).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Syncs a directory, so that the names created, renamed or removed in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// `path` with `suffix` appended to its file name: `FILE-wal`, `FILE.tmp` beside `FILE`
/// (never another file that happens to share its stem, as `with_extension` would give).
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Writes `data` to `path` atomically and durably (temp file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    fsync_dir(path.parent().unwrap())
}

/// Checks a database name: 1-64 of `[A-Za-z0-9_-]`.
pub fn check_db_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Error::Invalid(format!(
            "bad database name {name:?}: use 1 to 64 letters, digits, '_' or '-'"
        )));
    }
    Ok(())
}
