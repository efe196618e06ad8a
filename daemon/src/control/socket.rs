//! The control socket: never stolen from a live daemon, a stale one replaced, its mode and
//! group set from the config, and at most `CONNECTIONS_PER_UID` connections open per caller's
//! uid (one more is closed at once), so no local user can hold every descriptor cairnd has.

use crate::config::{Config, ReadAccess};
use nix::unistd::Group;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::ReceiverStream;

/// Control connections one uid may hold open at once. cairnctl holds one per command (a
/// `logs -f` for as long as it follows), so this is many operators' worth.
pub const CONNECTIONS_PER_UID: usize = 32;
/// How often refusals for the connection bound are logged (with a count).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Refuses to go on when a live daemon already serves `path` (checked before anything else is
/// set up, so a second daemon changes nothing).
pub fn check_socket_free(path: &Path) -> anyhow::Result<()> {
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "another cairnd is already serving {}; stop it first or give this one --socket",
            path.display()
        );
    }
    Ok(())
}

/// Binds the control socket: refuses to steal one a live daemon holds, removes a stale one,
/// and sets its mode and group.
pub fn bind_socket(
    path: &Path,
    config: &Config,
) -> anyhow::Result<ReceiverStream<std::io::Result<Counted>>> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    check_socket_free(path)?;
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot create the control socket {}: {e}", path.display()))?;
    let mode = match config.control.read_access {
        ReadAccess::Group => 0o660,
        ReadAccess::Any => 0o666,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Ok(Some(group)) = Group::from_name(&config.control.group) {
        nix::unistd::chown(path, None, Some(group.gid)).map_err(|e| {
            anyhow::anyhow!(
                "cannot give {} to group {}: {e}",
                path.display(),
                group.name
            )
        })?;
    }
    Ok(bounded(listener, CONNECTIONS_PER_UID))
}

/// Open control connections per uid.
type Open = Arc<Mutex<HashMap<u32, usize>>>;

/// A control connection, counted against its caller's uid until it is dropped.
pub struct Counted {
    stream: UnixStream,
    uid: u32,
    open: Open,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// Accepts on `listener` in a task of its own and yields the connections whose uid holds
/// fewer than `per_uid`; the others are closed at once.
fn bounded(listener: UnixListener, per_uid: usize) -> ReceiverStream<std::io::Result<Counted>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    let open: Open = Arc::default();
    tokio::spawn(async move {
        let mut refused = 0u64;
        let mut last_logged: Option<Instant> = None;
        let mut failed_accepts = 0u64;
        let mut last_failure_logged: Option<Instant> = None;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors and the like: back off instead of spinning, and say
                    // so once per interval.
                    failed_accepts += 1;
                    if last_failure_logged.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL) {
                        tracing::warn!(%error, failures = failed_accepts, "cannot accept control connections");
                        failed_accepts = 0;
                        last_failure_logged = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(credentials) = stream.peer_cred() else {
                continue;
            };
            // A pool's user is let through to be refused by `Access` with a message that says
            // why; its connections count against its bound like anyone's.
            let uid = credentials.uid();
            let admitted = {
                let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
                let count = open.entry(uid).or_default();
                if *count < per_uid {
                    *count += 1;
                    true
                } else {
                    false
                }
            };
            if !admitted {
                refused += 1;
                if last_logged.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL) {
                    tracing::warn!(
                        uid,
                        refused,
                        "closed control connections over the bound of {per_uid} open per uid"
                    );
                    refused = 0;
                    last_logged = Some(Instant::now());
                }
                continue;
            }
            let counted = Counted {
                stream,
                uid,
                open: Arc::clone(&open),
            };
            if sender.send(Ok(counted)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(receiver)
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn a_uid_over_its_bound_is_closed_and_a_freed_slot_is_given_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let mut incoming = bounded(UnixListener::bind(&path).unwrap(), 2);
        let mut clients = Vec::new();
        let mut admitted = Vec::new();
        for _ in 0..2 {
            clients.push(UnixStream::connect(&path).await.unwrap());
            admitted.push(incoming.next().await.unwrap().unwrap());
        }
        // The third is closed by the server without being handed on.
        let mut third = UnixStream::connect(&path).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut third, &mut byte),
        )
        .await
        .expect("the refused connection is closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // Closing one frees its slot.
        drop(admitted.pop());
        let _fourth = UnixStream::connect(&path).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        assert!(
            matches!(next, Ok(Some(Ok(_)))),
            "a freed slot was not given again"
        );
    }
}
