//! etcd's HTTP endpoints on the client port, beside gRPC (etcd serves both on one port):
//! `GET /health`, `/livez`, `/readyz`, `/version` and `/metrics`, answered by
//! [`Backend::http_get`]; every other request goes to the gRPC services unchanged.
//!
//! Load balancers (HAProxy's `check`), kubeadm's probes and Prometheus speak HTTP/1.1 to these
//! paths, so the server accepts HTTP/1.1 as well as HTTP/2 (tonic's `accept_http1`).
//!
//! The layer also counts gRPC calls with the names of go-grpc-prometheus, which etcd
//! exports: `grpc_server_started_total` for every call and `grpc_server_handled_total` with
//! its status code (a unary call's is in its response headers; a stream's in its trailers,
//! counted as they pass, or `Canceled` if the client leaves first).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use prometheus::{IntCounterVec, Opts, Registry, TextEncoder};
use tonic::body::Body;

use crate::server::Backend;

/// The paths answered here (and not by gRPC).
pub const PATHS: &[&str] = &["/health", "/livez", "/readyz", "/version", "/metrics"];

/// An answer to an HTTP GET.
#[derive(Clone, Debug)]
pub struct HttpAnswer {
    /// The HTTP status code.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl HttpAnswer {
    /// `200` with a plain-text body.
    pub fn text(status: u16, body: impl Into<String>) -> HttpAnswer {
        HttpAnswer {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// A JSON body.
    pub fn json(status: u16, body: impl Into<String>) -> HttpAnswer {
        HttpAnswer {
            status,
            content_type: "application/json",
            body: body.into(),
        }
    }
}

/// The gRPC call counters of one server.
struct GrpcMetrics {
    registry: Registry,
    started: IntCounterVec,
    handled: IntCounterVec,
}

impl GrpcMetrics {
    fn new() -> GrpcMetrics {
        let labels = ["grpc_type", "grpc_service", "grpc_method"];
        let started = IntCounterVec::new(
            Opts::new(
                "grpc_server_started_total",
                "Total number of RPCs started on the server.",
            ),
            &labels,
        )
        .expect("valid counter");
        let handled = IntCounterVec::new(
            Opts::new(
                "grpc_server_handled_total",
                "Total number of RPCs completed on the server, regardless of success or failure.",
            ),
            &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
        )
        .expect("valid counter");
        let registry = Registry::new();
        registry
            .register(Box::new(started.clone()))
            .expect("registered once");
        registry
            .register(Box::new(handled.clone()))
            .expect("registered once");
        GrpcMetrics {
            registry,
            started,
            handled,
        }
    }
}

/// The `grpc_type` of an etcd method.
fn grpc_type(method: &str) -> &'static str {
    match method {
        "Watch" | "LeaseKeepAlive" => "bidi_stream",
        "Snapshot" | "RangeStream" => "server_stream",
        _ => "unary",
    }
}

/// gRPC's status code names, as go-grpc-prometheus labels them.
fn code_name(code: &str) -> &'static str {
    match code {
        "0" => "OK",
        "1" => "Canceled",
        "2" => "Unknown",
        "3" => "InvalidArgument",
        "4" => "DeadlineExceeded",
        "5" => "NotFound",
        "6" => "AlreadyExists",
        "7" => "PermissionDenied",
        "8" => "ResourceExhausted",
        "9" => "FailedPrecondition",
        "10" => "Aborted",
        "11" => "OutOfRange",
        "12" => "Unimplemented",
        "13" => "Internal",
        "14" => "Unavailable",
        "15" => "DataLoss",
        "16" => "Unauthenticated",
        _ => "Unknown",
    }
}

/// The tower layer the etcd server is built with (see the module doc).
#[derive(Clone)]
pub struct HttpLayer {
    backend: Arc<dyn Backend>,
    grpc: Arc<GrpcMetrics>,
}

impl HttpLayer {
    /// Answers the HTTP paths from `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> HttpLayer {
        HttpLayer {
            backend,
            grpc: Arc::new(GrpcMetrics::new()),
        }
    }
}

impl<S> tower::Layer<S> for HttpLayer {
    type Service = HttpEndpoints<S>;

    fn layer(&self, inner: S) -> HttpEndpoints<S> {
        HttpEndpoints {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`HttpLayer`] wraps gRPC in.
#[derive(Clone)]
pub struct HttpEndpoints<S> {
    inner: S,
    layer: HttpLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<Request<Body>> for HttpEndpoints<S>
where
    S: tower::Service<Request<Body>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let path = req.uri().path();
        let get = req.method() == Method::GET || req.method() == Method::HEAD;
        let grpc_call = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if get && !grpc_call && !PATHS.contains(&path) {
            // etcd's HTTP mux: an unknown path is a 404 (gRPC would answer 200, Unimplemented).
            return Box::pin(async { Ok(answer(HttpAnswer::text(404, "404 page not found\n"))) });
        }
        if get && PATHS.contains(&path) {
            let (path, query) = (
                path.to_string(),
                req.uri().query().unwrap_or("").to_string(),
            );
            let layer = self.layer.clone();
            return Box::pin(async move {
                let mut a = layer
                    .backend
                    .http_get(&path, &query)
                    .await
                    .unwrap_or_else(|| HttpAnswer::text(404, "404 page not found\n"));
                if path == "/metrics" && a.status == 200 {
                    let families = layer.grpc.registry.gather();
                    if let Ok(text) = TextEncoder::new().encode_to_string(&families) {
                        a.body.push_str(&text);
                    }
                }
                Ok(answer(a))
            });
        }
        // "/etcdserverpb.KV/Range" -> ("etcdserverpb.KV", "Range").
        let call = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .map(|(s, m)| (s.to_string(), m.to_string()));
        if let Some((service, method)) = &call {
            self.layer
                .grpc
                .started
                .with_label_values(&[grpc_type(method), service, method])
                .inc();
        }
        let fut = self.inner.call(req);
        let grpc = self.layer.grpc.clone();
        Box::pin(async move {
            let resp = fut.await?;
            let Some((service, method)) = call else {
                return Ok(resp.map(Body::new));
            };
            let kind = grpc_type(&method);
            // A call refused at once (or any unary call) has its code in the headers; a
            // stream's comes in its trailers, counted by `Counted` when they pass.
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(code_name);
            if kind == "unary" || code.is_some() {
                grpc.handled
                    .with_label_values(&[kind, &service, &method, code.unwrap_or("OK")])
                    .inc();
                return Ok(resp.map(Body::new));
            }
            let labels = [kind.to_string(), service, method];
            Ok(resp.map(|b| {
                Body::new(Counted {
                    inner: Body::new(b),
                    handled: Some((grpc.handled.clone(), labels)),
                })
            }))
        })
    }
}

/// A stream's response body that counts `grpc_server_handled_total` with the code of its
/// trailers when they pass (`Canceled` if the client goes away first).
struct Counted {
    inner: Body,
    handled: Option<(IntCounterVec, [String; 3])>,
}

impl Counted {
    fn count(&mut self, code: &str) {
        if let Some((c, [kind, service, method])) = self.handled.take() {
            c.with_label_values(&[kind.as_str(), &service, &method, code])
                .inc();
        }
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(t) = f.trailers_ref() {
                    let code = t
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .map_or("OK", code_name);
                    self.count(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.count("Unknown"),
            Poll::Ready(None) => self.count("OK"),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.count("Canceled");
    }
}

fn answer(a: HttpAnswer) -> Response<Body> {
    Response::builder()
        .status(a.status)
        .header(http::header::CONTENT_TYPE, a.content_type)
        .body(Body::new(http_body_util::Full::new(Bytes::from(a.body))))
        .expect("a valid response")
}
