//! The kubelet's convention for pull failures that are the registry's fault: a `PullImage`
//! error with gRPC code `Unknown` whose message starts with `RegistryUnavailable` is reported
//! as `RegistryUnavailable` (and backed off as such) rather than as a generic `ErrImagePull`.
//! containerd does not follow it: its messages say "connection refused" or "503 Service
//! Unavailable" deep inside. [`mark`] prefixes such a message, in the header block of a
//! trailers-only answer or in the trailers, and changes nothing else of the runtime's answer.
//! imagestream's own registry errors already start with the prefix
//! ([`crate::registry::REGISTRY_UNAVAILABLE`]).

use crate::registry::REGISTRY_UNAVAILABLE;
use bytes::Bytes;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::body::Body;

/// Phrases in a runtime's pull error that mean the registry could not be reached or failed
/// (network errors, timeouts, 5xx and 429 answers), as containerd and Go's net/http word them.
const UNAVAILABLE_PHRASES: &[&str] = &[
    "connection refused",
    "connection reset by peer",
    "i/o timeout",
    "no such host",
    "network is unreachable",
    "no route to host",
    "TLS handshake timeout",
    "context deadline exceeded",
    "500 Internal Server Error",
    "502 Bad Gateway",
    "503 Service Unavailable",
    "504 Gateway Timeout",
    "429 Too Many Requests",
];

const GRPC_STATUS: &str = "grpc-status";
const GRPC_MESSAGE: &str = "grpc-message";
/// gRPC code `Unknown`.
const UNKNOWN: &str = "2";

/// Prefixes a registry-unavailable `PullImage` error in `resp` (see the module docs).
pub fn mark(resp: http::Response<Body>) -> http::Response<Body> {
    let (mut parts, body) = resp.into_parts();
    if parts.headers.contains_key(GRPC_STATUS) {
        // Trailers-only: the status is in the header block.
        rewrite(&mut parts.headers);
        return http::Response::from_parts(parts, body);
    }
    http::Response::from_parts(parts, Body::new(MarkTrailers { inner: body }))
}

/// Prefixes the message in `headers` if it is an `Unknown` status naming a registry failure.
fn rewrite(headers: &mut http::HeaderMap) {
    if headers.get(GRPC_STATUS).and_then(|v| v.to_str().ok()) != Some(UNKNOWN) {
        return;
    }
    let Some(message) = headers.get(GRPC_MESSAGE).and_then(|v| v.to_str().ok()) else {
        return;
    };
    // grpc-message is percent-encoded; the phrases have no characters it would encode.
    if message.starts_with(REGISTRY_UNAVAILABLE)
        || !UNAVAILABLE_PHRASES.iter().any(|p| message.contains(p))
    {
        return;
    }
    if let Ok(v) = http::HeaderValue::from_str(&format!("{REGISTRY_UNAVAILABLE}: {message}")) {
        headers.insert(GRPC_MESSAGE, v);
    }
}

struct MarkTrailers {
    inner: Body,
}

impl http_body::Body for MarkTrailers {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(trailers) = frame.trailers_mut() {
                    rewrite(trailers);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(status: &str, message: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(GRPC_STATUS, status.parse().expect("status"));
        h.insert(GRPC_MESSAGE, message.parse().expect("message"));
        h
    }

    #[test]
    fn only_unknown_registry_failures_are_prefixed() {
        let refused = "failed to pull and unpack image \"127.0.0.1:1/a:v1\": failed to resolve reference: failed to do request: Head \"http://127.0.0.1:1/v2/a/manifests/v1\": dial tcp 127.0.0.1:1: connect: connection refused";
        let mut h = headers("2", refused);
        rewrite(&mut h);
        assert_eq!(
            h.get(GRPC_MESSAGE).and_then(|v| v.to_str().ok()),
            Some(format!("RegistryUnavailable: {refused}").as_str())
        );
        // Once only.
        rewrite(&mut h);
        assert!(!h[GRPC_MESSAGE]
            .to_str()
            .expect("ascii")
            .starts_with("RegistryUnavailable: RegistryUnavailable"));
        // Not found is the image's fault, not the registry's.
        let mut h = headers("2", "failed to resolve reference: not found");
        rewrite(&mut h);
        assert!(!h[GRPC_MESSAGE]
            .to_str()
            .expect("ascii")
            .starts_with("RegistryUnavailable"));
        // Other codes are left alone.
        let mut h = headers("14", "connection refused");
        rewrite(&mut h);
        assert_eq!(h[GRPC_MESSAGE], "connection refused");
    }
}
