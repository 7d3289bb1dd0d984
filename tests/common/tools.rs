//! Conformance and client tools for the integration tests, and the plumbing to point them at a
//! CRI unix socket.
//!
//! - [`tool`]: a binary built by `bash scripts/test-tools.sh` (crictl, critest, h2spec, cosign)
//!   from the cache dir named by `IMAGESTREAM_TEST_TOOLS` (default
//!   `/var/cache/imagestream-test/bin`); panics with the command to run when it is missing.
//! - [`TcpBridge`]: `socat` listening on a free 127.0.0.1 port and forwarding every connection to
//!   a unix socket (h2spec and nghttp speak TCP only); killed, with its forked children, on drop.
//! - gRPC framing over raw HTTP/2 bodies: [`grpc_frame`] (the 5-byte length prefix) and
//!   [`grpc_messages`] (split a response body back into messages).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Default cache dir of `scripts/test-tools.sh`.
pub const DEFAULT_TOOLS_DIR: &str = "/var/cache/imagestream-test/bin";

/// The dir the test tools live in: `IMAGESTREAM_TEST_TOOLS`, else [`DEFAULT_TOOLS_DIR`].
pub fn tools_dir() -> PathBuf {
    std::env::var_os("IMAGESTREAM_TEST_TOOLS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TOOLS_DIR))
}

/// The path of test tool `name` (`crictl`, `critest`, `h2spec`, `cosign`) in [`tools_dir`];
/// panics, naming `bash scripts/test-tools.sh`, unless it is an executable file there.
pub fn tool(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = tools_dir();
    let path = dir.join(name);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => path,
        _ => panic!(
            "test tool {name} not found at {} (IMAGESTREAM_TEST_TOOLS={}): \
             run `bash scripts/test-tools.sh` first (it builds the test tools into \
             that dir; set IMAGESTREAM_TEST_TOOLS to use another one)",
            path.display(),
            dir.display()
        ),
    }
}

/// `socat TCP-LISTEN:PORT,bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:SOCK` on a free port.
///
/// socat runs in a process group of its own; on drop the whole group (the listener and the
/// children it forked for open connections) is killed by that id and reaped.
pub struct TcpBridge {
    /// The loopback port socat listens on.
    pub port: u16,
    /// The unix socket every connection is forwarded to.
    pub target: PathBuf,
    child: Child,
}

impl TcpBridge {
    /// Starts socat in front of `unix_socket` and waits until its port accepts connections.
    /// (A connection made to check readiness is forwarded, and closed at once, like any other.)
    pub fn start(unix_socket: &Path) -> TcpBridge {
        let socat = super::require_binary("socat", "socat");
        // A free port may be taken between finding and binding it: try a few.
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = super::free_port();
            let mut child = {
                use std::os::unix::process::CommandExt;
                Command::new(&socat)
                    .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
                    .arg(format!("UNIX-CONNECT:{}", unix_socket.display()))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .process_group(0)
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start {}: {e}", socat.display()))
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut err);
                    }
                    last_err = format!("socat on port {port} exited ({status}): {err}");
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return TcpBridge {
                        port,
                        target: unix_socket.to_path_buf(),
                        child,
                    };
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("socat did not listen on 127.0.0.1:{port} within 10 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!(
            "could not start a socat bridge to {}: {last_err}",
            unix_socket.display()
        );
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for TcpBridge {
    fn drop(&mut self) {
        // The child is the group leader (process_group(0)), so its pid is the group id.
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length, `msg`.
pub fn grpc_frame(msg: &[u8]) -> Vec<u8> {
    let len = u32::try_from(msg.len()).expect("gRPC message longer than 4 GiB");
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// Splits a gRPC body into its messages; an error names what is malformed (a compressed
/// message, or a truncated prefix or message).
pub fn grpc_messages(mut body: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < 5 {
            return Err(format!(
                "truncated gRPC prefix: {} byte(s) left",
                body.len()
            ));
        }
        if body[0] != 0 {
            return Err(format!("compressed-flag {} (expected 0)", body[0]));
        }
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        if body.len() < 5 + len {
            return Err(format!(
                "truncated gRPC message: prefix says {len} bytes, {} present",
                body.len() - 5
            ));
        }
        out.push(body[5..5 + len].to_vec());
        body = &body[5 + len..];
    }
    Ok(out)
}
