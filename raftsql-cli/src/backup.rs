//! `raftsql snapshot save|restore|status|list` (backups of a whole cluster) and `raftsql recover`
//! (disaster recovery after a quorum is lost for good).

use std::net::SocketAddr;
use std::path::PathBuf;

use raftsql_core::tls::Material;
use std::time::{Duration, Instant, UNIX_EPOCH};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use raftsql_core::{backup, backup_schedule, recover};

use crate::{parse_endpoints, CliResult};

/// `raftsql snapshot ...`.
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Save a consistent, checksummed copy of every database to FILE.
    Save(SaveArgs),
    /// Make a new single-node cluster from a saved FILE (others can then join it).
    Restore(RestoreArgs),
    /// Check a saved FILE completely and print what it holds.
    Status(StatusArgs),
    /// Check every backup in DIR (e.g. a node's --backup-dir), newest first.
    List(ListArgs),
}

/// `raftsql snapshot list`.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// The directory.
    dir: PathBuf,
    /// One JSON object per backup instead of a table.
    #[arg(long)]
    json: bool,
}

/// `raftsql snapshot save`.
#[derive(Args, Debug)]
pub struct SaveArgs {
    /// Where to write the backup (replaced only once the new copy is complete).
    file: PathBuf,
    /// Members to ask: HOST:PORT[,HOST:PORT...] (any member will do).
    #[arg(long, default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003")]
    endpoints: String,
    /// Cluster name.
    #[arg(long, default_value = "raftsql")]
    cluster: String,
    #[command(flatten)]
    tls: crate::ClientTls,
}

/// `raftsql snapshot restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The backup file, or a directory of them (e.g. a node's --backup-dir): then the newest
    /// one that checks out completely is restored.
    file: PathBuf,
    /// The new node's data directory (must not exist, or be empty).
    #[arg(long)]
    data_dir: PathBuf,
    /// The new node's id.
    #[arg(long, default_value_t = 1)]
    id: u64,
    /// The address the new node will listen on (give the same to `raftsql node`).
    #[arg(long, default_value = "127.0.0.1:7001")]
    listen: SocketAddr,
    /// Name of the new cluster (default: the name saved in the backup).
    #[arg(long)]
    cluster: Option<String>,
    /// Make the new cluster a TLS cluster with a new CA (in the node's tls/).
    #[arg(long, conflicts_with = "peer_ca_dir")]
    peer_tls: bool,
    /// Make the new cluster a TLS cluster with the CA made by `raftsql ca init DIR`.
    #[arg(long)]
    peer_ca_dir: Option<PathBuf>,
}

/// `raftsql snapshot status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The backup file.
    file: PathBuf,
}

/// `raftsql recover`.
#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// The stopped node's data directory (run on the survivor with the highest commit index).
    #[arg(long)]
    data_dir: PathBuf,
    /// Only print what this node holds and what recovery would do.
    #[arg(long)]
    dry_run: bool,
}

fn mib(b: u64) -> String {
    if b < 1 << 20 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
    }
}

/// Runs `raftsql snapshot ...`.
pub async fn snapshot(cmd: SnapshotCmd) -> CliResult {
    match cmd {
        SnapshotCmd::Save(a) => save(a).await,
        SnapshotCmd::Restore(a) => tokio::task::spawn_blocking(move || restore(a))
            .await
            .map_err(|e| e.to_string())?,
        SnapshotCmd::List(a) => tokio::task::spawn_blocking(move || list(a))
            .await
            .map_err(|e| e.to_string())?,
        SnapshotCmd::Status(a) => {
            let h = backup::verify(&a.file).map_err(|e| e.to_string())?;
            println!(
                "{}: ok: cluster {:?}, index {} (term {}), saved at {} ms since the epoch",
                a.file.display(),
                h.cluster,
                h.index,
                h.term,
                h.created_unix_ms
            );
            for f in &h.files {
                println!(
                    "  {:<24} {:>12} bytes  crc32 {:08x}",
                    f.name, f.len, f.crc32
                );
            }
            Ok(())
        }
    }
}

async fn save(a: SaveArgs) -> CliResult {
    let eps = parse_endpoints(&a.endpoints)?;
    let started = Instant::now();
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{spinner} saving [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    let dialer = a.tls.dialer()?;
    let r = backup::save(&dialer, &eps, &a.cluster, &a.file, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .await;
    bar.finish_and_clear();
    let r = r.map_err(|e| format!("snapshot save: {e}"))?;
    println!(
        "saved {} at index {} (term {}) from {}: {} databases, {} in {:.2?}",
        r.path.display(),
        r.header.index,
        r.header.term,
        r.from,
        r.header.files.len(),
        mib(r.file_bytes),
        started.elapsed()
    );
    Ok(())
}

fn list(a: ListArgs) -> CliResult {
    let all = backup_schedule::list(&a.dir).map_err(|e| format!("snapshot list: {e}"))?;
    let name = |p: &std::path::Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let saved = |ms: u64| {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    };
    if a.json {
        for l in &all {
            let v = match &l.verdict {
                Ok(h) => serde_json::json!({
                    "file": name(&l.path), "bytes": l.bytes, "ok": true, "cluster": h.cluster,
                    "index": h.index, "term": h.term, "saved": saved(h.created_unix_ms),
                    "databases": h.files.iter().map(|f| f.name.clone()).collect::<Vec<_>>(),
                }),
                Err(e) => serde_json::json!({
                    "file": name(&l.path), "bytes": l.bytes, "ok": false, "error": e.to_string(),
                }),
            };
            println!("{v}");
        }
    } else {
        println!(
            "{:<52} {:>10} {:>5} {:<24} {:>10}  STATUS",
            "FILE", "INDEX", "TERM", "SAVED (UTC)", "SIZE"
        );
        for l in &all {
            match &l.verdict {
                Ok(h) => println!(
                    "{:<52} {:>10} {:>5} {:<24} {:>10}  ok",
                    name(&l.path),
                    h.index,
                    h.term,
                    saved(h.created_unix_ms),
                    mib(l.bytes)
                ),
                Err(e) => println!(
                    "{:<52} {:>10} {:>5} {:<24} {:>10}  CORRUPT: {e}",
                    name(&l.path),
                    "-",
                    "-",
                    "-",
                    mib(l.bytes)
                ),
            }
        }
    }
    let bad = all.iter().filter(|l| l.verdict.is_err()).count();
    if all.is_empty() {
        return Err(format!(
            "snapshot list: no backups (*.{}) in {}",
            backup_schedule::EXTENSION,
            a.dir.display()
        ));
    }
    if bad > 0 {
        return Err(format!(
            "snapshot list: {bad} of {} backups in {} do not check out (restore skips them)",
            all.len(),
            a.dir.display()
        ));
    }
    Ok(())
}

fn restore(mut a: RestoreArgs) -> CliResult {
    let started = Instant::now();
    if a.file.is_dir() {
        let (good, skipped) =
            backup_schedule::newest_good(&a.file).map_err(|e| format!("snapshot restore: {e}"))?;
        for l in &skipped {
            if let Err(e) = &l.verdict {
                eprintln!("raftsql: skipping {}: {e}", l.path.display());
            }
        }
        eprintln!(
            "raftsql: restoring the newest good backup, {}",
            good.path.display()
        );
        a.file = good.path;
    }
    // The TLS files first: a bad --peer-ca-dir must not leave a half-made node behind.
    let tls = (a.peer_tls || a.peer_ca_dir.is_some())
        .then(|| {
            let cluster = a.cluster.as_deref().unwrap_or("raftsql");
            Material::new_node(a.peer_ca_dir.as_deref(), cluster, a.id, a.listen.ip())
        })
        .transpose()
        .map_err(|e| format!("snapshot restore: TLS: {e}"))?;
    let r = backup::restore(&a.file, &a.data_dir, a.id, a.listen, a.cluster.as_deref())
        .map_err(|e| format!("snapshot restore: {e}"))?;
    if let Some(m) = tls {
        raftsql_core::tls::install(&r.data_dir, &m)
            .map_err(|e| format!("snapshot restore: TLS: {e}"))?;
        println!(
            "peer TLS on: CA {} (clients: --cacert {})",
            m.ca.fingerprint_hex(),
            r.data_dir.join("tls/ca.crt").display()
        );
    }
    println!(
        "restored {} (index {}, term {}, {} databases, {}) into {} in {:.2?}",
        a.file.display(),
        r.header.index,
        r.header.term,
        r.header.files.len(),
        mib(r.header.data_bytes()),
        r.data_dir.display(),
        started.elapsed()
    );
    println!(
        "it is node {} of a new one-node cluster ({} old members dropped from its registry)",
        r.id, r.dropped_members
    );
    println!(
        "start it:  raftsql node --data-dir {} --listen {}",
        r.data_dir.display(),
        r.listen
    );
    println!("then grow it: raftsql add-node --endpoints {}", r.listen);
    Ok(())
}

/// Runs `raftsql recover`.
pub fn recover(a: RecoverArgs) -> CliResult {
    let r = recover::recover(&a.data_dir, a.dry_run).map_err(|e| format!("recover: {e}"))?;
    let ids = |v: &[u64]| {
        v.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let verb = if r.dry_run { "would" } else { "did" };
    println!(
        "node {} ({}): term {}, commit index {}, last log index {}",
        r.id,
        r.data_dir.display(),
        r.term,
        r.commit_index,
        r.last_index
    );
    println!(
        "configuration: voters [{}], standbys [{}] -> voters [{}]",
        ids(&r.old_voters),
        ids(&r.old_learners),
        ids(&r.new_voters)
    );
    println!(
        "{verb} keep every entry up to index {}; {verb} drop {} entries after it (never known to be committed)",
        r.commit_index, r.dropped_entries
    );
    if r.removed_members.is_empty() {
        println!("{verb} remove no other member from the registry");
    } else {
        let list: Vec<String> = r
            .removed_members
            .iter()
            .map(|(id, addr)| format!("{id} ({addr})"))
            .collect();
        println!("{verb} remove from the registry: {}", list.join(", "));
    }
    if r.dry_run {
        println!("dry run: nothing changed. Run without --dry-run on the survivor with the highest commit index.");
    } else {
        println!(
            "done. Start this node again with `raftsql node --data-dir {}` (same --listen);",
            r.data_dir.display()
        );
        println!("on every other survivor: stop it, move its data directory aside, and join again with a token from `raftsql add-node`.");
    }
    Ok(())
}
