//! Shared integration-test harness: real, isolated test beds for the CRI image-service proxy.
//!
//! Provides
//! - [`Registry`]: a real `docker-registry` (distribution 2.8) on a free loopback port with its own
//!   storage in a temp dir; `stop`/`restart` keep port and storage.
//! - [`push_image`] / [`push_pause_image`]: build tiny busybox-based OCI images with `umoci` and push
//!   them with `skopeo`; returns the manifest digest. The busybox base layout is built once and cached
//!   (in `CARGO_TARGET_TMPDIR`, shared safely between threads and processes).
//! - [`RuntimeBed`]: a real CRI runtime — containerd 2.x (default), containerd 1.6 or CRI-O, picked
//!   by `IMAGESTREAM_TEST_RUNTIME` ([`runtime`]) — with root, state and socket in its own temp dir;
//!   `stop`/`start_again` keep its state.
//! - CRI clients over the unix socket ([`cri_channel`], [`runtime_client`], [`image_client`]) and
//!   config builders ([`pod_config`], [`container_config`]).
//! - Small helpers: [`free_port`], [`wait_for_socket`], [`processes_mentioning`], [`mounts_under`].
//! - For the layer cache and mirror: the registry's access log ([`Registry::blob_gets`]),
//!   [`push_image_with_random_layers`], a fault-injecting origin ([`origin`]), and the content
//!   store, `/metrics`, raw HTTP and CRI pull/remove helpers ([`mirror`]).
//! - Fake, fault-injecting registries that answer however a test wants, and an htpasswd
//!   docker-registry ([`hostile`]).
//! - Several "nodes" on one machine ([`netns`]): a bridge and network namespaces, with the
//!   registry, runtime and daemon started inside one on request ([`Registry::start_in`],
//!   [`RuntimeBed::start_in`], [`daemon::Daemon::start_in`]).
//!
//! Everything is torn down on `Drop`: processes (the runtime, its shims or conmons and their
//! containers) are killed, mounts under the bed dir are lazily unmounted deepest first, shim
//! sockets are removed and the temp dir is deleted. Test beds are independent, so tests may run in
//! parallel threads and processes. Needs root, the Debian packages of `scripts/test.sh` and the
//! tools of `scripts/test-tools.sh`; a missing piece panics with a message naming it.
#![allow(dead_code)]

pub mod auth;
pub mod cosign;
pub mod crash;
pub mod crictl;
pub mod critest;
pub mod daemon;
pub mod etcd;
pub mod hostile;
pub mod kubelet;
pub mod mirror;
pub mod netns;
pub mod origin;
pub mod peer;
pub mod referrers_registry;
pub mod runtime;
pub mod tools;

#[allow(unused_imports)]
pub use runtime::{BedOptions, RuntimeBed, RuntimeKind};

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, VersionRequest,
};
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint, Uri};

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// A free loopback TCP port (bound to 127.0.0.1:0, then released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local_addr of a bound listener")
        .port()
}

/// Polls until the unix socket at `path` accepts a connection; false on timeout.
pub fn wait_for_socket(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if StdUnixStream::connect(path).is_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Panics with an install hint unless `bin` is on PATH.
pub fn require_binary(bin: &str, apt_package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in
        std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
    {
        let candidate = dir.join(bin);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("{bin} not found: apt-get install {apt_package}");
}

/// Panics unless the test runs as root (containerd and runc need it).
pub fn require_root(what: &str) {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let euid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("");
    assert!(euid == "0", "{what} needs root (effective uid is {euid:?})");
}

/// Runs a command, panicking with its stderr/stdout when it fails. Returns stdout.
fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what}: {cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Last `max_bytes` of a (log) file, for panic messages.
pub fn file_tail(path: &Path, max_bytes: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max_bytes);
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

fn log_file(path: &Path) -> (Stdio, Stdio) {
    let f = File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log file {}: {e}", path.display()));
    let f2 = f.try_clone().expect("clone log file handle");
    (Stdio::from(f), Stdio::from(f2))
}

/// Sends `signal` (e.g. "TERM", "KILL") to pids via /usr/bin/kill; errors (already gone) ignored.
fn send_signal(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .args(pids.iter().map(|p| p.to_string()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits up to `timeout` for a child to exit; SIGKILLs it afterwards.
fn wait_or_kill(child: &mut Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs a future to completion on a fresh current-thread runtime in a helper thread, so that
/// synchronous harness code works both inside and outside a tokio runtime.
fn block_on_fresh<F>(fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build helper tokio runtime")
                .block_on(fut)
        })
        .join()
        .expect("helper runtime thread panicked")
    })
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000_000
    )
}

fn harness_tempdir(prefix: &str) -> TempDir {
    // Short paths under /tmp: unix socket paths are limited to 108 bytes.
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create harness temp dir")
}

// ---------------------------------------------------------------------------------------------
// Processes and mounts
// ---------------------------------------------------------------------------------------------

struct ProcInfo {
    pid: u32,
    ppid: u32,
    zombie: bool,
    cmdline: String,
}

fn list_processes() -> Vec<ProcInfo> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..." - comm may contain spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .split('\0')
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        out.push(ProcInfo {
            pid,
            ppid,
            zombie: state == "Z" || state == "X",
            cmdline,
        });
    }
    out
}

fn dir_needle(dir: &Path) -> String {
    let mut s = dir.to_string_lossy().into_owned();
    if !s.ends_with('/') {
        s.push('/');
    }
    s
}

/// Live (non-zombie) processes whose command line mentions `dir/` (pid, command line).
pub fn processes_mentioning(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir_needle(dir);
    let me = std::process::id();
    list_processes()
        .into_iter()
        .filter(|p| !p.zombie && p.pid != me && p.cmdline.contains(&needle))
        .map(|p| (p.pid, p.cmdline))
        .collect()
}

/// Unix socket paths that the given processes have open (from /proc/PID/fd and /proc/net/unix).
fn unix_socket_paths_of(pids: &[u32]) -> Vec<PathBuf> {
    let mut inodes = BTreeSet::new();
    for pid in pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let table = fs::read_to_string("/proc/net/unix").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode [Path]
            if cols.len() >= 8 && inodes.contains(cols[6]) && cols[7].starts_with('/') {
                Some(PathBuf::from(cols[7]))
            } else {
                None
            }
        })
        .collect()
}

/// Kills (SIGKILL) every process whose command line mentions `dir/`, plus all their descendants
/// (containers run as children of their shim), waits for them to die and removes the shims'
/// sockets under /run/containerd/s.
pub fn kill_processes_mentioning(dir: &Path) {
    let needle = dir_needle(dir);
    let me = std::process::id();
    for _round in 0..3 {
        let procs = list_processes();
        let mut targets: BTreeSet<u32> = procs
            .iter()
            .filter(|p| !p.zombie && p.pid != me && p.cmdline.contains(&needle))
            .map(|p| p.pid)
            .collect();
        if targets.is_empty() {
            return;
        }
        let shims: Vec<u32> = procs
            .iter()
            .filter(|p| targets.contains(&p.pid) && p.cmdline.contains("containerd-shim"))
            .map(|p| p.pid)
            .collect();
        // Descendants (closure over ppid).
        loop {
            let before = targets.len();
            for p in &procs {
                if !p.zombie && p.pid != me && targets.contains(&p.ppid) {
                    targets.insert(p.pid);
                }
            }
            if targets.len() == before {
                break;
            }
        }
        let shim_sockets = unix_socket_paths_of(&shims);
        let pids: Vec<u32> = targets.iter().copied().collect();
        send_signal(&pids, "KILL");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let alive = list_processes()
                .iter()
                .any(|p| !p.zombie && targets.contains(&p.pid));
            if !alive {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for sock in shim_sockets {
            if sock.starts_with("/run/containerd/s") {
                let _ = fs::remove_file(sock);
            }
        }
    }
}

fn unescape_mountinfo(s: &str) -> String {
    // Mount points escape space, tab, newline and backslash as \ooo (octal).
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points at or under `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    mounts
}

/// Lazily unmounts (`umount -l`) everything mounted at or under `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    for _ in 0..5 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&m)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

/// A real `docker-registry` (distribution 2.8) serving plain HTTP on 127.0.0.1.
pub struct Registry {
    /// "127.0.0.1:PORT"
    pub addr: String,
    /// Temp dir holding config.yml, registry.log and the storage (`data/`).
    pub dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    pause_pushed: Mutex<bool>,
    tmp: Option<TempDir>,
    /// The network namespace it runs in ([`Registry::start_in`]); `None`: the test's own.
    netns: Option<String>,
}

impl Registry {
    /// Starts a registry on a free port with storage in a fresh temp dir (delete enabled) and waits
    /// until `GET /v2/` answers 200.
    pub fn start() -> Registry {
        Self::start_on(None, || format!("127.0.0.1:{}", free_port()))
    }

    /// Like [`Registry::start`], inside `host`'s network namespace, listening on
    /// `<host.ip>:5000` (another port if that one is taken there), e.g. `10.213.7.2:5000`.
    /// The test reaches it from its own namespace over the LAN; the access log, `stop` and
    /// `restart` work as for [`Registry::start`].
    pub fn start_in(host: &netns::NetHost) -> Registry {
        let ip = host.ip.clone();
        let mut attempt = 0u16;
        Self::start_on(Some(host.netns.clone()), move || {
            attempt += 1;
            format!("{ip}:{}", 4999 + attempt)
        })
    }

    fn start_on(netns: Option<String>, mut next_addr: impl FnMut() -> String) -> Registry {
        require_binary("docker-registry", "docker-registry");
        let tmp = harness_tempdir("isreg-");
        let dir = tmp.path().to_path_buf();
        let data = dir.join("data");
        fs::create_dir_all(&data).expect("create registry storage dir");
        let log = dir.join("registry.log");
        let config = dir.join("config.yml");
        let mut last_err = String::new();
        // The free port can be taken between probing and binding; retry with a new one.
        for _attempt in 0..5 {
            let addr = next_addr();
            let yml = format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
                 \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: {addr}\n  secret: imagestream-test-secret\n",
                data = data.display()
            );
            fs::write(&config, yml).expect("write registry config.yml");
            let mut reg = Registry {
                addr,
                dir: dir.clone(),
                config: config.clone(),
                log: log.clone(),
                child: None,
                pause_pushed: Mutex::new(false),
                tmp: None,
                netns: netns.clone(),
            };
            match reg.spawn_and_wait() {
                Ok(()) => {
                    reg.tmp = Some(tmp);
                    return reg;
                }
                Err(e) => {
                    last_err = e;
                    reg.stop();
                }
            }
        }
        panic!(
            "docker-registry did not come up: {last_err}\nlog tail:\n{}",
            file_tail(&log, 4000)
        );
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let (out, err) = log_file(&self.log);
        let child = netns::command_in(self.netns.as_deref(), "docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn docker-registry: {e}"))?;
        self.child = Some(child);
        wait_serving_v2(
            self.child.as_mut(),
            &self.addr,
            "docker-registry",
            Duration::from_secs(15),
        )
    }

    /// Stops the registry process (storage and port are kept for `restart`).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(&[child.id()], "TERM");
            wait_or_kill(&mut child, Duration::from_secs(5));
        }
    }

    /// Starts the registry again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!(
                    "docker-registry restart on {} failed: {e}\nlog tail:\n{}",
                    self.addr,
                    file_tail(&self.log, 4000)
                ),
                Err(_) => {
                    self.stop();
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Whether the registry process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// "<addr>/<name_tag>", e.g. `reg.image_ref("app:v1")`.
    pub fn image_ref(&self, name_tag: &str) -> String {
        format!("{}/{}", self.addr, name_tag)
    }

    /// Every request the registry answered so far (across restarts), from its access log
    /// (Apache combined format, one line per finished response: `"GET /v2/... HTTP/1.1" 200 1234`).
    /// Waits until the log stops growing for 150 ms (max 3 s): the line is written just after
    /// the response body, so a caller that has just read a body could otherwise miss it.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut text = fs::read_to_string(&self.log).unwrap_or_default();
        loop {
            std::thread::sleep(Duration::from_millis(150));
            let again = fs::read_to_string(&self.log).unwrap_or_default();
            if again.len() == text.len() || Instant::now() >= deadline {
                text = again;
                break;
            }
            text = again;
        }
        text.lines().filter_map(AccessLogEntry::parse).collect()
    }

    /// Successful (200/206) GETs of `/v2/<name>/blobs/sha256:...` per digest, counted at the
    /// real origin (its access log).
    pub fn blob_gets(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for e in self.access_log() {
            if let Some(digest) = e.successful_blob_get() {
                *counts.entry(digest.to_string()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Successful blob GETs whose User-Agent does not start with `prefix`, e.g. "imagestream/":
    /// a pull that should go through a mirror but that the runtime fetched from the origin
    /// itself (containerd says "containerd/…", CRI-O "cri-o/…").
    pub fn blob_gets_not_by(&self, prefix: &str) -> Vec<AccessLogEntry> {
        self.access_log()
            .into_iter()
            .filter(|e| e.successful_blob_get().is_some() && !e.user_agent.starts_with(prefix))
            .collect()
    }

    /// Body bytes the registry sent for successful blob GETs (from its access log).
    pub fn blob_bytes_served(&self) -> u64 {
        self.access_log()
            .iter()
            .filter(|e| e.successful_blob_get().is_some())
            .map(|e| e.bytes)
            .sum()
    }
}

/// One line of the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub status: u16,
    /// Response body bytes written.
    pub bytes: u64,
    /// The client's User-Agent ("containerd/1.6..." when containerd fetched directly).
    pub user_agent: String,
}

impl AccessLogEntry {
    /// Parses `127.0.0.1 - - [date] "GET /v2/x/blobs/sha256:.. HTTP/1.1" 200 157 "" "ua"`.
    pub fn parse(line: &str) -> Option<AccessLogEntry> {
        let start = line.find(" \"")? + 2;
        let rest = &line[start..];
        let end = rest.find('"')?;
        let mut request = rest[..end].split(' ');
        let method = request.next()?.to_string();
        let target = request.next()?;
        if !request.next()?.starts_with("HTTP/") {
            return None;
        }
        let mut after = rest[end + 1..].split_whitespace();
        let status = after.next()?.parse().ok()?;
        let bytes = after.next()?.parse().unwrap_or(0);
        let path = target.split('?').next().unwrap_or(target).to_string();
        // Then `"referer" "user agent"`.
        let quoted: Vec<&str> = rest[end + 1..].split('"').collect();
        let user_agent = quoted.get(3).copied().unwrap_or("").to_string();
        Some(AccessLogEntry {
            method,
            path,
            status,
            bytes,
            user_agent,
        })
    }

    /// The digest if this is a GET of a blob answered 200 or 206.
    pub fn successful_blob_get(&self) -> Option<&str> {
        if self.method != "GET" || !(self.status == 200 || self.status == 206) {
            return None;
        }
        blob_digest_of_path(&self.path)
    }
}

/// `sha256:<hex>` if `path` (query stripped or not) is `/v2/<name>/blobs/sha256:<64 hex>`.
pub fn blob_digest_of_path(path: &str) -> Option<&str> {
    let path = path.split('?').next().unwrap_or(path);
    let (prefix, digest) = path.rsplit_once("/blobs/")?;
    let hex = digest.strip_prefix("sha256:")?;
    let ok = prefix.starts_with("/v2/")
        && hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then_some(digest)
}

impl Drop for Registry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "harness: registry log tail:\n{}",
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

/// Plain HTTP/1.0 GET with std TcpStream; returns the status code.
pub fn http_get_status(addr: &str, path: &str) -> Option<u16> {
    http_request(addr, "GET", path, &[]).map(|(status, _)| status)
}

/// Plain HTTP/1.0 request with std TcpStream (no body); returns (status, body).
/// Note: registry 2.8 answers 404 for an OCI manifest unless the request sends
/// `Accept: application/vnd.oci.image.manifest.v1+json`.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, Vec<u8>)> {
    let sock_addr = addr.parse().ok()?;
    let mut stream = TcpStream::connect_timeout(&sock_addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .ok()?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf);
    let header_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..header_end]);
    let mut parts = head.lines().next()?.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    Some((status, buf[header_end + 4..].to_vec()))
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

const BASE_TAG: &str = "base";
const BASE_FORMAT_VERSION: u32 = 1;

/// OCI layout with the busybox layer (tag "base"), built once and cached on disk.
fn base_layout() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(build_base_layout)
}

fn build_base_layout() -> PathBuf {
    require_binary("umoci", "umoci");
    let busybox = Path::new("/bin/busybox");
    let meta = fs::metadata(busybox).unwrap_or_else(|e| {
        panic!("/bin/busybox not usable ({e}): apt-get install busybox-static")
    });
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Cargo gives integration tests/benches a scratch dir that survives runs; use it as a
    // cross-process cache. Elsewhere fall back to the system temp dir.
    let cache_root = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    fs::create_dir_all(&cache_root).expect("create image cache dir");
    let final_dir = cache_root.join(format!(
        "imagestream-base-v{BASE_FORMAT_VERSION}-{}-{mtime}",
        meta.len()
    ));
    if final_dir.join("index.json").is_file() {
        return final_dir;
    }
    let work = tempfile::Builder::new()
        .prefix(".imagestream-base-build-")
        .tempdir_in(&cache_root)
        .expect("create base image build dir");
    let layout = work.path().join("layout");
    let bundle = work.path().join("bundle");
    let image = format!("{}:{BASE_TAG}", layout.display());
    umoci_new_image(&layout, &image);
    run(
        Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(&image)
            .arg(&bundle),
        "umoci unpack",
    );
    let bin = bundle.join("rootfs/bin");
    fs::create_dir_all(&bin).expect("create rootfs/bin");
    fs::copy(busybox, bin.join("busybox")).expect("copy /bin/busybox into image");
    for applet in ["sh", "sleep", "cat", "echo", "ls"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("symlink busybox applet");
    }
    run(
        Command::new("umoci")
            .args(["repack", "--image"])
            .arg(&image)
            .arg(&bundle),
        "umoci repack",
    );
    // Atomic publish; if another process won the race, use its copy.
    if fs::rename(&layout, &final_dir).is_err() && !final_dir.join("index.json").is_file() {
        panic!(
            "cannot publish base image layout to {}",
            final_dir.display()
        );
    }
    final_dir
}

fn copy_dir_recursive(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let entry = entry.expect("read_dir entry");
        let ty = entry.file_type().expect("file type");
        let dst = to.join(entry.file_name());
        if ty.is_dir() {
            copy_dir_recursive(&entry.path(), &dst);
        } else {
            fs::copy(entry.path(), &dst)
                .unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        }
    }
}

/// Waits until the registry at `addr` answers `GET /v2/` with 200, for up to `timeout`; an
/// error if `child` (the registry's process) exits first or time runs out.
pub fn wait_serving_v2(
    mut child: Option<&mut std::process::Child>,
    addr: &str,
    what: &str,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(child) = child.as_deref_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("{what} exited early: {status}"));
            }
        }
        if http_get_status(addr, "/v2/") == Some(200) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err("timeout waiting for GET /v2/ == 200".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Builds an image (busybox at /bin/busybox with sh/sleep/cat/echo/ls symlinks, `/version`
/// containing `version` + "\n", label `imagestream.test/version=<version>`, the given entrypoint)
/// and pushes it with skopeo to `registry.addr/name:tag`. Returns the manifest digest "sha256:...".
pub fn push_image(
    registry: &Registry,
    name: &str,
    tag: &str,
    version: &str,
    entrypoint: &[&str],
) -> String {
    push_image_to(&registry.addr, name, tag, version, entrypoint)
}

/// Like [`push_image`], for any registry address ("host:port", plain HTTP).
pub fn push_image_to(
    addr: &str,
    name: &str,
    tag: &str,
    version: &str,
    entrypoint: &[&str],
) -> String {
    require_binary("skopeo", "skopeo");
    let base = base_layout();
    let work = harness_tempdir("isimg-");
    let layout = work.path().join("layout");
    copy_dir_recursive(base, &layout);
    let version_file = work.path().join("version");
    fs::write(&version_file, format!("{version}\n")).expect("write version file");
    let base_image = format!("{}:{BASE_TAG}", layout.display());
    run(
        Command::new("umoci")
            .args(["insert", "--image"])
            .arg(&base_image)
            .arg(&version_file)
            .arg("/version"),
        "umoci insert /version",
    );
    let mut cfg = Command::new("umoci");
    cfg.args(["config", "--image"])
        .arg(&base_image)
        .args(["--tag", "img"])
        .arg(format!("--config.label=imagestream.test/version={version}"));
    for part in entrypoint {
        cfg.arg(format!("--config.entrypoint={part}"));
    }
    run(&mut cfg, "umoci config");
    let digest = skopeo_push(
        work.path(),
        &format!("{}:img", layout.display()),
        &format!("{addr}/{name}:{tag}"),
    );
    assert!(
        digest.starts_with("sha256:"),
        "unexpected digest from skopeo: {digest:?}"
    );
    digest
}

/// Pushes "pause:test" (entrypoint `/bin/sleep infinity`) once per registry.
pub fn push_pause_image(registry: &Registry) {
    let mut pushed = registry
        .pause_pushed
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if !*pushed {
        push_image(
            registry,
            "pause",
            "test",
            "pause",
            &["/bin/sleep", "infinity"],
        );
        *pushed = true;
    }
}

/// An image pushed by [`push_random_image_to`]: every blob digest the registry holds for it.
#[derive(Debug, Clone)]
pub struct RandomImage {
    /// Manifest digest.
    pub digest: String,
    /// Config blob digest (containerd's image id).
    pub config: String,
    /// Layer digests, in order, with their (compressed) sizes.
    pub layers: Vec<(String, u64)>,
    /// Manifest size in bytes.
    pub manifest_size: u64,
    /// Config size in bytes.
    pub config_size: u64,
}

impl RandomImage {
    /// Manifest, config and layer digests.
    pub fn blobs(&self) -> Vec<String> {
        let mut all = vec![self.digest.clone(), self.config.clone()];
        all.extend(self.layers.iter().map(|(d, _)| d.clone()));
        all
    }

    /// Layer digests only.
    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|(d, _)| d.clone()).collect()
    }

    /// Manifest + config + layers, in bytes.
    pub fn total_size(&self) -> u64 {
        self.manifest_size + self.config_size + self.layers.iter().map(|(_, s)| s).sum::<u64>()
    }
}

/// Builds an image from scratch (no busybox: it is pulled, never run) with one layer per entry
/// of `sizes`, layer `i` holding the single file `/random-<i>` of `sizes[i]` bytes from
/// /dev/urandom (incompressible, so gzip keeps each layer about that size and no two layers or
/// images share a blob), and pushes it to `registry/name_tag`. Returns (manifest digest, layer
/// digests).
pub fn push_image_with_random_layers(
    registry: &Registry,
    name_tag: &str,
    sizes: &[usize],
) -> (String, Vec<String>) {
    let image = push_random_image_to(&registry.addr, name_tag, sizes);
    let layers = image.layer_digests();
    (image.digest, layers)
}

/// Like [`push_image_with_random_layers`], for any registry address, returning every blob
/// (read back from the registry's manifest).
pub fn push_random_image_to(addr: &str, name_tag: &str, sizes: &[usize]) -> RandomImage {
    require_binary("umoci", "umoci");
    require_binary("skopeo", "skopeo");
    let (name, _tag) = name_tag
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("push_random_image_to: {name_tag:?} is not NAME:TAG"));
    let work = harness_tempdir("isrnd-");
    let layout = work.path().join("layout");
    let image = format!("{}:img", layout.display());
    umoci_new_image(&layout, &image);
    let mut urandom = File::open("/dev/urandom").expect("open /dev/urandom");
    for (i, size) in sizes.iter().enumerate() {
        let file = work.path().join(format!("random-{i}"));
        let mut out = File::create(&file).expect("create random layer file");
        let copied = std::io::copy(&mut (&mut urandom).take(*size as u64), &mut out)
            .expect("copy random bytes");
        assert_eq!(copied, *size as u64, "short read from /dev/urandom");
        drop(out);
        run(
            Command::new("umoci")
                .args(["insert", "--image"])
                .arg(&image)
                .arg(&file)
                .arg(format!("/random-{i}")),
            "umoci insert random layer",
        );
        let _ = fs::remove_file(&file);
    }
    run(
        Command::new("umoci")
            .args(["config", "--image"])
            .arg(&image)
            .arg(format!(
                "--config.label=imagestream.test/random={}",
                unique_suffix()
            )),
        "umoci config",
    );
    let digest = skopeo_push(work.path(), &image, &format!("{addr}/{name_tag}"));
    let manifest = registry_manifest(addr, name, &digest);
    let config = manifest["config"]["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("manifest {digest} without config digest: {manifest}"))
        .to_string();
    let config_size = manifest["config"]["size"].as_u64().unwrap_or(0);
    let layers: Vec<(String, u64)> = manifest["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("manifest {digest} without layers: {manifest}"))
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().expect("layer digest").to_string(),
                l["size"].as_u64().expect("layer size"),
            )
        })
        .collect();
    assert_eq!(
        layers.len(),
        sizes.len(),
        "umoci insert did not make one layer per file: {manifest}"
    );
    let manifest_size = registry_manifest_bytes(addr, name, &digest).len() as u64;
    RandomImage {
        digest,
        config,
        layers,
        manifest_size,
        config_size,
    }
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// The raw manifest bytes `addr` serves for `name` at `reference` (tag or digest).
pub fn registry_manifest_bytes(addr: &str, name: &str, reference: &str) -> Vec<u8> {
    match http_request(
        addr,
        "GET",
        &format!("/v2/{name}/manifests/{reference}"),
        &[("Accept", MANIFEST_ACCEPT)],
    ) {
        Some((200, body)) => body,
        other => panic!(
            "GET manifest {name}:{reference} from {addr}: {:?}",
            other.map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned()))
        ),
    }
}

/// The manifest `addr` serves for `name` at `reference`, parsed.
pub fn registry_manifest(addr: &str, name: &str, reference: &str) -> serde_json::Value {
    let body = registry_manifest_bytes(addr, name, reference);
    serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "manifest {name}:{reference} from {addr} is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    })
}

// ---------------------------------------------------------------------------------------------
// CRI clients and configs
// ---------------------------------------------------------------------------------------------

/// A tonic channel to a CRI server on a unix socket; Err on connection failure.
pub async fn try_cri_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    Endpoint::from_static("http://[::1]:50051")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// A tonic channel to a CRI server on a unix socket.
pub async fn cri_channel(socket: &Path) -> Channel {
    try_cri_channel(socket)
        .await
        .unwrap_or_else(|e| panic!("connect to CRI socket {}: {e:?}", socket.display()))
}

/// CRI RuntimeService client on a unix socket.
pub async fn runtime_client(socket: &Path) -> RuntimeServiceClient<Channel> {
    RuntimeServiceClient::new(cri_channel(socket).await)
}

/// CRI ImageService client on a unix socket.
pub async fn image_client(socket: &Path) -> ImageServiceClient<Channel> {
    ImageServiceClient::new(cri_channel(socket).await)
}

/// One CRI `Version` call; Ok(runtime_name runtime_version).
pub async fn cri_version(socket: &Path) -> Result<String, String> {
    let channel = try_cri_channel(socket)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let resp = RuntimeServiceClient::new(channel)
        .version(VersionRequest::default())
        .await
        .map_err(|e| format!("Version: {e}"))?
        .into_inner();
    Ok(format!("{} {}", resp.runtime_name, resp.runtime_version))
}

/// Pod sandbox config with host networking (no CNI needed), a unique uid and `log_dir` as log
/// directory (created).
pub fn pod_config(name: &str, namespace: &str, log_dir: &Path) -> PodSandboxConfig {
    fs::create_dir_all(log_dir)
        .unwrap_or_else(|e| panic!("create pod log dir {}: {e}", log_dir.display()));
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}-{}", unique_suffix()),
            namespace: namespace.to_string(),
            attempt: 0,
        }),
        // No hostname: with the host's network (and UTS) namespace it must stay empty.
        log_directory: log_dir.to_string_lossy().into_owned(),
        labels: HashMap::from([("imagestream.test/pod".to_string(), name.to_string())]),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(pod_namespace_options()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Container config for `image` named `name`, log_path "name.log", for a pod of
/// [`pod_config`]. `command`/`args` are empty (image entrypoint); set them on the result, e.g.
/// `cfg.command = vec!["/bin/sleep".into(), "infinity".into()]`.
///
/// As the kubelet does, the image spec carries the reference as the user wrote it in
/// `user_specified_image` (CRI-O checks its signature policy against that name and refuses a
/// container without it), and the container's namespace options repeat the pod's (a proto3 zero
/// would mean a pod-level PID namespace).
pub fn container_config(name: &str, image: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_string(),
            user_specified_image: image.to_string(),
            ..Default::default()
        }),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(pod_namespace_options()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The namespaces of [`pod_config`]'s pods and their containers: the node's network, a PID
/// namespace per container (the kubelet's default; a pod-level one fails on CRI-O here, see
/// the `runtime` module), the pod's IPC namespace.
pub fn pod_namespace_options() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// [`container_config`] with an explicit command.
pub fn container_config_with_command(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
    let mut cfg = container_config(name, image);
    cfg.command = command.iter().map(|s| s.to_string()).collect();
    cfg
}

/// ImageSpec for a reference.
pub fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

/// RunPodSandbox for `pod` (default runtime handler); returns the sandbox id.
pub async fn run_pod(rt: &mut RuntimeServiceClient<Channel>, pod: &PodSandboxConfig) -> String {
    rt.run_pod_sandbox(k8s_cri::v1::RunPodSandboxRequest {
        config: Some(pod.clone()),
        runtime_handler: String::new(),
    })
    .await
    .expect("RunPodSandbox")
    .into_inner()
    .pod_sandbox_id
}

/// Pulls `image` through `socket` (a CRI socket), runs a pod named `pod_name` and starts a
/// container in it that sleeps forever; returns the runtime client and the container id.
pub async fn start_sleeping_container(
    socket: &Path,
    image: &str,
    pod_name: &str,
    log_dir: &Path,
) -> (RuntimeServiceClient<Channel>, String) {
    let mut rt = runtime_client(socket).await;
    let image_ref = image_client(socket)
        .await
        .pull_image(k8s_cri::v1::PullImageRequest {
            image: Some(image_spec(image)),
            ..Default::default()
        })
        .await
        .expect("PullImage")
        .into_inner()
        .image_ref;
    let pod = pod_config(pod_name, "default", log_dir);
    let pod_id = run_pod(&mut rt, &pod).await;
    let ctr = rt
        .create_container(k8s_cri::v1::CreateContainerRequest {
            pod_sandbox_id: pod_id,
            config: Some(container_config_with_command(
                "app",
                &image_ref,
                &["/bin/sleep", "infinity"],
            )),
            sandbox_config: Some(pod),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    rt.start_container(k8s_cri::v1::StartContainerRequest {
        container_id: ctr.clone(),
    })
    .await
    .expect("StartContainer");
    (rt, ctr)
}

/// StartContainer of `container_id`, then what its `/version` says (the test images' version,
/// see [`push_image`]), read with ExecSync.
pub async fn start_and_read_version(
    rt: &mut RuntimeServiceClient<Channel>,
    container_id: &str,
) -> String {
    rt.start_container(k8s_cri::v1::StartContainerRequest {
        container_id: container_id.to_string(),
    })
    .await
    .expect("StartContainer");
    let out = rt
        .exec_sync(k8s_cri::v1::ExecSyncRequest {
            container_id: container_id.to_string(),
            cmd: vec!["cat".into(), "/version".into()],
            timeout: 10,
        })
        .await
        .expect("ExecSync of cat /version")
        .into_inner();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// StopContainer (timeout 0) of its containers, StopPodSandbox, then RemovePodSandbox.
pub async fn remove_pod(rt: &mut RuntimeServiceClient<Channel>, pod_id: &str) {
    // The test images' PID 1 (`sleep`) ignores SIGTERM: stop the containers at once, or CRI-O's
    // StopPodSandbox waits its 30 s stop timeout for each.
    let containers = rt
        .list_containers(k8s_cri::v1::ListContainersRequest {
            filter: Some(k8s_cri::v1::ContainerFilter {
                pod_sandbox_id: pod_id.to_string(),
                ..Default::default()
            }),
        })
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    for c in containers {
        rt.stop_container(k8s_cri::v1::StopContainerRequest {
            container_id: c.id,
            timeout: 0,
        })
        .await
        .expect("StopContainer");
    }
    rt.stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest {
        pod_sandbox_id: pod_id.to_string(),
    })
    .await
    .expect("StopPodSandbox");
    rt.remove_pod_sandbox(k8s_cri::v1::RemovePodSandboxRequest {
        pod_sandbox_id: pod_id.to_string(),
    })
    .await
    .expect("RemovePodSandbox");
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn process_cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Count fields by position after the command name (which ends with ')'); some are
    // negative (tpgid without a terminal). State is field 0, utime 11, stime 12.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Clock ticks are 1/100 s on Linux.
    Duration::from_millis((field(11) + field(12)) * 10)
}

/// `umoci init` of an OCI layout at `layout` and `umoci new` of the empty image `image`
/// (`<layout>:<tag>`).
fn umoci_new_image(layout: &Path, image: &str) {
    run(
        Command::new("umoci").args(["init", "--layout"]).arg(layout),
        "umoci init",
    );
    run(
        Command::new("umoci").args(["new", "--image"]).arg(image),
        "umoci new",
    );
}

/// Pushes the OCI image `oci_image` (`<layout>:<tag>`) to `dest` (`HOST:PORT/name:tag`) over
/// plain HTTP with skopeo; returns the manifest digest skopeo reports.
fn skopeo_push(work: &Path, oci_image: &str, dest: &str) -> String {
    let digest_file = work.join("digest");
    run(
        Command::new("skopeo")
            .args([
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                "--digestfile",
            ])
            .arg(&digest_file)
            .arg(format!("oci:{oci_image}"))
            .arg(format!("docker://{dest}")),
        "skopeo copy",
    );
    fs::read_to_string(&digest_file)
        .expect("read skopeo digest file")
        .trim()
        .to_string()
}
