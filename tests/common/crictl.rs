//! crictl (Kubernetes' CRI command line, `sigs.k8s.io/cri-tools`, built by
//! `scripts/test-tools.sh`) against one CRI unix socket, as an operator on a node would use it.
//!
//! - [`Crictl`]: runs `crictl --config DIR/crictl.yaml --runtime-endpoint unix://SOCK
//!   --image-endpoint unix://SOCK --timeout 60s ARGS…`. Every invocation is a new process and so
//!   a new connection: its first call is the first call on that connection. The config file the
//!   helper writes keeps a host's `/etc/crictl.yaml` out of the test.
//! - Config files crictl reads (`runp`, `create`, `pull --pod-config`): [`Crictl::pod_config`]
//!   (host network, so no CNI, and a namespace, so that the stream access check has one) and
//!   [`Crictl::container_config`].
//! - The usual calls as helpers ([`Crictl::pull`], [`Crictl::runp`], [`Crictl::create`],
//!   [`Crictl::start`], [`Crictl::exec`], [`Crictl::remove_pod`], …), panicking with crictl's
//!   stdout and stderr when a call fails; [`Crictl::run`] for an answer the test wants to look at
//!   whatever it is.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use super::tools::tool;

/// What one crictl invocation printed, and how it exited.
#[derive(Debug)]
pub struct CrictlOutput {
    /// The arguments after the connection flags, for messages.
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CrictlOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Stdout and stderr, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "crictl {:?} ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args, self.status, self.stdout, self.stderr
        )
    }
}

/// crictl pointed at one CRI socket (runtime and image endpoint alike).
pub struct Crictl {
    /// The CRI unix socket.
    pub socket: PathBuf,
    /// Where the config files of this helper go (crictl.yaml, pod and container configs, pod
    /// log dirs).
    pub dir: PathBuf,
    /// `<dir>/crictl.yaml`, passed as `--config`.
    pub config: PathBuf,
    bin: PathBuf,
}

impl Crictl {
    /// crictl against `socket`, with its files under `dir` (created).
    pub fn new(socket: &Path, dir: &Path) -> Crictl {
        let bin = tool("crictl");
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let config = dir.join("crictl.yaml");
        let endpoint = format!("unix://{}", socket.display());
        // The flags below say the same; the file keeps a host's /etc/crictl.yaml (and its
        // pull-image-on-create, debug, …) out of the test, and crictl's "config does not
        // exist" warning out of stderr.
        fs::write(
            &config,
            format!(
                "runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: 60\n\
                 debug: false\npull-image-on-create: false\ndisable-pull-on-run: false\n"
            ),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        Crictl {
            socket: socket.to_path_buf(),
            dir: dir.to_path_buf(),
            config,
            bin,
        }
    }

    /// "unix:///path/to.sock"
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Runs crictl with `args`; never panics on crictl's own failure.
    pub fn run(&self, args: &[&str]) -> CrictlOutput {
        let endpoint = self.endpoint();
        let out = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(["--runtime-endpoint", &endpoint])
            .args(["--image-endpoint", &endpoint])
            .args(["--timeout", "60s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.bin.display()));
        CrictlOutput {
            args: args.iter().map(|s| s.to_string()).collect(),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs crictl and returns its stdout, trimmed; panics showing both outputs if it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.success(),
            "{} against {}",
            out.describe(),
            self.socket.display()
        );
        out.stdout.trim().to_string()
    }

    /// Runs crictl expecting it to fail (exit code 1); returns what it printed on stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "expected crictl to fail with exit code 1: {} against {}",
            out.describe(),
            self.socket.display()
        );
        out.stderr
    }

    /// Runs crictl (with `-o json` among `args`) and parses its stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("crictl {args:?} printed no JSON ({e}):\n{out}"))
    }

    /// Writes `<dir>/pod-NAME.json`, the config of a pod `name` in `namespace` (uid
    /// `uid-NAME`, attempt 0) with the node's network (`namespace_options.network: 2`, NODE:
    /// no CNI needed), a PID namespace per container (CONTAINER, the kubelet's default; a
    /// pod-level one fails on CRI-O here), the pod's IPC namespace (POD), and `<dir>/logs/NAME`
    /// as log directory (created). Returns the file's path.
    pub fn pod_config(&self, name: &str, namespace: &str) -> PathBuf {
        let logs = self.dir.join("logs").join(name);
        fs::create_dir_all(&logs).unwrap_or_else(|e| panic!("create {}: {e}", logs.display()));
        let config = serde_json::json!({
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": format!("uid-{name}"),
                "attempt": 0,
            },
            "log_directory": logs,
            "labels": { "imagestream.test/pod": name },
            "linux": {
                "security_context": {
                    // NamespaceMode: POD = 0, CONTAINER = 1, NODE = 2.
                    "namespace_options": namespace_options()
                }
            }
        });
        self.write_json(&format!("pod-{name}.json"), &config)
    }

    /// Writes `<dir>/ctr-NAME.json`, the config of a container `name` of `image` running
    /// `command` (empty: the image's entrypoint), logging to `NAME.log` in the pod's log dir.
    /// Returns the file's path. (`crictl create` fills `user_specified_image` with `image`.)
    pub fn container_config(&self, name: &str, image: &str, command: &[&str]) -> PathBuf {
        let config = container_json(name, serde_json::json!({ "image": image }), command);
        self.write_json(&format!("ctr-{name}.json"), &config)
    }

    /// Like [`Crictl::container_config`], as the kubelet asks after a pull: `image` is the
    /// image id the pull answered, `user_specified_image` the reference the pod named.
    pub fn container_config_pulled(
        &self,
        name: &str,
        image_id: &str,
        user_specified_image: &str,
        command: &[&str],
    ) -> PathBuf {
        let image = serde_json::json!({
            "image": image_id,
            "user_specified_image": user_specified_image,
        });
        let config = container_json(name, image, command);
        self.write_json(&format!("ctr-{name}.json"), &config)
    }

    fn write_json(&self, file: &str, value: &serde_json::Value) -> PathBuf {
        let path = self.dir.join(file);
        let text = serde_json::to_string_pretty(value).expect("serialize a crictl config");
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// `crictl pull --pod-config POD IMAGE`; returns the image ref the runtime answered
    /// (crictl prints "Image is up to date for REF").
    pub fn pull(&self, image: &str, pod_config: &Path) -> String {
        let out = self.ok(&["pull", "--pod-config", &path_str(pod_config), image]);
        image_ref_of_pull(&out)
    }

    /// `crictl runp POD`; returns the pod sandbox id.
    pub fn runp(&self, pod_config: &Path) -> String {
        self.ok(&["runp", &path_str(pod_config)])
    }

    /// `crictl create --no-pull POD_ID CTR POD`; returns the container id.
    pub fn create(&self, pod_id: &str, container_config: &Path, pod_config: &Path) -> String {
        self.ok(&[
            "create",
            "--no-pull",
            pod_id,
            &path_str(container_config),
            &path_str(pod_config),
        ])
    }

    /// `crictl start CTR`.
    pub fn start(&self, container_id: &str) {
        let out = self.ok(&["start", container_id]);
        assert_eq!(out, container_id, "crictl start printed {out:?}");
    }

    /// `crictl exec CTR CMD…` (the streaming Exec call: crictl connects to the URL the runtime
    /// answers); returns stdout, trimmed.
    pub fn exec(&self, container_id: &str, cmd: &[&str]) -> String {
        let mut args = vec!["exec", container_id];
        args.extend_from_slice(cmd);
        self.ok(&args)
    }

    /// `crictl inspecti -o json IMAGE`: the image's `status` (id, repoTags, repoDigests, size,
    /// …); panics if crictl fails.
    pub fn inspecti_status(&self, image: &str) -> serde_json::Value {
        self.json(&["inspecti", "-o", "json", image])["status"].clone()
    }

    /// `crictl stop --timeout 0` of the pod's containers (the test images' PID 1 ignores
    /// SIGTERM, and CRI-O's StopPodSandbox would wait its 30 s stop timeout for each), then
    /// `crictl stopp POD_ID` and `crictl rmp POD_ID` (its containers go with it).
    pub fn remove_pod(&self, pod_id: &str) {
        let ids = self.ok(&["ps", "-a", "-q", "--pod", pod_id]);
        for id in ids.split_whitespace() {
            self.ok(&["stop", "--timeout", "0", id]);
        }
        self.ok(&["stopp", pod_id]);
        self.ok(&["rmp", pod_id]);
    }
}

/// A container config (CRI `ContainerConfig` as crictl reads it) with the given `image` spec.
/// Pod and container namespaces (NamespaceMode: POD = 0, CONTAINER = 1, NODE = 2): the node's
/// network, a PID namespace per container, the pod's IPC namespace.
fn namespace_options() -> serde_json::Value {
    serde_json::json!({ "network": 2, "pid": 1, "ipc": 0 })
}

fn container_json(name: &str, image: serde_json::Value, command: &[&str]) -> serde_json::Value {
    let mut config = serde_json::json!({
        "metadata": { "name": name, "attempt": 0 },
        "image": image,
        "log_path": format!("{name}.log"),
        // The pod's namespaces, as the kubelet repeats them (a zero pid would mean POD).
        "linux": { "security_context": { "namespace_options": namespace_options() } }
    });
    if !command.is_empty() {
        config["command"] = serde_json::json!(command);
    }
    config
}

/// The ref in crictl pull's "Image is up to date for REF".
pub fn image_ref_of_pull(stdout: &str) -> String {
    stdout
        .trim()
        .strip_prefix("Image is up to date for ")
        .unwrap_or_else(|| panic!("unexpected crictl pull output: {stdout:?}"))
        .to_string()
}

fn path_str(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 path {}", path.display()))
        .to_string()
}
