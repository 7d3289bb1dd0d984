//! critest, the CRI conformance suite of `sigs.k8s.io/cri-tools` (built by
//! `scripts/test-tools.sh`), in a test bed of its own:
//!
//! - [`reran_in_own_netns`]: critest's pods get their own network (a CNI bridge), and its specs
//!   use fixed host ports; so a test that calls this first is run again, as a copy of the test
//!   binary started by `nsenter --net=/run/netns/NAME` in a network namespace created for it
//!   (loopback up, nothing else), and everything the copy starts (registry, runtime, the
//!   daemon, critest, the pods' bridge and addresses) lives in that namespace only. The
//!   namespace is deleted afterwards.
//! - [`push_look_alike_images`]: every image the Linux specs pull
//!   (`gcr.io/k8s-staging-cri-tools/…`, `registry.k8s.io/e2e-test-images/…`), rebuilt on
//!   busybox-static with `umoci` and pushed with `skopeo` to the local [`Registry`] under the same
//!   repository paths, with what each spec checks (users, groups, tags, a web server, a setuid
//!   binary, …). See [`look_alikes`] for the list and what differs from the originals.
//! - [`prepare_runtime`]: routes that send pulls of those registries to the local one
//!   (containerd: `hosts.toml`; CRI-O: `registries.conf`), a CNI config (`bridge` + `host-local` +
//!   `portmap` from `/usr/lib/cni`, addresses kept in the bed dir), cgroups on, pod network
//!   namespaces under containerd's state dir; then waits until the runtime reports `NetworkReady`.
//! - [`Critest::run`]: one critest run against a CRI socket, its JUnit report parsed into the
//!   specs that passed, failed and were skipped ([`CritestRun`]).
//! - [`read_spec_list`]: a committed list of spec names (one a line, `#` comments).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1::StatusRequest;

use super::{BedOptions, Registry, RuntimeBed};

/// The sandbox image in the test registry: [`RuntimeBed::start_with_registry_addr`] names
/// `<registry>/pause:test`; [`push_look_alike_images`] pushes a look-alike of
/// `registry.k8s.io/pause` there.
pub const SANDBOX_IMAGE: &str = "pause:test";

/// Set, to the namespace's name, in the copy of the test binary that runs inside it.
pub const NETNS_ENV: &str = "IMAGESTREAM_CRITEST_NETNS";

/// The registries whose images critest's Linux specs pull.
pub const UPSTREAM_REGISTRIES: [&str; 2] = ["gcr.io", "registry.k8s.io"];

// ---------------------------------------------------------------------------------------------
// The network namespace
// ---------------------------------------------------------------------------------------------

/// A network namespace made with `ip netns add` (loopback up); on drop, the processes still in
/// it (all started by the run inside) are killed by pid and the namespace is deleted.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create() -> Netns {
        super::require_binary("ip", "iproute2");
        super::require_binary("nsenter", "util-linux");
        let name = format!("isct-{}", super::unique_suffix());
        super::run(
            Command::new("ip").args(["netns", "add", &name]),
            "ip netns add",
        );
        let ns = Netns { name };
        super::run(
            Command::new("nsenter")
                .arg(format!("--net={}", ns.path().display()))
                .args(["ip", "link", "set", "lo", "up"]),
            "loopback up in the test's network namespace",
        );
        ns
    }

    /// `/run/netns/NAME`
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for _ in 0..3 {
            let out = Command::new("ip")
                .args(["netns", "pids", &self.name])
                .stdin(Stdio::null())
                .output();
            let pids: Vec<u32> = out
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            if pids.is_empty() {
                break;
            }
            eprintln!(
                "critest bed: killing {} process(es) left in network namespace {}",
                pids.len(),
                self.name
            );
            super::send_signal(&pids, "KILL");
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stdin(Stdio::null())
            .status();
    }
}

/// In the test process as started: creates a network namespace, runs this test binary again
/// inside it (`nsenter --net=…`, only `test`, output passed on through `eprintln!`), asserts
/// that run passed, deletes the namespace and returns true: the caller returns at once. In the
/// copy inside the namespace: checks it is in it and returns false: the caller does its work.
pub fn reran_in_own_netns(test: &str) -> bool {
    if let Some(name) = std::env::var_os(NETNS_ENV) {
        let ns = Path::new("/run/netns").join(&name);
        let (mine, theirs) = (
            fs::metadata("/proc/self/ns/net").expect("stat /proc/self/ns/net"),
            fs::metadata(&ns).unwrap_or_else(|e| panic!("stat {}: {e}", ns.display())),
        );
        assert!(
            mine.ino() == theirs.ino() && mine.dev() == theirs.dev(),
            "{NETNS_ENV}={name:?}, but this process is not in that network namespace"
        );
        return false;
    }
    super::require_root("critest's network namespace");
    let netns = Netns::create();
    let exe = std::env::current_exe().expect("path of the test binary");
    eprintln!(
        "critest bed: running {test} again inside network namespace {}",
        netns.name
    );
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.path().display()))
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(NETNS_ENV, &netns.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("nsenter {}: {e}", exe.display()));
    // Passed on line by line through eprintln!, so that the test harness's capture applies.
    let out = child.stdout.take().expect("child stdout");
    let relay = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            eprintln!("  | {line}");
        }
    });
    let err = child.stderr.take().expect("child stderr");
    for line in BufReader::new(err).lines().map_while(Result::ok) {
        eprintln!("  | {line}");
    }
    let _ = relay.join();
    let status = child.wait().expect("wait for the run inside the namespace");
    assert!(
        status.success(),
        "{test} failed inside network namespace {} ({status}); its output is above",
        netns.name
    );
    true
}

// ---------------------------------------------------------------------------------------------
// Look-alike images
// ---------------------------------------------------------------------------------------------

/// `/etc/passwd` of busybox's image.
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
bin:x:2:2:bin:/bin:/bin/false\n\
sys:x:3:3:sys:/dev:/bin/false\n\
sync:x:4:100:sync:/bin:/bin/sync\n\
mail:x:8:8:mail:/var/spool/mail:/bin/false\n\
www-data:x:33:33:www-data:/var/www:/bin/false\n\
operator:x:37:37:Operator:/var:/bin/false\n\
nobody:x:65534:65534:nobody:/home:/bin/false\n";

/// `/etc/group` of busybox's image.
const GROUP: &str = "root:x:0:\n\
daemon:x:1:\n\
bin:x:2:\n\
sys:x:3:\n\
adm:x:4:\n\
tty:x:5:\n\
disk:x:6:\n\
lp:x:7:\n\
mail:x:8:\n\
kmem:x:9:\n\
wheel:x:10:root\n\
cdrom:x:11:\n\
dialout:x:18:\n\
floppy:x:19:\n\
video:x:28:\n\
audio:x:29:\n\
tape:x:32:\n\
www-data:x:33:\n\
operator:x:37:\n\
utmp:x:43:\n\
staff:x:50:\n\
users:x:100:\n\
nogroup:x:65534:\n";

/// Debian's busybox-static has neither `pgrep` nor `ipcs`, which the specs run in containers.
const STAND_INS: [(&str, &str); 2] = [
    (
        "bin/pgrep",
        "#!/bin/sh\n\
         # pgrep NAME: the pids of the processes named NAME (this busybox has no pgrep).\n\
         exec pidof \"$@\"\n",
    ),
    (
        "bin/ipcs",
        "#!/bin/sh\n\
         # ipcs -m: the shared memory segments of this IPC namespace, key and shmid (this busybox\n\
         # has no ipcs).\n\
         echo '------ Shared Memory Segments --------'\n\
         echo 'key        shmid'\n\
         tail -n +2 /proc/sysvipc/shm | while read -r key shmid rest; do echo \"$key $shmid\"; done\n",
    ),
];

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A web server look-alike: this script stays the parent of busybox `httpd` (as nginx's or
/// apache's master process does), under the program's name, and ends it on SIGTERM (as pid 1 it
/// would otherwise ignore the signal and every stop would wait for its timeout).
fn web_server_script(what: &str, announce: &str, pid_file: &str, port: u16, root: &str) -> Vec<u8> {
    format!(
        "#!/bin/sh\n\
         # {what} look-alike for critest: busybox httpd serves {root} on port {port}.\n\
         {announce}\
         echo $$ > {pid_file}\n\
         httpd -f -p {port} -h {root} &\n\
         trap 'kill $! 2>/dev/null; exit 0' TERM INT\n\
         wait\n"
    )
    .into_bytes()
}

/// One look-alike image.
pub struct LookAlike {
    /// Where critest pulls it from: `HOST/REPO:TAG` (several tags: the same image).
    pub upstream: Vec<String>,
    /// Files put on top of the busybox base: (path in the image, contents, mode).
    files: Vec<(String, Vec<u8>, u32)>,
    /// `umoci config` flags.
    config: Vec<String>,
}

impl LookAlike {
    fn new(upstream: &[&str]) -> LookAlike {
        LookAlike {
            upstream: upstream.iter().map(|s| s.to_string()).collect(),
            files: Vec::new(),
            config: Vec::new(),
        }
    }

    fn file(mut self, path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> LookAlike {
        self.files.push((path.to_string(), contents.into(), mode));
        self
    }

    fn config(mut self, flag: impl Into<String>) -> LookAlike {
        self.config.push(flag.into());
        self
    }

    fn cmd(mut self, cmd: &[&str]) -> LookAlike {
        self.config
            .extend(cmd.iter().map(|c| format!("--config.cmd={c}")));
        self
    }
}

/// `GOARCH` of this machine, for critest's `hostnet-nginx-<arch>`.
fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The images critest's Linux specs (v1.34.0, `pkg/validate`) pull, as look-alikes. All are
/// busybox-static (every applet linked in `/bin`, plus [`STAND_INS`]) with busybox's
/// `/etc/passwd` and `/etc/group`, `PATH` set and `sh` as command, like `busybox:1.37.0` that
/// cri-tools' `images/` build on; beyond that:
///
/// - `test-image-{latest,1,2,3}`, `test-image-tag:{test,all}`, `test-image-tags:{1,2,3}` (one image
///   under three tags): an empty file named after the image, as `images/image-test` adds.
/// - `test-image-user-*`: the `USER` of `images/build` (`1002`, `www-data`, `1003:1004`,
///   `www-data:1004`); `test-image-predefined-group`: `default-user` (uid 1000) in group
///   `group-defined-in-image` (gid 50000), `USER 1000`.
/// - `hostnet-nginx-<arch>`, `e2e-test-images/nginx:1.14-2`, `e2e-test-images/httpd:2.4.39-4`: a
///   script named like the server (`nginx`: pid file `/var/run/nginx.pid`, "master process" on its
///   command line, which the PID namespace specs look for) running busybox `httpd` on port 12003
///   (host network), 80, 80; httpd prints "httpd" to its log.
/// - `e2e-test-images/nonewprivs:1.3`: a setuid-root static program printing `Effective uid: N`
///   (`nnp`, compiled here with `rustc` from [`NNP_SOURCE`]).
/// - `e2e-test-images/busybox:1.29-2`: the base as it is.
/// - the pod sandbox image, `<registry>/pause:test` ([`SANDBOX_IMAGE`]; containerd's
///   sandbox image, CRI-O's `pause_image`): a program named `pause` ([`PAUSE_SOURCE`]), as in `registry.k8s.io/pause`.
///
/// Not built: `test-image-digest@sha256:9700f9a2…`, pulled by digest: no other bytes have that
/// digest, so "public image with digest should be pulled and removed" cannot pass here.
pub fn look_alikes(programs: &Path, registry_addr: &str) -> Vec<LookAlike> {
    let cri = "gcr.io/k8s-staging-cri-tools";
    let e2e = "registry.k8s.io/e2e-test-images";
    let mut images = Vec::new();
    for name in [
        "test-image-latest",
        "test-image-1",
        "test-image-2",
        "test-image-3",
    ] {
        images.push(LookAlike::new(&[&format!("{cri}/{name}:latest")]).file(name, "", 0o644));
    }
    for tag in ["test", "all"] {
        images.push(LookAlike::new(&[&format!("{cri}/test-image-tag:{tag}")]).file(tag, "", 0o644));
    }
    images.push(
        LookAlike::new(&[
            &format!("{cri}/test-image-tags:1"),
            &format!("{cri}/test-image-tags:2"),
            &format!("{cri}/test-image-tags:3"),
        ])
        .file("same-image", "", 0o644),
    );
    for (name, user) in [
        ("test-image-user-uid", "1002"),
        ("test-image-user-username", "www-data"),
        ("test-image-user-uid-group", "1003:1004"),
        ("test-image-user-username-group", "www-data:1004"),
    ] {
        images.push(
            LookAlike::new(&[&format!("{cri}/{name}:latest")])
                .config(format!("--config.user={user}")),
        );
    }
    images.push(
        LookAlike::new(&[&format!("{cri}/test-image-predefined-group:latest")])
            .file(
                "etc/passwd",
                format!(
                    "{PASSWD}default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh\n"
                ),
                0o644,
            )
            .file(
                "etc/group",
                format!(
                    "{GROUP}default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"
                ),
                0o644,
            )
            .config("--config.user=1000"),
    );
    let nginx = |port: u16| {
        web_server_script(
            "nginx",
            "",
            "/var/run/nginx.pid",
            port,
            "/usr/share/nginx/html",
        )
    };
    let index = "<html><body><h1>Welcome to nginx!</h1></body></html>\n";
    images.push(
        LookAlike::new(&[&format!("{cri}/hostnet-nginx-{}:latest", goarch())])
            .file("usr/sbin/nginx", nginx(12003), 0o755)
            .file("usr/share/nginx/html/index.html", index, 0o644)
            .cmd(&["/usr/sbin/nginx", "master process"]),
    );
    images.push(
        LookAlike::new(&[&format!("{e2e}/nginx:1.14-2")])
            .file("usr/sbin/nginx", nginx(80), 0o755)
            .file("usr/share/nginx/html/index.html", index, 0o644)
            .cmd(&["/usr/sbin/nginx", "master process"]),
    );
    images.push(
        LookAlike::new(&[&format!("{e2e}/httpd:2.4.39-4")])
            .file(
                "usr/local/bin/httpd-foreground",
                web_server_script(
                    "httpd",
                    "echo 'httpd: serving /usr/local/apache2/htdocs on port 80'\n",
                    "/usr/local/apache2/httpd.pid",
                    80,
                    "/usr/local/apache2/htdocs",
                ),
                0o755,
            )
            .file(
                "usr/local/apache2/htdocs/index.html",
                "<html><body><h1>It works!</h1></body></html>\n",
                0o644,
            )
            .cmd(&["httpd-foreground"]),
    );
    images.push(
        LookAlike::new(&[&format!("{e2e}/nonewprivs:1.3")])
            .file(
                "usr/local/bin/nnp",
                compile_static(programs, "nnp", NNP_SOURCE),
                0o4755,
            )
            .cmd(&["/usr/local/bin/nnp"]),
    );
    images.push(LookAlike::new(&[&format!("{e2e}/busybox:1.29-2")]));
    images.push(
        LookAlike::new(&[&format!("{registry_addr}/{SANDBOX_IMAGE}")])
            .file(
                "pause",
                compile_static(programs, "pause", PAUSE_SOURCE),
                0o755,
            )
            .cmd(&["/pause"]),
    );
    images
}

/// The program of `nonewprivs` (kubernetes `test/images/nonewprivs`): with `no_new_privs` its
/// setuid bit does nothing and it prints the caller's uid, without, 0.
pub const NNP_SOURCE: &str = r#"extern "C" {
    fn geteuid() -> u32;
}

fn main() {
    println!("Effective uid: {}", unsafe { geteuid() });
}
"#;

/// The pause container's program, named `pause` as in `registry.k8s.io/pause`: it waits for a
/// signal and exits on SIGINT or SIGTERM. (The harness's own pause image runs busybox `sleep`,
/// which the execSync timeout spec, looking for left-over `sleep` processes in the pod's PID
/// namespace, would find.)
pub const PAUSE_SOURCE: &str = r#"extern "C" {
    fn pause() -> i32;
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn _exit(status: i32) -> !;
}

extern "C" fn quit(_: i32) {
    unsafe { _exit(0) }
}

fn main() {
    unsafe {
        signal(2, quit);
        signal(15, quit);
        loop {
            pause();
        }
    }
}
"#;

/// Compiles `source` into a static binary at `dir/name` (`rustc` from `$RUSTC` or `PATH`).
fn compile_static(dir: &Path, name: &str, source: &str) -> Vec<u8> {
    let src = dir.join(format!("{name}.rs"));
    let out = dir.join(name);
    fs::write(&src, source).unwrap_or_else(|e| panic!("write {}: {e}", src.display()));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    super::run(
        Command::new(rustc)
            .args([
                "--edition",
                "2021",
                "-O",
                "-C",
                "target-feature=+crt-static",
                "-C",
                "strip=symbols",
                "-o",
            ])
            .arg(&out)
            .arg(&src),
        &format!("rustc {name}.rs (a static program for a look-alike image; needs libc6-dev)"),
    );
    fs::read(&out).unwrap_or_else(|e| panic!("read {}: {e}", out.display()))
}

/// Writes `contents` to `root/path` with `mode`, creating parent dirs.
fn put_file(root: &Path, path: &str, contents: &[u8], mode: u32) {
    let dest = root.join(path);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    let _ = fs::remove_file(&dest);
    fs::write(&dest, contents).unwrap_or_else(|e| panic!("write {}: {e}", dest.display()));
    fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dest.display()));
}

/// `umoci unpack --rootless` of `image` into `bundle`, `fill` the rootfs, `umoci repack`.
fn add_layer(image: &str, bundle: &Path, fill: impl FnOnce(&Path)) {
    super::run(
        Command::new("umoci")
            .args(["unpack", "--rootless", "--image", image])
            .arg(bundle),
        "umoci unpack",
    );
    fill(&bundle.join("rootfs"));
    super::run(
        Command::new("umoci")
            .args(["repack", "--image", image])
            .arg(bundle),
        "umoci repack",
    );
}

/// The busybox base of every look-alike: an OCI layout at `work/base` with tag `base`.
fn build_base(work: &Path) -> PathBuf {
    let layout = work.join("base");
    let image = format!("{}:base", layout.display());
    super::umoci_new_image(&layout, &image);
    let applets = super::run(
        Command::new("/bin/busybox").arg("--list"),
        "busybox --list (apt-get install busybox-static)",
    );
    add_layer(&image, &work.join("base-bundle"), |root| {
        let bin = root.join("bin");
        fs::create_dir_all(&bin).expect("mkdir rootfs/bin");
        fs::copy("/bin/busybox", bin.join("busybox")).expect("copy /bin/busybox into the image");
        for applet in applets.split_whitespace() {
            let stand_in = STAND_INS
                .iter()
                .any(|(p, _)| p.strip_prefix("bin/") == Some(applet));
            if applet != "busybox" && !stand_in {
                // Hard links, as in busybox's image: a masked path (MaskedPaths) hides that
                // name only, not busybox under every name.
                fs::hard_link(bin.join("busybox"), bin.join(applet))
                    .unwrap_or_else(|e| panic!("link busybox applet {applet}: {e}"));
            }
        }
        for (path, script) in STAND_INS {
            put_file(root, path, script.as_bytes(), 0o755);
        }
        put_file(root, "etc/passwd", PASSWD.as_bytes(), 0o644);
        put_file(root, "etc/group", GROUP.as_bytes(), 0o644);
        for dir in [
            "root",
            "home",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "usr/local/bin",
            "var/run",
            "var/www",
            "var/spool/mail",
            "tmp",
        ] {
            fs::create_dir_all(root.join(dir)).expect("mkdir in rootfs");
        }
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))
            .expect("chmod rootfs/tmp");
    });
    super::run(
        Command::new("umoci")
            .args(["config", "--image", &image])
            .arg(format!("--config.env={PATH_ENV}"))
            .arg("--config.cmd=sh"),
        "umoci config (base)",
    );
    layout
}

/// Builds every [`look_alikes`] image and pushes it to `registry` under its upstream repository
/// path (`gcr.io/k8s-staging-cri-tools/test-image-1:latest` → `k8s-staging-cri-tools/test-image-1:latest`).
/// Returns the upstream references pushed.
pub fn push_look_alike_images(registry: &Registry) -> Vec<String> {
    super::require_binary("umoci", "umoci");
    super::require_binary("skopeo", "skopeo");
    let work = super::harness_tempdir("isctimg-");
    let base = build_base(work.path());
    let mut pushed = Vec::new();
    for (i, img) in look_alikes(work.path(), &registry.addr)
        .into_iter()
        .enumerate()
    {
        let dir = work.path().join(format!("img-{i}"));
        let layout = dir.join("layout");
        super::copy_dir_recursive(&base, &layout);
        let image = format!("{}:base", layout.display());
        if !img.files.is_empty() {
            add_layer(&image, &dir.join("bundle"), |root| {
                for (path, contents, mode) in &img.files {
                    put_file(root, path, contents, *mode);
                }
            });
        }
        let first = &img.upstream[0];
        let repo = first.rsplit_once(':').map(|(r, _)| r).unwrap_or(first);
        super::run(
            Command::new("umoci")
                .args(["config", "--image", &image, "--tag", "img"])
                .arg(format!(
                    "--config.label=imagestream.test/look-alike-of={repo}"
                ))
                .args(&img.config),
            "umoci config",
        );
        for upstream in &img.upstream {
            let (_, path) = upstream
                .split_once('/')
                .unwrap_or_else(|| panic!("{upstream} names no registry"));
            super::skopeo_push(
                &dir,
                &format!("{}:img", layout.display()),
                &format!("{}/{path}", registry.addr),
            );
            pushed.push(upstream.clone());
        }
    }
    pushed
}

// ---------------------------------------------------------------------------------------------
// The runtime
// ---------------------------------------------------------------------------------------------

/// The pod network: a bridge `cni0` in the bed's namespace with `10.88.0.0/16`, its addresses kept
/// in the bed dir (not `/var/lib/cni`), host ports through `portmap` (iptables, in the namespace).
fn cni_config(bed: &Path) -> String {
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "critest",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "dataDir": "{dir}/cni/ipam",
        "ranges": [[{{ "subnet": "10.88.0.0/16" }}]],
        "routes": [{{ "dst": "0.0.0.0/0" }}]
      }}
    }},
    {{ "type": "portmap", "capabilities": {{ "portMappings": true }} }}
  ]
}}
"#,
        dir = bed.display()
    )
}

/// Readies a started [`RuntimeBed`] for critest: pulls from [`UPSTREAM_REGISTRIES`] go to
/// `registry` ([`RuntimeBed::route_registry`]), pods get the network of [`cni_config`] (plugins
/// from `/usr/lib/cni`), containers get cgroups, and (containerd) pod network namespaces are
/// mounted under the runtime's state dir, not the host's `/run/netns`; the runtime restarts with
/// that, and this waits until `NetworkReady`.
pub fn prepare_runtime(bed: &mut RuntimeBed, registry: &Registry) {
    for plugin in ["bridge", "host-local", "portmap", "loopback"] {
        assert!(
            Path::new("/usr/lib/cni").join(plugin).is_file(),
            "CNI plugin /usr/lib/cni/{plugin} missing: apt-get install containernetworking-plugins"
        );
    }
    super::require_binary("iptables", "iptables");
    for host in UPSTREAM_REGISTRIES {
        bed.route_registry(host, &registry.addr);
    }
    fs::write(
        bed.cni_conf_dir.join("10-critest.conflist"),
        cni_config(&bed.dir),
    )
    .expect("write CNI config");
    bed.set_options(BedOptions {
        cgroups: true,
        netns_under_state_dir: true,
    });
    wait_network_ready(&bed.socket, Duration::from_secs(30));
}

/// Polls CRI `Status` until the `NetworkReady` condition is true; panics after `timeout`.
pub fn wait_network_ready(socket: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let socket = socket.to_path_buf();
        let conditions = super::block_on_fresh(async move {
            let mut rt = super::runtime_client(&socket).await;
            rt.status(StatusRequest { verbose: false })
                .await
                .map(|r| r.into_inner().status.unwrap_or_default().conditions)
                .map_err(|e| e.to_string())
        });
        let ready = matches!(&conditions, Ok(c) if c.iter().any(|c| c.r#type == "NetworkReady" && c.status));
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "runtime not NetworkReady within {timeout:?}: {conditions:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------------
// critest runs
// ---------------------------------------------------------------------------------------------

/// One critest run: every spec of its JUnit report with its status (`passed`, `failed`,
/// `skipped`, `panicked`, `timedout`, …), named as critest prints it without the `[It] ` prefix
/// (`[k8s.io] Image Manager public image with tag should be pulled and removed [Conformance]`).
pub struct CritestRun {
    pub label: String,
    pub specs: BTreeMap<String, String>,
    pub elapsed: Duration,
    pub status: ExitStatus,
    /// critest's output.
    pub log: PathBuf,
}

impl CritestRun {
    fn with_status(&self, keep: impl Fn(&str) -> bool) -> BTreeSet<String> {
        self.specs
            .iter()
            .filter(|(_, s)| keep(s))
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn passed(&self) -> BTreeSet<String> {
        self.with_status(|s| s == "passed")
    }

    pub fn skipped(&self) -> BTreeSet<String> {
        self.with_status(|s| s == "skipped" || s == "pending")
    }

    /// Every spec neither passed nor skipped.
    pub fn failed(&self) -> BTreeSet<String> {
        self.with_status(|s| !matches!(s, "passed" | "skipped" | "pending"))
    }

    /// "label: N passed, N failed, N skipped in 4m12s"
    pub fn summary(&self) -> String {
        format!(
            "{}: {} passed, {} failed, {} skipped in {:.0?} (critest {})",
            self.label,
            self.passed().len(),
            self.failed().len(),
            self.skipped().len(),
            self.elapsed,
            self.status
        )
    }
}

/// What to run: the CRI socket, where critest's report and output go (`out_dir/LABEL.xml`,
/// `out_dir/LABEL.log`), and the dir it runs in, also its `TMPDIR` (host paths of volume and
/// mount specs): `work_dir/LABEL`.
pub struct Critest<'a> {
    pub socket: &'a Path,
    pub out_dir: &'a Path,
    pub work_dir: &'a Path,
    /// `--ginkgo.skip` regular expressions.
    pub skip: &'a [&'a str],
    /// Only these specs (exact names as in [`CritestRun::specs`]), if any.
    pub only: &'a [String],
    /// `--ginkgo.seed`: the same order in every run.
    pub seed: u64,
}

impl Critest<'_> {
    pub fn run(&self, label: &str) -> CritestRun {
        let critest = super::tools::tool("critest");
        let cwd = self.work_dir.join(label);
        let tmp = cwd.join("tmp");
        fs::create_dir_all(&tmp).expect("critest work dir");
        fs::create_dir_all(self.out_dir).expect("critest out dir");
        let junit = self.out_dir.join(format!("{label}.xml"));
        let log = self.out_dir.join(format!("{label}.log"));
        let _ = fs::remove_file(&junit);
        let endpoint = format!("unix://{}", self.socket.display());
        let mut cmd = Command::new(&critest);
        cmd.current_dir(&cwd)
            .env("TMPDIR", &tmp)
            .arg(format!("--runtime-endpoint={endpoint}"))
            .arg(format!("--image-endpoint={endpoint}"))
            .arg(format!("--config={}", cwd.join("crictl.yaml").display()))
            .arg(format!("--ginkgo.junit-report={}", junit.display()))
            .arg(format!("--ginkgo.seed={}", self.seed))
            .arg("--ginkgo.no-color")
            // A run takes about 2 minutes; these bound a hanging one (per CRI call, whole run).
            .arg("--runtime-service-timeout=2m")
            .arg("--image-service-timeout=2m")
            .arg("--ginkgo.timeout=12m");
        for skip in self.skip {
            cmd.arg(format!("--ginkgo.skip={skip}"));
        }
        for name in self.only {
            cmd.arg(format!("--ginkgo.focus={}", regex_escape(name)));
        }
        let out = fs::File::create(&log).expect("critest log file");
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log handle"))
            .stderr(out);
        let started = Instant::now();
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("run {}: {e}", critest.display()));
        let elapsed = started.elapsed();
        let mut xml = String::new();
        match fs::File::open(&junit) {
            Ok(mut f) => {
                f.read_to_string(&mut xml).expect("read JUnit report");
            }
            Err(e) => panic!(
                "critest ({label}, {status}) wrote no JUnit report {}: {e}\n{}",
                junit.display(),
                super::file_tail(&log, 4000)
            ),
        }
        let specs = parse_junit(&xml);
        assert!(
            !specs.is_empty(),
            "critest ({label}) reported no specs; {}",
            super::file_tail(&log, 4000)
        );
        CritestRun {
            label: label.to_string(),
            specs,
            elapsed,
            status,
            log,
        }
    }
}

/// Escapes regular expression metacharacters (for `--ginkgo.focus`).
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn xml_unescape(s: &str) -> String {
    s.replace("&#39;", "'")
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#xA;", "\n")
        .replace("&amp;", "&")
}

fn xml_attr(tag: &str, name: &str) -> Option<String> {
    let tag = format!(" {tag}");
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(xml_unescape(&tag[start..start + len]))
}

/// Spec name → status from a ginkgo JUnit report (`<testcase name="[It] …" status="passed">`).
pub fn parse_junit(xml: &str) -> BTreeMap<String, String> {
    let mut specs = BTreeMap::new();
    for chunk in xml.split("<testcase ").skip(1) {
        let tag = &chunk[..chunk.find('>').unwrap_or(chunk.len())];
        let (Some(name), Some(status)) = (xml_attr(tag, "name"), xml_attr(tag, "status")) else {
            continue;
        };
        let name = name.strip_prefix("[It] ").unwrap_or(&name).to_string();
        specs.insert(name, status);
    }
    specs
}

/// The spec names in a list file: one a line, blank lines and `#` comments ignored.
pub fn read_spec_list(path: &Path) -> BTreeSet<String> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}
