//! What SQL from a client may do: the guard on every connection that runs client SQL.
//!
//! Client SQL runs on two kinds of connection, and both are shared: a node's pooled
//! *readers* (queries, local or linearizable) and the leader's single *writer* (the batch
//! transaction that group-commits writes, and interactive transactions). A statement that
//! writes on a reader changes one replica outside Raft; a statement that changes the
//! writer's connection state (its journal mode, its checkpointing, its transaction) can let
//! uncommitted frames reach the database file or make the pages it captures wrong. Text
//! from a client is therefore checked, whatever path it came by, in three independent
//! layers:
//!
//! 1. **An authorizer** ([`decide`]), run by SQLite while it compiles each statement, which
//!    sees every table, pragma, function and transaction operation the statement touches,
//!    including inside CTEs, triggers and views. Readers allow only reads; the writer allows
//!    reads and changes to the main database, and refuses everything listed in
//!    docs/ARCHITECTURE.md ("What client SQL may not do"): transaction control, ATTACH,
//!    temp objects, pragmas that set connection state, writes to `sqlite_dbpage`,
//!    `load_extension`.
//! 2. **Readers cannot write at all**: they are opened `SQLITE_OPEN_READONLY` with
//!    `query_only`, and a statement that `sqlite3_stmt_readonly` says writes is refused
//!    before it steps.
//! 3. **`SQLITE_DBCONFIG_DEFENSIVE`** on every connection while client SQL runs (it stops
//!    `writable_schema`, `journal_mode=OFF`, `schema_version=N` and `sqlite_dbpage` writes
//!    even if the first two layers had a hole). An apply lifts it on the writer and leaves
//!    it off (each change of it expires the connection's prepared statements); client SQL on
//!    the writer starts by turning it on (`state::batch::client_on_writer`).
//!
//! A statement runs as client SQL only inside [`Guard::client`]; code of this crate (and
//! Rust closures given to `Node::write`/`Node::read`) runs as *internal* and is trusted.
//! Client statements are cached under [`client_key`], a key no internal statement has, so a
//! client can never be handed a statement that was compiled (and authorized) as internal.
//!
//! Client SQL is also bounded: a statement that runs past its time budget is interrupted
//! (the progress handler), and no value may exceed [`MAX_VALUE_BYTES`].
//!
//! Invariant (docs/ARCHITECTURE.md, "Client SQL cannot write outside Raft"): no statement
//! sent by a client changes a database file except through the writer's batch transaction,
//! whose pages are replicated. Checked by `tests/tests/hostile_sql.rs` and the `sql_text`
//! fuzz target.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::Connection;

use crate::error::{Error, Result};

/// The largest string or blob client SQL may make (SQLite's `SQLITE_LIMIT_LENGTH`): a row
/// larger than one replicated entry could never be written anyway.
pub const MAX_VALUE_BYTES: i32 = 48 << 20;

/// Names of the savepoints this crate opens on the writer; a client may not name them.
pub const INTERNAL_SAVEPOINT: &str = "raftsql_req";
/// `SAVEPOINT` and `RELEASE` of [`INTERNAL_SAVEPOINT`], as run (through the statement cache).
pub const INTERNAL_SAVEPOINT_SQL: &str = "SAVEPOINT raftsql_req";
pub const INTERNAL_RELEASE_SQL: &str = "RELEASE raftsql_req";

/// Which connection a guard is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A pooled reader: reads only.
    Reader,
    /// The leader's writer: reads and replicated changes to the main database.
    Writer,
}

/// Why a client statement was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A read path was given a statement that writes: send it as a write.
    Writes(String),
    /// No path runs it.
    NotAllowed(String),
}

impl Refusal {
    fn into_error(self) -> Error {
        match self {
            // SQLite's own codes: READONLY for a write on a read path, AUTH for a refusal.
            Refusal::Writes(what) => Error::Sql {
                code: rusqlite::ffi::SQLITE_READONLY,
                message: format!(
                    "{what} writes, and queries are read-only on every node: send it as a \
                     write (execute), which replicates it"
                ),
            },
            Refusal::NotAllowed(why) => Error::Sql {
                code: rusqlite::ffi::SQLITE_AUTH,
                message: format!("not allowed: {why}"),
            },
        }
    }
}

/// The client-SQL guard of one connection (see the module docs).
#[derive(Clone)]
pub struct Guard {
    inner: Arc<Inner>,
}

struct Inner {
    role: Role,
    /// True while client SQL is being compiled or run on the connection.
    client: AtomicBool,
    /// The first refusal of the statement being compiled, for a clear error.
    refused: Mutex<Option<Refusal>>,
    /// Client SQL is interrupted after this many nanoseconds since [`epoch`] (0: never).
    deadline: AtomicU64,
    /// The deadline was hit (so SQLITE_INTERRUPT means "too slow").
    expired: AtomicBool,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_nanos() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

impl Guard {
    /// Installs the guard on `c`: the authorizer, the time budget, the length limit, no
    /// attached databases, and DEFENSIVE on.
    pub fn install(c: &mut Connection, role: Role) -> Result<Guard> {
        let inner = Arc::new(Inner {
            role,
            client: AtomicBool::new(false),
            refused: Mutex::new(None),
            deadline: AtomicU64::new(0),
            expired: AtomicBool::new(false),
        });
        let auth = inner.clone();
        c.authorizer(Some(move |ctx: AuthContext<'_>| {
            if !auth.client.load(Ordering::Relaxed) {
                return Authorization::Allow;
            }
            match decide(auth.role, &ctx) {
                Ok(()) => Authorization::Allow,
                Err(r) => {
                    auth.refused.lock().get_or_insert(r);
                    Authorization::Deny
                }
            }
        }))?;
        let timer = inner.clone();
        c.progress_handler(
            1000,
            Some(move || {
                if !timer.client.load(Ordering::Relaxed) {
                    return false;
                }
                let d = timer.deadline.load(Ordering::Relaxed);
                if d != 0 && now_nanos() > d {
                    timer.expired.store(true, Ordering::Relaxed);
                    return true;
                }
                false
            }),
        )?;
        c.set_limit(Limit::SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)?;
        c.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)?;
        set_defensive(c, true)?;
        Ok(Guard { inner })
    }

    /// Which connection this guard is on.
    pub fn role(&self) -> Role {
        self.inner.role
    }

    /// Runs `f` (which compiles and runs client statements on the guarded connection) as
    /// client SQL with a time budget of `budget`. Refusals and an expired budget come back
    /// as clear errors.
    pub fn client<T>(&self, budget: Duration, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let i = &self.inner;
        *i.refused.lock() = None;
        i.expired.store(false, Ordering::Relaxed);
        i.deadline.store(
            now_nanos().saturating_add(budget.as_nanos() as u64).max(1),
            Ordering::Relaxed,
        );
        i.client.store(true, Ordering::Relaxed);
        let r = f();
        i.client.store(false, Ordering::Relaxed);
        i.deadline.store(0, Ordering::Relaxed);
        let refused = i.refused.lock().take();
        let expired = i.expired.swap(false, Ordering::Relaxed);
        r.map_err(|e| match (e, refused) {
            // Denied by the authorizer (SQLite says SQLITE_AUTH, or SQLITE_ERROR "not
            // authorized to use function"): the reason recorded is the better error.
            (Error::Sql { .. } | Error::Constraint { .. }, Some(r)) => r.into_error(),
            (Error::Sql { code, .. }, None)
                if expired && code == rusqlite::ffi::SQLITE_INTERRUPT =>
            {
                Error::Sql {
                    code,
                    message: format!(
                        "the statement ran longer than the {budget:?} a statement may take \
                         (--statement-timeout) and was interrupted; nothing it did was kept"
                    ),
                }
            }
            (Error::Sql { code, message }, None) => Error::Sql {
                code,
                message: message.replace(CLIENT_MARK, ""),
            },
            (Error::Constraint { code, message }, None) => Error::Constraint {
                code,
                message: message.replace(CLIENT_MARK, ""),
            },
            (e, _) => e,
        })
    }
}

/// Checks a compiled client statement before it steps: on a reader, it must not write.
pub fn check_statement(guard: &Guard, st: &rusqlite::Statement<'_>) -> Result<()> {
    if guard.role() == Role::Reader && !st.readonly() {
        return Err(Refusal::Writes("this statement".into()).into_error());
    }
    Ok(())
}

/// The statement-cache key of a client statement: its text after a leading comment that no
/// statement of this crate starts with (the comment changes nothing SQLite runs). Leading,
/// not trailing: SQLite names a result column that has no alias by the text of its
/// expression, which for the last column ran to the end of the input and so included a
/// trailing mark (`SELECT 1` answered a column named "1\n-- raftsql: ...").
pub fn client_key(sql: &str) -> String {
    format!("{CLIENT_MARK}{sql}")
}

const CLIENT_MARK: &str = "-- raftsql: client statement\n";

/// Turns `SQLITE_DBCONFIG_DEFENSIVE` on or off on `c`.
pub fn set_defensive(c: &Connection, on: bool) -> Result<()> {
    c.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, on)?;
    Ok(())
}

/// Pragmas a client may read (no value) on any connection.
const READ_PRAGMAS: &[&str] = &[
    "application_id",
    "auto_vacuum",
    "collation_list",
    "compile_options",
    "data_version",
    "database_list",
    "encoding",
    "foreign_keys",
    "freelist_count",
    "function_list",
    "journal_mode",
    "max_page_count",
    "module_list",
    "page_count",
    "page_size",
    "pragma_list",
    "query_only",
    "schema_version",
    "user_version",
];

/// Pragmas whose value is an argument (a table, an index, a count), not a setting.
const ARG_PRAGMAS: &[&str] = &[
    "foreign_key_check",
    "foreign_key_list",
    "index_info",
    "index_list",
    "index_xinfo",
    "integrity_check",
    "quick_check",
    "table_info",
    "table_list",
    "table_xinfo",
];

/// Pragmas the writer may set: they change the database's content (page 1), which is
/// replicated like any page.
const CONTENT_PRAGMAS: &[&str] = &["application_id", "user_version"];

/// Virtual-table modules the writer may create (their shadow tables are ordinary tables).
const VTAB_MODULES: &[&str] = &["fts3", "fts4", "fts5", "rtree", "rtree_i32", "geopoly"];

/// Functions no client may call.
const DENIED_FUNCTIONS: &[&str] = &["load_extension", "fts3_tokenizer"];

fn one_of(name: &str, list: &[&str]) -> bool {
    list.iter().any(|n| n.eq_ignore_ascii_case(name))
}

fn is_temp(db: Option<&str>) -> bool {
    db.is_some_and(|d| d.eq_ignore_ascii_case("temp"))
}

/// The policy: may a client statement on a `role` connection do `ctx`?
pub fn decide(role: Role, ctx: &AuthContext<'_>) -> Result<(), Refusal> {
    let write = writer_decides(&ctx.action, ctx.database_name);
    if role == Role::Writer {
        return write.map_err(Refusal::NotAllowed);
    }
    match &ctx.action {
        AuthAction::Select | AuthAction::Read { .. } | AuthAction::Recursive => Ok(()),
        AuthAction::Function { .. } => write.map_err(Refusal::NotAllowed),
        AuthAction::Pragma { pragma_value, .. } => match (write, pragma_value) {
            (Err(why), _) => Err(Refusal::NotAllowed(why)),
            (Ok(()), Some(_)) if is_setting(&ctx.action) => Err(Refusal::NotAllowed(
                "a query cannot set a pragma (user_version and application_id are set \
                 with a write)"
                    .into(),
            )),
            (Ok(()), _) => Ok(()),
        },
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => Err(Refusal::NotAllowed(
            "a query runs in its own read transaction; BEGIN, COMMIT, ROLLBACK and \
                 savepoints belong to interactive transactions (raftsql sql: BEGIN ... COMMIT)"
                .into(),
        )),
        _ => match write {
            Ok(()) => Err(Refusal::Writes(describe(&ctx.action))),
            Err(why) => Err(Refusal::NotAllowed(why)),
        },
    }
}

fn is_setting(a: &AuthAction<'_>) -> bool {
    match a {
        AuthAction::Pragma {
            pragma_name,
            pragma_value: Some(_),
        } => !one_of(pragma_name, ARG_PRAGMAS),
        _ => false,
    }
}

fn describe(a: &AuthAction<'_>) -> String {
    match a {
        AuthAction::Insert { table_name } => {
            format!("this statement (an INSERT into {table_name})")
        }
        AuthAction::Update { table_name, .. } => {
            format!("this statement (an UPDATE of {table_name})")
        }
        AuthAction::Delete { table_name } => format!("this statement (a DELETE from {table_name})"),
        _ => "this statement".into(),
    }
}

/// What the writer allows, with the reason for each refusal (the list in
/// docs/ARCHITECTURE.md).
fn writer_decides(a: &AuthAction<'_>, db: Option<&str>) -> Result<(), String> {
    use AuthAction as A;
    let temp = || {
        Err(
            "temp tables, views, triggers and indexes live on one connection of one node, \
             outside replication (and would act on other clients' writes)"
                .to_string(),
        )
    };
    match a {
        A::Select | A::Read { .. } | A::Recursive => Ok(()),
        A::Function { function_name } if one_of(function_name, DENIED_FUNCTIONS) => Err(format!(
            "{function_name}() loads code into the node or changes SQLite's global state"
        )),
        A::Function { .. } => Ok(()),
        A::Insert { table_name } | A::Update { table_name, .. } | A::Delete { table_name }
            if table_name.eq_ignore_ascii_case("sqlite_dbpage") =>
        {
            Err("sqlite_dbpage writes raw pages, bypassing SQLite's checks".into())
        }
        // Changes to the main database are replicated; the same in `temp` would not be.
        A::Insert { .. }
        | A::Update { .. }
        | A::Delete { .. }
        | A::CreateIndex { .. }
        | A::CreateTable { .. }
        | A::CreateTrigger { .. }
        | A::CreateView { .. }
        | A::DropIndex { .. }
        | A::DropTable { .. }
        | A::DropTrigger { .. }
        | A::DropView { .. }
        | A::AlterTable { .. }
        | A::Reindex { .. }
        | A::Analyze { .. } => {
            if is_temp(db) {
                temp()
            } else {
                Ok(())
            }
        }
        A::CreateTempIndex { .. }
        | A::CreateTempTable { .. }
        | A::CreateTempTrigger { .. }
        | A::CreateTempView { .. }
        | A::DropTempIndex { .. }
        | A::DropTempTable { .. }
        | A::DropTempTrigger { .. }
        | A::DropTempView { .. } => temp(),
        A::CreateVtable { module_name, .. } | A::DropVtable { module_name, .. }
            if one_of(module_name, VTAB_MODULES) && !is_temp(db) =>
        {
            Ok(())
        }
        A::CreateVtable { module_name, .. } | A::DropVtable { module_name, .. } => Err(format!(
            "virtual tables of module {module_name:?} (allowed: {})",
            VTAB_MODULES.join(", ")
        )),
        A::Pragma {
            pragma_name,
            pragma_value,
        } => {
            let name = pragma_name.to_ascii_lowercase();
            let ok = match pragma_value {
                None => one_of(&name, READ_PRAGMAS) || one_of(&name, ARG_PRAGMAS),
                Some(_) => one_of(&name, ARG_PRAGMAS) || one_of(&name, CONTENT_PRAGMAS),
            };
            if ok {
                Ok(())
            } else {
                Err(pragma_reason(&name, pragma_value.is_some()))
            }
        }
        A::Attach { .. } | A::Detach { .. } => Err(
            "ATTACH opens another file, which no other node has and Raft does not replicate".into(),
        ),
        A::Transaction { .. } => Err(
            "writes run inside a transaction the node manages: each request is atomic; for \
             several statements use a batch or an interactive transaction (BEGIN ... COMMIT \
             in raftsql sql), whose BEGIN and COMMIT are requests, not SQL"
                .into(),
        ),
        A::Savepoint { savepoint_name, .. }
            if savepoint_name.to_ascii_lowercase().starts_with("raftsql")
                || savepoint_name.eq_ignore_ascii_case("req") =>
        {
            Err(format!(
                "savepoint {savepoint_name:?} is the node's own (names starting with \
                 \"raftsql\" are reserved)"
            ))
        }
        A::Savepoint { .. } => Ok(()),
        _ => Err("this kind of statement is not supported through raftsql".into()),
    }
}

fn pragma_reason(name: &str, set: bool) -> String {
    let why = match name {
        "journal_mode" | "wal_autocheckpoint" | "wal_checkpoint" | "journal_size_limit"
        | "locking_mode" | "synchronous" => {
            "the writer's journal, checkpoints and locking are what keep uncommitted frames \
             out of the database file; the node sets them"
        }
        "writable_schema" | "schema_version" | "cell_size_check" | "trusted_schema"
        | "legacy_alter_table" => "it lets a statement corrupt or reinterpret the schema",
        "page_size" | "auto_vacuum" | "incremental_vacuum" | "encoding" | "max_page_count" => {
            "the file format is fixed by the node"
        }
        "query_only" => "readers are read-only by design",
        _ => {
            "it changes the state of a connection shared by every client (or SQLite's \
             global state), and the next leader would not have it"
        }
    };
    if set {
        format!("PRAGMA {name} cannot be set by a client: {why}")
    } else {
        format!("PRAGMA {name} cannot be run by a client: {why}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(role: Role) -> (tempfile::TempDir, Connection, Guard) {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Connection::open(dir.path().join("g.db")).unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(k INTEGER PRIMARY KEY, v)")
            .unwrap();
        let g = Guard::install(&mut c, role).unwrap();
        (dir, c, g)
    }

    fn run(c: &Connection, g: &Guard, sql: &str) -> Result<()> {
        g.client(Duration::from_millis(200), || {
            let mut st = c.prepare_cached(&client_key(sql))?;
            check_statement(g, &st)?;
            let mut rows = st.query([])?;
            while rows.next()?.is_some() {}
            Ok(())
        })
    }

    #[test]
    fn readers_refuse_writes_with_a_hint_and_other_things_outright() {
        let (_d, c, g) = conn(Role::Reader);
        for sql in [
            "INSERT INTO t(v) VALUES (1)",
            "WITH x AS (SELECT 1) DELETE FROM t",
            "CREATE TABLE u(x)",
        ] {
            let e = run(&c, &g, sql).unwrap_err().to_string();
            assert!(e.contains("send it as a write"), "{sql}: {e}");
        }
        for sql in [
            "PRAGMA query_only(0)",
            "ATTACH ':memory:' AS m",
            "BEGIN IMMEDIATE",
            "CREATE TEMP TABLE x(y)",
        ] {
            let e = run(&c, &g, sql).unwrap_err().to_string();
            assert!(e.contains("not allowed"), "{sql}: {e}");
        }
        run(&c, &g, "SELECT count(*) FROM t").unwrap();
        run(&c, &g, "PRAGMA table_info(t)").unwrap();
        // Internal statements are not checked.
        c.execute_batch("BEGIN; COMMIT").unwrap();
    }

    #[test]
    fn the_writer_refuses_connection_state_and_allows_replicated_changes() {
        let (_d, c, g) = conn(Role::Writer);
        for sql in [
            "PRAGMA wal_autocheckpoint=1",
            "PRAGMA journal_mode=DELETE",
            "COMMIT",
            "SAVEPOINT raftsql_req",
            "INSERT INTO sqlite_dbpage(pgno, data) VALUES (1, zeroblob(4096))",
            "SELECT load_extension('x')",
        ] {
            let e = run(&c, &g, sql).unwrap_err().to_string();
            assert!(e.contains("not allowed"), "{sql}: {e}");
        }
        run(&c, &g, "INSERT INTO t(v) VALUES (1)").unwrap();
        run(&c, &g, "PRAGMA user_version=3").unwrap();
        run(&c, &g, "CREATE INDEX t_v ON t(v)").unwrap();
    }

    #[test]
    fn a_client_statement_never_reuses_an_internal_compilation() {
        let (_d, c, g) = conn(Role::Writer);
        // Compiled (and allowed) as internal, then sent by a client with the same text.
        let sql = "PRAGMA wal_autocheckpoint=1";
        c.prepare_cached(sql).unwrap();
        assert!(run(&c, &g, sql).is_err());
    }

    #[test]
    fn a_runaway_statement_is_interrupted_with_a_clear_error() {
        let (_d, c, g) = conn(Role::Reader);
        let t = Instant::now();
        let e = run(
            &c,
            &g,
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--statement-timeout"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        let e = run(&c, &g, "SELECT length(randomblob(200000000))")
            .unwrap_err()
            .to_string();
        assert!(e.contains("too big"), "{e}");
    }
}
