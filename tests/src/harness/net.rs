//! Network partitions between loopback addresses, made with iptables.
//!
//! Every node binds its outgoing peer connections to its own address, so a rule
//! `-s A -d B -j DROP` cuts exactly the traffic from node A to node B. The rules live in a
//! chain of their own (`RAFTSQL-<pid>-<n>`), jumped to from OUTPUT; dropping the
//! [`Partition`] (also while a failing test unwinds) removes the jump and the chain.

use std::net::IpAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(1);

fn ipt(args: &[&str]) -> Result<(), String> {
    let out = Command::new("iptables")
        .args(args)
        .output()
        .map_err(|e| format!("iptables: {e} (install the iptables package)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Traffic dropped between groups of addresses while this lives.
pub struct Partition {
    chain: String,
}

impl Partition {
    /// Cuts every link between a member of `a` and a member of `b`, both ways.
    pub fn between(a: &[IpAddr], b: &[IpAddr]) -> Result<Partition, String> {
        let chain = format!(
            "RAFTSQL-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        ipt(&["-N", &chain])?;
        let p = Partition { chain };
        for x in a {
            for y in b {
                for (s, d) in [(x, y), (y, x)] {
                    ipt(&[
                        "-A",
                        &p.chain,
                        "-s",
                        &s.to_string(),
                        "-d",
                        &d.to_string(),
                        "-j",
                        "DROP",
                    ])?;
                }
            }
        }
        ipt(&["-I", "OUTPUT", "1", "-j", &p.chain])?;
        Ok(p)
    }

    /// Whether iptables can be used here (installed, and we may change rules).
    pub fn available() -> Result<(), String> {
        let p = Partition::between(&[], &[])?;
        drop(p);
        Ok(())
    }

    /// For a test that needs iptables: true if it can be used; else false after saying why
    /// the test is skipped (outside CI; in CI a missing iptables fails the test).
    pub fn usable_or_skip() -> bool {
        match Partition::available() {
            Ok(()) => true,
            Err(e) => {
                assert!(
                    std::env::var("CI").is_err(),
                    "iptables is required in CI: {e}"
                );
                eprintln!("skipped: {e}");
                false
            }
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = ipt(&["-D", "OUTPUT", "-j", &self.chain]);
        let _ = ipt(&["-F", &self.chain]);
        let _ = ipt(&["-X", &self.chain]);
    }
}
