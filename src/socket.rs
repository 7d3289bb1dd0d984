//! Unix socket set-up for the CRI and admin sockets. Both are root-equivalent: they are created
//! with a tight mode before they become visible (bound under a temporary name, chmod, renamed
//! into place); a stale socket file from an earlier run is replaced; a path that a live process
//! still serves, or that is not a socket, is an error that says so.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;
use tokio::net::UnixListener;

/// Mode of the CRI and admin sockets.
pub const SOCKET_MODE: u32 = 0o600;
/// Mode of the admin socket when an admin or reader group is configured.
pub const GROUP_SOCKET_MODE: u32 = 0o660;
/// Mode of directories created for sockets and state.
pub const DIR_MODE: u32 = 0o755;

#[derive(Debug, Error)]
pub enum SocketError {
    #[error("socket {0} is served by another live process; stop it or choose another path")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot set up socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SocketError + '_ {
    move |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Binds a listener at `path` with `mode` (and group `gid`, if given).
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, SocketError> {
    bind_with_group(path, mode, None)
}

/// [`bind`], owned by group `gid` when given.
pub fn bind_with_group(
    path: &Path,
    mode: u32,
    gid: Option<u32>,
) -> Result<UnixListener, SocketError> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
                .map_err(io(dir))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_path_buf()));
            }
            tracing::info!(path = %path.display(), "replacing stale socket");
            std::fs::remove_file(path).map_err(io(path))?;
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(path)(e)),
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "socket".into());
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io(&tmp))?;
    let placed = std::os::unix::fs::chown(&tmp, None, gid)
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path)(e));
    }
    Ok(listener)
}

/// Removes the socket file at `path` on shutdown (best effort).
pub fn remove(path: &Path) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_live_and_foreign_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/s.sock");
        let live = bind(&path, SOCKET_MODE).expect("bind");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            bind(&path, SOCKET_MODE),
            Err(SocketError::InUse(_))
        ));
        drop(live);
        let again = bind(&path, SOCKET_MODE).expect("stale replaced");
        drop(again);
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").expect("write");
        assert!(matches!(
            bind(&file, SOCKET_MODE),
            Err(SocketError::NotASocket(_))
        ));
    }
}
