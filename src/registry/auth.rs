//! Registry credentials from a docker `config.json` (`auths` entries: `auth` as base64
//! `user:password`, or `username`/`password`, or an `identitytoken`). Credentials are looked up
//! by registry host and only ever handed to the client for that host; they are never logged
//! (the `Debug` output redacts them).

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use thiserror::Error;

/// The kubelet's image credentials, also read when present (`read_kubelet_auth`).
pub const KUBELET_AUTH_FILE: &str = "/var/lib/kubelet/config.json";

/// Largest credentials file read.
pub const MAX_AUTH_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum AuthFileError {
    #[error("cannot read registry auth file {path}: {message}")]
    Read { path: String, message: String },
    #[error("invalid registry auth file {path}: {message}")]
    Parse { path: String, message: String },
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(Deserialize, Default)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

#[derive(Clone)]
enum Secret {
    Basic(String, String),
    Token(String),
}

/// Credentials by registry host.
#[derive(Clone, Default)]
pub struct Credentials {
    by_host: HashMap<String, Secret>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hosts: Vec<&String> = self.by_host.keys().collect();
        hosts.sort();
        f.debug_struct("Credentials")
            .field("hosts", &hosts)
            .finish_non_exhaustive()
    }
}

/// `https://index.docker.io/v1/` and friends → `docker.io`; `https://r.io/x` → `r.io`.
fn normalise_host(key: &str) -> String {
    let host = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = host.split('/').next().unwrap_or(host).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

impl Credentials {
    /// No credentials: every registry is reached anonymously.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads a docker `config.json`.
    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let read = |message: String| AuthFileError::Read {
            path: path.display().to_string(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| read(e.to_string()))?;
        if meta.len() > MAX_AUTH_FILE_BYTES {
            return Err(read(format!("larger than {MAX_AUTH_FILE_BYTES} bytes")));
        }
        let text = std::fs::read(path).map_err(|e| read(e.to_string()))?;
        Self::parse(&text).map_err(|message| AuthFileError::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses docker `config.json` bytes. Errors never include secret values.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let config: DockerConfig = serde_json::from_slice(bytes).map_err(|e| {
            // serde_json's messages quote no input values, only positions and types.
            e.to_string()
        })?;
        let mut by_host = HashMap::new();
        for (key, entry) in config.auths {
            let host = normalise_host(&key);
            let secret = if let Some(token) = entry.identitytoken.filter(|t| !t.is_empty()) {
                Secret::Token(token)
            } else if let (Some(u), Some(p)) = (entry.username.clone(), entry.password.clone()) {
                Secret::Basic(u, p)
            } else if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| format!("auths.{key:?}.auth is not base64"))?;
                let decoded = String::from_utf8(decoded)
                    .map_err(|_| format!("auths.{key:?}.auth is not UTF-8"))?;
                let (u, p) = decoded
                    .split_once(':')
                    .ok_or_else(|| format!("auths.{key:?}.auth is not user:password"))?;
                Secret::Basic(u.to_string(), p.to_string())
            } else {
                continue;
            };
            by_host.insert(host, secret);
        }
        Ok(Self { by_host })
    }

    /// The credentials for `host` (as it appears in a reference), anonymous when none.
    pub fn for_host(&self, host: &str) -> RegistryAuth {
        match self.by_host.get(&normalise_host(host)) {
            Some(Secret::Basic(u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            Some(Secret::Token(t)) => RegistryAuth::Bearer(t.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    /// Adds `other`'s hosts that `self` has no credentials for.
    pub fn merge(mut self, other: Credentials) -> Self {
        for (host, secret) in other.by_host {
            self.by_host.entry(host).or_insert(secret);
        }
        self
    }

    /// Hosts with credentials.
    pub fn hosts(&self) -> Vec<String> {
        let mut h: Vec<String> = self.by_host.keys().cloned().collect();
        h.sort();
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_config_and_never_shows_secrets() {
        let json = br#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"dTpw"},
            "r.example:5000":{"username":"bob","password":"s3cret"},
            "empty.example":{}
        }}"#;
        let c = Credentials::parse(json).expect("parses");
        assert!(
            matches!(c.for_host("docker.io"), RegistryAuth::Basic(u, p) if u == "u" && p == "p")
        );
        assert!(matches!(c.for_host("r.example:5000"), RegistryAuth::Basic(u, _) if u == "bob"));
        assert!(matches!(
            c.for_host("other.example"),
            RegistryAuth::Anonymous
        ));
        assert!(!format!("{c:?}").contains("s3cret"));
        let other = Credentials::parse(br#"{"auths":{"r.example:5000":{"username":"eve","password":"x"},"k.example":{"username":"k","password":"y"}}}"#).expect("parses");
        let merged = c.merge(other);
        assert!(
            matches!(merged.for_host("r.example:5000"), RegistryAuth::Basic(u, _) if u == "bob")
        );
        assert!(matches!(merged.for_host("k.example"), RegistryAuth::Basic(u, _) if u == "k"));
        let e = Credentials::parse(br#"{"auths":{"h":{"auth":"!!!"}}}"#).expect_err("bad");
        assert!(e.contains("not base64"), "{e}");
    }
}
