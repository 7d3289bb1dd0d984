//! The runtime matrix: a real container runtime with the CRI, in a temp dir, chosen by
//! `IMAGESTREAM_TEST_RUNTIME` ([`RuntimeKind::from_env`]):
//!
//! | value          | runtime                                   | from                              |
//! |----------------|-------------------------------------------|-----------------------------------|
//! | `containerd2`  | containerd 2.2 (default), config version 3 | `scripts/test-tools.sh` (Go module) |
//! | `containerd16` | containerd 1.6, config version 2          | Debian 12's `containerd` package  |
//! | `crio`         | CRI-O 1.34 with `conmon`, `vfs` storage   | `scripts/test-tools.sh`, Debian's `conmon` |
//!
//! [`RuntimeBed::start`] writes the runtime's config (everything — root, state, sockets, runc
//! root, logs — under the bed's dir), starts it and waits until CRI `Version` answers;
//! [`RuntimeBed::stop`] / [`RuntimeBed::start_again`] keep its state; `Drop` kills it, its shims or
//! conmons and their containers, and unmounts what it left. [`RuntimeBed::start_in`] /
//! [`RuntimeBed::start_kind_in`] run it in a network namespace of a [`super::netns::Lan`]
//! (`nsenter --net`, so the shims and host-network containers are there too).
//!
//! Registry routing, the same call for every runtime:
//! - [`RuntimeBed::route_registry`] sends pulls of a registry host to another address (critest's
//!   look-alike images): a `hosts.toml` `server` for containerd, a `[[registry]]` `prefix` →
//!   `location` entry for CRI-O.
//! - [`RuntimeBed::mirror_config_dir`] is where `imagestream mirror hosts-toml` (containerd:
//!   `certs.d`) or `imagestream mirror registries-conf` (CRI-O: `registries.conf.d`) write, and
//!   [`RuntimeBed::reload_registries`] makes the runtime see it (containerd re-reads hosts.toml on
//!   every pull; CRI-O reloads on SIGHUP).
//!
//! What each runtime needs on these machines (no `CAP_SYS_RESOURCE`, cgroup v1, no AppArmor):
//! - containerd 1.6: `disable_cgroup` unless [`BedOptions::cgroups`], `restrict_oom_score_adj`.
//! - containerd 2.x: `overlayfs` works here; `restrict_oom_score_adj`; NRI off; cgroups always on
//!   (version 3 has no `disable_cgroup`).
//! - CRI-O: `vfs` storage, `cgroupfs`, loopback registries insecure, events on, host ports by the
//!   CNI `portmap` plugin (CRI-O 1.34.0's own host-port manager crashes without `nft`), and runc
//!   behind a wrapper that clamps a container's `oomScoreAdj` to its own ([`RUNC_RESTRICT_OOM`],
//!   what containerd's `restrict_oom_score_adj` does): CRI-O gives its infra (pause) containers
//!   -998, and lowering a score needs `CAP_SYS_RESOURCE`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{
    block_on_fresh, cri_version, file_tail, harness_tempdir, kill_processes_mentioning, log_file,
    push_pause_image, require_binary, require_root, send_signal, tools, unmount_under,
    wait_or_kill, Registry,
};

/// The environment variable that picks the runtime of every test bed.
pub const RUNTIME_ENV: &str = "IMAGESTREAM_TEST_RUNTIME";

/// How long a runtime may take to answer CRI `Version` after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A runtime of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeKind {
    /// Debian 12's containerd 1.6.
    Containerd16,
    /// containerd 2.2, built by `scripts/test-tools.sh`: the default.
    Containerd2,
    /// CRI-O 1.34, built by `scripts/test-tools.sh`.
    Crio,
}

impl RuntimeKind {
    /// Every kind, in the order of the matrix.
    pub const ALL: [RuntimeKind; 3] = [
        RuntimeKind::Containerd2,
        RuntimeKind::Containerd16,
        RuntimeKind::Crio,
    ];

    /// The kind named by `IMAGESTREAM_TEST_RUNTIME` (default `containerd2`); panics naming the
    /// valid values on anything else.
    pub fn from_env() -> RuntimeKind {
        match std::env::var(RUNTIME_ENV) {
            Err(_) => RuntimeKind::Containerd2,
            Ok(v) if v.is_empty() => RuntimeKind::Containerd2,
            Ok(v) => RuntimeKind::parse(&v).unwrap_or_else(|| {
                panic!("{RUNTIME_ENV}={v:?}: expected containerd2, containerd16 or crio")
            }),
        }
    }

    pub fn parse(s: &str) -> Option<RuntimeKind> {
        RuntimeKind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The value of `IMAGESTREAM_TEST_RUNTIME` that selects it.
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Containerd16 => "containerd16",
            RuntimeKind::Containerd2 => "containerd2",
            RuntimeKind::Crio => "crio",
        }
    }

    pub fn is_containerd(self) -> bool {
        !matches!(self, RuntimeKind::Crio)
    }
}

/// Settings of a bed beyond the defaults (which suit pods with host networking).
#[derive(Clone, Debug, Default)]
pub struct BedOptions {
    /// Put containers in cgroups (containerd 1.6 runs without them unless this is set; the other
    /// two always use them).
    pub cgroups: bool,
    /// Mount pod network namespaces under the bed's state dir (containerd), not `/run/netns`.
    pub netns_under_state_dir: bool,
}

/// A real CRI runtime in a temp dir.
pub struct RuntimeBed {
    pub kind: RuntimeKind,
    /// The bed's temp dir.
    pub dir: PathBuf,
    /// The runtime's CRI unix socket.
    pub socket: PathBuf,
    /// The runtime's main config file.
    pub config: PathBuf,
    /// `<dir>/runtime.log` (stdout and stderr, appended across restarts).
    pub log: PathBuf,
    /// Registry address used for the sandbox (pause) image.
    pub registry_addr: String,
    /// Where pod networks are configured (`*.conflist`).
    pub cni_conf_dir: PathBuf,
    options: BedOptions,
    /// The network namespace the runtime (and so its shims and host-network containers) runs
    /// in ([`RuntimeBed::start_in`]); `None`: the test's own.
    netns: Option<String>,
    /// CRI-O: registry host → location, rendered into `registries.conf`.
    routes: BTreeMap<String, String>,
    child: Option<Child>,
    tmp: Option<TempDir>,
}

impl RuntimeBed {
    /// Pushes the pause image to `registry` if needed, then starts the runtime of
    /// `IMAGESTREAM_TEST_RUNTIME`.
    pub fn start(registry: &Registry) -> RuntimeBed {
        push_pause_image(registry);
        Self::start_with_registry_addr(&registry.addr)
    }

    /// Like [`RuntimeBed::start`], but only sets the sandbox image to `<addr>/pause:test` (the
    /// caller makes sure it exists there).
    pub fn start_with_registry_addr(registry_addr: &str) -> RuntimeBed {
        Self::start_kind(
            RuntimeKind::from_env(),
            registry_addr,
            BedOptions::default(),
        )
    }

    /// A bed of the given kind and options.
    pub fn start_kind(kind: RuntimeKind, registry_addr: &str, options: BedOptions) -> RuntimeBed {
        Self::start_kind_netns(kind, registry_addr, options, None)
    }

    /// Like [`RuntimeBed::start`], with the runtime of `IMAGESTREAM_TEST_RUNTIME` running in
    /// `host`'s network namespace: the runtime, its shims (or conmons) and the containers of
    /// host-network pods see only that host's interfaces (`lo` and its LAN address). Its unix
    /// sockets and state are files under [`RuntimeBed::dir`] as usual.
    pub fn start_in(host: &super::netns::NetHost, registry: &Registry) -> RuntimeBed {
        push_pause_image(registry);
        Self::start_kind_in(
            RuntimeKind::from_env(),
            &registry.addr,
            BedOptions::default(),
            host,
        )
    }

    /// [`RuntimeBed::start_kind`] in `host`'s network namespace (see [`RuntimeBed::start_in`]).
    pub fn start_kind_in(
        kind: RuntimeKind,
        registry_addr: &str,
        options: BedOptions,
        host: &super::netns::NetHost,
    ) -> RuntimeBed {
        Self::start_kind_netns(kind, registry_addr, options, Some(host.netns.clone()))
    }

    /// The network namespace the runtime runs in, if not the test's own.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    fn start_kind_netns(
        kind: RuntimeKind,
        registry_addr: &str,
        options: BedOptions,
        netns: Option<String>,
    ) -> RuntimeBed {
        require_root(kind.name());
        require_binary("runc", "runc");
        let tmp = harness_tempdir(match kind {
            RuntimeKind::Containerd16 => "isctd-",
            RuntimeKind::Containerd2 => "isctd2-",
            RuntimeKind::Crio => "iscrio-",
        });
        let dir = tmp.path().to_path_buf();
        let socket = dir.join(match kind {
            RuntimeKind::Crio => "crio.sock",
            _ => "containerd.sock",
        });
        assert!(
            socket.as_os_str().len() < 100,
            "runtime socket path too long for a unix socket: {}",
            socket.display()
        );
        for sub in [
            "root",
            "state",
            "certs.d",
            "cni/net.d",
            "opt",
            "runc",
            "registries.conf.d",
            "crio.conf.d",
        ] {
            fs::create_dir_all(dir.join(sub)).expect("create runtime bed subdir");
        }
        let config = dir.join(match kind {
            RuntimeKind::Crio => "crio.conf",
            _ => "config.toml",
        });
        let mut bed = RuntimeBed {
            kind,
            log: dir.join("runtime.log"),
            cni_conf_dir: dir.join("cni/net.d"),
            socket,
            config,
            registry_addr: registry_addr.to_string(),
            options,
            netns,
            routes: BTreeMap::new(),
            dir,
            child: None,
            tmp: Some(tmp),
        };
        bed.write_config();
        bed.start_again();
        bed
    }

    /// "unix:///path/to/runtime.sock"
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The runtime process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the runtime process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// containerd's own client, `ctr --address SOCKET --namespace k8s.io` (the CRI's
    /// namespace), of the bed's containerd version; panics on CRI-O.
    pub fn ctr(&self) -> Command {
        let bin = match self.kind {
            RuntimeKind::Containerd16 => PathBuf::from("ctr"),
            RuntimeKind::Containerd2 => containerd2_dir().join("ctr"),
            RuntimeKind::Crio => panic!("ctr is containerd's; this bed runs CRI-O"),
        };
        let mut c = Command::new(bin);
        c.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"]);
        c
    }

    /// containerd's `<dir>/certs.d/<host>/hosts.toml` (re-read on every pull).
    pub fn hosts_toml(&self, host: &str) -> PathBuf {
        assert!(
            self.kind.is_containerd(),
            "hosts.toml is containerd's; this bed runs {}",
            self.kind.name()
        );
        self.dir.join("certs.d").join(host).join("hosts.toml")
    }

    /// Where the runtime reads per-registry mirror config: containerd's `config_path`
    /// (`certs.d`, for `imagestream mirror hosts-toml --dir`), CRI-O's `registries.conf.d`
    /// (for `imagestream mirror registries-conf --dir`).
    pub fn mirror_config_dir(&self) -> PathBuf {
        if self.kind.is_containerd() {
            self.dir.join("certs.d")
        } else {
            self.dir.join("registries.conf.d")
        }
    }

    /// Sends pulls of `host` to the registry at `to` (plain HTTP), keeping the repository path.
    pub fn route_registry(&mut self, host: &str, to: &str) {
        if self.kind.is_containerd() {
            let path = self.hosts_toml(host);
            fs::create_dir_all(path.parent().expect("hosts.toml dir")).expect("mkdir certs.d/HOST");
            fs::write(
                &path,
                format!(
                    "# Test bed: {host} is served by {to}.\n\
                     server = \"http://{to}\"\n\n\
                     [host.\"http://{to}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
                ),
            )
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        } else {
            self.routes.insert(host.to_string(), to.to_string());
            self.write_config();
            self.reload_registries();
        }
    }

    /// Makes the runtime read its registry config again: a no-op for containerd (it reads
    /// `hosts.toml` on every pull); CRI-O gets SIGHUP and this waits (10 s) for its log line
    /// "applied new registry configuration".
    pub fn reload_registries(&self) {
        if self.kind.is_containerd() {
            return;
        }
        let Some(pid) = self.pid() else {
            return;
        };
        let needle = "applied new registry configuration";
        let count = || {
            fs::read_to_string(&self.log)
                .unwrap_or_default()
                .to_ascii_lowercase()
                .matches(needle)
                .count()
        };
        let before = count();
        send_signal(&[pid], "HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while count() == before {
            assert!(
                Instant::now() < deadline,
                "CRI-O did not log {needle:?} within 10 s of SIGHUP; log tail:\n{}",
                file_tail(&self.log, 4000)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Changes the bed's options: rewrites the config and restarts the runtime (state kept).
    pub fn set_options(&mut self, options: BedOptions) {
        self.options = options;
        self.write_config();
        self.start_again();
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Shims, conmons, containers and state are left
    /// alone so that [`RuntimeBed::start_again`] picks them up.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(&[child.id()], "TERM");
            wait_or_kill(&mut child, Duration::from_secs(10));
        }
    }

    /// Starts the runtime again with the same config and socket; waits for CRI `Version`.
    pub fn start_again(&mut self) {
        self.stop();
        let (out, err) = log_file(&self.log);
        let mut cmd = match self.kind {
            RuntimeKind::Containerd16 => {
                require_binary("containerd", "containerd");
                require_binary("containerd-shim-runc-v2", "containerd");
                let mut c = super::netns::command_in(self.netns.as_deref(), "containerd");
                c.arg("--config").arg(&self.config);
                c
            }
            RuntimeKind::Containerd2 => {
                // Its own shim must come first on PATH (Debian's 1.6 shim is there too).
                let bin = containerd2_dir();
                let path = std::env::var_os("PATH").unwrap_or_default();
                let path = std::env::join_paths(
                    std::iter::once(bin.clone()).chain(std::env::split_paths(&path)),
                )
                .expect("PATH");
                let mut c = super::netns::command_in(self.netns.as_deref(), bin.join("containerd"));
                c.env("PATH", path).arg("--config").arg(&self.config);
                c
            }
            RuntimeKind::Crio => {
                require_binary("conmon", "conmon");
                let mut c = super::netns::command_in(self.netns.as_deref(), tools::tool("crio"));
                c.arg("--config")
                    .arg(&self.config)
                    .arg("--config-dir")
                    .arg(self.dir.join("crio.conf.d"))
                    .arg("--registries-conf")
                    .arg(self.dir.join("registries.conf"))
                    .arg("--registries-conf-dir")
                    .arg(self.dir.join("registries.conf.d"));
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.kind.name()));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_err = String::from("socket never appeared");
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "{} exited early ({status}); log tail:\n{}",
                    self.kind.name(),
                    file_tail(&self.log, 6000)
                );
            }
            if self.socket.exists() {
                let socket = self.socket.clone();
                match block_on_fresh(async move {
                    tokio::time::timeout(Duration::from_secs(3), cri_version(&socket)).await
                }) {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) => last_err = e,
                    Err(_) => last_err = "CRI Version call timed out".into(),
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not answer CRI Version within {START_TIMEOUT:?} ({last_err}); log tail:\n{}",
                    self.kind.name(),
                    file_tail(&self.log, 6000)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Full teardown without dropping: stop the runtime, kill shims, conmons and containers,
    /// unmount. The temp dir is removed on drop.
    pub fn kill_all(&mut self) {
        self.stop();
        kill_processes_mentioning(&self.dir);
        unmount_under(&self.dir);
    }

    fn write_config(&self) {
        let text = match self.kind {
            RuntimeKind::Containerd16 => {
                containerd16_config(&self.dir, &self.registry_addr, &self.options)
            }
            RuntimeKind::Containerd2 => {
                containerd2_config(&self.dir, &self.registry_addr, &self.options)
            }
            RuntimeKind::Crio => {
                let registries = crio_registries_conf(&self.routes);
                fs::write(self.dir.join("registries.conf"), registries)
                    .expect("write registries.conf");
                write_executable(&self.dir.join("runc-restrict-oom"), RUNC_RESTRICT_OOM);
                fs::write(
                    self.dir.join("policy.json"),
                    "{\"default\":[{\"type\":\"insecureAcceptAnything\"}]}\n",
                )
                .expect("write policy.json");
                crio_config(&self.dir, &self.registry_addr)
            }
        };
        fs::write(&self.config, text)
            .unwrap_or_else(|e| panic!("write {}: {e}", self.config.display()));
    }
}

impl Drop for RuntimeBed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "harness: {} log tail ({}):\n{}",
                self.kind.name(),
                self.log.display(),
                file_tail(&self.log, 3000)
            );
        }
        self.kill_all();
        if let Some(tmp) = self.tmp.take() {
            let path = tmp.path().to_path_buf();
            if tmp.close().is_err() {
                // Something was still mounted or busy: try once more.
                kill_processes_mentioning(&path);
                unmount_under(&path);
                if let Err(e) = fs::remove_dir_all(&path) {
                    eprintln!("harness: cannot remove {}: {e}", path.display());
                }
            }
        }
    }
}

/// CRI-O's OCI runtime in the bed: runc, with a container's `oomScoreAdj` raised to at least
/// this process's own before `create`, as containerd's `restrict_oom_score_adj` does. CRI-O
/// gives every infra (pause) container -998, hard-coded, and lowering a score needs
/// `CAP_SYS_RESOURCE`, which these machines lack: without this, every pod with a pod-level PID
/// namespace (critest's default) fails ("nsexec: failed to update /proc/self/oom_score_adj:
/// Permission denied"). The bundle's `config.json` is rewritten in place (CRI-O writes it
/// compact).
const RUNC_RESTRICT_OOM: &str = r#"#!/bin/sh
# Test bed only: runc with oomScoreAdj clamped to this process's own (containerd's
# restrict_oom_score_adj), for a machine without CAP_SYS_RESOURCE. See tests/common/runtime.rs.
bundle=.
create=
prev=
for a in "$@"; do
  case "$prev" in --bundle|-b) bundle=$a ;; esac
  case "$a" in create|run) create=1 ;; --bundle=*) bundle=${a#--bundle=} ;; esac
  prev=$a
done
if [ -n "$create" ] && [ -f "$bundle/config.json" ]; then
  own=$(cat /proc/self/oom_score_adj)
  sed -i -E "s/\"oomScoreAdj\": *-[0-9]+/\"oomScoreAdj\":$own/" "$bundle/config.json"
fi
exec /usr/sbin/runc "$@"
"#;

fn write_executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// The dir holding containerd 2's `containerd`, `containerd-shim-runc-v2` and `ctr`
/// (`$IMAGESTREAM_TEST_TOOLS/containerd2`).
pub fn containerd2_dir() -> PathBuf {
    let dir = tools::tools_dir().join("containerd2");
    assert!(
        dir.join("containerd").is_file() && dir.join("containerd-shim-runc-v2").is_file(),
        "containerd 2 not found in {} ({RUNTIME_ENV}=containerd2 is the default): run \
         `bash scripts/test-tools.sh` first, or pick another runtime with {RUNTIME_ENV}",
        dir.display()
    );
    dir
}

fn containerd16_config(dir: &Path, registry_addr: &str, o: &BedOptions) -> String {
    let d = dir.display();
    let disable_cgroup = !o.cgroups;
    let netns = o.netns_under_state_dir;
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.overlayfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{d}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  disable_cgroup = {disable_cgroup}
  netns_mounts_under_state_dir = {netns}
  restrict_oom_score_adj = true
  disable_apparmor = true
  sandbox_image = "{registry_addr}/pause:test"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"#
    )
}

/// containerd 2.x, config version 3: the CRI plugin is split into `io.containerd.cri.v1.images`
/// (snapshotter, sandbox image, registry `config_path`) and `io.containerd.cri.v1.runtime`
/// (runtimes, CNI, OOM and AppArmor settings); the gRPC-facing `io.containerd.grpc.v1.cri` keeps
/// the streaming server. CRI pulls go through the transfer service, which unpacks for the
/// snapshotters its `unpack_config` lists (overlayfs by default).
fn containerd2_config(dir: &Path, registry_addr: &str, o: &BedOptions) -> String {
    let d = dir.display();
    let netns = o.netns_under_state_dir;
    format!(
        r#"version = 3
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
  "io.containerd.nri.v1.nri",
]

[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{registry_addr}/pause:test"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{d}/certs.d"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_cdi = false
  netns_mounts_under_state_dir = {netns}
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "{d}/runc"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{d}/cni/net.d"
"#
    )
}

/// CRI-O: `vfs` storage in the bed, runc and Debian's conmon, cgroupfs, no NRI or metrics, the
/// pause image's own entrypoint (`pause_command = ""`), and every signature accepted (the test
/// registry's images are unsigned).
fn crio_config(dir: &Path, registry_addr: &str) -> String {
    let d = dir.display();
    let pinns = tools::tool("pinns");
    let pinns = pinns.display();
    format!(
        r#"[crio]
root = "{d}/root"
runroot = "{d}/state/storage"
storage_driver = "vfs"
log_dir = "{d}/state/logs"
version_file = "{d}/state/version"
version_file_persist = "{d}/root/version"
clean_shutdown_file = "{d}/root/clean.shutdown"

[crio.api]
listen = "{d}/crio.sock"
stream_address = "127.0.0.1"
stream_port = "0"

[crio.runtime]
default_runtime = "runc"
cgroup_manager = "cgroupfs"
conmon_cgroup = "pod"
selinux = false
container_exits_dir = "{d}/state/exits"
container_attach_socket_dir = "{d}/state"
namespaces_dir = "{d}/state/ns"
pinns_path = "{pinns}"
irqbalance_config_restore_file = "disable"
# GetContainerEvents streams events (the kubelet's evented PLEG); off by default.
enable_pod_events = true
# Host ports by the CNI portmap plugin (critest's network has it): CRI-O 1.34.0's own host port
# manager dereferences a nil nftables manager on a machine without nft and crashes.
disable_hostport_mapping = true

[crio.runtime.runtimes.runc]
runtime_path = "{d}/runc-restrict-oom"
runtime_type = "oci"
runtime_root = "{d}/runc"
monitor_path = "/usr/bin/conmon"
monitor_cgroup = "pod"

[crio.image]
pause_image = "{registry_addr}/pause:test"
pause_command = ""
signature_policy = "{d}/policy.json"
insecure_registries = ["127.0.0.0/8"]

[crio.network]
network_dir = "{d}/cni/net.d"
plugin_dirs = ["/usr/lib/cni"]

[crio.metrics]
enable_metrics = false

[crio.nri]
enable_nri = false
"#
    )
}

/// CRI-O's `registries.conf`: short names enforced (CRI-O's default), loopback registries over
/// plain HTTP, and the bed's routes as `prefix` → `location` entries.
fn crio_registries_conf(routes: &BTreeMap<String, String>) -> String {
    let mut text = String::from(
        "# Test bed: every loopback registry is plain HTTP.\n\
         short-name-mode = \"enforcing\"\n\n\
         [[registry]]\nlocation = \"127.0.0.1\"\ninsecure = true\n\n\
         [[registry]]\nlocation = \"localhost\"\ninsecure = true\n",
    );
    for (host, to) in routes {
        text.push_str(&format!(
            "\n[[registry]]\nprefix = \"{host}\"\nlocation = \"{to}\"\ninsecure = true\n"
        ));
    }
    text
}
