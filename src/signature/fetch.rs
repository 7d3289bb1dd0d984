//! Finding and verifying a digest's cosign signatures.
//!
//! Where cosign puts them (and so where they are looked for, in this order):
//! 1. the signature manifest a generation recorded when it was verified (by digest: the cache
//!    holds it, pinned, so a rollback re-verifies with the registry down);
//! 2. the tag `sha256-<hex>.sig` in the image's repository (cosign's default, all versions);
//! 3. the OCI 1.1 referrers API (`GET /v2/<repo>/referrers/<digest>`), where the registry has
//!    it, else the index OCI 1.1 clients keep under the tag `sha256-<hex>` for registries
//!    without it (the referrers tag schema): manifests with artifact type
//!    [`COSIGN_SIG_ARTIFACT_TYPE`] (cosign `--registry-referrers-mode=oci-1-1`).
//!
//! A signature manifest lists simple-signing layers ([`SIMPLE_SIGNING_MEDIA_TYPE`]), each
//! with its signature in the [`SIGNATURE_ANNOTATION`]; cosign appends one per `cosign sign`.
//! The first layer that verifies under a trusted key and names the digest wins. Everything is
//! read through an [`ArtifactSource`] (the node cache in the daemon), with caps:
//! [`MAX_SIGNATURE_LAYERS`] layers, [`super::MAX_PAYLOAD_BYTES`] a payload,
//! [`MAX_REFERRERS`] referrers.

use super::{verify, SignatureError, TrustedKey, MAX_PAYLOAD_BYTES};
use crate::registry::{Digest, RegistryClient};
use bytes::Bytes;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use thiserror::Error;

/// The media type of a cosign simple-signing payload layer.
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The artifact type of a cosign signature stored as an OCI 1.1 referrer.
pub const COSIGN_SIG_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// Most signature layers looked at in one signature manifest (cosign adds one per signing; a
/// few rotations, not hundreds).
pub const MAX_SIGNATURE_LAYERS: usize = 32;
/// Most signature manifests taken from a referrers answer.
pub const MAX_REFERRERS: usize = 8;

/// Where signature artifacts are read from. Manifests and blobs come back verified against
/// their digests (a tag's manifest against the digest the registry claims).
#[async_trait::async_trait]
pub trait ArtifactSource: Send + Sync {
    /// The manifest `host/repository:reference` (a tag or a digest); `Ok(None)` when the
    /// registry answers that there is none.
    async fn manifest(
        &self,
        host: &str,
        repository: &str,
        reference: &str,
    ) -> Result<Option<Bytes>, String>;

    /// The blob `digest` of at most `max` bytes.
    async fn blob(
        &self,
        host: &str,
        repository: &str,
        digest: &Digest,
        max: u64,
    ) -> Result<Bytes, String>;

    /// The referrers index of `digest` filtered to cosign signatures; `Ok(None)` when the
    /// registry has no referrers API.
    async fn referrers(
        &self,
        host: &str,
        repository: &str,
        digest: &Digest,
    ) -> Result<Option<Bytes>, String>;
}

#[derive(Debug, Error)]
pub enum VerifyError {
    #[error("no signature found (no tag {tag}, no cosign referrer)")]
    NoSignature { tag: String },
    #[error("its signatures cannot be fetched: {message}")]
    Unavailable { message: String },
    #[error("signature manifest {manifest} is not a cosign signature: {reason}")]
    BadManifest { manifest: String, reason: String },
    #[error("invalid image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

impl VerifyError {
    /// The metric label of this outcome.
    pub fn outcome(&self) -> &'static str {
        match self {
            VerifyError::NoSignature { .. } => "unsigned",
            VerifyError::Unavailable { .. } => "unavailable",
            VerifyError::BadManifest { .. } | VerifyError::Reference { .. } => "invalid",
            VerifyError::Signature(SignatureError::NoTrustedKeyMatched { .. }) => "untrusted",
            VerifyError::Signature(SignatureError::PayloadDigestDiffers { .. }) => "digest_differs",
            VerifyError::Signature(_) => "invalid",
        }
    }
}

/// A successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub key_name: String,
    pub key_id: String,
    /// The signature manifest holding the signature that verified.
    pub signature: Digest,
}

/// One signature layer of a signature manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureLayer {
    pub digest: Digest,
    pub size: u64,
    pub signature: String,
}

#[derive(Deserialize)]
struct ManifestJson {
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(rename = "artifactType", default)]
    artifact_type: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// The simple-signing layers of a signature manifest (at most [`MAX_SIGNATURE_LAYERS`]).
pub fn signature_layers(manifest: &[u8]) -> Result<Vec<SignatureLayer>, String> {
    let m: ManifestJson =
        serde_json::from_slice(manifest).map_err(|e| crate::audit::cap(e.to_string()))?;
    let mut out = Vec::new();
    for l in m
        .layers
        .iter()
        .filter(|l| l.media_type == SIMPLE_SIGNING_MEDIA_TYPE)
    {
        if out.len() == MAX_SIGNATURE_LAYERS {
            break;
        }
        let digest = Digest::parse(&l.digest).map_err(|e| {
            format!(
                "layer digest {:?}: {e}",
                crate::audit::cap(l.digest.clone())
            )
        })?;
        let Some(signature) = l.annotations.get(SIGNATURE_ANNOTATION) else {
            continue;
        };
        out.push(SignatureLayer {
            digest,
            size: l.size,
            signature: signature.clone(),
        });
    }
    if out.is_empty() {
        return Err(format!(
            "no {SIMPLE_SIGNING_MEDIA_TYPE} layer with a {SIGNATURE_ANNOTATION} annotation"
        ));
    }
    Ok(out)
}

/// The cosign signature manifests a referrers index lists (at most [`MAX_REFERRERS`]).
pub fn signature_referrers(index: &[u8]) -> Result<Vec<Digest>, String> {
    let m: ManifestJson =
        serde_json::from_slice(index).map_err(|e| crate::audit::cap(e.to_string()))?;
    Ok(m.manifests
        .iter()
        .filter(|d| d.artifact_type == COSIGN_SIG_ARTIFACT_TYPE)
        .filter_map(|d| Digest::parse(&d.digest).ok())
        .take(MAX_REFERRERS)
        .collect())
}

/// The tag cosign stores the signatures of `digest` under: `sha256-<hex>.sig`.
pub fn signature_tag(digest: &Digest) -> String {
    format!("sha256-{}.sig", digest.hex())
}

/// The tag of the referrers index a registry without the referrers API holds for `digest`
/// (OCI distribution spec 1.1, "referrers tag schema"): `sha256-<hex>`.
pub fn referrers_tag(digest: &Digest) -> String {
    format!("sha256-{}", digest.hex())
}

/// Finds and verifies signatures through an [`ArtifactSource`].
pub struct Verifier {
    source: Arc<dyn ArtifactSource>,
}

impl Verifier {
    pub fn new(source: Arc<dyn ArtifactSource>) -> Self {
        Self { source }
    }

    /// Verifies `reference` (`registry/repository@sha256:…`) under `keys`. `known` is a
    /// signature manifest that verified it before (looked at first).
    #[tracing::instrument(skip(self, keys, known), fields(digest))]
    pub async fn verify(
        &self,
        reference: &str,
        keys: &[TrustedKey],
        known: Option<&str>,
    ) -> Result<Verified, VerifyError> {
        if keys.is_empty() {
            return Err(SignatureError::NoKeys.into());
        }
        let bad = |reason: String| VerifyError::Reference {
            reference: reference.to_string(),
            reason,
        };
        let parsed = RegistryClient::parse(reference).map_err(|e| bad(e.to_string()))?;
        let digest = parsed
            .digest()
            .ok_or_else(|| bad("no digest".into()))
            .and_then(|d| Digest::parse(d).map_err(bad))?;
        tracing::Span::current().record("digest", digest.as_str());
        let host = parsed.registry().to_string();
        let repository = parsed.repository().to_string();
        let tag = signature_tag(&digest);

        let mut first_error: Option<VerifyError> = None;
        // 1. The signature manifest that verified it before.
        if let Some(known) = known.and_then(|k| Digest::parse(k).ok()) {
            match self
                .source
                .manifest(&host, &repository, known.as_str())
                .await
            {
                Ok(Some(bytes)) => {
                    match self
                        .check_manifest(&host, &repository, &known, &bytes, keys, &digest)
                        .await
                    {
                        Ok(v) => return Ok(v),
                        Err(e) => first_error = Some(e),
                    }
                }
                Ok(None) => {}
                Err(message) => first_error = Some(VerifyError::Unavailable { message }),
            }
        }
        // 2. The `.sig` tag.
        let mut candidates: Vec<(Digest, Bytes)> = Vec::new();
        match self.source.manifest(&host, &repository, &tag).await {
            Ok(Some(bytes)) => candidates.push((Digest::of(&bytes), bytes)),
            Ok(None) => {}
            Err(message) => {
                first_error.get_or_insert(VerifyError::Unavailable { message });
            }
        }
        // 3. Referrers: the API where the registry has it, else the referrers tag schema.
        if candidates.is_empty() {
            let index = match self.source.referrers(&host, &repository, &digest).await {
                Ok(None) => {
                    self.source
                        .manifest(&host, &repository, &referrers_tag(&digest))
                        .await
                }
                other => other,
            };
            match index {
                Ok(Some(index)) => {
                    for d in signature_referrers(&index).unwrap_or_default() {
                        match self.source.manifest(&host, &repository, d.as_str()).await {
                            Ok(Some(bytes)) => candidates.push((d, bytes)),
                            Ok(None) => {}
                            Err(message) => {
                                first_error.get_or_insert(VerifyError::Unavailable { message });
                            }
                        }
                    }
                }
                Ok(None) => {}
                // Tag answered "none" and referrers failed: the tag's answer stands.
                Err(message) => tracing::debug!(%message, "referrers API unavailable"),
            }
        }
        for (d, bytes) in &candidates {
            match self
                .check_manifest(&host, &repository, d, bytes, keys, &digest)
                .await
            {
                Ok(v) => return Ok(v),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(VerifyError::NoSignature { tag }))
    }

    /// Verifies the signature layers of one signature manifest; the first that verifies wins.
    async fn check_manifest(
        &self,
        host: &str,
        repository: &str,
        manifest_digest: &Digest,
        manifest: &[u8],
        keys: &[TrustedKey],
        digest: &Digest,
    ) -> Result<Verified, VerifyError> {
        let layers = signature_layers(manifest).map_err(|reason| VerifyError::BadManifest {
            manifest: manifest_digest.to_string(),
            reason,
        })?;
        let mut first_error: Option<VerifyError> = None;
        for layer in layers {
            if layer.size > MAX_PAYLOAD_BYTES as u64 {
                first_error.get_or_insert(
                    SignatureError::PayloadTooLarge {
                        size: usize::try_from(layer.size).unwrap_or(usize::MAX),
                    }
                    .into(),
                );
                continue;
            }
            let payload = match self
                .source
                .blob(host, repository, &layer.digest, MAX_PAYLOAD_BYTES as u64)
                .await
            {
                Ok(p) => p,
                Err(message) => {
                    first_error.get_or_insert(VerifyError::Unavailable { message });
                    continue;
                }
            };
            match verify(&payload, &layer.signature, keys, digest) {
                Ok(key) => {
                    return Ok(Verified {
                        key_name: key.name().to_string(),
                        key_id: key.id().to_string(),
                        signature: manifest_digest.clone(),
                    })
                }
                Err(e) => {
                    first_error.get_or_insert(e.into());
                }
            }
        }
        Err(first_error.unwrap_or_else(|| VerifyError::BadManifest {
            manifest: manifest_digest.to_string(),
            reason: "no signature layer".into(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_manifests_and_referrers_are_read_with_caps() {
        let d = Digest::of(b"payload");
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{d}","size":2}},
            "layers":[{{"mediaType":"{SIMPLE_SIGNING_MEDIA_TYPE}","digest":"{d}","size":7,
              "annotations":{{"{SIGNATURE_ANNOTATION}":"MEUC"}}}},
              {{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":7}}]}}"#
        );
        let layers = signature_layers(m.as_bytes()).expect("layers");
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].signature, "MEUC");
        assert!(signature_layers(b"{}").is_err());
        assert!(signature_layers(b"not json").is_err());
        let many: Vec<String> = (0..MAX_SIGNATURE_LAYERS + 5)
            .map(|_| {
                format!(
                    r#"{{"mediaType":"{SIMPLE_SIGNING_MEDIA_TYPE}","digest":"{d}","size":7,"annotations":{{"{SIGNATURE_ANNOTATION}":"x"}}}}"#
                )
            })
            .collect();
        let big = format!(r#"{{"layers":[{}]}}"#, many.join(","));
        assert_eq!(
            signature_layers(big.as_bytes()).expect("layers").len(),
            MAX_SIGNATURE_LAYERS
        );
        let index = format!(
            r#"{{"manifests":[{{"digest":"{d}","artifactType":"{COSIGN_SIG_ARTIFACT_TYPE}"}},{{"digest":"{d}","artifactType":"application/other"}}]}}"#
        );
        assert_eq!(
            signature_referrers(index.as_bytes()).expect("index"),
            vec![d.clone()]
        );
        assert_eq!(signature_tag(&d), format!("sha256-{}.sig", d.hex()));
    }
}
