//! The accept-and-drain loop shared by the CRI proxy (unix socket, HTTP/2) and the registry
//! mirror (TCP, HTTP/1.1 and h2c): accept until `shutdown`, then stop listening and give
//! in-flight connections at most the grace period.

use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::time::Duration;

/// A listener whose connections are served one task each.
pub trait Listener: Send {
    type Stream: Send + 'static;
    fn accept_stream(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> std::io::Result<Self::Stream> {
        let (s, _) = self.accept().await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

/// Accepts on `listener` and hands each connection to `serve` (which registers it with the
/// graceful-shutdown watcher and spawns it) until `shutdown`; then closes the listener and
/// waits for the connections to finish, at most `grace`.
pub async fn serve_until<L: Listener>(
    what: &'static str,
    listener: L,
    mut serve: impl FnMut(L::Stream, &GracefulShutdown),
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept_stream() => match accepted {
                Ok(stream) => serve(stream, &graceful),
                Err(e) => {
                    tracing::warn!(error = %e, what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!(what, "in-flight calls drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!(what, ?grace, "drain timed out; closing remaining calls"),
    }
}
