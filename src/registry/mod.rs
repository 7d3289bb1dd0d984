//! The registry client used to pin tags: resolves a source reference to the sha256 digest of
//! its manifest (or index), and verifies the manifest before anything is pinned: its bytes must
//! hash to the digest asked for and to the `Docker-Content-Digest` the registry claims, its
//! `mediaType` must agree with the `Content-Type` it was served with, and it may not exceed
//! [`MAX_MANIFEST_BYTES`] (enforced while reading: a larger body is never buffered).
//!
//! It also fetches manifests and blob streams for the layer cache ([`crate::cache`]): the
//! caller verifies blob bytes as they stream; manifests are verified here.
//!
//! Requests go through this module's own HTTP client ([`reqwest`], the one oci-client uses);
//! oci-client does only the token handshake when a registry answers 401 with a `Bearer`
//! challenge. Registries are reached over HTTPS, except the hosts configured as insecure
//! (plain HTTP).
//!
//! **Credentials** come from a docker `config.json` ([`auth`]) and are sent only to their own
//! registry: after a redirect to another host, port or scheme (a blob store, a hostile
//! registry) the HTTP client drops `Authorization` (tested in `tests/hostile.rs`). **Foreign
//! layers** (`urls` in a layer descriptor) are never followed: blobs are fetched by digest from
//! the registry only, so no request, with or without credentials, goes to a URL a manifest
//! names.
//!
//! **Deadlines** (a registry that accepts connections and never answers, a very slow link):
//! [`CONNECT_TIMEOUT`] to connect, [`RESPONSE_TIMEOUT`] from sending a request to the response
//! head, [`READ_TIMEOUT`] between two reads of a body, and [`MANIFEST_DEADLINE`] for a whole
//! manifest fetch or pin (handshake, redirects and body included). A blob that keeps arriving,
//! however slowly, is not cut off. Error bodies are read up to [`MAX_ERROR_BODY_BYTES`].
//!
//! **Errors**: an unreachable registry, a timeout, and a 5xx/429 answer are
//! [`RegistryError::Unreachable`], whose message starts with [`REGISTRY_UNAVAILABLE`] — the
//! kubelet's convention (`k8s.io/cri-api/pkg/errors.ErrRegistryUnavailable`: a PullImage error
//! with gRPC code `Unknown` whose message starts with `RegistryUnavailable` is reported as "the
//! registry is unavailable").

pub mod auth;
pub mod digest;

pub use digest::Digest;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::TryStreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use reqwest::header::{self, HeaderValue};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;

/// What is percent-encoded in a query value: everything but RFC 3986's unreserved characters
/// (so `application/vnd.dev.cosign…` keeps its dots and dashes: a registry comparing the raw
/// query text still matches it).
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The manifest media types asked for when pinning: OCI image, OCI index, Docker v2 manifest
/// and Docker manifest list.
pub const ACCEPTED_MANIFEST_TYPES: [&str; 4] = [
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Longest image reference accepted.
pub const MAX_REFERENCE_LEN: usize = 4096;

/// Largest manifest accepted from a registry (checked against `Content-Length` and while
/// reading).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Largest error body read from a registry (the rest is not read).
pub const MAX_ERROR_BODY_BYTES: usize = 64 << 10;

/// Error-body text quoted in an error message.
pub const MAX_QUOTED_ERROR_BODY: usize = 512;

/// Time allowed to connect to a registry.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed from sending a request to the response head (status and headers).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// Time allowed between reads from a registry (an idle body).
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for a whole manifest fetch or pin: token handshake, redirects and body.
pub const MANIFEST_DEADLINE: Duration = Duration::from_secs(30);
/// Redirects followed per request.
pub const MAX_REDIRECTS: usize = 5;

/// The prefix of every message about a registry that cannot be reached or answers 5xx: the
/// kubelet's `ErrRegistryUnavailable` (`k8s.io/cri-api/pkg/errors`).
pub const REGISTRY_UNAVAILABLE: &str = "RegistryUnavailable";

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("invalid image reference {reference:?}: {message}")]
    InvalidReference { reference: String, message: String },
    #[error("manifest {reference} not found in its registry")]
    NotFound { reference: String },
    #[error("registry refused access to {reference}: {message}")]
    Unauthorized { reference: String, message: String },
    /// Unreachable, timed out, or answered 5xx/429.
    #[error("{REGISTRY_UNAVAILABLE}: registry for {reference} is unreachable: {message}")]
    Unreachable { reference: String, message: String },
    #[error("manifest of {reference} does not match its digest: {message}; nothing was pinned")]
    DigestMismatch { reference: String, message: String },
    #[error(
        "manifest of {reference} is over the {MAX_MANIFEST_BYTES}-byte limit ({size} bytes or \
         more); it was not read further"
    )]
    TooLarge { reference: String, size: u64 },
    /// Well-hashed bytes that are not an acceptable manifest (e.g. its `mediaType` differs
    /// from the `Content-Type` it was served with).
    #[error("manifest of {reference} is not valid: {message}; nothing was pinned")]
    InvalidManifest { reference: String, message: String },
    #[error("registry error for {reference}: {message}")]
    Other { reference: String, message: String },
}

impl RegistryError {
    /// Whether the registry misbehaved (unreachable, 5xx, bad bytes) rather than answered
    /// (not found, refused): a cached answer may then stand in for it.
    pub fn is_upstream_fault(&self) -> bool {
        matches!(
            self,
            RegistryError::Unreachable { .. }
                | RegistryError::DigestMismatch { .. }
                | RegistryError::TooLarge { .. }
                | RegistryError::InvalidManifest { .. }
                | RegistryError::Other { .. }
        )
    }
}

/// A manifest pinned by digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedManifest {
    /// `sha256:<hex>`.
    pub digest: String,
    /// `registry/repository@sha256:<hex>`.
    pub reference: String,
}

/// A manifest fetched and verified.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub digest: Digest,
    pub media_type: String,
}

/// A blob body as it arrives; the caller hashes it.
pub struct BlobStream {
    pub content_length: Option<u64>,
    pub stream: BoxStream<'static, std::io::Result<Bytes>>,
}

#[derive(Clone)]
pub struct RegistryClient {
    /// The token handshake only.
    client: Client,
    http: reqwest::Client,
    insecure: Arc<Vec<String>>,
    credentials: Arc<auth::Credentials>,
    /// `Authorization` values that worked, by `registry/repository`.
    authorizations: Arc<Mutex<HashMap<String, HeaderValue>>>,
}

impl RegistryClient {
    /// A client that speaks plain HTTP to `insecure_registries` (`HOST:PORT`) and HTTPS to
    /// every other registry, anonymously.
    pub fn new(insecure_registries: &[String]) -> Self {
        Self::with_credentials(insecure_registries, auth::Credentials::none())
    }

    /// Like [`RegistryClient::new`], presenting `credentials` to the registries they are for.
    pub fn with_credentials(
        insecure_registries: &[String],
        credentials: auth::Credentials,
    ) -> Self {
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure_registries.to_vec()),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(RESPONSE_TIMEOUT),
            platform_resolver: None,
            ..ClientConfig::default()
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .user_agent(concat!("imagestream/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot build the registry HTTP client; using defaults");
                reqwest::Client::new()
            });
        Self {
            client: Client::new(config),
            http,
            insecure: Arc::new(insecure_registries.to_vec()),
            credentials: Arc::new(credentials),
            authorizations: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn auth_for(&self, reference: &Reference) -> RegistryAuth {
        self.credentials.for_host(reference.registry())
    }

    fn url(&self, image: &Reference, kind: &str, reference: &str) -> String {
        let registry = image.resolve_registry();
        let scheme = if self.insecure.iter().any(|h| h == registry) {
            "http"
        } else {
            "https"
        };
        format!(
            "{scheme}://{registry}/v2/{}/{kind}/{reference}",
            image.repository()
        )
    }

    /// Sends one request, bounded by [`RESPONSE_TIMEOUT`] until the response head.
    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        accept: Option<&str>,
        authorization: Option<&HeaderValue>,
        source: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut request = self.http.request(method, url);
        if let Some(a) = accept {
            request = request.header(header::ACCEPT, a);
        }
        if let Some(a) = authorization {
            let mut a = a.clone();
            a.set_sensitive(true);
            request = request.header(header::AUTHORIZATION, a);
        }
        match tokio::time::timeout(RESPONSE_TIMEOUT, request.send()).await {
            Err(_) => Err(RegistryError::Unreachable {
                reference: source.to_string(),
                message: format!("no response from {url} within {RESPONSE_TIMEOUT:?}"),
            }),
            Ok(Err(e)) if e.is_redirect() => Err(RegistryError::Other {
                reference: source.to_string(),
                message: crate::audit::error_chain(&e),
            }),
            Ok(Err(e)) => Err(RegistryError::Unreachable {
                reference: source.to_string(),
                message: crate::audit::error_chain(&e),
            }),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// Sends a request with the `Authorization` that worked before for this repository; on a
    /// 401, answers the registry's challenge once (basic credentials, or a token from
    /// oci-client's handshake) and sends it again. Non-200 answers become errors.
    async fn request(
        &self,
        method: reqwest::Method,
        image: &Reference,
        url: &str,
        accept: Option<&str>,
        source: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let key = format!("{}/{}", image.resolve_registry(), image.repository());
        let cached = lock(&self.authorizations).get(&key).cloned();
        let mut response = self
            .send(method.clone(), url, accept, cached.as_ref(), source)
            .await?;
        if response.status() == reqwest::StatusCode::UNAUTHORIZED {
            let challenge = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            if let Some(authorization) = self.answer(image, &challenge, source).await? {
                lock(&self.authorizations).insert(key, authorization.clone());
                response = self
                    .send(method, url, accept, Some(&authorization), source)
                    .await?;
            }
        }
        check_status(response, url, source).await
    }

    /// The `Authorization` answering `challenge` with this registry's credentials, if any.
    async fn answer(
        &self,
        image: &Reference,
        challenge: &str,
        source: &str,
    ) -> Result<Option<HeaderValue>, RegistryError> {
        use base64::Engine as _;
        let auth = self.auth_for(image);
        let scheme = challenge
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let value = match (scheme.as_str(), &auth) {
            ("basic", RegistryAuth::Basic(u, p)) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )),
            ("bearer", _) => {
                let token = tokio::time::timeout(
                    RESPONSE_TIMEOUT,
                    self.client.auth(image, &auth, RegistryOperation::Pull),
                )
                .await
                .map_err(|_| RegistryError::Unreachable {
                    reference: source.to_string(),
                    message: format!("no token within {RESPONSE_TIMEOUT:?}"),
                })?
                .map_err(|e| RegistryError::Unauthorized {
                    reference: source.to_string(),
                    message: crate::audit::error_chain(&e),
                })?;
                token.map(|t| format!("Bearer {t}"))
            }
            _ => None,
        };
        Ok(value.and_then(|v| HeaderValue::from_str(&v).ok()))
    }

    /// GETs and verifies the manifest `image` names, reading at most [`MAX_MANIFEST_BYTES`],
    /// all within [`MANIFEST_DEADLINE`].
    async fn get_manifest(
        &self,
        image: &Reference,
        source: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        let fetch = async {
            let reference = image
                .digest()
                .or(image.tag())
                .unwrap_or("latest")
                .to_string();
            let url = self.url(image, "manifests", &reference);
            let accept = ACCEPTED_MANIFEST_TYPES.join(", ");
            let response = self
                .request(reqwest::Method::GET, image, &url, Some(&accept), source)
                .await?;
            let too_large = |size: u64| RegistryError::TooLarge {
                reference: source.to_string(),
                size,
            };
            if let Some(n) = response.content_length() {
                if n > MAX_MANIFEST_BYTES as u64 {
                    return Err(too_large(n));
                }
            }
            let headers = response.headers().clone();
            let (bytes, over) = read_capped(response, MAX_MANIFEST_BYTES, source).await?;
            if over {
                return Err(too_large(bytes.len() as u64 + 1));
            }
            verify_manifest(image, source, &headers, bytes.into())
        };
        match tokio::time::timeout(MANIFEST_DEADLINE, fetch).await {
            Ok(r) => r,
            Err(_) => Err(RegistryError::Unreachable {
                reference: source.to_string(),
                message: format!("no complete manifest within {MANIFEST_DEADLINE:?}"),
            }),
        }
    }

    /// Fetches the manifest `host/repository:reference` (a tag or a digest), verifying that its
    /// bytes hash to the digest asked for and to the digest the registry claims.
    #[tracing::instrument(skip(self), fields(digest))]
    pub async fn fetch_manifest(
        &self,
        host: &str,
        repository: &str,
        reference: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        let source = if reference.starts_with("sha256:") {
            format!("{host}/{repository}@{reference}")
        } else {
            format!("{host}/{repository}:{reference}")
        };
        let image = Self::parse(&source)?;
        let fetched = self.get_manifest(&image, &source).await?;
        tracing::Span::current().record("digest", fetched.digest.as_str());
        Ok(fetched)
    }

    /// The digest `source` points at now, by a HEAD request where the registry answers with
    /// `Docker-Content-Digest` (else by GET, verified). Not verified on HEAD: use it only to
    /// see that nothing changed, and [`RegistryClient::pin`] otherwise.
    pub async fn head_digest(&self, source: &str) -> Result<String, RegistryError> {
        let image = Self::parse(source)?;
        let reference = image.digest().or(image.tag()).unwrap_or("latest");
        let url = self.url(&image, "manifests", reference);
        let accept = ACCEPTED_MANIFEST_TYPES.join(", ");
        let head = tokio::time::timeout(
            MANIFEST_DEADLINE,
            self.request(reqwest::Method::HEAD, &image, &url, Some(&accept), source),
        )
        .await
        .map_err(|_| RegistryError::Unreachable {
            reference: source.to_string(),
            message: format!("no answer to HEAD within {MANIFEST_DEADLINE:?}"),
        })??;
        let claimed = head
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let digest = match claimed {
            Some(d) => d,
            None => self.get_manifest(&image, source).await?.digest.to_string(),
        };
        check_sha256_digest(&digest).map_err(|message| RegistryError::Other {
            reference: source.to_string(),
            message,
        })?;
        Ok(digest)
    }

    /// Opens the blob `host/repository@digest` as a stream. The bytes are not verified here.
    /// Only the registry is asked (never a foreign layer's `urls`); a redirect is followed
    /// without credentials when it leaves the registry's host and port.
    #[tracing::instrument(skip(self))]
    pub async fn fetch_blob(
        &self,
        host: &str,
        repository: &str,
        digest: &Digest,
    ) -> Result<BlobStream, RegistryError> {
        let source = format!("{host}/{repository}@{digest}");
        let image = Self::parse(&source)?;
        let url = self.url(&image, "blobs", digest.as_str());
        let response = self
            .request(reqwest::Method::GET, &image, &url, None, &source)
            .await?;
        Ok(BlobStream {
            content_length: response.content_length(),
            stream: Box::pin(response.bytes_stream().map_err(std::io::Error::other)),
        })
    }

    /// The OCI 1.1 referrers index of `host/repository@digest` with artifact type
    /// `artifact_type` (at most [`MAX_MANIFEST_BYTES`], within [`MANIFEST_DEADLINE`]);
    /// `Ok(None)` when the registry has no referrers API (it answers 404). The index is made up
    /// by the registry, so there is no digest to check it against: its entries are.
    pub async fn referrers(
        &self,
        host: &str,
        repository: &str,
        digest: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Bytes>, RegistryError> {
        let source = format!("{host}/{repository}@{digest}");
        let image = Self::parse(&source)?;
        let url = format!(
            "{}?artifactType={}",
            self.url(&image, "referrers", digest.as_str()),
            percent_encoding::utf8_percent_encode(artifact_type, QUERY_VALUE)
        );
        let fetch = async {
            let response = match self
                .request(
                    reqwest::Method::GET,
                    &image,
                    &url,
                    Some(OCI_IMAGE_INDEX_MEDIA_TYPE),
                    &source,
                )
                .await
            {
                Ok(r) => r,
                Err(RegistryError::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let (bytes, over) = read_capped(response, MAX_MANIFEST_BYTES, &source).await?;
            if over {
                return Err(RegistryError::TooLarge {
                    reference: source.clone(),
                    size: bytes.len() as u64 + 1,
                });
            }
            Ok(Some(Bytes::from(bytes)))
        };
        tokio::time::timeout(MANIFEST_DEADLINE, fetch)
            .await
            .map_err(|_| RegistryError::Unreachable {
                reference: source.clone(),
                message: format!("no referrers answer within {MANIFEST_DEADLINE:?}"),
            })?
    }

    /// Parses `source` as an image reference (docker's normalisation: `nginx` is
    /// `docker.io/library/nginx:latest`).
    pub fn parse(source: &str) -> Result<Reference, RegistryError> {
        let invalid = |message: String| RegistryError::InvalidReference {
            reference: source.to_string(),
            message,
        };
        if source.len() > MAX_REFERENCE_LEN {
            return Err(invalid(format!(
                "longer than {MAX_REFERENCE_LEN} characters"
            )));
        }
        let reference = source
            .parse::<Reference>()
            .map_err(|e| invalid(e.to_string()))?;
        // The distribution grammar allows only lowercase repository names.
        if reference
            .repository()
            .chars()
            .any(|c| c.is_ascii_uppercase())
        {
            return Err(invalid(format!(
                "repository name {:?} must be lowercase",
                reference.repository()
            )));
        }
        Ok(reference)
    }

    /// Resolves `source` to the digest of its manifest now, verifying the bytes.
    #[tracing::instrument(skip(self), fields(digest))]
    pub async fn pin(&self, source: &str) -> Result<PinnedManifest, RegistryError> {
        let reference = Self::parse(source)?;
        if let Some(d) = reference.digest() {
            check_sha256_digest(d).map_err(|message| RegistryError::InvalidReference {
                reference: source.to_string(),
                message,
            })?;
        }
        let fetched = self.get_manifest(&reference, source).await?;
        let computed = fetched.digest.to_string();
        tracing::Span::current().record("digest", computed.as_str());
        Ok(PinnedManifest {
            reference: format!(
                "{}/{}@{}",
                reference.registry(),
                reference.repository(),
                computed
            ),
            digest: computed,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads a body up to `cap` bytes; `true` when there was more (not read).
async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
    source: &str,
) -> Result<(Vec<u8>, bool), RegistryError> {
    let mut out = Vec::new();
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|e| RegistryError::Unreachable {
                reference: source.to_string(),
                message: format!("reading the body: {}", crate::audit::error_chain(&e)),
            })?;
        let Some(chunk) = chunk else {
            return Ok((out, false));
        };
        if out.len() + chunk.len() > cap {
            let room = cap - out.len();
            out.extend_from_slice(&chunk[..room]);
            return Ok((out, true));
        }
        out.extend_from_slice(&chunk);
    }
}

/// `response` if it is a 200; else the error it stands for, quoting at most
/// [`MAX_QUOTED_ERROR_BODY`] bytes of an error body read up to [`MAX_ERROR_BODY_BYTES`].
async fn check_status(
    response: reqwest::Response,
    url: &str,
    source: &str,
) -> Result<reqwest::Response, RegistryError> {
    let status = response.status();
    if status == reqwest::StatusCode::OK {
        return Ok(response);
    }
    let reference = source.to_string();
    let final_url = response.url().to_string();
    let body = if status.is_success() {
        Vec::new()
    } else {
        read_capped(response, MAX_ERROR_BODY_BYTES, source)
            .await
            .map(|(b, _)| b)
            .unwrap_or_default()
    };
    let text: String = String::from_utf8_lossy(&body)
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_QUOTED_ERROR_BODY)
        .collect();
    let at = if final_url == url {
        url.to_string()
    } else {
        format!("{url} (redirected to {final_url})")
    };
    let message = format!("HTTP {status} from {at}: {}", text.trim());
    let unknown = ["MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN"]
        .iter()
        .any(|c| text.contains(c));
    Err(match status.as_u16() {
        404 => RegistryError::NotFound { reference },
        401 | 403 => RegistryError::Unauthorized { reference, message },
        408 | 429 | 500..=599 => RegistryError::Unreachable { reference, message },
        400..=499 if unknown => RegistryError::NotFound { reference },
        _ => RegistryError::Other { reference, message },
    })
}

/// Checks fetched manifest `bytes`: the digest asked for, the `Docker-Content-Digest` claimed,
/// and `mediaType` against `Content-Type`.
fn verify_manifest(
    image: &Reference,
    source: &str,
    headers: &reqwest::header::HeaderMap,
    bytes: Bytes,
) -> Result<FetchedManifest, RegistryError> {
    let mismatch = |message: String| RegistryError::DigestMismatch {
        reference: source.to_string(),
        message,
    };
    let computed = Digest::of(&bytes);
    if let Some(wanted) = image.digest() {
        if wanted != computed.as_str() {
            return Err(mismatch(format!(
                "asked for {wanted}, the bytes hash to {computed}"
            )));
        }
    }
    let claimed = headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if let Some(claimed) = claimed.filter(|c| c.starts_with("sha256:")) {
        if claimed != computed.as_str() {
            return Err(mismatch(format!(
                "the registry claims {claimed} (Docker-Content-Digest), the bytes hash to \
                 {computed}"
            )));
        }
    }
    let invalid = |message: String| RegistryError::InvalidManifest {
        reference: source.to_string(),
        message: format!("{computed}: {message}"),
    };
    let declared = probe_media_type(&bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty());
    if let (Some(declared), Some(served)) = (declared.as_deref(), content_type.as_deref()) {
        if ACCEPTED_MANIFEST_TYPES.contains(&served) && declared != served {
            return Err(invalid(format!(
                "served as Content-Type {served}, its mediaType says {declared}"
            )));
        }
    }
    Ok(FetchedManifest {
        media_type: manifest_media_type(&bytes),
        bytes,
        digest: computed,
    })
}

/// The `mediaType` field of a JSON object (`None` when absent or empty).
fn probe_media_type(bytes: &[u8]) -> Result<Option<String>, String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(bytes)
        .map(|p| p.media_type.filter(|t| !t.is_empty()))
        .map_err(|e| e.to_string())
}

/// The media type of manifest `bytes`: its `mediaType` field, else OCI index when it lists
/// `manifests`, else OCI image manifest.
pub fn manifest_media_type(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde::de::IgnoredAny>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe {
            media_type: Some(t),
            ..
        }) if !t.is_empty() => t,
        Ok(Probe {
            manifests: Some(_), ..
        }) => OCI_IMAGE_INDEX_MEDIA_TYPE.to_string(),
        _ => OCI_IMAGE_MEDIA_TYPE.to_string(),
    }
}

/// Checks that `digest` is `sha256:` followed by 64 lowercase hex digits.
pub fn check_sha256_digest(digest: &str) -> Result<(), String> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "digest {digest:?} is not sha256: followed by 64 lowercase hex digits"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        assert!(check_sha256_digest(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(check_sha256_digest("sha256:abc").is_err());
        assert!(check_sha256_digest(&format!("sha512:{}", "a".repeat(64))).is_err());
        assert!(check_sha256_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
    }

    #[test]
    fn parse_normalises() {
        let r = RegistryClient::parse("nginx").expect("parses");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/nginx");
        assert!(RegistryClient::parse("bad ref:x").is_err());
        assert!(RegistryClient::parse("r.io/UPPER/case:x").is_err());
        assert!(RegistryClient::parse(&"a".repeat(5000)).is_err());
        assert!(RegistryClient::parse("").is_err());
    }
}
