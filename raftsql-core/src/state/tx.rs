//! Interactive transactions: one at a time per node, holding the writer across round trips
//! until commit, rollback or its idle timeout.

use std::time::Instant;

use super::batch::{client_on_writer, limit_tx_growth, wal_full_is_too_large};
use super::db::{query_rows, reset_cache};
use super::msg::{TxOp, Waiter};
use super::{OpenTx, StateMachine};
use crate::error::{Error, Result};
use crate::value::ExecResult;

impl StateMachine {
    pub(super) fn handle_tx(&mut self, op: TxOp) {
        match op {
            TxOp::Begin { db, idle, reply } => {
                if !self.is_leader {
                    let _ = reply.send(Err(Error::NotLeader {
                        leader_id: None,
                        leader_addr: None,
                    }));
                    return;
                }
                // Wait for the writer: retried by the caller if busy.
                if !self.can_write() {
                    let _ = reply.send(Err(Error::Unavailable("the writer is busy; retry".into())));
                    return;
                }
                let r = self.db(&db).and_then(|d| {
                    reset_cache(&d.writer)?;
                    d.writer
                        .execute_batch("BEGIN IMMEDIATE")
                        .map_err(Error::from)?;
                    limit_tx_growth(&d.handle.key, true);
                    Ok(())
                });
                match r {
                    Ok(()) => {
                        self.seq += 1;
                        let id = self.seq;
                        self.open_tx = Some(OpenTx {
                            id,
                            db,
                            idle,
                            last_used: Instant::now(),
                        });
                        let _ = reply.send(Ok(id));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            TxOp::Exec { id, stmt, reply } => {
                let Some(tx) = self.open_tx.as_mut().filter(|t| t.id == id) else {
                    let _ = reply.send(Err(Error::Invalid(
                        "no such open transaction (rolled back?)".into(),
                    )));
                    return;
                };
                tx.last_used = Instant::now();
                let db = &self.dbs[&tx.db];
                let (w, g) = (&db.writer, &db.guard);
                let r = client_on_writer(w, g, self.settings.statement_timeout, || {
                    query_rows(w, g, &stmt, self.settings.max_result_bytes)
                })
                .map_err(wal_full_is_too_large)
                .map(|rows| {
                    (
                        rows,
                        ExecResult {
                            rows_affected: w.changes(),
                            last_insert_rowid: w.last_insert_rowid(),
                        },
                    )
                });
                if w.is_autocommit() {
                    // SQLite rolled the whole transaction back (OR ROLLBACK, RAISE(ROLLBACK),
                    // an interrupted write): it is over, and nothing may run outside one.
                    limit_tx_growth(&db.handle.key, false);
                    self.open_tx = None;
                    let why = match r {
                        Err(e) => e.to_string(),
                        Ok(_) => "SQLite ended it".into(),
                    };
                    let _ = reply.send(Err(Error::Invalid(format!(
                        "the statement rolled back the whole transaction ({why}); nothing \
                         of it was kept: begin a new one"
                    ))));
                    return;
                }
                let _ = reply.send(r);
            }
            TxOp::Commit { id, reply } => {
                let Some(tx) = self.open_tx.take_if(|t| t.id == id) else {
                    let _ = reply.send(Err(Error::Invalid(
                        "no such open transaction (rolled back?)".into(),
                    )));
                    return;
                };
                let waiter: Waiter = Box::new(move |r: Result<()>| {
                    let _ = reply.send(r);
                });
                if let Err(e) = self.commit_and_propose(&tx.db, vec![waiter]) {
                    tracing::warn!("commit of transaction {id} failed: {e}");
                }
            }
            TxOp::Rollback { id } => {
                if self.open_tx.as_ref().is_some_and(|t| t.id == id) {
                    self.rollback_tx();
                }
            }
        }
    }

    pub(super) fn rollback_tx(&mut self) {
        if let Some(tx) = self.open_tx.take() {
            let db = &self.dbs[&tx.db];
            let _ = db.writer.execute_batch("ROLLBACK");
            limit_tx_growth(&db.handle.key, false);
        }
    }
}
