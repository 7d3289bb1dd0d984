//! Asking one peer for one blob: `GET https://PEER/v1/blobs/<digest>` over mutual TLS
//! ([`super::tls`]), HTTP/2 when the peer offers it.
//!
//! The peer answers `200` with a `Content-Length` (a body without one is refused: the fill
//! must know when it is complete), `404` when it does not hold the blob, `403` when asked to
//! fill from a registry it may not reach. A request may ask the peer to fill the blob from a
//! registry itself ([`FILL_HOST_HEADER`], [`FILL_REPOSITORY_HEADER`]); only the blob's primary
//! home is asked that (see [`super::plan_for`]), and it fills from the registry only, never from
//! another peer, so requests cannot loop. No credential ever goes to a peer: the primary fills
//! with its own.
//!
//! The headers must arrive within the first-byte deadline; after that each chunk within the
//! idle timeout (the caller reads the body and enforces it). What comes back is not trusted:
//! the cache hashes it and stores it only if it matches the digest.

use super::tls::{self, TlsFiles};
use super::Member;
use crate::registry::Digest;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;
use std::time::Duration;
use thiserror::Error;

/// Path prefix of the peer endpoint's one route.
pub const BLOB_PATH: &str = "/v1/blobs/";
/// Request header: fill the blob from this registry (`HOST[:PORT]`) if not held.
pub const FILL_HOST_HEADER: &str = "imagestream-fill-host";
/// Request header: ... from this repository of it.
pub const FILL_REPOSITORY_HEADER: &str = "imagestream-fill-repository";
/// How long a connection to a peer may take to set up (TCP and TLS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Idle connections to peers kept per peer.
const POOL_IDLE_PER_HOST: usize = 4;

#[derive(Debug, Error)]
pub enum PeerFetchError {
    #[error("peer {peer} does not hold {digest}")]
    NotFound { peer: String, digest: Digest },
    #[error("peer {peer} sent no response within {timeout:?}")]
    Slow { peer: String, timeout: Duration },
    #[error("peer {peer} ({addr}) cannot be reached: {message}")]
    Unreachable {
        peer: String,
        addr: String,
        message: String,
    },
    #[error("peer {peer} refused {digest}: HTTP {status}")]
    Refused {
        peer: String,
        digest: Digest,
        status: u16,
    },
    #[error("peer {peer} answered {digest} without a Content-Length")]
    NoLength { peer: String, digest: Digest },
    #[error("peer TLS setup: {0}")]
    Tls(String),
}

impl PeerFetchError {
    /// The `outcome` label of `imagestream_peer_fetches_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            PeerFetchError::NotFound { .. } => "not_found",
            PeerFetchError::Slow { .. } => "slow",
            PeerFetchError::Unreachable { .. } => "unreachable",
            PeerFetchError::Refused { .. } | PeerFetchError::NoLength { .. } => "refused",
            PeerFetchError::Tls(_) => "refused",
        }
    }
}

/// A blob body on its way from a peer.
pub struct PeerBody {
    pub peer: String,
    pub size: u64,
    pub stream: BoxStream<'static, Result<Bytes, String>>,
}

/// The HTTPS client to peers (one connection pool for all of them).
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    first_byte_timeout: Duration,
}

impl PeerClient {
    /// A client presenting this node's certificate and trusting only the cluster CA.
    pub fn new(files: &TlsFiles, first_byte_timeout: Duration) -> Result<Self, PeerFetchError> {
        let tls = tls::client_config(files).map_err(|e| PeerFetchError::Tls(e.to_string()))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
            .user_agent(concat!("imagestream-peer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| PeerFetchError::Tls(crate::audit::error_chain(&e)))?;
        Ok(Self {
            http,
            first_byte_timeout,
        })
    }

    /// The URL of `digest` at `peer`.
    pub fn url(peer: &Member, digest: &Digest) -> String {
        format!("https://{}{BLOB_PATH}{digest}", peer.addr)
    }

    /// Opens `digest` at `peer`; with `fill = Some((host, repository))` the peer fills it from
    /// that registry if it does not hold it. Returns once the headers arrived.
    pub async fn open(
        &self,
        peer: &Member,
        digest: &Digest,
        fill: Option<(&str, &str)>,
    ) -> Result<PeerBody, PeerFetchError> {
        let mut req = self.http.get(Self::url(peer, digest));
        if let Some((host, repository)) = fill {
            req = req
                .header(FILL_HOST_HEADER, host)
                .header(FILL_REPOSITORY_HEADER, repository);
        }
        let resp = match tokio::time::timeout(self.first_byte_timeout, req.send()).await {
            Err(_) => {
                return Err(PeerFetchError::Slow {
                    peer: peer.name.clone(),
                    timeout: self.first_byte_timeout,
                })
            }
            Ok(Err(e)) => {
                return Err(PeerFetchError::Unreachable {
                    peer: peer.name.clone(),
                    addr: peer.addr.clone(),
                    message: crate::audit::error_chain(&e),
                })
            }
            Ok(Ok(r)) => r,
        };
        match resp.status().as_u16() {
            200 => {}
            404 => {
                return Err(PeerFetchError::NotFound {
                    peer: peer.name.clone(),
                    digest: digest.clone(),
                })
            }
            status => {
                return Err(PeerFetchError::Refused {
                    peer: peer.name.clone(),
                    digest: digest.clone(),
                    status,
                })
            }
        }
        let Some(size) = resp.content_length() else {
            return Err(PeerFetchError::NoLength {
                peer: peer.name.clone(),
                digest: digest.clone(),
            });
        };
        let stream = resp
            .bytes_stream()
            .map(|r| r.map_err(|e| crate::audit::error_chain(&e)))
            .boxed();
        Ok(PeerBody {
            peer: peer.name.clone(),
            size,
            stream,
        })
    }
}
