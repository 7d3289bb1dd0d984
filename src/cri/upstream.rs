//! The proxy's own connection to the real runtime (containerd, CRI-O), for the calls it makes
//! itself: pulls, rewritten requests, pre-pulls, and the runtime `ImageStatus` behind a held
//! digest when the client connection's relay cannot make it ([`RelayCalls`]). (Client calls
//! are relayed on a runtime connection per client connection, see [`super::relay`].) One lazily connected HTTP/2 connection over the runtime's unix socket,
//! reconnected on demand, driven with the `h2` crate directly.
//!
//! Why not a tonic `Channel` (or a hyper client): both put two extra tasks in every call, a
//! `tower::Buffer` worker and, for a request with a body, a task that waits for stream send
//! capacity before it sends the message, so that the request leaves as two writes (headers,
//! then the message) and the runtime wakes twice. Here a unary request is queued as headers and
//! message at once and leaves in one write, from the connection's own task. The settings are
//! hyper's client defaults (2 MiB stream and 5 MiB connection windows, 16 KiB frames).
//!
//! A call that cannot reach the runtime is answered with gRPC `Unavailable` naming the runtime
//! endpoint, as a normal gRPC response, so that raw forwarding and typed calls fail the same way.

use super::io::ProxyStream;
use crate::config::{runtime_socket_path, RUNTIME_CONNECT_TIMEOUT};
use bytes::{Buf, Bytes};
use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use thiserror::Error;
use tonic::body::Body;
use tonic::Status;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Stream window the runtime may fill before the proxy reads (hyper's client default).
const STREAM_WINDOW: u32 = 2 << 20;
/// Connection window (hyper's client default).
const CONNECTION_WINDOW: u32 = 5 << 20;
/// Largest header list accepted from the runtime (hyper's client default).
const MAX_HEADER_LIST: u32 = 16 << 10;
/// Largest amount of request data buffered per stream before waiting for the runtime's window.
const MAX_SEND_BUFFER: usize = 1 << 20;
/// Streams that may be opened before the runtime's settings arrive (hyper's client default).
const INITIAL_MAX_SEND_STREAMS: usize = 100;
/// `:authority` of requests that carry none.
const DEFAULT_AUTHORITY: &str = "localhost";

/// Why a request did not reach the runtime.
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(std::time::Duration),
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(#[source] h2::Error),
    #[error("HTTP/2: {0}")]
    Http2(#[source] h2::Error),
    #[error("invalid request URI: {0}")]
    Uri(#[source] http::Error),
    #[error("HTTP/2 protocol error: {0}")]
    Protocol(String),
}

/// A request's body on its way to the runtime.
pub enum RequestBody<B> {
    /// Complete (a unary request, collected): sent with the headers in one write.
    Full(Bytes),
    /// Forwarded frame by frame as it arrives, within the runtime's flow-control window.
    Stream(B),
}

/// A cloneable handle on the runtime. Also a tonic client transport (`Service`).
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    endpoint: String,
    /// The live connection, if any. Held across a (re)connect, so that callers wait for one
    /// connection instead of each opening their own.
    conn: tokio::sync::Mutex<Option<h2::client::SendRequest<Bytes>>>,
}

impl Upstream {
    /// A handle on `endpoint` (`unix:///path`); nothing is connected until the first call.
    pub fn new(endpoint: &str) -> Result<Self, String> {
        let path = runtime_socket_path(endpoint)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                endpoint: endpoint.to_string(),
                conn: tokio::sync::Mutex::new(None),
            }),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// The runtime's unix socket.
    pub fn socket_path(&self) -> &std::path::Path {
        &self.inner.path
    }

    /// The gRPC answer for a call that did not reach the runtime.
    pub fn unavailable(&self, error: &UpstreamError) -> Status {
        crate::audit::status(
            tonic::Code::Unavailable,
            format!(
                "runtime endpoint {} is unavailable: {}",
                self.inner.endpoint,
                crate::audit::error_chain(error)
            ),
        )
    }

    /// Sends `parts` with `body` to the runtime and returns its answer as it comes (headers,
    /// then body frames and trailers, untouched), or `Unavailable` if it cannot be reached.
    pub async fn forward<B>(
        &self,
        parts: http::request::Parts,
        body: RequestBody<B>,
    ) -> http::Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        match self.send(parts, body).await {
            Ok(resp) => resp.map(|recv| {
                Body::new(RecvBody {
                    recv,
                    data_done: false,
                })
            }),
            Err(e) => self.unavailable(&e).into_http(),
        }
    }

    async fn send<B>(
        &self,
        parts: http::request::Parts,
        body: RequestBody<B>,
    ) -> Result<http::Response<h2::RecvStream>, UpstreamError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let req = h2_request(parts)?;
        let end_of_stream = match &body {
            RequestBody::Full(bytes) => bytes.is_empty(),
            RequestBody::Stream(b) => b.is_end_stream(),
        };
        let (response, mut send) = self.open(req, end_of_stream).await?;
        if !end_of_stream {
            match body {
                RequestBody::Full(bytes) => {
                    send.send_data(bytes, true).map_err(UpstreamError::Http2)?
                }
                RequestBody::Stream(body) => {
                    tokio::spawn(Pipe {
                        body: Box::pin(body),
                        send,
                        pending: None,
                    });
                }
            }
        }
        response.await.map_err(UpstreamError::Http2)
    }

    /// Opens a stream for `req` on the live connection; if that connection has gone (runtime
    /// restarted), on a new one. Nothing has been sent when this fails.
    async fn open(
        &self,
        req: http::Request<()>,
        end_of_stream: bool,
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), UpstreamError> {
        let sender = {
            let mut conn = self.inner.conn.lock().await;
            let live = match conn.clone() {
                Some(sender) => sender.ready().await.ok(),
                None => None,
            };
            match live {
                Some(ready) => ready,
                None => {
                    *conn = None;
                    let sender = self.connect().await?;
                    *conn = Some(sender.clone());
                    sender.ready().await.map_err(UpstreamError::Http2)?
                }
            }
        };
        let mut sender = sender;
        sender
            .send_request(req, end_of_stream)
            .map_err(UpstreamError::Http2)
    }

    async fn connect(&self) -> Result<h2::client::SendRequest<Bytes>, UpstreamError> {
        let path = self.inner.path.clone();
        let connecting = async move {
            let io = tokio::net::UnixStream::connect(&path)
                .await
                .and_then(ProxyStream::new)
                .map_err(UpstreamError::Connect)?
                .defer_control_frames();
            h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_header_list_size(MAX_HEADER_LIST)
                .max_send_buffer_size(MAX_SEND_BUFFER)
                .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
                .enable_push(false)
                .handshake::<_, Bytes>(io)
                .await
                .map_err(UpstreamError::Handshake)
        };
        let (sender, connection) = tokio::time::timeout(RUNTIME_CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout(RUNTIME_CONNECT_TIMEOUT))??;
        let endpoint = self.inner.endpoint.clone();
        tokio::spawn(async move {
            match connection.await {
                Ok(()) => tracing::debug!(%endpoint, "runtime connection closed"),
                Err(e) => tracing::debug!(%endpoint, error = %e, "runtime connection ended"),
            }
        });
        tracing::debug!(endpoint = %self.inner.endpoint, "connected to the runtime");
        Ok(sender)
    }

    /// One unary gRPC call made by the proxy itself: `request` to `path`, the answer decoded.
    pub async fn unary<Req, Resp>(&self, path: &'static str, request: &Req) -> Result<Resp, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let (mut parts, ()) = http::Request::builder()
            .method(http::Method::POST)
            .uri(path)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header(http::header::USER_AGENT, "imagestream")
            .body(())
            .map_err(|e| Status::internal(format!("request to {path}: {e}")))?
            .into_parts();
        parts.version = http::Version::HTTP_2;
        let body = RequestBody::<http_body_util::Empty<Bytes>>::Full(encode_message(request));
        let resp = self
            .send(parts, body)
            .await
            .map_err(|e| self.unavailable(&e))?;
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
        let mut recv = resp.into_body();
        let mut message = bytes::BytesMut::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(|e| Status::unavailable(e.to_string()))?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            if message.len() + chunk.len() > super::proxy::MAX_CRI_MESSAGE_BYTES + 5 {
                return Err(Status::resource_exhausted(format!(
                    "answer to {path} is larger than {} bytes",
                    super::proxy::MAX_CRI_MESSAGE_BYTES
                )));
            }
            message.extend_from_slice(&chunk);
        }
        let trailers = recv
            .trailers()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        match trailers.as_ref().and_then(Status::from_header_map) {
            Some(status) if status.code() == tonic::Code::Ok => {}
            Some(status) => return Err(status),
            None => {
                return Err(Status::unknown(format!(
                    "runtime answered {path} without a gRPC status"
                )))
            }
        }
        decode_message(&message.freeze())
    }
}

/// The gRPC message frame of `message` (uncompressed).
pub fn encode_message(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = Vec::with_capacity(5 + len);
    buf.push(0);
    // CRI messages are bounded far below 4 GiB (MAX_CRI_MESSAGE_BYTES).
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    message.encode_raw(&mut buf);
    Bytes::from(buf)
}

/// The one message of a unary gRPC body (one uncompressed frame, nothing after it).
pub fn decode_message<M: prost::Message + Default>(body: &[u8]) -> Result<M, Status> {
    let Some((&[compressed, a, b, c, d], message)) = body.split_first_chunk::<5>() else {
        return Err(Status::internal("gRPC message frame is truncated"));
    };
    if compressed != 0 {
        return Err(Status::unimplemented(
            "compressed gRPC messages are not supported on this call",
        ));
    }
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if message.len() != len {
        return Err(Status::internal(format!(
            "expected one gRPC message of {len} bytes, got {} bytes",
            message.len()
        )));
    }
    M::decode(message).map_err(|e| Status::internal(format!("cannot decode the message: {e}")))
}

/// `parts` as a request for `h2`: the URI needs a scheme and an authority.
fn h2_request(parts: http::request::Parts) -> Result<http::Request<()>, UpstreamError> {
    let http::request::Parts {
        method,
        uri,
        headers,
        ..
    } = parts;
    let mut uri = uri.into_parts();
    if uri.scheme.is_none() {
        uri.scheme = Some(http::uri::Scheme::HTTP);
    }
    if uri.authority.is_none() {
        uri.authority = Some(http::uri::Authority::from_static(DEFAULT_AUTHORITY));
    }
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    let uri = http::Uri::from_parts(uri).map_err(|e| UpstreamError::Uri(e.into()))?;
    let mut req = http::Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    *req.version_mut() = http::Version::HTTP_2;
    Ok(req)
}

/// The runtime's answer body: data as it arrives (its window released at once, as hyper does),
/// then the trailers.
struct RecvBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match std::task::ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match std::task::ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// Forwards a streaming request body to the runtime within its flow-control window; resets the
/// stream if the body fails (client gone) and stops if the runtime resets it.
struct Pipe<B> {
    body: Pin<Box<B>>,
    send: h2::SendStream<Bytes>,
    /// Data taken from the body and not yet sent for lack of window.
    pending: Option<(Bytes, bool)>,
}

impl<B> Future for Pipe<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            if let Poll::Ready(reason) = this.send.poll_reset(cx) {
                tracing::debug!(?reason, "runtime reset a forwarded stream");
                return Poll::Ready(());
            }
            if let Some((mut data, end)) = this.pending.take() {
                this.send.reserve_capacity(data.len());
                let capacity = match this.send.poll_capacity(cx) {
                    Poll::Pending => {
                        this.pending = Some((data, end));
                        return Poll::Pending;
                    }
                    Poll::Ready(Some(Ok(n))) => n,
                    Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                };
                let chunk = data.split_to(capacity.min(data.len()));
                let last = data.is_empty();
                if this.send.send_data(chunk, end && last).is_err() {
                    return Poll::Ready(());
                }
                if !last {
                    this.pending = Some((data, end));
                } else if end {
                    return Poll::Ready(());
                }
                continue;
            }
            match std::task::ready!(this.body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        let end = this.body.is_end_stream();
                        let data = data.copy_to_bytes(data.remaining());
                        if data.is_empty() {
                            if end {
                                let _ = this.send.send_data(Bytes::new(), true);
                                return Poll::Ready(());
                            }
                        } else {
                            this.pending = Some((data, end));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.send.reserve_capacity(0);
                            let _ = this.send.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(e)) => {
                    tracing::debug!(error = %e.into(), "request body failed; resetting the stream");
                    this.send.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
                None => {
                    let _ = this.send.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// As a tonic transport, for typed clients (the pre-pull trigger).
impl tower::Service<http::Request<Body>> for Upstream {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let upstream = self.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            Ok(upstream.forward(parts, RequestBody::Stream(body)).await)
        })
    }
}

/// A unary call for a client connection's relay to make on its own runtime connection (see
/// [`super::relay`]): cheaper than a call on the proxy's connection here, and answered in the
/// same task that relays the client's call. The reply is `None` when the relay cannot make it
/// (no live runtime connection, or frames waiting for window): the caller then uses
/// [`Upstream::unary`].
pub struct RelayCall {
    pub path: &'static str,
    /// The request as a gRPC message frame.
    pub message: Bytes,
    /// The answer's message frame, or its gRPC status.
    pub reply: tokio::sync::oneshot::Sender<Option<Result<Bytes, Status>>>,
}

/// Sends [`RelayCall`]s to one relay.
#[derive(Clone)]
pub struct RelayCalls(tokio::sync::mpsc::UnboundedSender<RelayCall>);

impl RelayCalls {
    pub fn new(tx: tokio::sync::mpsc::UnboundedSender<RelayCall>) -> Self {
        Self(tx)
    }

    /// Makes the call through the relay; `None` when the relay cannot (see [`RelayCall`]).
    pub async fn unary<Req, Resp>(
        &self,
        path: &'static str,
        request: &Req,
    ) -> Option<Result<Resp, Status>>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let call = RelayCall {
            path,
            message: encode_message(request),
            reply,
        };
        self.0.send(call).ok()?;
        let answer = answer.await.ok()??;
        Some(answer.and_then(|message| decode_message(&message)))
    }
}
