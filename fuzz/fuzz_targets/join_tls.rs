//! Fuzzes what a TLS join decodes from the network: the joiner's certificate request (PKCS#10
//! DER, parsed and signed by the leader) and the certificates and key in a join answer (PEM,
//! parsed by the joiner). Must never panic; a request is signed only if its self-signature
//! verifies, so random bytes must never yield a certificate.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use raftsql_core::tls::ClusterCa;

fn ca() -> &'static ClusterCa {
    static CA: OnceLock<ClusterCa> = OnceLock::new();
    CA.get_or_init(|| ClusterCa::generate("fuzz").unwrap())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            // A CSR as the leader receives it.
            if let Ok(cert) = ca().issue_node(7, "127.0.0.7".parse().unwrap(), rest) {
                // Only a well-formed, correctly self-signed request can get here.
                assert!(cert.contains("BEGIN CERTIFICATE"));
            }
        }
        1 => {
            // A join answer's CA certificate and key, as the joiner receives them.
            let (cert, key) = rest.split_at(rest.len() / 2);
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let _ = ClusterCa::from_pem(text(cert), text(key));
        }
        _ => {
            // A real CA certificate with a fuzzed key.
            let key = String::from_utf8_lossy(rest).into_owned();
            // Only the CA's own key may pass, and the fuzzer never sees it.
            assert!(ClusterCa::from_pem(ca().cert_pem().to_string(), key).is_err());
        }
    }
});
