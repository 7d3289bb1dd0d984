//! Benchmark: latency of CRI `ImageStatus` through the imagestream proxy against the same call
//! made directly to containerd, in one run on the same machine (real containerd, real registry,
//! the release `imagestream` binary). Prints p50 and p99 of each and their ratio, for a plain
//! reference (raw forwarding), and for a stream reference (PullImage of a digest the runtime
//! holds: resolved, access-checked, answered after one runtime ImageStatus) against ImageStatus
//! of the pinned reference direct. Target: added p50 at most 50 µs.
//!
//! Run: `cargo bench --bench image_status` (root; the Debian packages of the test harness).
//! `IMAGESTREAM_BENCH_CALLS` sets the number of measured calls per series (default 2000).

#[path = "../tests/common/mod.rs"]
mod common;

use common::daemon::Daemon;
use common::*;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageStatusRequest, PullImageRequest};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const WARMUP: usize = 200;
/// Calls per round; rounds alternate between the series so that drift hits both alike.
const ROUND: usize = 100;

async fn sample(
    client: &mut ImageServiceClient<Channel>,
    image: &str,
    n: usize,
    out: &mut Vec<Duration>,
) {
    // A stream reference is never "present" in ImageStatus (the kubelet must go through
    // PullImage and its access check); its hot call is PullImage of a digest the runtime holds,
    // answered with one runtime ImageStatus and no pull.
    let stream = image.starts_with("imagestream.local/");
    let pod = pod_config("bench", "bench", &std::env::temp_dir());
    for _ in 0..n {
        let t = Instant::now();
        if stream {
            let req = PullImageRequest {
                image: Some(image_spec(image)),
                auth: None,
                sandbox_config: Some(pod.clone()),
            };
            let resp = client.pull_image(req).await.expect("PullImage");
            out.push(t.elapsed());
            assert!(!resp.into_inner().image_ref.is_empty());
        } else {
            let req = ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            };
            let resp = client.image_status(req).await.expect("ImageStatus");
            out.push(t.elapsed());
            assert!(
                resp.into_inner().image.is_some(),
                "image {image} not present"
            );
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Stats {
    p50: Duration,
    p99: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    Stats {
        p50: percentile(&v, 0.5),
        p99: percentile(&v, 0.99),
    }
}

#[allow(clippy::too_many_arguments)]
async fn compare(
    daemon_pid: u32,
    label: &str,
    proxy: &mut ImageServiceClient<Channel>,
    proxy_image: &str,
    direct: &mut ImageServiceClient<Channel>,
    direct_image: &str,
    calls: usize,
) {
    let mut scratch = Vec::new();
    sample(proxy, proxy_image, WARMUP, &mut scratch).await;
    sample(direct, direct_image, WARMUP, &mut scratch).await;
    let (mut via, mut dir) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    let mut done = 0;
    let mut daemon_cpu = Duration::ZERO;
    while done < calls {
        let n = ROUND.min(calls - done);
        sample(direct, direct_image, n, &mut dir).await;
        let before = process_cpu_time(daemon_pid);
        sample(proxy, proxy_image, n, &mut via).await;
        daemon_cpu += process_cpu_time(daemon_pid).saturating_sub(before);
        done += n;
    }
    let (v, d) = (stats(via), stats(dir));
    println!("{label}");
    println!(
        "  direct to containerd   p50 {:>8.1} µs   p99 {:>8.1} µs",
        us(d.p50),
        us(d.p99)
    );
    println!(
        "  through imagestream    p50 {:>8.1} µs   p99 {:>8.1} µs",
        us(v.p50),
        us(v.p99)
    );
    println!(
        "  ratio (proxy/direct)   p50 {:>8.2}      p99 {:>8.2}       added p50 {:.1} µs (target <= 50 µs)",
        us(v.p50) / us(d.p50),
        us(v.p99) / us(d.p99),
        us(v.p50) - us(d.p50)
    );
    println!(
        "  imagestream CPU time per proxied call: {:.1} µs (user + system, from /proc, 10 ms ticks)",
        us(daemon_cpu) / calls as f64
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let calls: usize = std::env::var("IMAGESTREAM_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    // Log as in production (info), not as the tests do (debug).
    std::env::set_var("IMAGESTREAM_TEST_LOG", "info");
    let registry = Registry::start();
    let digest = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let ctd = Containerd::start(&registry);
    let daemon = Daemon::start(&ctd.endpoint(), &[&registry.addr], &[]);
    daemon.cli_ok(&["stream", "create", "bench/app"]);
    daemon.cli_ok(&[
        "tag",
        "set",
        "bench/app:prod",
        &registry.image_ref("app:v1"),
    ]);

    let plain = registry.image_ref("app:v1");
    let pinned = format!("{}/app@{digest}", registry.addr);
    let stream_ref = "imagestream.local/bench/app:prod";
    let mut direct = image_client(&ctd.socket).await;
    let mut proxy = image_client(&daemon.cri_socket).await;
    direct
        .pull_image(PullImageRequest {
            image: Some(image_spec(&plain)),
            ..Default::default()
        })
        .await
        .expect("PullImage");

    println!(
        "ImageStatus latency, {calls} calls per series, one connection each, sequential calls"
    );
    let pid = daemon.pid().expect("daemon pid");
    compare(
        pid,
        "plain reference (forwarded as raw HTTP/2)",
        &mut proxy,
        &plain,
        &mut direct,
        &plain,
        calls,
    )
    .await;
    compare(
        pid,
        "stream reference: PullImage of a held digest (resolve, access check, one runtime ImageStatus) vs ImageStatus of the pinned reference direct",
        &mut proxy,
        stream_ref,
        &mut direct,
        &pinned,
        calls,
    )
    .await;
}
