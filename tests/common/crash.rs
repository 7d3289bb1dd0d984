//! Helpers for crash and broken-disk tests: a seeded random source, the iteration count
//! (`IMAGESTREAM_CRASH_ITERATIONS`, default 100), raw blob uploads to a docker-registry, a tmpfs
//! mounted for the test and unmounted on drop (even on panic), and the invariants checked after
//! every restart of a killed daemon.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::daemon::Daemon;
use super::mirror::{files_under, http_fetch, ingest_dir, verify_store, HttpResponse};

/// Kill/restart rounds per phase: `IMAGESTREAM_CRASH_ITERATIONS`, default 100.
pub fn iterations() -> usize {
    std::env::var("IMAGESTREAM_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

/// xorshift64*, seeded from `IMAGESTREAM_CRASH_SEED` or the clock; the seed is printed so a
/// failing run can be repeated.
pub struct Rng(u64);

impl Rng {
    pub fn new(what: &str) -> Rng {
        let seed = std::env::var("IMAGESTREAM_CRASH_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        eprintln!("{what}: IMAGESTREAM_CRASH_SEED={seed}");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

/// Uploads `bytes` as a blob of repository `name` (monolithic upload); returns its digest.
pub fn push_blob(addr: &str, name: &str, bytes: &[u8]) -> String {
    let digest = super::mirror::sha256_bytes(bytes);
    let t = Duration::from_secs(10);
    let r = http_fetch(
        addr,
        "POST",
        &format!("/v2/{name}/blobs/uploads/"),
        &[],
        &[],
        t,
    )
    .unwrap_or_else(|e| panic!("start upload to {addr}/{name}: {e}"));
    assert_eq!(r.status, 202, "start upload: {r:?}");
    let location = r.header("location").expect("upload Location").to_string();
    let path = match location.find("/v2/") {
        Some(i) => location[i..].to_string(),
        None => location,
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let target = format!("{path}{sep}digest={digest}");
    let r = http_fetch(
        addr,
        "PUT",
        &target,
        &[("Content-Type", "application/octet-stream")],
        bytes,
        t,
    )
    .unwrap_or_else(|e| panic!("finish upload of {digest}: {e}"));
    assert_eq!(r.status, 201, "finish upload of {digest}: {r:?}");
    digest
}

/// `GET /v2/<name>/blobs/<digest>?ns=<upstream>` on the daemon's mirror.
pub fn mirror_get_blob(
    d: &Daemon,
    name: &str,
    digest: &str,
    upstream: &str,
    timeout: Duration,
) -> Result<HttpResponse, String> {
    http_fetch(
        &d.mirror_addr,
        "GET",
        &format!("/v2/{name}/blobs/{digest}?ns={upstream}"),
        &[],
        &[],
        timeout,
    )
}

/// Temporaries left anywhere in the state dir: files under `ingest/`, and `*.tmp.*` files
/// (atomic-write temporaries such as `mirror-tags.tmp.<pid>`).
pub fn temporaries(state_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = files_under(&ingest_dir(state_dir))
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    out.extend(
        files_under(state_dir)
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.contains(".tmp."))
            }),
    );
    out.sort();
    out.dedup();
    out
}

/// After a restart: no temporary survives (waits up to 5 s) and every blob re-hashes to its
/// name. Returns the number of blobs re-hashed.
pub fn check_restarted(d: &Daemon, when: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = temporaries(&d.state_dir);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{when}: temporaries survived the restart: {left:?}\n{}",
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    verify_store(&d.state_dir)
        .unwrap_or_else(|e| panic!("{when}: {e}\n{}", d.log_tail()))
        .len()
}

/// A tmpfs of `size` (e.g. `"12m"`) mounted at a path; unmounted (lazily) on drop, even on
/// panic. Needs root.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        super::require_root("mounting a tmpfs");
        std::fs::create_dir_all(path).expect("create the mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs on {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Free bytes (`df`'s available).
    pub fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.path)
            .output()
            .expect("run df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
