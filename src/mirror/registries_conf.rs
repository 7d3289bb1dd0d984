//! CRI-O's registries.conf drop-in (`/etc/containers/registries.conf.d/imagestream-<host>.conf`,
//! containers-registries.conf(5)) that sends a registry's pulls through the mirror first and
//! falls back to the registry itself.
//!
//! CRI-O cannot tell the mirror which registry a pull is for (containerd's `ns=`), so the
//! mirror location carries it as a path prefix ([`super::registry_host`]): a pull of
//! `REGISTRY/team/app:v1` becomes `MIRROR/imagestream--upstream/<REGISTRY>/team/app:v1`.
//!
//! A drop-in's `[[registry]]` table replaces every earlier one with the same prefix (from
//! registries.conf or an earlier drop-in), so the file is complete on its own: it says whether
//! the registry itself is insecure, too. CRI-O reads registries.conf.d when it starts and again
//! on SIGHUP (`systemctl reload crio`), or by itself with `auto_reload_registries = true`.

use super::registry_host::{check_registry, encode_host, plain_http, upstream_prefix};
use std::path::{Path, PathBuf};

/// Where CRI-O (containers/image) reads registries.conf drop-ins by default.
pub const DEFAULT_DROP_IN_DIR: &str = "/etc/containers/registries.conf.d";

/// The drop-in's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropIn {
    /// The registry: `HOST` or `HOST:PORT` (`docker.io` for Docker Hub).
    pub registry: String,
    /// The registry itself is reached over plain HTTP ([`plain_http`]).
    pub registry_insecure: bool,
    /// The mirror's location: `MIRROR_HOST:PORT/imagestream--upstream/<host>`.
    pub mirror_location: String,
    /// The mirror is plain HTTP.
    pub mirror_insecure: bool,
}

impl DropIn {
    /// From the registry, the mirror's URL (`http://HOST:PORT` or `https://HOST`), and the
    /// daemon's `insecure_registries`; errors name the bad value.
    pub fn new(registry: &str, mirror_url: &str, insecure: &[String]) -> Result<Self, String> {
        check_registry(registry)?;
        let prefix = upstream_prefix(registry)?;
        let (secure, mirror_host) = crate::mirror::parse_upstream(mirror_url)
            .map_err(|e| format!("invalid --mirror: {e}"))?;
        Ok(Self {
            registry: registry.to_string(),
            registry_insecure: plain_http(registry, insecure),
            mirror_location: format!("{mirror_host}/{prefix}"),
            mirror_insecure: !secure,
        })
    }

    /// The file's name: `imagestream-<encoded host>.conf`.
    pub fn file_name(&self) -> Result<String, String> {
        Ok(format!("imagestream-{}.conf", encode_host(&self.registry)?))
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let registry = &self.registry;
        let mut text = format!(
            "# Written by `imagestream mirror registries-conf`: CRI-O pulls of {registry} go\n\
             # through the imagestream node cache first, then to {registry} itself.\n\
             # This [[registry]] replaces any other one for {registry} (registries.conf or an\n\
             # earlier drop-in), so it carries the registry's own settings too.\n\
             [[registry]]\n\
             location = {}\n",
            quote(registry)
        );
        if self.registry_insecure {
            text.push_str("insecure = true\n");
        }
        text.push_str(&format!(
            "\n[[registry.mirror]]\nlocation = {}\n",
            quote(&self.mirror_location)
        ));
        if self.mirror_insecure {
            text.push_str("insecure = true\n");
        }
        text
    }
}

/// A TOML basic string. Every value here is checked to be `[A-Za-z0-9.:_/[]-]`, but quote
/// properly anyway.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Writes the drop-in to `path` (temp file + rename, so CRI-O never reads half a file), creating
/// its directory.
pub fn write(path: &Path, text: &str) -> Result<PathBuf, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    crate::cache::write_atomically(path, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::registry_host::split_upstream_prefix;

    fn parse(text: &str) -> toml::Value {
        toml::from_str(text).expect("valid toml")
    }

    #[test]
    fn renders_a_complete_registry_table() {
        let d = DropIn::new("127.0.0.1:5000", "http://127.0.0.1:5050", &[]).expect("ok");
        assert_eq!(
            d.file_name().as_deref(),
            Ok("imagestream-127.0.0.1_5000.conf")
        );
        let v = parse(&d.render());
        let regs = v["registry"].as_array().expect("[[registry]]");
        assert_eq!(regs.len(), 1);
        let r = &regs[0];
        assert_eq!(r["location"].as_str(), Some("127.0.0.1:5000"));
        assert_eq!(r["insecure"].as_bool(), Some(true));
        assert!(r.get("prefix").is_none() && r.get("mirror-by-digest-only").is_none());
        let mirrors = r["mirror"].as_array().expect("[[registry.mirror]]");
        assert_eq!(mirrors.len(), 1);
        assert_eq!(
            mirrors[0]["location"].as_str(),
            Some("127.0.0.1:5050/imagestream--upstream/127.0.0.1_5000")
        );
        assert_eq!(mirrors[0]["insecure"].as_bool(), Some(true));
        assert!(mirrors[0].get("pull-from-mirror").is_none());
    }

    #[test]
    fn secure_registry_and_mirror() {
        let d = DropIn::new("registry.example.com", "https://mirror.node:5443", &[]).expect("ok");
        let v = parse(&d.render());
        let r = &v["registry"][0];
        assert_eq!(r["location"].as_str(), Some("registry.example.com"));
        assert!(r.get("insecure").is_none());
        assert!(r["mirror"][0].get("insecure").is_none());
        let insecure = DropIn::new(
            "r.example:5000",
            "http://127.0.0.1:5050",
            &["r.example:5000".into()],
        )
        .expect("ok");
        assert_eq!(
            parse(&insecure.render())["registry"][0]["insecure"].as_bool(),
            Some(true)
        );
    }

    #[test]
    fn round_trips_with_the_mirror() {
        // What CRI-O sends for a pull of REGISTRY/team/app: the mirror location's path, then
        // the repository; the mirror must read back REGISTRY and team/app.
        for registry in [
            "127.0.0.1:5000",
            "docker.io",
            "registry.example.com:8443",
            "Reg.Example",
        ] {
            let d = DropIn::new(registry, "http://127.0.0.1:5050", &[]).expect("ok");
            let loc = parse(&d.render())["registry"][0]["mirror"][0]["location"]
                .as_str()
                .expect("location")
                .to_string();
            let (mirror_host, path) = loc.split_once('/').expect("path");
            assert_eq!(mirror_host, "127.0.0.1:5050");
            let name = format!("{path}/team/app");
            crate::mirror::check_name(&name).expect("valid repository name");
            let (host, repo) = split_upstream_prefix(&name).expect("ok").expect("prefixed");
            assert_eq!(host, registry.to_ascii_lowercase());
            assert_eq!(repo, "team/app");
        }
    }

    #[test]
    fn errors_name_the_bad_value() {
        for (registry, mirror) in [
            ("[::1]:5000", "http://127.0.0.1:5050"),
            ("a_b.example", "http://127.0.0.1:5050"),
            ("../etc", "http://127.0.0.1:5050"),
            ("r.example:0", "http://127.0.0.1:5050"),
        ] {
            let e = DropIn::new(registry, mirror, &[]).expect_err(registry);
            assert!(e.contains(&format!("{registry:?}")), "{e}");
        }
        let e = DropIn::new("r.example", "ftp://m", &[]).expect_err("scheme");
        assert!(e.contains("--mirror") && e.contains("ftp://m"), "{e}");
        let e = DropIn::new("r.example", "http://m/path", &[]).expect_err("path");
        assert!(e.contains("http://m/path"), "{e}");
    }

    #[test]
    fn writes_atomically() {
        let dir = std::env::temp_dir().join(format!("is-regconf-{}", std::process::id()));
        let d = DropIn::new("127.0.0.1:5000", "http://127.0.0.1:5050", &[]).expect("ok");
        let path = dir.join("sub").join(d.file_name().expect("name"));
        write(&path, &d.render()).expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), d.render());
        let entries = std::fs::read_dir(dir.join("sub")).expect("dir").count();
        assert_eq!(entries, 1, "no temp file left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
