//! Private images stay private on a shared node. containerd answers a `PullImage` of an image
//! it holds without asking the registry, and the node's layer cache serves blobs to anyone, so
//! without a check a pod without the pull secret could run an image that another pod pulled
//! with one. This module is that check (the CRI proxy calls it):
//!
//! - A repository is **private** when its registry refuses an anonymous manifest `HEAD`
//!   (401/403). The answer is remembered for [`PrivateSettings::ttl`].
//! - `PullImage` of a private repository is allowed only with credentials (the kubelet's
//!   `auth`) that the registry accepts for that repository: a `HEAD` of the manifest with them.
//!   A success is remembered for the TTL under a sha256 of the registry, repository and
//!   credentials, never the credentials themselves.
//! - An allowed pull grants the pod (its sandbox uid) that repository; `CreateContainer` of a
//!   private image needs that grant. `ImageStatus` of a private image answers "not present", so
//!   that the kubelet always goes through `PullImage` with the pod's credentials (a pull of an
//!   image the runtime holds costs no download).
//! - Registry unreachable: [`OfflinePolicy`] decides (default: accept only credentials verified
//!   before for that repository).
//!
//! Everything is in memory and bounded ([`MAX_ENTRIES`] per table); a restart re-verifies.

use crate::registry::auth::Credentials;
use crate::registry::{RegistryClient, RegistryError};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Default time a verification (and a repository's privacy) is remembered.
pub const DEFAULT_TTL_SECS: u64 = 3600;
/// Entries kept per table; the oldest go first.
pub const MAX_ENTRIES: usize = 10_000;
/// Parsed references kept ([`PrivateGate::repo_of`]): a node's images, with room to spare.
const MAX_PARSED: usize = 1024;

/// What to do with a private image when its registry cannot be reached to verify credentials
/// (`private_images_offline`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OfflinePolicy {
    /// Accept credentials that were verified for this repository before (even if that is
    /// longer ago than the TTL); refuse others.
    #[default]
    VerifiedBefore,
    /// Refuse every pull of a private image until the registry answers.
    Deny,
    /// Accept any pull that carries credentials.
    Allow,
}

#[derive(Debug, Clone)]
pub struct PrivateSettings {
    /// Off: no check at all (`private_images = false`).
    pub enabled: bool,
    pub ttl: Duration,
    pub offline: OfflinePolicy,
    /// Registries reached over plain HTTP.
    pub insecure_registries: Vec<String>,
}

#[derive(Debug, Error)]
pub enum PrivateError {
    #[error("image {image:?} is private (its registry refuses anonymous access) and the pull carries no credentials; give the pod an imagePullSecret for {registry}")]
    NoCredentials { image: String, registry: String },
    #[error(
        "image {image:?} is private and its registry refused the pod's credentials: {message}"
    )]
    Refused { image: String, message: String },
    #[error("RegistryUnavailable: image {image:?} is private and its credentials cannot be verified now ({message}); private_images_offline = {policy:?} refuses them")]
    Unverifiable {
        image: String,
        message: String,
        policy: OfflinePolicy,
    },
    #[error("image {image:?} is private and this pod has not pulled it with valid credentials; the kubelet pulls again when ImageStatus says the image is absent")]
    NotGranted { image: String },
}

impl From<PrivateError> for tonic::Status {
    fn from(e: PrivateError) -> Self {
        let code = match e {
            // The kubelet's convention for "the registry is down": code Unknown and a message
            // starting with RegistryUnavailable (see `super::pull_errors`).
            PrivateError::Unverifiable { .. } => tonic::Code::Unknown,
            _ => tonic::Code::PermissionDenied,
        };
        crate::audit::status(code, e.to_string())
    }
}

/// The kubelet's credentials for one pull (CRI `AuthConfig`), as they came.
#[derive(Clone, Default)]
pub struct PullAuth {
    pub username: String,
    pub password: String,
    pub auth: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl std::fmt::Debug for PullAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullAuth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl PullAuth {
    pub fn from_cri(a: &k8s_cri::v1::AuthConfig) -> Option<Self> {
        let p = Self {
            username: a.username.clone(),
            password: a.password.clone(),
            auth: a.auth.clone(),
            identity_token: a.identity_token.clone(),
            registry_token: a.registry_token.clone(),
        };
        (!p.is_empty()).then_some(p)
    }

    fn is_empty(&self) -> bool {
        self.username.is_empty()
            && self.password.is_empty()
            && self.auth.is_empty()
            && self.identity_token.is_empty()
            && self.registry_token.is_empty()
    }

    /// The key a verification is remembered under: sha256 over repository and credentials.
    fn key(&self, repo: &str) -> String {
        let mut h = Sha256::new();
        for part in [
            repo,
            &self.username,
            &self.password,
            &self.auth,
            &self.identity_token,
            &self.registry_token,
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(h.finalize())
    }

    fn credentials(&self, host: &str) -> Option<Credentials> {
        let token = if !self.registry_token.is_empty() {
            Some(self.registry_token.as_str())
        } else if !self.identity_token.is_empty() {
            Some(self.identity_token.as_str())
        } else {
            None
        };
        let entry = match token {
            Some(t) => serde_json::json!({ "identitytoken": t }),
            None if !self.username.is_empty() || !self.password.is_empty() => {
                serde_json::json!({ "username": self.username, "password": self.password })
            }
            None => serde_json::json!({ "auth": self.auth }),
        };
        let config = serde_json::json!({ "auths": { host: entry } });
        Credentials::parse(config.to_string().as_bytes()).ok()
    }
}

/// A table with expiry stamps and a size bound.
#[derive(Debug, Default)]
struct Table<K> {
    entries: HashMap<K, Instant>,
}

impl<K: std::hash::Hash + Eq + Clone> Table<K> {
    fn insert(&mut self, k: K) {
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&k) {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(k, Instant::now());
    }

    /// Seen within `ttl`.
    fn fresh(&self, k: &K, ttl: Duration) -> bool {
        self.entries.get(k).is_some_and(|t| t.elapsed() < ttl)
    }

    fn seen(&self, k: &K) -> bool {
        self.entries.contains_key(k)
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[derive(Debug, Default)]
struct State {
    /// Repositories whose registry refused anonymous access.
    private: Table<String>,
    /// Repositories anonymous access worked for.
    public: Table<String>,
    /// Credential keys ([`PullAuth::key`]) the registry accepted.
    verified: Table<String>,
    /// Private repositories a pull with verified credentials was allowed for: their blobs may
    /// come from peers ([`PrivateGate::peers_allowed`]).
    admitted: Table<String>,
    /// (pod sandbox uid, repository) pairs allowed by a verified pull.
    grants: Table<(String, String)>,
    /// Image ids (config digests) the runtime returned for private repositories.
    private_ids: HashMap<String, String>,
}

pub struct PrivateGate {
    settings: PrivateSettings,
    anonymous: RegistryClient,
    state: Mutex<State>,
    /// [`Self::repo_of`]'s answers by reference. The reference grammar is a regular
    /// expression that costs about 50,000 instructions a parse, a third of a stream
    /// reference's hot `PullImage`; a node names few distinct images. Emptied when full.
    repos: Mutex<HashMap<String, Option<(String, String)>>>,
}

/// What the gate decided for a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullDecision {
    /// Not private (or the check is off): nothing to remember.
    Public,
    /// Private and allowed: after the pull, [`PrivateGate::granted`] records it for the pod.
    Private { repo: String },
}

impl PrivateGate {
    pub fn new(settings: PrivateSettings) -> Self {
        Self {
            anonymous: RegistryClient::new(&settings.insecure_registries),
            settings,
            state: Mutex::new(State::default()),
            repos: Mutex::new(HashMap::new()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// `registry/repository` and registry host of a plain reference; `None` for an image id
    /// or a bad reference.
    fn repo_of(&self, image: &str) -> Option<(String, String)> {
        if crate::stream::reference::is_image_id(image) {
            return None;
        }
        let mut repos = match self.repos.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(known) = repos.get(image) {
            return known.clone();
        }
        let parsed = RegistryClient::parse(image).ok().map(|r| {
            (
                format!("{}/{}", r.registry(), r.repository()),
                r.registry().to_string(),
            )
        });
        if repos.len() >= MAX_PARSED {
            repos.clear();
        }
        repos.insert(image.to_string(), parsed.clone());
        parsed
    }

    /// Whether `repo` is private, asking its registry anonymously when not known.
    async fn is_private(&self, image: &str, repo: &str) -> bool {
        {
            let s = self.state();
            if s.private.fresh(&repo.to_string(), self.settings.ttl) {
                return true;
            }
            if s.public.fresh(&repo.to_string(), self.settings.ttl) {
                return false;
            }
        }
        match self.anonymous.head_digest(image).await {
            Err(RegistryError::Unauthorized { .. }) => {
                tracing::info!(
                    repo,
                    "repository is private: pulls need verified credentials"
                );
                self.state().private.insert(repo.to_string());
                true
            }
            Ok(_) => {
                self.state().public.insert(repo.to_string());
                false
            }
            // Unreachable or not found: keep what was known last (private stays private).
            Err(e) => {
                let known = self.state().private.seen(&repo.to_string());
                tracing::debug!(repo, error = %e, known_private = known, "cannot tell whether the repository is private");
                known
            }
        }
    }

    /// Checks a `PullImage` of `image` (a plain reference, after stream resolution).
    pub async fn check_pull(
        &self,
        image: &str,
        auth: Option<&PullAuth>,
    ) -> Result<PullDecision, PrivateError> {
        let decision = self.decide_pull(image, auth).await;
        if let Ok(PullDecision::Private { repo }) = &decision {
            self.state().admitted.insert(repo.clone());
        }
        decision
    }

    /// Whether blobs of `host/repository` may be asked of (or filled by) peers: always,
    /// unless the repository is known private and no pull of it with verified credentials
    /// went through this gate within the TTL. The gate runs in `PullImage`, before the
    /// runtime asks the mirror, so a pod's allowed pull has been recorded by then.
    pub fn peers_allowed(&self, host: &str, repository: &str) -> bool {
        if !self.settings.enabled {
            return true;
        }
        let repo = format!("{host}/{repository}");
        let s = self.state();
        !s.private.seen(&repo) || s.admitted.fresh(&repo, self.settings.ttl)
    }

    async fn decide_pull(
        &self,
        image: &str,
        auth: Option<&PullAuth>,
    ) -> Result<PullDecision, PrivateError> {
        if !self.settings.enabled {
            return Ok(PullDecision::Public);
        }
        let Some((repo, host)) = self.repo_of(image) else {
            return Ok(PullDecision::Public);
        };
        if !self.is_private(image, &repo).await {
            return Ok(PullDecision::Public);
        }
        let Some(auth) = auth else {
            return Err(PrivateError::NoCredentials {
                image: image.to_string(),
                registry: host,
            });
        };
        let key = auth.key(&repo);
        if self.state().verified.fresh(&key, self.settings.ttl) {
            return Ok(PullDecision::Private { repo });
        }
        let Some(creds) = auth.credentials(&host) else {
            return Err(PrivateError::Refused {
                image: image.to_string(),
                message: "the credentials are malformed".into(),
            });
        };
        let client = RegistryClient::with_credentials(&self.settings.insecure_registries, creds);
        match client.head_digest(image).await {
            Ok(_) => {
                tracing::info!(repo, "pull credentials verified with the registry");
                self.state().verified.insert(key);
                Ok(PullDecision::Private { repo })
            }
            Err(e @ (RegistryError::Unauthorized { .. } | RegistryError::NotFound { .. })) => {
                Err(PrivateError::Refused {
                    image: image.to_string(),
                    message: e.to_string(),
                })
            }
            Err(e) => {
                let allowed = match self.settings.offline {
                    OfflinePolicy::Allow => true,
                    OfflinePolicy::Deny => false,
                    OfflinePolicy::VerifiedBefore => self.state().verified.seen(&key),
                };
                tracing::warn!(repo, error = %e, allowed, policy = ?self.settings.offline,
                    "cannot verify pull credentials with the registry");
                if allowed {
                    Ok(PullDecision::Private { repo })
                } else {
                    Err(PrivateError::Unverifiable {
                        image: image.to_string(),
                        message: e.to_string(),
                        policy: self.settings.offline,
                    })
                }
            }
        }
    }

    /// Records that the pod `pod_uid` pulled `repo` (as image id `image_id`) with verified
    /// credentials.
    pub fn granted(&self, pod_uid: Option<&str>, repo: &str, image_id: &str) {
        let mut s = self.state();
        if let Some(uid) = pod_uid.filter(|u| !u.is_empty()) {
            s.grants.insert((uid.to_string(), repo.to_string()));
        }
        if !image_id.is_empty() {
            if s.private_ids.len() >= MAX_ENTRIES {
                s.private_ids.clear();
            }
            s.private_ids.insert(image_id.to_string(), repo.to_string());
        }
    }

    /// The private repository `image` (a reference or an image id) belongs to, if known.
    fn private_repo(&self, image: &str) -> Option<String> {
        let s = self.state();
        if let Some(repo) = s.private_ids.get(image) {
            return Some(repo.clone());
        }
        if s.private.is_empty() {
            // No private repository known: nothing to parse (the common case, on every
            // ImageStatus).
            return None;
        }
        let (repo, _) = self.repo_of(image)?;
        s.private.seen(&repo).then_some(repo)
    }

    /// Whether `ImageStatus` should answer "not present" for `image`: it is private, so the
    /// kubelet must pull it with the pod's credentials.
    pub fn hide_status(&self, image: &str) -> bool {
        self.settings.enabled && self.private_repo(image).is_some()
    }

    /// Checks a `CreateContainer` of `images` (what the pod named and the id the kubelet
    /// passes) for the pod `pod_uid`.
    pub fn check_create(&self, images: &[&str], pod_uid: Option<&str>) -> Result<(), PrivateError> {
        if !self.settings.enabled {
            return Ok(());
        }
        for image in images.iter().filter(|i| !i.is_empty()) {
            let Some(repo) = self.private_repo(image) else {
                continue;
            };
            let granted = pod_uid.is_some_and(|uid| {
                self.state()
                    .grants
                    .fresh(&(uid.to_string(), repo.clone()), self.settings.ttl)
            });
            if !granted {
                return Err(PrivateError::NotGranted {
                    image: image.to_string(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_hides_the_credentials_and_separates_fields() {
        let a = PullAuth {
            username: "u".into(),
            password: "secret".into(),
            ..Default::default()
        };
        let k = a.key("r/x");
        assert_eq!(k.len(), 64);
        assert!(!k.contains("secret"));
        let b = PullAuth {
            username: "us".into(),
            password: "ecret".into(),
            ..Default::default()
        };
        assert_ne!(k, b.key("r/x"), "field boundaries count");
        assert_ne!(k, a.key("r/y"), "the repository counts");
        assert!(!format!("{a:?}").contains("secret"));
    }

    #[test]
    fn tables_are_bounded() {
        let mut t = Table::default();
        for i in 0..MAX_ENTRIES + 5 {
            t.insert(i);
        }
        assert_eq!(t.entries.len(), MAX_ENTRIES);
    }

    #[test]
    fn parsed_references_are_kept_and_bounded() {
        let gate = PrivateGate::new(PrivateSettings {
            enabled: true,
            ttl: Duration::from_secs(60),
            offline: OfflinePolicy::VerifiedBefore,
            insecure_registries: vec![],
        });
        let app = Some(("r.io/team/app".to_string(), "r.io".to_string()));
        assert_eq!(gate.repo_of("r.io/team/app:v1"), app);
        assert_eq!(gate.repo_of("r.io/team/app:v1"), app, "the kept answer");
        assert_eq!(gate.repo_of("Not A Reference"), None);
        assert_eq!(gate.repo_of("Not A Reference"), None);
        assert_eq!(gate.repo_of(&format!("sha256:{}", "a".repeat(64))), None);
        for i in 0..MAX_PARSED + 5 {
            gate.repo_of(&format!("r.io/team/app{i}:v1"));
        }
        assert!(gate.repos.lock().unwrap().len() <= MAX_PARSED);
        assert_eq!(gate.repo_of("r.io/team/app:v1"), app);
    }

    #[test]
    fn grants_and_hidden_status() {
        let gate = PrivateGate::new(PrivateSettings {
            enabled: true,
            ttl: Duration::from_secs(60),
            offline: OfflinePolicy::VerifiedBefore,
            insecure_registries: vec![],
        });
        gate.state().private.insert("r.io/team/app".into());
        assert!(gate.hide_status("r.io/team/app:v1"));
        assert!(!gate.hide_status("r.io/team/other:v1"));
        let id = format!("sha256:{}", "a".repeat(64));
        gate.granted(Some("pod-a"), "r.io/team/app", &id);
        assert!(gate.hide_status(&id));
        assert!(gate.check_create(&[&id], Some("pod-a")).is_ok());
        assert!(gate
            .check_create(&["r.io/team/app:v1", &id], Some("pod-a"))
            .is_ok());
        assert!(matches!(
            gate.check_create(&[&id], Some("pod-b")),
            Err(PrivateError::NotGranted { .. })
        ));
        assert!(gate
            .check_create(&["r.io/team/other:v1"], Some("pod-b"))
            .is_ok());
    }

    #[tokio::test]
    async fn peers_only_for_private_repositories_a_verified_pull_let_through() {
        let gate = PrivateGate::new(PrivateSettings {
            enabled: true,
            ttl: Duration::from_secs(60),
            offline: OfflinePolicy::VerifiedBefore,
            insecure_registries: vec![],
        });
        // Unknown or public: peers may serve it.
        assert!(gate.peers_allowed("r.io", "team/app"));
        gate.state().private.insert("r.io/team/app".into());
        assert!(!gate.peers_allowed("r.io", "team/app"));
        // A pull with credentials verified before goes through the gate: now peers may.
        let auth = PullAuth {
            username: "u".into(),
            password: "p".into(),
            auth: String::new(),
            identity_token: String::new(),
            registry_token: String::new(),
        };
        gate.state().verified.insert(auth.key("r.io/team/app"));
        let d = gate.check_pull("r.io/team/app:v1", Some(&auth)).await;
        assert!(matches!(d, Ok(PullDecision::Private { .. })), "{d:?}");
        assert!(gate.peers_allowed("r.io", "team/app"));
    }
}
