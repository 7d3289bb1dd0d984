//! Peers: the node caches of a cluster as one cache (issue 20). Work in progress.
pub mod tls;
