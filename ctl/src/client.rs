//! Connecting to cairnd: gRPC over the daemon's unix socket.

use cairn_core::proto::control_client::ControlClient;
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cairnd is not running at {path} (no socket there); start it, or point --socket / CAIRN_SOCKET at the right path")]
    Missing { path: PathBuf },
    #[error("permission denied on {path}: only root and members of the daemon's control group (default `cairn`) may use it; add your user with `usermod -aG cairn $USER`")]
    Permission { path: PathBuf },
    #[error("cannot reach cairnd at {path}: {reason}")]
    Other { path: PathBuf, reason: String },
}

/// Connects to the daemon at `path`, checking first that the socket can be reached so the
/// error says why when it cannot.
pub async fn connect(path: &Path) -> Result<ControlClient<Channel>, ConnectError> {
    let probe = tokio::net::UnixStream::connect(path).await;
    if let Err(error) = probe {
        return Err(match error.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ConnectError::Missing { path: path.into() }
            }
            std::io::ErrorKind::PermissionDenied => ConnectError::Permission { path: path.into() },
            _ => ConnectError::Other {
                path: path.into(),
                reason: error.to_string(),
            },
        });
    }
    let socket = path.to_path_buf();
    // The URI is required by the API and ignored: every connection goes to the socket.
    let channel = Endpoint::from_static("http://cairnd.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|error| ConnectError::Other {
            path: path.into(),
            reason: error.to_string(),
        })?;
    Ok(ControlClient::new(channel).max_decoding_message_size(64 << 20))
}
