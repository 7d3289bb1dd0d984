//! The CRI proxy: serves CRI v1 `RuntimeService` and `ImageService` (and any other gRPC path)
//! on the CRI socket, relaying to the real runtime ([`relay`]) and rewriting stream
//! references to pinned digests in the four calls that carry them ([`proxy`]), keeping private
//! images to the pods that hold their pull secrets ([`private`]), and marking pull errors that
//! are the registry's fault the way the kubelet expects ([`pull_errors`]). Both sides run
//! over [`io::ProxyStream`], unix streams tuned to wake the proxy thread only when there is
//! something to read. The proxy's own runtime calls (pulls, rewritten requests) go through
//! [`upstream`]. Every call is counted, by method and gRPC status, with its duration, in the
//! CRI call metrics (`proxy::Call`, [`crate::metrics`]).
//!
//! [`serve`] runs the CRI socket's server, a frame-level HTTP/2 relay ([`relay`]), until
//! `shutdown` completes, then drains in-flight calls for at most the grace period.

pub mod io;
pub mod policy;
pub mod private;
pub mod proxy;
pub mod pull_errors;
pub mod relay;
pub mod upstream;

pub use proxy::CriProxy;
pub use relay::serve;
pub use upstream::Upstream;
