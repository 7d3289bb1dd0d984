//! The peer endpoint: this node's cache served to the other nodes of the cluster, on its own
//! listener (`peer_listen`, the node's address), over TLS that requires a client certificate
//! signed by the cluster CA ([`crate::peer::tls`]). A client without one never gets past the
//! handshake.
//!
//! One route: `GET`/`HEAD /v1/blobs/<digest>` ([`crate::peer::client::BLOB_PATH`]). No
//! manifests by tag, no listing, no writes: a peer can only get bytes it already knows the
//! digest of. `200` with a `Content-Length` from the cache (or a fill in progress), `404`
//! when this node does not hold it. With [`FILL_HOST_HEADER`] and [`FILL_REPOSITORY_HEADER`]
//! (sent only to a blob's primary home) a missing blob is filled from that registry, if
//! `mirror_upstreams` allows it (`403` otherwise), with this node's own credentials, and the
//! fill is shared with every other node asking for it; such a fill never asks another peer.
//!
//! Who may receive what: any node with a certificate of the cluster is trusted with any blob
//! it names. A private repository's blob is asked for only by a node whose own private-image
//! gate let a pull of that repository through (the asking side checks; see
//! [`crate::cache::PeerHook`]).

use super::{check_name, Upstreams};
use crate::cache::{Blob, Cache, CacheError, Origin};
use crate::peer::client::{BLOB_PATH, FILL_HOST_HEADER, FILL_REPOSITORY_HEADER};
use crate::registry::{Digest, RegistryError};
use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt as _, Empty, Full, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a peer has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

type Body = BoxBody<Bytes, std::io::Error>;

/// The handler behind the TLS listener.
pub struct PeerEndpoint {
    cache: Arc<Cache>,
    upstreams: Upstreams,
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn text(status: StatusCode, message: String, head: bool) -> Response<Body> {
    let mut r = Response::new(if head {
        empty()
    } else {
        Full::new(Bytes::from(crate::audit::cap(message) + "\n"))
            .map_err(|never| match never {})
            .boxed()
    });
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl PeerEndpoint {
    pub fn new(cache: Arc<Cache>, upstreams: Upstreams) -> Self {
        Self { cache, upstreams }
    }

    /// Handles one request from an authenticated peer.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body> {
        let head = req.method() == Method::HEAD;
        let response = self.answer(&req, head).await;
        crate::metrics::metrics()
            .peer_requests
            .get_or_create(&crate::metrics::PeerServedLabels {
                code: response.status().as_u16().to_string(),
            })
            .inc();
        response
    }

    async fn answer<B>(&self, req: &Request<B>, head: bool) -> Response<Body> {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} is not supported: peers only read blobs", req.method()),
                head,
            );
        }
        let Some(raw) = req.uri().path().strip_prefix(BLOB_PATH) else {
            return text(
                StatusCode::NOT_FOUND,
                format!("no such route; peers read {BLOB_PATH}<digest>"),
                head,
            );
        };
        let Ok(digest) = Digest::parse(raw) else {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid digest {:?}",
                    raw.chars().take(200).collect::<String>()
                ),
                head,
            );
        };
        let fill_from = match self.fill_origin(req) {
            Ok(o) => o,
            Err(r) => return r,
        };
        let blob = match self.cache.blob_for_peer(&digest, fill_from.as_ref()).await {
            Ok(b) => b,
            Err(e) => return self.error(&digest, &e, head),
        };
        // A peer needs the length to know the body is complete: finish a fill whose
        // upstream sent none first.
        let blob = if blob.size.is_none() {
            match self.finish(&digest, fill_from.as_ref()).await {
                Ok(b) => b,
                Err(e) => return self.error(&digest, &e, head),
            }
        } else {
            blob
        };
        let size = blob.size;
        let mut r = Response::new(if head { empty() } else { body_of(blob, size) });
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        if let Some(size) = size {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
        if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
            h.insert("docker-content-digest", v);
        }
        tracing::debug!(%digest, ?size, "served a blob to a peer");
        r
    }

    async fn finish(
        &self,
        digest: &Digest,
        fill_from: Option<&Origin>,
    ) -> Result<Blob, CacheError> {
        if let Some(o) = fill_from {
            self.cache.ensure(digest, o).await?;
        }
        self.cache.blob_for_peer(digest, None).await
    }

    /// The registry to fill from, when the request asks for a fill and names an allowed one.
    #[allow(clippy::result_large_err)]
    fn fill_origin<B>(&self, req: &Request<B>) -> Result<Option<Origin>, Response<Body>> {
        let head = req.method() == Method::HEAD;
        let get = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (host, repository) = match (get(FILL_HOST_HEADER), get(FILL_REPOSITORY_HEADER)) {
            (None, None) => return Ok(None),
            (Some(h), Some(r)) => (h.to_ascii_lowercase(), r),
            _ => {
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    format!("{FILL_HOST_HEADER} and {FILL_REPOSITORY_HEADER} go together"),
                    head,
                ))
            }
        };
        if check_name(&repository).is_err() {
            return Err(text(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid repository {:?}",
                    repository.chars().take(300).collect::<String>()
                ),
                head,
            ));
        }
        if !self.upstreams.allows(&host) {
            return Err(text(
                StatusCode::FORBIDDEN,
                format!(
                    "registry {:?} is not in this node's mirror_upstreams",
                    host.chars().take(300).collect::<String>()
                ),
                head,
            ));
        }
        Ok(Some(Origin { host, repository }))
    }

    fn error(&self, digest: &Digest, e: &CacheError, head: bool) -> Response<Body> {
        let status = match e.root() {
            CacheError::NotCached { .. } | CacheError::Upstream(RegistryError::NotFound { .. }) => {
                StatusCode::NOT_FOUND
            }
            CacheError::Upstream(RegistryError::Unauthorized { .. }) => StatusCode::NOT_FOUND,
            CacheError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::BAD_GATEWAY,
        };
        if status != StatusCode::NOT_FOUND {
            tracing::info!(%digest, error = %e, "peer request failed");
        }
        text(status, e.to_string(), head)
    }
}

fn body_of(blob: Blob, size: Option<u64>) -> Body {
    let rx = blob.into_stream(0, size);
    let stream =
        tokio_stream::wrappers::ReceiverStream::new(rx).map(|r| r.map(hyper::body::Frame::data));
    http_body_util::BodyExt::boxed(StreamBody::new(stream))
}

/// Serves `endpoint` over TLS (`tls`: [`crate::peer::tls::server_config`]) on `listener` until
/// `shutdown`, then drains for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    endpoint: Arc<PeerEndpoint>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let serve = |stream: tokio::net::TcpStream,
                 graceful: &hyper_util::server::graceful::GracefulShutdown| {
        let endpoint = endpoint.clone();
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let remote = stream.peer_addr().ok();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    crate::metrics::metrics()
                        .peer_requests
                        .get_or_create(&crate::metrics::PeerServedLabels {
                            code: "tls_refused".into(),
                        })
                        .inc();
                    tracing::info!(?remote, error = %e, "peer TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(?remote, "peer TLS handshake timed out");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| {
                let endpoint = endpoint.clone();
                async move { Ok::<_, Infallible>(endpoint.handle(req).await) }
            });
            let conn = watcher.watch(
                builder
                    .serve_connection(TokioIo::new(tls), svc)
                    .into_owned(),
            );
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "peer connection ended");
            }
        });
    };
    crate::accept::serve_until("peer endpoint", listener, serve, shutdown, grace).await;
}
