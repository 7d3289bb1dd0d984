//! go-containerregistry's registry (`pkg/registry`, the library cosign itself talks to
//! registries with), the test tool `referrers-registry` built by `scripts/test-tools.sh` with
//! the OCI 1.1 referrers API on: unlike docker-registry 2.8 ([`super::Registry`]) it answers
//! `GET /v2/<name>/referrers/<digest>`, so an artifact pushed with a `subject` is found through
//! it and no `sha256-<hex>` fallback tag is written for it.
//!
//! [`ReferrersRegistry::start`] serves plain HTTP on a free 127.0.0.1 port, without auth,
//! keeping blobs and manifests in memory, with its log in a temp dir of its own; drop kills it
//! (everything it held is gone) and deletes the dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::tools::tool;
use super::{
    file_tail, free_port, harness_tempdir, log_file, send_signal, wait_or_kill, wait_serving_v2,
};

/// A running go-containerregistry registry serving plain HTTP on 127.0.0.1.
pub struct ReferrersRegistry {
    /// "127.0.0.1:PORT"
    pub addr: String,
    /// Temp dir holding registry.log.
    pub dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    tmp: Option<TempDir>,
}

impl ReferrersRegistry {
    /// Starts the registry on a free port and waits until `GET /v2/` answers 200.
    pub fn start() -> ReferrersRegistry {
        let binary = tool("referrers-registry");
        let tmp = harness_tempdir("isrefreg-");
        let dir = tmp.path().to_path_buf();
        let log = dir.join("registry.log");
        let mut last_err = String::new();
        // The free port can be taken between probing and binding; retry with a new one.
        for _attempt in 0..5 {
            let port = free_port();
            let mut r = ReferrersRegistry {
                addr: format!("127.0.0.1:{port}"),
                dir: dir.clone(),
                log: log.clone(),
                child: None,
                tmp: None,
            };
            match r.spawn_and_wait(&binary) {
                Ok(()) => {
                    r.tmp = Some(tmp);
                    return r;
                }
                Err(e) => {
                    last_err = e;
                    r.stop();
                }
            }
        }
        panic!(
            "referrers-registry did not come up: {last_err}\nlog tail:\n{}",
            file_tail(&log, 4000)
        );
    }

    fn spawn_and_wait(&mut self, binary: &Path) -> Result<(), String> {
        let (out, err) = log_file(&self.log);
        let child = Command::new(binary)
            .arg("--address")
            .arg(&self.addr)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", binary.display()))?;
        self.child = Some(child);
        wait_serving_v2(
            self.child.as_mut(),
            &self.addr,
            "referrers-registry",
            Duration::from_secs(30),
        )
    }

    /// Stops the registry process.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(&[child.id()], "TERM");
            wait_or_kill(&mut child, Duration::from_secs(5));
        }
    }

    /// The registry's log (stderr) so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every request the registry answered so far, in order, from its log: it writes one line
    /// per request once the response is sent, `DATE TIME METHOD URL` when it succeeded and
    /// `DATE TIME METHOD URL STATUS CODE MESSAGE` when it answered an error. (It logs no
    /// client, so a test tells whose requests are whose by when they came: see
    /// [`ReferrersRegistry::requests_since`].)
    pub fn requests(&self) -> Vec<RegistryRequest> {
        self.log_text().lines().filter_map(parse_request).collect()
    }

    /// The requests answered after the first `n` (`n` = `requests().len()` taken earlier).
    pub fn requests_since(&self, n: usize) -> Vec<RegistryRequest> {
        self.requests().into_iter().skip(n).collect()
    }
}

/// One request in the registry's log ([`ReferrersRegistry::requests`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryRequest {
    pub method: String,
    /// With the query string.
    pub path: String,
    /// The error status it answered; `None` when it succeeded (2xx: the registry does not log
    /// the status of a success).
    pub error_status: Option<u16>,
}

/// `2006/01/02 15:04:05 METHOD URL [STATUS CODE MESSAGE]` (Go's `log.LstdFlags` prefix); any
/// other line (its start-up line, notes) is `None`.
fn parse_request(line: &str) -> Option<RegistryRequest> {
    let mut words = line.split(' ');
    let (_date, _time) = (words.next()?, words.next()?);
    let method = words.next()?;
    let path = words.next()?;
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !path.starts_with("/v2")
    {
        return None;
    }
    let error_status = match words.next() {
        None => None,
        Some(status) => Some(status.parse().ok()?),
    };
    Some(RegistryRequest {
        method: method.to_string(),
        path: path.to_string(),
        error_status,
    })
}

impl Drop for ReferrersRegistry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "harness: referrers-registry log tail:\n{}",
                file_tail(&self.log, 2000)
            );
        }
        self.stop();
        if let Some(tmp) = self.tmp.take() {
            let path = tmp.path().to_path_buf();
            if tmp.close().is_err() {
                let _ = fs::remove_dir_all(&path);
            }
        }
    }
}
