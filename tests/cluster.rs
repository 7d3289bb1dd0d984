//! The etcd cluster store, against real etcd (Debian `etcd-server`) started by the harness on
//! loopback ports: several imagestream daemons ("nodes", each with its own sockets and state
//! dir) share one set of streams.
//!
//! - a tag set through node 1 is what nodes 2 and 3 resolve (and pull), and concurrent sets on
//!   two nodes both land in the history, in order;
//! - scheduled imports run on one elected node; when it is killed another one takes over;
//! - etcd stopped: every node still resolves and pulls, writes fail with a clear error, a node
//!   restarted meanwhile starts from its saved view; etcd back: nodes catch up;
//! - a three-member etcd cluster losing a member changes nothing for the nodes, and a node cut
//!   off (its only member down) catches up once the member is back;
//! - TLS: a node with a client certificate reaches an etcd that requires one, a node without
//!   is refused and says so;
//! - a watch that must start from a compacted revision lists again;
//! - a tag moved on one node is prefetched into the layer cache of another;
//! - a signature policy set on one node holds on every node: another node refuses a pod an
//!   unverified generation, and runs it once it is verified (real cosign).

mod common;

use common::daemon::{dense_generations, spawn_watch, Daemon};
use common::etcd::Etcd;
use common::mirror::cri_pull_image;
use common::*;
use std::time::{Duration, Instant};

const STREAM_REF: &str = "imagestream.local/team-a/app:prod";

/// A node on `etcd_endpoints_toml`, forwarding to `runtime`.
fn node(runtime: &str, registry: &Registry, endpoints_toml: &str, name: &str) -> Daemon {
    Daemon::start_with_config(
        runtime,
        &[&registry.addr],
        &[],
        &format!(
            "store = \"etcd\"\n{endpoints_toml}node_name = \"{name}\"\n\
             etcd_lease_ttl_secs = 3\nprefetch = false\nimport_min_interval_secs = 1\n"
        ),
    )
}

/// The digest `d` resolves the stream tag to, if any.
fn resolved(d: &Daemon) -> Option<String> {
    let out = d.cli(&["-o", "json", "resolve", STREAM_REF]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["digest"].as_str().map(str::to_string)
}

/// Waits (20 s at most) until `d` resolves the stream tag to `digest`; returns how long it took.
fn wait_resolves(d: &Daemon, digest: &str, what: &str) -> Duration {
    let start = Instant::now();
    loop {
        if resolved(d).as_deref() == Some(digest) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: still resolves {:?}, not {digest}\n{}",
            resolved(d),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status(d: &Daemon) -> serde_json::Value {
    d.cli_json(&["status"])
}

fn history(d: &Daemon) -> Vec<serde_json::Value> {
    d.cli_json(&["tag", "history", "team-a/app:prod"])["generations"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn set_tag(d: &Daemon, source: &str) -> std::process::Output {
    d.cli(&["tag", "set", "team-a/app:prod", source])
}

#[test]
fn a_tag_set_on_one_node_is_what_every_node_resolves_and_runs() {
    let etcd = Etcd::start();
    let registry = Registry::start();
    let ctd = RuntimeBed::start(&registry);
    let v1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let v2 = push_image(&registry, "app", "v2", "v2", &["/bin/sleep", "infinity"]);
    let eps = etcd.endpoints_toml(&[0]);
    let nodes: Vec<Daemon> = (1..=3)
        .map(|i| node(&ctd.endpoint(), &registry, &eps, &format!("node{i}")))
        .collect();

    nodes[0].cli_ok(&["stream", "create", "team-a/app", "--lookup-local"]);
    let (mut watcher, events) = spawn_watch(&nodes[2], "team-a/app");
    std::thread::sleep(Duration::from_millis(300));
    nodes[0].cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    for (i, n) in nodes.iter().enumerate() {
        let took = wait_resolves(n, &v1, &format!("node{}", i + 1));
        eprintln!("node{} resolved the new tag after {took:?}", i + 1);
    }
    let e = events
        .recv_timeout(Duration::from_secs(10))
        .expect("node 3's watch sees node 1's change");
    assert_eq!(e["new_digest"], v1.as_str(), "{e}");
    assert_eq!(e["cause"], "set", "{e}");

    // Node 3 pulls what node 1 set, and the runtime holds exactly that digest.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let image_ref = rt
        .block_on(cri_pull_image(&nodes[2].cri_socket, STREAM_REF))
        .expect("pull through node 3");
    assert!(!image_ref.is_empty());

    // What is stored, under the documented keys.
    let keys = etcd.etcdctl(&["get", "--prefix", "--keys-only", "/imagestream/"]);
    assert!(keys.contains("/imagestream/streams/team-a/app"), "{keys}");
    assert!(keys.contains("/imagestream/leader/importer"), "{keys}");
    let importers: Vec<bool> = nodes
        .iter()
        .map(|n| status(n)["importer"].as_bool().unwrap_or(false))
        .collect();
    assert_eq!(
        importers.iter().filter(|b| **b).count(),
        1,
        "exactly one importer: {importers:?}"
    );

    // Two admins on two nodes move the same tag at the same moment, several times: every
    // write is a generation, none is lost, numbers stay dense and ordered.
    let rounds = 4;
    for _ in 0..rounds {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| set_tag(&nodes[0], &registry.image_ref("app:v2")));
            let b = s.spawn(|| set_tag(&nodes[1], &registry.image_ref("app:v1")));
            (a.join().expect("thread a"), b.join().expect("thread b"))
        });
        for o in [&a, &b] {
            assert!(
                o.status.success(),
                "concurrent tag set failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    let expected = 1 + 2 * rounds;
    let deadline = Instant::now() + Duration::from_secs(10);
    let h = loop {
        let h = history(&nodes[2]);
        if h.len() == expected || Instant::now() > deadline {
            break h;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(h.len(), expected, "node 3 sees every generation: {h:?}");
    dense_generations(&h, "history");
    assert_eq!(h[0]["generation"].as_u64(), Some(expected as u64));
    let v2_sets = h.iter().filter(|g| g["digest"] == v2.as_str()).count();
    assert_eq!(v2_sets, rounds, "every set of v2 is in the history: {h:?}");
    // Every node agrees on the newest generation.
    let newest = h[0]["digest"].as_str().expect("digest").to_string();
    for n in &nodes {
        wait_resolves(n, &newest, "after the concurrent sets");
    }
    let _ = watcher.kill();
}

#[test]
fn scheduled_imports_run_on_one_node_and_move_on_when_it_dies() {
    let etcd = Etcd::start();
    let registry = Registry::start();
    let v1 = push_image(
        &registry,
        "app",
        "stable",
        "v1",
        &["/bin/sleep", "infinity"],
    );
    let eps = etcd.endpoints_toml(&[0]);
    let mut nodes: Vec<Daemon> = (1..=3)
        .map(|i| {
            node(
                "unix:///nonexistent.sock",
                &registry,
                &eps,
                &format!("node{i}"),
            )
        })
        .collect();
    let leader = |nodes: &[Daemon], skip: Option<usize>| -> Option<usize> {
        let l: Vec<usize> = nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != skip)
            .filter(|(_, n)| status(n)["importer"].as_bool() == Some(true))
            .map(|(i, _)| i)
            .collect();
        assert!(l.len() <= 1, "two importers at once: {l:?}");
        l.first().copied()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let first = loop {
        if let Some(l) = leader(&nodes, None) {
            break l;
        }
        assert!(Instant::now() < deadline, "no node became the importer");
        std::thread::sleep(Duration::from_millis(100));
    };
    let other = (first + 1) % 3;
    nodes[other].cli_ok(&["stream", "create", "team-a/app"]);
    nodes[other].cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:stable"),
        "--scheduled",
        "--interval",
        "1s",
    ]);
    wait_resolves(&nodes[other], &v1, "after set");

    let v2 = push_image(
        &registry,
        "app",
        "stable",
        "v2",
        &["/bin/sleep", "infinity"],
    );
    for n in &nodes {
        wait_resolves(n, &v2, "after the import of v2");
    }
    std::thread::sleep(Duration::from_secs(3)); // several more checks by the importer
    let h = history(&nodes[other]);
    assert_eq!(h.len(), 2, "imported once, by one node: {h:?}");
    assert_eq!(h[0]["cause"], "import", "{h:?}");

    // The importer dies without a word; another node takes the job within the lease TTL.
    let killed_at = Instant::now();
    nodes[first].kill9();
    let deadline = Instant::now() + Duration::from_secs(20);
    let second = loop {
        if let Some(l) = leader(&nodes, Some(first)) {
            break l;
        }
        assert!(Instant::now() < deadline, "no node took over the imports");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "node{} took over the imports {:?} after node{} was killed (lease TTL 3 s)",
        second + 1,
        killed_at.elapsed(),
        first + 1
    );
    let v3 = push_image(
        &registry,
        "app",
        "stable",
        "v3",
        &["/bin/sleep", "infinity"],
    );
    wait_resolves(
        &nodes[other],
        &v3,
        "after the import of v3 by the new importer",
    );
    let h = history(&nodes[other]);
    assert_eq!(h.len(), 3, "{h:?}");
    assert_eq!(h[0]["cause"], "import");
    dense_generations(&h, "history");
}

#[test]
fn with_etcd_down_nodes_keep_resolving_and_catch_up_when_it_returns() {
    let mut etcd = Etcd::start();
    let registry = Registry::start();
    let ctd = RuntimeBed::start(&registry);
    let v1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let v2 = push_image(&registry, "app", "v2", "v2", &["/bin/sleep", "infinity"]);
    let eps = etcd.endpoints_toml(&[0]);
    let n1 = node(&ctd.endpoint(), &registry, &eps, "node1");
    let mut n2 = node(&ctd.endpoint(), &registry, &eps, "node2");
    n1.cli_ok(&["stream", "create", "team-a/app", "--lookup-local"]);
    n1.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    wait_resolves(&n2, &v1, "node 2");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for n in [&n1, &n2] {
        rt.block_on(cri_pull_image(&n.cri_socket, STREAM_REF))
            .expect("pull with etcd up");
    }

    etcd.stop(0);
    let endpoint = etcd.members[0].client_url.clone();
    // Resolution and pulls go on from each node's view.
    for n in [&n1, &n2] {
        assert_eq!(resolved(n).as_deref(), Some(v1.as_str()));
        rt.block_on(cri_pull_image(&n.cri_socket, STREAM_REF))
            .expect("pull with etcd down");
    }
    // Writes fail at once, naming the store and its endpoints.
    let started = Instant::now();
    let out = set_tag(&n1, &registry.image_ref("app:v2"));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "a write with etcd down must fail");
    assert!(
        err.contains("unavailable") && err.contains(&endpoint),
        "the error names the store and its endpoint: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    eprintln!(
        "write with etcd down failed after {:?}: {err}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let s = loop {
        let s = status(&n2);
        if s["connected"] == false || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(s["connected"], false, "{s}");
    assert!(s["stale_seconds"].as_f64().unwrap_or(0.0) > 0.0, "{s}");
    assert!(n2.metric("imagestream_store_connected") == 0.0);

    // A node restarted while etcd is down starts from its saved view.
    n2.stop();
    n2.start_again();
    assert_eq!(
        resolved(&n2).as_deref(),
        Some(v1.as_str()),
        "{}",
        n2.log_text()
    );
    rt.block_on(cri_pull_image(&n2.cri_socket, STREAM_REF))
        .expect("pull after a restart with etcd down");

    // etcd returns: writes work again and reach the other node, without restarts.
    etcd.start_again(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = set_tag(&n1, &registry.image_ref("app:v2"));
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes did not recover: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_resolves(&n2, &v2, "node 2 after etcd returned");
    let s = status(&n2);
    assert_eq!(s["connected"], true, "{s}");
    drop(n1);
}

#[test]
fn a_three_member_etcd_loses_members_and_a_cut_off_node_catches_up() {
    let mut etcd = Etcd::start_cluster(3);
    let registry = Registry::start();
    let v1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let v2 = push_image(&registry, "app", "v2", "v2", &["/bin/sleep", "infinity"]);
    let v3 = push_image(&registry, "app", "v3", "v3", &["/bin/sleep", "infinity"]);
    let all = etcd.endpoints_toml(&[0, 1, 2]);
    let rt = "unix:///nonexistent.sock";
    let n1 = node(rt, &registry, &all, "node1");
    let n2 = node(rt, &registry, &all, "node2");
    // Node 3 knows only member 2: when that member is down, node 3 is cut off.
    let n3 = node(rt, &registry, &etcd.endpoints_toml(&[2]), "node3");
    n1.cli_ok(&["stream", "create", "team-a/app"]);
    n1.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    for n in [&n1, &n2, &n3] {
        wait_resolves(n, &v1, "with three members");
    }

    // One member killed: writes and resolution carry on for nodes that know the others.
    etcd.kill9(0);
    let out = set_tag(&n2, &registry.image_ref("app:v2"));
    assert!(
        out.status.success(),
        "a write with one member of three down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in [&n1, &n2, &n3] {
        wait_resolves(n, &v2, "with member 0 down");
    }
    etcd.start_again(0);

    // Node 3's only member down: it keeps resolving what it had; the others move on.
    etcd.kill9(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = set_tag(&n1, &registry.image_ref("app:v3"));
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "write with member 2 down: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_resolves(&n2, &v3, "node 2 with member 2 down");
    assert_eq!(
        resolved(&n3).as_deref(),
        Some(v2.as_str()),
        "node 3 is cut off"
    );
    assert!(!set_tag(&n3, &registry.image_ref("app:v1")).status.success());
    // Member 2 back: node 3 catches up without a restart.
    etcd.start_again(2);
    let took = wait_resolves(&n3, &v3, "node 3 after member 2 returned");
    eprintln!("node 3 caught up {took:?} after its member was back");
    let h = history(&n3);
    assert_eq!(h.len(), 3, "{h:?}");
    dense_generations(&h, "history");
}

#[test]
fn nodes_reach_a_tls_etcd_with_a_client_certificate_and_not_without() {
    let etcd = Etcd::start_tls();
    let tls = etcd.tls.clone().expect("TLS files");
    let url = etcd.members[0].client_url.clone();
    assert!(url.starts_with("https://"));
    let config = |with_cert: bool| {
        let mut c = format!(
            "store = \"etcd\"\netcd_endpoints = [{url:?}]\netcd_ca_file = {:?}\nprefetch = false\n",
            tls.ca.display().to_string()
        );
        if with_cert {
            c.push_str(&format!(
                "etcd_cert_file = {:?}\netcd_key_file = {:?}\n",
                tls.client_cert.display().to_string(),
                tls.client_key.display().to_string()
            ));
        }
        c
    };
    let good = Daemon::start_with_config("unix:///nonexistent.sock", &[], &[], &config(true));
    good.cli_ok(&["stream", "create", "team-a/app"]);
    let s = status(&good);
    assert_eq!(s["connected"], true, "{s}");
    let keys = etcd.etcdctl(&["get", "--prefix", "--keys-only", "/imagestream/streams/"]);
    assert!(keys.contains("/imagestream/streams/team-a/app"), "{keys}");

    // Without a client certificate etcd refuses the node: writes fail, the node says why.
    let bad = Daemon::start_with_config("unix:///nonexistent.sock", &[], &[], &config(false));
    let out = bad.cli(&["stream", "create", "team-a/other"]);
    assert!(
        !out.status.success(),
        "etcd must refuse a node without a client certificate"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&url), "the error names the endpoint: {err}");
    assert_eq!(status(&bad)["connected"], false);
}

#[test]
fn a_watch_from_a_compacted_revision_lists_again() {
    use imagestream::store::etcd::{feed, ClusterStatus, EtcdSettings, EtcdStore};
    use imagestream::store::{Expect, StreamStore};
    use imagestream::stream::model::{Stream, StreamKey};
    use imagestream::stream::resolve::View;
    use std::sync::Arc;

    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = Arc::new(
            EtcdStore::connect(EtcdSettings {
                endpoints: vec![etcd.members[0].client_url.clone()],
                prefix: "/imagestream/".into(),
                ca_file: None,
                cert_file: None,
                key_file: None,
                lease_ttl_secs: 3,
                node_name: "test".into(),
            })
            .await
            .expect("client"),
        );
        let mut last = 0;
        for name in ["a", "b", "c"] {
            let written = store
                .put(
                    &Stream::new(&StreamKey::new("team-a", name), false),
                    Expect::Absent,
                )
                .await
                .expect("put");
            last = written.revision.expect("etcd revision");
        }
        // Everything up to the last write is compacted: a watch from revision 2 cannot start.
        etcd.etcdctl(&["compact", &last.to_string()]);
        let view = View::default();
        let status = Arc::new(ClusterStatus::new(store.endpoints()));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(feed(
            store.clone(),
            view.clone(),
            status.clone(),
            dir.path().to_path_buf(),
            Some(1),
            stop_rx,
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while view.load().streams().count() < 3 {
            assert!(
                Instant::now() < deadline,
                "the feed did not list again after the compaction: {:?}",
                status.report()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(status.report().revision >= last);
        let _ = stop_tx.send(true);
        let _ = task.await;
    });
    assert!(
        dir.path()
            .join(imagestream::store::etcd::VIEW_CACHE_FILE)
            .exists(),
        "the listed view is saved"
    );
}

#[test]
fn every_node_prefetches_a_tag_moved_on_another_node() {
    let etcd = Etcd::start();
    let registry = Registry::start();
    let v1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let eps = etcd.endpoints_toml(&[0]);
    let config = |name: &str| {
        format!(
            "store = \"etcd\"\n{eps}node_name = \"{name}\"\nmirror_upstreams = [\"http://{}\"]\n",
            registry.addr
        )
    };
    let n1 = Daemon::start_with_config(
        "unix:///nonexistent.sock",
        &[&registry.addr],
        &[],
        &config("node1"),
    );
    let n2 = Daemon::start_with_config(
        "unix:///nonexistent.sock",
        &[&registry.addr],
        &[],
        &config("node2"),
    );
    n1.cli_ok(&["stream", "create", "team-a/app"]);
    n1.cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    // Node 2 learns of the move only through etcd, and fills its own cache.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ls = n2.cli_json(&["cache", "ls"]);
        let text = ls.to_string();
        if text.contains(v1.as_str()) && ls.as_array().is_some_and(|a| a.len() >= 3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 2 did not prefetch the image: {ls}\n{}",
            n2.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_signature_policy_set_on_one_node_holds_on_every_node() {
    let etcd = Etcd::start();
    let registry = Registry::start();
    let ctd = RuntimeBed::start(&registry);
    let v1 = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let eps = etcd.endpoints_toml(&[0]);
    let nodes: Vec<Daemon> = (1..=2)
        .map(|i| node(&ctd.endpoint(), &registry, &eps, &format!("node{i}")))
        .collect();
    let key = common::cosign::CosignKey::generate();
    nodes[0].cli_ok(&["stream", "create", "team-a/app"]);
    nodes[0].cli_ok(&[
        "tag",
        "set",
        "team-a/app:prod",
        &registry.image_ref("app:v1"),
    ]);
    nodes[0].cli_ok(&[
        "stream",
        "policy",
        "team-a/app",
        "--key",
        &key.public.display().to_string(),
        "--mode",
        "enforce",
    ]);
    nodes[1].wait_for("node 2 to see the policy", Duration::from_secs(20), || {
        nodes[1].cli_json(&["stream", "get", "team-a/app"])["effective_policy"]["mode"] == "enforce"
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let err = rt
        .block_on(cri_pull_image(&nodes[1].cri_socket, STREAM_REF))
        .expect_err("node 2 refuses the unverified generation");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");

    common::cosign::sign(&key, &format!("{}/app@{v1}", registry.addr));
    nodes[0].cli_ok(&["tag", "verify", "team-a/app:prod"]);
    nodes[1].wait_for(
        "node 2 to run the verified generation",
        Duration::from_secs(20),
        || match rt.block_on(cri_pull_image(&nodes[1].cri_socket, STREAM_REF)) {
            Ok(image_ref) => !image_ref.is_empty(),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
                false
            }
        },
    );
}
