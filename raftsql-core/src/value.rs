//! Typed SQL values, statements and results, and their wire forms.

use raftsql_proto::v1 as pb;
use rusqlite::types::{ToSqlOutput, ValueRef};

/// Splits SQL text into its statements as SQLite's shell does: a `;` ends a statement only
/// where `sqlite3_complete` says the text so far is complete (not inside a string, a
/// comment or a trigger body). Text after the last complete statement is one more statement
/// (running it reports what is wrong with it); empty statements are dropped.
pub fn split_sql(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in sql.match_indices(';') {
        let piece = &sql[start..=i];
        let Ok(c) = std::ffi::CString::new(piece) else {
            break; // a NUL byte: leave the rest to SQLite, which refuses it
        };
        // SAFETY: `c` is a NUL-terminated string that outlives the call; sqlite3_complete
        // only reads it.
        if unsafe { rusqlite::ffi::sqlite3_complete(c.as_ptr()) } != 0 {
            let t = piece.trim().trim_end_matches(';').trim();
            if !t.is_empty() {
                out.push(t.to_string());
            }
            start = i + 1;
        }
    }
    let rest = sql[start..].trim();
    if !rest.is_empty() {
        out.push(rest.to_string());
    }
    out
}

/// One SQL value, as SQLite types it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit signed integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(f) => ValueRef::Real(*f),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl From<ValueRef<'_>> for Value {
    fn from(v: ValueRef<'_>) -> Self {
        match v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(f) => Value::Real(f),
            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident),*) => { $(impl From<$t> for Value { fn from(x: $t) -> Self { Value::$v(x.into()) } })* };
}
value_from!(i64 => Integer, i32 => Integer, f64 => Real, String => Text, &str => Text, Vec<u8> => Blob);

impl From<&Value> for pb::Value {
    fn from(v: &Value) -> Self {
        use pb::value::Kind;
        pb::Value {
            kind: Some(match v {
                Value::Null => Kind::Null(true),
                Value::Integer(i) => Kind::Integer(*i),
                Value::Real(f) => Kind::Real(*f),
                Value::Text(s) => Kind::Text(s.clone()),
                Value::Blob(b) => Kind::Blob(b.clone().into()),
            }),
        }
    }
}

impl From<pb::Value> for Value {
    fn from(v: pb::Value) -> Self {
        use pb::value::Kind;
        match v.kind {
            None | Some(Kind::Null(_)) => Value::Null,
            Some(Kind::Integer(i)) => Value::Integer(i),
            Some(Kind::Real(f)) => Value::Real(f),
            Some(Kind::Text(s)) => Value::Text(s),
            Some(Kind::Blob(b)) => Value::Blob(b.to_vec()),
        }
    }
}

/// A SQL statement with its positional parameters (`?1`, `?2`, ... or `?`).
#[derive(Clone, Debug, PartialEq)]
pub struct Statement {
    /// The SQL text: exactly one statement.
    pub sql: String,
    /// Parameters bound in order.
    pub params: Vec<Value>,
}

impl Statement {
    /// A statement without parameters.
    pub fn new(sql: impl Into<String>) -> Self {
        Statement {
            sql: sql.into(),
            params: Vec::new(),
        }
    }
    /// A statement with parameters.
    pub fn with_params(sql: impl Into<String>, params: Vec<Value>) -> Self {
        Statement {
            sql: sql.into(),
            params,
        }
    }
}

impl From<&Statement> for pb::Statement {
    fn from(s: &Statement) -> Self {
        pb::Statement {
            sql: s.sql.clone(),
            params: s.params.iter().map(Into::into).collect(),
        }
    }
}
impl From<pb::Statement> for Statement {
    fn from(s: pb::Statement) -> Self {
        Statement {
            sql: s.sql,
            params: s.params.into_iter().map(Into::into).collect(),
        }
    }
}

/// What a write statement did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecResult {
    /// Rows inserted, updated or deleted by the statement.
    pub rows_affected: u64,
    /// `sqlite3_last_insert_rowid` after the statement.
    pub last_insert_rowid: i64,
}

/// Rows returned by a query.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rows {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows, each with one value per column.
    pub rows: Vec<Vec<Value>>,
}

#[cfg(test)]
mod split_tests {
    use super::split_sql;

    #[test]
    fn statements_end_where_sqlite_says_they_are_complete() {
        assert_eq!(split_sql("SELECT 1"), ["SELECT 1"]);
        assert_eq!(
            split_sql("CREATE TABLE t(x); INSERT INTO t VALUES (';'); ;"),
            ["CREATE TABLE t(x)", "INSERT INTO t VALUES (';')"]
        );
        let trigger = "CREATE TRIGGER r AFTER INSERT ON t BEGIN DELETE FROM t; SELECT 1; END";
        assert_eq!(
            split_sql(&format!("{trigger}; SELECT 2")),
            [trigger, "SELECT 2"]
        );
        assert_eq!(
            split_sql("SELECT 1 /* ; */; SELECT 'a;b' -- ;"),
            ["SELECT 1 /* ; */", "SELECT 'a;b' -- ;"]
        );
        assert!(split_sql("  ;; ").is_empty());
    }
}
