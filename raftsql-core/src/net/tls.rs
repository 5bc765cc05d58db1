//! Certificates for mutually authenticated TLS between nodes: the cluster's CA, node
//! certificates issued from a joiner's CSR, and private files with owner-only permissions.
//!
//! [`PeerTls`] is what the transport serves with and dials peers with; [`Dialer`] is how
//! a connection is opened (plaintext, mutually authenticated, or pinned for a join).
//! The design is `docs/notes/mtls-plan.md`. Invariants kept here:
//!
//! - A node certificate names its node as `node-<id>.raftsql` (a DNS name; addresses can be
//!   reused by a later member, ids never are), carries both the server and the client
//!   extended key usage (a node dials and is dialled), and is signed by the cluster CA.
//! - The leader signs only the CSR's public key: whatever else a joiner puts in its CSR
//!   (names, CA flags, usages) is ignored, and a CSR whose self-signature does not verify is
//!   refused, so the joiner proves it holds the key.
//! - Private keys are written with mode 0600 in a 0700 directory, and a key file readable by
//!   group or others is refused when loaded.
//! - A peer is whoever presents a certificate of the cluster CA naming the id it claims in
//!   its hello (`PeerTls::check`); a client certificate from `--trusted-ca-file` never
//!   passes as a peer, and a removed node's certificate passes as nothing.
//! - A joiner trusts the server only if the CA in its chain has the join string's SHA-256
//!   fingerprint; it sends nothing (not even the token's proof) before that check.

use std::collections::HashSet;
use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};

use super::dial::node_name;
use crate::error::{Error, Result};

pub use super::dial::{Dialer, Peer};

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
        Self::from_pem(cert_pem, key_pem)
            .map_err(|e| Error::Invalid(format!("the CA in {}: {e}", dir.display())))
    }

    /// The CA of a certificate and its key (PEM); refuses a key that is not the
    /// certificate's.
    pub fn from_pem(cert_pem: String, key_pem: String) -> Result<ClusterCa> {
        let cert_der = pem_der(&cert_pem, "CERTIFICATE")
            .ok_or_else(|| Error::Corrupt("no CA certificate".into()))?;
        // The key must be the certificate's.
        let ca = ClusterCa {
            cert_der,
            cert_pem,
            key_pem,
        };
        let issuer = ca.issuer()?;
        let key_spki = rcgen::PublicKeyData::subject_public_key_info(issuer.key());
        let der = CertificateDer::from(ca.cert_der.clone());
        let cert =
            ParsedCertificate::try_from(&der).map_err(|e| tls_err("the CA certificate", e))?;
        if cert.subject_public_key_info().as_ref() != key_spki.as_slice() {
            return Err(Error::Invalid(
                "the CA key does not belong to the CA certificate".into(),
            ));
        }
        Ok(ca)
    }

    /// The CA private key (PEM): given only to a joiner, over its pinned connection.
    pub(crate) fn key_pem(&self) -> &str {
        &self.key_pem
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

/// The TLS files of a node (`<data>/tls/`): the cluster CA and the node's own certificate
/// and key, all PEM.
#[derive(Clone)]
pub struct Material {
    /// The cluster CA (every member keeps its key: any leader can admit a joiner).
    pub ca: ClusterCa,
    /// This node's certificate, naming `node-<id>.raftsql`.
    pub node_cert_pem: String,
    /// This node's private key.
    pub node_key_pem: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Material({:?})", self.ca)
    }
}

impl Material {
    /// A new key and certificate for node `id` at `ip`, signed by `ca`.
    pub fn for_node(ca: ClusterCa, id: u64, ip: IpAddr) -> Result<Material> {
        let (key, csr) = node_request()?;
        let cert = ca.issue_node(id, ip, &csr)?;
        Ok(Material {
            ca,
            node_cert_pem: cert,
            node_key_pem: key,
        })
    }

    /// Files for node `id` at `ip` of a cluster whose CA is in `ca_dir` (`raftsql ca init`),
    /// or, without one, of a new CA for the cluster named `cluster`.
    pub fn new_node(ca_dir: Option<&Path>, cluster: &str, id: u64, ip: IpAddr) -> Result<Material> {
        let ca = match ca_dir {
            Some(d) => ClusterCa::load(d)?,
            None => ClusterCa::generate(cluster)?,
        };
        Material::for_node(ca, id, ip)
    }

    /// Writes `ca.crt`, `ca.key`, `node.crt` and `node.key` (0600) into `dir` (0700).
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.ca.save(dir)?;
        write_private(&dir.join("node.crt"), self.node_cert_pem.as_bytes())?;
        write_private(&dir.join("node.key"), self.node_key_pem.as_bytes())
    }

    /// Reads what [`Material::save`] wrote, refusing files open to other users.
    pub fn load(dir: &Path) -> Result<Material> {
        owner_only(dir, "open to", "700")?;
        Ok(Material {
            ca: ClusterCa::load(dir)?,
            node_cert_pem: read_private(&dir.join("node.crt"))?,
            node_key_pem: read_private(&dir.join("node.key"))?,
        })
    }

    /// The node's chain (its certificate, then the CA's) and key.
    fn chain_and_key(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let cert = pem_der(&self.node_cert_pem, "CERTIFICATE")
            .ok_or_else(|| Error::Corrupt("node.crt: no certificate".into()))?;
        let key = PrivateKeyDer::from_pem_slice(self.node_key_pem.as_bytes())
            .map_err(|e| Error::Corrupt(format!("node.key: {e}")))?;
        let chain = vec![
            CertificateDer::from(cert),
            CertificateDer::from(self.ca.cert_der.clone()),
        ];
        Ok((chain, key))
    }

    /// The node's certificate and name as `id`: its certificate must be the CA's for it.
    pub fn check_for(&self, id: u64) -> Result<()> {
        let (chain, _) = self.chain_and_key()?;
        let mut roots = RootCertStore::empty();
        roots
            .add(chain[1].clone())
            .map_err(|e| tls_err("the cluster CA certificate", e))?;
        verify_node(&chain[0], &[], &roots, id).map_err(|e| {
            Error::Invalid(format!(
                "node.crt is not the cluster's certificate for node {id}: {e}"
            ))
        })
    }
}

use rustls::pki_types::pem::PemObject as _;

/// The crypto provider every config here is built with (ring, as tonic uses).
pub fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A node's TLS choices (see [`setup`]).
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    /// Run TLS between nodes. A new single-node cluster creates its CA; bootstrap nodes of a
    /// larger one need [`TlsSettings::ca_dir`].
    pub peer_tls: bool,
    /// Take the cluster CA from this directory (`raftsql ca init`); implies `peer_tls`.
    pub ca_dir: Option<PathBuf>,
    /// The files a join brought (a node joining a TLS cluster).
    pub joined: Option<Material>,
    /// What SQL clients see and must present.
    pub client: ClientFacing,
}

/// Finds or creates the node's TLS files in `<data>/tls/` (`fresh`: the data directory holds
/// no node yet). A directory with `tls/` always runs TLS, whatever the settings; an existing
/// plaintext node cannot be switched to TLS.
pub fn setup(cfg: &crate::NodeConfig, fresh: bool) -> Result<Option<Material>> {
    let dir = cfg.data_dir.join("tls");
    let s = &cfg.tls;
    if dir.exists() {
        let m = Material::load(&dir)?;
        m.check_for(cfg.id)?;
        return Ok(Some(m));
    }
    if !(s.peer_tls || s.ca_dir.is_some() || s.joined.is_some()) {
        return Ok(None);
    }
    if !fresh {
        return Err(Error::Invalid(format!(
            "{} holds a node that runs without TLS: peer TLS is chosen when a cluster is \
             formed, and an existing node cannot be switched to it",
            cfg.data_dir.display()
        )));
    }
    let m = if let Some(m) = &s.joined {
        m.clone()
    } else if s.ca_dir.is_some() || cfg.peers.len() <= 1 {
        Material::new_node(s.ca_dir.as_deref(), &cfg.cluster, cfg.id, cfg.listen.ip())?
    } else {
        return Err(Error::Invalid(format!(
            "peer TLS with {} bootstrap nodes: they must share one CA: run `raftsql ca init DIR` \
             once and pass --peer-ca-dir DIR to every bootstrap node",
            cfg.peers.len()
        )));
    };
    m.check_for(cfg.id)?;
    install(&cfg.data_dir, &m)?;
    tracing::info!(
        "peer TLS on: node certificate for {} signed by CA {}",
        node_name(cfg.id),
        m.ca.fingerprint_hex()
    );
    Ok(Some(m))
}

/// Writes `m` as `<data_dir>/tls/`: whole into a scratch directory, then renamed, so that a
/// crash leaves all or nothing. Refuses to replace an existing `tls/`.
pub fn install(data_dir: &Path, m: &Material) -> Result<()> {
    let dir = data_dir.join("tls");
    if dir.exists() {
        return Err(Error::Invalid(format!(
            "{} exists: not replacing it",
            dir.display()
        )));
    }
    let scratch = data_dir.join("tls.new");
    if scratch.exists() {
        fs::remove_dir_all(&scratch).map_err(|e| Error::io(&scratch, e))?;
    }
    m.save(&scratch)?;
    fs::rename(&scratch, &dir).map_err(|e| Error::io(&dir, e))?;
    fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(data_dir, e))
}

/// The client-facing side of a node's TLS: what SQL clients on `--listen` see and must
/// present (the etcd facade reads the same flags).
#[derive(Clone, Debug, Default)]
pub struct ClientFacing {
    /// Certificate chain (PEM) shown to clients instead of the node certificate.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates may also be signed by (besides the
    /// cluster CA).
    pub trusted_ca_file: Option<PathBuf>,
    /// Refuse clients without a verified certificate.
    pub client_cert_auth: bool,
}

fn load_certs(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Invalid(format!("{flag} {}: {e}", path.display())))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Invalid(format!("{flag} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Invalid(format!(
            "{flag} {}: no certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

fn load_key(path: &Path, flag: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| Error::Invalid(format!("{flag} {}: {e}", path.display())))
}

/// Picks the certificate by the name the client asked for: peers and joiners dial
/// `*.raftsql` names and get the node certificate; clients get the client-facing one.
#[derive(Debug)]
struct Resolver {
    node: Arc<CertifiedKey>,
    client_facing: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(n) if n.ends_with(".raftsql") => Some(self.node.clone()),
            _ => Some(
                self.client_facing
                    .clone()
                    .unwrap_or_else(|| self.node.clone()),
            ),
        }
    }
}

/// A node's TLS: the acceptor for its listener, the dialer for its peers, and the check of
/// who a connection is once it has said hello.
pub struct PeerTls {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    /// Dials peers with this node's certificate.
    pub dialer: Dialer,
    roots: Arc<RootCertStore>,
    client_cert_auth: bool,
    ca_fingerprint: String,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerTls(CA {})", self.ca_fingerprint)
    }
}

impl PeerTls {
    /// Builds the node's TLS from its files and the client-facing flags.
    pub fn new(m: &Material, client: &ClientFacing) -> Result<PeerTls> {
        let p = Arc::new(provider());
        let client_cert_auth = client.client_cert_auth;
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(m.ca.cert_der.clone()))
            .map_err(|e| tls_err("the cluster CA certificate", e))?;
        let roots = Arc::new(roots);
        let (chain, key) = m.chain_and_key()?;
        let node = Arc::new(
            CertifiedKey::from_der(chain.clone(), key.clone_key(), &p)
                .map_err(|e| tls_err("node.crt does not match node.key", e))?,
        );
        let client_facing = match (&client.cert_file, &client.key_file) {
            (Some(c), Some(k)) => Some(Arc::new(
                CertifiedKey::from_der(
                    load_certs(c, "--cert-file")?,
                    load_key(k, "--key-file")?,
                    &p,
                )
                .map_err(|e| tls_err("--cert-file and --key-file", e))?,
            )),
            _ => None,
        };
        let mut accepted = (*roots).clone();
        if let Some(f) = &client.trusted_ca_file {
            for c in load_certs(f, "--trusted-ca-file")? {
                accepted
                    .add(c)
                    .map_err(|e| tls_err("--trusted-ca-file", e))?;
            }
        }
        // Joiners never have a certificate, and clients need one only under
        // --client-cert-auth (checked after the hello); one that is presented must verify.
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(accepted), p.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| tls_err("client certificate verifier", e))?;
        let mut server = ServerConfig::builder_with_provider(p.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("TLS versions", e))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver {
                node: node.clone(),
                client_facing,
            }));
        server.send_tls13_tickets = 0;
        let client = ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("TLS versions", e))?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_err("the node certificate", e))?;
        Ok(PeerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            dialer: Dialer::Tls(Arc::new(client)),
            roots,
            client_cert_auth,
            ca_fingerprint: m.ca.fingerprint_hex(),
        })
    }

    /// Who may go on after saying hello as `from` (0 = a client; joiners are not checked) with the
    /// certificate chain `certs` (already verified by the handshake against the accepted
    /// roots, if any). `Err` is the reason to refuse, and whether it is a revocation.
    pub(crate) fn check(
        &self,
        from: u64,
        certs: Option<&[CertificateDer<'static>]>,
        revoked: &HashSet<u64>,
    ) -> std::result::Result<(), (String, bool)> {
        let parsed = certs.and_then(|c| c.split_first());
        if from != 0 {
            // (A removed `from` was refused before this, by the transport.)
            let Some((ee, chain)) = parsed else {
                return Err((format!("node {from} presented no certificate"), false));
            };
            return verify_node(ee, chain, &self.roots, from).map_err(|e| {
                (
                    format!("the certificate presented is not the cluster's for node {from}: {e}"),
                    false,
                )
            });
        }
        match parsed {
            None if self.client_cert_auth => Err((
                "this node requires a client certificate (--client-cert-auth)".into(),
                false,
            )),
            None => Ok(()),
            Some((ee, chain)) => {
                // A removed node's certificate does not pass as a client's either. (One
                // chain check, then a name check per removed id.)
                let Ok(parsed) = ParsedCertificate::try_from(ee) else {
                    return Ok(());
                };
                if verify_chain(&parsed, chain, &self.roots).is_err() {
                    return Ok(()); // not a node certificate of this cluster
                }
                for id in revoked {
                    if verify_name(&parsed, *id).is_ok() {
                        return Err((removed_reason(*id, true), true));
                    }
                }
                Ok(())
            }
        }
    }
}

/// Checks that `ee` (with intermediates `chain`) is the cluster CA's certificate for node `id`.
fn verify_node(
    ee: &CertificateDer<'_>,
    chain: &[CertificateDer<'_>],
    roots: &RootCertStore,
    id: u64,
) -> std::result::Result<(), rustls::Error> {
    let parsed = ParsedCertificate::try_from(ee)?;
    verify_chain(&parsed, chain, roots)?;
    verify_name(&parsed, id)
}

/// Checks that `parsed` chains to `roots` (with intermediates `chain`) as a node certificate.
fn verify_chain(
    parsed: &ParsedCertificate<'_>,
    chain: &[CertificateDer<'_>],
    roots: &RootCertStore,
) -> std::result::Result<(), rustls::Error> {
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        parsed,
        roots,
        chain,
        UnixTime::now(),
        provider().signature_verification_algorithms.all,
    )
}

/// Checks that `parsed` names node `id`.
fn verify_name(parsed: &ParsedCertificate<'_>, id: u64) -> std::result::Result<(), rustls::Error> {
    let name =
        ServerName::try_from(node_name(id)).map_err(|e| rustls::Error::General(e.to_string()))?;
    rustls::client::verify_server_name(parsed, &name)
}

/// The joiner's server check: the CA in the server's chain must have the pinned
/// fingerprint, and the server's certificate must be signed by it (any member will do).
#[derive(Debug)]
struct PinnedCa {
    fp: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        inter: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let ca = inter
            .iter()
            .find(|c| Sha256::digest(c.as_ref())[..] == self.fp)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the cluster's CA does not match the join string's fingerprint".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &ParsedCertificate::try_from(ee)?,
            &roots,
            &[],
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Parses a 64-hex-digit fingerprint.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Invalid(
            "malformed CA fingerprint: expected 64 hexadecimal digits".into(),
        ));
    }
    let mut fp = [0u8; 32];
    for (i, b) in fp.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    Ok(fp)
}

impl ClusterCa {
    /// Writes a client certificate (client authentication only) named `name` to `cert` and
    /// its new key to `key`, both owner-only and new.
    pub fn issue_client(&self, name: &str, cert: &Path, key: &Path) -> Result<()> {
        let (c, k) = self.client_pem(name)?;
        write_private(cert, c.as_bytes())?;
        write_private(key, k.as_bytes())
    }

    fn client_pem(&self, name: &str) -> Result<(String, String)> {
        let key = KeyPair::generate().map_err(|e| tls_err("generating a client key", e))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&key, &self.issuer()?)
            .map_err(|e| tls_err("signing the client certificate", e))?;
        Ok((cert.pem(), key.serialize_pem()))
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

/// Why removed node `id` is refused (with TLS: its certificate is what is refused).
pub(crate) fn removed_reason(id: u64, tls: bool) -> String {
    if tls {
        format!("node {id} was removed from the cluster; its certificate is revoked")
    } else {
        format!("node {id} was removed from the cluster")
    }
}

impl Dialer {
    /// A client's dialer: trust the CA certificates in `cacert` (e.g. a node's
    /// `tls/ca.crt`), and present `cert`/`key` if given (etcdctl's `--cacert/--cert/--key`).
    pub fn client(cacert: &Path, cert_key: Option<(&Path, &Path)>) -> Result<Dialer> {
        let p = Arc::new(provider());
        let mut roots = RootCertStore::empty();
        for c in load_certs(cacert, "--cacert")? {
            roots.add(c).map_err(|e| tls_err("--cacert", e))?;
        }
        let b = ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("TLS versions", e))?
            .with_root_certificates(roots);
        let cfg = match cert_key {
            Some((c, k)) => b
                .with_client_auth_cert(load_certs(c, "--cert")?, load_key(k, "--key")?)
                .map_err(|e| tls_err("--cert and --key", e))?,
            None => b.with_no_client_auth(),
        };
        Ok(Dialer::Tls(Arc::new(cfg)))
    }

    /// A joiner's dialer: the server must present a chain whose CA has SHA-256 `fp`.
    pub fn pinned(fp: [u8; 32]) -> Dialer {
        let p = Arc::new(provider());
        let cfg = ClientConfig::builder_with_provider(p.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCa { fp, provider: p }))
            .with_no_client_auth();
        Dialer::Join(Arc::new(cfg))
    }
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
