//! The CRI proxy: serves CRI v1 `RuntimeService` and `ImageService` (and any other gRPC path)
//! on the CRI socket and forwards to the real runtime, rewriting stream references to pinned
//! digests in the four calls that carry them.
//!
//! # Layout
//! - [`transport`]: the HTTP/2 server on the CRI socket (hyper on `h2`), routing by `:path`,
//!   forwarding, limits, drain, and the CRI call metrics. [`serve`] runs it.
//! - [`proxy`]: the decider, free of transport types: a method and its request message in,
//!   a [`proxy::Decision`] out.
//! - [`runtime`]: the one connection to the runtime, shared by forwarded calls, the decider's
//!   own calls and the pre-pull trigger.
//! - [`private`]: keeps private images to the pods that hold their pull secrets.
//! - [`policy`]: which registries pods may pull from.
//! - [`pull_errors`]: marks pull errors that are the registry's fault the way the kubelet
//!   expects.
//!
//! Data flows one way: `transport` → `proxy` → `runtime`.

pub mod policy;
pub mod private;
pub mod proxy;
pub mod pull_errors;
pub mod runtime;
pub mod transport;

pub use proxy::CriProxy;
pub use runtime::Runtime;
pub use transport::{serve, CriService};
