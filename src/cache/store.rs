//! The content-addressed store on disk: complete, verified blobs (and manifests) at
//! `blobs/sha256/<hex>`, temporaries under `ingest/`. An [`Ingest`] hashes while it writes,
//! and [`Ingest::commit`] fsyncs, checks size and digest, renames into place and fsyncs the
//! directory; anything else (an error, a dropped ingest, a crash) leaves nothing under `blobs/`,
//! and [`ContentStore::open`] removes stale temporaries. A full disk is
//! [`CacheError::NoSpace`]; an ingest of known size reserves its space first
//! ([`Ingest::reserve`]), so a blob that cannot fit fails before any byte is written. An in-memory index keeps each blob's
//! size and last use for eviction; the last use is also written to the file's mtime (at most
//! once a minute per blob) so it survives restarts.

use super::CacheError;
use crate::registry::Digest;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Mode of the blob and ingest directories.
pub const DIR_MODE: u32 = 0o700;
/// How stale a recorded last use may get before the file's mtime is updated.
pub const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// What the index knows about a stored blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub size: u64,
    pub last_used: SystemTime,
    /// The file as it was when its bytes last hashed to its name (at commit, on a serve or by
    /// the scrub). While the file still looks like that, a read need not hash it again.
    verified: Option<Stamp>,
}

/// What identifies a file's contents as unchanged: inode, length and mtime. A write to the
/// file (a flipped byte included) changes its mtime; silent bit rot does not, and is the
/// scrub's to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime: SystemTime,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        Some(Self {
            ino: meta.ino(),
            len: meta.len(),
            mtime: meta.modified().ok()?,
        })
    }
}

#[derive(Default)]
struct Index {
    entries: HashMap<Digest, Entry>,
    total: u64,
}

pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
    index: Mutex<Index>,
    next_ingest: AtomicU64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| {
        let path = path.display().to_string();
        if is_no_space(&source) {
            CacheError::NoSpace { path, source }
        } else {
            CacheError::Io { path, source }
        }
    }
}

/// ENOSPC or EDQUOT.
fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

fn make_dir(path: &Path) -> Result<(), CacheError> {
    std::fs::create_dir_all(path)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE)))
        .map_err(io_err(path))
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

impl ContentStore {
    /// Opens (creating) the store under `state_dir`, removes stale temporaries and indexes the
    /// blobs present. Files under `blobs/sha256` whose names are not digests are left alone and
    /// never served.
    pub fn open(state_dir: &Path) -> Result<Self, CacheError> {
        let blobs = state_dir.join("blobs").join("sha256");
        let ingest = state_dir.join("ingest");
        make_dir(&blobs)?;
        make_dir(&ingest)?;
        let mut stale = 0usize;
        for entry in std::fs::read_dir(&ingest).map_err(io_err(&ingest))? {
            let entry = entry.map_err(io_err(&ingest))?;
            let path = entry.path();
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            stale += 1;
        }
        if stale > 0 {
            tracing::info!(stale, "removed stale ingest temporaries");
            sync_dir(&ingest).map_err(io_err(&ingest))?;
        }
        let mut index = Index::default();
        for entry in std::fs::read_dir(&blobs).map_err(io_err(&blobs))? {
            let entry = entry.map_err(io_err(&blobs))?;
            let name = entry.file_name();
            let Some(digest) = name
                .to_str()
                .and_then(|n| Digest::parse(&format!("sha256:{n}")).ok())
            else {
                tracing::warn!(file = ?entry.path(), "ignoring a file that is not named by its digest");
                continue;
            };
            let meta = entry.metadata().map_err(io_err(&entry.path()))?;
            if !meta.is_file() {
                continue;
            }
            index.total += meta.len();
            index.entries.insert(
                digest,
                Entry {
                    size: meta.len(),
                    last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    // Not hashed by this process yet: the first read hashes it.
                    verified: None,
                },
            );
        }
        Ok(Self {
            blobs,
            ingest,
            index: Mutex::new(index),
            next_ingest: AtomicU64::new(0),
        })
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where `digest` lives once committed.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    pub fn get(&self, digest: &Digest) -> Option<Entry> {
        self.index().entries.get(digest).cloned()
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.index().entries.contains_key(digest)
    }

    /// Bytes stored.
    pub fn total(&self) -> u64 {
        self.index().total
    }

    /// Every stored blob.
    pub fn entries(&self) -> Vec<(Digest, Entry)> {
        self.index()
            .entries
            .iter()
            .map(|(d, e)| (d.clone(), e.clone()))
            .collect()
    }

    /// Opens a stored blob for reading and records the use. `None` when it is not stored.
    /// The flag says whether the file is unchanged since its bytes last hashed to its name
    /// (then a reader need not hash it again; see [`ContentStore::mark_verified`]).
    pub fn open_read(&self, digest: &Digest) -> Result<Option<(File, u64, bool)>, CacheError> {
        let now = SystemTime::now();
        let (previous, stamp) = {
            let mut index = self.index();
            match index.entries.get_mut(digest) {
                Some(e) => (std::mem::replace(&mut e.last_used, now), e.verified),
                None => return Ok(None),
            }
        };
        let path = self.path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(digest);
                return Ok(None);
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let meta = file.metadata().map_err(io_err(&path))?;
        let size = meta.len();
        let trusted = stamp.is_some() && stamp == Stamp::of(&meta);
        if now
            .duration_since(previous)
            .map(|d| d >= TOUCH_EVERY)
            .unwrap_or(true)
        {
            // Best effort: the in-memory index is authoritative while the daemon runs.
            if file.set_modified(now).is_ok() && trusted {
                // Our own touch does not make the bytes suspect.
                self.set_stamp(digest, file.metadata().ok().and_then(|m| Stamp::of(&m)));
            }
        }
        Ok(Some((file, size, trusted)))
    }

    /// Records that `file`, the stored blob `digest`, just hashed to its name.
    pub fn mark_verified(&self, digest: &Digest, file: &File) {
        self.set_stamp(digest, file.metadata().ok().and_then(|m| Stamp::of(&m)));
    }

    fn set_stamp(&self, digest: &Digest, stamp: Option<Stamp>) {
        if let Some(e) = self.index().entries.get_mut(digest) {
            e.verified = stamp;
        }
    }

    fn forget(&self, digest: &Digest) -> Option<Entry> {
        let mut index = self.index();
        let removed = index.entries.remove(digest);
        if let Some(e) = &removed {
            index.total -= e.size;
        }
        removed
    }

    /// Removes a stored blob; readers that have it open keep reading it. Returns its size.
    pub fn remove(&self, digest: &Digest) -> Result<Option<u64>, CacheError> {
        let removed = self.forget(digest);
        let path = self.path(digest);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        Ok(removed.map(|e| e.size))
    }

    /// Removes a stored blob only if the file under its name is still `file` (same inode): a
    /// reader that found `file` corrupt must not remove a good copy fetched since.
    pub fn remove_if_same(&self, digest: &Digest, file: &File) -> Result<Option<u64>, CacheError> {
        use std::os::unix::fs::MetadataExt as _;
        let path = self.path(digest);
        let ours = file.metadata().map_err(io_err(&path))?;
        match std::fs::metadata(&path) {
            Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => self.remove(digest),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(self.forget(digest).map(|e| e.size))
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Starts writing `digest` into a fresh temporary.
    pub fn begin(&self, digest: &Digest) -> Result<Ingest, CacheError> {
        let n = self.next_ingest.fetch_add(1, Ordering::Relaxed);
        let path = self
            .ingest
            .join(format!("{}.{}.{n}", digest.hex(), std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(Ingest {
            file: Arc::new(file),
            path,
            hasher: Sha256::new(),
            written: 0,
            digest: digest.clone(),
            done: false,
        })
    }

    /// Writes small content (a manifest) in one go, verified like any ingest.
    pub fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<(), CacheError> {
        if self.contains(digest) {
            return Ok(());
        }
        let mut ingest = self.begin(digest)?;
        ingest.write(bytes)?;
        self.commit(ingest, Some(bytes.len() as u64)).map(|_| ())
    }

    /// Finishes an ingest: fsync, check size and digest, rename into place, fsync the
    /// directory, index it. On any error the temporary is removed and nothing is stored.
    pub fn commit(
        &self,
        mut ingest: Ingest,
        expected_size: Option<u64>,
    ) -> Result<u64, CacheError> {
        ingest.file.sync_all().map_err(io_err(&ingest.path))?;
        if let Some(expected) = expected_size {
            if expected != ingest.written {
                return Err(CacheError::SizeMismatch {
                    digest: ingest.digest.clone(),
                    expected,
                    got: ingest.written,
                });
            }
        }
        let computed = Digest::from_hasher(std::mem::take(&mut ingest.hasher));
        if computed != ingest.digest {
            return Err(CacheError::DigestMismatch {
                digest: ingest.digest.clone(),
                computed,
            });
        }
        let target = self.path(&ingest.digest);
        std::fs::rename(&ingest.path, &target).map_err(io_err(&target))?;
        ingest.done = true;
        sync_dir(&self.blobs).map_err(io_err(&self.blobs))?;
        let verified = std::fs::metadata(&target).ok().and_then(|m| Stamp::of(&m));
        let mut index = self.index();
        let size = ingest.written;
        if let Some(old) = index.entries.insert(
            ingest.digest.clone(),
            Entry {
                size,
                last_used: SystemTime::now(),
                verified,
            },
        ) {
            index.total -= old.size;
        }
        index.total += size;
        Ok(size)
    }

    /// Re-hashes a stored blob; `Ok(false)` when its bytes no longer match its name.
    pub fn verify(&self, digest: &Digest) -> Result<bool, CacheError> {
        let path = self.path(digest);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let before = file.metadata().ok().and_then(|m| Stamp::of(&m));
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut HashWriter(&mut hasher)).map_err(io_err(&path))?;
        let ok = Digest::from_hasher(hasher) == *digest;
        // Unchanged while it was read: what was hashed is what is stored.
        if ok && before.is_some() && before == file.metadata().ok().and_then(|m| Stamp::of(&m)) {
            self.set_stamp(digest, before);
        }
        Ok(ok)
    }

    /// Reads a whole stored blob if it is at most `max` bytes (manifests).
    pub fn read_small(&self, digest: &Digest, max: u64) -> Result<Option<Vec<u8>>, CacheError> {
        match self.get(digest) {
            Some(e) if e.size <= max => {}
            _ => return Ok(None),
        }
        let path = self.path(digest);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A blob being written: a temporary file and a running hash. Dropped without a successful
/// [`ContentStore::commit`], it removes its temporary.
pub struct Ingest {
    file: Arc<File>,
    path: PathBuf,
    hasher: Sha256,
    written: u64,
    digest: Digest,
    done: bool,
}

impl Ingest {
    /// The temporary file, for readers that stream along while it is written.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Reserves `size` bytes of disk for the temporary (its length is unchanged), so that a blob
    /// that cannot fit fails with [`CacheError::NoSpace`] before anything is written.
    /// Filesystems without `fallocate` skip the reservation.
    pub fn reserve(&self, size: u64) -> Result<(), CacheError> {
        if size == 0 {
            return Ok(());
        }
        match rustix::fs::fallocate(&*self.file, rustix::fs::FallocateFlags::KEEP_SIZE, 0, size) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::NOSPC || e == rustix::io::Errno::DQUOT => {
                Err(io_err(&self.path)(e.into()))
            }
            // Not supported here (EOPNOTSUPP, ENOSYS, …): written as it comes.
            Err(_) => Ok(()),
        }
    }

    /// Appends `buf` and hashes it.
    pub fn write(&mut self, buf: &[u8]) -> Result<(), CacheError> {
        (&*self.file).write_all(buf).map_err(io_err(&self.path))?;
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        Ok(())
    }

    /// The digest of what was written so far.
    pub fn digest_so_far(&self) -> Digest {
        Digest::from_hasher(self.hasher.clone())
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_checks_digest_and_size_and_leaves_nothing_on_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(dir.path()).expect("open");
        let good = Digest::of(b"hello");
        let mut i = store.begin(&good).expect("begin");
        i.write(b"hel").expect("write");
        i.write(b"lo").expect("write");
        assert_eq!(store.commit(i, Some(5)).expect("commit"), 5);
        assert!(store.contains(&good));
        assert_eq!(std::fs::read(store.path(&good)).expect("read"), b"hello");

        let claimed = Digest::of(b"other");
        let mut i = store.begin(&claimed).expect("begin");
        i.write(b"hello").expect("write");
        let e = store.commit(i, None).expect_err("mismatch");
        assert!(e.to_string().contains(claimed.as_str()), "{e}");
        assert!(!store.path(&claimed).exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("ingest"))
                .expect("ls")
                .count(),
            0
        );

        let mut i = store.begin(&claimed).expect("begin");
        i.write(b"oth").expect("write");
        assert!(matches!(
            store.commit(i, Some(5)),
            Err(CacheError::SizeMismatch { .. })
        ));
        assert_eq!(store.total(), 5);
    }

    #[test]
    fn open_removes_stale_temporaries_and_indexes_blobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = ContentStore::open(dir.path()).expect("open");
            store.put(&Digest::of(b"abc"), b"abc").expect("put");
            let mut i = store.begin(&Digest::of(b"zzz")).expect("begin");
            i.write(b"zz").expect("write");
            std::mem::forget(i); // as if the process died here
        }
        std::fs::write(dir.path().join("blobs/sha256/not-a-digest"), b"x").expect("write");
        let store = ContentStore::open(dir.path()).expect("reopen");
        assert_eq!(
            std::fs::read_dir(dir.path().join("ingest"))
                .expect("ls")
                .count(),
            0
        );
        assert_eq!(store.entries().len(), 1);
        assert_eq!(store.total(), 3);
        assert!(store.verify(&Digest::of(b"abc")).expect("verify"));
    }
}
