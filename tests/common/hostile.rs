//! FAKE, FAULT-INJECTING registries for the hostile-registry tests (`tests/hostile.rs`): small
//! HTTP/1.1 servers on free loopback ports that speak just enough of the distribution pull API
//! to be asked for manifests and blobs, and answer however a test wants — bytes that do not hash
//! to their digest, a lying `Content-Type`, bodies cut short, longer than declared or endless,
//! a trickle, a 5xx storm, or no answer at all. Every request is recorded, with its
//! `Authorization` header, so a test can also use one as a *recorder* on another port (the
//! target of a redirect or of a foreign layer's URL).
//!
//! - [`FakeHostileRegistry`]: answers with a [`FakeAnswer`] chosen by a closure per request;
//!   [`FakeImage`] gives it honest content to start from ([`FakeImage::honest`]).
//!
//! Bounded: every connection thread stops writing when the server is dropped, and writes and
//! reads time out.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// One request a fake registry received.
#[derive(Debug, Clone)]
pub struct FakeRequest {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub query: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

impl FakeRequest {
    /// `(name, reference)` of `/v2/<name>/manifests/<reference>`.
    pub fn manifest(&self) -> Option<(&str, &str)> {
        self.path.strip_prefix("/v2/")?.rsplit_once("/manifests/")
    }

    /// `(name, digest)` of `/v2/<name>/blobs/<digest>`.
    pub fn blob(&self) -> Option<(&str, &str)> {
        self.path.strip_prefix("/v2/")?.rsplit_once("/blobs/")
    }
}

/// How a body is sent.
#[derive(Debug, Clone)]
pub enum FakeBody {
    /// With `Content-Length: declared` (default: the length), then the bytes, then close.
    /// A `declared` other than the length is a lying `Content-Length`.
    Bytes {
        data: Vec<u8>,
        declared: Option<u64>,
    },
    /// Chunked, no length.
    Chunked(Vec<u8>),
    /// Chunked and endless (zeros), until the client goes away or the server is dropped.
    Endless,
    /// With its length, at this many bytes per second.
    Trickle { data: Vec<u8>, bytes_per_sec: u64 },
}

/// An answer: status, headers, body — or none at all.
#[derive(Debug, Clone)]
pub enum FakeAnswer {
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: FakeBody,
    },
    /// Keep the connection open and never answer.
    Silence,
}

impl FakeAnswer {
    pub fn bytes(status: u16, headers: &[(&str, &str)], data: Vec<u8>) -> FakeAnswer {
        FakeAnswer::Respond {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: FakeBody::Bytes {
                data,
                declared: None,
            },
        }
    }

    pub fn with_body(status: u16, headers: &[(&str, &str)], body: FakeBody) -> FakeAnswer {
        FakeAnswer::Respond {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body,
        }
    }

    pub fn not_found() -> FakeAnswer {
        FakeAnswer::bytes(
            404,
            &[("Content-Type", "application/json")],
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}"#.to_vec(),
        )
    }
}

type Handler = dyn Fn(&FakeRequest) -> FakeAnswer + Send + Sync;

struct Shared {
    handler: Mutex<Arc<Handler>>,
    stop: AtomicBool,
    requests: Mutex<Vec<FakeRequest>>,
    /// Body bytes written to clients, all responses together.
    body_bytes_sent: AtomicU64,
}

/// See the module docs. Stops when dropped.
pub struct FakeHostileRegistry {
    /// "127.0.0.1:PORT"
    pub addr: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FakeHostileRegistry {
    /// Listens on a free loopback port; `handler` picks the answer to each request.
    pub fn start(
        handler: impl Fn(&FakeRequest) -> FakeAnswer + Send + Sync + 'static,
    ) -> FakeHostileRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake registry");
        let addr = listener.local_addr().expect("local_addr").to_string();
        let shared = Arc::new(Shared {
            handler: Mutex::new(Arc::new(handler)),
            stop: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
            body_bytes_sent: AtomicU64::new(0),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || serve(conn, &s));
            }
        });
        FakeHostileRegistry {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Replaces the handler for requests from now on.
    pub fn set_handler(
        &self,
        handler: impl Fn(&FakeRequest) -> FakeAnswer + Send + Sync + 'static,
    ) {
        *lock(&self.shared.handler) = Arc::new(handler);
    }

    pub fn requests(&self) -> Vec<FakeRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Requests for `path` (query stripped).
    pub fn count(&self, path: &str) -> usize {
        self.requests().iter().filter(|r| r.path == path).count()
    }

    /// Body bytes written to clients so far.
    pub fn body_bytes_sent(&self) -> u64 {
        self.shared.body_bytes_sent.load(Ordering::SeqCst)
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakeHostileRegistry {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Ok(addr) = self.addr.parse::<SocketAddr>() {
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn serve(conn: TcpStream, shared: &Shared) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = conn.set_nodelay(true);
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut first = String::new();
    if reader.read_line(&mut first).unwrap_or(0) == 0 {
        return;
    }
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            if n.trim().eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target.clone(), String::new()),
    };
    let request = FakeRequest {
        method,
        path,
        query,
        authorization,
    };
    lock(&shared.requests).push(request.clone());
    let handler = lock(&shared.handler).clone();
    let answer = handler(&request);
    let mut out = conn;
    let (status, headers, body) = match answer {
        FakeAnswer::Silence => {
            // Hold the connection, answering nothing, until the client leaves or we stop.
            let _ = out.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 1024];
            while !shared.stop.load(Ordering::SeqCst) {
                match out.read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return,
                }
            }
            return;
        }
        FakeAnswer::Respond {
            status,
            headers,
            body,
        } => (status, headers, body),
    };
    let head_only = request.method == "HEAD";
    let mut head = format!("HTTP/1.1 {status} Fake\r\nConnection: close\r\n");
    for (n, v) in &headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    let sent = |n: usize| {
        shared.body_bytes_sent.fetch_add(n as u64, Ordering::SeqCst);
    };
    match body {
        FakeBody::Bytes { data, declared } => {
            head.push_str(&format!(
                "Content-Length: {}\r\n\r\n",
                declared.unwrap_or(data.len() as u64)
            ));
            if out.write_all(head.as_bytes()).is_err() || head_only {
                return;
            }
            for chunk in data.chunks(64 * 1024) {
                if shared.stop.load(Ordering::SeqCst) || out.write_all(chunk).is_err() {
                    return;
                }
                sent(chunk.len());
            }
        }
        FakeBody::Chunked(data) => {
            head.push_str("Transfer-Encoding: chunked\r\n\r\n");
            if out.write_all(head.as_bytes()).is_err() || head_only {
                return;
            }
            for chunk in data.chunks(64 * 1024) {
                if out
                    .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .and_then(|()| out.write_all(chunk))
                    .and_then(|()| out.write_all(b"\r\n"))
                    .is_err()
                {
                    return;
                }
                sent(chunk.len());
            }
            let _ = out.write_all(b"0\r\n\r\n");
        }
        FakeBody::Endless => {
            head.push_str("Transfer-Encoding: chunked\r\n\r\n");
            if out.write_all(head.as_bytes()).is_err() || head_only {
                return;
            }
            let chunk = vec![b'x'; 64 * 1024];
            while !shared.stop.load(Ordering::SeqCst) {
                if out
                    .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .and_then(|()| out.write_all(&chunk))
                    .and_then(|()| out.write_all(b"\r\n"))
                    .is_err()
                {
                    return;
                }
                sent(chunk.len());
            }
        }
        FakeBody::Trickle {
            data,
            bytes_per_sec,
        } => {
            head.push_str(&format!("Content-Length: {}\r\n\r\n", data.len()));
            if out.write_all(head.as_bytes()).is_err() || head_only {
                return;
            }
            let step = (bytes_per_sec / 10).max(1) as usize;
            let started = Instant::now();
            let mut done = 0usize;
            for chunk in data.chunks(step) {
                if shared.stop.load(Ordering::SeqCst) || out.write_all(chunk).is_err() {
                    return;
                }
                done += chunk.len();
                sent(chunk.len());
                let due = Duration::from_secs_f64(done as f64 / bytes_per_sec as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
    }
    let _ = out.flush();
}

/// An image made up in memory: a config, layers of random bytes, an OCI manifest.
#[derive(Debug, Clone)]
pub struct FakeImage {
    pub name: String,
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
    pub manifest: Vec<u8>,
}

impl FakeImage {
    /// `name` with layers of `sizes` random bytes (never a valid tar: it is cached, not run).
    pub fn new(name: &str, sizes: &[usize]) -> FakeImage {
        let mut urandom = std::fs::File::open("/dev/urandom").expect("open /dev/urandom");
        let layers: Vec<Vec<u8>> = sizes
            .iter()
            .map(|n| {
                let mut b = vec![0u8; *n];
                urandom.read_exact(&mut b).expect("read /dev/urandom");
                b
            })
            .collect();
        let mut label = [0u8; 8];
        urandom.read_exact(&mut label).expect("read /dev/urandom");
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"config":{{"Labels":{{"fake":"{}"}}}}}}"#,
            hex::encode(label)
        )
        .into_bytes();
        let manifest = Self::manifest_for(&config, &layers, &[]);
        FakeImage {
            name: name.to_string(),
            config,
            layers,
            manifest,
        }
    }

    /// An OCI manifest for `config` and `layers`; `urls[i]`, when given, become layer `i`'s
    /// foreign URLs.
    pub fn manifest_for(config: &[u8], layers: &[Vec<u8>], urls: &[(usize, String)]) -> Vec<u8> {
        let layers: Vec<serde_json::Value> = layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let mut d = serde_json::json!({
                    "mediaType": OCI_LAYER,
                    "digest": sha256(l),
                    "size": l.len(),
                });
                if let Some((_, u)) = urls.iter().find(|(j, _)| *j == i) {
                    d["urls"] = serde_json::json!([u]);
                    d["mediaType"] =
                        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip".into();
                }
                d
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": config.len()},
            "layers": layers,
        }))
        .expect("manifest JSON")
    }

    pub fn digest(&self) -> String {
        sha256(&self.manifest)
    }

    pub fn config_digest(&self) -> String {
        sha256(&self.config)
    }

    pub fn layer_digest(&self, i: usize) -> String {
        sha256(&self.layers[i])
    }

    /// Manifest, config and layer digests.
    pub fn blobs(&self) -> Vec<String> {
        let mut all = vec![self.digest(), self.config_digest()];
        all.extend(self.layers.iter().map(|l| sha256(l)));
        all
    }

    /// What an honest registry answers for this image under `tag`: the manifest by tag and by
    /// digest (with `Content-Type` and `Docker-Content-Digest`), config and layers as blobs;
    /// `None` for anything else.
    pub fn honest(&self, tag: &str, r: &FakeRequest) -> Option<FakeAnswer> {
        if let Some((name, reference)) = r.manifest() {
            if name == self.name && (reference == tag || reference == self.digest()) {
                return Some(FakeAnswer::bytes(
                    200,
                    &[
                        ("Content-Type", OCI_MANIFEST),
                        ("Docker-Content-Digest", &self.digest()),
                    ],
                    self.manifest.clone(),
                ));
            }
        }
        if let Some((name, digest)) = r.blob() {
            if name == self.name {
                let data = if digest == self.config_digest() {
                    Some(self.config.clone())
                } else {
                    self.layers.iter().find(|l| sha256(l) == digest).cloned()
                };
                if let Some(data) = data {
                    return Some(FakeAnswer::bytes(
                        200,
                        &[
                            ("Content-Type", "application/octet-stream"),
                            ("Docker-Content-Digest", digest),
                        ],
                        data,
                    ));
                }
            }
        }
        if r.path == "/v2/" || r.path == "/v2" {
            return Some(FakeAnswer::bytes(200, &[], b"{}".to_vec()));
        }
        None
    }
}
