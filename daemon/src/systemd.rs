//! systemd integration: readiness, status, watchdog and stopping notifications. Every call is a
//! no-op when cairnd was not started by systemd (no NOTIFY_SOCKET).

use sd_notify::NotifyState;
use std::time::Duration;

pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
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

fn notify(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(false, states) {
        tracing::debug!(%error, "sd_notify failed");
    }
}
