//! The cluster store: streams in etcd, shared by every node of a cluster.
//!
//! What it owns:
//! - [`EtcdStore`]: the [`StreamStore`] on etcd. One key per stream,
//!   `<prefix>streams/<namespace>/<name>`, holding the stream's JSON record. Every write is an
//!   etcd transaction that compares the key's `mod_revision` (or, for a create, that the key
//!   does not exist), so two nodes moving the same tag at once never lose a generation: the
//!   loser re-reads and retries in the stream service.
//! - [`feed`]: keeps a node's resolution [`View`] equal to etcd: list the prefix, then watch it
//!   from the list's revision; a compacted or broken watch re-lists. The CRI path reads only
//!   the view, so it never waits on etcd. Every list is also saved to `cluster-view.json` in
//!   the state dir, so a node that restarts while etcd is down starts from what it last saw.
//! - [`elect`]: the importer election. One node holds `<prefix>leader/importer` under a lease
//!   of `etcd_lease_ttl_secs`; when it dies its lease expires and a waiting node takes over.
//! - [`ClusterStatus`]: what `imagestream status` and the `imagestream_store_*` metrics show:
//!   connected or not, the revision the view has reached, how stale it is, who imports.
//!
//! Fail-static: with etcd unreachable the view keeps answering, writes fail with
//! [`StoreError::Unavailable`] naming the endpoints within [`REQUEST_TIMEOUT`], and the feed
//! keeps retrying, so a node catches up without a restart.

use super::{Expect, StoreError, StreamStore, Written};
use crate::stream::model::{Stream, StreamKey};
use crate::stream::resolve::View;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Default etcd endpoint (`etcd_endpoints`).
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";
/// Default key prefix (`etcd_prefix`); every key imagestream writes starts with it.
pub const DEFAULT_PREFIX: &str = "/imagestream/";
/// Default importer lease TTL (`etcd_lease_ttl_secs`): how long a dead importer keeps the job.
pub const DEFAULT_LEASE_TTL_SECS: u64 = 10;
/// How long a connection attempt to an endpoint may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one store call may take before it fails with `Unavailable`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 keep-alive: a dead connection (and with it the watch) is noticed within about
/// twice this.
pub const KEEPALIVE: Duration = Duration::from_secs(2);
/// How often the feed asks etcd for watch progress; the answer tells the view is current.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A watch that has said nothing (not even progress) for this long is re-established.
pub const WATCH_SILENCE: Duration = Duration::from_secs(4);
/// Longest pause between attempts to reach etcd again.
pub const MAX_RETRY: Duration = Duration::from_secs(5);
/// The node's last view of the cluster, in the state dir.
pub const VIEW_CACHE_FILE: &str = "cluster-view.json";

/// An etcd client error in one line: the gRPC code and message and the innermost cause (a
/// refused connection, a timeout), without the transport's debug dump.
fn describe(e: &etcd_client::Error) -> String {
    let (head, mut cur): (String, Option<&dyn std::error::Error>) = match e {
        etcd_client::Error::GRpcStatus(s) => {
            (s.message().to_string(), std::error::Error::source(s))
        }
        other => (other.to_string(), std::error::Error::source(other)),
    };
    let mut root = None;
    while let Some(err) = cur {
        root = Some(err);
        cur = err.source();
    }
    match root.map(|r| r.to_string()) {
        Some(r) if !r.is_empty() && !head.contains(&r) => format!("{head}: {r}"),
        _ => head,
    }
}

/// Whether `e` is a refused connection: the request never reached etcd.
fn connection_refused(e: &etcd_client::Error) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        cur = err.source();
    }
    // tonic reports a failed connect as a status whose message says so.
    describe(e).contains("tcp connect error")
}

/// How to reach etcd (from the `etcd_*` config keys).
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// CA bundle to verify the members' certificates (`https://` endpoints).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for etcd's client certificate authentication.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub lease_ttl_secs: u64,
    /// This node's name in the leader key (`node_name`).
    pub node_name: String,
}

pub struct EtcdStore {
    /// One client per endpoint. A call goes to the endpoint that answered last and moves on
    /// to the next one when that endpoint cannot be reached, as etcd's own clients do.
    clients: Vec<(String, Client)>,
    preferred: std::sync::atomic::AtomicUsize,
    settings: EtcdSettings,
    endpoints_text: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints_text)
            .field("prefix", &self.settings.prefix)
            .finish()
    }
}

impl EtcdStore {
    /// Builds the client. Connections are made lazily, so this succeeds with etcd down; the
    /// first call then fails with `Unavailable`. Must be called inside a tokio runtime.
    pub async fn connect(settings: EtcdSettings) -> Result<Self, StoreError> {
        let endpoints_text = settings.endpoints.join(",");
        let config_error = |message: String| StoreError::Backend {
            path: format!("etcd endpoints {endpoints_text}"),
            message,
        };
        let mut options = ConnectOptions::new()
            .with_connect_timeout(DIAL_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE, KEEPALIVE)
            .with_keep_alive_while_idle(true);
        if settings.ca_file.is_some() || settings.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &settings.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| config_error(format!("etcd_ca_file {}: {e}", ca.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            match (&settings.cert_file, &settings.key_file) {
                (Some(cert), Some(key)) => {
                    let c = std::fs::read(cert).map_err(|e| {
                        config_error(format!("etcd_cert_file {}: {e}", cert.display()))
                    })?;
                    let k = std::fs::read(key).map_err(|e| {
                        config_error(format!("etcd_key_file {}: {e}", key.display()))
                    })?;
                    tls = tls.identity(Identity::from_pem(c, k));
                }
                (None, None) => {}
                _ => {
                    return Err(config_error(
                        "etcd_cert_file and etcd_key_file go together".into(),
                    ))
                }
            }
            options = options.with_tls(tls);
        }
        let mut clients = Vec::with_capacity(settings.endpoints.len());
        for endpoint in &settings.endpoints {
            let client = Client::connect([endpoint], Some(options.clone()))
                .await
                .map_err(|e| config_error(format!("{endpoint}: {e}")))?;
            clients.push((endpoint.clone(), client));
        }
        if clients.is_empty() {
            return Err(config_error("no etcd endpoints".into()));
        }
        Ok(Self {
            clients,
            preferred: std::sync::atomic::AtomicUsize::new(0),
            endpoints_text,
            settings,
        })
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints_text
    }

    pub fn settings(&self) -> &EtcdSettings {
        &self.settings
    }

    fn streams_prefix(&self) -> String {
        format!("{}streams/", self.settings.prefix)
    }

    fn stream_key(&self, key: &StreamKey) -> String {
        format!("{}{}/{}", self.streams_prefix(), key.namespace, key.name)
    }

    fn leader_key(&self) -> String {
        format!("{}leader/importer", self.settings.prefix)
    }

    /// The stream key of an etcd key under the streams prefix.
    fn parse_key(&self, key: &[u8]) -> Option<StreamKey> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.streams_prefix())?;
        let (ns, name) = rest.split_once('/')?;
        Some(StreamKey::new(ns, name))
    }

    pub(crate) fn unavailable(&self, message: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable {
            endpoints: self.endpoints_text.clone(),
            message: message.to_string(),
        }
    }

    fn error(&self, e: &etcd_client::Error) -> StoreError {
        use tonic::Code;
        match e {
            etcd_client::Error::GRpcStatus(s)
                if matches!(
                    s.code(),
                    Code::InvalidArgument
                        | Code::PermissionDenied
                        | Code::Unauthenticated
                        | Code::ResourceExhausted
                        | Code::FailedPrecondition
                        | Code::OutOfRange
                ) =>
            {
                StoreError::Backend {
                    path: format!("etcd endpoints {}", self.endpoints_text),
                    message: s.message().to_string(),
                }
            }
            _ => self.unavailable(describe(e)),
        }
    }

    /// The client of the endpoint that answered last (for watches and lease keep-alives).
    pub(crate) fn client(&self) -> Client {
        let i = self.preferred.load(std::sync::atomic::Ordering::Relaxed) % self.clients.len();
        self.clients[i].1.clone()
    }

    /// Runs `op` against the endpoint that answered last, moving on to the next endpoint when
    /// one cannot be reached. A write (`idempotent == false`) moves on only when the
    /// connection was refused (it certainly did not reach etcd); after a timeout or a broken
    /// connection its outcome is unknown, so it fails with `Unavailable` instead of risking a
    /// second application.
    pub(crate) async fn call_any<T, F, Fut>(
        &self,
        idempotent: bool,
        mut op: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.clients.len();
        let start = self.preferred.load(std::sync::atomic::Ordering::Relaxed);
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            let (endpoint, client) = &self.clients[i];
            match tokio::time::timeout(REQUEST_TIMEOUT, op(client.clone())).await {
                Ok(Ok(v)) => {
                    self.preferred
                        .store(i, std::sync::atomic::Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(e)) => {
                    let err = self.error(&e);
                    let unreachable = matches!(err, StoreError::Unavailable { .. });
                    if unreachable && (idempotent || connection_refused(&e)) {
                        tracing::debug!(endpoint, error = %describe(&e), "etcd endpoint failed; trying the next");
                        last = Some(err);
                        continue;
                    }
                    return Err(err);
                }
                Err(_) => {
                    let err = self.unavailable(format!(
                        "no answer from {endpoint} within {}s",
                        REQUEST_TIMEOUT.as_secs()
                    ));
                    if idempotent {
                        last = Some(err);
                        continue;
                    }
                    return Err(err);
                }
            }
        }
        Err(last.unwrap_or_else(|| self.unavailable("no endpoint answered")))
    }

    /// Runs one etcd call, bounded by [`REQUEST_TIMEOUT`].
    pub(crate) async fn call<T>(
        &self,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(r) => r.map_err(|e| self.error(&e)),
            Err(_) => {
                Err(self.unavailable(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs())))
            }
        }
    }

    /// A lease of `ttl_secs` (at least 1) with its keep-alive stream, on the endpoint that
    /// answered last: the importer election's and peer discovery's.
    pub(crate) async fn grant_lease(&self, ttl_secs: u64) -> Result<Lease, StoreError> {
        let ttl = ttl_secs.max(1);
        let id = self
            .call_any(true, |mut c| async move {
                c.lease_grant(ttl as i64, None).await
            })
            .await?
            .id();
        let mut client = self.client();
        let (keeper, acks) = self.call(client.lease_keep_alive(id)).await?;
        Ok(Lease {
            id,
            ttl,
            client,
            keeper,
            acks,
        })
    }

    fn decode(&self, key: &[u8], value: &[u8]) -> Result<Stream, StoreError> {
        serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            message: e.to_string(),
        })
    }

    /// Every stream with its `mod_revision`, and the store revision of the listing.
    pub async fn list_at(&self) -> Result<(Vec<(Stream, u64)>, u64), StoreError> {
        let prefix = self.streams_prefix();
        let resp = self
            .call_any(true, |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0).max(0) as u64;
        let mut out = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            match self.decode(kv.key(), kv.value()) {
                Ok(s) => out.push((s, kv.mod_revision().max(0) as u64)),
                // One bad record must not hide every other stream from the node.
                Err(e) => tracing::error!(error = %e, "skipping a corrupt stream record"),
            }
        }
        Ok((out, revision))
    }
}

#[async_trait::async_trait]
impl StreamStore for EtcdStore {
    async fn list(&self) -> Result<Vec<Stream>, StoreError> {
        Ok(self
            .list_at()
            .await?
            .0
            .into_iter()
            .map(|(s, _)| s)
            .collect())
    }

    async fn get(&self, key: &StreamKey) -> Result<Option<Stream>, StoreError> {
        let k = self.stream_key(key);
        let resp = self
            .call_any(true, |mut c| {
                let k = k.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        resp.kvs()
            .first()
            .map(|kv| self.decode(kv.key(), kv.value()))
            .transpose()
    }

    async fn put(&self, stream: &Stream, expect: Expect) -> Result<Written, StoreError> {
        let key = stream.key();
        let k = self.stream_key(&key);
        let bytes = serde_json::to_vec(stream).map_err(|e| StoreError::Backend {
            path: k.clone(),
            message: e.to_string(),
        })?;
        let compare = match expect {
            Expect::Absent => Compare::create_revision(k.as_str(), CompareOp::Equal, 0),
            Expect::Revision(r) => {
                // Compare on etcd's own revision of the record we checked, so that any
                // write in between (by any node) makes this one lose.
                let resp = self
                    .call_any(true, |mut c| {
                        let k = k.clone();
                        async move { c.get(k, None).await }
                    })
                    .await?;
                let Some(current) = resp.kvs().first() else {
                    return Err(StoreError::Conflict(key));
                };
                if self.decode(current.key(), current.value())?.revision != r {
                    return Err(StoreError::Conflict(key));
                }
                Compare::mod_revision(k.as_str(), CompareOp::Equal, current.mod_revision())
            }
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(k.as_str(), bytes, None)]);
        let resp = self
            .call_any(false, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if !resp.succeeded() {
            return Err(match expect {
                Expect::Absent => StoreError::AlreadyExists(key),
                Expect::Revision(_) => StoreError::Conflict(key),
            });
        }
        Ok(Written {
            revision: resp.header().map(|h| h.revision().max(0) as u64),
        })
    }

    async fn delete(&self, key: &StreamKey) -> Result<Option<Written>, StoreError> {
        let k = self.stream_key(key);
        let resp = self
            .call_any(false, |mut c| {
                let k = k.clone();
                async move { c.delete(k, None).await }
            })
            .await?;
        Ok((resp.deleted() > 0).then(|| Written {
            revision: resp.header().map(|h| h.revision().max(0) as u64),
        }))
    }
}

/// What this node knows about its link to the cluster store.
#[derive(Debug)]
pub struct ClusterStatus {
    endpoints: String,
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default)]
struct StatusInner {
    connected: bool,
    revision: u64,
    last_sync: Option<Instant>,
    last_sync_time: Option<String>,
    error: Option<String>,
    leader: bool,
    leader_name: Option<String>,
}

/// A copy of [`ClusterStatus`] at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusReport {
    pub endpoints: String,
    pub connected: bool,
    /// etcd revision the view has caught up with.
    pub revision: u64,
    /// Seconds since the view was last known current; `None` before the first sync.
    pub stale_secs: Option<f64>,
    /// RFC 3339 time of the last sync.
    pub last_sync_time: Option<String>,
    pub error: Option<String>,
    /// Whether this node runs the cluster's scheduled imports.
    pub leader: bool,
    /// Who does (the leader key's value), when known.
    pub leader_name: Option<String>,
}

impl ClusterStatus {
    pub fn new(endpoints: &str) -> Self {
        Self {
            endpoints: endpoints.to_string(),
            inner: Mutex::new(StatusInner::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut StatusInner) -> T) -> T {
        match self.inner.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// The view is current as of `revision`.
    fn synced(&self, revision: u64) {
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .ok();
        self.with(|s| {
            if !s.connected {
                tracing::info!(revision, "cluster store reachable; view current");
            }
            s.connected = true;
            s.revision = s.revision.max(revision);
            let m = crate::metrics::metrics();
            m.store_connected.set(1);
            m.store_revision.set(s.revision as i64);
            m.store_view_stale_seconds.set(0.0);
            s.last_sync = Some(Instant::now());
            s.last_sync_time = now;
            s.error = None;
        });
    }

    fn lost(&self, error: &str) {
        self.with(|s| {
            if s.connected {
                tracing::warn!(
                    error,
                    "cluster store unreachable; resolving from the last view"
                );
            }
            s.connected = false;
            s.error = Some(error.to_string());
            crate::metrics::metrics().store_connected.set(0);
        });
    }

    fn set_leader(&self, leader: bool, name: Option<String>) {
        self.with(|s| {
            s.leader = leader;
            s.leader_name = name;
            crate::metrics::metrics()
                .importer_leader
                .set(i64::from(leader));
        });
    }

    pub fn report(&self) -> StatusReport {
        self.with(|s| StatusReport {
            endpoints: self.endpoints.clone(),
            connected: s.connected,
            revision: s.revision,
            stale_secs: s.last_sync.map(|t| t.elapsed().as_secs_f64()),
            last_sync_time: s.last_sync_time.clone(),
            error: s.error.clone(),
            leader: s.leader,
            leader_name: s.leader_name.clone(),
        })
    }
}

/// Copies `status` into the `imagestream_store_*` metrics every second until `stop`.
pub async fn publish_metrics(status: Arc<ClusterStatus>, mut stop: watch::Receiver<bool>) {
    let m = crate::metrics::metrics();
    loop {
        let r = status.report();
        m.store_view_stale_seconds
            .set(r.stale_secs.unwrap_or(f64::INFINITY));
        m.store_connected.set(i64::from(r.connected));
        m.store_revision.set(r.revision as i64);
        m.importer_leader.set(i64::from(r.leader));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// The saved view: what a node starts from when etcd is unreachable at start.
#[derive(Debug, Serialize, Deserialize)]
struct SavedView {
    revision: u64,
    streams: Vec<Stream>,
}

/// Reads the view saved by [`feed`], if any: `(streams, revision)`.
pub fn load_saved_view(state_dir: &Path) -> Option<(Vec<(Stream, u64)>, u64)> {
    let path = state_dir.join(VIEW_CACHE_FILE);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice::<SavedView>(&bytes) {
        Ok(v) => {
            let r = v.revision;
            Some((v.streams.into_iter().map(|s| (s, r)).collect(), r))
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable saved view");
            None
        }
    }
}

fn save_view(state_dir: &Path, view: &View, revision: u64) {
    let saved = SavedView {
        revision,
        streams: view.load().streams().map(|s| Stream::clone(s)).collect(),
    };
    let path = state_dir.join(VIEW_CACHE_FILE);
    let result = serde_json::to_vec(&saved)
        .map_err(std::io::Error::other)
        .and_then(|bytes| crate::cache::write_atomically(&path, &bytes));
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "cannot save the cluster view");
    }
}

/// The first view of a starting node: a fresh list from etcd, else the saved one (with a
/// warning), else empty. Returns the view and the revision to watch from, if it came from etcd.
pub async fn initial_view(
    store: &EtcdStore,
    status: &ClusterStatus,
    state_dir: &Path,
) -> (View, Option<u64>) {
    let view = View::default();
    match store.list_at().await {
        Ok((streams, revision)) => {
            view.replace_all(streams, revision);
            status.synced(revision);
            let (dir, v) = (state_dir.to_path_buf(), view.clone());
            let _ = tokio::task::spawn_blocking(move || save_view(&dir, &v, revision)).await;
            (view, Some(revision))
        }
        Err(e) => {
            status.lost(&e.to_string());
            match load_saved_view(state_dir) {
                Some((streams, revision)) => {
                    tracing::warn!(error = %e, streams = streams.len(), revision,
                        "cluster store unreachable at start; resolving from the saved view");
                    view.replace_all(streams, revision);
                }
                None => tracing::warn!(error = %e,
                    "cluster store unreachable at start and no saved view; no streams until it answers"),
            }
            (view, None)
        }
    }
}

/// Keeps `view` equal to etcd until `stop`: watch from `start` (the revision a list was made
/// at) or list first; re-list after any break. Saves the view after every list and, at most
/// once a second, after changes.
pub async fn feed(
    store: Arc<EtcdStore>,
    view: View,
    status: Arc<ClusterStatus>,
    state_dir: PathBuf,
    mut start: Option<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = Duration::from_millis(200);
    loop {
        if *stop.borrow() {
            return;
        }
        let revision = match start.take() {
            Some(r) => r,
            None => match store.list_at().await {
                Ok((streams, revision)) => {
                    view.replace_all(streams, revision);
                    status.synced(revision);
                    let (dir, v) = (state_dir.clone(), view.clone());
                    let _ =
                        tokio::task::spawn_blocking(move || save_view(&dir, &v, revision)).await;
                    revision
                }
                Err(e) => {
                    status.lost(&e.to_string());
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = stopped(&mut stop) => return,
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                    continue;
                }
            },
        };
        let mut unsaved = None;
        let ended = watch_from(
            &store,
            &view,
            &status,
            &state_dir,
            revision,
            &mut unsaved,
            &mut stop,
        )
        .await;
        // What the watch applied but has not saved yet is saved now, so that a restart while
        // etcd is away starts from it.
        if let Some(reached) = unsaved {
            let (dir, v) = (state_dir.clone(), view.clone());
            let _ = tokio::task::spawn_blocking(move || save_view(&dir, &v, reached)).await;
        }
        match ended {
            Ok(()) => return,
            Err(why) => {
                tracing::info!(why, "cluster store watch ended; listing again");
                status.lost(&why);
                retry = Duration::from_millis(200);
            }
        }
    }
}

/// Completes when `stop` turns true (without holding the watch's guard across awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Applies watch events after `revision` until the watch breaks (`Err` says why) or `stop`.
/// `unsaved` is the revision reached when changes were applied but not yet saved.
async fn watch_from(
    store: &EtcdStore,
    view: &View,
    status: &ClusterStatus,
    state_dir: &Path,
    revision: u64,
    unsaved: &mut Option<u64>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let mut client = store.client();
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision as i64 + 1);
    let mut stream = match tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.watch(store.streams_prefix(), Some(options)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("no answer to the watch request".into()),
    };
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut reached = revision;
    let mut last_save = Instant::now();
    loop {
        tokio::select! {
            _ = stopped(stop) => return Ok(()),
            _ = tick.tick() => {
                if last_heard.elapsed() > WATCH_SILENCE {
                    return Err(format!("watch silent for {}s", last_heard.elapsed().as_secs()));
                }
                if let Some(at) = unsaved.filter(|_| last_save.elapsed() >= Duration::from_secs(1)) {
                    let (dir, v) = (state_dir.to_path_buf(), view.clone());
                    let _ = tokio::task::spawn_blocking(move || save_view(&dir, &v, at)).await;
                    *unsaved = None;
                    last_save = Instant::now();
                }
                if let Err(e) = stream.request_progress().await {
                    return Err(format!("watch progress request failed: {e}"));
                }
            }
            message = stream.message() => {
                let resp = match message {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err("watch closed by the server".into()),
                    Err(e) => return Err(e.to_string()),
                };
                last_heard = Instant::now();
                if resp.compact_revision() > 0 {
                    return Err(format!("watch start revision compacted (at {})", resp.compact_revision()));
                }
                if resp.canceled() {
                    return Err(format!("watch canceled: {}", resp.cancel_reason()));
                }
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    let Some(key) = store.parse_key(kv.key()) else { continue };
                    let at = kv.mod_revision().max(0) as u64;
                    match event.event_type() {
                        EventType::Put => match store.decode(kv.key(), kv.value()) {
                            Ok(s) if s.key() == key => view.apply_at(&key, Some(s), Some(at)),
                            Ok(_) => tracing::error!(key = %key, "stream record under a foreign key; ignored"),
                            Err(e) => tracing::error!(error = %e, "ignoring a corrupt stream record"),
                        },
                        EventType::Delete => view.apply_at(&key, None, Some(at)),
                    }
                    *unsaved = Some(reached);
                }
                if let Some(h) = resp.header() {
                    reached = reached.max(h.revision().max(0) as u64);
                }
                if unsaved.is_some() {
                    *unsaved = Some(reached);
                }
                status.synced(reached);
            }
        }
    }
}

/// A granted lease ([`EtcdStore::grant_lease`]) and the client its keep-alives go through.
pub(crate) struct Lease {
    pub id: i64,
    pub ttl: u64,
    /// The client of the endpoint the lease was granted on, for the calls tied to it.
    pub client: Client,
    keeper: etcd_client::LeaseKeeper,
    acks: etcd_client::LeaseKeepAliveStream,
}

impl Lease {
    /// How often to renew: a third of the TTL, at least 300 ms.
    pub fn beat(&self) -> Duration {
        Duration::from_millis(self.ttl * 1000 / 3).max(Duration::from_millis(300))
    }

    /// Renews the lease once; `Unavailable` naming `what` when it has expired.
    pub async fn renew(&mut self, store: &EtcdStore, what: &str) -> Result<(), StoreError> {
        store.call(self.keeper.keep_alive()).await?;
        match store.call(self.acks.message()).await? {
            Some(ack) if ack.ttl() > 0 => Ok(()),
            _ => Err(store.unavailable(format!("{what} lease expired"))),
        }
    }

    /// Gives the lease up now (its keys go at once), ignoring failures: it expires anyway.
    pub async fn revoke(&self, store: &EtcdStore) {
        let id = self.id;
        let _ = store
            .call_any(true, |mut c| async move { c.lease_revoke(id).await })
            .await;
    }
}

/// Runs the importer election until `stop`, telling `leader` whether this node runs the
/// cluster's scheduled imports. At stop a leader gives the job up at once (revokes its lease).
pub async fn elect(
    store: Arc<EtcdStore>,
    status: Arc<ClusterStatus>,
    leader: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = Duration::from_millis(500);
    loop {
        if *stop.borrow() {
            return;
        }
        match campaign(&store, &status, &leader, &mut stop).await {
            Ok(()) => return,
            Err(e) => {
                if *leader.borrow() {
                    tracing::warn!(error = %e, "lost the importer lease");
                }
                leader.send_replace(false);
                status.set_leader(false, None);
                tracing::debug!(error = %e, "importer election: retrying");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = stopped(&mut stop) => return,
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// One lease's life: grant, keep alive, try to take the leader key whenever it is free.
async fn campaign(
    store: &EtcdStore,
    status: &ClusterStatus,
    leader: &watch::Sender<bool>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), StoreError> {
    let mut lease = store.grant_lease(store.settings.lease_ttl_secs).await?;
    let (id, ttl, beat) = (lease.id, lease.ttl, lease.beat());
    let mut client = lease.client.clone();
    let key = store.leader_key();
    let me = format!("{} (pid {})", store.settings.node_name, std::process::id());
    let result = async {
        loop {
            if !*leader.borrow() {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key.as_str(),
                        me.as_str(),
                        Some(PutOptions::new().with_lease(id)),
                    )])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                let resp = store
                    .call_any(false, |mut c| {
                        let txn = txn.clone();
                        async move { c.txn(txn).await }
                    })
                    .await?;
                if resp.succeeded() {
                    tracing::info!(node = %me, ttl, "this node now runs the cluster's scheduled imports");
                    leader.send_replace(true);
                    status.set_leader(true, Some(me.clone()));
                } else {
                    let holder = resp.op_responses().into_iter().find_map(|r| match r {
                        etcd_client::TxnOpResponse::Get(g) => g
                            .kvs()
                            .first()
                            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                        _ => None,
                    });
                    status.set_leader(false, holder);
                }
            }
            // Wait one beat (a follower also wakes when the leader key goes away).
            let mut follower_watch = if *leader.borrow() {
                None
            } else {
                let opts = WatchOptions::new().with_start_revision(0);
                store
                    .call(client.watch(key.as_str(), Some(opts)))
                    .await
                    .ok()
            };
            let freed = async {
                match follower_watch.as_mut() {
                    Some(w) => loop {
                        match w.message().await {
                            Ok(Some(r)) if r.events().iter().any(|e| e.event_type() == EventType::Delete) => return,
                            Ok(Some(_)) => continue,
                            _ => std::future::pending::<()>().await,
                        }
                    },
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(beat) => {}
                _ = freed => {}
                _ = stopped(stop) => return Ok(()),
            }
            lease.renew(store, "importer").await?;
        }
    }
    .await;
    if result.is_ok() && *leader.borrow() {
        // Shutting down: hand the job over now rather than after the TTL.
        lease.revoke(store).await;
        leader.send_replace(false);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_round_trip() {
        let store = EtcdStore::connect(EtcdSettings {
            endpoints: vec![DEFAULT_ENDPOINT.into()],
            prefix: DEFAULT_PREFIX.into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            lease_ttl_secs: DEFAULT_LEASE_TTL_SECS,
            node_name: "n".into(),
        })
        .await
        .expect("lazy connect");
        let key = StreamKey::new("team-a", "app");
        let k = store.stream_key(&key);
        assert_eq!(k, "/imagestream/streams/team-a/app");
        assert_eq!(store.parse_key(k.as_bytes()), Some(key));
        assert_eq!(store.parse_key(b"/imagestream/leader/importer"), None);
        assert_eq!(store.parse_key(b"/other/streams/a/b"), None);
    }

    #[test]
    fn saved_view_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let view = View::default();
        view.apply(
            &StreamKey::new("a", "b"),
            Some(Stream::new(&StreamKey::new("a", "b"), true)),
        );
        save_view(dir.path(), &view, 42);
        let (streams, revision) = load_saved_view(dir.path()).expect("saved");
        assert_eq!(revision, 42);
        assert_eq!(streams.len(), 1);
        assert_eq!(streams[0].0.key(), StreamKey::new("a", "b"));
    }
}
