//! `raftsql sql`: statements from `-e` or a shell, printed as a table or JSON lines;
//! `BEGIN` ... `COMMIT` as an interactive transaction on the leader.

use std::time::Duration;

use raftsql_core::{Client, Value};

use crate::{parse_endpoints, CliResult, SqlArgs};

pub(crate) fn is_query(sql: &str) -> bool {
    let w = sql
        .trim_start()
        .split(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    matches!(w.as_str(), "SELECT" | "WITH" | "VALUES" | "EXPLAIN")
        || (w == "PRAGMA" && !sql.contains('='))
}

pub(crate) fn fmt_value(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => i.to_string(),
        Value::Real(f) => f.to_string(),
        Value::Text(s) => s.clone(),
        Value::Blob(b) => format!(
            "x'{}'",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        ),
    }
}

pub(crate) fn json_value(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Integer(i) => (*i).into(),
        Value::Real(f) => (*f).into(),
        Value::Text(s) => s.clone().into(),
        Value::Blob(b) => b
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
            .into(),
    }
}

pub(crate) async fn run_one(client: &Client, a: &SqlArgs, sql: &str) -> Result<(), String> {
    let stmts = raftsql_core::split_sql(sql);
    if stmts.len() > 1 {
        return run_several(client, a, stmts).await;
    }
    // A statement that starts like a query may still write (`WITH ... INSERT`): a read
    // connection refuses it (SQLITE_READONLY) without doing anything, so run it as a write.
    let read = if is_query(sql) {
        match client.query_with(&a.db, sql, vec![], a.consistency()).await {
            Err(raftsql_core::Error::Sql { code: 8, .. }) => None,
            r => Some(r.map_err(|e| e.to_string())?),
        }
    } else {
        None
    };
    if let Some(rows) = read {
        print_rows(a, &rows);
    } else {
        let r = client
            .execute(&a.db, sql, vec![])
            .await
            .map_err(|e| e.to_string())?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"rows_affected": r.rows_affected, "last_insert_rowid": r.last_insert_rowid})
            );
        } else {
            println!(
                "ok: {} row(s) affected, last insert rowid {}",
                r.rows_affected, r.last_insert_rowid
            );
        }
    }
    Ok(())
}

/// Several statements in one `-e`: queries only, each runs and prints its rows; otherwise
/// they run as one write request, all or nothing (a query among them prints no rows).
pub(crate) async fn run_several(
    client: &Client,
    a: &SqlArgs,
    stmts: Vec<String>,
) -> Result<(), String> {
    if stmts.iter().all(|s| is_query(s)) {
        for s in &stmts {
            let rows = client
                .query_with(&a.db, s, vec![], a.consistency())
                .await
                .map_err(|e| e.to_string())?;
            print_rows(a, &rows);
        }
        return Ok(());
    }
    let batch: Vec<raftsql_core::Statement> = stmts
        .iter()
        .map(|s| raftsql_core::Statement::with_params(s, vec![]))
        .collect();
    let results = client
        .execute_batch(&a.db, &batch)
        .await
        .map_err(|e| e.to_string())?;
    let affected: u64 = results.iter().map(|r| r.rows_affected).sum();
    let last = results.last().map_or(0, |r| r.last_insert_rowid);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"statements": results.len(), "rows_affected": affected, "last_insert_rowid": last})
        );
    } else {
        println!(
            "ok: {} statements in one transaction, {affected} row(s) affected, last insert rowid {last}",
            results.len()
        );
    }
    Ok(())
}

pub(crate) fn print_rows(a: &SqlArgs, rows: &raftsql_core::Rows) {
    if a.json {
        for r in &rows.rows {
            let obj: serde_json::Map<String, serde_json::Value> = rows
                .columns
                .iter()
                .cloned()
                .zip(r.iter().map(json_value))
                .collect();
            println!("{}", serde_json::Value::Object(obj));
        }
        return;
    }
    let cells: Vec<Vec<String>> = rows
        .rows
        .iter()
        .map(|r| r.iter().map(fmt_value).collect())
        .collect();
    let mut w: Vec<usize> = rows.columns.iter().map(|c| c.len()).collect();
    for r in &cells {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |r: &[String]| {
        r.iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = w[i]))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!("{}", line(&rows.columns));
    println!(
        "{}",
        w.iter()
            .map(|n| "-".repeat(*n))
            .collect::<Vec<_>>()
            .join("-+-")
    );
    for r in &cells {
        println!("{}", line(r));
    }
    println!(
        "({} row{})",
        cells.len(),
        if cells.len() == 1 { "" } else { "s" }
    );
}

/// The interactive shell: statements end with `;` (they may span lines); `BEGIN` ...
/// `COMMIT`/`ROLLBACK` run as one interactive transaction on the leader; `.quit` leaves.
pub(crate) async fn run_sql(a: SqlArgs) -> CliResult {
    use std::io::{IsTerminal, Write};
    let client =
        Client::new(parse_endpoints(&a.endpoints)?, &a.cluster).with_dialer(a.tls.dialer()?);
    if let Some(sql) = &a.execute {
        return run_one(&client, &a, sql).await;
    }
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprintln!("raftsql shell on database {:?}: end statements with ';', BEGIN ... COMMIT for a transaction, .quit to leave", a.db);
    }
    let mut failed = false;
    let mut tx: Option<raftsql_core::RemoteTransaction> = None;
    let stdin = std::io::stdin();
    let mut buf = String::new();
    let mut line = String::new();
    loop {
        if tty {
            eprint!(
                "{}",
                if !buf.is_empty() {
                    "   ...> "
                } else if tx.is_some() {
                    "raftsql(tx)> "
                } else {
                    "raftsql> "
                }
            );
            let _ = std::io::stderr().flush();
        }
        line.clear();
        let eof = stdin.read_line(&mut line).map_err(|e| e.to_string())? == 0;
        let t = line.trim();
        if buf.is_empty() && (t == ".quit" || t == ".exit") {
            break;
        }
        buf.push_str(&line);
        let complete = buf.trim_end().ends_with(';') || (eof && !buf.trim().is_empty());
        if !complete {
            if eof {
                break;
            }
            continue;
        }
        let sql = buf.trim().trim_end_matches(';').trim().to_string();
        buf.clear();
        let word = sql
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let r: Result<(), String> = match (word.as_str(), tx.take()) {
            ("BEGIN", None) => match client.transaction(&a.db, Duration::from_secs(300)).await {
                Ok(t) => {
                    tx = Some(t);
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            },
            ("BEGIN", Some(t)) => {
                tx = Some(t);
                Err("a transaction is already open: COMMIT or ROLLBACK it first".into())
            }
            ("COMMIT" | "END", Some(t)) => t
                .commit()
                .await
                .map(|_| println!("committed"))
                .map_err(|e| e.to_string()),
            ("ROLLBACK", Some(t)) => t
                .rollback()
                .await
                .map(|_| println!("rolled back"))
                .map_err(|e| e.to_string()),
            ("COMMIT" | "END" | "ROLLBACK", None) => Err("no transaction is open".into()),
            (_, Some(mut t)) => {
                let r = t.execute(&sql, vec![]).await;
                tx = Some(t);
                match r {
                    Ok((rows, _)) if !rows.columns.is_empty() => {
                        print_rows(&a, &rows);
                        Ok(())
                    }
                    Ok((_, res)) => {
                        println!(
                            "ok: {} row(s) affected, last insert rowid {}",
                            res.rows_affected, res.last_insert_rowid
                        );
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            (_, None) => run_one(&client, &a, &sql).await,
        };
        if let Err(e) = r {
            eprintln!("error: {e}");
            failed = true;
        }
        if eof {
            break;
        }
    }
    if let Some(t) = tx {
        eprintln!("the open transaction was rolled back");
        let _ = t.rollback().await;
    }
    if failed {
        Err("some statements failed".into())
    } else {
        Ok(())
    }
}
