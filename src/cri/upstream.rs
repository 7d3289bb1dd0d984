//! The connection to the real runtime (containerd, CRI-O): one lazily connected HTTP/2 channel
//! over its unix socket, reconnected on demand. A call that cannot reach the runtime is answered
//! with gRPC `Unavailable` naming the runtime endpoint, as a normal gRPC response, so that raw
//! forwarding and typed calls fail the same way.

use crate::config::{runtime_socket_path, RUNTIME_CONNECT_TIMEOUT};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::Service;

/// A cloneable handle on the runtime, usable as a tonic client transport.
#[derive(Clone)]
pub struct Upstream {
    channel: Channel,
    endpoint: Arc<str>,
    /// An error from `poll_ready`, reported by the next `call`.
    not_ready: Option<Arc<str>>,
}

impl Upstream {
    /// A channel to `endpoint` (`unix:///path`); nothing is connected until the first call.
    pub fn new(endpoint: &str) -> Result<Self, String> {
        let path = runtime_socket_path(endpoint)?;
        let channel = Endpoint::from_static("http://runtime.invalid")
            .connect_timeout(RUNTIME_CONNECT_TIMEOUT)
            .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(&path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }));
        Ok(Self {
            channel,
            endpoint: endpoint.into(),
            not_ready: None,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn unavailable(endpoint: &str, detail: &str) -> http::Response<Body> {
        tonic::Status::unavailable(format!(
            "runtime endpoint {endpoint} is unavailable: {detail}"
        ))
        .into_http()
    }
}

impl Service<http::Request<Body>> for Upstream {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.channel.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => {
                self.not_ready = None;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                self.not_ready = Some(crate::audit::error_chain(&e).into());
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let endpoint = self.endpoint.clone();
        if let Some(detail) = self.not_ready.take() {
            return Box::pin(async move { Ok(Self::unavailable(&endpoint, &detail)) });
        }
        let fut = self.channel.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => Ok(resp),
                Err(e) => Ok(Self::unavailable(&endpoint, &crate::audit::error_chain(&e))),
            }
        })
    }
}
