//! A key-value HTTP service that embeds a raftsql node: start it three times and the three
//! processes form one replicated cluster.
//!
//! ```sh
//! cargo run -p raftsql-core --example kv_http -- 1     # terminal 1
//! cargo run -p raftsql-core --example kv_http -- 2     # terminal 2
//! cargo run -p raftsql-core --example kv_http -- 3     # terminal 3
//!
//! curl -X PUT --data-binary 'world' localhost:8081/kv/hello      # any node takes writes
//! curl localhost:8083/kv/hello                                   # linearizable read: world
//! curl 'localhost:8082/kv/hello?consistency=local'               # this node's replica
//! curl 'localhost:8082/kv/hello?max_staleness_ms=500'            # bounded staleness
//! curl -X DELETE localhost:8081/kv/hello
//! curl localhost:8082/status
//! ```
//!
//! Process `ID` (1, 2 or 3) serves HTTP on 127.0.0.1:808ID, its Raft/SQL port on
//! 127.0.0.1:710ID, and keeps its replica in `./kv-data/ID` (kill one and start it again:
//! it catches up). `KV_PEERS` and `KV_HTTP` override the addresses, `KV_DATA` the directory.
//!
//! Reads run on the embedded [`Node`] itself (no network hop unless the consistency asks for
//! a ReadIndex round); writes go through a [`Client`], which finds the leader wherever it is.
//! HTTP statuses come from the typed [`Error`]: a constraint is 409, no leader is 503 with
//! `Retry-After`, an unknown outcome is 504.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use raftsql_core::{Client, Consistency, Error, Node, NodeConfig, Value};

#[derive(Clone)]
struct App {
    node: Node,
    client: Client,
}

const DB: &str = "kv";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let id: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .filter(|id| *id > 0)
        .ok_or("usage: kv_http ID   (1, 2 or 3)")?;
    let peers = match std::env::var("KV_PEERS") {
        Ok(p) => raftsql_core::parse_peers(&p)?,
        Err(_) => (1..=3)
            .map(|i| (i, SocketAddr::from(([127, 0, 0, 1], 7100 + i as u16))))
            .collect::<BTreeMap<_, _>>(),
    };
    let listen = *peers.get(&id).ok_or("this ID is not among the peers")?;
    let http: SocketAddr = match std::env::var("KV_HTTP") {
        Ok(a) => a.parse()?,
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 8080 + id as u16)),
    };
    let data = std::env::var("KV_DATA").unwrap_or_else(|_| format!("kv-data/{id}"));
    std::fs::create_dir_all(&data)?;

    let mut cfg = NodeConfig::new(id, &data, listen);
    cfg.peers = peers.clone();
    let node = Node::start(cfg).await?;
    let client = Client::new(peers.values().copied().collect(), "raftsql");
    eprintln!("node {id}: raft on {listen}, HTTP on {http}, data in {data}; waiting for a leader");
    node.wait_ready(Duration::from_secs(60)).await?;
    client
        .execute(
            DB,
            "CREATE TABLE IF NOT EXISTS kv(k TEXT PRIMARY KEY, v BLOB NOT NULL)",
            vec![],
        )
        .await?;
    eprintln!("node {id}: ready");

    let app = Router::new()
        .route("/kv/{key}", get(read).put(write).delete(remove))
        .route("/status", get(status))
        .with_state(App {
            node: node.clone(),
            client,
        });
    let listener = tokio::net::TcpListener::bind(http).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    node.shutdown().await;
    Ok(())
}

/// `?consistency=local|linearizable` or `?max_staleness_ms=N`.
#[derive(serde::Deserialize)]
struct ReadParams {
    consistency: Option<String>,
    max_staleness_ms: Option<u64>,
}

impl ReadParams {
    fn consistency(&self) -> Consistency {
        match (self.consistency.as_deref(), self.max_staleness_ms) {
            (Some("local"), _) => Consistency::Local,
            (_, Some(ms)) => Consistency::Bounded(Duration::from_millis(ms)),
            _ => Consistency::Linearizable,
        }
    }
}

async fn read(
    State(app): State<App>,
    Path(key): Path<String>,
    Query(p): Query<ReadParams>,
) -> Response {
    let rows = app
        .node
        .query_with(
            DB,
            "SELECT v FROM kv WHERE k = ?1",
            vec![key.into()],
            p.consistency(),
        )
        .await;
    match rows.map(|r| r.rows.into_iter().next()) {
        Ok(Some(row)) => match row.into_iter().next() {
            Some(Value::Blob(b)) => b.into_response(),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "not a blob").into_response(),
        },
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => error_response(e),
    }
}

async fn write(State(app): State<App>, Path(key): Path<String>, body: Bytes) -> Response {
    let r = app
        .client
        .execute(
            DB,
            "INSERT OR REPLACE INTO kv VALUES (?1, ?2)",
            vec![key.into(), Value::Blob(body.to_vec())],
        )
        .await;
    match r {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error_response(e),
    }
}

async fn remove(State(app): State<App>, Path(key): Path<String>) -> Response {
    match app
        .client
        .execute(DB, "DELETE FROM kv WHERE k = ?1", vec![key.into()])
        .await
    {
        Ok(r) if r.rows_affected == 0 => StatusCode::NOT_FOUND.into_response(),
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error_response(e),
    }
}

async fn status(State(app): State<App>) -> Json<serde_json::Value> {
    let s = app.node.status();
    Json(serde_json::json!({
        "id": s.id,
        "role": s.raft.role,
        "leader_id": s.raft.leader_id,
        "leader_addr": s.leader_addr.map(|a| a.to_string()),
        "term": s.raft.term,
        "applied": s.applied,
    }))
}

/// The typed error as an HTTP answer.
fn error_response(e: Error) -> Response {
    let code = match &e {
        Error::Constraint { .. } => StatusCode::CONFLICT,
        Error::NotLeader { .. } | Error::Unavailable(_) => {
            let mut r = (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return r;
        }
        // The write may or may not have committed: the caller reads back before retrying.
        Error::OutcomeUnknown | Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        Error::Sql { .. } | Error::Invalid(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, e.to_string()).into_response()
}
