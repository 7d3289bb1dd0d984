//! Daemon configuration: embedded defaults (the constants below), overridden by a TOML file
//! (`--config`, default [`DEFAULT_CONFIG_PATH`] when it exists), overridden by flags.
//! Unknown keys in the file are an error that names them.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Config file read when `--config` is not given (only if it exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/imagestream/config.toml";
/// Where streams and (later) the layer cache live.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/imagestream";
/// The CRI socket the kubelet is pointed at.
pub const DEFAULT_CRI_SOCKET: &str = "/run/imagestream/imagestream.sock";
/// The admin API socket the CLI talks to.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/imagestream/admin.sock";
/// The real runtime every CRI call is forwarded to.
pub const DEFAULT_RUNTIME_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";
/// How long SIGTERM waits for in-flight calls before exiting anyway.
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 15;
/// How often the daemon re-hashes the cache (a day); 0 turns the periodic scrub off.
pub const DEFAULT_SCRUB_INTERVAL_SECS: u64 = 24 * 60 * 60;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Where streams are kept (`store`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// redb in the state dir: this node's own streams.
    #[default]
    Embedded,
    /// etcd: one set of streams for every node of the cluster.
    Etcd,
}

/// The config file, every key optional. See README "Configuration".
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub state_dir: Option<PathBuf>,
    pub cri_socket: Option<PathBuf>,
    pub admin_socket: Option<PathBuf>,
    pub runtime_endpoint: Option<String>,
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    pub stream_host: Option<String>,
    pub history_limit: Option<usize>,
    pub drain_timeout_secs: Option<u64>,
    pub admin_group: Option<String>,
    pub reader_group: Option<String>,
    #[serde(default)]
    pub allowed_registries: Vec<String>,
    pub require_pinned: Option<bool>,
    pub policy_dry_run: Option<bool>,
    pub mirror_listen: Option<String>,
    #[serde(default)]
    pub mirror_upstreams: Vec<String>,
    pub registry_auth_file: Option<PathBuf>,
    pub cache_max_bytes: Option<u64>,
    pub scrub_interval_secs: Option<u64>,
    pub prefetch: Option<bool>,
    pub pin_history: Option<usize>,
    pub import_concurrency: Option<usize>,
    pub import_registry_concurrency: Option<usize>,
    pub import_min_interval_secs: Option<u64>,
    #[serde(default)]
    pub triggers: Vec<crate::triggers::TriggerConfig>,
    pub read_kubelet_auth: Option<bool>,
    pub prepull: Option<bool>,
    pub store: Option<StoreKind>,
    #[serde(default)]
    pub etcd_endpoints: Vec<String>,
    pub etcd_prefix: Option<String>,
    pub etcd_ca_file: Option<PathBuf>,
    pub etcd_cert_file: Option<PathBuf>,
    pub etcd_key_file: Option<PathBuf>,
    pub etcd_lease_ttl_secs: Option<u64>,
    pub node_name: Option<String>,
    pub private_images: Option<bool>,
    pub private_images_ttl_secs: Option<u64>,
    pub private_images_offline: Option<crate::cri::private::OfflinePolicy>,
    pub peer_listen: Option<String>,
    pub peer_advertise: Option<String>,
    #[serde(default)]
    pub peers: Vec<String>,
    pub peer_ca_file: Option<PathBuf>,
    pub peer_cert_file: Option<PathBuf>,
    pub peer_key_file: Option<PathBuf>,
    pub peer_replicas: Option<usize>,
    pub peer_first_byte_timeout_ms: Option<u64>,
    pub peer_lease_ttl_secs: Option<u64>,
    pub signature_policy: Option<crate::signature::policy::Mode>,
    #[serde(default)]
    pub signature_keys: Vec<PathBuf>,
}

/// Flags of `imagestream serve` that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
    pub cri_socket: Option<PathBuf>,
    pub admin_socket: Option<PathBuf>,
    pub runtime_endpoint: Option<String>,
    pub insecure_registries: Vec<String>,
    pub mirror_listen: Option<String>,
    pub mirror_upstreams: Vec<String>,
    pub store: Option<StoreKind>,
    pub etcd_endpoints: Vec<String>,
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub state_dir: PathBuf,
    pub cri_socket: PathBuf,
    pub admin_socket: PathBuf,
    pub runtime_endpoint: String,
    pub insecure_registries: Vec<String>,
    pub stream_host: String,
    pub history_limit: usize,
    pub drain_timeout_secs: u64,
    /// Group (name or gid) whose members may change streams; the admin socket becomes 0660.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_group: Option<String>,
    /// Group (name or gid) whose members may read streams; the admin socket becomes 0660 and
    /// belongs to this group (admin group members must be in it too to connect).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reader_group: Option<String>,
    /// Registry hosts (globs) pulls may come from; empty: any.
    pub allowed_registries: Vec<String>,
    /// Plain references must carry a digest (stream references are pinned already).
    pub require_pinned: bool,
    /// Log and count what the pull policy would refuse, but refuse nothing.
    pub policy_dry_run: bool,
    /// `HOST:PORT` of the registry mirror and `/metrics`.
    pub mirror_listen: String,
    /// Registries the mirror may pull through from (`http://HOST:PORT`, `https://HOST`); the
    /// insecure registries are allowed too.
    pub mirror_upstreams: Vec<String>,
    /// A docker `config.json` with registry credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_auth_file: Option<PathBuf>,
    /// Size limit of the layer cache in bytes.
    pub cache_max_bytes: u64,
    /// Seconds between cache scrubs (0: never).
    pub scrub_interval_secs: u64,
    /// Prefetch a stream tag's image into the cache when the tag changes.
    pub prefetch: bool,
    /// Earlier distinct digests of each stream tag kept pinned in the cache (for rollback).
    pub pin_history: usize,
    /// Scheduled imports running at once, node-wide.
    pub import_concurrency: usize,
    /// Scheduled imports running at once against one registry.
    pub import_registry_concurrency: usize,
    /// Shortest `--interval` accepted for scheduled tags.
    pub import_min_interval_secs: u64,
    /// Commands run on tag events (`[[triggers]]`).
    pub triggers: Vec<crate::triggers::TriggerConfig>,
    /// Also read the kubelet's `/var/lib/kubelet/config.json` credentials when present
    /// (`registry_auth_file` wins for a registry named in both).
    pub read_kubelet_auth: bool,
    /// Pull a tag's new image into the runtime as soon as the tag moves.
    pub prepull: bool,
    /// Where streams are kept: `embedded` (this node) or `etcd` (the cluster).
    pub store: StoreKind,
    /// etcd client URLs (`http://` or `https://`), with `store = "etcd"`.
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every key imagestream writes in etcd.
    pub etcd_prefix: String,
    /// CA bundle for `https://` etcd endpoints.
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate and key for etcd.
    pub etcd_cert_file: Option<PathBuf>,
    pub etcd_key_file: Option<PathBuf>,
    /// Lease TTL of the importer election: how long a dead importing node keeps the job.
    pub etcd_lease_ttl_secs: u64,
    /// This node's name in the cluster (the importer election) [default: the host name].
    pub node_name: String,
    /// Keep private images to pods whose pull credentials the registry accepts.
    pub private_images: bool,
    /// How long a verification of pull credentials (and a repository's privacy) is remembered.
    pub private_images_ttl_secs: u64,
    /// Private image, registry unreachable: `verified-before`, `deny` or `allow`.
    pub private_images_offline: crate::cri::private::OfflinePolicy,
    /// `IP:PORT` of the peer endpoint (mutual TLS; docs/cluster.md); unset: peers are off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_listen: Option<String>,
    /// `HOST:PORT` other nodes reach the peer endpoint at [default: `peer_listen`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_advertise: Option<String>,
    /// The other nodes (`NAME=HOST:PORT`), without etcd; with etcd they are discovered.
    pub peers: Vec<String>,
    /// Cluster CA, and this node's certificate and key (`imagestream peer certs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_key_file: Option<PathBuf>,
    /// Home nodes per blob: they keep streams' pinned images for the cluster.
    pub peer_replicas: usize,
    /// How long a peer may take to answer before the next one is asked.
    pub peer_first_byte_timeout_ms: u64,
    /// Lease TTL of this node's registration in etcd.
    pub peer_lease_ttl_secs: u64,
    /// The node's default signature policy for streams without their own: `enforce`, `warn`
    /// or `off` (README, "Signed images").
    pub signature_policy: crate::signature::policy::Mode,
    /// The cosign public keys (PEM files) the default policy trusts.
    pub signature_keys: Vec<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: DEFAULT_STATE_DIR.into(),
            cri_socket: DEFAULT_CRI_SOCKET.into(),
            admin_socket: DEFAULT_ADMIN_SOCKET.into(),
            runtime_endpoint: DEFAULT_RUNTIME_ENDPOINT.into(),
            insecure_registries: Vec::new(),
            stream_host: crate::stream::reference::DEFAULT_STREAM_HOST.into(),
            history_limit: crate::stream::model::DEFAULT_HISTORY_LIMIT,
            drain_timeout_secs: DEFAULT_DRAIN_TIMEOUT_SECS,
            admin_group: None,
            reader_group: None,
            allowed_registries: Vec::new(),
            require_pinned: false,
            policy_dry_run: false,
            mirror_listen: crate::mirror::DEFAULT_LISTEN.into(),
            mirror_upstreams: Vec::new(),
            registry_auth_file: None,
            cache_max_bytes: crate::cache::DEFAULT_MAX_BYTES,
            scrub_interval_secs: DEFAULT_SCRUB_INTERVAL_SECS,
            prefetch: true,
            pin_history: crate::cache::DEFAULT_PIN_HISTORY,
            import_concurrency: crate::importer::DEFAULT_CONCURRENCY,
            import_registry_concurrency: crate::importer::DEFAULT_REGISTRY_CONCURRENCY,
            import_min_interval_secs: crate::importer::DEFAULT_MIN_INTERVAL_SECS,
            triggers: Vec::new(),
            read_kubelet_auth: true,
            prepull: false,
            store: StoreKind::Embedded,
            etcd_endpoints: Vec::new(),
            etcd_prefix: crate::store::etcd::DEFAULT_PREFIX.into(),
            etcd_ca_file: None,
            etcd_cert_file: None,
            etcd_key_file: None,
            etcd_lease_ttl_secs: crate::store::etcd::DEFAULT_LEASE_TTL_SECS,
            node_name: host_name(),
            private_images: true,
            private_images_ttl_secs: crate::cri::private::DEFAULT_TTL_SECS,
            private_images_offline: crate::cri::private::OfflinePolicy::VerifiedBefore,
            peer_listen: None,
            peer_advertise: None,
            peers: Vec::new(),
            peer_ca_file: None,
            peer_cert_file: None,
            peer_key_file: None,
            peer_replicas: crate::peer::DEFAULT_REPLICAS,
            peer_first_byte_timeout_ms: crate::peer::DEFAULT_FIRST_BYTE_TIMEOUT.as_millis() as u64,
            peer_lease_ttl_secs: crate::peer::DEFAULT_LEASE_TTL_SECS,
            signature_policy: crate::signature::policy::Mode::Off,
            signature_keys: Vec::new(),
        }
    }
}

impl Config {
    /// Defaults, then the file (`path`, or the default path if it exists), then `overrides`.
    pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let file = match path {
            Some(p) => Some(read_file(p)?),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Some(read_file(Path::new(DEFAULT_CONFIG_PATH))?)
            }
            None => None,
        };
        Self::build(file, overrides)
    }

    /// Defaults, then `file` (already parsed, see [`parse`]), then `overrides`, validated.
    pub fn build(file: Option<FileConfig>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut config = Config::default();
        if let Some(f) = file {
            config.apply_file(f);
        }
        config.apply_overrides(overrides);
        config.validate()?;
        Ok(config)
    }

    fn apply_file(&mut self, f: FileConfig) {
        let FileConfig {
            state_dir,
            cri_socket,
            admin_socket,
            runtime_endpoint,
            insecure_registries,
            stream_host,
            history_limit,
            drain_timeout_secs,
            admin_group,
            reader_group,
            allowed_registries,
            require_pinned,
            policy_dry_run,
            mirror_listen,
            mirror_upstreams,
            registry_auth_file,
            cache_max_bytes,
            scrub_interval_secs,
            prefetch,
            pin_history,
            import_concurrency,
            import_registry_concurrency,
            import_min_interval_secs,
            triggers,
            read_kubelet_auth,
            prepull,
            store,
            etcd_endpoints,
            etcd_prefix,
            etcd_ca_file,
            etcd_cert_file,
            etcd_key_file,
            etcd_lease_ttl_secs,
            node_name,
            private_images,
            private_images_ttl_secs,
            private_images_offline,
            peer_listen,
            peer_advertise,
            peers,
            peer_ca_file,
            peer_cert_file,
            peer_key_file,
            peer_replicas,
            peer_first_byte_timeout_ms,
            peer_lease_ttl_secs,
            signature_policy,
            signature_keys,
        } = f;
        set(&mut self.state_dir, state_dir);
        set(&mut self.cri_socket, cri_socket);
        set(&mut self.admin_socket, admin_socket);
        set(&mut self.runtime_endpoint, runtime_endpoint);
        self.insecure_registries.extend(insecure_registries);
        set(&mut self.stream_host, stream_host);
        set(&mut self.history_limit, history_limit);
        set(&mut self.drain_timeout_secs, drain_timeout_secs);
        self.admin_group = admin_group.or(self.admin_group.take());
        self.reader_group = reader_group.or(self.reader_group.take());
        self.allowed_registries.extend(allowed_registries);
        set(&mut self.require_pinned, require_pinned);
        set(&mut self.policy_dry_run, policy_dry_run);
        set(&mut self.mirror_listen, mirror_listen);
        self.mirror_upstreams.extend(mirror_upstreams);
        self.registry_auth_file = registry_auth_file.or(self.registry_auth_file.take());
        set(&mut self.cache_max_bytes, cache_max_bytes);
        set(&mut self.scrub_interval_secs, scrub_interval_secs);
        set(&mut self.prefetch, prefetch);
        set(&mut self.pin_history, pin_history);
        set(&mut self.import_concurrency, import_concurrency);
        set(
            &mut self.import_registry_concurrency,
            import_registry_concurrency,
        );
        set(&mut self.import_min_interval_secs, import_min_interval_secs);
        self.triggers.extend(triggers);
        set(&mut self.read_kubelet_auth, read_kubelet_auth);
        set(&mut self.prepull, prepull);
        set(&mut self.store, store);
        self.etcd_endpoints.extend(etcd_endpoints);
        set(&mut self.etcd_prefix, etcd_prefix);
        self.etcd_ca_file = etcd_ca_file.or(self.etcd_ca_file.take());
        self.etcd_cert_file = etcd_cert_file.or(self.etcd_cert_file.take());
        self.etcd_key_file = etcd_key_file.or(self.etcd_key_file.take());
        set(&mut self.etcd_lease_ttl_secs, etcd_lease_ttl_secs);
        set(&mut self.node_name, node_name);
        set(&mut self.private_images, private_images);
        set(&mut self.private_images_ttl_secs, private_images_ttl_secs);
        set(&mut self.private_images_offline, private_images_offline);
        self.peer_listen = peer_listen.or(self.peer_listen.take());
        self.peer_advertise = peer_advertise.or(self.peer_advertise.take());
        self.peers.extend(peers);
        self.peer_ca_file = peer_ca_file.or(self.peer_ca_file.take());
        self.peer_cert_file = peer_cert_file.or(self.peer_cert_file.take());
        self.peer_key_file = peer_key_file.or(self.peer_key_file.take());
        set(&mut self.peer_replicas, peer_replicas);
        set(
            &mut self.peer_first_byte_timeout_ms,
            peer_first_byte_timeout_ms,
        );
        set(&mut self.peer_lease_ttl_secs, peer_lease_ttl_secs);
        set(&mut self.signature_policy, signature_policy);
        self.signature_keys.extend(signature_keys);
    }

    fn apply_overrides(&mut self, o: Overrides) {
        set(&mut self.state_dir, o.state_dir);
        set(&mut self.cri_socket, o.cri_socket);
        set(&mut self.admin_socket, o.admin_socket);
        set(&mut self.runtime_endpoint, o.runtime_endpoint);
        for r in o.insecure_registries {
            if !self.insecure_registries.contains(&r) {
                self.insecure_registries.push(r);
            }
        }
        set(&mut self.mirror_listen, o.mirror_listen);
        for u in o.mirror_upstreams {
            if !self.mirror_upstreams.contains(&u) {
                self.mirror_upstreams.push(u);
            }
        }
        set(&mut self.store, o.store);
        // Endpoints on the command line replace the file's: they name one cluster.
        if !o.etcd_endpoints.is_empty() {
            self.etcd_endpoints = o.etcd_endpoints;
        }
        if self.store == StoreKind::Etcd && self.etcd_endpoints.is_empty() {
            self.etcd_endpoints
                .push(crate::store::etcd::DEFAULT_ENDPOINT.into());
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        crate::cri::runtime::socket_path(&self.runtime_endpoint).map_err(|message| {
            ConfigError::Invalid {
                key: "runtime_endpoint",
                message,
            }
        })?;
        if self.history_limit == 0 {
            return Err(ConfigError::Invalid {
                key: "history_limit",
                message: "must be at least 1".into(),
            });
        }
        if self.stream_host.is_empty() || self.stream_host.contains('/') {
            return Err(ConfigError::Invalid {
                key: "stream_host",
                message: format!("{:?} is not a registry host name", self.stream_host),
            });
        }
        for p in &self.allowed_registries {
            if p.is_empty() || p.contains('/') || glob::Pattern::new(p).is_err() {
                return Err(ConfigError::Invalid {
                    key: "allowed_registries",
                    message: format!("{p:?} is not a registry host or host glob"),
                });
            }
        }
        for (key, group) in [
            ("admin_group", &self.admin_group),
            ("reader_group", &self.reader_group),
        ] {
            if let Some(g) = group {
                crate::admin::auth::resolve_group(g)
                    .map_err(|message| ConfigError::Invalid { key, message })?;
            }
        }
        for r in &self.insecure_registries {
            if r.is_empty() || r.contains('/') || r.contains("://") {
                return Err(ConfigError::Invalid {
                    key: "insecure_registries",
                    message: format!("{r:?} is not HOST or HOST:PORT"),
                });
            }
        }
        self.mirror_addr()?;
        crate::mirror::Upstreams::new(&self.mirror_upstreams, &self.insecure_registries).map_err(
            |message| ConfigError::Invalid {
                key: "mirror_upstreams",
                message,
            },
        )?;
        for t in &self.triggers {
            t.validate().map_err(|message| ConfigError::Invalid {
                key: "triggers",
                message,
            })?;
        }
        for e in &self.etcd_endpoints {
            let ok = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
            if !ok {
                return Err(ConfigError::Invalid {
                    key: "etcd_endpoints",
                    message: format!("{e:?} is not http://HOST:PORT or https://HOST:PORT"),
                });
            }
        }
        if !self.etcd_prefix.starts_with('/') || !self.etcd_prefix.ends_with('/') {
            return Err(ConfigError::Invalid {
                key: "etcd_prefix",
                message: format!("{:?} must start and end with '/'", self.etcd_prefix),
            });
        }
        if self.etcd_cert_file.is_some() != self.etcd_key_file.is_some() {
            return Err(ConfigError::Invalid {
                key: "etcd_cert_file",
                message: "etcd_cert_file and etcd_key_file go together".into(),
            });
        }
        if self.etcd_lease_ttl_secs < 2 {
            return Err(ConfigError::Invalid {
                key: "etcd_lease_ttl_secs",
                message: "must be at least 2".into(),
            });
        }
        self.peer_check()?;
        if self.cache_max_bytes == 0 {
            return Err(ConfigError::Invalid {
                key: "cache_max_bytes",
                message: "must be more than 0".into(),
            });
        }
        Ok(())
    }

    fn peer_check(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        let Some(listen) = &self.peer_listen else {
            if !self.peers.is_empty() {
                return invalid(
                    "peers",
                    "peers need peer_listen (this node's peer endpoint)".into(),
                );
            }
            return Ok(());
        };
        if listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid("peer_listen", format!("{listen:?} is not IP:PORT"));
        }
        if !crate::peer::discovery::check_name(&self.node_name) {
            return invalid(
                "node_name",
                format!(
                    "{:?} is not a node name (letters, digits, '-', '.', '_')",
                    self.node_name
                ),
            );
        }
        let advertise = self.peer_advertise();
        if !crate::peer::discovery::check_addr(&advertise)
            || advertise.starts_with("0.0.0.0:")
            || advertise.starts_with("[::]:")
        {
            return invalid(
                "peer_advertise",
                format!("{advertise:?} is not an address other nodes can reach (HOST:PORT)"),
            );
        }
        for (key, file) in [
            ("peer_ca_file", &self.peer_ca_file),
            ("peer_cert_file", &self.peer_cert_file),
            ("peer_key_file", &self.peer_key_file),
        ] {
            if file.is_none() {
                return invalid(
                    key,
                    "peer_listen needs peer_ca_file, peer_cert_file and peer_key_file \
                     (make them with `imagestream peer certs`)"
                        .into(),
                );
            }
        }
        if self.store == StoreKind::Etcd && !self.peers.is_empty() {
            return invalid(
                "peers",
                "with store = \"etcd\" nodes find each other through etcd; remove the peers list"
                    .into(),
            );
        }
        if self.store == StoreKind::Embedded {
            crate::peer::discovery::static_members(&self.peer_member(), &self.peers).map_err(
                |e| ConfigError::Invalid {
                    key: "peers",
                    message: e.to_string(),
                },
            )?;
        }
        if self.peer_replicas == 0 {
            return invalid("peer_replicas", "must be at least 1".into());
        }
        if self.peer_first_byte_timeout_ms == 0 {
            return invalid("peer_first_byte_timeout_ms", "must be more than 0".into());
        }
        if self.peer_lease_ttl_secs < 2 {
            return invalid("peer_lease_ttl_secs", "must be at least 2".into());
        }
        if self.signature_policy != crate::signature::policy::Mode::Off
            && self.signature_keys.is_empty()
        {
            return invalid(
                "signature_keys",
                format!(
                    "signature_policy = {:?} needs at least one cosign public key file",
                    self.signature_policy.as_str()
                ),
            );
        }
        Ok(())
    }

    /// The node's default signature policy, its key files read and checked; `None` when off.
    pub fn default_signature_policy(
        &self,
    ) -> Result<Option<crate::signature::policy::SignaturePolicy>, ConfigError> {
        use crate::signature::policy::{Mode, SignaturePolicy};
        if self.signature_policy == Mode::Off {
            return Ok(None);
        }
        let mut keys = Vec::new();
        for path in &self.signature_keys {
            let pem = std::fs::read(path).map_err(|e| ConfigError::Invalid {
                key: "signature_keys",
                message: format!("cannot read {}: {e}", path.display()),
            })?;
            keys.push((path.display().to_string(), pem));
        }
        SignaturePolicy::new(self.signature_policy, &keys)
            .map(Some)
            .map_err(|e| ConfigError::Invalid {
                key: "signature_keys",
                message: e.to_string(),
            })
    }

    /// Where other nodes reach this node's peer endpoint.
    pub fn peer_advertise(&self) -> String {
        self.peer_advertise
            .clone()
            .or_else(|| self.peer_listen.clone())
            .unwrap_or_default()
    }

    /// This node as a member of the cluster.
    pub fn peer_member(&self) -> crate::peer::Member {
        crate::peer::Member {
            name: self.node_name.clone(),
            addr: self.peer_advertise(),
        }
    }

    /// The peer TLS files, when all three are set.
    pub fn peer_tls_files(&self) -> Option<crate::peer::tls::TlsFiles> {
        Some(crate::peer::tls::TlsFiles {
            ca_file: self.peer_ca_file.clone()?,
            cert_file: self.peer_cert_file.clone()?,
            key_file: self.peer_key_file.clone()?,
        })
    }

    /// The mirror's listen address.
    pub fn mirror_addr(&self) -> Result<std::net::SocketAddr, ConfigError> {
        self.mirror_listen
            .parse()
            .map_err(|_| ConfigError::Invalid {
                key: "mirror_listen",
                message: format!("{:?} is not IP:PORT", self.mirror_listen),
            })
    }

    /// The mirror's base URL as containerd reaches it.
    pub fn mirror_url(&self) -> String {
        format!("http://{}", self.mirror_listen)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
}

/// The machine's host name, the default `node_name`.
fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text).map_err(|message| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    })
}

/// Parses config file text.
pub fn parse(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_file_and_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "state_dir = \"/tmp/x\"\ncri_socket = \"/tmp/c.sock\"\ninsecure_registries = [\"r:5000\"]\n",
        )
        .expect("write");
        let c = Config::load(
            Some(&path),
            Overrides {
                cri_socket: Some("/tmp/flag.sock".into()),
                insecure_registries: vec!["s:1".into()],
                ..Default::default()
            },
        )
        .expect("load");
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.cri_socket, PathBuf::from("/tmp/flag.sock"));
        assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert_eq!(c.insecure_registries, vec!["r:5000", "s:1"]);
    }

    #[test]
    fn built_from_text_and_printed_config_reads_back() {
        let file = parse("state_dir = \"/srv/is\"\nmirror_upstreams = [\"https://r.example\"]\n")
            .expect("parses");
        let c = Config::build(Some(file), Overrides::default()).expect("valid");
        assert_eq!(c.state_dir, PathBuf::from("/srv/is"));
        let printed = toml::to_string(&c).expect("prints");
        let again = Config::build(
            Some(parse(&printed).expect("reparses")),
            Overrides::default(),
        )
        .expect("valid");
        assert_eq!(again, c);
        let bad = parse("history_limit = 0").expect("parses");
        assert!(Config::build(Some(bad), Overrides::default()).is_err());
        let peers = parse(
            "node_name = \"n1\"\npeer_listen = \"10.0.0.1:5051\"\npeer_ca_file = \"/p/ca.pem\"\n\
             peer_cert_file = \"/p/n1.pem\"\npeer_key_file = \"/p/n1-key.pem\"\n\
             peers = [\"n2=10.0.0.2:5051\"]\n",
        )
        .expect("parses");
        let c = Config::build(Some(peers), Overrides::default()).expect("valid");
        assert_eq!(c.peer_advertise(), "10.0.0.1:5051");
        let printed = toml::to_string(&c).expect("prints");
        let again = Config::build(
            Some(parse(&printed).expect("reparses")),
            Overrides::default(),
        )
        .expect("valid");
        assert_eq!(again, c);
        for (bad, key) in [
            ("peers = [\"n2=10.0.0.2:5051\"]", "peers"),
            ("peer_listen = \"x\"", "peer_listen"),
            (
                "peer_listen = \"0.0.0.0:5051\"\nnode_name = \"n\"",
                "peer_advertise",
            ),
            (
                "peer_listen = \"10.0.0.1:5051\"\nnode_name = \"n\"",
                "peer_ca_file",
            ),
        ] {
            let e = Config::build(Some(parse(bad).expect("parses")), Overrides::default())
                .expect_err(bad);
            assert!(e.to_string().contains(key), "{bad}: {e}");
        }
        let bad = parse("history_limit = 0").expect("parses");
        assert!(Config::build(Some(bad), Overrides::default()).is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = parse("stat_dir = \"/x\"").expect_err("unknown key");
        assert!(e.contains("stat_dir"), "{e}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "runtime_endpoint = \"tcp://x\"").expect("write");
        let e = Config::load(Some(&path), Overrides::default()).expect_err("bad endpoint");
        assert!(e.to_string().contains("tcp://x"), "{e}");
    }
}
