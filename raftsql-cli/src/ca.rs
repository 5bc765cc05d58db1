//! `raftsql ca`: the cluster CA for peer TLS, and client certificates.

use crate::{CaCmd, CliResult};

pub(crate) fn run_ca(c: CaCmd) -> CliResult {
    use raftsql_core::tls::ClusterCa;
    match c {
        CaCmd::Init { dir, cluster } => {
            if dir.join("ca.key").exists() || dir.join("ca.crt").exists() {
                return Err(format!(
                    "{} already holds a CA: not replacing it",
                    dir.display()
                ));
            }
            let ca = ClusterCa::generate(&cluster).map_err(|e| e.to_string())?;
            ca.save(&dir).map_err(|e| e.to_string())?;
            println!(
                "cluster CA written to {} (ca.crt, ca.key; owner-only)",
                dir.display()
            );
            println!("fingerprint (SHA-256): {}", ca.fingerprint_hex());
            println!(
                "start every bootstrap node with --peer-ca-dir {}; keep ca.key secret (every \
                 member keeps a copy in its data directory's tls/)",
                dir.display()
            );
            Ok(())
        }
        CaCmd::ClientCert { ca_dir, name, out } => {
            let ca = ClusterCa::load(&ca_dir).map_err(|e| e.to_string())?;
            let (c, k) = (out.with_extension("crt"), out.with_extension("key"));
            ca.issue_client(&name, &c, &k).map_err(|e| e.to_string())?;
            println!(
                "client certificate {} and key {} for {name:?}",
                c.display(),
                k.display()
            );
            Ok(())
        }
    }
}
