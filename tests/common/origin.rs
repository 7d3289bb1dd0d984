//! A FAULT-INJECTING origin: a tiny HTTP/1.1 reverse proxy on a free loopback port in front of a
//! real [`super::Registry`]. Every request is forwarded (one upstream connection per request,
//! HTTP/1.0 so the body is never chunked); depending on the [`FaultMode`] blob bodies pass
//! through, come back with flipped bytes (same length, same headers, so the registry's
//! `Docker-Content-Digest` now lies), trickle at a fixed rate, or are redirected (307) to
//! another server. Requests are recorded per path, with whether they carried `Authorization`.
//! A real registry cannot be made to do any of this.
//!
//! Bounded: connection threads wait at most 60 s for a next request, every upstream read and
//! client write has a timeout, and everything stops soon after the proxy is dropped.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the origin does to blob responses (GET `/v2/<name>/blobs/sha256:...`, 200 or 206).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultMode {
    /// Forward everything unchanged.
    PassThrough,
    /// Flip bytes in the body of this one blob (`sha256:...`); everything else passes.
    CorruptBlob(String),
    /// Flip bytes in the body of every blob.
    CorruptAllBlobs,
    /// Send blob bodies at this many bytes per second.
    ThrottleBlobs(u64),
    /// Answer every blob GET with `307 Temporary Redirect` to `<base>/v2/<name>/blobs/<digest>`
    /// (`base`: `http://HOST:PORT`, e.g. another loopback port), without asking the registry.
    RedirectBlobs(String),
}

/// One request the origin answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginRequest {
    pub method: String,
    /// Request target including any query string.
    pub target: String,
    /// Status from the registry (0: the registry could not be reached).
    pub status: u16,
    /// Body bytes sent to the client.
    pub body_bytes: u64,
    /// Whether the whole body reached the client.
    pub complete: bool,
    /// Whether the body was corrupted on purpose.
    pub corrupted: bool,
    /// The client's User-Agent header.
    pub user_agent: String,
    /// Whether the request carried an `Authorization` header.
    pub authorization: bool,
}

struct Shared {
    upstream: String,
    mode: Mutex<FaultMode>,
    stop: AtomicBool,
    /// Requests seen (counted when the request head has been read).
    seen: Mutex<HashMap<String, usize>>,
    /// Requests answered (recorded when the response ends).
    done: Mutex<Vec<OriginRequest>>,
}

/// See the module docs. Stops when dropped.
pub struct FaultInjectingOrigin {
    /// "127.0.0.1:PORT": the registry host name clients use for this origin.
    pub addr: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultInjectingOrigin {
    /// Listens on a free loopback port and forwards to `upstream` ("127.0.0.1:PORT").
    pub fn start(upstream: &str, mode: FaultMode) -> FaultInjectingOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fault-injecting origin");
        let addr = listener
            .local_addr()
            .expect("origin local_addr")
            .to_string();
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            mode: Mutex::new(mode),
            stop: AtomicBool::new(false),
            seen: Mutex::new(HashMap::new()),
            done: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if accept_shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let s = accept_shared.clone();
                std::thread::spawn(move || serve_connection(conn, &s));
            }
        });
        FaultInjectingOrigin {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Changes the mode for responses that start from now on.
    pub fn set_mode(&self, mode: FaultMode) {
        *lock(&self.shared.mode) = mode;
    }

    /// "<addr>/<name_tag>": the reference a client pulls through this origin.
    pub fn image_ref(&self, name_tag: &str) -> String {
        format!("{}/{}", self.addr, name_tag)
    }

    /// Every answered request so far.
    pub fn requests(&self) -> Vec<OriginRequest> {
        lock(&self.shared.done).clone()
    }

    /// How many requests (answered or not) had a path (query stripped) equal to `path`.
    pub fn count(&self, path: &str) -> usize {
        lock(&self.shared.seen).get(path).copied().unwrap_or(0)
    }

    /// Requests seen per path (query stripped).
    pub fn counts(&self) -> HashMap<String, usize> {
        lock(&self.shared.seen).clone()
    }

    /// GETs of blobs that the registry answered 200/206, per digest (complete or not).
    pub fn blob_gets(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for r in self.requests() {
            if r.method == "GET" && (r.status == 200 || r.status == 206) {
                if let Some(d) = super::blob_digest_of_path(&r.target) {
                    *counts.entry(d.to_string()).or_insert(0) += 1;
                }
            }
        }
        counts
    }
}

impl Drop for FaultInjectingOrigin {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
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

/// Reads header lines up to the blank line; None on EOF/error/oversize.
fn read_head(reader: &mut impl BufRead) -> Option<(String, Vec<(String, String)>)> {
    let mut first = String::new();
    if reader.read_line(&mut first).ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    let mut total = first.len();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).ok()?;
        total += n;
        if n == 0 || total > 64 * 1024 || headers.len() > 200 {
            return None;
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    Some((first.trim_end_matches(['\r', '\n']).to_string(), headers))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
];

fn serve_connection(client: TcpStream, shared: &Shared) {
    let _ = client.set_nodelay(true);
    let _ = client.set_write_timeout(Some(Duration::from_secs(30)));
    let Ok(read_half) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = client;
    let mut idle_since = Instant::now();
    loop {
        // Wait for the next request, checking the stop flag.
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(250)));
        match reader.fill_buf() {
            Ok([]) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if idle_since.elapsed() > Duration::from_secs(60) {
                    return;
                }
                continue;
            }
            Err(_) => return,
        }
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(10)));
        let Some((request_line, headers)) = read_head(&mut reader) else {
            return;
        };
        let mut parts = request_line.split(' ');
        let (Some(method), Some(target), Some(version)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let (method, target) = (method.to_string(), target.to_string());
        let path = target.split('?').next().unwrap_or(&target).to_string();
        *lock(&shared.seen).entry(path.clone()).or_insert(0) += 1;
        let connection = header(&headers, "connection")
            .unwrap_or("")
            .to_ascii_lowercase();
        let client_close = connection.contains("close")
            || (version == "HTTP/1.0" && !connection.contains("keep-alive"));
        if header(&headers, "transfer-encoding").is_some() {
            let _ = writer.write_all(
                b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return;
        }
        let body_len: u64 = header(&headers, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = Vec::new();
        if body_len > 0
            && (&mut reader)
                .take(body_len)
                .read_to_end(&mut body)
                .map(|n| n as u64 != body_len)
                .unwrap_or(true)
        {
            return;
        }
        let mode = lock(&shared.mode).clone();
        let outcome = forward(
            shared,
            &method,
            &target,
            &headers,
            &body,
            &mode,
            &mut writer,
        );
        lock(&shared.done).push(OriginRequest {
            method: method.clone(),
            target: target.clone(),
            status: outcome.status,
            body_bytes: outcome.body_bytes,
            complete: outcome.complete,
            corrupted: outcome.corrupted,
            user_agent: header(&headers, "user-agent").unwrap_or("").to_string(),
            authorization: header(&headers, "authorization").is_some(),
        });
        if client_close || !outcome.keep_alive {
            return;
        }
        idle_since = Instant::now();
    }
}

struct Outcome {
    status: u16,
    body_bytes: u64,
    complete: bool,
    corrupted: bool,
    keep_alive: bool,
}

fn forward(
    shared: &Shared,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
    mode: &FaultMode,
    client: &mut TcpStream,
) -> Outcome {
    let mut outcome = Outcome {
        status: 0,
        body_bytes: 0,
        complete: false,
        corrupted: false,
        keep_alive: false,
    };
    if let FaultMode::RedirectBlobs(base) = mode {
        if method == "GET" && super::blob_digest_of_path(target).is_some() {
            let path = target.split('?').next().unwrap_or(target);
            let _ = write!(
                client,
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {base}{path}\r\nContent-Length: 0\r\n\r\n"
            );
            outcome.status = 307;
            outcome.complete = true;
            outcome.keep_alive = true;
            return outcome;
        }
    }
    let upstream = shared.upstream.parse::<SocketAddr>().ok().and_then(|a| {
        let s = TcpStream::connect_timeout(&a, Duration::from_secs(5)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        s.set_write_timeout(Some(Duration::from_secs(30))).ok()?;
        Some(s)
    });
    let Some(mut up) = upstream else {
        let msg = b"origin unreachable";
        let _ = write!(
            client,
            "HTTP/1.1 502 Bad Gateway\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            msg.len()
        );
        let _ = client.write_all(msg);
        outcome.status = 502;
        return outcome;
    };
    // HTTP/1.0 upstream: the registry then never chunks and closes after the body.
    let mut req = format!(
        "{method} {target} HTTP/1.0\r\nHost: {}\r\n",
        shared.upstream
    );
    for (n, v) in headers {
        let lower = n.to_ascii_lowercase();
        if lower == "host" || HOP_BY_HOP.contains(&lower.as_str()) {
            continue;
        }
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    if up.write_all(req.as_bytes()).is_err() || up.write_all(body).is_err() {
        return outcome;
    }
    let mut ur = BufReader::with_capacity(64 * 1024, up);
    let Some((status_line, resp_headers)) = read_head(&mut ur) else {
        return outcome;
    };
    let mut sl = status_line.splitn(3, ' ');
    let _proto = sl.next();
    let status: u16 = sl.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let reason = sl.next().unwrap_or("").to_string();
    outcome.status = status;
    let is_blob_get = method == "GET"
        && (status == 200 || status == 206)
        && super::blob_digest_of_path(target).is_some();
    let digest = super::blob_digest_of_path(target).unwrap_or("");
    let corrupt = is_blob_get
        && match mode {
            FaultMode::CorruptAllBlobs => true,
            FaultMode::CorruptBlob(d) => d == digest,
            _ => false,
        };
    let rate = match mode {
        FaultMode::ThrottleBlobs(r) if is_blob_get => Some((*r).max(1)),
        _ => None,
    };
    let no_body =
        method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status);
    let declared: Option<u64> =
        header(&resp_headers, "content-length").and_then(|v| v.parse().ok());
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (n, v) in &resp_headers {
        let lower = n.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lower.as_str()) {
            continue;
        }
        if lower == "content-length" && declared.is_none() {
            continue;
        }
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    if no_body {
        head.push_str("\r\n");
        outcome.complete = client.write_all(head.as_bytes()).is_ok();
        outcome.keep_alive = outcome.complete;
        return outcome;
    }
    let Some(len) = declared else {
        // Unknown length: buffer to EOF and send with a Content-Length (small error bodies).
        let mut buf = Vec::new();
        let _ = ur.take(16 * 1024 * 1024).read_to_end(&mut buf);
        head.push_str(&format!("Content-Length: {}\r\n\r\n", buf.len()));
        outcome.complete =
            client.write_all(head.as_bytes()).is_ok() && client.write_all(&buf).is_ok();
        outcome.body_bytes = buf.len() as u64;
        outcome.keep_alive = outcome.complete;
        return outcome;
    };
    head.push_str("\r\n");
    if client.write_all(head.as_bytes()).is_err() {
        return outcome;
    }
    let started = Instant::now();
    let chunk = match rate {
        Some(r) => (r / 20).clamp(1024, 64 * 1024) as usize,
        None => 64 * 1024,
    };
    let mut buf = vec![0u8; chunk];
    let mut sent: u64 = 0;
    while sent < len {
        if shared.stop.load(Ordering::SeqCst) {
            return outcome;
        }
        let want = ((len - sent) as usize).min(buf.len());
        let n = match ur.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if corrupt {
            for (i, b) in buf[..n].iter_mut().enumerate() {
                let offset = sent + i as u64;
                if offset % 4096 == 7 || offset + 1 == len {
                    *b ^= 0xff;
                    outcome.corrupted = true;
                }
            }
        }
        if let Some(r) = rate {
            // Sleep until the bytes already sent fit the rate.
            let due = Duration::from_secs_f64(sent as f64 / r as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if client.write_all(&buf[..n]).is_err() {
            return outcome;
        }
        sent += n as u64;
        outcome.body_bytes = sent;
    }
    outcome.complete = sent == len;
    // A short upstream body: close so the client sees the truncation.
    outcome.keep_alive = outcome.complete;
    let _ = client.flush();
    outcome
}
