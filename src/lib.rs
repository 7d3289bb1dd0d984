//! imagestream: a CRI image-service proxy that gives every Kubernetes node *image streams*:
//! named streams whose tags point at pinned, verified image digests, with history and rollback.
//!
//! # Layout
//!
//! Data flows one way: the CLI talks to the admin API, which calls the stream service, which
//! pins through the registry client and writes the store, then swaps the in-memory view; the
//! CRI proxy reads only that view. containerd pulls through the mirror, which asks the cache,
//! which asks the peers and the registry client on a miss; the cache reads the view for pins
//! and prefetch. Other nodes read this node's cache through the peer endpoint (in the mirror).
//!
//! - [`config`]: embedded defaults (documented constants), the TOML file, flag overrides.
//! - [`stream`]: the model (streams, tags, generations), name and reference grammar,
//!   resolution ([`stream::resolve`]) and the service that changes streams.
//! - [`store`]: persistence behind the narrow [`store::StreamStore`] trait: redb by default, or
//!   etcd for a whole cluster (its watch feeds the view; it elects the node that imports).
//! - [`registry`]: pins a source reference to a verified manifest digest and fetches manifests
//!   and blob streams (reqwest with capped reads and deadlines; oci-client for the token
//!   handshake); digests and registry credentials.
//! - [`cache`]: the node's layer cache: the verified content store, pull-through fills shared
//!   by concurrent clients, pins, LRU eviction, scrub and prefetch.
//! - [`mirror`]: the registry mirror (OCI distribution pull API over HTTP, `/metrics`), the
//!   peer endpoint (blobs by digest over mutual TLS), containerd's `hosts.toml` and CRI-O's
//!   drop-in.
//! - [`peer`]: the node caches of a cluster as one: discovery (etcd or a static list),
//!   rendezvous placement, the peer client, the cluster CA and node certificates.
//! - [`cri`]: the CRI proxy: the HTTP/2 transport (hyper), the decider for the four calls
//!   that may carry a stream reference (stream access, the node's pull policy, private
//!   images), and the one connection to the runtime.
//! - [`admin`]: the admin gRPC API (`proto/imagestream/v1/admin.proto`), caller checks
//!   (SO_PEERCRED) and its client.
//! - [`socket`]: creating root-only unix sockets, replacing stale ones; [`accept`]: the
//!   accept-and-drain loop of the CRI proxy and the mirror.
//! - [`audit`]: capped error messages and audit records; [`metrics`]: Prometheus metrics.
//! - [`signature`]: cosign signature verification (trusted keys, simple-signing payloads); the
//!   core of the signature policy, not yet used by pinning.
//! - [`server`]: [`server::run`] wires everything together until a shutdown future completes.
//! - [`cli`]: the `imagestream` command line.
#![forbid(unsafe_code)]

pub mod accept;
pub mod admin;
pub mod audit;
pub mod cache;
pub mod cli;
pub mod config;
pub mod cri;
pub mod importer;
pub mod metrics;
pub mod mirror;
pub mod peer;
pub mod registry;
pub mod server;
pub mod signature;
pub mod socket;
pub mod store;
pub mod stream;
pub mod triggers;
