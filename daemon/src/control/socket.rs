//! The control socket: never stolen from a live daemon, a stale one replaced, its mode and
//! group set from the config.

use crate::config::{Config, ReadAccess};
use nix::unistd::Group;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

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
pub fn bind_socket(path: &Path, config: &Config) -> anyhow::Result<UnixListenerStream> {
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
    Ok(UnixListenerStream::new(listener))
}
