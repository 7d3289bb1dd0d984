//! Peers across real nodes: each node is a network namespace with its own containerd 2,
//! imagestream and address; one etcd (streams and peer discovery) reached over the LAN; one
//! docker-registry in a namespace of its own. The streams are shared through etcd and the
//! layers through the peers:
//!
//! 1. A new tag rolls out on three nodes at once: every blob comes from the registry once (its
//!    access log), and a container of the new image runs on all three.
//! 2. The registry stops; a fourth node that never pulled the image joins (etcd discovery) and
//!    runs it, its layers from the peers.
//!
//! 3. A client on the LAN without a node certificate gets nothing from a peer endpoint.
//! 4. A private image goes to no node whose pod lacks valid credentials.
//! 5. A peer that sends wrong bytes, or dies mid-transfer, does not fail a pod's pull: a
//!    [`common::peer::FaultInjectingPeer`] on the LAN (a real node certificate, faults a healthy
//!    imagestream never produces), named so that it ranks first for the layer.

mod common;

use common::daemon::Daemon;
use common::etcd::Etcd;
use common::mirror::cri_pull_image;
use common::netns::{Lan, NetHost};
use common::peer::Certs;
use common::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const STREAM: &str = "default/app";
const STREAM_REF: &str = "imagestream.local/default/app:prod";
const PULL_TIMEOUT: Duration = Duration::from_secs(120);
const PEER_PORT: u16 = 5051;

/// One node: its namespace, runtime and daemon.
struct Node {
    host: NetHost,
    daemon: Daemon,
    /// Dropped after the daemon: the runtime outlives the proxy in front of it.
    bed: RuntimeBed,
}

/// The node name of a LAN host (`<bridge>-n1` → `n1`).
fn node_name(host: &NetHost) -> String {
    host.netns.rsplit('-').next().unwrap_or("node").to_string()
}

/// A node: containerd 2 in `host`'s namespace (its sandbox image from `sandbox_registry`),
/// imagestream with the peer settings of `certs` plus `extra_toml`, and the runtime's pulls of
/// `registry` routed through the node's mirror.
fn start_node_with(
    host: NetHost,
    sandbox_registry: &str,
    registry: &str,
    certs: &Certs,
    peers: &[String],
    extra_toml: &str,
) -> Node {
    let name = node_name(&host);
    let bed = RuntimeBed::start_kind_in(
        RuntimeKind::Containerd2,
        sandbox_registry,
        BedOptions::default(),
        &host,
    );
    let toml = format!(
        "{extra_toml}{}",
        certs.node_toml(&name, &name, &host.addr(PEER_PORT), peers)
    );
    let daemon = Daemon::start_in_with_config(&host, &bed.endpoint(), &[registry], &[], &toml);
    daemon.route_through_mirror(&bed, registry);
    Node { host, daemon, bed }
}

/// A node of the etcd cluster at `etcd`.
fn start_node(host: NetHost, registry: &Registry, etcd: &str, certs: &Certs) -> Node {
    // Debug daemons on a loaded 2-core machine can take longer than the default second to
    // answer a peer; a miss would cost a registry fetch (counted by the rollout check).
    let extra = format!(
        "store = \"etcd\"\netcd_endpoints = [\"http://{etcd}\"]\npeer_first_byte_timeout_ms = 5000\n"
    );
    start_node_with(host, &registry.addr, &registry.addr, certs, &[], &extra)
}

/// Runs a container of the stream reference on `node` (PullImage through the stream, then a
/// sandbox and a container that sleeps); returns the image ref PullImage answered.
async fn run_stream_image(node: &Node, pod: String) -> String {
    let pod = pod.as_str();
    let started = Instant::now();
    let image = tokio::time::timeout(
        PULL_TIMEOUT,
        cri_pull_image(&node.daemon.cri_socket, STREAM_REF),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{}: PullImage timed out\n{}",
            node.host.netns,
            node.daemon.log_tail()
        )
    })
    .unwrap_or_else(|e| {
        panic!(
            "{}: PullImage failed: {e}\n{}",
            node.host.netns,
            node.daemon.log_tail()
        )
    });
    let logs = node.daemon.dir.path().join(format!("pods-{pod}"));
    std::fs::create_dir_all(&logs).expect("pod log dir");
    let (mut rt, ctr) =
        start_sleeping_container(&node.daemon.cri_socket, STREAM_REF, pod, &logs).await;
    let status = rt
        .container_status(k8s_cri::v1::ContainerStatusRequest {
            container_id: ctr,
            verbose: false,
        })
        .await
        .expect("ContainerStatus")
        .into_inner()
        .status
        .expect("a status");
    assert_eq!(
        status.state,
        k8s_cri::v1::ContainerState::ContainerRunning as i32,
        "{}: the container does not run: {status:?}",
        node.host.netns
    );
    eprintln!("{}: running in {:?}", node.host.netns, started.elapsed());
    image
}

fn lan_tmp(node: &Node) -> std::path::PathBuf {
    node.daemon.dir.path().to_path_buf()
}

/// `ctr` against `node`'s containerd (namespace k8s.io).
fn run_ctr(node: &Node, args: &[&str]) {
    let out = node.bed.ctr().args(args).output().expect("run ctr");
    assert!(
        out.status.success(),
        "ctr {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `check` every 50 ms until it answers `Ok`; after `timeout` fails the test with its
/// last answer and `node`'s log tail.
fn wait_until(node: &Node, timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        let Err(why) = check() else {
            return;
        };
        assert!(
            Instant::now() < deadline,
            "{}: {why}\n{}",
            node.host.netns,
            node.daemon.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `node`'s cache holds every one of `blobs`.
fn wait_for_blobs(node: &Node, blobs: &[String]) {
    wait_until(node, Duration::from_secs(60), || {
        let held = common::mirror::store_blobs(&node.daemon.state_dir).unwrap_or_default();
        let missing: Vec<&String> = blobs
            .iter()
            .filter(|b| !held.contains_key(b.as_str()))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("never cached {missing:?}"))
        }
    });
}

/// Waits until `node`'s view of the stream (through etcd) shows `digest`.
fn wait_for_tag(node: &Node, digest: &str) {
    wait_until(node, Duration::from_secs(30), || {
        let out = node.daemon.cli_ok(&["stream", "get", STREAM]);
        // The table shows the first 12 hex digits.
        if out.contains(&digest[..19]) {
            Ok(())
        } else {
            Err(format!("the stream never showed {digest}:\n{out}"))
        }
    });
}

/// Waits until `node` sees `n` members of the cluster.
fn wait_for_members(node: &Node, n: f64) {
    wait_until(node, Duration::from_secs(30), || {
        let m = common::mirror::metric_value(&node.daemon.metrics(), "imagestream_peer_members");
        if m == Some(n) {
            Ok(())
        } else {
            Err(format!("{m:?} peer members, expected {n}"))
        }
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_fetches_each_blob_once_and_a_new_node_runs_it_with_the_registry_down() {
    require_root("the multi-node peer test");
    let t0 = Instant::now();
    let lan = Lan::new();
    let reg_host = lan.host("registry");
    let hosts: Vec<NetHost> = ["n1", "n2", "n3", "n4"]
        .iter()
        .map(|n| lan.host(n))
        .collect();
    let mut registry = Registry::start_in(&reg_host);
    let etcd = Etcd::start();
    let etcd_lan = lan.expose(etcd.members[0].client_url.trim_start_matches("http://"));
    let certs = Certs::make(
        &hosts
            .iter()
            .map(|h| (node_name(h), h.ip.clone()))
            .collect::<Vec<_>>()
            .iter()
            .map(|(n, ip)| (n.as_str(), ip.as_str()))
            .collect::<Vec<_>>(),
    );
    push_pause_image(&registry);
    let v1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let v2 = push_image(&registry, "app", "v2", "v2", &["/bin/sleep", "infinity"]);
    let blobs_of = |digest: &str| -> Vec<String> {
        let m = registry_manifest(&registry.addr, "app", digest);
        let mut b = vec![m["config"]["digest"].as_str().expect("config").to_string()];
        for l in m["layers"].as_array().expect("layers") {
            b.push(l["digest"].as_str().expect("layer").to_string());
        }
        b
    };
    let (v1_blobs, v2_blobs) = (blobs_of(&v1), blobs_of(&v2));
    let new_blobs: Vec<&String> = v2_blobs.iter().filter(|b| !v1_blobs.contains(b)).collect();
    assert!(!new_blobs.is_empty(), "v2 shares every blob with v1");
    eprintln!("LAN, registry, etcd, images: {:?}", t0.elapsed());

    let mut hosts = hosts.into_iter();
    let mut nodes: Vec<Node> = (0..3)
        .map(|_| start_node(hosts.next().expect("host"), &registry, &etcd_lan, &certs))
        .collect();
    for n in &nodes {
        wait_for_members(n, 3.0);
    }
    eprintln!("three nodes up and discovered: {:?}", t0.elapsed());

    // The stream, shared through etcd; v1 first so that the pause image is everywhere.
    nodes[0].daemon.cli_ok(&["stream", "create", STREAM]);
    nodes[0].daemon.cli_ok(&[
        "tag",
        "set",
        "default/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    // Every node prefetches v1 (and its pause image comes from the registry directly).
    for n in &nodes {
        wait_for_blobs(n, &v1_blobs);
    }
    let before = registry.blob_gets();

    // The rollout: the tag moves to v2 (a new config and top layer over v1's base), every
    // node prefetches it and runs it at once.
    nodes[0].daemon.cli_ok(&[
        "tag",
        "set",
        "default/app:prod",
        &registry.image_ref("app:v2"),
    ]);
    for n in &nodes {
        wait_for_tag(n, &v2);
    }
    let t = Instant::now();
    let pods: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| run_stream_image(n, format!("rollout-{i}")))
        .collect();
    let refs = futures_util::future::join_all(pods).await;
    eprintln!("rollout on three nodes: {:?}", t.elapsed());
    for r in &refs {
        assert_eq!(r, &refs[0], "every node runs the same image");
    }
    let after = registry.blob_gets();
    let direct = registry.blob_gets_not_by("imagestream/");
    assert!(
        direct.is_empty(),
        "runtime fetched from the registry itself: {direct:?}"
    );
    for blob in &v2_blobs {
        let n = after.get(blob).copied().unwrap_or(0) - before.get(blob).copied().unwrap_or(0);
        let expected = usize::from(new_blobs.contains(&blob));
        assert_eq!(
            n,
            expected,
            "{blob}: {n} registry fetches for a rollout on three nodes\n{}",
            nodes
                .iter()
                .map(|n| n
                    .daemon
                    .metrics()
                    .lines()
                    .filter(|l| l.starts_with("imagestream_peer_fetches_total"))
                    .collect::<Vec<_>>()
                    .join("\n"))
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
    }

    // From another host of the LAN, without a node certificate: the peer endpoint refuses.
    let url = format!(
        "https://{}/v1/blobs/{}",
        nodes[0].host.addr(PEER_PORT),
        v2_blobs[0]
    );
    let out = reg_host
        .command("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(certs.ca())
        .arg(&url)
        .output()
        .expect("curl in a netns");
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "a client without a node certificate got an answer: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The registry goes away; a fourth node joins and runs the stream's image from its peers.
    // Its pause image comes with the node (as node images preload it): exported from n1's
    // containerd, imported into n4's. The sandbox image is a tag, which only a registry
    // answers.
    let pause = registry.image_ref("pause:test");
    let tar = lan_tmp(&nodes[0]).join("pause.tar");
    run_ctr(
        &nodes[0],
        &["images", "export", &tar.display().to_string(), &pause],
    );
    registry.stop();
    let n4 = start_node(hosts.next().expect("host"), &registry, &etcd_lan, &certs);
    run_ctr(&n4, &["images", "import", &tar.display().to_string()]);
    wait_for_members(&n4, 4.0);
    for n in &nodes {
        wait_for_members(n, 4.0);
    }
    let r4 = run_stream_image(&n4, "late".into()).await;
    assert_eq!(r4, refs[0], "the new node runs the stream's current image");
    let ok = common::peer::peer_fetches_ok(&n4.daemon);
    assert!(
        ok >= v2_blobs.len() as f64,
        "the new node's layers came from peers ({ok})\n{}",
        n4.daemon.log_tail()
    );
    nodes.push(n4);
    eprintln!("done in {:?}", t0.elapsed());
}

const USER: &str = "team-a-puller";
const PASSWORD: &str = "pr1vate-Pa55";

async fn pull_as(
    node: &Node,
    image: &str,
    auth: Option<(&str, &str)>,
    pod: &str,
) -> Result<String, tonic::Status> {
    let logs = node.daemon.dir.path().join(format!("pods-{pod}"));
    let cfg = pod_config(pod, "team-b", &logs);
    let mut img = image_client(&node.daemon.cri_socket).await;
    Ok(img
        .pull_image(k8s_cri::v1::PullImageRequest {
            image: Some(image_spec(image)),
            auth: auth.map(|(u, p)| k8s_cri::v1::AuthConfig {
                username: u.into(),
                password: p.into(),
                ..Default::default()
            }),
            sandbox_config: Some(cfg),
        })
        .await?
        .into_inner()
        .image_ref)
}

fn peer_metric_sum(node: &Node, prefix: &str) -> f64 {
    node.daemon
        .metrics()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_image_goes_to_no_node_whose_pod_lacks_valid_credentials() {
    require_root("the multi-node peer test");
    let lan = Lan::new();
    let reg_host = lan.host("registry");
    let (h1, h2) = (lan.host("p1"), lan.host("p2"));
    let origin = Registry::start_in(&reg_host);
    push_pause_image(&origin);
    push_image(
        &origin,
        "private/app",
        "v1",
        "v1",
        &["/bin/sleep", "infinity"],
    );
    // The same storage behind htpasswd, reached by the nodes through the LAN's gateway.
    let private = common::auth::HtpasswdRegistry::start(&origin.dir.join("data"), USER, PASSWORD);
    let private_addr = lan.expose(&private.addr);
    let image = format!("{private_addr}/private/app:v1");
    let certs = Certs::make(&[("p1", &h1.ip), ("p2", &h2.ip)]);
    let peers = vec![
        format!("p1={}", h1.addr(PEER_PORT)),
        format!("p2={}", h2.addr(PEER_PORT)),
    ];
    // The nodes' own credentials, for their mirrors' fills.
    let auth_dir = tempfile::tempdir().expect("tempdir");
    let auth_file = auth_dir.path().join("node-auth.json");
    std::fs::write(
        &auth_file,
        common::auth::docker_config_json(&private_addr, USER, PASSWORD),
    )
    .expect("write the nodes' auth.json");
    let extra = format!(
        "registry_auth_file = {:?}\nprefetch = false\n",
        auth_file.display().to_string()
    );
    let start =
        |host: NetHost| start_node_with(host, &origin.addr, &private_addr, &certs, &peers, &extra);
    let (p1, p2) = (start(h1), start(h2));

    // A pod of p1 with the pull secret: pulled, the layers now in the cluster's caches.
    pull_as(&p1, &image, Some((USER, PASSWORD)), "with-secret")
        .await
        .expect("a pod with the secret pulls");
    let served_before = peer_metric_sum(&p1, "imagestream_peer_requests_total");
    let asked_before = peer_metric_sum(&p2, "imagestream_peer_fetches_total");

    // Pods of p2 without the secret, or with a wrong one: refused before any peer is asked.
    let e = pull_as(&p2, &image, None, "no-secret")
        .await
        .expect_err("no secret");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = pull_as(&p2, &image, Some((USER, "wrong")), "wrong-secret")
        .await
        .expect_err("a wrong secret");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert_eq!(
        peer_metric_sum(&p2, "imagestream_peer_fetches_total"),
        asked_before,
        "p2 asked its peers for a private image no pod of it may pull"
    );
    assert_eq!(
        peer_metric_sum(&p1, "imagestream_peer_requests_total"),
        served_before,
        "p1 served blobs for a refused pull"
    );
    let out = p2
        .bed
        .ctr()
        .args(["images", "ls", "-q"])
        .output()
        .expect("ctr");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("private/app"),
        "p2's runtime holds the private image"
    );

    // With the secret, p2's pod pulls; the blobs whose primary home is p1 come from p1 (p2
    // fetches its own share from the registry).
    pull_as(&p2, &image, Some((USER, PASSWORD)), "p2-with-secret")
        .await
        .expect("a pod of p2 with the secret pulls");
    let manifest = registry_manifest(&origin.addr, "private/app", "v1");
    let members: Vec<imagestream::peer::Member> = ["p1", "p2"]
        .iter()
        .map(|n| imagestream::peer::Member {
            name: n.to_string(),
            addr: String::new(),
        })
        .collect();
    let from_p1 = std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().expect("layers"))
        .filter_map(|b| b["digest"].as_str())
        .filter(|d| imagestream::peer::rank(&members, d)[0].name == "p1")
        .count() as f64;
    let ok = common::peer::peer_fetches_ok(&p2.daemon);
    assert!(
        ok >= from_p1,
        "p2 took {ok} blobs from p1, expected {from_p1} once its gate let the pull through\n{}",
        p2.daemon.log_tail()
    );
}

/// A node whose first peer for the image's layer misbehaves ([`PeerFault`]): the pod's pull
/// still succeeds, with the layer from the registry, and the fault is counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_sends_wrong_bytes_or_dies_mid_transfer_does_not_fail_the_pull() {
    use common::peer::{name_ranked_first, FaultInjectingPeer, PeerFault};
    require_root("the multi-node peer test");
    let lan = Lan::new();
    let reg_host = lan.host("registry");
    let registry = Registry::start_in(&reg_host);
    push_pause_image(&registry);
    let certs = Certs::make(&[("fake", &lan.gateway)]);
    for (i, (fault, outcome)) in [
        (PeerFault::WrongBytes, "mismatch"),
        (PeerFault::CutShort, "cut"),
    ]
    .into_iter()
    .enumerate()
    {
        let tag = format!("v{i}");
        push_image(&registry, "app", &tag, &tag, &["/bin/sleep", "infinity"]);
        let manifest = registry_manifest(&registry.addr, "app", &tag);
        let layers = manifest["layers"].as_array().expect("layers");
        let layer = layers[layers.len() - 1]["digest"]
            .as_str()
            .expect("a layer")
            .to_string();
        let (_, bytes) = http_request(
            &registry.addr,
            "GET",
            &format!("/v2/app/blobs/{layer}"),
            &[],
        )
        .expect("the registry answers");
        let fake = FaultInjectingPeer::start_on(
            &lan.gateway,
            &certs.files("fake"),
            HashMap::from([(layer.clone(), bytes)]),
            fault,
        );
        let host = lan.host(&format!("f{i}"));
        let name = node_name(&host);
        certs.add(&[(name.as_str(), host.ip.as_str())]);
        let candidates: Vec<String> = (0..200).map(|k| format!("peer-{k}")).collect();
        let fake_name = name_ranked_first(&layer, &[name.as_str()], &candidates);
        let node = start_node_with(
            host,
            &registry.addr,
            &registry.addr,
            &certs,
            &[format!("{fake_name}={}", fake.addr)],
            "prefetch = false\n",
        );
        let image = registry.image_ref(&format!("app:{tag}"));
        tokio::time::timeout(
            PULL_TIMEOUT,
            cri_pull_image(&node.daemon.cri_socket, &image),
        )
        .await
        .expect("PullImage in time")
        .unwrap_or_else(|e| {
            panic!(
                "{fault:?}: the pull failed: {e}\n{}",
                node.daemon.log_tail()
            )
        });
        assert!(
            fake.requests().contains(&layer),
            "{fault:?}: the faulty peer was asked for {layer}: {:?}",
            fake.requests()
        );
        let series =
            format!("imagestream_peer_fetches_total{{peer=\"{fake_name}\",outcome=\"{outcome}\"}}");
        let metrics = node.daemon.metrics();
        assert_eq!(
            common::mirror::metric_value(&metrics, &series),
            Some(1.0),
            "{fault:?}: {series}\n{metrics}"
        );
        common::mirror::verify_store(&node.daemon.state_dir).expect("the store verifies");
    }
}
