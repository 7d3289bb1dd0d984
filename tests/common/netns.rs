//! A multi-node test bed on one machine: a private LAN of network namespaces.
//!
//! Peer-to-peer layer sharing needs several "nodes", each with its own runtime, imagestream
//! daemon and address, that reach each other over a real network. One machine can host them
//! all with network namespaces, without any traffic leaving it:
//!
//! ```text
//!   host netns (the test process, etcd, CLI, unix sockets)
//!     bridge isb<pid36>-<n>  10.A.B.1/24        A in 200..=254, B in 0..=255: one /24 per Lan
//!       ├── veth <bridge>v2 ── netns <bridge>-registry   eth0 10.A.B.2/24, lo, default via .1
//!       ├── veth <bridge>v3 ── netns <bridge>-node1      eth0 10.A.B.3/24  (containerd + imagestream)
//!       └── veth <bridge>v4 ── netns <bridge>-node2      eth0 10.A.B.4/24  (containerd + imagestream)
//! ```
//!
//! - [`Lan::new`] creates the bridge with a name unique among live processes (the pid in base
//!   36 and a per-process counter, at most 15 bytes) and a /24 that no interface of the host
//!   uses yet (checked with `ip -o addr` before and after taking it, so parallel tests in one
//!   process or in several do not collide). The host side is `.1`; IPv4 forwarding is switched
//!   off on the bridge, so a namespace's default route via `.1` never leads off the machine.
//! - [`Lan::host`] adds a named namespace (`ip netns add`) with a veth into the bridge, `.N/24`,
//!   `lo` up and a default route via `.1`. The test process (host netns) reaches every
//!   [`NetHost::ip`], the hosts reach each other (L2 on the bridge) and `.1` ([`Lan::gateway`]).
//! - [`Lan::expose`] makes a loopback service of the host namespace (etcd of
//!   [`super::etcd`] listens on 127.0.0.1) reachable at `.1:PORT` with a `socat` forwarder.
//! - The harness runs its services in a host on request (callers that do not opt in are
//!   unchanged): [`super::Registry::start_in`] (docker-registry on `<ip>:5000`),
//!   [`super::RuntimeBed::start_in`] / [`super::RuntimeBed::start_kind_in`] (the runtime, its
//!   shims and host-network containers in the netns), [`super::daemon::Daemon::start_in`]
//!   (imagestream with its mirror on `<ip>:5050`, reachable by the runtime in the netns and by
//!   the test for `/metrics`; its unix sockets are files, reachable from any namespace).
//!
//! Processes enter a namespace with `nsenter --net=/run/netns/NAME` ([`command_in`]), not
//! `ip netns exec`: the latter also unshares the mount namespace and remounts `/sys` for the
//! netns, which hides `/sys/fs/cgroup`; runc (started by containerd's shim) then fails with
//! "no cgroup mount found in mountinfo", and mounts a runtime makes (overlay rootfs, shm) would
//! live in a private mount namespace the harness's cleanup cannot see. `nsenter --net` changes
//! only the network namespace and execs the program, so the child's pid is the program's.
//!
//! `Drop` of a [`Lan`] kills every process left in its namespaces (`ip netns pids`) and the
//! forwarders it started, deletes the namespaces (and with them the veths) and the bridge. A
//! leftover of a crashed run under the same name (a dead process with the same pid) is removed
//! first. Declare the `Lan` before the services that run in it, so that they are dropped (and
//! stop cleanly) before it.

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{require_binary, require_root, run, send_signal};

/// A command that runs `program` in the network namespace `netns` (a name under `/run/netns`),
/// or in the current one when `netns` is `None` (plain `Command::new(program)`).
pub fn command_in(netns: Option<&str>, program: impl AsRef<OsStr>) -> Command {
    match netns {
        None => Command::new(program),
        Some(name) => {
            let mut c = Command::new(require_binary("nsenter", "util-linux"));
            c.arg(format!("--net=/run/netns/{name}"))
                .arg("--")
                .arg(program);
            c
        }
    }
}

/// One "machine" of a [`Lan`]: a network namespace with one address on the LAN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetHost {
    /// The namespace's name (`/run/netns/<netns>`).
    pub netns: String,
    /// Its address on the LAN, e.g. "10.213.7.3".
    pub ip: String,
}

impl NetHost {
    /// A command that runs `program` inside this host's network namespace (see [`command_in`]).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(Some(&self.netns), program)
    }

    /// "<ip>:<port>"
    pub fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }

    /// Whether a TCP connection from inside this host to `addr` ("IP:PORT") succeeds within
    /// `timeout` (bash's `/dev/tcp`).
    pub fn can_connect(&self, addr: &str, timeout: Duration) -> bool {
        let (ip, port) = addr
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("can_connect: {addr:?} is not IP:PORT"));
        self.command("timeout")
            .arg(format!("{}", timeout.as_secs_f64()))
            .args(["bash", "-c", &format!(": > /dev/tcp/{ip}/{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

/// A private LAN: a bridge in the host namespace and the [`NetHost`]s plugged into it.
pub struct Lan {
    /// The bridge's name (at most 15 bytes).
    pub bridge: String,
    /// The first three octets of the /24, e.g. "10.213.7".
    pub prefix: String,
    /// The host namespace's address on the bridge ("<prefix>.1").
    pub gateway: String,
    hosts: Mutex<Vec<NetHost>>,
    next_octet: AtomicU32,
    forwarders: Mutex<Vec<Child>>,
}

static LAN_COUNTER: AtomicU32 = AtomicU32::new(0);

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("base36 digits are ASCII")
}

/// `ip ARGS`, panicking with its output on failure; returns stdout.
fn ip(args: &[&str]) -> String {
    run(
        Command::new("ip").args(args),
        &format!("ip {}", args.join(" ")),
    )
}

/// `ip ARGS`, ignoring failure (cleanup of things that may not exist).
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Names of the network namespaces under /run/netns (`ip netns list`).
pub fn netns_names() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .stdin(Stdio::null())
        .output()
        .expect("run ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

/// Names of the links of the host namespace (`ip -o link`), without the `@peer` suffix.
pub fn link_names() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .stdin(Stdio::null())
        .output()
        .expect("run ip -o link show");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// Interfaces of the host namespace holding an IPv4 address that starts with `prefix.`.
fn interfaces_with_prefix(prefix: &str) -> Vec<String> {
    let needle = format!("inet {prefix}.");
    ip(&["-o", "-4", "addr", "show"])
        .lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
        .collect()
}

/// Whether `prefix.0/24` is routed anywhere in the host namespace.
fn prefix_routed(prefix: &str) -> bool {
    ip(&["-4", "route", "show"])
        .lines()
        .any(|l| l.starts_with(&format!("{prefix}.")))
}

/// Kills every process in network namespace `netns` (`ip netns pids`) and waits for them.
fn kill_netns_processes(netns: &str) {
    let me = std::process::id();
    for _ in 0..3 {
        let out = Command::new("ip")
            .args(["netns", "pids", netns])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        let pids: Vec<u32> = out
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .filter(|p| *p != me)
                    .collect()
            })
            .unwrap_or_default();
        if pids.is_empty() {
            return;
        }
        send_signal(&pids, "KILL");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && pids.iter().any(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .map(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.starts_with(" Z")))
                    .unwrap_or(false)
            })
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes a Lan's namespaces, veths and bridge named after `bridge` (this Lan's or a crashed
/// run's leftover of the same name).
fn remove_lan_named(bridge: &str) {
    let ns_prefix = format!("{bridge}-");
    for ns in netns_names() {
        if ns.starts_with(&ns_prefix) {
            kill_netns_processes(&ns);
            ip_quiet(&["netns", "delete", &ns]);
        }
    }
    let veth_prefix = format!("{bridge}v");
    for link in link_names() {
        if link.starts_with(&veth_prefix) {
            ip_quiet(&["link", "delete", &link]);
        }
    }
    if link_names().iter().any(|l| l == bridge) {
        ip_quiet(&["link", "delete", bridge]);
    }
}

impl Lan {
    /// A new bridge with a /24 of its own, `.1` on the host side.
    pub fn new() -> Lan {
        require_root("a network namespace LAN");
        require_binary("ip", "iproute2");
        require_binary("nsenter", "util-linux");
        let pid = std::process::id();
        let n = LAN_COUNTER.fetch_add(1, Ordering::Relaxed);
        let bridge = format!("isb{}-{}", base36(u64::from(pid)), base36(u64::from(n)));
        assert!(
            bridge.len() + 3 <= 15,
            "bridge name {bridge} leaves no room for veth names (15 bytes)"
        );
        remove_lan_named(&bridge);
        ip(&["link", "add", "name", &bridge, "type", "bridge"]);
        // No forwarding from the LAN to anywhere else: the hosts' default route via .1 stays
        // on this machine (the bridge itself switches between the hosts at L2).
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv4/conf/{bridge}/forwarding"),
            "0\n",
        );
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6"),
            "1\n",
        );
        ip(&["link", "set", &bridge, "up"]);

        // 55 * 256 subnets 10.200.0.0/24 .. 10.254.255.0/24; start where pid and counter point
        // and take the first one no interface or route uses.
        const SPACE: u32 = 55 * 256;
        let start = (pid.wrapping_mul(2_654_435_761) ^ n.wrapping_mul(40_503)) % SPACE;
        for i in 0..SPACE {
            let idx = (start + i * 97) % SPACE;
            let prefix = format!("10.{}.{}", 200 + idx / 256, idx % 256);
            if !interfaces_with_prefix(&prefix).is_empty() || prefix_routed(&prefix) {
                continue;
            }
            let gateway = format!("{prefix}.1");
            let cidr = format!("{gateway}/24");
            if Command::new("ip")
                .args(["addr", "add", &cidr, "dev", &bridge])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
            {
                continue;
            }
            // Someone else may have taken the same /24 at the same time: the one that finds
            // another interface with it gives it up (both may, then both move on).
            std::thread::sleep(Duration::from_millis(20));
            let holders = interfaces_with_prefix(&prefix);
            if holders.iter().any(|h| h != &bridge) {
                ip_quiet(&["addr", "del", &cidr, "dev", &bridge]);
                continue;
            }
            return Lan {
                bridge,
                prefix,
                gateway,
                hosts: Mutex::new(Vec::new()),
                next_octet: AtomicU32::new(2),
                forwarders: Mutex::new(Vec::new()),
            };
        }
        remove_lan_named(&bridge);
        panic!("no free /24 in 10.200.0.0 - 10.254.255.0 for a test LAN");
    }

    /// A new host `name` (letters, digits, `-`) on the LAN: netns `<bridge>-<name>`, address
    /// `<prefix>.N` (N = 2, 3, … in order of creation).
    pub fn host(&self, name: &str) -> NetHost {
        assert!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "host name {name:?}: letters, digits and '-' only"
        );
        let octet = self.next_octet.fetch_add(1, Ordering::Relaxed);
        assert!(octet < 255, "a test LAN holds at most 253 hosts");
        let netns = format!("{}-{name}", self.bridge);
        let veth = format!("{}v{octet}", self.bridge);
        let peer = format!("{}p{octet}", self.bridge);
        assert!(
            veth.len() <= 15 && peer.len() <= 15,
            "veth name {veth} too long"
        );
        let host = NetHost {
            netns: netns.clone(),
            ip: format!("{}.{octet}", self.prefix),
        };
        // Registered first, so that Drop removes a half-made host too.
        self.hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(host.clone());
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", &peer, "netns", &netns,
        ]);
        ip(&["link", "set", &veth, "master", &self.bridge]);
        ip(&["link", "set", &veth, "up"]);
        ip(&["-n", &netns, "link", "set", &peer, "name", "eth0"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/24", host.ip),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &self.gateway,
        ]);
        host
    }

    /// The hosts made so far.
    pub fn hosts(&self) -> Vec<NetHost> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// "<prefix>.0/24"
    pub fn subnet(&self) -> String {
        format!("{}.0/24", self.prefix)
    }

    /// Makes `local` ("127.0.0.1:PORT", a service of the host namespace, e.g. an etcd member's
    /// client URL without `http://`) reachable from the hosts at `<gateway>:PORT`, with a
    /// `socat` forwarder that lives as long as the Lan. Returns "<gateway>:PORT".
    pub fn expose(&self, local: &str) -> String {
        use std::os::unix::process::CommandExt;
        let socat = require_binary("socat", "socat");
        let port = local
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("expose: {local:?} is not HOST:PORT"));
        let public = format!("{}:{port}", self.gateway);
        let child = Command::new(&socat)
            .arg(format!(
                "TCP-LISTEN:{port},bind={},reuseaddr,fork",
                self.gateway
            ))
            .arg(format!("TCP:{local}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", socat.display()));
        self.forwarders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        let addr: SocketAddr = public.parse().expect("gateway:port is a socket address");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "socat forwarder {public} -> {local} not accepting after 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        public
    }

    /// Whether the host namespace routes `ip` through this Lan's bridge (`ip route get`): false
    /// once the Lan is gone. Sends no packet.
    pub fn routes_to(bridge: &str, ip_addr: &str) -> bool {
        Command::new("ip")
            .args(["-o", "route", "get", ip_addr])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).contains(&format!("dev {bridge} "))
                    && o.status.success()
            })
            .unwrap_or(false)
    }
}

impl Default for Lan {
    fn default() -> Self {
        Lan::new()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for mut child in self
            .forwarders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            // The forwarder and the children it forked share its process group.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_lan_named(&self.bridge);
        if Path::new(&format!("/sys/class/net/{}", self.bridge)).exists() {
            eprintln!(
                "harness: bridge {} still exists after Lan drop",
                self.bridge
            );
        }
    }
}
