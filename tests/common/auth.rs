//! A real docker-registry that requires credentials (htpasswd basic auth) on the storage of
//! another test registry, and docker `config.json` files for it: for the mirror's credentials,
//! private images and redirects.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A real docker-registry on the storage of `data_dir` requiring basic auth (`user`,
/// `password`); stopped when dropped.
pub struct HtpasswdRegistry {
    pub addr: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl HtpasswdRegistry {
    pub fn start(data_dir: &std::path::Path, user: &str, password: &str) -> HtpasswdRegistry {
        super::require_binary("htpasswd", "apache2-utils");
        super::require_binary("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .expect("htpasswd");
        assert!(out.status.success(), "htpasswd failed");
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, &out.stdout).expect("write htpasswd");
        for _ in 0..5 {
            let addr = format!("127.0.0.1:{}", super::free_port());
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {data}\n\
                     auth:\n  htpasswd:\n    realm: imagestream-test\n    path: {htpasswd}\n\
                     http:\n  addr: {addr}\n  secret: imagestream-test-secret\n",
                    data = data_dir.display(),
                    htpasswd = htpasswd.display()
                ),
            )
            .expect("write config");
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn docker-registry");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if super::http_get_status(&addr, "/v2/") == Some(401) {
                    return HtpasswdRegistry {
                        addr,
                        child,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("authenticated docker-registry did not come up");
    }
}

impl Drop for HtpasswdRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A docker `config.json` giving `user:password` for `host`.
pub fn docker_config_json(host: &str, user: &str, password: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{user}:{password}");
    let mut b64 = String::new();
    for chunk in raw.as_bytes().chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    format!(r#"{{"auths":{{"{host}":{{"auth":"{b64}"}}}}}}"#)
}
