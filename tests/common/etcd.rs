//! Real etcd (Debian `etcd-server`, 3.4) for the cluster-store tests: one member or a
//! three-member cluster on free loopback ports, data in a temp dir. Members can be stopped,
//! killed (-9) and started again with their data, so tests can take etcd away from the nodes
//! and bring it back.

use super::{file_tail, free_port, harness_tempdir, http_get_status, log_file, require_binary};
use super::{send_signal, wait_or_kill};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub struct Member {
    pub name: String,
    /// "http://127.0.0.1:PORT"
    pub client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Etcd {
    pub members: Vec<Member>,
    initial_cluster: String,
    _tmp: TempDir,
}

impl Etcd {
    /// One member.
    pub fn start() -> Etcd {
        Self::start_cluster(1)
    }

    /// `n` members forming one cluster; waits until every member reports healthy.
    pub fn start_cluster(n: usize) -> Etcd {
        require_binary("etcd", "etcd-server");
        let tmp = harness_tempdir("isetcd-");
        let members: Vec<Member> = (0..n)
            .map(|i| {
                let name = format!("m{i}");
                Member {
                    client_url: format!("http://127.0.0.1:{}", free_port()),
                    peer_url: format!("http://127.0.0.1:{}", free_port()),
                    data_dir: tmp.path().join(format!("{name}.data")),
                    log: tmp.path().join(format!("{name}.log")),
                    name,
                    child: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            members,
            initial_cluster,
            _tmp: tmp,
        };
        for i in 0..n {
            etcd.spawn(i);
        }
        for i in 0..n {
            etcd.wait_healthy(i);
        }
        etcd
    }

    fn spawn(&mut self, i: usize) {
        let initial_cluster = self.initial_cluster.clone();
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "etcd member {} already running", m.name);
        let (out, err) = log_file(&m.log);
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "imagestream-test"])
            // Keep the test output small and the members quick to elect.
            .args(["--log-level", "warn", "--logger", "zap"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn etcd");
        m.child = Some(child);
    }

    fn wait_healthy(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = self.members[i]
            .client_url
            .trim_start_matches("http://")
            .to_string();
        loop {
            if let Some(Ok(Some(status))) = self.members[i].child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "etcd member {} exited: {status}\n{}",
                    self.members[i].name,
                    file_tail(&self.members[i].log, 4000)
                );
            }
            if http_get_status(&addr, "/health") == Some(200) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "etcd member {} not healthy within 30s\n{}",
                    self.members[i].name,
                    file_tail(&self.members[i].log, 4000)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every member's client URL, comma-separated.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `etcd_endpoints = [...]` for a config file, with the given members.
    pub fn endpoints_toml(&self, members: &[usize]) -> String {
        let list = members
            .iter()
            .map(|i| format!("{:?}", self.members[*i].client_url))
            .collect::<Vec<_>>()
            .join(", ");
        format!("etcd_endpoints = [{list}]\n")
    }

    /// Stops member `i` with SIGTERM (data kept).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            send_signal(&[c.id()], "TERM");
            wait_or_kill(&mut c, Duration::from_secs(10));
        }
    }

    /// Kills member `i` with SIGKILL (data kept).
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again with its data and waits until it is healthy.
    pub fn start_again(&mut self, i: usize) {
        self.spawn(i);
        self.wait_healthy(i);
    }

    /// Runs `etcdctl` against every member (for assertions on the stored keys).
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints()))
            .args(args)
            .output()
            .expect("run etcdctl (Debian etcd-client)");
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill9(i);
        }
    }
}
