//! Certificates for mutually authenticated TLS between nodes: the cluster's CA, node
//! certificates issued from a joiner's CSR, and private files with owner-only permissions.
//!
//! This is the first step of peer mTLS (issue 7); the transport does not use it yet. The
//! plan it follows is `docs/notes/mtls-plan.md`. Invariants kept here:
//!
//! - A node certificate names its node as `node-<id>.raftsql` (a DNS name; addresses can be
//!   reused by a later member, ids never are), carries both the server and the client
//!   extended key usage (a node dials and is dialled), and is signed by the cluster CA.
//! - The leader signs only the CSR's public key: whatever else a joiner puts in its CSR
//!   (names, CA flags, usages) is ignored, and a CSR whose self-signature does not verify is
//!   refused, so the joiner proves it holds the key.
//! - Private keys are written with mode 0600 in a 0700 directory, and a key file readable by
//!   group or others is refused when loaded.

use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The DNS name a node's certificate carries: `node-<id>.raftsql`.
pub fn node_name(id: u64) -> String {
    format!("node-{id}.raftsql")
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{what}: {e}"))
}

/// The cluster's certificate authority: its certificate and private key (PEM).
#[derive(Clone)]
pub struct ClusterCa {
    cert_der: Vec<u8>,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        write!(f, "ClusterCa({})", self.fingerprint_hex())
    }
}

impl ClusterCa {
    /// A new CA for the cluster named `cluster`.
    pub fn generate(cluster: &str) -> Result<ClusterCa> {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(
            DnType::CommonName,
            format!("raftsql cluster CA ({cluster})"),
        );
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(|e| tls_err("generating the CA key", e))?;
        let ca =
            CertifiedIssuer::self_signed(p, key).map_err(|e| tls_err("self-signing the CA", e))?;
        Ok(ClusterCa {
            cert_der: ca.der().to_vec(),
            cert_pem: ca.pem(),
            key_pem: ca.key().serialize_pem(),
        })
    }

    /// The CA certificate (PEM), which every member and client may see.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the CA certificate (DER): what a join string pins.
    pub fn fingerprint(&self) -> [u8; 32] {
        Sha256::digest(&self.cert_der).into()
    }

    /// [`ClusterCa::fingerprint`] as 64 lowercase hex digits.
    pub fn fingerprint_hex(&self) -> String {
        self.fingerprint()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Writes `ca.crt` and `ca.key` (mode 0600) into `dir` (created with mode 0700); refuses
    /// to overwrite an existing CA.
    pub fn save(&self, dir: &Path) -> Result<()> {
        private_dir(dir)?;
        write_private(&dir.join("ca.crt"), self.cert_pem.as_bytes())?;
        write_private(&dir.join("ca.key"), self.key_pem.as_bytes())
    }

    /// Reads a CA that [`ClusterCa::save`] wrote.
    pub fn load(dir: &Path) -> Result<ClusterCa> {
        let cert_pem = read_private(&dir.join("ca.crt"))?;
        let key_pem = read_private(&dir.join("ca.key"))?;
        let cert_der = pem_der(&cert_pem, "CERTIFICATE").ok_or_else(|| {
            Error::Corrupt(format!("{}: no certificate", dir.join("ca.crt").display()))
        })?;
        // The key must be the certificate's.
        let ca = ClusterCa {
            cert_der,
            cert_pem,
            key_pem,
        };
        ca.issuer()?;
        Ok(ca)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(|e| tls_err("the CA key", e))?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(|e| tls_err("the CA certificate", e))
    }

    /// Signs a certificate for node `id` (reachable at `ip`) with the public key of the
    /// PKCS#10 request `csr_der`; returns it as PEM. The request's self-signature must verify;
    /// nothing else in it is used.
    pub fn issue_node(&self, id: u64, ip: IpAddr, csr_der: &[u8]) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| tls_err("certificate request refused", e))?;
        let mut p = CertificateParams::new(vec![node_name(id)])
            .map_err(|e| tls_err("node certificate", e))?;
        if !ip.is_unspecified() {
            p.subject_alt_names.push(SanType::IpAddress(ip));
        }
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, format!("raftsql node {id}"));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&csr.public_key, &self.issuer()?)
            .map_err(|e| tls_err("signing the node certificate", e))?;
        Ok(cert.pem())
    }
}

/// A node's new key and a certificate request for it: (key PEM, CSR DER).
pub fn node_request() -> Result<(String, Vec<u8>)> {
    let key = KeyPair::generate().map_err(|e| tls_err("generating a node key", e))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| tls_err("certificate request", e))?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// The DER of the first PEM block labelled `label` in `pem`.
fn pem_der(pem: &str, label: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::{PemObject, SectionKind};
    let want = match label {
        "CERTIFICATE" => SectionKind::Certificate,
        _ => return None,
    };
    <(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_bytes())
        .filter_map(|r| r.ok())
        .find(|(k, _)| *k == want)
        .map(|(_, der)| der)
}

/// Creates `dir` with mode 0700 (and its parents), or checks that an existing one is not
/// open to group or others.
pub fn private_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(dir, e))?;
    }
    owner_only(dir, "open to", "700")
}

/// Refuses `path` if group or others have any permission on it.
fn owner_only(path: &Path, what: &str, chmod: &str) -> Result<()> {
    let mode = fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(Error::Invalid(format!(
            "{} is {what} other users (mode {:o}): chmod {chmod} it",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

/// Writes `data` to a new file `path` with mode 0600, durably (temporary file, fsync,
/// rename). Refuses to replace an existing file.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    if path.exists() {
        return Err(Error::Invalid(format!(
            "{} exists: not overwriting it",
            path.display()
        )));
    }
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    f.write_all(data).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    if let Some(d) = path.parent() {
        fs::File::open(d)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(d, e))?;
    }
    Ok(())
}

/// Reads a file [`write_private`] wrote, refusing one that group or others may read.
pub fn read_private(path: &Path) -> Result<String> {
    owner_only(path, "readable by", "600")?;
    fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::server::ParsedCertificate;

    fn verify(ca: &ClusterCa, cert_pem: &str, id: u64) -> std::result::Result<(), rustls::Error> {
        verify_via(ca, cert_pem, &[], id)
    }

    fn verify_via(
        ca: &ClusterCa,
        cert_pem: &str,
        intermediates: &[&str],
        id: u64,
    ) -> std::result::Result<(), rustls::Error> {
        let der = CertificateDer::from(pem_der(cert_pem, "CERTIFICATE").unwrap());
        let inter: Vec<CertificateDer<'static>> = intermediates
            .iter()
            .map(|p| CertificateDer::from(pem_der(p, "CERTIFICATE").unwrap()))
            .collect();
        let parsed = ParsedCertificate::try_from(&der)?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.cert_der.clone()))?;
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &inter,
            UnixTime::now(),
            algs.all,
        )?;
        rustls::client::verify_server_name(&parsed, &ServerName::try_from(node_name(id)).unwrap())
    }

    #[test]
    fn a_node_certificate_verifies_for_its_id_only() {
        let ca = ClusterCa::generate("c1").unwrap();
        let (_key, csr) = node_request().unwrap();
        let cert = ca
            .issue_node(2, "127.0.0.2".parse().unwrap(), &csr)
            .unwrap();
        verify(&ca, &cert, 2).unwrap();
        assert!(
            verify(&ca, &cert, 3).is_err(),
            "a certificate for node 2 passed as node 3's"
        );
        // Another cluster's CA does not vouch for it.
        let other = ClusterCa::generate("c2").unwrap();
        assert!(verify(&other, &cert, 2).is_err());
        assert_ne!(ca.fingerprint(), other.fingerprint());
        assert_eq!(ca.fingerprint_hex().len(), 64);
    }

    #[test]
    fn a_csr_must_be_signed_by_its_key_and_cannot_ask_for_a_ca() {
        let ca = ClusterCa::generate("c").unwrap();
        let (_, mut csr) = node_request().unwrap();
        let n = csr.len();
        csr[n - 5] ^= 0x55; // inside the signature
        let e = ca
            .issue_node(2, "127.0.0.2".parse().unwrap(), &csr)
            .unwrap_err();
        assert!(e.to_string().contains("certificate request refused"), "{e}");
        // A CSR asking to be a CA gets a leaf: only its key is used.
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let greedy = p.serialize_request(&key).unwrap().der().to_vec();
        let cert = ca
            .issue_node(4, "127.0.0.4".parse().unwrap(), &greedy)
            .unwrap();
        verify(&ca, &cert, 4).unwrap();
        let leaf_as_ca = rcgen::Issuer::from_ca_cert_pem(&cert, key).unwrap();
        let mut victim = CertificateParams::new(vec![node_name(9)]).unwrap();
        victim.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let forged = victim
            .signed_by(&KeyPair::generate().unwrap(), &leaf_as_ca)
            .unwrap()
            .pem();
        // Even presented with the leaf as an intermediate, the chain does not verify.
        let e = verify_via(&ca, &forged, &[&cert], 9).unwrap_err();
        assert!(format!("{e:?}").contains("EndEntityUsedAsCa"), "{e:?}");
        eprintln!("a leaf's signature refused: {e:?}");
    }

    #[test]
    fn private_files_are_owner_only_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let ca = ClusterCa::generate("c").unwrap();
        ca.save(&tls).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tls), 0o700);
        assert_eq!(mode(&tls.join("ca.key")), 0o600);
        assert_eq!(mode(&tls.join("ca.crt")), 0o600);
        let back = ClusterCa::load(&tls).unwrap();
        assert_eq!(back.fingerprint(), ca.fingerprint());
        assert!(ca.save(&tls).is_err(), "an existing CA was overwritten");
        assert!(
            !format!("{ca:?}").contains("PRIVATE"),
            "Debug shows the key"
        );
        fs::set_permissions(tls.join("ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
        let e = ClusterCa::load(&tls).unwrap_err();
        assert!(e.to_string().contains("readable by other users"), "{e}");
    }
}
