//! Peers on loopback: imagestream daemons (no runtime: the tests speak to their mirrors
//! directly) with static peer lists and certificates from `imagestream peer certs`, one real
//! docker-registry. What a rollout over many nodes looks like from the registry (one fetch per
//! blob), what the peer endpoint lets through (only nodes with a certificate of the cluster
//! CA, only blobs), and what a node does with a peer that misbehaves
//! ([`FaultInjectingPeer`]: wrong bytes, a body cut short, a stall): the pull still succeeds,
//! with the right bytes, and the fault is counted.
//!
//! The same scenarios with real runtimes, nodes in network namespaces and etcd discovery are in
//! `tests/cluster_peers.rs`.

mod common;

use common::daemon::Daemon;
use common::mirror::{metric_value, sha256_bytes, MIB};
use common::peer::{name_ranked_first, peer_fetches_ok, Certs, FaultInjectingPeer, PeerFault};
use common::*;
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// A node: a daemon with peers on, listening for peers on 127.0.0.1:`port`.
fn node(
    certs: &Certs,
    name: &str,
    port: u16,
    peers: &[String],
    registry: &Registry,
    extra: &str,
) -> Daemon {
    let toml = format!(
        "{}prefetch = false\n{extra}",
        certs.node_toml(name, name, &format!("127.0.0.1:{port}"), peers)
    );
    Daemon::start_with_config("unix:///nonexistent.sock", &[&registry.addr], &[], &toml)
}

/// GET a blob through a node's mirror, as containerd would.
fn pull_blob(d: &Daemon, registry: &Registry, repo: &str, digest: &str) -> Vec<u8> {
    let (status, body) = http_request(
        &d.mirror_addr,
        "GET",
        &format!("/v2/{repo}/blobs/{digest}?ns={}", registry.addr),
        &[],
    )
    .expect("mirror answers");
    assert_eq!(
        status,
        200,
        "{digest}: {}\n{}",
        String::from_utf8_lossy(&body),
        d.log_tail()
    );
    assert_eq!(sha256_bytes(&body), digest, "the bytes match the digest");
    body
}

fn imagestream_blob_gets(registry: &Registry) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for e in registry.access_log() {
        if !e.user_agent.starts_with("imagestream/") {
            continue;
        }
        if let Some(d) = e.successful_blob_get() {
            *counts.entry(d.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

#[test]
fn a_rollout_on_three_nodes_fetches_each_blob_from_the_registry_once() {
    require_root("the peer tests");
    let registry = Registry::start();
    let image = push_random_image_to(&registry.addr, "team/app:v1", &[3 * MIB, 2 * MIB, MIB]);
    let certs = Certs::make(&[("a", "127.0.0.1"), ("b", "127.0.0.1"), ("c", "127.0.0.1")]);
    let ports = [free_port(), free_port(), free_port()];
    let list: Vec<String> = ["a", "b", "c"]
        .iter()
        .zip(ports)
        .map(|(n, p)| format!("{n}=127.0.0.1:{p}"))
        .collect();
    let nodes: Vec<Daemon> = ["a", "b", "c"]
        .iter()
        .zip(ports)
        // A debug build of three daemons answering twelve pulls at once on two cores can take
        // over the default second to answer a peer; a miss then costs a registry fetch.
        .map(|(n, p)| {
            node(
                &certs,
                n,
                p,
                &list,
                &registry,
                "peer_first_byte_timeout_ms = 5000\n",
            )
        })
        .collect();
    let blobs = image.blobs()[1..].to_vec(); // config and layers
                                             // Every node pulls every blob at once.
    std::thread::scope(|s| {
        for d in &nodes {
            for b in &blobs {
                let registry = &registry;
                s.spawn(move || pull_blob(d, registry, "team/app", b));
            }
        }
    });
    let gets = imagestream_blob_gets(&registry);
    for b in &blobs {
        assert_eq!(
            gets.get(b).copied().unwrap_or(0),
            1,
            "{b} fetched from the registry once for three nodes: {gets:?}\n{}",
            nodes
                .iter()
                .map(|d| format!(
                    "{}\n{}",
                    d.metrics()
                        .lines()
                        .filter(|l| l.starts_with("imagestream_peer_fetches_total"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    d.log_text()
                        .lines()
                        .filter(|l| l.contains(b.as_str()))
                        .collect::<Vec<_>>()
                        .join("\n")
                ))
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
    }
    let from_peers: f64 = nodes.iter().map(peer_fetches_ok).sum();
    assert!(
        from_peers >= blobs.len() as f64 * 2.0,
        "peer fetches: {from_peers}"
    );
    // Every node holds every blob now, verified: a fourth pull on each costs nothing.
    for d in &nodes {
        for b in &blobs {
            pull_blob(d, &registry, "team/app", b);
        }
    }
    assert_eq!(imagestream_blob_gets(&registry), gets);
}

#[test]
fn with_the_registry_down_a_new_node_pulls_from_its_peers() {
    require_root("the peer tests");
    let mut registry = Registry::start();
    let image = push_random_image_to(&registry.addr, "team/app:v1", &[2 * MIB, MIB]);
    let certs = Certs::make(&[("a", "127.0.0.1"), ("b", "127.0.0.1"), ("d", "127.0.0.1")]);
    let (pa, pb, pd) = (free_port(), free_port(), free_port());
    let list = vec![
        format!("a=127.0.0.1:{pa}"),
        format!("b=127.0.0.1:{pb}"),
        format!("d=127.0.0.1:{pd}"),
    ];
    let a = node(&certs, "a", pa, &list, &registry, "");
    let b = node(&certs, "b", pb, &list, &registry, "");
    let blobs = image.blobs()[1..].to_vec();
    for blob in &blobs {
        pull_blob(&a, &registry, "team/app", blob);
        pull_blob(&b, &registry, "team/app", blob);
    }
    registry.stop();
    let d = node(&certs, "d", pd, &list, &registry, "");
    for blob in &blobs {
        pull_blob(&d, &registry, "team/app", blob);
    }
    let ok = peer_fetches_ok(&d);
    assert!(
        ok >= blobs.len() as f64,
        "d filled from peers: {ok}\n{}",
        d.log_tail()
    );
}

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_peer_endpoint_serves_only_blobs_and_only_to_nodes_of_the_cluster() {
    require_root("the peer tests");
    require_binary("curl", "curl");
    let registry = Registry::start();
    let image = push_random_image_to(&registry.addr, "team/app:v1", &[MIB]);
    let certs = Certs::make(&[("a", "127.0.0.1"), ("b", "127.0.0.1")]);
    let other = Certs::make(&[("a", "127.0.0.1")]);
    let port = free_port();
    let a = node(&certs, "a", port, &[], &registry, "");
    let layer = &image.layer_digests()[0];
    pull_blob(&a, &registry, "team/app", layer);
    let url = |path: &str| format!("https://127.0.0.1:{port}{path}");
    let blob_url = url(&format!("/v1/blobs/{layer}"));
    let ca = certs.ca().display().to_string();
    let (cert, key) = (
        certs.cert("b").display().to_string(),
        certs.key("b").display().to_string(),
    );

    // No client certificate: the handshake fails, nothing is served.
    let (ok, out) = curl(&["--cacert", &ca, &blob_url]);
    assert!(!ok, "a client without a certificate is refused: {out}");
    // A certificate of another CA: refused too.
    let (ok, out) = curl(&[
        "--cacert",
        &ca,
        "--cert",
        &other.cert("a").display().to_string(),
        "--key",
        &other.key("a").display().to_string(),
        &blob_url,
    ]);
    assert!(!ok, "a certificate of another CA is refused: {out}");
    // A node of the cluster gets the blob, and nothing else.
    let with_cert = |u: &str, extra: &[&str]| {
        let mut args = vec!["--cacert", &ca, "--cert", &cert, "--key", &key];
        args.extend_from_slice(extra);
        let u = u.to_string();
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.push(u);
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        curl(&refs)
    };
    let (ok, out) = with_cert(&blob_url, &[]);
    assert!(
        ok && out.ends_with("\n200"),
        "{}",
        &out[out.len().saturating_sub(300)..]
    );
    for (path, code) in [
        ("/v2/".to_string(), "404"),
        ("/v2/team/app/manifests/v1".to_string(), "404"),
        ("/v2/_catalog".to_string(), "404"),
        ("/v1/blobs/sha256:nothex".to_string(), "400"),
        (format!("/v1/blobs/sha256:{}", "0".repeat(64)), "404"),
    ] {
        let (ok, out) = with_cert(&url(&path), &[]);
        assert!(ok && out.ends_with(code), "{path}: {out}");
    }
    let (ok, out) = with_cert(&blob_url, &["-X", "PUT"]);
    assert!(ok && out.ends_with("405"), "PUT: {out}");
    // Asked to fill from a registry this node may not reach: refused.
    let (ok, out) = with_cert(
        &url(&format!("/v1/blobs/sha256:{}", "1".repeat(64))),
        &[
            "-H",
            "imagestream-fill-host: evil.example:5000",
            "-H",
            "imagestream-fill-repository: team/app",
        ],
    );
    assert!(ok && out.ends_with("403"), "fill from elsewhere: {out}");
}

/// A node `a` whose only peer is a [`FaultInjectingPeer`] named so that it is the primary
/// home of `digest` (so `a` asks it first): the pull must still succeed.
fn faulty_peer_case(fault: PeerFault, outcome: &str) {
    require_root("the peer tests");
    let registry = Registry::start();
    let image = push_random_image_to(&registry.addr, "team/app:v1", &[2 * MIB]);
    let layer = image.layer_digests()[0].clone();
    let (_, bytes) = http_request(
        &registry.addr,
        "GET",
        &format!("/v2/team/app/blobs/{layer}"),
        &[],
    )
    .expect("registry answers");
    let certs = Certs::make(&[("a", "127.0.0.1"), ("fake", "127.0.0.1")]);
    let fake = FaultInjectingPeer::start(
        &certs.files("fake"),
        HashMap::from([(layer.clone(), bytes)]),
        fault,
    );
    let candidates: Vec<String> = (0..200).map(|i| format!("peer-{i}")).collect();
    let fake_name = name_ranked_first(&layer, &["a"], &candidates);
    let port = free_port();
    let a = node(
        &certs,
        "a",
        port,
        &[format!("{fake_name}={}", fake.addr)],
        &registry,
        "",
    );
    let started = Instant::now();
    pull_blob(&a, &registry, "team/app", &layer);
    let took = started.elapsed();
    assert_eq!(
        fake.requests(),
        vec![layer.clone()],
        "the faulty peer was asked first"
    );
    let metrics = a.metrics();
    let series =
        format!("imagestream_peer_fetches_total{{peer=\"{fake_name}\",outcome=\"{outcome}\"}}");
    assert_eq!(
        metric_value(&metrics, &series),
        Some(1.0),
        "{series}\n{metrics}"
    );
    assert_eq!(
        imagestream_blob_gets(&registry).get(&layer).copied(),
        Some(1),
        "the registry served the blob after the peer failed"
    );
    if fault == PeerFault::Stall {
        // The first-byte deadline (1 s), not the pull's timeout.
        assert!(
            took < Duration::from_secs(10),
            "a stalled peer cost {took:?}"
        );
    }
    if fault == PeerFault::WrongBytes {
        assert!(
            metric_value(&metrics, "imagestream_digest_mismatches_total").unwrap_or(0.0) >= 1.0
        );
    }
    // Nothing of the peer's bytes stayed behind: the store holds the right blob only.
    common::mirror::verify_store(&a.state_dir).expect("the store verifies");
}

#[test]
fn a_peer_that_sends_wrong_bytes_is_refused_and_the_pull_succeeds() {
    faulty_peer_case(PeerFault::WrongBytes, "mismatch");
}

#[test]
fn a_peer_that_dies_mid_transfer_does_not_fail_the_pull() {
    faulty_peer_case(PeerFault::CutShort, "cut");
}

#[test]
fn a_peer_that_does_not_answer_is_skipped_after_the_first_byte_deadline() {
    faulty_peer_case(PeerFault::Stall, "slow");
}

#[test]
fn pinned_images_are_kept_on_their_home_nodes_and_roll_back_with_the_registry_gone() {
    require_root("the peer tests");
    let mut registry = Registry::start();
    let v1 = push_random_image_to(&registry.addr, "team/app:v1", &[MIB, MIB, MIB]);
    let v2 = push_random_image_to(&registry.addr, "team/app:v2", &[MIB, MIB, MIB]);
    let etcd = common::etcd::Etcd::start();
    let names = ["a", "b", "c", "d"];
    let certs = Certs::make(&names.map(|n| (n, "127.0.0.1")));
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    // No prefetch: what a node holds comes from the home loop alone.
    let extra = format!(
        "store = \"etcd\"\n{}peer_replicas = 2\npeer_first_byte_timeout_ms = 5000\n",
        etcd.endpoints_toml(&[0])
    );
    let mut nodes: Vec<Daemon> = names[..3]
        .iter()
        .zip(&ports)
        .map(|(n, p)| node(&certs, n, *p, &[], &registry, &extra))
        .collect();
    nodes[0].cli_ok(&["stream", "create", "team-a/app"]);
    nodes[0].cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("team/app:v1"),
    ]);
    nodes[0].cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("team/app:v2"),
    ]);

    // Each blob of both images (the current one and the rollback one) ends up on its two
    // home nodes, and pinned there.
    let members: Vec<imagestream::peer::Member> = names[..3]
        .iter()
        .map(|n| imagestream::peer::Member {
            name: n.to_string(),
            addr: String::new(),
        })
        .collect();
    let blobs: Vec<String> = v1.blobs()[1..]
        .iter()
        .chain(&v2.blobs()[1..])
        .cloned()
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held: Vec<std::collections::BTreeMap<String, u64>> = nodes
            .iter()
            .map(|d| common::mirror::store_blobs(&d.state_dir).unwrap_or_default())
            .collect();
        let missing: Vec<(String, String)> = blobs
            .iter()
            .flat_map(|b| {
                imagestream::peer::rank(&members, b)
                    .into_iter()
                    .take(2)
                    .map(|m| (m.name.clone(), b.clone()))
                    .collect::<Vec<_>>()
            })
            .filter(|(n, b)| {
                let i = names.iter().position(|x| x == n).expect("a node");
                !held[i].contains_key(b.as_str())
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "home blobs never arrived: {missing:?}\n{}",
            nodes[0].log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let gets = imagestream_blob_gets(&registry);
    for b in &blobs {
        assert_eq!(
            gets.get(b).copied(),
            Some(1),
            "{b} from the registry once: {gets:?}"
        );
    }
    let ls = nodes[0].cli_ok(&["cache", "ls"]);
    assert!(ls.contains("team-a/app:prod"), "pinned by the tag:\n{ls}");

    // The registry goes away, the tag rolls back; a new node runs (here: fetches) v1 from the
    // cluster.
    registry.stop();
    nodes[0].cli_ok(&["tag", "rollback", "team-a/app:prod"]);
    let d = node(&certs, "d", ports[3], &[], &registry, &extra);
    for b in &v1.blobs()[1..] {
        pull_blob(&d, &registry, "team/app", b);
    }
    nodes.push(d);
}
