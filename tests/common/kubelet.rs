//! A real kubelet (Kubernetes v1.34, `tools::tool("kubelet")`, built by
//! `scripts/test-tools.sh`) run standalone in front of a CRI socket: no API server, no kubeconfig,
//! pods only from a static-pod manifest dir. [`Kubelet::start`] writes its config into a temp
//! dir, starts it and waits until `/healthz` and `/pods` answer; [`Kubelet::write_static_pod`] /
//! [`Kubelet::remove_static_pod`] add and delete pods; the `wait_*` helpers watch the result
//! through the CRI socket (the runtime's view) and the kubelet's own `/pods` (its pod status,
//! with each container's `waiting` reason and message).
//!
//! # How the kubelet is run, and why
//!
//! Flags (everything else is in the config file, as the kubelet wants it):
//! - `--config DIR/config.yaml`: the `KubeletConfiguration` below.
//! - `--root-dir DIR/root`: pod dirs, checkpoints, the pod-resources and plugin sockets; not
//!   `/var/lib/kubelet`.
//! - `--cert-dir DIR/certs`: the self-signed serving certificate of the authenticated port.
//! - `--hostname-override NODE`: a node name unique to the instance; static pods are named
//!   `NAME-NODE` (their `io.kubernetes.pod.name` label), which is how teardown finds the pods
//!   this kubelet made.
//! - `-v=2`: `SyncLoop ADD/REMOVE`, `Killing container`, and the pull errors (those are logged
//!   at every level) in `DIR/kubelet.log`.
//! - No `--kubeconfig`: standalone mode (logged as "kubeclient not set, assuming standalone").
//!
//! `KubeletConfiguration` ([`Kubelet::config_yaml`]):
//! - `staticPodPath`, `fileCheckFrequency: 1s`: the only pod source; inotify sees a new file at
//!   once, the 1 s re-list is the fallback (default 20 s).
//! - `containerRuntimeEndpoint`, `imageServiceEndpoint`: both imagestream's socket (the proxy
//!   must see `PullImage` and `CreateContainer` with the pod's namespace).
//! - `address: 127.0.0.1`, `port`, `healthzBindAddress: 127.0.0.1`, `healthzPort`,
//!   `readOnlyPort: 0`: free loopback ports, so that tests in parallel never meet on the
//!   defaults 10250/10248/10255 (a taken `port` makes the kubelet exit; start retries).
//! - `authentication.anonymous.enabled: true`, `webhook.enabled: false`, `authorization.mode:
//!   AlwaysAllow`: `GET https://127.0.0.1:PORT/pods` without credentials (there is no API server
//!   to ask), for the pod status.
//! - `cgroupDriver: cgroupfs`: no systemd here (containerd 2 and CRI-O report their driver over
//!   CRI and the kubelet follows them; containerd 1.6 does not, so it must be set).
//! - `cgroupsPerQOS: false`, `enforceNodeAllocatable: []`: otherwise the kubelet creates
//!   `/kubepods` (and `burstable`, `besteffort`) at the root of every cgroup v1 hierarchy, shared
//!   by all kubelets and never removed. The second setting is required by the first ("cgroupsPerQOS
//!   must be set to true when "pods" contained in enforceNodeAllocatable").
//! - `failSwapOn: false`: a machine with swap would make the kubelet exit.
//! - `protectKernelDefaults: true`: by default the kubelet *writes* six host sysctls at start
//!   (`vm.overcommit_memory=1`, `vm.panic_on_oom=0`, `kernel.panic=10`, `kernel.panic_on_oops=1`,
//!   `kernel.keys.root_max{keys,bytes}`). With this it only checks them and exits on a mismatch
//!   ("Failed to start ContainerManager: invalid kernel flag: vm/overcommit_memory, expected
//!   value: 1, actual value: 0"); its mount namespace (below) shows it the values it expects.
//! - `makeIPTablesUtilChains: false`: otherwise it adds `KUBE-FIREWALL` (dropping non-loopback
//!   sources to 127.0.0.0/8) to the host's INPUT and OUTPUT chains, and `KUBE-KUBELET-CANARY` /
//!   `KUBE-IPTABLES-HINT` chains, IPv4 and IPv6, and keeps them there.
//! - `evictionHard: {}`, `imageGCHighThresholdPercent: 100` (GC off), `imageGCLowThresholdPercent:
//!   99`: with the default thresholds a full-ish disk (here 86 % used) makes the eviction manager
//!   report disk pressure and rank the test's pods for eviction, and image GC try to delete the
//!   images the test pulled.
//! - `resolvConf: ""`: the pods use the host's network and need no DNS config.
//! - `podLogsDir: DIR/pod-logs`: not `/var/log/pods`.
//! - `oomScoreAdj: 0`: the kubelet leaves its own OOM score alone (default -999).
//!
//! The kubelet runs in a mount namespace of its own (`unshare --mount --propagation slave`,
//! `DIR/launch.sh`), which receives the host's mounts but sends none back:
//! - the six sysctl files are bind-mounted from `DIR/sysctl/` with the values it wants (see
//!   `protectKernelDefaults`); the host's stay as they are;
//! - `/var/log` and `/var/lib` are empty tmpfs there: the kubelet hard-codes
//!   `/var/log/containers` (a symlink per container log) and
//!   `/var/lib/kubelet/device-plugins/kubelet.sock`, whatever its flags say;
//! - `/sys/kernel/mm/hugepages` is empty there: the kubelet gives every container a hugetlb
//!   limit (0) for each page size the kernel lists, and on a machine whose hugetlb controller is
//!   not mounted (cgroup v1 here has none) CRI-O's runc then fails every container ("runc
//!   create failed: … cannot set hugetlb limit: container could not join or create cgroup";
//!   containerd drops hugetlb limits by default, `disable_hugetlb_controller`);
//! - the bind mount of its root dir onto itself (`--make-rshared`) stays inside and vanishes
//!   with the kubelet. The runtime still sees the root dir's files (pod `etc-hosts`), which are
//!   plain files on the host's file system.
//!
//! # Pods
//!
//! Static pods ([`Kubelet::write_static_pod`]) use the host's network (`hostNetwork: true`: no
//! CNI needed) and `terminationGracePeriodSeconds: 0` (the test images' PID 1, `sleep`, ignores
//! SIGTERM; the kubelet's minimum grace is still 2 s). What makes the kubelet start a pod again
//! after the tag moved (it calls `ImageStatus`, imagestream says "not present", `PullImage`
//! resolves the tag anew):
//! - a manifest under a new name: the new pod runs about 1 s after the write, the old one is
//!   killed alongside;
//! - the same name with changed content (a new config hash, so a new pod UID): the kubelet
//!   starts the new pod only once the old one has terminated and been cleaned up: 15 s here
//!   (11 s with `syncFrequency: 1s`);
//! - the file removed and written again with the same content (same UID) at once: 20 s; after
//!   waiting until the old container stopped (1–2 s): 2–3 s after the write.
//!
//! `syncFrequency` stays at its default (1 min): 1 s shortens none of these much and makes the
//! kubelet call the runtime every second for every pod.
//!
//! # Seen on these machines (cgroup v1, no `CAP_SYS_RESOURCE`)
//!
//! Logged at start and harmless: "Failed to set rlimit on max file handles" (it raises the hard
//! limit to 1,000,000), "Failed to ensure process in container with oom score" (no pid
//! namespace of init), "cgroup v1 support is in maintenance mode", "no imagefs label for
//! configured runtime", "Failed to read data from checkpoint" (a fresh root dir). A kubelet that
//! cannot reach its CRI socket exits at once ("validate CRI v1 runtime API for endpoint …");
//! [`Kubelet::start`] then panics with the kubelet's error lines. Note that the kubelet stops
//! every pod sandbox in the runtime it does not know: give each kubelet a runtime bed of its
//! own.
//!
//! # Teardown
//!
//! `Drop` kills the kubelet (SIGKILL: it does not remove pods on exit anyway), then stops and
//! removes, through the CRI socket, every pod sandbox named `*-NODE` (their containers go with
//! them), kills whatever still mentions the temp dir, unmounts anything left under it and
//! deletes it.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1::{
    ContainerFilter, ContainerState, ContainerStatus, ContainerStatusRequest,
    ListContainersRequest, ListPodSandboxRequest, RemovePodSandboxRequest, StopPodSandboxRequest,
};
use serde_json::Value;
use tempfile::TempDir;

use super::{
    block_on_fresh, free_port, harness_tempdir, http_get_status, kill_processes_mentioning,
    log_file, require_binary, require_root, runtime_client, tools, unmount_under,
};

/// How long the kubelet may take until `/healthz` and `/pods` answer (about 1 s here).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The sysctls the kubelet checks (and, without `protectKernelDefaults`, sets) at start, with the
/// values it wants (`setupKernelTunables` in `pkg/kubelet/cm/container_manager_linux.go`).
pub const KERNEL_TUNABLES: &[(&str, &str)] = &[
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// The name of the pod's only container in [`Kubelet::write_static_pod`].
pub const CONTAINER: &str = "app";

/// A container's `waiting` reasons in the kubelet's status that only back-off retries follow:
/// [`Kubelet::wait_running_container`] fails at once on them.
pub const CONTAINER_ERRORS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "CrashLoopBackOff",
];

/// A standalone kubelet with its own temp dir, ports and node name.
pub struct Kubelet {
    /// The temp dir (config, manifests, root dir, log).
    pub dir: PathBuf,
    /// `staticPodPath`.
    pub manifests: PathBuf,
    /// `--root-dir`.
    pub root_dir: PathBuf,
    /// `DIR/kubelet.log` (stdout and stderr, `-v=2`).
    pub log: PathBuf,
    /// `DIR/config.yaml`.
    pub config: PathBuf,
    /// `--hostname-override`; static pod `NAME` runs as `NAME-NODE`.
    pub node_name: String,
    /// The authenticated (TLS) port: `/pods`.
    pub port: u16,
    /// The plain-HTTP `/healthz` port.
    pub healthz_port: u16,
    /// The CRI socket it talks to (runtime and image service).
    pub cri_socket: PathBuf,
    child: Option<Child>,
    tmp: Option<TempDir>,
}

impl Kubelet {
    /// Starts a kubelet talking CRI to `cri_socket` and waits ([`START_TIMEOUT`]) until it
    /// serves `/healthz` and `/pods`. Panics with the kubelet's own error lines if it exits or
    /// never gets there: a kubelet that cannot start is a test failure, not a skip.
    pub fn start(cri_socket: &Path) -> Kubelet {
        require_root("the kubelet");
        require_binary("unshare", "util-linux");
        require_binary("curl", "curl");
        let binary = tools::tool("kubelet");
        // The launcher hides /var/lib and /var/log before it execs the kubelet.
        let real = fs::canonicalize(&binary).unwrap_or_else(|_| binary.clone());
        assert!(
            !real.starts_with("/var/lib") && !real.starts_with("/var/log"),
            "the kubelet binary {} is under /var/lib or /var/log, which its mount namespace \
             hides: keep the test tools elsewhere",
            real.display()
        );
        let tmp = harness_tempdir("iskubelet-");
        let dir = tmp.path().to_path_buf();
        let node_name = format!("node-{}", super::unique_suffix());
        let mut k = Kubelet {
            manifests: dir.join("manifests"),
            root_dir: dir.join("root"),
            log: dir.join("kubelet.log"),
            config: dir.join("config.yaml"),
            node_name,
            port: 0,
            healthz_port: 0,
            cri_socket: cri_socket.to_path_buf(),
            dir,
            child: None,
            tmp: Some(tmp),
        };
        for sub in ["manifests", "root", "certs", "pod-logs", "sysctl"] {
            fs::create_dir_all(k.dir.join(sub)).expect("create kubelet subdir");
        }
        k.write_launcher();
        // A free port can be taken between finding and binding it: the kubelet then exits
        // ("address already in use"); try again with others.
        for attempt in 1..=3 {
            k.port = free_port();
            k.healthz_port = loop {
                let p = free_port();
                if p != k.port {
                    break p;
                }
            };
            fs::write(&k.config, k.config_yaml()).expect("write kubelet config.yaml");
            match k.spawn_and_wait(&binary) {
                Ok(()) => return k,
                Err(reason) if attempt < 3 && reason.contains("address already in use") => {
                    eprintln!("kubelet: port taken, trying others: {reason}");
                }
                Err(reason) => panic!(
                    "the kubelet did not start: {reason}\n(full log: {}; launcher: {})\n{}",
                    k.log.display(),
                    k.dir.join("launch.sh").display(),
                    k.log_tail(40)
                ),
            }
        }
        unreachable!("the start loop returns or panics");
    }

    /// The `KubeletConfiguration` (see the module docs for the reason of each field).
    pub fn config_yaml(&self) -> String {
        let d = self.dir.display();
        let sock = self.cri_socket.display();
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
staticPodPath: {d}/manifests
fileCheckFrequency: 1s
containerRuntimeEndpoint: unix://{sock}
imageServiceEndpoint: unix://{sock}
address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
protectKernelDefaults: true
makeIPTablesUtilChains: false
evictionHard: {{}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
resolvConf: ""
podLogsDir: {d}/pod-logs
oomScoreAdj: 0
"#,
            port = self.port,
            healthz = self.healthz_port,
        )
    }

    /// `DIR/launch.sh`: run inside `unshare --mount --propagation slave`; shows the kubelet the
    /// sysctl values it wants and empty `/var/log` and `/var/lib`, then execs it.
    fn write_launcher(&self) {
        let mut script = String::from(
            "#!/bin/sh\n\
             # Runs in the kubelet's own mount namespace (unshare --mount --propagation slave):\n\
             # nothing mounted here reaches the host. Usage: launch.sh KUBELET ARGS...\n\
             set -e\n",
        );
        for (key, value) in KERNEL_TUNABLES {
            let file = self.dir.join("sysctl").join(key.replace('/', "_"));
            fs::write(&file, format!("{value}\n")).expect("write sysctl stand-in");
            script.push_str(&format!(
                "mount --bind '{}' /proc/sys/{key}\n",
                file.display()
            ));
        }
        script.push_str(
            "mount -t tmpfs -o mode=0755 kubelet-var-log /var/log\n\
             mount -t tmpfs -o mode=0755 kubelet-var-lib /var/lib\n\
             mount -t tmpfs -o mode=0755 kubelet-no-hugepages /sys/kernel/mm/hugepages\n\
             exec \"$@\"\n",
        );
        fs::write(self.dir.join("launch.sh"), script).expect("write launch.sh");
    }

    fn spawn_and_wait(&mut self, binary: &Path) -> Result<(), String> {
        let (out, err) = log_file(&self.log);
        let d = &self.dir;
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "slave", "--", "/bin/sh"])
            .arg(d.join("launch.sh"))
            .arg(binary)
            .arg("--config")
            .arg(&self.config)
            .arg("--root-dir")
            .arg(&self.root_dir)
            .arg("--cert-dir")
            .arg(d.join("certs"))
            .arg("--hostname-override")
            .arg(&self.node_name)
            .arg("-v=2")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot spawn unshare: {e}"))?;
        self.child = Some(child);
        let healthz = format!("127.0.0.1:{}", self.healthz_port);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!(
                    "it exited during start-up ({status}):\n{}",
                    self.error_lines(8)
                ));
            }
            if http_get_status(&healthz, "/healthz") == Some(200) && self.try_pods().is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "/healthz on {healthz} and /pods on port {} did not answer within \
                     {START_TIMEOUT:?}; its errors:\n{}",
                    self.port,
                    self.error_lines(8)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The kubelet process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The static pod's name as the kubelet runs it: `NAME-NODE`.
    pub fn pod_name(&self, name: &str) -> String {
        format!("{name}-{}", self.node_name)
    }

    /// Writes the manifest `MANIFESTS/NAME.json` of a pod `name` in `namespace` with one
    /// container ([`CONTAINER`]) of `image` (its entrypoint runs), host network, no grace
    /// period. Returns the pod name the kubelet uses ([`Kubelet::pod_name`]). The file appears
    /// whole (written aside, then renamed in).
    pub fn write_static_pod(&self, name: &str, namespace: &str, image: &str) -> String {
        self.write_static_pod_with_command(name, namespace, image, &[])
    }

    /// [`Kubelet::write_static_pod`] with the container's `command` (none: the entrypoint).
    pub fn write_static_pod_with_command(
        &self,
        name: &str,
        namespace: &str,
        image: &str,
        command: &[&str],
    ) -> String {
        let mut container = serde_json::json!({
            "name": CONTAINER,
            "image": image,
            "imagePullPolicy": "IfNotPresent",
        });
        if !command.is_empty() {
            container["command"] = serde_json::json!(command);
        }
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "namespace": namespace },
            "spec": {
                "hostNetwork": true,
                "terminationGracePeriodSeconds": 0,
                "containers": [container],
            },
        });
        let aside = self.dir.join(format!("{name}.json.new"));
        fs::write(
            &aside,
            serde_json::to_vec_pretty(&pod).expect("serialize pod"),
        )
        .expect("write pod manifest");
        fs::rename(&aside, self.manifest(name)).expect("move pod manifest into staticPodPath");
        self.pod_name(name)
    }

    /// Deletes the manifest of static pod `name`: the kubelet kills the pod.
    pub fn remove_static_pod(&self, name: &str) {
        fs::remove_file(self.manifest(name))
            .unwrap_or_else(|e| panic!("remove static pod manifest {name}: {e}"));
    }

    fn manifest(&self, name: &str) -> PathBuf {
        self.manifests.join(format!("{name}.json"))
    }

    // -----------------------------------------------------------------------------------------
    // The runtime's view, through the CRI socket
    // -----------------------------------------------------------------------------------------

    /// Status of every container of pod `pod` (the kubelet's name, `NAME-NODE`) in `namespace`
    /// that the runtime holds, by the kubelet's labels `io.kubernetes.pod.name` and
    /// `io.kubernetes.pod.namespace`.
    pub fn containers_of(&self, pod: &str, namespace: &str) -> Vec<ContainerStatus> {
        let socket = self.cri_socket.clone();
        let labels = HashMap::from([
            ("io.kubernetes.pod.name".to_string(), pod.to_string()),
            (
                "io.kubernetes.pod.namespace".to_string(),
                namespace.to_string(),
            ),
        ]);
        block_on_fresh(async move {
            let mut rt = runtime_client(&socket).await;
            let list = rt
                .list_containers(ListContainersRequest {
                    filter: Some(ContainerFilter {
                        label_selector: labels,
                        ..Default::default()
                    }),
                })
                .await
                .expect("ListContainers")
                .into_inner()
                .containers;
            let mut out = Vec::new();
            for c in list {
                let status = rt
                    .container_status(ContainerStatusRequest {
                        container_id: c.id.clone(),
                        verbose: false,
                    })
                    .await
                    .map(|r| r.into_inner().status);
                // A container removed in between is simply not there.
                if let Ok(Some(s)) = status {
                    out.push(s);
                }
            }
            out
        })
    }

    /// Waits until pod `pod` in `namespace` has a running container and returns its CRI
    /// status; panics after `timeout` with the kubelet's pod status and log lines on the pod.
    pub fn wait_running_container(
        &self,
        pod: &str,
        namespace: &str,
        timeout: Duration,
    ) -> ContainerStatus {
        let deadline = Instant::now() + timeout;
        for poll in 1.. {
            if let Some(c) = self
                .containers_of(pod, namespace)
                .into_iter()
                .find(|c| c.state == ContainerState::ContainerRunning as i32)
            {
                return c;
            }
            // Every half second: give up at once on an error the kubelet will only retry.
            if poll % 5 == 0 {
                if let Some(c) = self.container_status(pod, namespace) {
                    let waiting = &c["state"]["waiting"];
                    let reason = waiting["reason"].as_str().unwrap_or("");
                    if CONTAINER_ERRORS.contains(&reason) {
                        panic!(
                            "pod {namespace}/{pod} will not run: the kubelet reports {reason}: \
                             {}\n{}",
                            waiting["message"].as_str().unwrap_or(""),
                            self.diagnose(pod, namespace)
                        );
                    }
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "no running container of pod {namespace}/{pod} within {timeout:?}\n{}",
                    self.diagnose(pod, namespace)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        unreachable!("the poll loop returns or panics");
    }

    /// Waits until the runtime holds no container of pod `pod` in `namespace` that is running.
    pub fn wait_no_running_container(&self, pod: &str, namespace: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let running: Vec<_> = self
                .containers_of(pod, namespace)
                .into_iter()
                .filter(|c| c.state == ContainerState::ContainerRunning as i32)
                .map(|c| c.id)
                .collect();
            if running.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "containers {running:?} of pod {namespace}/{pod} still run after \
                     {timeout:?}\n{}",
                    self.diagnose(pod, namespace)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // -----------------------------------------------------------------------------------------
    // The kubelet's view: GET /pods
    // -----------------------------------------------------------------------------------------

    fn try_pods(&self) -> Result<Value, String> {
        let out = Command::new("curl")
            .args(["-sSk", "--max-time", "5"])
            .arg(format!("https://127.0.0.1:{}/pods", self.port))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run curl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "curl ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "/pods is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The kubelet's `GET /pods` (a `PodList` of what it runs, with status).
    pub fn pods(&self) -> Value {
        self.try_pods()
            .unwrap_or_else(|e| panic!("GET /pods of the kubelet: {e}\n{}", self.log_tail(20)))
    }

    /// The kubelet's pod object for `pod` in `namespace`, if it has one.
    pub fn pod(&self, pod: &str, namespace: &str) -> Option<Value> {
        find_pod(&self.pods(), pod, namespace)
    }

    /// The kubelet's status of container [`CONTAINER`] of the pod, if it reports one (None too
    /// if `/pods` does not answer).
    pub fn container_status(&self, pod: &str, namespace: &str) -> Option<Value> {
        let p = find_pod(&self.try_pods().ok()?, pod, namespace)?;
        p["status"]["containerStatuses"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == CONTAINER)
            .cloned()
    }

    /// Waits until the kubelet reports container [`CONTAINER`] of the pod waiting for its image
    /// (`ErrImagePull` or `ImagePullBackOff`) with a message; returns (reason, message).
    pub fn wait_image_error(
        &self,
        pod: &str,
        namespace: &str,
        timeout: Duration,
    ) -> (String, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.container_status(pod, namespace) {
                let waiting = &c["state"]["waiting"];
                let reason = waiting["reason"].as_str().unwrap_or("");
                let message = waiting["message"].as_str().unwrap_or("");
                if matches!(reason, "ErrImagePull" | "ImagePullBackOff") && !message.is_empty() {
                    return (reason.to_string(), message.to_string());
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "the kubelet reported no image error for pod {namespace}/{pod} within \
                     {timeout:?}\n{}",
                    self.diagnose(pod, namespace)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // -----------------------------------------------------------------------------------------
    // Its log
    // -----------------------------------------------------------------------------------------

    /// The whole kubelet log.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines mentioning `needle`.
    pub fn log_lines_with(&self, needle: &str) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// The last `n` informative log lines: without the flag dump and the "mirror pod" line the
    /// standalone kubelet logs on every sync of a static pod.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().filter(|l| !is_noise(l)).collect();
        let start = lines.len().saturating_sub(n);
        format!(
            "--- kubelet log tail ({}) ---\n{}",
            self.log.display(),
            lines[start..].join("\n")
        )
    }

    /// The last `n` lines that say why it failed: klog errors (`E…`, `F…`) and anything not
    /// from klog (the launcher's `mount`, Go panics).
    fn error_lines(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| {
                let klog = klog_level(l);
                matches!(klog, Some('E' | 'F'))
                    || (klog.is_none() && !l.starts_with("Flag --") && !l.trim().is_empty())
            })
            .collect();
        if lines.is_empty() {
            return format!("(no error lines; log tail follows)\n{}", self.log_tail(15));
        }
        let start = lines.len().saturating_sub(n);
        lines[start..].join("\n")
    }

    /// What the kubelet and the runtime say about a pod, for panic messages.
    fn diagnose(&self, pod: &str, namespace: &str) -> String {
        let status = match self.try_pods() {
            Ok(pods) => find_pod(&pods, pod, namespace)
                .map(|p| serde_json::to_string_pretty(&p["status"]).unwrap_or_default())
                .unwrap_or_else(|| "(the kubelet has no such pod)".into()),
            Err(e) => format!("(GET /pods failed: {e})"),
        };
        let lines = self.log_lines_with(pod);
        let start = lines.len().saturating_sub(15);
        format!(
            "kubelet pod status: {status}\nruntime containers: {:?}\nkubelet log lines on the \
             pod:\n{}\n{}",
            self.containers_of(pod, namespace)
                .iter()
                .map(|c| (c.id.clone(), c.state, c.image_ref.clone()))
                .collect::<Vec<_>>(),
            lines[start..].join("\n"),
            self.log_tail(15)
        )
    }

    // -----------------------------------------------------------------------------------------
    // Teardown
    // -----------------------------------------------------------------------------------------

    /// Kills the kubelet (SIGKILL) and reaps it; its pods stay in the runtime.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and removes, through the CRI socket, every pod sandbox this kubelet made (named
    /// `*-NODE`); returns how many. Best effort (20 s), errors are printed.
    pub fn remove_pods(&self) -> usize {
        if !self.cri_socket.exists() {
            return 0;
        }
        let socket = self.cri_socket.clone();
        let suffix = format!("-{}", self.node_name);
        block_on_fresh(async move {
            let work = async {
                let channel = super::try_cri_channel(&socket)
                    .await
                    .map_err(|e| format!("connect {}: {e:?}", socket.display()))?;
                let mut rt =
                    k8s_cri::v1::runtime_service_client::RuntimeServiceClient::new(channel);
                let sandboxes = rt
                    .list_pod_sandbox(ListPodSandboxRequest { filter: None })
                    .await
                    .map_err(|e| format!("ListPodSandbox: {e}"))?
                    .into_inner()
                    .items;
                let mut removed = 0;
                for sb in sandboxes {
                    let ours = sb
                        .metadata
                        .as_ref()
                        .is_some_and(|m| m.name.ends_with(&suffix));
                    if !ours {
                        continue;
                    }
                    if let Err(e) = rt
                        .stop_pod_sandbox(StopPodSandboxRequest {
                            pod_sandbox_id: sb.id.clone(),
                        })
                        .await
                    {
                        eprintln!("kubelet teardown: StopPodSandbox {}: {e}", sb.id);
                    }
                    match rt
                        .remove_pod_sandbox(RemovePodSandboxRequest {
                            pod_sandbox_id: sb.id.clone(),
                        })
                        .await
                    {
                        Ok(_) => removed += 1,
                        Err(e) => eprintln!("kubelet teardown: RemovePodSandbox {}: {e}", sb.id),
                    }
                }
                Ok::<usize, String>(removed)
            };
            match tokio::time::timeout(Duration::from_secs(20), work).await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    eprintln!("kubelet teardown: pods not removed: {e}");
                    0
                }
                Err(_) => {
                    eprintln!("kubelet teardown: removing pods timed out after 20 s");
                    0
                }
            }
        })
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(40));
        }
        self.kill();
        self.remove_pods();
        kill_processes_mentioning(&self.dir);
        unmount_under(&self.dir);
        if let Some(tmp) = self.tmp.take() {
            let path = tmp.path().to_path_buf();
            if let Err(e) = tmp.close() {
                eprintln!("kubelet teardown: cannot remove {}: {e}", path.display());
            }
        }
    }
}

/// The pod `pod` in `namespace` of a `/pods` answer.
fn find_pod(pods: &Value, pod: &str, namespace: &str) -> Option<Value> {
    pods["items"].as_array()?.iter().find_map(|p| {
        (p["metadata"]["name"] == pod && p["metadata"]["namespace"] == namespace).then(|| p.clone())
    })
}

/// `Some('I' | 'W' | 'E' | 'F')` for a klog line (`E1207 04:56:07.049147 ...`).
fn klog_level(line: &str) -> Option<char> {
    let mut chars = line.chars();
    let level = chars.next()?;
    let digits: String = chars.take(4).collect();
    (matches!(level, 'I' | 'W' | 'E' | 'F')
        && digits.len() == 4
        && digits.chars().all(|c| c.is_ascii_digit()))
    .then_some(level)
}

/// The flag dump at start, and the standalone kubelet's "Creating a mirror pod" on every sync.
fn is_noise(line: &str) -> bool {
    line.contains("flags.go") && line.contains("FLAG: --")
        || line.contains("Creating a mirror pod for static pod")
        || line.starts_with("Flag --")
}
