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
  mod_sub INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_live_lease ON kv_live(lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lease (id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL, granted_ttl INTEGER NOT NULL);
";

/// The current state of every live key with its value, which is stored once, in the key's
/// newest `kv_rev` row (`kv_live` names it by `mod_rev`, `mod_sub`). `CROSS JOIN` keeps
/// `kv_live` the outer loop, so a range walks `kv_live`'s key order and seeks one `kv_rev`
/// row per key by its primary key.
const VIEW: &str = "
CREATE VIEW IF NOT EXISTS kv_now(key, create_rev, mod_rev, version, value, lease) AS
  SELECT l.key, l.create_rev, l.mod_rev, l.version, r.value, l.lease
  FROM kv_live AS l CROSS JOIN kv_rev AS r ON r.rev = l.mod_rev AND r.sub = l.mod_sub;
";

/// Schema 1 to 2: `kv_live` loses its copy of the value (a put wrote it twice) and gains
/// `mod_sub`, which names the `kv_rev` row holding it: the newest row of the key at its
/// `mod_rev` (compaction never removes a key's newest row, `prune_history`).
const MIGRATE_1_TO_2: &str = "
CREATE TABLE kv_live_2 (
  key BLOB PRIMARY KEY, create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL,
  mod_sub INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO kv_live_2(key, create_rev, mod_rev, mod_sub, version, lease)
  SELECT l.key, l.create_rev, l.mod_rev,
    (SELECT max(r.sub) FROM kv_rev AS r INDEXED BY kv_rev_key WHERE r.key = l.key AND r.rev = l.mod_rev),
    l.version, l.lease
  FROM kv_live AS l;
DROP TABLE kv_live;
ALTER TABLE kv_live_2 RENAME TO kv_live;
CREATE INDEX kv_live_lease ON kv_live(lease) WHERE lease != 0;
";

/// The schema's version, kept in the database's `user_version`: the DDL above runs when a
/// database is behind it (once, by the first write), not on every write. Reads of a database
/// still at version 1 (written by an older raftsql, no write since) read its `kv_live`
/// directly ([`values_in_kv_live`]).
pub(crate) const SCHEMA_VERSION: i64 = 2;

pub(crate) fn ensure_schema(c: &Connection) -> rusqlite::Result<()> {
    let v = schema_version(c)?;
    if v < SCHEMA_VERSION {
        if v == 1 {
            c.execute_batch(MIGRATE_1_TO_2)?;
        } else {
            c.execute_batch(SCHEMA)?;
        }
        c.execute_batch(VIEW)?;
        c.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
    }
    Ok(())
}

fn schema_version(c: &Connection) -> rusqlite::Result<i64> {
    c.prepare_cached("PRAGMA user_version")?
        .query_row([], |r| r.get(0))
}

/// Whether `c`'s database is still at schema 1 (written by an older raftsql, no write
/// since), whose `kv_live` holds the values: reads select from it instead of `kv_now`.
pub(crate) fn values_in_kv_live(c: &Connection) -> rusqlite::Result<bool> {
    Ok(schema_version(c)? < 2)
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
