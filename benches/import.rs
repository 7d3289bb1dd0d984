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
//! Run: `cargo bench --bench import` (root; the Debian packages `docker-registry`, `skopeo`,
//! `umoci`, `busybox-static` of the test harness; about 1 minute after the build with the
//! defaults). Results: `docs/benchmarks.md`. Environment:
//! - `IMAGESTREAM_BENCH_TAGS` (default 1000): scheduled tags,
//! - `IMAGESTREAM_BENCH_TAGS_PER_STREAM` (default 100): tags per stream,
//! - `IMAGESTREAM_BENCH_INTERVAL_SECS` (default 10): the tags' interval (the daemon's
//!   `import_min_interval_secs` is set to 1),
//! - `IMAGESTREAM_BENCH_ROUNDS` (default 3): measured rounds of one interval each, after one
//!   unmeasured warm-up interval,
//! - `IMAGESTREAM_BENCH_CLI_TAGS` (default 20): how many of the tags are created with the CLI
//!   (the rest through the admin API).
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
    let log = strip_ansi(&daemon.log_text());
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    println!(
        "  imagestream log: {} WARN/ERROR lines{}",
        bad.len(),
        if bad.is_empty() { "" } else { ", first ones:" }
    );
    for l in bad.iter().take(5) {
        println!("    {l}");
    }
}
