//! The gRPC layer of the etcd facade: [`EtcdServer`] implements the tonic service traits of
//! etcd's KV, Watch, Lease, Cluster, Maintenance and Auth services, and [`serve`] serves them.
//!
//! `EtcdServer` only translates between gRPC and a [`Backend`]: every RPC that the `Backend`
//! trait has a method for is delegated to it (the request message in, the response message or a
//! [`Status`] out); every other RPC answers `UNIMPLEMENTED` with [`NOT_IMPLEMENTED`].
//!
//! # Adding an RPC
//! 1. Add a method to [`Backend`] taking the request message and returning the response
//!    message (give it a default body returning `Err(unimplemented())` if existing backends
//!    should keep compiling).
//! 2. In the service's `service_impl!` block below, move the RPC from the `unimplemented { .. }`
//!    list into the explicit part, as `async fn name(&self, request: Request<Req>) ->
//!    Result<Response<Resp>, Status> { self.delegate(request, |b, r| b.name(r)).await }` (the
//!    generated trait, `crate::pb::etcdserverpb::*_server::*`, has the exact signature).
//!
//! Streaming RPCs (Watch, LeaseKeepAlive, Snapshot) are written out by hand: they take a
//! `Request<Streaming<Req>>` and/or return a [`ResponseStream`].

use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use tower::layer::util::{Identity as NoLayer, Stack};

use crate::http::{HttpAnswer, HttpLayer};

use crate::pb::etcdserverpb::auth_server::{Auth, AuthServer};
use crate::pb::etcdserverpb::cluster_server::{Cluster, ClusterServer};
use crate::pb::etcdserverpb::kv_server::{Kv, KvServer};
use crate::pb::etcdserverpb::lease_server::{Lease, LeaseServer};
use crate::pb::etcdserverpb::maintenance_server::{Maintenance, MaintenanceServer};
use crate::pb::etcdserverpb::watch_server::{Watch, WatchServer};
use crate::pb::etcdserverpb::*;

/// The message of every `UNIMPLEMENTED` status this layer answers.
pub const NOT_IMPLEMENTED: &str = "raftsql: not implemented yet";

/// etcd's default `--max-request-bytes` (1.5 MiB): the largest request a backend should accept
/// (etcd answers larger ones with `ErrRequestTooLarge`; enforcing that is the backend's job).
pub const MAX_REQUEST_BYTES: usize = 3 * 512 * 1024;

/// The largest gRPC message the server decodes: [`MAX_REQUEST_BYTES`] plus etcd's 512 KiB gRPC
/// overhead allowance (etcd's `grpcOverheadBytes`, so 2 MiB like etcd) plus 64 KiB of slack.
/// A larger message is refused by tonic before it reaches a handler.
pub const MAX_DECODING_MESSAGE_SIZE: usize = MAX_REQUEST_BYTES + 512 * 1024 + 64 * 1024;

/// The largest gRPC message the server encodes (etcd's default `MaxSendMsgSize`,
/// `math.MaxInt32`): a range over a big keyspace is one message.
pub const MAX_ENCODING_MESSAGE_SIZE: usize = i32::MAX as usize;

/// The response type of a server-streaming RPC.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// `UNIMPLEMENTED` with [`NOT_IMPLEMENTED`].
pub fn unimplemented() -> Status {
    Status::unimplemented(NOT_IMPLEMENTED)
}

/// What the etcd API is served from: one method per RPC that raftsql implements, taking the
/// request message and returning the response message. An error [`Status`] is sent to the
/// client as is, so return etcd's codes and messages (e.g. `FAILED_PRECONDITION`
/// "etcdserver: ...") where clients depend on them.
///
/// Every method has a default body answering `UNIMPLEMENTED`, so a backend implements only
/// what it supports (and adding a method here breaks no backend).
#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// KV.Range.
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// KV.RangeStream (etcd 3.7): the answer to `req` in chunks, merging to Range's answer.
    async fn range_stream(
        &self,
        req: RangeRequest,
    ) -> Result<ResponseStream<RangeStreamResponse>, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// KV.Put.
    async fn put(&self, req: PutRequest) -> Result<PutResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// KV.DeleteRange.
    async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// KV.Txn.
    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// KV.Compact.
    async fn compact(&self, req: CompactionRequest) -> Result<CompactionResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// Maintenance.Status.
    async fn status(&self, req: StatusRequest) -> Result<StatusResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// Cluster.MemberList.
    async fn member_list(&self, req: MemberListRequest) -> Result<MemberListResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }

    /// Snapshot: a stream of the database's bytes.
    async fn snapshot(
        &self,
        req: SnapshotRequest,
    ) -> Result<ResponseStream<SnapshotResponse>, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// Alarm.
    async fn alarm(&self, req: AlarmRequest) -> Result<AlarmResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// Defragment.
    async fn defragment(&self, req: DefragmentRequest) -> Result<DefragmentResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// HashKV.
    async fn hash_kv(&self, req: HashKvRequest) -> Result<HashKvResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// Hash.
    async fn hash(&self, req: HashRequest) -> Result<HashResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// LeaseGrant.
    async fn lease_grant(&self, req: LeaseGrantRequest) -> Result<LeaseGrantResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// LeaseRevoke.
    async fn lease_revoke(&self, req: LeaseRevokeRequest) -> Result<LeaseRevokeResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// LeaseTimeToLive.
    async fn lease_time_to_live(
        &self,
        req: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// LeaseLeases.
    async fn lease_leases(&self, req: LeaseLeasesRequest) -> Result<LeaseLeasesResponse, Status> {
        let _ = req;
        Err(unimplemented())
    }
    /// LeaseKeepAlive: one stream of keep-alive requests.
    async fn lease_keep_alive(
        &self,
        reqs: Streaming<LeaseKeepAliveRequest>,
    ) -> Result<ResponseStream<LeaseKeepAliveResponse>, Status> {
        let _ = reqs;
        Err(unimplemented())
    }

    /// Watch: serves one bidirectional stream of watch requests.
    async fn watch(
        &self,
        reqs: Streaming<WatchRequest>,
    ) -> Result<ResponseStream<WatchResponse>, Status> {
        let _ = reqs;
        Err(unimplemented())
    }

    /// Whether this member knows a leader now (etcd's `s.Leader() != None`). Calls that carry
    /// `hasleader: true` metadata (clientv3's `WithRequireLeader`, which kube-apiserver puts on
    /// its watches) are refused without one, and their streams are canceled once the member
    /// has been without one for [`Backend::election_timeout`].
    fn has_leader(&self) -> bool {
        true
    }

    /// How long a require-leader stream outlives the loss of the leader.
    fn election_timeout(&self) -> Duration {
        Duration::from_secs(1)
    }

    /// An HTTP GET of one of etcd's paths (`/health`, `/readyz`, `/version`, `/metrics`, ...) on the client port, with its query string;
    /// `None` answers 404.
    async fn http_get(&self, path: &str, query: &str) -> Option<HttpAnswer> {
        let _ = (path, query);
        None
    }
}

/// The gRPC metadata clientv3's `WithRequireLeader` sets.
const REQUIRE_LEADER: &str = "hasleader";

/// etcd's `ErrGRPCNoLeader`.
pub fn no_leader() -> Status {
    Status::unavailable("etcdserver: no leader")
}

fn requires_leader<T>(request: &Request<T>) -> bool {
    request
        .metadata()
        .get(REQUIRE_LEADER)
        .is_some_and(|v| v.as_bytes() == b"true")
}

/// How often a require-leader stream looks at the member's leader.
const LEADER_CHECK: Duration = Duration::from_millis(50);

/// `inner`, ended with [`no_leader`] once `backend` has had no leader for its election
/// timeout (etcd's `monitorLeader`, which cancels such streams so that the client reconnects
/// to a member that has one).
fn cancel_without_leader<T: Send + 'static>(
    mut inner: ResponseStream<T>,
    backend: Arc<dyn Backend>,
) -> ResponseStream<T> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut check = tokio::time::interval(LEADER_CHECK);
        let mut leaderless_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                item = tokio_stream::StreamExt::next(&mut inner) => match item {
                    Some(item) => {
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
                _ = check.tick() => {
                    if backend.has_leader() {
                        leaderless_since = None;
                    } else {
                        let since = *leaderless_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() >= backend.election_timeout() {
                            tracing::info!("canceling a require-leader stream: no leader");
                            let _ = tx.send(Err(no_leader())).await;
                            return;
                        }
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The etcd gRPC services over a [`Backend`]. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct EtcdServer {
    backend: Arc<dyn Backend>,
}

impl EtcdServer {
    /// Services answering from `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        EtcdServer { backend }
    }

    /// The backend the services answer from.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Unwraps the request, calls the backend, wraps the answer.
    async fn delegate<'a, Req, Resp, F, Fut>(
        &'a self,
        request: Request<Req>,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(&'a dyn Backend, Req) -> Fut,
        Fut: Future<Output = Result<Resp, Status>> + 'a,
    {
        if requires_leader(&request) && !self.backend.has_leader() {
            return Err(no_leader());
        }
        call(&*self.backend, request.into_inner())
            .await
            .map(Response::new)
    }

    /// A stream from the backend, guarded by [`cancel_without_leader`] if the call requires a
    /// leader (refused at once without one).
    async fn stream<'a, Req, T, F, Fut>(
        &'a self,
        request: Request<Req>,
        open: F,
    ) -> Result<Response<ResponseStream<T>>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&'a dyn Backend, Req) -> Fut,
        Fut: Future<Output = Result<ResponseStream<T>, Status>> + 'a,
    {
        let require = requires_leader(&request);
        if require && !self.backend.has_leader() {
            return Err(no_leader());
        }
        let stream = open(&*self.backend, request.into_inner()).await?;
        Ok(Response::new(if require {
            cancel_without_leader(stream, self.backend.clone())
        } else {
            stream
        }))
    }
}

/// `#[tonic::async_trait] impl $service for EtcdServer`, with the explicit items as given and
/// one `UNIMPLEMENTED` method per entry of the `unimplemented` list (unary RPCs only).
macro_rules! service_impl {
    (
        impl $service:ident {
            $($explicit:tt)*
        }
        unimplemented {
            $($name:ident($req:ty) -> $resp:ty;)*
        }
    ) => {
        #[tonic::async_trait]
        impl $service for EtcdServer {
            $($explicit)*
            $(
                async fn $name(&self, _request: Request<$req>) -> Result<Response<$resp>, Status> {
                    Err(unimplemented())
                }
            )*
        }
    };
}

service_impl! {
    impl Kv {
        type RangeStreamStream = ResponseStream<RangeStreamResponse>;

        async fn range(&self, request: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
            self.delegate(request, |b, r| b.range(r)).await
        }
        async fn range_stream(
            &self,
            request: Request<RangeRequest>,
        ) -> Result<Response<Self::RangeStreamStream>, Status> {
            self.stream(request, |b, r| b.range_stream(r)).await
        }
        async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
            self.delegate(request, |b, r| b.put(r)).await
        }
        async fn delete_range(
            &self,
            request: Request<DeleteRangeRequest>,
        ) -> Result<Response<DeleteRangeResponse>, Status> {
            self.delegate(request, |b, r| b.delete_range(r)).await
        }
        async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
            self.delegate(request, |b, r| b.txn(r)).await
        }
        async fn compact(
            &self,
            request: Request<CompactionRequest>,
        ) -> Result<Response<CompactionResponse>, Status> {
            self.delegate(request, |b, r| b.compact(r)).await
        }
    }
    unimplemented {}
}

service_impl! {
    impl Watch {
        type WatchStream = ResponseStream<WatchResponse>;

        async fn watch(
            &self,
            request: Request<Streaming<WatchRequest>>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            self.stream(request, |b, r| b.watch(r)).await
        }
    }
    unimplemented {}
}

service_impl! {
    impl Lease {
        type LeaseKeepAliveStream = ResponseStream<LeaseKeepAliveResponse>;

        async fn lease_keep_alive(
            &self,
            request: Request<Streaming<LeaseKeepAliveRequest>>,
        ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
            self.stream(request, |b, r| b.lease_keep_alive(r)).await
        }
        async fn lease_grant(&self, request: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
            self.delegate(request, |b, r| b.lease_grant(r)).await
        }
        async fn lease_revoke(&self, request: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
            self.delegate(request, |b, r| b.lease_revoke(r)).await
        }
        async fn lease_time_to_live(
            &self,
            request: Request<LeaseTimeToLiveRequest>,
        ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
            self.delegate(request, |b, r| b.lease_time_to_live(r)).await
        }
        async fn lease_leases(&self, request: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
            self.delegate(request, |b, r| b.lease_leases(r)).await
        }
    }
    unimplemented {}
}

service_impl! {
    impl Cluster {
        async fn member_list(
            &self,
            request: Request<MemberListRequest>,
        ) -> Result<Response<MemberListResponse>, Status> {
            self.delegate(request, |b, r| b.member_list(r)).await
        }
    }
    unimplemented {
        member_add(MemberAddRequest) -> MemberAddResponse;
        member_remove(MemberRemoveRequest) -> MemberRemoveResponse;
        member_update(MemberUpdateRequest) -> MemberUpdateResponse;
        member_promote(MemberPromoteRequest) -> MemberPromoteResponse;
    }
}

service_impl! {
    impl Maintenance {
        type SnapshotStream = ResponseStream<SnapshotResponse>;

        async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
            self.delegate(request, |b, r| b.status(r)).await
        }
        async fn alarm(&self, request: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
            self.delegate(request, |b, r| b.alarm(r)).await
        }
        async fn defragment(&self, request: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
            self.delegate(request, |b, r| b.defragment(r)).await
        }
        async fn hash_kv(&self, request: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
            self.delegate(request, |b, r| b.hash_kv(r)).await
        }
        async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
            self.delegate(request, |b, r| b.hash(r)).await
        }
        async fn snapshot(
            &self,
            request: Request<SnapshotRequest>,
        ) -> Result<Response<Self::SnapshotStream>, Status> {
            self.stream(request, |b, r| b.snapshot(r)).await
        }
    }
    unimplemented {
        move_leader(MoveLeaderRequest) -> MoveLeaderResponse;
        downgrade(DowngradeRequest) -> DowngradeResponse;
    }
}

service_impl! {
    impl Auth {}
    unimplemented {
        auth_enable(AuthEnableRequest) -> AuthEnableResponse;
        auth_disable(AuthDisableRequest) -> AuthDisableResponse;
        auth_status(AuthStatusRequest) -> AuthStatusResponse;
        authenticate(AuthenticateRequest) -> AuthenticateResponse;
        user_add(AuthUserAddRequest) -> AuthUserAddResponse;
        user_get(AuthUserGetRequest) -> AuthUserGetResponse;
        user_list(AuthUserListRequest) -> AuthUserListResponse;
        user_delete(AuthUserDeleteRequest) -> AuthUserDeleteResponse;
        user_change_password(AuthUserChangePasswordRequest) -> AuthUserChangePasswordResponse;
        user_grant_role(AuthUserGrantRoleRequest) -> AuthUserGrantRoleResponse;
        user_revoke_role(AuthUserRevokeRoleRequest) -> AuthUserRevokeRoleResponse;
        role_add(AuthRoleAddRequest) -> AuthRoleAddResponse;
        role_get(AuthRoleGetRequest) -> AuthRoleGetResponse;
        role_list(AuthRoleListRequest) -> AuthRoleListResponse;
        role_delete(AuthRoleDeleteRequest) -> AuthRoleDeleteResponse;
        role_grant_permission(AuthRoleGrantPermissionRequest) -> AuthRoleGrantPermissionResponse;
        role_revoke_permission(AuthRoleRevokePermissionRequest) -> AuthRoleRevokePermissionResponse;
    }
}

/// Concurrent gRPC calls (each watch stream is one) on one client connection (HTTP/2
/// streams), announced in the server's SETTINGS; etcd's default is unlimited
/// (math.MaxUint32), but a client multiplexes all its watches over few streams (clientv3
/// puts every watch of a context on one stream), so 1,024 leaves room and bounds what one
/// connection may hold.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// The etcd server: the six etcd services over `backend`, with etcd's message size limits,
/// behind the HTTP endpoints of [`crate::http`], on `builder` (e.g. one with TLS configured).
fn router_with(backend: Arc<dyn Backend>, builder: Server) -> Router<Stack<HttpLayer, NoLayer>> {
    // One client connection may hold this many calls (e.g. watch streams) at once.
    let mut builder = builder
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // HTTP/1.1 too: health checks and Prometheus scrapes.
        .accept_http1(true)
        // etcd's server-side keepalive defaults (--grpc-keepalive-interval 2h, -timeout 20s):
        // a silently dead client's streams are dropped.
        .http2_keepalive_interval(Some(Duration::from_secs(2 * 60 * 60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(HttpLayer::new(backend.clone()));
    let server = Arc::new(EtcdServer::new(backend));
    // Each generated service wrapper gets the same size limits.
    macro_rules! limited {
        ($service:ident) => {
            $service::from_arc(server.clone())
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_ENCODING_MESSAGE_SIZE)
        };
    }
    builder
        .add_service(limited!(KvServer))
        .add_service(limited!(WatchServer))
        .add_service(limited!(LeaseServer))
        .add_service(limited!(ClusterServer))
        .add_service(limited!(MaintenanceServer))
        .add_service(limited!(AuthServer))
}

/// Serves the etcd API over `backend` on `addr` until `shutdown` completes (then stops
/// accepting, and returns once the open calls have finished).
pub async fn serve(
    addr: SocketAddr,
    backend: Arc<dyn Backend>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    let listener = TcpListener::bind(addr).await?;
    serve_listener(listener, backend, shutdown).await
}

/// [`serve`] on an already bound listener (e.g. bound to port 0, to learn the port first).
pub async fn serve_listener(
    listener: TcpListener,
    backend: Arc<dyn Backend>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    serve_listener_tls(listener, backend, None, shutdown).await
}

/// [`serve_listener`], over TLS when `tls` is given (see [`TlsFiles::load`]).
pub async fn serve_listener_tls(
    listener: TcpListener,
    backend: Arc<dyn Backend>,
    tls: Option<ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let builder = match tls {
        Some(tls) => Server::builder().tls_config(tls)?,
        None => Server::builder(),
    };
    let router = router_with(backend, builder);
    router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// The TLS files of a client-facing endpoint, named after etcd's flags: `--cert-file`,
/// `--key-file`, `--trusted-ca-file`, `--client-cert-auth`.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// The server certificate chain (PEM).
    pub cert_file: PathBuf,
    /// The server's private key (PEM).
    pub key_file: PathBuf,
    /// CA certificates (PEM) that client certificates are verified against.
    pub trusted_ca_file: Option<PathBuf>,
    /// Refuse clients that present no certificate signed by `trusted_ca_file` (etcd's
    /// `--client-cert-auth`). Without it, a client certificate is optional, but one that is
    /// presented must still verify.
    pub client_cert_auth: bool,
}

/// Why [`TlsFiles::load`] failed: which file, and what was wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{what} {path}: {source}")]
    Read {
        /// Which flag named the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no PEM block of the expected kind.
    #[error("{what} {path}: no PEM {kind} found")]
    NoPem {
        /// Which flag named the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// "CERTIFICATE" or "PRIVATE KEY".
        kind: &'static str,
    },
    /// `--client-cert-auth` without a CA to check client certificates against.
    #[error("--client-cert-auth needs --trusted-ca-file")]
    ClientAuthWithoutCa,
}

impl TlsFiles {
    /// Reads and checks the files, returning the server's TLS configuration. Errors name the
    /// file and the problem, so that a typo in a path is reported at start-up, not at the first
    /// handshake.
    pub fn load(&self) -> Result<ServerTlsConfig, TlsError> {
        let read = |what: &'static str, path: &Path, kind: &'static str| {
            let pem = std::fs::read(path).map_err(|source| TlsError::Read {
                what,
                path: path.to_owned(),
                source,
            })?;
            let text = String::from_utf8_lossy(&pem);
            let found = text
                .lines()
                .any(|l| l.starts_with("-----BEGIN ") && l.ends_with("-----") && l.contains(kind));
            if !found {
                return Err(TlsError::NoPem {
                    what,
                    path: path.to_owned(),
                    kind,
                });
            }
            Ok(pem)
        };
        let cert = read("--cert-file", &self.cert_file, "CERTIFICATE")?;
        let key = read("--key-file", &self.key_file, "PRIVATE KEY")?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        match (&self.trusted_ca_file, self.client_cert_auth) {
            (Some(ca), auth) => {
                let ca = read("--trusted-ca-file", ca, "CERTIFICATE")?;
                config = config
                    .client_ca_root(Certificate::from_pem(ca))
                    .client_auth_optional(!auth);
            }
            (None, true) => return Err(TlsError::ClientAuthWithoutCa),
            (None, false) => {}
        }
        Ok(config)
    }
}
