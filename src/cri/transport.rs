//! The CRI socket's transport: an HTTP/2 server (hyper on `h2`) on the unix socket, routing by
//! `:path`. The four methods that may carry a stream reference ([`Method`]) have their request
//! collected (capped at [`MAX_REQUEST_BYTES`]), unframed and handed to [`CriProxy::decide`];
//! the [`Decision`] is carried out here. Every other call (unary, streaming, methods newer than
//! our CRI bindings) is forwarded to the runtime as a stream: headers, body and trailers passed
//! on as they come, with `h2`'s flow control on each side and nothing buffered whole.
//!
//! Every call is counted in the CRI call metrics, by method and gRPC status, with its duration
//! ([`Counted`]).
//!
//! # Limits
//! Each is a constant below with its reason: [`MAX_CONCURRENT_STREAMS`] per client connection,
//! [`MAX_HEADER_LIST_BYTES`], [`MAX_REQUEST_BYTES`] for a decided call. `h2` adds its own
//! defences (rapid-reset and CONTINUATION-flood limits, send-buffer caps). No idle timeout and
//! no keep-alive PINGs: the kubelet holds one connection for its lifetime, and on a unix
//! socket a dead peer is an end of file, seen at once.
//!
//! # Shutdown
//! [`serve`] stops accepting when `shutdown` completes, sends every connection a GOAWAY, and
//! waits for calls in flight to end, for at most the grace period.

use super::proxy::{CriProxy, Decision, Method};
use super::pull_errors;
use super::runtime::{decode_frame, encode_message, Runtime};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tonic::body::Body;
use tonic::Status;

/// Streams a client may have open at once on one connection. The kubelet multiplexes every
/// call on one connection: a full node (110 pods) has a few hundred long calls at most
/// (ExecSync probes held for their timeout, log reopen, the events stream). containerd
/// (grpc-go) sets no limit; this one bounds what a runaway client can make the proxy hold.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Largest request header list (HPACK-decoded). gRPC metadata from the kubelet and crictl is a
/// handful of headers under 1 KiB; 64 KiB leaves room for tracing metadata.
pub const MAX_HEADER_LIST_BYTES: u32 = 64 << 10;
/// Largest request body of a decided call (`PullImage`, `ImageStatus`, `RemoveImage`,
/// `CreateContainer`), gRPC frame included. CRI requests are small: the kubelet builds them from
/// one pod object, which the API server caps at 1.5 MiB (etcd's request limit); the three image
/// calls are a reference and a sandbox config. 4 MiB is also gRPC's default receive limit.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// The CRI methods, by name, for the call metrics' `method` label. A call is labelled by the
/// last segment of its path (so `/runtime.v1alpha2.ImageService/ImageStatus` counts as
/// `ImageStatus`); any other method counts as `other`. No two CRI services share a method name.
pub const CRI_METHODS: &[&str] = &[
    "Version",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "ListPodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ListContainers",
    "ContainerStatus",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "ExecSync",
    "Exec",
    "Attach",
    "PortForward",
    "ContainerStats",
    "ListContainerStats",
    "PodSandboxStats",
    "ListPodSandboxStats",
    "UpdateRuntimeConfig",
    "Status",
    "CheckpointContainer",
    "GetContainerEvents",
    "ListMetricDescriptors",
    "ListPodSandboxMetrics",
    "RuntimeConfig",
    "UpdatePodSandboxResources",
    "ListImages",
    "ImageStatus",
    "PullImage",
    "RemoveImage",
    "ImageFsInfo",
];

/// The `method` label of a call to `path` (see [`CRI_METHODS`]).
pub fn method_label(path: &str) -> &'static str {
    let name = path.rsplit_once('/').map_or(path, |(_, name)| name);
    CRI_METHODS
        .iter()
        .find(|m| **m == name)
        .copied()
        .unwrap_or("other")
}

/// Serves the CRI socket on `listener` until `shutdown`, then drains for at most `grace`
/// (the accept-and-drain loop is [`crate::accept::serve_until`], shared with the mirror).
pub async fn serve(
    listener: UnixListener,
    service: CriService,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let serve = |stream, graceful: &hyper_util::server::graceful::GracefulShutdown| {
        let conn =
            graceful.watch(builder().serve_connection(TokioIo::new(stream), service.clone()));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "CRI connection ended with an error");
            }
        });
    };
    crate::accept::serve_until("CRI", listener, serve, shutdown, grace).await;
}

/// Serves one client connection on `io` until it closes (for tests and fuzzing; [`serve`] is
/// the same for every connection it accepts).
pub async fn serve_connection<I>(io: I, service: CriService) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    builder().serve_connection(TokioIo::new(io), service).await
}

fn builder() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_BYTES);
    b
}

/// The CRI socket's request handler: routes each call (see the module docs).
#[derive(Clone)]
pub struct CriService {
    proxy: Arc<CriProxy>,
    runtime: Runtime,
}

impl CriService {
    pub fn new(proxy: Arc<CriProxy>, runtime: Runtime) -> Self {
        Self { proxy, runtime }
    }

    async fn call(self, req: http::Request<Incoming>) -> http::Response<Body> {
        let call = Call::start(req.uri().path());
        let resp = match Method::from_path(req.uri().path()) {
            Some(method) => self.decided(method, req).await,
            None => self.runtime.forward(req.map(Body::new)).await,
        };
        call.count(resp)
    }

    /// One of the four calls that may carry a stream reference.
    async fn decided(&self, method: Method, req: http::Request<Incoming>) -> http::Response<Body> {
        let (mut parts, body) = req.into_parts();
        let body = match read_body(body).await {
            Ok(body) => body,
            Err(status) => return status.into_http(),
        };
        let message = match decode_frame(&body) {
            Ok(m) => m,
            Err(e) => {
                return crate::audit::status(
                    tonic::Code::InvalidArgument,
                    format!("{} request: {e}", method.name()),
                )
                .into_http()
            }
        };
        let resp = match self.proxy.decide(method, message).await {
            Decision::Forward => self.forward(parts, body).await,
            Decision::Rewritten(message) => {
                // The message changed length; gRPC clients send no content-length, but one
                // that did would now be wrong.
                parts.headers.remove(http::header::CONTENT_LENGTH);
                self.forward(parts, encode_message(&message)).await
            }
            Decision::Answer(message) => answer(encode_message(&message)),
            Decision::Refuse(status) => status.into_http(),
        };
        match method {
            Method::PullImage => pull_errors::mark(resp),
            _ => resp,
        }
    }

    async fn forward(&self, parts: http::request::Parts, body: Bytes) -> http::Response<Body> {
        let body = Body::new(http_body_util::Full::new(body));
        self.runtime
            .forward(http::Request::from_parts(parts, body))
            .await
    }
}

impl hyper::service::Service<http::Request<Incoming>> for CriService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move { Ok(service.call(req).await) })
    }
}

/// A decided call's request body, whole, at most [`MAX_REQUEST_BYTES`].
async fn read_body(body: Incoming) -> Result<Bytes, Status> {
    match http_body_util::Limited::new(body, MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(crate::audit::status(
            tonic::Code::ResourceExhausted,
            format!("request is larger than {MAX_REQUEST_BYTES} bytes"),
        )),
        Err(e) => Err(Status::cancelled(format!("request body: {e}"))),
    }
}

/// A gRPC answer made here: `frame` (a gRPC message frame), then status OK in the trailers.
fn answer(frame: Bytes) -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert(GRPC_STATUS, http::HeaderValue::from_static("0"));
    let frames = [
        Ok::<_, Infallible>(http_body::Frame::data(frame)),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let mut resp = http::Response::new(Body::new(http_body_util::StreamBody::new(
        futures_util::stream::iter(frames),
    )));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}

const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The gRPC status in `headers` (response headers of a trailers-only answer, or trailers).
fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get(GRPC_STATUS)
        .map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

/// The gRPC status of an HTTP answer that carries none (not from a gRPC server), as gRPC
/// clients map it.
fn http_status_code(status: http::StatusCode) -> tonic::Code {
    match status.as_u16() {
        400 => tonic::Code::Internal,
        401 => tonic::Code::Unauthenticated,
        403 => tonic::Code::PermissionDenied,
        404 => tonic::Code::Unimplemented,
        429 | 502..=504 => tonic::Code::Unavailable,
        _ => tonic::Code::Unknown,
    }
}

/// One CRI call being answered, for the call metrics: recorded once, with its gRPC status, or
/// as `Cancelled` if the answer is dropped (client gone) before its status.
struct Call {
    method: &'static str,
    start: Instant,
    done: bool,
}

impl Call {
    fn start(path: &str) -> Self {
        Self {
            method: method_label(path),
            start: Instant::now(),
            done: false,
        }
    }

    fn finish(&mut self, code: tonic::Code) {
        if !self.done {
            self.done = true;
            crate::metrics::metrics().cri_call(self.method, code, self.start.elapsed());
        }
    }

    /// Counts the call when `resp` has given its status: now for a trailers-only answer,
    /// else when its body ends.
    fn count(mut self, resp: http::Response<Body>) -> http::Response<Body> {
        if let Some(code) = grpc_status(resp.headers()) {
            self.finish(code);
            return resp;
        }
        let http_code = http_status_code(resp.status());
        let ok = resp.status() == http::StatusCode::OK;
        resp.map(|inner| {
            Body::new(Counted {
                inner,
                call: self,
                // A 200 answer that ends without trailers has lost its status.
                missing: if ok { tonic::Code::Unknown } else { http_code },
            })
        })
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// An answer body that counts its call when the trailers (the gRPC status) pass.
struct Counted {
    inner: Body,
    call: Call,
    /// The code counted if the body ends without a status.
    missing: tonic::Code,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(code) = f.trailers_ref().and_then(grpc_status) {
                    this.call.finish(code);
                }
            }
            Some(Err(_)) => this.call.finish(tonic::Code::Unavailable),
            None => this.call.finish(this.missing),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trailers(code: &str) -> http::HeaderMap {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", code.parse().expect("code"));
        t
    }

    #[test]
    fn method_labels() {
        assert_eq!(
            method_label(super::super::proxy::IMAGE_STATUS),
            "ImageStatus"
        );
        assert_eq!(
            method_label(super::super::proxy::CREATE_CONTAINER),
            "CreateContainer"
        );
        assert_eq!(
            method_label("/runtime.v1.RuntimeService/GetContainerEvents"),
            "GetContainerEvents"
        );
        assert_eq!(
            method_label("/runtime.v1alpha2.ImageService/ImageStatus"),
            "ImageStatus"
        );
        assert_eq!(
            method_label("/runtime.v1.RuntimeService/SomeFutureMethod"),
            "other"
        );
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "other");
        assert_eq!(method_label(""), "other");
        let mut names = CRI_METHODS.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CRI_METHODS.len());
    }

    #[test]
    fn status_codes() {
        assert_eq!(grpc_status(&trailers("0")), Some(tonic::Code::Ok));
        assert_eq!(grpc_status(&trailers("5")), Some(tonic::Code::NotFound));
        assert_eq!(grpc_status(&trailers("99")), Some(tonic::Code::Unknown));
        assert_eq!(grpc_status(&http::HeaderMap::new()), None);
        assert_eq!(
            http_status_code(http::StatusCode::NOT_FOUND),
            tonic::Code::Unimplemented
        );
        assert_eq!(
            http_status_code(http::StatusCode::SERVICE_UNAVAILABLE),
            tonic::Code::Unavailable
        );
        assert_eq!(
            http_status_code(http::StatusCode::IM_A_TEAPOT),
            tonic::Code::Unknown
        );
    }
}
