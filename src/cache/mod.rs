//! The node's layer cache: a verified, content-addressed store of the blobs and manifests the
//! node pulls ([`store`]), filled from upstream registries on a miss with one download per
//! blob however many clients ask at once, and kept within a size limit by least-recently-used
//! eviction that never removes what a stream tag's current image needs ([`pins`]).
//!
//! Data flows one way: the mirror ([`crate::mirror`]) and the admin API ask the cache; the
//! cache asks the registry client ([`crate::registry`]) and reads the stream view (for pins and
//! prefetch); nothing here calls back into the mirror.
//!
//! A fill runs in its own task, not in the request that started it: every client, the first
//! included, streams along from the temporary file as it grows, and the last byte is released
//! only once size and digest have been checked, so a client never receives a complete body
//! whose digest is wrong (its response is cut short instead).
//!
//! Stored bytes are checked again when served: a whole stored blob is hashed as it is read and
//! its last chunk is held back until the digest matches; a stored manifest is hashed before it
//! is served. Bytes that changed on disk (a flipped bit) cut the response short (a manifest is
//! fetched again instead), count in `imagestream_digest_mismatches_total`, and the blob is
//! evicted, so the next request fetches it from upstream. Range requests are not checked (the
//! scrub, [`Cache::verify`], finds those blobs). A full disk is [`CacheError::NoSpace`] (HTTP
//! 507 at the mirror); a blob whose size is known reserves its space before it is downloaded.

pub mod artifacts;
pub mod pins;
pub mod store;

use crate::registry::{Digest, RegistryClient, RegistryError};
use crate::stream::resolve::View;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use store::{ContentStore, Entry};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

/// Earlier distinct digests of each stream tag kept pinned by default.
pub const DEFAULT_PIN_HISTORY: usize = 3;
/// Default size limit of the cache.
pub const DEFAULT_MAX_BYTES: u64 = 20 << 30;
/// Bytes written to disk per step while filling.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Bytes read from disk per step while serving (small enough that the allocator reuses them:
/// a response holds at most `RESPONSE_QUEUE + 1` of them).
pub const READ_CHUNK_BYTES: usize = 512 << 10;
/// Chunks buffered per client response.
pub const RESPONSE_QUEUE: usize = 4;
/// Largest manifest kept or served.
pub const MAX_MANIFEST_BYTES: u64 = crate::registry::MAX_MANIFEST_BYTES as u64;
/// Tag → digest answers remembered for when the upstream is unreachable or misbehaves.
pub const MAX_REMEMBERED_TAGS: usize = 10_000;
/// Manifests (an index and the manifests under it) walked for one image at most: a hostile
/// index may list the same child many times over, or nest deeply.
pub const MAX_MANIFESTS_PER_IMAGE: usize = 256;
/// A blob sent without `Content-Length` is cut off (nothing cached) once it is larger than the
/// cache limit or this, whichever is larger; a body longer than its `Content-Length` is cut off
/// at once.
pub const MIN_UNSIZED_BLOB_LIMIT: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("cache I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "blob {digest} does not match its digest: the bytes hash to {computed}; nothing was cached"
    )]
    DigestMismatch { digest: Digest, computed: Digest },
    #[error("blob {digest} is {got} bytes, expected {expected}; nothing was cached")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        got: u64,
    },
    #[error("{digest} is not cached and no upstream was named")]
    NotCached { digest: Digest },
    #[error("fetching {digest} failed: {message}")]
    FillFailed { digest: Digest, message: String },
    /// The upstream sent a body without a length, and more bytes than the cache may hold.
    #[error("blob {digest} (sent without a length) is over {limit} bytes; nothing was cached")]
    BlobTooLarge { digest: Digest, limit: u64 },
    /// A shared download failed; every client that joined it gets its cause.
    #[error("fetching {digest} failed: {cause}")]
    Fill {
        digest: Digest,
        cause: Arc<CacheError>,
    },
    #[error(transparent)]
    Upstream(#[from] RegistryError),
    #[error("manifest {reference} is not valid: {message}")]
    BadManifest { reference: String, message: String },
    #[error("{digest} is pinned by {by}; move or remove the tag first")]
    Pinned { digest: Digest, by: String },
    /// ENOSPC (or EDQUOT) on the cache's disk; the temporary is removed, nothing is stored.
    #[error("no space left on the cache's disk writing {path}: {source}; nothing was cached")]
    NoSpace {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl CacheError {
    /// Whether the bytes did not match the digest (counted and reported as such).
    pub fn is_mismatch(&self) -> bool {
        matches!(
            self,
            CacheError::DigestMismatch { .. }
                | CacheError::SizeMismatch { .. }
                | CacheError::BlobTooLarge { .. }
                | CacheError::Upstream(RegistryError::DigestMismatch { .. })
        ) || matches!(self, CacheError::Fill { cause, .. } if cause.is_mismatch())
    }

    /// The error itself, or for a shared download the error that ended it.
    pub fn root(&self) -> &CacheError {
        match self {
            CacheError::Fill { cause, .. } => cause.root(),
            e => e,
        }
    }
}

/// Where a blob or manifest comes from on a miss: `host/repository` of a registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub host: String,
    pub repository: String,
}

/// Settings of the cache.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub max_bytes: u64,
    /// Prefetch each stream tag's current image when it changes.
    pub prefetch: bool,
    /// Where tag answers are remembered (`mirror-tags.json`).
    pub tags_file: PathBuf,
    /// Earlier distinct digests of each stream tag kept pinned (for rollback).
    pub pin_history: usize,
}

#[derive(Debug, Clone)]
enum FillState {
    Connecting,
    Running {
        written: u64,
        size: Option<u64>,
    },
    /// Stored; `file` is what was committed (a peer fill writes a file of its own).
    Done {
        size: u64,
        file: Arc<File>,
    },
    Failed(Arc<CacheError>),
}

struct Fill {
    file: Arc<File>,
    state: watch::Sender<FillState>,
}

/// A blob ready to be read: stored, or being filled.
pub struct Blob {
    pub digest: Digest,
    /// Known for stored blobs, and for fills whose upstream sent a length.
    pub size: Option<u64>,
    pub from_cache: bool,
    /// A stored blob unchanged since it last hashed to its name: served without hashing.
    verified: bool,
    file: Arc<File>,
    fill: Option<watch::Receiver<FillState>>,
    /// For a stored blob: where to evict it from should its bytes no longer match.
    store: Option<Arc<ContentStore>>,
}

/// A manifest with its digest and media type.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub bytes: Bytes,
    pub digest: Digest,
    pub media_type: String,
    pub from_cache: bool,
}

/// One line of `imagestream cache ls`.
#[derive(Debug, Clone)]
pub struct Listed {
    pub digest: Digest,
    pub entry: Entry,
    pub pinned_by: Vec<String>,
}

#[derive(Debug, Default, Clone)]
pub struct GcReport {
    pub evicted: Vec<Digest>,
    pub freed_bytes: u64,
    pub size_bytes: u64,
    pub limit_bytes: u64,
}

#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    pub checked: u64,
    pub ok: u64,
    pub evicted: Vec<Digest>,
}

/// The peer layer as the cache uses it: who to ask ([`crate::peer::Peers`]) and whether a
/// repository's blobs may come from (or be filled by) peers at all: the private-image gate
/// answers no for a private repository that no pull with valid credentials asked for.
#[derive(Clone)]
pub struct PeerHook {
    pub peers: Arc<crate::peer::Peers>,
    pub permit: Arc<dyn Fn(&Origin) -> bool + Send + Sync>,
}

pub struct Cache {
    store: Arc<ContentStore>,
    peers: std::sync::OnceLock<PeerHook>,
    registry: RegistryClient,
    settings: CacheSettings,
    view: View,
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
    tags: Mutex<HashMap<String, Digest>>,
    gc_lock: tokio::sync::Mutex<()>,
}

fn metrics() -> &'static crate::metrics::Metrics {
    crate::metrics::metrics()
}

impl Cache {
    /// Opens the store under `state_dir` (removing stale temporaries).
    pub fn open(
        state_dir: &std::path::Path,
        registry: RegistryClient,
        settings: CacheSettings,
        view: View,
    ) -> Result<Arc<Self>, CacheError> {
        let store = Arc::new(ContentStore::open(state_dir)?);
        remove_stale_temporaries(&settings.tags_file);
        let tags = std::fs::read(&settings.tags_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<HashMap<String, String>>(&b).ok())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| Digest::parse(&v).ok().map(|d| (k, d)))
            .collect();
        let cache = Arc::new(Self {
            store,
            peers: std::sync::OnceLock::new(),
            registry,
            settings,
            view,
            fills: Mutex::new(HashMap::new()),
            tags: Mutex::new(tags),
            gc_lock: tokio::sync::Mutex::new(()),
        });
        cache.update_size_gauge();
        Ok(cache)
    }

    /// Turns peer fills on (once; the daemon does it at start when `peer_listen` is set).
    pub fn set_peers(&self, hook: PeerHook) {
        let _ = self.peers.set(hook);
    }

    /// The peer layer, when on.
    pub fn peers(&self) -> Option<&Arc<crate::peer::Peers>> {
        self.peers.get().map(|h| &h.peers)
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// The stream view the cache follows.
    pub fn view(&self) -> View {
        self.view.clone()
    }

    pub fn store(&self) -> &ContentStore {
        &self.store
    }

    /// Runs blocking store work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ContentStore) -> Result<T, CacheError> + Send + 'static,
    ) -> Result<T, CacheError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| CacheError::Io {
                path: "(blocking task)".into(),
                source: std::io::Error::other(e),
            })?
    }

    fn update_size_gauge(&self) {
        metrics()
            .cache_size_bytes
            .set(i64::try_from(self.store.total()).unwrap_or(i64::MAX));
    }

    /// A blob from the cache, or (with an `origin`) pulled through from upstream. Waits only
    /// until the upstream has answered, not for the download.
    #[tracing::instrument(skip(self, origin), fields(%digest))]
    pub async fn blob(
        self: &Arc<Self>,
        digest: &Digest,
        origin: Option<&Origin>,
    ) -> Result<Blob, CacheError> {
        self.blob_with(digest, origin, true).await
    }

    /// A blob for a peer ([`crate::mirror::peer_endpoint`]): from the cache, joining a fill in
    /// progress, or (with `fill_from`) filled from that registry only, never from another
    /// peer, so that peers asking each other cannot loop.
    pub async fn blob_for_peer(
        self: &Arc<Self>,
        digest: &Digest,
        fill_from: Option<&Origin>,
    ) -> Result<Blob, CacheError> {
        let joined = self
            .fills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(digest);
        if fill_from.is_none() && joined {
            // A fill in progress is joined even without an origin.
            let origin = Origin {
                host: String::new(),
                repository: String::new(),
            };
            return self.blob_with(digest, Some(&origin), false).await;
        }
        self.blob_with(digest, fill_from, false).await
    }

    async fn blob_with(
        self: &Arc<Self>,
        digest: &Digest,
        origin: Option<&Origin>,
        use_peers: bool,
    ) -> Result<Blob, CacheError> {
        if let Some((file, size, verified)) = self.store.open_read(digest)? {
            metrics().cache_hits.inc();
            return Ok(Blob {
                digest: digest.clone(),
                size: Some(size),
                from_cache: true,
                verified,
                file: Arc::new(file),
                fill: None,
                store: Some(self.store.clone()),
            });
        }
        let Some(origin) = origin else {
            return Err(CacheError::NotCached {
                digest: digest.clone(),
            });
        };
        metrics().cache_misses.inc();
        let fill = self.start_fill(digest, origin, use_peers)?;
        let mut rx = fill.state.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                FillState::Connecting => {}
                FillState::Running { size, .. } => {
                    return Ok(Blob {
                        digest: digest.clone(),
                        size,
                        from_cache: false,
                        // Checked by the fill itself.
                        verified: true,
                        file: fill.file.clone(),
                        fill: Some(rx),
                        store: None,
                    });
                }
                FillState::Done { size, file } => {
                    return Ok(Blob {
                        digest: digest.clone(),
                        size: Some(size),
                        from_cache: false,
                        // Checked by the fill itself.
                        verified: true,
                        file,
                        fill: None,
                        store: None,
                    });
                }
                FillState::Failed(cause) => {
                    return Err(CacheError::Fill {
                        digest: digest.clone(),
                        cause,
                    })
                }
            }
            if rx.changed().await.is_err() {
                return Err(CacheError::FillFailed {
                    digest: digest.clone(),
                    message: "the download was abandoned".into(),
                });
            }
        }
    }

    /// Makes sure `digest` is stored, downloading it from `origin` if needed; returns its size.
    pub async fn ensure(
        self: &Arc<Self>,
        digest: &Digest,
        origin: &Origin,
    ) -> Result<u64, CacheError> {
        if let Some(e) = self.store.get(digest) {
            return Ok(e.size);
        }
        let fill = self.start_fill(digest, origin, true)?;
        let mut rx = fill.state.subscribe();
        loop {
            match rx.borrow_and_update().clone() {
                FillState::Done { size, .. } => return Ok(size),
                FillState::Failed(cause) => {
                    return Err(CacheError::Fill {
                        digest: digest.clone(),
                        cause,
                    })
                }
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(CacheError::FillFailed {
                    digest: digest.clone(),
                    message: "the download was abandoned".into(),
                });
            }
        }
    }

    /// The fill for `digest`, joining one in progress or starting one.
    fn start_fill(
        self: &Arc<Self>,
        digest: &Digest,
        origin: &Origin,
        use_peers: bool,
    ) -> Result<Arc<Fill>, CacheError> {
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = fills.get(digest) {
            return Ok(f.clone());
        }
        let ingest = self.store.begin(digest)?;
        let (state, _) = watch::channel(FillState::Connecting);
        let fill = Arc::new(Fill {
            file: ingest.file(),
            state,
        });
        fills.insert(digest.clone(), fill.clone());
        drop(fills);
        let cache = self.clone();
        let digest = digest.clone();
        let origin = origin.clone();
        let task_fill = fill.clone();
        tokio::spawn(async move {
            let result = cache
                .run_fill(&digest, &origin, ingest, &task_fill, use_peers)
                .await;
            cache
                .fills
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&digest);
            match result {
                Ok((size, file)) => {
                    tracing::debug!(%digest, size, host = %origin.host, "cached");
                    task_fill.state.send_replace(FillState::Done { size, file });
                    cache.update_size_gauge();
                    if cache.store.total() > cache.settings.max_bytes {
                        let c = cache.clone();
                        tokio::spawn(async move {
                            if let Err(e) = c.gc().await {
                                tracing::warn!(error = %e, "cache eviction failed");
                            }
                        });
                    }
                }
                Err(e) => {
                    if e.is_mismatch() {
                        metrics().digest_mismatches.inc();
                    }
                    tracing::warn!(%digest, host = %origin.host, repository = %origin.repository, error = %e, "blob download failed; nothing cached");
                    task_fill.state.send_replace(FillState::Failed(Arc::new(e)));
                }
            }
        });
        Ok(fill)
    }

    /// One fill: from peers first unless this node is the blob's primary home (or peers are
    /// off for it), else from the registry; the primary tries peers when the registry fails
    /// before sending anything.
    async fn run_fill(
        &self,
        digest: &Digest,
        origin: &Origin,
        ingest: store::Ingest,
        fill: &Fill,
        use_peers: bool,
    ) -> Result<(u64, Arc<File>), CacheError> {
        let hook = self
            .peers
            .get()
            .filter(|_| use_peers && !origin.host.is_empty())
            .filter(|h| (h.permit)(origin));
        let plan = hook.map(|h| h.peers.plan(digest));
        let blob_limit = self.settings.max_bytes.max(MIN_UNSIZED_BLOB_LIMIT);
        if let (Some(hook), Some(plan)) = (hook, &plan) {
            if !plan.registry_first {
                if let Some(done) = self
                    .fill_from_peers(hook, plan, digest, origin, blob_limit)
                    .await
                {
                    return Ok(done);
                }
            }
        }
        let file = ingest.file();
        match self.fill_from_registry(digest, origin, ingest, fill).await {
            Ok(size) => Ok((size, file)),
            Err(e) => {
                let untouched = matches!(*fill.state.borrow(), FillState::Connecting);
                if let (Some(hook), Some(plan), true) = (hook, &plan, untouched) {
                    if plan.registry_first && !plan.peers.is_empty() {
                        tracing::info!(%digest, error = %e, "registry failed; asking peers");
                        if let Some(done) = self
                            .fill_from_peers(hook, plan, digest, origin, blob_limit)
                            .await
                        {
                            return Ok(done);
                        }
                    }
                }
                Err(e)
            }
        }
    }

    /// Asks `plan.peers` in order; the first whose bytes match the digest wins (stored). The
    /// primary home (first, unless this node is the primary) is asked to fill from `origin`.
    async fn fill_from_peers(
        &self,
        hook: &PeerHook,
        plan: &crate::peer::FillPlan,
        digest: &Digest,
        origin: &Origin,
        limit: u64,
    ) -> Option<(u64, Arc<File>)> {
        for (i, peer) in plan.peers.iter().enumerate() {
            let fill_from = (i == 0 && !plan.registry_first)
                .then_some((origin.host.as_str(), origin.repository.as_str()));
            let span = tracing::debug_span!("peer_fill", peer = %peer.name, %digest);
            match self
                .fill_from_peer(&hook.peers, peer, digest, fill_from, limit)
                .instrument(span)
                .await
            {
                Ok(done) => {
                    metrics().peer_fetch(&peer.name, "ok");
                    tracing::debug!(%digest, peer = %peer.name, size = done.0, "filled from a peer");
                    return Some(done);
                }
                Err((outcome, e)) => {
                    metrics().peer_fetch(&peer.name, outcome);
                    if outcome == "mismatch" {
                        metrics().digest_mismatches.inc();
                        tracing::warn!(%digest, peer = %peer.name, error = %e, "peer sent wrong bytes; refused");
                    } else if outcome == "not_found" {
                        tracing::debug!(%digest, peer = %peer.name, "peer does not hold the blob");
                    } else {
                        tracing::info!(%digest, peer = %peer.name, error = %e, "peer fill failed; trying the next source");
                    }
                }
            }
        }
        None
    }

    /// One peer's copy of `digest`, hashed as it arrives and committed only if it matches.
    /// Nothing is visible to readers before that (the fill stays `Connecting`), so wrong bytes
    /// from a peer never reach a client. Errors carry their metrics outcome.
    async fn fill_from_peer(
        &self,
        peers: &crate::peer::Peers,
        peer: &crate::peer::Member,
        digest: &Digest,
        fill_from: Option<(&str, &str)>,
        limit: u64,
    ) -> Result<(u64, Arc<File>), (&'static str, String)> {
        let body = peers
            .client()
            .open(peer, digest, fill_from)
            .await
            .map_err(|e| (e.outcome(), e.to_string()))?;
        let size = body.size;
        if size > limit {
            return Err((
                "refused",
                format!(
                    "peer {} offers {size} bytes, over the limit {limit}",
                    peer.name
                ),
            ));
        }
        let local = |e: CacheError| ("local", e.to_string());
        let mut ingest = self.store.begin(digest).map_err(local)?;
        ingest = tokio::task::spawn_blocking(move || ingest.reserve(size).map(|()| ingest))
            .await
            .map_err(|e| ("local", e.to_string()))?
            .map_err(local)?;
        let idle = peers.settings().idle_timeout;
        let mut stream = body.stream;
        let mut buf = BytesMut::with_capacity(CHUNK_BYTES);
        loop {
            let next = match tokio::time::timeout(idle, stream.next()).await {
                Err(_) => {
                    return Err((
                        "cut",
                        format!(
                            "no byte from peer {} for {idle:?} after {} of {size}",
                            peer.name,
                            ingest.written() + buf.len() as u64
                        ),
                    ))
                }
                Ok(n) => n,
            };
            match next {
                Some(Ok(chunk)) => {
                    buf.extend_from_slice(&chunk);
                    let got = ingest.written() + buf.len() as u64;
                    if got > size {
                        return Err((
                            "mismatch",
                            format!("peer {} sent more than its {size} bytes", peer.name),
                        ));
                    }
                    if buf.len() >= CHUNK_BYTES {
                        ingest = write_off_thread(ingest, buf.split().freeze())
                            .await
                            .map_err(local)?;
                    }
                }
                Some(Err(e)) => {
                    return Err((
                        "cut",
                        format!(
                            "reading from peer {} after {} of {size} bytes: {e}",
                            peer.name,
                            ingest.written() + buf.len() as u64
                        ),
                    ))
                }
                None => break,
            }
        }
        ingest = write_off_thread(ingest, buf.split().freeze())
            .await
            .map_err(local)?;
        if ingest.written() != size {
            return Err((
                "cut",
                format!(
                    "peer {} ended after {} of {size} bytes",
                    peer.name,
                    ingest.written()
                ),
            ));
        }
        let file = ingest.file();
        let store = self.store.clone();
        let committed = tokio::task::spawn_blocking(move || store.commit(ingest, Some(size)))
            .await
            .map_err(|e| ("local", e.to_string()))?;
        match committed {
            Ok(size) => Ok((size, file)),
            Err(e @ CacheError::DigestMismatch { .. }) => Err(("mismatch", e.to_string())),
            Err(e) => Err(local(e)),
        }
    }

    async fn fill_from_registry(
        &self,
        digest: &Digest,
        origin: &Origin,
        mut ingest: store::Ingest,
        fill: &Fill,
    ) -> Result<u64, CacheError> {
        metrics().upstream_fetches.inc();
        let mut upstream = self
            .registry
            .fetch_blob(&origin.host, &origin.repository, digest)
            .await?;
        let size = upstream.content_length;
        if let Some(size) = size {
            // A blob that cannot fit fails now, before the response starts.
            ingest = tokio::task::spawn_blocking(move || ingest.reserve(size).map(|()| ingest))
                .await
                .map_err(|e| CacheError::FillFailed {
                    digest: digest.clone(),
                    message: e.to_string(),
                })??;
        }
        // A body without a length may be endless: it may not outgrow the cache (the limit is
        // otherwise soft: pinned blobs may exceed it).
        let limit = self.settings.max_bytes.max(MIN_UNSIZED_BLOB_LIMIT);
        fill.state
            .send_replace(FillState::Running { written: 0, size });
        let mut buf = BytesMut::with_capacity(CHUNK_BYTES);
        let flush = |mut ingest: store::Ingest, data: Bytes| async move {
            tokio::task::spawn_blocking(move || ingest.write(&data).map(|()| ingest))
                .await
                .map_err(|e| CacheError::FillFailed {
                    digest: digest.clone(),
                    message: e.to_string(),
                })?
        };
        loop {
            match upstream.stream.next().await {
                Some(Ok(chunk)) => {
                    buf.extend_from_slice(&chunk);
                    if size.is_none() && ingest.written() + buf.len() as u64 > limit {
                        return Err(CacheError::BlobTooLarge {
                            digest: digest.clone(),
                            limit,
                        });
                    }
                    if let Some(expected) = size {
                        let got = ingest.written() + buf.len() as u64;
                        if got > expected {
                            return Err(CacheError::SizeMismatch {
                                digest: digest.clone(),
                                expected,
                                got,
                            });
                        }
                    }
                    if buf.len() >= CHUNK_BYTES {
                        ingest = flush(ingest, buf.split().freeze()).await?;
                        let written = ingest.written();
                        fill.state.send_modify(|s| {
                            if let FillState::Running { written: w, .. } = s {
                                *w = written;
                            }
                        });
                    }
                }
                Some(Err(e)) => {
                    // A body cut short (or an idle one timed out). Should every byte have
                    // arrived anyway, a bad digest is the plainer report.
                    ingest = flush(ingest, buf.split().freeze()).await?;
                    if size == Some(ingest.written()) {
                        let computed = ingest.digest_so_far();
                        if computed != *digest {
                            return Err(CacheError::DigestMismatch {
                                digest: digest.clone(),
                                computed,
                            });
                        }
                    }
                    return Err(CacheError::FillFailed {
                        digest: digest.clone(),
                        message: format!(
                            "reading from {} after {} of {} bytes: {}",
                            origin.host,
                            ingest.written(),
                            size.map_or("?".to_string(), |s| s.to_string()),
                            crate::audit::error_chain(&e)
                        ),
                    });
                }
                None => break,
            }
        }
        ingest = flush(ingest, buf.split().freeze()).await?;
        let written = ingest.written();
        fill.state.send_modify(|s| {
            if let FillState::Running { written: w, .. } = s {
                *w = written;
            }
        });
        self.blocking(move |store| store.commit(ingest, size)).await
    }

    /// A manifest by digest (from the cache, else from `origin`) or by tag (always from
    /// `origin`; the last answer is served if the upstream cannot be reached).
    #[tracing::instrument(skip(self, origin), fields(reference))]
    pub async fn manifest(
        &self,
        origin: Option<&Origin>,
        reference: &str,
    ) -> Result<Manifest, CacheError> {
        if let Ok(digest) = Digest::parse(reference) {
            if let Some(bytes) = self.read_manifest(&digest).await? {
                metrics().cache_hits.inc();
                return Ok(Manifest {
                    media_type: crate::registry::manifest_media_type(&bytes),
                    bytes: bytes.into(),
                    digest,
                    from_cache: true,
                });
            }
            let Some(origin) = origin else {
                return Err(CacheError::NotCached { digest });
            };
            metrics().cache_misses.inc();
            return match self.fetch_manifest(origin, reference).await {
                // The registry is down or misbehaves: a peer may hold the manifest (stored
                // like any blob, served by digest, verified here before it is kept).
                Err(CacheError::Upstream(e)) if e.is_upstream_fault() => {
                    match self.manifest_from_peers(&digest, origin).await {
                        Some(m) => Ok(m),
                        None => Err(CacheError::Upstream(e)),
                    }
                }
                other => other,
            };
        }
        let Some(origin) = origin else {
            return Err(CacheError::Upstream(RegistryError::NotFound {
                reference: reference.to_string(),
            }));
        };
        let key = format!("{}/{}:{reference}", origin.host, origin.repository);
        match self.fetch_manifest(origin, reference).await {
            Ok(m) => {
                self.remember_tag(key, &m.digest);
                Ok(m)
            }
            // The upstream is down or misbehaves (5xx, timeouts, bad bytes): the last
            // verified answer for the tag stands in for it.
            Err(CacheError::Upstream(e)) if e.is_upstream_fault() => {
                let known = self
                    .tags
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&key)
                    .cloned();
                if let Some(digest) = known {
                    if let Some(bytes) = self.read_manifest(&digest).await? {
                        tracing::warn!(tag = %key, %digest, error = %e, "upstream failed; serving the last known digest of the tag");
                        return Ok(Manifest {
                            media_type: crate::registry::manifest_media_type(&bytes),
                            bytes: bytes.into(),
                            digest,
                            from_cache: true,
                        });
                    }
                }
                Err(CacheError::Upstream(e))
            }
            Err(e) => Err(e),
        }
    }

    /// A manifest by digest from the peers (never asking them to fill it), when peers are on.
    async fn manifest_from_peers(&self, digest: &Digest, origin: &Origin) -> Option<Manifest> {
        let hook = self.peers.get().filter(|h| (h.permit)(origin))?;
        let plan = crate::peer::FillPlan {
            registry_first: true,
            peers: hook.peers.plan(digest).peers,
        };
        self.fill_from_peers(hook, &plan, digest, origin, MAX_MANIFEST_BYTES)
            .await?;
        let bytes = self.read_manifest(digest).await.ok()??;
        tracing::info!(%digest, "registry failed; manifest from a peer");
        Some(Manifest {
            media_type: crate::registry::manifest_media_type(&bytes),
            bytes: bytes.into(),
            digest: digest.clone(),
            from_cache: false,
        })
    }

    /// A manifest by `tag`, always from `origin`, stored by digest like any manifest but not
    /// remembered as the tag's answer: for cosign's signature tags (`sha256-<hex>.sig`), one
    /// per image, which would crowd the [`MAX_REMEMBERED_TAGS`] tags the mirror serves offline
    /// and rewrite their file on every new image. What verified a generation is recorded by
    /// digest, and that is what is read again offline.
    pub async fn manifest_by_tag_unremembered(
        &self,
        origin: &Origin,
        tag: &str,
    ) -> Result<Manifest, CacheError> {
        self.fetch_manifest(origin, tag).await
    }

    async fn fetch_manifest(
        &self,
        origin: &Origin,
        reference: &str,
    ) -> Result<Manifest, CacheError> {
        metrics().upstream_fetches.inc();
        let fetched = self
            .registry
            .fetch_manifest(&origin.host, &origin.repository, reference)
            .await
            .inspect_err(|e| {
                if matches!(e, RegistryError::DigestMismatch { .. }) {
                    metrics().digest_mismatches.inc();
                }
            })?;
        let (digest, bytes) = (fetched.digest.clone(), fetched.bytes.clone());
        self.blocking(move |store| store.put(&digest, &bytes))
            .await?;
        self.update_size_gauge();
        Ok(Manifest {
            bytes: fetched.bytes,
            digest: fetched.digest,
            media_type: fetched.media_type,
            from_cache: false,
        })
    }

    /// A stored manifest, hashed before it is served; one whose bytes no longer match is
    /// evicted and reported as not stored.
    async fn read_manifest(&self, digest: &Digest) -> Result<Option<Vec<u8>>, CacheError> {
        let d = digest.clone();
        let bytes = self
            .blocking(move |store| {
                let Some(bytes) = store.read_small(&d, MAX_MANIFEST_BYTES)? else {
                    return Ok(None);
                };
                if Digest::of(&bytes) != d {
                    tracing::error!(digest = %d, "cached manifest no longer matches its digest; evicting it");
                    metrics().digest_mismatches.inc();
                    if store.remove(&d)?.is_some() {
                        metrics().cache_evictions.inc();
                    }
                    return Ok(None);
                }
                store.open_read(&d)?; // records the use
                Ok(Some(bytes))
            })
            .await;
        self.update_size_gauge();
        bytes
    }

    fn remember_tag(&self, key: String, digest: &Digest) {
        let snapshot = {
            let mut tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
            if tags.get(&key) == Some(digest) {
                return;
            }
            if tags.len() >= MAX_REMEMBERED_TAGS && !tags.contains_key(&key) {
                return;
            }
            tags.insert(key, digest.clone());
            tags.iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let path = self.settings.tags_file.clone();
        let bytes = serde_json::to_vec_pretty(&snapshot).unwrap_or_default();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = write_atomically(&path, &bytes) {
                tracing::warn!(path = %path.display(), error = %e, "cannot save remembered tags");
            }
        });
    }

    /// Every cached blob with the stream tags that pin it.
    pub async fn list(&self) -> Result<Vec<Listed>, CacheError> {
        let pins = self.pins().await?;
        let mut out: Vec<Listed> = self
            .store
            .entries()
            .into_iter()
            .map(|(digest, entry)| Listed {
                pinned_by: pins.get(&digest).cloned().unwrap_or_default(),
                digest,
                entry,
            })
            .collect();
        out.sort_by_key(|l| std::cmp::Reverse(l.entry.last_used));
        Ok(out)
    }

    /// Blobs reachable from a stream tag's current image, with the tags that reach them.
    pub async fn pins(&self) -> Result<HashMap<Digest, Vec<String>>, CacheError> {
        let snapshot = self.view.load();
        let history = self.settings.pin_history;
        self.blocking(move |store| Ok(pins::pinned(&snapshot, history, store)))
            .await
    }

    /// Whether the node holds everything needed to run `digest` (see [`pins::holds`]).
    pub async fn holds(&self, digest: &str) -> bool {
        let Ok(d) = Digest::parse(digest) else {
            return false;
        };
        self.blocking(move |store| Ok(pins::holds(store, &d)))
            .await
            .unwrap_or(false)
    }

    /// Drops one cached blob; refused for a pinned one, naming what pins it.
    pub async fn remove(&self, digest: &Digest) -> Result<u64, CacheError> {
        let pins = self.pins().await?;
        if let Some(by) = pins.get(digest) {
            return Err(CacheError::Pinned {
                digest: digest.clone(),
                by: by.join(", "),
            });
        }
        let d = digest.clone();
        let removed = self.blocking(move |store| store.remove(&d)).await?;
        self.update_size_gauge();
        removed.ok_or_else(|| CacheError::NotCached {
            digest: digest.clone(),
        })
    }

    /// Evicts least-recently-used blobs that nothing pins until the cache is within its limit.
    pub async fn gc(&self) -> Result<GcReport, CacheError> {
        let _guard = self.gc_lock.lock().await;
        let limit = self.settings.max_bytes;
        let mut report = GcReport {
            limit_bytes: limit,
            ..GcReport::default()
        };
        if self.store.total() > limit {
            let pinned = self.pins().await?;
            let busy: HashSet<Digest> = self
                .fills
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned()
                .collect();
            let mut candidates: Vec<(Digest, Entry)> = self
                .store
                .entries()
                .into_iter()
                .filter(|(d, _)| !pinned.contains_key(d) && !busy.contains(d))
                .collect();
            candidates.sort_by_key(|c| c.1.last_used);
            for (digest, _) in candidates {
                if self.store.total() <= limit {
                    break;
                }
                let d = digest.clone();
                if let Some(size) = self.blocking(move |store| store.remove(&d)).await? {
                    metrics().cache_evictions.inc();
                    tracing::info!(%digest, size, "evicted from the cache");
                    report.freed_bytes += size;
                    report.evicted.push(digest);
                }
            }
            if self.store.total() > limit {
                tracing::warn!(
                    size = self.store.total(),
                    limit,
                    "the cache is over its limit with only pinned or in-use blobs left"
                );
            }
        }
        report.size_bytes = self.store.total();
        self.update_size_gauge();
        Ok(report)
    }

    /// Re-hashes every cached blob and evicts those whose bytes no longer match.
    pub async fn verify(&self) -> Result<VerifyReport, CacheError> {
        let mut report = VerifyReport::default();
        for (digest, _) in self.store.entries() {
            report.checked += 1;
            let d = digest.clone();
            let good = self.blocking(move |store| store.verify(&d)).await?;
            if good {
                report.ok += 1;
            } else {
                tracing::error!(%digest, "cached blob no longer matches its digest; evicting it");
                metrics().digest_mismatches.inc();
                let d = digest.clone();
                if self
                    .blocking(move |store| store.remove(&d))
                    .await?
                    .is_some()
                {
                    metrics().cache_evictions.inc();
                }
                report.evicted.push(digest);
            }
        }
        self.update_size_gauge();
        Ok(report)
    }

    /// Fetches an image (manifest or index, its platform's manifests, config and layers) into
    /// the cache.
    #[tracing::instrument(skip(self), fields(reference = %reference))]
    pub async fn prefetch(
        self: &Arc<Self>,
        reference: &str,
        digest: &Digest,
    ) -> Result<u64, CacheError> {
        self.prefetch_some(reference, digest, |_| true).await
    }

    /// [`Cache::prefetch`] of the manifests and of the blobs `keep` selects.
    async fn prefetch_some(
        self: &Arc<Self>,
        reference: &str,
        digest: &Digest,
        keep: impl Fn(&Digest) -> bool,
    ) -> Result<u64, CacheError> {
        let parsed = RegistryClient::parse(reference)?;
        let origin = Origin {
            host: parsed.registry().to_string(),
            repository: parsed.repository().to_string(),
        };
        let mut bytes = 0u64;
        let mut queue = vec![digest.clone()];
        let mut seen: HashSet<Digest> = HashSet::new();
        let mut walked = 0usize;
        while let Some(d) = queue.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            walked += 1;
            if walked > MAX_MANIFESTS_PER_IMAGE {
                return Err(CacheError::BadManifest {
                    reference: format!("{}/{}@{}", origin.host, origin.repository, digest),
                    message: format!("more than {MAX_MANIFESTS_PER_IMAGE} manifests under it"),
                });
            }
            let m = self.manifest(Some(&origin), d.as_str()).await?;
            bytes += m.bytes.len() as u64;
            let children =
                pins::children(&m.bytes, true).map_err(|message| CacheError::BadManifest {
                    reference: format!("{}/{}@{}", origin.host, origin.repository, d),
                    message,
                })?;
            for child in children.manifests {
                queue.push(child);
            }
            for blob in children.blobs {
                if seen.insert(blob.clone()) && keep(&blob) {
                    bytes += self.ensure(&blob, &origin).await?;
                }
            }
        }
        Ok(bytes)
    }

    /// Prefetches each stream tag's current image when it changes, until `shutdown`.
    pub async fn prefetch_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.view.subscribe();
        let mut done: HashSet<Digest> = HashSet::new();
        loop {
            let roots = pins::roots(&self.view.load(), self.settings.pin_history);
            for root in roots {
                if done.contains(&root.digest) || *shutdown.borrow() {
                    continue;
                }
                let span = tracing::info_span!("prefetch", tags = %root.pinned_by.join(","), digest = %root.digest);
                match self
                    .prefetch(&root.reference, &root.digest)
                    .instrument(span.clone())
                    .await
                {
                    Ok(bytes) => {
                        span.in_scope(|| tracing::info!(bytes, "prefetched into the cache"));
                        done.insert(root.digest);
                    }
                    Err(e) => span.in_scope(
                        || tracing::warn!(error = %e, "prefetch failed; the pull will fetch it"),
                    ),
                }
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

impl Cache {
    /// Keeps the cluster able to roll back without the registry: every blob of every pinned
    /// image (each stream tag's current and last `pin_history` digests) is fetched onto its
    /// home nodes ([`crate::peer::Peers::is_home`]), from peers or the registry, and the pins
    /// keep it there whatever the LRU does. Runs again when the streams or the members change,
    /// and every [`HOME_RECHECK`] for what failed, until `shutdown`.
    pub async fn home_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(peers) = self.peers().cloned() else {
            return;
        };
        let mut changes = self.view.subscribe();
        let mut members = peers.members_watch();
        loop {
            let roots = pins::roots(&self.view.load(), self.settings.pin_history);
            let mut failed = 0;
            for root in roots {
                if *shutdown.borrow() {
                    return;
                }
                let span = tracing::debug_span!("home_fill", digest = %root.digest);
                let p = peers.clone();
                match self
                    .prefetch_some(&root.reference, &root.digest, move |d| p.is_home(d))
                    .instrument(span)
                    .await
                {
                    Ok(bytes) => {
                        tracing::debug!(digest = %root.digest, bytes, "home blobs held")
                    }
                    Err(e) => {
                        failed += 1;
                        tracing::info!(digest = %root.digest, error = %e, "cannot hold this node's share of a pinned image yet; retrying")
                    }
                }
            }
            let recheck = async {
                if failed > 0 {
                    tokio::time::sleep(HOME_RECHECK).await
                } else {
                    std::future::pending::<()>().await
                }
            };
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                r = members.changed() => if r.is_err() { return },
                _ = recheck => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

/// How often [`Cache::home_loop`] retries images it could not fetch.
pub const HOME_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

impl Blob {
    /// The bytes `[start, end)` (`end` defaults to the end of the blob) as a stream of chunks.
    /// While a fill is running, the stream follows it and ends with an error if the fill fails.
    pub fn into_stream(
        self,
        start: u64,
        end: Option<u64>,
    ) -> mpsc::Receiver<std::io::Result<Bytes>> {
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let source = if self.from_cache { "cache" } else { "upstream" };
        tokio::spawn(async move {
            if let Err(e) = self.pump(start, end, &tx, source).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }

    async fn pump(
        self,
        mut pos: u64,
        end: Option<u64>,
        tx: &mpsc::Sender<std::io::Result<Bytes>>,
        source: &'static str,
    ) -> std::io::Result<()> {
        let served = metrics()
            .cache_bytes_served
            .get_or_create(&crate::metrics::SourceLabels {
                source: source.to_string(),
            })
            .clone();
        let mut fill = self.fill.clone();
        // A whole stored blob changed since it last hashed to its name (or never hashed by
        // this process) is hashed as it is read; its last chunk waits for the digest.
        let whole = self.from_cache
            && !self.verified
            && pos == 0
            && end.is_none_or(|e| Some(e) >= self.size);
        let mut hasher = whole.then(Sha256::new);
        let mut held: Option<Bytes> = None;
        loop {
            let (available, complete) = match fill.as_ref().map(|rx| rx.borrow().clone()) {
                None => (self.size.unwrap_or(0), true),
                Some(FillState::Connecting) => (0, false),
                // The last byte waits for the size and digest check.
                Some(FillState::Running { written, .. }) => (written.saturating_sub(1), false),
                Some(FillState::Done { size, .. }) => (size, true),
                Some(FillState::Failed(m)) => {
                    return Err(std::io::Error::other(format!("{}: {m}", self.digest)))
                }
            };
            let limit = end.map_or(available, |e| e.min(available));
            while pos < limit {
                let n = (limit - pos).min(READ_CHUNK_BYTES as u64) as usize;
                let file = self.file.clone();
                let h = hasher.take();
                let (chunk, h) = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n];
                    file.read_exact_at(&mut buf, pos)?;
                    let h = h.map(|mut h| {
                        h.update(&buf);
                        h
                    });
                    Ok::<_, std::io::Error>((Bytes::from(buf), h))
                })
                .await
                .map_err(std::io::Error::other)??;
                hasher = h;
                pos += n as u64;
                served.inc_by(n as u64);
                let out = if hasher.is_some() {
                    held.replace(chunk)
                } else {
                    Some(chunk)
                };
                if let Some(chunk) = out {
                    if tx.send(Ok(chunk)).await.is_err() {
                        return Ok(()); // the client went away
                    }
                }
            }
            if complete || end.is_some_and(|e| pos >= e) {
                if let Some(h) = hasher {
                    let computed = Digest::from_hasher(h);
                    if computed != self.digest {
                        return Err(self.evict_corrupt(computed).await);
                    }
                    if let Some(store) = &self.store {
                        store.mark_verified(&self.digest, &self.file);
                    }
                }
                if let Some(chunk) = held {
                    let _ = tx.send(Ok(chunk)).await;
                }
                return Ok(());
            }
            let Some(rx) = fill.as_mut() else {
                return Ok(());
            };
            if rx.changed().await.is_err()
                && !matches!(&*rx.borrow(), FillState::Done { .. } | FillState::Failed(_))
            {
                return Err(std::io::Error::other(format!(
                    "{}: the download was abandoned",
                    self.digest
                )));
            }
        }
    }
}

impl Blob {
    /// A stored blob read back with other bytes than its name: evicted (unless a good copy
    /// replaced it meanwhile) and counted; the error that cuts the response short.
    async fn evict_corrupt(&self, computed: Digest) -> std::io::Error {
        let digest = self.digest.clone();
        tracing::error!(%digest, %computed, "cached blob no longer matches its digest; response cut short, evicting it");
        metrics().digest_mismatches.inc();
        if let Some(store) = self.store.clone() {
            let (d, file) = (digest.clone(), self.file.clone());
            let removed = tokio::task::spawn_blocking(move || {
                let r = store.remove_if_same(&d, &file);
                metrics()
                    .cache_size_bytes
                    .set(i64::try_from(store.total()).unwrap_or(i64::MAX));
                r
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
            match removed {
                Ok(Some(_)) => {
                    metrics().cache_evictions.inc();
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(%digest, error = %e, "cannot evict the corrupt blob"),
            }
        }
        std::io::Error::other(format!(
            "{digest}: the cached bytes hash to {computed}; evicted, the next request fetches it again"
        ))
    }
}

/// Removes temporaries [`write_atomically`] left for `path` (a crash between create and
/// rename): `<stem>.tmp.<pid>` beside it.
fn remove_stale_temporaries(path: &std::path::Path) {
    let (Some(dir), Some(stem)) = (path.parent(), path.file_stem().and_then(|s| s.to_str())) else {
        return;
    };
    let prefix = format!("{stem}.tmp.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
        {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(file = %entry.path().display(), "removed a stale temporary")
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove a stale temporary")
                }
            }
        }
    }
}

/// Appends `data` to `ingest` on the blocking pool.
async fn write_off_thread(
    mut ingest: store::Ingest,
    data: Bytes,
) -> Result<store::Ingest, CacheError> {
    tokio::task::spawn_blocking(move || ingest.write(&data).map(|()| ingest))
        .await
        .map_err(|e| CacheError::Io {
            path: "(blocking task)".into(),
            source: std::io::Error::other(e),
        })?
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `t` as RFC 3339 in UTC.
pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".to_string())
}
