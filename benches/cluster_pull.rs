//! Benchmark: N nodes pull a new 4 x 64 MiB image at once, with and without peers (issue 20).
//!
//! Setup, on loopback (the `tests/peers.rs` way, not network namespaces with a runtime): one
//! real `docker-registry` per case, N release `imagestream` daemons ("nodes"), each reaching
//! the registry through its own mirror. A node's "pull" is what a runtime does through the
//! mirror: `GET` the manifest by tag, then `GET` the config and the four layers in parallel,
//! each body streamed, counted and hashed by the bench (sha256 checked against the digest).
//! Every case pushes a new random image (`push_random_image_to`, four incompressible 64 MiB
//! layers) to a fresh registry and starts fresh daemons, so nothing is cached anywhere.
//!
//! Cases:
//! 1. one node, cold pull: the baseline;
//! 2. N nodes, peers off (no `peer_listen`), all pulling at once;
//! 3. N nodes, peers on (static peer list, certificates from `imagestream peer certs`).
//!
//! For each: registry blob bytes (from its access log) / image blob bytes (expected about N
//! with peers off, target 1.0 with peers on), and the slowest node's time. The N-node cases run
//! `IMAGESTREAM_BENCH_ROUNDS` times (default 3), alternating which goes first; median, min and
//! max are printed, with the daemons' CPU. Timings are printed, never asserted. The registry is
//! on loopback and not rate-limited, so peers can save time here only through less registry
//! work (its disk and CPU, on the same vCPUs), against the cost of TLS between peers and of a
//! peer's copy being stored and verified before the node serves it.
//!
//! Run: `cargo bench --bench cluster_pull` (root; Debian `docker-registry`, `skopeo`, `umoci`).
//! `IMAGESTREAM_BENCH_NODES` (default 3) sets N. Results: `docs/benchmarks.md`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::daemon::Daemon;
use common::mirror::MIB;
use common::peer::Certs;
use common::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Barrier;
use std::time::{Duration, Instant};

const LAYERS: usize = 4;
const LAYER_SIZE: usize = 64 * MIB;
const REPO: &str = "bench/app";
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

/// A streamed HTTP/1.0 GET: returns (status, body length, sha256 of the body); the body is
/// never held in memory.
fn stream_get(addr: &str, target: &str, headers: &[(&str, &str)]) -> (u16, u64, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("read timeout");
    let mut req = format!("GET {target} HTTP/1.0\r\nHost: {addr}\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write request");
    let mut r = BufReader::with_capacity(1 << 20, s);
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("GET {target}: bad status line {line:?}"));
    let mut content_length = None;
    loop {
        line.clear();
        r.read_line(&mut line).expect("header line");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            if n.eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse::<u64>().ok();
            }
        }
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = r
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("GET {target}: read after {len} bytes: {e}"));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    if let Some(cl) = content_length {
        assert_eq!(len, cl, "GET {target}: body length vs Content-Length");
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    (status, len, format!("sha256:{hex}"))
}

/// One node's pull through its mirror: the manifest by tag, then every blob in parallel.
fn pull(d: &Daemon, registry: &str, tag: &str, image: &RandomImage) -> Duration {
    let started = Instant::now();
    let (status, _, digest) = stream_get(
        &d.mirror_addr,
        &format!("/v2/{REPO}/manifests/{tag}?ns={registry}"),
        &[("Accept", ACCEPT)],
    );
    assert_eq!(status, 200, "manifest through the mirror\n{}", d.log_tail());
    assert_eq!(digest, image.digest, "the manifest the registry holds");
    let blobs = image.blobs();
    std::thread::scope(|s| {
        for b in &blobs[1..] {
            s.spawn(move || {
                let (status, _, got) = stream_get(
                    &d.mirror_addr,
                    &format!("/v2/{REPO}/blobs/{b}?ns={registry}"),
                    &[],
                );
                assert_eq!(status, 200, "{b} through the mirror\n{}", d.log_tail());
                assert_eq!(&got, b, "the bytes match the digest");
            });
        }
    });
    started.elapsed()
}

/// `imagestream_peer_fetches_total` summed per outcome.
fn peer_outcomes(d: &Daemon, into: &mut BTreeMap<String, f64>) {
    for l in d.metrics().lines() {
        if !l.starts_with("imagestream_peer_fetches_total{") {
            continue;
        }
        let outcome = l
            .split("outcome=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?");
        if let Some(v) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *into.entry(outcome.to_string()).or_insert(0.0) += v;
        }
    }
}

struct CaseResult {
    /// Registry blob bytes / image blob bytes.
    registry_ratio: f64,
    /// Each node's pull time.
    times: Vec<Duration>,
    peer_outcomes: BTreeMap<String, f64>,
    /// CPU (user + system) of all the daemons, start-up to end of the pulls.
    daemon_cpu: Duration,
}

impl CaseResult {
    fn slowest(&self) -> Duration {
        self.times.iter().copied().max().unwrap_or_default()
    }
}

/// A fresh registry with a new random image, `n` fresh daemons (peers on or off), all pulling
/// at once.
fn run_case(n: usize, peers: bool, case: usize) -> CaseResult {
    let registry = Registry::start();
    let tag = format!("c{case}");
    let image = push_random_image_to(
        &registry.addr,
        &format!("{REPO}:{tag}"),
        &[LAYER_SIZE; LAYERS],
    );
    let image_bytes = image.config_size + image.layers.iter().map(|(_, s)| s).sum::<u64>();
    let names: Vec<String> = (0..n).map(|i| format!("node{i}")).collect();
    let certs = peers.then(|| {
        let pairs: Vec<(&str, &str)> = names.iter().map(|m| (m.as_str(), "127.0.0.1")).collect();
        Certs::make(&pairs)
    });
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let list: Vec<String> = names
        .iter()
        .zip(&ports)
        .map(|(m, p)| format!("{m}=127.0.0.1:{p}"))
        .collect();
    let nodes: Vec<Daemon> = names
        .iter()
        .zip(&ports)
        .map(|(m, p)| {
            let peer_toml = certs.as_ref().map_or(String::new(), |c| {
                c.node_toml(m, m, &format!("127.0.0.1:{p}"), &list)
            });
            Daemon::start_with_config(
                "unix:///nonexistent.sock",
                &[&registry.addr],
                &[],
                &format!("{peer_toml}prefetch = false\n"),
            )
        })
        .collect();
    // Let every peer listener come up.
    std::thread::sleep(Duration::from_millis(300));
    let before = registry.blob_bytes_served();
    let barrier = Barrier::new(n);
    let times: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|d| {
                let (barrier, registry, image, tag) = (&barrier, &registry, &image, &tag);
                s.spawn(move || {
                    barrier.wait();
                    pull(d, &registry.addr, tag, image)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("pull"))
            .collect()
    });
    let served = registry.blob_bytes_served() - before;
    let daemon_cpu = nodes
        .iter()
        .filter_map(Daemon::pid)
        .map(process_cpu_time)
        .sum();
    let mut outcomes = BTreeMap::new();
    for d in &nodes {
        peer_outcomes(d, &mut outcomes);
    }
    drop(nodes);
    drop(certs);
    drop(registry);
    CaseResult {
        registry_ratio: served as f64 / image_bytes as f64,
        times,
        peer_outcomes: outcomes,
        daemon_cpu,
    }
}

fn median<T: Copy + PartialOrd>(v: &[T]) -> T {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    s[s.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn summary(rounds: &[CaseResult]) -> (f64, f64, f64, Duration, Duration, Duration) {
    let ratios: Vec<f64> = rounds.iter().map(|r| r.registry_ratio).collect();
    let slowest: Vec<Duration> = rounds.iter().map(CaseResult::slowest).collect();
    let fmin = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let fmax = ratios.iter().copied().fold(0.0, f64::max);
    (
        median(&ratios),
        fmin,
        fmax,
        median(&slowest),
        *slowest.iter().min().expect("rounds"),
        *slowest.iter().max().expect("rounds"),
    )
}

fn main() {
    require_root("the cluster_pull bench");
    let n = env_usize("IMAGESTREAM_BENCH_NODES", 3);
    let rounds = env_usize("IMAGESTREAM_BENCH_ROUNDS", 3);
    println!(
        "cluster_pull: {n} nodes, {rounds} rounds; image = manifest + config + {LAYERS} x \
         {} MiB random layers; loopback daemons with static peer lists (no runtime: each node's \
         pull = GET manifest, then every blob in parallel, through its own mirror); loopback \
         registry, not rate-limited",
        LAYER_SIZE / MIB
    );
    let all = Instant::now();
    let mut case = 0;
    let mut next = || {
        case += 1;
        case
    };
    let single = run_case(1, false, next());
    println!(
        "single node cold pull: {} (registry bytes / image {:.2}, daemon CPU {})",
        secs(single.slowest()),
        single.registry_ratio,
        secs(single.daemon_cpu)
    );
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, so that drift on a busy VM does not favour one.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for peers in order {
            let r = run_case(n, peers, next());
            println!(
                "round {} peers {:<3}: registry bytes / image {:.2}, nodes {}, daemons' CPU {}, \
                 peer fetches {:?}",
                round + 1,
                if peers { "on" } else { "off" },
                r.registry_ratio,
                r.times
                    .iter()
                    .map(|t| secs(*t))
                    .collect::<Vec<_>>()
                    .join(" / "),
                secs(r.daemon_cpu),
                r.peer_outcomes
            );
            if peers {
                on.push(r)
            } else {
                off.push(r)
            }
        }
    }
    let base = single.slowest().as_secs_f64();
    let (off_r, off_rmin, off_rmax, off_t, off_tmin, off_tmax) = summary(&off);
    let (on_r, on_rmin, on_rmax, on_t, on_tmin, on_tmax) = summary(&on);
    println!();
    println!(
        "{:<24} {:>22} {:>30} {:>12} {:>10} {:>14}",
        "case",
        "registry bytes / image",
        "slowest node: median [min-max]",
        "vs single",
        "on / off",
        "daemons' CPU"
    );
    println!(
        "{:<24} {:>22} {:>30} {:>12} {:>10} {:>14}",
        "1 node, cold",
        format!("{:.2}", single.registry_ratio),
        secs(single.slowest()),
        "1.00",
        "",
        secs(single.daemon_cpu)
    );
    println!(
        "{:<24} {:>22} {:>30} {:>12} {:>10} {:>14}",
        format!("{n} nodes, peers off"),
        format!("{off_r:.2} [{off_rmin:.2}-{off_rmax:.2}]"),
        format!("{} [{}-{}]", secs(off_t), secs(off_tmin), secs(off_tmax)),
        format!("{:.2}", off_t.as_secs_f64() / base),
        "",
        secs(median(
            &off.iter().map(|r| r.daemon_cpu).collect::<Vec<_>>()
        ))
    );
    println!(
        "{:<24} {:>22} {:>30} {:>12} {:>10} {:>14}",
        format!("{n} nodes, peers on"),
        format!("{on_r:.2} [{on_rmin:.2}-{on_rmax:.2}]"),
        format!("{} [{}-{}]", secs(on_t), secs(on_tmin), secs(on_tmax)),
        format!("{:.2}", on_t.as_secs_f64() / base),
        format!("{:.2}", on_t.as_secs_f64() / off_t.as_secs_f64()),
        secs(median(&on.iter().map(|r| r.daemon_cpu).collect::<Vec<_>>()))
    );
    println!(
        "\nloopback registry, not rate-limited: here peers can save time only through less \
         registry work (its disk and CPU, on the same machine); they pay TLS on the peer link \
         and a store-then-serve hop (a peer's copy is verified before a client sees a byte). \
         Behind a slow or rate-limited registry link, the registry bytes column is what \
         counts. Total bench time {}.",
        secs(all.elapsed())
    );
}
