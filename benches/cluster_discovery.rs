//! Benchmark: what peer discovery through etcd costs etcd, for N simulated nodes (default 1,000)
//! and the blob-placement alternatives (issue 20). One real etcd (Debian `etcd-server`, one
//! member on loopback) from the test harness; the nodes are simulated in this process with
//! `etcd-client`, each as the design of `src/peer/discovery.rs` has it:
//!
//! - a lease (TTL `IMAGESTREAM_SIM_TTL`, default 10 s), the key `<prefix>peers/<node>` with a
//!   small JSON value under it, and a keepalive every TTL/3 on its own keepalive stream;
//! - one list of `<prefix>peers/` and one watch stream on it from the list's revision + 1.
//!
//! The simulated nodes share `IMAGESTREAM_SIM_CLIENTS` (default 8) etcd clients, i.e. HTTP/2
//! connections; every node still has its own watch stream and its own keepalive stream.
//!
//! Phases, all timed here and measured on etcd's side through its `/metrics` and the CPU time
//! of its process (`/proc/<pid>/stat`):
//! 1. Join: every node opens its watch first (the cold start of a whole cluster, so all N x N
//!    arrivals go through the watches), then every node registers at once; the time until all
//!    puts are acknowledged and until every watcher sees all N peers.
//! 2. Steady state for `IMAGESTREAM_SIM_STEADY_SECS` (default 20): keepalives, raft
//!    proposals, etcd CPU and memory.
//! 3. Churn: 10 % of the nodes revoke their lease and stop watching, then register and list +
//!    watch again; the time until the watchers converge, and the proposals it took.
//! 4. The rejected design, one key per (node, blob): `IMAGESTREAM_SIM_BLOB_KEYS` (default
//!    100,000) keys `<prefix>holds/<node>/<digest>` under the nodes' leases, in txns of 128
//!    puts; writes/s, db size and RSS growth, a full list; extrapolated to 1,000 x 10,000.
//! 5. Rendezvous hashing on one node: the top 3 of the N nodes by sha256(node || digest) for
//!    `IMAGESTREAM_SIM_BLOBS` (default 10,000) digests.
//!
//! Run: `cargo bench --bench cluster_discovery` (root; Debian `etcd-server`). Timings are
//! printed, never asserted. Results and their reading: `docs/cluster-discovery-sim.md`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::etcd::Etcd;
use etcd_client::{
    Client, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

const PREFIX: &str = "/imagestream/";
/// etcd's default `--max-txn-ops`.
const TXN_OPS: usize = 128;
/// Nodes and blobs of the extrapolation.
const TARGET_NODES: f64 = 1000.0;
const TARGET_BLOBS: f64 = 10_000.0;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

fn peers_prefix() -> String {
    format!("{PREFIX}peers/")
}

fn blob_digest(i: usize) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(i.to_le_bytes())))
}

// ---------------------------------------------------------------------------------------------
// etcd's side: /metrics and /proc
// ---------------------------------------------------------------------------------------------

/// The unlabeled series of etcd's `/metrics` (name -> value).
#[derive(Clone, Default)]
struct Metrics(HashMap<String, f64>);

impl Metrics {
    fn scrape(client_url: &str) -> Metrics {
        let addr = client_url.trim_start_matches("http://");
        let mut text = String::new();
        // HTTP/1.0: no chunked encoding, the body ends when the server closes.
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
            let _ = s.read_to_string(&mut text);
        }
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let mut m = HashMap::new();
        for line in body.lines() {
            if line.starts_with('#') || line.contains('{') {
                continue;
            }
            if let Some((name, value)) = line.split_once(' ') {
                if let Ok(v) = value.trim().parse::<f64>() {
                    m.insert(name.to_string(), v);
                }
            }
        }
        Metrics(m)
    }

    fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(f64::NAN)
    }

    /// The first of `names` that etcd exports (names moved between 3.4 and 3.5).
    fn any(&self, names: &[&str]) -> f64 {
        names
            .iter()
            .find_map(|n| self.0.get(*n).copied())
            .unwrap_or(f64::NAN)
    }

    fn proposals(&self) -> f64 {
        self.get("etcd_server_proposals_committed_total")
    }
    fn db_bytes(&self) -> f64 {
        self.any(&[
            "etcd_mvcc_db_total_size_in_bytes",
            "etcd_debugging_mvcc_db_total_size_in_bytes",
        ])
    }
    fn keys(&self) -> f64 {
        self.any(&["etcd_debugging_mvcc_keys_total", "etcd_mvcc_keys_total"])
    }
    fn rss(&self) -> f64 {
        self.get("process_resident_memory_bytes")
    }
    fn watchers(&self) -> f64 {
        self.get("etcd_debugging_mvcc_watcher_total")
    }
    fn watch_streams(&self) -> f64 {
        self.get("etcd_debugging_mvcc_watch_stream_total")
    }
    fn sent_bytes(&self) -> f64 {
        self.get("etcd_network_client_grpc_sent_bytes_total")
    }
    fn recv_bytes(&self) -> f64 {
        self.get("etcd_network_client_grpc_received_bytes_total")
    }
    fn fsyncs(&self) -> f64 {
        self.get("etcd_disk_wal_fsync_duration_seconds_count")
    }
    fn renewed(&self) -> f64 {
        self.get("etcd_debugging_lease_renewed_total")
    }
}

/// The etcd process serving `client_url` (its command line names the URL).
fn etcd_pid(client_url: &str) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_etcd = args.first().map(|a| a.ends_with(b"etcd")).unwrap_or(false);
        if is_etcd && args.contains(&client_url.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

fn cpu_secs(pid: Option<u32>) -> f64 {
    pid.map(|p| common::process_cpu_time(p).as_secs_f64())
        .unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------------------------
// Simulated nodes
// ---------------------------------------------------------------------------------------------

struct Shared {
    n: usize,
    /// How many live peers each node's watcher sees now.
    views: Vec<AtomicUsize>,
    /// Watch events and watch responses delivered to all watchers.
    events: AtomicU64,
    responses: AtomicU64,
    keepalives_sent: AtomicU64,
    keepalives_acked: AtomicU64,
    keepalive_errors: AtomicU64,
    leases_lost: AtomicU64,
    /// Retries of registration steps (grant, put, keepalive open, list, watch).
    retries: AtomicU64,
    /// Watch streams that ended without being cancelled here.
    watch_errors: AtomicU64,
    /// Errors seen, by message.
    errors: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

struct SimNode {
    lease: i64,
    keepalive: Option<JoinHandle<()>>,
    watch: Option<JoinHandle<()>>,
}

fn peer_index(key: &[u8]) -> Option<usize> {
    let name = key.strip_prefix(peers_prefix().as_bytes())?;
    std::str::from_utf8(name.strip_prefix(b"node-")?)
        .ok()?
        .parse()
        .ok()
}

/// Lists the peers once, then watches them from the list's revision + 1; returns when the watch
/// is created, with the task that keeps the node's view of the peers.
async fn open_watch(
    client: Client,
    idx: usize,
    shared: Arc<Shared>,
) -> Result<JoinHandle<()>, etcd_client::Error> {
    let prefix = peers_prefix();
    let list = retry(&shared, idx, "list", || {
        let mut c = client.clone();
        let prefix = prefix.clone();
        async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
    })
    .await?;
    let rev = list.header().map(|h| h.revision()).unwrap_or(0);
    let mut seen = vec![false; shared.n];
    let mut count = 0usize;
    for kv in list.kvs() {
        if let Some(i) = peer_index(kv.key()).filter(|i| *i < shared.n) {
            if !seen[i] {
                seen[i] = true;
                count += 1;
            }
        }
    }
    shared.views[idx].store(count, Ordering::Release);
    let mut stream = retry(&shared, idx, "watch", || {
        let mut c = client.clone();
        let prefix = prefix.clone();
        async move {
            let mut stream = c
                .watch(
                    prefix,
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(rev + 1),
                    ),
                )
                .await?;
            // The first response confirms the watch.
            let created = stream.message().await?;
            if !created.map(|r| r.created()).unwrap_or(false) {
                return Err(etcd_client::Error::WatchError("watch not created".into()));
            }
            Ok(stream)
        }
    })
    .await?;
    Ok(tokio::spawn(async move {
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    shared.watch_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    shared.watch_errors.fetch_add(1, Ordering::Relaxed);
                    note_error(&shared, "watch stream", &e);
                    return;
                }
            };
            if resp.canceled() {
                shared.watch_errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            for ev in resp.events() {
                let Some(i) = ev
                    .kv()
                    .and_then(|kv| peer_index(kv.key()))
                    .filter(|i| *i < shared.n)
                else {
                    continue;
                };
                match ev.event_type() {
                    EventType::Put if !seen[i] => {
                        seen[i] = true;
                        count += 1;
                    }
                    EventType::Delete if seen[i] => {
                        seen[i] = false;
                        count -= 1;
                    }
                    _ => {}
                }
            }
            shared
                .events
                .fetch_add(resp.events().len() as u64, Ordering::Relaxed);
            shared.responses.fetch_add(1, Ordering::Relaxed);
            shared.views[idx].store(count, Ordering::Release);
        }
    }))
}

/// Counts an error by its message (the first 110 characters), for the table.
fn note_error(shared: &Shared, what: &str, e: &etcd_client::Error) {
    let detail = match e {
        etcd_client::Error::GRpcStatus(st) => format!("{:?}: {}", st.code(), st.message()),
        e => e.to_string(),
    };
    let msg: String = format!("{what}: {detail}").chars().take(110).collect();
    *shared
        .errors
        .lock()
        .expect("errors")
        .entry(msg)
        .or_insert(0) += 1;
}

/// Runs `f` until it succeeds, up to 20 attempts, with exponential backoff (50 ms .. 2 s, with
/// a per-node jitter) as a real node would; every retry is counted.
async fn retry<T, F, Fut>(
    shared: &Shared,
    idx: usize,
    what: &str,
    mut f: F,
) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut delay = Duration::from_millis(50);
    let jitter = 1.0 + (idx * 7919 % 100) as f64 / 100.0;
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                note_error(shared, what, &e);
                attempt += 1;
                if attempt >= 20 {
                    return Err(e);
                }
                shared.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay.mul_f64(jitter)).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Lease grant + put of the node's key under it + the keepalive stream, each retried, then the
/// keepalive loop. Returns the lease, the loop and the moment the put was acknowledged.
async fn register(
    client: Client,
    idx: usize,
    ttl: i64,
    period: Duration,
    offset: Duration,
    shared: Arc<Shared>,
) -> Result<(i64, JoinHandle<()>, Instant), etcd_client::Error> {
    let sh = &*shared;
    let lease = retry(sh, idx, "lease grant", || {
        let mut c = client.clone();
        async move { c.lease_grant(ttl, None).await }
    })
    .await?
    .id();
    let name = node_name(idx);
    let value = format!(
        "{{\"name\":\"{name}\",\"addr\":\"10.{}.{}.{}:5051\"}}",
        idx / 65536,
        (idx / 256) % 256,
        idx % 256
    );
    let key = format!("{}{name}", peers_prefix());
    retry(sh, idx, "put", || {
        let mut c = client.clone();
        let (key, value) = (key.clone(), value.clone());
        async move {
            c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
        }
    })
    .await?;
    let put_acked = Instant::now();
    let keepalive = retry(sh, idx, "keepalive open", || {
        let mut c = client.clone();
        async move { c.lease_keep_alive(lease).await }
    })
    .await?;
    let task = spawn_keepalive(client, lease, keepalive, period, offset, shared.clone());
    Ok((lease, task, put_acked))
}

/// The keepalive loop: one request every `period`, the first after `offset` (nodes are not in
/// phase), each awaiting its response. A failed keepalive is counted and the stream opened
/// again at once (which sends a keepalive); "lease not found" counts as a lost lease.
fn spawn_keepalive(
    client: Client,
    lease: i64,
    keepalive: (LeaseKeeper, LeaseKeepAliveStream),
    period: Duration,
    offset: Duration,
    shared: Arc<Shared>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ka = Some(keepalive);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some((keeper, stream)) = ka.as_mut() {
                shared.keepalives_sent.fetch_add(1, Ordering::Relaxed);
                let res = match keeper.keep_alive().await {
                    Err(e) => Err(e),
                    Ok(()) => match stream.message().await {
                        Ok(Some(r)) if r.ttl() > 0 => Ok(()),
                        Ok(Some(_)) => Err(etcd_client::Error::LeaseKeepAliveError(
                            "lease not found (ttl <= 0)".into(),
                        )),
                        Ok(None) => Err(etcd_client::Error::LeaseKeepAliveError(
                            "keepalive stream ended".into(),
                        )),
                        Err(e) => Err(e),
                    },
                };
                match res {
                    Ok(()) => {
                        shared.keepalives_acked.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(e) => {
                        shared.keepalive_errors.fetch_add(1, Ordering::Relaxed);
                        note_error(&shared, "keepalive", &e);
                        if e.to_string().contains("lease not found") {
                            shared.leases_lost.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }
            ka = None;
            shared.keepalives_sent.fetch_add(1, Ordering::Relaxed);
            match client.clone().lease_keep_alive(lease).await {
                Ok(pair) => {
                    shared.keepalives_acked.fetch_add(1, Ordering::Relaxed);
                    ka = Some(pair);
                }
                Err(e) => {
                    shared.keepalive_errors.fetch_add(1, Ordering::Relaxed);
                    note_error(&shared, "keepalive reopen", &e);
                    if e.to_string().contains("lease not found") {
                        shared.leases_lost.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }
    })
}

/// Polls the watchers' views until `done` holds for all of them or `timeout` passes; returns
/// the time it took, or None with how many watchers had converged.
async fn wait_converged(
    shared: &Shared,
    timeout: Duration,
    done: impl Fn(usize, usize) -> bool,
) -> Result<Duration, usize> {
    let start = Instant::now();
    loop {
        let ok = shared
            .views
            .iter()
            .enumerate()
            .filter(|(i, v)| done(*i, v.load(Ordering::Acquire)))
            .count();
        if ok == shared.n {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(ok);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

struct Table(Vec<(String, String, String)>);

impl Table {
    fn row(&mut self, what: &str, value: String, note: &str) {
        self.0.push((what.to_string(), value, note.to_string()));
    }
    fn section(&mut self, title: &str) {
        self.0
            .push((format!("## {title}"), String::new(), String::new()));
    }
    fn print(&self) {
        let rows = || self.0.iter().filter(|r| !r.0.starts_with("## "));
        let w0 = rows().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = rows().map(|r| r.1.len()).max().unwrap_or(0);
        for (a, b, c) in &self.0 {
            if a.starts_with("## ") {
                println!("{a}");
            } else {
                println!("  {a:<w0$}  {b:>w1$}  {c}");
            }
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn rate(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.0}/s", x)
    } else {
        format!("{:.1}/s", x)
    }
}

fn converged(r: Result<Duration, usize>, n: usize) -> String {
    match r {
        Ok(d) => secs(d),
        Err(ok) => format!("TIMEOUT ({ok}/{n} converged)"),
    }
}

// ---------------------------------------------------------------------------------------------
// Rendezvous hashing
// ---------------------------------------------------------------------------------------------

/// The `k` nodes with the highest sha256(node || digest) (first 8 bytes, big-endian).
fn rendezvous_top(nodes: &[String], digest: &str, k: usize) -> Vec<usize> {
    let mut top: Vec<(u64, usize)> = Vec::with_capacity(k + 1);
    for (i, name) in nodes.iter().enumerate() {
        let mut h = Sha256::new();
        h.update(name.as_bytes());
        h.update(digest.as_bytes());
        let out = h.finalize();
        let mut b = [0u8; 8];
        b.copy_from_slice(&out[..8]);
        let score = u64::from_be_bytes(b);
        if top.len() < k || score > top[top.len() - 1].0 {
            let pos = top.partition_point(|(s, _)| *s >= score);
            top.insert(pos, (score, i));
            top.truncate(k);
        }
    }
    top.into_iter().map(|(_, i)| i).collect()
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let n = env_usize("IMAGESTREAM_SIM_NODES", 1000).max(10);
    let n_clients = env_usize("IMAGESTREAM_SIM_CLIENTS", 8).clamp(1, n);
    let ttl = env_usize("IMAGESTREAM_SIM_TTL", 10).max(3) as i64;
    let steady_secs = env_usize("IMAGESTREAM_SIM_STEADY_SECS", 20) as u64;
    let blob_keys = env_usize("IMAGESTREAM_SIM_BLOB_KEYS", 100_000);
    let blobs = env_usize("IMAGESTREAM_SIM_BLOBS", 10_000);
    let converge_timeout = Duration::from_secs(90);

    let etcd = Etcd::start();
    let url = etcd.members[0].client_url.clone();
    let pid = etcd_pid(&url);
    let version = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("etcd Version: ").to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut t = Table(Vec::new());
    t.section(&format!(
        "setup: etcd {version}, 1 member on loopback, {cores} cores shared by etcd and the simulator"
    ));
    t.row("simulated nodes", n.to_string(), "");
    t.row(
        "etcd clients (HTTP/2 connections)",
        n_clients.to_string(),
        "shared by the nodes; 1 watch stream + 1 keepalive stream per node",
    );
    t.row(
        "lease TTL / keepalive period",
        format!("{ttl} s / {:.2} s", ttl as f64 / 3.0),
        "",
    );

    let shared = Arc::new(Shared {
        n,
        views: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        events: AtomicU64::new(0),
        responses: AtomicU64::new(0),
        keepalives_sent: AtomicU64::new(0),
        keepalives_acked: AtomicU64::new(0),
        keepalive_errors: AtomicU64::new(0),
        leases_lost: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        watch_errors: AtomicU64::new(0),
        errors: std::sync::Mutex::new(Default::default()),
    });

    rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..n_clients {
            clients.push(
                Client::connect([url.as_str()], None)
                    .await
                    .expect("connect to etcd"),
            );
        }
        let client_of = |i: usize| clients[i % n_clients].clone();
        let period = Duration::from_secs_f64(ttl as f64 / 3.0);
        let offset_of = |i: usize| period.mul_f64(i as f64 / n as f64);

        // ---- 1. Join ------------------------------------------------------------------------
        let m0 = Metrics::scrape(&url);
        let cpu0 = cpu_secs(pid);
        let t_watch = Instant::now();
        let opens: Vec<_> = (0..n)
            .map(|i| tokio::spawn(open_watch(client_of(i), i, shared.clone())))
            .collect();
        let mut nodes: Vec<SimNode> = Vec::with_capacity(n);
        for h in opens {
            let watch = h.await.expect("join").expect("list + watch");
            nodes.push(SimNode {
                lease: 0,
                keepalive: None,
                watch: Some(watch),
            });
        }
        let watch_setup = t_watch.elapsed();

        let t_join = Instant::now();
        let regs: Vec<_> = (0..n)
            .map(|i| {
                tokio::spawn(register(
                    client_of(i),
                    i,
                    ttl,
                    period,
                    offset_of(i),
                    shared.clone(),
                ))
            })
            .collect();
        let mut last_put = t_join;
        for (i, h) in regs.into_iter().enumerate() {
            let (lease, task, acked) = h.await.expect("join").expect("register");
            last_put = last_put.max(acked);
            nodes[i].lease = lease;
            nodes[i].keepalive = Some(task);
        }
        let registered = last_put - t_join;
        let join_conv = wait_converged(&shared, converge_timeout, |_, v| v == n)
            .await
            .map(|_| t_join.elapsed());
        let join_events = shared.events.load(Ordering::Relaxed);
        let join_responses = shared.responses.load(Ordering::Relaxed);
        let m1 = Metrics::scrape(&url);
        let cpu1 = cpu_secs(pid);

        t.section("1. join (watches opened first, then all nodes register at once)");
        t.row("list + watch setup, all nodes", secs(watch_setup), "");
        t.row(
            "registration (grant + put acked), all nodes",
            secs(registered),
            &format!("{} puts/s", (n as f64 / registered.as_secs_f64()) as u64),
        );
        t.row(
            "every watcher sees all N peers",
            converged(join_conv, n),
            "from the first grant",
        );
        let conv_secs = join_conv.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN);
        t.row(
            "watch events delivered",
            join_events.to_string(),
            &format!("N x N = {}; in {join_responses} responses", n * n),
        );
        t.row(
            "events/s delivered",
            rate(join_events as f64 / conv_secs),
            "",
        );
        t.row(
            "etcd gRPC bytes sent during join",
            mib(m1.sent_bytes() - m0.sent_bytes()),
            &format!(
                "{:.0} B per event",
                (m1.sent_bytes() - m0.sent_bytes()) / join_events.max(1) as f64
            ),
        );
        t.row(
            "etcd CPU during join",
            format!("{:.2} s", cpu1 - cpu0),
            &format!("{:.2} cores", (cpu1 - cpu0) / (t_watch.elapsed().as_secs_f64())),
        );
        t.row(
            "raft proposals during join",
            format!("{}", m1.proposals() - m0.proposals()),
            "grant + put per node",
        );
        t.row(
            "retries / keepalive errors during join",
            format!(
                "{} / {}",
                shared.retries.load(Ordering::Relaxed),
                shared.keepalive_errors.load(Ordering::Relaxed)
            ),
            "errors by message at the end",
        );

        // ---- 2. Steady state ------------------------------------------------------------
        // Let the keepalive loops reach their phase first.
        tokio::time::sleep(period).await;
        let s0 = Metrics::scrape(&url);
        let c0 = cpu_secs(pid);
        let k0 = shared.keepalives_sent.load(Ordering::Relaxed);
        let e0 = shared.events.load(Ordering::Relaxed);
        let ke0 = shared.keepalive_errors.load(Ordering::Relaxed);
        let ts = Instant::now();
        tokio::time::sleep(Duration::from_secs(steady_secs)).await;
        let el = ts.elapsed().as_secs_f64();
        let s1 = Metrics::scrape(&url);
        let c1 = cpu_secs(pid);
        let k1 = shared.keepalives_sent.load(Ordering::Relaxed);
        let e1 = shared.events.load(Ordering::Relaxed);
        let ke1 = shared.keepalive_errors.load(Ordering::Relaxed);
        t.section(&format!("2. steady state over {el:.1} s"));
        t.row(
            "keepalives sent",
            rate((k1 - k0) as f64 / el),
            &format!(
                "expected N / (TTL/3) = {:.0}/s; etcd counted {}",
                n as f64 / period.as_secs_f64(),
                rate((s1.renewed() - s0.renewed()) / el)
            ),
        );
        t.row(
            "raft proposals",
            rate((s1.proposals() - s0.proposals()) / el),
            "keepalives are not raft writes (3.4, no lease checkpoints)",
        );
        t.row(
            "WAL fsyncs",
            rate((s1.fsyncs() - s0.fsyncs()) / el),
            "",
        );
        t.row("watch events", rate((e1 - e0) as f64 / el), "");
        t.row("keepalive errors", (ke1 - ke0).to_string(), "");
        t.row(
            "etcd CPU",
            format!("{:.3} cores", (c1 - c0) / el),
            "CPU s per s, from /proc/<pid>/stat",
        );
        t.row(
            "etcd gRPC bytes in / out",
            format!(
                "{:.0} / {:.0} B/s",
                (s1.recv_bytes() - s0.recv_bytes()) / el,
                (s1.sent_bytes() - s0.sent_bytes()) / el
            ),
            "",
        );
        t.row(
            "etcd RSS before join / steady",
            format!("{} / {}", mib(m0.rss()), mib(s1.rss())),
            &format!(
                "{:.1} KiB per node",
                (s1.rss() - m0.rss()) / 1024.0 / n as f64
            ),
        );
        t.row(
            "etcd db size before join / steady",
            format!("{} / {}", mib(m0.db_bytes()), mib(s1.db_bytes())),
            "",
        );
        t.row("etcd keys", format!("{}", s1.keys()), "");
        t.row(
            "etcd watchers / watch streams",
            format!("{} / {}", s1.watchers(), s1.watch_streams()),
            "",
        );

        // ---- 3. Churn ----------------------------------------------------------------------
        let leaving: Vec<usize> = (0..n).step_by(10).collect();
        let is_leaving = {
            let mut v = vec![false; n];
            for &i in &leaving {
                v[i] = true;
            }
            v
        };
        let c0m = Metrics::scrape(&url);
        let c0e = shared.events.load(Ordering::Relaxed);
        let c0cpu = cpu_secs(pid);
        let tl = Instant::now();
        let mut revokes = Vec::new();
        for &i in &leaving {
            if let Some(h) = nodes[i].keepalive.take() {
                h.abort();
            }
            if let Some(h) = nodes[i].watch.take() {
                h.abort();
            }
            let mut c = client_of(i);
            let lease = nodes[i].lease;
            revokes.push(tokio::spawn(async move { c.lease_revoke(lease).await }));
        }
        for h in revokes {
            h.await.expect("join").expect("lease revoke");
        }
        let revoked = tl.elapsed();
        let stay = n - leaving.len();
        let leave_conv = wait_converged(&shared, converge_timeout, |i, v| {
            is_leaving[i] || v == stay
        })
        .await
        .map(|_| tl.elapsed());
        let tr = Instant::now();
        let rejoins: Vec<_> = leaving
            .iter()
            .map(|&i| {
                let c = client_of(i);
                let sh = shared.clone();
                let offset = offset_of(i);
                tokio::spawn(async move {
                    let reg = register(c.clone(), i, ttl, period, offset, sh.clone()).await?;
                    let w = open_watch(c, i, sh).await?;
                    Ok::<_, etcd_client::Error>((i, reg, w))
                })
            })
            .collect();
        for h in rejoins {
            let (i, (lease, task, _), w) = h.await.expect("join").expect("rejoin");
            nodes[i].lease = lease;
            nodes[i].watch = Some(w);
            nodes[i].keepalive = Some(task);
        }
        let rejoin_conv = wait_converged(&shared, converge_timeout, |_, v| v == n)
            .await
            .map(|_| tr.elapsed());
        let c1m = Metrics::scrape(&url);
        let c1e = shared.events.load(Ordering::Relaxed);
        let c1cpu = cpu_secs(pid);
        let l = leaving.len();
        t.section(&format!("3. churn: {l} nodes revoke their lease, then rejoin"));
        t.row("revokes acknowledged", secs(revoked), "");
        t.row(
            "remaining watchers see the leave",
            converged(leave_conv, n),
            &format!("{stay} watchers x {l} deletes"),
        );
        t.row(
            "rejoin: all watchers see all N again",
            converged(rejoin_conv, n),
            "grant + put + keepalive + list + watch",
        );
        t.row(
            "raft proposals for leave + rejoin",
            format!("{}", c1m.proposals() - c0m.proposals()),
            &format!("expected {l} revokes + {l} grants + {l} puts = {}", 3 * l),
        );
        t.row(
            "watch events delivered",
            format!("{}", c1e - c0e),
            &format!("{stay} x {l} deletes + ~N x {l} puts"),
        );
        t.row("etcd CPU for the churn", format!("{:.2} s", c1cpu - c0cpu), "");

        // ---- 4. Rejected design: one key per (node, blob) ------------------------------------
        let b0 = Metrics::scrape(&url);
        let bcpu0 = cpu_secs(pid);
        let key_len = format!("{PREFIX}holds/{}/{}", node_name(0), blob_digest(0)).len();
        let batches: Vec<Vec<(String, i64)>> = (0..blob_keys)
            .map(|k| {
                let node = k % n;
                (
                    format!("{PREFIX}holds/{}/{}", node_name(node), blob_digest(k / n)),
                    nodes[node].lease,
                )
            })
            .collect::<Vec<_>>()
            .chunks(TXN_OPS)
            .map(|c| c.to_vec())
            .collect();
        let n_batches = batches.len();
        let queue = Arc::new(std::sync::Mutex::new(batches));
        let tb = Instant::now();
        let writers: Vec<_> = (0..n_clients * 2)
            .map(|w| {
                let mut c = client_of(w);
                let q = queue.clone();
                tokio::spawn(async move {
                    loop {
                        let Some(batch) = q.lock().expect("queue").pop() else {
                            return Ok::<_, etcd_client::Error>(());
                        };
                        let ops: Vec<TxnOp> = batch
                            .into_iter()
                            .map(|(k, lease)| {
                                TxnOp::put(k, "", Some(PutOptions::new().with_lease(lease)))
                            })
                            .collect();
                        c.txn(Txn::new().and_then(ops)).await?;
                    }
                })
            })
            .collect();
        for h in writers {
            h.await.expect("join").expect("txn");
        }
        let wrote = tb.elapsed();
        // Let bbolt commit (batch interval 100 ms) before reading the size.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let b1 = Metrics::scrape(&url);
        let bcpu1 = cpu_secs(pid);
        let tlist = Instant::now();
        let mut kv = clients[0].kv_client().max_decoding_message_size(1 << 30);
        let listed = kv
            .get(
                format!("{PREFIX}holds/"),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .expect("list holds");
        let list_time = tlist.elapsed();
        let list_bytes: usize = listed
            .kvs()
            .iter()
            .map(|kv| kv.key().len() + kv.value().len())
            .sum();
        let n_listed = listed.kvs().len();
        drop(listed);
        // A node holding K/N blobs leaves: its revoke deletes its keys in one raft entry.
        let r0 = Metrics::scrape(&url);
        let trv = Instant::now();
        let victim = 1 % n;
        if let Some(h) = nodes[victim].keepalive.take() {
            h.abort();
        }
        clients[0]
            .clone()
            .lease_revoke(nodes[victim].lease)
            .await
            .expect("revoke");
        let revoke_one = trv.elapsed();
        let r1 = Metrics::scrape(&url);

        let kps = blob_keys as f64 / wrote.as_secs_f64();
        let db_per_key = (b1.db_bytes() - b0.db_bytes()) / blob_keys as f64;
        let rss_per_key = (b1.rss() - b0.rss()) / blob_keys as f64;
        let target_keys = TARGET_NODES * TARGET_BLOBS;
        t.section(&format!(
            "4. rejected design: {blob_keys} keys <prefix>holds/<node>/<digest> (under the node's lease, empty value), txns of {TXN_OPS}"
        ));
        t.row(
            "write time",
            secs(wrote),
            &format!("{n_batches} txns from {} writers", n_clients * 2),
        );
        t.row(
            "keys/s written",
            rate(kps),
            &format!("{} txns/s", rate(n_batches as f64 / wrote.as_secs_f64())),
        );
        t.row(
            "raft proposals",
            format!("{}", b1.proposals() - b0.proposals()),
            "one per txn",
        );
        t.row(
            "etcd CPU while writing",
            format!("{:.2} s", bcpu1 - bcpu0),
            &format!("{:.1} us per key", (bcpu1 - bcpu0) * 1e6 / blob_keys as f64),
        );
        t.row(
            "db size growth",
            mib(b1.db_bytes() - b0.db_bytes()),
            &format!("{db_per_key:.0} B per key (key {key_len} B)"),
        );
        t.row(
            "RSS growth",
            mib(b1.rss() - b0.rss()),
            &format!("{rss_per_key:.0} B per key (incl. Go heap slack, mmapped db pages)"),
        );
        t.row(
            "full list of holds/ by one node",
            secs(list_time),
            &format!("{n_listed} keys, {}", mib(list_bytes as f64)),
        );
        t.row(
            "revoke of one node's lease",
            secs(revoke_one),
            &format!(
                "{} keys deleted, {} proposal(s)",
                (0..blob_keys).filter(|k| k % n == victim).count() + 1,
                r1.proposals() - r0.proposals()
            ),
        );
        t.section(&format!(
            "4b. extrapolated to {} nodes x {} blobs = {:.0}M keys (linear in keys)",
            TARGET_NODES, TARGET_BLOBS, target_keys / 1e6
        ));
        t.row(
            "db size",
            format!("{:.1} GiB", db_per_key * target_keys / (1u64 << 30) as f64),
            "etcd default quota 2 GiB, suggested max 8 GiB",
        );
        t.row(
            "etcd RSS for the keys",
            format!("{:.1} GiB", rss_per_key * target_keys / (1u64 << 30) as f64),
            "per member",
        );
        t.row(
            "time to write them once",
            format!("{:.0} s", target_keys / kps),
            "at the rate above, one member on loopback",
        );
        t.row(
            "full list by a joining node",
            format!("{:.2} GiB", list_bytes as f64 / n_listed.max(1) as f64 * target_keys / (1u64 << 30) as f64),
            "per node (re)start",
        );
        t.row(
            "watch fan-out if nodes watch holds/",
            format!("{:.0}G events", target_keys * TARGET_NODES / 1e9),
            "for one fill of the cluster's caches",
        );
        t.row(
            "one node dying",
            format!("{:.0} keys deleted", TARGET_BLOBS),
            &format!("x {TARGET_NODES} watchers = {:.0}M events", TARGET_BLOBS * TARGET_NODES / 1e6),
        );

        t.section("health over the whole run");
        t.row(
            "retries (grant, put, keepalive open, list, watch)",
            shared.retries.load(Ordering::Relaxed).to_string(),
            "",
        );
        t.row(
            "keepalive errors / leases lost",
            format!(
                "{} / {}",
                shared.keepalive_errors.load(Ordering::Relaxed),
                shared.leases_lost.load(Ordering::Relaxed)
            ),
            "",
        );
        t.row(
            "watch streams broken",
            shared.watch_errors.load(Ordering::Relaxed).to_string(),
            "",
        );
        for (msg, count) in shared.errors.lock().expect("errors").iter() {
            t.row(&format!("error x{count}"), String::new(), msg);
        }

        // Stop the nodes before etcd goes.
        for node in &mut nodes {
            if let Some(h) = node.keepalive.take() {
                h.abort();
            }
            if let Some(h) = node.watch.take() {
                h.abort();
            }
        }
    });
    drop(rt);

    // ---- 5. Rendezvous on one node ----------------------------------------------------------
    let names: Vec<String> = (0..n).map(node_name).collect();
    let digests: Vec<String> = (0..blobs).map(blob_digest).collect();
    let tr = Instant::now();
    let mut load = vec![0u32; n];
    for d in &digests {
        for i in rendezvous_top(&names, d, 3) {
            load[i] += 1;
        }
    }
    let hrw = tr.elapsed();
    let max_load = load.iter().max().copied().unwrap_or(0);
    let min_load = load.iter().min().copied().unwrap_or(0);
    t.section(&format!(
        "5. rendezvous: top 3 of {n} nodes by sha256(node || digest), {blobs} digests, one core"
    ));
    t.row(
        "all digests",
        secs(hrw),
        &format!("{:.0} hashes/s", (n * blobs) as f64 / hrw.as_secs_f64()),
    );
    t.row(
        "one digest",
        format!("{:.1} us", hrw.as_secs_f64() * 1e6 / blobs as f64),
        "",
    );
    t.row(
        "home copies per node (min / mean / max)",
        format!(
            "{min_load} / {:.0} / {max_load}",
            3.0 * blobs as f64 / n as f64
        ),
        "no etcd keys at all",
    );

    println!();
    t.print();
    drop(etcd);
}
