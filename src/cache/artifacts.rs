//! The cache as the source of signature artifacts ([`crate::signature::fetch::ArtifactSource`]):
//! signature manifests and payloads are fetched through the cache like an image's, so they are
//! stored verified, pinned with the generation that recorded them ([`super::pins::roots`]) and
//! served from the node with the registry down (by digest: a generation records the signature
//! manifest that verified it). Tags (`sha256-<hex>.sig`, the referrers tag schema's
//! `sha256-<hex>`) are always asked of the registry and not remembered
//! ([`Cache::manifest_by_tag_unremembered`]). The referrers API is asked of the registry.

use super::{Cache, CacheError, Origin};
use crate::registry::{Digest, RegistryClient, RegistryError};
use crate::signature::fetch::{ArtifactSource, COSIGN_SIG_ARTIFACT_TYPE};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

/// [`ArtifactSource`] over the node cache.
pub struct CacheArtifacts {
    cache: Arc<Cache>,
    registry: RegistryClient,
}

impl CacheArtifacts {
    pub fn new(cache: Arc<Cache>) -> Self {
        let registry = cache.registry.clone();
        Self { cache, registry }
    }
}

fn origin(host: &str, repository: &str) -> Origin {
    Origin {
        host: host.to_string(),
        repository: repository.to_string(),
    }
}

#[async_trait::async_trait]
impl ArtifactSource for CacheArtifacts {
    async fn manifest(
        &self,
        host: &str,
        repository: &str,
        reference: &str,
    ) -> Result<Option<Bytes>, String> {
        let origin = origin(host, repository);
        let fetched = if Digest::parse(reference).is_ok() {
            self.cache.manifest(Some(&origin), reference).await
        } else {
            self.cache
                .manifest_by_tag_unremembered(&origin, reference)
                .await
        };
        match fetched {
            Ok(m) => Ok(Some(m.bytes)),
            Err(CacheError::Upstream(RegistryError::NotFound { .. })) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn blob(
        &self,
        host: &str,
        repository: &str,
        digest: &Digest,
        max: u64,
    ) -> Result<Bytes, String> {
        let blob = self
            .cache
            .blob(digest, Some(&origin(host, repository)))
            .await
            .map_err(|e| e.to_string())?;
        if blob.size.is_some_and(|n| n > max) {
            return Err(format!("blob {digest} is over {max} bytes"));
        }
        let mut rx = blob.into_stream(0, None);
        let mut out = BytesMut::new();
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            if out.len() as u64 + chunk.len() as u64 > max {
                return Err(format!("blob {digest} is over {max} bytes"));
            }
            out.extend_from_slice(&chunk);
        }
        // Verified by the cache: a stream's last chunk comes only once the digest matched.
        Ok(out.freeze())
    }

    async fn referrers(
        &self,
        host: &str,
        repository: &str,
        digest: &Digest,
    ) -> Result<Option<Bytes>, String> {
        self.registry
            .referrers(host, repository, digest, COSIGN_SIG_ARTIFACT_TYPE)
            .await
            .map_err(|e| e.to_string())
    }
}
