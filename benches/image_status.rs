//! Benchmark: what the imagestream CRI proxy costs, in one run on the same machine (real
//! containerd, real registry, the release `imagestream` binary), printed and never asserted.
//!
//! **Calls.** Latency (p50, p99) of sequential CRI calls on one connection per path, direct to
//! containerd, through a byte relay and through imagestream, in alternating rounds, and the CPU
//! time per call of the relay and of imagestream (their threads' `schedstat`); two series:
//! - a plain reference's `ImageStatus` (decoded, seen to name no stream, forwarded as received);
//! - a stream reference's hot call: `PullImage` of `imagestream.local/bench/app:prod`, whose
//!   digest the runtime holds (resolved, access-checked, answered after one runtime
//!   `ImageStatus`), against `ImageStatus` of the pinned reference direct and through the relay.
//!
//! The byte relay is a unix socket in front of containerd served by a separate process (this
//! bench binary started again with `IMAGESTREAM_BENCH_RELAY` set) that copies bytes both ways on
//! a single-threaded tokio runtime (`copy_bidirectional`), with no HTTP/2 or gRPC work at all:
//! the floor of any proxy on a unix socket on this machine (one more process hop, two more
//! wake-ups, two reads and two writes per call). Target: imagestream's CPU per call at most 2x
//! the relay's.
//!
//! Both call series run in two CPU layouts, each with its own baseline:
//! - **spread**: the processes (this client, imagestream, containerd, the relay) run where the
//!   scheduler puts them, on all the CPUs this bench may use;
//! - **one CPU**: all of them pinned (`taskset`) to one CPU. Every call crosses processes four
//!   times; spread out, a crossing is often a wake-up on the other CPU, which on a VM is an
//!   inter-processor interrupt through the hypervisor and costs more than either process's own
//!   work; on one CPU what is left is the cost of that work.
//!
//! **Container starts** (spread layout only): what a user feels. Each sample is the kubelet's
//! sequence for one container of a pod: `ImageStatus` of the image, `PullImage` (held by the
//! runtime), `CreateContainer` in a pod sandbox created once beforehand, `StartContainer`;
//! through imagestream with the stream reference (pod in namespace `bench`), direct with the
//! pinned reference. The container is then stopped and removed, timed apart, and containerd
//! given [`SETTLE`] before the next start. Rounds alternate direct and proxy. Target: p50
//! through imagestream at most 1.05x direct. Also printed: each step's p50, imagestream's CPU
//! per start (less what it uses idle, measured before the series), the registry
//! requests made (containerd's `PullImage` of a held digest asks the registry; imagestream's is
//! answered after a runtime `ImageStatus`), and the ratio as the kubelet with `IfNotPresent`
//! would see it (direct skips `PullImage`, since `ImageStatus` finds the image; a stream
//! reference is never found, so it is always pulled), derived from the same samples.
//!
//! Run: `cargo bench --bench image_status` (root; the Debian packages of the test harness, and
//! `taskset` from util-linux). `IMAGESTREAM_BENCH_CALLS` sets the measured calls per call series
//! and layout (default 2000); `IMAGESTREAM_BENCH_STARTS` the measured container starts per side
//! (default 150).

#[path = "../tests/common/mod.rs"]
mod common;

use common::daemon::Daemon;
use common::*;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    CreateContainerRequest, ImageStatusRequest, PodSandboxConfig, PullImageRequest,
    RemoveContainerRequest, StartContainerRequest, StopContainerRequest,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Unmeasured calls per path before each call series.
const WARMUP: usize = 200;
/// Calls per round; rounds alternate between the paths so that drift hits them alike.
const ROUND: usize = 100;
/// Target: imagestream's CPU time per call at most this many times the byte relay's.
const TARGET_CPU_RATIO: f64 = 2.0;
/// Unmeasured container starts per side before the container-start series.
const START_WARMUP: usize = 5;
/// Container starts per round, alternating direct and proxy.
const START_ROUND: usize = 10;
/// Pause after a container's removal, outside the timed part, so that containerd's work behind
/// it (garbage collection of its snapshot, the shim's clean-up) lands on no start. In a run
/// without it, `CreateContainer` took 4 ms longer through imagestream than direct (19.7 against
/// 15.3 ms at p50): through imagestream it came 1 ms after the previous removal (`PullImage` of
/// a held image is answered in 0.6 ms), direct 12 ms after (containerd's `PullImage` asks the
/// registry).
const SETTLE: Duration = Duration::from_millis(100);
/// How long the daemon's idle CPU rate is measured before the container-start series.
const IDLE_SAMPLE: Duration = Duration::from_secs(2);
/// Target: a container start's p50 through imagestream at most this many times direct.
const TARGET_START_RATIO: f64 = 1.05;
const STREAM_REF: &str = "imagestream.local/bench/app:prod";

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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
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

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "missed"
    }
}

/// Time on CPU (user and system) of each thread of `pid` so far, in ns, by thread id, from
/// `/proc/<pid>/task/<tid>/schedstat`: nanoseconds, where `/proc/<pid>/stat` counts 10 ms
/// ticks (a call here is 20–200 µs).
fn thread_cpu(pid: u32) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        if let Some(ns) = stat.split_whitespace().next().and_then(|f| f.parse().ok()) {
            out.insert(task.file_name().to_string_lossy().into_owned(), ns);
        }
    }
    out
}

/// CPU time of `pid` from `before` (a [`thread_cpu`]) to now. A thread that ended in between
/// is left out (the relay's and the daemon's threads live through the run).
fn cpu_since(pid: u32, before: &HashMap<String, u64>) -> Duration {
    let ns: u64 = thread_cpu(pid)
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum();
    Duration::from_nanos(ns)
}

/// Set in the relay process: `<listen socket>\n<upstream socket>`.
const RELAY_ENV: &str = "IMAGESTREAM_BENCH_RELAY";

/// The relay process: copies bytes between each client of the listen socket and a connection
/// of its own to the upstream socket, on a single-threaded runtime (the cheapest a relay can
/// be: no hand-offs between threads), until killed.
fn run_relay(spec: &str) -> ! {
    let (socket, upstream) = spec.split_once('\n').expect("relay spec");
    let upstream = PathBuf::from(upstream);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("relay runtime");
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::bind(socket)
            .unwrap_or_else(|e| panic!("bind relay socket {socket}: {e}"));
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut runtime) = tokio::net::UnixStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut runtime).await;
                }
            });
        }
    })
}

/// The relay process, killed when dropped.
struct Relay(std::process::Child);

impl Relay {
    fn start(socket: &Path, upstream: &Path) -> Self {
        let exe = std::env::current_exe().expect("bench executable");
        let child = std::process::Command::new(exe)
            .env(
                RELAY_ENV,
                format!("{}\n{}", socket.display(), upstream.display()),
            )
            .spawn()
            .expect("start relay process");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "relay socket did not appear");
            std::thread::sleep(Duration::from_millis(10));
        }
        Relay(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The clients of the call series: direct to containerd, through the relay, through imagestream.
struct Clients {
    direct: ImageServiceClient<Channel>,
    relay: ImageServiceClient<Channel>,
    proxy: ImageServiceClient<Channel>,
}

impl Clients {
    async fn connect(containerd: &Path, relay: &Path, proxy: &Path) -> Self {
        Self {
            direct: image_client(containerd).await,
            relay: image_client(relay).await,
            proxy: image_client(proxy).await,
        }
    }
}

fn print_series(name: &str, s: &Stats) {
    println!(
        "  {name:<22} p50 {:>8.1} µs   p99 {:>8.1} µs",
        us(s.p50),
        us(s.p99)
    );
}

/// CPU time per call of the relay and of imagestream in one call series, in µs.
struct CpuPerCall {
    relay: f64,
    proxy: f64,
}

async fn compare(
    daemon_pid: u32,
    relay_pid: u32,
    label: &str,
    clients: &mut Clients,
    proxy_image: &str,
    direct_image: &str,
    calls: usize,
) -> CpuPerCall {
    let Clients {
        direct,
        relay,
        proxy,
    } = clients;
    let mut scratch = Vec::new();
    sample(proxy, proxy_image, WARMUP, &mut scratch).await;
    sample(relay, direct_image, WARMUP, &mut scratch).await;
    sample(direct, direct_image, WARMUP, &mut scratch).await;
    let mut via = Vec::with_capacity(calls);
    let mut dir = Vec::with_capacity(calls);
    let mut rel = Vec::with_capacity(calls);
    let mut done = 0;
    let mut daemon_cpu = Duration::ZERO;
    let mut relay_cpu = Duration::ZERO;
    while done < calls {
        let n = ROUND.min(calls - done);
        sample(direct, direct_image, n, &mut dir).await;
        let before = thread_cpu(relay_pid);
        sample(relay, direct_image, n, &mut rel).await;
        relay_cpu += cpu_since(relay_pid, &before);
        let before = thread_cpu(daemon_pid);
        sample(proxy, proxy_image, n, &mut via).await;
        daemon_cpu += cpu_since(daemon_pid, &before);
        done += n;
    }
    let (v, d, r) = (stats(via), stats(dir), stats(rel));
    let cpu = CpuPerCall {
        relay: us(relay_cpu) / calls as f64,
        proxy: us(daemon_cpu) / calls as f64,
    };
    println!("{label}");
    print_series("direct to containerd", &d);
    print_series("through a byte relay", &r);
    print_series("through imagestream", &v);
    println!(
        "  added p50              relay {:.1} µs (ratio {:.2}), imagestream {:.1} µs (ratio {:.2}; p99 ratio {:.2})",
        us(r.p50) - us(d.p50),
        us(r.p50) / us(d.p50),
        us(v.p50) - us(d.p50),
        us(v.p50) / us(d.p50),
        us(v.p99) / us(d.p99),
    );
    println!(
        "  CPU time per call      relay {:.1} µs, imagestream {:.1} µs: {:.2}x the relay's",
        cpu.relay,
        cpu.proxy,
        cpu.proxy / cpu.relay
    );
    cpu
}

/// One side of the container-start series: its clients, its pod sandbox, the image it names.
struct Side {
    name: &'static str,
    /// The pod's log directory.
    _logs: tempfile::TempDir,
    rt: RuntimeServiceClient<Channel>,
    img: ImageServiceClient<Channel>,
    pod: PodSandboxConfig,
    pod_id: String,
    image: String,
    /// Containers started so far: the next one's attempt number and log file.
    started: u32,
    times: StartTimes,
}

/// Durations of the container starts of one side, per step.
#[derive(Default)]
struct StartTimes {
    image_status: Vec<Duration>,
    pull: Vec<Duration>,
    create: Vec<Duration>,
    start: Vec<Duration>,
    total: Vec<Duration>,
    stop_remove: Vec<Duration>,
}

impl Side {
    async fn new(name: &'static str, socket: &Path, namespace: &str, image: &str) -> Side {
        let logs = tempfile::tempdir().expect("pod log dir");
        let pod = pod_config(
            &format!("bench-{}", name.replace(' ', "-")),
            namespace,
            logs.path(),
        );
        let mut rt = runtime_client(socket).await;
        let pod_id = run_pod(&mut rt, &pod).await;
        Side {
            name,
            _logs: logs,
            rt,
            img: image_client(socket).await,
            pod,
            pod_id,
            image: image.to_string(),
            started: 0,
            times: StartTimes::default(),
        }
    }

    /// The kubelet's calls for one container, timed (kept if `keep`); then the container is
    /// stopped and removed.
    async fn start_one(&mut self, keep: bool) {
        let attempt = self.started;
        self.started += 1;
        let t0 = Instant::now();
        self.img
            .image_status(ImageStatusRequest {
                image: Some(image_spec(&self.image)),
                verbose: false,
            })
            .await
            .expect("ImageStatus");
        let t1 = Instant::now();
        let image_ref = self
            .img
            .pull_image(PullImageRequest {
                image: Some(image_spec(&self.image)),
                auth: None,
                sandbox_config: Some(self.pod.clone()),
            })
            .await
            .expect("PullImage")
            .into_inner()
            .image_ref;
        assert!(!image_ref.is_empty(), "PullImage gave no image ref");
        let t2 = Instant::now();
        let mut config =
            container_config_with_command("app", &self.image, &["/bin/sleep", "infinity"]);
        config.log_path = format!("app_{attempt}.log");
        if let Some(m) = config.metadata.as_mut() {
            m.attempt = attempt;
        }
        let id = self
            .rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: self.pod_id.clone(),
                config: Some(config),
                sandbox_config: Some(self.pod.clone()),
            })
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        let t3 = Instant::now();
        self.rt
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .expect("StartContainer");
        let t4 = Instant::now();
        self.rt
            .stop_container(StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            })
            .await
            .expect("StopContainer");
        self.rt
            .remove_container(RemoveContainerRequest { container_id: id })
            .await
            .expect("RemoveContainer");
        let t5 = Instant::now();
        tokio::time::sleep(SETTLE).await;
        if keep {
            let t = &mut self.times;
            t.image_status.push(t1 - t0);
            t.pull.push(t2 - t1);
            t.create.push(t3 - t2);
            t.start.push(t4 - t3);
            t.total.push(t4 - t0);
            t.stop_remove.push(t5 - t4);
        }
    }

    async fn remove_pod(&mut self) {
        remove_pod(&mut self.rt, &self.pod_id).await;
    }
}

/// The container-start series; returns the p50 ratio proxy/direct.
async fn container_starts(
    direct: &mut Side,
    proxy: &mut Side,
    daemon_pid: u32,
    registry: &Registry,
    n: usize,
) -> f64 {
    for _ in 0..START_WARMUP {
        direct.start_one(false).await;
        proxy.start_one(false).await;
    }
    // The daemon's CPU when no call comes (the importer's tick, timers), to tell apart from what
    // the starts cost it.
    let before = thread_cpu(daemon_pid);
    let idle_since = Instant::now();
    tokio::time::sleep(IDLE_SAMPLE).await;
    let idle_rate =
        cpu_since(daemon_pid, &before).as_secs_f64() / idle_since.elapsed().as_secs_f64();
    let registry_before = registry.access_log().len();
    let mut daemon_cpu = Duration::ZERO;
    let mut proxy_wall = Duration::ZERO;
    let mut done = 0;
    while done < n {
        let k = START_ROUND.min(n - done);
        for _ in 0..k {
            direct.start_one(true).await;
        }
        let before = thread_cpu(daemon_pid);
        let since = Instant::now();
        for _ in 0..k {
            proxy.start_one(true).await;
        }
        proxy_wall += since.elapsed();
        daemon_cpu += cpu_since(daemon_pid, &before);
        done += k;
    }
    println!(
        "  {:<24} {:>9} {:>9}   {:>9} {:>9} {:>9} {:>9}   {:>9}",
        "p50 (p99) in ms", "start", "", "Status", "Pull", "Create", "Start", "stop+rm"
    );
    let mut p50 = Vec::new();
    for side in [&*direct, &*proxy] {
        let t = &side.times;
        let total = stats(t.total.clone());
        let p = |v: &Vec<Duration>| ms(stats(v.clone()).p50);
        println!(
            "  {:<24} {:>9.1} {:>9}   {:>9.2} {:>9.2} {:>9.1} {:>9.1}   {:>9.1}",
            side.name,
            ms(total.p50),
            format!("({:.1})", ms(total.p99)),
            p(&t.image_status),
            p(&t.pull),
            p(&t.create),
            p(&t.start),
            p(&t.stop_remove),
        );
        p50.push(total.p50);
    }
    let ratio = us(p50[1]) / us(p50[0]);
    println!(
        "  ratio p50 (proxy/direct) {ratio:.3}, added {:.2} ms",
        ms(p50[1]) - ms(p50[0]),
    );
    let idle = proxy_wall.as_secs_f64() * idle_rate / n as f64 * 1e3;
    println!(
        "  imagestream CPU time per container start (its calls, the stop, the removal, the settle) {:.2} ms, of which {idle:.2} ms at its idle rate ({:.2} % of a CPU, measured for {} s before the series): {:.2} ms for the start",
        ms(daemon_cpu) / n as f64,
        idle_rate * 100.0,
        IDLE_SAMPLE.as_secs(),
        ms(daemon_cpu) / n as f64 - idle
    );
    let requests = registry.access_log().len() - registry_before;
    println!(
        "  registry requests during the measured starts: {requests}, {:.1} per start direct (containerd's PullImage of a held digest asks the registry; imagestream answers it after a runtime ImageStatus)",
        requests as f64 / n as f64
    );
    // The kubelet (pull policy IfNotPresent) skips PullImage when ImageStatus finds the image;
    // it never finds a stream reference (see `src/cri/proxy.rs`), so it always pulls one.
    let t = &direct.times;
    let without_pull: Vec<Duration> = t.total.iter().zip(&t.pull).map(|(a, b)| *a - *b).collect();
    let without_pull = stats(without_pull).p50;
    println!(
        "  as the kubelet calls with IfNotPresent (direct skips PullImage: ImageStatus found the image): direct p50 {:.1} ms (per-sample total less its PullImage), ratio p50 {:.3}",
        ms(without_pull),
        us(p50[1]) / us(without_pull)
    );
    ratio
}

/// Where the processes of the call series run (see the module doc).
#[derive(Clone, Copy)]
enum Layout {
    Spread,
    OneCpu,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Spread => "spread",
            Layout::OneCpu => "one CPU",
        }
    }
}

/// The CPUs this process may run on, as `taskset` lists them (e.g. `0-1`).
fn allowed_cpus() -> String {
    let out = std::process::Command::new("taskset")
        .args(["-c", "-p", &std::process::id().to_string()])
        .output()
        .expect("run taskset (util-linux)");
    assert!(out.status.success(), "taskset -c -p failed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.rsplit_once(':')
        .map(|(_, list)| list.trim().to_string())
        .expect("taskset output")
}

/// Puts every thread of `pids` (and of this process) on `cpus`.
fn place(pids: &[u32], cpus: &str) {
    let me = std::process::id();
    for pid in pids.iter().chain([&me]) {
        let status = std::process::Command::new("taskset")
            .args(["-a", "-c", "-p", cpus, &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run taskset");
        assert!(status.success(), "taskset -a -c -p {cpus} {pid} failed");
    }
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

fn main() {
    if let Ok(spec) = std::env::var(RELAY_ENV) {
        run_relay(&spec);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("bench runtime")
        .block_on(bench());
}

async fn bench() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let calls = env_count("IMAGESTREAM_BENCH_CALLS", 2000);
    let starts = env_count("IMAGESTREAM_BENCH_STARTS", 150);
    let began = Instant::now();
    // Log as in production (info), not as the tests do (debug).
    std::env::set_var("IMAGESTREAM_TEST_LOG", "info");
    let registry = Registry::start();
    let digest = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
    let ctd = RuntimeBed::start(&registry);
    let mut daemon = Daemon::start(&ctd.endpoint(), &[&registry.addr], &[]);
    daemon.cli_ok(&["stream", "create", "bench/app"]);
    daemon.cli_ok(&[
        "tag",
        "set",
        "bench/app:prod",
        &registry.image_ref("app:v1"),
    ]);

    let plain = registry.image_ref("app:v1");
    let pinned = format!("{}/app@{digest}", registry.addr);
    let relay_dir = tempfile::tempdir().expect("relay dir");
    let relay_socket = relay_dir.path().join("relay.sock");
    let relay_process = Relay::start(&relay_socket, &ctd.socket);
    let mut clients = Clients::connect(&ctd.socket, &relay_socket, &daemon.cri_socket).await;
    clients
        .direct
        .pull_image(PullImageRequest {
            image: Some(image_spec(&plain)),
            ..Default::default()
        })
        .await
        .expect("PullImage");

    let spread = allowed_cpus();
    let one = spread.split([',', '-']).next().unwrap_or("0").to_string();
    let pid = daemon.pid().expect("daemon pid");
    let pids = [pid, ctd.pid().expect("containerd pid"), relay_process.pid()];
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "CRI calls: {calls} per series, one connection per path, sequential calls, rounds of {ROUND} alternating direct, relay, proxy; load average {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let mut cpu = Vec::new();
    for layout in [Layout::Spread, Layout::OneCpu] {
        match layout {
            Layout::Spread => {
                place(&pids, &spread);
                println!("\n== layout: spread (CPUs {spread}, placed by the scheduler)");
            }
            Layout::OneCpu => {
                place(&pids, &one);
                println!("\n== layout: one CPU (all processes pinned to CPU {one})");
            }
        }
        let plain_cpu = compare(
            pid,
            relay_process.pid(),
            "plain reference: ImageStatus (decoded, then forwarded as received)",
            &mut clients,
            &plain,
            &plain,
            calls,
        )
        .await;
        let stream_cpu = compare(
            pid,
            relay_process.pid(),
            "stream reference: PullImage of a held digest (resolve, access check, one runtime ImageStatus) vs ImageStatus of the pinned reference direct",
            &mut clients,
            STREAM_REF,
            &pinned,
            calls,
        )
        .await;
        cpu.push((layout, plain_cpu, stream_cpu));
    }
    place(&pids, &spread);
    drop(clients);

    println!(
        "\n== container start, layout spread: {starts} per side after {START_WARMUP} warm-up, rounds of {START_ROUND} alternating direct, proxy"
    );
    println!(
        "   ImageStatus, PullImage (held), CreateContainer, StartContainer: direct {pinned}, through imagestream {STREAM_REF} (pod namespace bench); then StopContainer (timeout 0) and RemoveContainer, timed apart, and {} ms to settle", SETTLE.as_millis()
    );
    let mut direct = Side::new("direct to containerd", &ctd.socket, "bench", &pinned).await;
    let mut proxy = Side::new(
        "through imagestream",
        &daemon.cri_socket,
        "bench",
        STREAM_REF,
    )
    .await;
    let start_ratio = container_starts(&mut direct, &mut proxy, pid, &registry, starts).await;
    direct.remove_pod().await;
    proxy.remove_pod().await;
    daemon.stop();

    println!("\ntargets (printed, not asserted)");
    println!("  imagestream CPU time per call <= {TARGET_CPU_RATIO}x the byte relay's");
    for (layout, plain, stream) in cpu {
        for (series, c) in [("plain ImageStatus", plain), ("stream PullImage", stream)] {
            let ratio = c.proxy / c.relay;
            println!(
                "    {:<8} {series:<18} relay {:>6.1} µs  imagestream {:>6.1} µs  {ratio:>5.2}x: {}",
                layout.name(),
                c.relay,
                c.proxy,
                verdict(ratio <= TARGET_CPU_RATIO)
            );
        }
    }
    println!(
        "  container start through imagestream, p50 <= {TARGET_START_RATIO}x direct: {start_ratio:.3}x: {}",
        verdict(start_ratio <= TARGET_START_RATIO)
    );
    println!("\ntotal run {:.0} s", began.elapsed().as_secs_f64());
}
