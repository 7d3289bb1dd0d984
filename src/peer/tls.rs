//! Mutual TLS between nodes (in progress).
