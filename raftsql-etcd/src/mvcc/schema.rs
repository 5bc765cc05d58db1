//! The tables, their creation, and the `meta` values (the store's revision, the compaction
//! revision).

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{encode_err, R};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv_rev (
  rev INTEGER NOT NULL, sub INTEGER NOT NULL, key BLOB NOT NULL,
  create_rev INTEGER NOT NULL, version INTEGER NOT NULL, value BLOB NOT NULL, lease INTEGER NOT NULL,
  PRIMARY KEY (rev, sub)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_rev_key ON kv_rev(key, rev);
CREATE TABLE IF NOT EXISTS kv_live (
  key BLOB PRIMARY KEY, create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL,
  version INTEGER NOT NULL, value BLOB NOT NULL, lease INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_live_lease ON kv_live(lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lease (id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL, granted_ttl INTEGER NOT NULL);
";

/// The schema's version, kept in the database's `user_version`: the DDL above runs when a
/// database is behind it (once), not on every write.
pub(crate) const SCHEMA_VERSION: i64 = 1;

pub(crate) fn ensure_schema(c: &Connection) -> rusqlite::Result<()> {
    let v: i64 = c
        .prepare_cached("PRAGMA user_version")?
        .query_row([], |r| r.get(0))?;
    if v < SCHEMA_VERSION {
        c.execute_batch(SCHEMA)?;
        c.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
    }
    Ok(())
}

pub(crate) fn meta(c: &Connection, name: &str, default: i64) -> R<i64> {
    Ok(c.prepare_cached("SELECT value FROM meta WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?
        .unwrap_or(default))
}

pub(crate) fn set_meta(c: &Connection, name: &str, v: i64) -> R<()> {
    c.prepare_cached("INSERT INTO meta(name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = excluded.value")?
        .execute(params![name, v])?;
    Ok(())
}

pub(crate) fn has_table(c: &Connection, name: &str) -> rusqlite::Result<bool> {
    Ok(
        c.prepare_cached("SELECT 1 FROM sqlite_schema WHERE name = ?1")?
            .query_row([name], |_| Ok(()))
            .optional()?
            .is_some(),
    )
}

/// True if the table `name` exists (the schema is created by the first write).
/// The store's revision on `c`, or `None` before the first write made the schema.
pub(crate) fn current_rev_in(c: &Connection) -> raftsql_core::Result<Option<i64>> {
    if !has_table(c, "meta")? {
        return Ok(None);
    }
    Ok(Some(meta(c, "rev", 1).map_err(encode_err)?))
}
