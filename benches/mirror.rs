//! Benchmark: the node-local layer cache served as a registry mirror (`serve --mirror-listen`),
//! side by side with the distribution registry (`docker-registry` 2.8) on the same image, in one
//! run on the same machine (real containerd, real registries, the release `imagestream` binary):
//!
//! 1. Warm CRI `PullImage` (containerd's socket) through the mirror, the blobs already in the
//!    cache, against a pull straight from a docker-registry holding the image. Before every pull
//!    the image is removed (CRI `RemoveImage`) and any of its blobs still in containerd's content
//!    store are deleted (none were with containerd 1.6: its RemoveImage collects them), so that
//!    every pull downloads the whole image, and `sync` runs so that no pull pays for the previous
//!    one's write-back; the bytes each server sent are counted to prove it. Median of N pulls per series, series alternating. Target:
//!    mirror / direct <= 1.0.
//! 2. The same through a docker-registry configured as a pull-through cache (`proxy.remoteurl`),
//!    warm.
//! 3. Blob GET throughput (hyper client, bodies discarded) from the mirror, from docker-registry
//!    and from its pull-through cache, one blob at a time and all layers at once; server CPU per
//!    GiB; the daemon's resident memory while serving (VmRSS sampled every 10 ms, VmHWM).
//! 4. 20 concurrent "nodes" (HTTP clients doing what containerd does: resolve the tag, fetch
//!    manifest, config and layers, 3 layers at a time, verifying every digest) pulling one image
//!    the mirror has never seen: bytes sent by the origin (its access log) divided by the image
//!    size. Target 1.0. The same against the docker-registry pull-through cache for comparison.
//!
//! Run: `cargo bench --bench mirror` (root; the Debian packages of the test harness and `ctr`;
//! 65-90 s on 2 vCPUs with the defaults, after the build). Results: `docs/benchmarks.md`.
//! Environment:
//! - `IMAGESTREAM_BENCH_LAYER_MIB` (default 64): size of each random layer in MiB,
//! - `IMAGESTREAM_BENCH_LAYERS` (default 4): layers per image,
//! - `IMAGESTREAM_BENCH_PULLS` (default 5): measured CRI pulls per series,
//! - `IMAGESTREAM_BENCH_GET_ROUNDS` (default 3): rounds of blob GETs per source and mode,
//! - `IMAGESTREAM_BENCH_CLIENTS` (default 20): concurrent clients in part 4.
//!
//! Timings are printed, never asserted.

#[path = "../tests/common/mod.rs"]
mod common;

use bytes::Bytes;
use common::daemon::Daemon;
use common::mirror::{cri_pull_image, cri_remove_image, metric_value, store_blobs};
use common::*;
use futures_util::StreamExt as _;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;
const NAME: &str = "bench/big";
const COLD_NAME: &str = "bench/cold";
const TAG: &str = "v1";
/// Layers a client fetches at once (containerd's default `max_concurrent_downloads`).
const LAYERS_AT_ONCE: usize = 3;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// A second and a third docker-registry: the harness's `Registry` always has its own storage and
// no proxy section.
// ---------------------------------------------------------------------------------------------

/// A `docker-registry` with a caller-chosen storage dir and extra config (e.g. `proxy:`).
struct AuxRegistry {
    addr: String,
    log: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl AuxRegistry {
    /// Starts a registry on a free port over `storage` (None: its own empty dir) with `extra`
    /// YAML appended to the config; waits until `GET /v2/` answers 200.
    fn start(storage: Option<&Path>, extra: &str) -> AuxRegistry {
        let dir = tempfile::Builder::new()
            .prefix("isbreg-")
            .tempdir()
            .expect("temp dir for a bench registry");
        let data = storage
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("data"));
        fs::create_dir_all(&data).expect("registry storage dir");
        let log = dir.path().join("registry.log");
        let config = dir.path().join("config.yml");
        for _attempt in 0..5 {
            let addr = format!("127.0.0.1:{}", free_port());
            let yml = format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {data}\n\
                 \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: {addr}\n  secret: imagestream-bench-secret\n{extra}",
                data = data.display()
            );
            fs::write(&config, yml).expect("write registry config");
            let out = fs::File::options()
                .create(true)
                .append(true)
                .open(&log)
                .expect("registry log");
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("clone log"))
                .stderr(out)
                .spawn()
                .expect("spawn docker-registry");
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if http_get_status(&addr, "/v2/") == Some(200) {
                    return AuxRegistry {
                        addr,
                        log,
                        child: Some(child),
                        _dir: dir,
                    };
                }
                if Instant::now() >= deadline || matches!(child.try_wait(), Ok(Some(_))) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!(
            "bench docker-registry did not come up:\n{}",
            file_tail(&log, 4000)
        );
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    fn access_log(&self) -> Vec<AccessLogEntry> {
        settled_access_log(&self.log)
    }
}

impl Drop for AuxRegistry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The access log of a registry writing to `log`, read once it has stopped growing for 150 ms
/// (a line is written just after its response body).
fn settled_access_log(log: &Path) -> Vec<AccessLogEntry> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut text = fs::read_to_string(log).unwrap_or_default();
    loop {
        std::thread::sleep(Duration::from_millis(150));
        let again = fs::read_to_string(log).unwrap_or_default();
        let settled = again.len() == text.len();
        text = again;
        if settled || Instant::now() >= deadline {
            break;
        }
    }
    text.lines().filter_map(AccessLogEntry::parse).collect()
}

/// Body bytes of successful GETs (manifests and blobs) in `entries`.
fn get_bytes(entries: &[AccessLogEntry]) -> u64 {
    entries
        .iter()
        .filter(|e| e.method == "GET" && (e.status == 200 || e.status == 206))
        .map(|e| e.bytes)
        .sum()
}

/// Bytes a registry sent with successful GETs since `before` entries of its log.
struct LogCounter<'a> {
    read: Box<dyn Fn() -> Vec<AccessLogEntry> + 'a>,
    seen: usize,
}

impl<'a> LogCounter<'a> {
    fn new(read: impl Fn() -> Vec<AccessLogEntry> + 'a) -> Self {
        let seen = read().len();
        LogCounter {
            read: Box::new(read),
            seen,
        }
    }

    /// GET bytes (and the entries) since the last call.
    fn take(&mut self) -> (u64, Vec<AccessLogEntry>) {
        let all = (self.read)();
        let new = all[self.seen.min(all.len())..].to_vec();
        self.seen = all.len();
        (get_bytes(&new), new)
    }
}

// ---------------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------------

/// A numeric field of /proc/<pid>/status (`Threads`, or the number of kB of `VmRSS`).
fn proc_status_field(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
}

/// A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    proc_status_field(pid, field).map(|kb| kb * 1024)
}

/// Samples a process's VmRSS and thread count every 10 ms in a thread;
/// [`RssSampler::take_peak`] returns the highest RSS since the previous call.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    threads: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let threads = Arc::new(AtomicU64::new(0));
        let (s, p, t) = (stop.clone(), peak.clone(), threads.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(rss) = proc_status_bytes(pid, "VmRSS") {
                    p.fetch_max(rss, Ordering::Relaxed);
                }
                if let Some(n) = proc_status_field(pid, "Threads") {
                    t.fetch_max(n, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssSampler {
            stop,
            peak,
            threads,
            thread: Some(thread),
        }
    }

    fn take_peak(&self) -> u64 {
        self.peak.swap(0, Ordering::Relaxed)
    }

    /// The most threads the process had at once so far.
    fn max_threads(&self) -> u64 {
        self.threads.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------------------------

fn ctr(ctd: &RuntimeBed, args: &[&str]) -> String {
    let out = ctd
        .ctr()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ctr");
    assert!(
        out.status.success(),
        "ctr {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the image (CRI RemoveImage by id: every reference to it goes, and containerd
/// collects the unreferenced content) and deletes any of `blobs` still in containerd's content
/// store; then syncs the file systems. Returns how many blobs had to be deleted by hand.
async fn purge(ctd: &RuntimeBed, image_id: &str, blobs: &[String]) -> usize {
    if let Err(e) = cri_remove_image(&ctd.socket, image_id).await {
        assert_eq!(
            e.code(),
            tonic::Code::NotFound,
            "RemoveImage {image_id}: {e}"
        );
    }
    let listed = ctr(ctd, &["content", "ls", "--quiet"]);
    let left: Vec<&str> = listed
        .lines()
        .map(str::trim)
        .filter(|d| blobs.iter().any(|b| b == d))
        .collect();
    if !left.is_empty() {
        let mut args = vec!["content", "rm"];
        args.extend(left.iter().copied());
        ctr(ctd, &args);
    }
    // Write back what the previous pull left dirty, so that no pull pays for another's I/O.
    let _ = Command::new("sync").status();
    let snapshots = ctr(ctd, &["snapshots", "--snapshotter", "native", "ls"]);
    let snapshots = snapshots
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count();
    assert_eq!(
        snapshots, 0,
        "snapshots left after removing the image: a pull would not unpack again"
    );
    left.len()
}

/// One CRI PullImage on containerd's socket; the time it took.
async fn timed_pull(ctd: &RuntimeBed, image: &str, want_id: &str) -> Duration {
    let t = Instant::now();
    let id = cri_pull_image(&ctd.socket, image)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PullImage {image}: {e}\ncontainerd log tail:\n{}",
                file_tail(&ctd.log, 3000)
            )
        });
    let took = t.elapsed();
    assert_eq!(id, want_id, "PullImage {image} returned another image id");
    took
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Status, body bytes and (if asked for) the body's sha256 of one response.
type Fetched = (u16, u64, Option<String>);

/// GET (or HEAD) `url`; reads and discards (or hashes) the body.
async fn fetch(
    client: &HttpClient,
    method: &str,
    url: &str,
    hash: bool,
) -> Result<Fetched, String> {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header(http::header::ACCEPT, MANIFEST_ACCEPT)
        .body(Empty::new())
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("{method} {url}: {e:?}"))?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut n = 0u64;
    let mut h = hash.then(Sha256::new);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("{method} {url}: body after {n} bytes: {e:?}"))?;
        if let Ok(data) = frame.into_data() {
            n += data.len() as u64;
            if let Some(h) = h.as_mut() {
                h.update(&data);
            }
        }
    }
    Ok((
        status,
        n,
        h.map(|h| format!("sha256:{}", hex::encode(h.finalize()))),
    ))
}

/// GET a blob (or manifest) and check status, length and digest.
async fn fetch_verified(
    client: &HttpClient,
    url: &str,
    digest: &str,
    size: u64,
) -> Result<u64, String> {
    let (status, n, got) = fetch(client, "GET", url, true).await?;
    if status != 200 || n != size || got.as_deref() != Some(digest) {
        return Err(format!(
            "GET {url}: status {status}, {n} bytes (want {size}), sha256 {got:?} (want {digest})"
        ));
    }
    Ok(n)
}

/// Where a client fetches from: `http://HOST:PORT` plus the query (`?ns=ORIGIN` for the mirror).
#[derive(Clone)]
struct Source {
    label: &'static str,
    base: String,
    query: String,
}

impl Source {
    fn blob_url(&self, name: &str, digest: &str) -> String {
        format!("{}/v2/{name}/blobs/{digest}{}", self.base, self.query)
    }
    fn manifest_url(&self, name: &str, reference: &str) -> String {
        format!(
            "{}/v2/{name}/manifests/{reference}{}",
            self.base, self.query
        )
    }
}

/// What containerd does for one pull, over HTTP: resolve the tag (HEAD), GET the manifest by
/// digest, the config, then the layers, [`LAYERS_AT_ONCE`] at a time; every body checked.
async fn node_pull(
    client: HttpClient,
    src: Source,
    name: String,
    image: Arc<RandomImage>,
) -> Result<u64, String> {
    let (status, _, _) = fetch(&client, "HEAD", &src.manifest_url(&name, TAG), false).await?;
    if status != 200 {
        return Err(format!(
            "HEAD {}: status {status}",
            src.manifest_url(&name, TAG)
        ));
    }
    let mut total = fetch_verified(
        &client,
        &src.manifest_url(&name, &image.digest),
        &image.digest,
        image.manifest_size,
    )
    .await?;
    total += fetch_verified(
        &client,
        &src.blob_url(&name, &image.config),
        &image.config,
        image.config_size,
    )
    .await?;
    let layers = futures_util::stream::iter(image.layers.clone())
        .map(|(d, size)| {
            let (client, url) = (client.clone(), src.blob_url(&name, &d));
            async move { fetch_verified(&client, &url, &d, size).await }
        })
        .buffer_unordered(LAYERS_AT_ONCE)
        .collect::<Vec<_>>()
        .await;
    for r in layers {
        total += r?;
    }
    Ok(total)
}

/// Fetches every layer of `image` from `src`, one after another or all at once; returns the
/// throughput in MiB/s.
async fn blob_throughput(
    client: &HttpClient,
    src: &Source,
    image: &RandomImage,
    parallel: bool,
) -> f64 {
    let urls: Vec<String> = image
        .layers
        .iter()
        .map(|(d, _)| src.blob_url(NAME, d))
        .collect();
    let t = Instant::now();
    let results: Vec<Result<Fetched, String>> = if parallel {
        futures_util::future::join_all(urls.iter().map(|u| fetch(client, "GET", u, false))).await
    } else {
        let mut v = Vec::new();
        for u in &urls {
            v.push(fetch(client, "GET", u, false).await);
        }
        v
    };
    let elapsed = t.elapsed();
    let mut bytes = 0;
    for (r, (d, size)) in results.into_iter().zip(&image.layers) {
        match r {
            Ok((200, n, _)) if n == *size => bytes += n,
            other => panic!(
                "{}: GET blob {d}: {other:?} (want 200, {size} bytes)",
                src.label
            ),
        }
    }
    bytes as f64 / MIB / elapsed.as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

/// Text without ANSI escape sequences (the daemon's text log is coloured).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC '[' parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB
}

/// Per pull series: time per pull and bytes sent per pull by the server containerd talked to
/// and by the origin.
#[derive(Default)]
struct PullSeries {
    secs: Vec<f64>,
    /// CPU seconds of containerd and of the server it pulled from.
    ctd_cpu: Vec<f64>,
    server_cpu: Vec<f64>,
    served: Vec<u64>,
    origin: Vec<u64>,
    purged_by_hand: usize,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let layers = env_usize("IMAGESTREAM_BENCH_LAYERS", 4);
    let layer_mib = env_usize("IMAGESTREAM_BENCH_LAYER_MIB", 64);
    let pulls = env_usize("IMAGESTREAM_BENCH_PULLS", 5);
    let get_rounds = env_usize("IMAGESTREAM_BENCH_GET_ROUNDS", 3);
    let clients = env_usize("IMAGESTREAM_BENCH_CLIENTS", 20);
    // Log as in production (info), not as the tests do (debug).
    std::env::set_var("IMAGESTREAM_TEST_LOG", "info");
    require_binary("ctr", "containerd");
    let started = Instant::now();
    let sizes = vec![layer_mib << 20; layers];

    // --- Setup -------------------------------------------------------------------------------
    // origin: the registry the images live in; the mirror and the pull-through cache fill from
    // it. direct: a second docker-registry over the origin's storage, the host containerd
    // pulls from without a mirror. proxy: docker-registry as a pull-through cache of origin.
    let origin = Registry::start();
    eprintln!("setup: pushing {layers} x {layer_mib} MiB random layers twice ...");
    let image = Arc::new(push_random_image_to(
        &origin.addr,
        &format!("{NAME}:{TAG}"),
        &sizes,
    ));
    let cold = Arc::new(push_random_image_to(
        &origin.addr,
        &format!("{COLD_NAME}:{TAG}"),
        &sizes,
    ));
    let direct = AuxRegistry::start(Some(&origin.dir.join("data")), "");
    let proxy = AuxRegistry::start(
        None,
        &format!("proxy:\n  remoteurl: http://{}\n", origin.addr),
    );
    let ctd = RuntimeBed::start(&origin);
    let daemon = Daemon::start(&ctd.endpoint(), &[&origin.addr], &[]);
    daemon.route_through_mirror(&ctd, &origin.addr);
    let pid = daemon.pid().expect("daemon pid");
    let ctd_pid = processes_mentioning(&ctd.dir)
        .into_iter()
        .find(|(_, cmd)| cmd.starts_with("containerd --config"))
        .map(|(p, _)| p)
        .expect("containerd pid");
    let rss = RssSampler::start(pid);
    let idle_rss = proc_status_bytes(pid, "VmRSS").unwrap_or(0);
    let size = image.total_size();
    let blobs = image.blobs();
    eprintln!(
        "setup done in {:.0} s; image {} ({:.1} MiB)",
        started.elapsed().as_secs_f64(),
        image.digest,
        mib(size)
    );

    let via_mirror = origin.image_ref(&format!("{NAME}:{TAG}"));
    let via_direct = format!("{}/{NAME}:{TAG}", direct.addr);
    let via_proxy = format!("{}/{NAME}:{TAG}", proxy.addr);
    let served_by_mirror = || {
        let m = daemon.metrics();
        metric_value(&m, "imagestream_cache_bytes_served_total").unwrap_or(0.0) as u64
    };

    // --- Cold pulls: fill the mirror's cache and the pull-through cache ------------------------
    let mut origin_log = LogCounter::new(|| origin.access_log());
    let mut direct_log = LogCounter::new(|| direct.access_log());
    let mut proxy_log = LogCounter::new(|| proxy.access_log());
    purge(&ctd, &image.config, &blobs).await;
    let cold_mirror = timed_pull(&ctd, &via_mirror, &image.config).await;
    let (cold_mirror_origin, _) = origin_log.take();
    let cached = store_blobs(&daemon.state_dir).unwrap_or_else(|e| panic!("cache store: {e}"));
    let missing: Vec<&String> = blobs.iter().filter(|b| !cached.contains_key(*b)).collect();
    assert!(
        missing.is_empty(),
        "after a pull through the mirror these blobs are not in its cache: {missing:?}\n{}",
        daemon.log_tail()
    );
    purge(&ctd, &image.config, &blobs).await;
    let cold_proxy = timed_pull(&ctd, &via_proxy, &image.config).await;
    let (cold_proxy_origin, _) = origin_log.take();
    proxy_log.take();
    purge(&ctd, &image.config, &blobs).await;
    let warmup_direct = timed_pull(&ctd, &via_direct, &image.config).await;
    direct_log.take();
    let cold_rss = rss.take_peak();
    let fill_fetches = daemon.metric("imagestream_upstream_fetches_total");

    // --- 1 and 2: warm pulls, alternating ------------------------------------------------------
    eprintln!("warm pulls: {pulls} per series ...");
    let mut series: BTreeMap<&str, PullSeries> = BTreeMap::new();
    let modes = ["direct", "mirror", "proxy"];
    for round in 0..pulls {
        for k in 0..modes.len() {
            let mode = modes[(round + k) % modes.len()];
            let s = series.entry(mode).or_default();
            s.purged_by_hand += purge(&ctd, &image.config, &blobs).await;
            let before_mirror = served_by_mirror();
            origin_log.take();
            direct_log.take();
            proxy_log.take();
            let reference = match mode {
                "direct" => &via_direct,
                "mirror" => &via_mirror,
                _ => &via_proxy,
            };
            let server_pid = match mode {
                "direct" => direct.pid(),
                "mirror" => pid,
                _ => proxy.pid(),
            };
            let (c0, s0) = (process_cpu_time(ctd_pid), process_cpu_time(server_pid));
            let took = timed_pull(&ctd, reference, &image.config).await;
            s.secs.push(took.as_secs_f64());
            s.ctd_cpu
                .push(process_cpu_time(ctd_pid).saturating_sub(c0).as_secs_f64());
            s.server_cpu.push(
                process_cpu_time(server_pid)
                    .saturating_sub(s0)
                    .as_secs_f64(),
            );
            let served = match mode {
                "direct" => direct_log.take().0,
                "mirror" => served_by_mirror().saturating_sub(before_mirror),
                _ => proxy_log.take().0,
            };
            s.served.push(served);
            s.origin.push(origin_log.take().0);
        }
    }
    purge(&ctd, &image.config, &blobs).await;
    let pull_rss = rss.take_peak();

    // --- 3: blob GET throughput ----------------------------------------------------------------
    eprintln!("blob GETs ...");
    let client = http_client();
    let sources = [
        Source {
            label: "imagestream mirror",
            base: daemon.mirror_url(),
            query: format!("?ns={}", origin.addr),
        },
        Source {
            label: "docker-registry",
            base: format!("http://{}", direct.addr),
            query: String::new(),
        },
        Source {
            label: "docker-registry pull-through",
            base: format!("http://{}", proxy.addr),
            query: String::new(),
        },
    ];
    let pids = [pid, direct.pid(), proxy.pid()];
    // One verified pass per source (digest and length of every layer), untimed.
    for src in &sources {
        for (d, s) in &image.layers {
            fetch_verified(&client, &src.blob_url(NAME, d), d, *s)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", src.label));
        }
    }
    rss.take_peak();
    // [source][parallel] -> MiB/s per round; CPU seconds per source.
    let mut mbps = vec![[Vec::new(), Vec::new()]; sources.len()];
    let mut cpu = vec![Duration::ZERO; sources.len()];
    let mut bytes_moved = vec![0u64; sources.len()];
    let layer_bytes: u64 = image.layers.iter().map(|(_, s)| s).sum();
    let mut get_rss = 0;
    for round in 0..get_rounds {
        for parallel in [false, true] {
            for k in 0..sources.len() {
                let i = (round + k) % sources.len();
                let c0 = process_cpu_time(pids[i]);
                let r = blob_throughput(&client, &sources[i], &image, parallel).await;
                cpu[i] += process_cpu_time(pids[i]).saturating_sub(c0);
                bytes_moved[i] += layer_bytes;
                mbps[i][usize::from(parallel)].push(r);
                if i == 0 {
                    get_rss = get_rss.max(rss.take_peak());
                } else {
                    rss.take_peak();
                }
            }
        }
    }

    // --- 4: concurrent cold pulls --------------------------------------------------------------
    eprintln!("{clients} concurrent clients on an uncached image ...");
    let fetches0 = daemon.metric("imagestream_upstream_fetches_total");
    origin_log.take();
    rss.take_peak();
    let storm = |src: Source| {
        let cold = cold.clone();
        async move {
            let client = http_client();
            let t = Instant::now();
            let tasks: Vec<_> = (0..clients)
                .map(|_| {
                    tokio::spawn(node_pull(
                        client.clone(),
                        src.clone(),
                        COLD_NAME.to_string(),
                        cold.clone(),
                    ))
                })
                .collect();
            let mut errors = Vec::new();
            let mut received = 0;
            for t in tasks {
                match t.await {
                    Ok(Ok(n)) => received += n,
                    Ok(Err(e)) => errors.push(e),
                    Err(e) => errors.push(format!("task: {e}")),
                }
            }
            (t.elapsed(), received, errors)
        }
    };
    let (storm_mirror_t, storm_mirror_rx, storm_mirror_err) = storm(sources[0].clone()).await;
    let (storm_mirror_origin, storm_mirror_entries) = origin_log.take();
    let storm_rss = rss.take_peak();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_storm_rss = proc_status_bytes(pid, "VmRSS").unwrap_or(0);
    let storm_fetches = daemon.metric("imagestream_upstream_fetches_total") - fetches0;
    let (storm_proxy_t, storm_proxy_rx, storm_proxy_err) = storm(sources[2].clone()).await;
    let (storm_proxy_origin, storm_proxy_entries) = origin_log.take();
    let blob_gets = |entries: &[AccessLogEntry]| {
        let mut per: HashMap<String, usize> = HashMap::new();
        for e in entries {
            if let Some(d) = e.successful_blob_get() {
                *per.entry(d.to_string()).or_default() += 1;
            }
        }
        cold.blobs()
            .iter()
            .skip(1)
            .map(|d| per.get(d).copied().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    let hwm = proc_status_bytes(pid, "VmHWM").unwrap_or(0);
    let max_threads = rss.max_threads();
    drop(rss);

    // --- Report --------------------------------------------------------------------------------
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "imagestream registry mirror vs docker-registry: image of {layers} x {layer_mib} MiB random layers \
         ({:.1} MiB with manifest and config), {cpus} CPUs, total run {:.0} s",
        mib(size),
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("1+2. CRI PullImage via containerd 1.6 (native snapshotter), image and its content removed before every pull");
    println!(
        "  cold, first pull through the mirror (fills the cache)   {:>7.2} s   origin sent {:.2} x image",
        cold_mirror.as_secs_f64(),
        cold_mirror_origin as f64 / size as f64
    );
    println!(
        "  cold, first pull through docker-registry pull-through    {:>7.2} s   origin sent {:.2} x image",
        cold_proxy.as_secs_f64(),
        cold_proxy_origin as f64 / size as f64
    );
    println!(
        "  first (page-cache warm-up) pull direct from docker-registry {:>4.2} s",
        warmup_direct.as_secs_f64()
    );
    println!(
        "  warm series ({pulls} pulls each, alternating)   median     min     max   served/pull*   origin/pull   \
         CPU/pull: containerd  server   blobs purged by ctr"
    );
    let labels = [
        ("direct", "direct from docker-registry"),
        ("mirror", "through imagestream mirror"),
        ("proxy", "through docker-registry pull-through"),
    ];
    let mut med = HashMap::new();
    for (key, label) in labels {
        let s = &series[key];
        let m = median(&s.secs);
        med.insert(key, m);
        let (lo, hi) = min_max(&s.secs);
        let served = median(&s.served.iter().map(|b| *b as f64).collect::<Vec<_>>());
        let orig = median(&s.origin.iter().map(|b| *b as f64).collect::<Vec<_>>());
        println!(
            "  {label:<40} {m:>7.2} s {lo:>6.2} s {hi:>6.2} s   {:>6.3} x image   {:>8.1} KiB   \
             {:>13.2} s {:>6.2} s   {}",
            served / size as f64,
            orig / 1024.0,
            median(&s.ctd_cpu),
            median(&s.server_cpu),
            s.purged_by_hand
        );
    }
    println!(
        "  * bytes sent by the server containerd pulled from (registry access log; for the mirror \
         imagestream_cache_bytes_served_total, blobs only) per pull, over the image size"
    );
    println!(
        "  ratio mirror / direct          {:>6.2}   (target <= 1.0)",
        med["mirror"] / med["direct"]
    );
    println!(
        "  ratio mirror / pull-through    {:>6.2}",
        med["mirror"] / med["proxy"]
    );
    println!(
        "  ratio pull-through / direct    {:>6.2}",
        med["proxy"] / med["direct"]
    );
    println!();
    println!(
        "3. Blob GET throughput ({} layers of {layer_mib} MiB, hyper client on loopback, bodies discarded, median of {get_rounds})",
        layers
    );
    println!(
        "  source                             one at a time    all {layers} at once    server CPU per GiB"
    );
    for (i, src) in sources.iter().enumerate() {
        println!(
            "  {:<34} {:>8.0} MiB/s  {:>10.0} MiB/s   {:>8.2} s",
            src.label,
            median(&mbps[i][0]),
            median(&mbps[i][1]),
            cpu[i].as_secs_f64() / (bytes_moved[i] as f64 / GIB)
        );
    }
    println!(
        "  ratio mirror / docker-registry   {:>8.2}        {:>10.2}",
        median(&mbps[0][0]) / median(&mbps[1][0]),
        median(&mbps[0][1]) / median(&mbps[1][1])
    );
    println!(
        "  imagestream VmRSS (sampled every 10 ms): idle {:.1} MiB; peak {:.1} MiB during the cold and warm-up pulls, \
         {:.1} MiB during warm pulls, {:.1} MiB during blob GETs, {:.1} MiB during part 4 (mirror), \
         {:.1} MiB 2 s after it; VmHWM at the end {:.1} MiB; at most {max_threads} threads",
        mib(idle_rss),
        mib(cold_rss),
        mib(pull_rss),
        mib(get_rss),
        mib(storm_rss),
        mib(after_storm_rss),
        mib(hwm)
    );
    println!();
    println!(
        "4. {clients} concurrent clients pulling one uncached image (HEAD tag, manifest, config, layers {LAYERS_AT_ONCE} at a time, digests verified)"
    );
    println!(
        "  through                          wall time   received      origin sent   origin/image (target 1.0)   origin GETs per blob   errors"
    );
    for (label, t, rx, orig, entries, errs) in [
        (
            "imagestream mirror",
            storm_mirror_t,
            storm_mirror_rx,
            storm_mirror_origin,
            &storm_mirror_entries,
            &storm_mirror_err,
        ),
        (
            "docker-registry pull-through",
            storm_proxy_t,
            storm_proxy_rx,
            storm_proxy_origin,
            &storm_proxy_entries,
            &storm_proxy_err,
        ),
    ] {
        println!(
            "  {label:<32} {:>7.2} s   {:>7.0} MiB   {:>8.1} MiB   {:>8.3}                    {:?}   {}",
            t.as_secs_f64(),
            mib(rx),
            mib(orig),
            orig as f64 / cold.total_size() as f64,
            blob_gets(entries),
            errs.len()
        );
    }
    println!(
        "  origin GETs per blob: config, then layers. imagestream_upstream_fetches_total went up by {storm_fetches} \
         ({clients} tag resolutions + {} blob fills expected; {fill_fetches} during the first cold CRI pull)",
        cold.blobs().len() - 1,
    );
    for (label, errs) in [
        ("imagestream mirror", &storm_mirror_err),
        ("docker-registry pull-through", &storm_proxy_err),
    ] {
        for e in errs.iter().take(5) {
            println!("  error ({label}): {e}");
        }
    }
    let log = strip_ansi(&daemon.log_text());
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    println!();
    println!(
        "imagestream log: {} WARN/ERROR lines{}",
        bad.len(),
        if bad.is_empty() { "" } else { ", first ones:" }
    );
    for l in bad.iter().take(5) {
        println!("  {l}");
    }
}
