//! The CRI socket's server: an HTTP/2 relay at the frame level. Each client connection gets its
//! own connection to the runtime, and frames pass between the two as they are, with their
//! stream ids renumbered, so that SETTINGS, flow control, streaming calls and methods newer
//! than our CRI bindings all work end to end. The relay steps in only where it must:
//!
//! - **Requests** of the four methods that may carry a stream reference are held until
//!   complete and handed to [`CriProxy::decide`]: forwarded as received, or answered by the
//!   proxy (answers made here, refusals, the runtime's answer to a rewritten request).
//! - **Header blocks** are decoded (HPACK) and encoded again, so that a held or answered
//!   request, a call the relay makes itself, or a new runtime connection never leaves a peer's
//!   header table out of step: to the runtime as literals (a held request may go on a later
//!   connection, or not at all), to the client with the relay's own table
//!   ([`frame::Encoder`]), in the order the blocks are sent. The runtime's are read for the
//!   gRPC status (call metrics).
//! - **Calls of its own**: the runtime `ImageStatus` behind a stream reference's `PullImage`
//!   goes on the same runtime connection ([`crate::cri::upstream::RelayCall`]).
//! - **Flow control.** Data the proxy consumes or makes up itself is accounted for on both
//!   sides: the relay tracks the real windows of both peers and each peer's view of the
//!   other's, credits what it consumed, and holds back window updates that would give a peer
//!   room the other side does not have.
//! - **PINGs** are answered by the relay on each side.
//! - **The runtime down** or restarting: calls are answered `Unavailable` naming the runtime
//!   endpoint, and the next call connects again, on the same client connection.
//!
//! Why not an HTTP/2 server and client with the requests passed between them: that costs two
//! full protocol stacks and their tasks per call, most of the proxy's added latency (see
//! docs/benchmarks.md, ImageStatus); relaying frames costs about what copying bytes costs.

mod conn;
pub mod frame;
pub mod hpack;
mod huffman_codes;

use super::proxy::CriProxy;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// Serves `proxy` on `listener` until `shutdown`, then drains for at most `grace`: each
/// connection is told to go away (GOAWAY) and closes once its calls have ended.
pub async fn serve(
    listener: UnixListener,
    proxy: Arc<CriProxy>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let drain = CancellationToken::new();
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(conn::run(stream, proxy.clone(), drain.clone()));
                    while conns.try_join_next().is_some() {}
                }
                Err(e) => {
                    tracing::warn!(error = %e, "CRI accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    drain.cancel();
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    match drained {
        Ok(()) => tracing::info!(what = "CRI", "in-flight calls drained"),
        Err(_) => {
            tracing::warn!(
                what = "CRI",
                ?grace,
                "drain timed out; closing remaining calls"
            );
            conns.abort_all();
        }
    }
}
