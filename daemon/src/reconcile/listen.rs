//! Listeners: binding an app's address (patiently, where a previous pool may still hold it),
//! which addresses conflict, and waking an app with no pool when a connection arrives. The
//! supervisor binds every listener and keeps it across pool restarts, so a connection waits in
//! the backlog instead of being refused.

use super::ReconcileError;
use crate::spec::AppName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The task waiting for an app's next connection; stops waiting when dropped (the app was
/// removed, redeployed or shut down).
pub(super) struct Waker(tokio::task::JoinHandle<()>);

impl Drop for Waker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits until a connection is pending on `listener`, then asks (through `wake`) for the app's
/// pool to be started. The connection stays in the backlog for the new pool to accept.
pub(super) fn wake_on_connection(
    wake: mpsc::Sender<(AppName, u64)>,
    app: AppName,
    generation: u64,
    listener: Option<&Arc<std::net::TcpListener>>,
) -> Waker {
    let watched = listener.and_then(|l| l.try_clone().ok());
    Waker(tokio::spawn(async move {
        let Some(watched) = watched else { return };
        // SAFETY: `watched` is a listener this task owns; its descriptor stays open and the
        // same for as long as the AsyncFd that owns it.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(watched, tokio::io::Interest::READABLE)
        };
        let Ok(readiness) = registered else {
            return;
        };
        if readiness.readable().await.is_ok() {
            let _ = wake.send((app, generation)).await;
        }
    }))
}

/// Binds `addr`, retrying for up to `patience` while it is in use.
pub(super) async fn bind_patiently(
    addr: SocketAddr,
    patience: Duration,
) -> Result<std::net::TcpListener, ReconcileError> {
    let start = Instant::now();
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => return Ok(listener),
            Err(error)
                if error.kind() == std::io::ErrorKind::AddrInUse && start.elapsed() < patience =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => {
                return Err(ReconcileError::AddressUnavailable {
                    addr,
                    reason: match error.kind() {
                        std::io::ErrorKind::AddrInUse => {
                            "the address is in use by another program".to_string()
                        }
                        std::io::ErrorKind::AddrNotAvailable => {
                            "no interface on this device has that address".to_string()
                        }
                        std::io::ErrorKind::PermissionDenied => {
                            "ports below 1024 need root or CAP_NET_BIND_SERVICE".to_string()
                        }
                        _ => error.to_string(),
                    },
                })
            }
        }
    }
}

/// Whether two apps' listen addresses conflict: the same port on the same address, or on any
/// address when either is unspecified (0.0.0.0 or ::).
pub(super) fn overlaps(theirs: SocketAddr, wanted: SocketAddr) -> bool {
    theirs.port() == wanted.port()
        && (theirs.ip() == wanted.ip()
            || theirs.ip().is_unspecified()
            || wanted.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_overlap_on_one_port_where_either_is_unspecified() {
        let cases = [
            ("127.0.0.1:80", "127.0.0.1:80", true),
            ("127.0.0.1:80", "127.0.0.1:81", false),
            ("127.0.0.1:80", "127.0.0.2:80", false),
            ("0.0.0.0:80", "127.0.0.1:80", true),
            ("127.0.0.1:80", "0.0.0.0:80", true),
            ("[::]:80", "127.0.0.1:80", true),
            ("0.0.0.0:80", "0.0.0.0:81", false),
        ];
        for (theirs, wanted, expected) in cases {
            assert_eq!(
                overlaps(theirs.parse().unwrap(), wanted.parse().unwrap()),
                expected,
                "{theirs} vs {wanted}"
            );
        }
    }
}
