//! The CRI proxy: serves CRI v1 `RuntimeService` and `ImageService` (and any other gRPC path)
//! on the CRI socket, forwarding to the real runtime ([`upstream`]) and rewriting stream
//! references to pinned digests in the four calls that carry them ([`proxy`]), keeping private
//! images to the pods that hold their pull secrets ([`private`]), and marking pull errors that
//! are the registry's fault the way the kubelet expects ([`pull_errors`]). Both sides run
//! over [`io::ProxyStream`], unix streams tuned to wake the proxy thread only when there is
//! something to read. Every call is
//! counted, by method and gRPC status, with its duration, in the CRI call metrics
//! ([`proxy::CallBody`], [`crate::metrics`]).
//!
//! [`serve`] runs the HTTP/2 server on a listener until `shutdown` completes, then drains
//! in-flight calls for at most the grace period.

pub mod io;
pub mod policy;
pub mod private;
pub mod proxy;
pub mod pull_errors;
pub mod upstream;

use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;

pub use proxy::CriProxy;
pub use upstream::Upstream;

/// Serves `proxy` on `listener` until `shutdown`, then drains for at most `grace`.
pub async fn serve(
    listener: UnixListener,
    proxy: Arc<CriProxy>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    let serve = |stream, graceful: &hyper_util::server::graceful::GracefulShutdown| {
        let proxy = proxy.clone();
        let svc = hyper::service::service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req).await) }
        });
        let stream = match io::ProxyStream::new(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register a CRI connection");
                return;
            }
        };
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "CRI connection ended");
            }
        });
    };
    crate::accept::serve_until("CRI", listener, serve, shutdown, grace).await;
}
