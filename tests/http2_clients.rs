//! Stream references through imagestream's CRI socket, called by HTTP/2 clients that are neither
//! grpc-go nor Rust: `curl --http2-prior-knowledge --unix-socket` and `nghttp` (over a socat TCP
//! bridge). Every client run is a new connection, and each call is the **first call on its
//! connection**.
//!
//! Why these clients: grpc-go (crictl, the kubelet) and tonic wait for the server's SETTINGS
//! before their first request, so they cannot notice a server that answers before sending its
//! connection preface. curl and nghttp send the request right after their own preface, and
//! nghttp2 (in both) refuses a response that comes before the server's SETTINGS frame (RFC 9113
//! §3.4: the server's preface is a SETTINGS frame, its first frame) with GOAWAY PROTOCOL_ERROR
//! "SETTINGS expected"; curl then reports `(52) Empty reply from server`.
//!
//! The daemon reaches containerd through a socket that holds back what containerd sends on each
//! new connection for a moment ([`SlowStart`], a busy runtime): the proxy's own preface must not
//! depend on its runtime connection, and the calls the proxy answers itself (ImageStatus of a
//! stream reference, refusals) are where a relay that passes the runtime's SETTINGS on as its own
//! answers before its preface — without the delay, a race such a relay sometimes wins.
//!
//! Each test proves, for its client, on one test bed (registry, containerd, daemon; stream
//! `team-a/app`, tag `prod` pinned to an image in the registry):
//! - `ImageStatus` of `imagestream.local/team-a/app:prod` answers HTTP 200, grpc-status 0 and an
//!   empty `ImageStatusResponse` (a stream reference is never reported present; README, "Stream
//!   references");
//! - `PullImage` of it (pod in `team-a`), while the runtime does not hold the image yet, answers
//!   grpc-status 0 with `image_ref` = the id containerd itself gives the pinned image (its
//!   `PullImage` of `registry/app@sha256:…`, called directly);
//! - `PullImage` of it again, now that the runtime holds the image (answered by the proxy after
//!   one runtime `ImageStatus`), answers the same id;
//! - `PullImage` of the missing tag `imagestream.local/team-a/app:nope` answers grpc-status 5
//!   (NotFound) with a message naming the stream and the tag;
//! - `PullImage` of the stream reference for a pod in `team-x` answers grpc-status 7
//!   (PermissionDenied) naming the stream and the namespace;
//! - controls, without a stream reference: the same client's `ImageStatus` of the pinned
//!   reference answers that id directly from containerd and through imagestream.
//!
//! Every check runs, and the assertion lists them all, each with what the client saw (its error,
//! the HTTP status, grpc-status and grpc-message, nghttp's frame log), so that a reader sees
//! which calls broke and how. Needs root, curl, nghttp (`nghttp2-client`) and socat.

mod common;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use common::daemon::Daemon;
use common::tools::{grpc_frame, grpc_messages, TcpBridge};
use common::*;
use k8s_cri::v1::{
    ImageStatusRequest, ImageStatusResponse, PodSandboxConfig, PullImageRequest, PullImageResponse,
};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

const STREAM_REF: &str = "imagestream.local/team-a/app:prod";
const MISSING_REF: &str = "imagestream.local/team-a/app:nope";
/// A guard against a hung call (a cold pull takes seconds); not an assertion.
const CALL_TIMEOUT_SECS: u32 = 120;

/// How long [`SlowStart`] holds back what the runtime sends on a new connection.
const RUNTIME_SLOW_START: Duration = Duration::from_millis(250);

/// A unix socket in front of the runtime's that forwards every connection both ways, but lets
/// the runtime's bytes (its SETTINGS first) through only [`RUNTIME_SLOW_START`] after the
/// connection opened: a runtime busy at the moment a connection comes in. A CRI server must
/// still send its own SETTINGS first, whatever its runtime connection is doing; a relay that
/// waits for the runtime's SETTINGS to pass them on as its own, but answers a call it decides
/// itself at once, answers before its preface. (Without the delay that is a race the relay
/// sometimes wins.)
struct SlowStart {
    socket: PathBuf,
    accept: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl SlowStart {
    /// Needs a tokio runtime (the forwarding runs on it).
    fn start(runtime_socket: &Path) -> SlowStart {
        let dir = tempfile::Builder::new()
            .prefix("slow-runtime-")
            .tempdir()
            .expect("temp dir for the slow runtime socket");
        let socket = dir.path().join("runtime.sock");
        let listener = UnixListener::bind(&socket).expect("bind the slow runtime socket");
        let target = runtime_socket.to_path_buf();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(runtime) = UnixStream::connect(&target).await else {
                        return;
                    };
                    let (mut client_r, mut client_w) = client.into_split();
                    let (mut runtime_r, mut runtime_w) = runtime.into_split();
                    let up = async {
                        let _ = tokio::io::copy(&mut client_r, &mut runtime_w).await;
                        let _ = runtime_w.shutdown().await;
                    };
                    let down = async {
                        tokio::time::sleep(RUNTIME_SLOW_START).await;
                        let _ = tokio::io::copy(&mut runtime_r, &mut client_w).await;
                        let _ = client_w.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        SlowStart {
            socket,
            accept,
            _dir: dir,
        }
    }
}

impl Drop for SlowStart {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A registry with one image, containerd, and the daemon in front of it (through
/// [`SlowStart`]) with stream `team-a/app`, tag `prod` pinned to that image.
struct Bed {
    /// `<registry>/app@sha256:…`: what `team-a/app:prod` is pinned to.
    pinned: String,
    logs: tempfile::TempDir,
    daemon: Daemon,
    _slow: SlowStart,
    ctd: RuntimeBed,
    _registry: Registry,
}

impl Bed {
    /// Needs a tokio runtime (for [`SlowStart`]).
    fn start() -> Bed {
        require_root("containerd and the imagestream daemon");
        let registry = Registry::start();
        let digest = push_image(&registry, "app", "v1", "v1", &["/bin/sleep", "infinity"]);
        let ctd = RuntimeBed::start(&registry);
        let slow = SlowStart::start(&ctd.socket);
        let daemon = Daemon::start(
            &format!("unix://{}", slow.socket.display()),
            &[&registry.addr],
            &[],
        );
        daemon.cli_ok(&["stream", "create", "team-a/app"]);
        daemon.cli_ok(&[
            "tag",
            "set",
            "team-a/app:prod",
            &registry.image_ref("app:v1"),
        ]);
        Bed {
            pinned: format!("{}/app@{digest}", registry.addr),
            logs: tempfile::tempdir().expect("pod log dir"),
            daemon,
            _slow: slow,
            ctd,
            _registry: registry,
        }
    }

    fn pod(&self, name: &str, namespace: &str) -> PodSandboxConfig {
        pod_config(name, namespace, &self.logs.path().join(name))
    }
}

/// A CRI socket as both clients reach it: curl on the unix socket, nghttp on a TCP bridge.
struct Endpoint {
    name: &'static str,
    socket: PathBuf,
    bridge: TcpBridge,
}

impl Endpoint {
    fn new(name: &'static str, socket: &Path) -> Endpoint {
        Endpoint {
            name,
            socket: socket.to_path_buf(),
            bridge: TcpBridge::start(socket),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Client {
    Curl,
    Nghttp,
}

/// An HTTP/2 response as the client saw it.
struct Reply {
    /// The command line, shortened, for messages.
    call: String,
    exit: ExitStatus,
    /// The client gave up on the connection: a non-zero exit, or (nghttp, which exits 0 anyway)
    /// an `[ERROR]` or an unprocessed request.
    client_failed: bool,
    http_status: Option<u16>,
    headers: Vec<(String, String)>,
    trailers: Vec<(String, String)>,
    body: Vec<u8>,
    /// What the client said about the connection: curl's stderr, nghttp's errors, GOAWAY and
    /// RST_STREAM frames, and the frames it received in order.
    log: String,
}

impl Reply {
    /// grpc-status: from the trailers, or from the headers of a trailers-only response.
    fn grpc_status(&self) -> Option<&str> {
        field(&self.trailers, "grpc-status").or_else(|| field(&self.headers, "grpc-status"))
    }

    /// grpc-message, percent-decoded.
    fn grpc_message(&self) -> String {
        let raw = field(&self.trailers, "grpc-message")
            .or_else(|| field(&self.headers, "grpc-message"))
            .unwrap_or("");
        percent_decode(raw)
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "{} → client {}, HTTP status {}, grpc-status {}, grpc-message {:?}, {} body byte(s)",
            self.call,
            self.exit,
            self.http_status
                .map_or("none".to_string(), |c| c.to_string()),
            self.grpc_status().unwrap_or("none"),
            self.grpc_message(),
            self.body.len()
        );
        if !self.log.trim().is_empty() {
            for line in self.log.trim().lines() {
                let _ = write!(s, "\n        | {line}");
            }
        }
        s
    }

    fn client_failure(&self) -> String {
        match self.exit.code() {
            Some(52) => "the client failed: curl (52), the server closed the connection without \
                         a response (nghttp2 in curl closes it with GOAWAY PROTOCOL_ERROR \
                         \"SETTINGS expected\" when the server's first frame is not SETTINGS)"
                .to_string(),
            _ => "the client failed".to_string(),
        }
    }

    /// The single response message of a successful call.
    fn ok_message<M: Message + Default>(&self) -> Result<M, String> {
        let fail = |why: String| Err(format!("{why}\n      {}", self.describe()));
        if self.client_failed {
            return fail(self.client_failure());
        }
        if self.http_status != Some(200) {
            return fail("HTTP status is not 200".into());
        }
        if self.grpc_status() != Some("0") {
            return fail("grpc-status is not 0".into());
        }
        let messages = match grpc_messages(&self.body) {
            Ok(m) => m,
            Err(e) => return fail(format!("the body is no gRPC message stream: {e}")),
        };
        if messages.len() != 1 {
            return fail(format!(
                "{} messages in the body, expected 1",
                messages.len()
            ));
        }
        M::decode(messages[0].as_slice())
            .or_else(|e| fail(format!("the message does not decode: {e}")))
    }

    /// A refusal with `code`, whose message contains every one of `names`.
    fn refused(&self, code: &str, names: &[&str]) -> Result<(), String> {
        let fail = |why: String| Err(format!("{why}\n      {}", self.describe()));
        if self.client_failed {
            return fail(self.client_failure());
        }
        if self.http_status != Some(200) {
            return fail("HTTP status is not 200".into());
        }
        if self.grpc_status() != Some(code) {
            return fail(format!("grpc-status is not {code}"));
        }
        let msg = self.grpc_message();
        let missing: Vec<&&str> = names.iter().filter(|n| !msg.contains(**n)).collect();
        if !missing.is_empty() {
            return fail(format!("grpc-message does not name {missing:?}"));
        }
        Ok(())
    }
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// gRPC's percent-encoding of grpc-message (`%XX`, UTF-8).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Curl => "curl",
            Client::Nghttp => "nghttp",
        }
    }

    /// `runtime.v1.ImageService/<method>` with `request` (a protobuf message) on a new
    /// connection to `to`.
    fn call(self, to: &Endpoint, method: &str, request: &[u8]) -> Reply {
        let dir = tempfile::tempdir().expect("temp dir for a client call");
        let req = dir.path().join("request.bin");
        fs::write(&req, grpc_frame(request)).expect("write the request body");
        let path = format!("/runtime.v1.ImageService/{method}");
        match self {
            Client::Curl => curl(to, &path, &req, dir.path()),
            Client::Nghttp => nghttp(to, &path, &req),
        }
    }
}

fn curl(to: &Endpoint, path: &str, req: &Path, dir: &Path) -> Reply {
    let curl = require_binary("curl", "curl");
    let head = dir.join("head.txt");
    let body = dir.join("body.bin");
    let out = Command::new(curl)
        .args(["-sS", "-v", "--http2-prior-knowledge", "--unix-socket"])
        .arg(&to.socket)
        .args(["--max-time", &CALL_TIMEOUT_SECS.to_string()])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("--data-binary")
        .arg(format!("@{}", req.display()))
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .arg(format!("http://localhost{path}"))
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    // -D writes the status line and headers, a blank line, then the trailers.
    let head = fs::read_to_string(&head).unwrap_or_default();
    let mut lines = head.split("\r\n");
    let http_status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/2 "))
        .and_then(|s| s.trim().parse().ok());
    let mut headers = Vec::new();
    let mut trailers = Vec::new();
    let mut in_trailers = false;
    for line in lines {
        if line.is_empty() {
            in_trailers = true;
            continue;
        }
        if let Some((n, v)) = line.split_once(':') {
            let target = if in_trailers {
                &mut trailers
            } else {
                &mut headers
            };
            target.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    // curl's own notes (`* …`) and its error; not the request and response it echoes.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = stderr
        .lines()
        .filter(|l| (l.starts_with("* ") && !l.starts_with("* h2h3 ")) || l.starts_with("curl:"))
        .collect::<Vec<_>>()
        .join("\n");
    Reply {
        client_failed: !out.status.success(),
        call: format!(
            "curl --http2-prior-knowledge --unix-socket {} ({}) http://localhost{path}",
            to.socket.display(),
            to.name
        ),
        exit: out.status,
        http_status,
        headers,
        trailers,
        body: fs::read(&body).unwrap_or_default(),
        log,
    }
}

/// Splits nghttp's `-v` stdout into the response body and the frame log. nghttp writes each
/// DATA chunk to stdout as it arrives, right before the log entry
/// `[ t] recv DATA frame <length=N, …>` of its frame (no padding from these servers).
fn split_nghttp_stdout(stdout: &[u8]) -> (Vec<u8>, String) {
    const MARK: &[u8] = b"] recv DATA frame <length=";
    let mut body = Vec::new();
    let mut text = Vec::new();
    let mut copied = 0;
    let mut search = 0;
    while let Some(off) = stdout[search..].windows(MARK.len()).position(|w| w == MARK) {
        let mark = search + off;
        search = mark + MARK.len();
        let digits: String = stdout[search..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .map(|&c| c as char)
            .collect();
        let (Ok(len), Some(open)) = (
            digits.parse::<usize>(),
            stdout[..mark].iter().rposition(|&c| c == b'['),
        ) else {
            continue;
        };
        let start = open.saturating_sub(len).max(copied);
        text.extend_from_slice(&stdout[copied..start]);
        body.extend_from_slice(&stdout[start..open]);
        copied = open;
    }
    text.extend_from_slice(&stdout[copied..]);
    (body, String::from_utf8_lossy(&text).into_owned())
}

fn nghttp(to: &Endpoint, path: &str, req: &Path) -> Reply {
    let nghttp = require_binary("nghttp", "nghttp2-client");
    let out = Command::new(nghttp)
        .args(["-v", "--no-dep", "-t", &CALL_TIMEOUT_SECS.to_string(), "-d"])
        .arg(req)
        .args(["-H", ":method: POST"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg(format!("http://127.0.0.1:{}{path}", to.bridge.port))
        .stdin(Stdio::null())
        .output()
        .expect("run nghttp");
    let (body, text) = split_nghttp_stdout(&out.stdout);
    let mut headers = Vec::new();
    let mut trailers = Vec::new();
    let mut pending = Vec::new();
    let mut received = Vec::new();
    let mut log = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        // "[  0.007] recv (stream_id=1) :status: 200"
        if let Some(i) = line.find("] recv (stream_id=") {
            let rest = &line[i..];
            let Some(close) = rest.find(") ") else {
                continue;
            };
            let f = &rest[close + 2..];
            let (n, v) = match f[1.min(f.len())..].find(": ") {
                Some(j) => (&f[..j + 1], &f[j + 3..]),
                None => (f.trim_end_matches(':'), ""),
            };
            pending.push((n.to_string(), v.trim().to_string()));
        } else if let Some(i) = line.find("] recv ") {
            // "[  0.007] recv HEADERS frame <length=14, flags=0x04, stream_id=1>"
            let frame = line[i + 7..]
                .split(" frame")
                .next()
                .unwrap_or("")
                .to_string();
            let flags = lines
                .peek()
                .filter(|l| l.starts_with(' '))
                .map_or("", |l| l.trim());
            received.push(if flags.contains("ACK") {
                format!("{frame}(ACK)")
            } else {
                frame.clone()
            });
            if frame == "HEADERS" {
                let fields = std::mem::take(&mut pending);
                if headers.is_empty() {
                    headers = fields;
                } else {
                    trailers = fields;
                }
            }
            if frame == "GOAWAY" || frame == "RST_STREAM" {
                log.push(format!("{} {}", line.trim(), flags));
            }
        } else if line.contains("[ERROR]") || line.contains("send GOAWAY") {
            // A frame's details follow on indented lines.
            let detail = lines
                .peek()
                .filter(|l| l.starts_with(' '))
                .map_or("", |l| l.trim());
            log.push(format!("{} {}", line.trim(), detail));
        }
    }
    log.push(format!(
        "frames received, in order: {}",
        if received.is_empty() {
            "none".to_string()
        } else {
            received.join(", ")
        }
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    log.extend(stderr.lines().map(str::to_string));
    let http_status = field(&headers, ":status").and_then(|s| s.parse().ok());
    let client_failed = !out.status.success()
        || log
            .iter()
            .any(|l| l.contains("[ERROR]") || l.contains("were not processed"));
    Reply {
        client_failed,
        call: format!(
            "nghttp http://127.0.0.1:{}{path} (socat to {}, {})",
            to.bridge.port,
            to.socket.display(),
            to.name
        ),
        exit: out.status,
        http_status,
        headers,
        trailers,
        body,
        log: log.join("\n"),
    }
}

fn image_status(image: &str) -> Vec<u8> {
    ImageStatusRequest {
        image: Some(image_spec(image)),
        verbose: false,
    }
    .encode_to_vec()
}

fn pull_image(image: &str, pod: PodSandboxConfig) -> Vec<u8> {
    PullImageRequest {
        image: Some(image_spec(image)),
        auth: None,
        sandbox_config: Some(pod),
    }
    .encode_to_vec()
}

/// The checks of the module doc, in order, for `client`.
async fn stream_references_first_on_connection(client: Client) {
    let bed = Bed::start();
    let direct = Endpoint::new("containerd", &bed.ctd.socket);
    let proxy = Endpoint::new("imagestream", &bed.daemon.cri_socket);
    let c = client.name();
    let mut checks: Vec<(String, Result<(), String>)> = Vec::new();

    let reply = client.call(&proxy, "ImageStatus", &image_status(STREAM_REF));
    checks.push((
        format!("ImageStatus {STREAM_REF} through imagestream: OK, empty ImageStatusResponse"),
        reply.ok_message::<ImageStatusResponse>().and_then(|r| {
            if r == ImageStatusResponse::default() {
                Ok(())
            } else {
                Err(format!("expected an empty ImageStatusResponse, got {r:?}"))
            }
        }),
    ));

    // Through the proxy while the runtime does not hold the image yet; then containerd's own
    // id for the pinned image, from a direct pull (grpc-go style client, tonic).
    let cold = client
        .call(
            &proxy,
            "PullImage",
            &pull_image(STREAM_REF, bed.pod("cold", "team-a")),
        )
        .ok_message::<PullImageResponse>();
    let mut img = image_client(&bed.ctd.socket).await;
    let image_id = img
        .pull_image(PullImageRequest {
            image: Some(image_spec(&bed.pinned)),
            auth: None,
            sandbox_config: None,
        })
        .await
        .unwrap_or_else(|e| panic!("direct PullImage {} from containerd: {e}", bed.pinned))
        .into_inner()
        .image_ref;
    assert!(
        image_id.starts_with("sha256:"),
        "containerd's image id: {image_id:?}"
    );
    let same_id = |r: PullImageResponse| {
        if r.image_ref == image_id {
            Ok(())
        } else {
            Err(format!(
                "image_ref {:?}, containerd's id of {} is {image_id:?}",
                r.image_ref, bed.pinned
            ))
        }
    };
    checks.push((
        format!(
            "PullImage {STREAM_REF} through imagestream, image not on the node yet: OK, \
             image_ref = containerd's id of the pinned image"
        ),
        cold.and_then(same_id),
    ));

    let reply = client.call(
        &proxy,
        "PullImage",
        &pull_image(STREAM_REF, bed.pod("hot", "team-a")),
    );
    checks.push((
        format!(
            "PullImage {STREAM_REF} through imagestream, image on the node: OK, image_ref = \
             containerd's id of the pinned image"
        ),
        reply.ok_message::<PullImageResponse>().and_then(same_id),
    ));

    let reply = client.call(
        &proxy,
        "PullImage",
        &pull_image(MISSING_REF, bed.pod("missing", "team-a")),
    );
    checks.push((
        format!("PullImage {MISSING_REF} through imagestream: NotFound naming it"),
        reply.refused("5", &["team-a/app", "nope"]),
    ));

    let reply = client.call(
        &proxy,
        "PullImage",
        &pull_image(STREAM_REF, bed.pod("other", "team-x")),
    );
    checks.push((
        format!(
            "PullImage {STREAM_REF} through imagestream, pod in team-x: PermissionDenied naming \
             the stream and the namespace"
        ),
        reply.refused("7", &["team-a/app", "team-x"]),
    ));

    for to in [&direct, &proxy] {
        let reply = client.call(to, "ImageStatus", &image_status(&bed.pinned));
        checks.push((
            format!(
                "control: ImageStatus of the pinned reference (no stream reference) from {}: \
                 OK, the image with containerd's id",
                to.name
            ),
            reply.ok_message::<ImageStatusResponse>().and_then(|r| {
                match r.image.as_ref().map(|i| i.id.as_str()) {
                    Some(id) if id == image_id => Ok(()),
                    other => Err(format!("image id {other:?}, expected {image_id:?}")),
                }
            }),
        ));
    }

    let failed = checks.iter().filter(|(_, r)| r.is_err()).count();
    let mut report = format!(
        "{c}: {failed} of {} checks failed. Each call is {c}'s first (and only) call on a new \
         connection; the pinned reference is {}. A failed control (no stream reference) means \
         the test bed or the client is broken, not the stream-reference path.\n",
        checks.len(),
        bed.pinned
    );
    for (what, result) in &checks {
        match result {
            Ok(()) => {
                let _ = writeln!(report, "  ok      {what}");
            }
            Err(e) => {
                let _ = writeln!(report, "  FAILED  {what}\n      {e}");
            }
        }
    }
    eprintln!("{report}");
    assert_eq!(failed, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_stream_reference_calls_first_on_a_new_connection() {
    stream_references_first_on_connection(Client::Curl).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nghttp_stream_reference_calls_first_on_a_new_connection() {
    stream_references_first_on_connection(Client::Nghttp).await;
}

#[test]
fn nghttp_output_splits_into_body_and_log() {
    let mut out = b"[  0.007] recv HEADERS frame <length=14, flags=0x04, stream_id=1>\n".to_vec();
    out.extend_from_slice(b"\x00\x00\x00\x00\x02[]");
    out.extend_from_slice(b"[  0.007] recv DATA frame <length=7, flags=0x00, stream_id=1>\n");
    out.extend_from_slice(b"[  0.008] recv (stream_id=1) grpc-status: 0\n");
    let (body, text) = split_nghttp_stdout(&out);
    assert_eq!(body, b"\x00\x00\x00\x00\x02[]");
    assert_eq!(
        text,
        "[  0.007] recv HEADERS frame <length=14, flags=0x04, stream_id=1>\n\
         [  0.007] recv DATA frame <length=7, flags=0x00, stream_id=1>\n\
         [  0.008] recv (stream_id=1) grpc-status: 0\n"
    );
    assert_eq!(
        percent_decode("tag %22nope%22 not found %E2%9C%93 100%"),
        "tag \"nope\" not found ✓ 100%"
    );
}
