//! The imagestream daemon under test: the real binary (`CARGO_BIN_EXE_imagestream`), started
//! with its sockets and state dir in a temp dir, stopped with SIGTERM, restartable with the same
//! state; and the CLI run against its admin socket.
//!
//! Every daemon gets its own free registry-mirror port ([`Daemon::mirror_addr`], unless `extra`
//! names `--mirror-listen`), so parallel tests never meet on the default 127.0.0.1:5050.
//!
//! [`Daemon::start_in`] runs it in a [`super::netns::NetHost`]'s network namespace with its
//! mirror on `<host ip>:5050`: the runtime in the same namespace pulls through it, the test (in
//! its own namespace) reads `/metrics` over the LAN, and the unix sockets are files as usual.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_imagestream")
}

pub struct Daemon {
    pub dir: TempDir,
    pub cri_socket: PathBuf,
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    /// "127.0.0.1:PORT" of the registry mirror (and `/metrics`).
    pub mirror_addr: String,
    /// The `--config` file, if [`Daemon::start_with_config`] wrote one.
    pub config_file: Option<PathBuf>,
    args: Vec<String>,
    child: Option<Child>,
    /// The network namespace it runs in ([`Daemon::start_in`]); `None`: the test's own.
    netns: Option<String>,
}

impl Daemon {
    /// Starts `imagestream serve` forwarding to `runtime_endpoint`, with `insecure` registries
    /// reached over HTTP and `extra` flags; waits until both sockets (and the mirror port, if
    /// the binary has a mirror) accept.
    pub fn start(runtime_endpoint: &str, insecure: &[&str], extra: &[&str]) -> Daemon {
        Self::start_inner(runtime_endpoint, insecure, extra, None, None)
    }

    /// Like [`Daemon::start`], inside `host`'s network namespace, with the mirror (and
    /// `/metrics`) on `<host.ip>:5050` unless `extra` names `--mirror-listen`: reachable by a
    /// runtime in the same namespace ([`Daemon::route_through_mirror`]) and by the test over
    /// the LAN ([`Daemon::metrics`]). `runtime_endpoint` is usually the unix socket of a
    /// [`super::RuntimeBed::start_in`] bed on the same host.
    pub fn start_in(
        host: &super::netns::NetHost,
        runtime_endpoint: &str,
        insecure: &[&str],
        extra: &[&str],
    ) -> Daemon {
        Self::start_inner(
            runtime_endpoint,
            insecure,
            extra,
            None,
            Some((host.netns.clone(), host.addr(5050))),
        )
    }

    /// [`Daemon::start_in`] with a config file, as [`Daemon::start_with_config`].
    pub fn start_in_with_config(
        host: &super::netns::NetHost,
        runtime_endpoint: &str,
        insecure: &[&str],
        extra: &[&str],
        config_toml: &str,
    ) -> Daemon {
        Self::start_inner(
            runtime_endpoint,
            insecure,
            extra,
            Some(config_toml),
            Some((host.netns.clone(), host.addr(5050))),
        )
    }

    /// The network namespace the daemon runs in, if not the test's own.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Like [`Daemon::start`], with `config_toml` written to `<dir>/config.toml` and passed as
    /// `--config` (flags still override it).
    pub fn start_with_config(
        runtime_endpoint: &str,
        insecure: &[&str],
        extra: &[&str],
        config_toml: &str,
    ) -> Daemon {
        Self::start_inner(runtime_endpoint, insecure, extra, Some(config_toml), None)
    }

    /// `netns`: the namespace to run in and the default mirror address there.
    fn start_inner(
        runtime_endpoint: &str,
        insecure: &[&str],
        extra: &[&str],
        config_toml: Option<&str>,
        netns: Option<(String, String)>,
    ) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("imagestream-daemon-")
            .tempdir()
            .expect("temp dir for the daemon");
        let cri_socket = dir.path().join("run/imagestream.sock");
        let admin_socket = dir.path().join("run/admin.sock");
        let state_dir = dir.path().join("state");
        let log = dir.path().join("imagestream.log");
        let mut args = vec![
            "serve".to_string(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--cri-socket".into(),
            cri_socket.display().to_string(),
            "--admin-socket".into(),
            admin_socket.display().to_string(),
            "--runtime-endpoint".into(),
            runtime_endpoint.to_string(),
        ];
        let mut config_file = None;
        if let Some(toml) = config_toml {
            let path = dir.path().join("config.toml");
            std::fs::write(&path, toml).expect("write daemon config.toml");
            args.push("--config".into());
            args.push(path.display().to_string());
            config_file = Some(path);
        }
        for r in insecure {
            args.push("--insecure-registry".into());
            args.push(r.to_string());
        }
        let given = extra
            .iter()
            .position(|a| *a == "--mirror-listen")
            .and_then(|i| extra.get(i + 1));
        let mirror_addr = match given {
            Some(a) => a.to_string(),
            None => {
                let a = match &netns {
                    Some((_, addr)) => addr.clone(),
                    None => format!("127.0.0.1:{}", super::free_port()),
                };
                args.push("--mirror-listen".into());
                args.push(a.clone());
                a
            }
        };
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut d = Daemon {
            dir,
            cri_socket,
            admin_socket,
            state_dir,
            log,
            mirror_addr,
            config_file,
            args,
            child: None,
            netns: netns.map(|(name, _)| name),
        };
        d.start_again();
        d
    }

    /// Starts the daemon again with the same flags (and so the same state).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log file");
        let child = super::netns::command_in(self.netns.as_deref(), binary())
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("IMAGESTREAM_TEST_LOG")
                    .unwrap_or_else(|_| "imagestream=debug,info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn imagestream serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(super::wait_for_socket(&self.cri_socket, Duration::from_millis(50))
            && super::wait_for_socket(&self.admin_socket, Duration::from_millis(50)))
        {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "imagestream exited early ({status}):\n{}",
                    super::file_tail(&self.log, 4000)
                );
            }
            assert!(
                Instant::now() < deadline,
                "imagestream sockets not ready:\n{}",
                super::file_tail(&self.log, 4000)
            );
        }
        if let Ok(addr) = self.mirror_addr.parse::<SocketAddr>() {
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    panic!(
                        "imagestream exited early ({status}):\n{}",
                        super::file_tail(&self.log, 4000)
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "imagestream mirror port {} not accepting:\n{}",
                    self.mirror_addr,
                    super::file_tail(&self.log, 4000)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL (no cleanup at all) and reap; [`Daemon::start_again`] restarts it.
    pub fn kill9(&mut self) {
        if let Some(child) = &self.child {
            signal(child.id(), "KILL");
        }
        self.stop_after_signal();
    }

    /// "http://127.0.0.1:PORT" of the mirror.
    pub fn mirror_url(&self) -> String {
        format!("http://{}", self.mirror_addr)
    }

    /// Points the runtime's pulls from `registry_host` at this daemon's mirror, as a node
    /// administrator would: `imagestream mirror hosts-toml` into containerd's `certs.d`, or
    /// `imagestream mirror registries-conf` into CRI-O's `registries.conf.d` (then a reload).
    /// Returns the file it wrote.
    pub fn route_through_mirror(&self, bed: &super::RuntimeBed, registry_host: &str) -> String {
        let dir = bed.mirror_config_dir();
        let url = self.mirror_url();
        let subcommand = if bed.kind.is_containerd() {
            "hosts-toml"
        } else {
            "registries-conf"
        };
        let out = self.cli(&[
            "mirror",
            subcommand,
            "--registry",
            registry_host,
            "--dir",
            &dir.display().to_string(),
            "--mirror",
            &url,
        ]);
        assert!(
            out.status.success(),
            "imagestream mirror {subcommand} --registry {registry_host} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        bed.reload_registries();
        let path = if bed.kind.is_containerd() {
            bed.hosts_toml(registry_host)
        } else {
            let drop_in =
                imagestream::mirror::registries_conf::DropIn::new(registry_host, &url, &[])
                    .and_then(|d| d.file_name())
                    .unwrap_or_else(|e| panic!("drop-in name for {registry_host}: {e}"));
            dir.join(drop_in)
        };
        std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "mirror {subcommand} did not write {} ({e}); it printed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `GET /metrics` on the mirror port (Prometheus text); panics with the log tail if it
    /// does not answer 200.
    pub fn metrics(&self) -> String {
        match super::mirror::http_fetch(
            &self.mirror_addr,
            "GET",
            "/metrics",
            &[],
            &[],
            Duration::from_secs(10),
        ) {
            Ok(r) if r.status == 200 => r.body_text(),
            other => panic!(
                "GET http://{}/metrics: {other:?}\n{}",
                self.mirror_addr,
                self.log_tail()
            ),
        }
    }

    /// One value from `/metrics` (see [`super::mirror::metric_value`]); panics naming the
    /// series and showing the metrics if it is absent.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.metrics();
        super::mirror::metric_value(&text, series)
            .unwrap_or_else(|| panic!("metric {series} not in /metrics:\n{text}"))
    }

    /// Polls `ok` every 100 ms for up to `timeout`; panics naming `what`, with the daemon's
    /// log tail.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + timeout;
        while !ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last 6000 bytes of the daemon's log, for assertion messages.
    pub fn log_tail(&self) -> String {
        format!(
            "--- imagestream log tail ---\n{}",
            super::file_tail(&self.log, 6000)
        )
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        if let Some(child) = &self.child {
            signal(child.id(), "TERM");
        }
        self.stop_after_signal()
    }

    /// Waits for the exit status of a daemon that was already signalled.
    pub fn stop_after_signal(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait for imagestream") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("imagestream did not exit on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the CLI with `--admin-socket` pointing at this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_with_socket(&self.admin_socket, args)
    }

    /// Runs the CLI and returns stdout, panicking with stderr if it fails.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "imagestream {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `-o json` and parses its output.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.cli_ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}: {out}"))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

pub fn cli_with_socket(admin_socket: &Path, args: &[&str]) -> Output {
    Command::new(binary())
        .arg("--admin-socket")
        .arg(admin_socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run imagestream CLI")
}

/// The generation numbers of a `tag history -o json` answer's `generations`, newest first;
/// panics (naming `context`) unless each is one less than the one before: append-only, none
/// lost.
pub fn dense_generations(generations: &[serde_json::Value], context: &str) -> Vec<u64> {
    let numbers: Vec<u64> = generations
        .iter()
        .map(|g| g["generation"].as_u64().expect("generation number"))
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] == w[1] + 1),
        "{context}: generations not dense: {numbers:?}"
    );
    numbers
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- imagestream log ---\n{}",
                super::file_tail(&self.log, 6000)
            );
        }
    }
}

/// `imagestream watch FILTER -o json` against `d`'s admin socket: the process (kill it when
/// done) and a receiver of the events it prints, one JSON object each.
pub fn spawn_watch(
    d: &Daemon,
    filter: &str,
) -> (Child, std::sync::mpsc::Receiver<serde_json::Value>) {
    use std::io::{BufRead, BufReader};
    let mut watcher = Command::new(binary())
        .arg("--admin-socket")
        .arg(&d.admin_socket)
        .args(["watch", filter, "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start imagestream watch");
    let stdout = watcher.stdout.take().expect("watch stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    (watcher, rx)
}
