//! The imagestream daemon under test: the real binary (`CARGO_BIN_EXE_imagestream`), started
//! with its sockets and state dir in a temp dir, stopped with SIGTERM, restartable with the same
//! state; and the CLI run against its admin socket.

use std::fs::File;
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
    args: Vec<String>,
    child: Option<Child>,
}

impl Daemon {
    /// Starts `imagestream serve` forwarding to `runtime_endpoint`, with `insecure` registries
    /// reached over HTTP and `extra` flags; waits until both sockets accept.
    pub fn start(runtime_endpoint: &str, insecure: &[&str], extra: &[&str]) -> Daemon {
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
        for r in insecure {
            args.push("--insecure-registry".into());
            args.push(r.to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut d = Daemon {
            dir,
            cri_socket,
            admin_socket,
            state_dir,
            log,
            args,
            child: None,
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
        let child = Command::new(binary())
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
