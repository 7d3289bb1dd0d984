//! Resolution of image references through stream tags, for the CRI path and `imagestream
//! resolve`. It reads only the in-memory [`View`]: no disk, no network, no lock held across an
//! await. The stream service replaces the view after every successful store write.

use super::events::{diff, TagEvent, EVENT_BUFFER};
use super::model::{Stream, StreamKey};
use super::reference::{classify, Classified, ReferenceError, TagRef};
use crate::signature::policy::{Mode, SignaturePolicy};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use thiserror::Error;

/// An immutable snapshot of every stream, indexed for resolution.
#[derive(Debug, Default)]
pub struct Snapshot {
    streams: HashMap<StreamKey, Arc<Stream>>,
    /// Names of the streams that have `lookup_local`, in any namespace.
    local_names: HashSet<String>,
    /// The node's default signature policy (the config's), for streams without their own.
    default_policy: Option<Arc<SignaturePolicy>>,
}

impl Snapshot {
    pub fn new(streams: impl IntoIterator<Item = Stream>) -> Self {
        Self::from_arcs(
            streams
                .into_iter()
                .map(|s| (s.key(), Arc::new(s)))
                .collect(),
        )
    }

    fn from_arcs(streams: HashMap<StreamKey, Arc<Stream>>) -> Self {
        let local_names = streams
            .values()
            .filter(|s| s.lookup_local)
            .map(|s| s.name.clone())
            .collect();
        Self {
            streams,
            local_names,
            default_policy: None,
        }
    }

    /// The signature policy that applies to `stream`: its own, else the node's default;
    /// `None` when that is `off`.
    pub fn policy_for<'a>(&'a self, stream: &'a Stream) -> Option<&'a SignaturePolicy> {
        stream
            .policy
            .as_ref()
            .or(self.default_policy.as_deref())
            .filter(|p| p.mode != Mode::Off)
    }

    pub fn get(&self, key: &StreamKey) -> Option<&Arc<Stream>> {
        self.streams.get(key)
    }

    pub fn streams(&self) -> impl Iterator<Item = &Arc<Stream>> {
        self.streams.values()
    }
}

/// The current snapshot, swapped whole on every change; [`View::subscribe`] tells watchers
/// (the cache's prefetch) that it changed.
#[derive(Debug, Clone)]
pub struct View {
    inner: Arc<RwLock<Arc<Snapshot>>>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    events: tokio::sync::broadcast::Sender<TagEvent>,
    sequence: Arc<std::sync::atomic::AtomicU64>,
    /// Serialises changes (read, modify, swap) and remembers, per stream, the store revision
    /// of the last change applied (deletions included), so that a late watch event never
    /// undoes a newer local write.
    applied: Arc<std::sync::Mutex<HashMap<StreamKey, u64>>>,
    /// The node's default signature policy, carried into every snapshot.
    default_policy: Arc<RwLock<Option<Arc<SignaturePolicy>>>>,
}

impl Default for View {
    fn default() -> Self {
        Self::new(Snapshot::default())
    }
}

impl View {
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            inner: Arc::new(RwLock::new(Arc::new(snapshot))),
            changes: Arc::new(tokio::sync::watch::channel(0).0),
            events: tokio::sync::broadcast::channel(EVENT_BUFFER).0,
            sequence: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            applied: Arc::new(std::sync::Mutex::new(HashMap::new())),
            default_policy: Arc::new(RwLock::new(None)),
        }
    }

    /// Sets the node's default signature policy (from the config), for streams that have
    /// none of their own.
    pub fn set_default_policy(&self, policy: Option<SignaturePolicy>) {
        match self.default_policy.write() {
            Ok(mut g) => *g = policy.map(Arc::new),
            Err(p) => *p.into_inner() = policy.map(Arc::new),
        }
        self.store(Snapshot::from_arcs(self.load().streams.clone()));
    }

    /// Every tag change from now on (see [`super::events`]).
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<TagEvent> {
        self.events.subscribe()
    }

    fn publish(&self, events: Vec<TagEvent>) {
        if events.is_empty() {
            return;
        }
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        for mut e in events {
            e.sequence = self
                .sequence
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            e.time = time.clone();
            tracing::info!(
                target: "imagestream::events",
                stream = %format!("{}/{}", e.namespace, e.stream),
                tag = %e.tag,
                old = e.old_digest.as_deref().unwrap_or("-"),
                digest = e.new_digest.as_deref().unwrap_or("-"),
                generation = e.generation,
                cause = %e.cause,
                "tag changed"
            );
            // No receivers is fine: nobody is watching.
            let _ = self.events.send(e);
        }
    }

    /// A receiver that is marked changed after every [`View::store`].
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn load(&self) -> Arc<Snapshot> {
        match self.inner.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn store(&self, mut snapshot: Snapshot) {
        snapshot.default_policy = match self.default_policy.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let snapshot = Arc::new(snapshot);
        match self.inner.write() {
            Ok(mut guard) => *guard = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// Applies one changed (or, with `None`, deleted) stream to a copy of the snapshot.
    pub fn apply(&self, key: &StreamKey, stream: Option<Stream>) {
        self.apply_at(key, stream, None);
    }

    /// Like [`View::apply`], for a change at store revision `revision` (a cluster store's):
    /// a change at or below the revision last applied to that stream is stale and ignored.
    pub fn apply_at(&self, key: &StreamKey, stream: Option<Stream>, revision: Option<u64>) {
        let mut applied = match self.applied.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(r) = revision {
            if applied.get(key).is_some_and(|last| *last >= r) {
                return;
            }
            applied.insert(key.clone(), r);
        }
        let current = self.load();
        let events = diff(current.get(key).map(|s| s.as_ref()), stream.as_ref());
        let mut streams = current.streams.clone();
        match stream {
            Some(s) => streams.insert(key.clone(), Arc::new(s)),
            None => streams.remove(key),
        };
        self.store(Snapshot::from_arcs(streams));
        drop(applied);
        self.publish(events);
    }

    /// Replaces every stream with `streams` as listed at store revision `revision` (a cluster
    /// store's re-list after its watch broke), raising an event for each tag that differs.
    pub fn replace_all(&self, streams: Vec<(Stream, u64)>, revision: u64) {
        let mut applied = match self.applied.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let current = self.load();
        let mut events = Vec::new();
        let mut next: HashMap<StreamKey, Arc<Stream>> = HashMap::new();
        for (stream, mod_revision) in streams {
            let key = stream.key();
            events.extend(diff(current.get(&key).map(|s| s.as_ref()), Some(&stream)));
            applied.insert(key.clone(), mod_revision);
            next.insert(key, Arc::new(stream));
        }
        for (key, old) in current.streams.iter() {
            if !next.contains_key(key) {
                events.extend(diff(Some(old.as_ref()), None));
                applied.insert(key.clone(), revision);
            }
        }
        self.store(Snapshot::from_arcs(next));
        drop(applied);
        self.publish(events);
    }
}

/// A stream tag resolved to its pinned digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    pub tag: TagRef,
    pub generation: u64,
    pub digest: String,
    /// `registry/repository@sha256:<hex>`: what the runtime is asked for.
    pub reference: String,
    /// Why the stream's signature policy (`enforce`) does not let this generation run.
    pub refused: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Not a stream reference: hand it to the runtime unchanged.
    PassThrough,
    /// A stream tag and what it points at now.
    Pinned(Pinned),
    /// A short name that may name a stream, asked without a namespace (ImageStatus,
    /// RemoveImage): answer "not present" so that the kubelet goes on to PullImage.
    NeedsNamespace { name: String, tag: String },
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ResolveError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("image stream {namespace}/{name} not found (reference {reference:?})")]
    UnknownStream {
        namespace: String,
        name: String,
        reference: String,
    },
    #[error("pods of namespace {pod_namespace} may not use image stream {namespace}/{name} (reference {reference:?}); the stream's owner can allow it with `imagestream stream access {namespace}/{name} --allow {pod_namespace}`")]
    Denied {
        pod_namespace: String,
        namespace: String,
        name: String,
        reference: String,
    },
    #[error("tag {tag:?} not found in image stream {namespace}/{name} (reference {reference:?})")]
    UnknownTag {
        namespace: String,
        name: String,
        tag: String,
        reference: String,
    },
}

/// Resolves `reference` for a pod in `namespace` (if known); a known namespace must be allowed
/// by the stream's access list.
///
/// A short name counts as a stream reference only where some stream of that name has
/// `lookup_local`; then it resolves in the pod's namespace or is `UnknownStream` there.
pub fn resolve(
    snapshot: &Snapshot,
    stream_host: &str,
    reference: &str,
    namespace: Option<&str>,
) -> Result<Resolution, ResolveError> {
    let tag_ref = match classify(reference, stream_host)? {
        Classified::Other => return Ok(Resolution::PassThrough),
        Classified::Stream(t) => t,
        Classified::ShortName { name, tag } => {
            if !snapshot.local_names.contains(&name) {
                return Ok(Resolution::PassThrough);
            }
            let Some(namespace) = namespace.filter(|n| !n.is_empty()) else {
                return Ok(Resolution::NeedsNamespace { name, tag });
            };
            let key = StreamKey::new(namespace, &name);
            if !snapshot.get(&key).is_some_and(|s| s.lookup_local) {
                return Err(ResolveError::UnknownStream {
                    namespace: key.namespace,
                    name: key.name,
                    reference: reference.to_string(),
                });
            }
            TagRef {
                namespace: key.namespace,
                name: key.name,
                tag,
            }
        }
    };
    let key = StreamKey::new(&tag_ref.namespace, &tag_ref.name);
    let stream = snapshot
        .get(&key)
        .ok_or_else(|| ResolveError::UnknownStream {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            reference: reference.to_string(),
        })?;
    if let Some(pod_namespace) = namespace.filter(|n| !n.is_empty()) {
        if !stream.allows(pod_namespace) {
            return Err(ResolveError::Denied {
                pod_namespace: pod_namespace.to_string(),
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                reference: reference.to_string(),
            });
        }
    }
    let generation = stream
        .tags
        .get(&tag_ref.tag)
        .and_then(|t| t.current())
        .ok_or_else(|| ResolveError::UnknownTag {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            tag: tag_ref.tag.clone(),
            reference: reference.to_string(),
        })?;
    let refused = snapshot
        .policy_for(stream)
        .and_then(|p| p.refuses(generation.verification.as_ref()));
    Ok(Resolution::Pinned(Pinned {
        refused,
        generation: generation.generation,
        digest: generation.digest.clone(),
        reference: generation.reference.clone(),
        tag: tag_ref,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::model::Tag;

    const H: &str = "imagestream.local";

    fn snapshot() -> Snapshot {
        let mut s = Stream::new(&StreamKey::new("team-a", "app"), true);
        let mut t = Tag {
            schedule: None,
            condition: None,
            name: "prod".into(),
            source: "r/app:v1".into(),
            generations: vec![],
        };
        t.push(
            crate::stream::model::NewGeneration {
                digest: "sha256:aa".into(),
                reference: "r/app@sha256:aa".into(),
                created: "now".into(),
                cause: "set".into(),
                source: "r/app:v1".into(),
                verification: None,
            },
            20,
        );
        s.tags.insert("prod".into(), t);
        Snapshot::new([s])
    }

    #[test]
    fn explicit_and_short() {
        let s = snapshot();
        let Ok(Resolution::Pinned(p)) = resolve(&s, H, "imagestream.local/team-a/app:prod", None)
        else {
            panic!("not pinned")
        };
        assert_eq!(p.reference, "r/app@sha256:aa");
        assert!(matches!(
            resolve(&s, H, "app:prod", Some("team-a")),
            Ok(Resolution::Pinned(_))
        ));
        assert!(matches!(
            resolve(&s, H, "app:prod", None),
            Ok(Resolution::NeedsNamespace { .. })
        ));
        assert!(matches!(
            resolve(&s, H, "app:prod", Some("team-b")),
            Err(ResolveError::UnknownStream { .. })
        ));
        assert_eq!(
            resolve(&s, H, "nginx:1", Some("team-a")),
            Ok(Resolution::PassThrough)
        );
        assert!(matches!(
            resolve(&s, H, "imagestream.local/team-a/app:dev", None),
            Err(ResolveError::UnknownTag { .. })
        ));
        assert!(matches!(
            resolve(&s, H, "imagestream.local/team-a/app:prod", Some("team-b")),
            Err(ResolveError::Denied { .. })
        ));
        assert!(matches!(
            resolve(&s, H, "imagestream.local/bad", None),
            Err(ResolveError::Reference(_))
        ));
    }
}
