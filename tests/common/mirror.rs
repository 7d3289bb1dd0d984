//! Helpers for the node's layer cache and registry mirror: the content store on disk
//! (`<state_dir>/blobs/sha256/<hex>`, `<state_dir>/ingest/`), Prometheus text from `/metrics`,
//! raw HTTP/1.0 requests to the mirror, and CRI PullImage/RemoveImage.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{PullImageRequest, RemoveImageRequest};
use sha2::{Digest, Sha256};

pub const KIB: usize = 1024;
pub const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Content store on disk
// ---------------------------------------------------------------------------------------------

/// `sha256:<hex>` of a file's content.
pub fn sha256_file(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// `sha256:<hex>` of bytes.
pub fn sha256_bytes(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `<state_dir>/blobs/sha256`
pub fn blobs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("blobs").join("sha256")
}

/// `<state_dir>/ingest`
pub fn ingest_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ingest")
}

/// The path a complete blob `sha256:<hex>` has in the store.
pub fn blob_path(state_dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    blobs_dir(state_dir).join(hex)
}

/// Every file under `dir` (recursively) with its size; empty if `dir` does not exist.
pub fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => out.extend(files_under(&path)),
            Ok(_) => {
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((path, size));
            }
            Err(_) => {}
        }
    }
    out
}

/// Blobs in the store: `sha256:<file name>` -> size. Any other entry (subdirectory, a name that
/// is not 64 lowercase hex) is returned as an Err naming it.
pub fn store_blobs(state_dir: &Path) -> Result<BTreeMap<String, u64>, String> {
    let dir = blobs_dir(state_dir);
    let mut out = BTreeMap::new();
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(out);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = entry
            .metadata()
            .map_err(|e| format!("{}: {e}", entry.path().display()))?;
        let hex_ok = name.len() == 64
            && name
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !meta.is_file() || !hex_ok {
            return Err(format!(
                "unexpected entry in {}: {name:?} (file: {})",
                dir.display(),
                meta.is_file()
            ));
        }
        out.insert(format!("sha256:{name}"), meta.len());
    }
    Ok(out)
}

/// Re-hashes every blob in the store; Err lists each file whose content does not hash to its
/// name (a partial or corrupt blob). Ok: digest -> size.
pub fn verify_store(state_dir: &Path) -> Result<BTreeMap<String, u64>, String> {
    let blobs = store_blobs(state_dir)?;
    let mut bad = Vec::new();
    for (digest, size) in &blobs {
        let actual = sha256_file(&blob_path(state_dir, digest));
        if &actual != digest {
            bad.push(format!("{digest} ({size} bytes) hashes to {actual}"));
        }
    }
    if bad.is_empty() {
        Ok(blobs)
    } else {
        Err(format!(
            "{} of {} blobs in {} do not match their names:\n  {}",
            bad.len(),
            blobs.len(),
            blobs_dir(state_dir).display(),
            bad.join("\n  ")
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------------------------

/// Value of a metric in Prometheus/OpenMetrics text. `series` is either a bare name (every
/// label set of that name is summed) or a full series like `name{source="cache"}` (exact
/// match, labels in the order the exporter prints them). None if no line matches.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // `name{labels} value [timestamp]` or `name value [timestamp]`.
        let (key, rest) = match line.rfind('}') {
            Some(i) => line.split_at(i + 1),
            None => line.split_at(line.find(' ').unwrap_or(line.len())),
        };
        let value = rest.split_whitespace().next().unwrap_or("");
        let name = key.split('{').next().unwrap_or(key);
        let matches = if series.contains('{') {
            key == series
        } else {
            name == series
        };
        if matches {
            if let Ok(v) = value.parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------------------------

/// A raw HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP/1.0 request (the server closes after the body, so no chunking) with an optional
/// body; reads the whole response. Err describes what failed.
pub fn http_fetch(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse, String> {
    let sock: SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let mut req = format!("{method} {target} HTTP/1.0\r\nHost: {addr}\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    stream
        .write_all(req.as_bytes())
        .and_then(|_| stream.write_all(body))
        .map_err(|e| format!("{method} {target}: write: {e}"))?;
    let mut buf = Vec::new();
    stream
        .read_to_end(&mut buf)
        .map_err(|e| format!("{method} {target}: read after {} bytes: {e}", buf.len()))?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{method} {target}: no response head in {} bytes", buf.len()))?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {target}: bad status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        body = dechunk(&body).ok_or_else(|| format!("{method} {target}: bad chunked body"))?;
    } else if method != "HEAD" {
        if let Some(len) = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
        {
            if body.len() != len {
                return Err(format!(
                    "{method} {target}: status {status}, body {} bytes but Content-Length {len}",
                    body.len()
                ));
            }
        }
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

// ---------------------------------------------------------------------------------------------
// CRI
// ---------------------------------------------------------------------------------------------

/// One CRI PullImage of `image` (no sandbox config, no auth) on `socket`; Ok(image_ref).
pub async fn cri_pull_image(socket: &Path, image: &str) -> Result<String, tonic::Status> {
    let mut client = ImageServiceClient::new(super::cri_channel(socket).await);
    Ok(client
        .pull_image(PullImageRequest {
            image: Some(super::image_spec(image)),
            auth: None,
            sandbox_config: None,
        })
        .await?
        .into_inner()
        .image_ref)
}

/// One CRI RemoveImage of `image` (a reference or image id) on `socket`.
pub async fn cri_remove_image(socket: &Path, image: &str) -> Result<(), tonic::Status> {
    let mut client = ImageServiceClient::new(super::cri_channel(socket).await);
    client
        .remove_image(RemoveImageRequest {
            image: Some(super::image_spec(image)),
        })
        .await?;
    Ok(())
}
