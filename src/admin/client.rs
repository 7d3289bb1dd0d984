//! The admin client: connects to the admin socket, failing fast with a message that says what
//! to check when the daemon is not there.

use super::pb::admin_client::AdminClient;
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use tonic::transport::{Channel, Endpoint};

/// Connects to the admin API on `socket`.
pub async fn connect(socket: &Path) -> Result<AdminClient<Channel>, String> {
    let path: PathBuf = socket.to_path_buf();
    let channel = Endpoint::from_static("http://admin.invalid")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| {
            format!(
                "cannot reach the imagestream daemon at {}: {} (is `imagestream serve` running? --admin-socket chooses the socket)",
                socket.display(),
                crate::audit::error_chain(&e)
            )
        })?;
    Ok(AdminClient::new(channel))
}
