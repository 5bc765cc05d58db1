//! A real etcd for differential tests, and helpers to compare answers.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use raftsql_etcd::pb::etcdserverpb::{kv_client::KvClient, RangeRequest};
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(30);

/// A real single-member etcd on a free loopback port.
pub struct RealEtcd {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The reference etcd: `RAFTSQL_REF_ETCD` (e.g. the 3.6 that `scripts/build-kube-current.sh`
/// builds), or Debian's `etcd` (3.4) on the PATH.
pub fn etcd_bin() -> String {
    std::env::var("RAFTSQL_REF_ETCD").unwrap_or_else(|_| "etcd".into())
}

impl RealEtcd {
    /// Starts etcd, or returns None (test skipped) if it is not installed and CI is not set.
    pub fn start() -> Option<RealEtcd> {
        Self::start_with(&[])
    }

    /// [`RealEtcd::start`] with extra `etcd` arguments.
    pub fn start_with(args: &[&str]) -> Option<RealEtcd> {
        if Command::new(etcd_bin()).arg("--version").output().is_err() {
            assert!(
                std::env::var("CI").is_err(),
                "etcd (Debian package etcd-server) is required in CI: .ci/run installs it"
            );
            eprintln!("SKIPPED: etcd is not installed (apt-get install etcd-server)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let (cp, pp) = (free_port(), free_port());
        let client = format!("http://127.0.0.1:{cp}");
        let peer = format!("http://127.0.0.1:{pp}");
        let child = Command::new(etcd_bin())
            .args(["--name", "ref", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &format!("ref={peer}"),
                "--initial-cluster-state",
                "new",
            ])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        Some(RealEtcd {
            child,
            addr: format!("127.0.0.1:{cp}").parse().unwrap(),
            _dir: dir,
        })
    }
}

impl Drop for RealEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn connect(addr: SocketAddr) -> KvClient<Channel> {
    let deadline = Instant::now() + T;
    loop {
        if let Ok(mut c) = KvClient::connect(format!("http://{addr}")).await {
            let probe = c
                .range(RangeRequest {
                    key: Bytes::from_static(b"probe"),
                    ..Default::default()
                })
                .await;
            if probe.is_ok() {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "no etcd API at {addr}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An answer with what may legitimately differ removed.
pub fn normalize(r: Result<String, tonic::Status>) -> String {
    match r {
        Ok(s) => s,
        Err(st) => format!("ERROR {:?}: {}", st.code(), st.message()),
    }
}

/// Debug text of a message with every header reduced to its revision.
pub fn strip_headers(s: String) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(i) = rest.find("ResponseHeader {") {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let end = tail.find('}').unwrap() + 1;
        let h = &tail[..end];
        let rev = h
            .split("revision: ")
            .nth(1)
            .and_then(|x| x.split(',').next())
            .unwrap_or("?");
        out.push_str(&format!("Header {{ revision: {} }}", rev.trim()));
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Opens a watch stream on `endpoint` for keys in [`key`, `range_end`) from revision
/// `start`, within `within` (connection and the call): the sender (keep it alive to keep the
/// stream open) and the response stream, or None.
pub async fn watch_from(
    endpoint: &str,
    key: &'static [u8],
    range_end: &'static [u8],
    start: i64,
    within: Duration,
) -> Option<(
    tokio::sync::mpsc::Sender<raftsql_etcd::pb::etcdserverpb::WatchRequest>,
    tonic::Streaming<raftsql_etcd::pb::etcdserverpb::WatchResponse>,
)> {
    use raftsql_etcd::pb::etcdserverpb::{
        watch_client::WatchClient, watch_request, WatchCreateRequest, WatchRequest,
    };
    let mut w = tokio::time::timeout(within, WatchClient::connect(endpoint.to_string()))
        .await
        .ok()?
        .ok()?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: Bytes::from_static(key),
                range_end: Bytes::from_static(range_end),
                start_revision: start,
                ..Default::default()
            },
        )),
    })
    .await
    .ok()?;
    let call = tokio::time::timeout(
        within,
        w.watch(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await;
    Some((tx, call.ok()?.ok()?.into_inner()))
}
