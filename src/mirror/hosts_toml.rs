//! containerd's per-registry `hosts.toml` (`<config_path>/<registry>/hosts.toml`) that sends a
//! registry's pulls through the mirror first and falls back to the registry itself. containerd
//! re-reads it on every pull, so no restart is needed.

use super::registry_host::{check_registry, plain_http};
use std::path::{Path, PathBuf};

/// containerd's default `config_path` for registry hosts.
pub const DEFAULT_CERTS_DIR: &str = "/etc/containerd/certs.d";

/// The file's text: `server` is the registry itself (the fallback), the mirror is tried first
/// for pulls and tag resolution.
pub fn render(registry: &str, server_url: &str, mirror_url: &str) -> String {
    format!(
        "# Written by `imagestream mirror hosts-toml`: pulls of {registry} go through the\n\
         # imagestream node cache first, then to {registry} itself.\n\
         server = \"{server_url}\"\n\
         \n\
         [host.\"{mirror_url}\"]\n\
         \x20 capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// `https://HOST` for registries, `http://HOST` for the insecure ones (and loopback): see
/// [`plain_http`].
pub fn server_url(registry: &str, insecure: &[String]) -> String {
    if plain_http(registry, insecure) {
        format!("http://{registry}")
    } else if registry == "docker.io" {
        "https://registry-1.docker.io".to_string()
    } else {
        format!("https://{registry}")
    }
}

/// Writes `<dir>/<registry>/hosts.toml` (temp file + rename) and returns its path.
pub fn write(dir: &Path, registry: &str, text: &str) -> Result<PathBuf, String> {
    check_registry(registry)?;
    let host_dir = dir.join(registry);
    std::fs::create_dir_all(&host_dir)
        .map_err(|e| format!("cannot create {}: {e}", host_dir.display()))?;
    let path = host_dir.join("hosts.toml");
    crate::cache::write_atomically(&path, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_valid_toml() {
        let text = render(
            "127.0.0.1:5000",
            "http://127.0.0.1:5000",
            "http://127.0.0.1:5050",
        );
        let v: toml::Value = toml::from_str(&text).expect("toml");
        assert_eq!(v["server"].as_str(), Some("http://127.0.0.1:5000"));
        assert_eq!(
            v["host"]["http://127.0.0.1:5050"]["capabilities"]
                .as_array()
                .map(Vec::len),
            Some(2)
        );
        assert_eq!(server_url("r.example", &[]), "https://r.example");
        assert_eq!(
            server_url("r.example:5000", &["r.example:5000".into()]),
            "http://r.example:5000"
        );
        assert!(write(Path::new("/nonexistent"), "../etc", "").is_err());
    }
}
