//! The daemon: opens the store, builds the stream service, binds the CRI and admin sockets and
//! serves both until `shutdown`, then drains in-flight calls (bounded by the drain timeout) and
//! removes its sockets. Tells systemd `READY=1` once both sockets accept.

use crate::admin::auth::AdminAccess;
use crate::admin::{AdminApi, AdminServer};
use crate::cache::{Cache, CacheError, CacheSettings};
use crate::config::Config;
use crate::config::StoreKind;
use crate::cri::private::{PrivateGate, PrivateSettings};
use crate::cri::{CriProxy, CriService, Runtime};
use crate::mirror::{Mirror, Upstreams};
use crate::registry::auth::Credentials;
use crate::registry::RegistryClient;
use crate::socket::{self, SocketError, SOCKET_MODE};
use crate::store::embedded::EmbeddedStore;
use crate::store::etcd::{self, ClusterStatus, EtcdSettings, EtcdStore};
use crate::store::{StoreError, StreamStore};
use crate::stream::service::{StreamError, StreamService, StreamSettings};
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use thiserror::Error;
use tokio_stream::wrappers::UnixListenerStream;

/// Mode of the state dir.
pub const STATE_DIR_MODE: u32 = 0o700;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot create state dir {path}: {source}")]
    StateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Streams(#[from] StreamError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("invalid runtime endpoint: {0}")]
    Runtime(String),
    #[error("admin server failed: {0}")]
    Admin(String),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("cannot listen on {addr} for the registry mirror: {source}")]
    MirrorBind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("peer endpoint: {0}")]
    Peer(String),
    #[error("cannot listen on {addr} for the peer endpoint: {source}")]
    PeerBind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the daemon with `config` until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let state_dir = config.state_dir.clone();
    // The node's default signature policy: its key files are read now, so a bad one fails
    // the start, naming the file.
    let default_policy = config
        .default_signature_policy()
        .map_err(|e| ServerError::Runtime(e.to_string()))?;
    std::fs::create_dir_all(&state_dir)
        .and_then(|()| {
            std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(STATE_DIR_MODE))
        })
        .map_err(|source| ServerError::StateDir {
            path: state_dir.display().to_string(),
            source,
        })?;
    let cluster = match config.store {
        StoreKind::Embedded => None,
        StoreKind::Etcd => {
            let etcd = Arc::new(
                EtcdStore::connect(EtcdSettings {
                    endpoints: config.etcd_endpoints.clone(),
                    prefix: config.etcd_prefix.clone(),
                    ca_file: config.etcd_ca_file.clone(),
                    cert_file: config.etcd_cert_file.clone(),
                    key_file: config.etcd_key_file.clone(),
                    lease_ttl_secs: config.etcd_lease_ttl_secs,
                    node_name: config.node_name.clone(),
                })
                .await?,
            );
            let status = Arc::new(ClusterStatus::new(etcd.endpoints()));
            let (view, start) = etcd::initial_view(&etcd, &status, &state_dir).await;
            Some((etcd, status, view, start))
        }
    };
    let upstreams = Upstreams::new(&config.mirror_upstreams, &config.insecure_registries)
        .map_err(ServerError::Runtime)?;
    let mut credentials = match &config.registry_auth_file {
        Some(path) => Credentials::load(path).map_err(|e| ServerError::Runtime(e.to_string()))?,
        None => Credentials::none(),
    };
    let kubelet = std::path::Path::new(crate::registry::auth::KUBELET_AUTH_FILE);
    if config.read_kubelet_auth && kubelet.exists() {
        match Credentials::load(kubelet) {
            Ok(c) => credentials = credentials.merge(c),
            // The kubelet's file is optional: a bad one is worth a warning, not a failed start.
            Err(e) => tracing::warn!(error = %e, "ignoring the kubelet's registry credentials"),
        }
    }
    if !credentials.hosts().is_empty() {
        tracing::info!(hosts = ?credentials.hosts(), "registry credentials loaded");
    }
    let mut plain_http = config.insecure_registries.clone();
    for h in upstreams.plain_http_hosts() {
        if !plain_http.contains(&h) {
            plain_http.push(h);
        }
    }
    let registry = RegistryClient::with_credentials(&plain_http, credentials);
    let settings = StreamSettings {
        stream_host: config.stream_host.clone(),
        history_limit: config.history_limit,
    };
    let streams = Arc::new(match &cluster {
        Some((etcd, _, view, _)) => {
            let store: Arc<dyn StreamStore> = etcd.clone();
            StreamService::with_view(store, registry.clone(), settings, view.clone())
        }
        None => {
            let dir = state_dir.clone();
            let store: Arc<dyn StreamStore> = Arc::new(
                tokio::task::spawn_blocking(move || EmbeddedStore::open(&dir))
                    .await
                    .map_err(|e| StoreError::Backend {
                        path: state_dir.display().to_string(),
                        message: e.to_string(),
                    })??,
            );
            StreamService::new(store, registry.clone(), settings).await?
        }
    });
    // The CRI server and the runtime connection run on a thread of their own (see
    // `CriThread`); one connection to the runtime, for forwarded calls, the proxy's own and
    // pre-pulls.
    let cri_thread = CriThread::start()
        .await
        .map_err(|e| ServerError::Runtime(format!("cannot start the CRI thread: {e}")))?;
    let runtime = Runtime::new(&config.runtime_endpoint)
        .map_err(ServerError::Runtime)?
        .on(cri_thread.handle.clone());

    let cache = {
        let dir = state_dir.clone();
        let settings = CacheSettings {
            max_bytes: config.cache_max_bytes,
            prefetch: config.prefetch,
            tags_file: state_dir.join("mirror-tags.json"),
            pin_history: config.pin_history,
        };
        let view = streams.view();
        tokio::task::spawn_blocking(move || Cache::open(&dir, registry, settings, view))
            .await
            .map_err(|e| ServerError::Runtime(e.to_string()))?
            .map_err(ServerError::Cache)?
    };
    // Signatures are fetched through the cache: kept, pinned and served offline with the
    // images they sign.
    streams.set_verifier(Arc::new(crate::signature::fetch::Verifier::new(Arc::new(
        crate::cache::artifacts::CacheArtifacts::new(cache.clone()),
    ))));
    streams.view().set_default_policy(default_policy);
    let mirror_addr = config
        .mirror_addr()
        .map_err(|e| ServerError::Runtime(e.to_string()))?;

    let cri_listener = socket::bind(&config.cri_socket, SOCKET_MODE)?;
    let group = |g: &Option<String>| {
        g.as_deref()
            .map(crate::admin::auth::resolve_group)
            .transpose()
            .map_err(ServerError::Runtime)
    };
    let access = AdminAccess {
        admin_gid: group(&config.admin_group)?,
        reader_gid: group(&config.reader_group)?,
    };
    let socket_gid = access.reader_gid.or(access.admin_gid);
    let admin_mode = if socket_gid.is_some() {
        socket::GROUP_SOCKET_MODE
    } else {
        SOCKET_MODE
    };
    let admin_listener = match socket::bind_with_group(&config.admin_socket, admin_mode, socket_gid)
    {
        Ok(l) => l,
        Err(e) => {
            socket::remove(&config.cri_socket);
            return Err(e.into());
        }
    };

    // After the sockets, so that a live daemon on them is reported as such.
    let mirror_listener = match tokio::net::TcpListener::bind(mirror_addr).await {
        Ok(l) => l,
        Err(source) => {
            socket::remove(&config.cri_socket);
            socket::remove(&config.admin_socket);
            return Err(ServerError::MirrorBind {
                addr: mirror_addr.to_string(),
                source,
            });
        }
    };

    // Peers: TLS files and the listener now, so that a bad certificate fails the start.
    let etcd_for_peers = cluster.as_ref().map(|(etcd, _, _, _)| etcd.clone());
    let (peers, peer_listener, members_tx) = match start_peers(&config, etcd_for_peers).await {
        Ok(p) => p,
        Err(e) => {
            socket::remove(&config.cri_socket);
            socket::remove(&config.admin_socket);
            return Err(e);
        }
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let grace = config.drain_timeout();
    let policy = crate::cri::policy::PullPolicy::new(
        &config.allowed_registries,
        config.require_pinned,
        config.policy_dry_run,
    );
    let private = config.private_images.then(|| {
        Arc::new(PrivateGate::new(PrivateSettings {
            enabled: true,
            ttl: std::time::Duration::from_secs(config.private_images_ttl_secs),
            offline: config.private_images_offline,
            insecure_registries: plain_http.clone(),
        }))
    });
    let mut proxy = CriProxy::new(
        runtime.clone(),
        streams.view(),
        config.stream_host.clone(),
        policy,
    );
    if let Some(gate) = private.clone() {
        proxy = proxy.with_private_gate(gate);
    }
    let cri_listener = cri_listener
        .into_std()
        .map_err(|e| ServerError::Runtime(format!("cannot move the CRI socket: {e}")))?;
    let cri_service = CriService::new(Arc::new(proxy), runtime.clone());
    let cri_shutdown = stopped(stop_rx.clone());
    let cri_task = cri_thread.run(Box::pin(async move {
        // Registered with the CRI thread's runtime, which polls this.
        match tokio::net::UnixListener::from_std(cri_listener) {
            Ok(listener) => crate::cri::serve(listener, cri_service, cri_shutdown, grace).await,
            Err(e) => tracing::error!(error = %e, "CRI socket unusable"),
        }
    }));
    let streams_for_import = streams.clone();
    let admin_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                AdminServer::new(
                    AdminApi::new(streams, cache.clone(), access)
                        .with_min_import_interval(config.import_min_interval_secs)
                        .with_cluster(
                            cluster.as_ref().map(|(_, status, _, _)| status.clone()),
                            &config.node_name,
                        ),
                )
                .max_decoding_message_size(crate::admin::MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(admin_listener),
                stopped(stop_rx.clone()),
            ),
    );
    let peer_task = peer_listener.map(|(listener, tls)| {
        tokio::spawn(crate::mirror::peer_endpoint::serve(
            listener,
            tls,
            Arc::new(crate::mirror::peer_endpoint::PeerEndpoint::new(
                cache.clone(),
                upstreams.clone(),
            )),
            stopped(stop_rx.clone()),
            grace,
        ))
    });
    if let Some(peers) = peers {
        let permit: Arc<dyn Fn(&crate::cache::Origin) -> bool + Send + Sync> = match &private {
            Some(gate) => {
                let gate = gate.clone();
                Arc::new(move |o: &crate::cache::Origin| gate.peers_allowed(&o.host, &o.repository))
            }
            None => Arc::new(|_: &crate::cache::Origin| true),
        };
        cache.set_peers(crate::cache::PeerHook { peers, permit });
        tokio::spawn(cache.clone().home_loop(stop_rx.clone()));
    }
    if let (Some(tx), Some((etcd, _, _, _))) = (members_tx, cluster.as_ref()) {
        tokio::spawn(crate::peer::discovery::run_etcd(
            etcd.clone(),
            config.peer_member(),
            config.peer_lease_ttl_secs,
            tx,
            stop_rx.clone(),
        ));
    }
    let mirror_task = tokio::spawn(crate::mirror::serve(
        mirror_listener,
        Arc::new(Mirror::new(cache.clone(), upstreams)),
        stopped(stop_rx.clone()),
        grace,
    ));
    if config.prefetch {
        tokio::spawn(cache.clone().prefetch_loop(stop_rx.clone()));
    }
    if cluster.is_none() {
        let m = crate::metrics::metrics();
        m.store_connected.set(1);
        m.importer_leader.set(1);
    }
    // With etcd, one elected node imports and moves followers; alone, this node does.
    let (leader_tx, leader_rx) = tokio::sync::watch::channel(cluster.is_none());
    if let Some((etcd, status, view, start)) = cluster {
        tokio::spawn(etcd::publish_metrics(status.clone(), stop_rx.clone()));
        tokio::spawn(etcd::feed(
            etcd.clone(),
            view,
            status.clone(),
            state_dir.clone(),
            start,
            stop_rx.clone(),
        ));
        tokio::spawn(etcd::elect(etcd, status, leader_tx, stop_rx.clone()));
    }
    tokio::spawn(crate::importer::follow(
        streams_for_import.clone(),
        leader_rx.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(crate::importer::run(
        streams_for_import,
        crate::importer::ImporterSettings {
            concurrency: config.import_concurrency,
            registry_concurrency: config.import_registry_concurrency,
        },
        leader_rx,
        stop_rx.clone(),
    ));
    tokio::spawn(crate::triggers::run(
        cache.view(),
        config.triggers.clone(),
        stop_rx.clone(),
    ));
    if config.prepull {
        tokio::spawn(crate::triggers::prepull::run(
            cache.view(),
            runtime.clone(),
            stop_rx.clone(),
        ));
    }
    if config.scrub_interval_secs > 0 {
        tokio::spawn(scrub_loop(
            cache.clone(),
            std::time::Duration::from_secs(config.scrub_interval_secs),
            stop_rx.clone(),
        ));
    }
    tracing::info!(
        cri_socket = %config.cri_socket.display(),
        admin_socket = %config.admin_socket.display(),
        mirror = %mirror_addr,
        cache_bytes = cache.store().total(),
        runtime = %config.runtime_endpoint,
        state_dir = %config.state_dir.display(),
        "imagestream ready"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    shutdown.await;
    tracing::info!(?grace, "shutting down: draining in-flight calls");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(grace + std::time::Duration::from_secs(1), async {
        let _ = cri_task.await;
        let _ = mirror_task.await;
        if let Some(t) = peer_task {
            let _ = t.await;
        }
        admin_task.await
    })
    .await;
    socket::remove(&config.cri_socket);
    socket::remove(&config.admin_socket);
    match drained {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(ServerError::Admin(e.to_string())),
        Ok(Err(e)) => Err(ServerError::Admin(e.to_string())),
        Err(_) => {
            tracing::warn!("drain timed out; exiting");
            Ok(())
        }
    }
}

type PeerStart = (
    Option<Arc<crate::peer::Peers>>,
    Option<(tokio::net::TcpListener, Arc<rustls::ServerConfig>)>,
    Option<tokio::sync::watch::Sender<crate::peer::Members>>,
);

/// With `peer_listen`: the peer layer (members from the static list, or only this node until
/// etcd discovery fills them in), the peer endpoint's listener and TLS, and (with etcd) the
/// sender discovery updates the members through.
async fn start_peers(
    config: &Config,
    etcd: Option<Arc<EtcdStore>>,
) -> Result<PeerStart, ServerError> {
    let with_etcd = etcd.is_some();
    let Some(listen) = &config.peer_listen else {
        return Ok((None, None, None));
    };
    let files = config.peer_tls_files().ok_or_else(|| {
        ServerError::Peer("peer_ca_file, peer_cert_file and peer_key_file are required".into())
    })?;
    let tls =
        crate::peer::tls::server_config(&files).map_err(|e| ServerError::Peer(e.to_string()))?;
    let first_byte = std::time::Duration::from_millis(config.peer_first_byte_timeout_ms);
    let client = crate::peer::client::PeerClient::new(&files, first_byte)
        .map_err(|e| ServerError::Peer(e.to_string()))?;
    let me = config.peer_member();
    let initial = if let Some(etcd) = &etcd {
        // The members registered so far (etcd down: only this node, until discovery runs).
        match crate::peer::discovery::list_etcd(etcd, &me).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the peers in etcd yet; discovery retries");
                Arc::new(vec![me.clone()])
            }
        }
    } else {
        crate::peer::discovery::static_members(&me, &config.peers)
            .map_err(|e| ServerError::Peer(e.to_string()))?
    };
    crate::metrics::metrics()
        .peer_members
        .set(i64::try_from(initial.len()).unwrap_or(i64::MAX));
    let (tx, rx) = tokio::sync::watch::channel(initial);
    let peers = crate::peer::Peers::new(
        crate::peer::PeerSettings {
            node_name: config.node_name.clone(),
            replicas: config.peer_replicas,
            first_byte_timeout: first_byte,
            idle_timeout: crate::peer::DEFAULT_IDLE_TIMEOUT,
        },
        rx,
        client,
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServerError::PeerBind {
            addr: listen.clone(),
            source,
        })?;
    tracing::info!(listen = %listen, advertise = %me.addr, node = %me.name, "peer endpoint ready");
    Ok((Some(peers), Some((listener, tls)), with_etcd.then_some(tx)))
}

/// Re-hashes the cache every `every` until shutdown (the first pass after one interval).
async fn scrub_loop(
    cache: Arc<Cache>,
    every: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match cache.verify().await {
            Ok(r) => tracing::info!(
                checked = r.checked,
                evicted = r.evicted.len(),
                "cache scrub done"
            ),
            Err(e) => tracing::warn!(error = %e, "cache scrub failed"),
        }
    }
}

/// The thread of the CRI server: a single-threaded runtime that also drives the runtime
/// connection ([`Runtime::on`]). A CRI call is a short chain of tasks (client connection,
/// request, runtime connection); on one thread they hand over without cross-thread wake-ups,
/// which on a multi-threaded runtime cost more CPU than the HTTP/2 work itself (see
/// docs/benchmarks.md). The runtime is made and dropped on that thread: if the daemon stops
/// before the server is handed over, the thread just ends.
struct CriThread {
    handle: tokio::runtime::Handle,
    job: tokio::sync::oneshot::Sender<CriJob>,
    done: tokio::sync::oneshot::Receiver<()>,
}

type CriJob = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

impl CriThread {
    async fn start() -> std::io::Result<Self> {
        let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
        let (job, job_rx) = tokio::sync::oneshot::channel::<CriJob>();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("cri".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async move {
                    if let Ok(job) = job_rx.await {
                        job.await;
                    }
                });
                let _ = done_tx.send(());
            })?;
        let handle = handle_rx.await.map_err(std::io::Error::other)??;
        Ok(Self { handle, job, done })
    }

    /// Runs `job` (the CRI server) on the thread; the receiver completes when it has ended.
    fn run(self, job: CriJob) -> tokio::sync::oneshot::Receiver<()> {
        let _ = self.job.send(job);
        self.done
    }
}
