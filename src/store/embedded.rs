//! The embedded store: one redb database file (`streams.redb` in the state dir). redb commits
//! are crash-safe (copy-on-write B-tree with a checksummed commit slot), so a crash at any
//! moment leaves the old or the new state, never a torn one. Records are JSON.
//!
//! redb's calls block on disk I/O, so every [`StreamStore`] method runs its transaction on
//! tokio's blocking pool (`spawn_blocking`) and only awaits the result there.

use super::{Expect, StoreError, StreamStore, Written};
use crate::stream::model::{Stream, StreamKey};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File name of the database inside the state dir.
pub const DB_FILE: &str = "streams.redb";

const STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("streams");

pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

/// The database and its path, shared with the blocking tasks that run the transactions.
struct Inner {
    db: Database,
    path: PathBuf,
}

fn key_string(key: &StreamKey) -> String {
    format!("{}/{}", key.namespace, key.name)
}

impl EmbeddedStore {
    /// Opens (or creates) the database at `state_dir/streams.redb`. Blocks on disk I/O.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let path = state_dir.join(DB_FILE);
        let db = Database::create(&path).map_err(|e| StoreError::Backend {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let inner = Inner { db, path };
        // Create the table so that readers find it.
        let txn = inner.db.begin_write().map_err(|e| inner.backend(e))?;
        txn.open_table(STREAMS).map_err(|e| inner.backend(e))?;
        txn.commit().map_err(|e| inner.backend(e))?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Runs `f` on the database from tokio's blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || f(&inner)).await {
            Ok(r) => r,
            Err(e) => Err(self.inner.backend(format!("store task failed: {e}"))),
        }
    }
}

impl Inner {
    fn backend(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<Stream, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            key: key.to_string(),
            message: e.to_string(),
        })
    }

    fn list(&self) -> Result<Vec<Stream>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.backend(e))?;
        let table = txn.open_table(STREAMS).map_err(|e| self.backend(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.backend(e))? {
            let (k, v) = entry.map_err(|e| self.backend(e))?;
            out.push(Self::decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    fn get(&self, key: &StreamKey) -> Result<Option<Stream>, StoreError> {
        let k = key_string(key);
        let txn = self.db.begin_read().map_err(|e| self.backend(e))?;
        let table = txn.open_table(STREAMS).map_err(|e| self.backend(e))?;
        let value = table.get(k.as_str()).map_err(|e| self.backend(e))?;
        value.map(|v| Self::decode(&k, v.value())).transpose()
    }

    fn put(&self, stream: &Stream, expect: Expect) -> Result<Written, StoreError> {
        let key = stream.key();
        let k = key_string(&key);
        let bytes = serde_json::to_vec(stream).map_err(|e| self.backend(e))?;
        let txn = self.db.begin_write().map_err(|e| self.backend(e))?;
        {
            let mut table = txn.open_table(STREAMS).map_err(|e| self.backend(e))?;
            let existing = table
                .get(k.as_str())
                .map_err(|e| self.backend(e))?
                .map(|v| Self::decode(&k, v.value()))
                .transpose()?;
            match (expect, existing) {
                (Expect::Absent, Some(_)) => return Err(StoreError::AlreadyExists(key)),
                (Expect::Revision(r), Some(s)) if s.revision != r => {
                    return Err(StoreError::Conflict(key))
                }
                (Expect::Revision(_), None) => return Err(StoreError::Conflict(key)),
                _ => {}
            }
            table
                .insert(k.as_str(), bytes.as_slice())
                .map_err(|e| self.backend(e))?;
        }
        txn.commit().map_err(|e| self.backend(e))?;
        Ok(Written::default())
    }

    fn delete(&self, key: &StreamKey) -> Result<Option<Written>, StoreError> {
        let k = key_string(key);
        let txn = self.db.begin_write().map_err(|e| self.backend(e))?;
        let existed = {
            let mut table = txn.open_table(STREAMS).map_err(|e| self.backend(e))?;
            let removed = table.remove(k.as_str()).map_err(|e| self.backend(e))?;
            removed.is_some()
        };
        txn.commit().map_err(|e| self.backend(e))?;
        Ok(existed.then(Written::default))
    }
}

#[async_trait::async_trait]
impl StreamStore for EmbeddedStore {
    async fn list(&self) -> Result<Vec<Stream>, StoreError> {
        self.run(|db| db.list()).await
    }

    async fn get(&self, key: &StreamKey) -> Result<Option<Stream>, StoreError> {
        let key = key.clone();
        self.run(move |db| db.get(&key)).await
    }

    async fn put(&self, stream: &Stream, expect: Expect) -> Result<Written, StoreError> {
        let stream = stream.clone();
        self.run(move |db| db.put(&stream, expect)).await
    }

    async fn delete(&self, key: &StreamKey) -> Result<Option<Written>, StoreError> {
        let key = key.clone();
        self.run(move |db| db.delete(&key)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn roundtrip_and_cas() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let key = StreamKey::new("ns", "app");
        let mut s = Stream::new(&key, true);
        store.put(&s, Expect::Absent).await.expect("create");
        assert!(matches!(
            store.put(&s, Expect::Absent).await,
            Err(StoreError::AlreadyExists(_))
        ));
        s.revision = 1;
        store.put(&s, Expect::Revision(0)).await.expect("update");
        assert!(matches!(
            store.put(&s, Expect::Revision(0)).await,
            Err(StoreError::Conflict(_))
        ));
        drop(store);
        let store = EmbeddedStore::open(dir.path()).expect("reopen");
        assert_eq!(store.get(&key).await.expect("get"), Some(s));
        assert_eq!(store.list().await.expect("list").len(), 1);
        assert!(store.delete(&key).await.expect("delete").is_some());
        assert!(store.delete(&key).await.expect("delete again").is_none());
    }
}
