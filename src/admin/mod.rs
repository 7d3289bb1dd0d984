//! The admin API (`imagestream.v1.Admin`, defined in `proto/`): one thin tonic adapter over the
//! [`StreamService`], where domain errors become gRPC statuses, plus the client the CLI uses.

pub mod auth;
pub mod client;

use crate::cache::{Cache, CacheError};
use crate::registry::RegistryError;
use crate::stream::model::{Generation, Stream, StreamKey, Tag};
use crate::stream::reference::TagRef;
use crate::stream::resolve::Resolution;
use crate::stream::service::{StreamError, StreamService};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Largest admin request message accepted: a stream's whole record (tags with their history)
/// stays far below it.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Generated types and service of `proto/imagestream/v1/admin.proto`.
pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("imagestream.v1");
}

use pb::admin_server::Admin;
pub use pb::admin_server::AdminServer;

impl From<StreamError> for Status {
    fn from(e: StreamError) -> Self {
        let message = e.to_string();
        match e {
            StreamError::Name(_) | StreamError::Reference(_) | StreamError::Source { .. } => {
                crate::audit::status(tonic::Code::InvalidArgument, message)
            }
            StreamError::StreamNotFound(_) | StreamError::TagNotFound { .. } => {
                crate::audit::status(tonic::Code::NotFound, message)
            }
            StreamError::AlreadyExists(_) => {
                crate::audit::status(tonic::Code::AlreadyExists, message)
            }
            StreamError::Rollback { ref source, .. } => match source {
                crate::stream::model::RollbackError::NoSuchGeneration { .. } => {
                    crate::audit::status(tonic::Code::NotFound, message)
                }
                _ => crate::audit::status(tonic::Code::FailedPrecondition, message),
            },
            StreamError::Registry(ref r) => match r {
                RegistryError::InvalidReference { .. } => {
                    crate::audit::status(tonic::Code::InvalidArgument, message)
                }
                RegistryError::NotFound { .. } => {
                    crate::audit::status(tonic::Code::NotFound, message)
                }
                RegistryError::Unauthorized { .. } => {
                    crate::audit::status(tonic::Code::PermissionDenied, message)
                }
                RegistryError::Unreachable { .. } => {
                    crate::audit::status(tonic::Code::Unavailable, message)
                }
                RegistryError::DigestMismatch { .. }
                | RegistryError::TooLarge { .. }
                | RegistryError::InvalidManifest { .. } => {
                    crate::audit::status(tonic::Code::FailedPrecondition, message)
                }
                RegistryError::Other { .. } => crate::audit::status(tonic::Code::Unknown, message),
            },
            StreamError::Resolve(r) => r.into(),
            StreamError::Store(crate::store::StoreError::Unavailable { .. }) => {
                crate::audit::status(tonic::Code::Unavailable, message)
            }
            StreamError::Store(_) => crate::audit::status(tonic::Code::Internal, message),
            StreamError::Unsigned { .. } | StreamError::NoPolicy(_) => {
                crate::audit::status(tonic::Code::FailedPrecondition, message)
            }
            StreamError::Policy(_) => crate::audit::status(tonic::Code::InvalidArgument, message),
        }
    }
}

impl From<CacheError> for Status {
    fn from(e: CacheError) -> Self {
        let code = match e.root() {
            CacheError::Io { .. } => tonic::Code::Internal,
            CacheError::NotCached { .. } => tonic::Code::NotFound,
            CacheError::Pinned { .. } => tonic::Code::FailedPrecondition,
            CacheError::DigestMismatch { .. } | CacheError::SizeMismatch { .. } => {
                tonic::Code::DataLoss
            }
            _ => tonic::Code::Unavailable,
        };
        crate::audit::status(code, e.to_string())
    }
}

/// The tonic service.
pub struct AdminApi {
    streams: Arc<StreamService>,
    cache: Arc<Cache>,
    access: auth::AdminAccess,
    min_import_interval_secs: u64,
    /// With the etcd store: the link to the cluster.
    cluster: Option<Arc<crate::store::etcd::ClusterStatus>>,
    node_name: String,
}

impl AdminApi {
    pub fn new(streams: Arc<StreamService>, cache: Arc<Cache>, access: auth::AdminAccess) -> Self {
        Self {
            streams,
            cache,
            access,
            min_import_interval_secs: crate::importer::DEFAULT_MIN_INTERVAL_SECS,
            cluster: None,
            node_name: String::new(),
        }
    }

    /// Reports `cluster` (the etcd link) and `node_name` in `Status`.
    pub fn with_cluster(
        mut self,
        cluster: Option<Arc<crate::store::etcd::ClusterStatus>>,
        node_name: &str,
    ) -> Self {
        self.cluster = cluster;
        self.node_name = node_name.to_string();
        self
    }

    /// The shortest interval accepted for scheduled tags.
    pub fn with_min_import_interval(mut self, secs: u64) -> Self {
        self.min_import_interval_secs = secs;
        self
    }

    fn read<T>(&self, req: &Request<T>, action: &str) -> Result<auth::Caller, Status> {
        self.access.check(req, auth::Kind::Read, action)
    }

    fn write<T>(&self, req: &Request<T>, action: &str) -> Result<auth::Caller, Status> {
        self.access.check(req, auth::Kind::Write, action)
    }

    /// Marks each generation the node's cache holds completely.
    async fn mark_held(&self, tag: &mut pb::Tag) {
        for g in &mut tag.generations {
            g.held = self.cache.holds(&g.digest).await;
        }
    }

    /// A stream as the API shows it: the policy that applies and, per generation, whether
    /// that policy lets it run.
    fn stream_pb(&self, s: Stream) -> pb::Stream {
        let snapshot = self.streams.view().load();
        let effective = snapshot.policy_for(&s).cloned();
        let node_default = s.policy.is_none();
        let refused: Vec<(String, Vec<String>)> = s
            .tags
            .values()
            .map(|t| (t.name.clone(), refusals(effective.as_ref(), t)))
            .collect();
        let mut out: pb::Stream = s.into();
        out.effective_policy = effective.as_ref().map(|p| policy_pb(p, node_default));
        for t in &mut out.tags {
            if let Some((_, r)) = refused.iter().find(|(name, _)| *name == t.name) {
                for (g, why) in t.generations.iter_mut().zip(r) {
                    g.refused = why.clone();
                }
            }
        }
        out
    }

    /// A tag as the API shows it, with [`AdminApi::stream_pb`]'s refusals.
    fn tag_pb(&self, t: &TagRef, tag: Tag) -> pb::Tag {
        let snapshot = self.streams.view().load();
        let policy = snapshot
            .get(&StreamKey::new(&t.namespace, &t.name))
            .and_then(|s| snapshot.policy_for(s).cloned());
        let refused = refusals(policy.as_ref(), &tag);
        let mut out: pb::Tag = tag.into();
        for (g, why) in out.generations.iter_mut().zip(refused) {
            g.refused = why;
        }
        out
    }

    /// The current generation of a tag, for audit records.
    fn current(&self, t: &TagRef) -> String {
        self.streams
            .get_tag(t)
            .ok()
            .and_then(|tag| {
                tag.current()
                    .map(|g| format!("generation {} {}", g.generation, g.reference))
            })
            .unwrap_or_else(|| "none".into())
    }
}

/// Per generation of `tag` (newest first), why `policy` does not let it run (empty: it may).
fn refusals(policy: Option<&crate::signature::policy::SignaturePolicy>, tag: &Tag) -> Vec<String> {
    tag.generations
        .iter()
        .map(|g| {
            policy
                .and_then(|p| p.refuses(g.verification.as_ref()))
                .unwrap_or_default()
        })
        .collect()
}

fn key(namespace: String, name: String) -> StreamKey {
    StreamKey::new(namespace, name)
}

// The checks of admin requests made before anything is looked up, stored or fetched. They are
// pure, so that the fuzz target `admin_request` runs them on arbitrary requests; the stream
// service then checks the names again ([`crate::stream::service::validate_key`]) and the source.

/// A tag named by a request: the tag is checked here, the stream's namespace and name by the
/// stream service.
pub fn tag_ref(namespace: String, name: String, tag: String) -> Result<TagRef, Status> {
    crate::stream::names::validate_tag(&tag)
        .map_err(|e| crate::audit::status(tonic::Code::InvalidArgument, e.to_string()))?;
    Ok(TagRef {
        namespace,
        name,
        tag,
    })
}

/// An optional namespace filter (empty: none), checked.
pub fn namespace_filter(namespace: &str) -> Result<Option<&str>, Status> {
    let ns = Some(namespace).filter(|n| !n.is_empty());
    if let Some(ns) = ns {
        crate::stream::names::validate_namespace(ns)
            .map_err(|e| crate::audit::status(tonic::Code::InvalidArgument, e.to_string()))?;
    }
    Ok(ns)
}

/// A `Watch` request: a stream name needs its namespace.
pub fn check_watch(r: &pb::WatchRequest) -> Result<(), Status> {
    if r.namespace.is_empty() && !r.name.is_empty() {
        return Err(crate::audit::status(
            tonic::Code::InvalidArgument,
            "a stream name needs its namespace",
        ));
    }
    Ok(())
}

/// A `SetTag` request: the tag, a non-empty source, and the schedule (an interval of 0 is the
/// default; shorter than `min_import_interval_secs` is refused).
pub fn check_set_tag(
    r: &pb::SetTagRequest,
    min_import_interval_secs: u64,
) -> Result<(TagRef, Option<crate::stream::model::Schedule>), Status> {
    let t = tag_ref(r.namespace.clone(), r.name.clone(), r.tag.clone())?;
    if r.source.is_empty() {
        return Err(crate::audit::status(
            tonic::Code::InvalidArgument,
            "source reference must not be empty",
        ));
    }
    let schedule = if r.scheduled {
        let interval = if r.interval_secs == 0 {
            crate::importer::DEFAULT_INTERVAL_SECS
        } else {
            r.interval_secs
        };
        if interval < min_import_interval_secs {
            return Err(crate::audit::status(
                tonic::Code::InvalidArgument,
                format!(
                    "interval {interval}s is shorter than the minimum of {min_import_interval_secs}s (import_min_interval_secs)"
                ),
            ));
        }
        Some(crate::stream::model::Schedule {
            interval_secs: interval,
        })
    } else {
        None
    };
    Ok((t, schedule))
}

/// A `Resolve` request: a non-empty reference of at most
/// [`crate::registry::MAX_REFERENCE_LEN`] characters, and the optional namespace.
pub fn check_resolve(r: &pb::ResolveRequest) -> Result<Option<&str>, Status> {
    if r.reference.len() > crate::registry::MAX_REFERENCE_LEN {
        return Err(crate::audit::status(
            tonic::Code::InvalidArgument,
            format!(
                "reference {:?} is longer than {} characters",
                r.reference,
                crate::registry::MAX_REFERENCE_LEN
            ),
        ));
    }
    if r.reference.is_empty() {
        return Err(crate::audit::status(
            tonic::Code::InvalidArgument,
            "reference must not be empty",
        ));
    }
    namespace_filter(&r.namespace)
}

/// The digest of a `RemoveCacheBlob` request.
pub fn check_cache_digest(digest: &str) -> Result<crate::registry::Digest, Status> {
    crate::registry::Digest::parse(digest)
        .map_err(|e| crate::audit::status(tonic::Code::InvalidArgument, e))
}

impl From<crate::stream::events::TagEvent> for pb::TagEvent {
    fn from(e: crate::stream::events::TagEvent) -> Self {
        pb::TagEvent {
            sequence: e.sequence,
            namespace: e.namespace,
            stream: e.stream,
            tag: e.tag,
            old_digest: e.old_digest.unwrap_or_default(),
            new_digest: e.new_digest.unwrap_or_default(),
            generation: e.generation,
            cause: e.cause,
            time: e.time,
            signature: e.signature.unwrap_or_default(),
        }
    }
}

/// Events queued per watcher between the broadcast and its connection.
const WATCH_QUEUE: usize = 64;

#[tonic::async_trait]
impl Admin for AdminApi {
    type WatchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::TagEvent, Status>> + Send + 'static>,
    >;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.read(&req, "watch")?;
        let r = req.into_inner();
        check_watch(&r)?;
        let mut events = self.streams.view().events();
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_QUEUE);
        tokio::spawn(async move {
            loop {
                let item = match events.recv().await {
                    Ok(e) => {
                        if (!r.namespace.is_empty() && e.namespace != r.namespace)
                            || (!r.name.is_empty() && e.stream != r.name)
                        {
                            continue;
                        }
                        Ok(pb::TagEvent::from(e))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        Err(crate::audit::status(
                            tonic::Code::Aborted,
                            format!("the watcher fell behind and missed {n} events: re-list the streams and watch again"),
                        ))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return; // the watcher went away, or was told it lagged
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn create_stream(
        &self,
        req: Request<pb::CreateStreamRequest>,
    ) -> Result<Response<pb::Stream>, Status> {
        let caller = self.write(&req, "create stream")?;
        let r = req.into_inner();
        let s = self
            .streams
            .create(key(r.namespace, r.name), r.lookup_local)
            .await?;
        auth::record(
            &caller,
            "create stream",
            &s.key().to_string(),
            "none",
            &format!("lookup_local={}", s.lookup_local),
        );
        Ok(Response::new(self.stream_pb(s)))
    }

    async fn list_streams(
        &self,
        req: Request<pb::ListStreamsRequest>,
    ) -> Result<Response<pb::ListStreamsResponse>, Status> {
        self.read(&req, "list streams")?;
        let r = req.into_inner();
        let ns = namespace_filter(&r.namespace)?;
        let streams = self
            .streams
            .list(ns)
            .into_iter()
            .map(|s| self.stream_pb(s))
            .collect();
        Ok(Response::new(pb::ListStreamsResponse { streams }))
    }

    async fn get_stream(
        &self,
        req: Request<pb::GetStreamRequest>,
    ) -> Result<Response<pb::Stream>, Status> {
        self.read(&req, "get stream")?;
        let r = req.into_inner();
        let mut s = self.stream_pb(self.streams.get(&key(r.namespace, r.name))?);
        for t in &mut s.tags {
            self.mark_held(t).await;
        }
        Ok(Response::new(s))
    }

    async fn delete_stream(
        &self,
        req: Request<pb::DeleteStreamRequest>,
    ) -> Result<Response<pb::DeleteStreamResponse>, Status> {
        let caller = self.write(&req, "remove stream")?;
        let r = req.into_inner();
        let k = key(r.namespace, r.name);
        let before = self
            .streams
            .get(&k)
            .map(|s| format!("tags={:?}", s.tags.keys().collect::<Vec<_>>()))
            .unwrap_or_default();
        self.streams.delete(&k).await?;
        auth::record(&caller, "remove stream", &k.to_string(), &before, "none");
        Ok(Response::new(pb::DeleteStreamResponse {}))
    }

    async fn update_stream_access(
        &self,
        req: Request<pb::UpdateStreamAccessRequest>,
    ) -> Result<Response<pb::Stream>, Status> {
        let caller = self.write(&req, "update stream access")?;
        let r = req.into_inner();
        let before = self
            .streams
            .get(&key(r.namespace.clone(), r.name.clone()))
            .map(|s| format!("{:?}", s.access))
            .unwrap_or_default();
        let s = self
            .streams
            .update_access(
                &key(r.namespace, r.name),
                &r.allow,
                &r.deny,
                &r.remove,
                r.reset,
            )
            .await?;
        auth::record(
            &caller,
            "update stream access",
            &s.key().to_string(),
            &before,
            &format!("{:?}", s.access),
        );
        Ok(Response::new(s.into()))
    }

    async fn set_stream_policy(
        &self,
        req: Request<pb::SetStreamPolicyRequest>,
    ) -> Result<Response<pb::Stream>, Status> {
        let caller = self.write(&req, "set stream policy")?;
        let r = req.into_inner();
        let (mode, keys) = check_set_policy(&r)?;
        let k = key(r.namespace, r.name);
        let summary = |p: Option<&crate::signature::policy::SignaturePolicy>| {
            p.map_or("node default".to_string(), |p| {
                let names: Vec<&str> = p.keys.iter().map(|k| k.name.as_str()).collect();
                format!("{} [{}]", p.mode, names.join(", "))
            })
        };
        let before = self
            .streams
            .get(&k)
            .map(|s| summary(s.policy.as_ref()))
            .unwrap_or_default();
        let s = self.streams.set_policy(&k, mode, &keys).await?;
        auth::record(
            &caller,
            "set stream policy",
            &k.to_string(),
            &before,
            &summary(s.policy.as_ref()),
        );
        Ok(Response::new(self.stream_pb(s)))
    }

    async fn verify_tag(
        &self,
        req: Request<pb::VerifyTagRequest>,
    ) -> Result<Response<pb::Tag>, Status> {
        self.write(&req, "verify tag")?;
        let r = req.into_inner();
        let t = tag_ref(r.namespace, r.name, r.tag)?;
        let tag = self.streams.verify_tag(&t).await?;
        let mut tag = self.tag_pb(&t, tag);
        self.mark_held(&mut tag).await;
        Ok(Response::new(tag))
    }

    async fn set_tag(&self, req: Request<pb::SetTagRequest>) -> Result<Response<pb::Tag>, Status> {
        let caller = self.write(&req, "set tag")?;
        let r = req.into_inner();
        let (t, schedule) = check_set_tag(&r, self.min_import_interval_secs)?;
        let before = self.current(&t);
        let tag = self
            .streams
            .set_tag_scheduled(&t, &r.source, schedule)
            .await?;
        auth::record(
            &caller,
            "set tag",
            &t.to_string(),
            &before,
            &self.current(&t),
        );
        Ok(Response::new(self.tag_pb(&t, tag)))
    }

    async fn rollback_tag(
        &self,
        req: Request<pb::RollbackTagRequest>,
    ) -> Result<Response<pb::Tag>, Status> {
        let caller = self.write(&req, "roll back tag")?;
        let r = req.into_inner();
        let t = tag_ref(r.namespace, r.name, r.tag)?;
        let to = Some(r.to_generation).filter(|g| *g != 0);
        let before = self.current(&t);
        let tag = self.streams.rollback(&t, to).await?;
        auth::record(
            &caller,
            "roll back tag",
            &t.to_string(),
            &before,
            &self.current(&t),
        );
        let mut tag = self.tag_pb(&t, tag);
        self.mark_held(&mut tag).await;
        if let Some(g) = tag.generations.first() {
            if !g.held {
                tag.warning = format!(
                    "this node does not hold generation {} ({}) completely: its pods cannot start it while the registry is unreachable",
                    g.generation, g.digest
                );
                tracing::warn!(tag = %t, digest = %g.digest, "rolled back to an image this node does not hold");
            }
        }
        Ok(Response::new(tag))
    }

    async fn get_tag(&self, req: Request<pb::GetTagRequest>) -> Result<Response<pb::Tag>, Status> {
        self.read(&req, "get tag")?;
        let r = req.into_inner();
        let t = tag_ref(r.namespace, r.name, r.tag)?;
        let mut tag = self.tag_pb(&t, self.streams.get_tag(&t)?);
        self.mark_held(&mut tag).await;
        Ok(Response::new(tag))
    }

    async fn import_tag(
        &self,
        req: Request<pb::ImportTagRequest>,
    ) -> Result<Response<pb::ImportTagResponse>, Status> {
        let caller = self.write(&req, "import tag")?;
        let r = req.into_inner();
        let t = tag_ref(r.namespace, r.name, r.tag)?;
        let before = self.current(&t);
        let (tag, moved) = self.streams.import(&t).await?;
        if moved {
            auth::record(
                &caller,
                "import tag",
                &t.to_string(),
                &before,
                &self.current(&t),
            );
        }
        Ok(Response::new(pb::ImportTagResponse {
            tag: Some(self.tag_pb(&t, tag)),
            moved,
        }))
    }

    async fn delete_tag(
        &self,
        req: Request<pb::DeleteTagRequest>,
    ) -> Result<Response<pb::DeleteTagResponse>, Status> {
        let caller = self.write(&req, "remove tag")?;
        let r = req.into_inner();
        let t = tag_ref(r.namespace, r.name, r.tag)?;
        let before = self.current(&t);
        self.streams.delete_tag(&t).await?;
        auth::record(&caller, "remove tag", &t.to_string(), &before, "none");
        Ok(Response::new(pb::DeleteTagResponse {}))
    }

    async fn metrics(
        &self,
        req: Request<pb::MetricsRequest>,
    ) -> Result<Response<pb::MetricsResponse>, Status> {
        self.read(&req, "metrics")?;
        Ok(Response::new(pb::MetricsResponse {
            text: crate::metrics::metrics().encode(),
        }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.read(&req, "status")?;
        let streams = self.streams.view().load().streams().count() as u64;
        let r = match &self.cluster {
            None => pb::StatusResponse {
                store: "embedded".into(),
                connected: true,
                importer: true,
                importer_node: self.node_name.clone(),
                streams,
                node_name: self.node_name.clone(),
                ..Default::default()
            },
            Some(c) => {
                let r = c.report();
                pb::StatusResponse {
                    store: "etcd".into(),
                    endpoints: r.endpoints,
                    connected: r.connected,
                    revision: r.revision,
                    stale_seconds: r.stale_secs.unwrap_or(-1.0),
                    last_sync_time: r.last_sync_time.unwrap_or_default(),
                    error: r.error.unwrap_or_default(),
                    importer: r.leader,
                    importer_node: r.leader_name.unwrap_or_default(),
                    streams,
                    node_name: self.node_name.clone(),
                }
            }
        };
        Ok(Response::new(r))
    }

    async fn list_cache(
        &self,
        req: Request<pb::ListCacheRequest>,
    ) -> Result<Response<pb::ListCacheResponse>, Status> {
        self.read(&req, "list cache")?;
        let blobs = self
            .cache
            .list()
            .await?
            .into_iter()
            .map(|l| pb::CachedBlob {
                digest: l.digest.to_string(),
                size: l.entry.size,
                last_used: crate::cache::rfc3339(l.entry.last_used),
                pinned_by: l.pinned_by,
            })
            .collect();
        Ok(Response::new(pb::ListCacheResponse {
            blobs,
            size_bytes: self.cache.store().total(),
            limit_bytes: self.cache.settings().max_bytes,
        }))
    }

    async fn verify_cache(
        &self,
        req: Request<pb::VerifyCacheRequest>,
    ) -> Result<Response<pb::VerifyCacheResponse>, Status> {
        let caller = self.write(&req, "verify cache")?;
        let r = self.cache.verify().await?;
        auth::record(
            &caller,
            "verify cache",
            "cache",
            "",
            &format!("checked={} evicted={}", r.checked, r.evicted.len()),
        );
        Ok(Response::new(pb::VerifyCacheResponse {
            checked: r.checked,
            ok: r.ok,
            evicted: r.evicted.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn remove_cache_blob(
        &self,
        req: Request<pb::RemoveCacheBlobRequest>,
    ) -> Result<Response<pb::RemoveCacheBlobResponse>, Status> {
        let caller = self.write(&req, "remove cached blob")?;
        let r = req.into_inner();
        let digest = check_cache_digest(&r.digest)?;
        let freed = self.cache.remove(&digest).await?;
        auth::record(
            &caller,
            "remove cached blob",
            digest.as_str(),
            "cached",
            "removed",
        );
        Ok(Response::new(pb::RemoveCacheBlobResponse {
            freed_bytes: freed,
        }))
    }

    async fn gc_cache(
        &self,
        req: Request<pb::GcCacheRequest>,
    ) -> Result<Response<pb::GcCacheResponse>, Status> {
        let caller = self.write(&req, "gc cache")?;
        let r = self.cache.gc().await?;
        auth::record(
            &caller,
            "gc cache",
            "cache",
            "",
            &format!("evicted={} freed_bytes={}", r.evicted.len(), r.freed_bytes),
        );
        Ok(Response::new(pb::GcCacheResponse {
            evicted: r.evicted.iter().map(ToString::to_string).collect(),
            freed_bytes: r.freed_bytes,
            size_bytes: r.size_bytes,
            limit_bytes: r.limit_bytes,
        }))
    }

    async fn resolve(
        &self,
        req: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        self.read(&req, "resolve")?;
        let r = req.into_inner();
        let ns = check_resolve(&r)?;
        let resolution = self
            .streams
            .resolve(&r.reference, ns)
            .map_err(Status::from)?;
        let resp = match resolution {
            Resolution::PassThrough => pb::ResolveResponse {
                reference: r.reference,
                ..Default::default()
            },
            Resolution::Pinned(p) => pb::ResolveResponse {
                reference: p.reference,
                is_stream: true,
                stream_namespace: p.tag.namespace,
                stream_name: p.tag.name,
                tag: p.tag.tag,
                generation: p.generation,
                digest: p.digest,
            },
            Resolution::NeedsNamespace { name, .. } => {
                return Err(crate::audit::status(tonic::Code::InvalidArgument, format!(
                    "{:?} is a short name of image stream {name:?}; give --namespace to resolve it as a pod of that namespace would",
                    r.reference
                )));
            }
        };
        Ok(Response::new(resp))
    }
}

impl From<Stream> for pb::Stream {
    fn from(s: Stream) -> Self {
        pb::Stream {
            namespace: s.namespace,
            name: s.name,
            lookup_local: s.lookup_local,
            tags: s.tags.into_values().map(Into::into).collect(),
            access: Some(pb::Access {
                allow: s.access.allow,
                deny: s.access.deny,
            }),
            policy: s.policy.as_ref().map(|p| policy_pb(p, false)),
            effective_policy: None,
        }
    }
}

impl From<Tag> for pb::Tag {
    fn from(t: Tag) -> Self {
        pb::Tag {
            name: t.name,
            source: t.source,
            generations: t.generations.into_iter().map(Into::into).collect(),
            warning: String::new(),
            import_interval_secs: t.schedule.map_or(0, |s| s.interval_secs),
            import_condition: t.condition.map(|c| pb::ImportCondition {
                last_check: c.last_check,
                last_success: c.last_success,
                error: c.error,
                consecutive_failures: c.consecutive_failures,
            }),
        }
    }
}

impl From<Generation> for pb::Generation {
    fn from(g: Generation) -> Self {
        pb::Generation {
            generation: g.generation,
            digest: g.digest,
            reference: g.reference,
            created: g.created,
            cause: g.cause,
            source: g.source,
            held: false,
            verification: g.verification.map(|v| pb::Verification {
                status: match v.status {
                    crate::signature::policy::Status::Verified => "verified".into(),
                    crate::signature::policy::Status::Failed => "failed".into(),
                },
                mode: v.mode.as_str().into(),
                key: v.key,
                key_id: v.key_id,
                signature: v.signature,
                error: v.error,
                checked: v.checked,
            }),
            refused: String::new(),
        }
    }
}

/// A signature policy as the API shows it (keys without their PEM).
fn policy_pb(
    p: &crate::signature::policy::SignaturePolicy,
    node_default: bool,
) -> pb::SignaturePolicy {
    pb::SignaturePolicy {
        mode: p.mode.as_str().into(),
        keys: p
            .keys
            .iter()
            .map(|k| pb::PolicyKey {
                name: k.name.clone(),
                id: k.id.clone(),
                algorithm: k.algorithm.clone(),
                pem: String::new(),
            })
            .collect(),
        node_default,
    }
}

/// A checked `SetStreamPolicy`: the mode (`None`: remove) and the `(name, PEM)` keys.
pub type PolicyChange = (
    Option<crate::signature::policy::Mode>,
    Vec<(String, Vec<u8>)>,
);

/// A `SetStreamPolicy` request checked: the mode (`None`: remove the stream's own policy) and
/// the `(name, PEM)` keys (the stream service checks them: each key, and how many).
pub fn check_set_policy(r: &pb::SetStreamPolicyRequest) -> Result<PolicyChange, Status> {
    let invalid = |m: String| crate::audit::status(tonic::Code::InvalidArgument, m);
    let mode = match r.mode.as_str() {
        "" if r.keys.is_empty() => None,
        "" => return Err(invalid("keys need a mode (enforce, warn or off)".into())),
        m => Some(m.parse().map_err(invalid)?),
    };
    let keys = r
        .keys
        .iter()
        .map(|k| {
            let name: String = k
                .name
                .chars()
                .filter(|c| !c.is_control())
                .take(255)
                .collect();
            (name, k.pem.clone().into_bytes())
        })
        .collect();
    Ok((mode, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_checks() {
        let set =
            |tag: &str, source: &str, scheduled: bool, interval_secs: u64| pb::SetTagRequest {
                namespace: "team-a".into(),
                name: "app".into(),
                tag: tag.into(),
                source: source.into(),
                scheduled,
                interval_secs,
            };
        let (t, schedule) = check_set_tag(&set("prod", "nginx", false, 0), 30).expect("ok");
        assert_eq!(t.to_string(), "team-a/app:prod");
        assert_eq!(schedule, None);
        let (_, schedule) = check_set_tag(&set("prod", "nginx", true, 0), 30).expect("ok");
        assert_eq!(
            schedule.map(|s| s.interval_secs),
            Some(crate::importer::DEFAULT_INTERVAL_SECS)
        );
        for bad in [
            set("", "nginx", false, 0),
            set("a/b", "nginx", false, 0),
            set("prod", "", false, 0),
            set("prod", "nginx", true, 5),
        ] {
            let e = check_set_tag(&bad, 30).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
        }
        assert_eq!(namespace_filter("").expect("ok"), None);
        assert_eq!(namespace_filter("team-a").expect("ok"), Some("team-a"));
        assert!(namespace_filter("Team").is_err());
        let resolve = |reference: &str, namespace: &str| pb::ResolveRequest {
            reference: reference.into(),
            namespace: namespace.into(),
        };
        assert_eq!(
            check_resolve(&resolve("app:prod", "team-a")).expect("ok"),
            Some("team-a")
        );
        assert!(check_resolve(&resolve("", "")).is_err());
        assert!(check_resolve(&resolve(&"a".repeat(5000), "")).is_err());
        let watch = |namespace: &str, name: &str| pb::WatchRequest {
            namespace: namespace.into(),
            name: name.into(),
        };
        assert!(check_watch(&watch("", "")).is_ok());
        assert!(check_watch(&watch("team-a", "app")).is_ok());
        assert!(check_watch(&watch("", "app")).is_err());
        assert!(check_cache_digest(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(check_cache_digest("sha256:../x").is_err());
    }
}
