//! Benchmark: how fast a tag move reaches every node through etcd. One real etcd (Debian
//! `etcd-server`) and one docker-registry on loopback; three imagestream daemons ("nodes")
//! with `store = "etcd"`. Each round moves `team-a/app:prod` through node 1's admin API
//! (`RollbackTag`, which needs no registry: the tag alternates between two images), and the
//! bench times, from just before the call, until each node's `Watch` stream delivers the
//! event: a node publishes the event when its resolution view has changed, so that is the
//! moment its CRI path resolves the new digest.
//!
//! Printed: p50 / p99 / max per node; node 1 (the writer, which applies its own write at
//! once) is the baseline, and the ratio of the other nodes' p50 to it is printed. Target:
//! the other nodes within 1 s (issue 6). Timings are printed, never asserted.
//!
//! Run: `cargo bench --bench cluster` (root; Debian `etcd-server`, `docker-registry`,
//! `skopeo`, `umoci`, `busybox-static`). `IMAGESTREAM_BENCH_ROUNDS` (default 200) sets the
//! rounds. Results: `docs/benchmarks.md`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::daemon::Daemon;
use common::etcd::Etcd;
use common::*;
use imagestream::admin::pb;
use std::time::{Duration, Instant};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let rounds: usize = std::env::var("IMAGESTREAM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let etcd = Etcd::start();
    let registry = Registry::start();
    push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    push_image(&registry, "app", "v2", "v2", &["/bin/sleep", "infinity"]);
    let eps = etcd.endpoints_toml(&[0]);
    let nodes: Vec<Daemon> = (1..=3)
        .map(|i| {
            Daemon::start_with_config(
                "unix:///nonexistent.sock",
                &[&registry.addr],
                &[],
                &format!("store = \"etcd\"\n{eps}node_name = \"node{i}\"\nprefetch = false\n"),
            )
        })
        .collect();
    nodes[0].cli_ok(&["stream", "create", "team-a/app"]);
    nodes[0].cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    nodes[0].cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v2"),
    ]);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let results: Vec<Vec<Duration>> = rt.block_on(async {
        let mut admin = imagestream::admin::client::connect(&nodes[0].admin_socket)
            .await
            .expect("admin client");
        let mut watches = Vec::new();
        for n in &nodes {
            let mut c = imagestream::admin::client::connect(&n.admin_socket)
                .await
                .expect("admin client");
            let stream = c
                .watch(pb::WatchRequest {
                    namespace: "team-a".into(),
                    name: "app".into(),
                })
                .await
                .expect("watch")
                .into_inner();
            watches.push(stream);
        }
        // Each watch in its own task, stamping every event as it arrives.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64, Instant)>();
        for (i, mut w) in watches.into_iter().enumerate() {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Ok(Some(e)) = w.message().await {
                    let _ = tx.send((i, e.generation, Instant::now()));
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        while rx.try_recv().is_ok() {}
        let mut per_node = vec![Vec::with_capacity(rounds); nodes.len()];
        for round in 0..rounds + 10 {
            let start = Instant::now();
            let tag = admin
                .rollback_tag(pb::RollbackTagRequest {
                    namespace: "team-a".into(),
                    name: "app".into(),
                    tag: "prod".into(),
                    ..Default::default()
                })
                .await
                .expect("rollback")
                .into_inner();
            let generation = tag.generations.first().map_or(0, |g| g.generation);
            let mut seen = vec![None; nodes.len()];
            while seen.iter().any(Option::is_none) {
                let (i, g, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .expect("every node's event within 10 s")
                    .expect("watch tasks alive");
                if g == generation {
                    seen[i] = Some(at.duration_since(start));
                }
            }
            if round >= 10 {
                for (i, took) in seen.into_iter().enumerate() {
                    per_node[i].push(took.unwrap_or_default());
                }
            }
        }
        per_node
    });

    println!(
        "tag move through node 1 -> event on each node's Watch ({rounds} rounds, after 10 warm-up)"
    );
    println!("{:<8} {:>10} {:>10} {:>10}", "node", "p50", "p99", "max");
    let mut p50s = Vec::new();
    for (i, mut d) in results.into_iter().enumerate() {
        d.sort();
        let (p50, p99, max) = (
            percentile(&d, 0.5),
            percentile(&d, 0.99),
            percentile(&d, 1.0),
        );
        p50s.push(p50);
        println!(
            "{:<8} {:>10.2?} {:>10.2?} {:>10.2?}{}",
            format!("node{}", i + 1),
            p50,
            p99,
            max,
            if i == 0 { "  (writer: baseline)" } else { "" }
        );
    }
    for (i, p) in p50s.iter().enumerate().skip(1) {
        println!(
            "node{} p50 / writer p50: {:.2}  (target: every node within 1 s: {})",
            i + 1,
            p.as_secs_f64() / p50s[0].as_secs_f64().max(1e-9),
            if *p <= Duration::from_secs(1) {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    drop(nodes);
    drop(etcd);
}
