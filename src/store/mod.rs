//! Stream stores: where streams are persisted. The store is a narrow, async key-value
//! interface over whole [`Stream`] records with compare-and-swap on the record's revision, so
//! that an embedded database (the default, [`embedded::EmbeddedStore`] on redb) and a
//! cluster-wide one ([`etcd::EtcdStore`]) slot in behind the same [`StreamStore`] trait. The CRI
//! path never touches a store: it reads the in-memory view that the stream service keeps, which
//! a cluster store also feeds from its watch ([`etcd::feed`]).
//!
//! Every method is async and safe to await on the runtime: the etcd store calls its async
//! client directly, and the embedded store runs redb's blocking disk I/O on tokio's blocking
//! pool itself, so callers never wrap store calls in `spawn_blocking`.

pub mod embedded;
pub mod etcd;

use crate::stream::model::{Stream, StreamKey};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    /// The record changed since it was read (compare-and-swap lost); read again and retry.
    #[error("stream {0} was changed concurrently")]
    Conflict(StreamKey),
    #[error("stream {0} already exists")]
    AlreadyExists(StreamKey),
    #[error("stream store at {path}: {message}")]
    Backend { path: String, message: String },
    #[error("stream store record {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    /// The cluster store cannot be reached; the view keeps answering from what it last saw.
    #[error("cluster store unavailable (etcd endpoints {endpoints}): {message}")]
    Unavailable { endpoints: String, message: String },
}

/// Where a write landed in the store's change order: the store revision of the write, for
/// stores whose changes also reach the view through a watch (so that the view can tell a late
/// watch event from a newer local write); `None` for the embedded store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Written {
    pub revision: Option<u64>,
}

/// What a write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No record under the key (create).
    Absent,
    /// A record with this revision (update).
    Revision(u64),
}

/// A persistent map of streams. Writes are atomic and durable when they return `Ok`.
///
/// Async through [`async_trait`] so that it stays object safe (`Arc<dyn StreamStore>`).
#[async_trait::async_trait]
pub trait StreamStore: Send + Sync + 'static {
    /// Every stream, for building the view at start.
    async fn list(&self) -> Result<Vec<Stream>, StoreError>;
    async fn get(&self, key: &StreamKey) -> Result<Option<Stream>, StoreError>;
    /// Writes `stream` if the stored record matches `expect`; the stored revision becomes
    /// `stream.revision`, which the caller has already incremented.
    async fn put(&self, stream: &Stream, expect: Expect) -> Result<Written, StoreError>;
    /// Removes the record; `Ok(None)` if there was none.
    async fn delete(&self, key: &StreamKey) -> Result<Option<Written>, StoreError>;
}
