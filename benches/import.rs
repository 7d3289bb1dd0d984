//! Benchmark: scheduled import at scale. One real docker-registry holds one small image; the
//! release `imagestream` binary (no container runtime, `prefetch = false`) gets 1,000 scheduled
//! tags (10 streams x 100 tags) that all follow that one registry tag with a 10 s interval, and
//! the bench watches what the daemon does to the registry and to the machine:
//!
//! - manifest requests (HEAD / GET) the registry receives per interval ("round"), counted twice:
//!   by a small counting HTTP proxy between the daemon and the registry (millisecond timestamps,
//!   concurrency, latency) and by the registry's own access log (the cross-check);
//! - how the checks are spread over a round (checks per 1 s bucket, min / max; the first and
//!   the last check of the round; the longest gap between two checks);
//! - the most requests in flight at the registry at once (from the proxy's start / end times);
//! - the daemon's CPU time (utime + stime from /proc/<pid>/stat): per round, per 1,000 checks,
//!   and idle before any tag exists; the bytes it writes to storage (/proc/<pid>/io); its
//!   VmRSS; the registry's CPU for comparison;
//! - setup cost: creating tags through the CLI (one process per call) and through the admin
//!   gRPC API (one connection), and one `ListStreams` of all the tags;
//! - at the end, every tag's import condition (no failure, last check set) and generations
//!   (none added: the source never moved), and WARN / ERROR lines in the daemon's log.
//!
//! Then the signature policy (a fresh release daemon, the same registry and proxy; no
//! scheduled tags): what an `enforce` policy trusting one cosign key adds to pinning a digest.
//! Every image is signed, and the same pins are made on streams without a policy, the baseline
//! of the same run:
//!
//! - pin latency: `SetTag` through the admin gRPC API of `IMAGESTREAM_BENCH_SIGNED_PINS`
//!   distinct images (sources by tag) on a stream without a policy and on one with the enforce
//!   policy, alternating, one unmeasured pin of each first: p50 / p90 / max, the ratio, the
//!   daemon's CPU per pin (threads' schedstat) and the registry requests per pin (proxy);
//! - many tags: `IMAGESTREAM_BENCH_TAGS` tags on plain streams and as many on enforce streams
//!   (`IMAGESTREAM_BENCH_TAGS_PER_STREAM` each, 100 plain then 100 enforce and so on), all
//!   pointing at a few signed images: total and per-tag time, daemon CPU per 1,000 pins;
//! - checks that it measured what it says: every enforce pin recorded as verified, an unsigned
//!   image refused on an enforce stream, the `imagestream_signature_*` metrics.
//!
//! The images are signed in-process, in cosign's exact format (`cosign sign --key`, key-based,
//! no transparency log), because running the cosign CLI hundreds of times is slow: an
//! aws-lc-rs ECDSA P-256 key pair (what `cosign generate-key-pair` makes), the simple-signing
//! payload uploaded as a blob, a `{}` config blob, and an OCI manifest under the tag
//! `sha256-<hex>.sig` whose one layer is the payload with the base64 ASN.1 DER ECDSA-SHA256
//! signature of its raw bytes in the `dev.cosignproject.cosign/signature` annotation. The
//! images themselves are one pushed base image with a config label of their own each (distinct
//! digests, shared layers). If the cosign binary of `bash scripts/test-tools.sh cosign` is at
//! `/var/cache/imagestream-test/bin/cosign`, `cosign verify --key` (offline:
//! `--insecure-ignore-tlog=true`, `--allow-http-registry`) is run on one in-process-signed image
//! and the bench prints whether cosign accepts it, and that it rejects it under another key.
//!
//! Run: `cargo bench --bench import` (root; the Debian packages `docker-registry`, `skopeo`,
//! `umoci`, `busybox-static` of the test harness; about 1 minute after the build with the
//! defaults, 10 s of it the signature part). Results: `docs/benchmarks.md`. Environment:
//! - `IMAGESTREAM_BENCH_TAGS` (default 1000): scheduled tags, and the signature part's tags of
//!   each kind,
//! - `IMAGESTREAM_BENCH_TAGS_PER_STREAM` (default 100): tags per stream,
//! - `IMAGESTREAM_BENCH_INTERVAL_SECS` (default 10): the tags' interval (the daemon's
//!   `import_min_interval_secs` is set to 1),
//! - `IMAGESTREAM_BENCH_ROUNDS` (default 3): measured rounds of one interval each, after one
//!   unmeasured warm-up interval,
//! - `IMAGESTREAM_BENCH_CLI_TAGS` (default 20): how many of the tags are created with the CLI
//!   (the rest through the admin API),
//! - `IMAGESTREAM_BENCH_SIGNED_PINS` (default 50; 0 skips the signature part): distinct images
//!   pinned per stream for the pin latency,
//! - `IMAGESTREAM_BENCH_SIGNED_IMAGES` (default 4): signed images the many tags point at.
//!
//! Timings are printed, never asserted.

#[path = "../tests/common/mod.rs"]
mod common;

use bytes::Bytes;
use common::daemon::Daemon;
use common::*;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use imagestream::admin::pb;
use std::convert::Infallible;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;
const NAMESPACE: &str = "bench";
const IMAGE: &str = "bench/app";
const IMAGE_TAG: &str = "latest";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

fn env_or_zero(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------------

/// A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), in bytes; or `Threads`.
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let n = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if field.starts_with("Vm") {
        n * 1024
    } else {
        n
    }
}

/// The 1-minute load average (other jobs on the machine skew every figure).
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Bytes process `pid` caused to be written to storage (`write_bytes` of /proc/<pid>/io).
fn write_bytes(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB
}

// ---------------------------------------------------------------------------------------------
// A counting HTTP proxy in front of the registry
// ---------------------------------------------------------------------------------------------

/// One request that went through the proxy; times since the bench's start.
#[derive(Debug, Clone)]
struct Rec {
    start: Duration,
    /// Until the response head came back from the registry (manifest bodies are small).
    end: Duration,
    method: String,
    path: String,
    status: u16,
}

impl Rec {
    fn is_manifest(&self) -> bool {
        self.path.contains("/manifests/")
    }
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Forwards every request to the registry and records it: the access log of the registry has
/// 1 s timestamps of the end of each response only; this gives start and end to the
/// millisecond, so spread, latency and concurrency can be seen.
struct Proxy {
    addr: String,
    recs: Arc<Mutex<Vec<Rec>>>,
}

impl Proxy {
    async fn start(upstream: &str, t0: Instant) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the counting proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let recs = Arc::new(Mutex::new(Vec::new()));
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build_http();
        let (r, upstream) = (recs.clone(), upstream.to_string());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (client, recs, upstream) = (client.clone(), r.clone(), upstream.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (client, recs, upstream) =
                            (client.clone(), recs.clone(), upstream.clone());
                        async move {
                            Ok::<_, Infallible>(forward(&client, &recs, &upstream, t0, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Proxy { addr, recs }
    }

    fn records(&self) -> Vec<Rec> {
        self.recs.lock().expect("proxy records").clone()
    }
}

async fn forward(
    client: &Client<HttpConnector, Incoming>,
    recs: &Mutex<Vec<Rec>>,
    upstream: &str,
    t0: Instant,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = t0.elapsed();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    let (mut parts, body) = req.into_parts();
    parts.uri = format!("http://{upstream}{target}")
        .parse()
        .expect("upstream URI");
    let (status, resp) = match client.request(Request::from_parts(parts, body)).await {
        Ok(r) => (r.status().as_u16(), r.map(BodyExt::boxed)),
        Err(_) => {
            let body = Empty::<Bytes>::new()
                .map_err(|never: Infallible| match never {})
                .boxed();
            let mut r = Response::new(body);
            *r.status_mut() = http::StatusCode::BAD_GATEWAY;
            (502, r)
        }
    };
    recs.lock().expect("proxy records").push(Rec {
        start,
        end: t0.elapsed(),
        method,
        path,
        status,
    });
    resp
}

// ---------------------------------------------------------------------------------------------
// The registry's access log, read as it grows
// ---------------------------------------------------------------------------------------------

/// Complete lines of the registry's log parsed as access-log entries, from the start of the
/// file (the harness's `Registry::access_log` waits for the log to settle, which it never does
/// while 100 checks a second keep coming).
fn registry_log_entries(log: &Path) -> Vec<AccessLogEntry> {
    let text = fs::read_to_string(log).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete.lines().filter_map(AccessLogEntry::parse).collect()
}

// ---------------------------------------------------------------------------------------------
// Round statistics
// ---------------------------------------------------------------------------------------------

struct Round {
    from: Duration,
    to: Duration,
    daemon_cpu: Duration,
    registry_cpu: Duration,
    bench_cpu: Duration,
    /// Bytes the daemon wrote to storage.
    written: u64,
    /// Manifest requests in the registry's access log, by method.
    log_head: usize,
    log_get: usize,
    log_other: usize,
    max_rss: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The most records in flight at once among `recs`.
fn max_concurrency(recs: &[&Rec]) -> usize {
    let mut edges: Vec<(Duration, i32)> = recs
        .iter()
        .flat_map(|r| [(r.start, 1), (r.end, -1)])
        .collect();
    // Ends before starts at the same instant.
    edges.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        max = max.max(now);
    }
    max.max(0) as usize
}

/// The fraction of `[from, to)` during which at least one of `recs` was in flight.
fn busy_fraction(recs: &[&Rec], from: Duration, to: Duration) -> f64 {
    let mut spans: Vec<(Duration, Duration)> = recs
        .iter()
        .map(|r| (r.start.max(from), r.end.min(to)))
        .filter(|(a, b)| a < b)
        .collect();
    spans.sort();
    let (mut busy, mut until) = (Duration::ZERO, from);
    for (a, b) in spans {
        if b > until {
            busy += b - a.max(until);
            until = b;
        }
    }
    secs(busy) / secs(to - from).max(1e-9)
}

/// Requests per 1 s bucket of `[from, to)`: (min, max).
fn per_second(recs: &[&Rec], from: Duration, to: Duration) -> (usize, usize) {
    let secs = (to - from).as_secs().max(1) as usize;
    let mut buckets = vec![0usize; secs];
    for r in recs {
        let i = (r.start - from).as_secs() as usize;
        if i < secs {
            buckets[i] += 1;
        }
    }
    (
        buckets.iter().copied().min().unwrap_or(0),
        buckets.iter().copied().max().unwrap_or(0),
    )
}

/// Text without ANSI escape sequences (the daemon's text log is coloured).
/// Prints how many WARN / ERROR lines the daemon logged (`note` after the count) and the first
/// five, each cut at 400 characters.
fn print_warnings(daemon: &Daemon, note: &str) {
    let log = strip_ansi(&daemon.log_text());
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    println!(
        "  imagestream log: {} WARN/ERROR lines{note}{}",
        bad.len(),
        if bad.is_empty() { "" } else { ", first ones:" }
    );
    for l in bad.iter().take(5) {
        println!("    {}", l.chars().take(400).collect::<String>());
    }
}

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

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------

fn stream_name(i: usize) -> String {
    format!("app-{i:03}")
}

fn tag_name(i: usize) -> String {
    format!("t{i:04}")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let tags = env_usize("IMAGESTREAM_BENCH_TAGS", 1000);
    let per_stream = env_usize("IMAGESTREAM_BENCH_TAGS_PER_STREAM", 100).min(tags);
    let interval = env_usize("IMAGESTREAM_BENCH_INTERVAL_SECS", 10) as u64;
    let rounds = env_usize("IMAGESTREAM_BENCH_ROUNDS", 3);
    let cli_tags = env_or_zero("IMAGESTREAM_BENCH_CLI_TAGS", 20).min(tags);
    let signed_pins = env_or_zero("IMAGESTREAM_BENCH_SIGNED_PINS", 50);
    let signed_images = env_usize("IMAGESTREAM_BENCH_SIGNED_IMAGES", 4);
    let streams = tags.div_ceil(per_stream);
    // Log as in production (info), not as the tests do (debug).
    std::env::set_var("IMAGESTREAM_TEST_LOG", "info");
    let t0 = Instant::now();
    let load_before = loadavg();

    let registry = Registry::start();
    let digest = push_image(
        &registry,
        IMAGE,
        IMAGE_TAG,
        "v1",
        &["/bin/sleep", "infinity"],
    );
    let registry_log: PathBuf = registry.dir.join("registry.log");
    let registry_pid = processes_mentioning(&registry.dir)
        .into_iter()
        .find(|(_, cmd)| cmd.starts_with("docker-registry"))
        .map_or(0, |(p, _)| p);
    let proxy = Proxy::start(&registry.addr, t0).await;
    let source = format!("{}/{IMAGE}:{IMAGE_TAG}", proxy.addr);
    let daemon = tokio::task::block_in_place(|| {
        Daemon::start_with_config(
            "unix:///nonexistent.sock",
            &[&proxy.addr],
            &[],
            "prefetch = false\nimport_min_interval_secs = 1\n",
        )
    });
    let pid = daemon.pid().expect("daemon pid");
    let self_pid = std::process::id();

    // --- Idle, before any tag ------------------------------------------------------------------
    let idle_rss = proc_status(pid, "VmRSS");
    let c0 = process_cpu_time(pid);
    let idle_t = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_cpu =
        process_cpu_time(pid).saturating_sub(c0).as_secs_f64() / idle_t.elapsed().as_secs_f64();

    // --- Create the streams and the scheduled tags ---------------------------------------------
    eprintln!(
        "creating {streams} streams and {tags} scheduled tags ({cli_tags} through the CLI) ..."
    );
    let interval_arg = format!("{interval}s");
    let mut admin = imagestream::admin::client::connect(&daemon.admin_socket)
        .await
        .expect("admin client");
    for s in 0..streams {
        admin
            .create_stream(pb::CreateStreamRequest {
                namespace: NAMESPACE.into(),
                name: stream_name(s),
                lookup_local: false,
            })
            .await
            .expect("CreateStream");
    }
    let setup_from = t0.elapsed();
    let cpu_setup0 = process_cpu_time(pid);
    let t = Instant::now();
    for i in 0..cli_tags {
        let target = format!(
            "{NAMESPACE}/{}:{}",
            stream_name(i / per_stream),
            tag_name(i % per_stream)
        );
        tokio::task::block_in_place(|| {
            daemon.cli_ok(&[
                "tag",
                "set",
                &target,
                &source,
                "--scheduled",
                "--interval",
                &interval_arg,
            ])
        });
    }
    let cli_time = t.elapsed();
    let t = Instant::now();
    for i in cli_tags..tags {
        admin
            .set_tag(pb::SetTagRequest {
                namespace: NAMESPACE.into(),
                name: stream_name(i / per_stream),
                tag: tag_name(i % per_stream),
                source: source.clone(),
                scheduled: true,
                interval_secs: interval,
            })
            .await
            .unwrap_or_else(|e| panic!("SetTag {i}: {e}\n{}", daemon.log_tail()));
    }
    let grpc_time = t.elapsed();
    let setup_to = t0.elapsed();
    let setup_cpu = process_cpu_time(pid).saturating_sub(cpu_setup0);
    let setup_rss = proc_status(pid, "VmRSS");
    let setup_log_len = registry_log_entries(&registry_log).len();

    // --- Warm-up interval, then the measured rounds --------------------------------------------
    eprintln!("warm-up: one interval of {interval} s; then {rounds} rounds ...");
    tokio::time::sleep(Duration::from_secs(interval)).await;
    let daemon_log_before = fs::metadata(&daemon.log).map_or(0, |m| m.len());
    let mut log_seen = registry_log_entries(&registry_log).len();
    let mut out: Vec<Round> = Vec::new();
    let round_len = Duration::from_secs(interval);
    let mut from = t0.elapsed();
    for _ in 0..rounds {
        let (d0, r0, b0) = (
            process_cpu_time(pid),
            process_cpu_time(registry_pid),
            process_cpu_time(self_pid),
        );
        let w0 = write_bytes(pid);
        let to = from + round_len;
        let mut max_rss = 0;
        loop {
            max_rss = max_rss.max(proc_status(pid, "VmRSS"));
            let now = t0.elapsed();
            if now >= to {
                break;
            }
            tokio::time::sleep((to - now).min(Duration::from_secs(1))).await;
        }
        let (d1, r1, b1) = (
            process_cpu_time(pid),
            process_cpu_time(registry_pid),
            process_cpu_time(self_pid),
        );
        let entries = registry_log_entries(&registry_log);
        let new = &entries[log_seen.min(entries.len())..];
        log_seen = entries.len();
        let manifests = |m: &str| {
            new.iter()
                .filter(|e| e.method == m && e.path.contains("/manifests/"))
                .count()
        };
        out.push(Round {
            from,
            to,
            daemon_cpu: d1.saturating_sub(d0),
            registry_cpu: r1.saturating_sub(r0),
            bench_cpu: b1.saturating_sub(b0),
            written: write_bytes(pid).saturating_sub(w0),
            log_head: manifests("HEAD"),
            log_get: manifests("GET"),
            log_other: new
                .iter()
                .filter(|e| !e.path.contains("/manifests/"))
                .count(),
            max_rss,
        });
        from = to;
    }
    let measured_to = from;
    let daemon_log_growth = fs::metadata(&daemon.log)
        .map_or(0, |m| m.len())
        .saturating_sub(daemon_log_before);

    // --- The state of every tag ----------------------------------------------------------------
    let t = Instant::now();
    let listed = admin
        .list_streams(pb::ListStreamsRequest {
            namespace: NAMESPACE.into(),
        })
        .await
        .expect("ListStreams")
        .into_inner();
    let list_time = t.elapsed();
    let all_tags: Vec<&pb::Tag> = listed.streams.iter().flat_map(|s| &s.tags).collect();
    let checked = all_tags
        .iter()
        .filter(|t| {
            t.import_condition
                .as_ref()
                .is_some_and(|c| !c.last_check.is_empty())
        })
        .count();
    let failing: Vec<String> = all_tags
        .iter()
        .filter_map(|t| {
            let c = t.import_condition.as_ref()?;
            (!c.error.is_empty() || c.consecutive_failures > 0).then(|| {
                format!(
                    "{}: {} ({} failures)",
                    t.name, c.error, c.consecutive_failures
                )
            })
        })
        .collect();
    let moved = all_tags
        .iter()
        .filter(|t| {
            t.generations.len() != 1
                || t.generations.first().map(|g| g.digest.as_str()) != Some(&digest)
        })
        .count();
    let hwm = proc_status(pid, "VmHWM");
    let end_rss = proc_status(pid, "VmRSS");
    let threads = proc_status(pid, "Threads");

    // --- Report --------------------------------------------------------------------------------
    let recs = proxy.records();
    let setup_recs: Vec<&Rec> = recs
        .iter()
        .filter(|r| r.start >= setup_from && r.start < setup_to)
        .collect();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "imagestream scheduled import: {tags} scheduled tags ({streams} streams x up to {per_stream}), all following \
         one registry tag, interval {interval} s; import_concurrency 8, import_registry_concurrency 2 (defaults); \
         {cpus} CPUs; total run {:.0} s; load average {load_before} at the start, {} at the end",
        t0.elapsed().as_secs_f64(),
        loadavg()
    );
    println!();
    println!("setup");
    if cli_tags > 0 {
        println!(
            "  {cli_tags} tags with `imagestream tag set ... --scheduled` (one process each): {:.1} ms per tag",
            ms(cli_time) / cli_tags as f64
        );
    }
    if tags > cli_tags {
        println!(
            "  {} tags with admin gRPC SetTag (one connection, sequential): {:.1} ms per tag, {:.1} s in all",
            tags - cli_tags,
            ms(grpc_time) / (tags - cli_tags) as f64,
            secs(grpc_time)
        );
    }
    let setup_gets = setup_recs
        .iter()
        .filter(|r| r.method == "GET" && r.is_manifest())
        .count();
    let setup_heads = setup_recs
        .iter()
        .filter(|r| r.method == "HEAD" && r.is_manifest())
        .count();
    println!(
        "  registry requests while creating: {} ({setup_gets} manifest GETs, {setup_heads} manifest HEADs; \
         the HEADs are scheduled checks of tags already created); daemon CPU {:.2} s",
        setup_recs.len(),
        secs(setup_cpu)
    );
    println!(
        "  daemon idle before any tag: CPU {:.2} % of one CPU, VmRSS {:.1} MiB; after creating the tags VmRSS {:.1} MiB",
        idle_cpu * 100.0,
        mib(idle_rss),
        mib(setup_rss)
    );
    println!("  (registry access log: {setup_log_len} entries up to the end of setup)");
    println!();
    println!(
        "rounds: consecutive windows of one interval ({interval} s) after one unmeasured warm-up interval; \
         a check is one manifest HEAD, so about {tags} are expected per round"
    );
    println!(
        "  requests   round   manifest HEAD   manifest GET   other   non-2xx   | registry access log: manifest HEAD   GET   other"
    );
    let mut timing_rows = Vec::new();
    let mut tot_checks = 0usize;
    let mut tot_cpu = Duration::ZERO;
    let mut tot_reg = Duration::ZERO;
    let mut tot_bench = Duration::ZERO;
    let mut tot_written = 0u64;
    let mut all_lat: Vec<Duration> = Vec::new();
    for (k, r) in out.iter().enumerate() {
        let inr: Vec<&Rec> = recs
            .iter()
            .filter(|x| x.start >= r.from && x.start < r.to)
            .collect();
        let checks: Vec<&Rec> = inr
            .iter()
            .copied()
            .filter(|x| x.method == "HEAD" && x.is_manifest())
            .collect();
        let get = inr
            .iter()
            .filter(|x| x.method == "GET" && x.is_manifest())
            .count();
        let other = inr.len() - checks.len() - get;
        let bad = inr
            .iter()
            .filter(|x| !(200..300).contains(&x.status))
            .count();
        println!(
            "  {:>14} {:>15} {get:>14} {other:>7} {bad:>9}   | {:>36} {:>5} {:>7}",
            k + 1,
            checks.len(),
            r.log_head,
            r.log_get,
            r.log_other
        );
        let (lo, hi) = per_second(&checks, r.from, r.to);
        let mut starts: Vec<Duration> = checks.iter().map(|x| x.start).collect();
        starts.sort();
        let first = starts.first().copied().unwrap_or(r.from);
        let last = starts.last().copied().unwrap_or(r.from);
        let gap = starts
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        let mut lat: Vec<Duration> = inr.iter().map(|x| x.end - x.start).collect();
        lat.sort();
        all_lat.extend(&lat);
        let overlapping: Vec<&Rec> = recs
            .iter()
            .filter(|x| x.end >= r.from && x.start < r.to)
            .collect();
        let window = secs(r.to - r.from);
        timing_rows.push(format!(
            "  {:>12} {lo:>8} .. {hi:<5} {:>7.2} .. {:<5.2} s {:>11.0} ms {:>8} {:>9.1} % {:>8.2} / {:<5.2} ms {:>7.2} s {:>5.1} % {:>9.2} s {:>7.2} s {:>8.1} MiB",
            k + 1,
            secs(first - r.from),
            secs(last - r.from),
            ms(gap),
            max_concurrency(&overlapping),
            busy_fraction(&overlapping, r.from, r.to) * 100.0,
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
            secs(r.daemon_cpu),
            secs(r.daemon_cpu) / window * 100.0,
            secs(r.registry_cpu),
            secs(r.bench_cpu),
            mib(r.max_rss)
        ));
        tot_checks += checks.len();
        tot_cpu += r.daemon_cpu;
        tot_reg += r.registry_cpu;
        tot_bench += r.bench_cpu;
        tot_written += r.written;
    }
    println!(
        "  timing   round   checks/s min..max   first .. last check   longest gap   max in flight   registry busy   latency p50 / p99   daemon CPU         registry CPU   proxy CPU   max VmRSS"
    );
    for row in &timing_rows {
        println!("{row}");
    }
    let from_all = out.first().map_or(measured_to, |r| r.from);
    let mut kinds: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for x in recs
        .iter()
        .filter(|x| x.start >= from_all && x.start < measured_to)
    {
        let what = if x.is_manifest() {
            format!("{} /v2/<name>/manifests/<ref>", x.method)
        } else {
            format!("{} {}", x.method, x.path)
        };
        *kinds.entry(format!("{what} -> {}", x.status)).or_default() += 1;
    }
    println!("  all requests of the rounds by kind:");
    for (what, n) in &kinds {
        println!("    {n:>7}  {what}");
    }
    all_lat.sort();
    let measured = secs(measured_to - out.first().map_or(measured_to, |r| r.from));
    println!(
        "  all rounds: {tot_checks} checks in {measured:.0} s = {:.1} per second, {:.3} per tag per interval \
         (1.000 = each tag checked once per interval)",
        tot_checks as f64 / measured,
        tot_checks as f64 / tags as f64 / (measured / interval as f64)
    );
    let per_tag = tot_checks as f64 / tags as f64 / (measured / interval as f64);
    if per_tag < 0.9 {
        println!(
            "  FALLING BEHIND: at {:.1} checks per second each tag is checked about every {:.0} s, not every {interval} s",
            tot_checks as f64 / measured,
            interval as f64 / per_tag.max(1e-9)
        );
    } else if per_tag > 1.1 {
        println!("  MORE CHECKS THAN SCHEDULED: {per_tag:.2} per tag per interval");
    }
    let per_k = |d: Duration| secs(d) / tot_checks.max(1) as f64 * 1000.0;
    println!(
        "  CPU seconds per 1,000 checks: daemon {:.2} s, registry {:.2} s, counting proxy (the bench process) {:.2} s; \
         daemon {:.1} % of one CPU on average",
        per_k(tot_cpu),
        per_k(tot_reg),
        per_k(tot_bench),
        secs(tot_cpu) / measured * 100.0
    );
    println!(
        "  the daemon wrote {:.1} MiB to storage during the rounds (/proc/<pid>/io write_bytes): {:.1} KiB per check, {:.2} MiB/s",
        mib(tot_written),
        tot_written as f64 / 1024.0 / tot_checks.max(1) as f64,
        mib(tot_written) / measured
    );
    println!(
        "  registry latency through the proxy over all rounds: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(percentile(&all_lat, 0.5)),
        ms(percentile(&all_lat, 0.99)),
        ms(all_lat.last().copied().unwrap_or_default())
    );
    println!(
        "  daemon log grew by {daemon_log_growth} bytes during the rounds ({:.1} bytes per check, logging at info)",
        daemon_log_growth as f64 / tot_checks.max(1) as f64
    );
    println!();
    println!("end state");
    println!(
        "  ListStreams of {} tags: {:.1} ms; {checked} tags have been checked, {} failing, {moved} with a generation \
         other than the one they were created with",
        all_tags.len(),
        ms(list_time),
        failing.len()
    );
    for f in failing.iter().take(5) {
        println!("  failing: {f}");
    }
    println!(
        "  daemon VmRSS at the end {:.1} MiB, VmHWM {:.1} MiB, {threads} threads",
        mib(end_rss),
        mib(hwm)
    );
    print_warnings(&daemon, "");

    // --- Signature policy: a daemon of its own (the scheduled tags above stop with this one) --
    drop(admin);
    drop(daemon);
    if signed_pins > 0 {
        signature_policy(
            &registry,
            &proxy,
            t0,
            signed_pins,
            tags,
            per_stream,
            signed_images,
        )
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Signature policy
// ---------------------------------------------------------------------------------------------

/// The repository of the signature part's images (all in one, each under its own tag).
const SIGNED_REPO: &str = "bench/signed";
const SIG_NAMESPACE: &str = "bench-sig";
const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// `PUT /v2/<repo>/manifests/<reference>`; the manifest's digest.
fn put_manifest(addr: &str, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> String {
    let r = common::mirror::http_fetch(
        addr,
        "PUT",
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("Content-Type", media_type)],
        body,
        HTTP_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("PUT manifest {repo}:{reference}: {e}"));
    assert_eq!(
        r.status,
        201,
        "PUT manifest {repo}:{reference}: {}",
        r.body_text()
    );
    common::mirror::sha256_bytes(body)
}

/// Images made from one pushed base image: the same layers, a config with a label of its own
/// (so a distinct config and manifest digest each), in [`SIGNED_REPO`].
struct ImageMaker {
    addr: String,
    manifest: serde_json::Value,
    media_type: String,
    config: serde_json::Value,
}

impl ImageMaker {
    fn new(registry: &Registry) -> ImageMaker {
        push_image(
            registry,
            SIGNED_REPO,
            "base",
            "signed",
            &["/bin/sleep", "infinity"],
        );
        let manifest = registry_manifest(&registry.addr, SIGNED_REPO, "base");
        let media_type = manifest["mediaType"]
            .as_str()
            .unwrap_or(OCI_MANIFEST)
            .to_string();
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .expect("base manifest config digest");
        let r = common::mirror::http_fetch(
            &registry.addr,
            "GET",
            &format!("/v2/{SIGNED_REPO}/blobs/{config_digest}"),
            &[],
            &[],
            HTTP_TIMEOUT,
        )
        .expect("GET the base config");
        assert_eq!(r.status, 200, "GET the base config: {}", r.body_text());
        let config = serde_json::from_slice(&r.body).expect("base config is JSON");
        ImageMaker {
            addr: registry.addr.clone(),
            manifest,
            media_type,
            config,
        }
    }

    /// Pushes the image `SIGNED_REPO:tag`; its manifest digest.
    fn push(&self, tag: &str) -> String {
        let mut config = self.config.clone();
        config["config"]["Labels"]["imagestream.bench/image"] = serde_json::Value::from(tag);
        let config = serde_json::to_vec(&config).expect("config JSON");
        let config_digest = common::crash::push_blob(&self.addr, SIGNED_REPO, &config);
        let mut manifest = self.manifest.clone();
        manifest["config"]["digest"] = serde_json::Value::from(config_digest);
        manifest["config"]["size"] = serde_json::Value::from(config.len());
        let body = serde_json::to_vec(&manifest).expect("manifest JSON");
        put_manifest(&self.addr, SIGNED_REPO, tag, &self.media_type, &body)
    }
}

/// A cosign key pair made in-process: ECDSA P-256, what `cosign generate-key-pair` makes.
struct Signer {
    pair: aws_lc_rs::signature::EcdsaKeyPair,
    /// The public key as `cosign.pub` holds it (PEM `PUBLIC KEY`).
    public_pem: String,
    rng: aws_lc_rs::rand::SystemRandom,
}

impl Signer {
    fn generate() -> Signer {
        use aws_lc_rs::encoding::AsDer as _;
        use aws_lc_rs::signature::KeyPair as _;
        use base64::Engine as _;
        let pair = aws_lc_rs::signature::EcdsaKeyPair::generate(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        )
        .expect("generate a P-256 key pair");
        let der = pair.public_key().as_der().expect("public key DER");
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let mut public_pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            public_pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            public_pem.push('\n');
        }
        public_pem.push_str("-----END PUBLIC KEY-----\n");
        Signer {
            pair,
            public_pem,
            rng: aws_lc_rs::rand::SystemRandom::new(),
        }
    }

    /// Signs image `digest` of `addr/repo` as `cosign sign --key` does (its "simple signing"
    /// layout): the payload as a blob, a config blob, and an OCI manifest whose one layer is
    /// the payload with the base64 ASN.1 DER ECDSA-SHA256 signature of its raw bytes in the
    /// `dev.cosignproject.cosign/signature` annotation, under the tag `sha256-<hex>.sig`.
    fn sign(&self, addr: &str, repo: &str, digest: &str) {
        use base64::Engine as _;
        let payload = format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"{addr}/{repo}"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
        );
        let signature = self
            .pair
            .sign(&self.rng, payload.as_bytes())
            .expect("sign the payload");
        let signature = base64::engine::general_purpose::STANDARD.encode(signature.as_ref());
        let payload_digest = common::crash::push_blob(addr, repo, payload.as_bytes());
        let config = b"{}";
        let config_digest = common::crash::push_blob(addr, repo, config);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "size": config.len(),
                "digest": config_digest,
            },
            "layers": [{
                "mediaType": SIMPLE_SIGNING_MEDIA_TYPE,
                "size": payload.len(),
                "digest": payload_digest,
                "annotations": { SIGNATURE_ANNOTATION: signature },
            }],
        });
        let body = serde_json::to_vec(&manifest).expect("signature manifest JSON");
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        put_manifest(
            addr,
            repo,
            &format!("sha256-{hex}.sig"),
            OCI_MANIFEST,
            &body,
        );
    }
}

/// `cosign verify --key` of `image` (`host/repo@sha256:…`) with the public key `pem`, offline
/// (no transparency log; `HOME`, the TUF root and the key in a temp dir; TUF pointed at a
/// closed loopback port). `Some(Ok(()))`: accepted; `Some(Err(stderr))`: rejected; `None`: no
/// cosign binary.
fn cosign_verify(pem: &str, image: &str) -> Option<Result<(), String>> {
    let cosign = PathBuf::from("/var/cache/imagestream-test/bin/cosign");
    if !cosign.is_file() {
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("isbench-cosign-")
        .tempdir()
        .expect("temp dir for cosign");
    let key = dir.path().join("cosign.pub");
    fs::write(&key, pem).expect("write cosign.pub");
    let mut child = std::process::Command::new(&cosign)
        .arg("verify")
        .arg("--key")
        .arg(&key)
        .args([
            "--insecure-ignore-tlog=true",
            "--allow-http-registry",
            "--output",
            "json",
            image,
        ])
        .current_dir(dir.path())
        .env_clear()
        .env("HOME", dir.path())
        .env("COSIGN_PASSWORD", "")
        .env("TUF_ROOT", dir.path().join("tuf"))
        .env("TUF_MIRROR", "http://127.0.0.1:9")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run cosign verify");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait for cosign").is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("cosign output");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Some(if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {stderr}", out.status))
    })
}

/// The version `cosign version` prints (`GitVersion:`).
fn cosign_version() -> String {
    std::process::Command::new("/var/cache/imagestream-test/bin/cosign")
        .arg("version")
        .env_clear()
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("GitVersion:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_else(|| "?".into())
}

/// CPU time of process `pid` to the nanosecond: the sum of its threads' run time
/// (`/proc/<pid>/task/*/schedstat`; `utime + stime` count 10 ms ticks, too coarse for one
/// pin of a few milliseconds). A thread that exits takes its time with it, so this is for
/// short intervals; falls back to [`process_cpu_time`] without schedstat.
fn task_cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return process_cpu_time(pid);
    };
    let mut ns = 0u64;
    let mut any = false;
    for t in tasks.flatten() {
        if let Some(run) = fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        {
            ns += run;
            any = true;
        }
    }
    if any {
        Duration::from_nanos(ns)
    } else {
        process_cpu_time(pid)
    }
}

/// One `SetTag` as the bench measured it.
struct Pin {
    start: Duration,
    end: Duration,
    cpu: Duration,
}

impl Pin {
    fn latency(&self) -> Duration {
        self.end - self.start
    }
}

/// What a run of pins cost.
#[derive(Default)]
struct PinStats {
    pins: Vec<Pin>,
}

impl PinStats {
    fn latencies(&self) -> Vec<Duration> {
        let mut l: Vec<Duration> = self.pins.iter().map(Pin::latency).collect();
        l.sort();
        l
    }

    fn total(&self) -> Duration {
        self.pins.iter().map(Pin::latency).sum()
    }

    fn cpu(&self) -> Duration {
        self.pins.iter().map(|p| p.cpu).sum()
    }

    /// The proxy's records that started during one of these pins.
    fn requests<'a>(&self, recs: &'a [Rec]) -> Vec<&'a Rec> {
        recs.iter()
            .filter(|r| {
                self.pins
                    .iter()
                    .any(|p| r.start >= p.start && r.start < p.end)
            })
            .collect()
    }
}

/// Registry requests per pin, by kind: `manifest GET 1.00, blob GET 0.00, …`.
fn requests_per_pin(recs: &[&Rec], pins: usize) -> String {
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for r in recs {
        let what = if r.is_manifest() {
            if r.path.ends_with(".sig") {
                "manifest (.sig tag)"
            } else {
                "manifest"
            }
        } else if r.path.contains("/blobs/") {
            "blob"
        } else if r.path.contains("/referrers/") {
            "referrers"
        } else {
            "other"
        };
        *kinds.entry(format!("{} {what}", r.method)).or_default() += 1;
    }
    let per = |n: usize| n as f64 / pins.max(1) as f64;
    let busy: Duration = recs.iter().map(|r| r.end - r.start).sum();
    let parts: Vec<String> = kinds
        .iter()
        .map(|(k, n)| format!("{k} {:.2}", per(*n)))
        .collect();
    format!(
        "{:.2}, {:.2} ms at the registry ({})",
        per(recs.len()),
        ms(busy) / pins.max(1) as f64,
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    )
}

async fn set_tag_timed(
    admin: &mut imagestream::admin::pb::admin_client::AdminClient<tonic::transport::Channel>,
    daemon: &Daemon,
    t0: Instant,
    stream: &str,
    tag: &str,
    source: &str,
) -> (Pin, pb::Tag) {
    let c0 = task_cpu_time(daemon.pid().expect("daemon pid"));
    let start = t0.elapsed();
    let r = admin
        .set_tag(pb::SetTagRequest {
            namespace: SIG_NAMESPACE.into(),
            name: stream.into(),
            tag: tag.into(),
            source: source.into(),
            scheduled: false,
            interval_secs: 0,
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "SetTag {SIG_NAMESPACE}/{stream}:{tag} {source}: {e}\n{}",
                daemon.log_tail()
            )
        })
        .into_inner();
    let end = t0.elapsed();
    let cpu = task_cpu_time(daemon.pid().expect("daemon pid")).saturating_sub(c0);
    (Pin { start, end, cpu }, r)
}

/// Whether the tag's current generation records a verified signature.
fn verified(tag: &pb::Tag) -> bool {
    tag.generations
        .first()
        .and_then(|g| g.verification.as_ref())
        .is_some_and(|v| v.status == "verified")
}

/// The signature part: a fresh daemon (release, as above) against the same registry through the
/// counting proxy; one key pair; images signed in-process.
async fn signature_policy(
    registry: &Registry,
    proxy: &Proxy,
    t0: Instant,
    pins: usize,
    tags: usize,
    per_stream: usize,
    images: usize,
) {
    let run_t = Instant::now();
    let load_before = loadavg();
    eprintln!(
        "signature policy: pushing and signing {} images, then {pins} + {pins} timed pins and {tags} + {tags} tags ...",
        2 * (pins + 1) + images + 1
    );
    let signer = Signer::generate();
    let other = Signer::generate();
    let (pin_none, pin_enforce, shared, unsigned) = tokio::task::block_in_place(|| {
        let maker = ImageMaker::new(registry);
        let sign = |tag: String| {
            let d = maker.push(&tag);
            signer.sign(&registry.addr, SIGNED_REPO, &d);
            (tag, d)
        };
        // One image more of each kind: the first pin of each warms up (connection, stream).
        let pin_none: Vec<(String, String)> =
            (0..=pins).map(|i| sign(format!("n{i:04}"))).collect();
        let pin_enforce: Vec<(String, String)> =
            (0..=pins).map(|i| sign(format!("e{i:04}"))).collect();
        let shared: Vec<(String, String)> = (0..images).map(|i| sign(format!("s{i:04}"))).collect();
        let unsigned = maker.push("unsigned");
        (pin_none, pin_enforce, shared, unsigned)
    });

    // --- cosign's opinion of an in-process signature --------------------------------------------
    let digest0 = &pin_enforce[0].1;
    let image0 = format!("{}/{SIGNED_REPO}@{digest0}", registry.addr);
    let cosign = tokio::task::block_in_place(|| {
        cosign_verify(&signer.public_pem, &image0).map(|accepted| {
            let rejected = cosign_verify(&other.public_pem, &image0).expect("cosign");
            (accepted, rejected)
        })
    });

    // --- the daemon ----------------------------------------------------------------------------
    let daemon = tokio::task::block_in_place(|| {
        Daemon::start_with_config(
            "unix:///nonexistent.sock",
            &[&proxy.addr],
            &[],
            "prefetch = false\n",
        )
    });
    let mut admin = imagestream::admin::client::connect(&daemon.admin_socket)
        .await
        .expect("admin client");
    let streams = tags.div_ceil(per_stream);
    let mut names = vec!["pins-none".to_string(), "pins-enforce".to_string()];
    for s in 0..streams {
        names.push(format!("plain-{s:03}"));
        names.push(format!("signed-{s:03}"));
    }
    for name in &names {
        admin
            .create_stream(pb::CreateStreamRequest {
                namespace: SIG_NAMESPACE.into(),
                name: name.clone(),
                lookup_local: false,
            })
            .await
            .expect("CreateStream");
        if name.starts_with("pins-enforce") || name.starts_with("signed-") {
            admin
                .set_stream_policy(pb::SetStreamPolicyRequest {
                    namespace: SIG_NAMESPACE.into(),
                    name: name.clone(),
                    mode: "enforce".into(),
                    keys: vec![pb::PolicyKey {
                        name: "cosign.pub".into(),
                        pem: signer.public_pem.clone(),
                        ..Default::default()
                    }],
                })
                .await
                .unwrap_or_else(|e| panic!("SetStreamPolicy {name}: {e}\n{}", daemon.log_tail()));
        }
    }
    let source = |tag: &str| format!("{}/{SIGNED_REPO}:{tag}", proxy.addr);

    // --- pin latency: distinct images, alternating no policy / enforce -------------------------
    let (mut none, mut enforce) = (PinStats::default(), PinStats::default());
    let mut unverified = 0usize;
    for i in 0..=pins {
        let (p, _) = set_tag_timed(
            &mut admin,
            &daemon,
            t0,
            "pins-none",
            &format!("p{i:04}"),
            &source(&pin_none[i].0),
        )
        .await;
        let (q, tag) = set_tag_timed(
            &mut admin,
            &daemon,
            t0,
            "pins-enforce",
            &format!("p{i:04}"),
            &source(&pin_enforce[i].0),
        )
        .await;
        if !verified(&tag) {
            unverified += 1;
        }
        if i > 0 {
            none.pins.push(p);
            enforce.pins.push(q);
        }
    }

    // --- an unsigned image on an enforce stream: refused ---------------------------------------
    let t = Instant::now();
    let refusal = admin
        .set_tag(pb::SetTagRequest {
            namespace: SIG_NAMESPACE.into(),
            name: "pins-enforce".into(),
            tag: "unsigned".into(),
            source: format!("{}/{SIGNED_REPO}@{unsigned}", proxy.addr),
            scheduled: false,
            interval_secs: 0,
        })
        .await;
    let refusal_time = t.elapsed();

    // --- many tags: the same few signed images, streams alternating ----------------------------
    let (mut plain_tags, mut signed_tags) = (PinStats::default(), PinStats::default());
    let (mut plain_wall, mut signed_wall) = (Duration::ZERO, Duration::ZERO);
    let (mut plain_cpu, mut signed_cpu) = (Duration::ZERO, Duration::ZERO);
    let pid = daemon.pid().expect("daemon pid");
    for s in 0..streams {
        let n = per_stream.min(tags - s * per_stream);
        for (kind, stats, wall, cpu) in [
            ("plain", &mut plain_tags, &mut plain_wall, &mut plain_cpu),
            (
                "signed",
                &mut signed_tags,
                &mut signed_wall,
                &mut signed_cpu,
            ),
        ] {
            let stream = format!("{kind}-{s:03}");
            let (c0, w0) = (process_cpu_time(pid), Instant::now());
            for k in 0..n {
                let i = s * per_stream + k;
                let (p, tag) = set_tag_timed(
                    &mut admin,
                    &daemon,
                    t0,
                    &stream,
                    &tag_name(k),
                    &source(&shared[i % shared.len()].0),
                )
                .await;
                if kind == "signed" && !verified(&tag) {
                    unverified += 1;
                }
                stats.pins.push(p);
            }
            *wall += w0.elapsed();
            *cpu += process_cpu_time(pid).saturating_sub(c0);
        }
    }

    // --- report --------------------------------------------------------------------------------
    let recs = proxy.records();
    println!();
    println!(
        "signature policy: stream tags set through admin gRPC SetTag (one connection, sequential) on streams without a \
         policy and with an enforce policy trusting one ECDSA P-256 key; every image is signed, in-process, in cosign's \
         format (the sha256-<hex>.sig tag); a fresh daemon, release build, prefetch = false, registry behind the counting \
         proxy; {} CPUs; this part took {:.0} s; load average {load_before} at its start, {} at its end",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        run_t.elapsed().as_secs_f64(),
        loadavg()
    );
    match &cosign {
        None => {
            println!("  cosign: no binary at /var/cache/imagestream-test/bin/cosign, not checked")
        }
        Some((accepted, rejected)) => {
            println!(
                "  cosign {} `verify --key cosign.pub --insecure-ignore-tlog=true --allow-http-registry` of an \
                 in-process-signed image: {}; with another key: {}",
                cosign_version(),
                match accepted {
                    Ok(()) => "ACCEPTED".to_string(),
                    Err(e) => format!("REJECTED ({})", e.chars().take(400).collect::<String>()),
                },
                match rejected {
                    Ok(()) => "ACCEPTED (wrong!)".to_string(),
                    Err(_) => "rejected".to_string(),
                }
            );
        }
    }
    let pin_line = |what: &str, s: &PinStats| {
        let l = s.latencies();
        println!(
            "  {what:<10} p50 {:>6.2} ms   p90 {:>6.2} ms   max {:>6.2} ms   mean {:>6.2} ms   daemon CPU {:>5.2} ms per pin   registry requests per pin {}",
            ms(percentile(&l, 0.5)),
            ms(percentile(&l, 0.9)),
            ms(l.last().copied().unwrap_or_default()),
            ms(s.total()) / s.pins.len().max(1) as f64,
            ms(s.cpu()) / s.pins.len().max(1) as f64,
            requests_per_pin(&s.requests(&recs), s.pins.len())
        );
    };
    println!(
        "  pin latency: {pins} distinct images per stream (sources by tag), the two streams alternating, after one \
         unmeasured pin each"
    );
    pin_line("no policy", &none);
    pin_line("enforce", &enforce);
    let (ln, le) = (none.latencies(), enforce.latencies());
    let ratio = |a: Duration, b: Duration| secs(a) / secs(b).max(1e-9);
    println!(
        "  enforce / no policy: p50 x{:.2} (+{:.2} ms), p90 x{:.2} (+{:.2} ms)",
        ratio(percentile(&le, 0.5), percentile(&ln, 0.5)),
        ms(percentile(&le, 0.5)) - ms(percentile(&ln, 0.5)),
        ratio(percentile(&le, 0.9), percentile(&ln, 0.9)),
        ms(percentile(&le, 0.9)) - ms(percentile(&ln, 0.9)),
    );
    println!(
        "  {tags} tags per kind on {streams} streams x up to {per_stream}, pointing at {} signed images (tag i -> image i mod {}), \
         100 on a plain stream, then 100 on an enforce stream, and so on",
        shared.len(),
        shared.len()
    );
    let many_line = |what: &str, s: &PinStats, wall: Duration, cpu: Duration| {
        let l = s.latencies();
        println!(
            "  {what:<10} {:>6.2} s in all, {:>5.2} ms per tag (p50 {:.2} ms, p90 {:.2} ms), daemon CPU {:.2} s per 1,000 pins, registry requests per pin {}",
            secs(wall),
            ms(wall) / s.pins.len().max(1) as f64,
            ms(percentile(&l, 0.5)),
            ms(percentile(&l, 0.9)),
            secs(cpu) / s.pins.len().max(1) as f64 * 1000.0,
            requests_per_pin(&s.requests(&recs), s.pins.len())
        );
    };
    many_line("no policy", &plain_tags, plain_wall, plain_cpu);
    many_line("enforce", &signed_tags, signed_wall, signed_cpu);
    println!(
        "  enforce / no policy: time x{:.2}, daemon CPU x{:.2}",
        ratio(signed_wall, plain_wall),
        ratio(signed_cpu, plain_cpu)
    );
    println!(
        "  generations recorded as verified on enforce streams: {} of {}",
        enforce.pins.len() + 1 + signed_tags.pins.len() - unverified,
        enforce.pins.len() + 1 + signed_tags.pins.len()
    );
    match refusal {
        Ok(_) => println!("  an unsigned image on an enforce stream: PINNED (wrong!)"),
        Err(e) => println!(
            "  an unsigned image on an enforce stream: refused in {:.2} ms ({:?}: {})",
            ms(refusal_time),
            e.code(),
            e.message().chars().take(200).collect::<String>()
        ),
    }
    let metrics = daemon.metrics();
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("imagestream_signature_"))
    {
        println!("  /metrics: {l}");
    }
    print_warnings(&daemon, " (1 expected: the refusal)");
}
