//! Fuzzes client SQL text against a live 3-node raftsql cluster (three in-process nodes on
//! loopback, started once per fuzzing process, their data in /dev/shm when there).
//!
//! Each input is decoded into 1-4 statements by a small grammar (`Gen`): pragmas with and
//! without values, CTE-wrapped writes, ATTACH, VACUUM INTO, temp objects, triggers, transaction
//! control, conflict clauses, extension functions, and raw text from the input. The first
//! byte chooses the path: linearizable query or local query on any node, a write on the
//! leader, or an interactive transaction on the leader (committed or rolled back).
//!
//! The property (docs/ARCHITECTURE.md invariant 10): whatever the clients send, the replicas
//! never diverge. Every 32 inputs a canary write goes through the leader, all three nodes must
//! reach the same applied index, and their databases must be byte-identical (equal digests)
//! and pass `PRAGMA integrity_check`; any difference panics (a finding). Refused statements
//! are expected and ignored; a statement must also answer within a few seconds.
#![no_main]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use raftsql_core::{Consistency, Node, NodeConfig, Value};

struct Env {
    rt: tokio::runtime::Runtime,
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            tempfile::tempdir_in("/dev/shm").unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let addrs: BTreeMap<u64, SocketAddr> = (1..=3u64)
            .map(|id| {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port();
                (id, format!("127.0.0.1:{port}").parse().unwrap())
            })
            .collect();
        let nodes: Vec<Node> = addrs
            .iter()
            .map(|(&id, &listen)| {
                let mut cfg = NodeConfig::new(id, dir.path().join(format!("n{id}")), listen);
                cfg.peers = addrs.clone();
                cfg.statement_timeout = Duration::from_millis(300);
                rt.block_on(Node::start(cfg)).unwrap()
            })
            .collect();
        let env = Env {
            rt,
            nodes,
            _dir: dir,
        };
        let leader = env.leader();
        env.rt.block_on(async {
            leader
                .execute("main", "CREATE TABLE t(k INTEGER PRIMARY KEY, v)", vec![])
                .await
                .unwrap();
            for i in 0..20 {
                leader
                    .execute(
                        "main",
                        "INSERT INTO t(v) VALUES (?1)",
                        vec![Value::Integer(i)],
                    )
                    .await
                    .unwrap();
            }
        });
        env
    })
}

impl Env {
    fn leader(&self) -> &Node {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(n) = self.nodes.iter().find(|n| n.is_leader()) {
                return n;
            }
            assert!(Instant::now() < deadline, "no leader for 30 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Writes a canary, waits for every node to apply the same index, then compares the
    /// replicas.
    fn check_replicas(&self) {
        let leader = self.leader();
        self.rt.block_on(async {
            let _ = leader
                .execute("main", "CREATE TABLE IF NOT EXISTS canary(x)", vec![])
                .await;
            leader
                .execute("main", "INSERT INTO canary VALUES (1)", vec![])
                .await
                .expect("the canary write");
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let applied: Vec<u64> = self.nodes.iter().map(|n| n.status().applied).collect();
            let digests: Vec<_> = self
                .nodes
                .iter()
                .map(|n| self.rt.block_on(n.digests()).unwrap().remove("main"))
                .collect();
            if applied.iter().all(|a| *a == applied[0]) && digests.iter().all(|d| *d == digests[0])
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replicas diverged: applied {applied:?}, digests {digests:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for n in &self.nodes {
            let rows = self
                .rt
                .block_on(n.query_with("main", "PRAGMA integrity_check", vec![], Consistency::Local))
                .unwrap();
            assert_eq!(
                rows.rows[0][0],
                Value::Text("ok".into()),
                "node {} is damaged: {:?}",
                n.id(),
                rows.rows
            );
        }
    }
}

/// Turns fuzz bytes into SQL text.
struct Gen<'a> {
    data: &'a [u8],
}

const PRAGMAS: &[&str] = &[
    "query_only",
    "journal_mode",
    "wal_autocheckpoint",
    "wal_checkpoint",
    "locking_mode",
    "synchronous",
    "writable_schema",
    "schema_version",
    "user_version",
    "application_id",
    "page_size",
    "cache_size",
    "mmap_size",
    "auto_vacuum",
    "incremental_vacuum",
    "foreign_keys",
    "recursive_triggers",
    "temp_store",
    "secure_delete",
    "busy_timeout",
    "integrity_check",
    "table_info",
    "index_list",
    "journal_size_limit",
    "max_page_count",
    "encoding",
    "cell_size_check",
    "trusted_schema",
    "optimize",
    "shrink_memory",
    "data_version",
    "defer_foreign_keys",
    "ignore_check_constraints",
    "legacy_alter_table",
    "threads",
];
const VALUES: &[&str] = &[
    "0",
    "1",
    "ON",
    "OFF",
    "DELETE",
    "OFF",
    "MEMORY",
    "TRUNCATE",
    "EXCLUSIVE",
    "NORMAL",
    "FULL",
    "WAL",
    "-1",
    "512",
    "100000",
    "'UTF-16'",
    "t",
    "2",
];
const TABLES: &[&str] = &[
    "t",
    "main.t",
    "temp.x",
    "sqlite_master",
    "sqlite_dbpage",
    "canary",
    "u",
];
const FUNCS: &[&str] = &[
    "load_extension('/lib/x86_64-linux-gnu/libc.so.6')",
    "fts3_tokenizer('simple')",
    "randomblob(100)",
    "random()",
    "zeroblob(4096)",
    "length(randomblob(100000000))",
    "sqlite_version()",
    "changes()",
    "last_insert_rowid()",
    "abs(-1)",
    "quote(x'00')",
];

impl Gen<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    fn pick<'s>(&mut self, from: &[&'s str]) -> &'s str {
        from[self.byte() as usize % from.len()]
    }
    fn num(&mut self) -> u8 {
        self.byte() % 30
    }
    fn expr(&mut self) -> String {
        match self.byte() % 4 {
            0 => self.num().to_string(),
            1 => self.pick(FUNCS).to_string(),
            2 => format!("(SELECT count(*) FROM {})", self.pick(TABLES)),
            _ => format!("'{}'", self.num()),
        }
    }
    fn cte(&mut self) -> &'static str {
        match self.byte() % 3 {
            0 => "",
            1 => "WITH x AS (SELECT 1) ",
            _ => "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c LIMIT 5) ",
        }
    }
    fn name(&mut self) -> String {
        ["x", "m", "req", "raftsql_req", "sp", "main", "temp"][self.byte() as usize % 7].into()
    }
    fn statement(&mut self) -> String {
        match self.byte() % 24 {
            0 => format!("SELECT {} FROM {} WHERE k < {}", self.expr(), self.pick(TABLES), self.num()),
            1 => format!("{}DELETE FROM {} WHERE k = {}", self.cte(), self.pick(TABLES), self.num()),
            2 => format!("{}INSERT INTO {}(v) VALUES ({})", self.cte(), self.pick(TABLES), self.expr()),
            3 => format!("{}UPDATE {} SET v = {} WHERE k = {}", self.cte(), self.pick(TABLES), self.expr(), self.num()),
            4 => format!("PRAGMA {}", self.pick(PRAGMAS)),
            5 => format!("PRAGMA {}={}", self.pick(PRAGMAS), self.pick(VALUES)),
            6 => format!("PRAGMA main.{}({})", self.pick(PRAGMAS), self.pick(VALUES)),
            7 => format!("ATTACH '/tmp/raftsql-fuzz-{}.db' AS {}", self.num(), self.name()),
            8 => format!("DETACH {}", self.name()),
            9 => ["BEGIN", "BEGIN IMMEDIATE", "BEGIN EXCLUSIVE", "COMMIT", "END", "ROLLBACK"]
                [self.byte() as usize % 6]
                .into(),
            10 => format!("SAVEPOINT {}", self.name()),
            11 => format!("RELEASE {}", self.name()),
            12 => format!("ROLLBACK TO {}", self.name()),
            13 => format!(
                "CREATE {}TABLE IF NOT EXISTS {}(x)",
                ["", "TEMP "][self.byte() as usize % 2],
                self.pick(&["u", "temp.y", "main.u2"])
            ),
            14 => format!(
                "CREATE {}TRIGGER IF NOT EXISTS tr{} {} {} ON main.t BEGIN {}; END",
                ["", "TEMP "][self.byte() as usize % 2],
                self.num(),
                self.pick(&["BEFORE", "AFTER"]),
                self.pick(&["INSERT", "DELETE", "UPDATE"]),
                self.pick(&[
                    "SELECT RAISE(ROLLBACK, 'x')",
                    "DELETE FROM t WHERE k = 1",
                    "INSERT INTO canary VALUES (2)",
                    "SELECT RAISE(ABORT, 'y')",
                ])
            ),
            15 => format!("CREATE {}VIEW IF NOT EXISTS v{} AS SELECT 1", ["", "TEMP "][self.byte() as usize % 2], self.num()),
            16 => format!(
                "INSERT OR {} INTO t(k, v) VALUES ({}, {})",
                self.pick(&["ROLLBACK", "ABORT", "FAIL", "IGNORE", "REPLACE"]),
                self.num(),
                self.expr()
            ),
            17 => self.pick(&["VACUUM", "VACUUM INTO '/tmp/raftsql-fuzz-vacuum.db'", "ANALYZE", "REINDEX"]).into(),
            18 => format!("SELECT {}", self.expr()),
            19 => format!("DROP {} IF EXISTS {}", self.pick(&["TABLE", "TRIGGER", "VIEW", "INDEX"]), self.pick(&["u", "tr1", "v1", "temp.y", "t"])),
            20 => format!("CREATE VIRTUAL TABLE IF NOT EXISTS vt USING {}", self.pick(&["fts5(x)", "dbstat", "sqlite_dbpage", "rtree(id, a, b)"])),
            21 => format!("WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT count(*) FROM c WHERE n < {}", self.num()),
            22 => format!("CREATE INDEX IF NOT EXISTS i{} ON t(v)", self.num()),
            _ => {
                // Raw text: the rest of the input.
                let s = String::from_utf8_lossy(self.data).into_owned();
                self.data = &[];
                s
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let env = env();
    let mut g = Gen { data };
    let path = g.byte();
    let node = &env.nodes[(path as usize >> 2) % 3];
    let n = 1 + g.byte() as usize % 4;
    let stmts: Vec<String> = (0..n).map(|_| g.statement()).collect();
    let leader = env.leader();
    let started = Instant::now();
    env.rt.block_on(async {
        let work = async {
            match path % 4 {
                0 | 1 => {
                    for s in &stmts {
                        let _ = if path % 4 == 0 {
                            node.query("main", s, vec![]).await
                        } else {
                            node.query_with("main", s, vec![], Consistency::Local).await
                        };
                    }
                }
                2 => {
                    let batch = stmts.iter().map(raftsql_core::Statement::new).collect();
                    let _ = leader.execute_batch("main", batch).await;
                }
                _ => {
                    if let Ok(mut tx) = leader.transaction("main", Duration::from_secs(2)).await {
                        for s in &stmts {
                            let _ = tx.execute(s, vec![]).await;
                        }
                        if path & 0x10 == 0 {
                            let _ = tx.commit().await;
                        } else {
                            tx.rollback();
                        }
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), work)
            .await
            .unwrap_or_else(|_| panic!("statements took over 20 s: {stmts:?}"));
    });
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "statements took {:?}: {stmts:?}",
        started.elapsed()
    );
    if RUNS.fetch_add(1, Ordering::Relaxed) % 32 == 31 {
        env.check_replicas();
    }
});
