//! systemd integration: readiness, status, watchdog and stopping notifications. Every call is a
//! no-op when cairnd was not started by systemd (no NOTIFY_SOCKET).

use sd_notify::NotifyState;
use std::time::Duration;

pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Reports the status line, only when it changed since the last report.
pub fn status(status: &str) {
    static LAST: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if *last != status {
        status.clone_into(&mut last);
        notify(&[NotifyState::Status(status)]);
    }
}

pub fn stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("draining requests and stopping"),
    ]);
}

pub fn watchdog() {
    notify(&[NotifyState::Watchdog]);
}

/// Half the watchdog period systemd asked for, if it asked. As sd_watchdog_enabled(3) says,
/// WATCHDOG_PID, when set, must name this process; when unset the request is ours.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Sends one notification without ever blocking: sd_notify's own send blocks when the
/// receiver's queue is full, and a notifier that stopped reading would then freeze the main
/// loop (SIGTERM included). A notification that does not fit is dropped.
fn notify(states: &[NotifyState]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message: String = states.iter().map(|state| format!("{state}\n")).collect();
    if let Err(error) = send(&path, message.as_bytes()) {
        tracing::debug!(%error, "sd_notify failed");
    }
}

fn send(path: &std::ffi::OsStr, message: &[u8]) -> std::io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = path.as_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    socket.send_to_addr(message, &address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_notify_socket_never_blocks_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // Nobody reads: the queue fills, then sends fail at once instead of waiting.
        let mut failed = false;
        for _ in 0..10_000 {
            if send(path.as_os_str(), b"STATUS=busy\n").is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "the queue never filled");
        let mut buffer = [0u8; 64];
        let read = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..read], b"STATUS=busy\n");
    }
}
