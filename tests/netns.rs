//! The multi-node test bed ([`common::netns`]): a LAN of network namespaces on one machine, a
//! registry on one host and two nodes, each with containerd 2 and imagestream, on the others.
//! Each node's containerd pulls through its own node's mirror; without peers, the registry
//! serves every blob once per node. Everything (namespaces, veths, bridge, processes) is gone
//! after the Lan is dropped. Needs root (namespaces, containerd).

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::etcd::Etcd;
use common::mirror::*;
use common::netns::{link_names, netns_names, Lan, NetHost};
use common::*;

const PULL_TIMEOUT: Duration = Duration::from_secs(120);

/// The nsfs inode of a network namespace: of `/run/netns/NAME`, or of `/proc/PID/ns/net`.
fn netns_inode(path: &str) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {path}: {e}"))
        .ino()
}

fn assert_in_netns(pid: u32, host: &NetHost, what: &str) {
    assert_eq!(
        netns_inode(&format!("/proc/{pid}/ns/net")),
        netns_inode(&format!("/run/netns/{}", host.netns)),
        "{what} (pid {pid}) is not in network namespace {}",
        host.netns
    );
}

/// Client addresses of the registry's successful GETs of `blob` (the access log's first field).
fn blob_get_clients(registry: &Registry, blob: &str) -> Vec<String> {
    // Let the log settle first (the line is written just after the body).
    let _ = registry.access_log();
    let text = std::fs::read_to_string(registry.dir.join("registry.log"))
        .expect("read the registry's log");
    text.lines()
        .filter(|l| AccessLogEntry::parse(l).is_some_and(|e| e.successful_blob_get() == Some(blob)))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

fn assert_lan_gone(bridge: &str, ips: &[String]) {
    let prefix = format!("{bridge}-");
    let left: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left after Lan drop: {left:?}");
    let links: Vec<String> = link_names()
        .into_iter()
        .filter(|l| l.starts_with(bridge))
        .collect();
    assert!(links.is_empty(), "links left after Lan drop: {links:?}");
    for ip in ips {
        // `ip route get` sends nothing: after the drop no local interface leads to the address
        // (a connect attempt would follow the default route off the machine).
        assert!(
            !Lan::routes_to(bridge, ip),
            "{ip} still routed through {bridge} after Lan drop"
        );
    }
}

#[test]
fn lans_get_their_own_subnets_reach_each_other_and_leave_nothing() {
    require_root("network namespace LANs");
    let t0 = Instant::now();
    let a = Lan::new();
    let b = Lan::new();
    assert_ne!(a.bridge, b.bridge);
    assert_ne!(a.subnet(), b.subnet(), "two Lans share a subnet");
    let a1 = a.host("one");
    let a2 = a.host("two");
    let b1 = b.host("one");
    assert_eq!(a1.ip, format!("{}.2", a.prefix));
    assert_eq!(a2.ip, format!("{}.3", a.prefix));
    eprintln!(
        "Lan {} {} and {} {}: made in {:?}",
        a.bridge,
        a.subnet(),
        b.bridge,
        b.subnet(),
        t0.elapsed()
    );

    // A listener in a2's namespace: the test's namespace, a1 (same LAN) reach it.
    let mut listener = a2
        .command("socat")
        .arg(format!("TCP-LISTEN:7000,bind={},reuseaddr,fork", a2.ip))
        .arg("EXEC:/bin/true")
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start socat in a netns");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(
        &a2.addr(7000).parse().expect("socket address"),
        Duration::from_millis(200),
    )
    .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "host netns cannot reach {}",
            a2.addr(7000)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        a1.can_connect(&a2.addr(7000), Duration::from_secs(5)),
        "a1 cannot reach a2"
    );
    // The gateway (.1, the test's namespace) from inside.
    let gw_listener = std::net::TcpListener::bind(format!("{}:0", a.gateway)).expect("bind .1");
    let gw_addr = gw_listener.local_addr().expect("local addr").to_string();
    assert!(
        a1.can_connect(&gw_addr, Duration::from_secs(5)),
        "a1 cannot reach the gateway {gw_addr}"
    );
    // Inside a namespace only lo and eth0 exist.
    let out = a1
        .command("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link in netns");
    let links = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        links.lines().count(),
        2,
        "links inside {}: {links}",
        a1.netns
    );
    let _ = b1;

    let _ = listener.kill();
    let _ = listener.wait();
    let (a_bridge, b_bridge) = (a.bridge.clone(), b.bridge.clone());
    let t1 = Instant::now();
    drop(a);
    drop(b);
    eprintln!("two Lans dropped in {:?}", t1.elapsed());
    assert_lan_gone(&a_bridge, &[a1.ip, a2.ip]);
    assert_lan_gone(&b_bridge, &[b1.ip]);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_each_pull_every_blob_through_their_own_mirror() {
    require_root("a multi-node test bed");
    let t0 = Instant::now();
    let lan = Lan::new();
    let reg_host = lan.host("registry");
    let nodes = [lan.host("node1"), lan.host("node2")];
    eprintln!("lan {} {}: {:?}", lan.bridge, lan.subnet(), t0.elapsed());

    // The registry on its own host; the test pushes to it over the LAN.
    let registry = Registry::start_in(&reg_host);
    assert_eq!(registry.addr, reg_host.addr(5000));
    for n in &nodes {
        assert!(
            n.can_connect(&registry.addr, Duration::from_secs(5)),
            "{} cannot reach the registry {}",
            n.netns,
            registry.addr
        );
    }
    // etcd listens on loopback in the test's namespace; the nodes reach it at the gateway.
    let etcd = Etcd::start();
    let etcd_local = etcd.members[0]
        .client_url
        .trim_start_matches("http://")
        .to_string();
    let etcd_lan = lan.expose(&etcd_local);
    for n in &nodes {
        let out = n
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                &format!("http://{etcd_lan}/health"),
            ])
            .output()
            .expect("curl in a netns");
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            body.contains("\"health\":\"true\""),
            "{}: etcd at {etcd_lan}: {body} {}",
            n.netns,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("registry and etcd up: {:?}", t0.elapsed());

    let img = push_random_image_to(&registry.addr, "app:v1", &[512 * KIB, 256 * KIB]);
    push_pause_image(&registry);
    push_image(&registry, "tool", "v1", "v1", &["/bin/sleep", "infinity"]);
    eprintln!("images pushed: {:?}", t0.elapsed());

    let mut beds = Vec::new();
    let mut daemons = Vec::new();
    for n in &nodes {
        let bed = RuntimeBed::start_kind_in(
            RuntimeKind::Containerd2,
            &registry.addr,
            BedOptions::default(),
            n,
        );
        assert_in_netns(bed.pid().expect("containerd pid"), n, "containerd");
        let d = Daemon::start_in(n, &bed.endpoint(), &[&registry.addr], &[]);
        assert_eq!(d.mirror_addr, n.addr(5050));
        assert_in_netns(d.pid().expect("imagestream pid"), n, "imagestream");
        let hosts = d.route_through_mirror(&bed, &registry.addr);
        assert!(
            hosts.contains(&d.mirror_url()),
            "hosts.toml does not name the mirror {}:\n{hosts}",
            d.mirror_url()
        );
        beds.push(bed);
        daemons.push(d);
    }
    eprintln!("two nodes up: {:?}", t0.elapsed());

    let reference = registry.image_ref("app:v1");
    for (n, d) in nodes.iter().zip(&daemons) {
        let t = Instant::now();
        let id = tokio::time::timeout(PULL_TIMEOUT, cri_pull_image(&d.cri_socket, &reference))
            .await
            .unwrap_or_else(|_| panic!("{}: PullImage timed out\n{}", n.netns, d.log_tail()))
            .unwrap_or_else(|e| panic!("{}: PullImage failed: {e}\n{}", n.netns, d.log_tail()));
        assert_eq!(
            id, img.config,
            "{}: PullImage returned another image",
            n.netns
        );
        eprintln!("{}: pulled in {:?}", n.netns, t.elapsed());
    }

    // Without peers each node's mirror fetches every blob from the registry: 2 per blob,
    // one from each node's address, all by imagestream.
    let direct = registry.blob_gets_not_by("imagestream/");
    assert!(
        direct.is_empty(),
        "blobs fetched by the runtime itself, not through a mirror: {direct:?}"
    );
    let gets = registry.blob_gets();
    for blob in img.blobs().iter().skip(1) {
        assert_eq!(
            gets.get(blob).copied().unwrap_or(0),
            2,
            "registry GETs of {blob} (one per node expected): {gets:?}"
        );
        let clients: BTreeSet<String> = blob_get_clients(&registry, blob).into_iter().collect();
        let expected: BTreeSet<String> = nodes.iter().map(|n| n.ip.clone()).collect();
        assert_eq!(clients, expected, "clients that fetched {blob}");
    }
    // The test reads each mirror's /metrics over the LAN.
    for d in &daemons {
        assert!(
            d.metrics().contains("imagestream_"),
            "no imagestream metrics at {}",
            d.mirror_addr
        );
    }

    // A host-network pod on node1: its container lives in node1's namespace.
    let logs = tempfile::tempdir().expect("pod log dir");
    let (mut rt, ctr) = start_sleeping_container(
        &daemons[0].cri_socket,
        &registry.image_ref("tool:v1"),
        "netns-pod",
        logs.path(),
    )
    .await;
    let status = rt
        .container_status(k8s_cri::v1::ContainerStatusRequest {
            container_id: ctr.clone(),
            verbose: true,
        })
        .await
        .expect("ContainerStatus")
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(
        status
            .info
            .get("info")
            .expect("verbose ContainerStatus has info"),
    )
    .expect("container info is JSON");
    let pid = info["pid"].as_u64().expect("container pid") as u32;
    assert_in_netns(pid, &nodes[0], "the container");
    for (pid, cmd) in processes_mentioning(&beds[0].dir) {
        if cmd.contains("containerd-shim") {
            assert_in_netns(pid, &nodes[0], "a shim");
        }
    }
    eprintln!("pod checked: {:?}", t0.elapsed());

    let bridge = lan.bridge.clone();
    let mut ips: Vec<String> = nodes.iter().map(|n| n.ip.clone()).collect();
    ips.push(reg_host.ip.clone());
    let t1 = Instant::now();
    drop(rt);
    drop(daemons);
    drop(beds);
    drop(registry);
    drop(etcd);
    drop(lan);
    eprintln!("torn down in {:?}; total {:?}", t1.elapsed(), t0.elapsed());
    assert_lan_gone(&bridge, &ips);
}
