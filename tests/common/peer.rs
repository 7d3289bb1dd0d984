//! Peer helpers: a cluster CA and node certificates made by the real `imagestream peer certs`,
//! the `peer_*` config of a node, and [`FaultInjectingPeer`]: a peer endpoint with a real node
//! certificate that answers blob requests wrongly on purpose (wrong bytes, a body cut short,
//! a stall), the faults a healthy imagestream never produces.

use super::daemon::binary;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use tempfile::TempDir;

/// A cluster CA and node certificates in a temp dir.
pub struct Certs {
    pub dir: TempDir,
}

impl Certs {
    /// `imagestream peer certs --dir D --node NAME=IP…` for each `(name, ip)`.
    pub fn make(nodes: &[(&str, &str)]) -> Certs {
        let dir = tempfile::Builder::new()
            .prefix("imagestream-certs-")
            .tempdir()
            .expect("tempdir for certificates");
        let c = Certs { dir };
        c.add(nodes);
        c
    }

    /// Adds node certificates with the same CA.
    pub fn add(&self, nodes: &[(&str, &str)]) {
        let mut cmd = Command::new(binary());
        cmd.args(["peer", "certs", "--dir"]).arg(self.dir.path());
        for (name, ip) in nodes {
            cmd.arg("--node").arg(format!("{name}={ip}"));
        }
        let out = cmd.output().expect("run imagestream peer certs");
        assert!(
            out.status.success(),
            "imagestream peer certs failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn cert(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.pem"))
    }

    pub fn key(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}-key.pem"))
    }

    pub fn files(&self, node: &str) -> imagestream::peer::tls::TlsFiles {
        imagestream::peer::tls::TlsFiles {
            ca_file: self.ca(),
            cert_file: self.cert(node),
            key_file: self.key(node),
        }
    }

    /// The `peer_*` config lines of node `name` (its certificate `cert_of`), listening on
    /// `listen`, with the static `peers` (`NAME=HOST:PORT`).
    pub fn node_toml(&self, name: &str, cert_of: &str, listen: &str, peers: &[String]) -> String {
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        format!(
            "node_name = {name:?}\npeer_listen = {listen:?}\npeer_ca_file = {}\n\
             peer_cert_file = {}\npeer_key_file = {}\npeers = {peers:?}\n",
            q(&self.ca()),
            q(&self.cert(cert_of)),
            q(&self.key(cert_of)),
        )
    }
}

/// What a [`FaultInjectingPeer`] does with a request for a blob it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerFault {
    /// The right length, one byte flipped.
    WrongBytes,
    /// Half the body, then the connection closes.
    CutShort,
    /// Accepts the request and never answers.
    Stall,
}

/// A peer endpoint (mutual TLS with a real node certificate) serving `blobs` with a fault.
pub struct FaultInjectingPeer {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultInjectingPeer {
    pub fn start(
        files: &imagestream::peer::tls::TlsFiles,
        blobs: HashMap<String, Vec<u8>>,
        fault: PeerFault,
    ) -> FaultInjectingPeer {
        Self::start_on("127.0.0.1", files, blobs, fault)
    }

    /// Like [`FaultInjectingPeer::start`], listening on `ip` (e.g. a LAN's gateway address,
    /// which the nodes in its namespaces reach).
    pub fn start_on(
        ip: &str,
        files: &imagestream::peer::tls::TlsFiles,
        blobs: HashMap<String, Vec<u8>>,
        fault: PeerFault,
    ) -> FaultInjectingPeer {
        let tls = imagestream::peer::tls::server_config(files).expect("fake peer TLS config");
        let listener = std::net::TcpListener::bind(format!("{ip}:0")).expect("bind fake peer");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("fake peer addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let blobs = Arc::new(blobs);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("fake peer runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                loop {
                    let (tcp, _) = tokio::select! {
                        a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                        _ = &mut stopped => return,
                    };
                    let acceptor = acceptor.clone();
                    let blobs = blobs.clone();
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let svc = hyper::service::service_fn(
                            move |req: http::Request<hyper::body::Incoming>| {
                                let blobs = blobs.clone();
                                let seen = seen.clone();
                                async move {
                                    let digest = req
                                        .uri()
                                        .path()
                                        .trim_start_matches("/v1/blobs/")
                                        .to_string();
                                    seen.lock().expect("requests").push(digest.clone());
                                    Ok::<_, std::convert::Infallible>(
                                        answer(&blobs, &digest, fault).await,
                                    )
                                }
                            },
                        );
                        let _ = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                    });
                }
            });
        });
        FaultInjectingPeer {
            addr,
            requests,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Digests asked for so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }
}

type FakeBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;

async fn answer(
    blobs: &HashMap<String, Vec<u8>>,
    digest: &str,
    fault: PeerFault,
) -> http::Response<FakeBody> {
    use http_body_util::BodyExt as _;
    let Some(bytes) = blobs.get(digest) else {
        let mut r = http::Response::new(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        );
        *r.status_mut() = http::StatusCode::NOT_FOUND;
        return r;
    };
    let len = bytes.len();
    let body: FakeBody = match fault {
        PeerFault::WrongBytes => {
            let mut b = bytes.clone();
            if let Some(x) = b.get_mut(len / 2) {
                *x ^= 0xff;
            }
            http_body_util::Full::new(bytes::Bytes::from(b))
                .map_err(|never| match never {})
                .boxed()
        }
        PeerFault::CutShort => {
            let half = bytes::Bytes::from(bytes[..len / 2].to_vec());
            // The first half goes out (headers included), then the connection breaks.
            let stream = futures_util::stream::unfold(0u8, move |step| {
                let half = half.clone();
                async move {
                    match step {
                        0 => Some((Ok(hyper::body::Frame::data(half)), 1)),
                        1 => {
                            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                            Some((
                                Err(std::io::Error::other("fake peer: killed mid-transfer")),
                                2,
                            ))
                        }
                        _ => None,
                    }
                }
            });
            http_body_util::StreamBody::new(stream).boxed()
        }
        PeerFault::Stall => return std::future::pending().await,
    };
    let mut r = http::Response::new(body);
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r
}

impl Drop for FaultInjectingPeer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Blobs `d` got from its peers: `imagestream_peer_fetches_total{outcome="ok"}`, summed over
/// the peers.
pub fn peer_fetches_ok(d: &super::daemon::Daemon) -> f64 {
    d.metrics()
        .lines()
        .filter(|l| {
            l.starts_with("imagestream_peer_fetches_total{") && l.contains("outcome=\"ok\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The name among `candidates` that `imagestream::peer::rank` puts first for `digest` among
/// `others` plus itself.
pub fn name_ranked_first(digest: &str, others: &[&str], candidates: &[String]) -> String {
    for c in candidates {
        let mut members: Vec<imagestream::peer::Member> = others
            .iter()
            .map(|n| imagestream::peer::Member {
                name: n.to_string(),
                addr: "x:1".into(),
            })
            .collect();
        members.push(imagestream::peer::Member {
            name: c.clone(),
            addr: "x:1".into(),
        });
        if imagestream::peer::rank(&members, digest)[0].name == *c {
            return c.clone();
        }
    }
    panic!("no candidate ranks first for {digest}")
}
