//! The registry client used to pin tags: resolves a source reference to the sha256 digest of
//! its manifest (or index) through oci-client, and verifies that the manifest bytes hash to the
//! digest the registry claims before anything is pinned.
//!
//! It also fetches manifests and blob streams for the layer cache ([`crate::cache`]): the
//! caller verifies blob bytes as they stream; manifests are verified here.
//!
//! Registries are reached over HTTPS, except the hosts configured as insecure (plain HTTP).
//! Credentials come from a docker `config.json` ([`auth`]) and are sent only to their own
//! registry (the HTTP client drops `Authorization` on a redirect to another host).

pub mod auth;
pub mod digest;

pub use digest::Digest;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

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

/// Largest manifest accepted from a registry.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Time allowed to connect to a registry.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed between reads from a registry.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("invalid image reference {reference:?}: {message}")]
    InvalidReference { reference: String, message: String },
    #[error("manifest {reference} not found in its registry")]
    NotFound { reference: String },
    #[error("registry refused access to {reference}: {message}")]
    Unauthorized { reference: String, message: String },
    #[error("registry for {reference} is unreachable: {message}")]
    Unreachable { reference: String, message: String },
    #[error("manifest of {reference} does not match its digest: {message}; nothing was pinned")]
    DigestMismatch { reference: String, message: String },
    #[error("manifest of {reference} is {size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")]
    TooLarge { reference: String, size: usize },
    #[error("registry error for {reference}: {message}")]
    Other { reference: String, message: String },
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
    client: Client,
    credentials: Arc<auth::Credentials>,
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
            read_timeout: Some(READ_TIMEOUT),
            platform_resolver: None,
            ..ClientConfig::default()
        };
        Self {
            client: Client::new(config),
            credentials: Arc::new(credentials),
        }
    }

    fn auth_for(&self, reference: &Reference) -> RegistryAuth {
        self.credentials.for_host(reference.registry())
    }

    /// Fetches the manifest `host/repository:reference` (a tag or a digest), verifying that its
    /// bytes hash to the digest asked for, or to the digest the registry claims for a tag.
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
        let auth = self.auth_for(&image);
        let (bytes, claimed) = self
            .client
            .pull_manifest_raw(&image, &auth, &ACCEPTED_MANIFEST_TYPES)
            .await
            .map_err(|e| classify(&source, e))?;
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(RegistryError::TooLarge {
                reference: source,
                size: bytes.len(),
            });
        }
        let computed = Digest::of(&bytes);
        let wanted = image.digest().unwrap_or(&claimed);
        if wanted != computed.as_str() {
            return Err(RegistryError::DigestMismatch {
                reference: source,
                message: format!("expected {wanted}, the bytes hash to {computed}"),
            });
        }
        tracing::Span::current().record("digest", computed.as_str());
        Ok(FetchedManifest {
            media_type: manifest_media_type(&bytes),
            bytes,
            digest: computed,
        })
    }

    /// The digest `source` points at now, by a HEAD request where the registry answers with
    /// `Docker-Content-Digest` (oci-client falls back to GET). Not verified: use it only to see
    /// that nothing changed, and [`RegistryClient::pin`] otherwise.
    pub async fn head_digest(&self, source: &str) -> Result<String, RegistryError> {
        let reference = Self::parse(source)?;
        let auth = self.auth_for(&reference);
        let digest = self
            .client
            .fetch_manifest_digest(&reference, &auth)
            .await
            .map_err(|e| classify(source, e))?;
        check_sha256_digest(&digest).map_err(|message| RegistryError::Other {
            reference: source.to_string(),
            message,
        })?;
        Ok(digest)
    }

    /// Opens the blob `host/repository@digest` as a stream. The bytes are not verified here.
    #[tracing::instrument(skip(self))]
    pub async fn fetch_blob(
        &self,
        host: &str,
        repository: &str,
        digest: &Digest,
    ) -> Result<BlobStream, RegistryError> {
        let source = format!("{host}/{repository}@{digest}");
        let image = Self::parse(&source)?;
        let auth = self.auth_for(&image);
        self.client
            .store_auth_if_needed(image.resolve_registry(), &auth)
            .await;
        let sized = self
            .client
            .pull_blob_stream(&image, digest.as_str())
            .await
            .map_err(|e| classify(&source, e))?;
        Ok(BlobStream {
            content_length: sized.content_length,
            stream: sized.stream,
        })
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
        let (bytes, claimed) = self
            .client
            .pull_manifest_raw(
                &reference,
                &self.auth_for(&reference),
                &ACCEPTED_MANIFEST_TYPES,
            )
            .await
            .map_err(|e| classify(source, e))?;
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(RegistryError::TooLarge {
                reference: source.to_string(),
                size: bytes.len(),
            });
        }
        let computed = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if claimed != computed {
            return Err(RegistryError::DigestMismatch {
                reference: source.to_string(),
                message: format!("registry claims {claimed}, the bytes hash to {computed}"),
            });
        }
        if let Some(wanted) = reference.digest() {
            if wanted != computed {
                return Err(RegistryError::DigestMismatch {
                    reference: source.to_string(),
                    message: format!("asked for {wanted}, the bytes hash to {computed}"),
                });
            }
        }
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

fn classify(source: &str, e: OciDistributionError) -> RegistryError {
    let reference = source.to_string();
    let message = crate::audit::error_chain(&e);
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => {
            RegistryError::NotFound { reference }
        }
        OciDistributionError::ServerError { code: 404, .. } => {
            RegistryError::NotFound { reference }
        }
        OciDistributionError::RegistryError { ref envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|e| format!("{:?}", e.code).contains("Unknown")) =>
        {
            RegistryError::NotFound { reference }
        }
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => {
            RegistryError::Unauthorized { reference, message }
        }
        OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => {
            RegistryError::Unreachable { reference, message }
        }
        OciDistributionError::DigestError(_) => {
            RegistryError::DigestMismatch { reference, message }
        }
        _ => RegistryError::Other { reference, message },
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
