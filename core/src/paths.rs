//! Default locations, shared so the daemon and the CLI agree without configuration.
//! As root (a device): `/var/lib/cairn` and `/run/cairn/cairnd.sock`. As anyone else (a
//! developer's machine): `$XDG_DATA_HOME/cairn` (else `~/.local/share/cairn`) and
//! `$XDG_RUNTIME_DIR/cairn/cairnd.sock` (else `cairnd.sock` in the state directory).

use std::path::PathBuf;

pub const SOCKET_ENV: &str = "CAIRN_SOCKET";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/cairn");
    }
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(data).join("cairn");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/cairn")
}

pub fn default_socket() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/cairn/cairnd.sock");
    }
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(runtime).join("cairn/cairnd.sock");
    }
    default_state_dir().join("cairnd.sock")
}
