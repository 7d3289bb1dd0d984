//! The registry mirror: an HTTP server speaking the pull side of the OCI distribution API,
//! backed by the layer cache ([`crate::cache`]), plus `/metrics` (Prometheus text). It learns
//! which upstream registry a request is for in one of two ways:
//!
//! - containerd is pointed at it through a `hosts.toml` ([`hosts_toml`]) and names the upstream
//!   in the `ns` query parameter: `/v2/team/app/manifests/v1?ns=registry.example.com`.
//! - CRI-O is pointed at it through a registries.conf drop-in ([`registries_conf`]) whose mirror
//!   location carries the upstream as a path prefix (it cannot send `ns`):
//!   `/v2/imagestream--upstream/registry.example.com/team/app/manifests/v1`, the port's `:`
//!   written `_` ([`registry_host`] has the encoding).
//!
//! A request naming the upstream both ways is ambiguous and refused (`400 NAME_INVALID`), as is
//! a name under the prefix marker that does not spell a registry and a repository. With
//! neither, the only configured upstream is used (or the cache alone). [`Upstreams`] says which
//! registries may be reached; any other is `403 DENIED`, however it is named.
//!
//! - `GET /v2/`: API version check.
//! - `HEAD`/`GET /v2/<name>/manifests/<tag-or-digest>`: by digest from the cache (pulled through
//!   on a miss); by tag from the upstream, verified against the digest it claims (when the
//!   upstream fails, the tag's last verified answer, if its manifest is still cached).
//! - `HEAD`/`GET /v2/<name>/blobs/<digest>`: from the cache or pulled through while streaming,
//!   with single `Range` requests (206) on cached blobs. A blob the upstream sends without a
//!   length is downloaded and verified before the response starts, so every streamed response
//!   has a `Content-Length` and a cut-short body is always visible as such. A whole cached blob
//!   is re-hashed while it is served; bytes changed on disk cut the body short and evict it.
//!   A full cache disk is `507 Insufficient Storage` (when known before the response starts).
//! - Anything that writes is refused (`405 UNSUPPORTED`).

pub mod hosts_toml;
pub mod peer_endpoint;
pub mod registries_conf;
pub mod registry_host;

use crate::cache::{Blob, Cache, CacheError, Origin};
use crate::registry::{Digest, RegistryError};
use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt as _, Empty, Full, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;

/// Where the mirror listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5050";
/// Longest repository name accepted (distribution's limit).
pub const MAX_NAME_LEN: usize = 255;

type Body = BoxBody<Bytes, std::io::Error>;

/// Errors at the mirror's edge, each mapped to an HTTP status and a distribution error code.
#[derive(Debug, Error)]
pub enum MirrorError {
    #[error("invalid repository name {0:?}")]
    NameInvalid(String),
    #[error(
        "invalid upstream prefix in repository name {name:?}: {why} \
         (expected {}/HOST[_PORT]/REPOSITORY)",
        registry_host::UPSTREAM_MARKER
    )]
    UpstreamPrefixInvalid { name: String, why: String },
    #[error("invalid digest {0:?}")]
    DigestInvalid(String),
    #[error("invalid tag {0:?}")]
    TagInvalid(String),
    #[error("upstream registry {0:?} is not allowed by this mirror (configure mirror_upstreams)")]
    UpstreamDenied(String),
    #[error("this mirror is read-only: {0} is not supported")]
    Unsupported(String),
    #[error("invalid range {0:?}")]
    Range(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl MirrorError {
    fn status_and_code(&self, blob: bool) -> (StatusCode, &'static str) {
        let unknown = if blob {
            "BLOB_UNKNOWN"
        } else {
            "MANIFEST_UNKNOWN"
        };
        match self {
            MirrorError::NameInvalid(_) | MirrorError::UpstreamPrefixInvalid { .. } => {
                (StatusCode::BAD_REQUEST, "NAME_INVALID")
            }
            MirrorError::DigestInvalid(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            MirrorError::TagInvalid(_) => (StatusCode::BAD_REQUEST, "TAG_INVALID"),
            MirrorError::UpstreamDenied(_) => (StatusCode::FORBIDDEN, "DENIED"),
            MirrorError::Unsupported(_) => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
            MirrorError::Range(_) => (StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UNKNOWN"),
            MirrorError::NotFound(_) => (StatusCode::NOT_FOUND, unknown),
            MirrorError::Cache(e) => match e.root() {
                CacheError::NotCached { .. } => (StatusCode::NOT_FOUND, unknown),
                CacheError::Upstream(RegistryError::NotFound { .. }) => {
                    (StatusCode::NOT_FOUND, unknown)
                }
                CacheError::Upstream(RegistryError::InvalidReference { .. }) => {
                    (StatusCode::BAD_REQUEST, "NAME_INVALID")
                }
                CacheError::Upstream(RegistryError::Unauthorized { .. }) => {
                    (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
                }
                CacheError::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
                CacheError::NoSpace { .. } => (StatusCode::INSUFFICIENT_STORAGE, "UNKNOWN"),
                // The upstream failed or sent bad bytes: a gateway error, so that containerd
                // falls back to its next host.
                _ => (StatusCode::BAD_GATEWAY, "UNKNOWN"),
            },
        }
    }
}

/// The registries the mirror may pull through from, by host (`HOST[:PORT]`, as containerd
/// sends it in `ns` and [`registry_host::decode_host`] reads it from a path prefix).
#[derive(Debug, Clone, Default)]
pub struct Upstreams {
    hosts: BTreeMap<String, bool>,
}

impl Upstreams {
    /// From `mirror_upstreams` URLs (`http://HOST:PORT`, `https://HOST`) and the insecure
    /// registries (`HOST:PORT`, plain HTTP).
    pub fn new(urls: &[String], insecure: &[String]) -> Result<Self, String> {
        let mut hosts = BTreeMap::new();
        for url in urls {
            let (secure, host) = parse_upstream(url)?;
            hosts.insert(host, secure);
        }
        for h in insecure {
            hosts.entry(h.clone()).or_insert(false);
        }
        Ok(Self { hosts })
    }

    pub fn allows(&self, host: &str) -> bool {
        self.hosts.contains_key(host)
    }

    /// Hosts reached over plain HTTP.
    pub fn plain_http_hosts(&self) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|(_, secure)| !**secure)
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// The only upstream, when exactly one is configured (used when `ns` is absent).
    fn single(&self) -> Option<&str> {
        (self.hosts.len() == 1)
            .then(|| self.hosts.keys().next().map(String::as_str))
            .flatten()
    }
}

/// `http://HOST[:PORT]` → (false, HOST[:PORT]); `https://…` or a bare host → (true, …).
pub fn parse_upstream(url: &str) -> Result<(bool, String), String> {
    let (secure, rest) = if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if url.contains("://") {
        return Err(format!(
            "{url:?}: only http:// and https:// upstreams are supported"
        ));
    } else {
        (true, url)
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty()
        || host.contains('/')
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
    {
        return Err(format!("{url:?} is not SCHEME://HOST[:PORT]"));
    }
    Ok((secure, host.to_ascii_lowercase()))
}

/// The percent-decoded value of `key` in a URL query (containerd sends `ns=127.0.0.1%3A5000`).
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
}

/// Checks a repository name against the distribution grammar.
pub fn check_name(name: &str) -> Result<(), MirrorError> {
    let component_ok = |c: &str| {
        let b = c.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|&x| {
                x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, b'.' | b'_' | b'-')
            })
            && !c.contains("..")
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.split('/').all(component_ok) {
        return Err(MirrorError::NameInvalid(name.chars().take(300).collect()));
    }
    Ok(())
}

fn check_tag(tag: &str) -> Result<(), MirrorError> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(MirrorError::TagInvalid(tag.chars().take(200).collect()))
    }
}

/// Checks a manifest request: the repository name, and the reference (a digest when it contains
/// `:`, else a tag).
pub fn check_manifest_request(name: &str, reference: &str) -> Result<(), MirrorError> {
    check_name(name)?;
    if reference.contains(':') {
        Digest::parse(reference)
            .map_err(|_| MirrorError::DigestInvalid(reference.chars().take(200).collect()))?;
    } else {
        check_tag(reference)?;
    }
    Ok(())
}

/// Checks a blob request: the repository name and the digest.
pub fn check_blob_request(name: &str, digest: &str) -> Result<Digest, MirrorError> {
    check_name(name)?;
    Digest::parse(digest)
        .map_err(|_| MirrorError::DigestInvalid(digest.chars().take(200).collect()))
}

/// The upstream registry named by the `ns` query parameter, lowercased.
pub fn ns_param(query: &str) -> Option<String> {
    query_param(query, "ns").map(|v| v.to_ascii_lowercase())
}

/// The upstream registry and repository a request for `name` (already checked by
/// [`check_name`]) is for: from `ns` (containerd), from an [`registry_host::UPSTREAM_MARKER`]
/// path prefix (CRI-O; the repository is what follows it), else the only configured upstream,
/// else none (cache only). Both `ns` and a prefix is ambiguous (`400`); a named upstream that
/// [`Upstreams`] does not allow is `403`. Nothing touches the cache before this answers.
pub fn request_upstream(
    upstreams: &Upstreams,
    name: &str,
    query: &str,
) -> Result<Option<Origin>, MirrorError> {
    let prefixed = registry_host::split_upstream_prefix(name)?;
    let (host, repository) = match (ns_param(query), prefixed) {
        (Some(ns), Some(_)) => {
            return Err(MirrorError::UpstreamPrefixInvalid {
                name: name.chars().take(300).collect(),
                why: format!(
                    "the upstream is named twice, by ns={:?} and by the path",
                    ns.chars().take(300).collect::<String>()
                ),
            })
        }
        (Some(ns), None) => (ns, name),
        (None, Some((host, repository))) => (host, repository),
        (None, None) => match upstreams.single() {
            Some(h) => (h.to_string(), name),
            None => return Ok(None),
        },
    };
    if !upstreams.allows(&host) {
        return Err(MirrorError::UpstreamDenied(
            host.chars().take(300).collect(),
        ));
    }
    Ok(Some(Origin {
        host,
        repository: repository.to_string(),
    }))
}

/// The mirror's request handler.
pub struct Mirror {
    cache: Arc<Cache>,
    upstreams: Upstreams,
}

/// What a request path asks for ([`route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Base,
    Metrics,
    Manifest { name: &'a str, reference: &'a str },
    Blob { name: &'a str, digest: &'a str },
    Write,
    Unknown,
}

/// Routes a request by method and URL path (not yet checked: see [`check_manifest_request`] and
/// [`check_blob_request`]).
pub fn route<'a>(method: &Method, path: &'a str) -> Route<'a> {
    if path == "/metrics" {
        return Route::Metrics;
    }
    if path == "/v2/" || path == "/v2" {
        return Route::Base;
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Route::Unknown;
    };
    if !matches!(*method, Method::GET | Method::HEAD) {
        return Route::Write;
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        return Route::Manifest { name, reference };
    }
    if rest.contains("/blobs/uploads") {
        return Route::Write;
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        return Route::Blob { name, digest };
    }
    Route::Unknown
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn error_response(e: &MirrorError, blob: bool, head: bool) -> Response<Body> {
    let (status, code) = e.status_and_code(blob);
    let message = crate::audit::cap(e.to_string());
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    let mut r = Response::new(if head { empty() } else { full(body) });
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `bytes=A-B`, `bytes=A-`, `bytes=-N` against a blob of `size` bytes → `[start, end)`.
pub fn parse_range(value: &str, size: u64) -> Result<(u64, u64), MirrorError> {
    let bad = || MirrorError::Range(value.chars().take(100).collect());
    let spec = value.trim().strip_prefix("bytes=").ok_or_else(bad)?;
    if spec.contains(',') {
        return Err(bad());
    }
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| bad())?;
        if n == 0 {
            return Err(bad());
        }
        (size.saturating_sub(n), size)
    } else {
        let start: u64 = a.parse().map_err(|_| bad())?;
        let end = if b.is_empty() {
            size
        } else {
            b.parse::<u64>()
                .map_err(|_| bad())?
                .saturating_add(1)
                .min(size)
        };
        (start, end)
    };
    if start >= end || start >= size {
        return Err(bad());
    }
    Ok((start, end))
}

impl Mirror {
    pub fn new(cache: Arc<Cache>, upstreams: Upstreams) -> Self {
        Self { cache, upstreams }
    }

    /// Handles one request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body> {
        let method = req.method().clone();
        let head = method == Method::HEAD;
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let (kind, response) = match route(&method, &path) {
            Route::Base => {
                let mut r = Response::new(if head { empty() } else { full("{}") });
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                ("other", r)
            }
            Route::Metrics => {
                let mut r = Response::new(full(crate::metrics::metrics().encode()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                ("other", r)
            }
            Route::Manifest { name, reference } => (
                "manifest",
                self.manifest(name, reference, &query, head)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!(name, reference, error = %e, "manifest request failed");
                        error_response(&e, false, head)
                    }),
            ),
            Route::Blob { name, digest } => {
                let range = req
                    .headers()
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                (
                    "blob",
                    self.blob(name, digest, &query, head, range.as_deref())
                        .await
                        .unwrap_or_else(|e| {
                            tracing::warn!(name, digest, error = %e, "blob request failed");
                            error_response(&e, true, head)
                        }),
                )
            }
            Route::Write => (
                "other",
                error_response(
                    &MirrorError::Unsupported(format!("{method} {path}")),
                    false,
                    head,
                ),
            ),
            Route::Unknown => (
                "other",
                error_response(&MirrorError::NotFound(path.clone()), false, head),
            ),
        };
        let mut response = response;
        tracing::debug!(%method, path, query, status = response.status().as_u16(), "mirror request");
        response.headers_mut().insert(
            "docker-distribution-api-version",
            HeaderValue::from_static("registry/2.0"),
        );
        crate::metrics::metrics()
            .mirror_requests
            .get_or_create(&crate::metrics::MirrorLabels {
                kind: kind.to_string(),
                code: response.status().as_u16().to_string(),
            })
            .inc();
        response
    }

    /// The upstream and repository of a request for `name` (already checked by
    /// [`check_name`]); see [`request_upstream`].
    fn origin(&self, name: &str, query: &str) -> Result<Option<Origin>, MirrorError> {
        request_upstream(&self.upstreams, name, query)
    }

    #[tracing::instrument(skip(self, query, head))]
    async fn manifest(
        &self,
        name: &str,
        reference: &str,
        query: &str,
        head: bool,
    ) -> Result<Response<Body>, MirrorError> {
        check_manifest_request(name, reference)?;
        let origin = self.origin(name, query)?;
        let m = self.cache.manifest(origin.as_ref(), reference).await?;
        let len = m.bytes.len();
        let mut r = Response::new(if head { empty() } else { full(m.bytes) });
        let h = r.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&m.media_type) {
            h.insert(header::CONTENT_TYPE, v);
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        if let Ok(v) = HeaderValue::from_str(m.digest.as_str()) {
            h.insert("docker-content-digest", v.clone());
            h.insert(header::ETAG, v);
        }
        Ok(r)
    }

    #[tracing::instrument(skip(self, query, head, range))]
    async fn blob(
        &self,
        name: &str,
        digest: &str,
        query: &str,
        head: bool,
        range: Option<&str>,
    ) -> Result<Response<Body>, MirrorError> {
        let digest = check_blob_request(name, digest)?;
        let origin = self.origin(name, query)?;
        let mut blob = self.cache.blob(&digest, origin.as_ref()).await?;
        if (range.is_some() || blob.size.is_none()) && !blob.from_cache {
            // Ranges are served from complete blobs, and so is a blob the upstream sent without
            // a length: a body without Content-Length ends with the connection for an HTTP/1.0
            // client, which could not tell a download cut short for a bad digest from the end.
            // Finish the download first.
            if let Some(o) = origin.as_ref() {
                self.cache.ensure(&digest, o).await?;
            }
            blob = self.cache.blob(&digest, origin.as_ref()).await?;
        }
        let size = blob.size;
        let (status, start, end) = match (range, size) {
            (Some(r), Some(size)) => {
                let (s, e) = parse_range(r, size)?;
                (StatusCode::PARTIAL_CONTENT, s, Some(e))
            }
            _ => (StatusCode::OK, 0, size),
        };
        let mut r = Response::new(if head {
            empty()
        } else {
            body_of(blob, start, end)
        });
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        if let Some(end) = end {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
        }
        if status == StatusCode::PARTIAL_CONTENT {
            if let (Some(size), Some(end)) = (size, end) {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1)) {
                    h.insert(header::CONTENT_RANGE, v);
                }
            }
        }
        if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
            h.insert("docker-content-digest", v.clone());
            h.insert(header::ETAG, v);
        }
        Ok(r)
    }
}

fn body_of(blob: Blob, start: u64, end: Option<u64>) -> Body {
    let rx = blob.into_stream(start, end);
    let stream =
        tokio_stream::wrappers::ReceiverStream::new(rx).map(|r| r.map(hyper::body::Frame::data));
    http_body_util::BodyExt::boxed(StreamBody::new(stream))
}

/// Serves `mirror` on `listener` (HTTP/1.1 and h2c) until `shutdown`, then drains for at most
/// `grace`.
pub async fn serve(
    listener: TcpListener,
    mirror: Arc<Mirror>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let serve = |stream, graceful: &hyper_util::server::graceful::GracefulShutdown| {
        let mirror = mirror.clone();
        let svc = hyper::service::service_fn(move |req| {
            let mirror = mirror.clone();
            async move { Ok::<_, Infallible>(mirror.handle(req).await) }
        });
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned(),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "mirror connection ended");
            }
        });
    };
    crate::accept::serve_until("mirror", listener, serve, shutdown, grace).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_request_checks() {
        let d = format!("sha256:{}", "a".repeat(64));
        let path = format!("/v2/library/busybox/manifests/{d}");
        assert_eq!(
            route(&Method::GET, &path),
            Route::Manifest {
                name: "library/busybox",
                reference: &d
            }
        );
        assert_eq!(
            route(&Method::HEAD, "/v2/a/b/blobs/x"),
            Route::Blob {
                name: "a/b",
                digest: "x"
            }
        );
        assert_eq!(route(&Method::PUT, "/v2/a/manifests/t"), Route::Write);
        assert_eq!(route(&Method::GET, "/v2/a/blobs/uploads/"), Route::Write);
        assert_eq!(route(&Method::GET, "/v2"), Route::Base);
        assert_eq!(route(&Method::GET, "/x"), Route::Unknown);
        assert!(check_manifest_request("library/busybox", "1.36").is_ok());
        assert!(check_manifest_request("library/busybox", &d).is_ok());
        assert!(check_manifest_request("library/busybox", "sha256:abc").is_err());
        assert!(check_manifest_request("library/busybox", ".x").is_err());
        assert!(check_manifest_request("../etc", "v1").is_err());
        assert_eq!(check_blob_request("a", &d).expect("ok").as_str(), d);
        assert!(check_blob_request("a", "sha256:../../x").is_err());
        assert_eq!(ns_param("ns=Docker.IO").as_deref(), Some("docker.io"));
        assert_eq!(ns_param("x=1"), None);
    }

    #[test]
    fn names_ranges_and_upstreams() {
        assert!(check_name("library/busybox").is_ok());
        assert!(check_name("a/b-c/d_e.f").is_ok());
        for bad in [
            "",
            "UP",
            "a//b",
            "../x",
            "a/../b",
            "-a",
            "a/",
            &"a".repeat(300),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(
            query_param("ns=127.0.0.1%3A5000&x=1", "ns").as_deref(),
            Some("127.0.0.1:5000")
        );
        assert_eq!(query_param("a=b", "ns"), None);
        assert_eq!(parse_range("bytes=0-9", 100).expect("r"), (0, 10));
        assert_eq!(parse_range("bytes=90-", 100).expect("r"), (90, 100));
        assert_eq!(parse_range("bytes=-10", 100).expect("r"), (90, 100));
        assert_eq!(parse_range("bytes=50-500", 100).expect("r"), (50, 100));
        assert!(parse_range("bytes=100-", 100).is_err());
        assert!(parse_range("bytes=0-1,5-6", 100).is_err());
        assert!(parse_range("items=0-1", 100).is_err());
        let u = Upstreams::new(
            &["http://127.0.0.1:5000".into(), "https://r.example".into()],
            &[],
        )
        .expect("ok");
        assert!(u.allows("127.0.0.1:5000") && u.allows("r.example"));
        assert!(!u.allows("evil.example"));
        assert_eq!(u.plain_http_hosts(), vec!["127.0.0.1:5000".to_string()]);
        assert!(Upstreams::new(&["ftp://x".into()], &[]).is_err());
        assert!(Upstreams::new(&["http://x/path".into()], &[]).is_err());
    }

    #[test]
    fn upstream_from_ns_or_path_prefix() {
        let two =
            Upstreams::new(&["https://r.example".into()], &["127.0.0.1:5000".into()]).expect("ok");
        let origin = |host: &str, repository: &str| {
            Some(Origin {
                host: host.into(),
                repository: repository.into(),
            })
        };
        let code = |r: Result<Option<Origin>, MirrorError>| {
            let e = r.expect_err("refused");
            let (status, code) = e.status_and_code(false);
            (status.as_u16(), code, e.to_string())
        };
        // containerd: ns names the upstream, the path is the repository (as before).
        assert_eq!(
            request_upstream(&two, "team/app", "ns=127.0.0.1%3A5000").expect("ok"),
            origin("127.0.0.1:5000", "team/app")
        );
        // CRI-O: the path prefix names it; the repository is what follows.
        assert_eq!(
            request_upstream(&two, "imagestream--upstream/127.0.0.1_5000/team/app", "")
                .expect("ok"),
            origin("127.0.0.1:5000", "team/app")
        );
        assert_eq!(
            request_upstream(&two, "imagestream--upstream/r.example/app", "").expect("ok"),
            origin("r.example", "app")
        );
        // Neither, with two upstreams: the cache alone.
        assert_eq!(request_upstream(&two, "team/app", "").expect("ok"), None);
        // Neither, with one upstream: that one.
        let one = Upstreams::new(&[], &["127.0.0.1:5000".into()]).expect("ok");
        assert_eq!(
            request_upstream(&one, "team/app", "").expect("ok"),
            origin("127.0.0.1:5000", "team/app")
        );
        // A registry not allowed is refused the same way, however it is named.
        let (status, c, msg) = code(request_upstream(
            &two,
            "imagestream--upstream/evil.example/app",
            "",
        ));
        assert_eq!((status, c), (403, "DENIED"));
        assert!(msg.contains("\"evil.example\""), "{msg}");
        assert_eq!(
            code(request_upstream(&two, "app", "ns=evil.example")).0,
            403
        );
        // The prefix is refused even with one upstream when it names another.
        assert_eq!(
            code(request_upstream(
                &one,
                "imagestream--upstream/r.example/app",
                ""
            ))
            .0,
            403
        );
        // Both ns and a prefix: ambiguous.
        let (status, c, msg) = code(request_upstream(
            &two,
            "imagestream--upstream/127.0.0.1_5000/app",
            "ns=127.0.0.1%3A5000",
        ));
        assert_eq!((status, c), (400, "NAME_INVALID"));
        assert!(msg.contains("named twice"), "{msg}");
        // A name under the marker that does not spell HOST/REPOSITORY.
        for bad in [
            "imagestream--upstream/app",
            "imagestream--upstream/127.0.0.1_05000/app",
            "imagestream--upstream/a_b_c/app",
        ] {
            let (status, c, msg) = code(request_upstream(&two, bad, ""));
            assert_eq!((status, c), (400, "NAME_INVALID"), "{bad}");
            assert!(msg.contains("HOST[_PORT]/REPOSITORY"), "{msg}");
        }
        // Ordinary names that merely look alike are ordinary names.
        assert_eq!(
            request_upstream(&one, "imagestream--upstreams/x/app", "").expect("ok"),
            origin("127.0.0.1:5000", "imagestream--upstreams/x/app")
        );
        // The full request path routes as usual and the whole name is checked first.
        let d = format!("sha256:{}", "b".repeat(64));
        let path = format!("/v2/imagestream--upstream/127.0.0.1_5000/team/app/blobs/{d}");
        let Route::Blob { name, digest } = route(&Method::GET, &path) else {
            panic!("not a blob route");
        };
        assert!(check_blob_request(name, digest).is_ok());
        assert_eq!(
            request_upstream(&two, name, "").expect("ok"),
            origin("127.0.0.1:5000", "team/app")
        );
        assert!(check_name("imagestream--upstream/127.0.0.1:5000/app").is_err());
    }
}
