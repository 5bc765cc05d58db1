//! Opening connections: TCP with the node's own source address, then TLS when the cluster
//! runs it, verified for the peer the caller meant ([`Peer`]).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::{TcpSocket, TcpStream};

use super::frame::{hello, write_frame, Halves};

/// How long a TCP connect may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Dials `addr`, binding the source address to `local` when given (port chosen by the OS).
pub async fn dial(addr: SocketAddr, local: Option<IpAddr>) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = local {
        if ip.is_ipv4() == addr.is_ipv4() && !ip.is_unspecified() {
            sock.bind(SocketAddr::new(ip, 0))?;
        }
    }
    let s = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// The DNS name a node's certificate carries: `node-<id>.raftsql`.
pub fn node_name(id: u64) -> String {
    format!("node-{id}.raftsql")
}

/// Who a connection is meant to reach: which name the server's certificate must carry.
#[derive(Clone, Copy, Debug)]
pub enum Peer {
    /// Node `id` (its certificate must name `node-<id>.raftsql`).
    Node(u64),
    /// Whatever node listens at the address (a client's endpoint: the certificate must
    /// name the address's IP).
    Endpoint,
}

/// How connections are opened.
#[derive(Clone, Default)]
pub enum Dialer {
    /// Plain TCP.
    #[default]
    Plain,
    /// TLS against the given roots (with a client certificate if configured).
    Tls(Arc<ClientConfig>),
    /// TLS to any member of the cluster whose CA has this fingerprint (a joiner).
    Join(Arc<ClientConfig>),
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dialer::Plain => "Dialer::Plain",
            Dialer::Tls(_) => "Dialer::Tls",
            Dialer::Join(_) => "Dialer::Join",
        })
    }
}

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

impl Dialer {
    /// True unless plain TCP.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Dialer::Plain)
    }

    /// Opens a connection to `to` at `addr` (source address `local` when given) and says
    /// hello on it as `from_id` (0 for clients) of `cluster`: how every request connection
    /// starts.
    pub(crate) async fn open_with_hello(
        &self,
        addr: SocketAddr,
        local: Option<IpAddr>,
        to: Peer,
        from_id: u64,
        cluster: &str,
    ) -> io::Result<Halves> {
        let (r, mut w) = self.open(addr, local, to).await?;
        write_frame(&mut w, &hello(from_id, cluster)).await?;
        Ok((r, w))
    }

    /// Opens a connection to `addr` (source address `local` when given) meant for `to`.
    pub(crate) async fn open(
        &self,
        addr: SocketAddr,
        local: Option<IpAddr>,
        to: Peer,
    ) -> std::io::Result<Halves> {
        let tcp = dial(addr, local).await?;
        let (cfg, name) = match (self, to) {
            (Dialer::Plain, _) => {
                let (r, w) = tcp.into_split();
                return Ok((Box::new(r), Box::new(w)));
            }
            (Dialer::Tls(c), Peer::Node(id)) => (c, ServerName::try_from(node_name(id)).unwrap()),
            (Dialer::Tls(c), Peer::Endpoint) => (c, ServerName::from(addr.ip())),
            (Dialer::Join(c), _) => (c, ServerName::try_from("join.raftsql").unwrap()),
        };
        let s = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                with_hint(format!("TLS handshake with {addr}: {e}")),
            )
        })?;
        let (r, w) = tokio::io::split(s);
        Ok((Box::new(r), Box::new(w)))
    }
}

/// What to do about a TLS failure, from its message (rustls' error names), for the errors
/// a person meets when a flag is wrong; `None` if there is nothing better to say.
pub fn explain(msg: &str) -> Option<&'static str> {
    let has = |s: &str| msg.contains(s);
    if has("BadSignature") || has("UnknownIssuer") {
        Some(
            "the node's certificate is not signed by the CA given to --cacert: give the \
             cluster's CA (ca.crt of `raftsql ca init`, or a node's <data-dir>/tls/ca.crt)",
        )
    } else if has("NotValidForName") {
        Some("the node's certificate does not name this address: connect to the address it was started with")
    } else if has("Expired") {
        Some("a certificate expired: check the clocks, or issue a new one")
    } else if [
        "CertificateUnknown",
        "BadCertificate",
        "UnknownCA",
        "DecryptError",
    ]
    .iter()
    .any(|a| has(&format!("alert: {a}")))
    {
        // (DecryptError: rustls' answer to a client certificate whose signature does not
        // verify, e.g. one of another CA with the same name.)
        Some(
            "the node refused this client's certificate: give --cert/--key issued by the \
             cluster's CA (`raftsql ca client-cert --ca-dir <node data-dir>/tls --name NAME --out FILE`)",
        )
    } else {
        None
    }
}

/// `msg` with [`explain`]'s hint after it, if it has one and does not carry it yet.
pub fn with_hint(msg: String) -> String {
    match explain(&msg).filter(|h| !msg.contains(h)) {
        Some(h) => format!("{msg} ({h})"),
        None => msg,
    }
}
