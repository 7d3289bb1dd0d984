//! The stream service: every change to streams and tags goes through here. It validates names,
//! pins sources through the registry client, writes the store (read, modify, compare-and-swap)
//! and then swaps the resolution [`View`], so that the CRI path sees the change at once.

use super::model::{
    validate_access_pattern, Access, Generation, ImportCondition, NewGeneration, RollbackError,
    Schedule, Stream, StreamKey, Tag,
};
use super::names::{validate_namespace, NameError};
use super::reference::{classify, Classified, ReferenceError, TagRef};
use super::resolve::{resolve, Resolution, ResolveError, Snapshot, View};
use crate::registry::{PinnedManifest, RegistryClient, RegistryError};
use crate::signature::fetch::{Verifier, VerifyError};
use crate::signature::policy::{Mode, SignaturePolicy, Status, Verification};
use crate::signature::SignatureError;
use crate::store::{Expect, StoreError, StreamStore};
use std::sync::Arc;
use thiserror::Error;
use time::format_description::well_known::Rfc3339;

/// The `at` of [`StreamService::verify_tag`]'s checks: recorded, never refused.
const VERIFY: &str = "verify";

/// How often a write retries after losing a compare-and-swap race.
const CAS_RETRIES: usize = 8;

#[derive(Debug, Error)]
pub enum StreamError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("invalid value {source_ref:?}: {why}")]
    Source { source_ref: String, why: String },
    #[error("image stream {0} not found")]
    StreamNotFound(StreamKey),
    #[error("tag {tag:?} not found in image stream {stream}")]
    TagNotFound { stream: StreamKey, tag: String },
    #[error("image stream {0} already exists")]
    AlreadyExists(StreamKey),
    #[error("cannot roll back {tag}: {source}")]
    Rollback {
        tag: TagRef,
        #[source]
        source: RollbackError,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Store(StoreError),
    /// Under an `enforce` policy, a digest whose signature does not verify is not pinned.
    #[error(
        "{tag}: {digest} was not pinned: {reason} (signature policy: enforce); nothing was written"
    )]
    Unsigned {
        tag: TagRef,
        digest: String,
        reason: String,
    },
    #[error("invalid signature policy: {0}")]
    Policy(SignatureError),
    #[error("no signature policy applies to image stream {0}: set one with `imagestream stream policy {0} --key FILE --mode enforce` (or a node default in the config)")]
    NoPolicy(StreamKey),
}

impl From<StoreError> for StreamError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists(k) => StreamError::AlreadyExists(k),
            other => StreamError::Store(other),
        }
    }
}

/// Settings of the stream service.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Virtual registry host of explicit stream references.
    pub stream_host: String,
    /// Generations kept per tag.
    pub history_limit: usize,
}

pub struct StreamService {
    store: Arc<dyn StreamStore>,
    registry: RegistryClient,
    view: View,
    settings: StreamSettings,
    /// Serialises this node's writes; the store's compare-and-swap guards against others.
    write_lock: tokio::sync::Mutex<()>,
    /// Checks signatures (through the node cache); set once the cache is open.
    verifier: std::sync::OnceLock<Arc<Verifier>>,
}

/// How often an unchanged, healthy scheduled tag's check time is written to the store.
const CHECK_RECORD_EVERY: time::Duration = time::Duration::hours(1);

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "unknown".to_string())
}

impl StreamService {
    /// Builds the service and its view from everything in `store`.
    pub async fn new(
        store: Arc<dyn StreamStore>,
        registry: RegistryClient,
        settings: StreamSettings,
    ) -> Result<Self, StreamError> {
        let streams = store.list().await?;
        Ok(Self::with_view(
            store,
            registry,
            settings,
            View::new(Snapshot::new(streams)),
        ))
    }

    /// Builds the service over a view that something else keeps filled: a cluster store's
    /// watch ([`crate::store::etcd::feed`]) applies every change, this node's and others'.
    pub fn with_view(
        store: Arc<dyn StreamStore>,
        registry: RegistryClient,
        settings: StreamSettings,
        view: View,
    ) -> Self {
        Self {
            store,
            registry,
            view,
            settings,
            write_lock: tokio::sync::Mutex::new(()),
            verifier: std::sync::OnceLock::new(),
        }
    }

    /// Gives the service its signature verifier (once; later calls are ignored).
    pub fn set_verifier(&self, verifier: Arc<Verifier>) {
        let _ = self.verifier.set(verifier);
    }

    /// The signature policy that applies to stream `key` now (`None`: off).
    fn policy_of(&self, key: &StreamKey) -> Option<SignaturePolicy> {
        let snapshot = self.view.load();
        let stream = snapshot.get(key)?;
        snapshot.policy_for(stream).cloned()
    }

    /// Checks the signature of `pinned` for tag `t` under `policy` (`None`: nothing to check).
    /// `known` is what an earlier check of the same digest recorded (its signature manifest is
    /// looked at first). `at` names the operation, for metrics and logs. Under `enforce` a
    /// failure is [`StreamError::Unsigned`]; under `warn`, and for `tag verify` (`at` is
    /// [`VERIFY`]), it is recorded, logged and counted.
    async fn check_signature(
        &self,
        t: &TagRef,
        policy: Option<&SignaturePolicy>,
        pinned: &PinnedManifest,
        known: Option<&Verification>,
        at: &'static str,
    ) -> Result<Option<Verification>, StreamError> {
        let Some(policy) = policy else {
            return Ok(None);
        };
        let result = match (policy.trusted_keys(), self.verifier.get()) {
            (Err(e), _) => Err(VerifyError::Signature(e)),
            (Ok(_), None) => Err(VerifyError::Unavailable {
                message: "this node has no signature verifier".into(),
            }),
            (Ok(keys), Some(verifier)) => {
                let known = known
                    .filter(|v| !v.signature.is_empty())
                    .map(|v| v.signature.as_str());
                verifier.verify(&pinned.reference, &keys, known).await
            }
        };
        let m = crate::metrics::metrics();
        let checked = now_rfc3339();
        match result {
            Ok(v) => {
                m.signature_verified(policy.mode.as_str(), "verified");
                tracing::info!(stream = %tag_key(t), tag = %t.tag, digest = %pinned.digest, key = %v.key_name, signature = %v.signature, at, "signature verified");
                Ok(Some(Verification {
                    status: Status::Verified,
                    mode: policy.mode,
                    key: v.key_name,
                    key_id: v.key_id,
                    signature: v.signature.to_string(),
                    error: String::new(),
                    checked,
                }))
            }
            Err(e) => {
                m.signature_verified(policy.mode.as_str(), e.outcome());
                let reason = crate::audit::cap(e.to_string());
                // `tag verify` with the registry unreachable: a generation's earlier outcome
                // stands rather than becoming "cannot be fetched".
                if at == VERIFY && matches!(e, VerifyError::Unavailable { .. }) && known.is_some() {
                    tracing::warn!(stream = %tag_key(t), tag = %t.tag, digest = %pinned.digest, reason = %reason, "signature not checked again; the earlier outcome stands");
                    return Ok(known.cloned());
                }
                if policy.mode == Mode::Enforce && at != VERIFY {
                    m.signature_refused(at);
                    tracing::warn!(target: "imagestream::audit", action = "refuse-unsigned", stream = %tag_key(t), tag = %t.tag, digest = %pinned.digest, at, reason = %reason, "digest not pinned: its signature does not verify");
                    return Err(StreamError::Unsigned {
                        tag: t.clone(),
                        digest: pinned.digest.clone(),
                        reason,
                    });
                }
                if at == VERIFY {
                    tracing::warn!(stream = %tag_key(t), tag = %t.tag, digest = %pinned.digest, reason = %reason, "signature does not verify");
                } else {
                    tracing::warn!(stream = %tag_key(t), tag = %t.tag, digest = %pinned.digest, at, reason = %reason, "signature does not verify; pinned anyway (signature policy: warn)");
                }
                Ok(Some(Verification {
                    status: Status::Failed,
                    mode: policy.mode,
                    key: String::new(),
                    key_id: String::new(),
                    signature: String::new(),
                    error: reason,
                    checked,
                }))
            }
        }
    }

    /// Sets stream `key`'s signature policy: `mode` with the `(name, PEM)` keys; `None` for
    /// `mode` removes the stream's own policy (the node's default applies).
    pub async fn set_policy(
        &self,
        key: &StreamKey,
        mode: Option<Mode>,
        keys: &[(String, Vec<u8>)],
    ) -> Result<Stream, StreamError> {
        let policy = match mode {
            Some(mode) => Some(SignaturePolicy::new(mode, keys).map_err(StreamError::Policy)?),
            None => None,
        };
        self.update(key, |stream| {
            tracing::info!(
                target: "imagestream::audit",
                action = "set-signature-policy",
                stream = %key,
                before = ?stream.policy.as_ref().map(|p| (p.mode, p.keys.iter().map(|k| k.name.clone()).collect::<Vec<_>>())),
                after = ?policy.as_ref().map(|p| (p.mode, p.keys.iter().map(|k| k.name.clone()).collect::<Vec<_>>())),
                "signature policy changed"
            );
            stream.policy = policy.clone();
            Ok(())
        })
        .await
    }

    /// Verifies again every kept generation of `t` under the stream's policy and records the
    /// outcome in each (verified or not, whatever the mode). Returns the tag.
    #[tracing::instrument(skip(self, t), fields(stream = %tag_key(t), tag = %t.tag))]
    pub async fn verify_tag(&self, t: &TagRef) -> Result<Tag, StreamError> {
        let tag = self.get_tag(t)?;
        let key = tag_key(t);
        let Some(policy) = self.policy_of(&key) else {
            return Err(StreamError::NoPolicy(key));
        };
        // Every outcome is recorded, none refused here.
        let mut outcomes: std::collections::HashMap<String, Verification> = Default::default();
        for g in &tag.generations {
            if outcomes.contains_key(&g.digest) {
                continue;
            }
            let pinned = PinnedManifest {
                digest: g.digest.clone(),
                reference: g.reference.clone(),
            };
            if let Some(v) = self
                .check_signature(t, Some(&policy), &pinned, g.verification.as_ref(), VERIFY)
                .await?
            {
                outcomes.insert(g.digest.clone(), v);
            }
        }
        self.update_tag(t, |tag| {
            for g in &mut tag.generations {
                if let Some(v) = outcomes.get(&g.digest) {
                    g.verification = Some(v.clone());
                }
            }
            Ok(())
        })
        .await
    }

    /// The resolution view, shared with the CRI proxy.
    pub fn view(&self) -> View {
        self.view.clone()
    }

    pub fn settings(&self) -> &StreamSettings {
        &self.settings
    }

    /// Resolves `reference` as a pod in `namespace` would see it.
    pub fn resolve(
        &self,
        reference: &str,
        namespace: Option<&str>,
    ) -> Result<Resolution, ResolveError> {
        resolve(
            &self.view.load(),
            &self.settings.stream_host,
            reference,
            namespace,
        )
    }

    pub async fn create(&self, key: StreamKey, lookup_local: bool) -> Result<Stream, StreamError> {
        validate_key(&key)?;
        let _guard = self.write_lock.lock().await;
        let stream = Stream::new(&key, lookup_local);
        let written = self.store.put(&stream, Expect::Absent).await?;
        self.view
            .apply_at(&key, Some(stream.clone()), written.revision);
        tracing::info!(stream = %key, lookup_local, "stream created");
        Ok(stream)
    }

    /// Streams of `namespace` (all when `None`), sorted by key.
    pub fn list(&self, namespace: Option<&str>) -> Vec<Stream> {
        let mut out: Vec<Stream> = self
            .view
            .load()
            .streams()
            .filter(|s| namespace.is_none_or(|ns| s.namespace == ns))
            .map(|s| Stream::clone(s))
            .collect();
        out.sort_by_key(Stream::key);
        out
    }

    pub fn get(&self, key: &StreamKey) -> Result<Stream, StreamError> {
        validate_key(key)?;
        self.view
            .load()
            .get(key)
            .map(|s| Stream::clone(s))
            .ok_or_else(|| StreamError::StreamNotFound(key.clone()))
    }

    pub fn get_tag(&self, t: &TagRef) -> Result<Tag, StreamError> {
        let stream = self.get(&tag_key(t))?;
        stream
            .tags
            .get(&t.tag)
            .cloned()
            .ok_or_else(|| StreamError::TagNotFound {
                stream: tag_key(t),
                tag: t.tag.clone(),
            })
    }

    pub async fn delete(&self, key: &StreamKey) -> Result<(), StreamError> {
        validate_key(key)?;
        let _guard = self.write_lock.lock().await;
        let Some(written) = self.store.delete(key).await? else {
            return Err(StreamError::StreamNotFound(key.clone()));
        };
        self.view.apply_at(key, None, written.revision);
        tracing::info!(stream = %key, "stream deleted");
        Ok(())
    }

    /// Changes a stream's access list: `reset` empties it, then `remove` patterns go, then
    /// `allow` and `deny` patterns are added.
    pub async fn update_access(
        &self,
        key: &StreamKey,
        allow: &[String],
        deny: &[String],
        remove: &[String],
        reset: bool,
    ) -> Result<Stream, StreamError> {
        for p in allow.iter().chain(deny).chain(remove) {
            validate_access_pattern(p).map_err(|why| StreamError::Source {
                source_ref: p.clone(),
                why,
            })?;
        }
        let stream = self
            .update(key, |stream| {
                let before = stream.access.clone();
                let access = &mut stream.access;
                if reset {
                    *access = Access::default();
                }
                access.allow.retain(|p| !remove.contains(p));
                access.deny.retain(|p| !remove.contains(p));
                for p in allow {
                    if !access.allow.contains(p) {
                        access.allow.push(p.clone());
                    }
                }
                for p in deny {
                    if !access.deny.contains(p) {
                        access.deny.push(p.clone());
                    }
                }
                tracing::info!(
                    target: "imagestream::audit",
                    action = "update-access",
                    stream = %key,
                    before = ?before,
                    after = ?stream.access,
                    "stream access changed"
                );
                Ok(())
            })
            .await?;
        Ok(stream)
    }

    /// Points `t` at `source`, resolved and verified in its registry now.
    #[tracing::instrument(skip(self, t), fields(stream = %tag_key(t), tag = %t.tag, digest))]
    pub async fn set_tag(&self, t: &TagRef, source: &str) -> Result<Tag, StreamError> {
        self.set_tag_scheduled(t, source, None).await
    }

    /// Like [`StreamService::set_tag`]; with a schedule the importer re-resolves the source
    /// every interval, without one the tag stops following it.
    #[tracing::instrument(skip(self, t), fields(stream = %tag_key(t), tag = %t.tag, digest))]
    pub async fn set_tag_scheduled(
        &self,
        t: &TagRef,
        source: &str,
        schedule: Option<Schedule>,
    ) -> Result<Tag, StreamError> {
        self.get(&tag_key(t))?;
        self.check_follow_cycle(t, source)?;
        let pinned = self.pin_source(source).await?;
        tracing::Span::current().record("digest", pinned.digest.as_str());
        let policy = self.policy_of(&tag_key(t));
        let verification = self
            .check_signature(t, policy.as_ref(), &pinned, None, "set")
            .await?;
        let tag = self
            .push_generation(t, source, &pinned, "set", verification, |tag| {
                tag.schedule = schedule;
                tag.condition = schedule.map(|_| ImportCondition {
                    last_check: now_rfc3339(),
                    last_success: now_rfc3339(),
                    ..ImportCondition::default()
                });
            })
            .await?;
        tracing::info!(reference = %pinned.reference, "tag set");
        Ok(tag)
    }

    /// Re-resolves `t`'s source now. A new digest appends a generation with cause `import`;
    /// the same digest changes nothing. Returns the tag and whether it moved.
    #[tracing::instrument(skip(self, t), fields(stream = %tag_key(t), tag = %t.tag, digest))]
    pub async fn import(&self, t: &TagRef) -> Result<(Tag, bool), StreamError> {
        let tag = self.get_tag(t)?;
        let pinned = self.pin_source(&tag.source).await?;
        tracing::Span::current().record("digest", pinned.digest.as_str());
        if tag.current().is_some_and(|g| g.digest == pinned.digest) {
            tracing::info!("import: the source still points at the current digest");
            return Ok((tag, false));
        }
        let policy = self.policy_of(&tag_key(t));
        let verification = self
            .check_signature(t, policy.as_ref(), &pinned, None, "import")
            .await?;
        let tag = self
            .push_generation(t, &tag.source, &pinned, "import", verification, |_| {})
            .await?;
        tracing::info!(reference = %pinned.reference, "tag imported");
        Ok((tag, true))
    }

    /// One scheduled check of `t`'s source: a new digest appends a generation with cause
    /// `import`; the outcome (success, or the error) is recorded as the tag's condition and a
    /// failure leaves the tag where it is. A HEAD request answers when the digest is unchanged.
    /// Returns the condition after the check.
    #[tracing::instrument(skip(self, t), fields(stream = %tag_key(t), tag = %t.tag, digest))]
    pub async fn scheduled_import(&self, t: &TagRef) -> Result<ImportCondition, StreamError> {
        let tag = self.get_tag(t)?;
        let current = tag.current().map(|g| g.digest.clone());
        let outcome: Result<Option<PinnedManifest>, String> =
            match classify(&tag.source, &self.settings.stream_host) {
                Ok(Classified::Stream(_)) => self
                    .pin_source(&tag.source)
                    .await
                    .map(Some)
                    .map_err(|e| e.to_string()),
                _ => match self.registry.head_digest(&tag.source).await {
                    Ok(d) if Some(&d) == current.as_ref() => Ok(None),
                    _ => self
                        .registry
                        .pin(&tag.source)
                        .await
                        .map(Some)
                        .map_err(|e| e.to_string()),
                },
            };
        let mut outcome = outcome;
        let mut moved_to = match &outcome {
            Ok(Some(p)) if Some(&p.digest) != current.as_ref() => Some(p.clone()),
            _ => None,
        };
        // A new digest must pass the signature policy; under `enforce` one that does not is
        // a failed check: the tag keeps its pin, the condition says why.
        let mut verification = None;
        if let Some(p) = &moved_to {
            let policy = self.policy_of(&tag_key(t));
            match self
                .check_signature(t, policy.as_ref(), p, None, "scheduled-import")
                .await
            {
                Ok(v) => verification = v,
                Err(e) => {
                    outcome = Err(e.to_string());
                    moved_to = None;
                }
            }
        }
        let moved = moved_to.is_some();
        // Nothing changed and the tag was already fine: record the check at most hourly, so a
        // steady tag costs no disk write per check.
        if !moved && outcome.is_ok() {
            if let Some(c) = tag.condition.as_ref().filter(|c| c.error.is_empty()) {
                let recent = time::OffsetDateTime::parse(&c.last_check, &Rfc3339)
                    .map(|t| time::OffsetDateTime::now_utc() - t < CHECK_RECORD_EVERY)
                    .unwrap_or(false);
                if recent {
                    return Ok(c.clone());
                }
            }
        }
        let now = now_rfc3339();
        let record = |tag: &mut Tag| {
            let c = tag.condition.get_or_insert_with(ImportCondition::default);
            c.last_check = now.clone();
            match &outcome {
                Ok(_) => {
                    c.last_success = now.clone();
                    c.error.clear();
                    c.consecutive_failures = 0;
                }
                Err(e) => {
                    c.error = crate::audit::cap(e.clone());
                    c.consecutive_failures = c.consecutive_failures.saturating_add(1);
                }
            }
        };
        // One write: the new generation (if any) together with the check's outcome.
        let tag = match moved_to {
            Some(p) => {
                tracing::Span::current().record("digest", p.digest.as_str());
                let tag = self
                    .push_generation(t, &tag.source, &p, "import", verification, record)
                    .await?;
                tracing::info!(reference = %p.reference, "scheduled import moved the tag");
                tag
            }
            None => {
                self.update_tag(t, |tag| {
                    record(tag);
                    Ok(())
                })
                .await?
            }
        };
        if let Err(e) = &outcome {
            tracing::warn!(error = %e, moved, "scheduled import failed; the tag keeps its digest");
        }
        Ok(tag.condition.unwrap_or_default())
    }

    async fn update_tag(
        &self,
        t: &TagRef,
        mut f: impl FnMut(&mut Tag) -> Result<(), StreamError>,
    ) -> Result<Tag, StreamError> {
        let stream = self
            .update(&tag_key(t), |stream| {
                let tag = stream
                    .tags
                    .get_mut(&t.tag)
                    .ok_or_else(|| StreamError::TagNotFound {
                        stream: tag_key(t),
                        tag: t.tag.clone(),
                    })?;
                f(tag)
            })
            .await?;
        take_tag(stream, t)
    }

    /// The stream tag `source` names, if it names one.
    fn followed(&self, source: &str) -> Option<TagRef> {
        match classify(source, &self.settings.stream_host) {
            Ok(Classified::Stream(other)) => Some(other),
            _ => None,
        }
    }

    /// Refuses a source that leads back to `t` through other stream tags, naming the cycle.
    fn check_follow_cycle(&self, t: &TagRef, source: &str) -> Result<(), StreamError> {
        let snapshot = self.view.load();
        let mut chain = vec![t.to_string()];
        let mut next = self.followed(source);
        while let Some(cur) = next {
            chain.push(cur.to_string());
            if cur == *t {
                return Err(StreamError::Source {
                    source_ref: source.to_string(),
                    why: format!(
                        "tags would follow each other in a cycle: {}",
                        chain.join(" -> ")
                    ),
                });
            }
            if chain.len() > 64 {
                break;
            }
            next = snapshot
                .get(&StreamKey::new(&cur.namespace, &cur.name))
                .and_then(|s| s.tags.get(&cur.tag))
                .and_then(|tag| self.followed(&tag.source));
        }
        Ok(())
    }

    /// Moves every tag whose source is the stream tag `moved` to `moved`'s current image, with
    /// cause `follows NS/NAME:TAG`. Returns how many moved. (Their own events then move the
    /// tags that follow them.)
    pub async fn propagate(&self, moved: &TagRef) -> Result<usize, StreamError> {
        let snapshot = self.view.load();
        let Some(current) = snapshot
            .get(&StreamKey::new(&moved.namespace, &moved.name))
            .and_then(|s| s.tags.get(&moved.tag))
            .and_then(|t| t.current().cloned())
        else {
            return Ok(0);
        };
        let followers: Vec<(TagRef, String)> = snapshot
            .streams()
            .flat_map(|s| {
                s.tags.values().filter_map(|tag| {
                    let follows = self.followed(&tag.source)? == *moved;
                    let behind = tag
                        .current()
                        .map(|g| g.digest != current.digest)
                        .unwrap_or(true);
                    (follows && behind).then(|| {
                        (
                            TagRef {
                                namespace: s.namespace.clone(),
                                name: s.name.clone(),
                                tag: tag.name.clone(),
                            },
                            tag.source.clone(),
                        )
                    })
                })
            })
            .collect();
        let pinned = PinnedManifest {
            digest: current.digest.clone(),
            reference: current.reference.clone(),
        };
        let mut count = 0;
        for (t, source) in &followers {
            // The source tag's own check stands if the follower's policy trusts its key.
            let policy = self.policy_of(&tag_key(t));
            let verification = match &policy {
                Some(p) if p.accepts(current.verification.as_ref()) => {
                    current.verification.clone().map(|mut v| {
                        v.mode = p.mode;
                        v
                    })
                }
                _ => {
                    match self
                        .check_signature(
                            t,
                            policy.as_ref(),
                            &pinned,
                            current.verification.as_ref(),
                            "follow",
                        )
                        .await
                    {
                        Ok(v) => v,
                        // Under `enforce` this follower stays where it is; the others move.
                        Err(e) => {
                            tracing::warn!(tag = %t, follows = %moved, error = %e, "tag did not follow its source tag");
                            continue;
                        }
                    }
                }
            };
            self.push_generation(
                t,
                source,
                &pinned,
                &format!("follows {moved}"),
                verification,
                |_| {},
            )
            .await?;
            tracing::info!(tag = %t, follows = %moved, digest = %pinned.digest, "tag followed its source tag");
            count += 1;
        }
        Ok(count)
    }

    /// Resolves `source` (an image reference, or another stream's tag) to a pinned manifest.
    async fn pin_source(&self, source: &str) -> Result<PinnedManifest, StreamError> {
        let source_err = |why: &str| StreamError::Source {
            source_ref: source.to_string(),
            why: why.to_string(),
        };
        let pinned = match classify(source, &self.settings.stream_host) {
            Err(e) => return Err(source_err(&e.to_string())),
            // Another stream's tag: pin what it points at now; [`StreamService::propagate`]
            // moves this tag when that one moves.
            Ok(Classified::Stream(other)) => match self.resolve(source, None)? {
                Resolution::Pinned(p) => PinnedManifest {
                    digest: p.digest,
                    reference: p.reference,
                },
                _ => return Err(source_err(&format!("{other} does not resolve"))),
            },
            Ok(_) => self.registry.pin(source).await?,
        };
        Ok(pinned)
    }

    /// Appends a generation for `pinned` to `t` (created if missing) with `cause`.
    async fn push_generation(
        &self,
        t: &TagRef,
        source: &str,
        pinned: &PinnedManifest,
        cause: &str,
        verification: Option<Verification>,
        mut also: impl FnMut(&mut Tag),
    ) -> Result<Tag, StreamError> {
        let limit = self.settings.history_limit;
        let stream = self
            .update(&tag_key(t), |stream| {
                let tag = stream.tags.entry(t.tag.clone()).or_insert_with(|| Tag {
                    schedule: None,
                    condition: None,
                    name: t.tag.clone(),
                    source: source.to_string(),
                    generations: Vec::new(),
                });
                tag.source = source.to_string();
                tag.push(
                    NewGeneration {
                        digest: pinned.digest.clone(),
                        reference: pinned.reference.clone(),
                        created: now_rfc3339(),
                        cause: cause.into(),
                        source: source.to_string(),
                        verification: verification.clone(),
                    },
                    limit,
                );
                also(tag);
                Ok(())
            })
            .await?;
        take_tag(stream, t)
    }

    /// Appends a generation pointing at an older digest.
    #[tracing::instrument(skip(self, t), fields(stream = %tag_key(t), tag = %t.tag, digest))]
    pub async fn rollback(&self, t: &TagRef, to: Option<u64>) -> Result<Tag, StreamError> {
        let limit = self.settings.history_limit;
        // The target passes the signature policy first (its recorded signature manifest is
        // in the cache, so this works with the registry down).
        let target = rollback_target(&self.get_tag(t)?, t, to)?;
        let policy = self.policy_of(&tag_key(t));
        let pinned = PinnedManifest {
            digest: target.digest.clone(),
            reference: target.reference.clone(),
        };
        let verification = match &policy {
            None => target.verification.clone(),
            Some(p) => {
                self.check_signature(
                    t,
                    Some(p),
                    &pinned,
                    target.verification.as_ref(),
                    "rollback",
                )
                .await?
            }
        };
        let stream = self
            .update(&tag_key(t), |stream| {
                let tag = stream
                    .tags
                    .get_mut(&t.tag)
                    .ok_or_else(|| StreamError::TagNotFound {
                        stream: tag_key(t),
                        tag: t.tag.clone(),
                    })?;
                let target = rollback_target(tag, t, to)?;
                if target.digest != pinned.digest {
                    return Err(StreamError::Store(StoreError::Conflict(tag_key(t))));
                }
                tag.push(
                    NewGeneration {
                        digest: target.digest,
                        reference: target.reference,
                        created: now_rfc3339(),
                        cause: format!("rollback to generation {}", target.generation),
                        source: target.source,
                        verification: verification.clone(),
                    },
                    limit,
                );
                Ok(())
            })
            .await?;
        let tag = take_tag(stream, t)?;
        if let Some(g) = tag.current() {
            tracing::Span::current().record("digest", g.digest.as_str());
            tracing::info!(cause = %g.cause, "tag rolled back");
        }
        Ok(tag)
    }

    pub async fn delete_tag(&self, t: &TagRef) -> Result<(), StreamError> {
        self.update(&tag_key(t), |stream| {
            stream
                .tags
                .remove(&t.tag)
                .map(|_| ())
                .ok_or_else(|| StreamError::TagNotFound {
                    stream: tag_key(t),
                    tag: t.tag.clone(),
                })
        })
        .await?;
        tracing::info!(stream = %tag_key(t), tag = %t.tag, "tag deleted");
        Ok(())
    }

    /// Read, modify with `f`, compare-and-swap; retried when another writer won. Returns the
    /// stream after the change.
    async fn update(
        &self,
        key: &StreamKey,
        mut f: impl FnMut(&mut Stream) -> Result<(), StreamError>,
    ) -> Result<Stream, StreamError> {
        let key = key.clone();
        validate_key(&key)?;
        let _guard = self.write_lock.lock().await;
        for _ in 0..CAS_RETRIES {
            let mut stream = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| StreamError::StreamNotFound(key.clone()))?;
            let expect = Expect::Revision(stream.revision);
            f(&mut stream)?;
            stream.revision += 1;
            match self.store.put(&stream, expect).await {
                Ok(written) => {
                    self.view
                        .apply_at(&key, Some(stream.clone()), written.revision);
                    return Ok(stream);
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StreamError::Store(StoreError::Conflict(key)))
    }
}

/// The generation a rollback of `t` to `to` goes to ([`Tag::rollback_target`]).
fn rollback_target(tag: &Tag, t: &TagRef, to: Option<u64>) -> Result<Generation, StreamError> {
    tag.rollback_target(to)
        .cloned()
        .map_err(|source| StreamError::Rollback {
            tag: t.clone(),
            source,
        })
}

fn take_tag(mut stream: Stream, t: &TagRef) -> Result<Tag, StreamError> {
    stream
        .tags
        .remove(&t.tag)
        .ok_or_else(|| StreamError::TagNotFound {
            stream: tag_key(t),
            tag: t.tag.clone(),
        })
}

fn tag_key(t: &TagRef) -> StreamKey {
    StreamKey::new(&t.namespace, &t.name)
}

/// Checks a stream's namespace and name.
pub fn validate_key(key: &StreamKey) -> Result<(), NameError> {
    validate_namespace(&key.namespace)?;
    super::names::validate_stream_name(&key.name)
}
