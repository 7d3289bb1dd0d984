//! The one owner of the connection to the real runtime (containerd, CRI-O). Every call that
//! reaches the runtime goes through [`Runtime`]: calls forwarded from CRI clients, the proxy's
//! own calls behind a decision (the `ImageStatus` behind a held digest, a private image's
//! pull), and the pre-pull trigger. They share one multiplexed HTTP/2 connection (hyper's
//! client over the runtime's unix socket), so the runtime sees one client however many
//! kubelet connections there are.
//!
//! - **Connect on demand.** Nothing is connected until the first call; a connection that has
//!   closed (the runtime restarted) is replaced by the next call.
//! - **GOAWAY.** When the runtime says it is going away, calls in flight finish on the old
//!   connection; hyper hands back a request that had not been sent yet, and it goes on a new
//!   connection.
//! - **Backoff.** After a failed connect the next attempt waits [`BACKOFF_MIN`], doubling to
//!   [`BACKOFF_MAX`]; calls that queued behind a failed attempt get its error at once instead
//!   of trying again one by one.
//! - **The runtime down** is gRPC `Unavailable` naming the endpoint ([`Runtime::unavailable`]),
//!   answered as a normal gRPC response, so that forwarded and typed calls fail alike.
//! - **Keep-alive.** None: on a unix socket a dead runtime is an end of file, seen at once.
//! - **Where it runs.** [`Runtime::on`] gives the connection a home runtime (the CRI server's
//!   own single-threaded one): it is made and driven there whoever calls, so the CRI server's
//!   calls never cross threads, and the pre-pull trigger's calls reach it through hyper's
//!   channel.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use thiserror::Error;
use tonic::body::Body;
use tonic::Status;

/// How long connecting to the runtime's socket may take. A unix-socket connect only waits when
/// the runtime's accept backlog is full, i.e. when it is wedged.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Wait before the first reconnect after a failed connect: short, since a restarting runtime
/// is usually back within a second.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait between connect attempts: a call made while the runtime is down waits at most
/// this long before its own attempt, well inside the kubelet's 2-minute runtime timeout.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Largest answer message the proxy decodes from the runtime in its own calls (and largest
/// request it decodes from a client): containerd's and the kubelet's gRPC message limit.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// `:authority` of requests that carry none (gRPC clients over unix sockets send `localhost`).
const DEFAULT_AUTHORITY: &str = "localhost";
/// gRPC's frame prefix: a compression flag and a 4-byte length.
const GRPC_FRAME_HEADER: usize = 5;

/// Why a call did not reach the runtime.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("HTTP/2: {0}")]
    Http2(#[source] hyper::Error),
    #[error("invalid request URI: {0}")]
    Uri(#[source] http::Error),
    #[error("reading the answer: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The connect attempt this call waited for failed.
    #[error("{0}")]
    Shared(Arc<RuntimeError>),
}

/// A cloneable handle on the runtime connection. Also a tonic client transport (`Service`),
/// for typed clients (the pre-pull trigger).
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    endpoint: String,
    /// The runtime that connects and drives the connection, if not the caller's.
    home: Option<tokio::runtime::Handle>,
    slot: Mutex<Slot>,
    /// Held while connecting, so that one caller connects and the others wait for it.
    connecting: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Slot {
    sender: Option<SendRequest<Body>>,
    /// Connect attempts made so far.
    attempts: u64,
    /// The last attempt's failure, when it failed: when, the wait before the next one, why.
    failure: Option<(Instant, Duration, Arc<RuntimeError>)>,
}

impl Runtime {
    /// A handle on `endpoint` (`unix:///path`); nothing is connected until the first call.
    pub fn new(endpoint: &str) -> Result<Self, String> {
        Ok(Self {
            inner: Arc::new(Inner {
                path: socket_path(endpoint)?,
                endpoint: endpoint.to_string(),
                home: None,
                slot: Mutex::new(Slot::default()),
                connecting: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Makes the connection on `home` and drives it there, whoever calls: the CRI server's
    /// own single-threaded runtime, so that its calls never cross threads. Call before the
    /// handle is cloned or used.
    pub fn on(mut self, home: tokio::runtime::Handle) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.home = Some(home);
        }
        self
    }

    /// The gRPC answer for a call that did not reach the runtime.
    pub fn unavailable(&self, error: &RuntimeError) -> Status {
        crate::audit::status(
            tonic::Code::Unavailable,
            format!(
                "runtime endpoint {} is unavailable: {}",
                self.inner.endpoint,
                crate::audit::error_chain(error)
            ),
        )
    }

    /// Sends `req` to the runtime; its answer comes back as it arrives (headers, then body
    /// frames and trailers), flow-controlled by hyper on both sides.
    pub async fn send(
        &self,
        req: http::Request<Body>,
    ) -> Result<http::Response<Incoming>, RuntimeError> {
        let mut req = with_authority(req)?;
        let mut retried = false;
        loop {
            let mut sender = self.sender().await?;
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => {
                    let unsent = e.take_message();
                    if sender.is_closed() {
                        self.forget();
                    }
                    match unsent {
                        // Not sent: the connection went away first (GOAWAY, runtime restart).
                        Some(r) if !retried => {
                            tracing::debug!(error = %e.error(), "runtime connection went away; sending on a new one");
                            retried = true;
                            req = r;
                        }
                        _ => return Err(RuntimeError::Http2(e.into_error())),
                    }
                }
            }
        }
    }

    /// Sends `req` and returns the runtime's answer as a response body, or `Unavailable`.
    pub async fn forward(&self, req: http::Request<Body>) -> http::Response<Body> {
        match self.send(req).await {
            Ok(resp) => resp.map(Body::new),
            Err(e) => self.unavailable(&e).into_http(),
        }
    }

    /// One unary gRPC call made by the proxy itself: `request` to `path`, the answer decoded.
    pub async fn unary<Req, Resp>(&self, path: &'static str, request: &Req) -> Result<Resp, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let req = http::Request::builder()
            .method(http::Method::POST)
            .uri(path)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header(http::header::USER_AGENT, "imagestream")
            .body(Body::new(http_body_util::Full::new(encode_message(
                &request.encode_to_vec(),
            ))))
            .map_err(|e| Status::internal(format!("request to {path}: {e}")))?;
        let resp = self.send(req).await.map_err(|e| self.unavailable(&e))?;
        if let Some(status) = Status::from_header_map(resp.headers()) {
            if status.code() != tonic::Code::Ok {
                return Err(status);
            }
        }
        if resp.status() != http::StatusCode::OK {
            return Err(Status::unknown(format!(
                "runtime answered {path} with HTTP status {}",
                resp.status()
            )));
        }
        let body =
            http_body_util::Limited::new(resp.into_body(), GRPC_FRAME_HEADER + MAX_MESSAGE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        Status::resource_exhausted(format!(
                            "answer to {path} is larger than {MAX_MESSAGE_BYTES} bytes"
                        ))
                    } else {
                        self.unavailable(&RuntimeError::Body(e))
                    }
                })?;
        match body.trailers().and_then(Status::from_header_map) {
            Some(status) if status.code() == tonic::Code::Ok => {}
            Some(status) => return Err(status),
            None => {
                return Err(Status::unknown(format!(
                    "runtime answered {path} without a gRPC status"
                )))
            }
        }
        let message = body.to_bytes();
        let message = decode_frame(&message)
            .map_err(|e| Status::internal(format!("answer to {path}: {e}")))?;
        Resp::decode(message)
            .map_err(|e| Status::internal(format!("cannot decode the answer to {path}: {e}")))
    }

    /// A ready sender on the live connection, connecting first if there is none.
    async fn sender(&self) -> Result<SendRequest<Body>, RuntimeError> {
        let seen = match self.live() {
            Ok(sender) => return self.ready(sender).await,
            Err(attempts) => attempts,
        };
        let _connecting = self.inner.connecting.lock().await;
        let wait = match self.live() {
            Ok(sender) => return self.ready(sender).await,
            Err(attempts) => {
                let slot = self.slot();
                match &slot.failure {
                    // Another caller tried while this one waited, and failed: same answer.
                    Some((_, _, error)) if attempts != seen => {
                        return Err(RuntimeError::Shared(error.clone()))
                    }
                    Some((at, backoff, _)) => {
                        (*at + *backoff).saturating_duration_since(Instant::now())
                    }
                    None => Duration::ZERO,
                }
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let result = self.connect().await;
        let result = {
            let mut slot = self.slot();
            slot.attempts += 1;
            match result {
                Ok(sender) => {
                    slot.sender = Some(sender.clone());
                    slot.failure = None;
                    Ok(sender)
                }
                Err(e) => {
                    let backoff = match &slot.failure {
                        Some((_, last, _)) => (*last * 2).min(BACKOFF_MAX),
                        None => BACKOFF_MIN,
                    };
                    let e = Arc::new(e);
                    slot.failure = Some((Instant::now(), backoff, e.clone()));
                    slot.sender = None;
                    Err(RuntimeError::Shared(e))
                }
            }
        };
        self.ready(result?).await
    }

    /// The live connection's sender, or the number of connect attempts made so far.
    fn live(&self) -> Result<SendRequest<Body>, u64> {
        let slot = self.slot();
        match slot.sender.as_ref().filter(|s| !s.is_closed()) {
            Some(sender) => Ok(sender.clone()),
            None => Err(slot.attempts),
        }
    }

    async fn ready(
        &self,
        mut sender: SendRequest<Body>,
    ) -> Result<SendRequest<Body>, RuntimeError> {
        match sender.ready().await {
            Ok(()) => Ok(sender),
            Err(e) => {
                self.forget();
                Err(RuntimeError::Http2(e))
            }
        }
    }

    /// Drops the live connection if it has closed, so that the next call connects. (A caller
    /// whose sender closed may find a newer, live connection there: that one stays.)
    fn forget(&self) {
        let mut slot = self.slot();
        if slot.sender.as_ref().is_some_and(|s| s.is_closed()) {
            slot.sender = None;
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        // The slot holds no invariant a panic could break halfway.
        self.inner.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn connect(&self) -> Result<SendRequest<Body>, RuntimeError> {
        let connecting = Self::connect_here(self.inner.path.clone(), self.inner.endpoint.clone());
        match &self.inner.home {
            Some(home) => home
                .spawn(connecting)
                .await
                .map_err(|e| RuntimeError::Connect(std::io::Error::other(e)))?,
            None => connecting.await,
        }
    }

    /// Connects on the current runtime and spawns the connection's task there.
    async fn connect_here(
        path: PathBuf,
        endpoint: String,
    ) -> Result<SendRequest<Body>, RuntimeError> {
        let connecting = async move {
            let io = tokio::net::UnixStream::connect(&path)
                .await
                .map_err(RuntimeError::Connect)?;
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake::<_, Body>(TokioIo::new(io))
                .await
                .map_err(RuntimeError::Handshake)
        };
        let (sender, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| RuntimeError::ConnectTimeout(CONNECT_TIMEOUT))??;
        tracing::debug!(%endpoint, "connected to the runtime");
        tokio::spawn(async move {
            match connection.await {
                Ok(()) => tracing::debug!(%endpoint, "runtime connection closed"),
                Err(e) => tracing::debug!(%endpoint, error = %e, "runtime connection ended"),
            }
        });
        Ok(sender)
    }
}

/// The socket path of a runtime endpoint: `unix:///path` or a bare absolute path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(format!(
            "{endpoint:?} is not a unix socket endpoint (expected unix:///path/to/socket)"
        ));
    }
    Ok(PathBuf::from(path))
}

/// `message` (protobuf bytes) as one uncompressed gRPC frame.
pub fn encode_message(message: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(GRPC_FRAME_HEADER + message.len());
    buf.push(0);
    // Messages are capped far below 4 GiB (MAX_MESSAGE_BYTES).
    buf.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    buf.extend_from_slice(message);
    Bytes::from(buf)
}

/// The message of a unary gRPC body: exactly one uncompressed frame.
pub fn decode_frame(body: &[u8]) -> Result<&[u8], FrameError> {
    let Some((&[compressed, a, b, c, d], message)) = body.split_first_chunk::<GRPC_FRAME_HEADER>()
    else {
        return Err(FrameError::Truncated(body.len()));
    };
    if compressed != 0 {
        return Err(FrameError::Compressed);
    }
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if message.len() != len {
        return Err(FrameError::Length {
            declared: len,
            got: message.len(),
        });
    }
    Ok(message)
}

/// A unary gRPC body that is not one plain message frame.
#[derive(Debug, Error, PartialEq)]
pub enum FrameError {
    #[error("the gRPC message frame is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("compressed gRPC messages are not supported on this call")]
    Compressed,
    #[error("expected one gRPC message of {declared} bytes, got {got} bytes")]
    Length { declared: usize, got: usize },
}

/// `req` with the scheme and authority hyper's HTTP/2 client needs.
fn with_authority(req: http::Request<Body>) -> Result<http::Request<Body>, RuntimeError> {
    let (mut parts, body) = req.into_parts();
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    if uri.scheme.is_none() {
        uri.scheme = Some(http::uri::Scheme::HTTP);
    }
    if uri.authority.is_none() {
        uri.authority = Some(http::uri::Authority::from_static(DEFAULT_AUTHORITY));
    }
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    parts.uri = http::Uri::from_parts(uri).map_err(|e| RuntimeError::Uri(e.into()))?;
    parts.version = http::Version::HTTP_2;
    Ok(http::Request::from_parts(parts, body))
}

/// As a tonic transport, for typed clients (the pre-pull trigger).
impl tower::Service<http::Request<Body>> for Runtime {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let runtime = self.clone();
        Box::pin(async move { Ok(runtime.forward(req).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        let framed = encode_message(b"abc");
        assert_eq!(&framed[..], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(decode_frame(&framed), Ok(&b"abc"[..]));
        assert_eq!(decode_frame(&framed[..4]), Err(FrameError::Truncated(4)));
        assert_eq!(
            decode_frame(&framed[..7]),
            Err(FrameError::Length {
                declared: 3,
                got: 2
            })
        );
        assert_eq!(decode_frame(&[1, 0, 0, 0, 0]), Err(FrameError::Compressed));
    }

    #[tokio::test]
    async fn a_runtime_that_is_not_there_is_unavailable_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = format!("unix://{}/none.sock", dir.path().display());
        let runtime = Runtime::new(&endpoint).expect("endpoint");
        let err = runtime
            .unary::<_, k8s_cri::v1::VersionResponse>(
                "/runtime.v1.RuntimeService/Version",
                &k8s_cri::v1::VersionRequest::default(),
            )
            .await
            .expect_err("nothing listens");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains(&endpoint), "{}", err.message());
    }

    /// A runtime that sends GOAWAY on demand (a fault containerd cannot be made to produce at
    /// will): answers every call with the number of its connection in `x-conn`, and `/slow`
    /// only once `release` is notified.
    struct FakeGoawayRuntime {
        conns: Arc<Mutex<Vec<hyper_util::server::graceful::GracefulShutdown>>>,
        slow_started: Arc<tokio::sync::Notify>,
        release: Arc<tokio::sync::Notify>,
    }

    impl FakeGoawayRuntime {
        fn start(path: &std::path::Path) -> Self {
            let listener = tokio::net::UnixListener::bind(path).expect("bind");
            let fake = FakeGoawayRuntime {
                conns: Arc::default(),
                slow_started: Arc::default(),
                release: Arc::default(),
            };
            let (conns, started, release) = (
                fake.conns.clone(),
                fake.slow_started.clone(),
                fake.release.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0;
                while let Ok((stream, _)) = listener.accept().await {
                    n += 1;
                    let (started, release) = (started.clone(), release.clone());
                    let service =
                        hyper::service::service_fn(move |req: http::Request<Incoming>| {
                            let (started, release) = (started.clone(), release.clone());
                            async move {
                                if req.uri().path() == "/slow" {
                                    started.notify_one();
                                    release.notified().await;
                                }
                                let resp = http::Response::builder()
                                    .header("x-conn", n.to_string())
                                    .body(http_body_util::Empty::<Bytes>::new())
                                    .expect("response");
                                Ok::<_, Infallible>(resp)
                            }
                        });
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service);
                    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
                    tokio::spawn(graceful.watch(conn));
                    conns.lock().expect("conns").push(graceful);
                }
            });
            fake
        }

        /// Sends GOAWAY on connection `n` (1-based); it closes once its calls have ended.
        fn goaway(&self, n: usize) {
            let graceful = std::mem::take(&mut self.conns.lock().expect("conns")[n - 1]);
            tokio::spawn(graceful.shutdown());
        }
    }

    async fn call(runtime: &Runtime, path: &'static str) -> String {
        let req = http::Request::builder()
            .method(http::Method::POST)
            .uri(path)
            .body(Body::empty())
            .expect("request");
        let resp = runtime.send(req).await.expect("call reaches the runtime");
        resp.headers()["x-conn"]
            .to_str()
            .expect("ascii")
            .to_string()
    }

    #[tokio::test]
    async fn after_a_goaway_new_calls_go_on_a_new_connection_and_calls_in_flight_finish() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("runtime.sock");
        let fake = FakeGoawayRuntime::start(&path);
        let runtime = Runtime::new(&format!("unix://{}", path.display())).expect("endpoint");
        assert_eq!(call(&runtime, "/fast").await, "1");
        let slow = tokio::spawn({
            let runtime = runtime.clone();
            async move { call(&runtime, "/slow").await }
        });
        fake.slow_started.notified().await;
        fake.goaway(1);
        // Calls keep succeeding; once the GOAWAY has arrived they go on connection 2.
        let mut on_new = false;
        for _ in 0..200 {
            if call(&runtime, "/fast").await == "2" {
                on_new = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(on_new, "no call went on a new connection after the GOAWAY");
        assert!(!slow.is_finished(), "the call in flight ended early");
        fake.release.notify_one();
        assert_eq!(
            slow.await.expect("task"),
            "1",
            "the call in flight finished on its connection"
        );
    }

    #[tokio::test]
    async fn a_runtime_that_comes_back_is_reconnected_by_the_next_call() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("runtime.sock");
        let runtime = Runtime::new(&format!("unix://{}", path.display())).expect("endpoint");
        let req = || {
            http::Request::builder()
                .uri("/fast")
                .body(Body::empty())
                .expect("request")
        };
        assert!(runtime.send(req()).await.is_err());
        assert!(
            runtime.send(req()).await.is_err(),
            "backoff, then another attempt"
        );
        let _fake = FakeGoawayRuntime::start(&path);
        assert_eq!(call(&runtime, "/fast").await, "1");
    }
}
