//! `raftsql raft-status`: each node's Raft view (leader, term, commit, applied, log).

use raftsql_core::Client;

use crate::{parse_endpoints, CliResult, StatusArgs};

pub(crate) async fn run_status(a: StatusArgs) -> CliResult {
    let mut any = false;
    let dialer = a.tls.dialer()?;
    for addr in parse_endpoints(&a.endpoints)? {
        match Client::status_of_with(&dialer, addr, &a.cluster, a.digests).await {
            Ok(s) => {
                any = true;
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "endpoint": addr.to_string(), "id": s.id, "role": s.role, "leader_id": s.leader_id,
                            "leader_addr": s.leader_addr, "term": s.term, "commit_index": s.commit_index,
                            "applied_index": s.applied_index, "checkpoint_index": s.checkpoint_index,
                            "log_first_index": s.log_first_index, "log_last_index": s.log_last_index,
                            "db_digests": s.db_digests,
                        })
                    );
                } else {
                    println!(
                        "{addr}  node {}  {:<9} term {}  leader {}  commit {}  applied {}  checkpoint {}  log {}..{}{}",
                        s.id,
                        s.role,
                        s.term,
                        s.leader_id,
                        s.commit_index,
                        s.applied_index,
                        s.checkpoint_index,
                        s.log_first_index,
                        s.log_last_index,
                        if s.db_digests.is_empty() { String::new() } else { format!("  digests {:?}", s.db_digests) }
                    );
                }
            }
            Err(e) => {
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({"endpoint": addr.to_string(), "error": e.to_string()})
                    );
                } else {
                    println!("{addr}  unreachable: {e}");
                }
            }
        }
    }
    if any {
        Ok(())
    } else {
        Err("no node answered".into())
    }
}
