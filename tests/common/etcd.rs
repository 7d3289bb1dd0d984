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
    /// With [`Etcd::start_tls`]: the CA, the client certificate and key the members require.
    pub tls: Option<TlsFiles>,
    _tmp: TempDir,
}

/// Certificates made with `openssl` for a TLS etcd: a CA, a server certificate for 127.0.0.1,
/// and a client certificate signed by the CA.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_certs(dir: &std::path::Path) -> TlsFiles {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=imagestream-test-ca",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("write server.ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")
        .expect("write client.ext");
    for (name, cn) in [("server", "127.0.0.1"), ("client", "imagestream-node")] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{name}.crt"),
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
    TlsFiles {
        ca: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    }
}

impl Etcd {
    /// One member.
    pub fn start() -> Etcd {
        Self::start_cluster(1)
    }

    /// `n` members forming one cluster; waits until every member reports healthy.
    pub fn start_cluster(n: usize) -> Etcd {
        Self::start_inner(n, false)
    }

    /// One member that serves clients over TLS only and requires a client certificate signed
    /// by its CA ([`Etcd::tls`]).
    pub fn start_tls() -> Etcd {
        Self::start_inner(1, true)
    }

    fn start_inner(n: usize, tls: bool) -> Etcd {
        require_binary("etcd", "etcd-server");
        require_binary("openssl", "openssl");
        let tmp = harness_tempdir("isetcd-");
        let tls = tls.then(|| make_certs(tmp.path()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let members: Vec<Member> = (0..n)
            .map(|i| {
                let name = format!("m{i}");
                Member {
                    client_url: format!("{scheme}://127.0.0.1:{}", free_port()),
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
            tls,
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
        let tls = self.tls.clone();
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "etcd member {} already running", m.name);
        let (out, err) = log_file(&m.log);
        let mut cmd = Command::new("etcd");
        if let Some(t) = &tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
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
        let tls = self.tls.clone();
        let url = self.members[i].client_url.clone();
        let healthy = move || match &tls {
            None => http_get_status(&addr, "/health") == Some(200),
            Some(t) => Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={url}"))
                .arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.client_cert.display()))
                .arg(format!("--key={}", t.client_key.display()))
                .args(["endpoint", "health"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false),
        };
        loop {
            if let Some(Ok(Some(status))) = self.members[i].child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "etcd member {} exited: {status}\n{}",
                    self.members[i].name,
                    file_tail(&self.members[i].log, 4000)
                );
            }
            if healthy() {
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
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints()));
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.client_cert.display()))
                .arg(format!("--key={}", t.client_key.display()));
        }
        let out = cmd
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
